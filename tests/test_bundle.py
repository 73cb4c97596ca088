"""The brain-tissue bundle's configs (quantize, inference, evaluate, metadata), its glue and the zoo overlay example.

CPU, reduced settings (32^3 calibration crop, 3 ADMM iterations, one evaluation volume, a random-weight
model), so the file finishes in about a minute and does not depend on the trained model's quality.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from monai.bundle import ConfigParser  # noqa: E402
from monai.bundle import run as bundle_run  # noqa: E402
from monai.networks.nets import SegResNet, UNet  # noqa: E402

import monai_efficientq.bundle as eqb  # noqa: E402
from monai_efficientq import load_quantized  # noqa: E402
from monai_efficientq.modules import QuantizedMixin  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "brain_tissue_mri_segmentation")
CONFIGS = os.path.join(BUNDLE, "configs")
COMMON = os.path.join(CONFIGS, "common.json")
EVALUATE = [COMMON, os.path.join(CONFIGS, "evaluate.json")]
QUANTIZE = [*EVALUATE, os.path.join(CONFIGS, "quantize.json")]  # the layers of the quantize run, merged in order
INFERENCE = [COMMON, os.path.join(CONFIGS, "inference.json")]
SCHEMA = os.path.join(BUNDLE, "schema", "meta_schema_20240725.json")
EXAMPLES = os.path.join(REPO, "bundles", "examples")
CLASSES = ["csf", "gm", "wm"]

# reduced settings shared by the runs below
FAST = {
    "calib_roi_size": 32,
    "iterations": 3,
    "weight_bits": 4,
    "max_eval_volumes": 1,
    "num_threads": 1,
}

needs_data = pytest.mark.skipif(
    not os.path.isfile(os.path.join(BUNDLE, "data", "datalist.json")), reason="bundle data not generated"
)


def segresnet() -> SegResNet:
    return SegResNet(
        spatial_dims=3, in_channels=1, out_channels=4, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
        dropout_prob=0.0,
    )


def chain_text(err: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps config errors in RuntimeError)."""
    parts = []
    while err is not None:
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("float") / "model.pt"
    torch.save(segresnet().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def quantize_run(tmp_path_factory, random_ckpt) -> str:
    """One reduced `quantize` run through the Python API, from a working directory outside the bundle."""
    out = tmp_path_factory.mktemp("quantize_out")
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))  # with bundle_root given, the working directory does not matter
    try:
        bundle_run(
            "quantize", config_file=QUANTIZE, logging_file=False, bundle_root=BUNDLE, ckpt_path=random_ckpt,
            output_dir=str(out), **FAST,
        )
    finally:
        os.chdir(cwd)
    return str(out)


# -- quantize run ----------------------------------------------------------------------------------------------


@needs_data
def test_quantize_outputs(quantize_run):
    out = quantize_run
    files = sorted(os.listdir(out))
    assert files == [
        "metadata_quantized.json", "model_quantized.pt", "model_quantized_dice", "model_quantized_report.json",
        "model_quantized_report.md",
    ]
    qnet = load_quantized(segresnet(), os.path.join(out, "model_quantized.pt"))
    bits = {n: m.weight_bits for n, m in qnet.named_modules() if isinstance(m, QuantizedMixin)}
    assert bits["convInit.conv"] == 8 and bits["conv_final.2.conv"] == 8
    assert {b for n, b in bits.items() if n not in ("convInit.conv", "conv_final.2.conv")} == {4}
    with torch.no_grad():
        assert qnet(torch.randn(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)

    with open(os.path.join(out, "model_quantized_report.json")) as f:
        report = json.load(f)
    assert set(report["dice"]) == {"float", "quantized"}
    for model in ("float", "quantized"):
        assert list(report["dice"][model]) == [*CLASSES, "mean"]
        assert all(0.0 <= v <= 1.0 for v in report["dice"][model].values())
    assert report["config"]["weight_bits"] == 4 and report["config"]["act_bits"] == 2
    assert report["config"]["iterations"] == 3
    assert report["calibration_shape"] == [1, 1, 32, 32, 32]
    assert report["config"]["calib_augment"] == 2 and report["config"]["holdout"]  # the default preset
    # the packed checkpoint carries the same report, Dice included
    state = torch.load(os.path.join(out, "model_quantized.pt"), weights_only=True)
    assert state["report"]["dice"] == report["dice"]
    with open(os.path.join(out, "model_quantized_report.md")) as f:
        assert "## Dice" in f.read()

    for model in ("float", "quantized"):  # MetricsSaver's files, one folder per evaluation
        folder = os.path.join(out, "model_quantized_dice", model)
        assert sorted(os.listdir(folder)) == ["metrics.csv", "val_mean_dice_raw.csv", "val_mean_dice_summary.csv"]
        with open(os.path.join(folder, "val_mean_dice_raw.csv")) as f:
            rows = list(csv.DictReader(f))
        assert [os.path.basename(r["filename"]) for r in rows] == ["case_000_t1.nii.gz"]
        assert [float(rows[0][f"class{i}"]) for i in range(3)] == pytest.approx(
            [report["dice"][model][c] for c in CLASSES], abs=1e-4
        )  # one case: the case's Dice is the per-class mean
        with open(os.path.join(folder, "val_mean_dice_summary.csv")) as f:
            summary = {r["class"]: r for r in csv.DictReader(f)}
        assert math.isclose(float(summary["mean"]["mean"]), report["dice"][model]["mean"], abs_tol=1e-4)


@needs_data
def test_quantized_metadata(quantize_run):
    with open(os.path.join(quantize_run, "metadata_quantized.json")) as f:
        meta = json.load(f)
    q = meta["quantization"]
    assert q["weight_bits"] == 4 and q["act_bits"] == 2 and q["first_last_bits"] == 8
    assert q["preset"] == "default" and q["method"] == "efficientq"
    assert q["calibration_volume"] == "data/calib/calib_t1.nii.gz"
    assert q["evaluation_volumes"] == 1
    assert set(q["dice"]) == {"float", "quantized"} and set(q["dice"]["float"]) == {*CLASSES, "mean"}
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=os.path.join(quantize_run, "metadata_quantized.json"), filepath=SCHEMA)


