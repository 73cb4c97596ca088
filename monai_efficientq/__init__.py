"""monai-efficientq: EfficientQ post-training quantization of MONAI 3D segmentation networks.

The core (this package minus ``handlers``, ``transforms`` and ``bundle``) is plain torch::

    from monai_efficientq import EfficientQConfig, quantize_network, save_quantized, load_quantized

    qnet, report = quantize_network(net, calib_volume, EfficientQConfig(weight_bits=2, act_bits=2))
    save_quantized(qnet, "model_w2a2.pt", report)
    print(report.to_markdown())
"""

from __future__ import annotations

from .checkpoint import dequantized_state_dict, load_quantized, save_dequantized, save_quantized
from .config import EfficientQConfig
from .network import LayerCalledTwiceError, quantize_network
from .report import QuantizationReport

__version__ = "0.1.0"

__all__ = [
    "EfficientQConfig",
    "quantize_network",
    "save_quantized",
    "load_quantized",
    "dequantized_state_dict",
    "save_dequantized",
    "QuantizationReport",
    "LayerCalledTwiceError",
    "__version__",
]
