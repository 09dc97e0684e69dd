"""Adaptive k (AdaptiveK): the rules' k's, their bounds, last_k, and the gradients against the
reference (mask each row's top-k_i, then the dense formulas)."""

import re

import pytest
import torch
from torch import nn

from meprop import AdaptiveK, MePropConfig, SparseLinear, sparse_linear, sparsify_
from meprop.adaptive import KRecord, batch_k, row_ks
from meprop.convert import hidden_layers
from meprop.kernels import native
from meprop.ops import column_scores

BACKENDS = ["torch", "masked", "auto", "numba"] + (["native"] if native.available() else [])


# --------------------------------------------------------------------------------------------
# The config


@pytest.mark.parametrize(
    "kw,err",
    [
        (dict(min_k=0), "min_k must be >= 1"),
        (dict(rule="topk"), "rule must be one of"),
        (dict(s_min=0.6, s_max=0.5), "s_min (0.6) must be <= s_max (0.5)"),
        (dict(s_max=1.5), "s_max must be in [0, 1]"),
        (dict(damping=0.0), "damping must be in (0, 1]"),
        (dict(share=0), "share must be in (0, 1]"),
        (dict(measure="l2"), "measure must be 'abs' or 'square'"),
    ],
)
def test_adaptive_k_rejects_bad_values(kw, err):
    with pytest.raises(ValueError, match=re.escape(err)):
        AdaptiveK(**kw)


def test_config_checks_adapt():
    with pytest.raises(ValueError, match=r"adapt.min_k \(30\) must be <= k \(20\)"):
        MePropConfig(k=20, adapt=AdaptiveK(min_k=30))
    for mode in ("random", "symmetric"):
        with pytest.raises(
            ValueError, match=f"adapt needs mode 'per_example' or 'unified', got '{mode}'"
        ):
            MePropConfig(k=20, mode=mode, adapt=AdaptiveK())
    with pytest.raises(TypeError, match="adapt must be an AdaptiveK"):
        MePropConfig(k=20, adapt={"rule": "mass"})
    cfg = MePropConfig(k=20, adapt=AdaptiveK(min_k=2, rule="mass"))
    assert cfg.to_dict()["adapt"]["rule"] == "mass" and hash(cfg)


# --------------------------------------------------------------------------------------------
# The rules on constructed inputs


def test_mass_keeps_exactly_the_required_share():
    # |g| rows of powers of two (exact sums): row 0's 8+4 = 12 of 16 is 75%, row 1 needs all
    # four of 1+1+1+1 for 100%.
    g = torch.tensor([[8.0, -1.0, 4.0, 2.0, 1.0, 0.0], [1.0, 0.0, -1.0, 1.0, 0.0, 1.0]])
    rec = KRecord()
    idx, _, ks, big = row_ks(g, 5, AdaptiveK(rule="mass", share=0.75), rec)
    assert ks.tolist() == [2, 3] and big == 3
    assert idx[0, :2].tolist() == [0, 2]  # 8 then 4
    assert rec.last_k == 2.5
    _, _, ks, _ = row_ks(g, 5, AdaptiveK(rule="mass", share=1.0), rec)
    assert ks.tolist() == [5, 4]  # row 0: 8+4+2+1+1 = 16 needs 5 entries
    # just above a boundary: one more entry
    _, _, ks, _ = row_ks(g, 5, AdaptiveK(rule="mass", share=0.7501), rec)
    assert ks[0] == 3
    # squares: 64 of 64+16+4+1+1 = 86 is 74%: share 0.74 needs one entry, 0.75 two
    _, _, ks, _ = row_ks(g[:1], 5, AdaptiveK(rule="mass", share=64 / 86, measure="square"), rec)
    assert ks.tolist() == [1]
    _, _, ks, _ = row_ks(g[:1], 5, AdaptiveK(rule="mass", share=0.75, measure="square"), rec)
    assert ks.tolist() == [2]


def test_mass_unified_counts_columns_by_their_sums():
    # column sums of |g|: 8, 4, 2, 1, 1
    g = torch.tensor([[4.0, -2.0, 1.0, 0.5, 0.5], [4.0, 2.0, -1.0, 0.5, 0.5]])
    rec = KRecord()
    k, cols = batch_k(column_scores(g), 4, AdaptiveK(rule="mass", share=12 / 16), rec)
    assert k == 2 and cols.tolist() == [0, 1] and rec.last_k == 2.0
    k, cols = batch_k(column_scores(g), 4, AdaptiveK(rule="mass", share=1.0), rec)
    assert k == 4  # capped at k_max (all five would be needed)


