"""Shrink a failing case to a minimal one and render it as a ready-to-paste reproducer.

:func:`shrink` is greedy: it tries simpler variants of the case one at a time (smaller
batch, fewer channels, default arguments, smaller kernel/stride/padding/dilation, a
contiguous layout, small-integer values, a smaller image) and keeps the first variant that
is still valid for torch and still fails the same check, until no variant fails or the
time budget is spent.

:func:`render_snippet` writes a self-contained Python snippet: it imports the
implementation by ``module:function``, builds the exact tensors (literal values with
``as_strided`` for small cases, :func:`parity.cases.make_inputs` for big ones), calls torch
and the implementation, and fails with an ``AssertionError`` that shows the mismatch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .cases import (
    DTYPES,
    Case,
    Strided,
    case_storage,
    grad_storage,
    invalid_reason,
    make_inputs,
    tangent_storage,
)
from .checks import CHECKS, TORCH_OPS, Outcome, is_exact, run_check, tolerance, upcast_reference

__all__ = ["impl_spec", "render_snippet", "shrink"]

_LITERAL_LIMIT = 400  # storage elements up to which a snippet spells out the values
# every check that runs on one case's tensors ("errors" and "undefined" test calls, not values)
_SHRINKABLE = tuple(c for c in CHECKS if c not in ("errors", "undefined"))


# ----------------------------------------------------------------------------- shrinking


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _raw_simpler_values(key: str, value: Any, default: Any) -> Iterator[Any]:
    if key == "kernel_size":
        h, w = _pair(value)
        yield from (1, (h - 1, w), (h, w - 1), min(h, w), (min(h, w), min(h, w)))
        if h == w:
            yield h
        return
    if value == default:
        return
    yield default
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        for v in (value - 1, value // 2, value + 1 if value < 0 else None):
            if v is not None and v != value:
                yield v
        return
    if isinstance(value, tuple | list):
        if len(value) == 0:
            return
        h, w = _pair(value)
        if h == w:
            yield h
        yield from ((min(h, w), min(h, w)), (h - 1, w), (h, w - 1), (h, h), (w, w))


def _simpler_values(key: str, value: Any, default: Any) -> Iterator[Any]:
    """Simpler values of one keyword argument, most aggressive first.

    A value meaning the same as the current one is only offered as a simpler spelling
    (a tuple ``(k, k)`` becomes the int ``k``, never the other way round).
    """
    same = None if value is None or isinstance(value, str | bool) or value == () else _pair(value)
    for v in _raw_simpler_values(key, value, default):
        plain = v is None or isinstance(v, str | bool) or v == ()
        if not plain and same is not None and _pair(v) == same:
            if not (isinstance(v, int) and not isinstance(value, int)):
                continue
        yield v


def _shape_variants(case: Case) -> Iterator[Case]:
    shape = case.input_shape
    batched = len(shape) == 4
    if batched and shape[0] > 1:
        yield case.replace(input_shape=(1, *shape[1:]))
        yield case.replace(input_shape=(shape[0] - 1, *shape[1:]))
    if batched and shape[0] == 1:
        yield case.replace(input_shape=shape[1:])
    h, w = shape[-2:]
    for nh, nw in ((h // 2, w), (h, w // 2), (h - 1, w), (h, w - 1)):
        if nh >= 1 and nw >= 1 and (nh, nw) != (h, w):
            yield case.replace(input_shape=(*shape[:-2], nh, nw))
    c = shape[-3]
    if case.op != "conv2d":
        if c > 1:
            yield case.replace(input_shape=(*shape[:-3], 1, h, w))
            yield case.replace(input_shape=(*shape[:-3], c - 1, h, w))
        return
    o, cg, kh, kw = case.weight_shape
    groups = case.kw.get("groups", 1)

    def bias(n: int) -> tuple[int] | None:
        return None if case.bias_shape is None else (n,)

    if groups != 1:  # one group with the same per-group channels, or fewer groups
        for g in (1, groups - 1):
            if g >= 1:
                yield case.replace(
                    kwargs={**case.kw, "groups": g},
                    input_shape=(*shape[:-3], g * cg, h, w),
                    weight_shape=(g * (o // groups), cg, kh, kw),
                    bias_shape=bias(g * (o // groups)),
                )
    per_group_out = o // groups
    for og in (1, per_group_out - 1):
        if 1 <= og < per_group_out:
            yield case.replace(weight_shape=(groups * og, cg, kh, kw), bias_shape=bias(groups * og))
    for ncg in (1, cg - 1):
        if 1 <= ncg < cg:
            yield case.replace(
                input_shape=(*shape[:-3], groups * ncg, h, w), weight_shape=(o, ncg, kh, kw)
            )
    for nkh, nkw in ((1, 1), (kh - 1, kw), (kh, kw - 1)):
        if nkh >= 1 and nkw >= 1 and (nkh, nkw) != (kh, kw):
            yield case.replace(weight_shape=(o, cg, nkh, nkw))


_DEFAULTS = {
    "stride": None,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "ceil_mode": False,
    "return_indices": False,
    "count_include_pad": True,
    "divisor_override": None,
}


def _candidates(case: Case) -> Iterator[Case]:
    """Simpler variants of ``case``, roughly most simplifying first."""
    yield from _shape_variants(case)
    if case.bias_shape is not None:
        yield case.replace(bias_shape=None)
    for key, value in case.kwargs:
        if key == "groups":
            continue  # changed together with the shapes above
        default = 1 if (key == "stride" and case.op == "conv2d") else _DEFAULTS.get(key)
        for simpler in _simpler_values(key, value, default):
            kw = dict(case.kwargs)
            if simpler is None and key in ("stride", "divisor_override"):
                kw.pop(key)
            elif key != "kernel_size" and simpler == default:
                kw.pop(key)
            else:
                kw[key] = simpler
            yield case.replace(kwargs=kw)
    if case.layout != "contiguous":
        yield case.replace(layout="contiguous")
    if case.weight_layout != "contiguous":
        yield case.replace(weight_layout="contiguous")
    for kind in ("ties", "randn"):
        if case.kind != kind:
            yield case.replace(kind=kind)


def shrink(
    case: Case,
    check: str,
    impl: Callable,
    device: str = "cpu",
    budget_s: float = 10.0,
) -> tuple[Case, Outcome, int]:
    """Greedily shrink a failing ``case`` of ``check``; returns ``(case, outcome, steps)``.

    Only variants that torch accepts (:func:`~parity.cases.invalid_reason` is ``None``)
    and that still fail ``check`` are kept.  Rejected/undefined-configuration cases are
    returned unchanged (they are already minimal by construction).
    """
    outcome = run_check(check, impl, case, device)
    if check not in _SHRINKABLE or not outcome.failed:
        return case, outcome, 0
    deadline = time.monotonic() + budget_s
    seen = {case}
    steps = 0
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for cand in _candidates(case):
            if time.monotonic() >= deadline:
                break
            if cand in seen or cand.numel() > case.numel() * 2:
                continue
            seen.add(cand)
            try:
                if invalid_reason(cand) is not None:
                    continue
            except Exception:
                continue
            result = run_check(check, impl, cand, device)
            if result.failed and not result.message.startswith("harness:"):
                case, outcome, improved = cand, result, True
                steps += 1
                break
    return case, outcome, steps


# ----------------------------------------------------------------------------- snippets


def impl_spec(impl: Callable) -> str:
    """``module:qualname`` of a callable (best effort; ``<local>`` parts cannot be imported)."""
    spec = getattr(impl, "__parity_spec__", None)
    if spec:
        return spec
    module = getattr(impl, "__module__", None) or "__main__"
    name = getattr(impl, "__qualname__", None) or getattr(impl, "__name__", "impl")
    return f"{module}:{name}"


def _import_lines(spec: str) -> list[str]:
    module, _, name = spec.rpartition(":")
    if not module:
        module, name = spec, ""
    if "<" in name or module == "__main__":
        return [f"impl = ...  # your function ({spec}); it cannot be imported by name"]
    if module.endswith(".py") or "/" in module:
        return [
            "import importlib.util",
            "",
            f"_spec = importlib.util.spec_from_file_location('impl_module', {module!r})",
            "_module = importlib.util.module_from_spec(_spec)",
            "_spec.loader.exec_module(_module)",
            f"impl = _module.{name}",
        ]
    path = ['sys.path.insert(0, ".")  # parity imports --impl from the current dir']
    if "." in name:
        head, _, rest = name.partition(".")
        return [*path, f"from {module} import {head}  # noqa: E402", "", f"impl = {head}.{rest}"]
    return [*path, f"from {module} import {name} as impl  # noqa: E402"]


def _num(v: float | int) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    return str(v)


def _literal(s: Strided, device: str, requires_grad: bool = False) -> str:
    """``torch.tensor([...]).as_strided(...)``: the exact values, strides and offset."""
    floating = s.storage.is_floating_point()
    values = s.storage.double().tolist() if floating else s.storage.tolist()
    dev = f", device={device!r}" if device != "cpu" else ""
    src = "torch.float64" if floating else str(s.storage.dtype)
    expr = f"torch.tensor([{', '.join(_num(v) for v in values)}], dtype={src}{dev})"
    if floating and s.storage.dtype != torch.float64:
        expr += f".to({s.storage.dtype})"
    expr += f".as_strided({tuple(s.size)}, {tuple(s.stride)}, {s.offset})"
    if requires_grad and floating:
        expr += ".requires_grad_()"
    return expr


def _names(case: Case) -> list[str]:
    return ["x", "w", "b"] if case.op == "conv2d" else ["x"]


def _assign(names: list[str], expr: str) -> str:
    return f"{', '.join(names)}{',' if len(names) == 1 else ''} = {expr}"


def _is_literal(case: Case) -> bool:
    return sum(s.storage.numel() for s in case_storage(case) if s is not None) <= _LITERAL_LIMIT


def _tensor_lines(case: Case, requires_grad: bool, device: str) -> list[str]:
    names = _names(case)
    if _is_literal(case):
        return [
            f"{n} = None" if s is None else f"{n} = {_literal(s, device, requires_grad)}"
            for n, s in zip(names, case_storage(case), strict=True)
        ]
    rg = ", requires_grad=True" if requires_grad else ""
    return [
        "from parity.cases import Case, make_grad, make_inputs, make_tangents",
        "",
        f"case = {case!r}",
        _assign(names, f"make_inputs(case, {device!r}{rg})"),
    ]


def _dtype(case: Case) -> torch.dtype:
    return DTYPES[case.dtype]


def _check_helper(case: Case) -> list[str]:
    dtype = _dtype(case)
    exact = is_exact(case.op, dtype)
    rtol, atol0 = (0.0, 0.0) if exact else tolerance(dtype)
    return [
        "",
        f"def check(name, actual, expected, dtype={dtype}):",
        '    """parity\'s rule: |a - e| <= atol0 * max(1, max|e|) + rtol * |e|, NaN == NaN."""',
        "    assert isinstance(actual, torch.Tensor) and actual.dtype == dtype, (name, actual)",
        "    if expected.is_floating_point():  # compare in float64 (the reference may be)",
        "        actual, expected = actual.double(), expected.double()",
        "    finite = expected[expected.isfinite()] if expected.is_floating_point() else expected",
        "    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0",
        "    if actual.shape == expected.shape and actual.numel():",
        "        diff = (actual - expected).abs().nan_to_num().max().item()",
        "        print(f'{name}: max |impl - torch| = {diff:.3g}')",
        "    torch.testing.assert_close(",
        f"        actual, expected, rtol={rtol!r}, atol={atol0!r} * scale, equal_nan=True,",
        "        msg=lambda m: f'{name}: {m}',",
        "    )",
        "",
        "",
    ]


