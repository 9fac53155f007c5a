"""The converted model ``export_hf`` reads, and what each Hugging Face MoE format can hold of it.

    *ForCausalLM with moefy.MoE FFNs ──read_source──▶ Source (per layer: attention, norms, the
          MoE's experts / router / shared expert, or the dense MLP; what no format holds)
          ──check_architecture(src, arch)──▶ what ``arch`` cannot hold exactly (empty: all of it)
          ──refusal──▶ an HFExportError naming a format that holds the model, or what to change

Nothing here writes a file; what each format holds is described in ``moefy.io.hf``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moefy.activations import get_activation
from moefy.errors import HFExportError
from moefy.layers.moe import MoE
from moefy.layers.peer import PEER

ARCHITECTURES = ("mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe")
SOURCES = ("llama", "mistral", "qwen2")  # config.model_type of the models export_hf reads
_SOFTMAX_ROUTED = ("mixtral", "qwen2_moe")
_SIGMOID_ROUTED = ("deepseek_v3", "glm4_moe")
_KEEP = "moefy.save (and moefy.load) or moefy.export_onnx keep the model as it is"


@dataclass
class Problem:
    """Something a format cannot hold: ``what`` (for the message) and ``fix`` (what to change
    when no format holds it)."""

    what: str
    fix: str = ""


@dataclass
class MoELayer:
    """One MoE layer as the formats store it (nn.Linear layout, in the model's dtype)."""

    gate: torch.Tensor  # (E, I, H)
    up: torch.Tensor  # (E, I, H)
    down: torch.Tensor  # (E, H, I)
    router: torch.Tensor  # (E, H)
    router_kind: str  # "softmax" (softmax over the top-k logits) | "sigmoid"
    selection_bias: torch.Tensor | None  # (E,), sigmoid router
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate, up (S, H); down (H, S)
    top_k: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]


@dataclass
class Layer:
    index: int
    attention: dict[str, torch.Tensor]  # q/k/v/o_proj.weight and .bias (non-zero biases only)
    norms: dict[str, torch.Tensor]  # input_layernorm.weight, post_attention_layernorm.weight
    moe: MoELayer | None  # None: left dense
    dense: dict[str, torch.Tensor] | None  # gate_proj / up_proj / down_proj .weight
    window: int | None  # sliding attention window, None: full attention


@dataclass
class Source:
    config: object  # the source's PretrainedConfig
    layers: list[Layer]
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor | None  # None: tied to the embedding
    dtype: torch.dtype
    problems: list[Problem]  # problems every format has (a layer none can hold)


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.detach().ne(0).any())


def _read_moe(name: str, moe: MoE, hidden_act: str) -> MoELayer:
    """The layer's experts and router, and what of it no Hugging Face MoE format holds."""
    problems: list[Problem] = []
    keep = f"re-convert it with {{}}, or {_KEEP}"
    if not moe.gated:
        problems.append(Problem(
            f"{name} has non-gated experts (these formats hold gated GLU experts only)",
            f"convert a gated (SwiGLU) model, or {_KEEP}"))
    if moe.activation_fn is not None or get_activation(moe.activation).name != hidden_act:
        problems.append(Problem(
            f"{name}: its experts use activation {moe.activation!r} but the model's "
            f"hidden_act is {hidden_act!r} (one activation serves every FFN in these formats)",
            _KEEP))
    if moe.capacity_factor is not None:
        problems.append(Problem(
            f"{name} drops tokens over capacity (capacity_factor={moe.capacity_factor}); "
            "these formats are dropless", keep.format("capacity_factor=None")))
    kind = moe.router_type
    if kind == "topp" and moe.top_k == 1:
        kind = "softmax"  # the first expert always passes: weight 1, as top-1 softmax
    if kind == "noisy":
        kind = "softmax"  # its noise is training-only: in eval it is the softmax router
    if kind not in ("softmax", "sigmoid"):
        problems.append(Problem(
            f"{name} routes with router={moe.router_type!r}, which no Hugging Face MoE format "
            "computes", keep.format("router='softmax' or router='sigmoid'")))
    if moe.combine == "sum" and moe.top_k > 1:
        problems.append(Problem(
            f"{name} adds its {moe.top_k} selected experts unweighted (a split with top_k > 1); "
            "these formats weight experts by renormalised router scores",
            keep.format("top_k=1 (a weight of 1 is what every format computes)")))
    if _nonzero(moe.router.bias):
        problems.append(Problem(
            f"{name}'s router has a bias (a router fitted on calibration data), which no "
            "Hugging Face MoE router holds (their routers are bias-free linear maps)",
            keep.format("router_init='similarity' or 'representative'")))
    biases = {"b_in": moe.b_in, "b_gate": moe.b_gate, "b_out": moe.b_out,
              "shared.bias": moe.shared.bias}
    ffn = moe.shared.ffn
    if ffn is not None:
        biases.update({f"shared.ffn.{n}.bias": getattr(ffn, n).bias
                       for n in ("fc_in", "fc_gate", "fc_out") if getattr(ffn, n) is not None})
    comp = moe.shared.compensation
    if comp is not None and moe.shared.use_compensation and any(
            _nonzero(p) for p in comp.parameters()):
        biases["shared.compensation"] = comp[1].weight
    if any(_nonzero(b) for b in biases.values()):
        which = ", ".join(n for n, b in biases.items() if _nonzero(b))
        problems.append(Problem(
            f"{name} has non-zero {which} (expert / shared biases or linear compensation), "
            "which no Hugging Face MoE format holds",
            keep.format("compensate=False on a bias-free model")))
    shared = None
    if ffn is not None and ffn.fc_gate is not None:
        shared = (ffn.fc_gate.weight.detach(), ffn.fc_in.weight.detach(),
                  ffn.fc_out.weight.detach())
    gate = moe.w_gate.detach() if moe.w_gate is not None else moe.w_in.detach()
    bias = getattr(moe, "selection_bias", None) if kind == "sigmoid" else None
    return MoELayer(gate, moe.w_in.detach(), moe.w_out.detach(), moe.router.weight.detach(),
                    kind, None if bias is None else bias.detach(), shared, moe.top_k, problems)


