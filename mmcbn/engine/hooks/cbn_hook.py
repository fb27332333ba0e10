"""CBNHook: binds CBN layers to their convs and runs the burn-in / window-growth schedule."""
import re
from typing import Dict, List, Optional, Sequence, Union

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from ...layers import CrossIterationBatchNorm2d
from ...converters import bind_cbn_layers
from ..precise_stats import loader_batches, recompute_running_stats
from ...layers.validation import check_int

GROWTH_MODES = ('step', 'linear')


@HOOKS.register_module()
class CBNHook(Hook):
    """Drives the CBN layers of ``runner.model`` through training.

    * Before training, binds every CBN layer to the conv that produces its input and logs a summary
      (how many layers, how many bound, which are not and why).
    * Before every training iteration, sets each driven layer's effective window from
      ``runner.iter`` / ``runner.epoch`` alone: 1 (plain BN) during burn-in, then the target window,
      at once (``growth='step'``) or growing linearly over ``growth_iters`` iterations. The state is
      derived, never accumulated, so ``--resume`` continues the schedule exactly; after a resume the
      window (scratch state, not checkpointed) refills within ``window - 1`` iterations.
    * Tells the layers which iteration it is, so calls within one iteration (shared heads, gradient
      checkpointing) are told apart from new iterations.
    * Logs ``cbn_window`` and ``cbn_burnin`` to the message hub (text log and visualizer backends).
    * Optionally (``precise_bn_batches > 0``) re-estimates the running statistics of every training
      BN-type layer (CBN, BN, SyncBN) at the current weights over that many training batches, before
      each validation and after the last training iteration (so the last checkpoint holds them),
      as detectron2's and mmpretrain's PreciseBN hooks do
      (:func:`~mmcbn.engine.precise_stats.recompute_running_stats`). Under DDP the statistics are
      summed over the processes. Works for BN models too (the hook then only does this).

    Args:
        burnin_epochs: epochs of plain BN before the window is used. Under an iteration-based loop
            it is converted with the length of the training dataloader.
        burnin_iters: the same in iterations. Give at most one of the two; neither: no burn-in.
        window_size: the target window, the current iteration included; None: each layer's own
            ``window_size``. It must not exceed any driven layer's ``window_size``.
        growth: ``'step'`` or ``'linear'``.
        growth_iters: iterations of linear growth from 1 to the target (``growth='linear'``).
        layers: which CBN layers to drive, as regular expressions matched against the start of the
            layer names (e.g. ``['neck', 'roi_head']``); None: all.
        precise_bn_batches: training batches per re-estimation of the running statistics; 0 (the
            default) keeps the running statistics the layers maintain.
    """
    priority = 'NORMAL'

    def __init__(self,
                 burnin_epochs: Optional[int] = None,
                 burnin_iters: Optional[int] = None,
                 window_size: Optional[int] = None,
                 growth: str = 'step',
                 growth_iters: int = 0,
                 layers: Optional[Union[str, Sequence[str]]] = None,
                 precise_bn_batches: int = 0) -> None:
        if burnin_epochs is not None and burnin_iters is not None:
            raise ValueError('CBNHook takes burnin_epochs or burnin_iters, not both: got '
                             f'burnin_epochs={burnin_epochs}, burnin_iters={burnin_iters}')
        check_int('CBNHook burnin_epochs', burnin_epochs, 0, allow_none=True)
        check_int('CBNHook burnin_iters', burnin_iters, 0, allow_none=True)
        check_int('CBNHook window_size', window_size, 1, allow_none=True)
        if growth not in GROWTH_MODES:
            raise ValueError(f'CBNHook growth must be one of {GROWTH_MODES}, got {growth!r}')
        check_int('CBNHook growth_iters', growth_iters, 0)
        check_int('CBNHook precise_bn_batches', precise_bn_batches, 0)
        if growth == 'linear' and growth_iters < 1:
            raise ValueError("CBNHook growth='linear' needs growth_iters >= 1, got "
                             f'{growth_iters}')
        if isinstance(layers, str):
            layers = [layers]
        if layers is not None:
            layers = list(layers)
            for pattern in layers:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as e:
                    raise ValueError(f'CBNHook layers must be regular expressions, got '
                                     f'{pattern!r}: {e}') from e
        self.burnin_epochs = burnin_epochs
        self.burnin_iters = burnin_iters
        self.window_size = window_size
        self.growth = growth
        self.growth_iters = growth_iters
        self.layers = layers
        self.precise_bn_batches = precise_bn_batches
        self._stats_stale = False  # trained since the last re-estimation
        self._driven: Dict[str, CrossIterationBatchNorm2d] = {}
        self._graph_bound_pending: List[str] = []
        self._modes_checked = False

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _model(runner) -> nn.Module:
        model = runner.model
        return model.module if is_model_wrapper(model) else model

    def _select(self, model: nn.Module) -> Dict[str, CrossIterationBatchNorm2d]:
        found = {name: m for name, m in model.named_modules()
                 if isinstance(m, CrossIterationBatchNorm2d)}
        if self.layers is None:
            return found
        return {name: m for name, m in found.items()
                if any(re.match(p, name) for p in self.layers)}

    def burnin_end_iter(self, runner) -> int:
        """The first iteration after burn-in."""
        if self.burnin_iters is not None:
            return self.burnin_iters
        if self.burnin_epochs is not None:
            return self.burnin_epochs * len(runner.train_dataloader)
        return 0

    def in_burnin(self, runner) -> bool:
        if self.burnin_epochs is not None and not _is_iter_based(runner):
            return runner.epoch < self.burnin_epochs
        return runner.iter < self.burnin_end_iter(runner)

    def window_at(self, runner, target: int) -> int:
        """The effective window at ``runner.iter`` for a layer whose target window is ``target``."""
        if self.in_burnin(runner):
            return 1
        if self.growth == 'step':
            return target
        done = runner.iter - self.burnin_end_iter(runner) + 1
        return max(1, min(target, 1 + (target - 1) * done // self.growth_iters))

    # ------------------------------------------------------------------ hook points
    def before_train(self, runner) -> None:
        model = self._model(runner)
        self._driven = self._select(model)
        if not self._driven:
            runner.logger.warning('CBNHook: the model has no CBN layers'
                                  + (f' matching {self.layers}' if self.layers else '')
                                  + ('; the hook only re-estimates running statistics.'
                                     if self.precise_bn_batches else '; the hook does nothing.'))
            return
        for name, layer in self._driven.items():
            if self.window_size is not None and self.window_size > layer.window_size:
                raise ValueError(f'CBNHook window_size={self.window_size} exceeds the '
                                 f'window_size={layer.window_size} of CBN layer {name!r}; raise '
                                 "the layer's window_size (norm_cfg) or lower the hook's")
        report = bind_cbn_layers(model)
        report = {name: report[name] for name in self._driven}
        bound = {n: conv for n, (conv, _) in report.items() if conv is not None}
        self._graph_bound_pending = [n for n in report if n not in bound
                                     and self._driven[n].unbound_reason is None]
        lines = [f'CBNHook: {len(report)} CBN layers driven, {len(bound)} bound to their conv, '
                 f'{len(self._graph_bound_pending)} to bind from the autograd graph at the first '
                 f'step, {len(report) - len(bound) - len(self._graph_bound_pending)} not '
                 'compensable (uncompensated window).']
        lines += [f'  not compensable: {n}: {reason}' for n, (conv, reason) in report.items()
                  if conv is None and n not in self._graph_bound_pending]
        lines += [f'  from the graph: {n}: {report[n][1]}' for n in self._graph_bound_pending]
        runner.logger.info('\n'.join(lines))

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if not self._driven:
            return
        if not self._modes_checked:
            self._modes_checked = True
            self._check_train_modes(runner)
        window = 1
        for layer in self._driven.values():
            target = self.window_size or layer.window_size
            layer.effective_window = self.window_at(runner, target)
            layer.iteration = runner.iter
            window = max(window, layer.effective_window)
        runner.message_hub.update_scalar('train/cbn_window', window)
        runner.message_hub.update_scalar('train/cbn_burnin', int(self.in_burnin(runner)))

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._stats_stale = True
        if self.precise_bn_batches and self.is_last_train_iter(runner):
            self._recompute_running_stats(runner)  # before CheckpointHook saves the last one
        self._log_graph_bindings(runner)

    def before_val_epoch(self, runner) -> None:
        if self.precise_bn_batches and self._stats_stale:
            self._recompute_running_stats(runner)

    def _recompute_running_stats(self, runner) -> None:
        model = self._model(runner)

        def forward(module, batch):
            data = module.data_preprocessor(batch, True)
            return module(**data, mode='loss') if isinstance(data, dict) else module(*data,
                                                                                     mode='loss')

        report = recompute_running_stats(model, loader_batches(runner.train_dataloader), forward,
                                         self.precise_bn_batches)
        self._stats_stale = False
        runner.logger.info(
            f'CBNHook: re-estimated the running statistics of {report.num_layers} layers at the '
            f'current weights over {report.num_batches} training batches in '
            f'{report.seconds:.1f} s')
        if report.not_seen:
            runner.logger.warning(f'CBNHook: no input reached {report.not_seen} during the '
                                  're-estimation: their running statistics are unchanged')
        runner.message_hub.update_scalar('train/precise_bn_time', report.seconds)

    def _check_train_modes(self, runner) -> None:
        """Warns once when driven layers sit in eval mode while the model trains: they normalise
        with their running statistics and never use the window (mmdet's ResNet does this to every
        norm layer with ``norm_eval=True``, its default). Layers whose parameters are frozen (mmdet's
        ``frozen_stages``) are frozen on purpose: named in the log, not warned about."""
        if not self._model(runner).training:
            return
        idle = [n for n, m in self._driven.items() if not m.training]
        frozen = [n for n in idle if not any(p.requires_grad for p in self._driven[n].parameters())]
        stuck = [n for n in idle if n not in frozen]
        if frozen:
            runner.logger.info(f'CBNHook: {len(frozen)} CBN layers are frozen (parameters without '
                               f'gradient, e.g. frozen_stages) and stay in eval mode: '
                               f'{_few(frozen)}')
        if stuck:
            runner.logger.warning(
                f'CBNHook: {len(stuck)} of {len(self._driven)} CBN layers are in eval mode while '
                f'the model trains, so they normalise with their running statistics and never use '
                f'the window: {_few(stuck)}. The likely cause is norm_eval=True, the default of '
                "mmdet's ResNet backbone; set model.backbone.norm_eval=False (or the norm_eval of "
                'the module that holds them) to train them as CBN.')

    def _log_graph_bindings(self, runner) -> None:
        if not self._graph_bound_pending:
            return
        lines = []
        for name in self._graph_bound_pending:
            layer = self._driven[name]
            if layer.binding is not None:
                lines.append(f'  {name}: bound to {layer.binding.name}')
            elif layer.unbound_reason is not None:
                lines.append(f'  {name}: not compensable: {layer.unbound_reason}')
            else:
                continue  # not trained with the window yet (burn-in, or a frozen producer)
        if lines:
            runner.logger.info('CBNHook: binding from the autograd graph:\n' + '\n'.join(lines))
            self._graph_bound_pending = [
                n for n in self._graph_bound_pending
                if self._driven[n].binding is None and self._driven[n].unbound_reason is None
            ]


def _few(names: List[str], shown: int = 4) -> str:
    return ', '.join(names[:shown]) + (f', ... ({len(names) - shown} more)' if len(names) > shown
                                       else '')


def _is_iter_based(runner) -> bool:
    from mmengine.runner import IterBasedTrainLoop
    return isinstance(runner.train_loop, IterBasedTrainLoop)
