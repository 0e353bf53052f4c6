"""Slow, explicit-loop NumPy reference for conv2d, max_pool2d and avg_pool2d (forward and backward).

This module is an *independent oracle*: it imports no torch, takes and returns ``np.ndarray``
(layout ``N, C, H, W``), and is written straight from the index formulas with explicit Python
loops over every spatial position and kernel tap. Only the batch and channel dimensions are
vectorized (a small matrix product or an element-wise update per position), so each loop body
reads as one term of the textbook sum. It is meant for small float64 cases in tests and as the
"textbook" row of ``python -m parity bench``; it is orders of magnitude slower than the ops in
:mod:`handmade.functional`.

Conventions shared by all functions:

* ``stride``, ``dilation``, ``kernel_size`` accept an int or an ``(h, w)`` pair (or a 1-tuple,
  as torch does); a pool ``stride`` of ``None`` or ``()`` means ``kernel_size``.
* Pool ``padding`` is an int or ``(ph, pw)`` pair (symmetric, implicit ``-inf`` / zero padding).
* Conv ``padding`` is an int, an ``(ph, pw)`` pair, or an explicit ``(top, bottom, left, right)``
  4-tuple, so that ``padding='same'`` with an even effective kernel can be expressed; use
  :func:`same_padding` to get torch's split (``total = d*(k-1)``, ``left = total // 2``,
  ``right = total - left``: the odd extra goes to the bottom/right).
* Output sizes follow torch: conv ``out = (H + top + bottom - d*(k-1) - 1) // s + 1``; pools
  ``out = floor_or_ceil((H + 2p - d*(k-1) - 1) / s) + 1`` and, with ``ceil_mode``, the last window
  must start inside the input or left padding: ``if (out-1)*s >= H + p: out -= 1``.

NaN and +-inf propagate by IEEE arithmetic, as in torch (NumPy's warnings about them are
silenced). Argument validation is minimal (assertions): callers (tests, benchmarks) pass valid
arguments; the user-facing checks live in :mod:`handmade.functional`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

__all__ = [
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "conv2d_backward",
    "conv2d_forward",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "pool_output_size",
    "same_padding",
]

IntPair = int | Sequence[int]
ConvPadding = int | Sequence[int]
_F = TypeVar("_F", bound=Callable)


def _ieee(fn: _F) -> _F:
    """Run ``fn`` with NumPy's floating-point warnings off: NaN/inf propagate as in torch."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    """Return ``value`` (an int, a 1-sequence or a pair, as torch accepts) as an ``(h, w)`` pair."""
    if isinstance(value, int | np.integer):
        return int(value), int(value)
    pair = tuple(int(v) for v in value)
    assert len(pair) in (1, 2), f"{name} must be an int or a pair, got {value!r}"
    return (pair[0], pair[0]) if len(pair) == 1 else pair  # type: ignore[return-value]


def _pool_stride(stride: IntPair | None, kernel_size: IntPair) -> tuple[int, int]:
    """Pool stride; ``None`` or an empty sequence means the kernel size (torch's default)."""
    if stride is None or (not isinstance(stride, int | np.integer) and len(stride) == 0):
        return _pair(kernel_size, "kernel_size")
    return _pair(stride, "stride")


def _conv_padding(padding: ConvPadding) -> tuple[int, int, int, int]:
    """Conv padding (int, 1-tuple, ``(ph, pw)`` or 4-tuple) as ``(top, bottom, left, right)``."""
    if isinstance(padding, int | np.integer):
        p = int(padding)
        return p, p, p, p
    pads = tuple(int(v) for v in padding)
    if len(pads) == 1:
        return pads * 4  # type: ignore[return-value]
    if len(pads) == 2:
        return pads[0], pads[0], pads[1], pads[1]
    assert len(pads) == 4, f"padding must be an int, a pair or a 4-tuple, got {padding!r}"
    return pads  # type: ignore[return-value]


def same_padding(kernel_size: IntPair, dilation: IntPair = 1) -> tuple[int, int, int, int]:
    """Torch's split of ``padding='same'`` as ``(top, bottom, left, right)``.

    Per spatial dim: ``total = d*(k-1)``, ``before = total // 2``, ``after = total - before``
    (so an odd total puts the extra row/column at the bottom/right).
    """
    (kh, kw), (dh, dw) = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return th // 2, th - th // 2, tw // 2, tw - tw // 2


def _zero_pad(x: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """Zero-pad the last two dims of ``x``."""
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))


# --------------------------------------------------------------------------------------------
# conv2d
# --------------------------------------------------------------------------------------------


