"""Reading a Model-Zoo bundle's configs, and the quantized bundle's configs made from them.

Reading: a ``ConfigParser`` of merged config files (:func:`bundle_parser`), raw lookups that follow ``@``/``%``
references (:func:`raw_config`), what the bundle's post-processing and inferer say (:func:`prediction_kind`,
:func:`inferer_roi`). Writing: :func:`quantized_config` (``CheckpointLoader`` → ``QuantizedCheckpointLoader`` of
``model_quantized.pt``), :func:`with_export` (an ``export`` run id for TorchScript) and :func:`config_text`.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..workflow import has_config_id as has_id
from ..workflow import unwrap_config_error

__all__ = [
    "QUANTIZED_CHECKPOINT",
    "LOADER_TARGET",
    "EVALUATOR_ID",
    "EVAL_DATA_ID",
    "EVAL_PREPROCESSING_ID",
    "INFERENCE_PREPROCESSING_ID",
    "NETWORK_DEF_ID",
    "bundle_parser",
    "has_id",
    "raw_config",
    "parsed_content",
    "target_name",
    "is_checkpoint_loader",
    "prediction_kind",
    "inferer_roi",
    "quantized_config",
    "with_export",
    "read_config",
    "config_text",
]

logger = logging.getLogger("monai_efficientq")

#: File name of the packed checkpoint in the quantized bundle's ``models/``.
QUANTIZED_CHECKPOINT = "model_quantized.pt"
LOADER_TARGET = "monai_efficientq.handlers.QuantizedCheckpointLoader"

# ids of the Model-Zoo configs
EVALUATOR_ID = "validate#evaluator"
EVAL_DATA_ID = "validate#dataset#data"
EVAL_PREPROCESSING_ID = "validate#preprocessing"
INFERENCE_PREPROCESSING_ID = "preprocessing"
INFERER_IDS = ("validate#inferer", "inferer")
POSTPROCESSING_IDS = ("validate#postprocessing", "postprocessing")
NETWORK_DEF_ID = "network_def"

_FLOAT_NAME = re.compile(r"(?<![\w.-])model\.pt\b")


# -- reading ---------------------------------------------------------------------------------------------------


def bundle_parser(files: Sequence[str], meta_file: str | None, values: Mapping[str, Any]) -> Any:
    """A ``ConfigParser`` of ``files`` (merged left to right) with the metadata and ``values`` (``{id: value}``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(files))
    if meta_file is not None:
        parser.read_meta(meta_file)
    for config_id, value in values.items():
        parser[config_id] = value
    return parser


def raw_config(parser: Any, config_id: str) -> Any:
    """The raw config at ``config_id``, following ``@id`` and ``%id`` references."""
    value = parser[config_id]
    seen = {config_id}
    while isinstance(value, str) and value[:1] in ("@", "%") and value[1:] not in seen and has_id(parser, value[1:]):
        seen.add(value[1:])
        value = parser[value[1:]]
    return value


def parsed_content(parser: Any, config_id: str, what: str) -> Any:
    """``parser.get_parsed_content(config_id)``, an error naming ``what`` and the innermost cause if it fails."""
    try:
        return parser.get_parsed_content(config_id)
    except Exception as err:
        cause = unwrap_config_error(err)
        raise ValueError(f"cannot build the bundle's {what} ({config_id}): {type(cause).__name__}: {cause}") from err


def target_name(item: Any) -> str:
    """The class name of a component config's ``_target_`` (``""`` for anything else)."""
    target = item.get("_target_", "") if isinstance(item, Mapping) else ""
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else ""


def _walk(config: Any) -> Iterator[Any]:
    yield config
    children = config.values() if isinstance(config, Mapping) else config if isinstance(config, list) else ()
    for child in children:
        yield from _walk(child)


def prediction_kind(parsers: Sequence[Any]) -> str | None:
    """``"sigmoid"`` or ``"softmax"``, from the first ``Activations(d)`` of the bundle's post-processing
    (evaluation first, then inference); ``None`` if there is none."""
    for parser in parsers:
        for config_id in POSTPROCESSING_IDS:
            if not has_id(parser, config_id):
                continue
            for item in _walk(raw_config(parser, config_id)):
                if target_name(item) in ("Activationsd", "Activations"):
                    for kind in ("sigmoid", "softmax"):
                        if item.get(kind) is True:
                            return kind
    return None


def inferer_roi(parsers: Sequence[Any]) -> list[int] | None:
    """The ``roi_size`` of the bundle's ``SlidingWindowInferer`` (evaluation first, then inference), if any."""
    for parser in parsers:
        for config_id in INFERER_IDS:
            if has_id(parser, config_id) and target_name(raw_config(parser, config_id)) == "SlidingWindowInferer":
                roi = parser.get_parsed_content(f"{config_id}#roi_size")
                return [int(r) for r in (roi if isinstance(roi, Sequence) else [roi])]
    return None


# -- the quantized bundle's configs ----------------------------------------------------------------------------


