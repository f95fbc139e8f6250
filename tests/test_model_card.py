"""The model card a run writes names the method that ran (`SDPGConfig.method`) and cites its paper (issue 16,
section 3): GRPO -> DeepSeekMath (arXiv 2402.03300, TRL's own entry), RLSD -> arXiv 2604.03128, OPCD -> arXiv
2602.12275, the SDPG variants and ablations -> arXiv 2606.04036. Its tags name the method.

`SDPGTrainer` is a `GRPOTrainer`, whose `_name`, `_paper` and `_tag_names` TRL's `create_model_card` puts in the card
("trained with <name>, a method introduced in ...", the BibTeX under "Citations", the tags). The card is written with
every checkpoint and by `push_to_hub`.
"""

from __future__ import annotations

import pytest
from conftest import make_dataset
from trl import GRPOTrainer

from sdpg_trl import SDPGConfig, SDPGTrainer
from sdpg_trl.config import METHODS
from sdpg_trl.model_card import METHOD_CARDS, method_card

SDPG_ARXIV, GRPO_ARXIV, RLSD_ARXIV, OPCD_ARXIV = "2606.04036", "2402.03300", "2604.03128", "2602.12275"
# method -> (the name the card gives, the paper's arXiv id, the paper's title, tags)
EXPECTED = {
    "sdpg_urkl": ("SDPG-URKL", SDPG_ARXIV, "Self-Distilled Policy Gradient", {"trl", "sdpg", "sdpg_urkl"}),
    "sdpg_ufkl": ("SDPG-UFKL", SDPG_ARXIV, "Self-Distilled Policy Gradient", {"trl", "sdpg", "sdpg_ufkl"}),
    "sdpg_no_distill": (
        "SDPG without self-distillation (the beta = 0 ablation)", SDPG_ARXIV, "Self-Distilled Policy Gradient",
        {"trl", "sdpg", "sdpg_no_distill"},
    ),
    "sdpg_no_anchor": (
        "SDPG without the reference anchor (the alpha = 0 ablation)", SDPG_ARXIV, "Self-Distilled Policy Gradient",
        {"trl", "sdpg", "sdpg_no_anchor"},
    ),
    "grpo": (
        "GRPO", GRPO_ARXIV, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
        {"trl", "grpo"},
    ),
    "rlsd": ("RLSD", RLSD_ARXIV, "Self-Distilled RLVR", {"trl", "rlsd"}),
    "opcd": (
        "OPCD (on-policy self-distillation)", OPCD_ARXIV, "On-Policy Context Distillation for Language Models",
        {"trl", "opcd"},
    ),
}  # fmt: skip
ALL_IDS = {SDPG_ARXIV, GRPO_ARXIV, RLSD_ARXIV, OPCD_ARXIV}


def reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 2) for c in completions]


def make_args(tmp_path, **overrides) -> SDPGConfig:
    return SDPGConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
        max_steps=1, report_to="none", bf16=False, use_cpu=True, distill_warmup_steps=0, distill_decay_steps=0,
        **overrides,
    )  # fmt: skip


def test_every_method_has_a_card_entry_citing_its_paper():
    assert set(METHOD_CARDS) == set(METHODS) == set(EXPECTED)
    for method, (name, arxiv, title, tags) in EXPECTED.items():
        card = method_card(method)
        assert (card.name, card.paper["id"], card.paper["title"], set(card.tags)) == (name, arxiv, title, tags)
        citation = card.paper["citation"]
        assert citation.startswith("@article{") and citation.rstrip().endswith("}"), method
        assert f"arXiv:{arxiv}" in citation and not any(other in citation for other in ALL_IDS - {arxiv}), method
    assert method_card("grpo").paper is GRPOTrainer._paper  # TRL's own citation, as GRPOTrainer's card has it
    assert "Liu" in method_card("sdpg_urkl").paper["citation"] and "Gu" in method_card("sdpg_urkl").paper["citation"]
    with pytest.raises(ValueError, match=r"No model card for SDPGConfig.method='ppo'; known: \['grpo'"):
        method_card("ppo")


@pytest.mark.parametrize("method", list(EXPECTED))
def test_the_card_names_the_method_that_ran_and_cites_its_paper(tmp_path, tokenizer, tiny_model_dir, method):
    trainer = SDPGTrainer(
        model=tiny_model_dir, reward_funcs=reward, args=make_args(tmp_path, method=method),
        train_dataset=make_dataset(), processing_class=tokenizer,
    )  # fmt: skip
    trainer.create_model_card(model_name="run")
    card = (tmp_path / "README.md").read_text()
    name, arxiv, title, tags = EXPECTED[method]
    assert f"This model was trained with {name}, a method introduced in [{title}]" in card
    assert f"https://huggingface.co/papers/{arxiv}" in card
    assert method_card(method).paper["citation"] in card  # the BibTeX, under "Citations"
    for other in ALL_IDS - {arxiv}:
        assert other not in card, other
    card_tags = {line[2:] for line in card.split("---")[1].splitlines() if line.startswith("- ")}
    assert tags <= card_tags
    assert ("sdpg" in card_tags) is method.startswith("sdpg")  # a GRPO, RLSD or OPCD run is not tagged sdpg
    assert set(trainer.model.model_tags) == tags  # the model's own tags (used by model.push_to_hub) agree


def test_the_card_written_with_a_checkpoint_cites_the_method(tmp_path, tokenizer, tiny_model_dir):
    args = make_args(tmp_path, method="grpo", save_strategy="steps", save_steps=1)
    trainer = SDPGTrainer(
        model=tiny_model_dir, reward_funcs=reward, args=args, train_dataset=make_dataset(), processing_class=tokenizer
    )
    trainer.train()
    card = (tmp_path / "README.md").read_text()  # written by GRPOTrainer._save_checkpoint
    assert "This model was trained with GRPO, a method introduced in [DeepSeekMath" in card
    assert SDPG_ARXIV not in card and "SDPG" not in card and "- sdpg" not in card
