"""Quantized layers: they hold integer codes and scales, and a cached dequantized float weight for fast inference.

Each quantized layer is a subclass of the float layer it replaces (``QuantizedConv3d`` is an
``nn.Conv3d``), so its ``weight``/``bias`` keys, hyper-parameters and ``isinstance`` checks stay the same.
Its input passes through ``input_quant`` first (an :class:`~monai_efficientq.quantizer.ActQuantizer`, or
``nn.Identity`` for a float input). The forward is plain torch and TorchScript-compatible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import matrix_to_weight
from .quantizer import ActQuantizer, UniformGrid, dequantize

__all__ = [
    "QuantizedMixin",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedConv3d",
    "QuantizedConvTranspose1d",
    "QuantizedConvTranspose2d",
    "QuantizedConvTranspose3d",
    "QuantizedLinear",
    "quantized_class_for",
    "build_quantized",
    "QuantizedNetInfo",
    "quantization_info",
    "set_quantization_info",
]

_INFO_ATTRIBUTE = "efficientq_quantization"


@dataclass
class QuantizedNetInfo:
    """What a quantized network carries besides its layers, for saving and exporting it.

    Attributes:
        folded_batchnorm: the ``[conv, batchnorm]`` name pairs folded before quantizing (the BatchNorms are
            ``nn.Identity`` in the quantized network; a dequantized export gives them identity statistics).
        config: the settings it was quantized with (``EfficientQConfig.to_dict()``).
    """

    folded_batchnorm: list[list[str]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def quantization_info(net: nn.Module) -> QuantizedNetInfo | None:
    """The :class:`QuantizedNetInfo` of a network quantized by this package, or ``None`` for a float network."""
    info = getattr(net, _INFO_ATTRIBUTE, None)
    return info if isinstance(info, QuantizedNetInfo) else None


def set_quantization_info(net: nn.Module, info: QuantizedNetInfo) -> None:
    """Attach ``info`` to ``net`` (done by the quantizing and loading functions)."""
    setattr(net, _INFO_ATTRIBUTE, info)


class QuantizedMixin:
    """Quantization state shared by all quantized layers.

    Attributes:
        weight_bits: bits of the weight codes.
        weight_grid: grid kind (``"nozero"`` or ``"int"``).
        per_channel: whether ``weight_scale`` has one entry per output channel.
        weight_codes: int codes (uint8) in equivalent-convolution layout ``(groups, C_out/groups, K)``.
        weight_scale: scales ``(rows, 1)`` (float32).
    """

    def _init_quant(self, bits: int, grid: str, per_channel: bool, act_quant: ActQuantizer | None) -> None:
        self.weight_bits = int(bits)
        self.weight_grid = str(grid)
        self.per_channel = bool(per_channel)
        self.input_quant = act_quant if act_quant is not None else nn.Identity()

    def set_quantized_weight(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Store codes and scale and refresh the cached dequantized weight.

        Args:
            codes: integer codes in equivalent-convolution layout ``(groups, C_out/groups, K)``.
            scale: ``(rows, 1)`` scales, one row (per tensor) or one per output channel.
        """
        grid = UniformGrid(self.weight_bits, self.weight_grid)
        rows = codes.reshape(-1, codes.shape[-1])
        scale = scale.reshape(-1, 1).to(torch.float32)
        row_scale = scale.expand(rows.shape[0], 1) if scale.shape[0] == 1 else scale
        mat = dequantize(rows, row_scale.to(torch.float64), grid, torch.float64).reshape(codes.shape)
        weight = matrix_to_weight(self, mat).to(self.weight.dtype)
        self.register_buffer("weight_codes", codes.to(torch.uint8).clone(), persistent=False)
        self.register_buffer("weight_scale", scale.clone(), persistent=False)
        with torch.no_grad():
            self.weight.copy_(weight)
        self.weight.requires_grad_(False)

    @property
    def act_quant(self) -> ActQuantizer | None:
        return self.input_quant if isinstance(self.input_quant, ActQuantizer) else None

    def quant_extra_repr(self) -> str:
        act = self.act_quant
        act_txt = f"A{act.bits}{'s' if act.signed else 'u'}" if act is not None else "A-float"
        return f"W{self.weight_bits}({self.weight_grid}, {'channel' if self.per_channel else 'tensor'}), {act_txt}"


def _conv_args(m: nn.Module) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
        "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
        "bias": m.bias is not None, "padding_mode": m.padding_mode,
    }


