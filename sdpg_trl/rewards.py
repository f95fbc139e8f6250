"""Binary verifier rewards (SPEC 2.1) over the `answer` column, and a registry to pick them by name in recipes.

TRL calls a reward function as `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`, so the gold
answer arrives as the `answer` keyword (see `sdpg_trl.data`). The check itself is `trl.rewards.accuracy_reward`,
i.e. `math-verify`: no LaTeX parsing is done here.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable

from trl.rewards import accuracy_reward

logger = logging.getLogger(__name__)

# math-verify's regexes run on the whole completion and its timeouts only work in the main thread; a runaway
# generation of megabytes would make one reward call crawl. The final answer sits at the end, so keep the tail.
MAX_VERIFIED_CHARS = 20_000
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def completion_text(completion: str | list[dict]) -> str:
    """Text of one completion, standard (`str`) or conversational (a list of message dicts)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion if isinstance(message, dict))


def _verify(text: str, gold: str) -> float:
    """1.0 if math-verify finds `gold` as the completion's final answer, else 0.0 (also for errors and bad gold)."""
    try:
        [reward] = accuracy_reward([[{"content": text[-MAX_VERIFIED_CHARS:]}]], [str(gold)])
    except Exception as err:  # noqa: BLE001 - a reward must score garbage as wrong, never crash the run
        logger.debug("math-verify failed on %r: %s", text[-200:], err)
        return 0.0
    return float(reward or 0.0)  # None: the gold itself did not parse, nothing can match it


def math_accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion's `\\boxed{}` (or other LaTeX-anchored) final answer equals the gold `answer`."""
    return [_verify(completion_text(c), gold) for c, gold in zip(completions, answer, strict=True)]


def lenient_math_accuracy_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """Like `math_accuracy_reward`, but a completion without `\\boxed{}` is judged by the last number it contains.

    Meant for tiny models such as SmolLM2-135M, which rarely box their answer: without this, almost every group
    would score all zeros and give neither GRPO nor the gated distillation any signal.
    """
    rewards = []
    for completion, gold in zip(completions, answer, strict=True):
        text = completion_text(completion)
        if "\\boxed" not in text:
            numbers = _NUMBER.findall(text[-MAX_VERIFIED_CHARS:])
            text = f"\\boxed{{{numbers[-1].replace(',', '')}}}" if numbers else ""
        rewards.append(_verify(text, gold))
    return rewards


REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {
    "math_accuracy_reward": math_accuracy_reward,
    "lenient_math_accuracy_reward": lenient_math_accuracy_reward,
}


def get_reward_funcs(names: list[str]) -> list[Callable[..., list[float]]]:
    """Reward functions by registry name (`REWARD_FUNCS`) or dotted import path (`"my_pkg.rewards.my_reward"`)."""
    if not names:
        raise ValueError(f"Name at least one reward function; registered: {sorted(REWARD_FUNCS)}.")
    funcs = []
    for name in names:
        if name in REWARD_FUNCS:
            funcs.append(REWARD_FUNCS[name])
            continue
        module_name, _, attribute = name.rpartition(".")
        if not module_name:
            raise ValueError(f"Unknown reward function {name!r}; use one of {sorted(REWARD_FUNCS)} or a dotted path.")
        try:
            funcs.append(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError) as err:
            raise ValueError(f"Cannot import reward function {name!r}: {err}") from err
    return funcs
