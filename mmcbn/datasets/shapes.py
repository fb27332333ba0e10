"""The embedded demo data: a synthetic instance-segmentation set in COCO format, made on first use.

Images of 128-192 px with 1-4 circles, squares and triangles of varied size and colour on textured
backgrounds; later shapes occlude earlier ones and each mask is the visible part. Deterministic for a
seed; written to ``root`` (``train.json``, ``val.json``, ``train/``, ``val/``, ``manifest.json``) and
regenerated when any of it is missing or unreadable.
"""
import json
import os
import os.path as osp
import shutil
from typing import Dict, List, Tuple

import numpy as np

CLASSES = ('circle', 'square', 'triangle')
FORMAT_VERSION = 1
DEFAULT_ROOT = 'data/demo_shapes'
MIN_VISIBLE_PIXELS = 40


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random texture: a few oriented sinusoids and blobs, tinted, plus grain."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    tex = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(2, 5)):
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.02, 0.12)
        tex += rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * freq *
                                              (xx * np.cos(theta) + yy * np.sin(theta)) +
                                              rng.uniform(0, 2 * np.pi))
    tex = (tex - tex.min()) / (np.ptp(tex) + 1e-6)
    base, tint = rng.uniform(40, 160, 3), rng.uniform(-60, 60, 3)
    img = base[None, None] + tint[None, None] * tex[..., None] + rng.normal(0, 8, (h, w, 3))
    return img


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    size = rng.uniform(0.12, 0.35) * min(h, w)
    cy, cx = rng.uniform(size * 0.6, h - size * 0.6), rng.uniform(size * 0.6, w - size * 0.6)
    dy, dx = yy - cy, xx - cx
    if kind == 'circle':
        return dy**2 + dx**2 <= (size / 2)**2
    angle = rng.uniform(0, np.pi / 2)
    ry = dy * np.cos(angle) - dx * np.sin(angle)
    rx = dy * np.sin(angle) + dx * np.cos(angle)
    if kind == 'square':
        return (np.abs(ry) <= size / 2) & (np.abs(rx) <= size / 2)
    # an equilateral triangle: inside three half-planes
    r = size / np.sqrt(3)
    inside = np.ones((h, w), bool)
    for k in range(3):
        a = angle + 2 * np.pi * k / 3
        inside &= (dy * np.cos(a) + dx * np.sin(a)) <= r / 2
    return inside


def _draw(rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    h, w = (int(v) for v in rng.integers(128, 193, 2))
    img = _background(rng, h, w)
    objects = []
    for _ in range(rng.integers(1, 5)):
        label = int(rng.integers(0, len(CLASSES)))
        mask = _shape_mask(rng, CLASSES[label], h, w)
        colour = rng.uniform(0, 255, 3)
        shade = 1 + 0.15 * rng.standard_normal((h, w, 1))
        img = np.where(mask[..., None], colour[None, None] * shade, img)
        objects = [(lbl, m & ~mask) for lbl, m in objects]  # the new shape hides what it covers
        objects.append((label, mask))
    return np.clip(img, 0, 255).astype(np.uint8), objects


def _annotation(mask: np.ndarray, label: int, image_id: int, ann_id: int) -> Dict:
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return dict(id=ann_id, image_id=image_id, category_id=label + 1, segmentation=rle,
                area=float(mask.sum()), bbox=[x, y, w, h], iscrowd=0)


def _write_split(root: str, split: str, num_images: int, seed: int) -> None:
    import cv2
    rng = np.random.default_rng(seed)
    os.makedirs(osp.join(root, split), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        img, objects = _draw(rng)
        name = f'{image_id:05d}.png'
        cv2.imwrite(osp.join(root, split, name), img)  # stored as BGR, as mmcv reads it back
        images.append(dict(id=image_id, file_name=name, height=img.shape[0], width=img.shape[1]))
        for label, mask in objects:
            if mask.sum() >= MIN_VISIBLE_PIXELS:
                annotations.append(_annotation(mask, label, image_id, len(annotations) + 1))
    categories = [dict(id=i + 1, name=n, supercategory='shape') for i, n in enumerate(CLASSES)]
    with open(osp.join(root, f'{split}.json'), 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)


def _manifest(num_train: int, num_val: int, seed: int) -> Dict:
    return dict(version=FORMAT_VERSION, seed=seed, train=num_train, val=num_val)


def is_complete(root: str, num_train: int = 500, num_val: int = 100, seed: int = 0) -> bool:
    """Whether ``root`` holds exactly the set these arguments generate, readable."""
    try:
        with open(osp.join(root, 'manifest.json')) as f:
            if json.load(f) != _manifest(num_train, num_val, seed):
                return False
        for split, count in (('train', num_train), ('val', num_val)):
            with open(osp.join(root, f'{split}.json')) as f:
                coco = json.load(f)
            if len(coco['images']) != count:
                return False
            for image in coco['images']:
                path = osp.join(root, split, image['file_name'])
                if not osp.isfile(path) or osp.getsize(path) == 0:
                    return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def generate_shapes(root: str = DEFAULT_ROOT, num_train: int = 500, num_val: int = 100,
                    seed: int = 0, force: bool = False) -> str:
    """Generates the demo set into ``root`` unless it is already there and complete.

    Returns:
        ``root``.
    """
    if not force and is_complete(root, num_train, num_val, seed):
        return root
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    _write_split(root, 'train', num_train, seed)
    _write_split(root, 'val', num_val, seed + 1)
    with open(osp.join(root, 'manifest.json'), 'w') as f:  # written last: marks completion
        json.dump(_manifest(num_train, num_val, seed), f)
    return root


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description='Generate the demo shapes set.')
    parser.add_argument('--root', default=DEFAULT_ROOT)
    parser.add_argument('--force', action='store_true')
    args = parser.parse_args()
    print(generate_shapes(args.root, force=args.force))
