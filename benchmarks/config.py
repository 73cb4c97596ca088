"""The settings of one comparison run, and the quantization settings (``W2``, ``W4A4``, ...) it covers.

:class:`CompareConfig` holds what ``compare.py run`` is given: each of its fields is one flag of the command
(:func:`command_signature` turns the fields into the command's keyword arguments). Values arrive as the command
line parses them (``"rtn,eq_default"`` or a tuple, JSON text or a dict) and are normalised once, here.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_SETTINGS",
    "CompareConfig",
    "Setting",
    "as_dict",
    "as_list",
    "command_signature",
    "spatial_size",
]

DEFAULT_SETTINGS = ("W4", "W3", "W2", "W4A4", "W3A3", "W2A2")
PREDICTIONS = ("softmax", "sigmoid")
SCALE_CHOICES = ("stats", "mse")
JSON_LITERALS = {"true": True, "false": False, "null": None}


@dataclass(frozen=True)
class Setting:
    """Bits of the inner layers: ``W2`` (2-bit weights, float activations) or ``W2A2`` (2-bit inputs too).

    Attributes:
        name: the upper-case name, e.g. ``"W4A4"``.
        weight_bits: weight bits.
        act_bits: activation (layer input) bits, ``None`` for float activations.
    """

    name: str
    weight_bits: int
    act_bits: int | None

    @classmethod
    def parse(cls, name: str) -> Setting:
        """``"W2A2"`` -> ``Setting("W2A2", 2, 2)``, ``"w4"`` -> ``Setting("W4", 4, None)``.

        Args:
            name: ``W<bits>`` or ``W<bits>A<bits>``.
        """
        text = str(name).strip().upper()
        weights, with_acts, acts = text[1:].partition("A")
        if not text.startswith("W") or not weights.isdigit() or (with_acts and not acts.isdigit()):
            raise ValueError(f"setting {name!r}: expected W<bits> or W<bits>A<bits>, e.g. W2 or W2A2")
        return cls(text, int(weights), int(acts) if acts else None)


def as_list(value: Any) -> list[str]:
    """A comma-separated text (``"a,b"``, ``"[a, b]"``) or a sequence as a list of strings; ``None`` -> ``[]``.

    Args:
        value: what the command line gave.
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        return [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
    return [str(v) for v in value]


def as_dict(value: Any) -> dict[str, Any]:
    """A JSON object given as text or already parsed by the command line; ``None`` or ``""`` -> ``{}``.

    fire parses ``{"holdout": false}`` itself but leaves JSON's ``true``/``false``/``null`` as strings; those
    become ``True``/``False``/``None``.

    Args:
        value: what the command line gave.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {k: JSON_LITERALS.get(v, v) if isinstance(v, str) else v for k, v in value.items()}
    parsed = json.loads(value)
    if not isinstance(parsed, dict):
        raise ValueError(f"expected a JSON object, got {value!r}")
    return parsed


def spatial_size(value: Any, dims: int) -> tuple[int, ...] | None:
    """A spatial size per dimension from an int, a comma-separated text or a sequence; ``full``/``None`` -> ``None``.

    Args:
        value: the size as given (one number applies to every dimension).
        dims: number of spatial dimensions.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "full", "none")):
        return None
    if isinstance(value, str):
        value = [int(v) for v in value.strip("[]()").split(",") if v.strip()]
    if isinstance(value, int):
        return (int(value),) * dims
    sizes = tuple(int(v) for v in value)
    if len(sizes) == 1:
        return sizes * dims
    if len(sizes) != dims:
        raise ValueError(f"expected {dims} sizes, got {sizes}")
    return sizes