@_ieee
def conv2d_forward(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray | None = None,
    stride: IntPair = 1,
    padding: ConvPadding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> np.ndarray:
    """2-D cross-correlation (what torch calls convolution), by the definition.

    With ``xp`` the zero-padded input, ``Cg = C_in / groups`` and ``Og = C_out / groups``, for
    output channel ``o`` in group ``g = o // Og``::

        y[n, o, i, j] = b[o] + sum_{c < Cg, p < kH, q < kW}
                        xp[n, g*Cg + c, i*sH + p*dH, j*sW + q*dW] * w[o, c, p, q]

    Loops: groups, output rows ``i``, output columns ``j``, kernel taps ``p, q``; the sum over
    ``c`` (and all ``n``, all ``o`` of the group at once) is one matrix product per term.

    Args:
        x: input ``(N, C_in, H, W)``.
        w: weight ``(C_out, C_in / groups, kH, kW)``.
        b: optional bias ``(C_out,)``.
        stride, dilation: int or pair.
        padding: int, ``(ph, pw)`` or ``(top, bottom, left, right)``.
        groups: number of channel groups.

    Returns:
        ``y`` of shape ``(N, C_out, Ho, Wo)``, ``Ho = (H + top + bottom - dH*(kH-1) - 1)//sH + 1``.
    """
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, bottom, left, right = _conv_padding(padding)
    n, c_in, _, _ = x.shape
    c_out, cg, kh, kw = w.shape
    assert c_in == cg * groups and c_out % groups == 0, "channel / groups mismatch"
    og = c_out // groups
    xp = _zero_pad(x, top, bottom, left, right)
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, c_out, ho, wo), dtype=np.result_type(x, w))
    for g in range(groups):
        cin, cout = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for i in range(ho):
            for j in range(wo):
                for p in range(kh):
                    for q in range(kw):
                        # (N, Cg) @ (Cg, Og): the sum over input channels c
                        y[:, cout, i, j] += xp[:, cin, i * sh + p * dh, j * sw + q * dw] @ (
                            w[cout, :, p, q].T
                        )
    if b is not None:
        y += b[None, :, None, None]
    return y


