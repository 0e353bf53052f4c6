"""The matrix products of :mod:`handmade._gemm`: torch's results, from oneDNN where it may
multiply (float32 on the CPU, nothing recording) and from torch's own ops everywhere else.

A dispatch logger tells which library ran: oneDNN's product is the op
``mkldnn::_linear_pointwise`` (``.binary`` with a fused add).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

from handmade import _gemm as gemm

ONEDNN = "mkldnn::_linear_pointwise"


class OpLog(TorchDispatchMode):
    """Names of the ops dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def ran_onednn(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    with OpLog() as log:
        out = fn()
    return out, any(op.startswith(ONEDNN) for op in log.ops)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding of a 300-term sum (the two libraries sum in different
    orders)."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_onednn_is_there_on_this_cpu() -> None:
    """torch's x86 builds ship oneDNN: the fast path is reachable (else every other test
    here would only exercise the fallback)."""
    assert gemm._onednn_available()


def _operands(batch: int, m: int, k: int, n: int, layout: str) -> tuple[torch.Tensor, ...]:
    """``a (B, M, K)`` and ``b (B, K, N)`` in a given memory layout, float32."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(batch, m, k, generator=gen)
    b = torch.randn(batch, k, n, generator=gen)
    if layout == "transposed":  # both column-major: read as they are
        a = torch.randn(batch, k, m, generator=gen).mT
        b = torch.randn(batch, n, k, generator=gen).mT
    elif layout == "strided":  # every other column: not dense, copied first
        a = torch.randn(batch, m, 2 * k, generator=gen)[..., ::2]
        b = torch.randn(batch, k, 2 * n, generator=gen)[..., ::2]
    elif layout == "expanded":  # one matrix for the whole batch (stride 0)
        a = torch.randn(1, m, k, generator=gen).expand(batch, m, k)
    return a, b


LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]
BIG = (3, 40, 300, 400)  # 4.8M multiply-adds per matrix: over ONEDNN_MIN_MACS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bmm_and_baddbmm_match_torch_on_onednn(layout: str) -> None:
    a, b = _operands(*BIG, layout)
    c = torch.randn(BIG[0], BIG[1], BIG[3])
    out, onednn = ran_onednn(lambda: gemm.bmm(a, b))
    assert onednn and out.is_contiguous()
    close(out, torch.bmm(a, b))
    close(gemm.baddbmm(c, a, b), torch.baddbmm(c, a, b))
    for beta in (0, 1):
        y = torch.full_like(c, float("nan")) if beta == 0 else c.clone()  # beta=0: NaN ignored
        expected = (c if beta else torch.zeros_like(c)).baddbmm(a, b)
        assert gemm.baddbmm_(y, a, b, beta=beta) is y
        close(y, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mm_addmm_linear_match_torch_on_onednn(layout: str) -> None:
    a, b = (t[0] for t in _operands(*BIG, layout))
    bias, add = torch.randn(BIG[3]), torch.randn(BIG[1], BIG[3])
    out, onednn = ran_onednn(lambda: gemm.mm(a, b))
    assert onednn and out.is_contiguous()
    close(out, torch.mm(a, b))
    close(gemm.addmm(bias, a, b), torch.addmm(bias, a, b))
    out, onednn = ran_onednn(lambda: gemm.linear(a, b.mT, bias, add=add))
    assert onednn
    close(out, a @ b + bias + add)


def _dual(t: torch.Tensor) -> torch.Tensor:
    return fwAD.make_dual(t, torch.ones_like(t))


@pytest.mark.parametrize(
    "case", ["float64", "small", "recording", "forward AD", "vmap", "oneDNN disabled"]
)
def test_torch_multiplies_where_onednn_cannot(case: str) -> None:
    """Other dtypes, products under ``ONEDNN_MIN_MACS``, autograd recording (the gradient
    must flow), dual tensors, ``vmap`` and ``torch.backends.mkldnn.flags(enabled=False)``
    take torch's own products -- with torch's results."""
    a, b = _operands(*BIG, "contiguous")
    if case == "float64":
        a, b = a.double(), b.double()
    elif case == "small":
        a, b = a[:, :4], b
    elif case == "recording":
        a.requires_grad_()
    if case == "forward AD":
        with fwAD.dual_level():
            out, onednn = ran_onednn(lambda: gemm.bmm(_dual(a), b))
            tangent = fwAD.unpack_dual(out).tangent
        torch.testing.assert_close(tangent, torch.bmm(torch.ones_like(a), b))
        out = fwAD.unpack_dual(out).primal
    elif case == "vmap":
        out, onednn = ran_onednn(lambda: torch.vmap(gemm.mm)(a, b))
    elif case == "oneDNN disabled":
        with torch.backends.mkldnn.flags(enabled=False):
            out, onednn = ran_onednn(lambda: gemm.bmm(a, b))
    else:
        out, onednn = ran_onednn(lambda: gemm.bmm(a, b))
    assert not onednn
    torch.testing.assert_close(out, torch.bmm(a, b))
    if case == "recording":
        (grad,) = torch.autograd.grad(out.sum(), a)
        torch.testing.assert_close(grad, torch.ones_like(out) @ b.mT)
