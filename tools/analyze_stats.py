"""How well does each estimator recover the statistics of the last k batches at the current weights?

Trains an mmdet ResNet-18 with CBN (window k after a BN burn-in) from scratch at 2 images per step
to classify the shapes of the demo images (crops around each instance, 64x64). At chosen
iterations, right after the training forward, it recomputes the input statistics of every CBN layer
for each of the last k batches by running them through the network as it is at this iteration (the
current weights, each layer normalising with the statistics of this iteration's forward; nothing
recorded), the ground truth, and compares per layer, for the window as a whole (k batches pooled):

* BN: the current batch alone,
* naive CBN: the current batch pooled with the window's entries as recorded,
* CBN: the current batch pooled with the entries compensated to the current weights,

and, per entry, the recorded and the compensated statistics against the truth for that batch by
how many iterations back it is. Errors are relative to the layer's scale: mean |mean error| /
sqrt(mean var) and mean |var error| / mean var over channels, averaged over the measurement points. Prints tables and saves two plots
(error vs layer depth, error vs iterations back) as PNG.

  python tools/analyze_stats.py [--iters 1200] [--window 4] [--measure-every 100] [--out DIR]
"""
import argparse
import collections
import contextlib
import json
import os
import os.path as osp
import random
import statistics

os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import mmcbn  # noqa: E402,F401
from mmcbn import CrossIterationBatchNorm2d, bind_cbn_layers  # noqa: E402
from mmcbn.datasets import generate_shapes  # noqa: E402
from mmcbn.layers.conv_moments import (choose_position_sample, compensate,  # noqa: E402
                                       identity_excess, moment_derivatives, output_moments)

DATA_ROOT = 'data/demo_shapes'
ESTIMATORS = ('BN (batch only)', 'naive CBN', 'CBN')


def load_crops(root, size=64):
    """One crop per instance of the demo training images, resized to ``size``, and its class."""
    ann = json.load(open(osp.join(root, 'train.json')))
    files = {im['id']: im['file_name'] for im in ann['images']}
    by_image = collections.defaultdict(list)
    for a in ann['annotations']:
        by_image[a['image_id']].append(a)
    images, labels = [], []
    for image_id, anns in by_image.items():
        img = cv2.imread(osp.join(root, 'train', files[image_id]))[:, :, ::-1]
        for a in anns:
            x, y, w, h = a['bbox']
            pad = 0.15 * max(w, h)
            x0, y0 = int(max(0, x - pad)), int(max(0, y - pad))
            x1, y1 = int(min(img.shape[1], x + w + pad)), int(min(img.shape[0], y + h + pad))
            if x1 - x0 < 4 or y1 - y0 < 4:
                continue
            images.append(cv2.resize(np.ascontiguousarray(img[y0:y1, x0:x1]), (size, size)))
            labels.append(a['category_id'])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    y = torch.tensor(labels)
    _, y = torch.unique(y, return_inverse=True)
    return x, y


class Classifier(nn.Module):

    def __init__(self, window, num_classes):
        super().__init__()
        from mmdet.models.backbones import ResNet
        self.backbone = ResNet(18, norm_cfg=dict(type='CBN', window_size=window,
                                                 requires_grad=True),
                               norm_eval=False, frozen_stages=-1, out_indices=(3, ))
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x)[0].mean((2, 3)))


