"""Audio context against 30 s windows at equal steps.

Decoder-only fine-tuning of whisper tiny.en (frozen encoder, outputs cached) twice on the same
corpus, steps and seed: once with the 2 s audio context, once with Whisper's 30 s windows; then
greedy and beam-4 decoding of the eval split. Writes ``OUT/compare.json``.

    conslu demo                                   # makes runs/demo/corpus
    python recipes/context/compare.py runs/demo/corpus runs/context --every 3 --steps 200

``--every K`` trains on every K-th training row (a view of the corpus under OUT, same audio).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from conslu.decoding import DecodingOptions
from conslu.demo import evaluate_cached, fit, read_rows
from conslu.features import encoder_cache, fill_encoder_cache


def corpus_view(corpus: Path, out: Path, every: int) -> Path:
    """A STOP folder under ``out`` with every ``every``-th training row and the whole eval split."""
    view = out / "corpus"
    (view / "manifests").mkdir(parents=True, exist_ok=True)
    for entry in corpus.iterdir():
        if entry.name != "manifests" and entry.is_dir() and not (view / entry.name).exists():
            os.symlink(entry.resolve(), view / entry.name)
    lines = (corpus / "manifests" / "train.tsv").read_text(encoding="utf-8").splitlines()
    (view / "manifests" / "train.tsv").write_text("\n".join([lines[0], *lines[1:][::every]]) + "\n", encoding="utf-8")
    (view / "manifests" / "eval.tsv").write_text((corpus / "manifests" / "eval.tsv").read_text(encoding="utf-8"),
                                                 encoding="utf-8")
    return view


def config(corpus: Path, out: Path, context: float | None, steps: int) -> dict:
    return {
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": steps, "max_epochs": 1000,
                    "limit_val_batches": 0, "num_sanity_val_steps": 0, "gradient_clip_val": 1.0, "logger": False,
                    "enable_model_summary": False, "default_root_dir": str(out), "use_distributed_sampler": False},
        "model": {"model": "whisper-tiny.en", "grammar": "train", "freeze_encoder": True, "cache_encoder": True,
                  "lr": 3e-4, "warmup_steps": 20, "weight_decay": 0.01, "val_max_new_tokens": 64,
                  "audio_context": context},
        "data": {"data_dir": str(corpus), "batch_size": 8, "val_batch_size": 16, "num_workers": 0, "bucket_size": 10,
                 "bucket_by": "duration", "cache_dir": str(out / "cache"), "seed": 0},
        "checkpoint": {"save_last": False, "save_top_k": 0, "every_n_train_steps": None},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=1)
    args = p.parse_args()
    corpus = corpus_view(args.corpus, args.out, args.every) if args.every > 1 else args.corpus
    rows = read_rows(corpus, "eval")
    results = {}
    for name, context in (("audio context 2 s", 2.0), ("30 s windows", None)):
        work = args.out / ("context" if context else "window")
        t0 = time.perf_counter()
        r = fit(config(corpus, work, context, args.steps), seed=0)
        train_s = time.perf_counter() - t0
        slu = r.slu
        cache = encoder_cache(slu.model.get_encoder(), slu.feature_extractor, work / "cache", slu.audio_context)
        fill_encoder_cache(cache, slu.model.get_encoder(), slu.feature_extractor, [x["audio"] for x in rows])
        res = {"steps": r.steps, "train_seconds_with_cache_fill": round(train_s, 1),
               "seconds_per_step": round(r.seconds_per_step or 0.0, 3)}
        for dname, options in (("greedy", DecodingOptions(max_new_tokens=64)),
                               ("beam 4", DecodingOptions(max_new_tokens=64, beam_size=4))):
            s = evaluate_cached(slu, rows, cache, options=options, desc=f"{name}, {dname}")
            res[dname] = {k: round(100 * s[k], 2) for k in ("em", "em_tree", "validity", "wer")} | {"decode_seconds": s["seconds"]}
        results[name] = res
        print(json.dumps({name: res}), flush=True)
    (args.out / "compare.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
