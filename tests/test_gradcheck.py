"""Numerical proof of the hand-derived rules: gradcheck (reverse, forward-mode and
batched gradients) and gradgradcheck (double backward) in float64, several
configurations per op.  Max-pool inputs are distinct values so that no finite-difference
step crosses a tie."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import handmade.functional as H


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _distinct(*shape: int) -> torch.Tensor:
    n = torch.Size(shape).numel()
    values = torch.randperm(n, dtype=torch.float64) / n  # gaps of 1/n >> gradcheck's eps
    return values.reshape(shape).requires_grad_()


CONV = {
    "plain": ((2, 3, 5, 5), (4, 3, 3, 3), True, {}),
    "stride-pad-groups": ((2, 4, 6, 5), (6, 2, 3, 2), True, dict(stride=2, padding=1, groups=2)),
    "asymmetric-dilated": (
        (1, 2, 7, 6),
        (3, 2, 2, 3),
        False,
        dict(stride=(2, 1), dilation=(2, 1), padding=(1, 2)),
    ),
    "same-even-kernel": ((1, 2, 5, 5), (2, 2, 2, 4), True, dict(padding="same", dilation=(1, 2))),
    "depthwise": ((1, 3, 5, 5), (3, 1, 3, 3), True, dict(groups=3, padding=1)),
    "unbatched": ((2, 5, 4), (3, 2, 3, 2), True, dict(stride=(1, 2))),
}


@pytest.mark.parametrize("name", CONV)
def test_conv2d_gradcheck_and_gradgradcheck(name: str) -> None:
    x_shape, w_shape, has_bias, kwargs = CONV[name]
    inputs = (_t(*x_shape), _t(*w_shape)) + ((_t(w_shape[0]),) if has_bias else ())
    fn = lambda *a: H.conv2d(*a, **kwargs)  # noqa: E731
    assert gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True, fast_mode=True)
    assert gradgradcheck(
        fn, inputs, check_batched_grad=True, check_fwd_over_rev=True, fast_mode=True
    )


POOLS = {
    "max-2x2": (H.max_pool2d, dict(kernel_size=2)),
    "max-3x3-s2-p1-ceil": (H.max_pool2d, dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    "max-dilated": (H.max_pool2d, dict(kernel_size=(2, 3), stride=(1, 2), padding=1, dilation=2)),
    "avg-2x2": (H.avg_pool2d, dict(kernel_size=2)),
    "avg-ceil-exclude-pad": (
        H.avg_pool2d,
        dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    ),
    "avg-divisor": (
        H.avg_pool2d,
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), divisor_override=3),
    ),
}


@pytest.mark.parametrize("unbatched", [False, True])
@pytest.mark.parametrize("name", POOLS)
def test_pool_gradcheck_and_gradgradcheck(name: str, unbatched: bool) -> None:
    op, kwargs = POOLS[name]
    x = _distinct(3, 7, 6) if unbatched else _distinct(2, 3, 7, 6)
    fn = lambda a: op(a, **kwargs)  # noqa: E731
    assert gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True, fast_mode=True)
    assert gradgradcheck(fn, (x,), check_batched_grad=True, fast_mode=True)


TRANSFORM_CASES = {  # (handmade, torch, argnums to differentiate)
    "conv2d": (
        lambda t, w: H.conv2d(t, w, padding=1),
        lambda t, w: F.conv2d(t, w, padding=1),
        (0, 1),
    ),
    "max_pool2d": (lambda t, w: H.max_pool2d(t, 2), lambda t, w: F.max_pool2d(t, 2), (0,)),
    "avg_pool2d": (
        lambda t, w: H.avg_pool2d(t, 3, 1, 1),
        lambda t, w: F.avg_pool2d(t, 3, 1, 1),
        (0,),
    ),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap fallback
@pytest.mark.parametrize("op", TRANSFORM_CASES)
def test_torch_func_transforms_match_torch(op: str) -> None:
    """Under torch.func transforms (vmap over the forward, grad) the ops run as the
    setup_context Functions, elsewhere as their faster legacy twins: both agree with torch."""
    ours, theirs, argnums = TRANSFORM_CASES[op]
    x = _distinct(3, 2, 4, 6, 6).detach()
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    vmapped = torch.func.vmap(ours, (0, None))(x, w)
    torch.testing.assert_close(vmapped, torch.func.vmap(theirs, (0, None))(x, w))
    loss = lambda f: lambda t, ww: f(t, ww).square().sum()  # noqa: E731
    for argnum in argnums:
        grad = torch.func.grad(loss(ours), argnum)(x[0], w)
        torch.testing.assert_close(grad, torch.func.grad(loss(theirs), argnum)(x[0], w))
    plain = x[0].clone().requires_grad_()
    y = ours(plain, w)
    assert type(y.grad_fn).__name__.endswith("FunctionBackward")  # our rule, not torch's
    (gx,) = torch.autograd.grad(y.square().sum(), plain)
    torch.testing.assert_close(gx, torch.func.grad(loss(theirs))(x[0], w))
