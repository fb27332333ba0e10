"""CrossIterationBatchNorm2d against independent references: a float64 autograd CBN, nn.BatchNorm2d."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_training import CONV_SHAPES, train_against_reference
from mmcbn import CrossIterationBatchNorm2d

@pytest.mark.parametrize('shape', CONV_SHAPES)
@pytest.mark.parametrize('window_size', [2, 3, 5])
@pytest.mark.parametrize('bind', [True, False], ids=['bound', 'lazy'])
@pytest.mark.parametrize('window_grad', [True, False], ids=['window_grad', 'stop_grad'])
def test_matches_float64_reference(shape, window_size, bind, window_grad):
    """Outputs, statistics and every gradient (input, conv weight and bias, affine) over SGD
    steps: with ``window_grad`` autograd through the compensated entries to the current conv
    parameters, without it the paper's constants."""
    cbn = train_against_reference(shape, window_size, True, bind, steps=window_size + 3,
                                   window_grad=window_grad)
    assert cbn.window_stats()['mean'].shape[0] == window_size - 1  # the full window was used
    assert cbn.binding is not None


def test_effective_window_below_the_ring_uses_the_newest_entries():
    """A layer of window 6 run at effective window 3 (window growth) is the window-3 reference:
    the entries it uses are the two newest, by age."""
    cbn = train_against_reference(CONV_SHAPES[0], 3, True, True, steps=8, layer_window_size=6)
    assert cbn.window_stats()['mean'].shape[0] == 2


@pytest.mark.parametrize('window_grad', [True, False], ids=['window_grad', 'stop_grad'])
def test_without_affine_parameters_matches_float64_reference(window_grad):
    """affine=False: the input gradient (seen through the conv's) has no weight to carry 1/k."""
    train_against_reference(CONV_SHAPES[0], 3, True, True, window_grad=window_grad, affine=False)


@pytest.mark.parametrize('window_grad', [True, False], ids=['window_grad', 'stop_grad'])
def test_clamped_entries_match_float64_reference(window_grad):
    """Large steps push compensated second moments below the squared mean: the clamp's gradient
    is autograd's of max(sqmean_hat, mean_hat^2)."""
    cbn = train_against_reference(CONV_SHAPES[0], 5, True, True, steps=10, lr=2.0,
                                   window_grad=window_grad)
    assert cbn.reference.num_clamped > 0


