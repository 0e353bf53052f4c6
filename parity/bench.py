"""``python -m parity bench``: time and measure the handmade ops against torch's kernels.

For a sweep of layer shapes (LeNet-5, ResNet-style 3x3 convs, a 1x1, a depthwise and a dilated
conv, the usual pools, a full LeNet-5 training step, and the explicit-loop NumPy reference on
the smallest shape) it reports, per case and pass:

* **time** -- the median of :class:`torch.utils.benchmark.Timer` ``blocked_autorange`` (which
  warms up, repeats until ``--min-run-time`` is spent, pins the thread count and synchronizes
  CUDA), for torch and for handmade, and the ratio handmade/torch. The timings come in
  ``--rounds`` rounds spread over the whole sweep -- round ``r`` times every row once, torch
  and handmade in turn, alternating which goes first -- and each side keeps its fastest round,
  so a slow spell of a shared machine (seen here: spells of seconds to minutes in which the
  handmade passes' chains of ops ran up to 1.5x slower, torch's kernels about 1.1x) falls on
  one round of a row rather than on all of them (:func:`measure_rows`);
* **peak memory** -- the high-water mark of bytes allocated by the pass above what was live
  when it started. On CUDA: ``torch.cuda.max_memory_allocated()`` after
  ``reset_peak_memory_stats()``, minus ``memory_allocated()`` at the start. On CPU:
  one extra run under ``torch.autograd.profiler.profile(profile_memory=True)``; it records
  every allocation and free of torch's CPU allocator (intermediates inside aten kernels
  included, which a dispatch-level tracker would miss) as signed byte counts with timestamps,
  and the peak is the maximum of their running sum in time order. For the NumPy reference it is
  :mod:`tracemalloc`'s peak (NumPy reports its buffers there);
* **page faults per call** (CPU) -- minor page faults of this process over a few extra calls of
  each pass after its timing (``getrusage``; ``-`` where unavailable or on CUDA). On a VM
  where touching a fresh page is expensive, a pass whose outputs land in memory glibc has just
  handed back to the kernel runs several times slower than the same pass with none: a fault
  column far from zero explains an outlying time (either side's) that the ops themselves do
  not.

**Allocator** (``--allocator``, CPU): by default (``steady``) glibc's malloc is told, for this
process, to keep freed memory for reuse -- no ``mmap`` for large blocks, no trimming of the heap
(:func:`keep_freed_memory`) -- the effect of the jemalloc/tcmalloc that PyTorch's CPU
performance guide recommends for training. Without it (``system``), whether a pass's output
lands on pages the kernel must fault in again depends on what the cases before it freed: here
the same torch depthwise forward took 0.48 ms with no faults and 1.7 ms with 1,024 per call,
and which side a run penalized changed from run to run. ``steady`` also asks torch's allocator
for transparent huge pages on blocks of 2 MiB and more (``THP_MEM_ALLOC_ENABLE=1``, from
PyTorch's CPU performance tuning guide; :func:`request_huge_pages`): with 4 KiB pages, a pass
re-reading a buffer of several MiB it has just written ran up to 1.7x slower here depending on
where the process's pages lay, varying from one process to the next. Both sides run under the
same setting; the header says which took effect.

Passes: ``fwd`` is an inference forward under :func:`torch.no_grad`; ``fwd+bwd`` is the forward
with autograd recording, then :func:`torch.autograd.grad` of every tensor that needs a gradient
in training, with a fixed random upstream gradient. Parameters (weight, bias) always need one;
the input does except for LeNet's ``conv1``, whose input is the image (so neither
implementation computes that input gradient there, as in training). ``step`` is a whole LeNet-5
training step: ``zero_grad``, forward, cross-entropy, backward, SGD (momentum 0.9) update,
:class:`handmade.models.LeNet5` with ``ops="handmade"`` vs ``ops="torch"``, on a batch of
handwriting-like images (:func:`handwriting_images`: torch's max pool runs 2x as fast on the
activations of digits as on those of Gaussian noise, which the layer rows take).

Targets (flagged, see :data:`TARGETS`): LeNet training step ratio <= 1.0; conv fwd+bwd median
ratio <= 1.3 and max <= 2.5; every pool fwd+bwd ratio <= 1.5; peak memory <= 2x torch.
Timings on a shared machine are noisy; the ratios are what to read.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import logging
import mmap
import os
import platform
import statistics
import sys
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as torch_F
from tqdm import tqdm

import handmade.functional as handmade_F
from handmade import reference
from handmade.models import MNIST_MEAN, MNIST_STD, LeNet5

from ._io import intra_op_threads, write_json_atomic

RESNET_BATCH = 4  # keeps the ResNet-style shapes to a few minutes on 2 CPU cores
TARGETS = {
    "train_step_ratio_max": 1.0,
    "conv_fwd_bwd_ratio_median": 1.3,
    "conv_fwd_bwd_ratio_max": 2.5,
    "pool_fwd_bwd_ratio_max": 1.5,
    "peak_memory_ratio_max": 2.0,
}
PASSES = ("fwd", "fwd+bwd")
DEFAULT_ROUNDS = 3
Pass = Callable[[], Any]


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    """One op at one layer shape.

    Attributes:
        name: label shown in the table (``--filter`` matches it).
        group: ``"conv"`` or ``"pool"`` (the targets are per group).
        op: ``"conv2d"``, ``"max_pool2d"`` or ``"avg_pool2d"``.
        input_shape: ``(N, C, H, W)``.
        kwargs: the op's keyword arguments (torch.nn.functional spelling).
        weight_shape: conv weight ``(C_out, C_in / groups, kH, kW)``; ``None`` for pools.
        input_grad: whether the input needs a gradient in training.
        reference: time the NumPy reference instead of handmade.
    """

    name: str
    group: str
    op: str
    input_shape: tuple[int, int, int, int]
    kwargs: dict[str, Any] = field(default_factory=dict)
    weight_shape: tuple[int, int, int, int] | None = None
    input_grad: bool = True
    reference: bool = False

    @property
    def shape(self) -> str:
        """Human-readable geometry, e.g. ``N64 1x28x28 -> 6 k5 p2``."""
        n, c, h, w = self.input_shape
        text = f"N{n} {c}x{h}x{w}"
        if self.weight_shape is not None:
            text += f" -> {self.weight_shape[0]} k{self.weight_shape[2]}"
        else:
            text += f" k{self.kwargs['kernel_size']}"
        short = {"stride": "s", "padding": "p", "dilation": "d", "groups": "g"}
        for key, value in self.kwargs.items():
            if key in short:
                text += f" {short[key]}{value}"
            elif key != "kernel_size":
                text += f" {key}={value}"
        return text


@dataclass(frozen=True)
class TrainCase:
    """A whole LeNet-5 training step at one batch size."""

    name: str
    batch: int
    group: str = "train"

    @property
    def shape(self) -> str:
        return f"N{self.batch} 1x28x28 handwriting, SGD"


Case = OpCase | TrainCase


def _conv(name: str, n: int, c: int, hw: int, out: int, k: int, **kwargs: Any) -> OpCase:
    groups = kwargs.get("groups", 1)
    return OpCase(name, "conv", "conv2d", (n, c, hw, hw), kwargs, (out, c // groups, k, k))


def _pool(name: str, op: str, n: int, c: int, hw: int, **kwargs: Any) -> OpCase:
    return OpCase(name, "pool", op, (n, c, hw, hw), kwargs)


def lenet_cases(batches: Sequence[int]) -> list[Case]:
    """LeNet-5's layers at each batch size: conv1, conv2 and the 2x2/2 pools (max and avg)."""
    cases: list[Case] = []
    for n in batches:
        conv1 = _conv(f"lenet.conv1 b{n}", n, 1, 28, 6, 5, padding=2)
        cases += [
            replace(conv1, input_grad=False),  # the image needs no gradient
            _conv(f"lenet.conv2 b{n}", n, 6, 14, 16, 5),
            _pool(f"lenet.maxpool1 b{n}", "max_pool2d", n, 6, 28, kernel_size=2, stride=2),
            _pool(f"lenet.maxpool2 b{n}", "max_pool2d", n, 16, 10, kernel_size=2, stride=2),
            _pool(f"lenet.avgpool1 b{n}", "avg_pool2d", n, 6, 28, kernel_size=2, stride=2),
            _pool(f"lenet.avgpool2 b{n}", "avg_pool2d", n, 16, 10, kernel_size=2, stride=2),
        ]
    return cases


