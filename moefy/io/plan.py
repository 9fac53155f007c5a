"""The plan of a moefy checkpoint (``moefy.json``): what it says, how a model's moefy layers
are described in it on save, how it is checked on load, and how each layer is rebuilt from
it — on the meta device, so that names and shapes can be checked before anything changes.

    model ⇒ plan: {"format", "format_version", "base": the model's class and config kind,
                   "layers": [{"path", "also", "wrappers", "kind", "args", "state"}],
                   "identities", "aliases", "frozen", "hash_routing", "decode_linear", "info",
                   "id", "files"}
    plan entry ⇒ layer: MoE / PEER / NeuronFFN / SparseLinear built from "args", wrapped in
                   "wrappers" (outside in), its settings set from "state"

"path" is where the outermost wrapper sits; "also" lists further paths where the very same
module sits (one layer registered twice): it comes back as one module at all of them.
A neuron layer's thresholds and score scales are buffers: they travel in the weights file.
"decode_linear" lists the ``nn.Linear`` modules (a causal LM's head) that the conversion reads
with moefy's row kernel (``DecodeLinear``): dense and unchanged, so their weights are the
model's own; on load the module there is wrapped again (a moefy that predates the key loads
a plain ``nn.Linear``, the same function).

"format_version" is the oldest plan format that reads the plan: 1; 2 where a layer has
"also"; 3 where a layer is a NeuronFFN or SparseLinear (a moefy that reads format 2 or older
then says "upgrade" instead of "unknown layer kind").
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from moefy.errors import LoadError, SaveError
from moefy.io.atomic import as_path
from moefy.io.hf_rebuild import attention_implementation, hf_config
from moefy.layers.moe import MoE
from moefy.layers.neuron import DecodeLinear, NeuronFFN, SparseLinear
from moefy.layers.peer import PEER
from moefy.layers.record import ConversionRecord, jsonable
from moefy.layers.tokens import has_token_hooks
from moefy.passes.rewrite import ChannelsLast

FORMAT = "moefy"
FORMAT_VERSION = 3  # the newest this moefy reads; a plan says the oldest that reads it
PLAN_FILE = "moefy.json"
WEIGHTS_FILE = "moefy.safetensors"
_LAYERS = {"MoE": MoE, "PEER": PEER, "NeuronFFN": NeuronFFN, "SparseLinear": SparseLinear}
LAYER_TYPES = tuple(_LAYERS.values())  # the moefy layers a plan describes
_NEURON_KINDS = ("NeuronFFN", "SparseLinear")  # plan format 3
_NEURON_ARGS = {"NeuronFFN": ("hidden_size", "ffn_size", "output_size", "activation", "gated",
                              "bias", "selection"),
                "SparseLinear": ("in_features", "out_features", "bias")}


# ------------------------------------------------------------------ save

def describe_model(model: nn.Module) -> dict:
    """The plan of ``model`` (without "info", "id", "aliases", "frozen" and "files", which
    the save adds); ``SaveError`` for what a plan cannot describe without pickling code.

    >>> plan = describe_model(MoE(8, 16, num_experts=4, top_k=2))
    >>> [(e["path"], e["kind"], e["args"]["num_experts"]) for e in plan["layers"]]
    [('', 'MoE', 4)]
    """
    from moefy.version import __version__

    graph = [n for n, m in model.named_modules()
             if isinstance(m, torch.fx.GraphModule) and any(
                 isinstance(c, LAYER_TYPES) for c in m.modules())]
    if graph:
        raise SaveError(
            f"{graph[0] or 'the model'} was converted in graph mode (its FFN runs inline in a "
            "larger forward, so it became a traced graph): a traced graph cannot be saved "
            "without pickling code. Export it with moefy.export_onnx, or keep it in the process")
    # every path, also a second one of a module registered twice (which named_modules skips)
    modules = list(model.named_modules(remove_duplicate=False))
    layers, inside, first = [], [], {}  # first: id(layer) → (its entry, the module at its site)
    for path, module in modules:
        if not isinstance(module, LAYER_TYPES):
            continue
        inside.append(path)
        entry = _describe(model, path, module)
        site = model.get_submodule(entry["path"])
        if id(module) not in first:
            first[id(module)] = entry, site
            layers.append(entry)
        elif first[id(module)][1] is site:
            first[id(module)][0].setdefault("also", []).append(entry["path"])
        else:
            raise SaveError(
                f"{path} is the layer at {first[id(module)][0]['path'] or 'the top'}, but "
                "wrapped differently there: a plan rebuilds one layer with one set of "
                "wrappers. Register the same wrapped module at both paths, or a copy")
    identities = [n for n, m in modules if isinstance(m, nn.Identity) and n
                  and not any(n.startswith(p + ".") for p in inside)]
    shared = any(e.get("also") for e in layers)
    neuron = any(e["kind"] in _NEURON_KINDS for e in layers)
    return {"format": FORMAT, "format_version": 3 if neuron else 2 if shared else 1,
            "moefy_version": __version__,
            "base": {"class": type(model).__name__, "module": type(model).__module__,
                     "hf": hf_config(model) is not None,
                     "attn_implementation": attention_implementation(model)},
            "layers": layers, "identities": identities, "hash_routing": has_token_hooks(model),
            "decode_linear": [n for n, m in modules if isinstance(m, DecodeLinear) and n]}


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
    elif isinstance(layer, PEER):
        entry = {"path": site, "wrappers": wrappers, "kind": "PEER",
                 "args": _peer_args(layer), "state": _peer_state(layer)}
    else:
        entry = {"path": site, "wrappers": wrappers, "kind": type(layer).__name__,
                 "args": _neuron_args(layer),
                 "state": {"conversion": ConversionRecord.of(layer.conversion).to_json()
                           or None}}
    rebuilt = build_layer(entry)
    want = {k: tuple(v.shape) for k, v in unwrap(rebuilt).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise SaveError(f"{path or 'the layer'} was changed after it was built ({diff[0][0]} "
                        f"{diff[0][1]}): its plan would not rebuild it, so it cannot be saved")
    return entry


def _moe_args(m: MoE) -> dict:
    shared = m.shared.ffn
    # output_size only where it is not H: plans without it (all older ones) mean H
    other = {} if m.output_size == m.hidden_size else {"output_size": m.output_size}
    return {"hidden_size": m.hidden_size, "expert_size": m.expert_size,
            "num_experts": m.num_experts, "top_k": m.top_k, "activation": m.activation,
            "gated": m.gated, "bias": m.b_in is not None,
            "shared_expert_size": 0 if shared is None else shared.fc_in.out_features,
            "combine": m.combine, "router": m.router_type,
            "capacity_factor": m.capacity_factor, "top_p": m.top_p, **other}


def _moe_state(m: MoE) -> dict:
    comp = m.shared.compensation
    return {"expert_dropout": m.expert_dropout, "bias_update_rate": m.bias_update_rate,
            "prepack": m.prepack, "expert_neurons": m.expert_neurons,
            "shared_neurons": m.shared_neurons,
            "shared_bias": m.shared.bias is not None,
            "router_bias": m.router.bias is not None,
            "compensation_rank": None if comp is None else comp[0].out_features,
            "use_compensation": m.shared.use_compensation,
            "conversion": ConversionRecord.of(m.conversion).to_json() or None}


def _peer_args(p: PEER) -> dict:
    return {"hidden_size": p.hidden_size, "num_experts": list(p.grid), "heads": p.heads,
            "top_k": p.top_k, "key_dim": p.key_dim, "activation": p.activation,
            "query_norm": "batch" if p.query_norm is not None else None, "score": p.score,
            "bias": p.down_bias is not None, "gated": p.gate is not None, "sparse": p.sparse}


def _neuron_args(m: NeuronFFN | SparseLinear) -> dict:
    if isinstance(m, SparseLinear):
        return {"in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None}
    return {"hidden_size": m.hidden_size, "ffn_size": m.ffn_size,
            "output_size": m.output_size, "activation": m.activation, "gated": m.gated,
            "bias": m.b_in is not None, "selection": m.selection}


def _peer_state(p: PEER) -> dict:
    bn = p.query_norm
    return {"expert_neurons": jsonable(getattr(p, "expert_neurons", None)),
            "norm_momentum": None if bn is None else bn.momentum,
            "norm_eps": None if bn is None else bn.eps,
            "conversion": ConversionRecord.of(p.conversion).to_json() or None}




# ------------------------------------------------------------------ load

def read_plan(directory: str | os.PathLike) -> dict:
    """The plan of a saved model (``moefy.json``), checked: a missing or damaged file, a plan
    from a newer moefy, or one whose entries are not what a save writes (hand-edited) raises
    ``LoadError``, before anything is built."""
    directory = as_path(directory, LoadError, "load")
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
    plan.setdefault("frozen", [])  # plans of older moefy versions have none
    plan.setdefault("decode_linear", [])
    for key, kind in (("base", dict), ("layers", list), ("identities", list),
                      ("aliases", dict), ("info", dict), ("frozen", list),
                      ("decode_linear", list)):
        if not isinstance(plan.get(key), kind):
            raise LoadError(f"{path} is damaged: '{key}' is missing or not a {kind.__name__} "
                            f"(got {type(plan.get(key)).__name__}); save the model again")
    if not isinstance(plan["base"].get("class"), str) or not isinstance(plan.get("id"), str):
        raise LoadError(f"{path} is damaged: the base class or the checkpoint id is missing")
    if not all(isinstance(e, dict) for e in plan["layers"]):
        raise LoadError(f"{path} is damaged: a layer entry is not an object")
    names = {"identities": plan["identities"], "frozen": plan["frozen"],
             "decode_linear": plan["decode_linear"],
             "aliases": [*plan["aliases"], *plan["aliases"].values()],
             "also": [p for e in plan["layers"] for p in _listed(e.get("also", []), path)]}
    for key, values in names.items():
        bad = [v for v in values if not isinstance(v, str) or not v]
        if bad:
            raise LoadError(f"{path} is damaged: '{key}' holds {bad[0]!r}, not a module or "
                            "tensor name; save the model again")
    paths = [e.get("path") for e in plan["layers"]] + names["also"]
    twice = sorted({p for p in paths if isinstance(p, str) and paths.count(p) > 1})
    if twice:
        raise LoadError(f"{path} is damaged: two layers at {twice[0]!r}; save the model again")
    return plan


def _listed(value, path: Path) -> list:
    if not isinstance(value, list):
        raise LoadError(f"{path} is damaged: a layer's 'also' is a {type(value).__name__}, "
                        "not a list of paths; save the model again")
    return value


def also_at(plan: dict) -> dict[str, str]:
    """{path: the path of the plan entry whose very module sits there too} (one module
    registered at several paths comes back as one module at all of them)."""
    return {p: e["path"] for e in plan["layers"] for p in e.get("also", [])}


def skeletons(plan: dict, model: nn.Module) -> dict[str, nn.Module]:
    """path → the layer (wrapped) to swap in there, on the meta device, one per plan entry
    (``also_at`` says where else it goes); every path the plan names must exist in
    ``model``, else ``LoadError`` (nothing in ``model`` changes here)."""
    layers = {}
    for entry in plan["layers"]:
        path = entry.get("path")
        if not isinstance(path, str) or path in layers:
            raise LoadError("the plan is damaged: a layer without a path, or two at one path")
        for where in [path, *entry.get("also", [])]:
            try:
                if where:
                    model.get_submodule(where)
            except AttributeError as exc:
                raise LoadError(
                    f"the model has no module {where!r}, where the plan puts a "
                    f"{entry.get('kind')}: it is not the architecture that was converted "
                    f"({type(model).__name__} built with another config?)") from exc
        layers[path] = build_layer(entry)
        try:
            _restore_state(unwrap(layers[path]), entry)
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(f"the plan is damaged: {path or 'the layer'}'s settings: "
                            f"{type(exc).__name__}: {exc}") from exc
    for path in plan["identities"]:
        try:
            model.get_submodule(path)
        except AttributeError as exc:
            raise LoadError(f"the model has no module {path!r}, which the conversion replaced: "
                            "it is not the architecture that was converted") from exc
    replaced = [*layers, *also_at(plan), *plan["identities"]]
    for path in plan["decode_linear"]:
        try:
            head = model.get_submodule(path)
        except AttributeError:
            head = None
        inside = [p for p in replaced if path == p or path.startswith(p + ".") or not p]
        if inside:
            raise LoadError(f"the plan is damaged: {path!r} is both a module to read by rows "
                            f"and {'under ' if path != inside[0] else ''}a layer the plan "
                            f"replaces ({inside[0] or 'the model itself'!r}); save the model "
                            "again")
        if not isinstance(head, nn.Linear):
            raise LoadError(f"the model has no nn.Linear at {path!r}, which the conversion reads "
                            "with moefy's row kernel: it is not the architecture that was "
                            "converted")
    return layers


def build_layer(entry: dict) -> nn.Module:
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
            if kind in _NEURON_KINDS:
                layer = _neuron_layer(kind, args)
            elif kind == "MoE":
                hidden = args.pop("hidden_size")
                layer = MoE(hidden, args.pop("expert_size"), args.pop("num_experts"),
                            args.pop("top_k"), **args)
                state = entry["state"]
                if state.get("router_bias"):
                    layer.router.bias = nn.Parameter(torch.empty(layer.num_experts))
                out = layer.output_size
                if state.get("shared_bias"):
                    layer.shared.bias = nn.Parameter(torch.empty(out))
                rank = state.get("compensation_rank")
                if rank:
                    layer.shared.set_compensation(torch.empty(rank, hidden),
                                                  torch.empty(out, rank), torch.empty(out))
            else:
                layer = PEER(args.pop("hidden_size"), tuple(args.pop("num_experts")), **args)
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


def _neuron_layer(kind: str, args: dict) -> NeuronFFN | SparseLinear:
    """A NeuronFFN / SparseLinear from its plan args (its constructor checks the sizes,
    activation and selection; the flags are checked here: a truthy string is no bool)."""
    known = _NEURON_ARGS[kind]
    stray = sorted(set(args) - set(known))  # e.g. "device": the skeleton stays on meta
    if stray:
        raise ValueError(f"unknown argument {stray[0]!r} (a {kind} takes {', '.join(known)})")
    flags = ("bias", "gated") if kind == "NeuronFFN" else ("bias",)
    odd = [f for f in flags if not isinstance(args.get(f), bool)]
    if odd:
        raise ValueError(f"{odd[0]} must be true or false, got {args.get(odd[0])!r}")
    return _LAYERS[kind](**args)


def unwrap(layer: nn.Module) -> nn.Module:
    """The moefy layer (MoE, PEER, NeuronFFN, SparseLinear) inside a layer's wrappers."""
    while not isinstance(layer, LAYER_TYPES):
        layer = layer[0] if isinstance(layer, nn.Sequential) else layer.moe
    return layer


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
    elif isinstance(layer, PEER):
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
        layer.conversion = ConversionRecord.of(conversion)  # ValueError: a malformed record
