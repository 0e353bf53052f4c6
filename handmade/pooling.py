r"""2-d max and average pooling with hand-derived backward and forward-mode rules.

Windows: output ``(p, q)`` reads the input at rows ``p*s - pad + i*d`` and columns
``q*s - pad + j*d`` for ``i < kH, j < kW`` (``d = 1`` for average pooling).

Max pooling::

    (1) y[p,q]   = x[m(p,q)],  m(p,q) = the window's winner, chosen exactly as torch's
                   kernels choose: scanning the window in row-major order over in-bounds
                   positions, a value wins if it is > the best so far or is NaN.  So the
                   first of tied maxima wins, the last NaN wins if there is one, and an
                   all -inf window returns its first in-bounds position.
    (2) dL/dx[u] = sum over windows whose winner is u of g[p,q]
                   (the gradient is routed to the winner, and to no other tied element)
    (3) dy[p,q]  = dx[m(p,q)]                       (forward mode: gather the tangent)

Average pooling::

    (4) y[p,q]   = (1/D[p,q]) * sum_{i,j} x_p[p*s+i, q*s+j]  (x_p zero-padded)
                   D = divisor_override, or the window's size clipped to the padded input
                   (count_include_pad=True), or to the input itself (False).
    (5) dL/dx_p[p*s+i, q*s+j] += g[p,q] / D[p,q]   (each gradient spread evenly)
    (6) dy = avg_pool(dx)                           (the op is linear)

Both backward rules are differentiable expressions (a scatter-add and strided adds),
so double backward works through autograd; the winners are saved from the forward.  A
max pool whose winners nothing needs (no indices asked for, nothing to differentiate)
computes the maxima alone (:func:`window_maxima`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ._utils import (
    Tap,
    _pair,
    apply_function,
    argument_cache,
    at,
    check_input_type,
    check_pool_args,
    check_rank,
    chunk_slices,
    forward_ad_active,
    in_bounds_taps,
    legacy_twin,
    own_output,
    plain_tensors,
    pool_geometry,
    tensor_cache,
    windows,
)

__all__ = ["AvgPool2dFunction", "MaxPool2dFunction", "avg_pool2d", "max_pool2d"]

# The tiled max pool's re-laid-out taps are never split below this many elements (16 MB
# of float32): there, splitting only adds passes.  Measured at 2 threads, the forward
# with indices of LeNet's pools on MNIST activations in 2 chunks against one: batch 64
# 0.145 against 0.117 ms (pool1) and 0.088 against 0.065 (pool2), batch 256 0.685
# against 0.651 and 0.297 against 0.258; a (4, 6, 28, 28) input 1.5x.  The buffer is a
# copy of the input, which the backward's gradient matches in size anyway.
MIN_TAP_BUFFER = 1 << 22
# An average pool whose windows tile the input spreads its gradient with one strided copy
# per window tap up to this many taps; larger windows (global pooling) by an expanded view.
SHARE_COPIES_MAX = 16
# The window origins of a max pool (:func:`_window_origins`, built on every call: ~10 us)
# are kept for the next calls while they number at most this many (512 kB of int64).
CACHED_ORIGINS_MAX = 1 << 16


class PoolGeometry(NamedTuple):
    """Normalized arguments of one pooling call."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out: tuple[int, int]


def _window_rows(out: int, kernel: int, stride: int, pad: int, dilation: int) -> list[range]:
    """For each output position, the input coordinates its window reads along one axis."""
    return [
        range(p * stride - pad, p * stride - pad + kernel * dilation, dilation) for p in range(out)
    ]


# ----------------------------------------------------------------------------- max pool


