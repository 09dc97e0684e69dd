"""The mnist task's convolutional networks (--model lenet / resnet): their shapes, where meProp
goes and with which k, training through the trainer, and the settings they refuse."""

import json

import pytest
import torch
from torch import nn

from meprop import MePropConfig, SparseConv2d, SparseLinear
from meprop.experiments.bn_stats import recompute_batchnorm
from meprop.experiments.cli import main
from meprop.experiments.rundir import run_identity
from meprop.experiments.tasks import cnn
from meprop.experiments.train import ConfigError, TrainConfig

TINY = ["--epochs", "1", "--batch-size", "20", "--no-progress"]


@pytest.mark.parametrize("model", ["lenet", "resnet"])
def test_cnn_maps_images_to_class_scores(model):
    net = cnn.build_cnn(model, 10, dropout=0.1)
    assert net(torch.randn(3, 784)).shape == (3, 10)


def test_k_is_the_widest_convolutions_and_the_share_everywhere():
    net = cnn.sparsify(cnn.build_cnn("resnet", 10, 0.0), MePropConfig(k=8, mode="unified"))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, SparseConv2d) for m in convs)
    assert {(m.out_channels, m.config.k) for m in convs} == {(16, 2), (32, 4), (64, 8)}
    assert type(net[-1]) is nn.Linear  # the head stays dense
    lenet = cnn.sparsify(cnn.build_cnn("lenet", 10, 0.0), MePropConfig(k=4))
    ks = [(type(m).__name__, m.config.k) for m in cnn.sparsified_layers(lenet)]
    assert ks == [("SparseConv2d", 2), ("SparseConv2d", 4), ("SparseLinear", 30),
                  ("SparseLinear", 21)]  # fmt: skip
    assert type(lenet[-1]) is nn.Linear and not isinstance(lenet[-1], SparseLinear)


def test_inner_only_sparsifies_each_blocks_first_convolution_alone():
    net = cnn.build_cnn("resnet", 10, 0.0)
    cnn.sparsify(net, MePropConfig(k=8), cnn.sparsified_layers(net, inner_only=True))
    sparse = {n for n, m in net.named_modules() if isinstance(m, SparseConv2d)}
    blocks = [n for n, m in net.named_modules() if isinstance(m, cnn.BasicBlock)]
    assert sparse == {f"{b}.conv1" for b in blocks} and len(sparse) == 6
    # the same share as without it (k counts the widest convolution's 64 channels)
    assert [m.config.k for m in cnn.sparsified_layers(net, inner_only=True)] == [2, 2, 4, 4, 8, 8]
    x = torch.randn(3, 784)
    nn.functional.cross_entropy(net(x), torch.randint(0, 10, (3,))).backward()
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="no residual blocks"):
        cnn.sparsified_layers(cnn.build_cnn("lenet", 10, 0.0), inner_only=True)


def test_trainer_puts_meprop_on_the_inner_convolutions_only(tiny_mnist, tmp_path):
    """--inner-only through the task and the trainer: meProp on the 6 blocks' first
    convolutions, the row name says it; runs without it keep their identity."""
    from meprop.experiments.tasks import get_task

    cfg = TrainConfig(model="resnet", k=8, inner_only=True)
    task = get_task(cfg, tiny_mnist)
    net = task.build_model(cfg.widths(), cfg)
    task.sparsify(net, cfg.meprop_config())
    convs = [n for n, m in net.named_modules() if isinstance(m, SparseConv2d)]
    assert len(convs) == 6 and all(n.endswith(".conv1") for n in convs)
    assert task.hidden_layers(net) == [net.get_submodule(n) for n in convs]
    out = tmp_path / "run"
    args = ["train", "mnist", "--model", "resnet", "--method", "meprop", "--k", "8",
            "--inner-only", "--backend", "torch", "--data-dir", str(tiny_mnist), "--out", str(out),
            *TINY]  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["inner_only"] is True
    from meprop.experiments.grids import row_name

    assert row_name(TrainConfig(model="resnet", k=8, inner_only=True)).endswith("-inner")
    assert "inner_only" not in run_identity(TrainConfig(model="resnet"))["settings"]


