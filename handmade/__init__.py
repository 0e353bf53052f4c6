"""handmade: conv2d, max_pool2d and avg_pool2d with hand-derived backward passes.

``handmade.functional`` mirrors :mod:`torch.nn.functional`, ``handmade.nn`` mirrors
:mod:`torch.nn`; every op is a :class:`torch.autograd.Function` whose forward,
backward, double backward and forward-mode (jvp) rules are written from the math
with elementary tensor operations only.
"""

from . import functional, nn

__all__ = ["functional", "nn"]
