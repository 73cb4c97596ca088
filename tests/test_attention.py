from __future__ import annotations

import torch

from monai_efficientq.attention import AttentionMaps, class_weights, classes_from_scores, label_to_scores


def _scores(label: torch.Tensor, n: int) -> torch.Tensor:
    return label_to_scores(label[None, None], n) * 10.0


def test_class_weights_from_counts():
    label = torch.zeros(8, 8, 8, dtype=torch.long)
    label[:2, :2, :2] = 1  # 8 voxels
    label[4:, 4:, :] = 2  # 128 voxels
    member = classes_from_scores(_scores(label, 4), multi_label=False)
    w = class_weights(member, 0.5)
    n0 = 512 - 8 - 128
    assert torch.allclose(w, torch.tensor([1.0, (n0 / 8) ** 0.5, (n0 / 128) ** 0.5, 1.0], dtype=torch.float64))


def test_map_pooled_to_any_layer_shape_and_body_rule():
    label = torch.zeros(12, 12, 12, dtype=torch.long)
    label[3:9, 3:9, 3:9] = 1
    label[5:7, 5:7, 5:7] = 2
    body = torch.zeros(1, 12, 12, 12, dtype=torch.bool)
    body[:, 1:11, 1:11, 1:11] = True
    maps = AttentionMaps(_scores(label, 3), body, multi_label=False)
    full = maps.full_resolution()
    assert full.shape == (1, 12, 12, 12)
    assert full[0, 6, 6, 6] > full[0, 4, 4, 4] > full[0, 2, 2, 2] == 1.0
    assert full[0, 0, 0, 0] == 1.0
    for shape in [(5, 3, 7), (1, 1, 1), (24, 24, 24)]:
        m = maps.for_shape(1, shape)
        assert m.shape == (1, *shape) and bool((m >= 1).all())
    assert maps.for_shape(1, (4, 4)) is None and maps.for_shape(2, (4, 4, 4)) is None


def test_multilabel_background_is_no_channel_on():
    logits = -torch.ones(1, 3, 6, 6, 6)
    logits[:, 0, :3] = 1  # channel 0 on in half
    logits[:, 2, :1, :1, :1] = 1  # rare channel
    member = classes_from_scores(logits, multi_label=True)
    assert member.shape[1] == 4
    assert int(member[:, 0].sum()) == 108  # background: nothing on
    w = class_weights(member)
    assert w[3] == (108 / 1) ** 0.5 and w[2] == 1.0  # absent channel 1 -> 1


def test_precomputed_weight_map_is_average_pooled():
    wmap = torch.ones(1, 1, 8, 8, 8)
    wmap[..., :4, :, :] = 3.0
    maps = AttentionMaps(None, None, multi_label=False, weight_map=wmap)
    m = maps.for_shape(1, (2, 2, 2))
    assert torch.allclose(m[0, 0], torch.full((2, 2), 3.0, dtype=torch.float64))
    assert torch.allclose(m[0, 1], torch.ones(2, 2, dtype=torch.float64))


def test_integer_class_weights_truncate_as_the_published_code():
    label = torch.zeros(8, 8, 8, dtype=torch.long)
    label[:2, :2, :2] = 1  # 8 voxels: weight sqrt(376/8) = 6.86 -> 6
    label[4:, 4:, :] = 2  # 128 voxels: weight 1.71 -> 1 (attention off for the mildly rare class)
    real = AttentionMaps(_scores(label, 3), None, multi_label=False)
    integer = AttentionMaps(_scores(label, 3), None, multi_label=False, integer=True)
    assert torch.equal(integer.weights, real.weights.floor())
    assert not torch.equal(integer.weights, real.weights)
    full = integer.full_resolution()
    assert full[0, 0, 0, 0] == 6.0 and full[0, 6, 6, 0] == 1.0


def test_integer_multilabel_voxel_takes_the_last_channel_on():
    logits = -torch.ones(1, 2, 6, 6, 6)
    logits[:, 1, :3] = 1  # channel 1 on in half (108 voxels): weight 1
    logits[:, 0, :1, :2] = 1  # channel 0 on in 12 voxels inside that half: weight sqrt(108/12) = 3
    real = AttentionMaps(logits, None, multi_label=True).full_resolution()
    integer = AttentionMaps(logits, None, multi_label=True, integer=True).full_resolution()
    assert real[0, 0, 0, 0] == 3.0  # both channels on: the largest weight
    assert integer[0, 0, 0, 0] == 1.0  # the last channel on (1) wins, although channel 0 weighs 3
    assert real[0, 2, 0, 0] == integer[0, 2, 0, 0] == 1.0


def test_each_volume_gets_its_own_class_balance():
    a = torch.zeros(8, 8, 8, dtype=torch.long)
    a[:2] = 1  # class 1 in a quarter of volume 0
    b = torch.zeros(8, 8, 8, dtype=torch.long)
    b[:1, :1, :1] = 1  # class 1 in one voxel of volume 1
    scores = torch.cat([_scores(a, 2), _scores(b, 2)])
    maps = AttentionMaps(scores, None, multi_label=False)
    assert torch.allclose(maps.weights[0], class_weights(classes_from_scores(scores[:1], False)))
    assert torch.allclose(maps.weights[1], class_weights(classes_from_scores(scores[1:], False)))
    full = maps.full_resolution()
    assert full[0, 0, 0, 0] == 3 ** 0.5 and full[1, 0, 0, 0] == 511 ** 0.5


def test_channel_argmax_is_argmax_over_channels_with_ties_to_the_first():
    from monai_efficientq.attention import channel_argmax

    scores = torch.randn(2, 4, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    scores[:, 2] = scores[:, 1]  # ties between channels 1 and 2
    scores[0, :, 0, 0, 0] = 1.0  # a four-way tie
    found = channel_argmax(scores)
    assert found.shape == (2, 5, 6, 7)
    assert torch.equal(found, scores.argmax(dim=1))
    assert int(found[0, 0, 0, 0]) == 0 and not bool((found == 2).any())


def test_agreement_dice_counts_each_class():
    from monai_efficientq.network import _agreement_dice

    ref = torch.zeros(1, 3, 2, 2, 2)
    ref[0, 1, 0] = 1.0  # class 1 on the first slab (4 voxels), class 0 elsewhere
    out = ref.clone()
    out[0, 2, 0, 0, 0] = 2.0  # one voxel moved from class 1 to class 2
    dice = _agreement_dice(ref, out, multi_label=False)
    assert dice == {"class0": 1.0, "class1": 2 * 3 / (4 + 3), "class2": 0.0}
    on = _agreement_dice(ref - 0.5, out - 0.5, multi_label=True)  # channel c on where its logit is positive
    assert on == {"class0": 1.0, "class1": 1.0, "class2": 0.0}  # channel 1 stays on where channel 2 came on
