"""The matrix products the conv GEMMs run on: torch's ``mm`` / ``bmm``, or the same product
from oneDNN's matrix multiply where that is the faster library.

Which library multiplies two matrices does not change the math: every function here is
a plain matrix product with torch's semantics (:func:`torch.bmm`, :func:`torch.baddbmm`,
:func:`torch.mm`, :func:`torch.addmm`).  On the CPU, torch's own ``mm``/``bmm`` call MKL's
sgemm, which on AMD processors runs its AVX2 code: on this project's 2-core AMD EPYC
(Zen 5) machines it reached 150-225 GFLOPS where oneDNN's matrix multiply -- shipped with
torch, which runs its own CPU kernels on oneDNN -- reached 380-500 (2 threads, products
of ResNet's and LeNet's im2col shapes; 0.41-0.58x the time).  So a float32 CPU product
large enough to gain (``ONEDNN_MIN_MACS``) goes to oneDNN's inner product,
``torch.ops.mkldnn._linear_pointwise(X, W) = X @ W^T`` (its ``.binary`` form adds a
third matrix in the same pass: :func:`linear`), which reads a dense ``W`` as it is, row-
or column-major (a transposed view needs no copy).  Only that GEMM is used: no oneDNN
convolution or pooling (the purity test logs every dispatched op and allows exactly this
one).  Batched products are one oneDNN product per matrix.

torch's own product runs instead wherever oneDNN's cannot stand in: other dtypes and
devices; while autograd records (a double backward differentiates these products, and
the oneDNN op has no derivative); under forward-mode AD and ``functorch`` transforms
(``vmap``), which it has no rules for; tensor subclasses (``nn.Parameter`` aside: it
computes as a plain tensor); and where oneDNN is disabled
(``torch.backends.mkldnn.flags(enabled=False)``) or unavailable.
"""

from __future__ import annotations

import functools

import torch

from ._utils import plain_tensors

__all__ = [
    "addmm",
    "baddbmm",
    "baddbmm_",
    "bmm",
    "linear",
    "mm",
    "onednn_gemm",
    "onednn_ready",
    "plain_tensors",
]

# Products of fewer multiply-adds than this stay on torch's ``bmm``: below it oneDNN's
# per-call cost (~10 us) eats the faster kernel.  Measured at 2 threads: ten 16x150x640
# products (LeNet conv2's forward at batch 64) 1.21x the time, a ResNet 1x1's 64x256x196
# per sample 1.1-1.2x (its fwd+bwd 0.17/0.19/0.15 ms for forward/dL/dx/dL/dw against
# 0.15/0.16/0.14 on torch's ``bmm``); ten 16x150x2560 (LeNet conv2 at batch 256) 0.58x.
ONEDNN_MIN_MACS = 1 << 22


@functools.cache
def _onednn_available() -> bool:
    """Whether torch ships oneDNN's linear op and it agrees with ``torch.mm`` on a probe."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        linear = torch.ops.mkldnn._linear_pointwise
        a = torch.arange(6.0).view(2, 3)
        b = torch.arange(12.0).view(3, 4)
        with torch.inference_mode(False), torch.no_grad():
            return bool(torch.equal(linear(a, b.t(), None, "none", [None], ""), a @ b))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def onednn_ready(*tensors: torch.Tensor) -> bool:
    """Whether products of these tensors may go to oneDNN at all: float32 on the CPU, and
    nothing that needs torch's own op (autograd recording, forward-mode AD, ``functorch``
    transforms, tensor subclasses other than ``nn.Parameter``, oneDNN disabled)."""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu:
            return False
    return plain_tensors(*tensors) and torch._C._get_mkldnn_enabled() and _onednn_available()


def onednn_gemm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a @ b`` (each a matrix or a batch of them) goes to oneDNN:
    ``ONEDNN_MIN_MACS`` or more per matrix, and :func:`onednn_ready`."""
    if a.shape[-2] * a.shape[-1] * b.shape[-1] < ONEDNN_MIN_MACS:
        return False
    return onednn_ready(a, b)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for matrices by oneDNN's ``X @ W^T``: ``X = a``, ``W = b^T`` (read as it
    is when dense: :func:`_plain`); when ``a`` is not row-major but
    ``b^T`` is, the transposed product ``(b^T @ a^T)^T`` instead, so no operand is copied."""
    linear = torch.ops.mkldnn._linear_pointwise
    if not a.is_contiguous() and b.mT.is_contiguous():
        return linear(b.mT, _plain(a), None, "none", [None], "").mT
    return linear(a, _plain(b.mT), None, "none", [None], "")


def _plain(w: torch.Tensor) -> torch.Tensor:
    """``w`` as oneDNN's fast kernels read a matrix in place: dense, row- or column-major;
    else a contiguous copy.  (Given a leading dimension longer than the matrix -- a view
    of every other row, say -- oneDNN falls back to its reference kernel: a 64x192x3136
    product took 430 ms instead of 1.)"""
    return w if w.is_contiguous() or w.mT.is_contiguous() else w.contiguous()


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`torch.mm`: ``(M, K) @ (K, N)``."""
    return _product(a, b).contiguous() if onednn_gemm(a, b) else torch.mm(a, b)


def addmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`torch.addmm`: ``c + a @ b`` (``c`` broadcast to ``(M, N)``)."""
    return _product(a, b) + c if onednn_gemm(a, b) else torch.addmm(c, a, b)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`torch.bmm`: ``(B, M, K) @ (B, K, N)``, a contiguous ``(B, M, N)``."""
    return _onednn_bmm(a, b) if onednn_gemm(a, b) else torch.bmm(a, b)


def _onednn_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`bmm` on oneDNN: one product per matrix."""
    if a.shape[0] == 1:  # (the product itself, not a copy of it)
        return _product(a[0], b[0]).contiguous().unsqueeze(0)
    a, b = _once(a, row_major=True), _once(b)
    out = a.new_empty(a.shape[0], a.shape[1], b.shape[2])
    for i in range(a.shape[0]):
        out[i] = _product(a[i], b[i])
    return out


def _once(t: torch.Tensor, row_major: bool = False) -> torch.Tensor:
    """A batch of one matrix repeated (stride 0: a kernel shared by every sample) that
    :func:`_product` would copy for each product -- not dense, or, as its left operand
    (``row_major``), not row-major -- copied once instead (a ResNet dL/dx's transposed
    kernel, 4 samples: 0.64x the time)."""
    if t.shape[0] == 1 or t.stride(0) != 0 or t[0].is_contiguous():
        return t
    if not row_major and t[0].mT.is_contiguous():
        return t
    return t[0].contiguous().expand(t.shape)


def baddbmm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`torch.baddbmm`: ``c + a @ b`` (``c`` broadcast to ``(B, M, N)``)."""
    return _onednn_bmm(a, b).add_(c) if onednn_gemm(a, b) else torch.baddbmm(c, a, b)


def baddbmm_(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: int = 1) -> torch.Tensor:
    """:meth:`torch.Tensor.baddbmm_`: ``y = beta*y + a @ b`` in place, ``beta`` 0 or 1
    (0: ``y``'s old values are ignored, as torch does, NaN or not)."""
    if not onednn_gemm(a, b):
        return y.baddbmm_(a, b, beta=beta)
    a, b = _once(a, row_major=True), _once(b)
    for i in range(a.shape[0]):
        if beta:
            y[i].add_(_product(a[i], b[i]))
        else:
            y[i].copy_(_product(a[i], b[i]))
    return y


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w^T + bias + add``, a new contiguous ``(M, N)``, as
    :func:`torch.nn.functional.linear` (plus ``add``): ``x`` ``(M, K)``, ``w`` ``(N, K)``,
    ``bias`` ``(N,)`` and ``add`` ``(M, N)`` optional.  On oneDNN (:func:`onednn_ready`;
    any size: the callers' products are large) ``add`` is fused into the product."""
    if not onednn_ready(x, w) or 0 in (*x.shape, w.shape[0]):  # (oneDNN takes no empties)
        y = torch.nn.functional.linear(x, w, bias)
        return y if add is None else y.add_(add)
    x, w = x.contiguous(), _plain(w)
    if add is None:
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [None], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, add.contiguous(), w, bias, "add")
