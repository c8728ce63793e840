#!/usr/bin/env python
"""The paper's ablation at CPU scale, on (synthetic) speech.

    python recipes/ablation/run.py [--out results] [--train-per-domain N] [--eval-per-domain N]
                                   [--domains alarm timer weather] [--topv2 DIR] [--work DIR] [--smoke]

Steps (see README.md next to this file):

1. text     - N training rows per domain (spread over ``<topv2>/<domain>_train.tsv``) and M eval rows
              per domain (``<domain>_eval.tsv``), written as TOPv2 files under the work folder;
2. corpus   - spoken with espeak-ng into a STOP-layout corpus (``conslu synth`` engine; resumable);
3. encoder  - whisper-tiny.en encoder outputs computed ONCE per utterance, cached on disk and shared
              by every variant (the encoder is frozen and identical in all of them);
4. train    - three decoder-only models through ``conslu train``'s Lightning machinery, configured
              by ``conf/ablation.yaml`` plus an overlay: ConSLU (constrained loss), plain loss
              (``conf/ablation/plain-loss.yaml``) and WhiSLU JSON target (``conf/ablation/whislu.yaml``);
5. evaluate - four variants on the same eval split (greedy, from the cached encoder outputs), and
              (1) and (2) again with beam 4:
              (1) ConSLU: simplified target, constrained loss + constrained decoding;
              (2) simplified target, plain loss, constrained decoding;
              (3) simplified target, no constraints (the model of (2), decoded freely);
              (4) WhiSLU JSON target, no constraints.

Outputs: ``<out>/ablation.json`` and ``<out>/ablation.md`` (a markdown table beside the paper's
whisper-base figures), and ``<out>/ablation_curve.png``: greedy EM on the eval split every
``--curve-every`` steps of each training, per variant (a record of how the variants learn; the
evaluated model is always the last step, so nothing is selected on the eval split). Each variant's entry is written (atomically) as soon as it is done; a
rerun with the same settings skips finished variants, reuses trained models, and resumes an
interrupted training from its ``last.ckpt``. ``--smoke``: a handful of utterances and steps
(a couple of minutes; for tests) - its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from conslu.atomic import atomic_write_text  # noqa: E402
from conslu.context import DEFAULT_BUCKET_SECONDS  # noqa: E402
from conslu.data import spread  # noqa: E402
from conslu.decoding import DecodingOptions  # noqa: E402
from conslu.demo import evaluate_cached, fit, machine_info, read_rows, synth_corpus  # noqa: E402
from conslu.features import base_encoder, encoder_cache, fill_encoder_cache  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

DEFAULT_TOPV2 = Path(os.environ.get("CONSLU_TOPV2_DIR", REPO.parent / "shared" / "data" / "topv2"))
CONFIG = REPO / "conf" / "ablation.yaml"

# trained models: name -> (overlay config or None, what it is)
MODELS: dict[str, tuple[Path | None, str]] = {
    "conslu": (None, "simplified target, constrained loss"),
    "plain": (REPO / "conf" / "ablation" / "plain-loss.yaml", "simplified target, plain loss"),
    "whislu": (REPO / "conf" / "ablation" / "whislu.yaml", "WhiSLU JSON target, plain loss"),
}
# variants: name -> (trained model, constrained decoding, beam size, label)
VARIANTS: dict[str, tuple[str, bool, int, str]] = {
    "conslu": ("conslu", True, 1, "(1) ConSLU: simplified target, constrained loss + constrained decoding"),
    "conslu_beam4": ("conslu", True, 4, "(1b) ConSLU, beam 4"),
    "plain_loss": ("plain", True, 1, "(2) simplified target, plain loss, constrained decoding"),
    "plain_loss_beam4": ("plain", True, 4, "(2b) simplified target, plain loss, constrained decoding, beam 4"),
    "no_constraints": ("plain", False, 1, "(3) simplified target, no constraints"),
    "whislu": ("whislu", False, 1, "(4) WhiSLU JSON target, no constraints"),
}
# The paper's whisper-base figures on STOP test (KSE 2024): EM and validity (percent), where reported.
PAPER: dict[str, dict[str, float | None]] = {
    "conslu": {"em": 72.51, "validity": 100.0},
    "plain_loss": {"em": None, "validity": None},
    "no_constraints": {"em": 71.35, "validity": None},
    "whislu": {"em": 70.19, "validity": 99.59},
}
PAPER_NOTES = ("Paper (whisper-base, real STOP speech, test split): ConSLU 72.51 EM; without constrained decoding "
               "71.35; without the simplified target 71.17; WhiSLU-base 70.19. Validity: WhiSLU-base 99.59%, "
               "ConSLU 100%. The paper has no plain-loss + constrained-decoding row.")

SMOKE = {"train_per_domain": 4, "eval_per_domain": 2, "domains": ["alarm", "timer"], "max_steps": 2, "batch_size": 4,
         "max_new_tokens": 24, "whislu_max_new_tokens": 32}


# ---------------------------------------------------------------------------------------------
# text subsets


def write_subsets(topv2: Path, domains: Sequence[str], per_split: dict[str, int | None], out: Path) -> list[Path]:
    """``<out>/<domain>_<split>.tsv``: the chosen rows of each TOPv2 file (header kept); atomic writes."""
    written = []
    for split, k in per_split.items():
        for domain in domains:
            src = topv2 / f"{domain}_{split}.tsv"
            if not src.is_file():
                raise FileNotFoundError(f"{src}: no such TOPv2 file (see --topv2 and --domains)")
            with open(src, encoding="utf-8", newline="") as fh:
                lines = fh.read().splitlines()
            if not lines:
                raise ValueError(f"{src}: empty file")
            body = [ln for ln in lines[1:] if ln.strip()]
            keep = [body[i] for i in spread(len(body), k)]
            dst = out / f"{domain}_{split}.tsv"
            atomic_write_text(dst, "\n".join([lines[0], *keep]) + "\n")
            written.append(dst)
    return written


# ---------------------------------------------------------------------------------------------
# EM against training steps


class Curve(Callback):
    """Every ``every`` optimizer steps, greedy EM / EM-tree / validity of the model being trained on
    ``rows`` (from the encoder cache) for each of ``variants`` (name -> DecodingOptions). Points are
    kept in ``path`` (JSON), so a resumed training keeps the points of its first run."""

    def __init__(self, every: int, rows: Sequence[dict], cache: Any, variants: dict[str, DecodingOptions],
                 path: Path) -> None:
        self.every, self.rows, self.cache, self.variants, self.path = every, rows, cache, variants, path
        self.points: dict[str, list[dict]] = json.loads(path.read_text()) if path.is_file() else {}
        self.seconds = 0.0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step % self.every or any(p["step"] == step for ps in self.points.values() for p in ps):
            return
        t0 = time.perf_counter()
        modes = [(m, m.training) for m in pl_module.modules()]
        try:
            for name, options in self.variants.items():
                r = evaluate_cached(pl_module.slu, self.rows, self.cache, options=options, batch_size=16,
                                    desc=f"{name} @ {step}")
                self.points.setdefault(name, []).append(
                    {"step": step, "em": r["em"], "em_tree": r["em_tree"], "validity": r["validity"]})
        finally:
            for m, training in modes:
                m.train(training)
        atomic_write_text(self.path, json.dumps(self.points, indent=1) + "\n")
        self.seconds += time.perf_counter() - t0


def plot_curves(report: dict, path: Path) -> None:
    """EM against training steps for every variant with a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from conslu.bench import save_plot

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    short = {"conslu": "(1) ConSLU", "plain_loss": "(2) plain loss", "no_constraints": "(3) no constraints",
             "whislu": "(4) WhiSLU"}
    for name in VARIANTS:
        points = report.get("curves", {}).get(name)
        if points:
            ax.plot([p["step"] for p in points], [100 * p["em"] for p in points], "o-", label=short.get(name, name))
    save_plot(fig, ax, path, "training step", "EM on eval (%), greedy",
              f"ablation: {report.get('config', {}).get('n_train', '?')} training utterances")


