"""Every shipped config builds and trains (tiny fake COCO data, no downloads); the design card's
and the demo's CBN configs for two iterations, the second with the first's window entry."""
import glob
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

import mmcbn  # noqa: F401
from mmcbn import CrossIterationBatchNorm2d
from mmcbn.datasets import generate_shapes

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
COCO_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*.py')))
DEMO_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', 'demo', '*.py')))


@pytest.fixture(scope='module')
def fake_coco(tmp_path_factory):
    """The shapes generator's output relabelled with COCO class names, in COCO's layout."""
    root = generate_shapes(str(tmp_path_factory.mktemp('coco') / 'coco'), num_train=4, num_val=2)
    for split in ('train', 'val'):
        with open(f'{root}/{split}.json') as f:
            coco = json.load(f)
        for cat, name in zip(coco['categories'], ('person', 'bicycle', 'car')):
            cat['name'] = name
        with open(f'{root}/{split}.json', 'w') as f:
            json.dump(coco, f)
    return root + '/'


#: trained two iterations, the second with the first's window entry: the design card's config and
#: the demo's (each R-50 config's second iteration costs ~6 s on 2 cores: the others train one)
WINDOW_CHECKED = ('cbn_mask_rcnn.py', 'mask-rcnn_r18_fpn_cbn_shapes.py')


def _has_cbn(path):
    name = osp.basename(path)
    return 'cbn' in name.replace('syncbn', '')


def _iters(path):
    return 2 if osp.basename(path) in WINDOW_CHECKED else 1


def _shrink(cfg, data_root, prefix_train, prefix_val, ann_train, ann_val, work_dir, iters):
    cfg.work_dir = work_dir
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=10)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    cfg.log_level = 'WARNING'
    if cfg.model.backbone.get('init_cfg'):
        cfg.model.backbone.init_cfg = None
    _few_rois(cfg.model)
    dataset = cfg.train_dataloader.dataset
    dataset.data_root, dataset.ann_file = data_root, ann_train
    dataset.data_prefix = dict(img=prefix_train)
    for step in dataset.pipeline:
        if step['type'] == 'Resize' and 'scale' in step:
            step['scale'] = (192, 128)
    cfg.train_dataloader.num_workers = 0
    cfg.train_dataloader.persistent_workers = False
    cfg.train_dataloader.batch_size = 2
    cfg.train_dataloader.sampler = dict(type='InfiniteSampler', shuffle=False)
    for hook in cfg.get('custom_hooks', []):
        if hook['type'] == 'CBNHook':
            hook.pop('burnin_epochs', None)
            hook['burnin_iters'] = 0
            if hook.get('precise_bn_batches'):
                hook['precise_bn_batches'] = 2  # the re-estimation pass runs, briefly
    return cfg


def _few_rois(model):
    """64 RoIs per image instead of 512 (the RoI heads' convs dominate a step on tiny images)."""
    train_cfg = model.get('train_cfg') or {}
    if train_cfg.get('rcnn', {}).get('sampler'):
        train_cfg.rcnn.sampler.num = 64
    if train_cfg.get('rpn_proposal'):
        train_cfg.rpn_proposal.max_per_img = 200


def _train_and_check_the_window(cfg, path):
    """Trains the config; after two iterations, the second must have normalised with the
    first's entry (moved to the new weights where the layer is compensated)."""
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == cfg.train_cfg.max_iters
    cbns = [m for m in runner.model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert bool(cbns) == _has_cbn(path)
    windowed = [m for m in cbns if m.training]  # frozen stages are in eval mode: plain BN
    assert not cbns or windowed
    if runner.iter < 2:
        return
    for m in windowed:
        used = m.window_stats()
        assert used['mean'].shape[0] == 1, m.layer_name
        if m.binding is not None and m.compensation and m.binding.trainable:
            assert not torch.equal(used['mean'], used['raw_mean']), m.layer_name


@pytest.mark.parametrize('path', COCO_CONFIGS, ids=osp.basename)
def test_coco_config_trains_with_its_window(path, fake_coco, tmp_path):
    cfg = _shrink(Config.fromfile(path), fake_coco, 'train/', 'val/', 'train.json', 'val.json',
                  str(tmp_path), iters=_iters(path))
    _train_and_check_the_window(cfg, path)


@pytest.mark.parametrize('path', DEMO_CONFIGS, ids=osp.basename)
def test_demo_config_trains_with_its_window(path, fake_coco, tmp_path):
    cfg = Config.fromfile(path)
    root = generate_shapes(str(tmp_path / 'shapes'), num_train=4, num_val=2) + '/'
    cfg = _shrink(cfg, root, 'train/', 'val/', 'train.json', 'val.json', str(tmp_path / 'w'),
                  iters=_iters(path))
    _train_and_check_the_window(cfg, path)
