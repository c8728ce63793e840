"""Constrained decoding: the GrammarLogitsProcessor on random walks and reordered prefixes, the
options / length budget, word-level copies in the state machine, and the multilingual prompt."""

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from conslu.constraints import BODY, DONE, END, ERROR, MIN_NEW_TOKENS, TRANSCRIPT, advance, candidate_mask, init_state
from conslu.decoding import DecodingOptions, GrammarLogitsProcessor, decode, decode_tokens, resolve
from conslu.loss import lf_candidate_mask, teacher_states, uncopyable_rows
from decoder_fixtures import PAIRS, check_ids, check_output, multilingual_slu_tokenizer, multilingual_tables, trained
from slu_fixtures import EXAMPLES, batch_labels, grammar, slu_tokenizer, tables, tiny_conslu


def _family(name):
    """(SLUTokenizer, Tables) of a family; the multilingual one skips when its tokenizer is absent."""
    if name == "multi":
        return multilingual_slu_tokenizer(), multilingual_tables()
    return slu_tokenizer(), tables()


FAMILIES = ["en", "multi"]


def _random_walk(tok, t, seed, batch, max_new, sample_scale=3.0, special_bias=0.0):
    """Drive the processor with random scores (sampling), like generate() but with diverse paths."""
    P = len(tok.prefix_ids)
    g = torch.Generator().manual_seed(seed)
    proc = GrammarLogitsProcessor(t, P, max_length=P + max_new)
    ids = torch.tensor([tok.prefix_ids] * batch)
    done = torch.zeros(batch, dtype=torch.bool)
    # bias towards structure tokens so trees get deep (and, if asked, towards Whisper's specials)
    bias = torch.zeros(t.vocab_size)
    bias[tok.base_vocab_size:] = 4.0
    bias[tok.eos_token_id + 1: tok.base_vocab_size] = special_bias
    for _ in range(max_new):
        scores = torch.randn(batch, t.vocab_size, generator=g) * sample_scale + bias
        scores = proc(ids, scores)
        gumbel = -torch.log(-torch.log(torch.rand(scores.shape, generator=g).clamp_min(1e-9)))
        nxt = (scores + gumbel).argmax(1)  # a sample from softmax(scores)
        nxt = torch.where(done, tok.pad_token_id, nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        done |= nxt == tok.eos_token_id
        if bool(done.all()):
            break
    return ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_new", [MIN_NEW_TOKENS, 8, 40])
def test_random_scores_always_give_valid_trees(family, seed, max_new):
    tok, t = _family(family)
    ids = _random_walk(tok, t, seed, batch=8, max_new=max_new)
    for row in ids.tolist():
        check_ids(tok, grammar(), row, max_new)


@pytest.mark.parametrize("family", FAMILIES)
def test_specials_never_appear_even_when_favoured(family):
    """Whisper's specials (<|notimestamps|>, language tags, timestamps...) are never sampled, in
    the transcript or after "|", even when the scores favour them."""
    tok, t = _family(family)
    for seed in range(2):
        ids = _random_walk(tok, t, seed, batch=8, max_new=30, special_bias=12.0)
        for row in ids.tolist():
            out = check_ids(tok, grammar(), row, 30)
            assert not [x for x in out["gen"][:-1] if tok.eos_token_id <= x < tok.base_vocab_size]


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_scores_are_renormalised_over_candidates(family):
    """After "|" a row's scores are a log-softmax over its candidates (probabilities sum to 1 over
    C_t, -inf elsewhere); in the transcript they are the input scores, masked."""
    tok, t = _family(family)
    P = len(tok.prefix_ids)
    target = tok.encode(*EXAMPLES[2])  # "what is the weather | [IN:GET_WEATHER ]"
    cut = target.index(tok.sep_id)
    tree_row = target[: cut + 3]  # after "| [ IN:GET_WEATHER"
    long_transcript = tok.encode(*EXAMPLES[3])[: len(tree_row)]
    assert tok.sep_id not in long_transcript
    ids = torch.tensor([tok.prefix_ids + long_transcript, tok.prefix_ids + tree_row])
    scores = torch.randn(2, t.vocab_size, generator=torch.Generator().manual_seed(0))
    proc = GrammarLogitsProcessor(t, P)
    out = proc(ids, scores.clone())
    states = proc.states(ids)
    assert states.phase.tolist()[0] == TRANSCRIPT and states.phase.tolist()[1] != TRANSCRIPT
    assert int(states.tlen[1]) == cut  # the transcript is counted after the P-token prompt
    mask = candidate_mask(states, ids[:, P:], t, decoding=True)
    ok0 = torch.isfinite(out[0])
    assert torch.equal(ok0, mask[0]) and torch.equal(out[0][ok0], scores[0][ok0])
    assert torch.equal(torch.isfinite(out[1]), mask[1])
    assert float(out[1].exp().sum()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="prompt"):
        proc(ids[:, : P - 1], scores[:, :])


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_whisper_generate_greedy_and_beam(seed):
    slu = tiny_conslu(seed)
    rng = np.random.default_rng(seed)
    audios = [rng.standard_normal(16000 * (i + 1)).astype(np.float32) * 0.1 for i in range(3)]
    feats = slu.features(audios)
    for beam, max_new in ((1, 7), (1, 24), (3, 7), (3, 24)):
        seqs = slu.generate(feats, beam_size=beam, max_new_tokens=max_new)
        assert isinstance(seqs, list) and len(seqs) == 3
        for row in seqs:
            check_output(slu, row, max_new)
            assert slu.result(row)["valid"]
        assert seqs == decode_tokens(slu, DecodingOptions(beam_size=beam, max_new_tokens=max_new), input_features=feats)
    res = slu.parse(audios[:2], beam_size=2, max_new_tokens=10)
    assert len(res) == 2 and all(r["valid"] for r in res)
    assert res == slu.parse(audios[:2], DecodingOptions(beam_size=2, max_new_tokens=10))
    assert slu.parse([]) == []


def test_unconstrained_decoding_still_available():
    slu = tiny_conslu(0)
    audios = [np.zeros(16000, dtype=np.float32)]
    res = slu.parse(audios, constrained=False, max_new_tokens=6)
    assert set(res[0]) == {"transcript", "logical_form", "valid", "text"}
    assert res[0]["valid"] is False  # a random model cannot produce a tree in 6 free tokens
    # a folder whose constraints are "loss" decodes unconstrained by default
    free = tiny_conslu(0, constraints="loss")
    assert resolve(free, DecodingOptions(max_new_tokens=3)) == (free.tokenizer.prefix_ids, 3, False)
    assert resolve(free, DecodingOptions(max_new_tokens=6, constrained=True))[2] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_handles_reordered_rows_and_arbitrary_prefixes(family):
    tok, t = _family(family)
    P = len(tok.prefix_ids)
    seqs = [tok.prefix_ids + tok.encode(*ex) for ex in EXAMPLES[:4]]
    L = min(len(s) for s in seqs)
    batch = torch.tensor([s[:L] for s in seqs])
    fresh = lambda ids: GrammarLogitsProcessor(t, P)(ids, torch.zeros(ids.shape[0], t.vocab_size))  # noqa: E731
    proc = GrammarLogitsProcessor(t, P)
    g = torch.Generator().manual_seed(0)
    lengths = [P, P + 1, P + 2, P + 3, L - 4, L - 3, P + 5, L - 2, L - 1, L]  # steps, jumps and rollbacks
    for n in lengths:
        perm = torch.randperm(4, generator=g)
        ids = batch[perm, :n]
        got = proc(ids, torch.zeros(4, t.vocab_size))
        assert torch.equal(got, fresh(ids)), n
    # duplicate rows (beam search keeps several children of one parent)
    ids = batch[torch.tensor([1, 1, 3, 0]), : L - 1]
    proc(batch[:, : L - 2], torch.zeros(4, t.vocab_size))
    assert torch.equal(proc(ids, torch.zeros(4, t.vocab_size)), fresh(ids))


def test_generate_with_processor_directly():
    slu = tiny_conslu(3)
    feats = slu.features([np.zeros(8000, dtype=np.float32)] * 2)
    P = len(slu.tokenizer.prefix_ids)
    proc = GrammarLogitsProcessor(slu.tables, P, max_length=P + 12)
    out = slu.model.generate(feats, logits_processor=LogitsProcessorList([proc]), num_beams=2,
                             max_length=P + 12, return_timestamps=False)
    for row in out.tolist():
        check_ids(slu.tokenizer, slu.grammar, row, 12, prompt=row[:P] if row[:P] == slu.tokenizer.prefix_ids else [],
                  require_eos=False)


# -- options and the length budget -------------------------------------------------------------------
def test_resolve_length_budget():
    slu = tiny_conslu(0)
    prompt = slu.tokenizer.prefix_ids
    for n in (1, 3, 4):
        with pytest.raises(ValueError, match=r"\b5\b"):
            resolve(slu, DecodingOptions(max_new_tokens=n))
        with pytest.raises(ValueError, match=r"\b5\b"):
            decode_tokens(slu, DecodingOptions(max_new_tokens=n), input_features=torch.zeros(1, 80, 3000))
    assert resolve(slu, DecodingOptions(max_new_tokens=5)) == (prompt, 5, True)
    assert resolve(slu, DecodingOptions(max_new_tokens=3, constrained=False)) == (prompt, 3, False)
    limit = slu.model.config.max_target_positions - len(prompt)
    assert resolve(slu, DecodingOptions()) == (prompt, min(256, limit), True)
    assert resolve(slu, DecodingOptions(max_new_tokens=limit))[1] == limit
    with pytest.raises(ValueError, match="does not fit"):
        resolve(slu, DecodingOptions(max_new_tokens=limit + 1))
    with pytest.raises(ValueError, match="beam size"):
        DecodingOptions(beam_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodingOptions(max_new_tokens=0)
    opts = DecodingOptions(beam_size=3)
    assert opts.replace(max_new_tokens=9).as_dict() == {**opts.as_dict(), "max_new_tokens": 9}
    with pytest.raises(Exception):
        opts.beam_size = 2  # frozen


def test_decode_returns_results():
    tr = trained("en")
    res = decode(tr.slu, DecodingOptions(max_new_tokens=64), input_features=tr.feats[:3])
    assert [(r["transcript"], r["logical_form"]) for r in res] == tr.pairs[:3]
    assert all(r["valid"] for r in res) and res[0]["text"] == " | ".join(tr.pairs[0])
    with pytest.raises(ValueError, match="input_features or encoder_hidden"):
        decode(tr.slu, DecodingOptions())


# -- word-level copies -------------------------------------------------------------------------------
def _state_after(tok, t, transcript_ids, tree_ids):
    seq = torch.tensor([transcript_ids + [tok.sep_id] + tree_ids + [tok.pad_token_id]])
    s = init_state(1, t)
    for x in transcript_ids + [tok.sep_id] + tree_ids:
        s = advance(s, torch.tensor([x]), seq, t)
    return s, seq


def _allowed(tok, t, transcript_ids, tree_ids, remaining=None):
    s, seq = _state_after(tok, t, transcript_ids, tree_ids)
    m = candidate_mask(s, seq, t, decoding=True, remaining=remaining)[0]
    return s, set(m.nonzero().flatten().tolist())


def _slot_prefix(tok, intent="IN:PLAY_MUSIC", slot="SL:MUSIC_ARTIST_NAME"):
    return [tok.open_id, tok.label_ids[intent], tok.open_id, tok.label_ids[slot]]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_copy_is_a_whole_word(family):
    """"beyonce" is three pieces: a slot may start only at the first, must go on piece by piece,
    and may close (or open a sibling, or start another word) only after the last."""
    tok, t = _family(family)
    play, be = tok.word_ids("play"), tok.word_ids("beyonce")
    assert len(play) == 1 and len(be) == 3
    tr = play + be + tok.word_ids("now")
    now = tok.word_ids("now")[0]
    pre = _slot_prefix(tok)
    s, ok = _allowed(tok, t, tr, pre)
    assert {play[0], be[0], now} <= ok and be[1] not in ok and be[2] not in ok  # word starts only
    s, ok = _allowed(tok, t, tr, pre + be[:1])
    assert ok == {be[1]}  # mid-word: no "]", no "[", no other word
    s, ok = _allowed(tok, t, tr, pre + be[:2])
    assert ok == {be[2]}
    s, ok = _allowed(tok, t, tr, pre + be)
    assert tok.close_id in ok and now in ok and be[0] not in ok and play[0] not in ok
    # the state machine agrees: closing mid-word or skipping a piece is an error
    for bad in (pre + be[:1] + [tok.close_id], pre + be[:1] + [be[2]], pre + [be[1]], pre + be[:1] + [now]):
        s, _ = _state_after(tok, t, tr, bad)
        assert int(s.phase) == ERROR, bad
    s, _ = _state_after(tok, t, tr, pre + be + [tok.close_id, tok.close_id])
    assert int(s.phase) == DONE and int(s.ptr) == len(play) + len(be) - 1
    # the length budget counts the pieces left in the word: "beyonce" (3) + "] ]" + eos needs 6
    _, ok = _allowed(tok, t, tr, pre, remaining=6)
    assert be[0] in ok and play[0] in ok
    _, ok = _allowed(tok, t, tr, pre, remaining=5)
    assert be[0] not in ok and play[0] in ok and now in ok


@pytest.mark.parametrize("family", FAMILIES)
def test_a_shared_first_piece_still_completes_the_later_word(family):
    """"star" is a word and the first piece of "starbucks": after copying " star" both are
    possible, so the slot may close (the later "star") or continue with "bucks"."""
    tok, t = _family(family)
    star, sb = tok.word_ids("star"), tok.word_ids("starbucks")
    assert len(star) == 1 and len(sb) == 2 and sb[0] == star[0]
    pre = _slot_prefix(tok, "IN:GET_LOCATION", "SL:POINT_ON_MAP")
    # the longer word first, the shorter later: "find starbucks near the star"
    tr = tok.text_ids("find starbucks near the star")
    s, ok = _allowed(tok, t, tr, pre + star)
    assert tok.close_id in ok and sb[1] in ok
    assert int(s.wpos[0].sum()) == 2  # both positions are kept
    s, _ = _state_after(tok, t, tr, pre + star + [tok.close_id])
    assert int(s.phase) == BODY and int(s.ptr) == len(tr) - 1  # the copy ended at the later "star"
    s, ok = _allowed(tok, t, tr, pre + sb)  # or it was "starbucks"
    assert tok.close_id in ok and int(s.phase) == BODY
    s, ok = _allowed(tok, t, tr, pre + sb + [tok.close_id, tok.open_id, tok.label_ids["SL:LOCATION_MODIFIER"]])
    near = tok.word_ids("near")[0]
    assert near in ok and star[0] in ok and sb[0] in ok  # words after "starbucks" (" star" is one)
    # the shorter word first: "the star near starbucks"; copying "starbucks" uses the later one
    tr = tok.text_ids("the star near starbucks")
    s, ok = _allowed(tok, t, tr, pre + star)
    assert tok.close_id in ok and sb[1] in ok
    s, ok = _allowed(tok, t, tr, pre + sb)
    assert tok.close_id in ok and not (set(tr) & ok)  # "starbucks" was the last word
    s, ok = _allowed(tok, t, tr, pre + star + [tok.close_id, tok.open_id, tok.label_ids["SL:LOCATION_MODIFIER"]])
    assert near in ok and star[0] in ok  # after "star": "near", and " star" of "starbucks"
    # teacher forcing: both trees are accepted without an error
    pairs = [("find starbucks near the star", "[IN:GET_LOCATION [SL:POINT_ON_MAP star ] ]"),
             ("find starbucks near the star", "[IN:GET_LOCATION [SL:POINT_ON_MAP starbucks ] [SL:LOCATION_MODIFIER near ] ]"),
             ("the star near starbucks", "[IN:GET_LOCATION [SL:POINT_ON_MAP starbucks ] ]"),
             ("the star near starbucks", "[IN:GET_LOCATION [SL:POINT_ON_MAP star ] [SL:LOCATION_MODIFIER near ] ]")]
    labels, _ = batch_labels(pairs, tok)
    assert uncopyable_rows(labels, t) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_path_accepts_every_reference_target(family):
    """teacher_states + lf_candidate_mask: every logical-form token of every reference target is in
    its candidate set, no state is ERROR, and the final state is END."""
    tok, t = _family(family)
    pairs = list(dict.fromkeys(EXAMPLES + PAIRS + [("play the beyonce song be", "[IN:PLAY_MUSIC [SL:MUSIC_ARTIST_NAME be ] ]")]))
    labels, targets = batch_labels(pairs, tok)
    ls = teacher_states(labels, t)
    m = lf_candidate_mask(ls, t)
    assert not bool((ls.state.phase == ERROR).any())
    assert bool(m[torch.arange(m.shape[0]), ls.targets].all())
    assert ls.rows.numel() == sum(len(x) - x.index(tok.sep_id) - 1 for x in targets)
    after = advance(ls.state, ls.targets, ls.seq.index_select(0, ls.batch), t)
    last = torch.tensor([int((ls.batch == b).nonzero().max()) for b in range(len(pairs))])
    assert (after.phase[last] == END).all()
    assert not bool((after.phase == ERROR).any())
    assert uncopyable_rows(labels, t) == []
    # and a tree word that is a piece of a transcript word, or out of order, is refused
    bad = [("play beyonce now", "[IN:PLAY_MUSIC [SL:MUSIC_ARTIST_NAME be ] ]"),
           ("play beyonce now", "[IN:PLAY_MUSIC [SL:MUSIC_ARTIST_NAME now ] [SL:MUSIC_TYPE beyonce ] ]")]
    labels, _ = batch_labels(pairs[:1] + bad, tok)
    assert uncopyable_rows(labels, t) == [1, 2]


def test_specials_are_never_copy_candidates():
    """A transcript holding special tokens (it cannot be decoded, but a hand-made batch may have
    them): they never become copy candidates after "|"."""
    tok, t = slu_tokenizer(), tables()
    specials = tok.tokenizer.convert_tokens_to_ids(["<|notimestamps|>", "<|startoftranscript|>"]) + [tok.eos_token_id + 200]
    word = tok.word_ids("music")
    tr = word + specials + tok.word_ids("now")
    _, ok = _allowed(tok, t, tr, _slot_prefix(tok, "IN:PLAY_MUSIC", "SL:MUSIC_TYPE"))
    assert word[0] in ok and not (set(specials) & ok)


def test_the_output_checker_rejects_bad_outputs():
    """The checker the decoding tests rely on fails on each kind of wrong output."""
    tok, g = slu_tokenizer(), grammar()
    P = list(tok.prefix_ids)
    eos, O, C = tok.eos_token_id, tok.open_id, tok.close_id
    tr = tok.text_ids("play beyonce now")
    lab = tok.label_ids
    good = P + tr + [tok.sep_id, O, lab["IN:PLAY_MUSIC"], O, lab["SL:MUSIC_ARTIST_NAME"]] + tok.word_ids("beyonce") + [C, C, eos]
    assert check_ids(tok, g, good, len(good) - len(P))["lf"] == "[IN:PLAY_MUSIC [SL:MUSIC_ARTIST_NAME beyonce ] ]"
    be = tok.word_ids("beyonce")
    bad = {
        "piece of a word": good[: -6] + be[:1] + [C, C, eos],
        "out of order": P + tr + [tok.sep_id, O, lab["IN:PLAY_MUSIC"], O, lab["SL:MUSIC_ARTIST_NAME"]] + tok.word_ids("now")
        + [C, O, lab["SL:MUSIC_TYPE"]] + be + [C, C, eos],
        "not copied": good[: -6] + tok.word_ids("madonna") + [C, C, eos],
        "no eos": good[:-1],
        "too long": good,
        "open tree": good[:-2] + [eos],
        "special after |": good[:-3] + [tok.prefix_ids[-1]] + good[-3:],
        "grammar": P + tr + [tok.sep_id, O, lab["IN:PLAY_MUSIC"], O, lab["SL:DATE_TIME"]] + be + [C, C, eos],
        "wrong prompt": [P[0]] + good[len(P):],
    }
    for what, row in bad.items():
        with pytest.raises(AssertionError):
            check_ids(tok, g, row, len(good) - len(P) - (what == "too long"))
            pytest.fail(f"checker accepted: {what}")


@pytest.mark.parametrize("family", FAMILIES)
def test_split_clitics_copy_cleanly(family):
    """STOP's ``'s`` is its own word in transcripts and trees (``she 's``, ``katy perry 's``): every
    normalised TOPv2 row with a clitic is a whole-word, in-order copy for the loss and the decoder."""
    import itertools

    from conftest import TOPV2_DIR, TOPV2_SAMPLE
    from conslu.normalize import normalize_example

    tok, t = _family(family)
    labels_known = set(tok.label_ids)
    pairs = [("text tim that she 's late", "[IN:SEND_MESSAGE [SL:RECIPIENT tim ] [SL:CONTENT_EXACT she 's late ] ]"),
             ("play katy perry 's music", "[IN:PLAY_MUSIC [SL:MUSIC_ARTIST_NAME katy perry ] [SL:MUSIC_TYPE music ] ]")]
    for f in sorted((TOPV2_DIR or TOPV2_SAMPLE).glob("*_train.tsv")):
        with open(f, encoding="utf-8") as fh:
            rows = [line.rstrip("\n").split("\t") for line in itertools.islice(fh, 1, None)]
        for _, utt, tree in [r for r in rows if "'s" in r[1]][:25]:
            ex = normalize_example(utt, tree)
            lab = {w.lstrip("[") for w in ex.decoupled_normalized_seqlogical.split() if w.startswith("[")}
            if lab <= labels_known:
                pairs.append((ex.normalized_utterance, ex.decoupled_normalized_seqlogical))
    assert any(" 's" in p[0] for p in pairs[2:]), "no TOPv2 row with a clitic found"
    labels, _ = batch_labels(pairs, tok)
    assert uncopyable_rows(labels, t) == []
    ls = teacher_states(labels, t)
    assert not bool((ls.state.phase == ERROR).any())
