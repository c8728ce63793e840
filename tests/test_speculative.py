"""Copy-speculative greedy decoding is lossless: token-identical to plain constrained greedy
(``speculative=False``) and to transformers' ``model.generate`` with ``GrammarLogitsProcessor``,
on models that have learned their outputs (``decoder_fixtures.trained``) and on random ones."""

from __future__ import annotations

import pytest
import torch

from conslu.constraints import BODY, DONE, END, ERROR, LABEL, OPEN, TRANSCRIPT, advance, candidate_mask, init_state
from conslu.decoding import DecodingOptions, decode_tokens
from conslu.speculative import CPU_DRAFT_BUDGET, DRAFT_LEN, default_draft_budget, draft_step, draft_tokens, label_prior
from decoder_fixtures import (LOOP, NESTED, PAIRS, check_output, encode, family_params, generated, hf_generate,
                              features, make_task, reference_greedy, trained, tree_facts, untrained)
from slu_fixtures import EXAMPLES, slu_tokenizer, tables, tiny_conslu


def _hf_kwargs(slu) -> dict:
    # a multilingual Whisper's generate() detects the language unless told: ConSLU prompts English transcription
    return {"language": "en", "task": "transcribe"} if slu.tokenizer.multilingual else {}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_new", [10, 48])
def test_identical_to_generate_random_model(seed, max_new):
    slu = untrained("en", seed)
    tok = slu.tokenizer
    P = len(tok.prefix_ids)
    feats = features(3, seed=10 + seed)
    ref = hf_generate(slu, feats, max_new)
    enc = encode(slu, feats)
    for d in (0, 4, 8):
        st: dict = {}
        rows = decode_tokens(slu, DecodingOptions(max_new_tokens=max_new, speculative=d > 0, loop_guard=False),
                             encoder_hidden=enc, stats=st, draft_len=d)
        for b, row in enumerate(rows):
            check_output(slu, row, max_new)
            assert generated(row, tok) == generated(ref[b], tok), f"row {b}, draft_len {d}"
        if d == 0:
            # one pass per token, except the <|endoftext|> after a closed tree (appended without a pass)
            eos = tok.eos_token_id
            assert st["drafted"] == 0
            assert st["decoder_passes"] == max(len(s) - P - (s[-1] == eos) for s in rows)
            assert st["forced_eos"] == sum(s[-1] == eos for s in rows)


@pytest.mark.parametrize("family", family_params())
def test_trained_model_speculative_equals_plain_equals_generate(family):
    """The trained model parses its inputs: speculative greedy, plain greedy and HF generate with
    the processor agree token for token, batched and one row at a time, and the outputs are the
    learned parses (multi-word copies, several slots, a nested intent, a multi-piece word)."""
    tr = trained(family)
    slu, tok = tr.slu, tr.tok
    max_new = 64
    opts = DecodingOptions(max_new_tokens=max_new, loop_guard=False)
    st: dict = {}
    spec = decode_tokens(slu, opts, input_features=tr.feats, stats=st)
    plain = decode_tokens(slu, opts.replace(speculative=False), input_features=tr.feats)
    ref = hf_generate(slu, tr.feats, max_new, **_hf_kwargs(slu))
    assert spec == plain
    facts = []
    for b, row in enumerate(spec):
        out = check_output(slu, row, max_new)
        assert generated(row, tok) == generated(ref[b], tok), f"row {b}: {tok.text(row)!r} vs {tok.text(ref[b])!r}"
        assert (out["transcript"], out["lf"]) == tr.pairs[b], f"row {b}: the model did not learn its parse"
        facts.append(tree_facts(slu, out["lf"]))
    assert all(f["copies"] > 0 and f["slots"] > 0 for i, f in enumerate(facts) if "[SL:" in PAIRS[i][1])
    assert facts[NESTED]["nested"] and sum(f["slots"] >= 3 for f in facts) >= 2
    assert st["accepted"] > 0  # drafts were taken
    # one row at a time (batch 1) gives the same rows
    for b in (0, NESTED, 3):
        one = decode_tokens(slu, opts, input_features=tr.feats[b: b + 1])
        assert one == [spec[b]]
        assert generated(hf_generate(slu, tr.feats[b: b + 1], max_new, **_hf_kwargs(slu))[0], tok) == generated(spec[b], tok)
    # with the loop guard on (the default) speculative and plain still agree, the looping row included
    on = decode_tokens(slu, DecodingOptions(max_new_tokens=max_new), input_features=tr.feats)
    assert on == decode_tokens(slu, DecodingOptions(max_new_tokens=max_new, speculative=False), input_features=tr.feats)
    assert on[LOOP] != spec[LOOP] and all(on[i] == spec[i] for i in range(len(PAIRS)) if i != LOOP)


