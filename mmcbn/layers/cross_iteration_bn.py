"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) as a drop-in BatchNorm2d."""
import contextlib
import random
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from mmengine.registry import MODELS
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .binding import (ConvBinding, binding_for, binding_from_graph, conv_input_from_graph,
                      input_contradicts_binding)
from .conv_moments import (choose_position_sample, identity_excess, moment_derivatives,
                           output_moments)
from .distributed import is_distributed, pool_moments
from .iteration_state import IterationState, start_iteration, window_average
from .normalize import NormalizeWithWindow
from .running_drift import RunningDrift, follow_optimizer_steps
from ..utils.validation import check_int, check_number
from .window import MomentWindow

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

    The producing conv is found by :meth:`bind` (called by the converters and by ``CBNHook`` from the
    module structure) or, for a layer nobody bound, from the autograd graph on its first training
    forward. A layer whose input does not come straight from a plain conv runs the uncompensated
    window (as ``compensation=False``) and warns once.

    Iteration boundaries: entries recorded in one iteration join the window at the next one. When
    :attr:`iteration` is set (``CBNHook`` sets it from ``runner.iter``), all calls with the same value
    are one iteration: each normalises with its own batch plus the same window, and their statistics
    are merged into one entry (weighted by size). When it is None, each call is its own iteration.
    In both cases a call whose batch statistics equal an earlier call's of the same iteration (the
    recomputation done by gradient checkpointing) reuses the window and records nothing.

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
            weight and bias (beyond the paper, which treats them as constants: measured to train
            stably at windows 8-16 and without burn-in where the constants do not; see
            docs/evidence.md). Costs one small batched product per layer in the backward and one
            more window slot. Default: True.
        derivative_positions: estimate ``d E[y^2]/dW`` (the compensation's weight-gradient GEMM)
            from about this many output positions, a strided grid with a random offset (unbiased;
            the mean's derivative stays exact; drawn from the layer's own generator, seeded from
            ``torch.initial_seed()``, so runs repeat under a seed and the global RNG is untouched).
            Maps with fewer positions stay exact; None: always exact. Default: None.
        running_stats_source: ``'batch'`` updates the running statistics from the current batch
            alone, as BN does; ``'window'`` from the window estimate. ``'batch'`` measured as good or
            better at batch 2 (``tools/compare_running_stats.py``, see the README). Default:
            ``'batch'``.
        sync: synchronised CBN: under torch.distributed, pool the current batch's and every window
            entry's statistics over the processes of ``process_group`` (as SyncBatchNorm does for
            the batch; each process still stores only its own entries). Default: False.
        process_group: the group to synchronise over (default: the world).
        compensate_running_stats: evaluate the running statistics at the bound conv's current
            weights (:mod:`~mmcbn.layers.running_drift`): the EMA of the batch means is moved
            exactly, that of the variances to first order, with the derivatives CBN computes
            anyway (computed during burn-in too, and for ``window_size=1``). The values are
            written into ``running_mean``/``running_var`` after every optimizer step, so every
            reader of the buffers (eval, a checkpoint, a converter, an EMA of the model) sees
            what eval uses, at any moment. Needs ``running_stats_source='batch'``; a layer that cannot be bound keeps
            the plain EMA. Under DDP each process compensates with its own batches' derivatives.
            Default (None): True with ``compensation=True`` and ``running_stats_source='batch'``,
            else False (naive CBN, the ablation, then costs no derivative work at all).
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
                 derivative_positions: Optional[int] = None,
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
                            ('window_grad', window_grad)):
            if not isinstance(value, bool):
                raise TypeError(f'{name} must be True or False, got {value!r}')
        check_int('window_size', window_size, 1)
        if derivative_positions is not None:
            check_int('derivative_positions', derivative_positions, 1)
        if running_stats_source not in RUNNING_STATS_SOURCES:
            raise ValueError(f'running_stats_source must be one of {RUNNING_STATS_SOURCES}, '
                             f'got {running_stats_source!r}')
        if compensate_running_stats is None:  # naive CBN (the ablation) computes no derivatives
            compensate_running_stats = compensation and running_stats_source == 'batch'
        if not isinstance(compensate_running_stats, bool):
            raise TypeError('compensate_running_stats must be None, True or False, got '
                            f'{compensate_running_stats!r}')
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
        self._drift = RunningDrift()
        self._effective_window = window_size
        #: The current training iteration, set by ``CBNHook``; None: each call is an iteration.
        self.iteration: Optional[int] = None
        #: The layer's name in its model, for logs and warnings (set by the binders).
        self.layer_name: str = ''
        # one slot more than the entries in use: this iteration's record never overwrites an entry
        # the iteration reads (its backward still needs them)
        self._window = MomentWindow(window_size if window_size > 1 else 0)
        self._bindings: List[ConvBinding] = []  # at most one; a list keeps it out of nn.Module's tree
        self._unbound_reason: Optional[str] = None
        self._captured: Optional[Tuple[Tensor, 'weakref.ref[Tensor]']] = None
        self._state: Optional[IterationState] = None
        self._warned: set = set()
        self.last_mean: Optional[Tensor] = None
        self.last_var: Optional[Tensor] = None

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
    def binding(self) -> Optional[ConvBinding]:
        """The conv this layer is compensated against, or None."""
        return self._bindings[0] if self._bindings else None

    @property
    def unbound_reason(self) -> Optional[str]:
        """Why the layer cannot be compensated, once known; None if bound or not yet tried."""
        return self._unbound_reason

    def bind(self, conv: nn.Conv2d, name: str = '') -> None:
        """Compensates this layer against ``conv``, whose output must be this layer's input.

        Raises:
            TypeError: if ``conv`` is not a plain ``nn.Conv2d`` (e.g. deformable or weight-
                standardised), whose output moments are not linear in its weight parameter.
        """
        binding = binding_for(conv, name)
        self.unbind()
        binding.hook = conv.register_forward_hook(self._capture_conv_io)
        self._bindings.append(binding)

    def unbind(self, reason: Optional[str] = None) -> None:
        """Removes the binding; ``reason`` marks the layer as not compensable (with a warning)."""
        for binding in self._bindings:
            if binding.hook is not None:
                binding.hook.remove()
        self._bindings.clear()
        self._captured = None
        self._unbound_reason = reason
        if hasattr(self, '_drift'):
            self._drift.clear()

    def _capture_conv_io(self, conv: nn.Module, args: tuple, output: Tensor) -> None:
        if self.training:
            self._captured = (args[0], weakref.ref(output))

    # ------------------------------------------------------------------ state
    def reset_running_stats(self) -> None:
        """Resets the running statistics and clears the window."""
        super().reset_running_stats()
        if hasattr(self, '_window'):
            self.reset_window()
        if hasattr(self, '_drift'):
            self._drift.clear()

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
        binding = self.binding
        if not self._tracks_drift() or binding is None or self._drift.empty or (
                only_if_moved and not self._drift.stale(binding.weight, binding.bias)):
            return
        self._drift.export_into(self.running_mean, self.running_var, binding.weight, binding.bias)

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
            ``raw_var`` (as recorded), ``valid`` (``[E]``) and ``age`` (iterations back, ``[E]``).
        """
        state = self._state
        if state is None or state.mean is None or not state.slots:
            empty = torch.zeros(0, self.num_features)
            return dict(mean=empty, var=empty, raw_mean=empty, raw_var=empty,
                        valid=torch.zeros(0), age=torch.zeros(0, dtype=torch.long))
        window = self._window
        idx = torch.tensor(state.slots, device=state.mean.device)
        return dict(mean=state.mean[idx].clone(), var=state.var[idx].clone(),
                    raw_mean=window.mean[idx].clone(), raw_var=window.var[idx].clone(),
                    valid=(state.weights[1:][idx] > 0).to(state.mean.dtype),
                    age=torch.arange(1, len(state.slots) + 1))

    def window_nbytes(self) -> int:
        """Bytes held by the window (scratch state, not in the state dict)."""
        return self._window.nbytes()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # scratch state stays float32 or wider: a dtype change drops it, a device change moves it
        if self.running_mean is not None:
            stats_dtype, device = torch.promote_types(self.running_mean.dtype,
                                                      torch.float32), self.running_mean.device
        else:
            stats_dtype, device = torch.float32, self.weight.device
        if self._window.mean is not None:
            if self._window.mean.dtype != stats_dtype:
                self.reset_window()
            else:
                self._window.to_(device)
                self._state = None
        if not self._drift.empty:
            if self._drift.var_grad.dtype != stats_dtype:
                self._drift.clear()
            else:
                self._drift.to_(device)
        return self

    def __getstate__(self):
        # tensors of the current iteration (possibly in an autograd graph) are not state
        state = self.__dict__.copy()
        state['_captured'] = None
        state['_state'] = None
        return state

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, window_size={self.window_size}, '
                f'compensation={self.compensation}' + (', sync=True' if self.sync else '') +
                ('' if self.window_grad else ', window_grad=False') +
                (f', derivative_positions={self.derivative_positions}'
                 if self.derivative_positions is not None else '') +
                ('' if self.compensate_running_stats else ', compensate_running_stats=False'))

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
        if self.training:
            self._export()  # the weights changed without an optimizer step
        # a window of 1 (burn-in) takes the same path, so that a non-finite batch enters neither
        # the running statistics nor their compensation there either
        if self.training and (self._effective_window > 1 or self._sync_now() or
                              self.track_running_stats):
            return self._forward_window(input)
        self._captured = None
        return super().forward(input)

    def _tracks_drift(self) -> bool:
        return self.compensate_running_stats and self.running_mean is not None

    def _drift_derivatives(self, usable: bool, conv_input: Optional[Tensor], output: Tensor,
                           moments: Optional[Tuple[Tensor, Tensor]] = None
                           ) -> Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]:
        if usable and conv_input is not None and self.binding.trainable:
            return self._derivatives(conv_input, output, moments)
        return None

    def _ema_factor(self) -> float:
        """The running statistics' weight for the batch just counted in num_batches_tracked.

        With ``momentum=None`` (a cumulative average) this reads the counter back to the host, as
        torch's BatchNorm does.
        """
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _sync_now(self) -> bool:
        return self.sync and self.training and is_distributed(self.process_group)

    def _display_name(self) -> str:
        return repr(self.layer_name) if self.layer_name else f'CBN({self.num_features})'

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f'mmcbn: CBN layer {self._display_name()} {message}', stacklevel=3)

    def _conv_input(self, input: Tensor, needed: bool) -> Tuple[bool, Optional[Tensor]]:
        """Whether this call can be compensated, and the bound conv's input if available.

        ``needed``: whether anything (the window or the running statistics) is to be compensated;
        False only drops the captured conv input.
        """
        captured, self._captured = self._captured, None
        if not needed:
            return False, None
        binding = self.binding
        if binding is None:
            if self._unbound_reason is not None:
                self._warn_once('unbound', f'runs the uncompensated window: '
                                f'{self._unbound_reason}')
                return False, None
            binding, reason = binding_from_graph(input)
            if binding is None:
                if reason:
                    self._unbound_reason = reason
                    self._warn_once('unbound', f'runs the uncompensated window: {reason}')
                return False, None  # reason '': nothing upstream is trainable, naive is exact
            self._bindings.append(binding)
        if binding.module is not None and captured is not None:
            if captured[1]() is input:
                return True, captured[0]
            contradicted = True  # the bound conv ran, but its output is not this input
        else:
            contradicted = input_contradicts_binding(input, binding)
        if contradicted:
            self._warn_once('mismatch', f'got an input that is not the output of its bound conv '
                            f'({binding.name}); such calls use the uncompensated window')
            return False, None
        return True, conv_input_from_graph(input, binding)

    def _start_iteration(self, compensate_now: bool, sync: bool) -> IterationState:
        window = self._window
        window.commit_pending()
        return start_iteration(window, window.recent(self._effective_window - 1), self.iteration,
                               self.binding if compensate_now else None, self.window_grad,
                               self.process_group if sync else None, sync)

    def _forward_window(self, input: Tensor) -> Tensor:
        if self.iteration is None and self._effective_window > 1:
            _warn_no_iteration_source()
        tracks_drift = self._tracks_drift()
        usable, conv_input = self._conv_input(input, self.compensation or tracks_drift)
        compensate_now = usable and self.compensation
        sync = self._sync_now()
        num_positions = input.numel() // input.shape[1]
        # statistics in float32 or wider: autocast would run the window's products in half
        full_precision = torch.autocast(input.device.type, enabled=False)
        with torch.no_grad(), full_precision:
            local_mean, local_var = output_moments(input)
            if sync:
                mean, var, total = pool_moments(local_mean, local_var,
                                                torch.full_like(local_mean[0], num_positions),
                                                self.process_group)
            else:
                mean, var, total = local_mean, local_var, None
            # a non-finite value anywhere makes the variance non-finite (inf - inf, or an
            # overflow); x * 0 == 0 holds for finite x only. Stays on the device.
            finite = var.sum().mul_(0.0).eq(0.0)

        windowed = self._effective_window > 1  # else burn-in or BN: the batch alone, no record
        state, recompute = self._state if windowed else None, False
        if windowed:
            # A recomputation happens before the optimizer step: an in-place update of the bound
            # conv's weight (its version counter moved) means a new iteration whatever the
            # statistics say.
            same_iteration = state is not None and (
                state.iteration == self.iteration if self.iteration is not None else
                state.weight_version in (None, self._weight_version()))
            recompute = same_iteration and state.seen(local_mean, local_var)
            if not recompute and (self.iteration is None or not same_iteration):
                with full_precision:
                    state = self._state = self._start_iteration(compensate_now, sync)
                state.weight_version = self._weight_version()
            with torch.no_grad(), full_precision:
                mean_bar, var_bar, inv_k = window_average(state, mean, var)
        else:
            mean_bar, var_bar, inv_k = mean, var, None
        if num_positions == 1 and inv_k is None and not sync:
            raise ValueError(f'Expected more than 1 value per channel when training, got input '
                             f'size {tuple(input.shape)}')
        terms = state.grad_terms if compensate_now and state is not None else None
        binding = self.binding if terms is not None else None
        out = NormalizeWithWindow.apply(
            input, self.weight, self.bias, None if binding is None else binding.weight,
            None if binding is None else binding.bias, mean_bar, var_bar, inv_k, self.eps, total,
            self.process_group if sync else None, terms)
        self.last_mean, self.last_var = mean_bar, var_bar

        want_derivatives = (compensate_now and conv_input is not None
                            and self.binding.trainable)
        if recompute:
            window = self._window
            if want_derivatives and window.pending is not None and \
                    not window.compensable[window.pending]:
                window.fill_derivatives(
                    self._derivatives(conv_input, input, (local_mean, local_var)), finite)
            return out

        if state is not None:
            state.calls.append((local_mean, local_var))
        derivatives = None
        record = windowed and self._window.capacity > 0
        if (want_derivatives and record) or tracks_drift:
            # the batch's moments only where an entry is recorded: the excess of a sampled
            # derivative is a window quantity, the running statistics' terms do not need it
            derivatives = self._drift_derivatives(
                usable, conv_input, input,
                (local_mean, local_var) if record and compensate_now else None)
        if record:
            if self._window.pending is None:
                self._window.open_pending()
            self._window.record(local_mean, local_var, finite, num_positions,
                                derivatives if compensate_now else None, count_positions=self.sync)
        if self.track_running_stats:
            batch_count = total if sync else num_positions
            num_entries = 1.0 if inv_k is None else state.num_entries
            self._update_running_stats(mean, var, batch_count, mean_bar, var_bar,
                                       num_entries * batch_count, finite)
            if tracks_drift and derivatives is not None:
                self._drift.update(*derivatives[:2], self.binding.weight, self.binding.bias,
                                   num_positions, self._ema_factor(), finite)
                follow_optimizer_steps(self)
        return out

    def _weight_version(self) -> Optional[int]:
        binding = self.binding
        return None if binding is None else binding.weight._version

    def _derivatives(self, conv_input: Tensor, output: Tensor,
                     moments: Optional[Tuple[Tensor, Tensor]] = None
                     ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """``patch_mean``, ``sqmean_grad`` and, for a sampled ``sqmean_grad`` and the batch's
        ``moments`` given, its :func:`~mmcbn.layers.conv_moments.identity_excess`."""
        sample = None
        if self.derivative_positions is not None:
            if self._position_rng is None:
                self._position_rng = random.Random(
                    f'{torch.initial_seed()}/{self.layer_name}/{self.num_features}')
            sample = choose_position_sample(tuple(output.shape), self.derivative_positions,
                                            self._position_rng)
        with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
            binding = self.binding
            patch_mean, sqmean_grad = moment_derivatives(
                conv_input.detach(), output.detach(), binding.geometry, binding.weight,
                binding.bias, sample)
            excess = None
            if sample is not None and moments is not None:
                excess = identity_excess(sqmean_grad, binding.weight, binding.bias, *moments)
        return patch_mean, sqmean_grad, excess

    @torch.no_grad()
    def _update_running_stats(self, mean, var, batch_count, mean_bar, var_bar, count, finite):
        self.num_batches_tracked.add_(1)
        factor = self._ema_factor()
        if self.running_stats_source == 'window':
            src_mean, src_var, n = mean_bar, var_bar, count
        else:
            src_mean, src_var, n = mean, var, batch_count
        # running_var is unbiased, as in BN: n / (n - 1) with n the number of positions pooled
        if isinstance(n, Tensor):
            unbiased = src_var * torch.where(n > 1, n / (n - 1).clamp_min(1.0), 1.0)
        else:
            unbiased = src_var * (n / (n - 1) if n > 1 else 1.0)
        # a non-finite batch leaves the running statistics as they are
        torch._foreach_lerp_([self.running_mean, self.running_var],
                             [torch.where(finite, src_mean, self.running_mean),
                              torch.where(finite, unbiased, self.running_var)], factor)

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
