"""The evidence tools on tiny settings: they run, and what they report holds against references."""
import json
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from mmengine.config import Config

from mmcbn import CrossIterationBatchNorm2d, convert_cbn_to_bn
from mmcbn.datasets import generate_shapes
from tool_modules import load_tool

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny_shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('shapes') / 'shapes')
    return generate_shapes(root, num_train=12, num_val=4, seed=5)


def _run(args, timeout=600):
    proc = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_compare_norms_evaluates_bn_models_three_ways(tiny_shapes, tmp_path):
    out = _run(['tools/compare_norms.py', '--iters', '2', '--precise-images', '4', '--variants',
                'BN-2', 'GN-2',
                '--data-root', tiny_shapes, '--work-dir', str(tmp_path)])
    results = json.load(open(tmp_path / 'results.json'))
    assert {r['variant'] for r in results} == {'BN-2', 'GN-2'}
    bn = next(r for r in results if r['variant'] == 'BN-2')
    gn = next(r for r in results if r['variant'] == 'GN-2')
    for stats in ('EMA', 'compensated EMA', 'precise'):
        assert 0.0 <= bn[f'{stats}/bbox'] <= 1.0 and 0.0 <= bn[f'{stats}/segm'] <= 1.0
    assert 'EMA/bbox' in gn and 'precise/bbox' not in gn  # GN has no running statistics
    assert re.search(r'\| BN, 2 img/step \| 1 \|', out) and re.search(r'\| GN, 2 img/step \| 1 \|',
                                                                        out)
    assert 'precise statistics: 28 layers' in out  # backbone and FPN
    assert (tmp_path / 'compare_norms.png').stat().st_size > 1000


