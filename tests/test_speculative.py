"""Copy-speculative decoding is lossless: token-identical to constrained greedy ``model.generate``."""

from __future__ import annotations

import pytest
import torch
from transformers import WhisperForConditionalGeneration

from conslu.constraints import BODY, DONE, LABEL, OPEN, advance, init_state
from conslu.speculative import _draft_step, label_prior, speculative_generate
from slu_fixtures import EXAMPLES, slu_tokenizer, tables, tiny_conslu


def _generated(ids, tok) -> list[int]:
    """Generated tokens without the prompt and without the final <|endoftext|> / padding."""
    ids = [int(i) for i in ids]
    P = len(tok.prefix_ids)
    if ids[:P] == tok.prefix_ids:
        ids = ids[P:]
    return ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids


class OracleWhisper(WhisperForConditionalGeneration):
    """A tiny random Whisper nudged toward per-row target sequences (a model that has "learned"
    its outputs): +``strength`` on the target token at most positions (a seeded subset is left
    alone, so the random logits decide there). The nudge depends on the row and the logical
    position only, so wrong positions or a wrong cache would change the output."""

    targets: torch.Tensor  # [B, T] next-token targets by decoder position
    strength: float = 8.0
    skip: torch.Tensor | None = None  # [B, T] bool: positions left to the random model

    def forward(self, *args, decoder_position_ids=None, past_key_values=None, decoder_input_ids=None, **kw):
        out = super().forward(*args, decoder_position_ids=decoder_position_ids, past_key_values=past_key_values,
                              decoder_input_ids=decoder_input_ids, **kw)
        B, K = decoder_input_ids.shape
        if decoder_position_ids is None:  # generate(): no holes, positions follow the cache
            past = out.past_key_values.get_seq_length() - K
            decoder_position_ids = (past + torch.arange(K))[None].expand(B, K)
        pos = decoder_position_ids.clamp(max=self.targets.shape[1] - 1)
        tgt = self.targets.gather(1, pos)
        bonus = torch.full(tgt.shape, self.strength)
        if self.skip is not None:
            bonus = torch.where(self.skip.gather(1, pos), 0.0, bonus)
        out.logits = out.logits.scatter_add(2, tgt[..., None], bonus[..., None])
        return out


def _oracle(seed: int, pairs, skip_rate: float = 0.15):
    slu = tiny_conslu(seed)
    tok = slu.tokenizer
    model = slu.model
    model.__class__ = OracleWhisper
    P = len(tok.prefix_ids)
    T = 200
    targets = torch.full((len(pairs), T), tok.eos_token_id, dtype=torch.long)
    for b, (t, lf) in enumerate(pairs):
        seq = tok.prefix_ids + tok.encode(t, lf)
        targets[b, : len(seq) - 1] = torch.tensor(seq[1:])  # position i predicts token i + 1
    g = torch.Generator().manual_seed(seed)
    model.targets = targets
    model.skip = torch.rand(targets.shape, generator=g) < skip_rate
    model.skip[:, : P + 2] = False
    return slu


