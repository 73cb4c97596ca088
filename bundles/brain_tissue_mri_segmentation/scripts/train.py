#!/usr/bin/env python
"""Train the float brain-tissue segmentation network on CPU and evaluate it on the synthetic eval set.

Data: ``<bundle>/data`` as written by ``scripts/make_dataset.py`` (one 2 mm template for training,
six warped / intensity-altered subjects for evaluation).

This script is the bundle's training path: it produced the shipped ``models/model.pt`` (record in
``models/TRAINING.md``). The SegResNet is the ``network_def`` of ``configs/common.json``, which every config
of the bundle uses.

Preprocessing expected by the trained model (train and inference alike):
    LoadImage -> EnsureChannelFirst -> float32 -> NormalizeIntensity(nonzero=True)
i.e. (1, H, W, D) input at 2 mm, brain voxels z-scored, background kept at 0.
Inference: SlidingWindowInferer(roi_size=64^3, overlap=0.25), argmax over 4 channels
(0 background, 1 CSF, 2 GM, 3 WM).

Usage (from any directory)::

    python scripts/train.py                   # SegResNet -> models/model.pt
    python scripts/train.py --net unet        # UNet (BatchNorm) -> <repo>/benchmarks/models/unet_bn.pt

The script writes TRAINING.md next to the weights with settings, per-class Dice and wall time.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from monai.inferers import SlidingWindowInferer  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.metrics import DiceMetric  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402
from monai.transforms import (  # noqa: E402
    BorderPadd,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
)
from monai.utils import set_determinism  # noqa: E402

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(os.path.dirname(BUNDLE_ROOT))
CLASS_NAMES = ["csf", "gm", "wm"]


def build_net(name):
    """The network to train: the bundle's ``network_def`` (declared once, in ``configs/common.json``), or the
    benchmarks' UNet with BatchNorm."""
    if name == "segresnet":
        parser = ConfigParser()
        parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "common.json"))
        return parser.get_parsed_content("network_def")
    if name == "unet":
        return UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=4,
            channels=(16, 32, 64, 128, 256),
            strides=(2, 2, 2, 2),
            num_res_units=2,
            norm="batch",
        )
    raise ValueError(name)


def inference_transforms():
    """The preprocessing the trained model expects (also used for the eval set)."""
    return Compose(
        [
            LoadImaged(keys=["image", "label"], image_only=True),
            EnsureChannelFirstd(keys=["image", "label"]),
            EnsureTyped(keys="image", dtype=torch.float32),
            EnsureTyped(keys="label", dtype=torch.int64),
            NormalizeIntensityd(keys="image", nonzero=True),
        ]
    )


class ZeroOutsideLabeld(MapTransform):
    """Set the image to 0 where the label is background (after the spatial transforms).

    The data's label rule is "background <=> T1 == 0"; bilinear resampling of the image against
    nearest resampling of the label would otherwise leave a rim of non-zero background voxels.
    """

    def __init__(self, keys, label_key="label"):
        super().__init__(keys)
        self.label_key = label_key

    def __call__(self, data):
        d = dict(data)
        for k in self.keys:
            d[k] = d[k] * (d[self.label_key] > 0)
        return d


class KeepBrainMaskd(MapTransform):
    """Store (``store=True``) or re-apply the brain mask (image > 0 of the raw image).

    MONAI's contrast/noise transforms also touch the zero background; the eval volumes have an exact
    zero background and NormalizeIntensity(nonzero=True) relies on it, so re-zero it after them.
    """

    def __init__(self, keys, store):
        super().__init__(keys)
        self.store = store

    def __call__(self, data):
        d = dict(data)
        for k in self.keys:
            if self.store:
                d["brain_mask"] = d[k] > 0
            else:
                d[k] = d[k] * d.pop("brain_mask")
        return d


def train_transforms(args):
    roi = args.roi
    pre = int(round(roi * 1.375))  # larger crop so rotation/scaling does not pull in padding
    xforms = [
        # whole-volume intensity augmentation on raw intensities, then z-score as at inference
        KeepBrainMaskd(keys="image", store=True),
        RandBiasFieldd(keys="image", degree=3, coeff_range=(0.0, 0.12), prob=0.8),
        RandAdjustContrastd(keys="image", gamma=(0.6, 1.6), prob=0.8),
        RandGaussianNoised(keys="image", mean=0.0, std=14.0, prob=0.8),  # std ~ U(0, 14) on 0..255
        KeepBrainMaskd(keys="image", store=False),
        NormalizeIntensityd(keys="image", nonzero=True),
        RandCropByPosNegLabeld(
            keys=["image", "label"],
            label_key="label",
            spatial_size=(pre, pre, pre),
            pos=1,
            neg=1,
            num_samples=args.batch,
            allow_smaller=True,
        ),
        RandAffined(
            keys=["image", "label"],
            spatial_size=(roi, roi, roi),
            prob=1.0,
            rotate_range=(0.26, 0.26, 0.26),
            scale_range=(0.15, 0.15, 0.15),
            translate_range=(4, 4, 4),
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
    ]
    if args.elastic_prob > 0:
        xforms.append(
            Rand3DElasticd(
                keys=["image", "label"],
                sigma_range=(5, 8),
                magnitude_range=(50, 150),
                prob=args.elastic_prob,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            )
        )
    xforms.append(RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0))  # left-right
    xforms.append(ZeroOutsideLabeld(keys="image"))
    return Compose(xforms)


