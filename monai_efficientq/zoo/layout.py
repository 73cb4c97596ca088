"""The input bundle's folder (:class:`BundleLayout`), its packages and the output folder, checked before any work."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
from collections.abc import Mapping
from typing import Any

__all__ = [
    "CONFIG_SUFFIXES",
    "EVALUATION_ORDER",
    "FLOAT_CHECKPOINT",
    "INFERENCE_ORDER",
    "BundleLayout",
    "MissingPackagesError",
    "check_bundle_packages",
    "check_out_dir",
]

FLOAT_CHECKPOINT = "model.pt"
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
CONFIG_NAMES = ("common", "train", "evaluate", "inference")
EVALUATION_ORDER = ("common", "train", "evaluate")  # the zoo's evaluate config layers on train
INFERENCE_ORDER = ("common", "inference")
# ``common``: ids shared by every config of a bundle that layers its configs on one (as this package's own
# brain-tissue bundle does); it comes first in every list of configs.


class MissingPackagesError(ImportError):
    """Packages a bundle's metadata lists that are not installed."""


@dataclasses.dataclass(frozen=True)
class BundleLayout:
    """The files of a bundle folder in the Model-Zoo layout.

    Attributes:
        root: the bundle folder (absolute).
        metadata: ``configs/metadata.json``.
        checkpoint: the float checkpoint ``models/model.pt``.
        configs: ``{"common" | "train" | "evaluate" | "inference": path}`` of the configs found (``.json``,
            ``.yaml`` or ``.yml``).
    """

    root: str
    metadata: str
    checkpoint: str
    configs: dict[str, str]

    @classmethod
    def find(cls, bundle_dir: str | os.PathLike | None) -> BundleLayout:
        """The layout of ``bundle_dir``.

        Raises:
            ValueError: no folder given, or a config given in two formats (e.g. ``inference.json`` and ``.yaml``).
            FileNotFoundError: no such folder, or no ``configs/metadata.json``, ``models/model.pt`` or inference or
                evaluate config in it.
        """
        if bundle_dir is None:
            raise ValueError("no bundle folder given: pass it (--bundle_dir with python -m monai.bundle run).")
        root = os.path.abspath(os.fspath(bundle_dir))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"bundle folder not found: {root}")
        metadata = os.path.join(root, "configs", "metadata.json")
        checkpoint = os.path.join(root, "models", FLOAT_CHECKPOINT)
        for what, path in (("metadata", metadata), ("float checkpoint", checkpoint)):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"bundle {what} not found: {path} (a Model-Zoo bundle has configs/metadata.json and "
                    f"models/model.pt; download the weights first, e.g. python -m monai.bundle download)."
                )
        configs = {name: path for name in CONFIG_NAMES if (path := _config_file(root, name))}
        if "inference" not in configs and "evaluate" not in configs:
            raise FileNotFoundError(
                f"{root}/configs has no inference or evaluate config (.json, .yaml or .yml): is it a bundle folder?"
            )
        return cls(root, metadata, checkpoint, configs)

    @property
    def evaluation_files(self) -> list[str]:
        """The configs that define ``validate#...``, in the order the zoo merges them (``evaluate`` on ``train``,
        both on ``common`` if the bundle has one); none without a ``train`` or ``evaluate`` config."""
        if "train" not in self.configs and "evaluate" not in self.configs:
            return []
        return [self.configs[name] for name in EVALUATION_ORDER if name in self.configs]

    @property
    def inference_files(self) -> list[str]:
        """The inference config (on ``common`` if the bundle has one); none without an inference config."""
        if "inference" not in self.configs:
            return []
        return [self.configs[name] for name in INFERENCE_ORDER if name in self.configs]

    def read_metadata(self) -> dict[str, Any]:
        """The bundle's ``metadata.json``."""
        with open(self.metadata, encoding="utf-8") as f:
            return json.load(f)


def _config_file(root: str, name: str) -> str | None:
    found = [p for s in CONFIG_SUFFIXES if os.path.isfile(p := os.path.join(root, "configs", name + s))]
    if len(found) > 1:
        raise ValueError(f"the bundle has {len(found)} '{name}' configs ({', '.join(found)}): keep one of them.")
    return found[0] if found else None


def check_bundle_packages(metadata: Mapping[str, Any]) -> None:
    """Check that the packages a bundle's metadata lists (``required_packages_version`` and its older name
    ``optional_packages_version``) are installed, whatever their versions.

    Raises:
        MissingPackagesError: one line naming every missing package and the ``pip install`` that adds them.
    """
    listed: dict[str, Any] = {}
    for key in ("optional_packages_version", "required_packages_version"):
        listed.update(metadata.get(key) or {})
    missing = []
    for name in listed:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise MissingPackagesError(
            f"the bundle's metadata lists packages that are not installed: {', '.join(missing)}; install them "
            f"with `pip install {' '.join(missing)}` (or skip this check with --check_packages False)."
        )


def check_out_dir(out_dir: str | os.PathLike | None, bundle_root: str) -> str:
    """``out_dir`` as an absolute path, checked: new (or an empty folder), outside the input bundle, creatable.

    Raises:
        ValueError: naming what is wrong with it.
    """
    if out_dir is None:
        raise ValueError("no output folder given: pass it (--out_dir with python -m monai.bundle run).")
    target = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise ValueError(f"the output folder {target} already exists: choose a new folder or remove it first.")
    if os.path.commonpath([target, bundle_root]) in (target, bundle_root):
        raise ValueError(
            f"the output folder {target} overlaps the input bundle {bundle_root}: choose a folder beside it."
        )
    ancestor = os.path.dirname(target)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor) or not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"the output folder {target} cannot be created: {ancestor} is not a writable folder.")
    return target
