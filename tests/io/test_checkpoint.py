"""moefy.save / moefy.load: bit-exact round trips (also in a fresh process), no pickling, and
a clear LoadError / SaveError for every broken input, before anything changes."""

import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import moefy
from moefy.errors import LoadError, SaveError
from tests.io.models import (
    CONVERSIONS,
    LLAMA,
    ConvFFN,
    TabularMLP,
    TwoPaths,
    snapshot,
    token_ids,
    untouched,
)


@pytest.mark.parametrize("kind", sorted(CONVERSIONS))
def test_round_trip_is_bit_exact_from_the_config_alone_and_onto_a_fresh_model(kind, tmp_path):
    model = CONVERSIONS[kind]()
    ids = token_ids()
    ref = model(input_ids=ids).logits
    moefy.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json", "generation_config.json", "moefy.json", "moefy.safetensors"]

    back = moefy.load(tmp_path)  # from config.json alone
    assert type(back) is LlamaForCausalLM and not back.training
    assert torch.equal(back(input_ids=ids).logits, ref)
    assert back.lm_head.weight is back.model.embed_tokens.weight  # tied again, not copied
    again = moefy.load(tmp_path, LlamaForCausalLM(LLAMA))
    assert torch.equal(again(input_ids=ids).logits, ref)
    layers = [m for m in back.modules() if isinstance(m, (moefy.MoE, moefy.PEER))]
    assert len(layers) == 2
    method = "upcycle" if kind == "hash" else kind.split("-")[0]
    assert all(m.conversion["method"] == method for m in layers)


def test_layer_settings_changed_after_conversion_survive(tmp_path):
    model = CONVERSIONS["upcycle-sigmoid"]()
    model.train()
    model(input_ids=token_ids())  # a training forward nudges the sigmoid router's selection bias
    moe = model.model.layers[0].mlp
    assert moe.selection_bias.abs().sum() > 0
    moe.top_k, moe.capacity_factor, moe.expert_dropout, moe.prepack = 1, 1.5, 0.25, False
    model.eval()
    moefy.save(model, tmp_path)
    back = moefy.load(tmp_path).model.layers[0].mlp
    assert (back.top_k, back.capacity_factor, back.expert_dropout, back.prepack) == (
        1, 1.5, 0.25, False)
    assert torch.equal(back.selection_bias, moe.selection_bias)


def test_split_keeps_its_partition_and_compensation(tmp_path):
    model = CONVERSIONS["split-calibrated"]()
    moe = model.model.layers[1].mlp
    moefy.save(model, tmp_path)
    back = moefy.load(tmp_path).model.layers[1].mlp
    assert back.expert_neurons == moe.expert_neurons and back.shared_neurons == moe.shared_neurons
    assert back.shared.compensation is not None
    assert back.conversion["compensation"] == moe.conversion["compensation"]


def test_bert_identities_and_bfloat16(tmp_path):
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4)).eval()
    ids = token_ids()
    model = moefy.convert(bert, moefy.MoEConfig(num_experts=4, top_k=2),
                          example_inputs={"input_ids": ids}).to(torch.bfloat16)
    ref = model(input_ids=ids).last_hidden_state
    moefy.save(model, tmp_path)
    plan = json.loads((tmp_path / "moefy.json").read_text())
    assert plan["identities"] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    back = moefy.load(tmp_path)
    assert back.encoder.layer[0].intermediate.w_in.dtype == torch.bfloat16
    assert torch.equal(back(input_ids=ids).last_hidden_state, ref)


