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
from meprop.experiments.cli import main
from meprop.experiments.tasks.lm import ByteLM, LmTask, read_texts, to_stream
from meprop.experiments.train import ConfigError, TrainConfig

FIXTURE = Path(__file__).parent / "data" / "lm"
TINY = ["--epochs", "2", "--batch-size", "4", "--hidden", "32", "--layers", "2", "--no-progress"]


@pytest.fixture
def tiny_lm(tmp_path, monkeypatch):
    """A data root whose ``ud_english_ewt/`` holds the fixture's train (80 sentences), dev and
    test (20 each), with checksums registered."""
    from meprop.experiments.data import DATASETS
    from meprop.experiments.data.download import Dataset, RemoteFile

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


def test_sparse_attention_flag_puts_meprop_on_the_attention_projections(tiny_lm, tmp_path):
    from meprop import sparsify_
    from meprop.experiments.train import ConfigError

    cfg = TrainConfig(task="lm", hidden=(32,), layers=2, k=4, sparse_attention=True)
    task = LmTask(cfg, tiny_lm)
    model = task.build_model(cfg.widths(), cfg)
    sparsify_(model, cfg.meprop_config(), filter_fn=task.sparsify_filter(model))
    assert sorted(converted(model)) == sorted(
        f"blocks.{i}.{p}" for i in (0, 1) for p in ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")
    )
    assert len(task.hidden_layers(model)) == 8  # timed as hidden_backward
    assert TrainConfig(task="lm").sparse_attention is False
    with pytest.raises(ConfigError, match="lm task only"):
        TrainConfig(task="mnist", sparse_attention=True)
    with pytest.raises(ConfigError, match="needs --method meprop"):
        TrainConfig(task="lm", method="dense", sparse_attention=True)
    with pytest.raises(ConfigError, match="true or false"):
        TrainConfig.from_dict({"task": "lm", "sparse_attention": None})

    out = tmp_path / "run"
    args = ["train", "lm", "--data-dir", str(tiny_lm), "--out", str(out), *TINY[2:], "--k", "4"]
    assert main([*args, "--epochs", "1", "--mode", "unified", "--sparse-attention"]) == 0
    assert json.loads((out / "config.json").read_text())["sparse_attention"] is True
    assert json.loads((out / "summary.json").read_text())["times"]["hidden_backward"] > 0


def test_fc_only_leaves_mlp_proj_dense(tiny_lm, tmp_path):
    from meprop.experiments.train import ConfigError

    cfg = TrainConfig(task="lm", hidden=(32,), layers=2, k=4, mode="unified", fc_only=True)
    task = LmTask(cfg, tiny_lm)
    model = task.build_model(cfg.widths(), cfg)
    from meprop import sparsify_

    sparsify_(model, cfg.meprop_config(), filter_fn=task.sparsify_filter(model))
    assert sorted(converted(model)) == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    # timed as hidden_backward: the same layers as a dense run's (proj dense here)
    assert task.hidden_layers(model) == [m for b in model.blocks for m in (b.mlp.fc, b.mlp.proj)]
    x, y = next(task.batches("train", 4, torch.Generator().manual_seed(0)))
    task.loss(model, (x, y)).backward()
    fc, proj = model.blocks[0].mlp.fc, model.blocks[0].mlp.proj
    # unified: 4 of fc's 32 units get a gradient; proj (dense) gets one in every row
    assert int((fc.weight.grad != 0).any(1).sum()) == 4
    assert bool((proj.weight.grad != 0).any(1).all())
    with pytest.raises(ConfigError, match="needs --task lm and --method"):
        TrainConfig(task="mnist", fc_only=True)
    with pytest.raises(ConfigError, match="needs --task lm and --method"):
        TrainConfig(task="lm", method="dense", fc_only=True)
    with pytest.raises(ConfigError, match="fc_only .--fc-only. must be true, false"):
        TrainConfig(task="lm", method="meprop", fc_only=1)

    # meSimp with mlp.proj dense still shrinks the MLP width (proj's input columns follow)
    out = tmp_path / "run"
    args = ["train", "lm", "--data-dir", str(tiny_lm), "--out", str(out), *TINY, "--k", "4"]
    args += ["--method", "mesimp", "--mode", "unified", "--prune-interval", "2", "--fc-only"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "config.json").read_text())["fc_only"] is True
    assert min(summary["final_widths"].values()) < 32


