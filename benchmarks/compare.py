#!/usr/bin/env python
"""Compare EfficientQ with round-to-nearest and Brevitas' post-training quantizers on a MONAI 3D segmentation net.

One process, one float checkpoint, one calibration volume (cropped once, the same crop for every method) and
one sliding-window evaluation (MONAI ``sliding_window_inference`` + ``DiceMetric(include_background=False,
reduction="mean_batch")``, per class and mean, against the labels and against the float network's own
prediction) for every method and bit setting.

Methods
    ``float``; ours: ``rtn`` (``EfficientQConfig(method="rtn")``), ``eq_original`` (``preset="original"``),
    ``eq_default`` (default preset); Brevitas (optional extra ``pip install -e .[bench]``): ``brevitas_rtn``,
    ``brevitas_biascorr``, ``brevitas_gptq``, ``brevitas_gpfq``, ``brevitas_learned_round``.
Settings
    ``W4 W3 W2`` (weights only) and ``W4A4 W2A2``. For every method the first and the last quantized layer (in
    execution order) get 8-bit weights and a float input (our ``first_last_bits=8``).

Usage::

    python benchmarks/compare.py run \\
        --network monai.networks.nets.SegResNet \\
        --network_kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "init_filters": 8}' \\
        --checkpoint bundles/brain_tissue_mri_segmentation/models/model.pt \\
        --eval_datalist bundles/brain_tissue_mri_segmentation/data/datalist.json \\
        --roi_size 96 --settings W2 --methods rtn,eq_default,brevitas_gptq --out results.json
    python benchmarks/compare.py timing --size 128 --device cuda     # BraTS-config SegResNet, timing only
    python benchmarks/plot.py results.json                            # mean Dice vs bits (PNG)

How the Brevitas rows are built (what matches ours and what does not) is written into the results JSON
(``meta.brevitas_notes``) and the Markdown table; see ``BREVITAS_NOTES`` below.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of the quantization step alone (reset before it). On
CPU, by default (``--isolate auto``) each quantized row runs in a fresh ``multiprocessing`` spawn child, and the
row reports that child's peak resident set size (``ru_maxrss``) read right after quantization, with the RSS the
child had before quantizing (imports, network, data) as ``rss_before_mb``; the difference is what quantizing
added. With ``--isolate False`` on CPU the number is the whole process' peak so far (cumulative over rows).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import io
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

OURS = ("rtn", "eq_original", "eq_default")
BREVITAS = (
    "brevitas_rtn",
    "brevitas_biascorr",
    "brevitas_gptq",
    "brevitas_gpfq",
    "brevitas_learned_round",
)
METHODS = ("float",) + OURS + BREVITAS
DEFAULT_SETTINGS = ("W4", "W3", "W2", "W4A4", "W3A3", "W2A2")

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


# --------------------------------------------------------------------------------------------- small helpers
def _log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        return [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
    return [str(v) for v in value]


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):  # fire parses JSON objects itself, leaving JSON's true/false/null as strings
        literals = {"true": True, "false": False, "null": None}
        return {k: literals.get(v, v) if isinstance(v, str) else v for k, v in value.items()}
    return json.loads(value)


def _spatial_tuple(value: Any, dims: int) -> tuple[int, ...] | None:
    if value is None or (isinstance(value, str) and value.lower() in ("", "full", "none")):
        return None
    if isinstance(value, str):
        value = [int(v) for v in value.strip("[]()").split(",") if v.strip()]
    if isinstance(value, (int, np.integer)):
        return (int(value),) * dims
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * dims
    if len(value) != dims:
        raise ValueError(f"expected {dims} sizes, got {value}")
    return value


def parse_setting(name: str) -> tuple[int, int | None]:
    """``"W2A2"`` -> ``(2, 2)``, ``"W4"`` -> ``(4, None)``."""
    text = name.strip().upper()
    if not text.startswith("W"):
        raise ValueError(f"setting {name!r}: expected W<bits> or W<bits>A<bits>, e.g. W2 or W2A2")
    w, _, a = text[1:].partition("A")
    return int(w), (int(a) if a else None)


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _nan_to_none(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _nanmean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def brevitas_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importlib.import_module("brevitas")
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------------ network and data
def build_network(
    network: str | None = None,
    network_kwargs: Any = None,
    config_file: Any = None,
    network_id: str = "network_def",
    bundle_root: str | None = None,
) -> nn.Module:
    """A float network from a dotted class path + kwargs, or from a MONAI bundle config."""
    if config_file:
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        files = config_file if isinstance(config_file, (list, tuple)) else _as_list(config_file)
        parser.read_config(files if len(files) > 1 else files[0])
        if bundle_root is not None:
            parser["bundle_root"] = bundle_root
        return parser.get_parsed_content(network_id)
    if not network:
        raise ValueError("give --network (dotted class path, with --network_kwargs) or --config_file (MONAI bundle).")
    module_name, _, cls_name = network.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**_as_dict(network_kwargs))


def load_float_checkpoint(net: nn.Module, path: str) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model", "network", "net"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    net.load_state_dict(state)
    return net.eval()


def load_volume(path: str, normalize: str = "nonzero", is_label: bool = False) -> torch.Tensor:
    """A channel-first float volume (or int64 label) from NIfTI, normalised as by the package's CLI
    (:func:`monai_efficientq.cli.normalize_volume`)."""
    from monai.transforms import LoadImage

    from monai_efficientq.io import normalize_volume

    img = LoadImage(image_only=True, ensure_channel_first=True)(path)
    t = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(np.asarray(img))
    if is_label:
        return t.round().to(torch.int64)
    t = normalize_volume(t.to(torch.float32), normalize)
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
    return t.to(torch.float32).contiguous()


def read_datalist(path: str, key: str = "evaluation", data_root: str | None = None) -> tuple[list[dict], dict]:
    """Eval items ``[{image, label}]`` (paths resolved) and the datalist's extra entries (calibration, labels)."""
    with open(path) as f:
        data = json.load(f)
    root = data_root or os.path.dirname(os.path.abspath(path))
    extra: dict[str, Any] = {}
    if isinstance(data, dict):
        items = data.get(key)
        if items is None:
            raise ValueError(f"{path} has no '{key}' list; pass --datalist_key (keys: {list(data)})")
        extra = {k: v for k, v in data.items() if k != key}
    else:
        items = data

    def resolve(p: str | None) -> str | None:
        return None if p is None else (p if os.path.isabs(p) else os.path.join(root, p))

    items = [{"image": resolve(it["image"]), "label": resolve(it.get("label"))} for it in items]
    if isinstance(extra.get("calibration"), dict):
        extra["calibration"] = {k: resolve(v) for k, v in extra["calibration"].items() if k in ("image", "label")}
    return items, extra