def test_tinyprop_follows_the_error_relative_to_its_largest():
    # row L1 norms 8, 4, 2 (n = 8): the first call's largest is 8
    g = torch.zeros(3, 8)
    g[0, :4] = 2.0
    g[1, :4] = 1.0
    g[2, :2] = 1.0
    adapt = AdaptiveK(rule="tinyprop", s_min=0.25, s_max=1.0)
    rec = KRecord()
    _, _, ks, big = row_ks(g, 7, adapt, rec)
    # share = 0.25 + 0.75 * Y / 8: 1.0, 0.625, 0.4375 -> k = 8 (capped at 7), 5, 3.5 -> 4
    assert ks.tolist() == [7, 5, 4] and big == 7 and rec.y_max == 8.0
    _, _, ks, _ = row_ks(g[1:] / 2, 7, adapt, rec)  # smaller errors: the largest stays 8
    assert ks.tolist() == [round(8 * (0.25 + 0.75 * 2 / 8)), round(8 * (0.25 + 0.75 * 1 / 8))]
    assert rec.y_max == 8.0
    deep = KRecord(depth=2, y_max=8.0)
    _, _, ks, _ = row_ks(g, 7, AdaptiveK(s_min=0.25, s_max=1.0, damping=0.5), deep)
    assert ks.tolist() == [2, 1, 1]  # shares x 0.25: 0.25, 0.156, 0.109 of 8 (min_k 1)
    # unified: Y is the batch's total |g| (14), the first call's own largest
    rec = KRecord()
    k, cols = batch_k(column_scores(g), 7, adapt, rec)
    assert k == 7 and rec.y_max == 14.0
    k, _ = batch_k(column_scores(g / 2), 7, adapt, rec)
    assert k == round(8 * (0.25 + 0.75 * 0.5)) and rec.last_k == k


def test_k_stays_in_its_bounds():
    gen = torch.Generator().manual_seed(0)
    for rule in ("tinyprop", "mass"):
        adapt = AdaptiveK(min_k=3, rule=rule, share=0.5)
        rec = KRecord()
        for scale in (1.0, 10.0, 0.01, 0.0):
            g = torch.randn(16, 40, generator=gen) * scale
            _, _, ks, big = row_ks(g, 12, adapt, rec)
            assert 3 <= ks.min() and ks.max() <= 12 and big == ks.max()
            k, cols = batch_k(column_scores(g), 12, adapt, rec)
            assert 3 <= k <= 12 and cols.shape == (k,)


# --------------------------------------------------------------------------------------------
# Gradients


def masked_reference(x, w, g, keep):
    """dx, dW, db with g masked to ``keep`` (M, n) bool; db from the full gradient."""
    gs = g * keep
    return gs @ w, gs.t() @ x, g.sum(0)


def row_keep(g, ks):
    order = g.abs().argsort(dim=1, descending=True)
    keep = torch.zeros_like(g, dtype=torch.bool)
    for i, k in enumerate(ks.tolist()):
        keep[i, order[i, :k]] = True
    return keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["tinyprop", "mass"])
@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_adaptive_gradients_match_the_reference(backend, rule, mode, sparse_grad):
    torch.manual_seed(0)
    m, d, n, k = 9, 13, 24, 10
    x = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(m, 1, dtype=torch.float64) * torch.rand(1, n, dtype=torch.float64) ** 3
    g = torch.randn(m, n, dtype=torch.float64) * scale  # rows and columns of unlike sizes
    adapt = AdaptiveK(min_k=2, rule=rule, s_min=0.1, share=0.6)
    # (unified tinyprop: a first call keeps k; a larger error seen before keeps fewer)
    y_max = 6 * g.abs().sum().item() if mode == "unified" else 0.0
    rec = KRecord(y_max=y_max)
    y = sparse_linear(x, w, b, k, mode, backend=backend, sparse_grad=sparse_grad, adapt=adapt,
                      record=rec)  # fmt: skip
    y.backward(g)
    if mode == "per_example":
        _, _, ks, _ = row_ks(g, k, adapt, KRecord())
        keep = row_keep(g, ks)
        assert rec.last_k == pytest.approx(ks.double().mean().item())
        assert len(set(ks.tolist())) > 1  # the rows' k's differ: the test means something
    else:
        kb, cols = batch_k(column_scores(g), k, adapt, KRecord(y_max=y_max))
        keep = torch.zeros_like(g, dtype=torch.bool)
        keep[:, cols] = True
        assert rec.last_k == kb and 2 <= kb < k
    rx, rw, rb = masked_reference(x.detach(), w.detach(), g, keep)
    torch.testing.assert_close(x.grad, rx)
    dw = w.grad.to_dense() if sparse_grad else w.grad
    assert w.grad.is_sparse == sparse_grad
    torch.testing.assert_close(dw, rw)
    torch.testing.assert_close(b.grad, rb)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_float32_and_leading_dimensions(backend):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 7, requires_grad=True)
    w = torch.randn(30, 7, requires_grad=True)
    g = torch.randn(2, 5, 30)
    adapt = AdaptiveK(min_k=1, rule="mass", share=0.5)
    sparse_linear(x, w, None, 12, backend=backend, adapt=adapt).backward(g)
    _, _, ks, _ = row_ks(g.reshape(10, 30), 12, adapt, KRecord())
    rx, rw, _ = masked_reference(x.detach().reshape(10, 7), w.detach(), g.reshape(10, 30),
                                 row_keep(g.reshape(10, 30), ks))  # fmt: skip
    torch.testing.assert_close(x.grad.reshape(10, 7), rx)
    torch.testing.assert_close(w.grad, rw)


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_min_k_equal_to_k_is_fixed_k(mode):
    torch.manual_seed(2)
    x = torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(20, 8, dtype=torch.float64)
    g = torch.randn(6, 20, dtype=torch.float64)
    grads = []
    for adapt in (None, AdaptiveK(min_k=5, rule="tinyprop"), AdaptiveK(min_k=5, rule="mass")):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        sparse_linear(xx, ww, None, 5, mode, adapt=adapt).backward(g)
        grads.append((xx.grad, ww.grad))
    for dx, dw in grads[1:]:
        torch.testing.assert_close(dx, grads[0][0])
        torch.testing.assert_close(dw, grads[0][1])