def _raises_snippet(case: Case, check: str, device: str) -> list[str]:
    body = _tensor_lines(case, False, device)
    call_t, call_i = _call(f"F.{case.op}", case), _call("impl", case)
    if check == "errors":
        return body + [
            "try:",
            f"    {call_t}",
            "    expected = None",
            "except Exception as exc:",
            "    expected = exc",
            "print('torch raises:', repr(expected))",
            "try:",
            f"    {call_i}",
            "except Exception as exc:",
            "    print('impl raises: ', repr(exc))",
            "    assert type(exc) is type(expected), 'impl raises a different exception type'",
            "    assert str(exc).strip(), 'empty error message'",
            "else:",
            "    raise AssertionError(f'impl accepts a configuration torch rejects: {expected!r}')",
        ]
    return body + [
        "# A max-pool window lies wholly in the padding: torch's own CPU kernel reads out of",
        "# bounds here, so an implementation is expected to raise RuntimeError.",
        "try:",
        f"    {call_i}",
        "except RuntimeError as exc:",
        "    print('impl raises RuntimeError:', exc)",
        "else:",
        "    raise AssertionError('impl returned a result; expected RuntimeError')",
    ]


def _numerical_snippet(case: Case, check: str, device: str) -> list[str]:
    names = ", ".join(_names(case)) + ("," if case.op != "conv2d" else "")
    call = (
        "torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_grad=True)"
        if check == "gradcheck"
        else "torch.autograd.gradgradcheck(fn, inputs, check_fwd_over_rev=True, "
        "gen_non_contig_grad_outputs=True)"
    )
    return _tensor_lines(case, True, device) + [
        f"inputs = tuple(t for t in ({names}) if t is not None)",
        "",
        "",
        "def fn(*diff):",
        "    it = iter(diff)",
        f"    args = [None if t is None else next(it) for t in ({names})]",
        "    out = impl(*args, **kwargs)",
        "    return out[0] if isinstance(out, tuple) else out",
        "",
        "",
        call,
    ]


