"""mean@k evaluation of a model on a math data set, written to JSON; of the student's prompts, of the teacher's (the
prompt plus the privileged context, as SDPG's teacher sees it), or of both, with the headroom between them.

    sdpg-evaluate --model_name_or_path Qwen/Qwen3-4B --dataset_name aime24 --eval_k 32 --output_file aime24.json
    sdpg-evaluate --model_name_or_path ./my-run --dataset_name arithmetic --eval_k 4 --eval_max_new_tokens 128
    sdpg-evaluate --model_name_or_path Qwen/Qwen3-4B --dataset_name dapo-math-17k --max_problems 64 --view both
    sdpg-evaluate --model_name_or_path outputs/qwen3-1.7b-sdpg-lora --dataset_name aime25 --use_vllm true \
        --chat_template_kwargs '{"enable_thinking": false}'
    python -m sdpg_trl.scripts.evaluate --config my_eval.yaml   # the same flags as YAML keys

`--dataset_name` takes what `sdpg-train` takes; for `arithmetic` the held-out split is evaluated (same generator
settings, same problems), for a data set in SDPG form its `--dataset_test_split` if it has one, for any other set
all of it, unless `--eval_dataset_name` names another one.
`--eval_split train` evaluates the training rows instead (the generator's `train` split), which is where settings
such as the teacher template should be chosen. `--view teacher` evaluates the teacher's prompts, and `--view both`
both views with the same sampling, their ratio, standard errors, and a warning when the teacher is not better.
`--model_name_or_path` may be a LoRA adapter folder (what `sdpg-train --use_peft` saves): transformers loads its base
model with the adapter, and for `--use_vllm` it is first merged into its base model in a temporary folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from trl import TrlParser

from ..config import DEFAULT_TEACHER_TEMPLATE, SDPGConfig, resolve_teacher_template
from ..data import ARITHMETIC, DataArguments, data_name, held_out_dataset, parse_dict_argument, train_dataset
from ..evaluation import (
    VIEW_CHOICES,
    MeanAtKArguments,
    evaluate_mean_at_k,
    evaluate_mean_at_k_vllm,
    evaluate_prompt_views,
    format_headroom,
)
from ..models import adapter_base_model, load_model_and_tokenizer, merge_adapter
from ..preflight import check_model_path

DEFAULT_CONTEXT_COLUMN = next(f.default for f in dataclasses.fields(SDPGConfig) if f.name == "context_column")
SPLITS = ("held_out", "train")


@dataclass
class EvaluateArguments(DataArguments, MeanAtKArguments):
    """`sdpg-evaluate`'s arguments: the data (`DataArguments`), mean@k settings (`MeanAtKArguments`), and these.

    Args:
        model_name_or_path: Hub id or local directory of the model, or a local LoRA adapter folder.
        output_file: where to write the JSON report (summary and per-problem samples).
        dtype: model weights' dtype for the transformers back-end.
        use_vllm: generate with vLLM instead of transformers (GPU only).
        vllm_gpu_memory_utilization: fraction of GPU memory vLLM may take.
        vllm_tensor_parallel_size: GPUs one vLLM engine spans.
        eval_split: `held_out` (the default: `eval_dataset_name`, the generator's `test` split, or all of
            `dataset_name`) or `train` (the rows `sdpg-train` trains on).
        max_problems: evaluate only the first this many problems; `0` = all.
        view: `student` (the prompts as they are), `teacher` (each prompt plus `teacher_template` filled with the
            row's `context_column`, as `SDPGTrainer`'s teacher sees it) or `both` (with the headroom between them).
        teacher_template, context_column: as in `SDPGConfig`, with its defaults.
        chat_template_kwargs: extra arguments of the chat template, as `SDPGConfig.chat_template_kwargs` (JSON on
            the command line), e.g. `{"enable_thinking": false}`.
    """

    # Required: without it the parser prints the usage instead of running (a recipe's value counts).
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path of the model, or a LoRA adapter.", "required": True}
    )
    output_file: str = field(default="eval_results.json", metadata={"help": "Path of the JSON report."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype (transformers back-end)."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM."})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM GPU memory fraction."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor-parallel size."})
    eval_split: str = field(
        default="held_out", metadata={"help": "Rows to evaluate: held_out or train.", "choices": SPLITS}
    )
    max_problems: int = field(default=0, metadata={"help": "Evaluate only the first N problems; 0 = all."})
    view: str = field(
        default="student",
        metadata={
            "help": "Prompts to evaluate: student, teacher (with the privileged context) or both.",
            "choices": VIEW_CHOICES,
        },
    )
    teacher_template: str = field(
        default=DEFAULT_TEACHER_TEMPLATE,
        metadata={
            "help": "Teacher view: text appended to the prompt, holding {context}, or a template's name "
            "('default', 'answer_check'), as SDPGConfig.teacher_template."
        },
    )
    context_column: str = field(
        default=DEFAULT_CONTEXT_COLUMN,
        metadata={"help": "Teacher view: column with the privileged context (as SDPGConfig.context_column)."},
    )
    chat_template_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Chat template arguments, JSON, e.g. '{\"enable_thinking\": false}'."}
    )

    def __post_init__(self):
        # Both bases check their own fields; neither calls the other.
        DataArguments.__post_init__(self)
        MeanAtKArguments.__post_init__(self)
        self.teacher_template = resolve_teacher_template(self.teacher_template)
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required.")
        self.chat_template_kwargs = parse_dict_argument(self.chat_template_kwargs, "chat_template_kwargs")
        if self.view not in VIEW_CHOICES:
            raise ValueError(f"view must be one of {VIEW_CHOICES}, got {self.view!r}.")
        if self.eval_split not in SPLITS:
            raise ValueError(f"eval_split must be one of {SPLITS}, got {self.eval_split!r}.")
        if self.eval_dataset_name and len(self.eval_dataset_name) > 1:
            raise ValueError(
                f"sdpg-evaluate evaluates one data set; eval_dataset_name names {len(self.eval_dataset_name)}: "
                f"{self.eval_dataset_name}. Run it once per set."
            )
        if self.eval_split == "train" and self.eval_dataset_name:
            raise ValueError(
                "eval_split train evaluates dataset_name's training rows; eval_dataset_name names a held-out set. "
                "Drop one of them."
            )
        if self.max_problems < 0:
            raise ValueError(f"max_problems must be >= 0, got {self.max_problems}.")


def evaluation_dataset(args: EvaluateArguments) -> tuple[Dataset, str]:
    """The rows `args` selects (split, then the first `max_problems`) and a name for them in messages."""
    if args.eval_split == "train":
        dataset = train_dataset(args)
        name = data_name(args) + (" (training split)" if args.dataset_name == ARITHMETIC and not args.datasets else "")
    else:
        dataset = held_out_dataset(args)
        if args.eval_dataset_name:
            [name] = args.eval_dataset_name
        elif dataset is not None:
            name = f"{data_name(args)} (held-out split)"
        else:  # a data set without a held-out split: all of it
            name, dataset = data_name(args), train_dataset(args)
    if args.max_problems:
        dataset = dataset.select(range(min(args.max_problems, len(dataset))))
    return dataset, name


def vllm_model_path(model_name_or_path: str, dtype: str, cleanup: contextlib.ExitStack) -> str:
    """What vLLM should load for `model_name_or_path`: itself, or for a LoRA adapter folder its base model with the
    adapter merged in, written to a temporary folder that `cleanup` removes."""
    base = adapter_base_model(model_name_or_path)
    if base is None:
        return model_name_or_path
    folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="sdpg-merged-"))
    print(f"{model_name_or_path} is a LoRA adapter of {base}: merging it into its base model for vLLM ({folder}).")
    return str(merge_adapter(model_name_or_path, folder, dtype=dtype))


def run(args: EvaluateArguments) -> dict:
    """Evaluate `args.model_name_or_path` as configured, write `args.output_file`, and return the report."""
    check_model_path(args.model_name_or_path)  # as sdpg-train: a local path to nothing is named, not looked up
    dataset, name = evaluation_dataset(args)
    loaded: dict = {}  # the model or engine, loaded at the first evaluation and shared by both views
    cleanup = contextlib.ExitStack()  # a merged adapter's temporary folder

    def evaluate(data: Dataset) -> dict:
        if args.use_vllm:
            if "llm" not in loaded:
                from vllm import LLM

                loaded["llm"] = LLM(
                    model=vllm_model_path(args.model_name_or_path, args.dtype, cleanup),
                    seed=args.eval_seed,
                    gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                    tensor_parallel_size=args.vllm_tensor_parallel_size,
                )
            kwargs = args.eval_kwargs()
            kwargs.pop("batch_size")  # vLLM schedules its own batches
            return evaluate_mean_at_k_vllm(
                loaded["llm"], data, chat_template_kwargs=args.chat_template_kwargs, **kwargs
            )
        if "model" not in loaded:
            # transformers loads a LoRA adapter folder as its base model with the adapter applied.
            model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, dtype=args.dtype)
            # Under `accelerate launch`, each process takes its own device and a share of the problems.
            model.to(PartialState().device)
            loaded["model"] = (model, tokenizer)
        return evaluate_mean_at_k(
            *loaded["model"], data, chat_template_kwargs=args.chat_template_kwargs, **args.eval_kwargs()
        )

    # Both views' prompts are built, and the context column checked, before the model is loaded.
    with cleanup:
        report = evaluate_prompt_views(evaluate, dataset, args.view, args.teacher_template, args.context_column, name)
    report = {
        "model": args.model_name_or_path,
        "dataset": args.eval_dataset_name[0] if args.eval_dataset_name else data_name(args),
        "split": args.eval_split,
        **report,
    }
    if PartialState().is_main_process:
        path = Path(args.output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        if args.view == "both":
            print(f"{name}: {format_headroom(report['headroom'])}\n-> {path}")
        else:
            print(
                f"mean@{report['k']} accuracy {report['accuracy']:.4f} on {report['num_problems']} problems of {name} "
                f"({args.view} view) -> {path}"
            )
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point `sdpg-evaluate`; `argv` defaults to the command line. Use `run` to get the report back."""
    # Returns None: console scripts pass the return value to sys.exit, which treats an object as a failure.
    (args,) = TrlParser(EvaluateArguments).parse_args_and_config(args=argv)
    run(args)


if __name__ == "__main__":
    main()
