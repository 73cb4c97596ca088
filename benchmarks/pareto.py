#!/usr/bin/env python
"""Dice against packed size: uniform widths and mixed widths under a size budget, on a trained network.

Rows: the float network; EfficientQ at every uniform weight width of ``--widths`` (first/last layers W8); then, for
every set of ``--bits_choices`` and every width of ``--budgets_at``, EfficientQ with
``size_budget = the packed size of that uniform row`` (the same bytes, spent where the layer errors say). Every row
is evaluated by the comparison's evaluator (sliding window, ``DiceMetric`` per class and mean) and its size is the
packed checkpoint's (:func:`~monai_efficientq.checkpoint.packed_size`, the file ``save_quantized`` writes). The time
of a mixed row is compared with the uniform row of its budget (``time_ratio``).

Usage (defaults: the brain-tissue bundle's SegResNet, its calibration volume and evaluation datalist)::

    python benchmarks/pareto.py run --threads 1 --out benchmarks/results/pareto/segresnet_pareto.json
    python benchmarks/pareto.py run --calib_roi 32 --max_eval_cases 1 --iterations 20 --widths 2,3 \\
        --budgets_at 2,3 --out /tmp/pareto_smoke.json                     # a quick smoke run

With ``--brevitas brevitas_gptq`` (any of ``compare.py``'s Brevitas methods, comma-separated) each uniform width also
gets that Brevitas row, run at the same setting (inner layers at that width, first/last W8, same calibration batch,
same evaluator). Brevitas ships a float state dict (its ``brevitas_file_bytes``); its row is placed at the packed
size of the same widths in our format (the uniform row's ``packed_bytes``: the same integer codes and per-channel
scales), which is what its quantized weights would take if packed.

Writes the JSON (``{"meta", "rows"}``, rewritten after every row), a Markdown table beside it and a PNG (mean Dice
against packed KiB). Other flags are those of ``compare.py run`` (:class:`benchmarks.config.CompareConfig`), e.g.
``--network``, ``--checkpoint``, ``--eval_datalist``, ``--roi_size``, ``--eq_options``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from typing import Any

if __package__ in (None, ""):  # run as a file (python benchmarks/pareto.py): import the package from the repository
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.config import CompareConfig, Setting, as_list, spatial_size  # noqa: E402
from benchmarks.data import load_float_network, load_run_data  # noqa: E402
from benchmarks.evaluation import Evaluator  # noqa: E402
from benchmarks.measure import Stopwatch  # noqa: E402
from benchmarks.networks import BUNDLE_DATA, BUNDLE_MODEL, BUNDLE_SEGRESNET  # noqa: E402
from benchmarks.report import fmt, write_text  # noqa: E402
from benchmarks.runner import run_meta  # noqa: E402
from benchmarks.methods import Calibration, ready_method  # noqa: E402
from benchmarks.plan import float_plan  # noqa: E402
from monai_efficientq import EfficientQConfig, quantize_network  # noqa: E402

logger = logging.getLogger("benchmarks")

#: The run's defaults: the brain-tissue bundle's SegResNet, its weights, calibration volume and evaluation datalist.
BUNDLE_DEFAULTS: dict[str, Any] = {
    "network": "monai.networks.nets.SegResNet", "network_kwargs": BUNDLE_SEGRESNET, "checkpoint": BUNDLE_MODEL,
    "eval_datalist": os.path.join(BUNDLE_DATA, "datalist.json"), "roi_size": 64, "methods": "float,eq_default",
    "out": "pareto.json",
}


def choice_sets(value: Any) -> list[tuple[int, ...]]:
    """Sets of widths from ``"2,3,4,8"``, ``"2,3,4,8;1,2,3,4,8"`` or a sequence of sequences.

    Args:
        value: what the command line gave.
    """
    if isinstance(value, str):
        groups = [g for g in value.split(";") if g.strip()]
    elif value and all(isinstance(v, int) for v in value):
        groups = [value]
    else:
        groups = list(value or [])
    return [EfficientQConfig(bits_choices=g).bits_choices for g in (as_list(g) if isinstance(g, str) else g
                                                                     for g in groups)]


def int_list(value: Any) -> list[int]:
    """Widths from ``"2,3,4"``, an int or a sequence."""
    return [int(v) for v in ([value] if isinstance(value, int) else as_list(value))]


def _config(cfg: CompareConfig, **fields: Any) -> EfficientQConfig:
    """The EfficientQ settings of a row: the run's iterations, prediction, device and ``eq_options``, W8 edges."""
    options = {"iterations": cfg.iterations, "first_last_bits": 8, "prediction": cfg.prediction,
               "device": str(torch.device(cfg.device)), "progress": False, **cfg.eq_options}
    return EfficientQConfig(**{**options, **fields})