@needs_data
def test_inference_and_export_of_packed_model(quantize_run, tmp_path):
    import nibabel as nib

    image = os.path.join(BUNDLE, "data", "eval", "case_001_t1.nii.gz")
    ckpt = os.path.join(quantize_run, "model_quantized.pt")
    bundle_run(
        config_file=INFERENCE, logging_file=False, bundle_root=BUNDLE, ckpt_path=ckpt, input=image,
        output_dir=str(tmp_path / "seg"), num_threads=1,
    )
    seg = nib.load(str(tmp_path / "seg" / "case_001_t1_seg.nii.gz"))
    src = nib.load(image)
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}

    ts = str(tmp_path / "model_quantized.ts")
    bundle_run(
        "export", config_file=INFERENCE, logging_file=False, bundle_root=BUNDLE, ckpt_path=ckpt, ts_path=ts,
        export_input_shape=[1, 1, 32, 32, 32],
    )
    scripted = torch.jit.load(ts)
    qnet = load_quantized(segresnet(), ckpt)
    x = torch.randn(1, 1, 32, 32, 48)  # another size than the check input: scripted, not traced
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), qnet(x))
    from monai.data import load_net_with_metadata

    _, meta, _ = load_net_with_metadata(ts)
    assert meta["efficientq"]["config"]["weight_bits"] == 4 and meta["quantization"]["weight_bits"] == 4


# -- bad overrides: clear errors, nothing written --------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    "override, message",
    [
        ({"weight_bits": 9}, "weight_bits=9 is not supported"),
        ({"ckpt_path": "/nonexistent/model.pt"}, "float checkpoint not found: /nonexistent/model.pt"),
        (
            {"calib_items": [{"image": "/nonexistent/calib.nii.gz"}]},
            "calibration volume not found: /nonexistent/calib.nii.gz",
        ),
        ({"method": "gptq"}, "method='gptq' is not supported"),
        ({"act_fit": "mse"}, "act_fit='mse' is not supported"),
    ],
)
def test_bad_overrides_fail_early(tmp_path, random_ckpt, override, message):
    out = tmp_path / "out"
    kwargs = {**FAST, "ckpt_path": random_ckpt, "output_dir": str(out), "bundle_root": BUNDLE, **override}
    with pytest.raises(Exception) as info:
        bundle_run("quantize", config_file=QUANTIZE, logging_file=False, **kwargs)
    assert message in chain_text(info.value)
    assert not out.exists()


