"""convert_bn_to_cbn / convert_cbn_to_bn on real models, compared with the BN originals."""
import copy

import pytest
import torch
from torch import nn

from mmcbn import CrossIterationBatchNorm2d, convert_bn_to_cbn, convert_cbn_to_bn


def _trained(model, input_shape):
    """``model`` in train mode with non-trivial running statistics and affine parameters."""
    model.train()
    for _ in range(2):
        model(torch.randn(*input_shape))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _trained_bn_resnet():
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    return _trained(ResNet(depth=18, init_cfg=None, frozen_stages=1), (2, 3, 32, 32))


def test_bn_to_cbn_keeps_parameters_stats_and_binds():
    bn_model = _trained_bn_resnet()
    cbn_model = convert_bn_to_cbn(copy.deepcopy(bn_model), window_size=3)
    assert not any(type(m) is nn.BatchNorm2d for m in cbn_model.modules())
    cbns = {n: m for n, m in cbn_model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}
    assert len(cbns) == sum(isinstance(m, nn.BatchNorm2d) for m in bn_model.modules())
    assert all(m.window_size == 3 for m in cbns.values())
    assert cbns['layer1.0.bn2'].binding.name == 'layer1.0.conv2'
    assert cbns['layer4.0.downsample.1'].binding.name == 'layer4.0.downsample.0'
    assert all(m.binding is not None for m in cbns.values())
    # frozen stage parameters stay frozen, and the state dict is unchanged
    assert not cbn_model.bn1.weight.requires_grad and cbn_model.layer2[0].bn1.weight.requires_grad
    for key, value in bn_model.state_dict().items():
        assert torch.equal(cbn_model.state_dict()[key], value), key
    bn_model.eval(), cbn_model.eval()
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(bn_model(x), cbn_model(x)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_cbn_to_bn_after_training_gives_identical_eval_outputs():
    cbn_model = convert_bn_to_cbn(_trained_bn_resnet(), window_size=3)
    opt = torch.optim.SGD(cbn_model.parameters(), lr=0.01)
    cbn_model.train()
    for _ in range(3):
        loss = sum(o.mean() for o in cbn_model(torch.randn(2, 3, 32, 32)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    conv = cbn_model.layer1[0].conv1
    bn_model = convert_cbn_to_bn(copy.deepcopy(cbn_model))
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in bn_model.modules())
    assert type(bn_model.layer1[0].bn1) is nn.BatchNorm2d
    cbn_model.eval(), bn_model.eval()
    x = torch.randn(2, 3, 32, 32)
    for a, b in zip(cbn_model(x), bn_model(x)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # the deployed copy's convs no longer call into CBN layers
    assert not bn_model.layer1[0].conv1._forward_hooks and conv._forward_hooks


def test_single_layer_and_syncbn():
    bn = nn.SyncBatchNorm(8)
    cbn = convert_bn_to_cbn(bn)
    assert isinstance(cbn, CrossIterationBatchNorm2d) and cbn.num_features == 8
    back = convert_cbn_to_bn(cbn)
    assert type(back) is nn.BatchNorm2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
    model = convert_bn_to_cbn(model)
    assert model[1].binding.module is model[0]
    assert model[3].binding is None and 'ReLU is not an nn.Conv2d' in model[3].unbound_reason


class BatchNormAct2d(nn.BatchNorm2d):
    """A stand-in for timm's BatchNormAct2d: BN, then drop and act inside the norm module."""

    def __init__(self, num_features, drop=0.0):
        super().__init__(num_features)
        self.drop = nn.Dropout(drop) if drop else nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A BN subclass whose forward computes more than BN."""

    def forward(self, x):
        return super().forward(x) * 2.0


class BatchNormWithCounter(nn.BatchNorm2d):
    """A BN subclass with BN's forward and an extra buffer."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.register_buffer('calls', torch.zeros((), dtype=torch.long))


class FrozenBatchNorm2d(nn.Module):
    """A frozen BN as detectron2 and torchvision write it: not a BN subclass."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer('weight', torch.ones(n))
        self.register_buffer('bias', torch.zeros(n))

    def forward(self, x):
        return x * self.weight[:, None, None] + self.bias[:, None, None]


def _norm_act_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), BatchNormAct2d(8),
                          nn.Conv2d(8, 8, 3, bias=False), BatchNormAct2d(8, drop=0.5),
                          FrozenBatchNorm2d(8))
    return _trained(model, (2, 3, 12, 12)).eval()


def test_norm_act_keeps_its_activation_and_drop_and_converts_back():
    bn_model = _norm_act_model()
    x = torch.randn(2, 3, 12, 12)
    expected = bn_model(x)
    frozen = bn_model[4]
    cbn_model = convert_bn_to_cbn(copy.deepcopy(bn_model), window_size=3)
    assert isinstance(cbn_model[1], CrossIterationBatchNorm2d)
    assert isinstance(cbn_model[1].act, nn.SiLU) and isinstance(cbn_model[3].drop, nn.Dropout)
    assert cbn_model[1].binding.module is cbn_model[0]
    assert type(cbn_model[4]) is FrozenBatchNorm2d  # not a BN: left alone
    torch.testing.assert_close(cbn_model(x), expected, rtol=0, atol=0)
    # trains with the activation in place: the output of a SiLU is never below its minimum
    cbn_model.train()
    opt = torch.optim.SGD(cbn_model.parameters(), lr=0.01)
    for it in range(4):
        cbn_model[1].iteration = cbn_model[3].iteration = it
        out = cbn_model[:2](torch.randn(2, 3, 12, 12))
        assert out.min() >= -0.2785  # SiLU's minimum; a plain norm goes far below
        cbn_model(torch.randn(2, 3, 12, 12)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    cbn_model.eval()
    trained = cbn_model(x)
    back = convert_cbn_to_bn(copy.deepcopy(cbn_model))
    assert type(back[1]) is BatchNormAct2d and type(back[3]) is BatchNormAct2d
    assert isinstance(back[3].drop, nn.Dropout) and back[4].weight.shape == frozen.weight.shape
    torch.testing.assert_close(back(x), trained, rtol=0, atol=0)
    assert set(back.state_dict()) == set(bn_model.state_dict())


def test_bn_subclasses_that_would_lose_something_are_refused_by_name():
    for cls in (ScaledBatchNorm2d, BatchNormWithCounter):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), cls(4))
        with pytest.raises(TypeError, match=f'{cls.__name__} .*keep=\\({cls.__name__},\\)'):
            convert_bn_to_cbn(model)
        kept = convert_bn_to_cbn(model, keep=(cls, ))
        assert type(kept[1]) is cls
    plain_subclass = type('MyBatchNorm2d', (nn.BatchNorm2d, ), {})
    converted = convert_bn_to_cbn(nn.Sequential(nn.Conv2d(3, 4, 3), plain_subclass(4)))
    assert isinstance(converted[1], CrossIterationBatchNorm2d)
