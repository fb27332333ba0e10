"""The paper in miniature: the demo detector trained from scratch with BN, GN, naive CBN and CBN.

Trains the demo Mask R-CNN (configs/demo/) on the embedded shapes data with

* BN at 2 and at 8 images per step (the large-batch reference: the same number of epochs, a
  quarter of the iterations, AdamW's learning rate scaled by sqrt(4)),
* GN, naive CBN (compensation off) and CBN at 2 images per step,

for each seed, and evaluates bbox/segm mAP on the validation images. Every BN-type model is
evaluated three ways from the same training run: with the plain running statistics (BN's EMA), with
the EMA compensated to the final weights (``compensate_running_stats``) and with statistics
re-estimated over 200 training images at the final weights (precise BN). The BN models are built
with CBN layers of window 1, which are nn.BatchNorm2d exactly plus the tracked derivatives.

Prints a markdown table (mean +- std over seeds), writes results.json after every run (a rerun
skips the runs already there) and a bar chart, compare_norms.png, into the work dir.

  python tools/compare_norms.py [--seeds 0 1] [--variants BN-2 CBN-2] [--work-dir DIR]

Several processes may share a work dir (each adds its runs to results.json under a file lock), e.g.
two with ``--threads 1`` on a 2-core machine, each with its own variants.

The window_grad grid (issue 15; about 8 x 17 min per seed on 2 cores):

  python tools/compare_norms.py --seeds 0 1 2 --variants CBN-2 CBN-2-k4-stop-grad CBN-2-k8 \
      CBN-2-k8-stop-grad CBN-2-k4-no-burn-in CBN-2-k4-stop-grad-no-burn-in CBN-2-k8-no-burn-in \
      CBN-2-k8-stop-grad-no-burn-in
"""
import argparse
import fcntl
import json
import os
import os.path as osp
import statistics
import time
from typing import List, Optional

os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')

import torch  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import mmcbn  # noqa: E402,F401
from compare_running_stats import PlainRunningStats  # noqa: E402
from mmcbn.datasets import generate_shapes  # noqa: E402
from mmcbn.engine.precise_stats import loader_batches, recompute_running_stats  # noqa: E402

BN_CONFIG = 'configs/demo/mask-rcnn_r18_fpn_bn_shapes.py'
GN_CONFIG = 'configs/demo/mask-rcnn_r18_fpn_gn_shapes.py'
CBN_CONFIG = 'configs/demo/mask-rcnn_r18_fpn_cbn_shapes.py'
PRECISE_IMAGES = 200
STATS = ('EMA', 'compensated EMA', 'precise')


def _bn_as_window_one(cfg):
    norm = dict(type='CBN', window_size=1, requires_grad=True)
    cfg.model.backbone.norm_cfg = norm
    cfg.model.neck.norm_cfg = norm
    cfg.custom_hooks = [dict(type='CBNHook')]  # binds the layers (for the tracked derivatives)


