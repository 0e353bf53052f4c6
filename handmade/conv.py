r"""2-d convolution with a hand-derived backward, forward-mode and double-backward rule.

The math (cross-correlation, as every deep-learning "convolution"), for one group,
with ``x_p`` the zero-padded input, stride ``s`` and dilation ``d``::

    (1) y[n,o,p,q]   = b[o] + sum_{c,i,j} w[o,c,i,j] * x_p[n,c, p*s+i*d, q*s+j*d]

Differentiating (1) term by term:

    (2) dL/db[o]       = sum_{n,p,q} g[n,o,p,q]                    (g = dL/dy)
    (3) dL/dw[o,c,i,j] = sum_{n,p,q} g[n,o,p,q] * x_p[n,c, p*s+i*d, q*s+j*d]
                       = correlation of the input with the upstream gradient
    (4) dL/dx_p[n,c,u,v] = sum_{o,i,j} g[n,o,p,q] * w[o,c,i,j]   over u = p*s+i*d, v = q*s+j*d
                       = "full" convolution of the stride-dilated g with w rotated by 180 deg,
                         i.e. a stride-1 correlation of (zero-inserted, zero-padded) g with
                         w[:, :, ::-1, ::-1] whose in/out channel roles are swapped,
                         then cropped back to the unpadded input.

Where each is computed:

    (1) :func:`conv_forward` -> :func:`correlate`.  A 1x1 kernel where oneDNN multiplies
        (float32 on the CPU: :mod:`handmade._gemm`): one GEMM over every pixel of the batch,
        channel-major (:func:`pointwise_correlate`).  Where oneDNN multiplies and kernel
        rows are wide (ResNet's), channels-last: the
        full im2col, one GEMM per chunk of the batch (:func:`_correlate_columns_nhwc`), or,
        where that would take many more chunks, a width-only im2col split by row phase,
        one GEMM per kernel row over a contiguous block of it
        (:func:`_correlate_phase_rows`; :func:`channels_last_chunks` picks).  Otherwise in
        one of two NCHW GEMM
        layouts picked per shape by :func:`use_columns`: a width-only im2col
        (:func:`row_windows`) and one GEMM per kernel row ``i`` over the rows that row
        reads (:func:`kernel_row`); or
        the full im2col (:func:`columns`) and one GEMM straight into NCHW
        (:func:`_correlate_columns`).  Kernel rows too thin for a batch-wide GEMM
        (LeNet's first layer): the width-only im2col per sample, one GEMM per sample and
        kernel row (:func:`_correlate_sample_rows`).  Depthwise kernels: each output row
        a weighted sum of ``kH*kW`` rows of a table of the input's rows, one
        ``embedding_bag`` (:func:`depthwise_correlate`).  Wide 3x3 stride-1 convs: Winograd's
        minimal filtering F(2x2, 3x3), the same sum with 16 products per 2x2 outputs
        instead of 36 (:func:`winograd_correlate`, picked by :func:`use_winograd`).
    (2) :func:`conv_bias_grad`: one reduction.
    (3) :func:`conv_weight_grad`: the forward's GEMMs with ``g`` in place of ``w``, against
        the same buffers: :func:`conv_weight_grad_columns_nhwc` (or, transposed, on NCHW
        columns: :func:`conv_weight_grad_columns_nchw`), :func:`conv_weight_grad_phase_rows`,
        :func:`conv_weight_grad_rows`, :func:`conv_weight_grad_columns`,
        :func:`conv_weight_grad_sample_rows`, :func:`conv_weight_grad_stacked_rows` -- the
        last on the forward's own row buffer, which a forward whose weight needs a
        gradient keeps for it (:class:`Conv2dFunction`).  Depthwise kernels: (3) and (4)
        together from one table of ``g``'s rows, (4) as one ``embedding_bag``
        (:func:`depthwise_grads`).  A 1x1 kernel where oneDNN multiplies: (3) and (4)
        together from one channel-major copy of ``g``; a 1x1 kernel is its own rotation,
        so (4) is one transposed GEMM (:func:`pointwise_grads`).
    (4) :func:`conv_input_grad`: literally the full convolution with the rotated kernel (a
        call to :func:`correlate`) for size-preserving convs; otherwise the same sum as the
        transpose of the forward's GEMMs, :func:`conv_input_grad_columns` (col2im; channels-
        last where oneDNN multiplies, :func:`conv_input_grad_columns_nhwc`),
        :func:`conv_input_grad_stacked_rows` (narrow kernel rows) or
        :func:`conv_input_grad_scatter`, which need no zero-inserted copy of g.
        Size-preserving convs that take Winograd forward take it here too, with the
        rotated kernel read from ``w`` as it is.

The backward is built from differentiable elementary ops, so autograd can differentiate it
again (double backward); the forward-mode rule uses bilinearity:

    (5) dy = conv(dx, w) + conv(x, dw) + db
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from . import _gemm as gemm
from ._utils import (
    _pair,
    apply_function,
    argument_cache,
    as_int,
    at,
    check_input_rank,
    check_non_negative,
    check_positive,
    chunk_slices,
    forward_ad_active,
    in_bounds_taps,
    legacy_twin,
    own_output,
    tensor_cache,
    windows,
)

__all__ = ["Conv2dFunction", "conv2d", "correlate"]

Pad4 = tuple[int, int, int, int]  # (top, bottom, left, right)

# Above this many elements, a GEMM accumulating in place into a strided slice is slower
# (measured) than a separate GEMM followed by an add.
IN_PLACE_GEMM_MAX = 1 << 21
# A chunk's buffer may always take this many elements (512 kB of float32) ...
MIN_ROW_BUFFER = 1 << 17
# ... and a whole batch's this many (1.5 MB) is never split: for LeNet-sized layers the
# per-chunk overhead costs more (measured) than the memory is worth.
UNSPLIT_BUFFER = 3 << 17
# Output pixels per sample from which the full-im2col forward runs one GEMM per sample.
PER_SAMPLE_COLUMNS = 512
# One sample's full im2col of up to this many elements (4 MB of float32) may be built and
# multiplied one sample at a time in NCHW (:func:`sample_columns`).  Forward at 2 threads,
# batch 4 (10th percentile of 16 interleaved blocks), against the channels-last full
# columns: ResNet 64->128/2 1.36 / 1.47 ms (torch 1.07), 128@28 2.28 / 2.46 (1.89), the
# dilated 64@28 0.77 / 0.90 (0.50); 64@56, a sample's columns 1.8M elements, 2.92 / 2.83;
# 256@14, 128->256/2 and 256@7 (196 and 49 output pixels) 1.2-1.7x the time.  fwd+bwd
# (the same dL/dx, literally the full correlation, takes them too), 12 blocks: 128@28 6.94
# against 7.24 ms (5.74), the dilated 64@28 2.60 against 2.69 (1.55).
SAMPLE_COLUMNS_MAX = 1 << 20
# Kernel rows thinner than this (``C/g*kW``: LeNet's first layer, 5) make GEMMs over the
# whole batch far below peak (measured): such stride-1 convs run one GEMM per sample and
# kernel row (:func:`per_sample_rows`), unless their rows stack (``STACKED_ROW_MAX``).
THIN_KERNEL_ROW = 8
# Kernel rows narrower than this (``C*kW``: LeNet's second layer, 30) give the per-row GEMMs
# too short a contraction: an ungrouped conv with no height dilation stacks its ``kH`` rows
# into one (:func:`stacked_rows`).  LeNet conv2's forward (the bench's pass, best of 5
# interleaved rounds) at 2 threads: 0.84x the time at batch 64, 0.85x at 256 (1 thread:
# 0.88x, 0.99x); the LeNet training step at 2 threads 0.94x at either batch.  LeNet conv1's
# thin rows (5 wide) stack too, instead of one GEMM per sample and kernel row: its fwd+bwd
# at batch 256 0.82x at 2 threads, 0.86x at 1 (at 64: 1.0x, 0.86x), the step at 2 threads
# 0.96x.  Wider rows do not gain: ResNet 64@56 (192 wide, one sample per chunk) 1.06-1.11x.
# The weight gradient of such a conv stacks its rows too (:func:`conv_weight_grad_stacked_rows`,
# one batched GEMM instead of one per kernel row): LeNet conv2's, 10th percentile of 60
# interleaved blocks, 0.67-0.71x the time at batch 64 and 0.83-0.84x at 256 at 2 threads
# (1 thread: 0.78-0.89x, 0.95-0.98x).  Thin rows' weight gradients stack in the other
# orientation, two output rows per GEMM (:func:`weight_grad_row_pairs`).
STACKED_ROW_MAX = 64
# On more than one intra-op thread a stacked conv's row buffer may take this many times its
# input plus output (:func:`row_budget`), instead of the larger of the two: LeNet
# conv2's at batch 256 (1.5x) is then built once for the whole batch -- its products large
# enough for oneDNN, and the forward's kept for dL/dw -- instead of in 3 chunks.  At 2
# threads (10th percentile of 16 interleaved blocks): forward 0.78x the time, dL/dx 0.80x,
# forward + dL/dw 0.72x; fwd+bwd 0.86x at batch 256 and 0.85x at 128; peak memory 1.87x
# torch's (forward) and 1.55x (fwd+bwd).  On one thread the smaller budget stays (LeNet
# conv1's fwd+bwd at batch 256 took 1.14x the time whole).
STACKED_BUDGET_RATIO = 2
# MKL's sgemm (torch's ``bmm`` on the CPU) ran LeNet conv1's weight-gradient products, 12
# rows by a 1792-long contraction, 1.5x faster with 32 columns than with 30 (2 threads:
# 120 / 180 us for 14 of them; 25 columns, 28 products of 6 rows: 185 us): the column
# count :func:`weight_grad_row_pairs` rounds up to a multiple of this.
GEMM_COLUMN_ALIGN = 16
# A weight-gradient GEMM whose result has at most this many elements (LeNet's second
# layer: 16x150; the dilated 64@28 conv: 64x192) but a long contraction runs on one thread
# (measured); with more intra-op threads its contraction is split among them
# (:func:`contraction_parts`).
SPLIT_RESULT_MAX = 1 << 14
# Winograd F(2x2, 3x3) pays off (measured) from this many input and output channels and
# output pixels per sample: below, its transforms cost more than the products it saves
# (ResNet 64@56: forward 1.1-1.3x, fwd+bwd 1.0-1.1x the time of the direct GEMMs; 256@7:
# 1.0-1.1x).
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_PIXELS = 100
# A full-columns dL/dw copies NCHW columns (runs of ``oW`` values) rather than channels-last
# ones (runs of ``C``) for stride-1 widths where ``C`` is at most this many times ``oW``
# (:func:`nchw_weight_columns`).
NCHW_RUN_RATIO = 4
# The depthwise backward's table of ``g`` (:func:`depthwise_grads`: ``kW`` shifted copies,
# 3.2x ``g`` for MobileNet's 3x3 on 28x28) is built for the whole batch while it takes at
# most this many times the larger of input and upstream gradient.  MobileNet 128@28 at
# batch 4, fwd+bwd, 8 interleaved A/B runs: one table per sample instead took 0.99-1.22x
# the time at 1 thread (median 1.03x) and 0.95-1.38x at 2 (median 1.12x); the whole
# batch's table puts the pass's peak memory at 1.5x torch's.
DEPTHWISE_TABLE_FACTOR = 4
# The depthwise forward's tables (:func:`depthwise_correlate`) are built a chunk of the batch
# at a time within this many times input and output together (what torch's kernels keep
# alive; :func:`row_budget` allows the larger or smaller of the two): MobileNet 128@28 at
# batch 4, 2 samples per chunk instead of 1: fwd+bwd 0.89-0.91x the time at 2 threads and
# 0.96x at 1 (3 and 1 interleaved A/B runs of 30-40 rounds), the forward's peak memory
# 1.92x torch's (1.21x with one sample per chunk).
DEPTHWISE_FORWARD_BUDGET = 1
# The depthwise bags of rows (:func:`depthwise_bags`) of the last few geometries are kept
# while they take at most this many indices (4 MB of int32): building them took ~0.1 ms of a
# ~3 ms fwd+bwd pass (MobileNet 128@28 at batch 4, 2 threads), shared by forward and backward.
CACHED_BAGS_MAX = 1 << 20


class ConvGeometry(NamedTuple):
    """Normalized arguments of one conv2d call."""

    stride: tuple[int, int]
    padding: Pad4
    dilation: tuple[int, int]
    groups: int


# ----------------------------------------------------------------------------- core math


def row_windows(
    xp: torch.Tensor, kw: int, dw: int, sw: int, ow: int, order: str = "channel"
) -> torch.Tensor:
    """im2col along the width only: ``(N, C, Hp, Wp) -> (C, kW, Hp, N, oW)``.

    ``rows[c, j, u, n, q] = xp[n, c, u, q*sW + j*dW]``, one copy out of a strided view.
    Kernel row ``i`` reads the slice ``u = p*sH + i*dH`` of this buffer, so all windows
    are reachable without the full ``kH*kW``-fold im2col matrix; with the batch inside,
    each slice is one wide matrix ``(C*kW, oH*N*oW)``, a free view for stride 1.  Other
    orders of the same buffer: ``"sample"``, ``(N, C, kW, Hp, oW)``, one matrix per sample
    (:func:`sample_kernel_row`); ``"height"``, ``(Hp, C, kW, N, oW)``, in which the
    ``kH`` rows of the windows of output row ``p`` are one contiguous run
    (:func:`_correlate_stacked_rows`).
    """
    n, c, hp, _ = xp.shape
    (sn, sc, su, sq), j_step = xp.stride(), xp.stride(3) * dw
    if order == "channel":
        shape, strides = (c, kw, hp, n, ow), (sc, j_step, su, sn, sq * sw)
    elif order == "sample":
        shape, strides = (n, c, kw, hp, ow), (sn, sc, j_step, su, sq * sw)
    else:  # "height"
        shape, strides = (hp, c, kw, n, ow), (su, sc, j_step, sn, sq * sw)
    return xp.as_strided(shape, strides, xp.storage_offset()).contiguous()


def kernel_row(rows: torch.Tensor, groups: int, i: int, dh: int, sh: int, oh: int) -> torch.Tensor:
    """The input seen by kernel row ``i`` of every window: ``(g, C/g*kW, oH*N*oW)``.

    ``out[g, (c, j), (p, n, q)] = xp[n, g*C/g + c, p*sH + i*dH, q*sW + j*dW]``
    """
    c, kw, hp, n, ow = rows.shape
    rows = rows.reshape(groups, c // groups * kw, hp, n * ow)
    if not (i == 0 and sh == 1 and oh == hp):  # (a full-range slice would break vmap)
        rows = rows[:, :, i * dh : i * dh + (oh - 1) * sh + 1 : sh, :]
    return rows.reshape(groups, c // groups * kw, oh * n * ow)


def sample_kernel_row(rows: torch.Tensor, groups: int, i: int, dh: int, oh: int) -> torch.Tensor:
    """Stride 1: the input seen by kernel row ``i``, per sample: ``(N*g, C/g*kW, oH*oW)``.

    ``rows``: :func:`row_windows` in ``"sample"`` order.
    ``out[(n, g), (c, j), (p, q)] = xp[n, g*C/g + c, p + i*dH, q*sW + j*dW]``, a view: the
    rows ``p + i*dH`` of a sample are one contiguous run.
    """
    n, c, kw, hp, ow = rows.shape
    rows = rows.reshape(n * groups, c // groups * kw, hp * ow)
    if oh == hp:  # (a full-range slice would break vmap)
        return rows
    return rows[:, :, i * dh * ow : (i * dh + oh) * ow]


def depthwise(w_shape: torch.Size, groups: int) -> bool:
    """One input channel per output channel (MobileNet's depthwise convs)."""
    return w_shape[1] == 1 and w_shape[0] == groups


def depthwise_correlate(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: tuple[int, int],
    padding: Pad4,
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Formula (1) for a depthwise kernel (one input channel per output channel).

    With nothing to contract over channels, a GEMM is wasted.  Row by row (1) reads::

        y[n,c,p,:] = b[c] + sum_{i,j} w[c,i,j] * T[((n*C + c)*kW + j)*Hp + p*sH + i*dH, :]

    over the table ``T`` of the padded input's rows at each kernel column's shift
    (:func:`depthwise_table`): a weighted sum of ``kH*kW`` table rows per output row, one
    :func:`torch.nn.functional.embedding_bag` for a chunk of the batch
    (:func:`weighted_rows`; the bags of rows :func:`depthwise_bags`, the taps as
    per-sample weights), as the backward's (4) in
    :func:`depthwise_grads`.  A table takes ``kW`` times the padded input: chunks of the
    batch keep it within the input and output together (``DEPTHWISE_FORWARD_BUDGET``).
    Under forward-mode AD, for which
    ``embedding_bag`` has no rule, and for integer tensors, which it does not take, one
    multiply-add per tap instead (:func:`depthwise_correlate_taps`).
    """
    if not x.is_floating_point():  # (embedding_bag takes floating-point tables only)
        return depthwise_correlate_taps(x, w, stride, padding, dilation, out_hw, bias)
    n, c, h, _ = x.shape
    kh, kw = w.shape[-2:]
    (sh, sw), (dh, dw), (oh, ow) = stride, dilation, out_hw
    hp = h + padding[0] + padding[1]
    budget = max(DEPTHWISE_FORWARD_BUDGET * (x.numel() + n * c * oh * ow), MIN_ROW_BUFFER)
    chunks = batch_chunks(n, c * kw * hp * ow, budget)
    m = len(range(n)[chunks[0]])  # samples in the largest chunk
    bags = depthwise_bags(m, c, (kh, kw), hp, oh, sh, dh, x.device)
    # the bags' weights: the kernel, w[c, i, j], for every output row (n, c, p)
    taps = w.reshape(1, c, 1, kh * kw).expand(m, c, oh, kh * kw).reshape(-1, kh * kw)
    b = None if bias is None else bias.reshape(c, 1, 1)

    def table_chunk(out: torch.Tensor | None, x_part: torch.Tensor) -> torch.Tensor:
        k = x_part.shape[0] * c * oh  # output rows in this chunk
        table = depthwise_table(x_part, kw, sw, dw, padding, ow)
        rows = weighted_rows(table, bags[:k], taps[:k])
        y = rows.view(-1, c, oh, ow)
        if out is not None:  # copied into the chunk's slice of the result by over_chunks
            return y if b is None else y.add_(b)
        # the whole batch: a tensor of its own, not a view of embedding_bag's result (a
        # custom Function's output that is a view cannot be modified in place)
        return y.clone() if b is None else y + b

    try:
        return over_chunks(table_chunk, chunks, (n, c, oh, ow), x)
    except NotImplementedError:
        return depthwise_correlate_taps(x, w, stride, padding, dilation, out_hw, bias)


def depthwise_correlate_taps(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: tuple[int, int],
    padding: Pad4,
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Formula (1) for a depthwise kernel as ``kH*kW`` multiply-adds of strided views of
    the input, each over just the windows that read the tap inside the input
    (:func:`in_bounds_taps`), so no padded copy is made."""
    c, _, kh, kw = w.shape
    top_left = (padding[0], padding[2])
    taps = in_bounds_taps(tuple(x.shape[-2:]), (kh, kw), stride, top_left, dilation, out_hw)
    w_ij = w.reshape(c, kh, kw, 1, 1)  # w_ij[:, i, j]: one tap, broadcast over the plane
    first = next((t for t in taps if t.full), None)
    if first is None:  # every tap misses some window: start from zeros (or the bias)
        y = x.new_zeros(*x.shape[:-2], *out_hw)
        y = y if bias is None else y + bias.reshape(c, 1, 1)
    elif bias is None:
        y = at(x, first.inp) * w_ij[:, first.ij[0], first.ij[1]]
    else:
        b = bias.reshape(c, 1, 1)
        y = torch.addcmul(b, at(x, first.inp), w_ij[:, first.ij[0], first.ij[1]])
    for t in taps:
        if t is not first:  # y += x_shifted * w_tap
            at(y, t.out).addcmul_(at(x, t.inp), w_ij[:, t.ij[0], t.ij[1]])
    return y


def depthwise_table(
    x: torch.Tensor, kw: int, sw: int, dw: int, padding: Pad4, ow: int
) -> torch.Tensor:
    """The rows a depthwise kernel's taps read, ``(n*C*kW*Hp, oW)``.

    ``table[((n*C + c)*kW + j)*Hp + u, q] = x_p[n, c, u, q*sW + j*dW]``: for each kernel
    column ``j``, every row of the padded input at the columns that column reads
    (:func:`row_windows`, one copy; negative ``padding`` crops).
    """
    return row_windows(_pad(x, padding), kw, dw, sw, ow, order="sample").reshape(-1, ow)


@tensor_cache(
    maxsize=8,
    when=lambda m, c, kernel, _hp, oh, *_: m * c * oh * kernel[0] * kernel[1] <= CACHED_BAGS_MAX,
)
def depthwise_bags(
    m: int,
    c: int,
    kernel: tuple[int, int],
    hp: int,
    oh: int,
    sh: int,
    dh: int,
    device: torch.device,
) -> torch.Tensor:
    """Which :func:`depthwise_table` rows make output row ``(n, c, p)``: ``(m*C*oH, kH*kW)``,
    ``bags[(n, c, p), (i, j)] = ((n*C + c)*kW + j)*Hp + p*sH + i*dH``; int32 where the
    table's rows allow (half the index traffic: 1-4 % faster here).  Kept for the next
    calls (forward and backward alike) while they take at most ``CACHED_BAGS_MAX`` indices."""
    kh, kw = kernel
    d = dict(device=device, dtype=torch.int32 if m * c * kw * hp < 2**31 else torch.int64)
    plane = torch.arange(m * c, **d).view(-1, 1, 1) * (kw * hp)  # (n, c)
    row = torch.arange(0, oh * sh, sh, **d).view(1, -1, 1)  # p
    tap = (
        torch.arange(0, kh * dh, dh, **d).view(-1, 1)  # i
        + torch.arange(0, kw * hp, hp, **d)  # j
    ).view(1, 1, -1)
    return (plane + row + tap).view(-1, kh * kw)


def weighted_rows(table: torch.Tensor, bags: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_k weights[r, k] * table[bags[r, k]]``: ``F.embedding_bag(bags, table,
    mode="sum", per_sample_weights=weights)``, called as torch's op itself with the bags'
    offsets made once (:func:`bag_offsets`): ~6 us less per call, three per depthwise
    fwd+bwd."""
    offsets = bag_offsets(bags.shape[0], bags.shape[1], bags.dtype, bags.device)
    flat_weights = weights.reshape(-1)
    return torch.embedding_bag(table, bags.reshape(-1), offsets, False, 0, False, flat_weights)[0]


@tensor_cache(maxsize=8)
def bag_offsets(count: int, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Where each of ``count`` bags of ``size`` indices starts: ``0, size, 2*size, ...``."""
    return torch.arange(0, count * size, size, dtype=dtype, device=device)


def depthwise_grads(
    x: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    geo: ConvGeometry,
    input_grad: bool,
    weight_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Formulas (4) and (3) for a depthwise kernel, both from one table of ``g`` per chunk.

    (4) is the correlation of ``g`` -- stride-dilated, padded "full" (``d*(k-1)`` minus
    the forward's padding) -- with the kernel rotated by 180 deg (rotating is all there
    is: the channel roles coincide).  Row by row it reads::

        dL/dx[n,c,u,:] = sum_{i,j} w[c, kH-1-i, kW-1-j] * T[((n*C + c)*kW + j)*Hp + u + i*dH, :]

    over the table ``T`` of ``g_full``'s rows at each kernel column's shift
    (:func:`depthwise_table`): a weighted sum of ``kH*kW`` table rows per row of dL/dx,
    which is what :func:`torch.nn.functional.embedding_bag` computes in one pass (a bag
    of rows per output row, :func:`depthwise_bags`; the taps as per-sample weights) where
    one multiply-add per tap would be ``kH*kW`` passes.  (3) reads the same table::

        dL/dw[c, kH-1-i, kW-1-j] = sum_{n,u,v} x[n,c,u,v] * T[((n*C + c)*kW + j)*Hp + u + i*dH, v]

    a dot product of each ``x`` plane with the run of ``H*W`` table entries from row
    ``i*dH`` on for each tap (whole rows: each run is contiguous; :func:`depthwise_tap_dots`).
    Tables are built a chunk of the batch at a time, within ``DEPTHWISE_TABLE_FACTOR``
    times the larger of input and upstream gradient (:func:`column_budget`): one chunk for
    a 3-wide kernel.
    """
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    top, _, left, _ = geo.padding
    n, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    g_full = g
    if (sh, sw) != (1, 1):  # stride-dilate g: insert s-1 zeros between its rows/columns
        g_full = g.new_zeros(*g.shape[:2], (g.shape[2] - 1) * sh + 1, (g.shape[3] - 1) * sw + 1)
        g_full[:, :, ::sh, ::sw] = g
    full_h, full_w = dh * (kh - 1), dw * (kw - 1)
    # "full" padding before; after, what makes the correlation the input's size
    pad = (full_h - top, h + top - g_full.shape[2], full_w - left, wd + left - g_full.shape[3])
    hp = h + full_h
    budget = DEPTHWISE_TABLE_FACTOR * column_budget(x.numel(), g.numel(), w.numel())
    chunks = batch_chunks(n, c * kw * hp * wd, budget)
    if input_grad:
        m = len(range(n)[chunks[0]])  # samples in the largest chunk
        bags = depthwise_bags(m, c, (kh, kw), hp, h, 1, dh, x.device)
        # the bags' weights: the rotated kernel, w[c, kH-1-i, kW-1-j], for every row (n, c, u)
        taps = w.flip(-2, -1).reshape(1, c, 1, kh * kw).expand(m, c, h, kh * kw)
        taps = taps.reshape(-1, kh * kw)
    x_grads, w_grad_rotated = [], None  # w_grad_rotated[c, i, j] = dL/dw[c, kH-1-i, kW-1-j]
    for part in chunks:
        table = depthwise_table(g_full[part], kw, 1, dw, pad, wd)
        k = table.shape[0] // (kw * hp)  # planes (n, c) in this chunk
        if input_grad:
            rows = weighted_rows(table, bags[: k * h], taps[: k * h])
            x_grads.append(rows.view(-1, c, h, wd))
        if weight_grad:
            part_sum = depthwise_tap_dots(x[part], table, (kh, kw), hp, dh).sum(0)
            w_grad_rotated = part_sum if w_grad_rotated is None else w_grad_rotated + part_sum
    x_grad = w_grad = None
    if input_grad:
        x_grad = x_grads[0] if len(x_grads) == 1 else torch.cat(x_grads)
    if weight_grad:
        w_grad = w_grad_rotated.flip(1, 2).reshape(c, 1, kh, kw)
        # The table's sum also multiplies the inputs no window of a tap reads (edges, rows
        # and columns a stride skips) by the zeros padded or inserted into g: exactly 0
        # unless such an input is inf or NaN, when it makes a NaN torch's sum has no term
        # for.  So a NaN-free result is torch's; otherwise the forward's transpose decides.
        if _has_nan(w_grad):
            w_grad = conv_weight_grad(x, g, w.shape, geo)
    return x_grad, w_grad


def depthwise_tap_dots(
    x: torch.Tensor, table: torch.Tensor, kernel: tuple[int, int], hp: int, dh: int
) -> torch.Tensor:
    """(3)'s terms per sample, ``(n, C, kH, kW)``: ``out[n, c, i, j] = sum_{u,v} x[n,c,u,v] *
    T[((n*C + c)*kW + j)*Hp + u + i*dH, v]`` over the table ``T`` of :func:`depthwise_grads`.

    For each plane and tap, a dot product of the ``H*W`` plane with the run of ``H*W``
    table entries from row ``i*dH`` (whole rows: one contiguous run).  On the CPU (where it
    was measured), where autograd, forward-mode AD and ``functorch`` transforms stay out
    (:func:`gemm.plain_tensors`), one call computes them all: the runs, rows of an
    overlapping view of the table (one row per element), are read in place by the gradient
    of ``embedding_bag``'s per-sample weights, which is exactly such a batch of dot products
    (bags: the planes, ``x``'s rows; entries: the runs).  MobileNet 128@28 at batch 4, 2
    threads: 0.14 ms against 0.39 for the ``kH`` batched products of every plane below.
    """
    n, c, h, wd = x.shape
    kh, kw = kernel
    if not (gemm.plain_tensors(x, table) and x.device.type == "cpu" and x.numel()):
        runs, x_rows = table.view(n, c, kw, hp, wd), x.reshape(n * c, 1, h * wd)
        per_row = [
            gemm.bmm(x_rows, sample_kernel_row(runs, c, i, dh, h).mT) for i in range(kh)
        ]  # kH x (n*C, 1, kW)
        return torch.stack(per_row, 2).view(n, c, kh, kw)
    starts, offsets, bag_of = tap_runs(n * c, kernel, hp, dh, wd, x.device)
    runs = table.view(-1).as_strided((table.numel() - h * wd + 1, h * wd), (1, 1))
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x.reshape(n * c, h * wd), runs, starts, offsets, bag_of, 0, -1
    )
    return dots.view(n, c, kh, kw)


@tensor_cache(
    maxsize=8, when=lambda planes, kernel, *_: planes * kernel[0] * kernel[1] <= CACHED_BAGS_MAX
)
def tap_runs(
    planes: int, kernel: tuple[int, int], hp: int, dh: int, wd: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where :func:`depthwise_tap_dots`' runs start in the table, ``starts[(plane, i, j)] =
    ((plane*kW + j)*Hp + i*dH)*W``, with the bags' offsets and each run's bag (its plane)."""
    kh, kw = kernel
    d = dict(device=device, dtype=torch.int64)
    plane = torch.arange(planes, **d).view(-1, 1, 1) * (kw * hp * wd)
    tap = torch.arange(0, kh * dh, dh, **d).view(-1, 1) * wd + torch.arange(kw, **d) * (hp * wd)
    starts = (plane + tap).view(-1)
    offsets = torch.arange(0, planes * kh * kw, kh * kw, **d)
    bag_of = torch.arange(planes, **d).repeat_interleave(kh * kw)
    return starts, offsets, bag_of


def _has_nan(t: torch.Tensor) -> bool:
    """Whether ``t`` has a NaN; ``True`` where its values cannot steer Python (under
    ``vmap``, data-dependent control flow raises), so the caller takes its exact path."""
    try:
        return bool(t.isnan().any())
    except RuntimeError:
        return True


# Winograd's minimal filtering F(2, 3) (Lavin & Gray, 2016): two outputs of a 3-tap
# correlation from four inputs d with four products, y = A^T [(G w) * (B^T d)]:
#   m0 = (d0 - d2) w0,  m1 = (d1 + d2)(w0 + w1 + w2)/2,  m2 = (d2 - d1)(w0 - w1 + w2)/2,
#   m3 = (d1 - d3) w2;  y0 = m0 + m1 + m2 = d0 w0 + d1 w1 + d2 w2,  y1 = m1 - m2 - m3.
WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


@tensor_cache(maxsize=16)
def winograd_matrices(
    dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F(2x2, 3x3)'s transforms on flattened tiles: ``B^T (x) B^T`` (16x16, input tile),
    ``G (x) G`` (16x9, kernel), ``A^T (x) A^T`` (4x16, back to 2x2 outputs).

    The 2-D transform ``B^T d B`` of a 4x4 tile ``d`` is ``(B^T (x) B^T) vec(d)`` (row-major
    ``vec``), so each is one GEMM over every tile at once.
    """
    bt, g, at_ = (
        torch.tensor(m, dtype=torch.float64) for m in (WINOGRAD_BT, WINOGRAD_G, WINOGRAD_AT)
    )
    return tuple(torch.kron(m, m).to(dtype=dtype, device=device) for m in (bt, g, at_))


def use_winograd(
    w_shape: torch.Size,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    out_hw: tuple[int, int],
    dtype: torch.dtype,
) -> bool:
    """Whether a conv runs :func:`winograd_correlate`: a 3x3 kernel at stride 1, dilation 1,
    one group, at least ``WINOGRAD_MIN_CHANNELS`` in and out and ``WINOGRAD_MIN_PIXELS``
    output pixels per sample, in float32/float64 (in float32 its error stays at the direct
    sum's, ~4e-7 of the largest output, measured on 128-256 channels; half precision would
    lose more)."""
    o, cg, kh, kw = w_shape
    return (
        (kh, kw) == (3, 3)
        and stride == (1, 1)
        and dilation == (1, 1)
        and groups == 1
        and min(o, cg) >= WINOGRAD_MIN_CHANNELS
        and out_hw[0] * out_hw[1] >= WINOGRAD_MIN_PIXELS
        and dtype in (torch.float32, torch.float64)
    )


def winograd_correlate(
    x: torch.Tensor,
    w: torch.Tensor,
    padding: Pad4,
    bias: torch.Tensor | None = None,
    rotated: bool = False,
) -> torch.Tensor:
    """Formula (1) for a 3x3 kernel at stride 1 (:func:`use_winograd`) by F(2x2, 3x3).

    Each 2x2 block of outputs ``Y`` reads one 4x4 tile ``d`` of the padded input (tiles
    overlap by 2); per tile, summed over input channels ``c``::

        Y = A^T [ sum_c (G w[o, c] G^T) * (B^T d[c] B) ] A

    16 products per 2x2 outputs and channel pair instead of 36: the sum over ``c`` is one
    ``bmm`` over the 16 transform positions, 4/9 of the direct GEMM.  The transforms are
    GEMMs with :func:`winograd_matrices`: of the kernel (once), of the tiles (a copy out of
    a strided view first, like im2col's) and of the ``bmm``'s result, whose 2x2 blocks are
    then written into NCHW.  The bias rides on position (1, 1), whose row of ``A^T (x) A^T``
    is all ones.  A batch is processed a chunk at a time (:func:`batch_chunks`), the tile
    buffers within the larger of input and output.

    ``rotated``: use the kernel of formula (4) instead, ``w`` rotated by 180 deg with in and
    out channels swapped, read from ``w`` as it is (the rotation reverses the kernel's 9
    taps, i.e. the columns of ``G (x) G``).
    """
    n, c, h, wd = x.shape
    top, bottom, left, right = padding
    oh, ow = h + top + bottom - 2, wd + left + right - 2
    ty, tx = winograd_tiles_hw((oh, ow))
    gg, at_ = winograd_matrices(x.dtype, x.device)[1:]
    u = gemm.mm(gg.flip(1) if rotated else gg, w.reshape(-1, 9).t())  # G w G^T per kernel
    u = u.view(16, w.shape[0], w.shape[1])
    u = u.transpose(1, 2) if rotated else u  # (16, out channels, in channels)
    o = u.shape[1]
    even = (2 * ty, 2 * tx) == (oh, ow)

    def tiles_chunk(out: torch.Tensor | None, x_part: torch.Tensor) -> torch.Tensor:
        m = x_part.shape[0]
        v = winograd_input_tiles(x_part, padding, (ty, tx))  # B^T d B per tile
        prod = gemm.bmm(u, v.transpose(1, 2)).view(16, -1)  # (16, O*m*T): sum over c
        if bias is None:
            y = gemm.mm(at_, prod)
        else:  # A^T (x) A^T's column 5 is all ones: the bias reaches all four outputs
            b = bias.reshape(o, 1).expand(o, m * ty * tx).reshape(1, -1)
            y = gemm.addmm(b, at_, prod)
        full = out if out is not None and even else x.new_empty(m, o, 2 * ty, 2 * tx)
        output_blocks(full).copy_(y.view(2, 2, o, m, ty, tx))
        return full if even else full[:, :, :oh, :ow]

    return over_chunks(tiles_chunk, winograd_chunks(x, o, (oh, ow)), (n, o, oh, ow), x)


def output_blocks(t: torch.Tensor) -> torch.Tensor:
    """The 2x2 output blocks of an ``(n, O, 2*tH, 2*tW)`` tensor as the view
    ``(2, 2, O, n, tH, tW)`` laid out like the GEMMs' rows and columns:
    ``view[a, b, o, n, p, q] = t[n, o, 2p + a, 2q + b]``."""
    n, o, h, w = t.shape
    return t.view(n, o, h // 2, 2, w // 2, 2).permute(3, 5, 1, 0, 2, 4)


def winograd_tiles_hw(out_hw: tuple[int, int]) -> tuple[int, int]:
    """F(2x2, 3x3) tiles down and across for an output of ``out_hw`` (the last may overhang)."""
    return -(-out_hw[0] // 2), -(-out_hw[1] // 2)


def winograd_chunks(x: torch.Tensor, out_channels: int, out_hw: tuple[int, int]) -> list[slice]:
    """Chunks of the batch whose transformed tiles (16 per 2x2 outputs and input channel)
    fit the larger of input and output (:func:`column_budget`; no re-laid-out kernel to
    count: its transform is 16/9 of the kernel, made once)."""
    ty, tx = winograd_tiles_hw(out_hw)
    n, c = x.shape[:2]
    budget = column_budget(x.numel(), n * out_channels * out_hw[0] * out_hw[1], 0)
    return batch_chunks(n, 16 * c * ty * tx, budget)


def winograd_input_tiles(x: torch.Tensor, padding: Pad4, tiles_hw: tuple[int, int]) -> torch.Tensor:
    """``B^T d B`` for every 4x4 tile ``d`` of the padded input: ``(16, n*tH*tW, C)``.

    Tile ``(p, q)`` is ``xp[n, c, 2p : 2p + 4, 2q : 2q + 4]`` (tiles overlap by 2); the input
    is padded to the tiles' extent, one row/column more than the windows need if the
    output's size is odd.  The padded copy is laid out channels-last, ``(n, Hp, Wp, C)``,
    so that the tiles' copy out of a strided view moves runs of ``C`` contiguous values
    (in NCHW every value of a tile row is a separate step of 2: ResNet 256@14's tiles took
    1.2 ms against 0.6, 2 threads); then one GEMM.
    """
    top, _, left, _ = padding
    m, c, h, wd = x.shape
    ty, tx = tiles_hw
    # (n, Hp, Wp, C), zero-padded (or cropped) to the tiles' extent
    pad = (0, 0, left, 2 * tx + 2 - wd - left, top, 2 * ty + 2 - h - top)
    xp = F.pad(x.permute(0, 2, 3, 1), pad)
    s = xp.stride()
    # d[(a, b), (n, p, q, c)] = xp[n, 2p + a, 2q + b, c]
    tiles = xp.as_strided(
        (4, 4, m, ty, tx, c), (s[1], s[2], s[0], 2 * s[1], 2 * s[2], s[3]), xp.storage_offset()
    )
    bt = winograd_matrices(x.dtype, x.device)[0]
    return gemm.mm(bt, tiles.reshape(16, -1)).view(16, m * ty * tx, c)


def winograd_weight_grad(
    x: torch.Tensor, g: torch.Tensor, w_shape: torch.Size, padding: Pad4
) -> torch.Tensor:
    """Formula (3) as the transpose of :func:`winograd_correlate`.  Per tile the forward is
    linear in ``w``: ``vec Y = (A^T (x) A^T) [V * (G (x) G) vec w]`` with ``V = B^T d B``, so

        dL/dw = (G (x) G)^T [ V * (A (x) A) vec dL/dY ]    summed over tiles and samples

    i.e. the upstream gradient's 2x2 blocks transformed by one GEMM, one ``bmm`` contracting
    them with the input's tiles over every tile of a chunk of the batch (4/9 of the direct
    GEMM's products), and one GEMM back to the 3x3 taps.  Outputs the tiles overhang
    have no gradient: ``g`` is padded with zeros there.
    """
    o, c = w_shape[:2]
    n, _, oh, ow = g.shape
    ty, tx = winograd_tiles_hw((oh, ow))
    _, gg, at_ = winograd_matrices(x.dtype, x.device)
    grad_u = g.new_empty(16, o, c)  # dL/d(G w G^T), per transform position
    for k, part in enumerate(winograd_chunks(x, o, (oh, ow))):
        v = winograd_input_tiles(x[part], padding, (ty, tx))  # (16, m*T, C)
        g_part = _pad(g[part], (0, 2 * ty - oh, 0, 2 * tx - ow))  # (no-op when even)
        blocks = output_blocks(g_part.contiguous()).reshape(4, -1)
        g_tiles = gemm.mm(at_.t(), blocks).view(16, o, -1)  # A dY A^T
        gemm.baddbmm_(grad_u, g_tiles, v, beta=min(k, 1))  # (beta=0: overwrite)
    return gemm.mm(grad_u.view(16, -1).t(), gg).view(w_shape)  # G^T (.) G, per (o, c)


def correlate(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: tuple[int, int],
    padding: Pad4,
    dilation: tuple[int, int],
    groups: int,
    bias: torch.Tensor | None = None,
    keep: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Formula (1) on a batched input, zero-padded by ``padding``.

    ``x``: ``(N, C, H, W)``; ``w``: ``(O, C/groups, kH, kW)`` -> ``(N, O, oH, oW)``.
    Either the sum over ``(c, i, j)`` is split by kernel row -- for each ``i`` one batched
    GEMM contracts ``w[:, :, i, :]`` with the input rows that kernel row sees, over the
    whole chunk or, for thin kernel rows, per sample (:func:`per_sample_rows`) -- or, for
    narrow kernel rows, the rows are stacked back into one contraction per output row
    (:func:`stacked_rows`), or it is one GEMM over full im2col columns (:func:`use_columns`
    picks).  The padded input and its buffer are built for a chunk of the batch at a time
    (:func:`batch_chunks`), so they stay within what torch's own kernels keep alive.

    ``keep``: a list to which a stacked forward run in one chunk appends its row buffer,
    which the weight gradient contracts again (:func:`conv_weight_grad_stacked_rows`).
    """
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    hp, wp = h + padding[0] + padding[1], wd + padding[2] + padding[3]
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    if depthwise(w.shape, groups):
        return depthwise_correlate(x, w, stride, padding, dilation, (oh, ow), bias)
    if pointwise(w.shape, padding, n, oh * ow, x, w):
        return pointwise_correlate(x, w, stride, groups, bias)
    geo = ConvGeometry(stride, padding, dilation, groups)
    if sample_columns(x.shape, w.shape, groups, padding, (oh, ow), x, w):
        return _correlate_sample_columns(x, w, geo, bias, (oh, ow))
    if use_phase_rows(w.shape, groups, x, w):
        full, chunks = channels_last_chunks(x.shape, w.shape, stride, padding, dilation, (oh, ow))
        layout = _correlate_columns_nhwc if full else _correlate_phase_rows
        return layout(x, w, geo, bias, (oh, ow), chunks)
    if use_winograd(w.shape, stride, dilation, groups, (oh, ow), x.dtype):
        return winograd_correlate(x, w, padding, bias)
    per_sample = per_sample_rows(w.shape, stride)
    if not per_sample and use_columns(x.shape, w.shape, (oh, ow), stride, padding):
        budget = column_budget(x.numel(), n * o * oh * ow, w.numel())
        chunks = batch_chunks(n, c * kh * kw * oh * ow, budget)
        return over_chunks(
            lambda out, x_part: _correlate_columns(
                _pad(x_part, padding), w, stride, dilation, groups, bias, (oh, ow), out
            ),
            chunks,
            (n, o, oh, ow),
            x,
        )
    # thin rows too (their dL/dw then reads the buffer in pairs of output rows)
    stacked = stacked_rows(w.shape, dilation, groups)
    row_padding = padding
    if stacked:  # one GEMM per output row, over all kernel rows
        w_rows = w.permute(0, 2, 1, 3).reshape(o, kh * cg * kw)  # w[o, (i, c, j)]
        if keep is not None and per_sample:  # a buffer to keep for those pairs
            row_padding = paired_row_padding(padding, w.shape, stride[0], h, oh)
    else:  # the other width-only layouts: one GEMM per kernel row
        w_rows = weight_rows(w, groups)

    def rows_chunk(out: torch.Tensor | None, x_part: torch.Tensor) -> torch.Tensor:
        xp = _pad(x_part, row_padding)
        if stacked:
            rows = row_windows(xp, kw, dw, sw, ow, order="height")
            if keep is not None and x_part is x:  # (one chunk: the whole batch's buffer)
                keep.append(rows)
            y = _correlate_stacked_rows(rows, w_rows, stride, bias, (oh, ow))
            return y.view(oh, o, -1, ow).permute(2, 1, 0, 3)  # (n, O, oH, oW)
        if per_sample:  # (n, O, oH, oW) directly
            return _correlate_sample_rows(xp, w_rows, kw, sw, dilation, bias, (oh, ow), out)
        y = _correlate_rows(xp, w_rows, kw, stride, dilation, bias, (oh, ow))
        return y.reshape(o, oh, -1, ow).permute(2, 0, 1, 3)  # (n, O, oH, oW)

    chunks = batch_chunks(n, c * kw * hp * ow, row_budget(x.numel(), n * o * oh * ow, stacked))
    return over_chunks(rows_chunk, chunks, (n, o, oh, ow), x)


def weight_rows(w: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernel split by kernel row, as GEMM operands: ``(kH, g, O/g, C/g*kW)``.

    ``out[i, g, o, (c, j)] = w[g*O/g + o, c, i, j]``; one copy per call, shared by every
    chunk of the batch.
    """
    o, cg, kh, kw = w.shape
    w = w.reshape(groups, o // groups, cg, kh, kw)
    return w.permute(3, 0, 1, 2, 4).reshape(kh, groups, o // groups, cg * kw)


def batch_chunks(n: int, per_sample: int, budget: int) -> list[slice]:
    """Split a batch of ``n`` into equal slices whose buffers (``per_sample`` elements
    each) fit ``budget`` elements (:func:`row_budget`, :func:`column_budget`); a batch
    within ``UNSPLIT_BUFFER`` elements stays whole."""
    return chunk_slices(n, per_sample, budget, unsplit=UNSPLIT_BUFFER)


def over_chunks(
    fn: Callable[..., torch.Tensor],
    chunks: list[slice],
    out_shape: tuple[int, ...],
    *batched: torch.Tensor,
) -> torch.Tensor:
    """``fn(out, *batched)``, computed a chunk of the batch at a time (samples are
    independent) into one ``out_shape`` result.

    ``fn`` either fills ``out``, the chunk's own contiguous slice of the result, and returns
    it (no copy of that chunk's result: LeNet conv1's forward at batch 256 went from 4.29
    to 4.05 ms), or returns a result (a view, say) to be copied there.  With a single chunk,
    ``fn`` gets ``out=None`` and the whole tensors (no full-range slice: its alias would
    break vmap), and its result is made contiguous.
    """
    if len(chunks) == 1:
        return fn(None, *batched).contiguous()
    out = batched[0].new_empty(out_shape)
    for part in chunks:
        out_part = out[part]
        result = fn(out_part, *(t[part] for t in batched))
        if result is not out_part:
            out_part.copy_(result)
    return out


def row_budget(input_numel: int, output_numel: int, stacked: bool = False) -> int:
    """Elements a width-only row buffer may take: on one intra-op thread the smaller of the
    input and the output (torch's own kernels keep about their sum alive), on more the
    larger -- or, for the ``"height"`` buffer of a ``stacked`` conv (:func:`stacked_rows`:
    its forward, dL/dx and dL/dw), ``STACKED_BUDGET_RATIO`` times their sum -- at least
    ``MIN_ROW_BUFFER``.

    With more threads a chunk's small element-wise ops gain nothing from the second one
    (measured: a 54k-element add 28.5 us on 1 thread, 29.3 on 2) while large ones do, so
    fewer, larger chunks pay.  fwd+bwd at 2 threads, best of 8 interleaved A/B rounds:
    LeNet conv1 at batch 256 (6 chunks -> 1) 0.90x the time, conv2 (4 -> 3) 0.95x, ResNet
    64@56 0.91x, dilated 1.02x, the LeNet training step at batch 256 0.90x; peak memory at
    most 1.66x torch's.  On one thread the same took 0.97-1.08x (the step 0.96x, LeNet
    conv1 and conv2 1.08x and 1.07x): there the smaller budget stays.
    """
    if torch.get_num_threads() == 1:
        budget = min(input_numel, output_numel)
    elif stacked:
        budget = STACKED_BUDGET_RATIO * (input_numel + output_numel)
    else:
        budget = max(input_numel, output_numel)
    return max(budget, MIN_ROW_BUFFER)


def phase_row_chunks(
    n: int, per_sample: int, input_numel: int, output_numel: int, weight_numel: int
) -> list[slice]:
    """Chunks of the batch for :func:`phase_rows` buffers (``per_sample`` elements each):
    on more than one intra-op thread as many whole samples as fit :func:`row_budget` plus
    the kernel's size -- torch's own forward keeps a re-laid-out copy of input, output and
    kernel alive (its peak: 0.99M elements for ResNet 256@14, their sum), so a large kernel
    leaves room for a larger chunk; on one, :func:`batch_chunks` within :func:`row_budget`.

    At 2 threads, fwd+bwd: ResNet 256@14 (4 chunks -> 1) 1.38x -> 1.24x torch's time,
    128->256/2 (2 -> 1) 1.30x -> 1.22x; their forward peak memory 1.76x and 1.56x
    torch's.  (The whole sum as the budget also took 64@56, 128@28 and the dilated conv to
    fewer chunks, 1.43x, 1.38x, 1.75x, but to 2.02x, 1.94x and 2.07x torch's peak memory.)
    """
    budget = row_budget(input_numel, output_numel)
    if torch.get_num_threads() > 1:  # whole samples: a chunk's buffer stays within budget
        budget = max(1, (budget + weight_numel) // per_sample) * per_sample
    return batch_chunks(n, per_sample, budget)


def column_budget(input_numel: int, output_numel: int, weight_numel: int) -> int:
    """Elements a full im2col buffer may take: the largest of input, output and weight
    (torch's oneDNN kernels keep a re-laid-out copy of each alive, measured), at least
    ``MIN_ROW_BUFFER``."""
    return max(input_numel, output_numel, weight_numel, MIN_ROW_BUFFER)


def contraction_parts(result_numel: int, groups: int) -> int:
    """Into how many pieces to split a weight-gradient GEMM's contraction: one per intra-op
    thread when its result is small (``SPLIT_RESULT_MAX``) and ungrouped, else 1.

    BLAS parallelizes a GEMM over blocks of its result; a LeNet-sized kernel is a single
    block, so the long contraction over every output pixel of a chunk of the batch ran on
    one thread.  Split into equal pieces, the pieces are the batch of one ``bmm``, whose
    entries run in parallel, and their results are summed at the end
    (:func:`split_contraction`).  LeNet's second layer, weight gradient, 2 threads:
    0.80-0.87x the time (measured, batch 64 and 256; that layer's weight gradient now
    stacks its kernel rows instead, :func:`conv_weight_grad_stacked_rows`).
    """
    parts = torch.get_num_threads()
    return 1 if groups != 1 or result_numel > SPLIT_RESULT_MAX else parts


def split_contraction(
    a: torch.Tensor, b: torch.Tensor, parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, M, P) @ (1, P, N)`` as ``parts`` products ``(parts, M, P/parts) @
    (parts, P/parts, N)`` of equal slices of the contraction (views), whose sum over the
    first dimension is the product; ``(a, b)`` as they are if ``parts`` does not divide ``P``.
    """
    p = a.shape[2]
    if parts == 1 or p % parts:
        return a, b
    a_parts = a[0].unflatten(1, (parts, p // parts)).transpose(0, 1)
    return a_parts, b[0].unflatten(0, (parts, p // parts))


def _correlate_rows(
    xp: torch.Tensor,
    w_rows: torch.Tensor,
    kw: int,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    bias: torch.Tensor | None,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """Formula (1) for one chunk of the batch: ``(g, O/g, oH*n*oW)``, columns ``(p, n, q)``.

    ``w_rows``: the kernel by rows, ``(kH, g, O/g, C/g*kW)`` (:func:`weight_rows`).
    """
    n = xp.shape[0]
    kh, groups, og, _ = w_rows.shape
    (sh, sw), (dh, dw), (oh, ow) = stride, dilation, out_hw
    rows = row_windows(xp, kw, dw, sw, ow)
    y = None
    for i in range(kh):
        m_i = kernel_row(rows, groups, i, dh, sh, oh)  # (g, C/g*kW, oH*n*oW), a view
        if y is not None:
            y = gemm.baddbmm_(y, w_rows[i], m_i)  # y += w_i @ m_i
        elif bias is None:
            y = gemm.bmm(w_rows[i], m_i)
        else:  # a fresh accumulator starting from the bias
            b = bias.reshape(groups, og, 1).expand(groups, og, oh * n * ow)
            y = gemm.baddbmm(b, w_rows[i], m_i)
    return y


def stacked_rows(w_shape: torch.Size, dilation: tuple[int, int], groups: int) -> bool:
    """Whether the forward stacks the kernel rows (:func:`_correlate_stacked_rows`): an
    ungrouped conv without height dilation whose kernel rows are narrower than
    ``STACKED_ROW_MAX`` (``C*kW``), with more than one of them."""
    _, cg, kh, kw = w_shape
    return groups == 1 and dilation[0] == 1 and kh > 1 and cg * kw < STACKED_ROW_MAX


def row_runs(
    buf: torch.Tensor, count: int, length: int, step: int = 1, first: int = 0
) -> torch.Tensor:
    """``count`` overlapping runs of ``length`` consecutive rows of ``buf`` (contiguous,
    rows along its first dimension, each ``(..., N, W)``), run ``p`` from row
    ``first + p*step``: one strided view ``(count, length*K, N*W)``, no copy.

    In a row buffer the rows a window reads are consecutive, so a run is one contiguous
    stretch of memory and each run is a matrix whose contraction runs over
    ``(row in run, K)`` -- how the stacked-rows forward and both its gradients contract
    all kernel rows at once (:func:`_correlate_stacked_rows`).
    """
    k, nw = buf.shape[1:-2].numel(), buf.shape[-2] * buf.shape[-1]
    offset = buf.storage_offset() + first * k * nw
    return buf.as_strided((count, length * k, nw), (step * k * nw, nw, 1), offset)


def _correlate_stacked_rows(
    rows: torch.Tensor,
    w_flat: torch.Tensor,
    stride: tuple[int, int],
    bias: torch.Tensor | None,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """Formula (1) for one chunk, all kernel rows in one contraction: ``(oH, O, n*oW)``.

    In the ``"height"`` order of :func:`row_windows`, ``(Hp, C, kW, n, oW)``, the ``kH``
    buffer rows that output row ``p`` reads (``p*sH`` to ``p*sH + kH - 1``) are one
    contiguous run: the windows of every output row are one overlapping strided view
    ``(oH, kH*C*kW, n*oW)`` of the buffer, no copy, and one batched GEMM with the kernel
    as ``w_flat[o, (i, c, j)]`` contracts each over ``(i, c, j)`` at once.

    ``rows``: the chunk's buffer, :func:`row_windows` of the padded input in that order.
    """
    n = rows.shape[3]
    o, k = w_flat.shape
    sh, (oh, ow) = stride[0], out_hw
    kh = k // (rows.shape[1] * rows.shape[2])  # k = kH*C*kW
    windows = row_runs(rows, oh, kh, sh)  # (oH, k, n*oW): rows p*sH + i
    w_b = w_flat.expand(oh, o, k)
    if bias is None:
        return gemm.bmm(w_b, windows)
    return gemm.baddbmm(bias.reshape(1, o, 1).expand(oh, o, n * ow), w_b, windows)


def use_phase_rows(w_shape: torch.Size, groups: int, *operands: torch.Tensor) -> bool:
    """Whether a conv takes the channels-last row buffer (:func:`phase_rows`): kernel rows
    wide enough (:func:`wide_rows`) where its GEMMs go channels-last
    (:func:`channels_last_gemms`).  At 2 threads, forward against the NCHW row GEMMs or
    Winograd (10th percentile of interleaved blocks, batch 4): ResNet 64@56 0.72x the
    time, 128@28 0.71x, 256@14 0.70x, 256@7 0.84x, the dilated 64@28 0.37x."""
    return wide_rows(w_shape, groups) and channels_last_gemms(groups, *operands)


def channels_last_gemms(groups: int, *operands: torch.Tensor) -> bool:
    """Whether an ungrouped conv's GEMMs run channels-last (:func:`_correlate_phase_rows`,
    :func:`conv_input_grad_columns_nhwc`): where oneDNN multiplies the ``operands``
    (:func:`_gemm.onednn_ready`), whose fast kernels need every operand dense -- which the
    NCHW buffers' per-kernel-row views and a transposed kernel are not."""
    return groups == 1 and gemm.onednn_ready(*operands)


def wide_rows(w_shape: torch.Size, groups: int) -> bool:
    """An ungrouped kernel of more than one tap whose rows are at least ``STACKED_ROW_MAX``
    wide (``C*kW``: ResNet's 3x3 convs, the dilated one)."""
    _, cg, kh, kw = w_shape
    return groups == 1 and kh * kw > 1 and cg * kw >= STACKED_ROW_MAX


def phase_rows(
    x: torch.Tensor, kernel: tuple[int, int], geo: ConvGeometry, out_hw: tuple[int, int]
) -> torch.Tensor:
    """The width-only im2col, channels-last and split by row phase: ``(sH, R, n, oW, kW*C)``.

    ``buf[f, r, n, q, (j, c)] = x_p[n, c, r*sH + f, q*sW + j*dW]``, one copy out of a strided
    view of a channels-last padded copy of ``x``.  Kernel row ``i`` reads padded rows
    ``p*sH + i*dH``: phase ``f = i*dH mod sH``, rows ``r = i*dH div sH + p`` -- ``oH``
    consecutive rows of one phase, so its operand is the contiguous matrix
    ``(oH*n*oW, kW*C)`` (:func:`phase_kernel_row`).  ``R`` rows per phase reach the last
    kernel row; the padded copy is cut (or zero-extended) to ``sH*R`` rows to match.
    """
    n, c, h, wd = x.shape
    kh, kw = kernel
    (sh, sw), (dh, dw), (oh, ow) = geo.stride, geo.dilation, out_hw
    r = phase_row_count(kh, sh, dh, oh)
    top, _, left, right = geo.padding
    xp = padded_nhwc(x, (top, sh * r - h - top, left, right))  # (n, sH*R, Wp, C)
    st = xp.stride()
    size = (sh, r, n, ow, kw, c)
    strides = (st[1], sh * st[1], st[0], sw * st[2], dw * st[2], st[3])
    return xp.as_strided(size, strides, xp.storage_offset()).reshape(sh, r, n * ow, kw * c)


def padded_nhwc(x: torch.Tensor, padding: Pad4) -> torch.Tensor:
    """A contiguous channels-last copy of ``x`` zero-padded by ``padding`` (negative crops):
    ``(N, H+top+bottom, W+left+right, C)``.  (F.pad lays out a padded copy contiguously, but
    clones an unpadded one as it is -- permuted -- which would be copied again.)"""
    top, bottom, left, right = padding
    pad = (0, 0, left, right, top, bottom)
    xp = x.permute(0, 2, 3, 1)
    return (xp if pad == (0,) * 6 else F.pad(xp, pad)).contiguous()


def tap_major_kernel(w: torch.Tensor) -> torch.Tensor:
    """The kernel as one channels-last GEMM operand: ``(O, kH*kW*C)``,
    ``out[o, (i, j, c)] = w[o, c, i, j]`` (one copy)."""
    o, c, kh, kw = w.shape
    return w.permute(0, 2, 3, 1).reshape(o, kh * kw * c)


def phase_row_count(kh: int, sh: int, dh: int, oh: int) -> int:
    """Rows per phase of a :func:`phase_rows` buffer: the last kernel row's first row,
    ``(kH-1)*dH div sH``, plus ``oH``."""
    return (kh - 1) * dh // sh + oh


def phase_rows_per_sample(
    w_shape: torch.Size, stride: tuple[int, int], dh: int, out_hw: tuple[int, int]
) -> int:
    """Elements of a :func:`phase_rows` buffer per sample: ``sH*R*oW*kW*C``."""
    _, c, kh, kw = w_shape
    sh = stride[0]
    return sh * phase_row_count(kh, sh, dh, out_hw[0]) * out_hw[1] * kw * c


def phase_kernel_row(buf: torch.Tensor, i: int, dh: int, oh: int) -> torch.Tensor:
    """Kernel row ``i``'s operand in a :func:`phase_rows` buffer: ``(oH*n*oW, kW*C)``, a
    contiguous view."""
    sh = buf.shape[0]
    first = i * dh // sh
    return buf[i * dh % sh, first : first + oh].reshape(-1, buf.shape[-1])


def phase_weight_rows(w: torch.Tensor) -> torch.Tensor:
    """The kernel as :func:`phase_rows` GEMM operands: ``(kH, O, kW*C)``,
    ``out[i, o, (j, c)] = w[o, c, i, j]`` (one copy)."""
    o, c, kh, kw = w.shape
    return w.permute(2, 0, 3, 1).reshape(kh, o, kw * c)


def _correlate_phase_rows(
    x: torch.Tensor,
    w: torch.Tensor,
    geo: ConvGeometry,
    bias: torch.Tensor | None,
    out_hw: tuple[int, int],
    chunks: list[slice],
) -> torch.Tensor:
    """Formula (1) on the channels-last row buffer (:func:`use_phase_rows`): per kernel row
    ``i`` one GEMM ``phase_kernel_row(i) @ w[:, :, i, :]^T`` (rows ``(p, n, q)``, columns
    ``o``), each adding the last one's result in the product (oneDNN's fused add), the bias
    in the first; then one permute to NCHW.  A chunk of the batch at a time, its buffer
    within :func:`phase_row_chunks` (``chunks``: :func:`channels_last_chunks`)."""
    n = x.shape[0]
    o, _, kh, kw = w.shape
    (dh, _), (oh, ow) = geo.dilation, out_hw
    w_rows = phase_weight_rows(w)

    def phase_chunk(_out: torch.Tensor | None, x_part: torch.Tensor) -> torch.Tensor:
        buf = phase_rows(x_part, (kh, kw), geo, out_hw)
        y = None
        for i in range(kh):
            m_i = phase_kernel_row(buf, i, dh, oh)
            y = gemm.linear(m_i, w_rows[i], bias if i == 0 else None, add=y)
        return y.view(oh, x_part.shape[0], ow, o).permute(1, 3, 0, 2)  # (n, O, oH, oW)

    return over_chunks(phase_chunk, chunks, (n, o, oh, ow), x)


def conv_weight_grad_phase_rows(
    x: torch.Tensor, g: torch.Tensor, w_shape: torch.Size, geo: ConvGeometry, chunks: list[slice]
) -> torch.Tensor:
    """Formula (3) on the channels-last row buffer, the transpose of
    :func:`_correlate_phase_rows`: ``dw[:, :, i, :] = g @ phase_kernel_row(i)`` with ``g``
    as ``(O, oH*n*oW)``, contracting over every output pixel of a chunk of the batch."""
    o, c, kh, kw = w_shape
    _, _, oh, ow = g.shape
    dh = geo.dilation[0]
    dw_rows = [None] * kh  # dw_rows[i][o, (j, c)] = dw[o, c, i, j]
    for part in chunks:
        buf = phase_rows(x[part], (kh, kw), geo, (oh, ow))
        g_rows = gradient_rows(g[part], 1)[0]  # g[o, (p, n, q)]
        for i in range(kh):
            m_i = phase_kernel_row(buf, i, dh, oh)
            dw_rows[i] = gemm.linear(g_rows, m_i.mT, add=dw_rows[i])
    return torch.stack(dw_rows).view(kh, o, kw, c).permute(1, 3, 0, 2).reshape(w_shape)


def columns_nhwc(
    x: torch.Tensor, kernel: tuple[int, int], geo: ConvGeometry, out_hw: tuple[int, int]
) -> torch.Tensor:
    """Full im2col, channels-last: every window of the padded ``x`` as one row,
    ``(n*oH*oW, kH*kW*C)``,
    ``cols[(n, p, q), (i, j, c)] = x_p[n, c, p*sH + i*dH, q*sW + j*dW]`` -- a channels-last
    padded copy (negative ``geo.padding`` crops), then one copy out of a strided view of it,
    whose innermost runs are ``C`` contiguous values on both sides."""
    n, c = x.shape[:2]
    kh, kw = kernel
    (sh, sw), (dh, dw), (oh, ow) = geo.stride, geo.dilation, out_hw
    xp = padded_nhwc(x, geo.padding)
    st = xp.stride()
    size = (n, oh, ow, kh, kw, c)
    strides = (st[0], sh * st[1], sw * st[2], dh * st[1], dw * st[2], st[3])
    return xp.as_strided(size, strides, xp.storage_offset()).reshape(n * oh * ow, kh * kw * c)


def channels_last_chunks(
    x_shape: torch.Size,
    w_shape: torch.Size,
    stride: tuple[int, int],
    padding: Pad4,
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> tuple[bool, list[slice]]:
    """For an ungrouped conv on oneDNN (:func:`use_phase_rows`): whether its GEMMs take the
    full channels-last im2col (:func:`columns_nhwc`) rather than the phase rows, and the
    chunks of the batch that layout runs in.

    Full columns make one product with a ``kH*kW*C`` contraction instead of ``kH`` with
    ``kW*C`` (more of oneDNN's peak; no partial sums re-read), for a buffer ``kH`` times
    as large.  torch's own forward keeps input, output and kernel alive (measured), so a
    chunk's buffers -- padded copy, columns, product -- take whole samples within that sum
    again, less the output and kernel we keep and a 5 % margin (peak memory about
    ``1.9x`` torch's; a chunk holds at least one sample: the dilated 64@28's forward,
    whose one sample's buffers exceed that room, measured 1.95x).  Each chunk's product
    re-lays out the kernel, so they are picked where they take no more chunks than the
    phase rows (:func:`phase_row_chunks`), or where their extra chunks' kernels are no
    larger than the input: ResNet 128->256/2 at 2 threads (2 chunks against 1) fwd+bwd
    1.20x torch's time against 1.30x; 256@14 (4 against 1) 1.02x the phase rows' time,
    kept on those.  Forward at 2 threads, batch 4 (10th percentile of 20 interleaved
    blocks), against the phase rows: ResNet 64@56 3.18 / 3.41 ms, 64->128/2 1.42 / 1.59,
    128@28 2.42 / 2.71, 256@7 0.63 / 0.72; dL/dw 3.00 / 3.16, 1.48 / 1.66, 2.29 / 2.60,
    0.59 / 0.62.
    """
    n, c, h, wd = x_shape
    o, _, kh, kw = w_shape
    out_numel = n * o * out_hw[0] * out_hw[1]
    full = full_column_chunks(x_shape, w_shape, padding, out_hw)
    phase_per_sample = phase_rows_per_sample(w_shape, stride, dilation[0], out_hw)
    phase = phase_row_chunks(n, phase_per_sample, n * c * h * wd, out_numel, o * c * kh * kw)
    # each chunk's product re-lays out the kernel: more chunks than the phase rows' pay
    # while those extra re-layouts cost no more than a pass over the input
    if (len(full) - len(phase)) * o * c * kh * kw <= n * c * h * wd:
        return True, full
    return False, phase


def nchw_weight_columns(c: int, out_w: int, stride: tuple[int, int]) -> bool:
    """Whether a full-columns dL/dw (:func:`channels_last_chunks`) takes NCHW columns
    (:func:`conv_weight_grad_columns_nchw`) rather than channels-last ones: stride 1 along
    the width, where a column's runs are ``oW`` values rather than ``C``, and ``C`` at most
    ``NCHW_RUN_RATIO`` times ``oW``.

    dL/dw alone at 2 threads, batch 4 (10th percentile of 10 interleaved blocks, huge pages),
    NCHW against channels-last columns (torch): ResNet 64@56 2.64 / 3.03 ms (2.08), the
    dilated 64@28 0.75 / 0.88 (0.51); 1 thread 5.00 / 5.38 (4.20) and 1.29 / 1.43 (1.01).
    Kept channels-last: 128@28 (C = 4.6 oW) 2.39 / 2.41, 256@14 2.31 / 2.09, 256@7 0.68 /
    0.53, and the strided convs (64->128/2 1.40 / 1.37).
    """
    return stride[1] == 1 and c <= NCHW_RUN_RATIO * out_w


def full_column_chunks(
    x_shape: torch.Size, w_shape: torch.Size, padding: Pad4, out_hw: tuple[int, int]
) -> list[slice]:
    """Chunks of the batch, in whole samples, for :func:`columns_nhwc`: a chunk's padded
    copy, columns and product within :func:`full_column_budget`."""
    n, c, h, wd = x_shape
    o, _, kh, kw = w_shape
    top, bottom, left, right = padding
    pixels = out_hw[0] * out_hw[1]
    per_sample = pixels * (kh * kw * c + o) + (h + top + bottom) * (wd + left + right) * c
    room = full_column_budget(n * c * h * wd, n * o * pixels, o * c * kh * kw)
    return batch_chunks(n, per_sample, max(room // per_sample, 1) * per_sample)


def full_column_budget(input_numel: int, output_numel: int, weight_numel: int) -> int:
    """Elements a chunk's :func:`columns_nhwc` buffers may take: 1.9x what torch's own
    forward keeps alive (input, output and kernel), less the output and kernel we keep."""
    return int(1.9 * (input_numel + output_numel + weight_numel)) - output_numel - weight_numel


def _correlate_columns_nhwc(
    x: torch.Tensor,
    w: torch.Tensor,
    geo: ConvGeometry,
    bias: torch.Tensor | None,
    out_hw: tuple[int, int],
    chunks: list[slice],
) -> torch.Tensor:
    """Formula (1) as one GEMM per chunk of the batch, ``columns_nhwc(x) @ w^T`` with the
    kernel as ``(O, kH*kW*C)`` and the bias added in the product: rows ``(n, p, q)``,
    columns ``o``, then one permute to NCHW."""
    o, c, kh, kw = w.shape
    oh, ow = out_hw
    w_taps = tap_major_kernel(w)

    def columns_chunk(_out: torch.Tensor | None, x_part: torch.Tensor) -> torch.Tensor:
        cols = columns_nhwc(x_part, (kh, kw), geo, out_hw)
        y = gemm.linear(cols, w_taps, bias)
        return y.view(x_part.shape[0], oh, ow, o).permute(0, 3, 1, 2)  # (n, O, oH, oW)

    return over_chunks(columns_chunk, chunks, (x.shape[0], o, oh, ow), x)


def conv_weight_grad_columns_nhwc(
    x: torch.Tensor, g: torch.Tensor, w_shape: torch.Size, geo: ConvGeometry, chunks: list[slice]
) -> torch.Tensor:
    """Formula (3), the transpose of :func:`_correlate_columns_nhwc`: ``dw = g @ columns``
    with ``g`` as ``(O, n*oH*oW)`` (one sample's ``g`` as it is), one GEMM per chunk of the
    batch, each adding the last one's result in the product."""
    o, c, kh, kw = w_shape
    oh, ow = g.shape[-2:]
    dw = None  # dw[o, (i, j, c)]
    for part in chunks:
        cols = columns_nhwc(x[part], (kh, kw), geo, (oh, ow))
        g_rows = g[part].transpose(0, 1).reshape(o, -1)  # g[o, (n, p, q)]
        dw = gemm.linear(g_rows, cols.mT, add=dw)
    return dw.view(o, kh, kw, c).permute(0, 3, 1, 2).reshape(w_shape)


def conv_weight_grad_columns_nchw(
    x: torch.Tensor, g: torch.Tensor, w_shape: torch.Size, geo: ConvGeometry, chunks: list[slice]
) -> torch.Tensor:
    """Formula (3) transposed, ``dw^T = columns(x_p) @ g^T``, on the NCHW full im2col
    (:func:`columns`, rows ``(c, i, j)``, columns the chunk's pixels ``(n, p, q)``) with ``g``
    as ``(O, n*oH*oW)`` (one sample's as it is): one GEMM per chunk of the batch, each adding
    the last one's result in the product, the result transposed once at the end.

    The columns are the product's row-major left operand, which oneDNN reads as it is, and
    ``g`` the operand it re-lays out: the other way round (:func:`conv_weight_grad_columns_nhwc`)
    it re-lays out the columns, just written, which cost more (:func:`nchw_weight_columns`).
    """
    o = w_shape[0]
    out_hw = tuple(g.shape[-2:])
    dw_t = None  # dw_t[(c, i, j), o]
    for part in chunks:
        xp = _pad(x[part], geo.padding)
        cols = columns(xp, w_shape[2:], geo.stride, geo.dilation, out_hw, 1, batch_inner=True)
        g_rows = g[part].transpose(0, 1).reshape(o, -1)  # g[o, (n, p, q)]
        dw_t = gemm.linear(cols[0], g_rows, add=dw_t)
    return dw_t.mT.reshape(w_shape)


def per_sample_rows(w_shape: torch.Size, stride: tuple[int, int]) -> bool:
    """Whether a conv has thin kernel rows: stride 1 down the height and rows thinner than
    ``THIN_KERNEL_ROW`` (not 1x1: its columns are the input as it is).  It runs per sample
    (:func:`_correlate_sample_rows`, :func:`conv_weight_grad_sample_rows`) unless its rows
    stack (:func:`stacked_rows`); then its weight gradient takes the stacked windows ``g``
    first (:func:`weight_grad_row_pairs`)."""
    _, cg, kh, kw = w_shape
    return stride[0] == 1 and cg * kw < THIN_KERNEL_ROW and kh * kw > 1


def _correlate_sample_rows(
    xp: torch.Tensor,
    w_rows: torch.Tensor,
    kw: int,
    sw: int,
    dilation: tuple[int, int],
    bias: torch.Tensor | None,
    out_hw: tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Formula (1) for one chunk, stride 1 down the height: per sample and kernel row
    ``i`` one GEMM ``w[:, :, i, :] @ sample_kernel_row(i)``, accumulated straight into
    NCHW ``(n, O, oH, oW)`` -- into ``out`` when given (:func:`over_chunks`).

    ``w_rows``: the kernel by rows, ``(kH, g, O/g, C/g*kW)`` (:func:`weight_rows`).
    """
    n = xp.shape[0]
    kh, groups, og, _ = w_rows.shape
    (dh, dw), (oh, ow) = dilation, out_hw
    rows = row_windows(xp, kw, dw, sw, ow, order="sample")
    if out is None:  # filled in place: the result is not a view
        out = xp.new_empty(n, groups * og, oh, ow)
    y = out.view(n * groups, og, oh * ow)
    if bias is not None:
        y.copy_(_per_sample(bias.reshape(groups, og, 1).expand(groups, og, oh * ow), n))
    for i in range(kh):
        m_i = sample_kernel_row(rows, groups, i, dh, oh)  # (n*g, C/g*kW, oH*oW), a view
        # y += w_i @ m_i (beta=0 first without a bias: the empty memory is ignored)
        gemm.baddbmm_(y, _per_sample(w_rows[i], n), m_i, beta=0 if i == 0 and bias is None else 1)
    return out


def use_columns(
    x_shape: torch.Size,
    w_shape: torch.Size,
    out_hw: tuple[int, int],
    stride: tuple[int, int],
    padding: Pad4,
) -> bool:
    """Pick the full im2col (:func:`columns`) over the width-only one (:func:`row_windows`).

    The width-only buffer is ``kH`` times smaller, but its per-kernel-row GEMMs need the
    weight re-laid out (a slow small-stride copy) and their output permuted to NCHW; the
    full one needs neither, and a 1x1 kernel reads the input as it is.  Estimated copy
    costs (element counts, the strided weight copy weighted by its measured ~2.5x) decide;
    a full buffer must fit one sample's budget (:func:`batch_chunks`).
    """
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    p = out_hw[0] * out_hw[1]
    full = c * kh * kw * p  # per sample
    if full > column_budget(n * c * h * w, n * o * p, o * cg * kh * kw):
        return False
    if kh * kw == 1 or stride != (1, 1):  # (a strided kernel row is not a view: no saving)
        return True
    hp = h + padding[0] + padding[1]
    width_only = c * kw * hp * out_hw[1] + o * p + (2.5 * o * cg * kh * kw) / max(n, 1)
    return full <= width_only


def columns(
    xp: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
    groups: int,
    batch_inner: bool = False,
) -> torch.Tensor:
    """Full im2col: every window of ``xp`` as a column, ``(n, g, C/g*kH*kW, oH*oW)``.

    ``cols[n, g, (c, i, j), (p, q)] = xp[n, g*C/g + c, p*sH + i*dH, q*sW + j*dW]``, one copy
    out of a strided view (none for a 1x1 kernel at stride 1).  With ``batch_inner`` the
    layout is ``(g, C/g*kH*kW, n*oH*oW)`` instead: one long contraction for the weight
    gradient.
    """
    n, c = xp.shape[:2]
    k = c // groups * kernel[0] * kernel[1]
    win = windows(xp, kernel, stride, dilation, out_hw)  # (n, C, oH, oW, kH, kW)
    if batch_inner:
        return win.permute(1, 4, 5, 0, 2, 3).reshape(groups, k, -1)
    return win.permute(0, 1, 4, 5, 2, 3).reshape(n, groups, k, -1)


def pointwise(
    w_shape: torch.Size, padding: Pad4, n: int, pixels: int, *operands: torch.Tensor
) -> bool:
    """Whether a conv runs as one product over every pixel of the batch
    (:func:`pointwise_correlate`, :func:`pointwise_grads`): a 1x1 kernel without padding
    (any stride, dilation or groups) where oneDNN multiplies (:func:`_gemm.onednn_ready`)
    -- unless each of the ``n`` samples' ``pixels`` is one product large enough for oneDNN
    on its own (``ONEDNN_MIN_MACS``) and the channels are thin, ``O*C/g < 32*(O + C/g)``: then the
    copies to and from the batch's layout cost more than the per-sample products lose, and
    the NCHW layouts multiply each sample as it is.

    The batch's operands are channel-major, ``(C, N*oH*oW)``: copied from and back to NCHW
    a plane at a time, where a channels-last ``(N*oH*oW, C)`` layout would need element-wise
    transposes (5-15x the time of a plain copy here).  fwd+bwd at 2 threads, batch 4 (10th
    percentile of 12 interleaved blocks), against the NCHW layouts (torch's in brackets):
    ResNet's 256->64@14 0.56 against 0.66 ms (0.46); 1024->256@14 3.46 against 4.42 (3.29);
    512->2048@7 3.76 against 5.64 (3.19); 256->512/2@56 7.48 against 9.25 (11.10);
    64->256@56 4.98 against 4.84 (4.46); thin, 32->128@56 1.95 against 1.47 (1.47): left
    per sample."""
    if w_shape[-2:] != (1, 1) or padding != (0, 0, 0, 0):
        return False
    o, cg = w_shape[:2]
    thin = o * cg < 32 * (o + cg)
    if n > 1 and thin and o * cg * pixels >= gemm.ONEDNN_MIN_MACS:
        return False
    return gemm.onednn_ready(*operands)


def pointwise_columns(x: torch.Tensor, stride: tuple[int, int], groups: int) -> torch.Tensor:
    """The pixels a 1x1 kernel reads (of ``x``, or of ``g`` at stride 1), every sample's side
    by side, as GEMM columns: ``(g, C/g, N*oH*oW)``, ``cols[g, c, (n, p, q)] =
    x[n, g*C/g + c, p*sH, q*sW]`` (one copy, a plane at a time)."""
    if stride != (1, 1):
        x = x[..., :: stride[0], :: stride[1]]
    return x.transpose(0, 1).reshape(groups, x.shape[1] // groups, -1)


def pointwise_correlate(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: tuple[int, int],
    groups: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Formula (1) for a 1x1 kernel: per output pixel a matrix-vector product,
    ``y[n, :, p, q] = b + w[:, :, 0, 0] @ x[n, :, p*sH, q*sW]`` (per group); every pixel of
    the batch is a column of one GEMM ``w @ cols`` (:func:`pointwise_columns`), whose
    ``(O, N, oH, oW)`` result is copied back to NCHW."""
    n, o = x.shape[0], w.shape[0]
    oh, ow = (x.shape[2] - 1) // stride[0] + 1, (x.shape[3] - 1) // stride[1] + 1
    w_g = w.reshape(groups, o // groups, -1)  # (g, O/g, C/g)
    cols = pointwise_columns(x, stride, groups)
    if bias is None:
        y = gemm.bmm(w_g, cols)
    else:
        y = gemm.baddbmm(bias.reshape(groups, o // groups, 1), w_g, cols)
    return y.view(o, n, oh, ow).transpose(0, 1).contiguous()


def pointwise_grads(
    x: torch.Tensor,
    g: torch.Tensor,
    w: torch.Tensor,
    geo: ConvGeometry,
    need_x: bool,
    need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Formulas (4) and (3) for a 1x1 kernel (:func:`pointwise`), both from one
    channel-major copy of ``g``, ``g_cols`` (:func:`pointwise_columns`):

    (4) rotating a 1x1 kernel changes nothing, and the full convolution is per pixel the
        transposed product, ``dx[n, :, p*sH, q*sW] = w[:, :, 0, 0]^T @ g[n, :, p, q]`` (per
        group), zero at the pixels a stride skips: one GEMM ``w^T @ g_cols``;
    (3) ``dw[o, c] = sum_{n,p,q} g[n, o, p, q] * x[n, c, p*sH, q*sW]`` (per group): one GEMM
        ``g_cols @ x_cols^T``.
    """
    n, o, oh, ow = g.shape
    stride, groups = geo.stride, geo.groups
    g_cols = pointwise_columns(g, (1, 1), groups)  # (g, O/g, N*oH*oW)
    gx = gw = None
    if need_x:
        c = w.shape[1] * groups
        w_t = w.reshape(groups, o // groups, -1).transpose(1, 2)  # (g, C/g, O/g)
        dx = gemm.bmm(w_t, g_cols).view(c, n, oh, ow).transpose(0, 1)
        if stride == (1, 1):
            gx = dx.contiguous()
        else:
            gx = g.new_zeros(x.shape)
            gx[..., :: stride[0], :: stride[1]] = dx
    if need_w:
        x_cols = pointwise_columns(x, stride, groups)
        gw = gemm.bmm(g_cols, x_cols.transpose(1, 2)).view(w.shape)
    return gx, gw


def _per_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    """``(g, a, b)`` -> ``(n*g, a, b)``, the same matrices for every sample (a view if g == 1)."""
    return t.expand(n, *t.shape).reshape(-1, *t.shape[1:])


def _correlate_columns(
    xp: torch.Tensor,
    w: torch.Tensor,
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    bias: torch.Tensor | None,
    out_hw: tuple[int, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Formula (1) as ``w @ columns(xp)``: one GEMM per sample (and group), written
    straight in NCHW -- into ``out`` when given (:func:`over_chunks`).  Under
    ``PER_SAMPLE_COLUMNS`` output pixels per sample those GEMMs are too narrow (measured):
    one GEMM over the whole batch's columns, returned as a permuted view -- except for a 1x1
    kernel at stride 1, whose columns are ``xp`` itself, read as it is (where oneDNN
    multiplies, :func:`pointwise` takes the unpadded ones)."""
    n = xp.shape[0]
    o, _, kh, kw = w.shape
    oh, ow = out_hw
    w_g = w.reshape(groups, o // groups, -1)  # (g, O/g, C/g*kH*kW)
    b = None if bias is None else bias.reshape(groups, o // groups, 1)
    free_view = kh * kw == 1 and stride == (1, 1)  # a 1x1 kernel's columns are x itself
    if not free_view and oh * ow < PER_SAMPLE_COLUMNS:
        cols = columns(xp, (kh, kw), stride, dilation, (oh, ow), groups, batch_inner=True)
        if b is None:
            y = gemm.bmm(w_g, cols)
        else:
            y = gemm.baddbmm(b.expand(-1, -1, cols.shape[-1]), w_g, cols)
        return y.view(o, n, oh, ow).transpose(0, 1)  # (made contiguous by over_chunks)
    cols = columns(xp, (kh, kw), stride, dilation, (oh, ow), groups)
    cols = cols.reshape(n * groups, -1, oh * ow)  # (vmap has no rule for flatten)
    if out is None:  # filled in place, so the result is not a view
        out = xp.new_empty(n, o, oh, ow)
    y = out.view(n * groups, o // groups, oh * ow)
    if b is None:
        gemm.baddbmm_(y, _per_sample(w_g, n), cols, beta=0)  # (beta=0: the empty memory is ignored)
    else:
        y.copy_(_per_sample(b.expand(-1, -1, oh * ow), n)).baddbmm_(_per_sample(w_g, n), cols)
    return out


def sample_columns(
    x_shape: torch.Size,
    w_shape: torch.Size,
    groups: int,
    padding: Pad4,
    out_hw: tuple[int, int],
    *operands: torch.Tensor,
) -> bool:
    """Whether a conv's forward runs one oneDNN product per sample on that sample's NCHW
    columns (:func:`_correlate_sample_columns`): ungrouped, more than one tap, at least
    ``PER_SAMPLE_COLUMNS`` output pixels, one sample's columns within
    ``SAMPLE_COLUMNS_MAX`` elements and a product of at least ``ONEDNN_MIN_MACS``
    (:func:`_gemm.onednn_gemm`'s size), where oneDNN multiplies (:func:`_gemm.onednn_ready`)
    -- and where its buffers fit :func:`full_column_budget` (1.9x what torch's own forward
    keeps alive): one sample's padded input, columns and product (oneDNN reads the columns
    as they are: measured, no copy).  At batch 4 that takes ResNet 64->128/2, 128@28 and
    the dilated 64@28 (forward peak memory 0.99x, 1.71x and 1.87x torch's)."""
    n, c, h, wd = x_shape
    o, cg, kh, kw = w_shape
    pixels = out_hw[0] * out_hw[1]
    k = cg * kh * kw
    if groups != 1 or kh * kw == 1 or pixels < PER_SAMPLE_COLUMNS:
        return False
    if k * pixels > SAMPLE_COLUMNS_MAX or o * k * pixels < gemm.ONEDNN_MIN_MACS:
        return False
    top, bottom, left, right = padding
    buffers = c * (h + top + bottom) * (wd + left + right) + k * pixels + o * pixels
    if buffers > full_column_budget(n * c * h * wd, n * o * pixels, o * k):
        return False
    return gemm.onednn_ready(*operands)


def _correlate_sample_columns(
    x: torch.Tensor,
    w: torch.Tensor,
    geo: ConvGeometry,
    bias: torch.Tensor | None,
    out_hw: tuple[int, int],
) -> torch.Tensor:
    """Formula (1) one sample at a time: ``y[n] = w @ columns(x_p[n]) + b``, the kernel as it
    is, ``(O, C*kH*kW)``, and the sample's full im2col ``(C*kH*kW, oH*oW)`` (:func:`columns`
    of the sample padded; oneDNN reads it as a column-major operand, no copy): the product
    is the sample's NCHW output, nothing to permute, and one sample's columns are small
    enough to stay in cache between their copy and their product.  Only one sample's
    buffers are alive at a time."""
    n = x.shape[0]
    o = w.shape[0]
    oh, ow = out_hw
    w_flat = w.reshape(o, -1)
    out = x.new_empty(n, o, oh, ow)
    for k in range(n):
        xp = _pad(x[k : k + 1], geo.padding)
        cols = columns(xp, w.shape[2:], geo.stride, geo.dilation, out_hw, 1)[0, 0]
        y = gemm.linear(w_flat, cols.mT).view(o, oh, ow)
        del xp, cols  # (freed before the next sample's)
        if bias is None:
            out[k].copy_(y)
        else:
            torch.add(y, bias.view(o, 1, 1), out=out[k])
    return out


def _pad(x: torch.Tensor, pad: Pad4) -> torch.Tensor:
    top, bottom, left, right = pad
    if pad == (0, 0, 0, 0):
        return x
    return F.pad(x, (left, right, top, bottom))


def conv_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    geo: ConvGeometry,
    keep: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Formula (1): ``y = correlate(pad(x), w) + b`` on a batched input (``keep``: see
    :func:`correlate`)."""
    return correlate(x, w, geo.stride, geo.padding, geo.dilation, geo.groups, b, keep)


def gradient_rows(g: torch.Tensor, groups: int) -> torch.Tensor:
    """``g`` laid out like the GEMM outputs of :func:`correlate`: ``(g, O/g, oH*N*oW)``."""
    n, o, oh, ow = g.shape
    return g.permute(1, 2, 0, 3).reshape(groups, o // groups, oh * n * ow)


def conv_input_grad(
    g: torch.Tensor,
    w: torch.Tensor,
    input_hw: tuple[int, int],
    geo: ConvGeometry,
    padded_g: torch.Tensor | None = None,
    form: str | None = None,
) -> torch.Tensor:
    """Formula (4): dL/dx as a full convolution of ``g`` with the 180-deg rotated kernel.

    Written literally for size-preserving ("same") convs with a kernel small next to the
    activations: ``g`` is padded by ``d*(k-1)`` and correlated with the rotated kernel,
    its in/out channel roles swapped, by the forward's own :func:`correlate`.  Where that
    would spend most of its work on padded or stride-inserted zeros (a strided conv, a
    shrinking one such as LeNet's) or on re-laying out a large kernel, the same sum is
    evaluated as the transpose of the forward GEMMs instead, which uses the kernel as it
    is: :func:`conv_input_grad_columns` (col2im), :func:`conv_input_grad_stacked_rows`
    (rows stacked as the forward stacks them: LeNet conv2, 10th percentile of 60
    interleaved blocks, 0.84-0.87x the time of the row scatter at batch 64 and 0.89-0.94x
    at 256 at 2 threads) or
    :func:`conv_input_grad_scatter` (row scatter).  (The backward of a depthwise conv
    takes :func:`depthwise_grads`.)  :func:`input_grad_form` picks.

    ``padded_g``: :func:`stacked_gradient_rows` of ``g``, if already made; ``form``: what
    :func:`input_grad_form` says, if already asked.
    """
    if form is None:
        form = input_grad_form(g, w, input_hw, geo)
    if form == "winograd":
        top, bottom, left, right = geo.padding
        pad4 = (2 - top, 2 - bottom, 2 - left, 2 - right)  # "full" padding d*(k-1), cropped
        return winograd_correlate(g, w, pad4, rotated=True)
    if form == "columns_nhwc":
        return conv_input_grad_columns_nhwc(g, w, input_hw, geo)
    if form == "columns":
        return conv_input_grad_columns(g, w, input_hw, geo)
    if form == "stacked_rows":
        return conv_input_grad_stacked_rows(g, w, input_hw, geo, padded_g)
    if form == "scatter":
        return conv_input_grad_scatter(g, w, input_hw, geo)
    # literally: "full" padding d*(k-1) on both sides of g, minus the forward's padding
    # (cropped away), and the kernel rotated by 180 deg, in/out channels swapped within
    # each group: (C, O/g, kH, kW)
    (dh, dw), groups, (top, bottom, left, right) = geo.dilation, geo.groups, geo.padding
    o, cg, kh, kw = w.shape
    full_h, full_w = dh * (kh - 1), dw * (kw - 1)
    w_rot = (
        w.reshape(groups, o // groups, cg, kh, kw)
        .transpose(1, 2)
        .reshape(groups * cg, o // groups, kh, kw)
        .flip(-2, -1)
    )
    pad4 = (full_h - top, full_h - bottom, full_w - left, full_w - right)
    return correlate(g, w_rot, (1, 1), pad4, (dh, dw), groups)


def input_grad_form(
    g: torch.Tensor, w: torch.Tensor, input_hw: tuple[int, int], geo: ConvGeometry
) -> str:
    """Which form of (4) :func:`conv_input_grad` takes: ``"literal"``, ``"winograd"``,
    ``"columns_nhwc"``, ``"columns"``, ``"stacked_rows"`` or ``"scatter"``."""
    (sh, sw), groups = geo.stride, geo.groups
    n, o, oh, ow = g.shape
    _, cg, kh, kw = w.shape
    h, wd = input_hw
    same_size = (sh, sw) == (1, 1) and (oh, ow) == (h, wd)
    # the literal form's forward, with the rotated kernel's (C, O/g, kH, kW) rows
    phase = same_size and use_phase_rows((cg * groups, o // groups, kh, kw), groups, g, w)
    winograd = use_winograd(w.shape, geo.stride, geo.dilation, groups, (h, wd), g.dtype)
    if same_size and not phase and winograd:
        return "winograd"
    # the literal form re-lays out the kernel (a slow strided copy, weighted by its
    # measured ~2.5x): worth it when the kernel is small next to the activations
    small_kernel = 2.5 * w.numel() <= n * cg * groups * h * wd
    if phase or (same_size and small_kernel):
        return "literal"
    if use_columns((n, cg * groups, h, wd), w.shape, (oh, ow), geo.stride, geo.padding):
        return "columns_nhwc" if kh * kw > 1 and channels_last_gemms(groups, g, w) else "columns"
    if sh == 1 and stacked_rows(w.shape, geo.dilation, groups):
        return "stacked_rows"
    return "scatter"


def tap_reads(
    tap: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    out_hw: tuple[int, int],
) -> tuple[slice, slice]:
    """The padded rows and columns kernel tap ``(i, j)`` reads for the output pixels
    ``(p, q)``: ``p*sH + i*dH`` and ``q*sW + j*dW``, as slices."""
    (i, j), (sh, sw), (dh, dw), (oh, ow) = tap, stride, dilation, out_hw
    return slice(i * dh, i * dh + (oh - 1) * sh + 1, sh), slice(
        j * dw, j * dw + (ow - 1) * sw + 1, sw
    )


def conv_input_grad_columns(
    g: torch.Tensor,
    w: torch.Tensor,
    input_hw: tuple[int, int],
    geo: ConvGeometry,
) -> torch.Tensor:
    """Formula (4) as the transpose of :func:`_correlate_columns`: per sample,
    ``dcols = w^T @ g`` is the gradient of every window's column, and each kernel tap
    ``(i, j)`` adds its rows back onto the pixels it read (col2im)."""
    groups = geo.groups
    top, bottom, left, right = geo.padding
    n, o, oh, ow = g.shape
    _, cg, kh, kw = w.shape
    c, (h, wd) = cg * groups, input_hw
    hp, wp = h + top + bottom, wd + left + right
    w_t = w.reshape(groups, o // groups, cg * kh * kw).transpose(1, 2)  # (g, C/g*kH*kW, O/g)

    def col2im_chunk(out: torch.Tensor | None, g_part: torch.Tensor) -> torch.Tensor:
        m = g_part.shape[0]
        free_view = kh * kw == 1 and (hp, wp) == (oh, ow)  # a 1x1 kernel read every pixel once
        if not free_view and oh * ow < PER_SAMPLE_COLUMNS:  # as the forward: one GEMM
            g_rows = g_part.reshape(m, groups, o // groups, oh * ow).permute(1, 2, 0, 3)
            dcols = gemm.bmm(w_t, g_rows.reshape(groups, o // groups, m * oh * ow))
            dcols = dcols.view(c, kh, kw, m, oh, ow).permute(3, 0, 1, 2, 4, 5)
        else:
            g_rows = g_part.reshape(m * groups, o // groups, oh * ow)
            dcols = gemm.bmm(_per_sample(w_t, m), g_rows).view(m, c, kh, kw, oh, ow)
        if free_view:
            dxp = dcols.view(m, c, hp, wp)
        else:  # (unpadded, a chunk's slice of the result is the buffer: over_chunks)
            unpadded = out is not None and (top, bottom, left, right) == (0, 0, 0, 0)
            dxp = out.zero_() if unpadded else g.new_zeros(m, c, hp, wp)
            for i in range(kh):
                for j in range(kw):
                    read = tap_reads((i, j), geo.stride, geo.dilation, (oh, ow))
                    at(dxp, read).add_(dcols[:, :, i, j])
        return _pad(dxp, (-top, -bottom, -left, -right))  # the padding's gradient is dropped

    budget = column_budget(n * c * h * wd, g.numel(), w.numel())
    chunks = batch_chunks(n, c * kh * kw * oh * ow, budget)
    return over_chunks(col2im_chunk, chunks, (n, c, h, wd), g)


def conv_input_grad_columns_nhwc(
    g: torch.Tensor,
    w: torch.Tensor,
    input_hw: tuple[int, int],
    geo: ConvGeometry,
) -> torch.Tensor:
    """:func:`conv_input_grad_columns` channels-last, where oneDNN multiplies (ungrouped):
    ``dcols = g @ w`` with ``g`` as ``(n*oH*oW, O)`` and the kernel as ``(O, kH*kW*C)``, one
    product per chunk of the batch, then each tap ``(i, j)`` adds its ``C`` columns back
    onto the pixels it read, in a channels-last copy of the padded input -- runs of ``C``
    contiguous values on both sides -- permuted to NCHW at the end.  ResNet 128->256/2's
    dL/dx at 2 threads: 0.73x the time of the NCHW col2im (10th percentile of 8 blocks)."""
    top, bottom, left, right = geo.padding
    n, o, oh, ow = g.shape
    _, c, kh, kw = w.shape
    (h, wd), hp, wp = input_hw, input_hw[0] + top + bottom, input_hw[1] + left + right
    w_taps = tap_major_kernel(w)

    def col2im_chunk(_out: torch.Tensor | None, g_part: torch.Tensor) -> torch.Tensor:
        m = g_part.shape[0]
        g_cols = g_part.permute(0, 2, 3, 1).reshape(m * oh * ow, o)  # g[(n, p, q), o]
        dcols = gemm.linear(g_cols, w_taps.mT).view(m, oh, ow, kh, kw, c)
        dxp = g_part.new_zeros(m, hp, wp, c)
        for i in range(kh):
            for j in range(kw):
                rows, cols = tap_reads((i, j), geo.stride, geo.dilation, (oh, ow))
                dxp[:, rows, cols].add_(dcols[:, :, :, i, j])
        return dxp[:, top : top + h, left : left + wd].permute(0, 3, 1, 2)  # (n, C, H, W)

    budget = column_budget(n * c * h * wd, g.numel(), w.numel())
    chunks = batch_chunks(n, c * kh * kw * oh * ow, budget)
    return over_chunks(col2im_chunk, chunks, (n, c, h, wd), g)


def conv_input_grad_stacked_rows(
    g: torch.Tensor,
    w: torch.Tensor,
    input_hw: tuple[int, int],
    geo: ConvGeometry,
    padded_g: torch.Tensor | None = None,
) -> torch.Tensor:
    """Formula (4) for :func:`stacked_rows` convs of stride 1 down the height: the
    gradient of the width-only row buffer in one batched GEMM, then a scatter along the
    width.

    Buffer row ``u`` (of the padded input) was read by kernel row ``i`` for output row
    ``u - i``, so its gradient sums ``w[:, :, i, :]^T @ g[u - i]`` over ``i``: one
    contraction over ``(i, o)`` of the kernel, flipped along the height, with the ``kH``
    rows of ``g`` ending at ``u`` -- one contiguous run of a copy of ``g`` laid out
    ``(rows, O, n, oW)`` with ``kH - 1`` zero rows before and after, so every run is one
    overlapping strided view ``(H, kH*O, n*oW)``, as in :func:`_correlate_stacked_rows`.
    Only the rows the forward's padding does not crop are computed.  Each kernel column
    ``j`` then adds its rows back where it read them, ``v = q*sW + j*dW``.

    ``padded_g``: that copy of ``g`` (:func:`stacked_gradient_rows`), if already made; used
    where the batch runs in one chunk (:func:`row_chunks`).
    """
    top, bottom, left, right = geo.padding
    (_, sw), dw = geo.stride, geo.dilation[1]
    n, o, oh, ow = g.shape
    _, c, kh, kw = w.shape
    h, wd = input_hw
    wp = wd + left + right
    # w_stack[(c, j), (r, o)] = w[o, c, kH-1-r, j]: row r of a run is g's row u - (kH-1-r)
    w_stack = w.flip(2).permute(1, 3, 2, 0).reshape(c * kw, kh * o)

    def stacked_chunk(_out: torch.Tensor | None, g_part: torch.Tensor) -> torch.Tensor:
        m = g_part.shape[0]
        whole = padded_g is not None and g_part is g  # (one chunk: g_part is g itself)
        padded = padded_g if whole else stacked_gradient_rows(g_part, kh)
        runs = row_runs(padded, h, kh, first=top)  # (H, kH*O, m*oW)
        d_rows = gemm.bmm(w_stack.expand(h, c * kw, kh * o), runs).view(h, c, kw, m, ow)
        dxp = g_part.new_zeros(h, c, m, wp)
        if sw == 1 and not torch.is_grad_enabled():
            # column j's reads, v = q + j*dW: the windows of one unfold, fewer calls (not
            # where a double backward records: autograd refuses in-place ops on unbind's views)
            reads = dxp.unfold(3, ow, dw).unbind(3)  # (kW views, as d_rows.unbind(2))
            for read, d_j in zip(reads, d_rows.unbind(2), strict=True):
                read.add_(d_j)
        else:
            for j in range(kw):
                dxp = _add_at(dxp, 3, j * dw, ow, sw, d_rows.select(2, j))
        return dxp.narrow(3, left, wd).permute(2, 1, 0, 3)  # (n, C, H, W)

    chunks = row_chunks((n, c, h, wd), g.shape, w.shape, geo.padding, stacked=True)
    return over_chunks(stacked_chunk, chunks, (n, c, h, wd), g)


def stacked_gradient_rows(g: torch.Tensor, kh: int) -> torch.Tensor:
    """``g`` laid out by rows, ``(kH-1 + oH + kH-1, O, n, oW)``: its rows ``(O, n, oW)``
    between ``kH - 1`` zero rows on either side -- the buffer whose runs of ``kH`` rows
    :func:`conv_input_grad_stacked_rows` contracts, and whose middle ``oH`` rows,
    ``g[p, o, (n, q)]``, :func:`conv_weight_grad_stacked_rows` contracts (one copy of
    ``g`` for both: :func:`shared_gradient_rows`)."""
    n, o, oh, ow = g.shape
    g_rows = g.new_empty(oh + 2 * (kh - 1), o, n, ow)
    g_rows.narrow(0, 0, kh - 1).zero_()
    g_rows.narrow(0, kh - 1 + oh, kh - 1).zero_()
    g_rows.narrow(0, kh - 1, oh).copy_(g.permute(2, 1, 0, 3))
    return g_rows


def shared_gradient_rows(
    x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, geo: ConvGeometry
) -> torch.Tensor | None:
    """:func:`stacked_gradient_rows` of ``g`` where both (4) and (3) would copy ``g`` into
    that layout, each in one chunk of the batch (LeNet conv2); else ``None``.  Called
    where (4) takes the stacked rows (:func:`input_grad_form`) and (3) contracts the
    forward's kept row buffer (:func:`stacked_weight_grad`, decided in the forward).
    Two copies of ``g`` become one: LeNet conv2's fwd+bwd at 2 threads (10th percentile
    of 24 interleaved blocks) 3.15 against 3.33 ms at batch 256, 0.910 against 0.916 at
    64."""
    if per_sample_rows(w.shape, geo.stride):
        return None  # (thin rows: dL/dw contracts g in pairs of rows)
    # (dL/dx and dL/dw take the same chunks)
    if row_chunks(x.shape, g.shape, w.shape, geo.padding, stacked=True) != [slice(None)]:
        return None
    return stacked_gradient_rows(g, w.shape[2])


def conv_input_grad_scatter(
    g: torch.Tensor,
    w: torch.Tensor,
    input_hw: tuple[int, int],
    geo: ConvGeometry,
) -> torch.Tensor:
    """Formula (4) as a scatter: every output gradient ``g[n,o,p,q]`` sends
    ``g * w[o,c,i,j]`` back to the input pixel its window read, ``(p*s+i*d, q*s+j*d)``.

    Per kernel row ``i`` one GEMM ``w[:, :, i, :]^T @ g`` gives the gradient of the
    row buffer of :func:`row_windows`; adding those rows back where they were read
    (first along the height, then along the width) is exactly the full convolution
    with the rotated kernel, without materializing the zero-inserted, padded ``g``.
    """
    top, bottom, left, right = geo.padding
    n, o, oh, ow = g.shape
    c, kw = w.shape[1] * geo.groups, w.shape[3]
    hp, wp = input_hw[0] + top + bottom, input_hw[1] + left + right
    crop = (-top, -bottom, -left, -right)  # the padding's gradient is dropped
    w_rows = weight_rows(w, geo.groups)
    chunks = batch_chunks(n, c * kw * hp * ow, row_budget(n * c * hp * wp, g.numel()))
    return over_chunks(
        lambda _out, g_part: _pad(_scatter_rows(g_part, w_rows, kw, (hp, wp), geo), crop),
        chunks,
        (n, c, *input_hw),
        g,
    )


def _scatter_rows(
    g: torch.Tensor,
    w_rows: torch.Tensor,
    kw: int,
    padded_hw: tuple[int, int],
    geo: ConvGeometry,
) -> torch.Tensor:
    """Formula (4) for one chunk of the batch, onto the padded input ``(n, C, Hp, Wp)``.

    ``w_rows``: the kernel by rows, ``(kH, g, O/g, C/g*kW)`` (:func:`weight_rows`).
    """
    (sh, sw), (dh, dw), groups = geo.stride, geo.dilation, geo.groups
    n, o, oh, ow = g.shape
    kh, cg = w_rows.shape[0], w_rows.shape[3] // kw
    hp, wp = padded_hw
    g_rows = gradient_rows(g, groups)  # g[o, (p, n, q)]
    d_rows = g.new_zeros(groups, cg * kw, hp, n * ow)  # dL/d(row buffer)
    for i in range(kh):
        w_i = w_rows[i].transpose(1, 2)
        if sh == 1 and d_rows.numel() <= IN_PLACE_GEMM_MAX:
            # the rows kernel row i read are contiguous: accumulate the GEMM there
            d_at = d_rows if oh == hp else d_rows[:, :, i * dh : i * dh + oh]  # (vmap: no alias)
            d_at = d_at.view(groups, cg * kw, oh * n * ow)
            gemm.baddbmm_(d_at, w_i, g_rows)  # += w_i^T @ g
        else:
            d_i = gemm.bmm(w_i, g_rows).reshape(groups, cg * kw, oh, n * ow)
            d_rows = _add_at(d_rows, 2, i * dh, oh, sh, d_i)
    d_rows = d_rows.reshape(groups * cg, kw, hp, n, ow)
    # the width scatter in the buffer's own (C, Hp, n, .) layout, whose adds read contiguous
    # runs (through the NCHW permute they took 1.2-1.3x as long), then one permute to NCHW
    dxp = g.new_zeros(groups * cg, hp, n, wp)
    for j in range(kw):
        dxp = _add_at(dxp, 3, j * dw, ow, sw, d_rows[:, j])
    return dxp.permute(2, 0, 1, 3)  # (n, C, Hp, Wp)


def _add_at(
    buf: torch.Tensor, dim: int, start: int, length: int, step: int, value: torch.Tensor
) -> torch.Tensor:
    """``buf[..., start : start + length*step : step, ...] += value`` along ``dim``."""
    if start == 0 and step == 1 and length == buf.shape[dim]:
        return buf + value  # (a full-range slice would break vmap)
    if step == 1:  # (narrow: a cheaper call than indexing)
        buf.narrow(dim, start, length).add_(value)
        return buf
    index = [slice(None)] * buf.dim()
    index[dim] = slice(start, start + (length - 1) * step + 1, step)
    buf[tuple(index)].add_(value)
    return buf


def conv_weight_grad(
    x: torch.Tensor,
    g: torch.Tensor,
    w_shape: torch.Size,
    geo: ConvGeometry,
    rows: torch.Tensor | None = None,
    padded_g: torch.Tensor | None = None,
) -> torch.Tensor:
    """Formula (3): dL/dw, the correlation of the padded input with ``g``, in the GEMM
    layout the forward uses for this shape (or its NCHW twin,
    :func:`conv_weight_grad_columns_nchw`): :func:`winograd_weight_grad`,
    :func:`conv_weight_grad_sample_rows`, :func:`conv_weight_grad_columns` or
    :func:`conv_weight_grad_rows`.  ``rows``: the stacked forward's row buffer of ``x``
    (:func:`correlate`'s ``keep``), and ``padded_g``, ``g`` laid out by rows
    (:func:`shared_gradient_rows`), reused where :func:`stacked_weight_grad`."""
    if rows is not None or stacked_weight_grad(x, g, w_shape, geo):  # (kept: it stacks)
        thin = per_sample_rows(w_shape, geo.stride)  # (LeNet conv1: g first, in row pairs)
        return conv_weight_grad_stacked_rows(
            x, g, w_shape, geo, g_first=thin, rows=rows, padded_g=padded_g
        )
    if use_phase_rows(w_shape, geo.groups, x, g):
        out_hw = tuple(g.shape[-2:])
        full, chunks = channels_last_chunks(
            x.shape, w_shape, geo.stride, geo.padding, geo.dilation, out_hw
        )
        if full and nchw_weight_columns(x.shape[1], out_hw[1], geo.stride):
            return conv_weight_grad_columns_nchw(x, g, w_shape, geo, chunks)
        if full:
            return conv_weight_grad_columns_nhwc(x, g, w_shape, geo, chunks)
        return conv_weight_grad_phase_rows(x, g, w_shape, geo, chunks)
    if use_winograd(w_shape, geo.stride, geo.dilation, geo.groups, tuple(g.shape[-2:]), x.dtype):
        return winograd_weight_grad(x, g, w_shape, geo.padding)
    if per_sample_rows(w_shape, geo.stride):
        return conv_weight_grad_sample_rows(x, g, w_shape, geo)
    if use_columns(x.shape, w_shape, tuple(g.shape[-2:]), geo.stride, geo.padding):
        return conv_weight_grad_columns(x, g, w_shape, geo)
    return conv_weight_grad_rows(x, g, w_shape, geo)


def stacked_weight_grad(
    x: torch.Tensor, g: torch.Tensor, w_shape: torch.Size, geo: ConvGeometry
) -> bool:
    """Whether :func:`conv_weight_grad` contracts the stacked forward's row buffer
    (:func:`conv_weight_grad_stacked_rows`): a :func:`stacked_rows` conv that takes
    neither the channels-last layouts nor Winograd nor full columns."""
    out_hw = tuple(g.shape[-2:])
    if not stacked_rows(w_shape, geo.dilation, geo.groups) or use_phase_rows(
        w_shape, geo.groups, x, g
    ):
        return False
    if use_winograd(w_shape, geo.stride, geo.dilation, geo.groups, out_hw, x.dtype):
        return False
    thin = per_sample_rows(w_shape, geo.stride)  # (thin rows stack whatever the columns)
    return thin or not use_columns(x.shape, w_shape, out_hw, geo.stride, geo.padding)


def conv_weight_grad_rows(
    x: torch.Tensor,
    g: torch.Tensor,
    w_shape: torch.Size,
    geo: ConvGeometry,
) -> torch.Tensor:
    """Formula (3) kernel row by kernel row, the transpose of :func:`_correlate_rows`:
    ``dw[:, :, i, :] = g @ kernel_row(i)^T``, contracting over every output pixel of
    every sample of a chunk at once."""
    o, cg, kh, kw = w_shape
    (sh, sw), (dh, dw), groups = geo.stride, geo.dilation, geo.groups
    n, c, h, w = x.shape
    _, _, oh, ow = g.shape
    top, bottom, left, right = geo.padding
    hp, wp = h + top + bottom, w + left + right
    chunks = batch_chunks(n, c * kw * hp * ow, row_budget(n * c * hp * wp, g.numel()))
    # dw_rows[i] = dw[:, :, i, :]^T per group, or per piece of a split contraction
    parts = contraction_parts(o * cg * kw, groups)
    dw_rows = g.new_zeros(kh, max(groups, parts), cg * kw, o // groups)
    for part in chunks:
        rows = row_windows(_pad(x[part], geo.padding), kw, dw, sw, ow)
        # g[(p, n, q), o], contiguous: the GEMMs below run as (C/g*kW x P) @ (P x O/g),
        # the fast orientation for a long contraction over P = oH*n*oW
        g_part = g[part].permute(2, 0, 3, 1)
        g_cols = g_part.reshape(-1, groups, o // groups).transpose(0, 1)
        for i in range(kh):
            m_i, g_i = split_contraction(kernel_row(rows, groups, i, dh, sh, oh), g_cols, parts)
            acc = dw_rows[i] if len(m_i) == dw_rows.shape[1] else dw_rows[i, :1]  # (unsplit)
            gemm.baddbmm_(acc, m_i, g_i)
    if parts > 1:
        dw_rows = dw_rows.sum(1, keepdim=True)
    return (
        dw_rows.reshape(kh, groups, cg, kw, o // groups)
        .permute(1, 4, 2, 0, 3)  # (g, O/g, C/g, kH, kW)
        .reshape(o, cg, kh, kw)
    )


def row_chunks(
    x_shape: tuple[int, ...],
    g_shape: torch.Size,
    w_shape: torch.Size,
    padding: Pad4,
    stacked: bool = False,
) -> list[slice]:
    """The chunks of the batch a gradient on a width-only row buffer (:func:`row_windows`)
    takes -- dL/dw's, or a stacked conv's dL/dx (:func:`conv_input_grad_stacked_rows`),
    whose buffers take what the forward's would: whole samples' buffers, ``C*kW*Hp*oW``
    elements each, within :func:`row_budget` (a ``stacked`` conv's)."""
    n, c, h, w = x_shape
    per_sample = c * w_shape[3] * (h + padding[0] + padding[1]) * g_shape[3]
    return batch_chunks(n, per_sample, row_budget(n * c * h * w, g_shape.numel(), stacked))


def conv_weight_grad_stacked_rows(
    x: torch.Tensor,
    g: torch.Tensor,
    w_shape: torch.Size,
    geo: ConvGeometry,
    g_first: bool = False,
    rows: torch.Tensor | None = None,
    padded_g: torch.Tensor | None = None,
) -> torch.Tensor:
    """Formula (3) for :func:`stacked_rows` convs, the transpose of
    :func:`_correlate_stacked_rows`: per output row ``p`` one GEMM of its windows (the
    overlapping view ``(oH, kH*C*kW, n*oW)`` of the ``"height"`` buffer) with ``g``'s row
    ``p``, all ``oH`` of them in one batched GEMM, then a sum over ``p``:
    ``dw[o, (i, c, j)] = sum_p sum_{n,q} windows[p, (i, c, j), (n, q)] * g[n, o, p, q]``.

    ``g_first``: the transposed orientation, ``g[p] @ windows[p]^T``, two output rows per
    GEMM (:func:`weight_grad_row_pairs`) -- for thin kernel rows (:func:`conv_weight_grad`
    picks it for LeNet's first layer: 25 taps against 6 output channels), whose
    windows-first products (25 x n*oW x 6) ran ~2x slower than ``g``-first (6 x n*oW x 25).

    ``rows``: the forward's buffer of the whole batch, if it kept it (one chunk), instead
    of building it again; ``padded_g``: :func:`stacked_gradient_rows` of the whole batch's
    ``g``, if already made, whose middle rows are ``g[p, o, (n, q)]`` (one chunk, not
    ``g_first``).
    """
    o, c, kh, kw = w_shape
    sh, sw, dw = *geo.stride, geo.dilation[1]
    _, _, oh, ow = g.shape
    dw_flat = None  # g first: dw[o, (i, c, j)]; else dw[(i, c, j), o]
    chunks = row_chunks(x.shape, g.shape, w_shape, geo.padding, stacked=True)
    padding = (
        paired_row_padding(geo.padding, w_shape, sh, x.shape[2], oh) if g_first else geo.padding
    )
    for part in chunks:
        if rows is None or len(chunks) > 1:
            rows = row_windows(_pad(x[part], padding), kw, dw, sw, ow, order="height")
        if g_first:
            part_sum = weight_grad_row_pairs(rows, g[part], kh, sh)
        else:
            windows = row_runs(rows, oh, kh, sh)  # (oH, kH*C*kW, n*oW): rows p*sH + i
            # g[p, o, (n, q)]: a copy of whole planes (not a transpose of each element)
            if padded_g is not None and len(chunks) == 1:
                g_rows = padded_g.narrow(0, kh - 1, oh).view(oh, o, -1)
            else:
                g_rows = g[part].permute(2, 1, 0, 3).reshape(oh, o, -1)
            part_sum = gemm.bmm(windows, g_rows.mT).sum(0)
        dw_flat = part_sum if dw_flat is None else dw_flat + part_sum
    if g_first:
        dw_flat = dw_flat.view(o, kh, c, kw).permute(0, 2, 1, 3)
    else:
        dw_flat = dw_flat.view(kh, c, kw, o).permute(3, 1, 0, 2)
    # contiguous, as the weight is, and with its strides (a view fixes those of a 1-channel
    # dimension, which contiguous() leaves as the permute made them): autograd then keeps it
    # as .grad instead of a copy, and DistributedDataParallel's buckets take it as they are
    return dw_flat.contiguous().view(o, c, kh, kw)


def weight_grad_row_pairs(rows: torch.Tensor, g: torch.Tensor, kh: int, sh: int) -> torch.Tensor:
    """Formula (3) on a :func:`row_windows` ``"height"`` buffer, ``g`` first and two output
    rows per GEMM: ``(O, kH*C*kW)``, ``dw[o, (i, c, j)]``.

    Output rows ``p`` and ``p+1`` read buffer rows ``p*sH`` to ``(p+1)*sH + kH - 1``: one
    contiguous run of ``(sH + kH)*C*kW`` entries (per column ``(n, q)``).  One GEMM
    contracts ``g``'s two rows, stacked as ``(2*O, n*oW)``, with that run, widened to a
    multiple of ``GEMM_COLUMN_ALIGN`` entries (the extra columns read on into the buffer
    and are dropped); row ``p``'s taps are its first ``kH*C*kW`` columns, row ``p+1``'s
    start ``sH*C*kW`` later.  The pairs whose widened run ends inside the buffer go in
    one batched GEMM; the output rows left, one GEMM each, as :func:`row_runs` gives them.

    LeNet conv1, 2 threads (10th percentile of 16 interleaved blocks): dL/dw at batch 64
    0.18 against 0.22 ms with one output row per GEMM, at 128 0.36 / 0.46 and at 256 (there
    against one GEMM per sample and kernel row) 0.78 / 0.86; 1 thread: 0.28 / 0.39,
    1.47 / 1.90 at batch 256.
    """
    hp, c, kw, n, ow = rows.shape
    o, oh = g.shape[1], g.shape[2]
    k, columns = c * kw, n * ow
    pairs, width = row_pairs(hp, k, kh, sh, oh)
    g_rows = g.permute(2, 1, 0, 3).reshape(oh, o, columns)  # g[p, o, (n, q)]
    dw = None
    if pairs:
        runs = rows.as_strided(  # (pairs, width, n*oW): entries from row 2*b*sH on
            (pairs, width, columns), (2 * sh * k * columns, columns, 1), rows.storage_offset()
        )
        both = gemm.bmm(g_rows[: 2 * pairs].reshape(pairs, 2 * o, columns), runs.mT).sum(0)
        dw = both[:o, : kh * k] + both[o:, sh * k : (sh + kh) * k]
    if 2 * pairs < oh:  # the rows left, one GEMM each
        first = 2 * pairs
        windows = row_runs(rows, oh - first, kh, sh, first=first * sh)
        rest = gemm.bmm(g_rows[first:], windows.mT).sum(0)
        dw = rest if dw is None else dw + rest
    return dw


def row_pairs(hp: int, k: int, kh: int, sh: int, oh: int) -> tuple[int, int]:
    """For :func:`weight_grad_row_pairs` on a buffer of ``hp`` rows of ``k`` entries: how
    many pairs of output rows go in the batched GEMM, and its width in entries (``(sH +
    kH)*k`` rounded up to a multiple of ``GEMM_COLUMN_ALIGN``) -- the pairs among the
    ``oH`` output rows whose run, pair ``b`` from entry ``2*b*sH*k``, ends inside the
    buffer."""
    width = -(-(sh + kh) * k // GEMM_COLUMN_ALIGN) * GEMM_COLUMN_ALIGN
    return max(0, min(oh // 2, (hp * k - width) // (2 * sh * k) + 1)), width


def paired_row_padding(padding: Pad4, w_shape: torch.Size, sh: int, h: int, oh: int) -> Pad4:
    """``padding`` with rows added at the bottom of the row buffer (of an input ``h`` rows
    high) so that every pair of output rows :func:`weight_grad_row_pairs` batches reads its
    widened run inside it (:func:`row_pairs`): one row more for LeNet conv1, whose last pair
    (of 14) would otherwise leave its two rows to a product of their own (17 us of ~145 at
    batch 64, 2 threads; 78 of ~775 at 256).  Only the dropped columns read those rows.  fwd+bwd of
    LeNet conv1, 2 threads (24 interleaved blocks): 1.11x torch's time at batch 64 against
    1.17x, 1.33x at 256 against 1.37x."""
    _, c, kh, kw = w_shape
    k, pairs = c * kw, oh // 2
    top, bottom, left, right = padding
    hp = h + top + bottom
    _, width = row_pairs(hp, k, kh, sh, oh)
    rows = -(-(2 * (pairs - 1) * sh * k + width) // k) if pairs else hp
    return top, bottom + max(0, rows - hp), left, right


def conv_weight_grad_sample_rows(
    x: torch.Tensor,
    g: torch.Tensor,
    w_shape: torch.Size,
    geo: ConvGeometry,
) -> torch.Tensor:
    """Formula (3) for :func:`per_sample_rows` convs, the transpose of
    :func:`_correlate_sample_rows`: per sample and kernel row ``i`` one GEMM
    ``dw[:, :, i, :] += g[n] @ sample_kernel_row(i)[n]^T``, then a sum over the batch."""
    o, cg, kh, kw = w_shape
    (dh, dw), groups = geo.dilation, geo.groups
    _, _, oh, ow = g.shape
    dw_rows = None  # (kH, g, O/g, C/g*kW): dw_rows[i] = dw[:, :, i, :]
    for part in row_chunks(x.shape, g.shape, w_shape, geo.padding):
        rows = row_windows(_pad(x[part], geo.padding), kw, dw, geo.stride[1], ow, order="sample")
        m = rows.shape[0]
        g_part = g[part].reshape(m * groups, o // groups, oh * ow)
        per_sample = torch.stack(
            [
                gemm.bmm(g_part, sample_kernel_row(rows, groups, i, dh, oh).transpose(1, 2))
                for i in range(kh)
            ]
        )  # (kH, m*g, O/g, C/g*kW)
        part_sum = per_sample.view(kh, m, groups, o // groups, cg * kw).sum(1)
        dw_rows = part_sum if dw_rows is None else dw_rows + part_sum
    return (
        dw_rows.view(kh, groups, o // groups, cg, kw)
        .permute(1, 2, 3, 0, 4)  # (g, O/g, C/g, kH, kW)
        .reshape(o, cg, kh, kw)
    )


def conv_weight_grad_columns(
    x: torch.Tensor,
    g: torch.Tensor,
    w_shape: torch.Size,
    geo: ConvGeometry,
) -> torch.Tensor:
    """Formula (3) with the full im2col: ``dw = g @ columns(x)^T``, one GEMM per chunk of
    the batch contracting over every output pixel of every sample in it.

    A 1x1 kernel at stride 1 without padding reads the input as it is: rather than copy it
    into one batch-wide buffer, one GEMM per sample on ``x`` itself, then a sum over the
    batch (while those per-sample results are no larger than the input).  (Where oneDNN
    multiplies, :func:`pointwise_grads` takes those.)
    """
    o, cg, kh, kw = w_shape
    groups = geo.groups
    n, c, h, wd = x.shape
    _, _, oh, ow = g.shape
    as_is = kh * kw == 1 and geo.stride == (1, 1) and geo.padding == (0, 0, 0, 0)
    if as_is and n * o * cg <= x.numel():
        g_s = g.reshape(n * groups, o // groups, oh * ow)
        x_s = x.reshape(n * groups, cg, h * wd)
        per_sample = gemm.bmm(g_s, x_s.transpose(1, 2))  # (n*g, O/g, C/g)
        return per_sample.view(n, o, cg).sum(0).view(w_shape)
    dw = g.new_empty(groups, o // groups, cg * kh * kw)
    budget = column_budget(x.numel(), g.numel(), o * cg * kh * kw)
    for k, part in enumerate(batch_chunks(n, c * kh * kw * oh * ow, budget)):
        xp = _pad(x[part], geo.padding)
        cols = columns(xp, (kh, kw), geo.stride, geo.dilation, (oh, ow), groups, batch_inner=True)
        g_rows = g[part].reshape(-1, groups, o // groups, oh * ow).permute(1, 2, 0, 3)
        g_rows = g_rows.reshape(groups, o // groups, -1)  # (g, O/g, n*oH*oW)
        gemm.baddbmm_(dw, g_rows, cols.transpose(1, 2), beta=min(k, 1))  # (beta=0: overwrite)
    return dw.view(w_shape)


def conv_bias_grad(g: torch.Tensor) -> torch.Tensor:
    """Formula (2): dL/db, the upstream gradient summed over batch and space."""
    return g.sum((0, 2, 3))


# ----------------------------------------------------------------------------- autograd


class Conv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, w, b)`` with the backward (2)-(4) and forward-mode rule (5).

    Takes normalized arguments (see :func:`conv2d`); accepts batched ``(N, C, H, W)`` and
    unbatched ``(C, H, W)`` input.  Where (3) contracts the stacked forward's row buffer
    again (:func:`stacked_weight_grad`) and :func:`conv2d` says the weight's gradient is
    wanted, the forward keeps that buffer for the backward (an attribute of ``ctx``), which
    reads it first and then frees it -- unless the backward is itself differentiated:
    then (3) is taken from ``x``.  LeNet-5's convs at batch 64, 2 threads (10th percentile
    of 24 interleaved blocks): fwd+bwd 0.49 against 0.51 ms (conv1) and 0.93 against 0.97
    (conv2); at 1 thread 0.77 / 0.82 and 1.51 / 1.57.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, geo: ConvGeometry
    ) -> torch.Tensor:
        # kept only where the weight's gradient will be wanted (conv2d says so): keeping
        # it raises a plain forward's peak memory by the buffer (LeNet conv2's: 2.3x torch's)
        want, _KEPT.want = getattr(_KEPT, "want", False), False
        keep = [] if want and gemm.plain_tensors(x, weight) else None
        if x.dim() == 3:
            y = conv_forward(x.unsqueeze(0), weight, bias, geo, keep).squeeze(0)
        else:
            y = conv_forward(x, weight, bias, geo, keep)
        y = own_output(y, x, weight, bias)
        # a row buffer the weight gradient reads again: to setup_context, which runs next
        _KEPT.rows = (y, keep[0]) if keep else None
        return y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, weight, bias, geo = inputs
        kept, _KEPT.rows = getattr(_KEPT, "rows", None), None
        if kept is not None and kept[0] is output and ctx.needs_input_grad[1]:
            # (only the stacked forward keeps its buffer, and (3) then contracts it:
            # :func:`stacked_weight_grad`; an intermediate: an attribute, freed with the graph)
            ctx.rows = kept[1]
        ctx.save_for_backward(x, weight)
        if forward_ad_active():  # (what its jvp reads)
            ctx.save_for_forward(x, weight)
        ctx.geo = geo
        ctx.has_bias = bias is not None
        ctx.batched_out_shape = output.shape if x.dim() == 4 else (1, *output.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        x, weight = ctx.saved_tensors
        geo = ctx.geo
        unbatched = x.dim() == 3
        if unbatched:
            x, g = x.unsqueeze(0), g.unsqueeze(0)
        gx = gw = gb = None
        # depthwise: (4) and (3) from one table of g -- except under forward-mode AD through
        # this backward (fwd-over-rev), for which embedding_bag has no rule: the general sums
        table = depthwise(weight.shape, geo.groups)
        if table:
            try:
                gx, gw = depthwise_grads(x, g, weight, geo, *ctx.needs_input_grad[:2])
            except NotImplementedError:
                table = False
        # a 1x1 kernel: (4) and (3) from one channel-major copy of g
        pixels = g.shape[2] * g.shape[3]
        if not table and pointwise(weight.shape, geo.padding, g.shape[0], pixels, x, g, weight):
            gx, gw = pointwise_grads(x, g, weight, geo, *ctx.needs_input_grad[:2])
        elif not table:
            # the forward's row buffer of x, unless this backward is differentiated again
            # (then dw must be computed from x itself); used first, then freed
            rows = None if torch.is_grad_enabled() else getattr(ctx, "rows", None)
            input_hw = tuple(x.shape[-2:])
            form = input_grad_form(g, weight, input_hw, geo) if ctx.needs_input_grad[0] else None
            # one copy of g laid out by rows for (4) and (3), where both would make it
            shared = None
            if rows is not None and form == "stacked_rows" and ctx.needs_input_grad[1]:
                shared = shared_gradient_rows(x, g, weight, geo)
            if rows is not None and ctx.needs_input_grad[1]:
                gw = conv_weight_grad(x, g, weight.shape, geo, rows, shared)  # (3)
                ctx.rows = rows = None
            if ctx.needs_input_grad[0]:
                gx = conv_input_grad(g, weight, input_hw, geo, shared, form)  # (4)
            if gw is None and ctx.needs_input_grad[1]:
                gw = conv_weight_grad(x, g, weight.shape, geo)  # (3)
        if gx is not None and unbatched:
            gx = gx.squeeze(0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = conv_bias_grad(g)  # (2)
        return gx, gw, gb, None

    @staticmethod
    def jvp(
        ctx: Any,
        x_t: torch.Tensor | None,
        w_t: torch.Tensor | None,
        b_t: torch.Tensor | None,
        _geo: None,
    ) -> torch.Tensor:
        x, weight = ctx.saved_tensors
        geo = ctx.geo
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
            x_t = None if x_t is None else x_t.unsqueeze(0)
        # (5): the forward is bilinear in (x, w) and affine in b
        terms = []
        if x_t is not None:
            terms.append(conv_forward(x_t, weight, None, geo))
        if w_t is not None:
            terms.append(conv_forward(x, w_t, None, geo))
        if not terms and b_t is None:
            return None
        out_t = sum(terms[1:], terms[0]) if terms else x.new_zeros(ctx.batched_out_shape)
        if b_t is not None:
            out_t = out_t + b_t.reshape(-1, 1, 1)
        return out_t.squeeze(0) if unbatched else out_t


_Conv2dTwin = legacy_twin(Conv2dFunction)
# Conv2dFunction.forward's (output, row buffer), read by the setup_context that follows it;
# and conv2d's word to that forward that the weight's gradient is wanted
_KEPT = threading.local()


# ----------------------------------------------------------------------------- functional


def _conv_geometry(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
) -> ConvGeometry:
    """Validate a conv2d call as torch does and normalize its arguments."""
    check_input_rank(x, "conv2d")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"conv2d(): argument 'weight' must be Tensor, not {type(weight).__name__}")
    shapes = (x.shape, weight.shape, None if bias is None else bias.shape)
    geo = _conv_arguments(shapes, stride, padding, dilation, groups)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise RuntimeError(
                f"conv2d: input type ({x.dtype}) and {name} type ({t.dtype}) should be the same"
            )
        if t is not None and t.device != x.device:
            raise RuntimeError(
                f"conv2d: input ({x.device}) and {name} ({t.device}) must be on the same device"
            )
    return geo


@argument_cache
def _conv_arguments(
    shapes: tuple[torch.Size, torch.Size, torch.Size | None], stride, padding, dilation, groups
) -> ConvGeometry:
    """The checks of :func:`_conv_geometry` that depend on the shapes of input, weight and
    bias and on the arguments alone; the normalized arguments."""
    op = "conv2d"
    x_shape, w_shape, bias_shape = shapes
    named = isinstance(padding, str)
    if named and padding not in ("same", "valid"):
        raise RuntimeError(f"Invalid padding string: '{padding}' (expected 'same' or 'valid')")
    stride_hw = _pair(stride, "stride", op)
    dilation_hw = _pair(dilation, "dilation", op)
    check_positive(stride_hw, "stride", op)
    check_positive(dilation_hw, "dilation", op)
    groups_int = as_int(groups)
    if groups_int is None:
        raise TypeError(f"conv2d(): argument 'groups' must be int, not {type(groups).__name__}")
    groups = groups_int
    if groups <= 0:
        raise RuntimeError(f"conv2d: non-positive groups is not supported, but got groups={groups}")
    if len(w_shape) != 4:
        raise RuntimeError(
            f"conv2d: expected weight to be 4-dimensional (out_channels, "
            f"in_channels/groups, kH, kW), but got weight of size {list(w_shape)}"
        )
    kh, kw = w_shape[-2:]
    if named and padding == "valid":
        pad4: Pad4 = (0, 0, 0, 0)
    elif named:  # "same"
        if stride_hw != (1, 1):
            raise RuntimeError("padding='same' is not supported for strided convolutions")
        total_h, total_w = dilation_hw[0] * (kh - 1), dilation_hw[1] * (kw - 1)
        pad4 = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
    else:
        ph, pw = _pair(padding, "padding", op)
        check_non_negative((ph, pw), "padding", op)
        pad4 = (ph, ph, pw, pw)
    in_channels = x_shape[-3]
    if in_channels != w_shape[1] * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(w_shape)}, expected "
            f"input{list(x_shape)} to have {w_shape[1] * groups} channels, "
            f"but got {in_channels} channels instead"
        )
    if w_shape[0] < groups:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be at least {groups} at dimension 0, "
            f"but got weight of size {list(w_shape)} instead"
        )
    if w_shape[0] % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at "
            f"dimension 0, but got weight of size {list(w_shape)} instead"
        )
    if bias_shape is not None and (len(bias_shape) != 1 or bias_shape[0] != w_shape[0]):
        raise RuntimeError(
            f"Given weight of size {list(w_shape)}, expected bias to be "
            f"1-dimensional with {w_shape[0]} elements, but got bias of size "
            f"{list(bias_shape)} instead"
        )
    padded = (x_shape[-2] + pad4[0] + pad4[1], x_shape[-1] + pad4[2] + pad4[3])
    span = (dilation_hw[0] * (kh - 1) + 1, dilation_hw[1] * (kw - 1) + 1)
    if padded[0] < span[0] or padded[1] < span[1]:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). "
            f"Kernel size: ({span[0]} x {span[1]}). Kernel size can't be greater "
            f"than actual input size"
        )
    return ConvGeometry(stride_hw, pad4, dilation_hw, groups)


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: str | int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    r"""2-d cross-correlation, a drop-in for ``conv2d`` of :mod:`torch.nn.functional`.

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``.
        weight: ``(C_out, C_in / groups, kH, kW)``.
        bias: optional ``(C_out,)``.
        stride, dilation: int or ``(h, w)``.
        padding: int, ``(h, w)``, ``'valid'`` (none) or ``'same'`` (output size = input size,
            stride 1 only; an odd total pad puts the extra row/column at the bottom/right).
        groups: split input and output channels into this many independent groups.

    Returns:
        ``(N, C_out, H_out, W_out)`` with
        ``H_out = floor((H + pad_top + pad_bottom - dilation[0]*(kH-1) - 1) / stride[0]) + 1``
        (likewise ``W_out``).  The gradient comes from :class:`Conv2dFunction`.
    """
    geo = _conv_geometry(input, weight, bias, stride, padding, dilation, groups)
    _KEPT.want = weight.requires_grad and torch.is_grad_enabled()
    return apply_function(Conv2dFunction, _Conv2dTwin, input, weight, bias, geo)
