#!/usr/bin/env python
"""The GPU check's measurements (``recipes/gpu/check.sh`` runs this; see README.md beside it).

    python recipes/gpu/check.py prepare --kit runs/gpu-check        # here: kits + the bench's audio
    python recipes/gpu/check.py run --kit runs/gpu-check --out DIR  # there: train, evaluate, bench

``run`` writes into DIR:

* ``gpu-env.json``: torch, CUDA, the device, bf16 support, where the weights came from;
* ``gpu-train.json``: ``--steps`` optimizer steps of whisper-base (``conf/whisper-base.yaml``: batch
  16, bf16-mixed, the whole model) on the kit's corpus: median s/step, steps/s, peak GPU memory;
* ``gpu-evaluate.json``: ``conslu evaluate`` of the trained model on the kit's eval split, one
  process on the GPU, for greedy, copy-speculative greedy (the default) and beam 4 in bf16, and the
  default in fp32: utterances/s (wall time of the command, model loading included, and decode time
  only), and whether greedy and speculative predictions are identical;
* ``gpu-bench.json``: ``conslu bench --device cuda`` on tiny.en, its spoken utterances read from
  the kit.

Weights: the real whisper-base / tiny.en when this machine can resolve them (``$CONSLU_HOME``,
a Hugging Face cache); else the kit's configs with random weights (same shapes and cost; the
figures then are speed and memory only, and EM means nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KIT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json", "merges.txt", "normalizer.json", "added_tokens.json",
             "special_tokens_map.json")
MODELS = ("whisper-base", "whisper-tiny.en")


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"check: wrote {path}", file=sys.stderr)


def prepare(kit: Path) -> None:
    """Weight-free kits of whisper-base and tiny.en, and the bench's utterances spoken into the kit."""
    from conslu import bench
    from conslu.pretrained import resolve_model

    for name in MODELS:
        src = Path(resolve_model(name))
        dst = kit / f"kit-{name}"
        dst.mkdir(parents=True, exist_ok=True)
        for f in KIT_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, dst / f)
    audio = kit / "bench-audio"
    audio.mkdir(parents=True, exist_ok=True)
    for text, _ in bench.demo_examples(8):
        bench.speak(text, audio)


def whisper_folder(name: str, kit: Path, work: Path) -> tuple[str, str]:
    """(folder, "pretrained" | "random init") for ``name``: the real weights when resolvable here,
    else the kit's config with random weights."""
    from conslu.pretrained import resolve_model

    try:
        return str(resolve_model(name)), "pretrained"
    except Exception as e:  # noqa: BLE001 - no weights on this machine: the kit
        print(f"check: {name}: no pretrained weights here ({str(e).splitlines()[0]}); random init", file=sys.stderr)
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    out = work / f"random-{name}"
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(0)
        WhisperForConditionalGeneration(WhisperConfig.from_pretrained(kit / f"kit-{name}")).save_pretrained(out)
        for f in KIT_FILES:
            if (kit / f"kit-{name}" / f).is_file() and f != "config.json":
                shutil.copy(kit / f"kit-{name}" / f, out / f)
    return str(out), "random init"


