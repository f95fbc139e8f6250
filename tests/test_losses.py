"""Every formula of SPEC 2 against an independent computation: autograd on explicit full-vocabulary sums,
exact enumeration over small vocabularies, and the paper's identities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdpg_trl.head_kernels import chunked_logps_and_entropy, fused_policy_distillation
from sdpg_trl.losses import (
    LOSS_TYPES,
    OutcomeOptions,
    anchor_per_token,
    clipped_loss_types,
    distill_coef_schedule,
    full_vocab_reverse_kl,
    outcome_per_token,
    policy_token_weights,
    positive_advantage_gate,
    sdpg_loss_reference,
)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Exact-arithmetic tests run in fp64; the default is restored so other test modules keep fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


# ---------------------------------------------------------------------------------------------------------------------
# SPEC 2.2: the full-vocabulary reverse KL and its gradient
# ---------------------------------------------------------------------------------------------------------------------
def test_full_vocab_kl_matches_explicit_sum_and_kl_div():
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    p, q = s.softmax(-1), t.softmax(-1)
    explicit = torch.zeros(3, 5)
    for i in range(3):
        for j in range(5):
            explicit[i, j] = sum(p[i, j, a] * math.log(p[i, j, a] / q[i, j, a]) for a in range(7))
    torch.testing.assert_close(full_vocab_reverse_kl(s, t).double(), explicit)
    kl_div = F.kl_div(t.log_softmax(-1), s.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(full_vocab_reverse_kl(s, t).double(), kl_div)


def test_distill_kl_gradient_is_pathwise_through_student_only():
    s = torch.randn(4, 9, requires_grad=True)
    t = torch.randn(4, 9, requires_grad=True)
    full_vocab_reverse_kl(s, t).sum().backward()
    # d KL / d z_a = p_a (log p_a - log q_a - KL): the analytic gradient of KL(p || SG[q]) in the student logits.
    log_p, log_q = s.detach().log_softmax(-1), t.detach().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1, keepdim=True)
    torch.testing.assert_close(s.grad, log_p.exp() * (log_p - log_q - kl), rtol=1e-5, atol=1e-6)
    assert t.grad is None, "the teacher must be stop-gradient"


def test_proposition_3_1_surrogate_gradient_and_zero_mean_advantage():
    """grad KL(p || SG[q]) == grad of -E_{a~SG[p]}[SG[D - log p(a)/q(a)] log p(a)], and that advantage has mean 0."""
    theta = torch.randn(11, requires_grad=True)
    q_logits = torch.randn(11)
    kl = full_vocab_reverse_kl(theta, q_logits)
    (grad_kl,) = torch.autograd.grad(kl, theta)

    log_p = theta.log_softmax(-1)
    log_q = q_logits.log_softmax(-1)
    p_sg = log_p.detach().exp()
    D = (p_sg * (log_p.detach() - log_q)).sum()
    advantage = (D - (log_p.detach() - log_q)).detach()
    surrogate = -(p_sg * advantage * log_p).sum()  # exact expectation over the vocabulary
    (grad_surrogate,) = torch.autograd.grad(surrogate, theta)

    torch.testing.assert_close(grad_kl.double(), grad_surrogate, rtol=1e-5, atol=1e-7)
    assert abs((p_sg * advantage).sum().item()) < 1e-6
    assert grad_kl.abs().max() > 1e-3  # non-trivial case


def _explicit_head(hidden, weight, bias, temperature, logit_scale, softcap, rounded_to=None):
    """fp64 temperature-scaled logits `(N, V)` of an LM head with optional scale and softcap, written out; with
    `rounded_to` (bf16, fp16), the projection and the bias's sum rounded to it, as a head projecting in that dtype
    does (TRL's fused head, GRPO's log-probs)."""
    rounded = (lambda x: x) if rounded_to is None else (lambda x: x.to(rounded_to).double())  # noqa: E731
    z = rounded(hidden.double() @ weight.double().T)
    z = rounded(z + (0 if bias is None else bias.double())) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


@pytest.mark.parametrize(
    ("chunk_size", "vocab_chunk", "temperature", "logit_scale", "softcap"),
    [(1, 7, 1.0, 1.0, None), (4, 16, 0.7, 1.0, None), (64, 64, 1.0, 0.5, 5.0), (3, 50, 0.8, 1.0, 2.0)],
)
@pytest.mark.parametrize("teacher_head", ["shared", "own"])  # live teacher, or a frozen/EMA copy's head
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_pass_matches_explicit_head_values_and_gradients(chunk_size, vocab_chunk, temperature, logit_scale,
                                                               softcap, teacher_head, dtype):  # fmt: skip
    """SPEC 2.1 + 2.2 from hidden states in tiles (token chunks and vocabulary tiles that do and do not divide the
    sizes) against the same quantities from explicit full fp64 logits: values and gradients. Under bf16 autocast the
    logits are the bf16 projection's (GRPO's, see `head_kernels.VOCAB_TILE`) and every value keeps its fp32 bound;
    the gradients pass through tiles rounded to bf16 before their GEMMs (as TRL's), hence their 1e-2."""
    torch.set_default_dtype(torch.float32)  # the kernel accumulates in fp32
    n, hidden, vocab = 10, 8, 50

    def leaf(*shape):  # fp32 values representable in `dtype`
        return torch.randn(*shape).to(dtype).float().requires_grad_()

    weight, bias, h_s, h_t = leaf(vocab, hidden), leaf(vocab), leaf(n, hidden), leaf(n, hidden)
    labels = torch.randint(0, vocab, (n,))
    head = dict(temperature=temperature, logit_scale=logit_scale, final_logit_softcapping=softcap)
    own = teacher_head == "own"
    t_weight, t_bias = (leaf(vocab, hidden).detach(), leaf(vocab).detach()) if own else (weight, bias)
    teacher = dict(teacher_weight=t_weight, teacher_bias=t_bias) if own else {}
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logps, entropy, kl, teacher_logps, teacher_entropy = fused_policy_distillation(
            h_s, h_t, weight, bias, labels, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk, **head, **teacher
        )
    c_logp, c_kl = torch.linspace(-1.0, 1.0, n), torch.arange(1.0, n + 1)  # arbitrary upstream gradients
    g_fused = torch.autograd.grad((c_logp * logps + c_kl * kl).sum(), (h_s, weight, bias))

    rounded_to = None if dtype == torch.float32 else dtype
    z_s = _explicit_head(h_s, weight, bias, temperature, logit_scale, softcap, rounded_to)
    z_t = _explicit_head(h_t.detach(), t_weight.detach(), t_bias.detach(), temperature, logit_scale, softcap,
                         rounded_to)  # fmt: skip
    log_p, log_q = z_s.log_softmax(-1), z_t.log_softmax(-1)
    e_logps = log_p.gather(-1, labels[:, None]).squeeze(-1)
    e_kl = full_vocab_reverse_kl(z_s, z_t)
    g_explicit = torch.autograd.grad((c_logp * e_logps + c_kl * e_kl).sum(), (h_s, weight, bias))

    torch.testing.assert_close(logps.double(), e_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl.double(), e_kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(-1).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(teacher_logps.double(), log_q.gather(-1, labels[:, None]).squeeze(-1), rtol=1e-5,
                               atol=1e-4)  # fmt: skip
    torch.testing.assert_close(teacher_entropy.double(), -(log_q.exp() * log_q).sum(-1), rtol=1e-5, atol=1e-5)
    rtol = 1e-4 if dtype == torch.float32 else 1e-2
    for a, b in zip(g_fused, g_explicit):  # fp32 gradients of fp32 leaves; the explicit ones went through fp64
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())
    assert h_t.grad is None and kl.min() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_fused_pass_entropy_gradient_matches_explicit_full_vocabulary(dtype, with_teacher):
    """The entropy's gradient (GRPO's entropy bonus) from the tiled pass, with and without a teacher, against
    autograd through explicit fp64 logits of the same inputs; the kernel projects in fp32 at most (bf16 inputs: in
    bf16, its logits rounded to bf16 as GRPO's are), hence the tolerances."""
    n, hidden, vocab, softcap = 9, 8, 50, 5.0
    weight = torch.randn(vocab, hidden, dtype=dtype, requires_grad=True)
    h_s = torch.randn(n, hidden, dtype=dtype, requires_grad=True)
    h_t = torch.randn(n, hidden, dtype=dtype) if with_teacher else None
    labels = torch.randint(0, vocab, (n,))
    head = dict(temperature=0.7, logit_scale=1.3, final_logit_softcapping=softcap)
    logps, entropy, kl, _, _ = fused_policy_distillation(
        h_s, h_t, weight, None, labels, chunk_size=4, vocab_chunk_size=16, **head
    )
    c_logp, c_entropy, c_kl = torch.linspace(-1.0, 1.0, n), torch.linspace(2.0, -0.5, n), torch.arange(1.0, n + 1)
    objective = (c_logp * logps + c_entropy * entropy + (c_kl * kl if with_teacher else 0)).sum()
    g_fused = torch.autograd.grad(objective, (h_s, weight))

    h64, w64 = h_s.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    z_s = _explicit_head(h64, w64, None, 0.7, 1.3, softcap)
    log_p = z_s.log_softmax(-1)
    e_entropy = -(log_p.exp() * log_p).sum(-1)
    e_objective = c_logp.double() * log_p.gather(-1, labels[:, None]).squeeze(-1) + c_entropy.double() * e_entropy
    if with_teacher:
        z_t = _explicit_head(h_t.double(), w64.detach(), None, 0.7, 1.3, softcap)
        e_objective = e_objective + c_kl.double() * full_vocab_reverse_kl(z_s, z_t)
    g_explicit = torch.autograd.grad(e_objective.sum(), (h64, w64))

    rtol = 1e-5 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(entropy.double(), e_entropy.detach(), rtol=rtol, atol=rtol)
    assert (kl == 0).all() != with_teacher  # without a teacher the KL is 0
    for a, b in zip(g_fused, g_explicit):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * b.abs().max().item())