def test_adaptive_k_bounds_each_layer_by_its_share_and_numbers_depths_over_the_net():
    from meprop import AdaptiveK

    adapt = AdaptiveK(min_k=3, rule="tinyprop", damping=0.5)
    net = cnn.sparsify(cnn.build_cnn("lenet", 10, 0.0), MePropConfig(k=4, adapt=adapt))
    layers = cnn.sparsified_layers(net)
    # k (the bound) is each layer's share; min_k at most it (conv1's share of 6 is 2 < 3)
    assert [(m.config.k, m.config.adapt.min_k) for m in layers] == [(2, 2), (4, 3), (30, 3),
                                                                    (21, 3)]  # fmt: skip
    assert all(m.config.adapt.rule == "tinyprop" for m in layers)
    # TinyProp's damping ** depth: 0 at the last sparsified layer, 3 at conv1
    assert [m.k_record.depth for m in layers] == [3, 2, 1, 0]
    x = torch.randn(5, 784)
    nn.functional.cross_entropy(net(x), torch.randint(0, 10, (5,))).backward()
    for m in layers:  # each backward chose its k in [min_k, k]
        assert m.config.adapt.min_k <= m.last_k <= m.config.k


@pytest.mark.parametrize("method,extra", [("dense", []), ("meprop", ["--k", "4", "--mode",
                         "unified"]), ("meprop", ["--k", "4"]), ("meprop", []),
                         ("meprop", ["--k", "4", "--memory", "0.8"]),
                         ("meprop", ["--k", "4", "--adaptive", "mass", "--mode", "unified"])])  # fmt: skip
def test_trainer_trains_lenet(tiny_mnist, tmp_path, method, extra):
    out = tmp_path / "run"
    args = ["train", "mnist", "--model", "lenet", "--method", method, "--data-dir",
            str(tiny_mnist), "--out", str(out), *TINY, *extra]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["widths"] == [6, 16, 120, 84]  # the sparsified (or would-be) layers
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    times = summary["times"]
    assert times["linear_backward"] > 0 and times["hidden_backward"] > 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"] == "lenet"
    if method == "meprop" and not extra:  # the MLP's measured recipe (memory) is not applied
        assert saved["memory"] == 0.0 and saved["k"] == 20


