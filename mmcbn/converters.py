"""Converters between BatchNorm2d / SyncBatchNorm and CBN, for whole models."""
from typing import Callable

import torch
from torch import nn

from .layers import CrossIterationBatchNorm2d
from .layers.model_binding import bind_cbn_layers


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


def convert_bn_to_cbn(module: nn.Module, **cbn_kwargs) -> nn.Module:
    """Replaces every ``BatchNorm2d`` and ``SyncBatchNorm`` in ``module`` with a CBN layer.

    Each CBN carries its BN's parameters (and their ``requires_grad``), running statistics and
    train/eval mode, and is bound to its producing conv where the structure shows it
    (:func:`~mmcbn.layers.model_binding.bind_cbn_layers`).

    Args:
        module: a model, or a single BN layer.
        **cbn_kwargs: passed to :class:`CrossIterationBatchNorm2d` (``window_size``,
            ``compensation``, ...).

    Returns:
        ``module`` with its BN layers replaced (a new CBN if ``module`` itself is a BN).
    """

    def to_cbn(m: nn.Module) -> nn.Module:
        if not isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) or \
                isinstance(m, CrossIterationBatchNorm2d):
            return m
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
    statistics, for deployment: eval outputs are identical. The CBN layers are unbound."""

    def to_bn(m: nn.Module) -> nn.Module:
        if not isinstance(m, CrossIterationBatchNorm2d):
            return m
        bn = nn.BatchNorm2d(m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                            track_running_stats=m.track_running_stats, **_factory_kwargs(m))
        _copy_norm_state(m, bn)
        m.unbind()
        return bn

    return _replace_modules(module, to_bn)
