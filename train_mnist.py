#!/usr/bin/env python
"""Train LeNet-5 on MNIST with the handmade conv/pool ops, or torch's, or both in lockstep.

Examples::

    python train_mnist.py --data-dir ../shared/mnist            # handmade ops, default recipe
    python train_mnist.py --data-dir ../shared/mnist --ops torch
    python train_mnist.py --data-dir ../shared/mnist --compare --epochs 1
    python train_mnist.py --resume runs/mnist/checkpoint.pt      # continue a killed run
    torchrun --nproc_per_node=2 train_mnist.py --data-dir ../shared/mnist

Writes ``checkpoint.pt`` (every epoch), ``metrics.json`` and ``curves.png`` into ``--out``.
Call :func:`main` with an argument list to run it from Python; it returns the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from handmade.models import MNIST_MEAN, MNIST_STD, OPS, POOLS, LeNet5

DEFAULT_DATA_DIR = "data"
DEFAULT_OUT_DIR = "runs/mnist"
CHECKPOINT_FORMAT = "handmade-train-mnist-checkpoint-v1"
# Flags that define a run: a resumed run takes them from the checkpoint, and refuses
# conflicting values given on the command line.
RUN_KEYS = (
    "ops",
    "pool",
    "compare",
    "epochs",
    "batch_size",
    "lr",
    "seed",
    "limit_train",
    "limit_test",
    "fake_data",
    "dtype",
)
DEFAULTS: dict[str, Any] = {
    "ops": "handmade",
    "pool": "max",
    "epochs": 4,
    "batch_size": 64,
    "lr": 0.05,
    "seed": 0,
    "device": "auto",
    "dtype": "float32",
    "out": DEFAULT_OUT_DIR,
}
EVAL_BATCH_SIZE = 1000


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The command-line parser. ``with_defaults=False`` leaves unset flags out of the result,
    which tells flags given on the command line apart from defaults."""

    def default(name: str, value: Any = None) -> Any:
        return DEFAULTS.get(name, value) if with_defaults else argparse.SUPPRESS

    p = argparse.ArgumentParser(
        prog="train_mnist.py",
        description=(
            "Train LeNet-5 on MNIST with the handmade conv/pool autograd Functions "
            "(--ops handmade, the default) or torch's own (--ops torch); --compare trains both "
            "side by side from the same weights on the same batches and reports how far apart "
            "they are. Default recipe: SGD with Nesterov momentum 0.9 and a one-cycle learning "
            "rate schedule, batch 64, inputs normalized with MNIST's mean/std. "
            "Runs under torchrun for several processes (DistributedDataParallel)."
        ),
        epilog=(
            "Outputs in --out: checkpoint.pt (every epoch), metrics.json, curves.png. "
            "MNIST: --data-dir or $MNIST_ROOT names a folder holding MNIST/ in torchvision's "
            f"layout; with neither, MNIST is downloaded into ./{DEFAULT_DATA_DIR}."
        ),
    )
    p.add_argument(
        "--data-dir",
        default=default("data_dir"),
        metavar="DIR",
        help="folder that holds MNIST/ (torchvision layout); default: $MNIST_ROOT, else download "
        f"into ./{DEFAULT_DATA_DIR}",
    )
    p.add_argument(
        "--ops",
        choices=OPS,
        default=default("ops"),
        help="where the conv and pooling layers come from (default: %(default)s)",
    )
    p.add_argument(
        "--pool",
        choices=POOLS,
        default=default("pool"),
        help="max pooling, or average pooling as in LeCun's subsampling layers "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        default=default("compare", False),
        help="train the handmade and the torch model side by side from the same weights on the "
        "same batches and report the largest loss and parameter differences; a control pair "
        "(torch vs torch through its other conv kernels) shows how far float rounding alone "
        "moves two runs apart (--ops picks the model reported at the top level)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=default("dtype"),
        help="parameter and data precision (default: %(default)s); with float64, --compare "
        "stays in lockstep to ~1e-15 for the whole run",
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=default("epochs"), help="(default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=default("batch_size"),
        help="training batch size per process (default: %(default)s)",
    )
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=default("lr"),
        help="peak learning rate of the one-cycle schedule (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=default("seed"), help="(default: %(default)s)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=default("device"),
        help="auto = cuda when available (default: %(default)s)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=default("threads"),
        metavar="N",
        help="CPU threads per process (default: $OMP_NUM_THREADS if set, else 1: LeNet's layers "
        "are too small to gain from more, and on a busy machine extra threads cost up to 10x)",
    )
    p.add_argument(
        "--out",
        default=default("out"),
        metavar="DIR",
        help="output folder (default: %(default)s; with --resume: the checkpoint's folder)",
    )
    p.add_argument(
        "--resume",
        default=default("resume"),
        metavar="PATH",
        help="continue from a checkpoint.pt; the run's flags are taken from it",
    )
    p.add_argument(
        "--limit-train",
        type=_positive_int,
        default=default("limit_train"),
        metavar="N",
        help="train on the first N training images only (quick runs)",
    )
    p.add_argument(
        "--limit-test",
        type=_positive_int,
        default=default("limit_test"),
        metavar="N",
        help="evaluate on the first N test images only",
    )
    p.add_argument(
        "--stop-after",
        type=_positive_int,
        default=default("stop_after"),
        metavar="EPOCHS",
        help="stop (as if killed) once this many epochs are done; the learning rate schedule "
        "still spans --epochs, so --resume finishes the run exactly",
    )
    p.add_argument(
        "--fake-data",
        type=_positive_int,
        default=default("fake_data"),
        metavar="N",
        help="use N generated 28x28 training images (and N/5 test images) instead of MNIST: "
        "for testing the pipeline without files",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        default=default("no_progress", False),
        help="no progress bar (summary lines only)",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, set[str]]:
    """Parse ``argv``; return the arguments and the names of the flags given explicitly."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    explicit = set(vars(build_parser(with_defaults=False).parse_args(argv)))
    return args, explicit


# --------------------------------------------------------------------------- processes, files


@dataclass(frozen=True)
class Context:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def fail(message: str) -> SystemExit:
    """A clean exit with ``message`` on stderr and status 1 (no traceback)."""
    return SystemExit(f"train_mnist.py: error: {message}")


def setup(device_flag: str, threads: int | None) -> Context:
    """Pick the device and CPU threads; under torchrun (``WORLD_SIZE`` > 1) join the process
    group."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda, but CUDA is not available here")
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        device = torch.device("cpu")
        # Subnormal floats (values decaying towards 0) are very slow on x86 CPUs; flushing them
        # to zero changes no result measurably and keeps every step equally fast.
        torch.set_flush_denormal(True)
    if threads is not None:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Context(rank=rank, world_size=world_size, device=device)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(file)`` into a temporary file next to it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- data


