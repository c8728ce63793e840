"""The decoding loop (``conslu.search.DecodingTask``) on models that have learned their outputs:
fast path == slow path, beam scores == a from-scratch recomputation of the trained log-probs,
beam search == exhaustive search on tiny budgets, every output closes within its budget."""

from __future__ import annotations

import pytest
import torch

from conslu.constraints import MIN_NEW_TOKENS
from conslu.decoding import DecodingOptions, decode_tokens
from conslu.search import candidate_projection_ok
from decoder_fixtures import (LOOP, PAIRS, check_output, encode, exact_best, family_params, features, make_task,
                              normalised, reference_greedy, sequence_logprobs, time_limit, trained)
from slu_fixtures import tiny_conslu

NOT_LOOP = [i for i in range(len(PAIRS)) if i != LOOP]


def _unseen(n: int = 4) -> torch.Tensor:
    return features(n, seed=7)  # inputs the model was not trained on


@pytest.mark.parametrize("family", family_params())
def test_fast_path_equals_slow_path(family):
    """Decoder body + compact candidate projection (the default for a stock Whisper) gives the
    rows the full ``model(...)`` forward gives, in greedy, speculative and beam search."""
    tr = trained(family)
    slu = tr.slu
    assert candidate_projection_ok(slu.model)
    feats = torch.cat([tr.feats, _unseen(2)])
    enc = encode(slu, feats)
    for kw in ({}, {"speculative": True}, {"beam_size": 3}):
        fast = make_task(slu, max_new=40, **kw)
        slow = make_task(slu, max_new=40, project=False, **kw)
        assert fast.fast and not slow.fast
        a, b = fast.run(enc), slow.run(enc)
        assert a == b, kw
        for row in a:
            check_output(slu, row, 40)
        if "beam_size" not in kw:
            assert fast.stats["compact_rows"] > 0 and slow.stats["compact_rows"] == 0
        else:
            assert fast.stats["beam_scores"] == pytest.approx(slow.stats["beam_scores"], abs=1e-4)
    # and the greedy rows are those of the plainest greedy decoder (full forward per step + the processor)
    assert make_task(slu, max_new=40, loop_guard=False).run(enc) == reference_greedy(slu, feats, 40)


def test_beam_size_one_is_greedy():
    tr = trained("en")
    st: dict = {}
    rows = decode_tokens(tr.slu, DecodingOptions(max_new_tokens=40, beam_size=1), input_features=tr.feats, stats=st)
    assert "beam_scores" not in st
    assert rows == decode_tokens(tr.slu, DecodingOptions(max_new_tokens=40, speculative=False), input_features=tr.feats)


@pytest.mark.parametrize("family", family_params())
@pytest.mark.parametrize("max_new", [9, 64])
def test_beam_scores_are_the_trained_log_probs(family, max_new):
    """``stats["beam_scores"]`` is the returned hypothesis' summed log-prob, recomputed from scratch
    (full-vocabulary log-softmax in the transcript, candidate-set log-softmax after "|"), and on the
    learned inputs its length-normalised score is at least greedy's under the same scoring."""
    tr = trained(family)
    slu, tok = tr.slu, tr.tok
    eos = tok.eos_token_id
    P = len(tok.prefix_ids)
    feats = torch.cat([tr.feats, _unseen(2)])
    st: dict = {}
    opts = DecodingOptions(max_new_tokens=max_new, beam_size=4, loop_guard=False)
    beam = decode_tokens(slu, opts, input_features=feats, stats=st)
    greedy = decode_tokens(slu, opts.replace(beam_size=1), input_features=feats)
    assert len(st["beam_scores"]) == len(beam) == feats.shape[0]
    better = 0
    for b, row in enumerate(beam):
        check_output(slu, row, max_new)
        lp = sequence_logprobs(slu, feats[b], row, max_new)
        assert st["beam_scores"][b] == pytest.approx(sum(lp), abs=2e-4), b
        g = sum(sequence_logprobs(slu, feats[b], greedy[b], max_new))
        mine, theirs = normalised(sum(lp), row[P:], eos), normalised(g, greedy[b][P:], eos)
        if b < len(PAIRS):
            # (not a theorem: openai/whisper's rule stops at beam_size finished hypotheses, and on an
            # input the model is unsure of, short ones can finish first and beat a longer greedy
            # path out of the beam; on the learned inputs the beam must do at least as well)
            assert mine >= theirs - 1e-5, (b, tok.text(row), tok.text(greedy[b]))
            better += mine > theirs + 1e-3
    if max_new == 64:
        # a generous budget: beam search finds the learned parses
        for b in range(len(PAIRS)):
            assert tok.decode(beam[b]) == tr.pairs[b]
    else:
        assert better >= 1  # a tight budget: beam search beats greedy somewhere


