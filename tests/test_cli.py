"""The command line: help, and each command end to end on tiny settings."""

import pytest

from meprop.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "demo" in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: meprop" in capsys.readouterr().out


def test_demo_runs(capsys):
    args = ["demo", "--steps", "5", "--examples", "200", "--hidden", "32", "--input", "16"]
    assert main(args + ["--k", "4"]) == 0
    out = capsys.readouterr().out
    assert "dense: loss" in out and "meprop k=4: loss" in out
    assert "backward time ratio (dense / meProp)" in out


def test_demo_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        main(["demo", "--steps", "1", "--examples", "10", "--hidden", "8", "--k", "0"])
