"""``quant_hf``: any Hugging Face VLM with a chat template, as an lmms-eval chat model.

What it serves: a checkpoint that ``AutoModelForImageTextToText`` (or a family class set by a
subclass, e.g. ``quant_llava``) loads together with ``AutoProcessor``, whose processor carries a chat
template (Qwen2-VL / Qwen2.5-VL, Idefics3, Gemma 3, LLaVA, LLaVA-NeXT, OneVision, InternVL, ...).

The prompt is the processor's own chat template applied to the task's chat messages
(lmms-eval's ``ChatMessages.to_hf_messages()``), with the generation prompt added. Image entries are
passed to the template as bare ``{"type": "image"}`` items: every template renders its image
placeholder from the type alone, some only that way, and the images themselves go to the processor,
nested per sample (Gemma 3's and Idefics3's processors pair images with prompts only that way;
the others flatten the nesting). Left padding, so every row of a batch continues at the same position.

Families whose evaluation prompt is not their chat template keep their own wrapper (BLIP-2's
``Question: … Answer:``); a family that prompts through its chat template is a thin subclass.
"""

from __future__ import annotations

from transformers import AutoModelForImageTextToText

from .common import ChatRequest, QuantVLM


def template_messages(request: ChatRequest) -> list[dict]:
    """The request's chat messages for ``apply_chat_template``: images as bare ``{"type": "image"}`` items."""
    messages = request.messages.to_hf_messages()
    for message in messages:
        message["content"] = [{"type": "image"} if item["type"] == "image" else item for item in message["content"]]
    return messages


class QuantHF(QuantVLM):
    model_class = AutoModelForImageTextToText

    def __init__(self, **model_args) -> None:
        super().__init__(**model_args)
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"pretrained: {self.args.pretrained!r} has no chat template in its processor; valid: a "
                             f"checkpoint whose processor has one (chat_template.jinja or processor_config.json), or "
                             f"a family wrapper with its own prompt format (quant_blip2)")
        self.tokenizer.padding_side = "left"
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))

    def prompt(self, request: ChatRequest) -> str:
        return self.processor.apply_chat_template(template_messages(request), add_generation_prompt=True,
                                                  tokenize=False)

    def prompt_and_images(self, request: ChatRequest) -> tuple[str, list]:
        """One request's prompt and RGB images (both generation paths build their inputs from these)."""
        return self.prompt(request), [image.convert("RGB") for image in request.images]

    def processor_inputs(self, prompts: list[str], images: list[list]):
        """The processor's batch for prompts and their images (one list per prompt), padded, as tensors."""
        media = {"images": images} if any(images) else {}
        # A template that writes the BOS token itself must not get a second one from the tokenizer.
        bos = self.tokenizer.bos_token
        if bos and all(p.startswith(bos) for p in prompts):
            media["add_special_tokens"] = False
        return self.processor(text=prompts, padding=True, return_tensors="pt", **media)

    def generate_batch(self, requests: list[ChatRequest], gen_kwargs: dict):
        prompts, images = zip(*(self.prompt_and_images(r) for r in requests))
        inputs = self.processor_inputs(list(prompts), list(images))
        inputs = inputs.to(self.device).to(self.model.dtype)
        output_ids = self.model.generate(**inputs, **gen_kwargs)
        return self.decode_new_tokens(inputs, output_ids, encoder_decoder=self.encoder_decoder)