def test_usage_record_counts_what_was_kept():
    torch.manual_seed(3)
    x = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(16, 5, requires_grad=True)
    g = torch.randn(7, 16)
    counts, sel = torch.zeros(16), torch.zeros(1)
    adapt = AdaptiveK(min_k=1, rule="mass", share=0.5)
    sparse_linear(x, w, None, 10, counts=counts, selections=sel, adapt=adapt).backward(g)
    _, _, ks, _ = row_ks(g, 10, adapt, KRecord())
    assert counts.sum() == ks.sum() and sel.item() == 7
    torch.testing.assert_close(counts, row_keep(g, ks).sum(0).float())


# --------------------------------------------------------------------------------------------
# Modules


def test_layers_report_last_k_and_depth():
    torch.manual_seed(4)
    mlp = nn.Sequential(
        nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 3)
    )
    cfg = MePropConfig(k=12, adapt=AdaptiveK(min_k=2, rule="tinyprop", damping=0.5))
    sparsify_(mlp, cfg, filter_fn=hidden_layers(mlp))
    first, second = mlp[0], mlp[2]
    assert (first.k_record.depth, second.k_record.depth) == (1, 0)
    assert first.last_k is None and "adapt=tinyprop" in repr(first)
    mlp(torch.randn(8, 10)).sum().backward()
    assert 2 <= first.last_k <= 12 and 2 <= second.last_k <= 12
    # TinyProp's damping: the deeper layer (from the output) keeps a smaller share
    assert first.last_k <= 30 * 0.5 + 0.5
    fixed = SparseLinear(10, 30, config=MePropConfig(k=7))
    fixed(torch.randn(4, 10)).sum().backward()
    assert fixed.last_k == 7.0
    wide = SparseLinear(10, 5, config=MePropConfig(k=7))  # k >= n: every entry
    wide(torch.randn(4, 10)).sum().backward()
    assert wide.last_k == 5.0


def test_adaptive_training_decreases_loss_and_k():
    torch.manual_seed(5)
    x = torch.randn(256, 20)
    y = (x[:, :3].sum(1) > 0).long()
    mlp = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
    )
    sparsify_(mlp, MePropConfig(k=32, adapt=AdaptiveK(min_k=2)), filter_fn=hidden_layers(mlp))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    ks, losses = [], []
    for _ in range(60):
        loss = nn.functional.cross_entropy(mlp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        ks.append(mlp[0].last_k)
    assert losses[-1] < 0.5 * losses[0]
    assert sum(ks[-10:]) / 10 < sum(ks[:3]) / 3  # errors shrink, so does k


@pytest.mark.parametrize("rule", ["tinyprop", "mass"])
def test_backends_keep_the_same_record(rule):
    """The C++ kernels compute the k's themselves: the same k's, last_k and largest error as
    the PyTorch path over a few calls of shrinking errors."""
    torch.manual_seed(6)
    x = torch.randn(12, 9)
    w = torch.randn(40, 9, requires_grad=True)
    adapt = AdaptiveK(min_k=2, rule=rule, s_min=0.05, damping=0.8, share=0.7)
    records = {b: KRecord(depth=1) for b in BACKENDS}
    for scale in (1.0, 0.5, 0.7, 0.2):
        g = torch.randn(12, 40) * scale * torch.rand(12, 1)
        for backend, rec in records.items():
            w.grad = None
            sparse_linear(x, w, None, 16, backend=backend, adapt=adapt, record=rec).backward(g)
        want = records["torch"]
        for backend, rec in records.items():
            assert rec.last_k == pytest.approx(want.last_k), backend
            assert rec.y_max == pytest.approx(want.y_max, rel=1e-6), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 6, requires_grad=True)
    w = torch.randn(20, 6, requires_grad=True)
    for adapt in (AdaptiveK(), AdaptiveK(rule="mass")):
        rec = KRecord()
        sparse_linear(x, w, None, 8, backend=backend, adapt=adapt, record=rec).sum().backward()
        assert x.grad.shape == (0, 6) and not w.grad.any() and rec.y_max == 0.0
