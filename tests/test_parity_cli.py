"""``python -m parity``: it flags every broken implementation and passes torch's own ops.

The broken implementations (``tests/broken_impls.py``) are each correct but for one bug;
the harness knows none of them. For each: exit status 1, a minimal reproducer in the
``--json`` output, and that reproducer fails with the broken function but passes once
torch's function is put in its place. Their bug-free twins (``*_correct``) pass the same
checks, so a flag comes from the bug, not from the wrapper. Runs are in-process
(``parity.cli.main``) with ``--quick`` and only the relevant checks; two subprocess runs
check the real exit codes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from parity.cli import main

REPO = Path(__file__).resolve().parents[1]

#: (fixture in tests/broken_impls.py, op, checks that must flag it)
BROKEN = [
    ("conv2d_kernel_not_rotated", "conv2d", "backward"),
    ("conv2d_bias_grad_first_sample", "conv2d", "backward"),
    ("conv2d_padding_swapped", "conv2d", "forward"),
    ("conv2d_backward_not_differentiable", "conv2d", "gradgradcheck"),
    ("conv2d_rejects_unbatched", "conv2d", "forward"),
    ("conv2d_float32_inside", "conv2d", "forward"),
    ("conv2d_assumes_contiguous", "conv2d", "forward"),
    ("conv2d_zero_jvp", "conv2d", "forward-ad"),
    ("conv2d_accepts_negative_padding", "conv2d", "errors"),
    ("conv2d_float32_output", "conv2d", "dtypes"),
    ("conv2d_output_view", "conv2d", "backward"),
    ("max_pool2d_grad_to_all_ties", "max_pool2d", "backward"),
    ("max_pool2d_ceil_mode_ignored", "max_pool2d", "forward"),
    ("max_pool2d_nan_not_propagated", "max_pool2d", "forward"),
    ("max_pool2d_last_tie_wins", "max_pool2d", "indices"),
    ("max_pool2d_zero_jvp", "max_pool2d", "forward-ad"),
    ("avg_pool2d_divisor_override_ignored", "avg_pool2d", "forward"),
    ("avg_pool2d_count_include_pad_ignored", "avg_pool2d", "forward"),
    ("avg_pool2d_backward_not_divided", "avg_pool2d", "backward"),
    ("avg_pool2d_value_error", "avg_pool2d", "errors"),
]
TWIN_CHECKS = {
    "conv2d": "forward,backward,gradgradcheck,forward-ad,errors",
    "max_pool2d": "forward,backward,indices,gradgradcheck,forward-ad,errors",
    "avg_pool2d": "forward,backward,gradgradcheck,forward-ad,errors",
}


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """``--impl tests.broken_impls:...`` is imported from the current directory."""
    monkeypatch.chdir(REPO)


def _run(tmp_path: Path, *argv: str) -> tuple[int, dict]:
    out = tmp_path / "parity.json"
    code = main([*argv, "--quick", "--no-progress", "--shrink-time", "3", "--json", str(out)])
    return code, json.loads(out.read_text())


@pytest.mark.parametrize(("name", "op", "checks"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_implementation_is_flagged_with_a_reproducer(tmp_path, name, op, checks):
    code, report = _run(
        tmp_path, "--impl", f"tests.broken_impls:{name}", "--op", op, "--checks", checks
    )
    assert code == 1
    assert not report["passed"] and report["failures"]
    assert all(f["snippet"] and f["case"]["op"] == op for f in report["failures"])
    minimal = report["minimal"][0]  # one per failing row
    assert len(report["minimal"]) == len({(f["op"], f["check"]) for f in report["failures"]})
    snippet = minimal["snippet"]
    import_line = f"from tests.broken_impls import {name} as impl  # noqa: E402"
    assert import_line in snippet
    with pytest.raises(Exception):  # noqa: B017 - the impl's own error or an AssertionError
        exec(compile(snippet, "<reproducer>", "exec"), {"__name__": "reproducer"})
    fixed = snippet.replace(import_line, f"impl = F.{op}")
    exec(compile(fixed, "<reproducer-with-torch>", "exec"), {"__name__": "reproducer"})


@pytest.mark.parametrize("op", list(TWIN_CHECKS))
def test_bug_free_twins_pass_the_same_checks(tmp_path, op):
    code, report = _run(
        tmp_path,
        "--impl",
        f"tests.broken_impls:{op}_correct",
        "--op",
        op,
        "--checks",
        TWIN_CHECKS[op],
    )
    assert code == 0, report["minimal"]
    assert report["passed"] and not report["failures"]


def test_torch_functions_pass_every_check(tmp_path):
    code, report = _run(tmp_path, "--impl", "torch.nn.functional")
    assert code == 0, report["minimal"]
    rows = {(r["op"], r["check"]) for r in report["rows"]}
    assert ("max_pool2d", "indices") in rows and ("conv2d", "gradgradcheck") in rows
    assert ("conv2d", "dtypes:float32") in rows and ("avg_pool2d", "errors") in rows
    assert all(r["failed"] == 0 and r["passed"] > 0 for r in report["rows"])
    assert report["impl"]["conv2d"] == "torch.nn.functional:conv2d"


@pytest.mark.parametrize("op", ["conv2d", "max_pool2d", "avg_pool2d"])
def test_torch_function_form_passes(tmp_path, op):
    code, report = _run(
        tmp_path, "--impl", f"torch.nn.functional:{op}", "--checks", "forward,backward,errors"
    )
    assert code == 0 and [r["op"] for r in report["rows"]] == [op] * 3


def test_json_report_layout(tmp_path):
    code, report = _run(
        tmp_path,
        "--impl",
        "tests.broken_impls:avg_pool2d_value_error",
        "--op",
        "avg_pool2d",
        "--checks",
        "forward,errors",
    )
    assert code == 1
    assert {
        "version",
        "passed",
        "argv",
        "impl",
        "checks",
        "size",
        "seed",
        "dtype",
        "device",
        "torch",
        "seconds",
        "rows",
        "minimal",
        "failures",
    } <= set(report)
    by_check = {r["check"]: r for r in report["rows"]}
    assert by_check["forward"]["status"] == "pass" and by_check["errors"]["status"] == "FAIL"
    failure = report["failures"][0]
    assert {"op", "check", "case_id", "case", "message", "abs_err", "rel_err", "snippet"} <= set(
        failure
    )
    assert failure["case"]["expect"] == "rejected"
    assert "torch raises RuntimeError" in failure["message"]
    assert not list(tmp_path.glob(".parity.json.*")), "temporary file left behind"


def test_impl_from_a_file_and_module_forms(tmp_path):
    mine = tmp_path / "my_ops.py"
    mine.write_text(
        "import torch.nn.functional as F\n\n\ndef conv2d(*args, **kwargs):\n"
        "    return F.conv2d(*args, **kwargs)\n"
    )
    assert main(["--impl", f"{mine}:conv2d", "--checks", "forward", "--no-progress"]) == 0
    assert main(["--impl", str(mine), "--checks", "forward", "--no-progress"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--op", "conv3d"], "invalid choice"),
        (["--impl", "no_such_module_xyz:conv2d"], "cannot import module 'no_such_module_xyz'"),
        (["--impl", "torch.nn.functional:no_such_fn", "--op", "conv2d"], "no attribute"),
        (["--impl", "torch.nn.functional:relu"], "name it with --op"),
        (["--impl", "torch.nn.functional:conv2d", "--op", "max_pool2d"], None),
        (["--impl", "math", "--op", "conv2d"], "defines none of"),
        (["--checks", "forward,speed"], "unknown check(s) speed"),
        (["--impl", "missing_file.py:conv2d"], "no such file"),
    ],
)
def test_bad_usage_exits_2_with_a_clear_message(capsys, argv, message):
    extra = ["--no-progress", "--shrink-time", "0"]
    code = main([*argv, *extra] if "--checks" in argv else [*argv, *extra, "--checks", "forward"])
    err = capsys.readouterr().err
    if message is None:  # a conv2d function checked as max_pool2d: a real failure, not usage
        assert code == 1
        return
    assert code == 2
    assert message in err and "Traceback" not in err


def test_cuda_request_without_cuda(capsys):
    if torch.cuda.is_available():
        assert (
            main(["--device", "cuda", "--op", "max_pool2d", "--checks", "forward", "--no-progress"])
            == 0
        )
    else:
        assert main(["--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_list_and_help(capsys):
    assert main(["--list", "--op", "avg_pool2d", "--checks", "errors"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()
    assert len(listed) >= 10 and all(line.startswith("avg_pool2d\terrors\t") for line in listed)
    assert main(["--help"]) == 0
    assert "--impl" in capsys.readouterr().out


def test_bench_subcommand_dispatches(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("parity.bench")
    fake.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "parity.bench", fake)
    assert main(["bench", "--op", "conv2d"]) == 7
    assert seen == [["--op", "conv2d"]]
    monkeypatch.setitem(sys.modules, "parity.bench", None)  # import fails
    assert main(["bench"]) == 2
    assert "parity/bench.py is not available" in capsys.readouterr().err


def test_real_exit_codes_in_subprocesses():
    def run(*argv):
        return subprocess.run(
            [sys.executable, "-m", "parity", *argv, "--no-progress"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    ok = run("--impl", "torch.nn.functional:max_pool2d", "--checks", "forward,indices")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASSED" in ok.stdout and "max_pool2d  indices" in ok.stdout
    bad = run(
        "--impl",
        "tests.broken_impls:max_pool2d_ceil_mode_ignored",
        "--op",
        "max_pool2d",
        "--checks",
        "forward",
        "--shrink-time",
        "2",
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Reproducer" in bad.stdout and "ceil_mode" in bad.stdout
    usage = run("--impl", "no_such_module_xyz")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
