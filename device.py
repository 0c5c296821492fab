"""
The machine a script runs on: its cores, device and precision choice, torchrun's processes,
autocast, peak memory, and timing (GPU sync, timed calls, the matmul peak that MFU divides by).
"""
import os
import sys
import time
from contextlib import nullcontext

from common import die


def cpu_count():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def pick_device(device='auto'):
    """'auto' = cuda, else mps, else cpu. A named device must work here (clear error if not)."""
    import torch
    if device == 'auto':
        if torch.cuda.is_available():
            return 'cuda'
        if getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available():
            return 'mps'
        return 'cpu'
    try:
        torch.empty(1, device=device)
    except Exception as e:
        die(f"device {device!r} is not usable here ({str(e).splitlines()[0]}): use --device=cpu or --device=auto")
    return device


def start_processes(device, backend='auto'):
    """Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set): join the process group, one process per
    device (cuda:LOCAL_RANK); backend auto is nccl on CUDA, gloo otherwise. Returns (rank,
    local_rank, world_size, device): (0, 0, 1, device) for a lone process."""
    import torch
    if int(os.environ.get('RANK', -1)) == -1:
        return 0, 0, 1, device
    rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    auto = 'nccl' if device.startswith('cuda') else 'gloo'
    torch.distributed.init_process_group(backend=auto if backend == 'auto' else backend)
    return rank, local_rank, world_size, device


def pick_dtype(dtype, device):
    """'auto' means bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU/MPS."""
    import torch
    if dtype != 'auto':
        if dtype not in ('float32', 'bfloat16', 'float16'):
            die(f"dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
        return dtype
    if device.startswith('cuda'):
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    return 'float32'


def cpu_has_bf16_matmul():
    """True where the CPU multiplies bf16 matrices in hardware (x86 AVX512-BF16 or AMX). There bf16
    autocast trains ~1.5x faster than fp32 (a 2.2x GEMM rate on a 2-core AMD EPYC); elsewhere
    (older x86, ARM) bf16 is emulated and slower than fp32. config/tinystories_cpu.py asks this."""
    import torch
    checks = ('_is_avx512_bf16_supported', '_is_amx_tile_supported')  # torch.cpu's own feature checks
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(device, dtype):
    """Mixed-precision context for forward passes; a no-op in float32."""
    import torch
    if dtype == 'float32':
        return nullcontext()
    ptdtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
    return torch.autocast(device_type=device.split(':')[0], dtype=ptdtype)


def peak_memory(device):
    """This process's peak memory so far, in bytes: the CUDA allocator's peak on a GPU, else
    the peak RSS (Python and torch included)."""
    import torch
    if device.startswith('cuda'):
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)  # KiB on Linux


def sync(device):
    """Wait for queued GPU work, so wall-clock time measures it."""
    import torch
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    elif device.startswith('mps'):
        torch.mps.synchronize()


def timed(fn, device, warmup, repeats):
    """Seconds of each of repeats calls of fn, after warmup untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_flops(device, dtype, n=0, repeats=3):
    """(n, FLOP/s of each of repeats warmed-up n x n matmuls in dtype): the peak that MFU
    divides by, measured rather than looked up so it fits whatever machine this is.
    n = 0: 8192 on CUDA, 2048 elsewhere, or the first size from 256 up whose matmul takes
    over 0.05 s (a CPU without float16 units runs it ~500x slower: 2048 would take minutes)."""
    import torch
    top = n or (8192 if device.startswith('cuda') else 2048)
    n = n or 256
    ptdtype = getattr(torch, dtype)
    # a generator of its own: train.py measures after restoring a checkpoint's RNG state, and a
    # draw from the global stream there would shift every later dropout mask (resume not exact)
    gen = torch.Generator(device=device).manual_seed(0)
    while True:
        a = torch.randn(n, n, device=device, generator=gen).to(ptdtype)
        b = torch.randn(n, n, device=device, generator=gen).to(ptdtype)
        c = torch.empty(n, n, device=device, dtype=ptdtype)
        if n >= top or timed(lambda: torch.mm(a, b, out=c), device, 1, 1)[0] > 0.05:
            break
        n *= 2
    return n, [2 * n ** 3 / t for t in timed(lambda: torch.mm(a, b, out=c), device, 2, repeats)]


def format_eta(seconds):
    """A time left as train.py prints it: 1h05m, or 4m09s under an hour."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
