"""The ring of one layer's entries from earlier iterations, kept on the layer's device."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .scratch_tensors import ScratchTensors
from .torch_features import is_compiling

# the per-entry flags after the three [C] fields of a row
_VALID, _COMPENSABLE, _POSITIONS = range(3)
_NUM_FLAGS = 3


class MomentWindow(ScratchTensors):
    """The entries of one layer's earlier iterations: a ring of ``capacity`` slots, and this
    iteration's entry (*pending*) beside it.

    Each entry is one row of floats (float32 or wider), written and read whole::

        mean [C] | var [C] | offset [C] | valid | compensable | positions
            | patch_mean [groups * K] | sqmean_grad [C * K]

    ``offset`` is what the compensation subtracts: the second moment ``var + mean^2`` plus the
    sampled derivative's excess (:func:`~mmcbn.layers.conv_moments.identity_excess`; 0 for an
    exact one). ``valid`` is 1 for an entry whose batch was finite (others are zeros and never
    used); ``compensable`` 1 for an entry recorded with derivatives; ``positions`` its number of
    positions (kept for synchronised CBN only). The derivative part, from
    :func:`~mmcbn.layers.conv_moments.moment_derivatives`, exists only in a ring that has held a
    compensable entry. So recording an entry is one concatenation and one masked write, committing
    it one copy into the ring, and every field of every slot (:attr:`mean`, :attr:`patch_mean`, ...)
    is a strided view that the batched products read as they are.

    The contract with autograd: the ring changes only when an iteration ends
    (:meth:`commit_pending` writes its entry into the oldest slot: after the optimizer step that
    moved the producer, else when the next iteration starts); within an iteration, every call
    reads the same ring and records into the pending row, a separate tensor. So the normalisation
    saves the ring's views for its backward like any input (``save_for_backward``), and a backward
    run after the iteration ended fails with torch's in-place error instead of reading another
    iteration's entries.

    Everything the arithmetic reads lives on the device, the slot written next included
    (``cursor``, a one-element count of the commits: the slot is the count modulo ``capacity``): a
    training step never copies host data to the device nor reads device data back, and no Python
    value that changes every step reaches a traced tensor op (what lets ``torch.compile`` trace a
    steady step once). The host keeps facts that are the same at every steady step: the committed
    entries' compensability, oldest first (``committed``), and the pending entry's calls and
    positions; and, outside traced code, the count of commits as well, so that the optimizer step
    commits every layer's entry in one ``foreach`` copy (:func:`commit_pending_entries`). An
    entry's age is not stored: the slots' order from the cursor gives it, and it is computed only
    while the ring holds entries older than the window (a window grown or shrunk by ``CBNHook``).

    Args:
        capacity: number of slots: the window size less the current iteration (0 for a window of
            1).
    """
    tensor_names = ('slots', 'cursor', 'slot_index', 'one', 'zero', 'flags', 'pending_row',
                    'stats_snapshot')

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        """Drops every entry and frees the storage."""
        self.slots: Optional[Tensor] = None  # [capacity, width]: one entry per row
        self.cursor: Optional[Tensor] = None  # [1] commits so far (long); modulo capacity: the slot
        self._host_commits: Optional[int] = None  # the same count on the host (None: unknown)
        self.slot_index: Optional[Tensor] = None  # [capacity] 0, 1, ... (long)
        self.one: Optional[Tensor] = None  # [1]: the current batch's weight in in_window
        self.zero: Optional[Tensor] = None  # []: where()'s fill
        self.flags: Optional[Tensor] = None  # [2, 3]: valid, compensable (0 / 1), positions
        self.pending_row: Optional[Tensor] = None  # this iteration's entry
        #: ``[capacity, 2C]`` every slot's mean | var before the last commit that was asked to keep
        #: them (what ``window_stats()`` reports of an iteration whose oldest slot was overwritten)
        self.stats_snapshot: Optional[Tensor] = None
        self._channels = 0
        self._groups = 0
        #: whether each committed entry is compensable, oldest first
        self.committed: List[bool] = []
        self.pending = False
        self.pending_calls = 0
        self.pending_positions = 0
        self.pending_compensable = False

    # ------------------------------------------------------------------ fields, as views
    def _column(self, index: int) -> Optional[Tensor]:
        if self.slots is None:
            return None
        return self.slots[:, 3 * self._channels + index]

    def _field(self, index: int) -> Optional[Tensor]:
        if self.slots is None:
            return None
        c = self._channels
        return self.slots[:, index * c:(index + 1) * c]

    @property
    def _stats_width(self) -> int:
        return 3 * self._channels + _NUM_FLAGS

    mean = property(lambda self: self._field(0), doc='``[capacity, C]`` each entry\'s mean')
    var = property(lambda self: self._field(1), doc='``[capacity, C]`` each entry\'s variance')
    offset = property(lambda self: self._field(2),
                      doc='``[capacity, C]`` each entry\'s second moment plus its excess')
    valid = property(lambda self: self._column(_VALID), doc='``[capacity]`` 1: a finite batch')
    compensable_mask = property(lambda self: self._column(_COMPENSABLE),
                                doc='``[capacity]`` 1: recorded with derivatives')
    positions = property(lambda self: self._column(_POSITIONS),
                         doc='``[capacity]`` positions behind each entry (synchronised CBN)')

    @property
    def excess(self) -> Optional[Tensor]:
        """``[capacity, C]`` each entry's excess (0 for an exact derivative; diagnostics)."""
        if self.slots is None:
            return None
        return self.offset - torch.addcmul(self.var, self.mean, self.mean)

    @property
    def has_derivatives(self) -> bool:
        return self.slots is not None and self.slots.shape[1] > self._stats_width

    @property
    def patch_mean(self) -> Optional[Tensor]:
        """``[groups, capacity, K]`` each entry's ``d mean / dW`` (a strided view)."""
        if not self.has_derivatives:
            return None
        g, sw = self._groups, self._stats_width
        k = (self.slots.shape[1] - sw) // (g + self._channels)
        return self.slots[:, sw:sw + g * k].view(self.capacity, g, k).transpose(0, 1)

    @property
    def sqmean_grad(self) -> Optional[Tensor]:
        """``[C, capacity, K]`` each entry's ``d sqmean / dW`` (a strided view)."""
        if not self.has_derivatives:
            return None
        g, sw, c = self._groups, self._stats_width, self._channels
        k = (self.slots.shape[1] - sw) // (g + c)
        return self.slots[:, sw + g * k:].view(self.capacity, c, k).transpose(0, 1)

    def __len__(self) -> int:
        """Number of entries held: the committed ones (at most ``capacity``) and this iteration's
        pending one."""
        return len(self.committed) + self.pending

    def recent(self, n: int) -> List[bool]:
        """Whether each of the ``n`` most recent committed entries is compensable, newest first."""
        return self.committed[::-1][:max(n, 0)]

    def recent_slots(self, n: int, cursor: Optional[Tensor] = None) -> Tensor:
        """The slots of the ``n`` most recent committed entries, newest first (a device tensor);
        ``cursor``: as it stood then (default: now)."""
        cursor = self.cursor if cursor is None else cursor
        steps = torch.arange(1, n + 1, device=cursor.device)
        return (cursor - steps).remainder_(self.capacity)

    def recorded_stats(self) -> Tensor:
        """``[capacity, 2C]`` every slot's mean and variance as recorded (a view)."""
        return self.slots[:, :2 * self._channels]

    def in_window(self, num_entries: int) -> Tensor:
        """``[1 + capacity]``: 1 for the current batch, then per slot 1 for the valid entries among
        the ``num_entries`` most recent, else 0."""
        use = self.valid
        if len(self.committed) > num_entries:  # the ring holds entries older than the window
            age = (self.cursor - 1 - self.slot_index).remainder(self.capacity) + 1
            use = use * (age <= num_entries)
        return torch.cat([self.one, use])

    # ------------------------------------------------------------------ the iteration's life
    def commit_pending(self) -> None:
        """Ends the iteration: the pending entry is written into the oldest slot (whose entry
        leaves the window)."""
        commit_pending_entries([self], [False])

    def _full_pending_row(self) -> Tensor:
        row = self.pending_row
        if self.slots.shape[1] > row.shape[0]:  # an entry without derivatives: zeros there
            row = torch.cat([row, row.new_zeros(self.slots.shape[1] - row.shape[0])])
        return row

    def _end_pending(self) -> None:
        self.committed.append(self.pending_compensable)
        if len(self.committed) > self.capacity:
            self.committed.pop(0)
        self.pending = False
        self.pending_row = None

    @staticmethod
    def _snapshot_stats_of(windows: List['MomentWindow']) -> None:
        """Copies each window's slots' mean | var into its :attr:`stats_snapshot` (one
        ``foreach`` copy for all)."""
        for w in windows:
            width = 2 * w._channels
            if w.stats_snapshot is None or w.stats_snapshot.shape[1] != width or \
                    w.stats_snapshot.device != w.slots.device:
                w.stats_snapshot = w.slots.new_empty(w.capacity, width)
        torch._foreach_copy_([w.stats_snapshot for w in windows],
                             [w.recorded_stats() for w in windows])

    def open_pending(self) -> None:
        """Starts this iteration's entry."""
        assert not self.pending and self.capacity > 0
        self.pending = True
        self.pending_calls = 0
        self.pending_positions = 0
        self.pending_compensable = False

    def _allocate(self, num_channels: int, device, dtype) -> None:
        if self.slots is None or self._channels != num_channels or self.slots.device != device:
            self._channels = num_channels
            self.slots = torch.zeros(self.capacity, 3 * num_channels + _NUM_FLAGS, device=device,
                                     dtype=dtype)
            self.cursor = torch.zeros(1, device=device, dtype=torch.long)
            self._host_commits = 0
            self.slot_index = torch.arange(self.capacity, device=device)
            self.one = torch.ones(1, device=device, dtype=dtype)
            self.zero = torch.zeros((), device=device, dtype=dtype)
            self.flags = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], device=device,
                                      dtype=dtype)

    def _fit(self, row: Tensor) -> None:
        """Room for ``row`` in the ring: the first compensable entry adds the derivatives' part
        (a new tensor: what this iteration's calls saved for backward stays as it was)."""
        if row.shape[0] > self.slots.shape[1]:
            slots = row.new_zeros(self.capacity, row.shape[0])
            slots[:, :self.slots.shape[1]] = self.slots
            self.slots = slots

    def _row(self, mean: Tensor, var: Tensor,
             derivatives: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]) -> Tensor:
        """One call's entry as a row (valid, ``compensable`` if ``derivatives``)."""
        offset = torch.addcmul(var, mean, mean)
        parts = [mean, var, offset, self.flags[int(derivatives is not None)]]
        if derivatives is not None:
            patch_mean, sqmean_grad, excess = derivatives
            if excess is not None:
                parts[2] = offset.add_(excess)
            self._groups = patch_mean.shape[0]
            parts += [patch_mean.reshape(-1), sqmean_grad.reshape(-1)]
        return torch.cat(parts)

    def record(self, mean: Tensor, var: Tensor, finite: Tensor, num_positions: int,
               derivatives: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]],
               count_positions: bool = False) -> None:
        """Makes one call's statistics the pending entry, merging with earlier calls in it.

        Merging weights each call by its number of positions, so the entry holds the statistics
        (and derivatives, which are also means over positions) of all positions seen this
        iteration. A non-finite first call is stored as zeros (not valid, never used; its zero
        derivatives keep a NaN out of the backward, which contracts over every slot); a
        non-finite later call leaves the entry as it was. ``count_positions``: keep the entry's
        number of positions on the device (synchronised CBN pools entries by it).
        """
        assert self.pending
        self._allocate(mean.shape[0], mean.device, mean.dtype)
        first = self.pending_calls == 0
        if not first and self.pending_compensable and derivatives is None:
            self.pending_compensable = False  # an entry is compensable only if every call was
            self.pending_row = self.pending_row[:self._stats_width].clone()
            self.pending_row[3 * self._channels + _COMPENSABLE] = 0.0
        if not first and not self.pending_compensable:
            derivatives = None
        row = self._row(mean, var, derivatives)
        self._fit(row)
        total = self.pending_positions + num_positions
        if first:
            self.pending_row = torch.where(finite, row, self.zero)
            self.pending_compensable = derivatives is not None
        else:
            old = self.pending_row
            c = self._channels
            merged = torch.lerp(old, row, num_positions / total)  # position-weighted means
            spread = (old[:c] - mean).square_().mul_(
                self.pending_positions * num_positions / total**2)
            merged[c:2 * c] += spread  # the variance about the merged mean
            merged[3 * c + _VALID] = old[3 * c + _VALID]  # valid only if the first call was
            self.pending_row = torch.where(finite, merged, old)
        if count_positions:
            self.pending_row[3 * self._channels + _POSITIONS] = float(total)
        self.pending_positions = total
        self.pending_calls += 1

    def fill_derivatives(self, derivatives: Tuple[Tensor, Tensor, Optional[Tensor]],
                         finite: Tensor) -> None:
        """Adds derivatives to a pending entry recorded by a single call that could not compute them
        (e.g. the no-grad first pass of gradient checkpointing, before its recomputation)."""
        if not self.pending or self.pending_compensable or self.pending_calls != 1:
            return
        c = self._channels
        stats = self.pending_row[:self._stats_width]
        mean, var = stats[:c], stats[c:2 * c]
        row = torch.where(finite, self._row(mean, var, derivatives), self.zero)
        row[3 * c + _POSITIONS] = stats[3 * c + _POSITIONS]
        self._fit(row)
        self.pending_row = row
        self.pending_compensable = True


