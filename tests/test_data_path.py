"""The data path's pure steps on their own, without a trainer: which rows and tokens each term uses
(`token_selection`) and the LM head on them (`score_tokens`), against an explicit full-vocabulary computation."""

from __future__ import annotations

import pytest
import torch

from sdpg_trl.head_kernels import LMHead, score_tokens
from sdpg_trl.losses import full_vocab_reverse_kl, loss_terms, token_selection

ADVANTAGES = torch.tensor([0.9, -0.3, 0.0, 1.2, -1.8])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
FITS = torch.tensor([True, True, True, False, True])  # row 3's teacher prompt does not fit


def terms(distill: bool, rlsd: bool):
    return loss_terms(outcome_coef=1.0, distill_coef=0.5 if distill else 0.0, rlsd_lam=0.5 if rlsd else 0.0,
                      kl_coef=0.1)  # fmt: skip


@pytest.mark.parametrize("distill", [True, False])
@pytest.mark.parametrize("rlsd", [True, False])
@pytest.mark.parametrize("gate", [True, False])
def test_token_selection_by_hand(distill, rlsd, gate):
    selection = token_selection(ADVANTAGES, MASK, terms(distill, rlsd), gate_enabled=gate, fits=FITS)
    positive = ADVANTAGES > 0 if gate else torch.ones(5, dtype=torch.bool)
    distill_rows = positive & FITS & distill
    teacher_rows = distill_rows | ((ADVANTAGES != 0) & FITS & rlsd)
    assert selection.gate.tolist() == positive.float().tolist()
    assert selection.distill_rows.tolist() == distill_rows.tolist()
    assert selection.teacher_rows.tolist() == teacher_rows.tolist()
    # Each rollout's row among the teacher's, in order; -1 where the teacher does not score it.
    expected_index, next_row = [], 0
    for scored in teacher_rows.tolist():
        expected_index.append(next_row if scored else -1)
        next_row += scored
    assert selection.teacher_index.tolist() == expected_index
    assert selection.rows.tolist() == teacher_rows.nonzero().squeeze(1).tolist()
    # Every valid token goes to exactly one kernel call for the student: plain or distilled.
    valid = MASK.bool()
    assert (selection.plain ^ selection.distilled).tolist() == valid.tolist()
    assert not (selection.plain & selection.distilled).any()
    assert selection.distilled.tolist() == (valid & distill_rows.unsqueeze(1)).tolist()
    assert selection.teacher_only.tolist() == (valid & teacher_rows.unsqueeze(1) & ~distill_rows.unsqueeze(1)).tolist()


def test_token_selection_gate_leaves_out_zero_and_negative_advantages():
    selection = token_selection(ADVANTAGES, MASK, terms(True, False), fits=True)
    assert selection.distill_rows.tolist() == [True, False, False, True, False]
    assert selection.teacher_only.sum() == 0  # without RLSD the teacher scores only distilled rollouts


@pytest.mark.parametrize("rlsd", [True, False])
def test_score_tokens_equals_explicit_logits(rlsd):
    """`score_tokens` on a batch: each (B, T) output where its tokens were scored, 0 elsewhere, against full logits."""
    torch.manual_seed(0)
    batch, length, hidden_size, vocab = 5, 4, 8, 30
    weight, bias = torch.randn(vocab, hidden_size, requires_grad=True), torch.randn(vocab)
    teacher_weight = torch.randn(vocab, hidden_size)  # a frozen teacher's own head
    hidden = torch.randn(batch, length, hidden_size, requires_grad=True)
    ids = torch.randint(vocab, (batch, length))
    selection = token_selection(ADVANTAGES, MASK, terms(True, rlsd), fits=FITS)
    teacher_hidden = torch.randn(len(selection.rows), length, hidden_size)
    head = LMHead(weight, bias, temperature=0.7)
    teacher_head = LMHead(teacher_weight, None, temperature=0.7)
    scores = score_tokens(hidden, teacher_hidden, ids, selection, head, teacher_head, distill=True, rlsd=rlsd,
                          chunk_size=3)  # fmt: skip

    log_p = ((hidden @ weight.T + bias) / 0.7).log_softmax(-1)
    full_teacher = torch.zeros(batch, length, hidden_size)
    full_teacher[selection.rows] = teacher_hidden
    log_q = ((full_teacher @ teacher_weight.T) / 0.7).log_softmax(-1)
    valid, distilled = MASK.bool(), selection.distilled
    teacher_scored = distilled | (selection.teacher_only if rlsd else torch.zeros_like(distilled))
    pick = lambda x: x.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    expected = {
        "logps": pick(log_p) * valid, "entropy": -(log_p.exp() * log_p).sum(-1) * valid,
        "distill_kl": full_vocab_reverse_kl(log_p, log_q) * distilled,
        "teacher_logps": pick(log_q) * teacher_scored,
        "teacher_entropy": -(log_q.exp() * log_q).sum(-1) * teacher_scored,
    }  # fmt: skip
    for name, value in expected.items():
        torch.testing.assert_close(getattr(scores, name), value.detach(), rtol=1e-5, atol=1e-5, msg=name)
    # Gradients of the student's terms reach the hidden states and the head; the teacher's head gets none.
    c_logp, c_kl = torch.randn(batch, length), torch.randn(batch, length)
    g = torch.autograd.grad((c_logp * scores.logps + c_kl * scores.distill_kl).sum(), (hidden, weight))
    e = torch.autograd.grad((c_logp * expected["logps"] + c_kl * expected["distill_kl"]).sum(), (hidden, weight))
    for a, b in zip(g, e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
