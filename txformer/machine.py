"""The machine a measurement runs on: its description (hardware, software, and one line of both for reports) and the
probe of its peak memory. Shared by the profiling callback, the benchmarks and the GPU check."""

import ctypes
import ctypes.util
import importlib.metadata
import math
import os
import platform
import socket
from typing import Any

import torch
import transformers


BYTES_PER_MIB = 2**20
KIB_PER_MIB = 1024


class CudaMemoryProbe:
    """Peak CUDA memory allocated by tensors in a window: `max_memory_allocated`/`max_memory_reserved` after
    resetting the peak statistics."""

    source = "cuda_max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device = device
        self._start_bytes = 0

    def synchronize(self) -> None:
        """Waits for the device's queued work, so that a clock read after it covers that work."""
        torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        """Starts a new peak window at the memory allocated now."""
        torch.cuda.reset_peak_memory_stats(self.device)
        self._start_bytes = torch.cuda.memory_allocated(self.device)

    def read(self) -> dict[str, float]:
        """The window's peak allocated (`peak_memory_mib`) and reserved memory."""
        return {
            "peak_memory_mib": torch.cuda.max_memory_allocated(self.device) / BYTES_PER_MIB,
            "peak_memory_reserved_mib": torch.cuda.max_memory_reserved(self.device) / BYTES_PER_MIB,
        }

    def peak_rise_mib(self) -> float:
        """The window's peak allocated memory above the memory allocated at `reset`."""
        return (torch.cuda.max_memory_allocated(self.device) - self._start_bytes) / BYTES_PER_MIB

    def close(self) -> None:
        """Nothing to release."""


class MpsMemoryProbe:
    """MPS memory at the end of a window: MPS keeps no peak counter, so these are current values, not peaks."""

    source = "mps_current_allocated_memory"

    def synchronize(self) -> None:
        """Waits for the device's queued work, so that a clock read after it covers that work."""
        torch.mps.synchronize()

    def reset(self) -> None:
        """MPS has no peak statistics to reset."""

    def read(self) -> dict[str, float]:
        """Memory held by tensors (`peak_memory_mib`) and by the Metal driver now."""
        return {
            "peak_memory_mib": torch.mps.current_allocated_memory() / BYTES_PER_MIB,
            "driver_memory_mib": torch.mps.driver_allocated_memory() / BYTES_PER_MIB,
        }

    def peak_rise_mib(self) -> float:
        """Unknown without a peak counter."""
        return math.nan

    def close(self) -> None:
        """Nothing to release."""


class ProcessHighWaterMarkProbe:
    """Peak resident set size of the process in a window (Linux): VmHWM of /proc/self/status, reset to the current
    resident size through /proc/self/clear_refs. Before a reset, VmHWM is the peak since the process started.

    With `release_freed_memory`, every reset first hands freed heap pages back to the OS (glibc `malloc_trim`), so
    that memory the allocator kept from earlier work is not reused unseen in the window (the benchmarks' choice; the
    profiling callback leaves the allocator alone between training steps).
    """

    source = "proc_vmhwm_per_step"

    def __init__(self, release_freed_memory: bool = False):
        # Kept open: every window writes one and reads the other.
        self.clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY)
        self.status = os.open("/proc/self/status", os.O_RDONLY)
        libc_path = ctypes.util.find_library("c") if release_freed_memory else None
        self._malloc_trim = getattr(ctypes.CDLL(libc_path), "malloc_trim", None) if libc_path else None
        self._start_kib = 0

    def synchronize(self) -> None:
        """CPU work is synchronous."""

    def _status_kib(self, field: bytes) -> int:
        """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
        status = os.pread(self.status, 8192, 0)
        start = status.index(field) + len(field)
        return int(status[start : status.index(b"kB", start)])

    def reset(self) -> None:
        """Sets the high-water mark to the current resident set size."""
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        os.write(self.clear_refs, b"5")
        self._start_kib = self._status_kib(b"VmRSS:")

    def read(self) -> dict[str, float]:
        """The highest resident set size since the last reset."""
        return {"peak_memory_mib": self._status_kib(b"VmHWM:") / KIB_PER_MIB}

    def peak_rise_mib(self) -> float:
        """The window's peak resident size above the resident size at `reset`."""
        return (self._status_kib(b"VmHWM:") - self._start_kib) / KIB_PER_MIB

    def close(self) -> None:
        """Closes the /proc files."""
        os.close(self.clear_refs)
        os.close(self.status)


