"""Train with SDPG from a YAML recipe and/or command-line flags, like TRL's `trl grpo` script.

    sdpg-train --config recipes/qwen3_4b_sdpg_urkl.yaml --accelerate_config zero2
    sdpg-train --config my_trl_grpo_recipe.yaml --method grpo      # a `trl grpo --config` recipe as it is
    python -m sdpg_trl.scripts.train --model_name_or_path Qwen/Qwen3-1.7B --dataset_name dapo-math-17k \
        --reward_funcs think_math_accuracy_reward --use_peft --lora_r 16 --report_to wandb

`recipes/...` is the checkout's link to the recipes shipped in the package; from an installed package, locate them
with `sdpg-recipes` (`--config "$(sdpg-recipes path qwen3_4b_sdpg_urkl)"`). `--accelerate_config` takes what
`trl grpo` takes: a file, or the name of an accelerate config TRL ships (`sdpg-recipes list`); `accelerate launch
-m sdpg_trl.scripts.train ...` works too.

Flags are the fields of `SDPGScriptArguments` (TRL's GRPO script arguments, plus data helpers and in-training mean@k
evaluation), `SDPGConfig` (every `GRPOConfig`/`TrainingArguments` field plus SDPG's) and `trl.ModelConfig` (model,
dtype, LoRA).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field

from accelerate.commands.launch import launch_command, launch_command_parser
from trl import ModelConfig, get_peft_config, get_quantization_config

from .._trl_compat import GRPOScriptArguments, resolve_accelerate_config_argument
from ..checkpoints import hold_output_dir, is_finished, resolve_resume
from ..config import SDPGConfig
from ..data import DataArguments, data_name, held_out_dataset, train_dataset
from ..distributed import end_training
from ..evaluation import MeanAtKArguments, MeanAtKCallback
from ..parser import SDPGParser
from ..preflight import check_accelerate_config, check_train_size
from ..rewards import get_reward_funcs
from ..trainer import SDPGTrainer

logger = logging.getLogger(__name__)

# The reward when a recipe names neither reward_funcs nor reward_model_name_or_path.
DEFAULT_REWARD = "math_accuracy_reward"
# Set in the processes `--accelerate_config` launches, so that they train instead of launching again.
LAUNCHED = "SDPG_TRAIN_LAUNCHED"


@dataclass
class SDPGScriptArguments(DataArguments, MeanAtKArguments, GRPOScriptArguments):
    """`trl grpo`'s script arguments (`GRPOScriptArguments`, with TRL's `DatasetMixtureConfig` through
    `DataArguments`) plus the project's own: data helpers (`DataArguments`) and in-training mean@k evaluation
    (`MeanAtKArguments`). A field TRL adds to its script arguments is accepted here without a copy.

    TRL's fields mean what they mean in `trl grpo`: `reward_funcs` (names from `sdpg_trl.rewards.get_reward_funcs`:
    TRL's, then this project's, or dotted import paths; unset and without a reward model, `DEFAULT_REWARD`),
    `reward_model_name_or_path` (a sequence-classification model scored as a reward before `reward_funcs`),
    `ignore_bias_buffers` (read by none of TRL's GRPO code, so ignored here too). `dataset_name` and its splits are
    read by `DataArguments`, which also knows the built-in sets; `dataset_streaming` is refused (stream a mixture).

    Args:
        eval_every_steps: run mean@k on the held-out set(s) every this many optimiser steps and log it as
            `Trainer.evaluate` names its metrics: `eval_accuracy`, or `eval_<name>_accuracy` per set when
            `eval_dataset_name` names several (`sdpg_trl.evaluation.eval_metrics`); `0` turns it off. Independent of
            `eval_strategy`, which runs TRL's own evaluation (GRPO's loss and rewards on the held-out set).
        eval_before_training: also evaluate at step 0, so that curves start from the base model.
    """

    eval_every_steps: int = field(default=0, metadata={"help": "mean@k evaluation every N steps; 0 = off."})
    eval_before_training: bool = field(default=True, metadata={"help": "Also evaluate before the first step."})

    def __post_init__(self):
        # Each base checks its own fields; none calls another. TRL's script arguments have no checks of their own.
        DataArguments.__post_init__(self)
        MeanAtKArguments.__post_init__(self)
        if self.eval_every_steps < 0:
            raise ValueError(f"eval_every_steps must be >= 0, got {self.eval_every_steps}.")
        if self.dataset_streaming:
            raise ValueError(
                "dataset_streaming: sdpg-train loads dataset_name in full; to stream, give the data as a datasets: "
                "mixture with streaming: true (README, data contract)."
            )
        if self.reward_funcs is None and not self.reward_model_name_or_path:
            self.reward_funcs = [DEFAULT_REWARD]  # with a reward model alone, that model is the reward, as in TRL
        if self.reward_funcs:
            get_reward_funcs(self.reward_funcs)  # an unknown name fails while parsing, naming the known ones
        elif not self.reward_model_name_or_path:
            raise ValueError("reward_funcs is empty: name a reward function, or give reward_model_name_or_path.")


def make_parser() -> SDPGParser:
    """The parser over (script arguments, `SDPGConfig`, `trl.ModelConfig`), also used to validate recipes."""
    return SDPGParser((SDPGScriptArguments, SDPGConfig, ModelConfig))


def train(script_args: SDPGScriptArguments, training_args: SDPGConfig, model_args: ModelConfig) -> SDPGTrainer | None:
    """Build the data, rewards and `SDPGTrainer` from parsed arguments, train, save, and return the trainer; None
    when `resume_from_checkpoint` names a checkpoint at the end of the run (nothing to train).

    From when its inputs are checked until it ends, the run holds `output_dir` (`checkpoints.hold_output_dir`): a
    second run into it is refused, as is an `output_dir` it cannot write to, before any model loads."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a Hub id or a local directory).")
    # Everything that can be wrong with the inputs is checked before the model is loaded (the model source by
    # SDPGTrainer, before GRPOTrainer loads it), and a missing package before the data is.
    training_args.check_installed()
    # `resume_from_checkpoint`: `true` from the command line as from YAML, a run folder as its last checkpoint.
    checkpoint = resolve_resume(training_args.resume_from_checkpoint, training_args)
    if checkpoint is not None:
        if is_finished(checkpoint, training_args):  # Trainer would train one more step past the end
            if training_args.process_index == 0:
                print(
                    f"{checkpoint} is the end of this run (max_steps {training_args.max_steps}, num_train_epochs "
                    f"{training_args.num_train_epochs}): the run is complete, nothing to train. Raise max_steps to "
                    "train on."
                )
            return None
    training_args.resume_from_checkpoint = checkpoint
    with contextlib.ExitStack() as held:
        return _train(script_args, training_args, model_args, held)