@dataclass
class Split:
    """A whole dataset split as two tensors: normalized images ``(N, 1, 28, 28)``, labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def _normalize(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


def fake_mnist(n_train: int, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Generated stand-in for MNIST, for tests: uint8 ``(N, 28, 28)`` images, each a noisy
    copy (20% of the pattern dropped, uniform noise added) of one of 10 random blocky
    patterns, labelled by pattern, so LeNet-5 learns it in a few dozen steps.
    Returns ``((train_images, train_labels), (test_images, test_labels))``, N/5 test images."""
    g = torch.Generator().manual_seed(seed)
    patterns = (torch.rand(10, 7, 7, generator=g) > 0.7).float() * 190.0
    patterns = patterns.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, 10, (n,), generator=g)
        kept = torch.rand(n, 28, 28, generator=g) > 0.2
        noise = torch.rand(n, 28, 28, generator=g) * 60.0
        return (patterns[labels] * kept + noise).to(torch.uint8), labels

    return draw(n_train), draw(max(10, n_train // 5))


def _read_mnist(root: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], ...] | None:
    from torchvision.datasets import MNIST

    try:
        splits = [MNIST(str(root), train=train, download=False) for train in (True, False)]
    except RuntimeError:  # torchvision: "Dataset not found"
        return None
    return tuple((s.data, s.targets) for s in splits)


def _download_mnist(root: Path) -> str | None:
    """Download MNIST into ``root``; return None, or the reason it failed."""
    from torchvision.datasets import MNIST

    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, ...)
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def load_mnist(data_dir: str | None, ctx: Context) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """MNIST as uint8 tensors ``((train_images, train_labels), (test_images, test_labels))``.

    Reads ``data_dir`` (or ``$MNIST_ROOT``), which must already hold it; with neither, reads or
    downloads into ``./data``. Raises a clean :class:`SystemExit` when there is no data.
    """
    source = "--data-dir" if data_dir else "MNIST_ROOT" if os.environ.get("MNIST_ROOT") else None
    if source is not None:
        root = Path(data_dir or os.environ["MNIST_ROOT"]).expanduser()
        data = _read_mnist(root)
        if data is None and root.name == "MNIST":  # pointed at MNIST/ itself: accept it
            data = _read_mnist(root.parent)
        if data is None:
            raise fail(
                f"no MNIST in {root} (from {source}). Expected torchvision's layout, "
                f"{root}/MNIST/raw/train-images-idx3-ubyte and the other three files. Point "
                f"{source} at the folder that holds MNIST/, or unset it to download into "
                f"./{DEFAULT_DATA_DIR}."
            )
        return data
    root = Path(DEFAULT_DATA_DIR)
    data = _read_mnist(root)
    if data is not None:
        return data
    problem = None
    if ctx.is_main:
        print(f"MNIST not found in ./{root}; downloading it there", flush=True)
        problem = _download_mnist(root)
    if ctx.distributed:
        dist.barrier()
    data = _read_mnist(root)
    if data is None:
        raise fail(
            f"MNIST is not in ./{root} and could not be downloaded "
            f"({problem or 'download failed'}). If this machine is offline, pass --data-dir DIR "
            "or set MNIST_ROOT=DIR, where DIR holds MNIST/ in torchvision's layout "
            "(MNIST/raw/train-images-idx3-ubyte, ...)."
        )
    return data


