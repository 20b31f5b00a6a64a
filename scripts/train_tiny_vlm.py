"""Train the tiny vision-language models shipped in ``lmms_quant/assets`` on the synthetic shapes world.

Three checkpoints, each a ``from_pretrained`` directory (safetensors, config, processor, tokenizer):

- ``tiny_blip2``: ``Blip2ForConditionalGeneration`` (ViT, Q-Former, OPT). Captions from image tokens
  alone; VQA from ``"Question: {q} Answer:"`` -- the prompts of the ``quant_blip2`` wrapper.
- ``tiny_blip2_itm``: ``Blip2ForImageTextRetrieval``, started from ``tiny_blip2``'s vision encoder,
  Q-Former and queries, trained with the contrastive (ITC) and matching (ITM) losses.
- ``tiny_llava``: ``LlavaForConditionalGeneration`` (CLIP ViT, MLP projector, Llama), prompted with
  the task's own text through its chat template -- the prompts of the ``quant_llava`` wrapper.

Recipe (docs: shared notes, offline-fixtures §3.1). A ViT trained end to end from scratch on this
world learns colour and count but never shape or position, so each generative model trains in two
stages, as BLIP-2 keeps its image encoder frozen:

1. the vision encoder alone, with throw-away linear heads: per patch, the colour and shape under it
   and the patch's own grid index (which keeps "where" in every token); per image, from the class
   token, the number of shapes and, for every colour, its shape and position;
2. the vision encoder frozen; the connector and language model learn captions and answers.

Data are generated fresh from the ``train:{seed}`` seed stream of ``shapes.make_scene``; held-out
figures use the ``heldout:{seed}`` stream. lmms-eval data (``fixtures.datasets``) and calibration
samples draw from their own streams, so none of them is trained on.

The captions of a two-shape scene name the objects in either order ("a red circle above a blue
square" / "a blue square below a red circle"); which one ``shapes.captions`` lists first depends on a
hidden draw, not on the image. Training targets therefore name the top or left object first, so
that the target is a function of the image; both orders stay references at evaluation.

Run on a GPU (minutes); ``--smoke`` runs every stage for a few steps on CPU to check the wiring:

    python scripts/train_tiny_vlm.py --out lmms_quant/assets --tokenizers-from lmms_quant/assets
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import random
import re
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    LlavaForConditionalGeneration,
)

from lmms_quant.atomic import atomic_directory, atomic_path, write_text_atomic
from lmms_quant.fixtures import shapes
from lmms_quant.fixtures import models as fixture_models
from lmms_quant.fixtures.tokenizers import fixture_corpus, train_bpe_tokenizer, train_wordpiece_tokenizer

MODEL_NAMES = ("blip2", "itm", "llava")
ASSET_DIRS = {"blip2": "tiny_blip2", "itm": "tiny_blip2_itm", "llava": "tiny_llava"}
COLOUR_NAMES = sorted(shapes.COLOURS)
# Per-colour position classes of the stage-1 scene head (0 = that colour is absent).
SCENE_POSITIONS = ("absent", "centre") + shapes.POSITIONS
# The lmms-eval task texts that quant_llava passes through its chat template unchanged.
LLAVA_CAPTION_TEXT = "Provide a one-sentence caption for the provided image."
LLAVA_VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass(frozen=True)
class Recipe:
    image_size: int = 64
    # Hidden 64 rather than 128: the same held-out scores, a quarter of the weights (a faster CPU demo),
    # and per-tensor round-to-nearest at 3 bits visibly hurts it (TRAINING.md), as it does not at 128.
    hidden: int = 64
    ffn: int = 256
    heads: int = 4
    vision_layers: int = 3
    qformer_layers: int = 2
    lm_layers: int = 3
    num_query_tokens: int = 8
    image_text_hidden: int = 64
    blip2_patch: int = 8
    llava_patch: int = 16
    llama_kv_heads: int = 2
    bpe_vocab: int = 400
    wordpiece_vocab: int = 200
    pool_scenes: int = 150_000
    vision_steps: int = 1500
    vision_batch: int = 256
    vision_lr: float = 1e-3
    lm_steps: int = 4000
    llava_lm_steps: int = 5000  # LLaVA learns colour and position questions later than BLIP-2
    lm_batch: int = 128
    lm_lr: float = 1e-3
    caption_fraction: float = 0.3
    # Bounds the answer-token logit margins; an over-confident model shrugs off any weight noise.
    label_smoothing: float = 0.0
    itm_steps: int = 5000
    itm_batch: int = 128
    itm_lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    eval_every: int = 500
    curve_images: int = 64
    heldout_images: int = 300
    retrieval_pool: int = 100
    # Wall-clock caps per stage, so that one remote command always finishes with its checkpoints.
    vision_time_limit_s: float = 90.0
    lm_time_limit_s: float = 260.0
    itm_time_limit_s: float = 260.0

    @classmethod
    def smoke(cls) -> "Recipe":
        return cls(pool_scenes=96, vision_steps=3, vision_batch=8, lm_steps=4, llava_lm_steps=4, lm_batch=8, itm_steps=3,
                   itm_batch=8, warmup=2, eval_every=2, curve_images=4, heldout_images=6, retrieval_pool=6)


# --------------------------------------------------------------------------------------- the world


def description(scene: shapes.Scene) -> tuple:
    """What the captions can tell apart: the objects and their layout, top/left object first."""
    objs = [(o.colour, o.shape) for o in scene.objects]
    if scene.relation is None:
        return (objs[0],)
    if scene.relation in ("below", "right of"):
        objs.reverse()
    axis = "vertical" if scene.relation in ("above", "below") else "horizontal"
    return (objs[0], axis, objs[1])


def caption_target(scene: shapes.Scene) -> str:
    """The reference that names the top/left object first (a function of the image, unlike refs[0])."""
    refs = shapes.captions(scene)
    if scene.relation in ("below", "right of"):
        return refs[1]
    return refs[0]


def _inside(shape: str, cx: float, cy: float, r: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    if shape == "triangle":  # apex up, base at cy + r: half-width grows from 0 to r
        return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - cy + r) / 2)
    raise ValueError(f"shape: got {shape!r}; valid: {list(shapes.SHAPES)}")


def patch_labels(scene: shapes.Scene, grid: int, samples: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Colour and shape class (0 = background) of the object covering most of each patch, row-major."""
    offsets = (np.arange(samples) + 0.5) / samples
    cells = np.arange(grid)
    xs = ((cells[None, :, None, None] + offsets[None, None, None, :]) / grid)  # (1, col, 1, sx)
    ys = ((cells[:, None, None, None] + offsets[None, None, :, None]) / grid)  # (row, 1, sy, 1)
    xs, ys = np.broadcast_arrays(xs, ys)  # (row, col, sy, sx)
    coverage = np.stack([_inside(o.shape, o.centre[0], o.centre[1], o.radius, xs, ys).mean(axis=(2, 3))
                         for o in scene.objects])  # (objects, row, col)
    best = coverage.argmax(axis=0)
    covered = coverage.max(axis=0) >= 0.25
    colour = np.zeros((grid, grid), np.int64)
    shape = np.zeros((grid, grid), np.int64)
    for i, o in enumerate(scene.objects):
        mask = covered & (best == i)
        colour[mask] = COLOUR_NAMES.index(o.colour) + 1
        shape[mask] = shapes.SHAPES.index(o.shape) + 1
    return colour.reshape(-1), shape.reshape(-1)


