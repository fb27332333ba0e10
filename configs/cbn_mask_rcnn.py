# Mask R-CNN R-50-FPN 1x on COCO 2017 with Cross-Iteration BN, at 2 images per GPU (8 GPUs x 2).
# CBN in the backbone (norm_eval=False), the FPN and 4-conv RoI heads, as mmdet's GN configs place
# their norm layers; a window of 8 iterations (8 x 2 = 16 images per GPU, the paper's rule of thumb)
# after 3 epochs of plain BN (the paper's COCO burn-in). On the demo detector, window 8 with the
# gradient through the entries needs the burn-in to be level with window 4 (docs/evidence.md).
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmcbn'], allow_failed_imports=False)

cbn_norm_cfg = dict(type='CBN', window_size=8, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=cbn_norm_cfg, norm_eval=False),
    neck=dict(norm_cfg=cbn_norm_cfg),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=cbn_norm_cfg),
        mask_head=dict(norm_cfg=cbn_norm_cfg)))

train_dataloader = dict(batch_size=2, num_workers=2)
custom_hooks = [dict(type='CBNHook', burnin_epochs=3)]
# the learning rate of the base config is for 16 images per iteration; --auto-scale-lr rescales it
auto_scale_lr = dict(enable=False, base_batch_size=16)
