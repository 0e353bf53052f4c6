"""Tests for train_mnist.py and handmade.models.LeNet5.

Everything runs on tiny generated data (``--fake-data``) in seconds, except the real-MNIST
smoke test (runs when ``MNIST_ROOT`` is set). Training runs in-process through
``train_mnist.main``; only the torchrun, the SIGKILL and the offline-download runs use
subprocesses. Marked slow (seconds to ~20 s each): real MNIST, torchrun, kill-and-resume.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_mnist
from handmade.models import LeNet5

REPO = Path(__file__).resolve().parents[1]
# A quick run: 480 generated images, 30 steps of 16 per epoch, quiet.
QUICK = ["--fake-data", "480", "--batch-size", "16", "--lr", "0.05", "--no-progress"]
REQUIRED_EPOCH_KEYS = {"epoch", "train_loss", "test_loss", "test_accuracy", "images_per_second"}


def train(out: Path, *flags: str) -> dict:
    """Run train_mnist in-process with the quick settings plus ``flags``, writing into ``out``."""
    return train_mnist.main([*QUICK, "--out", str(out), *flags])


def saved_models(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(out / "checkpoint.pt", weights_only=True)["models"]


def loss_curve(metrics: dict) -> list[tuple[float, float, float]]:
    return [(e["train_loss"], e["test_loss"], e["test_accuracy"]) for e in metrics["epochs"]]


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MNIST_ROOT"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_lenet5_same_parameters_and_outputs_for_both_ops(pool: str) -> None:
    torch.manual_seed(0)
    handmade = LeNet5(ops="handmade", pool=pool)
    torch.manual_seed(0)
    reference = LeNet5(ops="torch", pool=pool)
    hs, rs = handmade.state_dict(), reference.state_dict()
    assert list(hs) == list(rs)
    assert [p.shape for p in hs.values()] == [p.shape for p in rs.values()]
    assert all(torch.equal(hs[k], rs[k]) for k in hs), "same seed must give the same init"
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    out = handmade.double()(x)
    assert out.shape == (5, 10)
    torch.testing.assert_close(out, reference.double()(x), rtol=1e-10, atol=1e-12)


def test_lenet5_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError, match="ops"):
        LeNet5(ops="numpy")
    with pytest.raises(ValueError, match="pool"):
        LeNet5(pool="median")


# --------------------------------------------------------------------------- command line


def test_help_explains_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        train_mnist.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ["--data-dir", "--ops", "--pool", "--compare", "--resume", "--limit-train"]:
        assert flag in text


def test_bad_flag_values_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--epochs", "0"], ["--lr", "-1"], ["--ops", "numpy"]):
        with pytest.raises(SystemExit) as exc:
            train_mnist.main(argv)
        assert exc.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="CUDA is not available"):
        train(tmp_path, "--device", "cuda")


# --------------------------------------------------------------------------- end to end


def test_end_to_end_on_generated_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    metrics = train_mnist.main(
        ["--fake-data", "480", "--batch-size", "16", "--lr", "0.05", "--epochs", "2"]
        + ["--out", str(out)]
    )
    captured = capsys.readouterr()
    assert "epoch 1/2" in captured.err, "the tqdm progress bar is missing"
    assert "loss=" in captured.err, "the progress bar shows no live loss"
    assert "epoch 2/2  train loss" in captured.out  # the per-epoch summary line
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert metrics["ops"] == "handmade"
    assert metrics["seconds"] > 0
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert REQUIRED_EPOCH_KEYS <= set(e)
        assert 0.0 <= e["test_accuracy"] <= 1.0 and e["images_per_second"] > 0
    assert metrics["test_accuracy"] == metrics["epochs"][-1]["test_accuracy"]
    assert metrics["test_accuracy"] > 0.9, "the model did not learn the generated classes"
    assert metrics["epochs"][1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(saved_models(out)) == {"handmade"}
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_avg_pool_and_torch_ops_run(tmp_path: Path) -> None:
    metrics = train(tmp_path, "--pool", "avg", "--ops", "torch", "--epochs", "2")
    assert metrics["ops"] == "torch" and metrics["pool"] == "avg"
    assert metrics["test_accuracy"] > 0.9


def test_same_seed_same_curve_other_seed_other_curve(tmp_path: Path) -> None:
    a = train(tmp_path / "a", "--epochs", "1")
    b = train(tmp_path / "b", "--epochs", "1")
    c = train(tmp_path / "c", "--epochs", "1", "--seed", "1")
    assert loss_curve(a) == loss_curve(b)
    assert loss_curve(a) != loss_curve(c)


# --------------------------------------------------------------------------- checkpoints


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    full = train(tmp_path / "full", "--epochs", "3")
    part = tmp_path / "part"
    stopped = train(part, "--epochs", "3", "--stop-after", "1")
    assert len(stopped["epochs"]) == 1
    torch.manual_seed(1234)  # disturb the global RNG states: the checkpoint must restore them
    random.seed(1234)
    resumed = train_mnist.main(["--resume", str(part / "checkpoint.pt"), "--no-progress"])
    assert loss_curve(resumed) == loss_curve(full)
    assert resumed["args"] == full["args"]
    final_full, final_resumed = saved_models(tmp_path / "full"), saved_models(part)
    for name, tensor in final_full["handmade"].items():
        assert torch.equal(tensor, final_resumed["handmade"][name]), name
    # Resuming a finished run trains nothing and keeps the result.
    again = train_mnist.main(["--resume", str(part / "checkpoint.pt"), "--no-progress"])
    assert loss_curve(again) == loss_curve(full)


@pytest.mark.slow  # a subprocess that gets killed: ~10-20 s
def test_resume_after_a_real_kill(tmp_path: Path) -> None:
    """SIGKILL a run right after its first checkpoint; --resume must finish it exactly as an
    uninterrupted run does."""
    flags = [*QUICK, "--fake-data", "960", "--epochs", "3"]
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_mnist.py"), *flags, "--out", str(checkpoint.parent)],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 3
    resumed = train_mnist.main(["--resume", str(checkpoint), "--no-progress"])
    full = train_mnist.main([*flags, "--out", str(tmp_path / "full")])
    assert loss_curve(resumed) == loss_curve(full)
    final_full, final_resumed = saved_models(tmp_path / "full"), saved_models(checkpoint.parent)
    for name, tensor in final_full["handmade"].items():
        assert torch.equal(tensor, final_resumed["handmade"][name]), name


def test_checkpoint_holds_what_resume_needs(tmp_path: Path) -> None:
    train(tmp_path, "--epochs", "1")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert {"models", "optimizers", "schedulers", "rng", "args"} <= set(state)
    assert {"torch", "python"} <= set(state["rng"])
    assert state["args"]["fake_data"] == 480 and state["args"]["ops"] == "handmade"


def test_corrupt_truncated_foreign_and_mismatched_checkpoints(tmp_path: Path) -> None:
    train(tmp_path / "run", "--epochs", "2", "--stop-after", "1")
    good = tmp_path / "run" / "checkpoint.pt"

    def resume(path: Path, *flags: str) -> None:
        train_mnist.main(["--resume", str(path), "--no-progress", "--out", str(tmp_path), *flags])

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read the checkpoint"):
        resume(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SystemExit, match="cannot read the checkpoint"):
        resume(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(SystemExit, match="not a train_mnist.py checkpoint"):
        resume(foreign)
    with pytest.raises(SystemExit, match="no such file"):
        resume(tmp_path / "missing.pt")
    with pytest.raises(SystemExit, match="--pool avg does not match"):
        resume(good, "--pool", "avg")
    broken = torch.load(good, weights_only=True)
    broken["models"]["handmade"].pop("conv1.weight")
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(SystemExit, match="does not match this model"):
        resume(tmp_path / "broken.pt")


# --------------------------------------------------------------------------- lockstep


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_compare_keeps_handmade_and_torch_in_lockstep(tmp_path: Path, pool: str) -> None:
    metrics = train(tmp_path, "--compare", "--epochs", "1", "--pool", pool)
    cmp = metrics["compare"]
    assert cmp["ops"] == ["handmade", "torch"]
    # 30 SGD steps from the same weights on the same batches: float32 rounding only.
    assert cmp["max_loss_diff"] < 1e-5, cmp
    assert cmp["max_param_diff"] < 1e-5, cmp
    assert cmp["lockstep_steps"] == cmp["steps"] == 30
    assert {"max_loss_diff", "max_param_diff", "what", "lockstep_steps"} <= set(cmp["control"])
    models = saved_models(tmp_path)
    assert set(models) == {"handmade", "torch", "torch-alt"}
    diff = max((models["handmade"][k] - models["torch"][k]).abs().max() for k in models["torch"])
    assert diff.item() == pytest.approx(cmp["final_param_diff"])
    control = max(
        (models["torch"][k] - models["torch-alt"][k]).abs().max() for k in models["torch"]
    )
    assert control.item() == pytest.approx(cmp["control"]["final_param_diff"])
    assert cmp["other_test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=0.02)
    assert json.loads((tmp_path / "metrics.json").read_text())["compare"] == cmp


def test_compare_in_float64_stays_together_to_rounding(tmp_path: Path) -> None:
    metrics = train(tmp_path, "--compare", "--epochs", "2", "--dtype", "float64")
    cmp = metrics["compare"]
    assert cmp["dtype"] == "float64"
    assert cmp["max_loss_diff"] < 1e-12 and cmp["max_param_diff"] < 1e-12, cmp
    assert cmp["lockstep_steps"] == cmp["steps"] == 60
    weights = saved_models(tmp_path)["handmade"]
    assert all(w.dtype == torch.float64 for w in weights.values())


# --------------------------------------------------------------------------- data


def test_data_dir_without_mnist_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=r"no MNIST in .*empty \(from --data-dir\)"):
        train_mnist.main(["--data-dir", str(empty), "--out", str(tmp_path / "o")])
    monkeypatch.setenv("MNIST_ROOT", str(empty))
    with pytest.raises(SystemExit, match=r"from MNIST_ROOT"):
        train_mnist.main(["--out", str(tmp_path / "o")])


def test_offline_without_data_says_what_to_do(tmp_path: Path) -> None:
    # Point the download at a closed local port so the test is offline on any machine.
    code = (
        "import sys, torchvision.datasets as d; d.MNIST.mirrors = ['http://127.0.0.1:9/']; "
        "import train_mnist; train_mnist.main(sys.argv[1:])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "--epochs", "1", "--out", "out"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "could not be downloaded" in last
    assert "--data-dir" in last and "MNIST_ROOT" in last


@pytest.mark.slow
def test_real_mnist_one_short_epoch_learns(tmp_path: Path) -> None:
    if not os.environ.get("MNIST_ROOT"):
        pytest.skip("MNIST_ROOT is not set (point it at a folder holding MNIST/)")
    # 470 steps of 32 on a quarter of MNIST: 97.2-97.7% over seeds 0-2 (handmade ops).
    flags = ["--limit-train", "15000", "--batch-size", "32", "--epochs", "1", "--no-progress"]
    metrics = train_mnist.main([*flags, "--out", str(tmp_path)])
    assert metrics["data"] == "mnist" and metrics["epochs"][0]["test_accuracy"] > 0.95


# --------------------------------------------------------------------------- processes


@pytest.mark.slow  # two processes importing torch: ~30 s on a busy 2-core machine
def test_two_processes_match_one_process_with_the_double_batch(tmp_path: Path) -> None:
    """torchrun with 2 processes x batch 32 = one process x batch 64, up to float rounding:
    DistributedSampler's rank-strided shards of each 64-slice are exactly that slice."""
    flags = ["--fake-data", "512", "--epochs", "1", "--lr", "0.05", "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + [str(REPO / "train_mnist.py"), *flags, "--batch-size", "32", "--out", "ddp"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1/1  train loss") == 1, "only rank 0 may print"
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["world_size"] == 2
    single = train_mnist.main([*flags, "--batch-size", "64", "--out", str(tmp_path / "one")])
    assert ddp["epochs"][0]["train_loss"] == pytest.approx(
        single["epochs"][0]["train_loss"], rel=1e-5
    )
    assert ddp["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=0.01)
    a, b = saved_models(tmp_path / "ddp")["handmade"], saved_models(tmp_path / "one")["handmade"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
