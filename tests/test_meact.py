"""meAct: active-set selection, the active-only kernels against a masked dense reference, the
per-example cache and gradients, identity with the baseline before meAct starts, the
parameter-update statistic, and the experiment tool end to end on a tiny MNIST."""

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import meprop
from meprop.config import MeActConfig
from meprop.experiments.cli import main
from meprop.meact import (
    ActiveLinear,
    IndexedBatch,
    MeAct,
    active_linear,
    active_mask,
    reference_active_linear,
)
from meprop.update_monitor import UpdateMonitor

active = pytest.importorskip("meprop.kernels.meact_kernels")
needs_numba = pytest.mark.skipif(not active.available(), reason="numba kernels unavailable")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@pytest.fixture(params=["serial", "parallel"])
def path(request, monkeypatch):
    """Run the kernels' serial build (1 thread) or force the parallel one whatever the size."""
    before = torch.get_num_threads()
    if request.param == "serial":
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(2)
        monkeypatch.setattr(active, "_PAR_MIN_NS", 0)
    yield request.param
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Active-set selection


def test_active_mask_threshold():
    acc = torch.tensor(
        [
            [50.0, 30.0, 15.0, 5.0, 0.0],  # shares 50, 30, 15, 5, 0 %
            [1.0, 1.0, 1.0, 1.0, 0.0],  # 25 % each
            [0.0, 0.0, 0.0, 0.0, 0.0],  # nothing accumulated yet: all active
        ]
    )
    assert active_mask(acc, 10.0).tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True] * 5,
    ]
    # a share exactly at the threshold is active; the scale of acc does not matter
    assert active_mask(acc, 30.0)[0].tolist() == [True, True, False, False, False]
    assert active_mask(acc * 1e-6, 4.0)[0].tolist() == [True, True, True, True, False]
    assert active_mask(acc, 25.5)[1].tolist() == [False] * 5  # nobody reaches 25.5 %
    assert active_mask(acc, 0.0).all()  # 0 %: everyone passes
    assert active_mask(acc, 100.0)[0].tolist() == [False] * 5


def test_active_mask_cap():
    acc = torch.tensor([[50.0, 30.0, 15.0, 5.0, 0.0], [1.0, 8.0, 2.0, 9.0, 3.0], [0.0] * 5])
    assert active_mask(acc, 1.0, cap=2).tolist() == [
        [True, True, False, False, False],
        [False, True, False, True, False],
        [True] * 5,  # the cap does not apply where there is nothing to choose by
    ]
    # the cap only removes neurons: below the threshold stays inactive
    assert active_mask(acc, 20.0, cap=4)[0].tolist() == [True, True, False, False, False]
    assert torch.equal(active_mask(acc, 1.0, cap=5), active_mask(acc, 1.0))  # cap >= n: no-op


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(start_epoch=-1), ValueError, "start_epoch must be >= 0, got -1"),
        (dict(start_epoch=1.5), TypeError, "start_epoch must be int"),
        (dict(threshold=150), ValueError, r"must be in \[0, 100\], got 150"),
        (dict(threshold=-0.1), ValueError, "percentage"),
        (dict(threshold="1%"), TypeError, "threshold must be a number"),
        (dict(cap=-3), ValueError, "cap must be >= 0 .0: no cap., got -3"),
        (dict(storage="bfloat16"), ValueError, "storage must be 'float16' or 'float32'"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_config(kw, err, match):
    with pytest.raises(err, match=match):
        MeActConfig(**kw)


def test_config_is_frozen_and_normalised():
    c = MeActConfig(threshold=2)
    assert c.threshold == 2.0 and isinstance(c.threshold, float)
    with pytest.raises(AttributeError):
        c.cap = 3


# --------------------------------------------------------------------------------------------
# The active-only kernels against the masked dense reference


def problem(m, n, d, density, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=gen, dtype=dtype)
    w = torch.randn(n, d, generator=gen, dtype=dtype)
    b = torch.randn(n, generator=gen, dtype=dtype) if bias else None
    mask = torch.rand(m, n, generator=gen) < density
    base = torch.randn(m, n, generator=gen, dtype=dtype)
    g = torch.randn(m, n, generator=gen, dtype=dtype)
    return x, w, b, mask, base, g


def grads(fn, x, w, b, mask, base, g):
    """Output and (dx, dW, db) of fn through autograd, for the output gradient g."""
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    out = fn(*leaves[:2], leaves[2] if b is not None else None, mask, base)
    out.backward(g)
    return out.detach(), [t.grad for t in leaves]


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "m,n,d,density,bias",
    [
        (0, 5, 3, 0.5, True),  # no rows
        (3, 4, 2, 0.0, True),  # no active entry: out = base, zero gradients
        (1, 1, 1, 1.0, False),
        (7, 13, 9, 0.3, True),  # odd sizes: the four-at-a-time loops' remainders
        (64, 300, 200, 0.1, True),
        (16, 50, 33, 1.0, False),  # all active: the dense linear map
    ],
)
def test_kernel_matches_masked_reference(path, dtype, m, n, d, density, bias):
    x, w, b, mask, base, g = problem(m, n, d, density, dtype, bias)
    want, want_grads = grads(reference_active_linear, x, w, b, mask, base, g)
    got, got_grads = grads(lambda *a: active_linear(*a, backend="numba"), x, w, b, mask, base, g)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(got[~mask], base[~mask])  # inactive entries are base, bit for bit
    for got_g, want_g in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got_g, want_g, **TOL[dtype])
    if m and density == 0.0:
        assert all(not t.any() for t in got_grads)


