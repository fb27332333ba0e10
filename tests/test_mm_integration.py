"""CBN in the OpenMMLab stack: registry, mmcv/mmengine/mmdet BN semantics, gradient checkpointing."""
import copy

import pytest
import torch
from torch import nn

import mmcbn  # noqa: F401  (registers CBN)
from mmcbn import CrossIterationBatchNorm2d, bind_cbn_layers


def test_build_norm_layer_without_and_with_default_scope():
    from mmcv.cnn import build_norm_layer
    from mmengine.registry import DefaultScope
    name, layer = build_norm_layer(dict(type='CBN', window_size=3), 64)
    assert name == 'bn' and isinstance(layer, CrossIterationBatchNorm2d)
    assert layer.window_size == 3 and layer.eps == 1e-5
    with DefaultScope.overwrite_default_scope('mmdet'):
        import mmdet.models  # noqa: F401
        name, layer = build_norm_layer(dict(type='CBN', requires_grad=False), 32, postfix=2)
    assert name == 'bn2' and not layer.weight.requires_grad


def test_bad_config_value_is_reported_at_build_time():
    from mmcv.cnn import build_norm_layer
    with pytest.raises(ValueError, match='window_size'):
        build_norm_layer(dict(type='CBN', window_size=0), 8)


def test_mmcv_and_mmengine_treat_cbn_as_batchnorm():
    from mmcv.cnn import is_norm
    from mmengine.model import initialize
    from mmengine.optim import DefaultOptimWrapperConstructor
    cbn = CrossIterationBatchNorm2d(8)
    assert is_norm(cbn)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), cbn)
    with torch.no_grad():
        cbn.weight.fill_(3.0)
        cbn.bias.fill_(2.0)
    initialize(model, dict(type='Constant', layer=['_BatchNorm'], val=1, bias=0))
    assert torch.all(cbn.weight == 1) and torch.all(cbn.bias == 0)
    constructor = DefaultOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4)),
        dict(norm_decay_mult=0.0))
    wrapper = constructor(model)
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    assert decay[id(cbn.weight)] == 0.0 and decay[id(cbn.bias)] == 0.0
    assert decay[id(model[0].weight)] == 1e-4


def _resnet(**kwargs):
    from mmdet.models.backbones import ResNet
    return ResNet(depth=18, norm_cfg=dict(type='CBN', window_size=3), init_cfg=None, **kwargs)


def test_resnet_norm_eval_and_frozen_stages():
    model = _resnet(norm_eval=True, frozen_stages=1)
    model.train()
    cbns = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert cbns and all(not m.training for m in cbns)
    model = _resnet(norm_eval=False, frozen_stages=1)
    model.train()
    assert not model.bn1.training and not model.layer1[0].bn1.training
    assert not model.bn1.weight.requires_grad
    assert model.layer2[0].bn1.training and model.layer2[0].bn1.weight.requires_grad


def test_resnet_loads_a_batchnorm_state_dict_strictly():
    from mmdet.models.backbones import ResNet
    bn_model = ResNet(depth=18, init_cfg=None)
    cbn_model = _resnet()
    cbn_model.load_state_dict(bn_model.state_dict(), strict=True)
    bn_model.load_state_dict(cbn_model.state_dict(), strict=True)


def test_structural_binding_of_an_mmdet_resnet():
    model = _resnet()
    report = bind_cbn_layers(model)
    assert report['bn1'] == ('conv1', '')
    assert report['layer1.0.bn2'] == ('layer1.0.conv2', '')
    assert report['layer2.0.downsample.1'] == ('layer2.0.downsample.0', '')
    assert all(conv is not None for conv, _ in report.values()), report
    assert model.layer3[0].bn1.binding.module is model.layer3[0].conv1


def test_with_cp_matches_without_and_records_one_entry_per_iteration():
    """mmdet's Bottleneck with_cp=True recomputes its forward (reentrant checkpoint) in backward."""
    from mmdet.models.backbones.resnet import Bottleneck
    torch.manual_seed(0)
    norm_cfg = dict(type='CBN', window_size=3)
    plain = Bottleneck(16, 4, norm_cfg=norm_cfg)
    ckpt = copy.deepcopy(plain)
    ckpt.with_cp = True
    for block in (plain, ckpt):
        bind_cbn_layers(block)
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(ckpt.parameters(), lr=0.1)
    for it in range(4):
        for block in (plain, ckpt):
            for m in block.modules():
                if isinstance(m, CrossIterationBatchNorm2d):
                    m.iteration = it
        x = torch.randn(2, 16, 8, 8)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = plain(xa), ckpt(xb)
        torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-6)
        opt_a.zero_grad(), opt_b.zero_grad()
        out_a.square().mean().backward()
        out_b.square().mean().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
        for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=name)
        for ma, mb in zip(plain.modules(), ckpt.modules()):
            if isinstance(ma, CrossIterationBatchNorm2d):
                assert len(mb.window) == len(ma.window) == min(it + 1, 3)
                torch.testing.assert_close(mb.running_var, ma.running_var)
        opt_a.step(), opt_b.step()
    assert ckpt.norm2.window.sqmean_grad is not None  # entries were compensable