def _forward_ad_snippet(case: Case, device: str) -> list[str]:
    names = _names(case)
    tnames = ["t" + n for n in names]
    body = _check_helper(case) + _tensor_lines(case, False, device)
    if _is_literal(case):
        body += [
            f"{n} = None" if s is None else f"{n} = {_literal(s, device)}"
            for n, s in zip(tnames, tangent_storage(case), strict=True)
        ]
    else:
        body.append(_assign(tnames, f"make_tangents(case, {device!r})"))
    return body + [
        "",
        "",
        "def tangent(fn, upcast=False):",
        f"    primals, tangents = ({', '.join(names)},), ({', '.join(tnames)},)",
        "    if upcast:  # the reference: torch in float64 on the same values",
        "        primals, tangents = ([None if t is None else t.double() for t in ts]",
        "                             for ts in (primals, tangents))",
        "    with fwAD.dual_level():",
        "        duals = [None if p is None else fwAD.make_dual(p, t)",
        "                 for p, t in zip(primals, tangents)]",
        "        out = fn(*duals, **kwargs)",
        "        out = out[0] if isinstance(out, tuple) else out",
        "        return fwAD.unpack_dual(out).tangent",
        "",
        "",
        f"check('tangent', tangent(impl), tangent(F.{case.op}, {upcast_reference(case)}))",
    ]


