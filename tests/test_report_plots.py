"""meprop report's plots, on run folders written by hand with three seeds: each plot draws the
mean over a row's seeds (its min-max as a band or bars), names the seeds, keeps one legend
entry per row and the legend outside the axes (``meprop.experiments.plots``)."""

import json
from pathlib import Path

import pytest

from meprop.experiments import plots
from meprop.experiments.plots import layer_name, over_seeds, per_x, seeds_text
from meprop.experiments.report import build_report, load_runs
from test_report_adaptive import write_run

SEEDS = (1, 2, 3)
# per seed: dev accuracies per epoch and the test accuracy, per row
ROWS = {
    "dense": dict(group="main", method="dense", dev=[(0.90, 0.95, 0.97), (0.91, 0.96, 0.98),
                  (0.92, 0.94, 0.99)], test=(0.980, 0.982, 0.987)),  # fmt: skip
    "meProp per_example k=20": dict(group="main", method="meprop", mode="per_example", k=20,
                                    dev=[(0.80, 0.90, 0.95)] * 3, test=(0.970, 0.974, 0.972)),
    "meProp unified k=20": dict(group="main", method="meprop", mode="unified", k=20,
                                dev=[(0.85, 0.90, 0.96)] * 3, test=(0.975, 0.977, 0.973)),
    "meProp per_example k=40": dict(group="ratio", method="meprop", mode="per_example", k=40,
                                    dev=[(0.85, 0.91, 0.96)] * 3, test=(0.976, 0.979, 0.979)),
    "meProp unified k=40": dict(group="ratio", method="meprop", mode="unified", k=40,
                                dev=[(0.85, 0.92, 0.96)] * 3, test=(0.978, 0.980, 0.976)),
    "random-k k=20": dict(group="control", method="random", k=20, dev=[(0.50, 0.60, 0.70),
                          (0.40, 0.62, 0.72), (0.45, 0.61, 0.74)], test=(0.7, 0.72, 0.74)),
    "k-dim net k=20": dict(group="control", method="kdim", k=20, dev=[(0.6, 0.7, 0.8)] * 3,
                           test=(0.8, 0.81, 0.82)),
    "meSimp k=20": dict(group="mesimp", method="mesimp", k=20, dev=[(0.9, 0.95, 0.97)] * 3,
                        test=(0.979, 0.981, 0.983)),
}  # fmt: skip
# meSimp's widths per epoch and seed: module "0" (hidden layer 1) and "3" (hidden layer 2)
WIDTHS = {1: [(90, 80), (60, 70), (50, 60)], 2: [(95, 85), (70, 75), (40, 50)],
          3: [(85, 80), (65, 70), (45, 70)]}  # fmt: skip


def write_grid(root: Path) -> None:
    for label, spec in ROWS.items():
        spec = dict(spec)
        dev, test = spec.pop("dev"), spec.pop("test")
        name = label.replace(" ", "-").replace("=", "")
        if label == "meSimp k=20":
            name = "mesimp-k20"
        for s in SEEDS:
            tag = "" if s == 1 else f"-s{s}"
            d = write_run(root, f"{name}{tag}", label=label, seed=s, dev=dev[s - 1],
                          train=(1, 2, 3), test=test[s - 1], **spec)  # fmt: skip
            if spec["method"] == "mesimp":
                summary = json.loads((d / "summary.json").read_text())
                summary["final_widths"] = dict(zip(("0", "3"), WIDTHS[s][-1], strict=True))
                (d / "summary.json").write_text(json.dumps(summary))
                log = [json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()]
                log = [{**e, "widths": dict(zip(("0", "3"), w, strict=True))}
                       for e, w in zip(log, WIDTHS[s], strict=True)]  # fmt: skip
                (d / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))
    for s in SEEDS:  # the dense control at meSimp's final widths
        tag = "" if s == 1 else f"-s{s}"
        write_run(root, f"dense-size-of-mesimp-k20{tag}", group="mesimp",
                  label="dense at the widths of meSimp k=20", seed=s, method="dense",
                  dev=(0.9, 0.93, 0.96), train=(1, 2, 3), test=0.97 + s / 1000)  # fmt: skip


