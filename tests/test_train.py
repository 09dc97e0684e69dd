"""The experiment tool end to end on a tiny MNIST: train, resume, reproduce, report."""

import json

import pytest
import torch

import meprop
from meprop.experiments.cli import main
from meprop.experiments.train import TrainConfig

TINY = ["--epochs", "2", "--batch-size", "20", "--hidden", "32", "--no-progress"]


def train(root, out, *extra):
    return main(["train", "mnist", "--data-dir", str(root), "--out", str(out), *TINY, *extra])


@pytest.mark.parametrize(
    "method,extra",
    [
        ("dense", []),
        ("meprop", ["--k", "4"]),
        ("meprop", ["--k", "4", "--mode", "unified"]),
        ("random", ["--k", "4"]),
        ("kdim", ["--k", "4"]),
        ("mesimp", ["--k", "8", "--prune-interval", "3", "--prune-rate", "0.2"]),
        # meSimp's shrinking slices LazyAdam's moments as it slices Adam's
        (
            "mesimp",
            [
                "--k",
                "8",
                "--prune-interval",
                "3",
                "--prune-rate",
                "0.2",
                "--mode",
                "unified",
                "--optimizer",
                "lazy_adam",
                "--sparse-grad",
            ],
        ),
    ],
)
def test_train_each_method(tiny_mnist, tmp_path, method, extra):
    out = tmp_path / "run"
    assert train(tiny_mnist, out, "--method", method, *extra) == 0
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and summary["steps"] == 16  # ceil(150 / 20) = 8 steps per epoch
    # the summary's dev score is the best epoch's in the log, the first of the best
    dev = [e["dev_accuracy"] for e in log]
    assert summary["best_epoch"] == dev.index(max(dev)) + 1
    assert summary["dev_accuracy"] == max(dev)
    correct = summary["test_accuracy"] * 60  # a count of the fixture's 60 test images
    assert correct == pytest.approx(round(correct), abs=1e-9)
    assert log[1]["train_loss"] < log[0]["train_loss"]  # it learns
    for key in ("forward", "backward", "linear_backward", "optimizer", "eval"):
        assert summary["times"][key] > 0
    assert summary["times"]["linear_backward"] <= summary["times"]["backward"]
    phases = sum(summary["times"][k] for k in ("forward", "backward", "optimizer"))
    assert phases <= summary["times"]["train"] + 1e-3  # the loop's wall-clock holds them
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert cfg.method == method
    if method == "kdim":
        assert summary["widths"] == [4, 4]
    if method == "mesimp":
        assert "widths" in log[-1]
        assert max(summary["final_widths"].values()) < 32
        # the best checkpoint reloads into a fresh full-size model
        model = meprop.experiments.tasks.mnist.build_mlp(
            784, [32, 32], 10, dropout=0.1
        )  # the default
        meprop.load(out / "best.pt", model)
        assert [m.out_features for m in model[:-1] if hasattr(m, "out_features")] == summary[
            "best_widths"
        ]


def test_learns_the_tiny_task(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    train(tiny_mnist, out, "--method", "meprop", "--k", "8", "--epochs", "6", "--lr", "0.003")
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] > 0.8


def test_resume_equals_uninterrupted(tiny_mnist, tmp_path):
    args = ["--method", "mesimp", "--k", "8", "--prune-interval", "3", "--dropout", "0.1"]
    train(tiny_mnist, tmp_path / "a", *args, "--epochs", "3")
    train(tiny_mnist, tmp_path / "b", *args, "--epochs", "1")
    assert train(tiny_mnist, tmp_path / "b", *args, "--epochs", "3") == 2  # "already holds a run"
    assert train(tiny_mnist, tmp_path / "b", *args, "--k", "6", "--resume") == 2  # k differs
    train(tiny_mnist, tmp_path / "b", *args, "--epochs", "3", "--resume")
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def scores(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "times"} for x in lines]

    assert scores("a") == scores("b")