@lru_cache(maxsize=256)  # pure in its ints; called on every max_pool2d call
def _first_in_bounds(
    out: int, kernel: int, stride: int, pad: int, dilation: int, size: int
) -> tuple[int, ...]:
    """Per output position, the window offset of its first in-bounds element.

    Raises for a window lying wholly in the padding: torch's CPU kernel reads out of
    bounds there (a crash or a garbage index); handmade rejects such calls instead.
    """
    firsts = []
    for p, coords in enumerate(_window_rows(out, kernel, stride, pad, dilation)):
        inside = [i for i, u in enumerate(coords) if 0 <= u < size]
        if not inside:
            raise RuntimeError(
                f"max_pool2d: the window of output position {p} lies entirely in the padding "
                f"(kernel_size={kernel}, stride={stride}, padding={pad}, dilation={dilation}, "
                f"input size {size}); such a window has no element to select. Reduce padding "
                f"or dilation."
            )
        firsts.append(inside[0])
    return tuple(firsts)


def max_pool_forward(x: torch.Tensor, geo: PoolGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Formula (1): the window maxima and their flat indices into each ``H*W`` plane.

    The running maximum and the winner are computed tap by tap -- by :func:`_max_pool_tiled`
    where the windows tile the input, else by :func:`_max_pool_taps` -- and then a NaN
    window, which equals none of its taps, gets its *last* NaN, as torch keeps it.
    """
    h, w = x.shape[-2:]
    taps = in_bounds_taps((h, w), *geo)
    if _tiles(x, geo):
        y, index = _max_pool_tiled(x, geo)
    else:
        y, index = _max_pool_taps(x, geo, taps)
    if x.is_floating_point() and math.isnan(y.sum().item()):  # (NaN if any y is: cheap)
        nan_window = y.isnan()
        base = _window_origins(geo, w, x.device)
        for t in taps:  # the last NaN tap of a NaN window wins
            take = at(nan_window, t.out) & at(x, t.inp).isnan()
            index_t = at(index, t.out)
            index_t.copy_(torch.where(take, at(base, t.out) + t.offset, index_t))
    return y, index


@tensor_cache(maxsize=64, when=lambda geo, *_: geo.out[0] * geo.out[1] <= CACHED_ORIGINS_MAX)
def _window_origins(
    geo: PoolGeometry, w: int, device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Flat index of window ``(p, q)``'s tap (0, 0): ``(p*sH - pH) * W + (q*sW - pW)``;
    kept for the next calls (read only) while ``oH*oW <= CACHED_ORIGINS_MAX``."""
    (oh, ow), (sh, sw), (ph, pw) = geo.out, geo.stride, geo.padding
    rows = torch.arange(-ph * w, (oh * sh - ph) * w, sh * w, device=device, dtype=dtype)
    cols = torch.arange(-pw, ow * sw - pw, sw, device=device, dtype=dtype)
    return rows.view(-1, 1) + cols  # (two aranges: this runs on every max-pool call)


def window_maxima(
    x: torch.Tensor, geo: PoolGeometry, taps: tuple[Tap, ...] | None = None
) -> torch.Tensor:
    """``y`` of formula (1) alone: the running ``maximum`` (which propagates NaN, as torch's
    max pool does) of the in-bounds taps, one pass per tap over strided views of the input
    (no copy of it, no padding), the first full tap's pass a copy.  ``taps``:
    :func:`in_bounds_taps`, if already made."""
    if taps is None:
        taps = in_bounds_taps(tuple(x.shape[-2:]), *geo)
    full = next((t for t in taps if t.full), None)
    if full is not None:
        y = at(x, full.inp).clone(memory_format=torch.contiguous_format)
    else:
        lowest = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
        y = x.new_full((*x.shape[:-2], *geo.out), lowest)
    for t in taps:
        if t is not full:
            y_t = at(y, t.out)
            torch.maximum(y_t, at(x, t.inp), out=y_t)
    return y


def _max_pool_taps(
    x: torch.Tensor, geo: PoolGeometry, taps: tuple[Tap, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Formula (1), one pass per kernel tap over strided views of the input (no copy, no
    padding); NaN windows are left to :func:`max_pool_forward`.

    * ``y`` is the running ``maximum`` (which propagates NaN) of the in-bounds taps;
    * the winner is the first tap equal to ``y``: its position in the tap list is the
      number of taps ``t`` for which "no tap up to t equals y" still holds, counted in
      uint8 (an out-of-bounds tap never equals ``y``), then looked up as a flat offset.
    """
    w = x.shape[-1]
    y = window_maxima(x, geo, taps)
    count = torch.uint8 if len(taps) < 256 else torch.int32
    winner = torch.zeros(y.shape, dtype=count, device=x.device)  # position in `taps`
    missed = torch.ones_like(winner)  # no tap so far equals y
    for t in taps[:-1]:
        at(missed, t.out).mul_(at(x, t.inp) != at(y, t.out))
        winner += missed
    offsets = torch.tensor([t.offset for t in taps], device=x.device)
    index = offsets.index_select(0, winner.long().flatten()).view(y.shape)
    return y, index.add_(_window_origins(geo, w, x.device))


def _tiles(x: torch.Tensor, geo: PoolGeometry) -> bool:
    """Whether :func:`_max_pool_tiled` applies: the windows tile the input (kernel = stride,
    no padding or dilation: the 2x2/2 pools of LeNet and VGG) of a float dtype whose
    mantissa holds every flat index of a plane."""
    (h, w), (kh, kw), (oh, ow) = x.shape[-2:], geo.kernel, geo.out
    exact = x.dtype == torch.float64 or (x.dtype == torch.float32 and h * w <= 2**24)
    tiled = geo.kernel == geo.stride and geo.padding == (0, 0) and geo.dilation == (1, 1)
    return exact and tiled and oh * kh <= h and ow * kw <= w


@lru_cache(maxsize=64)
def _tap_steps(kernel: tuple[int, int], w: int) -> tuple[int, ...]:
    """The ``kH*kW - 1`` steps between the flat offsets ``i*W + j`` of consecutive taps of a
    window (row-major; tap 0's offset is 0)."""
    kh, kw = kernel
    offsets = [i * w + j for i in range(kh) for j in range(kw)]
    return tuple(offsets[t + 1] - offsets[t] for t in range(kh * kw - 1))


def _max_pool_tiled(x: torch.Tensor, geo: PoolGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Formula (1) for windows that tile the input: each tap is made one contiguous plane.

    A copy re-lays out a chunk of ``m`` planes as ``(kH*kW, m, oH, oW)`` (block ``k = i*kW + j``
    holds tap ``(i, j)`` of every window); then ``y`` is one ``amax`` over ``k``, and the
    winner is found as in :func:`_max_pool_taps` but on contiguous data and in a few
    whole-buffer passes: the flags "tap t differs from y" for all taps but the last in one
    comparison, turned in place into "no tap up to t equals y" by a running product; the
    winner's offset (tap 0's is 0) is then ``sum_t flag_t * (offsets[t+1] - offsets[t])``,
    summed onto the window's origin in the last tap's plane (LeNet's first pool at batch 64:
    0.73x the time of a matrix-vector product and a separate add).  All of it in the
    input's own float dtype (0/1 flags, integer offsets, exact), in the planes of the taps
    themselves, so no further buffer.
    Strided, or written to ``bool``, the comparisons ran 6-7x slower here; one comparison,
    product and sum per tap (3 passes each) took 1.15-1.5x the time of these passes at
    LeNet's sizes, 2x on small inputs, and ``argmax`` over the taps 10-20x (measured).  NaN
    windows are left to :func:`max_pool_forward`.
    """
    (h, w), (oh, ow), (kh, kw) = x.shape[-2:], geo.out, geo.kernel
    k = kh * kw
    planes = x.reshape(-1, h, w)
    m = planes.shape[0]
    # the results in their final shapes (views of them would be detached on the way out),
    # filled through views by plane
    lead = x.shape[:-2]
    y_out = x.new_empty(*lead, oh, ow)
    index_out = torch.empty(*lead, oh, ow, dtype=torch.int64, device=x.device)
    y, index = y_out.view(m, oh, ow), index_out.view(m, oh, ow)
    base = _window_origins(geo, w, x.device, x.dtype)
    steps = _tap_steps(geo.kernel, w)
    # per window the re-laid-out taps take k elements, y and index (the outputs torch
    # allocates too) 1 + 8/itemsize: chunk the planes so the taps stay within 3/4 of those
    itemsize = x.element_size()
    budget = 3 * m * oh * ow * (itemsize + 8) // (4 * itemsize)
    for part in chunk_slices(m, k * oh * ow, budget, unsplit=MIN_TAP_BUFFER):
        # (the whole tensors where one chunk takes them all: each slice is a tensor op)
        whole = part == slice(None)
        planes_part = planes if whole else planes[part]
        # tap (i, j) of window (p, q) of plane r, planes_part[r, p*kH + i, q*kW + j], as one
        # strided view (kH, kW, r, oH, oW); the one copy (always a copy: the passes below
        # write into it)
        sr, su, sv = planes_part.stride()
        taps_view = planes_part.as_strided(
            (kh, kw, planes_part.shape[0], oh, ow),
            (su, sv, sr, kh * su, kw * sv),
            planes_part.storage_offset(),
        )
        tap = taps_view.clone(memory_format=torch.contiguous_format).view(k, -1, oh, ow)
        y_part = torch.amax(tap, dim=0, out=y if whole else y[part])
        # taps 0..k-2 turn into the flags; the last tap's block then holds the offset
        missed = tap.narrow(0, 0, k - 1)
        torch.ne(missed, y_part, out=missed)  # tap t differs from y, as 0/1
        flags = missed.unbind(0)
        offset = tap.select(0, k - 1)  # the window origin plus the flagged steps
        if flags:
            torch.add(base, flags[0], alpha=steps[0], out=offset)
        else:  # (a 1x1 window)
            offset.copy_(base.expand_as(offset))
        for t in range(1, k - 1):
            flags[t].mul_(flags[t - 1])  # ... and so did every tap before it
            offset.add_(flags[t], alpha=steps[t])
        (index if whole else index[part]).copy_(offset)
        del tap, missed, flags, offset  # before the next chunk's copy (peak memory)
    return y_out, index_out


def max_pool_backward(
    g: torch.Tensor, indices: torch.Tensor, input_shape: torch.Size
) -> torch.Tensor:
    """Formula (2): scatter-add each upstream gradient onto its window's winner."""
    *lead, h, w = input_shape
    gx = g.new_zeros(*lead, h * w)
    n_out = indices.shape[-2] * indices.shape[-1]
    # in place: the out-of-place scatter_add would copy the zeros first (1.8x slower here)
    gx.scatter_add_(-1, indices.reshape(*lead, n_out), g.reshape(*lead, n_out))
    return gx.reshape(input_shape)


class MaxPool2dFunction(torch.autograd.Function):
    """``(y, indices) = max_pool2d(x)`` with backward (2) and forward-mode rule (3).

    ``indices`` is not differentiable; it is saved for the backward, which routes the
    gradient exactly where torch routes it.
    """

    @staticmethod
    def forward(x: torch.Tensor, geo: PoolGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        y, indices = max_pool_forward(x, geo)
        return own_output(y, x), own_output(indices, x)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: torch.Tensor, geo: PoolGeometry):
        """Planes are pooled independently, so ``vmap`` folds its dimension into the
        leading one and pools once (the forward's in-place passes and data-dependent NaN
        test could not run per example)."""
        if in_dims[0] is None:
            return MaxPool2dFunction.apply(x, geo), (None, None)
        x = x.movedim(in_dims[0], 0)
        y, indices = MaxPool2dFunction.apply(x.reshape(-1, *x.shape[2:]), geo)
        return (y.unflatten(0, x.shape[:2]), indices.unflatten(0, x.shape[:2])), (0, 0)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, _ = inputs
        _, indices = output
        ctx.mark_non_differentiable(indices)
        # the indices never get a gradient: no zeros made for it on every backward (they
        # took ~45 us of a ~120 us backward of a small pool, measured)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(indices)
        if forward_ad_active():  # (what its jvp reads)
            ctx.save_for_forward(indices)
        ctx.input_shape = x.shape

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor | None, _g_indices: torch.Tensor | None):
        if g is None:  # (grads are not materialized: no gradient reached y)
            return None, None
        (indices,) = ctx.saved_tensors
        return max_pool_backward(g, indices, ctx.input_shape), None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, _geo: None):
        (indices,) = ctx.saved_tensors
        lead = x_t.shape[:-2]
        flat_idx = indices.reshape(*lead, indices.shape[-2] * indices.shape[-1])
        y_t = x_t.reshape(*lead, x_t.shape[-2] * x_t.shape[-1]).gather(-1, flat_idx)
        return y_t.reshape(indices.shape), None


# ----------------------------------------------------------------------------- avg pool


@lru_cache(maxsize=256)  # pure in its ints; called on every avg_pool2d call
def _divisors(
    size: int, out: int, kernel: int, stride: int, pad: int, count_include_pad: bool
) -> tuple[int, ...]:
    """Per output position along one axis, the window length torch divides by."""
    lengths = []
    for coords in _window_rows(out, kernel, stride, pad, 1):
        start, end = coords.start, min(coords.stop, size + pad)  # clipped to the padded input
        if not count_include_pad:
            start, end = max(start, 0), min(end, size)  # clipped to the input itself
        lengths.append(max(end - start, 0))
    return tuple(lengths)


def avg_divisor(
    x: torch.Tensor, geo: PoolGeometry, count_include_pad: bool, divisor_override: int | None
) -> torch.Tensor | int:
    """``D[p, q]`` of formula (4), as torch's kernels compute it (an int when constant)."""
    if divisor_override is not None:
        return divisor_override
    (h, w), (kh, kw), (sh, sw), (ph, pw) = x.shape[-2:], geo.kernel, geo.stride, geo.padding
    dh = _divisors(h, geo.out[0], kh, sh, ph, count_include_pad)
    dw = _divisors(w, geo.out[1], kw, sw, pw, count_include_pad)
    if len(set(dh)) == 1 and len(set(dw)) == 1 and dh[0] * dw[0] > 0:
        return dh[0] * dw[0]  # every window has the same size
    d = torch.tensor(dh, device=x.device).view(-1, 1) * torch.tensor(dw, device=x.device).view(
        1, -1
    )
    return d.clamp_min(1).to(x.dtype)  # an empty window sums to 0; torch outputs 0 there


def avg_pool_forward(
    x: torch.Tensor, geo: PoolGeometry, divisor: torch.Tensor | int
) -> torch.Tensor:
    """Formula (4): window sums of the zero-padded input, divided by ``D``.

    Small windows are summed tap by tap in torch's row-major order, each tap adding the
    input it reads in bounds (zero padding adds nothing, so it is never built); large
    windows that fit the input (global pooling) by one reduction.
    """
    (kh, kw), (oh, ow) = geo.kernel, geo.out
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    acc = torch.float32 if low_precision else x.dtype  # sum as torch does, in float32
    h, w = x.shape[-2:]
    fits = geo.padding == (0, 0) and (oh - 1) * geo.stride[0] + kh <= h
    if fits and (ow - 1) * geo.stride[1] + kw <= w and (kh * kw > 16 or kh * kw == 1):
        win = windows(x, geo.kernel, geo.stride, geo.dilation, geo.out)
        constant = isinstance(divisor, int) and divisor == kh * kw
        if constant and x.is_floating_point() and not low_precision:
            return win.mean((-2, -1))  # sum and divide in one pass (global pooling)
        sums = win.sum((-2, -1), dtype=acc)
    else:
        taps = in_bounds_taps((h, w), *geo)
        first = taps[0]
        if first.full:
            sums = at(x, first.inp).to(acc, memory_format=torch.contiguous_format, copy=True)
        else:
            sums = x.new_zeros((*x.shape[:-2], oh, ow), dtype=acc)
        for t in taps:
            if t is not first or not first.full:
                at(sums, t.out).add_(at(x, t.inp))
    if not x.is_floating_point():  # torch divides integer sums with C++ integer division
        return sums.div_(divisor, rounding_mode="trunc")
    if low_precision:
        divisor = divisor.float() if isinstance(divisor, torch.Tensor) else divisor
        return sums.div_(divisor).to(x.dtype)
    return sums.div_(divisor)


def avg_pool_backward(
    g: torch.Tensor, geo: PoolGeometry, divisor: torch.Tensor | int, input_shape: torch.Size
) -> torch.Tensor:
    """Formula (5): add ``g / D`` to every input position of its window.

    Windows that tile the input (stride >= kernel, no padding: the common case) repeat
    each share over their window.  Otherwise each kernel tap adds its windows' shares
    where it read in bounds, the adjoint of the forward's reads (padding gets nothing).
    """
    (h, w), (kh, kw), (sh, sw), (ph, pw) = input_shape[-2:], geo.kernel, geo.stride, geo.padding
    oh, ow = geo.out
    lead = input_shape[:-2]
    share = g / divisor
    if sh >= kh and sw >= kw and (ph, pw) == (0, 0) and oh * sh <= h and ow * sw <= w:
        gaps = (sh, sw) != (kh, kw)  # positions between windows get no gradient
        if kh * kw <= SHARE_COPIES_MAX:  # one strided copy of the shares per window tap
            # (through an expanded view, a copy of 2-element runs: 2-4x as long, measured)
            tiles = (share.new_zeros if gaps else share.new_empty)(*lead, oh, sh, ow, sw)
            for i in range(kh):
                for j in range(kw):
                    tiles[..., i, :, j] = share
        else:  # a few large windows (global pooling): the shares expanded over them
            tiles = share[..., :, None, :, None].expand(*lead, oh, kh, ow, kw)
            if gaps:
                tiles = F.pad(tiles, (0, sw - kw, 0, 0, 0, sh - kh))
        frame = tiles.reshape(*lead, oh * sh, ow * sw)
        crop = (0, w - ow * sw, 0, h - oh * sh)  # rows no window reached: zero gradient
        return frame if crop == (0, 0, 0, 0) else F.pad(frame, crop)
    gx = share.new_zeros(input_shape)
    for t in in_bounds_taps((h, w), *geo):
        at(gx, t.inp).add_(at(share, t.out))
    return gx


class AvgPool2dFunction(torch.autograd.Function):
    """``y = avg_pool2d(x)`` with backward (5) and forward-mode rule (6)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, geo: PoolGeometry, divisor: torch.Tensor | int) -> torch.Tensor:
        return own_output(avg_pool_forward(x, geo, divisor), x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, geo, divisor = inputs
        ctx.geo, ctx.divisor, ctx.input_shape = geo, divisor, x.shape

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        return avg_pool_backward(g, ctx.geo, ctx.divisor, ctx.input_shape), None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, _geo: None, _divisor: None) -> torch.Tensor:
        return avg_pool_forward(x_t, ctx.geo, ctx.divisor)


_MaxPool2dTwin = legacy_twin(MaxPool2dFunction)
_AvgPool2dTwin = legacy_twin(AvgPool2dFunction)


# ----------------------------------------------------------------------------- functional


def _pool_geometry(
    x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool, op: str
) -> PoolGeometry:
    """Validate a pooling call as torch does and normalize its arguments."""
    check_input_type(x, op)
    known = (x.shape, bool(ceil_mode), op)
    return _pool_arguments(known, kernel_size, stride, padding, dilation)


@argument_cache
def _pool_arguments(
    known: tuple[torch.Size, bool, str], kernel_size, stride, padding, dilation
) -> PoolGeometry:
    """The checks of :func:`_pool_geometry`, which depend on the input's shape and the
    arguments alone; the normalized arguments.  A max pool's windows that lie wholly in
    the padding are rejected here too (:func:`_first_in_bounds`)."""
    shape, ceil_mode, op = known
    check_rank(shape, op, IndexError if op == "avg_pool2d" and len(shape) < 3 else RuntimeError)
    kernel = _pair(kernel_size, "kernel_size", op)
    no_stride = stride is None or (isinstance(stride, tuple | list) and len(stride) == 0)
    stride_hw = kernel if no_stride else _pair(stride, "stride", op)
    padding_hw = _pair(padding, "padding", op)
    dilation_hw = _pair(dilation, "dilation", op)
    check_pool_args(shape, kernel, stride_hw, padding_hw, dilation_hw, op)
    out = pool_geometry(shape, kernel, stride_hw, padding_hw, dilation_hw, ceil_mode, op)
    if op == "max_pool2d":
        for axis in (0, 1):
            _first_in_bounds(
                out[axis],
                kernel[axis],
                stride_hw[axis],
                padding_hw[axis],
                dilation_hw[axis],
                shape[axis - 2],
            )
    return PoolGeometry(kernel, stride_hw, padding_hw, dilation_hw, out)


def max_pool2d(
    input: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
):
    r"""2-d max pooling, a drop-in for ``max_pool2d`` of :mod:`torch.nn.functional`.

    Args:
        input: ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
        kernel_size, stride (default: ``kernel_size``), padding, dilation: int or ``(h, w)``;
            implicit padding is ``-inf`` and at most half the kernel.
        ceil_mode: round the output size up (a last window must start inside the input or
            the left padding).
        return_indices: also return the winners' flat indices into each ``H*W`` plane.
            Without them, and with nothing to differentiate (``torch.no_grad()``, an input
            that needs no gradient, no forward-mode tangent), only the maxima are computed
            (:func:`window_maxima`; LeNet's 2x2/2 pool at batch 64, 2 threads: 0.09 ms
            against 0.17 with the winners, torch's 0.55).

    Returns:
        ``(N, C, H_out, W_out)`` with ``H_out = floor_or_ceil((H + 2*padding[0] -
        dilation[0]*(kH-1) - 1) / stride[0]) + 1``; plus the int64 indices if asked.
    """
    geo = _pool_geometry(input, kernel_size, stride, padding, dilation, ceil_mode, "max_pool2d")
    if not return_indices and plain_tensors(input):  # no winner wanted: the maxima alone
        return window_maxima(input, geo)
    y, indices = apply_function(MaxPool2dFunction, _MaxPool2dTwin, input, geo)
    return (y, indices) if return_indices else y


def avg_pool2d(
    input: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> torch.Tensor:
    r"""2-d average pooling, a drop-in for ``avg_pool2d`` of :mod:`torch.nn.functional`.

    Args:
        input: ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
        kernel_size, stride (default: ``kernel_size``), padding: int or ``(h, w)``;
            implicit padding is zero and at most half the kernel.
        ceil_mode: round the output size up (see :func:`max_pool2d`).
        count_include_pad: divide by the window size including padding (clipped to the
            padded input) instead of the number of input elements in the window.
        divisor_override: divide every window sum by this non-zero int instead.

    Returns:
        ``(N, C, H_out, W_out)``, sizes as for :func:`max_pool2d` with dilation 1.
    """
    geo = _pool_geometry(input, kernel_size, stride, padding, 1, ceil_mode, "avg_pool2d")
    if divisor_override is not None:
        if isinstance(divisor_override, bool) or not isinstance(divisor_override, int):
            raise TypeError(
                f"avg_pool2d(): argument 'divisor_override' must be int, "
                f"not {type(divisor_override).__name__}"
            )
        if divisor_override == 0:
            raise RuntimeError("avg_pool2d: divisor must be not zero")
    divisor = avg_divisor(input, geo, bool(count_include_pad), divisor_override)
    return apply_function(AvgPool2dFunction, _AvgPool2dTwin, input, geo, divisor)
