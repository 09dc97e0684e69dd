"""backend="auto": candidates timed on first use, the choice cached per machine key.

The suite runs with MEPROP_AUTOTUNE=0 (conftest); these tests turn the timing on, each with a
tuner of its own on a temporary cache file.
"""

import json

import pytest
import torch

from meprop import MePropConfig, SparseLinear, sparse_linear
from meprop.kernels import dispatch
from meprop.ops import IMPLEMENTATIONS, candidates
from meprop.reference import reference_backward


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """Timing on, a fresh tuner writing to tmp_path; returns it."""
    monkeypatch.setenv("MEPROP_AUTOTUNE", "1")
    monkeypatch.delenv("MEPROP_BACKEND", raising=False)
    t = dispatch.Tuner(tmp_path / "dispatch.json")
    monkeypatch.setattr(dispatch, "_TUNER", t)
    return t


def backward(mode, k=4, m=12, n=40, d=30, backend="auto", **kw):
    x = torch.randn(m, d, requires_grad=True)
    w = torch.randn(n, d, requires_grad=True)
    g = torch.randn(m, n)
    sparse_linear(x, w, None, k=k, mode=mode, backend=backend, **kw).backward(g)
    return x, w, g


@pytest.mark.parametrize("mode", ["per_example", "unified"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_tuned_backward_matches_reference(tuner, mode, sparse_grad):
    x, w, g = backward(mode, sparse_grad=sparse_grad)
    rx, rw, _ = reference_backward(x.detach(), w.detach(), g, 4, mode)
    torch.testing.assert_close(x.grad, rx)
    dw = w.grad.to_dense() if sparse_grad else w.grad
    torch.testing.assert_close(dw, rw)
    assert tuner.measured == 1
    (entry,) = tuner.choices().values()
    assert entry["backend"] in candidates(g, mode)
    # every candidate was timed at least once, and the choice is the fastest of them
    assert set(entry["us"]) == set(candidates(g, mode))
    assert entry["us"][entry["backend"]] == min(entry["us"].values())


def test_choice_written_once_and_reused(tuner, monkeypatch):
    backward("per_example")
    backward("per_example")  # same shape class: no second measurement
    assert tuner.measured == 1
    data = json.loads(tuner.path.read_text())
    assert data["key"] == dispatch.machine_key() and len(data["choices"]) == 1
    # A new process (a new tuner on the same file) reads the choice and times nothing.
    again = dispatch.Tuner(tuner.path)
    monkeypatch.setattr(dispatch, "_TUNER", again)
    calls = []
    monkeypatch.setattr(dispatch, "measure", lambda runs: calls.append(runs) or {})
    backward("per_example")
    assert not calls and again.measured == 0
    assert again.choices() == tuner.choices()


def test_other_shape_class_is_measured(tuner):
    backward("per_example", m=12)
    backward("per_example", m=200)  # another octave of batch rows
    backward("unified", m=12)
    assert tuner.measured == 3 and len(tuner.choices()) == 3


@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", '{"format": 1}', '{"format": 1, "key": {}, "choices": {}}', ""],
    ids=["torn", "list", "no-key", "other-key", "empty"],
)
def test_corrupt_or_stale_cache_is_measured_again(tuner, content):
    tuner.path.write_text(content)
    backward("per_example")
    assert tuner.measured == 1
    data = json.loads(tuner.path.read_text())  # rewritten whole, with this machine's key
    assert data["key"] == dispatch.machine_key() and len(data["choices"]) == 1


def test_cached_choice_of_unknown_backend_is_ignored(tuner):
    cls = dispatch.shape_class("per_example", torch.float32, 12, 40, 30, 4, "xw")
    data = {"format": 1, "key": tuner.key, "choices": {cls: {"backend": "gpu-magic"}}}
    tuner.path.write_text(json.dumps(data))
    backward("per_example")
    assert tuner.measured == 1


def test_key_change_measures_again(tuner, monkeypatch, tmp_path):
    backward("per_example")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other = dispatch.Tuner()  # default path: named by the key's hash
    assert other.key != tuner.key and other.path != tuner.path
    stale = dispatch.Tuner(tuner.path)  # the old file read under the new key: nothing valid
    assert stale.choices() == {}


def test_forced_backend_bypasses_tuning(tuner, monkeypatch):
    called = []
    monkeypatch.setattr(dispatch, "measure", lambda runs: called.append(1) or {})
    for backend in ("torch", "masked", "numba"):
        backward("per_example", backend=backend)
    assert not called and tuner.measured == 0 and not tuner.path.exists()


@pytest.mark.parametrize("name", ["torch", "masked", "dense"])
def test_env_pins_auto(tuner, monkeypatch, name):
    monkeypatch.setenv("MEPROP_BACKEND", name)  # ("dense": the masked backend's old name)
    ran = []
    impl = {"dense": "masked"}.get(name, name)
    original = IMPLEMENTATIONS[impl]
    monkeypatch.setitem(IMPLEMENTATIONS, impl, lambda *a: ran.append(1) or original(*a))
    x, w, g = backward("unified")
    assert ran and tuner.measured == 0
    torch.testing.assert_close(
        w.grad, reference_backward(x.detach(), w.detach(), g, 4, "unified")[1]
    )


def test_env_pin_rejects_unknown(tuner, monkeypatch):
    monkeypatch.setenv("MEPROP_BACKEND", "fastest")
    with pytest.raises(ValueError, match="MEPROP_BACKEND must be one of .* got 'fastest'"):
        backward("per_example")


def test_autotune_off_takes_default_order(tuner, monkeypatch):
    monkeypatch.setenv("MEPROP_AUTOTUNE", "0")
    ran = []
    g = torch.randn(3, 40)
    first = candidates(g, "per_example")[0]
    original = IMPLEMENTATIONS[first]
    monkeypatch.setitem(IMPLEMENTATIONS, first, lambda *a: ran.append(1) or original(*a))
    backward("per_example")
    assert ran and tuner.measured == 0


def test_half_precision_chooses_between_torch_paths(tuner):
    x = torch.randn(8, 30, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, 30, dtype=torch.bfloat16, requires_grad=True)
    sparse_linear(x, w, None, k=4, mode="unified").sum().backward()
    (entry,) = tuner.choices().values()
    assert set(entry["us"]) == {"torch", "masked"}


def test_a_failing_candidate_is_no_choice():
    def boom():
        raise RuntimeError("cannot")

    times = dispatch.measure({"a": boom, "b": lambda: None})
    assert list(times) == ["b"]
    with pytest.raises(RuntimeError, match="no implementation could run"):
        dispatch.measure({"a": boom})


def test_slow_candidates_drop_out_after_one_round(monkeypatch):
    import time

    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.003)

    times = dispatch.measure({"fast": fast, "slow": slow})
    assert times["fast"] < times["slow"]
    assert calls["slow"] == 2  # warm-up and the first round's single call only


