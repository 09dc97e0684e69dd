"""SparseConv2d: every nn.Conv2d setting against the obviously-right reference (mask g's
channels, then nn.Conv2d's own autograd), exactness at k >= C_out, conversion, refusals."""

import copy

import pytest
import torch
from torch import nn

from meprop import AdaptiveK, MePropConfig, SparseConv2d, conv, converted, densify_, sparsify_
from meprop.conv import random_channels
from meprop.kernels import dispatch, native
from meprop.reference import reference_conv2d_backward, reference_conv2d_memory_backward

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # nn.Conv2d's own note on padding="same" with an even kernel (the dense reference's)
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

# nn.Conv2d settings (in_channels, out_channels and the rest), odd sizes throughout
SETTINGS = {
    "plain": dict(in_channels=5, out_channels=7, kernel_size=3),
    "stride2_pad1": dict(in_channels=5, out_channels=7, kernel_size=3, stride=2, padding=1),
    "tuples": dict(
        in_channels=4, out_channels=9, kernel_size=(3, 2), stride=(2, 1), padding=(2, 1)
    ),
    "dilation": dict(in_channels=5, out_channels=7, kernel_size=3, dilation=2, padding=2),
    "same": dict(in_channels=5, out_channels=7, kernel_size=3, padding="same"),
    "same_asymmetric": dict(in_channels=5, out_channels=7, kernel_size=(4, 3), padding="same"),
    "same_dilated_even": dict(
        in_channels=3, out_channels=7, kernel_size=2, dilation=3, padding="same"
    ),
    "valid": dict(in_channels=5, out_channels=7, kernel_size=3, padding="valid"),
    "groups": dict(in_channels=6, out_channels=9, kernel_size=3, groups=3, padding=1),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1),
    "depthwise_x2": dict(in_channels=6, out_channels=12, kernel_size=3, groups=6),
    "no_bias": dict(in_channels=5, out_channels=7, kernel_size=3, bias=False),
    "reflect": dict(
        in_channels=5, out_channels=7, kernel_size=3, padding=1, padding_mode="reflect"
    ),
    "replicate": dict(
        in_channels=5, out_channels=7, kernel_size=3, padding=(2, 1), padding_mode="replicate"
    ),
    "circular": dict(
        in_channels=5, out_channels=7, kernel_size=3, padding=1, padding_mode="circular"
    ),
    "circular_same": dict(
        in_channels=5, out_channels=7, kernel_size=(4, 3), padding="same", padding_mode="circular"
    ),
}
K = 3


def make(setting, config, dtype=torch.float32, batch=3, size=(9, 7)):
    """A dense nn.Conv2d, its SparseConv2d copy, and an input for them."""
    dense = nn.Conv2d(**SETTINGS[setting], dtype=dtype)
    sparse = sparsify_(copy.deepcopy(dense), config)
    x = torch.randn(batch, dense.in_channels, *size, dtype=dtype, requires_grad=True)
    return dense, sparse, x


def run(sparse, x, seed=1):
    """Forward, backward with a random g; returns (y, g, the random-mode draw)."""
    y = sparse(x)
    g = torch.randn_like(y)
    torch.manual_seed(seed)
    y.backward(g)
    torch.manual_seed(seed)  # random mode draws once in backward: the same draw again
    return y, g, random_channels(g.shape[0], g.shape[1], sparse.config.k, g.device)


def check(dense, sparse, x, g, mode, draw, tol=None, sparse_bias=False):
    sel = draw if mode == "random" else None
    rx, rw, rb = reference_conv2d_backward(dense, x, g, sparse.config.k, mode, sparse_bias, sel)
    tol = tol or {}
    torch.testing.assert_close(x.grad, rx, **tol)
    dw = sparse.weight.grad
    torch.testing.assert_close(dw.to_dense() if dw.is_sparse else dw, rw, **tol)
    if dense.bias is not None:
        torch.testing.assert_close(sparse.bias.grad, rb, **tol)


