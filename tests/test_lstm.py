"""SparseLSTM: dense agreement with nn.LSTM, meProp against the masked reference, the usage
record, conversion, and meSimp cell pruning."""

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from meprop import AdaptiveK, MePropConfig, SparseLSTM, densify_, sparsify_
from meprop.lstm_prune import lstm_output_columns, prune_lstm_cells_
from meprop.ops import kernels_available
from meprop.prune import update_optimizer_
from meprop.reference import mask_topk_grad, reference_lstm

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
IN, HID, T, B = 4, 5, 6, 3
LENGTHS = [6, 2, 4]  # unsorted, so packing permutes the batch


pytestmark = pytest.mark.usefixtures("one_thread")


def make_pair(k, mode="per_example", layers=1, bidir=False, batch_first=False, **cfg):
    """An nn.LSTM and a SparseLSTM (float64) with the same weights."""
    dense = nn.LSTM(IN, HID, layers, bidirectional=bidir, batch_first=batch_first).double()
    config = MePropConfig(k=k, mode=mode, **cfg)
    sparse = SparseLSTM(
        IN, HID, layers, bidirectional=bidir, batch_first=batch_first, config=config
    ).double()
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


def make_input(batch_first=False, packed=False, lengths=LENGTHS):
    x = torch.randn(B, T, IN, dtype=F64) if batch_first else torch.randn(T, B, IN, dtype=F64)
    x.requires_grad_(True)
    if packed:  # packed anew for each run: the packing is part of the graph
        return x, lambda: pack_padded_sequence(
            x, torch.tensor(lengths), batch_first, enforce_sorted=False
        )
    return x, lambda: x


def to_padded(out, batch_first=False):
    if isinstance(out, PackedSequence):
        return pad_packed_sequence(out, batch_first=batch_first)[0]
    return out


def run(module, x, inp, hx, weights, batch_first=False, fn=None):
    """Forward (``fn``, default the module), a backward from random weights on output, h_n and
    c_n; returns the outputs and the gradients of the module's parameters, x and hx."""
    module.zero_grad()
    for t in (x, *(hx or ())):
        t.grad = None
    out, (h, c) = (fn or module)(inp(), hx)
    out = to_padded(out, batch_first)
    wo, wh, wc = weights
    loss = (out * wo).sum()
    for states, w in ((h, wh), (c, wc)):  # a tensor (L*D, B, H), or per-direction widths
        loss = loss + sum(
            (s * (w[j] if isinstance(w, torch.Tensor) else w)).sum() for j, s in enumerate(states)
        )
    loss.backward()
    grads = {n: p.grad.to_dense() for n, p in module.named_parameters()}
    grads["x"] = x.grad
    if hx is not None:
        grads["h0"], grads["c0"] = hx[0].grad, hx[1].grad
    return out, h, c, grads


def loss_weights(out_shape, layers, dirs):
    return (
        torch.randn(out_shape, dtype=F64),
        torch.randn(layers * dirs, B, HID, dtype=F64),
        torch.randn(layers * dirs, B, HID, dtype=F64),
    )


def initial_state(layers, dirs):
    return tuple(torch.randn(layers * dirs, B, HID, dtype=F64, requires_grad=True) for _ in "hc")


def assert_same(a, b):
    out_a, h_a, c_a, g_a = a
    out_b, h_b, c_b, g_b = b
    torch.testing.assert_close(out_a, out_b, **TOL)
    for state_a, state_b in zip([*h_a, *c_a], [*h_b, *c_b], strict=True):
        torch.testing.assert_close(state_a, state_b, **TOL)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], **TOL, msg=name)


