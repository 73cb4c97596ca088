#!/usr/bin/env python
"""Plot mean Dice vs bits per method from a ``compare.py run`` results JSON (matplotlib, Agg backend).

Usage::

    python benchmarks/plot.py results.json                 # writes results.png next to it
    python benchmarks/plot.py results.json --out fig.png --metric mean_dice_vs_float

Left panel: weight-only settings (W4, W3, W2) against weight bits; right panel: weight + activation settings
(W4A4, W3A3, W2A2) against bits. One line per method; the float network's Dice as a dashed line.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # run as a file: import the benchmarks package from the repository
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.config import Setting  # noqa: E402

STYLE = {
    "rtn": ("tab:gray", "o", "-"),
    "eq_original": ("tab:orange", "s", "-"),
    "eq_default": ("tab:red", "D", "-"),
    "brevitas_rtn": ("tab:blue", "o", "--"),
    "brevitas_biascorr": ("tab:cyan", "v", "--"),
    "brevitas_gptq": ("tab:green", "^", "--"),
    "brevitas_gpfq": ("tab:olive", "<", "--"),
    "brevitas_learned_round": ("tab:purple", ">", "--"),
}


def plot(results: str, out: str | None = None, metric: str = "mean_dice") -> str:
    """Write the PNG and return its path.

    Args:
        results: the JSON written by ``compare.py run``.
        out: PNG path (default: the JSON's path with ``.png``).
        metric: ``mean_dice`` (vs labels) or ``mean_dice_vs_float``.
    """
    with open(results) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r.get("status") == "ok"]
    float_value = next((r.get(metric) for r in rows if r["method"] == "float"), None)
    series: dict[tuple[str, bool], list[tuple[int, float]]] = {}
    for r in rows:
        if r["method"] == "float" or r.get(metric) is None:
            continue
        setting = Setting.parse(r["setting"])
        series.setdefault((r["method"], setting.act_bits is not None), []).append((setting.weight_bits, r[metric]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    titles = ("weights only (first/last W8)", "weights + activations (WbAb, first/last W8 float input)")
    for ax, with_act, title in zip(axes, (False, True), titles):
        methods = [m for (m, act) in series if act == with_act]
        for method in sorted(dict.fromkeys(methods), key=lambda m: list(STYLE).index(m) if m in STYLE else 99):
            pts = sorted(series[(method, with_act)])
            color, marker, ls = STYLE.get(method, ("black", "x", ":"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls, color=color, label=method)
        if float_value is not None:
            ax.axhline(float_value, color="black", ls=":", lw=1, label="float")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("bits" if with_act else "weight bits")
        ax.set_xticks([2, 3, 4] if not with_act else [2, 4])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean Dice vs labels" if metric == "mean_dice" else "mean Dice vs float prediction")
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    net = data.get("meta", {}).get("network", "")
    fig.suptitle(f"{os.path.basename(str(net))}: {metric}", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    out = out or os.path.splitext(results)[0] + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import fire

    if len(sys.argv) > 1 and sys.argv[1] not in ("plot", "--help", "-h"):
        sys.argv.insert(1, "plot")
    fire.Fire({"plot": plot})
