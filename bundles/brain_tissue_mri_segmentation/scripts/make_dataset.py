#!/usr/bin/env python
"""Build the brain-tissue segmentation data set from the ICBM 152 2009a template.

Outputs (under ``<bundle>/data``, paths in ``datalist.json`` are relative to it):

* ``template/t1.nii.gz``, ``template/label.nii.gz`` - the template at 2 mm (training data)
* ``eval/case_XXX_t1.nii.gz``, ``eval/case_XXX_label.nii.gz`` - six synthetic subjects
  (random affine + smooth elastic warp of the 1 mm template, then intensity changes), seeds 1000..1005
* ``calib/calib_t1.nii.gz``, ``calib/calib_label.nii.gz`` - calibration subject, seed 2000
* ``LICENSE_ICBM152.txt`` - the source README with the licence notice (must accompany copies)
* ``datalist.json``

Labels: 0 background where the (2 mm, stored) T1 is 0; inside the brain the argmax of
(csf = clip(1 - gm - wm, 0, 1), gm, wm) gives 1 CSF, 2 GM, 3 WM.  Warps are applied at 1 mm to
T1 and to the gm/wm probability maps (linear interpolation); everything is then taken to 2 mm
by 2x2x2 block averaging (= trilinear interpolation at the 2 mm voxel centres) and the labels are
derived from the 2 mm probability maps, for the template and the synthetic cases alike.

Deterministic: every random draw comes from ``numpy.random.default_rng(seed)``.

Usage (from any directory)::

    python scripts/make_dataset.py [--src /work/shared/data/icbm152_2009a] [--out <bundle>/data]
"""

import argparse
import json
import os
import shutil

import nibabel as nib
import numpy as np
from scipy import ndimage

BUNDLE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SRC = "/work/shared/data/icbm152_2009a"
SRC_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
EVAL_SEEDS = [1000, 1001, 1002, 1003, 1004, 1005]
CALIB_SEED = 2000
CLASS_NAMES = ["background", "csf", "gm", "wm"]

# ranges of the synthetic-subject generator
MAX_ROT_DEG = 10.0  # per axis, uniform in [-10, 10]
SCALE_RANGE = (0.9, 1.1)  # per axis, uniform
MAX_SHIFT_MM = 4.0  # per axis, uniform
ELASTIC_SPACING_MM = 24.0  # control-point spacing of the smooth displacement field
ELASTIC_STD_MM = 2.5  # std of the control-point displacements
GAMMA_RANGE = (0.7, 1.5)  # log-uniform contrast exponent
BIAS_SPACING_MM = 60.0  # control-point spacing of the log bias field
BIAS_STD = 0.12  # std of the log bias field at the control points
NOISE_RANGE = (0.02, 0.06)  # noise std as a fraction of the mean brain intensity


