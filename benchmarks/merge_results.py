"""Merge several ``compare.py run`` result JSONs of the same model into one (rows in order, float once).

    python benchmarks/merge_results.py a.json b.json c.json --out all.json
"""

from __future__ import annotations

import json

import fire


def merge(*paths: str, out: str) -> None:
    """Write the union of the rows of ``paths`` to ``out`` (the first file's ``meta``; later duplicates of a
    (method, setting) row are dropped)."""
    merged: dict = {"meta": None, "rows": []}
    seen = set()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        merged["meta"] = merged["meta"] or data["meta"]
        for row in data["rows"]:
            key = (row.get("method"), row.get("setting"))
            if key not in seen:
                seen.add(key)
                merged["rows"].append(row)
    with open(out, "w") as f:
        json.dump(merged, f, indent=2)
    print(f"{out}: {len(merged['rows'])} rows")


if __name__ == "__main__":
    fire.Fire(merge)
