"""Binary verifier rewards (SPEC 2.1) over the gold-answer column, and a registry to pick them by name in recipes.

TRL calls a reward function as `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)`, so the gold
answer arrives as a keyword named after its column: `answer` (SDPG's data sets, `sdpg_trl.data`) or `solution`
(TRL's math rewards and examples); these rewards take either, `answer` first (README, "Data contract"). The check
itself is `trl.rewards.accuracy_reward`, i.e. `math-verify`: no LaTeX parsing is done here.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable
from types import ModuleType

from trl import rewards as trl_rewards
from trl.rewards import accuracy_reward

logger = logging.getLogger(__name__)

# math-verify's regexes run on the whole completion and its timeouts only work in the main thread; a runaway
# generation of megabytes would make one reward call crawl. The final answer sits at the end, so keep the tail.
MAX_VERIFIED_CHARS = 20_000
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# Columns a reward reads the gold final answer from, in order of preference: SDPG's, then TRL's.
GOLD_COLUMNS = ("answer", "solution")
THINK_CLOSE = "</think>"  # ends the reasoning block of thinking models (Qwen3, DeepSeek-R1)
# The settings `trl grpo --reward_funcs get_soft_overlong_punishment` uses (its GRPOScriptArguments help says so).
TRL_OVERLONG_PUNISHMENT = {"max_completion_len": 1280, "soft_punish_cache": 256}


def completion_text(completion: str | list[dict]) -> str:
    """Text of one completion, standard (`str`) or conversational (a list of message dicts)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion if isinstance(message, dict))


def gold_answers(answer: list | None, solution: list | None, reward: str, columns: Iterable[str]) -> list:
    """The gold answers a reward got: the `answer` column's, else the `solution` column's.

    Raises `ValueError` naming the reward and the columns it was given (`columns`) when there is neither.
    """
    gold = answer if answer is not None else solution
    if gold is None:
        raise ValueError(
            f"{reward} reads the gold answer from a column named {' or '.join(map(repr, GOLD_COLUMNS))}; the data "
            f"set has neither (the reward got: {sorted(columns)}). Rename one, e.g. with "
            "--dataset_column_mapping; see the README's data contract."
        )
    return gold


def _verify(text: str, gold: str) -> float:
    """1.0 if math-verify finds `gold` as the completion's final answer, else 0.0 (also for errors and bad gold)."""
    try:
        [reward] = accuracy_reward([[{"content": text[-MAX_VERIFIED_CHARS:]}]], [str(gold)])
    except Exception as err:  # noqa: BLE001 - a reward must score garbage as wrong, never crash the run
        logger.debug("math-verify failed on %r: %s", text[-200:], err)
        return 0.0
    return float(reward or 0.0)  # None: the gold itself did not parse, nothing can match it


def math_accuracy_reward(
    completions: list, answer: list[str] | None = None, solution: list[str] | None = None, **kwargs
) -> list[float]:
    """1.0 when the completion's `\\boxed{}` (or other LaTeX-anchored) final answer equals the gold answer."""
    gold_list = gold_answers(answer, solution, "math_accuracy_reward", kwargs)
    return [_verify(completion_text(c), gold) for c, gold in zip(completions, gold_list, strict=True)]


def _after_thinking(completion: str | list[dict]) -> str | None:
    """The text after the completion's reasoning block, or None when the block is not closed.

    TRL's response parser (a tokenizer with a response template) has already split a closed block off into the
    message's `reasoning_content`; otherwise the block ends at the last `</think>` of the text.
    """
    if not isinstance(completion, str) and any(
        isinstance(message, dict) and message.get("reasoning_content") for message in completion
    ):
        return completion_text(completion)
    _, closed, answer = completion_text(completion).rpartition(THINK_CLOSE)
    return answer if closed else None


