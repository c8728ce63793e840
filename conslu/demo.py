"""``conslu demo``: the whole method end to end on a 2-core CPU, with nothing to download.

Stages (each prints a ``[k/5]`` line; all are safe to rerun):

1. corpus   - speak the embedded TOPv2 text (``conslu/assets/demo``, alarm/timer/weather) with
              espeak-ng into a STOP-layout corpus at ``<workdir>/corpus`` (``conslu synth`` engine,
              parallel; existing wavs are kept, so a rerun only rewrites the manifests).
2. encoder  - run the frozen whisper-tiny.en encoder once per utterance and cache its outputs on
              disk (``<workdir>/cache``, keyed by audio file + encoder fingerprint; reused).
3. train    - fine-tune the decoder only, with the constrained ConSLU loss, through the Lightning
              machinery of :mod:`conslu.training` (``make_cli``: SLUModule + SLUDataModule + Trainer,
              with its progress bar); the result is exported as a ConSLU folder at
              ``<workdir>/model``. Skipped when that folder was trained with the same settings
              (``training.json``); delete the folder to train again.
4. evaluate - greedy decoding of the eval split from the cached encoder outputs, constrained and
              unconstrained, scored with :func:`conslu.metrics.score` (EM, EM-tree, validity, WER).
              Expect the unconstrained row to be poor: ConSLU's loss normalises each tree token over
              its candidate set only, so the model is meant to be decoded with the constraints.
5. parse    - speak a sentence that is not in the training data and parse it with the full model
              (what ``conslu parse <workdir>/sample.wav --model <workdir>/model`` does).

The results are printed as a table and written to ``<workdir>/demo.json``. ``--quick`` is a much
smaller run (a few utterances, a few steps; for the test suite): it exercises every stage but its
model is not expected to parse anything correctly. Its files go to ``<workdir>/quick`` so a quick
run never replaces the full demo's model.

The helpers here (corpus synthesis, training through ``SLUCLI``, scoring from cached encoder
outputs) are also what ``recipes/ablation/run.py`` uses; the encoder cache is
:mod:`conslu.features`' (the same one training fills). The command line is
:mod:`conslu.commands.demo`.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from conslu.atomic import atomic_write_text
from conslu.context import DEFAULT_BUCKET_SECONDS
from conslu.decoding import DecodingOptions
from conslu.synth import DEFAULT_VOICES
from conslu.features import base_encoder, encoder_cache, fill_encoder_cache
from conslu.training.callbacks import StepTimer
from conslu.training.cli import make_cli, run_fit
from conslu.training.export import export_model

__all__ = [
    "DemoSettings",
    "FULL",
    "QUICK",
    "FitResult",
    "demo_text_files",
    "synth_corpus",
    "read_rows",
    "fit",
    "evaluate_cached",
    "run_demo",
    "machine_info",
    "atomic_write_text",
    "format_results",
]

DOMAINS = ("alarm", "timer", "weather")
UNSEEN_VOICES = ("en-us", "en-gb-scotland", "en+f4")  # never in the demo's training corpus

# Sentences for stage 5 with their expected parse; the first whose text is not a training
# transcript is spoken (so the demo parses speech the model has never heard or read).
SAMPLES: tuple[tuple[str, str], ...] = (
    ("set an alarm for seven fifteen tomorrow morning",
     "[IN:CREATE_ALARM [SL:DATE_TIME for seven fifteen tomorrow morning ] ]"),
    ("set an alarm for six forty tomorrow morning",
     "[IN:CREATE_ALARM [SL:DATE_TIME for six forty tomorrow morning ] ]"),
    ("wake me up at five fifty on monday",
     "[IN:CREATE_ALARM [SL:DATE_TIME at five fifty on monday ] ]"),
)


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides what the demo trains (recorded in ``<workdir>/model/training.json``)."""

    train_limit: int | None      # training utterances (spread over the three domains); None: all 1,500
    eval_limit: int | None       # eval utterances; None: all 90
    max_steps: int               # optimizer steps
    batch_size: int
    lr: float
    warmup_steps: int
    max_new_tokens: int          # decoding budget (prompt excluded)
    max_train_minutes: float     # safety net on the training wall time (Lightning max_time); the step
                                 # count is what fits the budget - a busy machine trains the same model, slower
    model: str = "whisper-tiny.en"
    constraints: str = "both"
    target_format: str = "simplified"
    eval_batch_size: int = 16
    audio_context: float | None = DEFAULT_BUCKET_SECONDS  # encoder context bucket (None: 30 s windows)
    freeze_encoder: bool = False  # True: decoder-only, on cached encoder outputs
    spec_augment: bool = True     # with a trained encoder only
    time_mask_param: int = 30     # SpecAugment time masks (frames, of 200-600 in a 2-6 s context)
    noise_snr: tuple[float | None, ...] = (None, 30.0, 20.0)  # noise levels drawn per utterance (None: clean)
    voices: tuple[str, ...] = DEFAULT_VOICES
    unseen_voices: tuple[str, ...] = UNSEEN_VOICES  # the held-out condition: other voices at unseen_snr
    unseen_snr: float | None = 20.0


