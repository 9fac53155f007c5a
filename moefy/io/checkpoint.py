"""``moefy.save`` / ``moefy.load``: a converted model as files, and back, without pickling.

    directory/
      moefy.safetensors   every tensor of the model's state dict (a tied tensor once); not
                          named model.safetensors, so that transformers' from_pretrained
                          does not half-load it as the dense model
      moefy.json          the plan: where each MoE / PEER layer sits, how to build it, the
                          wrappers and identities conversion put around it, tied names
      config.json         the base model's Hugging Face config (when it has one)
      generation_config.json, tokenizer files (when given)

Loading builds each layer from its plan on the meta device, checks that the tensors it would
hold and the file's tensors agree in names and shapes, and only then swaps the layers in and
assigns the file's tensors: nothing is built from pickled code, nothing is calibrated again,
and no graph is traced.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
import torch.nn as nn

from moefy.errors import LoadError, MissingDependencyError, SaveError, first_line
from moefy.layers.moe import MoE
from moefy.layers.peer import PEER
from moefy.layers.shard import refuse_sharded
from moefy.layers.tokens import has_token_hooks, install_token_hooks
from moefy.passes.rewrite import ChannelsLast

FORMAT = "moefy"
FORMAT_VERSION = 1
PLAN_FILE = "moefy.json"
WEIGHTS_FILE = "moefy.safetensors"
_LAYERS = {"MoE": MoE, "PEER": PEER}


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
    directory = _as_path(directory, SaveError, "save")
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
    """Write a whole (unsharded) model's plan and weights into ``directory``."""
    if directory.exists() and not directory.is_dir():  # here: on the rank that writes
        raise SaveError(f"{directory} exists and is not a directory")
    plan = _plan(model)
    plan["info"] = info or {}
    plan["id"] = uuid.uuid4().hex  # also in the weights' header: a plan and weights that
    # two saves wrote into one folder at once never pass for one checkpoint
    tensors, aliases = _tensors(model)
    plan["aliases"] = aliases
    plan["frozen"] = [n for n, p in model.named_parameters() if not p.requires_grad]
    config = _hf_config(model)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    # everything is written into a work folder first, then moved in, the plan last: a failure
    # leaves the folder as it was, and a plan is never beside weights it does not describe
    with tempfile.TemporaryDirectory(dir=directory, prefix=".moefy-") as tmp:
        tmp = Path(tmp)
        try:
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "moefy": plan["id"]})
            if config is not None:
                config.to_json_file(tmp / "config.json")
                generation = getattr(model, "generation_config", None)
                if generation is not None:
                    generation.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise SaveError(f"save: writing {directory} failed ({type(exc).__name__}: "
                            f"{exc}); nothing there was changed") from exc
        written = sorted(p.name for p in tmp.iterdir())
        plan["files"] = written
        (tmp / PLAN_FILE).write_text(json.dumps(plan, indent=1, allow_nan=False) + "\n")
        for name in _previous_files(directory):  # what an earlier save there wrote
            if name not in written and (directory / name).is_file():
                (directory / name).unlink()
        for name in [*written, PLAN_FILE]:
            if (directory / name).is_dir():
                shutil.rmtree(directory / name)
            os.replace(tmp / name, directory / name)


def _previous_files(directory: Path) -> list[str]:
    try:
        plan = json.loads((directory / PLAN_FILE).read_text())
        files = plan.get("files", []) if isinstance(plan, dict) else []
        return [f for f in files if isinstance(f, str) and "/" not in f and f != ".."]
    except (OSError, ValueError):
        return []


