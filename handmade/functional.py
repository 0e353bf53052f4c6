"""Functional interface, a drop-in for the matching parts of :mod:`torch.nn.functional`.

Each function validates its arguments as torch does, then applies a
:class:`torch.autograd.Function` whose backward is derived by hand:

- :func:`conv2d` -> :class:`handmade.conv.Conv2dFunction`
- :func:`max_pool2d` -> :class:`handmade.pooling.MaxPool2dFunction`
- :func:`avg_pool2d` -> :class:`handmade.pooling.AvgPool2dFunction`
"""

from .conv import conv2d
from .pooling import avg_pool2d, max_pool2d

__all__ = ["avg_pool2d", "conv2d", "max_pool2d"]
