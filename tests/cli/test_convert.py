"""``moefy convert``, run for real on the tiny LLaMA of conftest.py: what it saves and says,
the budget (--active / --minutes), and the settings refused before anything loads."""

from __future__ import annotations

import json
import re

import pytest

import moefy
from moefy import cli
from moefy.layers.neuron import NeuronFFN
from tests.cli.helpers import run

pytest.importorskip("transformers")


def test_convert_saves_a_checkpoint_and_says_what_it_did(converted, workspace):
    out, proc = converted
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("converted 2 FFN layers of LlamaForCausalLM")
    assert "upcycle: 4 experts, top-2" in lines[0]
    assert "calibration: 256 tokens from 1 file(s) (8 chunks of 32" in proc.stdout
    assert "active FFN work per token: 200% of the dense FFNs" in proc.stdout
    assert "distillation: " in proc.stdout and "KL on next-token logits" in proc.stdout
    assert lines[-1].startswith(f"wrote {out}")
    assert proc.stderr == ""  # no progress bars or warnings off a terminal
    info = json.loads((out / "moefy.json").read_text())["info"]
    assert info["source"] == str((workspace / "tiny").resolve())
    assert info["causal"] is True and info["task"] == "causal-lm"
    assert info["command"][:2] == ["moefy", "convert"] and "--distill-minutes" in info["command"]
    model = moefy.load(out)
    assert sum(isinstance(m, moefy.MoE) for m in model.modules()) == 2
    assert (out / "tokenizer.json").is_file()


