"""Folding of BatchNorm layers into the convolution that directly precedes them."""

from __future__ import annotations

import logging

import torch
from torch import nn

__all__ = ["find_conv_bn_pairs", "fold_batchnorm", "fold_bn_into_conv", "has_batchnorm", "set_submodule"]

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def set_submodule(net: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, module)


def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` has a BatchNorm layer that :func:`find_conv_bn_pairs` could pair with a convolution (without
    one, folding leaves the network as it is)."""
    return any(isinstance(module, _BNS) for module in net.modules())


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


@torch.no_grad()
def find_conv_bn_pairs(net: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, str]], object]:
    """Pairs ``(conv_name, bn_name)`` where the BatchNorm is the next leaf module called after the conv
    and reads exactly the conv's output tensor, found by running ``net`` on ``example``.

    Args:
        net: the float network, in eval mode.
        example: an input the network accepts.

    Returns:
        ``(pairs, output)``: the pairs and the network's output on ``example``.
    """
    calls: list[tuple[str, nn.Module, int, int]] = []
    hooks = []
    for name, module in net.named_modules():
        if not _is_leaf(module):
            continue

        def hook(mod, inputs, output, name=name):
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            in_ptr = first.data_ptr() if first is not None else -1
            out_ptr = output.data_ptr() if isinstance(output, torch.Tensor) else -2
            calls.append((name, mod, in_ptr, out_ptr))

        hooks.append(module.register_forward_hook(hook))
    try:
        output = net(example)
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for (c_name, c_mod, _, c_out), (b_name, b_mod, b_in, _) in zip(calls, calls[1:]):
        if not (isinstance(c_mod, _CONVS) and isinstance(b_mod, _BNS)) or c_out != b_in:
            continue
        if b_mod.running_mean is None or b_mod.running_var is None:
            logger.warning("%s has no running statistics and cannot be folded into %s.", b_name, c_name)
            continue
        pairs.append((c_name, b_name))
    return pairs, output


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` (eval statistics) into ``conv`` in place, creating a bias if there was none."""
    inv_std = torch.rsqrt(bn.running_var.to(torch.float64) + bn.eps)
    gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std  # one per output channel
    weight = conv.weight.to(torch.float64)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        groups = conv.groups
        c_in, c_out_g = weight.shape[:2]
        w = weight.reshape(groups, c_in // groups, c_out_g, *weight.shape[2:])
        f = factor.reshape(groups, 1, c_out_g, *([1] * (weight.dim() - 2)))
        new_weight = (w * f).reshape(weight.shape)
    else:
        new_weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(factor)
    new_bias = beta + (bias - bn.running_mean.to(torch.float64)) * factor
    conv.weight.copy_(new_weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(new_bias.to(conv.bias.dtype))


def fold_batchnorm(net: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Fold each ``(conv_name, bn_name)`` pair of ``net`` in place; the BatchNorm becomes ``nn.Identity``."""
    for conv_name, bn_name in pairs:
        fold_bn_into_conv(net.get_submodule(conv_name), net.get_submodule(bn_name))
        set_submodule(net, bn_name, nn.Identity())