@pytest.mark.parametrize("draft_len", [1, 3, DRAFT_LEN, 12])
def test_any_draft_length_is_lossless_and_saves_passes(draft_len):
    tr = trained("en")
    slu = tr.slu
    enc = encode(slu, tr.feats)
    plain_task = make_task(slu, max_new=64, loop_guard=False)
    plain = plain_task.run(enc)
    task = make_task(slu, max_new=64, speculative=True, draft_len=draft_len, loop_guard=False)
    rows = task.run(enc)
    assert rows == plain
    st = task.stats
    assert st["accepted"] > 0 and st["max_drafts"] <= draft_len
    assert st["decoder_passes"] < plain_task.stats["decoder_passes"]
    assert st["lf_passes"] < st["lf_tokens"]
    assert st["tokens"] == plain_task.stats["tokens"] == sum(len(r) - len(slu.tokenizer.prefix_ids) for r in rows)


def test_single_row_exact_parse_takes_few_passes():
    """A model that has learned the parse: the logical form comes in a few passes and decodes right."""
    tr = trained("en")
    slu, tok = tr.slu, tr.tok
    t, lf = tr.pairs[0]
    feats = tr.feats[:1]
    st: dict = {}
    rows = decode_tokens(slu, DecodingOptions(max_new_tokens=60), input_features=feats, stats=st)
    assert tok.decode(rows[0]) == (t, lf)
    n_lf = len(tok.encode_logical_form(lf)) + 1  # the tree and <|endoftext|>
    assert st["lf_tokens"] == n_lf
    assert st["lf_passes"] <= n_lf // 2
    pst: dict = {}
    plain = decode_tokens(slu, DecodingOptions(max_new_tokens=60, speculative=False), input_features=feats, stats=pst)
    # the plain loop: one pass per token but the final <|endoftext|>
    assert plain == rows and pst["decoder_passes"] == st["tokens"] - 1 and pst["forced_eos"] == 1
    assert pst["tokens"] == st["tokens"] == len(rows[0]) - len(tok.prefix_ids)


def test_stop_at_separator_and_unconstrained():
    tr = trained("en")
    slu, tok = tr.slu, tr.tok
    t, lf = tr.pairs[1]
    feats = tr.feats[1:2]
    free = DecodingOptions(max_new_tokens=60, constrained=False)
    rows = decode_tokens(slu, free, input_features=feats, stop_at_separator=True)
    assert rows[0][-1] == tok.sep_id and tok.decode(rows[0])[0] == t
    rows = decode_tokens(slu, free.replace(constrained=True), input_features=feats, stop_at_separator=True)
    assert rows[0][-1] == tok.sep_id and tok.decode(rows[0])[0] == t
    # unconstrained greedy (drafts verified on unmasked logits) is the plainest greedy decoder's
    ref = reference_greedy(slu, tr.feats, 40, constrained=False)
    for speculative in (True, False):
        st: dict = {}
        got = decode_tokens(slu, free.replace(max_new_tokens=40, speculative=speculative, loop_guard=False),
                            input_features=tr.feats, stats=st)
        assert got == ref, speculative
        assert (st["drafted"] > 0) == speculative
    # without the candidate sets the transcripts are still the learned ones (the tree steps were
    # trained normalised over C_t only, so the free argmax after "|" is not a parse)
    assert [tok.decode(r)[0] for r in got] == [t for t, _ in tr.pairs]