def test_fused_pass_on_no_tokens_is_empty():
    outputs = fused_policy_distillation(torch.zeros(0, 4), torch.zeros(0, 4), torch.randn(6, 4), None,
                                        torch.zeros(0, dtype=torch.long))  # fmt: skip
    assert [o.shape for o in outputs] == [(0,)] * 5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # CUDA: TRL's Triton kernels
def test_chunked_logps_and_entropy_matches_log_softmax(device):
    torch.set_default_dtype(torch.float32)
    hidden = torch.randn(6, 8, device=device, requires_grad=True)
    weight = torch.randn(40000, 8, device=device)  # more than one of TRL's 32768-wide tiles
    bias = torch.randn(40000, device=device)
    targets = torch.randint(0, 40000, (6,), device=device)
    logps, entropy = chunked_logps_and_entropy(hidden, weight, bias, targets, temperature=0.7)
    logits = (hidden.double() @ weight.double().T + bias.double()) / 0.7
    log_p = logits.log_softmax(-1)
    torch.testing.assert_close(logps.double(), log_p.gather(-1, targets[:, None]).squeeze(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(-1).detach(), rtol=1e-5, atol=1e-4)
    (grad,) = torch.autograd.grad(logps.sum(), hidden)
    (expected,) = torch.autograd.grad(log_p.gather(-1, targets[:, None]).sum(), hidden)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# SPEC 2.4: the anchors, by exact enumeration over a small vocabulary
# ---------------------------------------------------------------------------------------------------------------------
def _expected_anchor_gradient(estimator: str, theta: torch.Tensor, log_ref: torch.Tensor, normalised: bool):
    """grad of E_{a ~ SG[p]}[surrogate(a)], the expectation taken exactly as sum_a SG[p(a)] surrogate(a)."""
    log_p = theta.log_softmax(-1) if normalised else theta  # unnormalised measure p(a) = exp(theta_a)
    surrogate = anchor_per_token(log_p, log_ref, estimator)
    (grad,) = torch.autograd.grad((log_p.detach().exp() * surrogate).sum(), theta)
    return grad


def _divergence(estimator: str, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """The divergence each surrogate stands for, written for possibly unnormalised measures p, r."""
    p, r = log_p.exp(), log_r.exp()
    if estimator == "urkl":  # unnormalised reverse KL
        return (p * (log_p - log_r) - p + r).sum()
    if estimator in ("ufkl", "k3"):  # unnormalised forward KL
        return (r * (log_r - log_p) - r + p).sum()
    if estimator == "rkl":
        return (p * (log_p - log_r)).sum()
    if estimator == "fkl":
        return (r * (log_r - log_p)).sum()
    raise AssertionError(estimator)


@pytest.mark.parametrize("estimator", ["urkl", "ufkl", "rkl", "fkl", "k3"])
@pytest.mark.parametrize("normalised", [True, False])
def test_anchor_expected_gradient_equals_divergence_gradient(estimator, normalised):
    theta = torch.randn(6, requires_grad=True)
    log_ref = torch.randn(6).log_softmax(-1) if normalised else torch.randn(6) * 0.5
    expected = _expected_anchor_gradient(estimator, theta, log_ref, normalised)
    log_p = theta.log_softmax(-1) if normalised else theta
    (true,) = torch.autograd.grad(_divergence(estimator, log_p, log_ref), theta)
    torch.testing.assert_close(expected, true, rtol=1e-6, atol=1e-9)
    assert true.abs().max() > 1e-3


def test_unnormalised_enumeration_tells_the_estimators_apart():
    """Guard for the test above: with unnormalised p the four divergences have different gradients."""
    theta, log_ref = torch.randn(6, requires_grad=True), torch.randn(6) * 0.5
    grads = {e: _expected_anchor_gradient(e, theta, log_ref, normalised=False) for e in ("urkl", "ufkl", "rkl", "fkl")}
    names = list(grads)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not torch.allclose(grads[a], grads[b]), (a, b)


def test_anchor_values_at_known_points():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])  # w = 2
    expected = {
        "urkl": 0.5 * math.log(2) ** 2,
        "ufkl": 0.5 + math.log(2),
        "rkl": 0.5 * (math.log(2) + 1) ** 2,
        "fkl": 0.5,
        "k3": 0.5 + math.log(2) - 1,
    }
    for estimator, value in expected.items():
        assert anchor_per_token(logp, ref, estimator).item() == pytest.approx(value)
    with pytest.raises(ValueError, match="kl_estimator"):
        anchor_per_token(logp, ref, "bogus")


