"""Behaviour that depends on the running torch: what a layer does where torch lacks an API."""
import warnings

import torch
from torch import nn

from mmcbn import CrossIterationBatchNorm2d, convert_cbn_to_bn


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


def test_import_time_effects_are_undone_and_the_optimizer_hook_leaves_with_its_layers(
        monkeypatch):
    import gc

    import mmengine.model
    import mmengine.runner.runner

    import mmcbn
    from mmcbn.layers import running_stats
    mmcbn.uninstall_sync_bn_support()
    try:
        for namespace in (mmengine.model, mmengine.runner.runner):
            assert not hasattr(namespace.convert_sync_batchnorm, '__wrapped_by_mmcbn__')
        synced = mmengine.model.convert_sync_batchnorm(CrossIterationBatchNorm2d(4))
        assert type(synced) is torch.nn.SyncBatchNorm  # mmengine's own behaviour again
    finally:
        mmcbn.engine.sync_batchnorm.install()
    assert mmengine.model.convert_sync_batchnorm(CrossIterationBatchNorm2d(4)).sync
    # the process-wide optimizer hook follows the layers that need it, and leaves after them
    import weakref
    monkeypatch.setattr(running_stats, '_following_layers', weakref.WeakSet())
    monkeypatch.setattr(running_stats, '_optimizer_hook', None)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4))
    model[1].bind(model[0])
    assert running_stats._optimizer_hook is not None
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert running_stats._optimizer_hook is not None  # the layer follows the steps
    convert_cbn_to_bn(model)  # unbinds: no layer left to follow
    assert running_stats._optimizer_hook is None