def _values_snippet(case: Case, backward: bool, device: str, upcast: bool) -> list[str]:
    """Forward (+ backward) of impl vs torch; ``upcast``: torch runs in float64."""
    op = case.op
    names = _names(case)
    args = ", ".join(names)
    tuple_out = bool(case.kw.get("return_indices"))
    body = _check_helper(case) + _tensor_lines(case, backward, device)
    if not backward:
        body.append(f"{names[0]}_before = {names[0]}.clone()")
    if upcast:
        body += [
            "# reference: torch in float64 on the same values (the exact answer)",
            "ref_args = [",
            "    None if t is None else t.detach().double().requires_grad_(t.requires_grad)",
            f"    for t in ({args},)",
            "]",
            f"expected = F.{op}(*ref_args, **kwargs)",
        ]
    else:
        body += [f"ref_args = [{args}]", f"expected = {_call(f'F.{op}', case)}"]
    body.append(f"actual = {_call('impl', case)}")
    if tuple_out:
        body += [
            "check('indices', actual[1], expected[1], torch.int64)",
            "expected, actual = expected[0], actual[0]",
        ]
    body.append("check('output', actual, expected)")
    if not backward:
        body.append(
            f"check('input left unmodified', {names[0]}, {names[0]}_before, {names[0]}.dtype)"
        )
        return body
    g = grad_storage(case, _output_shape(case))
    g_expr = (
        _literal(g, device)
        if _is_literal(case)
        else f"make_grad(case, {tuple(g.size)}, {device!r})"
    )
    labels = ["input", "weight", "bias"][: len(names)]
    body += [
        f"grad = {g_expr}",
        f"present = [i for i, t in enumerate(({args},)) if t is not None]",
        f"leaves = [({args},)[i] for i in present]",
        "ref_leaves = [ref_args[i] for i in present]",
        "expected_grads = torch.autograd.grad(",
        f"    expected, ref_leaves, grad{'.double()' if upcast else ''}, allow_unused=True",
        ")",
        "# through an in-place op on the output (ReLU(inplace=True), say): torch's takes one",
        "actual_grads = torch.autograd.grad(actual.mul_(1), leaves, grad, allow_unused=True)",
        f"labels = {labels!r}",
        "for i, ga, ge in zip(present, actual_grads, expected_grads):",
        "    check(f'grad {labels[i]}', ga, ge)",
    ]
    return body


