"""Cost of each LM-head kernel an update uses, in isolation: where SDPG's extra time goes.

Times forward + backward (process CPU and wall seconds, best of 2 after a warmup) for N tokens, hidden 256:
one plain projection (the unit), TRL's chunked log-prob kernel (GRPO's fused head), TRL's chunked divergence (SDPG's
KL before 90a969b), and SDPG's fused log-prob + KL pass (`sdpg_trl.head_kernels.fused_policy_distillation`, since
90a969b).

Usage: python -m bench.head_kernels [--tokens 1024 --vocab 49152]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

from bench.harness import device, timed
from sdpg_trl.head_kernels import fused_policy_distillation

HIDDEN = 256


def best_of(fn: Callable[[], None], dev: torch.device, reps: int = 2) -> tuple[float, float]:
    fn()  # warmup
    return min((timed(fn, dev) for _ in range(reps)), key=lambda t: t[1])


def kernels(tokens: int, vocab: int, dev: torch.device) -> dict[str, Callable[[], None]]:
    """Name -> closure running one forward + backward of that kernel on the same random inputs."""
    torch.manual_seed(0)
    student = torch.randn(tokens, HIDDEN, device=dev, requires_grad=True)
    teacher = torch.randn(tokens, HIDDEN, device=dev)
    weight = (torch.randn(vocab, HIDDEN, device=dev) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=dev)

    def projection():
        (student @ weight.T).sum().backward()

    def trl_logprob():
        out = ChunkedLogProbFunction.apply(student, weight, None, targets, 1.0, 32768, None, 1.0, ("entropy",))
        out[0].sum().backward()

    def trl_divergence():
        out = ChunkedDivergenceFunction.apply(student, weight, None, teacher, weight.detach(), None, 1.0)
        out[0].sum().backward()

    def fused_pass():
        logps, _, kl, _, _ = fused_policy_distillation(student, teacher, weight, None, targets)
        (logps.sum() + kl.sum()).backward()

    return {
        "projection (unit)": projection,
        "TRL log-prob + entropy (GRPO head)": trl_logprob,
        "TRL divergence (SDPG's KL before 90a969b)": trl_divergence,
        "SDPG fused log-prob + KL (90a969b)": fused_pass,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    dev = device()
    print(f"{args.tokens} tokens, vocab {args.vocab}, hidden {HIDDEN}, {dev}; forward + backward")
    for name, fn in kernels(args.tokens, args.vocab, dev).items():
        wall, cpu = best_of(fn, dev)
        print(f"  {name:44s} CPU {cpu:6.2f} s   wall {wall:6.2f} s", flush=True)


if __name__ == "__main__":
    main()