def _as_path(directory, error: type[Exception], what: str) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise error(f"{what}: directory must be a path (str or os.PathLike), got "
                    f"{type(directory).__name__}")
    return Path(directory).expanduser()


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
    too) — and returns it. A saved bare ``MoE`` / ``PEER`` comes back as a new layer (the one
    given only says which class is expected). Parameters frozen when saved stay frozen.

    Raises ``moefy.errors.LoadError`` before any layer is swapped in when a file is missing or
    damaged, the plan comes from a newer moefy or another save than the weights, ``model`` is
    of another class, has another Hugging Face config than the saved one, lacks a module the
    plan names or sits on the meta device, or a tensor is missing, unexpected, of another
    shape or of another kind (integer / floating point).
    """
    return load_with(directory, model)


def load_with(directory, model: nn.Module | None, shard=None) -> nn.Module:
    """``load``; with ``shard(layers)`` (``moefy.distributed.load_sharded``), which
    shards the rebuilt layers' experts and returns {tensor name: (first row, end row)}, only
    those rows of those tensors are read from the file."""
    directory = _as_path(directory, LoadError, "load")
    plan = read_plan(directory)
    header = _read_header(directory / WEIGHTS_FILE, plan["id"])
    base = plan["base"]
    given = model
    if model is None:
        model = _build_hf(directory, base)
    elif not isinstance(model, nn.Module):
        raise LoadError(f"load: model must be a torch.nn.Module, got {type(model).__name__}")
    else:
        model = _unwrap_compiled(model)
        if type(model).__name__ != base["class"]:
            raise LoadError(
                f"{directory} holds a converted {base['class']}, but the model given is a "
                f"{type(model).__name__}: pass a fresh {base['class']} built like the one "
                "that was converted")
        _check_config(directory, model)
    converted = [n for n, m in model.named_modules() if isinstance(m, (MoE, PEER))]
    if converted and plan["layers"] and not isinstance(model, (MoE, PEER)):
        raise LoadError(f"the model given already holds moefy layers ({converted[0]}, ...): "
                        "pass a fresh dense model")
    layers = _skeletons(plan, model)  # meta device: names and shapes only
    _check_tensors(directory, model, plan, layers, header)
    rows = shard(layers) if shard is not None else {}

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(directory / WEIGHTS_FILE, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k not in rows}  # noqa: SIM118
        state.update(_read_rows(directory / WEIGHTS_FILE, rows))
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
    model.load_state_dict(state, strict=True, assign=True)
    _tie(model, plan["aliases"])
    for name in plan.get("frozen", []):
        model.get_parameter(name).requires_grad_(False)
    if plan.get("hash_routing") and "" not in layers:
        install_token_hooks(model)
    model.eval()
    return model if given is None or "" in layers else given  # given: maybe torch.compile's


def read_plan(directory: str | os.PathLike) -> dict:
    """The plan of a saved model (``moefy.json``), checked: a missing or damaged file or a plan
    from a newer moefy raises ``LoadError``."""
    directory = _as_path(directory, LoadError, "load")
    if directory.is_file():
        raise LoadError(f"{directory} is a file: give the folder moefy.save wrote (the one that "
                        f"holds {PLAN_FILE} and {WEIGHTS_FILE})")
    if not directory.is_dir():
        raise LoadError(f"{directory}: no such directory (give the folder moefy.save wrote)")
    path = directory / PLAN_FILE
    if not path.is_file():
        raise LoadError(f"{directory} holds no {PLAN_FILE}: it was not written by moefy.save")
    try:
        plan = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path} is damaged (not JSON: {exc}); save the model again") from exc
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise LoadError(f"{path} is not a moefy plan")
    version = plan.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LoadError(f"{path} is damaged: format_version {version!r} is not a positive int")
    if version > FORMAT_VERSION:
        from moefy.version import __version__

        raise LoadError(
            f"{path} was written by moefy {plan.get('moefy_version', '?')} in plan format "
            f"{version}; this moefy ({__version__}) reads format {FORMAT_VERSION} and older: "
            "upgrade moefy to load it")
    for key, kind in (("base", dict), ("layers", list), ("identities", list),
                      ("aliases", dict), ("info", dict)):
        if not isinstance(plan.get(key), kind):
            raise LoadError(f"{path} is damaged: '{key}' is missing or not a {kind.__name__}")
    if not isinstance(plan["base"].get("class"), str) or not isinstance(plan.get("id"), str):
        raise LoadError(f"{path} is damaged: the base class or the checkpoint id is missing")
    if not all(isinstance(e, dict) for e in plan["layers"]) or not all(
            isinstance(p, str) for p in [*plan["identities"], *plan.get("frozen", [])]):
        raise LoadError(f"{path} is damaged: a layer entry is not an object, or a path not a "
                        "string")
    return plan


# ------------------------------------------------------------------ save

def _plan(model: nn.Module) -> dict:
    from moefy.version import __version__

    graph = [n for n, m in model.named_modules()
             if isinstance(m, torch.fx.GraphModule) and any(
                 isinstance(c, (MoE, PEER)) for c in m.modules())]
    if graph:
        raise SaveError(
            f"{graph[0] or 'the model'} was converted in graph mode (its FFN runs inline in a "
            "larger forward, so it became a traced graph): a traced graph cannot be saved "
            "without pickling code. Export it with moefy.export_onnx, or keep it in the process")
    layers, inside = [], set()
    for path, module in model.named_modules():
        if isinstance(module, (MoE, PEER)):
            layers.append(_describe(model, path, module))
            inside.add(path)
    identities = [n for n, m in model.named_modules()
                  if isinstance(m, nn.Identity) and n
                  and not any(n.startswith(p + ".") for p in inside)]
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "moefy_version": __version__,
            "base": {"class": type(model).__name__, "module": type(model).__module__,
                     "hf": _hf_config(model) is not None,
                     # how attention runs is not in config.json; eager vs sdpa differ in
                     # the last bits
                     "attn_implementation": getattr(getattr(model, "config", None),
                                                    "_attn_implementation", None)},
            "layers": [e for e in layers if e is not None], "identities": identities,
            "hash_routing": has_token_hooks(model)}


def _describe(model: nn.Module, path: str, layer: nn.Module) -> dict:
    """One layer's plan entry: the path its outermost wrapper sits at, the wrappers (outside
    in), and how to build the layer. Checked by building it: the rebuilt layer must hold the
    same tensor names and shapes, or saving refuses."""
    wrappers, site = [], path
    parent_path = path.rpartition(".")[0] if "." in path else ""
    parent = model.get_submodule(parent_path) if path else None
    if isinstance(parent, ChannelsLast):
        wrappers.insert(0, {"type": "channels_last", "dim": parent.channels_dim})
        site, parent_path = parent_path, parent_path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if site else None
    if (isinstance(parent, nn.Sequential) and len(parent) == 2 and parent[0] is
            model.get_submodule(site) and isinstance(parent[1], nn.Dropout)):
        wrappers.insert(0, {"type": "dropout", "p": parent[1].p})
        site = parent_path
    if isinstance(layer, MoE):
        if layer.activation_fn is not None:
            raise SaveError(
                f"{path or 'the layer'}: its experts use a custom activation module (an "
                "element-wise subgraph the conversion found), which cannot be saved without "
                "pickling code; export it with moefy.export_onnx instead")
        entry = {"path": site, "wrappers": wrappers, "kind": "MoE",
                 "args": _moe_args(layer), "state": _moe_state(layer)}
    else:
        entry = {"path": site, "wrappers": wrappers, "kind": "PEER",
                 "args": _peer_args(layer), "state": _peer_state(layer)}
    rebuilt = _build_layer(entry)
    want = {k: tuple(v.shape) for k, v in _unwrap(rebuilt).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise SaveError(f"{path or 'the layer'} was changed after it was built ({diff[0][0]} "
                        f"{diff[0][1]}): its plan would not rebuild it, so it cannot be saved")
    return entry


def _moe_args(m: MoE) -> dict:
    shared = m.shared.ffn
    return {"hidden_size": m.hidden_size, "expert_size": m.expert_size,
            "num_experts": m.num_experts, "top_k": m.top_k, "activation": m.activation,
            "gated": m.gated, "bias": m.b_in is not None,
            "shared_expert_size": 0 if shared is None else shared.fc_in.out_features,
            "combine": m.combine, "router": m.router_type,
            "capacity_factor": m.capacity_factor, "top_p": m.top_p}


def _moe_state(m: MoE) -> dict:
    comp = m.shared.compensation
    return {"expert_dropout": m.expert_dropout, "bias_update_rate": m.bias_update_rate,
            "prepack": m.prepack, "expert_neurons": m.expert_neurons,
            "shared_neurons": m.shared_neurons,
            "shared_bias": m.shared.bias is not None,
            "router_bias": m.router.bias is not None,
            "compensation_rank": None if comp is None else comp[0].out_features,
            "use_compensation": m.shared.use_compensation,
            "conversion": _jsonable(getattr(m, "conversion", None))}


def _peer_args(p: PEER) -> dict:
    return {"hidden_size": p.hidden_size, "num_experts": list(p.grid), "heads": p.heads,
            "top_k": p.top_k, "key_dim": p.key_dim, "activation": p.activation,
            "query_norm": "batch" if p.query_norm is not None else None, "score": p.score,
            "bias": p.down_bias is not None, "gated": p.gate is not None, "sparse": p.sparse}


def _peer_state(p: PEER) -> dict:
    bn = p.query_norm
    return {"expert_neurons": _jsonable(getattr(p, "expert_neurons", None)),
            "norm_momentum": None if bn is None else bn.momentum,
            "norm_eps": None if bn is None else bn.eps,
            "conversion": _jsonable(getattr(p, "conversion", None))}


def _jsonable(value):
    """``value`` as JSON (tensors as lists, non-finite floats as None); what cannot be said in
    JSON is left out (it is descriptive only)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, dict):
        out = {str(k): _jsonable(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v is not _SKIP}
    if isinstance(value, (list, tuple)):
        return [v for v in (_jsonable(v) for v in value) if v is not _SKIP]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return _SKIP


_SKIP = object()


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


def _hf_config(model: nn.Module):
    """A copy of the model's Hugging Face config without what only the source format had
    (a GGUF file's quantization_config), or None."""
    config = getattr(model, "config", None)
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return None
    if not isinstance(config, PretrainedConfig):
        return None
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


# ------------------------------------------------------------------ load

def _read_header(path: Path, plan_id: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names, shapes and dtypes of a safetensors file's tensors, from its header alone; the
    file must come from the same save as the plan."""
    if not path.is_file():
        raise LoadError(f"{path.parent} holds no {path.name}: the weights are missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        out, end = {}, 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, stop = meta["data_offsets"]
            end = max(end, stop)
            out[name] = (tuple(meta["shape"]), meta["dtype"])
        if 8 + n + end > size:
            raise ValueError(f"the file ends at byte {size}, its tensors need {8 + n + end}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path} is damaged or truncated ({exc}); save the model again") from exc
    if (header.get("__metadata__") or {}).get("moefy") != plan_id:
        raise LoadError(f"{path} and {PLAN_FILE} beside it come from different saves (two "
                        "saves into one folder at once, or a file copied in): save the model "
                        "again")
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16}


def _read_rows(path: Path, rows: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """{name: rows [start, stop) of that tensor}, each read from its byte range in the file
    alone (safetensors' own slicing reads the whole tensor first)."""
    if not rows:
        return {}
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for name, (start, stop) in rows.items():
            meta = header[name]
            if meta["dtype"] not in _DTYPES:
                raise ValueError(f"{name} is stored as {meta['dtype']}, which a sharded load "
                                 "does not read")
            dtype, shape = _DTYPES[meta["dtype"]], meta["shape"]
            row = math.prod(shape[1:]) * dtype.itemsize
            f.seek(8 + n + meta["data_offsets"][0] + start * row)
            data = bytearray(f.read((stop - start) * row))
            if len(data) != (stop - start) * row:
                raise ValueError(f"{name} is cut short")
            out[name] = torch.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:]) \
                if data else torch.empty(0, *shape[1:], dtype=dtype)
    return out


def _build_hf(directory: Path, base: dict) -> nn.Module:
    if not base.get("hf"):
        raise LoadError(
            f"{directory} holds a converted {base['class']}, which is not a Hugging Face model: "
            f"build a fresh dense {base['class']} and call moefy.load(directory, model)")
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("loading a Hugging Face model needs transformers: "
                                     "pip install 'moefy[hf]'") from exc
    cls = getattr(transformers, base["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise LoadError(f"{directory}: transformers {transformers.__version__} has no model "
                        f"class {base['class']}: install the transformers it was saved with")
    if not (directory / "config.json").is_file():
        raise LoadError(f"{directory} holds no config.json: pass a fresh {base['class']} as "
                        "moefy.load(directory, model)")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        generation = (transformers.GenerationConfig.from_pretrained(directory)
                      if (directory / "generation_config.json").is_file() else None)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"{directory}: config.json or generation_config.json cannot be read: "
                        f"{first_line(exc)}") from exc
    if config.architectures and base["class"] not in config.architectures:
        raise LoadError(f"{directory}/config.json describes {', '.join(config.architectures)}, "
                        f"not the {base['class']} that was saved (another file copied in?): "
                        "save the model again")
    from transformers.initialization import no_init_weights

    try:
        attention = base.get("attn_implementation")
        extra = {"attn_implementation": attention} if isinstance(attention, str) else {}
        with no_init_weights():  # every weight comes from the file
            model = cls._from_config(config, **extra)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise LoadError(f"{directory}/config.json does not build a {base['class']}: "
                        f"{first_line(exc)}") from exc
    if generation is not None and hasattr(model, "generation_config"):
        model.generation_config = generation
    return model


# config entries that say how a model was loaded or run, not what it computes
_CONFIG_VOLATILE = {"transformers_version", "_name_or_path", "architectures", "dtype",
                    "torch_dtype", "quantization_config", "use_cache", "output_attentions",
                    "output_hidden_states", "return_dict", "attn_implementation"}


def _check_config(directory: Path, model: nn.Module) -> None:
    """A fresh Hugging Face model must have the saved config (tensor shapes alone miss e.g.
    another number of heads, RoPE base or norm epsilon)."""
    config = _hf_config(model)
    path = directory / "config.json"
    if config is None or not path.is_file():
        return
    try:  # both in full (the file holds what differs from the class's defaults)
        saved = json.loads(type(config).from_json_file(path).to_json_string(use_diff=False))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise LoadError(f"{path} is damaged ({exc}); save the model again") from exc
    mine = json.loads(config.to_json_string(use_diff=False))
    differ = sorted(k for k in set(saved) | set(mine)
                    if k not in _CONFIG_VOLATILE and saved.get(k) != mine.get(k))
    if differ:
        shown = "; ".join(f"{k}: {saved.get(k)!r} saved, {mine.get(k)!r} given"
                          for k in differ[:4])
        raise LoadError(f"the model given was built with another config than the saved one "
                        f"({shown}): build it from {path} (or call moefy.load(directory) "
                        "without a model)")


def _build_layer(entry: dict) -> nn.Module:
    """An entry's layer with its wrappers, on the meta device (shapes, no data)."""
    kind = entry.get("kind")
    if kind not in _LAYERS:
        raise LoadError(f"unknown layer kind {kind!r} in the plan")
    if not (isinstance(entry.get("args"), dict) and isinstance(entry.get("state"), dict)
            and isinstance(entry.get("wrappers", []), list)):
        raise LoadError(f"the plan is damaged: {entry.get('path')!r} lacks its args or state")
    args = dict(entry["args"])
    with torch.device("meta"):
        try:
            if kind == "PEER":
                args["num_experts"] = tuple(args["num_experts"])
            hidden = args.pop("hidden_size")
            if kind == "MoE":
                layer = MoE(hidden, args.pop("expert_size"), args.pop("num_experts"),
                            args.pop("top_k"), **args)
                state = entry["state"]
                if state.get("router_bias"):
                    layer.router.bias = nn.Parameter(torch.empty(layer.num_experts))
                if state.get("shared_bias"):
                    layer.shared.bias = nn.Parameter(torch.empty(hidden))
                rank = state.get("compensation_rank")
                if rank:
                    layer.shared.set_compensation(torch.empty(rank, hidden),
                                                  torch.empty(hidden, rank), torch.empty(hidden))
            else:
                layer = PEER(hidden, args.pop("num_experts"), **args)
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise LoadError(f"the plan's {entry.get('path') or 'layer'} cannot be built: "
                            f"{exc}") from exc
    for wrap in reversed(entry.get("wrappers", [])):
        kind = wrap.get("type") if isinstance(wrap, dict) else None
        try:
            if kind == "channels_last":
                layer = ChannelsLast(layer, int(wrap["dim"]))
            elif kind == "dropout":
                layer = nn.Sequential(layer, nn.Dropout(float(wrap["p"])))
            else:
                raise LoadError(f"unknown wrapper {wrap!r} in the plan")
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"the plan is damaged: wrapper {wrap!r}: {exc}") from exc
    return layer


