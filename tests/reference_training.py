"""Training conv + CBN beside the float64 reference (``cbn_reference.ReferenceCBN``), every step
asserted: the loop the layer, compile and torch-support tests share."""
import copy

import torch
from torch import nn

from cbn_reference import ReferenceCBN
from mmcbn import CrossIterationBatchNorm2d

CONV_SHAPES = [
    # in, out, kernel, stride, padding, dilation, groups, bias
    (4, 6, 3, 1, 1, 1, 1, True),
    (6, 6, 3, 2, 2, 2, 6, False),  # depthwise, strided, dilated
    (4, 8, 1, 1, 0, 1, 2, True),  # grouped 1x1
    (3, 8, 7, 2, 3, 1, 1, False),  # stem
]


def train_against_reference(shape, window_size, compensation, bind, steps=6, lr=0.05,
                            running_stats_source='batch', window_grad=True, seed=0, affine=True,
                            layer_window_size=None, compiled_from=None):
    """Trains conv + CBN beside the float64 reference, asserting every step; ``compiled_from``:
    from that step on, the steps run conv + CBN under ``torch.compile(fullgraph=True)``."""
    torch.manual_seed(seed)
    cin, cout, k, s, p, d, g, bias = shape
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias).double()
    # the reference keeps BN's plain EMA; the compensated running statistics have their own
    # reference in test_running_stats.py
    cbn = CrossIterationBatchNorm2d(cout, window_size=layer_window_size or window_size,
                                    compensation=compensation,
                                    running_stats_source=running_stats_source,
                                    window_grad=window_grad, affine=affine,
                                    compensate_running_stats=False).double()
    cbn.effective_window = window_size  # below the layer's window_size: the newest entries
    if affine:
        nn.init.uniform_(cbn.weight, 0.5, 1.5)
        nn.init.uniform_(cbn.bias, -0.5, 0.5)
        gamma = cbn.weight.detach().clone().requires_grad_()
        beta = cbn.bias.detach().clone().requires_grad_()
    else:
        gamma = torch.ones(cout, dtype=torch.float64)
        beta = torch.zeros(cout, dtype=torch.float64)
    if bind:
        cbn.bind(conv, 'conv')
    conv_ref = copy.deepcopy(conv)
    ref = ReferenceCBN(conv_ref, gamma, beta, window_size, compensation=compensation,
                       running_stats_source=running_stats_source, window_grad=window_grad)
    opt = torch.optim.SGD([*conv.parameters(), *cbn.parameters()], lr=lr)
    opt_ref = torch.optim.SGD([*conv_ref.parameters(), *([gamma, beta] if affine else [])],
                              lr=lr)
    compiled = None if compiled_from is None else torch.compile(
        nn.Sequential(conv, cbn), backend='aot_eager', fullgraph=True)
    for step in range(steps):
        x = torch.randn(2, cin, 9, 10, dtype=torch.float64) + 0.3
        if compiled is not None:
            cbn.iteration = step  # a compiled step starts its iteration from here
        if compiled is not None and step >= compiled_from:
            out = compiled(x)
            target = torch.randn_like(out)
        else:
            y = conv(x)
            target = torch.randn_like(y)
            out = cbn(y)
        opt.zero_grad()
        (out * target).sum().backward()
        _, out_ref, mean_ref, var_ref = ref.forward(x)
        opt_ref.zero_grad()
        (out_ref * target).sum().backward()
        close = dict(rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(out, out_ref, **close)
        torch.testing.assert_close(cbn.last_mean, mean_ref, **close)
        torch.testing.assert_close(cbn.last_var, var_ref, **close)
        torch.testing.assert_close(conv.weight.grad, conv_ref.weight.grad, **close)
        if bias:
            torch.testing.assert_close(conv.bias.grad, conv_ref.bias.grad, **close)
        if affine:
            torch.testing.assert_close(cbn.weight.grad, gamma.grad, **close)
            torch.testing.assert_close(cbn.bias.grad, beta.grad, **close)
        torch.testing.assert_close(cbn.running_mean, ref.running_mean, **close)
        torch.testing.assert_close(cbn.running_var, ref.running_var, **close)
        opt.step()
        opt_ref.step()
    cbn.reference = ref
    return cbn