def _row(net: nn.Module, calib: Any, config: EfficientQConfig, evaluator: Evaluator, device: torch.device,
         **extra: Any) -> dict[str, Any]:
    """Quantize a copy of ``net`` with ``config``, then evaluate it; the row with its size, time and Dice."""
    with Stopwatch(device) as clock:
        qnet, report = quantize_network(net, calib.image, config, label=calib.label)
    row: dict[str, Any] = {**extra, "quant_seconds": clock.seconds, "packed_bytes": report.packed_bytes,
                           "compression": report.compression,
                           "weight_bits": {r.name: r.weight_bits for r in report.layers}}
    if report.size_budget is not None:
        allocation = report.allocation
        row.update({"size_budget": report.size_budget, "allocation_seconds": allocation.get("seconds"),
                    "estimated_error": allocation.get("estimated_error"), "uniform_errors": allocation.get("uniform"),
                    "minimum_bytes": allocation.get("minimum_bytes"),
                    "width_counts": _counts(report.sensitivity)})
    row.update(evaluator.evaluate(qnet)[0])
    row["status"] = "ok"
    logger.info("%s: %d bytes, mean Dice %s, %.1f s", row["name"], row["packed_bytes"], fmt(row.get("mean_dice")),
                row["quant_seconds"])
    return row


def _counts(table: list[dict[str, Any]]) -> dict[str, int]:
    """How many inner layers got each width."""
    counts: dict[str, int] = {}
    for entry in table:
        if not entry["fixed"]:
            counts[f"W{entry['chosen']}"] = counts.get(f"W{entry['chosen']}", 0) + 1
    return dict(sorted(counts.items()))


def _brevitas_row(method_name: str, net: nn.Module, calib: Calibration, bits: int, cfg: CompareConfig,
                  evaluator: Evaluator, uniform: dict[str, Any]) -> dict[str, Any]:
    """A Brevitas method at uniform ``W<bits>`` (first/last W8 as ours), placed at the uniform row's packed size."""
    method = ready_method(method_name)
    qnet, info = method.quantize(net, calib, Setting(f"W{bits}", bits, None), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "brevitas.pt")
        method.save(qnet, path)
        file_bytes = os.path.getsize(path)
    row: dict[str, Any] = {"name": f"{method_name} W{bits}", "kind": "brevitas", "method": method_name, "bits": bits,
                           "packed_bytes": uniform["packed_bytes"], "brevitas_file_bytes": file_bytes,
                           "quant_seconds": info["quant_seconds"],
                           "layers_optimised": f"{info['layers_optimised']}/{info['layers_total']}"}
    row.update(evaluator.evaluate(qnet)[0])
    row["status"] = "ok"
    row["dice_gain_vs_uniform"] = _gain(row, uniform)
    logger.info("%s: mean Dice %s, %.1f s", row["name"], fmt(row.get("mean_dice")), row["quant_seconds"])
    return row


