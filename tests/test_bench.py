"""Smoke tests of ``python -m parity bench`` (no timing assertions: the command checks targets)."""

from __future__ import annotations

import functools
import json
import math
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handmade.models import MNIST_MEAN, MNIST_STD
from parity import bench

ROW_KEYS = {
    "case",
    "group",
    "shape",
    "pass",
    "candidate",
    "torch_s",
    "handmade_s",
    "ratio",
    "torch_peak_bytes",
    "handmade_peak_bytes",
    "memory_ratio",
    "torch_faults",
    "handmade_faults",
}


def test_quick_run_writes_valid_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    argv = ["--quick", "--threads", "1", "--min-run-time", "0.005", "--no-progress"]
    # (allocator "system": "steady" would change malloc for the rest of this test process)
    status = bench.main([*argv, "--allocator", "system", "--json", str(out)])
    assert status == 0

    data = json.loads(out.read_text())
    assert set(data) == {"machine", "settings", "rows", "summary"}
    assert {"cpu", "logical_cpus", "torch_threads", "torch", "device"} <= set(data["machine"])
    assert data["machine"]["torch_threads"] == 1
    assert data["settings"]["allocator"] == "system"
    assert set(data["summary"]["targets"]) == set(bench.TARGETS)

    rows = data["rows"]
    expected_rows = sum(1 if isinstance(c, bench.TrainCase) else 2 for c in bench.quick_cases())
    assert len(rows) == expected_rows
    assert {r["group"] for r in rows} == {"conv", "pool", "train", "reference"}
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["pass"] in ("fwd", "fwd+bwd", "step")
        for key in ("torch_s", "handmade_s", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["case"], key)
        assert math.isclose(row["ratio"], row["handmade_s"] / row["torch_s"])
        assert row["torch_peak_bytes"] > 0 and row["handmade_peak_bytes"] > 0, row["case"]
        assert (row["memory_ratio"] is None) == (row["candidate"] == "numpy-reference")
        for key in ("torch_faults", "handmade_faults"):
            assert row[key] is None or row[key] >= 0, (row["case"], key)

    printed = capsys.readouterr().out
    assert "targets:" in printed and "lenet train step" in printed


