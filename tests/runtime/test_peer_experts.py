"""moefy/runtime/peer.py: every implementation of PEER's fused experts equals the per-token
oracle, forward and gradients; weight-0 slots are never computed; sparse gradients are
coalesced and equal the dense ones; under export the op is plain ops."""

import pytest
import torch

from moefy.activations import get_activation
from moefy.errors import InputError
from moefy.runtime import peer
from moefy.runtime.kernels import peer_kernels_available
from moefy.runtime.peer import advise_huge_pages, peer_experts, peer_experts_reference

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "squared_relu", "quick_gelu", "hardswish")
GATED = (False, True)
BIAS = (False, True)
TOKENS = (0, 1, 5, 37)
SLOTS = (1, 4, 16)

needs_kernel = pytest.mark.skipif(not peer_kernels_available(),
                                  reason="C++ kernels unavailable (MOEFY_NO_EXT=1 or no compiler)")


def make_problem(T, S, *, N=12, H=83, gated=False, bias=False, dtype=torch.float32):
    """Few experts, so ids repeat across tokens; token 0 also holds one id twice. H = 83
    runs the kernel's 64-wide loop, its 16-wide loop and its scalar tail."""
    x = torch.randn(T, H)
    ids = torch.randint(0, N, (T, S))
    if T and S > 1:
        ids[0, 1] = ids[0, 0]
    weights = torch.rand(T, S) + 0.1
    tables = {"down": torch.randn(N, H) / H**0.5, "up": torch.randn(N, H)}
    if gated:
        tables["gate"] = torch.randn(N, H) / H**0.5
    if bias:
        tables["down_bias"] = torch.randn(N)
    x, weights = x.to(dtype).requires_grad_(), weights.to(dtype).requires_grad_()
    tables = {k: v.to(dtype).requires_grad_() for k, v in tables.items()}
    return x, ids, weights, tables


def grads_of(fn, x, ids, weights, tables, activation, grad_out, **kw):
    y = fn(x, ids, weights, tables["down"], tables["up"], down_bias=tables.get("down_bias"),
           gate=tables.get("gate"), activation=activation, **kw)
    inputs = [x, weights, *tables.values()]
    if not y.requires_grad:  # the reference when every weight is 0: a constant 0
        return y, [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(y, inputs, grad_out, allow_unused=True, materialize_grads=True)
    return y, [g.to_dense() if g.is_sparse else g for g in grads]


def kernel(x, ids, weights, down, up, *, down_bias=None, gate=None, activation="gelu",
           sparse=False):
    return peer._PeerKernel.apply(x, ids, weights, down, up, down_bias, gate,
                                  get_activation(activation).name, sparse)


def chunked(x, ids, weights, down, up, *, down_bias=None, gate=None, activation="gelu",
            sparse=False):
    return peer._peer_chunked(x, ids, weights, down, up, down_bias, gate,
                              get_activation(activation), sparse)


def gather(x, ids, weights, down, up, *, down_bias=None, gate=None, activation="gelu"):
    return peer._peer_gather(x, ids, weights, down, up, down_bias, gate,
                             get_activation(activation))


def assert_matches_reference(fn, problem, activation, rtol=1e-4, atol=1e-5, **kw):
    x, ids, weights, tables = problem
    grad_out = torch.randn(x.shape)
    y, grads = grads_of(fn, *problem, activation, grad_out, **kw)
    y_ref, grads_ref = grads_of(peer_experts_reference, *problem, activation, grad_out)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    names = ["x", "weights", *tables]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol, msg=f"grad of {name}")


@needs_kernel
@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_matches_reference(activation, gated, bias):
    problem = make_problem(5, 4, gated=gated, bias=bias)
    assert_matches_reference(kernel, problem, activation)


@needs_kernel
@pytest.mark.parametrize("S", SLOTS)
@pytest.mark.parametrize("T", TOKENS)
def test_kernel_matches_reference_at_every_size(T, S):
    problem = make_problem(T, S, gated=True, bias=True)
    assert_matches_reference(kernel, problem, "silu")
    x, ids, weights, tables = problem
    with torch.no_grad():  # the direct call without autograd gives the same output
        y = peer_experts(x, ids, weights, tables["down"], tables["up"],
                         down_bias=tables["down_bias"], gate=tables["gate"], activation="silu")
    torch.testing.assert_close(y, kernel(x, ids, weights, **tables, activation="silu"))