class LifetimePeakRssProbe:
    """Peak resident set size since the process started (`getrusage`), used where /proc is missing: never reset."""

    source = "getrusage_maxrss_lifetime"

    def synchronize(self) -> None:
        """CPU work is synchronous."""

    def reset(self) -> None:
        """`getrusage` has no reset."""

    def read(self) -> dict[str, float]:
        """The process's lifetime peak resident set size (KiB on Linux, bytes on macOS)."""
        import resource

        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_memory_mib": max_rss / (BYTES_PER_MIB if platform.system() == "Darwin" else KIB_PER_MIB)}

    def peak_rise_mib(self) -> float:
        """Unknown without a reset."""
        return math.nan

    def close(self) -> None:
        """Nothing to release."""


MemoryProbe = CudaMemoryProbe | MpsMemoryProbe | ProcessHighWaterMarkProbe | LifetimePeakRssProbe


def memory_probe_for(device: torch.device, release_freed_memory: bool = False) -> MemoryProbe:
    """The memory probe of a device: CUDA or MPS statistics, else the host process's resident set size
    (`release_freed_memory`: see `ProcessHighWaterMarkProbe`)."""
    if device.type == "cuda":
        return CudaMemoryProbe(device)
    if device.type == "mps":
        return MpsMemoryProbe()
    try:
        return ProcessHighWaterMarkProbe(release_freed_memory)
    except OSError:
        return LifetimePeakRssProbe()


def process_peak_memory_mib() -> float:
    """Peak resident memory of this process since it started, imports included (or since a probe's last reset)."""
    probe = memory_probe_for(torch.device("cpu"))
    try:
        return probe.read()["peak_memory_mib"]
    finally:
        probe.close()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware() -> dict[str, Any]:
    """CPU model and cores, host memory, GPU names, count and memory of this machine."""
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_properties = [torch.cuda.get_device_properties(index) for index in range(gpu_count)]
    try:
        memory_total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / BYTES_PER_MIB
    except (AttributeError, ValueError, OSError):
        memory_total_mib = None
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_total_mib": memory_total_mib,
        "gpu_count": gpu_count,
        "gpu_names": [properties.name for properties in gpu_properties],
        "gpu_memory_total_mib": [properties.total_memory / BYTES_PER_MIB for properties in gpu_properties],
        "mps_available": torch.backends.mps.is_available(),
    }


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe_software() -> dict[str, Any]:
    """Versions of Python, the libraries training depends on and txformer, and torch's CPU threads."""
    from . import __version__ as txformer_version

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": installed_version("accelerate"),
        "datasets": installed_version("datasets"),
        "txformer": txformer_version,
        "torch_num_threads": torch.get_num_threads(),
    }


def describe_machine(hardware: dict[str, Any] | None = None, software: dict[str, Any] | None = None) -> str:
    """One line for reports: CPU, cores, memory and GPUs of `hardware`, then the versions and threads of `software`
    when given. Without arguments, this machine and its software now."""
    if hardware is None and software is None:
        hardware, software = describe_hardware(), describe_software()
    parts = []
    if hardware is not None:
        cores = f"{hardware.get('cpu_count', '?')} CPUs"
        usable = hardware.get("cpu_count_usable")
        if usable is not None and usable != hardware.get("cpu_count"):
            cores += f" ({usable} usable)"
        memory_gib = (hardware.get("memory_total_mib") or 0) / KIB_PER_MIB
        gpus = ", ".join(hardware.get("gpu_names") or []) or "none"
        parts.append(f"{hardware.get('cpu_model', '?')}, {cores}, {memory_gib:.0f} GiB RAM, GPUs: {gpus}")
    if software is not None:
        parts.append(
            f"Python {software.get('python')}, torch {software.get('torch')} "
            f"({software.get('torch_num_threads')} CPU threads), transformers {software.get('transformers')}"
        )
    return "; ".join(parts)
