"""The one evaluator of the comparison: sliding-window prediction and Dice per class and mean.

MONAI ``sliding_window_inference`` predicts every evaluation volume; ``DiceMetric(reduction="mean_batch")`` scores
the prediction against the label and against the float network's own prediction (``include_background`` off for a
softmax network, every channel a class for a sigmoid one). As ``DiceMetric`` does, a case whose reference lacks a
class is left out of that class's mean, and a class that no case's reference holds scores 0. The mean Dice is the
mean over the classes (``None`` values, if any, left out).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Case", "Evaluator", "nanmean"]

Case = tuple[torch.Tensor, "torch.Tensor | None"]
"""One evaluation volume: the image ``(C, *S)`` and its label ``(1, *S)`` of class indices (or ``None``)."""


def nanmean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are neither ``None`` nor NaN; ``None`` if there are none."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(kept)) if kept else None


def _none_for_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class Evaluator:
    """Predict the evaluation cases with a network and score the predictions.

    Args:
        cases: the evaluation volumes with their labels.
        roi_size: sliding-window size.
        overlap: sliding-window overlap.
        sw_batch_size: windows per forward pass.
        prediction: ``"softmax"`` (one class per voxel, argmax) or ``"sigmoid"`` (a channel is on where its
            logit is > 0).
        class_names: names of the output channels (channel 0 first); missing names are ``class<i>``.
        device: where the network runs.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        roi_size: Sequence[int],
        overlap: float = 0.25,
        sw_batch_size: int = 1,
        prediction: str = "softmax",
        class_names: Sequence[str] | None = None,
        device: str = "cpu",
    ) -> None:
        self.cases = list(cases)
        self.roi_size = tuple(roi_size)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.multi_label = prediction == "sigmoid"
        self.class_names = list(class_names or [])
        self.device = torch.device(device)
        self.reference: list[torch.Tensor] | None = None

    @torch.no_grad()
    def predict(self, net: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """The one-hot (or multi-label) prediction ``(1, K, *S)`` uint8 of ``net`` for one image ``(C, *S)``."""
        from monai.inferers import sliding_window_inference

        logits = sliding_window_inference(
            image[None].to(self.device), self.roi_size, self.sw_batch_size, net, overlap=self.overlap
        )
        logits = logits.as_tensor() if hasattr(logits, "as_tensor") else logits
        if self.multi_label:
            return (logits > 0).to(torch.uint8).cpu()
        return self.one_hot(logits.argmax(1, keepdim=True), logits.shape[1]).cpu()

    def one_hot(self, label: torch.Tensor, channels: int) -> torch.Tensor:
        """A label ``(1, 1, *S)`` of class indices as one-hot ``(1, channels, *S)`` uint8 (a multi-label label
        ``(1, channels, *S)`` is already one)."""
        if self.multi_label:
            return label.to(torch.uint8)
        indices = label[:, 0].long().clamp_min(0)
        return torch.nn.functional.one_hot(indices, channels).movedim(-1, 1).to(torch.uint8)

    def names(self, channels: int) -> list[str]:
        """The names of the scored classes (background, channel 0, left out unless multi-label)."""
        first = 0 if self.multi_label else 1
        names = self.class_names
        return [names[i] if i < len(names) else f"class{i}" for i in range(first, channels)]

    def set_reference(self, predictions: list[torch.Tensor]) -> None:
        """Score later networks against these predictions too (the float network's, from :meth:`evaluate`)."""
        self.reference = predictions

    def evaluate(self, net: nn.Module) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Predict every case with ``net`` and score it.

        Returns:
            ``(scores, predictions)``: ``scores`` holds ``eval_seconds``, ``cases``, and where there are labels
            ``dice`` (per class) and ``mean_dice``, and where there is a reference ``dice_vs_float`` and
            ``mean_dice_vs_float``; ``predictions`` the ``(1, K, *S)`` predictions.
        """
        from monai.metrics import DiceMetric

        start = time.perf_counter()
        net = net.eval()
        vs_label = DiceMetric(include_background=self.multi_label, reduction="mean_batch")
        vs_reference = DiceMetric(include_background=self.multi_label, reduction="mean_batch")
        predictions, labelled = [], False
        for i, (image, label) in enumerate(self.cases):
            pred = self.predict(net, image)
            predictions.append(pred)
            if label is not None:
                labelled = True
                vs_label(y_pred=pred.float(), y=self.one_hot(label[None], pred.shape[1]).float())
            if self.reference is not None:
                vs_reference(y_pred=pred.float(), y=self.reference[i].float())
        names = self.names(predictions[0].shape[1]) if predictions else []
        scores: dict[str, Any] = {"eval_seconds": time.perf_counter() - start, "cases": len(self.cases)}
        if labelled:
            scores.update(self._scores(vs_label, names, ""))
        if self.reference is not None:
            scores.update(self._scores(vs_reference, names, "_vs_float"))
        return scores, predictions

    @staticmethod
    def _scores(metric: Any, names: list[str], suffix: str) -> dict[str, Any]:
        per_class = [_none_for_nan(v) for v in metric.aggregate().tolist()]
        return {f"dice{suffix}": dict(zip(names, per_class)), f"mean_dice{suffix}": nanmean(per_class)}
