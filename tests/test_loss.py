"""slu_loss against a hand computation, the plain-CE ablation, padding, and the decoder's masks."""

import math

import torch
import torch.nn.functional as F

from conslu.decoding import GrammarLogitsProcessor
from conslu.loss import lf_candidate_mask, slu_loss, teacher_states
from slu_fixtures import EXAMPLES, batch_labels, grammar, slu_tokenizer, tables


def _hand_loss(logits, labels, tok, g):
    """Token-by-token: full log-softmax on the transcript part, log-softmax over hand-built C_t after "|"."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        row = labels[b].tolist()
        real = [i for i, y in enumerate(row) if y != -100]
        target = [row[i] for i in real]
        transcript = target[: target.index(tok.sep_id)]
        stack, ptr, prev = [], -1, None
        for k, i in enumerate(real):
            y = row[i]
            lp = logits[b, i].double()
            if k <= target.index(tok.sep_id):
                allowed = None  # transcript part, "|" included
            else:
                parent = stack[-1] if stack else "ROOT"
                if prev == tok.sep_id:
                    allowed = {tok.open_id}
                elif prev == tok.open_id:
                    allowed = {tok.label_ids[c] for c in g.children.get(parent, ())}
                elif not stack:
                    allowed = {tok.eos_token_id, tok.pad_token_id}
                else:
                    allowed = {tok.close_id}
                    if g.children.get(parent):
                        allowed.add(tok.open_id)
                    if parent.startswith("SL:"):
                        allowed |= set(transcript[ptr + 1 :])
            if allowed is None:
                total -= (lp[y] - torch.logsumexp(lp, 0)).item()
            else:
                assert y in allowed
                idx = torch.tensor(sorted(allowed))
                total -= (lp[y] - torch.logsumexp(lp[idx], 0)).item()
            # update the hand state
            if k > target.index(tok.sep_id):
                if y in tok.id_to_label:
                    stack.append(tok.id_to_label[y])
                elif y == tok.close_id:
                    stack.pop()
                elif y < tok.eos_token_id:
                    ptr = transcript.index(y, ptr + 1)
            prev = y
            count += 1
    return total / count


def test_loss_equals_hand_computation():
    tok, t, g = slu_tokenizer(), tables(), grammar()
    labels, _ = batch_labels(EXAMPLES[:4])
    torch.manual_seed(0)
    logits = torch.randn(labels.shape[0], labels.shape[1], t.vocab_size) * 3
    got = slu_loss(logits, labels, t).item()
    assert math.isclose(got, _hand_loss(logits, labels, tok, g), rel_tol=1e-5)
    plain = F.cross_entropy(logits.reshape(-1, t.vocab_size), labels.reshape(-1), ignore_index=-100).item()
    assert math.isclose(slu_loss(logits, labels, t, constrained=False).item(), plain, rel_tol=1e-6)


def test_padding_is_ignored_and_gradients_are_finite():
    t = tables()
    labels, _ = batch_labels(EXAMPLES[:2])
    padded = torch.cat([labels, torch.full((2, 5), -100)], 1)
    torch.manual_seed(1)
    logits = torch.randn(2, padded.shape[1], t.vocab_size, requires_grad=True)
    a = slu_loss(logits[:, : labels.shape[1]], labels, t)
    b = slu_loss(logits, padded, t)
    assert torch.allclose(a, b)
    b.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[:, labels.shape[1] :].abs().sum() == 0


def test_precomputed_states_give_the_same_loss():
    t = tables()
    labels, _ = batch_labels(EXAMPLES)
    logits = torch.randn(labels.shape[0], labels.shape[1], t.vocab_size)
    ls = teacher_states(labels, t)
    assert torch.allclose(slu_loss(logits, labels, t, states=ls), slu_loss(logits, labels, t))


def test_reference_outside_grammar_stays_finite():
    tok, t = slu_tokenizer(), tables()
    # a label the grammar does not allow under ROOT (a slot at the root)
    labels, _ = batch_labels([("pause the song", "[SL:MUSIC_TYPE song ]")])
    logits = torch.randn(1, labels.shape[1], t.vocab_size)
    assert torch.isfinite(slu_loss(logits, labels, t))


def test_loss_masks_equal_decoder_masks_at_every_step():
    tok, t = slu_tokenizer(), tables()
    labels, targets = batch_labels(EXAMPLES)
    ls = teacher_states(labels, t)
    loss_masks = lf_candidate_mask(ls, t)
    P = len(tok.prefix_ids)
    proc = GrammarLogitsProcessor(t, P)
    k = 0
    for b, target in enumerate(targets):
        seq = tok.prefix_ids + target
        cut = P + target.index(tok.sep_id) + 1
        for n in range(P, len(seq)):
            scores = proc(torch.tensor([seq[:n]]), torch.zeros(1, t.vocab_size))
            if n >= cut:  # logical-form step: the decoder allows exactly the loss's C_t
                assert torch.equal(torch.isfinite(scores[0]), loss_masks[k]), (b, n)
                k += 1
    assert k == len(loss_masks)
