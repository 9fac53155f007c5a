"""Tiny models for conversion tests: Hugging Face configs with random weights, and hand-written
modules. Nothing is downloaded."""

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as tf

TINY = dict(num_hidden_layers=2, num_attention_heads=2)


def hf_configs():
    """name -> (config, model class, expected number of FFNs)."""
    return {
        "bert": (tf.BertConfig(vocab_size=99, hidden_size=32, intermediate_size=64, **TINY),
                 tf.BertModel, 2),
        "roberta": (tf.RobertaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                     **TINY), tf.RobertaModel, 2),
        "gpt2": (tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64),
                 tf.GPT2Model, 2),
        "llama": (tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                 num_key_value_heads=2, **TINY), tf.LlamaModel, 2),
        "mistral": (tf.MistralConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                     num_key_value_heads=2, **TINY), tf.MistralModel, 2),
        "qwen2": (tf.Qwen2Config(vocab_size=99, hidden_size=32, intermediate_size=64,
                                 num_key_value_heads=2, **TINY), tf.Qwen2Model, 2),
        "gemma": (tf.GemmaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                 num_key_value_heads=2, head_dim=16, **TINY), tf.GemmaModel, 2),
        "phi3": (tf.Phi3Config(vocab_size=99, hidden_size=32, intermediate_size=64,
                               num_key_value_heads=2, pad_token_id=0, **TINY), tf.Phi3Model, 2),
        "opt": (tf.OPTConfig(vocab_size=99, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32,
                             num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=64), tf.OPTModel, 2),
        "gpt_neox": (tf.GPTNeoXConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                      **TINY), tf.GPTNeoXModel, 2),
        "t5_encoder": (tf.T5Config(vocab_size=99, d_model=32, d_ff=64, d_kv=16, num_layers=2,
                                   num_heads=2), tf.T5EncoderModel, 2),
        "vit": (tf.ViTConfig(hidden_size=32, intermediate_size=64, image_size=32, patch_size=8,
                             **TINY), tf.ViTModel, 2),
    }


class NanoMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    """nanoGPT-style block: pre-norm attention (simplified) + MLP."""

    def __init__(self, d=32):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.mlp = NanoMLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, d=32, layers=3):
        super().__init__()
        self.blocks = nn.ModuleList(NanoBlock(d) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class RawFFN(nn.Module):
    """An FFN written with F.linear on raw parameters, inside a block with a residual."""

    def __init__(self, d=32, f=96):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(f, d) * d**-0.5)
        self.b1 = nn.Parameter(torch.zeros(f))
        self.w2 = nn.Parameter(torch.randn(d, f) * f**-0.5)

    def forward(self, x):
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2)


class RawModel(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ffn1, self.ffn2 = RawFFN(d), RawFFN(d)

    def forward(self, x):
        x = x + self.ffn1(self.norm(x))
        return x + self.ffn2(x)


def sequential():
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32), nn.LayerNorm(32),
                         nn.Linear(32, 64), nn.SiLU(), nn.Dropout(0.0), nn.Linear(64, 32))


def custom_models():
    """name -> (model, example inputs, expected FFNs)."""
    x = torch.randn(2, 5, 32)
    return {
        "sequential": (sequential(), (x,), 2),
        "nanogpt": (NanoGPT(), (x,), 3),
        "raw_f_linear": (RawModel(), (x,), 2),
        "transformer_encoder": (transformer_encoder(), (x,), 2),
        "sliced_glu": (SlicedGLU(), (x,), 1),
    }


def transformer_encoder():
    """FFN inline in nn.TransformerEncoderLayer.forward: F.relu between two linears."""
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


class SlicedGLU(nn.Module):
    """Fused gate/up projection split by slicing, up half first."""

    def __init__(self, d=32, f=48):
        super().__init__()
        self.f = f
        self.wi = nn.Linear(d, 2 * f, bias=False)
        self.wo = nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.wi(x)
        return x + self.wo(h[..., : self.f] * F.gelu(h[..., self.f:]))