# ---------------------------------------------------------------------------------------------
# results


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.2f}"


def _paper(x: Any) -> str:
    return "-" if x is None else f"{float(x):.2f}"


def format_markdown(report: dict) -> str:
    """The README table: our CPU-scale figures per variant next to the paper's whisper-base ones."""
    cfg = report.get("config", {})
    lines = [
        f"Whisper tiny.en, frozen encoder reading a 2 s audio context, decoder fine-tuned on {cfg.get('n_train', '?')} "
        f"espeak-ng utterances ({', '.join(cfg.get('domains', []))}); greedy decoding (beam 4 where named) of "
        f"{cfg.get('n_eval', '?')} held-out "
        f"utterances (TOPv2 eval text, synthetic speech). EM, EM-tree, validity and WER in percent.",
        "",
        "| variant | EM | EM-tree | validity | WER | n | train steps | train s | paper EM (base) | paper validity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    variants = report.get("variants", {})
    for name, (_, _, _, label) in VARIANTS.items():
        v = variants.get(name)
        p = PAPER.get(name, {})
        if v is None:
            lines.append(f"| {label} | (not run) | | | | | | | {_paper(p.get('em'))} | {_paper(p.get('validity'))} |")
            continue
        lines.append(f"| {label} | {_pct(v['em'])} | {_pct(v['em_tree'])} | {_pct(v['validity'])} | {_pct(v['wer'])} | "
                     f"{v['n']} | {v['train_steps']} | {v['train_seconds']:.0f} | {_paper(p.get('em'))} | "
                     f"{_paper(p.get('validity'))} |")
    m = report.get("machine") or {}
    curves = report.get("curves") or {}
    if curves:
        every = cfg.get("curve_every")
        lines += ["", f"Greedy EM on the eval split during training (every {every} steps; the table's models are "
                      "the last step): `ablation_curve.png`.", "",
                  "| variant | " + " | ".join(str(p["step"]) for p in next(iter(curves.values()))) + " |",
                  "|---|" + "---:|" * len(next(iter(curves.values())))]
        for name, points in curves.items():
            lines.append(f"| {name} | " + " | ".join(_pct(p["em"]) for p in points) + " |")
    lines += ["", PAPER_NOTES]
    if m:
        lines.append(f"Run on {m.get('platform')} ({m.get('cpu_count')} CPUs, torch {m.get('torch')}).")
    if cfg.get("smoke"):
        lines.append("SMOKE RUN: a handful of utterances and steps; the figures mean nothing.")
    return "\n".join(lines) + "\n"


def load_report(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: unreadable results file ({e}); move it away to start over") from None
    return data if isinstance(data, dict) else {}


def save_report(out: Path, report: dict) -> None:
    """Write ablation.json and ablation.md (each atomically)."""
    atomic_write_text(out / "ablation.json", json.dumps(report, indent=1, sort_keys=True) + "\n")
    atomic_write_text(out / "ablation.md", format_markdown(report))


# ---------------------------------------------------------------------------------------------
# the run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "results"), help="folder for ablation.json / ablation.md")
    p.add_argument("--work", default=None, help="corpus, encoder cache, checkpoints and models "
                   "(default runs/ablation, runs/ablation-smoke with --smoke)")
    p.add_argument("--topv2", default=str(DEFAULT_TOPV2), help="folder with TOPv2 <domain>_{train,eval}.tsv")
    p.add_argument("--domains", nargs="+", default=None, help="default: alarm timer weather")
    p.add_argument("--train-per-domain", type=int, default=None, help="training utterances per domain (default 600)")
    p.add_argument("--eval-per-domain", type=int, default=None, help="eval utterances per domain (default 100)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per trained model (default: conf)")
    p.add_argument("--config", default=str(CONFIG), help="base training config (LightningCLI YAML)")
    p.add_argument("--jobs", type=int, default=None, help="espeak-ng processes (default: CPU count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve-every", type=int, default=None,
                   help="greedy EM on the eval split every N training steps (default 50; 1 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end run (minutes) for tests")
    args = p.parse_args(argv)
    for name in ("train_per_domain", "eval_per_domain", "max_steps", "curve_every"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return args


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _train_args(config: Path, overlay: Path | None, corpus: Path, cache: Path, root: Path,
                extra: dict[str, Any]) -> list[str]:
    args = ["--config", str(config)]
    if overlay is not None:
        args += ["--config", str(overlay)]
    args += ["--data.data_dir", str(corpus), "--data.cache_dir", str(cache), "--trainer.default_root_dir", str(root)]
    for k, v in extra.items():
        args += [f"--{k}", str(v)]
    return args


def run(args: argparse.Namespace) -> dict:
    from conslu.model import ConSLU
    from conslu.training import export_model

    smoke = bool(args.smoke)
    domains = list(args.domains or (SMOKE["domains"] if smoke else ["alarm", "timer", "weather"]))
    n_train = args.train_per_domain or (SMOKE["train_per_domain"] if smoke else 600)
    n_eval = args.eval_per_domain or (SMOKE["eval_per_domain"] if smoke else 100)
    out = Path(args.out)
    work = Path(args.work or (REPO / "runs" / ("ablation-smoke" if smoke else "ablation")))
    config = Path(args.config)
    topv2 = Path(args.topv2)
    curve_every = args.curve_every or (1 if smoke else 50)
    extra: dict[str, Any] = {"seed_everything": args.seed, "data.seed": args.seed}
    if args.max_steps or smoke:
        extra["trainer.max_steps"] = args.max_steps or SMOKE["max_steps"]
    if smoke:
        extra.update({"data.batch_size": SMOKE["batch_size"], "model.val_max_new_tokens": SMOKE["max_new_tokens"],
                      "model.warmup_steps": 1})

    # what decides the results: a rerun with other settings starts a fresh report
    settings = {"domains": domains, "train_per_domain": n_train, "eval_per_domain": n_eval, "seed": args.seed,
                "config": config.read_text(encoding="utf-8"),
                "overlays": {k: (o.read_text(encoding="utf-8") if o else None) for k, (o, _) in MODELS.items()},
                "extra": extra, "topv2": str(topv2.resolve()), "curve_every": curve_every}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    report = load_report(out / "ablation.json")
    if report.get("key") != key:
        if report.get("variants"):
            _log(f"ablation: {out / 'ablation.json'} holds a run with other settings; starting a new report")
        report = {"key": key, "variants": {}}
    report["config"] = {"domains": domains, "train_per_domain": n_train, "eval_per_domain": n_eval,
                        "seed": args.seed, "smoke": smoke, "config": _shown(config), "extra": extra,
                        "curve_every": curve_every}
    report["paper"] = {"model": "whisper-base", "split": "STOP test", "figures": PAPER, "notes": PAPER_NOTES}
    report["machine"] = machine_info()
    t_start = time.perf_counter()

    # 1-2: text subsets and corpus (keyed by the selection, since file names follow row positions)
    corpus_key = hashlib.sha256(json.dumps([domains, n_train, n_eval, str(topv2.resolve())]).encode()).hexdigest()[:10]
    corpus = work / f"corpus-{corpus_key}"
    _log(f"[1/4] corpus: {n_train} train + {n_eval} eval utterances per domain ({', '.join(domains)}) -> {corpus}")
    files = write_subsets(topv2, domains, {"train": n_train, "eval": n_eval}, work / f"text-{corpus_key}")
    for split in ("train", "eval"):
        res = synth_corpus([f for f in files if f.stem.endswith("_" + split)], corpus, jobs=args.jobs)
        _log(f"      {split}: {res.written} wav(s) written, {res.skipped} already there")
    train_rows, eval_rows = read_rows(corpus, "train"), read_rows(corpus, "eval")
    report["config"].update({"n_train": len(train_rows), "n_eval": len(eval_rows)})

    # 3: encoder outputs, once for all variants
    t0 = time.perf_counter()
    cache_dir = work / "cache"
    _log(f"[2/4] encoder: caching whisper-tiny.en encoder outputs in {cache_dir}")
    encoder, fe = base_encoder("whisper-tiny.en")
    cache = encoder_cache(encoder, fe, cache_dir, DEFAULT_BUCKET_SECONDS)  # the variants' context (conf default)
    n_new = fill_encoder_cache(cache, encoder, fe, [r["audio"] for r in train_rows + eval_rows], batch_size=16,
                               desc="encoder")
    report.setdefault("encoder_cache", {})
    if n_new:
        report["encoder_cache"] = {"computed": n_new, "seconds": round(time.perf_counter() - t0, 1),
                                   "seconds_per_utterance": round((time.perf_counter() - t0) / n_new, 3)}
    del encoder

    # 4-5: train what the missing variants need, evaluate, record each variant when done
    models: dict[str, Any] = {}
    train_info: dict[str, dict] = dict(report.get("training", {}))
    for i, (name, (model_name, constrained, beam, label)) in enumerate(VARIANTS.items(), 1):
        if name in report["variants"]:
            _log(f"[3/4] {label}: done already - skipped")
            continue
        if model_name not in models:
            mdir = work / "models" / model_name
            stamp = mdir / "training.json"
            done = stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")).get("key") == key
            if done and model_name in train_info:
                _log(f"[3/4] train {model_name} ({MODELS[model_name][1]}): {mdir} exists - reused")
                models[model_name] = ConSLU.from_pretrained(mdir)
            else:
                overlay = MODELS[model_name][0]
                root = work / "train" / f"{model_name}-{key}"  # a checkpoint of other settings is never resumed
                last = root / "checkpoints" / "last.ckpt"
                ckpt = str(last) if last.is_file() else None
                _log(f"[3/4] train {model_name} ({MODELS[model_name][1]})" + (f", resuming from {last}" if ckpt else ""))
                curve = Curve(curve_every, eval_rows, cache,
                              {v: _options(slu_format(model_name), c, b, smoke) for v, (m, c, b, _) in VARIANTS.items()
                               if m == model_name and b == 1}, root / "curve.json")
                res = fit(_train_args(config, overlay, corpus, cache_dir, root, extra), seed=args.seed, ckpt_path=ckpt,
                          callbacks=[curve])
                report.setdefault("curves", {}).update(curve.points)
                train_info[model_name] = {"steps": res.steps, "seconds": round(res.seconds - curve.seconds, 1),
                                          "curve_seconds": round(curve.seconds, 1), "resumed": bool(ckpt),
                                          "seconds_per_step": None if res.seconds_per_step is None
                                          else round(res.seconds_per_step, 3),
                                          "target_format": res.slu.target_format, "constraints": res.slu.constraints}
                export_model(res.slu, mdir, {"key": key, "train": train_info[model_name]})
                models[model_name] = res.slu
                report["training"] = train_info
                save_report(out, report)
                _log(f"      {res.steps} steps in {res.seconds:.0f} s ({train_info[model_name]['seconds_per_step']} s/step)")
        slu = models[model_name]
        _log(f"[4/4] evaluate {label} on {len(eval_rows)} utterances")
        r = evaluate_cached(slu, eval_rows, cache, batch_size=16, desc=name,
                            options=_options(slu.target_format, constrained, beam, smoke))
        t = train_info[model_name]
        report["variants"][name] = {
            "label": label, "model": model_name, "target_format": slu.target_format,
            "loss_constrained": bool(slu.loss_constrained), "decoding_constrained": constrained, "beam_size": beam,
            "em": r["em"], "em_tree": r["em_tree"], "validity": r["validity"], "wer": r["wer"], "n": r["n"],
            "per_domain": r.get("per_domain", {}), "train_steps": t["steps"], "train_seconds": t["seconds"],
            "seconds_per_step": t["seconds_per_step"], "decode_seconds": r["seconds"], "machine": machine_info(),
        }
        atomic_write_text(work / "predictions" / f"{name}.jsonl", "".join(json.dumps(h) + "\n" for h in r["predictions"]))
        save_report(out, report)
        _log(f"      EM {_pct(r['em'])}  EM-tree {_pct(r['em_tree'])}  validity {_pct(r['validity'])}  "
             f"WER {_pct(r['wer'])}  ({r['seconds']} s)")
    report["seconds_this_run"] = round(time.perf_counter() - t_start, 1)
    save_report(out, report)
    if report.get("curves"):
        plot_curves(report, out / "ablation_curve.png")
    return report


def slu_format(model_name: str) -> str:
    """The target format a trained model of ``MODELS`` writes."""
    return "whislu" if model_name == "whislu" else "simplified"


def _options(target_format: str, constrained: bool, beam: int, smoke: bool) -> DecodingOptions:
    if smoke:
        max_new = SMOKE["whislu_max_new_tokens" if target_format == "whislu" else "max_new_tokens"]
    else:
        max_new = 128 if target_format == "whislu" else 64
    return DecodingOptions(constrained=constrained, max_new_tokens=max_new, beam_size=beam)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"ablation: {e}", file=sys.stderr)
        return 1
    print(format_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
