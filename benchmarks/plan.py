"""What every compared method shares about the float network on the calibration batch.

The BatchNorm pairs, the quantizable layers in execution order, the first and last layers by data flow (8-bit
weights and a float input for every method, as the paper keeps them) and the sign of each layer's float input (an
unsigned or a shifted activation quantizer for Brevitas, as our ``act_mode="auto"``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from monai_efficientq.dataflow import edge_layers
from monai_efficientq.folding import find_conv_bn_pairs, fold_batchnorm
from monai_efficientq.network import quantizable_layers

__all__ = ["FloatPlan", "float_plan"]


@dataclass
class FloatPlan:
    """The float network's layers as every method quantizes them.

    Attributes:
        order: quantizable layers in the order the forward pass first calls them.
        edges: the first and last layers by data flow.
        bn_pairs: ``[conv, batchnorm]`` pairs found (folded before the layers were listed when ``fold_bn``).
        signed_input: per layer, whether its float input on the calibration batch has negative values.
        types: per quantizable layer, its class name.
        unreached: quantizable layers the forward pass does not call.
    """

    order: list[str] = field(default_factory=list)
    edges: list[str] = field(default_factory=list)
    bn_pairs: list[list[str]] = field(default_factory=list)
    signed_input: dict[str, bool] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    unreached: list[str] = field(default_factory=list)


def _input_signs(net: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor) -> dict[str, bool]:
    """Per layer called in ``net(x)``, in call order: whether its first input has negative values."""
    signed: dict[str, bool] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if name not in signed:
                signed[name] = bool((inputs[0] < 0).any())

        return hook

    hooks = [module.register_forward_hook(hook_for(name)) for name, module in layers.items()]
    try:
        net(x)
    finally:
        for handle in hooks:
            handle.remove()
    return signed


@torch.no_grad()
def float_plan(net: nn.Module, x: torch.Tensor, fold_bn: bool = True) -> FloatPlan:
    """The :class:`FloatPlan` of ``net`` on the calibration batch ``x``; ``net`` is not changed.

    Args:
        net: the float network.
        x: the calibration batch ``(N, C, *S)``.
        fold_bn: fold the BatchNorm pairs into the convolutions before listing the layers.
    """
    work = copy.deepcopy(net).eval()
    pairs, _ = find_conv_bn_pairs(work, x)
    if fold_bn and pairs:
        fold_batchnorm(work, pairs)
    layers = quantizable_layers(work)
    signed = _input_signs(work, layers, x)
    order = list(signed)
    first, last = edge_layers(work, x, {name: layers[name] for name in order})
    return FloatPlan(
        order=order,
        edges=first + [name for name in last if name not in first],
        bn_pairs=[list(pair) for pair in pairs],
        signed_input=signed,
        types={name: type(module).__name__ for name, module in layers.items()},
        unreached=[name for name in layers if name not in signed],
    )
