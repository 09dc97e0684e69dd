"""The time-to-accuracy grid (meprop.experiments.tta): crossings, the interleaved runner, the report."""

import json
import math
from dataclasses import replace

import pytest

from meprop.experiments.grids import Row
from meprop.experiments.train import TrainConfig
from meprop.experiments.tta import (
    LOSS_MARGINS,
    WINDOW,
    Metric,
    build_tta_report,
    crossing,
    run_interleaved,
    tta_grid,
)


def log(scores, seconds_per_eval=1.0, steps_per_eval=10, key="dev_accuracy"):
    return [
        {"epoch": (i + 1) / 10, "step": (i + 1) * steps_per_eval, key: s,
         "times": {"train": (i + 1) * seconds_per_eval}}
        for i, s in enumerate(scores)
    ]  # fmt: skip


def test_crossing_needs_the_running_mean():
    # one lucky evaluation (0.99) does not count; three that average 0.95 do
    records = log([0.90, 0.99, 0.90, 0.94, 0.95, 0.96])
    assert crossing(records, 0.949, "dev_accuracy") == (60, 6.0)
    assert crossing(records, 0.99, "dev_accuracy") is None
    # not before WINDOW evaluations, even when the first one is above the target
    assert crossing(log([0.99, 0.99, 0.99]), 0.95, "dev_accuracy") == (10 * WINDOW, WINDOW)


def test_grid_rows():
    rows = tta_grid()
    groups = {r.group for r in rows}
    assert groups == {"mnist-w500", "mnist-w1000", "mnist-w2000", "mnist-w500-levers",
                      "mnist-w500-confirm", "mnist-w500-k20", "mnist-w500-more",
                      "mnist-w500-mesimp", "parse", "lm", "lm-time"}  # fmt: skip
    for group in ("mnist-w500-levers", "mnist-w500-confirm", "mnist-w500-k20", "mnist-w500-more",
                  "mnist-w500-mesimp"):  # fmt: skip
        rows_of = [r for r in rows if r.group == group]
        assert rows_of[0].config.method == "dense" and rows_of[0].label == "dense"
        assert {(r.config.epochs, r.config.eval_every) for r in rows_of} == {(10, 110)}
    levers = {r.label: r.config for r in rows if r.group == "mnist-w500-levers"}
    assert levers["meProp unified k=80, LazyAdam, dense warm-up 1 epoch"].warmup == 1100
    assert levers["meSimp unified k=160, cycle 5+5, LazyAdam"].cycle == (5, 5)
    confirm = {r.label: r.config for r in rows if r.group == "mnist-w500-confirm"}
    assert all(confirm[label] == levers[label] for label in confirm)  # the same recipes
    more = {r.label: r.config for r in rows if r.group == "mnist-w500-more"}
    assert more["meProp unified k=160, LazyAdam"] == levers["meProp unified k=160, LazyAdam"]
    memory = more["meSimp unified k=160, cycle 5+5, LazyAdam, memory 0.8"]
    assert memory == replace(levers["meSimp unified k=160, cycle 5+5, LazyAdam"], memory=0.8)
    assert more["meProp unified mass 0.8, k <= 160, LazyAdam"].adaptive == "mass"
    wider = {r.label: r.config for r in rows if r.group == "mnist-w500-mesimp"}
    for k in (240, 320):  # the levers' meSimp recipe, keeping more of each layer
        want = replace(levers["meSimp unified k=160, cycle 5+5, LazyAdam"], k=k)
        assert wider[f"meSimp unified k={k}, cycle 5+5, LazyAdam"] == want
    for group, task in (("parse", "parse"), ("lm", "lm")):
        rows_of = [r for r in rows if r.group == group]
        assert rows_of[0].config.method == "dense" and {r.config.task for r in rows_of} == {task}
        assert any(r.config.memory == 0.8 for r in rows_of)
        # every recipe of a group evaluates at the same steps (paired crossings), and has at
        # least dense's epochs
        assert len({r.config.eval_every for r in rows_of}) == 1
        assert min(r.config.epochs for r in rows_of) == rows_of[0].config.epochs
    w2000 = [r for r in rows if r.group == "mnist-w2000"]
    assert len(w2000) == 4
    lazy = [r.config for r in w2000 if r.config.optimizer == "lazy_adam"]
    assert len(lazy) == 1 and lazy[0].sparse_grad and lazy[0].mode == "unified"
    names = [r.name for r in rows]
    assert len(names) == len(set(names))
    w500 = [r for r in rows if r.group == "mnist-w500"]
    assert w500[0].config.method == "dense"
    assert {r.config.k for r in w500 if r.config.method == "meprop"} == {20, 40, 80}
    assert len(w500) == 6
    assert all(r.config.eval_every == 110 for r in w500)  # ten evaluations per epoch
    assert any(r.config.memory == 0.8 for r in w500)