def run(widths: Any = "2,3,4", budgets_at: Any = "2,3", bits_choices: Any = "2,3,4,8;1,2,3,4,8", plot: bool = True,
        brevitas: Any = "", **flags: Any) -> dict[str, Any]:
    """Uniform and mixed rows on one network; writes ``--out`` (JSON), its Markdown and (``plot``) its PNG.

    Args:
        widths: the uniform weight widths.
        budgets_at: the uniform widths whose packed size is a mixed row's budget.
        bits_choices: the width sets of the mixed rows, ``;``-separated (``"2,3,4,8;1,2,3,4,8"``).
        plot: write the PNG.
        brevitas: Brevitas methods (``compare.py`` names, comma-separated) run at every uniform width.
        flags: the fields of :class:`benchmarks.config.CompareConfig`; the bundle SegResNet's by default.

    Returns:
        the JSON's path.
    """
    cfg = CompareConfig(**{**BUNDLE_DEFAULTS, **flags})
    uniform, budgets, sets = int_list(widths), int_list(budgets_at), choice_sets(bits_choices)
    missing = sorted(set(budgets) - set(uniform))
    if missing:
        raise ValueError(f"--budgets_at {missing}: each budget is a uniform row's size; add them to --widths.")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    brevitas_methods = as_list(brevitas)
    for name in brevitas_methods:
        ready_method(name)  # unknown names and a missing Brevitas fail before any work
    net, data = load_float_network(cfg).eval().cpu(), load_run_data(cfg)
    device = torch.device(cfg.device)
    evaluator = Evaluator(data.cases, _roi(cfg, data), cfg.overlap, cfg.sw_batch_size, cfg.prediction,
                          data.class_names, cfg.device)
    plan = float_plan(net, data.calibration.image, fold_bn=True)
    meta = run_meta(cfg, net, data, plan, "")
    meta.update({"widths": uniform, "budgets_at": budgets, "bits_choices": [list(s) for s in sets],
                 "brevitas": brevitas_methods})
    results: dict[str, Any] = {"meta": meta, "rows": []}
    scores, predictions = evaluator.evaluate(net)
    evaluator.set_reference(predictions)
    results["rows"].append({"name": "float", "kind": "float", "packed_bytes": meta["float_checkpoint_bytes"],
                            "status": "ok", **scores})
    _write(results, cfg.out)
    sizes: dict[int, dict[str, Any]] = {}
    for b in uniform:
        row = _row(net, data.calibration, _config(cfg, weight_bits=b), evaluator, device, name=f"uniform W{b}",
                   kind="uniform", bits=b)
        sizes[b] = row
        results["rows"].append(row)
        _write(results, cfg.out)
    brevitas_calib = Calibration(data.calibration.image, data.calibration.label,
                                 plan if cfg.brevitas_fold_bn else float_plan(net, data.calibration.image, False))
    for name in brevitas_methods:
        for b in uniform:
            results["rows"].append(_brevitas_row(name, net, brevitas_calib, b, cfg, evaluator, sizes[b]))
            _write(results, cfg.out)
    for choices in sets:
        for b in budgets:
            name = f"mixed {{{','.join(map(str, choices))}}} at W{b} size"
            config = _config(cfg, size_budget=sizes[b]["packed_bytes"], bits_choices=choices)
            try:
                row = _row(net, data.calibration, config, evaluator, device, name=name, kind="mixed",
                           bits_choices=list(choices), budget_of=b)
            except ValueError as err:  # e.g. the budget is a few bytes below what these widths allow
                row = {"name": name, "kind": "mixed", "bits_choices": list(choices), "budget_of": b,
                       "status": f"not run: {err}"}
                logger.warning("%s: %s", name, row["status"])
            else:
                row["time_ratio"] = row["quant_seconds"] / sizes[b]["quant_seconds"]
                row["dice_gain_vs_uniform"] = _gain(row, sizes[b])
            results["rows"].append(row)
            _write(results, cfg.out)
    if plot:
        plot_pareto(results, os.path.splitext(cfg.out)[0] + ".png")
    return cfg.out


def _roi(cfg: CompareConfig, data: Any) -> tuple[int, ...]:
    return spatial_size(cfg.roi_size, data.calibration.image.dim() - 2)


def _gain(row: dict[str, Any], uniform: dict[str, Any]) -> float | None:
    if row.get("mean_dice") is None or uniform.get("mean_dice") is None:
        return None
    return row["mean_dice"] - uniform["mean_dice"]


