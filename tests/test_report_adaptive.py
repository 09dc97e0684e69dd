"""meprop report's adaptive-k section, on run folders written by hand: the table's mean k, its
reduction against the bound, the time-to-accuracy target and crossings, the paired claims,
the plot, and no section without adaptive rows."""

import json
from pathlib import Path

import pytest

from meprop.experiments.report import adaptive_claims, build_report, claims, load_runs
from meprop.experiments.train import TrainConfig

STEPS = (10, 20, 30)  # one evaluation per epoch, 10 steps each


def write_run(
    root: Path,
    name: str,
    *,
    group: str,
    label: str,
    seed: int,
    dev: tuple,
    train: tuple,
    test: float,
    mean_k: list | None = None,
    linear: float = 0.03,
    **cfg,
) -> Path:
    """A finished run folder as the trainer leaves it: config.json, log.jsonl (one record per
    epoch, cumulative times, ``mean_k`` where given), summary.json and row.json."""
    d = root / name
    d.mkdir(parents=True)
    config = TrainConfig(task="mnist", hidden=(100,), layers=2, epochs=3, seed=seed, **cfg)
    (d / "config.json").write_text(json.dumps(config.to_dict()))
    log = []
    for i, step in enumerate(STEPS):
        rec = {
            "epoch": float(i + 1),
            "step": step,
            "train_loss": 0.1,
            "dev_accuracy": dev[i],
            "train_accuracy": dev[i],
            "times": {"train": train[i], "linear_backward": linear * step / STEPS[-1]},
        }
        if mean_k:
            rec["mean_k"] = {"0": mean_k[i][0], "3": mean_k[i][1]}
        log.append(rec)
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    summary = {
        "config": config.to_dict(),
        "best_epoch": 3.0,
        "dev_accuracy": max(dev),
        "test_accuracy": test,
        "times": {"train": train[-1], "linear_backward": linear},
        "steps": STEPS[-1],
        "widths": [100, 100],
        "torch": "2.13.0+cpu",
        "threads": 1,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    row = {"group": group, "label": label, "seed": seed, "machine": "test machine"}
    row["commit"] = "abc1234"
    (d / "row.json").write_text(json.dumps(row))
    return d


def fixed_runs(root: Path) -> None:
    """Dense, fixed per_example k=20 (logs mean_k, as runs now do), 80 and 160 (log none: k
    is min(k, width) = 100), and two rows the adaptive table must leave out: a unified row
    (no adaptive row of that mode) and a per_example row without dropout (other settings),
    whose low dev scores would otherwise set the target."""
    pe = dict(method="meprop", mode="per_example")
    for s in (1, 2):
        tag = "" if s == 1 else f"-s{s}"
        write_run(root, f"dense{tag}", group="main", label="dense", seed=s, method="dense",
                  dev=(0.30, 0.35, 0.40), train=(4, 8, 12), test=0.40, linear=0.09)  # fmt: skip
        write_run(root, f"k20{tag}", group="main", label="meProp per_example k=20", seed=s,
                  k=20, **pe, dev=[(0.85, 0.94, 0.955), (0.86, 0.95, 0.96)][s - 1],
                  train=(1, 2, 3), test=[0.975, 0.976][s - 1],
                  mean_k=[(20, 20)] * 3)  # fmt: skip
        write_run(root, f"k80{tag}", group="ratio", label="meProp per_example k=80", seed=s,
                  k=80, **pe, dev=[(0.93, 0.96, 0.975), (0.92, 0.955, 0.97)][s - 1],
                  train=(2, 4, 6), test=[0.980, 0.9788][s - 1], linear=0.06)  # fmt: skip
        write_run(root, f"k160{tag}", group="ratio", label="meProp per_example k=160", seed=s,
                  k=160, **pe, dev=(0.956, 0.97, 0.98), train=(2, 4, 6),
                  test=[0.984, 0.9845][s - 1])  # fmt: skip
        write_run(root, f"u80{tag}", group="ratio", label="meProp unified k=80", seed=s,
                  k=80, method="meprop", mode="unified", dev=(0.5, 0.55, 0.6),
                  train=(1, 2, 3), test=0.6)  # fmt: skip
        write_run(root, f"nodrop{tag}", group="dropout", label="meProp per_example k=80, "
                  "no dropout", seed=s, k=80, **pe, dropout=0.0, dev=(0.5, 0.5, 0.5),
                  train=(1, 2, 3), test=0.5)  # fmt: skip


def adaptive_runs(root: Path) -> None:
    """TinyProp under k <= 80 on seeds 1 and 2, mass 0.8 on seed 1."""
    tiny = dict(method="meprop", mode="per_example", k=80, adaptive="tinyprop", min_k=4)
    label = "meProp per_example adaptive tinyprop, k <= 80"
    # per-epoch layer means: seed 1 30, 15, 8 (training 53/3); seed 2 40, 20, 12 (24)
    write_run(root, "tiny", group="adaptive", label=label, seed=1, **tiny,
              mean_k=[(40, 20), (20, 10), (10, 6)], dev=(0.90, 0.96, 0.97), train=(1, 2, 3),
              test=0.982, linear=0.03)  # fmt: skip
    write_run(root, "tiny-s2", group="adaptive", label=label, seed=2, **tiny,
              mean_k=[(50, 30), (20, 20), (14, 10)], dev=(0.91, 0.96, 0.965),
              train=(1.5, 3, 4.5), test=0.981, linear=0.06)  # fmt: skip
    write_run(root, "mass", group="adaptive", label="meProp per_example adaptive mass 0.8, "
              "k <= 80", seed=1, method="meprop", k=80, adaptive="mass", min_k=4,
              mass_share=0.8, mean_k=[(30, 30)] * 3, dev=(0.955, 0.96, 0.97),
              train=(1, 2, 3), test=0.979)  # fmt: skip


def section(report: str) -> list[str]:
    text = report.split("## Adaptive k", 1)[1].split("\n## ", 1)[0]
    return text.splitlines()


def cells(lines: list[str], label: str) -> list[str]:
    (line,) = [x for x in lines if x.startswith(f"| {label} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def table(lines: list[str]) -> dict[str, dict[str, str]]:
    """The section's run table: label -> column -> cell."""
    header = cells(lines, "run")
    rows = [x for x in lines if x.startswith("| ")]
    start = rows.index(next(x for x in rows if x.startswith("| run |"))) + 2
    out = {}
    for line in rows[start:]:
        if line.startswith("| claim |"):
            break
        row = [c.strip() for c in line.strip("|").split("|")]
        out[row[0]] = dict(zip(header, row, strict=True))
    return out


@pytest.fixture
def report(tmp_path):
    runs = tmp_path / "runs"
    fixed_runs(runs)
    adaptive_runs(runs)
    out = tmp_path / "report"
    return build_report(sorted(runs.iterdir()), out)


def test_adaptive_table(report):
    text = report.read_text()
    assert "## adaptive k against fixed k" in text  # the group's own table
    lines = section(text)
    # the lowest best dev of the table's runs: k=20's seed 1 (the unified, no-dropout and dense
    # rows are not in the table)
    assert any("reaches 95.50 %" in x for x in lines)
    assert any("times compare within one grid" in x for x in lines)
    rows = table(lines)
    tiny = rows["meProp per_example adaptive tinyprop, k <= 80"]
    assert tiny["group"] == "adaptive"
    assert tiny["k rule"] == "tinyprop" and tiny["bound k"] == "80"
    assert tiny["test accuracy % (seeds)"] == "98.15 ± 0.07 (2)"
    assert tiny["mean k"] == "20.8"  # (53/3 + 24) / 2
    assert tiny["mean k, last epoch"] == "10.0"  # (8 + 12) / 2
    assert tiny["reduction vs bound"] == "87.5%"  # 1 - 10/80
    assert tiny["linear backward ms/step"] == "1.500"  # 30 ms and 60 ms over 30 steps
    # seed 1 reaches 0.955 at step 20 (2 s), seed 2 at step 20 (3 s)
    assert (tiny["steps to target"], tiny["seconds to target"]) == ("20", "2.50")
    mass = rows["meProp per_example adaptive mass 0.8, k <= 80"]
    assert mass["k rule"] == "mass 0.8" and mass["mean k"] == "30.0"
    assert mass["reduction vs bound"] == "62.5%"
    assert (mass["steps to target"], mass["seconds to target"]) == ("10", "1.00")
    k20 = rows["meProp per_example k=20"]  # logs mean_k
    assert k20["group"] == "main" and k20["k rule"] == "fixed"
    assert (k20["mean k"], k20["reduction vs bound"]) == ("20.0", "0.0%")
    # seed 1 reaches the target in its last epoch (it set it), seed 2 too (0.95 < 0.955)
    assert (k20["steps to target"], k20["seconds to target"]) == ("30", "3.00")
    k80 = rows["meProp per_example k=80"]  # seed 2's 0.955 counts: at the target
    assert (k80["steps to target"], k80["seconds to target"]) == ("20", "4.00")
    k160 = rows["meProp per_example k=160"]  # no mean_k logged: min(k, width)
    assert (k160["mean k"], k160["mean k, last epoch"]) == ("100.0", "100.0")
    assert (k160["steps to target"], k160["seconds to target"]) == ("10", "2.00")
    assert list(rows) == [  # the report's order: run folders by name ("mass" < "tiny")
        "meProp per_example adaptive mass 0.8, k <= 80",
        "meProp per_example adaptive tinyprop, k <= 80",
        "meProp per_example k=20",
        "meProp per_example k=80",
        "meProp per_example k=160",
    ]  # no unified row (no adaptive row of that mode), no run with other settings


def test_adaptive_claims(report):
    lines = section(report.read_text())
    tiny = "meProp per_example adaptive tinyprop, k <= 80"
    # differences 0.20 and 0.22: mean 0.21, half-width t(1) * 0.01 = 0.127
    bound = cells(lines, f"{tiny} >= fixed k=80 (its bound)")
    assert bound[1:] == ["+0.21 [+0.08, +0.34]", "2", "holds"]
    # the best fixed k of per_example is 160 (98.43): differences -0.20, -0.35
    best = cells(lines, f"{tiny} >= fixed k=160 (the best fixed k)")
    assert best[1].startswith("-0.28 [") and best[2:] == ["2", "undecided"]
    mass = cells(lines, "meProp per_example adaptive mass 0.8, k <= 80 >= fixed k=80 (its bound)")
    assert mass[1:] == ["-0.10 (1 pair)", "1", "undecided (one seed)"]
    # and not among the paper's claims
    paper = report.read_text().split("## The paper's claims", 1)[1].split("\n## ", 1)[0]
    assert "adaptive" not in paper


def test_adaptive_plot(report):
    plot = report.parent / "adaptive_k.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert "![adaptive_k.png](adaptive_k.png)" in section(report.read_text())
    # the k/h sweep leaves the adaptive runs out (their k is a bound only)
    assert (report.parent / "accuracy_vs_ratio.png").exists()


def test_claims_pick_the_bound_and_the_best(tmp_path):
    fixed_runs(tmp_path)
    adaptive_runs(tmp_path)
    runs = load_runs(sorted(tmp_path.iterdir()))
    rows = {claim: (p, what) for claim, p, what in adaptive_claims(runs)}
    tiny = "meProp per_example adaptive tinyprop, k <= 80"
    p, what = rows[f"{tiny} >= fixed k=80 (its bound)"]
    assert what == f"{tiny} - meProp per_example k=80"
    assert p.n == 2 and p.mean == pytest.approx(0.21) and p.verdict == "holds"
    p, _ = rows[f"{tiny} >= fixed k=160 (the best fixed k)"]
    assert p.mean == pytest.approx(-0.275)
    assert len(rows) == 4  # 2 adaptive rows x (bound, best)


def test_no_adaptive_rows_no_section(tmp_path):
    fixed_runs(tmp_path / "runs")
    report = build_report(sorted((tmp_path / "runs").iterdir()), tmp_path / "out")
    text = report.read_text()
    assert "## Adaptive k" not in text and "adaptive k against fixed k" not in text
    assert not (tmp_path / "out" / "adaptive_k.png").exists()
    assert adaptive_claims(load_runs(sorted((tmp_path / "runs").iterdir()))) == []


def test_no_control_no_control_plot(tmp_path):
    """Without random-k / k-dim runs (e.g. the POS grid's dense, meProp, meSimp rows) the
    plots named after them are not drawn, nor a k/h curve from a single k."""
    runs = tmp_path / "runs"
    for s in (1, 2):
        tag = "" if s == 1 else f"-s{s}"
        write_run(runs, f"dense{tag}", group="main", label="dense", seed=s, method="dense",
                  dev=(0.3, 0.35, 0.4), train=(4, 8, 12), test=0.40)  # fmt: skip
        write_run(runs, f"k20{tag}", group="main", label="meProp per_example k=20", seed=s,
                  method="meprop", k=20, dev=(0.3, 0.35, 0.4), train=(1, 2, 3),
                  test=0.39)  # fmt: skip
    out = tmp_path / "out"
    build_report(sorted(runs.iterdir()), out)
    made = {p.name for p in out.glob("*.png")}
    assert "learning_curves.png" in made
    assert not made & {"topk_vs_random.png", "meprop_vs_kdim.png", "accuracy_vs_ratio.png"}
    write_run(runs, "random", group="control", label="random-k k=20", seed=1, method="random",
              k=20, dev=(0.2, 0.25, 0.3), train=(1, 2, 3), test=0.3)  # fmt: skip
    build_report(sorted(runs.iterdir()), out)
    assert (out / "topk_vs_random.png").exists() and not (out / "meprop_vs_kdim.png").exists()


def test_mesimp_rows_without_dense_report(tmp_path):
    """`reproduce TASK --groups mesimp` alone: no dense run to pair with, still a report (the
    width share is of the meSimp run's own starting width)."""
    runs = tmp_path / "runs"
    for s in (1, 2):
        d = write_run(runs, f"simp-s{s}", group="mesimp", label="meSimp k=20", seed=s,
                      method="mesimp", k=20, dev=(0.3, 0.35, 0.4), train=(1, 2, 3),
                      test=0.39)  # fmt: skip
        summary = json.loads((d / "summary.json").read_text())
        summary["final_widths"] = {"0": 30, "1": 20}
        (d / "summary.json").write_text(json.dumps(summary))
        log = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
        log = [{**e, "widths": summary["final_widths"]} for e in log]
        (d / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    text = build_report(sorted(runs.iterdir()), tmp_path / "out").read_text()
    assert "| meSimp k=20 | 2 |" in text
    assert ">= dense" not in text  # nothing to pair with
    got = claims(load_runs(sorted(runs.iterdir())))
    assert got == []


def test_tuning_says_whether_the_shared_settings_are_best(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "dense", group="main", label="dense", seed=1, method="dense",
              dev=(0.3, 0.35, 0.40), train=(1, 2, 3), test=0.4)  # fmt: skip
    write_run(runs, "lr2", group="tuning", label="dense lr 0.002, dropout 0.1", seed=1,
              method="dense", lr=2e-3, dev=(0.3, 0.35, 0.42), train=(1, 2, 3),
              test=0.4)  # fmt: skip
    write_run(runs, "d2", group="tuning", label="dense lr 0.001, dropout 0.2", seed=1,
              method="dense", dropout=0.2, dev=(0.3, 0.35, 0.38), train=(1, 2, 3),
              test=0.4)  # fmt: skip
    text = build_report(sorted(runs.iterdir()), tmp_path / "out").read_text()
    assert (
        "On dev (seed 1), the shared settings (lr default, dropout 0.1: 40.00) are not the "
        "best: lr 0.002, dropout 0.1 scores 42.00 (number 2 of 3); the others: lr 0.002, "
        "dropout 0.1 42.00, lr default, dropout 0.2 38.00." in text
    )
    (runs / "lr2").rename(tmp_path / "lr2")  # without it the shared settings are the best
    text = build_report(sorted(runs.iterdir()), tmp_path / "out").read_text()
    assert "dropout 0.1: 40.00) are the best; the others: lr default, dropout 0.2 38.00." in text
    # an exact tie (the same number of correct examples) is a tie, not a loss
    write_run(runs, "lr5", group="tuning", label="dense lr 0.0005, dropout 0.1", seed=1,
              method="dense", lr=5e-4, dev=(0.3, 0.35, 0.40), train=(1, 2, 3),
              test=0.4)  # fmt: skip
    text = build_report(sorted(runs.iterdir()), tmp_path / "out").read_text()
    assert "dropout 0.1: 40.00) are the best (tied with lr 0.0005, dropout 0.1)" in text


def test_reproduce_adaptive_group_end_to_end(tiny_mnist, tmp_path, monkeypatch):
    """The quick grid's adaptive group (bound 40) and the fixed k=40 rows trained for real: the
    report reads the trainer's own mean_k (hidden 48, above the bound: at a bound >= the width
    the layer keeps everything, adaptive or not)."""
    from dataclasses import replace

    from meprop.experiments import reproduce
    from meprop.experiments.cli import main

    full_grid = reproduce.mnist_grid

    def grid(quick, dataset):
        rows = full_grid(quick=True, dataset=dataset)
        rows = [r for r in rows if r.group == "adaptive" or r.label.endswith(" k=40")]
        small = dict(epochs=2, batch_size=20, hidden=(48,), train_limit=0)
        return [replace(r, config=replace(r.config, **small)) for r in rows]

    monkeypatch.setitem(reproduce.GRIDS, "mnist", grid)
    out = tmp_path / "results"
    args = ["reproduce", "mnist", "--quick", "--out", str(out), "--data-dir", str(tiny_mnist)]
    assert main([*args, "--no-progress"]) == 0
    lines = section((out / "report.md").read_text())
    rows = table(lines)
    assert sorted(rows) == [
        "meProp per_example adaptive mass 0.8, k <= 40",
        "meProp per_example adaptive tinyprop, k <= 40",
        "meProp per_example k=40",
        "meProp unified adaptive tinyprop, k <= 40",
        "meProp unified k=40",
    ]
    logs = {
        json.loads((d / "row.json").read_text())["label"]: [
            json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()
        ]
        for d in (out / "runs").iterdir()
    }
    for label, row in rows.items():
        # the mean over epochs and layers of the trainer's mean_k
        ks = [sum(e["mean_k"].values()) / len(e["mean_k"]) for e in logs[label]]
        assert float(row["mean k"]) == pytest.approx(sum(ks) / len(ks), abs=0.051)
        assert float(row["mean k, last epoch"]) == pytest.approx(ks[-1], abs=0.051)
        cut = float(row["reduction vs bound"].rstrip("%"))
        assert cut == pytest.approx(100 * (1 - ks[-1] / 40), abs=0.051)
        if "adaptive" in label:
            assert 4 <= min(ks) and max(ks) <= 40
            # per example, some rows keep fewer (unified's one k may stay at the bound here)
            assert "unified" in label or (ks[-1] < 40 and cut > 0)
        else:
            assert ks == [40.0, 40.0] and cut == 0
        assert row["steps to target"] != "-" and row["seconds to target"] != "-"
    claims = [x for x in lines if x.startswith("| meProp") and ">= fixed k=40" in x]
    assert len(claims) == 3  # each adaptive row against k=40 (its bound and the best)
    assert (out / "adaptive_k.png").stat().st_size > 5000


def test_claims_include_the_k_sweep_rows_with_seeds(tmp_path):
    """Rows of the k sweep ("ratio") run with two seeds or more are paired against dense; a
    sweep row of one seed is not."""
    from meprop.experiments.report import claims

    for s in (1, 2):
        tag = "" if s == 1 else f"-s{s}"
        write_run(tmp_path, f"dense{tag}", group="main", label="dense", seed=s, method="dense",
                  dev=(0.9, 0.95, 0.96), train=(1, 2, 3), test=[0.970, 0.972][s - 1])  # fmt: skip
        write_run(tmp_path, f"k80{tag}", group="ratio", label="meProp per_example k=80", seed=s,
                  method="meprop", k=80, dev=(0.9, 0.95, 0.96), train=(1, 2, 3),
                  test=[0.975, 0.980][s - 1])  # fmt: skip
    write_run(tmp_path, "k5", group="ratio", label="meProp per_example k=5", seed=1,
              method="meprop", k=5, dev=(0.9, 0.95, 0.96), train=(1, 2, 3), test=0.9)  # fmt: skip
    rows = {c: p for c, p, _ in claims(load_runs(sorted(tmp_path.iterdir())))}
    assert set(rows) == {"meProp per_example k=80 >= dense"}
    p = rows["meProp per_example k=80 >= dense"]
    assert p.n == 2 and p.mean == pytest.approx(0.65)  # percentage points


def test_claims_pair_symmetric_with_dense_and_per_example(tmp_path):
    from meprop.experiments.report import claims

    for s in (1, 2):
        tag = "" if s == 1 else f"-s{s}"
        common = dict(seed=s, dev=(0.9, 0.95, 0.96), train=(1, 2, 3))
        write_run(tmp_path, f"dense{tag}", group="main", label="dense", method="dense",
                  test=[0.970, 0.972][s - 1], **common)  # fmt: skip
        write_run(tmp_path, f"pe{tag}", group="main", label="meProp per_example k=20",
                  method="meprop", k=20, test=[0.960, 0.962][s - 1], **common)  # fmt: skip
        write_run(tmp_path, f"sym{tag}", group="symmetric", label="meProp symmetric k=20",
                  method="meprop", k=20, mode="symmetric", test=[0.968, 0.971][s - 1],
                  **common)  # fmt: skip
    rows = {c: p for c, p, _ in claims(load_runs(sorted(tmp_path.iterdir())))}
    assert rows["meProp symmetric k=20 >= dense"].mean == pytest.approx(-0.15)
    assert rows["meProp symmetric k=20 > per_example k=20"].mean == pytest.approx(0.85)


def test_claims_pair_adagrad_depth_and_dropout(tmp_path):
    """The paper's claims about settings: meProp vs dense under AdaGrad and at each depth,
    dropout vs none for dense and meProp, each paired on the seeds both sides share."""
    from meprop.experiments.report import claims

    def run(name, s, group, label, test, **cfg):
        tag = "" if s == 1 else f"-s{s}"
        write_run(tmp_path, f"{name}{tag}", group=group, label=label, seed=s, test=test,
                  dev=(0.9, 0.95, 0.96), train=(1, 2, 3), **cfg)  # fmt: skip

    for s in (1, 2, 3):
        e = 0.001 * s
        run("dense", s, "main", "dense", 0.980 + e, method="dense", dropout=0.1)
        run("pe", s, "main", "meProp per_example k=20", 0.975 + e, method="meprop", k=20,
            dropout=0.1)  # fmt: skip
        run("dense-ada", s, "adagrad", "dense AdaGrad", 0.970 + e, method="dense",
            optimizer="adagrad", dropout=0.1)  # fmt: skip
        run("mp-ada", s, "adagrad", "meProp k=10 AdaGrad", 0.972 + e, method="meprop", k=10,
            optimizer="adagrad", dropout=0.1)  # fmt: skip
        run("dense-nd", s, "dropout", "dense, no dropout", 0.978 + e, method="dense",
            dropout=0.0)  # fmt: skip
        run("pe-nd", s, "dropout", "meProp per_example k=20, no dropout", 0.960 + e,
            method="meprop", k=20, dropout=0.0)  # fmt: skip
        run("d3", s, "depth", "dense 3 layers", 0.981 + e, method="dense", dropout=0.1)
        run("m3", s, "depth", "meProp unified k=20, 3 layers", 0.979 + e, method="meprop",
            k=20, mode="unified", dropout=0.1)  # fmt: skip
    runs = load_runs(sorted(tmp_path.iterdir()))
    for r in runs:  # the fake summaries say 2 layers: the depth rows have 3
        if r.group == "depth":
            r.summary["widths"] = [100, 100, 100]
    rows = {c: p for c, p, _ in claims(runs)}
    assert rows["meProp k=10 AdaGrad >= dense AdaGrad"].mean == pytest.approx(0.2)
    assert rows["meProp k=10 AdaGrad >= dense AdaGrad"].n == 3
    assert rows["meProp unified k=20, 3 layers >= dense, 3 hidden layers"].mean == pytest.approx(
        -0.2
    )
    assert rows["dense with dropout > without"].mean == pytest.approx(0.2)
    assert rows["meProp per_example k=20 with dropout > without"].mean == pytest.approx(1.5)
    assert rows["meProp per_example k=20 with dropout > without"].verdict == "holds"
