"""Deliberately broken conv/pool implementations: the harness must flag every one of them.

Each function has ``torch.nn.functional``'s signature and is correct except for one bug.
They are built around torch's own ops, so everything but the bug is right:

- :class:`_Op` is an autograd Function that computes torch's forward, its backward with
  torch's autograd (re-entrant, differentiable: double backward works) and its forward-mode
  rule with ``torch.func.jvp``; a "mutation" hook then breaks one piece.
- ``*_correct`` functions are the same wrappers with no mutation: they must pass, which
  proves that each broken twin is flagged for its bug and not for the wrapper.

The bugs are the issue's list (kernel not rotated, bias gradient from the first sample
only, padding read as (w, h), a backward that is not differentiable, unbatched input
rejected, max-pool gradient to every tied maximum, ceil_mode ignored, NaN not propagated,
divisor_override / count_include_pad mishandled, avg-pool backward not dividing by the
window size) plus a few more (float32 internals, non-contiguous input read as contiguous,
last tied maximum wins, no forward-mode AD, wrong exception types, negative padding
accepted, an output that refuses an in-place op).  The harness knows none of them; it has
to find them from its coverage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Mutation = Callable[[Sequence[torch.Tensor | None], list[torch.Tensor | None], torch.Tensor], list]


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _torch_grads(
    op: Callable, kw: dict, tensors: Sequence[torch.Tensor | None], g: torch.Tensor
) -> list[torch.Tensor | None]:
    """torch's own gradients of ``op(*tensors, **kw)`` for upstream ``g`` (differentiable)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [
            None if t is None else (t if t.requires_grad else t.detach().requires_grad_())
            for t in tensors
        ]
        y = op(*leaves, **kw)
        present = [t for t in leaves if t is not None]
        grads = iter(
            torch.autograd.grad(y, present, g, create_graph=create_graph, allow_unused=True)
        )
        return [None if t is None else next(grads) for t in leaves]


class _Op(torch.autograd.Function):
    """``op(*tensors, **kw)`` with torch's math and an optional mutation of the backward."""

    @staticmethod
    def forward(ctx: Any, recipe: dict, *tensors: torch.Tensor | None) -> torch.Tensor:
        ctx.recipe = recipe
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        y = recipe["op"](*tensors, **recipe["kw"])
        if recipe.get("view_output"):
            return y.unsqueeze(0).squeeze(0)
        return y.clone() if y._is_view() else y  # (torch's unbatched result: a view of its own)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        recipe = ctx.recipe
        tensors = ctx.saved_tensors
        grads = _torch_grads(recipe["op"], recipe["kw"], tensors, g)
        mutate = recipe.get("backward")
        if mutate is not None:
            grads = mutate(tensors, grads, g, recipe["kw"])
        if recipe.get("detach_backward"):
            grads = [None if t is None else t.detach() for t in grads]
        grads = [
            gr if t is not None and ctx.needs_input_grad[i + 1] else None
            for i, (t, gr) in enumerate(zip(tensors, grads, strict=True))
        ]
        return (None, *grads)

    @staticmethod
    def jvp(ctx: Any, _recipe: None, *tangents: torch.Tensor | None) -> torch.Tensor:
        recipe = ctx.recipe
        primals = ctx.saved_tensors
        if recipe.get("zero_jvp"):
            return torch.zeros_like(recipe["op"](*primals, **recipe["kw"]))
        return _JVP[recipe["op"]](recipe["kw"], primals, tangents)


def _conv_jvp(kw: dict, primals: Sequence, tangents: Sequence) -> torch.Tensor:
    """conv is bilinear in (x, w) and affine in b: dy = conv(dx, w) + conv(x, dw) + db."""
    (x, w, _), (tx, tw, tb) = primals, tangents
    out = F.conv2d(x, w, None, **kw).zero_()
    if tx is not None:
        out = out + F.conv2d(tx, w, None, **kw)
    if tw is not None:
        out = out + F.conv2d(x, tw, None, **kw)
    if tb is not None:
        out = out + tb.reshape(-1, 1, 1)
    return out


def _max_pool_jvp(kw: dict, primals: Sequence, tangents: Sequence) -> torch.Tensor:
    """The tangent of each window's winner (torch's indices)."""
    (x,), (tx,) = primals, tangents
    _, idx = F.max_pool2d(x, **kw, return_indices=True)
    flat = tx.flatten(-2).gather(-1, idx.flatten(-2))
    return flat.reshape(idx.shape)


def _avg_pool_jvp(kw: dict, primals: Sequence, tangents: Sequence) -> torch.Tensor:
    """avg-pool is linear."""
    return F.avg_pool2d(tangents[0], **kw)