def test_filter_selects_cases(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--quick", "--filter", "AVGPOOL", "--min-run-time", "0.005", "--no-progress"]
    argv += ["--allocator", "system"]
    assert bench.main([*argv, "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all("avgpool" in r["case"] for r in rows)
    targets = json.loads(out.read_text())["summary"]["targets"]
    assert targets["train_step_ratio_max"]["ok"] is None  # no training rows selected


@pytest.mark.parametrize(
    "argv",
    [
        ["--filter", "no-such-case"],
        ["--threads", "0"],
        ["--min-run-time", "-1"],
        ["--rounds", "0"],
        ["--allocator", "jemalloc"],
        ["--bogus"],
    ],
)
def test_bad_arguments_exit_with_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", *argv])
    assert exc.value.code == 2


def test_rounds_alternate_and_keep_each_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch and handmade are timed in turn, round after round, alternating which goes
    first; each keeps its minimum."""

    def torch_pass() -> torch.Tensor:
        return torch.ones(8)

    def handmade_pass() -> torch.Tensor:
        return torch.ones(8)

    timings = {torch_pass: iter([3.0, 2.0, 4.0]), handmade_pass: iter([5.0, 6.0, 1.0])}
    order = []

    def fake_time_pass(fn, min_run_time: float, threads: int) -> float:
        order.append(fn)
        return next(timings[fn])

    monkeypatch.setattr(bench, "build_passes", lambda *args: (torch_pass, handmade_pass))
    monkeypatch.setattr(bench, "time_pass", fake_time_pass)
    case = bench.quick_cases()[0]
    row = bench.measure(case, "fwd", torch.device("cpu"), 0.01, 1, rounds=3)
    assert order == [torch_pass, handmade_pass, handmade_pass, torch_pass] + [
        torch_pass,
        handmade_pass,
    ]
    assert (row.torch_s, row.handmade_s, row.ratio) == (2.0, 1.0, 0.5)


def test_rounds_are_spread_over_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 2 of a row comes after round 1 of every row (torch first, then handmade first),
    and each row keeps its own fastest time of each side."""
    calls = []

    def fake_build_passes(case, pass_: str, device: torch.device) -> tuple:
        return tuple(functools.partial(torch.ones, 1) for _ in "th")

    def fake_time_pass(fn, min_run_time: float, threads: int) -> float:
        calls.append(fn)
        return 100.0 - len(calls) if len(calls) % 3 else 1.0  # every third call: a fast one

    monkeypatch.setattr(bench, "build_passes", fake_build_passes)
    monkeypatch.setattr(bench, "time_pass", fake_time_pass)
    tagged = {}  # pass -> (row, side), from the passes each build returned
    real_time_round = bench.time_round

    def recording_time_round(torch_pass, candidate_pass, *args) -> tuple:
        tagged.setdefault(torch_pass, (len(tagged) // 2, "torch"))
        tagged.setdefault(candidate_pass, (len(tagged) // 2, "handmade"))
        return real_time_round(torch_pass, candidate_pass, *args)

    monkeypatch.setattr(bench, "time_round", recording_time_round)
    cases = [c for c in bench.quick_cases() if isinstance(c, bench.OpCase)][:2]
    rows = bench.run(cases, torch.device("cpu"), 0.01, 1, progress=False, rounds=2)
    jobs = len(cases) * len(bench.PASSES)
    assert [row.case for row in rows] == [c.name for c in cases for _ in bench.PASSES]
    sequence = [tagged[fn] for fn in calls]
    first = [(k, side) for k in range(jobs) for side in ("torch", "handmade")]
    second = [(jobs + k, side) for k in range(jobs) for side in ("handmade", "torch")]
    assert sequence == first + second
    times = [100.0 - i if i % 3 else 1.0 for i in range(1, len(calls) + 1)]
    for k, row in enumerate(rows):
        mine = [t for t, (job, _) in zip(times, sequence, strict=True) if job % jobs == k]
        sides = [side for job, side in sequence if job % jobs == k]
        best = {s: min(t for t, side in zip(mine, sides, strict=True) if side == s) for s in sides}
        assert (row.torch_s, row.handmade_s) == (best["torch"], best["handmade"])


def test_cpu_peak_memory_tracks_live_bytes() -> None:
    """The profiler-based peak sees simultaneous live allocations, not their sum or the end."""

    def allocate() -> tuple:
        first = torch.empty(1_000_000, dtype=torch.uint8)
        second = torch.empty(2_000_000, dtype=torch.uint8)
        del first  # live: 3 MB here, 2 MB after
        third = torch.empty(500_000, dtype=torch.uint8)
        return second, third

    peak = bench.peak_memory(allocate, torch.device("cpu"))
    assert 3_000_000 <= peak < 3_100_000


def test_page_faults_per_call_counts_fresh_pages() -> None:
    pytest.importorskip("resource")  # (Unix only: elsewhere the column reads "-")

    def touch_fresh_pages() -> None:  # 4 MiB of fresh anonymous memory, every page written
        with mmap.mmap(-1, 4 << 20) as buf:
            for offset in range(0, len(buf), mmap.PAGESIZE):
                buf[offset] = 1

    pages = (4 << 20) // mmap.PAGESIZE
    assert bench.page_faults_per_call(touch_fresh_pages) >= pages // 2
    assert bench.page_faults_per_call(lambda: None) < pages // 20


def run_fresh_interpreter(script: str, arg: str, huge_pages: bool = True) -> str:
    """``script`` run with ``arg`` by a new Python interpreter (this checkout importable;
    ``THP_MEM_ALLOC_ENABLE`` left out unless ``huge_pages``); its stdout."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if not huge_pages:
        env.pop(bench.HUGE_PAGES_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", script, arg], capture_output=True, text=True, check=True, env=env
    )
    return done.stdout


# Run in a fresh interpreter: keep_freed_memory() changes malloc for the whole process.
ALLOCATION_PROBE = """
import sys, torch
from parity import bench
if sys.argv[1] == "steady":
    assert bench.keep_freed_memory()
def fresh_64_mib():
    torch.empty(16 << 20).fill_(1.0)
bench.page_faults_per_call(fresh_64_mib, calls=5)  # (the heap settles in its first calls)
# the fewest of single calls: now and then a small allocation splits the freed block, and
# one call maps a new one even under "steady"; under "system" every call does
print(min(bench.page_faults_per_call(fresh_64_mib, calls=1) for _ in range(10)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steady_allocator_stops_refaulting_freed_memory() -> None:
    """Under the system allocator a 64 MiB tensor (above glibc's largest mmap threshold) is
    mapped, and its pages faulted in, on every allocation; under ``steady`` it reuses the heap."""
    faults = {}
    for allocator in bench.ALLOCATORS:
        # (without huge pages, whose 2 MiB pages would fault 512 times less)
        stdout = run_fresh_interpreter(ALLOCATION_PROBE, allocator, huge_pages=False)
        faults[allocator] = float(stdout.split()[-1])
    pages = (64 << 20) // mmap.PAGESIZE
    assert faults["system"] >= pages // 2, faults
    assert faults["steady"] < pages // 20, faults


# Run in a fresh interpreter: torch reads THP_MEM_ALLOC_ENABLE once, at its first allocation.
HUGE_PAGE_PROBE = """
import os, sys, torch
from parity import bench
os.environ.pop(bench.HUGE_PAGES_ENV, None)
if sys.argv[1] == "late":
    torch.ones(1)  # torch's allocator has read the (unset) variable already
print(bench.request_huge_pages(), os.environ[bench.HUGE_PAGES_ENV])
x = torch.ones(8 << 20)  # 32 MiB, every page touched
with open("/proc/self/smaps_rollup") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages")
def test_request_huge_pages_takes_effect_only_before_the_first_allocation() -> None:
    """Requested first, torch's allocator takes huge pages (where the kernel grants them:
    ``madvise`` or ``always``); requested after a tensor exists, it reports that it did not."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    granted = thp.exists() and "[never]" not in thp.read_text()
    for when, expected in (("first", True), ("late", False)):
        stdout = run_fresh_interpreter(HUGE_PAGE_PROBE, when)
        (taken, value), (huge_kib,) = (line.split() for line in stdout.splitlines())
        assert (taken, value) == (str(expected), "1"), stdout
        if not expected:
            assert int(huge_kib) == 0, stdout
        elif granted:
            assert int(huge_kib) >= 2048, stdout


def test_handwriting_images_look_like_normalized_digits() -> None:
    """The training step's images: MNIST-normalized, reproducible under a seed, a blank page
    (intensity 0) for most pixels with between a tenth and a third in ink, each image
    different, the ink within the central 20x20 pixels plus the pen's width."""
    images = bench.handwriting_images(32, torch.Generator().manual_seed(0))
    again = bench.handwriting_images(32, torch.Generator().manual_seed(0))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.float32
    assert torch.equal(images, again)
    ink = images * MNIST_STD + MNIST_MEAN  # back to intensities
    assert ink.min() >= -1e-6 and ink.max() <= 1 + 1e-6
    inked = (ink > 1e-6).float()
    assert 0.1 < inked.mean() < 1 / 3
    assert inked.mean((1, 2, 3)).min() > 0  # every image has a stroke
    assert len({tuple(i.flatten().tolist()) for i in inked}) == 32
    border = torch.ones(28, 28, dtype=torch.bool)
    border[2:26, 2:26] = False  # 4 + 20 pixels, plus 1.6 on either side
    assert inked[:, 0, border].sum() == 0
