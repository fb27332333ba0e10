"""Layer benchmark: conv + norm forward/backward time and window memory, CBN against BN.

Variants, measured side by side (interleaved, median over repeats) on each conv shape:
  BN              conv + nn.BatchNorm2d
  CBN k=2/4/8     conv + CrossIterationBatchNorm2d(window_size=k), full window, the layer's
                  defaults (d E[y^2]/dW from at most about 512 output positions)
  CBN k=4 exact   derivative_positions=None: the exact derivative, every output position
  CBN k=4 16 positions  derivative_positions=16: a derivative that costs next to nothing (an
                  ablation: the default's time minus this one's is what its derivative GEMM costs)
  CBN k=4 stop-grad  window_grad=False: no gradient through the entries (the paper's backward)
  CBN k=4 plain stats  compensate_running_stats=False: BN's running statistics (no EMA of the
                  derivatives, no move to the new weights after the optimizer step)
  naive CBN k=4   the same without compensation (the paper's ablation)
  autograd k=4    the authors' approach, re-written here for comparison: two autograd.grad calls per
                  layer per iteration and dmu/dW, dnu/dW and W stored per entry (3|W|)
  BN compiled, CBN k=4 compiled  (with --compile) conv + norm under torch.compile (inductor),
                  the CBN block compiled once its window is full (earlier steps run eagerly)

Each step runs forward, backward and an SGD update (so the weights move and compensation is real;
the update includes CBN's move of the running statistics to the new weights); the time of the
whole step is reported as the median over rounds of its ratio to BN's step in the same round. On
CUDA, ``--sync-debug`` runs every step under ``torch.cuda.set_sync_debug_mode('warn')`` and
reports the host syncs each variant made. Window memory is read between steps (after the optimizer
step), in floats and as a multiple of (k - 1) |W|: CBN keeps the k - 1 entries in use, about |W|
floats each (during a step also the iteration's own, until the optimizer step).

Usage: python tools/benchmark_layer.py [--device cpu|cuda] [--batch 2] [--repeats 15] [--sync-debug]
                                     [--compile] [--shapes NAME ...]
"""
import argparse
import contextlib
import statistics
import time
import warnings

import torch
from torch import nn

from benchmark import paired_ratio
from mmcbn import CrossIterationBatchNorm2d

SHAPES = {
    # name: (C_in, C_out, kernel, stride, padding, input H=W); inside a network the conv's input
    # needs a gradient (3 GEMMs per conv step), the stem's input (the image) does not (2 GEMMs)
    '1x1 256->1024 @32': (256, 1024, 1, 1, 0, 32),
    '3x3 256->256 @32': (256, 256, 3, 1, 1, 32),
    # a detector's stride-8 map (512 px images): the sampled derivative reads 1/16 of the positions
    '3x3 256->256 @64': (256, 256, 3, 1, 1, 64),
    'stem 7x7 3->64 /2 @256': (3, 64, 7, 2, 3, 256),
    # almost no arithmetic: the step time is the cost per op (dispatch, and on a GPU the launch)
    # and the layer's Python, a fixed cost per layer and step whatever the conv
    'tiny 3x3 16->32 @12': (16, 32, 3, 1, 1, 12),
}


