"""mmengine hooks of mmcbn."""
from .cbn_hook import CBNHook

__all__ = ['CBNHook']
