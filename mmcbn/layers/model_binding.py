"""Binds every CBN layer of a model to its producing conv, from the module structure."""
from typing import Dict, Optional, Tuple

from torch import nn

from .binding import find_producing_conv
from .cross_iteration_bn import CrossIterationBatchNorm2d

#: layer name -> (conv name, '') when bound, (None, reason) when not
BindingReport = Dict[str, Tuple[Optional[str], str]]


def bind_cbn_layers(model: nn.Module) -> BindingReport:
    """Binds each CBN layer in ``model`` to the conv whose output feeds it, found structurally.

    A layer whose producer cannot be seen from the structure keeps no binding and is bound from the
    autograd graph on its first training forward (see :func:`~mmcbn.layers.binding.
    binding_from_graph`); one whose producer is visibly not a plain conv (deformable, weight-
    standardised, norm before conv) is marked as not compensable.

    Returns:
        For every CBN layer, by name: ``(conv_name, '')`` or ``(None, reason)``.
    """
    report: BindingReport = {}
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            if not isinstance(child, CrossIterationBatchNorm2d):
                continue
            name = f'{parent_name}.{child_name}' if parent_name else child_name
            child.layer_name = name
            found = find_producing_conv(parent, child_name)
            if found.try_graph:  # the graph may show the producer on the first step
                report[name] = ((child.binding.name, '') if child.binding is not None else
                                (None, found.reason + '; will try the autograd graph at the '
                                 'first training step'))
            elif found.conv is None:
                child.unbind(found.reason)
                report[name] = (None, found.reason)
            else:
                conv_name = f'{parent_name}.{found.conv}' if parent_name else found.conv
                child.bind(getattr(parent, found.conv), conv_name)
                report[name] = (conv_name, '')
    return report
