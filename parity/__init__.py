"""parity: a reusable verification harness for conv2d / max_pool2d / avg_pool2d.

- :mod:`parity.cases`: the one shared case generator (configurations, edge cases,
  rejected configurations), deterministic under a seed.
- :mod:`parity.checks`: the one comparison helper, :func:`~parity.checks.run_check` (and
  :func:`~parity.checks.assert_parity` for pytest).
- :mod:`parity.shrink`: shrink a failure and render a ready-to-paste reproducer.
- :mod:`parity.runner` / :mod:`parity.cli`: ``python -m parity`` (report table, --json).
- :mod:`parity.models`: ``python -m parity models`` (torchvision nets, original vs converted).
"""

from .cases import Case, generate, gradcheck_cases, make_inputs, rejected_cases
from .checks import CHECKS, assert_parity, run_check

__all__ = [
    "CHECKS",
    "Case",
    "assert_parity",
    "generate",
    "gradcheck_cases",
    "make_inputs",
    "rejected_cases",
    "run_check",
]
