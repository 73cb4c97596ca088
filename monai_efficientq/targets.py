"""Where the float targets of a quantizing pass wait for their layer: in memory, or in files.

The pass records every quantizable layer's float output in one forward and then solves the layers in order, each
taking its own target once. In memory all targets are alive together after that forward, which for a 3-D network
on a full-size calibration volume is several times the network's activations. ``target_device="disk"`` writes
each target to a file as it is recorded and reads it back when its layer is solved, so at most one target is in
memory at a time; the files live in a private temporary folder (under ``TMPDIR``) that is removed when the pass
ends, also on error. The default on the CPU keeps the first :data:`MEMORY_BUDGET` bytes of targets in memory and
writes the later ones to files (all in memory again, with a warning, if a file cannot be written). When the forward
runs one calibration volume at a time, each target arrives in parts, kept (and written) separately and joined when
its layer takes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile

import torch

__all__ = ["DISK", "MEMORY_BUDGET", "TargetStore"]

DISK = "disk"

#: Bytes of targets that the default store keeps in memory on the CPU; the targets recorded after them wait in files.
#: Small runs (tests, 32³ crops) write no file; at 96³ a single full-resolution target of three volumes is larger, so
#: nearly all go to files, which cost no measurable time (the page cache holds them; BENCHMARKS.md §8) and take the
#: bundle SegResNet's peak from 2.6x to 1.8x a float forward. The layers are solved in the order their targets were
#: recorded, so the ones kept in memory are also the first freed.
MEMORY_BUDGET = 64 * 2**20

logger = logging.getLogger(__name__)


class TargetStore:
    """Float layer outputs by layer name, each taken once with :meth:`pop`.

    A target may be put in parts (one per calibration volume, when the forward runs volume by volume): they are kept
    and written separately and joined along the first dimension when the target is read.

    Args:
        where: ``"disk"`` (files in a temporary folder) or a device for the tensors kept in memory.
        device: where :meth:`pop` returns a target read from disk.
        memory_bytes: with a device as ``where``, keep at most this many bytes of targets there and write the later
            ones to files (``None``: no limit). If a file cannot be written (a full or read-only ``TMPDIR``), that
            target and the later ones stay in memory, with a warning.
    """

    def __init__(self, where: str | torch.device, device: torch.device, memory_bytes: int | None = None) -> None:
        self.on_disk = where == DISK
        self.device = device if self.on_disk else torch.device(where)
        self.memory_bytes = 0 if self.on_disk else memory_bytes
        self._parts: dict[str, list[torch.Tensor | str]] = {}  # tensors in memory, paths of files
        self._folder: str | None = None
        self._in_memory_bytes = 0
        self._written = 0
        if self.on_disk:
            self._folder = tempfile.mkdtemp(prefix="efficientq-targets-")

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def files(self) -> int:
        """How many targets wait in files (a part of them or all)."""
        return sum(any(isinstance(p, str) for p in parts) for parts in self._parts.values())

    def put(self, name: str, output: torch.Tensor) -> None:
        """Keep a copy of ``output`` (a copy, not a view: in-place operations later in the forward must not change
        it); a second ``put`` of the same name adds the next part of its target."""
        size = output.numel() * output.element_size()
        parts = self._parts.setdefault(name, [])
        if self.memory_bytes is not None and self._in_memory_bytes + size > self.memory_bytes:
            path = self._write(output)
            if path is not None:
                parts.append(path)
                return
        parts.append(output.detach().to(self.device, copy=True))
        self._in_memory_bytes += size

    def _write(self, output: torch.Tensor) -> str | None:
        """Write ``output`` to a new file of the store's folder; ``None`` (and no more files) if that fails, unless
        every target must go to disk (``target_device="disk"``: the error is raised)."""
        try:
            if self._folder is None:
                self._folder = tempfile.mkdtemp(prefix="efficientq-targets-")
            path = os.path.join(self._folder, f"{self._written}.pt")
            torch.save(output.detach().to("cpu").contiguous(), path)
        except OSError as err:
            if self.on_disk:
                raise
            logger.warning(
                "Could not write a float target to the temporary folder (%s); the remaining targets stay in memory. "
                "Set TMPDIR to a folder with free space to keep them in files.", err,
            )
            self.memory_bytes = None
            return None
        self._written += 1
        return path

    def _read(self, part: torch.Tensor | str) -> torch.Tensor:
        if isinstance(part, str):
            return torch.load(part, map_location=self.device, weights_only=True)
        return part

    def _joined(self, parts: list[torch.Tensor | str]) -> torch.Tensor:
        """The parts of a target joined along the first dimension, read one at a time into the joined tensor."""
        if len(parts) == 1:
            return self._read(parts[0])
        first = self._read(parts[0])
        joined = first.new_empty((first.shape[0] * len(parts), *first.shape[1:]))
        rows = first.shape[0]
        joined[:rows] = first
        del first
        for i, part in enumerate(parts[1:], start=1):
            joined[i * rows : (i + 1) * rows] = self._read(part)
        return joined

    def __getitem__(self, name: str) -> torch.Tensor:
        """The target of ``name``, kept in the store (read again from its files on disk)."""
        return self._joined(self._parts[name])

    def pop(self, name: str) -> torch.Tensor:
        """The target of ``name``, removed from the store (its files deleted)."""
        parts = self._parts.pop(name)
        joined = self._joined(parts)
        for part in parts:
            if isinstance(part, str):
                os.remove(part)
            else:
                self._in_memory_bytes -= part.numel() * part.element_size()
        return joined

    def close(self) -> None:
        """Drop every target left and remove the folder."""
        self._parts.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
