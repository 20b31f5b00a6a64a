"""Idefics3 and SmolVLM: SigLIP-style vision encoder, pixel-shuffle connector, Llama LM.

The connector is ``model.connector.modality_projection.proj``, one Linear on pixel-shuffled
features (scale_factor^2 neighbouring patches concatenated). The vision encoder's post_layernorm
acts per patch before that concatenation, so no per-channel scale folds into it exactly (the same
reason as Qwen's merger); the connector is rounded without an AWQ scale.
"""

from __future__ import annotations

from ..spec import Family, Part
from .blocks import CLIP_BLOCK, LLAMA_BLOCK


def _idefics3(name: str) -> Family:
    return Family(
        name=name,
        roots={"vit": ("model.vision_model",), "connector": ("model.connector",),
               "llm": ("model.text_model", "lm_head")},
        parts=(
            Part("vit", stack="model.vision_model.encoder.layers", block=CLIP_BLOCK, config="vision_config"),
            Part("connector", linears={"model.connector.modality_projection.proj": "proj.fc"}),
            Part("llm", stack="model.text_model.layers", block=LLAMA_BLOCK, token_mask="attention_mask",
                 config="text_config"),
            Part("llm", linears={"lm_head": "head.lm"}, token_mask="attention_mask", include="lm_head"),
        ),
        prompt_style="chat",
    )


IDEFICS3 = _idefics3("idefics3")
SMOLVLM = _idefics3("smolvlm")

__all__ = ["IDEFICS3", "SMOLVLM"]
