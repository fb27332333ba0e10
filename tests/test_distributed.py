"""Synchronised CBN and DDP, for real: 2 gloo processes on this machine."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dist_utils import run_in_processes
from mmcbn import CrossIterationBatchNorm2d

STEPS = 4


def _data(steps=STEPS):
    g = torch.Generator().manual_seed(123)
    xs = [torch.randn(2, 3, 8, 8, generator=g) + 0.5 for _ in range(steps)]
    targets = [torch.randn(2, 6, 8, 8, generator=g) for _ in range(steps)]
    return xs, targets


def _model(window_size, sync, window_grad=True):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1)
    # the running statistics compared here are the plain EMA of the pooled statistics (as
    # SyncBatchNorm's); each process would compensate them with its own batch's derivatives
    cbn = CrossIterationBatchNorm2d(6, window_size=window_size, sync=sync, window_grad=window_grad,
                                    compensate_running_stats=False)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    cbn.bind(conv)
    return conv, cbn


def _run(conv, cbn, xs, targets, rows=slice(None), reduce=lambda t: t, traffic=None):
    """SGD steps on sum_i loss_i; returns per-step outputs, input grads, param grads, stats (and
    the floats the layer's forward and backward sent, with a ``traffic`` counter)."""
    params = [*conv.parameters(), *cbn.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    record = []
    for it, (x, t) in enumerate(zip(xs, targets)):
        cbn.iteration = it
        x = x[rows].clone().requires_grad_()
        if traffic is not None:
            traffic.sent, traffic.active = 0, True
        out = cbn(conv(x))
        opt.zero_grad()
        (out * t[rows]).sum().backward()
        sent = traffic.sent if traffic is not None else None
        if traffic is not None:
            traffic.active = False
        grads = [reduce(p.grad.clone()) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        record.append(dict(out=out.detach(), x_grad=x.grad, grads=grads, sent=sent,
                           running_mean=cbn.running_mean.clone(),
                           running_var=cbn.running_var.clone()))
        opt.step()
    return record


class _Traffic:
    """Counts the floats this process hands to all_gather / all_reduce while active."""

    def __init__(self):
        self.sent, self.active = 0, False
        self._gather, self._reduce = dist.all_gather, dist.all_reduce
        dist.all_gather, dist.all_reduce = self._counted(self._gather, 1), \
            self._counted(self._reduce, 0)

    def _counted(self, fn, index):
        def call(*args, **kwargs):
            if self.active:
                self.sent += args[index].numel()
            return fn(*args, **kwargs)
        return call


def _sync_worker(rank, world_size, window_size, window_grad, path):
    conv, cbn = _model(window_size, sync=True, window_grad=window_grad)
    xs, targets = _data()
    reduce = lambda g: (dist.all_reduce(g), g)[1]  # noqa: E731  (sum of per-image losses)
    traffic = _Traffic()
    record = _run(conv, cbn, xs, targets, rows=slice(rank, rank + 1), reduce=reduce,
                  traffic=traffic)
    torch.save(record, f'{path}/rank{rank}.pt')


@pytest.mark.parametrize('window_size, window_grad', [(1, True), (3, True), (3, False)])
def test_synchronised_cbn_on_2x1_images_equals_one_process_on_2(tmp_path, window_size,
                                                                 window_grad):
    """Outputs, input and every parameter gradient (the conv's, through the window entries with
    ``window_grad``) of 2 processes on 1 image each equal one process on both."""
    run_in_processes(_sync_worker, 2, window_size, window_grad, str(tmp_path))
    conv, cbn = _model(window_size, sync=False, window_grad=window_grad)
    xs, targets = _data()
    if window_size == 1:  # k = 1 is SyncBatchNorm: compare with BN on the whole batch
        bn = nn.BatchNorm2d(6)
        bn.load_state_dict(cbn.state_dict())
        cbn = bn
    expected = _run(conv, cbn, xs, targets)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2)]
    tol = dict(rtol=1e-5, atol=1e-5)
    for step, exp in enumerate(expected):
        got_out = torch.cat([ranks[r][step]['out'] for r in range(2)])
        got_xgrad = torch.cat([ranks[r][step]['x_grad'] for r in range(2)])
        torch.testing.assert_close(got_out, exp['out'], **tol, msg=f'output, step {step}')
        torch.testing.assert_close(got_xgrad, exp['x_grad'], **tol, msg=f'input grad, step {step}')
        for r in range(2):
            for g, e in zip(ranks[r][step]['grads'], exp['grads']):
                # the conv bias's gradient is 0 up to the rounding of a sum over positions
                torch.testing.assert_close(g, e, rtol=1e-5, atol=5e-5,
                                           msg=f'param grad, step {step}')
            torch.testing.assert_close(ranks[r][step]['running_mean'], exp['running_mean'], **tol)
            torch.testing.assert_close(ranks[r][step]['running_var'], exp['running_var'], **tol)
            # what the README states: (2C + 1) floats for the batch and for each of the k - 1
            # stored entries (all slots, from the first stored entry on), 2C in the backward
            channels, entries = 6, (window_size - 1 if step else 0)
            assert ranks[r][step]['sent'] == (2 * channels + 1) * (1 + entries) + 2 * channels, \
                (step, ranks[r][step]['sent'])


def _ddp_worker(rank, world_size, path):
    from torch.nn.parallel import DistributedDataParallel
    conv, cbn = _model(3, sync=False)
    model = DistributedDataParallel(nn.Sequential(conv, cbn, nn.ReLU()))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(rank)
    batch_means = []
    for it in range(4):
        cbn.iteration = it
        x = torch.randn(1, 3, 8, 8, generator=g) * (rank + 1)
        out = model(x)
        batch_means.append(conv(x).mean((0, 2, 3)).detach())
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
    stats = cbn.window_stats()
    torch.save(dict(raw_mean=stats['raw_mean'], batch_means=batch_means,
                    weight=conv.weight.detach()), f'{path}/ddp{rank}.pt')


def test_ddp_keeps_a_window_per_process(tmp_path):
    run_in_processes(_ddp_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f'ddp{r}.pt', weights_only=False) for r in range(2))
    torch.testing.assert_close(r0['weight'], r1['weight'])  # DDP kept the replicas equal
    for rec in (r0, r1):  # each window holds that process's own batches (newest first)
        torch.testing.assert_close(rec['raw_mean'][0], rec['batch_means'][-2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec['raw_mean'][1], rec['batch_means'][-3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(r0['raw_mean'], r1['raw_mean'])
