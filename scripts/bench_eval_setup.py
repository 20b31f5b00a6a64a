"""What `scripts/bench_eval.py` evaluates: real-size models with random weights, and synthetic tasks.

- `build_llava_15_7b`: LLaVA-1.5-7B from its published sizes (CLIP ViT-L/14-336: 24 x 1024; MLP
  projector; Vicuna/Llama-7B: 32 x 4096, FFN 11008, vocabulary 32064), fp16, weights N(0, 0.02), with
  the fixture tokenizer (its ``<image>`` token) and a LLaVA processor built offline (336 px, 576 image
  tokens, llava-1.5-hf's chat template). BLIP-2 OPT-2.7B comes from `scripts/bench_gpu.py`.
- `write_bench_tasks`: a caption task (COCO's prompt, 30 new tokens, a word-overlap score that needs
  no Java) and a VQAv2 task (lmms-eval's own vqav2_val YAML and metric) with exactly
  ``questions_per_image`` questions per image, on shapes-world images rendered at ``image_size``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


def random_init_(model, std: float = 0.02) -> None:
    """Every matrix N(0, std): speed does not depend on the values, and fp16 stays finite."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, std)


def build_llava_15_7b(device):
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from lmms_quant.fixtures.models import CLIP_MEAN, CLIP_STD, LLAVA_CHAT_TEMPLATE, image_token_id, lm_tokenizer

    tok = lm_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14,
                                       projection_dim=768).to_dict(),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id).to_dict(),
        image_token_index=image_token_id(tok), image_seq_length=576, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    random_init_(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                           image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True),
        tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>", num_additional_image_tokens=1)
    return model, processor


def build_blip2_opt_27b(device):
    from lmms_quant.scripts.bench_gpu import build_blip2_opt_27b as build

    return build(device)


def save_checkpoint(model, processor, out_dir: Path) -> Path:
    """save_pretrained (safetensors) into a staging directory renamed into place."""
    from lmms_quant.atomic import atomic_directory

    with atomic_directory(out_dir, replace=True) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return out_dir


# --------------------------------------------------------------------------- tasks


def caption_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def caption_process_results(doc, results):
    """Word overlap with the references (a cheap stand-in for CIDEr: no Java, no pycocoevalcap)."""
    said = set(results[0].lower().split())
    best = max(len(said & set(ref.lower().split())) / max(1, len(ref.split())) for ref in doc["captions"])
    return {"word_overlap": best}


def _caption_yaml(parquet: Path) -> str:
    return f"""task: bench_caption
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function lmms_quant.scripts.bench_eval_setup.caption_doc_to_visual
doc_to_text: "{CAPTION_PROMPT}"
doc_to_target: "captions"
generation_kwargs:
  max_new_tokens: 30
  do_sample: false
  num_beams: 1
process_results: !function lmms_quant.scripts.bench_eval_setup.caption_process_results
metric_list:
  - metric: word_overlap
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


def _vqa_yaml(parquet: Path) -> str:
    from lmms_quant.tasks_path import lmms_eval_tasks_dir

    return f"""include: {lmms_eval_tasks_dir() / "vqav2" / "vqav2_val.yaml"}
task: bench_vqa
dataset_path: parquet
dataset_kwargs:
  data_files:
    validation: {parquet}
"""


def write_bench_tasks(root: Path, n_caption_images: int, n_vqa_images: int, questions_per_image: int = 5,
                      image_size: int = 336, seed: int = 0) -> Path:
    """Data and YAMLs under ``root``; returns the include path for lmms-eval's TaskManager."""
    import datasets

    from lmms_quant.atomic import write_text_atomic
    from lmms_quant.fixtures import shapes
    from lmms_quant.fixtures.datasets import VQAV2_FEATURES, VQAV2_TYPES, write_parquet

    rng = random.Random(f"bench:{seed}")
    caption_scenes = [shapes.make_scene(rng) for _ in range(n_caption_images)]
    captions = {"image": [shapes.render(s, image_size) for s in caption_scenes],
                "captions": [shapes.captions(s) for s in caption_scenes]}
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string"))})
    write_parquet(captions, features, root / "data" / "bench_caption.parquet")

    vqa = {name: [] for name in VQAV2_FEATURES}
    for index in range(n_vqa_images):
        scene = shapes.make_scene(rng)
        image = shapes.render(scene, image_size)
        questions = shapes.vqa_questions(scene, rng)
        if len(questions) < questions_per_image:
            raise ValueError(f"questions_per_image={questions_per_image}: a scene has only {len(questions)}")
        for k, (question, answer, qtype) in enumerate(questions[:questions_per_image]):
            question_type, answer_type = VQAV2_TYPES[qtype]
            row = {"question_type": question_type, "multiple_choice_answer": answer,
                   "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": a + 1} for a in range(10)],
                   "image_id": index, "answer_type": answer_type, "question_id": index * 100 + k,
                   "question": question, "image": image}
            for name, value in row.items():
                vqa[name].append(value)
    write_parquet(vqa, VQAV2_FEATURES, root / "data" / "bench_vqa.parquet")

    tasks = root / "tasks"
    write_text_atomic(tasks / "bench_caption.yaml", _caption_yaml(root / "data" / "bench_caption.parquet"))
    write_text_atomic(tasks / "bench_vqa.yaml", _vqa_yaml(root / "data" / "bench_vqa.parquet"))
    return tasks


__all__ = ["CAPTION_PROMPT", "build_blip2_opt_27b", "build_llava_15_7b", "caption_doc_to_visual",
           "caption_process_results", "random_init_", "save_checkpoint", "write_bench_tasks"]
