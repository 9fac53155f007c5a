"""Expert parallelism on ``torch.distributed``: each rank keeps a contiguous block of every MoE
layer's routed experts; tokens travel to the ranks that own their experts and back.

    each rank: its own tokens → router (replicated) → each token once to every rank that owns
      one of its experts, with its (expert, weight) pairs there: counts first, then rows,
      pair metadata and weights (all_to_all_single, uneven splits)
      → the owner runs its experts on what arrived (the single-process kernels)
      → one weighted row per token returns by the reverse exchange → added up per token

The router, shared experts, compensation and everything outside the MoE layers stay
replicated; routing (capacity factor, dropped assignments, auxiliary losses) is decided on
each rank's own tokens exactly as in one process, so a rank's outputs equal a single
process's on the same batch. The exchange is differentiable (its backward is the reverse
exchange), so training works; every rank must run each forward and backward together.
Saving gathers the experts (``gathered_on_rank0``); ``load_sharded`` reads them back a block
per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from moefy.errors import ExpertParallelError

_EXPERT_TENSORS = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")


@dataclass(frozen=True)
class Shard:
    """Which routed experts this rank holds: [bounds[rank], bounds[rank + 1]) of E."""

    group: object
    rank: int
    world: int
    bounds: tuple[int, ...]  # world + 1 expert offsets
    data_group: object = None  # the replicas of this block (expert x data parallelism)

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    def __deepcopy__(self, memo):
        return self  # frozen, no tensors: a deep copy of the model runs on the same group

    def __reduce__(self):
        raise ExpertParallelError(
            "a model sharded by expert_parallel cannot be pickled (its process group lives "
            "in this process): save it with moefy.save, every rank together")


def expert_parallel(model: nn.Module, process_group=None, *,
                    data_parallel_group=None) -> nn.Module:
    """Shard the routed experts of every ``moefy.MoE`` in ``model`` across the ranks of
    ``process_group`` (default: the whole world), in place, and return ``model``.

    Rank r keeps experts [r·E/W, (r+1)·E/W) (contiguous blocks; with E not a multiple of the
    world size W the first E mod W ranks hold one more). Every rank must hold the same
    weights before the call (load the same checkpoint everywhere): this is checked.

    Expert × data parallelism (a 2-D mesh): ``process_group`` is this rank's row (the ranks
    that split the experts among them) and ``data_parallel_group`` its column (the ranks
    that hold the same block: one from each row). ``reduce_gradients`` then sums over both,
    the sigmoid router's balancing bias follows the load of every rank, and ``moefy.save``
    writes from the row that holds global rank 0.

    >>> # under torchrun: dist.init_process_group("gloo"); model = expert_parallel(model)
    """
    from moefy.layers.moe import MoE

    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not moes:
        raise ExpertParallelError(f"{type(model).__name__} holds no moefy.MoE layer: convert "
                                  "it first (moefy.convert)")
    sharded = [name for name, m in moes if getattr(m, "_expert_parallel", None) is not None]
    if sharded:
        raise ExpertParallelError(f"{', '.join(sharded[:4])} already sharded: call "
                                  "expert_parallel once, on the unsharded model")
    group, rank, world = _group_of(process_group, data_parallel_group)
    inside = {id(t) for _, m in moes for t in [*m.parameters(), *m.buffers()]}
    parts = [(name or "the MoE layer", [*m.parameters(), *m.buffers()]) for name, m in moes]
    parts.append(("the layers outside the MoEs",
                  [t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside]))
    differ = _agree(parts, group, data_parallel_group)
    if differ:
        raise ExpertParallelError(
            f"the ranks hold different weights in {differ}: load the same model on every "
            "rank (same checkpoint, same seed) before expert_parallel")
    done = set()  # an expert tensor two layers share is cut once
    for _, moe in moes:
        shard = Shard(group, rank, world, _bounds(moe.num_experts, world), data_parallel_group)
        for name in _EXPERT_TENSORS:
            p = getattr(moe, name)
            if p is not None and id(p) not in done:  # the same Parameter, now this rank's
                # block: an optimizer made before still holds it (one with state fails on the
                # shape, not silently); gradients kept so far are cut alike
                done.add(id(p))
                # the block keeps the weight's kind: called under inference_mode, a normal
                # weight must not become an inference tensor that can never train
                with torch.inference_mode(p.is_inference()):
                    p.data = p.detach()[shard.start:shard.stop].clone()
                if p.grad is not None:
                    p.grad = p.grad[shard.start:shard.stop].clone()
        moe._expert_parallel = shard
        moe.invalidate()
    return model


def _group_of(process_group, data_parallel_group) -> tuple[object, int, int]:
    """(group, this rank in it, its size), after checking that torch.distributed is set up,
    that this process belongs to both groups, and that the data-parallel group is a column
    of a mesh whose rows are expert-parallel groups (the verdict agreed on every rank)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ExpertParallelError(
            "expert parallelism needs an initialised torch.distributed process group: run "
            "under torchrun and call torch.distributed.init_process_group('gloo' or 'nccl') "
            "first")
    group = process_group if process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ExpertParallelError("this process is not a member of process_group: call "
                                  "expert_parallel on the ranks of the group only")
    if data_parallel_group is None:
        return group, rank, world
    if dist.get_rank(data_parallel_group) < 0:
        raise ExpertParallelError("this process is not a member of data_parallel_group: pass "
                                  "the group of the ranks that hold the same experts as it")
    device = _collective_device(group)
    mine = torch.tensor([rank, world, min(dist.get_process_group_ranks(group))],
                        dtype=torch.int64, device=device)
    column = [torch.empty_like(mine) for _ in range(dist.get_world_size(data_parallel_group))]
    dist.all_gather(column, mine, group=data_parallel_group)
    ok = (all(int(c[0]) == rank and int(c[1]) == world for c in column)
          and len({int(c[2]) for c in column}) == len(column))
    verdict = torch.tensor([int(ok)], dtype=torch.int64, device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=data_parallel_group)
    if not int(verdict):
        raise ExpertParallelError(
            "data_parallel_group must be a column of a mesh whose rows are the expert-parallel "
            "groups: one rank from each row, all at the same place in their rows (so that they "
            "hold the same experts); e.g. rows [0, 1], [2, 3] and columns [0, 2], [1, 3]")
    return group, rank, world


