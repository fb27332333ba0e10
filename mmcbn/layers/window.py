"""The ring of one layer's entries from earlier iterations."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .scratch_tensors import ScratchTensors


class MomentWindow(ScratchTensors):
    """A fixed-size ring of per-iteration statistics, preallocated on first use.

    Each slot holds one iteration's per-channel ``mean`` and ``var`` (``[capacity, C]``, float32 or
    wider), a ``valid`` flag (0 when the batch's statistics were not finite: such an entry is never
    used) and, for compensable entries (``compensable_mask`` 1), the derivatives from
    :func:`~mmcbn.layers.conv_moments.moment_derivatives`, stored channel-major (``patch_mean``
    ``[groups, capacity, K]``, ``sqmean_grad`` ``[C, capacity, K]``) so that compensating every slot
    is one batched matrix product with no gather. The derivative buffers are only allocated for a
    layer that records a compensable entry.

    At most one slot is *pending*: the current iteration's entry, which becomes part of the window
    (*committed*) when the next iteration starts. While pending it may be merged with further calls
    of the layer in the same iteration.

    Args:
        capacity: number of slots (the window size minus the current batch).
    """
    tensor_names = ('mean', 'var', 'valid', 'compensable_mask', 'patch_mean', 'sqmean_grad')

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        """Drops every entry and frees the storage."""
        self.mean: Optional[Tensor] = None
        self.var: Optional[Tensor] = None
        self.valid: Optional[Tensor] = None
        self.compensable_mask: Optional[Tensor] = None
        self.patch_mean: Optional[Tensor] = None
        self.sqmean_grad: Optional[Tensor] = None
        self.num_positions: List[int] = [0] * self.capacity
        self.num_calls: List[int] = [0] * self.capacity
        self.compensable: List[bool] = [False] * self.capacity
        self.committed: List[int] = []  # slot indices, oldest first
        self.pending: Optional[int] = None

    def __len__(self) -> int:
        """Number of entries held, this iteration's pending one included."""
        return len(self.committed) + (self.pending is not None)

    def recent(self, n: int) -> List[int]:
        """The slots of the ``n`` most recent committed entries, newest first."""
        return self.committed[::-1][:max(n, 0)]

    def commit_pending(self) -> None:
        if self.pending is not None:
            self.committed.append(self.pending)
            self.pending = None

    def open_pending(self) -> int:
        """Reserves the slot for this iteration's entry: a free one, else the oldest entry's."""
        assert self.pending is None and self.capacity > 0
        used = set(self.committed)
        free = [s for s in range(self.capacity) if s not in used]
        slot = free[0] if free else self.committed.pop(0)
        self.pending = slot
        self.num_calls[slot] = 0
        return slot

    def _allocate(self, num_channels: int, device, dtype) -> None:
        if self.mean is None or self.mean.shape[1] != num_channels or self.mean.device != device:
            self.mean = torch.zeros(self.capacity, num_channels, device=device, dtype=dtype)
            self.var = torch.zeros_like(self.mean)
            self.valid = torch.zeros(self.capacity, device=device, dtype=dtype)
            self.compensable_mask = torch.zeros_like(self.valid)

    def _allocate_derivatives(self, patch_mean: Tensor, sqmean_grad: Tensor) -> None:
        shape = (sqmean_grad.shape[0], self.capacity, sqmean_grad.shape[1])
        if self.sqmean_grad is None or self.sqmean_grad.shape != shape:
            self.patch_mean = patch_mean.new_zeros(
                (patch_mean.shape[0], self.capacity, patch_mean.shape[1]))
            self.sqmean_grad = sqmean_grad.new_zeros(shape)

    def record(self, mean: Tensor, var: Tensor, finite: Tensor, num_positions: int,
               derivatives: Optional[Tuple[Tensor, Tensor]]) -> None:
        """Writes one call's statistics into the pending slot, merging with earlier calls in it.

        Merging weights each call by its number of positions, so the slot holds the statistics (and
        derivatives, which are also means over positions) of all positions seen this iteration.
        A non-finite first call is stored marked invalid (``valid`` 0, never used); a non-finite
        later call leaves the slot as it was.
        """
        slot = self.pending
        assert slot is not None
        self._allocate(mean.shape[0], mean.device, mean.dtype)
        first = self.num_calls[slot] == 0
        n_old = 0 if first else self.num_positions[slot]
        total = n_old + num_positions

        def merged(old: Tensor, new: Tensor) -> Tensor:
            """Position-weighted mean with the slot's earlier calls; a non-finite call adds nothing."""
            return torch.where(finite, (n_old * old + num_positions * new) / total, old)

        if first:  # a non-finite entry is stored as it is, marked invalid, and never used
            self.valid[slot] = finite.to(self.valid.dtype)
            self.mean[slot], self.var[slot] = mean, var
        else:
            old_mean, old_var = self.mean[slot], self.var[slot]
            spread = (n_old * num_positions / total**2) * (old_mean - mean)**2
            self.mean[slot] = merged(old_mean, mean)
            self.var[slot] = torch.where(finite, merged(old_var, var) + spread, old_var)

        if derivatives is not None and (first or self.compensable[slot]):
            patch_mean, sqmean_grad = derivatives
            if not first:
                patch_mean = merged(self.patch_mean[:, slot], patch_mean)
                sqmean_grad = merged(self.sqmean_grad[:, slot], sqmean_grad)
            self._write_derivatives(slot, patch_mean, sqmean_grad)
        else:
            self.compensable[slot] = False
            self.compensable_mask[slot] = 0.0
        self.num_positions[slot] = total
        self.num_calls[slot] += 1

    def fill_derivatives(self, derivatives: Tuple[Tensor, Tensor]) -> None:
        """Adds derivatives to a pending entry recorded by a single call that could not compute them
        (e.g. the no-grad first pass of gradient checkpointing, before its recomputation)."""
        slot = self.pending
        if slot is None or self.compensable[slot] or self.num_calls[slot] != 1:
            return
        self._write_derivatives(slot, *derivatives)

    def _write_derivatives(self, slot: int, patch_mean: Tensor, sqmean_grad: Tensor) -> None:
        self._allocate_derivatives(patch_mean, sqmean_grad)
        self.patch_mean[:, slot] = patch_mean
        self.sqmean_grad[:, slot] = sqmean_grad
        self.compensable[slot] = True
        self.compensable_mask[slot] = 1.0
