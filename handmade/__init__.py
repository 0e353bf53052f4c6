"""handmade: conv2d, max_pool2d and avg_pool2d with hand-derived backward passes.

``handmade.functional`` mirrors :mod:`torch.nn.functional`, ``handmade.nn`` mirrors
:mod:`torch.nn`; every op is a :class:`torch.autograd.Function` whose forward,
backward, double backward and forward-mode (jvp) rules are written from the math
with elementary tensor operations only.  ``handmade.convert(model)`` swaps torch's
conv/pool modules in any model for these; ``handmade.models.LeNet5`` is LeNet-5;
``handmade.reference`` is an explicit-loop NumPy oracle.
"""

from . import functional, models, nn, reference
from .convert import convert

__all__ = ["convert", "functional", "models", "nn", "reference"]
