"""Does a sampled token get the same log-prob whichever LM-head kernel scores it? (issue 21, point 1)

Scores the same hidden states, head and sampled tokens with the plain kernel (`chunked_logps_and_entropy`, which is
what GRPO's old and reference log-probs come from) and with the fused distillation pass (`fused_policy_distillation`,
the distilled tokens), in one dtype, and prints the largest and mean |log-prob difference| and the range of the
on-policy ratio `exp(fused - plain)` that difference would give. The logits are scaled so that the largest is about
`--top-logit`, and the tokens are sampled from the head's own distribution, as rollouts are.

Usage: python -m bench.logprob_agreement [--vocab 32768 --top-logit 20 --dtype bfloat16 --tokens 256]
"""

from __future__ import annotations

import argparse
import math

import torch

from sdpg_trl.head_kernels import chunked_logps_and_entropy, fused_policy_distillation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def agreement(vocab: int, hidden: int, tokens: int, top_logit: float, dtype: torch.dtype, seed: int = 0) -> dict:
    """|fused - plain| log-prob statistics and the ratio range, under CPU autocast to `dtype` (none for fp32)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator) / math.sqrt(hidden)
    # Logits ~ N(0, scale^2): the largest of `vocab` draws is about scale * sqrt(2 ln vocab).
    scale = top_logit / math.sqrt(2 * math.log(vocab))
    student = torch.randn(tokens, hidden, generator=generator) * scale
    teacher = student + 0.1 * scale * torch.randn(tokens, hidden, generator=generator)
    weight, student, teacher = (x.to(dtype).float() for x in (weight, student, teacher))  # representable in dtype
    probs = (student.double() @ weight.double().T).softmax(-1)
    labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        plain, _ = chunked_logps_and_entropy(student, weight, None, labels)
        fused, *_ = fused_policy_distillation(student, teacher, weight, None, labels)
    diff = (fused - plain).double()
    ratio = diff.exp()
    top = (student.double() @ weight.double().T).amax(-1)
    return {
        "vocab": vocab,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "top_logit_mean": top.mean().item(),
        "max_abs_diff": diff.abs().max().item(),
        "mean_abs_diff": diff.abs().mean().item(),
        "ratio_min": ratio.min().item(),
        "ratio_max": ratio.max().item(),
        "bitwise_equal": torch.equal(fused, plain),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--top-logit", type=float, default=20.0)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    args = parser.parse_args()
    print(agreement(args.vocab, args.hidden, args.tokens, args.top_logit, DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