def test_draft_rules_follow_the_copy_order():
    tok, tab = slu_tokenizer(), tables()
    prior = label_prior(tok, tab)
    intents = {tok.label_ids[lab] for lab in tok.label_tokens if lab.startswith("IN:")}
    slots = {tok.label_ids[lab] for lab in tok.label_tokens if lab.startswith("SL:")}
    seen = set()
    for t, lf in PAIRS:
        target = tok.encode(t, lf)
        seq = torch.tensor([target])
        state = init_state(1, tab)
        for i, x in enumerate(target[:-1]):
            state = advance(state, torch.tensor([x]), seq, tab)
            d, ok = draft_step(state, seq, tab, prior, torch.tensor([x]))
            d, ok, phase = int(d), bool(ok), int(state.phase)
            seen.add(phase)
            nxt = target[i + 1]
            if phase == TRANSCRIPT:
                assert not ok  # the transcript is never drafted
            if phase == OPEN:
                assert d == tok.open_id and ok
            if phase == LABEL:
                assert not ok or bool(tab.grammar_mask[int(state.top), d])  # an allowed label only
            if phase == DONE:
                assert d == tok.eos_token_id and ok
            if phase == BODY and x in slots:
                assert not ok  # where a slot starts is left to the model
            if phase == BODY and x in intents:
                assert ok and d in (tok.open_id, tok.close_id)
            if phase == BODY and x < tok.eos_token_id and nxt < tok.eos_token_id:
                assert ok and d == nxt  # inside a span: the next transcript token
    assert {TRANSCRIPT, OPEN, LABEL, BODY, DONE} <= seen
    # the drafter proposes an allowed label under ROOT, preferring one named in the transcript
    t, lf = EXAMPLES[0]
    seq = torch.tensor([tok.encode(t, lf)])
    root = init_state(1, tab)
    lab, ok = prior.draft(root.top, prior.hits(seq, torch.tensor([len(tok.text_ids(t))])))
    assert bool(ok) and bool(tab.grammar_mask[0, int(lab)]) and tok.id_to_label[int(lab)] == "IN:CREATE_ALARM"


def test_drafted_tokens_are_allowed_and_their_states_are_the_machine_s():
    """Every usable drafted token is in the candidate set of the state before it, the returned
    states are ``advance``'s, and a row's usable drafts form a prefix."""
    tok, tab = slu_tokenizer(), tables()
    prior = label_prior(tok, tab)
    targets = [tok.encode(t, lf) for t, lf in PAIRS]
    L = max(len(t) for t in targets)
    seq = torch.tensor([t + [tok.pad_token_id] * (L - len(t)) for t in targets])
    n = len(targets)
    checked = 0
    for cut in range(1, L):
        # every row advanced over its first `cut` target tokens (rows shorter than that stop at their end)
        state = init_state(n, tab).fit(L)
        last = torch.full((n,), tok.pad_token_id)
        for j in range(cut):
            x = seq[:, j]
            live_j = torch.tensor([j < len(t) - 1 for t in targets])
            state = advance(state, x, seq, tab).where(live_j, state)
            last = torch.where(live_j, x, last)
        live = (state.phase != TRANSCRIPT) & (state.phase < END)
        room = torch.full((n,), 8)
        drafts, valid, states = draft_tokens(state, seq, tab, prior, last, live, room, 8, tok.pad_token_id)
        s = state
        for j, (d, v) in enumerate(zip(drafts, valid)):
            mask = candidate_mask(s, seq, tab, decoding=True)
            if j:
                assert not bool((v & ~valid[j - 1]).any())
            assert bool(mask[torch.arange(n), d][v].all()), (cut, j)
            moved = advance(s, d, seq, tab)
            for f in ("phase", "depth", "top", "ptr", "tlen"):
                assert torch.equal(getattr(moved, f)[v], getattr(states[j + 1], f)[v])
            assert not bool((states[j + 1].phase[v] == ERROR).any())  # never an ERROR state
            checked += int(v.sum())
            s = states[j + 1]
        if valid:
            assert not bool(torch.stack(valid).any(0)[~live].any())  # rows not live get no drafts
    assert checked > 50


