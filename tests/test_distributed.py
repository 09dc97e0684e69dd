"""meProp and meSimp under torch.distributed: gloo on the CPU, processes on 127.0.0.1.

Multi-process runs are slow to start (each process imports torch), so one two-process job
(``job``) trains every configuration at once and the tests compare its results with one
process trained on the same global batches. The failure tests start their own jobs.
"""

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import meprop
from meprop import AdaptiveK, MePropConfig, MeSimpConfig, Simplifier, hidden_layers, sparsify_
from meprop import distributed as mdist
from meprop.experiments.launch import WorkerFailed, spawn
from meprop.ops import select_columns

D_IN, HIDDEN, CLASSES = 12, 16, 5
# Global batch sizes: even, uneven (parts of 4 and 3), and one example for two ranks (rank 1
# gets a stand-in part with weight 0).
SIZES = (8, 7, 8, 1)
MESIMP = MeSimpConfig(prune_rate=0.3, interval=3)
SAVE_AT, MESIMP_STEPS = 8, 15  # the meSimp job saves after step 8; the reference runs on

CONFIGS = {  # name -> (MePropConfig, optimizer, steps, global batch sizes)
    "per_example": (MePropConfig(k=3), "sgd", 6, SIZES),
    "unified_global": (MePropConfig(k=3, mode="unified", scope="global"), "sgd", 6, SIZES),
    "unified_local": (MePropConfig(k=3, mode="unified"), "sgd", 6, SIZES),
    "sparse_grad": (MePropConfig(k=3, sparse_grad=True), "sgd", 6, SIZES),
    "adam": (MePropConfig(k=3), "adam", 6, SIZES),
    # adaptive k: the unified k's come from the global scores, the same on every rank
    "adaptive_global": (
        MePropConfig(k=10, mode="unified", scope="global", adapt=AdaptiveK(min_k=2, s_min=0.2)),
        "sgd", 6, SIZES,
    ),
    "adaptive_mass_global": (
        MePropConfig(k=10, mode="unified", scope="global", adapt=AdaptiveK(rule="mass", share=0.5)),
        "sgd", 6, SIZES,
    ),
}  # fmt: skip


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)
    )  # fmt: skip


def global_batches(steps: int, sizes=SIZES):
    """The same global batches on every rank and in the reference process."""
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        m = sizes[i % len(sizes)]
        yield torch.randn(m, D_IN, generator=gen), torch.randint(0, CLASSES, (m,), generator=gen)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.2)
    return torch.optim.Adam(model.parameters(), lr=0.01)