def test_ufkl_gradient_equals_trl_k3():
    logp = torch.randn(3, 4, requires_grad=True)
    ref = torch.randn(3, 4)
    (g_ufkl,) = torch.autograd.grad(anchor_per_token(logp, ref, "ufkl").sum(), logp)
    # TRL GRPOTrainer's per-token KL, as written in trl/trainer/grpo_trainer.py
    trl_kl = torch.exp(ref - logp) - (ref - logp) - 1
    (g_trl,) = torch.autograd.grad(trl_kl.sum(), logp)
    torch.testing.assert_close(g_ufkl, g_trl)


# ---------------------------------------------------------------------------------------------------------------------
# SPEC 2.1: the outcome term
# ---------------------------------------------------------------------------------------------------------------------
def test_outcome_on_policy_is_reinforce():
    logp = torch.randn(2, 3, requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    out = outcome_per_token(logp, adv)
    torch.testing.assert_close(out.loss, -adv[:, None] * logp)
    assert torch.equal(out.rho, torch.ones(2, 3))
    (g_ratio,) = torch.autograd.grad(out.ratio.sum(), logp)  # value 1, gradient of log pi (GRPO's coef_1)
    assert torch.equal(out.ratio.detach(), torch.ones(2, 3)) and torch.equal(g_ratio, torch.ones(2, 3))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_outcome_on_policy_has_the_reinforce_gradient_of_every_loss_type(loss_type, level):
    """On-policy every surrogate has the gradient of `-A log pi` at ratio 1, up to CISPO's cap `min(1, eps_high)`.
    The surrogate is evaluated off-policy with `old = SG[log pi]`, where its value is GRPO's."""
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([1.5, -0.5, 0.7])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    options = OutcomeOptions(loss_type=loss_type, importance_sampling_level=level, epsilon_high=0.5,
                             dual_clip=3.0 if loss_type in clipped_loss_types() else None)  # fmt: skip
    scale = 0.5 if loss_type == "cispo" else 1.0
    for old in (None, logp.detach()):
        out = outcome_per_token(logp, adv, old, mask=mask, options=options)
        (grad,) = torch.autograd.grad((out.loss * mask).sum(), logp)
        torch.testing.assert_close(grad, -scale * adv[:, None] * mask)


def test_outcome_off_policy_clipping_and_dual_clip():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[0.5, 1.1, 1.5, 5.0]])
    logp = ratios.log()
    options = OutcomeOptions(epsilon_low=0.2, epsilon_high=0.2, dual_clip=3.0)
    pos = outcome_per_token(logp, torch.tensor([1.0]), old, options=options)
    # A > 0: min(r, clip(r)) * A
    torch.testing.assert_close(pos.loss, -torch.tensor([[0.5, 1.1, 1.2, 1.2]]))
    torch.testing.assert_close(pos.rho, ratios)
    neg = outcome_per_token(logp, torch.tensor([-1.0]), old, options=options)
    # A < 0: max(min(rA, clip(r)A), cA): 0.5 -> clip 0.8; 5.0 -> dual clip 3
    torch.testing.assert_close(neg.loss, torch.tensor([[0.8, 1.1, 1.5, 3.0]]))
    no_dual = outcome_per_token(logp, torch.tensor([-1.0]), old, options=OutcomeOptions(dual_clip=None))
    assert no_dual.loss[0, 3].item() == pytest.approx(5.0)
    # TRL's delta caps the unclipped ratio: A < 0 at r = 5 takes min(4 A, 1.2 A) = 4 A instead of 5 A
    capped = outcome_per_token(logp, torch.tensor([-1.0]), old, options=OutcomeOptions(dual_clip=None, delta=4.0))
    assert capped.loss[0, 3].item() == pytest.approx(4.0)


