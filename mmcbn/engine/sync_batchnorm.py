"""Keeps CBN layers CBN under mmengine's ``cfg.sync_bn``.

mmengine's runner turns every ``_BatchNorm`` into ``SyncBatchNorm`` when a config sets ``sync_bn``;
CBN subclasses ``_BatchNorm`` (so that ``norm_eval``, ``is_norm`` and ``norm_decay_mult`` treat it as
BN), so without this it would silently become SyncBN and lose its window. Importing mmcbn wraps
mmengine's ``convert_sync_batchnorm`` so that CBN layers become *synchronised CBN* (``sync=True``)
instead, and every other BN layer is converted as before.
"""
import functools

import mmengine.model
import mmengine.model.utils
import mmengine.runner.runner
from mmengine.logging import print_log

from ..layers import CrossIterationBatchNorm2d


def _wrap(original):

    @functools.wraps(original)
    def convert_sync_batchnorm(module, implementation='torch'):
        if isinstance(module, CrossIterationBatchNorm2d):
            if not module.sync:
                module.sync = True
                print_log(f'sync_bn: CBN layer {module.layer_name or module} stays CBN, '
                          'synchronised across processes (sync=True)', logger='current')
            return module
        # the original recurses through the module-level name, i.e. through this wrapper
        return original(module, implementation)

    convert_sync_batchnorm.__wrapped_by_mmcbn__ = True
    return convert_sync_batchnorm


_NAMESPACES = (mmengine.model.utils, mmengine.model, mmengine.runner.runner)


def install() -> None:
    """Wraps mmengine's ``convert_sync_batchnorm`` (idempotent)."""
    current = mmengine.model.utils.convert_sync_batchnorm
    if getattr(current, '__wrapped_by_mmcbn__', False):
        return
    wrapped = _wrap(current)
    for namespace in _NAMESPACES:
        namespace.convert_sync_batchnorm = wrapped


def uninstall() -> None:
    """Gives mmengine back its own ``convert_sync_batchnorm`` (CBN layers then become SyncBN
    under ``cfg.sync_bn``, as any ``_BatchNorm``)."""
    current = mmengine.model.utils.convert_sync_batchnorm
    if getattr(current, '__wrapped_by_mmcbn__', False):
        for namespace in _NAMESPACES:
            namespace.convert_sync_batchnorm = current.__wrapped__