def test_config_file_and_flags(tiny_mnist, tmp_path):
    train(tiny_mnist, tmp_path / "a", "--method", "meprop", "--k", "5")
    cfg_file = tmp_path / "a" / "config.json"
    train(tiny_mnist, tmp_path / "b", "--config", str(cfg_file), "--k", "6")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["k"] == 6 and cfg["method"] == "meprop" and cfg["hidden"] == [32]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(method="sparse"), "method must be one of"),
        (dict(optimizer="rmsprop"), "optimizer must be one of"),
        (dict(hidden=(100, 100), layers=3), "hidden lists 2 widths but layers=3"),
        (dict(k=0), "k must be >= 1, got 0"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(cycle=(1,)), "cycle must be two epoch counts"),
        (dict(task="pos", dataset="fashion"), "applies to the mnist task only"),
        (dict(method="meprop", adaptive="topk"), "adaptive must be 'tinyprop' or 'mass'"),
        (dict(method="dense", adaptive="mass"), "applies to --method meprop or mesimp"),
        (dict(method="meprop", adaptive="mass", k=10, min_k=20), r"adapt.min_k \(20\) must be"),
        (dict(method="meprop", adaptive="tinyprop", s_min=0.9, s_max=0.5), "s_min"),
        (dict(method="meprop", adaptive="mass", mass_share=0.0), "share must be in"),
    ],
)
def test_bad_train_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_dataset_of_each_task():
    assert TrainConfig(task="mnist", dataset="fashion").dataset == "fashion"
    assert TrainConfig(task="parse").dataset == "ud_english_ewt"
    assert TrainConfig(task="pos", dataset="ud_english_ewt").dataset == "ud_english_ewt"


def test_hidden_widths():
    assert TrainConfig(hidden=(500,)).widths() == [500, 500]
    assert TrainConfig(hidden=(500,), layers=3).widths() == [500, 500, 500]
    assert TrainConfig(hidden=(154, 160)).widths() == [154, 160]
    assert TrainConfig(method="kdim", k=20, layers=4).widths() == [20] * 4


