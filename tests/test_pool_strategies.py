"""Each way handmade's max_pool2d can compute its forward agrees with torch bit for bit,
and each way avg_pool2d can spread its gradient over windows that tile the input agrees
with torch's gradient.

Windows that tile the input (kernel = stride, no padding or dilation) in float32/float64 go
through :func:`handmade.pooling._max_pool_tiled`, which re-lays out the taps and works in
that copy in place; every other call through :func:`handmade.pooling._max_pool_taps`.  A spy
records which one ran, so a changed dispatch rule fails here instead of leaving a path
untested; values and indices are compared exactly (ties, NaN, -inf), and the input must come
out unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import handmade.functional as H
import handmade.pooling as pooling

PATHS = ("_max_pool_tiled", "_max_pool_taps")

# name: input shape, dtype, max_pool2d kwargs, path
CASES: dict[str, tuple[tuple, torch.dtype, dict[str, Any], str]] = {
    "2x2/2, float32 (LeNet)": (
        (5, 3, 12, 12),
        torch.float32,
        dict(kernel_size=2),
        "_max_pool_tiled",
    ),
    "2x3/(2,3), float64, rows and columns left over": (
        (2, 3, 9, 11),
        torch.float64,
        dict(kernel_size=(2, 3)),
        "_max_pool_tiled",
    ),
    "1x3/(1,3): the re-layout alone would be a view of the input": (
        (2, 4, 3, 9),
        torch.float64,
        dict(kernel_size=(1, 3)),
        "_max_pool_tiled",
    ),
    "1x1/1: a single tap, no flags to sum": (
        (2, 3, 5, 6),
        torch.float32,
        dict(kernel_size=1),
        "_max_pool_tiled",
    ),
    "unbatched 2x2/2": ((3, 8, 8), torch.float32, dict(kernel_size=2), "_max_pool_tiled"),
    "2x2/2, float16": ((5, 3, 12, 12), torch.float16, dict(kernel_size=2), "_max_pool_taps"),
    "2x2/2 ceil_mode, a partial last window": (
        (2, 3, 9, 9),
        torch.float32,
        dict(kernel_size=2, ceil_mode=True),
        "_max_pool_taps",
    ),
    "3x3/2, overlapping windows": (
        (2, 3, 9, 9),
        torch.float32,
        dict(kernel_size=3, stride=2),
        "_max_pool_taps",
    ),
    "2x2/2 padded": ((2, 3, 8, 8), torch.float32, dict(kernel_size=2, padding=1), "_max_pool_taps"),
}


def hard_input(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """Values from a small set (many ties within a window) with NaN, +inf and -inf mixed in."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, shape, generator=gen).to(dtype)
    flat = x.view(-1)
    for value, every in ((float("nan"), 7), (float("-inf"), 5), (float("inf"), 11)):
        flat[torch.randint(0, every, (flat.numel(),), generator=gen) == 0] = value
    return x


@pytest.mark.parametrize("split", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", list(CASES))
def test_max_pool_path_matches_torch(
    name: str, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape, dtype, kwargs, path = CASES[name]
    chunks: list[int] = []
    if split:  # small buffers split too: the tiled path loops over chunks of planes
        monkeypatch.setattr(pooling, "MIN_TAP_BUFFER", 0)
        slices = pooling.chunk_slices

        def counted(*args: Any, **kwargs: Any) -> list[slice]:
            result = slices(*args, **kwargs)
            chunks.append(len(result))
            return result

        monkeypatch.setattr(pooling, "chunk_slices", counted)
    ran = []
    for fn_name in PATHS:
        fn = getattr(pooling, fn_name)

        @functools.wraps(fn)
        def spy(*args: Any, _fn: Any = fn, _name: str = fn_name) -> Any:
            ran.append(_name)
            return _fn(*args)

        monkeypatch.setattr(pooling, fn_name, spy)
    x = hard_input(shape, dtype)
    before = x.clone()
    y, index = H.max_pool2d(x, return_indices=True, **kwargs)
    assert ran == [path]
    single_tap = kwargs["kernel_size"] in (1, (1, 1))  # (its taps take no more than y)
    if split and path == "_max_pool_tiled" and not single_tap:
        assert chunks and chunks[0] > 1
    ref_y, ref_index = F.max_pool2d(x, return_indices=True, **kwargs)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)  # input untouched


def test_tiled_max_pool_gradient_and_empty_batch() -> None:
    """The gradient routes through the tiled path's indices as torch routes it, and an empty
    batch (no chunk to loop over) still gives empty outputs of the right shape."""
    x = hard_input((4, 2, 6, 6), torch.float64).nan_to_num(0.0, 3.0, -3.0).requires_grad_()
    g = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    (ours,) = torch.autograd.grad(H.max_pool2d(x, 2), x, g)
    (theirs,) = torch.autograd.grad(F.max_pool2d(x, 2), x, g)
    assert torch.equal(ours, theirs)
    empty = torch.empty(0, 3, 8, 8)
    y, index = H.max_pool2d(empty, 2, return_indices=True)
    assert y.shape == index.shape == (0, 3, 4, 4)


class _DropsGradient(torch.autograd.Function):
    """Identity whose backward sends no gradient (``None``) to its input."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> None:
        return None


def test_max_pool_backward_without_gradient_for_its_output() -> None:
    """The max pool does not materialize zero gradients (its indices never get one): when
    nothing reaches its output either, its backward passes nothing on instead of failing,
    and the input's other uses still get theirs."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    loss = _DropsGradient.apply(H.max_pool2d(x, 2)).sum() + (2 * x).sum()
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.full_like(x, 2.0))