def test_window_grad_changes_the_conv_gradient():
    """The two modes differ exactly in the conv's gradient, so each reference test above can fail
    for the other mode."""
    grads = []
    for window_grad in (True, False):
        cbn = train_against_reference(CONV_SHAPES[0], 3, True, True, steps=3,
                                       window_grad=window_grad)
        grads.append(cbn.binding.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() > 1e-3 * grads[1].abs().max()


@pytest.mark.parametrize('source', ['window', 'batch'])
def test_running_statistics_from_either_source_match_reference(source):
    train_against_reference(CONV_SHAPES[0], 3, True, True, running_stats_source=source)


@pytest.mark.parametrize('window_size', [2, 4])
def test_naive_cbn_matches_reference_without_compensation(window_size):
    cbn = train_against_reference(CONV_SHAPES[0], window_size, False, True)
    assert cbn.window.sqmean_grad is None  # naive CBN never computes derivatives


def assert_close_to_scale(got, expected, tol):
    """|got - expected| <= tol * max(1, max|expected|): float32 sums over many terms round at that
    scale, not at each element's."""
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= tol * scale, (got, expected)


def _bn_pair(c=8, **kwargs):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(c)
    nn.init.uniform_(bn.weight, 0.5, 1.5)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    cbn = CrossIterationBatchNorm2d(c, **kwargs)
    cbn.load_state_dict(bn.state_dict())
    return bn, cbn


@pytest.mark.parametrize('kwargs', [dict(window_size=1), dict(window_size=4, effective=1),
                                    dict(window_size=4, fresh_every_step=True),
                                    dict(window_size=1, momentum=None)])
def test_window_of_one_equals_batchnorm(kwargs):
    """k = 1 is BN: outputs, gradients and running statistics, also on the window code path
    (a CBN whose window is still empty)."""
    kwargs = dict(kwargs)
    effective = kwargs.pop('effective', None)
    fresh = kwargs.pop('fresh_every_step', False)
    bn, cbn = _bn_pair(**kwargs)
    bn.momentum = cbn.momentum
    if effective:
        cbn.effective_window = effective
    for _ in range(4):
        if fresh:
            cbn.reset_window()
        x = (torch.randn(2, 8, 6, 7) * 2 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        target = torch.randn(2, 8, 6, 7)
        out_bn, out_cbn = bn(x), cbn(x2)
        (out_bn * target).sum().backward()
        (out_cbn * target).sum().backward()
        for got, expected in [(out_cbn, out_bn), (x2.grad, x.grad), (cbn.weight.grad, bn.weight.grad),
                              (cbn.bias.grad, bn.bias.grad), (cbn.running_mean, bn.running_mean),
                              (cbn.running_var, bn.running_var)]:
            assert_close_to_scale(got, expected, 1e-6)
        assert int(cbn.num_batches_tracked) == int(bn.num_batches_tracked)
        bn.zero_grad()
        cbn.zero_grad()


def test_eval_is_batchnorm_with_running_stats():
    """Trained side by side on the same conv outputs (the conv fixed, so compensation moves
    nothing), the layer's eval output is BN's: the running statistics are BN's EMA of the batches
    and eval normalises with them."""
    bn, cbn = _bn_pair()
    conv = nn.Conv2d(3, 8, 3).requires_grad_(False)
    cbn.bind(conv)
    for it in range(5):  # the window fills and is used; the running statistics follow the batches
        cbn.iteration = it
        y = conv(torch.randn(2, 3, 8, 8) * 2 + 1)
        cbn(y)
        bn(y)
    assert (cbn.running_mean - 0).abs().max() > 0.1  # moved away from the initial statistics
    bn.eval(), cbn.eval()
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(cbn(x), bn(x), rtol=1e-6, atol=1e-6)


def test_state_dict_has_exactly_batchnorm_keys_and_round_trips():
    bn, cbn = _bn_pair(window_size=4)
    conv = nn.Conv2d(3, 8, 3)
    cbn.bind(conv)
    for _ in range(3):
        cbn(conv(torch.randn(2, 3, 8, 8)))
    assert list(cbn.state_dict().keys()) == list(nn.BatchNorm2d(8).state_dict().keys())
    bn.load_state_dict(cbn.state_dict(), strict=True)
    fresh = CrossIterationBatchNorm2d(8)
    fresh.load_state_dict(bn.state_dict(), strict=True)
    for key, value in bn.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)


def test_frozen_conv_skips_derivatives_and_window_memory_budget():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    cbn = CrossIterationBatchNorm2d(32, window_size=4)
    cbn.bind(conv)
    conv.requires_grad_(False)
    for _ in range(4):
        cbn(conv(torch.randn(2, 16, 8, 8)))
    assert cbn.window.sqmean_grad is None
    conv.requires_grad_(True)
    cbn.reset_window()
    opt = torch.optim.SGD(conv.parameters(), lr=0.01)
    weight_floats = conv.weight.numel()
    for _ in range(5):
        cbn(conv(torch.randn(2, 16, 8, 8))).square().mean().backward()
        # during the step: one weight-sized derivative per entry, the 3 slots and this
        # iteration's entry
        assert cbn.window_nbytes() / 4 <= 1.1 * 4 * weight_floats
        opt.step()
        opt.zero_grad()
        # between steps: the step ended the iteration, the 3 entries in use remain
        assert not cbn.window.pending and len(cbn.window.committed) >= 1
        assert cbn.window_nbytes() / 4 <= 1.1 * 3 * weight_floats


@pytest.mark.parametrize('bad, match', [
    (dict(window_size=0), 'window_size'),
    (dict(window_size=2.5), 'window_size'),
    (dict(eps=0.0), 'eps'),
    (dict(eps='a'), 'eps'),
    (dict(eps=float('inf')), 'eps must be a finite number > 0'),
    (dict(eps=float('nan')), 'eps must be a finite number > 0'),
    (dict(process_group='x'), 'process_group must be None .* or a torch.distributed ProcessGroup'),
    (dict(momentum=1.5), 'momentum'),
    (dict(momentum='x'), 'momentum'),
    (dict(compensation='yes'), 'compensation'),
    (dict(affine=1), 'affine'),
    (dict(track_running_stats=None), 'track_running_stats'),
    (dict(running_stats_source='ema'), "running_stats_source must be one of \\('window', 'batch'\\)"),
    (dict(num_features=0), 'num_features'),
])
def test_bad_arguments_name_the_argument(bad, match):
    kwargs = dict(num_features=8)
    kwargs.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        CrossIterationBatchNorm2d(**kwargs)


def test_bad_effective_window_and_input_shape():
    cbn = CrossIterationBatchNorm2d(8, window_size=4)
    with pytest.raises(ValueError, match=r'effective_window must be in \[1, window_size=4\]'):
        cbn.effective_window = 5
    with pytest.raises(TypeError, match='effective_window'):
        cbn.effective_window = 2.0
    with pytest.raises(ValueError, match=r'4D input.*\(2, 8, 5\)'):
        cbn(torch.randn(2, 8, 5))
    with pytest.raises(ValueError, match='channels'):
        cbn(torch.randn(2, 7, 5, 5))


def test_bind_rejects_convs_that_are_not_plain():

    class WeightStandardizedConv(nn.Conv2d):

        def forward(self, x):
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return self._conv_forward(x, w, self.bias)

    cbn = CrossIterationBatchNorm2d(8)
    with pytest.raises(TypeError, match='WeightStandardizedConv overrides the conv forward'):
        cbn.bind(WeightStandardizedConv(3, 8, 3))
    with pytest.raises(TypeError, match='not an nn.Conv2d'):
        cbn.bind(nn.Linear(3, 8))


def test_input_after_activation_warns_once_and_runs_naive_window():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    cbn = CrossIterationBatchNorm2d(8, window_size=3)
    cbn.layer_name = 'neck.norm'
    naive = CrossIterationBatchNorm2d(8, window_size=3, compensation=False)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(4):
            h = torch.relu(conv(torch.randn(2, 3, 8, 8)))
            out, out_naive = cbn(h), naive(h.detach())
            torch.testing.assert_close(out, out_naive)
            opt.zero_grad()
            out.square().sum().backward()
            opt.step()
    messages = [str(w.message) for w in caught if 'mmcbn' in str(w.message)]
    assert len(messages) == 1
    assert "'neck.norm'" in messages[0] and 'ReluBackward0' in messages[0]
    assert cbn.unbound_reason is not None and cbn.binding is None


def test_non_finite_batch_never_enters_the_window_or_running_stats():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    cbn = CrossIterationBatchNorm2d(8, window_size=3)
    cbn.bind(conv)
    for _ in range(3):
        cbn(conv(torch.randn(2, 3, 8, 8)))
    mean_before = cbn.window.mean.clone()
    running = cbn.running_mean.clone(), cbn.running_var.clone()
    drift = [getattr(cbn.running_drift, n).clone() for n in cbn.running_drift.tensor_names]  # compensation EMAs
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = float('inf')
    out = cbn(conv(bad))
    assert not torch.isfinite(out).all()
    # the bad entry is stored as invalid: the next step normalises with finite statistics only
    assert torch.equal(cbn.running_mean, running[0]) and torch.equal(cbn.running_var, running[1])
    assert all(torch.equal(before, getattr(cbn.running_drift, name))
               for before, name in zip(drift, cbn.running_drift.tensor_names))
    out = cbn(conv(torch.randn(2, 3, 8, 8)))
    assert torch.isfinite(out).all() and torch.isfinite(cbn.last_var).all()
    stats = cbn.window_stats()
    assert stats['valid'].tolist() == [0.0, 1.0]
    assert torch.isfinite(cbn.running_mean).all() and torch.isfinite(cbn.running_var).all()
    with torch.no_grad():
        conv.weight.mul_(1.1)
    cbn.export_running_stats()  # the drift is finite too
    assert torch.isfinite(cbn.running_mean).all() and torch.isfinite(cbn.running_var).all()
    assert mean_before.shape == cbn.window.mean.shape


def test_autocast_bfloat16_keeps_statistics_in_float32():
    """Half-precision activations, float32 statistics: the batch statistics (and the stored
    entries) equal float64 statistics of the very bf16 tensor the layer got, to float32
    precision (bf16 rounding of a statistic would be off by up to ~0.4%)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    cbn = CrossIterationBatchNorm2d(8, window_size=3)
    cbn.bind(conv)
    previous = None
    for it in range(3):
        cbn.iteration = it
        x = torch.randn(2, 3, 8, 8) * 3 + 1
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = conv(x)
            out = cbn(y)
        assert y.dtype == out.dtype == torch.bfloat16
        assert cbn.last_mean.dtype == torch.float32 and cbn.window.mean.dtype == torch.float32
        assert cbn.window.sqmean_grad.dtype == torch.float32
        out.float().sum().backward()
        y64 = y.detach().double()
        mean, var = y64.mean((0, 2, 3)), y64.var((0, 2, 3), unbiased=False)
        close = dict(rtol=2e-6, atol=1e-6)
        if it == 0:  # no window yet: the batch's own statistics
            torch.testing.assert_close(cbn.last_mean.double(), mean, **close)
            torch.testing.assert_close(cbn.last_var.double(), var, **close)
        else:  # the newest entry holds the previous batch's statistics as recorded
            stats = cbn.window_stats()
            torch.testing.assert_close(stats['raw_mean'][0].double(), previous[0], **close)
            torch.testing.assert_close(stats['raw_var'][0].double(), previous[1], **close)
        previous = mean, var


def test_reset_running_stats_clears_the_window():
    conv = nn.Conv2d(3, 8, 3)
    cbn = CrossIterationBatchNorm2d(8, window_size=3)
    for _ in range(3):
        cbn(conv(torch.randn(2, 3, 8, 8)))
    assert len(cbn.window) == 3  # two entries and this iteration's
    cbn.reset_running_stats()
    assert len(cbn.window) == 0 and cbn.window.mean is None
    assert torch.equal(cbn.running_mean, torch.zeros(8))


def test_shared_layer_in_one_iteration_merges_into_one_entry():
    """With `iteration` set, calls in one iteration share the window and add one entry: the
    statistics of all their positions together."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    cbn = CrossIterationBatchNorm2d(8, window_size=3, compensation=False)
    cbn.iteration = 0
    cbn(conv(torch.randn(2, 3, 8, 8)))
    cbn.iteration = 1
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    ya, yb = conv(a), conv(b)
    cbn(ya)
    mean_a = cbn.last_mean
    cbn(yb)
    assert len(cbn.window) == 2  # iteration 0's entry, and iteration 1's (pending, merged)
    window_mean = cbn.window_stats()['mean'][0]
    # each call used its own batch plus the same one-entry window
    torch.testing.assert_close(mean_a, (ya.mean((0, 2, 3)) + window_mean) / 2)
    torch.testing.assert_close(cbn.last_mean, (yb.mean((0, 2, 3)) + window_mean) / 2)
    cbn.iteration = 2
    cbn(conv(torch.randn(2, 3, 8, 8)))
    merged = torch.cat([ya.flatten(2), yb.flatten(2)], dim=2).transpose(0, 1).reshape(8, -1)
    stats = cbn.window_stats()
    torch.testing.assert_close(stats['raw_mean'][0], merged.mean(1))
    torch.testing.assert_close(stats['raw_var'][0], merged.var(1, unbiased=False))


def test_same_batch_after_an_optimizer_step_is_a_new_iteration():
    """Re-feeding one batch (e.g. overfitting a batch) must not look like a checkpoint recompute:
    the optimizer moved the weights in between."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    cbn = CrossIterationBatchNorm2d(8, window_size=3)
    cbn.bind(conv)
    opt = torch.optim.SGD(conv.parameters(), lr=1e-6)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        cbn(conv(x)).square().mean().backward()
        opt.step()
    assert len(cbn.window) == 2 and all(cbn.window.committed)  # each step ended an iteration
    assert cbn.window_stats()['mean'].shape[0] == 2


def test_an_optimizer_step_that_moves_the_conv_ends_the_iteration():
    """Another model's step leaves the pending entry (and a graph still to backpropagate) alone;
    the conv's own step commits it, window_stats() still describes the last forward, and a forward
    after the step in the same iteration starts a new entry at the new weights."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1).double()
    cbn = CrossIterationBatchNorm2d(6, window_size=3).double()
    cbn.bind(conv)
    other = nn.Linear(2, 2).double()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    opt_other = torch.optim.SGD(other.parameters(), lr=0.1)
    inputs = [torch.randn(2, 3, 8, 8, dtype=torch.float64) + i for i in range(4)]
    recorded = []
    for it, x in enumerate(inputs[:3]):
        cbn.iteration = it
        y = conv(x)
        recorded.append((y.detach().mean((0, 2, 3)), y.detach().var((0, 2, 3), unbiased=False)))
        loss = (cbn(y) * torch.randn_like(y)).sum()
        other(torch.randn(1, 2, dtype=torch.float64)).sum().backward()
        opt_other.step()  # another model's step: this iteration goes on
        assert cbn.window.pending
        loss.backward(retain_graph=True)
        loss.backward()  # a second backward through the same graph still reads the same ring
        before = cbn.window_stats()
        opt.step()
        opt.zero_grad()
        assert not cbn.window.pending and len(cbn.window.committed) == min(it + 1, 2)
        after = cbn.window_stats()
        for key in before:  # the commit overwrote the oldest slot: its record was kept
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    # the last forward (iteration 2) pooled iterations 1 and 0, newest first, as recorded
    torch.testing.assert_close(after['raw_mean'], torch.stack([recorded[1][0], recorded[0][0]]))
    torch.testing.assert_close(after['raw_var'], torch.stack([recorded[1][1], recorded[0][1]]))
    # a forward after the step, same iteration number: iterations 2 and 1 at the new weights
    cbn(conv(inputs[3]))
    stats = cbn.window_stats()
    with torch.no_grad():
        now = [conv(x).mean((0, 2, 3)) for x in (inputs[2], inputs[1])]
    torch.testing.assert_close(stats['mean'], torch.stack(now))  # the mean is compensated exactly
    torch.testing.assert_close(stats['raw_mean'], torch.stack([recorded[2][0], recorded[1][0]]))


def _sampled_run(steps=4, **kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    cbn = CrossIterationBatchNorm2d(8, window_size=3, **kwargs).double()
    cbn.bind(conv)
    opt = torch.optim.SGD([*conv.parameters(), *cbn.parameters()], lr=0.05)
    outs = []
    for it in range(steps):
        cbn.iteration = it
        x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
        out = cbn(conv(x))
        out.square().mean().backward()
        outs.append((out.detach(), conv.weight.grad.clone()))
        opt.step()
        opt.zero_grad()
    return conv, cbn, outs


def test_sampled_derivative_with_a_budget_above_the_map_is_the_exact_one():
    _, _, exact = _sampled_run()
    _, _, budget = _sampled_run(derivative_positions=2 * 12 * 12)
    for (out_a, grad_a), (out_b, grad_b) in zip(exact, budget):
        assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)


def test_sampled_derivative_leaves_an_entry_unchanged_at_its_own_weights():
    """The trap of Euler's identity: a sampled d E[y^2]/dW does not satisfy it, so the
    compensation subtracts the entry's excess; at unchanged weights an entry is what was recorded."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    cbn = CrossIterationBatchNorm2d(8, window_size=3, derivative_positions=20).double()
    cbn.bind(conv)
    for it in range(3):  # no optimizer step: the weights never move
        cbn.iteration = it
        cbn(conv(torch.randn(2, 4, 12, 12, dtype=torch.float64)))
    stats = cbn.window_stats()
    assert stats['mean'].shape[0] == 2
    torch.testing.assert_close(stats['mean'], stats['raw_mean'], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats['var'], stats['raw_var'], rtol=1e-12, atol=1e-12)
    assert cbn.window.excess.abs().max() > 1e-3  # the sampled derivative did miss the identity


def test_sampled_derivative_is_seeded_and_leaves_the_global_generators_alone():
    import random
    conv = nn.Conv2d(4, 8, 3, padding=1)
    cbn = CrossIterationBatchNorm2d(8, window_size=3, derivative_positions=40)
    cbn.bind(conv)
    x = torch.ones(2, 4, 12, 12)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    for it in range(3):
        cbn.iteration = it
        cbn(conv(x))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    _, _, first = _sampled_run(derivative_positions=40)
    _, _, second = _sampled_run(derivative_positions=40)
    _, _, exact = _sampled_run()
    for (out_a, grad_a), (out_b, grad_b) in zip(first, second):
        assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)
    assert not torch.equal(first[-1][1], exact[-1][1])  # the sample did change the gradient


@pytest.mark.parametrize('window_size, effective_window', [(3, 1), (1, 1)],
                         ids=['burn_in', 'window_of_one'])
def test_non_finite_batch_never_enters_running_stats_during_burn_in(window_size,
                                                                    effective_window):
    """The window-1 path (burn-in, or a layer of window 1) keeps the window path's guarantee."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    cbn = CrossIterationBatchNorm2d(8, window_size=window_size)
    cbn.bind(conv)
    cbn.effective_window = effective_window
    bn = nn.BatchNorm2d(8)  # what the good batches must have made of the running statistics
    for it in range(3):
        cbn.iteration = it
        y = conv(torch.randn(2, 3, 8, 8))
        cbn(y)
        bn(y.detach())
    running = cbn.running_mean.clone(), cbn.running_var.clone()
    torch.testing.assert_close(running[0], bn.running_mean)
    torch.testing.assert_close(running[1], bn.running_var)
    drift = [getattr(cbn.running_drift, n).clone() for n in cbn.running_drift.tensor_names]
    assert drift, 'the compensation terms are tracked during burn-in'
    bad = torch.randn(2, 3, 8, 8)
    bad[1, 2, 3, 4] = float('nan')
    cbn.iteration = 3
    out = cbn(conv(bad))
    assert not torch.isfinite(out).all()
    assert torch.equal(cbn.running_mean, running[0]) and torch.equal(cbn.running_var, running[1])
    assert all(torch.equal(before, getattr(cbn.running_drift, name))
               for before, name in zip(drift, cbn.running_drift.tensor_names))
    cbn.eval()
    assert torch.isfinite(cbn.running_mean).all() and torch.isfinite(cbn.running_var).all()


def test_as_batchnorm_is_batchnorm_and_restores_the_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    cbn = CrossIterationBatchNorm2d(8, window_size=3, sync=True)
    cbn.bind(conv)
    cbn.effective_window = 3
    for it in range(3):
        cbn.iteration = it
        cbn(conv(torch.randn(2, 3, 8, 8)))
    entries = cbn.window.mean.clone()
    bn = nn.BatchNorm2d(8)
    bn.load_state_dict(cbn.state_dict())
    x = conv(torch.randn(2, 3, 8, 8)).detach()
    with cbn.as_batchnorm() as layer:
        cbn.iteration = 3
        torch.testing.assert_close(layer(x), bn(x))  # the batch alone, as BN in training
        torch.testing.assert_close(cbn.running_mean, bn.running_mean)
        torch.testing.assert_close(cbn.running_var, bn.running_var)
        assert torch.equal(cbn.window.mean, entries)  # nothing recorded
        running = cbn.running_mean.clone()
        cbn.eval()  # exports nothing
        assert torch.equal(cbn.running_mean, running)
        cbn.train()
    assert (cbn.effective_window, cbn.sync, cbn.compensate_running_stats) == (3, True, True)


def test_window_of_compensable_and_uncompensable_entries():
    """Entries recorded while the conv was frozen carry no derivatives: the window uses them as
    recorded, beside compensated ones, whose mean is the mean of their batch through the current
    conv (exact: the mean is linear in the weights)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1).double()
    cbn = CrossIterationBatchNorm2d(6, window_size=4).double()
    cbn.bind(conv)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    inputs = [torch.randn(2, 3, 8, 8, dtype=torch.float64) + i for i in range(4)]
    raw_means = []
    for it, x in enumerate(inputs):
        cbn.iteration = it
        conv.requires_grad_(it != 1)  # iteration 1's entry: no derivatives
        y = conv(x)
        raw_means.append(y.detach().mean((0, 2, 3)))
        with torch.no_grad():  # every batch through the conv of this forward (not through the
            # module: its forward hook would hand the layer another input than y's)
            now = [F.conv2d(earlier, conv.weight, conv.bias, padding=1).mean((0, 2, 3))
                   for earlier in inputs]
        (cbn(y) * torch.randn_like(y)).sum().backward()
        if it != 1:
            opt.step()
        opt.zero_grad()
    stats = cbn.window_stats()  # the last forward's window, newest first: iterations 2, 1, 0
    assert stats['compensated'].tolist() == [True, False, True]
    torch.testing.assert_close(stats['mean'][0], now[2])
    torch.testing.assert_close(stats['mean'][1], raw_means[1])  # as recorded
    torch.testing.assert_close(stats['mean'][2], now[0])
    assert not torch.allclose(stats['mean'][1], now[1])  # the weights did move since
