"""``quant_blip2_itm``: BLIP-2 image-text retrieval (``Blip2ForImageTextRetrieval``) as an lmms-eval model.

It serves the retrieval tasks (``tasks/*_retrieval*.yaml``; design in docs/retrieval.md): all
requests of one task and split are one corpus, which is ranked once, as BLIP-2 was evaluated
(LAVIS protocol):

1. ITC: every image's Q-Former query embeddings (``vision_projection``) and every caption's [CLS]
   embedding (``text_projection``), L2-normalised; similarity = the best query's cosine.
2. The ``itm_top_k`` (default 128) best candidates per query, in both directions, computed block by
   block (``lmms_quant.retrieval.itc_candidates``), never as a whole image x text matrix.
3. ITM re-ranking: each distinct candidate pair gets score = ITM "match" logit (averaged over the
   queries) + its ITC similarity. ViT outputs are not kept for the whole corpus (COCO 5K at 364 px
   would be ~10 GB); images are encoded again, a batch at a time, for the pairs that need them.
4. Ranks of the ground truths (tie rule in ``lmms_quant.retrieval``), returned per doc as a JSON
   rank record that the task's metric functions aggregate into R@1/5/10.

Quantization goes through the shared seam (``QuantVLM.ensure_quantized``) before the first image is
encoded; the model has a ViT and a Q-Former but no language model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from loguru import logger as eval_logger
from transformers import Blip2ForImageTextRetrieval

from lmms_quant import retrieval

from lmms_quant.values import is_unset, unquote

from .common import ChatRequest, QuantVLM

DEFAULT_ITM_TOP_K = 128  # BLIP-2's k_test for Flickr30k and COCO
DEFAULT_MAX_TEXT_TOKENS = 35  # LAVIS' retrieval max_length for captions
DEFAULT_TEXT_BATCH_SIZE = 256
DEFAULT_ITM_BATCH_SIZE = 128
RERANK_CHOICES = ("itm", "none")
CAPTION_PREPROCESS_CHOICES = ("blip", "none")
# BLIP's caption cleaning (LAVIS' eval text processor): these characters become spaces.
_BLIP_CAPTION_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")


def blip_caption(text: str) -> str:
    """A caption as BLIP's evaluation reads it: lower case, no .!"()*#:;~, single spaces."""
    return " ".join(_BLIP_CAPTION_PUNCTUATION.sub(" ", text.lower()).split())


def _int_arg(key: str, value, minimum: int) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < minimum:
        raise ValueError(f"{key}: got {value!r}; valid: an int >= {minimum}")
    return int(text)


def _choice_arg(key: str, value, choices: Sequence[str]) -> str:
    text = unquote(str(value).strip()).lower()
    if text not in choices:
        raise ValueError(f"{key}: got {value!r}; valid: {list(choices)}")
    return text


# ------------------------------------------------------------------ the model's three scoring passes


@torch.no_grad()
def vit_embeddings(model: Blip2ForImageTextRetrieval, pixel_values: torch.Tensor) -> torch.Tensor:
    """(images, patches, vision hidden) ViT outputs."""
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def _all_ones_mask(embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)


@torch.no_grad()
def itc_image_features(model: Blip2ForImageTextRetrieval, vit: torch.Tensor) -> torch.Tensor:
    """(images, queries, dim) normalised query embeddings: Q-Former queries on the image, vision_projection."""
    queries = model.query_tokens.expand(vit.shape[0], -1, -1)
    out = model.qformer(
        query_embeds=queries, encoder_hidden_states=vit, encoder_attention_mask=_all_ones_mask(vit)
    ).last_hidden_state
    return F.normalize(model.vision_projection(out.to(model.vision_projection.weight.dtype)), dim=-1)


