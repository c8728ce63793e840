"""``conslu bench [--model DIR] [--device cpu|cuda] [--json] [--plot PNG] [--quick] [--threads N]``:
the cost of the constraints and the gain of copy-speculative decoding (:mod:`conslu.bench`):
a table, or one JSON object with ``--json``. Exit 2 for unusable options or inputs."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from conslu.commands._options import add_model_argument

NAME = "bench"
HELP = "benchmark constrained and speculative decoding"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    add_model_argument(p, required=False)
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", default=None, help="write a PNG of decode time against utterance length")
    p.add_argument("--plot-encoder", default=None, metavar="PNG",
                   help="also time the encoder at 2-30 s of audio (30 s windows and the audio context) and plot it")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--audio-cache", default=None, metavar="DIR",
                   help="keep the spoken utterances in DIR and reuse them (a machine without espeak-ng reads them)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)")


def run(args: argparse.Namespace) -> int:
    import torch

    from conslu import bench

    quick = args.quick
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("conslu bench: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"conslu bench: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    n_utts, repeats, ft_steps = (2, 1, 20) if quick else (8, 3, 60)
    t_start = time.perf_counter()
    try:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory(prefix="conslu-bench-") as tmp:
            where = Path(args.audio_cache) if args.audio_cache else Path(tmp)
            where.mkdir(parents=True, exist_ok=True)
            utts = [bench.Utterance(t, lf, bench.speak(t, where)) for t, lf in bench.demo_examples(n_utts)]
        slu, trained = bench.load_model(args.model, device)
        final_loss = None
        if not trained:
            final_loss = bench.quick_finetune(slu, slu.features([u.audio for u in utts]), utts, ft_steps)
        res = bench.run_bench(slu, utts, repeats=repeats, batch=4 if quick else 16, loss_full_model=not quick,
                              max_new=40 if quick else bench.BENCH_MAX_NEW)
        res.update(bench.context_bench(slu, utts, repeats=repeats, batch=4 if quick else 16))
        if device == "cpu":
            res.update(bench.peer_bench(slu, utts, repeats=repeats, batch=4 if quick else 16))
    except (bench.BenchError, ValueError, OSError) as e:
        print(f"conslu bench: error: {e}", file=sys.stderr)
        return 2
    res.update({"model": args.model or "whisper-tiny.en", "trained": trained, "finetune_loss": final_loss,
                "device": f"{device} ({torch.get_num_threads()} threads)", "quick": quick,
                "torch": torch.__version__, "wall_seconds": time.perf_counter() - t_start})
    if args.plot_encoder:
        res["encoder_curve"] = bench.encoder_curve(slu, batch=4 if quick else 16, repeats=1 if quick else 2)
    for path, draw in ((args.plot, lambda p: bench.plot(res, p)),
                       (args.plot_encoder, lambda p: bench.plot_encoder(res["encoder_curve"], p, res["device"]))):
        if not path:
            continue
        try:
            draw(Path(path))
        except (OSError, ValueError) as e:
            print(f"conslu bench: error: cannot write plot {path}: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(res, indent=None if quick else 2))
    else:
        print(bench.table(res))
        bad = [u for u in res["per_utterance"] if not u["identical"]]
        for u in bad:
            print(f"NOT IDENTICAL: {u['transcript']!r}")
    return 0
