"""Self-adaptive (class-balanced) attention: per-voxel weights of each layer's reconstruction error.

Each voxel gets the weight of its class, ``w_c = (n_max / n_c)^p`` (1 for absent classes), where the
classes come from the float network's own prediction (or a label). A layer's map is built at that
layer's own output resolution: the class scores are average-pooled to its shape and the class is
re-derived there. Voxels outside the body (input zero in every channel) get 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["AttentionMaps", "channel_argmax", "class_weights", "classes_from_scores", "label_to_scores"]

_ADAPTIVE_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def body_at(body: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """The body mask ``(N, *S0)`` at another resolution ``spatial``: a voxel is inside if any voxel it covers is."""
    spatial = tuple(int(s) for s in spatial)
    return _ADAPTIVE_MAX[len(spatial)](body[:, None].float(), spatial)[:, 0] > 0


def channel_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(dim=1)`` (the first maximal channel of each voxel), taken over a channel-last copy: the same
    indices, about five times faster on the CPU for a few channels over many voxels, whose strided reduction over
    dimension 1 is slow."""
    return scores.movedim(1, -1).contiguous().argmax(dim=-1)


def classes_from_scores(scores: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Per-voxel class membership (bool): ``(N, C, *S)`` for multi-class scores (channel 0 is their
    background class), ``(N, C+1, *S)`` for multi-label ones (index 0: no channel on).

    Args:
        scores: logits ``(N, C, *S)``; for multi-class nets also a one-hot or averaged one-hot label.
        multi_label: sigmoid channels (on where logit > 0, i.e. sigmoid > 0.5; background where none is on)
            instead of one argmax class per voxel (channel 0 of a multi-class net is its background).
    """
    if multi_label:
        on = scores > 0
        background = ~on.any(dim=1, keepdim=True)
        return torch.cat([background, on], dim=1)
    n_classes = scores.shape[1]
    return F.one_hot(channel_argmax(scores), n_classes).movedim(-1, 1).bool()


def class_weights(membership: torch.Tensor, power: float = 0.5) -> torch.Tensor:
    """``w_c = (n_max / n_c)^p`` from voxel counts; 1 for absent classes.

    Args:
        membership: ``(N, C, *S)`` bool class membership.
        power: the exponent ``p``.
    """
    counts = membership.flatten(2).sum(dim=(0, 2)).to(torch.float64)
    present = counts > 0
    weights = torch.ones_like(counts)
    if present.any():
        n_max = counts.max()
        weights[present] = (n_max / counts[present]) ** power
    return weights


def label_to_scores(label: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """A label ``(N, 1, *S)`` of class indices (or an already one-hot ``(N, C, *S)``) as float one-hot scores."""
    if label.shape[1] == 1:
        idx = label[:, 0].round().long()
        n = int(num_classes) if num_classes is not None else int(idx.max()) + 1
        return F.one_hot(idx.clamp_min(0), n).movedim(-1, 1).float()
    return label.float()


class AttentionMaps:
    """Per-layer attention maps derived from one set of class scores.

    Args:
        scores: ``(N, C, *S)`` logits of the float network (or one-hot label scores); each of the ``N``
            volumes gets the class weights of its own class counts.
        body: ``(N, *S)`` bool, voxels inside the body (input non-zero in some channel); ``None``: all.
        multi_label: scores are sigmoid logits (multi-label) instead of softmax logits / one-hot.
        power: exponent ``p`` of the class weights.
        weight_map: a precomputed full-resolution weight map ``(N, 1, *S)`` to pool instead of deriving
            classes (e.g. from :class:`~monai_efficientq.transforms.AttentionMapd`).
        integer: the published code's variant: class weights truncated to integers (it stores them in an
            integer tensor) and, for multi-label scores, a voxel takes the weight of the last channel that is on
            instead of the largest.
    """

    def __init__(
        self,
        scores: torch.Tensor | None,
        body: torch.Tensor | None,
        multi_label: bool,
        power: float = 0.5,
        weight_map: torch.Tensor | None = None,
        integer: bool = False,
    ) -> None:
        self.scores = scores.float() if scores is not None else None
        self.multi_label = multi_label
        self.body = body
        self.weight_map = weight_map.float() if weight_map is not None else None
        self.weights = None
        if self.scores is not None:  # (N, classes): each volume's own class balance
            member = classes_from_scores(self.scores, multi_label)
            self.weights = torch.stack([class_weights(member[i : i + 1], power) for i in range(member.shape[0])])
            if integer:
                self.weights = self.weights.floor()
        self.integer = integer
        self.spatial_dims = (self.scores if self.scores is not None else self.weight_map).dim() - 2
        self._maps: dict[tuple[int, ...], torch.Tensor] = {}  # by spatial shape: many layers share a resolution

    def full_resolution(self) -> torch.Tensor:
        """The voxel map at the scores' own resolution ``(N, *S)``."""
        ref = self.scores if self.scores is not None else self.weight_map
        return self.for_shape(ref.shape[0], tuple(ref.shape[2:]))

    def for_shape(self, batch: int, spatial: Sequence[int]) -> torch.Tensor | None:
        """The map ``(N, *spatial)`` for a layer output of that shape, or ``None`` when it does not apply
        (a different number of spatial dims or batch size: such a layer is weighted uniformly). Each resolution's
        map is computed once and shared by every layer of that output size (callers must not change it in place)."""
        spatial = tuple(int(s) for s in spatial)
        ref = self.scores if self.scores is not None else self.weight_map
        if len(spatial) != self.spatial_dims or batch != ref.shape[0]:
            return None
        if spatial not in self._maps:
            self._maps[spatial] = self._map_at(spatial)
        return self._maps[spatial]

    def _map_at(self, spatial: tuple[int, ...]) -> torch.Tensor:
        """The map pooled to ``spatial`` (see :meth:`for_shape`)."""
        if self.weight_map is not None:
            w = _ADAPTIVE_AVG[len(spatial)](self.weight_map, spatial)[:, 0].double()
        else:
            pooled = _ADAPTIVE_AVG[len(spatial)](self.scores, spatial)
            member = classes_from_scores(pooled, self.multi_label).to(torch.float64)
            weighted = member * self.weights.to(member.device).view(*self.weights.shape, *([1] * len(spatial)))
            if self.integer and self.multi_label:  # the last channel that is on wins
                last_on = (member * torch.arange(1, member.shape[1] + 1, device=member.device).view(
                    1, -1, *([1] * len(spatial)))).argmax(dim=1, keepdim=True)
                w = weighted.gather(1, last_on)[:, 0]
            else:
                w = weighted.amax(dim=1)
            w = torch.where(member.sum(dim=1) > 0, w, torch.ones_like(w))
        if self.body is not None:
            inside = body_at(self.body, spatial)
            w = torch.where(inside, w, torch.ones_like(w))
        return w
