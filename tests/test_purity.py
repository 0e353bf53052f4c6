"""Hand-derived means hand-derived: no handmade op may reach torch's conv/pool kernels.

A TorchDispatchMode logs every op dispatched while the handmade ops run forward,
backward, double backward and forward-mode AD, in float64 and in float32; none may be a
convolution or pooling kernel (or their backward), nor any oneDNN/cuDNN/... op but one:
oneDNN's matrix product, ``mkldnn::_linear_pointwise`` (``X @ W^T``, with a fused add in its
``.binary`` form), which the float32 GEMMs run on where it is faster (:mod:`handmade._gemm`)
-- a GEMM, no convolution.  A control test shows the logger does catch torch's own ops.
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
    r"conv|pool|mkldnn|onednn|cudnn|miopen|nnpack|thnn|slow_conv|_nnpack|depthwise|xnnpack"
)
# the one oneDNN op allowed: its matrix product (default and fused-add overloads)
GEMM = re.compile(r"mkldnn::_linear_pointwise(\.binary)?")


class AtenLog(TorchDispatchMode):
    """Records the name of every aten op dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.name())
        return func(*args, **(kwargs or {}))


def forbidden(ops: set[str]) -> set[str]:
    return {op for op in ops if FORBIDDEN.search(op) and not GEMM.fullmatch(op)}


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


def _x(*shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


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
    # float32: the forward and the first backward multiply on oneDNN (wide kernel rows: the
    # channels-last phase rows; a ResNet-sized 1x1)
    "conv2d-float32-wide-rows": (
        lambda x, w, b: H.conv2d(x, w, b, stride=(2, 1), padding=1),
        (
            _x(2, 32, 16, 16, dtype=torch.float32),
            _x(32, 32, 3, 3, dtype=torch.float32),
            _x(32, dtype=torch.float32),
        ),
    ),
    "conv2d-float32-1x1": (
        lambda x, w: H.conv2d(x, w),
        (_x(2, 256, 28, 28, dtype=torch.float32), _x(64, 256, 1, 1, dtype=torch.float32)),
    ),
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
    # the float32 cases do reach oneDNN's GEMM (so the allowance above is exercised)
    assert any(GEMM.fullmatch(op) for op in ops) == ("float32" in name)


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


def test_only_onednns_matrix_product_is_allowed() -> None:
    """The allowance is for the GEMM alone: oneDNN's convolution (or anything else of it)
    is still flagged."""
    allowed = {"mkldnn::_linear_pointwise", "mkldnn::_linear_pointwise.binary"}
    flagged = {"mkldnn::_convolution_pointwise", "aten::mkldnn_convolution", "mkldnn::_foo"}
    assert forbidden(allowed | flagged) == flagged
