"""Each way handmade's conv2d can compute a pass agrees with torch, whole and in chunks.

conv2d picks a GEMM layout per shape and splits large batches into chunks (see
:mod:`handmade.conv`); the parity sweep's small shapes reach some layouts only by chance
and never split a batch.  Here every case names the functions that must compute its
forward and its backward (a spy records them, so a changed dispatch rule fails the test
instead of silently leaving a layout untested), and runs once whole and once with the
buffer budgets shrunk so that every batch of 5 is split.  Forward and every gradient are
compared with torch's in float64.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import handmade._gemm as gemm
import handmade.conv as conv
import handmade.functional as H
import handmade.nn as HN
from parity._io import intra_op_threads
from parity.checks import compare

tap_runs = conv.tap_runs

# the functions that do a pass's work, one per layout
LAYOUTS = (
    "depthwise_table",  # per chunk, in depthwise_correlate and depthwise_grads
    "depthwise_correlate_taps",  # the forward under forward-mode AD only
    "depthwise_grads",
    "_correlate_sample_rows",
    "_correlate_rows",
    "_correlate_stacked_rows",
    "_correlate_columns",
    "conv_weight_grad_sample_rows",
    "conv_weight_grad_stacked_rows",
    "conv_weight_grad_rows",
    "conv_weight_grad_columns",
    "conv_input_grad_columns",
    "conv_input_grad_columns_nhwc",
    "conv_input_grad_stacked_rows",
    "conv_input_grad_scatter",
    "winograd_input_tiles",  # per chunk, for each of winograd_correlate, winograd_weight_grad
    "phase_rows",  # per chunk, for each of _correlate_phase_rows, conv_weight_grad_phase_rows
    "conv_weight_grad_phase_rows",
    "columns_nhwc",  # per chunk, for each of _correlate_columns_nhwc, its dL/dw
    "conv_weight_grad_columns_nhwc",
    "conv_weight_grad_columns_nchw",
    "_correlate_sample_columns",
    "pointwise_correlate",
    "pointwise_grads",
)

# name: input shape, weight shape, conv2d kwargs, forward layout, backward layouts (or a
# pair of them: with the batch whole, and with it split into chunks)
CASES: dict[str, tuple[tuple, tuple, dict[str, Any], str, set[str] | tuple[set[str], set[str]]]] = {
    "thin rows (LeNet conv1): forward stacked, dL/dw stacked g-first in row pairs": (
        (5, 1, 12, 12),
        (3, 1, 5, 5),
        dict(padding=2),
        "_correlate_stacked_rows",
        # dL/dx: the literal correlation, whose rotated kernel (rows 3 channels x 5) stacks
        {"_correlate_stacked_rows", "conv_weight_grad_stacked_rows"},
    ),
    "thin rows, odd output height: row pairs, then the rows left one by one": (
        (2, 1, 9, 7),
        (2, 1, 3, 3),
        {},
        "_correlate_stacked_rows",
        {"conv_input_grad_stacked_rows", "conv_weight_grad_stacked_rows"},
    ),
    "thin rows, per sample, groups + dilation + width stride": (
        (5, 4, 11, 12),
        (4, 2, 3, 3),
        dict(groups=2, dilation=(2, 1), stride=(1, 2), padding=1),
        "_correlate_sample_rows",
        {"conv_input_grad_columns", "conv_weight_grad_sample_rows"},
    ),
    "stacked kernel rows, same size": (
        (5, 8, 10, 10),
        (6, 8, 3, 3),
        dict(padding=1),
        "_correlate_stacked_rows",
        {"_correlate_stacked_rows", "conv_weight_grad_stacked_rows"},
    ),
    "stacked kernel rows, shrinking (LeNet conv2)": (
        (5, 6, 14, 14),
        (16, 6, 5, 5),
        {},
        "_correlate_stacked_rows",
        {"conv_input_grad_stacked_rows", "conv_weight_grad_stacked_rows"},
    ),
    "stacked kernel rows, shrinking, padded, width dilation": (
        (5, 6, 12, 12),
        (4, 6, 5, 3),
        dict(padding=(1, 2), dilation=(1, 2)),
        "_correlate_stacked_rows",
        {"conv_input_grad_stacked_rows", "conv_weight_grad_stacked_rows"},
    ),
    "width-only rows, wide kernel rows (24 channels x 3: one GEMM per kernel row)": (
        (5, 24, 8, 8),
        (6, 24, 3, 3),
        dict(padding=1),
        "_correlate_rows",
        {"_correlate_columns", "conv_weight_grad_rows"},  # dL/dx: 24 outputs of 6 inputs
    ),
    "width-only rows, height dilation (no stacking)": (
        (5, 8, 10, 10),
        (6, 8, 3, 3),
        dict(padding=2, dilation=2),
        "_correlate_rows",
        {"_correlate_rows", "conv_weight_grad_rows"},
    ),
    "full columns, one GEMM per sample": (
        (5, 4, 48, 48),
        (6, 4, 3, 3),
        dict(stride=2, padding=1),
        "_correlate_columns",
        {"conv_input_grad_columns", "conv_weight_grad_columns"},
    ),
    "full columns, batch inside": (
        (5, 4, 9, 9),
        (6, 4, 3, 3),
        dict(stride=2, padding=1),
        "_correlate_columns",
        {"conv_input_grad_columns", "conv_weight_grad_columns"},
    ),
    "full columns, unpadded (col2im straight into each chunk's slice)": (
        (5, 4, 9, 9),
        (6, 4, 3, 3),
        dict(stride=2),
        "_correlate_columns",
        {"conv_input_grad_columns", "conv_weight_grad_columns"},
    ),
    "1x1": (
        (5, 6, 7, 7),
        (4, 6, 1, 1),
        {},
        "_correlate_columns",
        {"_correlate_columns", "conv_weight_grad_columns"},
    ),
    "Winograd F(2x2, 3x3), same size: forward, dL/dx and dL/dw": (
        (5, 128, 10, 10),
        (128, 128, 3, 3),
        dict(padding=1),
        "winograd_input_tiles",
        {"winograd_input_tiles"},
    ),
    "Winograd, odd output rows (the last tiles overhang), shrinking": (
        (5, 128, 13, 12),
        (128, 128, 3, 3),
        dict(padding=(0, 1)),
        "winograd_input_tiles",
        {"winograd_input_tiles", "conv_input_grad_scatter"},
    ),
    "depthwise, same size (the bench's MobileNet geometry)": (
        (5, 4, 7, 9),
        (4, 1, 3, 3),
        dict(groups=4, padding=1),
        "depthwise_table",
        {"depthwise_grads", "depthwise_table"},
    ),
    "depthwise, same size, dilated, even kernel width (uneven 'same' padding)": (
        (5, 3, 8, 7),
        (3, 1, 3, 4),
        dict(groups=3, padding="same", dilation=(2, 1)),
        "depthwise_table",
        {"depthwise_grads", "depthwise_table"},
    ),
    "depthwise, strided": (
        (5, 3, 9, 9),
        (3, 1, 3, 3),
        dict(groups=3, stride=2, padding=1),
        "depthwise_table",
        {"depthwise_grads", "depthwise_table"},
    ),
    "channel multiplier (one input, three outputs per group: not depthwise)": (
        (5, 2, 10, 9),
        (6, 1, 3, 2),
        dict(groups=2, dilation=(2, 1), padding=(2, 0)),
        "_correlate_sample_rows",
        {"conv_input_grad_scatter", "conv_weight_grad_sample_rows"},
    ),
    "depthwise, dilated, padding beyond the full one's (g cropped)": (
        (5, 4, 8, 9),
        (4, 1, 3, 3),
        dict(groups=4, dilation=(1, 2), padding=(1, 5)),
        "depthwise_table",
        {"depthwise_grads", "depthwise_table"},
    ),
}

# no buffer larger than the input: nothing to split
UNBUFFERED = {"1x1"}


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the layout functions called, in order."""
    calls: list[str] = []
    for name in LAYOUTS:
        original = getattr(conv, name)

        @functools.wraps(original)
        def recorded(*args: Any, _original=original, _name=name, **kwargs: Any) -> Any:
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(conv, name, recorded)
    return calls