def default_cases() -> list[Case]:
    """The full sweep (a few minutes on 2 CPU cores)."""
    n = RESNET_BATCH
    cases = lenet_cases((64, 256))
    cases += [
        _conv("resnet.conv3x3 64@56", n, 64, 56, 64, 3, padding=1),
        _conv("resnet.conv3x3 64->128/2", n, 64, 56, 128, 3, stride=2, padding=1),
        _conv("resnet.conv3x3 128@28", n, 128, 28, 128, 3, padding=1),
        _conv("resnet.conv3x3 128->256/2", n, 128, 28, 256, 3, stride=2, padding=1),
        _conv("resnet.conv3x3 256@14", n, 256, 14, 256, 3, padding=1),
        _conv("resnet.conv3x3 256@7", n, 256, 7, 256, 3, padding=1),
        _conv("conv1x1 256->64@14", n, 256, 14, 64, 1),
        _conv("depthwise3x3 128@28", n, 128, 28, 128, 3, padding=1, groups=128),
        _conv("dilated3x3 d2 64@28", n, 64, 28, 64, 3, padding=2, dilation=2),
        _pool(
            "resnet.maxpool 3x3/2 p1", "max_pool2d", n, 64, 112, kernel_size=3, stride=2, padding=1
        ),
        _pool(
            "maxpool 3x3/2 ceil", "max_pool2d", n, 64, 56, kernel_size=3, stride=2, ceil_mode=True
        ),
        _pool(
            "maxpool 2x2/2 ceil", "max_pool2d", n, 64, 55, kernel_size=2, stride=2, ceil_mode=True
        ),
        _pool(
            "avgpool 3x3/1 p1 excl-pad",
            "avg_pool2d",
            n,
            64,
            28,
            kernel_size=3,
            stride=1,
            padding=1,
            count_include_pad=False,
        ),
        _pool("avgpool 7x7 global", "avg_pool2d", n, 256, 7, kernel_size=7),
        TrainCase("lenet train step b64", 64),
        TrainCase("lenet train step b256", 256),
    ]
    smallest = next(c for c in cases if isinstance(c, OpCase) and c.name == "lenet.conv1 b64")
    pool = next(c for c in cases if isinstance(c, OpCase) and c.name == "lenet.maxpool1 b64")
    return cases + [_as_reference(smallest), _as_reference(pool)]


