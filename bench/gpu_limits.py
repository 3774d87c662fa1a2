"""The hardware's own limits, measured on the host: HBM copy bandwidth and the bf16 matmul rate.

The benchmarks compare every throughput figure against these (bench/bench_gpu.py imports it);
run alone it prints them as JSON.
"""
from __future__ import annotations

import json
import sys


def _time_cuda(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats, timed with CUDA events after a warm-up."""
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(gib: float = 4.0, repeats: int = 20) -> float:
    """Device-to-device copy: every byte is read once and written once, so bytes moved = 2 x size."""
    import torch
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = _time_cuda(lambda: dst.copy_(src), repeats)
    src = dst = None  # frees the memory for empty_cache (a `del` would leave the lambda's names undefined)
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds / 1e9


def read_bandwidth_gbs(gib: float = 4.0, repeats: int = 20) -> float:
    """A reduction reads every byte once and writes almost nothing: the decode step's pattern."""
    import torch
    n = int(gib * 2**30) // 2
    src = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    seconds = _time_cuda(lambda: src.sum(dtype=torch.float32), repeats)
    src = None  # frees the memory for empty_cache
    torch.cuda.empty_cache()
    return n * 2 / seconds / 1e9


def bf16_matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    import torch
    a = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(size, size, dtype=torch.bfloat16, device="cuda")
    seconds = _time_cuda(lambda: a @ b, repeats)
    return 2 * size**3 / seconds / 1e12


def measure() -> dict:
    import torch
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 1),
        "read_bandwidth_gbs": round(read_bandwidth_gbs(), 1),
        "bf16_matmul_tflops": round(bf16_matmul_tflops(), 1),
        "torch": torch.__version__,
    }


if __name__ == "__main__":
    json.dump(measure(), sys.stdout, indent=2)
    print()