@pytest.mark.parametrize("split", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", CASES)
def test_each_layout_matches_torch(
    case: str, split: bool, spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    *geometry, forward_layout, backward_layouts = CASES[case]
    if isinstance(backward_layouts, tuple):
        backward_layouts = backward_layouts[split]
    check_layouts(
        *geometry, forward_layout, backward_layouts, split, case in UNBUFFERED, spy, monkeypatch
    )


# The channels-last layouts (phase rows, NHWC col2im) run where oneDNN multiplies (float32
# on the CPU); here they are forced for float64, whose products torch's own ``linear`` computes.
PHASE_CASES: dict[str, tuple[tuple, tuple, dict[str, Any], str, set[str]]] = {
    "phase rows, same size (ResNet 3x3): dL/dx the literal correlation": (
        (5, 24, 8, 9),
        (24, 24, 3, 3),
        dict(padding=1),
        "phase_rows",
        {"phase_rows", "conv_weight_grad_phase_rows"},
    ),
    "phase rows, stride 2 (two phases): dL/dx as col2im": (
        (5, 24, 9, 10),
        (6, 24, 3, 3),
        dict(stride=2, padding=1),
        "phase_rows",
        {"conv_input_grad_columns_nhwc", "phase_rows", "conv_weight_grad_phase_rows"},
    ),
    "phase rows, stride (3, 2), height dilation 2, uneven padding, 2x4 kernel": (
        (5, 16, 13, 11),
        (3, 16, 2, 4),
        dict(stride=(3, 2), dilation=(2, 1), padding=(2, 1)),
        "phase_rows",
        {"conv_input_grad_columns_nhwc", "phase_rows", "conv_weight_grad_phase_rows"},
    ),
    "phase rows, dilated 2, same size (22 outputs: the rotated kernel's rows are wide too)": (
        (5, 24, 9, 8),
        (22, 24, 3, 3),
        dict(padding=2, dilation=2),
        "phase_rows",
        {"phase_rows", "conv_weight_grad_phase_rows"},
    ),
}


# the same cases on the full channels-last columns, the phase rows' names replaced
FULL_COLUMNS = {
    "phase_rows": "columns_nhwc",
    "conv_weight_grad_phase_rows": "conv_weight_grad_columns_nhwc",
}

# ... and with their dL/dw on NCHW columns
NCHW_WEIGHT_GRAD = {"conv_weight_grad_columns_nhwc": "conv_weight_grad_columns_nchw"}


@pytest.mark.parametrize("layout", ["phase rows", "full columns", "full columns, NCHW dL/dw"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("case", PHASE_CASES)
def test_channels_last_layouts_match_torch(
    case: str, split: bool, layout: str, spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conv, "channels_last_gemms", lambda groups, *_: groups == 1)
    full, nchw = layout != "phase rows", layout.endswith("NCHW dL/dw")
    monkeypatch.setattr(conv, "nchw_weight_columns", lambda *_: nchw)

    def chunks(x_shape: torch.Size, *_geometry: Any) -> tuple[bool, list[slice]]:
        """The layout under test, in one chunk or one per sample."""
        n = x_shape[0]
        return full, [slice(i, i + 1) for i in range(n)] if split else [slice(None)]

    monkeypatch.setattr(conv, "channels_last_chunks", chunks)
    x_shape, w_shape, kwargs, forward_layout, backward_layouts = PHASE_CASES[case]
    if full:
        forward_layout = FULL_COLUMNS[forward_layout]
        backward_layouts = {FULL_COLUMNS.get(name, name) for name in backward_layouts}
    if nchw:  # dL/dw copies NCHW columns: the backward builds channels-last ones only for a
        # dL/dx that is the literal correlation (no col2im)
        backward_layouts = {NCHW_WEIGHT_GRAD.get(name, name) for name in backward_layouts}
        if "conv_input_grad_columns_nhwc" in backward_layouts:
            backward_layouts.discard("columns_nhwc")
    check_layouts(
        x_shape, w_shape, kwargs, forward_layout, backward_layouts, split, False, spy, monkeypatch
    )


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "kwargs"),
    [
        ((0, 32, 8, 8), (32, 32, 3, 3), dict(padding=1)),
        ((0, 32, 9, 9), (16, 32, 3, 3), dict(stride=2, padding=1)),
    ],
    ids=["empty batch", "empty batch, strided"],
)
def test_channels_last_layouts_take_empty_tensors(
    x_shape: tuple, w_shape: tuple, kwargs: dict[str, Any]
) -> None:
    """float32, where the channels-last layouts run on oneDNN, which takes no empty
    matrix: an empty batch gives torch's (empty) output and gradients, as the float64
    parity sweep checks for the NCHW layouts."""
    x = torch.randn(x_shape, requires_grad=True)
    w = torch.randn(w_shape, requires_grad=True)
    outs = {}
    for name, fn in (("handmade", H.conv2d), ("torch", F.conv2d)):
        y = fn(x, w, **kwargs)
        outs[name] = (y, *torch.autograd.grad(y, (x, w), torch.ones_like(y)))
    for actual, expected in zip(outs["handmade"], outs["torch"], strict=True):
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected)


# One oneDNN product per sample on its NCHW columns, where oneDNN multiplies a large enough
# product (float32 on the CPU); here forced for float64, whose products torch computes.
SAMPLE_COLUMN_CASES: dict[str, tuple[tuple, tuple, dict[str, Any]]] = {
    "stride 2 (ResNet 64->128/2's geometry)": (
        (3, 5, 12, 11),
        (6, 5, 3, 3),
        dict(stride=2, padding=1),
    ),
    "dilated 2, same size (dL/dx, the literal correlation, in the same layout)": (
        (3, 4, 10, 9),
        (5, 4, 3, 3),
        dict(padding=2, dilation=2),
    ),
    "stride (2, 1), uneven padding, 2x4 kernel": (
        (3, 3, 11, 12),
        (4, 3, 2, 4),
        dict(stride=(2, 1), padding=(1, 2)),
    ),
}


@pytest.mark.parametrize("case", SAMPLE_COLUMN_CASES)
def test_sample_columns_match_torch(
    case: str, spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-sample NCHW columns: the forward runs them, once; output and gradients are
    torch's (float64)."""
    monkeypatch.setattr(conv, "sample_columns", lambda _x, _w, groups, *_: groups == 1)
    x_shape, w_shape, kwargs = SAMPLE_COLUMN_CASES[case]
    gen = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for shape in (x_shape, w_shape, w_shape[:1])
    )
    y = H.conv2d(x, w, b, **kwargs)
    assert spy == ["_correlate_sample_columns"]
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    assert_torch_results((x, w, b), kwargs, y, upstream)


# A 1x1 kernel without padding as one product over every pixel of the batch, where oneDNN
# multiplies (float32 on the CPU); here forced for float64, whose products torch computes.
POINTWISE_CASES: dict[str, tuple[tuple, tuple, dict[str, Any]]] = {
    "stride 1 (ResNet's bottleneck 1x1)": ((3, 6, 5, 7), (4, 6, 1, 1), {}),
    "stride 2, odd sizes (ResNet's downsampling shortcut)": (
        (3, 6, 9, 7),
        (5, 6, 1, 1),
        dict(stride=2),
    ),
    "strides (2, 3), 2 groups, dilation (which a 1x1 ignores)": (
        (2, 4, 8, 10),
        (6, 2, 1, 1),
        dict(stride=(2, 3), groups=2, dilation=3),
    ),
    "unbatched": ((6, 5, 4), (3, 6, 1, 1), {}),
}

POINTWISE = {"pointwise_correlate", "pointwise_grads"}


@pytest.mark.parametrize("case", POINTWISE_CASES)
def test_pointwise_matches_torch(
    case: str, spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 1x1 kernel's products over every pixel of the batch: the forward runs them, the
    backward their transposes; output and gradients are torch's (float64)."""
    monkeypatch.setattr(
        conv, "pointwise", lambda w_shape, padding, *_: w_shape[-2:] == (1, 1) and not any(padding)
    )
    x_shape, w_shape, kwargs = POINTWISE_CASES[case]
    backward = POINTWISE - {"pointwise_correlate"}
    check_layouts(
        x_shape, w_shape, kwargs, "pointwise_correlate", backward, False, True, spy, monkeypatch
    )


@pytest.mark.parametrize(
    ("dtype", "padding", "differentiated", "x_shape", "picked"),
    [
        (torch.float32, 0, False, (2, 16, 5, 5), True),
        (torch.float64, 0, False, (2, 16, 5, 5), False),
        (torch.float32, 1, False, (2, 16, 5, 5), False),
        (torch.float32, 0, True, (2, 16, 5, 5), True),
        (torch.float32, 0, False, (2, 16, 128, 128), False),
        (torch.float32, 0, False, (1, 16, 128, 128), True),
    ],
    ids=[
        "float32",
        "float64",
        "padded",
        "backward differentiated",
        "thin channels, a large product per sample",
        "... at batch 1",
    ],
)
def test_pointwise_where_onednn_multiplies(
    dtype: torch.dtype,
    padding: int,
    differentiated: bool,
    x_shape: tuple,
    picked: bool,
    spy: list[str],
) -> None:
    """An unpadded 1x1 kernel takes the pointwise products where oneDNN multiplies: in
    float32, forward and backward -- except a backward that is itself differentiated (its
    products must be torch's, which autograd records), which takes the NCHW layouts; a
    float64 or padded 1x1 never; nor thin channels (16 in, 16 out) whose samples are each
    a product of ``ONEDNN_MIN_MACS`` (16 x 16 x 128^2 multiply-adds), unless the batch is
    one sample.  Results are torch's either way."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
        for shape in (x_shape, (16, 16, 1, 1), (16,))
    )
    picked = picked and gemm.onednn_ready(x.detach())
    y = H.conv2d(x, w, b, padding=padding)
    assert ("pointwise_correlate" in spy) == picked
    spy.clear()
    grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y), create_graph=differentiated)
    assert (set(spy) & POINTWISE == POINTWISE - {"pointwise_correlate"}) == (
        picked and not differentiated
    )
    expected = F.conv2d(x, w, b, padding=padding)
    refs = torch.autograd.grad(expected, (x, w, b), torch.ones_like(y))
    outs = zip(("y", "dx", "dw", "db"), (y, *grads), (expected, *refs), strict=True)
    for name, actual, reference in outs:
        result = compare(name, actual, reference, exact=False, dtype=dtype)
        assert result.ok, result.message


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride", "dilation", "picked"),
    [
        ((4, 64, 56, 56), (128, 64, 3, 3), 2, 1, True),
        ((16, 128, 28, 28), (128, 128, 3, 3), 1, 1, True),
        ((4, 128, 28, 28), (128, 128, 3, 3), 1, 1, True),  # a sample's buffers 1.1M: 1.26M
        ((1, 128, 28, 28), (128, 128, 3, 3), 1, 1, False),  # buffers 1.1M > a 0.41M budget
        ((4, 64, 28, 28), (64, 64, 3, 3), 1, 2, True),  # a sample's buffers 0.57M: 0.59M
        ((32, 64, 56, 56), (64, 64, 3, 3), 1, 1, False),  # a sample's columns: 1.8M elements
        ((4, 256, 14, 14), (256, 256, 3, 3), 1, 1, False),  # 196 output pixels
        ((64, 1, 28, 28), (6, 1, 5, 5), 1, 1, False),  # LeNet conv1: a 118k-MAC product
    ],
    ids=[
        "64->128/2",
        "128@28 b16",
        "128@28 b4",
        "128@28 b1",
        "dilated",
        "64@56",
        "256@14",
        "LeNet conv1",
    ],
)
def test_sample_columns_where_a_sample_is_one_large_product(
    x_shape: tuple, w_shape: tuple, stride: int, dilation: int, picked: bool, spy: list[str]
) -> None:
    """float32 convs take the per-sample columns where a sample's output is wide, its
    columns within ``SAMPLE_COLUMNS_MAX``, its product large enough for oneDNN (and oneDNN
    is there) and the buffers within 1.9x what torch's forward keeps; float64 and grouped
    convs never.  Run on a picked geometry, the output is torch's."""
    x, w = torch.empty(x_shape), torch.empty(w_shape)
    size = (x_shape[2] - 1) // stride + 1  # (padding = dilation: same size, or halved)
    pad = (dilation,) * 4
    expected = picked and gemm.onednn_ready(x, w)
    assert conv.sample_columns(x.shape, w.shape, 1, pad, (size, size), x, w) == expected
    assert not conv.sample_columns(x.shape, w.shape, 1, pad, (size, size), x.double(), w.double())
    assert not conv.sample_columns(x.shape, w.shape, 2, pad, (size, size), x, w)
    if picked:  # (float32 tolerances scaled by the output's size, as parity's compare)
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(s, generator=gen) for s in (x_shape, w_shape, w_shape[:1]))
        kwargs: dict[str, Any] = dict(stride=stride, padding=dilation, dilation=dilation)
        y = H.conv2d(x, w, b, **kwargs)
        assert spy == ["_correlate_sample_columns"] * expected
        result = compare("y", y, F.conv2d(x, w, b, **kwargs), exact=False, dtype=torch.float32)
        assert result.ok, result.message


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "padding"),
    [
        ((2, 1, 28, 28), (6, 1, 5, 5), 2),  # LeNet conv1: dL/dw g-first, in row pairs
        ((2, 6, 14, 14), (16, 6, 5, 5), 0),  # LeNet conv2: stacked
        ((2, 1, 9, 9), (4, 1, 1, 1), 0),  # 1x1, one input channel
        ((2, 3, 9, 9), (1, 3, 3, 3), 1),  # one output channel
    ],
    ids=["LeNet conv1", "LeNet conv2", "1x1 from one channel", "one output channel"],
)
def test_weight_gradient_has_the_weights_strides(
    x_shape: tuple, w_shape: tuple, padding: int
) -> None:
    """dL/dw comes with the weight's own strides, as torch's does -- even for a dimension of
    size 1, whose stride ``contiguous()`` does not fix: autograd then keeps it as ``.grad``
    and DistributedDataParallel's gradient buckets take it without a "grad strides do not
    match bucket view strides" warning."""
    x = torch.randn(x_shape)
    w = torch.randn(w_shape, requires_grad=True)
    for fn in (H.conv2d, F.conv2d):
        (grad,) = torch.autograd.grad(fn(x, w, padding=padding).sum(), w)
        assert grad.stride() == w.stride(), fn