def test_lm_grid_rows():
    from meprop.experiments.reproduce import GRIDS, PER_RUN, lm_grid

    assert GRIDS["lm"] is lm_grid and len(PER_RUN["lm"]) == 2
    for quick in (True, False):
        rows = lm_grid(quick=quick)
        width = rows[0].config.hidden[0]
        tuning = [r for r in rows if r.group == "tuning"]
        rows = [r for r in rows if r.group != "tuning"]
        got = {
            (r.config.method, r.config.mode, r.config.k, r.config.adaptive, r.config.fc_only)
            for r in rows[1:]
        }
        assert got == {
            ("meprop", "unified", width // 8, "", False),
            ("meprop", "unified", width // 8, "", True),
            ("meprop", "unified", width // 4, "", False),
            ("meprop", "per_example", width // 8, "", False),
            ("random", "per_example", width // 8, "", False),
            ("mesimp", "unified", width // 8, "", False),
            ("mesimp", "unified", width // 8, "", True),
            ("mesimp", "unified", width // 4, "", True),
            ("mesimp", "unified", width // 2, "", True),
            ("meprop", "unified", width // 4, "tinyprop", False),
        }
        assert rows[0].config.method == "dense" and len({r.name for r in rows}) == 11
        assert all(r.config.eval_every > 0 and not r.config.sparse_attention for r in rows)
        # every row at the task's Adam lr; the tuning rows: dense at the others (full grid)
        assert {r.config.lr for r in rows} == {4e-3}
        assert [(r.config.method, r.config.lr) for r in tuning] == (
            [] if quick else [("dense", 1e-3), ("dense", 2e-3), ("dense", 8e-3)]
        )
    quick = lm_grid(quick=True)[0].config
    assert quick.epochs == 1 and quick.train_limit > 0 and quick.hidden[0] <= 128


def test_reproduce_lm_writes_bpb_tables_claims_and_loss_plots(tiny_lm, tmp_path, monkeypatch):
    """`meprop reproduce lm` end to end on the fixture: the quick grid at width 32 (k scaled
    with it), two seeds for the main rows so the claims are paired."""
    from dataclasses import replace

    from meprop.experiments import reproduce

    def grid(quick, dataset):
        rows = reproduce.lm_grid(quick=True, dataset=dataset)
        small = dict(hidden=(32,), epochs=2, batch_size=4, train_limit=0, eval_every=3)
        k = {r.config.k: r.config.k // 4 for r in rows}  # 16, 32 -> 4, 8
        return [
            replace(
                r,
                label=r.label.replace(f"k={r.config.k} ", f"k={k[r.config.k]} "),
                config=replace(r.config, **small, k=k[r.config.k]),
            )
            for r in rows
            # (the adaptive row: tests/test_report_adaptive.py; meSimp on mlp.fc only:
            # test_fc_only_leaves_mlp_proj_dense)
            if not r.config.adaptive and not (r.config.fc_only and r.config.method == "mesimp")
        ]

    monkeypatch.setitem(reproduce.GRIDS, "lm", grid)
    out = tmp_path / "results"
    args = ["reproduce", "lm", "--quick", "--out", str(out), "--data-dir", str(tiny_lm)]
    assert main([*args, "--no-progress", "--seeds", "1,2", "--seed-groups", "main"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    # the meSimp row's size control: a dense model at its final MLP widths, with its d_model
    control = [r for r in runs if r.startswith("dense-size-of-mesimp-")]
    assert len(runs) == 13 and len(control) == 1
    simp = json.loads(
        (out / "runs" / control[0].removeprefix("dense-size-of-") / "summary.json").read_text()
    )
    ctrl = json.loads((out / "runs" / control[0] / "summary.json").read_text())
    assert ctrl["config"]["method"] == "dense" and ctrl["config"]["d_model"] == 8  # 32 / 4
    assert ctrl["widths"] == list(simp["final_widths"].values()) and min(ctrl["widths"]) < 32
    report = (out / "report.md").read_text()
    assert "dev bpb (lower is better) | test bpb (lower is better)" in report
    assert "neg_bpb %" not in report and "training ms/step" in report
    dense = next(line for line in report.splitlines() if line.startswith("| dense | 2 |"))
    bpb = float(dense.split("|")[4].split("±")[0])
    assert 0 < bpb < 8.5  # bits per byte, not a negated percentage
    assert "| meProp unified k=4 (1/8) | 2 |" in report
    assert "| meProp unified k=4 at least as good as dense |" in report
    # the mlp.fc-only row (same k and mode) is its own row and claim, not merged into the above
    assert "| meProp unified k=4 (1/8), mlp.fc only | 2 |" in report
    assert "| meProp unified k=4 on mlp.fc only at least as good as dense |" in report
    assert "positive means the claim's side has the lower bpb" in report
    assert "| meSimp unified k=4 (1/8) better than a dense net trained at its final widths |" in (
        report
    )
    assert "| top-k better than random-k (k=4) |" in report
    assert "windows of" in report and "d_model" in report
    for png in ("dev_bpb_vs_steps.png", "dev_bpb_vs_seconds.png", "mesimp_widths.png"):
        assert (out / png).stat().st_size > 1000 and f"![{png}]" in report
    # the claims: b's bpb minus a's, so positive where the meProp run's bpb is lower
    from meprop.experiments.report import claims, load_runs

    runs = load_runs([out])
    (claim, p, _), *_ = [c for c in claims(runs) if c[0].startswith("meProp unified k=4 ")]
    mp = {r.seed: r.summary["test_bpb"] for r in runs if r.label == "meProp unified k=4 (1/8)"}
    de = {r.seed: r.summary["test_bpb"] for r in runs if r.label == "dense"}
    assert p.n == 2 and math.isclose(p.mean, sum(de[s] - mp[s] for s in (1, 2)) / 2)
    assert claim == "meProp unified k=4 at least as good as dense"


def test_lm_adam_lr_default():
    """The lm task's Adam lr (tasks.ADAM_LR, chosen on dev) fills an unset lr and is saved in
    the config; other optimizers, other tasks and a given lr keep theirs."""
    from meprop.experiments.tasks import ADAM_LR

    assert TrainConfig(task="lm").lr == ADAM_LR["lm"] == 4e-3
    assert TrainConfig(task="lm").learning_rate() == 4e-3
    assert TrainConfig(task="lm", lr=1e-3).learning_rate() == 1e-3
    assert TrainConfig(task="lm", optimizer="sgd").learning_rate() == 0.1
    assert TrainConfig(task="lm", optimizer="adagrad").learning_rate() == 1e-2
    assert TrainConfig(task="mnist").lr == 0 and TrainConfig(task="mnist").learning_rate() == 1e-3


def test_d_model_setting_and_size_control():
    """--d-model sets the transformer width (0: a quarter of the first MLP width); the size
    control of a meSimp run keeps the run's d_model at its shrunk MLP widths."""
    from meprop.experiments.reproduce import Row, _size_control
    from meprop.experiments.tasks.lm import d_model_for

    assert d_model_for(512) == 128 and d_model_for(30) == 4 and d_model_for(8) == 4
    cfg = TrainConfig(task="lm", method="mesimp", k=16, hidden=(128,), layers=2, fc_only=True)
    assert cfg.d_model == 0
    row = Row("mesimp-x", "mesimp", "meSimp x", cfg)
    control = _size_control(row, {"final_widths": {"blocks.0.mlp.fc": 17, "blocks.1.mlp.fc": 20}})
    c = control.config
    assert (c.method, c.hidden, c.d_model, c.fc_only) == ("dense", (17, 20), 32, False)
    assert control.name == "dense-size-of-mesimp-x"
    task = LmTask.__new__(LmTask)
    task.block = 8
    model = task.build_model(c.widths(), c)
    assert model.embed.embedding_dim == 32
    assert [b.mlp.fc.out_features for b in model.blocks] == [17, 20]
    for bad in (6, -4):
        with pytest.raises(ConfigError, match="d_model must be a positive multiple"):
            TrainConfig(task="lm", d_model=bad)
    with pytest.raises(ConfigError, match="d_model is the lm task's"):
        TrainConfig(task="mnist", d_model=16)