def _check_identical(slu, feats, max_new, draft_len=8):
    tok = slu.tokenizer
    ref = slu.generate(feats, constrained=True, max_new_tokens=max_new)
    seqs, stats = speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=max_new,
                                       draft_len=draft_len, prior=label_prior(tok, slu.tables))
    for b in range(feats.shape[0]):
        assert seqs[b][: len(tok.prefix_ids)] == tok.prefix_ids
        assert _generated(seqs[b], tok) == _generated(ref[b].tolist(), tok), f"row {b}"
    return seqs, stats


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_new", [10, 48])
def test_identical_to_generate_random_model(seed, max_new):
    slu = tiny_conslu(seed)
    torch.manual_seed(seed)
    feats = torch.randn(3, 80, 3000)
    for d in (0, 4, 8):
        seqs, stats = _check_identical(slu, feats, max_new, draft_len=d)
        assert all(len(s) - len(slu.tokenizer.prefix_ids) <= max_new for s in seqs)
        if d == 0:
            # one pass per token, except the <|endoftext|> after a closed tree (appended without a pass)
            eos = slu.tokenizer.eos_token_id
            assert stats["drafted"] == 0
            assert stats["decoder_passes"] == max(len(s) - 2 - (s[-1] == eos) for s in seqs)
            assert stats["forced_eos"] == sum(s[-1] == eos for s in seqs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identical_and_fewer_passes_when_drafts_are_accepted(seed):
    """Rows of different lengths and trees (per-row positions, holes in the cache), random
    deviations from the copy pattern: still identical, and far fewer decoder passes than tokens."""
    pairs = EXAMPLES[seed % 2:] + EXAMPLES[:1]
    slu = _oracle(seed, pairs)
    feats = torch.randn(len(pairs), 80, 3000)
    seqs, stats = _check_identical(slu, feats, max_new=80)
    assert stats["accepted"] > 0
    assert stats["decoder_passes"] < max(len(s) for s in seqs) - 2  # fewer passes than the longest row's tokens


def test_single_row_exact_parse_takes_few_passes():
    """A model that has learned the parse: the logical form comes in a few passes and decodes right."""
    t, lf = EXAMPLES[0]
    slu = _oracle(0, [(t, lf)], skip_rate=0.0)
    feats = torch.randn(1, 80, 3000)
    seqs, stats = _check_identical(slu, feats, max_new=60)
    assert slu.tokenizer.decode(seqs[0]) == (t, lf)
    n_lf = len(slu.tokenizer.encode_logical_form(lf)) + 1
    assert stats["lf_tokens"] == n_lf
    assert stats["lf_passes"] <= n_lf // 2
    plain, pst = speculative_generate(slu.model, feats, slu.tables, slu.tokenizer.prefix_ids, max_new_tokens=60,
                                      draft_len=0)
    # the plain loop: one pass per token but the final <|endoftext|>
    assert plain == seqs and pst["decoder_passes"] == stats["tokens"] - 1 and pst["forced_eos"] == 1


def test_stop_at_separator_and_unconstrained():
    t, lf = EXAMPLES[1]
    slu = _oracle(1, [(t, lf)], skip_rate=0.0)
    tok = slu.tokenizer
    feats = torch.randn(1, 80, 3000)
    seqs, _ = speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=60,
                                   draft_len=8, constrained=False, stop_at_separator=True)
    assert seqs[0][-1] == tok.sep_id and tok.decode(seqs[0])[0] == t
    free, _ = speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=60, draft_len=8,
                                   constrained=False, prior=label_prior(tok, slu.tables))
    ref = slu.generate(feats, constrained=False, max_new_tokens=60)
    assert _generated(free[0], tok) == _generated(ref[0].tolist(), tok)


def test_draft_rules_follow_the_copy_order():
    tok, tab = slu_tokenizer(), tables()
    t, lf = EXAMPLES[0]
    target = tok.encode(t, lf)
    seq = torch.tensor([target])
    prior = label_prior(tok, tab)
    state = init_state(1, tab)
    phases = []
    for i, x in enumerate(target[:-1]):
        state = advance(state, torch.tensor([x]), seq, tab)
        d, ok, copy = _draft_step(state, seq, tab, prior, torch.tensor([x]))
        phases.append(int(state.phase))
        nxt = target[i + 1]
        if int(state.phase) == OPEN:
            assert int(d) == tok.open_id and bool(ok)
        if int(state.phase) == DONE:
            assert int(d) == tok.eos_token_id
        if int(state.phase) == BODY and i > 0 and target[i] < tok.eos_token_id and nxt < tok.eos_token_id:
            assert int(d) == nxt  # inside a span: the next transcript token
            if bool(copy):  # the copy shortcut is the state machine's own transition
                moved = advance(state, d.view(1), seq, tab)
                assert [int(v) for v in (moved.phase, moved.ptr, moved.depth, moved.top)] == \
                    [int(state.phase), int(state.ptr) + 1, int(state.depth), int(state.top)]
        if int(state.phase) == BODY and x in tok.label_ids.values() and x != tok.label_ids.get(lf.split()[0][1:]):
            assert not bool(ok)  # where a slot starts is left to the model
    assert LABEL in phases and BODY in phases
    # the drafter proposes an allowed label under ROOT, preferring one named in the transcript
    root = init_state(1, tab)
    lab, ok = prior.draft(root.top, prior.hits(seq, torch.tensor([len(t.split())])))
    assert bool(ok) and bool(tab.grammar_mask[0, int(lab)])


