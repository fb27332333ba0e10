"""The ring of one layer's entries from earlier iterations, kept on the layer's device."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .scratch_tensors import ScratchTensors


class MomentWindow(ScratchTensors):
    """A fixed-size ring of per-iteration statistics, preallocated on first use.

    Each slot holds one iteration's per-channel ``mean`` and ``var`` (``[capacity, C]``, float32 or
    wider), its ``age`` (iterations since it was recorded: 0 while pending; infinite for a slot
    never written and for a batch whose statistics were not finite, stored as zeros and never used),
    its number of ``positions`` (kept for synchronised CBN only) and, for compensable entries
    (``compensable_mask`` 1), the derivatives
    from :func:`~mmcbn.layers.conv_moments.moment_derivatives`, stored channel-major
    (``patch_mean`` ``[groups, capacity, K]``, ``sqmean_grad`` ``[C, capacity, K]``) so that
    compensating every slot is one batched matrix product with no gather. The derivative buffers are
    only allocated for a layer that records a compensable entry.

    Everything the arithmetic reads lives on the device and is updated in place with Python scalars
    as kernel arguments: a training step never copies host data to the device nor reads device data
    back. The Python lists (``committed``, ``compensable``, ``num_calls``) are the host's own
    bookkeeping of the same facts, for decisions that need no tensor.

    At most one slot is *pending*: the current iteration's entry, which becomes part of the window
    (*committed*) when the next iteration starts. While pending it may be merged with further calls
    of the layer in the same iteration. The ring has one slot more than the window holds entries, so
    the pending slot is never one the current iteration reads (its backward still needs them).

    Args:
        capacity: number of slots (the window size, current batch included; 0 for a window of 1).
    """
    tensor_names = ('mean', 'var', 'compensable_mask', 'age', 'positions', 'zero', 'inf',
                    'patch_mean', 'sqmean_grad', 'excess', 'uses')

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        """Drops every entry and frees the storage."""
        self.mean: Optional[Tensor] = None
        self.var: Optional[Tensor] = None
        self.compensable_mask: Optional[Tensor] = None
        self.age: Optional[Tensor] = None
        self.positions: Optional[Tensor] = None
        self.zero: Optional[Tensor] = None
        self.inf: Optional[Tensor] = None
        self.patch_mean: Optional[Tensor] = None
        self.sqmean_grad: Optional[Tensor] = None
        self.excess: Optional[Tensor] = None  # [capacity, C], for sampled derivatives only
        self.uses: Optional[Tensor] = None  # [2, 1 + capacity], see in_window
        self._uses_row = 0
        self.num_positions: List[int] = [0] * self.capacity
        self.num_calls: List[int] = [0] * self.capacity
        self.compensable: List[bool] = [False] * self.capacity
        self.committed: List[int] = []  # slot indices, oldest first
        self.pending: Optional[int] = None

    def __len__(self) -> int:
        """Number of entries held: the committed ones (at most ``capacity - 1``) and this
        iteration's pending one."""
        return len(self.committed) + (self.pending is not None)

    def recent(self, n: int) -> List[int]:
        """The slots of the ``n`` most recent committed entries, newest first."""
        return self.committed[::-1][:max(n, 0)]

    def commit_pending(self) -> None:
        """Starts a new iteration: the pending entry joins the window, every entry ages by one."""
        if self.pending is not None:
            self.committed.append(self.pending)
            self.pending = None
            if len(self.committed) >= self.capacity:  # the window holds capacity - 1 entries
                self.committed.pop(0)
        if self.age is not None:
            self.age.add_(1.0)

    def open_pending(self) -> int:
        """Reserves a slot no committed entry holds for this iteration's entry."""
        assert self.pending is None and self.capacity > 0
        used = set(self.committed)
        slot = next(s for s in range(self.capacity) if s not in used)
        self.pending = slot
        self.num_calls[slot] = 0
        return slot

    def in_window(self, num_entries: int) -> Tensor:
        """``[1 + capacity]``: 1 for the current batch, then per slot 1 for the valid entries among
        the ``num_entries`` most recent, else 0. Written in place (one kernel) into one of two
        buffers that alternate between calls, so the previous iteration's backward can still read
        the tensor it was given."""
        self._uses_row ^= 1
        uses = self.uses[self._uses_row]
        torch.le(self.age, num_entries, out=uses[1:])
        return uses

    def _allocate(self, num_channels: int, device, dtype) -> None:
        if self.mean is None or self.mean.shape[1] != num_channels or self.mean.device != device:
            self.mean = torch.zeros(self.capacity, num_channels, device=device, dtype=dtype)
            self.var = torch.zeros_like(self.mean)
            self.compensable_mask = torch.zeros(self.capacity, device=device, dtype=dtype)
            self.positions = torch.zeros_like(self.compensable_mask)
            self.age = torch.full_like(self.compensable_mask, float('inf'))
            self.uses = torch.ones(2, self.capacity + 1, device=device, dtype=dtype)
            # where()'s fills for in-place writes
            self.zero = torch.zeros((), device=device, dtype=dtype)
            self.inf = torch.full((), float('inf'), device=device, dtype=dtype)

    def _allocate_derivatives(self, patch_mean: Tensor, sqmean_grad: Tensor) -> None:
        shape = (sqmean_grad.shape[0], self.capacity, sqmean_grad.shape[1])
        if self.sqmean_grad is None or self.sqmean_grad.shape != shape:
            self.patch_mean = patch_mean.new_zeros(
                (patch_mean.shape[0], self.capacity, patch_mean.shape[1]))
            self.sqmean_grad = sqmean_grad.new_zeros(shape)

    def record(self, mean: Tensor, var: Tensor, finite: Tensor, num_positions: int,
               derivatives: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]],
               count_positions: bool = False) -> None:
        """Writes one call's statistics into the pending slot, merging with earlier calls in it.

        Merging weights each call by its number of positions, so the slot holds the statistics (and
        derivatives, which are also means over positions) of all positions seen this iteration.
        A non-finite first call is stored as zeros marked invalid (infinite age, never used); a
        non-finite later call leaves the slot as it was. ``count_positions``: keep the slot's
        number of positions on the device (synchronised CBN pools entries by it).
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

        if first:
            torch.where(finite, self.zero, self.inf, out=self.age[slot])
            torch.where(finite, mean, self.zero, out=self.mean[slot])
            torch.where(finite, var, self.zero, out=self.var[slot])
        else:
            old_mean, old_var = self.mean[slot], self.var[slot]
            spread = (n_old * num_positions / total**2) * (old_mean - mean)**2
            self.mean[slot] = merged(old_mean, mean)
            self.var[slot] = torch.where(finite, merged(old_var, var) + spread, old_var)
        if count_positions:
            self.positions[slot].fill_(float(total))

        if derivatives is not None and (first or self.compensable[slot]):
            patch_mean, sqmean_grad, excess = derivatives
            if first:
                self._write_derivatives(slot, patch_mean, sqmean_grad, excess, finite)
            else:
                self._write_derivatives(
                    slot, merged(self.patch_mean[:, slot], patch_mean),
                    merged(self.sqmean_grad[:, slot], sqmean_grad),
                    None if excess is None else merged(self.excess[slot], excess))
        elif first or self.compensable[slot]:
            self.compensable[slot] = False
            self.compensable_mask[slot].fill_(0.0)
        self.num_positions[slot] = total
        self.num_calls[slot] += 1

    def fill_derivatives(self, derivatives: Tuple[Tensor, Tensor, Optional[Tensor]],
                         finite: Tensor) -> None:
        """Adds derivatives to a pending entry recorded by a single call that could not compute them
        (e.g. the no-grad first pass of gradient checkpointing, before its recomputation)."""
        slot = self.pending
        if slot is None or self.compensable[slot] or self.num_calls[slot] != 1:
            return
        self._write_derivatives(slot, *derivatives, finite)

    def _write_derivatives(self, slot: int, patch_mean: Tensor, sqmean_grad: Tensor,
                           excess: Optional[Tensor], finite: Optional[Tensor] = None) -> None:
        """Stores a slot's derivatives; with ``finite`` given, a non-finite batch's as zeros (the
        backward contracts over every slot, where a NaN would reach the conv's gradient)."""
        self._allocate_derivatives(patch_mean, sqmean_grad)
        if excess is not None and self.excess is None:
            self.excess = torch.zeros_like(self.mean)
        pairs = [(self.patch_mean[:, slot], patch_mean), (self.sqmean_grad[:, slot], sqmean_grad)]
        if excess is not None:
            pairs.append((self.excess[slot], excess))
        for stored, new in pairs:
            if finite is None:
                stored.copy_(new)
            else:
                torch.where(finite, new, self.zero, out=stored)
        if not self.compensable[slot]:
            self.compensable[slot] = True
            self.compensable_mask[slot].fill_(1.0)
