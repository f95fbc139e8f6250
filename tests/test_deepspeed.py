"""The shipped DeepSpeed configs (`accelerate/zero2.yaml`, `accelerate/zero3.yaml`) on two CPU processes over gloo,
against the same run in one process, with the live and the base teacher.

Only the process count and the mixed precision are overridden on the command line (float32, as the one-process run;
`use_cpu=True` in `SDPGConfig` is what lets accelerate start DeepSpeed without a GPU). ZeRO-3 keeps whole every
parameter under `stage3_param_persistence_threshold` elements (1e5 by default, the whole tiny model), so the ZeRO-3
runs set it to 0: every parameter, the LM head and a separately partitioned base teacher's included, is partitioned
and gathered as a real model's would be.

Each run trains 3 steps, and the rewards of step 2 are broken (an infinite reward): the step guard must skip it
under DeepSpeed too, where the engine steps inside the backward pass, without moving the weights or the scheduler.
The uneven split of the multi-process test (a step where one process has no rollout to distil and the other has)
checks that no collective hangs in a branch that differs between processes; a timeout turns a hang into a failure.
"""

from __future__ import annotations

import importlib.util
import math
import textwrap

import pytest
import torch
from test_multiprocess import assert_matches_one_process, finish_run, start_run
from transformers import AutoModelForCausalLM

from sdpg_trl.scripts.recipes import recipe_path

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')"
)

STEPS, BROKEN_STEP = 3, 2
# The reward of the first completion of each process's second generation batch is infinite.
BROKEN_REWARD = textwrap.dedent(
    f"""
    calls = []
    original_reward = reward

    def reward(completions, **kwargs):
        calls.append(1)
        rewards = original_reward(completions, **kwargs)
        return [float("inf")] + rewards[1:] if len(calls) == {BROKEN_STEP} else rewards
    """
)
# Each step's learning rate and how far the weights moved (a collective under ZeRO-3: every process records).
RECORD_STEPS = textwrap.dedent(
    """
    from transformers import TrainerCallback

    class RecordSteps(TrainerCallback):
        previous = before

        def on_step_end(self, args, state, control, **kwargs):
            now = flat()
            moved = (now - RecordSteps.previous).abs().max().item()
            trainer.steps.append({"lr": trainer.lr_scheduler.get_last_lr()[0], "moved": moved})
            RecordSteps.previous = now

    trainer.steps = []
    trainer.add_callback(RecordSteps())
    """
)
# ZeRO-3 partitions only parameters above `stage3_param_persistence_threshold` elements: 0 partitions them all.
PARTITION_ALL = textwrap.dedent(
    """
    from accelerate.utils import DeepSpeedPlugin
    _plugin_post_init = DeepSpeedPlugin.__post_init__

    def _partition_everything(self):
        _plugin_post_init(self)
        self.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0

    DeepSpeedPlugin.__post_init__ = _partition_everything
    """
)
SAVE = 'trainer.save_model({out!r} + "/saved")'  # ZeRO-3: gathers the 16-bit weights (zero3_save_16bit_model)
RUNS = {f"{stage}-{teacher}": (stage, teacher) for stage in ("one", "zero2", "zero3") for teacher in ("live", "base")}


def launch(stage: str) -> list[str] | None:
    return None if stage == "one" else ["--config_file", str(recipe_path(f"accelerate/{stage}"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deepspeed")
    started = {}
    for name, (stage, teacher) in RUNS.items():
        out = root / name
        started[name] = (start_run(
            out, tiny_model_dir, launch(stage), steps=STEPS, settings=f"teacher_model_kind={teacher!r},",
            prelude=BROKEN_REWARD + (PARTITION_ALL if stage == "zero3" else ""), before_train=RECORD_STEPS,
            after_train=SAVE.format(out=str(out)),
        ), out)  # fmt: skip
    yield started
    for run, _ in started.values():
        if run.poll() is None:
            run.kill()


def same(a, b) -> bool:
    """Logged values agree: both missing (None), both NaN, or equal to float32 tolerance."""
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return b == pytest.approx(a, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("teacher", ["live", "base"])
def test_deepspeed_training_matches_one_process_and_skips_the_broken_step(runs, stage, teacher):
    (single,) = finish_run(*runs[f"one-{teacher}"], timeout=600)
    ranks = finish_run(*runs[f"{stage}-{teacher}"], timeout=600)
    assert all(r["distributed_type"] == "DEEPSPEED" for r in ranks)
    if stage == "zero3":  # really partitioned: every parameter is a 0-element shard outside a forward
        assert all(r["partitioned"] == single["parameters"] for r in ranks), ranks[0]["partitioned"]
    else:
        assert not any(r["partitioned"] for r in ranks)

    # The same rollouts, advantages, logged metrics and final weights as one process (the skipped step included).
    assert_matches_one_process(single, *ranks, steps=STEPS, compare=same, skip_keys={"grad_norm"})

    # The broken step was skipped everywhere: counted, no update, the learning rate held.
    for run in (single, *ranks):
        logged = [h for h in run["logs"] if "loss" in h]
        assert [h["skipped_steps"] for h in logged] == [0, 1, 1]
        assert logged[BROKEN_STEP - 1]["loss"] is None
        moved = [s["moved"] for s in run["steps"]]
        assert moved[BROKEN_STEP - 1] == 0.0 and moved[0] > 0 and moved[2] > 0, moved
        lrs = [s["lr"] for s in run["steps"]]
        assert lrs[BROKEN_STEP - 1] == lrs[BROKEN_STEP - 2] and lrs[2] < lrs[1], lrs


@pytest.mark.parametrize("teacher", ["live", "base"])
def test_zero3_save_model_writes_full_weights(runs, teacher):
    ranks = finish_run(*runs[f"zero3-{teacher}"], timeout=600)
    saved = AutoModelForCausalLM.from_pretrained(runs[f"zero3-{teacher}"][1] / "saved", dtype=torch.float32)
    flat = torch.cat([p.detach().flatten() for p in saved.parameters()])
    torch.testing.assert_close(flat, ranks[0]["weights"]["after"], rtol=0, atol=0)