def test_kernel_without_outputs_fails_as_torch() -> None:
    """A kernel with no output channels: torch's RuntimeError and message (not an error
    from deep inside a layout)."""
    x, w = torch.randn(2, 32, 8, 8), torch.randn(0, 32, 3, 3)
    messages = []
    for fn in (H.conv2d, F.conv2d):
        with pytest.raises(RuntimeError) as raised:
            fn(x, w, padding=1)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]


def check_layouts(
    x_shape: tuple,
    w_shape: tuple,
    kwargs: dict[str, Any],
    forward_layout: str,
    backward_layouts: set[str],
    split: bool,
    unbuffered: bool,
    spy: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forward runs ``forward_layout`` (once per chunk when ``split`` cuts every batch
    into chunks, unless the layout needs no buffer), the backward exactly
    ``backward_layouts``, and output and gradients are torch's (float64)."""
    if split:  # every buffer over budget: each batch is cut into chunks
        monkeypatch.setattr(conv, "UNSPLIT_BUFFER", 0)
        monkeypatch.setattr(conv, "MIN_ROW_BUFFER", 1)
        monkeypatch.setattr(conv, "row_budget", lambda *_numels, **_stacked: 1)  # any threads
        monkeypatch.setattr(conv, "full_column_budget", lambda *_numels: 1)
        monkeypatch.setattr(conv, "DEPTHWISE_TABLE_FACTOR", 1)
    gen = torch.Generator().manual_seed(0)
    x, w, b = (
        torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        for shape in (x_shape, w_shape, w_shape[:1])
    )
    y = H.conv2d(x, w, b, **kwargs)
    forward_calls = list(spy)
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    spy.clear()
    grads = torch.autograd.grad(y, (x, w, b), upstream)

    assert set(forward_calls) == {forward_layout}
    assert set(spy) == backward_layouts
    if split and not unbuffered:  # the forward's layout ran once per chunk
        assert len(forward_calls) > 1
    if split and "depthwise_table" in backward_layouts:  # one table of g per chunk
        assert spy.count("depthwise_table") > 1

    # an output that is a view of a buffer made inside the Function would make the next
    # in-place op (ReLU(inplace=True)) raise
    H.conv2d(x, w, b, **kwargs).relu_().sum().backward()

    assert_torch_results((x, w, b), kwargs, y, upstream, grads)


def assert_torch_results(
    inputs: tuple[torch.Tensor, ...],
    kwargs: dict[str, Any],
    y: torch.Tensor,
    upstream: torch.Tensor,
    grads: tuple[torch.Tensor, ...] | None = None,
) -> None:
    """``y`` and the gradients of ``upstream`` w.r.t. ``inputs`` (x, w, b; ``grads``, or
    taken here through ``y``) are torch's ``F.conv2d``'s (float64 tolerance)."""
    if grads is None:
        grads = torch.autograd.grad(y, inputs, upstream)
    y_ref = F.conv2d(*inputs, **kwargs)
    refs = torch.autograd.grad(y_ref, inputs, upstream)
    for name, actual, expected in zip(
        ("y", "dx", "dw", "db"), (y, *grads), (y_ref, *refs), strict=True
    ):
        result = compare(name, actual, expected, exact=False)
        assert result.ok, result.message


@pytest.mark.parametrize(
    "kwargs",
    [dict(stride=(2, 1), padding=2), dict(stride=(3, 2), dilation=(1, 2), padding=(1, 3))],
    ids=["height stride", "both strides, width dilation"],
)
def test_stacked_rows_with_strides(
    kwargs: dict[str, Any], spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stacked kernel rows' windows step ``sH`` buffer rows per output row and read the
    width with its stride and dilation: torch's output.  (Small strided convs take the
    full columns, so the rows layout is forced.)"""
    monkeypatch.setattr(conv, "use_columns", lambda *_args: False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 12, 13, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 2, 5, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    result = compare("y", H.conv2d(x, w, b, **kwargs), F.conv2d(x, w, b, **kwargs), exact=False)
    assert spy == ["_correlate_stacked_rows"]
    assert result.ok, result.message


def test_row_pairs_stay_inside_the_buffer() -> None:
    """The thin rows' weight gradient batches a pair of output rows while its widened run
    of the row buffer ends inside the buffer -- every such pair, no other (the rows left
    go one by one) -- and the width is a multiple of ``GEMM_COLUMN_ALIGN`` holding the
    pair's windows.  With the rows ``paired_row_padding`` adds (and only the fewest), every
    pair fits."""
    kernel_rows = ((1, 1), (1, 3), (1, 5), (2, 8), (6, 5))  # (C, kW): k = C*kW entries a row
    grid = itertools.product(range(1, 20), kernel_rows, range(1, 6), (1, 2), (0, 2))
    for h, (c, kw), kh, sh, pad in grid:
        hp, k = h + 2 * pad, c * kw
        if hp < kh:
            continue
        oh = (hp - kh) // sh + 1
        pairs, width = conv.row_pairs(hp, k, kh, sh, oh)
        assert width % conv.GEMM_COLUMN_ALIGN == 0 and width >= (sh + kh) * k
        assert 0 <= pairs <= oh // 2
        if pairs:  # the last batched pair's run, from entry 2*(pairs-1)*sH*k
            assert 2 * (pairs - 1) * sh * k + width <= hp * k
        if pairs < oh // 2:  # the next pair's would not end inside
            assert 2 * pairs * sh * k + width > hp * k
        top, bottom, left, right = conv.paired_row_padding((pad,) * 4, (2, c, kh, kw), sh, h, oh)
        assert (top, left, right) == (pad,) * 3 and bottom >= pad
        assert conv.row_pairs(h + top + bottom, k, kh, sh, oh)[0] == oh // 2
        if bottom > pad:  # one row fewer would not do
            assert conv.row_pairs(h + top + bottom - 1, k, kh, sh, oh)[0] < oh // 2


def test_thin_rows_kept_buffer_holds_every_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """LeNet conv1's geometry: the row buffer the forward keeps has the rows its last pair
    of output rows reads, so the weight gradient batches every pair (none is left to a
    product of its own), and dL/dw is torch's."""
    seen = []
    original = conv.weight_grad_row_pairs

    def spied(rows: torch.Tensor, g: torch.Tensor, kh: int, sh: int) -> torch.Tensor:
        seen.append((rows.shape, g.shape[2]))
        return original(rows, g, kh, sh)

    monkeypatch.setattr(conv, "weight_grad_row_pairs", spied)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 12, 12, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 1, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = H.conv2d(x, w, padding=2)
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (dw,) = torch.autograd.grad(y, w, upstream)
    ((rows_shape, oh),) = seen
    hp, c, kw = rows_shape[:3]
    assert hp > 12 + 4  # (without the added row, the sixth pair would not fit)
    assert conv.row_pairs(hp, c * kw, 5, 1, oh)[0] == oh // 2
    torch.testing.assert_close(dw, torch.autograd.grad(F.conv2d(x, w, padding=2), w, upstream)[0])


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "kwargs"),
    [
        ((5, 1, 12, 12), (3, 1, 5, 5), dict(padding=2)),  # LeNet conv1's thin rows
        ((5, 6, 14, 13), (4, 6, 5, 3), dict(dilation=(1, 2))),  # LeNet conv2's stacked rows
        ((5, 6, 6), (3, 5, 3, 3), dict(padding=1)),  # unbatched (a batch of one inside)
    ],
    ids=["thin rows", "stacked rows, width dilation", "unbatched"],
)
@pytest.mark.parametrize("parameters", [False, True], ids=["tensors", "nn.Parameter"])
def test_weight_grad_reads_the_forwards_row_buffer(
    x_shape: tuple,
    w_shape: tuple,
    kwargs: dict[str, Any],
    parameters: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the weight gradient contracts the stacked forward's row buffer, a forward that
    will need it (conv2d, the weight requiring grad -- a plain tensor or a module's
    ``nn.Parameter``, as in training) keeps it: the backward builds no
    buffer of ``x`` again -- not even on a second backward through a retained graph, which
    builds its own -- and the gradients are torch's; a double backward rebuilds it from
    ``x`` (so that dL/dw stays differentiable in ``x``); a forward without gradient keeps
    none (it would raise that forward's peak memory)."""
    windows = []
    original = conv.row_windows

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        windows.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(conv, "row_windows", counted)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], generator=gen, dtype=torch.float64, requires_grad=True)
    if parameters:
        w, b = torch.nn.Parameter(w.detach()), torch.nn.Parameter(b.detach())
    x.requires_grad_(x.shape[-3] > 1)  # (LeNet conv1's input needs none)
    inputs = tuple(t for t in (x, w, b) if t.requires_grad)

    y = H.conv2d(x, w, b, **kwargs)
    assert len(windows) == 1
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, inputs, upstream, retain_graph=True)
    assert len(windows) == 1  # the forward's buffer, read again
    y_ref = F.conv2d(x, w, b, **kwargs)
    for actual, expected in zip(grads, torch.autograd.grad(y_ref, inputs, upstream), strict=True):
        torch.testing.assert_close(actual, expected)
    again = torch.autograd.grad(y, inputs, upstream)  # (the buffer was freed: built again)
    assert len(windows) == 2
    for actual, expected in zip(again, grads, strict=True):
        torch.testing.assert_close(actual, expected)

    windows.clear()
    y = H.conv2d(x, w, b, **kwargs)
    (dw,) = torch.autograd.grad(y, w, upstream, create_graph=True)
    assert len(windows) == 2  # forward, and the double-backward-ready dL/dw
    assert dw.requires_grad == x.requires_grad

    keeps = []
    forward = conv.conv_forward
    monkeypatch.setattr(
        conv, "conv_forward", lambda *args: keeps.append(args[4] is not None) or forward(*args)
    )
    for grad_mode, weight in ((True, w), (False, w), (True, w.detach())):
        with torch.set_grad_enabled(grad_mode):
            H.conv2d(x, weight, b, **kwargs)
    assert keeps == [True, False, False]