def evaluate(net, items, data_dir, roi, overlap=0.25, verbose=True):
    net.eval()
    load = inference_transforms()
    inferer = SlidingWindowInferer(roi_size=(roi, roi, roi), sw_batch_size=1, overlap=overlap)
    metric = DiceMetric(include_background=False, reduction="mean_batch")
    per_case = []
    with torch.no_grad():
        for it in items:
            d = load({"image": os.path.join(data_dir, it["image"]), "label": os.path.join(data_dir, it["label"])})
            img = d["image"].as_tensor()[None] if isinstance(d["image"], MetaTensor) else d["image"][None]
            lab = torch.as_tensor(d["label"])[None]
            pred = inferer(img, net).argmax(1, keepdim=True)
            p1 = torch.nn.functional.one_hot(pred[:, 0], 4).permute(0, 4, 1, 2, 3)
            y1 = torch.nn.functional.one_hot(lab[:, 0].long(), 4).permute(0, 4, 1, 2, 3)
            dice = DiceMetric(include_background=False, reduction="none")(p1, y1)[0].tolist()
            metric(p1, y1)
            per_case.append(dice)
            if verbose:
                print(f"  {os.path.basename(it['image'])}: " + " ".join(f"{n}={v:.4f}" for n, v in zip(CLASS_NAMES, dice)))
    per_class = metric.aggregate().tolist()
    net.train()
    return per_class, per_case


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=["segresnet", "unet"], default="segresnet")
    p.add_argument("--iters", type=int, default=None, help="optimizer steps (default 500 segresnet / 900 unet)")
    p.add_argument("--batch", type=int, default=2, help="crops per step (all from one augmented volume)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--roi", type=int, default=64, help="training crop size")
    p.add_argument("--eval-roi", type=int, default=64, help="sliding-window roi for evaluation")
    p.add_argument("--pad", type=int, default=16, help="zero border added to the template before cropping")
    p.add_argument("--elastic-prob", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--val-every", type=int, default=0, help="evaluate on the calibration volume every N steps")
    p.add_argument("--data", default=os.path.join(BUNDLE_ROOT, "data"))
    p.add_argument("--out", default=None, help="weights path (default by --net)")
    p.add_argument("--no-report", action="store_true", help="do not write TRAINING.md")
    args = p.parse_args()
    if args.iters is None:
        args.iters = 500 if args.net == "segresnet" else 900
    if args.out is None:
        args.out = (
            os.path.join(BUNDLE_ROOT, "models", "model.pt")
            if args.net == "segresnet"
            else os.path.join(REPO_ROOT, "benchmarks", "models", "unet_bn.pt")
        )
    return args


def training_volume(args, train_item):
    """The training template with raw intensities and its label, zero-padded by ``args.pad``."""
    base = inference_transforms()(
        {"image": os.path.join(args.data, train_item["image"]), "label": os.path.join(args.data, train_item["label"])}
    )
    # undo the z-scoring for the cached copy: intensity augmentation works on raw intensities
    raw = LoadImaged(keys="image", image_only=True)({"image": os.path.join(args.data, train_item["image"])})["image"]
    base = {"image": torch.as_tensor(np.asarray(raw), dtype=torch.float32)[None], "label": torch.as_tensor(base["label"])}
    # zero-pad (= background) so that crops are not all forced to the volume centre: the sliding-window
    # inferer's corner windows contain mostly background, training crops must too
    return BorderPadd(keys=["image", "label"], spatial_border=args.pad)(base)


def train(net, base, aug, args, datalist):
    """``args.iters`` Adam steps on augmented crops of ``base``; returns the wall time in seconds."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / args.iters) ** 0.9)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    print(f"net={args.net} params={sum(p.numel() for p in net.parameters())} iters={args.iters} batch={args.batch}", flush=True)
    t0 = time.time()
    t_aug = 0.0
    run_loss = 0.0
    for step in range(1, args.iters + 1):
        ta = time.time()
        samples = aug(base)
        x = torch.stack([torch.as_tensor(s["image"]) for s in samples]).float()
        y = torch.stack([torch.as_tensor(s["label"]) for s in samples]).long()
        t_aug += time.time() - ta
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        run_loss += loss.item()
        if step % 25 == 0:
            el = time.time() - t0
            print(f"step {step}/{args.iters} loss {run_loss / 25:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"elapsed {el:.0f}s (aug {t_aug:.0f}s)", flush=True)
            run_loss = 0.0
        if args.val_every and step % args.val_every == 0 and step < args.iters:
            pc, _ = evaluate(net, [datalist["calibration"]], args.data, args.eval_roi, verbose=False)
            print(f"  val(calib) step {step}: " + " ".join(f"{n}={v:.4f}" for n, v in zip(CLASS_NAMES, pc)), flush=True)
    return time.time() - t0


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    with open(os.path.join(args.data, "datalist.json")) as f:
        datalist = json.load(f)
    base = training_volume(args, datalist["training"][0])
    aug = train_transforms(args)
    aug.set_random_state(seed=args.seed)
    net = build_net(args.net)
    train_time = train(net, base, aug, args, datalist)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    net.eval()
    torch.save(net.state_dict(), args.out)
    print(f"saved {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB), train wall time {train_time:.0f}s", flush=True)

    te = time.time()
    print("eval set (SlidingWindowInferer roi %d, overlap 0.25):" % args.eval_roi)
    per_class, per_case = evaluate(net, datalist["evaluation"], args.data, args.eval_roi)
    eval_time = time.time() - te
    mean_fg = float(np.mean(per_class))
    print("eval mean per class: " + " ".join(f"{n}={v:.4f}" for n, v in zip(CLASS_NAMES, per_class)) + f" | mean={mean_fg:.4f}")
    calib_pc, _ = evaluate(net, [datalist["calibration"]], args.data, args.eval_roi, verbose=False)
    print("calibration volume: " + " ".join(f"{n}={v:.4f}" for n, v in zip(CLASS_NAMES, calib_pc)))

    if not args.no_report:
        write_report(args, per_class, per_case, calib_pc, train_time, eval_time)


def write_report(args, per_class, per_case, calib_pc, train_time, eval_time):
    rel_script = os.path.relpath(os.path.abspath(__file__), BUNDLE_ROOT)
    cmd = "OMP_NUM_THREADS=1 python " + " ".join([rel_script] + [shlex.quote(a) for a in sys.argv[1:]])
    rel_out = os.path.relpath(os.path.abspath(args.out), REPO_ROOT)
    net_desc = (
        "SegResNet(spatial_dims=3, in_channels=1, out_channels=4, init_filters=8, blocks_down=(1,2,2,4), "
        "blocks_up=(1,1,1), dropout_prob=0.0)"
        if args.net == "segresnet"
        else "UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(16,32,64,128,256), strides=(2,2,2,2), "
        'num_res_units=2, norm="batch")  # BatchNorm, PReLU, ConvTranspose3d'
    )
    lines = [
        f"# Training record: `{rel_out}`",
        "",
        f"- command (run from `bundles/brain_tissue_mri_segmentation/`): `{cmd}`",
        f"- network: `{net_desc}`",
        f"- torch {torch.__version__}, threads {args.threads} (CPU); train wall time **{train_time:.0f} s** "
        f"({train_time / 60:.1f} min), eval {eval_time:.0f} s",
        f"- iterations {args.iters}, batch {args.batch} crops of {args.roi}^3, seed {args.seed}, Adam lr {args.lr} "
        f"(weight decay 1e-5, poly 0.9 decay), DiceCELoss(to_onehot_y=True, softmax=True)",
        f"- training data: `data/template/t1.nii.gz` + `label.nii.gz` (ICBM152 2009a at 2 mm), zero-padded by {args.pad}, augmented:",
        "  RandBiasField(degree 3, coeff 0-0.12, p 0.8), RandAdjustContrast(gamma 0.6-1.6, p 0.8), "
        "RandGaussianNoise(std U(0,14) on 0-255, p 0.8), background re-zeroed, NormalizeIntensity(nonzero=True), "
        f"RandCropByPosNegLabel({int(round(args.roi * 1.375))}^3, pos 1 neg 1), "
        f"RandAffine(to {args.roi}^3, rot +-0.26 rad, scale +-0.15, shift +-4 vox), "
        + (f"Rand3DElastic(sigma 5-8, magnitude 50-150, p {args.elastic_prob}), " if args.elastic_prob > 0 else "")
        + "RandFlip(left-right, p 0.5), image zeroed where label is background",
        "- preprocessing the model expects: LoadImage -> EnsureChannelFirst -> float32 -> NormalizeIntensity(nonzero=True); "
        "2 mm input, channel-first (1, H, W, D); output 4 logits (0 bg, 1 CSF, 2 GM, 3 WM), argmax",
        f"- inference: SlidingWindowInferer(roi_size=({args.eval_roi},)*3, sw_batch_size=1, overlap=0.25)",
        "",
        "## Eval set (6 synthetic warped subjects, seeds 1000-1005), DiceMetric(include_background=False)",
        "",
        "| case | CSF | GM | WM | mean |",
        "|---|---|---|---|---|",
    ]
    for i, d in enumerate(per_case):
        lines.append(f"| case_{i:03d} | {d[0]:.4f} | {d[1]:.4f} | {d[2]:.4f} | {np.mean(d):.4f} |")
    lines.append(f"| **mean** | **{per_class[0]:.4f}** | **{per_class[1]:.4f}** | **{per_class[2]:.4f}** | "
                 f"**{np.mean(per_class):.4f}** |")
    lines.append(f"| calib (seed 2000) | {calib_pc[0]:.4f} | {calib_pc[1]:.4f} | {calib_pc[2]:.4f} | "
                 f"{np.mean(calib_pc):.4f} |")
    lines.append("")
    path = os.path.join(os.path.dirname(os.path.abspath(args.out)), "TRAINING.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
