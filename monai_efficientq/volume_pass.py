"""The quantizing forward run one calibration volume at a time, the volumes meeting at every quantizable layer.

Each layer is solved on the statistics of all calibration volumes (the given ones and their augmented copies), and
each volume's input to a layer comes through the already-quantized layers before it, so the volumes must reach a
layer together. A batched forward does that, but keeps every activation of the network (skip connections, residual
identities, the output of every norm and activation) for all volumes at once: with the default two augmented copies
three volumes' worth, more than twice a float forward on the one volume. :class:`VolumeByVolume` runs one forward per
volume, each in its own greenlet (a coroutine with its own stack, on the caller's thread: the allocator sees one
thread, and no two forwards ever run at the same time). A volume's forward pauses at each quantizable layer and
hands its input over; when all volumes have arrived, the layer is solved on their inputs joined into one batch, and
each volume goes on with its own part of the output. While a volume waits, the activations it keeps are written to a
temporary file and freed (:class:`~monai_efficientq.offload.ActivationOffload`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import greenlet
import torch
from torch import nn

from .offload import ActivationOffload

__all__ = ["VolumeByVolume", "VolumesDivergedError"]


class VolumesDivergedError(RuntimeError):
    """The calibration volumes took different paths through the network (data-dependent control flow)."""


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
        self._main: greenlet.greenlet | None = None

    def meet(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Called by a volume's forward (inside :meth:`run`) at layer ``name`` with its input: waits for the layer to be
        solved and returns this volume's part of its output."""
        return self._main.switch((name, layer, x))

    def run(self, x: torch.Tensor, volumes: int) -> list[Any]:
        """The network's outputs on each of the ``volumes`` equal parts of the batch ``x``, volume by volume."""
        if self.offload is not None:
            self.offload.keep([x])  # the volumes' first inputs are views of the batch: it stays
        self._main = greenlet.getcurrent()
        forwards = [greenlet.greenlet(lambda part=part: self.net(part)) for part in x.split(x.shape[0] // volumes)]
        try:
            with torch.no_grad():
                return self._meetings(forwards)
        finally:
            self._stop(forwards)

    def _meetings(self, forwards: list[greenlet.greenlet]) -> list[Any]:
        volumes = len(forwards)
        replies: list[Any] = [None] * volumes
        outputs: list[Any] = [None] * volumes
        while True:
            arrived: list[tuple[str, nn.Module]] = []
            joined: torch.Tensor | None = None
            for volume, forward in enumerate(forwards):
                if forward.dead:
                    continue
                reply, replies[volume] = replies[volume], None
                payload = self._resume(volume, forward, reply)
                del reply
                if forward.dead:
                    outputs[volume] = payload
                    continue
                name, layer, x_part = payload
                del payload
                if joined is None:
                    joined = x_part.new_empty((x_part.shape[0] * volumes, *x_part.shape[1:]))
                rows = x_part.shape[0]
                if x_part.shape[1:] != joined.shape[1:] or rows * volumes != joined.shape[0]:
                    raise VolumesDivergedError(
                        f"the calibration volumes reached layer '{name}' with inputs of different shapes "
                        f"({tuple(x_part.shape)} against {tuple(joined.shape)})."
                    )
                joined[volume * rows : (volume + 1) * rows] = x_part
                del x_part
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

    def _resume(self, volume: int, forward: greenlet.greenlet, reply: Any) -> Any:
        """Let ``volume``'s forward go on (with ``reply`` as its layer's output) until it reaches a layer (returns
        what :meth:`meet` hands over) or ends (returns the network's output)."""
        if self.offload is not None:
            self.offload.restore(volume)
            self.offload.owner = volume
        try:
            return forward.switch(reply) if forward else forward.switch()
        finally:
            if self.offload is not None:
                self.offload.owner = None

    def _stop(self, forwards: list[greenlet.greenlet]) -> None:
        """Unwind every volume still paused (after an error, an interrupt, or volumes that took different paths)."""
        for volume, forward in enumerate(forwards):
            if forward and not forward.dead:  # started and paused at a layer
                if self.offload is not None:
                    self.offload.restore(volume)
                forward.throw(greenlet.GreenletExit)
