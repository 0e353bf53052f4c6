"""Models built from the handmade layers (or, for comparison, from torch's).

:class:`LeNet5` is defined once; ``ops`` only decides where its convolution and
pooling layers come from, so a handmade model and a torch model have the same
parameter names, shapes and (under the same seed) the same initial weights, and
their ``state_dict``\\ s load into each other.
"""

from __future__ import annotations

import torch
from torch import nn as torch_nn

from . import nn as handmade_nn

OPS = ("handmade", "torch")
POOLS = ("max", "avg")
# MNIST's pixel mean and standard deviation (of intensities in [0, 1]): LeNet5's inputs are
# normalized by them (train_mnist.py's images, the bench's handwriting-like ones)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def layer_classes(ops: str) -> tuple[type, type, type]:
    """Return ``(Conv2d, MaxPool2d, AvgPool2d)`` from ``handmade.nn`` or ``torch.nn``.

    Args:
        ops: ``"handmade"`` for the hand-derived autograd Functions, ``"torch"`` for
            torch's own kernels.

    Raises:
        ValueError: if ``ops`` is neither.
    """
    if ops == "handmade":
        module = handmade_nn
    elif ops == "torch":
        module = torch_nn
    else:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
    return module.Conv2d, module.MaxPool2d, module.AvgPool2d


class LeNet5(torch_nn.Module):
    """LeNet-5 in its common modern form (ReLU activations, max or average pooling).

    Shapes for a batch of ``N`` MNIST digits::

        input                      (N, 1, 28, 28)
        conv1 5x5, padding 2       (N, 6, 28, 28)   # the padding turns 28x28 into
        ReLU, pool 2x2             (N, 6, 14, 14)   # LeNet's 32x32 input field
        conv2 5x5                  (N, 16, 10, 10)
        ReLU, pool 2x2             (N, 16, 5, 5)
        flatten                    (N, 400)
        fc1, ReLU                  (N, 120)
        fc2, ReLU                  (N, 84)
        fc3                        (N, num_classes)  # logits

    Args:
        ops: ``"handmade"`` (default) builds the conv and pooling layers from
            :mod:`handmade.nn`; ``"torch"`` builds them from :mod:`torch.nn`. The fully
            connected layers are ``torch.nn.Linear`` either way.
        pool: ``"max"`` (default) or ``"avg"`` (average pooling, closer to LeCun's
            original subsampling layers).
        num_classes: size of the output layer.

    Raises:
        ValueError: for an unknown ``ops`` or ``pool``.
    """

    def __init__(self, ops: str = "handmade", pool: str = "max", num_classes: int = 10) -> None:
        super().__init__()
        conv, max_pool, avg_pool = layer_classes(ops)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        pool_class = max_pool if pool == "max" else avg_pool
        self.ops = ops
        self.pool_kind = pool
        self.conv1 = conv(1, 6, kernel_size=5, padding=2)
        self.pool1 = pool_class(kernel_size=2)
        self.conv2 = conv(6, 16, kernel_size=5)
        self.pool2 = pool_class(kernel_size=2)
        self.fc1 = torch_nn.Linear(16 * 5 * 5, 120)
        self.fc2 = torch_nn.Linear(120, 84)
        self.fc3 = torch_nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, 1, 28, 28)`` to class logits ``(N, num_classes)``."""
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)

    def extra_repr(self) -> str:
        return f"ops={self.ops!r}, pool={self.pool_kind!r}"
