"""Speed of the published EfficientQ code vs ours, same SegResNet weights and calibration volume, CPU, 1 thread.

The published code (https://github.com/rongzhao-zhang/EfficientQ, MIT licence) is not part of this repository:
check it out anywhere and pass its root with ``--published_path``. It is imported from there at run time and
never copied or edited; the adaptations it needs are made from this script, in the worker process only:

* ``utils.tester`` (testers, trainer, TensorBoard-era training code) is replaced by an empty stub module, and
  ``pytz`` / ``sklearn.metrics`` by stubs when they are not installed (only used for time stamps and AUC, off the
  quantization path). No extra package has to be installed; ``matplotlib`` (imported by ``ptqer``) is.
* Its network class (UResQ) and data loaders are not used: every ``nn.Conv3d`` of the MONAI SegResNet is
  replaced by its ``models.EfficientQConv`` with the same weights (first and last conv executed: 256 weight
  levels and float input, i.e. its ``--q_first 256,-1 --q_last 256,-1``; the others ``qlvl = 2**bits``), and
  ``lwq_iter`` (hard-coded to 200 in its ``__init__``) is set to the requested iteration count.
* The quantizing pass is then driven as its ``ptqer.do_ptq`` does from "infer once" to the quantizing forward:
  its ``models.hooks.forward_hook`` records each conv's float output, ``ptqer.get_att_weight_map`` /
  ``get_mask_pyramid`` (``task='brats'``, i.e. sigmoid multi-label, ``init_stride='1'``) build the attention
  pyramid, ``ptqer.set_mask`` / ``set_anything(..., 'layer_loss', ...)`` / ``set_quantizing`` and one forward
  under ``torch.no_grad`` quantize layer by layer; ``set_quantized`` gives the quantized network. Its
  ``output_fp[-1]`` convention (deep-supervision outputs stacked first) is met by passing ``output[None]``.
* ``published_rtn`` (the published code ships no round-to-nearest baseline): the same network, with
  ``EfficientQConv.ptq`` replaced at run time by a rounding step built from its own ``project_by_iter``
  (the activation range fit its ADMM uses, and the weight projection of one ADMM step applied to the float
  weights), so the rounding uses its quantizers and ranges.

Each (implementation, iterations) runs in its own subprocess with OMP/MKL/OpenBLAS threads 1 and
``torch.set_num_threads(1)``. Timed (``time.process_time`` and wall clock): the quantizing pass only, i.e. for
the published code from the float reference forward to the end of the quantizing forward (its own ``t0..t2``),
for ours the ``quantize_network`` call (which includes its own float forward). Network construction, loading
and the error evaluation are not timed. The error is ``‖q − f‖² / ‖f‖²`` of the logits on a held-out seeded
volume (and on the calibration volume).

    python benchmarks/published_speed.py --published_path /tmp/published_efficientq --iterations 20,200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import types
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (1, 4, 32, 32, 32)
DEFAULT_EQ_OPTIONS = [{}, {"calib_augment": 0, "holdout": False}]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def _network():
    """The benchmarked SegResNet (random weights are loaded from the shared file by the workers)."""
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 2, 2, 4),
                     blocks_up=(1, 1, 1))


def smooth_volume(seed: int, shape: tuple[int, ...] = SHAPE):
    """A seeded smooth synthetic multi-channel volume, standardized per channel.

    Gaussian-smoothed white noise (sigma 2 voxels) plus a few seeded ellipsoidal blobs per channel, so the
    volume has structure at several scales; each channel is then zero-mean, unit-variance (as the published
    code expects its BraTS inputs).

    Args:
        seed: generator seed.
        shape: ``(N, C, D, H, W)``.

    Returns:
        A float32 tensor of ``shape``.
    """
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    n, c, *spatial = shape
    x = torch.randn(shape, generator=g)
    r = torch.arange(-6, 7, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (r / 2.0) ** 2)
    k1 = k1 / k1.sum()
    for dim in range(3):
        view = [1, 1, 1, 1, 1]
        view[2 + dim] = k1.numel()
        kernel = k1.reshape(view).repeat(c, 1, 1, 1, 1)
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = 6
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel, groups=c)
    x = x / x.flatten(2).std(-1).reshape(n, c, 1, 1, 1)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, s) for s in spatial], indexing="ij"))
    for ch in range(c):
        for _ in range(3):
            centre = (torch.rand(3, 1, 1, 1, generator=g) - 0.5) * 1.2
            radii = 0.1 + 0.25 * torch.rand(3, 1, 1, 1, generator=g)
            amp = 1.0 + 2.0 * torch.rand(1, generator=g)
            inside = (((grid - centre) / radii) ** 2).sum(0) <= 1.0
            x[:, ch][:, inside] += amp
    mean = x.flatten(2).mean(-1).reshape(n, c, 1, 1, 1)
    std = x.flatten(2).std(-1).reshape(n, c, 1, 1, 1)
    return ((x - mean) / std).contiguous()


def prepare(folder: str) -> dict[str, str]:
    """Save the seeded network weights, the calibration and the held-out volume once.

    Args:
        folder: where to write ``weights.pt``, ``calib.pt``, ``holdout.pt``.

    Returns:
        The three paths by name.
    """
    import torch

    torch.manual_seed(0)
    net = _network().eval()
    paths = {name: os.path.join(folder, f"{name}.pt") for name in ("weights", "calib", "holdout")}
    torch.save(net.state_dict(), paths["weights"])
    torch.save(smooth_volume(0), paths["calib"])
    torch.save(smooth_volume(1), paths["holdout"])
    return paths


# ----------------------------------------------------------------------------------------------- workers


def _rel_err(q, f) -> float:
    return float((q - f).double().pow(2).sum() / f.double().pow(2).sum())


def _load(spec: dict):
    import torch

    net = _network()
    net.load_state_dict(torch.load(spec["weights"], map_location="cpu"))
    net.eval()
    calib = torch.load(spec["calib"])
    hold = torch.load(spec["holdout"])
    with torch.no_grad():
        ref = {"calib": net(calib), "holdout": net(hold)}
    return net, calib, hold, ref


def _import_published(path: str) -> types.SimpleNamespace:
    """Import the published modules from ``path/src``, stubbing what is off the quantization path."""
    import importlib.util

    src = os.path.join(os.path.abspath(path), "src")
    if not os.path.isfile(os.path.join(src, "ptqer.py")):
        raise FileNotFoundError(f"{src}/ptqer.py not found: --published_path must be the root of a checkout of "
                                "github.com/rongzhao-zhang/EfficientQ")
    sys.path.insert(0, src)
    if importlib.util.find_spec("pytz") is None:  # utils.misc: time stamps only
        sys.modules["pytz"] = types.ModuleType("pytz")
    if importlib.util.find_spec("sklearn") is None:  # utils.metrics: AUC only
        sk, skm = types.ModuleType("sklearn"), types.ModuleType("sklearn.metrics")

        def roc_auc_score(*args, **kwargs):
            raise RuntimeError("sklearn stub: not needed for quantization")

        skm.roc_auc_score = roc_auc_score
        sk.metrics = skm
        sys.modules.update({"sklearn": sk, "sklearn.metrics": skm})
    import utils  # noqa: F401  (the published package, from src)

    tester = types.ModuleType("utils.tester")  # testers pull in the whole training stack; unused here
    tester.Tester = tester.PTQTester = type("TesterStub", (), {})
    sys.modules["utils.tester"] = tester
    utils.tester = tester
    import ptqer
    from models.EfficientQConv import EfficientQConv
    from models.hooks import forward_hook
    from models.layer_helper import project_by_iter

    return types.SimpleNamespace(ptqer=ptqer, EfficientQConv=EfficientQConv, forward_hook=forward_hook,
                                 project_by_iter=project_by_iter)


def _conv_order(net, x) -> list[str]:
    """Names of the Conv3d layers in execution order."""
    import torch
    from torch import nn

    order: list[str] = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: order.append(n))
               for n, m in net.named_modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return order


def _to_published(net, pub, calib, weight_bits: int, act_bits: int, iterations: int) -> int:
    """Swap every Conv3d of ``net`` for the published EfficientQConv (same weights). Returns the layer count."""
    import torch

    order = _conv_order(net, calib)
    edge = {order[0], order[-1]}
    modules = dict(net.named_modules())
    for name in order:
        conv = modules[name]
        first_last = name in edge
        new = pub.EfficientQConv(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                 conv.dilation, conv.groups, conv.bias is not None, q_weight=True,
                                 qlvl=256 if first_last else 2**weight_bits, q_act=not first_last,
                                 qlvl_act=-1 if first_last else 2**act_bits, lwq_verbose=False)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.lwq_iter = iterations
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else net, child, new)
    return len(order)


def _published_rtn_ptq(pub):
    """A rounding-only ``ptq`` for EfficientQConv built from the published ``project_by_iter``."""
    import torch

    def ptq(self, x):
        if self.q_act:
            a_act, _ = pub.project_by_iter(x.detach(), self.qlvl_act, 0, 1)
            self.alpha_act.data = torch.tensor(a_act, dtype=x.dtype, device=x.device)
        a_w, b_w = pub.project_by_iter(self.weight.data, self.qlvl_w, -1, 1)
        self.weight.data = (a_w * b_w).to(self.weight.dtype)
        self.alpha_w.data = torch.tensor(a_w, dtype=x.dtype, device=x.device)

    return ptq


def _time_published_phases(pub) -> dict[str, float]:
    """Wrap the published solver set-up, linear solves and range projections with CPU-time accumulators."""
    eqc_module = sys.modules["models.EfficientQConv"]  # the package re-exports the class under the same name
    solver_module = sys.modules["models.solver"]

    phases = {"im2col_gram": 0.0, "linear_solve": 0.0, "range_projection": 0.0}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[key] += time.process_time() - t0

        return wrapper

    solver_module.QuadraSolver.__init__ = timed(solver_module.QuadraSolver.__init__, "im2col_gram")
    solver_module.QuadraSolver.solve = timed(solver_module.QuadraSolver.solve, "linear_solve")
    eqc_module.project_by_iter = timed(eqc_module.project_by_iter, "range_projection")
    return phases


def _worker_published(spec: dict, rtn: bool) -> dict:
    import torch

    pub = _import_published(spec["published_path"])
    phases = {} if rtn else _time_published_phases(pub)
    net, calib, hold, ref = _load(spec)
    n_layers = _to_published(net, pub, calib, spec["weight_bits"], spec["act_bits"], spec["iterations"] or 1)
    ptqer = pub.ptqer
    if rtn:
        pub.EfficientQConv.ptq = _published_rtn_ptq(pub)
    layer_loss: list[str] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    ptqer.set_name(net)
    ptqer.set_fp(net)
    if not rtn:  # do_ptq: record float outputs, build the attention pyramid (its task='brats': sigmoid)
        handles = [m.register_forward_hook(pub.forward_hook) for m in net.modules()
                   if isinstance(m, pub.EfficientQConv)]
        output_fp = net(calib).detach()
        body_mask = (calib[:, 0] != 0.0).bool()
        weight_map, _ = ptqer.get_att_weight_map(output_fp[None], torch.ones_like(calib[:, 0]).bool(), "p:0.5",
                                                 task="brats")
        pyramid = ptqer.get_mask_pyramid(output_fp[None], body_mask, weight_map, "1", num_lvls=5, task="brats")
        ptqer.set_mask(net, pyramid)
        for h in handles:
            h.remove()
    ptqer.set_anything(net, "layer_loss", layer_loss)
    ptqer.set_quantizing(net)
    with torch.no_grad():
        net(calib)
    ptqer.set_quantized(net)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    with torch.no_grad():
        err = {k: _rel_err(net(x), ref[k]) for k, x in (("calib", calib), ("holdout", hold))}
    admm_layers = sum(isinstance(m, pub.EfficientQConv) for m in net.modules()) if not rtn else 0
    if phases:
        phases["other"] = cpu - sum(phases.values())
    return {"cpu_s": cpu, "wall_s": wall, "rel_err_holdout": err["holdout"], "rel_err_calib": err["calib"],
            "layers": n_layers, "iterations_run_mean": float(spec["iterations"]) if admm_layers else 0.0,
            "phase_cpu_seconds": {k: round(v, 3) for k, v in phases.items()}}


def _worker_ours(spec: dict, rtn: bool) -> dict:
    import torch

    from monai_efficientq import EfficientQConfig, quantize_network

    net, calib, hold, ref = _load(spec)
    extra = dict(spec.get("eq_options") or {})
    if rtn:
        extra["method"] = "rtn"
    cfg = EfficientQConfig(weight_bits=spec["weight_bits"], act_bits=spec["act_bits"],
                           iterations=spec["iterations"] or 1, prediction="sigmoid", progress=False, **extra)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    qnet, report = quantize_network(net, calib, cfg)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    qnet.eval()
    with torch.no_grad():
        err = {k: _rel_err(qnet(x), ref[k]) for k, x in (("calib", calib), ("holdout", hold))}
    runs = [getattr(rec, "iterations_run", 0) for rec in report.layers]
    return {"cpu_s": cpu, "wall_s": wall, "rel_err_holdout": err["holdout"], "rel_err_calib": err["calib"],
            "layers": len(report.layers), "iterations_run_mean": sum(runs) / max(len(runs), 1),
            "phase_wall_seconds": {k: round(v, 3) for k, v in (getattr(report, "phase_seconds", None) or {}).items()},
            "config": {k: v for k, v in report.config.items() if k in _CONFIG_KEYS}}


_CONFIG_KEYS = ("preset", "weight_scale", "weight_grid", "act_mode", "act_fit", "best_iterate_error", "rtn_candidate",
                "rho_schedule", "class_weights", "calib_augment", "holdout", "patience", "solver", "solver_dtype")


def worker(spec_path: str) -> None:
    """Run one (implementation, iterations) case described by a JSON spec and write its result next to it."""
    import torch

    torch.set_num_threads(1)
    with open(spec_path) as f:
        spec = json.load(f)
    impl = spec["impl"]
    if impl in ("published", "published_rtn"):
        row = _worker_published(spec, rtn=impl == "published_rtn")
    elif impl in ("ours", "ours_rtn"):
        row = _worker_ours(spec, rtn=impl == "ours_rtn")
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["torch_threads"] = torch.get_num_threads()
    with open(spec["result"], "w") as f:
        json.dump(row, f)


# ----------------------------------------------------------------------------------------------- driver


def _cases(impls: list[str], iterations: list[int], eq_options: list[dict]) -> list[dict]:
    cases = []
    if "published_rtn" in impls:
        cases.append({"impl": "published_rtn", "iterations": None, "eq_options": None})
    if "ours_rtn" in impls:
        cases.append({"impl": "ours_rtn", "iterations": None, "eq_options": None})
    for n in iterations:
        if "published" in impls:
            cases.append({"impl": "published", "iterations": n, "eq_options": None})
        if "ours" in impls:
            cases.extend({"impl": "ours", "iterations": n, "eq_options": opts} for opts in eq_options)
    return cases


def _label(case: dict) -> str:
    if case["impl"] != "ours":
        return case["impl"]
    opts = case["eq_options"]
    return "ours " + (json.dumps(opts, separators=(",", ":")) if opts else "(default config)")


def _table(rows: list[dict]) -> list[str]:
    lines = ["| implementation | ADMM iterations | iterations run / layer | CPU s | wall s | rel. error held-out | "
             "rel. error calib | layers | peak RSS MB | load before |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['iterations'] or '–'} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['label']} | {r['iterations'] or '–'} | {r['iterations_run_mean']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['wall_s']:.1f} | {r['rel_err_holdout']:.4f} | {r['rel_err_calib']:.4f} | {r['layers']} | "
                     f"{r['peak_rss_mb']:.0f} | {r['load_before']:.2f} |")
    return lines


def _ratios(rows: list[dict]) -> list[str]:
    """Markdown lines: published CPU seconds / ours, at each iteration count."""
    ok = [r for r in rows if "error" not in r]
    lines = []
    for pub in (r for r in ok if r["impl"] == "published"):
        for ours in (r for r in ok if r["impl"] == "ours" and r["iterations"] == pub["iterations"]):
            lines.append(f"- {pub['iterations']} iterations: published / {ours['label']} CPU time = "
                         f"{pub['cpu_s'] / ours['cpu_s']:.1f}x")
    return lines + [""] if lines else []


def _run_case(case: dict, paths: dict[str, str], settings: dict[str, Any], index: int, tmp: str,
              timeout: float) -> dict:
    """Run one case in its own subprocess (one thread) and return its row (``error`` set when it failed)."""
    spec = dict(case, **paths, **settings, result=os.path.join(tmp, f"result_{index}.json"))
    spec_path = os.path.join(tmp, f"spec_{index}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    row = {"label": _label(case), **case, "load_before": os.getloadavg()[0]}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker_spec", spec_path],
                              env=dict(os.environ, **THREAD_ENV), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timeout after {timeout:.0f} s"
        return row
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"
        print(proc.stderr[-3000:], file=sys.stderr)
    else:
        with open(spec["result"]) as f:
            row.update(json.load(f))
    return row


def _markdown(meta: dict[str, Any], rows: list[dict], command: str) -> str:
    """The Markdown report: the setup, the table, the speed ratios and where the time goes."""
    weight_bits, act_bits = meta["weight_bits"], meta["act_bits"]
    phases = [f"- {r['label']}, {r['iterations'] or '–'} it.: "
              + ", ".join(f"{k} {v:.1f}" for k, v in (r.get("phase_cpu_seconds") or r.get("phase_wall_seconds")).items())
              for r in rows if r.get("phase_cpu_seconds") or r.get("phase_wall_seconds")]
    return "\n".join([
        "# Published EfficientQ code vs ours: quantizing-pass time",
        "",
        f"Command: `{command}`",
        "",
        f"- Machine: {meta['machine']}.",
        f"- Case: {meta['network']}, random weights; sigmoid (multi-label) attention; one calibration volume "
        f"{'x'.join(map(str, SHAPE))} (seeded smooth synthetic), W{weight_bits}A{act_bits}, first/last layer "
        "8-bit weights with float input.",
        "- Published code: github.com/rongzhao-zhang/EfficientQ (MIT), imported from `--published_path`, its "
        "`EfficientQConv` swapped in for every Conv3d and driven like its `ptqer.do_ptq` (see the script docstring). "
        "`published_rtn` is not shipped by it: rounding with its `project_by_iter` ranges.",
        "- Timed: the quantizing pass only (published: float reference forward + attention + quantizing forward; "
        "ours: the `quantize_network` call). Error: ‖q−f‖²/‖f‖² of the logits on a held-out seeded volume "
        "(and on the calibration volume).",
        f"- Versions: torch {meta['torch']}; ours git {meta['ours']['git_head'][:10]}"
        f"{' + uncommitted package edits' if meta['ours']['package_dirty'] else ''} (package sources sha1 "
        f"{meta['ours']['package_sources_sha1'][:10]}); published git {meta['published']['git_head'][:10]}.",
        "",
        *_table(rows),
        "",
        *_ratios(rows),
        "Where the time goes (published: CPU s in its solver set-up = numpy im2col + Gram, its per-iteration "
        "`torch.linalg.solve`, its `project_by_iter` range fits, and the rest; ours: the report's wall-time phases):",
        "",
        *phases,
        "",
    ])


def run(published_path: str, iterations: list[int], eq_options: list[dict], impls: list[str], out_dir: str,
        weight_bits: int = 2, act_bits: int = 2, timeout: float = 3600.0, machine_note: str = "",
        command: str = "") -> list[dict]:
    """Prepare the shared weights and volumes, run every case in its own subprocess, write the results.

    Args:
        published_path: root of a checkout of the published EfficientQ repository.
        iterations: ADMM iteration counts.
        eq_options: one extra ``EfficientQConfig`` field dict per "ours" row.
        impls: subset of ``published``, ``published_rtn``, ``ours``, ``ours_rtn``.
        out_dir: where ``published_speed.md`` and ``published_speed.json`` are written.
        weight_bits: inner-layer weight bits.
        act_bits: inner-layer activation bits.
        timeout: seconds per case.
        machine_note: what else ran on the machine, for the Markdown header.
        command: the command line, for the Markdown header.

    Returns:
        One dict per case.
    """
    load_before = os.getloadavg()
    settings = {"published_path": published_path, "weight_bits": weight_bits, "act_bits": act_bits}
    rows = []
    with tempfile.TemporaryDirectory(prefix="published_speed_") as tmp:
        paths = prepare(tmp)
        print(f"weights and volumes in {tmp}; {SHAPE}, W{weight_bits}A{act_bits}", flush=True)
        for k, case in enumerate(_cases(impls, iterations, eq_options)):
            rows.append(_run_case(case, paths, settings, k, tmp, timeout))
            print(_table([rows[-1]])[-1], flush=True)
    load_after = os.getloadavg()
    print("\n".join(_table(rows)))
    machine = (f"2-core {platform.machine()} CPU ({os.cpu_count()} cores visible), 1 thread per run "
               f"(OMP/MKL/OpenBLAS=1, torch.set_num_threads(1)); 1-min load average {load_before[0]:.2f} at start, "
               f"{load_after[0]:.2f} at end" + (f"; {machine_note}" if machine_note else ""))
    meta = {"command": command, "machine": machine, "python": platform.python_version(), "shape": list(SHAPE),
            "weight_bits": weight_bits, "act_bits": act_bits, "first_last": "8-bit weights, float input",
            "network": "SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, "
                       "blocks_down=(1,2,2,4), blocks_up=(1,1,1)), torch.manual_seed(0)",
            "volumes": "smooth_volume(seed=0) calibration, smooth_volume(seed=1) held-out", **_versions(published_path)}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "published_speed.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(os.path.join(out_dir, "published_speed.md"), "w") as f:
        f.write(_markdown(meta, rows, command))
    return rows


def _versions(published_path: str) -> dict[str, Any]:
    """Versions of torch, of our package (git HEAD, dirty flag, hash of its sources) and of the published code."""
    import hashlib

    import torch

    def git(*args, cwd):
        try:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    root = os.path.dirname(HERE)
    package = os.path.join(root, "monai_efficientq")
    digest = hashlib.sha1()
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return {"torch": torch.__version__,
            "ours": {"git_head": git("rev-parse", "HEAD", cwd=root),
                     "package_dirty": bool(git("status", "--porcelain", "--", "monai_efficientq", cwd=root)),
                     "package_sources_sha1": digest.hexdigest()},
            "published": {"git_head": git("rev-parse", "HEAD", cwd=published_path)}}


def _int_list(text: str) -> list[int]:
    return [int(v) for v in str(text).replace(" ", "").split(",") if v]


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (argparse, so that ``--eq_options`` is plain JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--published_path", default="/tmp/published_efficientq",
                        help="root of a checkout of github.com/rongzhao-zhang/EfficientQ")
    parser.add_argument("--iterations", default="20,200", help="comma-separated ADMM iteration counts")
    parser.add_argument("--eq_options", default=json.dumps(DEFAULT_EQ_OPTIONS),
                        help="JSON object (one 'ours' row) or list of objects (one row each) of extra "
                             "EfficientQConfig fields")
    parser.add_argument("--impls", default="published,published_rtn,ours,ours_rtn",
                        help="comma-separated subset of published, published_rtn, ours, ours_rtn")
    parser.add_argument("--weight_bits", type=int, default=2)
    parser.add_argument("--act_bits", type=int, default=2)
    parser.add_argument("--out_dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    parser.add_argument("--machine_note", default="", help="what else was running, for the Markdown header")
    parser.add_argument("--worker_spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_spec:
        worker(args.worker_spec)
        return
    eq_options = json.loads(args.eq_options)
    if isinstance(eq_options, dict):
        eq_options = [eq_options]
    command = shlex.join(["python", "benchmarks/published_speed.py", *(sys.argv[1:] if argv is None else argv)])
    run(args.published_path, _int_list(args.iterations), eq_options,
        [s for s in args.impls.split(",") if s], args.out_dir, args.weight_bits, args.act_bits, args.timeout,
        args.machine_note, command.strip())


if __name__ == "__main__":
    main()
