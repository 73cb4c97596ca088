"""Command line: ``monai-efficientq quantize ...`` and ``monai-efficientq report PATH`` (python-fire).

Run ``monai-efficientq quantize --help`` for every flag. Example::

    monai-efficientq quantize --network monai.networks.nets.SegResNet \\
        --network_kwargs '{"in_channels": 1, "out_channels": 4, "init_filters": 8}' \\
        --checkpoint model.pt --calib t1.nii.gz --roi_size 96 --weight_bits 2 --act_bits 2
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

from .config import EfficientQConfig
from .io import build_network, check_output_path, load_calibration, load_float_weights
from .network import quantize_

__all__ = ["quantize", "report", "main"]

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
    device: str | None = None, threads: int | None = None, quiet: bool = False,
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
        threads: CPU threads for torch (default: torch's, all cores; results can differ in the last bits between
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
    _set_threads(threads)
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


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"--threads={threads!r}: give a whole number of CPU threads, 1 or more.")
    import torch

    torch.set_num_threads(threads)


def _log_beside_progress_bar(progress: bool) -> Any:
    """Route log lines through tqdm while its bar is shown, so that neither overwrites the other in a terminal."""
    import contextlib

    if not progress:
        return contextlib.nullcontext()
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return contextlib.nullcontext()
    return logging_redirect_tqdm(loggers=[logging.getLogger("monai_efficientq")])


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

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        fire.Fire({"quantize": quantize, "report": report}, command=args, name="monai-efficientq")
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
        print(f"monai-efficientq: error: {_one_line(err)} (add --debug for the traceback)", file=sys.stderr)
        sys.exit(2)


def _one_line(err: Exception) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
    text = " ".join(str(message).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, KeyError, OSError)) else f"{type(err).__name__}: {text}"


if __name__ == "__main__":
    main()