# The whole model is fine-tuned (encoder reading the audio's length, SpecAugment); the step count is
# what fits the demo's time budget on a 2-core CPU (see README, "Demo").
FULL = DemoSettings(train_limit=None, eval_limit=None, max_steps=400, batch_size=8, lr=2e-4, warmup_steps=40,
                    max_new_tokens=64, max_train_minutes=15.0)
QUICK = DemoSettings(train_limit=12, eval_limit=6, max_steps=3, batch_size=4, lr=3e-4, warmup_steps=1,
                     max_new_tokens=24, max_train_minutes=3.0, eval_batch_size=6)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    """Where a timing was taken: platform, CPU count, torch version and threads."""
    import torch

    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# corpus


def demo_text_files() -> list[Path]:
    """The embedded TOPv2 files: ``{alarm,timer,weather}_{train,eval}.tsv``."""
    root = resources.files("conslu") / "assets" / "demo"
    files = [Path(str(root / f"{d}_{s}.tsv")) for s in ("train", "eval") for d in DOMAINS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"embedded demo data missing (broken install?): {', '.join(missing)}")
    return files


def synth_corpus(files: Sequence[str | os.PathLike], out: str | os.PathLike, *, limit: int | None = None,
                 jobs: int | None = None, seed: int = 0, voices: Sequence[str] | None = None,
                 noise_snr: Any = None) -> Any:
    """Speak TOPv2 ``files`` into a STOP-layout corpus at ``out`` (``conslu synth``; resumable).

    ``limit``: utterances per split, spread over the rows; ``voices``/``noise_snr`` as in
    :func:`conslu.synth.synthesize`. Returns the engine's ``SynthResult``.
    """
    from conslu import synth

    utts = synth.read_inputs([str(f) for f in files])
    if not utts:
        raise ValueError(f"no utterances in {', '.join(map(str, files))}")
    return synth.synthesize(utts, out, seed=seed, jobs=jobs, limit=limit, progress=True, voices=voices,
                            noise_snr=noise_snr)


def read_rows(corpus: str | os.PathLike, split: str) -> list[dict]:
    """The rows of one split of a STOP-layout corpus (:func:`conslu.data.read_stop`)."""
    from conslu.data import read_stop

    ds = read_stop(corpus, split)
    rows = ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]
    if not rows:
        raise ValueError(f"{corpus}: split {split!r} is empty")
    return rows


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class FitResult:
    slu: Any                    # the trained conslu.model.ConSLU
    steps: int                  # optimizer steps done (all runs together when resumed)
    seconds: float              # wall time of trainer.fit in this process
    seconds_per_step: float | None
    batches_timed: int
    module: Any = field(repr=False, default=None)


def fit(args: list[str] | dict, *, seed: int = 0, ckpt_path: str | None = None,
        callbacks: Sequence[Any] = ()) -> FitResult:
    """Train through :func:`conslu.training.make_cli` (the LightningCLI of ``conslu train``) with
    ``args`` (a list of command-line arguments such as ``["--config", "conf/ablation.yaml", ...]``
    or a config dict), then ``trainer.fit``. ``ckpt_path``: resume from this checkpoint.
    ``callbacks``: more Lightning callbacks (after the step timer, so they are not timed)."""
    timer = StepTimer()
    try:
        cli = make_cli(args, seed=seed, callbacks=[timer, *callbacks])
    except SystemExit as e:  # jsonargparse reports bad settings and exits
        raise ValueError(f"invalid training settings (exit status {e.code}; see the message above)") from None
    t0 = time.perf_counter()
    run_fit(cli, ckpt_path)
    seconds = time.perf_counter() - t0
    return FitResult(cli.model.slu, int(cli.trainer.global_step), seconds, timer.seconds_per_step(),
                     len(timer.times), cli.model)


