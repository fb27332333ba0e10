"""CBNHook inside a real mmengine Runner: schedule, resume, logging, binding summary, sync_bn."""

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from layer_internals import hook_driven, hook_selection
from mmcbn import CBNHook, CrossIterationBatchNorm2d


class ToyDataset(Dataset):

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 8, 8, generator=g), label=torch.tensor(i % 2))


class ToyModel(BaseModel):

    def __init__(self, window_size=4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = CrossIterationBatchNorm2d(8, window_size=window_size)
        self.neck = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                  CrossIterationBatchNorm2d(8, window_size=window_size))
        self.head = nn.Linear(8, 2)

    def forward(self, inputs, label, mode='tensor'):
        x = torch.relu(self.bn1(self.conv1(inputs)))
        x = torch.relu(self.neck(x)).mean((2, 3))
        logits = self.head(x)
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, label))
        return logits


class RecordWindows(Hook):
    priority = 'LOW'  # after CBNHook

    def __init__(self):
        self.windows = {}
        self.entries = {}  # entries bn1 holds before each iteration's forward
        self.weights = {}  # bn1's weight before the run's first iteration

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        model = runner.model
        if not isinstance(model, ToyModel):
            return
        self.windows[runner.iter] = (getattr(model.bn1, 'effective_window', None),
                                     getattr(model.neck[1], 'effective_window', None),
                                     getattr(model.bn1, 'iteration', None))
        self.entries[runner.iter] = len(getattr(model.bn1, '_window', ()))
        self.weights.setdefault('first', model.bn1.weight.detach().clone())


