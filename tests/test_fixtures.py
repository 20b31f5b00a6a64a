"""The hub-free fixtures: synthetic world, offline tokenizers, tiny checkpoints, lmms-eval datasets."""

import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer

from lmms_quant.fixtures import datasets as fx_datasets
from lmms_quant.fixtures import models, shapes, tokenizers

GENERATIVE = ["blip2_opt", "blip2_t5", "llava"]


def _image_bytes(image):
    return image.tobytes()


# ---------------------------------------------------------------- shapes world


def test_same_seed_gives_same_scenes_and_image_bytes():
    a = [shapes.render(shapes.make_scene(random.Random(7))) for _ in range(2)]
    b = shapes.render(shapes.make_scene(random.Random(8)))
    assert _image_bytes(a[0]) == _image_bytes(a[1])
    assert _image_bytes(a[0]) != _image_bytes(b)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_render_size_is_a_parameter(size):
    image = shapes.render(shapes.make_scene(random.Random(0)), size)
    assert image.size == (size, size) and image.mode == "RGB"


def test_render_rejects_a_bad_size():
    with pytest.raises(ValueError, match="size"):
        shapes.render(shapes.make_scene(random.Random(0)), 0)


def test_shapes_are_drawn_in_their_colour_where_the_scene_puts_them():
    rng = random.Random(1)
    for _ in range(30):
        scene = shapes.make_scene(rng)
        image = shapes.render(scene, 64)
        for obj in scene.objects:
            pixel = image.getpixel((int(obj.centre[0] * 64), int(obj.centre[1] * 64)))
            expected = shapes.COLOURS[obj.colour]
            assert all(abs(p - e) <= shapes.PIXEL_NOISE for p, e in zip(pixel, expected)), (obj, pixel)
        # The background is grey (up to the noise) in a corner no shape reaches.
        corner = image.getpixel((0, 0))
        assert all(abs(c - scene.background) <= shapes.PIXEL_NOISE for c in corner)


def test_scenes_have_one_or_two_shapes_with_distinct_colours_and_consistent_relations():
    rng = random.Random(2)
    counts = {1: 0, 2: 0}
    for _ in range(200):
        scene = shapes.make_scene(rng)
        counts[len(scene.objects)] += 1
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        assert scene.background in shapes.BACKGROUND_GREYS
        if len(scene.objects) == 2:
            (x0, y0), (x1, y1) = (o.centre for o in scene.objects)
            holds = {"above": y0 < y1, "below": y0 > y1, "left of": x0 < x1, "right of": x0 > x1}
            assert holds[scene.relation], scene
        else:
            assert scene.relation is None
    assert counts[1] > 20 and counts[2] > 100


def test_captions_are_canonical_then_inverted():
    scene = shapes.Scene(
        objects=(
            shapes.SceneObject("circle", "red", (0.5, 0.25), 0.15),
            shapes.SceneObject("square", "blue", (0.5, 0.75), 0.15),
        ),
        relation="above",
        background=128,
        noise_seed=0,
    )
    assert shapes.captions(scene) == ["a red circle above a blue square", "a blue square below a red circle"]
    single = shapes.Scene((shapes.SceneObject("triangle", "green", (0.5, 0.5), 0.2),), None, 100, 0)
    refs = shapes.captions(single)
    assert len(refs) >= 2 and refs[0] == "a green triangle"


def test_vqa_answers_are_one_word_and_true_of_the_scene():
    rng = random.Random(3)
    yes = no = 0
    seen_types = set()
    for _ in range(100):
        scene = shapes.make_scene(rng)
        by_shape = {o.shape: o for o in scene.objects}
        by_colour = {o.colour: o for o in scene.objects}
        for question, answer, qtype in shapes.vqa_questions(scene, rng):
            assert qtype in shapes.QUESTION_TYPES
            assert len(answer.split()) == 1
            seen_types.add(qtype)
            words = question.rstrip("?").split()
            if qtype == "colour":
                assert by_shape[words[-1]].colour == answer
            elif qtype == "shape":
                assert by_colour[words[-2]].shape == answer
            elif qtype == "position":
                assert scene.position_of(by_shape[words[-1]]) == answer
            elif qtype == "count":
                assert answer == shapes.COUNT_WORDS[len(scene.objects)]
            else:
                present = any(o.colour == words[-2] and o.shape == words[-1] for o in scene.objects)
                assert answer == ("yes" if present else "no")
                yes, no = yes + (answer == "yes"), no + (answer == "no")
    assert seen_types == set(shapes.QUESTION_TYPES)
    assert yes == no == 100


