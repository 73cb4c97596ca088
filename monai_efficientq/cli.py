"""Command line: ``monai-efficientq quantize ...``, ``monai-efficientq quantize-bundle BUNDLE_DIR OUT_DIR ...`` and
``monai-efficientq report PATH`` (python-fire).

Run ``monai-efficientq quantize --help`` (or ``quantize-bundle --help``) for every flag. Examples::

    monai-efficientq quantize --network monai.networks.nets.SegResNet \\
        --network_kwargs '{"in_channels": 1, "out_channels": 4, "init_filters": 8}' \\
        --checkpoint model.pt --calib t1.nii.gz --roi_size 96 --weight_bits 2 --act_bits 2
    monai-efficientq quantize-bundle spleen_ct_segmentation spleen_ct_segmentation_w2a2 --weight_bits 2 --act_bits 2 \\
        --dataset_dir /data/Task09_Spleen
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

from .config import EfficientQConfig
from .io import build_network, check_output_path, load_calibration, load_float_weights
from .network import quantize_

__all__ = ["quantize", "quantize_bundle", "report", "main"]

logger = logging.getLogger("monai_efficientq")


def quantize(
    checkpoint: str, calib: str, network: str | None = None, network_kwargs: Any = None, config_file: Any = None,
    network_id: str = "network_def", bundle_root: str | None = None, output: str = "model_quantized.pt",
    report_path: str | None = None, dequantized: str | None = None, calib_label: str | None = None,
    roi_size: Any = None, crop: str = "foreground", divisible_by: int = 16, normalize: str = "nonzero",
    weight_bits: int = 2, act_bits: int | None = None, first_last_bits: int | None = 8, size_budget: Any = None,
    bits_choices: Any = (2, 3, 4, 8), method: str = "efficientq",
    preset: str = "default", iterations: int = 200, patience: int | None = 60, attention: str = "prediction",
    prediction: str = "softmax", calib_augment: int | None = None, holdout: bool | None = None,
    device: str | None = None, num_threads: int | None = None, quiet: bool = False,
) -> None:
    """Quantize a trained float network from one calibration volume and write the packed checkpoint and report.

    Args:
        checkpoint: float checkpoint (state dict) of the network.
        calib: calibration image (NIfTI), one volume, no label needed.
        network: dotted class path of the network, e.g. monai.networks.nets.SegResNet (or use --config_file).
        network_kwargs: JSON object of the network's constructor arguments.
        config_file: MONAI bundle config holding the network definition (instead of --network).
        network_id: id of the network definition in --config_file (default network_def).
        bundle_root: bundle_root for --config_file (default: the folder above the config folder).
        output: packed checkpoint to write (written atomically).
        report_path: report JSON to write (default: OUTPUT with .json; a .md is written beside it).
        dequantized: optional path of a dequantized float state dict the original network loads.
        calib_label: optional label image of the calibration volume (for --attention label), cropped with it.
        roi_size: calibration crop size, an int or a list like [96,96,96]; default the whole volume.
        crop: foreground (centre the crop on the body, input != 0) or center.
        divisible_by: pad the crop to a multiple of this (the network's down-sampling factor).
        normalize: intensity normalisation the network was trained with: nonzero, all, minmax or none.
        weight_bits: weight bits of the inner layers, 2..8.
        act_bits: input-activation bits of the inner layers, 2..8; omit for float activations.
        first_last_bits: weight bits of the first and last layer (float input); None = like the others.
        size_budget: the size the packed file must fit, e.g. 400KiB, 1.5MB, 409600 (bytes) or 16x (of the float
            size): each inner layer's weight width is then chosen from --bits_choices (--weight_bits is not used) and
            a plot of the per-layer errors is written beside the report (REPORT_sensitivity.png).
        bits_choices: the widths --size_budget chooses from, e.g. 2,3,4,8 (1 = two levels {-a, a}).
        method: efficientq (ADMM reconstruction) or rtn (round to nearest, the baseline).
        preset: default (ours) or original (the published code's choices).
        iterations: ADMM iterations per layer (at most).
        patience: stop a layer's ADMM after this many iterations without a better iterate (None: never).
        attention: prediction (class-balanced, from the float prediction), label (needs --calib_label) or none.
        prediction: softmax (multi-class) or sigmoid (multi-label) network output.
        calib_augment: augmented copies of the calibration volume (default: the preset's, 2 or 0).
        holdout: choose each layer's solution on a copy the fit does not see (default: the preset's).
        device: cpu, cuda or cuda:N (default cpu).
        num_threads: CPU threads for torch (default: torch's, all cores; results can differ in the last bits between
            thread counts, see the README).
        quiet: no progress bar or per-layer log. Add --debug to any command for the full traceback of an error.
    """
    cfg = EfficientQConfig(
        weight_bits=weight_bits, act_bits=act_bits, first_last_bits=first_last_bits, size_budget=size_budget,
        bits_choices=bits_choices, method=method,
        preset=preset, iterations=iterations, patience=patience, attention=attention, prediction=prediction,
        device=device, progress=not quiet, calib_augment=calib_augment, holdout=holdout,
    )
    report_path = report_path or os.path.splitext(output)[0] + ".json"
    _check_outputs(output, report_path, dequantized)
    if size_budget is not None:
        check_output_path(os.path.splitext(report_path)[0] + "_sensitivity.png", "the plot beside --report_path")
    _set_threads(num_threads)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    net = load_float_weights(build_network(network, network_kwargs, config_file, network_id, bundle_root), checkpoint)
    float_net = copy.deepcopy(net) if dequantized else None
    calib_volume, label = load_calibration(calib, calib_label, roi_size, crop, divisible_by, normalize)
    with _log_beside_progress_bar(cfg.progress):
        rep = quantize_(net, calib_volume, cfg, label=label)
    _write_outputs(net, rep, output, report_path, float_net, dequantized)


def _check_outputs(output: str, report_path: str, dequantized: str | None) -> None:
    """Every file the command will write, checked before the work starts."""
    check_output_path(output, "--output")
    check_output_path(report_path, "--report_path")
    check_output_path(os.path.splitext(report_path)[0] + ".md", "the Markdown report beside --report_path")
    if dequantized:
        check_output_path(dequantized, "--dequantized")


def _set_threads(num_threads: int | None) -> None:
    if num_threads is None:
        return
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 1:
        raise ValueError(f"--num_threads={num_threads!r}: give a whole number of CPU threads, 1 or more.")
    import torch

    torch.set_num_threads(num_threads)


def _log_beside_progress_bar(progress: bool) -> Any:
    """Route log lines through tqdm while its bar is shown, so that neither overwrites the other in a terminal."""
    import contextlib

    if not progress:
        return contextlib.nullcontext()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext()
    return logging_redirect_tqdm()  # the root logger, where basicConfig put the console handler


def _write_outputs(
    qnet: Any, rep: Any, output: str, report_path: str, float_net: Any, dequantized: str | None
) -> None:
    """The packed checkpoint, the report (JSON and Markdown) and, if asked, the dequantized float state dict."""
    from .checkpoint import save_dequantized, save_quantized

    save_quantized(qnet, output, rep)
    rep.to_json(report_path)
    rep.to_markdown(os.path.splitext(report_path)[0] + ".md")
    if dequantized:
        save_dequantized(qnet, float_net, dequantized)
    written = [report_path, os.path.splitext(report_path)[0] + ".md"] + ([dequantized] if dequantized else [])
    if rep.sensitivity:
        written += [p for p in [rep.plot_sensitivity(os.path.splitext(report_path)[0] + "_sensitivity.png")] if p]
    print(
        f"wrote {output} ({os.path.getsize(output) / 2**20:.2f} MiB, {rep.compression:.1f}x smaller than float; "
        f"{len(rep.layers)} layers in {rep.total_seconds:.1f} s) and " + ", ".join(written)
    )


def quantize_bundle(
    bundle_dir: str, out_dir: str, weight_bits: int = 2, act_bits: int | None = None, first_last_bits: int | None = 8,
    size_budget: Any = None, bits_choices: Any = (2, 3, 4, 8), method: str = "efficientq", preset: str = "default", iterations: int = 200, patience: int | None = 60,
    attention: str = "prediction", prediction: str | None = None, calib_augment: int | None = None,
    holdout: bool | None = None, calib: Any = None, calib_label: str | None = None, dataset_dir: str | None = None,
    roi_size: Any = None, divisible_by: Any = None, max_eval_volumes: int | None = None, evaluate: bool = True,
    overrides: Any = None, check_packages: bool = True, device: str | None = None, num_threads: int | None = None,
    quiet: bool = False,
) -> None:
    """Quantize a MONAI Model-Zoo bundle into a new quantized bundle (packed model, configs that load it, metadata
    with the float vs quantized Dice, README), measured with the bundle's own evaluation.

    Args:
        bundle_dir: the bundle folder (configs/train, evaluate and inference in JSON or YAML, configs/metadata.json,
            models/model.pt).
        out_dir: the new bundle folder (must not exist; written whole or not at all).
        weight_bits: weight bits of the inner layers, 2..8.
        act_bits: input-activation bits of the inner layers, 2..8; omit for float activations.
        first_last_bits: weight bits of the first and last layer (float input); none = like the others.
        size_budget: the size the packed model must fit, e.g. 400KiB, 1.5MB or 16x (of the float size): each inner
            layer's width is then chosen from --bits_choices where the layer errors say (--weight_bits is not used).
        bits_choices: the widths --size_budget chooses from, e.g. 2,3,4,8.
        method: efficientq (ADMM reconstruction) or rtn (round to nearest, the baseline).
        preset: default (ours) or original (the published code's choices).
        iterations: ADMM iterations per layer (at most).
        patience: stop a layer's ADMM after this many iterations without a better iterate (none: never).
        attention: prediction (class-balanced, from the float prediction), label (needs a labelled calibration
            item) or none.
        prediction: softmax or sigmoid; default: what the bundle's post-processing applies.
        calib_augment: augmented copies of the calibration volume (default: the preset's, 2 or 0).
        holdout: choose each layer's solution on a copy the fit does not see (default: the preset's).
        calib: calibration image (path, or a list of paths for an image stored one file per channel, e.g.
            "['t1c.nii.gz','t1.nii.gz','t2.nii.gz','flair.nii.gz']"); default: the first item of the bundle's
            evaluation dataset.
        calib_label: label of --calib (the item then goes through the evaluation's preprocessing).
        dataset_dir: where the bundle's data are (its dataset_dir id).
        roi_size: calibration crop, an int or a list; default the bundle's sliding-window roi_size (at most 128 a
            side, no larger than the image).
        divisible_by: pad the crop to a multiple of this; default the network's down-sampling factor.
        max_eval_volumes: evaluate on the first N volumes of the evaluation dataset (default all).
        evaluate: run the bundle's evaluation on the float and the quantized network (needs its evaluate config).
        overrides: JSON object of bundle config ids to set for this run, e.g. '{"validate#dataloader#num_workers": 0}'.
        check_packages: check that the packages the bundle's metadata lists are installed.
        device: cpu, cuda or cuda:N for the evaluation and the solve (default: the bundle's device).
        num_threads: CPU threads for torch (default: torch's).
        quiet: no progress bar or per-layer log. Add --debug to any command for the full traceback of an error.
    """
    from .handlers import none_from_text
    from .zoo import quantize_bundle as run_quantize_bundle

    settings = {
        "weight_bits": weight_bits, "act_bits": act_bits, "first_last_bits": first_last_bits,
        "size_budget": none_from_text(size_budget), "bits_choices": bits_choices, "method": method, "preset": preset, "iterations": iterations, "patience": patience, "attention": attention,
        "prediction": none_from_text(prediction), "calib_augment": calib_augment, "holdout": holdout,
        "device": device, "progress": not quiet,
    }
    _set_threads(num_threads)
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s")
    with _log_beside_progress_bar(not quiet):
        result = run_quantize_bundle(
            bundle_dir, out_dir, settings, calib=calib, calib_label=calib_label, dataset_dir=dataset_dir,
            roi_size=roi_size, divisible_by=divisible_by, max_eval_volumes=max_eval_volumes, evaluate=evaluate,
            overrides=_json_object(overrides, "--overrides"), check_packages=check_packages,
        )
    dice = result.report.dice or {}
    measured = (
        f"; Dice mean {dice['float']['mean']:.4f} float -> {dice['quantized']['mean']:.4f} quantized"
        if "mean" in dice.get("float", {}) and "mean" in dice.get("quantized", {}) else ""
    )
    print(f"wrote {result.path} ({result.report.compression:.1f}x smaller than float{measured}):")
    for name in result.files:
        print(f"  {name}")


def _json_object(value: Any, what: str) -> dict[str, Any] | None:
    """A dict from a dict or JSON object text (``None`` stays ``None``)."""
    import json

    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        example = '{"validate#dataloader#num_workers": 0}'
        raise ValueError(f"{what} must be a JSON object, e.g. '{example}'; got {value!r}.")
    return parsed


def report(path: str) -> str:
    """A saved report as Markdown (printed by the command).

    Args:
        path: a report JSON written by `quantize`, or a packed checkpoint saved with its report.
    """
    from .checkpoint import read_packed
    from .report import QuantizationReport

    if not os.path.isfile(path):
        raise FileNotFoundError(f"report not found: {path}")
    if path.endswith(".json"):
        rep = QuantizationReport.from_json(path)
    else:
        state = read_packed(path, "cpu")
        if "report" not in state:
            raise ValueError(f"{path} was saved without a report; look for the .json written beside it.")
        rep = QuantizationReport.from_dict(state["report"])
    return rep.to_markdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``monai-efficientq`` command: errors as one line on stderr and exit code 2 (the
    traceback with ``--debug``)."""
    import sys

    import fire

    from .workflow import one_line

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        commands = {"quantize": quantize, "quantize-bundle": quantize_bundle, "report": report}
        fire.Fire(commands, command=args, name="monai-efficientq")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `monai-efficientq report q.json | head`: the reader has gone, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        print("monai-efficientq: interrupted (files are written whole or not at all).", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        print(f"monai-efficientq: error: {one_line(err)} (add --debug for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
