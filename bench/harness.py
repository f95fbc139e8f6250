"""Shared pieces of the benchmark: device, tiny models, a local tokenizer, synthetic batches, memory probes.

Everything here is built locally (no Hub): the models are random-weight Llama configs and the tokenizer is a small
word-level one, because the loss step only consumes token ids.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

#: Vocabulary of SmolLM2-135M (the demo model) and of the Qwen3 family.
VOCAB_SIZES = {"smollm2": 49152, "qwen3": 151936}

#: SmolLM2-135M's shape, used for the whole-step benchmark on the demo model.
SMOLLM2_135M_SHAPE = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)

#: The loss-step model: vocabulary at full size, body small, so a 4096-token sweep fits 2 CPU cores. The lm_head
#: then dominates the cost, which is the worst case for SDPG (its extra work is all in the vocabulary projection).
SMALL_BODY_SHAPE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def device() -> torch.device:
    """CUDA when present (the same code path then measures GPU memory), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def small_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """Random-weight Llama with `SMALL_BODY_SHAPE` and the given vocabulary, in fp32, in train mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=1, **SMALL_BODY_SHAPE)
    return LlamaForCausalLM(config).train()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer made in memory: trainers need one to construct, the loss step never uses it."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(61)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def tiny_dataset(rows: int = 8) -> Dataset:
    """Prompts with a privileged-context column, enough for a trainer to construct (and to train a few steps)."""
    return Dataset.from_dict(
        {
            "prompt": [f"What is {i} + {i}? Answer in \\boxed{{}}." for i in range(rows)],
            "privileged_context": [f"The answer is {2 * i}." for i in range(rows)],
        }
    )


def alternating_reward(completions: list, **_) -> list[float]:
    """1, 0, 1, 0, ...: with groups of 2 every group has one right and one wrong rollout, so half the advantages
    are positive (SDPG's gate then distils half the batch) and every run sees the same reward pattern."""
    return [float(i % 2 == 0) for i in range(len(completions))]


@dataclass(frozen=True)
class BatchShape:
    """Shape of one synthetic update batch."""

    batch_size: int
    prompt_len: int
    teacher_prompt_len: int
    completion_len: int
    vocab_size: int


def synthetic_batch(shape: BatchShape, dev: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """GRPO's loss inputs plus SDPG's and SDPO's teacher inputs, for one batch.

    Prompts are left-padded (row 0 carries 8 pad tokens) as GRPO produces them; completions use every position, the
    worst case for memory. Advantages alternate +1 / -1 so half the rows pass SDPG's positive-advantage gate. The
    reference log-probs are those of a uniform policy, close to what a random-weight model gives.
    """
    g = torch.Generator().manual_seed(seed)
    b, p, pt, t, v = (
        shape.batch_size,
        shape.prompt_len,
        shape.teacher_prompt_len,
        shape.completion_len,
        shape.vocab_size,
    )
    prompt_ids = torch.randint(3, v, (b, p), generator=g)
    teacher_tail = torch.randint(3, v, (b, pt - p), generator=g)
    teacher_prompt_ids = torch.cat([prompt_ids, teacher_tail], dim=1)
    prompt_mask = torch.ones(b, p, dtype=torch.long)
    prompt_mask[0, :8] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    teacher_prompt_mask = torch.cat([prompt_mask, torch.ones(b, pt - p, dtype=torch.long)], dim=1)
    teacher_prompt_ids = teacher_prompt_ids.masked_fill(teacher_prompt_mask == 0, 0)
    completion_ids = torch.randint(3, v, (b, t), generator=g)
    completion_mask = torch.ones(b, t, dtype=torch.long)
    advantages = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(b)])
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
        "ref_per_token_logps": torch.full((b, t), -math.log(v)),
        "teacher_prompt_ids": teacher_prompt_ids,
        "teacher_prompt_mask": teacher_prompt_mask,
    }
    return {k: x.to(dev) for k, x in batch.items()}


class MemoryProbe:
    """Peak memory of this process after a baseline: peak RSS on CPU, `max_memory_allocated` on CUDA.

    On CPU the baseline is the *current* RSS when `start()` runs (after model and trainer construction) and the peak is
    `ru_maxrss`, the lifetime high-water mark. If construction itself peaked higher than the update, the delta would
    understate the update; `peak_hidden` flags that case.
    """

    def __init__(self, dev: torch.device):
        self.dev = dev
        self.baseline = 0
        self.maxrss_at_start = 0

    def start(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = current_rss_bytes()
            self.maxrss_at_start = max_rss_bytes()

    def result(self) -> dict[str, float | bool]:
        """Peak (absolute and above baseline) in GiB."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            hidden = False
        else:
            peak = max_rss_bytes()
            hidden = peak <= self.maxrss_at_start
        return {
            "peak_gib": peak / 2**30,
            "baseline_gib": self.baseline / 2**30,
            "peak_delta_gib": (peak - self.baseline) / 2**30,
            "peak_hidden": hidden,
        }


def current_rss_bytes() -> int:
    """Resident set size now, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """Lifetime peak resident set size (`ru_maxrss` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn: Callable[[], None], dev: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds of `fn()`, synchronising CUDA so queued kernels are counted.

    Process CPU time (all threads) is reported too because it is far less disturbed than wall time when other jobs
    share the cores, which is the norm on the 2-core machine this was written on.
    """
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start