def load_sharded(directory, model: nn.Module | None = None, process_group=None, *,
                 data_parallel_group=None) -> nn.Module:
    """``moefy.load`` and ``expert_parallel`` in one, reading from the file only the experts
    this rank keeps (host memory: the replicated part and this rank's block, not the whole
    model on every rank). Every rank of the group calls it with the same folder (a shared
    filesystem across machines), with any number of ranks; the result is what
    ``expert_parallel(moefy.load(directory, model), process_group, ...)`` gives.

    Raises ``LoadError`` as ``moefy.load`` does, and ``ExpertParallelError`` on every rank
    when the ranks read different checkpoints."""
    from moefy.checkpoint import _load, read_plan
    from moefy.errors import LoadError
    from moefy.layers.moe import MoE

    group, rank, world = _group_of(process_group, data_parallel_group)

    def shard(layers: dict) -> dict:
        rows = {}
        for path, layer in layers.items():
            for name, m in layer.named_modules():  # wrappers too: their names are in the file
                if not isinstance(m, MoE):
                    continue
                bounds = _bounds(m.num_experts, world)
                m._expert_parallel = Shard(group, rank, world, bounds, data_parallel_group)
                prefix = ".".join(x for x in (path, name) if x)
                for tensor in _EXPERT_TENSORS:
                    p = getattr(m, tensor)
                    if p is not None:  # meta: only the shape changes
                        p.data = p.data[bounds[rank]:bounds[rank + 1]]
                        rows[f"{prefix}.{tensor}" if prefix else tensor] = (
                            bounds[rank], bounds[rank + 1])
        return rows

    failure = None
    try:
        model = _load(directory, model, shard)
        if not _sharded(model):
            raise ExpertParallelError(f"{directory} holds no moefy.MoE layer: nothing to shard "
                                      "(use moefy.load)")
        save_id = int(str(read_plan(directory)["id"])[:12], 16)
    except Exception as exc:  # noqa: BLE001 - the other ranks must not wait for this one
        failure = exc
    # a rank that could not load tells the others, which would otherwise wait for it in the
    # next collective until the group's timeout
    failed = _any_rank(failure is not None, group, data_parallel_group)
    if failure is not None:
        raise failure
    if failed:
        raise LoadError(f"another rank could not load {directory} (its error says why); "
                        "nothing was loaded here either")
    # every rank must have read the same save: its id, and the replicated weights
    parts = [("the checkpoint's save id", [torch.tensor(float(save_id), dtype=torch.float64)])]
    experts = _expert_ids(_sharded(model))
    parts.append(("the replicated weights", [t for t in [*model.parameters(), *model.buffers()]
                                              if id(t) not in experts]))
    differ = _agree(parts, group, data_parallel_group)
    if differ:
        raise ExpertParallelError(
            f"the ranks read different checkpoints ({differ}): give every rank the same "
            "folder (on a filesystem all machines share)")
    return model


