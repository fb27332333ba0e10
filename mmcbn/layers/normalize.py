"""The normalisation step of a CBN layer: an autograd Function over torch's fused BatchNorm kernels.

The layer hands it the pooled statistics ``mean``/``var`` of the current batch and the window (the
current batch's weight in that average is ``inv_k``); the Function normalises with them and, in the
backward, gives the gradient through the current batch's share (BatchNorm's, with the batch size
scaled by the number of entries) and, when asked, through the compensated window entries to the
bound conv's current weight and bias.
"""
from typing import Optional

import torch
from torch import Tensor

from .conv_moments import compensation_backward
from .distributed import all_reduce_sum
from .records import WindowGradTerms


class NormalizeWithWindow(torch.autograd.Function):
    """``out = weight * (x - mean) / sqrt(var_eps) + bias`` with ``mean`` and ``var_eps`` (the
    variance plus BN's eps) pooled from the current batch (``M`` positions) and the window,
    ``k = 1 / inv_k`` entries in all.

    The gradient through the current batch's share of ``mean``/``var`` is BN's with the batch size
    ``M`` replaced by ``k * M``:

        dx = weight * invstd * (dy - sum(dy) / (kM) - xhat * sum(dy * xhat) / (kM))
           = BN_backward(dy) / k + (1 - 1/k) * weight * invstd * dy

    so both directions run on torch's fused BatchNorm kernels (eval-mode forward with our statistics,
    training-mode backward with them as the saved statistics and ``weight / k`` as the weight) plus
    one elementwise pass. With a
    process group (synchronised CBN), ``M`` counts every process's positions and the two sums are
    all-reduced, as in SyncBatchNorm.

    With ``terms`` (and the conv's ``conv_weight``/``conv_bias`` as inputs), the same two sums give
    ``dL/dmean = -weight * invstd * sum(dy)`` and ``dL/dvar = -weight * invstd^2 * sum(dy * xhat) / 2``;
    each used entry's share of them (``1/k``) goes through its compensation formulas to the conv's
    parameters (:func:`~mmcbn.layers.conv_moments.compensation_backward`): one small batched product,
    no pass over the activation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                conv_weight: Optional[Tensor], conv_bias: Optional[Tensor], mean: Tensor,
                var_eps: Tensor, inv_k: Optional[Tensor], sync_count: Optional[Tensor],
                group, terms: Optional[WindowGradTerms]) -> Tensor:
        ctx.group, ctx.with_terms = group, terms is not None
        ctx.conv_weight_shape = None if conv_weight is None else conv_weight.shape
        ctx.conv_dtypes = (None if conv_weight is None else conv_weight.dtype,
                           None if conv_bias is None else conv_bias.dtype)
        # the window's tensors are inputs like any other: the ring changes only when the next
        # iteration starts (window.MomentWindow), so a backward after that fails loudly
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var_eps), inv_k, sync_count,
                              *(terms.tensors() if terms is not None else ()))
        return torch.batch_norm(x, weight, bias, mean, var_eps, False, 0.0, 0.0,
                                torch.backends.cudnn.enabled)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, mean, invstd, inv_k, sync_count, *saved_terms = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x = ctx.needs_input_grad[0]
        need_w = weight is not None and ctx.needs_input_grad[1]
        need_b = ctx.needs_input_grad[2]
        terms = WindowGradTerms(*saved_terms) if ctx.with_terms else None
        need_conv = terms is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        w = None if weight is None else weight.to(invstd.dtype)
        batch_scale = None  # weight * invstd / k: the current batch's share
        if sync_count is None:
            # BN's input gradient is linear in its weight: the kernel with weight / k gives
            # BN_backward(dy) / k without another pass over the activation
            bn_weight = weight
            if inv_k is not None and (need_x or need_conv):
                weight_k = inv_k if w is None else w * inv_k
                batch_scale = weight_k * invstd
                if w is not None:
                    bn_weight = weight_k.to(weight.dtype)
            grad_x, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, bn_weight, None, None, mean, invstd, True, 0.0,
                [need_x, need_w or need_conv, need_b or need_conv])
            if grad_x is not None and inv_k is not None:
                if weight is None:  # affine=False: no weight to carry 1/k
                    grad_x = grad_x.mul_(inv_k.to(grad_x.dtype))
                # the rest of the batch's share, (1 - 1/k) weight * invstd dy, negated in one op
                neg_rest = batch_scale - invstd if w is None else \
                    torch.addcmul(batch_scale, invstd, w, value=-1.0)
                grad_x = grad_x.addcmul_(grad_out, neg_rest.to(grad_x.dtype)[None, :, None, None],
                                         value=-1.0)
            grad_weight = sum_dy_xhat if need_w else None
            grad_bias = sum_dy if need_b else None
            sums = (sum_dy.to(invstd.dtype), sum_dy_xhat.to(invstd.dtype)) if need_conv else None
        else:
            # the eval-mode kernel gives the local sums (grad_bias = sum(dy), grad_weight =
            # sum(dy * xhat)); the input and conv gradients need them summed over processes
            var_eps = invstd.reciprocal().square()
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, torch.ones_like(invstd), mean, var_eps, None, None, False, 0.0,
                [False, True, True])
            grad_weight = sum_dy_xhat.to(weight.dtype) if need_w else None
            grad_bias = sum_dy.to(weight.dtype if weight is not None else sum_dy.dtype) \
                if need_b else None
            grad_x = sums = None
            scale = invstd if w is None else invstd * w
            if need_conv:
                batch_scale = scale * inv_k
            if need_x or need_conv:
                sums = all_reduce_sum(torch.stack([sum_dy, sum_dy_xhat]).to(invstd.dtype),
                                      ctx.group).unbind()
            if need_x:
                n = sync_count / inv_k if inv_k is not None else sync_count  # k * M over processes
                b = -scale * invstd * sums[1] / n  # dx = scale * dy + b * (x - mean) + c0
                c0 = -scale * sums[0] / n - b * mean
                grad_x = torch.addcmul(c0.to(grad_out.dtype)[None, :, None, None], grad_out,
                                       scale.to(grad_out.dtype)[None, :, None, None])
                grad_x = grad_x.addcmul_(x.to(grad_x.dtype), b.to(grad_x.dtype)[None, :, None, None])
        grad_conv_weight = grad_conv_bias = None
        if need_conv:
            with torch.autocast(x.device.type, enabled=False):
                grad_conv_weight, grad_conv_bias = _window_conv_grads(ctx, terms, sums,
                                                                      batch_scale, invstd, mean)
        return (grad_x, grad_weight, grad_bias, grad_conv_weight, grad_conv_bias, None, None, None,
                None, None, None)


def _window_conv_grads(ctx, terms: WindowGradTerms, sums: Tensor, t: Tensor, invstd: Tensor,
                       mean: Tensor):
    """The conv's weight and bias gradients through the compensated entries (see
    :class:`WindowGradTerms`); ``sums`` holds ``sum(dy)`` and ``sum(dy * xhat)``, ``t`` is
    ``weight * invstd / k``."""
    u = t * invstd * sums[1]  # -2 b / k
    neg_base = torch.addcmul(t * sums[0], u, mean, value=-1.0)  # -(a - 2 b mean) / k
    if terms.share is not None:
        neg_base = terms.share * neg_base
    neg_grad_mean = torch.addcmul(neg_base, terms.clamped_mean, u)
    kept_u = terms.kept_share * u  # -2 d sqmean_hat
    weight_dtype, bias_dtype = ctx.conv_dtypes
    grad_w, grad_b = compensation_backward(neg_grad_mean, kept_u, terms.mean, terms.patch_mean,
                                           terms.sqmean_grad, with_bias=bias_dtype is not None,
                                           mean_scale=-1.0, sqmean_scale=-0.5)
    grad_conv_weight = (grad_w.reshape(ctx.conv_weight_shape).to(weight_dtype)
                        if ctx.needs_input_grad[3] else None)
    grad_conv_bias = grad_b.to(bias_dtype) if bias_dtype is not None and \
        ctx.needs_input_grad[4] else None
    return grad_conv_weight, grad_conv_bias
