"""handmade vs torch over the generated sweep: hundreds of configurations per op and check.

Every test is one call of the harness's single comparison helper,
:func:`parity.checks.assert_parity`, on a case from the single generator
:mod:`parity.cases` (the cases ``python -m parity --quick`` runs).  A failure prints the
harness message and a ready-to-paste reproducer.  The hypothesis tests at the end draw
configurations of their own and let hypothesis shrink any failure.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import handmade.functional as HF
from parity import cases as C
from parity.checks import applies, assert_parity, run_check
from parity.runner import plan

SEED = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(checks: tuple[str, ...]) -> list:
    """(op, check, case) for every task of the quick plan, with readable ids."""
    params = []
    for task in plan(C.OPS, checks, "quick", SEED):
        for case in task.cases:
            params.append(pytest.param(task.check, case, id=f"{task.label}-{case.id}"))
    return params


def _impl(op: str):
    return getattr(HF, op)


@pytest.mark.parametrize(("check", "case"), _params(("forward", "backward", "indices")))
def test_values_and_gradients(check: str, case: C.Case) -> None:
    assert_parity(_impl(case.op), case, check)


@pytest.mark.parametrize(("check", "case"), _params(("forward-ad",)))
def test_forward_ad(check: str, case: C.Case) -> None:
    assert_parity(_impl(case.op), case, check)


@pytest.mark.parametrize(("check", "case"), _params(("gradcheck", "gradgradcheck")))
def test_numerical_gradients(check: str, case: C.Case) -> None:
    assert_parity(_impl(case.op), case, check)


@pytest.mark.parametrize(("check", "case"), _params(("errors", "undefined")))
def test_rejected_configurations(check: str, case: C.Case) -> None:
    assert_parity(_impl(case.op), case, check)


@pytest.mark.parametrize(("check", "case"), _params(("dtypes",)))
def test_other_dtypes(check: str, case: C.Case) -> None:
    assert_parity(_impl(case.op), case, check)


# ----------------------------------------------------------------------------- the generator


@pytest.mark.parametrize("op", C.OPS)
def test_sweep_is_large_deterministic_and_covers_the_space(op: str) -> None:
    quick = C.generate(op, "quick", SEED)
    assert len(quick) >= 150 and len(set(quick)) == len(quick)
    assert quick == C.generate(op, "quick", SEED)
    assert quick != C.generate(op, "quick", SEED + 1)
    assert len(C.generate(op, "full", SEED)) >= 1000
    kinds = {c.kind for c in quick}
    layouts = {c.layout for c in quick}
    assert kinds == set(C.KINDS) and layouts == set(C.LAYOUTS)
    assert any(len(c.input_shape) == 3 for c in quick), "unbatched"
    assert any(c.input_shape[0] == 1 for c in quick if len(c.input_shape) == 4), "batch 1"
    assert any(c.input_shape[-2:] == (1, 1) for c in quick), "1-pixel input"
    keys = {k for c in quick for k, _ in c.kwargs}
    expected = {
        "conv2d": {"stride", "padding", "dilation", "groups"},
        "max_pool2d": {
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "ceil_mode",
            "return_indices",
        },
        "avg_pool2d": {
            "kernel_size",
            "stride",
            "padding",
            "ceil_mode",
            "count_include_pad",
            "divisor_override",
        },
    }[op]
    assert expected <= keys


def test_conv_sweep_covers_padding_forms_and_groups() -> None:
    cases = C.generate("conv2d", "quick", SEED)
    paddings = [c.kw.get("padding", 0) for c in cases]
    assert {"same", "valid"} <= {p for p in paddings if isinstance(p, str)}
    assert any(isinstance(p, tuple) and len(p) == 2 and p[0] != p[1] for p in paddings)
    assert any(c.kw.get("padding") == "same" and c.weight_shape[2] % 2 == 0 for c in cases)
    assert any(c.kw.get("groups", 1) == c.input_shape[-3] > 1 for c in cases), "depthwise"
    assert {c.bias_shape is None for c in cases} == {True, False}
    assert {c.weight_layout for c in cases} >= {"contiguous", "channels_last", "sliced"}


def test_inputs_are_bit_identical_across_calls() -> None:
    for case in C.generate("conv2d", "quick", SEED)[::7]:
        first, second = C.make_inputs(case), C.make_inputs(case)
        for a, b in zip(first, second, strict=True):
            if a is None:
                assert b is None
                continue
            assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
            assert torch.equal(a.nan_to_num(), b.nan_to_num())
            assert torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("op", C.OPS)
def test_every_rejected_case_is_rejected_by_torch(op: str) -> None:
    for case in C.rejected_cases(op):
        with pytest.raises((RuntimeError, TypeError, ValueError, IndexError)):
            getattr(F, op)(*C.make_inputs(case), **case.kw)


def _windows_in_padding(size: int, k: int, s: int, p: int, d: int, out: int) -> bool:
    return any(all(not 0 <= o * s - p + i * d < size for i in range(k)) for o in range(out))


def test_undefined_cases_are_exactly_the_wholly_padded_windows() -> None:
    """The geometry rule, checked against an explicit enumeration of every window."""
    for case in C.undefined_cases("full", SEED) + C.generate("max_pool2d", "quick", SEED):
        kw = case.kw
        kernel, stride, padding, dilation = C.pool_params(kw)
        hits = False
        for axis in (0, 1):
            size = case.input_shape[-2 + axis]
            out = C.pool_output_size(
                size,
                kernel[axis],
                stride[axis],
                padding[axis],
                dilation[axis],
                bool(kw.get("ceil_mode", False)),
            )
            hits |= _windows_in_padding(
                size, kernel[axis], stride[axis], padding[axis], dilation[axis], out
            )
        assert hits == (case.expect == "undefined"), case.id


# ----------------------------------------------------------------------------- hypothesis


def _pair(draw, lo: int, hi: int):
    h, w = draw(st.integers(lo, hi)), draw(st.integers(lo, hi))
    return draw(st.sampled_from([h, (h, w)])) if h == w else (h, w)


@st.composite
def conv_cases(draw) -> C.Case:
    groups = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kwargs = {"stride": _pair(draw, 1, 3), "dilation": _pair(draw, 1, 3), "groups": groups}
    kwargs["padding"] = draw(
        st.sampled_from(
            ["valid", _pair(draw, 0, 3)] + (["same"] if kwargs["stride"] in (1, (1, 1)) else [])
        )
    )
    shape = (
        draw(st.integers(1, 3)),
        groups * cg,
        draw(st.integers(1, 10)),
        draw(st.integers(1, 10)),
    )
    return C.Case(
        "conv2d",
        tuple(kwargs.items()),
        shape,
        (groups * og, cg, kh, kw),
        (groups * og,) if draw(st.booleans()) else None,
        kind=draw(st.sampled_from(C.KINDS)),
        layout=draw(st.sampled_from(C.LAYOUTS)),
        weight_layout=draw(st.sampled_from(C.LAYOUTS[:4])),
        seed=draw(st.integers(0, 2**20)),
    )


@st.composite
def pool_cases(draw, op: str) -> C.Case:
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kwargs = {
        "kernel_size": (kh, kw),
        "stride": draw(st.one_of(st.none(), st.integers(1, 3))),
        "padding": (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))),
        "ceil_mode": draw(st.booleans()),
    }
    if op == "max_pool2d":
        kwargs["dilation"] = _pair(draw, 1, 3)
    else:
        kwargs["count_include_pad"] = draw(st.booleans())
        kwargs["divisor_override"] = draw(st.one_of(st.none(), st.integers(1, 6)))
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 10)),
        draw(st.integers(1, 10)),
    )
    return C.Case(
        op,
        tuple(kwargs.items()),
        shape,
        kind=draw(st.sampled_from(C.KINDS)),
        layout=draw(st.sampled_from(C.LAYOUTS)),
        seed=draw(st.integers(0, 2**20)),
    )


_HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)


def _valid(case: C.Case) -> bool:
    return C.invalid_reason(case) is None and math.prod(case.input_shape) > 0


@_HYPOTHESIS
@given(case=conv_cases().filter(_valid), check=st.sampled_from(["forward", "backward"]))
def test_conv2d_property(case: C.Case, check: str) -> None:
    assert_parity(HF.conv2d, case, check)


@_HYPOTHESIS
@given(
    case=pool_cases("max_pool2d").filter(_valid),
    check=st.sampled_from(["forward", "backward", "indices"]),
)
def test_max_pool2d_property(case: C.Case, check: str) -> None:
    assert_parity(HF.max_pool2d, case, check)


@_HYPOTHESIS
@given(
    case=pool_cases("avg_pool2d").filter(_valid),
    check=st.sampled_from(["forward", "backward", "forward-ad"]),
)
def test_avg_pool2d_property(case: C.Case, check: str) -> None:
    assert_parity(HF.avg_pool2d, case, check)


def test_harness_flags_a_tiny_relative_error() -> None:
    """The float64 tolerance is tight: a relative error of 1e-9 in one output fails."""
    case = C.generate("avg_pool2d", "quick", SEED)[1]

    def off_by_a_little(*args, **kwargs):
        out = F.avg_pool2d(*args, **kwargs)
        return out * (1 + 1e-9)

    assert run_check("forward", F.avg_pool2d, case).status == "pass"
    assert run_check("forward", off_by_a_little, case).failed
    assert applies("indices", "max_pool2d") and not applies("indices", "conv2d")
