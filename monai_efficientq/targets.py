"""Where the float targets of a quantizing pass wait for their layer: in memory, or in files.

The pass records every quantizable layer's float output in one forward and then solves the layers in order, each
taking its own target once. In memory all targets are alive together after that forward, which for a 3-D network
on a full-size calibration volume is several times the network's activations. ``target_device="disk"`` writes
each target to a file as it is recorded and reads it back when its layer is solved, so at most one target is in
memory at a time; the files live in a private temporary folder (under ``TMPDIR``) that is removed when the pass
ends, also on error.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

__all__ = ["DISK", "TargetStore"]

DISK = "disk"


class TargetStore:
    """Float layer outputs by layer name, each taken once with :meth:`pop`.

    Args:
        where: ``"disk"`` (files in a temporary folder) or a device for the tensors kept in memory.
        device: where :meth:`pop` returns a target read from disk.
    """

    def __init__(self, where: str | torch.device, device: torch.device) -> None:
        self.on_disk = where == DISK
        self.device = device if self.on_disk else torch.device(where)
        self._tensors: dict[str, torch.Tensor] = {}
        self._files: dict[str, str] = {}
        self._folder = tempfile.mkdtemp(prefix="efficientq-targets-") if self.on_disk else None

    def __contains__(self, name: str) -> bool:
        return name in self._tensors or name in self._files

    def __len__(self) -> int:
        return len(self._tensors) + len(self._files)

    def put(self, name: str, output: torch.Tensor) -> None:
        """Keep a copy of ``output`` (a copy, not a view: in-place operations later in the forward must not change
        it)."""
        if not self.on_disk:
            self._tensors[name] = output.detach().to(self.device, copy=True)
            return
        path = os.path.join(self._folder, f"{len(self._files)}.pt")
        torch.save(output.detach().to("cpu").contiguous(), path)
        self._files[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        """The target of ``name``, kept in the store (read again from its file on disk)."""
        if not self.on_disk:
            return self._tensors[name]
        return torch.load(self._files[name], map_location=self.device, weights_only=True)

    def pop(self, name: str) -> torch.Tensor:
        """The target of ``name``, removed from the store (its file deleted)."""
        if not self.on_disk:
            return self._tensors.pop(name)
        path = self._files.pop(name)
        tensor = torch.load(path, map_location=self.device, weights_only=True)
        os.remove(path)
        return tensor

    def close(self) -> None:
        """Drop every target left and remove the folder."""
        self._tensors.clear()
        self._files.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
