"""What the model card of a run says: the method that ran (`SDPGConfig.method`), its paper, and its tags.

TRL's `create_model_card` (called with every checkpoint and by `push_to_hub`) writes "This model was trained with
<name>, a method introduced in <paper>", the paper's BibTeX under "Citations", and the trainer's tags. `SDPGTrainer`
reads `_name`, `_paper` and `_tag_names` from here, per run, so that a `method: grpo` run is a GRPO card.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

from trl import GRPOTrainer

SDPG_PAPER: dict[str, str] = {
    "title": "Self-Distilled Policy Gradient",
    "id": "2606.04036",
    "citation": textwrap.dedent("""\
        @article{liu2026self,
            title        = {{Self-Distilled Policy Gradient}},
            author       = {Yifeng Liu and Shiyuan Zhang and Yifan Zhang and Quanquan Gu},
            year         = 2026,
            eprint       = {arXiv:2606.04036},
        }"""),
}
# RLSD and OPCD as the SDPG paper cites them (its references give the title and arXiv id, not the authors); the
# entries name only what those references state.
RLSD_PAPER: dict[str, str] = {
    "title": "Self-Distilled RLVR",
    "id": "2604.03128",
    "citation": textwrap.dedent("""\
        @article{rlsd2026,
            title        = {{Self-Distilled RLVR}},
            year         = 2026,
            eprint       = {arXiv:2604.03128},
        }"""),
}
OPCD_PAPER: dict[str, str] = {
    "title": "On-Policy Context Distillation for Language Models",
    "id": "2602.12275",
    "citation": textwrap.dedent("""\
        @article{opcd2026,
            title        = {{On-Policy Context Distillation for Language Models}},
            year         = 2026,
            eprint       = {arXiv:2602.12275},
        }"""),
}


@dataclass(frozen=True)
class MethodCard:
    """The model-card entries of one `SDPGConfig.method`: TRL's `_name`, `_paper` and `_tag_names`."""

    name: str
    paper: dict[str, str]
    tags: list[str] = field(default_factory=list)


# Keyed by `SDPGConfig.method` (`sdpg_trl.config.METHODS`). GRPO's paper is TRL's own (DeepSeekMath), as
# GRPOTrainer's card cites it; the SDPG variants and ablations cite the SDPG paper.
METHOD_CARDS: dict[str, MethodCard] = {
    "sdpg_urkl": MethodCard("SDPG-URKL", SDPG_PAPER, ["trl", "sdpg", "sdpg_urkl"]),
    "sdpg_ufkl": MethodCard("SDPG-UFKL", SDPG_PAPER, ["trl", "sdpg", "sdpg_ufkl"]),
    "sdpg_no_distill": MethodCard(
        "SDPG without self-distillation (the beta = 0 ablation)", SDPG_PAPER, ["trl", "sdpg", "sdpg_no_distill"]
    ),
    "sdpg_no_anchor": MethodCard(
        "SDPG without the reference anchor (the alpha = 0 ablation)", SDPG_PAPER, ["trl", "sdpg", "sdpg_no_anchor"]
    ),
    "grpo": MethodCard("GRPO", GRPOTrainer._paper, list(GRPOTrainer._tag_names)),
    "rlsd": MethodCard("RLSD", RLSD_PAPER, ["trl", "rlsd"]),
    "opcd": MethodCard("OPCD (on-policy self-distillation)", OPCD_PAPER, ["trl", "opcd"]),
}


def method_card(method: str) -> MethodCard:
    """The card entries of `method`; an error naming the known methods for any other."""
    try:
        return METHOD_CARDS[method]
    except KeyError:
        raise ValueError(f"No model card for SDPGConfig.method={method!r}; known: {sorted(METHOD_CARDS)}.") from None
