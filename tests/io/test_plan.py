"""The plan (moefy.json): what a save describes (one entry per layer, a layer registered at
two paths once, with where else it sits), and hand-edited plans refused by a typed LoadError
before the caller's model changes."""

import json

import pytest
import torch.nn as nn
from transformers import LlamaForCausalLM

import moefy
from moefy.errors import LoadError, SaveError
from moefy.io.plan import describe_model, read_plan
from tests.io.models import LLAMA, TwoPaths, snapshot, untouched


def test_plan_from_a_newer_moefy(saved):
    plan = json.loads((saved / "moefy.json").read_text())
    plan["format_version"], plan["moefy_version"] = 99, "9.0.0"
    (saved / "moefy.json").write_text(json.dumps(plan))
    with pytest.raises(LoadError, match=r"written by moefy 9\.0\.0 in plan format 99.*upgrade"):
        moefy.load(saved)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["layers"][0]["state"].update(expert_dropout=5), "expert_dropout"),
    (lambda p: p["layers"][0]["state"].update(bias_update_rate="fast"), "bias_update_rate"),
    (lambda p: p["layers"][0]["state"].update(use_compensation=None), "use_compensation"),
    (lambda p: p["layers"][0].update(kind="PEER"), "cannot be built"),
    (lambda p: p["layers"][0]["args"].update(num_experts=2 ** 62), "cannot be built|shapes"),
    (lambda p: p.update(format_version=0), "format_version 0"),
    (lambda p: p.update(format_version="1"), "format_version '1'"),
    (lambda p: p["layers"].append(3), "not an object"),
    (lambda p: p["base"].pop("class"), "base class"),
])
def test_hand_edited_plans(saved, edit, message):
    plan = json.loads((saved / "moefy.json").read_text())
    edit(plan)
    (saved / "moefy.json").write_text(json.dumps(plan))
    fresh = LlamaForCausalLM(LLAMA)
    with pytest.raises(LoadError, match=message):
        moefy.load(saved, fresh)
    assert not any(isinstance(m, moefy.MoE) for m in fresh.modules())


FROZEN_EDITS = (  # (what "frozen" becomes, what the refusal names)
    ("model.norm.weight", "'frozen' is missing or not a list \\(got str\\)"),
    (["model.norm.weight", "model.nope.weight"], "'frozen' names 'model.nope.weight', which is "
                                                 "not a parameter"),
    (["model.layers.0.mlp.selection_bias"], "'model.layers.0.mlp.selection_bias', which is not "
                                            "a parameter"),  # a buffer
    ([3], "'frozen' holds 3"),
)


@pytest.mark.parametrize("frozen, message", FROZEN_EDITS)
def test_frozen_names_that_are_not_parameters(saved, frozen, message):
    plan = json.loads((saved / "moefy.json").read_text())
    plan["frozen"] = frozen
    (saved / "moefy.json").write_text(json.dumps(plan))
    fresh = LlamaForCausalLM(LLAMA)
    before = snapshot(fresh)
    with pytest.raises(LoadError, match=message):
        moefy.load(saved, fresh)
    assert untouched(fresh, before)  # nothing swapped in, no tensor assigned


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["aliases"].update({"lm_head.weight": ["model.embed_tokens.weight"]}),
     "'aliases' holds \\['model.embed_tokens.weight'\\]"),
    (lambda p: p["identities"].append(""), "'identities' holds ''"),
    (lambda p: p["layers"][0].update(also="model.layers.1.mlp"), "'also' is a str"),
    (lambda p: p["layers"][0].update(also=["model.layers.1.mlp"]), "two layers at "
                                                                   "'model.layers.1.mlp'"),
    (lambda p: p["layers"][0].update(also=["model.nope"]), "no module 'model.nope'"),
])
def test_hand_edited_names(saved, edit, message):
    plan = json.loads((saved / "moefy.json").read_text())
    edit(plan)
    (saved / "moefy.json").write_text(json.dumps(plan))
    fresh = LlamaForCausalLM(LLAMA)
    before = snapshot(fresh)
    with pytest.raises(LoadError, match=message):
        moefy.load(saved, fresh)
    assert untouched(fresh, before)


def test_a_layer_at_two_paths_is_one_entry_that_says_where_else_it_sits(tmp_path):
    model = TwoPaths()
    model.a = model.b = moefy.MoE(8, 16, num_experts=4, top_k=2)
    plan = describe_model(model)
    assert [(e["path"], e.get("also")) for e in plan["layers"]] == [("a", ["b"])]
    assert plan["format_version"] == 2  # a moefy that does not know "also" refuses it
    wrapped = nn.Sequential(moefy.MoE(8, 16, num_experts=4, top_k=2), nn.Dropout(0.1))
    model.a = model.b = wrapped  # the wrapper is shared too: one entry, wrappers once
    [entry] = describe_model(model)["layers"]
    assert (entry["path"], entry["also"], entry["wrappers"]) == (
        "a", ["b"], [{"type": "dropout", "p": 0.1}])
    assert describe_model(wrapped)["format_version"] == 1  # what older moefy reads
    moefy.save(model, tmp_path)
    assert read_plan(tmp_path)["layers"][0]["also"] == ["b"]


def test_one_layer_under_two_different_wrappers_is_refused(tmp_path):
    model, moe = TwoPaths(), moefy.MoE(8, 16, num_experts=4, top_k=2)
    model.a, model.b = nn.Sequential(moe, nn.Dropout(0.1)), moe
    with pytest.raises(SaveError, match="b is the layer at a, but wrapped differently"):
        moefy.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