def test_with_cp_without_iteration_ids_or_explicit_binding():
    """The layer alone (auto iterations, binding from the graph) also survives recomputation."""
    from mmdet.models.backbones.resnet import Bottleneck
    torch.manual_seed(1)
    plain = Bottleneck(16, 4, norm_cfg=dict(type='CBN', window_size=3))
    ckpt = copy.deepcopy(plain)
    ckpt.with_cp = True
    for it in range(4):
        x = torch.randn(2, 16, 8, 8)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = plain(xa), ckpt(xb)
        torch.testing.assert_close(out_b, out_a, rtol=1e-6, atol=1e-6)
        out_a.sum().backward()
        out_b.sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
        assert len(ckpt.norm1.window) == len(plain.norm1.window) == min(it + 1, 3)
    # the no-grad first pass records statistics; the recomputation adds the derivatives
    assert all(ckpt.norm1.window.committed)


def test_non_reentrant_checkpoint_matches_plain_forward():
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    cbn = CrossIterationBatchNorm2d(8, window_size=3)
    conv_b, cbn_b = copy.deepcopy(conv), copy.deepcopy(cbn)
    for module, name in ((cbn, 'a'), (cbn_b, 'b')):
        module.layer_name = name
    cbn.bind(conv), cbn_b.bind(conv_b)
    opt = torch.optim.SGD([*conv.parameters(), *cbn.parameters()], lr=0.1)
    opt_b = torch.optim.SGD([*conv_b.parameters(), *cbn_b.parameters()], lr=0.1)
    for it in range(4):
        cbn.iteration = cbn_b.iteration = it
        x = torch.randn(2, 4, 6, 6)
        out = cbn(conv(x))
        out_b = checkpoint(lambda t: cbn_b(conv_b(t)), x, use_reentrant=False)
        torch.testing.assert_close(out_b, out)
        opt.zero_grad(), opt_b.zero_grad()
        out.square().sum().backward()
        out_b.square().sum().backward()
        torch.testing.assert_close(conv_b.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-5)
        opt.step(), opt_b.step()
        assert len(cbn_b.window) == len(cbn.window)


def test_layers_that_cannot_be_compensated_are_reported():
    from mmcv.cnn import ConvModule
    from mmdet.models.backbones.resnet import Bottleneck
    norm_cfg = dict(type='CBN')
    model = nn.Module()
    model.pre_norm = ConvModule(4, 8, 3, norm_cfg=norm_cfg, order=('norm', 'conv', 'act'))
    model.ws = ConvModule(4, 8, 3, conv_cfg=dict(type='ConvWS'), norm_cfg=norm_cfg)
    model.dcn_block = Bottleneck(16, 4, norm_cfg=norm_cfg,
                                 dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False))
    report = bind_cbn_layers(model)
    assert report['pre_norm.bn'][0] is None and 'norm before the conv' in report['pre_norm.bn'][1]
    assert report['ws.bn'][0] is None and 'ConvWS2d overrides the conv forward' in report['ws.bn'][1]
    assert report['dcn_block.bn2'][0] is None and 'DeformConv2dPack' in report['dcn_block.bn2'][1]
    assert report['dcn_block.bn1'] == ('dcn_block.conv1', '')
    for name in ('pre_norm.bn', 'ws.bn', 'dcn_block.bn2'):
        assert model.get_submodule(name).unbound_reason == report[name][1]


def test_training_without_the_hook_warns_once():
    import warnings

    from layer_internals import reset_no_iteration_warning
    reset_no_iteration_warning()
    conv = nn.Conv2d(3, 8, 3)
    layers = [CrossIterationBatchNorm2d(8, window_size=2) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(3):
            for layer in layers:
                layer(conv(torch.randn(2, 3, 6, 6)))
    messages = [str(w.message) for w in caught if 'without CBNHook' in str(w.message)]
    assert len(messages) == 1 and "custom_hooks=[dict(type='CBNHook'" in messages[0]
    assert layers[0].effective_window == 2  # full window from the first iteration