@needs_kernel
def test_kernel_with_frozen_tables_gives_only_the_gradients_asked_for():
    x, ids, weights, tables = make_problem(6, 4, gated=True)
    frozen = {k: v.detach() for k, v in tables.items()}
    grad_out = torch.randn(x.shape)
    y = kernel(x, ids, weights, **frozen)
    gx, gw = torch.autograd.grad(y, [x, weights], grad_out)
    y_ref = peer_experts_reference(x, ids, weights, **frozen)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, [x, weights], grad_out)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_peer_experts_runs_the_kernel_for_cpu_float32(monkeypatch):
    def no_fallback(*args):
        raise AssertionError("CPU float32 must take the C++ kernel")

    monkeypatch.setattr(peer, "_peer_chunked", no_fallback)
    x, ids, weights, tables = make_problem(3, 4)
    peer_experts(x, ids, weights, **tables).sum().backward()
    assert x.grad is not None and tables["down"].grad is not None


def test_without_kernels_the_pytorch_path_is_used_and_agrees(monkeypatch):
    monkeypatch.setattr(peer, "peer_kernels_available", lambda: False)
    problem = make_problem(5, 4, gated=True, bias=True)
    assert_matches_reference(peer_experts, problem, "gelu")


@pytest.mark.parametrize("S", SLOTS)
@pytest.mark.parametrize("T", TOKENS)
def test_chunked_path_matches_reference(T, S, monkeypatch):
    # ~3 tokens per chunk: several chunks, each recomputed in the backward (checkpointing)
    monkeypatch.setattr(peer, "CHUNK_BYTES", 3 * S * 83 * 4 * 3)
    problem = make_problem(T, S, gated=True, bias=True)
    with torch.no_grad():
        problem[2][T // 2:, 0] = 0  # some weight-0 slots: the compacted (variable bag) branch
    assert_matches_reference(chunked, problem, "gelu")


@pytest.mark.parametrize("gated", GATED)
def test_gather_path_matches_reference(gated):
    problem = make_problem(5, 4, gated=gated, bias=True)
    with torch.no_grad():
        problem[2][1, 2] = 0
    assert_matches_reference(gather, problem, "gelu_tanh")


@pytest.mark.parametrize("path", ("chunked", "gather"))
def test_bfloat16_pytorch_paths_are_close_to_the_reference(path):
    fn = {"chunked": chunked, "gather": gather}[path]
    x, ids, weights, tables = make_problem(9, 4, gated=True, bias=True, dtype=torch.bfloat16)
    y = fn(x, ids, weights, **tables)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in tables.values())
    y_ref = peer_experts_reference(x, ids, weights, **tables)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=3e-2, atol=3e-2)


IMPLS = {"kernel": kernel, "chunked": chunked, "gather": gather}


@pytest.mark.parametrize("impl", tuple(IMPLS))
def test_a_weight_zero_slot_is_never_computed_even_with_inf_rows(impl):
    if impl == "kernel" and not peer_kernels_available():
        pytest.skip("C++ kernels unavailable")
    x, ids, weights, tables = make_problem(4, 3, gated=True, bias=True)
    bad = 11
    ids = ids % bad  # no other slot retrieves expert 11 ...
    ids[2, 1] = bad  # ... but this weight-0 slot, whose rows are inf
    with torch.no_grad():
        weights[2, 1] = 0
        for t in tables.values():
            t[bad] = float("inf")
    grad_out = torch.randn(x.shape)
    y, grads = grads_of(IMPLS[impl], x, ids, weights, tables, "gelu", grad_out)
    assert torch.isfinite(y).all()
    gx, gw = grads[:2]
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all() and gw[2, 1] == 0
    for name, g in zip(tables, grads[2:], strict=True):
        assert torch.isfinite(g).all(), name
        assert (g[bad] == 0).all(), name  # the unused expert gets no gradient
    torch.testing.assert_close(y, peer_experts_reference(x, ids, weights, **tables),
                               rtol=1e-4, atol=1e-5)


@needs_kernel
def test_a_nan_token_stays_in_its_own_row():
    x, ids, weights, tables = make_problem(4, 4, gated=True)
    with torch.no_grad():
        x[1, 5] = float("nan")
    y = kernel(x, ids, weights, **tables)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("impl", ("kernel", "chunked"))
