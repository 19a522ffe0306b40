"""Generic measurements: median time and peak memory of a callable (e.g. a forward + backward pass or a training
step), peak tensor memory from the profiler's allocation events, and the achieved GEMM throughput of the machine
(the roofline a GEMM-bound kernel is compared with)."""

import ctypes
import ctypes.util
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch._C._profiler import _EventType


BYTES_PER_MIB = 2**20
KIB_PER_MIB = 1024
PROC_STATUS = "/proc/self/status"
PROC_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass
class Measurement:
    """Median wall time (s) over the repeats, every repeat's time, and the median peak memory (MiB) above the level
    before each repeat (NaN where the platform cannot tell)."""

    seconds: float
    all_seconds: list[float]
    peak_memory_mib: float


def _proc_status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    with open(PROC_STATUS) as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class HostPeakMemory:
    """Peak resident memory of this process above its level at `reset` (Linux): VmHWM of /proc/self/status after
    resetting it to the current RSS through /proc/self/clear_refs. Freed heap pages are first handed back to the OS
    (glibc `malloc_trim`), so that memory kept by the allocator from earlier work is not reused unseen."""

    def __init__(self):
        libc_path = ctypes.util.find_library("c")
        self._malloc_trim = getattr(ctypes.CDLL(libc_path), "malloc_trim", None) if libc_path else None
        self._baseline_kib = 0

    def reset(self) -> None:
        """Starts a new peak window at the current resident size."""
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        with open(PROC_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write("5")
        self._baseline_kib = _proc_status_kib("VmRSS")

    def peak_mib(self) -> float:
        """Highest resident size since `reset`, minus the size at `reset`."""
        return (_proc_status_kib("VmHWM") - self._baseline_kib) / KIB_PER_MIB


class CudaPeakMemory:
    """Peak CUDA memory allocated by tensors above the level at `reset` (`max_memory_allocated`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._baseline_bytes = 0

    def reset(self) -> None:
        """Starts a new peak window at the currently allocated memory."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._baseline_bytes = torch.cuda.memory_allocated(self.device)

    def peak_mib(self) -> float:
        """Highest allocated memory since `reset`, minus the memory allocated at `reset`."""
        return (torch.cuda.max_memory_allocated(self.device) - self._baseline_bytes) / BYTES_PER_MIB


class UnknownPeakMemory:
    """Platforms without /proc or CUDA statistics: no peak memory (NaN)."""

    def reset(self) -> None:
        """Nothing to reset."""

    def peak_mib(self) -> float:
        """Unknown."""
        return math.nan


def peak_memory_probe(device: torch.device) -> HostPeakMemory | CudaPeakMemory | UnknownPeakMemory:
    """The peak-memory probe of a device: CUDA statistics, else the process's resident memory where /proc exists."""
    if device.type == "cuda":
        return CudaPeakMemory(device)
    try:
        probe = HostPeakMemory()
        probe.reset()
        return probe
    except OSError:
        return UnknownPeakMemory()


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that a clock read after it covers that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_callable(
    step: Callable[[], object],
    device: torch.device,
    repeats: int = 5,
    warmup: int = 1,
    prepare: Callable[[], object] | None = None,
) -> Measurement:
    """Time and peak memory of `step()`, median over `repeats` after `warmup` runs. `prepare()` runs before every run,
    outside the clock and before the memory window opens (e.g. clearing gradients); `step`'s return value is dropped
    inside the window, so what it allocates and frees counts in the peak."""
    probe = peak_memory_probe(device)
    for _ in range(max(warmup, 1)):
        if prepare is not None:
            prepare()
        step()
    times, peaks = [], []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        probe.reset()
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        peaks.append(probe.peak_mib())
    if prepare is not None:
        prepare()
    return Measurement(statistics.median(times), times, statistics.median(peaks))


def measure_forward_backward(
    function: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], repeats: int = 5, warmup: int = 1
) -> Measurement:
    """Time and peak memory of `function(*inputs).backward(gradient)`, median over `repeats` after `warmup` runs.

    The output gradient is drawn once, and the inputs' `.grad` are cleared before every run, so each run allocates
    the same tensors (its output, the saved activations and the input gradients): that is what the peak counts.
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

    return measure_callable(step, inputs[0].device, repeats, warmup, prepare=clear_grads)


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
    device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> float:
    """Achieved FLOP/s of a `size`×`size` matrix product on `device` (median of `repeats`, after one warm-up)."""
    generator = torch.Generator(device=device).manual_seed(0)
    left = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    right = torch.randn(size, size, generator=generator, device=device, dtype=dtype)
    torch.matmul(left, right)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(left, right)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)