def train(model: str, corpus: Path, work: Path, steps: int, device: str, quick: bool) -> tuple[dict, Path]:
    import torch

    from conslu.demo import fit
    from conslu.training import export_model

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    args = ["--config", str(REPO / "conf" / "whisper-base.yaml"), "--model.model", model, "--model.grammar", "train",
            "--data.data_dir", str(corpus), "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(work / "train"), "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
            "--trainer.devices", "1", "--model.warmup_steps", str(max(1, steps // 10))]
    if device != "cuda":
        args += ["--trainer.precision", "32-true"]
    if quick:
        args += ["--data.batch_size", "4", "--data.num_workers", "0"]
    res = fit(args)
    out = {"steps": res.steps, "seconds": round(res.seconds, 2), "seconds_per_step": res.seconds_per_step,
           "steps_per_second": None if not res.seconds_per_step else round(1 / res.seconds_per_step, 3),
           "batch_size": 4 if quick else 16, "precision": "bf16-mixed" if device == "cuda" else "32-true"}
    if device == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    model_dir = export_model(res.slu, work / "trained")
    return out, model_dir


def evaluate(model_dir: Path, corpus: Path, work: Path, device: str, quick: bool) -> dict:
    variants = {"greedy_bf16": ["--no-speculative", "--dtype", "bfloat16"],
                "speculative_bf16": ["--dtype", "bfloat16"],
                "beam4_bf16": ["--beam", "4", "--dtype", "bfloat16"],
                "speculative_fp32": []}
    if device != "cuda":
        variants = {k: [a for a in v if a not in ("--dtype", "bfloat16")] for k, v in variants.items()}
    out: dict = {}
    for name, extra in variants.items():
        pred = work / f"eval-{name}.jsonl"
        for p in (pred, Path(str(pred) + ".settings.json")):
            p.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "conslu", "evaluate", "--data", str(corpus), "--split", "eval", "--model",
               str(model_dir), "--device", device, "--batch-size", "16", "--max-new-tokens", "96", "--json",
               "--out", str(pred), *extra] + (["--limit", "16"] if quick else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode not in (0, 1):
            out[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            continue
        res = json.loads(proc.stdout)
        lines = [json.loads(x) for x in pred.read_text().splitlines() if x.strip()]
        decode_s = sum(float(x.get("seconds", 0.0)) for x in lines)
        out[name] = {"n": res["n"], "dtype": "bfloat16" if "bfloat16" in extra else "float32",
                     "utt_per_s_wall": round(res["n"] / wall, 2),
                     "utt_per_s_decode": round(len(lines) / decode_s, 2) if decode_s else None,
                     "em": res["em"], "validity": res["validity"], "wer": res["wer"]}
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                       for x in p.read_text().splitlines() if x.strip()]
    g, s = work / "eval-greedy_bf16.jsonl", work / "eval-speculative_bf16.jsonl"
    if g.is_file() and s.is_file():
        out["speculative_identical_to_greedy"] = strip(g) == strip(s)
    return out


def run(kit: Path, out: Path, device: str, steps: int, quick: bool) -> int:
    import torch

    work = Path(tempfile.gettempdir()) / "conslu-gpu-check"   # models and predictions: not carried back
    work.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
           "name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "bf16": bool(device == "cuda" and torch.cuda.is_bf16_supported())}
    base, env["whisper-base"] = whisper_folder("whisper-base", kit, work)
    tiny, env["whisper-tiny.en"] = whisper_folder("whisper-tiny.en", kit, work)
    _write(out / "gpu-env.json", env)
    corpus = kit / "corpus"
    status = 0
    try:
        figures, model_dir = train(base, corpus, work, 4 if quick else steps, device, quick)
        _write(out / "gpu-train.json", {**figures, "weights": env["whisper-base"]})
        _write(out / "gpu-evaluate.json", {**evaluate(model_dir, corpus, work, device, quick),
                                           "weights": env["whisper-base"], "trained_steps": figures["steps"]})
    except Exception as e:  # noqa: BLE001 - the bench still runs; the failure is in the output
        print(f"check: training/evaluate failed: {type(e).__name__}: {e}", file=sys.stderr)
        status = 1
    cmd = [sys.executable, "-m", "conslu", "bench", "--device", device, "--model", tiny, "--json",
           "--audio-cache", str(kit / "bench-audio")] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        _write(out / "gpu-bench.json", {**json.loads(proc.stdout), "weights": env["whisper-tiny.en"]})
    else:
        print(f"check: bench failed: {proc.stderr.strip()[-2000:]}", file=sys.stderr)
        status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("prepare", "run"))
    p.add_argument("--kit", default=str(REPO / "runs" / "gpu-check"))
    p.add_argument("--out", default=str(REPO / "bench"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="a few steps and utterances (to check the script on a CPU)")
    args = p.parse_args(argv)
    if args.what == "prepare":
        prepare(Path(args.kit))
        return 0
    return run(Path(args.kit), Path(args.out), args.device, args.steps, args.quick)


if __name__ == "__main__":
    sys.exit(main())
