"""What the running torch can do, asked in one place (the supported range: README, setup.cfg)."""
from typing import Optional

import torch


def is_compiling() -> bool:
    """Whether torch.compile is tracing the caller (False on a torch that cannot say)."""
    compiler = getattr(torch, 'compiler', None)
    check = getattr(compiler, 'is_compiling', None)  # torch >= 2.3
    if check is None:
        check = getattr(getattr(torch, '_dynamo', None), 'is_compiling', None)
    return bool(check()) if check is not None else False


def graph_input_unsupported() -> Optional[str]:
    """None if this torch lets a layer read a conv's input off the autograd graph safely, else why
    not. Reading a saved input is safe only when no saved-tensor hook is active (under
    non-reentrant checkpointing the read would recompute the region), and only torch's
    ``_top_saved_tensors_default_hooks`` tells (absent in torch 2.1); without it a layer bound
    from the graph could never record derivatives."""
    if hasattr(torch._C._autograd, '_top_saved_tensors_default_hooks'):
        return None
    return (f'torch {torch.__version__} cannot tell whether reading a conv\'s input off the '
            'autograd graph is safe (no torch._C._autograd._top_saved_tensors_default_hooks, '
            'absent in torch 2.1), so the conv cannot be bound from the graph; bind it '
            'structurally (convert_bn_to_cbn, bind_cbn_layers, CBNHook) or with layer.bind(conv)')