def prepare_data(args: argparse.Namespace, ctx: Context) -> tuple[Split, Split]:
    """Train and test splits, normalized, limited as asked, on the run's device and dtype."""
    if args.fake_data:
        raw = fake_mnist(args.fake_data, seed=args.seed + 1_000_003)
    else:
        raw = load_mnist(args.data_dir, ctx)
    (train_x, train_y), (test_x, test_y) = raw
    train_x, train_y = train_x[: args.limit_train], train_y[: args.limit_train]
    test_x, test_y = test_x[: args.limit_test], test_y[: args.limit_test]
    dtype = getattr(torch, args.dtype)
    return (
        Split(_normalize(train_x).to(ctx.device, dtype), train_y.long().to(ctx.device)),
        Split(_normalize(test_x).to(ctx.device, dtype), test_y.long().to(ctx.device)),
    )


# --------------------------------------------------------------------------- training

CONTROL = "torch-alt"  # torch's ops through its other kernels: the control of --compare


@contextlib.contextmanager
def alternative_torch_kernels(device: torch.device) -> Iterator[None]:
    """Run torch's convolutions through its other implementation: oneDNN off on CPU (im2col +
    GEMM), cuDNN off on CUDA. Same math, different float rounding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # switching oneDNN flags warns about Intel-GPU TF32
        if device.type == "cuda":
            flags = torch.backends.cudnn.flags(enabled=False, deterministic=True)
        else:
            flags = torch.backends.mkldnn.flags(enabled=False)
        with flags:
            yield


@dataclass
class Trainee:
    """One model under training, with its optimizer and learning rate schedule."""

    name: str  # "handmade", "torch" or CONTROL
    model: torch.nn.Module  # DistributedDataParallel-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device

    @property
    def module(self) -> torch.nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def kernels(self) -> contextlib.AbstractContextManager[None]:
        if self.name == CONTROL:
            return alternative_torch_kernels(self.device)
        return contextlib.nullcontext()


def trainee_names(args: argparse.Namespace) -> list[str]:
    """``[args.ops]``; with --compare ``[args.ops, other ops, CONTROL]``."""
    if not args.compare:
        return [args.ops]
    return [args.ops, next(o for o in OPS if o != args.ops), CONTROL]


def make_trainees(args: argparse.Namespace, ctx: Context, steps_per_epoch: int) -> list[Trainee]:
    """The run's model(s), all starting from the same weights (seeded by ``args.seed``).

    Recipe: SGD, Nesterov momentum 0.9, weight decay 5e-4, one-cycle schedule peaking at
    ``args.lr`` after 15% of the steps."""
    torch.manual_seed(args.seed)
    names = trainee_names(args)
    dtype = getattr(torch, args.dtype)
    models = [LeNet5(ops="torch" if n == CONTROL else n, pool=args.pool) for n in names]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    trainees = []
    for name, model in zip(names, models, strict=True):
        model.to(device=ctx.device, dtype=dtype)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=args.lr,
            total_steps=args.epochs * steps_per_epoch,
            pct_start=0.15,
            div_factor=10.0,
            final_div_factor=100.0,
        )
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids)
        trainees.append(Trainee(name, model, optimizer, scheduler, ctx.device))
    return trainees


def _all_reduce_sum(values: list[float], ctx: Context) -> list[float]:
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(trainee: Trainee, test: Split, ctx: Context) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) on ``test``, each process taking a shard."""
    model = trainee.module
    model.eval()
    shard = torch.arange(ctx.rank, len(test), ctx.world_size, device=test.labels.device)
    loss_sum, correct = 0.0, 0.0
    with trainee.kernels():
        for idx in shard.split(EVAL_BATCH_SIZE):
            logits = model(test.images[idx])
            labels = test.labels[idx]
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
    model.train()
    loss_sum, correct = _all_reduce_sum([loss_sum, correct], ctx)
    return loss_sum / len(test), correct / len(test)


