"""moefy.PEER: the paper's layer against a brute-force oracle, retrieval exactness, BatchNorm,
modes, training with sparse gradients, memory, errors."""

import copy
import io

import pytest
import torch

import moefy
from moefy.activations import get_activation
from moefy.errors import InputError

# (grid, heads, top_k): square and rectangular grids, k above one half's size, k = 1
RETRIEVAL = (((16, 16), 4, 8), ((8, 32), 2, 16), ((5, 7), 3, 6), ((32, 32), 8, 16),
             ((3, 3), 1, 9), ((64, 16), 2, 1))
CONFIGS = (
    dict(activation="gelu", score="softmax"),
    dict(activation="silu", score="sigmoid", gated=True),
    dict(activation="relu", score="none", bias=True),
    dict(activation="gelu_tanh", score="softmax", gated=True, bias=True, query_norm=None),
)


def full_keys(layer):
    """The N keys [keys_a[a]; keys_b[b]] written out, expert a·n₂ + b in row order."""
    n1, n2 = layer.grid
    a = layer.keys_a.repeat_interleave(n2, 0)
    b = layer.keys_b.repeat(n1, 1)
    return torch.cat([a, b], dim=1)  # (N, d)


def oracle(layer, x):
    """Token by token: score every key, top-k per head, weights, Σ over heads and slots of
    weight · single-neuron expert, all in float64."""
    x2 = x.reshape(-1, layer.hidden_size).double()
    q = layer._queries(x2.to(layer.down.dtype), update=False).double()  # (T, heads, d)
    keys = full_keys(layer).double()
    act = get_activation(layer.activation).fn
    rows = []
    for t in range(x2.shape[0]):
        y = torch.zeros(layer.hidden_size, dtype=torch.float64)
        for h in range(layer.heads):
            scores, ids = (keys @ q[t, h]).topk(layer.top_k)
            w = {"softmax": torch.softmax(scores, 0), "sigmoid": torch.sigmoid(scores),
                 "none": torch.ones_like(scores)}[layer.score]
            for j in range(layer.top_k):
                i = int(ids[j])
                pre = layer.down[i].double() @ x2[t]
                if layer.down_bias is not None:
                    pre = pre + layer.down_bias[i].double()
                if layer.gate is None:
                    hidden = act(pre)
                else:
                    hidden = act(layer.gate[i].double() @ x2[t]) * pre
                y = y + w[j] * hidden * layer.up[i].double()
        if layer.out_bias is not None:
            y = y + layer.out_bias.double()
        rows.append(y)
    out = torch.stack(rows) if rows else x2.new_zeros(0, layer.hidden_size)
    return out.to(x.dtype).reshape(x.shape)


def randomise(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if layer.query_norm is not None:
            layer.query_norm.running_mean.copy_(torch.randn(layer.query_norm.num_features) * .1)
            layer.query_norm.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("grid,heads,k", RETRIEVAL)
def test_product_keys_return_the_exact_top_k(grid, heads, k):
    layer = moefy.PEER(24, grid, heads=heads, top_k=k, key_dim=16).eval()
    randomise(layer, seed=sum(grid) + heads + k)
    x = torch.randn(50, 24)
    fast = layer.route(x)
    exact = layer.route(x, exhaustive=True)
    assert fast.ids.shape == exact.ids.shape == (50, heads, k)
    torch.testing.assert_close(fast.scores, exact.scores)
    # random float scores: no ties, so the same experts in the same order
    assert torch.equal(fast.ids, exact.ids)
    torch.testing.assert_close(fast.weights, exact.weights)


def test_exhaustive_route_scores_every_key():
    layer = randomise(moefy.PEER(16, (6, 10), heads=3, top_k=5, key_dim=8).eval())
    x = torch.randn(7, 16)
    route = layer.route(x, exhaustive=True)
    q = layer._queries(x, update=False)  # (T, heads, d)
    brute = torch.einsum("thd,nd->thn", q, full_keys(layer)).topk(5, dim=-1)
    torch.testing.assert_close(route.scores, brute.values)
    assert torch.equal(route.ids, brute.indices)
    assert ((route.ids >= 0) & (route.ids < 60)).all()


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("grad", (False, True))
def test_forward_is_the_papers_layer(cfg, grad):
    layer = randomise(moefy.PEER(20, (9, 11), heads=3, top_k=5, key_dim=12, **cfg).eval())
    x = torch.randn(2, 13, 20)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, oracle(layer, x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", ((0, 16), (3, 0, 16), (1, 16), (16,), (2, 3, 4, 16)))
def test_any_leading_shape(shape):
    layer = moefy.PEER(16, 64, heads=2, top_k=4)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer.eval()(x)
    assert y.shape == x.shape
    assert layer.route(x).ids.shape == (x.numel() // 16, 2, 4)


def test_modes_agree():
    layer = randomise(moefy.PEER(16, 100, heads=2, top_k=4, bias=True)).eval()
    x = torch.randn(9, 16)
    y = layer(x)
    with torch.no_grad():
        y_ng = layer(x)
    with torch.inference_mode():
        y_im = layer(x)
    torch.testing.assert_close(y.detach(), y_ng)
    torch.testing.assert_close(y_ng, y_im)
    with torch.inference_mode():
        made = moefy.PEER(16, 100, heads=2, top_k=4, bias=True)
        made.load_state_dict(layer.state_dict())
        torch.testing.assert_close(made.eval()(x), y_ng)
    with pytest.raises(InputError, match="inference_mode"):
        made(x)


def test_batchnorm_keeps_padding_out_of_its_statistics():
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4)).train()
    real = torch.randn(2, 5, 16)
    padded = torch.cat([real, torch.randn(2, 3, 16) * 100], dim=1)  # 3 padding positions
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :5] = True
    alone, with_pad = copy.deepcopy(layer), copy.deepcopy(layer)
    y_alone = alone(real)
    y_pad = with_pad(padded, mask=mask)
    torch.testing.assert_close(y_pad[:, :5], y_alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_pad.query_norm.running_mean, alone.query_norm.running_mean)
    torch.testing.assert_close(with_pad.query_norm.running_var, alone.query_norm.running_var)
    # without the mask the padding moves the statistics
    unmasked = copy.deepcopy(layer)
    unmasked(padded)
    assert not torch.allclose(unmasked.query_norm.running_mean, alone.query_norm.running_mean)


