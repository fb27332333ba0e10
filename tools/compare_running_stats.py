"""Which running statistics should BN and CBN evaluate with? Measured on a small task at batch 2.

Trains a small conv net from scratch on a synthetic 4-class grating-orientation task (generated
here, seeded) at 2 images per batch with BN, and with CBN (window 4 after a BN burn-in). Reports test
accuracy in eval mode with the plain running statistics (BN's EMA of batch statistics), with the
same EMA compensated to the final conv weights (``compensate_running_stats``), and with statistics
re-estimated over the training set at the final weights (precise BN), for several seeds, at the
end of training (after the learning-rate decay) and at chosen points before it.

Usage: python tools/compare_running_stats.py [--seeds 3] [--iters 2000]
"""
import argparse
import contextlib
import copy
import statistics

import numpy as np
import torch
from torch import nn

from mmcbn import CrossIterationBatchNorm2d, convert_bn_to_cbn
from mmcbn.engine.precise_stats import recompute_running_stats
from mmcbn.layers import output_moments
from mmcbn.layers.running_stats import update_running_stats


def make_gratings(num, size=32, seed=0):
    """Noisy gratings whose orientation (0, 45, 90 or 135 degrees) is the label, with random
    frequency, phase, brightness, contrast and colour per image, on part of the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images = np.empty((num, 3, size, size), np.float32)
    labels = rng.integers(0, 4, num)
    for i, label in enumerate(labels):
        theta = np.pi / 4 * label + rng.normal(0, 0.1)
        freq = rng.uniform(0.08, 0.2)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) +
                      rng.uniform(0, 2 * np.pi))
        cy, cx = rng.uniform(8, size - 8, 2)
        window = np.exp(-((yy - cy)**2 + (xx - cx)**2) / (2 * rng.uniform(5, 10)**2))
        colour = rng.uniform(0.2, 1.0, 3)[:, None, None]
        images[i] = (rng.uniform(-1, 1) + rng.uniform(0.3, 2.0) * colour * wave * window +
                     rng.normal(0, 0.6, (3, size, size)))
    return torch.from_numpy(images), torch.from_numpy(labels)


def make_net():
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 1), *block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))


def accuracy(net, images, labels):
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])
    net.train()
    return (pred == labels).float().mean().item()


def reestimate(net, images, batch=32, batches=40):
    """Population statistics at the current weights over ``batches`` training batches (precise BN,
    the estimator ``CBNHook(precise_bn_batches=...)`` uses)."""
    chunks = (images[(i * batch) % len(images):][:batch] for i in range(batches))
    recompute_running_stats(net, chunks, lambda model, x: model(x), batches)


class PlainRunningStats:
    """BN's plain EMA of batch statistics for every CBN layer of a model, kept beside the layers
    (whose own buffers follow the conv weights): the running statistics without compensation.

    A forward pre-hook on each layer lerps the batch's mean and unbiased variance in with the
    layer's momentum, in training forwards only, as BN does (skipping non-finite batches, as CBN
    does). Diagnostic code: it reads each batch back to the host.
    """

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        self.stats = [(m.running_mean.clone(), m.running_var.clone()) for m in self.layers]
        self.counts = [0] * len(self.layers)
        for i, m in enumerate(self.layers):
            m.register_forward_pre_hook(self._hook(i))

    def _hook(self, i):
        def track(layer, args):  # a closure, not a bound method: deep copies share the tracker
            if not layer.training or layer.momentum == 0.0:  # 0: a precise re-estimation pass
                return
            x = args[0].detach()
            with torch.no_grad():
                mean, var = output_moments(x)
                finite = torch.isfinite(var).all()
                if not bool(finite):
                    return
                self.counts[i] += 1
                factor = layer.momentum if layer.momentum is not None else 1 / self.counts[i]
                running_mean, running_var = self.stats[i]
                update_running_stats(running_mean, running_var, mean.to(running_mean.dtype),
                                     var.to(running_var.dtype), x.numel() // x.shape[1], factor,
                                     finite)
        return track

    @contextlib.contextmanager
    def loaded(self):
        """Within the block, the layers' buffers hold the plain EMA."""
        saved = [(m.running_mean.clone(), m.running_var.clone()) for m in self.layers]
        for m, (mean, var) in zip(self.layers, self.stats):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        try:
            yield
        finally:
            for m, (mean, var) in zip(self.layers, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)