@pytest.mark.parametrize("model", ["lenet", "resnet"])
def test_mesimp_removes_filters_and_a_resumed_run_keeps_them(tiny_mnist, tmp_path, model):
    """meSimp on a CNN: LeNet loses filters and hidden units, the ResNet its blocks' first
    convolutions' filters (the residual sums keep their width); the checkpoint carries the
    shrunk shapes, so a resumed run goes on from them."""
    out = tmp_path / "run"
    args = ["train", "mnist", "--model", model, "--method", "mesimp", "--k", "4",
            "--prune-rate", "0.2", "--prune-interval", "2", "--data-dir", str(tiny_mnist),
            "--out", str(out), *TINY]  # fmt: skip
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    widths = log[-1]["widths"]
    full = {"lenet": {"1": 6, "4": 16, "8": 120, "11": 84}}.get(model)
    if model == "resnet":
        assert set(widths) == {f"{i}.conv1" for i in range(4, 10)}
        full = {name: (16, 16, 32, 32, 64, 64)[i] for i, name in enumerate(sorted(widths))}
    assert all(widths[g] <= full[g] for g in full) and any(widths[g] < full[g] for g in full)
    assert main([*args[: -len(TINY)], "--epochs", "2", "--no-progress", "--resume"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 2.0
    assert all(log[-1]["widths"][g] <= widths[g] for g in widths)


def test_a_cnn_builds_at_the_widths_meSimp_left():
    """The dense control of a meSimp row (a net trained from scratch at its final widths):
    --hidden gives LeNet's conv1, conv2, fc1, fc2 widths (the ResNet's six blocks' first
    convolutions)."""
    from meprop.experiments.reproduce import _size_control, cnn_grid

    row = next(r for r in cnn_grid() if r.config.method == "mesimp" and r.group == "lenet")
    control = _size_control(row, {"final_widths": {"1": 2, "4": 6, "8": 78, "11": 54}})
    assert control.config.method == "dense" and control.config.widths() == [2, 6, 78, 54]
    net = cnn.build_cnn("lenet", 10, 0.0, control.config.widths())
    assert [m.weight.shape[0] for m in cnn.sparsified_layers(net)] == [2, 6, 78, 54]
    assert net(torch.randn(3, 784)).shape == (3, 10)
    resnet = cnn.build_cnn("resnet", 10, 0.0, (2, 3, 4, 5, 6, 7))
    inner = [b.conv1.out_channels for b in resnet if isinstance(b, cnn.BasicBlock)]
    assert inner == [2, 3, 4, 5, 6, 7] and resnet(torch.randn(2, 784)).shape == (2, 10)
    with pytest.raises(ConfigError, match=r"takes --hidden as 4 widths \[6, 16, 120, 84\]"):
        TrainConfig(model="lenet", hidden=(8, 16, 100))


@pytest.mark.parametrize(
    "kw,words",
    [
        (dict(task="pos", model="lenet"), "mnist task's network"),
        (dict(model="lenet", method="kdim"), "dense, meprop, random or mesimp, not kdim"),
        (dict(method="meprop", mode="per_position"), "takes --model lenet or resnet"),
        (dict(model="resnet", method="meprop", mode="symmetric"), "has no sign"),
        (
            dict(model="lenet", method="meprop", mode="per_position", adaptive="mass"),
            "adapt needs mode 'per_example' or 'unified'",
        ),
        (dict(model="vgg"), "model must be one of"),
        (dict(model="lenet", bn_batches=4), "only --model resnet has BatchNorm"),
        (dict(model="resnet", bn_batches=-1), "bn_batches must be >= 0"),
        (dict(model="lenet", method="meprop", inner_only=True), "needs --model resnet"),
        (dict(model="resnet", method="dense", inner_only=True), "and a sparse method"),
    ],
)
def test_cnn_settings_refused(kw, words):
    with pytest.raises(ConfigError, match=words):
        TrainConfig(**kw)


def test_the_model_setting_leaves_earlier_runs_identities_alone():
    # a run made before --model existed (config.json without it) keeps its identity
    mlp = run_identity(TrainConfig())
    assert "model" not in mlp["settings"]
    assert "model" in run_identity(TrainConfig(model="lenet"))["settings"]
    assert run_identity(TrainConfig(model="lenet"))["id"] != mlp["id"]


def test_reproduce_cnn_quick_pairs_each_row_with_dense(tiny_mnist, tmp_path):
    from meprop.experiments.reproduce import cnn_grid

    rows = cnn_grid()
    assert {r.group for r in rows} == {"lenet", "resnet"}
    resnet = {(r.config.method, r.config.k) for r in rows if r.group == "resnet"}
    assert resnet == {("dense", 20), ("meprop", 4), ("meprop", 8), ("random", 8), ("mesimp", 16)}
    modes = {r.config.mode for r in rows if r.group == "lenet" and r.config.method == "meprop"}
    assert modes == {"unified", "per_example", "per_position"}
    out = tmp_path / "cnn"
    args = ["reproduce", "cnn", "--quick", "--out", str(out), "--data-dir", str(tiny_mnist),
            "--seeds", "1,2", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "LeNet-5: dense vs meProp" in report
    assert "Published figures" not in report  # the paper's are for its MLP
    # every non-dense row paired with dense on the 2 seeds
    for label in (
        "meProp unified k=2 (1/8)",
        "meProp per_example k=1 (1/16)",
        "random-k k=2 (1/8)",
        "meSimp per_example k=4 (1/4)",
    ):
        assert f"lenet: {label} >= dense" in report


def test_a_resnet_row_is_timed_against_the_dense_resnet_not_lenet():
    """The report's speedups: each row against the dense run of its own network (LeNet's dense
    has wider layers, 120, than the ResNet's 64, and once hid the ResNet's)."""
    from pathlib import Path

    from meprop.experiments.runs import Run, reference

    def run(model, method, widths, epochs):
        config = dict(task="mnist", model=model, method=method, optimizer="adam", dropout=0.1,
                      dataset="mnist", batch_size=50, train_limit=0, epochs=epochs,
                      eval_every=0, lr=None)  # fmt: skip
        return Run(Path(model + method), config, {"widths": widths}, [], model, method)

    lenet = run("lenet", "dense", [6, 16, 120, 84], 10)
    resnet = run("resnet", "dense", [16] * 5 + [32] * 5 + [64] * 5, 5)
    sparse = run("resnet", "meprop", [16] * 5 + [32] * 5 + [64] * 5, 5)
    old_mlp = run("mlp", "dense", [500, 500], 10)
    del old_mlp.config["model"]  # (a run from before --model: the MLP)
    runs = [lenet, resnet, sparse, old_mlp]
    assert reference(sparse, runs) is resnet
    assert reference(lenet, runs) is lenet
    mlp_sparse = run("mlp", "meprop", [500, 500], 10)
    assert reference(mlp_sparse, runs) is old_mlp


def test_recompute_batchnorm_averages_the_batches_and_leaves_rng_and_modes_alone():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    net = nn.Sequential(conv, nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten())
    batches = [torch.randn(4, 2, 6, 6) + i for i in range(3)]
    net.train()
    net[3].eval()  # a mixed state, restored as it was
    rng = torch.get_rng_state()
    assert recompute_batchnorm(net, iter(batches)) == 3
    assert torch.equal(torch.get_rng_state(), rng)  # (dropout drew nothing)
    assert net.training and net[1].training and not net[3].training
    assert net[1].momentum == 0.1
    with torch.no_grad():
        outs = [conv(x) for x in batches]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    variances = torch.stack([o.var((0, 2, 3)) for o in outs]).mean(0)  # unbiased, as BN keeps
    torch.testing.assert_close(net[1].running_mean, means)
    torch.testing.assert_close(net[1].running_var, variances)
    with pytest.raises(ValueError, match="Sequential has no BatchNorm layer"):
        recompute_batchnorm(nn.Sequential(nn.Linear(2, 2)), [torch.randn(1, 2)])


def test_trainer_recomputes_batchnorm_before_each_evaluation(tiny_mnist, tmp_path):
    """--bn-batches: the ResNet's BatchNorm statistics come from N training batches with the
    evaluated weights (timed as bn_stats, within training's time); the identity of runs
    without it is unchanged."""
    out = tmp_path / "run"
    args = ["train", "mnist", "--model", "resnet", "--method", "meprop", "--k", "8",
            "--bn-batches", "2", "--data-dir", str(tiny_mnist), "--out", str(out), *TINY]  # fmt: skip
    assert main(args) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    times = log[-1]["times"]
    assert 0 < times["bn_stats"] < times["train"]
    assert json.loads((out / "config.json").read_text())["bn_batches"] == 2
    assert "bn_batches" not in run_identity(TrainConfig(model="resnet"))["settings"]
    assert run_identity(TrainConfig(model="resnet", bn_batches=2))["settings"]["bn_batches"] == 2


def test_precise_bn_rows_pair_with_the_dense_run_evaluated_alike():
    """The cnn claims: a row with --bn-batches against dense with it, the others against
    plain dense (two dense rows in one group are never pooled)."""
    from pathlib import Path

    from meprop.experiments.claims import claims
    from meprop.experiments.runs import Run

    def run(label, method, bn, seed, test):
        config = dict(method=method, k=8, seed=seed, bn_batches=bn, mode="unified")
        summary = {"metric": "accuracy", "test_accuracy": test}
        return Run(Path("."), config, summary, [], "resnet", label)

    runs = []
    for seed, base in ((1, 0.90), (2, 0.91), (3, 0.92)):
        runs += [
            run("dense", "dense", 0, seed, base + 0.05),
            run("meProp", "meprop", 0, seed, base),
        ]
        runs += [run("dense, precise BN", "dense", 100, seed, base + 0.06)]
        runs += [run("meProp, precise BN", "meprop", 100, seed, base + 0.055)]
    found = {name: p for name, p, _ in claims(runs)}
    plain, precise = (
        found["resnet: meProp >= dense"],
        found["resnet: meProp, precise BN >= dense, precise BN"],
    )
    assert plain.mean == pytest.approx(-5.0) and precise.mean == pytest.approx(-0.5)