def test_reproduce_and_report(tiny_mnist, tmp_path, monkeypatch):
    from dataclasses import replace

    from meprop.experiments import reproduce

    small = dict(epochs=2, batch_size=20, hidden=(32,))
    full_grid = reproduce.mnist_grid

    def grid(quick, dataset):
        rows = full_grid(quick=True, dataset=dataset)
        keep = [r for r in rows if r.config.method in ("dense", "random", "mesimp")][:3]
        keep += [r for r in rows if r.config.method == "meprop"][:2]
        return [replace(r, config=replace(r.config, **small, train_limit=0)) for r in keep]

    monkeypatch.setitem(reproduce.GRIDS, "mnist", grid)
    out = tmp_path / "results"
    args = ["reproduce", "mnist", "--quick", "--out", str(out), "--data-dir", str(tiny_mnist)]
    assert main([*args, "--no-progress"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert any(r.startswith("dense-size-of-mesimp") for r in runs)  # the size control ran
    report = (out / "report.md").read_text()
    assert "| dense |" in report and "meSimp" in report and "random-k" in report
    # (one k: no accuracy-vs-ratio curve; tests/test_report_adaptive.py has the sweep's)
    for png in ("learning_curves.png", "mesimp_widths.png", "mesimp_vs_size.png"):
        assert (out / png).stat().st_size > 1000
    # a second call skips finished rows; report rebuilds from the runs alone
    assert main([*args, "--no-progress"]) == 0
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_report_rejects_unfinished(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a finished run" in capsys.readouterr().err


def test_update_statistic_is_opt_in(tiny_mnist, tmp_path):
    assert TrainConfig().track_updates is False
    assert TrainConfig(method="meact", epochs=20).track_updates is True
    assert TrainConfig(method="meact", epochs=20, track_updates=False).track_updates is False
    assert TrainConfig(method="dense", track_updates=True).track_updates is True
    with pytest.raises(ValueError, match=r"track_updates \(--track-updates\) must be true, false"):
        TrainConfig(track_updates="yes")
    train(tiny_mnist, tmp_path / "off", "--method", "dense")
    train(tiny_mnist, tmp_path / "on", "--method", "dense", "--track-updates")

    def log(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines]

    off, on = log("off"), log("on")
    assert all("update" not in r and "analysis" not in r["times"] for r in off)
    assert all(r["update"] > 0 and r["times"]["analysis"] > 0 for r in on)
    # the statistic only watches: the same run otherwise
    for a, b in zip(off, on, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["dev_accuracy"] == b["dev_accuracy"]
    assert json.loads((tmp_path / "on" / "config.json").read_text())["track_updates"] is True


def test_make_optimizer_takes_the_fused_kernels_where_they_apply():
    from meprop.experiments.train import make_optimizer

    layer = torch.nn.Linear(4, 3)
    for name, fused in (("adam", True), ("adagrad", True), ("sgd", None)):
        opt = make_optimizer(name, layer.parameters(), 0.1)
        assert opt.defaults.get("fused") is fused, name
        # with row-sparse gradients, the implementation that takes them
        opt = make_optimizer(name, layer.parameters(), 0.1, sparse_grad=True)
        assert not opt.defaults.get("fused"), name
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("rmsprop", layer.parameters(), 0.1)
    assert type(make_optimizer("lazy_adam", layer.parameters(), 0.1)) is meprop.LazyAdam


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_fused_optimizer_steps_like_the_default(name):
    from meprop.experiments.train import make_optimizer

    torch.manual_seed(0)
    a = torch.nn.Linear(30, 20)
    b = torch.nn.Linear(30, 20)
    b.load_state_dict(a.state_dict())
    fast = make_optimizer(name, a.parameters(), 0.01)
    plain = getattr(torch.optim, {"adam": "Adam", "adagrad": "Adagrad"}[name])(
        b.parameters(), lr=0.01
    )
    for _ in range(5):
        x = torch.randn(8, 30)
        for layer, opt in ((a, fast), (b, plain)):
            opt.zero_grad()
            layer(x).square().sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "lazy_adam"])
def test_train_with_row_sparse_gradients(tiny_mnist, tmp_path, optimizer):
    out = tmp_path / "run"
    extra = ["--k", "4", "--sparse-grad", "--optimizer", optimizer]
    assert train(tiny_mnist, out, "--method", "meprop", *extra) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 16


class KeptK(torch.nn.Module):
    """A stand-in for a meProp layer that sets ``last_k`` in its backward: here the number of
    rows of its output gradient (20 per batch, 10 in each epoch's last of 8)."""

    def __init__(self):
        super().__init__()
        self.last_k = None

    def forward(self, x):
        if x.requires_grad:
            x.register_hook(lambda g: setattr(self, "last_k", float(g.shape[0])))
        return x


def killed_and_resumed(data, folder, args, monkeypatch, steps: int = 12) -> list[dict]:
    """Train with ``args`` into ``folder``, interrupted (Ctrl-C) after ``steps`` steps (and the
    warm-up), then resume it to the end; the log's records."""
    from meprop.experiments.tasks.mnist import MnistTask

    loss, calls = MnistTask.loss, []

    def dying(self, model, batch):
        calls.append(1)
        if len(calls) == 1 + steps + 1:
            raise KeyboardInterrupt
        return loss(self, model, batch)

    monkeypatch.setattr(MnistTask, "loss", dying)
    assert train(data, folder, *args) == 130
    monkeypatch.setattr(MnistTask, "loss", loss)
    assert train(data, folder, *args, "--resume") == 0
    return [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]


def test_mean_k_per_layer_in_the_epoch_records(tiny_mnist, tmp_path, monkeypatch):
    from meprop.experiments.tasks.mnist import MnistTask

    build = MnistTask.build_model
    monkeypatch.setattr(
        MnistTask, "build_model", lambda self, *a: torch.nn.Sequential(*build(self, *a), KeptK())
    )
    args = ["--method", "dense", "--eval-every", "3", "--dropout", "0.2"]
    assert train(tiny_mnist, tmp_path / "a", *args) == 0
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6, 8, 11, 14, 16]
    # the epochs' last records only, the mean over the epoch's 8 steps
    assert [list(r.get("mean_k", {}).values()) for r in log] == [[], [], [18.75]] * 2
    (name,) = log[-1]["mean_k"]
    assert name == "7"  # the module's name in the model (after the MLP's 7 modules)

    # a run resumed within an epoch logs the mean over the whole epoch too (last.pt: step 11)
    resumed = killed_and_resumed(tiny_mnist, tmp_path / "b", args, monkeypatch)
    assert [r.get("mean_k") for r in resumed] == [r.get("mean_k") for r in log]

    # no layer with last_k: no field
    monkeypatch.setattr(MnistTask, "build_model", build)
    assert train(tiny_mnist, tmp_path / "c", "--method", "dense") == 0
    plain = (tmp_path / "c" / "log.jsonl").read_text().splitlines()
    assert all("mean_k" not in json.loads(x) for x in plain)


def test_adaptive_k_logs_each_layers_k(tiny_mnist, tmp_path):
    args = ["--method", "meprop", "--k", "12", "--adaptive", "mass", "--min-k", "3",
            "--mass-share", "0.5", "--hidden", "24"]  # fmt: skip
    assert train(tiny_mnist, tmp_path / "a", *args) == 0
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (cfg["adaptive"], cfg["min_k"], cfg["mass_share"]) == ("mass", 3, 0.5)
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    ks = [k for r in log for k in r["mean_k"].values()]
    assert len(log[-1]["mean_k"]) == 2 and all(3 <= k <= 12 for k in ks)
    assert any(k < 12 for k in ks)  # the rule chose fewer than the bound


def test_adaptive_k_resumes_with_its_memory(tiny_mnist, tmp_path, monkeypatch):
    """TinyProp's largest error per layer is in last.pt: a run killed mid-training and resumed
    chooses the k's (and logs the mean k's) an uninterrupted one does."""
    args = ["--method", "meprop", "--k", "12", "--adaptive", "tinyprop", "--min-k", "2",
            "--hidden", "24", "--eval-every", "3", "--epochs", "2"]  # fmt: skip
    assert train(tiny_mnist, tmp_path / "a", *args) == 0
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    resumed = killed_and_resumed(tiny_mnist, tmp_path / "b", args, monkeypatch)  # (at step 9)
    assert [r.get("mean_k") for r in resumed] == [r.get("mean_k") for r in log]
    assert any(k < 12 for r in log for k in r.get("mean_k", {}).values())


def scores(records: list[dict]) -> list[dict]:
    """A log's records without their timings (what a resumed run must repeat exactly)."""
    return [{k: v for k, v in r.items() if k != "times"} for r in records]


def test_memory_and_warmup_resume_exactly(tiny_mnist, tmp_path, monkeypatch):
    """The memory (MePropConfig.memory) and the warm-up steps taken are in last.pt: a run
    killed after the warm-up and resumed ends with an uninterrupted run's weights and scores."""
    args = ["--method", "meprop", "--k", "4", "--memory", "0.8", "--warmup", "5",
            "--hidden", "24", "--eval-every", "3", "--epochs", "2"]  # fmt: skip
    assert train(tiny_mnist, tmp_path / "a", *args) == 0
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    resumed = killed_and_resumed(tiny_mnist, tmp_path / "b", args, monkeypatch)  # (at step 9)

    assert scores(resumed) == scores(log)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    memory = a["extra"]["mean_k"]["memory"]
    assert memory and all(m.abs().sum() > 0 for m in memory.values())


def test_memory_needs_a_meprop_method(tiny_mnist, tmp_path, capsys):
    assert train(tiny_mnist, tmp_path / "a", "--method", "dense", "--memory", "0.5") == 2
    assert "--memory applies to the meProp layers" in capsys.readouterr().err


def test_lazy_adam_needs_row_sparse_gradients_and_resumes_exactly(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    """--optimizer lazy_adam learns the kept rows from row-sparse gradients: without
    --sparse-grad a meProp run is refused by name (dense runs take it: it is Adam there); its
    state (moments, step counts) is in last.pt, so a killed and resumed run ends as an
    uninterrupted one."""
    args = ["--method", "meprop", "--k", "4", "--optimizer", "lazy_adam", "--hidden", "24",
            "--eval-every", "3", "--epochs", "2"]  # fmt: skip
    assert train(tiny_mnist, tmp_path / "x", *args) == 2
    assert "add --sparse-grad" in capsys.readouterr().err
    assert train(tiny_mnist, tmp_path / "d", "--method", "dense", "--optimizer", "lazy_adam") == 0
    args.append("--sparse-grad")
    assert train(tiny_mnist, tmp_path / "a", *args) == 0
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    resumed = killed_and_resumed(tiny_mnist, tmp_path / "b", args, monkeypatch)  # (at step 9)

    assert scores(resumed) == scores(log)
