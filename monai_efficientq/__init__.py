"""monai-efficientq: EfficientQ post-training quantization of MONAI 3D segmentation networks.

The core (this package minus ``io``, ``cli``, ``handlers``, ``transforms`` and ``bundle``) is plain torch::

    from monai_efficientq import EfficientQConfig, quantize_, save_quantized, load_quantized

    report = quantize_(net, calib_volume, EfficientQConfig(weight_bits=2, act_bits=2))  # in place
    save_quantized(net, "model_w2a2.pt", report)
    print(report.to_markdown())
"""

from __future__ import annotations

from .checkpoint import dequantized_state_dict, load_quantized, save_dequantized, save_quantized
from .config import EfficientQConfig
from .modules import QuantizedNetInfo, quantization_info
from .network import LayerCalledTwiceError, quantize_, quantize_network
from .report import QuantizationReport
from .volume_pass import VolumesDivergedError

__version__ = "0.1.0"

__all__ = [
    "EfficientQConfig",
    "quantize_",
    "quantize_network",
    "quantization_info",
    "QuantizedNetInfo",
    "save_quantized",
    "load_quantized",
    "dequantized_state_dict",
    "save_dequantized",
    "QuantizationReport",
    "LayerCalledTwiceError",
    "VolumesDivergedError",
    "__version__",
]
