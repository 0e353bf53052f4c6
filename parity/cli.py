"""``python -m parity``: verify conv2d / max_pool2d / avg_pool2d implementations against torch.

Exit status: 0 every check passed, 1 some check failed, 2 bad usage (unknown op or check,
an implementation that cannot be imported, CUDA asked for but absent).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tqdm import tqdm

from ._io import intra_op_threads, write_json_atomic
from .cases import OPS
from .checks import CHECKS, DEFAULT_CHECKS, applies
from .runner import Impl, Report, Row, plan, run

__all__ = ["UsageError", "load_impls", "main"]

DEFAULT_IMPL = "handmade.functional"
JSON_VERSION = 1

_EPILOG = """\
subcommands:
  python -m parity models [...]   model-level parity: torchvision nets converted with
                                  handmade.convert vs the originals (see: models --help)
  python -m parity bench [...]    benchmarks (see: bench --help)

--impl forms:
  MODULE:FUNCTION   one callable with torch.nn.functional's signature; the op is --op, or
                    the function's name when it is conv2d / max_pool2d / avg_pool2d
  MODULE            a module with functions named conv2d / max_pool2d / avg_pool2d; every
                    op it provides is checked (or just --op)
  path/to/file.py[:FUNCTION]   the same, loaded from a file
  MODULE is imported from the current directory or PYTHONPATH.

checks (default: all that apply; 'undefined' only for the handmade ops):
  forward        output values, shape, dtype; NaN/inf positions; inputs left unmodified
  backward       input/weight/bias gradients for a random upstream gradient
  indices        max_pool2d return_indices=True, bit-exact
  forward-ad     output tangent (forward-mode AD) for random input tangents
  gradcheck      torch.autograd.gradcheck in float64 (with forward AD, batched grad)
  gradgradcheck  torch.autograd.gradgradcheck in float64 (with forward-over-reverse)
  errors         configurations torch rejects must raise the same exception type
  dtypes         forward+backward in the other dtypes (float64/32, bfloat16, float16, int64)
  undefined      max-pool windows wholly in the padding (torch reads out of bounds there)
                 must raise RuntimeError

examples:
  python -m parity --quick
  python -m parity --impl torch.nn.functional:conv2d
  python -m parity --impl my_ops.py:my_conv --op conv2d --checks forward,backward
  python -m parity --full --json parity.json
