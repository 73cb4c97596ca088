"""CPU smoke test of benchmarks/compare.py: a tiny random-weight MONAI net, NIfTI data written to a tmp dir."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_KWARGS = {
    "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8, 16], "strides": [2, 2],
    "num_res_units": 1, "norm": "batch",
}


def _load(name: str):
    return importlib.import_module(f"benchmarks.{name}")


@pytest.fixture(scope="module")
def compare():
    return _load("compare")


def _phantom(shape, seed):
    """Nested ellipsoids: label 0 outside, 1/2 in shells; image intensities per class + noise, 0 outside."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    label = np.zeros(shape, np.uint8)
    label[r < 0.9] = 1
    label[r < 0.5] = 2
    image = (label * 50.0 + 20.0 + rng.normal(0, 5, shape)) * (label > 0)
    return image.astype(np.float32), label


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from monai.networks.nets import UNet

    root = tmp_path_factory.mktemp("compare_data")
    items = []
    for i in range(3):
        image, label = _phantom((20, 24, 18), seed=i)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(root / f"lab{i}.nii.gz"))
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    with open(root / "datalist.json", "w") as f:
        json.dump({"evaluation": items[1:], "calibration": items[0], "labels": {"0": "bg", "1": "a", "2": "b"}}, f)
    torch.manual_seed(0)
    net = UNet(**UNET_KWARGS).eval()
    torch.save(net.state_dict(), root / "unet.pt")
    return root


def _run(compare, data, out, methods, settings="W4", **kw):
    return compare.run(
        network="monai.networks.nets.UNet", network_kwargs=json.dumps(UNET_KWARGS),
        checkpoint=str(data / "unet.pt"), eval_datalist=str(data / "datalist.json"),
        methods=methods, settings=settings, out=str(out), roi_size=16, iterations=3, threads=1, isolate=False,
        calib_roi=kw.pop("calib_roi", "full"), **kw,
    )


def _check_dice(values):
    assert values, "no Dice values"
    for v in values.values():
        assert v is None or (0.0 <= v <= 1.0 and not math.isnan(v))


def test_compare_ours_w4(compare, data, tmp_path):
    out = tmp_path / "results.json"
    _run(compare, data, out, "rtn,eq_default")
    results = json.loads(out.read_text())
    rows = {(r["method"], r["setting"]): r for r in results["rows"]}
    assert set(rows) == {("float", "float"), ("rtn", "W4"), ("eq_default", "W4")}

    flt = rows[("float", "float")]
    assert flt["status"] == "ok" and flt["cases"] == 2
    assert list(flt["dice"]) == ["a", "b"]  # class names from the datalist, background excluded
    _check_dice(flt["dice"])
    assert flt["mean_dice_vs_float"] == 1.0

    for key in [("rtn", "W4"), ("eq_default", "W4")]:
        row = rows[key]
        assert row["status"] == "ok", row.get("traceback")
        assert row["weight_bits"] == 4 and row["act_bits"] is None
        _check_dice(row["dice"])
        _check_dice(row["dice_vs_float"])
        assert 0.0 <= row["mean_dice"] <= 1.0
        assert 0.5 <= row["mean_dice_vs_float"] <= 1.0  # 4-bit weights barely move a prediction
        assert row["quant_seconds"] > 0 and row["peak_memory_mb"] > 0
        assert 0 < row["checkpoint_bytes"] < results["meta"]["float_checkpoint_bytes"]
        assert row["layers_total"] == len(results["meta"]["quantized_layers"]) > 2
    assert rows[("rtn", "W4")]["layers_optimised"] == 0
    assert results["meta"]["calib_crop"]["size"] == [32, 32, 32]  # whole volume padded to multiples of 16
    md = (tmp_path / "results.md").read_text()
    assert "| eq_default | W4 |" in md and "| rtn | W4 |" in md

    pytest.importorskip("matplotlib")
    png = _load("plot").plot(str(out))
    assert os.path.getsize(png) > 0