def test_corpus_is_deterministic_and_formats_vqa_prompts():
    texts = shapes.corpus(20, seed=0)
    assert texts == shapes.corpus(20, seed=0)
    assert texts != shapes.corpus(20, seed=1)
    assert any(t.startswith("Question: ") and " Answer: " in t for t in texts)


# ---------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def corpus():
    return tokenizers.fixture_corpus()


@pytest.fixture(scope="module")
def bpe(corpus):
    return tokenizers.train_bpe_tokenizer(corpus)


@pytest.fixture(scope="module")
def wordpiece(corpus):
    return tokenizers.train_wordpiece_tokenizer(corpus)


def test_bpe_special_ids_and_size(bpe):
    assert len(bpe) == 400
    assert [bpe.convert_tokens_to_ids(t) for t in tokenizers.BPE_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (bpe.pad_token_id, bpe.eos_token_id, bpe.bos_token_id, bpe.unk_token_id) == (0, 1, 2, 3)
    assert bpe.image_token_id == 4 and bpe.padding_side == "left"


def test_bpe_round_trips_every_world_text_without_unk(bpe, corpus):
    for text in corpus + shapes.corpus(50, seed=99):
        ids = bpe(text).input_ids
        assert ids[0] == bpe.bos_token_id
        assert bpe.unk_token_id not in ids, text
        assert bpe.decode(ids[1:]) == text
    # World words are whole tokens, so prompts stay short.
    assert len(bpe("Question: what colour is the circle? Answer:").input_ids) <= 12


def test_t5_style_bpe_has_no_bos_and_ends_with_eos(corpus):
    t5 = tokenizers.train_bpe_tokenizer(corpus, add_bos=False, add_eos=True)
    ids = t5("a red circle").input_ids
    assert t5.bos_token_id not in ids and ids[-1] == t5.eos_token_id


def test_wordpiece_round_trips_without_unk(wordpiece, corpus):
    assert len(wordpiece) <= 200
    assert [wordpiece.convert_tokens_to_ids(t) for t in tokenizers.WORDPIECE_SPECIAL_TOKENS] == list(range(6))
    for text in corpus:
        ids = wordpiece(text).input_ids
        assert ids[0] == wordpiece.cls_token_id and ids[-1] == wordpiece.sep_token_id
        assert wordpiece.unk_token_id not in ids, text
        decoded = wordpiece.decode(ids[1:-1])
        assert decoded.replace(" ", "") == text.lower().replace(" ", "").replace("\n", "")
    assert wordpiece.convert_ids_to_tokens(wordpiece("a red circle").input_ids) == [
        "[CLS]", "a", "red", "circle", "[SEP]"
    ]


def test_tokenizer_training_is_reproducible(corpus, bpe, wordpiece):
    assert tokenizers.train_bpe_tokenizer(corpus)._tokenizer.to_str() == bpe._tokenizer.to_str()
    assert tokenizers.train_wordpiece_tokenizer(corpus)._tokenizer.to_str() == wordpiece._tokenizer.to_str()


def test_tokenizers_reload_with_auto_tokenizer(bpe, wordpiece, tmp_path):
    text = "Question: is there a red square? Answer: no"
    for tok, name in ((bpe, "bpe"), (wordpiece, "wp")):
        tok.save_pretrained(tmp_path / name)
        again = AutoTokenizer.from_pretrained(tmp_path / name)
        assert again(text).input_ids == tok(text).input_ids
        assert again.padding_side == tok.padding_side and len(again) == len(tok)


def test_tokenizer_options_are_validated(corpus):
    with pytest.raises(ValueError, match="padding_side.*'middle'"):
        tokenizers.train_bpe_tokenizer(corpus, padding_side="middle")
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizers.train_wordpiece_tokenizer(corpus, vocab_size=10)


# ---------------------------------------------------------------- tiny checkpoints


def _load(kind, path):
    return models.FIXTURE_MODEL_CLASSES[kind].from_pretrained(path).eval()


@pytest.mark.parametrize("kind", sorted(models.FIXTURE_BUILDERS))
def test_checkpoint_reloads_with_the_same_weights_and_is_seeded(kind, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints[kind]
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    saved = load_file(path / "model.safetensors")
    model, info = models.FIXTURE_MODEL_CLASSES[kind].from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # Saving what was loaded must give back the same tensors (a weight left at its random init
    # by the loader would differ). LLaVA's file uses legacy key names, so compare file to file.
    model.save_pretrained(tmp_path / "resaved")
    resaved = load_file(tmp_path / "resaved" / "model.safetensors")
    assert resaved.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(resaved[name], tensor), name

    rebuilt = models.build_fixture(kind, tmp_path / "same", seed=0)
    assert (rebuilt / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()
    other = load_file(models.build_fixture(kind, tmp_path / "other", seed=1) / "model.safetensors")
    assert not all(torch.equal(other[n], t) for n, t in saved.items())


@pytest.mark.parametrize("kind", ["blip2_opt", "blip2_t5", "blip2_itm"])
def test_blip2_vision_weights_and_queries_are_not_degenerate(kind, tiny_checkpoints):
    model = _load(kind, tiny_checkpoints[kind])
    qkv = model.vision_model.encoder.layers[0].self_attn.qkv.weight
    assert 0.01 < qkv.std().item() < 0.05  # initializer_range 0.02, not the 1e-10 default
    queries = model.query_tokens
    assert 0.01 < queries.std().item() < 0.05
    assert not torch.allclose(queries[0, 0], queries[0, 1])


@pytest.mark.parametrize("kind", GENERATIVE)
def test_image_token_is_configured_and_prompts_tokenize_without_unk(kind, tiny_checkpoints):
    path = tiny_checkpoints[kind]
    processor = AutoProcessor.from_pretrained(path)
    model = _load(kind, path)
    tok = processor.tokenizer
    image_token_id = tok.convert_tokens_to_ids("<image>")
    assert model.config.image_token_index == image_token_id
    assert tok.padding_side == "left"
    for text in shapes.corpus(20, seed=5) + list(tokenizers.TASK_PROMPTS):
        assert tok.unk_token_id not in tok(text).input_ids, text


def _prompts(kind, processor, questions):
    if kind == "llava":
        return [
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                add_generation_prompt=True,
            )
            for q in questions
        ]
    return [shapes.vqa_prompt(q) for q in questions]


def test_llava_chat_template_renders_the_llava_1_5_prompt(tiny_checkpoints):
    processor = AutoProcessor.from_pretrained(tiny_checkpoints["llava"])
    assert _prompts("llava", processor, ["what colour is the circle?"]) == [
        "USER: <image>\nwhat colour is the circle? ASSISTANT:"
    ]
    inputs = processor(images=[shapes.render(shapes.make_scene(random.Random(0)))],
                       text=_prompts("llava", processor, ["x"]), return_tensors="pt")
    n_image_tokens = (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()
    assert n_image_tokens == (32 // 8) ** 2


@pytest.mark.parametrize("kind", GENERATIVE)
def test_batched_left_padded_generation_after_reload_matches_one_by_one(kind, tiny_checkpoints):
    path = tiny_checkpoints[kind]
    processor = AutoProcessor.from_pretrained(path)
    model = _load(kind, path)
    rng = random.Random(11)
    images = [shapes.render(shapes.make_scene(rng), 48) for _ in range(3)]  # 48 px: the processor resizes
    questions = ["how many shapes are there?", "where is the circle?", "what shape is the purple one?"]
    prompts = _prompts(kind, processor, questions)
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    # Left padding: every row ends on a real token, and the shorter prompts carry pads.
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and (mask == 0).sum(dim=1).tolist().count(0) == 1
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        batched = model.generate(**batch, **kwargs)
        for row in range(3):
            single = processor(images=[images[row]], text=[prompts[row]], return_tensors="pt")
            alone = model.generate(**single, **kwargs)
            new_alone = alone[0, single["input_ids"].shape[1]:] if kind != "blip2_t5" else alone[0]
            new_batched = batched[row, batch["input_ids"].shape[1]:] if kind != "blip2_t5" else batched[row]
            n = min(len(new_alone), len(new_batched))
            assert n > 0
            assert new_alone[:n].tolist() == new_batched[:n].tolist(), (kind, row)


def test_blip2_itm_scores_image_text_pairs_after_reload(tiny_checkpoints):
    path = tiny_checkpoints["blip2_itm"]
    processor = AutoProcessor.from_pretrained(path)
    model = _load("blip2_itm", path)
    assert model.config.qformer_config.use_qformer_text_input
    rng = random.Random(4)
    scenes = [shapes.make_scene(rng) for _ in range(3)]
    texts = [shapes.captions(s)[0] for s in scenes]
    inputs = processor(images=[shapes.render(s) for s in scenes], text=texts, return_tensors="pt", padding=True)
    assert processor.tokenizer.unk_token_id not in inputs["input_ids"]
    with torch.no_grad():
        itm = model(**inputs, use_image_text_matching_head=True).logits_per_image
        itc = model(**inputs, use_image_text_matching_head=False).logits_per_image
    assert itm.shape == (3, 2) and itc.shape == (3, 3)
    assert torch.isfinite(itm).all() and torch.isfinite(itc).all()


def test_fixture_sizes_are_data_and_bad_keys_are_named(tmp_path):
    path = models.build_tiny_llava(tmp_path / "llava64", image_size=64, patch_size=16, hidden_size=32)
    model = _load("llava", path)
    assert model.config.vision_config.image_size == 64 and model.config.image_seq_length == 16
    assert model.config.text_config.hidden_size == 32
    with pytest.raises(TypeError, match="'hidden'.*hidden_size"):
        models.build_tiny_blip2_opt(tmp_path / "x", hidden=3)
    with pytest.raises(ValueError, match="image_size: got 30"):
        models.TinyDims(image_size=30, patch_size=8)
    with pytest.raises(KeyError, match="'gpt'.*blip2_opt"):
        models.build_fixture("gpt", tmp_path / "y")


def test_config_builders_take_per_tower_layers_dropout_and_feature_layer(bpe, wordpiece):
    """What scripts/train_tiny_vlm.py sets on top of TinyDims; left out, each keeps the fixture's value."""
    d = models.TinyDims()
    blip2 = models.blip2_config(d, bpe, vision_layers=3, qformer_layers=1, lm_layers=4, dropout=0.0)
    assert (blip2.vision_config.num_hidden_layers, blip2.qformer_config.num_hidden_layers,
            blip2.text_config.num_hidden_layers) == (3, 1, 4)
    assert blip2.qformer_config.hidden_dropout_prob == blip2.text_config.dropout == 0.0
    default = models.blip2_config(d, bpe)
    assert default.vision_config.num_hidden_layers == default.text_config.num_hidden_layers == d.num_layers
    assert default.qformer_config.hidden_dropout_prob == 0.1  # transformers' default, as the fixtures ship
    t5 = models.blip2_config(d, bpe, t5_style=True, lm_layers=3, dropout=0.0)
    assert t5.text_config.num_layers == t5.text_config.num_decoder_layers == 3 and t5.text_config.dropout_rate == 0
    itm = models.blip2_itm_config(d, wordpiece, bpe, qformer_layers=3)
    assert itm.qformer_config.num_hidden_layers == 3 and itm.qformer_config.use_qformer_text_input
    llava = models.llava_config(d, bpe, vision_layers=3, vision_feature_layer=-1)
    assert llava.vision_config.num_hidden_layers == 3 and llava.vision_feature_layer == -1
    assert models.llava_config(d, bpe).vision_feature_layer == -2
    with pytest.raises(ValueError, match="num_layers: got 0"):
        models.blip2_config(d, bpe, lm_layers=0)
    with pytest.raises(ValueError, match="dropout: got 1.5"):
        models.blip2_itm_config(d, wordpiece, bpe, dropout=1.5)


def test_builders_never_replace_a_directory_that_is_not_a_fixture(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious"):
        models.build_tiny_llava(precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    # A fixture directory is replaced whole, with no temp dirs left behind.
    models.build_tiny_llava(tmp_path / "fx", seed=0)
    models.build_tiny_llava(tmp_path / "fx", seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fx", "precious"]


# ---------------------------------------------------------------- lmms-eval datasets


def _load_split(path, split, cache_dir):
    import datasets

    return datasets.load_dataset("parquet", data_files={split: str(path)}, split=split, cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_data")
    return fx_datasets.write_lmms_eval_datasets(root, n_images=4, seed=0)


@pytest.fixture(scope="module")
def loaded(written, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_cache")
    return {
        task: _load_split(path, fx_datasets.TASK_FILES[task][1], cache) for task, path in written.items()
    }


def test_datasets_are_written_in_the_task_layout(written):
    assert set(written) == {"coco2017_cap_val", "flickr30k_test", "vqav2_val", "gqa"}
    for task, path in written.items():
        directory, split = fx_datasets.TASK_FILES[task]
        assert path.parent.name == directory and path.name == f"{split}.parquet"


def test_datasets_load_back_with_the_hub_features(loaded):
    import datasets

    expected = {
        "coco2017_cap_val": fx_datasets.COCO_FEATURES,
        "flickr30k_test": fx_datasets.FLICKR_FEATURES,
        "vqav2_val": fx_datasets.VQAV2_FEATURES,
        "gqa": fx_datasets.GQA_FEATURES,
    }
    for task, ds in loaded.items():
        assert ds.features == expected[task], task
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds[0]["image"].mode == "RGB"
    assert len(loaded["coco2017_cap_val"]) == len(loaded["flickr30k_test"]) == 4
    coco = loaded["coco2017_cap_val"][0]
    assert coco["question_id"].endswith(".jpg") and len(coco["answer"]) == 5
    assert (coco["height"], coco["width"]) == coco["image"].size[::-1]
    assert len(loaded["flickr30k_test"][0]["caption"]) == 5


def test_lmms_eval_caption_utils_accept_the_rows(loaded):
    from lmms_eval.tasks.coco_cap import utils as coco_utils
    from lmms_eval.tasks.flickr30k import utils as flickr_utils

    coco = loaded["coco2017_cap_val"][0]
    [visual] = coco_utils.coco_doc_to_visual(coco)
    assert visual.size == (64, 64)
    assert coco_utils.coco_doc_to_text(coco)
    result = coco_utils.coco_process_result(coco, ["a red circle"])
    assert result["coco_CIDEr"]["image_id"] == coco["id"]
    assert result["coco_CIDEr"]["answer"] == coco["answer"]

    flickr = loaded["flickr30k_test"][0]
    assert flickr_utils.flickr_doc_to_visual(flickr)[0].mode == "RGB"
    result = flickr_utils.flickr_process_result(flickr, ["a red circle"])
    assert result["flickr_CIDEr"]["image_id"] == int(flickr["img_id"])


def test_lmms_eval_vqav2_metric_scores_right_and_wrong_answers(loaded):
    from lmms_eval.tasks.vqav2 import utils as vqa_utils

    rows = list(loaded["vqav2_val"])
    assert len({r["question_id"] for r in rows}) == len(rows)
    kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    for row in rows:
        assert len({a["answer_id"] for a in row["answers"]}) == 10
        assert vqa_utils.vqav2_doc_to_text(row, kwargs).startswith(row["question"])
        assert vqa_utils.vqav2_doc_to_visual(row)[0].mode == "RGB"
        right = vqa_utils.vqav2_process_results_val(dict(row), [row["multiple_choice_answer"].capitalize() + "."])
        wrong = vqa_utils.vqav2_process_results_val(dict(row), ["banana"])
        assert right["exact_match"] == 1.0 and wrong["exact_match"] == 0.0
    assert {r["answer_type"] for r in rows} == {"yes/no", "number", "other"}


def test_lmms_eval_gqa_utils_accept_the_rows(loaded):
    from lmms_eval.tasks.gqa import utils as gqa_utils

    rows = list(loaded["gqa"])
    assert len({r["id"] for r in rows}) == len(rows)
    kwargs = {"pre_prompt": "", "post_prompt": "\nAnswer the question using a single word or phrase."}
    for row in rows[:5]:
        assert gqa_utils.gqa_doc_to_visual(row)[0].mode == "RGB"
        assert gqa_utils.gqa_doc_to_text(row, kwargs) == row["question"] + kwargs["post_prompt"]
        assert len(row["answer"].split()) == 1 and row["answer"] in row["fullAnswer"]


def test_datasets_are_deterministic_per_seed(written, tmp_path):
    again = fx_datasets.write_lmms_eval_datasets(tmp_path / "again", n_images=4, seed=0)
    other = fx_datasets.write_lmms_eval_datasets(tmp_path / "other", n_images=4, seed=1)
    for task, path in written.items():
        assert again[task].read_bytes() == path.read_bytes(), task
        assert other[task].read_bytes() != path.read_bytes(), task
    assert not [p for p in (tmp_path / "again").rglob("*") if p.name.startswith(".")]


def test_write_rejects_a_bad_image_count(tmp_path):
    with pytest.raises(ValueError, match="n_images: got 0"):
        fx_datasets.write_lmms_eval_datasets(tmp_path, n_images=0)


def test_calibration_samples_are_seeded_and_disjoint_from_evaluation(loaded):
    samples = fx_datasets.calibration_samples(16, seed=0)
    assert len(samples) == 16
    assert all(set(s) == {"image", "text"} and s["image"].size == (64, 64) for s in samples)
    assert [_image_bytes(s["image"]) for s in samples] == [
        _image_bytes(s["image"]) for s in fx_datasets.calibration_samples(16, seed=0)
    ]
    assert any(s["text"].startswith("Question: ") for s in samples)
    assert any(not s["text"].startswith("Question: ") for s in samples)
    eval_images = {_image_bytes(row["image"]) for row in loaded["coco2017_cap_val"]}
    assert not eval_images & {_image_bytes(s["image"]) for s in samples}
