"""moefy/passes/fit_peer.py: the retrieval fitted to a dense FFN places every neuron in its own
cell; with every cell retrieved the measured layer is the dense FFN; heads never retrieve a
neuron twice; the Adam fit keeps its result only where validation tokens confirm it."""

import pytest
import torch

import moefy
from moefy.passes import fit_peer, peer
from moefy.passes.build import DenseWeights

H, D_FF = 16, 24  # a 4x6 grid, no pads
# (heads, top_k, gated): one head retrieving every cell, two heads with their own rows
SETUPS = ((1, 24, False), (1, 24, True), (2, 5, False), (2, 5, True))


def dense_ffn(gated: bool, seed: int = 0) -> DenseWeights:
    g = torch.Generator().manual_seed(seed)
    w_in, w_out = torch.randn(D_FF, H, generator=g), torch.randn(H, D_FF, generator=g)
    w_gate = torch.randn(D_FF, H, generator=g) if gated else None
    b_in = None if gated else torch.randn(D_FF, generator=g)
    return DenseWeights(w_in / H**0.5, w_out / D_FF**0.5, None if w_gate is None else
                        w_gate / H**0.5, b_in, None, torch.randn(H, generator=g),
                        "silu" if gated else "gelu")


def fitted(heads: int, top_k: int, gated: bool, calibrated: bool = True):
    dense = dense_ffn(gated)
    x = torch.randn(400, H, generator=torch.Generator().manual_seed(1))
    config = moefy.MoEConfig(method="peer", top_k=top_k, peer_heads=heads)
    layer = peer.carve(dense, config)
    cells = fit_peer.init_retrieval(layer, dense, x if calibrated else None,
                                    torch.Generator().manual_seed(2))
    return dense, x, layer, cells


def one_cell_each(cells: torch.Tensor, n: int) -> bool:
    return cells.shape == (D_FF,) and cells.unique().numel() == D_FF and (
        0 <= int(cells.min()) and int(cells.max()) < n)


@pytest.mark.parametrize("heads,top_k,gated", SETUPS)
@pytest.mark.parametrize("calibrated", (True, False))
def test_each_neuron_gets_its_own_cell_and_heads_never_share_one(heads, top_k, gated,
                                                                 calibrated):
    dense, x, layer, cells = fitted(heads, top_k, gated, calibrated)
    assert one_cell_each(cells, layer.num_experts)
    got = fit_peer.measure(layer, dense, x, cells)
    assert got["duplicate_share"] == 0
    if top_k == layer.num_experts:  # every cell retrieved: the dense FFN exactly
        assert got["retrieval_recall"] == 1.0 and got["rel_err"] < 1e-5


def test_reassign_moves_neurons_between_cells_only():
    dense, x, layer, cells = fitted(2, 5, False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    new = fit_peer.reassign(layer, dense, x, cells)
    assert one_cell_each(new, layer.num_experts)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("steps", (0, 15))
def test_fit_keeps_its_result_only_where_validation_confirms_it(steps):
    dense, x, layer, cells = fitted(1, 6, True)
    layer.train()
    start = {k: v.clone() for k, v in layer.state_dict().items()}
    val = torch.randn(100, H, generator=torch.Generator().manual_seed(3))
    info = fit_peer.fit_retrieval(layer, dense, x, val, cells, steps,
                                  torch.Generator().manual_seed(4))
    now = fit_peer.measure(layer, dense, val, cells)["rel_err"]
    assert info["fit_kept"] == (info["fit_val_rel_err_after"] < info["fit_val_rel_err_before"])
    if not info["fit_kept"]:  # steps=0 changes nothing, so it is never kept
        assert all(torch.equal(v, start[k]) for k, v in layer.state_dict().items())
        assert now == info["fit_val_rel_err_before"]
    else:
        assert now == info["fit_val_rel_err_after"]
    assert steps or not info["fit_kept"]
    # the mode and requires_grad flags it found are restored
    assert layer.training and all(p.requires_grad for p in layer.parameters())