@pytest.mark.parametrize(
    ("batch", "threads", "shared"), [(64, 2, True), (64, 1, True), (256, 2, True), (256, 1, False)]
)
def test_stacked_gradients_share_one_copy_of_g(batch: int, threads: int, shared: bool) -> None:
    """LeNet conv2: where both its gradients run in one chunk, (4) and (3) contract one
    copy of ``g`` laid out by rows (:func:`conv.shared_gradient_rows`) instead of one each;
    where they run in chunks (batch 256 on 1 thread), each chunk copies its part of ``g``.
    Either way the gradients are torch's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 6, 14, 14, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, 6, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(batch, 16, 10, 10, generator=gen, dtype=torch.float64)
    whole_g = (10, 16, batch, 10)  # g.permute(2, 1, 0, 3): g[p, o, n, q]
    copies = []

    class CopiesOfG(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            copy = func in (torch.ops.aten.copy_.default, torch.ops.aten.clone.default)
            if copy and whole_g in shapes:
                copies.append(func)
            return func(*args, **(kwargs or {}))

    with intra_op_threads(threads):
        y = H.conv2d(x, w)
        with CopiesOfG():
            grads = torch.autograd.grad(y, (x, w), g)
    expected = torch.autograd.grad(F.conv2d(x, w), (x, w), g)
    for actual, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(actual, reference)
    assert len(copies) == (1 if shared else 0)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "padding"),
    [((4, 6, 14, 14), (16, 6, 5, 5), 0), ((2, 64, 14, 14), (64, 64, 3, 3), 1)],
    ids=["stacked rows (LeNet conv2)", "channels-last where oneDNN multiplies (ResNet 3x3)"],
)
def test_module_parameters_take_the_layouts_of_plain_tensors(
    x_shape: tuple, w_shape: tuple, padding: int, spy: list[str]
) -> None:
    """A model's weights are ``nn.Parameter``s: a ``handmade.nn.Conv2d`` takes, forward and
    backward, the layouts the functional conv takes with plain tensors of the same values
    (the kept row buffer; the channels-last products, picked only where oneDNN may
    multiply) -- a parameter taken for a tensor subclass fell back to the NCHW layouts and
    rebuilt the buffer -- and its output and gradients are torch's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, requires_grad=True)
    module = torch.nn.Conv2d(w_shape[1], w_shape[0], w_shape[2], padding=padding)
    handmade_module = HN.Conv2d(w_shape[1], w_shape[0], w_shape[2], padding=padding)
    handmade_module.load_state_dict(module.state_dict())
    plain = [t.detach().requires_grad_() for t in (module.weight, module.bias)]
    functional = functools.partial(H.conv2d, weight=plain[0], bias=plain[1], padding=padding)
    layouts = []
    for conv_fn, params in (
        (functional, plain),
        (handmade_module, [*handmade_module.parameters()]),
    ):
        spy.clear()
        y = conv_fn(x)
        grads = torch.autograd.grad(y, (x, *params), torch.ones_like(y))
        layouts.append(list(spy))
    assert layouts[0] == layouts[1]
    expected = module(x)
    refs = torch.autograd.grad(expected, (x, module.weight, module.bias), torch.ones_like(y))
    outs = zip(("y", "dx", "dw", "db"), (y, *grads), (expected, *refs), strict=True)
    for name, actual, reference in outs:
        result = compare(name, actual, reference, exact=False, dtype=torch.float32)
        assert result.ok, result.message


