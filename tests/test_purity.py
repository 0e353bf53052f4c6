"""Hand-derived means hand-derived: no handmade op may reach torch's conv/pool kernels.

A TorchDispatchMode logs every aten op dispatched while the handmade ops run forward,
backward, double backward and forward-mode AD; none may be a convolution or pooling
kernel (or their backward).  A control test shows the logger does catch torch's own ops.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as torch_F
from torch.autograd.forward_ad import dual_level, make_dual, unpack_dual
from torch.utils._python_dispatch import TorchDispatchMode

import handmade.functional as H

FORBIDDEN = re.compile(
    r"conv|pool|mkldnn|cudnn|miopen|nnpack|thnn|slow_conv|_nnpack|depthwise|xnnpack"
)


class AtenLog(TorchDispatchMode):
    """Records the name of every aten op dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.name())
        return func(*args, **(kwargs or {}))


def forbidden(ops: set[str]) -> set[str]:
    return {op for op in ops if FORBIDDEN.search(op)}


def exercise(fn, *inputs: torch.Tensor) -> set[str]:
    """Run forward, backward, double backward and a jvp of ``fn``; return the aten ops seen."""
    with AtenLog() as log:
        out = fn(*inputs)
        upstream = torch.randn_like(out, requires_grad=True)
        grads = torch.autograd.grad(out, inputs, upstream, create_graph=True)
        total = sum((g * torch.randn_like(g)).sum() for g in grads)
        torch.autograd.grad(total, (*inputs, upstream), allow_unused=True)  # double backward
        with dual_level():
            duals = [make_dual(t.detach(), torch.randn_like(t)) for t in inputs]
            unpack_dual(fn(*duals))
    return log.ops


def _x(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


CASES = {
    "conv2d": (
        lambda x, w, b: H.conv2d(x, w, b, stride=2, padding=1, groups=2),
        (_x(2, 4, 7, 7), _x(6, 2, 3, 3), _x(6)),
    ),
    "conv2d-dilated-same": (
        lambda x, w: H.conv2d(x, w, padding="same", dilation=2),
        (_x(1, 3, 6, 6), _x(2, 3, 2, 3)),
    ),
    "conv2d-1x1": (lambda x, w: H.conv2d(x, w), (_x(2, 3, 5, 5), _x(4, 3, 1, 1))),
    "max_pool2d": (lambda x: H.max_pool2d(x, 3, 2, 1, ceil_mode=True), (_x(2, 3, 7, 7),)),
    "avg_pool2d": (
        lambda x: H.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
        (_x(2, 3, 7, 7),),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_handmade_ops_never_dispatch_conv_or_pool_kernels(name: str) -> None:
    fn, inputs = CASES[name]
    ops = exercise(fn, *inputs)
    assert ops, "the dispatch logger saw nothing"
    assert not forbidden(ops), f"{name} reached torch kernels: {sorted(forbidden(ops))}"


@pytest.mark.parametrize(
    "fn, inputs",
    [
        (lambda x, w: torch_F.conv2d(x, w), (_x(1, 2, 5, 5), _x(3, 2, 3, 3))),
        (lambda x: torch_F.max_pool2d(x, 2), (_x(1, 2, 4, 4),)),
        (lambda x: torch_F.avg_pool2d(x, 2), (_x(1, 2, 4, 4),)),
    ],
)
def test_logger_catches_torch_kernels(fn, inputs) -> None:
    """Control: the same check flags torch's own conv/pool (so the test above can fail)."""
    assert forbidden(exercise(fn, *inputs))
