"""mmcbn: Cross-Iteration Batch Normalization for OpenMMLab.

Importing the package registers ``CBN`` in mmengine's root ``MODELS`` registry and ``CBNHook`` in its
root ``HOOKS`` registry, and makes mmengine's ``cfg.sync_bn`` keep CBN layers (synchronised) instead
of turning them into SyncBatchNorm (``uninstall_sync_bn_support()`` undoes that).
"""
from .converters import bind_cbn_layers, convert_bn_to_cbn, convert_cbn_to_bn
from .engine import CBNHook
from .engine.sync_batchnorm import install as _install_sync_bn_support
from .engine.sync_batchnorm import uninstall as uninstall_sync_bn_support
from .layers import CBN, CrossIterationBatchNorm2d
from .version import __version__

_install_sync_bn_support()

__all__ = [
    '__version__', 'CBN', 'CBNHook', 'CrossIterationBatchNorm2d', 'bind_cbn_layers',
    'convert_bn_to_cbn', 'convert_cbn_to_bn', 'uninstall_sync_bn_support'
]