def scene_labels(scene: shapes.Scene) -> np.ndarray:
    """[count class, shape class of each colour (0 absent), position class of each colour]."""
    shape_of = np.zeros(len(COLOUR_NAMES), np.int64)
    position_of = np.zeros(len(COLOUR_NAMES), np.int64)
    for o in scene.objects:
        c = COLOUR_NAMES.index(o.colour)
        shape_of[c] = shapes.SHAPES.index(o.shape) + 1
        where = scene.position_of(o)
        position_of[c] = SCENE_POSITIONS.index("centre" if where is None else where)
    return np.concatenate([[len(scene.objects) - 1], shape_of, position_of])


@dataclass
class Pool:
    """Scenes with their rendered pixels, questions and stage-1 labels."""

    images: np.ndarray  # (N, H, W, 3) uint8
    scenes: list
    questions: list  # per scene: [(question, answer, type), ...]
    patch_colour: dict  # grid -> (N, grid*grid)
    patch_shape: dict
    scene_labels: np.ndarray  # (N, 11)


def _make_chunk(args) -> Pool:
    stream, chunk, n, size, grids = args
    rng = random.Random(f"{stream}:{chunk}")
    scenes = [shapes.make_scene(rng) for _ in range(n)]
    questions = [shapes.vqa_questions(s, rng) for s in scenes]
    images = np.stack([np.asarray(shapes.render(s, size)) for s in scenes])
    colour, shape = {}, {}
    for g in grids:
        labels = [patch_labels(s, g) for s in scenes]
        colour[g] = np.stack([c for c, _ in labels])
        shape[g] = np.stack([s for _, s in labels])
    return Pool(images, scenes, questions, colour, shape, np.stack([scene_labels(s) for s in scenes]))


def make_pool(stream: str, n: int, size: int, grids: tuple[int, ...], workers: int = 1) -> Pool:
    """n scenes of `stream`, in chunks of 1000 seeded "{stream}:{chunk}" (same result for any `workers`)."""
    chunk = 1000
    jobs = [(stream, i, min(chunk, n - i * chunk), size, grids) for i in range(math.ceil(n / chunk))]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_make_chunk, jobs)
    else:
        parts = [_make_chunk(j) for j in jobs]
    return Pool(
        images=np.concatenate([p.images for p in parts]),
        scenes=[s for p in parts for s in p.scenes],
        questions=[q for p in parts for q in p.questions],
        patch_colour={g: np.concatenate([p.patch_colour[g] for p in parts]) for g in grids},
        patch_shape={g: np.concatenate([p.patch_shape[g] for p in parts]) for g in grids},
        scene_labels=np.concatenate([p.scene_labels for p in parts]),
    )


