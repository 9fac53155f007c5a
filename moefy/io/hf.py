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
from pathlib import Path

import torch
import torch.nn as nn

from moefy.errors import HFExportError, MissingDependencyError, first_line
from moefy.io.hf_source import (
    ARCHITECTURES,
    MoELayer,
    Source,
    check_architecture,
    read_source,
    refusal,
)
from moefy.layers.shard import refuse_sharded

_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
            "deepseek_v3": "DeepseekV3ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
# files of another checkpoint that transformers would read instead of (or besides) ours
_FOREIGN_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "moefy.json", "moefy.safetensors")


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "export_hf needs transformers: pip install 'moefy[hf]'") from exc
    return transformers


def _pad(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """``t`` with zero neurons appended along ``dim`` up to ``size``: a zero gate/up row and a
    zero down column add act(0) · 0 = 0, exactly."""
    extra = size - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _experts(moe: MoELayer, fold_shared: bool) -> tuple[torch.Tensor, ...]:
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


def _config_kwargs(src: Source, arch: str, expert_size: int, shared_size: int) -> dict:
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


def _tensors(src: Source, arch: str) -> tuple[dict[str, torch.Tensor], int, int]:
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
    src = read_source(model, tf)
    problems = check_architecture(src, architecture)
    if problems:
        raise refusal(src, architecture, problems)
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


def _verify(model: nn.Module, path: Path, src: Source, tf) -> str:
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
