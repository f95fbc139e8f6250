"""Time and peak memory of one training update (forward, backward, optimiser step) for one method and one shape.

Meant to run in a fresh process per configuration (`bench.run` does that), so the peak resident set belongs to this
configuration alone. Prints one JSON line. Generation is excluded: the batch is synthetic (see
`bench.harness.synthetic_batch`). Methods:

- `grpo`:  TRL `GRPOTrainer.compute_loss` (fused LM head, DAPO aggregation, k3 anchor) - the baseline;
- `sdpg`:  `sdpg_trl.SDPGTrainer.compute_loss` (chunked full-vocabulary KL, urkl anchor);
- `naive`: `bench.naive.naive_sdpg_loss`, SDPG with full (B, T, V) logits for both views;
- `sdpo`:  TRL's experimental `SDPOTrainer.compute_loss` with `distillation_mode="full_logits"`.

Usage: python -m bench.loss_step --method sdpg --vocab 151936 --length 1024 [--batch 2 --iters 3 --warmup 1 --bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from collections.abc import Callable

import torch

from bench.harness import (
    BatchShape,
    MemoryProbe,
    alternating_reward,
    device,
    small_model,
    synthetic_batch,
    timed,
    tiny_dataset,
    word_tokenizer,
)
from bench.naive import naive_sdpg_loss

METHODS = ("grpo", "sdpg", "naive", "sdpo")
#: Coefficients shared by every method: the paper's alpha (anchor) and beta_base (distillation), SPEC 4.
KL_COEF = 1e-3
DISTILL_COEF = 1e-3
NUM_GENERATIONS = 2
PROMPT_LEN = 64
TEACHER_PROMPT_LEN = 128
WARMUP_LEN = 256

LossFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def common_args(output_dir: str, batch_size: int, completion_len: int, bf16: bool = False) -> dict:
    """Trainer arguments every trainer-based method shares: fp32 or bf16 autocast (what users run on a GPU), DAPO
    aggregation, no logging backends."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        num_generations=NUM_GENERATIONS,
        # Only generation uses it (bypassed here); it must hold a whole group even when the update has one row.
        generation_batch_size=max(batch_size, NUM_GENERATIONS),
        max_completion_length=completion_len,
        loss_type="dapo",
        beta=KL_COEF,
        bf16=bf16,
        fp16=False,
        report_to="none",
        use_cpu=device().type == "cpu",
    )


def build_grpo(model, output_dir: str, batch_size: int, completion_len: int, bf16: bool):
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**common_args(output_dir, batch_size, completion_len, bf16))
    return GRPOTrainer(
        model, alternating_reward, args=args, train_dataset=tiny_dataset(), processing_class=word_tokenizer()
    )


def build_sdpg(model, output_dir: str, batch_size: int, completion_len: int, bf16: bool):
    from sdpg_trl import SDPGConfig, SDPGTrainer

    # No warmup or decay: beta(k) = distill_coef from step 0, so the teacher pass and the KL always run.
    args = SDPGConfig(
        **common_args(output_dir, batch_size, completion_len, bf16),
        distill_coef=DISTILL_COEF,
        distill_warmup_steps=0,
        distill_decay_steps=0,
        kl_estimator="urkl",
    )
    return SDPGTrainer(
        model, alternating_reward, args=args, train_dataset=tiny_dataset(), processing_class=word_tokenizer()
    )


def build_sdpo(model, output_dir: str, batch_size: int, completion_len: int, bf16: bool):
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    # "live" teacher = the same weights, as in SDPG; a weight strictly inside (0, 1) runs the policy loss and the
    # distillation together, like SDPG's outcome + OPD terms; alpha 1.0 is the reverse KL.
    args = SDPOConfig(
        **common_args(output_dir, batch_size, completion_len, bf16),
        distillation_mode="full_logits",
        distillation_alpha=1.0,
        distillation_weight=0.5,
        teacher_model_kind="live",
    )
    return SDPOTrainer(
        model, alternating_reward, args=args, train_dataset=tiny_dataset(), processing_class=word_tokenizer()
    )


