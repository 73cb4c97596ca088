"""The quantized bundle's ``configs/multi_gpu_evaluate`` config: its evaluation under ``torchrun``, layered on its
``train`` and ``evaluate`` configs as the Model Zoo's ``multi_gpu_evaluate.json`` is on a float bundle's.

Each rank evaluates its share of ``validate#dataset`` (a ``DistributedSampler``, no shuffling, no padding) with the
packed checkpoint; MONAI's metrics and ``MetricsSaver`` gather the results across ranks. The network is not wrapped
in ``DistributedDataParallel``: evaluation needs no gradient synchronisation, and ``QuantizedCheckpointLoader``
swaps the quantized layers into the plain network. The device is ``cuda:LOCAL_RANK`` with the NCCL backend when
CUDA is available, else the CPU with gloo. The logging handlers (``StatsHandler``, progress bars, TensorBoard, ...)
are disabled on ranks > 0.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .configs import EVALUATOR_ID, has_id, target_name

__all__ = ["MULTI_GPU_EVALUATE", "RANK_ZERO_HANDLERS", "multi_gpu_evaluate_config"]

logger = logging.getLogger("monai_efficientq")

#: File stem of the distributed evaluation config in the quantized bundle's ``configs/``.
MULTI_GPU_EVALUATE = "multi_gpu_evaluate"
#: Handlers (class names) that only log or display: they run on rank 0 alone. ``MetricsSaver`` is not one of
#: them: it gathers the metric details of every rank.
RANK_ZERO_HANDLERS = frozenset(
    {
        "StatsHandler",
        "TensorBoardStatsHandler",
        "TensorBoardImageHandler",
        "ProgressBar",
        "MLFlowHandler",
        "ClearMLStatsHandler",
        "ClearMLImageHandler",
    }
)

DATASET_ID = "validate#dataset"
DATALOADER_ID = "validate#dataloader"
HANDLERS_ID = "validate#handlers"
NOT_RANK_ZERO = "dist.get_rank() > 0"


def _followed(parser: Any, config_id: str) -> tuple[str, Any]:
    """``(id, raw config)`` at the end of the ``@id``/``%id`` references starting at ``config_id``."""
    value = parser[config_id]
    seen = {config_id}
    while isinstance(value, str) and value[:1] in ("@", "%") and value[1:] not in seen and has_id(parser, value[1:]):
        config_id = value[1:]
        seen.add(config_id)
        value = parser[config_id]
    return config_id, value


def _steps(parser: Any, config_id: str) -> list[Any]:
    """The bundle's own ``initialize`` or ``finalize`` steps (a list, one expression, or none)."""
    if not has_id(parser, config_id):
        return []
    value = parser[config_id]
    return list(value) if isinstance(value, list) else [value]


def _rank_zero_only(disabled: Any) -> Any:
    """A handler's ``_disabled_`` that also disables it on ranks > 0 (``None``: cannot be combined)."""
    if disabled is None or disabled is False or (isinstance(disabled, str) and disabled.strip().lower() == "false"):
        return f"${NOT_RANK_ZERO}"
    if disabled is True or (isinstance(disabled, str) and disabled.strip().lower() == "true"):
        return True
    if isinstance(disabled, str) and disabled.startswith("$"):
        return f"$({disabled[1:]}) or {NOT_RANK_ZERO}"
    if isinstance(disabled, str) and disabled.startswith("@"):
        return f"${disabled} or {NOT_RANK_ZERO}"
    return None


def _handler_overrides(parser: Any) -> dict[str, Any]:
    """``{"<handlers id>#<i>#_disabled_": ...}`` for the logging handlers of the evaluator's handler list."""
    if not has_id(parser, HANDLERS_ID):
        return {}
    handlers_id, handlers = _followed(parser, HANDLERS_ID)
    if not isinstance(handlers, list):
        logger.warning("EfficientQ: %s is not a list; its logging handlers run on every rank.", HANDLERS_ID)
        return {}
    overrides: dict[str, Any] = {}
    for index, handler in enumerate(handlers):
        if target_name(handler) not in RANK_ZERO_HANDLERS:
            continue
        disabled = _rank_zero_only(handler.get("_disabled_"))
        if disabled is None:
            logger.warning("EfficientQ: %s#%d has a _disabled_ value that cannot be combined with the rank test; it "
                           "runs on every rank.", handlers_id, index)
        elif disabled is not True:
            overrides[f"{handlers_id}#{index}#_disabled_"] = disabled
    return overrides


def multi_gpu_evaluate_config(parser: Any) -> dict[str, Any] | None:
    """The distributed evaluation config layered on the bundle configs that ``parser`` merges.

    Args:
        parser: a ``ConfigParser`` of the quantized bundle's ``train`` and ``evaluate`` configs (merged as the zoo
            runs them), read but not parsed.

    Returns:
        the config (unparsed), or ``None`` (with a log line) when the evaluation has no ``validate#evaluator``,
        ``validate#dataset`` or ``validate#dataloader`` component to distribute.
    """
    missing = [i for i in (EVALUATOR_ID, DATASET_ID, DATALOADER_ID) if not has_id(parser, i)]
    if missing:
        logger.info("EfficientQ: the evaluate config has no %s; no multi-GPU evaluate config written.",
                    ", ".join(missing))
        return None
    loader_id, loader = _followed(parser, DATALOADER_ID)
    if not isinstance(loader, Mapping) or "_target_" not in loader:
        logger.info("EfficientQ: %s is not a component; no multi-GPU evaluate config written.", DATALOADER_ID)
        return None
    config: dict[str, Any] = {
        "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK']) if torch.cuda.is_available() "
                  "else torch.device('cpu')",
        "dist_backend": "$'nccl' if torch.cuda.is_available() else 'gloo'",
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": f"@{DATASET_ID}", "even_divisible": False,
                             "shuffle": False},
        f"{loader_id}#sampler": "@validate#sampler",
    }
    if loader.get("shuffle") not in (None, False):
        config[f"{loader_id}#shuffle"] = False  # a DataLoader refuses a sampler with shuffle=True
    config.update(_handler_overrides(parser))
    config["initialize"] = [
        "$import os",
        "$import torch.distributed as dist",
        "$dist.is_initialized() or dist.init_process_group(backend=@dist_backend)",
        "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
        *_steps(parser, "initialize"),
        "$import logging",
        f"$@{EVALUATOR_ID}.logger.setLevel(logging.WARNING if {NOT_RANK_ZERO} else logging.INFO)",
    ]
    config["run"] = [f"$@{EVALUATOR_ID}.run()"]
    config["finalize"] = [*_steps(parser, "finalize"), "$dist.is_initialized() and dist.destroy_process_group()"]
    return config
