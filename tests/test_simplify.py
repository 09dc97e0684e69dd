"""meSimp: the usage record, physical shrinking, optimizer surgery, schedule, checkpoints."""

import copy

import pytest
import torch
from torch import nn

import meprop
from meprop import MePropConfig, MeSimpConfig, Pair, Simplifier, hidden_layers, sparsify_


def mlp(*widths, norm=None, k=4):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            if norm is not None:
                layers.append(norm(b))
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    return sparsify_(model, MePropConfig(k=k), filter_fn=hidden_layers(model))


def set_usage(layer, counts, selections=10):
    layer.usage = (torch.tensor(counts, dtype=torch.int64), torch.tensor([selections]))


@pytest.mark.parametrize("norm", [None, nn.BatchNorm1d])
def test_removing_units_with_zero_outgoing_weights_keeps_outputs(norm):
    torch.manual_seed(0)
    model = mlp(6, 12, 10, 3, norm=norm).eval()
    dead = {"0": [1, 4, 5], str(3 if norm else 2): [0, 7]}
    cons = {"0": model[3 if norm else 2], str(3 if norm else 2): model[-1]}
    with torch.no_grad():
        for name, units in dead.items():
            cons[name].weight[:, units] = 0
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5))
    x = torch.randn(5, 6)
    before = model(x)
    for name, units in dead.items():
        layer = dict(model.named_modules())[name]
        n = layer.out_features
        set_usage(layer, [0 if u in units else 10 for u in range(n)], 10)
    assert simp.prune()
    torch.testing.assert_close(model(x), before)
    assert simp.sizes() == {"0": 9, str(3 if norm else 2): 8}


def test_layernorm_between_is_sliced():
    model = mlp(4, 8, 2, norm=nn.LayerNorm)
    ln = model[1]
    with torch.no_grad():
        ln.weight.copy_(torch.arange(8.0))
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5))
    set_usage(model[0], [9, 0, 9, 0, 9, 9, 0, 9], 10)
    simp.prune()
    assert ln.normalized_shape == (5,)
    assert ln.weight.tolist() == [0.0, 2.0, 4.0, 5.0, 7.0]
    assert model[3].in_features == 5 and model(torch.randn(2, 4)).shape == (2, 2)


def test_threshold_and_floor():
    model = mlp(3, 6, 2)
    layer = model[0]
    old_w = layer.weight.detach().clone()
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.25, min_units=2))
    # threshold = 0.25 * 20 = 5: counts >= 5 stay (equality kept), others go
    set_usage(layer, [10, 0, 5, 4, 20, 1], 20)
    simp.prune()
    assert layer.out_features == 3
    torch.testing.assert_close(layer.weight, old_w[[0, 2, 4]])
    assert "out_features=3" in repr(layer) and model[2].in_features == 3
    # counts cleared after pruning
    assert int(layer.usage[0].sum()) == 0 and int(layer.usage[1]) == 0
    # the floor keeps the most-selected units
    set_usage(layer, [0, 3, 1], 100)
    simp.prune()
    assert layer.out_features == 2
    torch.testing.assert_close(layer.weight, old_w[[2, 4]])


def test_optimizer_follows_and_adam_state_is_sliced():
    torch.manual_seed(0)
    model = mlp(5, 10, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5), opt)
    model(torch.randn(8, 5)).sum().backward()
    opt.step()
    opt.zero_grad()
    w0, w1 = model[0].weight, model[2].weight
    old = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in (w0, w1)}
    keep = [0, 3, 4, 8]
    set_usage(model[0], [5 if i in keep else 0 for i in range(10)], 5)
    simp.prune()
    assert {id(p) for p in model.parameters()} == {
        id(p) for g in opt.param_groups for p in g["params"]
    }
    n0, n1 = model[0].weight, model[2].weight
    assert n0 is not w0 and w0 not in opt.state
    torch.testing.assert_close(opt.state[n0]["exp_avg"], old[w0]["exp_avg"][keep])
    torch.testing.assert_close(opt.state[n0]["exp_avg_sq"], old[w0]["exp_avg_sq"][keep])
    torch.testing.assert_close(opt.state[n1]["exp_avg"], old[w1]["exp_avg"][:, keep])
    assert torch.equal(opt.state[n0]["step"], old[w0]["step"])
    model(torch.randn(8, 5)).sum().backward()
    opt.step()  # shapes all agree: the step works
    assert model[0].weight.shape == (4, 5)


