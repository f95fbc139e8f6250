"""SDPGTrainer under `accelerate launch` with two CPU processes (DDP over gloo): the hook-based hidden-state capture,
the teacher pass on a rank-dependent number of rows and the cross-process metrics must all work there; and
`end_training`, which tears the process group down before the interpreter exits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import torch
from conftest import make_dataset
from transformers import Trainer

from sdpg_trl import SDPGConfig, SDPGTrainer, end_training

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    from accelerate import PartialState
    from torch.nn.parallel import DistributedDataParallel
    from conftest import make_dataset, make_tokenizer
    from sdpg_trl import SDPGConfig, SDPGTrainer, end_training

    def reward(completions, **kwargs):
        return [float(len(c[0]["content"]) % 2) for c in completions]

    args = SDPGConfig(
        output_dir={out!r}, per_device_train_batch_size=4, num_generations=4, max_completion_length=6, max_steps=3,
        logging_steps=1, report_to="none", save_strategy="no", bf16=False, use_cpu=True, distill_warmup_steps=0,
        distill_decay_steps=0, distill_coef=0.5, beta=0.1, learning_rate=1e-2, seed=0,
    )
    trainer = SDPGTrainer(model={model!r}, reward_funcs=reward, args=args, train_dataset=make_dataset(8),
                          processing_class=make_tokenizer())
    trainer.train()
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    state = PartialState()
    end_training(trainer)  # without it the process group outlives the script and can abort the exit
    ddp_alive = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
    with open({out!r} + f"/rank{{state.process_index}}.json", "w") as f:
        json.dump({{"world": state.num_processes, "checksum": weights.double().sum().item(),
                    "logs": trainer.state.log_history, "group_alive": torch.distributed.is_initialized(),
                    "ddp_alive": ddp_alive}}, f)
    """
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_training(tmp_path, tiny_model_dir):
    script = tmp_path / "run.py"
    out = tmp_path / "out"
    out.mkdir()
    tests_dir = os.path.dirname(__file__)
    script.write_text(SCRIPT.format(tests_dir=tests_dir, out=str(out), model=tiny_model_dir))
    # `--multi_gpu` picks accelerate's torchrun launcher; with no GPU it runs DDP on gloo (`--cpu` would launch one).
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    # `end_training` freed the DDP wrapper (the group's last owner) and destroyed the group before the exit.
    assert all(not r["group_alive"] and r["ddp_alive"] == 0 for r in ranks)
    # DDP keeps replicas identical: the gradients (KL included) were all-reduced on both ranks.
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    logs = [h for h in ranks[0]["logs"] if "loss" in h]
    assert len(logs) == 3 and all("sdpg/opd_kl" in h and "sdpg/gate_ratio" in h for h in logs)


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
