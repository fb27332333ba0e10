"""torch.compile of a conv + CBN + ReLU block: one graph, compiled once, equal to eager.

Uses the ``aot_eager`` backend (dynamo traces forward and backward, no C++ compiler): what this test
checks, graph breaks, recompilations and equality, does not depend on the code generator.
"""
import copy

import pytest
import torch
from torch import nn

from mmcbn import CrossIterationBatchNorm2d
from reference_training import CONV_SHAPES, train_against_reference

WARM_STEPS = 5  # the window is full from the 5th step on (3 entries and one pending)


def _block(window_grad=True, dtype=torch.float32):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    cbn = CrossIterationBatchNorm2d(6, window_size=4, window_grad=window_grad)
    cbn.bind(conv)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(conv, cbn, nn.ReLU()).to(dtype)


def _step(block, model, opt, x, target, it):
    block[1].iteration = it
    out = model(x)
    opt.zero_grad()
    (out * target).sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    opt.step()
    return out.detach(), grads


def _inputs(steps, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 4, 8, 8, generator=g, dtype=dtype) + 0.3,
             torch.randn(2, 6, 8, 8, generator=g, dtype=dtype)) for _ in range(steps)]


def test_compiled_block_is_one_graph_compiled_once_and_equals_eager():
    """12 steady steps with fullgraph=True: at most 2 compilations (dynamo's count of frames it
    traced), and outputs, every gradient and the running buffers equal the eager block's."""
    torch._dynamo.reset()
    eager = _block()
    compiled_block = copy.deepcopy(eager)
    compiled_block[1].bind(compiled_block[0])
    compilations = []

    def backend(gm, example_inputs):
        compilations.append(gm)
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm,
                                                                                 example_inputs)

    model = torch.compile(compiled_block, backend=backend, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(compiled_block.parameters(), lr=0.05)
    data = _inputs(WARM_STEPS + 12)
    for it, (x, target) in enumerate(data):
        if it < WARM_STEPS:  # fill the window eagerly, as a compiled run's first steps would
            _step(eager, eager, opt_e, x, target, it)
            _step(compiled_block, compiled_block, opt_c, x, target, it)
            continue
        out_e, grads_e = _step(eager, eager, opt_e, x, target, it)
        out_c, grads_c = _step(compiled_block, model, opt_c, x, target, it)
        close = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out_c, out_e, **close)
        for g_c, g_e in zip(grads_c, grads_e):
            torch.testing.assert_close(g_c, g_e, **close)
        for b_c, b_e in zip(compiled_block.buffers(), eager.buffers()):
            torch.testing.assert_close(b_c, b_e, **close)
    assert 1 <= len(compilations) <= 2, len(compilations)
    # the compiled steps really used the window: its entries differ from the batch alone
    assert compiled_block[1].window_stats()['mean'].shape[0] == 3


@pytest.mark.parametrize('window_grad', [True, False], ids=['window_grad', 'stop_grad'])
def test_compiled_block_matches_float64_reference(window_grad):
    """The compiled layer against the independent float64 autograd reference, steady steps:
    outputs, pooled statistics, every gradient and the running statistics."""
    torch._dynamo.reset()
    cbn = train_against_reference(CONV_SHAPES[0], 4, True, True, steps=WARM_STEPS + 3,
                                   window_grad=window_grad, compiled_from=WARM_STEPS)
    assert cbn.window_stats()['mean'].shape[0] == 3


def test_a_backward_after_the_next_iteration_started_fails_loudly():
    """The window's ring changes only when an iteration starts, and the normalisation saves it for
    backward: running an iteration's backward after the next one started is torch's in-place
    error, never a gradient from another iteration's entries."""
    block = _block()
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    data = _inputs(WARM_STEPS + 1)
    for it, (x, target) in enumerate(data[:WARM_STEPS]):
        _step(block, block, opt, x, target, it)
    x, target = data[-1]
    block[1].iteration = WARM_STEPS
    loss = (block(x) * target).sum()
    block[1].iteration = WARM_STEPS + 1
    block(x)  # the next iteration starts: the ring moves on
    with pytest.raises(RuntimeError, match='modified by an inplace operation'):
        loss.backward()