def _train(
    script_args: SDPGScriptArguments, training_args: SDPGConfig, model_args: ModelConfig, held: contextlib.ExitStack
) -> SDPGTrainer:
    # As `trl grpo`: the reward model (a path or Hub id, loaded by GRPOTrainer) first, then the reward functions.
    reward_funcs = get_reward_funcs(script_args.reward_funcs) if script_args.reward_funcs else []
    if script_args.reward_model_name_or_path:
        reward_funcs.insert(0, script_args.reward_model_name_or_path)
    context_column = training_args.teacher_context_column
    dataset = train_dataset(script_args, context_column)
    check_train_size(dataset, training_args, data_name(script_args))  # a streamed set's first rows are read here
    # `eval_strategy` is TRL's evaluation (the trainer's loss and rewards on the held-out set, which then needs the
    # teacher's context column too); `eval_every_steps` the project's mean@k (the student's prompts only).
    trl_eval = training_args.eval_strategy != "no"
    wanted = {"eval_strategy": trl_eval, "eval_every_steps": script_args.eval_every_steps > 0}
    users = [name for name, on in wanted.items() if on]
    held_out = held_out_dataset(script_args, context_column if trl_eval else None) if users else None
    if users and held_out is None:
        raise ValueError(
            f"{' and '.join(users)} {'need' if len(users) > 1 else 'needs'} a held-out set: set eval_dataset_name "
            f"(e.g. aime24), give dataset_name a {script_args.dataset_test_split!r} split (dataset_test_split), or "
            "split a datasets: mixture (test_split_size)."
        )

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    # After the inputs are checked (a refused run leaves no folder behind), before the model loads.
    held.enter_context(hold_output_dir(training_args.output_dir))
    trainer = SDPGTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
        eval_dataset=held_out if trl_eval else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    if script_args.eval_every_steps:
        trainer.add_callback(
            MeanAtKCallback(
                trainer,
                held_out,
                eval_every=script_args.eval_every_steps,
                eval_on_start=script_args.eval_before_training,
                **script_args.eval_kwargs(),
            )
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history, for drawing curves after the run
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=None if script_args.datasets else script_args.dataset_name)
    return trainer


