"""Merge several ``compare.py run`` result JSONs of the same model into one, and print the summary table.

    python benchmarks/merge_results.py a.json b.json c.json --out all.json [--pivot all_pivot.md]

Rows keep the order of the files; the first file holding a (method, setting) row wins, so list a rerun
before the older file it replaces. ``file.json#label`` renames that file's methods to ``method (label)``, so
variants of one method (e.g. run with other ``--eq_options``) get rows of their own. ``--pivot`` also writes a Markdown table: one row per method, the mean
Dice of every setting, and the quantization seconds, peak memory, checkpoint size and layers optimised of
one setting (``--detail``, default W2).
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # run as a file: import the benchmarks package from the repository
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import fire  # noqa: E402

from benchmarks.config import DEFAULT_SETTINGS as SETTINGS  # noqa: E402
from benchmarks.methods import method_names  # noqa: E402

METHOD_ORDER = tuple(method_names())


def merge(*paths: str, out: str, pivot: str | None = None, detail: str = "W2") -> None:
    """Write the union of the rows of ``paths`` to ``out`` (the first file's ``meta``, plus every file's command).

    Args:
        paths: result JSONs of ``compare.py run`` on the same model.
        out: merged JSON.
        pivot: optional Markdown path for the summary table.
        detail: the setting whose seconds / memory / size / layers columns the summary shows.
    """
    merged: dict = {"meta": None, "rows": []}
    seen = set()
    commands = []
    for spec in paths:
        path, _, label = str(spec).partition("#")
        with open(path) as f:
            data = json.load(f)
        merged["meta"] = merged["meta"] or dict(data["meta"])
        commands.append({"file": path, "command": data["meta"].get("command"), "label": label or None})
        for row in data["rows"]:
            if label and row.get("method") != "float":
                row = {**row, "method": f"{row['method']} ({label})"}
            key = (row.get("method"), row.get("setting"))
            if key not in seen:
                seen.add(key)
                merged["rows"].append(row)
    merged["meta"]["merged_from"] = commands
    with open(out, "w") as f:
        json.dump(merged, f, indent=2)
    print(f"{out}: {len(merged['rows'])} rows")
    if pivot:
        text = pivot_table(merged, detail)
        with open(pivot, "w") as f:
            f.write(text)
        print(text)


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def pivot_table(results: dict, detail: str = "W2") -> str:
    """Markdown: method × setting mean Dice, then the ``detail`` setting's cost columns ("not run" where absent)."""
    rows = {(r["method"], r["setting"]): r for r in results["rows"]}
    def order(method: str) -> int:
        base = method.split(" (")[0]
        return METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)

    methods = sorted(dict.fromkeys(r["method"] for r in results["rows"]), key=order)
    settings = [s for s in SETTINGS if any(k[1] == s for k in rows)]
    head = ["method"] + [f"{s} mean Dice" for s in settings] + [
        f"{detail} quant. s", f"{detail} peak MB", f"{detail} checkpoint KiB", f"{detail} layers optimised"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        if method == "float":
            f = rows.get(("float", "float"), {})
            cells = [_fmt(f.get("mean_dice"))] * len(settings) + [
                "–", "–", _fmt(f.get("checkpoint_bytes", 0) / 1024, 0), "–"]
        else:
            cells = []
            for s in settings:
                r = rows.get((method, s))
                ok = r is not None and r.get("status") == "ok"
                cells.append(_fmt(r.get("mean_dice")) if ok else "not run")
            r = rows.get((method, detail))
            if r is not None and r.get("status") == "ok":
                cells += [
                    _fmt(r.get("quant_seconds"), 0), _fmt(r.get("peak_memory_mb"), 0),
                    _fmt(r["checkpoint_bytes"] / 1024, 0) if r.get("checkpoint_bytes") else "–",
                    f"{r.get('layers_optimised')}/{r.get('layers_total')}" if r.get("layers_total") is not None else "–",
                ]
            else:
                cells += ["not run"] * 4
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    fire.Fire(merge)
