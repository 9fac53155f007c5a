"""``moefy.save`` / ``moefy.load``: a converted model as files, and back, without pickling.

    directory/
      moefy.safetensors   every tensor of the model's state dict (a tied tensor once); not
                          named model.safetensors, so that transformers' from_pretrained
                          does not half-load it as the dense model
      moefy.json          the plan (``moefy.io.plan``): where each moefy layer sits, how
                          to build it, the wrappers and identities conversion put around it,
                          tied names, frozen parameters
      config.json         the base model's Hugging Face config (when it has one)
      generation_config.json, tokenizer files (when given)

    save:  arguments checked → folder checked writable → plan described (and each layer
           rebuilt to check it) → files written into a work folder → moved in, plan last
    load:  plan read and checked → weights' header read → layers built on the meta device →
           names, shapes, kinds and dtypes checked against the file → weights read → only
           then layers swapped in and tensors assigned

Nothing is built from pickled code, nothing is calibrated again, and no graph is traced;
every refusal (``SaveError`` / ``LoadError``) comes before anything changes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from pathlib import Path

import torch.nn as nn

from moefy.errors import LoadError, SaveError
from moefy.io.atomic import as_path, check_writable, replace_files
from moefy.io.hf_rebuild import build_hf_model, check_config, hf_config
from moefy.io.plan import (
    LAYER_TYPES,
    PLAN_FILE,
    WEIGHTS_FILE,
    also_at,
    describe_model,
    read_plan,
    skeletons,
    unwrap,
)
from moefy.io.safetensors_range import is_floating, read_header, read_rows
from moefy.layers.neuron import DecodeLinear, NeuronFFN, SparseLinear
from moefy.layers.shard import refuse_sharded
from moefy.layers.tokens import install_token_hooks

__all__ = ["PLAN_FILE", "WEIGHTS_FILE", "check_save_arguments", "load", "load_with",
           "read_plan", "save", "write"]


def save(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None,
         info: dict | None = None) -> Path:
    """``moefy.save`` of a model in one process (``moefy.distributed.checkpoint.save`` is the
    public one: it also gathers a model sharded by expert parallelism, then calls ``write``).
    """
    model, directory = check_save_arguments(model, directory, tokenizer, info)
    refuse_sharded(model, "save", SaveError, "call moefy.save (it gathers the experts)")
    write(model, directory, tokenizer, info)
    return directory


def check_save_arguments(model, directory, tokenizer, info) -> tuple[nn.Module, Path]:
    """(the model to write, the folder) after checking save's arguments; nothing written."""
    model = _unwrap_compiled(model)
    if not isinstance(model, nn.Module):
        raise SaveError(f"save expects a torch.nn.Module, got {type(model).__name__}")
    directory = as_path(directory, SaveError, "save")
    if info is not None and not isinstance(info, dict):
        raise SaveError(f"save: info must be a dict, got {type(info).__name__}")
    try:
        json.dumps(info or {}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SaveError(f"save: info must be a JSON-serialisable dict: {exc}") from exc
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise SaveError(f"save: tokenizer must be a Hugging Face tokenizer (with save_pretrained), "
                        f"got {type(tokenizer).__name__}")
    return model, directory


def write(model: nn.Module, directory: Path, tokenizer, info: dict | None) -> None:
    """Write a whole (unsharded) model's plan and weights into ``directory``: all of it, or
    (``SaveError``) nothing."""
    if directory.exists() and not directory.is_dir():  # here: on the rank that writes
        raise SaveError(f"{directory} exists and is not a directory")
    check_writable(directory, SaveError, "save")  # before the work of describing the model
    plan = describe_model(model)
    plan["info"] = info or {}
    plan["id"] = uuid.uuid4().hex  # also in the weights' header: a plan and weights that
    # two saves wrote into one folder at once never pass for one checkpoint
    tensors, aliases = _tensors(model)
    plan["aliases"] = aliases
    plan["frozen"] = [n for n, p in model.named_parameters() if not p.requires_grad]
    config = hf_config(model)
    from safetensors.torch import save_file

    def fill(work: Path) -> None:
        try:
            save_file(tensors, work / WEIGHTS_FILE,
                      metadata={"format": "pt", "moefy": plan["id"]})
            if config is not None:
                config.to_json_file(work / "config.json")
                generation = getattr(model, "generation_config", None)
                if generation is not None:
                    generation.save_pretrained(work)
            if tokenizer is not None:
                tokenizer.save_pretrained(work)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise SaveError(f"save: writing {directory} failed ({type(exc).__name__}: "
                            f"{exc}); nothing there was changed") from exc
        plan["files"] = sorted(p.name for p in work.iterdir())
        (work / PLAN_FILE).write_text(json.dumps(plan, indent=1, allow_nan=False) + "\n")

    # a plan is never beside weights it does not describe: it moves in last
    replace_files(directory, fill, last=PLAN_FILE, stale=_previous_files(directory),
                  error=SaveError, what="save")


def _previous_files(directory: Path) -> list[str]:
    """The files an earlier save into ``directory`` wrote (its plan lists them)."""
    try:
        plan = json.loads((directory / PLAN_FILE).read_text())
        files = plan.get("files", []) if isinstance(plan, dict) else []
        return [f for f in files if isinstance(f, str) and "/" not in f and f != ".."]
    except (OSError, ValueError):
        return []


def _unwrap_compiled(model):
    """The module a ``torch.compile`` wrapper runs (its class is what gets saved)."""
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" \
        else model


def load(directory: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model written by ``moefy.save`` (in eval mode).

    ``load(directory)`` rebuilds a Hugging Face model from the saved ``config.json`` alone:
    no dense weights, no calibration, no tracing. ``load(directory, model)`` applies the plan
    to ``model`` itself — a freshly built dense model of the saved class (any
    ``nn.Module``, also one that is not from Hugging Face; a ``torch.compile`` wrapper of one
    too) — and returns it. A saved bare moefy layer comes back as a new layer (the one
    given only says which class is expected). Parameters frozen when saved stay frozen; a
    layer registered at several paths comes back as one layer at all of them.

    Raises ``moefy.errors.LoadError`` before any layer is swapped in when a file is missing or
    damaged, the plan comes from a newer moefy or another save than the weights, ``model`` is
    of another class, has another Hugging Face config than the saved one, lacks a module the
    plan names or sits on the meta device, or a tensor is missing, unexpected, of another
    shape, of another kind (integer / floating point) or of another dtype than the rest of
    its layer.

    >>> import tempfile, torch
    >>> from moefy.layers.moe import MoE
    >>> moe = MoE(8, 16, num_experts=4, top_k=2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     back = load(save(moe, d), MoE(8, 16, num_experts=4, top_k=2))
    >>> bool(torch.equal(back.w_in, moe.w_in))
    True
    """
    return load_with(directory, model)


def load_with(directory, model: nn.Module | None, shard=None) -> nn.Module:
    """``load``; with ``shard(layers)`` (``moefy.distributed.load_sharded``), which
    shards the rebuilt layers' experts and returns {tensor name: (first row, end row)}, only
    those rows of those tensors are read from the file."""
    directory = as_path(directory, LoadError, "load")
    plan = read_plan(directory)
    header = read_header(directory / WEIGHTS_FILE)
    if header.metadata.get("moefy") != plan["id"]:
        raise LoadError(f"{directory / WEIGHTS_FILE} and {PLAN_FILE} beside it come from "
                        "different saves (two saves into one folder at once, or a file copied "
                        "in): save the model again")
    base = plan["base"]
    given = model
    if model is None:
        model = build_hf_model(directory, base)
    elif not isinstance(model, nn.Module):
        raise LoadError(f"load: model must be a torch.nn.Module, got {type(model).__name__}")
    else:
        model = _unwrap_compiled(model)
        if type(model).__name__ != base["class"]:
            raise LoadError(
                f"{directory} holds a converted {base['class']}, but the model given is a "
                f"{type(model).__name__}: pass a fresh {base['class']} built like the one "
                "that was converted")
        check_config(directory, model)
    converted = [n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if converted and plan["layers"] and not isinstance(model, LAYER_TYPES):
        raise LoadError(f"the model given already holds moefy layers ({converted[0]}, ...): "
                        "pass a fresh dense model")
    layers = skeletons(plan, model)  # meta device: names and shapes only
    shared = also_at(plan)  # path → the layer's path in ``layers``: the same module there
    _check_tensors(directory, model, plan, layers, header.tensors)
    rows = shard(layers) if shard is not None else {}

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(directory / WEIGHTS_FILE, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k not in rows}  # noqa: SIM118
        state.update(read_rows(directory / WEIGHTS_FILE, rows))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{directory / WEIGHTS_FILE} is damaged ({exc}); save the model "
                        "again") from exc
    # from here on nothing can fail on the file's account: it was all checked
    for name, canonical in plan["aliases"].items():
        state[name] = state[canonical]
    for path in plan["identities"]:
        if not isinstance(model.get_submodule(path), nn.Identity):
            model.set_submodule(path, nn.Identity())
    if "" in layers:  # the model is itself one layer: the result is a new layer
        model = layers[""]
    for path, layer in layers.items():
        if path:
            model.set_submodule(path, layer)
    for path, site in shared.items():
        model.set_submodule(path, layers[site])
    model.load_state_dict(state, strict=True, assign=True)
    _tie(model, plan["aliases"])
    for path in plan["decode_linear"]:  # its weights are the model's own, loaded above
        model.set_submodule(path, DecodeLinear.from_linear(model.get_submodule(path)))
    for name in plan["frozen"]:
        model.get_parameter(name).requires_grad_(False)
    if plan.get("hash_routing") and "" not in layers:
        install_token_hooks(model)
    model.eval()
    return model if given is None or "" in layers else given  # given: maybe torch.compile's


# ------------------------------------------------------------------ save


def _tensors(model: nn.Module) -> tuple[dict, dict]:
    """(name → tensor to write, alias name → the name it is stored under). Tensors that are
    the same view of the same memory (tied weights) are written once; other overlapping views
    are written as copies, as safetensors needs."""
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t is None:
            continue
        if t.is_meta:
            raise SaveError(f"{name} is on the meta device (no data): load or materialise the "
                            "weights before saving")
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        storage = t.untyped_storage().data_ptr()
        shared = storage in storages and t.numel()
        storages.add(storage)
        t = t.to("cpu")
        tensors[name] = (t.clone() if shared or not t.is_contiguous() else t).contiguous()
    return tensors, aliases


# ------------------------------------------------------------------ load

def _check_tensors(directory: Path, model: nn.Module, plan: dict, layers: dict,
                   header: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """The tensors the rebuilt model will hold ≡ the file's (plus aliases), by name, shape
    and kind (integer / floating point); each moefy layer's floating-point tensors of one
    dtype; every frozen name a parameter. Else LoadError naming the first differences."""
    file = f"{directory}/{WEIGHTS_FILE}"
    shared = also_at(plan)
    replaced = [*layers, *shared, *plan["identities"]]

    def under(name: str) -> bool:
        return any(not p or name == p or name.startswith(p + ".") for p in replaced)

    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_meta and not under(n)]
    if on_meta:
        raise LoadError(f"the model given has tensors on the meta device ({on_meta[0]}, ...): "
                        "build the fresh model on the CPU (its buffers that are not saved, "
                        "e.g. rotary frequencies, must be real)")
    # name → (shape, floating point?) of every tensor the model will hold, and its parameters
    want = {k: (tuple(v.shape), v.is_floating_point())
            for k, v in model.state_dict().items() if not under(k)}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False) if not under(n)}
    for path, layer in [*layers.items(), *((p, layers[s]) for p, s in shared.items())]:
        prefix = f"{path}." if path else ""
        want.update({prefix + k: (tuple(v.shape), v.is_floating_point())
                     for k, v in layer.state_dict().items()})
        params.update(prefix + n for n, _ in layer.named_parameters(remove_duplicate=False))
    odd = [k for k, (_, dtype) in header.items()
           if k in want and want[k][1] != is_floating(dtype)]
    if odd:
        raise LoadError(f"{file}: {odd[0]} is stored as {header[odd[0]][1]}, which is not the "
                        "kind of number the model holds there (integer vs floating point): "
                        "save the model again")
    have = {k: shape for k, (shape, _) in header.items()}
    for name, canonical in plan["aliases"].items():
        if canonical not in have:
            raise LoadError(f"{directory}: {name} is stored as {canonical}, which the file lacks")
        have[name] = have[canonical]
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k][0] != have[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {', '.join(extra[:3])}")
    if wrong:
        problems.append("other shapes: " + ", ".join(
            f"{k} {have[k]} in the file, {want[k][0]} in the model" for k in wrong[:3]))
    if problems:
        raise LoadError(f"{file} does not fit the model: " + "; ".join(problems)
                        + ". Is it the model that was converted, built with the same config?")
    for path, layer in layers.items():
        _check_one_dtype(file, path, layer, header, plan["aliases"])
    stray = [n for n in plan["frozen"] if n not in params]
    if stray:
        raise LoadError(f"{directory}/{PLAN_FILE} is damaged: 'frozen' names {stray[0]!r}, "
                        "which is not a parameter of the model: save the model again (or "
                        "remove the name)")


def _check_one_dtype(file: str, path: str, layer: nn.Module, header: dict,
                     aliases: dict) -> None:
    """A moefy layer computes in one dtype: a floating-point tensor of another dtype than the
    rest of its layer (a file edited or written by hand) would fail in its forward, so it
    fails here instead, naming the tensor."""
    prefix = f"{path}." if path else ""  # (its wrappers hold no tensors)
    # a neuron layer's thresholds and score scales are float32 beside weights of any dtype:
    # they are compared with, never multiplied into a matmul
    free = ({n for n, _ in layer.named_buffers()}
            if isinstance(unwrap(layer), NeuronFFN | SparseLinear) else set())
    dtypes = {prefix + k: header[aliases.get(prefix + k, prefix + k)][1]
              for k, v in layer.state_dict().items() if v.is_floating_point() and k not in free}
    if len(set(dtypes.values())) > 1:
        expected = Counter(dtypes.values()).most_common(1)[0][0]
        name = next(n for n, d in dtypes.items() if d != expected)
        raise LoadError(f"{file}: {name} is stored as {dtypes[name]}, but the rest of "
                        f"{path or 'the layer'} as {expected}: a layer computes in one dtype. "
                        f"Save the model again, or store {name} as {expected}")


def _tie(model: nn.Module, aliases: dict) -> None:
    """Tied parameters (stored once) become one parameter again, as they were."""
    for name, canonical in aliases.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        source_owner, _, source_leaf = canonical.rpartition(".")
        source = model.get_submodule(source_owner) if source_owner else model
        value = getattr(source, source_leaf)
        if isinstance(value, nn.Parameter):
            setattr(module, leaf, value)


