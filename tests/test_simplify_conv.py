"""meSimp on convolutions: whole filters removed, with the next layer's input channels (or, after
nn.Flatten, its H*W columns per channel), BatchNorm2d between, optimizer state, checkpoints."""

import copy

import pytest
import torch
from torch import nn

import meprop
from meprop import MePropConfig, MeSimpConfig, Pair, Simplifier, SparseConv2d, sparsify_
from test_simplify import set_usage


def lenet(norm: bool = False, k: int = 2) -> nn.Sequential:
    """A small LeNet: conv 1->6 (5x5 map after pooling... (B, 6, 6, 6)), conv 6->8
    ((B, 8, 2, 2) after pooling), flatten (32), fc 32->12, head 12->3. Every layer but the
    head sparsified."""
    bn = [nn.BatchNorm2d(6)] if norm else []
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), *bn, nn.ReLU(), nn.MaxPool2d(2),  # (B, 6, 6, 6)
        nn.Conv2d(6, 8, 3), nn.ReLU(), nn.MaxPool2d(2),  # (B, 8, 2, 2)
        nn.Flatten(),
        nn.Linear(32, 12), nn.ReLU(), nn.Dropout(0.0),
        nn.Linear(12, 3),
    )  # fmt: skip
    head = model[-1]
    return sparsify_(model, MePropConfig(k=k), filter_fn=lambda m, n: m is not head)


def names(model):
    return {m: n for n, m in model.named_modules()}


def test_find_pairs_reads_the_chain_through_pooling_and_flatten():
    model = lenet(norm=True)
    pairs = {p.producer: p for p in meprop.simplify.find_pairs(model)}
    assert pairs == {
        "0": Pair("0", ("4",), ("1",)),  # conv1 -> (bn, relu, pool) -> conv2
        "4": Pair("4", ("8",)),  # conv2 -> (relu, pool, flatten) -> fc
        "8": Pair("8", ("11",)),  # fc -> (relu, dropout) -> head
    }


@pytest.mark.parametrize("norm", [False, True])
def test_removed_filters_equal_zeroed_consumer_inputs(norm):
    """The obviously-right reference: a network whose consumer ignores the removed channels
    (their input weights zeroed: every column of the channel's H*W block for the Linear)
    computes what the shrunk network computes."""
    torch.manual_seed(0)
    model = lenet(norm=norm).eval()
    if norm:  # running statistics of their own, so the BatchNorm's slicing shows
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.2, 0.2)
    conv1, conv2, fc = model[0], model[4 if norm else 3], model[8 if norm else 7]
    drop1, drop2 = [0, 3], [1, 2, 6]  # filters of conv1 and conv2 to remove
    reference = copy.deepcopy(model)
    r_conv2, r_fc = reference[4 if norm else 3], reference[8 if norm else 7]
    with torch.no_grad():
        r_conv2.weight[:, drop1] = 0
        for c in drop2:  # conv2's channel c: fc's columns 4c .. 4c+3 (2x2 map)
            r_fc.weight[:, 4 * c : 4 * c + 4] = 0
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5, min_units=1))
    set_usage(conv1, [0 if c in drop1 else 9 for c in range(6)])
    set_usage(conv2, [0 if c in drop2 else 9 for c in range(8)])
    set_usage(fc, [9] * 12)
    assert simp.prune()
    assert simp.sizes() == {"0": 4, str(4 if norm else 3): 5, str(8 if norm else 7): 12}
    assert conv1.weight.shape == (4, 1, 3, 3) and conv1.out_channels == 4
    assert conv2.weight.shape == (5, 4, 3, 3) and (conv2.in_channels, conv2.out_channels) == (4, 5)
    assert fc.weight.shape == (12, 20) and fc.in_features == 20
    if norm:
        assert model[1].num_features == 4 and model[1].running_mean.shape == (4,)
    x = torch.randn(5, 1, 12, 12)
    torch.testing.assert_close(model(x), reference(x))