def fake_run(folder, label, method, seed, scores, seconds, test, metric="accuracy"):
    """A finished run folder as the trainer writes it (config, row, log, summary)."""
    folder.mkdir(parents=True)
    task = "lm" if metric == "neg_bpb" else "mnist"
    cfg = TrainConfig(task=task, method=method, seed=seed, k=20)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    (folder / "row.json").write_text(json.dumps({"group": "g", "label": label, "seed": seed}))
    records = log(scores, seconds, key=f"dev_{metric}")
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {f"test_{metric}": test, f"dev_{metric}": max(scores), "steps": 10 * len(scores),
               "times": {"train": seconds * len(scores)}, "metric": metric,
               "widths": [500, 500], "config": cfg.to_dict()}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))


def test_report_pairs_times_and_scores(tmp_path):
    dense = [0.90, 0.95, 0.97, 0.98, 0.98, 0.98]
    fast = [0.90, 0.96, 0.98, 0.98, 0.98, 0.98]  # the same curve, 2x faster per evaluation
    for seed, jitter in ((1, 0.0), (10, 0.001), (3, -0.001)):  # (10: seeds sort as numbers)
        fake_run(tmp_path / "runs" / f"d{seed}", "dense", "dense", seed,
                 [s + jitter for s in dense], 2.0, 0.98 + jitter)  # fmt: skip
        fake_run(tmp_path / "runs" / f"m{seed}", "fast", "meprop", seed,
                 [s + jitter for s in fast], 1.0, 0.981 + jitter)  # fmt: skip
        fake_run(tmp_path / "runs" / f"s{seed}", "slow", "meprop", seed,
                 [s - 0.05 for s in dense], 1.0, 0.93)  # fmt: skip
    (tmp_path / "runs" / "unfinished").mkdir()  # no summary: left out, with a note
    (tmp_path / "runs" / "unfinished" / "config.json").write_text("{}")
    report = build_tta_report([tmp_path], tmp_path).read_text()
    assert "unfinished: left out" in report
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines()
            if line.startswith("| ")}  # fmt: skip
    # dense reaches best - 0.5 point where its running mean does: the 5th evaluation (10 s)
    assert "| 10.0 ± 0.0 | 1.00x [1.00, 1.00]" in rows["dense"]
    assert rows["dense"].split(" | ")[1] == "1,3,10" and "(seeds 1,3,10)" in report
    fast_cells = rows["fast"].split(" | ")
    assert fast_cells[4] == "0.50x [0.50, 0.50]"  # its 5th evaluation too: 5 s against 10 s
    assert fast_cells[5] == "1.00x [1.00, 1.00]"  # in as many steps
    assert "never (0/3)" in rows["slow"]
    assert "+0.10 [+0.10, +0.10] holds" in rows["fast"]  # test, paired with dense
    assert (tmp_path / "g.png").exists()


def test_loss_targets_are_percent_above_dense_best():
    metric = Metric("dev_neg_bpb")
    assert metric.loss and metric.name == "bpb" and metric.margins == LOSS_MARGINS
    assert metric.target(-2.0, 5.0) == pytest.approx(-2.1)  # 5% above a best loss of 2.0
    assert metric.shown(-2.0) == 2.0
    acc = Metric("dev_accuracy")
    assert not acc.loss and acc.target(0.98, 0.2) == pytest.approx(0.978)
    assert acc.shown(0.98) == pytest.approx(98.0)


