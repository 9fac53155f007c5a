"""method="neuron", selection="static" (moefy/passes/neuron_static.py): exact at budget 1;
below it, the neurons its rule names with down refit by least squares, the budget read, and
refusals before any change."""

import copy
import math

import pytest
import torch

from moefy import MoEConfig, convert
from moefy import report as moefy_report
from moefy.errors import ConversionError
from moefy.layers.neuron import NeuronFFN, SparseLinear
from tests.passes.test_neuron import batches, tiny_llama


def test_static_budget_one_is_exactly_the_dense_model():
    model = tiny_llama()
    moe = convert(model, MoEConfig(method="neuron", selection="static"),
                  calibration_data=batches(2))
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, model(ids).logits)
    ffns = [m for m in moe.modules() if isinstance(m, NeuronFFN)]
    assert len(ffns) == 3 and all(m.ffn_size == 176 for m in ffns)
    assert not any(isinstance(m, SparseLinear) for m in moe.modules())  # attention dense


def mlp_inputs(model, data, layer=0):
    """The inputs of ``model``'s FFN ``layer`` on every token of ``data``, (tokens, hidden)."""
    got = []
    hook = model.model.layers[layer].mlp.register_forward_pre_hook(
        lambda m, args: got.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for b in data:
            model(**b)
    hook.remove()
    return torch.cat(got).double()


def test_static_set_is_the_neurons_its_rule_names_with_down_refit_by_least_squares():
    model, data = tiny_llama(), batches()
    moe = convert(model, MoEConfig(method="neuron", active=0.5, selection="static"),
                  calibration_data=data)
    ffns = [m for m in moe.modules() if isinstance(m, NeuronFFN)]
    # the budget, allocated between the layers: half the FFN neurons in all
    assert abs(sum(m.ffn_size for m in ffns) - 264) <= 3
    assert all(m.conversion["share_keep"] == round(m.ffn_size / 176, 4) for m in ffns)
    # the rule, recomputed naively on the dense model: h = silu(gate x)·(up x), the n neurons
    # of largest Var(h_i)·‖W_down[:, i]‖², then the ridge least-squares down and bias
    mlp, small = model.model.layers[0].mlp, ffns[0]
    n = small.ffn_size
    x = mlp_inputs(model, data)
    gate, up, down = (p.weight.double() for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    score = h.var(0, unbiased=False) * down.square().sum(0)
    keep = score.topk(n).indices.sort().values
    torch.testing.assert_close(small.w_in_t.double(), torch.cat([gate[keep], up[keep]]).T)
    y = h @ down.T
    hs = h[:, keep] - h[:, keep].mean(0)
    gram = hs.T @ hs
    gram += 1e-4 * gram.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    w = torch.linalg.solve(gram, hs.T @ (y - y.mean(0)))
    torch.testing.assert_close(small.w_out_t.double(), w, atol=1e-5, rtol=1e-4)
    b = y.mean(0) - h[:, keep].mean(0) @ w
    torch.testing.assert_close(small.b_out.double(), b, atol=1e-5, rtol=1e-4)
    # the refit is worth it: on the calibration tokens it is closer to the dense FFN than
    # the same neurons with down merely cut
    with torch.no_grad():
        refit = small(x.float()).double()
    cut = h[:, keep] @ down[:, keep].T
    assert (refit - y).norm() < 0.9 * (cut - y).norm()


def test_static_sets_read_the_budget_and_the_report_says_so():
    model, data = tiny_llama(), batches()
    moe = convert(model, MoEConfig(method="neuron", active=0.3, selection="static"),
                  calibration_data=data)
    sizes = [m.ffn_size for m in moe.modules() if isinstance(m, NeuronFFN)]
    assert abs(sum(sizes) - 0.3 * 3 * 176) <= 3
    text = str(moefy_report(moe, data[:2]))
    assert "ffn (static)" in text
    assert f"{sum(sizes) / (3 * 176):.1%} measured on the data" in text
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        out = moe(ids).logits
    assert torch.isfinite(out).all()


def test_static_refusals_come_before_any_change():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match="calibration_data"):
        convert(model, MoEConfig(method="neuron", active=0.5, selection="static"))
    bad = [{"inputs_embeds": torch.full((2, 8, 64), math.nan)}]
    with pytest.raises(ConversionError, match="non-finite"):
        convert(model, MoEConfig(method="neuron", active=0.5, selection="static"),
                calibration_data=bad, verify=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
