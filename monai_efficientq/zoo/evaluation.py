"""The bundle's own evaluation (its ``validate#evaluator``), run on the float and then the quantized network.

:class:`BundleEvaluation` builds the evaluator from the bundle's configs with two changes: its
``CheckpointLoader``/``CheckpointSaver`` handlers are left out (the float weights are loaded once by the caller; a
second load would undo the quantization and a saver would write into the input bundle), and when its key metric is
a ``MeanDice``, a copy of it with ``reduction="mean_batch"`` among its additional metrics gives the Dice per class.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..workflow import unwrap_config_error

from .configs import (
    EVAL_DATA_ID,
    EVALUATOR_ID,
    has_id,
    is_checkpoint_loader,
    parsed_content,
    raw_config,
    target_name,
)

__all__ = ["PER_CLASS_DICE", "BundleEvaluation", "evaluation_items", "class_names"]

logger = logging.getLogger("monai_efficientq")

#: Name of the per-class Dice metric added to the bundle's evaluator.
PER_CLASS_DICE = "efficientq_dice_per_class"


def evaluation_items(parser: Any, max_eval_volumes: int | None = None) -> list[dict[str, Any]]:
    """The bundle's evaluation data items (``validate#dataset#data``), the first ``max_eval_volumes`` of them.

    Raises:
        ValueError: the data cannot be read (e.g. a datalist file missing), or ``max_eval_volumes`` is not positive.
    """
    if max_eval_volumes is not None and (
        isinstance(max_eval_volumes, bool) or not isinstance(max_eval_volumes, int) or max_eval_volumes < 1
    ):
        raise ValueError(f"--max_eval_volumes={max_eval_volumes!r}: give a positive number (or omit it for all).")
    if not has_id(parser, EVAL_DATA_ID):
        return []
    try:
        items = list(parser.get_parsed_content(EVAL_DATA_ID))
    except Exception as err:
        cause = unwrap_config_error(err)
        raise ValueError(
            f"cannot read the bundle's evaluation data ({EVAL_DATA_ID}): {type(cause).__name__}: {cause}; pass "
            f"--dataset_dir where the data are, or --evaluate False with --calib IMAGE."
        ) from err
    return [dict(item) for item in items[:max_eval_volumes]]


def _without_checkpoint_handlers(parser: Any) -> None:
    """Drop the ``CheckpointLoader``/``CheckpointSaver`` entries of the evaluator's handler list."""
    list_id = f"{EVALUATOR_ID}#val_handlers"
    handlers = parser[list_id] if has_id(parser, list_id) else None
    if isinstance(handlers, str) and handlers[:1] in ("@", "%") and has_id(parser, handlers[1:]):
        list_id, handlers = handlers[1:], parser[handlers[1:]]
    if isinstance(handlers, list):
        parser[list_id] = [h for h in handlers if not (is_checkpoint_loader(h) or target_name(h) == "CheckpointSaver")]


def _per_class_dice_config(parser: Any) -> dict[str, Any] | None:
    """The bundle's key ``MeanDice`` metric with ``reduction="mean_batch"`` (its own output transform and
    ``include_background``), or ``None`` when its key metric is not a ``MeanDice``."""
    config_id = f"{EVALUATOR_ID}#key_val_metric"
    if not has_id(parser, config_id):
        return None
    metrics = raw_config(parser, config_id)
    if not isinstance(metrics, Mapping):
        return None
    for metric in metrics.values():
        if isinstance(metric, str) and metric[:1] in ("@", "%") and has_id(parser, metric[1:]):
            metric = raw_config(parser, metric[1:])
        if target_name(metric) == "MeanDice":
            return {**copy.deepcopy(dict(metric)), "reduction": "mean_batch"}
    return None


def class_names(metadata: Mapping[str, Any], count: int, include_background: bool) -> list[str]:
    """Names of ``count`` per-class Dice values from the ``channel_def`` of the metadata's ``pred`` output (channel
    0 left out when the metric leaves the background out); ``class0``, ``class1``, ... when they do not fit."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    output = outputs.get("pred") or next(iter(outputs.values()), {})
    channels = output.get("channel_def") or {}
    names = [str(channels[k]) for k in sorted(channels, key=int)] if channels else []
    if not include_background and len(names) == count + 1:
        names = names[1:]
    if len(names) != count or len(set(names)) != count or "mean" in names:
        names = [f"class{i}" for i in range(count)]
    return names


def _add_metric(parser: Any, name: str, metric: dict[str, Any]) -> None:
    """Add ``metric`` to the evaluator's ``additional_metrics`` in the config, so that it is attached with the
    bundle's metrics, before the handlers that log or save them."""
    config_id = f"{EVALUATOR_ID}#additional_metrics"
    current = parser[config_id] if has_id(parser, config_id) else None
    if isinstance(current, str) and current[:1] == "@" and has_id(parser, current[1:]):
        config_id, current = current[1:], parser[current[1:]]
    if isinstance(current, Mapping):
        parser[f"{config_id}#{name}"] = metric
    else:
        parser[config_id] = {name: metric}


class BundleEvaluation:
    """The bundle's ``validate#evaluator`` on ``items``, run once per network state.

    Args:
        parser: the parser of the bundle's evaluation configs (changed: the evaluation data and handler list).
        items: the evaluation data items.
        metadata: the bundle's metadata (for the class names).
    """

    def __init__(self, parser: Any, items: list[dict[str, Any]], metadata: Mapping[str, Any]) -> None:
        parser[EVAL_DATA_ID] = items
        _without_checkpoint_handlers(parser)
        dice = _per_class_dice_config(parser)
        if dice is not None:
            _add_metric(parser, PER_CLASS_DICE, dice)
        self.evaluator = parsed_content(parser, EVALUATOR_ID, "evaluator")
        self.include_background: bool | None = None if dice is None else bool(dice.get("include_background", True))
        self.metadata = metadata
        self.volumes = len(items)

    @property
    def network(self) -> nn.Module:
        """The evaluator's network (unwrapped from ``DataParallel``)."""
        net = self.evaluator.network
        while isinstance(net, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            net = net.module
        return net

    def run(self, what: str) -> tuple[dict[str, float], dict[str, float]]:
        """Run the evaluation.

        Args:
            what: the network's state, for the log (``"float"``, ``"quantized"``).

        Returns:
            ``(the bundle's scalar metrics, {class: Dice, ..., "mean": ...})`` (the second empty without a
            ``MeanDice`` key metric).
        """
        from ..bundle import dice_by_class

        logger.info("EfficientQ: evaluating the %s network on %d volume(s)", what, self.volumes)
        self.evaluator.run()
        metrics = self.evaluator.state.metrics
        scalars = {
            name: float(torch.as_tensor(value).item())
            for name, value in metrics.items()
            if name != PER_CLASS_DICE and torch.as_tensor(value).numel() == 1
        }
        dice: dict[str, float] = {}
        if self.include_background is not None:
            count = torch.as_tensor(metrics[PER_CLASS_DICE]).numel()
            names = class_names(self.metadata, count, self.include_background)
            dice = dice_by_class(self.evaluator, PER_CLASS_DICE, names)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in {**scalars, **dice}.items())
        logger.info("EfficientQ: %s metrics %s", what, shown)
        return scalars, dice
