"""``quant_blip2``: BLIP-2 (``Blip2ForConditionalGeneration``, OPT or Flan-T5 LM) as an lmms-eval chat model.

Prompts are the ones BLIP-2 was evaluated with, not the tasks' chat instructions:

- VQA (the doc's ``question`` appears in the task prompt, as in VQAv2 and GQA): the BLIP-2 paper's
  zero-shot VQA prompt, rebuilt from ``doc["question"]`` so the task's "Answer the question using a
  single word or phrase." instruction is dropped: ``"Question: {} Answer:"`` for OPT and
  ``"Question: {} Short answer:"`` for Flan-T5 (paper §4.1; LAVIS' eval configs).
- Captioning (the task prompt asks for a caption, as COCO's and Flickr30k's fixed
  "Provide a one-sentence caption ..." does; COCO docs carry a ``question`` field too, but it is not
  in the prompt): no text prompt. That is how the pretrained (not COCO-finetuned) checkpoints caption
  and what the seed paper scored; "a photo of" belongs to LAVIS' COCO-finetuned caption models and
  can be had with ``caption_prompt="a photo of"``.
- Anything else: the task's prompt text as it is.

Decoder-only LMs pad on the left (generation continues every row at the same position); the T5
encoder pads on the right, because its relative position buckets would see left padding between the
query tokens and the prompt.
"""

from __future__ import annotations

from transformers import Blip2ForConditionalGeneration

from lmms_quant.values import is_unset, unquote

from .common import ChatRequest, QuantVLM

# Keyed by the language model's layout (decoder-only: OPT; encoder-decoder: Flan-T5).
VQA_PROMPTS = {"decoder_only": "Question: {} Answer:", "encoder_decoder": "Question: {} Short answer:"}
CAPTION_PROMPT = ""


def is_vqa(request: ChatRequest) -> bool:
    question = request.doc.get("question") if isinstance(request.doc, dict) else None
    return isinstance(question, str) and bool(question.strip()) and question.strip() in request.text


def is_captioning(request: ChatRequest) -> bool:
    return "caption" in request.text.lower()


def blip2_prompt(request: ChatRequest, vqa_prompt: str, caption_prompt: str) -> str:
    if is_vqa(request):
        return vqa_prompt.format(request.doc["question"].strip())
    if is_captioning(request):
        return caption_prompt
    return request.text


class QuantBlip2(QuantVLM):
    model_class = Blip2ForConditionalGeneration
    model_keys = ("vqa_prompt", "caption_prompt")

    @classmethod
    def parse_model_keys(cls, own: dict) -> dict:
        vqa_prompt = None if is_unset(own.get("vqa_prompt")) else unquote(str(own["vqa_prompt"]))
        if vqa_prompt is not None:
            if vqa_prompt.count("{}") != 1:
                raise ValueError(f"vqa_prompt: got {vqa_prompt!r}; valid: a template with exactly one '{{}}' "
                                 f"for the question, e.g. 'Question: {{}} Answer:'")
        caption_prompt = own.get("caption_prompt")
        return {"vqa_prompt": vqa_prompt,
                "caption_prompt": None if caption_prompt is None else unquote(str(caption_prompt))}

    def __init__(self, **model_args) -> None:
        super().__init__(**model_args)
        # A processor that does not insert the query-token placeholders makes generate() drop the
        # image without a word (older hub processor configs lack num_query_tokens).
        expected = self.model.config.num_query_tokens
        if getattr(self.processor, "num_query_tokens", None) != expected:
            raise ValueError(f"pretrained: {self.args.pretrained!r} has a processor with num_query_tokens="
                             f"{getattr(self.processor, 'num_query_tokens', None)!r}; valid: the model's "
                             f"num_query_tokens={expected} (update processor_config.json)")
        self.encoder_decoder = not self.model.config.use_decoder_only_language_model
        layout = "encoder_decoder" if self.encoder_decoder else "decoder_only"
        self.vqa_prompt = self.options["vqa_prompt"] or VQA_PROMPTS[layout]
        caption_prompt = self.options["caption_prompt"]
        self.caption_prompt = CAPTION_PROMPT if caption_prompt is None else caption_prompt
        self.tokenizer.padding_side = "right" if self.encoder_decoder else "left"

    def prompt_and_images(self, request: ChatRequest) -> tuple[str, list]:
        """The text and RGB images the processor gets for one request (both generation paths use it)."""
        return blip2_prompt(request, self.vqa_prompt, self.caption_prompt), [i.convert("RGB") for i in request.images]

    def processor_inputs(self, prompts: list[str], images: list[list]):
        """The processor's batch for prompts and their images (one list per prompt), padded, as tensors."""
        return self.processor(images=[found[0] for found in images], text=prompts, padding=True, return_tensors="pt")

    def generate_batch(self, requests: list[ChatRequest], gen_kwargs: dict):
        images, prompts = [], []
        for request in requests:
            prompt, found = self.prompt_and_images(request)
            if len(found) != 1:
                raise ValueError(f"{request.where}: BLIP-2 takes exactly one image per request, got {len(found)}")
            images.append(found)
            prompts.append(prompt)
        inputs = self.processor_inputs(prompts, images)
        inputs = inputs.to(self.device).to(self.model.dtype)
        output_ids = self.model.generate(**inputs, **gen_kwargs)
        return self.decode_new_tokens(inputs, output_ids, encoder_decoder=self.encoder_decoder)
