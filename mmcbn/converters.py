"""Whole models: binding their CBN layers to their convs, and converting BatchNorm2d /
SyncBatchNorm to CBN and back."""
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from .layers import CrossIterationBatchNorm2d
from .layers.binding import find_producing_conv

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


def _replace_modules(module: nn.Module, replace: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Applies ``replace`` to every module, bottom-up, setting a child only when it changed."""
    for name, child in module.named_children():
        new_child = _replace_modules(child, replace)
        if new_child is not child:
            setattr(module, name, new_child)
    return replace(module)


def _copy_norm_state(src: nn.modules.batchnorm._BatchNorm,
                     dst: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        if src.affine:
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
            dst.weight.requires_grad_(src.weight.requires_grad)
            dst.bias.requires_grad_(src.bias.requires_grad)
        if src.track_running_stats:
            dst.running_mean.copy_(src.running_mean)
            dst.running_var.copy_(src.running_var)
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.train(src.training)


def _factory_kwargs(norm: nn.Module) -> dict:
    tensor = next(iter(norm.parameters()), None)
    if tensor is None:
        tensor = next(iter(norm.buffers()), None)
    return {} if tensor is None else dict(device=tensor.device, dtype=tensor.dtype)


class CBNAct2d(CrossIterationBatchNorm2d):
    """A CBN layer standing in for a norm-act module (timm's ``BatchNormAct2d``): the
    normalisation, then the original module's ``drop`` and ``act`` submodules, as its forward did.

    It inherits from the CBN layer so that every reader of a norm (CBNHook, mmengine's
    ``_BatchNorm`` checks, the converters) sees a CBN; the extras are composed as submodules.
    :func:`convert_cbn_to_bn` gives the original module back, its parameters and statistics
    updated.
    """

    def __init__(self, source: nn.Module, **cbn_kwargs):
        super().__init__(source.num_features, eps=source.eps, momentum=source.momentum,
                         affine=source.affine, track_running_stats=source.track_running_stats,
                         **cbn_kwargs, **_factory_kwargs(source))
        self.drop = source.drop
        self.act = source.act
        self._source = [source]  # a list keeps it out of the module tree and the state dict

    def forward(self, input):
        return self.act(self.drop(super().forward(input)))

    def to_source(self) -> nn.Module:
        """The original module with this layer's parameters, statistics and mode."""
        source = self._source[0]
        _copy_norm_state(self, source)
        source.drop, source.act = self.drop, self.act
        return source


def _is_norm_act(m: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` (and look-alikes): BN, then ``drop`` and ``act`` children."""
    return (type(m).__name__ in ('BatchNormAct2d', 'SyncBatchNormAct') and
            {name for name, _ in m.named_children()} == {'drop', 'act'} and
            not set(m.state_dict()) - set(nn.BatchNorm2d(1).state_dict()))


def _plain_bn_problem(m: nn.Module) -> Optional[str]:
    """None if ``m`` computes exactly what ``nn.BatchNorm2d`` does with BN's state, else why not."""
    if type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        return None
    if type(m).forward not in (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward):
        return 'overrides forward (it computes more than BatchNorm)'
    extra = set(m.state_dict()) - set(nn.BatchNorm2d(1).state_dict())
    if extra or any(True for _ in m.children()):
        return f'holds more than BatchNorm ({sorted(extra) or [n for n, _ in m.named_children()]})'
    return None


def convert_bn_to_cbn(module: nn.Module, keep: Tuple[type, ...] = (), **cbn_kwargs) -> nn.Module:
    """Replaces every ``BatchNorm2d`` and ``SyncBatchNorm`` in ``module`` with a CBN layer.

    Each CBN carries its BN's parameters (and their ``requires_grad``), running statistics and
    train/eval mode, and is bound to its producing conv where the structure shows it
    (:func:`bind_cbn_layers`). A BN subclass is converted only when
    nothing is lost: one that keeps BN's forward and state converts as BN; timm's
    ``BatchNormAct2d`` (BN, then its ``drop`` and ``act``) becomes a :class:`CBNAct2d`; any other
    raises, naming the class. Modules that are not BN subclasses (frozen BN) are left alone.

    Args:
        module: a model, or a single BN layer.
        keep: BN subclasses to leave as they are (each stays a BN layer).
        **cbn_kwargs: passed to :class:`CrossIterationBatchNorm2d` (``window_size``,
            ``compensation``, ...).

    Returns:
        ``module`` with its BN layers replaced (a new CBN if ``module`` itself is a BN).

    Raises:
        TypeError: for a BN subclass that cannot be converted faithfully and is not in ``keep``.
    """

    def to_cbn(m: nn.Module) -> nn.Module:
        if not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) or \
                isinstance(m, CrossIterationBatchNorm2d) or isinstance(m, tuple(keep)):
            return m
        if _is_norm_act(m):
            cbn = CBNAct2d(m, **cbn_kwargs)
        else:
            problem = _plain_bn_problem(m)
            if problem is not None:
                raise TypeError(
                    f'convert_bn_to_cbn: {type(m).__module__}.{type(m).__name__} {problem}; '
                    'a plain CBN would silently drop that. Leave it as it is with '
                    f'keep=({type(m).__name__},), or convert it yourself')
            cbn = CrossIterationBatchNorm2d(
                m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats, **cbn_kwargs, **_factory_kwargs(m))
        _copy_norm_state(m, cbn)
        return cbn

    converted = _replace_modules(module, to_cbn)
    bind_cbn_layers(converted)
    return converted


def convert_cbn_to_bn(module: nn.Module) -> nn.Module:
    """Replaces every CBN layer with an ``nn.BatchNorm2d`` holding the same parameters and running
    statistics (a :class:`CBNAct2d` with the module it replaced), for deployment: eval outputs are
    identical. The CBN layers are unbound."""

    def to_bn(m: nn.Module) -> nn.Module:
        if not isinstance(m, CrossIterationBatchNorm2d):
            return m
        if isinstance(m, CBNAct2d):
            m.unbind()
            return m.to_source()
        bn = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                            track_running_stats=m.track_running_stats, **_factory_kwargs(m))
        _copy_norm_state(m, bn)
        m.unbind()
        return bn

    return _replace_modules(module, to_bn)