@contextlib.contextmanager
def truth_pass(cbns):
    """The network as it is at this iteration, as a fixed function: its current weights, every
    layer normalising with the statistics it used in this iteration's training forward. Reports
    each layer's input mean/var (float64) into the yielded dict; changes nothing."""
    seen = {}
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in cbns]
    handles = []
    as_batchnorm = contextlib.ExitStack()
    for i, m in enumerate(cbns):
        m.running_mean.copy_(m.last_mean)
        m.running_var.copy_(m.last_var)
        as_batchnorm.enter_context(m.as_batchnorm())
        m.eval()  # as a BatchNorm: evaluates with the statistics just set

        def hook(module, args, i=i):
            mean, var = output_moments(args[0].detach())
            seen[i] = (mean.double(), var.double())

        handles.append(m.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
        for m, (rm, rv) in zip(cbns, saved):
            m.running_mean.copy_(rm)
            m.running_var.copy_(rv)
            m.train()
        as_batchnorm.close()


def pooled(means, variances):
    """Mean/var of equally sized batches pooled: [E, C] each -> [C]."""
    mean = means.mean(0)
    return mean, (variances + (means - mean)**2).mean(0)


def rel_errors(mean, var, true_mean, true_var):
    """Errors relative to the layer's average true variance (a per-channel ratio would be ruled by
    near-dead channels whose variance is ~0 in a 2-image batch)."""
    scale = true_var.mean().clamp_min(1e-12)
    return (float((mean - true_mean).abs().mean() / scale.sqrt()),
            float((var - true_var).abs().mean() / scale))


class ConvInputs:
    """The input (and the conv's weights then) of each layer's bound conv in the last k training
    forwards (newest last)."""

    def __init__(self, cbns, k):
        self.inputs = [collections.deque(maxlen=k) for _ in cbns]
        self.weights = [collections.deque(maxlen=k) for _ in cbns]
        self.recording = True
        for i, m in enumerate(cbns):
            m.binding.module.register_forward_hook(self._hook(i))

    def _hook(self, i):
        def hook(module, args, output):
            if self.recording:
                self.inputs[i].append(args[0].detach().clone())
                self.weights[i].append((module.weight.detach().clone(),
                                        None if module.bias is None else
                                        module.bias.detach().clone()))
        return hook

    def compensated_with(self, cbns, i, age, budget, rng):
        """Batch ``age`` iterations back, its moments at the weights then, moved to the current
        weights with ``d E[y^2]/dW`` from about ``budget`` output positions (None: all)."""
        binding = cbns[i].binding
        x = self.inputs[i][-1 - age].double()
        w_old, b_old = (None if t is None else t.double() for t in self.weights[i][-1 - age])
        with torch.no_grad():
            y = binding.module._conv_forward(x, w_old, b_old)
            mean, var = output_moments(y)
            sample = choose_position_sample(tuple(y.shape), budget, rng)
            patch_mean, sqmean_grad = moment_derivatives(x, y, binding.geometry, w_old, b_old,
                                                         sample)
            excess = None if sample is None else identity_excess(sqmean_grad, w_old, b_old, mean,
                                                                 var)[None]
            conv = binding.module
            return compensate(mean[None], var[None], patch_mean[:, None], sqmean_grad[:, None],
                              conv.weight.double(), None if conv.bias is None else
                              conv.bias.double(), excess=excess)

    def local_truth(self, cbns, i, age):
        """Batch ``age`` iterations back through layer i's conv at its current weights (the
        conv's own input as recorded): what the first-order compensation aims at."""
        conv = cbns[i].binding.module
        with torch.no_grad():  # _conv_forward: no forward hooks, which would record this input
            y = conv._conv_forward(self.inputs[i][-1 - age], conv.weight, conv.bias).double()
        return output_moments(y)


def measure(net, cbns, recent, conv_inputs, budgets=(), rng=None):
    """Per layer: errors of the three window estimators and, per age, of the entries (and of
    entries compensated with derivatives from each of ``budgets`` positions, on their own conv)."""
    truths = []  # [age][layer] -> (mean, var), age 0 = the current batch
    conv_inputs.recording = False
    for x in list(recent)[::-1]:
        with truth_pass(cbns) as seen, torch.no_grad():
            net(x)
        truths.append([seen[i] for i in range(len(cbns))])
    conv_inputs.recording = True
    per_layer, per_age = [], collections.defaultdict(lambda: collections.defaultdict(list))
    for i, m in enumerate(cbns):
        w = m.window_stats()
        n = w['mean'].shape[0]
        if n == 0 or len(truths) < n + 1:
            return None, None
        valid = w['valid'] > 0
        t_mean = torch.stack([truths[a][i][0] for a in range(n + 1)])
        t_var = torch.stack([truths[a][i][1] for a in range(n + 1)])
        true_mean, true_var = pooled(t_mean, t_var)
        cur_mean, cur_var = t_mean[:1], t_var[:1]
        raw_mean = torch.cat([cur_mean, w['raw_mean'].double()[valid]])
        raw_var = torch.cat([cur_var, w['raw_var'].double()[valid]])
        comp_mean = torch.cat([cur_mean, w['mean'].double()[valid]])
        comp_var = torch.cat([cur_var, w['var'].double()[valid]])
        per_layer.append({
            'BN (batch only)': rel_errors(cur_mean[0], cur_var[0], true_mean, true_var),
            'naive CBN': rel_errors(*pooled(raw_mean, raw_var), true_mean, true_var),
            'CBN': rel_errors(*pooled(comp_mean, comp_var), true_mean, true_var),
        })
        for e in range(n):
            if not valid[e]:
                continue
            age = int(w['age'][e])
            tm, tv = truths[age][i]
            per_age[age]['naive CBN'].append(rel_errors(w['raw_mean'][e].double(),
                                                        w['raw_var'][e].double(), tm, tv))
            per_age[age]['CBN'].append(rel_errors(w['mean'][e].double(), w['var'][e].double(),
                                                  tm, tv))
            lm, lv = conv_inputs.local_truth(cbns, i, age)
            per_age[age]['naive CBN, own conv'].append(rel_errors(
                w['raw_mean'][e].double(), w['raw_var'][e].double(), lm, lv))
            per_age[age]['CBN, own conv'].append(rel_errors(w['mean'][e].double(),
                                                            w['var'][e].double(), lm, lv))
            for budget in (None, ) + tuple(budgets) if budgets else ():
                bm, bv = conv_inputs.compensated_with(cbns, i, age, budget, rng)
                per_age[age][f'own conv, {budget or "all"} positions'].append(
                    rel_errors(bm[0], bv[0], lm, lv))
    return per_layer, per_age


def plot(per_layer, per_age, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    depth = range(1, len(per_layer) + 1)
    for est in ESTIMATORS:
        axes[0].semilogy(depth, [layer[est][1] for layer in per_layer], 'o-', label=est)
    axes[0].set_xlabel('CBN layer (depth order)')
    axes[0].set_ylabel('relative error of the variance\n(k batches at the current weights)')
    axes[0].legend()
    ages = sorted(per_age)
    for est, label in (('naive CBN', 'naive, whole network'), ('CBN', 'CBN, whole network'),
                       ('naive CBN, own conv', 'naive, own conv'),
                       ('CBN, own conv', 'CBN, own conv')):
        axes[1].semilogy(ages, [statistics.mean(e[1] for e in per_age[a][est]) for a in ages],
                         'o-', label=f'{label}: variance')
    axes[1].set_xlabel('iterations back')
    axes[1].set_ylabel('relative error of one entry')
    axes[1].set_xticks(ages)
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--iters', type=int, default=1200)
    parser.add_argument('--window', type=int, default=4)
    parser.add_argument('--burn-in', type=int, default=100)
    parser.add_argument('--measure-every', type=int, default=100)
    parser.add_argument('--lr', type=float, default=1e-3, help='AdamW learning rate')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='work_dirs/analyze_stats')
    parser.add_argument('--crop', type=int, default=64, help='crop side in pixels')
    parser.add_argument('--derivative-positions', type=int, nargs='*', default=[],
                        help='also compensate each entry, on its own conv, with d E[y^2]/dW from '
                        'about this many output positions (and with all of them), on the same '
                        'trajectory')
    parser.add_argument('--data-root', default=DATA_ROOT,
                        help='a COCO-format shapes set (default: the demo set, generated on '
                        'first use)')
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if args.data_root == DATA_ROOT:
        generate_shapes(DATA_ROOT)
    images, labels = load_crops(args.data_root, args.crop)
    torch.manual_seed(args.seed)
    net = Classifier(args.window, int(labels.max()) + 1)
    bind_cbn_layers(net)
    cbns = [m for m in net.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    # AdamW: at 2 images per step SGD (lr 0.005 and 0.05) left this classifier at chance accuracy
    # after 600 iterations; with AdamW 1e-3 it learns (training accuracy ~0.6 at 1000-1200)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    recent = collections.deque(maxlen=args.window)
    conv_inputs = ConvInputs(cbns, args.window)
    per_layer_all, per_age_all = [], collections.defaultdict(lambda: collections.defaultdict(list))
    correct = collections.deque(maxlen=200)
    sample_rng = random.Random(args.seed)
    for it in range(args.iters):
        for m in cbns:
            m.effective_window = 1 if it < args.burn_in else args.window
            m.iteration = it
        idx = torch.randint(0, len(images), (2, ), generator=gen)
        x = images[idx]
        recent.append(x)
        logits = net(x)
        correct.extend((logits.argmax(1) == labels[idx]).tolist())
        if it >= args.burn_in + args.window and (it + 1) % args.measure_every == 0:
            per_layer, per_age = measure(net, cbns, recent, conv_inputs,
                                         args.derivative_positions, sample_rng)
            if per_layer is not None:
                per_layer_all.append(per_layer)
                for age, d in per_age.items():
                    for est in d:
                        per_age_all[age][est] += d[est]
                print(f'iteration {it + 1}: measured {len(per_layer)} layers; recent training '
                      f'accuracy {sum(correct) / len(correct):.2f}', flush=True)
        loss = nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if not per_layer_all:
        raise SystemExit('no measurement was taken: raise --iters or lower --measure-every')
    # average over measurement points
    per_layer = [{est: tuple(statistics.mean(p[i][est][j] for p in per_layer_all)
                             for j in range(2)) for est in ESTIMATORS}
                 for i in range(len(per_layer_all[0]))]
    print(f'\n{len(cbns)} CBN layers of a ResNet-18, window {args.window}, 2 images per step, '
          f'AdamW lr {args.lr}; averaged over {len(per_layer_all)} measurement points; '
          'relative errors against the k batches recomputed at the current weights\n')
    print('| layer | ' + ' | '.join(f'{e}: mean / var' for e in ESTIMATORS) + ' |')
    print('|---|' + '---:|' * len(ESTIMATORS))
    names = [n for n, m in net.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
    for name, layer in zip(names, per_layer):
        print(f'| {name} | ' + ' | '.join(f'{layer[e][0]:.4f} / {layer[e][1]:.4f}'
                                          for e in ESTIMATORS) + ' |')
    overall = {e: tuple(statistics.mean(layer[e][j] for layer in per_layer) for j in range(2))
               for e in ESTIMATORS}
    print('| **all layers** | ' + ' | '.join(f'**{overall[e][0]:.4f} / {overall[e][1]:.4f}**'
                                             for e in ESTIMATORS) + ' |')
    print('\nOne entry against its batch at the current weights: through the whole network as it is '
          'now, and through the layer\'s own conv only (the entry\'s recorded conv input at the '
          'current conv weights: what the compensation targets)\n')
    print('| iterations back | whole network: naive entry | whole network: compensated entry | '
          'own conv: naive entry | own conv: compensated entry |')
    print('|---:|---:|---:|---:|---:|')
    cols = ('naive CBN', 'CBN', 'naive CBN, own conv', 'CBN, own conv')
    for age in sorted(per_age_all):
        cells = [' / '.join(f'{statistics.mean(e[j] for e in per_age_all[age][est]):.4f}'
                            for j in range(2)) for est in cols]
        print(f'| {age} | ' + ' | '.join(cells) + ' |')
    if args.derivative_positions:
        print('\nOne entry on its own conv, compensated with d E[y^2]/dW from all output positions '
              'and from about B of them (per layer: smaller maps stay exact); mean / var error\n')
        budgets = [None] + args.derivative_positions
        cols = [f'own conv, {b or "all"} positions' for b in budgets]
        print('| iterations back | ' + ' | '.join(f'{b or "all"} positions' for b in budgets) +
              ' |')
        print('|---:|' + '---:|' * len(budgets))
        for age in sorted(per_age_all):
            print(f'| {age} | ' + ' | '.join(
                ' / '.join(f'{statistics.mean(e[j] for e in per_age_all[age][c]):.5f}'
                           for j in range(2)) for c in cols) + ' |')
        all_ages = [statistics.mean(e[1] for a in per_age_all for e in per_age_all[a][c])
                    for c in cols]
        print('| **all** | ' + ' | '.join(f'**{v:.5f}**' for v in all_ages) + ' |')
    own = [statistics.mean(e[1] for a in per_age_all for e in per_age_all[a][est])
           for est in ('naive CBN, own conv', 'CBN, own conv')]
    print(f'\nown conv, variance error of an entry, naive / compensated: '
          f'{own[0] / max(own[1], 1e-12):.1f}x')
    ratio = overall['naive CBN'][1] / max(overall['CBN'][1], 1e-12)
    print(f'whole network, variance error of the window, naive / compensated: {ratio:.1f}x')
    os.makedirs(args.out, exist_ok=True)
    path = osp.join(args.out, 'analyze_stats.png')
    plot(per_layer, per_age_all, path)
    print(f'plots: {path}')


if __name__ == '__main__':
    main()
