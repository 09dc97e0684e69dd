"""Run folders and the command line's errors: locks, resume, logs, checkpoints after every
evaluation, stray files, bad values told in one line (exit status 2), a diverging run."""

import json

import pytest
import torch

from meprop.experiments.cli import main
from meprop.experiments.train import ConfigError, TrainConfig, ranks_lock, run_lock

TINY = ["--epochs", "2", "--batch-size", "20", "--hidden", "32", "--no-progress"]


def train(root, out, *extra):
    return main(["train", "mnist", "--data-dir", str(root), "--out", str(out), *TINY, *extra])


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def scores(out):
    return [{k: v for k, v in r.items() if k != "times"} for r in log(out)]


def same_model(a, b):
    a = torch.load(a / "last.pt", weights_only=True)["model"]
    b = torch.load(b / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("meprop train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


# Bad values: (flags or a config file's JSON, words the one line must hold). Each is refused
# with exit status 2 before anything trains.
BAD_FLAGS = [
    (["--k", "0"], ["k must be >= 1, got 0"]),
    (["--train-limit", "-5"], ["train_limit", "-5"]),
    (["--eval-every", "-3"], ["eval_every", "-3"]),
    (["--prune-interval", "-1"], ["prune_interval", "-1"]),
    (["--lr", "inf"], ["lr", "inf", "finite"]),
    (["--lr", "nan"], ["lr", "nan"]),
    (["--lr", "-1"], ["lr must be >= 0"]),
    (["--dropout", "1.5"], ["dropout", "1.5"]),
    (["--dropout", "-0.5"], ["dropout", "-0.5"]),  # -1 alone means the task's
    (["--meact-threshold", "-1"], ["meact_threshold", "-1"]),
    (["--prune-rate", "nan"], ["prune_rate", "nan"]),
    (["--method", "kdim", "--k", "100000"], ["k:", "too large", "--k"]),
    (["--hidden", "0"], ["hidden widths must be >= 1"]),
    (["--hidden", "5000000"], ["too large"]),
    (["--cycle", "1,2,3"], ["cycle", "[1, 2, 3]"]),
    (["--cycle", "0,1"], ["cycle"]),
    (["--epochs", "-1"], ["epochs must be >= 1"]),
    (["--batch-size", "-2"], ["batch_size must be >= 1"]),
    (["--seed", "-1"], ["seed must be >= 0"]),
    (["--meact-threshold", "inf"], ["meact_threshold"]),
    (["--nproc", "0"], ["--nproc must be >= 1"]),
    (["--dist-timeout", "0"], ["--dist-timeout", "0"]),
    (["--method", "meact", "--meact-start", "5"], ["meact_start=5"]),
]
BAD_CONFIGS = [
    ('{"hidden": "55"}', ["hidden", "'55'", "list of integers"]),
    ('{"hidden": [300.9]}', ["hidden", "300.9"]),
    ('{"k": "twenty"}', ["k (--k) must be an integer", "'twenty'"]),
    ('{"k": true}', ["k (--k) must be an integer"]),
    ('{"lr": "0.1"}', ["lr", "number", "'0.1'"]),
    ('{"dropout": null}', ["dropout", "None"]),
    ('{"method": 3}', ["method", "string"]),
    ('{"track_updates": "yes"}', ["track_updates", "'yes'"]),
    ('{"nonsense": 1}', ["unknown TrainConfig fields", "nonsense"]),
    ('{"k": 5,', ["not valid JSON", "line 1"]),
    ("[1, 2]", ["must hold a JSON object"]),
    ('{"task": "pos"}', ["pos config", "task given is mnist"]),
]


@pytest.mark.parametrize("flags,words", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_and_status_2(tiny_mnist, tmp_path, capsys, flags, words):
    assert train(tiny_mnist, tmp_path / "run", *flags) == 2
    one_error_line(capsys, *words)
    assert not (tmp_path / "run" / "log.jsonl").exists()


@pytest.mark.parametrize("text,words", BAD_CONFIGS, ids=[t for t, _ in BAD_CONFIGS])
def test_bad_config_files_are_one_line_and_status_2(tiny_mnist, tmp_path, capsys, text, words):
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert train(tiny_mnist, tmp_path / "run", "--config", str(path)) == 2
    err = one_error_line(capsys, *words)
    if "task given" not in err:
        assert str(path) in err  # the file is named


def test_bad_folders_and_files(tiny_mnist, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert train(tiny_mnist, tmp_path / "file") == 2
    one_error_line(capsys, "is a file, not a folder", "--out")
    assert train(tiny_mnist, tmp_path / "run", "--config", str(tmp_path / "missing.json")) == 2
    one_error_line(capsys, "missing.json does not exist")
    assert train(tmp_path / "no-such-data", tmp_path / "run") == 2
    one_error_line(capsys, "no-such-data", "does not exist")


def test_config_types_are_checked_in_one_place():
    with pytest.raises(ConfigError, match=r"hidden \(--hidden\) must be a list of integers"):
        TrainConfig(hidden="55")
    with pytest.raises(ConfigError, match="must be a finite number"):
        TrainConfig(lr=float("inf"))
    assert TrainConfig(hidden=300).hidden == (300,)  # one width as a number
    assert TrainConfig(hidden=[154, 160]).hidden == (154, 160)
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


def test_a_locked_run_folder_is_refused(tiny_mnist, tmp_path, capsys):
    with run_lock(tmp_path / "run"):  # another run holds it
        assert train(tiny_mnist, tmp_path / "run") == 2
        one_error_line(capsys, "is in use by another run", "choose another --out")
    assert not (tmp_path / "run" / "log.jsonl").exists()
    with ranks_lock(tmp_path / "run"):  # ranks of a --nproc run whose launcher was killed
        assert train(tiny_mnist, tmp_path / "run") == 2
        one_error_line(capsys, "multi-process run whose launcher ended", "wait a moment")
    assert train(tiny_mnist, tmp_path / "run") == 0  # free again


def test_resume_needs_a_run_and_the_same_settings(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_mnist, tmp_path / "empty", "--resume") == 2
    one_error_line(capsys, "holds no run to resume", "drop --resume")
    assert train(tiny_mnist, out, "--k", "5") == 0
    capsys.readouterr()
    assert train(tiny_mnist, out) == 2
    one_error_line(capsys, "already holds a run", "--resume")
    assert train(tiny_mnist, out, "--k", "6", "--resume") == 2
    one_error_line(capsys, "k: saved 5, given 6")
    assert train(tiny_mnist, out, "--resume", "--epochs", "1") == 2  # would drop epoch 2
    one_error_line(capsys, "has trained 2 epochs already", "--epochs 2 or more")
    assert json.loads((out / "config.json").read_text())["epochs"] == 2  # unchanged
    # --resume alone takes the run's settings; --epochs extends it, and says so
    args = ["train", "mnist", "--data-dir", str(tiny_mnist), "--out", str(out), "--no-progress"]
    assert main([*args, "--resume", "--epochs", "3"]) == 0
    assert "--epochs 3 replaces the run's 2" in capsys.readouterr().out
    assert [r["epoch"] for r in log(out)] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["epochs"] == 3


def test_resume_after_a_kill_between_log_and_checkpoint(tiny_mnist, tmp_path):
    """What a kill leaves (records after the checkpoint, a torn last line, temporary files)
    is cleaned up on resume, and the run ends as an uninterrupted one."""
    args = ["--method", "mesimp", "--k", "8", "--prune-interval", "3"]
    assert train(tiny_mnist, tmp_path / "a", *args, "--epochs", "3") == 0
    b = tmp_path / "b"
    assert train(tiny_mnist, b, *args, "--epochs", "3") == 0
    # Back to the state of a kill during epoch 2's checkpoint write: the log has epoch 2's
    # record (and a torn line), last.pt is epoch 1's, temporary files lie about.
    assert train(tiny_mnist, tmp_path / "c", *args, "--epochs", "1") == 0
    (b / "last.pt").write_bytes((tmp_path / "c" / "last.pt").read_bytes())
    lines = (b / "log.jsonl").read_text().splitlines()
    (b / "log.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    for stray in (".last.pt.abc123.tmp", ".best.pt.x.tmp", ".config.json.y.tmp"):
        (b / stray).write_bytes(b"partial")
    (b / "summary.json").unlink()
    assert train(tiny_mnist, b, *args, "--epochs", "3", "--resume") == 0
    assert [r["epoch"] for r in log(b)] == [1, 2, 3]  # no record twice
    assert scores(b) == scores(tmp_path / "a")
    assert same_model(b, tmp_path / "a")
    assert not list(b.glob(".*.tmp"))


def test_eval_every_checkpoints_and_resumes_exactly_within_an_epoch(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    from meprop.experiments.tasks.mnist import MnistTask

    args = ["--method", "meprop", "--k", "8", "--eval-every", "3", "--dropout", "0.2"]
    assert train(tiny_mnist, tmp_path / "a", *args) == 0
    assert [r["step"] for r in log(tmp_path / "a")] == [3, 6, 8, 11, 14, 16]
    # A run that dies at step 13 (epoch 2, batch 5): its last checkpoint is step 11's.
    loss, calls = MnistTask.loss, []

    def dying(self, model, batch):
        calls.append(1)
        if len(calls) == 1 + 13:  # the warm-up, then 12 steps
            raise KeyboardInterrupt
        return loss(self, model, batch)

    monkeypatch.setattr(MnistTask, "loss", dying)
    assert train(tiny_mnist, tmp_path / "b", *args) == 130  # Ctrl-C: one line
    assert "interrupted; --resume continues" in capsys.readouterr().err
    monkeypatch.setattr(MnistTask, "loss", loss)
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["extra"]["state"]
    assert (state["epoch"], state["batch"], state["step"]) == (1, 3, 11)
    assert train(tiny_mnist, tmp_path / "b", *args, "--resume") == 0
    assert scores(tmp_path / "b") == scores(tmp_path / "a")
    assert same_model(tmp_path / "b", tmp_path / "a")
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["steps"] == 16


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    from meprop.experiments.tasks.mnist import MnistTask

    loss, calls = MnistTask.loss, []

    def nan_after(self, model, batch):
        calls.append(1)
        value = loss(self, model, batch)
        return value * float("nan") if len(calls) > 1 + 9 else value  # from step 10

    monkeypatch.setattr(MnistTask, "loss", nan_after)
    out = tmp_path / "run"
    assert train(tiny_mnist, out) == 1
    err = one_error_line(capsys, "training loss became nan", "epoch 2", "Lower --lr")
    assert "last.pt keeps the last good state (epoch 1, step 8)" in err
    assert [r["epoch"] for r in log(out)] == [1]
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["extra"]["state"]["step"] == 8
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert not (out / "summary.json").exists()


def test_a_torn_config_is_named_on_resume(tiny_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_mnist, out, "--epochs", "1") == 0
    text = (out / "config.json").read_text()
    (out / "config.json").write_text(text[: len(text) // 2])  # written by something else
    assert train(tiny_mnist, out, "--resume") == 2
    one_error_line(capsys, f"config file {out / 'config.json'} is not valid JSON")


def test_two_runs_started_together_on_one_folder(tiny_mnist, tmp_path):
    """Two processes: one trains, the other is refused in one line (exit status 2)."""
    import subprocess
    import sys

    from test_soak import RUNNER

    out = tmp_path / "run"
    cmd = [sys.executable, "-c", RUNNER, str(tiny_mnist), "train", "mnist", "--data-dir"]
    cmd += [str(tiny_mnist), "--out", str(out), *TINY, "--epochs", "30"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    results = sorted((p.wait(300), p.stderr.read().decode()) for p in procs)
    assert [rc for rc, _ in results] == [0, 2], results
    err = results[1][1]
    assert ("is in use by another run" in err or "already holds a run" in err) and (
        err.count("\n") == 1
    ), err
    assert [r["epoch"] for r in log(out)] == list(range(1, 31))  # one run's records, once
