"""The quantizing forward run one calibration volume at a time, the volumes meeting at every quantizable layer.

Each layer is solved on the statistics of all calibration volumes (the given ones and their augmented copies), and
each volume's input to a layer comes through the already-quantized layers before it, so the volumes must reach a
layer together. A batched forward does that, but keeps every activation of the network (skip connections, residual
identities, the output of every norm and activation) for all volumes at once: with the default two augmented copies
three volumes' worth, more than twice a float forward on the one volume. :class:`VolumeByVolume` runs one forward per
volume, each in its own thread, and lets one of them run at a time: a volume's forward pauses at each quantizable
layer, hands its input over and waits; when all have arrived, the layer is solved on their inputs joined into one
batch (the same batch a batched forward would give it), and each volume goes on with its own part of the output.
While a volume waits, the activations it keeps are written to a temporary file and freed
(:class:`~monai_efficientq.offload.ActivationOffload`). The threads never run torch operations at the same time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .offload import ActivationOffload

__all__ = ["VolumeByVolume", "VolumesDivergedError"]


class VolumesDivergedError(RuntimeError):
    """The calibration volumes took different paths through the network (data-dependent control flow)."""


class _Abort(BaseException):
    """Raised inside a paused volume's forward to unwind it when the pass stops early."""


#: Solves a layer for the joined input of all volumes and returns each volume's output: ``solve(name, layer, x)``.
Solve = Callable[[str, nn.Module, torch.Tensor], list[torch.Tensor]]


class VolumeByVolume:
    """One forward of ``net`` per calibration volume, meeting at the layers that :meth:`meet` is called from.

    Args:
        net: the network, its quantizable layers replaced by modules that call :meth:`meet` with their input.
        solve: what happens when all volumes have reached a layer.
        offload: keeps the activations of the waiting volumes in a file (``None``: in memory).
    """

    def __init__(self, net: nn.Module, solve: Solve, offload: ActivationOffload | None = None) -> None:
        self.net = net
        self.solve = solve
        self.offload = offload
        self._local = threading.local()
        self._to_main: queue.Queue = queue.Queue()
        self._to_volume: list[queue.Queue] = []
        self._running: int | None = None  # the volume whose forward runs now

    def meet(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Called by a volume's forward at layer ``name`` with its input: waits for the layer to be solved and returns
        this volume's part of its output (outside :meth:`run`, as a batch of its own)."""
        volume = getattr(self._local, "volume", None)
        if volume is None:
            return self.solve(name, layer, x)[0]
        self._to_main.put((volume, "layer", (name, layer, x)))
        del x
        reply = self._to_volume[volume].get()
        if reply is _Abort:
            raise _Abort
        return reply

    def _work(self, volume: int, x: torch.Tensor) -> None:
        self._local.volume = volume
        if self._to_volume[volume].get() is _Abort:
            self._to_main.put((volume, "stopped", None))
            return
        try:
            with torch.no_grad():
                out = self.net(x)
        except _Abort:
            self._to_main.put((volume, "stopped", None))
        except BaseException as err:  # handed to the main thread, which raises it
            self._to_main.put((volume, "error", err))
        else:
            self._to_main.put((volume, "done", out))

    def run(self, x: torch.Tensor, volumes: int) -> list[Any]:
        """The network's outputs on each of the ``volumes`` equal parts of the batch ``x``, volume by volume."""
        rows = x.shape[0] // volumes
        if self.offload is not None:
            self.offload.keep([x])  # the volumes' first inputs are views of the batch: it stays
        self._to_volume = [queue.Queue() for _ in range(volumes)]
        threads = [
            threading.Thread(target=self._work, args=(v, x[v * rows : (v + 1) * rows]), daemon=True,
                             name=f"efficientq-volume-{v}")
            for v in range(volumes)
        ]
        for thread in threads:
            thread.start()
        waiting = set(range(volumes))  # threads waiting for a reply (or to start)
        try:
            return self._meetings(volumes, waiting)
        finally:
            self._stop(waiting)
            for thread in threads:
                thread.join()

    def _meetings(self, volumes: int, waiting: set[int]) -> list[Any]:
        replies: list[Any] = [None] * volumes
        outputs: list[Any] = [None] * volumes
        while True:
            arrived: list[tuple[str, nn.Module]] = []
            joined: torch.Tensor | None = None
            for volume in range(volumes):
                reply, replies[volume] = replies[volume], None
                kind, payload = self._resume(volume, reply, waiting)
                del reply
                if kind == "done":
                    outputs[volume] = payload
                    continue
                name, layer, x_part = payload
                if joined is None:
                    joined = x_part.new_empty((x_part.shape[0] * volumes, *x_part.shape[1:]))
                rows = x_part.shape[0]
                if x_part.shape[1:] != joined.shape[1:] or rows * volumes != joined.shape[0]:
                    raise VolumesDivergedError(f"the calibration volumes reached layer '{name}' with inputs of "
                                               f"different shapes ({tuple(x_part.shape)} against {tuple(joined.shape)}).")
                joined[volume * rows : (volume + 1) * rows] = x_part
                del x_part, payload
                arrived.append((name, layer))
                if self.offload is not None:
                    self.offload.store(volume)
            if not arrived:
                return outputs
            names = {name for name, _ in arrived}
            if len(arrived) != volumes or len(names) != 1:
                raise VolumesDivergedError(
                    f"the calibration volumes took a different path through the network (layers {sorted(names)}, "
                    f"{volumes - len(arrived)} volume(s) finished): data-dependent control flow. Quantize on one "
                    f"volume (calib_augment=0, holdout=False), or on a GPU, where the volumes run as one batch."
                )
            name, layer = arrived[0]
            parts = self.solve(name, layer, joined)
            del joined
            replies = list(parts)
            del parts

    def _resume(self, volume: int, reply: Any, waiting: set[int]) -> tuple[str, Any]:
        """Let ``volume`` go on (with ``reply`` as its layer's output) until it reaches a layer or ends."""
        if self.offload is not None:
            self.offload.restore(volume)
            self.offload.owner = volume
        waiting.discard(volume)
        self._running = volume
        self._to_volume[volume].put(reply)
        del reply
        sender, kind, payload = self._to_main.get()
        self._running = None
        if self.offload is not None:
            self.offload.owner = None
        if kind == "layer":
            waiting.add(sender)
        if kind == "error":
            raise payload
        return kind, payload

    def _stop(self, waiting: set[int]) -> None:
        """Unwind every volume still waiting (after an error, an interrupt, or volumes that took different paths);
        a volume interrupted while running is first let reach its next layer."""
        if self._running is not None:
            sender, kind, _ = self._to_main.get()
            self._running = None
            if kind == "layer":
                waiting.add(sender)
        if self.offload is not None:
            self.offload.owner = None
        for volume in sorted(waiting):
            if self.offload is not None:
                self.offload.restore(volume)
            self._to_volume[volume].put(_Abort)
            self._to_main.get()
        waiting.clear()
