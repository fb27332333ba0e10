"""The CBN layer and its parts (see each module's docstring, and the README's code map).

Glossary. The words of this package, one meaning each:

* *entry*: one iteration's statistics of a layer's input (mean, variance, second moment, and for
  a compensable entry the derivatives of its moments w.r.t. the producer's weight);
* *window*: the entries one iteration pools, the current batch included; *window size* (*k*)
  their largest number, *effective window* the number in use now (1 during burn-in);
* *ring*: the fixed slots holding the committed entries (:class:`~mmcbn.layers.window.
  MomentWindow`); a *slot* is one place in it, holding one entry as a *row* of floats; the
  *cursor* counts the entries committed, and modulo the ring's size is the slot written next;
* *pending*: this iteration's entry, beside the ring; *committed*: written into the ring when
  the iteration ends (after the optimizer step that moves the producer, else when the next
  iteration starts);
* *producer*: the conv whose output is the layer's input; *bound*: the layer knows it;
* *compensable*: an entry recorded with derivatives; *compensated*: moved to the producer's
  current weights (first order; exact for the mean);
* *valid*: an entry whose batch statistics were finite (others are never used);
* *positions*: the ``N * H * W`` values per channel behind a statistic (a count);
* *iteration*: one optimizer step's worth of calls, numbered by ``CBNHook``.
"""
from .binding import ConvBinding, find_producing_conv, plain_conv_problem
from .conv_moments import ConvGeometry, compensate, moment_derivatives, output_moments
from .cross_iteration_bn import CBN, CrossIterationBatchNorm2d
from .window import MomentWindow

__all__ = [
    'CBN', 'CrossIterationBatchNorm2d', 'ConvBinding', 'ConvGeometry', 'MomentWindow',
    'compensate', 'find_producing_conv', 'moment_derivatives', 'output_moments',
    'plain_conv_problem'
]
