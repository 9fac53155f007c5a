"""The Hugging Face side of a moefy checkpoint: the model's config as saved (without what only
the source format had), a model rebuilt from the saved ``config.json`` alone (no weights
initialised: every one comes from the file), and the check that a fresh model given to
``moefy.load`` was built with the saved config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch.nn as nn

from moefy.errors import LoadError, MissingDependencyError, first_line

# config entries that say how a model was loaded or run, not what it computes
_CONFIG_VOLATILE = {"transformers_version", "_name_or_path", "architectures", "dtype",
                    "torch_dtype", "quantization_config", "use_cache", "output_attentions",
                    "output_hidden_states", "return_dict", "attn_implementation"}


def hf_config(model: nn.Module):
    """A copy of the model's Hugging Face config without what only the source format had
    (a GGUF file's quantization_config), or None when it has none (or transformers is not
    installed).

    >>> import torch.nn as nn
    >>> hf_config(nn.Linear(2, 2)) is None
    True
    """
    config = getattr(model, "config", None)
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return None
    if not isinstance(config, PretrainedConfig):
        return None
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def attention_implementation(model: nn.Module) -> str | None:
    """How the model's attention runs (not in config.json; eager and sdpa differ in the last
    bits), or None."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def build_hf_model(directory: Path, base: dict) -> nn.Module:
    """A model of the plan's ``base`` class built from ``directory``'s config.json (and
    generation_config.json), its weights left uninitialised; ``LoadError`` when the class
    or the files do not fit."""
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


def check_config(directory: Path, model: nn.Module) -> None:
    """A fresh Hugging Face model must have the saved config (tensor shapes alone miss e.g.
    another number of heads, RoPE base or norm epsilon); else ``LoadError`` naming the
    first differences."""
    config = hf_config(model)
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