def _unwrap(layer: nn.Module) -> nn.Module:
    while not isinstance(layer, (MoE, PEER)):
        layer = layer[0] if isinstance(layer, nn.Sequential) else layer.moe
    return layer


def _skeletons(plan: dict, model: nn.Module) -> dict[str, nn.Module]:
    """path → the layer (wrapped) to swap in there; every path must exist in ``model``."""
    layers = {}
    for entry in plan["layers"]:
        path = entry.get("path")
        if not isinstance(path, str) or path in layers:
            raise LoadError("the plan is damaged: a layer without a path, or two at one path")
        try:
            if path:
                model.get_submodule(path)
        except AttributeError as exc:
            raise LoadError(
                f"the model has no module {path!r}, where the plan puts a {entry['kind']}: it "
                f"is not the architecture that was converted ({type(model).__name__} built "
                "with another config?)") from exc
        layers[path] = _build_layer(entry)
        try:
            _restore_state(_unwrap(layers[path]), entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"the plan is damaged: {path or 'the layer'}'s settings: "
                            f"{type(exc).__name__}: {exc}") from exc
    for path in plan["identities"]:
        try:
            model.get_submodule(path)
        except AttributeError as exc:
            raise LoadError(f"the model has no module {path!r}, which the conversion replaced: "
                            "it is not the architecture that was converted") from exc
    return layers


