"""The POS-tagging task: vocabulary and unknown words, the tagger end to end on a toy treebank,
meSimp on its bi-LSTM, and checkpoints of a simplified tagger."""

import json

import pytest
import torch

import meprop
from meprop.experiments.cli import main
from meprop.experiments.tasks.pos import (
    CASES,
    IGNORE,
    SHAPES,
    BiLSTMTagger,
    PosTask,
    case_class,
    shape_class,
    word_key,
)
from meprop.experiments.train import TrainConfig

TINY = ["--epochs", "2", "--batch-size", "8", "--hidden", "16", "--no-progress"]


def train(root, out, *extra):
    return main(["train", "pos", "--data-dir", str(root), "--out", str(out), *TINY, *extra])


@pytest.mark.parametrize(
    "word,expected",
    [
        ("1999", "<unk:num>"),
        ("--", "<unk:punct>"),
        ("Zanzibar", "<unk:cap>"),
        ("blorping", "<unk:-ing>"),
        ("blorped", "<unk:-ed>"),
        ("blorply", "<unk:-ly>"),
        ("blorps", "<unk:-s>"),
        ("blorp-ish", "<unk:hyphen>"),
        ("blorp", "<unk>"),
    ],
)
def test_unknown_word_classes(word, expected):
    assert shape_class(word) == expected
    assert expected == "<unk>" or expected in SHAPES


@pytest.mark.parametrize(
    "word,case",
    [
        ("dog", "lower"),
        ("--", "lower"),
        ("Dog", "Capitalised"),
        ("NASA", "UPPER"),
        ("iPhone", "mIxed"),
        ("A", "UPPER"),
    ],
)
def test_case_classes(word, case):
    assert CASES[case_class(word)] == case


def test_vocabulary_and_encoding(tiny_ewt):
    task = PosTask(TrainConfig(task="pos", hidden=(8,)), tiny_ewt)
    assert task.vocab[:2] == ["<pad>", "<unk>"]
    assert task.tagset == [".", "DT", "JJ", "NN", "VBZ"]  # XPOS by default
    tokens, tags = task.splits["dev"][0]
    assert tokens.shape == (len(tags), 3) and tokens.dtype == torch.int64
    # a word never seen in training maps to its shape class (and keeps its suffix and casing);
    # a tag never seen in training is ignored
    sentence = type("S", (), {"forms": ["The", "GLORPS", "7"], "xpos": ["DT", "NN", "CD"]})
    w, t = task._encode(sentence)
    assert w[:, 0].tolist() == [
        task.word_index[word_key("The")],
        task.word_index["<unk:cap>"],
        task.word_index["<unk:num>"],
    ]
    # every toy word ends in its own three letters: no suffix is shared by two words
    assert task.suffixes == ["<pad>", "<unk>"] and w[:, 1].tolist() == [1, 1, 1]
    assert [CASES[c] for c in w[:, 2].tolist()] == ["Capitalised", "UPPER", "lower"]
    assert t.tolist() == [task.tag_index["DT"], task.tag_index["NN"], IGNORE]
    upos = PosTask(TrainConfig(task="pos", hidden=(8,), tags="upos"), tiny_ewt)
    assert upos.tagset == ["ADJ", "DET", "NOUN", "PUNCT", "VERB"]


def test_bad_settings_are_reported(tiny_ewt):
    with pytest.raises(ValueError, match="tags must be 'xpos' or 'upos', got 'ptb'"):
        TrainConfig(task="pos", tags="ptb")
    with pytest.raises(ValueError, match="fixed tanh activation"):
        PosTask(TrainConfig(task="pos", activation="relu"), tiny_ewt)
    with pytest.raises(ValueError, match="share one width"):
        PosTask(TrainConfig(task="pos", hidden=(8, 4)), tiny_ewt)


def test_task_defaults():
    cfg = TrainConfig(task="pos")
    assert (cfg.layers, cfg.batch_size, cfg.activation) == (1, 16, "tanh")
    assert cfg.widths() == [500]
    assert TrainConfig(task="mnist").widths() == [500, 500]


@pytest.mark.parametrize(
    "method,extra",
    [
        ("dense", []),
        ("meprop", ["--k", "4"]),
        ("meprop", ["--k", "4", "--mode", "unified"]),
        ("mesimp", ["--k", "8", "--prune-interval", "3", "--prune-rate", "0.3"]),
    ],
)
def test_train_each_method(tiny_ewt, tmp_path, method, extra):
    out = tmp_path / "run"
    assert train(tiny_ewt, out, "--method", method, *extra) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "accuracy" and 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["steps"] == 16  # 60 sentences / 8 = 8 steps per epoch
    times = summary["times"]
    assert 0 < times["hidden_backward"] <= times["linear_backward"] <= times["backward"]
    if method == "mesimp":
        final = summary["final_widths"]
        assert set(final) == {"lstm.l0", "lstm.l0_reverse"}
        assert max(final.values()) < 16
        # the best checkpoint reloads into a freshly built full-size tagger
        task = PosTask(TrainConfig(task="pos", hidden=(16,)), tiny_ewt)
        model = task.build_model([16], TrainConfig(task="pos", hidden=(16,)))
        meprop.sparsify_(model, meprop.MePropConfig(k=8), filter_fn=task.sparsify_filter(model))
        meprop.load(out / "best.pt", model)
        assert model.widths() == summary["best_widths"]
        assert model.head.in_features == sum(summary["best_widths"])


def test_learns_the_toy_treebank(tiny_ewt, tmp_path):
    out = tmp_path / "run"
    train(tiny_ewt, out, "--method", "meprop", "--k", "8", "--epochs", "6", "--lr", "0.01")
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] > 0.9


def test_simplified_tagger_checkpoint_gives_the_same_outputs(tiny_ewt, tmp_path):
    cfg = TrainConfig(task="pos", hidden=(12,))
    task = PosTask(cfg, tiny_ewt)
    model = task.build_model([12], cfg)
    meprop.sparsify_(model, meprop.MePropConfig(k=4), filter_fn=task.sparsify_filter(model))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = meprop.Simplifier(model, meprop.MeSimpConfig(prune_rate=0.4, interval=4), opt)
    for batch in task.batches("train", 8, torch.Generator().manual_seed(0)):
        task.loss(model, batch).backward()
        simp.optimizer.step()
        simp.optimizer.zero_grad()
        simp.step()
    assert sum(model.widths()) < 24
    path = meprop.save(tmp_path / "tagger.pt", model, opt, simplifier=simp)

    fresh = task.build_model([12], cfg)
    meprop.sparsify_(fresh, meprop.MePropConfig(k=4), filter_fn=task.sparsify_filter(fresh))
    meprop.load(path, fresh)
    assert fresh.widths() == model.widths()
    words, _, lengths = task.collate(task.splits["dev"][:5])
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(words, lengths), fresh(words, lengths))


def test_dense_hidden_of_a_simplified_tagger():
    assert PosTask.dense_hidden({"lstm.l0": 60, "lstm.l0_reverse": 55}) == (58,)


def test_tagger_shapes():
    model = BiLSTMTagger(vocab_size=20, n_tags=5, hidden=6, emb_dim=4, num_layers=2, n_suffixes=5)
    tokens = torch.randint(1, 5, (7, 3, 3))
    scores = model(tokens, torch.tensor([7, 5, 2]))
    assert scores.shape == (7, 3, 5)
    assert model.widths() == [6, 6, 6, 6]
