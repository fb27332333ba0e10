"""The records one training call passes between the layer's parts (no logic beyond building
them): the batch's statistics, the iteration's window at the current weights, and what the
backward needs to pass a gradient through the compensated entries."""
from dataclasses import dataclass
from typing import List, Optional

from torch import Tensor


@dataclass
class BatchStatistics:
    """One call's batch statistics, float32 or wider, detached."""
    mean: Tensor  # [C] this process's batch
    var: Tensor  # [C]
    num_positions: int  # this process's
    finite: Tensor  # [] bool: no NaN/Inf in the batch (stays on the device)
    pooled_mean: Tensor  # [C] over the processes (synchronised CBN), else ``mean``
    pooled_var: Tensor
    total: Optional[Tensor] = None  # [] positions over the processes (synchronised CBN)


@dataclass
class WindowGradTerms:
    """What the backward needs to pass a gradient through the compensated window entries, with the
    per-iteration factors folded in (the backward then costs a few ``[S, C]`` products).

    Per entry (``S`` slots; a slot that is not used, not compensated or not valid has share 0) the
    gradient w.r.t. its compensated mean and second moment is, with ``a = dL/dmean`` and
    ``b = dL/dvar`` of the pooled statistics and ``k`` entries in all::

        d mean_hat = share * (a - 2 b mean) / k + [clamped] share * 2 b mean_hat / k
        d sqmean_hat = [not clamped] share * b / k

    (a clamped entry's second moment is ``mean_hat ** 2``: autograd of ``max(sqmean_hat,
    mean_hat ** 2)``).

    Args:
        share: ``[S, 1]`` each slot's share in its entry: 1 for a used, compensated slot (under
            synchronised CBN, this process's fraction of the entry's positions), else 0. None:
            1 for every slot (every slot is used and compensated, or holds zero derivatives and
            is not used, and the conv has no bias: ``share`` changes nothing).
        kept_share: ``[S, C]`` the share where the entry's variance was not clamped, else 0.
        clamped_mean: ``[S, C]`` ``share * mean_hat`` where it was clamped, else 0.
        mean: ``[S, C]`` the means as recorded (this process's).
        patch_mean, sqmean_grad: ``[groups, S, K]``, ``[C, S, K]``: the recorded derivatives.
    """
    share: Optional[Tensor]
    kept_share: Tensor
    clamped_mean: Tensor
    mean: Tensor
    patch_mean: Tensor
    sqmean_grad: Tensor

    def tensors(self) -> tuple:
        """The fields in order (the Function saves them for backward)."""
        return (self.share, self.kept_share, self.clamped_mean, self.mean, self.patch_mean,
                self.sqmean_grad)

    @classmethod
    def build(cls, share: Optional[Tensor], mean_hat: Tensor, var_hat: Tensor, mean: Tensor,
              patch_mean: Tensor, sqmean_grad: Tensor) -> 'WindowGradTerms':
        """From the shares, the compensated entries before the clamp and the recorded ones."""
        kept = var_hat >= 0
        if share is None:
            return cls(None, kept, mean_hat.masked_fill(kept, 0.0), mean, patch_mean,
                       sqmean_grad)
        share = share[:, None]
        kept = share * kept
        return cls(share, kept, (share - kept) * mean_hat, mean, patch_mean, sqmean_grad)


@dataclass
class IterationState:
    """What a layer computes once per iteration: its window at the current weights, in slot order
    (``S`` slots; a slot that is not used has weight 0)."""
    num_used: int = 0  # entries used (host bookkeeping, for window_stats)
    mean: Optional[Tensor] = None  # [S, C] each slot's entry, compensated (None: no entries)
    var: Optional[Tensor] = None  # [S, C], clamped at 0
    weights: Optional[Tensor] = None  # [1 + S] the current batch's and each slot's share, sum 1
    num_entries: Optional[Tensor] = None  # [] k: the current batch and the used entries
    grad_terms: Optional[WindowGradTerms] = None  # for the gradient through the entries
    compensated: bool = False  # the entries were moved to the current weights (if they could be)
    weight_version: Optional[int] = None  # the bound conv weight's version counter (eager only)
    one: Optional[Tensor] = None  # [1] a constant (the average adds eps through it)
    # for window_stats(), as the window stood when the iteration started
    cursor: Optional[Tensor] = None  # the ring's cursor
    compensable: Optional[List[bool]] = None  # the used entries', newest first
    recorded: Optional[Tensor] = None  # [S, 2C] the slots' mean | var, once a commit overwrote one
