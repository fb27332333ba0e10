"""What a CBN layer does after an optimizer step has moved its producer: its running statistics
move to the new weights (:mod:`~mmcbn.layers.running_stats`) and its iteration ends (the pending
entry joins the ring, so that between steps the window holds only the entries in use).

One process-wide hook (torch's global optimizer step post-hook) serves every layer, all of them in
one call (their work after a step is a few ``foreach`` kernels for the whole model); a layer acts
only when its producer's parameters changed in place since the hook last saw them (version
counters, read on the host: no device sync), so that the step of another model's optimizer (a
GAN's discriminator) leaves it alone.
"""
import weakref

from torch.optim.optimizer import register_optimizer_step_post_hook

#: Layers to call after optimizer steps; weak: a dropped model drops out.
_following_layers: 'weakref.WeakSet' = weakref.WeakSet()
_optimizer_hook = None


def follow_optimizer_steps(layer) -> None:
    """After every optimizer step (any optimizer), calls ``type(layer).after_optimizer_step`` with
    ``layer`` among the following layers (one call for all of them: they batch their work)."""
    global _optimizer_hook
    if _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_after_step)
    _following_layers.add(layer)


def stop_following(layer) -> None:
    """Stops calling ``layer``; the hook itself goes with the last layer that unbinds (not from
    inside a step: torch iterates its hooks while calling them, and a layer that is
    garbage-collected leaves a hook that does nothing)."""
    global _optimizer_hook
    _following_layers.discard(layer)
    if not _following_layers and _optimizer_hook is not None:
        _optimizer_hook.remove()
        _optimizer_hook = None


def _after_step(optimizer, args, kwargs) -> None:
    by_type = {}
    for layer in list(_following_layers):
        by_type.setdefault(type(layer).after_optimizer_step, []).append(layer)
    for after_optimizer_step, layers in by_type.items():
        after_optimizer_step(layers)
