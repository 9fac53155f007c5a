"""Expert parallelism: 2 and 4 gloo processes give each rank the outputs and gradients of one
process on the same tokens (router, shared part: per rank; experts: summed over the ranks'
tokens), for softmax, sigmoid and capacity-factor routing, with a rank that receives no token
and a rank that sends none, and for a layer whose output width differs from its input's."""

from __future__ import annotations

import copy
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moefy
from moefy.distributed import expert_parallel, load_sharded
from moefy.errors import (
    ExpertParallelError,
    ExportInputError,
    HFExportError,
    LoadError,
    SaveError,
    TrainingInputError,
)
from moefy.io.checkpoint import read_plan

H, I, E = 16, 8, 6
TIMEOUT = datetime.timedelta(seconds=60)  # a deadlock fails the test instead of hanging CI
CASES = [dict(router="softmax"), dict(router="sigmoid"), dict(router="topp"),
         dict(router="softmax", capacity_factor=0.5), dict(router="softmax", skew=True),
         dict(router="softmax", output_size=3), dict(router="softmax", skew=True, output_size=3)]


def _layer(case: dict) -> moefy.MoE:
    torch.manual_seed(0)
    moe = moefy.MoE(H, I, E, 2, gated=True, shared_expert_size=4, router=case["router"],
                    capacity_factor=case.get("capacity_factor"),
                    output_size=case.get("output_size"))
    if case.get("skew"):  # every token picks experts 0 and 1: only rank 0 receives rows
        with torch.no_grad():
            moe.router.weight.zero_()
            moe.router.weight[:2, 0] = 50.0
    return moe.train()


def _tokens(rank: int, world: int, case: dict) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    count = 0 if rank == world - 1 and world > 2 else 5 + 3 * rank  # the last of 4 sends none
    x = torch.randn(count, H, generator=g)
    if case.get("skew"):
        x[:, 0] = x[:, 0].abs() + 1.0
    return x


def _reference(case: dict, world: int):
    """One process, each rank's tokens in turn: outputs, and the gradients of
    Σ_r (y_r · c_r).sum() (per rank for replicated tensors, summed for experts)."""
    outputs, grads = [], []
    for r in range(world):
        moe = _layer(case)
        x = _tokens(r, world, case).requires_grad_()
        y = moe(x)
        (y * _cotangent(y, r)).sum().backward()
        outputs.append((y.detach(), x.grad))
        grads.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                      for n, p in moe.named_parameters()})
    return outputs, grads


def _cotangent(y: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(7 + rank))


def _worker(rank: int, world: int, init: str, backend: str = "gloo") -> None:
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        for case in CASES:
            outputs, grads = _reference(case, world)  # on the CPU
            moe = expert_parallel(torch.nn.Sequential(_layer(case).to(device)))[0]
            x = _tokens(rank, world, case).to(device).requires_grad_()
            y = moe(x)
            (y * _cotangent(y.cpu(), rank).to(device)).sum().backward()
            want_y, want_dx = outputs[rank]
            torch.testing.assert_close(y.cpu(), want_y, rtol=1e-5, atol=1e-5, msg=str(case))
            if x.shape[0]:
                torch.testing.assert_close(x.grad.cpu(), want_dx, rtol=1e-5, atol=1e-5)
            shard = moe.shard
            for name, p in moe.named_parameters():
                if name.split(".")[0] in ("w_in", "w_gate", "w_out", "b_in", "b_gate",
                                          "b_out"):
                    want = sum(g[name] for g in grads)[shard.start:shard.stop]
                else:  # replicated: this rank's own tokens only
                    want = grads[rank][name]
                got = p.grad.cpu() if p.grad is not None else torch.zeros_like(want)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5,
                                           msg=f"{case} {name}")
            assert moe.last_dropped == _dropped(case, rank, world)  # capacity: as in one
            if case["router"] == "sigmoid":  # the replicated balancing bias stays replicated:
                # it follows the load of all ranks' tokens, as one process on all of them
                whole = _layer(case)
                whole(torch.cat([_tokens(r, world, case) for r in range(world)]))
                torch.testing.assert_close(moe.selection_bias.cpu(), whole.selection_bias)
                assert bool(moe.selection_bias.abs().sum() > 0)  # it did move
            with torch.no_grad():  # inference: the plain exchange, the packed kernels
                moe.eval()
                ref = _layer(case).eval()
                torch.testing.assert_close(moe(x).cpu(), ref(x.cpu()), rtol=1e-5, atol=1e-5)
        if world == 4:
            _mesh(rank, world, device, init)
    finally:
        dist.destroy_process_group()


