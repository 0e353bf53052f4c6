"""The one comparison helper: run an implementation and torch on a :class:`~parity.cases.Case`.

:func:`run_check` takes any callable with ``torch.nn.functional``'s signature for the
case's op, runs it and torch's own function on identical tensors, and compares:

``forward``
    outputs (values, shape, dtype, device; NaN/inf positions must match; max-pool
    outputs and indices bit-identical); the inputs must come back unmodified.
``backward``
    input/weight/bias gradients for a seeded random upstream gradient (max-pool: a dyadic
    one, so any summation order is exact and the comparison bit-exact), taken through an
    in-place op on the output (``mul_(1)``, as ``ReLU(inplace=True)`` would follow a
    conv), which torch's outputs take and a view made inside a custom Function refuses.
``indices``
    max-pool only: ``return_indices=True`` indices, bit-exact.
``forward-ad``
    the output tangent (``torch.autograd.forward_ad``) for seeded random input tangents.
``gradcheck`` / ``gradgradcheck``
    torch's numerical-vs-analytical checks in float64 on small cases (``gradcheck`` with
    ``check_forward_ad=True, check_batched_grad=True``; ``gradgradcheck`` with
    ``check_fwd_over_rev=True`` and non-contiguous grad outputs).
``errors``
    for configurations torch rejects, the implementation must raise the same exception
    type (exact type) with a non-empty message.
``dtypes``
    forward and backward (forward only for integers) in the other dtypes torch supports
    on the device: reduced-precision results against torch's float64 result on the same
    values (the exact answer) within dtype-aware tolerances; integers exactly.
``undefined``
    max-pool configurations with a window wholly in the padding (torch reads out of
    bounds there): the implementation must raise ``RuntimeError``. Never runs torch.

Reduced-precision (float32/bfloat16/float16) results, in any check, are compared with
torch's float64 result on the same values (:func:`upcast_reference`).

Tolerances (:func:`tolerance`): ``|actual - expected| <= atol + rtol*|expected|`` with
``atol = atol0 * max(1, max|expected|)`` (relative to the tensor's magnitude): float64
1e-10/1e-10, float32 torch.testing's 1.3e-6/1e-5, bfloat16 and float16 two ulps; max-pool
and integer results exactly.  The reported relative error of a tensor is
``max|actual - expected| / max|expected|``.

:func:`assert_parity` is the pytest form: it raises ``AssertionError`` with the message and
a reproducer snippet.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from .cases import DTYPES, Case, make_grad, make_inputs, make_tangents

__all__ = [
    "APPLIES",
    "CHECKS",
    "DEFAULT_CHECKS",
    "TORCH_OPS",
    "Comparison",
    "Outcome",
    "assert_parity",
    "compare",
    "is_exact",
    "run_check",
    "tolerance",
]

CHECKS = (
    "forward",
    "backward",
    "indices",
    "forward-ad",
    "gradcheck",
    "gradgradcheck",
    "errors",
    "dtypes",
    "undefined",
)
#: Checks run when none are named (``undefined`` only for handmade: see the CLI).
DEFAULT_CHECKS = CHECKS[:-1]
#: Which ops each check applies to.
APPLIES = {
    "indices": ("max_pool2d",),
    "undefined": ("max_pool2d",),
}

TORCH_OPS: dict[str, Callable[..., Any]] = {
    "conv2d": F.conv2d,
    "max_pool2d": F.max_pool2d,
    "avg_pool2d": F.avg_pool2d,
}

_TOLERANCES = {  # (rtol, atol0)
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (2 * 2**-7, 2 * 2**-7),
    torch.float16: (2 * 2**-10, 2 * 2**-10),
}


def applies(check: str, op: str) -> bool:
    """Whether ``check`` is meaningful for ``op``."""
    return op in APPLIES.get(check, (op,))


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol0)`` for ``dtype`` (``atol`` is ``atol0 * max(1, max|expected|)``)."""
    return _TOLERANCES.get(dtype, (0.0, 0.0))


def is_exact(op: str, dtype: torch.dtype) -> bool:
    """Max-pool routes values (no arithmetic) and integers are exact: compare bit-for-bit."""
    return op == "max_pool2d" or not dtype.is_floating_point


