"""Argument normalization and output-size rules, in one place (as torch's ``_pair``), and
the helpers every op shares: window views, kernel taps, and the autograd-Function twins.

Every op validates its arguments here, with torch's exception types and messages that
name the problem, so a bad call fails before any tensor work starts.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch.autograd import forward_ad

IntOrPair = int | Sequence[int]


def tensor_cache(
    maxsize: int, when: Callable[..., bool] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``lru_cache`` for a function of plain values (ints, dtypes, devices) that builds
    constant tensors -- index tables, transform matrices -- shared by every later call;
    with ``when``, only the calls whose arguments it accepts are cached (the others build
    afresh), e.g. to keep no large tensors alive.

    The tensors are built outside inference mode: one first built under
    :func:`torch.inference_mode` would be an inference tensor, which autograd refuses to
    save for backward in a later pass that records a graph (a double backward, say).
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        def build(*args: Any) -> Any:
            with torch.inference_mode(False):
                return fn(*args)

        cached = lru_cache(maxsize=maxsize)(build)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            return cached(*args) if when is None or when(*args) else build(*args)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call

    return decorate


def plain_arguments(*values: Any) -> bool:
    """Whether every value is ``None``, a ``str``, an ``int`` or a tuple of ``int`` -- of
    exactly those types: the arguments an argument check may cache its verdict on
    (:func:`argument_cache`).  A ``bool``, a ``float`` or a NumPy integer equals an
    ``int`` as a cache key, yet torch rejects some of them: those calls are checked afresh.
    """
    for value in values:
        kind = type(value)
        if kind is tuple:
            for item in value:
                if type(item) is not int:
                    return False
        elif kind is not int and kind is not str and value is not None:
            return False
    return True


def argument_cache(
    fn: Callable[..., Any],
) -> Callable[..., Any]:
    """``lru_cache`` for an argument check that is pure in its arguments and returns the
    normalized geometry or raises: ``fn(known, *args)``, ``known`` a tuple of exact values
    (shapes, flags already made ``bool``, the op's name), ``args`` the call's own
    arguments.  A call whose ``args`` are :func:`plain_arguments` reuses the verdict on the
    same ones; any other is checked afresh (and still raises).

    Every conv and pool call validates and normalizes its arguments (~3 us each alone,
    more inside a training step): cached, LeNet-5's training step at batch 1 took 0.77
    against 0.80 ms (2 threads, 10th percentile of 24 interleaved blocks).
    """
    cached = lru_cache(maxsize=256)(fn)

    @functools.wraps(fn)
    def call(known: tuple, *args: Any) -> Any:
        return cached(known, *args) if plain_arguments(*args) else fn(known, *args)

    call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return call


def _pair(value: IntOrPair, name: str, op: str) -> tuple[int, int]:
    """Normalize an int or a 1-/2-sequence of ints into ``(h, w)`` of plain ``int``.

    Integers as torch's argument parser takes them (:func:`as_int`): an ``int``, a NumPy
    integer or a 0-dim integer tensor, but not a lone ``bool`` -- which a sequence takes
    after its first item.  Raises ``TypeError`` for anything else and ``RuntimeError`` for
    a sequence of the wrong length.
    """
    if type(value) is int:  # (the common case first)
        return value, value
    scalar = as_int(value)
    if scalar is not None:
        return scalar, scalar
    if not isinstance(value, Sequence):
        raise TypeError(
            f"{op}(): argument '{name}' must be an int or a tuple of two ints, "
            f"not {type(value).__name__}"
        )
    items = tuple(value)
    ints = [as_int(item, bool_ok=k > 0) for k, item in enumerate(items)]
    if None in ints:
        raise TypeError(
            f"{op}(): argument '{name}' must be an int or a tuple of two ints, "
            f"but got {name}={list(items)}"
        )
    if len(ints) == 1:
        ints *= 2
    if len(ints) != 2:
        raise RuntimeError(
            f"{op}: expected {name} to be a single integer value or a list of 2 "
            f"values to match the 2 spatial dimensions, but got {name}={list(items)}"
        )
    return ints[0], ints[1]


def as_int(value: Any, bool_ok: bool = False) -> int | None:
    """``value`` as a plain ``int`` if torch's argument parser takes it for one -- an
    ``int``, a NumPy integer, a 0-dim integer (or ``bool``) tensor; a Python ``bool`` only
    if ``bool_ok`` -- else ``None``."""
    if isinstance(value, bool):
        return int(value) if bool_ok else None
    if isinstance(value, torch.Tensor):
        exact = value.dim() == 0 and not (value.is_floating_point() or value.is_complex())
        return int(value) if exact else None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_input_rank(x: torch.Tensor, op: str) -> None:
    """Require a tensor, ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""
    check_input_type(x, op)
    check_rank(x.shape, op)


def check_input_type(x: Any, op: str) -> None:
    """Require a tensor input (torch's ``TypeError`` otherwise)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}(): argument 'input' must be Tensor, not {type(x).__name__}")


def check_rank(shape: torch.Size, op: str, error: type[Exception] = RuntimeError) -> None:
    """Require an input shape ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""
    if len(shape) not in (3, 4):
        raise error(
            f"Expected 3D (unbatched) or 4D (batched) input to {op}, "
            f"but got input of size: {list(shape)}"
        )


def check_positive(values: tuple[int, int], name: str, op: str) -> None:
    if min(values) <= 0:
        raise RuntimeError(f"{op}: non-positive {name} is not supported, but got {name}={values}")


def check_non_negative(values: tuple[int, int], name: str, op: str) -> None:
    if min(values) < 0:
        raise RuntimeError(f"{op}: negative {name} is not supported, but got {name}={values}")


def pool_output_size(
    size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool
) -> int:
    """torch's pooling output length along one dimension.

    ``out = floor_or_ceil((size + 2*pad - dilation*(kernel-1) - 1) / stride) + 1``; with
    ``ceil_mode`` the last window must start inside the input or the left padding, so one
    window is dropped when ``(out-1)*stride >= size + pad``.
    """
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def check_pool_args(
    shape: torch.Size,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    op: str,
) -> None:
    """The argument checks torch applies to 2-d pools (all ``RuntimeError``)."""
    if min(kernel) <= 0:
        raise RuntimeError(f"{op}: kernel_size must be greater than zero, but got {kernel}")
    if min(stride) <= 0:
        raise RuntimeError(f"{op}: stride must be greater than zero, but got {stride}")
    if min(dilation) <= 0:
        raise RuntimeError(f"{op}: dilation must be greater than zero, but got {dilation}")
    if min(padding) < 0:
        raise RuntimeError(f"{op}: pad must be non-negative, but got pad: {padding}")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise RuntimeError(
            f"{op}: pad should be at most half of kernel size, but got "
            f"pad={padding} and kernel_size={kernel}"
        )
    nonbatch = shape[1:] if len(shape) == 4 and shape[0] == 0 else shape[-3:]
    if any(s == 0 for s in nonbatch):
        raise RuntimeError(
            f"{op}: expected 3D or 4D (batch mode) tensor with optional 0 dim "
            f"batch size for input, but got: {list(shape)}"
        )


def pool_geometry(
    shape: torch.Size,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    ceil_mode: bool,
    op: str,
) -> tuple[int, int]:
    """Output ``(oH, oW)`` of a 2-d pool, rejecting an empty output as torch does."""
    c, h, w = shape[-3:]
    oh = pool_output_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_output_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    if oh < 1 or ow < 1:
        raise RuntimeError(
            f"{op}: given input size: ({c}x{h}x{w}). Calculated output "
            f"size: ({c}x{oh}x{ow}). Output size is too small"
        )
    return oh, ow


def windows(
    xp: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    out: tuple[int, int],
) -> torch.Tensor:
    """A strided view ``(..., oH, oW, kH, kW)`` of every pooling/conv window of ``xp``.

    ``view[..., oh, ow, i, j] = xp[..., oh*sH + i*dH, ow*sW + j*dW]``: no copy is made.
    """
    *lead, hp, wp = xp.shape
    st = xp.stride()
    sh, sw = st[-2], st[-1]
    size = (*lead, out[0], out[1], kernel[0], kernel[1])
    strides = (*st[:-2], sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1])
    return xp.as_strided(size, strides, xp.storage_offset())