def think_math_accuracy_reward(
    completions: list, answer: list[str] | None = None, solution: list[str] | None = None, **kwargs
) -> list[float]:
    """`math_accuracy_reward` for thinking models (Qwen3 with thinking on, the paper's setup): only the text after
    the reasoning block (`<think>...</think>`) is verified, so an answer boxed while thinking does not count.

    A completion that never closes its reasoning block scores 0: one cut off while thinking (`<think>` without
    `</think>`), and one with no `</think>` at all, which is also how an unfinished block looks when the chat
    template opens it in the prompt. With thinking switched off, use `math_accuracy_reward`.
    """
    gold_list = gold_answers(answer, solution, "think_math_accuracy_reward", kwargs)
    rewards = []
    for completion, gold in zip(completions, gold_list, strict=True):
        text = _after_thinking(completion)
        rewards.append(0.0 if text is None else _verify(text, gold))
    return rewards


def lenient_math_accuracy_reward(
    completions: list, answer: list[str] | None = None, solution: list[str] | None = None, **kwargs
) -> list[float]:
    """Like `math_accuracy_reward`, but a completion without `\\boxed{}` is judged by the last number it contains.

    Meant for tiny models such as SmolLM2-135M, which rarely box their answer: without this, almost every group
    would score all zeros and give neither GRPO nor the gated distillation any signal.
    """
    rewards = []
    gold_list = gold_answers(answer, solution, "lenient_math_accuracy_reward", kwargs)
    for completion, gold in zip(completions, gold_list, strict=True):
        text = completion_text(completion)
        if "\\boxed" not in text:
            numbers = _NUMBER.findall(text[-MAX_VERIFIED_CHARS:])
            text = f"\\boxed{{{numbers[-1].replace(',', '')}}}" if numbers else ""
        rewards.append(_verify(text, gold))
    return rewards


REWARD_FUNCS: dict[str, Callable[..., list[float]]] = {
    "math_accuracy_reward": math_accuracy_reward,
    "lenient_math_accuracy_reward": lenient_math_accuracy_reward,
    "think_math_accuracy_reward": think_math_accuracy_reward,
}


def trl_reward_funcs() -> dict[str, Callable[..., list[float]]]:
    """The reward names `trl grpo --reward_funcs` knows, resolved as TRL's GRPO script resolves them: every reward
    function of `trl.rewards` by its name, and `get_soft_overlong_punishment` built with the values that script
    documents (`TRL_OVERLONG_PUNISHMENT`). The other `get_*` of `trl.rewards` are factories that script does not
    offer by name; give them as a dotted path to a function of your own that builds one."""
    exported = {name: getattr(trl_rewards, name) for name in trl_rewards.__all__}  # its submodules too
    funcs = {name: f for name, f in exported.items() if inspect.isfunction(f) and not name.startswith("get_")}
    funcs["get_soft_overlong_punishment"] = trl_rewards.get_soft_overlong_punishment(**TRL_OVERLONG_PUNISHMENT)
    return funcs


def get_reward_funcs(names: list[str]) -> list[Callable[..., list[float]]]:
    """Reward functions by name, looked up as `trl grpo` does and then some: TRL's names first
    (`trl_reward_funcs`: `accuracy_reward`, `think_format_reward`, ...), then this project's (`REWARD_FUNCS`),
    then a dotted import path (`"my_pkg.rewards.my_reward"`, importable from the working directory as in TRL)."""
    known = {**trl_reward_funcs(), **REWARD_FUNCS}
    if not names:
        raise ValueError(f"Name at least one reward function; known: {sorted(known)}.")
    funcs = []
    for name in names:
        if name in known:
            funcs.append(known[name])
            continue
        module_name, _, attribute = name.rpartition(".")
        if not module_name:
            raise ValueError(
                f"Unknown reward function {name!r}; use one of {sorted(known)} or a dotted import path "
                "('my_pkg.rewards.my_reward')."
            )
        try:
            funcs.append(getattr(_import_from_working_directory(module_name), attribute))
        except (ImportError, AttributeError) as err:
            raise ValueError(f"Cannot import reward function {name!r}: {err}") from err
    return funcs


def _import_from_working_directory(module_name: str) -> ModuleType:
    """`importlib.import_module`, with the working directory importable, as `trl grpo` makes it for its rewards."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)  # after the installed packages: a local file must not shadow one of them
    return importlib.import_module(module_name)
