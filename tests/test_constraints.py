"""Candidate masks and the state machine, checked against hand-written rules and real TOPv2 trees."""

import csv

import pytest
import torch

from conslu.constraints import BODY, DONE, ERROR, LABEL, OPEN, advance, candidate_mask, init_state
from conslu.loss import lf_candidate_mask, teacher_states
from conftest import TOPV2_DIR, TOPV2_SAMPLE
from slu_fixtures import batch_labels, grammar, slu_tokenizer, tables


def _ids(*names):
    tok = slu_tokenizer()
    return {tok.structure_ids[n] if n in tok.structure_ids else n for n in names}


def test_grammar_table_matches_grammar():
    t, tok, g = tables(), slu_tokenizer(), grammar()
    gm = t.grammar_mask
    assert gm.shape == (len(g.labels) + 1, t.vocab_size)
    assert set(gm[0].nonzero().flatten().tolist()) == {tok.label_ids[c] for c in g.children["ROOT"]}
    for i, lab in enumerate(t.labels):
        assert set(gm[i + 1].nonzero().flatten().tolist()) == {tok.label_ids[c] for c in g.children.get(lab, ())}


def test_masks_follow_the_rules_by_hand():
    tok, t, g = slu_tokenizer(), tables(), grammar()
    transcript, lf = "pause the song", "[IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]"
    labels, targets = batch_labels([(transcript, lf)])
    ls = teacher_states(labels, t)
    m = lf_candidate_mask(ls, t)
    tr = tok.text_ids(transcript)
    song = tok.word_ids("song")[0]
    O, C = tok.open_id, tok.close_id
    lab = lambda p: {tok.label_ids[c] for c in g.children.get(p, ())}  # noqa: E731
    pm_open = {O} if g.children.get("IN:PAUSE_MUSIC") else set()
    mt_open = {O} if g.children.get("SL:MUSIC_TYPE") else set()
    expected = [
        {O},  # after "|"
        lab("ROOT"),  # after "["
        pm_open | {C},  # under an intent: no words
        lab("IN:PAUSE_MUSIC"),
        mt_open | {C} | set(tr),  # under a slot: copies from position 0
        mt_open | {C},  # "song" was the last transcript token
        pm_open | {C},  # back under the intent
        {tok.eos_token_id},  # tree closed
    ]
    got = [set(row.nonzero().flatten().tolist()) for row in m]
    assert ls.targets.tolist() == targets[0][targets[0].index(tok.sep_id) + 1 :]
    assert got == expected
    assert song in expected[4]


def test_greedy_pointer_takes_the_earliest_occurrence():
    tok, t = slu_tokenizer(), tables()
    transcript = "play song one then song two"
    lf = "[IN:PLAY_MUSIC [SL:MUSIC_TRACK_TITLE song two ] ]"
    if not grammar().allows("IN:PLAY_MUSIC", "SL:MUSIC_TRACK_TITLE"):
        pytest.skip("grammar lacks the pair")
    labels, _ = batch_labels([(transcript, lf)])
    ls = teacher_states(labels, t)
    m = lf_candidate_mask(ls, t)
    two = tok.word_ids("two")[0]
    one = tok.word_ids("one")[0]
    # after copying "song" the pointer sits on the FIRST "song": "one" is still allowed
    after_song = [i for i, y in enumerate(ls.targets.tolist()) if y == tok.word_ids("song")[0]][0] + 1
    assert bool(m[after_song, one]) and bool(m[after_song, two])
    assert ls.state.phase.tolist().count(ERROR) == 0


def test_invalid_tokens_lead_to_error_and_eos_only():
    tok, t = slu_tokenizer(), tables()
    seq = torch.tensor([tok.text_ids("hello there")])
    s = init_state(1, t)
    for x in seq[0].tolist() + [tok.sep_id]:
        s = advance(s, torch.tensor([x]), seq, t)
    assert s.phase.item() == OPEN
    s2 = advance(s, torch.tensor([tok.close_id]), seq, t)  # "]" right after "|"
    assert s2.phase.item() == ERROR
    m = candidate_mask(s2, seq, t)
    assert m[0].nonzero().flatten().tolist() == [tok.eos_token_id]
    s = advance(s, torch.tensor([tok.open_id]), seq, t)
    assert s.phase.item() == LABEL
    s = advance(s, torch.tensor([tok.label_ids["IN:GET_WEATHER"]]), seq, t)
    assert s.phase.item() == BODY and s.depth.item() == 1
    s3 = advance(s, seq[:, 0], seq, t)  # a word directly under an intent
    assert s3.phase.item() == ERROR
    s = advance(s, torch.tensor([tok.close_id]), seq, t)
    assert s.phase.item() == DONE and s.depth.item() == 0


def _topv2_pairs(limit_per_file=None):
    from conslu.logical_form import decouple, parse_tree, words

    pairs = []
    for path in sorted((TOPV2_DIR or TOPV2_SAMPLE).glob("*_eval.tsv")):  # the whole release when present
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        for row in rows[:limit_per_file]:
            tree = parse_tree(row["semantic_parse"])
            transcript = " ".join(w.lower() for w in words(tree))
            lf = str(decouple(tree))
            lf = " ".join(x if x.startswith(("[", "]")) else x.lower() for x in lf.split())
            pairs.append((transcript, lf))
    return pairs


def _check_inside(pairs, grammar_ok):
    t = tables()
    n_steps = outside = 0
    for i in range(0, len(pairs), 256):
        chunk = pairs[i : i + 256]
        labels, _ = batch_labels(chunk)
        ls = teacher_states(labels, t)
        m = lf_candidate_mask(ls, t)
        inside = m[torch.arange(len(m)), ls.targets]
        ok_rows = torch.tensor([grammar_ok[i + b] for b in ls.batch.tolist()], dtype=torch.bool)
        n_steps += int(ok_rows.sum())
        outside += int((~inside & ok_rows).sum())
        assert not bool(((ls.state.phase == ERROR) & ok_rows).any())
    return n_steps, outside


def test_topv2_eval_sample_inside_masks():
    pairs = [p for p in _topv2_pairs(limit_per_file=60) if grammar().is_valid(p[1])]
    ok = [True] * len(pairs)
    n_steps, outside = _check_inside(pairs, ok)
    assert n_steps > 1000 and outside == 0


@pytest.mark.slow
def test_all_topv2_eval_inside_masks():
    every = _topv2_pairs()
    pairs = [p for p in every if grammar().is_valid(p[1])]
    n_steps, outside = _check_inside(pairs, [True] * len(pairs))
    print(f"TOPv2 eval: {len(every)} trees, {len(pairs)} allowed by the grammar, {n_steps} LF steps, {outside} outside")
    assert outside == 0 and len(pairs) > 0.99 * len(every)
