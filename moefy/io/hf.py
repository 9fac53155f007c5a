"""``moefy.export_hf``: a converted LLaMA / Mistral / Qwen2 model as a Hugging Face MoE checkpoint.

    *ForCausalLM with moefy.MoE FFNs  ⇒  config.json + model.safetensors (per-expert tensors named
    as the format's original checkpoints) + generation_config.json (+ tokenizer files)

Only what the target format computes exactly is written; everything is checked before a file is
written. What each format holds:

- mixtral: softmax top-k renormalised over the k (moefy "softmax" / "noisy" in eval), every layer
  an MoE, attention without biases, one sliding window for all layers or none. Shared experts
  fold into every routed expert (their neurons appended): the routing weights sum to 1, so
  Σ_j w_j (f_j + s) = Σ_j w_j f_j + s.
- qwen2_moe: as mixtral, plus q/k/v biases, per-layer sliding windows, dense layers
  (``mlp_only_layers``) and a shared expert, which it gates by σ(w·x): written with w = 0 and
  its output projection doubled, σ(0) · 2 = 1 exactly.
- glm4_moe: DeepSeek-V3's router (σ scores, selection bias ``e_score_correction_bias``,
  renormalised, n_group = topk_group = 1, routed_scaling_factor = 1) with standard GQA
  attention (q/k/v biases, no qk-norm, partial_rotary_factor 1), a dense prefix
  (``first_k_dense_replace``) and ungated shared experts (zero neurons pad them to a multiple
  of the expert width: act(0) · 0 = 0).
- deepseek_v3: the same router, but multi-head latent attention: keys and values come from an
  RMS-normalised latent (``kv_a_layernorm``) with one RoPE key shared by all heads, which no
  LLaMA-family attention equals. It is refused for every source, naming glm4_moe.

Expert widths that differ between layers are padded with zero neurons to the widest (exact).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from moefy.activations import get_activation
from moefy.errors import HFExportError, MissingDependencyError, first_line
from moefy.layers.moe import MoE
from moefy.layers.peer import PEER
from moefy.layers.shard import refuse_sharded

ARCHITECTURES = ("mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe")
SOURCES = ("llama", "mistral", "qwen2")  # config.model_type of the models export_hf reads
_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
_SOFTMAX_ROUTED = ("mixtral", "qwen2_moe")
_SIGMOID_ROUTED = ("deepseek_v3", "glm4_moe")
_KEEP = "moefy.save (and moefy.load) or moefy.export_onnx keep the model as it is"
# files of another checkpoint that transformers would read instead of (or besides) ours
_FOREIGN_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "moefy.json", "moefy.safetensors")


@dataclass
class _Problem:
    """Something a format cannot hold: ``what`` (for the message) and ``fix`` (what to change
    when no format holds it)."""

    what: str
    fix: str = ""


@dataclass
class _MoELayer:
    """One MoE layer as the formats store it (nn.Linear layout, in the model's dtype)."""

    gate: torch.Tensor  # (E, I, H)
    up: torch.Tensor  # (E, I, H)
    down: torch.Tensor  # (E, H, I)
    router: torch.Tensor  # (E, H)
    router_kind: str  # "softmax" (softmax over the top-k logits) | "sigmoid"
    selection_bias: torch.Tensor | None  # (E,), sigmoid router
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # gate, up (S, H); down (H, S)
    top_k: int
    problems: list[_Problem] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]


@dataclass
class _Layer:
    index: int
    attention: dict[str, torch.Tensor]  # q/k/v/o_proj.weight and .bias (non-zero biases only)
    norms: dict[str, torch.Tensor]  # input_layernorm.weight, post_attention_layernorm.weight
    moe: _MoELayer | None  # None: left dense
    dense: dict[str, torch.Tensor] | None  # gate_proj / up_proj / down_proj .weight
    window: int | None  # sliding attention window, None: full attention


