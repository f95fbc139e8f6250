"""One seeded `compute_loss` + backward for every preset and teacher kind, against numbers recorded before the trainer
was restructured: the loss, every parameter's gradient and every logged metric must stay bit for bit the same.

The recording (`tests/data/step_snapshot.pt`) was made at commit f06dec3, before `compute_loss` was split into steps.
Bit identity is what the restructuring promises, and it holds where the recording was made: same torch, same CPU
kernels. On another CPU (another SIMD level) or torch the same arithmetic may round differently in the last bits, so
there the check falls back to 1e-6 relative and says so. Regenerate only on purpose (a change meant to move the
numbers), with `SDPG_UPDATE_SNAPSHOT=1 pytest tests/test_step_snapshot.py`, and say why in the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_methods import perturb
from test_trainer import hand_batch, make_trainer, off_policy

SNAPSHOT = Path(__file__).parent / "data" / "step_snapshot.pt"
# Metrics renamed on purpose since the recording (CHANGELOG): recorded name -> current name.
RENAMED = {"sdpg/opd_kl": "sdpg/distill_kl"}
UPDATE = os.environ.get("SDPG_UPDATE_SNAPSHOT") == "1"

DISTILL = dict(distill_coef=0.5, distill_warmup_steps=0, distill_decay_steps=0)
# The settings of each case, on top of `test_trainer.make_args`; every teacher kind of every method that has one.
METHOD_SETTINGS = {
    "sdpg_urkl": dict(beta=0.1, **DISTILL),
    "sdpg_ufkl": dict(beta=0.1, **DISTILL),
    "sdpg_no_distill": dict(beta=0.1),
    "sdpg_no_anchor": dict(**DISTILL),
    # The value REINFORCE form the recording was made with; the preset now fills GRPO's ratio form (same gradient).
    "grpo": dict(beta=0.1, use_bias_correction_kl=False, on_policy_surrogate="reinforce"),
    "rlsd": dict(),
    "opcd": dict(distill_coef=0.5),
}
TEACHER_METHODS = ("sdpg_urkl", "sdpg_ufkl", "sdpg_no_anchor", "rlsd", "opcd")
CASES = {
    **{f"{m}-{kind}": dict(method=m, teacher_model_kind=kind, **s) for m, s in METHOD_SETTINGS.items()
       for kind in (("live", "base", "ema") if m in TEACHER_METHODS else ("live",))},
    # Off-policy (old log-probs differ): the ratio, the clip and the dual clip; GRPO's loss type.
    "sdpg_urkl-live-off_policy": dict(method="sdpg_urkl", beta=0.1, off_policy=True, **DISTILL),
    "sdpg_urkl-live-loss_grpo": dict(method="sdpg_urkl", beta=0.1, loss_type="grpo", off_policy=True, **DISTILL),
    "rlsd-base-off_policy": dict(method="rlsd", teacher_model_kind="base", off_policy=True),
    # A row whose teacher prompt does not fit, the leakage mask, the distillation filters and the per-term norms.
    "sdpg_urkl-live-diagnostics": dict(
        method="sdpg_urkl", beta=0.1, distill_exclude_eos=True, distill_teacher_confident_only=True,
        log_term_grad_norms=True, unfit_row=True, **DISTILL,
    ),
}  # fmt: skip


def run_case(tmp_path, tokenizer, tiny_model_dir, settings: dict) -> dict:
    settings = dict(settings)
    use_off_policy = settings.pop("off_policy", False)
    unfit_row = settings.pop("unfit_row", False)
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, **settings)
    perturb(trainer.model)  # the live policy moves away from the initial weights that `base` and `ema` start from
    batch = hand_batch(tokenizer)
    if use_off_policy:
        batch = off_policy(trainer.model, batch)
    if unfit_row:
        batch["teacher_prompt_fits"] = torch.tensor([True, True, True, False])
        batch["context_token_mask"] = batch["completion_ids"] % 3 == 0
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    return {"loss": loss.detach().clone(), "grads": grads, "metrics": metrics}


def environment() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


@pytest.fixture(scope="module")
def recorded():
    if UPDATE:
        return {"environment": environment(), "cases": {}}
    return torch.load(SNAPSHOT, weights_only=False)


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_is_bit_identical_to_the_recording(case, recorded, tmp_path, tokenizer, tiny_model_dir):
    result = run_case(tmp_path, tokenizer, tiny_model_dir, CASES[case])
    if UPDATE:
        recorded["cases"][case] = result
        SNAPSHOT.parent.mkdir(exist_ok=True)
        torch.save(recorded, SNAPSHOT)
        pytest.skip("recorded")
    expected = recorded["cases"][case]
    exact = recorded["environment"] == environment()
    tol = dict(rtol=0.0, atol=0.0) if exact else dict(rtol=1e-6, atol=1e-9)
    assert result["grads"].keys() == expected["grads"].keys() and result["grads"]
    torch.testing.assert_close(result["loss"], expected["loss"], **tol)
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(result["grads"][name], grad, **tol, msg=lambda m, n=name: f"{case} {n}: {m}")
    expected_metrics = {RENAMED.get(name, name): values for name, values in expected["metrics"].items()}
    assert result["metrics"].keys() == expected_metrics.keys()
    for name, values in expected_metrics.items():
        torch.testing.assert_close(
            torch.tensor(result["metrics"][name], dtype=torch.float64), torch.tensor(values, dtype=torch.float64),
            **tol, msg=lambda m, n=name: f"{case} metric {n}: {m}",
        )  # fmt: skip
