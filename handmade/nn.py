"""Modules, drop-in replacements for :class:`torch.nn.Conv2d`, :class:`torch.nn.MaxPool2d`
and :class:`torch.nn.AvgPool2d`.

Each subclasses torch's module and only replaces the computation with
:mod:`handmade.functional`, so constructor arguments, parameter names, ``state_dict``
keys, ``repr`` and initialization are torch's own: under the same seed,
``handmade.nn.Conv2d(...)`` and ``torch.nn.Conv2d(...)`` hold identical weights, and a
``state_dict`` loads either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import nn

from . import functional as hf

__all__ = ["AvgPool2d", "Conv2d", "MaxPool2d"]


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by ``conv2d`` of :mod:`handmade.functional`.

    All four ``padding_mode`` values work: ``'zeros'`` pads inside the op; ``'reflect'``,
    ``'replicate'`` and ``'circular'`` pad the input first (an elementary pad), as torch does.
    """

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.padding_mode != "zeros":
            padded = torch_F.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode
            )
            return hf.conv2d(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return hf.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class MaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` computed by ``max_pool2d`` of :mod:`handmade.functional`."""

    def forward(self, input: torch.Tensor):
        return hf.max_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            ceil_mode=self.ceil_mode,
            return_indices=self.return_indices,
        )


class AvgPool2d(nn.AvgPool2d):
    """:class:`torch.nn.AvgPool2d` computed by ``avg_pool2d`` of :mod:`handmade.functional`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return hf.avg_pool2d(
            input,
            self.kernel_size,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )
