"""Constrained decoding: every output is a valid tree with in-order copies, greedy and beam, batched."""

import numpy as np
import pytest
import torch
from transformers import LogitsProcessorList

from conslu.decoding import GrammarLogitsProcessor
from slu_fixtures import EXAMPLES, grammar, slu_tokenizer, tables, tiny_conslu


def _check_output(ids, tok, g, max_new=None, require_eos=True):
    """Valid under the grammar, LF pieces an in-order subsequence of the transcript pieces, eos-terminated
    (Whisper's generate() strips the final <|endoftext|>, so it is optional there)."""
    ids = [int(i) for i in ids]
    P = len(tok.prefix_ids)
    if ids[:P] == tok.prefix_ids:
        ids = ids[P:]
    if require_eos:
        assert tok.eos_token_id in ids, "decoding must end with <|endoftext|>"
    body = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    if max_new is not None:
        assert len(body) + 1 <= max_new
    transcript, lf = tok.decode(body)
    assert lf is not None, body
    assert g.is_valid(lf), lf
    cut = body.index(tok.sep_id)
    it = iter(body[:cut])
    assert all(any(x == y for y in it) for x in body[cut + 1 :] if x < tok.eos_token_id)
    return transcript, lf


def _random_walk(seed, batch, max_new, sample_scale=3.0):
    """Drive the processor with random scores (sampling), like generate() but with diverse paths."""
    tok, t = slu_tokenizer(), tables()
    P = len(tok.prefix_ids)
    g = torch.Generator().manual_seed(seed)
    proc = GrammarLogitsProcessor(t, P, max_length=P + max_new)
    ids = torch.tensor([tok.prefix_ids] * batch)
    done = torch.zeros(batch, dtype=torch.bool)
    # bias towards structure tokens so trees get deep
    bias = torch.zeros(t.vocab_size)
    bias[tok.base_vocab_size :] = 4.0
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


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("max_new", [8, 40])
def test_random_scores_always_give_valid_trees(seed, max_new):
    tok, g = slu_tokenizer(), grammar()
    ids = _random_walk(seed, batch=8, max_new=max_new)
    for row in ids.tolist():
        _check_output(row, tok, g, max_new)


@pytest.mark.parametrize("seed", [0, 1])
def test_tiny_whisper_generate_greedy_and_beam(seed):
    slu = tiny_conslu(seed)
    tok, g = slu.tokenizer, slu.grammar
    with torch.no_grad():  # sharpen the random model so outputs vary
        slu.model.proj_out.weight.mul_(30) if slu.model.proj_out.weight.data_ptr() != slu.model.get_input_embeddings().weight.data_ptr() else None
    rng = np.random.default_rng(seed)
    audios = [rng.standard_normal(16000 * (i + 1)).astype(np.float32) * 0.1 for i in range(3)]
    feats = slu.features(audios)
    for beam, max_new in ((1, 7), (1, 24), (3, 7), (3, 24)):
        seqs = slu.generate(feats, beam=beam, max_new_tokens=max_new)
        assert seqs.shape[0] == 3
        for row in seqs.tolist():
            _check_output(row, tok, g, max_new, require_eos=False)
            assert slu.result(row)["valid"]
    res = slu.parse(audios[:2], beam=2, max_new_tokens=10)
    assert len(res) == 2 and all(r["valid"] for r in res)


def test_unconstrained_decoding_still_available():
    slu = tiny_conslu(0)
    audios = [np.zeros(16000, dtype=np.float32)]
    res = slu.parse(audios, constrained=False, max_new_tokens=6)
    assert set(res[0]) == {"transcript", "logical_form", "valid", "text"}
    assert res[0]["valid"] is False  # a random model cannot produce a tree in 6 free tokens


def test_processor_handles_reordered_rows_and_arbitrary_prefixes():
    tok, t = slu_tokenizer(), tables()
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
        _check_output(row, slu.tokenizer, slu.grammar, 12, require_eos=False)
