"""SDPGTrainer under `accelerate launch` with two CPU processes (DDP over gloo): the hook-based hidden-state capture,
the teacher pass on a rank-dependent number of rows and the cross-process metrics must all work there."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    from accelerate import PartialState
    from conftest import make_dataset, make_tokenizer
    from sdpg_trl import SDPGConfig, SDPGTrainer

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
    with open({out!r} + f"/rank{{state.process_index}}.json", "w") as f:
        json.dump({{"world": state.num_processes, "checksum": weights.double().sum().item(),
                    "logs": trainer.state.log_history}}, f)
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
    # DDP keeps replicas identical: the gradients (KL included) were all-reduced on both ranks.
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    logs = [h for h in ranks[0]["logs"] if "loss" in h]
    assert len(logs) == 3 and all("sdpg/opd_kl" in h and "sdpg/gate_ratio" in h for h in logs)
