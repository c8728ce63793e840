"""The `conslu` command line: one sub-command per user task.

Each sub-command's arguments are declared here; the work is done by a `cmd_*` function in
the module that owns the behaviour (imported lazily so `conslu --help` stays fast).
Handlers return a process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module:function, help)
    "grammar extract": ("conslu.grammar:cmd_extract", "build a grammar from STOP manifests or TOPv2 files"),
    "grammar show": ("conslu.grammar:cmd_show", "print a grammar's statistics"),
    "score": ("conslu.metrics:cmd_score", "score predictions (EM, EM-tree, validity, WER)"),
    "convert-ct2": ("conslu.ct2:cmd_convert", "convert a CTranslate2 Whisper model to a Hugging Face folder"),
    "transcribe": ("conslu.transcribe:cmd_transcribe", "plain Whisper speech recognition of audio files"),
    "synth": ("conslu.synth:cmd_synth", "speak TOPv2/STOP text with espeak-ng into a STOP-layout corpus"),
    "init": ("conslu.model:cmd_init", "make an untrained ConSLU model folder"),
    "parse": ("conslu.parse:cmd_parse", "transcribe and parse audio files"),
    "train": ("conslu.train:cmd_train", "train with Lightning (LightningCLI; see conf/)"),
    "evaluate": ("conslu.evaluate:cmd_evaluate", "decode a STOP split and score it"),
    "demo": ("conslu.demo:cmd_demo", "end-to-end CPU demo on embedded data"),
    "bench": ("conslu.bench:cmd_bench", "benchmark constrained and speculative decoding"),
}


def _add_model_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="ConSLU/Whisper folder, hub id, or a short name such as whisper-tiny.en")


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    """The decoding flags of ``parse`` and ``evaluate`` (``conslu.decoding.DecodingOptions``)."""
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int, default=1, help="beam size (1: greedy)")
    g.add_argument("--unconstrained", action="store_true", help="decode without the grammar and copy constraints")
    g.add_argument("--no-speculative", action="store_true", help="greedy without copy-speculative drafts (same output)")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="generated tokens after the prompt, <|endoftext|> included (default 256)")
    g.add_argument("--length-penalty", type=float, default=None,
                   help="beam ranking: none = log-prob / length; else over ((5 + length) / 6) ** penalty")
    g.add_argument("--language", default=None, help="prompt language of a multilingual Whisper (default: en)")
    g.add_argument("--no-loop-guard", action="store_true", help="let looping transcripts run to the length limit")


def _configure(name: str, p: argparse.ArgumentParser) -> None:
    if name == "grammar extract":
        p.add_argument("data", nargs="+", help="STOP manifest .tsv files, STOP root folders, or TOPv2 .tsv files")
        p.add_argument("--out", required=True, help="grammar JSON to write")
        p.add_argument("--field", default=None, help="logical-form column to read (default: decoupled for STOP, semantic_parse for TOPv2)")
        p.add_argument("--skip-bad", action="store_true", help="skip malformed rows (reported) instead of failing")
    elif name == "grammar show":
        p.add_argument("grammar", help="grammar JSON")
        p.add_argument("--json", action="store_true")
        p.add_argument("--check", nargs="*", default=None, metavar="DATA", help="report how many trees in DATA the grammar cannot express")
    elif name == "score":
        p.add_argument("--ref", required=True, help="reference JSONL (id, transcript, logical_form[, domain])")
        p.add_argument("--hyp", required=True, help="hypothesis JSONL (id, transcript, logical_form)")
        p.add_argument("--grammar", default=None, help="grammar JSON for validity (well-formedness only without it)")
        p.add_argument("--json", action="store_true")
    elif name == "convert-ct2":
        p.add_argument("src", help="CTranslate2 model folder, an installed package name, or a short name (whisper-tiny.en, whisper-base, whisper-small)")
        p.add_argument("--out", default=None, help="output folder (default: the ConSLU cache folder for short names)")
        p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    elif name == "transcribe":
        p.add_argument("files", nargs="+")
        _add_model_arg(p, required=False)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--device", default=None)
        p.add_argument("--debug", action="store_true", help="print tracebacks for failed files")
    elif name == "synth":
        p.add_argument("files", nargs="+", help="TOPv2 .tsv files (split from names like weather_eval.tsv) or STOP manifests")
        p.add_argument("--out", required=True, help="corpus folder (STOP layout)")
        p.add_argument("--splits", nargs="*", default=None, help="keep only these splits (train, eval, test)")
        p.add_argument("--domains", nargs="*", default=None, help="keep only these domains")
        p.add_argument("--limit", type=int, default=None, help="at most this many utterances per split")
        p.add_argument("--jobs", type=int, default=None, help="parallel processes (default: CPU count)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--noise-snr", type=float, default=None, help="add white noise at this SNR in dB")
        p.add_argument("--voices", nargs="*", default=None, help="espeak-ng voices to draw from")
        p.add_argument("--skip-bad", action="store_true", help="skip malformed rows (reported) instead of failing")
    elif name == "init":
        _add_model_arg(p)
        p.add_argument("--grammar", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--target-format", choices=["simplified", "whislu"], default="simplified")
        p.add_argument("--constraints", choices=["both", "loss", "decoding", "none"], default="both")
    elif name == "parse":
        p.add_argument("files", nargs="+")
        _add_model_arg(p)
        _add_decode_args(p)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--out", default=None, help="write JSON lines here (appends, skips files already done)")
        p.add_argument("--device", default=None)
        p.add_argument("--debug", action="store_true")
    elif name == "train":
        pass  # handled by LightningCLI with the remaining arguments
    elif name == "evaluate":
        p.add_argument("--data", required=True, help="STOP root folder (official or synthetic)")
        p.add_argument("--split", default="test")
        _add_model_arg(p)
        _add_decode_args(p)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--limit", type=int, default=None)
        p.add_argument("--domains", nargs="*", default=None)
        p.add_argument("--out", default=None, help="predictions JSONL, appended and resumed (default: runs/eval/<model-name>-<split>-<hash>.jsonl)")
        p.add_argument("--device", default=None)
        p.add_argument("--json", action="store_true")
        p.add_argument("--skip-bad", action="store_true")
        p.add_argument("--debug", action="store_true")
    elif name == "demo":
        p.add_argument("--workdir", default="runs/demo")
        p.add_argument("--quick", action="store_true", help="a smaller, faster run (for tests)")
        p.add_argument("--seed", type=int, default=0)
    elif name == "bench":
        p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
        _add_model_arg(p, required=False)
        p.add_argument("--json", action="store_true")
        p.add_argument("--plot", default=None, help="write a PNG of decode time against utterance length")
        p.add_argument("--quick", action="store_true")
        p.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")


def _handler(target: str) -> Callable[[argparse.Namespace], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conslu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, (target, help_) in COMMANDS.items():
        if " " in name:
            group, leaf = name.split(" ")
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands")
                groups[group] = gp.add_subparsers(dest="subcommand", required=True)
            p = groups[group].add_parser(leaf, help=help_)
        else:
            p = sub.add_parser(name, help=help_, add_help=(name != "train"))
        _configure(name, p)
        p.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return _handler(COMMANDS["train"][0])(argv[1:])  # LightningCLI parses its own arguments
    args = build_parser().parse_args(argv)
    try:
        return int(_handler(args._target)(args) or 0)
    except KeyboardInterrupt:
        print("conslu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