def test_reset_mode_and_scheduler_keep_working():
    model = mlp(5, 10, 2)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5, optimizer="reset"), opt)
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    sched.step()
    set_usage(model[0], [1] * 5 + [0] * 5, 1)
    simp.prune()
    assert len(opt.state) == 0
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_shrinks_on_a_task_only_some_units_solve():
    torch.manual_seed(0)
    x = torch.randn(2000, 10)
    y = (x[:, 0] + x[:, 1] > 0).long()  # two input directions matter
    model = mlp(10, 64, 2, k=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.1, interval=50), opt)
    for _ in range(400):
        i = torch.randint(0, 2000, (32,))
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        opt.zero_grad()
        simp.step()
    width = simp.sizes()["0"]
    assert width < 40, simp.history
    acc = (model(x).argmax(1) == y).float().mean()
    assert acc > 0.95
    assert len(simp.history) >= 2 and simp.history[0] == (0, {"0": 64})


def test_examples_interval_and_cycle():
    model = mlp(3, 8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cfg = MeSimpConfig(interval=64, unit="examples", cycle=(4, 3), prune_rate=0.0)
    simp = Simplifier(model, cfg, opt)
    with pytest.raises(ValueError, match="step\\(examples=batch_size\\)"):
        simp.step()
    seen = []
    for _ in range(14):
        model(torch.randn(16, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        simp.step(examples=16)
        seen.append((simp.steps, model[0].usage is not None, len(opt.state)))
    # steps 0-3 simplify, 4-6 normal, 7-10 simplify, 11-13 normal; resets at 4, 7, 11, 14
    recording = [r for _, r, _ in seen]
    assert recording == [True, True, True, False, False, False, True] * 2
    assert [s for s, _, n in seen if n == 0] == [4, 7, 11, 14]


def test_unsupported_structures_raise():
    with pytest.raises(ValueError, match="ends its nn.Sequential"):
        Simplifier(sparsify_(nn.Sequential(nn.Linear(3, 4)), MePropConfig(k=2)), MeSimpConfig())
    conv = nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 1, 3))
    sparsify_(conv, MePropConfig(k=2), filter_fn=lambda m, n: n == "0")
    with pytest.raises(TypeError, match=r"'1' \(Unflatten\)"):
        Simplifier(conv, MeSimpConfig())

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(self.a(x).relu())

    custom = sparsify_(Custom(), MePropConfig(k=2), filter_fn=lambda m, n: n == "a")
    with pytest.raises(ValueError, match=r"cannot tell which modules consume \['a'\]"):
        Simplifier(custom, MeSimpConfig())
    simp = Simplifier(custom, MeSimpConfig(prune_rate=0.5), pairs=[Pair("a", ("b",))])
    set_usage(custom.a, [1, 0] * 4, 1)
    simp.prune()
    assert custom(torch.randn(2, 3)).shape == (2, 2) and custom.b.in_features == 4
    with pytest.raises(ValueError, match="no module named 'c'"):
        Simplifier(custom, MeSimpConfig(), pairs=[Pair("a", ("c",))])
    with pytest.raises(ValueError, match="no SparseLinear or SparseConv2d layer"):
        Simplifier(nn.Sequential(nn.Linear(2, 2)), MeSimpConfig())


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(prune_rate=1.5), "prune_rate must be in"),
        (dict(prune_rate="x"), "prune_rate must be a number"),
        (dict(interval=0), "interval must be >= 1, got 0"),
        (dict(unit="epochs"), "unit must be"),
        (dict(min_units=0), "min_units must be >= 1"),
        (dict(optimizer="keep"), "optimizer must be 'slice' or 'reset'"),
        (dict(cycle=(0, 5)), "cycle must be"),
        (dict(cycle=(3,)), "cycle must be"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MeSimpConfig(**kw)


def test_prune_helpers_reject_bad_indices():
    from meprop.prune import prune_out_

    lin = nn.Linear(3, 4)
    with pytest.raises(IndexError, match="out of range"):
        prune_out_(lin, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="cannot remove every unit"):
        prune_out_(lin, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="duplicate"):
        prune_out_(lin, torch.tensor([1, 1]))


def build(seed=0):
    torch.manual_seed(seed)
    model = mlp(6, 24, 16, 3, norm=nn.LayerNorm, k=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.2, interval=5, cycle=(10, 4)), opt)
    return model, opt, simp


def train(model, opt, simp, steps):
    for _ in range(steps):
        x = torch.randn(8, 6)
        y = torch.randint(0, 3, (8,))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        simp.step()