@dataclass
class _Source:
    config: object  # the source's PretrainedConfig
    layers: list[_Layer]
    embed: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor | None  # None: tied to the embedding
    dtype: torch.dtype
    problems: list[_Problem]  # problems every format has (a layer none can hold)


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "export_hf needs transformers: pip install 'moefy[hf]'") from exc
    return transformers


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.detach().ne(0).any())


def _read_moe(name: str, moe: MoE, hidden_act: str) -> _MoELayer:
    """The layer's experts and router, and what of it no Hugging Face MoE format holds."""
    problems: list[_Problem] = []
    keep = f"re-convert it with {{}}, or {_KEEP}"
    if not moe.gated:
        problems.append(_Problem(
            f"{name} has non-gated experts (these formats hold gated GLU experts only)",
            f"convert a gated (SwiGLU) model, or {_KEEP}"))
    if moe.activation_fn is not None or get_activation(moe.activation).name != hidden_act:
        problems.append(_Problem(
            f"{name}: its experts use activation {moe.activation!r} but the model's "
            f"hidden_act is {hidden_act!r} (one activation serves every FFN in these formats)",
            _KEEP))
    if moe.capacity_factor is not None:
        problems.append(_Problem(
            f"{name} drops tokens over capacity (capacity_factor={moe.capacity_factor}); "
            "these formats are dropless", keep.format("capacity_factor=None")))
    kind = moe.router_type
    if kind == "topp" and moe.top_k == 1:
        kind = "softmax"  # the first expert always passes: weight 1, as top-1 softmax
    if kind == "noisy":
        kind = "softmax"  # its noise is training-only: in eval it is the softmax router
    if kind not in ("softmax", "sigmoid"):
        problems.append(_Problem(
            f"{name} routes with router={moe.router_type!r}, which no Hugging Face MoE format "
            "computes", keep.format("router='softmax' or router='sigmoid'")))
    if moe.combine == "sum" and moe.top_k > 1:
        problems.append(_Problem(
            f"{name} adds its {moe.top_k} selected experts unweighted (a split with top_k > 1); "
            "these formats weight experts by renormalised router scores",
            keep.format("top_k=1 (a weight of 1 is what every format computes)")))
    if _nonzero(moe.router.bias):
        problems.append(_Problem(
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
        problems.append(_Problem(
            f"{name} has non-zero {which} (expert / shared biases or linear compensation), "
            "which no Hugging Face MoE format holds",
            keep.format("compensate=False on a bias-free model")))
    shared = None
    if ffn is not None and ffn.fc_gate is not None:
        shared = (ffn.fc_gate.weight.detach(), ffn.fc_in.weight.detach(),
                  ffn.fc_out.weight.detach())
    gate = moe.w_gate.detach() if moe.w_gate is not None else moe.w_in.detach()
    bias = getattr(moe, "selection_bias", None) if kind == "sigmoid" else None
    return _MoELayer(gate, moe.w_in.detach(), moe.w_out.detach(), moe.router.weight.detach(),
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


def _read_source(model: nn.Module, tf) -> _Source:
    """Check that ``model`` is a converted LLaMA / Mistral / Qwen2 causal LM and read it."""
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
    problems: list[_Problem] = []
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
            layers.append(_Layer(i, tensors, norms, _read_moe(name, mlp, hidden_act), None,
                                 windows[i]))
            continue
        projs = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(p, nn.Linear) for p in projs):
            raise HFExportError(f"{name} is a {type(mlp).__name__}: neither a moefy.MoE nor the "
                                f"model's dense MLP. {_KEEP}")
        if any(_nonzero(p.bias) for p in projs):
            problems.append(_Problem(f"{name} (left dense) has non-zero MLP biases", _KEEP))
        dense = {f"{n}.weight": p.weight.detach()
                 for n, p in zip(("gate_proj", "up_proj", "down_proj"), projs, strict=True)}
        layers.append(_Layer(i, tensors, norms, None, dense, windows[i]))
    embed = decoder.embed_tokens.weight.detach()
    head = model.lm_head.weight.detach()
    tied = bool(getattr(config, "tie_word_embeddings", False)) and (
        head.data_ptr() == embed.data_ptr() or torch.equal(head, embed))
    if model.lm_head.bias is not None and _nonzero(model.lm_head.bias):
        problems.append(_Problem("lm_head has a non-zero bias", _KEEP))
    return _Source(config, layers, embed, decoder.norm.weight.detach(), None if tied else head,
                   dtypes.pop(), problems)


def _check(src: _Source, arch: str) -> list[_Problem]:
    """What of ``src`` the format ``arch`` cannot hold exactly (empty: it holds all of it)."""
    problems = list(src.problems)
    moes = [layer.moe for layer in src.layers if layer.moe is not None]
    for moe in moes:
        problems += moe.problems
    shapes = {(m.num_experts, m.top_k, m.router_kind) for m in moes}
    if len(shapes) > 1:
        problems.append(_Problem(
            f"the MoE layers differ in (experts, top_k, router) {sorted(shapes)}; these formats "
            "hold one setting for all layers", f"re-convert with one setting, or {_KEEP}"))
    routers = {m.router_kind for m in moes}
    if arch in _SOFTMAX_ROUTED and "sigmoid" in routers:
        problems.append(_Problem(
            f"{arch} routes by softmax; this model has a sigmoid router (DeepSeek-V3 style, "
            "σ scores with a selection bias)", "re-convert with router='softmax'"))
    if arch in _SIGMOID_ROUTED and "softmax" in routers:
        problems.append(_Problem(
            f"{arch} routes by σ scores (DeepSeek-V3 style); this model routes by softmax",
            "re-convert with router='sigmoid'"))
    if arch in _SIGMOID_ROUTED and any(m.num_experts < 2 for m in moes):
        problems.append(_Problem(f"{arch}'s group routing needs at least 2 experts",
                                 "re-convert with num_experts >= 2"))
    dense = [layer.index for layer in src.layers if layer.moe is None]
    if arch == "mixtral" and dense:
        problems.append(_Problem(
            f"Mixtral makes every layer an MoE; layers {dense} are dense",
            "convert every layer (no keep_first / keep_last / only / skip)"))
    if arch in _SIGMOID_ROUTED and dense != list(range(len(dense))):
        problems.append(_Problem(
            f"{arch} holds dense layers only as a prefix (first_k_dense_replace); layers "
            f"{dense} are dense", "convert every layer after the dense prefix"))
    qkv_bias = any(f"{p}.bias" in layer.attention for layer in src.layers
                   for p in ("q_proj", "k_proj", "v_proj"))
    if any("o_proj.bias" in layer.attention for layer in src.layers):
        problems.append(_Problem(f"{arch}'s attention has no output-projection bias; this "
                                 "model's o_proj bias is non-zero", _KEEP))
    if arch == "mixtral" and qkv_bias:
        problems.append(_Problem("Mixtral's attention has no q/k/v biases; this model's are "
                                 "non-zero (Qwen2)", _KEEP))
    windows = {layer.window for layer in src.layers}
    if arch == "mixtral" and len(windows) > 1:
        problems.append(_Problem("Mixtral applies one sliding window to every layer or none; "
                                 f"this model's layers differ ({sorted(windows, key=str)})", _KEEP))
    if arch in _SIGMOID_ROUTED and windows != {None}:
        problems.append(_Problem(f"{arch} has no sliding-window attention; this model slides "
                                 f"(window {max(w for w in windows if w is not None)})",
                                 "re-convert with router='softmax' and export to qwen2_moe"))
    if arch == "deepseek_v3":
        problems.append(_Problem(
            "DeepSeek-V3 uses multi-head latent attention: keys and values come from an "
            "RMS-normalised latent (kv_a_layernorm) with one RoPE key shared by all heads, "
            f"which cannot equal {src.config.model_type}'s attention", _KEEP))
    return problems


def _refusal(src: _Source, arch: str, problems: list[_Problem]) -> HFExportError:
    others = [a for a in ARCHITECTURES if a != arch and not _check(src, a)]
    head = f"cannot export to {arch} exactly: " + "; ".join(p.what for p in problems[:3])
    if len(problems) > 3:
        head += f" (and {len(problems) - 3} more)"
    if others:
        return HFExportError(f"{head}. {' and '.join(others)} can hold this model: "
                             f"moefy.export_hf(model, directory, architecture={others[0]!r})")
    fixes = list(dict.fromkeys(p.fix for p in problems[:3] if p.fix))
    return HFExportError(f"{head}. No Hugging Face MoE format holds it: "
                         f"{'; '.join(fixes) or _KEEP}")


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` with zero neurons appended along ``dim`` up to ``size``: a zero gate/up row and a
    zero down column add act(0) · 0 = 0, exactly."""
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _experts(moe: _MoELayer, fold_shared: bool) -> tuple[torch.Tensor, ...]:
    """gate, up (E, I, H), down (E, H, I); with ``fold_shared`` the shared neurons appended to
    every expert (exact where the routing weights sum to 1)."""
    gate, up, down = moe.gate, moe.up, moe.down
    if fold_shared and moe.shared is not None:
        e = gate.shape[0]
        sg, su, sd = moe.shared
        gate = torch.cat([gate, sg.expand(e, -1, -1)], dim=1)
        up = torch.cat([up, su.expand(e, -1, -1)], dim=1)
        down = torch.cat([down, sd.expand(e, -1, -1)], dim=2)
    return gate, up, down


def _config_kwargs(src: _Source, arch: str, expert_size: int, shared_size: int) -> dict:
    c = src.config
    moes = [layer.moe for layer in src.layers if layer.moe is not None]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = dict(c.rope_parameters or {})
    kw = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        initializer_range=c.initializer_range, use_cache=c.use_cache,
        tie_word_embeddings=src.lm_head is None, rope_parameters=rope,
        attention_dropout=c.attention_dropout, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        num_experts_per_tok=moes[0].top_k)
    window = next((layer.window for layer in src.layers if layer.window), None)
    qkv_bias = any(f"{p}.bias" in layer.attention for layer in src.layers
                   for p in ("q_proj", "k_proj", "v_proj"))
    dense = [layer.index for layer in src.layers if layer.moe is None]
    if arch == "mixtral":
        kw.update(num_local_experts=moes[0].num_experts, sliding_window=window,
                  router_jitter_noise=0.0)
        kw["intermediate_size"] = expert_size
    elif arch == "qwen2_moe":
        kw.update(num_experts=moes[0].num_experts, moe_intermediate_size=expert_size,
                  shared_expert_intermediate_size=shared_size, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=dense, qkv_bias=qkv_bias,
                  use_sliding_window=window is not None, sliding_window=window,
                  max_window_layers=c.num_hidden_layers,
                  layer_types=["sliding_attention" if layer.window else "full_attention"
                               for layer in src.layers])
    else:  # glm4_moe (deepseek_v3 is refused before this)
        rope["partial_rotary_factor"] = 1.0
        kw.update(n_routed_experts=moes[0].num_experts, moe_intermediate_size=expert_size,
                  n_shared_experts=shared_size // expert_size, routed_scaling_factor=1.0,
                  n_group=1, topk_group=1, norm_topk_prob=True, first_k_dense_replace=len(dense),
                  use_qk_norm=False, attention_bias=qkv_bias, num_nextn_predict_layers=0)
    unk = getattr(c, "unk_token_id", None)
    if unk is not None:
        kw["unk_token_id"] = unk
    return kw


def _tensors(src: _Source, arch: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Every tensor of the checkpoint under the format's original names, the routed expert width
    and the shared expert width."""
    moes = [layer.moe for layer in src.layers if layer.moe is not None]
    fold = arch == "mixtral"
    experts = {layer.index: _experts(layer.moe, fold) for layer in src.layers if layer.moe}
    width = max(g.shape[1] for g, _, _ in experts.values())
    shared = max((m.shared[0].shape[0] for m in moes if m.shared is not None), default=0)
    if arch == "glm4_moe":
        shared = math.ceil(shared / width) * width  # n_shared_experts whole experts
    out = {"model.embed_tokens.weight": src.embed, "model.norm.weight": src.norm}
    if src.lm_head is not None:
        out["lm_head.weight"] = src.lm_head
    moe_prefix = "block_sparse_moe" if arch == "mixtral" else "mlp"
    names = (("w1", "w3", "w2") if arch == "mixtral"
             else ("gate_proj", "up_proj", "down_proj"))
    for layer in src.layers:
        p = f"model.layers.{layer.index}"
        out.update({f"{p}.self_attn.{k}": v for k, v in layer.attention.items()})
        out.update({f"{p}.{k}": v for k, v in layer.norms.items()})
        if layer.moe is None:
            out.update({f"{p}.mlp.{k}": v for k, v in layer.dense.items()})
            continue
        gate, up, down = experts[layer.index]
        gate, up, down = _pad(gate, width, 1), _pad(up, width, 1), _pad(down, width, 2)
        for e in range(gate.shape[0]):
            for n, t in zip(names, (gate[e], up[e], down[e]), strict=True):
                out[f"{p}.{moe_prefix}.experts.{e}.{n}.weight"] = t
        out[f"{p}.{moe_prefix}.gate.weight"] = layer.moe.router
        if arch == "glm4_moe":
            bias = layer.moe.selection_bias
            out[f"{p}.mlp.gate.e_score_correction_bias"] = (
                torch.zeros(layer.moe.num_experts) if bias is None else bias).float()
        if arch == "mixtral":
            continue
        h = src.config.hidden_size
        sg, su, sd = layer.moe.shared or (src.embed.new_zeros(0, h), src.embed.new_zeros(0, h),
                                          src.embed.new_zeros(h, 0))
        if arch == "qwen2_moe":
            # gated by σ(w·x): w = 0 gives exactly 1/2, so the doubled output is exact
            sd = sd * 2
            out[f"{p}.mlp.shared_expert_gate.weight"] = src.embed.new_zeros(1, h)
        key = "shared_expert" if arch == "qwen2_moe" else "shared_experts"
        out[f"{p}.mlp.{key}.gate_proj.weight"] = _pad(sg, shared, 0)
        out[f"{p}.mlp.{key}.up_proj.weight"] = _pad(su, shared, 0)
        out[f"{p}.mlp.{key}.down_proj.weight"] = _pad(sd, shared, 1)
    # safetensors stores each tensor on its own: no views of a shared storage, CPU, contiguous
    return ({k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()},
            width, shared)


def exported_architecture(folder: Path) -> str | None:
    """The architecture an earlier ``export_hf`` wrote into ``folder`` (its config.json's
    model_type, one of ``ARCHITECTURES``), or None: no such config.json, or another model's.

    >>> import tempfile
    >>> exported_architecture(Path(tempfile.mkdtemp())) is None
    True
    """
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get(
            "model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return model_type if model_type in ARCHITECTURES else None


def _check_directory(directory) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise HFExportError(f"directory must be a path (str or os.PathLike), got "
                            f"{type(directory).__name__}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise HFExportError(f"{path} is a file, not a directory: give a directory to write the "
                            "checkpoint into")
    if path.is_dir():
        foreign = sorted(p.name for p in path.iterdir()
                         if p.name in _FOREIGN_WEIGHTS or (
                             p.name.startswith("model-") and p.suffix == ".safetensors"))
        if foreign:
            raise HFExportError(f"{path} already holds another checkpoint's weights "
                                f"({', '.join(foreign)}), which transformers would load with "
                                "or instead of this one: use an empty directory")
        # what export_hf writes over: only an earlier export's, never e.g. the dense model's
        # own save_pretrained folder
        ours = [n for n in ("config.json", "model.safetensors") if (path / n).exists()]
        if ours and exported_architecture(path) is None:
            raise HFExportError(f"{path} already holds a model that export_hf did not write "
                                f"({', '.join(ours)}; perhaps the dense model's own "
                                "save_pretrained folder), which the export would overwrite: "
                                "give a new or empty directory")
    return path


def export_hf(model: nn.Module, directory, architecture: str = "mixtral", *, tokenizer=None,
              verify: bool = True) -> Path:
    """Write a converted LLaMA / Mistral / Qwen2 causal LM as a Hugging Face MoE checkpoint.

    Args:
        model: a ``*ForCausalLM`` (model_type llama, mistral or qwen2) converted by
            ``moefy.convert`` with method "upcycle" or "split".
        directory: where to write config.json, model.safetensors, generation_config.json and,
            with ``tokenizer``, the tokenizer files (created if missing).
        architecture: "mixtral", "qwen2_moe", "glm4_moe" or "deepseek_v3" (see this module's
            docstring for what each holds). What the format cannot hold exactly raises
            ``moefy.errors.HFExportError`` naming a format that can, before anything is written.
        tokenizer: saved with ``tokenizer.save_pretrained(directory)`` when given.
        verify: load the written checkpoint with transformers (offline) and check that it
            reports no missing or unexpected tensors and (float32 / float64) that its logits
            equal the model's in eval on a probe sequence; on failure the written files are
            removed and ``HFExportError`` is raised. It holds a second copy of the model in
            memory: pass False for models that do not fit twice.

    Returns the directory. ``transformers.AutoModelForCausalLM.from_pretrained(directory)``
    loads it and reproduces the model in eval mode (the routers' training-only noise and expert
    dropout are not part of a checkpoint).

    >>> import tempfile, transformers
    >>> from moefy import MoEConfig, convert
    >>> llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2))
    >>> moe = convert(llama, MoEConfig(method="upcycle", num_experts=4, top_k=2))
    >>> path = export_hf(moe, tempfile.mkdtemp(), "mixtral")  # tokenizer=... adds its files
    >>> type(transformers.AutoModelForCausalLM.from_pretrained(path)).__name__
    'MixtralForCausalLM'
    """
    tf = _transformers()
    if architecture not in ARCHITECTURES:
        raise HFExportError(f"architecture must be one of {', '.join(ARCHITECTURES)}; got "
                            f"{architecture!r}")
    if isinstance(model, nn.Module):
        refuse_sharded(model, "export_hf", HFExportError)
    path = _check_directory(directory)
    src = _read_source(model, tf)
    problems = _check(src, architecture)
    if problems:
        raise _refusal(src, architecture, problems)
    tensors, width, shared = _tensors(src, architecture)
    config = tf.AutoConfig.for_model(architecture,
                                     **_config_kwargs(src, architecture, width, shared))
    config.architectures = [_CLASSES[architecture]]
    config.dtype = src.dtype

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    written = [path / "config.json", path / "model.safetensors"]
    config.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(path)
        written.append(path / "generation_config.json")
    if tokenizer is not None:
        written += [Path(f) for f in tokenizer.save_pretrained(path)]
    if verify:
        failure = _verify(model, path, src, tf)
        if failure:
            for f in written:
                f.unlink(missing_ok=True)
            raise HFExportError(f"the {architecture} checkpoint written to {path} does not "
                                f"reproduce the model ({failure}); it was removed. This is a "
                                "moefy bug: please report it")
    return path


def _verify(model: nn.Module, path: Path, src: _Source, tf) -> str:
    """"" when transformers loads ``path`` completely and (float32 / float64) its logits equal
    ``model``'s on a probe sequence; else what went wrong."""
    try:
        with warnings.catch_warnings():  # a zero-width shared expert (qwen2_moe) is expected
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            loaded, info = tf.AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=src.dtype, output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as exc:  # e.g. experts it could not pack
        return f"transformers cannot load it: {first_line(exc)}"
    wrong = {k: sorted(v)[:4] for k, v in info.items() if v}
    if wrong:
        return f"transformers reports {json.dumps(wrong)}"
    if src.dtype not in (torch.float32, torch.float64):
        return ""  # half-precision kernels differ between implementations: keys only
    ids = torch.randint(src.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    device = src.embed.device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()
            got = loaded.eval()(input_ids=ids, use_cache=False).logits.float()
    finally:
        for m, mode in modes.items():
            m.training = mode
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
    return "" if err <= 1e-4 else f"logits differ by {err:.2e} of their largest value"
