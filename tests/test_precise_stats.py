"""Precise re-estimation of running statistics, against population statistics computed by hand."""
import os
import re

import torch
from torch import nn

from dist_utils import run_in_processes
from mmcbn import CrossIterationBatchNorm2d
from mmcbn.engine.precise_stats import recompute_running_stats


class Net(nn.Module):
    """conv -> CBN -> relu -> conv -> BN, plus a frozen (eval-mode) BN that must be left alone."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.cbn = CrossIterationBatchNorm2d(5, window_size=3)
        self.conv2 = nn.Conv2d(5, 4, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.frozen = nn.BatchNorm2d(3)

    def train(self, mode=True):
        super().train(mode)
        self.frozen.eval()  # as mmdet's norm_eval does
        return self

    def forward(self, x):
        x = self.frozen(x)
        x = torch.relu(self.cbn(self.conv1(x)))
        return self.bn(self.conv2(x))


def _population(t):
    """Mean and unbiased variance per channel over all positions of [N, C, H, W] tensors."""
    flat = t.transpose(0, 1).reshape(t.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def _reference(net, batches):
    """Every layer's input over all batches, each batch normalised with its own statistics."""
    ins1, ins2 = [], []
    with torch.no_grad():
        for x in batches:
            x = nn.functional.batch_norm(x, net.frozen.running_mean, net.frozen.running_var,
                                         net.frozen.weight, net.frozen.bias, training=False)
            y1 = net.conv1(x)
            z = nn.functional.batch_norm(y1, None, None, net.cbn.weight, net.cbn.bias,
                                         training=True)
            ins1.append(y1)
            ins2.append(net.conv2(torch.relu(z)))
    return _population(torch.cat(ins1)), _population(torch.cat(ins2))


def _trained_net():
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():
        net.frozen.running_mean.uniform_(-1, 1)
        net.cbn.weight.uniform_(0.5, 1.5)
        net.cbn.bias.uniform_(-0.5, 0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for it in range(6):
        net.cbn.iteration = it
        out = net(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        opt.zero_grad()
        (out * torch.randn_like(out)).mean().backward()
        opt.step()
    return net


def test_population_statistics_at_current_weights_and_no_other_trace():
    net = _trained_net()
    batches = [torch.randn(2, 3, 8, 8, dtype=torch.float64) * 2 + i for i in range(5)]
    frozen_before = net.frozen.running_mean.clone()
    tracked = (net.cbn.num_batches_tracked.clone(), net.bn.num_batches_tracked.clone())
    window_bytes = net.cbn.window_nbytes()
    window_stats = net.cbn.window.mean.clone()
    (ref_mean1, ref_var1), (ref_mean2, ref_var2) = _reference(net, batches[:4])
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)

    report = recompute_running_stats(net, batches, lambda m, x: m(x), num_batches=4)

    assert torch.equal(torch.rand(3), expected_draw)  # the generators are as they were
    assert report.num_layers == 2 and report.num_batches == 4 and not report.not_seen
    torch.testing.assert_close(net.cbn.running_mean, ref_mean1, rtol=0, atol=1e-12)
    torch.testing.assert_close(net.cbn.running_var, ref_var1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net.bn.running_mean, ref_mean2, rtol=0, atol=1e-12)
    torch.testing.assert_close(net.bn.running_var, ref_var2, rtol=1e-12, atol=1e-12)
    # an eval-mode (frozen) layer, the counters, the window and the modes are untouched
    assert torch.equal(net.frozen.running_mean, frozen_before)
    assert torch.equal(net.cbn.num_batches_tracked, tracked[0])
    assert torch.equal(net.bn.num_batches_tracked, tracked[1])
    assert net.cbn.window_nbytes() == window_bytes
    assert torch.equal(net.cbn.window.mean, window_stats)
    assert net.cbn.effective_window == 3 and net.cbn.compensate_running_stats
    assert net.training and net.cbn.training and not net.frozen.training
    # the re-estimated values are what eval uses and what a checkpoint holds
    mean = net.cbn.running_mean.clone()
    torch.testing.assert_close(net.state_dict()['cbn.running_mean'], mean, rtol=0, atol=1e-14)
    net.eval()
    torch.testing.assert_close(net.cbn.running_mean, mean, rtol=0, atol=1e-14)


def _ddp_worker(rank, world_size, out_dir):
    torch.manual_seed(0)
    net = Net().double()
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=gen) + rank
               for _ in range(2)]
    recompute_running_stats(net, batches, lambda m, x: m(x), num_batches=2)
    torch.save(dict(batches=batches, mean=net.cbn.running_mean, var=net.cbn.running_var,
                    mean2=net.bn.running_mean, var2=net.bn.running_var),
               os.path.join(out_dir, f'rank{rank}.pth'))


