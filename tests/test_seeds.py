"""Rows over several seeds: summaries, paired claims, and reproduce --seeds end to end."""

import json
import math
from dataclasses import replace

import pytest

from meprop.experiments.cli import main
from meprop.experiments.stats import T975, paired, summarize


def test_summarize():
    s = summarize([98.0, 98.4, 98.2])
    assert math.isclose(s.mean, 98.2) and math.isclose(s.sd, 0.2)
    assert (s.lo, s.hi, s.n) == (98.0, 98.4, 3)
    assert str(s) == "98.20 ± 0.20"
    one = summarize([97.5])
    assert one.sd == 0.0 and str(one) == "97.50"
    with pytest.raises(ValueError, match="at least one value"):
        summarize([])


def test_paired_verdicts():
    better = paired({1: 98.5, 2: 98.6, 3: 98.4}, {1: 98.0, 2: 98.2, 3: 98.1})
    assert better.verdict == "holds" and better.lo > 0
    # the same values the other way round
    worse = paired({1: 98.0, 2: 98.2, 3: 98.1}, {1: 98.5, 2: 98.6, 3: 98.4})
    assert worse.verdict == "does not hold" and worse.hi < 0
    mixed = paired({1: 98.5, 2: 97.9, 3: 98.3}, {1: 98.0, 2: 98.4, 3: 98.1})
    assert mixed.verdict == "undecided" and mixed.lo < 0 < mixed.hi
    # the interval is the t-interval of the differences: mean 0.3, sd 0.1, n 3
    d = paired({1: 1.2, 2: 1.3, 3: 1.4}, {1: 1.0, 2: 1.0, 3: 1.0})
    half = T975[2] * 0.1 / math.sqrt(3)
    assert math.isclose(d.lo, 0.3 - half) and math.isclose(d.hi, 0.3 + half)
    # only the shared seeds are paired; none shared: no comparison
    assert paired({1: 1.0, 2: 2.0}, {2: 1.0, 3: 5.0}).n == 1
    assert paired({1: 1.0, 2: 2.0}, {2: 1.0, 3: 5.0}).verdict == "undecided (one seed)"
    assert paired({1: 1.0}, {2: 1.0}) is None


def test_with_seeds_names_and_groups():
    from meprop.experiments import reproduce

    rows = reproduce.mnist_grid(quick=True)
    seeded = reproduce.with_seeds(rows, [1, 2, 3], ["main"])
    main_rows = [r for r in rows if r.group == "main"]
    assert len(seeded) == len(rows) + 2 * len(main_rows)
    names = [r.name for r in seeded]
    assert len(set(names)) == len(names)
    dense = [r for r in seeded if r.group == "main" and r.config.method == "dense"]
    assert [r.config.seed for r in dense] == [1, 2, 3]
    assert dense[0].name == main_rows[0].name  # seed 1 keeps the name: old runs are reused
    assert dense[1].name == f"{main_rows[0].name}-s2"