def test_label_drafter_prefers_labels_named_in_the_transcript():
    tok, tab = slu_tokenizer(), tables()
    drafter = label_prior(tok, tab)
    intents = [lab for lab in tok.label_tokens if lab.startswith("IN:") and bool(tab.grammar_mask[0, tok.label_ids[lab]])]
    tried = 0
    for lab in intents:
        word = lab.split(":")[1].split("_")[-1].lower()
        if len(tok.word_ids(word)) != 1:
            continue  # multi-piece name words are not used
        seq = torch.tensor([tok.text_ids(f"please {word} now")])
        hits = drafter.hits(seq, torch.tensor([seq.shape[1]]))
        got, ok = drafter.draft(torch.tensor([0]), hits)
        named = tok.id_to_label[int(got)]
        assert bool(ok) and word in named.lower().split(":")[1].split("_"), (lab, named)
        tried += 1
    assert tried > 10
    # nothing named: the most frequent intent under ROOT
    seq = torch.tensor([tok.text_ids("please now")])
    got, _ = drafter.draft(torch.tensor([0]), drafter.hits(seq, torch.tensor([seq.shape[1]])))
    root = tok.grammar.counts.get("ROOT") or {}
    if root:
        assert tok.id_to_label[int(got)] == max(root, key=root.get)
    # words already copied (before the pointer) no longer count
    seq = torch.tensor([tok.text_ids("set alarm please")])
    alarm = tok.word_ids("alarm")[0]
    idx = [i for i, lab in enumerate(tab.labels) if alarm in drafter.name_tokens[i].tolist()]
    assert idx
    full = drafter.hits(seq, torch.tensor([3]))
    after = drafter.hits(seq, torch.tensor([3]), torch.tensor([1]))
    assert bool((full[0, idx] > 0).all()) and bool((after[0, idx] == 0).all())


