"""gpu_check step 1: versions, the device, grouped_mm support and the dense matmul rate, as JSON.

The rate: an n x n x n matmul on random data (bf16, n = 8192, on CUDA; fp32, n = 256, on the CPU),
three warm-ups, then the median of ten products timed with CUDA events (the host clock on the CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy
import torch


def matmul_tflops(device: str, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "numpy": numpy.__version__, "device": "cpu"}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as e:  # absent, or broken on this platform
        info["triton"] = f"unavailable: {e!r}"
    from aoe.nn.fused_scores import triton_available
    from aoe.nn.grouped_mm import _probe_torch_kernel

    info["fused_scores_kernels_import"] = triton_available()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=list(torch.cuda.get_device_capability()),
                    multiprocessors=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    info["grouped_mm_kernel"] = _probe_torch_kernel(device, dtype)
    n = 8192 if cuda else 256
    info[f"dense_matmul_tflops_{str(dtype).split('.')[-1]}_{n}"] = matmul_tflops(device, dtype, n)
    return info


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    info = environment()
    with open(ap.parse_args().json, "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))