def commit_pending_entries(windows: List[MomentWindow], snapshot: List[bool]) -> None:
    """Ends the iteration of every pending window in ``windows``.

    Where the host knows the slot written next (in eager code, unless a compiled forward
    committed an entry), all the pending entries go into their slots in one ``foreach`` copy and
    the cursors advance in one ``foreach`` add: after an optimizer step, a few kernels for the
    whole model instead of a few per layer. In traced code the slot comes from the device count
    (a Python count would be a new graph every step), one window at a time. ``snapshot``: per
    window, first keep its slots' mean | var in :attr:`~MomentWindow.stats_snapshot` (one more
    ``foreach`` copy for all of them).
    """
    pending = [(w, keep) for w, keep in zip(windows, snapshot) if w.pending]
    kept = [w for w, keep in pending if keep]
    if kept:
        MomentWindow._snapshot_stats_of(kept)
    on_host = [] if is_compiling() else [w for w, _ in pending if w._host_commits is not None]
    if on_host:
        torch._foreach_copy_([w.slots[w._host_commits % w.capacity] for w in on_host],
                             [w._full_pending_row() for w in on_host])
        for w, cursor in zip(on_host, torch._foreach_add([w.cursor for w in on_host], 1)):
            w.cursor = cursor  # a new tensor: the iteration's state keeps the old one
            w._host_commits += 1
            w._end_pending()
    for w, _ in pending:
        if w.pending:  # traced, or the host lost the count
            w.slots.index_copy_(0, w.cursor.remainder(w.capacity), w._full_pending_row()[None])
            w._host_commits = None
            w.cursor = w.cursor + 1
            w._end_pending()