def test_outcome_loss_types_by_hand():
    """Each loss type's surrogate and ratios against the formulas in its papers, one scalar at a time."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]])
    old = logp - torch.tensor([[0.3, -0.4, 0.1], [-0.2, 0.5, 9.0]])  # log ratios; the last token is padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([0.8, -1.3])
    log_r = (logp - old).tolist()
    seq_log_r = [sum(log_r[0]) / 3, sum(log_r[1][:2]) / 2]  # GSPO: the mean over the sequence's tokens

    def run(**options):
        return outcome_per_token(logp, adv, old, mask=mask, options=OutcomeOptions(**options))

    for i, t in ((0, 0), (0, 1), (1, 0), (1, 1)):
        a, r = adv[i].item(), math.exp(log_r[i][t])
        cispo = run(loss_type="cispo", dual_clip=None, epsilon_high=1.2).loss
        assert cispo[i, t].item() == pytest.approx(-min(r, 1.2) * a * logp[i, t].item())
        sapo = run(loss_type="sapo", dual_clip=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.5).loss
        tau = 1.0 if a > 0 else 1.5
        assert sapo[i, t].item() == pytest.approx(-4 / tau / (1 + math.exp(-tau * (r - 1))) * a)
        gspo = run(loss_type="grpo", importance_sampling_level="sequence", dual_clip=None)
        r_seq = math.exp(seq_log_r[i])
        assert gspo.ratio[i, 0].item() == pytest.approx(r_seq)
        assert gspo.loss[i, t].item() == pytest.approx(-min(r_seq * a, min(max(r_seq, 0.8), 1.2) * a))
        assert gspo.rho[i, t].item() == pytest.approx(r)  # SDPG's terms keep the token ratio
        # VESPO: phi(w) = exp(lam + k log w - lam w) of the sequence's summed log ratio, (k, lam) by A's sign
        vespo = run(loss_type="vespo", dual_clip=None)
        k, lam = (2.0, 3.0) if a >= 0 else (3.0, 2.0)
        log_w = sum(log_r[i][: 3 if i == 0 else 2])
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
        assert vespo.vespo_weight[i, 0].item() == pytest.approx(phi)
        assert vespo.loss[i, t].item() == pytest.approx(-phi * a * logp[i, t].item())
    # vLLM's sampler correction multiplies the surrogate (VESPO takes it inside phi instead)
    sampler = torch.full((2, 3), 0.5)
    corrected = outcome_per_token(logp, adv, old, mask=mask, sampler_ratio=sampler).loss
    torch.testing.assert_close(corrected, 0.5 * run().loss)


def test_policy_token_weights_are_grpo_aggregations():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    n = torch.tensor(10.0)  # the accumulated batch's tokens, as the trainer computes SPEC 2's N

    def check(loss_type, row0, row1):  # the weight of each valid token of the two rows
        got = policy_token_weights(mask, loss_type, token_normalizer=n, accumulation_steps=2, max_completion_length=5)
        torch.testing.assert_close(got, torch.tensor([[row0] * 3 + [0.0], [row1, 0.0, 0.0, 0.0]], dtype=got.dtype))

    for loss_type in ("dapo", "cispo", "vespo"):  # over N, which already spans the accumulated batch
        check(loss_type, 1 / 10, 1 / 10)
    for loss_type in ("grpo", "sapo"):  # per-sequence mean, then mean over 2 sequences, over 2 accumulation steps
        check(loss_type, 1 / 3 / 2 / 2, 1 / 2 / 2)
    check("bnpo", 1 / 4 / 2, 1 / 4 / 2)
    check("dr_grpo", 1 / (2 * 5) / 2, 1 / (2 * 5) / 2)
    check("luspo", 1 / 2 / 2, 1 / 2 / 2)


# ---------------------------------------------------------------------------------------------------------------------
# SPEC 2.2: the positive-advantage gate; SPEC 2.3: the schedule
# ---------------------------------------------------------------------------------------------------------------------
def test_gate_values():
    adv = torch.tensor([1.2, 0.0, -0.7, 1e-9])
    assert positive_advantage_gate(adv).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert positive_advantage_gate(adv, enabled=False).tolist() == [1.0] * 4


def _batch(b=4, t=5, v=7):
    student = torch.randn(b, t, v, requires_grad=True)
    teacher = torch.randn(b, t, v)
    ids = torch.randint(0, v, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 3:] = 0
    return student, teacher, ids, mask


def test_no_distillation_for_non_positive_advantages_or_all_equal_groups():
    student, teacher, ids, mask = _batch()
    # group 1 (rows 0-1) all-equal rewards -> A = 0; group 2 has one negative and one positive rollout
    adv = torch.tensor([0.0, 0.0, -0.7, 0.7])
    loss_a, metrics = sdpg_loss_reference(student, teacher, ids, mask, adv, distill_coef=1.0, kl_coef=0.0)
    (g_a,) = torch.autograd.grad(loss_a, student)
    teacher_changed = teacher.clone()
    teacher_changed[:3] = torch.randn(3, 5, 7) * 5  # only non-positive rows' teacher changes
    loss_b, _ = sdpg_loss_reference(student, teacher_changed, ids, mask, adv, distill_coef=1.0, kl_coef=0.0)
    (g_b,) = torch.autograd.grad(loss_b, student)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(g_a, g_b)
    assert metrics["gate_ratio"] == 0.25
    # ... while the positive row's teacher does matter
    teacher_changed[3] = torch.randn(5, 7) * 5
    loss_c, _ = sdpg_loss_reference(student, teacher_changed, ids, mask, adv, distill_coef=1.0, kl_coef=0.0)
    assert not torch.allclose(loss_a, loss_c)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (25, 0.5), (50, 1.0), (100, 300 / 350), (225, 0.5), (399, 1 / 350), (400, 0.0)],
)
def test_distill_coef_schedule_paper_windows(step, expected):
    """The paper's run: T = 400, T_warm = 50, T_decay = 350, so the decay starts exactly at the end of warmup."""
    assert distill_coef_schedule(step, 400, 1.0, 50, 350) == pytest.approx(expected)