def test_label_drafter_prefers_labels_named_in_the_transcript():
    tok, tab = slu_tokenizer(), tables()
    drafter = label_prior(tok, tab)
    intents = [lab for lab in tok.label_tokens if lab.startswith("IN:") and bool(tab.grammar_mask[0, tok.label_ids[lab]])]
    for lab in intents:
        word = lab.split(":")[1].split("_")[-1].lower()
        if len(tok.word_ids(word)) != 1:
            continue  # multi-piece name words are not used
        seq = torch.tensor([tok.text_ids(f"please {word} now")])
        hits = drafter.hits(seq, torch.tensor([seq.shape[1]]))
        got, ok = drafter.draft(torch.tensor([0]), hits)
        named = tok.id_to_label[int(got)]
        assert bool(ok) and word in named.lower().split(":")[1].split("_"), (lab, named)
    # nothing named: the most frequent intent under ROOT
    seq = torch.tensor([tok.text_ids("please now")])
    got, _ = drafter.draft(torch.tensor([0]), drafter.hits(seq, torch.tensor([seq.shape[1]])))
    root = tok.grammar.counts.get("ROOT") or {}
    if root:
        assert tok.id_to_label[int(got)] == max(root, key=root.get)


def test_rejects_too_long_budget():
    slu = tiny_conslu(0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(slu.model, torch.randn(1, 80, 3000), slu.tables, slu.tokenizer.prefix_ids,
                             max_new_tokens=1000)


def test_exact_lengths_make_the_same_number_of_steps():
    """The benchmark's same-work baseline: each row generates exactly its length, <|endoftext|> or not,
    and the tokens are the ones plain unconstrained greedy decoding makes."""
    t, lf = EXAMPLES[0]
    slu = _oracle(3, [(t, lf), (t, lf)], skip_rate=0.0)
    tok = slu.tokenizer
    feats = torch.randn(2, 80, 3000)
    free, _ = speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=40,
                                   draft_len=0, constrained=False)
    n = len(free[0]) - len(tok.prefix_ids)  # ends with <|endoftext|>
    seqs, stats = speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=40,
                                       draft_len=0, constrained=False, exact_lengths=[3, n + 4])
    P = len(tok.prefix_ids)
    assert [len(s) - P for s in seqs] == [3, n + 4] and stats["tokens"] == n + 7
    assert seqs[0] == free[0][: P + 3] and seqs[1][: P + n] == free[1]
    with pytest.raises(ValueError, match="exact_lengths"):
        speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=40, exact_lengths=[0, 1])


def test_draft_budget_caps_drafts_per_row_and_stays_identical():
    pairs = EXAMPLES[:2] * 2
    slu = _oracle(4, pairs)
    tok = slu.tokenizer
    feats = torch.randn(4, 80, 3000)
    ref = slu.generate(feats, constrained=True, max_new_tokens=48)
    seqs, stats = speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=48, draft_len=8,
                                       prior=label_prior(tok, slu.tables), draft_budget=8)
    for b in range(4):
        assert _generated(seqs[b], tok) == _generated(ref[b].tolist(), tok)
    assert stats["max_drafts"] == 2 and stats["accepted"] > 0  # 8 // 4 rows
    _, free = speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=48, draft_len=8,
                                   prior=label_prior(tok, slu.tables))
    assert free["max_drafts"] > 2


def test_default_draft_budget_is_cpu_only():
    from conslu.speculative import CPU_DRAFT_BUDGET, default_draft_budget

    assert default_draft_budget("cpu") == CPU_DRAFT_BUDGET and default_draft_budget("cuda") is None


def test_closed_tree_ends_without_another_pass():
    """Once the tree closes only <|endoftext|> is allowed: the loop appends it without a decoder pass,
    and the output is still the one constrained ``generate`` makes."""
    pairs = EXAMPLES[:2]
    slu = _oracle(5, pairs, skip_rate=0.0)
    tok = slu.tokenizer
    feats = torch.randn(2, 80, 3000)
    ref = slu.generate(feats, constrained=True, max_new_tokens=60)
    seqs, stats = speculative_generate(slu.model, feats, slu.tables, tok.prefix_ids, max_new_tokens=60, draft_len=0)
    for b in range(2):
        assert _generated(seqs[b], tok) == _generated(ref[b].tolist(), tok)
        assert seqs[b][-1] == tok.eos_token_id
    assert stats["forced_eos"] == 2
    assert stats["decoder_passes"] == max(len(s) for s in seqs) - len(tok.prefix_ids) - 1  # the eos took no pass