"""


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m parity",
        description="Check conv2d / max_pool2d / avg_pool2d implementations against "
        "torch.nn.functional over a generated sweep of configurations and edge cases, "
        "print a report table, and shrink each failure to a ready-to-paste reproducer.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--op", choices=[*OPS, "all"], default="all", help="op to check (default: all)")
    p.add_argument(
        "--impl",
        metavar="SPEC",
        default=None,
        help=f"implementation to check: MODULE:FUNCTION, MODULE or FILE.py[:FUNCTION] "
        f"(default: {DEFAULT_IMPL})",
    )
    p.add_argument(
        "--checks",
        default="all",
        metavar="LIST",
        help=f"comma-separated subset of {','.join(CHECKS)} (default: all that apply)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="size",
        action="store_const",
        const="quick",
        help="~200 cases per op, seconds (default)",
    )
    size.add_argument(
        "--full",
        dest="size",
        action="store_const",
        const="full",
        help="~1700 cases per op and more gradchecks, a few minutes",
    )
    p.set_defaults(size="quick")
    p.add_argument("--seed", type=int, default=0, help="case-generation seed (default: 0)")
    p.add_argument(
        "--dtype",
        choices=["float64", "float32", "bfloat16", "float16"],
        default="float64",
        help="dtype of forward/backward/indices/forward-ad (default: float64; reduced "
        "precision is compared with torch's float64 result; gradcheck/gradgradcheck always "
        "use float64)",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device of every tensor (default: cpu)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        type=Path,
        default=None,
        help="also write machine-readable results (every failing case) to PATH",
    )
    p.add_argument(
        "--shrink-time",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="time spent shrinking each failing row's smallest case (default: 10; 0: no shrinking)",
    )
    p.add_argument(
        "--show",
        type=int,
        default=3,
        metavar="N",
        help="failing cases listed per failing row (default: 3; all go to --json)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch intra-op threads (default: 1; the cases are small and extra "
        "threads only add overhead)",
    )
    p.add_argument("--list", action="store_true", help="list the cases that would run, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ----------------------------------------------------------------------------- impl loading


def _import(module: str) -> ModuleType:
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise UsageError(f"--impl: no such file: {module}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"--impl: cannot load {module} as a Python module")
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            raise UsageError(
                f"--impl: importing {module} failed: {type(exc).__name__}: {exc}"
            ) from None
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current dir
    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise UsageError(
            f"--impl: cannot import module {module!r}: {type(exc).__name__}: {exc}"
        ) from None


def _resolve(obj: Any, qualname: str, spec: str) -> Any:
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"--impl {spec}: no attribute {part!r}") from None
    if not callable(obj):
        raise UsageError(f"--impl {spec}: {qualname} is not callable")
    return obj


def load_impls(spec: str | None, op: str) -> dict[str, Impl]:
    """Resolve ``--impl``/``--op`` into ``{op: Impl}`` (raises :class:`UsageError`)."""
    ops = list(OPS) if op == "all" else [op]
    if spec is None:
        spec = DEFAULT_IMPL
    module, sep, name = spec.rpartition(":") if ":" in spec else (spec, "", "")
    mod = _import(module)
    if sep:  # MODULE:FUNCTION
        if not name:
            raise UsageError(f"--impl {spec}: missing FUNCTION after ':'")
        fn = _resolve(mod, name, spec)
        if op == "all":
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in OPS:
                raise UsageError(
                    f"--impl {spec} checks one op: name it with --op "
                    f"({', '.join(OPS)}); it cannot be guessed from {leaf!r}"
                )
            ops = [leaf]
        return {ops[0]: Impl(ops[0], fn, spec)}
    found = {o: Impl(o, _resolve(mod, o, spec), f"{module}:{o}") for o in ops if hasattr(mod, o)}
    if not found:
        raise UsageError(f"--impl {spec}: the module defines none of {', '.join(ops)}")
    if op != "all" and op not in found:
        raise UsageError(f"--impl {spec}: the module defines no function {op!r}")
    return found


def _parse_checks(text: str, default_impl: bool) -> list[str]:
    if text.strip() in ("all", ""):
        checks = list(DEFAULT_CHECKS)
        return [*checks, "undefined"] if default_impl else checks
    checks = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise UsageError(
            f"--checks: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}"
        )
    return checks


# ----------------------------------------------------------------------------- output


def _fmt_err(x: float, row: Row) -> str:
    if row.passed + row.failed == 0:
        return "-"
    return f"{x:.2e}" if x == x and x != float("inf") else "inf"


_HEADER = (
    f"{'op':<11} {'check':<16} {'status':<6} {'cases':>5} {'passed':>6} {'failed':>6} "
    f"{'skipped':>7} {'worst abs':>10} {'worst rel':>10} {'time':>7}"
)


def _row_line(row: Row) -> str:
    return (
        f"{row.op:<11} {row.check:<16} {row.status:<6} {row.cases:>5} {row.passed:>6} "
        f"{row.failed:>6} {row.skipped:>7} {_fmt_err(row.worst_abs, row):>10} "
        f"{_fmt_err(row.worst_rel, row):>10} {row.seconds:>6.1f}s"
    )


def _print_failures(report: Report, show: int) -> None:
    by_row: dict[tuple[str, str], list] = {}
    for f in report.failures:
        by_row.setdefault((f.op, f.check), []).append(f)
    for minimal in report.minimal:
        fails = by_row.get((minimal.op, minimal.check), [])
        print()
        print("=" * 100)
        print(f"FAILED {minimal.op} / {minimal.check}: {len(fails)} case(s)")
        for f in fails[:show]:
            print(f"  - {f.case.id}\n      {f.message}")
        if len(fails) > show:
            print(f"  ... and {len(fails) - show} more (all of them in --json)")
        how = (
            f"shrunk from {minimal.shrunk_from} in {minimal.shrink_steps} step(s)"
            if minimal.shrink_steps
            else "not shrunk further"
        )
        print(f"\nSmallest failing case ({how}):\n  {minimal.case.id}\n  {minimal.message}")
        print("\nReproducer (run from the directory you ran parity in):\n")
        print(minimal.snippet)


def _payload(
    args: argparse.Namespace,
    impls: dict[str, Impl],
    checks: list[str],
    report: Report,
    argv: Sequence[str],
) -> dict[str, Any]:
    return {
        "version": JSON_VERSION,
        "passed": report.passed,
        "argv": list(argv),
        "impl": {op: impl.spec for op, impl in impls.items()},
        "checks": checks,
        "size": args.size,
        "seed": args.seed,
        "dtype": args.dtype,
        "device": args.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds": round(report.seconds, 3),
        "rows": [r.to_json() for r in report.rows],
        "minimal": [f.to_json() for f in report.minimal],
        "failures": [f.to_json() for f in report.failures],
    }


# ----------------------------------------------------------------------------- main


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "models":
        from . import models

        return models.main(argv)
    try:
        bench = importlib.import_module("parity.bench")
    except ModuleNotFoundError as exc:
        if exc.name == "parity.bench":
            print(
                "python -m parity bench: parity/bench.py is not available in this checkout",
                file=sys.stderr,
            )
            return 2
        raise
    if not hasattr(bench, "main"):
        print("python -m parity bench: parity.bench has no main(argv)", file=sys.stderr)
        return 2
    return int(bench.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m parity``; returns the exit status (0, 1 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("models", "bench"):
        return _subcommand(argv[0], argv[1:])
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or bad usage (2)
        return int(exc.code or 0)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine")
        if args.threads < 1:
            raise UsageError("--threads must be >= 1")
        impls = load_impls(args.impl, args.op)
        checks = _parse_checks(args.checks, default_impl=args.impl is None)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    tasks = plan(list(impls), checks, args.size, args.seed, args.dtype)
    if args.list:
        for task in tasks:
            for case in task.cases:
                print(f"{task.op}\t{task.label}\t{case.id}")
        return 0
    skipped = [c for c in checks if not any(applies(c, op) for op in impls)]
    specs = ", ".join(sorted({i.spec for i in impls.values()}))
    print(
        f"parity: {specs} vs torch {torch.__version__} | {args.size} | seed {args.seed} | "
        f"{args.dtype} | {args.device}"
    )
    if skipped:
        print(f"(checks that apply to none of the selected ops: {', '.join(skipped)})")
    print(_HEADER)
    print("-" * len(_HEADER))
    started = time.perf_counter()
    with intra_op_threads(args.threads):
        report = run(
            impls,
            tasks,
            args.device,
            args.shrink_time,
            progress=False if args.no_progress else None,
            on_row=lambda row: tqdm.write(_row_line(row), file=sys.stdout),
        )
    print("-" * len(_HEADER))
    failed = [r for r in report.rows if r.failed]
    total_cases = sum(r.cases for r in report.rows)
    elapsed = time.perf_counter() - started
    _print_failures(report, args.show)
    if args.json is not None:
        write_json_atomic(args.json, _payload(args, impls, checks, report, argv), allow_nan=False)
    if failed:
        print(
            f"\nFAILED: {len(failed)} of {len(report.rows)} rows "
            f"({sum(r.failed for r in failed)} failing cases) in {elapsed:.1f}s"
        )
        return 1
    print(f"\nPASSED: {len(report.rows)} rows, {total_cases} cases in {elapsed:.1f}s")
    return 0