def downsample2(vol):
    """1 mm -> 2 mm: zero-pad to even size and average 2x2x2 blocks.

    This equals trilinear interpolation at the 2 mm voxel centres (1 mm voxel coordinate 2i+0.5).
    """
    vol = np.asarray(vol, dtype=np.float32)
    pad = [(0, s % 2) for s in vol.shape]
    vol = np.pad(vol, pad)
    sx, sy, sz = (s // 2 for s in vol.shape)
    return vol.reshape(sx, 2, sy, 2, sz, 2).mean(axis=(1, 3, 5))


def affine2(affine1):
    """Affine of the 2 mm grid produced by ``downsample2``."""
    m = np.diag([2.0, 2.0, 2.0, 1.0])
    m[:3, 3] = 0.5
    return affine1 @ m


def to_t1_uint8_and_mask(t1_2mm):
    t1 = np.clip(np.rint(t1_2mm), 0, 255).astype(np.uint8)
    return t1, t1 > 0


def labels_from_probs(gm, wm, mask):
    """gm, wm in [0, 1]; returns uint8 labels 0 bg, 1 csf, 2 gm, 3 wm."""
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    lab = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    lab[~mask] = 0
    return lab


def smooth_field(rng, shape, spacing_vox, std, ncomp):
    """Smooth random field: gaussian values on a coarse control grid, cubic-spline upsampled."""
    coarse = [max(int(np.ceil(s / spacing_vox)) + 1, 4) for s in shape]
    out = []
    for _ in range(ncomp):
        ctrl = rng.normal(0.0, std, size=coarse).astype(np.float32)
        zoom = [(s - 1) / (c - 1) for s, c in zip(shape, coarse)]
        f = ndimage.zoom(ctrl, zoom, order=3, mode="nearest", grid_mode=False)
        f = f[: shape[0], : shape[1], : shape[2]]
        if f.shape != tuple(shape):  # guard against rounding in zoom
            f = np.pad(f, [(0, s - fs) for s, fs in zip(shape, f.shape)], mode="edge")
        out.append(f)
    return out


def rotation_matrix(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def synth_case(seed, t1_1mm, gm_1mm, wm_1mm, voxel_mm=1.0):
    """Create one synthetic subject at 2 mm. Inputs are 1 mm float arrays (t1 0..255, probs 0..1)."""
    rng = np.random.default_rng(seed)
    shape = t1_1mm.shape
    # --- geometry: output voxel x samples the template at c + A (x - c) + t + d(x)
    angles = np.deg2rad(rng.uniform(-MAX_ROT_DEG, MAX_ROT_DEG, size=3))
    scales = rng.uniform(*SCALE_RANGE, size=3)
    shift = rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, size=3) / voxel_mm
    # sampling matrix is the inverse of the "subject" transform (rotate then scale the brain)
    fwd = rotation_matrix(*angles) @ np.diag(scales)
    inv = np.linalg.inv(fwd)
    centre = np.array(ndimage.center_of_mass(t1_1mm > 0))
    disp = smooth_field(rng, shape, ELASTIC_SPACING_MM / voxel_mm, ELASTIC_STD_MM / voxel_mm, 3)
    grid = np.indices(shape, dtype=np.float32)
    coords = np.empty_like(grid)
    rel = [grid[i] - centre[i] for i in range(3)]
    for i in range(3):
        coords[i] = centre[i] + inv[i, 0] * rel[0] + inv[i, 1] * rel[1] + inv[i, 2] * rel[2] - shift[i] + disp[i]
    del grid, rel, disp
    warped = [ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0) for v in (t1_1mm, gm_1mm, wm_1mm)]
    del coords
    t1_2, gm_2, wm_2 = (downsample2(w) for w in warped)
    _, mask = to_t1_uint8_and_mask(t1_2)
    label = labels_from_probs(gm_2, wm_2, mask)
    # --- intensity: gamma contrast, multiplicative smooth bias field, gaussian noise inside the brain
    gamma = float(np.exp(rng.uniform(np.log(GAMMA_RANGE[0]), np.log(GAMMA_RANGE[1]))))
    img = 255.0 * (np.clip(t1_2, 0, 255) / 255.0) ** gamma
    (log_bias,) = smooth_field(rng, t1_2.shape, BIAS_SPACING_MM / (2 * voxel_mm), BIAS_STD, 1)
    img = img * np.exp(log_bias)
    noise_frac = float(rng.uniform(*NOISE_RANGE))
    noise_std = noise_frac * float(img[mask].mean())
    img = img + rng.normal(0.0, noise_std, size=img.shape).astype(np.float32)
    img = np.where(mask, np.clip(np.rint(img), 1, 32767), 0).astype(np.int16)
    edge = [bool(mask.take([0, -1], axis=a).any()) for a in range(3)]
    params = {
        "seed": seed,
        "rotation_deg": [round(float(a), 3) for a in np.rad2deg(angles)],
        "scale": [round(float(s), 4) for s in scales],
        "shift_mm": [round(float(s * voxel_mm), 3) for s in shift],
        "gamma": round(gamma, 4),
        "noise_frac": round(noise_frac, 4),
        "bias_range": [round(float(np.exp(log_bias[mask].min())), 4), round(float(np.exp(log_bias[mask].max())), 4)],
        "brain_touches_fov_edge": any(edge),
    }
    return img, label, params


