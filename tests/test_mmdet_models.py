"""Real mmdet Faster/Mask R-CNN R50-FPN with CBN in backbone, neck and heads: binding and training."""
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config

import mmcbn  # noqa: F401
from mmcbn import CrossIterationBatchNorm2d, bind_cbn_layers

CONFIGS = osp.join(osp.dirname(osp.dirname(__file__)), 'configs')


def _build(config_name):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(osp.join(CONFIGS, config_name))
    cfg.model.backbone.init_cfg = None
    cfg.model.train_cfg.rcnn.sampler.num = 64  # of 512 RoIs per image: the heads' convs dominate
    cfg.model.train_cfg.rpn_proposal.max_per_img = 200
    return MODELS.build(cfg.model)


def _expected_conv(norm_name):
    """bn1 -> conv1 (ResNet), downsample.1 -> downsample.0, ConvModule .bn -> .conv"""
    if norm_name.endswith('downsample.1'):
        return norm_name[:-1] + '0'
    name = re.sub(r'\.bn(\d)$', r'.conv\1', norm_name)
    name = re.sub(r'^backbone\.bn1$', 'backbone.conv1', name)
    return re.sub(r'\.bn$', '.conv', name)


@pytest.mark.parametrize('config_name, with_mask', [('cbn_faster_rcnn.py', False),
                                                    ('cbn_mask_rcnn.py', True)])
def test_every_cbn_is_bound_to_its_conv_and_trains(config_name, with_mask):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = _build(config_name)
    report = bind_cbn_layers(model)
    cbns = {n: m for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}
    assert set(report) == set(cbns)
    groups = {'backbone', 'neck', 'roi_head'}
    assert {n.split('.')[0] for n in cbns} == groups
    if with_mask:
        assert any(n.startswith('roi_head.mask_head') for n in cbns)
    for name, (conv, reason) in report.items():
        assert conv == _expected_conv(name), (name, conv, reason)
        assert cbns[name].binding.module is model.get_submodule(conv)
    model.train()
    for it in range(2):
        for m in cbns.values():
            m.iteration = it
        packed = demo_mm_inputs(2, (3, 64, 96), num_items=[2, 3], num_classes=80,
                                with_mask=with_mask)
        data = model.data_preprocessor(packed, True)
        losses = model(**data, mode='loss')
        total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(t.sum() for t in v)
                    for k, v in losses.items() if 'loss' in k)
        assert torch.isfinite(total)
        total.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.01 * p.grad
                    p.grad = None
    frozen = [n for n, m in cbns.items() if not m.training]  # frozen_stages=1: stem and stage 1
    assert frozen and all(n.startswith(('backbone.bn1', 'backbone.layer1.')) for n in frozen)
    for name, m in cbns.items():
        if name in frozen:
            continue
        stats = m.window_stats()
        assert stats['mean'].shape[0] == 1, name  # the window was in use at the second step
        assert m.window.committed[-1], name
