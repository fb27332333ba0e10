"""The CBN layer and its parts (see each module's docstring, and the README's code map)."""
from .binding import ConvBinding, find_producing_conv, plain_conv_problem
from .conv_moments import ConvGeometry, compensate, moment_derivatives, output_moments
from .cross_iteration_bn import CBN, CrossIterationBatchNorm2d
from .window import MomentWindow

__all__ = [
    'CBN', 'CrossIterationBatchNorm2d', 'ConvBinding', 'ConvGeometry', 'MomentWindow',
    'compensate', 'find_producing_conv', 'moment_derivatives', 'output_moments',
    'plain_conv_problem'
]