def quick_cases() -> list[Case]:
    """A few small shapes covering every group (seconds; used by the smoke test)."""
    cases = lenet_cases((8,))
    cases = [
        c for c in cases if c.name in ("lenet.conv1 b8", "lenet.maxpool1 b8", "lenet.avgpool2 b8")
    ]
    tiny = _conv("lenet.conv2 b2", 2, 6, 14, 16, 5)
    return cases + [TrainCase("lenet train step b16", 16), _as_reference(tiny)]


def _as_reference(case: OpCase) -> OpCase:
    """The same case, timed with :mod:`handmade.reference` in place of handmade.

    Its backward computes every gradient, the input's included, whatever ``input_grad`` says.
    """
    name = f"numpy-reference {case.name}"
    return replace(case, name=name, group="reference", reference=True)


# --------------------------------------------------------------------------------------------
# the timed closures
# --------------------------------------------------------------------------------------------


def _op_tensors(case: OpCase, device: torch.device, pass_: str) -> tuple[list, list]:
    """Seeded inputs ``[x, (w, b)]`` and the subset that needs a gradient for ``pass_``."""
    gen = torch.Generator().manual_seed(0)
    training = pass_ == "fwd+bwd"
    x = torch.randn(case.input_shape, generator=gen).to(device)
    x.requires_grad_(training and case.input_grad)
    tensors = [x]
    if case.weight_shape is not None:
        w = torch.randn(case.weight_shape, generator=gen).mul_(0.1).to(device)
        b = torch.randn(case.weight_shape[0], generator=gen).to(device)
        tensors += [w.requires_grad_(training), b.requires_grad_(training)]
    return tensors, [t for t in tensors if t.requires_grad]


