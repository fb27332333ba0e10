# Ablation baseline: cbn_mask_rcnn.py without compensation (the paper's naive CBN).
_base_ = './cbn_mask_rcnn.py'
cbn_norm_cfg = dict(type='CBN', window_size=8, compensation=False, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=cbn_norm_cfg),
    neck=dict(norm_cfg=cbn_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=cbn_norm_cfg), mask_head=dict(norm_cfg=cbn_norm_cfg)))