@_ieee
def conv2d_backward(
    x: np.ndarray,
    w: np.ndarray,
    gy: np.ndarray,
    stride: IntPair = 1,
    padding: ConvPadding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`conv2d_forward` given the upstream gradient ``gy = dL/dy``.

    Input gradient -- a *full convolution* of the stride-dilated ``gy`` with the kernel rotated
    by 180 degrees. From the forward sum, ``dL/dxp[n, c, u, v]`` collects ``gy[n, o, i, j] *
    w[o, c, p, q]`` over all ``u = i*sH + p*dH``, ``v = j*sW + q*dW``. Built literally:

    1. zero-insert: ``z[n, o, i*sH, j*sW] = gy[n, o, i, j]`` (``sH-1`` zeros between rows);
    2. pad ``z`` with ``dH*(kH-1)`` zeros above and ``dH*(kH-1) + leftover`` below (``leftover``
       = padded-input rows no window reached), likewise for columns, giving ``zp``;
    3. correlate with the flipped kernel ``wf[o, c, p, q] = w[o, c, kH-1-p, kW-1-q]`` at the same
       dilation: ``dxp[n, c, u, v] = sum_{o, p, q} zp[n, o, u + p*dH, v + q*dW] * wf[o, c, p, q]``
       (within each group);
    4. crop the forward padding: ``dx = dxp[:, :, top:top+H, left:left+W]``.

    Weight gradient -- correlation of the input with the upstream gradient::

        dL/dw[o, c, p, q] = sum_{n, i, j} gy[n, o, i, j] * xp[n, g*Cg + c, i*sH + p*dH, j*sW + q*dW]

    Bias gradient: ``dL/db[o] = sum_{n, i, j} gy[n, o, i, j]``.

    Returns:
        ``(gx, gw, gb)`` with the shapes of ``x``, ``w`` and ``(C_out,)``.
    """
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    top, bottom, left, right = _conv_padding(padding)
    n, c_in, h, wd = x.shape
    c_out, cg, kh, kw = w.shape
    og = c_out // groups
    _, _, ho, wo = gy.shape
    xp = _zero_pad(x, top, bottom, left, right)
    hp, wp = xp.shape[2:]

    # 1. zero-inserted ("stride-dilated") upstream gradient
    z = np.zeros((n, c_out, (ho - 1) * sh + 1, (wo - 1) * sw + 1), dtype=gy.dtype)
    for i in range(ho):
        for j in range(wo):
            z[:, :, i * sh, j * sw] = gy[:, :, i, j]
    # 2. full padding (+ the rows/columns of xp that no window reached)
    leftover_h = hp - ((ho - 1) * sh + dh * (kh - 1) + 1)
    leftover_w = wp - ((wo - 1) * sw + dw * (kw - 1) + 1)
    fh, fw = dh * (kh - 1), dw * (kw - 1)
    zp = _zero_pad(z, fh, fh + leftover_h, fw, fw + leftover_w)
    # 3. correlate with the 180-degree-rotated kernel
    wf = w[:, :, ::-1, ::-1]
    gxp = np.zeros(xp.shape, dtype=np.result_type(gy, w))
    for g in range(groups):
        cin, cout = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for u in range(hp):
            for v in range(wp):
                for p in range(kh):
                    for q in range(kw):
                        # (N, Og) @ (Og, Cg): the sum over output channels o
                        gxp[:, cin, u, v] += zp[:, cout, u + p * dh, v + q * dw] @ wf[cout, :, p, q]
    # 4. crop the forward padding
    gx = gxp[:, :, top : top + h, left : left + wd]

    gw = np.zeros(w.shape, dtype=np.result_type(gy, x))
    for g in range(groups):
        cin, cout = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for p in range(kh):
            for q in range(kw):
                for i in range(ho):
                    for j in range(wo):
                        # (Og, N) @ (N, Cg): the sum over the batch n
                        gw[cout, :, p, q] += (
                            gy[:, cout, i, j].T @ xp[:, cin, i * sh + p * dh, j * sw + q * dw]
                        )

    gb = gy.sum(axis=(0, 2, 3))
    return gx, gw, gb


# --------------------------------------------------------------------------------------------
# pooling
# --------------------------------------------------------------------------------------------


def pool_output_size(
    size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool
) -> int:
    """Torch's pooling output length for one spatial dim.

    ``out = floor_or_ceil((size + 2*pad - dilation*(kernel-1) - 1) / stride) + 1``; with
    ``ceil_mode`` the last window must start inside the input or the left padding, so
    ``if (out - 1) * stride >= size + pad: out -= 1``.
    """
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@_ieee
def max_pool2d_forward(
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    ceil_mode: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Max pooling with torch's CPU semantics, returning ``(y, indices)``.

    Window of output ``(i, j)``: rows ``i*sH - pH + a*dH`` for ``a < kH``, columns likewise; only
    in-bounds positions take part (the padding is never the maximum). Each window is scanned in
    row-major order, as torch's CPU kernel does::

        maxval, maxindex = -inf, first in-bounds position
        for each in-bounds (r, c):
            if x[r, c] > maxval or isnan(x[r, c]):
                maxval, maxindex = x[r, c], r*W + c

    so the first maximum wins among ties, the *last* NaN wins if any, and an all ``-inf`` window
    reports its first in-bounds position. ``indices`` are flat offsets into each ``H*W`` plane.
    A window lying wholly in the padding (possible with dilation) has no answer: assertion error.
    """
    (kh, kw) = _pair(kernel_size, "kernel_size")
    (sh, sw) = _pool_stride(stride, kernel_size)
    (ph, pw), (dh, dw) = _pair(padding, "padding"), _pair(dilation, "dilation")
    n, c, h, wd = x.shape
    ho = pool_output_size(h, kh, sh, ph, dh, ceil_mode)
    wo = pool_output_size(wd, kw, sw, pw, dw, ceil_mode)
    y = np.empty((n, c, ho, wo), dtype=x.dtype)
    indices = np.empty((n, c, ho, wo), dtype=np.int64)
    for i in range(ho):
        for j in range(wo):
            rows = [i * sh - ph + a * dh for a in range(kh) if 0 <= i * sh - ph + a * dh < h]
            cols = [j * sw - pw + b * dw for b in range(kw) if 0 <= j * sw - pw + b * dw < wd]
            assert rows and cols, f"max-pool window ({i}, {j}) lies wholly in the padding"
            maxval = np.full((n, c), -np.inf, dtype=x.dtype)
            maxindex = np.full((n, c), rows[0] * wd + cols[0], dtype=np.int64)
            for r in rows:
                for col in cols:
                    val = x[:, :, r, col]
                    take = (val > maxval) | np.isnan(val)  # element-wise over all planes
                    maxval = np.where(take, val, maxval)
                    maxindex = np.where(take, r * wd + col, maxindex)
            y[:, :, i, j] = maxval
            indices[:, :, i, j] = maxindex
    return y, indices


@_ieee
def max_pool2d_backward(
    gy: np.ndarray, indices: np.ndarray, input_shape: Sequence[int]
) -> np.ndarray:
    """Route each upstream gradient to its window's winner.

    ``gx[n, c].flat[indices[n, c, i, j]] += gy[n, c, i, j]``, accumulated in row-major output
    order (overlapping windows that share a winner add up).
    """
    n, c, h, wd = input_shape
    gx = np.zeros((n, c, h * wd), dtype=gy.dtype)
    _, _, ho, wo = gy.shape
    for b in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    gx[b, ch, indices[b, ch, i, j]] += gy[b, ch, i, j]
    return gx.reshape(n, c, h, wd)


def _avg_pool_windows(
    input_hw: tuple[int, int],
    kernel_size: IntPair,
    stride: IntPair | None,
    padding: IntPair,
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: int | None,
) -> list[tuple[int, int, slice, slice, int]]:
    """Every output position of an average pool with its clipped window and divisor.

    Torch's CPU rule per output ``(i, j)``::

        r0 = i*sH - pH;  r1 = min(r0 + kH, H + pH)       # window may reach into the padding
        pool_size = (r1 - r0) * (c1 - c0)                 # counts padding, not the ceil overhang
        r0, r1 = max(r0, 0), min(r1, H)                   # clip to the input
        divisor = divisor_override or (pool_size if count_include_pad else (r1-r0)*(c1-c0))

    Returns ``(i, j, rows, cols, divisor)``; empty clipped windows are left out (their output
    is 0 and they receive no gradient).
    """
    h, wd = input_hw
    (kh, kw) = _pair(kernel_size, "kernel_size")
    (sh, sw) = _pool_stride(stride, kernel_size)
    (ph, pw) = _pair(padding, "padding")
    ho = pool_output_size(h, kh, sh, ph, 1, ceil_mode)
    wo = pool_output_size(wd, kw, sw, pw, 1, ceil_mode)
    windows = []
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * sh - ph, j * sw - pw
            r1, c1 = min(r0 + kh, h + ph), min(c0 + kw, wd + pw)
            pool_size = (r1 - r0) * (c1 - c0)
            r0, c0, r1, c1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, wd)
            if r0 >= r1 or c0 >= c1:
                continue
            if divisor_override is not None:
                divisor = divisor_override
            elif count_include_pad:
                divisor = pool_size
            else:
                divisor = (r1 - r0) * (c1 - c0)
            windows.append((i, j, slice(r0, r1), slice(c0, c1), divisor))
    return windows


