"""CalibrationCrop(d) and AttentionMap(d)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from monai.data import MetaTensor  # noqa: E402
from monai.transforms import Compose  # noqa: E402

from monai_efficientq.transforms import (  # noqa: E402
    AttentionMap,
    AttentionMapD,
    AttentionMapd,
    AttentionMapDict,
    CalibrationCrop,
    CalibrationCropD,
    CalibrationCropd,
    CalibrationCropDict,
)


def body_volume(shape=(24, 20, 12), box=((2, 8), (12, 18), (3, 7)), channels=2) -> np.ndarray:
    """Zeros with a non-zero block (only in the last channel) at ``box``."""
    img = np.zeros((channels, *shape), np.float32)
    sl = tuple(slice(a, b) for a, b in box)
    img[(channels - 1, *sl)] = np.arange(1, 1 + np.prod([b - a for a, b in box])).reshape([b - a for a, b in box])
    return img


def test_aliases():
    assert CalibrationCropD is CalibrationCropDict is CalibrationCropd
    assert AttentionMapD is AttentionMapDict is AttentionMapd


def test_foreground_box_centres_on_body_and_center_box_on_image():
    img = body_volume()  # body centre (5, 15, 5)
    start, end, _ = CalibrationCrop((6, 6, 4), mode="foreground", divisible_by=None).compute_box(img)
    assert (start, end) == ([2, 12, 3], [8, 18, 7])
    start, end, _ = CalibrationCrop((6, 6, 4), mode="center", divisible_by=None).compute_box(img)
    assert (start, end) == ([9, 7, 4], [15, 13, 8])
    # the cropped foreground holds the whole body, the centre crop misses it
    fg = CalibrationCrop((6, 6, 4), mode="foreground", divisible_by=None)(img)
    ce = CalibrationCrop((6, 6, 4), mode="center", divisible_by=None)(img)
    assert fg.sum() == img.sum() and ce.sum() == 0


def test_box_is_clamped_inside_the_image():
    img = body_volume(box=((0, 2), (18, 20), (0, 1)))  # body at a corner
    start, end, _ = CalibrationCrop((8, 8, 8), divisible_by=None).compute_box(img)
    assert (start, end) == ([0, 12, 0], [8, 20, 8])


def test_select_fn_and_no_foreground_fallback():
    img = body_volume()
    img[0, 20:24, 0:4, 8:12] = -1.0
    start, _, _ = CalibrationCrop((4, 4, 4), select_fn=lambda x: x < 0, divisible_by=None).compute_box(img)
    assert start == [20, 0, 8]
    empty = np.zeros_like(img)
    start, _, _ = CalibrationCrop((4, 4, 4), divisible_by=None).compute_box(empty)
    assert start == [10, 8, 4]  # image centre


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_numpy_and_torch_inputs_keep_their_type(kind):
    img = body_volume()
    x = img if kind == "numpy" else torch.from_numpy(img)
    out = CalibrationCrop((10, 10, 10), divisible_by=8)(x)
    assert type(out) is type(x)
    assert tuple(out.shape) == (2, 16, 16, 16)
    assert float(out.sum()) == float(img.sum())


def test_divisibility_padding_and_full_extent():
    img = body_volume(shape=(24, 20, 12))
    out = CalibrationCrop((None, 0, -1), divisible_by=16)(img)  # full extent everywhere
    assert out.shape == (2, 32, 32, 16)
    out = CalibrationCrop(None, divisible_by=(8, 4, 1))(img)
    assert out.shape == (2, 24, 20, 12)
    out = CalibrationCrop((10, 10, 10), divisible_by=1)(img)
    assert out.shape == (2, 10, 10, 10)
    # symmetric zero padding: the 12-deep axis padded to 16 gets 2 slices on each side
    padded = CalibrationCrop((24, 20, 12), divisible_by=16)(img)
    assert padded.shape == (2, 32, 32, 16)
    assert np.array_equal(padded[:, 4:28, 6:26, 2:14], img)
    assert padded[:, :, :, :2].sum() == 0 and padded[:, :, :, 14:].sum() == 0


def test_image_smaller_than_roi_is_padded_to_roi():
    img = body_volume(shape=(24, 20, 12))
    out = CalibrationCrop((16, 16, 20), divisible_by=None)(img)
    assert out.shape == (2, 16, 16, 20)


def test_metatensor_affine_is_shifted_by_the_crop():
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64)
    img = MetaTensor(torch.from_numpy(body_volume()), affine=affine, meta={"filename_or_obj": "vol.nii.gz"})
    crop = CalibrationCrop((6, 6, 4), divisible_by=None)
    start, _, _ = crop.compute_box(img)
    out = crop(img)
    assert isinstance(out, MetaTensor)
    assert out.meta["filename_or_obj"] == "vol.nii.gz"
    expected = affine.clone()
    expected[:3, 3] += torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64) * torch.tensor(start, dtype=torch.float64)
    assert torch.allclose(out.affine, expected)
    # the divisibility pad moves the origin back by the padding in front
    padded = CalibrationCrop((6, 6, 4), divisible_by=8)(img)
    front_pad = torch.tensor([1, 1, 2], dtype=torch.float64)  # 6->8, 6->8, 4->8 split symmetrically
    spacing = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    assert torch.allclose(padded.affine[:3, 3], expected[:3, 3] - spacing * front_pad)
    assert len(padded.applied_operations) >= 2


def test_dict_version_aligns_image_and_label():
    img = body_volume()
    label = (img[1:] > 0).astype(np.float32)
    d = CalibrationCropd(keys=["image", "label"], roi_size=(6, 6, 4), divisible_by=8)({"image": img, "label": label})
    assert d["image"].shape == (2, 8, 8, 8) and d["label"].shape == (1, 8, 8, 8)
    assert np.array_equal(d["label"][0] > 0, d["image"][1] > 0)
    assert d["label"].sum() == label.sum()
    # the label has no body to centre on; source_key picks the image even when the label comes first
    d2 = CalibrationCropd(keys=["label", "image"], roi_size=(6, 6, 4), divisible_by=8, source_key="image")(
        {"image": img, "label": label}
    )
    assert np.array_equal(d2["label"], d["label"])
    with pytest.raises(ValueError, match="spatial"):
        CalibrationCropd(keys=["image", "label"], roi_size=4)({"image": img, "label": label[:, :10]})


def test_invalid_arguments():
    with pytest.raises(ValueError, match="mode"):
        CalibrationCrop(8, mode="random")
    with pytest.raises(ValueError, match="roi_size"):
        CalibrationCrop((8, 8))(body_volume())


# -- attention ------------------------------------------------------------------------------------------------


def counts_label() -> tuple[np.ndarray, dict[int, int]]:
    """Class indices over 10x10x10: class 1 rare, class 2 rarer, class 3 absent (num_classes=4)."""
    lab = np.zeros((1, 10, 10, 10), np.float32)
    lab[0, :2, :5] = 1  # 100 voxels
    lab[0, 9, 9, :4] = 2  # 4 voxels
    return lab, {0: 1000 - 104, 1: 100, 2: 4}


def test_attention_weights_from_class_counts():
    lab, counts = counts_label()
    w = AttentionMap(num_classes=4, power=0.5)(lab)
    assert w.shape == (1, 10, 10, 10) and w.dtype == np.float32
    n_max = max(counts.values())
    for c, n in counts.items():
        assert np.allclose(w[lab == c], (n_max / n) ** 0.5, rtol=1e-6)
    assert np.isclose(w[lab == 2][0], np.sqrt(896 / 4))  # rare class: about 15
    one_hot = np.eye(4, dtype=np.float32)[lab[0].astype(int)].transpose(3, 0, 1, 2)
    assert np.allclose(AttentionMap(power=0.5)(one_hot), w)  # one-hot (C, *S), class 3 absent -> no effect
    assert np.allclose(AttentionMap(power=1.0)(lab)[lab == 1], 896 / 100)


def test_attention_from_logits_torch_and_metatensor():
    lab, counts = counts_label()
    one_hot = torch.from_numpy(np.eye(3, dtype=np.float32)[lab[0].astype(int)]).permute(3, 0, 1, 2)
    logits = one_hot * 5.0 - 2.0
    w = AttentionMap()(logits)
    assert isinstance(w, torch.Tensor) and w.shape == (1, 10, 10, 10)
    assert torch.allclose(w[torch.from_numpy(lab) == 1], torch.tensor((896 / 100) ** 0.5))
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    wm = AttentionMap()(MetaTensor(logits, affine=affine))
    assert isinstance(wm, MetaTensor) and torch.equal(wm.affine, affine)


def test_attention_background_outside_body_is_one():
    lab, _ = counts_label()
    image = np.ones((2, 10, 10, 10), np.float32)
    image[:, 9] = 0  # outside the body: holds all the class-2 voxels
    w = AttentionMap(num_classes=3)(lab, image)
    assert np.all(w[0, 9] == 1.0)
    assert np.allclose(w[lab == 1], (896 / 100) ** 0.5)
    assert w[0, 0, 0, 0] > 1  # inside the body the weights stay
    d = AttentionMapd(keys="label", image_key="image", num_classes=3)({"label": lab, "image": image})
    assert np.array_equal(d["attention"], w) and d["label"] is lab


def test_attention_multi_label():
    on = np.zeros((3, 10, 10, 10), np.float32)
    on[0, :5] = 1  # 500 voxels
    on[1, :2] = 1  # 200, nested in channel 0
    on[2, 0, 0, :1] = 1  # 1 voxel, also in channels 0 and 1
    w = AttentionMap(multi_label=True)(on)
    # classes: background 500 (no channel on), ch0 500, ch1 200, ch2 1; n_max = 500
    assert np.allclose(w[0, 5:], 1.0)
    assert np.allclose(w[0, 2:5], 1.0)  # only ch0 (500)
    assert np.allclose(w[0, 1], np.sqrt(500 / 200))  # ch0 and ch1: the larger weight
    assert np.isclose(w[0, 0, 0, 0], np.sqrt(500 / 1))
    # in multi-class mode the same input is read as one argmax class per voxel
    assert not np.allclose(AttentionMap(multi_label=False)(on), w)
    d = AttentionMapd(keys="pred", output_key="w", multi_label=True)({"pred": on * 4 - 2})  # sigmoid logits
    assert np.allclose(d["w"], w)


def test_attention_map_dict_in_compose_and_errors():
    lab, _ = counts_label()
    img = np.ones((1, 10, 10, 10), np.float32)
    pipeline = Compose([
        AttentionMapd(keys="label", image_key="image", num_classes=3),
        CalibrationCropd(keys=["image", "label", "attention"], roi_size=8, divisible_by=8),
    ])
    d = pipeline({"image": img, "label": lab})
    assert d["attention"].shape == (1, 8, 8, 8) and float(d["attention"].max()) > 1
    with pytest.raises(ValueError, match="output key"):
        AttentionMapd(keys=["a", "b"], output_key="attention")
    with pytest.raises(ValueError, match="spatial shape"):
        AttentionMap()(lab, img[:, :5])
