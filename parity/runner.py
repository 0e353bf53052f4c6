"""Run a plan of (op, check, cases) against an implementation and collect a report.

The CLI (:mod:`parity.cli`) is a thin layer over :func:`plan` and :func:`run`; tests can
call them directly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from .cases import (
    OPS,
    Case,
    generate,
    gradcheck_cases,
    rejected_cases,
    undefined_cases,
)
from .checks import applies, run_check
from .shrink import render_snippet, shrink

__all__ = ["OTHER_DTYPES", "Failure", "Impl", "Report", "Row", "Task", "plan", "run"]

#: dtypes the ``dtypes`` check visits (minus the main ``--dtype``).
OTHER_DTYPES = ("float64", "float32", "bfloat16", "float16", "int64")

GRADGRAD_COUNT = {"quick": 4, "full": 20}
DTYPES_STEP = {"quick": 6, "full": 2}  # every n-th generated case goes through ``dtypes``


@dataclass(frozen=True)
class Impl:
    """An implementation of one op and how to import it (``module:function``)."""

    op: str
    fn: Callable[..., Any]
    spec: str


@dataclass
class Task:
    """One row of the report: an op, a check and the cases it runs on."""

    op: str
    check: str
    label: str
    cases: list[Case]


@dataclass
class Row:
    """Aggregated results of one :class:`Task`."""

    op: str
    check: str
    cases: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    worst_abs: float = 0.0
    worst_rel: float = 0.0
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.failed:
            return "FAIL"
        return "pass" if self.passed else "skip"

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "check": self.check,
            "status": self.status,
            "cases": self.cases,
            "passed": self.passed,
            "failed": self.failed,
            "skipped": self.skipped,
            "worst_abs_err": _num(self.worst_abs),
            "worst_rel_err": _num(self.worst_rel),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Failure:
    """One failing case (``minimal`` marks a shrunk reproducer)."""

    op: str
    check: str
    case: Case
    message: str
    abs_err: float
    rel_err: float
    snippet: str = ""
    shrunk_from: str | None = None
    shrink_steps: int = 0

    def to_json(self) -> dict[str, Any]:
        out = {
            "op": self.op,
            "check": self.check,
            "case_id": self.case.id,
            "case": self.case.to_json(),
            "message": self.message,
            "abs_err": _num(self.abs_err),
            "rel_err": _num(self.rel_err),
            "snippet": self.snippet,
        }
        if self.shrunk_from is not None:
            out["shrunk_from"] = self.shrunk_from
            out["shrink_steps"] = self.shrink_steps
        return out


@dataclass
class Report:
    """Everything one run found."""

    rows: list[Row] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    minimal: list[Failure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(r.failed == 0 for r in self.rows)


def _num(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def in_dtype(cases: Sequence[Case], op: str, dtype: str) -> list[Case]:
    """``cases`` in ``dtype``.

    torch's own reduced-precision CPU convolutions turn some +-inf into NaN (oneDNN's
    zero-padded channel blocks multiply inf by 0), so non-finite inputs are left out of
    bfloat16/float16 convolutions: the checks would flag torch itself.
    """
    low_conv = op == "conv2d" and dtype in ("bfloat16", "float16")
    return [
        c.replace(dtype=dtype)
        for c in cases
        if not (low_conv and c.kind in ("nonfinite", "neginf"))
    ]


def _dtype_cases(op: str, size: str, seed: int, dtype: str) -> dict[str, list[Case]]:
    base = generate(op, size, seed)[:: DTYPES_STEP[size]]
    return {other: in_dtype(base, op, other) for other in OTHER_DTYPES if other != dtype}


def plan(
    ops: Sequence[str],
    checks: Sequence[str],
    size: str = "quick",
    seed: int = 0,
    dtype: str = "float64",
) -> list[Task]:
    """The tasks to run: one per (op, check), ``dtypes`` split per dtype."""
    tasks: list[Task] = []
    for op in ops:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}")
        main = in_dtype(generate(op, size, seed), op, dtype)
        for check in checks:
            if not applies(check, op):
                continue
            if check in ("forward", "backward", "indices", "forward-ad"):
                tasks.append(Task(op, check, check, main))
            elif check == "gradcheck":
                tasks.append(Task(op, check, check, gradcheck_cases(op, size, seed)))
            elif check == "gradgradcheck":
                cases = gradcheck_cases(op, size, seed, count=GRADGRAD_COUNT[size])
                tasks.append(Task(op, check, check, cases))
            elif check == "errors":
                tasks.append(Task(op, check, check, rejected_cases(op)))
            elif check == "undefined":
                tasks.append(Task(op, check, check, undefined_cases(size, seed)))
            elif check == "dtypes":
                for other, cases in _dtype_cases(op, size, seed, dtype).items():
                    tasks.append(Task(op, check, f"dtypes:{other}", cases))
            else:
                raise ValueError(f"unknown check {check!r}")
    return tasks


def run(
    impls: dict[str, Impl],
    tasks: Sequence[Task],
    device: str = "cpu",
    shrink_budget: float = 10.0,
    progress: bool | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> Report:
    """Run every task with the implementation of its op; shrink the first failure per row.

    Args:
        impls: op -> :class:`Impl`.
        tasks: from :func:`plan`.
        device: where tensors live.
        shrink_budget: seconds of shrinking per failing row (0: report failures unshrunk).
        progress: tqdm bar on stderr (``None``: only when stderr is a terminal).
        on_row: called with each finished row (the CLI prints rows as they finish).
    """
    report = Report()
    start = time.perf_counter()
    total = sum(len(t.cases) for t in tasks)
    bar = tqdm(
        total=total,
        disable=None if progress is None else not progress,
        unit="case",
        leave=False,
        dynamic_ncols=True,
    )
    try:
        for task in tasks:
            impl = impls[task.op]
            row = Row(task.op, task.label)
            row_failures: list[Failure] = []
            t0 = time.perf_counter()
            bar.set_description(f"{task.op} {task.label}")
            for case in task.cases:
                outcome = run_check(task.check, impl.fn, case, device)
                bar.update()
                row.cases += 1
                if outcome.status == "skip":
                    row.skipped += 1
                    continue
                row.worst_abs = max(row.worst_abs, outcome.abs_err)
                row.worst_rel = max(row.worst_rel, outcome.rel_err)
                if outcome.failed:
                    row.failed += 1
                    row_failures.append(
                        Failure(
                            task.op,
                            task.label,
                            case,
                            outcome.message,
                            outcome.abs_err,
                            outcome.rel_err,
                        )
                    )
                else:
                    row.passed += 1
            row.seconds = time.perf_counter() - t0
            for f in row_failures:
                f.snippet = _snippet(f.case, task.check, impl.spec, device)
            report.failures += row_failures
            if row_failures:
                bar.set_description(f"{task.op} {task.label}: shrinking")
                report.minimal.append(
                    _minimal(row_failures, task.check, impl, device, shrink_budget)
                )
            report.rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _snippet(case: Case, check: str, spec: str, device: str) -> str:
    try:
        return render_snippet(case, check, spec, device)
    except Exception as exc:  # never lose a failure because its snippet could not be built
        return f"# could not render a snippet: {type(exc).__name__}: {exc}\n# case = {case!r}\n"


def _minimal(
    failures: list[Failure], check: str, impl: Impl, device: str, budget: float
) -> Failure:
    """Shrink the smallest failing case of a row."""
    first = min(failures, key=lambda f: (f.case.numel(), len(f.case.kwargs)))
    case, outcome, steps = first.case, None, 0
    if budget > 0:
        case, outcome, steps = shrink(first.case, check, impl.fn, device, budget)
    if outcome is None or not outcome.failed:  # shrinking must never lose the failure
        case, message, abs_err, rel_err = first.case, first.message, first.abs_err, first.rel_err
    else:
        message, abs_err, rel_err = outcome.message, outcome.abs_err, outcome.rel_err
    return Failure(
        first.op,
        first.check,
        case,
        message,
        abs_err,
        rel_err,
        snippet=_snippet(case, check, impl.spec, device),
        shrunk_from=first.case.id,
        shrink_steps=steps,
    )
