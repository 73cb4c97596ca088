"""Time, peak memory and a fresh process per measurement.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` since :func:`reset_peak`; on CPU the process's peak resident
set size, which only grows: for a peak of one step alone, run it with :func:`run_in_fresh_process`.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from monai_efficientq.timing import peak_memory

__all__ = ["Stopwatch", "free_memory", "peak_memory_mb", "reset_peak", "rss_now_mb", "run_in_fresh_process", "synchronize"]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new CUDA peak (after the queued work); on CPU the process peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached CUDA memory back, so the next measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated MiB since :func:`reset_peak` on a GPU, else the process's peak RSS in MiB."""
    return peak_memory(device)[0]


def rss_now_mb() -> float:
    """The process's resident set size now, in MiB (``nan`` where ``/proc`` is not available)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Stopwatch:
    """Wall-clock seconds of a ``with`` block, after the device's queued work has finished.

    Args:
        device: the device whose work is waited for at the end of the block.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def run_in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new (``spawn``) Python process, so that process's peak RSS is ``fn``'s own.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function).

    Args:
        fn: the function to call.
        args: its arguments.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