def test_route_changes_no_state_and_single_token_training_uses_running_stats():
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4)).train()
    before = copy.deepcopy(layer.state_dict())
    layer.route(torch.randn(10, 16))
    for name, value in layer.state_dict().items():
        assert torch.equal(value, before[name]), name
    x1 = torch.randn(1, 16)
    y = layer(x1)  # one token: batch statistics are meaningless
    assert torch.equal(layer.query_norm.running_mean, before["query_norm.running_mean"])
    torch.testing.assert_close(y, layer.eval()(x1))


def test_trains_with_sparse_gradients():
    torch.manual_seed(0)
    layer = moefy.PEER(16, 256, heads=4, top_k=4, sparse=True)
    target = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                 torch.nn.Linear(32, 16))
    tables = [layer.down, layer.up]
    others = [p for p in layer.parameters() if all(p is not t for t in tables)]
    opt_sparse = torch.optim.SparseAdam(tables, lr=1e-2)
    opt = torch.optim.Adam(others, lr=1e-2)
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(60):
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        opt_sparse.zero_grad()
        loss.backward()
        assert layer.down.grad.is_sparse and layer.up.grad.is_sparse
        assert layer.keys_a.grad is not None and layer.query.weight.grad is not None
        opt.step()
        opt_sparse.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


@pytest.mark.parametrize("query_norm,block", ((None, None), ("batch", 2 * 5 * 4 * 2)))
def test_gradients_match_the_oracle(query_norm, block, monkeypatch):
    if block:  # blocks of two tokens
        monkeypatch.setattr("moefy.runtime.peer_search._SEARCH_BYTES", block)
    layer = randomise(moefy.PEER(12, (4, 5), heads=2, top_k=3, key_dim=8, bias=True,
                                 gated=True, query_norm=query_norm)).train()
    x = torch.randn(6, 12, requires_grad=True)
    params = [x, layer.down, layer.up, layer.gate, layer.down_bias, layer.keys_a, layer.keys_b,
              layer.query.weight]
    got = torch.autograd.grad(layer(x).square().sum(), params)
    want = torch.autograd.grad(oracle(layer, x.double()).square().sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-4, atol=1e-4)


def test_never_materialises_tokens_by_experts_or_gathered_rows():
    t, h, n = 64, 64, 128 * 128
    layer = moefy.PEER(h, n, heads=2, top_k=8).eval()
    x = torch.randn(t, h)
    with torch.no_grad():
        layer(x)  # warm-up: kernels built, caches made
    with torch.profiler.profile(profile_memory=True) as prof, torch.no_grad():
        layer(x)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    gathered = t * layer.heads * layer.top_k * h * 4
    assert biggest < gathered, f"an op allocated {biggest} bytes >= T·h·k·H·4 = {gathered}"
    assert biggest < t * n * 4


