"""The command line: help, and the demo end to end on a tiny MNIST."""

import pytest

from meprop.experiments.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "reproduce", "report", "demo"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: meprop" in capsys.readouterr().out


def test_train_help_is_derived_from_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "mnist", "--help"])
    out = capsys.readouterr().out
    for flag in ("--method", "--k", "--prune-rate", "--cycle", "--resume", "--data-dir"):
        assert flag in out


def test_train_flags_take_help_and_choices_from_the_fields():
    from dataclasses import fields

    from meprop import MePropConfig
    from meprop.config import BACKENDS, OLD_BACKEND_NAMES
    from meprop.experiments.cli import build_parser
    from meprop.experiments.train import METHODS, TrainConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions = {a.dest: a for a in sub.choices["train"]._actions}
    for f in fields(TrainConfig):
        if f.name == "task":
            continue
        action = actions[f.name]  # one flag per field
        assert action.choices == f.metadata.get("choices"), f.name
        assert action.help.startswith(f.metadata.get("help", f.name.replace("_", " "))), f.name
    assert actions["method"].choices == METHODS and actions["backend"].choices == (
        *BACKENDS,
        *OLD_BACKEND_NAMES,
    )
    # the meProp settings' help is MePropConfig's own
    backend = next(f for f in fields(MePropConfig) if f.name == "backend")
    assert actions["backend"].help.startswith(backend.metadata["help"])
    # the library's selection modes, one vocabulary (--mode random: the run --method random is)
    assert set(actions["mode"].choices) == {
        "per_example",
        "unified",
        "symmetric",
        "random",
        "per_position",
    }


def test_demo_runs(tiny_mnist, tmp_path, capsys):
    args = ["demo", "--epochs", "1", "--k", "4", "--data-dir", str(tiny_mnist)]
    assert main(args + ["--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "dense  test accuracy" in out and "meProp test accuracy" in out
    assert "whole backward time ratio (dense / meProp)" in out
    assert "training step (forward, backward, optimizer) time ratio" in out
    assert "machine: " in out and "meProp backward implementations" in out
    assert "time to dense's accuracy" in out and "dense's best - 0.2 point" in out
    assert (tmp_path / "runs" / "meprop" / "summary.json").exists()
    assert (tmp_path / "report.md").exists()


def test_demo_runs_the_measured_recipe_unless_told_otherwise():
    from argparse import Namespace

    from meprop.experiments import demo
    from meprop.experiments.tasks import RECIPES

    none = Namespace(k=None, mode=None, memory=None)
    assert demo.demo_recipe(none) == RECIPES["mnist"]
    assert demo.recipe_label(demo.demo_recipe(none)) == "meProp unified k=160, LazyAdam"
    paper = demo.demo_recipe(Namespace(k=None, mode=None, memory=0.8))
    assert paper == {"k": 20, "mode": "per_example", "memory": 0.8}
    assert demo.recipe_label(paper) == "meProp per_example k=20, memory 0.8"


def test_bad_flag_values_are_reported(tiny_mnist, tmp_path, capsys):
    args = ["train", "mnist", "--out", str(tmp_path), "--data-dir", str(tiny_mnist)]
    assert main([*args, "--k", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "meprop train: error: k must be >= 1, got 0\n"  # one line, no traceback
    with pytest.raises(SystemExit) as e:
        main(["train", "mnist", "--method", "nonsense"])
    assert e.value.code == 2


def test_demo_ratios_and_why_not_faster():
    from meprop.experiments import demo

    dense = dict(forward=2.0, backward=4.0, linear_backward=3.0, optimizer=1.0)
    fast = dict(forward=2.0, backward=1.0, linear_backward=0.5, optimizer=1.0)
    lines = demo.ratio_lines(dense, fast)
    assert lines[0] == "whole backward time ratio (dense / meProp): 4.00x (4.0 s / 1.0 s)"
    assert lines[1].startswith("linear-map backward time ratio (dense / meProp): 6.00x")
    assert lines[2].startswith("training step (forward, backward, optimizer) time ratio") and (
        "1.75x (7.0 s / 4.0 s)" in lines[2]
    )
    assert len(lines) == 3  # no hidden_backward in these logs
    assert demo.why_not_faster(dense, fast, "AVX2") is None
    why = demo.why_not_faster(fast, dense, "AVX2")
    assert why.startswith("meProp's backward was not faster here: CPU SIMD level AVX2")
    lines = demo.backend_lines("unified")
    assert lines and any("kernels" in x for x in lines)


def test_missing_paths_are_one_line_in_every_command(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meprop report: error: ") and "nothing" in err and "Traceback" not in err
    (tmp_path / "file").write_text("x")
    assert main(["reproduce", "mnist", "--quick", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Not a directory" in err and str(tmp_path / "file") in err


def test_meprop_without_k_runs_the_measured_recipe(tiny_mnist, tmp_path):
    """`meprop train mnist --method meprop` with none of --k/--mode/--memory: the recipe the
    time-to-accuracy grid chose (meprop.experiments.tasks.RECIPES); any of them given: the flags alone."""
    import json

    from meprop.experiments.tasks import RECIPES

    base = ["train", "mnist", "--data-dir", str(tiny_mnist), "--epochs", "1", "--hidden", "64",
            "--batch-size", "40", "--no-progress"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a"), "--method", "meprop"]) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert {k: cfg[k] for k in RECIPES["mnist"]} == RECIPES["mnist"]
    assert main([*base, "--out", str(tmp_path / "b"), "--method", "meprop", "--k", "8"]) == 0
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (cfg["k"], cfg["mode"], cfg["memory"]) == (8, "per_example", 0.0)
    assert main([*base, "--out", str(tmp_path / "c")]) == 0  # method not named: the fields'
    assert json.loads((tmp_path / "c" / "config.json").read_text())["memory"] == 0.0


def test_mode_random_is_the_random_k_method(tiny_mnist, tmp_path, capsys):
    """One word for random-k: the library's ``mode="random"`` given as ``--mode random`` is the
    run ``--method random`` is (the same config.json, so the same run folder and rows)."""
    import json

    base = ["train", "mnist", "--data-dir", str(tiny_mnist), "--epochs", "1", "--hidden", "64",
            "--batch-size", "40", "--k", "8", "--no-progress"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "a"), "--method", "random"]) == 0
    assert (
        main([*base, "--out", str(tmp_path / "b"), "--method", "meprop", "--mode", "random"]) == 0
    )
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert a == b and (a["method"], a["mode"]) == ("random", "per_example")
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "c"), "--method", "dense", "--mode", "random"]) == 2
    assert "--mode random is random-k selection in meProp's layers" in capsys.readouterr().err