def _op_pass(case: OpCase, module: Any, pass_: str, device: torch.device) -> Pass:
    """Closure running ``pass_`` of ``case`` with ``module.<op>`` (torch's or handmade's)."""
    op = getattr(module, case.op)
    tensors, needs_grad = _op_tensors(case, device, pass_)
    if pass_ == "fwd":

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return op(*tensors, **case.kwargs)

        return forward
    with torch.no_grad():
        out_shape = op(*tensors, **case.kwargs).shape
    gy = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device)

    def forward_backward() -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(op(*tensors, **case.kwargs), needs_grad, gy)

    return forward_backward


def _reference_pass(case: OpCase, pass_: str) -> Pass:
    """Closure running ``pass_`` of ``case`` with the explicit-loop NumPy reference."""
    tensors, _ = _op_tensors(case, torch.device("cpu"), pass_)
    arrays = [t.detach().numpy() for t in tensors]
    kw = case.kwargs
    x = arrays[0]
    if case.op == "conv2d":
        geometry = {
            k: kw.get(k, d)
            for k, d in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))
        }

        def forward() -> np.ndarray:
            return reference.conv2d_forward(*arrays, **geometry)

        def backward(y: np.ndarray, gy: np.ndarray) -> Any:
            return reference.conv2d_backward(arrays[0], arrays[1], gy, **geometry)
    elif case.op == "max_pool2d":

        def forward() -> tuple[np.ndarray, np.ndarray]:
            return reference.max_pool2d_forward(x, **kw)

        def backward(y: tuple[np.ndarray, np.ndarray], gy: np.ndarray) -> Any:
            return reference.max_pool2d_backward(gy, y[1], x.shape)
    else:

        def forward() -> np.ndarray:
            return reference.avg_pool2d_forward(x, **kw)

        def backward(y: np.ndarray, gy: np.ndarray) -> Any:
            return reference.avg_pool2d_backward(gy, x.shape, **kw)

    if pass_ == "fwd":
        return forward
    first = forward()
    out = first[0] if isinstance(first, tuple) else first
    gy = np.random.default_rng(1).standard_normal(out.shape).astype(x.dtype)

    def forward_backward() -> Any:
        return backward(forward(), gy)

    return forward_backward


