"""The compacted all-reduce (``meprop.ddp_hook``): DDP sends only the rows meProp kept.

One job per world size (2 and 3 gloo processes on 127.0.0.1) trains every configuration
twice on the same global batches and the same per-rank RNG: with the hook, and with DDP's
ordinary all-reduce. The two must agree up to summation order, and, where the selection is
the global batch's, with one process trained on the global batches.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meprop import (
    AdaptiveK,
    MePropConfig,
    MeSimpConfig,
    Simplifier,
    SparseLinear,
    hidden_layers,
    sparsify_,
)
from meprop import distributed as mdist
from meprop.ddp_hook import CompactState, RowLog, compact_allreduce_hook
from meprop.experiments.launch import spawn
from meprop.ops import ROWS_ATTR

D_IN, HIDDEN, CLASSES, K, STEPS = 12, 64, 5, 3, 5
SIZES = (12, 11, 12, 2)  # global batches: even and uneven parts
MESIMP = MeSimpConfig(prune_rate=0.3, interval=2)

# The union of the ranks' rows packed at any size and share (the defaults leave weights this
# small whole: per_example_defaults)
UNION = {"compact": {"min_union_bytes": 0, "dense_fraction": 1.0}}
CONFIGS = {  # name -> (MePropConfig, optimizer, wrap options, equals one process)
    "per_example": (MePropConfig(k=K), "sgd", UNION, True),
    "per_example_adam": (MePropConfig(k=K), "adam", UNION, True),
    "per_example_defaults": (MePropConfig(k=K), "sgd", {}, True),
    "unified_global": (MePropConfig(k=K, mode="unified", scope="global"), "sgd", {}, True),
    "unified_global_adam_buckets": (  # a bucket per parameter
        MePropConfig(k=K, mode="unified", scope="global"), "adam", {"bucket_cap_mb": 1e-4}, True,
    ),
    "unified_global_unlogged": (
        MePropConfig(k=K, mode="unified", scope="global"), "sgd", {"unlogged": True}, True,
    ),
    "unified_local": (MePropConfig(k=K, mode="unified"), "sgd", UNION, False),
    "random": (MePropConfig(k=K, mode="random"), "sgd", UNION, False),
    "symmetric_adagrad": (MePropConfig(k=K, mode="symmetric"), "adagrad", UNION, True),
    "unified_global_adagrad": (
        MePropConfig(k=K, mode="unified", scope="global"), "adagrad", {}, True,
    ),
    "adaptive_global": (
        MePropConfig(k=10, mode="unified", scope="global", adapt=AdaptiveK(min_k=2, s_min=0.2)),
        "sgd", {}, True,
    ),
    "adaptive_per_example": (MePropConfig(k=10, adapt=AdaptiveK(min_k=2)), "adam", UNION, False),
    # meSimp shrinks the hidden layers at steps 2 and 4; the wrapper is rebuilt each time
    "mesimp_unified_global": (
        MePropConfig(k=8, mode="unified", scope="global"), "adam", {"mesimp": MESIMP}, True,
    ),
    "mesimp_per_example": (MePropConfig(k=K), "adam", {**UNION, "mesimp": MESIMP}, True),
}  # fmt: skip


def mlp(cfg: MePropConfig) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)
    )  # fmt: skip
    sparsify_(model, cfg, filter_fn=hidden_layers(model))
    return model


def global_batches(steps: int = STEPS):
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        m = SIZES[i % len(SIZES)]
        yield torch.randn(m, D_IN, generator=gen), torch.randint(0, CLASSES, (m,), generator=gen)


def train(cfg, opt_name, *, device="cpu", hook=None, mesimp=None, unlogged=False, **wrap_kwargs):
    """Train on the global batches (DDP under torch.distributed); returns the model and the
    bytes (sent, dense) counted by the hooks (the wrapper's, or one ``hook`` registered)."""
    model = mlp(cfg).to(device)
    params = model.parameters()
    opts = {"sgd": (torch.optim.SGD, 0.2), "adam": (torch.optim.Adam, 0.01)}
    opts["adagrad"] = (torch.optim.Adagrad, 0.05)
    cls, lr = opts[opt_name]
    opt = cls(params, lr=lr)
    torch.manual_seed(100 + mdist.rank())  # random-k's picks: per rank, alike in both runs
    ddp = dist.is_initialized()  # (one NCCL rank too, where one GPU is all there is)
    simp = None
    if mesimp is not None:
        simp = (mdist.DistributedSimplifier if ddp else Simplifier)(model, mesimp, opt)
    net, counts = model, [0, 0]

    def count(state):
        if state is not None:
            counts[0] += state.bytes_sent
            counts[1] += state.bytes_dense

    if ddp:
        net = mdist.wrap(model, **wrap_kwargs)
        if hook is not None:
            net.compact_state = CompactState(model, dense_fraction=hook, min_union_bytes=0)
            net.register_comm_hook(net.compact_state, compact_allreduce_hook)
        if unlogged:  # as under torch.compile: backward logs nothing, the hook reads dW
            for p in model.parameters():
                setattr(p, ROWS_ATTR, None)
    for x, y in global_batches():
        (x, y), share = mdist.shard((x.to(device), y.to(device)))
        opt.zero_grad()
        (F.cross_entropy(net(x), y) * share).backward()
        opt.step()
        if simp is not None and simp.step() and ddp:  # shrunk: new Parameters, a new hook
            count(net.compact_state)
            net = net.rewrap()
    if ddp:
        count(net.compact_state)
    hooked = ddp and (wrap_kwargs.get("compact") is not False or hook is not None)
    return model, (tuple(counts) if hooked else None)


def snapshot(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def job_worker(out: str, device: str = "cpu") -> None:
    if device == "cuda":
        device = f"cuda:{dist.get_rank()}"
    results = {}
    for name, (cfg, opt_name, kwargs, _) in CONFIGS.items():
        model, counts = train(cfg, opt_name, device=device, **kwargs)
        plain, none = train(cfg, opt_name, device=device, **dict(kwargs, compact=False))
        assert counts is not None and none is None
        results[name] = (snapshot(model), snapshot(plain), *counts)
    # registered by hand, every weight travelling whole (dense_fraction=0)
    model, counts = train(CONFIGS["per_example"][0], "sgd", device=device, compact=False, hook=0.0)
    results["whole"] = (snapshot(model), None, *counts)
    torch.save(results, Path(out) / f"rank{dist.get_rank()}.pt")


@pytest.fixture(scope="module", params=[2, 3])
def job(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"hook{request.param}")
    spawn(job_worker, request.param, (str(out),), timeout_s=120)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(request.param)]


def assert_states(a: dict, b: dict, exact=False, atol=1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5, msg=k)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hook_equals_the_ordinary_allreduce(job, name):
    cfg, opt_name, _, global_selection = CONFIGS[name]
    hooked, plain, sent, dense = job[0][name]
    for r in job[1:]:  # the ranks stay identical
        assert_states(r[name][0], hooked, exact=True)
    assert_states(hooked, plain)
    if global_selection:  # and both are one process's training on the global batches
        one, _ = train(cfg, opt_name, mesimp=CONFIGS[name][2].get("mesimp"))
        assert_states(hooked, snapshot(one), atol=1e-5)
    if name.startswith("mesimp"):
        assert hooked["0.weight"].shape[0] < HIDDEN  # it shrank
    if name == "per_example_defaults":  # too small to pack: no hook, DDP's own all-reduce
        assert sent == dense == 0
    else:
        assert 0 < sent < dense


def test_global_unified_sends_k_rows_and_a_checksum(job):
    _, _, sent, dense = job[0]["unified_global"]
    biases_and_output = HIDDEN + HIDDEN + CLASSES * HIDDEN + CLASSES
    per_step = K * D_IN + K * HIDDEN + 2 + biases_and_output  # one bucket, float32
    assert sent == 4 * STEPS * per_step
    assert dense == 4 * STEPS * (HIDDEN * D_IN + HIDDEN * HIDDEN + biases_and_output)
    # rows read from dW: exchanged as masks (a byte a row), no checksums, at most k rows
    unlogged = job[0]["unified_global_unlogged"][2]
    assert unlogged <= sent - 4 * STEPS * 2 + STEPS * 2 * HIDDEN


def test_a_union_past_dense_fraction_travels_whole(job):
    whole, _, sent, dense = job[0]["whole"]
    assert_states(whole, job[0]["per_example"][1])
    assert sent == dense + STEPS * 2 * HIDDEN  # everything, and a byte per row of the masks


# --------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
def test_row_log_holds_the_rows_backward_wrote(mode):
    layer = SparseLinear(D_IN, HIDDEN, config=MePropConfig(k=K, mode=mode))
    state = CompactState(layer, min_union_bytes=0)
    log = getattr(layer.weight, ROWS_ATTR)
    assert state.weights[id(layer.weight)].log is log and log.take() is None  # nothing yet
    layer(torch.randn(4, D_IN)).sum().backward()
    mask = log.take()
    written = layer.weight.grad.ne(0).any(1)
    assert torch.equal(mask & written, written)  # every written row is in the log
    assert int(mask.sum()) <= (K if mode == "unified" else 4 * K)
    assert log.take() is None  # taken


def test_shared_weights_are_read_from_the_gradient():
    """A weight another kind of module also uses gets rows its log cannot see."""
    model = nn.Sequential(
        nn.Embedding(HIDDEN, D_IN), SparseLinear(D_IN, HIDDEN, config=MePropConfig(k=K))
    )
    model[1].weight = model[0].weight  # tied, as language models do
    state = CompactState(model, min_union_bytes=0)
    (weight,) = state.weights.values()
    assert weight.log is None and getattr(model[0].weight, ROWS_ATTR) is None


def test_only_sparse_linear_weights_with_dense_gradients_are_packed():
    model = mlp(MePropConfig(k=K))
    model[2].config = MePropConfig(k=K, sparse_grad=True)
    assert list(CompactState(model, min_union_bytes=0).weights) == [id(model[0].weight)]
    assert CompactState(model).weights == {}  # per-example and small: whole, no mask
    wide = SparseLinear(D_IN, 4, config=MePropConfig(k=K + 1))  # k >= n: dense
    assert CompactState(wide, min_union_bytes=0).weights == {}
    with pytest.raises(ValueError, match="min_union_bytes must be >= 0, got -1"):
        CompactState(model, min_union_bytes=-1)
    with pytest.raises(ValueError, match=r"dense_fraction must be in \[0, 1\], got 1.5"):
        CompactState(model, dense_fraction=1.5)
    log = RowLog(3, torch.device("cpu"))
    assert log.take() is None


# --------------------------------------------------------------------------------------------
# Convolutions: a SparseConv2d's dW rows are its output channels

CONV_CONFIGS = {  # name -> (config, wrap's compact options)
    "conv_per_example": (MePropConfig(k=3), UNION["compact"]),
    "conv_unified": (MePropConfig(k=3, mode="unified"), UNION["compact"]),
    "conv_random": (MePropConfig(k=3, mode="random"), UNION["compact"]),
    # every position its own channels: the rows are those kept anywhere (most of them)
    "conv_per_position": (MePropConfig(k=3, mode="per_position"), UNION["compact"]),
    # the same channels on every rank: k rows and a checksum, at any size (the defaults)
    "conv_unified_global": (MePropConfig(k=3, mode="unified", scope="global"), True),
}


def cnn(cfg: MePropConfig) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, CLASSES),
    )  # fmt: skip
    return sparsify_(model, cfg, filter_fn=lambda m, name: isinstance(m, nn.Conv2d))


