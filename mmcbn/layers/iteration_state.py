"""What a CBN layer computes once per training iteration: its window at the current weights.

The words used here are those of the glossary in :mod:`mmcbn.layers`.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .conv_moments import compensate, output_moments
from .distributed import pool_moments
from .records import BatchStatistics, IterationState, WindowGradTerms
from .torch_features import is_compiling
from .window import MomentWindow


@torch.no_grad()
def batch_statistics(input: Tensor, process_group, sync: bool) -> BatchStatistics:
    """The batch's moments, pooled over ``process_group`` when ``sync``."""
    num_positions = input.numel() // input.shape[1]
    mean, var = output_moments(input, traced=is_compiling())
    pooled_mean, pooled_var, total = mean, var, None
    if sync:
        pooled_mean, pooled_var, total = pool_moments(
            mean, var, torch.full_like(mean[0], num_positions), process_group)
    # a non-finite value anywhere makes the variance NaN (inf - inf) or +inf (an overflow); a
    # variance is never negative, so `< inf` is False exactly for those
    finite = pooled_var.sum().lt(float('inf'))
    return BatchStatistics(mean, var, num_positions, finite, pooled_mean, pooled_var, total)


def start_iteration(window: MomentWindow, compensable: List[bool],
                    binding, window_grad: bool, process_group,
                    sync: bool) -> IterationState:
    """The window's entries at the current weights, in slot order, for every call this iteration:
    device tensors only, no host sync.

    Args:
        window: the layer's window, its pending entry already committed.
        compensable: whether each entry to use is compensable, newest first.
        binding: the :class:`~mmcbn.layers.binding.ConvBinding` to compensate against; None: the
            entries as recorded.
        window_grad: prepare the gradient through the compensated entries.
        process_group, sync: pool every entry over the processes (synchronised CBN).
    """
    state = IterationState(len(compensable), cursor=window.cursor, compensable=compensable)
    if not compensable:
        return state
    weights = window.in_window(len(compensable))  # [1 + S]: the current batch, then each slot
    use = weights[1:]
    mean, var = window.mean, window.var
    share = None
    if binding is not None and any(compensable):
        with torch.no_grad():  # every slot at once: one batched product, no gather
            mean_hat, var_hat = compensate(window.mean, window.var, window.patch_mean,
                                           window.sqmean_grad, binding.weight, binding.bias,
                                           clamp=False, offset=window.offset)
        state.compensated = True
        if all(compensable):
            mean, var, share = mean_hat, var_hat, use
            # every slot used and compensated, or never used and holding zero derivatives (a
            # non-finite batch's, a slot not yet written): shares of 1 change no gradient
            if not sync and binding.bias is None and len(window.committed) == len(compensable):
                share = None
        else:
            use_hat = window.compensable_mask[:, None] > 0
            mean = torch.where(use_hat, mean_hat, mean)
            var = torch.where(use_hat, var_hat, var)
            share = use * window.compensable_mask
    if sync:  # pooled before the clamp, so the clamp sees the entry of all processes
        mean, var, pooled = pool_moments(mean, var, use * window.positions, process_group)
        use = (pooled > 0).to(use.dtype)
        weights = F.pad(use, (1, 0), value=1.0)
        if share is not None:
            share = share * window.positions / pooled.clamp_min(1.0)
    if state.compensated and window_grad:
        state.grad_terms = WindowGradTerms.build(share, mean, var, window.mean, window.patch_mean,
                                                 window.sqmean_grad)
    state.mean, state.var = mean, var.clamp_min(0.0)
    state.num_entries = weights.sum()
    state.weights = weights / state.num_entries
    state.one = window.one
    return state


def window_average(state: IterationState, mean: Tensor, var: Tensor,
                   eps: float) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The current batch's statistics averaged with the window's entries (the variance plus
    ``eps``, as the normalisation uses it), and the current batch's share of the average (``1/k``;
    None without entries: then the variance is returned as it is)."""
    if state.mean is None:
        return mean, var, None
    shares = state.weights[None]  # [1, 1 + S]
    means = torch.cat([mean[None], state.mean])
    mean_bar = shares @ means
    spread = means - mean_bar  # the variance about the pooled mean: no E[y^2] - E[y]^2
    var_eps = torch.addmm(state.one, shares, torch.cat([var[None], state.var]).addcmul_(
        spread, spread), beta=eps)
    return mean_bar[0], var_eps[0], state.weights[0]


def describe_window(state: Optional[IterationState], window: MomentWindow,
                    num_features: int) -> Dict[str, Tensor]:
    """The window as ``state`` used it, detached, newest entry first (diagnostics: reads the
    window's cursor)."""
    if state is None or state.mean is None or not state.num_used:
        empty = torch.zeros(0, num_features)
        return dict(mean=empty, var=empty, raw_mean=empty, raw_var=empty, valid=torch.zeros(0),
                    compensated=torch.zeros(0, dtype=torch.bool),
                    age=torch.zeros(0, dtype=torch.long))
    idx = window.recent_slots(state.num_used, state.cursor)
    recorded = window.recorded_stats() if state.recorded is None else state.recorded
    raw_mean, raw_var = recorded[idx].chunk(2, dim=1)  # (indexing copies)
    return dict(mean=state.mean[idx].clone(), var=state.var[idx].clone(),
                raw_mean=raw_mean, raw_var=raw_var,
                valid=(state.weights[1:][idx] > 0).to(state.mean.dtype),
                compensated=torch.tensor(state.compensable) & state.compensated,
                age=torch.arange(1, state.num_used + 1))