def handwriting_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` MNIST-like images ``(n, 1, 28, 28)``, normalized as MNIST's: a few smooth pen
    strokes (quadratic Bezier curves through random points of the central 20x20 pixels,
    drawn ~3 pixels wide with soft edges) on a blank page.

    The LeNet training step runs on these rather than on Gaussian noise because torch's
    max pool kernel is data-dependent: it branches on each comparison, and on the blank
    regions of a digit every comparison goes the same way.  On LeNet's first pool at batch
    64 it took 0.25 ms on the activations of real MNIST digits, 0.26 on these, and 0.50 on
    those of Gaussian noise (2 threads, measured); the handmade pool, branch-free, takes the
    same time on all three.  About 17 % of the pixels carry ink (MNIST's training images:
    19 %).
    """
    strokes, points = 3, 16
    ends = 4 + 20 * torch.rand(n, strokes, 3, 2, generator=generator)  # (start, control, end)
    t = torch.linspace(0, 1, points).view(1, 1, points, 1)
    p0, p1, p2 = (p.unsqueeze(2) for p in ends.unbind(2))
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (n, strokes, points, 2)
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    pixels = torch.stack((rows, cols), -1).view(1, 28 * 28, 2)
    distance = torch.cdist(pixels, curve.reshape(n, strokes * points, 2)).amin(2)  # (n, 784)
    ink = (1.6 - distance).clamp(0, 1)  # (n, 784) intensities in [0, 1]
    return ((ink - MNIST_MEAN) / MNIST_STD).view(n, 1, 28, 28)


def _train_step(case: TrainCase, ops: str, device: torch.device) -> Pass:
    """Closure for one LeNet-5 SGD step on handwriting-like images (:func:`handwriting_images`),
    after one warm-up step, so momentum buffers exist."""
    torch.manual_seed(0)
    model = LeNet5(ops=ops).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    images = handwriting_images(case.batch, gen).to(device)
    labels = torch.randint(0, 10, (case.batch,), generator=gen).to(device)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = torch_F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    step()
    return step


def build_passes(case: Case, pass_: str, device: torch.device) -> tuple[Pass, Pass]:
    """``(torch_pass, candidate_pass)`` for one row; the candidate is handmade or the reference."""
    if isinstance(case, TrainCase):
        return _train_step(case, "torch", device), _train_step(case, "handmade", device)
    candidate = (
        _reference_pass(case, pass_)
        if case.reference
        else _op_pass(case, handmade_F, pass_, device)
    )
    return _op_pass(case, torch_F, pass_, device), candidate


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


def time_pass(fn: Pass, min_run_time: float, threads: int) -> float:
    """Median seconds per call of ``fn`` (``Timer.blocked_autorange``)."""
    # torch.utils.benchmark imports cpp_extension, which logs "No CUDA runtime is found" on
    # CPU-only machines; irrelevant here.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


FAULT_CALLS = 3  # extra calls of a pass to count its page faults

ALLOCATORS = ("steady", "system")
# mallopt(3) parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in this process for reuse: no ``mmap`` for large
    blocks (each would be unmapped on free and fault its pages in again on the next
    allocation) and no trimming of the heap's free top.

    Torch's CPU tensors come from ``malloc``, so afterwards a pass that allocates what an
    earlier one freed reuses pages already mapped. It cannot be undone; memory freed stays
    with the process until it exits. Returns whether it took effect (``False`` where the C
    library has no ``mallopt``: not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20))
    return all(mallopt(param, value) == 1 for param, value in settings)


# torch's CPU allocator asks the kernel for transparent huge pages (2 MiB) on blocks of 2 MiB
# and more when this is "1" (PyTorch's CPU performance tuning guide); it reads it once, at its
# first allocation, and then aligns every block to a page.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


def request_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` for this process (unless it is set already, to any value)
    and return whether torch's allocator took it up: probed by two fresh blocks, which it then
    aligns to a page (otherwise to 64 bytes).

    torch reads the variable at the process's first CPU allocation, so this must run before
    any tensor is made; later, it returns ``False``.  Whether the kernel then hands out huge
    pages is its own setting (``/sys/kernel/mm/transparent_hugepage/enabled``: ``always`` or
    ``madvise``).  Here, with 4 KiB pages, a pass that re-reads a buffer of several MiB it has
    just written ran up to 1.7x slower, depending on where the process's pages happened to
    lie (ResNet 64@56's dL/dw: 3.0 to 4.6 ms from one process to the next; 3.0-3.1 with huge
    pages). Both sides run under it, and it is not neutral: torch's ResNet passes stayed as
    they were, its LeNet conv1 at batch 256 (1 thread) went from 2.80 to 2.27 ms.
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    page = mmap.PAGESIZE
    return all(torch.empty(numel).data_ptr() % page == 0 for numel in (3 << 19, 5 << 18))


def page_faults_per_call(fn: Pass, calls: int = FAULT_CALLS) -> float | None:
    """Minor page faults of this process per call of ``fn`` (``None`` without ``resource``,
    e.g. on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto logs a line at every profiler start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Pass, device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was live when it started.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the profiler's allocator
    events (``profile_memory=True``; positive = allocation, negative = free), in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    # torch.autograd.profiler directly: torch.profiler.profile would also import torch._dynamo
    # (seconds) on first use.
    with _quiet_stderr(), torch.autograd.profiler.profile(profile_memory=True) as prof:
        fn()
    events = [e for e in prof.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def reference_peak_memory(fn: Pass) -> int:
    """Peak bytes NumPy allocated during one call of ``fn`` (:mod:`tracemalloc`)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@dataclass