def train_cnn(cfg: MePropConfig, compact) -> tuple[dict, tuple[int, int]]:
    """Train the CNN on the global batches (DDP where torch.distributed is up, with ``compact``
    as wrap's option); its state and the hook's (sent, dense) bytes."""
    model = cnn(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    torch.manual_seed(100 + mdist.rank())
    net = mdist.wrap(model, compact=compact) if dist.is_initialized() else model
    gen = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        m = SIZES[i % len(SIZES)]
        x, y = (
            torch.randn(m, 2, 6, 6, generator=gen),
            torch.randint(0, CLASSES, (m,), generator=gen),
        )
        (x, y), share = mdist.shard((x, y))
        opt.zero_grad()
        (F.cross_entropy(net(x), y) * share).backward()
        opt.step()
    state = getattr(net, "compact_state", None)
    return snapshot(model), ((state.bytes_sent, state.bytes_dense) if state else (0, 0))


def conv_worker(out: str) -> None:
    results = {}
    for name, (cfg, compact) in CONV_CONFIGS.items():
        hooked, counts = train_cnn(cfg, compact)
        plain, _ = train_cnn(cfg, False)
        results[name] = (hooked, plain, *counts)
    torch.save(results, Path(out) / f"rank{dist.get_rank()}.pt")


def test_conv_weights_travel_as_their_kept_channels(tmp_path):
    spawn(conv_worker, 2, (str(tmp_path),), timeout_s=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name in CONV_CONFIGS:
        hooked, plain, sent, dense = ranks[0][name]
        assert_states(ranks[1][name][0], hooked, exact=True)  # the ranks stay identical
        assert_states(hooked, plain)  # DDP's average
        if name == "conv_per_position":  # the union: every row, plus the mask exchange
            assert dense <= sent <= 1.01 * dense, (sent, dense)
        else:
            assert 0 < sent < dense, name
    # global scope: the channels of the global batch, as one process picks them
    one, _ = train_cnn(CONV_CONFIGS["conv_unified_global"][0], False)
    assert_states(ranks[0]["conv_unified_global"][0], one, atol=1e-5)
    # ... and only k of each conv's 8 rows travel (+ a checksum each), the rest whole
    _, _, sent, dense = ranks[0]["conv_unified_global"]
    rows = 2 * 9 + 4 * 9  # a row of each conv's dW: C_in / groups x 3 x 3
    assert dense - sent == 4 * STEPS * ((8 - 3) * rows - 2)


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_conv_row_log_holds_the_channels_backward_wrote(mode):
    model = cnn(MePropConfig(k=3, mode=mode))
    state = CompactState(model, min_union_bytes=0)
    conv = model[2]
    assert set(state.weights) == {id(model[0].weight), id(conv.weight)}
    assert state.weights[id(conv.weight)].shape == (8, 4 * 3 * 3)
    model(torch.randn(5, 2, 6, 6)).sum().backward()
    mask = getattr(conv.weight, ROWS_ATTR).take()
    written = conv.weight.grad.flatten(1).ne(0).any(1)
    assert torch.equal(mask & written, written) and written.any()
    assert int(mask.sum()) <= (3 if mode == "unified" else 5 * 3)
    # k at or above the channels: a dense layer, not packed
    wide = cnn(MePropConfig(k=8))
    assert CompactState(wide, min_union_bytes=0).weights == {}


@pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a CUDA GPU (NCCL)")
def test_nccl_hook_equals_the_ordinary_allreduce(tmp_path):
    nproc = min(2, torch.cuda.device_count())
    spawn(job_worker, nproc, (str(tmp_path), "cuda"), device="cuda", timeout_s=300)
    results = torch.load(tmp_path / "rank0.pt", weights_only=False)
    for name, (hooked, plain, sent, dense) in results.items():
        if plain is not None:
            assert_states(hooked, plain, atol=1e-5)
            assert 0 < sent <= dense, name


@pytest.fixture
def group_of_one():
    """A gloo process group of one rank in this process (DDP works on it)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("compact", [True, False])
def test_the_trainer_registers_the_hook_unless_told_not_to(group_of_one, compact):
    from meprop.experiments.parts import Distribution

    d = Distribution(compact=compact)
    d.world = 2  # (as a rank of two sees it; DDP runs on this group of one)
    net = d.prepare(mlp(MePropConfig(k=K, mode="unified", scope="global")))
    assert (net.compact_state is not None) == compact
    assert (net.rewrap().compact_state is not None) == compact
    small = Distribution(compact=compact)
    small.world = 2
    assert small.prepare(mlp(MePropConfig(k=K))).compact_state is None  # nothing worth packing


def test_cli_flag_turns_the_hook_off(tmp_path, monkeypatch):
    import meprop.experiments.train
    from meprop.experiments.cli import main

    seen = {}
    monkeypatch.setattr(
        meprop.experiments.train, "run", lambda cfg, out, **options: seen.update(options)
    )
    base = ["train", "mnist", "--out", str(tmp_path), "--no-progress"]
    assert main(base) == 0 and seen["compact"] is True
    assert main([*base, "--no-compact-allreduce"]) == 0 and seen["compact"] is False


class _Shifted(RowLog):
    """A row log that reports each row one place on (rank 1's, in the test below)."""

    __slots__ = ()

    def take(self):
        mask = super().take()
        return None if mask is None else mask.roll(1)


def disagreeing_worker(out: str) -> None:
    cfg = MePropConfig(k=K, mode="unified", scope="global")
    model = mlp(cfg)
    ddp = mdist.wrap(model)
    if dist.get_rank() == 1:
        for w in ddp.compact_state.weights.values():
            w.log.__class__ = _Shifted
    x, y = next(global_batches())
    (x, y), _ = mdist.shard((x, y))
    try:
        F.cross_entropy(ddp(x), y).backward()
        message = ""
    except RuntimeError as e:
        message = str(e)
    Path(out, f"rank{dist.get_rank()}.txt").write_text(message)


def test_ranks_that_kept_different_rows_raise(tmp_path):
    spawn(disagreeing_worker, 2, (str(tmp_path),), timeout_s=60)
    for r in range(2):
        message = (tmp_path / f"rank{r}.txt").read_text()
        assert "the ranks kept different gradient rows of ['0.weight', '2.weight']" in message
        assert "compact=False" in message


MNIST = Path(os.environ.get("MEPROP_DATA", "")) / "mnist" / "train-images-idx3-ubyte.gz"


@pytest.mark.skipif(not MNIST.is_file(), reason="needs the real MNIST under $MEPROP_DATA")
def test_torchrun_two_nodes_on_loopback(tmp_path):
    """docs/distributed.md's multi-node commands, with both "nodes" on this machine."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    train = ["-m", "meprop.experiments.cli", "train", "mnist", "--method", "meprop", "--k", "8"]
    train += ["--mode", "unified", "--scope", "global", "--hidden", "32", "--train-limit", "200"]
    train += ["--batch-size", "50", "--epochs", "1", "--no-progress", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *train,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs
    assert json.loads((tmp_path / "summary.json").read_text())["processes"] == 2