@needs_numba
def test_kernel_backward_reads_only_active_entries():
    x, w, b, mask, base, g = problem(9, 20, 7, 0.25, torch.float64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    cols = mask.nonzero()[:, 1]
    poisoned = g.masked_fill(~mask, float("nan"))  # NaN where inactive: must never be read
    dx = active.active_linear_dx(offsets, cols, poisoned, w)
    dw, db = active.active_linear_dw(offsets, cols, poisoned, x)
    gm = g * mask
    torch.testing.assert_close(dx, gm @ w)
    torch.testing.assert_close(dw, gm.t() @ x)
    torch.testing.assert_close(db, gm.sum(0))
    # duplicate columns in a row add up in the backward
    offsets, cols = torch.tensor([0, 2]), torch.tensor([3, 3])
    dx = active.active_linear_dx(offsets, cols, g[:1], w)
    torch.testing.assert_close(dx, 2 * g[:1, 3:4] * w[3:4])


@needs_numba
def test_kernel_errors():
    x, w, b, mask, base, g = problem(2, 5, 3, 0.5, torch.float64)
    off = torch.tensor([0, 1, 2])
    with pytest.raises(IndexError, match=r"1 value\(s\) of cols outside \[0, 5\)"):
        active.active_linear(x, w, b, off, torch.tensor([1, 5]), base)
    with pytest.raises(IndexError, match="outside"):
        active.active_linear_dw(off, torch.tensor([-1, 0]), g, x)
    with pytest.raises(ValueError, match="offsets must have M \\+ 1 = 3 entries"):
        active.active_linear(x, w, b, torch.tensor([0, 2]), torch.tensor([1, 2]), base)
    with pytest.raises(ValueError, match="offsets must rise from 0 to len.cols. = 2"):
        active.active_linear(x, w, b, torch.tensor([0, 2, 1]), torch.tensor([1, 2]), base)
    with pytest.raises(ValueError, match="dtypes must match"):
        active.active_linear(x.float(), w, b, off, torch.tensor([1, 2]), base)
    with pytest.raises(TypeError, match="float32/float64 CPU tensor"):
        active.active_linear_dx(off, torch.tensor([1, 2]), g.half(), w)
    with pytest.raises(ValueError, match="backend='numba' needs float32/float64"):
        active_linear(x.half(), w.half(), None, mask, base.half(), backend="numba")


@needs_numba
def test_opcheck():
    x, w, b, mask, base, g = problem(4, 9, 5, 0.4, torch.float64)
    off = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    cols = mask.nonzero()[:, 1]
    ops = torch.ops.meprop
    torch.library.opcheck(ops.active_linear.default, (x, w, b, off, cols, base))
    torch.library.opcheck(ops.active_linear.default, (x, w, None, off, cols, base))
    torch.library.opcheck(ops.active_linear_dx.default, (off, cols, g, w))
    torch.library.opcheck(ops.active_linear_dw.default, (off, cols, g, x))


@needs_numba
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_active_matches_active_mask(path, dtype):
    gen = torch.Generator().manual_seed(3)
    for b, n in [(0, 5), (1, 1), (7, 13), (64, 500)]:
        acc = torch.rand(b, n, generator=gen, dtype=dtype).pow(6)  # a few large shares
        if b > 2:
            acc[1] = 0  # nothing accumulated: all active
        for threshold in (0.0, 0.3, 1.0, 10.0, 100.0):
            for cap in (0, 1, 3, 60, 1000):
                offsets, cols = active.select_active(acc, threshold, cap)
                assert offsets.shape == (b + 1,) and int(offsets[-1]) == cols.numel()
                rows = torch.repeat_interleave(torch.arange(b), offsets.diff())
                mask = torch.zeros(b, n, dtype=torch.bool)
                mask[rows, cols] = True
                assert mask.sum() == cols.numel()  # no duplicates
                assert torch.equal(mask, active_mask(acc, threshold, cap)), (b, n, threshold, cap)
                for i in range(b):  # ascending within a row
                    row = cols[offsets[i] : offsets[i + 1]]
                    assert torch.equal(row, row.sort().values)


@needs_numba
def test_select_active_cap_ties_go_to_the_lower_column():
    offsets, cols = active.select_active(torch.tensor([[1.0, 2.0, 2.0, 2.0, 1.0]]), 0.0, 2)
    assert cols.tolist() == [1, 2]


@needs_numba
def test_accumulate_active_matches_the_masked_update(path):
    x, w, b, mask, base, g = problem(9, 20, 7, 0.3, torch.float32, seed=4)
    share = torch.rand(9, 20)
    share /= share.sum(1, keepdim=True)
    total = torch.rand(9) * 3
    total[2] = 0  # a first pass
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    cols = mask.nonzero()[:, 1]
    poisoned = g.masked_fill(~mask, float("nan"))  # inactive entries must never be read
    got_share, got_total = active.accumulate_active(share, total, poisoned, offsets, cols)
    a = g.abs() * mask
    want_total = total + a.sum(1)
    want = (share * total[:, None] + a) / want_total.clamp_min(1e-30)[:, None]
    torch.testing.assert_close(got_total, want_total)
    torch.testing.assert_close(got_share, want)
    assert not share.isnan().any()  # inputs are not modified
    torch.library.opcheck(
        torch.ops.meprop.accumulate_active.default, (share, total, g, offsets, cols)
    )
    torch.library.opcheck(torch.ops.meprop.select_active.default, (share, 5.0, 3))


def test_torch_backend_is_the_reference():
    x, w, b, mask, base, g = problem(5, 6, 4, 0.5, torch.float16)  # not a kernel dtype
    out = active_linear(x.float(), w.float(), b.float(), mask, base.float(), backend="torch")
    torch.testing.assert_close(
        out, reference_active_linear(x.float(), w.float(), b.float(), mask, base.float())
    )
    # auto falls back to the reference where the kernels do not apply
    torch.testing.assert_close(
        active_linear(x, w, b, mask, base), reference_active_linear(x, w, b, mask, base)
    )


# --------------------------------------------------------------------------------------------
# MeAct on a model: cache, gradients, accumulation, identity before the start


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).to(dtype)


