"""The network driver: :func:`quantize_` (in place) and :func:`quantize_network` (on a copy).

Order of work (as in the paper's Algorithm 1, layer by layer): fold BatchNorm, record float targets, build attention from the float
prediction, then one forward pass in which every quantizable layer, when reached, fits its input quantizer
on the input as it arrives through the already-quantized layers before it, solves its weights and passes its
quantized output on.

On the CPU a calibration batch of several volumes (the volume and its augmented copies) runs through every forward
one volume at a time, which holds one volume's activations instead of all of theirs: the float forwards record each
target in parts, and in the quantizing pass the volumes meet at each layer, which is solved on all their inputs
joined (:mod:`~monai_efficientq.volume_pass`). On a GPU the batch runs as one.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .attention import AttentionMaps, body_at, channel_argmax, label_to_scores
from .checkpoint import packed_size
from .config import EfficientQConfig
from .dataflow import edge_layers, first_tensor
from .folding import find_conv_bn_pairs, fold_batchnorm, has_batchnorm, set_submodule
from .layers import (
    QUANTIZABLE_TYPES,
    input_patches,
    is_quantizable,
    layer_forward,
    matrix_to_weight,
    num_output_voxels,
    output_matrix,
    sampled_output_steps,
    squared_error_sums,
    subsampled_forward,
    weight_matrix,
)
from .mixed import WidthAllocation, allocate_widths, enforce_budget
from .modules import QuantizedMixin, QuantizedNetInfo, build_quantized, quantization_info, set_quantization_info
from .offload import ActivationOffload
from .quantizer import ActQuantizer, UniformGrid
from .report import LayerRecord, QuantizationReport
from .solver import CODE_GRAM_MAX_COLUMNS, LayerSolution, LayerSolver, SolverSettings
from .targets import MEMORY_BUDGET, TargetStore
from .timing import PhaseTimer, peak_memory
from .volume_pass import VolumeByVolume, VolumesDivergedError

__all__ = ["quantize_network", "prepare_calibration", "quantizable_layers", "LayerCalledTwiceError"]

_logger = logging.getLogger("monai_efficientq")

_FLOAT_BY_DESIGN = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.PReLU,
)


class LayerCalledTwiceError(RuntimeError):
    """A quantizable layer was called more than once in one forward pass (shared weights)."""


def quantizable_layers(net: nn.Module, skip: list[str] | None = None) -> dict[str, nn.Module]:
    """Quantizable layers of ``net`` by name (registration order), without those named in ``skip``."""
    skip = set(skip or [])
    return {n: m for n, m in net.named_modules() if is_quantizable(m) and n not in skip}


def _as_tensor(data: Any, what: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        t = data.as_tensor() if hasattr(data, "as_tensor") else data
    elif isinstance(data, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(data))
    else:
        raise TypeError(f"{what} must be a torch.Tensor, MetaTensor or numpy array, got {type(data).__name__}.")
    return t.detach().float()


def prepare_calibration(net: nn.Module, calib_volume: Any) -> torch.Tensor:
    """Check a calibration volume against the network and return it as a float ``(N, C, *S)`` tensor.

    Raises:
        ValueError: wrong number of dimensions or channels, NaN/Inf values, or an all-zero volume.
    """
    x = _as_tensor(calib_volume, "calib_volume")
    first = next((m for m in net.modules() if isinstance(m, QUANTIZABLE_TYPES)), None)
    if first is None:
        raise ValueError(f"{type(net).__name__} has no Conv, ConvTranspose or Linear layer to quantize.")
    if not isinstance(first, nn.Linear):
        spatial = len(first.kernel_size)
        if x.dim() == spatial + 1:
            x = x.unsqueeze(0)
        if x.dim() != spatial + 2:
            raise ValueError(
                f"calibration volume has shape {tuple(x.shape)}, but the network's first layer is a {spatial}D "
                f"convolution: pass a channel-first volume (C, {', '.join('DHW'[-spatial:])}) or a batch "
                f"(N, C, ...)."
            )
        expected = first.in_channels
        if x.shape[1] != expected:
            raise ValueError(
                f"calibration volume has {x.shape[1]} channel(s) but the network's first layer expects "
                f"{expected}: pass a channel-first volume with {expected} channel(s) (e.g. EnsureChannelFirst, "
                f"or stack the modalities the network was trained on)."
            )
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise ValueError(
            f"calibration volume contains {bad} NaN/Inf value(s) of {x.numel()}: clean it (e.g. torch.nan_to_num) or use "
            f"another volume."
        )
    if not bool((x != 0).any()):
        raise ValueError(
            "calibration volume is all zeros (after any normalisation: a constant image normalises to zeros): it "
            "carries no signal to calibrate on; use a real image."
        )
    return x


def _state_bytes(net: nn.Module) -> int:
    return sum(t.numel() * 4 for t in net.state_dict().values() if t.is_floating_point())


class _TargetRecorder:
    """Forward hooks that store each layer's output (:class:`~monai_efficientq.targets.TargetStore`) and the call
    order. Each forward of ``net`` is one calibration volume (or one batch of them): the volumes after the first
    add their part of each target and must call the layers in the same order."""

    def __init__(self, layers: dict[str, nn.Module], targets: TargetStore, net: nn.Module) -> None:
        self.layers = layers
        self.targets = targets
        self.order: list[str] = []
        self.volume = -1  # the forward running: 0 for the first
        self._calls = 0  # layers called in it
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]
        self.handles.append(net.register_forward_pre_hook(self._start))
        self.handles.append(net.register_forward_hook(self._end))

    def _start(self, module: nn.Module, args: Any) -> None:
        self.volume += 1
        self._calls = 0

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.volume > 0 and self._calls != len(self.order):
            raise VolumesDivergedError(
                f"calibration volume {self.volume} took a different path through the network than the first "
                f"({self._calls} quantizable layers called against {len(self.order)}): data-dependent control flow. "
                f"Quantize on one volume (calib_augment=0, holdout=False), or on a GPU, where the volumes run as one "
                f"batch."
            )

    def _hook(self, name: str) -> Callable:
        def hook(module, inputs, output):
            if self.volume <= 0:
                if name in self.targets:
                    raise LayerCalledTwiceError(
                        f"layer '{name}' was called twice in one forward pass (shared weights): EfficientQ solves "
                        f"each layer once for one input. Give each call its own layer, or list '{name}' in "
                        f"skip_layers."
                    )
                self.order.append(name)
            elif self._calls >= len(self.order) or self.order[self._calls] != name:
                first = self.order[self._calls] if self._calls < len(self.order) else "no layer"
                raise VolumesDivergedError(
                    f"calibration volume {self.volume} took a different path through the network than the first "
                    f"(layer '{name}' where the first called '{first}'): data-dependent control flow. Quantize on one "
                    f"volume (calib_augment=0, holdout=False), or on a GPU, where the volumes run as one batch."
                )
            self._calls += 1
            self.targets.put(name, output)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _PendingLayer(nn.Module):
    """Stands in for a float layer during the quantizing pass: solves it when reached."""

    def __init__(self, name: str, layer: nn.Module, run: _QuantizingRun) -> None:
        super().__init__()
        self.name = name
        self.layer = layer
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.run.volume_pass is not None:  # one volume's forward: wait for the others at this layer
            return self.run.volume_pass.meet(self.name, self.layer, x)
        return self.run.quantize_layer(self.name, self.layer, x)


class _QuantizingRun:
    """State of one quantizing pass."""

    def __init__(
        self,
        cfg: EfficientQConfig,
        targets: TargetStore,
        order: list[str],
        attention: AttentionMaps | None,
        device: torch.device,
        log: logging.Logger,
        progress: Any,
        body: torch.Tensor | None = None,
        edges: set[str] | None = None,
        given_volumes: int = 1,
        holdout: bool = False,
        timer: PhaseTimer | None = None,
        volumes: int = 1,
        layer_bits: dict[str, int] | None = None,
    ) -> None:
        self.timer = timer if timer is not None else PhaseTimer(device)
        self.cfg = cfg
        self.layer_bits = layer_bits or {}  # weight widths chosen under a size budget
        self.given_volumes = given_volumes
        self.volumes = volumes  # in the calibration batch: the given ones and their augmented copies
        self.holdout = holdout  # the last volume is held out of the fit
        self.body = body
        self.edges = edges if edges is not None else {order[0], order[-1]}
        self.targets = targets
        self.order = order
        self.attention = attention
        self.device = device
        self.log = log
        self.progress = progress
        self.dtype = getattr(torch, cfg.solver_dtype)
        self.quantized: dict[str, nn.Module] = {}
        self.records: list[LayerRecord] = []
        self.settings = SolverSettings.from_config(cfg)
        self.volume_pass: VolumeByVolume | None = None  # set while the pass runs volume by volume

    def _bits(self, name: str) -> tuple[int, int | None]:
        cfg = self.cfg
        if name in self.edges and cfg.first_last_bits is not None:
            return cfg.first_last_bits, None
        return self.layer_bits.get(name, cfg.weight_bits), cfg.act_bits

    @torch.no_grad()
    def quantize_layer(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Quantize ``layer`` for its input ``x`` (which arrives through the quantized layers before it), put the
        quantized layer in :attr:`quantized`, record it and return its quantized output."""
        return self._quantize(name, layer, x, lambda qlayer: _forward_by_volume(qlayer, x, self.volumes))

    @torch.no_grad()
    def quantize_layer_by_volume(self, name: str, layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`quantize_layer` for the inputs of all volumes joined in ``x``, returning each volume's output."""
        rows = x.shape[0] // self.volumes
        return self._quantize(name, layer, x, lambda qlayer: [qlayer(part) for part in x.split(rows)])

    def _quantize(self, name: str, layer: nn.Module, x: torch.Tensor, forward: Callable) -> Any:
        if name in self.quantized:
            raise LayerCalledTwiceError(f"layer '{name}' was called twice in the quantizing pass (shared weights).")
        t0, before = time.perf_counter(), self.timer.snapshot()
        weight_bits, act_bits = self._bits(name)
        y = self.targets.pop(name)
        self._check_volume_rows(name, y)
        h_map = self._attention_map(layer, y)
        act_quant, xq = self._quantized_input(layer, x, y, h_map, act_bits)
        sol = self._solve_weights(layer, xq, y, h_map, weight_bits, act_quant)
        del xq
        if not math.isnan(sol.error):
            y = None  # no error left to measure on the output: the target is not held through the forward
        with self.timer("forward"):
            q_bias = sol.bias.reshape(-1).to(layer.weight.dtype) if sol.bias is not None else None
            qlayer = build_quantized(
                layer, sol.codes, sol.scale.to(torch.float32), q_bias, weight_bits, self.cfg.weight_grid,
                self.cfg.weight_scale == "channel", act_quant,
            )
            self.quantized[name] = qlayer
            out = forward(qlayer)
        if math.isnan(sol.error):  # measured on the quantized layer's own output: no second forward
            with self.timer("errors"):
                joined = torch.cat(out) if isinstance(out, list) else out
                sol = self._with_output_errors(sol, joined, y, h_map)
                del joined
        del y
        self._record(name, layer, sol, weight_bits, act_quant, act_bits, time.perf_counter() - t0, before)
        return out

    def _rows_per_volume(self, y: torch.Tensor) -> int | None:
        """How many entries of the leading dimension of a layer's output ``y`` (and input) belong to one calibration
        volume: 1 for a batch-first tensor, the number of windows for window-partitioned tokens
        ``(volumes·windows, tokens, C)`` (SwinUNETR's attention); ``None`` when it is no multiple of the volumes."""
        return y.shape[0] // self.volumes if y.shape[0] % self.volumes == 0 else None

    def _check_volume_rows(self, name: str, y: torch.Tensor) -> None:
        """Warn when the calibration volumes cannot be told apart in the output ``y`` of layer ``name``."""
        if self._rows_per_volume(y) is None and (self.holdout or self.cfg.act_fit_volumes == "given"):
            self.log.warning(
                "%s: the leading dimension (%d) of its output is no multiple of the %d calibration volumes, so their "
                "entries cannot be told apart: it is fitted on all of them, none held out.", name, y.shape[0],
                self.volumes,
            )

    def _attention_map(self, layer: nn.Module, y: torch.Tensor) -> torch.Tensor | None:
        """The attention map at the resolution of the layer's output ``y`` (``None``: no attention, or a Linear)."""
        if self.attention is None or isinstance(layer, nn.Linear):
            return None
        with self.timer("attention"):
            return self.attention.for_shape(y.shape[0], y.shape[2:])

    def _quantized_input(
        self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, h_map: torch.Tensor | None, act_bits: int | None
    ) -> tuple[ActQuantizer | None, torch.Tensor]:
        """The layer's input quantizer (``None`` for a float input) and its input as the layer will see it: as int8
        codes where the Gram sums take them (``_stream``; a quarter of the memory of the float copy); ``x`` itself
        for round-to-nearest, which streams nothing."""
        if act_bits is None:
            return None, x
        with self.timer("act_fit"):
            act_quant = self._fit_input_quantizer(layer, x, y, h_map, act_bits)
            if self.cfg.method == "rtn":
                return act_quant, x
            if act_quant.has_int8_codes and self.device.type == "cpu":
                return act_quant, act_quant.codes(x)
            return act_quant, act_quant(x)

    def _fit_input_quantizer(
        self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor, h_map: torch.Tensor | None, act_bits: int
    ) -> ActQuantizer:
        """The layer's input quantizer, its range fitted on the given volumes only or on their copies too."""
        cfg = self.cfg
        rows = self._rows_per_volume(y)
        n = self.given_volumes * rows if cfg.act_fit_volumes == "given" and rows is not None else x.shape[0]
        # a Linear's input need not be channel-first (SwinUNETR's are channel-last or tokens): no body mask for it
        body = self.body[:n] if self.body is not None and not isinstance(layer, nn.Linear) else None
        x_fit = x[:n]
        signed = cfg.act_mode == "auto" and bool((x_fit < 0).any())
        fit_values = _inside_body(x_fit, body) if cfg.act_fit == "output" else x_fit  # "output": body voxels only
        act_quant = ActQuantizer(act_bits, signed=signed).fit(fit_values, cfg.act_fit_samples, cfg.seed).to(x.device)
        del fit_values  # a copy of the body voxels: not kept through the range choice
        if cfg.act_fit == "output":
            h_fit = h_map[:n] if h_map is not None else None
            _choose_act_range(
                act_quant, layer, x_fit, y[:n].to(x.device), h_fit, cfg.act_range_factors, cfg.act_fit_samples
            )
        return act_quant

    def _layer_solver(self, layer: nn.Module, y: torch.Tensor, weight_bits: int) -> LayerSolver:
        """A solver for ``layer``'s weights (in equivalent-convolution layout) and its output ``y``."""
        w_mat = weight_matrix(layer).detach()
        bias = layer.bias.detach().reshape(w_mat.shape[:2]) if layer.bias is not None else None
        num_columns = num_output_voxels(layer, y)
        held_from = self._held_out_from(y, num_columns)
        return LayerSolver(
            w_mat.to(self.device), bias.to(self.device) if bias is not None else None,
            UniformGrid(weight_bits, self.cfg.weight_grid), self.cfg.weight_scale == "channel", self.settings,
            num_columns, self.dtype, self.timer, held_out_columns=num_columns - (held_from or num_columns),
        )

    def _held_out_from(self, y: torch.Tensor, num_columns: int) -> int | None:
        """The first held-out output column of a layer with output ``y`` (``num_columns`` columns, volume by
        volume), or ``None`` when nothing is held out."""
        split = self.holdout and self._rows_per_volume(y) is not None  # columns run volume by volume
        return num_columns - num_columns // self.volumes if split else None

    def _solve_weights(
        self,
        layer: nn.Module,
        xq: torch.Tensor,
        y: torch.Tensor,
        h_map: torch.Tensor | None,
        weight_bits: int,
        act_quant: ActQuantizer | None = None,
    ) -> LayerSolution:
        """Round-to-nearest, or EfficientQ on the statistics streamed from ``xq`` (quantized by ``act_quant``, or
        float when ``None``; int8 codes as :meth:`_quantized_input` gives them) and ``y``, with every error the report
        gives."""
        solver = self._layer_solver(layer, y, weight_bits)
        if self.cfg.method == "rtn":
            return self._round_to_nearest(solver)
        with self.timer("gram"):  # im2col chunks (int8 codes of a quantized input, else float); the solver sums products
            h = h_map.reshape(-1).to(self.device) if h_map is not None else None
            self._stream(solver, layer, xq, y, h, act_quant)
        sol = solver.solve(attention_mean=float(h.mean()) if h is not None else 1.0)
        if math.isnan(sol.rtn_error):  # round-to-nearest's unweighted error, by a direct forward of the layer
            with self.timer("errors"):
                fit = self._fitted_rows(y)
                x_fit = xq[fit] if xq.is_floating_point() else xq[fit].float() * act_quant.step  # codes: exact
                rtn_error = _relative_errors(layer, x_fit, sol.rtn_weight, layer.bias, y[fit].to(self.device))[0]
                sol = dataclasses.replace(sol, rtn_error=rtn_error)
        return sol

    def _stream(
        self,
        solver: LayerSolver,
        layer: nn.Module,
        xq: torch.Tensor,
        y: torch.Tensor,
        h: torch.Tensor | None,
        act_quant: ActQuantizer | None = None,
    ) -> None:
        """Stream the layer's im2col columns into ``solver``; with ``holdout``, the last volume's are held out.

        An input given as int8 codes (``act_quant``'s, on the CPU) streams those codes: their Gram matrices are summed
        exactly in integers (``LayerSolver.add``), several times faster than in float32."""
        y_mat = output_matrix(layer, y)
        held_from = self._held_out_from(y, y_mat.shape[-1])
        xq, x_scale, max_columns = xq.to(self.device), None, None
        if not xq.is_floating_point():
            x_scale, max_columns = float(act_quant.step), CODE_GRAM_MAX_COLUMNS
        chunks = input_patches(layer, xq, self.cfg.chunk_bytes, xq.dtype, solver.has_bias, max_columns)
        for cols, patches in chunks:
            for part, piece, held in _split_columns(cols, patches, held_from):
                h_part = h[part] if h is not None else None
                solver.add(piece, y_mat[..., part].to(self.device), h_part, held, x_scale)

    def _round_to_nearest(self, solver: LayerSolver) -> LayerSolution:
        """Round-to-nearest weights (no statistics needed); their errors come from the quantized layer's output."""
        with self.timer("scale_fit"):
            return solver.round_to_nearest()

    def _fitted_rows(self, y: torch.Tensor) -> slice:
        """The entries of the leading dimension of ``y`` that were fitted (all but a held-out last volume)."""
        rows = self._rows_per_volume(y)
        return slice(0, y.shape[0] - rows if self.holdout and rows is not None else y.shape[0])

    def _with_output_errors(
        self, sol: LayerSolution, out: torch.Tensor, y: torch.Tensor, h_map: torch.Tensor | None
    ) -> LayerSolution:
        """``sol`` with the errors its statistics could not give, from the quantized layer's output ``out``: for
        round-to-nearest both errors on every volume (they are also round-to-nearest's), otherwise the unweighted
        error on the fitted volumes."""
        if self.cfg.method == "rtn":
            error, error_weighted = _output_errors(out, y.to(out.device), h_map)
            return dataclasses.replace(
                sol, error=error, error_weighted=error_weighted, rtn_error=error, rtn_error_weighted=error_weighted
            )
        fit = self._fitted_rows(y)
        return dataclasses.replace(sol, error=_output_errors(out[fit], y[fit].to(out.device))[0])

    def _record(
        self, name: str, layer: nn.Module, sol: LayerSolution, weight_bits: int, act_quant: ActQuantizer | None,
        act_bits: int | None, seconds: float, before: dict[str, float],
    ) -> None:
        record = LayerRecord.from_solution(
            sol, name=name, type=type(layer).__name__, shape=list(layer.weight.shape), weight_bits=weight_bits,
            act_bits=act_bits, act_signed=act_quant.signed if act_quant is not None else None, seconds=seconds,
            phase_seconds={k: round(v, 4) for k, v in self.timer.since(before).items()},
        )
        self.records.append(record)
        self.log.info(
            "%s %s W%d A%s: output error RTN %.4g -> %s %.4g (%.2f s)", name, record.type, weight_bits,
            act_bits if act_bits is not None else "-", record.rtn_error, self.cfg.method, record.error, seconds,
        )
        if self.progress is not None:
            self.progress.update(1)


def _forward_by_volume(module: nn.Module, x: torch.Tensor, volumes: int) -> torch.Tensor:
    """``module(x)`` one calibration volume at a time, written into one output tensor: the quantized copy of the input
    and the convolution's workspace then exist for one volume instead of all of them, which is where the quantizing
    pass peaks in memory (the full-resolution layers). A leading dimension that is no multiple of ``volumes`` (e.g.
    window-partitioned tokens of another size) runs in one call.

    The outputs can differ from one batched call in the last bits (the convolution kernels block a batch
    differently); they do not depend on how many volumes there are.
    """
    if volumes <= 1 or x.shape[0] % volumes:
        return module(x)
    rows = x.shape[0] // volumes
    first = module(x[:rows])
    out = first.new_empty((x.shape[0], *first.shape[1:]))
    out[:rows] = first
    del first
    for start in range(rows, x.shape[0], rows):
        out[start : start + rows] = module(x[start : start + rows])
    return out


def _split_columns(
    cols: slice, patches: torch.Tensor, held_from: int | None
) -> list[tuple[slice, torch.Tensor, bool]]:
    """A chunk of im2col columns split where the held-out columns (from ``held_from`` on) begin:
    ``[(columns, patches, held_out)]``."""
    if held_from is None or cols.stop <= held_from:
        return [(cols, patches, False)]
    if cols.start >= held_from:
        return [(cols, patches, True)]
    cut = held_from - cols.start
    return [
        (slice(cols.start, held_from), patches[..., :cut], False),
        (slice(held_from, cols.stop), patches[..., cut:], True),
    ]


def _inside_body(x: torch.Tensor, body: torch.Tensor | None) -> torch.Tensor:
    """The values of ``x`` (``(N, C, *S)``) at voxels inside the body mask (``(N, *S0)``, max-pooled to ``S``);
    all of ``x`` when there is no mask, it does not match, or it would leave too few voxels."""
    if body is None or x.dim() < 3 or body.dim() != x.dim() - 1 or body.shape[0] != x.shape[0]:
        return x
    inside = body_at(body, x.shape[2:])
    if int(inside.sum()) < 64:
        return x
    return x.movedim(1, -1)[inside]


@torch.no_grad()
def _choose_act_range(
    act_quant: ActQuantizer,
    layer: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    h_map: torch.Tensor | None,
    factors: tuple[float, ...],
    min_voxels: int = 0,
) -> float:
    """Scale the fitted range of ``act_quant`` (step and offset together, about zero) by the factor in
    ``factors`` whose quantized input gives the float ``layer`` the lowest attention-weighted error against
    its target ``y``; sets it in place and returns the chosen factor.

    The errors are measured on a regular sub-grid of the output voxels with at least ``min_voxels`` of them (all
    voxels for layers whose output cannot be sub-sampled directly): every ``m``-th voxel along each axis, one ``m``
    per axis (:func:`~monai_efficientq.layers.sampled_output_steps`).
    """
    step0, offset0 = act_quant.step.clone(), act_quant.offset.clone()
    weight = layer.weight.detach()
    bias = layer.bias.detach() if layer.bias is not None else None
    m = sampled_output_steps(layer, tuple(y.shape), min_voxels) if min_voxels else (1,) * (y.dim() - 2)
    every_m = (slice(None),) * 2 + tuple(slice(None, None, step) for step in m)
    y = y[every_m].contiguous()  # read by every factor
    h = h_map[every_m[1:]].contiguous() if h_map is not None else None
    best_err, best_factor = math.inf, 1.0
    x_quant = torch.empty_like(x, memory_format=torch.contiguous_format)  # reused by every factor
    for factor in factors:
        act_quant.step.copy_(step0 * factor)
        act_quant.offset.copy_(offset0 * factor)
        out = subsampled_forward(layer, act_quant.quantize(x, out=x_quant), weight, bias, m)
        err = squared_error_sums(out, y, h)[1]
        if err < best_err:
            best_err, best_factor = err, factor
    act_quant.step.copy_(step0 * best_factor)
    act_quant.offset.copy_(offset0 * best_factor)
    return best_factor


def _relative_errors(
    layer: nn.Module,
    xq: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    h_map: torch.Tensor | None = None,
) -> tuple[float, float]:
    """``‖layer(xq; weight, bias) − y‖² / ‖y‖²``, unweighted and weighted by the attention map ``h_map``
    (``(N, *S)`` at the output's resolution; the unweighted value when ``None``), for a weight in
    equivalent-convolution layout."""
    w = matrix_to_weight(layer, weight.to(layer.weight.dtype))
    b = bias.reshape(-1).to(layer.weight.dtype) if bias is not None else None
    return _output_errors(layer_forward(layer, xq.to(y.device), w, b), y, h_map)


def _output_errors(out: torch.Tensor, y: torch.Tensor, h_map: torch.Tensor | None = None) -> tuple[float, float]:
    """``‖out − y‖² / ‖y‖²``, unweighted and weighted by ``h_map`` (as :func:`_relative_errors`); squares in
    ``y``'s dtype, summed in float64."""
    e2, e2_weighted = squared_error_sums(out, y, h_map)
    y2, y2_weighted = squared_error_sums(None, y, h_map)
    return e2 / max(y2, 1e-300), e2_weighted / max(y2_weighted, 1e-300)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but stay usable without it
        return None
    return tqdm(total=total, desc="EfficientQ layers", unit="layer", leave=False)


def _float_layer_list(net: nn.Module, layers: dict[str, nn.Module], reached: list[str], cfg: EfficientQConfig) -> list:
    out = []
    for name, module in net.named_modules():
        if name in layers and name not in reached:
            out.append({"name": name, "type": type(module).__name__, "reason": "never called in forward; left float"})
        elif name in cfg.skip_layers:
            out.append({"name": name, "type": type(module).__name__, "reason": "skipped by config"})
        elif name not in layers and not isinstance(module, QuantizedMixin):
            if is_quantizable(module):
                continue
            own = list(module.parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, QUANTIZABLE_TYPES):
                reason = f"subclass of {type(module).__mro__[1].__name__} with its own forward; cannot quantize, left float"
            elif isinstance(module, _FLOAT_BY_DESIGN):
                reason = "normalization/activation; float by design"
            else:  # e.g. SwinUNETR's WindowAttention: a bias table, used by matmuls that are no modules
                names = ", ".join(n for n, _ in module.named_parameters(recurse=False))
                reason = f"unsupported layer type (own parameters: {names}); left float"
            out.append({"name": name, "type": type(module).__name__, "reason": reason})
    return out


def _agreement_dice(ref: torch.Tensor, out: torch.Tensor, multi_label: bool) -> dict[str, float]:
    if ref.dim() < 3:
        return {}
    if multi_label:  # each channel on where its logit is positive
        a, b = (ref > 0).unbind(1), (out > 0).unbind(1)
    else:  # each voxel in its argmax class
        ref_class, out_class = channel_argmax(ref), channel_argmax(out)
        a = [ref_class == c for c in range(ref.shape[1])]
        b = [out_class == c for c in range(ref.shape[1])]
    dice = {}
    for c, (in_ref, in_out) in enumerate(zip(a, b)):
        inter = (in_ref & in_out).sum().item()
        total = in_ref.sum().item() + in_out.sum().item()
        dice[f"class{c}"] = 2 * inter / total if total else 1.0
    return dice


@torch.no_grad()
def quantize_(
    net: nn.Module,
    calib_volume: Any,
    config: EfficientQConfig | None = None,
    label: Any = None,
    attention_map: Any = None,
    logger: logging.Logger | None = None,
) -> QuantizationReport:
    """Quantize a trained float network in place, post-training, from one calibration volume.

    Conv→BatchNorm pairs of ``net`` are folded and every quantizable layer is replaced by its quantized
    counterpart (:mod:`~monai_efficientq.modules`), so every holder of ``net`` (an engine, a wrapper) runs the
    quantized network. ``net`` is moved to ``config.device`` and keeps its train/eval mode.

    Args:
        net: the trained float network (any torch module built from Conv/ConvTranspose/Linear layers; a bare
            layer cannot be replaced in place: use :func:`quantize_network`).
        calib_volume: one calibration volume, channel-first ``(C, *S)`` or batched ``(N, C, *S)``
            (tensor, MetaTensor or numpy array), preprocessed as the network expects, of a size it accepts.
        config: the settings (default ``EfficientQConfig()``: W2, float activations, 8-bit first/last).
        label: a label of the calibration volume (class indices ``(N|1, 1, *S)`` or one-hot), used when
            ``config.attention == "label"``.
        attention_map: a precomputed full-resolution attention map ``(N|1, 1, *S)`` (overrides label/prediction).
        logger: where per-layer results are logged (default: the ``monai_efficientq`` logger).

    Returns:
        the report; save the network with :func:`~monai_efficientq.checkpoint.save_quantized`.
    """
    if is_quantizable(net):
        raise ValueError(
            f"quantize_ replaces the layers inside a network, and {type(net).__name__} is itself one layer: use "
            f"quantize_network, which returns a new quantized layer."
        )
    cfg = config if config is not None else EfficientQConfig()
    log = logger or _logger
    t_start = time.perf_counter()
    param = next(net.parameters(), None)
    device = torch.device(cfg.device) if cfg.device else (param.device if param is not None else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = PhaseTimer(device)
    training = net.training
    net.eval().to(device)
    try:
        report = _quantize_in_place(net, calib_volume, cfg, label, attention_map, log, device, timer)
    finally:
        net.train(training)
    report.total_seconds = time.perf_counter() - t_start
    report.phase_seconds = _with_other(timer.snapshot(), report.total_seconds)
    log.info(
        "EfficientQ done in %.1f s: %d layers quantized, %d left float, %.1fx smaller. Time: %s.",
        report.total_seconds, len(report.layers), len(report.float_layers), report.compression,
        ", ".join(f"{k} {v:.1f} s" for k, v in report.phase_seconds.items() if v >= 0.05),
    )
    return report


def quantize_network(
    net: nn.Module,
    calib_volume: Any,
    config: EfficientQConfig | None = None,
    label: Any = None,
    attention_map: Any = None,
    logger: logging.Logger | None = None,
) -> tuple[nn.Module, QuantizationReport]:
    """Quantize a copy of a trained float network: :func:`quantize_` on a deep copy; ``net`` is not changed.

    Args: as :func:`quantize_`; ``net`` may also be a bare quantizable layer.

    Returns:
        ``(quantized network in eval mode, report)``.
    """
    holder = nn.Sequential(copy.deepcopy(net)) if is_quantizable(net) else None
    qnet = copy.deepcopy(net).eval() if holder is None else holder.eval()
    report = quantize_(qnet, calib_volume, config, label, attention_map, logger)
    if holder is not None:
        qnet = holder[0]
        set_quantization_info(qnet, quantization_info(holder))
        for record in report.layers:
            record.name = record.name.partition(".")[2] if "." in record.name else ""
    return qnet, report


def _quantize_in_place(
    net: nn.Module, calib_volume: Any, cfg: EfficientQConfig, label: Any, attention_map: Any, log: logging.Logger,
    device: torch.device, timer: PhaseTimer,
) -> QuantizationReport:
    """The body of :func:`quantize_` on ``net`` (in eval mode on ``device``)."""
    # the default keeps the first MEMORY_BUDGET bytes of targets in CPU memory and the rest in files; on a GPU all stay
    memory_bytes = MEMORY_BUDGET if cfg.target_device is None and device.type == "cpu" else None
    targets = TargetStore(cfg.target_device or device, device, memory_bytes)
    try:
        return _quantize_with_targets(net, calib_volume, cfg, label, attention_map, log, device, timer, targets)
    finally:
        targets.close()  # also removes the files of target_device="disk"


def _quantize_with_targets(
    net: nn.Module, calib_volume: Any, cfg: EfficientQConfig, label: Any, attention_map: Any, log: logging.Logger,
    device: torch.device, timer: PhaseTimer, targets: TargetStore,
) -> QuantizationReport:
    """:func:`_quantize_in_place` with the store that keeps the float targets."""
    with timer("setup"):
        x, label, attention_map, given_volumes, given_shape, holdout = _calibration_batch(
            net, calib_volume, label, attention_map, cfg, device, log
        )
        float_bytes = _state_bytes(net)
        # without BatchNorm, folding changes nothing: its float forward records the targets too (one forward less)
        volumes = x.shape[0] if _runs_by_volume(device, x, cfg.target_device) else 1  # one volume at a time, or a batch
        layers = quantizable_layers(net, cfg.skip_layers)
        early = None if has_batchnorm(net) else _TargetRecorder(layers, targets, net)
        try:
            pairs, float_out, unfolded = _fold(net, x, log, cfg.skip_layers, volumes)
        finally:
            if early is not None:
                early.remove()
    with timer("targets"):
        if early is not None:
            layers, recorder = early.layers, _recorded(net, early)
        else:
            pairs, layers, recorder = _record_targets(net, pairs, float_out, x, cfg, targets, log, unfolded, volumes)
    with timer("attention"):
        body = (x != 0).any(dim=1) if x.dim() >= 3 else None
        attention = _attention(cfg, float_out, x, body, label, attention_map)
    edges = _edges(net, x, {n: layers[n] for n in recorder.order}, cfg, timer, log)
    info = QuantizedNetInfo([list(p) for p in pairs], cfg.stored_dict())
    allocation = _allocate(
        net, x, layers, recorder, attention, edges, cfg, float_bytes, info, given_volumes, timer, log
    )
    progress = _progress_bar(len(recorder.order), cfg.progress)
    run = _QuantizingRun(
        cfg, targets, recorder.order, attention, device, log, progress, body, edges, given_volumes, holdout,
        timer, volumes=x.shape[0], layer_bits=allocation.bits if allocation is not None else None,
    )
    log.info(
        "EfficientQ: %d layers, %s W%s A%s, preset %s, on %s", len(recorder.order), cfg.method,
        cfg.weight_bits if allocation is None else "(mixed)", cfg.act_bits if cfg.act_bits is not None else "-",
        cfg.preset, device,
    )
    if targets.files and cfg.target_device is None:
        log.info(
            "%d of %d float targets wait in temporary files (the first %.3g MiB stay in memory; target_device='cpu' "
            "keeps all in memory).", targets.files, len(targets), MEMORY_BUDGET / 2**20,
        )
    q_out = _quantizing_forward(net, x, layers, run, volumes > 1)
    set_quantization_info(net, info)
    with timer("finish"):
        if allocation is None:
            packed = packed_size(net)
        else:  # the real file checked against the budget
            packed = enforce_budget(net, layers, allocation, cfg, run.records, log)
        peak, kind = peak_memory(device)
        return QuantizationReport(
            config=cfg.to_dict(), layers=run.records,
            float_layers=_float_layer_list(net, layers, recorder.order, cfg),
            folded_batchnorm=[list(p) for p in pairs], peak_memory_mb=peak, peak_memory_kind=kind,
            float_bytes=float_bytes, packed_bytes=packed, calibration_shape=given_shape,
            device=str(device), calib_agreement_dice=_agreement_dice(float_out, q_out, cfg.prediction == "sigmoid"),
            **_allocation_fields(allocation),
        )


def _allocate(
    net: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module], recorder: _TargetRecorder,
    attention: AttentionMaps | None, edges: set[str] | None, cfg: EfficientQConfig, float_bytes: int,
    info: QuantizedNetInfo, given_volumes: int, timer: PhaseTimer, log: logging.Logger,
) -> WidthAllocation | None:
    """Under ``cfg.size_budget``, every layer's weight width (:mod:`~monai_efficientq.mixed`); else ``None``."""
    if cfg.size_budget is None:
        return None
    with timer("allocation"):
        allocation = allocate_widths(
            net, x, {n: layers[n] for n in recorder.order}, recorder.targets, attention, edges, cfg, float_bytes,
            info, given_volumes, log,
        )
    allocation.seconds = round(timer.seconds["allocation"], 3)
    return allocation


def _allocation_fields(allocation: WidthAllocation | None) -> dict[str, Any]:
    """The report's size-budget fields: the budget in bytes, the allocation and the per-layer sensitivity table."""
    if allocation is None:
        return {}
    return {
        "size_budget": allocation.budget_bytes, "allocation": allocation.summary(), "sensitivity": allocation.table(),
    }


def _edges(
    net: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module], cfg: EfficientQConfig, timer: PhaseTimer,
    log: logging.Logger,
) -> set[str] | None:
    """The layers that get ``first_last_bits`` (``None`` without): by data flow, every layer that reads the input
    or writes the output."""
    if cfg.first_last_bits is None:
        return None
    with timer("edges"):
        first, last = edge_layers(net, x, layers)
    log.info("First layers (input): %s; last layers (output): %s.", ", ".join(first), ", ".join(last))
    return set(first) | set(last)