def _all_intent_trees(slu, feats1):
    """Every output of max_new_tokens = 5: "| [ IN:X ] <|endoftext|>" for each intent X under ROOT."""
    tok, tables = slu.tokenizer, slu.tables
    intents = tables.grammar_mask[0].nonzero().flatten().tolist()
    rows = [list(tok.prefix_ids) + [tok.sep_id, tok.open_id, x, tok.close_id, tok.eos_token_id] for x in intents]
    return [(normalised(sum(sequence_logprobs(slu, feats1, r, MIN_NEW_TOKENS)), r[len(tok.prefix_ids):],
                        tok.eos_token_id), r) for r in rows]


def test_beam_is_the_best_of_every_tree_at_the_minimum_budget():
    """max_new_tokens = 5 leaves only "| [ IN:X ] <|endoftext|>": the beam's output is the best of them all."""
    tr = trained("en")
    slu = tr.slu
    P = len(slu.tokenizer.prefix_ids)
    st: dict = {}
    utts = [0, 2, 4]
    with time_limit(60):
        beam = decode_tokens(slu, DecodingOptions(max_new_tokens=5, beam_size=4), input_features=tr.feats[utts], stats=st)
    for b, row in zip(utts, beam):
        check_output(slu, row, 5)
        scored = _all_intent_trees(slu, tr.feats[b])
        best_score, best_row = max(scored, key=lambda x: x[0])
        assert row == best_row
        score = st["beam_scores"][utts.index(b)]
        assert normalised(score, row[P:], slu.tokenizer.eos_token_id) == pytest.approx(best_score, abs=1e-4)


@pytest.mark.parametrize("max_new", [6, pytest.param(7, marks=pytest.mark.slow)])
@pytest.mark.parametrize("utt", [0, 4])
def test_beam_equals_exhaustive_search_on_tiny_budgets(max_new, utt):
    """Branch and bound over every constrained output of at most max_new tokens (any transcript of
    max_new - 5 tokens or fewer, any intent) finds nothing better than the beam's output."""
    tr = trained("en")
    slu, tok = tr.slu, tr.tok
    P = len(tok.prefix_ids)
    feats1 = tr.feats[utt]
    st: dict = {}
    beam = decode_tokens(slu, DecodingOptions(max_new_tokens=max_new, beam_size=8), input_features=feats1[None],
                         stats=st)[0]
    check_output(slu, beam, max_new)
    lp = sequence_logprobs(slu, feats1, beam, max_new)
    mine = normalised(sum(lp), beam[P:], tok.eos_token_id)
    assert st["beam_scores"][0] == pytest.approx(sum(lp), abs=2e-4)
    best, better, expanded = exact_best(slu, feats1, max_new, floor=mine - 1e-4)
    assert better is None or best <= mine + 1e-5, (tok.text(list(tok.prefix_ids) + better), best, mine)
    assert expanded > 5  # the search did look beyond the beam's path


@pytest.mark.parametrize("family", family_params())
@pytest.mark.parametrize("max_new", [5, 6, 9, 24])
def test_every_output_closes_within_the_budget(family, max_new):
    """With constraints every output - greedy, speculative and beam, learned and unseen inputs - is
    a valid tree of whole-word in-order copies that ends with <|endoftext|> within max_new_tokens."""
    tr = trained(family)
    slu = tr.slu
    feats = torch.cat([tr.feats, _unseen(4)])
    enc = encode(slu, feats)
    for opts in (DecodingOptions(max_new_tokens=max_new, speculative=False), DecodingOptions(max_new_tokens=max_new),
                 DecodingOptions(max_new_tokens=max_new, beam_size=3)):
        with time_limit(60):
            rows = decode_tokens(slu, opts, encoder_hidden=enc)
        assert len(rows) == feats.shape[0]
        for row in rows:
            out = check_output(slu, row, max_new)
            if max_new == MIN_NEW_TOKENS:
                assert out["transcript_ids"] == [] and len(out["tree_ids"]) == 3