def _write(results: dict[str, Any], out: str) -> None:
    """The JSON and its Markdown table."""
    write_text(out, json.dumps(results, indent=2, default=str))
    write_text(os.path.splitext(out)[0] + ".md", to_markdown(results))


def to_markdown(results: dict[str, Any]) -> str:
    """The rows as a Markdown table: size, Dice, time and (mixed rows) the widths chosen."""
    meta, rows = results["meta"], results["rows"]
    classes = list(dict.fromkeys(c for r in rows for c in (r.get("dice") or {})))
    lines = [f"# Dice against packed size: {meta.get('network')}", "",
             f"- calibration crop {meta.get('calib_crop', {}).get('size')}, {meta.get('eval_cases')} evaluation "
             f"case(s), threads {meta.get('threads')}, EfficientQ iterations {meta.get('iterations')}, options "
             f"{json.dumps(meta.get('eq_options') or {})}", "",
             "| row | packed bytes | " + " | ".join(f"Dice {c}" for c in classes)
             + " | mean Dice | vs uniform | quant s | time ratio | widths | status |",
             "|---" * (len(classes) + 8) + "|"]
    for r in rows:
        status = "ok" if r.get("status") == "ok" else str(r.get("status")).replace("|", "/")[:160]
        cells = [r["name"], str(r.get("packed_bytes"))] + [fmt((r.get("dice") or {}).get(c)) for c in classes] + [
            fmt(r.get("mean_dice")), fmt(r.get("dice_gain_vs_uniform")), fmt(r.get("quant_seconds"), 1),
            fmt(r.get("time_ratio"), 2), _widths_cell(r), status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _widths_cell(row: dict[str, Any]) -> str:
    """The widths chosen (mixed rows), or what a Brevitas row ships instead of a packed file."""
    if row.get("kind") == "brevitas":
        return (f"ships a {row.get('brevitas_file_bytes')}-byte float state dict; "
                f"layers optimised {row.get('layers_optimised')}")
    return ", ".join(f"{k}: {v}" for k, v in (row.get("width_counts") or {}).items())


def plot_pareto(results: dict[str, Any], out: str) -> str:
    """Mean Dice against packed KiB: the uniform rows as a line, each mixed set as points, float as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("status") == "ok" and r.get("mean_dice") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    uniform = sorted((r["packed_bytes"] / 1024, r["mean_dice"], r["bits"]) for r in rows if r["kind"] == "uniform")
    ax.plot([u[0] for u in uniform], [u[1] for u in uniform], "o-", color="tab:gray", label="uniform")
    for kib, dice, bits in uniform:
        ax.annotate(f"W{bits}", (kib, dice), textcoords="offset points", xytext=(4, -12), fontsize=8)
    sets = list(dict.fromkeys(tuple(r["bits_choices"]) for r in rows if r["kind"] == "mixed"))
    for i, choices in enumerate(sets):
        pts = sorted((r["packed_bytes"] / 1024, r["mean_dice"]) for r in rows
                     if r["kind"] == "mixed" and tuple(r["bits_choices"]) == choices)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "D--", color=f"C{i + 3}",
                label="mixed {" + ",".join(map(str, choices)) + "}")
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kind"] == "brevitas"))
    for i, method in enumerate(methods):
        pts = sorted((r["packed_bytes"] / 1024, r["mean_dice"]) for r in rows
                     if r["kind"] == "brevitas" and r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s:", color=f"C{i}", label=f"{method} (at its packed size)")
    float_row = next((r for r in rows if r["kind"] == "float"), None)
    if float_row is not None:
        ax.axhline(float_row["mean_dice"], color="black", ls=":", lw=1, label="float")
    ax.set_xlabel("packed checkpoint (KiB)")
    ax.set_ylabel("mean Dice vs labels")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{os.path.basename(str(results['meta'].get('network')))}: Dice against size", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    """The command line: ``run``."""
    import fire

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[pareto] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    fire.Fire({"run": run})


if __name__ == "__main__":
    main()
