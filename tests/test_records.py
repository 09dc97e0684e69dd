"""Nothing recorded wrongly: run identity on resume, grids and reports that cannot mix runs, a
kernel cache that heals, and one line naming the cause and the fix for each case a hostile
environment or a careless user met (the numbers are those of the cases in the issue)."""

import errno
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from meprop.experiments.cli import main
from meprop.experiments.grids import Row
from meprop.experiments.train import ConfigError, RunDirError, TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--batch-size", "20", "--hidden", "32", "--no-progress"]


def train(root, out, *extra):
    return main(["train", "mnist", "--data-dir", str(root), "--out", str(out), *TINY, *extra])


def one_error_line(capsys, command, *words):
    err = capsys.readouterr().err
    assert err.startswith(f"meprop {command}: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def finished(tiny_mnist, tmp_path):
    """A finished 2-epoch run (seed 1), trained once for the resume cases of a test."""
    out = tmp_path / "run"
    assert train(tiny_mnist, out) == 0
    return out


# -- 4-7, 12, 13: run identity and resume -------------------------------------------------------


def test_4_an_edited_config_does_not_resume_the_checkpoint(tiny_mnist, finished, capsys):
    cfg = json.loads((finished / "config.json").read_text())
    cfg["hidden"] = [48]
    (finished / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert train(tiny_mnist, finished, "--resume", "--hidden", "48", "--epochs", "3") == 2
    one_error_line(
        capsys,
        "train",
        "last.pt was written by another run",
        "hidden: [32] in last.pt, [48] in config.json",
    )
    assert len(records(finished)) == 2


def test_5_another_runs_checkpoint_is_refused(tiny_mnist, finished, tmp_path, capsys):
    other = tmp_path / "seed2"
    assert train(tiny_mnist, other, "--seed", "2", "--epochs", "1") == 0
    own = (finished / "last.pt").read_bytes()
    shutil.copy(other / "best.pt", finished / "best.pt")  # (scored on test at the end)
    capsys.readouterr()
    assert train(tiny_mnist, finished, "--resume", "--epochs", "3") == 2
    one_error_line(capsys, "train", "best.pt was written by another run", "seed: 2 in best.pt")
    assert (finished / "last.pt").read_bytes() == own
    shutil.copy(other / "last.pt", finished / "last.pt")
    capsys.readouterr()
    assert train(tiny_mnist, finished, "--resume", "--epochs", "3") == 2
    one_error_line(capsys, "train", "seed: 2 in last.pt, 1 in config.json")
    wider = tmp_path / "wider"
    assert train(tiny_mnist, wider, "--epochs", "1", "--hidden", "64") == 0
    shutil.copy(wider / "last.pt", finished / "last.pt")
    capsys.readouterr()
    assert train(tiny_mnist, finished, "--resume", "--epochs", "3") == 2
    one_error_line(capsys, "train", "hidden: [64] in last.pt, [32] in config.json")
    assert json.loads((finished / "summary.json").read_text())["config"]["seed"] == 1


def test_6_a_lost_checkpoint_is_refused_then_restarted_on_request(tiny_mnist, finished, capsys):
    (finished / "last.pt").unlink()
    capsys.readouterr()
    assert train(tiny_mnist, finished, "--resume", "--epochs", "3") == 2
    one_error_line(capsys, "train", "2 logged evaluations but no last.pt", "--restart")
    assert len(records(finished)) == 2  # untouched
    assert train(tiny_mnist, finished, "--restart") == 2
    one_error_line(capsys, "train", "--restart goes with --resume")
    assert train(tiny_mnist, finished, "--resume", "--restart") == 0
    assert "training the run again from step 0" in capsys.readouterr().out
    assert [r["epoch"] for r in records(finished)] == [1, 2]


def test_7_a_damaged_log_line_is_named_and_the_valid_ones_kept(tiny_mnist, finished, capsys):
    lines = (finished / "log.jsonl").read_text().splitlines()
    (finished / "log.jsonl").write_text("\n".join([lines[0], "garbage{", lines[1]]) + "\n")
    capsys.readouterr()
    assert train(tiny_mnist, finished, "--resume", "--epochs", "3") == 0
    assert "log.jsonl line 2 is not a log record" in capsys.readouterr().out
    assert [r["epoch"] for r in records(finished)] == [1, 2, 3]


def test_12_a_setting_that_fails_later_is_refused_before_anything_is_written(
    tiny_mnist, tmp_path, capsys
):
    out = tmp_path / "run"
    assert train(tiny_mnist, out, "--optimizer", "adam", "--sparse-grad") == 2
    one_error_line(
        capsys,
        "train",
        "sparse_grad",
        "--optimizer lazy_adam (Adam on the rows that got a gradient), sgd or adagrad",
    )
    assert not out.exists()
    with pytest.raises(ConfigError, match="needs --method meprop"):
        TrainConfig(method="dense", optimizer="sgd", sparse_grad=True)


def test_13_ctrl_c_before_the_first_checkpoint(tiny_mnist, tmp_path, monkeypatch, capsys):
    from meprop.experiments.tasks.mnist import MnistTask

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(MnistTask, "loss", interrupted)
        assert train(tiny_mnist, out) == 130
    err = capsys.readouterr().err
    assert err == (
        "meprop train: interrupted; no checkpoint was written yet: run the same command again\n"
    )
    assert train(tiny_mnist, out, "--epochs", "1") == 0  # the same command (a folder left)


def test_13_ctrl_c_while_importing_is_one_line():
    stop = (
        "import sys\n"
        "class Stop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'meprop.ops':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
        "import meprop.experiments.cli\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    p = subprocess.run([sys.executable, "-c", stop], capture_output=True, text=True, env=env)
    assert p.stderr == "meprop: interrupted while starting\n" and p.returncode != 0


# -- 1: grids reuse only runs of the row's settings ------------------------------------------------


def test_1_a_grid_reuses_only_runs_of_every_setting_of_its_rows(tiny_mnist, tmp_path):
    from meprop.experiments.reproduce import check_reuse, run_grid

    cfg = TrainConfig(method="dense", hidden=(32,), epochs=1, batch_size=20)
    rows = [Row("dense", "main", "dense", cfg)]
    out = tmp_path / "grid"
    said = []
    run_grid(rows, out, data_dir=tiny_mnist, progress=False, echo=said.append)
    said.clear()
    run_grid(rows, out, data_dir=tiny_mnist, progress=False, echo=said.append)
    assert "done already, with every setting of the row: reused" in said[0]
    for change, words in (
        (dict(epochs=2), "epochs: 1 there, 2 in the grid"),  # a --quick grid's run
        (dict(dataset="fashion"), 'dataset: "mnist" there, "fashion" in the grid'),
    ):
        other = [Row("dense", "main", "dense", replace(cfg, **change))]
        with pytest.raises(RunDirError, match=words):
            run_grid(other, out, data_dir=tiny_mnist, progress=False, echo=said.append)
        with pytest.raises(RunDirError, match="give another --out"):
            check_reuse(other[0], out / "runs" / "dense")
    assert len(records(out / "runs" / "dense")) == 1  # not extended, not mixed
    summary = out / "runs" / "dense" / "summary.json"
    kept = summary.read_text()
    summary.write_text(kept.replace('"seed": 1', '"seed": 2'))  # another run's summary
    with pytest.raises(RunDirError, match="seed: 2 there, 1 in the grid"):
        check_reuse(rows[0], out / "runs" / "dense")
    summary.write_text(kept[:40])  # damaged: the run is resumed, which writes it again
    said.clear()
    run_grid(rows, out, data_dir=tiny_mnist, progress=False, echo=said.append)
    assert json.loads(summary.read_text()) == json.loads(kept) | {
        k: json.loads(summary.read_text())[k] for k in ("times", "finished", "threads")
    }


def test_1_reproduce_epochs_extends_a_grids_runs_as_if_trained_that_long(tiny_mnist, tmp_path):
    """``reproduce --epochs`` (run_grid's extend): a run with fewer epochs and its checkpoint
    goes on from it, to the same records as a run of that many epochs from the start; without
    --epochs, or without the checkpoint, it is refused."""
    from meprop.experiments.reproduce import run_grid

    cfg = TrainConfig(method="meprop", k=5, hidden=(32,), epochs=1, batch_size=20)
    out, fresh = tmp_path / "grid", tmp_path / "fresh"
    quiet = dict(data_dir=tiny_mnist, progress=False, echo=lambda s: None)
    run_grid([Row("meprop", "main", "meProp", cfg)], out, **quiet)
    longer = [Row("meprop", "main", "meProp", replace(cfg, epochs=2))]
    with pytest.raises(RunDirError, match="epochs: 1 there, 2 in the grid"):
        run_grid(longer, out, **quiet)  # (a grid's own epochs: never extended)
    d = out / "runs" / "meprop"
    run_grid(longer, out, **quiet, extend=True)
    run_grid(longer, fresh, **quiet)

    def outcome(run):
        keep = ("epoch", "step", "train_loss", "dev_accuracy")
        summary = json.loads((run / "summary.json").read_text())
        return [{k: r[k] for k in keep} for r in records(run)], summary["test_accuracy"]

    assert [r["epoch"] for r in records(d)] == [1, 2]
    assert outcome(d) == outcome(fresh / "runs" / "meprop")
    assert json.loads((d / "summary.json").read_text())["config"]["epochs"] == 2
    said = []
    run_grid(longer, out, **quiet | dict(echo=said.append), extend=True)
    assert "done already" in said[0]
    # killed as the extension began: config.json says 3, the summary is the 2-epoch one
    three = [Row("meprop", "main", "meProp", replace(cfg, epochs=3))]
    config = (d / "config.json").read_text()
    (d / "config.json").write_text(config.replace('"epochs": 2', '"epochs": 3'))
    run_grid(three, out, **quiet, extend=True)
    assert [r["epoch"] for r in records(d)] == [1, 2, 3]
    (d / "last.pt").unlink()
    four = [Row("meprop", "main", "meProp", replace(cfg, epochs=4))]
    with pytest.raises(RunDirError, match="of 3 epochs without its checkpoint"):
        run_grid(four, out, **quiet, extend=True)


def test_1_the_committed_mnist_runs_are_the_rows_of_their_grid(tmp_path):
    """reproduce over (a copy of) docs/results/mnist treats its runs as done."""
    from meprop.experiments.reproduce import check_reuse, mnist_grid, with_seeds

    rows = with_seeds(mnist_grid(), [1, 2, 3])
    runs = REPO / "docs" / "results" / "mnist" / "runs"
    checked = 0
    for row in rows:
        if (runs / row.name / "config.json").exists():
            copy = tmp_path / row.name
            copy.mkdir()
            shutil.copy(runs / row.name / "config.json", copy / "config.json")
            assert check_reuse(row, copy), row.name
            checked += 1
    assert checked >= 40


@pytest.mark.parametrize("task", ["mnist", "lm", "cnn", "tta"])
def test_the_committed_runs_still_load_and_pool_as_their_rows(tmp_path, task):
    """Old run folders (no checkpoints, configs of older versions) load for report; each row's
    seeds pool as before (no row split, no run left out)."""
    from meprop.experiments.report import scan_runs

    copy = shutil.copytree(REPO / "docs" / "results" / task, tmp_path / task,
                           ignore=shutil.ignore_patterns("*.png", "*.md"))  # fmt: skip
    runs, notes = scan_runs([copy])
    assert notes == [] and len(runs) == len(list((copy / "runs").iterdir()))
    for r in runs:
        assert r.label == json.loads((r.path / "row.json").read_text())["label"]


# -- 2, 3, 15: reports ---------------------------------------------------------------------------


def fake_run(d: Path, test=0.9, row=None, **settings):
    """A finished run's files without training: config, summary and a one-record log."""
    cfg = TrainConfig(**{"hidden": (50,), "epochs": 1, **settings})
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    times = {"forward": 1.0, "backward": 2.0, "linear_backward": 1.0, "hidden_backward": 0.5}
    summary = {
        "config": cfg.to_dict(), "best_epoch": 1, "dev_accuracy": test, "test_accuracy": test,
        "times": times, "steps": 10, "widths": cfg.widths(), "final_widths": None,
        "metric": "accuracy", "threads": 1, "torch": torch.__version__,
    }  # fmt: skip
    (d / "summary.json").write_text(json.dumps(summary))
    record = {"epoch": 1, "step": 10, "dev_accuracy": test, "train_accuracy": test, "times": times}
    (d / "log.jsonl").write_text(json.dumps(record) + "\n")
    if row is not None:
        (d / "row.json").write_text(json.dumps({**row, "seed": cfg.seed}))
    return d


def test_2_runs_of_different_settings_are_different_rows(tmp_path, capsys):
    from meprop.experiments.report import build_report

    a = fake_run(tmp_path / "A", 0.40, hidden=(80,))
    b = fake_run(tmp_path / "B", 0.20, train_limit=400)
    b2 = shutil.copytree(b, tmp_path / "B2")  # the same seed twice
    report = build_report([a, b, b2], tmp_path / "out").read_text()
    assert "| meprop per_example k=20 (hidden [80], train_limit 0) | 1 |" in report
    assert "| meprop per_example k=20 (hidden [50], train_limit 400) | 1 |" in report
    assert "B2: left out, seed 1 of the row" in report and "pooled once" in report
    assert "| 2 |" not in report and " ± " not in report.split("## runs")[1]  # nothing pooled


def test_2_a_row_trained_otherwise_than_the_settings_line_says_so(tmp_path):
    """The settings line speaks for every row but what their labels name: a row of other
    epochs (extended with reproduce --epochs) or batch size carries them in its label."""
    from meprop.experiments.report import build_report

    grid = tmp_path / "grid"
    fake_run(grid / "runs" / "dense", 0.95, row=dict(group="main", label="dense"),
             method="dense", epochs=10)  # fmt: skip
    fake_run(grid / "runs" / "kdim", 0.90, row=dict(group="control", label="k-dim net k=10"),
             method="kdim", k=10, epochs=15, batch_size=20)  # fmt: skip
    fake_run(grid / "runs" / "mp", 0.94, row=dict(group="main", label="meProp k=20"),
             method="meprop", epochs=10)  # fmt: skip
    report = build_report([grid], tmp_path / "out").read_text()
    assert "10 epochs" in report.split("Settings (dense;")[1].split("\n")[0]
    assert "| k-dim net k=10 (epochs 15, batch_size 20) | 1 |" in report
    assert "| meProp k=20 | 1 |" in report and "| dense | 1 |" in report


def test_3_a_row_without_its_summary_is_named_and_no_claim_uses_it(tmp_path):
    from meprop.experiments.report import build_report

    grid = tmp_path / "grid"
    for seed in (1, 2):
        s = f"-s{seed}"
        fake_run(grid / "runs" / f"dense{s}", 0.95, row=dict(group="main", label="dense"),
                 method="dense", seed=seed)  # fmt: skip
        fake_run(grid / "runs" / f"mp{s}", 0.96, row=dict(group="main", label="meProp k=20"),
                 seed=seed)  # fmt: skip
    assert "meProp per_example k=20 >= dense" in build_report([grid], grid).read_text()
    for seed in (1, 2):
        (grid / "runs" / f"dense-s{seed}" / "summary.json").unlink()
    report = build_report([grid], grid).read_text()
    assert "Not in this report" in report
    assert "dense-s1 (row 'dense', seed 1): left out, not finished: no summary.json" in report
    assert "k=20 >= dense" not in report and "| dense | 2 |" not in report
    assert "| meProp k=20 | 2 |" in report and "1.00x" not in report  # no speedup vs nothing


DAMAGES = {
    "truncated summary": ("summary.json", lambda text: text[: len(text) // 2]),
    "list summary": ("summary.json", lambda text: "[1, 2]"),
    "string summary": ("summary.json", lambda text: '"x"'),
    "torn log line": ("log.jsonl", lambda text: '{"epo\n' + text),
    "truncated config": ("config.json", lambda text: text[: len(text) // 2]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_15_a_damaged_file_is_a_note_not_a_traceback(tmp_path, capsys, damage):
    good = fake_run(tmp_path / "good", 0.9, seed=2)
    bad = fake_run(tmp_path / "bad", 0.8)
    name, damaged = DAMAGES[damage]
    (bad / name).write_text(damaged((bad / name).read_text()))
    assert main(["report", str(good), str(bad), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"note: {bad}" in out and "Traceback" not in out
    assert str(bad) in (tmp_path / "out" / "report.md").read_text()


def test_15_a_read_only_report_folder_is_one_line(tmp_path, monkeypatch, capsys):
    run = fake_run(tmp_path / "run")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == run else real(p, mode))
    assert main(["report", str(run)]) == 2
    one_error_line(capsys, "report", "read-only", "--out")


def test_15_info_reads_a_damaged_tuning_cache(tmp_path, monkeypatch, capsys):
    from meprop.kernels import dispatch

    t = dispatch.Tuner(tmp_path / "dispatch.json")
    cls = dispatch.shape_class("per_example", torch.float32, 12, 40, 30, 4, "xw")
    for entry in (
        "native",
        {"backend": "native", "us": "x"},
        {"backend": "native", "us": {"a": "b"}},
    ):
        data = {"format": dispatch.FORMAT, "key": t.key, "choices": {cls: entry}}
        t.path.write_text(json.dumps(data))
        monkeypatch.setattr(dispatch, "_TUNER", dispatch.Tuner(t.path))
        assert "(0 choices)" in dispatch.describe()


# -- 8, 10: the kernel cache ----------------------------------------------------------------------


@pytest.fixture
def fake_cxx(tmp_path, monkeypatch):
    """A compiler script whose outcome a test sets (``mode``), counting its builds, and the
    kernel cache in tmp_path (the machine's own cache is never touched)."""
    from meprop.kernels import build

    monkeypatch.setenv("MEPROP_CACHE", str(tmp_path / "cache"))
    mode, calls = tmp_path / "mode", tmp_path / "calls"
    mode.write_text("ok")
    script = tmp_path / "cxx"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo fake 1.0; exit 0; fi\n'
        f"echo x >> {calls}\n"
        f"case $(cat {mode}) in\n"
        "  ok) for a; do out=$a; done; head -c 3000 /dev/zero > $out; exit 0;;\n"
        "  full) echo 'fatal error: No space left on device' >&2; exit 1;;\n"
        "  error) echo \"error: bad value 'bogus' for '-march=' switch\" >&2; exit 1;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(build, "_errors", {})
    monkeypatch.setattr(build, "_libs", {})
    monkeypatch.setattr(build, "_verified", _verified_any(build))

    class Fake:
        cxx = str(script)

        def set(self, outcome):
            mode.write_text(outcome)

        def builds(self):
            return len(calls.read_text().splitlines()) if calls.exists() else 0

    return Fake()


def _verified_any(build):
    """build._verified without the ELF check of record-less files (the fake writes no ELF)."""
    real = build._verified

    def verified(lib):
        return lib.with_suffix(".sha256").exists() and real(lib)

    return verified


def test_8_10_a_damaged_library_is_built_again(fake_cxx):
    from meprop.kernels import build

    lib = build._build(fake_cxx.cxx, "x86-64")
    assert fake_cxx.builds() == 1 and build._build(fake_cxx.cxx, "x86-64") == lib
    assert fake_cxx.builds() == 1  # cached, verified
    for damage in (
        lambda: lib.write_bytes(lib.read_bytes()[:100]),
        lambda: lib.write_bytes(b"\1" * 3000),
    ):
        damage()  # truncated (a bus error if loaded), then overwritten at the same size
        assert build._build(fake_cxx.cxx, "x86-64") == lib
        assert lib.stat().st_size == 3000 and build._verified(lib)
    assert fake_cxx.builds() == 3


def test_8_a_failed_build_is_tried_again_when_its_cause_may_have_gone(fake_cxx, monkeypatch):
    from meprop.kernels import build

    fake_cxx.set("full")  # the environment's failure: not remembered
    with pytest.raises(RuntimeError, match="No space left"):
        build._build(fake_cxx.cxx, "x86-64")
    assert not list(build.cache_dir().glob("*.failed"))
    fake_cxx.set("error")  # the compiler's rejection: remembered ...
    with pytest.raises(RuntimeError, match="bad value"):
        build._build(fake_cxx.cxx, "x86-64")
    n = fake_cxx.builds()
    fake_cxx.set("ok")
    with pytest.raises(RuntimeError, match="bad value"):
        build._build(fake_cxx.cxx, "x86-64")
    assert fake_cxx.builds() == n
    monkeypatch.setenv("CPATH", "/elsewhere")  # ... but not in another environment
    assert build._build(fake_cxx.cxx, "x86-64").exists()
    fake_cxx.set("error")
    monkeypatch.delenv("CPATH")
    (build.cache_dir() / next(build.cache_dir().glob("*.so")).name).unlink()
    with pytest.raises(RuntimeError):
        build._build(fake_cxx.cxx, "x86-64")
    assert build.forget_failures()  # meprop info --clear
    fake_cxx.set("ok")
    assert build._build(fake_cxx.cxx, "x86-64").exists()


def test_8_a_bad_march_or_backend_is_one_line_where_it_is_read(
    fake_cxx, tiny_mnist, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CXX", fake_cxx.cxx)
    fake_cxx.set("error")
    monkeypatch.setenv("MEPROP_MARCH", "bogus")
    assert train(tiny_mnist, tmp_path / "run") == 2
    one_error_line(capsys, "train", "MEPROP_MARCH=bogus", "does not know -march=bogus", "unset it")
    assert not (tmp_path / "run").exists()
    monkeypatch.delenv("MEPROP_MARCH")
    monkeypatch.setenv("MEPROP_BACKEND", "bogus")
    assert main(["info"]) == 2
    one_error_line(capsys, "info", "MEPROP_BACKEND must be one of", "'bogus'")


# -- 9, 14: options that do not apply ------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(tags="upos"), "leave --tags out"),
        (dict(d_model=64), "leave --d-model out"),
        (dict(method="meact", backend="dense", epochs=2, meact_start=1), "meAct's"),
        (dict(backend="triton"), "trains on the CPU"),
    ],
)
def test_9_14_options_that_do_not_apply_are_refused(settings, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(task="mnist", **settings)


def test_14_dense_backend_trains_with_every_sparse_method():
    for method in ("meprop", "random", "mesimp"):
        assert TrainConfig(method=method, backend="dense").backend == "dense"


# -- 11, 16, 17, 18: the environment -------------------------------------------------------------


def test_11_a_full_disk_is_one_line_and_the_old_checkpoint_survives(
    tiny_mnist, finished, monkeypatch, capsys
):
    from meprop import checkpoint

    before = (finished / "last.pt").read_bytes()

    def full(obj, f, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0))
    capsys.readouterr()
    assert train(tiny_mnist, finished, "--resume", "--epochs", "3") == 2
    one_error_line(capsys, "train", f"no space left on {finished}", "free some space", "--resume")
    assert (finished / "last.pt").read_bytes() == before
    assert not list(finished.glob(".*.tmp"))
    monkeypatch.undo()
    error = checkpoint.write_error(finished / "x", OSError(errno.EFBIG, "File too large"))
    assert "file size limit" in str(error)


def test_16_a_closed_pipe_does_not_stop_the_run(tiny_mnist, tmp_path):
    from test_soak import RUNNER

    out = tmp_path / "run"
    cmd = [sys.executable, "-c", RUNNER, str(tiny_mnist), "train", "mnist", "--data-dir"]
    cmd += [str(tiny_mnist), "--out", str(out), *TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.readline()  # `| head -1`
    p.stdout.close()
    assert p.wait(300) == 0
    assert p.stderr.read() == b""  # quiet
    assert (out / "summary.json").exists()


def test_16_a_full_output_device_is_one_line_and_the_command_goes_on(tmp_path, capsys):
    from meprop.experiments.cli import _Output

    class Full:
        name = "/dev/full"

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def fileno(self):
            raise ValueError  # (not a real file: nothing to redirect)

    out = _Output(Full())
    print("one", file=out)
    print("two", file=out)
    assert capsys.readouterr().err == (
        "meprop: output to /dev/full lost (No space left on device); going on without it\n"
    )


def test_17_a_dangling_link_or_a_link_loop_as_out(tiny_mnist, tmp_path, capsys):
    dangling, loop = tmp_path / "dangling", tmp_path / "loop"
    dangling.symlink_to(tmp_path / "nowhere")
    loop.symlink_to(loop)
    assert train(tiny_mnist, dangling) == 2
    one_error_line(capsys, "train", "symbolic link to", "nowhere", "does not exist")
    assert train(tiny_mnist, loop) == 2
    one_error_line(capsys, "train", "symbolic links", "choose another --out")


def test_18_a_data_file_replaced_by_a_folder(tiny_mnist, tmp_path, capsys):
    path = tiny_mnist / "mnist" / "train-images-idx3-ubyte.gz"
    path.unlink()
    path.mkdir()
    assert train(tiny_mnist, tmp_path / "run") == 2
    one_error_line(capsys, "train", f"{path} is a folder, not the file", "remove it")


# -- 19, 20: CoNLL-U and meta tensors ------------------------------------------------------------

SENTENCE = [
    "1\tDogs\tdog\tNOUN\tNNS\t_\t2\tnsubj\t_\t_",
    "2\tbark\tbark\tVERB\tVBP\t_\t0\troot\t_\t_",
]


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("\r".join(SENTENCE) + "\r\r", 1, "CR-only"),
        (SENTENCE[0] + "\n   \n" + SENTENCE[1] + "\n\n", 2, "only whitespace"),
    ],
    ids=["cr-only", "whitespace-line"],
)
def test_19_conllu_oddities_name_their_line(tmp_path, text, line, words):
    pytest.importorskip("conllu")
    from meprop.experiments.data.conllu import ConlluError, read_conllu

    path = tmp_path / "x.conllu"
    path.write_bytes(text.encode())
    with pytest.raises(ConlluError, match=words) as e:
        read_conllu(path)
    assert f"{path}:{line}:" in str(e.value)


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_20_sparse_linear_on_meta_tensors(mode):
    import meprop

    layer = meprop.SparseLinear(8, 6, device="meta", config=meprop.MePropConfig(k=2, mode=mode))
    x = torch.empty(4, 8, device="meta", requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == (4, 8) and layer.weight.grad.shape == (6, 8)
    assert layer.weight.grad.is_meta


def test_every_committed_config_loads_with_its_settings_and_identity():
    # run folders written before the experiments moved rooms and before --model: their
    # config.json loads, keeps every value, and their identity is what their checkpoints carry
    # (the identity leaves out settings added later at their defaults)
    from meprop.experiments.rundir import ADDED, run_identity

    configs = sorted((REPO / "docs" / "results").glob("*/runs/*/config.json"))
    assert len(configs) > 100
    for path in configs:
        saved = json.loads(path.read_text())
        cfg = TrainConfig.from_file(path)
        d = cfg.to_dict()
        assert {k: d[k] for k in saved} == saved, path
        settings = run_identity(cfg)["settings"]
        assert not set(ADDED) & set(settings) - set(saved), path


def test_settings_line_comes_from_the_plain_dense_row_not_a_control(tmp_path):
    """A dense control ("dense at the widths of ...") can come first in a folder; the report's
    shared-settings line still describes the plain dense row."""
    from meprop.experiments.report import build_report

    control = fake_run(tmp_path / "a-control", 0.95, method="dense", hidden=(7,),
                       row=dict(group="mesimp", label="dense at the widths of meSimp"))  # fmt: skip
    dense = fake_run(tmp_path / "b-dense", 0.97, method="dense", hidden=(50,),
                     row=dict(group="lenet", label="dense"))  # fmt: skip
    report = build_report([control, dense], tmp_path / "out").read_text()
    line = next(x for x in report.splitlines() if x.startswith("Settings ("))
    assert (
        line.startswith("Settings (dense;") and "hidden 50x50," in line and "hidden 7" not in line
    )
