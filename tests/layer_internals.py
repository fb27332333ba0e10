"""The one place where tests reach past the public API (what no public name should expose)."""
import weakref

import mmcbn.layers.cross_iteration_bn as layer_module
from mmcbn.layers import optimizer_steps


def hook_selection(hook, model):
    """The layers a CBNHook would drive in ``model``, by name."""
    return hook._select(model)


def hook_driven(hook):
    """The layers a CBNHook drives in its current run, by name."""
    return hook._driven


def reset_no_iteration_warning():
    """Lets the process-wide 'training without CBNHook' warning be given again."""
    layer_module._no_iteration_warned = False


def isolate_optimizer_hook(monkeypatch):
    """Starts the process-wide optimizer step hook's bookkeeping afresh for one test."""
    monkeypatch.setattr(optimizer_steps, '_following_layers', weakref.WeakSet())
    monkeypatch.setattr(optimizer_steps, '_optimizer_hook', None)


def optimizer_hook_registered():
    """Whether the optimizer step hook that follows CBN layers is registered."""
    return optimizer_steps._optimizer_hook is not None
