"""What the running torch can do, asked in one place (the supported range: README, setup.cfg)."""
import torch


def is_compiling() -> bool:
    """Whether torch.compile is tracing the caller (False on a torch that cannot say)."""
    compiler = getattr(torch, 'compiler', None)
    check = getattr(compiler, 'is_compiling', None)  # torch >= 2.3
    if check is None:
        check = getattr(getattr(torch, '_dynamo', None), 'is_compiling', None)
    return bool(check()) if check is not None else False


def _identity(tensor):
    return tensor


def saved_input_is_hooked(grad_fn) -> bool:
    """Whether the input a conv saved for its backward (``grad_fn``: its ``ConvolutionBackward0``)
    is held by a saved-tensor hook, such as non-reentrant checkpointing's, where reading it would
    recompute the checkpointed region.

    torch >= 2.2 tells which default hooks are active (``_top_saved_tensors_default_hooks``). On
    torch 2.1 the saved tensor itself tells: one packed by a hook refuses hooks of its own, and one
    that is free takes identity hooks (packing keeps the tensor itself, unpacking returns it), so
    asking leaves it as it was in every way that matters.
    """
    top_hooks = getattr(torch._C._autograd, '_top_saved_tensors_default_hooks', None)
    if top_hooks is not None:
        return top_hooks(False) is not None
    try:
        grad_fn._raw_saved_input.register_hooks(_identity, _identity)
    except RuntimeError:  # "Calling register_hooks on a saved tensor whose hooks have already..."
        return True
    return False
