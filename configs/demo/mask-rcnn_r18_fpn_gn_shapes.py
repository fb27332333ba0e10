# Demo comparison: GroupNorm (32 groups) in the backbone and the FPN instead of BN.
_base_ = './mask-rcnn_r18_fpn_bn_shapes.py'

gn_norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(backbone=dict(norm_cfg=gn_norm_cfg), neck=dict(norm_cfg=gn_norm_cfg))
