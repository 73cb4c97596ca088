#!/usr/bin/env python
"""Compare EfficientQ with round-to-nearest and Brevitas' post-training quantizers on a MONAI 3D segmentation net.

One float checkpoint, one calibration batch (the bundle's crop, the same for every method) and one sliding-window
evaluation (MONAI ``sliding_window_inference`` + ``DiceMetric(reduction="mean_batch")``, per class and mean,
against the labels and against the float network's own prediction) for every method and setting.

Methods (:mod:`benchmarks.methods`)
    ``float``; ours: ``rtn``, ``eq_original``, ``eq_default``; Brevitas (optional extra
    ``pip install -e .[bench]``): ``brevitas_rtn``, ``brevitas_biascorr``, ``brevitas_gptq``, ``brevitas_gpfq``,
    ``brevitas_learned_round``.
Settings
    ``W4 W3 W2`` (weights only) and ``W4A4 W3A3 W2A2``. For every method the first and the last quantized layer (by
    data flow) get 8-bit weights and a float input (our ``first_last_bits=8``).

Usage::

    python benchmarks/compare.py run \\
        --network monai.networks.nets.SegResNet \\
        --network_kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "init_filters": 8}' \\
        --checkpoint bundles/brain_tissue_mri_segmentation/models/model.pt \\
        --eval_datalist bundles/brain_tissue_mri_segmentation/data/datalist.json \\
        --roi_size 96 --settings W2 --methods rtn,eq_default,brevitas_gptq --out results.json
    python benchmarks/compare.py timing --size 128 --device cuda     # BraTS-config SegResNet, timing only
    python benchmarks/plot.py results.json                            # mean Dice vs bits (PNG)

The flags of ``run`` are the fields of :class:`benchmarks.config.CompareConfig`. How the Brevitas rows are built is
written into the results JSON (``meta.brevitas_notes``) and the Markdown table.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of the quantization step alone (reset before it). On
CPU, by default (``--isolate auto``) each quantized row runs in a fresh ``spawn`` process and reports that
process's peak resident set size read right after quantization, with its RSS before quantizing as
``rss_before_mb``. With ``--isolate False`` the number is the whole process' peak so far (cumulative over rows).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

if __package__ in (None, ""):  # run as a file (python benchmarks/compare.py): import the package from the repository
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from benchmarks.config import CompareConfig, command_signature  # noqa: E402
from benchmarks.data import load_float_network, load_run_data  # noqa: E402
from benchmarks.runner import compare  # noqa: E402
from benchmarks.speed import time_methods  # noqa: E402

TIMING_METHODS = "eq_default,brevitas_gptq,brevitas_learned_round"
QUIET_WARNINGS = ("fast_hadamard_transform", "Computing zero point of output accumulator", "Named tensors",
                  "Positional args are being deprecated")


def run(**flags: Any) -> str | None:
    """Compare the methods on a trained network and NIfTI data; writes ``--out`` (JSON) and a Markdown table,
    and prints the table.

    The flags are the fields of :class:`benchmarks.config.CompareConfig` (see its documentation).

    Args:
        flags: ``--network``, ``--checkpoint``, ``--eval_datalist``, ``--methods``, ``--settings``, ``--out``, ...
    """
    cfg = CompareConfig(**flags)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    compare(cfg, load_float_network(cfg), load_run_data(cfg))
    if cfg.markdown_path:
        with open(cfg.markdown_path, encoding="utf-8") as f:
            print(f.read())
    return cfg.out


run.__signature__ = command_signature()  # fire shows and accepts exactly the config's fields


def timing(
    size: int = 128,
    device: str | None = None,
    methods: Any = TIMING_METHODS,
    setting: str = "W2A2",
    iterations: int = 200,
    lr_iterations: int = 200,
    threads: int | None = None,
    out: str | None = None,
) -> None:
    """Quantization time (and peak memory) of the BraTS-config SegResNet on one 4 x size^3 volume (no Dice).

    Args:
        size: side of the synthetic volume.
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        methods: comma-separated methods.
        setting: one setting, e.g. ``W2A2``.
        iterations: EfficientQ ADMM iterations per layer.
        lr_iterations: Brevitas learned-rounding iterations per layer.
        threads: torch intra-op threads.
        out: the JSON of the timings.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CompareConfig(methods=methods, settings=setting, iterations=iterations, lr_iterations=lr_iterations,
                        prediction="sigmoid", device=device, threads=threads, out=out)
    time_methods(cfg, size)


def main() -> None:
    """The command line: ``run`` and ``timing``."""
    import fire

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{message}.*")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[compare] %(message)s"))
    logger = logging.getLogger("benchmarks")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    fire.Fire({"run": run, "timing": timing})


if __name__ == "__main__":
    main()