@torch.no_grad()
def itc_text_features(
    model: Blip2ForImageTextRetrieval, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(texts, dim) normalised [CLS] embeddings: Q-Former text-only pass, text_projection."""
    out = model.qformer(
        query_embeds=model.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
    ).last_hidden_state
    return F.normalize(model.text_projection(out[:, 0, :].to(model.text_projection.weight.dtype)), dim=-1)


@torch.no_grad()
def itm_match_logits(
    model: Blip2ForImageTextRetrieval, vit: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(pairs,) ITM "match" logit per (image, text) pair, averaged over the query positions."""
    queries = model.query_tokens.expand(vit.shape[0], -1, -1)
    n_queries = queries.shape[1]
    mask = torch.cat([_all_ones_mask(queries), attention_mask], dim=1)
    out = model.qformer(
        query_embeds=model.embeddings(input_ids=input_ids, query_embeds=queries),
        query_length=n_queries,
        attention_mask=mask,
        encoder_hidden_states=vit,
        encoder_attention_mask=_all_ones_mask(vit),
    ).last_hidden_state
    logits = model.itm_head(out[:, :n_queries, :].to(model.itm_head.weight.dtype))
    return logits.mean(dim=1)[:, 1].float()


# ------------------------------------------------------------------ the lmms-eval model


class QuantBlip2ITM(QuantVLM):
    """lmms-eval model ``quant_blip2_itm``: ranks retrieval corpora (see the module docstring)."""

    model_class = Blip2ForImageTextRetrieval
    model_keys = (
        "itm_top_k", "rerank", "max_text_tokens", "caption_preprocess", "text_batch_size", "itm_batch_size",
    )

    @classmethod
    def parse_model_keys(cls, own: dict) -> dict:
        def given(key, default):
            value = own.get(key)
            return default if is_unset(value) else value

        return {
            "itm_top_k": _int_arg("itm_top_k", given("itm_top_k", DEFAULT_ITM_TOP_K), max(retrieval.RECALL_KS)),
            "rerank": _choice_arg("rerank", given("rerank", "itm"), RERANK_CHOICES),
            "max_text_tokens": _int_arg("max_text_tokens", given("max_text_tokens", DEFAULT_MAX_TEXT_TOKENS), 2),
            "caption_preprocess": _choice_arg(
                "caption_preprocess", given("caption_preprocess", "blip"), CAPTION_PREPROCESS_CHOICES
            ),
            "text_batch_size": _int_arg("text_batch_size", given("text_batch_size", DEFAULT_TEXT_BATCH_SIZE), 1),
            "itm_batch_size": _int_arg("itm_batch_size", given("itm_batch_size", DEFAULT_ITM_BATCH_SIZE), 1),
        }

    def __init__(self, **model_args) -> None:
        super().__init__(**model_args)
        for key, value in self.options.items():
            setattr(self, key, value)

    @classmethod
    def check_recipe(cls, recipe, kwargs: dict) -> None:
        """Refuse recipe keys for parts this model does not have (no LLM, no lm_head)."""
        inapplicable = []
        if "llm" in recipe.selection.components:
            inapplicable.append(f"component={kwargs.get('component')!r}")
        # llm_bits alone asks for a language model this model lacks. Spelt out beside vit_bits and
        # connector_bits for component=all (as canonical model_args always are) it has nothing to reach
        # and is ignored, as `all` skips the components a model does not have.
        full_spelling = not recipe.selection.components and all(not is_unset(kwargs.get(k)) for k in ("vit_bits", "connector_bits"))
        if not is_unset(kwargs.get("llm_bits")) and not full_spelling:
            inapplicable.append(f"llm_bits={kwargs['llm_bits']!r}")
        if recipe.selection.include:
            inapplicable.append(f"include={kwargs.get('include')!r}")
        if inapplicable:
            from lmms_quant.quant.recipe import RecipeError

            raise RecipeError(
                f"{', '.join(inapplicable)}: {cls.model_class.__name__} has no language model (and no lm_head); "
                "valid: component vit, connector (alias qformer: the Q-Former, its query tokens and text "
                "embeddings) or all, with vit_bits / connector_bits"
            )

    # ------------------------------------------------------------------ lmms-eval entry point

    def generate_until(self, requests) -> list[str]:
        corpora: dict[tuple[str, str], list[int]] = {}
        for index, request in enumerate(requests):
            _, _, gen_kwargs, _, task, split = request.args
            marker = (gen_kwargs or {}).get(retrieval.RETRIEVAL_KEY)
            if marker != retrieval.PROTOCOL:
                raise ValueError(
                    f"{type(self).__name__} ranks image-text retrieval corpora only: task {task!r} has "
                    f"generation_kwargs.{retrieval.RETRIEVAL_KEY}={marker!r}; valid: {retrieval.PROTOCOL!r} "
                    f"(a retrieval task, e.g. flickr30k_retrieval); use quant_blip2 for generation tasks"
                )
            corpora.setdefault((task, split), []).append(index)
        if self.world_size > 1:
            raise RuntimeError(
                f"{type(self).__name__}: retrieval ranks each corpus as a whole in one process; got "
                f"{self.world_size} processes, each holding part of the corpus. Run a single process."
            )
        self.ensure_quantized(requests)
        responses: list[str | None] = [None] * len(requests)
        for (task, split), indices in corpora.items():
            first_request_of_doc: dict[int, tuple] = {}
            for index in indices:
                first_request_of_doc.setdefault(requests[index].args[3], requests[index].args)
            doc_ids = sorted(first_request_of_doc)
            eval_logger.info(f"{type(self).__name__}: ranking {task}/{split}: {len(doc_ids)} images")
            records = self.rank_corpus([first_request_of_doc[d] for d in doc_ids])
            by_doc = {doc_id: json.dumps(record) for doc_id, record in zip(doc_ids, records)}
            for index in indices:
                responses[index] = by_doc[requests[index].args[3]]
        return responses

    # ------------------------------------------------------------------ corpus ranking

    def _doc(self, args: tuple) -> tuple:
        """(image, captions) of one corpus doc, from the task's chat messages."""
        request: ChatRequest = self.chat_request(args)
        images = request.images
        captions = [c.text for m in request.messages.messages for c in m.content if c.type == "text"]
        if len(images) != 1 or not captions:
            raise ValueError(
                f"{request.where}: a retrieval doc is one image with its captions; got {len(images)} images "
                f"and {len(captions)} texts"
            )
        return images[0], captions

    def _pixel_values(self, images: list) -> torch.Tensor:
        pixels = self.processor.image_processor(images=images, return_tensors="pt").pixel_values
        return pixels.to(self.device, self.model.vision_model.embeddings.patch_embedding.weight.dtype)

    def _image_batches(self, corpus_args: Sequence[tuple], image_indices: Sequence[int]):
        """(indices, ViT outputs) for batches of ``batch_size`` images, docs fetched (decoded) as needed."""
        for start in range(0, len(image_indices), self.batch_size):
            chunk = list(image_indices[start : start + self.batch_size])
            images = [self._doc(corpus_args[i])[0] for i in chunk]
            yield chunk, vit_embeddings(self.model, self._pixel_values(images))

    def _tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # Right padding: text_projection reads [CLS] at position 0. All captions are padded together,
        # so text and ITM batches differ only in how many rows they hold, never in width.
        if self.caption_preprocess == "blip":
            captions = [blip_caption(c) for c in captions]
        tokens = self.tokenizer(
            captions, padding="longest", padding_side="right", truncation=True, max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def rank_corpus(self, corpus_args: Sequence[tuple]) -> list[dict]:
        """One rank record per doc of the corpus (the docs the given request args point to), in order."""
        image_feats, captions_per_image, captions = [], [], []
        for start in range(0, len(corpus_args), self.batch_size):
            docs = [self._doc(args) for args in corpus_args[start : start + self.batch_size]]
            vit = vit_embeddings(self.model, self._pixel_values([image for image, _ in docs]))
            image_feats.append(itc_image_features(self.model, vit).float())
            for _, doc_captions in docs:
                captions_per_image.append(len(doc_captions))
                captions.extend(doc_captions)
        input_ids, attention_mask = self._tokenize(captions)
        text_feats = []
        for start in range(0, len(captions), self.text_batch_size):
            rows = slice(start, start + self.text_batch_size)
            text_feats.append(itc_text_features(self.model, input_ids[rows], attention_mask[rows]).float())
        scorer = self._itm_scorer(corpus_args, input_ids, attention_mask) if self.rerank == "itm" else None
        ranks = retrieval.rank_corpus(
            torch.cat(image_feats), torch.cat(text_feats), captions_per_image, self.itm_top_k, pair_scorer=scorer
        )
        metrics = ranks.metrics()
        eval_logger.info(f"{type(self).__name__}: " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        return ranks.records()

    def _itm_scorer(
        self, corpus_args: Sequence[tuple], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def score_pairs(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
            # Pairs arrive sorted by image: encode each image once, then its pairs in ITM batches.
            images, texts = images.to(self.device), texts.to(self.device)
            scores = torch.empty(len(images), dtype=torch.float32, device=self.device)
            distinct_images = torch.unique_consecutive(images).tolist()
            eval_logger.info(f"{type(self).__name__}: ITM on {len(images)} pairs of {len(distinct_images)} images")
            for chunk, vit in self._image_batches(corpus_args, distinct_images):
                bounds = torch.tensor([chunk[0], chunk[-1]], device=images.device)
                lo = int(torch.searchsorted(images, bounds[:1]))
                hi = int(torch.searchsorted(images, bounds[1:], right=True))
                row_of_image = {image: row for row, image in enumerate(chunk)}
                for s in range(lo, hi, self.itm_batch_size):
                    e = min(hi, s + self.itm_batch_size)
                    rows = torch.tensor([row_of_image[i] for i in images[s:e].tolist()], device=self.device)
                    scores[s:e] = itm_match_logits(
                        self.model, vit[rows], input_ids[texts[s:e]], attention_mask[texts[s:e]]
                    )
            return scores

        return score_pairs