def max_param_diff(a: Trainee, b: Trainee) -> float:
    """Largest absolute difference between same-named parameters of two models."""
    pb = dict(b.module.named_parameters())
    return max((p - pb[n]).abs().max().item() for n, p in a.module.named_parameters())


def train_epoch(
    trainees: list[Trainee],
    train: Split,
    sampler: DistributedSampler,
    args: argparse.Namespace,
    epoch: int,
    ctx: Context,
) -> tuple[list[float], list[list[float]]]:
    """One pass over this process's shard, every trainee on the same batches.

    Returns each trainee's mean training loss (over all processes) and its per-step losses
    (this process's, for the --compare differences)."""
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), device=train.labels.device)
    batches = order.split(args.batch_size)
    step_losses: list[list[torch.Tensor]] = [[] for _ in trainees]
    bar = tqdm(
        total=len(order) * ctx.world_size,
        desc=f"epoch {epoch}/{args.epochs}",
        unit="img",
        unit_scale=True,
        dynamic_ncols=True,
        mininterval=0.5,
        leave=False,
        disable=not ctx.is_main or args.no_progress,
    )
    for step, idx in enumerate(batches):
        x, y = train.images[idx], train.labels[idx]
        for t, losses in zip(trainees, step_losses, strict=True):
            with t.kernels():
                t.optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(t.model(x), y)
                loss.backward()
                t.optimizer.step()
            t.scheduler.step()
            losses.append(loss.detach())
        bar.update(len(idx) * ctx.world_size)
        if not bar.disable and (step % 20 == 0 or step == len(batches) - 1):
            postfix = {"loss": f"{step_losses[0][-1].item():.4f}"}
            if len(trainees) > 1:
                diff = (step_losses[0][-1] - step_losses[1][-1]).abs().item()
                postfix["|loss diff|"] = f"{diff:.1e}"
            bar.set_postfix(postfix, refresh=step == len(batches) - 1)  # last: always shown
    bar.close()
    sizes = torch.tensor([len(i) for i in batches], device=ctx.device, dtype=torch.float64)
    stacked = [torch.stack(losses).double() for losses in step_losses]
    sums = _all_reduce_sum([(s * sizes).sum().item() for s in stacked], ctx)
    mean_losses = [v / (len(order) * ctx.world_size) for v in sums]
    return mean_losses, [s.tolist() for s in stacked]


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint atomically (a killed write leaves the previous one intact)."""
    atomic_write(path, lambda f: torch.save(state, f))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; clean error when unreadable or foreign."""
    if not Path(path).is_file():
        raise fail(f"--resume {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise fail(
            f"--resume {path}: cannot read the checkpoint (corrupt or truncated?): {_first_line(e)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise fail(f"--resume {path}: not a train_mnist.py checkpoint ({CHECKPOINT_FORMAT})")
    required = {"epoch", "args", "models", "optimizers", "schedulers", "rng", "history"}
    missing = required - set(state)
    if missing:
        raise fail(f"--resume {path}: checkpoint lacks {sorted(missing)}")
    return state


def apply_checkpoint_args(
    args: argparse.Namespace, explicit: set[str], state: dict[str, Any], path: str
) -> None:
    """Adopt the checkpoint's run flags; refuse flags on the command line that contradict it."""
    saved = state["args"]
    for key in RUN_KEYS:
        if key not in saved:
            raise fail(f"--resume {path}: checkpoint lacks the setting {key!r}")
        if key in explicit and getattr(args, key) != saved[key]:
            flag = "--" + key.replace("_", "-")
            raise fail(
                f"--resume {path}: {flag} {getattr(args, key)} does not match the checkpoint's "
                f"{saved[key]}; drop the flag to continue that run, or start a new one"
            )
        setattr(args, key, saved[key])
    if "out" not in explicit:
        args.out = str(Path(path).parent)


def restore(trainees: list[Trainee], state: dict[str, Any], path: str) -> None:
    """Load models, optimizers, schedules and RNG states from ``state``."""
    try:
        for t in trainees:
            t.module.load_state_dict(state["models"][t.name])
            t.optimizer.load_state_dict(state["optimizers"][t.name])
            t.scheduler.load_state_dict(state["schedulers"][t.name])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if torch.cuda.is_available() and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise fail(
            f"--resume {path}: checkpoint does not match this model: {_first_line(e)}"
        ) from None


# --------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Everything a run has produced so far; saved in checkpoints."""

    history: list[dict[str, Any]]  # one record per epoch
    step_diffs: dict[str, list[float]]  # --compare: per-step |loss diff| of "pair", "control"
    seconds: float  # wall time of the epochs run so far

    def to_state(self) -> dict[str, Any]:
        diffs = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.step_diffs.items()}
        return {"history": self.history, "step_diffs": diffs, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Progress:
        if state is None:
            return cls([], {"pair": [], "control": []}, 0.0)
        diffs = {k: v.tolist() for k, v in state.get("step_diffs", {}).items()}
        return cls(list(state["history"]), diffs, float(state.get("seconds", 0.0)))


def checkpoint_state(
    args: argparse.Namespace,
    trainees: list[Trainee],
    epoch: int,
    progress: Progress,
    ctx: Context,
) -> dict[str, Any]:
    """Everything --resume needs (tensors and plain Python values only: weights_only loads)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "args": {k: getattr(args, k) for k in RUN_KEYS},
        "world_size": ctx.world_size,
        "models": {t.name: t.module.state_dict() for t in trainees},
        "optimizers": {t.name: t.optimizer.state_dict() for t in trainees},
        "schedulers": {t.name: t.scheduler.state_dict() for t in trainees},
        "rng": {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
        **progress.to_state(),
    }


def pair_indices(trainees: list[Trainee]) -> dict[str, tuple[int, int]]:
    """--compare: the pair under test (handmade vs torch) and the control pair (torch vs torch
    through its other kernels)."""
    names = [t.name for t in trainees]
    if len(names) < 3:
        return {}
    return {"pair": (0, 1), "control": (names.index("torch"), names.index(CONTROL))}


def compare_record(
    trainees: list[Trainee],
    train_losses: list[float],
    step_losses: list[list[float]],
    other_eval: tuple[float, float],
    progress: Progress,
) -> dict[str, Any]:
    """Per-epoch --compare numbers; appends this epoch's per-step differences to ``progress``."""
    record: dict[str, Any] = {
        "ops": trainees[1].name,
        "train_loss": train_losses[1],
        "test_loss": other_eval[0],
        "test_accuracy": other_eval[1],
    }
    for key, (i, j) in pair_indices(trainees).items():
        diffs = [abs(a - b) for a, b in zip(step_losses[i], step_losses[j], strict=True)]
        progress.step_diffs[key].extend(diffs)
        prefix = "" if key == "pair" else "control_"
        record[prefix + "max_loss_diff"] = max(diffs, default=0.0)
        record[prefix + "max_param_diff"] = max_param_diff(trainees[i], trainees[j])
    return record


def run_epoch(
    epoch: int,
    trainees: list[Trainee],
    data: tuple[Split, Split],
    sampler: DistributedSampler,
    args: argparse.Namespace,
    ctx: Context,
    progress: Progress,
) -> dict[str, Any]:
    """Train one epoch, evaluate, and return the epoch's record."""
    train, test = data
    t0 = time.perf_counter()
    train_losses, step_losses = train_epoch(trainees, train, sampler, args, epoch, ctx)
    train_seconds = time.perf_counter() - t0
    loss, accuracy = evaluate(trainees[0], test, ctx)
    record: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": train_losses[0],
        "test_loss": loss,
        "test_accuracy": accuracy,
        "images_per_second": len(sampler) * ctx.world_size / train_seconds,
        "lr_end": trainees[0].scheduler.get_last_lr()[0],
    }
    if args.compare:
        other_eval = evaluate(trainees[1], test, ctx)
        record["compare"] = compare_record(
            trainees, train_losses, step_losses, other_eval, progress
        )
    record["seconds"] = time.perf_counter() - t0
    return record