@pytest.mark.parametrize(("kernel_width", "tables"), [(3, 1), (5, 2)])
def test_depthwise_table_whole_batch_within_its_budget(
    kernel_width: int, tables: int, spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The depthwise backward builds one table of ``g`` for the whole batch while it takes
    at most ``DEPTHWISE_TABLE_FACTOR`` (4) times the larger of input and ``g``: a 3-wide
    kernel's (3 shifted copies of 8 padded rows per 6: exactly 4x here) in one piece, a
    5-wide kernel's (6.7x) in two chunks.  Either way: torch's gradients."""
    monkeypatch.setattr(conv, "UNSPLIT_BUFFER", 0)  # the budget binds for this small batch
    monkeypatch.setattr(conv, "MIN_ROW_BUFFER", 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, kernel_width, generator=gen, dtype=torch.float64, requires_grad=True)
    kwargs: dict[str, Any] = dict(groups=2, padding=(1, kernel_width // 2))
    y = H.conv2d(x, w, **kwargs)
    upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    spy.clear()
    grads = torch.autograd.grad(y, (x, w), upstream)
    assert spy.count("depthwise_table") == tables
    refs = torch.autograd.grad(F.conv2d(x, w, **kwargs), (x, w), upstream)
    for name, actual, expected in zip(("dx", "dw"), grads, refs, strict=True):
        result = compare(name, actual, expected, exact=False)
        assert result.ok, result.message


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dots", [True, False], ids=["one call of dots", "per-plane products"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(padding=1), dict(stride=2, dilation=(2, 1), padding=(2, 0))],
    ids=["same size", "strided, dilated"],
)
def test_depthwise_weight_grad_dots_or_products(
    kwargs: dict[str, Any], dots: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The depthwise dL/dw: in a plain backward one call of dot products over the table of
    ``g`` (embedding_bag's per-sample-weight gradient), where autograd records (a double
    backward, forced here) the per-plane products -- either way torch's gradient."""
    runs = []
    monkeypatch.setattr(conv, "tap_runs", lambda *a: runs.append(a) or tap_runs(*a))
    if not dots:
        monkeypatch.setattr(conv.gemm, "plain_tensors", lambda *_tensors: False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 9, 10, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 1, 3, 2, generator=gen, dtype=dtype, requires_grad=True)
    grads = {}
    for name, fn in (("handmade", H.conv2d), ("torch", F.conv2d)):
        y = fn(x, w, groups=4, **kwargs)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        grads[name] = torch.autograd.grad(y, w, upstream)[0]
    assert bool(runs) == dots
    result = compare("dw", grads["handmade"], grads["torch"], exact=False)
    assert result.ok, result.message


@pytest.mark.parametrize(("threads", "chunks"), [(1, 6), (2, 1)])
def test_row_buffer_budget_grows_with_threads(
    threads: int, chunks: int, spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A width-only row buffer may take the smaller of input and output on one intra-op
    thread, the larger on more (:func:`handmade.conv.row_budget`): a LeNet-conv1-like
    layer (output 8x its input, buffer 6.7x) runs in one chunk per sample on one thread
    and whole on two.  Either way: torch's output and gradients."""
    check_chunk_count(
        (6, 1, 12, 12), (8, 1, 5, 5), threads, "_correlate_stacked_rows", chunks, spy, monkeypatch
    )


@pytest.mark.parametrize(("threads", "chunks"), [(1, 6), (2, 1)])
def test_stacked_buffer_budget_counts_input_and_output(
    threads: int, chunks: int, spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On more than one intra-op thread a stacked conv's row buffer may take twice its
    input plus output (:func:`handmade.conv.row_budget`), more than the larger of the
    two: a LeNet-conv2-like layer (buffer 1.75x input plus output, 2.4x its output: 3
    chunks within the larger) runs whole on two threads, one chunk per sample on one.
    Either way: torch's output and gradients."""
    check_chunk_count(
        (6, 6, 14, 14), (16, 6, 5, 5), threads, "_correlate_stacked_rows", chunks, spy, monkeypatch
    )


@pytest.mark.parametrize(("threads", "chunks"), [(1, 4), (2, 1)])
def test_phase_row_budget_counts_the_kernel(
    threads: int, chunks: int, spy: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On more than one intra-op thread a phase-row buffer may also take the kernel's size
    (:func:`handmade.conv.phase_row_chunks`): a layer whose kernel is 8x its input and
    output (buffer 5x) runs whole on two threads, one chunk per sample on one.  Either
    way: torch's output and gradients."""
    monkeypatch.setattr(conv, "channels_last_gemms", lambda groups, *_: groups == 1)
    # the full columns would take more chunks than any phase-row count: phase rows run
    monkeypatch.setattr(conv, "full_column_chunks", lambda *_: [slice(None)] * 99)
    check_chunk_count(
        (4, 32, 3, 3), (32, 32, 3, 3), threads, "phase_rows", chunks, spy, monkeypatch
    )


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride", "full", "chunks"),
    [
        ((4, 64, 56, 56), (64, 64, 3, 3), 1, True, 4),  # as many chunks as the phase rows
        ((4, 256, 7, 7), (256, 256, 3, 3), 1, True, 1),  # the whole batch fits
        ((4, 256, 14, 14), (256, 256, 3, 3), 1, False, 1),  # full: 4 chunks, phase rows: 1
        ((4, 128, 28, 28), (256, 128, 3, 3), 2, True, 2),  # 2 against 1, a small kernel
    ],
    ids=["ResNet 64@56", "ResNet 256@7", "ResNet 256@14", "ResNet 128->256/2"],
)
def test_full_columns_where_no_more_chunks_than_phase_rows(
    x_shape: tuple, w_shape: tuple, stride: int, full: bool, chunks: int
) -> None:
    """At two threads, a ResNet 3x3 conv takes the full channels-last columns where their
    whole-sample chunks (a 1.9x-torch's-memory budget) are no more than the phase rows',
    or the extra chunks' kernels no larger than the input
    (:func:`handmade.conv.channels_last_chunks`), and each chunk's buffers stay within it."""
    out = (x_shape[2] - 1) // stride + 1
    geometry = ((stride, stride), (1, 1, 1, 1), (1, 1), (out, out))
    with intra_op_threads(2):
        picked, slices = conv.channels_last_chunks(
            torch.Size(x_shape), torch.Size(w_shape), *geometry
        )
    assert (picked, len(slices)) == (full, chunks)
    n, c, h, _ = x_shape
    o = w_shape[0]
    largest = len(range(n)[slices[0]])
    # a chunk's columns, product and padded copy; the output and kernel kept beside them
    buffers = largest * (out * out * (9 * c + o) + (h + 2) ** 2 * c)
    kept = n * o * out * out + w_shape[0] * w_shape[1] * 9
    if full:
        assert buffers + kept <= 1.9 * (n * c * h * h + kept)


def check_chunk_count(
    x_shape: tuple,
    w_shape: tuple,
    threads: int,
    layout: str,
    chunks: int,
    spy: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A same-size conv's forward at ``threads`` intra-op threads runs ``layout`` once per
    chunk, ``chunks`` times (float64), and its output and gradients are torch's."""
    monkeypatch.setattr(conv, "UNSPLIT_BUFFER", 0)  # the budget binds for this small batch
    monkeypatch.setattr(conv, "MIN_ROW_BUFFER", 1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    padding = w_shape[-1] // 2
    with intra_op_threads(threads):
        y = H.conv2d(x, w, padding=padding)
        assert spy.count(layout) == chunks
        upstream = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad(y, (x, w), upstream)
    y_ref = F.conv2d(x, w, padding=padding)
    refs = torch.autograd.grad(y_ref, (x, w), upstream)
    for name, actual, expected in zip(("y", "dx", "dw"), (y, *grads), (y_ref, *refs), strict=True):
        result = compare(name, actual, expected, exact=False)
        assert result.ok, result.message


@pytest.mark.parametrize("split", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize(("threads", "pieces"), [(2, 2), (3, 1)])
def test_weight_grad_contraction_split_among_threads(
    threads: int, pieces: int, split: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more than one intra-op thread, a small kernel's weight gradient splits each
    GEMM's contraction in one piece per thread (:func:`handmade.conv.contraction_parts`);
    where the pieces do not divide a chunk's contraction (3 threads: 500 output pixels
    whole, 200 and 100 per chunk) that chunk's GEMMs run whole.  Either way: torch's gradient."""
    if split:
        monkeypatch.setattr(conv, "UNSPLIT_BUFFER", 0)
        monkeypatch.setattr(conv, "MIN_ROW_BUFFER", 1)
    seen: list[int] = []
    original = conv.split_contraction

    def recorded(a: torch.Tensor, b: torch.Tensor, parts: int) -> tuple:
        result = original(a, b, parts)
        seen.append(len(result[0]))
        return result

    monkeypatch.setattr(conv, "split_contraction", recorded)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, 10, 10, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 24, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 6, 10, 10, generator=gen, dtype=torch.float64)
    with intra_op_threads(threads):
        (dw,) = torch.autograd.grad(H.conv2d(x, w, padding=1), w, upstream)
    assert seen and set(seen) == {pieces}
    (expected,) = torch.autograd.grad(F.conv2d(x, w, padding=1), w, upstream)
    result = compare("dw", dw, expected, exact=False)
    assert result.ok, result.message


@pytest.mark.parametrize(
    ("layout", "n", "out_channels", "kernel"),
    [
        ("Winograd", 2, 256, 3),
        ("phase rows", 2, 256, 3),
        ("full columns", 2, 256, 3),
        ("full columns, NCHW dL/dw", 2, 256, 3),
        ("1x1", 4, 64, 1),
    ],
)
def test_float32_within_tolerance(
    layout: str,
    n: int,
    out_channels: int,
    kernel: int,
    spy: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In float32 neither Winograd's transforms nor the oneDNN GEMMs of the channels-last
    layouts may cost accuracy a user would see: a ResNet-sized layer (256 channels, 14x14)
    -- output, dL/dx and dL/dw against torch's float64 result within torch.testing's
    float32 tolerances (parity's ``compare``).  (Winograd is the layout where oneDNN does
    not multiply, forced here; the channels-last layout is forced, whole batch; the 1x1
    takes the pointwise products over the whole batch.)"""
    if layout == "Winograd":
        monkeypatch.setattr(conv, "use_phase_rows", lambda *_: False)
        assert conv.use_winograd((256, 256, 3, 3), (1, 1), (1, 1), 1, (14, 14), torch.float32)
    else:
        full = layout.startswith("full columns")
        monkeypatch.setattr(conv, "channels_last_chunks", lambda *_: (full, [slice(None)]))
        monkeypatch.setattr(conv, "nchw_weight_columns", lambda *_: layout.endswith("NCHW dL/dw"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 256, 14, 14, generator=gen)
    w = torch.randn(out_channels, 256, kernel, kernel, generator=gen) / (16 * kernel)  # ~unit
    b = torch.randn(out_channels, generator=gen)
    upstream = torch.randn(n, out_channels, 14, 14, generator=gen)
    results = {}
    for dtype in (torch.float32, torch.float64):
        args = [t.to(dtype).requires_grad_() for t in (x, w, b)]
        fn = H.conv2d if dtype == torch.float32 else F.conv2d
        y = fn(*args, padding=kernel // 2)
        results[dtype] = (y, *torch.autograd.grad(y, args[:2], upstream.to(dtype)))
    assert set(spy) == FLOAT32_LAYOUTS[layout]
    for name, actual, expected in zip(
        ("y", "dx", "dw"), results[torch.float32], results[torch.float64], strict=True
    ):
        result = compare(name, actual, expected, exact=False, dtype=torch.float32)
        assert result.ok, result.message


FLOAT32_LAYOUTS = {
    "Winograd": {"winograd_input_tiles"},
    "phase rows": {"phase_rows", "conv_weight_grad_phase_rows"},
    "full columns": {"columns_nhwc", "conv_weight_grad_columns_nhwc"},
    "full columns, NCHW dL/dw": {"columns_nhwc", "conv_weight_grad_columns_nchw"},
    "1x1": {"pointwise_correlate", "pointwise_grads"},
}


def test_depthwise_forward_over_reverse_takes_the_taps(spy: list[str]) -> None:
    """``embedding_bag`` has no forward-mode rule: a backward run on dual tensors
    (forward-over-reverse, as in a Hessian-vector product) computes dL/dx of a
    same-size conv as the literal full convolution, whose depthwise forward falls back to
    one multiply-add per tap (``depthwise_correlate_taps``) -- with torch's gradient and
    its tangent."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    w, w_t = (torch.randn(3, 1, 3, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    upstream = torch.randn(2, 3, 7, 8, generator=gen, dtype=torch.float64)
    kwargs: dict[str, Any] = dict(groups=3, padding=1)  # same size: the literal form
    outs = {}
    for name, fn in (("handmade", H.conv2d), ("torch", F.conv2d)):
        with fwAD.dual_level():
            y = fn(x, fwAD.make_dual(w, w_t), **kwargs)
            (dx,) = torch.autograd.grad(y, x, upstream)
            outs[name] = fwAD.unpack_dual(dx)
    assert "depthwise_correlate_taps" in spy
    for part in ("primal", "tangent"):
        actual, expected = getattr(outs["handmade"], part), getattr(outs["torch"], part)
        result = compare(f"dx {part}", actual, expected, exact=False)
        assert result.ok, result.message


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "groups"),
    [((1, 128, 10, 10), (128, 128, 3, 3), 1), ((2, 8, 10, 10), (8, 1, 3, 3), 8)],
    ids=["Winograd matrices", "depthwise bags"],
)
def test_cached_constants_first_built_in_inference_mode(
    x_shape: tuple, w_shape: tuple, groups: int
) -> None:
    """The cached constant tensors (Winograd's transforms, the depthwise bags of rows) are
    built outside inference mode even when the first call that needs them runs under
    :func:`torch.inference_mode`: a later double backward saves them for its graph, which
    autograd refuses for an inference tensor."""
    conv.winograd_matrices.cache_clear()
    conv.depthwise_bags.cache_clear()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        H.conv2d(x, w, padding=1, groups=groups)
    grads = {}
    for name, fn in (("handmade", H.conv2d), ("torch", F.conv2d)):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        (dx,) = torch.autograd.grad(
            fn(xg, wg, padding=1, groups=groups).sum(), xg, create_graph=True
        )
        grads[name] = torch.autograd.grad(dx.square().sum(), wg)[0]  # (a double backward)
    result = compare("d(dx^2)/dw", grads["handmade"], grads["torch"], exact=False)
    assert result.ok, result.message


def test_depthwise_bags_cached_only_while_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bags of rows of a geometry are built once while they take at most
    ``CACHED_BAGS_MAX`` indices; larger ones are built afresh each call (no large index
    table kept alive between calls)."""
    conv.depthwise_bags.cache_clear()
    monkeypatch.setattr(conv, "CACHED_BAGS_MAX", 2 * 3 * 5 * 9)  # m * C * oH * kH * kW
    small = (2, 3, (3, 3), 7, 5, 1, 1, torch.device("cpu"))
    large = (3, 3, (3, 3), 7, 5, 1, 1, torch.device("cpu"))
    assert conv.depthwise_bags(*small) is conv.depthwise_bags(*small)
    first, again = conv.depthwise_bags(*large), conv.depthwise_bags(*large)
    assert first is not again and torch.equal(first, again)
