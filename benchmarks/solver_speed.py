"""Solver speed: our factor-once ADMM (Cholesky / Woodbury) vs a plain per-iteration ``torch.linalg.solve``.

Both solvers get the same Gram statistics and must produce the same iterates (checked: identical codes,
V within 1e-6 relative); only ``solve()`` is timed, in the same process.

    python benchmarks/solver_speed.py --threads 2 [--naive_iterations 200] [--device cpu]
"""

from __future__ import annotations

import json
import platform
import time

import fire
import torch
from torch import nn

from monai_efficientq.layers import input_patches, output_matrix, weight_matrix
from monai_efficientq.quantizer import UniformGrid
from monai_efficientq.solver import LayerSolver, SolverSettings


def _accumulated(c_in: int, c_out: int, size: int, mode: str, iterations: int, device: str) -> LayerSolver:
    torch.manual_seed(0)
    layer = nn.Conv3d(c_in, c_out, 3, padding=1).to(device)
    x = torch.relu(torch.randn(1, c_in, size, size, size, device=device))
    with torch.no_grad():
        y = layer(x)
    w = weight_matrix(layer).detach()
    b = layer.bias.detach().reshape(w.shape[0], w.shape[1])
    y_mat = output_matrix(layer, y)
    settings = SolverSettings(iterations=iterations, solver=mode, record_history=True, rtn_candidate=False)
    solver = LayerSolver(w, b, UniformGrid(2, "nozero"), True, settings, y_mat.shape[-1])
    for cols, patches in input_patches(layer, x, 256 * 2**20, torch.float64):
        solver.add(patches, y_mat[..., cols])
    return solver


def _timed_solve(solver: LayerSolver, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    sol = solver.solve()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return sol, time.perf_counter() - t0


def run(threads: int = 2, iterations: int = 200, naive_iterations: int | None = None, device: str = "cpu") -> list:
    """Time both solvers on the two layers of the brief.

    Args:
        threads: torch intra-op threads.
        iterations: ADMM iterations of the fast solver.
        naive_iterations: iterations of the plain solver (default: ``iterations``); with fewer, the per-iteration
            times are compared over the common iterations.
        device: cpu or cuda.
    """
    torch.set_num_threads(threads)
    rows = []
    for name, c_in, c_out, size in (("Conv3d 32->32, 3^3, 64^3 input", 32, 32, 64),
                                    ("Conv3d 128->128, 3^3, 8^3 input", 128, 128, 8)):
        n_naive = naive_iterations or iterations
        base = _accumulated(c_in, c_out, size, "auto", iterations, device)
        naive = _accumulated(c_in, c_out, size, "naive", n_naive, device)
        fast_mode = base.mode
        sol_fast, t_fast = _timed_solve(base, device)
        sol_naive, t_naive = _timed_solve(naive, device)
        common = min(iterations, n_naive)
        same_codes = all(torch.equal(a["codes"], b["codes"]) for a, b in zip(sol_fast.history[:common], sol_naive.history[:common]))
        max_rel_v = max(float((a["v"] - b["v"]).norm() / b["v"].norm()) for a, b in zip(sol_fast.history[:common], sol_naive.history[:common]))
        per_fast, per_naive = t_fast / iterations, t_naive / n_naive
        row = {
            "layer": name, "fast_solver": fast_mode, "iterations_fast": iterations, "iterations_naive": n_naive,
            "fast_s": round(t_fast, 3), "naive_s": round(t_naive, 3),
            "speedup_per_iteration": round(per_naive / per_fast, 1), "same_codes": same_codes,
            "max_rel_diff_v": max_rel_v,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {threads}, device {device}")
    return rows


if __name__ == "__main__":
    fire.Fire(run)
