"""torch.compile(fullgraph=True) over meProp layers: gradients equal to eager, or a clear refusal.

Every case runs in one fresh process (a warm Dynamo cache in this one would hide a failure),
each after ``torch._dynamo.reset()``; the process prints one JSON object: case -> "ok" or the
error's text.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import copy, json, sys
    import pytest
    import torch
    from torch import nn
    from meprop import AdaptiveK, MePropConfig, SparseLSTM, sparsify_

    torch.set_num_threads(1)


    def records(model):
        return [m.k_record for m in model.modules() if hasattr(m, "k_record")]


    def run(cfg, fullgraph=True, lstm=False, backend="aot_eager"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        if lstm:
            model, x = SparseLSTM(6, 5, num_layers=2, config=cfg), torch.randn(4, 3, 6)
            loss = lambda m: m(x)[0].square().sum()
        else:
            model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(),
                                  nn.Linear(12, 12))
            sparsify_(model, cfg)
            x = torch.randn(2, 4, 6)
            loss = lambda m: m(x).square().sum()
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, fullgraph=fullgraph, backend=backend)
        try:
            for step in range(3):  # later calls run the cached graph (adaptive k: its memory)
                model.zero_grad()
                eager.zero_grad()
                torch.manual_seed(step)
                loss(compiled).backward()
                torch.manual_seed(step)
                loss(eager).backward()
                for a, b in zip(records(model), records(eager)):
                    assert a.last_k == pytest.approx(b.last_k, rel=1e-6), (a, b)
                    assert a.y_max == pytest.approx(b.y_max, rel=1e-5), (a, b)
            for (name, p), q in zip(model.named_parameters(), eager.parameters()):
                a, b = p.grad, q.grad
                assert a.layout == b.layout, (name, a.layout, b.layout)
                if a.is_sparse:
                    a, b = a.to_dense(), b.to_dense()
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
            return "ok"
        except Exception as e:
            return f"{type(e).__name__}: {e}"


    out = {}
    for mode in ("per_example", "unified", "random", "symmetric"):
        out[mode] = run(MePropConfig(k=3, mode=mode))
    out["per_example_inductor"] = run(MePropConfig(k=3), backend="inductor")
    out["sparse_bias"] = run(MePropConfig(k=3, mode="unified", sparse_bias=True))
    out["sparse_grad"] = run(MePropConfig(k=3, sparse_grad=True))
    out["sparse_grad_graph_break"] = run(MePropConfig(k=3, sparse_grad=True), fullgraph=False)
    tiny, mass = AdaptiveK(min_k=1), AdaptiveK(min_k=1, rule="mass", share=0.6)
    out["adaptive_per_example"] = run(MePropConfig(k=6, adapt=tiny))
    out["adaptive_per_example_mass"] = run(MePropConfig(k=6, adapt=mass))
    out["adaptive_unified"] = run(MePropConfig(k=6, mode="unified", adapt=tiny))
    out["adaptive_unified_mass"] = run(MePropConfig(k=6, mode="unified", adapt=mass))
    out["lstm_refused_by_dynamo"] = run(MePropConfig(k=3), lstm=True)
    torch._dynamo.config.allow_rnn = True
    for mode in ("per_example", "unified"):
        out["lstm_" + mode] = run(MePropConfig(k=3, mode=mode), lstm=True)
    out["lstm_adaptive"] = run(MePropConfig(k=3, adapt=tiny), lstm=True)
    out["lstm_adaptive_graph_break"] = run(MePropConfig(k=3, adapt=tiny), False, lstm=True)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def results():
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "case",
    [
        "per_example",
        "unified",
        "random",
        "symmetric",
        "per_example_inductor",
        "sparse_bias",
        "sparse_grad_graph_break",
        "adaptive_per_example",
        "adaptive_per_example_mass",
        "adaptive_unified",
        "adaptive_unified_mass",
        "lstm_per_example",
        "lstm_unified",
        "lstm_adaptive_graph_break",
    ],
)
def test_fullgraph_gradients_equal_eager(results, case):
    assert results[case] == "ok", results[case]


@pytest.mark.parametrize(
    "case,words",
    [
        ("sparse_grad", "sparse_grad=True builds a row-sparse COO weight gradient"),
        ("lstm_adaptive", "SparseLSTM's adaptive k (MePropConfig(adapt=...)) reads each step"),
        ("lstm_refused_by_dynamo", "allow_rnn=True"),  # Dynamo's own words, for any nn.LSTM
    ],
)
def test_fullgraph_refusals_name_the_case(results, case, words):
    assert words in results[case], results[case]
