"""The pieces of a vision-language model that the fast generation path drives directly.

The stock path calls ``model.generate(pixel_values, input_ids, attention_mask)``, which runs the vision
tower and connector, writes their output over the image placeholder tokens' embeddings and decodes
with the language model. The fast path does the same three steps itself (so that it can run the
vision part once per image and share a prompt prefix between questions), and needs per family:

- ``image_features(pixel_values)``: the connector's output, one row of ``n_tokens`` embeddings per
  image — what stock generation scatters over the image tokens;
- ``lm``: the module whose forward takes ``inputs_embeds``/``input_ids``, a 4-D attention mask,
  ``position_ids`` and a KV cache and returns logits;
- ``generation_config``: the config stock ``generate`` merges the task's settings into;
- ``lm_prefixes``: state-dict prefixes of the language model (everything else is what the image
  features depend on, hashed for the feature cache's key).

Only families whose language model is decoder-only and uses plain 1-D positions are supported:
BLIP-2 with OPT (not Flan-T5: an encoder-decoder decodes against cross-attention) and LLaVA (not
Qwen2-VL-style multi-axis positions). Every other model keeps the stock path (`parts_for` returns
None and says why).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class VLMParts:
    family: str
    model: torch.nn.Module
    lm: torch.nn.Module
    image_token_id: int
    generation_config: object
    lm_prefixes: tuple[str, ...]
    _features: Callable[[torch.Tensor], object]

    @property
    def lm_config(self):
        return self.lm.config

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    @torch.no_grad()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, n_tokens, hidden): the connector output for each image, in the LM's dtype."""
        out = self._features(pixel_values)
        # transformers returns a tensor, a list of per-image tensors or an output object whose
        # pooler_output holds one of those, depending on the family and version.
        out = getattr(out, "pooler_output", out)
        if isinstance(out, (list, tuple)):
            out = torch.stack(list(out))
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            raise TypeError(f"{self.family}: image features of unexpected form {type(out).__name__}")
        return out.to(self.embed_dtype)

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def cache_kwarg(self) -> str:
        """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)."""
        params = inspect.signature(self.lm.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.lm.forward).parameters


def _blip2(model) -> VLMParts | str:
    if not model.config.use_decoder_only_language_model:
        return "BLIP-2 with an encoder-decoder language model (Flan-T5)"
    lm = model.language_model
    return VLMParts(
        family="blip2", model=model, lm=lm,
        image_token_id=model.config.image_token_id,
        # Blip2ForConditionalGeneration.generate hands over to language_model.generate.
        generation_config=lm.generation_config,
        lm_prefixes=("language_model.",),
        _features=lambda pixel_values: model.get_image_features(pixel_values=pixel_values, return_dict=True),
    )


def _llava(model) -> VLMParts | str:
    config = model.config

    def features(pixel_values):
        return model.get_image_features(pixel_values=pixel_values,
                                        vision_feature_layer=config.vision_feature_layer,
                                        vision_feature_select_strategy=config.vision_feature_select_strategy,
                                        return_dict=True)

    # LlavaForConditionalGeneration's own forward runs only the language model when it gets no
    # pixel_values, and applies lm_head.
    return VLMParts(family="llava", model=model, lm=model, image_token_id=config.image_token_id,
                    generation_config=model.generation_config,
                    lm_prefixes=("model.language_model.", "lm_head.", "language_model."), _features=features)


FAMILIES = {"blip-2": _blip2, "llava": _llava}


def parts_for(model) -> tuple[VLMParts | None, str]:
    """(parts, "") for a supported model, else (None, why the stock path is kept)."""
    model_type = getattr(model.config, "model_type", None)
    build = FAMILIES.get(model_type)
    if build is None:
        return None, f"model_type {model_type!r} (fast generation covers {', '.join(sorted(FAMILIES))})"
    built = build(model)
    return (None, built) if isinstance(built, str) else (built, "")


__all__ = ["FAMILIES", "VLMParts", "parts_for"]
