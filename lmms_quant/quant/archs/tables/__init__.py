"""Every architecture table and the registry that says which table fits which model.

A registry entry names a model class (matched against the model's exact class first, then its
MRO) and, where the class alone does not fix the layout, the sub-config model types it accepts
(``text_config.model_type``, ``vision_config.model_type``); the language model's type may also pick
the family (Gemma's (1 + w) norms, T5's encoder-decoder). Adding a model is adding a table and an
entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import Family
from .blip2 import BLIP2_ITM, BLIP2_OPT, BLIP2_T5, INSTRUCTBLIP, INSTRUCTBLIP_T5
from .blocks import GEMMA_TEXT, LLAMA_LIKE
from .gemma import gemma3, paligemma
from .idefics3 import IDEFICS3, SMOLVLM
from .internvl import INTERNVL
from .llava import LLAVA, LLAVA_NEXT, LLAVA_ONEVISION
from .qwen_vl import QWEN2_5_VL, QWEN2_VL, QWEN3_VL

GEMMA3 = gemma3(GEMMA_TEXT["gemma3_text"])
PALIGEMMA = paligemma("paligemma", GEMMA_TEXT["gemma"])
PALIGEMMA2 = paligemma("paligemma2", GEMMA_TEXT["gemma2"])

_VISION_LLAVA = ("clip_vision_model", "siglip_vision_model")


@dataclass(frozen=True)
class Entry:
    model_class: str
    family: Family
    text_types: tuple[str, ...] | None = None  # None: any
    vision_types: tuple[str, ...] | None = None

    def accepts(self, text_type: str | None, vision_type: str | None) -> bool:
        return ((self.text_types is None or text_type in self.text_types)
                and (self.vision_types is None or vision_type in self.vision_types))


REGISTRY: tuple[Entry, ...] = (
    Entry("Blip2ForConditionalGeneration", BLIP2_OPT, text_types=("opt",)),
    Entry("Blip2ForConditionalGeneration", BLIP2_T5, text_types=("t5",)),
    Entry("Blip2ForImageTextRetrieval", BLIP2_ITM),
    Entry("InstructBlipForConditionalGeneration", INSTRUCTBLIP, text_types=LLAMA_LIKE),
    Entry("InstructBlipForConditionalGeneration", INSTRUCTBLIP_T5, text_types=("t5",)),
    Entry("LlavaForConditionalGeneration", LLAVA, text_types=LLAMA_LIKE, vision_types=_VISION_LLAVA),
    Entry("LlavaNextForConditionalGeneration", LLAVA_NEXT, text_types=LLAMA_LIKE, vision_types=_VISION_LLAVA),
    Entry("LlavaOnevisionForConditionalGeneration", LLAVA_ONEVISION, text_types=LLAMA_LIKE,
          vision_types=_VISION_LLAVA),
    Entry("Qwen2VLForConditionalGeneration", QWEN2_VL),
    Entry("Qwen2_5_VLForConditionalGeneration", QWEN2_5_VL),
    Entry("Qwen3VLForConditionalGeneration", QWEN3_VL),
    Entry("Gemma3ForConditionalGeneration", GEMMA3, text_types=("gemma3_text",), vision_types=("siglip_vision_model",)),
    Entry("PaliGemmaForConditionalGeneration", PALIGEMMA, text_types=("gemma",), vision_types=("siglip_vision_model",)),
    Entry("PaliGemmaForConditionalGeneration", PALIGEMMA2, text_types=("gemma2",),
          vision_types=("siglip_vision_model",)),
    Entry("Idefics3ForConditionalGeneration", IDEFICS3, text_types=LLAMA_LIKE),
    Entry("SmolVLMForConditionalGeneration", SMOLVLM, text_types=LLAMA_LIKE),
    Entry("InternVLForConditionalGeneration", INTERNVL, text_types=LLAMA_LIKE),
)

FAMILIES = {e.family.name: e.family for e in REGISTRY}

__all__ = ["BLIP2_ITM", "BLIP2_OPT", "BLIP2_T5", "Entry", "FAMILIES", "GEMMA3", "IDEFICS3", "INSTRUCTBLIP",
           "INSTRUCTBLIP_T5", "INTERNVL", "LLAVA", "LLAVA_NEXT", "LLAVA_ONEVISION", "PALIGEMMA", "PALIGEMMA2",
           "QWEN2_5_VL", "QWEN2_VL", "QWEN3_VL", "REGISTRY", "SMOLVLM"]
