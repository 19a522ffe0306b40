"""Generic measurements: median time (`torch.utils.benchmark.Timer`) and peak memory of a callable (e.g. a forward
+ backward pass or a training step), peak tensor memory from the profiler's allocation events, and the achieved GEMM
throughput of the machine (the roofline a GEMM-bound kernel is compared with)."""

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch._C._profiler import _EventType
from torch.utils import benchmark

from txformer.machine import BYTES_PER_MIB, memory_probe_for


# What a measurement's time is: `wall`, the elapsed time; `process`, the CPU time of this process (all its threads),
# which other jobs on a shared machine barely change (a step's cost in CPU-seconds; CPU only).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}


@dataclass
class Measurement:
    """Median time (s, on the measurement's clock) of one run, the per-run time of every timed block, and the median
    peak memory (MiB) of the blocks above the level before each (NaN where the platform cannot tell)."""

    seconds: float
    all_seconds: list[float]
    peak_memory_mib: float


def timer(
    stmt: str, setup: str = "pass", clock: Callable[[], float] = time.perf_counter, **names: object
) -> benchmark.Timer:
    """A `torch.utils.benchmark.Timer` of `stmt` over `names` on `clock` (one of `CLOCKS`), with torch's current
    number of CPU threads (the Timer's default is one)."""
    return benchmark.Timer(stmt=stmt, setup=setup, globals=names, num_threads=torch.get_num_threads(), timer=clock)


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_callable(
    step: Callable[[], object],
    device: torch.device,
    min_run_time: float = 1.0,
    prepare: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Time and peak memory of `step()` with `Timer.blocked_autorange`: a warm-up run sizes the blocks (one run each
    once a run is long enough that the clock's overhead does not count), then blocks run until `min_run_time`
    seconds of `clock` (one of `CLOCKS`); the time is the median per run. Before every block, outside the clock, `prepare()` runs (e.g. clearing
    gradients) and the memory window opens; each block's peak is read after it, so what `step` allocates and frees
    counts, and the median over the blocks is kept."""
    probe = memory_probe_for(device, release_freed_memory=True)
    peaks = []
    try:
        step_timer = timer(
            "step()", "prepare(); probe.reset()", clock, step=step, prepare=prepare or (lambda: None), probe=probe
        )
        result = step_timer.blocked_autorange(
            callback=lambda number, seconds: peaks.append(probe.peak_rise_mib()), min_run_time=min_run_time
        )
    finally:
        probe.close()
    if prepare is not None:
        prepare()
    return Measurement(result.median, list(result.times), statistics.median(peaks))


def measure_forward_backward(
    function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], min_run_time: float = 1.0
) -> Measurement:
    """Time and peak memory of `function(*inputs).backward(gradient)`, as `measure_callable` measures a step.

    The output gradient is drawn once, and the inputs' `.grad` are cleared before every block, so a block's first
    run allocates what every run of a fresh pass does (its output, the saved activations and the input gradients):
    that is what the peak counts.
    """
    output_grad: list[torch.Tensor] = []

    def step() -> None:
        output = function(*inputs)
        if not output_grad:
            output_grad.append(torch.randn_like(output))
        output.backward(output_grad[0])

    def clear_grads() -> None:
        for tensor in inputs:
            tensor.grad = None

    return measure_callable(step, inputs[0].device, min_run_time, prepare=clear_grads)


def tensor_peak_mib(step: Callable[[], object], device: torch.device) -> float:
    """Peak memory held by tensors allocated during `step()` on `device` (MiB above the level before it), from the
    allocation and free events of the PyTorch profiler (`profile_memory=True`).

    Unlike the resident-set probe this counts tensor bytes only, exactly and whatever the allocator keeps cached, on
    CPU as well as CUDA; it does not see memory outside tensors (Python objects, library workspaces). The profiler
    slows the step down, so it is a separate, untimed run.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        step()
        synchronize(device)
    events = []
    pending = list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == device.type:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    events.sort()
    level = peak = 0
    for _, size in events:
        level += size
        peak = max(peak, level)
    return peak / BYTES_PER_MIB


def measure_matmul_flops(
    device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32, min_run_time: float = 1.0
) -> float:
    """Achieved FLOP/s of a `size`×`size` matrix product on `device` (median time of `Timer.blocked_autorange`)."""
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    right = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    seconds = timer("torch.matmul(left, right)", torch=torch, left=left, right=right).blocked_autorange(
        min_run_time=min_run_time
    )
    return 2 * size**3 / seconds.median
