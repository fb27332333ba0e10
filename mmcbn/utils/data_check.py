"""A clear error for a dataset that is not where the config expects it."""
import os.path as osp
from typing import List


class DatasetNotFoundError(FileNotFoundError):
    """A config's dataset files are missing."""


def _dataset_cfgs(cfg) -> List[tuple]:
    found = []
    for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(split)
        if not loader:
            continue
        dataset = loader.get('dataset', {})
        while 'dataset' in dataset:  # wrappers such as RepeatDataset
            dataset = dataset['dataset']
        found.append((split, dataset))
    return found


def check_dataset_files(cfg, splits=('train_dataloader', 'val_dataloader', 'test_dataloader')):
    """Raises :class:`DatasetNotFoundError` naming the missing path and how to point elsewhere.

    Only local annotation files are checked (``data_root`` joined with ``ann_file``); a dataset
    with a custom backend or without ``ann_file`` is left to the dataset itself.
    """
    for split, dataset in _dataset_cfgs(cfg):
        if split not in splits or not dataset.get('ann_file'):
            continue
        root = dataset.get('data_root') or ''
        backend = dataset.get('backend_args') or {}
        if backend.get('backend', 'local') != 'local' or '://' in root:
            continue
        ann = osp.join(root, dataset['ann_file'])
        if not osp.exists(ann):
            raise DatasetNotFoundError(
                f'{split}: the annotation file {ann!r} does not exist (data_root='
                f'{root!r}, ann_file={dataset["ann_file"]!r}). Put the dataset there (for COCO: '
                f'{root or "data/coco/"}annotations/ and train2017/, val2017/), or point the config '
                f'elsewhere, e.g. --cfg-options {split}.dataset.data_root=/path/to/coco/ '
                '(set it for train_dataloader, val_dataloader and test_dataloader alike, and '
                'val_evaluator.ann_file / test_evaluator.ann_file for COCO metrics).')