def test_state_dict_round_trip_and_deepcopy():
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4, gated=True, bias=True)).eval()
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = moefy.PEER(16, 64, heads=2, top_k=4, gated=True, bias=True).eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(5, 16)
    torch.testing.assert_close(fresh(x), layer(x))
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x))


@pytest.mark.parametrize("kwargs,match", (
    (dict(num_experts=1000), "perfect square"),
    (dict(num_experts=(4, 0)), "pair"),
    (dict(num_experts=64, top_k=65), "more than"),
    (dict(num_experts=64, key_dim=7), "even"),
    (dict(num_experts=64, score="relu"), "score"),
    (dict(num_experts=64, query_norm="layer"), "query_norm"),
    (dict(num_experts=64, heads=0), "heads"),
    (dict(num_experts=64, activation=torch.nn.GELU()), "name"),
    (dict(num_experts=64, activation=torch.tanh), "name"),
))
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moefy.PEER(16, **kwargs)


@pytest.mark.parametrize("x,mask,match", (
    (torch.randn(3, 15), None, r"\(\.\.\., 16\)"),
    (torch.randn(3, 16, dtype=torch.float64), None, "float64"),
    (torch.randint(0, 5, (3, 16)), None, "floating-point"),
    ([[0.0] * 16], None, "list"),
    (torch.randn(3, 16), torch.ones(3), "bool"),
    (torch.randn(3, 16), torch.ones(4, dtype=torch.bool), r"\(3,\)"),
))
def test_bad_input(x, mask, match):
    layer = moefy.PEER(16, 64, heads=2, top_k=4)
    with pytest.raises(InputError, match=match):
        layer(x, mask=mask)


def test_blockwise_search_equals_one_block(monkeypatch):
    layer = randomise(moefy.PEER(16, (12, 20), heads=3, top_k=7, key_dim=8).eval())
    x = torch.randn(101, 16)
    whole = layer.route(x)
    monkeypatch.setattr("moefy.runtime.peer_search._SEARCH_BYTES", 3 * 20 * 4 * 9)  # 9-token blocks
    blocks = layer.route(x)
    assert torch.equal(blocks.ids, whole.ids)
    torch.testing.assert_close(blocks.scores, whole.scores)
    assert torch.equal(layer.route(x, exhaustive=True).ids, whole.ids)


@pytest.mark.parametrize("grid,heads,k", RETRIEVAL)
def test_search_kernel_equals_torch_topk(grid, heads, k, monkeypatch):
    from moefy.runtime.kernels import search_kernel_available
    if not search_kernel_available():
        pytest.skip("C++ kernels unavailable (MOEFY_NO_EXT=1 or no compiler)")
    layer = randomise(moefy.PEER(24, grid, heads=heads, top_k=k, key_dim=16).eval(), seed=k)
    x = torch.randn(300, 24)
    fast = layer.route(x)
    monkeypatch.setattr("moefy.runtime.peer_search._search_kernel_applies", lambda *a: False)
    slow = layer.route(x)
    assert torch.equal(fast.ids, slow.ids)
    torch.testing.assert_close(fast.scores, slow.scores)


@pytest.mark.parametrize("grid,heads,k", RETRIEVAL[:3])
def test_key_scores_are_every_key_and_change_no_state(grid, heads, k):
    layer = randomise(moefy.PEER(24, grid, heads=heads, top_k=k, key_dim=16), seed=k).train()
    x = torch.randn(2, 20, 24)
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    scores = layer.key_scores(x)  # (40, heads, N)
    q = layer._queries(x.reshape(-1, 24), update=False)  # (40, heads, d)
    want = torch.einsum("thd,nd->thn", q, full_keys(layer))
    torch.testing.assert_close(scores, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(t, before[name]) for name, t in layer.state_dict().items())
    scores.square().sum().backward()
    assert all(p.grad is not None for p in (layer.keys_a, layer.keys_b, layer.query.weight))
    layer.eval()
    assert torch.equal(layer.key_scores(x).topk(k).indices, layer.route(x, exhaustive=True).ids)