def pixel_values(images_uint8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> normalised (B, 3, H, W) float, as the image processors do at native size."""
    mean = torch.tensor(fixture_models.CLIP_MEAN, device=images_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(fixture_models.CLIP_STD, device=images_uint8.device).view(1, 3, 1, 1)
    x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


# ---------------------------------------------------------------------------------------- logging


class Log:
    def __init__(self, path: Path, model: str):
        self.path, self.model, self.t0 = path, model, time.time()
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **record) -> None:
        record = {"model": self.model, "t": round(time.time() - self.t0, 2), **record}
        line = json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()})
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def lr_at(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def optimizer_for(params, lr: float, weight_decay: float, device: torch.device):
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")


def train_loop(name, steps, lr, time_limit_s, recipe, params, device, log, step_fn, eval_fn=None):
    """The shared loop: warm-up + cosine, grad-clip 1.0, a wall-clock cap, periodic held-out evaluation."""
    params = [p for p in params if p.requires_grad]
    opt = optimizer_for(params, lr, recipe.weight_decay, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, recipe.warmup))
    start, running = time.time(), defaultdict(float)
    for step in range(steps):
        losses = step_fn(step)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        for k, v in losses.items():
            running[k] += float(v.detach())
        done = step + 1
        if done % 50 == 0 or done == steps:
            n = 50 if done % 50 == 0 else done % 50
            log(stage=name, step=done, lr=sched.get_last_lr()[0],
                **{f"loss_{k}": v / n for k, v in running.items()}, s_per_step=(time.time() - start) / done)
            running.clear()
        if eval_fn is not None and (done % recipe.eval_every == 0 or done == steps):
            log(stage=name, step=done, eval=eval_fn())
        if time.time() - start > time_limit_s:
            log(stage=name, step=done, stopped=f"time limit {time_limit_s} s reached")
            if eval_fn is not None and done % recipe.eval_every:
                log(stage=name, step=done, eval=eval_fn())
            break


# ------------------------------------------------------------------------------ stage 1: vision


class VisionProbe(nn.Module):
    """Throw-away heads that make the frozen vision encoder keep what, where and how many."""

    def __init__(self, hidden: int, n_patches: int):
        super().__init__()
        self.patch_colour = nn.Linear(hidden, len(COLOUR_NAMES) + 1)
        self.patch_shape = nn.Linear(hidden, len(shapes.SHAPES) + 1)
        self.patch_index = nn.Linear(hidden, n_patches)
        self.count = nn.Linear(hidden, 2)
        self.colour_shape = nn.Linear(hidden, len(COLOUR_NAMES) * (len(shapes.SHAPES) + 1))
        self.colour_position = nn.Linear(hidden, len(COLOUR_NAMES) * len(SCENE_POSITIONS))

    def losses(self, states, colour, shape, scene):
        cls, patches = states[:, 0], states[:, 1:]
        b, p, _ = patches.shape
        index = torch.arange(p, device=states.device).expand(b, p)
        n_colours = len(COLOUR_NAMES)
        return {
            "patch_colour": F.cross_entropy(self.patch_colour(patches).flatten(0, 1), colour.flatten()),
            "patch_shape": F.cross_entropy(self.patch_shape(patches).flatten(0, 1), shape.flatten()),
            "patch_index": F.cross_entropy(self.patch_index(patches).flatten(0, 1), index.flatten()),
            "count": F.cross_entropy(self.count(cls), scene[:, 0]),
            "colour_shape": F.cross_entropy(
                self.colour_shape(cls).view(b * n_colours, -1), scene[:, 1:1 + n_colours].flatten()),
            "colour_position": F.cross_entropy(
                self.colour_position(cls).view(b * n_colours, -1), scene[:, 1 + n_colours:].flatten()),
        }


def train_vision(vision: nn.Module, grid: int, pool: Pool, images_dev: torch.Tensor, recipe: Recipe,
                 device, log, seed: int) -> None:
    probe = VisionProbe(recipe.hidden, grid * grid).to(device)
    colour = torch.from_numpy(pool.patch_colour[grid]).to(device)
    shape = torch.from_numpy(pool.patch_shape[grid]).to(device)
    scene = torch.from_numpy(pool.scene_labels).to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vision.train()

    def step(_):
        idx = torch.randint(0, len(pool.scenes), (recipe.vision_batch,), generator=gen).to(device)
        states = vision(pixel_values=pixel_values(images_dev[idx])).last_hidden_state
        return probe.losses(states, colour[idx], shape[idx], scene[idx])

    train_loop("vision", recipe.vision_steps, recipe.vision_lr, recipe.vision_time_limit_s, recipe,
               list(vision.parameters()) + list(probe.parameters()), device, log, step)
    vision.eval()
    for p in vision.parameters():
        p.requires_grad_(False)


# --------------------------------------------------------------------------- generative models


class GenerativeVLM:
    """What differs between BLIP-2 and LLaVA for stage 2 and evaluation: prompts and module names."""

    name: str
    model: nn.Module
    processor: object
    components: dict  # component -> Linear-name prefixes (for the RTN sensitivity table)

    def prompt(self, question: str | None) -> str:
        raise NotImplementedError

    def vision(self) -> nn.Module:
        raise NotImplementedError

    def __init__(self):
        self._prompt_ids: dict[str, list[int]] = {}
        self._answer_ids: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids exactly as the processor builds them at evaluation (image tokens included)."""
        if prompt not in self._prompt_ids:
            blank = shapes.render(shapes.make_scene(random.Random(0)), 64)
            ids = self.processor(images=[blank], text=[prompt], return_tensors="pt")["input_ids"][0]
            self._prompt_ids[prompt] = ids.tolist()
        return self._prompt_ids[prompt]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answer_ids:
            tok = self.processor.tokenizer
            self._answer_ids[answer] = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return self._answer_ids[answer]

    def target(self, question: str | None, answer: str) -> str:
        # After "Answer:" / "ASSISTANT:" the answer is a new word; a BLIP-2 caption follows <s> directly.
        return answer if (question is None and self.name == "blip2") else " " + answer

    def collate(self, pairs: list[tuple[str | None, str]], device):
        rows, labels = [], []
        for question, answer in pairs:
            p = self.prompt_ids(self.prompt(question))
            a = self.answer_ids(self.target(question, answer))
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(r) for r in rows)
        pad = self.processor.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (r, l) in enumerate(zip(rows, labels)):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            lab[i, :len(l)] = torch.tensor(l)
        return ids.to(device), mask.to(device), lab.to(device)

    @torch.no_grad()
    def generate(self, images: list, questions: list[str | None], device, max_new_tokens: int,
                 batch: int = 256) -> list[str]:
        """Greedy answers through the processor, as the lmms-eval wrappers call it (left padding)."""
        self.model.eval()
        self.processor.tokenizer.padding_side = "left"
        out = []
        for i in range(0, len(images), batch):
            prompts = [self.prompt(q) for q in questions[i:i + batch]]
            inputs = self.processor(images=images[i:i + batch], text=prompts, padding=True, return_tensors="pt")
            inputs = inputs.to(device)
            ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1]:]
            out += [t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return out


class Blip2Adapter(GenerativeVLM):
    name = "blip2"

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model, processor
        self.components = {"vision": ("vision_model.",), "connector": ("qformer.", "language_projection"),
                           "llm": ("language_model.",)}

    def prompt(self, question):
        return "" if question is None else shapes.vqa_prompt(question)

    def vision(self):
        return self.model.vision_model

    def stage2_parameters(self):
        return [p for n, p in self.model.named_parameters() if not n.startswith("vision_model.")]


class LlavaAdapter(GenerativeVLM):
    name = "llava"

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model, processor
        self.components = {"vision": ("model.vision_tower.",), "connector": ("model.multi_modal_projector.",),
                           "llm": ("model.language_model.",)}
        self._chat: dict[str, str] = {}

    def prompt(self, question):
        text = LLAVA_CAPTION_TEXT if question is None else question + LLAVA_VQA_SUFFIX
        if text not in self._chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            self._chat[text] = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                                  tokenize=False)
        return self._chat[text]

    def vision(self):
        return self.model.model.vision_tower

    def stage2_parameters(self):
        return [p for n, p in self.model.named_parameters() if not n.startswith("model.vision_tower.")]


