"""mean@k evaluation of a model on a math data set, written to JSON.

    sdpg-evaluate --model_name_or_path Qwen/Qwen3-4B --dataset_name aime24 --eval_k 32 --output_file aime24.json
    sdpg-evaluate --model_name_or_path ./my-run --dataset_name arithmetic --eval_k 4 --eval_max_new_tokens 128
    python -m sdpg_trl.scripts.evaluate --config recipes/eval_aime.yaml --use_vllm true

`--dataset_name` takes what `sdpg-train` takes; for `arithmetic` the held-out split is evaluated (same generator
settings, same problems), for any other set all of it, unless `--eval_dataset_name` names another one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from trl import TrlParser

from ..data import DataArguments, held_out_dataset, load_math_dataset
from ..evaluation import MeanAtKArguments, evaluate_mean_at_k, evaluate_mean_at_k_vllm
from ..models import load_model_and_tokenizer


@dataclass
class EvaluateArguments(DataArguments, MeanAtKArguments):
    """`sdpg-evaluate`'s arguments: the data (`DataArguments`), mean@k settings (`MeanAtKArguments`), and these.

    Args:
        model_name_or_path: Hub id or local directory of the model.
        output_file: where to write the JSON report (summary and per-problem samples).
        dtype: model weights' dtype for the transformers back-end.
        use_vllm: generate with vLLM instead of transformers (GPU only).
        vllm_gpu_memory_utilization: fraction of GPU memory vLLM may take.
        vllm_tensor_parallel_size: GPUs one vLLM engine spans.
    """

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local path of the model."})
    output_file: str = field(default="eval_results.json", metadata={"help": "Path of the JSON report."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype (transformers back-end)."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM."})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM GPU memory fraction."})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor-parallel size."})

    def __post_init__(self):
        super().__post_init__()
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path is required.")


def run(args: EvaluateArguments) -> dict:
    """Evaluate `args.model_name_or_path` as configured, write `args.output_file`, and return the report."""
    dataset = held_out_dataset(args)
    if dataset is None:
        dataset = load_math_dataset(
            args.dataset_name, args.dataset_source, None, args.question_column, args.answer_column, args.solution_column
        )
    if args.use_vllm:
        kwargs = args.eval_kwargs()
        kwargs.pop("batch_size")  # vLLM schedules its own batches
        report = evaluate_mean_at_k_vllm(
            args.model_name_or_path,
            dataset,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            **kwargs,
        )
    else:
        model, tokenizer = load_model_and_tokenizer(args.model_name_or_path, dtype=args.dtype)
        # Under `accelerate launch`, each process takes its own device and a share of the problems.
        model.to(PartialState().device)
        report = evaluate_mean_at_k(model, tokenizer, dataset, **args.eval_kwargs())
    report = {"model": args.model_name_or_path, "dataset": args.eval_dataset_name or args.dataset_name, **report}
    if PartialState().is_main_process:
        path = Path(args.output_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"mean@{report['k']} accuracy {report['accuracy']:.4f} on {report['num_problems']} problems -> {path}")
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point `sdpg-evaluate`; `argv` defaults to the command line. Use `run` to get the report back."""
    # Returns None: console scripts pass the return value to sys.exit, which treats an object as a failure.
    (args,) = TrlParser(EvaluateArguments).parse_args_and_config(args=argv)
    run(args)


if __name__ == "__main__":
    main()