@dataclass
class Comparison:
    """The verdict on one tensor."""

    ok: bool
    abs_err: float
    rel_err: float
    message: str = ""


@dataclass
class Outcome:
    """The verdict on one (check, case): ``status`` is ``pass``, ``fail`` or ``skip``."""

    status: str
    abs_err: float = 0.0
    rel_err: float = 0.0
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


def _fail(message: str, abs_err: float = math.inf, rel_err: float = math.inf) -> Outcome:
    return Outcome("fail", abs_err, rel_err, message)


def compare(
    name: str,
    actual: Any,
    expected: torch.Tensor,
    *,
    exact: bool,
    dtype: torch.dtype | None = None,
) -> Comparison:
    """Compare one result tensor with torch's (see the module docstring for the rule).

    ``dtype`` is the dtype ``actual`` must have when it differs from ``expected``'s (a
    float64 reference for a reduced-precision result); tolerances follow ``dtype``.
    """
    if not isinstance(actual, torch.Tensor):
        return Comparison(
            False, math.inf, math.inf, f"{name}: expected a Tensor, got {type(actual).__name__}"
        )
    want = {"shape": expected.shape, "dtype": dtype or expected.dtype, "device": expected.device}
    for attr, e in want.items():
        a = getattr(actual, attr)
        if a != e:
            return Comparison(False, math.inf, math.inf, f"{name}: {attr} {a} != torch's {e}")
    if actual.numel() == 0:
        return Comparison(True, 0.0, 0.0)
    a, e = actual.detach(), expected.detach()
    if not e.is_floating_point():
        diff = (a.long() - e.long()).abs()
        err = float(diff.max())
        ok = err == 0
        scale = float(e.long().abs().max()) or 1.0
        where = "" if ok else f" at {_first(diff != 0)}"
        return Comparison(ok, err, err / scale, "" if ok else f"{name}: differs{where}")
    a64, e64 = a.double(), e.double()
    for label, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        ma, me = fn(a64), fn(e64)
        if not torch.equal(ma, me):
            return Comparison(
                False,
                math.inf,
                math.inf,
                f"{name}: {label} positions differ (impl {int(ma.sum())}, torch {int(me.sum())};"
                f" first at {_first(ma != me)})",
            )
    finite = torch.isfinite(e64)
    if not finite.any():
        return Comparison(True, 0.0, 0.0)
    diff = torch.where(finite, (a64 - e64).abs(), 0.0)
    scale = float(e64[finite].abs().max())
    err = float(diff.max())
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    if exact:
        bad = diff != 0
    else:
        rtol, atol0 = tolerance(dtype or e.dtype)
        bad = diff > atol0 * max(1.0, scale) + rtol * e64.abs().nan_to_num(posinf=0, neginf=0)
    if bad.any():
        how = "not bit-identical" if exact else "outside tolerance"
        return Comparison(
            False,
            err,
            rel,
            f"{name}: {how}: max abs err {err:.3g}, rel {rel:.3g}, {int(bad.sum())} of "
            f"{bad.numel()} elements, first at {_first(bad)}",
        )
    return Comparison(True, err, rel)


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    idx = mask.nonzero()
    return tuple(int(i) for i in idx[0]) if len(idx) else ()


def _merge(comparisons: Sequence[Comparison]) -> Outcome:
    abs_err = max((c.abs_err for c in comparisons), default=0.0)
    rel_err = max((c.rel_err for c in comparisons), default=0.0)
    bad = [c.message for c in comparisons if not c.ok]
    return Outcome("fail" if bad else "pass", abs_err, rel_err, "; ".join(bad))


def _primary(out: Any) -> Any:
    """The differentiable output (max-pool with indices returns ``(values, indices)``)."""
    return out[0] if isinstance(out, tuple | list) else out


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else '(no message)'}"


def _names(case: Case) -> list[str]:
    return ["input", "weight", "bias"] if case.op == "conv2d" else ["input"]