def _quantizing_forward(
    net: nn.Module, x: torch.Tensor, layers: dict[str, nn.Module], run: _QuantizingRun, by_volume: bool
) -> Any:
    """The forward pass in which every layer of ``run.order`` is quantized when reached; afterwards each holds its
    quantized layer (the float one if the pass failed before it). Returns the quantized network's output.

    ``by_volume``: the calibration volumes run one at a time (:mod:`~monai_efficientq.volume_pass`), the activations
    of the waiting volumes in a temporary file (storages from :data:`~monai_efficientq.offload.MIN_BYTES` on); a
    layer still sees all volumes' inputs, joined along the first dimension as its targets were
    (:class:`_TargetRecorder`)."""
    for name in run.order:
        set_submodule(net, name, _PendingLayer(name, layers[name], run))
    offload = None
    try:
        if not by_volume:
            return net(x)
        offload = ActivationOffload(net)
        run.volume_pass = VolumeByVolume(net, run.quantize_layer_by_volume, offload)
        out = _joined_outputs(run.volume_pass.run(x, run.volumes))
        if offload.bytes_written:
            run.log.info(
                "The quantizing pass ran the %d calibration volumes one at a time; %.1f MiB of activations of the "
                "waiting volumes went through temporary files (target_device='cpu' runs them as one batch, all in "
                "memory).",
                run.volumes, offload.bytes_written / 2**20,
            )
        return out
    finally:
        run.volume_pass = None
        if offload is not None:
            offload.close()
        if run.progress is not None:
            run.progress.close()
        for name in run.order:
            set_submodule(net, name, run.quantized.get(name, layers[name]))


