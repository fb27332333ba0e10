"""A/B of the layer step between this checkout and another revision: conv + CBN (window 4) and
conv + BN, forward, backward and an SGD step, on the layer table's shapes.

Each round runs one fresh process per code version (their order alternating between rounds), each
timing every shape's steady steps; the table gives each version's median step, its ratio to BN in
the same process, and the new version's step over the old one's as the median of the per-round
ratios (rounds seconds apart, so the machine's drift cancels in each ratio as in
``tools/benchmark_layer.py``).

  python tools/ab_layer.py REV [--rounds 5] [--steps 30] [--shapes tiny 3x3 ...]
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SHAPES = {  # as tools/benchmark_layer.py: (C_in, C_out, kernel, stride, padding, H=W)
    'tiny 3x3 16->32 @12': (16, 32, 3, 1, 1, 12),
    '3x3 256->256 @32': (256, 256, 3, 1, 1, 32),
    '1x1 256->1024 @32': (256, 1024, 1, 1, 0, 32),
    '3x3 256->256 @64': (256, 256, 3, 1, 1, 64),
    'stem 7x7 3->64 /2 @256': (3, 64, 7, 2, 3, 256),  # the image needs no gradient
}


def child(shapes, steps, warmup, batch):
    """Runs in a fresh process with the version under test first on sys.path."""
    import torch
    from torch import nn
    from mmcbn import CrossIterationBatchNorm2d
    torch.manual_seed(0)
    result = {}
    for name in shapes:
        cin, cout, k, s, p, size = SHAPES[name]
        x = torch.randn(batch, cin, size, size, requires_grad=not name.startswith('stem'))
        times = {}
        for variant in ('BN', 'CBN'):
            conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
            if variant == 'BN':
                norm = nn.BatchNorm2d(cout)
            else:
                norm = CrossIterationBatchNorm2d(cout, window_size=4)
                norm.bind(conv)
            opt = torch.optim.SGD([*conv.parameters(), *norm.parameters()], lr=1e-3, momentum=0.9)
            elapsed = []
            for it in range(warmup + steps):
                norm.iteration = it
                start = time.perf_counter()
                norm(conv(x)).square().mean().backward()
                opt.step()
                elapsed.append(time.perf_counter() - start)
                opt.zero_grad(set_to_none=True)
                x.grad = None
            times[variant] = statistics.median(elapsed[warmup:])
        result[name] = times
    print(json.dumps(result))


def _run_version(root, args):
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, osp.abspath(__file__), '--child', '--steps', str(args.steps),
           '--warmup', str(args.warmup), '--batch', str(args.batch), '--shapes', *args.shapes]
    out = subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('rev', nargs='?', help='the revision to compare with (git)')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=6)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--shapes', nargs='+', default=list(SHAPES)[:3], choices=list(SHAPES),
                        help='default: the first three')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())
        child(args.shapes, args.steps, args.warmup, args.batch)
        return
    if not args.rev:
        parser.error('give the revision to compare with')
    with tempfile.TemporaryDirectory() as old_root:
        archive = subprocess.run(['git', 'archive', args.rev, 'mmcbn'], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(['tar', '-x', '-C', old_root], input=archive, check=True)
        old_commit = subprocess.run(['git', 'rev-parse', '--short', args.rev], cwd=ROOT,
                                    check=True, capture_output=True, text=True).stdout.strip()
        rounds = []
        for r in range(args.rounds):
            order = [('new', ROOT), ('old', old_root)][::1 if r % 2 == 0 else -1]
            rounds.append({label: _run_version(root, args) for label, root in order})
    print(f'# this checkout (new) against {args.rev} ({old_commit}, old): conv + CBN k=4, '
          f'batch {args.batch}, {args.threads} threads, {args.rounds} rounds of {args.steps} '
          'steps (median step per process; new / old: the median of the per-round ratios)\n')
    print('| conv | old ms | old x BN | new ms | new x BN | new / old |')
    print('|---|---:|---:|---:|---:|---:|')
    for name in args.shapes:
        cells = []
        for label in ('old', 'new'):
            cbn = statistics.median(r[label][name]['CBN'] for r in rounds)
            vs_bn = statistics.median(r[label][name]['CBN'] / r[label][name]['BN'] for r in rounds)
            cells += [f'{cbn * 1e3:.2f}', f'{vs_bn:.2f}x']
        change = statistics.median(r['new'][name]['CBN'] / r['old'][name]['CBN'] for r in rounds)
        print(f'| {name} | ' + ' | '.join(cells) + f' | {change:.2f} |')


if __name__ == '__main__':
    main()