def test_reproduce_with_seeds_reports_means_and_claims(tiny_mnist, tmp_path, monkeypatch):
    from meprop.experiments import reproduce

    small = dict(epochs=1, batch_size=20, hidden=(24,))
    full_grid = reproduce.mnist_grid

    def grid(quick, dataset):
        rows = full_grid(quick=True, dataset=dataset)
        keep = [r for r in rows if r.group == "main"][:2]  # dense, meProp per_example k=20
        keep += [r for r in rows if r.config.method == "random"]
        return [replace(r, config=replace(r.config, **small, train_limit=0)) for r in keep]

    monkeypatch.setitem(reproduce.GRIDS, "mnist", grid)
    out = tmp_path / "results"
    args = ["reproduce", "mnist", "--quick", "--out", str(out), "--data-dir", str(tiny_mnist)]
    assert main([*args, "--seeds", "1,2", "--seed-groups", "main", "--no-progress"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 5 and sum(r.endswith("-s2") for r in runs) == 2
    info = json.loads((out / "runs" / runs[0] / "row.json").read_text())
    assert {"seed", "machine", "torch", "meprop", "commit"} <= set(info)
    assert json.loads((out / "grid.json").read_text())["seconds"] > 0
    report = (out / "report.md").read_text()
    assert "seeds 1,2" in report and info["machine"] in report and "grid time " in report
    assert "| dense | 2 |" in report  # two seeds in the dense row
    assert "| random-k k=20 | 1 |" in report
    assert "## The paper's claims, paired over seeds" in report
    claims = [line for line in report.splitlines() if line.startswith("| meProp per_example")]
    assert any(">= dense" in line and "| 2 |" in line for line in claims)
    # top-k vs random-k shares only seed 1: one pair, undecided
    assert "| top-k > random-k (k=20) |" in report and "one seed" in report


def test_grid_seconds_add_up_across_processes(tmp_path):
    from meprop.experiments.reproduce import add_grid_seconds

    path = tmp_path / "out" / "grid.json"
    add_grid_seconds(path, 5.0)
    add_grid_seconds(path, 2.5)
    # another process adds its 10 s between this one's writes: both are kept
    path.write_text(json.dumps({"seconds": json.loads(path.read_text())["seconds"] + 10}))
    add_grid_seconds(path, 1.0)
    assert json.loads(path.read_text()) == {"seconds": 18.5}
    assert [p.name for p in path.parent.iterdir()] == ["grid.json"]  # no temporary left


def test_reproduce_rejects_bad_seeds(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "mnist", "--seeds", "one,two"])
    assert e.value.code == 2
    assert "expected comma-separated integers, got 'one,two'" in capsys.readouterr().err


def test_reproduce_groups_filter(capsys):
    assert_exit = pytest.raises(SystemExit)
    with assert_exit as e:
        main(["reproduce", "mnist", "--groups", "main,nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--groups nope: no such group" in err and "main" in err


def test_reproduce_epochs_must_be_positive_and_is_not_for_tta(capsys):
    for argv, words in (
        (["reproduce", "pos", "--epochs", "0"], "expected a positive integer, got '0'"),
        (["reproduce", "tta", "--epochs", "5"], "the tta groups set each recipe's epochs"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_reproduce_rows_filter(capsys, monkeypatch):
    from meprop.experiments import reproduce

    seen = []
    monkeypatch.setattr(reproduce, "run_grid", lambda rows, out, **kw: seen.extend(rows) or [])
    monkeypatch.setattr(
        "meprop.experiments.report.build_report", lambda dirs, out: out / "report.md"
    )
    assert main(["reproduce", "mnist", "--groups", "ratio", "--rows", "k=40,k=80"]) == 0
    assert "4 runs, about" in capsys.readouterr().out  # no meSimp row: no size control
    assert sorted(r.label for r in seen) == [
        "meProp per_example k=40",
        "meProp per_example k=80",
        "meProp unified k=40",
        "meProp unified k=80",
    ]
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "mnist", "--rows", "k=999"])
    assert e.value.code == 2
    assert "--rows k=999: matches no row label" in capsys.readouterr().err
    # a whole label with a comma selects that row alone (split, " mlp.fc only" would match
    # every mlp.fc-only row)
    seen.clear()
    label = "meSimp unified k=16 (1/8), mlp.fc only"
    assert main(["reproduce", "lm", "--quick", "--rows", label]) == 0
    assert [r.label for r in seen] == [label]
    assert "1 runs (+1 dense size control per meSimp run)" in capsys.readouterr().out
    seen.clear()
    assert main(["reproduce", "lm", "--quick", "--rows", "k=32 (1/4), mlp.fc"]) == 0
    assert sorted(r.label for r in seen) == [
        "meProp unified k=16 (1/8), mlp.fc only",
        "meProp unified k=32 (1/4)",
        "meSimp unified k=16 (1/8), mlp.fc only",
        "meSimp unified k=32 (1/4), mlp.fc only",
        "meSimp unified k=64 (1/2), mlp.fc only",
    ]