@_ieee
def avg_pool2d_forward(
    x: np.ndarray,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> np.ndarray:
    """Average pooling with torch's CPU divisor rule (see :func:`_avg_pool_windows`).

    ``y[n, c, i, j] = (sum over the clipped window of x[n, c]) / divisor(i, j)``; 0 for an empty
    window.
    """
    (kh, kw) = _pair(kernel_size, "kernel_size")
    (sh, sw) = _pool_stride(stride, kernel_size)
    (ph, pw) = _pair(padding, "padding")
    n, c, h, wd = x.shape
    ho = pool_output_size(h, kh, sh, ph, 1, ceil_mode)
    wo = pool_output_size(wd, kw, sw, pw, 1, ceil_mode)
    y = np.zeros((n, c, ho, wo), dtype=x.dtype)
    windows = _avg_pool_windows(
        (h, wd), kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )
    for i, j, rows, cols, divisor in windows:
        total = np.zeros((n, c), dtype=x.dtype)
        for r in range(rows.start, rows.stop):
            for col in range(cols.start, cols.stop):
                total += x[:, :, r, col]
        y[:, :, i, j] = total / divisor
    return y


@_ieee
def avg_pool2d_backward(
    gy: np.ndarray,
    input_shape: Sequence[int],
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> np.ndarray:
    """Gradient of :func:`avg_pool2d_forward`.

    Each output averaged its clipped window with weight ``1/divisor``, so
    ``gx[n, c, r, col] += gy[n, c, i, j] / divisor(i, j)`` for every ``(r, col)`` in that window.
    """
    n, c, h, wd = input_shape
    gx = np.zeros((n, c, h, wd), dtype=gy.dtype)
    windows = _avg_pool_windows(
        (h, wd), kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )
    for i, j, rows, cols, divisor in windows:
        share = gy[:, :, i, j] / divisor
        for r in range(rows.start, rows.stop):
            for col in range(cols.start, cols.stop):
                gx[:, :, r, col] += share
    return gx
