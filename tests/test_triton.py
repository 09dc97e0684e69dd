"""backend="triton" (meprop.kernels.triton_ops), checked on CPU tensors in Triton's interpreter.

TRITON_INTERPRET=1 is set per test (monkeypatch): triton_ops wraps its kernels with triton.jit
at launch time, so the interpreter is used whenever triton was first imported. Small shapes:
the interpreter runs each program in Python.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[gpu]')")

from meprop import config, lstm, ops  # noqa: E402
from meprop.kernels import triton_ops as T  # noqa: E402
from meprop.ops import sparse_linear  # noqa: E402
from meprop.reference import reference_backward  # noqa: E402

# (M, n, in, k): odd sizes, k = 1, k = n - 1 (k >= n never reaches the implementations: the
# autograd function takes the dense gradient first; see test_triton_k_at_least_n_is_dense).
SHAPES = [(1, 2, 3, 1), (7, 13, 11, 1), (9, 13, 5, 12), (33, 40, 17, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_backend(monkeypatch):
    """backend="triton" through meprop.ops and meprop.lstm: as wired there, or patched in here
    where meprop.config does not list it yet."""
    if "triton" in config.BACKENDS:
        return
    monkeypatch.setattr(config, "BACKENDS", (*config.BACKENDS, "triton"))
    monkeypatch.setitem(ops.IMPLEMENTATIONS, "triton", T.backward)
    plain = lstm.kernel_module
    monkeypatch.setattr(lstm, "kernel_module", lambda b, t: T if b == "triton" else plain(b, t))


def problem(m, n, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g, x, w = (torch.randn(s, generator=gen).to(dtype) for s in ((m, n), (m, d), (n, d)))
    return g, x, w


def check_topk(g, idx, vals, k):
    """(idx, vals) is a top-k of each row of g: distinct, the right values, none larger left."""
    assert idx.shape == vals.shape == (g.shape[0], k)
    assert torch.equal(vals, g.gather(1, idx))
    assert all(len(set(r.tolist())) == k for r in idx)
    rest = g.abs().float().scatter(1, idx, -1.0)
    assert (vals.abs().float().min(1).values >= rest.max(1).values).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_triton_backward_matches_reference(mode, dtype):
    for m, n, d, k in SHAPES:
        g, x, w = problem(m, n, d, dtype, seed=m + n)
        sel, dx, dw, db = T.backward(g, x, w, k, mode, True, True, False, True)
        if mode == "per_example":
            assert sel[0] == "rows"
            check_topk(g, sel[1], sel[2], k)
        else:
            assert sel[0] == "cols" and sel[1].shape == (k,)
            assert torch.equal(sel[1], sel[1].sort().values)
            assert torch.equal(sel[2], g[:, sel[1]])
            if dtype == torch.float32:
                assert torch.equal(sel[1], ops.select_columns(g, k))
        # the reference in float64 on the same selection (ties in half precision may differ)
        rdx, rdw, rdb = reference_backward(
            x.double(), w.double(), g.double(), k, mode, selection=sel[1]
        )
        for got, want in ((dx, rdx), (dw, rdw), (db, g.sum(0))):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), want.double(), **TOL[dtype])
        # row-sparse dW: the same numbers, only the touched rows
        _, dx2, dws, db2 = T.backward(g, x, w, k, mode, False, True, True, False)
        assert dx2 is None and db2 is None and dws.is_sparse and dws.is_coalesced()
        assert torch.equal(dws.to_dense(), dw)
        touched = sel[1].flatten().unique()
        assert torch.equal(dws.indices()[0], touched)
        # only dx
        _, dx3, dw3, _ = T.backward(g, x, w, k, mode, True, False, False, False)
        assert dw3 is None and torch.equal(dx3, dx)


def test_triton_row_ops_match_torch():
    g, x, w = problem(10, 7, 6, torch.float64)
    idx, vals = T.topk_rows(g, 3)
    gm = torch.zeros_like(g).scatter_(1, idx, vals)
    torch.testing.assert_close(T.rows_matmul(idx, vals, w), gm @ w)
    dense = T.rows_outer_dense(idx, vals, x, 7)
    torch.testing.assert_close(dense, gm.t() @ x)
    rows, dw_rows = T.rows_outer(idx, vals, x, 7)
    assert torch.equal(rows, idx.flatten().unique())
    assert torch.equal(dw_rows, dense[rows])
    torch.testing.assert_close(T.column_scores(g), g.abs().sum(0))
    # strided operands (a transposed weight) and empty inputs
    wt = torch.randn(6, 7, dtype=torch.float64).t()
    torch.testing.assert_close(T.rows_matmul(idx, vals, wt), gm @ wt)
    e = torch.empty(0, 3, dtype=torch.int64)
    assert T.rows_matmul(e, e.double(), w).shape == (0, 6)
    assert torch.equal(T.rows_outer_dense(e, e.double(), x[:0], 7), torch.zeros(7, 6).double())
    assert T.rows_outer(e, e.double(), x[:0], 7)[1].shape == (0, 6)


def test_triton_dw_is_deterministic_with_many_repeats():
    # 64 rows into 5 columns: every output row sums many pairs, in a fixed order
    g, x, _ = problem(64, 5, 33, torch.float32)
    idx, vals = T.topk_rows(g, 3)
    a = T.rows_outer_dense(idx, vals, x, 5)
    assert torch.equal(a, T.rows_outer_dense(idx, vals, x, 5))
    gm = torch.zeros_like(g).scatter_(1, idx, vals)
    torch.testing.assert_close(a, gm.t() @ x)


def test_triton_nan_is_selected():
    g, x, w = problem(4, 9, 5, torch.float32)
    g[2, 6] = float("nan")
    sel, dx, dw, _ = T.backward(g, x, w, 2, "per_example", True, True, False, False)
    assert 6 in sel[1][2].tolist() and dx[2].isnan().all() and dw[6].isnan().all()
    sel, dx, dw, _ = T.backward(g, x, w, 2, "unified", True, True, False, False)
    assert 6 in sel[1].tolist() and dx.isnan().any()


def test_triton_errors(monkeypatch):
    g, x, w = problem(4, 9, 5, torch.float32)
    idx, vals = T.topk_rows(g, 2)
    with pytest.raises(IndexError, match="outside"):
        T.rows_outer(idx, vals, x, 3)
    with pytest.raises(ValueError, match="k must be"):
        T.topk_rows(g, 10)
    with pytest.raises(ValueError, match="one dtype"):
        T.rows_matmul(idx, vals, w.double())
    with pytest.raises(ValueError, match="mode"):
        T.backward(g, x, w, 2, "random", True, True, False, False)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not T.supports(g)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        T.backward(g, x, w, 2, "per_example", True, True, False, False)
    monkeypatch.setattr(T, "triton", None)
    assert not T.available()
    with pytest.raises(RuntimeError, match="pip install"):
        T.column_scores(g)


def test_triton_opcheck():
    g, x, w = problem(4, 9, 5, torch.float32)
    idx, vals = T.topk_rows(g, 3)
    ns = torch.ops.meprop_triton
    torch.library.opcheck(ns.topk_rows.default, (g, 3))
    torch.library.opcheck(ns.rows_matmul.default, (idx, vals, w))
    torch.library.opcheck(ns.rows_outer.default, (idx, vals, x, 9))
    torch.library.opcheck(ns.rows_outer_dense.default, (idx, vals, x, 9))
    torch.library.opcheck(ns.column_scores.default, (g,))
    torch.library.opcheck(ns.column_scores.default, (g.bfloat16(),))


def test_triton_ops_trace_under_torch_compile():
    g, x, w = problem(6, 9, 5, torch.float32)
    ns = torch.ops.meprop_triton

    def step(g, x, w):
        idx, vals = ns.topk_rows(g, 3)
        cols = ns.column_scores(g).topk(2).indices
        return ns.rows_matmul(idx, vals, w), ns.rows_outer_dense(idx, vals, x, 9), cols

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(g, x, w), step(g, x, w), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_triton_sparse_linear_leading_dims_bias(triton_backend, mode):
    """Through sparse_linear's autograd function: leading dimensions flattened, bias on/off,
    sparse_bias, sparse_grad; against the reference on the same (deterministic) selection."""
    gen = torch.Generator().manual_seed(1)
    for bias, sparse_bias, sparse_grad in ((True, False, False), (True, True, True), (False,) * 3):
        x = torch.randn(2, 3, 7, generator=gen, requires_grad=True)
        w = torch.randn(11, 7, generator=gen, requires_grad=True)
        b = torch.randn(11, generator=gen, requires_grad=True) if bias else None
        go = torch.randn(2, 3, 11, generator=gen)
        opts = dict(k=4, mode=mode, sparse_bias=sparse_bias, sparse_grad=sparse_grad)
        sparse_linear(x, w, b, backend="triton", **opts).backward(go)
        rdx, rdw, rdb = reference_backward(x.detach(), w.detach(), go, 4, mode, sparse_bias)
        torch.testing.assert_close(x.grad, rdx)
        assert w.grad.is_sparse == sparse_grad
        torch.testing.assert_close(w.grad.to_dense(), rdw)
        if bias:
            torch.testing.assert_close(b.grad, rdb)


def test_triton_k_at_least_n_is_dense(triton_backend):
    # k >= n is the dense gradient, taken before any implementation runs
    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    sparse_linear(x, w, None, k=3, backend="triton", sparse_grad=True).sum().backward()
    torch.testing.assert_close(w.grad.to_dense(), torch.ones(5, 3).t() @ x.detach())


@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_triton_sparse_lstm_gate_products(triton_backend, mode):
    """SparseLSTM's per-step products and final dW through the Triton kernels (triton_ops as
    the kernel module) give the gradients of backend="torch"."""
    grads = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = config.MePropConfig(k=3, mode=mode, backend=backend)
        net = lstm.SparseLSTM(4, 3, config=cfg)
        x = torch.randn(3, 2, 4, requires_grad=True)
        out, _ = net(x)
        out.pow(2).sum().backward()
        grads[backend] = [x.grad, *(p.grad for p in net.parameters())]
    for a, b in zip(grads["torch"], grads["triton"], strict=True):
        torch.testing.assert_close(a, b)


def _bench_gpu():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_triton_bench_gpu_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert _bench_gpu().main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_triton_bench_gpu_tables_run_on_cpu(triton_backend, monkeypatch, capsys):
    """The benchmark's tables, each callable run once, on tiny CPU shapes in the interpreter
    (the script itself needs a GPU; this checks that its code runs)."""
    bench = _bench_gpu()
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "gpu_time", lambda fn, **kw: (fn(), 1.0)[1])
    shapes = [(3, 5, 7, (2,))]
    bench.layer_backward_table(shapes, torch.float32, sparse_grad=True)
    bench.layer_autograd_table(shapes, torch.bfloat16, "triton")
    bench.mlp_step_table("triton", ks=(2,), batch=3)
    out = capsys.readouterr().out
    assert "unified triton ms" in out and "per_example k=2" in out


@pytest.mark.skipif("triton" not in config.BACKENDS, reason="backend='triton' not wired yet")
@pytest.mark.parametrize("mode", ["per_example", "unified"])
def test_triton_backend_under_torch_compile(mode):
    """torch.compile traces backend="triton" (torch.ops.meprop_triton while compiling), with
    no graph break."""
    import copy

    from torch import nn
    from torch._dynamo.utils import counters

    from meprop.convert import hidden_layers, sparsify_

    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = config.MePropConfig(k=3, mode=mode, backend="triton")
    sparsify_(model, cfg, filter_fn=hidden_layers(model))
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 12)
    compiled(x).square().sum().backward()
    assert not counters["graph_break"]
    eager(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
