"""Loop guard: ``repeated_tail`` on hand-made rows, and looping transcripts cut in the search."""

from __future__ import annotations

import copy

import pytest
import torch

from conslu.decoding import DecodingOptions, decode_tokens
from conslu.guard import MAX_PERIOD, MIN_REPEAT, repeated_tail
from decoder_fixtures import LOOP, check_output, encode, family_params, features, make_task, trained
from slu_fixtures import tiny_conslu


def _tail(tokens, start=0, pad=0, width=None):
    """repeated_tail of one row ``tokens`` (a list), padded on the right to ``width``."""
    width = width or len(tokens) + 3
    ids = torch.full((1, width), pad, dtype=torch.long)
    ids[0, : len(tokens)] = torch.tensor(tokens)
    return int(repeated_tail(ids, torch.tensor([len(tokens)]), start)[0])


def _first_loop(tokens, start=0):
    """(length at which the guard first fires, tokens it drops) when the row grows one token at a time."""
    for n in range(1, len(tokens) + 1):
        d = _tail(tokens[:n], start)
        if d:
            return n, d
    return None


A, B, C, D = 11, 12, 13, 14


def test_fires_on_periodic_tails_at_whole_copies_only():
    abc3 = [A, B, C] * 3
    assert _tail(abc3) == 6  # drop two copies: "a b c" stays
    assert _tail([7, 8] + abc3) == 6
    # one token after a whole copy, or a partial third copy: not yet
    assert _tail([A, B, C, A, B, C, A]) == 0
    assert _tail([A, B, C, A, B, C, A, B]) == 0
    # growing token by token, it fires exactly when the third copy is complete
    assert _first_loop([5] + [A, B, C] * 4) == (10, 6)
    # two copies of a 3-token phrase are speech, three are a loop
    assert _tail([A, B, C, A, B, C]) == 0
    # two-token phrases: three copies; four-token phrases: two copies (MIN_REPEAT = 4 repeated tokens)
    assert MIN_REPEAT == 4
    assert _tail([A, B, A, B]) == 0 and _tail([A, B] * 3) == 4
    assert _tail([A, B, C, D] * 2) == 4 and _tail([A, B, C, D, A, B, C]) == 0
    # the longest period looked for
    long = list(range(20, 20 + MAX_PERIOD))
    assert _tail(long * 2) == MAX_PERIOD
    assert _tail(list(range(20, 21 + MAX_PERIOD)) * 2) == 0  # period MAX_PERIOD + 1


def test_does_not_fire_on_short_repeats():
    no = 3363
    assert _tail([no, no]) == 0
    assert _tail([no, no, no]) == 0
    assert _tail([no, no, no, no]) == 0
    assert _tail([no] * 5) == 4  # five equal tokens: one stays
    assert _tail([no] * 9) == 8
    assert _tail([A, B, C, D, 15, 16]) == 0


def test_respects_start_and_row_lengths():
    prompt = [A, A, A]
    assert _tail(prompt + [A, A], start=0) == 4
    assert _tail(prompt + [A, A], start=3) == 0  # only the transcript (positions >= start) counts
    assert _tail(prompt + [A] * 5, start=3) == 4
    assert _tail([A, B] * 4, start=4) == 0  # two copies after start
    # per-row lengths: rows of one batch, right padding never counts
    rows = [[A, B, C] * 3, [A, B, C] * 2, [9] * 6, [1, 2]]
    W = 12
    ids = torch.full((len(rows), W), A, dtype=torch.long)  # padding equal to the tail's tokens
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    got = repeated_tail(ids, torch.tensor([len(r) for r in rows]), 0).tolist()
    assert got == [6, 0, 5, 0]


def _loop_ids(tr):
    tok = tr.tok
    t, lf = tr.pairs[LOOP]
    return tok.text_ids(t), tok.text_ids(" ".join(t.split()[:6]))


