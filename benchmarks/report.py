"""The results of a comparison run as JSON and as a Markdown table.

The JSON holds ``meta`` (the run's settings, the crop, versions, the float plan) and one row per (method, setting);
:mod:`merge_results` and :mod:`plot` read it. The Markdown shows the table, the layers each method left at
round-to-nearest, Brevitas' messages and how the Brevitas rows are built.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["ResultsWriter", "fmt", "to_markdown", "write_text"]

MAX_LISTED_LAYERS = 12
MAX_STATUS_CHARS = 160


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: ``–`` for ``None``, floats with ``digits`` decimals."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file renamed), creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _header(meta: dict[str, Any]) -> list[str]:
    crop = meta.get("calib_crop", {})
    return [
        f"# Quantization comparison: {meta.get('network')}",
        "",
        f"- float checkpoint: `{meta.get('checkpoint')}`; calibration: `{meta.get('calib_image')}` crop "
        f"{crop.get('size')} (foreground-centred, from {crop.get('volume')}; {crop.get('transform', 'crop')})",
        f"- evaluation: {meta.get('eval_cases')} case(s), sliding window roi {meta.get('roi_size')}, overlap "
        f"{meta.get('overlap')}, DiceMetric(include_background={meta.get('include_background')}, "
        f"reduction='mean_batch')",
        f"- device {meta.get('device')}, threads {meta.get('threads')}, EfficientQ iterations {meta.get('iterations')}, "
        f"Brevitas learned-round iterations {meta.get('lr_iterations')}; first/last quantized layers (by data flow: "
        f"{', '.join(meta.get('edge_layers') or [])}) W8 with float input for every method",
        f"- options of our rows: {json.dumps(meta.get('eq_options') or {})}",
        f"- peak memory: {meta.get('memory_note')}",
        "",
    ]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    classes = list(dict.fromkeys(c for r in rows for c in (r.get("dice") or {})))
    head = ["method", "setting"] + [f"Dice {c}" for c in classes] + [
        "mean Dice", "Dice vs float", "quant s", "peak MB", "checkpoint KiB", "layers optimised", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        optimised = f"{r.get('layers_optimised')}/{r.get('layers_total')}" if r.get("layers_total") is not None else "–"
        size = r.get("checkpoint_bytes")
        status = "ok" if r.get("status") == "ok" else str(r.get("status")).replace("|", "/")[:MAX_STATUS_CHARS]
        cells = [r["method"], r["setting"]] + [fmt((r.get("dice") or {}).get(c)) for c in classes] + [
            fmt(r.get("mean_dice")), fmt(r.get("mean_dice_vs_float")), fmt(r.get("quant_seconds"), 1),
            fmt(r.get("peak_memory_mb"), 0), fmt(size / 1024 if size else None, 1), optimised, status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _not_optimised(rows: list[dict[str, Any]]) -> list[str]:
    by_row: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for name in r.get("layers_not_optimised") or []:
            by_row.setdefault((r["method"], r["setting"]), []).append(name)
    if not by_row:
        return []
    lines = ["", "## Layers not optimised (left at round-to-nearest)", ""]
    for (method, setting), names in by_row.items():
        more = " …" if len(names) > MAX_LISTED_LAYERS else ""
        lines.append(f"- {method} {setting}: {', '.join(names[:MAX_LISTED_LAYERS])}{more}")
    return lines


def to_markdown(results: dict[str, Any]) -> str:
    """The Markdown report of a results dict (``{"meta": ..., "rows": [...]}``)."""
    rows = results["rows"]
    lines = _header(results["meta"]) + _table(rows) + _not_optimised(rows)
    messages = sorted({n for r in rows for n in (r.get("brevitas_notes") or [])})
    if messages:
        lines += ["", "## Brevitas messages", ""] + [f"- {n}" for n in messages]
    lines += ["", "## How the Brevitas rows are built", ""]
    lines += [f"- {n}" for n in results["meta"].get("brevitas_notes", [])]
    return "\n".join(lines) + "\n"


class ResultsWriter:
    """Rewrites the JSON and the Markdown after every row, so a long run can be read (and loses nothing) midway.

    Args:
        json_path: the results JSON (``None``: not written).
        markdown_path: the Markdown table (``None``: not written).
    """

    def __init__(self, json_path: str | None, markdown_path: str | None) -> None:
        self.json_path = json_path
        self.markdown_path = markdown_path

    def write(self, results: dict[str, Any]) -> None:
        """Write ``results`` to both files."""
        if self.json_path:
            write_text(self.json_path, json.dumps(results, indent=2, default=str))
        if self.markdown_path:
            write_text(self.markdown_path, to_markdown(results))
