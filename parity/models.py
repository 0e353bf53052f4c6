"""``python -m parity models``: whole torchvision networks, original vs :func:`handmade.convert`.

Each network is built with random weights (``weights=None``: nothing is downloaded) in
float64, converted with ``handmade.convert`` (a deep copy whose Conv2d/MaxPool2d/AvgPool2d
are the handmade modules), and both copies get the same batch: the report gives the
largest difference of the outputs and of every parameter gradient of ``(output * v).sum()``
for a seeded random ``v``.  Differences are relative to the largest magnitude of the
reference (torch) tensor(s): ``max|out - out_ref| / max|out_ref|`` and
``max over params of max|g - g_ref| / max over params of max|g_ref|`` (parameters whose
true gradient is zero, e.g. a BatchNorm bias followed by another train-mode BatchNorm,
only carry rounding noise, so a per-parameter ratio would be meaningless).

Modes: ``train`` (BatchNorm uses batch statistics; dropout masks are made identical by
re-seeding torch's RNG before each forward) and ``eval`` (running statistics, no dropout).
In train mode the input must leave enough pixels in the last stages: a BatchNorm over a
handful of values amplifies rounding noise (at 32x32, torch against itself in channels_last
differs by up to 5e-3 on DenseNet), so the default input sizes keep >= 2x2 pixels there.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import intra_op_threads, write_json_atomic

__all__ = ["MODELS", "ModelResult", "ModelSpec", "build", "compare_model", "main"]


@dataclass(frozen=True)
class ModelSpec:
    """A torchvision architecture and the input it is checked with."""

    name: str
    input_shape: tuple[int, int, int, int]
    kwargs: tuple[tuple[str, Any], ...] = ()
    what: str = ""


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("resnet18", (2, 3, 64, 64), (), "residual; max-pool 3/2/1"),
        ModelSpec("vgg11", (2, 3, 32, 32), (), "plain conv stack; 5 max-pools"),
        ModelSpec("mobilenet_v2", (2, 3, 64, 64), (), "depthwise (groups=C) convs"),
        # 69x69: the first ceil_mode max-pool sees 32x32 and rounds 14.5 windows up
        ModelSpec("squeezenet1_0", (2, 3, 69, 69), (), "fire modules; ceil_mode max-pools"),
        ModelSpec(
            "googlenet",
            (2, 3, 64, 64),
            (("aux_logits", False), ("init_weights", True)),
            "inception; ceil_mode max-pools",
        ),
        # 72x72: a transition avg-pool sees 9x9 (floor of an odd size)
        ModelSpec("densenet121", (2, 3, 72, 72), (), "dense blocks; avg-pool transitions"),
    )
}


@dataclass
class ModelResult:
    """Differences between the original and the converted network (see module docstring)."""

    model: str
    mode: str
    input_shape: tuple[int, ...]
    replaced: dict[str, int]
    out_abs: float
    out_rel: float
    grad_abs: float
    grad_rel: float
    worst_param: str
    params: int
    seconds: float
    passed: bool


def build(name: str, seed: int = 0, num_classes: int = 10) -> nn.Module:
    """A torchvision network with seeded random weights in float64 (no download)."""
    import torchvision

    spec = MODELS[name]
    torch.manual_seed(seed)
    ctor = getattr(torchvision.models, name)
    return ctor(weights=None, num_classes=num_classes, **dict(spec.kwargs)).double()


def _count(model: nn.Module) -> dict[str, int]:
    import handmade.nn as hnn

    counts = {"Conv2d": 0, "MaxPool2d": 0, "AvgPool2d": 0, "torch_left": 0}
    for m in model.modules():
        for cls in (hnn.Conv2d, hnn.MaxPool2d, hnn.AvgPool2d):
            if type(m) is cls:
                counts[cls.__name__] += 1
        if type(m) in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d):
            counts["torch_left"] += 1
    return counts


def _run(model: nn.Module, x: torch.Tensor, v: torch.Tensor | None, mode: str, seed: int):
    model.train(mode == "train")
    torch.manual_seed(seed + 1)  # identical dropout masks in both copies
    out = model(x)
    if v is None:
        v = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(seed + 2), dtype=out.dtype
        ).to(out.device)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * v).sum(), params)
    return out.detach(), grads, v


def compare_model(
    name: str,
    mode: str = "train",
    seed: int = 0,
    tol: float = 1e-10,
    input_shape: Sequence[int] | None = None,
    device: str = "cpu",
    model: nn.Module | None = None,
) -> ModelResult:
    """Run one batch through ``name`` and its converted copy; compare outputs and gradients.

    ``model`` may be passed to reuse an already built network (it is not modified).
    """
    from handmade.convert import convert

    start = time.perf_counter()
    shape = tuple(input_shape or MODELS[name].input_shape)
    original = (model if model is not None else build(name, seed)).to(device)
    converted = convert(original)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x.to(device)
    out_ref, grads_ref, v = _run(original, x, None, mode, seed)
    out, grads, _ = _run(converted, x, v, mode, seed)
    out_abs = float((out - out_ref).abs().max())
    out_rel = out_abs / max(float(out_ref.abs().max()), 1e-300)
    names = [n for n, p in original.named_parameters() if p.requires_grad]
    diffs = [float((g - r).abs().max()) for g, r in zip(grads, grads_ref, strict=True)]
    grad_scale = max(float(r.abs().max()) for r in grads_ref)
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    grad_abs = diffs[worst]
    grad_rel = grad_abs / max(grad_scale, 1e-300)
    counts = _count(converted)
    ok = out_rel <= tol and grad_rel <= tol and counts["torch_left"] == 0
    return ModelResult(
        model=name,
        mode=mode,
        input_shape=shape,
        replaced=counts,
        out_abs=out_abs,
        out_rel=out_rel,
        grad_abs=grad_abs,
        grad_rel=grad_rel,
        worst_param=names[worst],
        params=sum(p.numel() for p in original.parameters()),
        seconds=time.perf_counter() - start,
        passed=ok,
    )


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parity models",
        description="Model-level parity: torchvision networks (random weights, float64) "
        "against their handmade.convert copies; reports the largest output and parameter-"
        "gradient differences. Exit 0 if all agree within --tol, 1 otherwise, 2 bad usage.",
        epilog="models: "
        + ", ".join(
            f"{s.name} ({s.what}; input {'x'.join(map(str, s.input_shape))})"
            for s in MODELS.values()
        ),
    )
    p.add_argument(
        "--models",
        default="all",
        metavar="LIST",
        help=f"comma-separated subset of {','.join(MODELS)} (default: all)",
    )
    p.add_argument(
        "--mode",
        choices=["train", "eval", "both"],
        default="both",
        help="train (batch-statistics BatchNorm, seeded dropout), eval, or both (default)",
    )
    p.add_argument("--seed", type=int, default=0, help="weights/input seed (default: 0)")
    p.add_argument(
        "--tol",
        type=float,
        default=1e-10,
        help="largest relative difference accepted (default: 1e-10)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="PIXELS",
        help="override the square input size of every model",
    )
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write the results to PATH as JSON"
    )
    return p


_HEADER = (
    f"{'model':<14} {'mode':<5} {'input':<13} {'conv/max/avg':>12} {'max|dout|':>10} "
    f"{'rel':>9} {'max|dgrad|':>10} {'rel':>9} {'time':>6}  status"
)


def _line(r: ModelResult) -> str:
    c = r.replaced
    return (
        f"{r.model:<14} {r.mode:<5} {'x'.join(map(str, r.input_shape)):<13} "
        f"{c['Conv2d']:>4}/{c['MaxPool2d']}/{c['AvgPool2d']:<3} {r.out_abs:>10.2e} "
        f"{r.out_rel:>9.1e} {r.grad_abs:>10.2e} {r.grad_rel:>9.1e} {r.seconds:>5.1f}s  "
        f"{'pass' if r.passed else 'FAIL'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m parity models``; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    names = list(MODELS) if args.models == "all" else [m.strip() for m in args.models.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(
            f"{parser.prog}: error: unknown model(s) {', '.join(unknown)}; choose from "
            f"{', '.join(MODELS)}",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{parser.prog}: error: --device cuda: CUDA is not available", file=sys.stderr)
        return 2
    modes = ["train", "eval"] if args.mode == "both" else [args.mode]
    print(_HEADER)
    print("-" * len(_HEADER))
    results: list[ModelResult] = []
    with intra_op_threads(args.threads):
        for name in names:
            shape = list(MODELS[name].input_shape)
            if args.size:
                shape[2:] = [args.size, args.size]
            if args.batch:
                shape[0] = args.batch
            model = build(name, args.seed)
            for mode in modes:
                r = compare_model(name, mode, args.seed, args.tol, shape, args.device, model)
                results.append(r)
                print(_line(r), flush=True)
            del model
    print("-" * len(_HEADER))
    failed = [r for r in results if not r.passed]
    if args.json is not None:
        write_json_atomic(
            args.json,
            {
                "passed": not failed,
                "tol": args.tol,
                "seed": args.seed,
                "torch": torch.__version__,
                "results": [asdict(r) for r in results],
            },
        )
    if failed:
        print(
            f"FAILED: {len(failed)} of {len(results)} model runs differ by more than "
            f"{args.tol:g} (relative)"
        )
        return 1
    print(f"PASSED: {len(results)} model runs agree within {args.tol:g} (relative)")
    return 0
