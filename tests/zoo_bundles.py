"""Tiny bundles in the MONAI Model-Zoo layout, for the tests of ``monai_efficientq.zoo``.

:func:`spleen_like` and :func:`brats_like` write bundle folders shaped as the zoo's ``spleen_ct_segmentation`` and
``brats_mri_segmentation``: the same config ids, the same network classes (tiny channel counts), the same kinds of
preprocessing, inferer, post-processing and handler lists (``evaluate`` layered on ``train``, ``inference`` on its
own), seeded random weights in ``models/model.pt``, a metadata file of the zoo's 2022 schema and small synthetic
NIfTI data where the configs expect it (``dataset_dir`` is overridden by the tests, as users do).
"""

from __future__ import annotations

import json
import os
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.networks.nets import SegResNet, UNet
from nets import random_batchnorm_statistics
from torch import nn

__all__ = ["spleen_like", "brats_like", "write_config", "SPLEEN_UNET", "BRATS_SEGRESNET"]

OLD_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
SPLEEN_UNET = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
               "strides": [2, 2], "num_res_units": 2, "norm": "batch"}
BRATS_SEGRESNET = {"_target_": "SegResNet", "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "init_filters": 8,
                   "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2}
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s %(levelname)s %(message)s
"""


def write_config(path: str, config: dict[str, Any]) -> None:
    """Write a config as JSON or YAML, by the file's suffix."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if path.endswith(".json"):
            json.dump(config, f, indent=4)
        else:
            import yaml

            yaml.safe_dump(config, f, sort_keys=False)


def _from_engine(keys: list[str]) -> str:
    return f"$monai.handlers.from_engine({keys})"


def _metadata(name: str, inputs: dict, outputs: dict, packages: dict[str, str], metrics: dict) -> dict[str, Any]:
    return {
        "schema": OLD_SCHEMA,
        "version": "0.5.9",
        "changelog": {"0.5.9": "use monai 1.4", "0.5.8": "earlier change"},
        "monai_version": "1.4.0",
        "pytorch_version": "2.4.0",
        "numpy_version": "1.24.4",
        "optional_packages_version": packages,
        "name": name,
        "task": f"{name} (test bundle)",
        "description": "A tiny test bundle shaped as a Model-Zoo bundle.",
        "authors": "monai-efficientq tests",
        "copyright": "Copyright (c) monai-efficientq contributors",
        "data_type": "nibabel",
        "eval_metrics": metrics,
        "intended_use": "tests",
        "network_data_format": {"inputs": {"image": inputs}, "outputs": {"pred": outputs}},
    }


def _tensor_format(channels: int, shape: list, channel_def: dict, fmt: str, value_range: list) -> dict[str, Any]:
    return {"type": "image", "format": fmt, "num_channels": channels, "spatial_shape": shape, "dtype": "float32",
            "value_range": value_range, "is_patch_data": True, "channel_def": channel_def}


def _common_files(bundle: str, net: nn.Module, metadata: dict) -> None:
    os.makedirs(os.path.join(bundle, "models"), exist_ok=True)
    torch.save(net.state_dict(), os.path.join(bundle, "models", "model.pt"))
    write_config(os.path.join(bundle, "configs", "metadata.json"), metadata)
    with open(os.path.join(bundle, "configs", "logging.conf"), "w") as f:
        f.write(LOGGING_CONF)
    with open(os.path.join(bundle, "LICENSE"), "w") as f:
        f.write("Apache License 2.0 (test bundle)\n")
    os.makedirs(os.path.join(bundle, "docs"), exist_ok=True)
    with open(os.path.join(bundle, "docs", "README.md"), "w") as f:
        f.write(f"# {metadata['name']}\n\nThe float model card.\n")
    with open(os.path.join(bundle, "docs", "data_license.txt"), "w") as f:
        f.write("synthetic data\n")
    with open(os.path.join(bundle, "large_files.yml"), "w") as f:
        f.write('large_files:\n- path: "models/model.pt"\n  url: "https://example.invalid/model.pt"\n')


# -- spleen_ct_segmentation ------------------------------------------------------------------------------------


def _spleen_transforms(keys: Any, label: bool) -> list[dict[str, Any]]:
    return [
        {"_target_": "LoadImaged", "keys": keys},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": keys, "pixdim": [1.5, 1.5, 2.0],
         "mode": ["bilinear", "nearest"] if label else "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image" if label else keys, "a_min": -57, "a_max": 164,
         "b_min": 0, "b_max": 1, "clip": True},
        {"_target_": "EnsureTyped", "keys": keys},
    ]


