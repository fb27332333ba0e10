# Baseline: cbn_mask_rcnn.py's placement and schedule with SyncBN (statistics over all GPUs).
_base_ = './cbn_mask_rcnn.py'
syncbn_norm_cfg = dict(_delete_=True, type='SyncBN', requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=syncbn_norm_cfg),
    neck=dict(norm_cfg=syncbn_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=syncbn_norm_cfg),
                  mask_head=dict(norm_cfg=syncbn_norm_cfg)))
custom_hooks = []
