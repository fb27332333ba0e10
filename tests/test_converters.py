"""convert_bn_to_cbn / convert_cbn_to_bn on real models, compared with the BN originals."""
import copy

import torch
from torch import nn

from mmcbn import CrossIterationBatchNorm2d, convert_bn_to_cbn, convert_cbn_to_bn


def _trained_bn_resnet():
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    model = ResNet(depth=18, init_cfg=None, frozen_stages=1)
    model.train()
    for _ in range(2):  # non-trivial running statistics
        model(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


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