def _check_tensors(directory: Path, model: nn.Module, plan: dict, layers: dict,
                   header: dict) -> None:
    """The tensors the rebuilt model will hold ≡ the file's (plus aliases), by name and
    shape; else LoadError naming the first differences."""
    replaced = [*layers, *plan["identities"]]

    def under(name: str) -> bool:
        return any(not p or name == p or name.startswith(p + ".") for p in replaced)

    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not under(k)}
    for path, layer in layers.items():
        prefix = f"{path}." if path else ""
        want.update({prefix + k: tuple(v.shape) for k, v in layer.state_dict().items()})
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
               if t.is_meta and not under(n)]
    if on_meta:
        raise LoadError(f"the model given has tensors on the meta device ({on_meta[0]}, ...): "
                        "build the fresh model on the CPU (its buffers that are not saved, "
                        "e.g. rotary frequencies, must be real)")
    kinds = {k: v.is_floating_point() for k, v in model.state_dict().items() if not under(k)}
    for path, layer in layers.items():
        prefix = f"{path}." if path else ""
        kinds.update({prefix + k: v.is_floating_point() for k, v in layer.state_dict().items()})
    odd = [k for k, (_, dtype) in header.items()
           if k in kinds and kinds[k] != (dtype.startswith("F") or dtype == "BF16")]
    if odd:
        raise LoadError(f"{directory}/{WEIGHTS_FILE}: {odd[0]} is stored as "
                        f"{header[odd[0]][1]}, which is not the kind of number the model holds "
                        "there (integer vs floating point): save the model again")
    have = {k: shape for k, (shape, _) in header.items()}
    for name, canonical in plan["aliases"].items():
        if canonical not in have:
            raise LoadError(f"{directory}: {name} is stored as {canonical}, which the file lacks")
        have[name] = have[canonical]
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:3])}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {', '.join(extra[:3])}")
    if wrong:
        problems.append("other shapes: " + ", ".join(
            f"{k} {have[k]} in the file, {want[k]} in the model" for k in wrong[:3]))
    if problems:
        raise LoadError(f"{directory}/{WEIGHTS_FILE} does not fit the model: "
                        + "; ".join(problems) + ". Is it the model that was converted, built "
                        "with the same config?")


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


