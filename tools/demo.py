"""The embedded demo: train CBN Mask R-CNN from scratch on the synthetic shapes set, on the CPU.

Generates the data on first use (data/demo_shapes), trains configs/demo/<config>, evaluates bbox and
segm mAP on the validation images, and saves a grid of predictions as a PNG in the work dir.

  python tools/demo.py [--config configs/demo/mask-rcnn_r18_fpn_cbn_shapes.py] [--work-dir DIR]
"""
import argparse
import json
import os
import os.path as osp
import time

os.environ.setdefault('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import mmcbn  # noqa: E402,F401
from mmcbn.datasets import CLASSES, generate_shapes  # noqa: E402

DEFAULT_CONFIG = 'configs/demo/mask-rcnn_r18_fpn_cbn_shapes.py'
PALETTE = np.array([(230, 80, 60), (60, 180, 75), (70, 110, 240)], np.uint8)  # RGB per class


class KeepValMetrics(Hook):
    """Remembers the metrics of the last validation."""
    priority = 'VERY_LOW'

    def __init__(self):
        self.metrics = {}

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics or {})


def objects_to_draw(bboxes, scores, score_thr=0.3, iou_thr=0.5):
    """Indices of the detections worth drawing, highest score first.

    Those scoring at least ``score_thr``; of detections that overlap by more than ``iou_thr``
    (IoU), whatever their classes, only the best: a young detector splits one object's score over
    several classes, and drawing every class's box would hide the object under three labels.
    """
    from mmcv.ops import nms
    candidates = torch.nonzero(scores >= score_thr).flatten()
    if candidates.numel() == 0:
        return candidates
    _, keep = nms(bboxes[candidates].float(), scores[candidates].float(), iou_thr)
    return candidates[keep]


def draw_predictions(model, dataset, indices, score_thr=0.3, cell=192):
    """A grid of validation images with predicted masks, boxes and class names (RGB uint8): per
    object the best class scoring at least ``score_thr`` (:func:`objects_to_draw`)."""
    import cv2
    from mmengine.dataset import pseudo_collate
    cells = []
    model.eval()
    with torch.no_grad():
        for i in indices:
            data = pseudo_collate([dataset[i]])
            result = model.test_step(data)[0]
            img = cv2.cvtColor(cv2.imread(result.img_path), cv2.COLOR_BGR2RGB)
            inst = result.pred_instances
            keep = objects_to_draw(inst.bboxes, inst.scores, score_thr)
            for box, label, mask, score in zip(inst.bboxes[keep], inst.labels[keep],
                                               inst.masks[keep], inst.scores[keep]):
                colour = PALETTE[int(label)]
                m = mask.cpu().numpy().astype(bool)
                img[m] = (0.5 * img[m] + 0.5 * colour).astype(np.uint8)
                x1, y1, x2, y2 = (int(v) for v in box.tolist())
                cv2.rectangle(img, (x1, y1), (x2, y2), tuple(int(c) for c in colour), 1)
                cv2.putText(img, f'{CLASSES[int(label)]} {score:.2f}', (x1, max(y1 - 3, 8)),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.32, (255, 255, 255), 1, cv2.LINE_AA)
            canvas = np.zeros((cell, cell, 3), np.uint8)
            h, w = img.shape[:2]
            canvas[:min(h, cell), :min(w, cell)] = img[:cell, :cell]
            cells.append(canvas)
    rows = [np.concatenate(cells[r:r + 4], axis=1) for r in range(0, len(cells), 4)]
    return np.concatenate(rows, axis=0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--work-dir', default=None)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)

    start = time.time()
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    data_root = cfg.train_dataloader.dataset.data_root
    print(f'demo data: {generate_shapes(data_root.rstrip("/"))} (generated on first use)')
    cfg.work_dir = args.work_dir or osp.join(
        'work_dirs', 'demo', osp.splitext(osp.basename(args.config))[0])
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    runner = Runner.from_cfg(cfg)
    keeper = KeepValMetrics()
    runner.register_hook(keeper)
    runner.train()

    grid = draw_predictions(runner.model, runner.val_dataloader.dataset, range(8))
    picture = osp.join(cfg.work_dir, 'predictions.png')
    import cv2
    cv2.imwrite(picture, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    metrics = {k: float(v) for k, v in keeper.metrics.items() if np.isscalar(v)}
    metrics_file = osp.join(cfg.work_dir, 'metrics.json')
    with open(metrics_file, 'w') as f:
        json.dump(dict(config=args.config, seconds=round(time.time() - start, 1), **metrics), f,
                  indent=1)
    print('\n' + '=' * 70)
    print(f"bbox mAP {metrics.get('coco/bbox_mAP', float('nan')):.3f}   "
          f"segm mAP {metrics.get('coco/segm_mAP', float('nan')):.3f}   "
          f'({time.time() - start:.0f} s in all)')
    print(f'metrics:     {metrics_file}')
    print(f'predictions: {picture}')
    print(f'checkpoint and logs: {cfg.work_dir}')
    return metrics


if __name__ == '__main__':
    main()