def _spleen_train(roi: list[int]) -> dict[str, Any]:
    keys = ["image", "label"]
    softmax_onehot = {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": 2},
    ]}
    return {
        "imports": ["$import glob", "$import os", "$import ignite"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "images": "$list(sorted(glob.glob(@dataset_dir + '/imagesTr/*.nii.gz')))",
        "labels": "$list(sorted(glob.glob(@dataset_dir + '/labelsTr/*.nii.gz')))",
        "val_interval": 1,
        "epochs": 2,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": dict(SPLEEN_UNET),
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "Novograd", "params": "$@network.parameters()", "lr": 0.002},
        "train": {
            "deterministic_transforms": _spleen_transforms(keys, label=True),
            "random_transforms": [{"_target_": "RandCropByPosNegLabeld", "keys": keys, "label_key": "label",
                                   "spatial_size": roi, "pos": 1, "neg": 1, "num_samples": 2}],
            "preprocessing": {"_target_": "Compose",
                              "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
            "dataset": {"_target_": "CacheDataset", "data": "$[{'image': i, 'label': l} for i, l in "
                        "zip(@images[:-9], @labels[:-9])]", "transform": "@train#preprocessing", "cache_rate": 1.0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 2, "shuffle": True},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": softmax_onehot,
            "handlers": [
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
            ],
            "key_metric": {"train_accuracy": {"_target_": "ignite.metrics.Accuracy",
                                              "output_transform": _from_engine(["pred", "label"])}},
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                        "optimizer": "@optimizer", "inferer": "@train#inferer",
                        "postprocessing": "@train#postprocessing", "key_train_metric": "@train#key_metric",
                        "train_handlers": "@train#handlers", "amp": True},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
            "dataset": {"_target_": "CacheDataset", "data": "$[{'image': i, 'label': l} for i, l in "
                        "zip(@images[-9:], @labels[-9:])]", "transform": "@validate#preprocessing", "cache_rate": 1.0},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "shuffle": False,
                           "num_workers": 0},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 4, "overlap": 0.5},
            "postprocessing": "%train#postprocessing",
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
                {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
                 "save_key_metric": True, "key_metric_filename": "model.pt"},
            ],
            "key_metric": {"val_mean_dice": {"_target_": "MeanDice", "include_background": False,
                                             "output_transform": _from_engine(["pred", "label"])}},
            "additional_metrics": {"val_accuracy": {"_target_": "ignite.metrics.Accuracy",
                                                    "output_transform": _from_engine(["pred", "label"])}},
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric",
                          "additional_metrics": "@validate#additional_metrics",
                          "val_handlers": "@validate#handlers", "amp": True},
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@train#trainer.run()"],
    }


def _spleen_evaluate() -> dict[str, Any]:
    return {
        "validate#dataset#cache_rate": 0,
        "validate#postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": ["pred", "label"], "transform": "@validate#preprocessing",
             "orig_keys": "image", "nearest_interp": [False, True], "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": 2},
            {"_target_": "SaveImaged", "_disabled_": True, "keys": "pred", "output_dir": "@output_dir",
             "resample": False, "squeeze_end_dims": True},
        ]},
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": ["val_mean_dice", "val_acc"],
             "metric_details": ["val_mean_dice"], "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
             "summary_ops": "*"},
        ],
        "run": ["$@validate#evaluator.run()"],
    }