# ---------------------------------------------------------------------------------------------
# evaluation from cached encoder outputs


def evaluate_cached(slu: Any, rows: Sequence[dict], cache: Any, *, options: Any, batch_size: int = 16,
                    desc: str = "decode") -> dict:
    """Decoding of ``rows`` from cached encoder outputs (``conslu.decoding.decode`` with
    ``options``), scored against their references.

    Returns :func:`conslu.metrics.score`'s dict plus ``seconds`` (decode wall time) and
    ``predictions`` (id, transcript, logical_form per row).
    """
    import torch
    from tqdm import tqdm

    from conslu.decoding import decode
    from conslu.metrics import score

    if cache.audio_context != slu.audio_context:
        raise ValueError(f"the encoder cache was filled with audio_context={cache.audio_context}, "
                         f"the model uses audio_context={slu.audio_context}")
    slu.model.eval()
    dtype = next(slu.model.get_decoder().parameters()).dtype
    device = slu.device
    t0 = time.perf_counter()
    encs = []
    for r in rows:
        value = cache.get(cache.key(r["audio"]))
        if value is None:
            raise KeyError(f"{r['audio']}: encoder output missing from the cache")
        encs.append(value)
    by_length: dict[int, list[int]] = {}  # one audio context per batch
    for i, e in enumerate(encs):
        by_length.setdefault(int(e.shape[0]), []).append(i)
    batches = [idx[i : i + batch_size] for _, idx in sorted(by_length.items()) for i in range(0, len(idx), batch_size)]
    hyps: list[dict | None] = [None] * len(rows)
    for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True):
        enc = torch.stack([encs[i] for i in batch]).to(device, dtype)
        for i, out in zip(batch, decode(slu, options, encoder_hidden=enc)):
            hyps[i] = {"id": str(rows[i]["id"]), "transcript": out.get("transcript") or "",
                       "logical_form": out.get("logical_form") or ""}
    seconds = time.perf_counter() - t0
    refs = [{"id": str(r["id"]), "domain": r.get("domain"), "transcript": r.get("transcript") or "",
             "logical_form": r.get("logical_form") or ""} for r in rows]
    result = score(refs, hyps, slu.grammar)
    result["seconds"] = round(seconds, 2)
    result["predictions"] = hyps
    return result


# ---------------------------------------------------------------------------------------------
# tables


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.2f}"