def test_statistics_are_summed_over_processes(tmp_path):
    run_in_processes(_ddp_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f'rank{r}.pth') for r in range(2)]
    torch.manual_seed(0)
    net = Net().double()
    (mean1, var1), (mean2, var2) = _reference(net, results[0]['batches'] + results[1]['batches'])
    for res in results:  # both processes hold the statistics of all four batches
        torch.testing.assert_close(res['mean'], mean1, rtol=0, atol=1e-12)
        torch.testing.assert_close(res['var'], var1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res['mean2'], mean2, rtol=0, atol=1e-12)
        torch.testing.assert_close(res['var2'], var2, rtol=1e-12, atol=1e-12)


def test_hook_reestimates_after_the_last_iteration_before_the_checkpoint(tmp_path):
    from mmengine.runner import Runner
    from test_hook import ToyDataset, ToyModel

    # as the detection configs load data: an infinite sampler behind a persistent worker, whose
    # loader the re-estimation cannot iterate a second time (it reads the batches itself)
    runner = Runner(
        model=ToyModel(), work_dir=str(tmp_path), experiment_name='precise',
        train_dataloader=dict(dataset=ToyDataset(),
                              sampler=dict(type='InfiniteSampler', shuffle=False), batch_size=2,
                              num_workers=1, persistent_workers=True,
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        train_cfg=dict(type='IterBasedTrainLoop', max_iters=6),
        custom_hooks=[dict(type='CBNHook', burnin_iters=2, precise_bn_batches=3)],
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=6, by_epoch=False)),
        log_level='INFO')
    runner.train()
    model = runner.model
    # the reference: the first three batches of the sampler's order, at the final weights
    dataset = ToyDataset()
    inputs = torch.stack([dataset[i]['inputs'] for i in range(6)])
    with torch.no_grad():
        y1 = model.conv1(inputs)
    mean1, var1 = _population(y1)
    ckpt = torch.load(os.path.join(runner.work_dir, 'iter_6.pth'), map_location='cpu')
    torch.testing.assert_close(ckpt['state_dict']['bn1.running_mean'], mean1, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(ckpt['state_dict']['bn1.running_var'], var1, rtol=1e-5, atol=1e-6)
    log = open(os.path.join(runner.log_dir, f'{runner.timestamp}.log')).read()
    assert re.search(r're-estimated the running statistics of 2 layers at the current weights '
                     r'over 3 training batches in [0-9.]+ s', log)


def test_an_empty_pass_is_an_error():
    import pytest
    net = Net()
    mean = net.cbn.running_mean.clone()
    with pytest.raises(ValueError, match='yielded nothing'):
        recompute_running_stats(net, [], lambda m, x: m(x), num_batches=4)
    assert torch.equal(net.cbn.running_mean, mean)


def test_hook_validates_precise_bn_batches():
    import pytest
    from mmcbn import CBNHook
    with pytest.raises(ValueError, match='precise_bn_batches'):
        CBNHook(precise_bn_batches=-1)
