"""Peak memory of the LM head at the users' scale, computed from the code's chunk sizes and dtypes (issue 21, point 9).

Counts the bytes each LM-head implementation allocates for one micro-batch on a GPU (Triton folds, which keep no
temporaries of their own), at its largest moment, the end of the backward: the selected hidden states, the tiles, the
fp32 gradient accumulators and their copies in the parameters' dtype. The model's own activations and the LM head's
weights are left out (the same for every method). The constants come from the code, so a changed chunk default
changes the table: TRL's `ChunkedLogProbFunction` tile (`LOGPROB_TOKEN_CHUNK x LOGPROB_VOCAB_TILE`), and SDPG's
`head_kernels.TOKEN_CHUNK`, `VOCAB_TILE` and `chunk_transient_bytes`.

    python -m bench.head_memory                 # prints the table (Qwen3-4B, 8 x 4096 tokens, bf16)
    python -m bench.head_memory --write-doc     # and rewrites its block in docs/PERFORMANCE.md
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpg_trl._trl_compat import LOGPROB_TOKEN_CHUNK, LOGPROB_VOCAB_TILE
from sdpg_trl.head_kernels import TOKEN_CHUNK, VOCAB_TILE, chunk_transient_bytes

DOC = Path(__file__).resolve().parent.parent / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- BEGIN HEAD MEMORY (written by `python -m bench.head_memory`) -->", "<!-- END HEAD MEMORY -->"
GIB = 2**30
FP32 = 4


@dataclass(frozen=True)
class Scale:
    """One micro-batch at the users' scale: Qwen3-4B's head, 8 rollouts x 4096 completion tokens, bf16, half of the
    rollouts distilled (SDPG's gate passes the positive advantages)."""

    vocab: int = 151936
    hidden: int = 2560
    rollouts: int = 8
    completion: int = 4096
    dtype: torch.dtype = torch.bfloat16  # compute dtype, hidden states and LM-head weights
    distilled_share: float = 0.5

    @property
    def tokens(self) -> int:
        return self.rollouts * self.completion


def trl_grpo(scale: Scale, full_finetuning: bool) -> dict[str, int]:
    """TRL's fused LM head (`ChunkedLogProbFunction` on the valid tokens), GRPO's."""
    n, h, v, size = scale.tokens, scale.hidden, scale.vocab, scale.dtype.itemsize
    parts = {
        "selected hidden states": n * h * size,
        "tiles": min(n, LOGPROB_TOKEN_CHUNK) * LOGPROB_VOCAB_TILE * size,
        "hidden-state gradient (fp32 + copy)": n * h * (FP32 + size),
    }
    if full_finetuning:
        parts["head gradient (fp32 + copy)"] = v * h * (FP32 + size)
    return parts


def sdpg(scale: Scale, full_finetuning: bool) -> dict[str, int]:
    """This project at its defaults: one fused pass over the student's tokens, a teacher for the distilled ones."""
    n, h, v, size = scale.tokens, scale.hidden, scale.vocab, scale.dtype.itemsize
    distilled = int(n * scale.distilled_share)
    parts = {
        "selected hidden states": (n + distilled) * h * size,  # the student's tokens, the teacher's distilled ones
        "tiles": chunk_transient_bytes(min(n, TOKEN_CHUNK), scale.dtype, VOCAB_TILE),
        "hidden-state gradient (fp32 + copy)": n * h * (FP32 + size),
    }
    if full_finetuning:
        parts["head gradient (fp32 + copy)"] = v * h * (FP32 + size)
    return parts


def paper_code(scale: Scale, full_finetuning: bool) -> dict[str, int]:
    """The paper's code, a lower bound: the student's and the teacher's `(B, T, V)` logits in the compute dtype, and
    the head gradient autograd gives in the weights' dtype."""
    logits = scale.tokens * scale.vocab * scale.dtype.itemsize
    parts = {"two (B, T, V) logit tensors": 2 * logits}
    if full_finetuning:
        parts["head gradient"] = scale.vocab * scale.hidden * scale.dtype.itemsize
    return parts


METHODS = {
    "TRL GRPOTrainer (fused LM head)": trl_grpo,
    "SDPG (this project, defaults)": sdpg,
    "paper's code (full logits), at least": paper_code,
}


def table(scale: Scale = Scale()) -> dict[str, dict[str, int]]:
    """Method -> {"lora": bytes, "full": bytes}: the peak of each fine-tuning mode."""
    return {
        name: {mode: sum(fn(scale, mode == "full").values()) for mode in ("lora", "full")}
        for name, fn in METHODS.items()
    }


def render(scale: Scale = Scale()) -> str:
    """The Markdown block docs/PERFORMANCE.md carries."""
    rows = table(scale)
    lines = [
        f"LM-head peak memory of one micro-batch at Qwen3-4B's head (V = {scale.vocab}, H = {scale.hidden}), "
        f"{scale.rollouts} rollouts x {scale.completion} completion tokens, "
        f"{str(scale.dtype).removeprefix('torch.')}, "
        f"half the rollouts distilled; SDPG's token chunk {TOKEN_CHUNK} x vocabulary tile {VOCAB_TILE}, TRL's tile "
        f"{LOGPROB_TOKEN_CHUNK} x {LOGPROB_VOCAB_TILE}.",
        "",
        "| method | LoRA (GiB) | full fine-tuning (GiB) | of which tiles (GiB) |",
        "|---|---|---|---|",
    ]
    for name, fn in METHODS.items():
        tiles = fn(scale, False).get("tiles", 0) / GIB
        lines.append(
            f"| {name} | {rows[name]['lora'] / GIB:.2f} | {rows[name]['full'] / GIB:.2f} | "
            f"{f'{tiles:.3f}' if tiles else '-'} |"
        )
    return "\n".join(lines)


def write_doc(doc: Path = DOC) -> None:
    text = doc.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    doc.write_text(f"{head}{BEGIN}\n{render()}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-doc", action="store_true", help=f"rewrite the table's block in {DOC.name}")
    args = parser.parse_args()
    print(render())
    if args.write_doc:
        write_doc()
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