def test_rejects_too_long_budget():
    slu = tiny_conslu(0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode_tokens(slu, DecodingOptions(max_new_tokens=1000), input_features=torch.randn(1, 80, 3000))
    with pytest.raises(ValueError, match="positions"):
        make_task(slu, max_new=447)


@pytest.mark.parametrize("speculative", [False, True])
def test_exact_lengths_make_the_same_number_of_steps(speculative):
    """The benchmark's same-work baseline: unconstrained, each row generates exactly the length of
    its constrained output, and the tokens are the ones plain unconstrained greedy decoding makes."""
    tr = trained("en")
    slu, tok = tr.slu, tr.tok
    feats = tr.feats[[0, 0]]
    P = len(tok.prefix_ids)
    opts = DecodingOptions(max_new_tokens=40, speculative=speculative, loop_guard=False)
    n = len(decode_tokens(slu, opts, input_features=feats)[0]) - P  # the constrained length
    free_opts = opts.replace(constrained=False)
    free = decode_tokens(slu, free_opts, input_features=feats)
    assert [len(r) - P for r in free] == [40, 40]  # this model never stops unconstrained
    st: dict = {}
    seqs = decode_tokens(slu, free_opts, input_features=feats, stats=st, exact_lengths=[3, n])
    assert [len(s) - P for s in seqs] == [3, n] and st["tokens"] == n + 3
    assert seqs[0] == free[0][: P + 3] and seqs[1] == free[1][: P + n]
    with pytest.raises(ValueError, match="exact_lengths"):
        decode_tokens(slu, free_opts, input_features=feats, exact_lengths=[0, 1])
    with pytest.raises(ValueError, match="exact_lengths"):
        decode_tokens(slu, free_opts, input_features=feats, exact_lengths=[3, 41])


@pytest.mark.parametrize("speculative", [False, True])
def test_exact_lengths_are_exact_with_constraints_too(speculative):
    """``exact_lengths``: "row i generates exactly that many tokens, <|endoftext|> does not stop it"
    - with the candidate sets on as well, and the same with or without drafts."""
    tr = trained("en")
    slu, tok = tr.slu, tr.tok
    feats = tr.feats[[0, 0]]
    P = len(tok.prefix_ids)
    opts = DecodingOptions(max_new_tokens=40, speculative=speculative, loop_guard=False)
    ref = decode_tokens(slu, opts, input_features=feats)[0]
    n = len(ref) - P
    seqs = decode_tokens(slu, opts, input_features=feats, exact_lengths=[n - 2, n + 4])
    assert [len(s) - P for s in seqs] == [n - 2, n + 4]
    assert seqs[0] == ref[: P + n - 2]
    assert seqs[1] == ref + [tok.eos_token_id] * 4


def test_draft_budget_caps_drafts_per_row_and_stays_identical():
    tr = trained("en")
    slu = tr.slu
    enc = encode(slu, tr.feats[:4])
    plain = make_task(slu, max_new=48).run(enc)
    task = make_task(slu, max_new=48, speculative=True, draft_len=8, draft_budget=8)
    assert task.run(enc) == plain
    assert task.stats["max_drafts"] == 2 and task.stats["accepted"] > 0  # 8 // 4 rows
    free = make_task(slu, max_new=48, speculative=True, draft_len=8)
    assert free.run(enc) == plain and free.stats["max_drafts"] > 2


def test_default_draft_budget_is_cpu_only():
    assert default_draft_budget("cpu") == CPU_DRAFT_BUDGET and default_draft_budget("cuda") is None
    tr = trained("en")
    st: dict = {}
    decode_tokens(tr.slu, DecodingOptions(max_new_tokens=48), input_features=tr.feats, stats=st)
    assert 1 <= st["max_drafts"] <= max(1, CPU_DRAFT_BUDGET // len(PAIRS))


def test_closed_tree_ends_without_another_pass():
    """Once the tree closes only <|endoftext|> is allowed: the loop appends it without a decoder pass,
    and the output is still the one constrained ``generate`` makes."""
    tr = trained("en")
    slu, tok = tr.slu, tr.tok
    feats = tr.feats[:2]
    ref = hf_generate(slu, feats, 60)
    st: dict = {}
    seqs = decode_tokens(slu, DecodingOptions(max_new_tokens=60, speculative=False), input_features=feats, stats=st)
    for b in range(2):
        assert generated(seqs[b], tok) == generated(ref[b], tok)
        assert seqs[b][-1] == tok.eos_token_id
    assert st["forced_eos"] == 2
    assert st["decoder_passes"] == max(len(s) for s in seqs) - len(tok.prefix_ids) - 1  # the eos took no pass


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", family_params())
def test_speculative_equals_greedy_in_half_precision(family, dtype):
    """Cast to bf16 / fp16, copy-speculative greedy still gives plain greedy's tokens in that dtype
    (the compact projection's tie check is scaled to the dtype: conslu.search.tie_tolerance)."""
    import copy

    from conslu.search import TIE_TOL, tie_tolerance

    tr = trained(family)
    slu = copy.deepcopy(tr.slu).to(dtype=getattr(torch, dtype))
    feats = tr.feats.to(getattr(torch, dtype))
    opts = DecodingOptions(max_new_tokens=64, loop_guard=False)
    st: dict = {}
    spec = decode_tokens(slu, opts, input_features=feats, stats=st)
    assert spec == decode_tokens(slu, opts.replace(speculative=False), input_features=feats)
    assert st["accepted"] > 0
    assert tie_tolerance(torch.float32) == TIE_TOL < tie_tolerance(torch.float16) < tie_tolerance(torch.bfloat16)
    assert sum(generated(a, slu.tokenizer) == generated(b, slu.tokenizer) for a, b in
               zip(spec, decode_tokens(tr.slu, opts, input_features=tr.feats))) >= len(PAIRS) // 2  # still the parses