def test_calibration_crop_is_the_bundle_protocol():
    from benchmarks.data import calibration_set
    from monai_efficientq.transforms import CalibrationCrop

    image = torch.zeros(1, 40, 40, 40)
    image[:, 25:35, 5:15, 18:22] = 1.0
    label = (image > 0).float()
    calib = calibration_set([(image, label)], (16, 16, 20), divisor=16)
    assert calib.image.shape == (1, 1, 16, 16, 32)  # the ROI padded *up* to multiples of 16, as CalibrationCrop does
    assert torch.equal(calib.image[0], CalibrationCrop((16, 16, 20), divisible_by=16)(image))
    assert torch.equal(calib.label, calib.image)  # the label gets the image's box
    assert calib.box["start"] == [22, 2, 10] and calib.box["end"] == [38, 18, 30]
    assert calib.image.sum() == image.sum()  # the foreground is inside the crop
    whole = calibration_set([(torch.ones(2, 10, 33, 16), None)], None, 16)
    assert whole.image.shape == (1, 2, 16, 48, 16) and whole.label is None


def test_run_data_calibrates_on_the_bundle_pipeline(data):
    """The comparison's calibration batch is the one io.load_calibration (LoadImaged, NormalizeIntensityd,
    CalibrationCropd: the bundle's protocol) gives for the datalist's calibration item."""
    from benchmarks.config import CompareConfig
    from benchmarks.data import load_run_data
    from monai_efficientq.io import load_calibration

    cfg = CompareConfig(eval_datalist=str(data / "datalist.json"), calib_roi=16, out=None)
    run_data = load_run_data(cfg)
    image, label = load_calibration(str(data / "img0.nii.gz"), str(data / "lab0.nii.gz"), roi_size=16)
    assert torch.equal(run_data.calibration.image[0], image)
    assert torch.equal(run_data.calibration.label[0], label)
    assert run_data.calibration.box["size"] == [16, 16, 16] and run_data.calibration.box["volume"] == [20, 24, 18]
    assert run_data.class_names == ["bg", "a", "b"]
    assert len(run_data.cases) == 2 and run_data.cases[0][0].shape == (1, 20, 24, 18)
    assert run_data.eval_images == [str(data / "img1.nii.gz"), str(data / "img2.nii.gz")]


def test_compare_brevitas_w4(compare, data, tmp_path):
    pytest.importorskip("brevitas")
    out = tmp_path / "brevitas.json"
    _run(compare, data, out, "brevitas_rtn,brevitas_gptq")
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    for method in ("brevitas_rtn", "brevitas_gptq"):
        row = rows[method]
        assert row["status"] == "ok", row.get("traceback")
        _check_dice(row["dice"])
        assert 0.5 <= row["mean_dice_vs_float"] <= 1.0
    gptq = rows["brevitas_gptq"]
    # Brevitas GPTQ skips ConvTranspose: the UNet's two up-sampling layers stay round-to-nearest
    assert gptq["layers_optimised"] == gptq["layers_total"] - 2
    assert all("ConvTranspose3d" in n for n in gptq["layers_not_optimised"])