def reduce_gradients(model: nn.Module, average: bool = False) -> None:
    """After ``backward`` on every rank: sum (or average) the gradients of every parameter
    that is not a sharded expert over the ranks, so that the replicated parts see the whole
    batch, as the sharded experts already do (their gradients come from every rank's
    tokens of the expert-parallel group). With each rank's loss divided by the number of
    ranks, ``average=False`` gives the gradients of one process that runs each rank's tokens
    in turn (routing, capacity and auxiliary losses per rank's forward); ``average=True``
    gives the same from undivided losses (every gradient, the experts' too, is divided by
    the number of ranks).

    With a ``data_parallel_group`` (``expert_parallel``'s mesh), the experts' gradients are
    also summed over it, and the replicated ones over both groups: every rank takes the
    step of one process on all the mesh's tokens."""
    from moefy.layers.moe import MoE

    shards = {(m._expert_parallel.group, m._expert_parallel.data_group) for m in model.modules()
              if isinstance(m, MoE) and getattr(m, "_expert_parallel", None) is not None}
    if len(shards) != 1:
        raise ExpertParallelError("reduce_gradients needs a model sharded by expert_parallel "
                                  "(over one process group)")
    group, data_group = shards.pop()
    sharded = _expert_ids(_sharded(model))
    world = dist.get_world_size(group) * (
        1 if data_group is None else dist.get_world_size(data_group))
    params = [p for p in model.parameters() if p.requires_grad]  # the same order everywhere
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    if sparse:
        raise ExpertParallelError("reduce_gradients: sparse gradients (nn.Embedding(sparse="
                                  "True)) are not supported; use dense embeddings")
    # a parameter no rank's tokens reached keeps grad None, as in one process (an optimizer
    # skips it); one that some rank's reached is zero-filled elsewhere, to be summed
    device = _collective_device(group)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    if data_group is not None:
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=data_group)
    grads = []
    for p, reached in zip(params, has.tolist(), strict=True):
        if reached:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p)
    replicated = [p.grad for p in grads if id(p) not in sharded]
    _all_reduce_flat(replicated, group)
    if data_group is not None:
        _all_reduce_flat(replicated + [p.grad for p in grads if id(p) in sharded], data_group)
    if average:  # the experts' gradients too are sums over every rank's tokens
        for p in grads:
            p.grad /= world