def train(cfg, opt_name, batches, *, simp_cfg=None, model=None, opt=None, simp=None, after=None):
    """An ordinary loop, DDP when torch.distributed is up with several ranks; ``after(step,
    model, shrunk)`` is called after every step."""
    world = mdist.world_size()
    if model is None:
        model = mlp()
        sparsify_(model, cfg, filter_fn=hidden_layers(model))
        opt = make_optimizer(opt_name, model)
    if simp is None and simp_cfg is not None:
        cls = mdist.DistributedSimplifier if world > 1 else Simplifier
        simp = cls(model, simp_cfg, opt)
    net = mdist.wrap(model) if world > 1 else model
    for step, batch in enumerate(batches, 1):
        (x, y), share = mdist.shard(batch)
        opt.zero_grad()  # (before, not after: the last step's gradients stay for the tests)
        (F.cross_entropy(net(x), y) * share).backward()
        opt.step()
        shrunk = simp is not None and simp.step()
        if shrunk and world > 1:
            net = net.rewrap()
        if after is not None:
            after(step, model, shrunk, opt, simp)
    return model, opt, simp


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def job_worker(out: str) -> None:
    """One rank of the shared job: every configuration, the meSimp run and its checkpoint."""
    rank = dist.get_rank()
    results = {"world": dist.get_world_size()}
    for name, (cfg, opt_name, steps, sizes) in CONFIGS.items():
        model, _, _ = train(cfg, opt_name, global_batches(steps, sizes))
        results[name] = snapshot(model)
        results[name + ".last_k"] = [m.last_k for m in model if hasattr(m, "last_k")]
        if name == "sparse_grad":
            results["sparse_grad.grad"] = model[0].weight.grad

    prunings = []  # (step, widths, parameters) after each shrink

    def after(step, model, shrunk, opt, simp):
        if shrunk:
            prunings.append((step, simp.sizes(), snapshot(model)))
        if step == SAVE_AT:  # mid-interval: the usage record is not empty
            mdist.save(Path(out) / "mesimp.pt", model, opt, simplifier=simp, step=step)

    cfg = MePropConfig(k=4)
    train(cfg, "adam", global_batches(SAVE_AT, (8, 6)), simp_cfg=MESIMP, after=after)
    results["prunings"] = prunings
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job")
    spawn(job_worker, 2, (str(out),), timeout_s=120)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_states(a: dict, b: dict, exact: bool = False, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


@pytest.mark.parametrize(
    "name",
    ["per_example", "unified_global", "sparse_grad", "adam", "adaptive_global",
     "adaptive_mass_global"],
)  # fmt: skip
def test_two_processes_equal_one_on_the_global_batch(job, name):
    _, ranks = job
    assert ranks[0]["world"] == 2
    assert_states(ranks[0][name], ranks[1][name], exact=True)  # DDP keeps the ranks identical
    cfg, opt_name, steps, sizes = CONFIGS[name]
    model, _, _ = train(cfg, opt_name, global_batches(steps, sizes))
    assert_states(ranks[0][name], snapshot(model), atol=1e-5 if name == "adam" else 1e-6)
    if cfg.adapt is not None:  # the same k's on both ranks and in one process
        one = [m.last_k for m in model if hasattr(m, "last_k")]
        assert ranks[0][name + ".last_k"] == ranks[1][name + ".last_k"] == one
        assert all(2 <= k <= 10 for k in one[:2]), one


def test_unified_local_scope_selects_per_rank(job):
    """The control: per-rank column choice is not one process's training."""
    _, ranks = job
    cfg, opt_name, steps, sizes = CONFIGS["unified_local"]
    model, _, _ = train(cfg, opt_name, global_batches(steps, sizes))
    ref = snapshot(model)
    assert_states(ranks[0]["unified_local"], ranks[1]["unified_local"], exact=True)
    assert not all(torch.allclose(ranks[0]["unified_local"][k], ref[k]) for k in ref)


def test_sparse_gradients_are_reduced_as_sparse_tensors_with_gloo(job):
    _, ranks = job
    grads = [r["sparse_grad.grad"] for r in ranks]
    assert all(g.layout == torch.sparse_coo for g in grads)
    cfg, opt_name, steps, sizes = CONFIGS["sparse_grad"]
    model, _, _ = train(cfg, opt_name, global_batches(steps, sizes))
    ref = model[0].weight.grad
    assert ref.layout == torch.sparse_coo
    for g in grads:  # the average of the ranks' sparse gradients is one process's
        torch.testing.assert_close(g.to_dense(), ref.to_dense(), atol=1e-6, rtol=1e-5)


def test_mesimp_ranks_prune_identically_and_as_one_process(job):
    _, ranks = job
    p0, p1 = ranks[0]["prunings"], ranks[1]["prunings"]
    assert len(p0) >= 1 and len(p0) == len(p1)
    for (s0, w0, m0), (s1, w1, m1) in zip(p0, p1, strict=True):
        assert s0 == s1 and w0 == w1
        assert_states(m0, m1, exact=True)
    ref = []

    def after(step, model, shrunk, opt, simp):
        if shrunk:
            ref.append((step, simp.sizes(), snapshot(model)))

    train(MePropConfig(k=4), "adam", global_batches(SAVE_AT, (8, 6)), simp_cfg=MESIMP, after=after)
    assert [(s, w) for s, w, _ in ref] == [(s, w) for s, w, _ in p0]
    assert min(min(w.values()) for _, w, _ in ref) < HIDDEN  # it did shrink
    for (_, _, a), (_, _, b) in zip(ref, p0, strict=True):
        assert_states(a, b, atol=1e-5)


def test_checkpoint_of_two_processes_continues_in_one(job):
    """Saved by rank 0 of two, mid-interval; loaded in one process and trained on, it equals one
    process trained throughout (usage record included: the same units are pruned later)."""
    out, _ = job
    cfg = MePropConfig(k=4)

    def record(widths, offset=0):
        def after(step, model, shrunk, opt, simp):
            if shrunk:
                widths.append((step + offset, simp.sizes()))

        return after

    steps = list(global_batches(MESIMP_STEPS, (8, 6)))
    ref_widths = []
    ref, _, ref_simp = train(cfg, "adam", steps, simp_cfg=MESIMP, after=record(ref_widths))

    # rank 0 saved the whole job's usage record: one process's after the same steps
    saved = torch.load(out / "mesimp.pt", weights_only=True)["simplifier"]["usage"]
    _, _, at_save = train(cfg, "adam", steps[:SAVE_AT], simp_cfg=MESIMP)
    expected = at_save.state_dict()["usage"]
    assert saved.keys() == expected.keys() and any(int(c.sum()) for c, _ in saved.values())
    for group, (counts, selections) in expected.items():
        assert torch.equal(saved[group][0], counts) and torch.equal(saved[group][1], selections)

    model = mlp()
    sparsify_(model, cfg, filter_fn=hidden_layers(model))
    opt = make_optimizer("adam", model)
    simp = Simplifier(model, MESIMP, opt)
    extra = meprop.load(out / "mesimp.pt", model, opt, simplifier=simp)
    assert extra["step"] == SAVE_AT and simp.steps == SAVE_AT
    widths = []
    after = record(widths, offset=SAVE_AT)
    train(cfg, "adam", steps[SAVE_AT:], model=model, opt=opt, simp=simp, after=after)
    assert widths == [(s, w) for s, w in ref_widths if s > SAVE_AT]
    assert simp.history == ref_simp.history
    assert_states(snapshot(model), snapshot(ref), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Failures: a dead or hung rank ends the job with an error; the last checkpoint stays valid


def failing_worker(out: str, how: str) -> None:
    """Trains and checkpoints every step; at step 4 rank 1 dies (SIGKILL) or hangs (SIGSTOP).

    On "kill", rank 0 then sleeps outside any collective (as in a long evaluation): only the
    launcher can end it early. On "hang", rank 0 waits for rank 1 in DDP's all-reduce: only the
    process group's timeout can end it.
    """
    rank = dist.get_rank()
    (Path(out) / f"pid{rank}").write_text(str(os.getpid()))
    model = mlp()
    sparsify_(model, MePropConfig(k=3, backend="torch"), filter_fn=hidden_layers(model))
    opt = make_optimizer("sgd", model)
    net = mdist.wrap(model)
    for step, batch in enumerate(global_batches(1000, (8,)), 1):
        (x, y), share = mdist.shard(batch)
        opt.zero_grad()
        (F.cross_entropy(net(x), y) * share).backward()
        opt.step()
        mdist.save(Path(out) / "last.pt", model, opt, step=step)
        if step == 4 and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        if step == 4 and rank == 0 and how == "kill":
            time.sleep(300)


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_dead_or_hung_rank_ends_the_job(tmp_path, how):
    timeout_s = 5.0
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed) as e:
        spawn(failing_worker, 2, (str(tmp_path), how), timeout_s=timeout_s, grace_s=1.0)
    elapsed = time.monotonic() - t0
    if how == "kill":  # the launcher saw rank 1 die and stopped rank 0 in its sleep
        assert e.value.rank == 1 and "SIGKILL" in str(e.value)
    else:  # rank 0's all-reduce timed out; the launcher then killed the stopped rank 1
        assert e.value.rank == 0 and "timed out" in str(e.value).lower()
    assert elapsed < 120  # a bound on a hang (start-up included), not a speed measurement
    for r in range(2):  # no process is left behind
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / f"pid{r}").read_text()), 0)
    model = mlp()
    sparsify_(model, MePropConfig(k=3), filter_fn=hidden_layers(model))
    assert meprop.load(tmp_path / "last.pt", model)["step"] >= 4