def _runner(tmp_path, name, hook_cfg, loop, resume=False, load_from=None, **kwargs):
    recorder = RecordWindows()
    cfg = dict(
        model=kwargs.pop('model', None) or ToyModel(),
        work_dir=str(tmp_path / name),
        train_dataloader=dict(dataset=ToyDataset(), sampler=dict(type='DefaultSampler',
                                                                 shuffle=False),
                              batch_size=2, num_workers=0,
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=loop,
        custom_hooks=[hook_cfg, recorder],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        resume=resume, load_from=load_from, experiment_name=name,
        log_level='INFO', **kwargs)
    return Runner(**cfg), recorder


def test_schedule_burnin_then_linear_growth(tmp_path):
    hook = dict(type='CBNHook', burnin_iters=3, growth='linear', growth_iters=3)
    runner, rec = _runner(tmp_path, 'lin', hook, dict(type='IterBasedTrainLoop', max_iters=8))
    infos = []
    runner.logger.info = infos.append
    runner.train()
    assert any('CBNHook: 2 CBN layers driven, 2 bound to their conv' in m for m in infos), infos
    assert any('cbn_window: 4' in m for m in infos)  # LoggerHook prints the message-hub scalar
    # target 4: burn-in at 0-2, then 1 + 3 * done // 3 for done = 1, 2, 3, ...
    assert [rec.windows[i][0] for i in range(8)] == [1, 1, 1, 2, 3, 4, 4, 4]
    assert [rec.windows[i][2] for i in range(8)] == list(range(8))
    assert runner.message_hub.get_scalar('train/cbn_window').current() == 4
    assert runner.message_hub.get_scalar('train/cbn_burnin').current() == 0
    assert all(m.binding is not None for m in (runner.model.bn1, runner.model.neck[1]))


def test_burnin_in_epochs_under_both_loops(tmp_path):
    hook = dict(type='CBNHook', burnin_epochs=1, window_size=3)
    runner, rec = _runner(tmp_path, 'ep', hook, dict(type='EpochBasedTrainLoop', max_epochs=2))
    runner.train()  # 4 iterations per epoch
    assert [rec.windows[i][0] for i in range(8)] == [1] * 4 + [3] * 4
    runner, rec = _runner(tmp_path, 'it', hook, dict(type='IterBasedTrainLoop', max_iters=6))
    runner.train()  # converted with the dataloader length
    assert [rec.windows[i][1] for i in range(6)] == [1] * 4 + [3] * 2


def test_resume_continues_the_schedule_exactly(tmp_path):
    hook = dict(type='CBNHook', burnin_iters=2, growth='linear', growth_iters=4)
    loop = dict(type='IterBasedTrainLoop', max_iters=8)
    full, rec_full = _runner(tmp_path, 'full', hook, loop)
    full.train()
    part, _ = _runner(tmp_path, 'part', hook, dict(type='IterBasedTrainLoop', max_iters=4))
    part.train()
    resumed, rec_resumed = _runner(tmp_path, 'resumed', hook, loop, resume=True,
                                   load_from=str(tmp_path / 'part' / 'iter_4.pth'))
    resumed.train()
    assert sorted(rec_resumed.windows) == [4, 5, 6, 7]
    for i in range(4, 8):
        assert rec_resumed.windows[i] == rec_full.windows[i]
    # the schedule continues where it was, the window (scratch state) refills from empty (each
    # optimizer step commits its iteration's entry: at most the ring's 3 slots before a forward)
    assert [rec_full.entries[i] for i in range(4, 8)] == [1, 2, 3, 3]
    assert [rec_resumed.entries[i] for i in range(4, 8)] == [0, 1, 2, 3]
    # and training continued from the checkpoint's weights, which the first 4 iterations moved
    saved = torch.load(str(tmp_path / 'part' / 'iter_4.pth'),
                       map_location='cpu')['state_dict']['bn1.weight']
    assert torch.equal(rec_resumed.weights['first'], saved)
    assert not torch.equal(rec_full.weights['first'], saved)


def test_checkpoint_loads_into_a_batchnorm_model(tmp_path):
    hook = dict(type='CBNHook')
    runner, _ = _runner(tmp_path, 'ck', hook, dict(type='IterBasedTrainLoop', max_iters=4))
    runner.train()
    state = torch.load(tmp_path / 'ck' / 'iter_4.pth', weights_only=False)['state_dict']
    bn_model = ToyModel()
    bn_model.bn1 = nn.BatchNorm2d(8)
    bn_model.neck[1] = nn.BatchNorm2d(8)
    bn_model.load_state_dict(state, strict=True)
    runner.model.eval(), bn_model.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(bn_model(x, None), runner.model(x, None), rtol=0, atol=0)


def test_layer_selection_and_validation():
    with pytest.raises(ValueError, match='burnin_epochs or burnin_iters, not both'):
        CBNHook(burnin_epochs=1, burnin_iters=10)
    with pytest.raises(ValueError, match="growth must be one of \\('step', 'linear'\\)"):
        CBNHook(growth='cosine')
    with pytest.raises(ValueError, match='growth_iters >= 1'):
        CBNHook(growth='linear')
    with pytest.raises(ValueError, match='burnin_iters must be None or an int >= 0'):
        CBNHook(burnin_iters=-1)
    with pytest.raises(ValueError, match='window_size must be None or an int >= 1'):
        CBNHook(window_size=0)
    with pytest.raises(ValueError, match='regular expressions'):
        CBNHook(layers=['neck('])
    hook = CBNHook(layers='neck')
    assert list(hook_selection(hook, ToyModel())) == ['neck.1']


def test_window_larger_than_the_layers_is_refused(tmp_path):
    runner, _ = _runner(tmp_path, 'big', dict(type='CBNHook', window_size=8),
                        dict(type='IterBasedTrainLoop', max_iters=1))
    with pytest.raises(ValueError, match="window_size=8 exceeds the window_size=4 of CBN layer"):
        runner.train()


def test_hook_without_cbn_layers_warns_and_does_nothing(tmp_path):

    class Plain(ToyModel):

        def __init__(self):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(8)
            self.neck[1] = nn.BatchNorm2d(8)

        def forward(self, inputs, label, mode='tensor'):
            return super().forward(inputs, label, mode)

    runner, _ = _runner(tmp_path, 'plain', dict(type='CBNHook'),
                        dict(type='IterBasedTrainLoop', max_iters=2), model=Plain())
    warnings_logged = []
    runner.logger.warning = warnings_logged.append
    runner.train()
    assert any('no CBN layers' in m for m in warnings_logged), warnings_logged
    hook = next(h for h in runner.hooks if isinstance(h, CBNHook))
    assert hook_driven(hook) == {}
    assert 'train/cbn_window' not in runner.message_hub.log_scalars


def test_sync_bn_config_keeps_cbn(tmp_path):
    from mmengine.model import convert_sync_batchnorm
    model = ToyModel()
    model.other = nn.BatchNorm2d(8)
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted.bn1, CrossIterationBatchNorm2d) and converted.bn1.sync
    assert isinstance(converted.neck[1], CrossIterationBatchNorm2d) and converted.neck[1].sync
    assert isinstance(converted.other, nn.SyncBatchNorm)
    import mmengine.runner.runner as runner_module
    assert runner_module.convert_sync_batchnorm is convert_sync_batchnorm