def fixture_dims(r: Recipe, patch_size: int) -> fixture_models.TinyDims:
    """The recipe's shared sizes as the fixture config builders take them; layer counts go per tower."""
    return fixture_models.TinyDims(
        hidden_size=r.hidden, intermediate_size=r.ffn, num_heads=r.heads, num_kv_heads=r.llama_kv_heads,
        image_size=r.image_size, patch_size=patch_size, num_query_tokens=r.num_query_tokens,
        image_text_hidden_size=r.image_text_hidden, vocab_size=r.bpe_vocab)


def build_blip2(r: Recipe, tok) -> Blip2Adapter:
    dims = fixture_dims(r, r.blip2_patch)
    config = fixture_models.blip2_config(dims, tok, vision_layers=r.vision_layers, qformer_layers=r.qformer_layers,
                                         lm_layers=r.lm_layers, dropout=0.0)
    model = Blip2ForConditionalGeneration(config)
    fixture_models.reinit_query_tokens(model)
    fixture_models.set_generation_tokens(model, tok)
    return Blip2Adapter(model, fixture_models.blip2_processor(dims, tok))


def build_llava(r: Recipe, tok) -> LlavaAdapter:
    dims = fixture_dims(r, r.llava_patch)
    # The last layer, which stage 1 trains: with LLaVA-1.5's -2 that layer would be dead weight.
    # No dropout argument: CLIP's and Llama's defaults are already 0.
    config = fixture_models.llava_config(dims, tok, vision_layers=r.vision_layers, lm_layers=r.lm_layers,
                                         vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config)
    fixture_models.set_generation_tokens(model, tok)
    return LlavaAdapter(model, fixture_models.llava_processor(dims, tok))


def sample_pairs(pool: Pool, idx: list[int], rng: random.Random, caption_fraction: float):
    """One (question or None for a caption, answer) per scene index."""
    pairs = []
    for i in idx:
        if rng.random() < caption_fraction:
            pairs.append((None, caption_target(pool.scenes[i])))
        else:
            q, a, _ = rng.choice(pool.questions[i])
            pairs.append((q, a))
    return pairs


def train_generative(vlm: GenerativeVLM, pool: Pool, images_dev, heldout: Pool, recipe, device, log, seed):
    rng = random.Random(f"train-text:{seed}:{vlm.name}")
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    curve = subset(heldout, recipe.curve_images)

    def step(_):
        idx = torch.randint(0, len(pool.scenes), (recipe.lm_batch,), generator=gen)
        ids, mask, labels = vlm.collate(sample_pairs(pool, idx.tolist(), rng, recipe.caption_fraction), device)
        vlm.model.train()
        logits = vlm.model(pixel_values=pixel_values(images_dev[idx.to(device)]), input_ids=ids,
                           attention_mask=mask).logits
        # Next-token loss over the answer tokens (HF's causal-LM loss, plus optional label smoothing).
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                               label_smoothing=recipe.label_smoothing)
        return {"lm": loss}

    steps = recipe.llava_lm_steps if vlm.name == "llava" else recipe.lm_steps
    train_loop("language", steps, recipe.lm_lr, recipe.lm_time_limit_s, recipe, vlm.stage2_parameters(), device, log, step,
               eval_fn=lambda: evaluate_generative(vlm, curve, device, cider=False))


# -------------------------------------------------------------------------------- evaluation


def subset(pool: Pool, n: int) -> Pool:
    return Pool(pool.images[:n], pool.scenes[:n], pool.questions[:n],
                {g: v[:n] for g, v in pool.patch_colour.items()}, {g: v[:n] for g, v in pool.patch_shape.items()},
                pool.scene_labels[:n])


def distinct_subset(pool: Pool, n: int) -> Pool:
    """The first `n` scenes whose captions differ from every earlier one's (a retrieval pool with no twins)."""
    seen, keep = set(), []
    for i, s in enumerate(pool.scenes):
        if description(s) not in seen:
            seen.add(description(s))
            keep.append(i)
    keep = keep[:n]
    return Pool(pool.images[keep], [pool.scenes[i] for i in keep], [pool.questions[i] for i in keep],
                {g: v[keep] for g, v in pool.patch_colour.items()}, {g: v[keep] for g, v in pool.patch_shape.items()},
                pool.scene_labels[keep])


def normalise_answer(text: str) -> str:
    return re.sub(r"[^\w\s/]", "", text.lower()).strip()


