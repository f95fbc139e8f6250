"""Train with SDPG from a YAML recipe and/or command-line flags, like TRL's `trl grpo` script.

    sdpg-train --config recipes/qwen3_4b_sdpg_urkl.yaml
    accelerate launch --config_file recipes/accelerate/zero2.yaml -m sdpg_trl.scripts.train \\
        --config recipes/qwen3_4b_sdpg_urkl.yaml
    python -m sdpg_trl.scripts.train --model_name_or_path Qwen/Qwen3-1.7B --dataset_name dapo-math-17k \\
        --use_peft --lora_r 16 --report_to wandb

`recipes/...` is the checkout's link to the recipes shipped in the package; from an installed package, locate them
with `sdpg-recipes` (`--config "$(sdpg-recipes path qwen3_4b_sdpg_urkl)"`).

Flags are the fields of `SDPGScriptArguments` (data, rewards, in-training mean@k evaluation), `SDPGConfig`
(every `GRPOConfig`/`TrainingArguments` field plus SDPG's) and `trl.ModelConfig` (model, dtype, LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config, get_quantization_config

from ..config import SDPGConfig
from ..data import DataArguments, held_out_dataset, train_dataset
from ..distributed import end_training
from ..evaluation import MeanAtKArguments, MeanAtKCallback
from ..parser import SDPGParser
from ..rewards import REWARD_FUNCS, get_reward_funcs
from ..trainer import SDPGTrainer


@dataclass
class SDPGScriptArguments(DataArguments, MeanAtKArguments):
    """The script's own arguments: data (`DataArguments`), rewards, and in-training evaluation (`MeanAtKArguments`).

    Args:
        reward_funcs: reward functions by registry name (`sdpg_trl.rewards.REWARD_FUNCS`) or dotted import path.
        eval_every_steps: run mean@k on the held-out set(s) every this many optimiser steps and log it as
            `Trainer.evaluate` names its metrics: `eval_accuracy`, or `eval_<name>_accuracy` per set when
            `eval_dataset_name` names several (`sdpg_trl.evaluation.eval_metrics`); `0` turns it off.
        eval_before_training: also evaluate at step 0, so that curves start from the base model.
    """

    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_accuracy_reward"],
        metadata={"help": f"Reward functions: {sorted(REWARD_FUNCS)} or dotted import paths."},
    )
    eval_every_steps: int = field(default=0, metadata={"help": "mean@k evaluation every N steps; 0 = off."})
    eval_before_training: bool = field(default=True, metadata={"help": "Also evaluate before the first step."})

    def __post_init__(self):
        # Both bases check their own fields; neither calls the other.
        DataArguments.__post_init__(self)
        MeanAtKArguments.__post_init__(self)
        if self.eval_every_steps < 0:
            raise ValueError(f"eval_every_steps must be >= 0, got {self.eval_every_steps}.")


def make_parser() -> SDPGParser:
    """The parser over (script arguments, `SDPGConfig`, `trl.ModelConfig`), also used to validate recipes."""
    return SDPGParser((SDPGScriptArguments, SDPGConfig, ModelConfig))


def train(script_args: SDPGScriptArguments, training_args: SDPGConfig, model_args: ModelConfig) -> SDPGTrainer:
    """Build the data, rewards and `SDPGTrainer` from parsed arguments, train, save, and return the trainer."""
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a Hub id or a local directory).")
    # Everything that can be wrong with the inputs is checked before the model is loaded.
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    context_column = training_args.context_column if training_args.needs_teacher else None
    dataset = train_dataset(script_args, context_column)
    held_out = held_out_dataset(script_args) if script_args.eval_every_steps else None
    if script_args.eval_every_steps and held_out is None:
        raise ValueError(
            "eval_every_steps > 0 needs a held-out set: set eval_dataset_name (e.g. aime24), give dataset_name a "
            f"{script_args.dataset_test_split!r} split (dataset_test_split), or split a datasets: mixture "
            "(test_split_size)."
        )

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    trainer = SDPGTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset,
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
    """Console entry point `sdpg-train`; `argv` defaults to the command line. Use `train` to get the trainer back."""
    # Returns None: console scripts pass the return value to sys.exit, which treats an object as a failure.
    trainer = train(*make_parser().parse_args_and_config(args=argv))
    # TRL's scripts end with `trainer.end()`, which leaves the process group to the DDP wrapper until the exit.
    end_training(trainer)


if __name__ == "__main__":
    main()