def data(n=12, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def test_swaps_only_hidden_layers_and_back():
    model = mlp()
    params = list(model.parameters())
    meact = MeAct(model, MeActConfig(storage="float32"), num_examples=12)
    assert [type(m) for m in model if isinstance(m, nn.Linear)] == [
        ActiveLinear,
        ActiveLinear,
        nn.Linear,
    ]
    assert list(model.parameters()) == params  # the same Parameter objects
    assert "meact_threshold=0.5%" in repr(model[0])
    # 2 layers x 12 examples x 8 neurons x (share + cache) x 4 bytes + 2 x 12 totals x 4 bytes
    assert meact.memory_bytes() == 2 * 12 * 8 * 2 * 4 + 2 * 12 * 4
    meact.remove()
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


def test_eval_is_normal_and_training_needs_ids():
    model = mlp()
    ref = copy.deepcopy(model)
    meact = MeAct(model, MeActConfig(start_epoch=0), num_examples=12)
    x, _ = data()
    model.eval()
    assert torch.equal(model(x), ref(x))
    model.train()
    with pytest.raises(RuntimeError, match=r"outside `with meact.batch\(ids\):`"):
        model(x)
    with pytest.raises(ValueError, match="must be distinct"), meact.batch(torch.tensor([1, 1])):
        pass
    with pytest.raises(IndexError, match=r"example ids must be in \[0, 12\), got 3..12"):
        with meact.batch(torch.tensor([3, 12])):
            pass
    with pytest.raises(ValueError, match=r"got input \(12, 6\) for 2 example ids"):
        with meact.batch(torch.tensor([0, 1])):
            model(x)
    with pytest.raises(ValueError, match="no nn.Linear layer"):
        MeAct(nn.Sequential(nn.ReLU()), MeActConfig(), num_examples=3)


def run_epochs(model, meact, x, y, epochs, lr=0.05, batch=4, first=0):
    """SGD over fixed batches of (x, y) with example numbers, epochs first, first + 1, ...;
    meact may be None."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for epoch in range(first, first + epochs):
        if meact is not None:
            meact.set_epoch(epoch)
        for i in range(0, len(y), batch):
            ids = torch.arange(i, min(i + batch, len(y)))
            ctx = meact.batch(ids) if meact is not None else torch.enable_grad()
            with ctx:
                loss = F.cross_entropy(model(x[ids]), y[ids])
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_identical_to_baseline_before_start():
    x, y = data()
    base, model = mlp(), mlp()
    meact = MeAct(model, MeActConfig(start_epoch=2), num_examples=12)
    run_epochs(base, None, x, y, epochs=2)
    run_epochs(model, meact, x, y, epochs=2)
    for p, q in zip(base.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
    # ... and the accumulations hold the examples' gradients by then
    assert (meact._state["0"].total > 0).all()
    # from the start epoch on, training differs
    run_epochs(base, None, x, y, epochs=1)
    run_epochs(model, meact, x, y, epochs=1, first=2)
    assert not all(
        torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters(), strict=True)
    )


def test_inactive_neurons_output_the_cache_and_get_no_gradient():
    x, y = data(n=4)
    model = mlp()
    meact = MeAct(model, MeActConfig(start_epoch=1, threshold=15.0, storage="float32"), 4)
    ids = torch.arange(4)
    outs = {}  # the hidden layers' outputs at the latest forward
    for i in (0, 2):
        model[i].register_forward_hook(lambda m, a, out, i=i: outs.__setitem__(i, out.detach()))

    # epoch 0: normal; fills the cache with the outputs and the accumulations with |dL/dz|
    with meact.batch(ids):
        F.cross_entropy(model(x), y).backward()
    z0 = dict(outs)
    for i in (0, 2):
        st = meact._state[str(i)]
        torch.testing.assert_close(st.cache, z0[i].float())
        torch.testing.assert_close(st.share.sum(1), torch.ones(4))
    shares0 = {i: meact._state[str(i)].share.clone() for i in (0, 2)}
    totals0 = {i: meact._state[str(i)].total.clone() for i in (0, 2)}

    # move every parameter: active outputs must follow, inactive ones keep the cached values
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    model.zero_grad()
    meact.set_epoch(1)
    masks = {i: active_mask(shares0[i], 15.0) for i in (0, 2)}
    for mask in masks.values():
        assert 0 < int(mask.sum()) < mask.numel()  # some active, some not
    with meact.batch(ids):
        F.cross_entropy(model(x), y).backward()
    inputs = {0: x, 2: torch.relu(outs[0])}
    for i in (0, 2):
        mask = masks[i]
        fresh = F.linear(inputs[i], model[i].weight, model[i].bias).detach()
        torch.testing.assert_close(outs[i][mask], fresh[mask])
        cached = z0[i].float().double()  # (float32 storage of a float64 model)
        assert torch.equal(outs[i][~mask], cached[~mask])
        assert not torch.isclose(outs[i][~mask], fresh[~mask]).any()
        # no gradient through inactive entries: rows inactive for every example get none
        never = ~mask.any(0)
        assert never.any()
        assert not model[i].weight.grad[never].any() and not model[i].bias.grad[never].any()
        # the accumulations grew at the active entries only
        st = meact._state[str(i)]
        grown = st.share * st.total[:, None] - shares0[i] * totals0[i][:, None]
        assert (grown[~mask].abs() < 1e-5).all()
        assert (grown[mask] > -1e-5).all() and (st.total >= totals0[i]).all()
        assert (st.total > totals0[i]).any()


def test_model_gradients_match_the_reference_with_the_same_masks():
    x, y = data(n=6)
    model = mlp()
    meact = MeAct(model, MeActConfig(start_epoch=1, threshold=8.0, storage="float32"), 6)
    ids = torch.arange(6)
    run_epochs(model, meact, x, y, epochs=1, batch=6)
    ref = copy.deepcopy(model)
    for m in ref:
        if isinstance(m, nn.Linear):
            m.__class__ = nn.Linear
    masks = {i: active_mask(meact._state[str(i)].share, 8.0) for i in (0, 2)}
    caches = {i: meact._state[str(i)].cache.double() for i in (0, 2)}
    meact.set_epoch(1)
    model.zero_grad()
    with meact.batch(ids):
        out = model(x)
    h = x
    for i, m in enumerate(ref):
        h = (
            reference_active_linear(h, m.weight, m.bias, masks[i], caches[i])
            if i in masks
            else m(h)
        )
    torch.testing.assert_close(out, h)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(h, y).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


@needs_numba
def test_kernel_and_torch_backends_train_alike():
    """The compiled path (CSR selection, kernels, CSR accumulation) against the mask path."""
    x, y = data(n=12)
    runs = {}
    for backend in ("numba", "torch"):
        model = mlp()
        config = MeActConfig(start_epoch=1, threshold=8.0, cap=5, backend=backend)
        meact = MeAct(model, config, num_examples=12)
        run_epochs(model, meact, x, y, epochs=3)
        runs[backend] = (model, meact, meact.read_active())
    (m1, a1, c1), (m2, a2, c2) = runs["numba"], runs["torch"]
    assert c1 == c2 and 0 < c1["0"] < 8
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    for name in ("0", "2"):
        torch.testing.assert_close(a1._state[name].share, a2._state[name].share)
        torch.testing.assert_close(a1._state[name].total, a2._state[name].total)


def test_float16_storage_keeps_the_shares():
    x, y = data()
    runs = {}
    for storage in ("float16", "float32"):
        model = mlp()
        meact = MeAct(model, MeActConfig(start_epoch=5, storage=storage), 12)
        run_epochs(model, meact, x, y, epochs=3)
        runs[storage] = meact._state["2"].share.float()
    torch.testing.assert_close(runs["float16"], runs["float32"], rtol=2e-3, atol=1e-4)


def test_state_dict_round_trip():
    x, y = data()
    model = mlp()
    meact = MeAct(model, MeActConfig(start_epoch=1), 12)
    run_epochs(model, meact, x, y, epochs=1)
    state = meact.state_dict()
    other = MeAct(mlp(), MeActConfig(start_epoch=1), 12)
    other.load_state_dict(state)
    for name in ("0", "2"):
        assert torch.equal(other._state[name].share, meact._state[name].share)
        assert torch.equal(other._state[name].cache, meact._state[name].cache)
    with pytest.raises(ValueError, match="does not fit 13 examples"):
        MeAct(mlp(), MeActConfig(), 13).load_state_dict(state)


def test_active_counts_are_read_per_window():
    x, y = data()
    model = mlp()
    meact = MeAct(model, MeActConfig(start_epoch=1, threshold=10.0), 12)
    run_epochs(model, meact, x, y, epochs=1)
    assert meact.read_active() == {}  # no meAct forward yet
    masks = {n: active_mask(meact._state[n].share.float(), 10.0) for n in ("0", "2")}
    meact.set_epoch(1)
    with meact.batch(torch.arange(12)):
        model(x)
    counts = meact.read_active()
    assert counts == pytest.approx({n: float(m.sum()) / 12 for n, m in masks.items()})
    assert meact.read_active() == {}


# --------------------------------------------------------------------------------------------
# The update statistic


def test_update_monitor_by_hand():
    layer = nn.Linear(3, 2).double()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    monitor = UpdateMonitor(layer.parameters())
    assert monitor.read() is None
    g_w = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 4.0]], dtype=torch.float64)
    g_b = torch.tensor([-1.0, 3.0], dtype=torch.float64)
    for scale in (1.0, 2.0):  # sum |g| = 11.5: mean |change| 0.5 * 11.5 / 8, then twice that
        layer.weight.grad, layer.bias.grad = scale * g_w, scale * g_b
        opt.step()
        monitor.step()
    assert monitor.read() == pytest.approx((0.71875 + 1.4375) / 2, rel=1e-12)
    assert monitor.read() is None  # a new window

    # Adam's first step moves every parameter with a non-zero gradient by lr (to ~1e-8)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    monitor.rebind(layer.parameters())
    layer.weight.grad, layer.bias.grad = g_w, g_b
    opt.step()
    monitor.step()
    assert monitor.read() == pytest.approx(0.01 * 6 / 8, rel=1e-6)  # 6 of 8 are non-zero


# --------------------------------------------------------------------------------------------
# The experiment tool end to end on a tiny MNIST

TINY = ["--epochs", "3", "--batch-size", "20", "--hidden", "32", "--dropout", "0", "--no-progress"]


def train(root, out, *extra):
    return main(["train", "mnist", "--data-dir", str(root), "--out", str(out), *TINY, *extra])


def log_of(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_cli_meact_against_dense(tiny_mnist, tmp_path):
    meact = ["--method", "meact", "--meact-start", "1", "--meact-threshold", "2"]
    assert train(tiny_mnist, tmp_path / "meact", *meact) == 0
    assert train(tiny_mnist, tmp_path / "dense", "--method", "dense", "--track-updates") == 0
    a, d = log_of(tmp_path / "meact"), log_of(tmp_path / "dense")
    # epoch 1 (before the start): the same run, bit for bit
    same = ("train_loss", "dev_accuracy", "train_accuracy", "update")
    assert {k: a[0][k] for k in same} == {k: d[0][k] for k in same}
    assert [r["meact"] for r in a] == [False, True, True] and "meact" not in d[0]
    assert "active" not in a[0]
    for r in a[1:]:
        assert set(r["active"]) == {"0", "2"}
        assert all(0 <= v <= 32 for v in r["active"].values())
    assert all(r["update"] > 0 for r in a + d)
    summary = json.loads((tmp_path / "meact" / "summary.json").read_text())
    # 150 training examples x 2 layers x 32 neurons x (share + cache) in float16, + totals
    assert summary["meact"] == {"memory_bytes": 150 * 2 * 32 * 2 * 2 + 150 * 2 * 4, "examples": 150}
    # the best checkpoint is an ordinary model
    model = meprop.experiments.tasks.mnist.build_mlp(784, [32, 32], 10)
    meprop.load(tmp_path / "meact" / "best.pt", model)


def test_cli_meact_resume_equals_uninterrupted(tiny_mnist, tmp_path):
    args = ["--method", "meact", "--meact-start", "1", "--meact-threshold", "2"]
    train(tiny_mnist, tmp_path / "a", *args)
    train(tiny_mnist, tmp_path / "b", *args, "--epochs", "2")
    train(tiny_mnist, tmp_path / "b", *args, "--resume")

    def strip(log):
        return [{k: v for k, v in r.items() if k != "times"} for r in log]

    assert strip(log_of(tmp_path / "a")) == strip(log_of(tmp_path / "b"))


def test_cli_meact_errors(tiny_mnist, tmp_path, capsys):
    # a user's mistake: one line naming the value, exit status 2
    assert train(tiny_mnist, tmp_path / "x", "--method", "meact", "--meact-start", "3") == 2
    assert "meact_start=3 is not below epochs=3" in capsys.readouterr().err
    bad = ["--method", "meact", "--meact-start", "1", "--meact-threshold", "101"]
    assert train(tiny_mnist, tmp_path / "y", *bad) == 2
    assert re.search(r"threshold is a percentage .* got 101", capsys.readouterr().err)
    from meprop.experiments.parts import MeActPart

    with pytest.raises(ValueError, match="do not carry example numbers"):
        MeActPart(object(), "pos").forward_context((torch.zeros(2, 3), torch.zeros(2)))
    batch = IndexedBatch((torch.zeros(2, 3), torch.ones(2)), torch.arange(2))
    x, y = batch  # unpacks as the plain pair
    assert x.shape == (2, 3) and batch.ids.tolist() == [0, 1]


def test_reproduce_meact_quick(tiny_mnist, tmp_path, monkeypatch):
    from dataclasses import replace

    from meprop.experiments import meact_report

    full = meact_report.grid

    def small(quick, dataset):
        rows = full(quick=True, dataset=dataset)  # dense and meAct
        rows += [
            replace(r, name=r.name + "-seed2", label=r.label + " seed 2", config=r.config)
            for r in rows
        ]
        cfg = dict(epochs=2, batch_size=20, hidden=(32,), train_limit=0, meact_start=1)
        return [
            replace(r, config=replace(r.config, **cfg, seed=2 if "seed2" in r.name else 1))
            for r in rows
        ]

    monkeypatch.setattr(meact_report, "grid", small)
    out = tmp_path / "results"
    args = ["reproduce", "meact", "--quick", "--out", str(out), "--data-dir", str(tiny_mnist)]
    assert main([*args, "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    assert "## meAct" in report and "accuracy per epoch" in report
    assert "drops sharply" in report and "active neurons per example" in report
    assert "are identical to those of the baseline with its seed" in report
    assert "### seeds" in report and "| 2 |" in report
    # the claims, paired over the two seeds, from the runs' own numbers
    from meprop.experiments.report import load_runs
    from meprop.experiments.stats import paired

    runs = {r.path.name: r for r in load_runs([out])}
    a = {1: runs["meact"].test(), 2: runs["meact-seed2"].test()}
    b = {1: runs["dense"].test(), 2: runs["dense-seed2"].test()}
    p = paired(a, b)
    line = next(x for x in report.splitlines() if x.startswith("| meAct's test accuracy >"))
    assert f"| {p.mean:+.2f} [{p.lo:+.2f}, {p.hi:+.2f}] | 2 | {p.verdict} |" in line
    assert "| the update per iteration after the start drops below" in report
    for png in ("meact_accuracy.png", "meact_update.png", "meact_active.png", "meact_seeds.png"):
        assert (out / png).stat().st_size > 1000