def cider_score(predictions: list[str], references: list[list[str]]) -> float | None:
    """pycocoevalcap CIDEr-D (the lmms-eval caption metric) on whitespace tokens; None without the package."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return None
    gts = {i: [" ".join(r.lower().split()) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(p.lower().split()) or "empty"] for i, p in enumerate(predictions)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def evaluate_generative(vlm: GenerativeVLM, pool: Pool, device, cider: bool = True,
                        keep_predictions: bool = False) -> dict:
    """Held-out VQA accuracy (overall and per type), caption exact match and CIDEr, through the processor."""
    pil = [shapes.render(s, 64) for s in pool.scenes]
    items = [(i, q, a, t) for i, qs in enumerate(pool.questions) for q, a, t in qs]
    answers = vlm.generate([pil[i] for i, *_ in items], [q for _, q, _, _ in items], device, max_new_tokens=8)
    captions = vlm.generate(pil, [None] * len(pil), device, max_new_tokens=32)
    refs = [shapes.captions(s) for s in pool.scenes]
    by_type = defaultdict(list)
    for (_, _, a, t), pred in zip(items, answers):
        by_type[t].append(normalise_answer(pred) == a)
    right = [x for v in by_type.values() for x in v]
    result = {
        "images": len(pil), "questions": len(items),
        "vqa_accuracy": sum(right) / len(right),
        "vqa_by_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_type.items())},
        "caption_exact_match": sum(c in r for c, r in zip(captions, refs)) / len(pil),
    }
    if cider:
        result["cider"] = cider_score(captions, refs)
    if keep_predictions:
        result["examples"] = [{"caption": c, "references": r} for c, r in zip(captions[:5], refs[:5])]
    return result


def rtn_(model: nn.Module, prefixes: tuple[str, ...], bits: int, per_channel: bool) -> int:
    """Symmetric round-to-nearest of the Linear weights under `prefixes` (tied lm_head left alone)."""
    levels = 2 ** (bits - 1) - 1
    n = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.startswith(prefixes) and not name.endswith("lm_head"):
                w = module.weight
                amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
                scale = amax.clamp(min=1e-12) / levels
                w.copy_((w / scale).round().clamp(-levels, levels) * scale)
                n += 1
    return n


def rtn_sensitivity(vlm: GenerativeVLM, pool: Pool, device, log) -> list[dict]:
    """How much round-to-nearest hurts each component: a hint for the demo's grid, not the engine's numbers."""
    saved = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    rows = []
    components = dict(vlm.components)
    components["all"] = tuple(p for v in vlm.components.values() for p in v)
    for bits in (4, 3, 2):
        for per_channel in (False, True):
            for component, prefixes in components.items():
                n = rtn_(vlm.model, prefixes, bits, per_channel)
                metrics = evaluate_generative(vlm, pool, device)
                vlm.model.load_state_dict(saved)
                row = {"bits": bits, "granularity": "per-channel" if per_channel else "per-tensor",
                       "component": component, "linears": n, "vqa_accuracy": round(metrics["vqa_accuracy"], 4),
                       "caption_exact_match": round(metrics["caption_exact_match"], 4),
                       "cider": metrics["cider"] and round(metrics["cider"], 3)}
                rows.append(row)
                log(stage="rtn", name=vlm.name, **row)
    return rows


# ------------------------------------------------------------------------------------ retrieval


def build_itm(r: Recipe, source: Blip2ForConditionalGeneration, wordpiece, lm_tok) -> tuple:
    dims = fixture_dims(r, r.blip2_patch)
    config = fixture_models.blip2_itm_config(dims, wordpiece, lm_tok, vision_layers=r.vision_layers,
                                             qformer_layers=r.qformer_layers, lm_layers=r.lm_layers, dropout=0.0)
    model = Blip2ForImageTextRetrieval(config)
    assert model.config.image_token_index is None  # the processor adds no query placeholders to the text
    state = model.state_dict()
    loaded = []
    for key, value in source.state_dict().items():
        if key.startswith(("vision_model.", "qformer.")) or key == "query_tokens":
            state[key] = value.clone()
            loaded.append(key)
    # The text feed-forward of each Q-Former layer starts as a copy of the query one.
    for key in list(state):
        match = re.fullmatch(r"(qformer\.encoder\.layer\.\d+\.)(intermediate|output)(\..*)", key)
        if match:
            head, part, tail = match.groups()
            state[key] = state[f"{head}{part}_query{tail}"].clone()
            loaded.append(key)
    model.load_state_dict(state)
    processor = fixture_models.blip2_processor(dims, wordpiece, retrieval=True)
    return model, processor, loaded


def caption_for(desc: tuple, order: int) -> str:
    """A caption of a description; order 1 names the second object first (the inverse relation)."""
    if len(desc) == 1:
        colour, shape = desc[0]
        return f"a {colour} {shape}" if order == 0 else f"a {colour} {shape} on a grey background"
    first, axis, second = desc
    relation = ("above", "below") if axis == "vertical" else ("left of", "right of")
    if order == 0:
        return f"a {first[0]} {first[1]} {relation[0]} a {second[0]} {second[1]}"
    return f"a {second[0]} {second[1]} {relation[1]} a {first[0]} {first[1]}"


BACKGROUND = " on a grey background"


def retrieval_texts(scene: shapes.Scene) -> list[str]:
    """Five true captions, phrased as the retrieval tasks' data phrases them
    (``fixtures.retrieval_data.retrieval_captions``, which needs the `datasets` package): both
    references, then "there is ..." and "... on a grey background" forms (one shape: "only ...")."""
    first, second = shapes.captions(scene)
    if scene.relation is None:
        return [first, second, f"there is {first}", f"there is {second}", f"only {first}"]
    return [first, second, f"there is {first}", first + BACKGROUND, second + BACKGROUND]


def augmented_caption(desc: tuple, rng: random.Random) -> str:
    """A training caption: either object order, optionally prefixed and/or with the background named."""
    text = caption_for(desc, rng.randrange(2))
    if not text.endswith(BACKGROUND) and rng.random() < 0.3:
        text += BACKGROUND
    prefix = rng.random()
    return ("there is " if prefix < 0.25 else "only " if prefix < 0.35 else "") + text


def near_miss(desc: tuple, rng: random.Random) -> tuple:
    """A description one edit away: another colour or shape, swapped colours/shapes, or the other axis."""
    if len(desc) == 1:
        colour, shape = desc[0]
        if rng.random() < 0.5:
            return ((rng.choice([c for c in COLOUR_NAMES if c != colour]), shape),)
        return ((colour, rng.choice([s for s in shapes.SHAPES if s != shape])),)
    (c1, s1), axis, (c2, s2) = desc
    edit = rng.randrange(5)
    if edit == 0:
        return ((c2, s2), axis, (c1, s1))  # the objects trade places
    if edit == 1:
        return ((c2, s1), axis, (c1, s2))  # the colours trade shapes
    if edit == 2:
        return ((c1, s1), "horizontal" if axis == "vertical" else "vertical", (c2, s2))
    if edit == 3:
        free = [c for c in COLOUR_NAMES if c not in (c1, c2)]
        return ((rng.choice(free), s1), axis, (c2, s2)) if rng.random() < 0.5 else ((c1, s1), axis, (rng.choice(free), s2))
    other = [s for s in shapes.SHAPES if s not in (s1, s2)][0]
    return ((c1, other), axis, (c2, s2)) if rng.random() < 0.5 else ((c1, s1), axis, (c2, other))


def train_itm(model, processor, pool: Pool, images_dev, heldout: Pool, recipe, device, log, seed):
    """ITC (soft targets: every image of the same description is a positive) + ITM with hard negatives."""
    for p in model.vision_model.parameters():
        p.requires_grad_(False)
    model.vision_model.eval()
    tok = processor.tokenizer
    tok.padding_side = "right"
    rng = random.Random(f"train-itm:{seed}")
    gen = torch.Generator(device="cpu").manual_seed(seed + 2)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    descs = [description(s) for s in pool.scenes]
    curve = subset(heldout, recipe.retrieval_pool)

    def step(_):
        idx = torch.randint(0, len(pool.scenes), (recipe.itm_batch,), generator=gen).tolist()
        img_desc = [descs[i] for i in idx]
        texts = [augmented_caption(d, rng) for d in img_desc]
        extra = [near_miss(d, rng) for d in img_desc[: len(idx) // 2]]
        txt_desc = img_desc + extra
        texts += [augmented_caption(d, rng) for d in extra]
        enc = tok(texts, padding=True, return_tensors="pt").to(device)
        pv = pixel_values(images_dev[torch.tensor(idx, device=device)])
        model.train()
        out = model(pixel_values=pv, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        sim = torch.einsum("iqd,td->iqt", out.image_embeds, out.text_embeds).amax(dim=1)  # (images, texts)
        same = torch.tensor([[a == b for b in txt_desc] for a in img_desc], device=device, dtype=torch.float)
        scale = logit_scale.clamp(max=math.log(100)).exp()
        logits = sim * scale
        i2t = -(F.log_softmax(logits, dim=1) * same / same.sum(1, keepdim=True)).sum(1).mean()
        real = logits[:, : len(idx)]
        same_real = same[:, : len(idx)]
        t2i = -(F.log_softmax(real.t(), dim=1) * same_real.t() / same_real.t().sum(1, keepdim=True)).sum(1).mean()
        # Hard negatives, drawn in proportion to their similarity, never of the same description.
        with torch.no_grad():
            weights = F.softmax(logits.float(), dim=1).masked_fill(same.bool(), 0) + 1e-9 * (1 - same)
            neg_text = torch.multinomial(weights, 1).squeeze(1)
            weights = F.softmax(real.t().float(), dim=1).masked_fill(same_real.t().bool(), 0) + 1e-9 * (1 - same_real.t())
            neg_image = torch.multinomial(weights, 1).squeeze(1)
        b = len(idx)
        ids = torch.cat([enc["input_ids"][:b], enc["input_ids"][neg_text], enc["input_ids"][:b]])
        mask = torch.cat([enc["attention_mask"][:b], enc["attention_mask"][neg_text], enc["attention_mask"][:b]])
        pv3 = torch.cat([pv, pv, pv[neg_image]])
        itm = model(pixel_values=pv3, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        target = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(device)
        return {"itc": (i2t + t2i) / 2, "itm": F.cross_entropy(itm.logits_per_image, target)}

    params = [p for p in model.parameters() if p.requires_grad] + [logit_scale]
    train_loop("itm", recipe.itm_steps, recipe.itm_lr, recipe.itm_time_limit_s, recipe, params, device, log, step,
               eval_fn=lambda: evaluate_retrieval(model, processor, curve, device, rerank=16))


@torch.no_grad()
def evaluate_retrieval(model, processor, pool: Pool, device, rerank: int = 128) -> dict:
    """Text->image and image->text R@1 over a pool; every image brings five captions (retrieval_texts).

    ITC ranks by the model's own similarity (the best query's cosine). The ITM figure re-ranks each
    text's top `rerank` ITC images by the ``quant_blip2_itm`` wrapper's score: the ITM "match" logit
    (averaged over the queries) plus the ITC cosine. Images whose description repeats in the pool
    cannot be told apart by their captions, so `t2i_r1_ceiling` is what a perfect model can expect:
    the mean over texts of 1 / (images sharing its description).
    """
    model.eval()
    processor.tokenizer.padding_side = "right"
    pil = [shapes.render(s, 64) for s in pool.scenes]
    texts, owner = [], []
    for i, s in enumerate(pool.scenes):
        for ref in retrieval_texts(s):
            texts.append(ref)
            owner.append(i)
    pv = processor(images=pil, return_tensors="pt")["pixel_values"].to(device)
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt").to(device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    image_embeds = torch.cat([model(pixel_values=pv[i:i + 256], input_ids=ids[:1], attention_mask=mask[:1]).image_embeds
                              for i in range(0, len(pil), 256)])
    text_embeds = torch.cat([model(pixel_values=pv[:1], input_ids=ids[i:i + 256], attention_mask=mask[i:i + 256]).text_embeds
                             for i in range(0, len(texts), 256)])
    sim = torch.einsum("iqd,td->iqt", image_embeds, text_embeds).amax(dim=1)  # (images, texts)
    owner_t = torch.tensor(owner, device=device)
    t2i_itc = (sim.argmax(dim=0) == owner_t).float().mean().item()
    i2t_itc = (owner_t[sim.argmax(dim=1)] == torch.arange(len(pil), device=device)).float().mean().item()
    k = min(rerank, len(pil))
    top = sim.topk(k, dim=0).indices.t()  # (texts, k)
    img_idx = top.reshape(-1)
    txt_idx = torch.arange(len(texts), device=device).repeat_interleave(k)
    scores = torch.cat([
        model(pixel_values=pv[img_idx[s:s + 1024]], input_ids=ids[txt_idx[s:s + 1024]],
              attention_mask=mask[txt_idx[s:s + 1024]], use_image_text_matching_head=True).logits_per_image[:, 1]
        for s in range(0, len(img_idx), 1024)])
    scores = scores + sim[img_idx, txt_idx]
    best = top.gather(1, scores.view(len(texts), k).argmax(1, keepdim=True)).squeeze(1)
    counts = Counter(description(s) for s in pool.scenes)
    ceiling = sum(1 / counts[description(pool.scenes[o])] for o in owner) / len(owner)
    return {"images": len(pil), "texts": len(texts), "t2i_r1_itc": t2i_itc, "i2t_r1_itc": i2t_itc,
            "t2i_r1_itm": (best == owner_t).float().mean().item(), "itm_top_k": k, "t2i_r1_ceiling": ceiling}


# ------------------------------------------------------------------------------------------ I/O


def save_atomically(out_dir: Path, model, processor) -> Path:
    """save_pretrained into a sibling temp dir, then rename over `out_dir`: never a half-written checkpoint."""
    with atomic_directory(out_dir, replace=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp's 0700 would follow the checkpoint into the package
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
    return out_dir


def archive(src: Path, archive_dir: Path | None) -> None:
    if archive_dir is None:
        return
    archive_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(archive_dir / f"{src.name}.tar") as tmp:
        with tarfile.open(tmp, "w") as tar:
            tar.add(src, arcname=src.name)


def load_or_train_tokenizers(source: Path | None, r: Recipe) -> dict:
    """The committed tokenizers when `source` holds them (trainer runs may differ), else freshly trained."""
    corpus = fixture_corpus()
    found = {}
    for key, sub in (("bpe_blip2", "tiny_blip2"), ("wordpiece", "tiny_blip2_itm"), ("bpe_llava", "tiny_llava")):
        path = None if source is None else source / sub
        if path is not None and (path / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(path)
            # from_pretrained keeps its own arguments (local_files_only, ...) as init kwargs, which
            # save_pretrained would then write into the shipped config: keep only what was committed.
            committed = json.loads((path / "tokenizer_config.json").read_text())
            for extra in set(tok.init_kwargs) - set(committed):
                tok.init_kwargs.pop(extra)
            found[key] = tok
    if "bpe_blip2" not in found:
        # Blip2Processor (transformers 5.24) breaks on a string `image_token` attribute after a reload.
        found["bpe_blip2"] = train_bpe_tokenizer(corpus, vocab_size=r.bpe_vocab, image_token_attribute=False)
    if "wordpiece" not in found:
        found["wordpiece"] = train_wordpiece_tokenizer(corpus, vocab_size=r.wordpiece_vocab)
    if "bpe_llava" not in found:
        found["bpe_llava"] = train_bpe_tokenizer(corpus, vocab_size=r.bpe_vocab, image_token_attribute=True)
    return found


def parameter_counts(model: nn.Module) -> dict:
    counts = defaultdict(int)
    for name, p in model.named_parameters():
        counts[name.split(".")[0] if not name.startswith("model.") else ".".join(name.split(".")[:2])] += p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return dict(counts)


def check_pixel_path(processor, pool: Pool, device) -> float:
    """Max |difference| between the training pixels and the processor's: must be ~0 (same inputs)."""
    ours = pixel_values(torch.from_numpy(pool.images[:4]).to(device))
    theirs = processor(images=[shapes.render(s, 64) for s in pool.scenes[:4]], return_tensors="pt")["pixel_values"]
    return (ours - theirs.to(device)).abs().max().item()