# input shape, avg_pool2d kwargs: windows that tile the input (stride >= kernel, no padding)
TILED_AVG_CASES = {
    "2x2/2 (LeNet)": ((3, 2, 10, 10), dict(kernel_size=2)),
    "2x2/3: gaps between windows, a row and column left over": (
        (3, 2, 10, 11),
        dict(kernel_size=2, stride=3),
    ),
    "3x2/(3,2), divisor_override": ((2, 3, 9, 8), dict(kernel_size=(3, 2), divisor_override=5)),
    "7x7 global": ((2, 4, 7, 7), dict(kernel_size=7)),
}


@pytest.mark.parametrize("copies", [True, False], ids=["per-tap copies", "expanded view"])
@pytest.mark.parametrize("name", list(TILED_AVG_CASES))
def test_tiled_avg_pool_gradient(name: str, copies: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways the tiled average pool spreads ``g / D`` over its windows (one strided copy
    per tap up to ``SHARE_COPIES_MAX`` taps, an expanded view above) give torch's gradient,
    zeros between and after the windows included."""
    monkeypatch.setattr(pooling, "SHARE_COPIES_MAX", 1 << 10 if copies else 0)
    shape, kwargs = TILED_AVG_CASES[name]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = H.avg_pool2d(x, **kwargs)
    g = torch.randn(y.shape, dtype=torch.float64)
    (ours,) = torch.autograd.grad(y, x, g)
    (theirs,) = torch.autograd.grad(F.avg_pool2d(x, **kwargs), x, g)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_max_pool_maxima_alone_match_torch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where nothing needs the winners (no index asked for, nothing to differentiate), the
    max pool returns the running maximum of its taps alone (:func:`window_maxima`), which
    must equal torch's output bit for bit on the same hard inputs (ties, NaN, +-inf)."""
    shape, dtype, kwargs, _ = CASES[name]
    functions = []
    monkeypatch.setattr(
        pooling.MaxPool2dFunction, "forward", lambda *args: functions.append(args) or None
    )
    x = hard_input(shape, dtype)
    before = x.clone()
    with torch.no_grad():
        y = H.max_pool2d(x.requires_grad_(dtype.is_floating_point), **kwargs)
    y_grad_off = H.max_pool2d(x.detach(), **kwargs)  # grad mode on, no input needing one
    assert not functions  # the autograd Function never ran
    ref = F.max_pool2d(x.detach(), **kwargs)
    for ours in (y, y_grad_off):
        assert not ours.requires_grad
        torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0, equal_nan=True)


def test_max_pool_takes_the_function_where_winners_are_needed() -> None:
    """Indices asked for, an input that needs a gradient, a forward-mode tangent: each
    goes through :class:`MaxPool2dFunction` (its winners route the gradient)."""
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert H.max_pool2d(x.requires_grad_(), 2).grad_fn is not None
    _, index = H.max_pool2d(x.detach(), 2, return_indices=True)
    assert torch.equal(index, F.max_pool2d(x.detach(), 2, return_indices=True)[1])
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        y = H.max_pool2d(fwAD.make_dual(x.detach(), tangent), 2)
        ours = fwAD.unpack_dual(y).tangent
    with fwAD.dual_level():
        theirs = fwAD.unpack_dual(F.max_pool2d(fwAD.make_dual(x.detach(), tangent), 2)).tangent
    assert ours is not None and torch.equal(ours, theirs)
