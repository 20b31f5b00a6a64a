"""``quant_llava``: LLaVA (``LlavaForConditionalGeneration``, llava-hf checkpoints) as an lmms-eval chat model.

LLaVA prompts through its processor's chat template (llava-1.5-hf renders
"USER: <image>\\n{prompt} ASSISTANT:", exactly the prompt LLaVA-1.5 was evaluated with on VQAv2/GQA),
so it is ``quant_hf`` with the family's model class: the same prompts, batching and answers.
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

from .hf import QuantHF


class QuantLlava(QuantHF):
    model_class = LlavaForConditionalGeneration
