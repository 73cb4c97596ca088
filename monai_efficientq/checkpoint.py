"""The packed checkpoint: bit-packed codes, scales and float biases in a plain dict that
``torch.load(..., weights_only=True)`` reads, and the dequantized float export.

Layout (``format_version`` 2)::

    {"format": "monai-efficientq", "format_version": 2, "payload_sha256": hex digest,
     "folded_batchnorm": [[conv_name, bn_name], ...],
     "layers": {name: {"type": "Conv3d", "weight_shape": [...], "bits": 2, "grid": "nozero",
                       "per_channel": True, "numel": int, "codes": uint8 (packed), "scale": float32 (rows,),
                       "bias": float32 or None,
                       "act": None or {"bits": 2, "signed": False, "step": float, "offset": float}}},
     "float_state": {every other state-dict entry},
     "config": {...}, "report": {...} or absent}

``payload_sha256`` is the SHA-256 of everything that defines the network (folded BatchNorms, layers, float
state, config; see :func:`payload_digest`), checked on every load, so a file changed after it was written (a
bad copy, a flipped bit) is refused instead of giving slightly different outputs. The report (run times,
memory) is outside it. Version 1 files (no checksum) still load.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import torch
from torch import nn

from .folding import set_submodule
from .modules import (
    QuantizedMixin,
    QuantizedNetInfo,
    build_quantized,
    float_type_name,
    quantization_info,
    set_quantization_info,
)
from .layers import weight_matrix
from .quantizer import ActQuantizer, pack_codes, unpack_codes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointFormatError",
    "atomic_write",
    "packed_state",
    "packed_size",
    "read_packed",
    "payload_digest",
    "save_quantized",
    "load_quantized",
    "load_quantized_",
    "dequantized_state_dict",
    "save_dequantized",
]

logger = logging.getLogger("monai_efficientq")

FORMAT = "monai-efficientq"
FORMAT_VERSION = 2
_PAYLOAD_KEYS = ("folded_batchnorm", "layers", "float_state", "config")


class CheckpointFormatError(ValueError):
    """A file that is not a readable packed checkpoint, or one that does not fit the network."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write a file through a temporary file in the same folder and an atomic rename.

    Args:
        path: destination; its folder is created if missing.
        write: called with the open temporary binary file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _quantized_modules(qnet: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in qnet.named_modules() if isinstance(m, QuantizedMixin)}


def packed_state(qnet: nn.Module, report: Any = None) -> dict[str, Any]:
    """The packed checkpoint dict of a quantized network (see the module docstring)."""
    qmods = _quantized_modules(qnet)
    if not qmods:
        raise ValueError("this network has no quantized layer: run quantize_network first.")
    layers: dict[str, Any] = {}
    skip_keys: set[str] = set()
    for name, m in qmods.items():
        prefix = f"{name}." if name else ""
        skip_keys.update(prefix + k for k in m.state_dict())
        act = m.act_quant
        layers[name] = {
            "type": float_type_name(m),
            "weight_shape": list(m.weight.shape),
            "bits": m.weight_bits,
            "grid": m.weight_grid,
            "per_channel": m.per_channel,
            "numel": m.weight_codes.numel(),
            "codes": pack_codes(m.weight_codes, m.weight_bits),
            "scale": m.weight_scale.reshape(-1).detach().cpu().to(torch.float32).clone(),
            "bias": m.bias.detach().cpu().clone() if m.bias is not None else None,
            "act": None
            if act is None
            else {"bits": act.bits, "signed": act.signed, "step": float(act.step), "offset": float(act.offset)},
        }
    float_state = {k: v.detach().cpu().clone() for k, v in qnet.state_dict().items() if k not in skip_keys}
    info = quantization_info(qnet) or QuantizedNetInfo()
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "folded_batchnorm": [list(p) for p in info.folded_batchnorm],
        "layers": layers,
        "float_state": float_state,
        "config": dict(info.config),
    }
    state["payload_sha256"] = payload_digest(state)
    if report is not None:
        state["report"] = report.reproducible_dict() if hasattr(report, "reproducible_dict") else dict(report)
    _share_storages(state)
    return state


def _share_storages(state: dict[str, Any]) -> None:
    """Make every tensor of ``state`` a view into one storage per dtype, in place.

    ``torch.save`` writes each storage as its own zip record (about 200 bytes of headers and alignment):
    for a small network at 2 bits that is ~10 % of the file. Views of a shared storage are written once
    and load back as ordinary tensors, so readers see the same layout.
    """
    found: list[tuple[dict, Any, torch.Tensor]] = []

    def collect(container: Any) -> None:
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in items:
            if isinstance(value, torch.Tensor):
                found.append((container, key, value))
            elif isinstance(value, (dict, list)):
                collect(value)

    collect(state)
    by_dtype: dict[torch.dtype, list[tuple[dict, Any, torch.Tensor]]] = {}
    for entry in found:
        by_dtype.setdefault(entry[2].dtype, []).append(entry)
    for entries in by_dtype.values():
        if len(entries) < 2:
            continue
        flat = torch.cat([t.reshape(-1) for _, _, t in entries])
        offset = 0
        for container, key, tensor in entries:
            n = tensor.numel()
            container[key] = flat[offset : offset + n].view(tensor.shape)
            offset += n


