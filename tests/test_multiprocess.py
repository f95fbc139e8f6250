"""SDPGTrainer under `accelerate launch` with two CPU processes (DDP over gloo, and the FSDP2 recipe where the
installed accelerate can run it on CPU) against the same run in one process: one group of rollouts spans both
processes, so the advantages, the gate and the loss normalisation must be computed over the global batch for the two
runs to agree; and `end_training`, which tears the process group down before the interpreter exits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import accelerate
import pytest
import torch
from conftest import make_dataset
from transformers import Trainer

from sdpg_trl import SDPGConfig, SDPGTrainer, end_training
from sdpg_trl.scripts.recipes import recipe_path

GLOBAL_BATCH = 4  # one group of 4 rollouts per step: 4 rows in one process, 2 + 2 over two

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    from accelerate import PartialState
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel
    from conftest import make_dataset, make_tokenizer
    from sdpg_trl import SDPGConfig, SDPGTrainer, end_training
    from sdpg_trl._trl_compat import tokenize_prompts

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"])) for c in completions]

    def rollout(prompts, trainer):
        # TRL seeds each process differently (seed + rank) and samples a process's rows as one batch, so a group split
        # over two processes would get other completions than in one. Each row is sampled alone from the policy,
        # seeded by its place in the global batch, so the completions do not depend on the split.
        first = trainer.accelerator.process_index * len(prompts)
        prompt_ids, completion_ids = tokenize_prompts(trainer, prompts)[0], []
        for i, ids in enumerate(prompt_ids):
            torch.manual_seed(1000 * trainer.state.global_step + first + i)
            with torch.no_grad():
                out = trainer.model.generate(torch.tensor([ids]), generation_config=trainer.generation_config)
            completion_ids.append(out[0, len(ids):].tolist())
        return {{"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}}

    class RecordingTrainer(SDPGTrainer):  # keeps this process's completions and advantages of each batch
        batches = []

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            ids, mask = out["completion_ids"].tolist(), out["completion_mask"].tolist()
            self.batches.append({{"completions": [[t for t, m in zip(r, k) if m] for r, k in zip(ids, mask)],
                                  "advantages": out["advantages"].tolist()}})
            return out

    {prelude}
    state = PartialState(cpu=True)  # without `cpu`, a machine with no GPU starts as one process
    # SGD, not Adam: Adam's first step is about lr * sign(grad), which would turn float noise in a near-zero gradient
    # into a full-size parameter difference between the two runs.
    args = SDPGConfig(
        output_dir={out!r}, per_device_train_batch_size={per_device}, num_generations={batch},
        max_completion_length=6, max_steps={steps}, logging_steps=1, report_to="none", save_strategy="no", bf16=False,
        use_cpu=True, distill_warmup_steps=0, distill_decay_steps=0, distill_coef=0.5, beta=0.1, optim="sgd",
        learning_rate=0.5, seed=0, {settings}
    )
    trainer = RecordingTrainer(model={model!r}, reward_funcs=reward, args=args, train_dataset=make_dataset(8),
                               processing_class=make_tokenizer(), rollout_func=rollout)
    full = lambda p: p.full_tensor() if isinstance(p, DTensor) else p  # FSDP2 shards each parameter

    def flat():  # every weight, whole: FSDP2 shards each parameter, ZeRO-3 partitions it (a collective either way)
        params = list(trainer.model.parameters())
        if any(hasattr(p, "ds_numel") for p in params):
            import deepspeed
            with deepspeed.zero.GatheredParameters(params):
                return torch.cat([p.detach().clone().flatten() for p in params])
        return torch.cat([full(p).detach().flatten() for p in params])

    before = flat()
    {before_train}
    trainer.train()
    weights = flat()
    {after_train}
    # ZeRO-3 keeps each parameter as a 0-element local tensor and its full size in `ds_numel`.
    partitioned = [n for n, p in trainer.model.named_parameters() if getattr(p, "ds_numel", 0) and p.numel() == 0]
    steps = getattr(trainer, "steps", [])
    end_training(trainer)  # without it the process group outlives the script and can abort the exit
    ddp_alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
    torch.save({{"before": before, "after": weights}}, {out!r} + f"/weights{{state.process_index}}.pt")
    record = {{"world": state.num_processes, "logs": trainer.state.log_history, "batches": trainer.batches,
              "group_alive": torch.distributed.is_initialized(), "ddp_alive": ddp_alive,
              "distributed_type": trainer.accelerator.distributed_type.value, "fsdp": trainer.is_fsdp_enabled,
              "partitioned": partitioned, "steps": steps,
              "parameters": [n for n, _ in trainer.model.named_parameters()]}}
    with open({out!r} + f"/rank{{state.process_index}}.json", "w") as f:
        json.dump(record, f)
    """
)
# Logged values that are not functions of the global batch and the weights.
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# `accelerate launch` arguments for two processes: DDP (`--multi_gpu` picks accelerate's torchrun launcher; with no GPU
# it runs DDP on gloo, where `--cpu` would launch one process), and the shipped FSDP2 config. Both in float32, as the
# one-process run: the recipes' bf16 is emulated on CPUs without native bf16 and would not match it.
DDP = ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
FSDP2 = ["--config_file", str(recipe_path("accelerate/fsdp2"))]