def main(argv: list[str] | None = None) -> None:
    """Console entry point `sdpg-train`; `argv` defaults to the command line. Use `train` to get the trainer back.

    With `--accelerate_config NAME|PATH` (on the command line or as `accelerate_config:` in the recipe), as with
    `trl grpo`: NAME is one of the configs TRL ships (`zero2`, `zero3`, `fsdp2`, `multi_gpu`, ...), and the run is
    started through `accelerate launch` with it, together with any other `accelerate launch` flags given
    (`--num_processes 2`).
    """
    argv = list(argv) if argv is not None else sys.argv[1:]
    parser = make_parser()
    *parsed, config_rest, cli_rest = parser.parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    rest = config_rest + cli_rest
    # The processes `launch` starts train; so does one the user started with `accelerate launch` (never a launch
    # inside a launch), without the recipe's accelerate_config.
    own_launch = os.environ.get(LAUNCHED) == "1"
    users_launch = not own_launch and launched_by_accelerate() and "--accelerate_config" in rest
    if users_launch:
        logger.warning(
            "accelerate_config is not applied: this process was started by `accelerate launch`, whose own settings "
            "apply. Start the run with sdpg-train to launch it with accelerate_config."
        )
    if rest and not (own_launch or users_launch):
        if "--accelerate_config" not in rest:
            unknown = [arg for arg in rest if arg.startswith("--")]
            parser.error(
                f"unknown arguments {unknown}; `accelerate launch` flags are taken only with --accelerate_config."
            )
        launch(rest, _without(argv, cli_rest))
        return
    # Returns None: console scripts pass the return value to sys.exit, which treats an object as a failure.
    trainer = train(*parsed)
    # TRL's scripts end with `trainer.end()`, which leaves the process group to the DDP wrapper until the exit.
    if trainer is not None:
        end_training(trainer)


def launched_by_accelerate() -> bool:
    """Whether this process was started by `accelerate launch`, which sets these variables in every launcher."""
    return {"ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND"} <= set(os.environ)


def launch(launch_args: list[str], training_args: list[str]) -> None:
    """`accelerate launch <launch_args> -m sdpg_trl.scripts.train <training_args>`, with `--accelerate_config`
    resolved as `trl`'s CLI resolves it (a file, or a config TRL ships, by name)."""
    launch_args = resolve_accelerate_config_argument(launch_args)
    check_accelerate_config(launch_args)  # a missing DeepSpeed is named before anything is launched
    os.environ[LAUNCHED] = "1"  # the launched processes parse the same recipe, `accelerate_config:` included
    module = "sdpg_trl.scripts.train"
    launch_command(launch_command_parser().parse_args([*launch_args, "--module", module, *training_args]))


def _without(args: list[str], taken: list[str]) -> list[str]:
    """`args` less `taken`, an ordered subsequence of it (what the parser left over, in the order given)."""
    rest = iter(taken)
    pending = next(rest, None)
    kept = []
    for arg in args:
        if arg == pending:
            pending = next(rest, None)
        else:
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
