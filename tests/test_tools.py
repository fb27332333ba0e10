"""The training/testing tools end to end on a tiny demo set: tools/train.py, tools/test.py,
tools/dist_train.sh with 2 CPU processes, mmdet's own tools/train.py, and the missing-data error."""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

from dist_utils import free_port
from mmcbn.datasets import generate_shapes
from tool_modules import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CFG = osp.join(ROOT, 'configs', 'demo', 'mask-rcnn_r18_fpn_cbn_shapes.py')


@pytest.fixture(scope='module')
def tiny_shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes') / 'shapes')
    return generate_shapes(root, num_train=8, num_val=4, seed=3)


def _data_options(root, iters=3):
    root = root + '/'
    return [
        f'train_dataloader.dataset.data_root={root}', f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}', f'val_evaluator.ann_file={root}val.json',
        f'test_evaluator.ann_file={root}val.json', f'train_cfg.max_iters={iters}',
        f'train_cfg.val_interval={iters}', f'default_hooks.checkpoint.interval={iters}',
        # the demo's re-estimation over 2 batches, not 100: the same path, a second instead of 20
        'custom_hooks.0.burnin_iters=1', 'custom_hooks.0.precise_bn_batches=2',
        'default_hooks.logger.interval=1',
        'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False', 'val_dataloader.num_workers=0',
        'val_dataloader.persistent_workers=False', 'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False'
    ]


def _run(cmd, cwd=ROOT, timeout=420, env=None):
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHON=sys.executable,
                    **(env or {}))
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def test_train_resume_and_test_tools(tiny_shapes, tmp_path):
    work = str(tmp_path / 'work')
    out = _run([sys.executable, 'tools/train.py', DEMO_CFG, '--work-dir', work, '--cfg-options',
                *_data_options(tiny_shapes)])
    assert 'CBNHook: 28 CBN layers driven, 28 bound' in out
    assert 'coco/bbox_mAP' in out and osp.exists(osp.join(work, 'iter_3.pth'))
    # resume from the checkpoint, train 2 more iterations
    out = _run([sys.executable, 'tools/train.py', DEMO_CFG, '--work-dir', work, '--resume',
                '--cfg-options', *_data_options(tiny_shapes, iters=5)])
    assert 'resumed' in out.lower() and osp.exists(osp.join(work, 'iter_5.pth'))
    out = _run([sys.executable, 'tools/test.py', DEMO_CFG, osp.join(work, 'iter_5.pth'),
                '--work-dir', work, '--out', str(tmp_path / 'res.pkl'), '--cfg-options',
                *_data_options(tiny_shapes)])
    assert 'coco/segm_mAP' in out and (tmp_path / 'res.pkl').exists()


def test_dist_train_with_two_cpu_processes(tiny_shapes, tmp_path):
    work = str(tmp_path / 'dist')
    out = _run(['bash', 'tools/dist_train.sh', DEMO_CFG, '2', '--work-dir', work,
                '--cfg-options', *_data_options(tiny_shapes, iters=2)],
               env=dict(PORT=str(free_port()), MASTER_ADDR='127.0.0.1'))
    # the runner's own count of processes (mmengine logs its world size as 'GPU number')
    assert 'GPU number: 2' in out, out[-3000:]
    assert osp.exists(osp.join(work, 'iter_2.pth'))
    with open(next(osp.join(work, d, 'vis_data', 'scalars.json') for d in os.listdir(work)
                   if osp.isdir(osp.join(work, d, 'vis_data')))) as f:
        world = [json.loads(line) for line in f if 'loss' in line]
    assert world and all(torch.isfinite(torch.tensor(r['loss'])) for r in world)


def test_mmdets_own_train_script_with_custom_imports(tiny_shapes, tmp_path):
    """mmdet's train.py trains with custom_imports alone; its --resume needs what the README says
    on torch >= 2.6 (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), and works with it."""
    import mmdet
    script = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
    work = str(tmp_path / 'mmdet')
    out = _run([sys.executable, script, DEMO_CFG, '--work-dir', work, '--cfg-options',
                *_data_options(tiny_shapes, iters=2)], cwd=str(tmp_path))
    assert 'CBNHook: 28 CBN layers driven' in out and osp.exists(osp.join(work, 'iter_2.pth'))
    if tuple(int(v) for v in torch.__version__.split('.')[:2]) >= (2, 6):
        # what mmdet's --resume / load_from call, mmengine's own loader, without the variable
        env = {k: v for k, v in os.environ.items() if k != 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'}
        load = ('from mmengine.runner.checkpoint import load_checkpoint; import torch; '
                f'load_checkpoint(torch.nn.Linear(1, 1), {osp.join(work, "iter_2.pth")!r})')
        proc = subprocess.run([sys.executable, '-c', load], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0 and 'HistoryBuffer' in proc.stderr, proc.stderr[-3000:]
    _run([sys.executable, script, DEMO_CFG, '--work-dir', work, '--resume', '--cfg-options',
          *_data_options(tiny_shapes, iters=3)], cwd=str(tmp_path),
         env=dict(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1'))
    assert osp.exists(osp.join(work, 'iter_3.pth'))


def test_missing_coco_gives_one_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, 'tools/train.py', osp.join(ROOT, 'configs', 'cbn_mask_rcnn.py'),
         '--work-dir', str(tmp_path), '--cfg-options',
         f'train_dataloader.dataset.data_root={tmp_path}/nowhere/'],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    assert "instances_train2017.json' does not exist" in proc.stderr
    assert '--cfg-options train_dataloader.dataset.data_root=' in proc.stderr


def test_demo_picture_draws_the_best_class_per_object():
    demo = load_tool('demo')
    bboxes = torch.tensor([[10., 10., 50., 50.],    # one object scored as three classes
                           [11., 10., 50., 51.],
                           [10., 12., 49., 50.],
                           [100., 100., 140., 130.],  # a second object, apart
                           [200., 10., 230., 40.]])  # below the threshold
    scores = torch.tensor([0.35, 0.45, 0.32, 0.6, 0.2])
    assert demo.objects_to_draw(bboxes, scores, score_thr=0.3).tolist() == [3, 1]
    assert demo.objects_to_draw(bboxes, scores, score_thr=0.7).tolist() == []
    # boxes that overlap by less than the IoU limit are different objects
    apart = torch.tensor([[0., 0., 10., 10.], [6., 0., 16., 10.]])  # IoU 4/16
    assert sorted(demo.objects_to_draw(apart, torch.tensor([0.5, 0.4])).tolist()) == [0, 1]
