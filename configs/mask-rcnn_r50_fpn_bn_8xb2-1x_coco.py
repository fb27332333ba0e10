# Baseline: cbn_mask_rcnn.py's placement and schedule with plain BN (per-GPU statistics).
_base_ = './cbn_mask_rcnn.py'
bn_norm_cfg = dict(_delete_=True, type='BN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=bn_norm_cfg),
    neck=dict(norm_cfg=bn_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=bn_norm_cfg), mask_head=dict(norm_cfg=bn_norm_cfg)))
custom_hooks = []