def test_contradicting_settings_are_usage_errors_before_loading(tmp_path, capsys):
    # the model does not exist: these must be refused before anything is loaded
    model = str(tmp_path / "absent")
    cases = [(["--partition", "coactivation"], "--partition coactivation needs --calibration"),
             (["--experts", "4", "--top-k", "8"], "--top-k (8) cannot exceed --experts (4)"),
             (["--distill-minutes", "1"], "--distill-minutes needs --calibration"),
             (["--method", "peer", "--experts", "8"], "--experts does not apply to --method "
                                                      "peer")]
    for flags, message in cases:
        assert cli.main(["convert", model, *flags, "-o", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moefy: error: ") and message in err and err.count("\n") == 1


def test_calibration_text_that_is_not_utf8_names_the_file(workspace, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "bad.txt").write_bytes(b"ok \xff\xfe not text")
    code = cli.main(["convert", str(workspace / "tiny"), "--calibration",
                     str(tmp_path / "docs"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "bad.txt: not UTF-8 text" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_unloadable_models_and_outputs_are_one_clear_line(converted, workspace, tmp_path,
                                                          capsys):
    out, _ = converted
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not gguf at all")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(
        (workspace / "tiny" / "config.json").read_text())
    cases = [([str(out)], "is a converted moefy checkpoint, not a dense model"),
             ([str(fake)], "transformers cannot load this GGUF file"),
             ([str(tmp_path / "noweights")], "transformers cannot load it")]
    for model, message in cases:
        assert cli.main(["convert", *model, "-o", str(tmp_path / "o")]) == 1
        err = capsys.readouterr().err
        assert message in err and "unexpected" not in err and err.count("\n") == 1, err
    assert cli.main(["convert", str(workspace / "tiny"), "-o", "/proc/moefy-out"]) == 1
    assert "cannot write checkpoint /proc/moefy-out" in capsys.readouterr().err


# ----------------------------------------------------------------------------- budget


def test_convert_for_a_budget_says_what_it_chose_and_measured(workspace):
    out = workspace / "tiny-budget"
    proc = run("convert", str(workspace / "tiny"), "--method", "split", "--active", "0.25",
               "--minutes", "0.4",
               "--calibration", str(workspace / "notes.txt"), "--seq-len", "32",
               "--batch-size", "4", "--calibration-tokens", "768", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert ("budget: 25.0% of each FFN's neurons active (--active): 64 experts of 1/64 of "
            "the FFN, 8 shared + top-8 of 56 routed") in text
    assert "held out for measuring: 128 of them" in text
    # the steps distillation gets depend on how fast this machine built the model (tested
    # in tests/test_convert.py); the line saying what happened is always there
    assert re.search(r"distillation: (\d+ steps in|none \(building took)", text), text
    ppl = [line for line in text.splitlines() if line.startswith("held-out perplexity")]
    assert len(ppl) == 1 and ppl[0].endswith("x)")
    assert "; decode perplexity: dense " in ppl[0]  # generation through the KV cache too
    info = json.loads((out / "moefy.json").read_text())["info"]
    assert info["config"]["minutes"] == 0.4 and info["config"]["shared_experts"] == 8
    model = moefy.load(out)
    moes = [m for m in model.modules() if isinstance(m, moefy.MoE)]
    assert len(moes) == 2 and all(m.top_k == 8 and m.num_experts == 56 for m in moes)


def test_budget_flags_are_checked_before_loading(tmp_path, capsys):
    model = str(tmp_path / "absent")
    cal = ["--calibration", str(tmp_path)]
    cases = [(["--active", "0.25", "--top-k", "8", *cal], "--active picks top-k and shared "
                                                          "experts itself; drop --top-k"),
             (["--active", "0.25"], "--active needs --calibration"),
             (["--active", "0.25", "--method", "upcycle", *cal], "does not apply to --method "
                                                                 "upcycle"),
             (["--active", "1.5", *cal], "--active is the share of each FFN's neurons"),
             (["--active", "0", *cal], "between 0 and 1"),
             (["--minutes", "5", "--method", "upcycle", *cal], "upcycle is exact: there is "
                                                               "nothing to distil"),
             (["--minutes", "5", "--method", "peer"], "--method peer does not take it"),
             (["--minutes", "5"], "--minutes needs --calibration"),
             (["--minutes", "nan", *cal], "--minutes must be a finite number > 0"),
             (["--minutes", "0", *cal], "--minutes must be a finite number > 0"),
             (["--minutes", "5", "--distill-minutes", "1", *cal], "drop --distill-minutes")]
    for flags, message in cases:
        assert cli.main(["convert", model, *flags, "-o", str(tmp_path / "o")]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("moefy: error: ") and message in err and err.count("\n") == 1, (
            flags, err)


def test_zero_experts_are_refused_with_or_without_active(tmp_path, capsys):
    """--experts 0 is a count, refused, not "not given": with --active it used to become the
    recipe's 64 experts."""
    model, cal = str(tmp_path / "absent"), ["--calibration", str(tmp_path)]
    for flags in (["--experts", "0"], ["--active", "0.5", "--experts", "0", *cal]):
        assert cli.main(["convert", model, *flags, "-o", str(tmp_path / "o")]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("moefy: error: --experts must be ") and err.endswith(
            ", got 0\n") and err.count("\n") == 1, (flags, err)
    assert not (tmp_path / "o").exists()


def test_active_without_method_sparsifies_single_neurons_of_a_causal_lm(workspace):
    """--active alone on a causal LM picks the neuron method and says so; the checkpoint
    loads back into the same single-neuron layers with the same thresholds."""
    out = workspace / "tiny-neuron"
    proc = run("convert", str(workspace / "tiny"), "--active", "0.5",
               "--calibration", str(workspace / "notes.txt"), "--seq-len", "32",
               "--batch-size", "4", "--calibration-tokens", "512", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "method: neuron (chosen for a causal LM" in text
    # the FFNs, not the FFNs and the projections beside them
    assert re.search(r"^converted 2 FFN layers of LlamaForCausalLM", text, re.M), text
    assert ("single-neuron experts (selection input), 50% of the projection weights per "
            "token, 8 attention projections sparse") in text
    planned = re.search(r"weights read per token: ([\d.]+)% of", text)
    assert planned and abs(float(planned.group(1)) - 50) < 3, text
    info = json.loads((out / "moefy.json").read_text())["info"]
    assert info["config"]["method"] == "neuron" and info["config"]["active"] == 0.5
    model = moefy.load(out)
    ffns = [m for m in model.modules() if isinstance(m, NeuronFFN)]
    assert len(ffns) == 2 and all(float(m.in_threshold) > 0 for m in ffns)


def test_sequence_selection_converts_and_reports_its_decode_perplexity(workspace):
    """--selection sequence (one neuron set per sequence, from its prompt): the decode
    perplexity is printed beside the window one; the checkpoint loads back with each FFN's
    share kept."""
    out = workspace / "tiny-sequence"
    proc = run("convert", str(workspace / "tiny"), "--method", "neuron", "--selection",
               "sequence", "--ffn-only", "--active", "0.5", "--minutes", "0.1",
               "--calibration", str(workspace / "notes.txt"), "--seq-len", "32",
               "--batch-size", "4", "--calibration-tokens", "768", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "single-neuron experts (selection sequence), 50% of the projection weights" in text
    line = next(x for x in text.splitlines() if x.startswith("held-out perplexity"))
    assert re.search(r"^held-out perplexity: dense [\d.]+, moefy [\d.]+ \([\d.]+x\);", line)
    assert re.search(r"decode perplexity: dense [\d.]+, moefy [\d.]+ \([\d.]+x\)$", line)
    model = moefy.load(out)
    ffns = [m for m in model.modules() if isinstance(m, NeuronFFN)]
    assert len(ffns) == 2 and all(m.selection == "sequence" and 0 < float(m.keep) < 1
                                  for m in ffns)


def test_neuron_flags_are_checked_before_loading(tmp_path, capsys):
    model, cal = str(tmp_path / "absent"), ["--calibration", str(tmp_path)]
    cases = [(["--method", "neuron", "--top-k", "8", *cal], "--top-k does not apply to "
                                                            "--method neuron"),
             (["--method", "neuron", "--active", "0.5"], "--active needs --calibration"),
             (["--method", "neuron", "--active", "1.5", *cal], "in (0, 1]"),
             (["--method", "split", "--ffn-only"], "--ffn-only applies to --method neuron"),
             (["--selection", "gate"], "--selection applies to --method neuron")]
    for flags, message in cases:
        assert cli.main(["convert", model, *flags, "-o", str(tmp_path / "o")]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("moefy: error: ") and message in err and err.count("\n") == 1, (
            flags, err)


def test_static_selection_shrinks_every_ffn_and_says_so(workspace, capsys):
    """--selection static: one neuron set per FFN, down refit; the checkpoint loads back
    with the smaller FFNs (in process: the subprocess runs above cover the entry point)."""
    out = workspace / "tiny-static"
    code = cli.main(["convert", str(workspace / "tiny"), "--method", "neuron", "--selection",
                     "static", "--active", "0.5", "--calibration", str(workspace / "notes.txt"),
                     "--seq-len", "32", "--batch-size", "4", "--calibration-tokens", "512",
                     "-o", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert ("single-neuron experts (selection static: one set per FFN), 50% of each FFN's "
            "neurons for every token, down refit; attention dense") in text
    model = moefy.load(out)
    ffns = [m for m in model.modules() if isinstance(m, NeuronFFN)]
    assert len(ffns) == 2 and all(m.selection == "static" for m in ffns)
    assert all(m.conversion["share_keep"] == 0.5 for m in ffns)