def save(arr, affine, path, dtype):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def counts(label):
    c = np.bincount(label.ravel(), minlength=4)
    return {n: int(v) for n, v in zip(CLASS_NAMES, c)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=DEFAULT_SRC, help="folder with the three ICBM 152 2009a files")
    p.add_argument("--out", default=os.path.join(BUNDLE_ROOT, "data"), help="output data folder")
    args = p.parse_args()
    out = os.path.abspath(args.out)

    imgs = {k: nib.load(os.path.join(args.src, f)) for k, f in SRC_FILES.items()}
    aff1 = imgs["t1"].affine
    for k, im in imgs.items():
        if not np.allclose(im.affine, aff1) or im.shape != imgs["t1"].shape:
            raise ValueError(f"{k}: grid differs from T1")
    vox = float(np.abs(np.diag(aff1)[:3]).mean())
    t1 = np.asanyarray(imgs["t1"].dataobj).astype(np.float32)
    gm = np.asanyarray(imgs["gm"].dataobj).astype(np.float32) / 255.0
    wm = np.asanyarray(imgs["wm"].dataobj).astype(np.float32) / 255.0
    aff2 = affine2(aff1)

    # template at 2 mm
    t1_2, mask = to_t1_uint8_and_mask(downsample2(t1))
    lab = labels_from_probs(downsample2(gm), downsample2(wm), mask)
    save(t1_2, aff2, os.path.join(out, "template", "t1.nii.gz"), np.uint8)
    save(lab, aff2, os.path.join(out, "template", "label.nii.gz"), np.uint8)
    print(f"template {t1_2.shape} counts {counts(lab)}", flush=True)

    readme = os.path.join(args.src, "README.md")
    with open(readme) as f:
        notice = f.read()
    with open(os.path.join(out, "LICENSE_ICBM152.txt"), "w") as f:
        f.write("The files in this data/ folder are derived (resampled to 2 mm, synthetically warped and\n")
        f.write("intensity-altered) from the ICBM 152 nonlinear symmetric 2009a template. The source\n")
        f.write("README with its copyright and permission notice follows verbatim.\n\n")
        f.write(notice)

    datalist = {
        "training": [{"image": "template/t1.nii.gz", "label": "template/label.nii.gz"}],
        "evaluation": [],
        "calibration": {},
        "seeds": {"evaluation": EVAL_SEEDS, "calibration": CALIB_SEED},
        "labels": {"0": "background", "1": "csf", "2": "grey_matter", "3": "white_matter"},
        "spacing_mm": [2.0, 2.0, 2.0],
        "generation": {},
    }
    jobs = [(f"eval/case_{i:03d}", s) for i, s in enumerate(EVAL_SEEDS)] + [("calib/calib", CALIB_SEED)]
    for stem, seed in jobs:
        img, lab, params = synth_case(seed, t1, gm, wm, voxel_mm=vox)
        save(img, aff2, os.path.join(out, f"{stem}_t1.nii.gz"), np.int16)
        save(lab, aff2, os.path.join(out, f"{stem}_label.nii.gz"), np.uint8)
        entry = {"image": f"{stem}_t1.nii.gz", "label": f"{stem}_label.nii.gz"}
        if stem.startswith("eval"):
            datalist["evaluation"].append(entry)
        else:
            datalist["calibration"] = entry
        datalist["generation"][stem] = params
        print(f"{stem} seed {seed} counts {counts(lab)} params {params}", flush=True)

    with open(os.path.join(out, "datalist.json"), "w") as f:
        json.dump(datalist, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