def test_save_load_into_fresh_model(tmp_path):
    model, opt, simp = build()
    train(model, opt, simp, 12)
    assert simp.sizes() != {"0": 24, "3": 16}
    path = meprop.save(tmp_path / "ckpt.pt", model, opt, simplifier=simp, step=12)
    fresh, opt2, simp2 = build(seed=1)
    extra = meprop.load(path, fresh, opt2, simplifier=simp2)
    assert extra == {"step": 12}
    assert simp2.sizes() == simp.sizes() and simp2.steps == 12
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), model(x))
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in model.parameters()]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_resume_equals_uninterrupted(tmp_path):
    model, opt, simp = build()
    torch.manual_seed(5)
    train(model, opt, simp, 30)
    full = copy.deepcopy(model.state_dict())

    model, opt, simp = build()
    torch.manual_seed(5)
    train(model, opt, simp, 13)
    meprop.save(tmp_path / "c.pt", model, opt, simplifier=simp)
    model, opt, simp = build(seed=3)
    meprop.load(tmp_path / "c.pt", model, opt, simplifier=simp)
    train(model, opt, simp, 17)
    assert full.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, full[k]), k


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    meprop.save(path, nn.Linear(2, 2), tag="old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        meprop.save(path, nn.Linear(2, 2), tag="new")
    monkeypatch.undo()
    assert meprop.load(path, nn.Linear(2, 2)) == {"tag": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_load_rejects_other_files(tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a meprop checkpoint"):
        meprop.load(tmp_path / "x.pt", nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        meprop.load(tmp_path / "missing.pt", nn.Linear(2, 2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_load_checks_everything_before_touching_the_model(tmp_path):
    from meprop.checkpoint import CheckpointError

    model, opt, simp = build()
    train(model, opt, simp, 12)  # shrunk
    path = meprop.save(tmp_path / "c.pt", model, opt, simplifier=simp)
    others = {
        "input width": mlp(7, 24, 16, 3, norm=nn.LayerNorm, k=3),
        "output width": mlp(6, 24, 16, 4, norm=nn.LayerNorm, k=3),
        "deeper": mlp(6, 24, 16, 16, 3, norm=nn.LayerNorm, k=3),
        "no norm": mlp(6, 24, 16, 3, k=3),
        "dense": nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 3)),
    }
    for what, other in others.items():
        before = _state(other)
        with pytest.raises(CheckpointError, match=str(path)) as e:
            meprop.load(path, other)
        assert "another model" in str(e.value) or "does not fit" in str(e.value), what
        assert _unchanged(other, before), what
    fresh, opt2, _ = build(seed=1)  # the optimizer of another parameter list
    with pytest.raises(CheckpointError, match="optimizer over other parameters"):
        meprop.load(path, fresh, torch.optim.Adam([nn.Parameter(torch.zeros(1))]))


def test_load_names_the_file_of_a_bad_checkpoint(tmp_path):
    from meprop.checkpoint import CheckpointError

    model, opt, simp = build()
    train(model, opt, simp, 3)
    path = meprop.save(tmp_path / "c.pt", model, opt, simplifier=simp)
    blob = path.read_bytes()
    bad = tmp_path / "bad.pt"
    for what, data in {
        "truncated": blob[: len(blob) // 2],
        "empty": b"",
        "random": bytes(range(256)) * 40,
    }.items():
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{bad} cannot be read as a checkpoint") as e:
            meprop.load(bad, build(seed=1)[0])
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value), what
    # a changed value (the file otherwise well-formed): the checksum catches it
    payload = torch.load(path, weights_only=True)
    payload["model"]["0.weight"][0, 0] += 1e-3
    torch.save(payload, bad)
    fresh = build(seed=1)[0]
    before = _state(fresh)
    with pytest.raises(CheckpointError, match=f"{bad} is corrupt"):
        meprop.load(bad, fresh)
    assert _unchanged(fresh, before)
    # a flipped byte anywhere: an error naming the file, or (in zip padding) the same state
    reference = build(seed=1)[0]
    meprop.load(path, reference)
    for pos in range(0, len(blob), max(1, len(blob) // 40)):
        flipped = bytearray(blob)
        flipped[pos] ^= 0x55
        bad.write_bytes(bytes(flipped))
        fresh = build(seed=1)[0]
        try:
            meprop.load(bad, fresh)
        except CheckpointError as e:
            assert str(bad) in str(e)
            continue
        assert _unchanged(fresh, _state(reference)), pos


def test_middle_layer_cut_twice_and_hooks_do_not_break_backward():
    # The middle weight loses rows (as producer) and columns (as consumer) in one pruning;
    # a hook on the old weight keeps its gradient accumulator alive.
    model = mlp(4, 8, 6, 2)
    opt = torch.optim.Adam(model.parameters())
    model[2].weight.register_post_accumulate_grad_hook(lambda p: None)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    old_state = opt.state[model[2].weight]["exp_avg"].clone()
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5), opt)
    set_usage(model[0], [1, 0] * 4, 1)
    set_usage(model[2], [1, 1, 0, 0, 1, 1], 1)
    simp.prune()
    w = model[2].weight
    assert w.shape == (4, 4)
    torch.testing.assert_close(opt.state[w]["exp_avg"], old_state[[0, 1, 4, 5]][:, [0, 2, 4, 6]])
    assert len(opt.state) == len(list(model.parameters()))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()


class Tagger(nn.Module):
    """Embedding -> bi-LSTM -> Linear, declaring its meSimp pairs."""

    def __init__(self, layers=1):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lstm = nn.LSTM(6, 8, num_layers=layers, bidirectional=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x):  # x: (T, B) token ids
        return self.head(self.lstm(self.emb(x))[0])

    def simplify_pairs(self):
        return [Pair("lstm", ("head",))]


@pytest.mark.parametrize("layers", [1, 2])
def test_lstm_cells_are_pruned_per_direction(layers, tmp_path):
    torch.manual_seed(0)
    model = sparsify_(Tagger(layers), MePropConfig(k=6))
    opt = torch.optim.Adam(model.parameters())
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5), opt)
    last = f"lstm.l{layers - 1}"
    assert simp.sizes()[last] == 8 and simp.sizes()[last + "_reverse"] == 8
    x = torch.randint(0, 20, (7, 3))
    model(x).sum().backward()  # the backward records per-cell usage
    opt.step()
    opt.zero_grad()
    assert int(model.lstm.usage[(0, 0)][1]) == 7 * 3
    # hand-set records: forward direction keeps 3 cells, backward keeps 5
    model.lstm.usage[(layers - 1, 0)][0].copy_(torch.tensor([9, 0, 9, 0, 0, 9, 0, 0]))
    model.lstm.usage[(layers - 1, 1)][0].copy_(torch.tensor([9, 9, 9, 0, 9, 9, 0, 0]))
    for key in model.lstm.usage:
        model.lstm.usage[key][1].fill_(10)
        if key[0] < layers - 1:
            model.lstm.usage[key][0].fill_(10)
    assert simp.prune()
    assert simp.sizes()[last] == 3 and simp.sizes()[last + "_reverse"] == 5
    assert model.head.in_features == 8
    assert len(opt.state) == len(list(model.parameters()))
    out = model(x)
    assert out.shape == (7, 3, 5)
    out.sum().backward()
    opt.step()
    path = meprop.save(tmp_path / "t.pt", model, opt, simplifier=simp)
    fresh = sparsify_(Tagger(layers), MePropConfig(k=6))
    opt2 = torch.optim.Adam(fresh.parameters())
    simp2 = Simplifier(fresh, MeSimpConfig(prune_rate=0.5), opt2)
    meprop.load(path, fresh, opt2, simplifier=simp2)
    assert simp2.sizes() == simp.sizes()
    assert torch.equal(fresh(x), model(x))


def test_lstm_tagger_shrinks_while_training():
    torch.manual_seed(0)
    model = sparsify_(Tagger(), MePropConfig(k=4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.1, interval=10), opt)
    for _ in range(30):
        x = torch.randint(0, 20, (5, 4))
        y = x % 5  # the tag is a function of the token
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad()
        simp.step()
    sizes = simp.sizes()
    assert len(simp.history) >= 2 and min(sizes.values()) < 8, simp.history


def test_chain_with_layernorm_outside_the_pruned_pairs_keeps_outputs():
    # A LayerNorm *between* producer and consumer is sliced (its statistics then change by
    # construction, see test_layernorm_between_is_sliced); elsewhere in the chain it is kept.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.LayerNorm(6),
        nn.Linear(6, 12),
        nn.ReLU(),
        nn.Linear(12, 3),
        nn.LayerNorm(3),
        nn.Linear(3, 2),
    )
    sparsify_(model, MePropConfig(k=4), filter_fn=lambda m, n: n == "1")
    with torch.no_grad():
        model[3].weight[:, [2, 5, 11]] = 0
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5))
    x = torch.randn(4, 6)
    before = model(x)
    set_usage(model[1], [0 if u in (2, 5, 11) else 3 for u in range(12)], 3)
    simp.prune()
    torch.testing.assert_close(model(x), before)
    assert model[1].out_features == 9 and model[3].in_features == 9
