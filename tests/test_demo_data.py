"""The synthetic demo set: deterministic, complete, regenerated when damaged, readable by mmdet."""
import json
import os

import numpy as np
from pycocotools import mask as mask_utils

from mmcbn.datasets import CLASSES, generate_shapes, is_complete


def test_generation_is_deterministic_and_valid(tmp_path):
    a = generate_shapes(str(tmp_path / 'a'), num_train=6, num_val=3, seed=5)
    b = generate_shapes(str(tmp_path / 'b'), num_train=6, num_val=3, seed=5)
    for split in ('train', 'val'):
        with open(f'{a}/{split}.json') as f:
            ja = json.load(f)
        with open(f'{b}/{split}.json') as f:
            assert json.load(f) == ja
        assert [c['name'] for c in ja['categories']] == list(CLASSES)
        assert ja['annotations'], split
        for ann in ja['annotations']:
            mask = mask_utils.decode(ann['segmentation'])
            image = next(i for i in ja['images'] if i['id'] == ann['image_id'])
            assert mask.shape == (image['height'], image['width'])
            assert 128 <= image['height'] <= 192 and 128 <= image['width'] <= 192
            assert mask.sum() == ann['area'] >= 40
            ys, xs = np.nonzero(mask)  # the box is the visible mask's extent
            assert ann['bbox'] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]
    assert is_complete(a, 6, 3, 5) and not is_complete(a, 6, 3, 6)


def test_damaged_set_is_regenerated(tmp_path):
    root = generate_shapes(str(tmp_path / 's'), num_train=4, num_val=2, seed=1)
    with open(f'{root}/train.json') as f:
        original = json.load(f)
    os.remove(f'{root}/train/00002.png')
    assert not is_complete(root, 4, 2, 1)
    generate_shapes(root, num_train=4, num_val=2, seed=1)
    assert is_complete(root, 4, 2, 1)
    with open(f'{root}/val.json', 'w') as f:
        f.write('{not json')
    assert not is_complete(root, 4, 2, 1)
    generate_shapes(root, num_train=4, num_val=2, seed=1)
    with open(f'{root}/train.json') as f:
        assert json.load(f) == original


def test_mmdet_coco_dataset_reads_it(tmp_path):
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules
    register_all_modules()
    root = generate_shapes(str(tmp_path / 's'), num_train=4, num_val=2, seed=2)
    dataset = CocoDataset(
        data_root=root + '/', ann_file='train.json', data_prefix=dict(img='train/'),
        metainfo=dict(classes=CLASSES),
        pipeline=[dict(type='LoadImageFromFile'),
                  dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                  dict(type='PackDetInputs')])
    sample = dataset[0]
    inst = sample['data_samples'].gt_instances
    assert len(inst) > 0 and inst.masks.masks.shape[0] == len(inst)
    assert sample['inputs'].shape[0] == 3
