"""mmcbn: Cross-Iteration Batch Normalization for OpenMMLab.

Importing the package registers ``CBN`` in mmengine's root ``MODELS`` registry.
"""
from .converters import convert_bn_to_cbn, convert_cbn_to_bn
from .layers import CBN, CrossIterationBatchNorm2d
from .layers.model_binding import bind_cbn_layers
from .version import __version__

__all__ = [
    '__version__', 'CBN', 'CrossIterationBatchNorm2d', 'bind_cbn_layers', 'convert_bn_to_cbn',
    'convert_cbn_to_bn'
]