TRAINER_BUILDERS = {"grpo": build_grpo, "sdpg": build_sdpg, "sdpo": build_sdpo}


def sdpo_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDPO's names for the same batch: the full teacher sequence and a per-row distillation mask (the SDPG gate)."""
    return inputs | {
        "teacher_input_ids": torch.cat([inputs["teacher_prompt_ids"], inputs["completion_ids"]], dim=1),
        "teacher_attention_mask": torch.cat([inputs["teacher_prompt_mask"], inputs["completion_mask"]], dim=1),
        "self_distillation_mask": (inputs["advantages"] > 0).float(),
    }


def make_loss_fn(method: str, model, output_dir: str, batch_size: int, completion_len: int, bf16: bool = False):
    """(model being trained, loss function of the batch) for `method`; trainers are built once, outside timing."""
    if method == "naive":
        model.to(device())

        def naive_loss(inputs):
            with torch.autocast(device().type, dtype=torch.bfloat16, enabled=bf16):
                return naive_sdpg_loss(model, inputs, distill_coef=DISTILL_COEF, kl_coef=KL_COEF)

        return model, naive_loss
    # With a KL coefficient GRPO (and SDPG) load the frozen reference model from the policy's path: give it one.
    model.save_pretrained(f"{output_dir}/policy")
    model.config._name_or_path = f"{output_dir}/policy"
    trainer = TRAINER_BUILDERS[method](model, output_dir, batch_size, completion_len, bf16)
    # Set by `Trainer.train()`'s loop, which we bypass; one micro-batch per optimiser step.
    trainer.current_gradient_accumulation_steps = 1
    trained = trainer.model.train()
    if method == "sdpo":
        return trained, lambda inputs: trainer.compute_loss(trained, sdpo_inputs(inputs))
    return trained, lambda inputs: trainer.compute_loss(trained, inputs)


def measure(
    method: str, vocab: int, length: int, batch_size: int, iters: int, warmup: int, bf16: bool = False
) -> dict:
    """Build, warm up, then time `iters` updates; peak memory covers warmup and timed updates alike."""
    dev = device()
    with tempfile.TemporaryDirectory() as output_dir:
        model, loss_fn = make_loss_fn(method, small_model(vocab), output_dir, batch_size, length, bf16)
        # A plain AdamW for every method, so the optimiser is not a difference between them.
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        shape = BatchShape(batch_size, PROMPT_LEN, TEACHER_PROMPT_LEN, length, vocab)
        inputs = synthetic_batch(shape, dev)
        # Warm up on the same rows cut to WARMUP_LEN completion tokens: that creates the Adam state and runs every
        # code path once, at a fraction of a 4096-token update's cost.
        warmup_inputs = synthetic_batch(dataclasses.replace(shape, completion_len=min(length, WARMUP_LEN)), dev)

        def update(batch: dict[str, torch.Tensor]) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(batch).backward()
            optimizer.step()

        probe = MemoryProbe(dev)
        probe.start()
        warmup_times = [timed(lambda: update(warmup_inputs), dev)[0] for _ in range(warmup)]
        times, cpu_times = zip(*(timed(lambda: update(inputs), dev) for _ in range(iters)))
    return {
        "method": method,
        "vocab": vocab,
        "length": length,
        "batch_size": batch_size,
        "device": dev.type,
        "precision": "bf16" if bf16 else "fp32",
        "warmup_s": warmup_times,
        "times_s": times,
        "median_s": statistics.median(times),
        "cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        **probe.result(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--length", type=int, required=True, help="completion tokens per row")
    parser.add_argument("--batch", type=int, default=2, help="rows; advantages alternate +1, -1 from row 0")
    parser.add_argument("--iters", type=int, default=3, help="timed updates (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help=f"untimed {WARMUP_LEN}-token updates first")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast, as users train on GPUs (default fp32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(measure(args.method, args.vocab, args.length, args.batch, args.iters, args.warmup, args.bf16)))


if __name__ == "__main__":
    main()
