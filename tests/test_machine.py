"""The machine description and the peak-memory probe shared by profiling and the benchmarks."""

import mmap
import os

import pytest
import torch

from txformer.machine import (
    ProcessHighWaterMarkProbe,
    describe_hardware,
    describe_machine,
    describe_software,
    memory_probe_for,
    process_peak_memory_mib,
)


needs_clear_refs = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs a writable /proc/self/clear_refs"
)


def allocate_and_free(mib: int) -> None:
    """Maps `mib` MiB of fresh pages, writes them (resident) and unmaps them: new memory whatever the heap holds."""
    page = b"\x01" * mmap.PAGESIZE
    with mmap.mmap(-1, mib * 2**20) as pages:
        for _ in range(len(pages) // len(page)):
            pages.write(page)


@needs_clear_refs
@pytest.mark.parametrize("release_freed_memory", [False, True])
def test_process_high_water_mark_is_reset_per_window(release_freed_memory):
    probe = memory_probe_for(torch.device("cpu"), release_freed_memory=release_freed_memory)
    assert isinstance(probe, ProcessHighWaterMarkProbe)
    try:
        probe.reset()
        baseline = probe.read()["peak_memory_mib"]
        allocate_and_free(64)
        peak, rise = probe.read()["peak_memory_mib"], probe.peak_rise_mib()
        probe.reset()
        assert peak >= baseline + 60 and 60 <= rise <= 64 + 16
        assert probe.read()["peak_memory_mib"] < peak - 50 and probe.peak_rise_mib() < 16
    finally:
        probe.close()


@needs_clear_refs
def test_process_peak_covers_the_whole_process_until_a_reset():
    allocate_and_free(96)
    with open("/proc/self/status") as status:
        resident_mib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
    assert process_peak_memory_mib() >= resident_mib + 90


def test_describe_machine_one_line_of_hardware_and_software():
    hardware = {
        "cpu_model": "Test CPU",
        "cpu_count": 8,
        "cpu_count_usable": 2,
        "memory_total_mib": 24 * 1024,
        "gpu_names": ["H200"],
    }
    software = {"python": "3.11.9", "torch": "2.13.0", "torch_num_threads": 2, "transformers": "5.24.0"}
    assert describe_machine(hardware) == "Test CPU, 8 CPUs (2 usable), 24 GiB RAM, GPUs: H200"
    assert describe_machine(hardware, software) == (
        "Test CPU, 8 CPUs (2 usable), 24 GiB RAM, GPUs: H200; Python 3.11.9, torch 2.13.0 (2 CPU threads), "
        "transformers 5.24.0"
    )
    here = describe_machine()
    assert here.startswith(describe_hardware()["cpu_model"]) and f"torch {torch.__version__}" in here
    assert describe_software()["torch_num_threads"] == torch.get_num_threads()