def _not_supported(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (
        isinstance(exc, NotImplementedError)
        or "not implemented" in text
        or ("not supported" in text and "dtype" in text)
    )


# ----------------------------------------------------------------------------- checks


def upcast_reference(case: Case) -> bool:
    """Whether torch's reference runs in float64 (for float32/bfloat16/float16 cases).

    Reduced-precision results are compared with the exact answer (torch's float64 result
    on the same rounded values), not with torch's own reduced-precision kernels, which are
    not a reliable reference (e.g. torch 2.x's CPU bfloat16 conv weight gradient with a
    channels_last weight can return uninitialized values for a tap that only sees padding).
    """
    dtype = DTYPES[case.dtype]
    return dtype.is_floating_point and dtype != torch.float64


def _reference_inputs(
    case: Case, device: str, requires_grad: bool, upcast: bool
) -> list[torch.Tensor | None]:
    """torch's inputs: the case's tensors, or (``upcast``) the same values in float64."""
    if not upcast:
        return make_inputs(case, device, requires_grad)
    return [
        None if t is None else t.double().requires_grad_(requires_grad)
        for t in make_inputs(case, device)
    ]


def _forward(impl: Callable, case: Case, device: str, kwargs: dict | None = None) -> Outcome:
    kw = case.kw if kwargs is None else kwargs
    upcast = upcast_reference(case)
    torch_op = TORCH_OPS[case.op]
    try:
        expected = torch_op(*_reference_inputs(case, device, False, upcast), **kw)
    except Exception as exc:
        if case.dtype != "float64" and _not_supported(exc):
            return Outcome("skip", message=f"torch: {_describe(exc)}")
        return _fail(f"harness: torch rejected a case expected valid: {_describe(exc)}")
    inputs = make_inputs(case, device)
    try:
        actual = impl(*inputs, **kw)
    except Exception as exc:
        return _fail(f"impl raised {_describe(exc)} where torch returns a result")
    dtype = DTYPES[case.dtype]
    exact = is_exact(case.op, dtype)
    if isinstance(expected, tuple):
        if not isinstance(actual, tuple | list) or len(actual) != len(expected):
            return _fail(
                f"output: expected a tuple of {len(expected)} tensors like torch, got "
                f"{type(actual).__name__}"
            )
        comparisons = [
            compare("output", actual[0], expected[0], exact=exact, dtype=dtype),
            compare("indices", actual[1], expected[1], exact=True),
        ]
    else:
        comparisons = [compare("output", actual, expected, exact=exact, dtype=dtype)]
    for name, before, after in zip(_names(case), make_inputs(case, device), inputs, strict=True):
        if before is not None and not (
            torch.equal(before, after)
            or torch.equal(before.isnan(), after.isnan())
            and torch.equal(before.nan_to_num(), after.nan_to_num())
        ):
            comparisons.append(Comparison(False, 0.0, 0.0, f"{name} modified in place"))
    return _merge(comparisons)


def _backward(impl: Callable, case: Case, device: str) -> Outcome:
    torch_op = TORCH_OPS[case.op]
    upcast = upcast_reference(case)
    ref_in = _reference_inputs(case, device, True, upcast)
    try:
        expected = _primary(torch_op(*ref_in, **case.kw))
    except Exception as exc:
        if case.dtype != "float64" and _not_supported(exc):
            return Outcome("skip", message=f"torch: {_describe(exc)}")
        return _fail(f"harness: torch rejected a case expected valid: {_describe(exc)}")
    grad = make_grad(case, tuple(expected.shape), device)
    ref_diff = [t for t in ref_in if t is not None]
    try:
        ref_grads = torch.autograd.grad(
            expected, ref_diff, grad.double() if upcast else grad, allow_unused=True
        )
    except Exception as exc:
        if _not_supported(exc):
            return Outcome("skip", message=f"torch backward: {_describe(exc)}")
        raise
    impl_in = make_inputs(case, device, requires_grad=True)
    impl_diff = [t for t in impl_in if t is not None]
    try:
        actual = _primary(impl(*impl_in, **case.kw))
    except Exception as exc:
        return _fail(f"impl raised {_describe(exc)} where torch returns a result")
    if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
        return _fail(
            f"output: {getattr(actual, 'shape', type(actual).__name__)} != torch's "
            f"{tuple(expected.shape)}"
        )
    if not actual.requires_grad:
        return _fail("output does not require grad: the op is not differentiable")
    try:  # torch's output takes an in-place op (ReLU(inplace=True), say); x*1 is exact
        actual = actual.mul_(1)
    except Exception as exc:
        return _fail(f"an in-place op on the output raised {_describe(exc)} (torch's takes one)")
    try:
        impl_grads = torch.autograd.grad(actual, impl_diff, grad, allow_unused=True)
    except Exception as exc:
        return _fail(f"impl backward raised {_describe(exc)}")
    dtype = DTYPES[case.dtype]
    exact = is_exact(case.op, dtype)
    names = [n for n, t in zip(_names(case), ref_in, strict=True) if t is not None]
    comparisons = []
    for name, g_impl, g_ref in zip(names, impl_grads, ref_grads, strict=True):
        if g_ref is None:
            g_ref = torch.zeros_like(ref_diff[names.index(name)])
        if g_impl is None:  # an unconnected input has a zero gradient
            g_impl = torch.zeros_like(g_ref, dtype=dtype)
        comparisons.append(compare(f"grad {name}", g_impl, g_ref, exact=exact, dtype=dtype))
    return _merge(comparisons)


def _indices(impl: Callable, case: Case, device: str) -> Outcome:
    return _forward(impl, case, device, {**case.kw, "return_indices": True})


def _tangent(fn: Callable, case: Case, device: str, upcast: bool = False) -> torch.Tensor | None:
    inputs = make_inputs(case, device)
    tangents = make_tangents(case, device)
    if upcast:
        inputs = [None if t is None else t.double() for t in inputs]
        tangents = [None if t is None else t.double() for t in tangents]
    with fwAD.dual_level():
        duals = [
            None if t is None else fwAD.make_dual(t, tt)
            for t, tt in zip(inputs, tangents, strict=True)
        ]
        out = _primary(fn(*duals, **case.kw))
        tangent = fwAD.unpack_dual(out).tangent
        return None if tangent is None else tangent.clone()


def _forward_ad(impl: Callable, case: Case, device: str) -> Outcome:
    try:
        expected = _tangent(TORCH_OPS[case.op], case, device, upcast_reference(case))
    except Exception as exc:
        if _not_supported(exc):
            return Outcome("skip", message=f"torch: {_describe(exc)}")
        return _fail(f"harness: torch forward AD failed: {_describe(exc)}")
    try:
        actual = _tangent(impl, case, device)
    except Exception as exc:
        return _fail(f"impl forward AD raised {_describe(exc)}")
    if actual is None:
        return _fail("impl output carries no tangent (forward AD unsupported or detached)")
    dtype = DTYPES[case.dtype]
    exact = is_exact(case.op, dtype)
    return _merge([compare("tangent", actual, expected, exact=exact, dtype=dtype)])


def _numerical(impl: Callable, case: Case, device: str, second_order: bool) -> Outcome:
    inputs = make_inputs(case, device, requires_grad=True)
    slots = [i for i, t in enumerate(inputs) if t is not None]
    kw = case.kw

    def fn(*diff: torch.Tensor) -> torch.Tensor:
        args = list(inputs)
        for i, t in zip(slots, diff, strict=True):
            args[i] = t
        return _primary(impl(*args, **kw))

    diff = tuple(inputs[i] for i in slots)
    try:
        if second_order:
            torch.autograd.gradgradcheck(
                fn, diff, check_fwd_over_rev=True, gen_non_contig_grad_outputs=True
            )
        else:
            torch.autograd.gradcheck(fn, diff, check_forward_ad=True, check_batched_grad=True)
    except Exception as exc:
        text = str(exc).strip().split("\n\n")[0]  # torch's generic advice follows
        what = "gradgradcheck" if second_order else "gradcheck"
        return _fail(f"{what} failed: {type(exc).__name__}: {text[:1500]}")
    return Outcome("pass")


def _errors(impl: Callable, case: Case, device: str) -> Outcome:
    try:
        TORCH_OPS[case.op](*make_inputs(case, device), **case.kw)
        expected = None
    except Exception as exc:
        expected = exc
    try:
        impl(*make_inputs(case, device), **case.kw)
        got = None
    except Exception as exc:
        got = exc
    if expected is None:
        if got is not None:
            return _fail(f"impl raised {_describe(got)}; torch accepts this configuration")
        return Outcome("pass", message="torch accepts this configuration")
    if got is None:
        return _fail(f"impl accepted a configuration torch rejects with {_describe(expected)}")
    if type(got) is not type(expected):
        return _fail(
            f"impl raised {_describe(got)}; torch raises {type(expected).__name__} "
            f"({_describe(expected)})"
        )
    if not str(got).strip():
        return _fail(f"impl raised {type(got).__name__} with an empty message")
    return Outcome("pass")


def _undefined(impl: Callable, case: Case, device: str) -> Outcome:
    try:
        impl(*make_inputs(case, device), **case.kw)
    except RuntimeError as exc:
        if str(exc).strip():
            return Outcome("pass")
        return _fail("impl raised RuntimeError with an empty message")
    except Exception as exc:
        return _fail(f"impl raised {_describe(exc)}, expected RuntimeError")
    return _fail(
        "impl returned a result for a max-pool window lying wholly in the padding "
        "(expected RuntimeError: there is no element to select)"
    )


def _dtypes(impl: Callable, case: Case, device: str) -> Outcome:
    """Forward (+ indices, + backward for floats) in ``case.dtype``.

    Floats are compared with torch's float64 result (:func:`upcast_reference`), integers
    with torch in the same dtype (integer-division semantics). A dtype torch does not
    implement on the device is skipped.
    """
    floating = DTYPES[case.dtype].is_floating_point
    if floating:
        try:
            with torch.no_grad():
                TORCH_OPS[case.op](*make_inputs(case, device), **case.kw)
        except Exception as exc:
            if _not_supported(exc):
                return Outcome("skip", message=f"torch: {_describe(exc)}")
    parts = [_forward(impl, case, device)]
    if case.op == "max_pool2d":
        parts.append(_indices(impl, case, device))
    if floating and parts[0].status == "pass":
        parts.append(_backward(impl, case, device))
    if any(p.status == "skip" for p in parts):
        return next(p for p in parts if p.status == "skip")
    failed = [p for p in parts if p.failed]
    return Outcome(
        "fail" if failed else "pass",
        max(p.abs_err for p in parts),
        max(p.rel_err for p in parts),
        "; ".join(p.message for p in failed),
    )


_RUNNERS: dict[str, Callable[[Callable, Case, str], Outcome]] = {
    "forward": _forward,
    "backward": _backward,
    "indices": _indices,
    "forward-ad": _forward_ad,
    "gradcheck": lambda impl, case, device: _numerical(impl, case, device, False),
    "gradgradcheck": lambda impl, case, device: _numerical(impl, case, device, True),
    "errors": _errors,
    "dtypes": _dtypes,
    "undefined": _undefined,
}


def run_check(check: str, impl: Callable, case: Case, device: str = "cpu") -> Outcome:
    """Run one check of ``impl`` against torch on ``case`` (see the module docstring).

    Never raises for a misbehaving implementation: its exceptions become failures.
    """
    if check not in _RUNNERS:
        raise ValueError(f"unknown check {check!r}; expected one of {CHECKS}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _RUNNERS[check](impl, case, device)
        except Exception as exc:  # an impl failing in an unexpected place
            return _fail(f"{check} raised {_describe(exc)}")


def assert_parity(impl: Callable, case: Case, check: str = "forward", device: str = "cpu") -> None:
    """pytest helper: run :func:`run_check` and raise ``AssertionError`` with a reproducer."""
    outcome = run_check(check, impl, case, device)
    if outcome.failed:
        from .shrink import impl_spec, render_snippet

        snippet = render_snippet(case, check, impl_spec(impl), device)
        raise AssertionError(f"{check} {case.id}: {outcome.message}\n\nReproducer:\n{snippet}")
