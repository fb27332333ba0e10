from .hooks import CBNHook

__all__ = ['CBNHook']
