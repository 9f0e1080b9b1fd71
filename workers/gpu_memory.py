"""A model actor's GPU memory: wait, at start, until its GPUs have room for its share, and
cap a transformers actor to that share.

Ray's fractional GPUs are bookkeeping only. The executor ends an actor (ray.kill) and may
start the next one on the same GPU in the same step, while the ended actor's memory (and
vLLM's worker processes) may not be gone yet; a vLLM engine sizes its KV cache from the
device's free memory while it starts, and trips an assertion when a neighbour frees
memory in that window. So an actor placed on GPUs first waits, with a bound, until each
of them has its share free, and otherwise fails in one line naming the GPU and the numbers.
"""
from __future__ import annotations

import time
from typing import Callable

WAIT_S = 120.0     # how long a starting actor waits for a released one's memory
POLL_S = 0.5
SHARE_SLACK = 0.9  # of an actor's share that must be free when it starts


class GPUMemoryError(RuntimeError):
    """A GPU without room for an actor's share, in one line."""


def cuda_free_memory(device: int) -> tuple[int, int]:
    """(free, total) bytes of a visible CUDA device: the query the wait uses."""
    import torch
    return torch.cuda.mem_get_info(device)


def wait_for_free_memory(devices: list[int], need_bytes: float, *, timeout_s: float = WAIT_S,
                         poll_s: float = POLL_S, query: Callable[[int], tuple[int, int]] = cuda_free_memory) -> None:
    """Returns once every device has need_bytes free (by `query`); a GPUMemoryError after
    timeout_s otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        short = [(d, *query(d)) for d in devices]
        short = [(d, free, total) for d, free, total in short if free < need_bytes]
        if not short:
            return
        if time.monotonic() >= deadline:
            d, free, total = short[0]
            raise GPUMemoryError(
                f"GPU {d}: {free / 1e9:.1f} GB free of {total / 1e9:.1f} GB after {timeout_s:.0f} s, "
                f"this actor's share needs {need_bytes / 1e9:.1f} GB (a neighbour outside adl's "
                f"accounting, or a released actor that did not exit)")
        time.sleep(poll_s)


def share_bytes(gpu_fraction: float, total_bytes: int) -> float:
    """What an actor holding gpu_fraction of a GPU (a whole one for 1 or more) waits to
    find free on each: SHARE_SLACK of its share, as vLLM asks for gpu_memory_utilization =
    0.9 x the share (jobs/placement.py engine_memory_utilization)."""
    return SHARE_SLACK * min(gpu_fraction, 1.0) * total_bytes


def claim_gpu_share(gpu_fraction: float, *, cap: bool, timeout_s: float = WAIT_S,
                    query: Callable[[int], tuple[int, int]] = cuda_free_memory) -> None:
    """In a model actor that holds GPUs, before its model loads: wait for its share to be
    free on each visible GPU, and with `cap` (transformers actors; vLLM sizes itself by
    gpu_memory_utilization) limit this process's allocations to its share."""
    import torch
    if not torch.cuda.is_available():
        return
    devices = list(range(torch.cuda.device_count()))
    wait_for_free_memory(devices, share_bytes(gpu_fraction, query(devices[0])[1]), timeout_s=timeout_s, query=query)
    if cap and gpu_fraction < 1:
        for d in devices:
            torch.cuda.set_per_process_memory_fraction(gpu_fraction, d)


def release_gpu_memory() -> None:
    """What an actor gives back before it is ended: cached CUDA blocks."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