def _spleen_inference(roi: list[int]) -> dict[str, Any]:
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.float32",
        "output_postfix": "trans",
        "separate_folder": True,
        "load_pretrain": True,
        "dataset_dir": "/workspace/data/Task09_Spleen",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": dict(SPLEEN_UNET),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": _spleen_transforms("@image_key", label=False)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
             "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
             "separate_folder": "@separate_folder"},
        ]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$monai.utils.set_determinism(seed=123)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def _ct_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume in HU (air, a soft-tissue body, a brighter 'spleen' blob) and its label."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(np.float32)
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    body = (((grid - centre) / (np.array(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) < 1
    blob_centre = centre + rng.uniform(-3, 3, (3, 1, 1, 1))
    label = ((((grid - blob_centre) ** 2).sum(0) < rng.uniform(3.0, 4.5) ** 2) & body).astype(np.uint8)
    image = np.where(body, 40.0, -1000.0) + 80.0 * label + rng.normal(0, 15, shape)
    return image.astype(np.float32), label


def _train_briefly(net: nn.Module, data: str, cases: int, steps: int) -> None:
    """A few Adam steps of cross-entropy on the labelled cases, intensities scaled as the bundle does."""
    images, labels = [], []
    for i in range(cases):
        image = nib.load(os.path.join(data, "imagesTr", f"spleen_{i:02d}.nii.gz")).get_fdata()
        images.append(np.clip((image + 57) / 221, 0, 1))
        labels.append(nib.load(os.path.join(data, "labelsTr", f"spleen_{i:02d}.nii.gz")).get_fdata())
    x = torch.as_tensor(np.stack(images)[:, None], dtype=torch.float32)
    y = torch.as_tensor(np.stack(labels), dtype=torch.long)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y, weight=torch.tensor([1.0, 5.0]))
        loss.backward()
        optimizer.step()
    net.eval()


def spleen_like(root: str, cases: int = 2, test_cases: int = 1, shape: tuple[int, int, int] = (24, 24, 16),
                roi: int = 16, fmt: str = "json", seed: int = 0, train_steps: int = 0) -> tuple[str, str]:
    """A bundle shaped as ``spleen_ct_segmentation`` and its data (``imagesTr``, ``labelsTr``, ``imagesTs``).

    Args:
        root: where to write ``spleen_ct_segmentation/`` and ``Task09_Spleen/``.
        cases: labelled cases (the last 9 are the validation set, as in the zoo).
        test_cases: unlabelled cases for inference.
        shape: volume shape (spacing 1.5 x 1.5 x 2 mm, RAS, so the bundle's resampling keeps it).
        roi: the sliding-window size of the bundle's inferers (cubic).
        fmt: ``"json"`` or ``"yaml"`` for train, evaluate and inference.
        seed: seeds the weights and the data.
        train_steps: train the network this many Adam steps on the labelled cases (0: random weights with random
            BatchNorm statistics), so that its segmentation is not trivial.

    Returns:
        ``(bundle folder, dataset folder)``.
    """
    bundle = os.path.join(root, "spleen_ct_segmentation")
    data = os.path.join(root, "Task09_Spleen")
    rng = np.random.default_rng(seed)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(data, folder), exist_ok=True)
    for i in range(cases + test_cases):
        image, label = _ct_case(rng, shape)
        name = f"spleen_{i:02d}.nii.gz"
        if i < cases:
            nib.save(nib.Nifti1Image(image, affine), os.path.join(data, "imagesTr", name))
            nib.save(nib.Nifti1Image(label, affine), os.path.join(data, "labelsTr", name))
        else:
            nib.save(nib.Nifti1Image(image, affine), os.path.join(data, "imagesTs", name))
    suffix = ".json" if fmt == "json" else ".yaml"
    window = [roi] * 3
    write_config(os.path.join(bundle, "configs", "train" + suffix), _spleen_train(window))
    write_config(os.path.join(bundle, "configs", "evaluate" + suffix), _spleen_evaluate())
    write_config(os.path.join(bundle, "configs", "inference" + suffix), _spleen_inference(window))
    torch.manual_seed(seed)
    net = UNet(**{k: v for k, v in SPLEEN_UNET.items() if k != "_target_"})
    if train_steps:
        _train_briefly(net, data, cases, train_steps)
    else:
        random_batchnorm_statistics(net, seed)
    metadata = _metadata(
        "Spleen CT segmentation",
        _tensor_format(1, window, {"0": "image"}, "hounsfield", [0, 1]),
        _tensor_format(2, window, {"0": "background", "1": "spleen"}, "segmentation", [0, 1]),
        {"nibabel": "5.2.1", "pytorch-ignite": "0.4.11"},
        {"mean_dice": 0.961},
    )
    _common_files(bundle, net, metadata)
    return bundle, data


# -- brats_mri_segmentation ------------------------------------------------------------------------------------


def _brats_train(roi: list[int]) -> dict[str, Any]:
    keys = ["image", "label"]
    metric = {"_target_": "MeanDice", "include_background": True}
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "data_list_file_path": "$@bundle_root + '/configs/datalist.json'",
        "dataset_dir": "/workspace/data/medical/brats2018challenge",
        "train_datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='training', "
                          "base_dir=@dataset_dir)",
        "val_datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='validation', "
                        "base_dir=@dataset_dir)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "epochs": 2,
        "val_interval": 1,
        "learning_rate": 0.0001,
        "amp": True,
        "network_def": dict(BRATS_SEGRESNET),
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "DiceLoss", "smooth_nr": 0, "smooth_dr": 1e-05, "squared_pred": True,
                 "to_onehot_y": False, "sigmoid": True},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
        "train": {
            "preprocessing_transforms": [
                {"_target_": "LoadImaged", "keys": keys, "image_only": False},
                {"_target_": "ConvertToMultiChannelBasedOnBratsClassesd", "keys": "label"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True},
            ],
            "random_transforms": [
                {"_target_": "RandSpatialCropd", "keys": keys, "roi_size": roi, "random_size": False},
                {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 0},
                {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 1.0},
                {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 1.0},
            ],
            "preprocessing": {"_target_": "Compose",
                              "transforms": "$@train#preprocessing_transforms + @train#random_transforms"},
            "dataset": {"_target_": "Dataset", "data": "@train_datalist", "transform": "@train#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": 1, "shuffle": True},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            ]},
            "handlers": [{"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                          "interval": "@val_interval"}],
            "key_metric": {"train_mean_dice": {**metric, "output_transform": _from_engine(["pred", "label"])}},
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                        "optimizer": "@optimizer", "inferer": "@train#inferer",
                        "postprocessing": "@train#postprocessing", "key_train_metric": "@train#key_metric",
                        "train_handlers": "@train#handlers", "amp": "@amp"},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": "$@train#preprocessing_transforms"},
            "dataset": {"_target_": "Dataset", "data": "@val_datalist", "transform": "@validate#preprocessing"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "shuffle": False,
                           "num_workers": 0},
            "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 1, "overlap": 0.5},
            "postprocessing": {"_target_": "Compose", "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {"_target_": "SplitDimd", "keys": ["pred", "label"], "output_postfixes": ["tc", "wt", "et"]},
            ]},
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
                 "save_key_metric": True, "key_metric_filename": "model.pt"},
            ],
            "key_metric": {"val_mean_dice": {**metric, "output_transform": _from_engine(["pred", "label"])}},
            "additional_metrics": {
                f"val_mean_dice_{c}": {**metric, "output_transform": _from_engine([f"pred_{c}", f"label_{c}"])}
                for c in ("tc", "wt", "et")
            },
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric",
                          "additional_metrics": "@validate#additional_metrics",
                          "val_handlers": "@validate#handlers", "amp": "@amp"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@train#trainer.run()"],
    }