def _all_reduce_flat(tensors: list[torch.Tensor], group, bucket: int = 1 << 24) -> None:
    """Sum ``tensors`` over ``group`` in place, a few large messages instead of one per
    tensor: consecutive tensors of one dtype and device are flattened together, up to
    ``bucket`` elements a message."""
    i = 0
    while i < len(tensors):
        j, size = i + 1, tensors[i].numel()
        while (j < len(tensors) and tensors[j].dtype == tensors[i].dtype
               and tensors[j].device == tensors[i].device
               and size + tensors[j].numel() <= bucket):
            size += tensors[j].numel()
            j += 1
        flat = torch.cat([t.reshape(-1) for t in tensors[i:j]])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in tensors[i:j]:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        i = j


def refuse_sharded(model, what: str, error: type[Exception], advice: str | None = None) -> None:
    """Raise ``error`` when ``model`` holds expert-parallel layers: each rank has only its
    own experts, and treating them as the model would be silently wrong."""
    sharded = [name or "the layer" for name, m in model.named_modules()
               if getattr(m, "_expert_parallel", None) is not None]
    if sharded:
        raise error(
            f"{what}: {', '.join(sharded[:4])} {'is' if len(sharded) == 1 else 'are'} sharded "
            "by moefy.runtime.expert_parallel (this rank holds only its own experts); "
            + (advice or f"{what} the model before sharding it, or moefy.save it (every rank "
                         "together: it gathers the experts) and load it in one process"))