def packed_size(qnet: nn.Module) -> int:
    """Bytes of the packed checkpoint of ``qnet`` as :func:`save_quantized` writes it (without a report)."""
    buffer = io.BytesIO()
    torch.save(packed_state(qnet), buffer)
    return buffer.tell()


def save_quantized(qnet: nn.Module, path: str | os.PathLike, report: Any = None) -> str:
    """Save the packed checkpoint of ``qnet`` to ``path`` atomically (temp file + rename).

    Args:
        qnet: a network returned by :func:`~monai_efficientq.network.quantize_network` or :func:`load_quantized`.
        path: output file (``.pt``).
        report: optionally a :class:`~monai_efficientq.report.QuantizationReport` stored with it.

    Returns:
        the path written.

    A report of a size-budgeted run (``report.size_budget``, bytes) is stored only if the file still fits the budget
    with it; otherwise the file holds the network alone (logged), as :func:`packed_size` measured it.
    """
    state = packed_state(qnet, report)
    budget = getattr(report, "size_budget", None)
    if budget is None:
        atomic_write(path, lambda f: torch.save(state, f))
        return os.fspath(path)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    if buffer.tell() > budget:
        logger.warning(
            "%s: the report is left out of the packed file, which would be %d bytes with it, over the size budget of "
            "%d bytes; keep the report written beside it (JSON).", os.fspath(path), buffer.tell(), budget,
        )
        buffer = io.BytesIO()
        torch.save(packed_state(qnet), buffer)
    data = buffer.getvalue()
    atomic_write(path, lambda f: f.write(data))
    return os.fspath(path)