def chunk_slices(n: int, per_item: int, budget: int, unsplit: int = 0) -> list[slice]:
    """Split ``n`` items (samples, planes) into equal slices whose buffers, ``per_item``
    elements each, fit ``budget`` elements; ``[slice(None)]`` when one slice does, or when
    the whole buffer is within ``unsplit`` elements (below that, more passes cost more
    than the memory is worth)."""
    if n * per_item <= unsplit:
        return [slice(None)]
    count = -(-n * per_item // max(budget, 1))  # ceil
    if count <= 1:
        return [slice(None)]
    size = -(-n // count)
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def at(t: torch.Tensor, region: tuple[slice, slice]) -> torch.Tensor:
    """``t[..., rows, cols]`` as a view; ``t`` itself when that is all of it (an alias
    from a full-range slice would break vmap)."""
    rows, cols = region
    h, w = t.shape[-2:]
    if rows.indices(h) == (0, h, 1) and cols.indices(w) == (0, w, 1):
        return t
    return t[..., rows, cols]


def _tap_span(i: int, size: int, out: int, stride: int, pad: int, dilation: int):
    """Along one axis, where tap ``i`` of the windows reads inside the input.

    Output ``p`` reads input ``u = p*stride + i*dilation - pad``; returns the output slice
    ``p0:p1`` for which ``0 <= u < size`` and the matching strided input slice, or ``None``
    when the tap lies in the padding for every window.
    """
    shift = i * dilation - pad
    p0 = max(0, -(shift // stride))  # the first p with u >= 0 (ceil(-shift / stride))
    p1 = min(out, (size - 1 - shift) // stride + 1)
    if p1 <= p0:
        return None
    u0 = p0 * stride + shift
    return slice(p0, p1), slice(u0, u0 + (p1 - p0 - 1) * stride + 1, stride)


class Tap(NamedTuple):
    """Kernel tap ``(i, j)``: the outputs ``out`` whose window reads it in bounds, and the
    input positions ``inp`` it reads for them (read with :func:`at`: a strided view)."""

    ij: tuple[int, int]  # its position in the kernel
    offset: int  # flat input offset of this tap relative to tap (0, 0): i*dH*W + j*dW
    out: tuple[slice, slice]
    inp: tuple[slice, slice]
    full: bool  # in bounds for every window


@lru_cache(maxsize=256)  # pure in its ints; called on every pooling/depthwise pass
def in_bounds_taps(
    input_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out: tuple[int, int],
) -> tuple[Tap, ...]:
    """Every kernel tap in row-major (torch's scan) order, restricted to the input.

    ``padding``: the rows/columns of padding before the input (top, left); what lies
    after it only shows in ``out``.  Padding is never materialized: a tap contributes
    only to the windows that read it inside the input, so ``-inf``/zero padding needs no
    copy of ``x``.
    """
    (h, w), (kh, kw), (oh, ow) = input_hw, kernel, out
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    rows = [_tap_span(i, h, oh, sh, ph, dh) for i in range(kh)]
    cols = [_tap_span(j, w, ow, sw, pw, dw) for j in range(kw)]
    taps = []
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            if row is None or col is None:
                continue
            full = row[0] == slice(0, oh) and col[0] == slice(0, ow)
            taps.append(Tap((i, j), i * dh * w + j * dw, (row[0], col[0]), (row[1], col[1]), full))
    return tuple(taps)


def legacy_twin(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """The same ``autograd.Function`` in the legacy ``forward(ctx, *inputs)`` style.

    A Function with a separate ``setup_context`` (what ``torch.func`` transforms such as
    ``vmap`` need) makes every ``apply`` bind its arguments with :mod:`inspect`: measured
    here 24 us per call against 3 us for the legacy style -- as much as a whole small
    pooling layer.  The twin runs the same ``forward``, ``setup_context``, ``backward``
    and ``jvp``; :func:`apply_function` uses it whenever no transform is active.
    """

    def forward(ctx: Any, *inputs: Any) -> Any:
        output = cls.forward(*inputs)
        cls.setup_context(ctx, inputs, output)
        return output

    attrs = {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(torch.autograd.Function.setup_context),  # "not defined"
        "__module__": cls.__module__,
        "__doc__": cls.__doc__,
    }
    return type(cls.__name__, (cls,), attrs)


def own_output(output: torch.Tensor, *inputs: Any) -> torch.Tensor:
    """A Function's ``output``, made inside its ``forward``, as a tensor of its own: where it
    is a view of a tensor made there (an unbatched input's result squeezed, a permuted
    product that was contiguous already at batch 1), the same memory detached from that
    base, no copy.  autograd forbids an in-place op (``ReLU(inplace=True)``) on an output
    that is a view made inside a custom Function; torch's own ops take one.  A view of one
    of the ``inputs`` stays one (its memory is the caller's)."""
    if output._is_view() and not any(output._base is t for t in inputs):
        return output.detach()
    return output


def apply_function(
    cls: type[torch.autograd.Function], twin: type[torch.autograd.Function], *args: Any
) -> Any:
    """``cls.apply(*args)``; through its :func:`legacy_twin` outside ``torch.func`` transforms."""
    return (cls if _transforms_active() else twin).apply(*args)


# (private in torch: without it, always take the transform-ready Function)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_tensors(*tensors: torch.Tensor) -> bool:
    """Whether an op with no derivative and no ``functorch`` rules may compute with these
    tensors: plain tensors or a module's parameters (no other subclass -- FakeTensor under
    torch.compile dispatches itself -- nor ``functorch`` wrapper), none that autograd
    records, no forward-mode AD.

    (``nn.Parameter`` computes as a plain tensor: it overrides no torch function.  Taken
    for a subclass, a model's weights kept its convs from reusing their forward's row
    buffer and from the layouts picked where oneDNN multiplies.)"""
    for t in tensors:
        if type(t) not in _PLAIN_TYPES or _wrapped(t):
            return False
        if torch.is_grad_enabled() and t.requires_grad:
            return False
    return not forward_ad_active()


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (``torch.autograd.forward_ad.dual_level``):
    only then can a Function's ``jvp`` run, so only then need it ``save_for_forward``."""
    return forward_ad._current_level >= 0


def _wrapped(t: torch.Tensor) -> bool:
    """A ``functorch`` (``vmap``, ``grad``, ...) wrapper tensor."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)
