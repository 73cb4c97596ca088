"""Brevitas' post-training quantizers as methods of the comparison (optional: ``pip install -e .[bench]``).

Every row quantizes the same layers as ours with the same 8-bit first/last layers; :data:`BREVITAS_NOTES` says how
each row is built and what matches ours and what does not (it is written under every results table). Nothing here
imports Brevitas until a row runs, so the registry lists these methods where Brevitas is not installed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from monai_efficientq.folding import fold_batchnorm

from .measure import Stopwatch

if TYPE_CHECKING:
    from .config import CompareConfig, Setting
    from .methods import Calibration
    from .plan import FloatPlan

__all__ = ["BREVITAS_METHODS", "BREVITAS_NOTES", "BrevitasMethod"]

BREVITAS_NOTES = [
    "Layers: brevitas.graph.quantize.layerwise_quantize with compute_layer_map {nn.Conv3d: qnn.QuantConv3d, "
    "nn.ConvTranspose3d: qnn.QuantConvTranspose3d} (2D and Linear likewise), called once per group of layers "
    "(first/last, inner unsigned-input, inner signed-input) with name_blacklist selecting the group; the layers "
    "quantized are exactly ours (the Conv/ConvTranspose/Linear layers reached in the forward pass).",
    "Weights: Int8WeightPerChannelFloat.let(bit_width=b, narrow_range=False): signed integer grid with zero "
    "[-2^(b-1), 2^(b-1)-1]*s, per-output-channel scale s = max|w| / 2^(b-1) from abs-max statistics (measured: "
    "at 2 bits the levels are {-1, -1/2, 0, 1/2}*max|w|, positive weights clip at max|w|/2). Ours: 2^b levels without zero, scale fitted "
    "by least squares, per channel (default preset) or per tensor (original preset). --brevitas_weight_scale "
    "mse switches Brevitas to Int8WeightPerChannelFloatMSE.",
    "First/last quantized layer: 8-bit weights and float input for every method, as ours (first_last_bits=8).",
    "Activations (A settings): input_quant on the inner layers only, per tensor; Uint8ActPerTensorFloatMSE when "
    "the layer's float calibration input is non-negative, else ShiftedUint8ActPerTensorFloatMSE (asymmetric, zero "
    "point), mirroring our 'auto' mode (unsigned grid, else affine). --brevitas_act_scale stats uses the "
    "percentile-statistics variants instead. Calibrated with brevitas.graph.calibrate.calibration_mode on the "
    "calibration volume, which collects the statistics with all quantization disabled (float inputs); ours fits "
    "each activation quantizer by least squares on the input as it arrives through the already-quantized layers.",
    "BatchNorm: folded into the preceding conv before Brevitas (same exact folding code as ours; "
    "--brevitas_fold_bn False keeps BN and quantizes the unfolded conv weights). GroupNorm/InstanceNorm stay float.",
    "Bias: float for every method (ours never quantizes bias; Brevitas bias_quant=None).",
    "Order (as brevitas_examples ptq_evaluate): activation calibration, then GPTQ / GPFQ / learned rounding, or "
    "bias correction.",
    "brevitas_gptq: gptq_mode(act_order=True, use_quant_activations=False), one forward + update per layer. "
    "brevitas_gpfq: gpfq_mode(act_order=True, use_quant_activations=True), Brevitas' default dual (quant and "
    "float input) optimisation. Both skip every ConvTranspose (Brevitas issue #1479): those layers stay "
    "round-to-nearest, reported as not optimised.",
    "brevitas_biascorr: bias_correction_mode over the calibration volume (weights stay round-to-nearest).",
    "brevitas_learned_round: brevitas_examples' LearnedRoundTrainer (the engine behind imagenet "
    "learned_round_utils.apply_learned_round), layer-wise (is_layer), hard-sigmoid AdaRound parametrisation, "
    "loss round_reg(max_count=iterations) + mse(reduction='none', dim=1), Adam lr 1e-3, batch 1 (the one "
    "calibration volume), --lr_iterations per layer (default 200); AMP float16 on CUDA as the example, float32 "
    "on CPU. Targets are the float outputs of the float network, inputs the quantized network's.",
    "Checkpoint size: Brevitas saves torch.save(model.state_dict()): float32 weights plus quantizer parameters, "
    "plus a float copy of every optimised weight after GPTQ/GPFQ (weight_orig, create_weight_orig=True) and the "
    "weight-sized rounding parameters after learned rounding; ours the save_quantized packed file.",
    "Layers optimised: Brevitas layers whose fake-quantized weight (or, for bias correction, whose bias) differs "
    "from the round-to-nearest one right after layerwise_quantize; ours the layers whose chosen solution is an "
    "ADMM iterate rather than the round-to-nearest candidate (best_iteration >= 0).",
]

IGNORED_MESSAGES = ("fast_hadamard", "deprecated")


@functools.lru_cache(maxsize=None)
def _brevitas() -> SimpleNamespace:
    """The Brevitas pieces the rows use, imported once (their import-time warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import brevitas.nn as qnn
        from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
        from brevitas.graph.gpfq import gpfq_mode
        from brevitas.graph.gptq import gptq_mode
        from brevitas.graph.quantize import layerwise_quantize
        from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
        from brevitas.quant import scaled_int, shifted_scaled_int
    return SimpleNamespace(
        qnn=qnn, bias_correction_mode=bias_correction_mode, calibration_mode=calibration_mode, gpfq_mode=gpfq_mode,
        gptq_mode=gptq_mode, layerwise_quantize=layerwise_quantize, QuantLayer=QuantWeightBiasInputOutputLayer,
        scaled_int=scaled_int, shifted_scaled_int=shifted_scaled_int,
    )


def _layer_map(kwargs: dict[str, Any]) -> dict[type, tuple[type, dict[str, Any]]]:
    """``compute_layer_map`` of ``layerwise_quantize``: every float layer type to its Brevitas layer."""
    qnn = _brevitas().qnn
    return {
        nn.Conv3d: (qnn.QuantConv3d, kwargs),
        nn.ConvTranspose3d: (qnn.QuantConvTranspose3d, kwargs),
        nn.Conv2d: (qnn.QuantConv2d, kwargs),
        nn.ConvTranspose2d: (qnn.QuantConvTranspose2d, kwargs),
        nn.Conv1d: (qnn.QuantConv1d, kwargs),
        nn.ConvTranspose1d: (qnn.QuantConvTranspose1d, kwargs),
        nn.Linear: (qnn.QuantLinear, kwargs),
    }


def _layer_groups(plan: FloatPlan, setting: Setting, cfg: CompareConfig) -> list[tuple[dict[str, Any], set[str]]]:
    """The quantizers of each group of layers: the edges (W8, float input), then the inner layers (with an
    unsigned or a shifted input quantizer, by the sign of their float input, when activations are quantized)."""
    b = _brevitas()
    mse_w, mse_a = cfg.brevitas_weight_scale == "mse", cfg.brevitas_act_scale == "mse"
    weights = b.scaled_int.Int8WeightPerChannelFloatMSE if mse_w else b.scaled_int.Int8WeightPerChannelFloat
    unsigned = b.scaled_int.Uint8ActPerTensorFloatMSE if mse_a else b.scaled_int.Uint8ActPerTensorFloat
    shifted = b.shifted_scaled_int
    signed = shifted.ShiftedUint8ActPerTensorFloatMSE if mse_a else shifted.ShiftedUint8ActPerTensorFloat
    edges = set(plan.edges)
    groups = [({"weight_quant": weights.let(bit_width=8, narrow_range=False)}, edges)]
    inner = [name for name in plan.order if name not in edges]
    inner_w = weights.let(bit_width=setting.weight_bits, narrow_range=False)
    if setting.act_bits is None:
        return groups + [({"weight_quant": inner_w}, set(inner))]
    positive = {name for name in inner if not plan.signed_input[name]}
    negative = {name for name in inner if plan.signed_input[name]}
    return groups + [
        ({"weight_quant": inner_w, "input_quant": unsigned.let(bit_width=setting.act_bits)}, positive),
        ({"weight_quant": inner_w, "input_quant": signed.let(bit_width=setting.act_bits)}, negative),
    ]


def _quant_layers(model: nn.Module, plan: FloatPlan, setting: Setting, cfg: CompareConfig) -> dict[str, nn.Module]:
    """Replace the planned layers of ``model`` by Brevitas layers, group by group; returns them by name."""
    b = _brevitas()
    everything = set(plan.types)
    for kwargs, names in _layer_groups(plan, setting, cfg):
        if names:
            b.layerwise_quantize(model, compute_layer_map=_layer_map(kwargs), name_blacklist=sorted(everything - names))
    model.eval()
    layers = {name: m for name, m in model.named_modules() if isinstance(m, b.QuantLayer)}
    missing = [name for name in plan.order if name not in layers]
    if missing:
        raise RuntimeError(f"layerwise_quantize did not replace {missing}")
    return layers


@torch.no_grad()
def _snapshot(layers: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The fake-quantized weights and the biases of ``layers`` as they are now (round-to-nearest)."""
    weights = {name: m.quant_weight().value.detach().clone() for name, m in layers.items()}
    biases = {name: m.bias.detach().clone() for name, m in layers.items() if m.bias is not None}
    return weights, biases


@torch.no_grad()
def _changes(layers: dict[str, nn.Module], before: tuple[dict, dict], plan: FloatPlan) -> dict[str, list[str]]:
    """Which layers' weights and biases differ from ``before`` (a :func:`_snapshot`), and which are unchanged."""
    weights, biases = before
    changed: dict[str, list[str]] = {"weights": [], "biases": [], "unchanged": []}
    for name, m in layers.items():
        w_diff = not torch.equal(m.quant_weight().value.detach().to(weights[name].device), weights[name])
        b_diff = name in biases and m.bias is not None and not torch.equal(
            m.bias.detach().to(biases[name].device), biases[name])
        if w_diff:
            changed["weights"].append(name)
        if b_diff:
            changed["biases"].append(name)
        if not (w_diff or b_diff):
            changed["unchanged"].append(f"{name} ({plan.types.get(name, type(m).__name__)})")
    return changed


# -- the algorithms run after the layers are replaced (and the activations calibrated) -----------------------
def _round_to_nearest(model: nn.Module, x: torch.Tensor, cfg: CompareConfig) -> list[str]:
    """Nothing more: the weights stay round-to-nearest."""
    return []


def _bias_correction(model: nn.Module, x: torch.Tensor, cfg: CompareConfig) -> list[str]:
    """Brevitas' bias correction over the calibration batch."""
    with torch.no_grad(), _brevitas().bias_correction_mode(model):
        model(x)
    return []


def _layer_by_layer(mode_name: str, quant_inputs: bool, model: nn.Module, x: torch.Tensor, cfg: CompareConfig) -> None:
    """One forward and one update per layer in Brevitas' ``gptq_mode`` or ``gpfq_mode``, with activation order."""
    mode = getattr(_brevitas(), mode_name)
    buffers = "same" if cfg.device.startswith("cuda") else "cpu"
    with torch.no_grad(), mode(model, act_order=True, use_quant_activations=quant_inputs, device=buffers) as algorithm:
        for _ in range(algorithm.num_layers):
            algorithm.model(x)
            algorithm.update()


def _gptq(model: nn.Module, x: torch.Tensor, cfg: CompareConfig) -> list[str]:
    """GPTQ with activation order, statistics from float activations."""
    _layer_by_layer("gptq_mode", False, model, x, cfg)
    return []


def _gpfq(model: nn.Module, x: torch.Tensor, cfg: CompareConfig) -> list[str]:
    """GPFQ with activation order and Brevitas' default dual (quantized and float input) optimisation."""
    _layer_by_layer("gpfq_mode", True, model, x, cfg)
    return []


@contextlib.contextmanager
def _replaced(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name`` is ``value`` inside the block."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _learned_round_config(iterations: int, use_amp: bool) -> Any:
    """brevitas_examples' trainer settings for layer-wise AdaRound (see :data:`BREVITAS_NOTES`)."""
    from brevitas_examples.common.learned_round.learned_round_args import (
        HandlerSpec,
        LossArgs,
        OptimizerArgs,
        TrainerConfig,
        TrainingArgs,
    )
    from brevitas_examples.common.learned_round.learned_round_method import LearnedRoundArgs

    training = TrainingArgs(
        optimizers_args=[OptimizerArgs(target_params="learned_round", optimizer_cls="Adam", lr=1e-3, optimizer_kwargs={})],
        batch_size=1, iters=int(iterations),
        losses_args=[LossArgs(cls="round_reg", kwargs={"max_count": int(iterations)}),
                     LossArgs(cls="mse", kwargs={"reduction": "none", "dim": 1})],
        loss_scaling_factor=1.0, use_best_model=False, use_amp=use_amp, amp_dtype="float16", fast_update=False,
    )
    handler = HandlerSpec(name="learned_round",
                          config=LearnedRoundArgs(learned_round_param="hard_sigmoid", learned_round_kwargs=None))
    return TrainerConfig(training_args=training, training_handlers=[handler])


def _learned_round(model: nn.Module, x: torch.Tensor, cfg: CompareConfig) -> list[str]:
    """Brevitas' layer-wise learned rounding through brevitas_examples' trainer (its progress output kept quiet)."""
    import brevitas_examples.common.learned_round.learned_round_trainer as trainer_module
    from brevitas_examples.imagenet_classification.ptq import learned_round_utils as lru

    device = torch.device(cfg.device)
    trainer = trainer_module.LearnedRoundTrainer(config=_learned_round_config(cfg.lr_iterations, device.type == "cuda"))
    printed = io.StringIO()
    quiet_tqdm = functools.partial(trainer_module.tqdm, disable=True)
    with contextlib.redirect_stdout(printed), _replaced(trainer_module, "tqdm", quiet_tqdm):
        trainer.train(
            model=model, model_forward=lru.vision_forward, block_forward=lru.vision_block_forward,
            data_loader=[(x, None)], cache=lru.CacheVision(),
            get_blocks_fn=functools.partial(trainer_module.get_blocks, block_check_fn=lru.is_layer), keep_gpu=True,
        )
    model.to(device)
    lines = [line for line in printed.getvalue().splitlines() if line.startswith("Quantized block")]
    return [f"learned round: {len(lines)} layers; last: {lines[-1]}"] if lines else []


def _messages(caught: list[warnings.WarningMessage], notes: list[str]) -> list[str]:
    """``notes`` followed by the distinct warnings Brevitas raised (noise left out)."""
    notes = list(notes)
    for warning in caught:
        text = str(warning.message)
        if not any(word in text.lower() for word in IGNORED_MESSAGES) and text not in notes:
            notes.append(text)
    return notes


@dataclass(frozen=True)
class BrevitasMethod:
    """One Brevitas row: its layers replaced as ours are quantized, the activations calibrated (A settings), then
    ``algorithm``.

    Attributes:
        name: the row's name.
        algorithm: ``(model, calibration batch, cfg) -> notes``, run on the replaced layers.
        optimising: whether ``algorithm`` changes anything (``False`` for round-to-nearest).
    """

    name: str
    algorithm: Callable[[nn.Module, torch.Tensor, Any], list[str]]
    optimising: bool = True
    checkpoint_kind: str = "torch.save(model.state_dict())"

    def missing_requirement(self) -> str | None:
        """``None`` when Brevitas imports (and is imported now), else how to install it."""
        try:
            _brevitas()
        except Exception:
            return "brevitas is not installed (pip install -e .[bench])"
        return None

    def quantize(
        self, net: nn.Module, calib: Calibration, setting: Setting, cfg: CompareConfig
    ) -> tuple[nn.Module, dict[str, Any]]:
        """Quantize a copy of ``net``; the time counts from the copy to the end of ``algorithm``."""
        device, plan = torch.device(cfg.device), calib.plan
        with Stopwatch(device) as clock:
            model = copy.deepcopy(net).eval()
            if cfg.brevitas_fold_bn and plan.bn_pairs:
                fold_batchnorm(model, [tuple(pair) for pair in plan.bn_pairs])
            model.to(device)
            x = calib.image.to(device)
            layers = _quant_layers(model, plan, setting, cfg)
            before = _snapshot(layers)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if setting.act_bits is not None:
                    with torch.no_grad(), _brevitas().calibration_mode(model):
                        model(x)
                notes = self.algorithm(model, x, cfg)
            model.eval()
        changed = _changes(layers, before, plan)
        return model, {
            "quant_seconds": clock.seconds,
            "layers_total": len(layers),
            "layers_optimised": len(set(changed["weights"]) | set(changed["biases"])) if self.optimising else 0,
            "layers_weights_changed": len(changed["weights"]),
            "layers_bias_changed": len(changed["biases"]),
            "layers_not_optimised": changed["unchanged"] if self.optimising else [],
            "brevitas_notes": _messages(caught, notes),
        }

    def save(self, qnet: nn.Module, path: str) -> None:
        """Brevitas' state dict (float weights and quantizer parameters)."""
        torch.save(qnet.state_dict(), path)


BREVITAS_METHODS = (
    BrevitasMethod("brevitas_rtn", _round_to_nearest, optimising=False),
    BrevitasMethod("brevitas_biascorr", _bias_correction),
    BrevitasMethod("brevitas_gptq", _gptq),
    BrevitasMethod("brevitas_gpfq", _gpfq),
    BrevitasMethod("brevitas_learned_round", _learned_round),
)