class _Detector(nn.Module):
    """What compare_norms' evaluation needs of an mmdet model: conv + CBN (window 1: BN with the
    tracked derivatives), a data preprocessor and a loss mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.norm = CrossIterationBatchNorm2d(6, window_size=1)
        self.norm.bind(self.conv)
        self.data_preprocessor = lambda batch, training: dict(inputs=batch)
        self.target = torch.randn(1, 6, 8, 8)

    def forward(self, inputs, mode='loss'):
        return dict(loss=(self.norm(self.conv(inputs)) * self.target).mean())


def test_compare_norms_evaluates_the_ema_the_compensated_ema_and_precise_statistics():
    """Each of the three evaluations sees the statistics it is named for, each checked against an
    independent value: BN's EMA of the very batches (nn.BatchNorm2d), the layer's buffers moved
    with the weights (not the EMA), and the population statistics of the precise batches at the
    final weights."""
    from types import SimpleNamespace
    compare_norms = load_tool('compare_norms')
    torch.manual_seed(0)
    model = _Detector()
    plain = compare_norms.PlainRunningStats(model)
    bn = nn.BatchNorm2d(6)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    for it in range(5):
        model.norm.iteration = it
        x = torch.randn(2, 3, 8, 8) + it
        with torch.no_grad():
            bn(model.conv(x))  # BN's EMA of the same batches
        loss = model(x)['loss']
        opt.zero_grad()
        loss.backward()
        opt.step()
    precise_images = torch.randn(4, 3, 8, 8) * 2 + 1

    class Loader:
        batch_size = 2
        batch_sampler = [[0, 1], [2, 3]]
        dataset = precise_images
        collate_fn = staticmethod(torch.stack)

    seen = []

    def evaluate():
        seen.append((model.norm.running_mean.clone(), model.norm.running_var.clone()))
        return {'coco/bbox_mAP': float(len(seen))}

    runner = SimpleNamespace(model=model, train_dataloader=Loader(),
                             val_loop=SimpleNamespace(run=evaluate))
    compensated = model.norm.running_mean.clone(), model.norm.running_var.clone()
    results = compare_norms.evaluate_three_ways(runner, plain, precise_images=4)
    assert {k: v['coco/bbox_mAP'] for k, v in results.items()} == {
        'EMA': 1.0, 'compensated EMA': 2.0, 'precise': 3.0}
    (ema_mean, ema_var), (own_mean, own_var), (precise_mean, precise_var) = seen
    torch.testing.assert_close(ema_mean, bn.running_mean)
    torch.testing.assert_close(ema_var, bn.running_var)
    torch.testing.assert_close(own_mean, compensated[0])
    torch.testing.assert_close(own_var, compensated[1])
    assert (own_mean - ema_mean).abs().max() > 1e-3  # the buffers did move with the weights
    with torch.no_grad():
        y = model.conv(precise_images).double()
    torch.testing.assert_close(precise_mean.double(), y.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(precise_var.double(),
                               y.transpose(0, 1).reshape(6, -1).var(1), rtol=1e-5, atol=1e-6)


def test_compare_norms_tracks_the_compensated_ema_the_demo_config_leaves_out(tmp_path):
    # the demo CBN config re-estimates its statistics instead (no compensated EMA); the comparison
    # evaluates the compensated EMA itself, so its CBN runs must track it and not re-estimate
    from mmengine.registry import MODELS, init_default_scope
    compare_norms = load_tool('compare_norms')
    init_default_scope('mmdet')
    demo = MODELS.build(Config.fromfile(osp.join(ROOT, compare_norms.CBN_CONFIG)).model)
    assert not any(m.compensate_running_stats for m in _cbn_layers(demo))
    for key, compensated in (('CBN-2', True), ('naive-CBN-2', False), ('BN-2', True)):
        cfg = compare_norms.variant_config(key, 0, str(tmp_path))
        layers = _cbn_layers(MODELS.build(cfg.model))
        assert len(layers) == 28
        assert all(m.compensate_running_stats == compensated for m in layers), key
        assert all(h.get('precise_bn_batches', 0) == 0 for h in cfg.custom_hooks), key


def test_compare_norms_window_grad_grid_sets_what_its_names_say(tmp_path):
    compare_norms = load_tool('compare_norms')
    grid = [k for k in compare_norms.VARIANTS if k.startswith('CBN-2-k')]
    assert len(grid) == 7  # with CBN-2, the 8 cells of window_grad x window x burn-in
    seen = set()
    for key in grid + ['CBN-2']:
        cfg = compare_norms.variant_config(key, 0, str(tmp_path))
        norm = cfg.model.backbone.norm_cfg
        assert cfg.model.neck.norm_cfg == norm
        hook = next(h for h in cfg.custom_hooks if h['type'] == 'CBNHook')
        cell = (norm.get('window_size'), norm.get('window_grad', True), hook['burnin_iters'])
        assert cell == (8 if '-k8' in key else 4, 'stop-grad' not in key,
                        0 if 'no-burn-in' in key else 300), key
        seen.add(cell)
    assert len(seen) == 8
    assert compare_norms.MAIN_VARIANTS == ['BN-2', 'BN-8', 'GN-2', 'naive-CBN-2', 'CBN-2']


def test_compare_norms_processes_sharing_a_work_dir_keep_every_run(tmp_path):
    """results.json is read and extended under a lock: concurrent writers lose no run (flock
    also excludes separate opens within one process, so threads stand in for processes)."""
    import threading
    compare_norms = load_tool('compare_norms')
    path = str(tmp_path / 'results.json')

    def add_runs(writer):
        for seed in range(25):
            compare_norms.read_results(path, add=dict(variant=f'writer{writer}', seed=seed))

    threads = [threading.Thread(target=add_runs, args=(w, )) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    runs = json.load(open(path))
    assert sorted((r['variant'], r['seed']) for r in runs) == sorted(
        (f'writer{w}', s) for w in range(4) for s in range(25))


def _cbn_layers(model):
    return [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]


def test_compare_running_stats_reestimates_population_statistics():
    tool = load_tool('compare_running_stats')
    torch.manual_seed(0)
    net = tool.make_net()
    net = tool.convert_bn_to_cbn(net, window_size=4, compensate_running_stats=True)
    images = torch.randn(24, 3, 16, 16) * 2 + 1
    images[8:16] += 3  # unequal batches: the population variance has a between-batch part
    tool.reestimate(net, images, batch=8, batches=3)  # every image once
    first = net[1]
    with torch.no_grad():
        y = net[0](images).double()
    torch.testing.assert_close(first.running_mean.double(), y.mean((0, 2, 3)), rtol=1e-5,
                               atol=1e-5)
    population_var = y.transpose(0, 1).reshape(y.shape[1], -1).var(1, unbiased=True)
    torch.testing.assert_close(first.running_var.double(), population_var, rtol=1e-5, atol=1e-5)
    assert first.training and first.effective_window == 4  # the pass leaves the layer as it was


def test_compare_running_stats_keeps_bns_plain_ema_beside_the_compensated_buffers():
    tool = load_tool('compare_running_stats')
    torch.manual_seed(0)
    net = tool.convert_bn_to_cbn(tool.make_net(), window_size=4)
    plain = tool.PlainRunningStats(net)
    first = plain.layers[0]
    seen = []
    first.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for it in range(6):
        first.iteration = it
        loss = net(torch.randn(2, 3, 16, 16) + 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    net(torch.randn(2, 3, 16, 16))  # eval forwards are not counted
    bn = nn.BatchNorm2d(16).train()
    for x in seen:
        bn(x)
    torch.testing.assert_close(plain.stats[0][0], bn.running_mean)
    torch.testing.assert_close(plain.stats[0][1], bn.running_var)
    compensated = first.running_mean.clone()
    assert (compensated - bn.running_mean).abs().max() > 1e-4  # the layer's buffers moved on
    with plain.loaded():
        assert torch.equal(first.running_mean, plain.stats[0][0])
    assert torch.equal(first.running_mean, compensated)


def test_analyze_stats_compensates_the_stem_exactly(tiny_shapes, tmp_path):
    out = _run(['tools/analyze_stats.py', '--iters', '40', '--burn-in', '10', '--window', '3',
                '--measure-every', '10', '--lr', '0.003', '--data-root', tiny_shapes, '--out',
                str(tmp_path)])
    # the stem's input is the image: the truth there is the conv at the current weights on the
    # recorded batches, which the compensated mean matches exactly and the naive one does not
    row = re.search(r'\| backbone\.bn1 \| ([0-9.]+) / ([0-9.]+) \| ([0-9.]+) / ([0-9.]+) \| '
                    r'([0-9.]+) / ([0-9.]+) \|', out)
    assert row, out
    naive_mean, cbn_mean = float(row.group(3)), float(row.group(5))
    naive_var, cbn_var = float(row.group(4)), float(row.group(6))
    assert cbn_mean < 1e-3 and naive_mean > 10 * max(cbn_mean, 1e-5), row.group(0)
    assert cbn_var < naive_var, row.group(0)
    # against each entry's own conv input at the current weights, every layer's compensated
    # entries beat the naive ones (the first-order target)
    ratio = re.search(r'own conv, variance error of an entry, naive / compensated: ([0-9.]+)x', out)
    assert ratio and float(ratio.group(1)) > 1.5, out[-2000:]
    assert (tmp_path / 'analyze_stats.png').stat().st_size > 1000


def test_benchmark_tool_prints_ratios_and_window_state():
    # the demo's ResNet-18 and few RoIs: the tool's paths, at a fraction of the R50 model's time
    options = ['model.backbone.depth=18', 'model.neck.in_channels=[64,128,256,512]',
               'model.train_cfg.rcnn.sampler.num=32', 'model.train_cfg.rpn_proposal.max_per_img=64']
    out = _run(['tools/benchmark.py', '--size', '64', '--models', 'faster_rcnn', '--batches', '1',
                '--variants', 'BN', 'CBN k=2', '--repeats', '1', '--memory', '--no-inference',
                '--cfg-options', *options])
    bn = re.search(r'\| BN \| ([0-9.]+) \| 1\.00x \| (\d+) \| 1\.00x \| 0\.0 \|', out)
    cbn = re.search(r'\| CBN k=2 \| ([0-9.]+) \| ([0-9.]+)x \| (\d+) \| ([0-9.]+)x \| ([0-9.]+) \|',
                    out)
    assert bn and cbn, out
    # window 2, between steps (each optimizer step commits its iteration's entry): one stored
    # entry of about |W| floats, and the running statistics' weight-sized EMA: 2 |W| floats over
    # the weights of the convs bound to CBN
    model = load_tool('benchmark').build_model(
        'faster_rcnn', 'CBN k=2', 'cpu',
        {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512]})
    bound = sum(m.binding.weight.numel() for m in _cbn_layers(model))
    assert float(cbn.group(5)) == pytest.approx(2 * bound * 4 / 2**20, rel=0.03)


def test_benchmark_ratio_pairs_each_round_with_bn_in_that_round():
    """A machine whose speed halves between rounds, and one round in which only the variant hit a
    slow spell: 1.2x in every other round is what the ratio says (the ratio of the medians says
    2.0x here)."""
    times = dict(BN=[1.0, 2.0, 1.0, 2.0, 1.0], CBN=[1.2, 2.4, 1.2, 2.4, 2.0])
    assert load_tool('benchmark').paired_ratio(times, 'CBN', 'BN') == pytest.approx(1.2)


def test_deployment_fold_equals_cbn_eval():
    """The benchmark's deployed model: CBN -> BN -> folded into the conv gives CBN's eval output."""
    from mmcv.cnn import fuse_conv_bn
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    net = ResNet(18, norm_cfg=dict(type='CBN', window_size=2), norm_eval=False, out_indices=(3, ))
    net.train()
    cbns = [m for m in net.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    for it in range(3):
        for m in cbns:
            m.iteration = it
        (net(torch.randn(2, 3, 64, 64))[0]**2).mean().backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= 0.05 * p.grad
                p.grad = None
    assert all(m.running_stats_nbytes() > 0 for m in cbns)  # the running stats are compensated
    net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)[0]
        deployed = convert_cbn_to_bn(net)
        deployed.eval()  # mmdet's ResNet.train() returns None
        folded = fuse_conv_bn(deployed)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x)[0], expected, rtol=1e-4, atol=1e-4)