_BRATS_LABEL_MAP = "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"


def _brats_evaluate() -> dict[str, Any]:
    return {
        "validate#postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@validate#preprocessing", "orig_keys": "image",
             "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True,
             "device": "@validate#evaluator#device"},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            {"_target_": "SplitDimd", "keys": ["pred", "label"], "output_postfixes": ["tc", "wt", "et"]},
            {"_target_": "CopyItemsd", "keys": "pred", "names": "pred_combined", "times": 1},
            {"_target_": "Lambdad", "keys": "pred_combined", "func": _BRATS_LABEL_MAP},
            {"_target_": "SaveImaged", "keys": "pred_combined", "meta_keys": "pred_meta_dict",
             "output_dir": "@output_dir", "output_postfix": "seg", "output_dtype": "uint8", "resample": False,
             "squeeze_end_dims": True},
        ]},
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'",
             "load_dict": {"model": "@network"}},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir",
             "metrics": ["val_mean_dice", "val_mean_dice_tc", "val_mean_dice_wt", "val_mean_dice_et"],
             "metric_details": ["val_mean_dice"], "batch_transform": "$monai.handlers.from_engine(['image_meta_dict'])",
             "summary_ops": "*"},
        ],
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
        "run": ["$@validate#evaluator.run()"],
    }