def _call(fn: str, case: Case) -> str:
    return f"{fn}({', '.join(_names(case))}, **kwargs)"


def render_snippet(case: Case, check: str, spec: str, device: str = "cpu") -> str:
    """A ready-to-paste Python snippet that reproduces ``check`` failing on ``case``.

    It raises ``AssertionError`` (or the implementation's own exception) when the failure
    reproduces; run it from the directory ``--impl`` was resolved from.
    """
    kwargs = case.kw
    if check == "indices" or (check == "dtypes" and case.op == "max_pool2d"):
        kwargs = {**kwargs, "return_indices": True}
    header = [
        f"# parity reproducer -- {case.op} / {check}: {case.id}",
        "import sys",
        "",
        "import torch",
        "import torch.nn.functional as F",
    ]
    if check == "forward-ad":
        header.append("import torch.autograd.forward_ad as fwAD")
    header += [
        "",
        *_import_lines(spec),
        "",
        "nan, inf = float('nan'), float('inf')",
        f"kwargs = {kwargs!r}",
    ]
    case = case.replace(kwargs=kwargs)
    if check in ("errors", "undefined"):
        body = _raises_snippet(case, check, device)
    elif check in ("gradcheck", "gradgradcheck"):
        body = _numerical_snippet(case, check, device)
    elif check == "forward-ad":
        body = _forward_ad_snippet(case, device)
    else:
        floating_dtypes = check == "dtypes" and _dtype(case).is_floating_point
        backward = check == "backward" or floating_dtypes
        body = _values_snippet(case, backward, device, upcast=upcast_reference(case))
    return "\n".join(header + [""] + body) + "\n"


def _output_shape(case: Case) -> tuple[int, ...]:
    out = TORCH_OPS[case.op](*make_inputs(case), **case.kw)
    out = out[0] if isinstance(out, tuple) else out
    return tuple(out.shape)
