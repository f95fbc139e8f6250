"""The model card a run writes names SDPG's paper (arXiv 2606.04036), not GRPO's (DeepSeekMath, arXiv 2402.03300).

`SDPGTrainer` is a `GRPOTrainer`, whose `_paper` TRL's `create_model_card` puts in the card ("a method introduced
in ...", and the BibTeX under "Citations"). The card is written with every checkpoint and by `push_to_hub`.
"""

from __future__ import annotations

from conftest import make_dataset
from trl import GRPOTrainer

from sdpg_trl import SDPGConfig, SDPGTrainer

SDPG_ARXIV, GRPO_ARXIV = "2606.04036", "2402.03300"


def reward(completions, **kwargs):
    return [float(len(c[0]["content"]) % 2) for c in completions]


def test_sdpg_trainer_has_its_own_paper_metadata():
    paper = SDPGTrainer._paper
    assert paper is not GRPOTrainer._paper and paper["id"] == SDPG_ARXIV
    assert paper["title"] == "Self-Distilled Policy Gradient"
    citation = paper["citation"]
    assert citation.startswith("@article{") and citation.rstrip().endswith("}") and SDPG_ARXIV in citation
    assert "Liu" in citation and "Gu" in citation and GRPO_ARXIV not in citation
    assert SDPGTrainer._name == "SDPG" and "sdpg" in SDPGTrainer._tag_names


def test_the_card_written_with_a_checkpoint_cites_sdpg(tmp_path, tokenizer, tiny_model_dir):
    args = SDPGConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
        max_steps=1, save_strategy="steps", save_steps=1, report_to="none", bf16=False, use_cpu=True,
        distill_warmup_steps=0, distill_decay_steps=0,
    )  # fmt: skip
    trainer = SDPGTrainer(
        model=tiny_model_dir, reward_funcs=reward, args=args, train_dataset=make_dataset(), processing_class=tokenizer
    )
    trainer.train()
    card = (tmp_path / "README.md").read_text()  # written by GRPOTrainer._save_checkpoint
    assert "This model was trained with SDPG, a method introduced in [Self-Distilled Policy Gradient]" in card
    assert f"https://huggingface.co/papers/{SDPG_ARXIV}" in card
    assert SDPGTrainer._paper["citation"] in card  # the BibTeX, under "Citations"
    assert GRPO_ARXIV not in card and "DeepSeekMath" not in card
    assert "- sdpg" in card  # the tag