def _bounds(num_experts: int, world: int) -> tuple[int, ...]:
    """Expert offsets of the ranks' contiguous blocks; the first E mod W ranks hold one more."""
    E = num_experts
    return tuple(r * (E // world) + min(r, E % world) for r in range(world + 1))


def _expert_ids(layers) -> set[int]:
    """ids of the sharded expert tensors of ``layers``."""
    return {id(getattr(m, n)) for m in layers for n in _EXPERT_TENSORS
            if getattr(m, n) is not None}


def _any_rank(flag: bool, group, data_group) -> bool:
    """Whether ``flag`` holds on any rank of the row or (on a mesh) of the column: the same
    answer on every rank, so that all of them stop or go on together."""
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if data_group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=data_group)
    return bool(t.item())


def _collective_device(group) -> torch.device:
    """Where this group's collectives take tensors: NCCL only CUDA ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(parts: list[tuple[str, list[torch.Tensor]]], group, data_group) -> str:
    """The parts that differ between the ranks of ``group`` (and of ``data_group``), named,
    or ""; every rank gets a non-empty answer when any rank sees a difference."""
    differ = _differing(parts, group, dist.get_world_size(group))
    if data_group is not None:
        differ += [n for n in _differing(parts, data_group, dist.get_world_size(data_group))
                   if n not in differ]
    if not _any_rank(bool(differ), group, data_group):
        return ""
    return ", ".join(differ[:4]) if differ else "another rank's weights"


def _differing(parts: list[tuple[str, list[torch.Tensor]]], group, world: int) -> list[str]:
    """The names of the parts whose float64 checksum is not the same on every rank."""
    def checksum(tensors) -> torch.Tensor:
        # sum, sum of squares, a position-weighted sum (experts in another order change it)
        # and the count of non-finite values (a NaN weight on every rank is equal, not
        # different), in float64 over chunks of 4M values (little extra memory)
        out = torch.zeros(4, dtype=torch.float64)
        for t in tensors:
            if not t.is_floating_point():
                continue
            offset = 0
            for chunk in t.detach().reshape(-1).split(1 << 22):
                c = chunk.to(torch.float64)
                bad = ~c.isfinite()
                c = c.masked_fill(bad, 0.0)
                where = torch.arange(offset, offset + c.numel(), dtype=torch.float64,
                                     device=c.device).remainder_(1009).add_(1)
                out += torch.stack([c.sum(), c.square().sum(), (c * where).sum(),
                                    bad.sum().to(torch.float64)]).cpu()
                offset += c.numel()
        return out

    sums = torch.stack([checksum(tensors) for _, tensors in parts]).to(
        _collective_device(group))
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums, group=group)
    return [parts[i][0] for i in range(len(parts))
            if any(not torch.allclose(g[i], sums[i], rtol=1e-9, atol=1e-9) for g in gathered)]


def _sharded(model: nn.Module) -> list:
    return [m for m in model.modules() if getattr(m, "_expert_parallel", None) is not None]


def gathered_on_rank0(model: nn.Module, write, what: str, error: type[Exception]):
    """Run ``write(model)`` on rank 0 of the model's expert-parallel group, with every sharded
    layer's experts gathered there (the layer as one process holds it), and return its
    result there (None on the other ranks, which take part in the gathers). A model that is
    not sharded is simply passed to ``write``. Every rank must call this together; on an
    expert × data mesh the row that holds global rank 0 gathers and writes, and the other
    rows wait for the outcome. The model is unchanged afterwards, on every rank.

    Raises ``error`` on every rank, with nothing written, when the replicated weights differ
    between the ranks, or the experts between data-parallel replicas (rank 0's would
    silently stand for all of them), and on every rank when ``write`` fails on rank 0."""
    layers = _sharded(model)
    if not layers:
        return write(model)
    groups = {(m._expert_parallel.group, m._expert_parallel.data_group) for m in layers}
    if len(groups) != 1:
        raise error(f"{what}: the model is sharded over more than one process group")
    group, data_group = groups.pop()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = _collective_device(group)
    experts = _expert_ids(layers)
    parts = [(name or "the MoE layer",
              [t for t in [*m.parameters(), *m.buffers()] if id(t) not in experts])
             for name, m in model.named_modules()
             if getattr(m, "_expert_parallel", None) is not None]
    inside = {id(t) for m in layers for t in [*m.parameters(), *m.buffers()]}
    parts.append(("the layers outside the MoEs",
                  [t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside]))
    try:  # the first collective: where a rank that did not call this leaves the others
        differ = _differing(parts, group, world)
    except RuntimeError as exc:
        raise error(f"{what} of an expert-parallel model failed in its first exchange ({exc}):"
                    f" every rank must call {what} together (it gathers the experts), not "
                    "only rank 0") from exc
    writes, source = True, None
    if data_group is not None:  # a mesh (checked by expert_parallel): the row of global
        # rank 0 writes for all rows; its member in this column tells the others the outcome
        writes = 0 in dist.get_process_group_ranks(group)
        differ += [f"{n} (between the data-parallel replicas)" for n in _differing(
            [("the model", [*model.parameters(), *model.buffers()])], data_group,
            dist.get_world_size(data_group))]
        column = [torch.zeros(1, dtype=torch.int64, device=device)
                  for _ in range(dist.get_world_size(data_group))]
        dist.all_gather(column, torch.tensor([int(writes)], device=device), group=data_group)
        source = dist.get_global_rank(data_group, next(i for i, c in enumerate(column)
                                                       if c.item()))
    if _any_rank(bool(differ), group, data_group):
        raise error(
            f"{what}: the ranks hold different weights in "
            f"{', '.join(differ[:4]) or 'another rank of the mesh'} (rank 0's would stand for "
            "all of them): call parallel.reduce_gradients after every backward so that every "
            "rank takes the same step; nothing was written")
    if not writes:  # another row writes: wait for its outcome
        flag = torch.zeros(1, dtype=torch.int64, device=device)
        dist.broadcast(flag, src=source, group=data_group)
        if bool(flag.item()):
            raise error(f"{what} failed on global rank 0 (its error says why)")
        return None
    swapped, result, failure = [], None, None
    try:
        for moe in layers:
            shard = moe._expert_parallel
            for name in _EXPERT_TENSORS:
                p = getattr(moe, name)
                if p is None:
                    continue
                full = _gather_rows(p.detach(), shard, device)
                if rank == 0:
                    swapped.append((moe, name, p))
                    setattr(moe, name, nn.Parameter(full, requires_grad=p.requires_grad))
            if rank == 0:
                swapped.append((moe, "_expert_parallel", shard))
                moe._expert_parallel = None
        if rank == 0:
            try:
                result = write(model)
            except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it
                failure = exc
    finally:
        for moe, name, value in reversed(swapped):  # the same objects: optimizers still hold
            setattr(moe, name, value)
    flag = torch.tensor([failure is not None], dtype=torch.int64, device=device)
    dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
    if data_group is not None:  # tell this column's other rows
        dist.broadcast(flag, src=source, group=data_group)
    if failure is not None:
        raise failure
    if bool(flag.item()):
        raise error(f"{what} failed on rank 0 of the expert-parallel group (its error says "
                    "why)")
    return result


def _gather_rows(t: torch.Tensor, shard: Shard, device: torch.device) -> torch.Tensor | None:
    """The whole (E, ...) tensor from every rank's block of rows, on the CPU of rank 0; None
    on the others. Sent as bytes (padded to the largest block), whatever the dtype."""
    sizes = [b - a for a, b in zip(shard.bounds[:-1], shard.bounds[1:], strict=True)]
    block = t.new_zeros(max(sizes), *t.shape[1:])
    block[: t.shape[0]] = t
    send = block.view(torch.uint8).to(device)  # bytes: any dtype, on any backend
    out = [torch.empty_like(send) for _ in range(shard.world)]
    dist.all_gather(out, send, group=shard.group)
    if shard.rank != 0:
        return None
    return torch.cat([o.cpu().view(t.dtype)[:n] for o, n in zip(out, sizes, strict=True)])


@torch.compiler.disable  # data-dependent exchanges: run eagerly inside a compiled model
def routed(moe, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``MoE.routed`` of a sharded layer: Σ_j weights[t, j] · expert_{indices[t, j]}(x[t])
    for this rank's tokens x (T, H), the experts running on the ranks that own them.

    A token travels once to each rank that owns one of its experts (not once per slot), with
    the (expert, weight) pairs it has there; the owner returns one row per token, the
    weighted sum of its experts' outputs, and the origin adds the rows of each token."""
    shard: Shard = moe._expert_parallel
    T, k = indices.shape
    # only slots that carry weight travel (a weight-0 slot contributes nothing, and is never
    # multiplied by 0 here either: an inf output must not become NaN)
    w_flat = weights.reshape(-1)
    pos = (w_flat != 0).nonzero().squeeze(1)
    flat = indices.reshape(-1)[pos]
    bounds = torch.tensor(shard.bounds[1:-1], dtype=flat.dtype, device=flat.device)
    owner = torch.bucketize(flat, bounds, right=True)  # rank that holds each pair's expert
    token = pos // k
    order = torch.argsort(owner * T + token, stable=True)  # by owner, then token
    owner, token, flat, pos = owner[order], token[order], flat[order], pos[order]
    # the rows to send: one per (owner, token); ``row`` numbers them within each owner's block
    keys, row = torch.unique_consecutive(owner * T + token, return_inverse=True)
    row_token, row_owner = keys % max(T, 1), keys // max(T, 1)
    send_rows = torch.bincount(row_owner, minlength=shard.world)
    send_pairs = torch.bincount(owner, minlength=shard.world)
    row = row - (torch.cumsum(send_rows, 0) - send_rows)[owner]
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad or weights.requires_grad
        or any(p.requires_grad for p in moe.parameters()))
    # counts and each rank's modes in one exchange: a rank that needs gradients while another
    # does not would wait forever in its backward exchange, one in train mode in the sigmoid
    # router's all-reduce, so all of them stop here
    mode = int(differentiable) + 2 * int(moe.training)
    header = torch.stack([send_rows, send_pairs, torch.full_like(send_rows, mode)], dim=1)
    received = torch.empty_like(header)
    dist.all_to_all_single(received, header, group=shard.group)
    if bool((received[:, 2] != mode).any()):
        raise ExpertParallelError(
            "the ranks run this MoE layer in different modes (gradients on some, off on "
            "others, or train() on some, eval() on others): every rank must run each forward "
            "and backward together, in the same modes (torch.no_grad / inference_mode and "
            "model.train() / eval() on all ranks alike)")
    rows_out, pairs_out = send_rows.tolist(), send_pairs.tolist()
    rows_in, pairs_in = received[:, 0].tolist(), received[:, 1].tolist()
    starts = torch.tensor(shard.bounds[:-1], dtype=flat.dtype, device=flat.device)
    meta = torch.stack([flat - starts[owner], row], dim=1)  # (local expert, row) per pair
    recv_meta = meta.new_empty(sum(pairs_in), 2)
    dist.all_to_all_single(recv_meta, meta, pairs_in, pairs_out, group=shard.group)
    exchange = _exchange_with_grad if differentiable else _exchange
    send_x, send_w = x[row_token], w_flat[pos]
    if differentiable:
        # every rank must run each backward exchange in step, also one whose rows or weights
        # need no gradient (or that received none): a leaf that asks for one keeps them in
        # the graph
        if not send_x.requires_grad:
            send_x = send_x.detach().requires_grad_()
        if not send_w.requires_grad:
            send_w = send_w.detach().requires_grad_()
    recv_x = exchange(send_x, rows_in, rows_out, shard.group)
    recv_w = exchange(send_w[:, None], pairs_in, pairs_out, shard.group)
    # each pair's row in recv_x: its row within its sender's block, plus where that block is
    received_from = torch.repeat_interleave(
        torch.arange(shard.world, device=flat.device), received[:, 1])
    block_start = torch.cumsum(received[:, 0], 0) - received[:, 0]
    at = recv_meta[:, 1] + block_start[received_from]  # nondecreasing: a row's pairs adjoin
    if recv_meta.shape[0]:
        # the rows as tokens of the single-process kernels: (rows, slots) with each row's
        # pairs in its first slots; the rest weigh 0, which the kernels skip
        R = recv_x.shape[0]
        per_row = torch.bincount(at, minlength=R)
        slot = torch.arange(at.shape[0], device=at.device) - (per_row.cumsum(0) - per_row)[at]
        width = int(per_row.max())
        row_w = recv_w.new_zeros(R, width).index_put((at, slot), recv_w[:, 0])
        row_ids = recv_meta.new_zeros(R, width).index_put((at, slot), recv_meta[:, 0])
        out = moe._runner(recv_x, row_w, row_ids, moe.expert_weights(),
                          training=moe.training, prepack=moe.prepack)
    else:  # nothing arrived: still part of the graph, so the backward exchanges happen
        out = recv_x * 0 + recv_w.sum() * 0
    back = exchange(out, rows_out, rows_in, shard.group)  # one row per (owner, token)
    return back.new_zeros(T, x.shape[-1]).index_add(0, row_token, back)


def _exchange(rows: torch.Tensor, out_sizes: list[int], in_sizes: list[int],
              group) -> torch.Tensor:
    out = rows.new_empty(sum(out_sizes), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), out_sizes, in_sizes, group=group)
    return out


def _exchange_with_grad(rows: torch.Tensor, out_sizes: list[int], in_sizes: list[int],
                        group) -> torch.Tensor:
    return _Exchange.apply(rows, out_sizes, in_sizes, group)


class _Exchange(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse exchange of the gradients."""

    @staticmethod
    def forward(ctx, rows, out_sizes, in_sizes, group):
        ctx.sizes, ctx.group = (out_sizes, in_sizes), group
        return _exchange(rows, out_sizes, in_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        out_sizes, in_sizes = ctx.sizes
        return _exchange(grad, in_sizes, out_sizes, ctx.group), None, None, None