def _runs_by_volume(device: torch.device, x: torch.Tensor, target_device: str | None) -> bool:
    """Whether the float forwards and the quantizing pass run the calibration batch ``x`` one volume at a time: on
    the CPU, where memory is what runs out first (a batched forward keeps every activation of all the volumes at
    once), with more than one volume, unless ``target_device="cpu"`` asks to keep everything in memory (one batch, as
    before this existed: the same codes bit for bit). On a GPU the batch runs as one."""
    return device.type == "cpu" and x.shape[0] > 1 and target_device != "cpu"


def _float_forward(net: nn.Module, x: torch.Tensor, volumes: int) -> Any:
    """``net(x)``, one of ``volumes`` equal parts of ``x`` at a time, the outputs joined as one batch's."""
    return _joined_outputs([net(part) for part in x.split(x.shape[0] // volumes)])


def _joined_outputs(outputs: list[Any]) -> Any:
    """The network outputs of the volumes, one by one, joined along the first dimension like a batched forward's
    (tensors, and tuples, lists and dicts of them)."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(_joined_outputs(list(items)) for items in zip(*outputs))
    if isinstance(first, dict):
        return {k: _joined_outputs([o[k] for o in outputs]) for k in first}
    return first


def _with_other(phases: dict[str, float], total: float) -> dict[str, float]:
    """The phases' seconds (rounded) plus ``other``: the rest of ``total`` (the float layers of the quantizing
    forward, logging)."""
    out = {k: round(v, 3) for k, v in phases.items()}
    out["other"] = round(max(total - sum(phases.values()), 0.0), 3)
    return out


def _calibration_batch(
    net: nn.Module, calib_volume: Any, label: Any, attention_map: Any, cfg: EfficientQConfig, device: torch.device,
    log: logging.Logger,
) -> tuple[torch.Tensor, Any, Any, int, list[int], bool]:
    """The checked calibration batch with its augmented copies: ``(x, label, attention_map, given volumes,
    given shape, holdout)``."""
    x = prepare_calibration(net, calib_volume).to(device)
    augment, holdout = cfg.calib_augment, cfg.holdout
    if augment and x.dim() < 3:  # e.g. a Linear-only net on feature vectors: nothing spatial to augment
        log.warning("calib_augment=%d ignored: the calibration data %s have no spatial dimensions.", augment,
                    tuple(x.shape))
        augment, holdout = 0, holdout and x.shape[0] >= 2
    if holdout and x.shape[0] * (1 + augment) < 2:
        raise ValueError(
            "holdout=True selects each layer's solution on a calibration volume the fit does not see, so it needs "
            "at least two: set calib_augment >= 1 (augmented copies) or pass a batch of volumes."
        )
    label = _batched(label, "label", x)
    attention_map = _batched(attention_map, "attention_map", x)
    given_volumes, given_shape = x.shape[0], list(x.shape)
    if augment:
        from .augment import augmented_copies

        x, label, attention_map = augmented_copies(x, augment, cfg.seed, label, attention_map)
        log.info("Calibrating on %d volumes: %d augmented copies of each calibration volume.", x.shape[0], augment)
    return x, label, attention_map, given_volumes, given_shape, holdout


def _record_targets(
    net: nn.Module, pairs: list, float_out: torch.Tensor, x: torch.Tensor, cfg: EfficientQConfig,
    targets: TargetStore, log: logging.Logger, unfolded: dict[str, nn.Module], volumes: int = 1,
) -> tuple[list, dict[str, nn.Module], _TargetRecorder]:
    """Record every layer's float output on ``x`` (``volumes`` forwards); if folding BatchNorm changed the float
    output, put the ``unfolded`` modules back and record again. Returns ``(pairs, layers, recorder)``."""
    layers = quantizable_layers(net, cfg.skip_layers)
    recorder = _TargetRecorder(layers, targets, net)
    try:
        out = _first_tensor(_float_forward(net, x, volumes))
    finally:
        recorder.remove()
    tolerance = 1e-4 * float(float_out.abs().max())
    if pairs and not torch.allclose(out, float_out, rtol=1e-3, atol=tolerance):
        log.warning("Folding BatchNorm changed the float output; quantizing without folding instead.")
        for name, module in unfolded.items():
            set_submodule(net, name, module)
        for name in recorder.order:  # recorded on the folded network: record again
            targets.pop(name)
        return _record_targets(net, [], float_out, x, cfg, targets, log, {}, volumes)
    return pairs, layers, _recorded(net, recorder)


def _recorded(net: nn.Module, recorder: _TargetRecorder) -> _TargetRecorder:
    """``recorder`` after its forward pass, checked to have seen a quantizable layer."""
    if not recorder.order:
        raise ValueError(f"no quantizable layer of {type(net).__name__} was called in its forward pass.")
    return recorder


def _fold(
    net: nn.Module, x: torch.Tensor, log: logging.Logger, skip: list[str] | None = None, volumes: int = 1
) -> tuple[list, torch.Tensor, dict[str, nn.Module]]:
    """Fold Conv→BatchNorm pairs of ``net`` in place, but those whose conv is in ``skip`` (it stays float as it
    is: a folded float conv would get a bias that the float network definition does not have); returns the pairs,
    the float output on ``x`` (``volumes`` forwards: the pairs are found on the first) and copies of the modules as
    they were before folding, by name."""
    parts = x.split(x.shape[0] // volumes)
    try:
        pairs, first = find_conv_bn_pairs(net, parts[0])
        output = _joined_outputs([first] + [net(part) for part in parts[1:]])
        del first
    except (LayerCalledTwiceError, VolumesDivergedError):  # raised by a target recorder running in the same forward
        raise
    except Exception as err:
        raise RuntimeError(
            f"the float network failed on the calibration volume of shape {tuple(x.shape)}: {err}. Check that the "
            f"volume has the size the network accepts (e.g. divisible by its down-sampling factor) and channels."
        ) from err
    float_out = _first_tensor(output).clone()
    pairs = [pair for pair in pairs if pair[0] not in set(skip or [])]
    originals = {name: copy.deepcopy(net.get_submodule(name)) for pair in pairs for name in pair}
    if pairs:
        fold_batchnorm(net, pairs)
        log.info("Folded %d BatchNorm layers into the preceding convolutions.", len(pairs))
    return pairs, float_out, originals


def _batched(data: Any, what: str, x: torch.Tensor) -> torch.Tensor | None:
    """``data`` (a label or attention map, ``(N|1, C, *S)`` or ``(C, *S)``) as a tensor on ``x``'s device."""
    if data is None:
        return None
    t = _as_tensor(data, what).to(x.device)
    return t if t.dim() == x.dim() else t.unsqueeze(0)


def _first_tensor(out: Any) -> torch.Tensor:
    tensor = first_tensor(out)
    if tensor is None:
        raise TypeError(f"cannot use network output of type {type(out).__name__}")
    return tensor


def _attention(
    cfg: EfficientQConfig,
    float_out: torch.Tensor,
    x: torch.Tensor,
    body: torch.Tensor | None,
    label: Any,
    attention_map: Any,
) -> AttentionMaps | None:
    multi_label = cfg.prediction == "sigmoid"
    integer = cfg.class_weights == "integer"
    if attention_map is not None:
        return AttentionMaps(None, body, multi_label, cfg.class_weight_power, weight_map=attention_map)
    if cfg.attention == "none" or float_out.dim() != x.dim():
        return None
    if cfg.attention == "label":
        if label is None:
            raise ValueError('attention="label" needs the calibration label: pass label=... to quantize_network.')
        scores = label.float() if multi_label else label_to_scores(label, float_out.shape[1])
        if multi_label:
            scores = scores * 2 - 1  # one-hot {0,1} -> logits whose sign marks "on"
        return AttentionMaps(scores, body, multi_label, cfg.class_weight_power, integer=integer)
    return AttentionMaps(float_out, body, multi_label, cfg.class_weight_power, integer=integer)