def test_sparse_gradients_are_coalesced_and_equal_the_dense_ones(impl):
    if impl == "kernel" and not peer_kernels_available():
        pytest.skip("C++ kernels unavailable")
    fn = IMPLS[impl]
    x, ids, weights, tables = make_problem(7, 4, N=40, gated=True, bias=True)
    grad_out = torch.randn(x.shape)
    inputs = list(tables.values())
    dense = torch.autograd.grad(fn(x, ids, weights, **tables), inputs, grad_out)
    sparse = torch.autograd.grad(fn(x, ids, weights, **tables, sparse=True), inputs, grad_out)
    used = ids.unique()
    for name, d, s in zip(tables, dense, sparse, strict=True):
        assert s.is_sparse and s.is_coalesced(), name
        assert s.shape == d.shape
        assert torch.equal(s.indices()[0], used), name  # one row per retrieved expert
        torch.testing.assert_close(s.to_dense(), d, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", ("kernel", "chunked"))
def test_a_sparse_adam_step_moves_only_the_retrieved_rows(impl):
    if impl == "kernel" and not peer_kernels_available():
        pytest.skip("C++ kernels unavailable")
    x, ids, weights, tables = make_problem(6, 4, N=40, bias=True)
    before = {k: v.detach().clone() for k, v in tables.items()}
    opt = torch.optim.SparseAdam(list(tables.values()), lr=1e-2)
    IMPLS[impl](x, ids, weights, **tables, sparse=True).square().sum().backward()
    opt.step()
    used = torch.zeros(40, dtype=torch.bool)
    used[ids.unique()] = True
    for name, t in tables.items():
        moved = (t.detach() != before[name]).reshape(40, -1).any(1)
        assert torch.equal(moved, used), name


def test_under_export_the_op_is_plain_ops():
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            _, _, _, tables = make_problem(1, 4, gated=True, bias=True)
            self.tables = torch.nn.ParameterDict(tables)

        def forward(self, x, ids, weights):
            t = self.tables
            return peer_experts(x, ids, weights, t["down"], t["up"], down_bias=t["down_bias"],
                                gate=t["gate"])

    model = Experts()
    x, ids, weights, _ = make_problem(6, 4)
    x, weights = x.detach(), weights.detach()
    with torch.no_grad():
        weights[2, 0] = 0
    program = torch.export.export(model, (x, ids, weights))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets and all(t.startswith("aten.") for t in targets), targets
    assert "aten.embedding.default" in targets
    torch.testing.assert_close(program.module()(x, ids, weights), model(x, ids, weights),
                               rtol=1e-4, atol=1e-5)


def test_compiles_as_one_graph():
    x, ids, weights, tables = make_problem(5, 4, gated=True)
    fn = torch.compile(peer_experts, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x, ids, weights, **tables),
                               peer_experts_reference(x, ids, weights, **tables),
                               rtol=1e-4, atol=1e-5)


BAD_INPUTS = {
    "ids not int64": (lambda p: {**p, "ids": p["ids"].int()}, "ids must be int64"),
    "ids out of range": (lambda p: {**p, "ids": p["ids"] + 12}, "ids must lie in [0, 12)"),
    "negative id": (lambda p: {**p, "ids": p["ids"] - 12}, "ids must lie in [0, 12)"),
    "weights shape": (lambda p: {**p, "weights": p["weights"][:, :2]}, "weights must be"),
    "weights dtype": (lambda p: {**p, "weights": p["weights"].double()}, "weights must be"),
    "x 3-D": (lambda p: {**p, "x": p["x"][None]}, "x must be a floating-point (T, H)"),
    "hidden size": (lambda p: {**p, "down": p["down"][:, :5]}, "down must be (N, H)"),
    "up shape": (lambda p: {**p, "up": p["up"][:5]}, "up must have down's shape"),
    "bias shape": (lambda p: {**p, "down_bias": p["down"][:, 0][:3]}, "down_bias must be"),
    "table dtype": (lambda p: {**p, "up": p["up"].double()}, "up is torch.float64"),
    "activation": (lambda p: {**p, "activation": "tanhh"}, "unknown activation 'tanhh'"),
}


@pytest.mark.parametrize("case", tuple(BAD_INPUTS))
def test_bad_input_raises_a_typed_error_that_says_what(case):
    x, ids, weights, tables = make_problem(3, 4)
    args = {"x": x, "ids": ids, "weights": weights, **tables}
    broken, message = BAD_INPUTS[case]
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        peer_experts(**broken(args))


@needs_kernel
def test_advise_huge_pages_is_only_a_hint():
    table = torch.empty(2048, 1024)  # 8 MiB
    assert isinstance(advise_huge_pages(table), bool)
    table.fill_(3.0)
    assert (table == 3.0).all()
    assert advise_huge_pages(torch.empty(4, 4)) is False  # too small to matter
