"""Every shipped config builds and trains one iteration (tiny fake COCO data, no downloads)."""
import glob
import json
import os.path as osp

import pytest
from mmengine.config import Config
from mmengine.runner import Runner

import mmcbn  # noqa: F401
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


def _shrink(cfg, data_root, prefix_train, prefix_val, ann_train, ann_val, work_dir):
    cfg.work_dir = work_dir
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=1, val_interval=10)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=100)
    cfg.log_level = 'WARNING'
    if cfg.model.backbone.get('init_cfg'):
        cfg.model.backbone.init_cfg = None
    dataset = cfg.train_dataloader.dataset
    dataset.data_root, dataset.ann_file = data_root, ann_train
    dataset.data_prefix = dict(img=prefix_train)
    for step in dataset.pipeline:
        if step['type'] == 'Resize' and 'scale' in step:
            step['scale'] = (256, 192)
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


@pytest.mark.parametrize('path', COCO_CONFIGS, ids=osp.basename)
def test_coco_config_trains_one_iteration(path, fake_coco, tmp_path):
    cfg = _shrink(Config.fromfile(path), fake_coco, 'train/', 'val/', 'train.json', 'val.json',
                  str(tmp_path))
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 1


@pytest.mark.parametrize('path', DEMO_CONFIGS, ids=osp.basename)
def test_demo_config_trains_one_iteration(path, fake_coco, tmp_path):
    cfg = Config.fromfile(path)
    root = generate_shapes(str(tmp_path / 'shapes'), num_train=4, num_val=2) + '/'
    cfg = _shrink(cfg, root, 'train/', 'val/', 'train.json', 'val.json', str(tmp_path / 'w'))
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 1