def raising_worker() -> None:
    if dist.get_rank() == 1:
        raise ValueError("bad value 7 on rank 1")
    dist.barrier()  # rank 0 waits for rank 1, which never comes: the launcher stops it


def test_an_exception_in_a_rank_is_reported_with_its_traceback():
    with pytest.raises(WorkerFailed, match="rank 1 of 2 failed") as e:
        spawn(raising_worker, 2, timeout_s=30, grace_s=1.0)
    assert "ValueError: bad value 7 on rank 1" in str(e.value)


def test_spawn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nproc must be an integer >= 1, got 0"):
        spawn(raising_worker, 0)
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        spawn(raising_worker, 2, timeout_s=0)


# --------------------------------------------------------------------------------------------
# The command line: --nproc 2 on the real MNIST, then --resume in one process

MNIST = Path(os.environ.get("MEPROP_DATA", "")) / "mnist" / "train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not MNIST.is_file(), reason="needs the real MNIST under $MEPROP_DATA")
def test_cli_nproc_trains_as_one_process_and_resumes_in_one(tmp_path):
    from meprop.experiments.cli import main

    args = ["train", "mnist", "--method", "mesimp", "--k", "8", "--hidden", "32"]
    args += ["--train-limit", "400", "--batch-size", "50", "--prune-interval", "2"]
    args += ["--prune-rate", "0.2", "--dropout", "0", "--no-progress"]  # dropout: per-rank RNG
    two, one = tmp_path / "two", tmp_path / "one"
    assert main([*args, "--epochs", "1", "--nproc", "2", "--out", str(two)]) == 0
    assert main([*args, "--epochs", "2", "--out", str(one)]) == 0
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    # the run of two processes, continued by one from its last.pt
    assert main([*args, "--epochs", "2", "--resume", "--out", str(two)]) == 0

    def log(run):
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]

    a, b = log(two), log(one)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"] and x["widths"] == y["widths"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["dev_accuracy"] == pytest.approx(y["dev_accuracy"], abs=0.002)
    assert max(a[-1]["widths"].values()) < 32  # it shrank
    summary = json.loads((two / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["processes"] == 1


def test_cli_nproc_checks(tmp_path, monkeypatch, capsys):
    from meprop.experiments.cli import main

    base = ["train", "mnist", "--out", str(tmp_path), "--no-progress"]
    assert main([*base, "--nproc", "0"]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    for var, value in dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="x", MASTER_PORT="1").items():
        monkeypatch.setenv(var, value)
    assert main([*base, "--nproc", "2"]) == 2
    assert "under torchrun: torchrun already started" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Pieces in one process


@pytest.fixture
def group_of_one():
    """A gloo process group of one rank in this process (DDP works on it)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_refuses_parameters_that_mesimp_replaced(group_of_one):
    model = mlp()
    sparsify_(model, MePropConfig(k=4), filter_fn=hidden_layers(model))
    opt = make_optimizer("adam", model)
    simp = mdist.DistributedSimplifier(model, MeSimpConfig(prune_rate=0.5, interval=1), opt)
    ddp = mdist.wrap(model)
    x, y = next(global_batches(1))
    F.cross_entropy(ddp(x), y).backward()
    opt.step()
    assert simp.step()  # shrunk: new Parameters
    with pytest.raises(RuntimeError, match="parameters changed since DDP wrapped it"):
        ddp(x)
    ddp = ddp.rewrap()
    F.cross_entropy(ddp(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(TypeError, match="already wrapped"):
        mdist.wrap(ddp)
    with pytest.raises(TypeError, match="not its DDP wrapper"):
        mdist.DistributedSimplifier(ddp, MeSimpConfig(), opt)


def test_ddp_sparse_gradients_need_gloo(group_of_one, monkeypatch):
    model = mlp()
    sparsify_(model, MePropConfig(k=4, sparse_grad=True), filter_fn=hidden_layers(model))
    assert mdist.sparse_grad_parameters(model) == [model[0].weight, model[2].weight]
    ddp = mdist.wrap(model)
    x, y = next(global_batches(1))
    F.cross_entropy(ddp(x), y).backward()
    assert model[0].weight.grad.layout == torch.sparse_coo
    assert model[4].weight.grad.layout == torch.strided
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(ValueError, match="sparse_grad=True under DDP needs the gloo backend"):
        mdist.wrap(model)


def test_plain_ddp_with_sparse_grad_says_what_to_use(group_of_one):
    model = mlp()
    sparsify_(model, MePropConfig(k=4, sparse_grad=True), filter_fn=hidden_layers(model))
    x, _ = next(global_batches(1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(RuntimeError, match=r"sparse_grad=True and runs inside torch's Distrib"):
        ddp(x)
    lstm = meprop.SparseLSTM(4, 3, config=MePropConfig(k=2, sparse_grad=True))
    with pytest.raises(RuntimeError, match=r"meprop.distributed.wrap\(model\)"):
        torch.nn.parallel.DistributedDataParallel(lstm)(torch.randn(2, 3, 4))
    sparsify_(model, MePropConfig(k=4), filter_fn=hidden_layers(model))  # dense dW: fine
    torch.nn.parallel.DistributedDataParallel(model)(x).sum().backward()


def test_sparse_lstm_gradients_are_listed():
    lstm = meprop.SparseLSTM(4, 6, bidirectional=True, config=MePropConfig(k=2, sparse_grad=True))
    names = {id(p): n for n, p in lstm.named_parameters()}
    listed = sorted(names[id(p)] for p in mdist.sparse_grad_parameters(lstm))
    assert listed == [
        "weight_hh_l0",
        "weight_hh_l0_reverse",
        "weight_ih_l0",
        "weight_ih_l0_reverse",
    ]


def test_shard_splits_the_global_batch_and_weighs_the_parts():
    x, y = torch.arange(14.0).view(7, 2), torch.arange(7)
    assert mdist.shard((x, y)) == ((x, y), 1.0)  # one process: unchanged
    (x0, y0), s0 = mdist.shard((x, y), rank=0, world_size=2)
    (x1, y1), s1 = mdist.shard((x, y), rank=1, world_size=2)
    assert y0.tolist() == [0, 1, 2, 3] and y1.tolist() == [4, 5, 6]
    assert torch.equal(torch.cat([x0, x1]), x)
    assert (s0, s1) == (4 * 2 / 7, 3 * 2 / 7)  # mean_0 * s0 + mean_1 * s1 = 2 * global mean
    # one example, two ranks: rank 1 gets a stand-in with weight 0
    (xs, ys), s = mdist.shard((x[:1], y[:1]), rank=1, world_size=2)
    assert ys.tolist() == [0] and s == 0.0
    with pytest.raises(TypeError, match="split_batch"):
        mdist.shard((x, y[:3]), rank=0, world_size=2)


def test_pos_batches_split_by_sentence_and_weigh_by_tokens():
    from meprop.experiments.tasks.pos import IGNORE, PosTask

    items = [(torch.arange(1, n + 1), torch.zeros(n, dtype=torch.long)) for n in (2, 5, 3)]
    items[1][1][0] = IGNORE  # a tag unseen in training: not a loss term
    batch = PosTask.collate(items)  # words (5, 3)
    parts = PosTask.split_batch(batch, 2)
    assert [p[0].shape for p in parts] == [(5, 2), (3, 1)]  # each cut to its longest sentence
    assert [p[2].tolist() for p in parts] == [[2, 5], [3]]
    assert [PosTask.loss_terms(p) for p in parts] == [6, 3]
    _, share = mdist.shard(batch, PosTask, rank=1, world_size=2)
    assert share == 3 * 2 / 9


def test_global_scope_is_local_in_one_process():
    g = torch.randn(6, 10)
    assert torch.equal(select_columns(g, 3, "global"), select_columns(g, 3))
    assert torch.equal(mdist.sum_over_ranks(g[0]), g[0])
    with pytest.raises(ValueError, match="scope must be one of"):
        MePropConfig(k=3, scope="world")
    layer = meprop.SparseLinear(4, 6, config=MePropConfig(k=3, mode="unified", scope="global"))
    assert "mode=unified, scope=global" in repr(layer)


def test_sparse_lstm_refuses_global_unified_selection():
    cfg = MePropConfig(k=2, mode="unified", scope="global")
    lstm = meprop.SparseLSTM(4, 6, config=cfg)
    with pytest.raises(ValueError, match="SparseLSTM does not support MePropConfig"):
        lstm(torch.randn(3, 2, 4))
    lstm.config = MePropConfig(k=2, scope="global")  # per-example: scope changes nothing
    lstm(torch.randn(3, 2, 4))[0].sum().backward()


def test_save_in_one_process_writes(tmp_path):
    model = mlp()
    assert mdist.save(tmp_path / "c.pt", model, step=3) == tmp_path / "c.pt"
    assert meprop.load(tmp_path / "c.pt", mlp())["step"] == 3


# --------------------------------------------------------------------------------------------
# Faults: a plain Simplifier under DDP, a killed launcher, a rank's mistake


def simplifier_worker(out: str) -> None:
    model = mlp()
    sparsify_(model, MePropConfig(k=3), filter_fn=hidden_layers(model))
    try:
        Simplifier(model, MESIMP)
    except RuntimeError as e:
        (Path(out) / f"err{dist.get_rank()}").write_text(str(e))
    mdist.DistributedSimplifier(model, MESIMP)  # the one to use: accepted


def test_plain_simplifier_refuses_several_ranks(tmp_path):
    spawn(simplifier_worker, 2, (str(tmp_path),), timeout_s=60, grace_s=1.0)
    for r in range(2):
        message = (tmp_path / f"err{r}").read_text()
        assert "with 2 ranks" in message and "DistributedSimplifier" in message


def _descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        kids = {c for c, q in parents.items() if q == p}
        todo += list(kids - out)
        out |= kids
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not MNIST.is_file(), reason="needs the real MNIST under $MEPROP_DATA")
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_launcher_leaves_no_process(tmp_path, sig):
    import subprocess
    import sys

    out = tmp_path / "run"
    args = ["train", "mnist", "--method", "meprop", "--k", "8", "--hidden", "32"]
    args += ["--train-limit", "20000", "--batch-size", "10", "--epochs", "3", "--nproc", "2"]
    launcher = subprocess.Popen(
        [sys.executable, "-m", "meprop.experiments.cli", *args, "--no-progress", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the fork server and both ranks
            procs = _descendants(launcher.pid)
            if len(procs) >= 4 and (out / "config.json").exists():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the ranks did not start")
        time.sleep(0.5)
        procs = _descendants(launcher.pid)
        launcher.send_signal(sig)
        launcher.wait(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in procs):
            time.sleep(0.1)
        assert not [p for p in procs if _alive(p)]
        assert not (out / "summary.json").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.skipif(not MNIST.is_file(), reason="needs the real MNIST under $MEPROP_DATA")
def test_cli_nproc_tells_mistakes_and_divergence_in_one_line(tmp_path, capsys):
    from meprop.experiments.cli import main
    from meprop.experiments.train import run_lock

    args = ["train", "mnist", "--hidden", "32", "--train-limit", "400", "--batch-size", "50"]
    args += ["--epochs", "1", "--no-progress", "--nproc", "2"]
    assert (
        main([*args, "--method", "meact", "--meact-start", "0", "--out", str(tmp_path / "a")]) == 2
    )
    assert "--method meact runs in one process" in capsys.readouterr().err
    with run_lock(tmp_path / "b"):  # refused by the launcher, before any rank starts
        assert main([*args, "--out", str(tmp_path / "b")]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    # A rank's error of the user's kind (here: the loss diverged) is one line, no traceback.
    out = tmp_path / "c"
    assert main([*args, "--optimizer", "sgd", "--lr", "1e30", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meprop train: error: the training loss became") and err.count("\n") == 1
    assert not (out / "summary.json").exists() and not (out / "log.jsonl").read_text()


@pytest.mark.skipif(not MNIST.is_file(), reason="needs the real MNIST under $MEPROP_DATA")
def test_cli_nproc_killed_within_an_epoch_resumes_exactly(tmp_path):
    """SIGKILL to the launcher between two --eval-every checkpoints of epoch 1, then --resume:
    the run ends as the uninterrupted one (every rank's dropout RNG is restored)."""
    import subprocess
    import sys

    args = ["train", "mnist", "--method", "mesimp", "--k", "8", "--hidden", "32"]
    args += ["--train-limit", "600", "--batch-size", "50", "--prune-interval", "5"]
    args += ["--dropout", "0.2", "--eval-every", "4", "--epochs", "1", "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(out, *extra):
        cmd = [
            sys.executable,
            "-m",
            "meprop.experiments.cli",
            *args,
            "--no-progress",
            "--out",
            str(out),
        ]
        return subprocess.Popen([*cmd, *extra], env=env, stdout=subprocess.DEVNULL)

    assert start(tmp_path / "a").wait(300) == 0
    b = tmp_path / "b"
    p = start(b)
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        if (b / "last.pt").exists():
            p.send_signal(signal.SIGKILL)  # after step 4's checkpoint, within epoch 1
            break
        time.sleep(0.005)
    assert p.wait(60) == -signal.SIGKILL
    state = torch.load(b / "last.pt", weights_only=True)["extra"]["state"]
    assert state["epoch"] == 0 and state["batch"] > 0  # a checkpoint within the epoch
    time.sleep(1.0)  # the ranks end with their launcher
    assert start(b, "--resume").wait(300) == 0

    def records(out):
        lines = (out / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "times"} for x in lines]

    assert records(b) == records(tmp_path / "a")
    a_model = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b_model = torch.load(b / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a_model[k], b_model[k]) for k in a_model)
