"""The ring of one layer's entries from earlier iterations, kept on the layer's device."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .scratch_tensors import ScratchTensors


class MomentWindow(ScratchTensors):
    """The entries of one layer's earlier iterations: a ring of ``capacity`` slots, and this
    iteration's entry (*pending*) beside it.

    Each slot holds one iteration's per-channel ``mean``, ``var`` and second moment ``sqmean``
    (``var + mean^2``; ``[capacity, C]``, float32 or wider), its ``age`` (iterations since it was
    recorded; infinite for a slot never written and for a batch whose statistics were not finite,
    stored as zeros and never used), its number of ``positions`` (kept for synchronised CBN only)
    and, for compensable entries (``compensable_mask`` 1), the derivatives from
    :func:`~mmcbn.layers.conv_moments.moment_derivatives`, stored channel-major (``patch_mean``
    ``[groups, capacity, K]``, ``sqmean_grad`` ``[C, capacity, K]``) so that compensating every slot
    is one batched matrix product with no gather. ``mean``, ``var``, ``sqmean`` and ``age`` are
    views of one ``stats`` tensor (``[capacity, 3C + 1]``), ``patch_mean`` and ``sqmean_grad`` of
    one ``derivatives`` tensor (``[groups + C, capacity, K]``). The derivative buffers are only
    allocated for a layer that records a compensable entry.

    The contract with autograd: the ring changes only when an iteration starts
    (:meth:`commit_pending` writes the previous iteration's entry into the oldest slot); within an
    iteration, every call reads the same ring and records into the pending entry, separate
    tensors. So the normalisation saves the ring for its backward like any input
    (``save_for_backward``), and a backward run after the next iteration has started fails with
    torch's in-place error instead of reading another iteration's entries.

    Everything the arithmetic reads lives on the device, the slot written next included
    (``cursor``, a one-element index): a training step never copies host data to the device nor
    reads device data back, and no Python value that changes every step reaches a tensor op (what
    lets ``torch.compile`` trace a steady step once). The host keeps only facts that are the same
    at every steady step: the committed entries' compensability, oldest first (``committed``), and
    the pending entry's calls and positions.

    Args:
        capacity: number of slots: the window size less the current iteration (0 for a window of
            1).
    """
    tensor_names = ('stats', 'compensable_mask', 'positions', 'cursor', 'next_slot', 'uses',
                    'zero', 'invalid', 'derivatives', 'excess', 'pending_stats',
                    'pending_derivatives', 'pending_excess')

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        """Drops every entry and frees the storage."""
        self.stats: Optional[Tensor] = None  # [capacity, 3C + 1]: mean, var, sqmean, age
        self.compensable_mask: Optional[Tensor] = None
        self.positions: Optional[Tensor] = None
        self.cursor: Optional[Tensor] = None  # [1] the slot the next commit writes (long)
        self.next_slot: Optional[Tensor] = None  # [capacity] the slot after each (long)
        self.uses: Optional[Tensor] = None  # [1 + capacity], see in_window
        self.zero: Optional[Tensor] = None
        self.invalid: Optional[Tensor] = None  # [3C + 1] a non-finite batch's stats row
        self.derivatives: Optional[Tensor] = None  # [groups + C, capacity, K]
        self.excess: Optional[Tensor] = None  # [capacity, C], for sampled derivatives only
        self._groups = 0
        # this iteration's entry: a stats row, and the derivatives when compensable
        self.pending_stats: Optional[Tensor] = None  # [3C + 1]
        self.pending_derivatives: Optional[Tensor] = None  # [groups + C, K]
        self.pending_excess: Optional[Tensor] = None  # [C]
        self.pending_positions_tensor: Optional[Tensor] = None
        #: whether each committed entry is compensable, oldest first
        self.committed: List[bool] = []
        self.pending = False
        self.pending_calls = 0
        self.pending_positions = 0
        self.pending_compensable = False
        self.cursor_compensable = False  # the compensable_mask at cursor

    mean = property(lambda self: self._stats_view(0), doc='``[capacity, C]`` each entry\'s mean')
    var = property(lambda self: self._stats_view(1), doc='``[capacity, C]`` each entry\'s variance')
    sqmean = property(lambda self: self._stats_view(2),
                      doc='``[capacity, C]`` each entry\'s second moment, ``var + mean^2``')
    age = property(lambda self: None if self.stats is None else self.stats[:, -1],
                   doc='``[capacity]`` iterations since each entry was recorded')
    patch_mean = property(lambda self: None if self.derivatives is None else
                          self.derivatives[:self._groups], doc='``[groups, capacity, K]``')
    sqmean_grad = property(lambda self: None if self.derivatives is None else
                           self.derivatives[self._groups:], doc='``[C, capacity, K]``')

    def _stats_view(self, index: int) -> Optional[Tensor]:
        if self.stats is None:
            return None
        channels = self.stats.shape[1] // 3
        return self.stats[:, index * channels:(index + 1) * channels]

    def __len__(self) -> int:
        """Number of entries held: the committed ones (at most ``capacity``) and this iteration's
        pending one."""
        return len(self.committed) + self.pending

    def recent(self, n: int) -> List[bool]:
        """Whether each of the ``n`` most recent committed entries is compensable, newest first."""
        return self.committed[::-1][:max(n, 0)]

    def recent_slots(self, n: int) -> Tensor:
        """The slots of the ``n`` most recent committed entries, newest first (a device tensor)."""
        steps = torch.arange(1, n + 1, device=self.cursor.device)
        return (self.cursor - steps).remainder_(self.capacity)

    def commit_pending(self) -> None:
        """Starts a new iteration: the pending entry is written into the oldest slot (it leaves
        the window), every entry ages by one."""
        if self.pending:
            self._write(self.stats, 0, self.pending_stats)
            if self.pending_compensable:
                self._write(self.derivatives, 1, self.pending_derivatives)
                if self.pending_excess is not None:
                    self._write(self.excess, 0, self.pending_excess)
            if self.pending_compensable != self.cursor_compensable:  # known on the host
                self.compensable_mask.index_fill_(0, self.cursor, float(self.pending_compensable))
            if self.pending_positions_tensor is not None:
                self._write(self.positions, 0, self.pending_positions_tensor)
            self.committed.append(self.pending_compensable)
            if len(self.committed) > self.capacity:
                self.committed.pop(0)
            # the next slot holds the oldest entry, which is the next to leave
            self.cursor_compensable = (self.committed[0]
                                       if len(self.committed) == self.capacity else False)
            self.cursor = self.next_slot[self.cursor]
            self.pending = False
            self.pending_stats = self.pending_derivatives = self.pending_excess = None
            self.pending_positions_tensor = None
        if self.stats is not None:
            self.age.add_(1.0)

    def open_pending(self) -> None:
        """Starts this iteration's entry."""
        assert not self.pending and self.capacity > 0
        self.pending = True
        self.pending_calls = 0
        self.pending_positions = 0
        self.pending_compensable = False

    def in_window(self, num_entries: int) -> Tensor:
        """``[1 + capacity]``: 1 for the current batch, then per slot 1 for the valid entries among
        the ``num_entries`` most recent, else 0. Written in place, once per iteration (saved for
        backward, as the ring)."""
        torch.le(self.age, num_entries, out=self.uses[1:])
        return self.uses

    def _allocate(self, num_channels: int, device, dtype) -> None:
        width = 3 * num_channels + 1
        if self.stats is None or self.stats.shape[1] != width or self.stats.device != device:
            self.invalid = torch.zeros(width, device=device, dtype=dtype)
            self.invalid[-1] = float('inf')
            self.stats = self.invalid.repeat(self.capacity, 1)
            self.compensable_mask = torch.zeros(self.capacity, device=device, dtype=dtype)
            self.positions = torch.zeros_like(self.compensable_mask)
            self.cursor = torch.zeros(1, device=device, dtype=torch.long)
            self.next_slot = torch.arange(1, self.capacity + 1, device=device).remainder_(
                self.capacity)
            self.uses = torch.ones(1 + self.capacity, device=device, dtype=dtype)
            self.zero = torch.zeros((), device=device, dtype=dtype)  # where()'s fill

    def _allocate_derivatives(self, derivatives: Tensor, groups: int) -> None:
        shape = (derivatives.shape[0], self.capacity, derivatives.shape[1])
        if self.derivatives is None or self.derivatives.shape != shape:
            self._groups = groups
            self.derivatives = derivatives.new_zeros(shape)

    def _write(self, ring: Tensor, dim: int, value: Tensor) -> None:
        """``ring``'s slot ``cursor`` along ``dim`` := ``value``."""
        ring.index_copy_(dim, self.cursor, value.unsqueeze(dim))

    def record(self, mean: Tensor, var: Tensor, finite: Tensor, num_positions: int,
               derivatives: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]],
               count_positions: bool = False) -> None:
        """Makes one call's statistics the pending entry, merging with earlier calls in it.

        Merging weights each call by its number of positions, so the entry holds the statistics
        (and derivatives, which are also means over positions) of all positions seen this
        iteration. A non-finite first call is stored as zeros marked invalid (infinite age, never
        used); a non-finite later call leaves the entry as it was. ``count_positions``: keep the
        entry's number of positions on the device (synchronised CBN pools entries by it).
        """
        assert self.pending
        self._allocate(mean.shape[0], mean.device, mean.dtype)
        first = self.pending_calls == 0
        n_old = self.pending_positions
        total = n_old + num_positions

        def merged(old: Tensor, new: Tensor) -> Tensor:
            """Position-weighted mean with the entry's earlier calls; a non-finite call adds
            nothing."""
            return torch.where(finite, (n_old * old + num_positions * new) / total, old)

        if first:
            row = torch.cat([mean, var, torch.addcmul(var, mean, mean), self.zero.view(1)])
            self.pending_stats = torch.where(finite, row, self.invalid)  # age 0
        else:
            old = self.pending_stats
            channels = mean.shape[0]
            old_mean, old_var = old[:channels], old[channels:2 * channels]
            spread = (n_old * num_positions / total**2) * (old_mean - mean)**2
            new_mean = merged(old_mean, mean)
            new_var = torch.where(finite, merged(old_var, var) + spread, old_var)
            self.pending_stats = torch.cat([
                new_mean, new_var, torch.addcmul(new_var, new_mean, new_mean), old[-1:]])
        if count_positions:
            self.pending_positions_tensor = torch.full_like(self.zero, float(total))

        if derivatives is not None and (first or self.pending_compensable):
            patch_mean, sqmean_grad, excess = derivatives
            if first:
                self._set_derivatives(patch_mean, sqmean_grad, excess, finite)
            else:
                old = self.pending_derivatives
                self._set_derivatives(
                    merged(old[:self._groups], patch_mean), merged(old[self._groups:], sqmean_grad),
                    None if excess is None else merged(self.pending_excess, excess))
        else:  # an entry is compensable only if every call in it was
            self.pending_compensable = False
        self.pending_positions = total
        self.pending_calls += 1

    def fill_derivatives(self, derivatives: Tuple[Tensor, Tensor, Optional[Tensor]],
                         finite: Tensor) -> None:
        """Adds derivatives to a pending entry recorded by a single call that could not compute them
        (e.g. the no-grad first pass of gradient checkpointing, before its recomputation)."""
        if not self.pending or self.pending_compensable or self.pending_calls != 1:
            return
        self._set_derivatives(*derivatives, finite)

    def _set_derivatives(self, patch_mean: Tensor, sqmean_grad: Tensor,
                         excess: Optional[Tensor], finite: Optional[Tensor] = None) -> None:
        """The pending entry's derivatives; with ``finite`` given, a non-finite batch's as zeros
        (the backward contracts over every slot, where a NaN would reach the conv's gradient)."""
        stacked = torch.cat([patch_mean, sqmean_grad])
        self._allocate_derivatives(stacked, patch_mean.shape[0])
        if excess is not None and self.excess is None:
            self.excess = torch.zeros_like(self.mean)
        if finite is not None:
            stacked = torch.where(finite, stacked, self.zero)
            excess = None if excess is None else torch.where(finite, excess, self.zero)
        self.pending_derivatives, self.pending_excess = stacked, excess
        self.pending_compensable = True