def start_run(
    out, tiny_model_dir, launch: list[str] | None, *, steps: int = 2, settings: str = "", prelude: str = "",
    before_train: str = "", after_train: str = "", per_device: str = f"{GLOBAL_BATCH} // state.num_processes",
) -> subprocess.Popen:  # fmt: skip
    """The script in the background, in one process or under `accelerate launch` with `launch` on two; its files and
    its output land in `out`. `settings` are extra `SDPGConfig` arguments; `prelude`, `before_train` and
    `after_train` are code run before the accelerator starts, before training and after it; `per_device` is the
    micro-batch size (an expression of the script; by default one group of rollouts per step over the processes)."""
    out.mkdir()
    script = out / "run.py"
    tests_dir = os.path.dirname(__file__)
    script.write_text(SCRIPT.format(
        tests_dir=tests_dir, out=str(out), model=tiny_model_dir, batch=GLOBAL_BATCH, steps=steps, settings=settings,
        prelude=prelude, before_train=before_train, after_train=after_train, per_device=per_device,
    ))  # fmt: skip
    cmd = [sys.executable, str(script)]
    if launch is not None:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
            "--main_process_port", str(free_port()), "--mixed_precision", "no", str(script),
        ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    with open(out / "output.txt", "w") as log:  # a file, not a pipe: nothing blocks while the other run is awaited
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish_run(run: subprocess.Popen, out, timeout: float = 300) -> list[dict]:
    """Each process's record (`rank{i}.json`) with its weights before and after training; a run still going after
    `timeout` seconds (a hang) is killed and fails."""
    try:
        code = run.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        pytest.fail(
            f"{out.name} did not finish in {timeout} s (a hang?):\n" + (out / "output.txt").read_text()[-4000:]
        )
    assert code == 0, (out / "output.txt").read_text()[-4000:]
    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    for i, rank in enumerate(ranks):
        rank["weights"] = torch.load(out / f"weights{i}.pt")
    return ranks


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The one-process reference and the two-process runs, all started at once (each process spends most of its time
    importing on one core), for the tests to await with `finish_run`."""
    root = tmp_path_factory.mktemp("runs")
    started = {name: (start_run(root / name, tiny_model_dir, launch), root / name)
               for name, launch in (("one", None), ("ddp", DDP), ("fsdp2", FSDP2))}  # fmt: skip
    yield started
    for run, _ in started.values():  # those a failed or deselected test left running
        run.wait(timeout=300)


def assert_matches_one_process(
    single: dict, rank0: dict, rank1: dict, steps: int = 2, compare=None, skip_keys: set[str] = frozenset()
) -> None:
    """The two-process run equals the one-process run: rollouts, advantages, every logged value (by `compare`, float32
    tolerance by default; `skip_keys` left out at steps that were skipped) and the final weights."""
    assert (single["world"], rank0["world"], rank1["world"]) == (1, 2, 2)
    # `end_training` freed the DDP wrapper (the group's last owner) and destroyed the group before the exit.
    assert all(not r["group_alive"] and r["ddp_alive"] == 0 for r in (rank0, rank1))

    # The same global batch: one group per step, split 2 + 2 over the processes, with the same completions.
    assert len(single["batches"]) == len(rank0["batches"]) == len(rank1["batches"]) == steps
    for batch, *split in zip(single["batches"], rank0["batches"], rank1["batches"]):
        assert all(len(b["completions"]) == GLOBAL_BATCH // 2 for b in split)
        assert batch["completions"] == split[0]["completions"] + split[1]["completions"]
        # Group-relative advantages over the group's 4 rows, not over each process's 2.
        assert batch["advantages"] == pytest.approx(split[0]["advantages"] + split[1]["advantages"], abs=1e-6)
    # At some step one process had no rollout to distil while the other had: it ran the teacher on a throw-away row.
    gated = [[sum(a > 0 for a in b["advantages"]) for b in split] for split in zip(rank0["batches"], rank1["batches"])]
    assert any(0 in counts and max(counts) > 0 for counts in gated), gated

    logs = [h for h in single["logs"] if "loss" in h]
    logs0 = [h for h in rank0["logs"] if "loss" in h]
    assert len(logs) == len(logs0) == steps
    for step, (one, two) in enumerate(zip(logs, logs0)):
        skipped = one.get("loss", 0.0) is None
        # The test needs a gate that distils some rollouts and not others, and a distillation term.
        assert skipped or (0 < one["sdpg/gate_ratio"] < 1 and one["sdpg/distill_kl"] > 0), one
        assert one.keys() == two.keys()
        # float32 tolerance: at step 2 the weights differ in the last bits, and the KL between the two near-equal
        # views (about 2e-3) is a difference of log-probs near 4, so it keeps only about 1e-5 of relative precision.
        for key in one.keys() - TIMING_KEYS - (skip_keys if skipped else set()):
            if compare is None:
                assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), f"step {step + 1}: {key}"
            else:
                assert compare(one[key], two[key]), f"step {step + 1}: {key}: {one[key]} != {two[key]}"

    # The replicas are identical, and two SGD steps on the split batch land on the one-process weights.
    torch.testing.assert_close(rank0["weights"]["after"], rank1["weights"]["after"], rtol=0, atol=0)
    torch.testing.assert_close(rank0["weights"]["after"], single["weights"]["after"], rtol=1e-5, atol=1e-6)
    assert (single["weights"]["after"] - single["weights"]["before"]).abs().max() > 1e-3


def test_two_process_ddp_training_matches_one_process(runs):
    (single,), ranks = finish_run(*runs["one"]), finish_run(*runs["ddp"])
    assert all(r["distributed_type"] == "MULTI_CPU" for r in ranks)
    assert_matches_one_process(single, *ranks)


def test_two_process_fsdp2_training_matches_one_process(runs):
    """TRL's fsdp2 accelerate config (`sdpg-recipes path fsdp2`) on two CPU processes, or a skip that says what the
    run became instead."""
    ranks = finish_run(*runs["fsdp2"])
    if not ranks[0]["fsdp"]:
        # Found with accelerate 1.15 and torch 2.13: torch's `fully_shard` works on CPU over gloo, but accelerate
        # does not. Without a GPU, `PartialState` joins the processes (MULTI_CPU, gloo) only with `cpu=True` (else
        # every process trains alone, DistributedType.NO), and `AcceleratorState` turns FSDP on only for GPU-like
        # types (MULTI_GPU, MULTI_XPU, ...), so the launch (ACCELERATE_USE_FSDP=true) silently trains with DDP.
        pytest.skip(
            f"accelerate {accelerate.__version__} cannot run FSDP on CPU: launched with the FSDP2 config, the run "
            f"trained as {ranks[0]['distributed_type']} (plain DDP over gloo), because AcceleratorState enables FSDP "
            "only for GPU-like distributed types; without use_cpu each process would train alone (tests/test_fsdp2.py "
            "checks the head kernels and teachers under torch's fully_shard directly)"
        )
    assert all(r["distributed_type"] == "FSDP" for r in ranks)
    (single,) = finish_run(*runs["one"])
    assert_matches_one_process(single, *ranks)


# Two groups of rollouts per optimizer step in micro-batches of 2: 4 micro-batches in one process, 2 in each of two.
ACCUMULATION = {"one": (None, "gradient_accumulation_steps=4"), "ddp": (DDP, "gradient_accumulation_steps=2")}
OWN_METRICS = ("sdpg/", "rlsd/")  # GRPOTrainer's own metrics (entropy, kl, clip_ratio/*) are per micro-batch


@pytest.fixture(scope="module")
def accumulated_runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("accumulated")
    started = {name: (start_run(root / name, tiny_model_dir, launch, settings=settings, per_device="2"), root / name)
               for name, (launch, settings) in ACCUMULATION.items()}  # fmt: skip
    yield started
    for run, _ in started.values():
        run.wait(timeout=300)


def test_sdpg_metrics_over_processes_and_accumulation_match_one_process(accumulated_runs):
    """The same optimizer steps, split into 4 micro-batches in one process or 2 in each of two (gradient
    accumulation over DDP): the same weights and the same `sdpg/*` metrics, each the ratio of the step's global sums
    (`train_metrics.StepSums`), not a mean of per-micro-batch ratios."""
    (single,), ranks = finish_run(*accumulated_runs["one"]), finish_run(*accumulated_runs["ddp"])
    assert (single["world"], *(r["world"] for r in ranks)) == (1, 2, 2)
    assert all(not r["group_alive"] and r["ddp_alive"] == 0 for r in ranks)  # `end_training` tore the group down
    for batch, *split in zip(single["batches"], *(r["batches"] for r in ranks), strict=True):
        assert batch["completions"] == split[0]["completions"] + split[1]["completions"]
    logs, logs0 = ([h for h in run["logs"] if "loss" in h] for run in (single, ranks[0]))
    assert len(logs) == len(logs0) == 2
    for step, (one, two) in enumerate(zip(logs, logs0), start=1):
        own = sorted(key for key in one if key.startswith(OWN_METRICS))
        assert own == sorted(key for key in two if key.startswith(OWN_METRICS))
        assert {"sdpg/kl_share_on_context_tokens", "sdpg/context_token_share", "sdpg/distill_kl"} <= set(own)
        assert 0 < one["sdpg/gate_ratio"] < 1 and one["sdpg/distill_kl"] > 0, one
        different = {key: (one[key], two[key]) for key in own if two[key] != pytest.approx(one[key], rel=1e-4)}
        assert not different, f"step {step}: {different}"
    torch.testing.assert_close(ranks[0]["weights"]["after"], ranks[1]["weights"]["after"], rtol=0, atol=0)
    torch.testing.assert_close(ranks[0]["weights"]["after"], single["weights"]["after"], rtol=1e-5, atol=1e-6)


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def test_end_training_in_one_process_is_safe_and_idempotent(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    args = SDPGConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
        max_steps=1, report_to="none", save_strategy="no", bf16=False, use_cpu=True, distill_warmup_steps=0,
        distill_decay_steps=0, seed=0,
    )  # fmt: skip
    trainer = SDPGTrainer(model=tiny_model_dir, reward_funcs=zero_reward, args=args, train_dataset=make_dataset(),
                          processing_class=tokenizer)  # fmt: skip
    trainer.train()
    # transformers without `Trainer.end`: the accelerator's `end_training` finishes the run instead.
    ended = []
    monkeypatch.delattr(Trainer, "end")
    monkeypatch.setattr(trainer.accelerator, "end_training", lambda: ended.append(True))
    end_training(trainer)
    assert ended == [True]
    monkeypatch.undo()

    end_training(trainer)  # a second call, now through `Trainer.end`, is harmless
    assert not torch.distributed.is_initialized()
    assert trainer.model_wrapped is trainer.model and trainer.optimizer is None
    assert trainer.accelerator._models == []
    with torch.no_grad():  # the unwrapped model stays usable on this process
        assert trainer.model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)
