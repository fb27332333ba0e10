"""Which conv produces a CBN layer's input, and the layer's link to it (:class:`ProducerLink`).

Two ways to find it, both ending in a :class:`ConvBinding`:

* structurally, from a module tree (:func:`find_producing_conv`): a ``Sequential`` whose previous child
  is a conv, an mmcv ``ConvModule`` with ``norm`` right after ``conv``, or ``convN``/``bnN`` (or
  ``normN``) siblings as in torchvision's and mmdet's ResNets;
* from the autograd graph of the layer's input on a training forward (:func:`binding_from_graph`), for
  a layer nobody bound.

Only a plain ``nn.Conv2d`` (or a subclass that keeps its forward, such as mmcv's ``Conv2d`` wrapper)
can be compensated: a deformable or weight-standardised conv, a transposed conv, or an input that went
through anything after the conv (an activation, a pooling) cannot. Outcomes are types
(:class:`ProducerSearch`, :class:`GraphBinding`), never message text.
"""
import re
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from .conv_moments import ConvGeometry, PositionSample, identity_excess, moment_derivatives
from .torch_features import saved_input_is_hooked

#: ``forward`` functions of ``nn.Conv2d`` subclasses known to compute a plain conv with
#: ``self.weight``. Extend it to allow another wrapper.
PLAIN_CONV_FORWARDS: Set[Callable] = {nn.Conv2d.forward}
try:  # mmcv's Conv2d wrapper only special-cases empty inputs
    from mmcv.cnn.bricks.wrappers import Conv2d as _MMCVConv2d
    PLAIN_CONV_FORWARDS.add(_MMCVConv2d.forward)
except ImportError:  # pragma: no cover - mmcv is a dependency, but the layer does not need it
    pass


def parameter_versions(weight: Tensor, bias: Optional[Tensor]) -> Tuple[int, int]:
    """A conv's parameters' version counters: they change with every in-place update, an
    optimizer step's included (read on the host: no device sync)."""
    return weight._version, -1 if bias is None else bias._version


