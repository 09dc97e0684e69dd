"""The lm task: byte streams from the treebank's '# text' lines, the transformer LM, meProp on its
MLP projections, and `meprop train lm` end to end on a tiny fixture (tests/data/lm)."""

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from meprop import converted
from meprop.cli import main
from meprop.tasks.lm import ByteLM, LmTask, read_texts, to_stream
from meprop.train import TrainConfig

FIXTURE = Path(__file__).parent / "data" / "lm"
TINY = ["--epochs", "2", "--batch-size", "4", "--hidden", "32", "--layers", "2", "--no-progress"]


@pytest.fixture
def tiny_lm(tmp_path, monkeypatch):
    """A data root whose ``ud_english_ewt/`` holds the fixture's train (80 sentences), dev and
    test (20 each), with checksums registered."""
    from meprop.data import DATASETS
    from meprop.data.download import Dataset, RemoteFile

    folder = tmp_path / "data" / "ud_english_ewt"
    folder.mkdir(parents=True)
    files = {}
    for src in FIXTURE.glob("*.conllu"):
        shutil.copy(src, folder / src.name)
        blob = src.read_bytes()
        files[src.name] = RemoteFile(hashlib.sha256(blob).hexdigest(), len(blob))
    monkeypatch.setitem(
        DATASETS, "ud_english_ewt", Dataset("ud_english_ewt", "http://127.0.0.1:9/", files)
    )
    return folder.parent


def test_texts_become_one_byte_stream_per_split(tiny_lm):
    texts = read_texts(FIXTURE / "en_ewt-ud-dev.conllu")
    assert len(texts) == 20 and texts[0] == "The shop made two books today."
    stream = to_stream(["héllo", "a"])
    assert bytes(stream.tolist()) == "héllo\na\n".encode()
    task = LmTask(TrainConfig(task="lm", hidden=(32,), train_limit=10), tiny_lm)
    assert len(task.streams["train"]) == len(
        to_stream(read_texts(tiny_lm / "ud_english_ewt" / "en_ewt-ud-train.conllu")[:10])
    )


def test_batches_are_next_byte_windows(tiny_lm):
    task = LmTask(TrainConfig(task="lm", hidden=(32,)), tiny_lm)
    stream, t = task.streams["train"], task.block
    batches = list(task.batches("train", 3, torch.Generator().manual_seed(0)))
    assert sum(len(x) for x, _ in batches) == task.num_examples("train")
    assert len(batches) == task.steps_per_epoch(3)
    for x, y in batches:
        assert x.shape[1] == t and torch.equal(x[:, 1:], y[:, :-1])
    # windows do not overlap: every byte of an epoch at most once
    firsts = sorted(
        int(torch.nonzero(torch.all(stream.unfold(0, t, 1) == x[0], 1))[0]) for x, _ in batches
    )
    assert all(b - a >= t for a, b in zip(firsts, firsts[1:], strict=False))


def test_untrained_model_scores_about_eight_bits_per_byte(tiny_lm):
    cfg = TrainConfig(task="lm", hidden=(32,), layers=2)
    task = LmTask(cfg, tiny_lm)
    torch.manual_seed(0)
    model = task.build_model(cfg.widths(), cfg)
    scores = task.evaluate(model, "dev")
    assert 7.0 < scores["bpb"] < 9.5 and scores["neg_bpb"] == -scores["bpb"]
    assert math.isclose(scores["loss"], scores["bpb"] * math.log(2))


def test_meprop_on_the_mlp_projections_only(tiny_lm):
    cfg = TrainConfig(task="lm", hidden=(32,), layers=2, k=4)
    task = LmTask(cfg, tiny_lm)
    model = task.build_model(cfg.widths(), cfg)
    from meprop import sparsify_

    sparsify_(model, cfg.meprop_config(), filter_fn=task.sparsify_filter(model))
    assert sorted(converted(model)) == [
        f"blocks.{i}.mlp.{p}" for i in (0, 1) for p in ("fc", "proj")
    ]
    task.sparse_attention = True
    sparsify_(model, cfg.meprop_config(), filter_fn=task.sparsify_filter(model))
    assert len(converted(model)) == 8
    x, y = next(task.batches("train", 4, torch.Generator().manual_seed(0)))
    task.loss(model, (x, y)).backward()
    fc = model.blocks[0].mlp.fc
    # meProp: each (byte, window) row of the MLP's output gradient keeps 4 of 32 entries
    assert int((fc.weight.grad != 0).any(1).sum()) <= 32 and fc.weight.grad.abs().sum() > 0
    assert isinstance(model, ByteLM)


def test_activation_other_than_gelu_is_refused(tiny_lm):
    with pytest.raises(ValueError, match="fixed GELU activation"):
        LmTask(TrainConfig(task="lm", activation="relu"), tiny_lm)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("dense", []),
        ("meprop", ["--mode", "unified"]),
        ("random", []),
        ("mesimp", ["--prune-interval", "2"]),
    ],
)
def test_train_each_method(tiny_lm, tmp_path, method, extra):
    out = tmp_path / "run"
    args = ["train", "lm", "--data-dir", str(tiny_lm), "--out", str(out), *TINY, "--k", "4"]
    assert main([*args, "--method", method, *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "neg_bpb"
    assert 0 < -summary["dev_neg_bpb"] < 8.5  # learnt something in 2 tiny epochs
    if method == "mesimp":
        assert min(summary["final_widths"].values()) < 32


def test_mesimp_run_resumes_with_its_pruned_widths(tiny_lm, tmp_path):
    out = tmp_path / "run"
    args = ["train", "lm", "--data-dir", str(tiny_lm), "--out", str(out), *TINY[2:], "--k", "4"]
    args += ["--method", "mesimp", "--prune-interval", "2"]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2", "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_epoch"] > 0 and min(summary["final_widths"].values()) < 32
