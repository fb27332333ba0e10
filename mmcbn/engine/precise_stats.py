"""Precise re-estimation of BN-type running statistics at the current weights (PreciseBN).

Runs the model in training mode, without gradients, over a number of batches and replaces the
running statistics of every BN-type layer that is training (``_BatchNorm``: BN, SyncBN, CBN; layers
frozen by ``norm_eval`` or ``frozen_stages`` are left alone) by population statistics of its input:
the mean and the unbiased variance over all positions of all batches (of all processes), i.e. the
within-batch variances plus the spread of the batch means. During the pass every layer normalises
with its own batch alone (CBN's window is off and nothing is recorded), so the statistics are those
of the network as BN trains it, and the pass leaves no other trace (running statistics counters,
windows, random number generators).
"""
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import CrossIterationBatchNorm2d
from ..layers.conv_moments import output_moments
from ..layers.distributed import all_reduce_sum, is_distributed


def loader_batches(loader) -> Iterator[Any]:
    """A fresh pass over a DataLoader's batches, loaded in this process.

    Follows the loader's batch sampler (its order, its share of the data under DDP) and collate
    function, but not its worker processes: the training loop's iterator may hold persistent
    workers over an infinite sampler, which a second iterator of the same loader cannot share.
    """
    for indices in loader.batch_sampler:
        yield loader.collate_fn([loader.dataset[i] for i in indices])


@dataclass
class PreciseStatsReport:
    """What :func:`recompute_running_stats` did."""
    num_layers: int
    num_batches: int
    seconds: float
    not_seen: List[str]  # training BN-type layers that got no input during the pass


@contextlib.contextmanager
def _forked_random_state():
    """Leaves Python's, NumPy's and torch's generators as they were (the pass draws samples)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and \
        torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _population_sums(layers: Dict[str, _BatchNorm]):
    """Forward pre-hooks accumulating count, sum and sum of squares per channel (float64)."""
    sums = {name: torch.zeros(2 * m.num_features + 1, dtype=torch.float64,
                              device=m.running_mean.device)
            for name, m in layers.items()}

    def make_hook(name):

        def hook(module, args):
            x = args[0]
            n = x.numel() // x.shape[1]
            if n == 0:
                return
            # BN's own one-pass statistics kernel, float32 or wider; the sums in float64
            mean, var = output_moments(x.detach())
            mean, var = mean.double(), var.double()
            c = module.num_features
            acc = sums[name]
            acc[:c] += n * mean
            acc[c:2 * c] += n * (var + mean * mean)
            acc[-1] += n

        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in layers.items()]
    return sums, handles


@torch.no_grad()
def recompute_running_stats(model: nn.Module, batches: Iterable[Any],
                            forward: Callable[[nn.Module, Any], Any], num_batches: int,
                            process_group=None) -> PreciseStatsReport:
    """Replaces the running statistics of the model's training BN-type layers by population
    statistics over ``num_batches`` batches at the current weights.

    Args:
        model: the model (not a DDP wrapper: every process runs its own pass).
        batches: an iterable of batches (e.g. the training dataloader); the first ``num_batches``
            are used, fewer if it ends sooner.
        forward: ``forward(model, batch)`` runs the model in training mode on one batch.
        num_batches: how many batches.
        process_group: under torch.distributed, the statistics are summed over this group (default:
            the world), so every process ends with the same values. Every process must call this
            with the same ``num_batches``.

    Returns:
        A :class:`PreciseStatsReport`.

    Raises:
        ValueError: if ``batches`` yields nothing (the statistics are then left as they were).
    """
    start = time.perf_counter()
    was_training = {m: m.training for m in model.modules()}
    model.train()
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, _BatchNorm) and m.training and m.running_mean is not None}
    saved = {}
    for m in layers.values():
        saved[m] = (m.momentum, m.num_batches_tracked.clone()
                    if m.num_batches_tracked is not None else None)
        m.momentum = 0.0  # the layers' own running statistics stay as they are during the pass
    sums, handles = _population_sums(layers)
    used = 0
    try:
        with _forked_random_state(), contextlib.ExitStack() as as_batchnorm:
            for m in layers.values():
                if isinstance(m, CrossIterationBatchNorm2d):
                    as_batchnorm.enter_context(m.as_batchnorm())
            for batch in batches:
                if used >= num_batches:
                    break
                forward(model, batch)
                used += 1
    finally:
        for handle in handles:
            handle.remove()
        for m, state in saved.items():
            m.momentum = state[0]
            if state[1] is not None:
                m.num_batches_tracked.copy_(state[1])
        for m, mode in was_training.items():
            m.training = mode

    if used == 0:
        raise ValueError('recompute_running_stats: the batches yielded nothing; the running '
                         'statistics are left as they were')
    names = list(layers)
    if names:
        flat = torch.cat([sums[n] for n in names])
        if is_distributed(process_group):
            all_reduce_sum(flat, process_group)
        offset = 0
        for n in names:
            size = sums[n].numel()
            sums[n] = flat[offset:offset + size]
            offset += size
    not_seen = []
    for name, m in layers.items():
        acc, c = sums[name], m.num_features
        count = acc[-1]
        if count < 2:
            not_seen.append(name)
            continue
        mean = acc[:c] / count
        var = (acc[c:2 * c] / count - mean * mean).clamp_min(0.0) * (count / (count - 1))
        mean = mean.to(m.running_mean.dtype)
        var = var.to(m.running_var.dtype)
        if isinstance(m, CrossIterationBatchNorm2d):
            m.set_running_stats(mean, var)
        else:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return PreciseStatsReport(len(layers) - len(not_seen), used, time.perf_counter() - start,
                              not_seen)

