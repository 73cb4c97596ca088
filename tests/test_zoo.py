"""Model-Zoo bundle in, quantized bundle out (``monai_efficientq.zoo``, ``monai-efficientq quantize-bundle`` and the
packaged ``python -m monai.bundle run`` config), on tiny bundles shaped as the zoo's spleen and BraTS bundles
(``tests/zoo_bundles.py``).

Reduced settings (2 ADMM iterations, no augmented copies, 16-24 voxel volumes); the Dice figures are checked against
runs of the bundles' own configs by MONAI, not against numbers of this code.
"""

from __future__ import annotations

import configparser
import csv
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from monai.bundle import ConfigParser  # noqa: E402
from monai.bundle import run as bundle_run  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402
from zoo_bundles import SPLEEN_UNET, brats_like, spleen_like  # noqa: E402

from monai_efficientq import load_quantized  # noqa: E402
from monai_efficientq import zoo  # noqa: E402
from monai_efficientq.cli import main  # noqa: E402
from monai_efficientq.zoo.card import next_version  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(REPO, "bundles", "brain_tissue_mri_segmentation", "schema", "meta_schema_20240725.json")
FAST = {"weight_bits": 2, "act_bits": 2, "iterations": 2, "calib_augment": 0, "holdout": False, "progress": False}
LOADER = "monai_efficientq.handlers.QuantizedCheckpointLoader"


def spleen_unet() -> UNet:
    return UNet(**{k: v for k, v in SPLEEN_UNET.items() if k != "_target_"})


def targets(config) -> list[str]:
    """Every ``_target_`` in a config."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            if "_target_" in value:
                found.append(value["_target_"])
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(config)
    return found


def saved_metrics(folder) -> dict[str, float]:
    """The ``metrics.csv`` MONAI's ``MetricsSaver`` wrote (``name,value`` lines)."""
    with open(os.path.join(folder, "metrics.csv")) as f:
        return {row[0]: float(row[1]) for row in csv.reader(f)}


def chain_text(err: BaseException) -> str:
    """Messages of an exception and its causes (MONAI wraps config errors)."""
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


def leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp-" in name]


@pytest.fixture(scope="module")
def spleen(tmp_path_factory):
    """A briefly trained spleen-like bundle quantized W2A2 through the Python API (evaluated on both cases)."""
    root = tmp_path_factory.mktemp("spleen")
    bundle, data = spleen_like(str(root), train_steps=40)
    result = zoo.quantize_bundle(bundle, str(root / "spleen_w2a2"), FAST, dataset_dir=data)
    return bundle, data, result


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    """A BraTS-like bundle (random weights) quantized through ``python -m monai.bundle run`` with the packaged
    config, on 2 of its 3 evaluation cases; the prediction kind left to the bundle."""
    root = tmp_path_factory.mktemp("brats")
    bundle, data = brats_like(str(root), shape=(16, 16, 16), roi=(16, 16, 16))
    out = str(root / "brats_w2a2")
    bundle_run(
        config_file=zoo.QUANTIZE_BUNDLE_CONFIG, logging_file=False, bundle_dir=bundle, out_dir=out, dataset_dir=data,
        max_eval_volumes=2, **{k: v for k, v in FAST.items() if k != "progress"},
    )
    return bundle, data, out


@pytest.fixture(scope="module")
def spleen_source(tmp_path_factory):
    """An untrained spleen-like bundle for the error tests (never written to)."""
    return spleen_like(str(tmp_path_factory.mktemp("source")))


# -- the spleen-like bundle through the API --------------------------------------------------------------------


