"""SDPG's LM-head path under FSDP2, with torch's `fully_shard` directly on two CPU processes over gloo.

accelerate cannot start FSDP on CPU (tests/test_multiprocess.py skips its FSDP2 launch with the reason), so this
test shards the tiny model itself and runs the trainer's own pieces: the student forward with the head kernels inside
the sharded model's forward (TRL's forward redirection, as `SDPGTrainer._student_pass` does), the whole head from
`lm_head_parameters`, the teacher's hidden states from a no-grad forward of the same sharded model (live teacher) or
of a separately sharded frozen copy (base teacher), and `score_tokens` on a `token_selection`. Each process takes
half of the batch; the gathered gradients must equal one process's gradients of the mean of the two halves' losses
(FSDP2 averages gradients over processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from test_multiprocess import free_port

SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from conftest import make_model, make_tokenizer
    from test_trainer import hand_batch
    from sdpg_trl._trl_compat import ForwardRedirection
    from sdpg_trl.head_kernels import LMHead, lm_head_parameters, score_tokens
    from sdpg_trl.losses import loss_terms, token_selection

    def hidden_of(model, ids, mask, completion):
        captured = []
        handle = model.model.register_forward_hook(lambda m, a, out: captured.append(out.last_hidden_state))
        model.forward(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        handle.remove()
        return captured[0][:, -completion - 1 : -1]

    def loss_of(model, teacher, batch, rows):
        b = {{k: v[rows] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0}}
        completion = b["completion_ids"].size(1)
        terms = loss_terms(outcome_coef=1.0, distill_coef=0.5, rlsd_lam=0.0, kl_coef=0.0)
        selection = token_selection(b["advantages"], b["completion_mask"], terms)
        with torch.no_grad():  # the teacher view: the teacher prompt followed by the completion
            t_ids = torch.cat([b["teacher_prompt_ids"], b["completion_ids"]], 1)
            t_mask = torch.cat([b["teacher_prompt_mask"], b["completion_mask"]], 1)
            teacher_hidden = teacher(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True,
                                     logits_to_keep=1).hidden_states[-1][:, -completion - 1 : -1]
        teacher_head = LMHead(*lm_head_parameters(teacher))

        def student():  # inside the sharded model's forward, as SDPGTrainer._student_pass
            ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
            mask = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
            hidden = hidden_of(model, ids, mask, completion)
            return tuple(score_tokens(
                hidden, teacher_hidden[selection.rows], b["completion_ids"], selection,
                LMHead(*lm_head_parameters(model)), teacher_head, distill=True, rlsd=False,
            ))

        scores = ForwardRedirection()(model, model, student)
        mask = b["completion_mask"]
        return -(scores[0] * b["advantages"].unsqueeze(1) * mask).sum() + 0.5 * (scores[2] * mask).sum()

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tokenizer = make_tokenizer()
    batch = hand_batch(tokenizer)

    def compare(base):  # live teacher: the policy itself; base: a separately sharded frozen copy
        model = make_model(tokenizer)
        teacher = make_model(tokenizer) if base else model
        with torch.no_grad():  # the live policy moves away from the frozen copy
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        reference = make_model(tokenizer)
        reference.load_state_dict(model.state_dict())
        reference_teacher = teacher if teacher is not model else reference

        # One process, the whole batch: the mean of the two halves' losses.
        halves = [loss_of(reference, reference_teacher, batch, rows) for rows in (slice(0, 2), slice(2, 4))]
        loss = (halves[0] + halves[1]) / 2
        loss.backward()
        expected = {{n: p.grad.clone() for n, p in reference.named_parameters()}}

        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        if teacher is not model:
            teacher.requires_grad_(False)
            fully_shard(teacher, mesh=mesh)
        assert isinstance(model.lm_head.weight, DTensor)
        loss_of(model, teacher, batch, slice(2 * rank, 2 * rank + 2)).backward()
        worst = max((full(p.grad) - expected[n]).abs().max().item() for n, p in model.named_parameters())
        lm_head = (full(model.lm_head.weight.grad) - expected["lm_head.weight"]).abs().max().item()
        with open({out!r} + f"/rank{{rank}}-{{'base' if base else 'live'}}.json", "w") as f:
            scale = expected["lm_head.weight"].abs().max().item()
            json.dump({{"worst": worst, "lm_head": lm_head, "scale": scale}}, f)

    for base in (False, True):
        compare(base)
    # Tear the group down only when both processes are done with every collective, and after the sharded models
    # (which hold the device mesh) are gone: a process whose gloo peer has already torn down can abort at exit
    # ("terminate called without an active exception"), as one CI run did.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_head_kernels_and_teacher_under_fully_shard_match_one_process(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests_dir=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           env["MASTER_PORT"], str(script)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # Which results the processes had written tells a failure at the end (teardown) from one in the work.
    written = sorted(path.name for path in tmp_path.glob("rank*.json"))
    assert run.returncode == 0, f"results written: {written}\n" + run.stdout[-3000:] + run.stderr[-3000:]
    # live teacher: the sharded policy itself; base: a separately sharded frozen copy
    results = [json.loads((tmp_path / f"rank{rank}-{kind}.json").read_text()) for rank in range(2) for kind in
               ("live", "base")]  # fmt: skip
    for result in results:
        assert result["scale"] > 1e-3  # the head got a gradient worth comparing
        assert result["worst"] < 1e-5 and result["lm_head"] < 1e-5, results
