"""The bundle's quantize run under torchrun (2 CPU processes, gloo): rank 0 quantizes, rank 1 loads its packed
checkpoint, the metrics are gathered across ranks, and the Dice equals the single-process run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "brain_tissue_mri_segmentation")
CONFIGS = [
    os.path.join(BUNDLE, "configs", name) for name in ("common.json", "evaluate.json", "quantize.json")
]
MULTI = [os.path.join(BUNDLE, "configs", name) for name in ("multi_gpu_evaluate.json", "multi_gpu_quantize.json")]
SETTINGS = [
    "--bundle_root", BUNDLE, "--num_threads", "1", "--max_eval_volumes", "2", "--calib_roi_size", "[32,32,32]",
    "--iterations", "3", "--weight_bits", "4", "--act_bits", "4",
]
RUN = ["-m", "monai.bundle", "run", "quantize", "--workflow_name", "monai_efficientq.workflow.EfficientQWorkflow"]

pytest.importorskip("torch.distributed")


def _run(command: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_processes_give_the_single_process_dice_and_checkpoint(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run([sys.executable, *RUN, "--config_file", str(CONFIGS), *SETTINGS, "--output_dir", str(single)], tmp_path)
    done = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *RUN,
         "--config_file", str(CONFIGS + MULTI), *SETTINGS, "--output_dir", str(multi)],
        tmp_path,
    )
    assert done.stdout.count("Engine run finished") >= 2  # rank 0's two evaluations (rank 1 logs warnings only)
    reports = [json.loads((folder / "model_quantized_report.json").read_text()) for folder in (single, multi)]
    for model in ("float", "quantized"):
        for name, value in reports[0]["dice"][model].items():
            assert reports[1]["dice"][model][name] == pytest.approx(value, abs=1e-6), (model, name)
    # rank 0 quantized on the same volume with the same settings and threads: the same bytes
    assert (single / "model_quantized.pt").read_bytes() == (multi / "model_quantized.pt").read_bytes()
    per_case = (multi / "model_quantized_dice" / "quantized" / "val_mean_dice_raw.csv").read_text().splitlines()
    assert len(per_case) == 3  # header + both cases: the metric details were gathered from both ranks