@pytest.fixture
def drawn(tmp_path, monkeypatch):
    """Build the report, recording what each plot draws: name -> lines (label -> x, y),
    error-bar series (label, x, y), legend texts and whether the legend is off the axes."""
    runs = tmp_path / "runs"
    write_grid(runs)
    seen = {}
    save = plots.save

    def record(fig, out, name):
        fig.canvas.draw()
        ax = fig.axes[0]
        legend = ax.get_legend()
        seen[name] = dict(
            lines={ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines},
            bars=[
                (c.get_label(), list(c.lines[0].get_xdata()), list(c.lines[0].get_ydata()))
                for c in ax.containers
            ],
            legend=[t.get_text() for t in legend.get_texts()] if legend else [],
            outside=legend is None or legend.get_window_extent().x0 >= ax.get_window_extent().x1,
        )
        save(fig, out, name)

    monkeypatch.setattr(plots, "save", record)
    report = build_report(sorted(runs.iterdir()), tmp_path / "out")
    return report, seen


def mean(values):
    return sum(values) / len(values)


def test_numbers_drawn():
    class R:
        def __init__(self, seed, ys):
            self.seed = seed
            self.log = [{"epoch": i + 1, "v": y} for i, y in enumerate(ys) if y is not None]

    # epoch 2 is missing from seed 2's log: a point needs every seed
    pts = over_seeds([R(1, [1.0, 2.0, 3.0]), R(2, [3.0, None, 5.0])], lambda e: e["v"])
    assert [(p.x, p.mean, p.lo, p.hi, p.n) for p in pts] == [(1, 2.0, 1.0, 3.0, 2),
                                                             (3, 4.0, 3.0, 5.0, 2)]  # fmt: skip
    damaged = R(3, [1.0, 1.0, 1.0])
    damaged.log[1] = {"v": 9.0}  # a damaged line: no epoch, left out (epoch 2 then has no point)
    pts = over_seeds([R(1, [1.0, 2.0, 3.0]), damaged], lambda e: e.get("v"))
    assert [(p.x, p.mean) for p in pts] == [(1, 1.0), (3, 2.0)]
    assert [(p.x, p.mean) for p in per_x([(8, 1.0), (4, 2.0), (8, 3.0)])] == [(4, 2.0), (8, 2.0)]
    assert seeds_text([R(3, []), R(1, []), R(2, [])]) == "seeds 1-3"
    assert seeds_text([R(1, []), R(3, [])]) == "seeds 1, 3"
    assert seeds_text([R(2, [])]) == "seed 2"
    assert layer_name("3", 1) == "hidden layer 2"
    assert layer_name("blocks.0.mlp.fc", 0) == "block 1 mlp.fc"


def test_every_plot_is_made_and_referenced(drawn):
    report, seen = drawn
    names = {"accuracy_vs_ratio.png", "topk_vs_random.png", "meprop_vs_kdim.png",
             "learning_curves.png", "mesimp_widths.png", "mesimp_vs_size.png"}  # fmt: skip
    assert set(seen) == names
    text = report.read_text()
    for name in names:
        assert (report.parent / name).stat().st_size > 5000
        assert f"![{name}]({name})" in text
    assert all(s["outside"] for s in seen.values())


def test_ratio_plot_draws_means_per_k_and_dense_as_its_mean(drawn):
    _, seen = drawn
    plot = seen["accuracy_vs_ratio.png"]
    for mode in ("per_example", "unified"):
        ((xs, ys),) = [
            (x, y) for label, x, y in plot["bars"] if label == f"meProp {mode} (seeds 1-3)"
        ]
        want = [100 * mean(ROWS[f"meProp {mode} k={k}"]["test"]) for k in (20, 40)]
        assert ys == pytest.approx(want)
        assert xs[0] < xs[1] and 15 < xs[0] < 25 and 35 < xs[1] < 45  # k/h = 20%, 40%
    _, dense = plot["lines"]["dense (seeds 1-3)"]
    assert dense[0] == pytest.approx(100 * mean(ROWS["dense"]["test"]))
    assert len(plot["legend"]) == 3  # one entry per row, not per seed