def _brats_inference(roi: list[int]) -> dict[str, Any]:
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "uint8",
        "output_postfix": "seg",
        "separate_folder": True,
        "load_pretrain": True,
        "data_list_file_path": "$@bundle_root + '/configs/datalist.json'",
        "dataset_dir": "/workspace/data/medical/brats2018challenge",
        "test_datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='testing', "
                         "base_dir=@dataset_dir)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": True,
        "network_def": dict(BRATS_SEGRESNET),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key", "image_only": False},
            {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True, "channel_wise": True},
        ]},
        "dataset": {"_target_": "Dataset", "data": "@test_datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": True,
                       "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 1, "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
             "meta_keys": "pred_meta_dict", "nearest_interp": False, "to_tensor": True},
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            {"_target_": "Lambdad", "keys": "pred", "func": _BRATS_LABEL_MAP},
            {"_target_": "SaveImaged", "keys": "pred", "meta_keys": "pred_meta_dict", "output_dir": "@output_dir",
             "output_ext": "@output_ext", "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
             "separate_folder": "@separate_folder", "resample": False, "squeeze_end_dims": True},
        ]},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def _mri_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Four MRI-like channels (zero outside a 'brain') and a BraTS label (1 necrosis, 2 oedema, 4 enhancing)."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).astype(np.float32)
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    brain = (((grid - centre) / (np.array(shape)[:, None, None, None] * 0.45)) ** 2).sum(0) < 1
    distance = np.sqrt(((grid - centre - rng.uniform(-2, 2, (3, 1, 1, 1))) ** 2).sum(0))
    label = np.zeros(shape, dtype=np.uint8)
    label[distance < 5.0] = 2
    label[distance < 3.0] = 4
    label[distance < 1.5] = 1
    label[~brain] = 0
    channels = []
    for contrast in (1.0, 0.6, 1.4, 1.2):
        image = brain * (300 * contrast + 200 * (label == 4) + 120 * (label == 2) + rng.normal(0, 20, shape))
        channels.append(np.where(brain, image, 0).astype(np.float32))
    return channels, label


def brats_like(root: str, validation: int = 3, testing: int = 1, shape: tuple[int, int, int] = (24, 24, 16),
               roi: tuple[int, int, int] = (24, 24, 16), seed: int = 1) -> tuple[str, str]:
    """A bundle shaped as ``brats_mri_segmentation`` (four modality files per case, ``configs/datalist.json``)
    and its data.

    Returns:
        ``(bundle folder, dataset folder)``.
    """
    bundle = os.path.join(root, "brats_mri_segmentation")
    data = os.path.join(root, "brats2018challenge")
    rng = np.random.default_rng(seed)
    affine = np.eye(4)
    lists: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "testing": []}
    sections = ["training"] + ["validation"] * validation + ["testing"] * testing
    for i, section in enumerate(sections):
        case = f"training/HGG/Brats18_{i:03d}"
        os.makedirs(os.path.join(data, case), exist_ok=True)
        channels, label = _mri_case(rng, shape)
        files = []
        for modality, image in zip(("t1ce", "t1", "t2", "flair"), channels):
            files.append(f"{case}/Brats18_{i:03d}_{modality}.nii.gz")
            nib.save(nib.Nifti1Image(image, affine), os.path.join(data, files[-1]))
        nib.save(nib.Nifti1Image(label, affine), os.path.join(data, case, f"Brats18_{i:03d}_seg.nii.gz"))
        label_file = f"{case}/Brats18_{i:03d}_seg.nii.gz"
        item = {"image": files} if section == "testing" else {"image": files, "label": label_file}
        lists[section].append(item)
    window = list(roi)
    write_config(os.path.join(bundle, "configs", "datalist.json"), lists)
    write_config(os.path.join(bundle, "configs", "train.json"), _brats_train(window))
    write_config(os.path.join(bundle, "configs", "evaluate.json"), _brats_evaluate())
    write_config(os.path.join(bundle, "configs", "inference.json"), _brats_inference(window))
    torch.manual_seed(seed)
    net = SegResNet(**{k: v for k, v in BRATS_SEGRESNET.items() if k != "_target_"})
    channel_def = {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}
    metadata = _metadata(
        "BraTS MRI segmentation",
        _tensor_format(4, ["8*n"] * 3, {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}, "magnitude", []),
        _tensor_format(3, ["8*n"] * 3, channel_def, "segmentation", [0, 1]),
        {"nibabel": "5.2.1", "pytorch-ignite": "0.4.11"},
        {"val_mean_dice": 0.8518, "val_mean_dice_tc": 0.8559},
    )
    _common_files(bundle, net, metadata)
    os.makedirs(os.path.join(bundle, "scripts"), exist_ok=True)
    with open(os.path.join(bundle, "scripts", "prepare_datalist.py"), "w") as f:
        f.write('"""Writes configs/datalist.json (test stand-in)."""\n')
    return bundle, data