CASES = list(itertools.product([1, 2], [False, True], [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("layers,bidir,batch_first,packed,with_hx", CASES)
def test_dense_k_matches_nn_lstm(layers, bidir, batch_first, packed, with_hx):
    dense, sparse = make_pair(4 * HID, layers=layers, bidir=bidir, batch_first=batch_first)
    x, inp = make_input(batch_first, packed)
    dirs = 2 if bidir else 1
    hx = initial_state(layers, dirs) if with_hx else None
    weights = loss_weights((*x.shape[:2], HID * dirs), layers, dirs)
    assert_same(
        run(sparse, x, inp, hx, weights, batch_first), run(dense, x, inp, hx, weights, batch_first)
    )


def test_unbatched_and_sparse_grad_dense_k():
    dense, sparse = make_pair(100, layers=2, bidir=True, sparse_grad=True)
    x = torch.randn(T, IN, dtype=F64, requires_grad=True)
    hx = tuple(torch.randn(4, HID, dtype=F64, requires_grad=True) for _ in "hc")
    results = []
    for m in (sparse, dense):
        x.grad = hx[0].grad = hx[1].grad = None
        out, (h, c) = m(x, hx)
        assert out.shape == (T, 2 * HID) and h.shape == c.shape == (4, HID)
        (out.sin().sum() + h.sum() + c.cos().sum()).backward()
        results.append(
            [
                out,
                h,
                c,
                x.grad,
                hx[0].grad,
                hx[1].grad,
                *(p.grad.to_dense() for p in m.parameters()),
            ]
        )
    assert sparse.weight_ih_l0.grad.is_sparse
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_no_bias_and_sparse_grad(backend):
    dense = nn.LSTM(IN, HID, bias=False).double()
    x, inp = make_input(packed=True)
    weights = loss_weights((T, B, HID), 1, 1)
    for k in (3, 4 * HID):
        plain = SparseLSTM(IN, HID, bias=False, config=MePropConfig(k=k, backend=backend))
        coo = SparseLSTM(
            IN, HID, bias=False, config=MePropConfig(k=k, sparse_grad=True, backend=backend)
        )
        results = []
        for m in (plain, coo):
            m.double().load_state_dict(dense.state_dict())
            results.append(run(m, x, inp, None, weights))
        assert coo.weight_hh_l0.grad.is_sparse and coo.weight_ih_l0.grad.is_sparse
        assert_same(*results)
        if k > 4 * HID - 1:
            assert_same(results[0], run(dense, x, inp, None, weights))


@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck(packed):
    lstm = SparseLSTM(2, 2, 2, bidirectional=True, config=MePropConfig(k=8)).double()
    names = [n for n, _ in lstm.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)
    c0 = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)

    def f(x, h0, c0, *params):
        inp = pack_padded_sequence(x, torch.tensor([2, 3]), enforce_sorted=False) if packed else x
        out, (h, c) = torch.func.functional_call(
            lstm, dict(zip(names, params, strict=True)), (inp, (h0, c0))
        )
        return to_padded(out), h, c

    params = [p.detach().clone().requires_grad_(True) for p in lstm.parameters()]
    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


# ---------------------------------------------------------------------------------------------
# meProp (k < 4H) against the reference


def ref_fn(lstm, **kw):
    return lambda inp, hx: reference_lstm(lstm, inp, hx, **kw)


BACKENDS = ["torch"] + (["auto"] if kernels_available(torch.zeros(1, dtype=F64)) else [])


@pytest.mark.parametrize("mode", ["per_example", "unified", "symmetric"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse_bias", [False, True])
@pytest.mark.parametrize(
    "layers,bidir,batch_first,packed", [(1, False, False, False), (2, True, True, True)]
)
def test_matches_reference(mode, backend, sparse_bias, layers, bidir, batch_first, packed):
    for k in (1, 3, 7):
        _, sparse = make_pair(
            k, mode, layers, bidir, batch_first, sparse_bias=sparse_bias, backend=backend
        )
        x, inp = make_input(batch_first, packed)
        dirs = 2 if bidir else 1
        hx = initial_state(layers, dirs)
        weights = loss_weights((*x.shape[:2], HID * dirs), layers, dirs)
        got = run(sparse, x, inp, hx, weights, batch_first)
        want = run(sparse, x, inp, hx, weights, batch_first, fn=ref_fn(sparse))
        assert_same(got, want)
        # The sparsification is real: it differs from the dense gradient.
        dense = run(sparse, x, inp, hx, weights, batch_first, fn=ref_fn(sparse, k=100))
        assert not torch.allclose(got[3]["weight_hh_l0"], dense[3]["weight_hh_l0"])


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_float32_and_bfloat16(mode):
    # float32 takes the compiled kernels (backend auto) where numba is there; bfloat16 the
    # PyTorch ops. Both against the float64 reference on the same (rounded) weights.
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        _, sparse = make_pair(3, mode, layers=2, bidir=True)
        sparse.to(dtype)
        x = torch.randn(T, B, IN).to(dtype)
        lengths = torch.tensor(LENGTHS)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, _ = sparse(packed)
        g = torch.randn_like(out.data)
        out.data.backward(g)
        got = {n: p.grad.double() for n, p in sparse.named_parameters()}
        ref = copy.deepcopy(sparse).double()
        out_ref, _ = reference_lstm(ref, pack_padded_sequence(x.double(), lengths, False, False))
        torch.testing.assert_close(out.data.double(), out_ref.data, rtol=tol, atol=tol)
        if dtype == torch.float32:  # (bfloat16 rounding can change the selections)
            out_ref.data.backward(g.double())
            for n, p in ref.named_parameters():
                torch.testing.assert_close(got[n], p.grad, rtol=tol, atol=tol, msg=n)
        else:
            assert all(torch.isfinite(v).all() for v in got.values())


def run_recorded(sparse):
    """A packed batch through a 2-layer bidirectional ``sparse`` recording its selections:
    (the gradients, the selections, the reference's gradients on those selections, a function
    that runs it again recording anew)."""
    x, inp = make_input(packed=True)
    hx = initial_state(2, 2)
    weights = loss_weights((T, B, 2 * HID), 2, 2)

    def again():
        sparse.debug_selections = {}
        return run(sparse, x, inp, hx, weights), sparse.debug_selections

    got, sel = again()
    want = run(sparse, x, inp, hx, weights, fn=ref_fn(sparse, selections=sel))
    return got, sel, want, again


def test_random_selection_properties_and_reference():
    k = 3
    _, sparse = make_pair(k, "random", layers=2, bidir=True)
    got, sel, want, again = run_recorded(sparse)
    assert set(sel) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    valid = torch.arange(T).unsqueeze(1) < torch.tensor(LENGTHS)  # (T, B)
    for idx in sel.values():
        assert idx.shape == (T, B, k)
        assert (idx[~valid] == -1).all()
        rows = idx[valid]
        assert ((rows >= 0) & (rows < 4 * HID)).all()
        assert (rows.sort(1).values.diff(dim=1) > 0).all()  # k distinct entries per row
    assert_same(got, want)
    # A fresh draw selects differently.
    _, fresh = again()
    assert not torch.equal(fresh[(0, 0)], sel[(0, 0)])


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["tinyprop", "mass"])
def test_adaptive_k_against_the_reference(mode, backend, rule):
    """Adaptive k in every step: the kept entries (recorded, padded with a kept column) through
    the reference give the same gradients; k's differ between rows and stay in bounds."""
    k = 9
    adapt = AdaptiveK(min_k=2, rule=rule, s_min=0.1, share=0.5)
    _, sparse = make_pair(k, mode, layers=2, bidir=True, backend=backend, adapt=adapt)
    got, sel, want, _ = run_recorded(sparse)
    valid = torch.arange(T).unsqueeze(1) < torch.tensor(LENGTHS)  # (T, B)
    counts = torch.cat(
        [torch.tensor([len(set(r.tolist())) for r in idx[valid]]) for idx in sel.values()]
    )
    assert counts.min() >= 2 and counts.max() <= k and len(set(counts.tolist())) > 1
    assert 2 <= sparse.last_k <= k
    assert_same(got, want)


def test_reference_mask_keeps_k_per_row():
    g = torch.randn(4, 12, dtype=F64)
    gates = torch.zeros(4, 12, dtype=F64, requires_grad=True)
    mask_topk_grad(gates, 3, "per_example").backward(g)
    assert ((gates.grad != 0).sum(1) == 3).all()
    gates.grad = None
    mask_topk_grad(gates, 3, "unified").backward(g)
    assert (gates.grad != 0).any(0).sum() == 3


# ---------------------------------------------------------------------------------------------
# Usage record


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
def test_usage_record_merges_gates_into_cells(mode):
    _, sparse = make_pair(3, mode, layers=2, bidir=True)
    sizes = sparse.sizes()
    sparse.usage = {
        key: (torch.zeros(h, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        for key, h in sizes.items()
    }
    sparse.debug_selections = {}
    x, inp = make_input(packed=True)
    first = {}
    for rep in range(2):
        out, _ = sparse(inp())
        to_padded(out).sum().backward()
        valid = torch.arange(T).unsqueeze(1) < torch.tensor(LENGTHS)
        for key, idx in sparse.debug_selections.items():
            cells = idx[valid] % HID  # (rows, k)
            per_row = torch.zeros(cells.shape[0], HID, dtype=torch.bool)
            per_row.scatter_(1, cells, True)  # a cell counts once per row
            expect = per_row.sum(0)
            counts, selections = sparse.usage[key]
            assert int(selections) == sum(LENGTHS) * (rep + 1)
            if rep == 0:
                first[key] = counts.clone()
                assert torch.equal(counts, expect)
                assert (counts <= selections).all()
            else:
                assert torch.equal(counts - first[key], expect)


def test_usage_record_dense_counts_every_cell():
    _, sparse = make_pair(4 * HID)
    sparse.usage = {
        (0, 0): (torch.zeros(HID, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    }
    x, inp = make_input()
    sparse(inp())[0].sum().backward()
    counts, selections = sparse.usage[(0, 0)]
    assert torch.equal(counts, torch.full((HID,), T * B)) and int(selections) == T * B


# ---------------------------------------------------------------------------------------------
# Module API and conversion


def test_constructor_errors_and_repr():
    with pytest.raises(TypeError, match="config=MePropConfig"):
        SparseLSTM(3, 4)
    with pytest.raises(ValueError, match="proj_size=2"):
        SparseLSTM(3, 4, proj_size=2, config=MePropConfig(k=2))
    lstm = SparseLSTM(3, 4, 2, bidirectional=True, config=MePropConfig(k=2, mode="unified"))
    assert "k=2, mode=unified" in repr(lstm)
    assert lstm.sizes() == {(0, 0): 4, (0, 1): 4, (1, 0): 4, (1, 1): 4}
    with pytest.raises(ValueError, match="input_size=3"):
        lstm(torch.randn(5, 2, 7))
    with pytest.raises(ValueError, match=r"expected \(4, 2, 4\)"):
        lstm(torch.randn(5, 2, 3), (torch.zeros(4, 3, 4), torch.zeros(4, 3, 4)))
    with pytest.raises(ValueError, match=r"Convert input: input.to\(torch.float32\)"):
        lstm(torch.randn(5, 2, 3, dtype=F64))


@pytest.mark.parametrize("mode", ["per_example", "unified", "random"])
@pytest.mark.parametrize("k", [2, 4 * HID])
def test_empty_batch_as_nn_lstm(mode, k):
    dense, sparse = make_pair(k, mode, layers=2, bidir=True)
    for module in (dense, sparse):
        x = torch.randn(T, 0, IN, dtype=F64, requires_grad=True)
        out, (h, c) = module(x)
        assert out.shape == (T, 0, 2 * HID) and h.shape == c.shape == (4, 0, HID)
        (out.sum() + h.sum() + c.sum()).backward()
        assert x.grad.shape == x.shape
        assert all(not p.grad.any() for p in module.parameters())


def test_sparsify_swaps_lstm_in_place_and_back():
    model = nn.Sequential(nn.LSTM(IN, HID, 2, bidirectional=True))
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    sparsify_(model, MePropConfig(k=3))
    lstm = model[0]
    assert type(lstm) is SparseLSTM and lstm.config.k == 3 and lstm.usage is None
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    out, _ = lstm(torch.randn(T, B, IN))
    out.sum().backward()
    densify_(model)
    assert type(lstm) is nn.LSTM and not hasattr(lstm, "config")
    lstm(torch.randn(T, B, IN))
    with pytest.raises(ValueError, match="proj_size=2"):
        sparsify_(nn.LSTM(3, 4, proj_size=2), MePropConfig(k=2))


def test_dropout_between_layers_only_in_training():
    lstm = SparseLSTM(IN, HID, 2, dropout=0.5, config=MePropConfig(k=3)).double()
    x = torch.randn(T, B, IN, dtype=F64)
    a, b = lstm(x)[0], lstm(x)[0]
    assert not torch.equal(a, b)
    lstm.eval()
    torch.testing.assert_close(lstm(x)[0], reference_lstm(lstm, x)[0], **TOL)


# ---------------------------------------------------------------------------------------------
# Pruning


def dead_cells_model():
    """A 2-layer bidirectional SparseLSTM and a consumer Linear, with some cells whose every
    h-contribution is zero: their columns in W_hh (own direction), in the next layer's W_ih,
    and in the consumer."""
    torch.manual_seed(1)
    lstm = SparseLSTM(IN, HID, 2, bidirectional=True, config=MePropConfig(k=3)).double()
    head = nn.Linear(2 * HID, 3).double()
    dead = {(0, 0): [1, 3], (0, 1): [0], (1, 0): [4], (1, 1): [2, 3]}
    with torch.no_grad():
        for (layer, d), cells in dead.items():
            getattr(lstm, f"weight_hh_l{layer}{'_reverse' if d else ''}")[:, cells] = 0
            cols = [c + d * HID for c in cells]
            if layer == 0:
                lstm.weight_ih_l1[:, cols] = 0
                lstm.weight_ih_l1_reverse[:, cols] = 0
            else:
                head.weight[:, cols] = 0
    return lstm, head, dead


def test_pruning_dead_cells_keeps_outputs():
    lstm, head, dead = dead_cells_model()
    x, inp = make_input(packed=True)
    out_before = to_padded(lstm(inp())[0])
    y_before = head(out_before)
    opt = torch.optim.Adam([*lstm.parameters(), *head.parameters()])
    to_padded(lstm(inp())[0]).sum().backward()
    opt.step()  # some optimizer state to slice
    with torch.no_grad():  # put the dead cells back to their zeros (Adam moved them)
        for n, p in dead_cells_model()[0].named_parameters():
            getattr(lstm, n).copy_(p)
        head.load_state_dict(dead_cells_model()[1].state_dict())
    kept_cols = None
    cuts = []
    for (layer, d), cells in dead.items():
        keep = torch.tensor([c for c in range(HID) if c not in cells])
        if layer == 1:
            cols = lstm_output_columns(lstm, d, keep)
            # Output columns surviving, in terms of the original output:
            prev = torch.arange(2 * HID) if kept_cols is None else kept_cols
            kept_cols = prev[cols]
        cuts += prune_lstm_cells_(lstm, layer, d, keep, consumers=[head] if layer == 1 else [])
    update_optimizer_(opt, cuts, slice_state=True)
    assert lstm.sizes() == {(0, 0): 3, (0, 1): 4, (1, 0): 4, (1, 1): 3}
    assert lstm.weight_ih_l1.shape == (16, 7) and lstm.weight_ih_l1_reverse.shape == (12, 7)
    assert lstm.weight_hh_l1_reverse.shape == (12, 3) and head.weight.shape == (3, 7)
    assert "sizes=" in repr(lstm)
    out_after, (h, c) = lstm(inp())
    out_after = to_padded(out_after)
    assert isinstance(h, tuple) and [t.shape[1] for t in h] == [3, 4, 4, 3]
    torch.testing.assert_close(out_after, out_before[..., kept_cols], **TOL)
    torch.testing.assert_close(head(out_after), y_before, **TOL)
    # Training goes on: the optimizer holds exactly the new parameters.
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in [*lstm.parameters(), *head.parameters()]
    }
    head(out_after).sum().backward()
    opt.step()
    # Per-direction widths against the reference, with per-(layer, direction) states.
    hx = tuple(
        [torch.randn(B, w, dtype=F64, requires_grad=True) for w in lstm.sizes().values()]
        for _ in "hc"
    )
    weights = (torch.randn(T, B, 7, dtype=F64), 1.0, 1.0)
    got = run(lstm, x, inp, None, weights)
    want = run(lstm, x, inp, None, weights, fn=ref_fn(lstm))
    assert_same(got, want)
    out, (h, c) = lstm(inp(), hx)
    out, (h2, c2) = reference_lstm(lstm, inp(), hx)
    for a, b in zip(h, h2, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_prune_errors_and_densify_widths():
    lstm = SparseLSTM(IN, HID, 1, bidirectional=True, config=MePropConfig(k=3))
    with pytest.raises(IndexError, match="direction"):
        prune_lstm_cells_(lstm, 0, 2, torch.tensor([0]))
    with pytest.raises(ValueError, match="keep at least one"):
        prune_lstm_cells_(lstm, 0, 0, torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="SparseLSTM"):
        prune_lstm_cells_(nn.LSTM(IN, HID), 0, 0, torch.tensor([0]))
    prune_lstm_cells_(lstm, 0, 0, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="different widths"):
        densify_(lstm)
    prune_lstm_cells_(lstm, 0, 1, torch.tensor([1, 4]))
    x = torch.randn(T, B, IN)
    before = lstm(x)[0]
    densify_(lstm)
    assert type(lstm) is nn.LSTM and lstm.hidden_size == 2
    torch.testing.assert_close(lstm(x)[0], before)
