# Baseline: GroupNorm (32 groups) in backbone, FPN and 4conv1fc/mask heads, as mmdet's gn-all config
# (GN-pretrained backbone, caffe-style input), on cbn_mask_rcnn.py's 1x schedule at 2 images per GPU.
_base_ = 'mmdet::gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py'
max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1)
]
train_dataloader = dict(batch_size=2, num_workers=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