def evaluate_three_ways(net, plain_stats, train_x, test_x, test_y):
    """Test accuracy with the plain EMA, the compensated EMA (the layers' buffers) and statistics
    re-estimated at the current weights (the running statistics do not influence training)."""
    with plain_stats.loaded():
        plain = accuracy(net, test_x, test_y)
    precise = copy.deepcopy(net)
    reestimate(precise, train_x)
    return plain, accuracy(net, test_x, test_y), accuracy(precise, test_x, test_y)


def train_step(net, cbns, it, window, train_x, train_y, gen, opt, sched):
    """One SGD step on 2 random training images, as ``CBNHook`` would drive the CBN layers
    (iteration ``it``, effective window ``window``)."""
    for m in cbns:
        m.effective_window = window
        m.iteration = it
    idx = torch.randint(0, len(train_x), (2, ), generator=gen)
    loss = nn.functional.cross_entropy(net(train_x[idx]), train_y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def train(variant, seed, data, iters, burn_in, lr, eval_at):
    """Trains once; returns {iteration: (plain EMA, compensated EMA, re-estimated) accuracy}."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    net = make_net()
    window = 1 if variant == 'BN' else 4
    # window 1 is nn.BatchNorm2d exactly, plus the tracked derivatives of its running statistics
    net = convert_bn_to_cbn(net, window_size=window, compensate_running_stats=True)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(iters * 0.7), int(iters * 0.9)])
    gen = torch.Generator().manual_seed(seed)
    cbns = [m for m in net.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    plain_stats = PlainRunningStats(net)
    results = {}
    for it in range(iters):
        if it in eval_at:
            results[it] = evaluate_three_ways(net, plain_stats, train_x, test_x, test_y)
        train_step(net, cbns, it, 1 if it < burn_in else window, train_x, train_y, gen, opt,
                   sched)
    results[iters] = evaluate_three_ways(net, plain_stats, train_x, test_x, test_y)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--iters', type=int, default=2000)
    parser.add_argument('--burn-in', type=int, default=400)
    parser.add_argument('--lr', type=float, default=0.005)
    parser.add_argument('--eval-at', type=float, nargs='+', default=[0.5],
                        help='also evaluate at these fractions of training (before the learning '
                        'rate decays at 0.7, the weights still move fast)')
    args = parser.parse_args()
    eval_at = sorted({int(f * args.iters) for f in args.eval_at if 0 < f < 1})
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train_x, train_y = make_gratings(4000, seed=1)
    test_x, test_y = make_gratings(1000, seed=2)
    data = (train_x, train_y, test_x, test_y)
    print(f'{args.iters} iterations at batch 2, SGD lr {args.lr} momentum 0.9, CBN window 4 after '
          f'{args.burn_in} iterations of BN; '
          f'{args.seeds} seeds; test accuracy (mean +- std over seeds)')
    print('| variant | evaluated at iteration | plain EMA (momentum 0.1) | compensated EMA | '
          're-estimated at these weights |')
    print('|---|---:|---:|---:|---:|')
    for variant in ('BN', 'CBN'):
        results = [train(variant, seed, data, args.iters, args.burn_in, args.lr, eval_at)
                   for seed in range(args.seeds)]
        for it in eval_at + [args.iters]:
            cols = []
            for j in range(3):
                vals = [r[it][j] for r in results]
                std = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cols.append(f'{statistics.mean(vals):.3f} +- {std:.3f}')
            print(f'| {variant} | {it} | ' + ' | '.join(cols) + ' |', flush=True)


if __name__ == '__main__':
    main()
