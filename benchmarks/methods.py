"""The methods a comparison can run, behind one protocol, and their registry.

A :class:`Method` quantizes a copy of the float network from the calibration batch at one setting and says what
it did (``quant_seconds``, layer counts, ...); it saves its quantized network in its own format, so the checkpoint
sizes compare what each method would ship. Ours (:mod:`benchmarks.ours`): ``rtn``, ``eq_original``,
``eq_default``; Brevitas' post-training quantizers (:mod:`benchmarks.brevitas_methods`, optional extra
``pip install -e .[bench]``): ``brevitas_rtn``, ``brevitas_biascorr``, ``brevitas_gptq``, ``brevitas_gpfq``,
``brevitas_learned_round``. ``float`` names the float network itself, evaluated as the reference of every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .brevitas_methods import BREVITAS_METHODS
from .ours import OUR_METHODS
from .plan import FloatPlan

if TYPE_CHECKING:
    from .config import CompareConfig, Setting

__all__ = ["FLOAT", "Calibration", "Method", "METHODS", "check_method_names", "get_method", "method_names", "ready_method"]

FLOAT = "float"


@dataclass
class Calibration:
    """What a method quantizes from.

    Attributes:
        image: the calibration batch ``(N, C, *S)``.
        label: its labels ``(N, 1, *S)`` (for our ``attention="label"``), or ``None``.
        plan: the float network's layers (see :mod:`benchmarks.plan`), with BatchNorm folded as the Brevitas rows
            are set up (``brevitas_fold_bn``).
    """

    image: torch.Tensor
    label: torch.Tensor | None
    plan: FloatPlan


class Method(Protocol):
    """One quantization method of the comparison.

    Attributes:
        name: the name given to ``--methods`` and shown in the tables.
        checkpoint_kind: how :meth:`save` writes the quantized network.
    """

    name: str
    checkpoint_kind: str

    def missing_requirement(self) -> str | None:
        """``None`` when the method can run here (importing what it needs), else why it cannot."""

    def quantize(
        self, net: nn.Module, calib: Calibration, setting: Setting, cfg: CompareConfig
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Quantize a copy of ``net`` (which stays unchanged) at ``setting``.

        Returns:
            ``(quantized network, info)``; ``info`` holds at least ``quant_seconds`` (the quantization alone),
            ``layers_total``, ``layers_optimised`` and ``layers_not_optimised``.
        """

    def save(self, qnet: nn.Module, path: str) -> None:
        """Write the quantized network to ``path`` as the method ships it."""


METHODS: dict[str, Method] = {m.name: m for m in (*OUR_METHODS, *BREVITAS_METHODS)}


def method_names() -> list[str]:
    """Every name ``--methods`` accepts: ``float`` and the registered methods."""
    return [FLOAT, *METHODS]


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        ValueError: no such method; the message lists the valid names.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())}")
    return METHODS[name]


def ready_method(name: str) -> Method:
    """The registered method called ``name``, with what it needs imported.

    Raises:
        ValueError: no such method.
        RuntimeError: it cannot run here (e.g. Brevitas is not installed); the message says why.
    """
    method = get_method(name)
    missing = method.missing_requirement()
    if missing:
        raise RuntimeError(missing)
    return method


def check_method_names(names: list[str] | None) -> list[str]:
    """``names`` (``None``: every name), each checked to be ``float`` or a registered method."""
    if names is None:
        return method_names()
    for name in names:
        if name != FLOAT:
            get_method(name)
    return list(names)