def test_spleen_bundle_files(spleen):
    bundle, _, result = spleen
    assert result.files == [
        "LICENSE", "configs/evaluate.json", "configs/inference.json", "configs/logging.conf", "configs/metadata.json",
        "configs/multi_gpu_evaluate.json", "configs/train.json", "docs/README.md", "docs/data_license.txt",
        "docs/quantization_report.json", "docs/quantization_report.md", "models/model_quantized.pt",
    ]  # no float model.pt, no large_files.yml pointing at it
    packed = os.path.join(result.path, "models", "model_quantized.pt")
    assert os.path.getsize(packed) < os.path.getsize(os.path.join(bundle, "models", "model.pt")) / 2
    for name in ("LICENSE", "configs/train.json", "configs/logging.conf", "docs/data_license.txt"):
        with open(os.path.join(bundle, name), "rb") as a, open(os.path.join(result.path, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not leftovers(os.path.dirname(result.path))


def test_spleen_configs_load_the_packed_checkpoint(spleen):
    _, _, result = spleen
    with open(os.path.join(result.path, "configs", "inference.json")) as f:
        inference = json.load(f)
    assert inference["checkpointloader"] == {
        "_target_": LOADER, "load_path": "$@bundle_root + '/models/model_quantized.pt'", "network": "@network",
    }
    with open(os.path.join(result.path, "configs", "evaluate.json")) as f:
        evaluate = json.load(f)
    assert evaluate["validate#handlers"][0] == {
        "_target_": LOADER, "load_path": "$@ckpt_dir + '/model_quantized.pt'", "network": "@network",
    }
    for config in (inference, evaluate):
        assert "CheckpointLoader" not in targets(config)
        assert "model.pt" not in json.dumps(config)


def test_spleen_dice_matches_runs_of_the_bundles_own_configs(spleen, tmp_path):
    """The float figures are what MONAI's run of the source bundle's train+evaluate gives, the quantized ones what
    its run of the new bundle's gives (its evaluate.json loading the packed checkpoint)."""
    bundle, data, result = spleen
    metrics = result.metadata["quantization"]["metrics"]
    assert abs(metrics["val_mean_dice"]["float"] - metrics["val_mean_dice"]["quantized"]) > 1e-3  # W2A2 changes it
    for root, model in ((bundle, "float"), (result.path, "quantized")):
        configs = [os.path.join(root, "configs", name) for name in ("train.json", "evaluate.json")]
        bundle_run(config_file=configs, logging_file=False, bundle_root=root, dataset_dir=data,
                   output_dir=str(tmp_path / model))
        measured = saved_metrics(tmp_path / model)
        assert measured["val_mean_dice"] == pytest.approx(metrics["val_mean_dice"][model], abs=1e-4), model
    dice = result.report.dice
    assert list(dice["float"]) == ["spleen", "mean"]  # from the metadata's channel_def, background left out
    assert dice["quantized"]["spleen"] == pytest.approx(result.metrics["val_mean_dice"]["quantized"], abs=1e-6)


def test_spleen_metadata(spleen):
    bundle, _, result = spleen
    meta_file = os.path.join(result.path, "configs", "metadata.json")
    with open(meta_file) as f:
        meta = json.load(f)
    assert meta == result.metadata
    assert meta["version"] == "0.5.10" and list(meta["changelog"])[:2] == ["0.5.10", "0.5.9"]
    assert "optional_packages_version" not in meta
    assert set(meta["required_packages_version"]) == {"nibabel", "pytorch-ignite", "monai-efficientq"}
    q = meta["quantization"]
    assert (q["weight_bits"], q["act_bits"], q["first_last_bits"], q["iterations"]) == (2, 2, 8, 2)
    assert q["checkpoint"] == "models/model_quantized.pt" and q["evaluation_volumes"] == 2
    assert q["packed_file_bytes"] == os.path.getsize(os.path.join(result.path, q["checkpoint"]))
    assert q["float_file_bytes"] == os.path.getsize(os.path.join(bundle, "models", "model.pt"))
    assert q["calibration"]["image"] == ["spleen_00.nii.gz"] and q["calibration"]["in_evaluation"]
    assert q["calibration"]["preprocessing"] == "validate#preprocessing" and q["calibration"]["divisible_by"] == 4
    assert q["source_eval_metrics"] == {"mean_dice": 0.961}  # the float model's published figure, kept apart
    assert meta["eval_metrics"] == {m: round(v["quantized"], 4) for m, v in result.metrics.items()}
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(meta_file=meta_file, filepath=SCHEMA)
    verify_net_in_out(net_id="network_def", meta_file=meta_file, device="cpu",
                      config_file=os.path.join(result.path, "configs", "inference.json"))


def test_spleen_readme(spleen):
    _, _, result = spleen
    with open(os.path.join(result.path, "docs", "README.md")) as f:
        readme = f.read()
    dice = result.metadata["quantization"]["dice"]
    assert f"| spleen | {dice['float']['spleen']:.4f} | {dice['quantized']['spleen']:.4f} |" in readme
    assert "python -m monai.bundle run --config_file \"['configs/train.json','configs/evaluate.json']\"" in readme
    assert readme.rstrip().endswith("The float model card.")  # the source README follows


def _evaluate_in_subprocess(launcher: list[str], configs: list[str], bundle: str, data: str, out) -> str:
    """Run ``monai.bundle run`` of ``configs`` (in ``bundle``) under ``launcher``; its stdout and stderr."""
    command = [*launcher, "-m", "monai.bundle", "run", "--config_file", str([f"configs/{c}" for c in configs]),
               "--bundle_root", bundle, "--dataset_dir", data, "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    done = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_spleen_multi_gpu_evaluate_config(spleen):
    _, _, result = spleen
    with open(os.path.join(result.path, "configs", "multi_gpu_evaluate.json")) as f:
        config = json.load(f)
    assert config["validate#sampler"] == {"_target_": "DistributedSampler", "dataset": "@validate#dataset",
                                          "even_divisible": False, "shuffle": False}
    assert config["validate#dataloader#sampler"] == "@validate#sampler"
    # evaluate.json's handlers: QuantizedCheckpointLoader, StatsHandler, MetricsSaver (gathers: on every rank)
    assert [k for k in config if k.startswith("validate#handlers")] == ["validate#handlers#1#_disabled_"]
    assert config["validate#handlers#1#_disabled_"] == "$dist.get_rank() > 0"
    assert "$monai.utils.set_determinism(seed=123)" in config["initialize"]  # the bundle's own step is kept
    assert config["run"] == ["$@validate#evaluator.run()"]
    with open(os.path.join(result.path, "docs", "README.md")) as f:
        readme = f.read()
    assert ("torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run --config_file \"['configs/train."
            "json','configs/evaluate.json','configs/multi_gpu_evaluate.json']\"") in readme
    assert "Quantization ran once" in readme


def test_spleen_multi_gpu_evaluate_gives_the_single_process_dice(spleen, tmp_path):
    """torchrun, 2 CPU processes (gloo): each evaluates one of the 2 volumes with the packed checkpoint; the
    gathered Dice equals the single-process run's, and MetricsSaver's per-case details hold both volumes."""
    _, data, result = spleen
    single, multi = tmp_path / "single", tmp_path / "multi"
    _evaluate_in_subprocess([sys.executable], ["train.json", "evaluate.json"], result.path, data, single)
    _evaluate_in_subprocess(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2"],
        ["train.json", "evaluate.json", "multi_gpu_evaluate.json"], result.path, data, multi,
    )
    expected = saved_metrics(single)["val_mean_dice"]
    assert saved_metrics(multi)["val_mean_dice"] == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(result.metrics["val_mean_dice"]["quantized"], abs=1e-4)
    cases = {}
    for folder in (single, multi):
        with open(folder / "val_mean_dice_raw.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["filename", "class0", "mean"]
        cases[folder.name] = sorted(rows[1:])
    # 2 rows, not 4: each rank evaluated its own volume (the sampler) and rank 0 wrote both (the gathering)
    assert len(cases["multi"]) == 2 and cases["multi"] == cases["single"]  # file names and per-case Dice


def test_spleen_inference_writes_segmentations(spleen, tmp_path):
    _, data, result = spleen
    out = tmp_path / "seg"
    inference = os.path.join(result.path, "configs", "inference.json")
    bundle_run(config_file=inference, logging_file=False, bundle_root=result.path, dataset_dir=data,
               output_dir=str(out))
    source = os.path.join(data, "imagesTs", "spleen_02.nii.gz")
    seg = nib.load(str(out / "spleen_02" / "spleen_02_trans.nii.gz"))
    assert seg.shape[:3] == nib.load(source).shape
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0.0, 1.0}
    copy = tmp_path / "without_model"
    shutil.copytree(result.path, copy, ignore=shutil.ignore_patterns("model_quantized.pt"))
    with pytest.raises(Exception) as info:  # the config loads the packed checkpoint
        bundle_run(config_file=str(copy / "configs" / "inference.json"), logging_file=False, bundle_root=str(copy),
                   dataset_dir=data, output_dir=str(tmp_path / "seg2"))
    assert f"checkpoint not found: {copy}/models/model_quantized.pt" in chain_text(info.value)


def test_spleen_torchscript_export(spleen, tmp_path):
    _, _, result = spleen
    copy = tmp_path / "bundle"
    shutil.copytree(result.path, copy)
    bundle_run("export", config_file=str(copy / "configs" / "inference.json"), logging_file=False,
               bundle_root=str(copy))
    scripted = torch.jit.load(str(copy / "models" / "model_quantized.ts"))
    qnet = load_quantized(spleen_unet(), str(copy / "models" / "model_quantized.pt"))
    x = torch.rand(1, 1, 16, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), qnet(x))


# -- the BraTS-like bundle through python -m monai.bundle run --------------------------------------------------


def test_brats_bundle_through_the_packaged_config(brats):
    bundle, _, out = brats
    files = sorted(os.path.relpath(os.path.join(d, n), out) for d, _, names in os.walk(out) for n in names)
    assert {"configs/datalist.json", "scripts/prepare_datalist.py", "models/model_quantized.pt"} <= set(files)
    assert not any(name.startswith("configs/inference_trt") or name == "models/model.pt" for name in files)
    with open(os.path.join(out, "docs", "quantization_report.json")) as f:
        report = json.load(f)
    assert report["config"]["prediction"] == "sigmoid"  # from the bundle's Activationsd(sigmoid=True)
    assert report["calibration_shape"] == [1, 4, 16, 16, 16]
    with open(os.path.join(out, "configs", "metadata.json")) as f:
        q = json.load(f)["quantization"]
    assert q["evaluation_volumes"] == 2 and q["calibration"]["divisible_by"] == 8  # SegResNet, 4 levels
    assert set(q["metrics"]) == {"val_mean_dice", "val_mean_dice_tc", "val_mean_dice_wt", "val_mean_dice_et"}
    for model in ("float", "quantized"):  # channel order -> names: the per-class Dice is the bundle's per-region Dice
        assert list(q["dice"][model]) == ["Tumor core", "Whole tumor", "Enhancing tumor", "mean"]
        for name, region in (("Tumor core", "tc"), ("Whole tumor", "wt"), ("Enhancing tumor", "et")):
            assert q["dice"][model][name] == pytest.approx(q["metrics"][f"val_mean_dice_{region}"][model], abs=1e-4)


# -- a YAML bundle through the command line --------------------------------------------------------------------


def test_yaml_bundle_through_the_cli(tmp_path, capsys):
    bundle, data = spleen_like(str(tmp_path), fmt="yaml")
    out = tmp_path / "spleen_w3"
    calib = os.path.join(data, "imagesTs", "spleen_02.nii.gz")
    main(["quantize-bundle", bundle, str(out), "--weight_bits", "3", "--act_bits", "none", "--iterations", "2",
          "--calib_augment", "0", "--holdout", "False", "--calib", calib, "--dataset_dir", data, "--quiet",
          "--num_threads", "1"])
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (") and "  configs/inference.yaml\n" in printed
    assert "  configs/multi_gpu_evaluate.yaml\n" in printed  # the evaluate config's format
    import yaml

    for name in ("inference.yaml", "evaluate.yaml"):
        with open(out / "configs" / name) as f:
            config = yaml.safe_load(f)
        assert LOADER in targets(config) and "CheckpointLoader" not in targets(config), name
    parser = ConfigParser()  # the written YAML pair still reads as one bundle config
    parser.read_config([str(out / "configs" / "train.yaml"), str(out / "configs" / "evaluate.yaml")])
    assert parser["validate#handlers#0#_target_"] == LOADER
    with open(out / "configs" / "metadata.json") as f:
        q = json.load(f)["quantization"]
    assert (q["weight_bits"], q["act_bits"]) == (3, None)
    assert q["calibration"] == {  # an image alone: the inference preprocessing
        "image": ["spleen_02.nii.gz"], "preprocessing": "preprocessing", "roi_size": [16, 16, 16], "divisible_by": 4,
        "in_evaluation": False,
    }


def test_setup_installs_pyyaml_and_ships_the_config():
    setup = configparser.ConfigParser()
    setup.read(os.path.join(REPO, "setup.cfg"))
    lines = setup["options"]["install_requires"].split()
    requires = [line.split(">")[0].split("=")[0].strip().lower() for line in lines]
    assert "pyyaml" in requires
    assert "configs/*.json" in setup["options.package_data"]["monai_efficientq"]
    assert os.path.isfile(zoo.QUANTIZE_BUNDLE_CONFIG)


# -- refusals before any work, and no half-written bundle ------------------------------------------------------


@pytest.fixture()
def no_work(monkeypatch):
    """Fail the test if an evaluation or a quantization starts."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr("monai_efficientq.zoo.quantize.BundleEvaluation", forbidden)
    monkeypatch.setattr("monai_efficientq.network.quantize_", forbidden)


def _copy_with(source, tmp_path, edit) -> str:
    copy = str(tmp_path / "bundle")
    shutil.copytree(source, copy)
    edit(copy)
    return copy


def _add_package(bundle):
    path = os.path.join(bundle, "configs", "metadata.json")
    with open(path) as f:
        meta = json.load(f)
    meta["optional_packages_version"]["efficientq-no-such-package"] = "1.0"
    with open(path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize(
    "case, message",
    [
        ("out_exists", "already exists: choose a new folder"),
        ("bad_bits", "weight_bits=9 is not supported"),
        ("missing_package", "pip install efficientq-no-such-package"),
        ("no_model", "bundle float checkpoint not found"),
        ("no_calibration", "no calibration volume: pass --calib"),
        ("missing_calib", "data file not found: /nonexistent/ct.nii.gz"),
        ("holdout_alone", "holdout needs a second calibration volume"),
        ("label_attention", "attention='label' needs a calibration label"),
    ],
)
def test_refuses_before_any_work(spleen_source, tmp_path, no_work, case, message):
    bundle, data = spleen_source
    out = tmp_path / "out"
    kwargs = {"config": FAST, "dataset_dir": data}
    if case == "out_exists":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    elif case == "bad_bits":
        kwargs["config"] = {**FAST, "weight_bits": 9}
    elif case == "missing_package":
        bundle = _copy_with(bundle, tmp_path, _add_package)
    elif case == "no_model":
        bundle = _copy_with(bundle, tmp_path, lambda b: os.remove(os.path.join(b, "models", "model.pt")))
    elif case == "no_calibration":
        kwargs.update(dataset_dir=str(tmp_path), evaluate=False)
    elif case == "missing_calib":
        kwargs["calib"] = "/nonexistent/ct.nii.gz"
    elif case == "holdout_alone":
        kwargs["config"] = {**FAST, "holdout": True}
    elif case == "label_attention":
        kwargs.update(config={**FAST, "attention": "label"}, calib=os.path.join(data, "imagesTs", "spleen_02.nii.gz"))
    with pytest.raises(Exception, match=message):
        zoo.quantize_bundle(bundle, str(out), **kwargs)
    assert (out / "keep.txt").exists() if case == "out_exists" else not out.exists()
    assert not leftovers(tmp_path)


def test_cli_error_is_one_line(spleen_source, tmp_path, capsys):
    bundle, _ = spleen_source
    with pytest.raises(SystemExit) as info:
        main(["quantize-bundle", bundle, bundle + "/models/w2"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("monai-efficientq: error: the output folder") and "overlaps the input bundle" in err
    assert err.count("\n") == 1


def test_failed_write_leaves_nothing(spleen_source, tmp_path, monkeypatch):
    bundle, data = spleen_source

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("monai_efficientq.zoo.card.quantized_readme", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        zoo.quantize_bundle(bundle, str(tmp_path / "out"), {**FAST, "iterations": 1}, dataset_dir=data, evaluate=False)
    assert os.listdir(tmp_path) == []


# -- pieces ----------------------------------------------------------------------------------------------------


def test_quantized_config_replaces_loaders_and_renames_the_checkpoint():
    source = {
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "handlers": [
            {"_target_": "CheckpointLoader", "_disabled_": "$not os.path.exists(@ckpt_path)", "load_path": "@ckpt_path",
             "load_dict": {"model": "@network"}, "map_location": "cpu"},
            {"_target_": "StatsHandler"},
            {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "key_metric_filename": "model.pt"},
        ],
        "others": ["best_model.pt", "model.pth", "$@bundle_root + '/models/model.ts'"],
    }
    before = json.dumps(source)
    new, count = zoo.quantized_config(source)
    assert count == 1 and json.dumps(source) == before  # the input is not changed
    assert new["ckpt_path"] == "$@bundle_root + '/models/model_quantized.pt'"
    assert new["handlers"][0] == {"_target_": LOADER, "load_path": "@ckpt_path", "network": "@network",
                                  "_disabled_": "$not os.path.exists(@ckpt_path)"}
    assert new["handlers"][1:] == source["handlers"][1:]  # a saver keeps its file name
    assert new["others"] == source["others"]


def test_multi_gpu_evaluate_config_pieces():
    from monai_efficientq.zoo.multi_gpu import multi_gpu_evaluate_config

    handlers = [
        {"_target_": "QuantizedCheckpointLoader"},
        {"_target_": "StatsHandler", "_disabled_": "$@quiet"},
        {"_target_": "MetricsSaver", "save_dir": "."},
        {"_target_": "ignite.handlers.ProgressBar"},
        {"_target_": "TensorBoardStatsHandler", "_disabled_": True},
    ]
    config = {
        "quiet": False,
        "eval_handlers": handlers,
        "validate": {"dataset": {"_target_": "Dataset", "data": []}, "handlers": "@eval_handlers",
                     "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "shuffle": True},
                     "evaluator": {"_target_": "SupervisedEvaluator"}},
        "initialize": "$print('own step')",
        "finalize": ["$print('own end')"],
    }
    parser = ConfigParser(config)
    new = multi_gpu_evaluate_config(parser)
    assert new["validate#dataloader#shuffle"] is False and new["validate#dataloader#sampler"] == "@validate#sampler"
    assert {k: v for k, v in new.items() if k.startswith("eval_handlers")} == {  # the list the reference names
        "eval_handlers#1#_disabled_": "$(@quiet) or dist.get_rank() > 0",
        "eval_handlers#3#_disabled_": "$dist.get_rank() > 0",
    }
    assert "$print('own step')" in new["initialize"]
    assert new["finalize"] == ["$print('own end')", "$dist.is_initialized() and dist.destroy_process_group()"]
    del config["validate"]["dataset"]
    assert multi_gpu_evaluate_config(ConfigParser(config)) is None


def test_downsampling_factor():
    from monai.networks.nets import BasicUNet, DynUNet, SegResNet

    assert zoo.downsampling_factor(spleen_unet()) == 4
    assert zoo.downsampling_factor(UNet(3, 1, 2, channels=(2, 2, 2, 2, 2), strides=(2, 2, 2, 2))) == 16
    assert zoo.downsampling_factor(SegResNet(init_filters=8, blocks_down=(1, 2, 2, 4))) == 8
    dyn = DynUNet(3, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, [2, 2, 1]],
                  upsample_kernel_size=[2, 2, [2, 2, 1]])
    assert zoo.downsampling_factor(dyn) == [8, 8, 4]
    assert zoo.downsampling_factor(BasicUNet(3, 1, 2, features=(2, 2, 2, 2, 2, 2))) == 16
    assert zoo.downsampling_factor(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 3))) is None


def test_package_check_and_version():
    zoo.check_bundle_packages({"optional_packages_version": {"nibabel": "0", "PyYAML": "0"}})
    with pytest.raises(zoo.MissingPackagesError, match="not installed: no-such-a, no-such-b; install them with "
                                                       "`pip install no-such-a no-such-b`"):
        zoo.check_bundle_packages({"required_packages_version": {"nibabel": "0", "no-such-a": "1", "no-such-b": "2"}})
    assert next_version("0.5.9") == "0.5.10" and next_version("1.2.3rc1") == "1.2.4"


def test_own_bundle_with_a_common_config(tmp_path, capsys):
    """The brain-tissue bundle of this repository layers its configs on configs/common.json and its inference config
    already loads a packed checkpoint: the command quantizes it, and the new bundle's inference loads the new file."""
    own = os.path.join(REPO, "bundles", "brain_tissue_mri_segmentation")
    data = os.path.join(own, "data")
    out = tmp_path / "brain_w2a2"
    main(["quantize-bundle", own, str(out), "--weight_bits", "2", "--act_bits", "2", "--iterations", "2",
          "--calib_augment", "0", "--holdout", "False", "--roi_size", "32", "--max_eval_volumes", "1",
          "--calib", os.path.join(data, "calib", "calib_t1.nii.gz"), "--quiet", "--num_threads", "1"])
    printed = capsys.readouterr().out
    assert "  configs/common.json\n" in printed and "Dice mean" in printed
    parser = ConfigParser()
    parser.read_config([str(out / "configs" / "common.json"), str(out / "configs" / "inference.json")])
    assert parser.get_parsed_content("ckpt_path", lazy=False).endswith("/model_quantized.pt")
    readme = (out / "docs" / "README.md").read_text()
    assert "--config_file \"['configs/common.json','configs/inference.json']\"" in readme
    segs = tmp_path / "segs"
    bundle_run(config_file=[str(out / "configs" / "common.json"), str(out / "configs" / "inference.json")],
               bundle_root=str(out), dataset_dir=data, output_dir=str(segs), max_eval_volumes=1, logging_file=False,
               num_threads=1)
    written = sorted(os.listdir(segs))
    assert written == ["case_000_t1_seg.nii.gz"]
    assert nib.load(str(segs / written[0])).shape == nib.load(os.path.join(data, "eval", "case_000_t1.nii.gz")).shape
