"""Every reader of the running statistics sees what eval uses, at any moment, from train mode.

An mmdet ResNet-18 with CBN (``norm_eval=False``) trains a few SGD steps through an mmengine Runner
with ``CBNHook`` and ``EMAHook``. The reference for the statistics is independent of the layer:
every bound conv's input at every iteration is recorded, and the EMA of the batch means is
recomputed through the conv at its current weights (exact for the mean). Each reader (the buffers
read in train mode after each step, ``state_dict``, ``convert_cbn_to_bn``, mmcv's ``fuse_conv_bn``,
``torch.export``, mmengine's EMA model) is then compared with it or with the CBN model's eval
outputs.
"""
import copy
import math

import pytest
import torch
from mmengine.hooks import EMAHook, Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from mmcbn import CrossIterationBatchNorm2d, convert_cbn_to_bn

MOMENTUM = 0.1  # the layers' running statistics
EMA_MOMENTUM, EMA_GAMMA = 0.3, 2  # ExpMomentumEMA's, large so that every step counts
ITERS = 6


class Images(Dataset):

    def __len__(self):
        return 2 * ITERS

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return dict(inputs=torch.randn(3, 32, 32, generator=g) + 0.5, label=torch.tensor(i % 2))


class ResNetClassifier(BaseModel):

    def __init__(self, norm_cfg):
        super().__init__()
        from mmdet.models.backbones import ResNet
        self.backbone = ResNet(18, norm_cfg=norm_cfg, norm_eval=False)
        self.head = nn.Linear(512, 2)

    def forward(self, inputs, label=None, mode='tensor'):
        logits = self.head(self.backbone(inputs)[-1].mean((2, 3)))
        if mode == 'loss':
            return dict(loss=nn.functional.cross_entropy(logits, label))
        return logits


class RecordConvInputs(Hook):
    """Records each bound conv's input and its layer's batch mean in every training forward, and
    after every iteration the layers' buffers as they are (train mode, nothing called on the
    model) with the reference at that moment."""
    priority = 'LOWEST'

    def __init__(self):
        self.inputs, self.batch_means, self.buffers, self.references = {}, {}, [], []

    def before_train(self, runner):
        for m in _cbns(runner.model):
            self.inputs[m], self.batch_means[m] = [], []
            m.binding.module.register_forward_pre_hook(
                lambda conv, args, m=m: self.inputs[m].append(args[0].detach().clone())
                if conv.training else None)
            m.register_forward_pre_hook(
                lambda m, args: self.batch_means[m].append(args[0].detach().double().mean(
                    (0, 2, 3))) if m.training else None)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        cbns = _cbns(runner.model)
        self.buffers.append({m: (m.running_mean.clone(), m.running_var.clone()) for m in cbns})
        self.references.append({m: reference_means(m, self.inputs[m]) for m in cbns})

    def plain_means(self, layer):
        """BN's EMA: each batch's mean at the weights of its own iteration."""
        mean = torch.zeros(layer.num_features, dtype=torch.float64)
        for batch_mean in self.batch_means[layer]:
            mean.lerp_(batch_mean, MOMENTUM)
        return mean


def _cbns(model):
    return [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]


@torch.no_grad()
def reference_means(layer, inputs):
    """The EMA of the batch means, each batch recomputed through the bound conv at its current
    weights, in float64."""
    conv = layer.binding.module
    mean = torch.zeros(layer.num_features, dtype=torch.float64)
    for x in inputs:
        y = conv._conv_forward(x.double(), conv.weight.double(),
                               None if conv.bias is None else conv.bias.double())
        mean.lerp_(y.mean((0, 2, 3)), MOMENTUM)
    return mean


def _train(tmp_path, update_buffers):
    torch.manual_seed(0)
    model = ResNetClassifier(dict(type='CBN', window_size=2, momentum=MOMENTUM))
    recorder = RecordConvInputs()
    runner = Runner(
        model=model, work_dir=str(tmp_path / f'readers_{update_buffers}'),
        train_dataloader=dict(dataset=Images(), sampler=dict(type='DefaultSampler', shuffle=False),
                              batch_size=2, num_workers=0, collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=ITERS),
        custom_hooks=[dict(type='CBNHook'), recorder,
                      dict(type='EMAHook', ema_type='mmdet.ExpMomentumEMA', momentum=EMA_MOMENTUM,
                           gamma=EMA_GAMMA, update_buffers=update_buffers)],
        default_hooks=dict(checkpoint=None), experiment_name=f'readers_{update_buffers}')
    runner.train()
    assert model.training  # everything below starts from train mode
    ema = next(h for h in runner.hooks if isinstance(h, EMAHook)).ema_model.module
    return model, ema, recorder


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp('readers'), update_buffers=False)


def _eval_outputs(model, x):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out


def _images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(99)) + 0.5