@dataclass
class CompareConfig:
    """The settings of one comparison run: which network, data, methods and settings, and how to run them.

    Args:
        network: dotted class path of the network (e.g. ``monai.networks.nets.SegResNet``), with
            ``network_kwargs`` (JSON object); or ``config_file`` (a MONAI bundle config) and ``network_id``.
        network_kwargs: constructor arguments of ``network``.
        config_file: a MONAI bundle config (comma-separated files are merged).
        network_id: id of the network definition in ``config_file``.
        bundle_root: ``bundle_root`` of the bundle config.
        checkpoint: the float state dict (``None``: random weights, with a warning).
        calib_image: calibration volume(s), comma-separated; default: the datalist's ``calibration`` item.
        calib_label: their labels (one per image), cropped with the image's box.
        eval_datalist: JSON datalist of ``{"image", "label"}`` items under ``datalist_key`` (relative paths
            against its folder or ``data_root``); its ``labels`` entry names the classes.
        datalist_key: the section of ``eval_datalist`` to evaluate on.
        data_root: folder that relative datalist paths are relative to.
        max_eval_cases: evaluate on the first so many items only.
        normalize: intensity normalisation, one of :data:`monai_efficientq.io.NORMALIZE_MODES`.
        class_names: names of the classes, comma-separated (default: the datalist's ``labels``).
        methods: methods to compare, comma-separated (see :func:`benchmarks.methods.method_names`; ``float``
            is always evaluated as the reference). ``None``: all.
        settings: settings to run, comma-separated (``W4,W2A2``).
        iterations: EfficientQ ADMM iterations per layer.
        lr_iterations: Brevitas learned-rounding iterations per layer.
        eq_options: :class:`~monai_efficientq.config.EfficientQConfig` fields for our rows (JSON object); they
            override the preset.
        brevitas_fold_bn: fold BatchNorm into the convolutions before Brevitas (as ours does).
        brevitas_weight_scale: Brevitas weight scale, ``stats`` (abs-max) or ``mse``.
        brevitas_act_scale: Brevitas activation scale, ``mse`` or ``stats`` (percentile).
        calib_roi: calibration crop (the bundle's ``CalibrationCrop``: centred on the body, padded up to the
            ROI and to multiples of ``divisor``); ``full`` keeps the whole volume.
        divisor: the crop's sides are padded to multiples of this.
        roi_size: sliding-window size of the evaluation.
        overlap: sliding-window overlap.
        sw_batch_size: sliding-window batch size.
        prediction: ``softmax`` (argmax, Dice without background) or ``sigmoid`` (multi-label, every channel).
        device: ``cpu`` or ``cuda``.
        threads: torch intra-op threads.
        isolate: run each quantized row in a fresh process for its own peak RSS (``auto``: on CPU only).
        out: the results JSON.
        markdown: the Markdown table (default: ``out`` with ``.md``).
        keep_checkpoints: keep the quantized checkpoints (in ``checkpoint_dir``).
        checkpoint_dir: where the checkpoints are written (default: a temporary folder).
    """

    network: str | None = None
    network_kwargs: Any = None
    config_file: Any = None
    network_id: str = "network_def"
    bundle_root: str | None = None
    checkpoint: str | None = None
    calib_image: Any = None
    calib_label: Any = None
    eval_datalist: str | None = None
    datalist_key: str = "evaluation"
    data_root: str | None = None
    max_eval_cases: int | None = None
    normalize: str = "nonzero"
    class_names: Any = None
    methods: Any = None
    settings: Any = ",".join(DEFAULT_SETTINGS)
    iterations: int = 200
    lr_iterations: int = 200
    eq_options: Any = None
    brevitas_fold_bn: bool = True
    brevitas_weight_scale: str = "stats"
    brevitas_act_scale: str = "mse"
    calib_roi: Any = 96
    divisor: int = 16
    roi_size: Any = 96
    overlap: float = 0.25
    sw_batch_size: int = 1
    prediction: str = "softmax"
    device: str = "cpu"
    threads: int | None = None
    isolate: Any = "auto"
    out: str | None = "results.json"
    markdown: str | None = None
    keep_checkpoints: bool = False
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        from .methods import check_method_names

        self.methods = check_method_names(as_list(self.methods) or None)
        self.settings = [Setting.parse(s).name for s in as_list(self.settings)]
        self.network_kwargs = as_dict(self.network_kwargs) if self.network_kwargs is not None else None
        self.config_file = as_list(self.config_file) or None
        self.calib_image = as_list(self.calib_image)
        self.calib_label = as_list(self.calib_label)
        self.class_names = as_list(self.class_names) or None
        self.eq_options = _checked_eq_options(as_dict(self.eq_options))
        self.iterations, self.lr_iterations = int(self.iterations), int(self.lr_iterations)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("brevitas_weight_scale", self.brevitas_weight_scale, SCALE_CHOICES)
        _check_choice("brevitas_act_scale", self.brevitas_act_scale, SCALE_CHOICES)

    @property
    def setting_list(self) -> list[Setting]:
        """The settings as :class:`Setting` objects, in the given order."""
        return [Setting.parse(s) for s in self.settings]

    @property
    def isolated(self) -> bool:
        """Whether each quantized row runs in a fresh process (``isolate="auto"``: on CPU only)."""
        if str(self.isolate).lower() == "auto":
            return self.device.startswith("cpu")
        return str(self.isolate).lower() not in ("false", "0", "no", "none")

    @property
    def markdown_path(self) -> str | None:
        """Where the Markdown table goes: ``markdown``, else ``out`` with ``.md``."""
        if self.markdown:
            return self.markdown
        return os.path.splitext(self.out)[0] + ".md" if self.out else None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name}={value!r} is not supported: use one of {', '.join(choices)}.")


def _checked_eq_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` if every key is a field of ``EfficientQConfig`` (except the bits and method our rows set)."""
    from monai_efficientq import EfficientQConfig

    fields = {f.name for f in dataclasses.fields(EfficientQConfig)} - {"weight_bits", "act_bits", "method", "preset"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"--eq_options: {unknown} are not EfficientQConfig fields; valid: {', '.join(sorted(fields))}.")
    return options


def command_signature() -> inspect.Signature:
    """The keyword-only signature ``(*, network=None, ...)`` of the fields of :class:`CompareConfig`, so a command
    taking ``**flags`` shows (and only accepts) them."""
    params = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
        for f in dataclasses.fields(CompareConfig)
    ]
    return inspect.Signature(params)
