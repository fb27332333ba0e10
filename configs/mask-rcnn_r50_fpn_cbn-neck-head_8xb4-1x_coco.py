# The authors' released COCO setting: CBN in the FPN and RoI heads only, the ImageNet BN backbone
# frozen (norm_eval=True, as mmdet's default), window 4 at 4 images per GPU, 8 epochs of BN first.
_base_ = './cbn_mask_rcnn.py'
cbn_norm_cfg = dict(type='CBN', window_size=4, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=dict(_delete_=True, type='BN', requires_grad=True), norm_eval=True),
    neck=dict(norm_cfg=cbn_norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=cbn_norm_cfg), mask_head=dict(norm_cfg=cbn_norm_cfg)))
train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.04))
custom_hooks = [dict(type='CBNHook', burnin_epochs=8)]