@pytest.mark.parametrize("beam", [2, 3])
def test_beam_search_terminates_at_the_minimum_budget(beam):
    """max_new_tokens = 5 forces "|" first, so an utterance has ONE live hypothesis after the first
    step and beam_size - 1 dead rows still at the prompt: the search must still end (and give
    "| [ IN:X ] <|endoftext|>")."""
    slu = tiny_conslu(0)
    torch.manual_seed(0)
    enc = encode(slu, torch.randn(2, 80, 3000))
    with time_limit(30, "beam search with max_new_tokens=5"):
        rows = make_task(slu, max_new=5, beam_size=beam).run(enc)
    for row in rows:
        out = check_output(slu, row, 5)
        assert out["transcript_ids"] == [] and len(out["tree_ids"]) == 3


def test_batched_beam_rows_are_independent():
    """A batch of utterances (beams reordered and cut per utterance) gives each utterance the
    hypothesis it gets alone."""
    tr = trained("en")
    slu = tr.slu
    feats = torch.cat([tr.feats, _unseen(2)])
    opts = DecodingOptions(max_new_tokens=12, beam_size=3)
    st: dict = {}
    rows = decode_tokens(slu, opts, input_features=feats, stats=st)
    for b in (0, 2, 4, 6, 7):
        one: dict = {}
        assert decode_tokens(slu, opts, input_features=feats[b: b + 1], stats=one) == [rows[b]], b
        assert one["beam_scores"][0] == pytest.approx(st["beam_scores"][b], abs=1e-4)


@pytest.mark.parametrize("family", family_params())
def test_rows_start_with_the_prompt(family):
    tr = trained(family)
    slu, tok = tr.slu, tr.tok
    assert tok.multilingual == (family == "multi")
    assert len(tok.prefix_ids) == (4 if family == "multi" else 2)
    sot, nots = tok.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert tok.prefix_ids[0] == sot and tok.prefix_ids[-1] == nots
    if family == "multi":
        assert tok.prefix_ids[1:3] == tok.tokenizer.convert_tokens_to_ids(["<|en|>", "<|transcribe|>"])
    for opts in (DecodingOptions(max_new_tokens=30), DecodingOptions(max_new_tokens=30, beam_size=2)):
        for row in decode_tokens(slu, opts, input_features=tr.feats[:3]):
            assert row[: len(tok.prefix_ids)] == tok.prefix_ids
            check_output(slu, row, 30)
    assert [r[: len(tok.prefix_ids)] for r in slu.generate(tr.feats[:2], max_new_tokens=30)] == [tok.prefix_ids] * 2


def test_multilingual_language_and_task_prompt():
    tr = trained("multi")
    slu, tok = tr.slu, tr.tok
    fr = tok.prompt_ids("fr", "translate")
    assert fr == tok.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|fr|>", "<|translate|>",
                                                      "<|notimestamps|>"])
    assert tok.prompt_ids("en", "transcribe") == tok.prefix_ids == tok.prompt_ids()
    for beam in (1, 2):
        rows = decode_tokens(slu, DecodingOptions(max_new_tokens=30, language="fr", task="translate", beam_size=beam),
                             input_features=tr.feats[:2])
        for row in rows:
            assert row[:4] == fr
            check_output(slu, row, 30, prompt=fr)
    with pytest.raises(ValueError, match="xx"):
        decode_tokens(slu, DecodingOptions(language="xx"), input_features=tr.feats[:1])
    en = trained("en").slu
    with pytest.raises(ValueError, match="English"):
        decode_tokens(en, DecodingOptions(language="fr"), input_features=tr.feats[:1])