def test_buffers_hold_the_statistics_at_the_current_weights_after_every_step(trained):
    model, _, recorder = trained
    cbns = _cbns(model)
    assert len(cbns) == 20 and all(m.binding is not None for m in cbns)
    assert len(recorder.buffers) == ITERS
    for buffers, references in zip(recorder.buffers, recorder.references):
        for m in cbns:
            torch.testing.assert_close(buffers[m][0].double(), references[m], rtol=1e-4,
                                       atol=1e-5)
    # the check can fail: BN's plain EMA is far from the statistics at the final weights
    lags = [(recorder.plain_means(m) - recorder.references[-1][m]).abs().max() for m in cbns]
    assert len(recorder.inputs[cbns[0]]) == ITERS
    assert sum(lag > 1e-3 for lag in lags) >= 15, lags


def _assert_means_are_the_reference(modules, recorder, cbns):
    """Each layer's running mean (in ``modules``, in the order of ``cbns``) is the float64
    recomputation of the EMA at the final weights: the readers below read real statistics."""
    for m, cbn in zip(modules, cbns):
        torch.testing.assert_close(m.running_mean.double(), recorder.references[-1][cbn],
                                   rtol=1e-4, atol=1e-5)


def _norms(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_state_dict_from_train_mode_loads_into_a_bn_model_with_equal_outputs(trained):
    model, _, recorder = trained
    state = model.state_dict()
    assert model.training
    bn_model = ResNetClassifier(dict(type='BN', momentum=MOMENTUM))
    bn_model.load_state_dict(state, strict=True)
    _assert_means_are_the_reference(_norms(bn_model), recorder, _cbns(model))
    x = _images()
    torch.testing.assert_close(_eval_outputs(bn_model, x), _eval_outputs(model, x), rtol=0,
                               atol=0)


def test_convert_cbn_to_bn_from_train_mode_gives_the_eval_outputs(trained):
    model, _, recorder = trained
    deploy = convert_cbn_to_bn(copy.deepcopy(model))
    assert not _cbns(deploy)
    _assert_means_are_the_reference(_norms(deploy), recorder, _cbns(model))
    x = _images()
    torch.testing.assert_close(_eval_outputs(deploy, x), _eval_outputs(model, x), rtol=0, atol=0)


@pytest.mark.parametrize('switch_to_eval_first', [False, True])
def test_mmcv_fuse_conv_bn_gives_the_eval_outputs(trained, switch_to_eval_first):
    from mmcv.cnn import fuse_conv_bn
    model, _, _ = trained
    copied = copy.deepcopy(model)  # as it is after the last step
    x = _images()
    expected = _eval_outputs(model, x)
    if switch_to_eval_first:
        copied.eval()
    fused = fuse_conv_bn(copied)
    assert not _cbns(fused)  # every norm folded into its conv
    torch.testing.assert_close(_eval_outputs(fused, x), expected, rtol=1e-4, atol=1e-5)


def test_torch_export_holds_the_buffers_read_in_train_mode(trained):
    model, _, _ = trained
    read_in_train_mode = {k: v.clone() for k, v in model.state_dict().items()
                          if k.endswith(('running_mean', 'running_var'))}
    x = _images()
    expected = _eval_outputs(model, x)
    program = torch.export.export(copy.deepcopy(model).eval(), (x, ))
    exported = program.state_dict
    for key, value in read_in_train_mode.items():
        assert torch.equal(exported[key], value), key
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)


def test_ema_model_copying_buffers_holds_the_statistics_eval_uses(trained):
    model, ema, _ = trained
    for (name, mine), (_, copied) in zip(_named_stats(model), _named_stats(ema)):
        assert torch.equal(copied, mine), name
    # and the EMA model evaluates with them and its own averaged weights, as a BN model would
    bn_model = ResNetClassifier(dict(type='BN', momentum=MOMENTUM))
    bn_model.load_state_dict(ema.state_dict(), strict=True)
    x = _images()
    torch.testing.assert_close(_eval_outputs(ema, x), _eval_outputs(bn_model, x), rtol=0, atol=0)
    assert not torch.equal(ema.head.weight, model.head.weight)  # the weights are averaged


def test_ema_model_averaging_buffers_averages_the_statistics_eval_used(tmp_path):
    model, ema, recorder = _train(tmp_path, update_buffers=True)
    cbns, ema_cbns = _cbns(model), _cbns(ema)
    for m, averaged in zip(cbns, ema_cbns):
        # ExpMomentumEMA over the statistics after each step: the first copied, then blended
        expected = recorder.references[0][m].clone()
        for step in range(1, ITERS):
            factor = (1 - EMA_MOMENTUM) * math.exp(-(1 + step) / EMA_GAMMA) + EMA_MOMENTUM
            expected.mul_(1 - factor).add_(recorder.references[step][m], alpha=factor)
        torch.testing.assert_close(averaged.running_mean.double(), expected, rtol=1e-4, atol=1e-5)


def _named_stats(model):
    return [(k, v) for k, v in model.state_dict().items()
            if k.endswith(('running_mean', 'running_var'))]