# --------------------------------------------------------------------------- reports


def control_description(device: str) -> str:
    return "torch vs torch with " + ("cuDNN off" if device.startswith("cuda") else "oneDNN off")


LOCKSTEP_TOLERANCE = 1e-5  # |loss diff| of two runs still "together": ~40 float32 ulps of 2.3


def lockstep_steps(diffs: list[float]) -> int:
    """How many steps from the start the loss difference stayed within LOCKSTEP_TOLERANCE."""
    return next((i for i, d in enumerate(diffs) if d > LOCKSTEP_TOLERANCE), len(diffs))


def build_metrics(args: argparse.Namespace, progress: Progress, ctx: Context) -> dict[str, Any]:
    """The content of metrics.json."""
    history = progress.history
    last = history[-1] if history else {}
    metrics: dict[str, Any] = {
        "test_accuracy": last.get("test_accuracy"),
        "test_loss": last.get("test_loss"),
        "ops": args.ops,
        "pool": args.pool,
        "dtype": args.dtype,
        "seconds": progress.seconds,
        "epochs_done": len(history),
        "epochs": history,
        "device": str(ctx.device),
        "world_size": ctx.world_size,
        "data": f"fake({args.fake_data})" if args.fake_data else "mnist",
        "args": {k: getattr(args, k) for k in RUN_KEYS},
        "torch_version": torch.__version__,
    }
    if args.compare and history:
        per_epoch = [h["compare"] for h in history]
        diffs = progress.step_diffs
        metrics["compare"] = {
            "ops": [args.ops, per_epoch[0]["ops"]],
            "dtype": args.dtype,
            "max_loss_diff": max(diffs["pair"], default=0.0),
            "max_param_diff": max(c["max_param_diff"] for c in per_epoch),
            "steps": len(diffs["pair"]),
            "lockstep_steps": lockstep_steps(diffs["pair"]),
            "lockstep_tolerance": LOCKSTEP_TOLERANCE,
            "first_epoch_max_loss_diff": per_epoch[0]["max_loss_diff"],
            "first_epoch_param_diff": per_epoch[0]["max_param_diff"],
            "final_param_diff": per_epoch[-1]["max_param_diff"],
            "other_test_accuracy": per_epoch[-1]["test_accuracy"],
            "control": {
                "what": control_description(str(ctx.device)),
                "max_loss_diff": max(diffs["control"], default=0.0),
                "max_param_diff": max(c["control_max_param_diff"] for c in per_epoch),
                "lockstep_steps": lockstep_steps(diffs["control"]),
                "first_epoch_max_loss_diff": per_epoch[0]["control_max_loss_diff"],
                "first_epoch_param_diff": per_epoch[0]["control_max_param_diff"],
                "final_param_diff": per_epoch[-1]["control_max_param_diff"],
            },
        }
    return metrics