@dataclass(eq=False)
class ConvBinding:
    """The conv a CBN layer is compensated against.

    Args:
        weight: the conv's weight parameter (read at every step, never copied).
        bias: its bias parameter, or None.
        geometry: stride, padding, dilation, groups.
        name: the conv's name in the model (or a description), for logs.
        module: the conv module when known; a binding from the autograd graph has none.
    """
    weight: nn.Parameter
    bias: Optional[nn.Parameter]
    geometry: ConvGeometry
    name: str = ''
    module: Optional[nn.Conv2d] = None

    @property
    def trainable(self) -> bool:
        """Whether the optimizer can change the conv (else compensation is zero)."""
        return self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)

    def versions(self) -> Tuple[int, int]:
        """The parameters' :func:`parameter_versions`."""
        return parameter_versions(self.weight, self.bias)

    def derivatives(self, conv_input: Tensor, output: Tensor,
                    sample: Optional[PositionSample] = None,
                    moments: Optional[Tuple[Tensor, Tensor]] = None
                    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The derivatives of ``output``'s moments w.r.t. this conv's weight (float32 or wider):
        ``patch_mean``, ``sqmean_grad`` (from ``sample``'s positions, or all) and, for a sampled
        one and the batch's ``moments`` given, its :func:`~mmcbn.layers.conv_moments.
        identity_excess`."""
        with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
            patch_mean, sqmean_grad = moment_derivatives(
                conv_input.detach(), output.detach(), self.geometry, self.weight, self.bias,
                sample)
            excess = None
            if sample is not None and moments is not None:
                excess = identity_excess(sqmean_grad, self.weight, self.bias, *moments)
        return patch_mean, sqmean_grad, excess


def plain_conv_problem(module: nn.Module) -> Optional[str]:
    """None if ``module`` is a conv CBN can be compensated against, else why not."""
    if not isinstance(module, nn.Conv2d):
        return f'{type(module).__name__} is not an nn.Conv2d'
    if type(module).forward not in PLAIN_CONV_FORWARDS or \
            type(module)._conv_forward is not nn.Conv2d._conv_forward:
        return (f'{type(module).__name__} overrides the conv forward (deformable or weight-'
                'standardised convs are not linear in their weight parameter)')
    if module.padding_mode != 'zeros' and not isinstance(module.padding, tuple):
        return f'{type(module).__name__} uses padding={module.padding!r} with ' \
               f'padding_mode={module.padding_mode!r}'
    return None


def binding_for(conv: nn.Conv2d, name: str = '') -> ConvBinding:
    """A binding to ``conv``; raises TypeError if it cannot be compensated."""
    problem = plain_conv_problem(conv)
    if problem is not None:
        raise TypeError(f'cannot bind a CBN layer to {name or type(conv).__name__}: {problem}')
    return ConvBinding(conv.weight, conv.bias, ConvGeometry.of(conv), name or type(conv).__name__,
                       conv)


_ORDERED_SUFFIX = re.compile(r'^(?:bn|norm)(\d*)$')


@dataclass(frozen=True)
class ProducerSearch:
    """What the module structure tells about the conv that feeds a CBN layer.

    Args:
        conv: the name of the sibling conv, when found and compensable.
        reason: why there is none, when there is none.
        try_graph: nothing in the structure says either way: bind from the autograd graph at the
            first training step.
    """
    conv: Optional[str] = None
    reason: str = ''
    try_graph: bool = False


def find_producing_conv(parent: nn.Module, child_name: str) -> ProducerSearch:
    """Finds, among ``parent``'s children, the conv whose output feeds ``parent.<child_name>``."""
    names = [n for n, _ in parent.named_children()]
    candidate: Optional[str] = None
    # mmcv ConvModule: conv -> norm -> act in `order`
    order = getattr(parent, 'order', None)
    if hasattr(parent, 'norm_name') and getattr(parent, 'norm_name') == child_name and \
            isinstance(order, tuple) and 'conv' in order:
        if order.index('norm') != order.index('conv') + 1:
            return ProducerSearch(
                reason=f'its ConvModule applies the norm before the conv (order={order})')
        candidate = 'conv'
    elif isinstance(parent, nn.Sequential):
        i = names.index(child_name)
        if i == 0:
            return ProducerSearch(reason='it is the first module of its Sequential: no conv '
                                  'before it')
        candidate = names[i - 1]
    else:
        match = _ORDERED_SUFFIX.match(child_name)
        if match is not None and f'conv{match.group(1)}' in names:
            candidate = f'conv{match.group(1)}'
    if candidate is None:
        return ProducerSearch(reason='no conv next to it in its parent module', try_graph=True)
    problem = plain_conv_problem(getattr(parent, candidate))
    if problem is not None:
        return ProducerSearch(reason=f'its input comes from {candidate}: {problem}')
    return ProducerSearch(conv=candidate)


def _leaf_parameter(node) -> Optional[Tensor]:
    """The leaf tensor behind an autograd edge, looking through one dtype cast (autocast)."""
    if node is None:
        return None
    if type(node).__name__ == 'ToCopyBackward0' and len(node.next_functions) == 1:
        node = node.next_functions[0][0]
    return getattr(node, 'variable', None) if node is not None else None


@dataclass(frozen=True)
class GraphBinding:
    """What the autograd graph of a layer's input says about the conv that produced it.

    Args:
        binding: the producing conv, when it can be compensated.
        reason: why it cannot be, when it cannot.
        nothing_to_compensate: nothing upstream can change (a frozen conv, an input that does not
            require grad): the uncompensated window is exact.
    """
    binding: Optional[ConvBinding] = None
    reason: str = ''
    nothing_to_compensate: bool = False


def binding_from_graph(output: Tensor) -> GraphBinding:
    """Binds to the conv whose output ``output`` is, read off the autograd graph."""
    fn = output.grad_fn
    if fn is None:
        return GraphBinding(nothing_to_compensate=True)
    if type(fn).__name__ != 'ConvolutionBackward0':
        return GraphBinding(reason=f'its input comes from {type(fn).__name__}, not directly from '
                            'a conv')
    if fn._saved_transposed or len(fn._saved_weight.shape) != 4:
        return GraphBinding(reason='its input comes from a transposed or non-2d conv')
    weight = _leaf_parameter(fn.next_functions[1][0])
    if weight is None:
        if fn.next_functions[1][0] is None:
            return GraphBinding(nothing_to_compensate=True)  # frozen weight
        return GraphBinding(reason='the weight of the conv before it is computed from its '
                            'parameter (e.g. weight standardisation)')
    bias_sizes = fn._saved_bias_sym_sizes_opt
    has_bias = bias_sizes is not None and tuple(bias_sizes) == (weight.shape[0], )
    bias = _leaf_parameter(fn.next_functions[2][0]) if has_bias else None
    if has_bias and bias is None:
        return GraphBinding(reason='the conv before it has a bias that is not a trainable leaf '
                            'parameter')
    geometry = ConvGeometry(tuple(weight.shape), tuple(fn._saved_stride), tuple(fn._saved_padding),
                            tuple(fn._saved_dilation), fn._saved_groups)
    return GraphBinding(ConvBinding(weight, bias, geometry,
                                    f'conv with weight {tuple(weight.shape)}'))


def conv_input_from_graph(output: Tensor, binding: ConvBinding) -> Optional[Tensor]:
    """The input of the bound conv, if ``output`` is visibly its output; None if unknown."""
    fn = output.grad_fn
    if fn is None or type(fn).__name__ != 'ConvolutionBackward0' or \
            _leaf_parameter(fn.next_functions[1][0]) is not binding.weight:
        return None
    # Under non-reentrant checkpointing the saved input is packed by a hook: unpacking it here would
    # recompute the region. The entry's derivatives then come from the recomputation.
    if saved_input_is_hooked(fn):
        return None
    return fn._saved_input


def input_contradicts_binding(output: Tensor, binding: ConvBinding) -> bool:
    """True if the graph shows that ``output`` did not come from the bound conv."""
    fn = output.grad_fn
    if fn is None:
        return False
    if type(fn).__name__ != 'ConvolutionBackward0':
        return True
    leaf = _leaf_parameter(fn.next_functions[1][0])
    return leaf is not None and leaf is not binding.weight


class ProducerLink:
    """A CBN layer's link to the conv that produces its input, the one object the layer asks:
    which conv (:attr:`binding`), what its input was in this forward, and whether this call can be
    compensated (:meth:`resolve`).

    The conv's input is captured by a forward hook on a bound conv (the layer passes its own
    capturing method, which keeps the layer picklable) or read off the autograd graph.
    """

    def __init__(self) -> None:
        self._bindings: List[ConvBinding] = []  # at most one; a list keeps it out of nn.Module's tree
        # the capture hook's handle, apart from the binding: torch.compile traces the binding
        # (its parameters) but cannot represent a hook handle
        self._hook: Optional[torch.utils.hooks.RemovableHandle] = None
        #: why the layer cannot be compensated, once known; None if bound or not yet tried
        self.unbound_reason: Optional[str] = None
        self.captured: Optional[Tuple[Tensor, 'weakref.ref[Tensor]']] = None

    @property
    def binding(self) -> Optional[ConvBinding]:
        return self._bindings[0] if self._bindings else None

    def bind(self, conv: nn.Conv2d, name: str, capture: Callable) -> None:
        """Binds to ``conv``, capturing its input and output with the forward hook ``capture``;
        raises TypeError if it cannot be compensated."""
        binding = binding_for(conv, name)
        self.unbind()
        self._hook = conv.register_forward_hook(capture)
        self._bindings.append(binding)

    def unbind(self, reason: Optional[str] = None) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._bindings.clear()
        self.captured = None
        self.unbound_reason = reason

    def capture(self, conv_input: Tensor, output: Tensor) -> None:
        self.captured = (conv_input, weakref.ref(output))

    def resolve(self, input: Tensor, needed: bool,
                warn: Callable[[str, str], None]) -> Tuple[bool, Optional[Tensor]]:
        """Whether this call with ``input`` can be compensated, and the bound conv's input if
        available. Binds from the graph on the first call of a layer nobody bound.

        Args:
            needed: whether anything is to be compensated; False only drops the capture.
            warn: ``warn(key, message)``, the layer's warn-once.
        """
        captured, self.captured = self.captured, None
        if not needed:
            return False, None
        binding = self.binding
        if binding is None:
            if self.unbound_reason is None:
                found = binding_from_graph(input)
                if found.nothing_to_compensate:
                    return False, None
                if found.binding is None:
                    self.unbound_reason = found.reason
                else:
                    binding = found.binding
                    self._bindings.append(binding)
            if binding is None:
                warn('unbound', f'runs the uncompensated window: {self.unbound_reason}')
                return False, None
        if binding.module is not None and captured is not None:
            if captured[1]() is input:
                return True, captured[0]
            contradicted = True  # the bound conv ran, but its output is not this input
        else:
            contradicted = input_contradicts_binding(input, binding)
        if contradicted:
            warn('mismatch', f'got an input that is not the output of its bound conv '
                 f'({binding.name}); such calls use the uncompensated window')
            return False, None
        return True, conv_input_from_graph(input, binding)

    def __getstate__(self):
        state = self.__dict__.copy()
        state['captured'] = None  # a tensor of the current forward, not state
        return state