def _large_batch(cfg, factor=4):
    max_iters = cfg.train_cfg.max_iters // factor
    cfg.train_dataloader.batch_size *= factor
    cfg.train_cfg.max_iters = max_iters
    cfg.param_scheduler[0].end = max(1, cfg.param_scheduler[0].end // factor)
    cfg.param_scheduler[1].end = max_iters
    cfg.param_scheduler[1].milestones = [m // factor for m in cfg.param_scheduler[1].milestones]
    cfg.optim_wrapper.optimizer.lr *= factor**0.5


def _naive(cfg):
    cfg.model.backbone.norm_cfg.compensation = False
    cfg.model.neck.norm_cfg.compensation = False


def _stop_grad(cfg):
    """The paper's backward: no gradient through the compensated entries."""
    cfg.model.backbone.norm_cfg.window_grad = False
    cfg.model.neck.norm_cfg.window_grad = False


def _window_8(cfg):
    cfg.model.backbone.norm_cfg.window_size = 8
    cfg.model.neck.norm_cfg.window_size = 8


def _no_burn_in(cfg):
    for hook in cfg.custom_hooks:
        if hook.get('type') == 'CBNHook':
            hook['burnin_iters'] = 0


def _window_grad_grid():
    """Issue 15's grid: window_grad on/off x window 4/8 x burn-in on/off; its first cell
    (window_grad, window 4, burn-in) is CBN-2."""
    grid = {}
    for burn_key, burn_name, burn_edits in (('', '', []), ('-no-burn-in', ', no burn-in',
                                                               [_no_burn_in])):
        for window, window_edits in (('k4', []), ('k8', [_window_8])):
            for grad_key, grad_edits in (('', []), ('-stop-grad', [_stop_grad])):
                edits = window_edits + grad_edits + burn_edits
                if edits:
                    grid[f'CBN-2-{window}{grad_key}{burn_key}'] = (
                        f'CBN {window}{" stop-grad" if grad_key else ""}{burn_name}, 2 img/step',
                        CBN_CONFIG, edits)
    return grid


VARIANTS = {
    'BN-2': ('BN, 2 img/step', BN_CONFIG, [_bn_as_window_one]),
    'BN-8': ('BN, 8 img/step', BN_CONFIG, [_bn_as_window_one, _large_batch]),
    'GN-2': ('GN, 2 img/step', GN_CONFIG, []),
    'naive-CBN-2': ('naive CBN, 2 img/step', CBN_CONFIG, [_naive]),
    'CBN-2': ('CBN, 2 img/step', CBN_CONFIG, []),
}
MAIN_VARIANTS = list(VARIANTS)
VARIANTS.update(_window_grad_grid())


def evaluate_three_ways(runner, plain_stats, precise_images=PRECISE_IMAGES):
    """mAPs with the plain EMA, the compensated EMA and precise statistics (one training run)."""
    model = runner.model
    results = {}
    with plain_stats.loaded():
        results['EMA'] = runner.val_loop.run()
    results['compensated EMA'] = runner.val_loop.run()  # the layers' own buffers

    def forward(module, batch):
        return module(**module.data_preprocessor(batch, True), mode='loss')

    batches = max(1, precise_images // runner.train_dataloader.batch_size)
    report = recompute_running_stats(model, loader_batches(runner.train_dataloader), forward,
                                     batches)
    print(f'precise statistics: {report.num_layers} layers, {report.num_batches} batches, '
          f'{report.seconds:.0f} s', flush=True)
    results['precise'] = runner.val_loop.run()
    return results


def _shorter(cfg, iters):
    """The same schedule shape over ``iters`` iterations (for a quick check of the tool)."""
    cfg.train_cfg.max_iters = iters
    cfg.param_scheduler[0].end = max(1, iters // 10)
    cfg.param_scheduler[1].end = iters
    cfg.param_scheduler[1].milestones = [int(iters * 0.7), int(iters * 0.9)]


def _with_data_root(cfg, root):
    root = root.rstrip('/') + '/'
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = root
    cfg.val_evaluator.ann_file = cfg.test_evaluator.ann_file = root + 'val.json'


def variant_config(key, seed, work_dir, iters=None, data_root=None):
    """The config of one run: the variant's demo config with its edits, evaluated by this tool."""
    _, config, edits = VARIANTS[key]
    cfg = Config.fromfile(config)
    if iters:
        _shorter(cfg, iters)
    if data_root:
        _with_data_root(cfg, data_root)
    for edit in edits:
        edit(cfg)
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = osp.join(work_dir, f'{key}_seed{seed}')
    cfg.train_cfg.val_begin = cfg.train_cfg.max_iters + 1  # evaluated below, three ways
    for hook in cfg.get('custom_hooks', []):
        if hook.get('type') == 'CBNHook':
            hook['precise_bn_batches'] = 0  # the config's own re-estimation would replace the EMA
    for norm_cfg in (cfg.model.backbone.norm_cfg, cfg.model.neck.norm_cfg):
        # the layer's default, so that the compensated EMA is tracked and can be evaluated
        norm_cfg.pop('compensate_running_stats', None)
    cfg.default_hooks.checkpoint = None
    return cfg


def run_one(key, seed, work_dir, iters=None, data_root=None, precise_images=PRECISE_IMAGES):
    cfg = variant_config(key, seed, work_dir, iters, data_root)
    if not data_root:
        generate_shapes(cfg.train_dataloader.dataset.data_root.rstrip('/'))
    start = time.time()
    runner = Runner.from_cfg(cfg)
    plain_stats = PlainRunningStats(runner.model)
    runner.train()
    train_seconds = time.time() - start
    has_bn = any(isinstance(m, _BatchNorm) for m in runner.model.modules())
    evals = evaluate_three_ways(runner, plain_stats, precise_images) if has_bn else {
        'EMA': runner.val_loop.run()}
    return dict(variant=key, seed=seed, train_seconds=round(train_seconds, 1),
                **{f'{stats}/{metric}': float(values[f'coco/{metric}_mAP'])
                   for stats, values in evals.items() for metric in ('bbox', 'segm')})


def _summary(values):
    if not values:
        return '-'
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.3f} +- {std:.3f}'


def table(results):
    lines = ['| variant | seeds | ' + ' | '.join(f'{m} mAP, {s}' for m in ('bbox', 'segm')
                                                  for s in STATS) + ' | train time (s) |',
             '|---|---:|' + '---:|' * (2 * len(STATS)) + '---:|']
    for key, (name, _, _) in VARIANTS.items():
        rows = [r for r in results if r['variant'] == key]
        if not rows:
            continue
        cells = [_summary([r[f'{s}/{m}'] for r in rows if f'{s}/{m}' in r])
                 for m in ('bbox', 'segm') for s in STATS]
        lines.append(f'| {name} | {len(rows)} | ' + ' | '.join(cells) +
                     f" | {statistics.mean(r['train_seconds'] for r in rows):.0f} |")
    return '\n'.join(lines)


def bar_chart(results, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = [k for k in VARIANTS if any(r['variant'] == k for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(STATS)
    for ax, metric in zip(axes, ('bbox', 'segm')):
        for j, stats in enumerate(STATS):
            means, stds = [], []
            for k in keys:
                vals = [r[f'{stats}/{metric}'] for r in results
                        if r['variant'] == k and f'{stats}/{metric}' in r]
                means.append(statistics.mean(vals) if vals else 0.0)
                stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.bar([i + (j - 1) * width for i in range(len(keys))], means, width, yerr=stds,
                   label=stats, capsize=3)
        ax.set_xticks(range(len(keys)), [VARIANTS[k][0] for k in keys], rotation=20, ha='right')
        ax.set_ylabel(f'{metric} mAP (demo val)')
        ax.grid(axis='y', alpha=0.3)
    axes[0].legend(title='eval statistics')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_results(path: str, add: Optional[dict] = None) -> List[dict]:
    """The runs in ``path``, read (and with ``add``, extended and written) under a file lock, so
    that processes sharing a work dir never drop each other's runs."""
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.load(open(path)) if osp.exists(path) else []
        if add is not None:
            results.append(add)
            with open(path, 'w') as f:
                json.dump(results, f, indent=1)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0])
    parser.add_argument('--variants', nargs='+', default=MAIN_VARIANTS, choices=list(VARIANTS),
                        help='default: the norm comparison; the CBN-2-k=... keys are the '
                        'window_grad grid')
    parser.add_argument('--work-dir', default='work_dirs/compare_norms')
    parser.add_argument('--iters', type=int, default=None,
                        help='train this many iterations at 2 images per step instead of the '
                        "demo's 1000 (a quick check; BN-8 runs a quarter of them)")
    parser.add_argument('--data-root', default=None,
                        help='another COCO-format shapes set (default: the demo set, generated '
                        'on first use)')
    parser.add_argument('--precise-images', type=int, default=PRECISE_IMAGES,
                        help='training images the precise statistics are re-estimated over')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads (default: every core)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    os.makedirs(args.work_dir, exist_ok=True)
    results_file = osp.join(args.work_dir, 'results.json')
    for seed in args.seeds:
        for key in args.variants:
            if any(r['variant'] == key and r['seed'] == seed for r in read_results(results_file)):
                continue
            result = run_one(key, seed, args.work_dir, args.iters, args.data_root,
                             args.precise_images)
            results = read_results(results_file, add=result)
            print(table(results), flush=True)
    results = read_results(results_file)
    chart = osp.join(args.work_dir, 'compare_norms.png')
    bar_chart(results, chart)
    print(f'\n{table(results)}\n\nresults: {results_file}\nchart: {chart}')


if __name__ == '__main__':
    main()