_JVP = {F.conv2d: _conv_jvp, F.max_pool2d: _max_pool_jvp, F.avg_pool2d: _avg_pool_jvp}


def _conv(**recipe: Any) -> Callable:
    def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return _Op.apply({"op": F.conv2d, "kw": kw, **recipe}, input, weight, bias)

    return conv2d


def _values(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _max_pool(**recipe: Any) -> Callable:
    def max_pool2d(
        input,
        kernel_size,
        stride=None,
        padding=0,
        dilation=1,
        ceil_mode=False,
        return_indices=False,
    ):
        kw = dict(
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            ceil_mode=ceil_mode,
        )
        y = _Op.apply({"op": F.max_pool2d, "kw": kw, **recipe}, input)
        if return_indices:
            return y, F.max_pool2d(input.detach(), **kw, return_indices=True)[1]
        return y

    return max_pool2d


def _avg_pool(**recipe: Any) -> Callable:
    def avg_pool2d(
        input,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ):
        kw = dict(
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            ceil_mode=ceil_mode,
            count_include_pad=count_include_pad,
            divisor_override=divisor_override,
        )
        return _Op.apply({"op": F.avg_pool2d, "kw": kw, **recipe}, input)

    return avg_pool2d


# ----------------------------------------------------------------------------- correct twins

conv2d_correct = _conv()
max_pool2d_correct = _max_pool()
avg_pool2d_correct = _avg_pool()


# ----------------------------------------------------------------------------- conv2d bugs


def conv2d_kernel_not_rotated(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Backward: the input gradient uses the unrotated kernel."""
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)

    def mutate(tensors, grads, g, _kw):
        x, w, b = tensors
        grads[0] = _torch_grads(F.conv2d, kw, (x, w.flip(-2, -1), b), g)[0]
        return grads

    return _Op.apply({"op": F.conv2d, "kw": kw, "backward": mutate}, input, weight, bias)


def _bias_first_sample(tensors, grads, g, _kw):
    if grads[2] is not None:
        grads[2] = g[0].sum((-2, -1)) if g.dim() == 4 else g.sum((-2, -1))
    return grads


#: Backward: the bias gradient sums the upstream gradient of the first sample only.
conv2d_bias_grad_first_sample = _conv(backward=_bias_first_sample)

#: Backward computed with detached tensors: it is not itself differentiable.
conv2d_backward_not_differentiable = _conv(detach_backward=True)

#: Forward-mode AD returns a zero tangent.
conv2d_zero_jvp = _conv(zero_jvp=True)


def conv2d_padding_swapped(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Reads a (h, w) padding tuple as (w, h)."""
    if not isinstance(padding, str):
        ph, pw = _pair(padding)
        padding = (pw, ph)
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def conv2d_rejects_unbatched(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Rejects unbatched (C, H, W) input that torch accepts."""
    if input.dim() != 4:
        raise RuntimeError(f"conv2d: expected a 4-d (N, C, H, W) input, got {input.dim()}-d")
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def conv2d_float32_inside(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Computes in float32 whatever the input dtype (loses float64 precision)."""
    b = None if bias is None else bias.float()
    y = F.conv2d(input.float(), weight.float(), b, stride, padding, dilation, groups)
    return y.to(input.dtype)


def conv2d_assumes_contiguous(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Reads the input's storage as if it were contiguous (wrong for any other layout)."""
    strides, acc = [], 1
    for s in reversed(input.shape):
        strides.append(acc)
        acc *= s
    flat = input.as_strided(input.shape, tuple(reversed(strides)), input.storage_offset())
    return F.conv2d(flat, weight, bias, stride, padding, dilation, groups)


def conv2d_accepts_negative_padding(
    input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1
):
    """Clamps a negative padding to 0 instead of raising as torch does."""
    if not isinstance(padding, str):
        padding = tuple(max(p, 0) for p in _pair(padding))
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


# ----------------------------------------------------------------------------- max_pool2d bugs


def _pool_windows(x: torch.Tensor, kw: dict, fill: float):
    """``(cols (M, K, L), padded frame, (ph, pw), out_hw, kernel, stride, dilation)``."""
    kernel = _pair(kw["kernel_size"])
    stride = kw.get("stride")
    stride = kernel if stride is None or stride == () else _pair(stride)
    padding, dilation = _pair(kw.get("padding", 0)), _pair(kw.get("dilation", 1))
    y = F.max_pool2d(x.detach(), **kw)
    out = y.shape[-2:]
    h, w = x.shape[-2:]
    extra = [
        max(0, (o - 1) * s + d * (k - 1) + 1 - p - n)
        for o, s, d, k, p, n in zip(out, stride, dilation, kernel, padding, (h, w), strict=True)
    ]
    planes = x.reshape(-1, 1, h, w)
    xp = F.pad(planes, (padding[1], extra[1], padding[0], extra[0]), value=fill)
    cols = F.unfold(xp, kernel, dilation=dilation, stride=stride)
    return cols, xp.shape[-2:], padding, out, kernel, stride, dilation


def _grad_to_every_tie(kw: dict) -> Mutation:
    """A mutation sending each window's gradient to every element equal to its maximum."""

    def mutate(tensors, grads, g, _kw):
        (x,) = tensors
        cols, frame, (ph, pw), out, kernel, stride, dilation = _pool_windows(x, kw, float("-inf"))
        y = F.max_pool2d(x.detach(), **kw).reshape(-1, 1, out[0] * out[1])
        share = (cols == y) * g.reshape(-1, 1, out[0] * out[1])
        gx = F.fold(share, frame, kernel, dilation=dilation, stride=stride)
        h, w = x.shape[-2:]
        grads[0] = gx[:, 0, ph : ph + h, pw : pw + w].reshape(x.shape)
        return grads

    return mutate


def max_pool2d_grad_to_all_ties(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    """Backward: the gradient goes to every tied maximum of a window, not just the first."""
    kw = dict(
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
    )
    y = _Op.apply({"op": F.max_pool2d, "kw": kw, "backward": _grad_to_every_tie(kw)}, input)
    if return_indices:
        return y, F.max_pool2d(input.detach(), **kw, return_indices=True)[1]
    return y


def max_pool2d_ceil_mode_ignored(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    """Always rounds the output size down."""
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, False, return_indices)


def max_pool2d_nan_not_propagated(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    """Skips NaN like -inf: a window holding a NaN returns its largest number."""
    clean = torch.where(input.isnan(), float("-inf"), input)
    return F.max_pool2d(clean, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d_last_tie_wins(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    """Picks the *last* of tied maxima (torch picks the first): indices and routing differ."""
    kw = dict(
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
    )
    x = input
    cols, _, (ph, pw), out, kernel, st, dl = _pool_windows(x, kw, float("-inf"))
    k = cols.shape[1]
    best = cols.amax(1, keepdim=True)
    is_best = (cols == best) | cols.isnan()
    last = k - 1 - is_best.flip(1).int().argmax(1)  # (M, L) window offsets
    h, w = x.shape[-2:]
    i, j = last // kernel[1], last % kernel[1]
    p = torch.arange(out[0]).repeat_interleave(out[1])
    q = torch.arange(out[1]).repeat(out[0])
    flat = ((p * st[0] - ph + i * dl[0]) * w + (q * st[1] - pw + j * dl[1])).clamp(0, h * w - 1)
    planes = x.reshape(-1, h * w)
    y = planes.gather(1, flat).reshape(*x.shape[:-2], *out)
    indices = flat.reshape(*x.shape[:-2], *out)
    return (y, indices) if return_indices else y


#: Forward-mode AD returns a zero tangent.
max_pool2d_zero_jvp = _max_pool(zero_jvp=True)


# ----------------------------------------------------------------------------- avg_pool2d bugs


def avg_pool2d_divisor_override_ignored(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    """Ignores divisor_override."""
    return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)


def avg_pool2d_count_include_pad_ignored(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    """Always counts the padding in the divisor."""
    return F.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, True, divisor_override)


def _spread_undivided(tensors, grads, g, kw):
    """Backward: spreads each upstream gradient without dividing by the window size."""
    grads[0] = _torch_grads(F.avg_pool2d, {**kw, "divisor_override": 1}, tensors, g)[0]
    return grads


avg_pool2d_backward_not_divided = _avg_pool(backward=_spread_undivided)


def avg_pool2d_value_error(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    """Raises ValueError (torch: RuntimeError) for bad arguments it checks itself."""
    if divisor_override == 0:
        raise ValueError("divisor_override must not be zero")
    if min(_pair(padding)) < 0:
        raise ValueError("padding must be non-negative")
    return F.avg_pool2d(
        input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


def conv2d_output_view(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Returns a view of the tensor its Function made: autograd then refuses an in-place op
    on the output (``ReLU(inplace=True)`` after the conv), which torch's output takes."""
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return _Op.apply({"op": F.conv2d, "kw": kw, "view_output": True}, input, weight, bias)


def conv2d_float32_output(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Returns float32 for reduced-precision inputs (torch keeps the input dtype)."""
    y = F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    return y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