def test_training_shrinks_filters_and_adam_state_follows():
    torch.manual_seed(1)
    model = lenet(k=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.3, interval=4), opt)
    x, y = torch.randn(16, 1, 12, 12), torch.randint(0, 3, (16,))
    for _ in range(12):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        simp.step()
    sizes = simp.sizes()
    assert sizes["0"] < 6 and sizes["3"] < 8  # k=2 of 6 and 8 filters: some never kept
    params = list(model.parameters())
    assert [id(p) for g in opt.param_groups for p in g["params"]] == [id(p) for p in params]
    for p in params:  # Adam's moments sliced with their parameter
        if p in opt.state:
            assert opt.state[p]["exp_avg"].shape == p.shape
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_checkpoint_of_a_shrunk_cnn_loads_into_a_full_size_one(tmp_path):
    torch.manual_seed(2)
    model = lenet(norm=True)
    opt = torch.optim.Adam(model.parameters())
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.5, min_units=1), opt)
    set_usage(model[0], [9, 0, 9, 9, 0, 9])
    set_usage(model[4], [9] * 7 + [0])
    set_usage(model[8], [9] * 12)
    simp.prune()
    path = meprop.save(tmp_path / "cnn.pt", model, opt, simplifier=simp)
    fresh = lenet(norm=True)
    opt2 = torch.optim.Adam(fresh.parameters())
    simp2 = Simplifier(fresh, MeSimpConfig(prune_rate=0.5, min_units=1), opt2)
    meprop.load(path, fresh, opt2, simplifier=simp2)
    assert simp2.sizes() == simp.sizes() == {"0": 4, "4": 7, "8": 12}
    assert (fresh[0].out_channels, fresh[4].in_channels, fresh[1].num_features) == (4, 4, 4)
    x = torch.randn(3, 1, 12, 12)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))
    # and into a dense LeNet built from scratch (no meProp layers)
    dense = meprop.densify_(copy.deepcopy(lenet(norm=True)))
    meprop.load(path, dense)
    dense.eval()
    assert torch.equal(dense(x), model(x))


def test_residual_block_needs_declared_pairs():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv2(self.bn1(self.conv1(x)).relu())

    block = Block()
    sparsify_(block, MePropConfig(k=2), filter_fn=lambda m, n: n == "conv1")
    with pytest.raises(ValueError, match=r"cannot tell which modules consume \['conv1'\]"):
        Simplifier(block, MeSimpConfig())
    simp = Simplifier(
        block, MeSimpConfig(prune_rate=0.5), pairs=[Pair("conv1", ("conv2",), ("bn1",))]
    )
    set_usage(block.conv1, [9, 0, 9, 0, 9, 9])
    simp.prune()
    assert block.conv2.in_channels == 4 and block.bn1.num_features == 4
    assert block(torch.randn(2, 4, 5, 5)).shape == (2, 4, 5, 5)


def test_structures_meSimp_cannot_shrink_are_refused():
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 4, 1))
    sparsify_(grouped, MePropConfig(k=2), filter_fn=lambda m, n: n == "0")
    with pytest.raises(ValueError, match="groups=2"):
        Simplifier(grouped, MeSimpConfig())
    depthwise_next = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=8))
    sparsify_(depthwise_next, MePropConfig(k=2), filter_fn=lambda m, n: n == "0")
    with pytest.raises(ValueError, match=r"input channels of '2' \(groups=8\)"):
        Simplifier(depthwise_next, MeSimpConfig())
    # a Linear that does not read the convolution's flattened map
    odd = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(10, 2))
    sparsify_(odd, MePropConfig(k=1), filter_fn=lambda m, n: n == "0")
    with pytest.raises(ValueError, match="not a multiple of '0''s 3 channels"):
        Simplifier(odd, MeSimpConfig())
    from meprop.prune import prune_in_

    with pytest.raises(ValueError, match="cannot read channels of 3 columns"):
        prune_in_(nn.Linear(10, 2), torch.tensor([0]), block=3)
    assert isinstance(grouped[0], SparseConv2d)