def test_distill_coef_schedule_switches_and_overlap():
    assert distill_coef_schedule(0, 10, 2e-3, 0, 0) == 2e-3  # no warmup, no decay
    assert distill_coef_schedule(10, 10, 2e-3, 0, 5) == 0.0
    assert distill_coef_schedule(3, 10, 2e-3, 5, 0) == pytest.approx(2e-3 * 3 / 5)
    # overlapping windows (T_warm + T_decay > T): the peak stays below beta_base
    peak = max(distill_coef_schedule(k, 100, 1.0, 80, 80) for k in range(101))
    assert peak < 1.0
    assert peak == pytest.approx(max(min(1, k / 80) * min(1, (100 - k) / 80) for k in range(101)))


# ---------------------------------------------------------------------------------------------------------------------
# The whole objective (SPEC 2)
# ---------------------------------------------------------------------------------------------------------------------
def test_reference_loss_equals_hand_computation():
    student, teacher, ids, mask = _batch()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    ref = torch.randn(4, 5) - 2.0
    loss, metrics = sdpg_loss_reference(
        student, teacher, ids, mask, adv, distill_coef=0.3, kl_coef=0.05, kl_estimator="urkl", ref_per_token_logps=ref
    )
    log_p = student.detach().log_softmax(-1)
    log_q = teacher.log_softmax(-1)
    total, n_tokens = 0.0, int(mask.sum())
    for i in range(4):
        for t in range(5):
            if not mask[i, t]:
                continue
            a = ids[i, t]
            lp = log_p[i, t, a].item()
            kl = sum(log_p[i, t, v].exp().item() * (log_p[i, t, v] - log_q[i, t, v]).item() for v in range(7))
            gate = 1.0 if adv[i] > 0 else 0.0
            total += -adv[i].item() * lp + 0.3 * gate * kl + 0.05 * 0.5 * (lp - ref[i, t].item()) ** 2
    assert loss.item() == pytest.approx(total / n_tokens, rel=1e-6)
    assert metrics["gate_ratio"] == 0.5
    assert set(metrics) == {
        "distill_kl",
        "gate_ratio",
        "teacher_minus_student_logp",
        "teacher_entropy",
        "student_entropy",
        "anchor",
        "kl",
    }


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "luspo"])
def test_distillation_stays_over_completion_tokens_whatever_the_loss_type(loss_type):
    """GRPO's loss type aggregates the outcome and the anchor; the distillation term stays over N (SPEC 2)."""
    student, teacher, ids, mask = _batch()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    ref = torch.randn(4, 5) - 2.0

    def loss(distill_coef, kind):
        return sdpg_loss_reference(student, teacher, ids, mask, adv, distill_coef=distill_coef, kl_coef=0.05,
                                   ref_per_token_logps=ref, outcome=OutcomeOptions(loss_type=kind))[0]  # fmt: skip

    torch.testing.assert_close(loss(0.3, loss_type) - loss(0.0, loss_type), loss(0.3, "dapo") - loss(0.0, "dapo"))
    assert not torch.allclose(loss(0.0, loss_type), loss(0.0, "dapo"))  # while the outcome and anchor do change


