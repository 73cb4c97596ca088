"""Whether two quantization reports chose the same thing layer by layer.

Reads two report JSONs (a :class:`~monai_efficientq.report.QuantizationReport` as ``phase_times.py`` or the bundle's
``quantize`` writes it) and prints, per layer that differs, the chosen ADMM iteration, the iterations run and the
calibration error of each; then the count of differing layers and the mean calibration / held-out errors and the
agreement Dice of both. Exit code 0 when every layer agrees (same iteration, same iterations run, errors within
``--rel_tol``), 1 otherwise.

    python benchmarks/same_layers.py benchmarks/results/speed/act_fit/bundle_e5e2015_pair3.json \\
        benchmarks/results/speed/act_fit/bundle_02faf25_pair3.json
"""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any

import fire


def _layers(report: dict[str, Any]) -> list[dict[str, Any]]:
    if "layers" in report:
        return report["layers"]
    for value in report.values():  # a report nested in a benchmark's output
        if isinstance(value, dict) and "layers" in value:
            return value["layers"]
    raise ValueError("no 'layers' list in this JSON: is it a quantization report?")


def _agree(a: dict[str, Any], b: dict[str, Any], rel_tol: float) -> bool:
    same_iterate = a["best_iteration"] == b["best_iteration"] and a.get("iterations_run") == b.get("iterations_run")
    return same_iterate and abs(a["error"] - b["error"]) <= rel_tol * abs(a["error"])


def _summary(layers: list[dict[str, Any]]) -> str:
    held = [layer["held_out_error"] for layer in layers if layer.get("held_out_error") is not None]
    held_text = f"{statistics.mean(held):.5f}" if held else "–"
    return f"mean calibration error {statistics.mean(layer['error'] for layer in layers):.5f}, held-out {held_text}"


def main(first: str, second: str, rel_tol: float = 1e-9) -> None:
    """Compare the layer choices of two reports.

    Args:
        first: a report JSON.
        second: another report JSON (the same network and layers).
        rel_tol: relative tolerance on a layer's calibration error.
    """
    with open(first) as f:
        a = json.load(f)
    with open(second) as f:
        b = json.load(f)
    layers_a, layers_b = _layers(a), _layers(b)
    if [layer["name"] for layer in layers_a] != [layer["name"] for layer in layers_b]:
        raise SystemExit("the two reports do not list the same layers in the same order")
    differ = 0
    for la, lb in zip(layers_a, layers_b):
        if not _agree(la, lb, rel_tol):
            differ += 1
            print(f"{la['name']}: iteration {la['best_iteration']} / {lb['best_iteration']}, run "
                  f"{la.get('iterations_run')} / {lb.get('iterations_run')}, error {la['error']:.6g} / {lb['error']:.6g}")
    print(f"{differ} of {len(layers_a)} layers differ")
    print(f"first:  {_summary(layers_a)}, agreement Dice {a.get('calib_agreement_dice')}")
    print(f"second: {_summary(layers_b)}, agreement Dice {b.get('calib_agreement_dice')}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    fire.Fire(main)
