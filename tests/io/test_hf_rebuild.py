"""A Hugging Face model rebuilt from the saved config.json alone (its attention as it ran),
and a fresh model of another config refused before anything changes."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moefy
from moefy.errors import LoadError
from moefy.io.hf_rebuild import hf_config
from tests.io.models import LLAMA, convert, snapshot, token_ids, untouched


def test_a_fresh_model_of_another_config_with_the_same_shapes(saved):
    fresh = LlamaForCausalLM(LlamaConfig(**{**LLAMA.to_dict(), "rope_theta": 100.0,
                                            "rms_norm_eps": 0.1}))
    before = snapshot(fresh)
    with pytest.raises(LoadError, match="another config than the saved one.*rms_norm_eps"):
        moefy.load(saved, fresh)
    assert untouched(fresh, before)


def test_eager_attention_stays_eager(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LLAMA, attn_implementation="eager").eval()
    model = convert(moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2), model=model)
    ids = token_ids()
    moefy.save(model, tmp_path)
    back = moefy.load(tmp_path)
    assert back.config._attn_implementation == "eager"
    assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


def test_the_saved_config_leaves_out_what_only_the_source_format_had():
    model = LlamaForCausalLM(LLAMA)
    model.config.quantization_config = {"quant_method": "gguf"}
    config = hf_config(model)
    assert not hasattr(config, "quantization_config")
    assert model.config.quantization_config == {"quant_method": "gguf"}  # a copy was changed
    assert hf_config(torch.nn.Linear(2, 2)) is None
