"""Whole-model benchmark: training step time, peak memory and inference time of mmdet R50-FPN
detectors with BN, GN, CBN (several windows), naive CBN and CBN in the neck and heads only.

Every variant has the same architecture (that of configs/cbn_*.py: norm layers in the backbone, the
FPN and 4-conv RoI heads, as mmdet's GN configs place them) and differs only in the norm layer.
Training steps (forward, backward, SGD step, on synthetic images with boxes and masks) are timed in
interleaved rounds, each variant once per round, so machine noise hits all variants alike; the
table shows the median step and the ratio to BN, the median over rounds of the ratio within a
round. CBN layers run with their full window (the window is filled during the warm-up steps).
Inference (eval mode, one image) is timed for BN, GN, CBN, and CBN converted to BN with the norm
folded into the conv (deployment).

Peak memory (``--memory``): each variant trains in a fresh subprocess; reported is the peak RSS
reached during the training steps (sampled every 2 ms) above the RSS after building the model
(CPU), or
``torch.cuda.max_memory_allocated`` (CUDA), plus the CBN scratch state (windows and tracked
derivatives of the running statistics).

  python tools/benchmark.py [--models mask_rcnn faster_rcnn] [--batches 1 2] [--size 512]
                            [--repeats 3] [--memory] [--device cpu|cuda]
                            [--cfg-options model.backbone.depth=18 ...]
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

import mmcbn  # noqa: E402,F401
from mmcbn import CrossIterationBatchNorm2d, bind_cbn_layers, convert_cbn_to_bn  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = dict(faster_rcnn='configs/cbn_faster_rcnn.py', mask_rcnn='configs/cbn_mask_rcnn.py')


def _norm(kind):
    if kind == 'BN':
        return dict(type='BN', requires_grad=True)
    if kind == 'GN':
        return dict(type='GN', num_groups=32, requires_grad=True)
    window, compensation, *exact = kind
    norm = dict(type='CBN', window_size=window, compensation=compensation, requires_grad=True)
    if exact:  # the exact d E[y^2]/dW over every output position (the layer samples 512)
        norm['derivative_positions'] = None
    return norm


#: name -> (backbone norm, neck/head norm, backbone norm_eval)
VARIANTS = {
    'BN': ('BN', 'BN', False),
    'GN': ('GN', 'GN', False),
    'CBN k=2': ((2, True), (2, True), False),
    'CBN k=4': ((4, True), (4, True), False),
    'CBN k=8': ((8, True), (8, True), False),
    'CBN k=4 exact': ((4, True, 'exact'), (4, True, 'exact'), False),
    'naive CBN k=4': ((4, False), (4, False), False),
    'BN, frozen backbone': ('BN', 'BN', True),
    'CBN k=4 neck+heads': ('BN', (4, True), True),
    'CBN k=4 neck+heads exact': ('BN', (4, True, 'exact'), True),
}
#: the BN variant each one is compared with
BASELINE = {name: ('BN, frozen backbone' if frozen else 'BN')
            for name, (_, _, frozen) in VARIANTS.items()}


def build_model(model_name, variant, device, cfg_options=None):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(osp.join(ROOT, CONFIGS[model_name]))
    backbone_norm, head_norm, frozen = VARIANTS[variant]
    cfg.merge_from_dict(cfg_options or {})
    m = cfg.model
    m.backbone.init_cfg = None
    m.backbone.norm_cfg = _norm(backbone_norm)
    m.backbone.norm_eval = frozen
    m.neck.norm_cfg = _norm(head_norm)
    m.roi_head.bbox_head.norm_cfg = _norm(head_norm)
    if 'mask_head' in m.roi_head:
        m.roi_head.mask_head.norm_cfg = _norm(head_norm)
    model = MODELS.build(m).to(device)
    bind_cbn_layers(model)
    return model


def make_batch(model, batch_size, size, with_mask, seed=0):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(seed)
    packed = demo_mm_inputs(batch_size, [(3, size, size)] * batch_size, num_items=[6] * batch_size,
                            num_classes=80, with_mask=with_mask)
    return model.data_preprocessor(packed, True)


class Trainer:
    """One model and its optimizer; ``step()`` is one training iteration, CBN at its full window."""

    def __init__(self, model_name, variant, batch_size, size, device, cfg_options=None):
        self.model = build_model(model_name, variant, device, cfg_options)
        self.model.train()
        self.data = make_batch(self.model, batch_size, size, model_name == 'mask_rcnn')
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.cbns = [m for m in self.model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        self.iteration = 0
        self.device = device

    def step(self):
        for m in self.cbns:
            m.iteration = self.iteration
        self.iteration += 1
        losses = self.model(**self.data, mode='loss')
        loss, _ = self.model.parse_losses(losses)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        _sync(self.device)

    def scratch_nbytes(self):
        return sum(m.window_nbytes() + m.running_stats_nbytes() for m in self.cbns)


def _sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def _rss_bytes():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def interleaved(fns, warmup, repeats):
    """Seconds of each callable in every round, timed round-robin: ``{name: [seconds]}``."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(times, name, base):
    """The median over rounds of ``name``'s time over ``base``'s in the same round (the machine's
    drift between rounds, up to 2x on a shared VM, cancels in each ratio)."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def train_times(model_name, batch_size, args):
    trainers = {v: Trainer(model_name, v, batch_size, args.size, args.device, args.cfg_options)
                for v in args.variants}
    # after one recorded step a CBN layer compensates all window_size - 1 slots every step (one
    # batched product over the preallocated window), so two warm-up steps reach the full cost
    times = interleaved({v: t.step for v, t in trainers.items()}, 2, args.repeats)
    scratch = {v: t.scratch_nbytes() for v, t in trainers.items()}
    del trainers
    return times, scratch


def inference_times(model_name, args):
    from mmcv.cnn import fuse_conv_bn
    models = {}
    for variant in ('BN', 'GN', 'CBN k=4'):
        models[variant] = build_model(model_name, variant, args.device, args.cfg_options).eval()
    deployed = convert_cbn_to_bn(
        build_model(model_name, 'CBN k=4', args.device, args.cfg_options)).eval()
    models['CBN k=4 -> BN, folded into conv'] = fuse_conv_bn(deployed)
    data = {v: make_batch(m, 1, args.size, False) for v, m in models.items()}

    def predict(variant):
        def run():
            with torch.no_grad():
                models[variant](**data[variant], mode='predict')
            _sync(args.device)
        return run

    return interleaved({v: predict(v) for v in models}, 1, args.repeats)


def op_census(model_name, batch_size, args):
    """Compute ops one steady training step dispatches, forward and backward and then the
    optimizer's step (where CBN moves its running statistics and ends the iteration), per
    variant, counted as ``tests/test_step_census.py`` counts them."""
    from mmcbn.utils.op_census import STALLING, OpCensus
    counts = {}
    for variant in args.variants:
        trainer = Trainer(model_name, variant, batch_size, args.size, args.device,
                          args.cfg_options)
        warm = 1 + max((m.window_size for m in trainer.cbns), default=1)  # the window full
        for _ in range(warm):
            trainer.step()
        for m in trainer.cbns:
            m.iteration = trainer.iteration
        census = OpCensus()
        with census:
            losses = trainer.model(**trainer.data, mode='loss')
            loss, _ = trainer.model.parse_losses(losses)
            loss.backward()
        step_census = OpCensus()
        with step_census:
            trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        stalls = sum(op in STALLING or op.startswith('host:')
                     for op in census.ops + step_census.ops)
        counts[variant] = (len(census.ops), len(step_census.ops), stalls, len(trainer.cbns))
        del trainer
    return counts


def child_memory(model_name, variant, batch_size, args):
    """Runs in a fresh process: peak memory of a few training steps above the built model."""
    trainer = Trainer(model_name, variant, batch_size, args.size, args.device,
                          args.cfg_options)
    cuda = str(args.device).startswith('cuda')
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        sampler = _PeakRSS()
    # a CBN window is preallocated at its full size when its first entry is recorded
    for _ in range(3):
        trainer.step()
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.stop()
    print(json.dumps(dict(peak=peak - base, scratch=trainer.scratch_nbytes())))


class _PeakRSS:
    """Samples the resident set size every 2 ms in a thread (ru_maxrss would include the peak of
    building the model)."""

    def __init__(self):
        import threading
        self.peak = _rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(0.002):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self):
        self._done.set()
        self._thread.join()
        return max(self.peak, _rss_bytes())


def memory(model_name, batch_size, args):
    result = {}
    for variant in args.variants:
        cmd = [sys.executable, __file__, '--child', model_name, variant, str(batch_size),
               '--size', str(args.size), '--device', args.device]
        if args.cfg_options:
            cmd += ['--cfg-options'] + [f'{k}={v}' for k, v in args.cfg_options.items()]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        result[variant] = json.loads(out.strip().splitlines()[-1])
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', nargs='+', default=['mask_rcnn', 'faster_rcnn'],
                        choices=list(CONFIGS))
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--size', type=int, default=512, help='image side in pixels')
    parser.add_argument('--repeats', type=int, default=3, help='timed rounds')
    parser.add_argument('--memory', action='store_true', help='also measure peak memory')
    parser.add_argument('--no-inference', action='store_true')
    parser.add_argument('--census', action='store_true',
                        help='count the compute ops of one steady training step instead of timing')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override the model config, as in mmdet\'s tools (e.g. '
                        'model.backbone.depth=18 model.neck.in_channels=[64,128,256,512])')
    parser.add_argument('--child', nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    if args.device == 'cpu':
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.child:
        child_memory(args.child[0], args.child[1], int(args.child[2]), args)
        return
    for needed in set(BASELINE[v] for v in args.variants):
        if needed not in args.variants:
            args.variants.insert(0, needed)
    device_name = torch.cuda.get_device_name() if args.device.startswith('cuda') else \
        f'CPU, {torch.get_num_threads()} threads'
    print(f'# {device_name}; images {args.size}x{args.size}; median of {args.repeats} '
          f'interleaved rounds (vs BN: the median of the per-round ratios); '
          f'torch {torch.__version__}')
    for model_name in args.models:
        for batch_size in args.batches:
            if args.census:
                counts = op_census(model_name, batch_size, args)
                print(f'\n## {model_name}, {batch_size} image(s) per step: compute ops of one '
                      'steady training step\n')
                print('| variant | CBN layers | forward + backward | vs BN | optimizer step | '
                      'whole step vs BN | stalling ops |')
                print('|---|---:|---:|---:|---:|---:|---:|')
                for v, (ops, step_ops, stalls, layers) in counts.items():
                    base_ops, base_step = counts[BASELINE[v]][:2]
                    print(f'| {v} | {layers} | {ops:,} | {ops / base_ops:.2f}x | {step_ops:,} | '
                          f'{(ops + step_ops) / (base_ops + base_step):.2f}x | {stalls} |',
                          flush=True)
                continue
            times, scratch = train_times(model_name, batch_size, args)
            mem = memory(model_name, batch_size, args) if args.memory else None
            print(f'\n## {model_name}, {batch_size} image(s) per step: training\n')
            header = '| variant | step (s) | vs BN |' + (' peak memory over the model (MB) '
                                                          '| vs BN | CBN state (MB) |'
                                                          if mem else ' CBN state (MB) |')
            print(header)
            print('|---|---:|---:|' + ('---:|---:|---:|' if mem else '---:|'))
            for v in args.variants:
                base = BASELINE[v]
                row = (f'| {v} | {statistics.median(times[v]):.3f} | '
                       f'{paired_ratio(times, v, base):.2f}x |')
                if mem:
                    row += (f' {mem[v]["peak"] / 2**20:.0f} | '
                            f'{mem[v]["peak"] / mem[base]["peak"]:.2f}x |')
                row += f' {scratch[v] / 2**20:.1f} |'
                print(row + ('' if base == 'BN' else f' (vs {base})'), flush=True)
        if not args.no_inference and not args.census:
            inf = inference_times(model_name, args)
            print(f'\n## {model_name}: inference, 1 image, eval mode\n')
            print('| variant | time (s) | vs BN |\n|---|---:|---:|')
            for v, t in inf.items():
                print(f'| {v} | {statistics.median(t):.3f} | {paired_ratio(inf, v, "BN"):.2f}x |',
                      flush=True)


if __name__ == '__main__':
    main()