def _restore_state(layer: nn.Module, entry: dict) -> None:
    """The layer's settings that its constructor does not take (validated: a wrong type is a
    TypeError / ValueError here, on the meta skeleton, not later in a forward)."""
    state = entry["state"]

    def flag(name: str) -> bool:
        if not isinstance(state[name], bool):
            raise TypeError(f"{name} must be true or false, got {state[name]!r}")
        return state[name]

    def neurons(name: str):
        value = state.get(name)
        if value is not None and not (isinstance(value, list) and all(
                isinstance(v, (int, list)) for v in value)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
        return value

    if isinstance(layer, MoE):
        layer.expert_dropout = state["expert_dropout"]  # the setter checks the range
        rate = state["bias_update_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
                math.isfinite(rate) and rate >= 0):
            raise ValueError(f"bias_update_rate must be a finite number >= 0, got {rate!r}")
        layer.bias_update_rate = float(rate)
        layer.prepack = flag("prepack")
        layer.expert_neurons = neurons("expert_neurons")
        layer.shared_neurons = neurons("shared_neurons")
        layer.shared.use_compensation = flag("use_compensation")
    else:
        if state.get("expert_neurons") is not None:
            layer.expert_neurons = neurons("expert_neurons")
        if layer.query_norm is not None:
            momentum, eps = state["norm_momentum"], state["norm_eps"]
            if momentum is not None and not isinstance(momentum, (int, float)) or not (
                    isinstance(eps, (int, float)) and eps > 0):
                raise ValueError(f"norm_momentum / norm_eps: {momentum!r} / {eps!r}")
            layer.query_norm.momentum, layer.query_norm.eps = momentum, eps
    conversion = state.get("conversion")
    if conversion is not None:
        if not isinstance(conversion, dict):
            raise TypeError(f"conversion must be an object, got {type(conversion).__name__}")
        layer.conversion = conversion