def read_packed(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """The checked dict of a packed checkpoint (format, version, layers, float state, config, report).

    Args:
        path: a file written by :func:`save_quantized`.
        map_location: where its tensors are loaded (as in ``torch.load``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"packed checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"{path} is not a readable torch checkpoint (not a torch zip archive). Is the file complete, and was "
            f"it written by monai_efficientq.save_quantized?"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (zipfile.BadZipFile, RuntimeError, EOFError, OSError) as err:
        raise CheckpointFormatError(
            f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err}). Is the file complete, "
            f"and was it written by monai_efficientq.save_quantized?"
        ) from err
    except Exception as err:  # the weights_only unpickler refusing custom classes
        raise CheckpointFormatError(
            f"{path} cannot be loaded with weights_only=True: a packed checkpoint holds only tensors and "
            f"primitives. Re-save it with monai_efficientq.save_quantized."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        hint = ""
        if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
            hint = " It looks like a float state dict: load it with net.load_state_dict, or quantize it first."
        raise CheckpointFormatError(f"{path} is not a monai-efficientq packed checkpoint.{hint}")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path} has format version {version!r}; this monai-efficientq reads up to {FORMAT_VERSION}. "
            f"Upgrade monai-efficientq."
        )
    if version >= 2 and state.get("payload_sha256") != payload_digest(state):
        raise CheckpointFormatError(
            f"{path} is corrupted: its content does not match the checksum written with it (payload_sha256). "
            f"Copy the file again from its source, or quantize the model again."
        )
    return state


def payload_digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of the entries of a packed ``state`` that define the network: each tensor's dtype, shape and
    bytes and every other value's JSON text, in sorted-key order."""
    digest = hashlib.sha256()
    _hash_value({k: state.get(k) for k in _PAYLOAD_KEYS}, digest)
    return digest.hexdigest()


def _hash_value(value: Any, digest: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor:{flat.dtype}:{list(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"dict:{len(value)}:".encode())
        for key in sorted(value, key=str):
            digest.update(f"{key!s}=".encode())
            _hash_value(value[key], digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"list:{len(value)}:".encode())
        for item in value:
            _hash_value(item, digest)
    else:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode())


def load_quantized(net: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild the quantized network from a packed checkpoint and a fresh float network of the same definition.

    Args:
        net: the float network definition (its weights are not used; it is not changed).
        path: a file written by :func:`save_quantized`.
        map_location: device of the loaded tensors.

    Returns:
        the quantized network (eval mode) on ``map_location``.

    Raises:
        CheckpointFormatError: the file is not a packed checkpoint, or it does not fit ``net``
            (missing or unexpected layers, different shapes).
    """
    import copy

    return load_quantized_(copy.deepcopy(net), path, map_location)


def load_quantized_(net: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """:func:`load_quantized` in place: the layers of ``net`` are replaced by the checkpoint's quantized layers,
    so every holder of ``net`` (an engine, a wrapper) runs the quantized network. The checkpoint is checked
    against ``net`` before anything is changed. Returns ``net`` (eval mode, on ``map_location``)."""
    state = read_packed(path, map_location)
    source = os.fspath(path)
    problems = _misfits(net, state)
    if problems:
        raise CheckpointFormatError(
            f"{source} does not fit this network: " + "; ".join(problems) + ". Use the network definition "
            f"(class and arguments) the model was quantized with."
        )
    for _, bn_name in state["folded_batchnorm"]:
        set_submodule(net, bn_name, nn.Identity())
    for name, entry in state["layers"].items():
        set_submodule(net, name, _layer_from_entry(net.get_submodule(name), entry))
    missing, unexpected = net.load_state_dict(state["float_state"], strict=False)
    quantized_keys = {
        (f"{n}." if n else "") + k
        for n, m in net.named_modules()
        if isinstance(m, QuantizedMixin)
        for k in m.state_dict()
    }
    missing = [k for k in missing if k not in quantized_keys]
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{source} does not fit this network: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}. "
            f"Use the network definition (class and arguments) the model was quantized with."
        )
    set_quantization_info(net, QuantizedNetInfo(state["folded_batchnorm"], state.get("config", {})))
    net.eval()
    return net.to(map_location) if map_location is not None else net


def _misfits(net: nn.Module, state: dict[str, Any]) -> list[str]:
    """What in the packed ``state`` does not fit ``net`` (its folded BatchNorms and quantized layers)."""
    problems: list[str] = []
    for _, bn_name in state["folded_batchnorm"]:
        try:
            bn = net.get_submodule(bn_name)
        except AttributeError:
            problems.append(f"folded BatchNorm '{bn_name}' does not exist in {type(net).__name__}")
            continue
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            problems.append(f"'{bn_name}' is a {type(bn).__name__}, the checkpoint expects a BatchNorm there")
    for name, entry in state["layers"].items():
        try:
            module = net.get_submodule(name)
        except AttributeError:
            problems.append(f"layer '{name}' ({entry['type']}) does not exist in {type(net).__name__}")
            continue
        if float_type_name(module) != entry["type"]:
            problems.append(f"layer '{name}' is a {type(module).__name__}, the checkpoint holds a {entry['type']}")
        elif list(module.weight.shape) != list(entry["weight_shape"]):
            problems.append(
                f"layer '{name}' has weight shape {list(module.weight.shape)}, the checkpoint {entry['weight_shape']}"
            )
    return problems


def _layer_from_entry(module: nn.Module, entry: dict[str, Any]) -> nn.Module:
    shape = tuple(weight_matrix(module).shape)
    codes = unpack_codes(entry["codes"].cpu(), entry["bits"], entry["numel"]).reshape(shape)
    act = None
    if entry["act"] is not None:
        spec = entry["act"]
        act = ActQuantizer(spec["bits"], spec["signed"])
        act.step.fill_(spec["step"])
        act.offset.fill_(spec["offset"])
    return build_quantized(
        module, codes, entry["scale"].reshape(-1, 1), entry["bias"], entry["bits"], entry["grid"],
        entry["per_channel"], act,
    )


def dequantized_state_dict(qnet: nn.Module, net: nn.Module) -> dict[str, torch.Tensor]:
    """A float state dict of the quantized weights that the original network definition loads.

    Folded BatchNorms get identity statistics (the folded scale and shift live in the conv weight and bias;
    a bias that folding created goes to the BatchNorm's shift). Activation quantizers cannot be expressed in
    the float network and are left out: this export is weight-only.

    Args:
        qnet: the quantized network.
        net: a network of the original definition (only its keys and shapes are used).
    """
    q_state = qnet.state_dict()
    out: dict[str, torch.Tensor] = {}
    info = quantization_info(qnet)
    pairs = info.folded_batchnorm if info is not None else []
    bn_of = {bn: conv for conv, bn in pairs}
    for key, ref in net.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in bn_of:
            out[key] = _identity_bn_entry(qnet, net, bn_of[module_name], module_name, leaf, ref)
        elif key in q_state:
            out[key] = q_state[key].detach().cpu().clone()
        else:
            raise KeyError(f"'{key}' of the float network has no counterpart in the quantized network.")
    return out


def _identity_bn_entry(qnet: nn.Module, net: nn.Module, conv: str, bn: str, leaf: str, ref: torch.Tensor) -> torch.Tensor:
    eps = net.get_submodule(bn).eps
    conv_had_bias = net.get_submodule(conv).bias is not None
    if leaf == "weight":
        return torch.ones_like(ref)
    if leaf == "bias":
        return torch.zeros_like(ref) if conv_had_bias else qnet.get_submodule(conv).bias.detach().cpu().clone()
    if leaf == "running_mean":
        return torch.zeros_like(ref)
    if leaf == "running_var":
        return torch.full_like(ref, 1.0 - eps)
    return ref.clone()


def save_dequantized(qnet: nn.Module, net: nn.Module, path: str | os.PathLike) -> str:
    """Save :func:`dequantized_state_dict` atomically; the original ``network_def`` loads it."""
    state = dequantized_state_dict(qnet, net)
    atomic_write(path, lambda f: torch.save(state, f))
    return os.fspath(path)
