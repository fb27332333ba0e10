"""Behaviour that depends on the running torch: what a layer does where torch lacks an API."""
import warnings

import torch
from torch import nn

from mmcbn import CrossIterationBatchNorm2d


def _train(model, cbn, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for it in range(steps):
        cbn.iteration = it
        model(torch.randn(2, 3, 8, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_graph_binding_without_the_saved_tensor_hooks_api_says_so_once(monkeypatch):
    """torch < 2.2 has no ``_top_saved_tensors_default_hooks``: a layer nobody bound cannot read
    its conv's input off the graph, so it must not report itself bound (it would run
    uncompensated); it warns once, naming the torch version, and stays unbound."""
    monkeypatch.delattr(torch._C._autograd, '_top_saved_tensors_default_hooks')
    torch.manual_seed(0)
    cbn = CrossIterationBatchNorm2d(4, window_size=3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), cbn)  # no bind(): the graph would be the only way
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _train(model, cbn)
    messages = [str(w.message) for w in caught if 'mmcbn' in str(w.message)]
    assert len(messages) == 1, messages
    assert f'torch {torch.__version__}' in messages[0] and 'uncompensated' in messages[0]
    assert cbn.binding is None
    assert f'torch {torch.__version__}' in cbn.unbound_reason


def test_structural_binding_needs_no_graph_api(monkeypatch):
    """The same torch with the layer bound structurally: compensated as on any torch (the entry
    at the current weights differs from the recorded one once the conv has moved)."""
    monkeypatch.delattr(torch._C._autograd, '_top_saved_tensors_default_hooks')
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    cbn = CrossIterationBatchNorm2d(4, window_size=3)
    cbn.bind(conv)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing to say
        _train(nn.Sequential(conv, cbn), cbn)
    stats = cbn.window_stats()
    assert stats['mean'].shape[0] == 2
    assert (stats['mean'] - stats['raw_mean']).abs().max() > 1e-4
