"""One contract in every mode: grad / no_grad / inference_mode (weights made in it too), train
and eval, float32 / bfloat16 / float16, several threads, in-place weight edits, non-finite
tokens — each against the naive oracle (moefy.runtime.reference_ffn)."""

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moefy
from moefy.errors import InputError
from moefy.runtime import reference_ffn

MODES = ("grad", "no_grad", "inference_mode")
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def grad_mode(mode):
    return {"grad": torch.enable_grad, "no_grad": torch.no_grad,
            "inference_mode": torch.inference_mode}[mode]()


def oracle(moe, x, weights, indices):
    """The contract, computed naively in float32 from the layer's own weights."""
    ew = moe.expert_weights()
    f32 = type(ew)(*(None if t is None else t.detach().float() for t in ew[:6]), ew.activation)
    y = reference_ffn(x.detach().float(), weights.detach().float(), indices, f32)
    with torch.no_grad():
        return y + moe.shared(x.detach()).float()


def make(built_in, dtype=torch.float32, **kw):
    with grad_mode(built_in):  # built, and cast, in that mode
        torch.manual_seed(0)
        return moefy.MoE(16, 24, num_experts=6, **kw).to(dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(built_in=st.sampled_from(MODES), run_in=st.sampled_from(MODES),
       training=st.booleans(), dtype=st.sampled_from((torch.float32, torch.bfloat16,
                                                      torch.float16)),
       tokens=st.sampled_from((0, 1, 5, 16, 17, 40)), top_k=st.integers(1, 3),
       gated=st.booleans(), router=st.sampled_from(("softmax", "sigmoid", "topp")),
       activation=st.sampled_from(("gelu", "silu", "relu")), shared=st.sampled_from((0, 8)))
def test_every_mode_keeps_the_contract(built_in, run_in, training, dtype, tokens, top_k, gated,
                                       router, activation, shared):
    if built_in == "inference_mode" and run_in == "grad":
        return  # inference tensors cannot join autograd: a typed error (tested below)
    moe = make(built_in, dtype, top_k=top_k, gated=gated, router=router,
               activation=activation, shared_expert_size=shared).train(training)
    x = torch.randn(tokens, 16).to(dtype)
    with grad_mode(run_in):
        weights, indices = moe.route(x)  # before forward: a sigmoid router moves in training
        y = moe(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = oracle(moe, x, weights, indices)
    torch.testing.assert_close(y.float(), ref, rtol=TOL[dtype], atol=TOL[dtype] * 4)
    if run_in == "grad" and tokens:
        y.float().sum().backward()
        assert moe.w_in.grad is not None and torch.isfinite(moe.w_in.grad).all()


@pytest.mark.parametrize("tokens", (8, 300))  # C++ decode kernel, prepacked oneDNN path
def test_layer_built_under_inference_mode_runs(tokens):
    with torch.inference_mode():
        moe = moefy.MoE(32, 16, 8, 2).eval()
        x = torch.randn(tokens, 32)
        y = moe(x)
        w, i = moe.route(x)
        torch.testing.assert_close(y, oracle(moe, x, w, i), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # its tensors are inference tensors; no_grad reads them fine
        torch.testing.assert_close(moe(x.clone()), y)
    with pytest.raises(InputError, match="inference_mode"):
        moe(torch.randn(3, 32))  # grad mode: a clear error, not torch's internals


def test_several_threads_at_once_get_their_own_results():
    moe = moefy.MoE(64, 32, 8, 2).eval()
    xs = [torch.randn(n, 64) for n in (300, 40, 8, 257, 1, 100, 33, 64)]
    with torch.no_grad():
        refs = [moe(x) for x in xs]
    wrong = []

    def work(j):
        with torch.no_grad():
            for _ in range(15):
                if not torch.allclose(moe(xs[j]), refs[j], atol=1e-5):
                    wrong.append(j)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


EDITS = (
    ("data_mul", lambda m: m.w_in.data.mul_(2)),
    ("data_row", lambda m: m.w_out.data[3, 5].fill_(0.7)),
    ("data_swap_experts", lambda m: m.w_in.data.copy_(m.w_in.data.flip(0))),
    ("no_grad_copy", lambda m: m.w_gate.copy_(torch.randn_like(m.w_gate))),
    ("new_parameter", lambda m: setattr(m, "w_out", torch.nn.Parameter(m.w_out * 3))),
)


@pytest.mark.parametrize("name,edit", EDITS, ids=[e[0] for e in EDITS])
def test_in_place_weight_edits_are_seen(name, edit):
    moe = moefy.MoE(32, 16, 8, 2, gated=True).eval()
    x = torch.randn(200, 32)  # the prepacked path
    with torch.no_grad():
        moe(x)
        edit(moe)
        w, i = moe.route(x)
        torch.testing.assert_close(moe(x), oracle(moe, x, w, i), rtol=1e-5, atol=1e-5)


def test_invalidate_after_a_single_element_edit_through_data():
    moe = moefy.MoE(32, 16, 8, 2).eval()
    x = torch.randn(200, 32)
    with torch.no_grad():
        moe(x)
        moe.w_in.data[0, 0, 0] += 5.0  # may fall between the sampled fingerprint's elements
        moe.invalidate()
        w, i = moe.route(x)
        torch.testing.assert_close(moe(x), oracle(moe, x, w, i), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", (1, 7, 16, 40, 300))
@pytest.mark.parametrize("router", ("softmax", "topp", "expert_choice"))
def test_a_non_finite_token_never_changes_another_token(tokens, router):
    moe = moefy.MoE(32, 16, 8, 3, router=router, top_p=0.4).eval()
    x = torch.randn(tokens, 32)
    with torch.no_grad():
        clean = moe(x)
        for poison in (float("nan"), float("inf"), 1e30):
            bad = x.clone()
            bad[0] = poison
            y = moe(bad)
            if router == "expert_choice":  # tokens compete for experts: routing may move
                continue
            torch.testing.assert_close(y[1:], clean[1:])


def test_an_unchosen_expert_that_overflows_does_not_poison_its_token():
    """Decode batches run every touched expert on every token: a token whose input makes an
    expert it did not choose overflow must still get exactly its chosen experts' sum."""
    moe = moefy.MoE(8, 4, num_experts=2, top_k=1, activation="relu", bias=False).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0] + [0] * 7, [-1.0] + [0] * 7]))
        moe.w_in[1].fill_(3e38)  # expert 1 overflows to inf on any positive input
        moe.w_out[1].fill_(3e38)
        x = torch.zeros(4, 8)
        x[0, 0], x[1, 0] = 1.0, -1.0  # token 0 -> expert 0; token 1 -> expert 1
        x[0, 1:] = 1.0
        for tokens in (2, 4, 40):  # C++ kernel and oneDNN all-token path; sorted path
            xs = x.repeat(tokens // 4 + 1, 1)[:tokens]
            y = moe(xs)
            w, i = moe.route(xs)
            assert i[0, 0] == 0
            assert torch.isfinite(y[0]).all()


def test_aux_loss_after_zero_tokens_is_zero_not_nan():
    moe = moefy.MoE(16, 8, 4, 2, router="sigmoid").train()
    y = moe(torch.randn(0, 16))
    assert y.shape == (0, 16)
    loss = moefy.aux_loss(moe)
    assert loss.item() == 0.0
    assert torch.equal(moe.selection_bias, torch.zeros(4))


BAD_INPUTS = (
    (lambda: torch.randn(3, 15), "shape"),
    (lambda: torch.randn(3, 16, dtype=torch.float64), "float64"),
    (lambda: torch.randint(0, 5, (3, 16)), "int64"),
    (lambda: torch.tensor(1.0), "shape"),
    (lambda: [[0.0] * 16], "tensor"),
)


@pytest.mark.parametrize("make_x,what", BAD_INPUTS)
def test_bad_inputs_are_typed_errors(make_x, what):
    moe = moefy.MoE(16, 8, 4, 2)
    with pytest.raises(InputError, match=what):
        moe(make_x())


def test_capacity_factor_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        moefy.MoE(16, 8, 4, 2, capacity_factor=float("inf"))
    moe = moefy.MoE(16, 8, 4, 2)
    with pytest.raises(ValueError, match="finite"):
        moe.capacity_factor = float("nan")
    with pytest.raises(ValueError, match="capacity_factor"):
        moefy.MoEConfig(capacity_factor=float("inf"))


def test_deepcopy_and_pickle_after_a_training_forward():
    import copy
    import pickle
    moe = moefy.MoE(16, 8, 4, 2).train()
    moe(torch.randn(5, 16)).sum().backward()
    twin = copy.deepcopy(moe)
    assert twin.last_aux is None and moe.last_aux is not None
    pickle.loads(pickle.dumps(moe))
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), moe.eval()(x))


@pytest.mark.parametrize("value", (1.0, 1.5, -0.1, float("nan"), "a", True))
def test_expert_dropout_is_validated(value):
    moe = moefy.MoE(16, 8, 4, 2)
    with pytest.raises(ValueError, match="expert_dropout"):
        moe.expert_dropout = value


def test_expert_choice_a_non_finite_token_takes_no_expert_from_the_others():
    moe = moefy.MoE(16, 8, 4, 2, router="expert_choice").eval()
    x = torch.randn(12, 16)
    with torch.no_grad():
        clean = moe(x)
        bad = x.clone()
        bad[3] = float("nan")
        y = moe(bad)
    others = torch.arange(12) != 3
    # the other tokens compete among themselves as before, with one rival fewer: compare
    # with the same batch without the poisoned token
    with torch.no_grad():
        without = moe(x[others])
    assert torch.isfinite(y[others]).all()
    torch.testing.assert_close(y[others], without)
    assert clean.shape == y.shape