@pytest.mark.parametrize("mode", ["plain", "speculative", "beam"])
def test_looping_transcript_is_cut_and_parsed(mode):
    """The trained model loops "at eight am" four times on one input: with the guard the
    transcript ends after the first copy and the tree is still valid; without it the loop stays."""
    tr = trained("en")
    slu, tok = tr.slu, tr.tok
    feats = tr.feats[LOOP: LOOP + 1]
    full, first = _loop_ids(tr)
    opts = DecodingOptions(max_new_tokens=48, speculative=mode == "speculative", beam_size=3 if mode == "beam" else 1)
    st_on, st_off = {}, {}
    on = decode_tokens(slu, opts, input_features=feats, stats=st_on)[0]
    off = decode_tokens(slu, opts.replace(loop_guard=False), input_features=feats, stats=st_off)[0]
    a, b = check_output(slu, on, 48), check_output(slu, off, 48)
    assert b["transcript_ids"] == full  # the model really loops
    assert a["transcript_ids"] == first, tok.text(on)  # "set a timer at eight am"
    assert _tail(a["transcript_ids"]) == 0
    assert len(off) > len(on)
    assert st_off["loops_cut"] == 0 and st_on["loops_cut"] >= 1


def test_cut_rows_in_a_batch_leave_the_other_rows_alone():
    """A cut in one row (cache slots become holes) changes nothing in the others."""
    tr = trained("en")
    slu = tr.slu
    with_guard = decode_tokens(slu, DecodingOptions(max_new_tokens=48), input_features=tr.feats)
    without = decode_tokens(slu, DecodingOptions(max_new_tokens=48, loop_guard=False), input_features=tr.feats)
    for i in range(len(tr.pairs)):
        check_output(slu, with_guard[i], 48)
        if i != LOOP:
            assert with_guard[i] == without[i], i
    assert with_guard[LOOP] != without[LOOP]


def test_forced_loop_by_hook_is_cut():
    """A model forced to repeat (a hook on the decoder pushes the hidden state toward one token's
    output embedding in every position): the guard cuts the transcript and the tree closes."""
    tr = trained("en")
    slu = copy.deepcopy(tr.slu)
    tok = slu.tokenizer
    word = tok.word_ids("again")[0]
    emb = slu.model.get_output_embeddings().weight[word].detach().clone()

    def push(module, args, out):
        out.last_hidden_state[..., :] += 40.0 * emb / emb.norm()
        return out

    h = slu.model.get_decoder().register_forward_hook(push)
    try:
        feats = tr.feats[:2]
        for speculative in (False, True):
            st = {}
            rows = decode_tokens(slu, DecodingOptions(max_new_tokens=40, speculative=speculative), input_features=feats,
                                 stats=st)
            off = decode_tokens(slu, DecodingOptions(max_new_tokens=40, speculative=speculative, loop_guard=False),
                                input_features=feats)
            for r, o in zip(rows, off):
                out = check_output(slu, r, 40)
                assert _tail(out["transcript_ids"]) == 0
                assert len(check_output(slu, o, 40)["transcript_ids"]) > len(out["transcript_ids"])
            assert st["loops_cut"] >= 2
    finally:
        h.remove()


def test_random_model_loops_are_cut():
    """The tiny random Whisper repeats one token: once with the guard, until the budget without it."""
    slu = tiny_conslu(1)
    torch.manual_seed(0)
    enc = encode(slu, torch.randn(2, 80, 3000))
    for beam in (1, 2):
        on = make_task(slu, max_new=30, beam_size=beam).run(enc)
        off = make_task(slu, max_new=30, beam_size=beam, loop_guard=False).run(enc)
        for r, o in zip(on, off):
            a, b = check_output(slu, r, 30), check_output(slu, o, 30)
            assert _tail(a["transcript_ids"]) == 0
            assert len(b["transcript_ids"]) >= 20 > len(a["transcript_ids"])


@pytest.mark.parametrize("family", family_params())
def test_beam_search_survives_a_cut_next_to_finished_utterances(family):
    """Beam search over a batch where the guard cuts one utterance's hypotheses (so they need more
    steps than the budget) while the other utterances have already finished: no row may run past
    the budget. (conslu/search.py at 68ae84b: IndexError, the finished rows kept growing.)"""
    tr = trained(family)
    slu = tr.slu
    feats = torch.cat([tr.feats, features(4, seed=7)])
    for idx in ([LOOP, 4], [LOOP, 6], list(range(feats.shape[0]))):
        st: dict = {}
        rows = decode_tokens(slu, DecodingOptions(max_new_tokens=24, beam_size=3), input_features=feats[idx], stats=st)
        assert st["loops_cut"] >= 1
        for r in rows:
            out = check_output(slu, r, 24)
            assert _tail(out["transcript_ids"]) == 0