def _windows(config) -> list[int | None]:
    """Each layer's sliding attention window (None: full attention), as the source computes it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return [window] * n
    if config.model_type == "qwen2":
        types = getattr(config, "layer_types", None) or ["full_attention"] * n
        return [window if t == "sliding_attention" else None for t in types]
    return [None] * n


def read_source(model: nn.Module, tf) -> Source:
    """Check that ``model`` is a converted LLaMA / Mistral / Qwen2 causal LM and read it
    (``tf``: the transformers module).

    >>> import transformers
    >>> from moefy import MoEConfig, convert
    >>> llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> moe = convert(llama, MoEConfig(method="upcycle", num_experts=4, top_k=2))
    >>> src = read_source(moe, transformers)
    >>> [layer.moe.num_experts for layer in src.layers], check_architecture(src, "mixtral")
    ([4, 4], [])
    >>> "softmax" in str(refusal(src, "glm4_moe", check_architecture(src, "glm4_moe")))
    True
    """
    kind = type(model).__name__
    config = getattr(model, "config", None)
    if not isinstance(model, tf.PreTrainedModel) or not kind.endswith("ForCausalLM") or (
            getattr(config, "model_type", None) not in SOURCES):
        model_type = getattr(config, "model_type", None)
        got = kind if model_type is None else f"{kind} (model_type {model_type!r})"
        raise HFExportError(
            f"export_hf writes Hugging Face LLaMA / Mistral / Qwen2 *ForCausalLM models "
            f"(model_type one of {', '.join(SOURCES)}) converted by moefy.convert; got {got}. "
            f"{_KEEP}")
    decoder = model.model
    paths = {name for name, m in model.named_modules() if isinstance(m, (MoE, PEER))}
    peers = sorted(name for name, m in model.named_modules() if isinstance(m, PEER))
    if peers:
        raise HFExportError(f"{peers[0]} is a PEER layer (single-neuron experts retrieved by "
                            f"product keys), which no Hugging Face MoE format holds: {_KEEP}")
    if not paths:
        raise HFExportError(f"the {kind} has no moefy MoE layers: convert it first "
                            "(moefy.convert with method 'upcycle' or 'split'); a dense model "
                            "needs no MoE export (model.save_pretrained writes it), and "
                            "moefy.save / moefy.export_onnx take any model")
    expected = {f"model.layers.{i}.mlp" for i in range(len(decoder.layers))}
    stray = sorted(paths - expected)
    if stray:
        raise HFExportError(f"{stray[0]} is an MoE outside a decoder layer's mlp: the formats "
                            f"hold MoE FFNs at model.layers.N.mlp only. {_KEEP}")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise HFExportError(f"the model mixes parameter dtypes {sorted(map(str, dtypes))}: a "
                            "checkpoint has one dtype; cast the model first (model.to(dtype))")
    hidden_act = get_activation(config.hidden_act).name
    windows = _windows(config)
    problems: list[Problem] = []
    layers = []
    for i, block in enumerate(decoder.layers):
        attn = block.self_attn
        tensors = {}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(attn, proj)
            tensors[f"{proj}.weight"] = lin.weight.detach()
            if _nonzero(lin.bias):
                tensors[f"{proj}.bias"] = lin.bias.detach()
        norms = {f"{n}.weight": getattr(block, n).weight.detach()
                 for n in ("input_layernorm", "post_attention_layernorm")}
        mlp = block.mlp
        name = f"model.layers.{i}.mlp"
        if isinstance(mlp, MoE):
            layers.append(Layer(i, tensors, norms, _read_moe(name, mlp, hidden_act), None,
                                windows[i]))
            continue
        projs = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in projs):
            raise HFExportError(f"{name} is a {type(mlp).__name__}: neither a moefy.MoE nor the "
                                f"model's dense MLP. {_KEEP}")
        if any(_nonzero(p.bias) for p in projs):
            problems.append(Problem(f"{name} (left dense) has non-zero MLP biases", _KEEP))
        dense = {f"{n}.weight": p.weight.detach()
                 for n, p in zip(("gate_proj", "up_proj", "down_proj"), projs, strict=True)}
        layers.append(Layer(i, tensors, norms, None, dense, windows[i]))
    embed = decoder.embed_tokens.weight.detach()
    head = model.lm_head.weight.detach()
    tied = bool(getattr(config, "tie_word_embeddings", False)) and (
        head.data_ptr() == embed.data_ptr() or torch.equal(head, embed))
    if model.lm_head.bias is not None and _nonzero(model.lm_head.bias):
        problems.append(Problem("lm_head has a non-zero bias", _KEEP))
    return Source(config, layers, embed, decoder.norm.weight.detach(), None if tied else head,
                  dtypes.pop(), problems)


def check_architecture(src: Source, arch: str) -> list[Problem]:
    """What of ``src`` the format ``arch`` cannot hold exactly (empty: it holds all of it)."""
    problems = list(src.problems)
    moes = [layer.moe for layer in src.layers if layer.moe is not None]
    for moe in moes:
        problems += moe.problems
    shapes = {(m.num_experts, m.top_k, m.router_kind) for m in moes}
    if len(shapes) > 1:
        problems.append(Problem(
            f"the MoE layers differ in (experts, top_k, router) {sorted(shapes)}; these formats "
            "hold one setting for all layers", f"re-convert with one setting, or {_KEEP}"))
    routers = {m.router_kind for m in moes}
    if arch in _SOFTMAX_ROUTED and "sigmoid" in routers:
        problems.append(Problem(
            f"{arch} routes by softmax; this model has a sigmoid router (DeepSeek-V3 style, "
            "σ scores with a selection bias)", "re-convert with router='softmax'"))
    if arch in _SIGMOID_ROUTED and "softmax" in routers:
        problems.append(Problem(
            f"{arch} routes by σ scores (DeepSeek-V3 style); this model routes by softmax",
            "re-convert with router='sigmoid'"))
    if arch in _SIGMOID_ROUTED and any(m.num_experts < 2 for m in moes):
        problems.append(Problem(f"{arch}'s group routing needs at least 2 experts",
                                "re-convert with num_experts >= 2"))
    dense = [layer.index for layer in src.layers if layer.moe is None]
    if arch == "mixtral" and dense:
        problems.append(Problem(
            f"Mixtral makes every layer an MoE; layers {dense} are dense",
            "convert every layer (no keep_first / keep_last / only / skip)"))
    if arch in _SIGMOID_ROUTED and dense != list(range(len(dense))):
        problems.append(Problem(
            f"{arch} holds dense layers only as a prefix (first_k_dense_replace); layers "
            f"{dense} are dense", "convert every layer after the dense prefix"))
    qkv_bias = any(f"{p}.bias" in layer.attention for layer in src.layers
                   for p in ("q_proj", "k_proj", "v_proj"))
    if any("o_proj.bias" in layer.attention for layer in src.layers):
        problems.append(Problem(f"{arch}'s attention has no output-projection bias; this "
                                "model's o_proj bias is non-zero", _KEEP))
    if arch == "mixtral" and qkv_bias:
        problems.append(Problem("Mixtral's attention has no q/k/v biases; this model's are "
                                "non-zero (Qwen2)", _KEEP))
    windows = {layer.window for layer in src.layers}
    if arch == "mixtral" and len(windows) > 1:
        problems.append(Problem("Mixtral applies one sliding window to every layer or none; "
                                f"this model's layers differ ({sorted(windows, key=str)})", _KEEP))
    if arch in _SIGMOID_ROUTED and windows != {None}:
        problems.append(Problem(f"{arch} has no sliding-window attention; this model slides "
                                f"(window {max(w for w in windows if w is not None)})",
                                "re-convert with router='softmax' and export to qwen2_moe"))
    if arch == "deepseek_v3":
        problems.append(Problem(
            "DeepSeek-V3 uses multi-head latent attention: keys and values come from an "
            "RMS-normalised latent (kv_a_layernorm) with one RoPE key shared by all heads, "
            f"which cannot equal {src.config.model_type}'s attention", _KEEP))
    return problems


def refusal(src: Source, arch: str, problems: list[Problem]) -> HFExportError:
    """The error for ``problems`` (``check_architecture(src, arch)``, not empty): the first few,
    and the formats that hold ``src`` or, when none does, what to change (see ``read_source``)."""
    others = [a for a in ARCHITECTURES if a != arch and not check_architecture(src, a)]
    head = f"cannot export to {arch} exactly: " + "; ".join(p.what for p in problems[:3])
    if len(problems) > 3:
        head += f" (and {len(problems) - 3} more)"
    if others:
        return HFExportError(f"{head}. {' and '.join(others)} can hold this model: "
                             f"moefy.export_hf(model, directory, architecture={others[0]!r})")
    fixes = list(dict.fromkeys(p.fix for p in problems[:3] if p.fix))
    return HFExportError(f"{head}. No Hugging Face MoE format holds it: "
                         f"{'; '.join(fixes) or _KEEP}")