class Row:
    """One line of the table (times in seconds, memory in bytes)."""

    case: str
    group: str
    shape: str
    pass_: str
    candidate: str
    torch_s: float
    handmade_s: float
    ratio: float
    torch_peak_bytes: int
    handmade_peak_bytes: int
    memory_ratio: float | None
    torch_faults: float | None = None
    handmade_faults: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object (``pass_`` spelled ``pass``)."""
        data = asdict(self)
        data["pass"] = data.pop("pass_")
        return data


def time_round(
    torch_pass: Pass, candidate_pass: Pass, round_: int, min_run_time: float, threads: int
) -> tuple[float, float]:
    """One round of one row: ``(torch_s, candidate_s)``, each pass timed once -- torch first
    in even rounds, the candidate first in odd ones, so neither always runs second."""
    if round_ % 2:
        cand_s = time_pass(candidate_pass, min_run_time, threads)
        return time_pass(torch_pass, min_run_time, threads), cand_s
    torch_s = time_pass(torch_pass, min_run_time, threads)
    return torch_s, time_pass(candidate_pass, min_run_time, threads)


def measure(
    case: Case,
    pass_: str,
    device: torch.device,
    min_run_time: float,
    threads: int,
    rounds: int = DEFAULT_ROUNDS,
) -> Row:
    """Time and measure torch and the candidate on one case and pass, its ``rounds`` rounds
    back to back (:func:`run` spreads them over the whole sweep instead)."""
    return measure_rows([(case, pass_)], device, min_run_time, threads, rounds)[0]


def run(
    cases: Sequence[Case],
    device: torch.device,
    min_run_time: float,
    threads: int,
    progress: bool = True,
    rounds: int = DEFAULT_ROUNDS,
) -> list[Row]:
    """Measure every case (both passes for ops, one ``step`` for training) with a progress bar."""
    jobs = [(c, p) for c in cases for p in (("step",) if isinstance(c, TrainCase) else PASSES)]
    # disable=None: a bar on a terminal, none when stderr is redirected to a file or pipe
    bar = tqdm(
        total=len(jobs) * rounds,
        desc="bench",
        unit="row",
        disable=None if progress else True,
        file=sys.stderr,
    )
    with bar:
        return measure_rows(jobs, device, min_run_time, threads, rounds, bar)


def measure_rows(
    jobs: Sequence[tuple[Case, str]],
    device: torch.device,
    min_run_time: float,
    threads: int,
    rounds: int = DEFAULT_ROUNDS,
    bar: Any = None,
) -> list[Row]:
    """One :class:`Row` per ``(case, pass)`` job, timed in ``rounds`` rounds over all the jobs.

    Round ``r`` times every job once (:func:`time_round`), and each side of a row keeps its
    fastest round.  The rounds of a row are thus a whole sweep apart rather than back to
    back: on this project's shared 2-vCPU machines, spells of seconds to minutes in which
    every handoff of a buffer from one op to the next costs more (a strided copy, a batched
    product and a permute in a chain took 1.5x the sum of the three timed alone, against
    1.0-1.1x outside them) slowed a chain of element-wise ops and products -- the
    handmade passes -- by up to 1.5x, torch's single kernels by about 1.1x; back to back, all
    of a row's rounds fell in the same spell.  Faults and peak memory are measured in the
    last round.
    """
    best = [[float("inf"), float("inf")] for _ in jobs]
    rows = []
    for round_ in range(rounds):
        for k, (case, pass_) in enumerate(jobs):
            if bar is not None:
                bar.set_postfix_str(f"{case.name} {pass_} (round {round_ + 1}/{rounds})")
            torch_pass, candidate_pass = build_passes(case, pass_, device)
            torch_pass(), candidate_pass()  # warm-up (first-call allocations, lazy init)
            times = time_round(torch_pass, candidate_pass, round_, min_run_time, threads)
            best[k] = [min(old, new) for old, new in zip(best[k], times, strict=True)]
            if round_ == rounds - 1:
                row = _row(case, pass_, device, threads, (torch_pass, candidate_pass), *best[k])
                rows.append(row)
            if bar is not None:
                bar.update()
    return rows


def _row(
    case: Case,
    pass_: str,
    device: torch.device,
    threads: int,
    passes: tuple[Pass, Pass],
    torch_s: float,
    cand_s: float,
) -> Row:
    """The row of one job from its best times, with page faults and peak memory measured
    on its ``(torch, candidate)`` passes."""
    torch_pass, candidate_pass = passes
    is_reference = isinstance(case, OpCase) and case.reference
    on_cpu = device.type == "cpu"  # (a GPU pass's time does not wait on host page faults)
    with intra_op_threads(threads):  # as while timed (the Timer pins it)
        torch_faults = page_faults_per_call(torch_pass) if on_cpu else None
        cand_faults = page_faults_per_call(candidate_pass) if on_cpu else None
    torch_mem = peak_memory(torch_pass, device)
    cand_mem = (
        reference_peak_memory(candidate_pass)
        if is_reference
        else peak_memory(candidate_pass, device)
    )
    return Row(
        case=case.name,
        group=case.group,
        shape=case.shape,
        pass_=pass_,
        candidate="numpy-reference" if is_reference else "handmade",
        torch_s=torch_s,
        handmade_s=cand_s,
        ratio=cand_s / torch_s,
        torch_peak_bytes=torch_mem,
        handmade_peak_bytes=cand_mem,
        memory_ratio=None if is_reference or torch_mem <= 0 else cand_mem / torch_mem,
        torch_faults=torch_faults,
        handmade_faults=cand_faults,
    )


# --------------------------------------------------------------------------------------------
# summary and report
# --------------------------------------------------------------------------------------------


def summarize(rows: Sequence[Row]) -> dict[str, Any]:
    """Per-group ratio statistics and every target with its measured value and verdict.

    A target whose group has no rows (e.g. after ``--filter``) is reported with ``ok: None``.
    """

    def ratios(group: str, pass_: str) -> list[float]:
        return [r.ratio for r in rows if r.group == group and r.pass_ == pass_]

    conv, pool, train = (
        ratios("conv", "fwd+bwd"),
        ratios("pool", "fwd+bwd"),
        ratios("train", "step"),
    )
    memory = [r.memory_ratio for r in rows if r.memory_ratio is not None]
    groups = {}
    for group, pass_ in sorted({(r.group, r.pass_) for r in rows}):
        values = ratios(group, pass_)
        groups[f"{group} {pass_}"] = {
            "n": len(values),
            "median_ratio": statistics.median(values),
            "max_ratio": max(values),
        }

    def check(name: str, values: list[float], stat: Callable[[list[float]], float]) -> dict:
        value = stat(values) if values else None
        ok = None if value is None else value <= TARGETS[name]
        return {"target": TARGETS[name], "value": value, "ok": ok}

    targets = {
        "train_step_ratio_max": check("train_step_ratio_max", train, max),
        "conv_fwd_bwd_ratio_median": check("conv_fwd_bwd_ratio_median", conv, statistics.median),
        "conv_fwd_bwd_ratio_max": check("conv_fwd_bwd_ratio_max", conv, max),
        "pool_fwd_bwd_ratio_max": check("pool_fwd_bwd_ratio_max", pool, max),
        "peak_memory_ratio_max": check("peak_memory_ratio_max", memory, max),
    }
    return {"groups": groups, "targets": targets}


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _fmt_faults(n: float | None) -> str:
    return "-" if n is None else f"{n:.0f}"


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table, one line per row."""
    header = (
        "case",
        "shape",
        "pass",
        "torch",
        "handmade",
        "ratio",
        "torch mem",
        "hm mem",
        "mem x",
        "faults t/hm",
    )
    lines = [
        (
            r.case + (" *" if r.candidate != "handmade" else ""),
            r.shape,
            r.pass_,
            _fmt_time(r.torch_s),
            _fmt_time(r.handmade_s),
            f"{r.ratio:.2f}",
            _fmt_bytes(r.torch_peak_bytes),
            _fmt_bytes(r.handmade_peak_bytes),
            "-" if r.memory_ratio is None else f"{r.memory_ratio:.2f}",
            f"{_fmt_faults(r.torch_faults)}/{_fmt_faults(r.handmade_faults)}",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out.append(
        "faults t/hm: minor page faults per call after timing (torch/handmade); far from 0, the "
        "time includes re-touching memory the allocator returned to the OS (--allocator)"
    )
    if any(r.candidate != "handmade" for r in rows):
        out.append(
            "* numpy-reference rows: the 'handmade' columns hold the explicit-loop NumPy "
            "reference (memory via tracemalloc)"
        )
    return "\n".join(out)


def format_summary(summary: dict[str, Any]) -> str:
    """Per-group medians and the target verdicts."""
    out = ["", "ratio handmade/torch per group:"]
    for name, g in summary["groups"].items():
        out.append(
            f"  {name:<18} n={g['n']:<3} median {g['median_ratio']:.2f}  max {g['max_ratio']:.2f}"
        )
    out += ["", "targets:"]
    for name, t in summary["targets"].items():
        verdict = {True: "OK", False: "MISSED", None: "n/a (no rows)"}[t["ok"]]
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        out.append(f"  {name:<28} {value:>6} <= {t['target']:<4}  {verdict}")
    return "\n".join(out)


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """CPU model, core and thread counts, library versions, and the device."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m parity bench",
        description="Time handmade conv2d / max_pool2d / avg_pool2d against torch's kernels "
        "(forward, forward+backward, and a LeNet-5 training step) and report time ratios and "
        "peak memory, flagged against the project's targets.",
        epilog=f"ResNet-style shapes run at batch {RESNET_BATCH}. Timings use "
        "torch.utils.benchmark.Timer.blocked_autorange (median). CPU peak memory comes from "
        "the autograd profiler's allocator events. The command exits 0 unless --strict is "
        "given and a target is missed.",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few small shapes, seconds (smoke test)"
    )
    parser.add_argument(
        "--filter",
        metavar="SUBSTR",
        default=None,
        help="only cases whose name or group contains SUBSTR (case-insensitive)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="intra-op threads (default: torch's default, "
        f"{torch.get_num_threads()} here). On a machine shared with other "
        "work, --threads 1 gives far steadier numbers",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=None,
        metavar="SECONDS",
        help="minimum measuring time per timing (default: 0.2, or 0.02 with --quick)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        metavar="R",
        help=f"time every row in R rounds spread over the sweep (torch and handmade in turn), "
        f"keeping each side's fastest (default: {DEFAULT_ROUNDS}, or 1 with --quick)",
    )
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="steady",
        help="steady (default): glibc malloc keeps freed memory for reuse (no mmap, no "
        "trimming; the effect of jemalloc/tcmalloc), so no pass of either side re-faults "
        "fresh pages -- the noise that dominated some rows here -- and torch's allocator "
        "takes transparent huge pages for blocks of 2 MiB and more (THP_MEM_ALLOC_ENABLE=1, "
        "unless set otherwise); system: malloc and 4 KiB pages as they are (see the faults "
        "column). CPU only; glibc and Linux",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write machine info, rows and summary as JSON to PATH",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 if a target is missed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m parity bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.min_run_time is not None and args.min_run_time <= 0:
        parser.error("--min-run-time must be > 0")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rounds = args.rounds or (1 if args.quick else DEFAULT_ROUNDS)
    threads = args.threads or torch.get_num_threads()  # Timer pins it while timing
    min_run_time = args.min_run_time or (0.02 if args.quick else 0.2)
    device = torch.device(args.device)

    cases = quick_cases() if args.quick else default_cases()
    if args.filter:
        needle = args.filter.lower()
        cases = [c for c in cases if needle in c.name.lower() or needle in c.group.lower()]
        if not cases:
            parser.error(f"--filter {args.filter!r} matches no case")

    allocator = args.allocator
    huge_pages = allocator == "steady" and request_huge_pages()  # (before any tensor is made)
    info = machine_info(device, threads)
    if allocator == "steady" and not keep_freed_memory():
        allocator = "system"
        print("--allocator steady: this C library has no mallopt; using it as it is")
    if args.allocator == "steady" and not huge_pages:
        print(f"--allocator steady: torch's allocator did not take up {HUGE_PAGES_ENV}=1")
    print(
        f"{info['cpu']} | {info['logical_cpus']} logical CPUs | {threads} torch threads | "
        f"torch {info['torch']} | device {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else "")
        + f" | allocator {allocator}"
        + (" + huge pages" if huge_pages else "")
    )
    print(
        f"ResNet-style shapes at batch {RESNET_BATCH}; fwd = no_grad forward; fwd+bwd = "
        "forward + autograd.grad (LeNet conv1 input needs no grad)\n"
    )
    rows = run(cases, device, min_run_time, threads, not args.no_progress, rounds)
    summary = summarize(rows)
    print(format_table(rows))
    print(format_summary(summary))
    if args.json:
        payload = {
            "machine": info,
            "settings": {
                "quick": args.quick,
                "filter": args.filter,
                "min_run_time": min_run_time,
                "rounds": rounds,
                "resnet_batch": RESNET_BATCH,
                "threads": threads,
                "device": args.device,
                "allocator": allocator,
                "huge_pages": huge_pages,
            },
            "rows": [r.to_json() for r in rows],
            "summary": summary,
        }
        write_json_atomic(args.json, payload)
        print(f"\nwrote {args.json}")
    missed = any(t["ok"] is False for t in summary["targets"].values())
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