def test_reference_off_policy_weights_distillation_and_anchor_by_rho():
    student, teacher, ids, mask = _batch()
    adv = torch.tensor([1.0, 1.0, 1.0, 1.0])
    logp = student.detach().log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    ref = logp - 0.3
    on, _ = sdpg_loss_reference(student, teacher, ids, mask, adv, distill_coef=1.0, kl_coef=1.0,
                                ref_per_token_logps=ref, old_per_token_logps=logp)  # fmt: skip
    off, _ = sdpg_loss_reference(student, teacher, ids, mask, adv, distill_coef=1.0, kl_coef=1.0,
                                 ref_per_token_logps=ref, old_per_token_logps=logp - 0.1)  # fmt: skip
    # rho = e^0.1 is inside the clip range: outcome scales by rho, and so do the distillation and the anchor
    assert off.item() == pytest.approx(math.exp(0.1) * on.item(), rel=1e-6)


def test_reference_loss_keeps_fp64_and_equals_the_papers_loss_at_1e_12():
    """SPEC 2's loss written out token by token in fp64 (on-policy, gate, urkl anchor, every term over N): the
    reference keeps the dtype it is given, so value and gradient agree to 1e-12, not fp32's ~1e-8."""
    batch, length, vocab, beta, alpha = 4, 5, 7, 0.37, 0.11
    student = torch.randn(batch, length, vocab, requires_grad=True)
    teacher = torch.randn(batch, length, vocab)
    ids = torch.randint(vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 4:] = 0
    advantages = torch.tensor([0.9, -0.3, 1.2, -1.8])
    ref = -torch.rand(batch, length) * 2 - 1
    loss, _ = sdpg_loss_reference(student, teacher, ids, mask, advantages, distill_coef=beta, kl_coef=alpha,
                                  kl_estimator="urkl", ref_per_token_logps=ref)  # fmt: skip
    (grad,) = torch.autograd.grad(loss, student)

    log_p, log_q = student.log_softmax(-1), teacher.log_softmax(-1)
    total, count = torch.zeros(()), int(mask.sum())
    for i in range(batch):
        for t in range(length):
            if mask[i, t]:
                logp = log_p[i, t, ids[i, t]]
                kl = (log_p[i, t].exp() * (log_p[i, t] - log_q[i, t])).sum()
                total = total - advantages[i] * logp + beta * float(advantages[i] > 0) * kl
                total = total + alpha * 0.5 * (logp - ref[i, t]) ** 2
    expected = total / count
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)