def format_results(rows: Sequence[tuple[str, dict]]) -> str:
    """A markdown table of decoding results: one row per (name, score dict)."""
    lines = ["| decoding | n | EM | EM-tree | valid | WER | utt/s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r.get('n', '-')} | {_pct(r.get('em'))} | {_pct(r.get('em_tree'))} | "
                     f"{_pct(r.get('validity'))} | {_pct(r.get('wer'))} | {r.get('utt_per_s', '-')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the demo


def _levels(noise: Any) -> str:
    values = noise if isinstance(noise, (tuple, list)) else (noise,)
    return "/".join("clean" if v is None else f"{v:g} dB" for v in values)


def _train_config(s: DemoSettings, corpus: Path, cache: Path, root: Path, seed: int, n_train: int) -> dict:
    """The SLUCLI config of the demo's training run (equivalent to ``conslu train`` options)."""
    epochs = -(-s.max_steps // max(1, -(-n_train // s.batch_size)))  # ceil: max_steps decides, the bar shows epochs
    return {
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": s.max_steps, "max_epochs": epochs,
            "max_time": {"seconds": int(s.max_train_minutes * 60)}, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "gradient_clip_val": 1.0, "logger": False, "enable_model_summary": False, "log_every_n_steps": 1,
            "default_root_dir": str(root), "use_distributed_sampler": False,
        },
        "model": {
            "model": s.model, "grammar": "train", "target_format": s.target_format, "constraints": s.constraints,
            "freeze_encoder": s.freeze_encoder, "cache_encoder": s.freeze_encoder, "lr": s.lr,
            "warmup_steps": s.warmup_steps, "weight_decay": 0.01, "val_max_new_tokens": s.max_new_tokens,
            "audio_context": s.audio_context, "spec_augment": s.spec_augment and not s.freeze_encoder,
            "time_mask_param": s.time_mask_param,
        },
        "data": {
            "data_dir": str(corpus), "train_split": "train", "val_split": "eval", "batch_size": s.batch_size,
            "val_batch_size": s.eval_batch_size, "num_workers": 0, "bucket_size": 10,
            "cache_dir": str(cache), "seed": seed, "bucket_by": "duration" if s.audio_context else "target",
        },
        # no checkpoints: the run is short and the exported model is the result
        "checkpoint": {"save_last": False, "save_top_k": 0, "every_n_train_steps": None},
    }


def _stamp(model_dir: Path) -> dict | None:
    f = model_dir / "training.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _pick_sample(train_rows: Sequence[dict]) -> tuple[str, str]:
    seen = {str(r.get("transcript") or "").strip().lower() for r in train_rows}
    for text, lf in SAMPLES:
        if text not in seen:
            return text, lf
    raise ValueError("every demo sample sentence is in the training data")


def run_demo(workdir: Path, settings: DemoSettings, seed: int = 0, jobs: int | None = None) -> dict:
    """Run the five stages; returns the figures written to ``<workdir>/demo.json``."""
    from conslu import synth

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, unseen, cache_dir, model_dir = workdir / "corpus", workdir / "unseen", workdir / "cache", workdir / "model"

    # 1. corpus
    t0 = time.perf_counter()
    _log(f"[1/5] corpus: speaking the embedded alarm/timer/weather text with espeak-ng into {corpus} "
         f"({len(settings.voices)} voices, noise {_levels(settings.noise_snr)}), and the eval text with "
         f"{len(settings.unseen_voices)} other voices at {settings.unseen_snr} dB into {unseen}")
    files = demo_text_files()
    # one run per split: each writes only its own manifest, with its own limit
    written = skipped = 0
    runs = [(corpus, "train", settings.train_limit, settings.voices, settings.noise_snr),
            (corpus, "eval", settings.eval_limit, settings.voices, settings.noise_snr),
            (unseen, "eval", settings.eval_limit, settings.unseen_voices, settings.unseen_snr)]
    for out, split, limit, voices, noise in runs:
        res = synth_corpus([f for f in files if f.stem.endswith("_" + split)], out, jobs=jobs, limit=limit,
                           voices=voices, noise_snr=noise)
        written, skipped = written + res.written, skipped + res.skipped
    train_rows = read_rows(corpus, "train")
    eval_rows = read_rows(corpus, "eval")
    unseen_rows = read_rows(unseen, "eval")
    timings["corpus"] = time.perf_counter() - t0
    _log(f"      {written} wav(s) written, {skipped} already there; "
         f"{len(train_rows)} train / {len(eval_rows)} eval / {len(unseen_rows)} unseen-voice utterances "
         f"({timings['corpus']:.0f} s)")

    # 2. encoder outputs (a frozen encoder only)
    t0 = time.perf_counter()
    if settings.freeze_encoder:
        _log(f"[2/5] encoder: caching frozen {settings.model} encoder outputs in {cache_dir}")
        encoder, fe = base_encoder(settings.model)
        cache = encoder_cache(encoder, fe, cache_dir, settings.audio_context)
        n_new = fill_encoder_cache(cache, encoder, fe, [r["audio"] for r in train_rows + eval_rows],
                                   batch_size=settings.eval_batch_size, desc="encoder")
        del encoder
        _log(f"      {n_new} computed, {len(train_rows) + len(eval_rows) - n_new} reused "
             f"({time.perf_counter() - t0:.0f} s)")
    else:
        _log("[2/5] encoder: trained with the decoder (nothing to cache)")
    timings["encoder"] = time.perf_counter() - t0

    # 3. training
    t0 = time.perf_counter()
    wanted = {"settings": asdict(settings), "seed": seed, "train_ids": [str(r["id"]) for r in train_rows]}
    wanted = json.loads(json.dumps(wanted))  # as the stamp reads back (tuples become lists)
    stamp = _stamp(model_dir)
    train_info: dict[str, Any]
    if stamp is not None and stamp.get("demo") == wanted:
        from conslu.model import ConSLU

        _log(f"[3/5] train: {model_dir} was trained with these settings already - skipped "
             "(delete it to train again)")
        slu = ConSLU.from_pretrained(model_dir)
        train_info = stamp.get("train", {})
    else:
        what = "decoder-only" if settings.freeze_encoder else "whole-model"
        extras = "" if settings.freeze_encoder or not settings.spec_augment else ", SpecAugment"
        context = "30 s windows" if settings.audio_context is None else f"audio context {settings.audio_context:g} s"
        _log(f"[3/5] train: {what} fine-tuning, {settings.max_steps} steps of batch {settings.batch_size}, "
             f"lr {settings.lr:g}, {context}{extras} (Lightning)")
        config = _train_config(settings, corpus, cache_dir, workdir / "lightning", seed, len(train_rows))
        result = fit(config, seed=seed)
        train_info = {"steps": result.steps, "seconds": round(result.seconds, 1),
                      "seconds_per_step": None if result.seconds_per_step is None else round(result.seconds_per_step, 3)}
        slu = result.slu
        export_model(slu, model_dir, {"demo": wanted, "train": train_info, "machine": machine_info()})
        _log(f"      {result.steps} steps in {result.seconds:.0f} s "
             f"({train_info['seconds_per_step']} s/step); model saved to {model_dir}")
    timings["train"] = time.perf_counter() - t0

    # 4. evaluation, constrained and unconstrained, from the cached encoder outputs
    t0 = time.perf_counter()
    _log(f"[4/5] evaluate: decoding of {len(eval_rows)} eval utterances (constrained greedy and beam 4, "
         f"unconstrained) and of {len(unseen_rows)} unseen-voice ones")
    cache = encoder_cache(slu.model.get_encoder(), slu.feature_extractor, cache_dir, slu.audio_context)
    t_enc = time.perf_counter()
    fill_encoder_cache(cache, slu.model.get_encoder(), slu.feature_extractor,
                       [r["audio"] for r in eval_rows + unseen_rows], batch_size=settings.eval_batch_size,
                       desc="encoder")
    encode_seconds = time.perf_counter() - t_enc
    results = {}
    base = DecodingOptions(max_new_tokens=settings.max_new_tokens)
    for name, rows, options in (("constrained", eval_rows, base),
                                ("constrained, beam 4", eval_rows, base.replace(beam_size=4)),
                                ("unconstrained", eval_rows, base.replace(constrained=False)),
                                ("unseen voices, constrained", unseen_rows, base),
                                ("unseen voices, beam 4", unseen_rows, base.replace(beam_size=4))):
        results[name] = evaluate_cached(slu, rows, cache, options=options,
                                        batch_size=settings.eval_batch_size, desc=name)
        # utterances per second, encoder share included (the encoder ran once for all rows above)
        share = encode_seconds * len(rows) / max(1, len(eval_rows) + len(unseen_rows))
        results[name]["utt_per_s"] = round(len(rows) / max(results[name]["seconds"] + share, 1e-9), 2)
    timings["evaluate"] = time.perf_counter() - t0

    # 5. parse one fresh utterance with the full model (encoder included)
    t0 = time.perf_counter()
    text, expected = _pick_sample(train_rows)
    wav = workdir / "sample.wav"
    speaker = synth.Speaker("en+f3", 135, 50)
    _log(f"[5/5] parse: a new sentence spoken by espeak-ng ({speaker.voice}): {text!r} -> {wav}")
    synth.render(wav, text, speaker)
    from conslu.audio import load_audio

    audio = load_audio(wav)
    parsed = slu.parse([audio], base)[0]
    parsed_free = slu.parse([audio], base.replace(constrained=False))[0]
    timings["parse"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    summary = {
        "workdir": str(workdir), "model": str(model_dir), "settings": asdict(settings), "seed": seed,
        "n_train": len(train_rows), "n_eval": len(eval_rows), "n_unseen": len(unseen_rows), "train": train_info,
        "results": {k: {m: v[m] for m in ("n", "em", "em_tree", "validity", "wer", "seconds", "utt_per_s")}
                    for k, v in results.items()},
        "per_domain": {k: v.get("per_domain", {}) for k, v in results.items()},
        "sample": {"wav": str(wav), "text": text, "expected": expected,
                   "constrained": {k: parsed.get(k) for k in ("transcript", "logical_form", "valid")},
                   "unconstrained": {k: parsed_free.get(k) for k in ("transcript", "logical_form", "valid")}},
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "machine": machine_info(),
    }
    atomic_write_text(workdir / "demo.json", json.dumps(summary, indent=1) + "\n")
    for name in results:  # predictions for inspection
        atomic_write_text(workdir / f"predictions-{name.replace(', ', '-').replace(' ', '')}.jsonl",
                          "".join(json.dumps(h) + "\n" for h in results[name]["predictions"]))
    return summary