def test_compiled_shared_layer_called_twice_per_iteration_equals_eager():
    """A head shared by two FPN levels: both calls of an iteration read the same ring and merge
    into one pending entry, compiled as eager."""
    torch._dynamo.reset()
    eager = _block()
    compiled_block = copy.deepcopy(eager)
    compiled_block[1].bind(compiled_block[0])
    model = torch.compile(compiled_block, backend='aot_eager', fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05)
    opt_c = torch.optim.SGD(compiled_block.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for it in range(WARM_STEPS + 4):
        levels = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 4, 4, generator=g)]
        grads = []
        for block, fn, opt in ((eager, eager, opt_e), (compiled_block, model, opt_c)):
            block[1].iteration = it
            run = fn if it >= WARM_STEPS else block
            opt.zero_grad()
            sum(run(x).square().mean() for x in levels).backward()
            grads.append([p.grad.clone() for p in block.parameters()])
            opt.step()
        for g_c, g_e in zip(grads[1], grads[0]):
            torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    assert compiled_block[1].window.pending_calls == 2


def test_compiled_block_with_a_sampled_derivative_is_one_graph():
    """A sampled derivative under compile: the grid's offset cycles on the device, so 12 steady
    steps with fullgraph=True still compile at most twice, and the entries are compensated."""
    torch._dynamo.reset()
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    cbn = CrossIterationBatchNorm2d(6, window_size=4, derivative_positions=16)  # of 128
    cbn.bind(conv)
    block = nn.Sequential(conv, cbn, nn.ReLU())
    compilations = []

    def backend(gm, example_inputs):
        compilations.append(gm)
        return gm.forward

    model = torch.compile(block, backend=backend, fullgraph=True)
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    for it, (x, target) in enumerate(_inputs(WARM_STEPS + 12)):
        out, _ = _step(block, block if it < WARM_STEPS else model, opt, x, target, it)
        assert torch.isfinite(out).all()
    assert 1 <= len(compilations) <= 2, len(compilations)
    stats = block[1].window_stats()
    assert stats['compensated'].all() and stats['mean'].shape[0] == 3
    assert not torch.equal(stats['mean'], stats['raw_mean'])  # moved to the current weights


def test_compiled_forward_that_ends_the_iteration_equals_eager():
    """Iterations without an optimizer step (gradient accumulation, a frozen producer): the
    pending entry joins the ring at the next iteration's first call, inside the compiled graph,
    in the slot the device's count of commits names (the eager block's host count names the
    same): outputs and windows as eager's, compiled at most twice."""
    torch._dynamo.reset()
    eager = _block()
    compiled_block = copy.deepcopy(eager)
    compiled_block[1].bind(compiled_block[0])
    compilations = []

    def backend(gm, example_inputs):
        compilations.append(gm)
        return gm.forward

    model = torch.compile(compiled_block, backend=backend, fullgraph=True)
    for it, (x, target) in enumerate(_inputs(WARM_STEPS + 8)):
        outs = []
        for block, fn in ((eager, eager), (compiled_block, model)):
            block[1].iteration = it
            out = (fn if it >= WARM_STEPS else block)(x)
            (out * target).sum().backward()  # no optimizer step: the next call commits
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    assert 1 <= len(compilations) <= 2, len(compilations)
    stats_c, stats_e = compiled_block[1].window_stats(), eager[1].window_stats()
    assert stats_c['mean'].shape[0] == 3
    for key in ('mean', 'var', 'raw_mean', 'raw_var'):
        torch.testing.assert_close(stats_c[key], stats_e[key], rtol=1e-4, atol=1e-5)
