"""Tiny models for the checkpoint tests, built in code with fixed seeds (nothing downloaded):
a LLaMA config, its conversions by every method, a non-Hugging Face model whose MoEs get
wrapped, and a model with one layer at two paths."""

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import moefy
from moefy.layers.neuron import NeuronFFN, SparseLinear

LLAMA = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def token_ids(batch=2, length=9, vocab=96):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def calibration(n=4, vocab=96):
    g = torch.Generator().manual_seed(2)
    return [{"input_ids": torch.randint(0, vocab, (4, 16), generator=g),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(n)]


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LLAMA).eval()


def convert(config, data=None, model=None):
    example = token_ids()
    inputs = None if data is not None else {"input_ids": example,
                                            "attention_mask": torch.ones_like(example)}
    return moefy.convert(model or llama(), config, example_inputs=inputs, calibration_data=data)


CONVERSIONS = {
    "split-calibrated": lambda: convert(moefy.MoEConfig(
        method="split", num_experts=3, top_k=2, shared_experts=1, fit_steps=3), calibration()),
    "upcycle-sigmoid": lambda: convert(moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2,
                                                       router="sigmoid")),
    "upcycle-granular": lambda: convert(moefy.MoEConfig(method="upcycle", num_experts=4,
                                                        top_k=2, granularity=2)),
    "peer": lambda: convert(moefy.MoEConfig(method="peer", top_k=4, peer_heads=2,
                                            peer_fit_steps=20),
                            calibration()),
    "hash": lambda: convert(moefy.MoEConfig(method="upcycle", num_experts=4, top_k=1,
                                            router="hash")),
}


class ConvFFN(nn.Module):
    """A 1x1-convolution FFN with a trailing dropout: the MoE gets wrapped (channels last,
    dropout kept)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.ffn = nn.Sequential(nn.Conv2d(16, 64, 1), nn.GELU(), nn.Conv2d(64, 16, 1))
        self.mlp = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 16), nn.Dropout(0.1))

    def forward(self, x):
        h = self.stem(x)
        h = h + self.ffn(h)
        # per position, then pooled (an MLP on the pooled vector would be no token FFN)
        return self.mlp(h.flatten(2).transpose(1, 2)).mean(1)  # (B, HW, C) -> (B, C)


class TabularMLP(nn.Module):
    """A tabular MLP: a residual block 16 → 64 → 16, then a head 16 → 64 → 3 classes (an FFN
    whose output width differs from its input: a MoE with output_size=3)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        self.head = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x):
        return self.head(x + self.block(x))


class TwoPaths(nn.Module):
    """One FFN module registered at two paths (``a is b``) and run at both, as models that
    share a block's weights across layers do."""

    def __init__(self, shared: bool = True):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
        self.b = self.a if shared else nn.Sequential(nn.Linear(8, 32), nn.ReLU(),
                                                     nn.Linear(32, 8))

    def forward(self, x):
        return self.b(x + self.a(x))


def untouched(model: nn.Module, state: dict) -> bool:
    """``model`` holds exactly ``state`` and no moefy layer: a refused load changed nothing."""
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state) \
        and not any(isinstance(m, (moefy.MoE, moefy.PEER, NeuronFFN, SparseLinear))
                    for m in model.modules())


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}