class QuantizedConv1d(QuantizedMixin, nn.Conv1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return nn.Conv1d.extra_repr(self) + ", " + self.quant_extra_repr()


class QuantizedConv2d(QuantizedMixin, nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + ", " + self.quant_extra_repr()


class QuantizedConv3d(QuantizedMixin, nn.Conv3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quant(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return nn.Conv3d.extra_repr(self) + ", " + self.quant_extra_repr()


class QuantizedConvTranspose1d(QuantizedMixin, nn.ConvTranspose1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(
            self.input_quant(x), self.weight, self.bias, self.stride, self.padding, self.output_padding,
            self.groups, self.dilation,
        )

    def extra_repr(self) -> str:
        return nn.ConvTranspose1d.extra_repr(self) + ", " + self.quant_extra_repr()


class QuantizedConvTranspose2d(QuantizedMixin, nn.ConvTranspose2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(
            self.input_quant(x), self.weight, self.bias, self.stride, self.padding, self.output_padding,
            self.groups, self.dilation,
        )

    def extra_repr(self) -> str:
        return nn.ConvTranspose2d.extra_repr(self) + ", " + self.quant_extra_repr()


class QuantizedConvTranspose3d(QuantizedMixin, nn.ConvTranspose3d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose3d(
            self.input_quant(x), self.weight, self.bias, self.stride, self.padding, self.output_padding,
            self.groups, self.dilation,
        )

    def extra_repr(self) -> str:
        return nn.ConvTranspose3d.extra_repr(self) + ", " + self.quant_extra_repr()


class QuantizedLinear(QuantizedMixin, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quant(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self.quant_extra_repr()


_CLASS_FOR: dict[type, type] = {
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
    nn.Conv3d: QuantizedConv3d,
    nn.ConvTranspose1d: QuantizedConvTranspose1d,
    nn.ConvTranspose2d: QuantizedConvTranspose2d,
    nn.ConvTranspose3d: QuantizedConvTranspose3d,
    nn.Linear: QuantizedLinear,
}
_BY_NAME = {t.__name__: t for t in _CLASS_FOR}


def quantized_class_for(layer_type: type | str) -> type:
    """The quantized class replacing a float layer type (or its name, e.g. ``"Conv3d"``)."""
    key = _BY_NAME.get(layer_type) if isinstance(layer_type, str) else layer_type
    if key is None or key not in _CLASS_FOR:
        for base in _CLASS_FOR:
            if isinstance(layer_type, type) and issubclass(layer_type, base):
                return _CLASS_FOR[base]
        raise TypeError(f"No quantized version of layer type {layer_type!r}; supported: {', '.join(_BY_NAME)}.")
    return _CLASS_FOR[key]


def float_type_name(module: nn.Module) -> str:
    """Name of the float layer type of ``module`` (``"Conv3d"`` for a ``QuantizedConv3d`` too)."""
    for base in _CLASS_FOR:
        if isinstance(module, base):
            return base.__name__
    return type(module).__name__


def build_quantized(
    module: nn.Module,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    grid: str,
    per_channel: bool,
    act_quant: ActQuantizer | None,
) -> nn.Module:
    """A quantized copy of the float layer ``module`` with the given codes, scale, bias and input quantizer.

    Args:
        module: the float layer (only its type and hyper-parameters are used).
        codes: integer codes ``(groups, C_out/groups, K)``.
        scale: ``(rows, 1)`` scales.
        bias: float bias ``(C_out,)`` or ``None``.
        bits: weight bits.
        grid: weight grid kind.
        per_channel: per-channel scales.
        act_quant: fitted input quantizer, or ``None`` for a float input.
    """
    cls = quantized_class_for(type(module))
    if isinstance(module, nn.Linear):
        q = cls(module.in_features, module.out_features, bias=bias is not None)
    else:
        args = _conv_args(module)
        args["bias"] = bias is not None
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            args["output_padding"] = module.output_padding
            args.pop("padding_mode")
        q = cls(**args)
    ref = module.weight
    q = q.to(device=ref.device, dtype=ref.dtype)
    q._init_quant(bits, grid, per_channel, act_quant)
    q.set_quantized_weight(codes.to(ref.device), scale.to(ref.device))
    if bias is not None:
        with torch.no_grad():
            q.bias.copy_(bias.reshape(-1).to(q.bias.dtype))
        q.bias.requires_grad_(False)
    if act_quant is not None:
        q.input_quant.to(ref.device)
    q.eval()
    return q