def test_a_nan_token_is_nan_and_touches_no_other_token():
    layer = randomise(moefy.PEER(16, 256, heads=2, top_k=4)).eval()
    x = torch.randn(6, 16)
    clean = layer(x)
    x[2, 3] = float("nan")
    y = layer(x)
    assert torch.isnan(y[2]).all()
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(y[keep], clean[keep])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_matches_cpu(dtype):
    layer = randomise(moefy.PEER(64, 64 * 64, heads=4, top_k=8, gated=True, bias=True)).eval()
    x = torch.randn(3, 40, 64)
    want = layer(x)
    cuda = copy.deepcopy(layer).to("cuda", dtype)
    got = cuda(x.to("cuda", dtype)).float().cpu()
    if dtype == torch.float32:
        assert torch.equal(cuda.route(x.to("cuda")).ids.cpu(), layer.route(x).ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # bfloat16 scores may order near-ties differently: compare as a whole
        assert (got - want).norm() < 0.05 * want.norm()
    loss = cuda.train()(x.to("cuda", dtype)).float().square().mean()
    loss.backward()
    assert cuda.down.grad is not None and torch.isfinite(cuda.down.grad.float()).all()


def test_runs_under_autocast():
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4)).eval()
    x = torch.randn(5, 16)
    want = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    assert got.dtype == torch.float32
    assert (got - want).norm() < 0.1 * want.norm()


def test_trains_under_autocast():
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4)).train()
    x = torch.randn(7, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    for p in (x, layer.keys_a, layer.keys_b, layer.query.weight, layer.down):
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()


def test_second_order_gradients_are_refused_not_silently_dropped():
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4)).eval()
    x = torch.randn(5, 16, requires_grad=True)
    with pytest.raises(moefy.errors.TrainingInputError, match="create_graph"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


def test_a_nan_token_in_training_leaves_other_tokens_and_statistics_finite():
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4)).train()
    x = torch.randn(6, 16)
    clean = copy.deepcopy(layer)
    want = clean(torch.cat([x[:2], x[3:]]))
    x[2] = float("nan")
    y = layer(x)
    assert torch.isnan(y[2]).all()
    torch.testing.assert_close(torch.cat([y[:2], y[3:]]), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.query_norm.running_mean, clean.query_norm.running_mean)
    assert torch.isfinite(layer.eval()(torch.randn(3, 16))).all()


def test_layer_built_in_inference_mode_trains_its_statistics_under_no_grad():
    with torch.inference_mode():
        layer = moefy.PEER(16, 64, heads=2, top_k=4)
    before = layer.query_norm.running_mean.clone()
    with torch.no_grad():
        layer(torch.randn(8, 16) + 3)
    assert not torch.equal(layer.query_norm.running_mean, before)


@pytest.mark.parametrize("norm", ("momentum_none", "untracked"))
def test_other_batchnorm_settings(norm):
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4))
    if norm == "momentum_none":  # a cumulative average
        layer.query_norm.momentum = None
        x = torch.randn(10, 16)
        layer.train()(x)
        q = layer.query(x)
        torch.testing.assert_close(layer.query_norm.running_mean, q.mean(0).detach())
    else:
        layer.query_norm = torch.nn.BatchNorm1d(layer.heads * layer.key_dim,
                                                track_running_stats=False)
        x = torch.randn(10, 16)
        torch.testing.assert_close(layer.eval()(x), layer.train()(x))


def test_sparse_gradients_stay_sparse_under_torch_compile():
    layer = randomise(moefy.PEER(16, 64, heads=2, top_k=4, sparse=True))
    x = torch.randn(5, 16)
    compiled = torch.compile(layer, backend="eager")
    compiled(x).square().sum().backward()
    assert layer.down.grad.is_sparse and layer.up.grad.is_sparse
    got = layer.down.grad.to_dense()
    layer.down.grad = None
    layer(x).square().sum().backward()
    torch.testing.assert_close(got, layer.down.grad.to_dense())


@pytest.mark.parametrize("n1,n2,k", ((1024, 1024, 16), (300, 517, 16), (1000, 40, 7),
                                     (512, 512, 1), (64, 64, 16)))
def test_search_kernel_on_ties_infinities_and_ragged_rows(n1, n2, k):
    from moefy.runtime.kernels import search_kernel_available
    if not search_kernel_available():
        pytest.skip("C++ kernels unavailable (MOEFY_NO_EXT=1 or no compiler)")
    g = torch.Generator().manual_seed(n1 + k)
    s_a, s_b = torch.randn(400, n1, generator=g), torch.randn(400, n2, generator=g)
    s_a[:40] = s_a[:40].round()  # many ties
    s_a[40:50] = -float("inf")
    s_a[40:50, :3] = 1.0  # fewer finite scores than k in one half
    a, b = torch.ops.moefy_cpu.peer_search(s_a, s_b, k)
    got = s_a.gather(1, a) + s_b.gather(1, b)
    want = (s_a[:, :, None] + s_b[:, None, :]).flatten(1).topk(k, dim=1).values
    torch.testing.assert_close(got, want)
    assert (got[:, :-1] >= got[:, 1:]).all()  # descending