# ----------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="assets dir: tiny_blip2/, tiny_blip2_itm/, tiny_llava/")
    parser.add_argument("--models", default="blip2,itm,llava",
                        help=f"comma-separated subset of {list(MODEL_NAMES)} (itm needs blip2 in the same run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blip2-from", type=Path, default=None,
                        help="BLIP-2 checkpoint the ITM model starts from when 'blip2' is not trained in this run")
    parser.add_argument("--tokenizers-from", type=Path, default=None,
                        help="assets dir whose committed tokenizers to reuse (default: train new ones)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--log", type=Path, default=None, help="JSON-lines curve (default: <out>/training_log.jsonl)")
    parser.add_argument("--metrics", type=Path, default=None, help="final figures (default: <out>/training_metrics.json)")
    parser.add_argument("--archive-to", type=Path, default=None,
                        help="also pack each finished checkpoint as <dir>/<name>.tar (for copying off a remote box)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of every stage, to check the wiring")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one Recipe field (repeatable), e.g. --set hidden=64")
    parser.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest sensitivity table")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="skip the sensitivity table of models reached after this many seconds")
    args = parser.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODEL_NAMES:
            parser.error(f"--models: got {m!r}; valid: {list(MODEL_NAMES)}")
    if "itm" in models and "blip2" not in models and args.blip2_from is None:
        parser.error(f"--models: got {args.models!r}; 'itm' starts from a BLIP-2 captioning model: train "
                     f"'blip2' in the same run or name a checkpoint with --blip2-from")

    recipe = Recipe.smoke() if args.smoke else Recipe()
    fields = {f.name: f.type for f in dataclasses.fields(Recipe)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            parser.error(f"--set: got {item!r}; valid: KEY=VALUE with KEY one of {sorted(fields)}")
        recipe = dataclasses.replace(recipe, **{key: (float if fields[key] in (float, "float") else int)(value)})
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    name_tag = "+".join(models)
    log = Log(args.log or args.out / "training_log.jsonl", name_tag)
    metrics_path = args.metrics or args.out / "training_metrics.json"
    metrics = {"seed": args.seed, "recipe": dataclasses.asdict(recipe), "device": str(device),
               "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
               "models": {}}

    grids = tuple(sorted({recipe.image_size // recipe.blip2_patch if m != "llava" else
                          recipe.image_size // recipe.llava_patch for m in models}))
    t0 = time.time()
    pool = make_pool(f"train:{args.seed}", recipe.pool_scenes, recipe.image_size, grids, args.workers)
    heldout_n = max(recipe.heldout_images, recipe.retrieval_pool)
    heldout = make_pool(f"heldout:{args.seed}", heldout_n, recipe.image_size, grids, 1)
    images_dev = torch.from_numpy(pool.images).to(device)
    # Only now touch CUDA: the data workers above are forked.
    metrics["hardware"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(stage="data", scenes=len(pool.scenes), heldout=len(heldout.scenes), seconds=round(time.time() - t0, 1))
    tokenizers = load_or_train_tokenizers(args.tokenizers_from, recipe)

    blip2, probes = None, []
    for name in models:
        torch.manual_seed(args.seed)
        if name in ("blip2", "llava"):
            vlm = (build_blip2 if name == "blip2" else build_llava)(
                recipe, tokenizers["bpe_blip2" if name == "blip2" else "bpe_llava"])
            vlm.model.to(device)
            log(stage="build", name=name, parameters=parameter_counts(vlm.model),
                pixel_path_max_diff=check_pixel_path(vlm.processor, heldout, device))
            grid = recipe.image_size // (recipe.blip2_patch if name == "blip2" else recipe.llava_patch)
            train_vision(vlm.vision(), grid, pool, images_dev, recipe, device, log, args.seed)
            train_generative(vlm, pool, images_dev, heldout, recipe, device, log, args.seed)
            final = evaluate_generative(vlm, subset(heldout, recipe.heldout_images), device, keep_predictions=True)
            log(stage="final", name=name, eval=final)
            vlm.model.to("cpu").eval()
            out_dir = save_atomically(args.out / ASSET_DIRS[name], vlm.model, vlm.processor)
            archive(out_dir, args.archive_to)
            vlm.model.to(device)
            metrics["models"][name] = {"parameters": parameter_counts(vlm.model), "heldout": final,
                                       "checkpoint_bytes": sum(f.stat().st_size for f in out_dir.iterdir())}
            probes.append(vlm)
            if name == "blip2":
                blip2 = vlm
        else:
            source = blip2.model if blip2 is not None else Blip2ForConditionalGeneration.from_pretrained(args.blip2_from)
            model, processor, loaded = build_itm(recipe, source, tokenizers["wordpiece"], tokenizers["bpe_blip2"])
            model.to(device)
            log(stage="build", name=name, parameters=parameter_counts(model), initialised_from_blip2=len(loaded))
            train_itm(model, processor, pool, images_dev, heldout, recipe, device, log, args.seed)
            final = {f"pool_{n}": evaluate_retrieval(model, processor, subset(heldout, n), device)
                     for n in sorted({8, recipe.retrieval_pool, recipe.heldout_images})}
            final[f"distinct_pool_{recipe.retrieval_pool}"] = evaluate_retrieval(
                model, processor, distinct_subset(heldout, recipe.retrieval_pool), device)
            log(stage="final", name=name, eval=final)
            model.to("cpu").eval()
            out_dir = save_atomically(args.out / ASSET_DIRS[name], model, processor)
            archive(out_dir, args.archive_to)
            metrics["models"][name] = {"parameters": parameter_counts(model), "heldout": final,
                                       "checkpoint_bytes": sum(f.stat().st_size for f in out_dir.iterdir())}
        write_metrics(metrics, metrics_path, t0)
    # Diagnostics last: they must never cost a checkpoint its training time.
    for vlm in [] if args.no_rtn else probes:
        if args.deadline_s is not None and time.time() - t0 > args.deadline_s:
            log(stage="rtn", name=vlm.name, skipped=f"past --deadline-s {args.deadline_s}")
            continue
        metrics["models"][vlm.name]["rtn_sensitivity"] = rtn_sensitivity(
            vlm, subset(heldout, min(100, recipe.heldout_images)), device, log)
        write_metrics(metrics, metrics_path, t0)
    return 0


def write_metrics(metrics: dict, path: Path, t0: float) -> None:
    metrics["elapsed_s"] = round(time.time() - t0, 1)
    write_text_atomic(path, json.dumps(metrics, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