class AutogradStyleCBN(nn.Module):
    """CBN as the authors' code computes it: derivatives by autograd, old weights stored."""

    def __init__(self, num_features, window_size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.window_size, self.eps = window_size, eps
        self.entries = []  # (mu, nu, dmu/dW, dnu/dW, W)

    def forward(self, y, conv_weight):
        mu = y.mean((0, 2, 3))
        nu = (y * y).mean((0, 2, 3))
        dmu = torch.autograd.grad(mu.sum(), conv_weight, retain_graph=True)[0]
        dnu = torch.autograd.grad(nu.sum(), conv_weight, retain_graph=True)[0]
        w_now = conv_weight.detach()
        mus, nus = [mu], [nu]
        for mu_o, nu_o, dmu_o, dnu_o, w_o in self.entries:
            delta = (w_now - w_o).flatten(1)
            mu_h = mu_o + (dmu_o.flatten(1) * delta).sum(1)
            nu_h = nu_o + (dnu_o.flatten(1) * delta).sum(1)
            mus.append(mu_h)
            nus.append(torch.maximum(nu_h, mu_h * mu_h))
        mean = torch.stack(mus).mean(0)
        var = torch.stack(nus).mean(0) - mean * mean
        self.entries.insert(0, (mu.detach(), nu.detach(), dmu, dnu, w_now.clone()))
        del self.entries[self.window_size - 1:]
        out = (y - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        return out * self.weight[None, :, None, None] + self.bias[None, :, None, None]

    def window_floats(self):
        return sum(t.numel() for e in self.entries for t in e)


def make_variant(name, shape, device):
    if name.endswith(' compiled'):
        conv, norm, forward, opt, floats = make_variant(name[:-len(' compiled')], shape, device)
        compiled = torch.compile(nn.Sequential(conv, norm))
        window = getattr(norm, 'window_size', 1)
        # eager until the window is full: the compiled graph is the steady step's
        forward = lambda x: compiled(x) if norm.iteration >= window else norm(conv(x))  # noqa
        return conv, norm, forward, opt, floats
    cin, cout, k, s, p, _ = shape
    conv = nn.Conv2d(cin, cout, k, s, p, bias=False).to(device)
    if name == 'BN':
        norm = nn.BatchNorm2d(cout).to(device)
        norm.iteration = 0
        forward = lambda x: norm(conv(x))  # noqa: E731
        floats = lambda: 0  # noqa: E731
    elif name.startswith('autograd'):
        norm = AutogradStyleCBN(cout, int(name.split('=')[1])).to(device)
        forward = lambda x: norm(conv(x), conv.weight)  # noqa: E731
        floats = norm.window_floats
    else:
        window = int(name.split('=')[1].split()[0])
        norm = CrossIterationBatchNorm2d(
            cout, window_size=window, compensation=not name.startswith('naive'),
            window_grad=not name.endswith('stop-grad'),
            compensate_running_stats=False if name.endswith('plain stats') else None,
            **(dict(derivative_positions=None) if name.endswith('exact') else
               dict(derivative_positions=16) if name.endswith('16 positions') else {})).to(device)
        norm.bind(conv)
        forward = lambda x: norm(conv(x))  # noqa: E731
        floats = lambda: norm.window_nbytes() // 4  # noqa: E731
    params = list(conv.parameters()) + list(norm.parameters())
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    return conv, norm, forward, opt, floats


@contextlib.contextmanager
def count_syncs(enabled):
    """Records a warning per host sync of the CUDA stream within the block (when ``enabled``)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        if enabled:
            torch.cuda.set_sync_debug_mode('warn')
        try:
            yield seen
        finally:
            if enabled:
                torch.cuda.set_sync_debug_mode('default')


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def run(args):
    device = torch.device(args.device)
    names = ['BN', 'CBN k=2', 'CBN k=4', 'CBN k=8', 'CBN k=4 exact', 'CBN k=4 16 positions',
             'CBN k=4 stop-grad', 'CBN k=4 plain stats', 'naive CBN k=4', 'autograd k=4']
    if args.compile:
        names += ['BN compiled', 'CBN k=4 compiled']
    rows = []
    for shape_name, shape in SHAPES.items():
        if args.shapes and not {shape_name, shape_name.split()[0]} & set(args.shapes):
            continue
        if args.compile:
            # every shape's compiled blocks share nn.Sequential.forward's code, and dynamo
            # compiles one code object at most 8 times before running it eagerly for good
            torch._dynamo.reset()
        torch.manual_seed(0)
        cin, _, _, _, _, size = shape
        x = torch.randn(args.batch, cin, size, size, device=device,
                        requires_grad=not shape_name.startswith('stem'))
        variants = {n: make_variant(n, shape, device) for n in names}
        syncs = {n: 0 for n in names}
        times = {n: [] for n in names}
        for rep in range(args.repeats + args.warmup):
            for n in names:  # interleaved, so drift on a noisy machine hits every variant alike
                conv, norm, forward, opt, _ = variants[n]
                norm.iteration = rep  # what CBNHook does: one iteration per step
                sync(device)
                t0 = time.perf_counter()
                with count_syncs(args.sync_debug and rep >= args.warmup) as seen:
                    out = forward(x)
                    out.square().mean().backward()
                    opt.step()
                sync(device)
                elapsed = time.perf_counter() - t0
                syncs[n] += len(seen)
                opt.zero_grad(set_to_none=True)
                x.grad = None
                if rep >= args.warmup:
                    times[n].append(elapsed)
        weight_floats = variants['BN'][0].weight.numel()
        for n in names:
            med = statistics.median(times[n])
            floats = variants[n][4]()
            k = int(n.split('=')[1].split()[0]) if '=' in n else 1
            rows.append((shape_name, n, med * 1e3, paired_ratio(times, n, 'BN'), floats,
                         floats / ((k - 1) * weight_floats) if k > 1 else 0.0, syncs[n]))
    print(f'device: {device} ({torch.cuda.get_device_name() if device.type == "cuda" else "CPU, "}'
          f'{"" if device.type == "cuda" else str(torch.get_num_threads()) + " threads"}), '
          f'batch {args.batch}, median of {args.repeats} interleaved rounds (x BN: the median of '
          f'the per-round ratios)')
    sync_column = args.sync_debug and device.type == 'cuda'
    print('| conv | variant | step ms | x BN | window floats | / ((k-1) |W|) |' +
          (' host syncs |' if sync_column else ''))
    print('|---|---|---:|---:|---:|---:|' + ('---:|' if sync_column else ''))
    for shape_name, n, ms, ratio, floats, per_w, num_syncs in rows:
        print(f'| {shape_name} | {n} | {ms:.2f} | {ratio:.2f} | {floats:,} | ' +
              (f'{per_w:.3f} |' if per_w else '- |') +
              (f' {num_syncs} |' if sync_column else ''))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--compile', action='store_true',
                        help='also BN and CBN k=4 under torch.compile (inductor)')
    parser.add_argument('--shapes', nargs='*', metavar='SHAPE',
                        help='only these conv shapes, by name or first word: ' + ', '.join(
                            repr(n) for n in SHAPES))
    parser.add_argument('--sync-debug', action='store_true',
                        help="CUDA: count host syncs per variant (set_sync_debug_mode('warn'))")
    args = parser.parse_args()
    known = set(SHAPES) | {n.split()[0] for n in SHAPES}
    if args.shapes and not set(args.shapes) <= known:
        parser.error(f'--shapes: unknown {sorted(set(args.shapes) - known)}; choose from '
                     f'{sorted(known)}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    run(args)


if __name__ == '__main__':
    main()
