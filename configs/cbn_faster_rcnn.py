# Faster R-CNN R-50-FPN 1x on COCO 2017 with Cross-Iteration BN, at 2 images per GPU (8 GPUs x 2).
# CBN in the backbone (norm_eval=False), the FPN and a 4-conv RoI box head; window 8 after 3 epochs
# of plain BN. See cbn_mask_rcnn.py.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmcbn'], allow_failed_imports=False)

cbn_norm_cfg = dict(type='CBN', window_size=8, requires_grad=True)
model = dict(
    backbone=dict(norm_cfg=cbn_norm_cfg, norm_eval=False),
    neck=dict(norm_cfg=cbn_norm_cfg),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=cbn_norm_cfg)))

train_dataloader = dict(batch_size=2, num_workers=2)
custom_hooks = [dict(type='CBNHook', burnin_epochs=3)]
auto_scale_lr = dict(enable=False, base_batch_size=16)