def plot_curves(path: Path, metrics: dict[str, Any], step_diffs: dict[str, list[float]]) -> None:
    """Loss and accuracy per epoch; with --compare also the per-step loss differences and the
    parameter differences of the pair and of the control pair."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    history = metrics["epochs"]
    compare = metrics.get("compare")
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(16 if compare else 10, 4.4), layout="constrained")
    axes = fig.subplots(1, 3 if compare else 2)
    ops = metrics["ops"]
    runs = [(ops, history, "-")]
    if compare:
        runs.append((compare["ops"][1], [h["compare"] for h in history], "--"))
    for name, records, style in runs:
        axes[0].plot(
            epochs, [r["train_loss"] for r in records], "o" + style, label=f"train, {name}"
        )
        axes[0].plot(epochs, [r["test_loss"] for r in records], "s" + style, label=f"test, {name}")
        acc = [100 * r["test_accuracy"] for r in records]
        axes[1].plot(epochs, acc, "o" + style, label=name)
    axes[0].set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    axes[1].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    for ax in axes[:2]:
        ax.set_xticks(epochs)
        ax.legend()
    if compare:
        ax = axes[2]
        floor = 1e-17 if compare["dtype"] == "float64" else 1e-10
        control = compare["control"]["what"]
        for key, label, color in (
            ("control", control, "0.65"),
            ("pair", " vs ".join(compare["ops"]), "C0"),
        ):
            d = step_diffs.get(key, [])
            xs = [len(history) * (i + 1) / len(d) for i in range(len(d))]
            ax.plot(
                xs,
                [max(v, floor) for v in d],
                lw=0.6,
                color=color,
                label=f"|loss diff| per step, {label}",
            )
        ax.axhline(LOCKSTEP_TOLERANCE, color="k", lw=0.8, ls=":", label="lockstep tolerance")
        ax.plot(
            epochs,
            [max(h["compare"]["max_param_diff"], floor) for h in history],
            "o-",
            color="C3",
            label="max |param diff| at epoch end",
        )
        ax.plot(
            epochs,
            [max(h["compare"]["control_max_param_diff"], floor) for h in history],
            "x--",
            color="0.3",
            label="same, control",
        )
        ax.set(
            xlabel="epoch",
            yscale="log",
            ylabel=f"absolute difference (0 drawn at {floor:.0e})",
            title=f"lockstep ({compare['dtype']}): max |loss diff| {compare['max_loss_diff']:.1e},"
            f" max |param diff| {compare['max_param_diff']:.1e}\ncontrol ({control}): "
            f"{compare['control']['max_loss_diff']:.1e}, "
            f"{compare['control']['max_param_diff']:.1e}",
        )
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"LeNet-5 on {metrics['data']}, {ops} ops, {metrics['pool']} pool, {metrics['dtype']}: "
        f"test accuracy {100 * (metrics['test_accuracy'] or 0):.2f}%"
    )
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def write_reports(out: Path, metrics: dict[str, Any], progress: Progress) -> None:
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(out / "metrics.json", lambda f: f.write(text), mode="w")
    plot_curves(out / "curves.png", metrics, progress.step_diffs)


def epoch_line(h: dict[str, Any], args: argparse.Namespace, ctx: Context) -> str:
    line = (
        f"epoch {h['epoch']}/{args.epochs}  train loss {h['train_loss']:.4f}  "
        f"test loss {h['test_loss']:.4f}  test acc {100 * h['test_accuracy']:.2f}%  "
        f"{h['images_per_second']:,.0f} img/s  ({h['seconds']:.1f} s)"
    )
    c = h.get("compare")
    if c:
        line += (
            f"\n  vs {c['ops']}: test acc {100 * c['test_accuracy']:.2f}%  "
            f"max |loss diff| {c['max_loss_diff']:.2e}  max |param diff| {c['max_param_diff']:.2e}"
            f"\n  control, {control_description(str(ctx.device))}: "
            f"max |loss diff| {c['control_max_loss_diff']:.2e}  "
            f"max |param diff| {c['control_max_param_diff']:.2e}"
        )
    return line


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace, explicit: set[str], ctx: Context) -> dict[str, Any]:
    """Train as ``args`` say (resuming if asked); return the metrics."""
    state = None
    if args.resume:
        state = load_checkpoint(args.resume)
        apply_checkpoint_args(args, explicit, state, args.resume)
        if state.get("world_size", 1) != ctx.world_size and ctx.is_main:
            print(
                f"note: checkpoint written by {state['world_size']} process(es), resuming with "
                f"{ctx.world_size}: the data shards differ, results will not match bit for bit"
            )
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    data = prepare_data(args, ctx)
    sampler = DistributedSampler(
        range(len(data[0])), num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed
    )
    trainees = make_trainees(args, ctx, steps_per_epoch=-(-len(sampler) // args.batch_size))
    progress = Progress.from_state(state)
    if state is not None:
        restore(trainees, state, args.resume)
    first_epoch = len(progress.history) + 1
    last_epoch = min(args.epochs, args.stop_after or args.epochs)
    if ctx.is_main:
        what = " vs ".join(t.name for t in trainees)
        print(
            f"LeNet-5 ({what}; {args.pool} pool, {args.dtype}) on {len(data[0]):,} train / "
            f"{len(data[1]):,} test images, {ctx.device}, {ctx.world_size} process(es), "
            f"epochs {first_epoch}..{last_epoch} of {args.epochs}"
        )
    seconds_before, started = progress.seconds, time.perf_counter()
    for epoch in range(first_epoch, last_epoch + 1):
        record = run_epoch(epoch, trainees, data, sampler, args, ctx, progress)
        progress.history.append(record)
        progress.seconds = seconds_before + time.perf_counter() - started
        if ctx.is_main:
            print(epoch_line(record, args, ctx), flush=True)
            save_checkpoint(
                out / "checkpoint.pt", checkpoint_state(args, trainees, epoch, progress, ctx)
            )
            write_reports(out, build_metrics(args, progress, ctx), progress)
    metrics = build_metrics(args, progress, ctx)
    if ctx.is_main:
        acc = metrics["test_accuracy"]
        if first_epoch > last_epoch:
            print(f"nothing to do: {len(progress.history)} of {args.epochs} epochs already done")
        else:
            done = "stopped" if last_epoch < args.epochs else "done"
            print(
                f"{done} after epoch {last_epoch}/{args.epochs}: test accuracy {100 * acc:.2f}% "
                f"({args.ops} ops) in {progress.seconds:.1f} s; wrote {out}/"
            )
            if "compare" in metrics:
                c = metrics["compare"]
                print(
                    f"lockstep: {' and '.join(c['ops'])} within |loss diff| <= "
                    f"{LOCKSTEP_TOLERANCE:g} for the first {c['lockstep_steps']} of {c['steps']} "
                    f"steps (control, {c['control']['what']}: "
                    f"{c['control']['lockstep_steps']}); max |param diff| at the end "
                    f"{c['final_param_diff']:.2e} (control {c['control']['final_param_diff']:.2e})"
                )
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run training with command-line arguments ``argv`` (default ``sys.argv[1:]``).

    Returns the metrics (the content of ``metrics.json``). Errors the user can fix (no data,
    bad checkpoint, ...) raise :class:`SystemExit` with a message.
    """
    args, explicit = parse_args(argv)
    threads_before = torch.get_num_threads()
    ctx = setup(args.device, args.threads)
    try:
        return run(args, explicit, ctx)
    finally:
        if ctx.distributed:
            # gloo's worker threads release a collective's tensors after the caller's wait()
            # has returned; one still doing so once the interpreter shuts down cannot take the
            # GIL and aborts the process ("terminate called without an active exception":
            # 5 of 70 two-process runs of the DDP test on a busy machine).  A collection here
            # first leaves them that time -- 0 of 42 runs -- a mitigation of gloo's race, not
            # a cure.
            gc.collect()
            dist.destroy_process_group()
        torch.set_num_threads(threads_before)  # leave a calling Python process as it was
        torch.set_flush_denormal(False)


if __name__ == "__main__":
    main()
