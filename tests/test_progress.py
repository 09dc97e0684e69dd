"""Progress display: bars on a terminal, one line per epoch in a file or a pipe."""

import io

from meprop.experiments.cli import main
from meprop.experiments.progress import bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal():
    assert bars(True, Terminal())
    assert not bars(False, Terminal())  # --no-progress
    assert not bars(True, io.StringIO())  # a file or a pipe
    assert not bars(True, object())  # a stream that cannot say


def train(tiny_mnist, out):
    args = ["train", "mnist", "--epochs", "2", "--hidden", "16", "--batch-size", "50"]
    return main(args + ["--data-dir", str(tiny_mnist), "--out", str(out)])


def test_training_into_a_file_writes_epoch_lines_not_frames(tiny_mnist, tmp_path, capsys):
    assert train(tiny_mnist, tmp_path / "a") == 0
    got = capsys.readouterr()
    assert "\r" not in got.err and "\r" not in got.out  # no bar frames (stderr is captured)
    lines = [x for x in got.out.splitlines() if x.startswith("epoch")]
    assert len(lines) == 2, got.out  # one line per epoch


def test_training_on_a_terminal_draws_bars(tiny_mnist, tmp_path, capsys, monkeypatch):
    import meprop.experiments.train

    monkeypatch.setattr(
        meprop.experiments.train, "bars", lambda progress: progress
    )  # as on a terminal
    assert train(tiny_mnist, tmp_path / "b") == 0
    assert "\r" in capsys.readouterr().err