@pytest.fixture(params=["torch", "torch-cl", "masked", "direct"])
def impl(request, monkeypatch):
    """Each implementation: a config's backend, or (torch-cl, which auto alone runs) pinned;
    direct (the C++ kernel, auto's where it serves) through MEPROP_BACKEND=native, which runs
    it where it serves (stride 1, dilation 1, groups 1) and the compacted form elsewhere."""
    if request.param == "torch-cl":
        monkeypatch.setattr(conv, "_pick", lambda cfg, sel, args: "torch-cl")
        return "auto"
    if request.param == "direct":
        pin_native(monkeypatch)
        return "auto"
    return request.param


def pin_native(monkeypatch):
    """MEPROP_BACKEND=native with a fresh tuner (the pin is read where a signature is first
    seen: earlier tests' remembered choices would hide it)."""
    monkeypatch.setenv("MEPROP_BACKEND", "native")
    monkeypatch.setattr(dispatch, "_TUNER", dispatch.Tuner())


@pytest.mark.parametrize("mode", ["unified", "per_example", "random", "per_position"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_matches_reference(setting, mode, impl):
    dense, sparse, x = make(setting, MePropConfig(k=K, mode=mode, backend=impl))
    y, g, draw = run(sparse, x)
    torch.testing.assert_close(y, dense(x), rtol=1e-6, atol=1e-6)
    check(dense, sparse, x, g, mode, draw)
    # only the kept channels of dW are non-zero
    rows = int((sparse.weight.grad.flatten(1) != 0).any(1).sum())
    assert rows <= {"unified": K, "per_position": dense.out_channels}.get(mode, 3 * K)


@pytest.mark.parametrize("mode", ["unified", "per_example", "per_position"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(mode, dtype):
    dense, sparse, x = make("groups", MePropConfig(k=K, mode=mode), dtype=dtype)
    _, g, draw = run(sparse, x)
    assert sparse.weight.grad.dtype == dtype and x.grad.dtype == dtype
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else None
    check(dense, sparse, x, g, mode, draw, tol)


@pytest.mark.parametrize("mode", ["unified", "per_example", "per_position"])
@pytest.mark.parametrize("setting", ["plain", "stride2_pad1", "depthwise_x2"])
def test_channels_last(setting, mode, impl):
    dense, sparse, x = make(setting, MePropConfig(k=K, mode=mode, backend=impl))
    dense.to(memory_format=torch.channels_last)
    sparse.to(memory_format=torch.channels_last)
    x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    _, g, draw = run(sparse, x)
    check(dense, sparse, x, g, mode, draw)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("mode", ["unified", "per_example", "random"])
@pytest.mark.parametrize(
    "setting", ["plain", "same_asymmetric", "groups", "depthwise", "reflect", "circular_same"]
)
def test_k_at_least_out_channels_is_nn_conv2d_exactly(setting, mode):
    dense, sparse, x = make(setting, MePropConfig(k=dense_width(setting), mode=mode))
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn_like(dense(x))
    dense(x).backward(g)
    sparse(x2).backward(g)
    assert torch.equal(x.grad, x2.grad)
    for p, q in zip(dense.parameters(), sparse.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def dense_width(setting):
    return SETTINGS[setting]["out_channels"]


def test_k_at_least_out_channels_with_usage_or_sparse_grad_equals_dense():
    # these run through meProp's own backward (a record to keep, a sparse layout to give)
    dense, sparse, x = make("plain", MePropConfig(k=7, sparse_grad=True))
    sparse.usage = (torch.zeros(7), torch.zeros(1))
    y, g, _ = run(sparse, x)
    x2 = x.detach().clone().requires_grad_()
    dense(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    assert sparse.weight.grad.is_sparse
    torch.testing.assert_close(sparse.weight.grad.to_dense(), dense.weight.grad)
    assert sparse.usage[0].tolist() == [3.0] * 7 and sparse.usage[1].item() == 3


@pytest.mark.parametrize("mode", ["unified", "per_example", "per_position"])
def test_sparse_grad_and_sparse_bias(mode):
    dense, sparse, x = make(
        "groups", MePropConfig(k=K, mode=mode, sparse_grad=True, sparse_bias=True)
    )
    _, g, draw = run(sparse, x)
    dw = sparse.weight.grad
    assert dw.is_sparse and dw.sparse_dim() == 1 and dw.shape == dense.weight.shape
    bound = {"unified": K, "per_position": dense.out_channels}.get(mode, 3 * K)
    assert dw.coalesce().indices().shape[1] <= bound
    check(dense, sparse, x, g, mode, draw, sparse_bias=True)
    torch.optim.SGD(sparse.parameters(), lr=0.1).step()  # an optimizer takes the sparse dW


def test_usage_record_counts_kept_nonzero_channels():
    dense, sparse, x = make("plain", MePropConfig(k=2, mode="per_example"))
    sparse.usage = (torch.zeros(7), torch.zeros(1))
    y = sparse(x)
    g = torch.randn_like(y)
    g[:, 6] = 0  # never a non-zero gradient: never counted
    g[:, 0] *= 100  # every example's largest
    y.backward(g)
    counts, selections = sparse.usage
    assert selections.item() == 3 and counts.sum().item() == 3 * 2
    assert counts[0].item() == 3 and counts[6].item() == 0
    sparse.config = MePropConfig(k=2, mode="unified")
    sparse(x).backward(g)
    assert selections.item() == 6 and counts[0].item() == 6 and counts.sum().item() == 12


def test_per_position_keeps_k_channels_at_each_position_and_counts_positions():
    dense, sparse, x = make("plain", MePropConfig(k=2, mode="per_position"))
    sparse.usage = (torch.zeros(7, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    y = sparse(x)
    g = torch.randn_like(y)
    g[:, 6] = 0  # never a non-zero gradient: never counted
    y.backward(g)
    counts, selections = sparse.usage
    positions = y.shape[0] * y.shape[2] * y.shape[3]  # (example, position) pairs
    assert selections.item() == positions and counts.sum().item() == 2 * positions
    assert counts[6].item() == 0
    # every channel but the silent one was someone's top-2 somewhere, so dW has their rows
    assert int((sparse.weight.grad.flatten(1) != 0).any(1).sum()) == 6
    with pytest.raises(ValueError, match="adapt needs mode 'per_example' or 'unified'"):
        MePropConfig(k=2, mode="per_position", adapt=AdaptiveK(min_k=1))


@pytest.mark.parametrize("make_layer", ["linear", "sparse_linear", "lstm", "sparsify_"])
def test_linear_layers_refuse_per_position(make_layer):
    from meprop import SparseLinear, SparseLSTM, sparse_linear

    cfg = MePropConfig(k=2, mode="per_position")
    with pytest.raises(ValueError, match="'per_example' already selects per row"):
        if make_layer == "linear":
            SparseLinear(4, 5, config=cfg)
        elif make_layer == "sparse_linear":
            sparse_linear(torch.randn(2, 4), torch.randn(5, 4), k=2, mode="per_position")
        elif make_layer == "lstm":
            SparseLSTM(4, 5, config=cfg)
        else:
            sparsify_(nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(27, 2)), cfg)


def test_adaptive_k():
    # unified: batch_k's columns are the top kk of the scores, i.e. unified top-kk
    adapt = AdaptiveK(min_k=1, rule="mass", share=0.5)
    dense, sparse, x = make("plain", MePropConfig(k=5, mode="unified", adapt=adapt))
    _, g, _ = run(sparse, x)
    kk = sparse.last_k
    assert kk == int(kk) and 1 <= kk <= 5
    rx, rw, _ = reference_conv2d_backward(dense, x, g, int(kk), "unified")
    torch.testing.assert_close(x.grad, rx)
    torch.testing.assert_close(sparse.weight.grad, rw)
    # per example: each example keeps its fewest channels holding half its |g|
    dense, sparse, x = make("plain", MePropConfig(k=5, mode="per_example", adapt=adapt))
    _, g, _ = run(sparse, x)
    scores = g.abs().sum((2, 3))
    top, order = scores.sort(1, descending=True)
    ks = ((top.cumsum(1) < 0.5 * scores.sum(1, keepdim=True)).sum(1) + 1).clamp(1, 5)
    keep = torch.arange(7) < ks.unsqueeze(1)
    mask = torch.zeros_like(keep).scatter_(1, order, keep)
    assert sparse.last_k == pytest.approx(ks.float().mean().item())
    xr = x.detach().clone().requires_grad_()
    wr = dense.weight.detach().clone().requires_grad_()
    y = nn.Conv2d._conv_forward(dense, xr, wr, None)
    rx, rw = torch.autograd.grad(y, (xr, wr), g * mask[:, :, None, None])
    torch.testing.assert_close(x.grad, rx)
    torch.testing.assert_close(sparse.weight.grad, rw)


def test_warmup_runs_dense_first():
    dense, sparse, x = make("plain", MePropConfig(k=2, mode="unified", warmup=1))
    g = torch.randn_like(dense(x))
    dense(x).backward(g)
    x2 = x.detach().clone().requires_grad_()
    sparse(x2).backward(g)  # the warm-up step: nn.Conv2d's gradients
    assert torch.equal(sparse.weight.grad, dense.weight.grad) and sparse.last_k == 7
    sparse.zero_grad()
    sparse(x2).backward(g)
    assert int((sparse.weight.grad.flatten(1) != 0).any(1).sum()) == 2 and sparse.last_k == 2


def test_cpu_autocast():
    dense, sparse, x = make("stride2_pad1", MePropConfig(k=K, mode="unified"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse(x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, dense(x))
    g = torch.randn_like(y)
    y.backward(g)
    assert sparse.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    half = copy.deepcopy(dense).to(torch.bfloat16)
    rx, rw, rb = reference_conv2d_backward(half, x.detach().bfloat16(), g, K, "unified")
    tol = dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(x.grad, rx.float(), **tol)
    torch.testing.assert_close(sparse.weight.grad, rw.float(), **tol)
    torch.testing.assert_close(sparse.bias.grad, rb.float(), **tol)


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_empty_batch(mode):
    dense, sparse, x = make("groups", MePropConfig(k=K, mode=mode), batch=0)
    sparse(x).sum().backward()
    assert x.grad.shape == x.shape and not sparse.weight.grad.any()


def test_unbatched_input_and_no_grad():
    dense, sparse, x = make("same", MePropConfig(k=K, mode="per_example"))
    x1 = x[0].detach().requires_grad_()
    y = sparse(x1)
    assert y.shape == dense(x1).shape == (7, 9, 7)
    y.square().sum().backward()
    assert int((sparse.weight.grad.flatten(1) != 0).any(1).sum()) == K
    with torch.no_grad():
        assert torch.equal(sparse(x), dense(x))


def test_tuned_auto_backend_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("MEPROP_AUTOTUNE", "1")
    monkeypatch.delenv("MEPROP_BACKEND", raising=False)
    tuner = dispatch.Tuner(tmp_path / "dispatch.json")
    monkeypatch.setattr(dispatch, "_TUNER", tuner)
    for mode in ("unified", "per_example"):
        dense, sparse, x = make("plain", MePropConfig(k=K, mode=mode))
        _, g, draw = run(sparse, x)
        check(dense, sparse, x, g, mode, draw)
    assert tuner.measured == 2
    direct = {"direct"} if native.available() else set()
    for entry in tuner.choices().values():
        assert set(entry["us"]) == {"torch", "torch-cl", "masked"} | direct
    # a large convolution keeping an eighth of its channels: only the compacted forms timed
    layer = SparseConv2d(64, 64, 3, padding=1, config=MePropConfig(k=8, mode="unified"))
    x = torch.randn(4, 64, 32, 32, requires_grad=True)
    layer(x).sum().backward()
    assert tuner.measured == 3
    assert list(tuner.memo.values())[-1] in {"torch", "torch-cl"} | direct
    (entry,) = [e for cls, e in tuner.choices().items() if "/co7/" in cls]
    assert set(entry["us"]) == {"torch", "torch-cl"} | direct
    # a stride-2 convolution: no direct kernel to time
    layer = SparseConv2d(5, 7, 3, stride=2, config=MePropConfig(k=2, mode="unified"))
    layer(torch.randn(3, 5, 9, 9, requires_grad=True)).sum().backward()
    (entry,) = [e for cls, e in tuner.choices().items() if "/s2x2/" in cls]
    assert set(entry["us"]) == {"torch", "torch-cl", "masked"}


@pytest.mark.skipif(not native.available(), reason="meprop's C++ kernels are not built here")
@pytest.mark.parametrize("setting", ["plain", "same", "valid", "no_bias", "reflect", "circular"])
@pytest.mark.parametrize("mode", ["unified", "per_example", "random"])
def test_direct_kernel_runs_where_it_serves(setting, mode, monkeypatch):
    """MEPROP_BACKEND=native runs the C++ kernel on every stride-1, dilation-1, groups-1
    setting (padding modes are padded before it), with the reference's gradients."""
    pin_native(monkeypatch)
    calls = []
    real = native.conv_rows
    monkeypatch.setattr(native, "conv_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for dtype in (torch.float32, torch.float64):
        dense, sparse, x = make(setting, MePropConfig(k=K, mode=mode), dtype=dtype, batch=4)
        _, g, draw = run(sparse, x)
        check(dense, sparse, x, g, mode, draw)
    assert len(calls) == 2
    dense, sparse, x = make("stride2_pad1", MePropConfig(k=K, mode=mode))
    run(sparse, x)
    assert len(calls) == 2  # (stride 2: the compacted form)


@pytest.mark.skipif(not native.available(), reason="meprop's C++ kernels are not built here")
def test_direct_kernel_first_layer_adaptive_k_and_bad_indices(monkeypatch):
    """No input gradient (a first layer); per-example adaptive k (the slots an example does
    not keep are skipped: as the masked backward, which the reference tests check); an index
    out of range is an IndexError naming it."""
    pin_native(monkeypatch)
    dense, sparse, x = make("plain", MePropConfig(k=K, mode="per_example"), batch=5)
    x = x.detach()
    y = sparse(x)
    g = torch.randn_like(y)
    y.backward(g)
    _, rw, _ = reference_conv2d_backward(dense, x.clone().requires_grad_(), g, K, "per_example")
    torch.testing.assert_close(sparse.weight.grad, rw)
    adapt = AdaptiveK(min_k=1, rule="mass", share=0.5)
    dense, sparse, x = make("plain", MePropConfig(k=5, mode="per_example", adapt=adapt), batch=6)
    masked = copy.deepcopy(sparse)
    masked.config = MePropConfig(k=5, mode="per_example", adapt=adapt, backend="masked")
    x2 = x.detach().clone().requires_grad_()
    _, g, _ = run(sparse, x)
    masked(x2).backward(g)
    assert sparse.last_k < 5  # (some examples kept fewer than 5)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(sparse.weight.grad, masked.weight.grad)
    xs, ws, gs = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(2, 4, 4, 4)
    with pytest.raises(IndexError, match=r"1 value\(s\) of idx outside \[0, 4\)"):
        native.conv_rows(gs, xs, ws, torch.tensor([0, 4]), (0, 0), True, True)


# --------------------------------------------------------------------------------------------
# Conversion, module conventions, refusals


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5)
        )
        self.head = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).flatten(1))


def test_sparsify_densify_round_trip():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    cfg = MePropConfig(k=2, mode="unified")
    assert sparsify_(model, cfg, filter_fn=lambda m, name: name != "head") is model
    assert type(model.features[0]) is SparseConv2d and type(model.features[3]) is SparseConv2d
    assert type(model.head) is nn.Linear
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == list(before)
    assert converted(model) == {
        "features.0": "SparseConv2d(from Conv2d, k=2, mode=unified)",
        "features.3": "SparseConv2d(from Conv2d, k=2, mode=unified)",
    }
    model(torch.randn(4, 1, 14, 14)).logsumexp(1).sum().backward()
    assert int((model.features[3].weight.grad.flatten(1) != 0).any(1).sum()) == 2
    opt.step()
    moved = (model.features[3].weight != before["features.3.weight"]).flatten(1).any(1)
    assert int(moved.sum()) == 2  # plain SGD: only the kept filters change
    densify_(model)
    assert type(model.features[0]) is nn.Conv2d and not hasattr(model.features[0], "config")
    assert [id(p) for p in model.parameters()] == params
    assert converted(model) == {}


def test_constructor_repr_state_dict_pickle():
    import io

    cfg = MePropConfig(k=2, mode="unified", sparse_grad=True)
    conv = SparseConv2d(3, 4, 3, stride=2, padding=1, config=cfg)
    assert repr(conv) == (
        "SparseConv2d(3, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), k=2, "
        "mode=unified, sparse_grad=True)"
    )
    dense = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    conv.load_state_dict(dense.state_dict())
    assert list(conv.state_dict()) == ["weight", "bias"]
    buf = io.BytesIO()
    torch.save(conv, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=False).config == cfg
    with pytest.raises(TypeError, match=r"SparseConv2d needs config=MePropConfig\(k=...\)"):
        SparseConv2d(3, 4, 3)


@pytest.mark.parametrize(
    "config,words",
    [
        (MePropConfig(k=2, mode="symmetric"), "mode='symmetric' has no channel form"),
        (MePropConfig(k=2, backend="native"), "backend must be one of ('auto', 'torch', 'masked')"),
    ],
)
def test_unservable_configs_are_refused_by_name(config, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SparseConv2d(3, 4, 3, config=config)
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="SparseConv2d"):
        sparsify_(model, config)
    assert type(model[0]) is nn.Linear and type(model[1]) is nn.Conv2d  # nothing converted


def test_uninitialised_lazy_conv_is_an_error():
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"\['0'\] are uninitialised nn.LazyConv2d"):
        sparsify_(model, MePropConfig(k=2))
    model(torch.randn(1, 3, 5, 5))
    sparsify_(model, MePropConfig(k=2))
    assert type(model[0]) is SparseConv2d


@pytest.mark.parametrize("mode", ["unified", "per_example", "per_position"])
def test_torch_compile_fullgraph_equals_eager(mode):
    torch._dynamo.reset()
    model = Net()
    sparsify_(model, MePropConfig(k=3, mode=mode), filter_fn=lambda m, name: name != "head")
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 1, 14, 14)
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    rows = int((model.features[3].weight.grad.flatten(1) != 0).any(1).sum())
    assert rows <= (model.features[3].out_channels if mode == "per_position" else 4 * 3)


@pytest.mark.parametrize("sparse_bias", [False, True])
@pytest.mark.parametrize("mode", ["unified", "per_example", "per_position"])
@pytest.mark.parametrize("setting", ["plain", "groups", "stride2_pad1"])
def test_memory_matches_its_reference(setting, mode, sparse_bias):
    """memory=0.8 over four steps: each step's gradients and the carried memory equal the
    reference's (g + m masked, dense formulas); the memory restarts at another output size."""
    cfg = MePropConfig(k=K, mode=mode, memory=0.8, sparse_bias=sparse_bias)
    dense, sparse, x = make(setting, cfg)
    memory = torch.zeros(dense(x).shape[1:])
    for step in range(4):
        x.grad = None
        sparse.zero_grad()
        y = sparse(x)
        g = torch.randn_like(y)
        y.backward(g)
        rx, rw, rb, memory = reference_conv2d_memory_backward(
            dense, x, g, K, mode, memory, 0.8, sparse_bias
        )
        torch.testing.assert_close(x.grad, rx)
        torch.testing.assert_close(sparse.weight.grad, rw)
        if rb is not None:
            torch.testing.assert_close(sparse.bias.grad, rb)
        torch.testing.assert_close(sparse.k_record.memory, memory)
        assert step == 0 or memory.abs().sum() > 0
    # a larger input: the memory's shape no longer fits, so it restarts (as a fresh layer)
    x2 = torch.randn(2, dense.in_channels, 11, 9, requires_grad=True)
    sparse(x2).backward(g2 := torch.randn_like(dense(x2)))
    rx, *_ = reference_conv2d_memory_backward(dense, x2, g2, K, mode, 0.0, 0.8)
    torch.testing.assert_close(x2.grad, rx)


def test_memory_with_an_empty_batch():
    layer = SparseConv2d(3, 6, 3, config=MePropConfig(k=2, memory=0.8))
    x = torch.randn(0, 3, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == x.shape and layer.k_record.memory is None


def test_memory_refuses_compile_and_func_by_name():
    layer = SparseConv2d(3, 6, 3, config=MePropConfig(k=2, memory=0.8))
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"memory=0.8 \(memorized back-propagation\)"):
        torch.func.grad(lambda inp: layer(inp).sum())(x)


def test_torch_compile_refuses_adaptive_k_by_name():
    torch._dynamo.reset()
    conv = SparseConv2d(3, 6, 3, config=MePropConfig(k=3, adapt=AdaptiveK(min_k=1)))
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"adaptive k \(MePropConfig\(adapt=...\)\)"):
        compiled(torch.randn(2, 3, 6, 6))


@pytest.fixture
def group_of_one():
    """A gloo process group of one rank in this process (DDP works on it)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp(group_of_one):
    from meprop import distributed as mdist

    x = torch.randn(4, 1, 14, 14)
    model = sparsify_(Net(), MePropConfig(k=2, sparse_grad=True), lambda m, name: name != "head")
    with pytest.raises(RuntimeError, match="sparse_grad=True and runs inside DistributedDataPar"):
        mdist.wrap(model)(x)
    sparsify_(model, MePropConfig(k=2, mode="unified"), lambda m, name: name != "head")
    ref = copy.deepcopy(model)
    mdist.wrap(model)(x).square().sum().backward()  # the compacted all-reduce: convs whole
    ref(x).square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    assert int((model.features[3].weight.grad.flatten(1) != 0).any(1).sum()) == 2


@pytest.mark.parametrize("mode", ["unified", "per_example"])
def test_create_graph_and_torch_func_give_the_masked_gradient(mode):
    # first-order gradients under create_graph=True and torch.func.grad are the reference's;
    # the second-order pass runs (the selection is a constant of it, as with the mask)
    from torch.func import grad

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 8, 3, padding=1).double()
    ref = nn.Conv2d(3, 8, 3, padding=1).double()
    ref.load_state_dict(layer.state_dict())
    sparsify_(layer, MePropConfig(k=2, mode=mode))
    x = torch.randn(2, 3, 6, 6, dtype=torch.double, requires_grad=True)
    out = layer(x)
    dx, _, _ = reference_conv2d_backward(ref, x.detach(), 2 * out.detach(), 2, mode)
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, dx)
    gx.pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(grad(lambda xx: layer(xx).pow(2).sum())(x.detach()), dx)


@pytest.mark.skipif(not native.available(), reason="meprop's C++ kernels are not built here")
@pytest.mark.parametrize("per_example", [False, True])
def test_direct_kernel_with_threads(per_example):
    """Two threads split the examples, each summing its own dW: the reference's gradients."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)  # (float32 sums in another order than the reference)
    x, w = torch.randn(7, 8, 15, 13, **f64), torch.randn(10, 8, 3, 3, **f64)
    g = torch.randn(7, 10, 15, 13, **f64)  # padding 1: the input's size
    idx = torch.stack([torch.randperm(10)[:4] for _ in range(7)]) if per_example else None
    idx = torch.tensor([1, 2, 5, 9]) if idx is None else idx
    mask = torch.zeros(7, 10, dtype=torch.bool)
    mask.scatter_(1, idx if per_example else idx.expand(7, 4), True)
    ref = torch.ops.aten.convolution_backward(
        g * mask[:, :, None, None], x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
        (True, True, False),
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dx, dw = native.conv_rows(g, x, w, idx, (1, 1), True, True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(dx, ref[0])
    torch.testing.assert_close(dw, ref[1])
