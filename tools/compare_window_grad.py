"""Does the gradient through the compensated window entries help? Measured on a small task at batch 2.

Trains the small conv net of ``tools/compare_running_stats.py`` from scratch on its synthetic
4-class grating-orientation task (seeded) at 2 images per batch, with SGD and momentum, in these
variants: BN (CBN layers of window 1), naive CBN (no compensation), compensated CBN with the paper's
stop-gradient (``window_grad=False``) and compensated CBN with the gradient through the entries
(``window_grad=True``), at several windows, after a BN burn-in of half the iterations and without
burn-in. Every run is evaluated with statistics re-estimated over the training set at its final
weights (precise BN), so only the quality of training differs.

Usage: python tools/compare_window_grad.py [--seeds 5] [--iters 1200] [--windows 4 8 16]
"""
import argparse
import statistics
import time

import torch

from compare_running_stats import accuracy, make_gratings, make_net, reestimate, train_step
from mmcbn import CrossIterationBatchNorm2d, convert_bn_to_cbn

VARIANTS = {  # name: layer arguments
    'naive': dict(compensation=False),
    'stop-grad': dict(compensation=True, window_grad=False),
    'window-grad': dict(compensation=True, window_grad=True),
}


def train(window, layer_args, seed, data, iters, burn_in, lr):
    """Trains once; returns the test accuracy with re-estimated statistics."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    net = convert_bn_to_cbn(make_net(), window_size=window, compensate_running_stats=False,
                            **layer_args)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(iters * 0.8)])
    gen = torch.Generator().manual_seed(seed)
    cbns = [m for m in net.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    for it in range(iters):
        train_step(net, cbns, it, 1 if it < burn_in else window, train_x, train_y, gen, opt, sched)
    reestimate(net, train_x)
    return accuracy(net, test_x, test_y)


def summary(values):
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.3f} +- {std:.3f} (worst {min(values):.3f})'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, default=5)
    parser.add_argument('--iters', type=int, default=1200)
    parser.add_argument('--lr', type=float, default=0.005)
    parser.add_argument('--windows', type=int, nargs='+', default=[4, 8, 16])
    parser.add_argument('--no-burn-in-windows', type=int, nargs='+', default=[4, 8],
                        help='windows also trained with CBN from the first iteration')
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    train_x, train_y = make_gratings(4000, seed=1)
    test_x, test_y = make_gratings(1000, seed=2)
    data = (train_x, train_y, test_x, test_y)
    seeds = range(args.seeds)
    start = time.time()
    print(f'{args.iters} iterations at batch 2, SGD lr {args.lr} momentum 0.9 (x0.1 at 80%), '
          f'{args.seeds} seeds; test accuracy with re-estimated statistics, '
          'mean +- std (worst seed)')
    bn = [train(1, {}, s, data, args.iters, 0, args.lr) for s in seeds]
    print(f'BN: {summary(bn)}\n')
    for burn_in, windows in ((args.iters // 2, args.windows), (0, args.no_burn_in_windows)):
        print(f'burn-in: {burn_in} iterations of BN')
        print('| window | ' + ' | '.join(VARIANTS) + ' |')
        print('|---:|' + '---|' * len(VARIANTS))
        for window in windows:
            cells = [summary([train(window, layer_args, s, data, args.iters, burn_in, args.lr)
                              for s in seeds]) for layer_args in VARIANTS.values()]
            print(f'| {window} | ' + ' | '.join(cells) + ' |', flush=True)
        print()
    print(f'({time.time() - start:.0f} s)')


if __name__ == '__main__':
    main()