def test_merge_keeps_the_first_row_and_pivot_marks_missing_runs(tmp_path):
    merge = _load("merge_results")

    def row(method, setting, dice):
        return {"method": method, "setting": setting, "status": "ok", "mean_dice": dice, "quant_seconds": 2.0,
                "peak_memory_mb": 100.0, "checkpoint_bytes": 2048, "layers_optimised": 3, "layers_total": 4}

    new = {"meta": {"command": "new"}, "rows": [
        {"method": "float", "setting": "float", "status": "ok", "mean_dice": 0.9, "checkpoint_bytes": 8192},
        row("eq_default", "W2", 0.85)]}
    old = {"meta": {"command": "old"}, "rows": [row("eq_default", "W2", 0.80), row("rtn", "W2A2", 0.5)]}
    paths = []
    for name, data in (("new", new), ("old", old)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(data, f)
    merge.merge(*paths, out=str(tmp_path / "all.json"), pivot=str(tmp_path / "all.md"))
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [r["mean_dice"] for r in merged["rows"] if r["method"] == "eq_default"] == [0.85]  # the rerun wins
    assert [c["command"] for c in merged["meta"]["merged_from"]] == ["new", "old"]
    table = (tmp_path / "all.md").read_text().splitlines()
    assert table[0].startswith("| method | W2 mean Dice | W2A2 mean Dice |")
    assert [line.split(" | ")[0] for line in table[2:]] == ["| float", "| rtn", "| eq_default"]
    assert "| rtn | not run | 0.5000 | not run |" in table[3]
    assert table[4].startswith("| eq_default | 0.8500 | not run | 2 | 100 | 2 | 3/4 |")


def test_eq_options_and_several_calibration_volumes_reach_our_rows(compare, data, tmp_path):
    out = tmp_path / "options.json"
    two = f"{data / 'img0.nii.gz'},{data / 'img1.nii.gz'}"  # two calibration volumes, one batch
    _run(compare, data, out, "eq_default", eq_options={"calib_augment": 0, "holdout": "false", "eta_factor": 0.5},
         calib_image=two)
    results = json.loads(out.read_text())
    assert results["meta"]["calib_shape"] == [2, 1, 32, 32, 32]
    assert results["meta"]["eq_options"] == {"calib_augment": 0, "holdout": False, "eta_factor": 0.5}
    (row,) = [r for r in results["rows"] if r["method"] == "eq_default"]
    assert row["status"] == "ok", row.get("traceback")
    assert '"eta_factor": 0.5' in (tmp_path / "options.md").read_text()


def test_the_command_line_runs_as_written_in_the_docs(data, tmp_path):
    """``python benchmarks/compare.py run ...`` (a file inside the package) imports the package and writes both files."""
    out = tmp_path / "cli.json"
    command = [
        sys.executable, os.path.join(REPO, "benchmarks", "compare.py"), "run", "--network", "monai.networks.nets.UNet",
        "--network_kwargs", json.dumps(UNET_KWARGS), "--checkpoint", str(data / "unet.pt"),
        "--eval_datalist", str(data / "datalist.json"), "--methods", "float,rtn", "--settings", "W4",
        "--roi_size", "16", "--calib_roi", "full", "--threads", "1", "--isolate", "False", "--out", str(out),
    ]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| rtn | W4 |" in done.stdout
    rows = {(r["method"], r["setting"]): r for r in json.loads(out.read_text())["rows"]}
    assert rows[("rtn", "W4")]["status"] == "ok"
    assert (tmp_path / "cli.md").is_file()


def test_merge_labels_variant_rows(tmp_path):
    merge = _load("merge_results")
    rows = [{"method": "float", "setting": "float", "status": "ok", "mean_dice": 0.9, "checkpoint_bytes": 8192},
            {"method": "eq_default", "setting": "W2", "status": "ok", "mean_dice": 0.8}]
    variant = [{"method": "eq_default", "setting": "W2", "status": "ok", "mean_dice": 0.85}]
    for name, data in (("a", rows), ("b", variant)):
        with open(tmp_path / f"{name}.json", "w") as f:
            json.dump({"meta": {"command": name}, "rows": data}, f)
    merge.merge(str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}#no attention", out=str(tmp_path / "all.json"),
                pivot=str(tmp_path / "all.md"))
    merged = json.loads((tmp_path / "all.json").read_text())
    assert [(r["method"], r["mean_dice"]) for r in merged["rows"]] == [
        ("float", 0.9), ("eq_default", 0.8), ("eq_default (no attention)", 0.85)]
    table = (tmp_path / "all.md").read_text()
    assert "| eq_default (no attention) | 0.8500 |" in table
