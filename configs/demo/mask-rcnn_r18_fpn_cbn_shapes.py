# The demo: the baseline with Cross-Iteration BN in the backbone and the FPN (window 4 = 8 images)
# after 300 iterations of plain BN.
_base_ = './mask-rcnn_r18_fpn_bn_shapes.py'

cbn_norm_cfg = dict(type='CBN', window_size=4, requires_grad=True)
model = dict(backbone=dict(norm_cfg=cbn_norm_cfg), neck=dict(norm_cfg=cbn_norm_cfg))
custom_hooks = [dict(type='CBNHook', burnin_iters=300)]
