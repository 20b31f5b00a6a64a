"""``quant_llava``: LLaVA (``LlavaForConditionalGeneration``, llava-hf checkpoints) as an lmms-eval chat model.

The task's chat messages go through the processor's own chat template (llava-1.5-hf renders
"USER: <image>\\n{prompt} ASSISTANT:"), so the prompt is exactly the one LLaVA-1.5 was evaluated
with on VQAv2/GQA ("... Answer the question using a single word or phrase."). Left padding: every row
continues at the same position.
"""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

from .common import ChatRequest, QuantVLM


class QuantLlava(QuantVLM):
    model_class = LlavaForConditionalGeneration

    def __init__(self, **model_args) -> None:
        super().__init__(**model_args)
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"pretrained: {self.args.pretrained!r} has no chat template in its processor; "
                             f"valid: a llava-hf checkpoint (chat_template.jinja or processor chat_template)")
        self.tokenizer.padding_side = "left"

    def prompt_and_images(self, request: ChatRequest) -> tuple[str, list]:
        """The text and RGB images the processor gets for one request (both generation paths use it)."""
        prompt = self.processor.apply_chat_template(request.messages.to_hf_messages(), add_generation_prompt=True,
                                                    tokenize=False)
        return prompt, [image.convert("RGB") for image in request.images]

    def generate_batch(self, requests: list[ChatRequest], gen_kwargs: dict):
        prepared = [self.prompt_and_images(r) for r in requests]
        prompts = [prompt for prompt, _ in prepared]
        images = [image for _, found in prepared for image in found]
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device).to(self.model.dtype)
        output_ids = self.model.generate(**inputs, **gen_kwargs)
        return self.decode_new_tokens(inputs, output_ids, encoder_decoder=False)