def _mesh(rank: int, world: int, device: torch.device, init: str) -> None:
    """Expert × data parallelism on a 2 × 2 mesh: experts sharded over the rows {0, 1} and
    {2, 3}, replicated over the columns {0, 2} and {1, 3}. After reduce_gradients(average=
    True) every rank holds the mean over all four ranks' tokens, as one process running them
    in turn; the sigmoid router's bias follows all four ranks' load; a save by all four
    ranks writes the checkpoint of one process."""
    from moefy.distributed import reduce_gradients

    rows = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates each
    columns = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    for case in CASES[:2]:
        _, grads = _reference(case, world)
        moe = expert_parallel(torch.nn.Sequential(_layer(case).to(device)), rows[rank // 2],
                              data_parallel_group=columns[rank % 2])[0]
        y = moe(_tokens(rank, world, case).to(device))
        (y * _cotangent(y.cpu(), rank).to(device)).sum().backward()
        reduce_gradients(moe, average=True)
        shard = moe.shard
        assert (shard.start, shard.stop) == ((0, 3) if rank % 2 == 0 else (3, 6))
        for name, p in moe.named_parameters():
            want = sum(g[name] for g in grads) / world
            if name in ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out"):
                want = want[shard.start:shard.stop]
            torch.testing.assert_close(p.grad.cpu(), want, rtol=1e-4, atol=1e-6,
                                       msg=f"{case} {name}")
    whole = _layer(case)  # the sigmoid case: its bias after all four ranks' tokens
    whole(torch.cat([_tokens(r, world, case) for r in range(world)]))
    torch.testing.assert_close(moe.selection_bias.cpu(), whole.selection_bias, rtol=0, atol=0)
    moefy.save(moe, f"{init[len('file://'):]}-mesh")
    if rank == 0:
        moefy.save(whole, f"{init[len('file://'):]}-mesh-single")
    back = load_sharded(f"{init[len('file://'):]}-mesh", moefy.MoE(H, I, E, 2),
                        rows[rank // 2], data_parallel_group=columns[rank % 2])
    assert back.shard.bounds == shard.bounds
    assert all(torch.equal(v, moe.state_dict()[k]) for k, v in back.state_dict().items())
    # experts that drifted apart between two replicas (rank 2's block is rank 0's): every
    # rank of the mesh refuses to save
    if rank == 2:
        with torch.no_grad():
            moe.w_in.add_(1.0)
    with pytest.raises(SaveError, match="different weights") as refused:
        moefy.save(moe, f"{init[len('file://'):]}-mesh-drifted")
    if rank % 2 == 0:  # the column that differs names it; the other hears of it
        assert "between the data-parallel replicas" in str(refused.value)
    del refused  # its traceback holds this frame (a cycle): the groups would outlive the
    # process group's destruction and be torn down at exit, where gloo aborts
    assert not os.path.exists(f"{init[len('file://'):]}-mesh-drifted")


def _dropped(case: dict, rank: int, world: int) -> int:
    moe = _layer(case)
    moe(_tokens(rank, world, case))
    return moe.last_dropped


@pytest.mark.parametrize("world", [1, 2, 4])
def test_expert_parallel_matches_one_process(world, tmp_path):
    mp.start_processes(_worker, args=(world, f"file://{tmp_path / 'store'}"), nprocs=world,
                       start_method="spawn", join=True)
    if world == 4:  # the 2 x 2 mesh's save
        _assert_same_checkpoint(tmp_path / "store-mesh", tmp_path / "store-mesh-single",
                                exact=True)


@pytest.mark.gpu
def test_expert_parallel_on_nccl_matches_one_process(tmp_path):
    """The same checks with NCCL, one process per GPU (at most 4; NCCL does not put two
    ranks on one GPU, so with one GPU this is the one-rank path: sharding, checksums and
    the exchange set-up on CUDA tensors)."""
    world = min(torch.cuda.device_count(), 4)
    mp.start_processes(_worker, args=(world, f"file://{tmp_path / 'store'}", "nccl"),
                       nprocs=world, start_method="spawn", join=True)


def test_expert_parallel_needs_a_process_group():
    with pytest.raises(ExpertParallelError, match="init_process_group"):
        expert_parallel(torch.nn.Sequential(_layer(CASES[0])))


def _refusals_worker(rank: int, world: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        model = torch.nn.Sequential(_layer(CASES[0]))
        if rank:
            with torch.no_grad():
                model[0].w_in.add_(1.0)
        before = copy.deepcopy(model.state_dict())
        with pytest.raises(ExpertParallelError, match="different weights"):
            expert_parallel(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        sharded = expert_parallel(torch.nn.Sequential(_layer(CASES[0])))
        # one rank without gradients, the other with: both stop with the same error instead
        # of waiting forever in the backward exchange
        with pytest.raises(ExpertParallelError, match="different modes"):
            with torch.set_grad_enabled(rank == 0):
                sharded(torch.randn(4, H))
        # one rank in train(), the other in eval(): the sigmoid router's load all-reduce
        # would wait forever; the exchange's header stops both first
        sigmoid = expert_parallel(torch.nn.Sequential(_layer(CASES[1])))
        with pytest.raises(ExpertParallelError, match="different modes"):
            with torch.no_grad():
                sigmoid.train(rank == 0)(torch.randn(4, H))
        # a data-parallel group that is not a column of a mesh would sum different experts'
        # gradients: refused on every rank
        with pytest.raises(ExpertParallelError, match="column of a mesh"):
            expert_parallel(torch.nn.Sequential(_layer(CASES[0])),
                            data_parallel_group=dist.group.WORLD)
        # a NaN weight equal on every rank is equal, not "different weights"
        nan = torch.nn.Sequential(_layer(CASES[0]))
        with torch.no_grad():
            nan[0].router.weight[0, 0] = float("nan")
        expert_parallel(nan)
        # experts in another order on one rank are different weights (sums alone miss it)
        permuted = torch.nn.Sequential(_layer(CASES[0]))
        if rank:
            with torch.no_grad():
                for name in ("w_in", "w_gate", "w_out"):
                    getattr(permuted[0], name).copy_(getattr(permuted[0], name).flip(0))
        with pytest.raises(ExpertParallelError, match="different weights"):
            expert_parallel(permuted)
        # an expert tensor two layers share is cut once; a gradient kept so far is cut alike
        a, b = _layer(CASES[0]), _layer(CASES[0])
        b.w_in = a.w_in
        a(torch.randn(3, H)).sum().backward()
        full = a.w_in.grad.clone()
        tied = expert_parallel(torch.nn.ModuleList([a, b]))
        assert tied[1].w_in is tied[0].w_in and tied[0].w_in.shape[0] == 3
        torch.testing.assert_close(tied[0].w_in.grad, full[3 * rank:3 * rank + 3])
        # load_sharded: wrapped layers (channels-last conv FFN, kept dropout) read by their
        # names in the file; a rank that cannot load makes every rank raise LoadError
        from tests.io.models import ConvFFN

        folder = f"{init[len('file://'):]}-conv"
        if rank == 0:
            torch.manual_seed(0)
            conv = moefy.convert(ConvFFN().eval(), moefy.MoEConfig(num_experts=4, top_k=2),
                                 example_inputs=(torch.randn(2, 3, 8, 8),))
            moefy.save(conv, folder)
        dist.barrier()
        direct = load_sharded(folder, ConvFFN())
        again = expert_parallel(moefy.load(folder, ConvFFN()))
        assert direct.ffn.moe.w_in.shape[0] == 2
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in direct.state_dict().items())
        with pytest.raises(LoadError):
            load_sharded(folder if rank == 0 else f"{folder}-missing", ConvFFN())
        # sharded under inference_mode, normal weights stay normal: the layer still trains
        trainable = torch.nn.Sequential(_layer(CASES[0]))
        with torch.inference_mode():
            expert_parallel(trainable)
        assert not trainable[0].w_in.is_inference()
        trainable(_tokens(rank, world, CASES[0])).sum().backward()
        assert trainable[0].w_in.grad is not None
        # the optimizer may be made before sharding: it holds the same parameters, and a
        # parameter no rank's tokens reached keeps grad None (AdamW leaves it alone)
        from moefy.distributed import reduce_gradients

        model = torch.nn.ModuleDict({"moe": _layer(CASES[0]), "unused": torch.nn.Linear(2, 2)})
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        expert_parallel(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model["moe"](_tokens(rank, world, CASES[0])).square().sum().backward()
        reduce_gradients(model)
        assert model["unused"].weight.grad is None
        opt.step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert {"moe.w_in", "moe.w_out", "moe.router.weight"} <= moved
        assert not any(n.startswith("unused") for n in moved)
        # exporting one rank's shard as the model is refused (save gathers: see below)
        with pytest.raises(ExportInputError, match="sharded"):
            moefy.export_onnx(sharded, f"{init[len('file://'):]}-{rank}.onnx",
                              (torch.randn(3, H),))
        with pytest.raises(HFExportError, match="sharded"):
            moefy.export_hf(sharded, f"{init[len('file://'):]}-hf-{rank}")
        # distill steps without reduce_gradients would leave the replicas apart
        with pytest.raises(TrainingInputError, match="sharded"):
            moefy.distill(sharded, torch.nn.Sequential(_layer(CASES[0])), [torch.randn(4, H)],
                          steps=1)
        # replicated weights that drifted apart (no reduce_gradients): rank 0's would stand
        # for all, so every rank refuses and nothing is written
        with torch.no_grad():
            sharded[0].router.weight.add_(rank)
        target = f"{init[len('file://'):]}-drifted"
        with pytest.raises(SaveError, match="different weights in 0"):
            moefy.save(sharded, target)
        assert not os.path.exists(target)
        # a bare bf16 layer, 5 experts in blocks of 3 and 2: the gathered checkpoint is the
        # one a single process writes, byte for byte, and the shard is unchanged after it
        torch.manual_seed(3)
        whole = moefy.MoE(H, I, 5, 2, gated=True, bias=True).to(torch.bfloat16)
        layer = expert_parallel(copy.deepcopy(whole))
        held = {n: (p, p.clone()) for n, p in layer.named_parameters()}
        moefy.save(layer, f"{init[len('file://'):]}-bf16", info={"rank": 0})
        assert {n: p for n, p in layer.named_parameters()} == {n: p for n, (p, _) in
                                                               held.items()}
        assert all(torch.equal(p, old) for p, old in held.values())
        assert layer.shard.stop - layer.shard.start == 3 - rank
        if rank == 0:
            moefy.save(whole, f"{init[len('file://'):]}-bf16-single", info={"rank": 0})
        # the data-parallel habit `if rank == 0: save(...)`: rank 0 waits in the gather until
        # the group's timeout, then says what to do instead of hanging
        group = dist.new_group(timeout=datetime.timedelta(seconds=2))
        alone = expert_parallel(torch.nn.Sequential(_layer(CASES[0])), group)
        if rank == 0:
            with pytest.raises(SaveError, match="every rank must call save together"):
                moefy.save(alone, f"{init[len('file://'):]}-alone")
        else:
            time.sleep(3)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_refusals_and_a_gathered_save_of_a_bare_layer(tmp_path):
    """Refused: ranks with different weights, mixed grad modes, exporting a shard, saving
    replicated weights that drifted apart. A sharded bf16 layer saves as one process's."""
    mp.start_processes(_refusals_worker, args=(2, f"file://{tmp_path / 'store'}"), nprocs=2,
                       start_method="spawn", join=True)
    _assert_same_checkpoint(tmp_path / "store-bf16", tmp_path / "store-bf16-single",
                            exact=True)


def _assert_same_checkpoint(got, want, exact: bool) -> None:
    from safetensors.torch import load_file

    a, b = load_file(got / "moefy.safetensors"), load_file(want / "moefy.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    plan_a, plan_b = read_plan(got), read_plan(want)
    plan_a.pop("id"), plan_b.pop("id")
    assert plan_a == plan_b
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


def _tiny_upcycled():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32)
    dense = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    moe = moefy.convert(dense, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2),
                        example_inputs={"input_ids": ids})
    with torch.no_grad():  # make the copies differ, so that routing matters
        for m in moe.modules():
            if isinstance(m, moefy.MoE):
                m.w_in.add_(0.05 * torch.randn(m.w_in.shape,
                                               generator=torch.Generator().manual_seed(1)))
    return moe.train()


def _batches(steps: int, world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (2 * world, 12), generator=g) for _ in range(steps)]


def _train(model, batches, rank=None, world=1, steps=4) -> list[float]:
    from moefy.distributed import reduce_gradients

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for ids in batches[:steps]:
        opt.zero_grad()
        # one process: each rank's share of the batch in turn, as the ranks see it (the
        # auxiliary loss is per forward: per rank)
        total = torch.zeros(())
        for part in ids.chunk(world) if rank is None else [ids.chunk(world)[rank]]:
            loss = model(input_ids=part, labels=part).loss + 0.01 * moefy.aux_loss(model)
            (loss / world).backward()
            total += loss.detach() / world
        if rank is not None:
            reduce_gradients(model)
            dist.all_reduce(total)
        opt.step()
        losses.append(float(total))
    return losses


def _training_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        model = expert_parallel(_tiny_upcycled())
        moefy.save(model, f"{out}-untrained")  # every rank calls it; rank 0 writes
        losses = _train(model, _batches(4, world), rank, world)
        moefy.save(model, f"{out}-trained")
        if rank == 0:
            torch.save(torch.tensor(losses), out)
        # the checkpoint shards again: loaded on every rank, it continues as the model did;
        # load_sharded reads only this rank's experts from the file, to the same model
        ids = _batches(5, world)[4].chunk(world)[rank]
        again = expert_parallel(moefy.load(f"{out}-trained"))
        direct = load_sharded(f"{out}-trained")
        assert again.model.layers[0].mlp.w_in.shape == model.model.layers[0].mlp.w_in.shape
        assert direct.state_dict().keys() == again.state_dict().keys()
        w_in = direct.model.layers[0].mlp.w_in  # read as its block, not cut from the whole
        assert w_in.untyped_storage().nbytes() == w_in.numel() * w_in.element_size()
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in direct.state_dict().items())
        with torch.no_grad():
            want = model.eval()(input_ids=ids).logits
            torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=0, atol=0)
            torch.testing.assert_close(direct(input_ids=ids).logits, want, rtol=0, atol=0)
        with pytest.raises(ExpertParallelError, match="different checkpoints"):
            load_sharded(f"{out}-trained" if rank else f"{out}-untrained")
    finally:
        dist.destroy_process_group()


def test_training_under_two_processes_follows_the_single_process_loss_curve(tmp_path):
    """An upcycled tiny LLaMA, SGD with the auxiliary loss: the same loss at every step as one
    process that runs each rank's share of the batch in turn; saved by both ranks, the model
    is the checkpoint one process writes, before and after training."""
    world = 2
    model = _tiny_upcycled()
    moefy.save(model, tmp_path / "single-untrained")
    single = _train(model, _batches(4, world))
    moefy.save(model, tmp_path / "single-trained")
    out = str(tmp_path / "losses.pt")
    mp.start_processes(_training_worker, args=(world, f"file://{tmp_path / 'store'}", out),
                       nprocs=world, start_method="spawn", join=True)
    parallel = torch.load(out, weights_only=True).tolist()
    assert single[-1] < single[0]  # it trains
    assert parallel == pytest.approx(single, rel=1e-5, abs=1e-6)
    _assert_same_checkpoint(tmp_path / "losses.pt-untrained", tmp_path / "single-untrained",
                            exact=True)
    _assert_same_checkpoint(tmp_path / "losses.pt-trained", tmp_path / "single-trained",
                            exact=False)
