"""Configuration of one quantization run: :class:`EfficientQConfig` and its presets."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EfficientQConfig", "PRESETS", "RUNTIME_ONLY", "SUPPORTED_BITS", "parse_size_budget"]

SUPPORTED_BITS = range(2, 9)
#: Widths a size-budgeted run may give a layer's weights (1 bit: the no-zero grid's two levels ``{-a, a}``).
MIXED_BITS = range(1, 9)
GRIDS = ("nozero", "int")
METHODS = ("efficientq", "rtn")
SCALE_MODES = ("tensor", "channel")
ATTENTION_MODES = ("prediction", "label", "none")
PREDICTION_TYPES = ("softmax", "sigmoid")
ERROR_MODES = ("weighted", "unweighted")
ACT_MODES = ("auto", "unsigned")
ACT_FITS = ("ls", "output")
SOLVERS = ("auto", "cholesky", "woodbury", "naive")
RHO_SCHEDULES = ("after", "before")
CLASS_WEIGHT_MODES = ("real", "integer")

#: Settings that change how a run goes but not what it computes (the codes are bit-identical either way): they
#: stay out of the config stored in a packed checkpoint, so they change neither its bytes nor, under a size budget,
#: the widths chosen.
RUNTIME_ONLY: tuple[str, ...] = ("progress", "target_device")

# Choices that differ between the faithful reproduction of the published code ("original") and ours
# ("default"). Everything else is shared.
PRESETS: dict[str, dict[str, Any]] = {
    "original": {
        "weight_scale": "tensor",
        "weight_grid": "nozero",
        "best_iterate_error": "unweighted",
        "act_mode": "unsigned",
        "act_fit": "ls",
        "rtn_candidate": False,
        "rho_schedule": "after",
        "class_weights": "integer",
        "calib_augment": 0,
        "holdout": False,
    },
    "default": {
        "weight_scale": "channel",
        "weight_grid": "nozero",
        "best_iterate_error": "weighted",
        "act_mode": "auto",
        "act_fit": "output",
        "rtn_candidate": True,
        "rho_schedule": "before",
        "class_weights": "real",
        "calib_augment": 2,
        "holdout": True,
    },
}


#: The choice fields and their allowed values.
_CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "weight_scale": SCALE_MODES,
    "weight_grid": GRIDS,
    "act_mode": ACT_MODES,
    "act_fit": ACT_FITS,
    "best_iterate_error": ERROR_MODES,
    "attention": ATTENTION_MODES,
    "prediction": PREDICTION_TYPES,
    "solver": SOLVERS,
    "rho_schedule": RHO_SCHEDULES,
    "class_weights": CLASS_WEIGHT_MODES,
    "solver_dtype": ("float64", "float32"),
    "act_fit_volumes": ("all", "given"),
}


_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 2**10, "mb": 1000**2, "mib": 2**20, "gb": 1000**3, "gib": 2**30}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size_budget(value: int | str, float_bytes: int | None = None) -> int:
    """A size budget in bytes.

    Args:
        value: bytes as an int, or a text: a number with a unit (``"400KiB"``, ``"1.5MB"``, ``"300000B"``;
            KB/MB/GB are powers of 1000, KiB/MiB/GiB powers of 1024), or a compression ratio of the float size
            (``"16x"``: ``float_bytes / 16``).
        float_bytes: the float size a ratio refers to (``None``: only check that the text is valid).

    Returns:
        the budget in whole bytes (rounded down), or ``0`` for a ratio when ``float_bytes`` is ``None``.

    Raises:
        ValueError: a value that is not a positive size or ratio.
    """
    hint = 'give bytes (e.g. 409600) or a text like "400KiB", "1.5MB" or "16x" (16 times smaller than float)'
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"size_budget={value!r} is not a size: {hint}.")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"size_budget={value!r} must be a positive number of bytes: {hint}.")
        return value
    match = _SIZE_PATTERN.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or (unit not in _SIZE_UNITS and unit != "x"):
        raise ValueError(f"size_budget={value!r} is not a size: {hint}; units: B, KB, KiB, MB, MiB, GB, GiB.")
    number = float(match.group(1))
    if number <= 0:
        raise ValueError(f"size_budget={value!r} must be positive: {hint}.")
    if unit == "x":
        if number < 1:
            raise ValueError(f"size_budget={value!r}: a ratio below 1x would be larger than the float network.")
        return 0 if float_bytes is None else int(math.floor(float_bytes / number))
    budget = int(math.floor(number * _SIZE_UNITS[unit]))
    if budget < 1:
        raise ValueError(f"size_budget={value!r} is less than one byte: {hint}.")
    return budget


def _check_bits_choices(choices: Any, grid: str) -> tuple[int, ...]:
    """``choices`` (ints, or a comma-separated text such as ``"2,3,4,8"``) as a sorted tuple of distinct widths."""
    if isinstance(choices, str):
        choices = [c for c in re.split(r"[\s,()\[\]]+", choices) if c]
    hint = f"bits_choices={choices!r}: give integer widths from 1 to 8, e.g. (2, 3, 4, 8)."
    if isinstance(choices, (int, bool)) or not hasattr(choices, "__iter__"):
        raise ValueError(hint)
    widths = set()
    for c in choices:
        text = str(c).strip()
        if isinstance(c, bool) or not text.isdigit() or int(text) not in MIXED_BITS:
            raise ValueError(hint)
        widths.add(int(text))
    if not widths:
        raise ValueError(hint)
    if grid == "int" and 1 in widths:
        raise ValueError('bits_choices contains 1, which the integer grid cannot hold (it would be {-a, 0}): use '
                         'weight_grid="nozero" (levels {-a, a}) or widths of 2 and more.')
    return tuple(sorted(widths))


def _check_bits(name: str, bits: int | None, allow_none: bool) -> None:
    if bits is None and allow_none:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        hint = " or None for float" if allow_none else ""
        raise ValueError(
            f"{name}={bits!r} is not supported: use an integer from 2 to 8{hint} "
            f"(e.g. weight_bits=2, act_bits=2)."
        )


def _check_device(name: str, device: str | None) -> None:
    """A device this torch can use: a valid name, and CUDA only where a CUDA device is there."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}={device!r} is not a device: use cpu, cuda or cuda:N.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"{name}={device!r}, but this machine has {build} (torch {torch.__version__}): use cpu.")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported: choose one of {', '.join(map(repr, choices))}.")


