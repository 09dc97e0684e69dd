"""benchmarks/bench_time_to_accuracy.py: the crossing time read off synthetic logs, and the
script end to end on a tiny MNIST."""

import importlib
import json
import sys
from pathlib import Path

import pytest

from meprop.experiments.train import TrainConfig

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def tta():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("bench_time_to_accuracy")
    finally:
        sys.path.remove(str(BENCH))


def rec(step, acc, train, **times):
    return {
        "step": step,
        "epoch": step / 10,
        "dev_accuracy": acc,
        "times": {"train": train, **times},
    }


DENSE = [rec(10, 0.90, 2.0), rec(20, 0.95, 4.0), rec(30, 0.97, 6.0), rec(40, 0.96, 8.0)]
FAST = [rec(10, 0.93, 1.0), rec(20, 0.9695, 2.0), rec(30, 0.9699, 3.0), rec(40, 0.98, 4.0)]
SLOW = [rec(10, 0.80, 1.0), rec(20, 0.90, 2.0)]


def test_crossing_is_the_first_record_at_or_above_the_target(tta):
    assert tta.crossing(DENSE, 0.969) == {"seconds": 6.0, "step": 30, "epoch": 3.0, "value": 0.97}
    assert tta.crossing(FAST, 0.969)["step"] == 20  # 0.9695 >= 0.969: the first one counts
    assert tta.crossing(FAST, 0.9695)["step"] == 20  # at the target counts
    assert tta.crossing(SLOW, 0.969) is None
    assert tta.crossing([], 0.5) is None


def test_train_seconds_falls_back_to_the_step_phases(tta):
    assert tta.train_seconds(rec(1, 0.5, 7.5, forward=1.0)) == 7.5
    old = {"times": {"forward": 1.0, "backward": 2.0, "optimizer": 0.5, "eval": 9.0}}
    assert tta.train_seconds(old) == 3.5  # evaluation is not training


def test_table_target_and_ratios(tta):
    cfg = TrainConfig()
    runs = [
        (tta.Run("dense", "dense", None, cfg), DENSE),
        (tta.Run("u", "unified", 20, cfg), FAST),
        (tta.Run("p", "per_example", 20, cfg), SLOW),
    ]
    target, rows = tta.table(runs)
    assert target == pytest.approx(0.969)  # dense's best 0.97 - 0.1 point
    dense, fast, slow = rows
    assert (dense["seconds"], dense["steps"], dense["ratio"]) == (6.0, 30, 1.0)
    assert (fast["seconds"], fast["steps"], fast["ratio"]) == (2.0, 20, pytest.approx(1 / 3))
    assert slow["seconds"] is None and slow["ratio"] is None and slow["total"] == 2.0
    assert fast["best"] == 0.98 and fast["label"] == "meProp unified k=20"
    lines = tta.markdown(target, rows)
    assert "dev accuracy >= 96.90%" in lines[0]
    assert (
        "| meProp per_example k=20 | 20 | not reached | not reached | 90.00 | 2.0 | - |"
        in (lines[-1])
    )
    assert "| 0.33x |" in lines[-2]
    with pytest.raises(ValueError, match="include dense"):
        tta.table(runs[1:])


def test_read_log_keeps_the_later_of_repeated_steps(tta, tmp_path):
    path = tmp_path / "log.jsonl"
    # stopped mid-epoch 2 (steps 15, 20 logged), resumed from the checkpoint of epoch 1 (10)
    lines = [rec(5, 0.1, 1), rec(10, 0.2, 2), rec(15, 0.3, 3), rec(20, 0.4, 4)]
    lines += [rec(15, 0.35, 3.1), rec(20, 0.45, 4.1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [(r["step"], r["dev_accuracy"]) for r in tta.read_log(path)] == [
        (5, 0.1),
        (10, 0.2),
        (15, 0.35),
        (20, 0.45),
    ]


def test_script_end_to_end(tta, tiny_mnist, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "runs"
    args = ["--epochs", "2", "--ks", "20", "--methods", "unified,mesimp", "--eval-every", "2"]
    args += ["--out", str(out), "--data-dir", str(tiny_mnist)]
    assert tta.main(args) == 0
    text = capsys.readouterr().out
    assert "| dense | - |" in text and "| meProp unified k=20 | 20 |" in text
    assert "| meSimp (per_example) k=160 | 160 |" in text
    assert (out / "time_to_accuracy.png").stat().st_size > 1000
    # interleaved by epoch through resume: every run has its two epochs, evaluated every 2 steps
    log = tta.read_log(out / "dense" / "log.jsonl")
    assert [r["step"] for r in log] == [2, 3, 5, 6]  # 150 examples / 50: 3 steps per epoch
    # a second call reuses the finished runs (same settings)
    assert tta.main([*args, "--no-plot"]) == 0
    assert tta.read_log(out / "dense" / "log.jsonl") == log
    with pytest.raises(SystemExit, match="other settings"):
        tta.main([*args[:-4], "--seed", "2", "--out", str(out), "--data-dir", str(tiny_mnist)])