def test_a_model_that_is_not_from_hugging_face(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = moefy.convert(ConvFFN().eval(), moefy.MoEConfig(num_experts=4, top_k=2),
                          example_inputs=(x,))
    ref = model(x)
    moefy.save(model, tmp_path)
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(LoadError, match="not a Hugging Face model: build a fresh dense ConvFFN"):
        moefy.load(tmp_path)
    back = moefy.load(tmp_path, ConvFFN())
    assert torch.equal(back(x), ref)
    wrappers = {e["path"]: e["wrappers"] for e in json.loads(
        (tmp_path / "moefy.json").read_text())["layers"]}
    assert wrappers["ffn"] == [{"type": "channels_last", "dim": 1}]
    assert wrappers["mlp"] == [{"type": "dropout", "p": 0.1}]


TABULAR_CONVERSIONS = (
    dict(method="upcycle", num_experts=4, top_k=2),
    # calibrated: the shared bias and the linear compensation have the output's width
    dict(method="split", num_experts=4, top_k=2, compensate="linear"),
)


@pytest.mark.parametrize("cfg", TABULAR_CONVERSIONS, ids=lambda c: c["method"])
def test_a_tabular_model_whose_head_changes_the_width(cfg, tmp_path):
    torch.manual_seed(0)
    data = [(torch.randn(256, 16),) for _ in range(2)]
    calibration = data if cfg["method"] == "split" else None
    model = moefy.convert(TabularMLP().eval(), moefy.MoEConfig(**cfg), example_inputs=data[0],
                          calibration_data=calibration)
    x = torch.randn(40, 16)
    with torch.no_grad():
        ref, ref_few = model(x), model(x[:3])
    moefy.save(model, tmp_path)
    args = {e["path"]: e["args"] for e in json.loads(
        (tmp_path / "moefy.json").read_text())["layers"]}
    assert args["head"]["output_size"] == 3
    assert "output_size" not in args["block"]  # H → H: the plan an older moefy wrote and reads
    back = moefy.load(tmp_path, TabularMLP())
    assert back.head.output_size == 3 and back.head.w_out.shape[:2] == (4, 3)
    if cfg["method"] == "split":
        assert back.head.shared.compensation[1].out_features == 3
        assert back.head.shared.bias.shape == (3,)
    with torch.no_grad():
        assert torch.equal(back(x), ref) and torch.equal(back(x[:3]), ref_few)


def test_a_single_layer(tmp_path):
    moe = moefy.MoE(8, 16, num_experts=4, top_k=2, shared_expert_size=8, router="noisy")
    x = torch.randn(5, 8)
    moefy.save(moe, tmp_path)
    back = moefy.load(tmp_path, moefy.MoE(8, 16, num_experts=4, top_k=2))
    assert torch.equal(back(x), moe.eval()(x))


def test_fresh_process_never_unpickles(tmp_path):
    """Load in a new interpreter where pickle and torch.load are booby-trapped."""
    model = CONVERSIONS["split-calibrated"]()
    ids = token_ids()
    save_file({"ids": ids, "logits": model(input_ids=ids).logits.contiguous()},
              tmp_path / "ref.safetensors")
    moefy.save(model, tmp_path / "ckpt")
    script = textwrap.dedent(f"""
        import pickle, torch
        import moefy
        def trap(*a, **k):
            raise AssertionError("unpickling")
        class Trap:
            def __init__(self, *a, **k):
                trap()
        pickle.load = pickle.loads = torch.load = trap
        pickle.Unpickler = Trap
        from safetensors.torch import load_file
        ref = load_file({str(tmp_path / 'ref.safetensors')!r})
        model = moefy.load({str(tmp_path / 'ckpt')!r})
        assert torch.equal(model(input_ids=ref["ids"]).logits, ref["logits"]), "differs"
        print("bit-exact")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "bit-exact" in run.stdout
    assert pickle.load is not None  # (this process is untouched)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing 1 tensor.*model.layers.1.mlp.w_in"),
    ("shape", "other shapes: model.layers.1.mlp.w_in"),
    ("extra", "1 unexpected tensor.*stray"),
])
def test_missing_or_mismatched_tensor(saved, damage, message):
    state = load_file(saved / "moefy.safetensors")
    if damage == "missing":
        del state["model.layers.1.mlp.w_in"]
    elif damage == "shape":
        state["model.layers.1.mlp.w_in"] = state["model.layers.1.mlp.w_in"][:, :-1].clone()
    else:
        state["stray"] = torch.zeros(3)
    plan_id = json.loads((saved / "moefy.json").read_text())["id"]
    save_file(state, saved / "moefy.safetensors", metadata={"format": "pt", "moefy": plan_id})
    fresh = LlamaForCausalLM(LLAMA)
    before = snapshot(fresh)
    with pytest.raises(LoadError, match=message):
        moefy.load(saved, fresh)
    assert untouched(fresh, before)


def test_another_architecture(saved):
    bert = BertModel(BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4))
    with pytest.raises(LoadError, match="holds a converted LlamaForCausalLM, but the model "
                                        "given is a BertModel"):
        moefy.load(saved, bert)
    smaller = LlamaForCausalLM(LlamaConfig(**{**LLAMA.to_dict(), "num_hidden_layers": 1}))
    before = snapshot(smaller)
    with pytest.raises(LoadError, match="another config.*num_hidden_layers: 2 saved, 1 given"):
        moefy.load(saved, smaller)
    assert untouched(smaller, before)


def test_a_model_without_the_module_the_plan_names(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    moefy.save(moefy.convert(ConvFFN().eval(), moefy.MoEConfig(num_experts=4, top_k=2),
                             example_inputs=(x,)), tmp_path)
    fresh = ConvFFN()
    del fresh.ffn
    with pytest.raises(LoadError, match="no module 'ffn'"):
        moefy.load(tmp_path, fresh)
    assert not any(isinstance(m, moefy.MoE) for m in fresh.modules())


def test_a_converted_model_is_not_a_fresh_one(saved):
    with pytest.raises(LoadError, match="already holds moefy layers"):
        moefy.load(saved, moefy.load(saved))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "damaged or truncated"),
    ("no-weights", "holds no moefy.safetensors"),
    ("no-plan", "holds no moefy.json"),
    ("bad-json", "is damaged \\(not JSON"),
    ("no-config", "holds no config.json"),
    ("bad-entry", "damaged: 'model.layers.0.mlp' lacks its args"),
    ("bad-args", "model.layers.0.mlp cannot be built: .*top_k"),
])
def test_broken_files(saved, damage, message):
    weights = saved / "moefy.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "no-plan":
        (saved / "moefy.json").unlink()
    elif damage == "bad-json":
        (saved / "moefy.json").write_text("{not json")
    elif damage.startswith("bad-"):
        plan = json.loads((saved / "moefy.json").read_text())
        if damage == "bad-entry":
            del plan["layers"][0]["args"]
        else:
            plan["layers"][0]["args"]["top_k"] = 99
        (saved / "moefy.json").write_text(json.dumps(plan))
    else:
        (saved / "config.json").unlink()
    with pytest.raises(LoadError, match=message):
        moefy.load(saved)


def test_no_such_directory(tmp_path):
    with pytest.raises(LoadError, match="no such directory"):
        moefy.load(tmp_path / "nope")


def test_what_cannot_be_saved(tmp_path):
    class Inline(nn.Module):  # an FFN inline in the model's forward: graph mode
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(32, 8)), nn.Parameter(torch.randn(8, 32))

        def forward(self, x):
            return torch.relu(x @ self.w1.t()) @ self.w2.t()

    graph = moefy.convert(Inline(), moefy.MoEConfig(num_experts=4, top_k=2),
                          example_inputs=(torch.randn(3, 8),))
    with pytest.raises(SaveError, match="graph mode"):
        moefy.save(graph, tmp_path / "g")
    moe = moefy.MoE(8, 16, num_experts=4, top_k=2, activation=nn.Tanh())
    with pytest.raises(SaveError, match="custom activation"):
        moefy.save(moe, tmp_path / "a")
    with pytest.raises(SaveError, match="JSON-serialisable"):
        moefy.save(moefy.MoE(8, 16, 4, 2), tmp_path / "i", info={"x": object()})
    (tmp_path / "file").write_text("")
    with pytest.raises(SaveError, match="not a directory"):
        moefy.save(moefy.MoE(8, 16, 4, 2), tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_smollm2_split_round_trip(smollm2_slice, tmp_path):
    """Real weights: two SmolLM2 layers split with calibration text, saved with the tokenizer,
    rebuilt from the folder alone."""
    model, tokenizer = smollm2_slice(2)
    text = [moefy.convert.__doc__, moefy.MoE.__doc__]
    batches = [dict(tokenizer(t, return_tensors="pt", truncation=True, max_length=64))
               for t in text]
    moe = moefy.convert(model, moefy.MoEConfig(method="split", num_experts=8, top_k=4,
                                                       compensate="mean"),
                        calibration_data=batches)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ref = moe(**ids).logits
    moefy.save(moe, tmp_path, tokenizer=tokenizer, info={"source": "smollm2"})
    back = moefy.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(back(**ids).logits, ref)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert moefy.io.checkpoint.read_plan(tmp_path)["info"] == {"source": "smollm2"}
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path)("Paris").input_ids == tokenizer(
        "Paris").input_ids


def test_a_plan_and_weights_of_different_saves(tmp_path):
    moefy.save(CONVERSIONS["upcycle-sigmoid"](), tmp_path / "a")
    moefy.save(CONVERSIONS["hash"](), tmp_path / "b")
    (tmp_path / "b" / "moefy.safetensors").replace(tmp_path / "a" / "moefy.safetensors")
    with pytest.raises(LoadError, match="come from different saves"):
        moefy.load(tmp_path / "a")


def test_a_fresh_model_on_the_meta_device(saved):
    with torch.device("meta"):
        fresh = LlamaForCausalLM(LLAMA)
    with pytest.raises(LoadError, match="meta device"):
        moefy.load(saved, fresh)
    assert not any(isinstance(m, moefy.MoE) for m in fresh.modules())


def test_an_integer_where_weights_are_floats(saved):
    state = load_file(saved / "moefy.safetensors")
    state["model.layers.0.mlp.w_in"] = state["model.layers.0.mlp.w_in"].int()
    metadata = {"format": "pt", "moefy": json.loads((saved / "moefy.json").read_text())["id"]}
    save_file(state, saved / "moefy.safetensors", metadata=metadata)
    fresh = LlamaForCausalLM(LLAMA)
    with pytest.raises(LoadError, match="w_in is stored as I32"):
        moefy.load(saved, fresh)
    assert not any(isinstance(m, moefy.MoE) for m in fresh.modules())



@pytest.mark.parametrize("name", ["model.layers.0.mlp.w_in", "model.layers.1.mlp.router.weight"])
def test_a_tensor_of_another_dtype_than_its_layer(saved, name):
    state = load_file(saved / "moefy.safetensors")
    state[name] = state[name].double()  # float64 among float32: the forward would fail
    metadata = {"format": "pt", "moefy": json.loads((saved / "moefy.json").read_text())["id"]}
    save_file(state, saved / "moefy.safetensors", metadata=metadata)
    fresh = LlamaForCausalLM(LLAMA)
    before = snapshot(fresh)
    message = f"{name} is stored as F64, but the rest of model.layers.[01].mlp as F32"
    with pytest.raises(LoadError, match=message):
        moefy.load(saved, fresh)
    assert untouched(fresh, before)
    with pytest.raises(LoadError, match=message):
        moefy.load(saved)


FRESH_TWO_PATHS = (True, False)  # the fresh model shares its dense module too, or not


@pytest.mark.parametrize("fresh_shares", FRESH_TWO_PATHS)
def test_one_layer_at_two_paths_comes_back_as_one(tmp_path, fresh_shares):
    model = TwoPaths()
    model.a = model.b = moefy.MoE(8, 16, num_experts=4, top_k=2, shared_expert_size=8).eval()
    x = torch.randn(5, 8)
    moefy.save(model, tmp_path)
    back = moefy.load(tmp_path, TwoPaths(shared=fresh_shares))
    assert isinstance(back.a, moefy.MoE) and back.a is back.b
    assert torch.equal(back(x), model(x))
    moefy.save(back, tmp_path / "again")  # and it saves again as it was saved
    assert torch.equal(moefy.load(tmp_path / "again", TwoPaths())(x), model(x))

def test_saving_again_replaces_the_earlier_save(tmp_path):
    from transformers import AutoTokenizer

    from moefy.io.pretrained import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    moefy.save(CONVERSIONS["upcycle-sigmoid"](), tmp_path, tokenizer=tokenizer)
    assert (tmp_path / "tokenizer.json").exists()
    layer = moefy.MoE(8, 16, num_experts=4, top_k=2)
    moefy.save(layer, tmp_path)  # no tokenizer, no Hugging Face config this time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moefy.json", "moefy.safetensors"]
    back = moefy.load(tmp_path, moefy.MoE(8, 16, num_experts=4, top_k=2))
    assert back is not layer and torch.equal(back.w_in, layer.w_in)  # a bare layer: a new one


def test_frozen_parameters_and_compiled_models(tmp_path):
    model = CONVERSIONS["upcycle-sigmoid"]()
    moefy.freeze(model, train="routers")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    moefy.save(torch.compile(model), tmp_path)
    assert json.loads((tmp_path / "moefy.json").read_text())["base"]["class"] == \
        "LlamaForCausalLM"
    back = moefy.load(tmp_path)
    assert {n for n, p in back.named_parameters() if not p.requires_grad} == frozen
    compiled = torch.compile(LlamaForCausalLM(LLAMA))
    assert moefy.load(tmp_path, compiled) is compiled
    assert isinstance(compiled._orig_mod.model.layers[0].mlp, moefy.MoE)


def test_bad_arguments(tmp_path):
    moe = moefy.MoE(8, 16, 4, 2)
    with pytest.raises(SaveError, match="directory must be a path"):
        moefy.save(moe, 3)
    with pytest.raises(SaveError, match="tokenizer must be a Hugging Face tokenizer"):
        moefy.save(moe, tmp_path / "t", tokenizer="gpt2")
    with pytest.raises(SaveError, match="info must be a dict"):
        moefy.save(moe, tmp_path / "t", info=[1, 2])
    assert not (tmp_path / "t").exists()
    with pytest.raises(LoadError, match="directory must be a path"):
        moefy.load(3)
    moefy.save(moe, tmp_path / "ok")
    with pytest.raises(LoadError, match="is a file: give the folder"):
        moefy.load(tmp_path / "ok" / "moefy.json", moe)
