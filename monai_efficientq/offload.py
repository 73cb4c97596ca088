"""Activations that wait in a paused forward pass, kept in a temporary file until the pass goes on.

The quantizing pass runs the network one calibration volume at a time (:mod:`~monai_efficientq.volume_pass`) and
pauses each volume's forward at every quantizable layer until all volumes have reached it and the layer is solved.
Meanwhile the tensors a paused forward keeps for later (a residual block's identity, a U-Net's skip connections, the
encoder outputs a decoder adds back) would sit in memory for every volume. :class:`ActivationOffload` follows the
tensors that enter or leave a module of the network (by weak reference: it keeps none alive), and while a volume is
paused writes the storages of its tensors that are still alive to a temporary file and frees them
(``UntypedStorage.resize_(0)``, which every view of a storage follows); before the volume goes on it reads them
back into place, the same bytes. Storages below a size, the network's parameters and buffers, and tensors not on
the CPU stay as they are.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ActivationOffload"]

logger = logging.getLogger(__name__)

#: Storages smaller than this stay in memory (many small tensors cost more in file calls than they save; small runs,
#: e.g. the tests, write no file). Every larger one goes to the file: a budget of 64 MiB kept in memory per volume
#: left the UNet of BENCHMARKS.md §8 at 96³ with its inputs both in the volumes' forwards and joined for the solve,
#: 155 MiB above the batched pass at its peak; without it, 38 MiB (within the run-to-run spread).
MIN_BYTES = 2**20


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``obj`` (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _memory_of(storage: torch.UntypedStorage) -> ctypes.Array:
    """The bytes of a CPU ``storage`` as a writable buffer, without a copy, for ``write`` and ``readinto`` (not through
    numpy: a storage exported to numpy can no longer be resized). Valid while the storage keeps its size."""
    return (ctypes.c_char * storage.nbytes()).from_address(storage.data_ptr())


class ActivationOffload:
    """Tensors of a network's forward pass, by owner, written to a file and freed while their owner is paused.

    Args:
        net: the network whose modules' inputs and outputs are followed (hooks, removed by :meth:`close`).
        min_bytes: storages smaller than this stay in memory (``None``: :data:`MIN_BYTES`).
    """

    def __init__(self, net: nn.Module, min_bytes: int | None = None) -> None:
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.owner: int | None = None  # whose forward is running: the tensors seen now are its
        self.enabled = True
        self.bytes_written = 0
        self._fixed = {t.untyped_storage().data_ptr() for t in (*net.parameters(), *net.buffers())}
        self._seen: dict[int, list[weakref.ref]] = {}
        self._stored: dict[int, tuple[str, list[tuple[torch.UntypedStorage, int]]]] = {}
        self._folder: str | None = None
        self._handles = []
        for module in net.modules():
            self._handles.append(module.register_forward_pre_hook(self._follow_inputs))
            self._handles.append(module.register_forward_hook(self._follow_outputs))

    def _follow_inputs(self, module: nn.Module, args: Any) -> None:
        self._follow(args)

    def _follow_outputs(self, module: nn.Module, args: Any, output: Any) -> None:
        self._follow(output)

    def _follow(self, obj: Any) -> None:
        if self.owner is None:
            return
        refs = self._seen.setdefault(self.owner, [])
        refs.extend(weakref.ref(t) for t in _tensors(obj) if t.device.type == "cpu")

    def _storages(self, owner: int) -> list[torch.UntypedStorage]:
        """The distinct storages of ``owner``'s followed tensors that are alive, large enough and free to move."""
        alive, storages = [], {}
        for ref in self._seen.get(owner, []):
            tensor = ref()
            if tensor is None:
                continue
            alive.append(ref)
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in storages or ptr in self._fixed or storage.nbytes() < self.min_bytes or not storage.resizable():
                continue
            storages[ptr] = storage
        self._seen[owner] = alive
        return list(storages.values())

    def store(self, owner: int) -> int:
        """Write ``owner``'s live storages to a file and free them; returns the bytes freed (0 when it has none, or the
        file could not be written: then they stay in memory, with a warning once)."""
        storages = self._storages(owner) if self.enabled else []
        if not storages:
            return 0
        total = sum(s.nbytes() for s in storages)
        try:
            path = self._write(owner, storages)
        except OSError as err:
            logger.warning(
                "Could not write activations to the temporary folder (%s); they stay in memory from now on. Set "
                "TMPDIR to a folder with free space to keep them in files.", err,
            )
            self.enabled = False
            return 0
        self._stored[owner] = (path, [(s, s.nbytes()) for s in storages])
        for storage in storages:
            storage.resize_(0)
        self.bytes_written += total
        return total

    def _write(self, owner: int, storages: list[torch.UntypedStorage]) -> str:
        if self._folder is None:
            self._folder = tempfile.mkdtemp(prefix="efficientq-activations-")
        path = os.path.join(self._folder, f"{owner}.bin")
        with open(path, "wb") as f:
            for storage in storages:
                f.write(_memory_of(storage))
        return path

    def restore(self, owner: int) -> None:
        """Read ``owner``'s stored storages back into place (nothing to do when none were stored)."""
        if owner not in self._stored:
            return
        path, storages = self._stored.pop(owner)
        with open(path, "rb") as f:
            for storage, nbytes in storages:
                storage.resize_(nbytes)
                if f.readinto(_memory_of(storage)) != nbytes:
                    raise RuntimeError(f"the activation file {path} was cut short while the pass was paused.")
        os.remove(path)

    def close(self) -> None:
        """Remove the hooks and the file folder (storages still stored are restored first)."""
        for owner in list(self._stored):
            self.restore(owner)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def keep(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never move the storages of ``tensors`` (e.g. the calibration batch the volumes are cut from)."""
        self._fixed.update(t.untyped_storage().data_ptr() for t in tensors)