def test_dev_curves_are_means_over_seeds(drawn):
    _, seen = drawn
    plot = seen["topk_vs_random.png"]
    xs, ys = plot["lines"]["random-k k=20 (seeds 1-3)"]
    dev = ROWS["random-k k=20"]["dev"]
    assert xs == [1.0, 2.0, 3.0]
    assert ys == pytest.approx([100 * mean([d[i] for d in dev]) for i in range(3)])
    _, dense = plot["lines"]["dense (seeds 1-3)"]
    assert dense == pytest.approx(
        [100 * mean([d[i] for d in ROWS["dense"]["dev"]]) for i in range(3)]
    )
    assert plot["legend"] == [
        "dense (seeds 1-3)",
        "meProp per_example k=20 (seeds 1-3)",
        "meProp unified k=20 (seeds 1-3)",
        "random-k k=20 (seeds 1-3)",
    ]
    assert "k-dim net k=20 (seeds 1-3)" in seen["meprop_vs_kdim.png"]["legend"]
    assert seen["learning_curves.png"]["legend"] == [
        "dense (seeds 1-3)",
        "meProp unified k=20 (seeds 1-3)",
        "meProp per_example k=20 (seeds 1-3)",
        "train",
        "dev",
    ]


def test_mesimp_plots_one_entry_per_row_layers_by_position(drawn):
    _, seen = drawn
    widths = seen["mesimp_widths.png"]
    assert widths["legend"] == ["meSimp k=20 (seeds 1-3)", "hidden layer 1", "hidden layer 2"]
    first = [line for line in widths["lines"].values() if line[0] == [1.0, 2.0, 3.0]]
    layer1 = [mean([WIDTHS[s][i][0] for s in SEEDS]) for i in range(3)]
    layer2 = [mean([WIDTHS[s][i][1] for s in SEEDS]) for i in range(3)]
    assert [ys for _, ys in first] == [pytest.approx(layer1), pytest.approx(layer2)]
    size = seen["mesimp_vs_size.png"]
    got = sorted(xs[0] for _, xs, _ in size["bars"])  # horizontal bars: x is the mean
    want = sorted(
        [100 * mean(ROWS[r]["test"]) for r in ("dense", "meSimp k=20")]
        + [100 * mean([0.97 + s / 1000 for s in SEEDS])]
    )
    assert got == pytest.approx(want)  # one mark per row: the mean over its seeds


def test_loaded_runs_have_three_seeds(tmp_path):
    write_grid(tmp_path / "runs")
    runs = load_runs([tmp_path])
    assert len(runs) == 3 * (len(ROWS) + 1)


def test_claims_pair_unified_with_random_k_and_per_example(tmp_path):
    """The unified row against random-k and against per_example, on the seeds both have."""
    from meprop.experiments.report import claims

    write_grid(tmp_path / "runs")
    rows = {c: p for c, p, _ in claims(load_runs([tmp_path]))}
    uni, rand = ROWS["meProp unified k=20"]["test"], ROWS["random-k k=20"]["test"]
    got = rows["unified top-k > random-k (k=20)"]
    assert got.n == 3
    assert got.mean == pytest.approx(100 * mean([u - r for u, r in zip(uni, rand, strict=True)]))
    # and against per_example (the paper's POS table compares the two selections)
    pe = ROWS["meProp per_example k=20"]["test"]
    got = rows["meProp unified k=20 >= per_example k=20"]
    assert got.n == 3
    assert got.mean == pytest.approx(100 * mean([u - p for u, p in zip(uni, pe, strict=True)]))


def test_mesimp_claim_names_the_scored_checkpoints_width(tmp_path):
    """The share of the width is the scored (best dev) checkpoint's, with the final one beside
    it where they differ."""
    from meprop.experiments.report import claims

    write_grid(tmp_path / "runs")
    for d in (tmp_path / "runs").glob("mesimp-k20*"):
        summary = json.loads((d / "summary.json").read_text())
        summary["best_widths"] = [80, 90]  # 85% of 100; the final widths are 45-60%
        (d / "summary.json").write_text(json.dumps(summary))
    names = [c for c, _, _ in claims(load_runs([tmp_path]))]
    final = round(mean([sum(WIDTHS[s][-1]) / 2 for s in SEEDS]))
    want = (
        f"meSimp k=20 >= dense, at 85% (the scored checkpoints; {final}% at the end) of the width"
    )
    assert want in names
