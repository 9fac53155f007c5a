"""``moefy.evaluate``: perplexity against a per-token oracle, embeddings that ignore padding,
fidelity of a model to itself, decode perplexity against the full forward and by the calls it
makes, and bad batches refused with a typed, readable error."""

import math

import pytest
import torch
import torch.nn as nn

from moefy.errors import InputError
from moefy.evaluate import decode_perplexity, embeddings, fidelity, perplexity

VOCAB, WIDTH = 32, 8
OUTPUTS = ("tensor", "hugging-face")  # what the model returns: logits / states, or an output


class TinyLM(nn.Module):
    """Embedding → MLP → vocabulary head; returns a tensor or a Hugging Face-like output."""

    def __init__(self, output: str = "tensor"):
        super().__init__()
        self.output = output
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(),
                                 nn.Linear(4 * WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        states = self.embed(input_ids)
        states = states + self.mlp(states)  # (B, S, H)
        logits = self.head(states)  # (B, S, V)
        return logits if self.output == "tensor" else Output(logits)


class Output(tuple):
    """A Hugging Face-like output: ``.logits``, and the first field by index."""

    def __new__(cls, logits):
        out = super().__new__(cls, (logits,))
        out.logits = logits
        return out


def oracle_perplexity(model, batches) -> float:
    """One token at a time: exp of the mean of -log p(next token) over real next tokens."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            out = model(**b)
            logits = out if isinstance(out, torch.Tensor) else out.logits
            mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            for row in range(b["input_ids"].shape[0]):
                for t in range(b["input_ids"].shape[1] - 1):
                    if mask[row, t + 1]:
                        logp = torch.log_softmax(logits[row, t].double(), dim=-1)
                        nll -= float(logp[b["input_ids"][row, t + 1]])
                        count += 1
    return math.exp(nll / count)


def batches_with_padding() -> list[dict]:
    ids = torch.randint(0, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 3:] = 0
    return [{"input_ids": ids, "attention_mask": mask},
            {"input_ids": torch.randint(0, VOCAB, (2, 10))}]  # no mask: every token counts


@pytest.mark.parametrize("output", OUTPUTS)
def test_perplexity_equals_the_per_token_oracle(output):
    model, batches = TinyLM(output).eval(), batches_with_padding()
    assert perplexity(model, batches) == pytest.approx(oracle_perplexity(model, batches),
                                                       rel=1e-5)


def test_no_mask_counts_every_token():
    model, ids = TinyLM().eval(), torch.randint(0, VOCAB, (2, 7))
    assert perplexity(model, [{"input_ids": ids}]) == perplexity(
        model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])


def test_embeddings_ignore_padding_and_are_unit_length():
    class Encoder(nn.Module):  # states of each token alone: padding changes nothing else
        def __init__(self):
            super().__init__()
            self.states = nn.Embedding(VOCAB, WIDTH)

        def forward(self, input_ids, attention_mask=None):
            return (self.states(input_ids),)  # a tuple, as Hugging Face's outputs index

    model, ids = Encoder(), torch.randint(0, VOCAB, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    short = embeddings(model, [{"input_ids": ids}])
    long = embeddings(model, [{"input_ids": padded, "attention_mask": mask}])
    torch.testing.assert_close(short, long)
    torch.testing.assert_close(short.norm(dim=-1), torch.ones(1))


@pytest.mark.parametrize("output", OUTPUTS)
def test_a_model_is_faithful_to_itself(output):
    model, batches = TinyLM(output).eval(), batches_with_padding()
    causal = fidelity(model, model, iter(batches), causal=True)  # an iterator is read twice
    assert causal.ratio == 1.0 and causal.perplexity == perplexity(model, batches)
    encoder = fidelity(model, model, batches, causal=False)
    assert encoder.cosine.shape == (5,) and encoder.perplexity is None
    torch.testing.assert_close(encoder.cosine, torch.ones(5))


def test_a_different_model_is_less_faithful():
    model, other, batches = TinyLM().eval(), TinyLM().eval(), batches_with_padding()
    result = fidelity(other, model, batches, causal=True)
    assert result.ratio == pytest.approx(perplexity(other, batches) / perplexity(model, batches))
    assert float(fidelity(other, model, batches, causal=False).cosine.max()) < 0.999


def test_single_token_chunks_predict_nothing():
    model, held = TinyLM().eval(), [{"input_ids": torch.randint(0, VOCAB, (4, 1))}]
    result = fidelity(model, model, held, causal=True)
    assert result.perplexity is None and result.ratio is None
    with pytest.raises(InputError, match="no token to predict"):
        perplexity(model, held)


BAD_BATCHES = ([torch.zeros(2, 3, dtype=torch.long)], [{"ids": torch.zeros(2, 3)}], [])


@pytest.mark.parametrize("batches", BAD_BATCHES, ids=("tensor", "no input_ids", "empty"))
def test_bad_batches_are_refused_readably(batches):
    with pytest.raises(InputError, match="batch 0 is a|batches are empty"):
        embeddings(TinyLM(), batches)


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def scored_second_halves(model, batches, prefill=0.5) -> float:
    """The same tokens scored from one full forward per sequence (exact for a dense model)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            for row in range(b["input_ids"].shape[0]):
                seq = b["input_ids"][row][mask[row].bool()].view(1, -1)
                first = max(1, int(seq.shape[1] * prefill))
                logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
                for t in range(first, seq.shape[1]):
                    nll -= float(logp[t - 1, seq[0, t]])
                    count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("prefill", (0.5, 0.25))
def test_decode_perplexity_of_a_dense_model_is_its_full_forward_on_the_same_tokens(prefill):
    model, batches = tiny_llama(), batches_with_padding()
    assert decode_perplexity(model, batches, prefill=prefill) == pytest.approx(
        scored_second_halves(model, batches, prefill), rel=1e-4)


def test_decode_perplexity_prefills_once_then_feeds_one_token_per_call():
    model, seen = tiny_llama(), []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(
        (tuple(kw["input_ids"].shape),
         (kw.get("cache") if "cache" in kw else kw.get("past_key_values")) is not None)),
        with_kwargs=True)
    ids = torch.randint(0, VOCAB, (1, 9))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # 7 real tokens: prefill 3, then tokens 3..5 fed (6 is only scored)
    decode_perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
    assert seen == [((1, 3), False), ((1, 1), True), ((1, 1), True), ((1, 1), True)]


