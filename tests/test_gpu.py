"""On a CUDA GPU: SDPG training in bf16 (full and LoRA with gradient checkpointing), its fused distillation pass in
bf16 (against an fp64 head, and at Qwen's 151936 vocabulary against TRL's Triton kernel and the memory table of
docs/PERFORMANCE.md), and generation with vLLM colocated.

Every test here is marked `gpu`: the default run deselects them and, without CUDA, `pytest -m gpu` skips them
(tests/conftest.py). `make gpu-check` runs them, then the update benchmark against GRPO. Not yet run on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_dataset, make_model
from peft import LoraConfig
from test_losses import _explicit_head

from bench.harness import alternating_reward
from bench.head_memory import Scale, sdpg
from sdpg_trl import SDPGConfig, SDPGTrainer
from sdpg_trl.head_kernels import LMHead, chunked_logps_and_entropy, fused_policy_distillation, score_tokens
from sdpg_trl.losses import full_vocab_reverse_kl, loss_terms, token_selection

pytestmark = pytest.mark.gpu


def bf16_step_args(output_dir, **overrides) -> SDPGConfig:
    """Two SDPG steps in bf16 autocast, distilling from step 0; groups of 4 with rewards 1, 0, 1, 0 (half the
    rollouts pass the gate)."""
    return SDPGConfig(
        output_dir=str(output_dir), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=2, logging_steps=1, report_to="none", save_strategy="no", bf16=True, distill_warmup_steps=0,
        distill_decay_steps=0, distill_coef=0.5, beta=0.1, learning_rate=1e-2, seed=0, **overrides,
    )  # fmt: skip


def train_and_check(trainer: SDPGTrainer) -> list[dict]:
    """Train; every step distilled half its rollouts, with finite losses, and the weights moved. The step logs."""
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.accelerator.device.type == "cuda" and trainer.accelerator.mixed_precision == "bf16"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert h["sdpg/gate_ratio"] == 0.5, h
        assert all(math.isfinite(h[k]) for k in ("loss", "grad_norm", "sdpg/distill_kl", "sdpg/anchor")), h
        assert h["sdpg/distill_kl"] >= 0
    after = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    return logs


def test_sdpg_trains_in_bf16_on_cuda(tmp_path, tokenizer, tiny_model_dir):
    """Generation, the teacher pass, TRL's Triton log-prob kernel on the tokens that are not distilled and SDPG's
    fused pass on those that are, in bf16 autocast (tests/test_trainer.py checks that the head kernels see bf16)."""
    trainer = SDPGTrainer(model=tiny_model_dir, reward_funcs=alternating_reward, args=bf16_step_args(tmp_path),
                          train_dataset=make_dataset(8), processing_class=tokenizer)  # fmt: skip
    train_and_check(trainer)


def test_sdpg_trains_lora_with_gradient_checkpointing_in_bf16_on_cuda(tmp_path, tokenizer, tiny_model_dir):
    """The single-GPU recipe's setting: a LoRA adapter, gradient checkpointing, bf16, the live teacher."""
    args = bf16_step_args(tmp_path, gradient_checkpointing=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = SDPGTrainer(model=tiny_model_dir, reward_funcs=alternating_reward, args=args, peft_config=lora,
                          train_dataset=make_dataset(8), processing_class=tokenizer)  # fmt: skip
    train_and_check(trainer)


@pytest.mark.parametrize("teacher_head", ["shared", "own"])  # live teacher, or a frozen/EMA copy's head
def test_fused_pass_in_bf16_matches_the_explicit_head(teacher_head):
    """Under bf16 autocast the fused pass projects bf16 tiles, as TRL's fused head does for GRPO's log-probs: the
    fp64 values of the logits rounded to bf16, up to fp32 accumulation. Gradients go through bf16 tiles."""
    torch.manual_seed(0)
    n, hidden, vocab = 64, 128, 50_000  # several of the fused pass's 8192-wide vocabulary tiles

    def bf16_exact(*shape: int, scale: float) -> torch.Tensor:  # fp32 values with a bf16 representation
        return (torch.randn(*shape, device="cuda") * scale).bfloat16().float()

    weight, bias = bf16_exact(vocab, hidden, scale=1.0), bf16_exact(vocab, scale=1.0)
    h_s, h_t = bf16_exact(n, hidden, scale=0.3), bf16_exact(n, hidden, scale=0.3)  # logits of std 0.3 * sqrt(128)
    for x in (weight, bias, h_s):
        x.requires_grad_()
    labels = torch.randint(0, vocab, (n,), device="cuda")
    own = teacher_head == "own"
    t_weight, t_bias = (bf16_exact(vocab, hidden, scale=1.0), bf16_exact(vocab, scale=1.0)) if own else (weight, bias)
    teacher = dict(teacher_weight=t_weight, teacher_bias=t_bias) if own else {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logps, entropy, kl, teacher_logps, _ = fused_policy_distillation(h_s, h_t, weight, bias, labels, **teacher)
    c_logp, c_kl = torch.linspace(-1.0, 1.0, n, device="cuda"), torch.arange(1.0, n + 1, device="cuda")
    g_fused = torch.autograd.grad((c_logp * logps + c_kl * kl).sum(), (h_s, weight, bias))

    z_s = _explicit_head(h_s, weight, bias, 1.0, 1.0, None, rounded_to=torch.bfloat16)
    z_t = _explicit_head(h_t, t_weight.detach(), t_bias.detach(), 1.0, 1.0, None, rounded_to=torch.bfloat16)
    log_p, log_q = z_s.log_softmax(-1), z_t.log_softmax(-1)
    e_logps, e_kl = log_p.gather(-1, labels[:, None]).squeeze(-1), full_vocab_reverse_kl(z_s, z_t)
    g_explicit = torch.autograd.grad((c_logp * e_logps + c_kl * e_kl).sum(), (h_s, weight, bias))

    close = dict(rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(logps.double(), e_logps, **close)
    torch.testing.assert_close(kl.double(), e_kl, **close)
    torch.testing.assert_close(entropy.double(), -(log_p.exp() * log_p).sum(-1).detach(), **close)
    torch.testing.assert_close(teacher_logps.double(), log_q.gather(-1, labels[:, None]).squeeze(-1), **close)
    for a, b in zip(g_fused, g_explicit):  # each tile's gradient is rounded to bf16 before its GEMM
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())


def test_qwen_vocabulary_in_bf16_same_log_probs_as_trl_and_memory_within_the_table():
    """V = 151936, H = 2560 (Qwen3-4B's head), 256 tokens in bf16, half distilled, full fine-tuning: every token's
    log-prob and entropy from `score_tokens` are the bits TRL's Triton kernel gives the same rows (one GEMM of 256
    rows each), and the pass's peak memory stays within what bench/head_memory.py counts for it."""
    torch.manual_seed(0)
    vocab, hidden_size, batch, length = 151936, 2560, 2, 128
    weight = (torch.randn(vocab, hidden_size, device="cuda") * 0.02).bfloat16().requires_grad_()
    hidden = torch.randn(batch, length, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    teacher_hidden = torch.randn(1, length, hidden_size, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(vocab, (batch, length), device="cuda")
    terms = loss_terms(outcome_coef=1.0, distill_coef=0.5, rlsd_lam=0.0, kl_coef=0.0)
    selection = token_selection(torch.tensor([1.0, -1.0], device="cuda"), torch.ones(batch, length, device="cuda"),
                                terms, fits=True)  # fmt: skip
    head = LMHead(weight, None)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        scores = score_tokens(hidden, teacher_hidden, ids, selection, head, head, distill=True, rlsd=False)
    (scores.logps.sum() + scores.distill_kl.sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    counted = sum(sdpg(Scale(vocab, hidden_size, batch, length, torch.bfloat16, 0.5), full_finetuning=True).values())
    assert peak <= counted * 1.1 + 64 * 2**20, (peak / 2**30, counted / 2**30)
    for row in range(batch):  # the distilled row, then the plain one: each against TRL's kernel on its own rows
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logps, entropy = chunked_logps_and_entropy(hidden[row], weight, None, ids[row])
        assert torch.equal(scores.logps[row], logps) and torch.equal(scores.entropy[row], entropy)


# Last in the module: vLLM keeps its engine (and the process group it set up) until the process exits.
def test_sdpg_trains_with_vllm_colocated(tmp_path, tokenizer):
    """Generation by a vLLM engine in the training process, its weights synced after each step, and TRL's
    importance-sampling correction on SDPG's outcome term."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm]')")
    model_dir = tmp_path / "model"
    make_model(tokenizer, head_dim=64).save_pretrained(model_dir)  # vLLM's attention kernels want heads of 64 or so
    tokenizer.save_pretrained(model_dir)
    args = bf16_step_args(
        tmp_path / "out", use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.2,
        vllm_max_model_length=128, vllm_enable_sleep_mode=False,
    )  # fmt: skip
    trainer = SDPGTrainer(model=str(model_dir), reward_funcs=alternating_reward, args=args,
                          train_dataset=make_dataset(8), processing_class=tokenizer)  # fmt: skip
    logs = train_and_check(trainer)
    assert all(math.isfinite(h["sampling/sampling_logp_difference/mean"]) for h in logs), logs
