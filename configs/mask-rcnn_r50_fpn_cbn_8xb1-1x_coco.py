# cbn_mask_rcnn.py at 1 image per GPU: window 16 (16 images per GPU), lr as for 8 images.
_base_ = './cbn_mask_rcnn.py'
cbn_norm_cfg = dict(type='CBN', window_size=16, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=cbn_norm_cfg),
    neck=dict(norm_cfg=cbn_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=cbn_norm_cfg), mask_head=dict(norm_cfg=cbn_norm_cfg)))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.01))
