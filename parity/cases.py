"""The one shared case generator for conv2d, max_pool2d and avg_pool2d.

A :class:`Case` is everything needed to call an op the way ``torch.nn.functional`` is
called: the op name, its keyword arguments, the input (and weight/bias) shapes, how the
input values are drawn (:data:`KINDS`), how the tensors are laid out in memory
(:data:`LAYOUTS`), the dtype and a seed.  :func:`make_inputs` turns a case into tensors,
bit-for-bit the same on every run.

:func:`generate` returns the valid configurations of an op (curated edge cases plus a
seeded random sweep of the whole argument space); :func:`rejected_cases` the
configurations torch raises on; :func:`undefined_cases` the max-pool configurations in
which a window lies wholly in the padding (torch's CPU kernel reads out of bounds there,
so they are never compared with torch); :func:`gradcheck_cases` small cases for
``gradcheck``/``gradgradcheck``.

Validity (:func:`invalid_reason`) is computed from the geometry alone, independently of
any implementation under test.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "KINDS",
    "LAYOUTS",
    "OPS",
    "SIZES",
    "Case",
    "Strided",
    "conv_output_size",
    "generate",
    "gradcheck_cases",
    "invalid_reason",
    "make_grad",
    "make_inputs",
    "make_tangents",
    "max_pool_window_in_padding",
    "pool_output_size",
    "pool_params",
    "rejected_cases",
    "undefined_cases",
]

OPS = ("conv2d", "max_pool2d", "avg_pool2d")
SIZES = ("quick", "full")

#: How input values are drawn.
KINDS = (
    "randn",  # standard normal
    "ties",  # integers in [-2, 2]: many exact ties, exact arithmetic
    "relu",  # max(randn, 0): half the entries are tied zeros
    "nonfinite",  # randn with NaN, +inf and -inf sprinkled in
    "neginf",  # small integers with ~half -inf (windows of only -inf)
    "scaled",  # randn times magnitudes spanning 1e-3 .. 1e3
    "distinct",  # a permutation of evenly spaced values: no ties (gradcheck of max-pool)
)

#: How a tensor is laid out in memory (values are the same; strides/offset differ).
LAYOUTS = (
    "contiguous",
    "channels_last",  # NHWC storage (CHW -> HWC for unbatched input)
    "transposed",  # the last two dims stored swapped
    "sliced",  # every other row/column of a bigger NaN-filled buffer, non-zero offset
    "expanded",  # broadcast along dim 0 (stride 0): all samples/channels identical
)

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "conv2d": {"stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    "max_pool2d": {
        "stride": None,
        "padding": 0,
        "dilation": 1,
        "ceil_mode": False,
        "return_indices": False,
    },
    "avg_pool2d": {
        "stride": None,
        "padding": 0,
        "ceil_mode": False,
        "count_include_pad": True,
        "divisor_override": None,
    },
}


@dataclass(frozen=True)
class Case:
    """One call of an op: ``op(input[, weight, bias], **kwargs)``.

    Attributes:
        op: ``"conv2d"``, ``"max_pool2d"`` or ``"avg_pool2d"``.
        kwargs: keyword arguments as ``(name, value)`` pairs (hashable, ordered); pools
            carry ``kernel_size`` here.
        input_shape: ``(N, C, H, W)`` or unbatched ``(C, H, W)``.
        weight_shape: conv only, ``(C_out, C_in/groups, kH, kW)``.
        bias_shape: conv only; ``None`` for no bias.
        kind: how values are drawn, one of :data:`KINDS`.
        layout: memory layout of the input (and of the upstream gradient), :data:`LAYOUTS`.
        weight_layout: memory layout of the conv weight.
        dtype: dtype name, a key of ``DTYPES``.
        weight_dtype: a different dtype for the weight (only in rejected cases).
        seed: seeds every value drawn for this case.
        expect: ``"valid"``, ``"rejected"`` (torch raises) or ``"undefined"``.
        note: a short name for curated cases (why it exists).
    """

    op: str
    kwargs: tuple[tuple[str, Any], ...]
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] | None = None
    bias_shape: tuple[int, ...] | None = None
    kind: str = "randn"
    layout: str = "contiguous"
    weight_layout: str = "contiguous"
    dtype: str = "float64"
    weight_dtype: str | None = None
    seed: int = 0
    expect: str = "valid"
    note: str = ""

    @property
    def kw(self) -> dict[str, Any]:
        """The keyword arguments as a dict."""
        return dict(self.kwargs)

    def replace(self, **changes: Any) -> Case:
        """A copy with some fields changed (``kwargs`` may be given as a dict)."""
        if isinstance(changes.get("kwargs"), dict):
            changes["kwargs"] = tuple(changes["kwargs"].items())
        return dataclasses.replace(self, **changes)

    @property
    def id(self) -> str:
        """A short readable id (unique within one generated list together with the seed)."""
        args = ",".join(f"{k}={_short(v)}" for k, v in self.kwargs)
        shapes = "x".join(map(str, self.input_shape))
        if self.weight_shape is not None:
            shapes += "|w" + "x".join(map(str, self.weight_shape))
            shapes += "|b" if self.bias_shape is not None else ""
        parts = [self.note or self.op, shapes, args, self.kind]
        if self.layout != "contiguous":
            parts.append(f"in:{self.layout}")
        if self.weight_layout != "contiguous":
            parts.append(f"w:{self.weight_layout}")
        if self.dtype != "float64":
            parts.append(self.dtype)
        parts.append(f"s{self.seed}")
        return "-".join(p for p in parts if p)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["kwargs"] = {k: _jsonable(v) for k, v in self.kwargs}
        return {k: _jsonable(v) for k, v in d.items()}

    def numel(self) -> int:
        """Total number of tensor elements (a size measure used when shrinking)."""
        total = math.prod(self.input_shape)
        if self.weight_shape is not None:
            total += math.prod(self.weight_shape)
        return total


def _short(v: Any) -> str:
    if isinstance(v, tuple | list):
        return "(" + ",".join(map(str, v)) + ")"
    return str(v)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


# ----------------------------------------------------------------------------- geometry


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def conv_padding(kwargs: dict[str, Any], kernel: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` padding of a conv2d call (``'same'``: extra at the end)."""
    padding = kwargs.get("padding", 0)
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        dh, dw = _pair(kwargs.get("dilation", 1))
        th, tw = dh * (kernel[0] - 1), dw * (kernel[1] - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


def conv_output_size(size: int, kernel: int, stride: int, pad_total: int, dilation: int) -> int:
    """``floor((size + pad_total - dilation*(kernel-1) - 1) / stride) + 1``."""
    return (size + pad_total - dilation * (kernel - 1) - 1) // stride + 1


def pool_output_size(
    size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool
) -> int:
    """torch's pooling output length (ceil mode drops a window starting in the right padding)."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def pool_params(case_kw: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    """``(kernel, stride, padding, dilation)`` pairs of a pooling call (stride defaults)."""
    kernel = _pair(case_kw["kernel_size"])
    stride = case_kw.get("stride")
    stride = kernel if stride is None or stride == () else _pair(stride)
    return kernel, stride, _pair(case_kw.get("padding", 0)), _pair(case_kw.get("dilation", 1))


def max_pool_window_in_padding(input_hw: tuple[int, int], kwargs: dict[str, Any]) -> bool:
    """Whether some max-pool window reads only padding (torch's kernel misbehaves there)."""
    kernel, stride, padding, dilation = pool_params(kwargs)
    ceil_mode = bool(kwargs.get("ceil_mode", False))
    for size, k, s, p, d in zip(input_hw, kernel, stride, padding, dilation, strict=True):
        out = pool_output_size(size, k, s, p, d, ceil_mode)
        for o in range(max(out, 0)):
            if not any(0 <= o * s - p + i * d < size for i in range(k)):
                return True
    return False


def invalid_reason(case: Case) -> str | None:
    """Why torch would reject ``case`` (``None`` if it accepts it), from the geometry alone.

    Covers the rules the generators rely on; cases built to be rejected carry
    ``expect="rejected"`` and are checked against torch itself.
    """
    kw = case.kw
    shape = case.input_shape
    if len(shape) not in (3, 4):
        return "input rank"
    if case.op == "conv2d":
        w = case.weight_shape
        if w is None or len(w) != 4:
            return "weight rank"
        groups = kw.get("groups", 1)
        stride, dilation = _pair(kw.get("stride", 1)), _pair(kw.get("dilation", 1))
        if groups <= 0 or min(stride) <= 0 or min(dilation) <= 0:
            return "non-positive groups/stride/dilation"
        if shape[-3] != w[1] * groups or w[0] % groups:
            return "channels/groups"
        if case.bias_shape is not None and case.bias_shape != (w[0],):
            return "bias shape"
        padding = kw.get("padding", 0)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                return "padding string"
            if padding == "same" and stride != (1, 1):
                return "same with stride"
        elif min(_pair(padding)) < 0:
            return "negative padding"
        top, bottom, left, right = conv_padding(kw, (w[2], w[3]))
        if shape[-2] + top + bottom < dilation[0] * (w[2] - 1) + 1:
            return "kernel larger than padded input"
        if shape[-1] + left + right < dilation[1] * (w[3] - 1) + 1:
            return "kernel larger than padded input"
        return None
    kernel, stride, padding, dilation = pool_params(kw)
    if min(kernel) <= 0 or min(stride) <= 0 or min(dilation) <= 0 or min(padding) < 0:
        return "non-positive kernel/stride/dilation or negative padding"
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        return "padding above half the kernel"
    if 0 in shape[-3:]:
        return "empty non-batch dimension"
    ceil = bool(kw.get("ceil_mode", False))
    for size, k, s, p, d in zip(shape[-2:], kernel, stride, padding, dilation, strict=True):
        if pool_output_size(size, k, s, p, d, ceil) < 1:
            return "output size too small"
    if kw.get("divisor_override", None) == 0:
        return "zero divisor"
    if case.op == "max_pool2d" and max_pool_window_in_padding(shape[-2:], kw):
        return "max-pool window wholly in the padding (undefined in torch)"
    return None


# ----------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class Strided:
    """A tensor as flat storage values plus ``as_strided`` geometry (exactly reproducible)."""

    storage: torch.Tensor  # 1-d, contiguous
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor itself, on ``device`` (a leaf view of its own storage)."""
        return self.storage.to(device).as_strided(self.size, self.stride, self.offset)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _lay_out(values: torch.Tensor, layout: str) -> Strided:
    """Store ``values`` with ``layout`` (for ``expanded``, dim 0 of ``values`` has size 1)."""
    shape = tuple(values.shape)
    if layout == "contiguous" or values.dim() < 2:
        return Strided(values.reshape(-1).clone(), shape, _contiguous_strides(shape), 0)
    if layout == "channels_last":
        if values.dim() == 4:
            perm = (0, 2, 3, 1)
        elif values.dim() == 3:
            perm = (1, 2, 0)
        else:
            return _lay_out(values, "contiguous")
        stored = values.permute(*perm).contiguous()
        inv = [perm.index(i) for i in range(len(perm))]
        stored_strides = _contiguous_strides(tuple(stored.shape))
        return Strided(stored.reshape(-1), shape, tuple(stored_strides[i] for i in inv), 0)
    if layout == "transposed":
        stored = values.transpose(-1, -2).contiguous()
        st = list(_contiguous_strides(tuple(stored.shape)))
        st[-1], st[-2] = st[-2], st[-1]
        return Strided(stored.reshape(-1), shape, tuple(st), 0)
    if layout == "sliced":
        *lead, h, w = shape
        fill = float("nan") if values.is_floating_point() else 77
        big = torch.full((*lead, 2 * h, 2 * w + 1), fill, dtype=values.dtype)
        big[..., ::2, 1::2] = values
        st = _contiguous_strides(tuple(big.shape))
        strides = (*st[:-2], st[-2] * 2, 2)
        return Strided(big.reshape(-1), shape, strides, 1)
    if layout == "expanded":
        raise ValueError("expanded layout is built by make_inputs")
    raise ValueError(f"unknown layout {layout!r}")


def _draw(kind: str, shape: tuple[int, ...], gen: torch.Generator, integer: bool) -> torch.Tensor:
    """Values of ``kind`` in float64 (small integers when ``integer``)."""
    n = math.prod(shape)
    if integer:
        return torch.randint(-5, 6, shape, generator=gen, dtype=torch.float64)
    if kind == "randn":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "ties":
        return torch.randint(-2, 3, shape, generator=gen, dtype=torch.float64)
    if kind == "relu":
        return torch.randn(shape, generator=gen, dtype=torch.float64).clamp_min(0)
    if kind == "scaled":
        mag = 10.0 ** torch.randint(-3, 4, shape, generator=gen, dtype=torch.float64)
        return torch.randn(shape, generator=gen, dtype=torch.float64) * mag
    if kind == "distinct":
        perm = torch.randperm(n, generator=gen, dtype=torch.float64)
        return ((perm - n / 2) / max(n, 1) * 4).reshape(shape)
    if kind == "nonfinite":
        x = torch.randn(shape, generator=gen, dtype=torch.float64).reshape(-1)
        if n:
            count = max(1, n // 12)
            pos = torch.randperm(n, generator=gen)[: 3 * count]
            x[pos[:count]] = float("nan")
            x[pos[count : 2 * count]] = float("inf")
            x[pos[2 * count :]] = float("-inf")
        return x.reshape(shape)
    if kind == "neginf":
        x = torch.randint(-2, 3, shape, generator=gen, dtype=torch.float64)
        mask = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5
        return x.masked_fill(mask, float("-inf"))
    raise ValueError(f"unknown kind {kind!r}")


def _tensor(
    kind: str,
    shape: tuple[int, ...],
    layout: str,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> Strided:
    integer = not dtype.is_floating_point
    if integer and kind in ("nonfinite", "neginf"):
        kind = "ties"
    if layout == "expanded" and len(shape) >= 2:
        one = _draw(kind, (1, *shape[1:]), gen, integer).to(dtype)
        base = _lay_out(one, "contiguous")
        return Strided(base.storage, shape, (0, *base.stride[1:]), 0)
    return _lay_out(_draw(kind, shape, gen, integer).to(dtype), layout)


def case_storage(case: Case) -> list[Strided | None]:
    """The op's tensor arguments of ``case`` as :class:`Strided` (``None`` for no bias).

    Conv weights are standard normal (integers for ``ties``/integer dtypes: exact sums);
    biases are standard normal.
    """
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    x = _tensor(case.kind, case.input_shape, case.layout, dtype, gen)
    if case.op != "conv2d":
        return [x]
    wdtype = DTYPES[case.weight_dtype or case.dtype]
    wkind = "ties" if case.kind == "ties" else "randn"
    w = _tensor(wkind, case.weight_shape, case.weight_layout, wdtype, gen)
    b = None
    if case.bias_shape is not None:
        b = _tensor(wkind, case.bias_shape, "contiguous", wdtype, gen)
    return [x, w, b]


def make_inputs(
    case: Case, device: str | torch.device = "cpu", requires_grad: bool = False
) -> list[torch.Tensor | None]:
    """Fresh tensors for ``case``: ``[input]`` for pools, ``[input, weight, bias]`` for conv.

    Deterministic: the same case gives bit-identical values, strides and offsets every time.
    With ``requires_grad`` every floating tensor becomes a leaf that requires grad.
    """
    out: list[torch.Tensor | None] = []
    for s in case_storage(case):
        t = None if s is None else s.tensor(device)
        if t is not None and requires_grad and t.is_floating_point():
            t.requires_grad_()
        out.append(t)
    return out


def _aux_storage(case: Case, shape: tuple[int, ...], salt: int, dyadic: bool) -> Strided:
    gen = torch.Generator().manual_seed((case.seed * 1_000_003 + salt) % (2**63))
    dtype = DTYPES[case.dtype]
    if dyadic:  # sums of these are exact in any order and dtype: bit-exact comparisons
        mag = torch.randint(1, 9, shape, generator=gen, dtype=torch.float64) / 4
        sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1
        values = (mag * sign).to(dtype)
    else:
        values = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    layout = case.layout if case.layout != "expanded" else "transposed"
    return _lay_out(values, layout)


def grad_storage(case: Case, shape: tuple[int, ...]) -> Strided:
    """The upstream gradient for an output of ``shape`` (same layout as the input).

    For max-pool it holds small dyadic rationals, so every summation order is exact.
    """
    return _aux_storage(case, tuple(shape), 1, dyadic=case.op == "max_pool2d")


def make_grad(
    case: Case, shape: tuple[int, ...], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The upstream gradient tensor for ``case`` (see :func:`grad_storage`)."""
    return grad_storage(case, shape).tensor(device)


def tangent_storage(case: Case) -> list[Strided | None]:
    """Forward-mode tangents for the tensor arguments of ``case``, laid out like them.

    (An ``expanded`` primal needs an ``expanded`` tangent: ``make_dual`` cannot write a
    dense tangent into overlapping memory.)
    """
    gen = torch.Generator().manual_seed((case.seed * 1_000_003 + 2) % (2**63))
    dtype = DTYPES[case.dtype]
    out: list[Strided | None] = []
    layouts = (case.layout, case.weight_layout, "contiguous")
    for s, layout in zip(case_storage(case), layouts, strict=False):
        out.append(None if s is None else _tensor("randn", s.size, layout, dtype, gen))
    return out


def make_tangents(case: Case, device: str | torch.device = "cpu") -> list[torch.Tensor | None]:
    """Tangent tensors matching :func:`make_inputs` (same shapes and layouts)."""
    return [None if s is None else s.tensor(device) for s in tangent_storage(case)]


# ----------------------------------------------------------------------------- sampling


def _arg(rng: random.Random, h: int, w: int, allow_int: bool = True) -> Any:
    """An int when both are equal (most of the time), else a tuple; rarely a 1-tuple."""
    if h == w and allow_int:
        r = rng.random()
        if r < 0.65:
            return h
        if r < 0.72:
            return (h,)
    return (h, w)


def _pick(rng: random.Random, weighted: dict[str, float]) -> str:
    return rng.choices(list(weighted), weights=list(weighted.values()))[0]


_KIND_WEIGHTS = {
    "randn": 35,
    "ties": 20,
    "relu": 10,
    "nonfinite": 10,
    "neginf": 6,
    "scaled": 10,
    "distinct": 9,
}
_LAYOUT_WEIGHTS = {
    "contiguous": 50,
    "channels_last": 15,
    "transposed": 12,
    "sliced": 12,
    "expanded": 11,
}


def _batch_shape(rng: random.Random, c: int, h: int, w: int, full: bool) -> tuple[int, ...]:
    r = rng.random()
    if r < 0.15:
        return (c, h, w)  # unbatched
    if r < 0.40:
        return (1, c, h, w)
    return (rng.randint(2, 4 if full else 3), c, h, w)


def _size_for(rng: random.Random, need: int, full: bool) -> int:
    """An input length >= ``need`` (>= 1) plus a few extra rows (leftover-row coverage)."""
    return max(1, need) + rng.randint(0, 7 if full else 4)


def _sample_conv(rng: random.Random, full: bool) -> Case:
    kmax = 5 if full else 4
    style = rng.random()
    if style < 0.15:  # depthwise (MobileNet style), optional channel multiplier
        c = rng.randint(1, 5)
        groups, cg, o = c, 1, c * rng.choice([1, 1, 2, 3])
    else:
        groups = rng.choice([1, 1, 1, 2, 2, 3, 4])
        cg = rng.randint(1, 3)
        c, o = groups * cg, groups * rng.randint(1, 3)
    kh, kw = rng.randint(1, kmax), rng.randint(1, kmax)
    if rng.random() < 0.4:
        kw = kh
    sh, sw = (rng.randint(1, 3), rng.randint(1, 3)) if rng.random() < 0.6 else (1, 1)
    if rng.random() < 0.4:
        sw = sh
    dh, dw = (rng.randint(1, 3), rng.randint(1, 3)) if rng.random() < 0.35 else (1, 1)
    r = rng.random()
    if r < 0.12 and (sh, sw) == (1, 1):
        padding: Any = "same"
    elif r < 0.2:
        padding = "valid"
    else:
        ph, pw = rng.randint(0, 3), rng.randint(0, 3)
        padding = _arg(rng, ph, pw)
    kwargs: dict[str, Any] = {}
    if (sh, sw) != (1, 1) or rng.random() < 0.3:
        kwargs["stride"] = _arg(rng, sh, sw)
    if padding != 0 or rng.random() < 0.3:
        kwargs["padding"] = padding
    if (dh, dw) != (1, 1) or rng.random() < 0.2:
        kwargs["dilation"] = _arg(rng, dh, dw)
    if groups != 1 or rng.random() < 0.2:
        kwargs["groups"] = groups
    top, bottom, left, right = conv_padding(kwargs, (kh, kw))
    h = _size_for(rng, dh * (kh - 1) + 1 - top - bottom, full)
    w = _size_for(rng, dw * (kw - 1) + 1 - left - right, full)
    return Case(
        op="conv2d",
        kwargs=tuple(kwargs.items()),
        input_shape=_batch_shape(rng, c, h, w, full),
        weight_shape=(o, cg, kh, kw),
        bias_shape=(o,) if rng.random() < 0.6 else None,
        kind=_pick(rng, _KIND_WEIGHTS),
        layout=_pick(rng, _LAYOUT_WEIGHTS),
        weight_layout=_pick(
            rng, {"contiguous": 60, "channels_last": 15, "transposed": 15, "sliced": 10}
        ),
        seed=rng.randrange(2**31),
    )


def _sample_pool(rng: random.Random, op: str, full: bool) -> Case:
    kmax = 5 if full else 4
    kh, kw = rng.randint(1, kmax), rng.randint(1, kmax)
    if rng.random() < 0.4:
        kw = kh
    kwargs: dict[str, Any] = {"kernel_size": _arg(rng, kh, kw)}
    r = rng.random()
    if r < 0.35:
        sh, sw = kh, kw
        if r < 0.05:
            kwargs["stride"] = None  # explicit None
    else:
        sh, sw = rng.randint(1, 3), rng.randint(1, 3)
        if rng.random() < 0.4:
            sw = sh
        kwargs["stride"] = _arg(rng, sh, sw)
    ph, pw = (rng.randint(0, kh // 2), rng.randint(0, kw // 2)) if rng.random() < 0.5 else (0, 0)
    if (ph, pw) != (0, 0) or rng.random() < 0.2:
        kwargs["padding"] = _arg(rng, ph, pw)
    dh = dw = 1
    if op == "max_pool2d" and rng.random() < 0.35:
        dh, dw = rng.randint(1, 3), rng.randint(1, 3)
        kwargs["dilation"] = _arg(rng, dh, dw)
    if rng.random() < 0.45:
        kwargs["ceil_mode"] = True
    if op == "max_pool2d" and rng.random() < 0.4:
        kwargs["return_indices"] = True
    if op == "avg_pool2d":
        if rng.random() < 0.4:
            kwargs["count_include_pad"] = False
        if rng.random() < 0.3:
            kwargs["divisor_override"] = rng.choice([1, 2, 3, 5, 7, -3])
    h = _size_for(rng, dh * (kh - 1) + 1 - 2 * ph, full)
    w = _size_for(rng, dw * (kw - 1) + 1 - 2 * pw, full)
    return Case(
        op=op,
        kwargs=tuple(kwargs.items()),
        input_shape=_batch_shape(rng, rng.randint(1, 4), h, w, full),
        kind=_pick(rng, _KIND_WEIGHTS),
        layout=_pick(rng, _LAYOUT_WEIGHTS),
        seed=rng.randrange(2**31),
    )


def _sample(rng: random.Random, op: str, full: bool) -> Case:
    return _sample_conv(rng, full) if op == "conv2d" else _sample_pool(rng, op, full)


# ----------------------------------------------------------------------------- curated


def _conv(note: str, x, w, bias: bool = True, **kwargs: Any) -> Case:
    return Case(
        "conv2d", tuple(kwargs.items()), tuple(x), tuple(w), (w[0],) if bias else None, note=note
    )


def _pool(op: str, note: str, x, **kwargs: Any) -> Case:
    return Case(op, tuple(kwargs.items()), tuple(x), note=note)


def _curated(op: str) -> list[Case]:
    """Hand-picked edge cases (each then crossed with a few kinds/layouts by the caller)."""
    if op == "conv2d":
        return [
            _conv("1x1", (2, 3, 5, 4), (4, 3, 1, 1)),
            _conv("1x1_stride3_skips_rows", (2, 3, 7, 8), (2, 3, 1, 1), stride=3),
            _conv("one_pixel", (2, 3, 1, 1), (2, 3, 1, 1)),
            _conv("one_pixel_padded", (1, 2, 1, 1), (3, 2, 3, 3), padding=1),
            _conv("kernel_is_input", (2, 2, 4, 3), (3, 2, 4, 3)),
            _conv("same_even_kernel", (2, 2, 7, 6), (3, 2, 4, 2), padding="same"),
            _conv("same_dilated", (1, 2, 9, 8), (2, 2, 4, 3), padding="same", dilation=(2, 3)),
            _conv("valid", (2, 3, 6, 5), (2, 3, 3, 2), bias=False, padding="valid"),
            _conv(
                "asymmetric_everything",
                (2, 2, 9, 11),
                (3, 2, 2, 4),
                stride=(1, 3),
                padding=(0, 2),
                dilation=(2, 1),
            ),
            _conv("padding_hw_differ", (1, 1, 5, 5), (1, 1, 3, 3), padding=(2, 0)),
            _conv("depthwise_s2", (2, 4, 7, 7), (4, 1, 3, 3), stride=2, padding=1, groups=4),
            _conv("depthwise_mult3", (1, 2, 6, 5), (6, 1, 3, 3), padding=1, groups=2),
            _conv("groups_no_bias", (2, 6, 5, 5), (4, 3, 2, 2), bias=False, groups=2),
            _conv("stride_gt_kernel", (2, 2, 10, 9), (2, 2, 2, 2), stride=(4, 3)),
            _conv("dilation_gt_input_step", (1, 2, 9, 9), (2, 2, 3, 3), dilation=3, padding=1),
            _conv("unbatched", (3, 6, 7), (2, 3, 3, 3), padding=1),
            _conv("unbatched_groups", (4, 5, 5), (4, 2, 3, 1), groups=2, stride=2),
            _conv("batch1", (1, 3, 6, 6), (2, 3, 3, 3), stride=2),
            _conv("empty_batch", (0, 2, 5, 5), (3, 2, 3, 3), padding=1),
            _conv("stride_1tuple", (2, 2, 6, 6), (2, 2, 2, 2), stride=(2,), padding=(1,)),
            _conv("lenet_conv1", (2, 1, 12, 12), (6, 1, 5, 5), padding=2),
            _conv("wider", (2, 8, 12, 12), (8, 4, 3, 3), padding=1, groups=2),
        ]
    if op == "max_pool2d":
        m = "max_pool2d"
        return [
            _pool(m, "k1_identity", (2, 2, 4, 5), kernel_size=1),
            _pool(m, "lenet_2x2", (2, 3, 8, 8), kernel_size=2),
            _pool(m, "global", (2, 2, 5, 4), kernel_size=(5, 4)),
            _pool(m, "resnet_3s2p1", (2, 2, 9, 8), kernel_size=3, stride=2, padding=1),
            _pool(m, "overlap_stride1", (1, 2, 6, 6), kernel_size=3, stride=1),
            _pool(m, "ceil_extra_window", (1, 2, 7, 8), kernel_size=2, stride=2, ceil_mode=True),
            _pool(
                m,
                "ceil_dropped_window",
                (1, 1, 6, 6),
                kernel_size=3,
                stride=3,
                padding=1,
                ceil_mode=True,
            ),
            _pool(m, "ceil_pad", (2, 2, 8, 6), kernel_size=3, stride=2, padding=1, ceil_mode=True),
            _pool(m, "googlenet_ceil", (1, 3, 13, 13), kernel_size=3, stride=2, ceil_mode=True),
            _pool(m, "stride_gt_kernel", (2, 2, 9, 10), kernel_size=2, stride=3),
            _pool(
                m,
                "dilated_padded",
                (2, 2, 9, 10),
                kernel_size=(2, 3),
                stride=(1, 2),
                padding=1,
                dilation=2,
            ),
            _pool(
                m,
                "dilated_ceil",
                (1, 2, 10, 9),
                kernel_size=3,
                stride=2,
                dilation=2,
                ceil_mode=True,
            ),
            _pool(m, "one_pixel", (2, 2, 1, 1), kernel_size=1),
            _pool(m, "one_pixel_padded", (1, 2, 1, 1), kernel_size=2, padding=1, stride=1),
            _pool(m, "stride_empty_tuple", (1, 2, 6, 6), kernel_size=2, stride=()),
            _pool(
                m, "indices", (2, 2, 7, 7), kernel_size=3, stride=2, padding=1, return_indices=True
            ),
            _pool(m, "unbatched", (3, 6, 7), kernel_size=2, return_indices=True),
            _pool(m, "batch1", (1, 2, 6, 6), kernel_size=2, stride=1, ceil_mode=True),
            _pool(m, "empty_batch", (0, 2, 6, 6), kernel_size=2),
            _pool(m, "asymmetric", (2, 1, 9, 7), kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
        ]
    a = "avg_pool2d"
    return [
        _pool(a, "k1_identity", (2, 2, 4, 5), kernel_size=1),
        _pool(a, "lenet_2x2", (2, 3, 8, 8), kernel_size=2),
        _pool(a, "global", (2, 2, 5, 4), kernel_size=(5, 4)),
        _pool(a, "densenet_2s2", (2, 3, 9, 8), kernel_size=2, stride=2),
        _pool(
            a,
            "exclude_pad",
            (2, 2, 6, 5),
            kernel_size=(3, 2),
            padding=1,
            stride=1,
            count_include_pad=False,
        ),
        _pool(
            a, "ceil_include_pad", (1, 2, 7, 7), kernel_size=3, stride=2, padding=1, ceil_mode=True
        ),
        _pool(
            a,
            "ceil_exclude_pad",
            (1, 2, 8, 7),
            kernel_size=3,
            stride=2,
            padding=1,
            ceil_mode=True,
            count_include_pad=False,
        ),
        _pool(a, "ceil_no_pad", (2, 2, 7, 8), kernel_size=2, stride=2, ceil_mode=True),
        _pool(
            a,
            "divisor_override",
            (1, 2, 7, 6),
            kernel_size=3,
            stride=2,
            padding=1,
            divisor_override=5,
        ),
        _pool(
            a,
            "divisor_override_ceil",
            (1, 2, 7, 7),
            kernel_size=2,
            ceil_mode=True,
            divisor_override=3,
            count_include_pad=False,
        ),
        _pool(a, "divisor_negative", (2, 1, 6, 6), kernel_size=2, divisor_override=-3),
        _pool(a, "stride_gt_kernel", (2, 2, 9, 10), kernel_size=2, stride=3),
        _pool(a, "overlap_stride1", (1, 2, 6, 6), kernel_size=3, stride=1, padding=1),
        _pool(a, "one_pixel", (2, 2, 1, 1), kernel_size=1),
        _pool(
            a,
            "one_pixel_padded",
            (1, 2, 1, 1),
            kernel_size=3,
            padding=1,
            stride=1,
            count_include_pad=False,
        ),
        _pool(a, "unbatched", (3, 6, 7), kernel_size=2, ceil_mode=True),
        _pool(a, "batch1", (1, 2, 6, 6), kernel_size=3, stride=2, padding=1),
        _pool(a, "empty_batch", (0, 2, 6, 6), kernel_size=2),
        _pool(
            a,
            "asymmetric",
            (2, 1, 9, 7),
            kernel_size=(3, 1),
            stride=(2, 1),
            padding=(1, 0),
            count_include_pad=False,
        ),
    ]


def _curated_variants(op: str, rng: random.Random, full: bool) -> Iterator[Case]:
    """Every curated case with every kind; full adds every layout too (quick: a few)."""
    kinds = KINDS if full else ("randn", "ties", "nonfinite", "neginf")
    for base in _curated(op):
        for kind in kinds:
            if op == "conv2d" and kind == "neginf" and not full:
                continue
            yield base.replace(kind=kind, seed=rng.randrange(2**31))
        layouts = LAYOUTS[1:] if full else (rng.choice(LAYOUTS[1:]),)
        for layout in layouts:
            weight_layout = rng.choice(LAYOUTS[:4]) if op == "conv2d" else "contiguous"
            yield base.replace(
                kind=rng.choice(("randn", "ties")),
                layout=layout,
                weight_layout=weight_layout,
                seed=rng.randrange(2**31),
            )


#: Random configurations per op on top of the curated ones.
RANDOM_COUNT = {"quick": 90, "full": 1500}


def generate(op: str, size: str = "quick", seed: int = 0) -> list[Case]:
    """The valid cases of ``op``: curated edge cases x kinds/layouts plus a seeded random sweep.

    Deterministic for a given ``(op, size, seed)``.  Max-pool configurations with a window
    wholly in the padding are left out (see :func:`undefined_cases`).
    """
    _check_op_size(op, size)
    full = size == "full"
    rng = random.Random(f"parity:{op}:{size}:{seed}")
    cases = [c for c in _curated_variants(op, rng, full) if invalid_reason(c) is None]
    target = len(cases) + RANDOM_COUNT[size]
    while len(cases) < target:
        case = _sample(rng, op, full)
        if invalid_reason(case) is None:
            cases.append(case)
    return cases


def gradcheck_cases(
    op: str, size: str = "quick", seed: int = 0, count: int | None = None
) -> list[Case]:
    """Small valid cases for ``gradcheck``/``gradgradcheck`` (numerical Jacobians are costly).

    Values are tie-free (``distinct``/``randn``) so max-pool is differentiable at the point;
    layouts vary; at most ~120 input elements.
    """
    _check_op_size(op, size)
    if count is None:
        count = 12 if size == "quick" else 60
    rng = random.Random(f"parity-gradcheck:{op}:{size}:{seed}")
    cases: list[Case] = []
    curated = [c for c in _curated(op) if c.numel() <= 160 and 0 < math.prod(c.input_shape)]
    rng.shuffle(curated)
    pending = curated[: count // 2]
    while len(cases) < count:
        case = pending.pop() if pending else _sample(rng, op, full=False)
        shape = case.input_shape
        if len(shape) == 4 and shape[0] > 2:
            shape = (2, *shape[1:])
        case = case.replace(
            input_shape=shape,
            kind="distinct" if op == "max_pool2d" or rng.random() < 0.5 else "randn",
            seed=rng.randrange(2**31),
            # gradcheck perturbs elements one by one: memory must not overlap
            layout="transposed" if case.layout == "expanded" else case.layout,
        )
        if invalid_reason(case) is None and 0 < math.prod(shape) <= 120 and case.numel() <= 160:
            cases.append(case)
    return cases


def _check_op_size(op: str, size: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")


# ----------------------------------------------------------------------------- rejected


def rejected_cases(op: str) -> list[Case]:
    """Configurations torch raises on; an implementation must raise the same exception type."""
    _check_op_size(op, "quick")
    R = "rejected"
    if op == "conv2d":
        x, w = (2, 4, 6, 6), (3, 2, 3, 3)
        c = [
            _conv("channel_mismatch", (2, 3, 6, 6), (3, 2, 3, 3)),
            _conv("groups_not_dividing_in", (2, 5, 6, 6), (4, 2, 3, 3), groups=2),
            _conv("groups_not_dividing_out", x, w, groups=2),
            _conv("groups_zero", x, (4, 4, 3, 3), groups=0),
            _conv("groups_negative", x, (4, 4, 3, 3), groups=-2),
            _conv("kernel_larger_than_padded_input", (1, 2, 3, 3), (2, 2, 5, 5), padding=0),
            _conv("kernel_dilated_too_large", (1, 2, 5, 5), (2, 2, 3, 3), dilation=3),
            _conv("stride_zero", x, (4, 4, 3, 3), stride=0),
            _conv("stride_negative", x, (4, 4, 3, 3), stride=(1, -1)),
            _conv("padding_negative", x, (4, 4, 3, 3), padding=-1),
            _conv("dilation_zero", x, (4, 4, 3, 3), dilation=0),
            _conv("same_with_stride", x, (4, 4, 3, 3), padding="same", stride=2),
            _conv("unknown_padding_string", x, (4, 4, 3, 3), padding="full"),
            _conv("input_rank2", (6, 6), (4, 4, 3, 3)),
            _conv("input_rank5", (1, 2, 4, 6, 6), (4, 4, 3, 3)),
            _conv("weight_rank3", x, (4, 4, 3)),
            _conv("stride_3tuple", x, (4, 4, 3, 3), stride=(1, 1, 1)),
            _conv("float_stride", x, (4, 4, 3, 3), stride=1.5),
            _conv("float_padding", x, (4, 4, 3, 3), padding=0.5),
            Case("conv2d", (), x, (4, 4, 3, 3), (5,), note="bias_wrong_size"),
            Case("conv2d", (), x, (4, 4, 3, 3), (4, 1), note="bias_rank2"),
            Case(
                "conv2d",
                (),
                x,
                (4, 4, 3, 3),
                None,
                weight_dtype="float32",
                note="weight_dtype_mismatch",
            ),
        ]
    else:
        p = op
        x = (2, 3, 6, 6)
        c = [
            _pool(p, "padding_above_half_kernel", x, kernel_size=2, padding=2),
            _pool(p, "padding_above_half_kernel_h", x, kernel_size=(3, 5), padding=(2, 1)),
            _pool(p, "kernel_zero", x, kernel_size=0),
            _pool(p, "stride_zero", x, kernel_size=2, stride=0),
            _pool(p, "stride_negative", x, kernel_size=2, stride=-1),
            _pool(p, "padding_negative", x, kernel_size=2, padding=-1),
            _pool(p, "output_too_small", (2, 3, 3, 3), kernel_size=4),
            _pool(p, "input_rank5", (1, 2, 3, 6, 6), kernel_size=2),
            _pool(p, "empty_height", (2, 3, 0, 6), kernel_size=2),
            _pool(p, "kernel_3tuple", x, kernel_size=(2, 2, 2)),
            _pool(p, "float_kernel", x, kernel_size=2.0),
        ]
        if op == "max_pool2d":
            c += [
                _pool(p, "input_rank2", (6, 6), kernel_size=2),
                _pool(p, "dilation_zero", x, kernel_size=2, dilation=0),
                _pool(
                    p, "dilated_padding_above_half_kernel", x, kernel_size=3, padding=2, dilation=2
                ),
            ]
        else:
            c += [
                _pool(p, "input_rank2", (6, 6), kernel_size=2),
                _pool(p, "divisor_zero", x, kernel_size=2, divisor_override=0),
                _pool(p, "float_divisor", x, kernel_size=2, divisor_override=2.5),
            ]
    return [case.replace(expect=R, seed=i) for i, case in enumerate(c)]


def undefined_cases(size: str = "quick", seed: int = 0) -> list[Case]:
    """Max-pool configurations with a window wholly in the padding (torch reads out of bounds).

    Never run through torch; an implementation should raise ``RuntimeError`` on them.
    """
    rng = random.Random(f"parity-undefined:{size}:{seed}")
    cases = [
        _pool(
            "max_pool2d",
            "dilated_window_in_padding",
            (1, 1, 2, 2),
            kernel_size=2,
            stride=1,
            padding=1,
            dilation=3,
        ),
        _pool(
            "max_pool2d",
            "ceil_window_in_padding",
            (1, 2, 1, 3),
            kernel_size=2,
            stride=2,
            padding=1,
            dilation=3,
            ceil_mode=True,
        ),
    ]
    for case in cases:
        assert (invalid_reason(case) or "").startswith("max-pool window"), case
    target = 12 if size == "quick" else 60
    while len(cases) < target:
        kh, kw = rng.randint(2, 4), rng.randint(2, 4)
        kwargs: dict[str, Any] = {
            "kernel_size": _arg(rng, kh, kw),
            "stride": _arg(rng, rng.randint(1, 3), rng.randint(1, 3)),
            "padding": _arg(rng, kh // 2, kw // 2),
            "dilation": _arg(rng, rng.randint(2, 4), rng.randint(2, 4)),
            "ceil_mode": rng.random() < 0.5,
        }
        shape = (rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 6), rng.randint(1, 6))
        case = Case("max_pool2d", tuple(kwargs.items()), shape, seed=rng.randrange(2**31))
        reason = invalid_reason(case)
        if reason is not None and reason.startswith("max-pool window"):
            cases.append(case)
    return [c.replace(expect="undefined") for c in cases]
