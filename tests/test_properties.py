"""Properties checked on generated inputs (hypothesis): top-k selection, and shrinking.

Ties are allowed in the gradients (the generated values repeat often), so "the largest" is
checked as: no entry left out is larger than an entry kept.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from meprop.kernels import cpu, native
from meprop.ops import select_columns, select_rows
from meprop.prune import prune_in_, prune_out_
from meprop.reference import mask_gradient

FAST = settings(max_examples=40, deadline=None)


def kernel_modules():
    """PyTorch's topk (None), then the C++ and numba kernels where they can run."""
    params = [pytest.param(None, id="torch")]
    for name, module in (("native", native), ("numba", cpu)):
        skip = pytest.mark.skipif(not module.available(), reason=f"{name} kernels unavailable")
        params.append(pytest.param(module, id=name, marks=skip))
    return params


@st.composite
def gradients(draw):
    """(g, k): a float32 gradient (M, n) and a k in [1, n]."""
    m = draw(st.integers(1, 6))
    n = draw(st.integers(1, 12))
    values = st.floats(-100, 100, width=32, allow_nan=False)
    g = draw(arrays(np.float32, (m, n), elements=values))
    return torch.from_numpy(g), draw(st.integers(1, n))


@pytest.mark.parametrize("kernels", kernel_modules())
@FAST
@given(gk=gradients())
def test_per_example_keeps_the_k_largest_magnitudes_of_each_row(kernels, gk):
    g, k = gk
    idx, vals = select_rows(g, k, "per_example", kernels)
    assert idx.shape == (g.shape[0], k)
    assert torch.equal(vals, g.gather(1, idx))
    kept = torch.zeros_like(g, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(kept.sum(1), torch.full((g.shape[0],), k))  # k distinct entries per row
    a = g.abs()
    smallest_kept = a.masked_fill(~kept, float("inf")).amin(1)
    largest_dropped = a.masked_fill(kept, -1.0).amax(1)
    assert (largest_dropped <= smallest_kept).all()
    # the reference mask keeps exactly the selected entries' values
    masked = mask_gradient(g, k, "per_example", idx)
    assert torch.equal(masked, torch.where(kept, g, torch.zeros_like(g)))


@FAST
@given(gradients())
def test_unified_keeps_the_k_columns_with_the_largest_sums(gk):
    g, k = gk
    cols = select_columns(g, k)
    assert cols.shape == (k,)
    assert torch.equal(cols, cols.unique())  # distinct and sorted
    kept = torch.zeros(g.shape[1], dtype=torch.bool)
    kept[cols] = True
    scores = g.abs().sum(0)
    assert scores.masked_fill(kept, -1.0).max() <= scores.masked_fill(~kept, float("inf")).min()
    # every row keeps the same whole columns
    masked = mask_gradient(g, k, "unified", cols)
    assert torch.equal(masked, g * kept)


@FAST
@given(gradients(), st.integers(0, 2**31 - 1))
def test_random_keeps_k_distinct_entries_per_row(gk, seed):
    g, k = gk
    torch.manual_seed(seed)
    idx, vals = select_rows(g, k, "random")
    torch.manual_seed(seed)
    again, _ = select_rows(g, k, "random")
    assert torch.equal(idx, again)  # the global RNG decides the draw
    assert torch.equal(vals, g.gather(1, idx))
    assert all(len(set(row)) == k for row in idx.tolist())


@FAST
@given(st.integers(1, 8), st.data())
def test_removing_units_without_outgoing_weights_keeps_the_outputs(width, data):
    keep = sorted(data.draw(st.sets(st.integers(0, width - 1), min_size=1), label="keep"))
    bias = data.draw(st.booleans(), label="bias")
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    producer, consumer = nn.Linear(5, width, bias=bias), nn.Linear(width, 3)
    model = nn.Sequential(producer, nn.ReLU(), consumer)
    dropped = [u for u in range(width) if u not in keep]
    with torch.no_grad():
        consumer.weight[:, dropped] = 0  # the dropped units reach nothing
    x = torch.randn(4, 5)
    before = model(x)
    prune_out_(producer, torch.tensor(keep))
    prune_in_(consumer, torch.tensor(keep))
    assert (producer.out_features, consumer.in_features) == (len(keep), len(keep))
    assert producer.weight.shape == (len(keep), 5) and consumer.weight.shape == (3, len(keep))
    torch.testing.assert_close(model(x), before)
