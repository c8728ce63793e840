"""``conslu init --model whisper-tiny.en --grammar topv2 --out DIR``: an untrained ConSLU model folder
(:meth:`conslu.model.ConSLU.init` + ``save_pretrained``). ``--grammar`` is a grammar JSON file or a
shipped short name (:func:`conslu.grammar.load_grammar`). Exit 2 when it cannot be made."""

from __future__ import annotations

import argparse
import sys

from conslu.commands._options import add_model_argument, audio_context_value as _bucket
from conslu.context import DEFAULT_BUCKET_SECONDS
from conslu.grammar import shipped_grammars

NAME = "init"
HELP = "make an untrained ConSLU model folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_argument(p)
    p.add_argument("--grammar", required=True, metavar="GRAMMAR",
                   help=f"label grammar: a grammar JSON file or a shipped name ({', '.join(shipped_grammars()) or 'none'})")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--target-format", choices=["simplified", "whislu"], default="simplified")
    p.add_argument("--constraints", choices=["both", "loss", "decoding", "none"], default="both")
    p.add_argument("--audio-context", type=_bucket, default=DEFAULT_BUCKET_SECONDS, metavar="{window,SECONDS}",
                   help=f"the encoder reads the audio's length rounded up to SECONDS (default {DEFAULT_BUCKET_SECONDS:g}; "
                        "recorded in the folder), or window: Whisper's 30 s")


def run(args: argparse.Namespace) -> int:
    from conslu.model import ConSLU

    try:
        slu = ConSLU.init(args.model, args.grammar, args.target_format, args.constraints, args.audio_context)
        out = slu.save_pretrained(args.out)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"conslu init: error: {e}", file=sys.stderr)
        return 2
    n = slu.model.get_input_embeddings().weight.shape[0]
    context = "30 s window" if slu.audio_context is None else f"audio context {slu.audio_context:g} s"
    print(f"wrote {out} ({slu.target_format} target, constraints={slu.constraints}, {context}, "
          f"{len(slu.tokenizer.label_tokens)} label tokens, vocabulary {n})")
    return 0
