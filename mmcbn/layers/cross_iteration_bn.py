"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) as a drop-in BatchNorm2d."""
import contextlib
import random
import warnings
from typing import Dict, Optional, Tuple

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .binding import ConvBinding, ProducerLink
from .conv_moments import choose_position_sample, gathered_position_sample
from .distributed import is_distributed
from .iteration_state import batch_statistics, describe_window, start_iteration, window_average
from .normalize import NormalizeWithWindow
from .records import BatchStatistics, IterationState
from .optimizer_steps import follow_optimizer_steps, stop_following
from .running_stats import RunningDrift, move_running_stats, update_running_stats
from .torch_features import is_compiling
from .validation import (check_bool, check_choice, check_int, check_number,
                         check_process_group)
from .window import MomentWindow, commit_pending_entries

RUNNING_STATS_SOURCES = ('window', 'batch')


@MODELS.register_module('CBN')
class CrossIterationBatchNorm2d(_BatchNorm):
    """Cross-Iteration Batch Normalization for 4D (NCHW) input.

    In training, each channel is normalised with the mean and variance of the current batch pooled
    with those of up to ``window_size - 1`` earlier iterations. Each earlier entry is first moved to
    the current weights of the conv that produces this layer's input (first-order Taylor expansion,
    exact for the mean), clamped so that its second moment is at least its squared mean, then all
    entries are averaged::

        mean = avg_i mean_i,  var = avg_i (var_i + mean_i^2) - mean^2

    A compensated entry is a function of the conv's current weights; with ``window_grad`` the
    backward follows it there (past iterations still get no gradient), without it the entries are
    constants, as in the paper. With an effective window
    of 1 the layer is exactly ``nn.BatchNorm2d``; in eval mode it is a BatchNorm with running
    statistics, so a CBN checkpoint loads into a BN model and inference costs the same.

    The state dict holds exactly ``nn.BatchNorm2d``'s keys; the window is scratch state, kept in
    float32 (or wider) on the layer's device and never saved.

    The producing conv is bound by :meth:`bind` (the converters, ``CBNHook``) or read off the autograd
    graph; a layer fed by anything else runs the uncompensated window and warns once. All calls
    with the same :attr:`iteration` (set by ``CBNHook``; None: each call is one) are one iteration,
    whose entry joins the window when an optimizer step moves the conv (else at the next
    iteration); a call after that step starts a new entry. Details: docs/how_it_works.md.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance. Default: 1e-5.
        momentum: running-statistics momentum, or None for a cumulative average. Default: 0.1.
        affine: learn a per-channel weight and bias. Default: True.
        track_running_stats: keep running statistics for eval. Default: True.
        window_size: the largest window, in iterations, the current one included (1 = BN).
            Default: 4.
        compensation: compensate earlier entries for the weight change; False gives naive CBN (the
            ablation baseline). Default: True.
        window_grad: pass the gradient through the compensated entries to the bound conv's current
            weight and bias (beyond the paper, which treats them as constants; measured to train
            stably at windows 8-16 and without burn-in, docs/evidence.md). Default: True.
        derivative_positions: estimate ``d E[y^2]/dW`` from at most about this many output
            positions (an unbiased grid over every image with a random offset from the layer's
            own generator, seeded from ``torch.initial_seed()``; under ``torch.compile`` the offset
            cycles through every grid in turn, on the device); smaller maps and None stay exact.
            The default keeps a compensated entry's variance error within about 5% of the exact
            derivative's (measured: 128 positions +41%, 256 +24%, 512 +5%, 1152 +0%;
            docs/evidence.md). Default: 512.
        running_stats_source: update the running statistics from the current ``'batch'`` (as BN)
            or from the ``'window'`` estimate. Default: ``'batch'``.
        sync: synchronised CBN: under torch.distributed, pool the batch's and every entry's
            statistics over ``process_group`` (default: the world); each process stores only its
            own entries. Default: False.
        process_group: the group to synchronise over.
        compensate_running_stats: keep ``running_mean``/``running_var`` at the bound conv's
            current weights (:mod:`~mmcbn.layers.running_stats`; the mean exactly, the variance
            to first order), written after every optimizer step, so that every reader of the
            buffers sees what eval uses at any moment. Needs ``running_stats_source='batch'``.
            Default (None): ``compensation and running_stats_source == 'batch'``.
    """
    _abbr_ = 'bn'

    def __init__(self,
                 num_features: int,
                 eps: float = 1e-5,
                 momentum: Optional[float] = 0.1,
                 affine: bool = True,
                 track_running_stats: bool = True,
                 window_size: int = 4,
                 compensation: bool = True,
                 running_stats_source: str = 'batch',
                 sync: bool = False,
                 process_group=None,
                 compensate_running_stats: Optional[bool] = None,
                 window_grad: bool = True,
                 derivative_positions: Optional[int] = 512,
                 device=None,
                 dtype=None) -> None:
        check_int('num_features', num_features, 1)
        check_number('eps', eps, positive=True)
        if momentum is not None:
            check_number('momentum', momentum)
            if not 0.0 <= momentum <= 1.0:
                raise ValueError(f'momentum must be None or in [0, 1], got {momentum}')
        for name, value in (('affine', affine), ('track_running_stats', track_running_stats),
                            ('compensation', compensation), ('sync', sync),
                            ('window_grad', window_grad),
                            ('compensate_running_stats', compensate_running_stats)):
            check_bool(name, value, allow_none=name == 'compensate_running_stats')
        check_int('window_size', window_size, 1)
        check_process_group('process_group', process_group)
        check_int('derivative_positions', derivative_positions, 1, allow_none=True)
        check_choice('running_stats_source', running_stats_source, RUNNING_STATS_SOURCES)
        if compensate_running_stats is None:  # naive CBN (the ablation) computes no derivatives
            compensate_running_stats = compensation and running_stats_source == 'batch'
        if compensate_running_stats and running_stats_source != 'batch':
            raise ValueError("compensate_running_stats=True needs running_stats_source='batch' "
                             f'(got {running_stats_source!r}): the window estimate has no '
                             'per-batch derivative to compensate with')
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.window_size = window_size
        self.compensation = compensation
        self.running_stats_source = running_stats_source
        self.sync = sync
        self.process_group = process_group
        self.compensate_running_stats = compensate_running_stats
        self.window_grad = window_grad
        self.derivative_positions = derivative_positions
        self._position_rng: Optional[random.Random] = None
        self._sample_counter = torch.zeros((), dtype=torch.long, device=device)  # compiled steps
        self._drift = RunningDrift()
        self._producer_versions: Optional[Tuple[int, int]] = None  # as the last step left them
        self._pending_wants_derivatives = False  # the pending entry's calls were compensable
        self._effective_window = window_size
        self._iteration: Optional[int] = None
        self._counts_iterations = False
        self._new_iteration = True  # the next training call starts an iteration
        #: The layer's name in its model, for logs and warnings (set by the binders).
        self.layer_name: str = ''
        self._window = MomentWindow(window_size - 1)
        self._link = ProducerLink()
        self._state: Optional[IterationState] = None
        self._warned: set = set()
        #: The mean the last training call normalised with (the window's average).
        self.last_mean: Optional[Tensor] = None
        self._last_var_eps: Optional[Tensor] = None

    # ------------------------------------------------------------------ configuration
    @property
    def effective_window(self) -> int:
        """The window used now, the current iteration included (1 during burn-in)."""
        return self._effective_window

    @effective_window.setter
    def effective_window(self, value: int) -> None:
        check_int('effective_window', value, 1)
        if value > self.window_size:
            raise ValueError(f'effective_window must be in [1, window_size={self.window_size}], '
                             f'got {value}')
        self._effective_window = value

    @property
    def last_var(self) -> Optional[Tensor]:
        """The variance the last training call normalised with (the window's average)."""
        return None if self._last_var_eps is None else self._last_var_eps - self.eps

    @property
    def iteration(self) -> Optional[int]:
        """The current training iteration, set by ``CBNHook`` (or by a training loop) before each
        step; None: each training call is an iteration. Setting a new value is what starts an
        iteration, on the host and outside the forward, so that a compiled forward never sees a
        number that changes every step."""
        return self._iteration

    @iteration.setter
    def iteration(self, value: Optional[int]) -> None:
        if value != self._iteration:
            self._new_iteration = True
        self._iteration = value
        # what the forward reads: a flag, the same at every step (a compiled forward is guarded
        # on each Python value it reads; an iteration number would recompile it every step)
        self._counts_iterations = value is not None

    @property
    def window(self) -> MomentWindow:
        """The layer's window: the ring of earlier iterations' entries and this iteration's
        pending one (scratch state; read it, do not change it)."""
        return self._window

    @property
    def running_drift(self) -> RunningDrift:
        """The EMAs of the derivatives that keep the running statistics at the conv's current
        weights (scratch state; read it, do not change it)."""
        return self._drift

    @property
    def binding(self) -> Optional[ConvBinding]:
        """The conv this layer is compensated against, or None."""
        return self._link.binding

    @property
    def unbound_reason(self) -> Optional[str]:
        """Why the layer cannot be compensated, once known; None if bound or not yet tried."""
        return self._link.unbound_reason

    def bind(self, conv: nn.Conv2d, name: str = '') -> None:
        """Compensates this layer against ``conv``, whose output must be this layer's input.

        Raises:
            TypeError: if ``conv`` is not a plain ``nn.Conv2d`` (e.g. deformable or weight-
                standardised), whose output moments are not linear in its weight parameter.
        """
        self._link.bind(conv, name, self._capture_conv_io)
        self._drift.clear()
        self._producer_versions = None
        self._follow_optimizer_steps()

    def unbind(self, reason: Optional[str] = None) -> None:
        """Removes the binding; ``reason`` marks the layer as not compensable (with a warning)."""
        self._link.unbind(reason)
        self._drift.clear()
        stop_following(self)

    def _capture_conv_io(self, conv: nn.Module, args: tuple, output: Tensor) -> None:
        if self.training:
            self._link.capture(args[0], output)

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Resets the running statistics and clears the window."""
        super().reset_running_stats()
        if hasattr(self, '_window'):
            self.reset_window()
        if hasattr(self, '_drift'):
            self._drift.clear()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the loaded statistics are valid at the loaded weights: nothing left to compensate
        self._drift.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @contextlib.contextmanager
    def as_batchnorm(self):
        """Within the block the layer is a BatchNorm2d: training forwards normalise with their
        batch alone and record nothing, nothing is synchronised, and the running statistics are
        not compensated (their tracked derivatives are kept for afterwards). Restores the
        layer's settings on exit. For code that wants BN's behaviour for a while (precise
        re-estimation, diagnostics)."""
        saved = self._effective_window, self.sync, self.compensate_running_stats
        self._effective_window, self.sync, self.compensate_running_stats = 1, False, False
        try:
            yield self
        finally:
            self._effective_window, self.sync, self.compensate_running_stats = saved

    def reset_window(self) -> None:
        """Drops every stored entry (e.g. after a jump in the weights)."""
        self._window.clear()
        self._state = None

    def window_stats(self) -> Dict[str, Tensor]:
        """The window as used in the last training forward, detached, newest entry first.

        Returns:
            ``mean``/``var`` (``[E, C]``, compensated to the weights of that forward), ``raw_mean``/
            ``raw_var`` (as recorded), ``valid`` (``[E]``), ``compensated`` (``[E]`` bool: moved to
            the current weights) and ``age`` (iterations back, ``[E]``).
        """
        return describe_window(self._state, self._window, self.num_features)

    def window_nbytes(self) -> int:
        """Bytes held by the window (scratch state, not in the state dict)."""
        return self._window.nbytes()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # scratch state stays float32 or wider: a dtype change drops it, a device change moves it
        reference = self.running_mean if self.running_mean is not None else self.weight
        if reference is not None:
            self._sample_counter = self._sample_counter.to(reference.device)
            dtype = torch.promote_types(reference.dtype, torch.float32)
            self._window.follow(reference.device, dtype)
            self._drift.follow(reference.device, dtype)
        self._state = None
        return self

    def __getstate__(self):
        # tensors of the current iteration (possibly in an autograd graph) are not state
        state = self.__dict__.copy()
        state['_state'] = None
        return state

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, window_size={self.window_size}, '
                f'compensation={self.compensation}' + (', sync=True' if self.sync else '') +
                ('' if self.window_grad else ', window_grad=False') +
                (f', derivative_positions={self.derivative_positions}'
                 if self.derivative_positions is not None else '') +
                ('' if self.compensate_running_stats else ', compensate_running_stats=False'))

    # ------------------------------------------------------------------ running statistics
    @torch.no_grad()
    def export_running_stats(self) -> None:
        """Moves ``running_mean``/``running_var`` to the bound conv's current weights.

        Happens by itself after every optimizer step and at the start of every training forward
        whenever the conv's parameters changed in place; call it after changing them in a way
        their version counter does not see (e.g. writing ``weight.data``). Idempotent; does
        nothing when nothing is tracked (compensation off, no binding, a frozen conv).
        """
        self._export(only_if_moved=False)

    def _export(self, only_if_moved: bool = True) -> None:
        move = self._running_stats_move(only_if_moved)
        move_running_stats([move] if move is not None else [])

    def _running_stats_move(self, only_if_moved: bool = True) -> Optional[tuple]:
        """What :func:`~mmcbn.layers.running_stats.move_running_stats` needs to move this layer's
        running statistics to the conv's current weights, or None if there is nothing to move."""
        binding = self.binding
        if not self._tracks_drift() or binding is None or self._drift.empty or (
                only_if_moved and not self._drift.stale(binding.weight, binding.bias)):
            return None
        return (*self._drift.moved_terms(binding.weight, binding.bias), self.running_mean,
                self.running_var)

    @torch.no_grad()
    def set_running_stats(self, mean: Tensor, var: Tensor) -> None:
        """Sets the running statistics to values valid at the current weights (e.g. re-estimated
        over many batches), keeping the tracked derivatives for later weight changes."""
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        binding = self.binding
        if not self._drift.empty and binding is not None:
            self._drift.rebase(binding.weight, binding.bias)

    def running_stats_nbytes(self) -> int:
        """Bytes held for the compensated running statistics (scratch state, not saved)."""
        return self._drift.nbytes()

    @torch.no_grad()
    def _update_running_stats(self, batch: BatchStatistics, state: Optional[IterationState],
                              derivatives: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]
                              ) -> None:
        """BN's update from this call (from the window's estimate with
        ``running_stats_source='window'``), and the tracked derivatives' with it."""
        self.num_batches_tracked.add_(1)
        # with momentum=None (a cumulative average) the factor stays on the device: torch's BN
        # reads the counter back to the host here, a stall per layer and step on a GPU
        factor = self.momentum if self.momentum is not None else \
            self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()
        positions = batch.total if batch.total is not None else batch.num_positions
        if self.running_stats_source == 'window':
            k = 1.0 if state is None or state.mean is None else state.num_entries
            update_running_stats(self.running_mean, self.running_var, self.last_mean,
                                 self.last_var, k * positions, factor, batch.finite)
            return
        running = (self.running_mean, self.running_var, batch.pooled_mean, batch.pooled_var,
                   positions)
        if not (self._tracks_drift() and derivatives is not None):
            update_running_stats(*running, factor, batch.finite)
            return
        binding = self.binding
        self._drift.update(*derivatives, batch.mean, batch.var, binding.weight, binding.bias,
                           batch.num_positions, factor, batch.finite, running=running)

    def _tracks_drift(self) -> bool:
        return self.compensate_running_stats and self.running_mean is not None

    # ------------------------------------------------------------------ optimizer steps
    def _follow_optimizer_steps(self) -> None:
        if self._producer_versions is None:
            self._producer_versions = self.binding.versions()
        follow_optimizer_steps(self)

    @classmethod
    def after_optimizer_step(cls, layers) -> None:
        """Called with every following layer after every optimizer step
        (:mod:`~mmcbn.layers.optimizer_steps`). Moves the running statistics of each layer whose
        conv changed to the new weights; each whose conv the step moved ends its iteration: the
        pending entry joins the ring now rather than at the next forward (between steps the window
        then holds only the entries in use; a later forward starts a new entry). A few ``foreach``
        kernels for all the layers together, beside two small products per layer."""
        moves = (layer._running_stats_move() for layer in layers)
        move_running_stats([move for move in moves if move is not None])
        ending = [layer for layer in layers if layer._step_ends_iteration()]
        # the commit overwrites the oldest slot: keep what window_stats() reports of it
        snapshot = [layer._reports_full_ring() for layer in ending]
        for layer in ending:
            layer._warn_if_underived()
        commit_pending_entries([layer._window for layer in ending], snapshot)
        for layer, kept in zip(ending, snapshot):
            if kept:
                layer._state.recorded = layer._window.stats_snapshot
            layer._new_iteration = True

    def _step_ends_iteration(self) -> bool:
        """Whether the optimizer step that just ran moved the bound conv (version counters: host
        reads only) while an entry is pending; another model's step (a GAN's discriminator), or
        one that moved nothing, leaves the iteration as it is."""
        binding = self.binding
        if binding is None:
            return False
        versions = binding.versions()
        if versions == self._producer_versions:
            return False
        self._producer_versions = versions
        return self._window.pending

    def _reports_full_ring(self) -> bool:
        """Whether ``window_stats()`` reports a ring whose every slot the last forward used."""
        state, window = self._state, self._window
        return state is not None and state.mean is not None and state.recorded is None and \
            len(window.committed) == window.capacity

    def _commit_pending(self) -> None:
        """Ends the iteration: the pending entry joins the ring."""
        self._warn_if_underived()
        self._window.commit_pending()

    def _warn_if_underived(self) -> None:
        """Says once if the pending entry was to be compensated but its derivatives could not be
        computed."""
        window, binding = self._window, self.binding
        if not is_compiling() and window.pending and self._pending_wants_derivatives and \
                not window.pending_compensable and binding is not None and binding.trainable:
            self._warn_once('underived', (
                f'is bound to {binding.name} but could not read its input, so its entries are '
                'not compensated (bound from the autograd graph while a saved-tensor hook, such '
                "as torch.autograd.graph.save_on_cpu, held the conv's input); bind it "
                'structurally (convert_bn_to_cbn, bind_cbn_layers, CBNHook) or with '
                'layer.bind(conv)'))

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f'{type(self).__name__} expects 4D input (N, C, H, W), got shape '
                             f'{tuple(input.shape)}')
        if input.shape[1] != self.num_features:
            raise ValueError(f'{type(self).__name__}({self.num_features}) got input with '
                             f'{input.shape[1]} channels (shape {tuple(input.shape)})')

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.training and not is_compiling():
            self._export()  # the weights changed without an optimizer step (version counters)
        # a window of 1 (burn-in) takes the same path, so that a non-finite batch enters neither
        # the running statistics nor their compensation there either
        if self.training and (self._effective_window > 1 or self._sync_now() or
                              self.track_running_stats):
            return self._forward_training(input)
        self._link.captured = None
        return super().forward(input)

    def _forward_training(self, input: Tensor) -> Tensor:
        """One training call: the batch's statistics, this iteration's window at the current
        weights (once per iteration), the normalisation, the record of the batch's entry and the
        running statistics' update."""
        if not self._counts_iterations and self._effective_window > 1:
            _warn_no_iteration_source()
        # the call's plan, from host facts only (no tensor is read)
        sync = self._sync_now()
        tracks_drift = self._tracks_drift()
        compensable, conv_input = self._link.resolve(input, self.compensation or tracks_drift,
                                                     self._warn_once)
        if compensable and not is_compiling():  # bind() registers; a copied layer joins here
            self._follow_optimizer_steps()
        compensate = compensable and self.compensation
        windowed = self._effective_window > 1
        recompute = windowed and self._recomputes()  # gradient checkpointing's second pass
        record = windowed and not recompute
        derivable = compensable and conv_input is not None and self.binding.trainable
        derive = derivable and (
            (compensate and (record or (recompute and self._window.pending and
                                        not self._window.pending_compensable)))
            or (tracks_drift and not recompute))

        # statistics in float32 or wider: autocast would run the window's products in half
        with torch.autocast(input.device.type, enabled=False):
            batch = batch_statistics(input, self.process_group, sync)
            state = self._iteration_state(compensate, sync, start=not recompute) \
                if windowed else None
            with torch.no_grad():
                mean_bar, var_eps, inv_k = (
                    (batch.pooled_mean, batch.pooled_var, None) if state is None else
                    window_average(state, batch.pooled_mean, batch.pooled_var, self.eps))
                if inv_k is None:  # the batch alone: BN's statistics
                    var_eps = var_eps + self.eps
        if batch.num_positions == 1 and inv_k is None and not sync:
            raise ValueError(f'Expected more than 1 value per channel when training, got input '
                             f'size {tuple(input.shape)}')
        terms = state.grad_terms if compensate and state is not None else None
        binding = self.binding if terms is not None else None
        out = NormalizeWithWindow.apply(
            input, self.weight, self.bias, None if binding is None else binding.weight,
            None if binding is None else binding.bias, mean_bar, var_eps, inv_k,
            batch.total, self.process_group if sync else None, terms)
        self.last_mean, self._last_var_eps = mean_bar, var_eps

        derivatives = self._derivatives(conv_input, input, batch) if derive else None
        if recompute:  # the entry was recorded by the first pass; its derivatives may not be
            if derivatives is not None:
                self._window.fill_derivatives(derivatives, batch.finite)
            return out
        if record:
            if not self._window.pending:
                self._window.open_pending()
            self._pending_wants_derivatives = compensate
            self._window.record(batch.mean, batch.var, batch.finite, batch.num_positions,
                                derivatives if compensate else None, count_positions=self.sync)
        if self.track_running_stats:
            self._update_running_stats(batch, state, derivatives)
        return out

    def _recomputes(self) -> bool:
        """Whether this call recomputes one this iteration already made: a call from inside a
        backward pass (gradient checkpointing), known on the host (comparing statistics would
        sync); without ``iteration``, only if the conv's weight did not change in place since."""
        state = self._state
        return (state is not None and not self._new_iteration and not is_compiling() and
                torch._C._current_graph_task_id() != -1 and
                (self._counts_iterations or state.weight_version in (None, self._weight_version())))

    def _iteration_state(self, compensate: bool, sync: bool, start: bool) -> IterationState:
        """This iteration's window at the current weights; computed by the iteration's first call
        (``start``: not a recomputation), reused by the others."""
        state = self._state
        if start and (state is None or self._new_iteration or not self._counts_iterations):
            window = self._window
            compiling = is_compiling()
            self._commit_pending()
            state = self._state = start_iteration(
                window, window.recent(self._effective_window - 1),
                self.binding if compensate else None, self.window_grad,
                self.process_group if sync else None, sync)
            if not compiling:
                state.weight_version = self._weight_version()
            self._new_iteration = False
        return state

    def _derivatives(self, conv_input: Tensor, output: Tensor,
                     batch: Optional[BatchStatistics]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The derivatives for an entry (``batch`` given) or for the running statistics."""
        sample = None
        if self.derivative_positions is not None and is_compiling():
            # a compiled step cycles through the grid's offsets with a device counter: a new
            # Python offset every step would be a new graph every step
            self._sample_counter.add_(1)
            sample = gathered_position_sample(tuple(output.shape), self.derivative_positions,
                                              self._sample_counter)
        elif self.derivative_positions is not None:
            if self._position_rng is None:
                self._position_rng = random.Random(
                    f'{torch.initial_seed()}/{self.layer_name}/{self.num_features}')
            sample = choose_position_sample(tuple(output.shape), self.derivative_positions,
                                            self._position_rng)
        return self.binding.derivatives(conv_input, output, sample,
                                        None if batch is None else (batch.mean, batch.var))

    def _sync_now(self) -> bool:
        return self.sync and self.training and is_distributed(self.process_group)

    def _weight_version(self) -> Optional[int]:
        binding = self.binding
        return None if binding is None else binding.weight._version

    def _display_name(self) -> str:
        return repr(self.layer_name) if self.layer_name else f'CBN({self.num_features})'

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f'mmcbn: CBN layer {self._display_name()} {message}', stacklevel=4)


CBN = CrossIterationBatchNorm2d

_no_iteration_warned = False


def _warn_no_iteration_source() -> None:
    global _no_iteration_warned
    if not _no_iteration_warned:
        _no_iteration_warned = True
        warnings.warn(
            'mmcbn: CBN layers are training without CBNHook: the full window is used from the '
            'first iteration (no burn-in) and each call counts as an iteration. In mmengine/mmdet '
            "add custom_hooks=[dict(type='CBNHook', burnin_epochs=...)]; in plain PyTorch set "
            '`layer.iteration` each step to silence this.', stacklevel=3)