def test_fidelity_with_decode_reports_both_measures():
    model, other, batches = tiny_llama(), tiny_llama(), batches_with_padding()
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    result = fidelity(other, model, batches, causal=True, decode=True)
    assert result.decode_ratio == pytest.approx(
        decode_perplexity(other, batches) / decode_perplexity(model, batches))
    assert result.decode_ratio != 1.0
    assert fidelity(model, model, batches, causal=True).decode_ratio is None  # not asked


@pytest.mark.parametrize("prefill", (0, 1, 1.5, -0.1, True, "half"))
def test_decode_perplexity_refuses_a_prefill_outside_0_1(prefill):
    with pytest.raises(InputError, match="prefill is the share"):
        decode_perplexity(tiny_llama(), batches_with_padding(), prefill=prefill)


def test_decode_perplexity_needs_a_model_with_a_cache():
    with pytest.raises(InputError, match="cannot be called with use_cache"):
        decode_perplexity(TinyLM("hugging-face"), batches_with_padding())

    class NoCache(TinyLM):  # takes use_cache, returns no cache
        def forward(self, input_ids, attention_mask=None, use_cache=None, cache=None):
            return super().forward(input_ids)

    with pytest.raises(InputError, match="without logits and a KV cache"):
        decode_perplexity(NoCache("hugging-face"), batches_with_padding())


def test_decode_perplexity_needs_a_token_after_the_prefill():
    with pytest.raises(InputError, match="no sequence has a token after its prefill"):
        decode_perplexity(tiny_llama(), [{"input_ids": torch.randint(0, VOCAB, (3, 1))}])