@needs_data
def test_cli_from_another_directory_reports_error(tmp_path, random_ckpt):
    """`python -m monai.bundle run quantize` from any cwd (logging.conf applied), a bad flag fails cleanly."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "monai.bundle", "run", "quantize", "--config_file", str(QUANTIZE),
        "--workflow_name", "monai_efficientq.workflow.EfficientQWorkflow",
        "--bundle_root", BUNDLE, "--ckpt_path", random_ckpt, "--output_dir", str(out), "--weight_bits", "9",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("monai-efficientq: error:")]
    assert len(errors) == 1 and "weight_bits=9 is not supported" in errors[0]
    assert "refusing to apply logging config" not in proc.stderr
    assert not out.exists()


# -- metadata, network I/O ---------------------------------------------------------------------------------------


def test_verify_metadata_against_vendored_schema():
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=os.path.join(CONFIGS, "metadata.json"), filepath=SCHEMA)
    with open(SCHEMA) as f:
        schema = json.load(f)
    assert "RECONSTRUCTED COPY" in schema["$comment"]


def test_verify_metadata_rejects_missing_keys(tmp_path):
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    with open(os.path.join(CONFIGS, "metadata.json")) as f:
        meta = json.load(f)
    del meta["network_data_format"]["outputs"]["pred"]["dtype"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dtype"):
        verify_metadata(meta_file=str(bad), filepath=SCHEMA)


def test_metadata_lists_requirements():
    with open(os.path.join(CONFIGS, "metadata.json")) as f:
        meta = json.load(f)
    assert "monai-efficientq" in meta["required_packages_version"]
    assert meta["version"] in meta["changelog"]
    assert meta["quantization"]["weight_bits"] == 2 and meta["quantization"]["act_bits"] == 2


def test_verify_net_in_out():
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=os.path.join(CONFIGS, "metadata.json"), config_file=INFERENCE, device="cpu",
    )


def test_logging_conf_uses_only_logging_classes():
    from monai.bundle.workflows import _reject_executable_logging_config

    _reject_executable_logging_config(os.path.join(CONFIGS, "logging.conf"))


# -- zoo overlay example ------------------------------------------------------------------------------------------


def _tiny_zoo_data(root) -> None:
    import nibabel as nib

    os.makedirs(root / "data")
    os.makedirs(root / "models")
    rng = np.random.default_rng(0)
    items = []
    grid = np.mgrid[:24, :24, :24]
    for i in range(3):
        centre = rng.uniform(9, 15, 3)
        lab = (((grid - centre[:, None, None, None]) ** 2).sum(0) < rng.uniform(4, 7) ** 2).astype(np.uint8)
        img = (lab + rng.normal(0, 0.3, lab.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / "data" / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "data" / f"lab{i}.nii.gz"))
        items.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (root / "data" / "datalist.json").write_text(json.dumps({"training": items[:1], "validation": items[1:]}))
    torch.manual_seed(0)
    net = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")
    torch.save(net.state_dict(), str(root / "models" / "model.pt"))


def test_overlay_on_zoo_style_pair(tmp_path):
    _tiny_zoo_data(tmp_path)
    zoo = os.path.join(EXAMPLES, "minimal_zoo_bundle", "configs")
    files = [os.path.join(zoo, "train.json"), os.path.join(zoo, "evaluate.json"),
             os.path.join(EXAMPLES, "add_efficientq_overlay.json")]
    bundle_run(
        config_file=files, logging_file=False, meta_file=None, bundle_root=str(tmp_path),
        efficientq_calib_roi_size=16, efficientq_iterations=3, efficientq_act_bits="none",
    )
    eq_dir = tmp_path / "eval" / "efficientq"
    assert sorted(os.listdir(eq_dir)) == ["efficientq_report.json", "efficientq_report.md", "model_quantized.pt"]
    assert (tmp_path / "eval" / "metrics.csv").is_file()  # MetricsSaver of the unchanged evaluate.json
    net = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")
    qnet = load_quantized(net, str(eq_dir / "model_quantized.pt"))
    assert any(isinstance(m, QuantizedMixin) for m in qnet.modules())
    with open(eq_dir / "efficientq_report.json") as f:
        report = json.load(f)
    assert report["config"]["weight_bits"] == 2 and report["config"]["act_bits"] is None
    assert report["folded_batchnorm"]


def test_overlay_keeps_handler_after_checkpoint_loader():
    zoo = os.path.join(EXAMPLES, "minimal_zoo_bundle", "configs")
    parser = ConfigParser()
    parser.read_config([os.path.join(zoo, "train.json"), os.path.join(zoo, "evaluate.json"),
                        os.path.join(EXAMPLES, "add_efficientq_overlay.json")])
    targets = [h["_target_"] for h in parser["validate#handlers"]]
    assert targets == ["CheckpointLoader", "StatsHandler", "MetricsSaver",
                       "monai_efficientq.handlers.EfficientQHandler"]
    brain = ConfigParser()  # the brain-tissue bundle's evaluation takes the same overlay
    brain.read_config([*EVALUATE, os.path.join(EXAMPLES, "add_efficientq_overlay.json")])
    assert [h["_target_"] for h in brain["validate#handlers"]] == [*targets[:3], "ignite.handlers.ProgressBar",
                                                                   targets[3]]
    assert all(key in brain for key in ("network", "output_dir", "validate#dataset"))


# -- helpers ----------------------------------------------------------------------------------------------------


def test_check_inputs_creates_nothing(tmp_path, random_ckpt):
    target = tmp_path / "a" / "b" / "model.pt"
    items = [{"image": random_ckpt, "label": random_ckpt}]
    assert eqb.check_inputs(
        files={"float checkpoint": random_ckpt, "evaluation volume": items}, output_paths={"out": str(target)},
        efficientq={"weight_bits": 3, "act_bits": "none"},
    )
    assert not (tmp_path / "a").exists()
    with pytest.raises(FileNotFoundError, match=r"evaluation volume not found: .*missing.nii.gz \(and 1 more\)"):
        eqb.check_inputs(files={"evaluation volume": [{"image": str(tmp_path / "missing.nii.gz")}] * 2})
    with pytest.raises(ValueError, match="no evaluation volume"):
        eqb.check_inputs(files={"evaluation volume": []})
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        eqb.check_inputs(output_paths={"out": str(blocker / "model.pt")})
    with pytest.raises(ValueError, match="act_bits=1 is not supported"):
        eqb.check_inputs(efficientq={"act_bits": 1})
    with pytest.raises(ValueError, match="unknown EfficientQ config field"):
        eqb.check_inputs(efficientq={"wieght_bits": 2})


def test_dice_by_class_from_a_mean_batch_metric():
    from types import SimpleNamespace

    engine = SimpleNamespace(state=SimpleNamespace(metrics={"dice": torch.tensor([0.5, float("nan"), 0.75])}))
    dice = eqb.dice_by_class(engine, "dice", CLASSES)
    assert dice["csf"] == 0.5 and math.isnan(dice["gm"]) and dice["wm"] == 0.75
    assert dice["mean"] == 0.625  # NaN classes left out
    with pytest.raises(ValueError, match="reduction='mean_batch'"):
        eqb.dice_by_class(engine, "dice", ["a", "b"])
    with pytest.raises(KeyError, match="no metric 'other'"):
        eqb.dice_by_class(engine, "other", CLASSES)


def test_configs_declare_shared_pieces_once():
    """network_def and the preprocessing live in common.json only; the other configs layer on it."""
    for name in os.listdir(CONFIGS):
        if name.endswith(".json") and name not in ("common.json", "metadata.json"):
            with open(os.path.join(CONFIGS, name)) as f:
                config = json.load(f)
            assert not {"network_def", "preprocessing", "inferer", "bundle_root"} & set(config), name
    assert not os.path.exists(os.path.join(CONFIGS, "train.json"))  # one training path: scripts/train.py


def test_zoo_inference_properties():
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=INFERENCE, workflow_type="infer", logging_file=False,
        meta_file=os.path.join(CONFIGS, "metadata.json"), bundle_root=BUNDLE,
    )
    workflow.initialize()  # only resets the parser and sets the thread count / determinism
    assert workflow.check_properties() == []


def test_overrides_reach_the_settings():
    from monai_efficientq import EfficientQConfig

    parser = ConfigParser()
    parser.read_config(QUANTIZE)
    parser["bundle_root"] = BUNDLE
    assert EfficientQConfig(**parser.get_parsed_content("efficientq_settings")).act_fit == "output"  # the preset's
    parser["act_fit"] = "ls"
    assert parser.get_parsed_content("efficientq_settings", lazy=False)["act_fit"] == "ls"
    parser["act_bits"] = "$None"  # MONAI's expression syntax: `--act_bits '$None'` on the command line
    assert parser.get_parsed_content("efficientq_settings", lazy=False)["act_bits"] is None
    parser["act_bits"] = "none"  # `--act_bits none`: the handler's settings read it as None
    handler = parser.get_parsed_content("efficientq_handler", lazy=False)
    assert handler.config.act_bits is None and handler.config.weight_bits == 2


@needs_data
def test_quantize_on_two_calibration_volumes(tmp_path, random_ckpt):
    with open(os.path.join(BUNDLE, "data", "datalist.json")) as f:
        datalist = json.load(f)
    data = os.path.join(BUNDLE, "data")
    datalist = {k: v for k, v in datalist.items() if k != "calibration"}
    datalist["calibration"] = [{"image": os.path.join(data, "calib", "calib_t1.nii.gz")},
                               {"image": os.path.join(data, "template", "t1.nii.gz")}]
    for key in ("evaluation", "training"):
        datalist[key] = [{k: os.path.join(data, v) for k, v in item.items()} for item in datalist[key]]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    out = tmp_path / "out"
    bundle_run(
        "quantize", config_file=QUANTIZE, logging_file=False, bundle_root=BUNDLE, ckpt_path=random_ckpt,
        output_dir=str(out), datalist_file=str(path), calib_volumes=2, **{**FAST, "act_bits": "none"},
    )
    with open(out / "model_quantized_report.json") as f:
        report = json.load(f)
    assert report["calibration_shape"] == [2, 1, 32, 32, 32]  # both volumes, cropped to one size, one batch