def test_unwritable_cache_still_chooses(tuner, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    tuner.path = blocker / "sub" / "dispatch.json"  # its parent is a file: cannot be created
    x, w, g = backward("unified")
    assert tuner.measured == 1 and len(tuner.choices()) == 1


def test_module_config_uses_dispatch(tuner):
    from meprop import SparseLinear

    layer = SparseLinear(30, 40, config=MePropConfig(k=4, mode="unified"))
    layer(torch.randn(12, 30)).sum().backward()
    assert tuner.measured == 1


def test_describe_lists_machine_and_choices(tuner):
    backward("per_example")
    text = dispatch.describe()
    assert "CPU:" in text and "torch" in text and str(tuner.path) in text
    assert "per_example/float32" in text


def test_cli_info(tuner, capsys):
    from meprop.experiments.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "C++ kernels" in out and "cache:" in out
    backward("unified")
    assert main(["info", "--clear"]) == 0
    assert tuner.choices() == {} and not tuner.path.exists()


def test_trainer_warm_up_times_before_the_clocks_and_leaves_no_trace(tuner, tiny_mnist):
    # The trainer's warm-up step lets auto time its candidates before training; it leaves the
    # parameters, their gradients and the random state as they were.
    from meprop.experiments.tasks import get_task
    from meprop.experiments.train import TrainConfig, _warm_up

    cfg = TrainConfig(method="meprop", k=5, mode="unified", epochs=1)
    task = get_task(cfg, tiny_mnist)
    torch.manual_seed(3)
    model = task.build_model(cfg.widths(), cfg)
    from meprop import sparsify_

    sparsify_(model, cfg.meprop_config(), filter_fn=task.sparsify_filter(model))
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    _warm_up(model, task, cfg)
    assert tuner.measured >= 1  # the hidden layers' shape classes were timed
    assert torch.equal(torch.get_rng_state(), rng)
    for p, q in zip(model.parameters(), before, strict=True):
        assert p.grad is None and torch.equal(p.detach(), q)


def test_old_backend_name_dense_is_masked_with_a_warning():
    with pytest.warns(DeprecationWarning, match="backend='dense'.* now backend='masked'"):
        cfg = MePropConfig(k=3, backend="dense")
    assert cfg.backend == "masked"
    layer = SparseLinear(8, 6, bias=False, config=cfg)
    x, g = torch.randn(5, 8), torch.randn(5, 6)
    layer(x).backward(g)
    want = reference_backward(x, layer.weight.detach(), g, 3, "per_example")[1]
    torch.testing.assert_close(layer.weight.grad, want)