@dataclass
class EfficientQConfig:
    """Settings of one post-training quantization run.

    Fields left as ``None`` take the value of the chosen ``preset``; set them to override it. After creation
    every field holds the value that runs (so :meth:`to_dict` and the report show it); the config also
    remembers which preset-controlled fields the caller set (:attr:`preset_overrides`), so :meth:`replace`
    with another preset keeps them and re-derives the rest.

    Args:
        weight_bits: bits of the weights of the inner layers (2..8).
        act_bits: bits of the input activation of the inner layers, ``None`` keeps activations float.
        method: ``"efficientq"`` (ADMM layer reconstruction) or ``"rtn"`` (round to nearest, same quantizers).
        preset: ``"default"`` (ours) or ``"original"`` (the published code's choices: per-tensor scale,
            no-zero grid, unweighted best-iterate error, activations clipped to ``[0, a]``).
        weight_scale: ``"tensor"`` or ``"channel"`` (one scale per output channel).
        weight_grid: ``"nozero"`` (``2^bits`` points evenly on ``[-a, a]``) or ``"int"``
            (``[-2^(b-1), 2^(b-1)-1]·a``, contains zero).
        act_mode: ``"auto"`` (unsigned grid for non-negative inputs, affine grid otherwise) or
            ``"unsigned"`` (always ``[0, a]``, negatives clipped, as the original).
        act_fit: how an activation quantizer's range is chosen: ``"ls"`` (least squares on the activations,
            as the original) or ``"output"`` (then, among that range scaled by ``act_range_factors``, the one
            whose quantized input gives the float layer the lowest attention-weighted output error).
        act_range_factors: the scalings of the least-squares range tried by ``act_fit="output"``.
        best_iterate_error: keep the ADMM iterate with the lowest ``"weighted"`` (attention) or
            ``"unweighted"`` output error.
        rtn_candidate: also consider the round-to-nearest weights as an iterate, so the solution is never
            worse than RTN on the calibration data.
        first_last_bits: weight bits of the first and last quantized layers (their input stays float).
            ``None`` treats them like the others.
        size_budget: the size the packed checkpoint must fit (``None``: every inner layer gets ``weight_bits``):
            bytes as an int, a text with a unit (``"400KiB"``, ``"1.5MB"``) or a compression ratio of the float
            size (``"16x"``). Each inner layer then gets its weight width from ``bits_choices``: a cheap pass measures
            every layer's output error at every width (round to nearest, on the input through the quantized layers
            before it) and the widths with the lowest summed error that fit are chosen
            (:mod:`~monai_efficientq.mixed`). ``weight_bits`` is then not used; the edge layers keep
            ``first_last_bits`` and activations ``act_bits``. :func:`~monai_efficientq.checkpoint.packed_size` of the
            result is at most the budget.
        bits_choices: the weight widths a size-budgeted run chooses from (1..8; 1 bit is the no-zero grid's
            ``{-a, a}``).
        iterations: ADMM iterations per layer (at most, with ``patience``).
        patience: stop a layer's ADMM once its best candidate (the iterate, or round-to-nearest, that ranks
            lowest) has not improved by more than 0.01 % for this many iterations; ``None`` always runs
            ``iterations``. The default, 60, is more than one ρ step: on the bundle SegResNet's error-vs-iteration
            curves it chose the same candidate as the full 200 iterations in every layer but two (within 0.01 %).
        rho_step_every: ρ doubles (and the scaled dual halves) at every iteration ``i`` with
            ``i % rho_step_every == 0``.
        rho_schedule: when that step happens: ``"after"`` iteration ``i`` has solved at the current ρ (the
            published code: iteration 0 runs at ρ0, iterations 1..50 at 2ρ0, ...) or ``"before"`` it
            (iterations 0..49 at 2ρ0, 50..99 at 4ρ0, ...).
        rho_factor: ``ρ0 = rho_factor · s``.
        eta_factor: ``η = eta_factor · s``; the prior pulling weights toward the float ones.
        rho_cap_factor: ρ never exceeds ``rho_cap_factor · s``.
        attention: ``"prediction"`` (from the float network's own output), ``"label"`` (from ``label``
            given to :func:`quantize_network`) or ``"none"``.
        prediction: ``"softmax"`` (multi-class, argmax) or ``"sigmoid"`` (multi-label, threshold 0.5).
        class_weight_power: ``p`` in ``w_c = (n_max / n_c)^p``.
        class_weights: ``"real"`` (the weights as defined) or ``"integer"`` (truncated to integers, and for
            multi-label nets a voxel takes the weight of the last channel that is on, as the published code
            does: 1.45 becomes 1, which switches attention off for a mildly rare class).
        solver: ``"auto"`` (Woodbury when its V-step is cheaper: output voxels P below about 0.41× the
            unknowns K, else Cholesky), ``"cholesky"``,
            ``"woodbury"`` or ``"naive"`` (a fresh ``torch.linalg.solve`` every iteration; reference).
        solver_dtype: dtype in which the Gram matrices are summed and ADMM solves (``"float64"`` or
            ``"float32"``); each im2col chunk's products are computed in the activations' dtype.
        device: where layers are solved (``None``: the network's device).
        target_device: where the float targets (every layer's float output, recorded in one forward) wait for
            their layer: ``None`` the solve device, on the CPU only the first 64 MiB of them and the later ones in
            temporary files; a device (``"cpu"``, ``"cuda"``) all of them there; ``"disk"`` all in files. Files live
            in a temporary folder (under ``TMPDIR``, removed at the end), and a target in a file is in memory only
            while its layer is solved (:mod:`~monai_efficientq.targets`). On the CPU the forwards run the calibration
            volumes one at a time, and the activations of the volumes waiting at a layer of the quantizing pass go
            to a temporary file too (:mod:`~monai_efficientq.volume_pass`); ``"cpu"`` runs them as one batch with
            everything in memory (the results differ from one volume at a time in the last bits).
        chunk_bytes: memory bound of one im2col chunk when accumulating Gram matrices.
        act_fit_samples: at most this many values are used to fit an activation quantizer, and (for
            ``act_fit="output"``) the output errors that choose its range are measured on a regular sub-grid of
            at least this many output voxels.
        calib_augment: augmented copies of each calibration volume (MONAI random intensity scale/shift, bias
            field, gamma, flip, small affine; seeded by ``seed``) quantized together with it, so the weights are
            fitted to more than one volume's activation pattern (see :mod:`~monai_efficientq.augment`).
        act_fit_volumes: which volumes the activation ranges are fitted on: ``"all"`` (the given ones and their
            augmented copies) or ``"given"`` (the given ones only; the copies still feed the weight fit).
        holdout: the last calibration volume (with ``calib_augment``, the last augmented copy) is not fitted: each
            layer keeps the ADMM iterate, or the round-to-nearest weights, with the lowest output error there, so a
            solution that only fits the other volumes better is not chosen. The report gives those errors.
        skip_layers: names of layers to leave in float.
        progress: show a progress bar over layers.
        seed: seed of the activation sub-sampling.
    """

    weight_bits: int = 2
    act_bits: int | None = None
    method: str = "efficientq"
    preset: str = "default"
    weight_scale: str | None = None
    weight_grid: str | None = None
    act_mode: str | None = None
    act_fit: str | None = None
    act_range_factors: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5)
    best_iterate_error: str | None = None
    rtn_candidate: bool | None = None
    first_last_bits: int | None = 8
    size_budget: int | str | None = None
    bits_choices: tuple[int, ...] = (2, 3, 4, 8)
    iterations: int = 200
    patience: int | None = 60
    rho_step_every: int = 50
    rho_schedule: str | None = None
    rho_factor: float = 10.0
    eta_factor: float = 1.0
    rho_cap_factor: float = 1000.0
    attention: str = "prediction"
    prediction: str = "softmax"
    class_weight_power: float = 0.5
    class_weights: str | None = None
    solver: str = "auto"
    solver_dtype: str = "float64"
    device: str | None = None
    target_device: str | None = None
    chunk_bytes: int = 256 * 2**20
    act_fit_samples: int = 2**16
    calib_augment: int | None = None
    act_fit_volumes: str = "all"
    holdout: bool | None = None
    skip_layers: list[str] = field(default_factory=list)
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("preset", self.preset, tuple(PRESETS))
        # what the caller set; the preset fills the rest (the fields then show the settings that run)
        self._explicit = frozenset(key for key in PRESETS[self.preset] if getattr(self, key) is not None)
        for key, value in PRESETS[self.preset].items():
            if key not in self._explicit:
                setattr(self, key, value)
        self.act_range_factors = tuple(float(f) for f in self.act_range_factors)
        self.skip_layers = list(self.skip_layers)
        self._check_choices()
        self._check_numbers()
        _check_device("device", self.device)
        if self.target_device != "disk":
            _check_device("target_device", self.target_device)

    def _check_choices(self) -> None:
        _check_bits("weight_bits", self.weight_bits, allow_none=False)
        _check_bits("act_bits", self.act_bits, allow_none=True)
        _check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        for name, choices in _CHOICES.items():
            _check_choice(name, getattr(self, name), choices)
        self.bits_choices = _check_bits_choices(self.bits_choices, self.weight_grid)
        if self.size_budget is not None:
            parse_size_budget(self.size_budget)
        if not isinstance(self.holdout, bool):
            raise ValueError(f"holdout={self.holdout!r} must be True or False.")

    def _check_numbers(self) -> None:
        if not self.act_range_factors or min(self.act_range_factors) <= 0:
            raise ValueError("act_range_factors must be a non-empty list of positive numbers (e.g. [0.8, 1.0, 1.25]).")
        if isinstance(self.calib_augment, bool) or not isinstance(self.calib_augment, int) or self.calib_augment < 0:
            raise ValueError(f"calib_augment={self.calib_augment!r} must be a non-negative integer (e.g. 2).")
        if self.iterations < 1 or self.rho_step_every < 1:
            raise ValueError("iterations and rho_step_every must be positive integers.")
        if self.patience is not None and (isinstance(self.patience, bool) or not isinstance(self.patience, int)
                                          or self.patience < 1):
            raise ValueError(f"patience={self.patience!r} must be a positive integer (e.g. 60) or None (no early stop).")
        if min(self.rho_factor, self.rho_cap_factor) <= 0 or self.eta_factor < 0:
            raise ValueError("rho_factor and rho_cap_factor must be > 0 and eta_factor >= 0.")

    @property
    def preset_overrides(self) -> dict[str, Any]:
        """The preset-controlled fields the caller set (at creation, or by assigning a value other than the
        preset's), with their values; every other preset-controlled field holds the preset's value."""
        preset = PRESETS[self.preset]
        return {key: getattr(self, key) for key in preset if key in self._explicit or getattr(self, key) != preset[key]}

    def replace(self, **changes: Any) -> EfficientQConfig:
        """A new config with ``changes``, keeping the caller's settings: the preset-controlled fields the caller
        did not set (see :attr:`preset_overrides`) follow the new config's preset, e.g.
        ``EfficientQConfig(rtn_candidate=False).replace(preset="original")`` runs the original preset with
        ``rtn_candidate=False`` kept, and every other original choice.

        Args:
            changes: fields to change (``None`` for a preset-controlled field: the preset's value).

        Raises:
            TypeError: an unknown field.
            ValueError: an invalid value (checked as at creation).
        """
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        overrides = self.preset_overrides
        values.update({key: None for key in PRESETS[self.preset] if key not in overrides})
        values.update(changes)
        return EfficientQConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings that run, presets resolved, as a dict of primitives (for reports):
        ``EfficientQConfig(**config.to_dict())`` gives the same run."""
        return dataclasses.asdict(self)

    def stored_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the :data:`RUNTIME_ONLY` settings: what a packed checkpoint stores, so runs that
        compute the same codes write the same bytes. ``EfficientQConfig(**config.stored_dict())`` computes the
        same codes."""
        return {key: value for key, value in self.to_dict().items() if key not in RUNTIME_ONLY}
