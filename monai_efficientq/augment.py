"""Calibration augmentation: seeded random copies of the one calibration volume.

EfficientQ calibrates on a single volume. Weights fitted to reconstruct one volume's layer outputs can learn
that volume's particular activation-rounding pattern, which other volumes do not share (measured in the
benchmarks: at W4A4 a lower calibration error than round-to-nearest but a lower held-out Dice). Copies of
the volume under plausible acquisition changes (intensity scale and shift, a smooth bias field, gamma,
flips, a small rotation and scaling) give the solver more, and more varied, voxels at no cost to the ADMM
itself: the copies are one batch, their statistics add up in the same Gram matrices.

The copies keep the background at zero (the body mask of each copy is where its input is non-zero), so the
body rules of the activation fit and of the attention still apply. A label or a precomputed attention map
goes through the same spatial transforms as the image.
"""

from __future__ import annotations

import torch

__all__ = ["augmented_copies"]


def _transforms(keys: list[str], seed: int, spatial_dims: int):
    """MONAI dictionary transforms drawing augmented copies (intensity on ``image`` only; the spatial ones move
    every key together, ``label`` and ``body`` by nearest neighbour). 1-D data get no bias field or affine."""
    from monai.transforms import (
        Compose,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    spatial_keys = [k for k in keys if k != "image"] + ["image"]
    modes = ["nearest" if k in ("label", "body") else "bilinear" for k in spatial_keys]
    chain = [
        RandScaleIntensityd("image", factors=0.15, prob=1.0),
        RandShiftIntensityd("image", offsets=0.15, prob=1.0),
        RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=1.0),
        RandFlipd(spatial_keys, spatial_axis=0, prob=0.5),
    ]
    if spatial_dims in (2, 3):  # MONAI's bias field and affine grids are 2D/3D
        chain.insert(2, RandBiasFieldd("image", coeff_range=(0.0, 0.15), prob=1.0))
        chain.append(
            RandAffined(spatial_keys, prob=1.0, rotate_range=0.12, scale_range=0.08, mode=modes, padding_mode="zeros")
        )
    chain = Compose(chain)
    chain.set_random_state(seed=seed)
    return chain


def _plain(t) -> torch.Tensor:
    """A plain float tensor (MONAI transforms return MetaTensors)."""
    t = torch.as_tensor(t)
    return (t.as_tensor() if hasattr(t, "as_tensor") else t).float()


@torch.no_grad()
def augmented_copies(
    image: torch.Tensor,
    copies: int,
    seed: int = 0,
    label: torch.Tensor | None = None,
    attention_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The calibration batch ``image`` followed by ``copies`` augmented copies of each of its volumes.

    Args:
        image: ``(N, C, *S)`` calibration volumes.
        copies: augmented copies added per volume (0 returns the inputs unchanged).
        seed: seed of the random transforms (the same seed gives the same copies).
        label: ``(N, 1 | C', *S)`` labels, transformed like the image (nearest neighbour), or ``None``.
        attention_map: ``(N, 1, *S)`` precomputed attention maps, transformed like the image, or ``None``.

    Returns:
        ``(image, label, attention_map)`` with ``N · (1 + copies)`` volumes each (originals first, then the
        copies of volume 0, of volume 1, ...); ``None`` stays ``None``.
    """
    if copies <= 0:
        return image, label, attention_map
    if image.dim() < 3:
        raise ValueError(f"calibration data of shape {tuple(image.shape)} has no spatial dimensions to augment.")
    extra: dict[str, list[torch.Tensor]] = {"image": [], "label": [], "attention": []}
    for i in range(image.shape[0]):
        item = {"image": image[i].detach().float().cpu()}
        item["body"] = (item["image"] != 0).any(dim=0, keepdim=True).float()
        if label is not None:
            item["label"] = label[i].float().cpu()
        if attention_map is not None:
            item["attention"] = attention_map[i].float().cpu()
        chain = _transforms(list(item), seed + 7919 * i, image.dim() - 2)
        for _ in range(copies):
            out = chain(dict(item))
            # intensity changes must not lift the background: zero outside the moved body mask
            extra["image"].append(_plain(out["image"]) * (_plain(out["body"]) > 0.5))
            for key in ("label", "attention"):
                if key in out:
                    extra[key].append(_plain(out[key]))
    batch = torch.cat([image, torch.stack(extra["image"]).to(image.device, image.dtype)])
    if label is not None:
        label = torch.cat([label.float(), torch.stack(extra["label"]).to(label.device)])
    if attention_map is not None:
        attention_map = torch.cat([attention_map.float(), torch.stack(extra["attention"]).to(attention_map.device)])
    return batch, label, attention_map
