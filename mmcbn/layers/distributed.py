"""Cross-process pooling of CBN statistics (no-ops when not distributed)."""
from typing import Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .conv_moments import mixture_moments


def is_distributed(group=None) -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def pool_moments(mean: Tensor, var: Tensor, positions: Tensor,
                 group=None) -> Tuple[Tensor, Tensor, Tensor]:
    """Pools per-process moments into the moments of all processes' positions together.

    Args:
        mean, var: ``[..., C]`` per-process mean and (biased) variance.
        positions: ``[...]`` number of positions behind each row (0 for a row to ignore).
        group: the process group (default: the world).

    Returns:
        The pooled ``mean``, ``var`` and ``positions``. The variance is combined as
        ``sum_r n_r (var_r + (mean_r - mean)^2) / n`` (no ``E[y^2] - E[y]^2`` cancellation); a
        non-finite row on any process makes the pooled row non-finite everywhere.
    """
    c = mean.shape[-1]
    packed = torch.cat([positions[..., None].to(mean.dtype), mean, var], dim=-1).contiguous()
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    stacked = torch.stack(gathered)
    sizes, means, variances = stacked[..., 0], stacked[..., 1:c + 1], stacked[..., c + 1:]
    total = sizes.sum(0)
    # rows with no positions hold zeros; keep them out of the sums even if they are not finite
    used = sizes > 0
    shares = torch.where(used, sizes / total.clamp_min(1.0), torch.zeros_like(sizes))
    means = torch.where(used[..., None], means, torch.zeros_like(means))
    variances = torch.where(used[..., None], variances, torch.zeros_like(variances))
    pooled_mean, pooled_var = mixture_moments(shares, means, variances)
    return pooled_mean, pooled_var, total


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Sums ``tensor`` over processes, in place; returns it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor
