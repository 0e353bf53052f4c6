"""The explicit-loop NumPy reference (`handmade.reference`) against torch and against handmade.

A three-way check on the shared generator's quick float64 cases (:func:`parity.cases.generate`:
curated edge cases in every value kind -- ties, NaN/inf, all ``-inf`` windows -- and layout,
plus a seeded random sweep). For each case the reference computes the forward pass and every
gradient once, from NumPy copies of the inputs and upstream gradient; then
``torch.nn.functional`` (which validates the reference) and ``handmade.functional`` (validated
by an oracle that shares no code with it) must match it under the one comparison helper,
:func:`parity.checks.compare`: float64 to 1e-10, max-pool values, indices and gradients
bit-for-bit, NaN/inf positions identical.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import handmade.functional as HF
from handmade import reference as ref
from parity.cases import Case, generate, make_grad, make_inputs
from parity.checks import compare, is_exact

IMPLS = {"torch": F, "handmade": HF}
CASES = [case for op in ("conv2d", "max_pool2d", "avg_pool2d") for case in generate(op, "quick")]


def _batched(a: np.ndarray, unbatched: bool) -> np.ndarray:
    return a[None] if unbatched else a


def _ref_conv_kwargs(case: Case) -> dict[str, Any]:
    """The case's conv kwargs with string paddings resolved by :func:`ref.same_padding`."""
    kw = case.kw
    padding = kw.get("padding", 0)
    if padding == "same":
        padding = ref.same_padding(case.weight_shape[2:], kw.get("dilation", 1))
    elif padding == "valid":
        padding = 0
    return {**kw, "padding": padding}


@functools.cache
def reference_results(case: Case) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(outputs, grads)`` of the reference as float64 tensors, keyed by name.

    ``outputs``: ``"output"`` (and ``"indices"`` for max-pool); ``grads``: ``"input"``,
    ``"weight"``, ``"bias"`` (conv) for the case's upstream gradient (:func:`make_grad`).
    """
    unbatched = len(case.input_shape) == 3
    arrays = [None if t is None else t.numpy() for t in make_inputs(case)]
    x = _batched(arrays[0], unbatched)
    kw = {k: v for k, v in case.kw.items() if k != "return_indices"}
    outputs: dict[str, np.ndarray] = {}
    if case.op == "conv2d":
        conv_kw = _ref_conv_kwargs(case)
        outputs["output"] = ref.conv2d_forward(x, arrays[1], arrays[2], **conv_kw)
    elif case.op == "max_pool2d":
        outputs["output"], outputs["indices"] = ref.max_pool2d_forward(x, **kw)
    else:
        outputs["output"] = ref.avg_pool2d_forward(x, **kw)

    out_shape = outputs["output"].shape[1:] if unbatched else outputs["output"].shape
    gy = _batched(make_grad(case, tuple(out_shape)).numpy(), unbatched)
    grads: dict[str, np.ndarray] = {}
    if case.op == "conv2d":
        grads["input"], grads["weight"], bias_grad = ref.conv2d_backward(
            x, arrays[1], gy, **conv_kw
        )
        if arrays[2] is not None:
            grads["bias"] = bias_grad
    elif case.op == "max_pool2d":
        grads["input"] = ref.max_pool2d_backward(gy, outputs["indices"], x.shape)
    else:
        grads["input"] = ref.avg_pool2d_backward(gy, x.shape, **kw)

    def to_tensor(name: str, a: np.ndarray) -> torch.Tensor:
        if unbatched and name in ("output", "indices", "input"):
            a = a[0]
        return torch.from_numpy(np.ascontiguousarray(a))

    return (
        {k: to_tensor(k, v) for k, v in outputs.items()},
        {k: to_tensor(k, v) for k, v in grads.items()},
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case: Case, impl: str) -> None:
    """Forward, max-pool indices and all gradients of ``impl`` equal the reference's."""
    expected_out, expected_grads = reference_results(case)
    inputs = make_inputs(case, requires_grad=True)
    kw = {**case.kw, "return_indices": True} if case.op == "max_pool2d" else case.kw
    out = getattr(IMPLS[impl], case.op)(*inputs, **kw)
    outputs = dict(zip(expected_out, out if isinstance(out, tuple) else (out,), strict=True))
    names = ["input", "weight", "bias"][: len(inputs)]
    leaves = {n: t for n, t in zip(names, inputs, strict=True) if t is not None}
    grads = torch.autograd.grad(
        outputs["output"],
        list(leaves.values()),
        make_grad(case, tuple(outputs["output"].shape)),
        allow_unused=True,
    )
    exact = is_exact(case.op, torch.float64)
    comparisons = [
        compare(name, outputs[name], expected, exact=exact or name == "indices")
        for name, expected in expected_out.items()
    ]
    for name, grad in zip(leaves, grads, strict=True):
        actual = torch.zeros_like(leaves[name]) if grad is None else grad
        comparisons.append(compare(f"grad {name}", actual, expected_grads[name], exact=exact))
    failures = [c.message for c in comparisons if not c.ok]
    assert not failures, f"{impl} vs reference on {case.id}: " + "; ".join(failures)


def test_max_pool2d_tie_breaking_rule() -> None:
    """The documented scan rule, on single crafted windows, agrees with torch's CPU kernel."""
    nan, inf = np.nan, np.inf
    windows = {
        "first max wins a tie": ([1, 2, 2, 0, 2, 0, 0, 0, 0], 1),
        "last NaN wins": ([nan, 3, 2, 9, 5, nan, 0, nan, 0], 7),
        "NaN beats +inf": ([inf, nan, 3, inf, 0, 0, 0, 0, 0], 1),
        "all -inf: first position": ([-inf] * 9, 0),
    }
    for what, (values, winner) in windows.items():
        x = np.array(values, dtype=np.float64).reshape(1, 1, 3, 3)
        _, idx_ref = ref.max_pool2d_forward(x, 3)
        _, idx = F.max_pool2d(torch.from_numpy(x), 3, return_indices=True)
        assert idx_ref.item() == idx.item() == winner, what


def test_max_pool2d_padded_all_neginf_reports_first_in_bounds() -> None:
    """With padding, an all ``-inf`` window reports its first in-bounds position, like torch."""
    x = np.full((1, 1, 5, 5), -np.inf)
    _, idx_ref = ref.max_pool2d_forward(x, 3, stride=2, padding=1)
    _, idx = F.max_pool2d(torch.from_numpy(x), 3, stride=2, padding=1, return_indices=True)
    np.testing.assert_array_equal(idx_ref, idx.numpy())
    assert idx_ref[0, 0, 0, 0] == 0 and idx_ref[0, 0, 1, 1] == 1 * 5 + 1


def test_same_padding_matches_torch_split() -> None:
    """``same_padding`` reproduces torch's 'same' (extra row/column on the bottom/right)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 7, 7))
    for kernel, dilation in [((4, 2), (1, 1)), ((4, 3), (1, 2)), ((2, 5), (3, 1))]:
        w = rng.standard_normal((1, 1, *kernel))
        expected = F.conv2d(
            torch.from_numpy(x), torch.from_numpy(w), padding="same", dilation=dilation
        )
        pads = ref.same_padding(kernel, dilation)
        assert pads[1] - pads[0] in (0, 1) and pads[3] - pads[2] in (0, 1)
        got = ref.conv2d_forward(x, w, padding=pads, dilation=dilation)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-10, atol=1e-10)