class ResNetClassifier(BaseModel):
    """mmdet's ResNet-18 with its defaults (norm_eval=True, frozen_stages=-1) and CBN."""

    def __init__(self, **backbone_args):
        super().__init__()
        from mmdet.models.backbones import ResNet
        self.backbone = ResNet(18, norm_cfg=dict(type='CBN', window_size=2), **backbone_args)
        self.head = nn.Linear(512, 2)

    def forward(self, inputs, label, mode='tensor'):
        logits = self.head(self.backbone(inputs)[-1].mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, label))
        return logits


@pytest.mark.parametrize('backbone_args, stuck, frozen', [
    (dict(), 20, 0),  # mmdet's defaults: norm_eval=True puts every norm layer in eval mode
    (dict(frozen_stages=1), 15, 5),  # the stem and layer1 frozen on purpose
    (dict(norm_eval=False), 0, 0),
    (dict(norm_eval=False, frozen_stages=1), 0, 5),
], ids=['defaults', 'frozen_stages', 'norm_eval_false', 'norm_eval_false_frozen'])
def test_norm_eval_trap_is_named_once_at_the_first_iteration(tmp_path, backbone_args, stuck,
                                                             frozen):
    model = ResNetClassifier(**backbone_args)
    runner, _ = _runner(tmp_path, 'norm_eval', dict(type='CBNHook'),
                        dict(type='IterBasedTrainLoop', max_iters=2), model=model)
    warned, infos = [], []
    runner.logger.warning, runner.logger.info = warned.append, infos.append
    runner.train()
    traps = [m for m in warned if 'in eval mode while the model trains' in m]
    frozen_logs = [m for m in infos if 'are frozen' in m]
    # the fact itself: the driven layers' modes during training
    cbns = [m for m in model.backbone.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert sum(not m.training for m in cbns) == stuck + frozen
    if stuck:
        assert len(traps) == 1, warned  # once, not per iteration
        assert f'{stuck} of 20 CBN layers' in traps[0] and 'norm_eval' in traps[0]
        assert 'backbone.bn1' in traps[0] or 'backbone.layer' in traps[0]
    else:
        assert not traps, traps
    assert len(frozen_logs) == (1 if frozen else 0), infos
    if frozen:
        assert f'{frozen} CBN layers are frozen' in frozen_logs[0]


class RecordWindowStats(Hook):
    priority = 'LOW'

    def __init__(self):
        self.stats, self.weights = {}, {}

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        model = runner.model
        self.stats[runner.iter] = model.bn1.window_stats()
        self.weights[runner.iter] = model.conv1.weight.detach().clone()


def test_gradient_accumulation_pools_micro_batches_compensated_exactly_between_steps(tmp_path):
    """With optim_wrapper accumulative_counts=2 each micro-batch is one iteration (runner.iter
    counts them): the window pools micro-batches, and an entry recorded since the last optimizer
    step is used as recorded (the weights have not moved), older ones compensated."""
    recorder = RecordWindowStats()
    runner = Runner(
        model=ToyModel(window_size=3), work_dir=str(tmp_path / 'accumulate'),
        train_dataloader=dict(dataset=ToyDataset(), sampler=dict(type='DefaultSampler',
                                                                 shuffle=False),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.5), accumulative_counts=2),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=8),
        custom_hooks=[dict(type='CBNHook'), recorder], default_hooks=dict(checkpoint=None),
        experiment_name='accumulate')
    runner.train()
    moved = [not torch.equal(recorder.weights[i], recorder.weights[i - 1]) for i in range(1, 8)]
    assert moved == [True, False, True, False, True, False, True]  # a step every 2nd micro-batch
    for it in range(2, 8):
        stats = recorder.stats[it]
        assert stats['mean'].shape[0] == 2  # two earlier micro-batches in the window
        # the newest entry (it - 1) was recorded at the current weights when it is odd
        same_weights = it % 2 == 1
        exact = torch.allclose(stats['mean'][0], stats['raw_mean'][0], rtol=0, atol=1e-6) and \
            torch.allclose(stats['var'][0], stats['raw_var'][0], rtol=1e-5, atol=1e-6)
        assert exact == same_weights, it