def is_checkpoint_loader(item: Any) -> bool:
    """Whether ``item`` is the config of MONAI's ``CheckpointLoader`` (by short or full class path)."""
    if target_name(item) != "CheckpointLoader":
        return False
    module = item["_target_"].rpartition(".")[0]
    return module == "" or module.startswith("monai.handlers")


def _packed_name(value: Any) -> Any:
    """``value`` with every file name ``model.pt`` in its strings renamed to the packed checkpoint's (except in a
    ``CheckpointSaver``: it would overwrite the packed checkpoint with a state dict)."""
    if isinstance(value, str):
        return _FLOAT_NAME.sub(QUANTIZED_CHECKPOINT, value)
    if isinstance(value, Mapping) and target_name(value) == "CheckpointSaver":
        return value
    if isinstance(value, Mapping):
        return {k: _packed_name(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_packed_name(v) for v in value]
    return value


def _quantized_loader(loader: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~monai_efficientq.handlers.QuantizedCheckpointLoader` entry replacing a ``CheckpointLoader``
    entry: its path, the network of its ``load_dict`` (``model``, else the only one), its name and its
    ``_disabled_``/``_requires_``/``_desc_`` keys."""
    load_dict = loader.get("load_dict")
    network = None
    if isinstance(load_dict, Mapping) and load_dict:
        network = load_dict.get("model", next(iter(load_dict.values())) if len(load_dict) == 1 else None)
    new: dict[str, Any] = {"_target_": LOADER_TARGET, "load_path": loader.get("load_path")}
    if network is not None:
        new["network"] = network
    if loader.get("name") is not None:
        new["name"] = loader["name"]
    new.update({k: v for k, v in loader.items() if k.startswith("_") and k != "_target_"})
    return new


def loads_packed_checkpoint(config: Any) -> bool:
    """Whether ``config`` already has a :class:`~monai_efficientq.handlers.QuantizedCheckpointLoader` entry."""
    return any(isinstance(item, Mapping) and item.get("_target_") == LOADER_TARGET for item in _walk(config))


def quantized_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """A bundle config that loads the packed checkpoint instead of the float one.

    Every string naming the file ``model.pt`` names ``model_quantized.pt`` instead (the checkpoint paths, and what
    refers to them, e.g. a ``_disabled_`` test of the file), and every MONAI ``CheckpointLoader`` entry becomes a
    :class:`~monai_efficientq.handlers.QuantizedCheckpointLoader` entry of the same path and network.

    Args:
        config: the raw config (as read from its JSON or YAML file); it is not changed.

    Returns:
        ``(new config, number of loaders replaced)``.
    """
    count = 0

    def rewrite(value: Any) -> Any:
        nonlocal count
        if is_checkpoint_loader(value):
            count += 1
            return _quantized_loader(value)
        if isinstance(value, Mapping):
            return {k: rewrite(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        return value

    new = rewrite(_packed_name(copy.deepcopy(dict(config))))
    return new, count


def with_export(config: Mapping[str, Any], input_shape: Sequence[int]) -> dict[str, Any]:
    """``config`` with an ``export`` run id: the packed checkpoint loaded into a fresh ``network_def`` (the zoo's
    ``initialize`` may already have loaded it into ``network``) and saved as TorchScript
    (``models/model_quantized.ts``) with the bundle metadata, checked on an input of ``input_shape``."""
    config = dict(config)
    if "export" in config or NETWORK_DEF_ID not in config:
        logger.warning("EfficientQ: the inference config has an 'export' id or no '%s'; no TorchScript export added.",
                       NETWORK_DEF_ID)
        return config
    imports = list(config.get("imports") or [])
    imports += [
        "$from monai_efficientq.handlers import load_network",
        "$from monai_efficientq.bundle import export_torchscript",
    ]
    stem = os.path.splitext(QUANTIZED_CHECKPOINT)[0]
    return {
        **config,
        "imports": imports,
        "efficientq_checkpoint": f"$@bundle_root + '/models/{QUANTIZED_CHECKPOINT}'",
        "efficientq_ts_path": f"$@bundle_root + '/models/{stem}.ts'",
        "efficientq_export_input_shape": [int(s) for s in input_shape],
        "efficientq_export_network": f"%{NETWORK_DEF_ID}",
        "export": [
            "$load_network(@efficientq_export_network, @efficientq_checkpoint)",
            "$export_torchscript(@efficientq_export_network, @efficientq_ts_path, @efficientq_export_input_shape, "
            "meta_file=@bundle_root + '/configs/metadata.json')",
        ],
    }


def read_config(path: str) -> dict[str, Any]:
    """A config file (JSON or YAML) as a dict, unparsed."""
    from monai.bundle import ConfigParser

    return dict(ConfigParser.load_config_file(path))


def config_text(config: Mapping[str, Any], path: str) -> str:
    """``config`` as the text of a file named ``path``: JSON for ``.json``, YAML otherwise."""
    if path.endswith(".json"):
        import json

        return json.dumps(config, indent=4) + "\n"
    import yaml

    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)