def calibration_crop(
    image: torch.Tensor, label: torch.Tensor | None, roi: tuple[int, ...] | None, divisor: int = 16
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The bundle's calibration protocol: :class:`~monai_efficientq.transforms.CalibrationCrop`, a ROI centred on
    the body (non-zero voxels of the image), zero-padded up to ``roi`` and to multiples of ``divisor``.

    ``roi=None`` keeps the whole volume, padded up to multiples of ``divisor``. The label gets the same box.
    """
    from monai_efficientq.transforms import CalibrationCrop

    cropper = CalibrationCrop(roi, mode="foreground", divisible_by=divisor)
    starts, ends, pad_size = cropper.compute_box(image)
    crop = cropper.crop_with_box(image, starts, ends, pad_size)
    crop_label = cropper.crop_with_box(label, starts, ends, pad_size) if label is not None else None
    box = {"start": list(starts), "end": list(ends), "size": list(crop.shape[1:]), "volume": list(image.shape[1:]),
           "transform": f"CalibrationCrop(roi_size={roi}, mode='foreground', divisible_by={divisor})"}
    return crop, crop_label, box


# ---------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Sliding-window prediction and Dice (per class + mean) against labels and against the float prediction."""

    def __init__(
        self,
        cases: list[tuple[torch.Tensor, torch.Tensor | None]],
        roi_size: tuple[int, ...],
        overlap: float = 0.25,
        sw_batch_size: int = 1,
        prediction: str = "softmax",
        class_names: list[str] | None = None,
        device: str = "cpu",
    ) -> None:
        self.cases = cases
        self.roi_size = roi_size
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.prediction = prediction
        self.class_names = class_names
        self.device = torch.device(device)
        self.float_preds: list[torch.Tensor] | None = None

    @torch.no_grad()
    def predict(self, net: nn.Module, image: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        x = image[None].to(self.device)
        out = sliding_window_inference(x, self.roi_size, self.sw_batch_size, net, overlap=self.overlap)
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        if self.prediction == "sigmoid":
            return (out > 0).to(torch.uint8).cpu()
        n = out.shape[1]
        return torch.nn.functional.one_hot(out.argmax(1), n).movedim(-1, 1).to(torch.uint8).cpu()

    def _onehot_label(self, label: torch.Tensor, n: int) -> torch.Tensor:
        if self.prediction == "sigmoid":
            return label[None].to(torch.uint8)
        return torch.nn.functional.one_hot(label[0].long().clamp_min(0), n).movedim(-1, 0)[None].to(torch.uint8)

    def _names(self, n: int) -> list[str]:
        first = 0 if self.prediction == "sigmoid" else 1
        names = list(self.class_names or [])
        return [names[i] if i < len(names) else f"class{i}" for i in range(first, n)]

    def evaluate(self, net: nn.Module) -> dict[str, Any]:
        from monai.metrics import DiceMetric

        include_bg = self.prediction == "sigmoid"  # multi-label: every channel is a class
        vs_label = DiceMetric(include_background=include_bg, reduction="mean_batch")
        vs_float = DiceMetric(include_background=include_bg, reduction="mean_batch")
        t0 = time.perf_counter()
        net = net.eval()
        preds = []
        has_label = False
        for i, (image, label) in enumerate(self.cases):
            pred = self.predict(net, image)
            preds.append(pred)
            n = pred.shape[1]
            if label is not None:
                has_label = True
                vs_label(y_pred=pred.float(), y=self._onehot_label(label, n).float())
            if self.float_preds is not None:
                vs_float(y_pred=pred.float(), y=self.float_preds[i].float())
        names = self._names(preds[0].shape[1]) if preds else []
        result: dict[str, Any] = {"eval_seconds": time.perf_counter() - t0, "cases": len(self.cases)}
        if has_label:
            per = [_nan_to_none(v) for v in vs_label.aggregate().tolist()]
            result["dice"] = dict(zip(names, per))
            result["mean_dice"] = _nanmean(per)
        if self.float_preds is not None:
            per = [_nan_to_none(v) for v in vs_float.aggregate().tolist()]
            result["dice_vs_float"] = dict(zip(names, per))
            result["mean_dice_vs_float"] = _nanmean(per)
        result["_preds"] = preds
        return result


# ------------------------------------------------------------------------------------------- the float plan
@torch.no_grad()
def float_plan(net: nn.Module, x: torch.Tensor, fold_bn: bool = True) -> dict[str, Any]:
    """What every method shares: the BatchNorm pairs, the quantizable layers in execution order, the first and last
    layers by data flow (8-bit, float input for every method), the sign of each layer's float calibration input."""
    from monai_efficientq.folding import find_conv_bn_pairs, fold_batchnorm
    from monai_efficientq.dataflow import edge_layers
    from monai_efficientq.network import quantizable_layers

    work = copy.deepcopy(net).eval()
    pairs, _ = find_conv_bn_pairs(work, x)
    if fold_bn and pairs:
        fold_batchnorm(work, pairs)
    layers = quantizable_layers(work)
    order: list[str] = []
    signed: dict[str, bool] = {}
    hooks = []
    for name, module in layers.items():

        def hook(mod, inputs, output, name=name):
            if name not in signed:
                order.append(name)
                signed[name] = bool((inputs[0] < 0).any())

        hooks.append(module.register_forward_hook(hook))
    try:
        work(x)
    finally:
        for h in hooks:
            h.remove()
    types = {n: type(m).__name__ for n, m in layers.items()}
    first, last = edge_layers(work, x, {n: layers[n] for n in order})
    return {
        "edges": first + [n for n in last if n not in first],
        "bn_pairs": [list(p) for p in pairs],
        "order": order,
        "signed_input": signed,
        "types": types,
        "unreached": [n for n in layers if n not in signed],
    }


# ----------------------------------------------------------------------------------------------- ours
def quantize_ours(method: str, net: nn.Module, x: torch.Tensor, label: torch.Tensor | None,
                  wbits: int, abits: int | None, opts: dict[str, Any], workdir: str) -> tuple[nn.Module, dict]:
    from monai_efficientq import EfficientQConfig, quantize_network, save_quantized

    settings = {
        "iterations": int(opts["iterations"]), "first_last_bits": 8, "prediction": opts["prediction"],
        "device": opts["device"], "progress": False,
    }
    settings.update(opts.get("eq_options") or {})
    cfg = EfficientQConfig(
        weight_bits=wbits,
        act_bits=abits,
        method="rtn" if method == "rtn" else "efficientq",
        preset="original" if method == "eq_original" else "default",
        **settings,
    )
    t0 = time.perf_counter()
    qnet, report = quantize_network(net, x, cfg, label=label)
    _sync(torch.device(opts["device"]))
    seconds = time.perf_counter() - t0
    path = os.path.join(workdir, f"{method}_W{wbits}{'A' + str(abits) if abits else ''}.pt")
    save_quantized(qnet, path)
    size = os.path.getsize(path)
    if not opts["keep_checkpoints"]:
        os.remove(path)
    optimised = [r.name for r in report.layers if r.best_iteration >= 0] if method != "rtn" else []
    info = {
        "quant_seconds": seconds,
        "checkpoint_bytes": size,
        "checkpoint_kind": "save_quantized packed file",
        "checkpoint_path": path if opts["keep_checkpoints"] else None,
        "layers_total": len(report.layers),
        "layers_optimised": len(optimised),
        "layers_not_optimised": [
            f"{r.name} ({r.type})" for r in report.layers if r.name not in optimised
        ] if method != "rtn" else [],
        "layers_left_float": len(report.float_layers),
        "calib_error_rtn_mean": float(np.mean([r.rtn_error for r in report.layers])) if report.layers else None,
        "calib_error_mean": float(np.mean([r.error for r in report.layers])) if report.layers else None,
        "held_out_error_mean": _mean_of(report.layers, "held_out_error"),
        "held_out_rtn_error_mean": _mean_of(report.layers, "held_out_rtn_error"),
        "layers_kept_rtn": sum(r.best_iteration < 0 for r in report.layers),
        "calibration_shape": list(report.calibration_shape),
    }
    return qnet, info


# ------------------------------------------------------------------------------------------- Brevitas
def _brevitas_layer_map(kw: dict[str, Any]) -> dict:
    import brevitas.nn as qnn

    return {
        nn.Conv3d: (qnn.QuantConv3d, kw),
        nn.ConvTranspose3d: (qnn.QuantConvTranspose3d, kw),
        nn.Conv2d: (qnn.QuantConv2d, kw),
        nn.ConvTranspose2d: (qnn.QuantConvTranspose2d, kw),
        nn.Conv1d: (qnn.QuantConv1d, kw),
        nn.ConvTranspose1d: (qnn.QuantConvTranspose1d, kw),
        nn.Linear: (qnn.QuantLinear, kw),
    }


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _mean_of(records: list, field: str) -> float | None:
    values = [getattr(r, field) for r in records if getattr(r, field) is not None]
    return float(np.mean(values)) if values else None


def _learned_round(model: nn.Module, x: torch.Tensor, iterations: int, device: torch.device) -> list[str]:
    """Brevitas' layer-wise learned rounding (AdaRound-style) through brevitas_examples' trainer."""
    import functools

    from brevitas_examples.common.learned_round.learned_round_args import (
        HandlerSpec,
        LossArgs,
        OptimizerArgs,
        TrainerConfig,
        TrainingArgs,
    )
    from brevitas_examples.common.learned_round.learned_round_method import LearnedRoundArgs
    from brevitas_examples.common.learned_round.learned_round_trainer import LearnedRoundTrainer, get_blocks
    from brevitas_examples.imagenet_classification.ptq import learned_round_utils as lru

    use_amp = device.type == "cuda"
    config = TrainerConfig(
        training_args=TrainingArgs(
            optimizers_args=[
                OptimizerArgs(target_params="learned_round", optimizer_cls="Adam", lr=1e-3, optimizer_kwargs={})
            ],
            batch_size=1,
            iters=int(iterations),
            losses_args=[
                LossArgs(cls="round_reg", kwargs={"max_count": int(iterations)}),
                LossArgs(cls="mse", kwargs={"reduction": "none", "dim": 1}),
            ],
            loss_scaling_factor=1.0,
            use_best_model=False,
            use_amp=use_amp,
            amp_dtype="float16",
            fast_update=False,
        ),
        training_handlers=[
            HandlerSpec(
                name="learned_round",
                config=LearnedRoundArgs(learned_round_param="hard_sigmoid", learned_round_kwargs=None),
            )
        ],
    )
    import brevitas_examples.common.learned_round.learned_round_trainer as trainer_module

    trainer = LearnedRoundTrainer(config=config)
    out = io.StringIO()
    quiet_tqdm = functools.partial(trainer_module.tqdm, disable=True)
    with contextlib.redirect_stdout(out), _patched(trainer_module, "tqdm", quiet_tqdm):
        trainer.train(
            model=model,
            model_forward=lru.vision_forward,
            block_forward=lru.vision_block_forward,
            data_loader=[(x, None)],
            cache=lru.CacheVision(),
            get_blocks_fn=functools.partial(get_blocks, block_check_fn=lru.is_layer),
            keep_gpu=True,
        )
    return [line for line in out.getvalue().splitlines() if line.startswith("Quantized block")]


def quantize_brevitas(method: str, net: nn.Module, x: torch.Tensor, wbits: int, abits: int | None,
                      plan: dict[str, Any], opts: dict[str, Any], workdir: str) -> tuple[nn.Module, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from brevitas.graph.calibrate import bias_correction_mode, calibration_mode
        from brevitas.graph.gpfq import gpfq_mode
        from brevitas.graph.gptq import gptq_mode
        from brevitas.graph.quantize import layerwise_quantize
        from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
        from brevitas.quant import scaled_int, shifted_scaled_int

    from monai_efficientq.folding import fold_batchnorm

    device = torch.device(opts["device"])
    t0 = time.perf_counter()
    model = copy.deepcopy(net).eval()
    if opts["brevitas_fold_bn"] and plan["bn_pairs"]:
        fold_batchnorm(model, [tuple(p) for p in plan["bn_pairs"]])
    model.to(device)
    x = x.to(device)

    mse_w = opts["brevitas_weight_scale"] == "mse"
    mse_a = opts["brevitas_act_scale"] == "mse"
    w_base = scaled_int.Int8WeightPerChannelFloatMSE if mse_w else scaled_int.Int8WeightPerChannelFloat
    unsigned_a = scaled_int.Uint8ActPerTensorFloatMSE if mse_a else scaled_int.Uint8ActPerTensorFloat
    signed_a = (
        shifted_scaled_int.ShiftedUint8ActPerTensorFloatMSE if mse_a else shifted_scaled_int.ShiftedUint8ActPerTensorFloat
    )

    order = plan["order"]
    edge = set(plan["edges"])
    groups: list[tuple[dict[str, Any], set[str]]] = [
        ({"weight_quant": w_base.let(bit_width=8, narrow_range=False)}, edge)
    ]
    inner = [n for n in order if n not in edge]
    inner_w = w_base.let(bit_width=wbits, narrow_range=False)
    if abits is None:
        groups.append(({"weight_quant": inner_w}, set(inner)))
    else:
        pos = {n for n in inner if not plan["signed_input"][n]}
        neg = {n for n in inner if plan["signed_input"][n]}
        groups.append(({"weight_quant": inner_w, "input_quant": unsigned_a.let(bit_width=abits)}, pos))
        groups.append(({"weight_quant": inner_w, "input_quant": signed_a.let(bit_width=abits)}, neg))
    all_names = set(plan["types"])
    for kw, names in groups:
        if names:
            layerwise_quantize(model, compute_layer_map=_brevitas_layer_map(kw),
                               name_blacklist=sorted(all_names - names))
    model.eval()
    qlayers = {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)}
    missing = [n for n in order if n not in qlayers]
    if missing:
        raise RuntimeError(f"layerwise_quantize did not replace {missing}")
    with torch.no_grad():
        rtn_w = {n: m.quant_weight().value.detach().clone() for n, m in qlayers.items()}
        rtn_b = {n: m.bias.detach().clone() for n, m in qlayers.items() if m.bias is not None}

    notes: list[str] = []
    caught: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if abits is not None:
            with torch.no_grad(), calibration_mode(model):
                model(x)
        if method == "brevitas_biascorr":
            with torch.no_grad(), bias_correction_mode(model):
                model(x)
        elif method in ("brevitas_gptq", "brevitas_gpfq"):
            buf = "same" if device.type == "cuda" else "cpu"
            if method == "brevitas_gptq":
                ctx = gptq_mode(model, act_order=True, use_quant_activations=False, device=buf)
            else:
                ctx = gpfq_mode(model, act_order=True, use_quant_activations=True, device=buf)
            with torch.no_grad(), ctx as algo:
                for _ in range(algo.num_layers):
                    algo.model(x)
                    algo.update()
        elif method == "brevitas_learned_round":
            lines = _learned_round(model, x, opts["lr_iterations"], device)
            if lines:
                notes.append(f"learned round: {len(lines)} layers; last: {lines[-1]}")
            model.to(device)
        elif method != "brevitas_rtn":
            raise ValueError(method)
    model.eval()
    _sync(device)
    seconds = time.perf_counter() - t0
    for w in caught:
        text = str(w.message)
        if "fast_hadamard" in text or "deprecated" in text.lower():
            continue
        if text not in notes:
            notes.append(text)

    changed_w, changed_b, unchanged = [], [], []
    with torch.no_grad():
        for n, m in qlayers.items():
            wdiff = not torch.equal(m.quant_weight().value.detach().to(rtn_w[n].device), rtn_w[n])
            bdiff = n in rtn_b and m.bias is not None and not torch.equal(m.bias.detach().to(rtn_b[n].device), rtn_b[n])
            if wdiff:
                changed_w.append(n)
            if bdiff:
                changed_b.append(n)
            if not (wdiff or bdiff):
                unchanged.append(f"{n} ({plan['types'].get(n, type(m).__name__)})")
    path = os.path.join(workdir, f"{method}_W{wbits}{'A' + str(abits) if abits else ''}.pt")
    torch.save(model.state_dict(), path)
    size = os.path.getsize(path)
    if not opts["keep_checkpoints"]:
        os.remove(path)
    info = {
        "quant_seconds": seconds,
        "checkpoint_bytes": size,
        "checkpoint_kind": "torch.save(model.state_dict())",
        "checkpoint_path": path if opts["keep_checkpoints"] else None,
        "layers_total": len(qlayers),
        "layers_optimised": 0 if method == "brevitas_rtn" else len(set(changed_w) | set(changed_b)),
        "layers_weights_changed": len(changed_w),
        "layers_bias_changed": len(changed_b),
        "layers_not_optimised": [] if method == "brevitas_rtn" else unchanged,
        "brevitas_notes": notes,
    }
    return model, info


# ----------------------------------------------------------------------------------------- one table row
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(job: dict[str, Any]) -> dict[str, Any]:
    """Quantize (one method, one setting) and evaluate. Runs in-process or in a spawn child (``job`` is picklable)."""
    opts = job["opts"]
    if opts.get("threads"):
        torch.set_num_threads(int(opts["threads"]))
    method, setting = job["method"], job["setting"]
    wbits, abits = parse_setting(setting)
    device = torch.device(opts["device"])
    row: dict[str, Any] = {"method": method, "setting": setting, "weight_bits": wbits, "act_bits": abits}
    row["isolated"] = bool(job.get("isolated", False))
    evaluator: Evaluator = job["evaluator"]
    try:
        net = job["net"]
        x = job["x"]
        rss_before = _rss_now_mb()
        _reset_peak(device)
        if method in OURS:
            qnet, info = quantize_ours(method, net, x, job.get("label"), wbits, abits, opts, job["workdir"])
        elif method in BREVITAS:
            qnet, info = quantize_brevitas(method, net, x, wbits, abits, job["plan"], opts, job["workdir"])
        else:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if device.type == "cuda":
            row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["memory_kind"] = "CUDA max_memory_allocated during quantization"
        else:
            row["peak_memory_mb"] = _peak_rss_mb()
            row["rss_before_mb"] = rss_before
            row["memory_kind"] = (
                "peak RSS of a fresh spawn child, read right after quantization"
                if row["isolated"] else "process peak RSS so far (cumulative over rows)"
            )
        row.update(info)
        res = evaluator.evaluate(qnet)
        res.pop("_preds", None)
        row.update(res)
        row["status"] = "ok"
    except Exception as err:  # one failing row must not lose the others
        row["status"] = f"failed: {type(err).__name__}: {err}"
        row["traceback"] = traceback.format_exc(limit=8)
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    job = dict(job, isolated=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(run_row, job).result()


# -------------------------------------------------------------------------------------------- the table
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def to_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    rows = results["rows"]
    classes: list[str] = []
    for r in rows:
        for c in (r.get("dice") or {}):
            if c not in classes:
                classes.append(c)
    head = ["method", "setting"] + [f"Dice {c}" for c in classes] + [
        "mean Dice", "Dice vs float", "quant s", "peak MB", "checkpoint KiB", "layers optimised", "status"]
    lines = [
        f"# Quantization comparison: {meta.get('network')}",
        "",
        f"- float checkpoint: `{meta.get('checkpoint')}`; calibration: `{meta.get('calib_image')}` crop "
        f"{meta.get('calib_crop', {}).get('size')} (foreground-centred, from {meta.get('calib_crop', {}).get('volume')}; "
        f"{meta.get('calib_crop', {}).get('transform', 'crop')})",
        f"- evaluation: {meta.get('eval_cases')} case(s), sliding window roi {meta.get('roi_size')}, overlap "
        f"{meta.get('overlap')}, DiceMetric(include_background={meta.get('include_background')}, "
        f"reduction='mean_batch')",
        f"- device {meta.get('device')}, threads {meta.get('threads')}, EfficientQ iterations {meta.get('iterations')}, "
        f"Brevitas learned-round iterations {meta.get('lr_iterations')}; first/last quantized layers (by data flow: "
        f"{', '.join(meta.get('edge_layers') or [])}) W8 with float input for every method",
        f"- options of our rows: {json.dumps(meta.get('eq_options') or {})}",
        f"- peak memory: {meta.get('memory_note')}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        ok = r.get("status") == "ok"
        opt = (f"{r.get('layers_optimised')}/{r.get('layers_total')}" if r.get("layers_total") is not None else "–")
        ckpt = r.get("checkpoint_bytes")
        cells = [r["method"], r["setting"]] + [_fmt((r.get("dice") or {}).get(c)) for c in classes] + [
            _fmt(r.get("mean_dice")), _fmt(r.get("mean_dice_vs_float")), _fmt(r.get("quant_seconds"), 1),
            _fmt(r.get("peak_memory_mb"), 0), _fmt(ckpt / 1024 if ckpt else None, 1), opt,
            "ok" if ok else str(r.get("status")).replace("|", "/")[:160],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [(r["method"], r["setting"], n) for r in rows for n in (r.get("layers_not_optimised") or [])]
    if skipped:
        lines += ["", "## Layers not optimised (left at round-to-nearest)", ""]
        by_row: dict[tuple[str, str], list[str]] = {}
        for m, s, n in skipped:
            by_row.setdefault((m, s), []).append(n)
        for (m, s), names in by_row.items():
            lines.append(f"- {m} {s}: {', '.join(names[:12])}{' …' if len(names) > 12 else ''}")
    notes = sorted({n for r in rows for n in (r.get("brevitas_notes") or [])})
    if notes:
        lines += ["", "## Brevitas messages", ""] + [f"- {n}" for n in notes]
    lines += ["", "## How the Brevitas rows are built", ""] + [f"- {n}" for n in meta.get("brevitas_notes", [])]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- commands
def compare(
    net: nn.Module,
    calib_image: torch.Tensor | list[torch.Tensor],
    eval_cases: list[tuple[torch.Tensor, torch.Tensor | None]],
    calib_label: torch.Tensor | None = None,
    methods: Any = METHODS,
    settings: Any = DEFAULT_SETTINGS,
    out: str | None = "results.json",
    markdown: str | None = None,
    roi_size: Any = 96,
    calib_roi: Any = 96,
    divisor: int = 16,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    iterations: int = 200,
    lr_iterations: int = 200,
    prediction: str = "softmax",
    class_names: list[str] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    isolate: Any = "auto",
    keep_checkpoints: bool = False,
    checkpoint_dir: str | None = None,
    brevitas_fold_bn: bool = True,
    brevitas_weight_scale: str = "stats",
    brevitas_act_scale: str = "mse",
    eq_options: Any = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the comparison on tensors (the CLI ``run`` loads them from NIfTI). Returns the results dict."""
    if threads:
        torch.set_num_threads(int(threads))
    methods = _as_list(methods)
    settings = [s.upper() for s in _as_list(settings)]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for s in settings:
        parse_setting(s)
    if int(lr_iterations) < 200 and "brevitas_learned_round" in methods:
        _log(f"note: learned rounding with {lr_iterations} iterations per layer (< 200, the benchmark's minimum)")
    dev = torch.device(device)
    if isolate == "auto":
        isolate = dev.type == "cpu"
    isolate = bool(isolate)
    net = net.eval().cpu()
    images = list(calib_image) if isinstance(calib_image, (list, tuple)) else [calib_image]
    labels = list(calib_label) if isinstance(calib_label, (list, tuple)) else [calib_label] * len(images)
    dims = images[0].dim() - 1
    roi = _spatial_tuple(roi_size, dims)
    crops = [calibration_crop(im, lab, _spatial_tuple(calib_roi, dims), divisor) for im, lab in zip(images, labels)]
    box = crops[0][2]
    x = torch.stack([c[0] for c in crops])  # several calibration volumes: one batch (same crop size)
    label = torch.stack([c[1] for c in crops]) if all(c[1] is not None for c in crops) else None
    opts = {
        "iterations": int(iterations), "lr_iterations": int(lr_iterations), "prediction": prediction,
        "device": str(dev), "threads": threads, "keep_checkpoints": bool(keep_checkpoints),
        "brevitas_fold_bn": bool(brevitas_fold_bn), "brevitas_weight_scale": brevitas_weight_scale,
        "brevitas_act_scale": brevitas_act_scale, "eq_options": _as_dict(eq_options),
    }
    workdir = checkpoint_dir or tempfile.mkdtemp(prefix="compare_ckpt_")
    os.makedirs(workdir, exist_ok=True)
    try:
        has_brevitas = brevitas_available()
        versions = {"torch": torch.__version__, "python": platform.python_version()}
        for mod in ("monai", "brevitas", "monai_efficientq"):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    versions[mod] = importlib.import_module(mod).__version__
            except Exception:
                versions[mod] = None
        plan = float_plan(net, x, fold_bn=True)
        plan_brevitas = plan if brevitas_fold_bn else float_plan(net, x, fold_bn=False)
        memory_note = (
            "CUDA max_memory_allocated of the quantization step (reset before each row)" if dev.type == "cuda" else
            ("CPU: peak RSS of a fresh spawn child per row, read right after quantization (rss_before_mb: the child's "
             "RSS before quantizing)" if isolate else "CPU: process peak RSS, cumulative over rows (run with --isolate "
             "True for a clean per-row peak)")
        )
        results: dict[str, Any] = {
            "meta": {
                **(meta or {}),
                "methods": methods, "settings": settings, "device": str(dev), "threads": torch.get_num_threads(),
                "iterations": int(iterations), "lr_iterations": int(lr_iterations), "prediction": prediction,
                "roi_size": list(roi), "overlap": overlap, "sw_batch_size": sw_batch_size,
                "include_background": prediction == "sigmoid", "calib_crop": box, "calib_shape": list(x.shape),
                "eval_cases": len(eval_cases), "class_names": class_names, "isolate": isolate,
                "memory_note": memory_note, "versions": versions, "float_bytes": sum(
                    t.numel() * t.element_size() for t in net.state_dict().values()),
                "quantized_layers": plan["order"], "edge_layers": plan["edges"], "folded_batchnorm": plan["bn_pairs"],
                "brevitas_fold_bn": bool(brevitas_fold_bn), "brevitas_weight_scale": brevitas_weight_scale,
                "brevitas_act_scale": brevitas_act_scale, "brevitas_notes": BREVITAS_NOTES,
                "checkpoint_dir": workdir if keep_checkpoints else None, "eq_options": opts["eq_options"],
            },
            "rows": [],
        }
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        results["meta"]["float_checkpoint_bytes"] = buf.tell()
        md_path = markdown or (os.path.splitext(out)[0] + ".md" if out else None)

        def flush() -> None:
            if out:
                _write_text(out, json.dumps(results, indent=2, default=str))
            if md_path:
                _write_text(md_path, to_markdown(results))

        evaluator = Evaluator(eval_cases, roi, overlap, sw_batch_size, prediction, class_names, str(dev))
        _log(f"float evaluation on {len(eval_cases)} case(s)")
        net_dev = copy.deepcopy(net).to(dev)
        float_res = evaluator.evaluate(net_dev)
        evaluator.float_preds = float_res.pop("_preds")
        del net_dev
        float_row = {
            "method": "float", "setting": "float", "weight_bits": 32, "act_bits": None, "status": "ok",
            "checkpoint_bytes": results["meta"]["float_checkpoint_bytes"], "checkpoint_kind": "torch.save(state_dict)",
            "quant_seconds": 0.0, **float_res,
        }
        float_row["dice_vs_float"] = {k: 1.0 for k in float_res.get("dice", {})} or None
        float_row["mean_dice_vs_float"] = 1.0
        results["rows"].append(float_row)
        flush()
        _log(f"float: mean Dice {_fmt(float_row.get('mean_dice'))}")

        for setting in settings:
            for method in methods:
                if method == "float":
                    continue
                if method in BREVITAS and not has_brevitas:
                    results["rows"].append({"method": method, "setting": setting, "status":
                                            "not run: brevitas is not installed (pip install -e .[bench])"})
                    flush()
                    continue
                job = {
                    "method": method, "setting": setting, "net": net, "x": x, "label": label,
                    "plan": plan_brevitas if method in BREVITAS else plan, "opts": opts, "evaluator": evaluator,
                    "workdir": workdir,
                }
                _log(f"{method} {setting} ...")
                row = _run_isolated(job) if isolate else run_row(job)
                results["rows"].append(row)
                flush()
                _log(
                    f"{method} {setting}: {row['status'][:200]} mean Dice {_fmt(row.get('mean_dice'))} vs float "
                    f"{_fmt(row.get('mean_dice_vs_float'))} in {_fmt(row.get('quant_seconds'), 1)} s"
                )
        flush()
        return results
    finally:
        if checkpoint_dir is None and not keep_checkpoints:
            shutil.rmtree(workdir, ignore_errors=True)


def run(
    network: str | None = None,
    network_kwargs: Any = None,
    config_file: Any = None,
    network_id: str = "network_def",
    bundle_root: str | None = None,
    checkpoint: str | None = None,
    calib_image: str | None = None,
    calib_label: str | None = None,
    eval_datalist: str | None = None,
    datalist_key: str = "evaluation",
    data_root: str | None = None,
    max_eval_cases: int | None = None,
    normalize: str = "nonzero",
    methods: Any = ",".join(METHODS),
    settings: Any = ",".join(DEFAULT_SETTINGS),
    out: str = "results.json",
    markdown: str | None = None,
    roi_size: Any = 96,
    calib_roi: Any = 96,
    divisor: int = 16,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    iterations: int = 200,
    lr_iterations: int = 200,
    prediction: str = "softmax",
    class_names: Any = None,
    device: str = "cpu",
    threads: int | None = None,
    isolate: Any = "auto",
    keep_checkpoints: bool = False,
    checkpoint_dir: str | None = None,
    brevitas_fold_bn: bool = True,
    brevitas_weight_scale: str = "stats",
    brevitas_act_scale: str = "mse",
    eq_options: Any = None,
) -> str:
    """Compare the methods on a trained network and NIfTI data; writes ``out`` (JSON) and a Markdown table.

    Args:
        network: dotted class path of the network (e.g. ``monai.networks.nets.SegResNet``), with ``network_kwargs``
            (JSON object); or ``config_file`` (MONAI bundle config, a list merges) and ``network_id``.
        checkpoint: the float state dict (``torch.save(net.state_dict())``; a dict with ``state_dict`` works too).
        calib_image, calib_label: the calibration volume (NIfTI) and optionally its label (cropped with the image's
            box); comma-separated paths calibrate on several volumes together. Default: the datalist's
            ``calibration``.
        eval_datalist: JSON list of ``{"image", "label"}`` NIfTI paths, or a dict holding one under
            ``datalist_key`` (relative paths are resolved against the file's folder or ``data_root``).
        normalize: ``nonzero`` (z-score over each channel's non-zero voxels, default), ``all``, ``minmax``, ``none``
            (as the package's CLI).
        methods, settings: comma-separated lists (see the module docstring).
        roi_size: sliding-window size (int or comma-separated); calib_roi: calibration crop, the bundle's protocol
            (``CalibrationCrop``: centred on the body, padded up to the ROI and to multiples of ``divisor``; default
            96 as the bundle's ``calib_roi_size``; ``full`` keeps the whole volume).
        iterations: EfficientQ ADMM iterations per layer; lr_iterations: Brevitas learned-rounding iterations per layer.
        prediction: ``softmax`` (argmax, Dice without background) or ``sigmoid`` (multi-label, every channel).
        device: ``cpu`` or ``cuda``; threads: torch intra-op threads.
        isolate: run each row in a spawn child for a clean peak RSS (``auto``: on CPU only).
        brevitas_fold_bn / brevitas_weight_scale (``stats``|``mse``) / brevitas_act_scale (``mse``|``stats``):
            how the Brevitas rows are set up (see ``BREVITAS_NOTES``).
        eq_options: JSON object of ``EfficientQConfig`` fields for our rows (``rtn``, ``eq_*``), e.g.
            ``'{"eta_factor": 10}'``; they override the preset.
    """
    if threads:
        torch.set_num_threads(int(threads))
    net = build_network(network, network_kwargs, config_file, network_id, bundle_root)
    if checkpoint:
        load_float_checkpoint(net, checkpoint)
    else:
        _log("warning: no --checkpoint: the network keeps its random initial weights")
    items: list[dict] = []
    extra: dict[str, Any] = {}
    if eval_datalist:
        items, extra = read_datalist(eval_datalist, datalist_key, data_root)
        if max_eval_cases:
            items = items[: int(max_eval_cases)]
    if calib_image is None:
        calib = extra.get("calibration") or {}
        calib_image, calib_label = calib.get("image"), calib_label or calib.get("label")
    if calib_image is None:
        raise ValueError("give --calib_image (or a datalist with a 'calibration' entry).")
    names = _as_list(class_names) if class_names else None
    if names is None and isinstance(extra.get("labels"), dict):
        labels = extra["labels"]
        names = [labels.get(str(i), f"class{i}") for i in range(len(labels))]
    calib_paths = _as_list(calib_image)
    image = [load_volume(path, normalize) for path in calib_paths]
    label = [load_volume(path, is_label=True) for path in _as_list(calib_label)] if calib_label else None
    if label is not None and len(label) != len(image):
        raise ValueError(f"{len(image)} calibration images but {len(label)} labels: give one label per image.")
    cases = [(load_volume(it["image"], normalize), load_volume(it["label"], is_label=True) if it.get("label") else None)
             for it in items]
    if not cases:
        _log("no --eval_datalist: evaluating on the whole calibration volume")
        cases = [(image[0], label[0] if label else None)]
    meta = {
        "network": network or f"{config_file}#{network_id}", "network_kwargs": _as_dict(network_kwargs)
        if not config_file else None, "checkpoint": checkpoint, "calib_image": calib_image,
        "calib_label": calib_label, "eval_datalist": eval_datalist, "normalize": normalize,
        "eval_images": [it["image"] for it in items], "command": " ".join(sys.argv),
    }
    compare(
        net, image, cases, calib_label=label, methods=methods, settings=settings, out=out, markdown=markdown,
        roi_size=roi_size, calib_roi=calib_roi, divisor=divisor, overlap=overlap, sw_batch_size=sw_batch_size,
        iterations=iterations, lr_iterations=lr_iterations, prediction=prediction, class_names=names,
        device=device, threads=threads, isolate=isolate, keep_checkpoints=keep_checkpoints,
        checkpoint_dir=checkpoint_dir, brevitas_fold_bn=brevitas_fold_bn,
        brevitas_weight_scale=brevitas_weight_scale, brevitas_act_scale=brevitas_act_scale, eq_options=eq_options,
        meta=meta,
    )
    md = markdown or os.path.splitext(out)[0] + ".md"
    with open(md, encoding="utf-8") as f:
        print(f.read())
    return out


# ------------------------------------------------------------------------------------------------ timing
def brats_segresnet(seed: int = 0) -> nn.Module:
    """The BraTS bundle's SegResNet (blocks_down 1,2,2,4, init_filters 16, 4 in, 3 out), random weights."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(seed)
    return SegResNet(
        spatial_dims=3, in_channels=4, out_channels=3, init_filters=16, blocks_down=(1, 2, 2, 4),
        blocks_up=(1, 1, 1), dropout_prob=0.2,
    ).eval()


def synthetic_volume(size: int, channels: int = 4, seed: int = 0) -> torch.Tensor:
    """A (C, S, S, S) volume: z-scored noise inside a centred ellipsoid ("brain"), exact zeros outside."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(channels, size, size, size, generator=gen)
    g = torch.linspace(-1, 1, size)
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    inside = (zz / 0.85) ** 2 + (yy / 0.75) ** 2 + (xx / 0.8) ** 2 <= 1
    return x * inside


def timing(
    size: int = 128,
    device: str | None = None,
    methods: Any = "eq_default,brevitas_gptq,brevitas_learned_round",
    setting: str = "W2A2",
    iterations: int = 200,
    lr_iterations: int = 200,
    threads: int | None = None,
    out: str | None = None,
) -> None:
    """Quantization time (and peak memory) of the BraTS-config SegResNet on one 4 x size^3 volume.

    Ours runs ``EfficientQConfig(weight_bits=W, act_bits=A, prediction="sigmoid")`` (the BraTS net is multi-label);
    Brevitas rows are set up as in ``run`` (activation calibration, then GPTQ / learned rounding). No Dice.
    """
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wbits, abits = parse_setting(setting)
    net = brats_segresnet()
    x = synthetic_volume(int(size))[None]
    opts = {
        "iterations": int(iterations), "lr_iterations": int(lr_iterations), "prediction": "sigmoid",
        "device": str(dev), "threads": threads, "keep_checkpoints": False, "brevitas_fold_bn": True,
        "brevitas_weight_scale": "stats", "brevitas_act_scale": "mse",
    }
    workdir = tempfile.mkdtemp(prefix="compare_timing_")
    try:
        with torch.no_grad():  # warm-up (CUDA context, cuDNN) outside the timed region
            copy.deepcopy(net).to(dev)(x.to(dev))
        plan = float_plan(copy.deepcopy(net).to(dev), x.to(dev), fold_bn=True)
        report: dict[str, Any] = {
            "network": "SegResNet(blocks_down=(1,2,2,4), init_filters=16, in 4, out 3), random weights",
            "parameters": sum(p.numel() for p in net.parameters()), "input": list(x.shape), "setting": setting,
            "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(), "iterations": int(iterations), "lr_iterations": int(lr_iterations),
            "layers": len(plan["order"]), "rows": [],
        }
        print(f"timing: {report['network']}, {report['parameters'] / 1e6:.2f} M params, {report['layers']} layers, "
              f"input {tuple(x.shape)}, {setting}, on {dev}", flush=True)
        for method in _as_list(methods):
            rss0 = _rss_now_mb()
            _reset_peak(dev)
            try:
                if method in OURS:
                    _, info = quantize_ours(method, net, x, None, wbits, abits, opts, workdir)
                elif method in BREVITAS:
                    _, info = quantize_brevitas(method, net, x, wbits, abits, plan, opts, workdir)
                else:
                    raise ValueError(f"unknown method {method!r}")
                seconds = info["quant_seconds"]
                peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mb()
                row = {"method": method, "seconds": seconds, "peak_memory_mb": peak, "status": "ok",
                       "layers_optimised": info.get("layers_optimised"), "layers_total": info.get("layers_total")}
                print(f"{method:>24s} {setting}: {seconds:8.1f} s   peak {peak:8.0f} MB"
                      f"{'' if dev.type == 'cuda' else ' (process RSS, cumulative; was ' + format(rss0, '.0f') + ' MB before)'}"
                      f"   layers optimised {row['layers_optimised']}/{row['layers_total']}", flush=True)
            except Exception as err:
                row = {"method": method, "status": f"failed: {type(err).__name__}: {err}",
                       "traceback": traceback.format_exc(limit=8)}
                print(f"{method:>24s} {setting}: FAILED {type(err).__name__}: {err}", flush=True)
            report["rows"].append(row)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if out:
            _write_text(out, json.dumps(report, indent=2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    import fire

    for message in ("fast_hadamard_transform", "Computing zero point of output accumulator", "Named tensors",
                    "Positional args are being deprecated"):
        warnings.filterwarnings("ignore", message=f".*{message}.*")

    fire.Fire({"run": run, "timing": timing})


if __name__ == "__main__":
    main()
