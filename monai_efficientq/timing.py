"""Where the time of a quantization run goes: seconds per phase.

A :class:`PhaseTimer` adds wall seconds under named phases (``with timer("gram"): ...``). The network
driver and the layer solver share one, so the report can say how much of a run went into recording the
float targets, the attention map, the Gram accumulation, the scale fits, the ADMM iterations, the activation
ranges and the final error evaluation.
"""

from __future__ import annotations

import math

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["PhaseTimer", "PHASES"]

#: The phases in the order a run meets them, with what each one holds (the report's legend).
PHASES: dict[str, str] = {
    "setup": "checks, copying the network, augmented copies, BatchNorm folding and its float forward (which also "
    "records the targets of a network without BatchNorm)",
    "targets": "forward pass recording every layer's float output (the reconstruction targets); for a network with "
    "BatchNorm, after folding it",
    "attention": "class-balanced attention map from the float prediction (or the label)",
    "edges": "finding the first and last layers by data flow",
    "allocation": "under a size budget: the sensitivity pass (every layer's error at every width) and the choice of "
    "the widths",
    "act_fit": "fitting the activation quantizers' ranges (least squares, then the output-aware range choice) and "
    "quantizing the layer's input with them",
    "gram": "im2col of the quantized inputs and accumulation of the Gram statistics",
    "scale_fit": "round-to-nearest: the least-squares scale fit of the float weights",
    "admm_solve": "ADMM V-steps (one factorization per ρ, then one product per iteration)",
    "admm_project": "ADMM projections onto the grid (warm-started scale fits)",
    "admm_rank": "ranking the ADMM iterates by their output error",
    "errors": "the reported output errors of the chosen weights and of round-to-nearest",
    "forward": "building the quantized layers and passing the quantized output on",
    "finish": "packed size, agreement Dice and the report",
}


class PhaseTimer:
    """Wall seconds accumulated per phase.

    Args:
        device: when a CUDA device, each phase synchronises it at both ends so GPU work is charged to the
            phase that launched it.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._sync = torch.device(device).type == "cuda" if device is not None else False

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase``."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def snapshot(self) -> dict[str, float]:
        """The seconds per phase so far, in :data:`PHASES` order (unknown phases last)."""
        known = [p for p in PHASES if p in self.seconds]
        rest = [p for p in self.seconds if p not in PHASES]
        return {p: self.seconds[p] for p in known + rest}

    def since(self, before: dict[str, float]) -> dict[str, float]:
        """The seconds per phase added since ``before`` (a :meth:`snapshot`), zero phases dropped."""
        now = self.snapshot()
        return {p: s - before.get(p, 0.0) for p, s in now.items() if s - before.get(p, 0.0) > 0}


def peak_memory(device: torch.device) -> tuple[float, str]:
    """The run's peak memory in MiB and what it measures: CUDA's max allocated on a GPU, else the process's peak
    resident set (``nan`` where the platform has no ``resource`` module, e.g. Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    try:
        import resource
    except ImportError:
        return math.nan, "unavailable on this platform"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