def test_report_of_a_loss(tmp_path):
    # bits per byte (logged negated): dense falls to 2.0; "fast" reaches the same curve in half
    # the seconds; "worse" levels out 4% above dense, short of dense's best + 2% and 1%
    dense = [-3.0, -2.5, -2.2, -2.05, -2.0, -2.0]
    worse = [s * 1.04 for s in dense]
    for seed, jitter in ((1, 0.0), (10, 0.001), (3, -0.001)):  # (10: seeds sort as numbers)
        fake_run(tmp_path / "runs" / f"d{seed}", "dense", "dense", seed,
                 [s + jitter for s in dense], 2.0, -2.0 + jitter, metric="neg_bpb")  # fmt: skip
        fake_run(tmp_path / "runs" / f"m{seed}", "fast", "meprop", seed,
                 [s + jitter for s in dense], 1.0, -2.0 + jitter, metric="neg_bpb")  # fmt: skip
        fake_run(tmp_path / "runs" / f"w{seed}", "worse", "meprop", seed,
                 [s + jitter for s in worse], 1.0, -2.08 + jitter, metric="neg_bpb")  # fmt: skip
    report = build_tta_report([tmp_path], tmp_path).read_text()
    assert "to best + 5%: s" in report and "bits per byte" in report
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in report.splitlines()
            if line.startswith("| ")}  # fmt: skip
    assert rows["fast"][4] == "0.50x [0.50, 0.50]"
    assert rows["worse"][3] != "never (0/3)" and "never (0/3)" in rows["worse"][6]
    assert rows["worse"][-3].startswith("2.08")  # test bits per byte, shown as the loss
    assert rows["worse"][-2].startswith("+4.00")  # 4% above dense's loss
    assert (tmp_path / "g.png").exists()


def test_interleaved_runner_trains_each_row_epoch_by_epoch(tiny_mnist, tmp_path):
    base = TrainConfig(task="mnist", hidden=(16,), batch_size=20, epochs=2, eval_every=2)
    rows = [
        Row("d", "g", "dense", replace(base, method="dense")),
        Row("m", "g", "meProp k=4, memory", replace(base, method="meprop", k=4, memory=0.8)),
    ]
    lines = []
    dirs = run_interleaved(rows, tmp_path, data_dir=tiny_mnist, echo=lines.append)
    # epoch 1 of each row, then epoch 2 of each
    assert [line.split("] ")[1].split(" (")[0] for line in lines] == ["dense", "meProp k=4, "
            "memory", "dense", "meProp k=4, memory"]  # fmt: skip
    assert [json.loads((d / "summary.json").read_text())["steps"] for d in dirs] == [16, 16]
    # done rows are not trained again
    lines.clear()
    run_interleaved(rows, tmp_path, data_dir=tiny_mnist, echo=lines.append)
    assert lines == []
    report = build_tta_report(dirs, tmp_path).read_text()
    assert "| meProp k=4, memory | 1 |" in report
    assert math.isfinite(json.loads((tmp_path / "grid.json").read_text())["seconds"])


@pytest.mark.parametrize("bad", ["--rows", "--groups"])
def test_cli_tta_groups(bad, capsys):
    from meprop.experiments.cli import main

    with pytest.raises(SystemExit):
        main(["reproduce", "tta", bad, "nothing-like-this"])
    assert "nothing-like-this" in capsys.readouterr().err


def test_widths_cell_is_the_mean_over_seeds_of_each_layer():
    from types import SimpleNamespace

    from meprop.experiments.tta import _widths_cell

    def run(widths):
        return SimpleNamespace(summary={"final_widths": widths})

    assert _widths_cell([run(None), run(None)]) == ""
    assert _widths_cell([run([150, 320]), run([152, 324])]) == "151,322 (mean of 2)"
    lm = [run({"blocks.0.mlp.fc": 258, "blocks.1.mlp.fc": 257})]  # the lm task: name -> width
    assert _widths_cell(lm) == "258,257"
