"""Quantize a MONAI bundle in the Model-Zoo layout into a new, shareable quantized bundle.

:func:`quantize_bundle` reads a bundle folder as the MONAI Model Zoo lays it out (configs ``train``, ``evaluate``
and ``inference`` in JSON or YAML, ``configs/metadata.json``, ``models/model.pt``, ``LICENSE``), calibrates on one
volume passed through the bundle's own preprocessing (:mod:`.calibration`), runs the bundle's own evaluation (its
``validate#evaluator``: inferer, post-processing, metrics; :mod:`.evaluation`) on the float network and again on the
same network quantized in place by :func:`~monai_efficientq.network.quantize_`, and writes a new bundle folder
(:mod:`.writer`):

- ``models/model_quantized.pt``: the packed checkpoint with its report. The float ``model.pt`` is not copied;
  nothing in the new bundle needs it.
- ``configs/inference`` and ``configs/evaluate`` (same names and formats as the originals): every
  ``CheckpointLoader`` of ``model.pt`` replaced by :class:`~monai_efficientq.handlers.QuantizedCheckpointLoader`
  of the packed checkpoint (:mod:`.configs`), and an ``export`` run id in ``inference`` that writes TorchScript.
  ``configs/train`` is copied unchanged when ``evaluate`` layers on it (as in the zoo), with ``logging.conf``, the
  other files of ``configs/`` that these configs name (e.g. ``datalist.json``) and ``scripts/``. The zoo's
  TensorRT and multi-GPU configs are left out; our own ``configs/multi_gpu_evaluate`` (:mod:`.multi_gpu`) runs the
  quantized bundle's evaluation under ``torchrun`` (NCCL on GPUs, gloo on CPUs), each rank on its share of the
  evaluation data with the packed checkpoint, the metrics gathered across ranks.
- ``configs/metadata.json``: the next version with a changelog entry, ``required_packages_version`` naming
  monai-efficientq, ``eval_metrics`` of the quantized network and a ``quantization`` section (settings,
  calibration, sizes, Dice of the float and the quantized network; :mod:`.card`).
- ``docs/README.md`` (the results, the commands, then the original README), ``docs/quantization_report.json``
  and ``.md``, the other files of ``docs/`` and the ``LICENSE``.

Everything is checked before the work starts, and the folder is built next to ``out_dir`` and renamed into place
at the end: a run that fails leaves nothing.

The same through MONAI's bundle runner, with the config this package ships (:data:`QUANTIZE_BUNDLE_CONFIG`; print
its path with ``python -c "import monai_efficientq.zoo as z; print(z.QUANTIZE_BUNDLE_CONFIG)"``)::

    python -m monai.bundle run --config_file /path/to/quantize_bundle.json \\
        --bundle_dir spleen_ct_segmentation --out_dir spleen_ct_segmentation_w2a2 --weight_bits 2 --act_bits 2
"""

from __future__ import annotations

from .calibration import downsampling_factor
from .configs import QUANTIZED_CHECKPOINT, quantized_config
from .layout import BundleLayout, MissingPackagesError, check_bundle_packages
from .quantize import QUANTIZE_BUNDLE_CONFIG, QuantizedBundle, quantize_bundle

__all__ = [
    "QUANTIZE_BUNDLE_CONFIG",
    "QUANTIZED_CHECKPOINT",
    "BundleLayout",
    "MissingPackagesError",
    "QuantizedBundle",
    "check_bundle_packages",
    "downsampling_factor",
    "quantize_bundle",
    "quantized_config",
]
