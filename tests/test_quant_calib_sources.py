"""Calibration as a study axis: text-only sources and prompt styles, every key checked before a model loads."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoProcessor

from lmms_quant.fixtures.models import FIXTURE_MODEL_CLASSES
from lmms_quant.quant import Recipe, RecipeError, quantize
from lmms_quant.quant.calib_data import load_samples, make_batch, sample_from_text
from lmms_quant.quant.calib_source import read_text_samples

GPTQ = {"method": "gptq", "bits": 3, "group_size": 32, "calib_n": 4, "calib_batch_size": 2, "report_holdout": 2}
SENTENCES = [f"a red circle is above a blue square number {i}" for i in range(12)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib_sources")
    (root / "lines.txt").write_text("\n".join(SENTENCES) + "\n")
    (root / "paragraphs.txt").write_text("first line\nof one sample\n\nthe second\n\n\nthe third\n")
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(SENTENCES)))
    (root / "texts.json").write_text(json.dumps([{"caption": t} for t in SENTENCES]))
    (root / "texts.csv").write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(SENTENCES)))
    pq.write_table(pa.table({"text": SENTENCES}), root / "texts.parquet")
    pq.write_table(pa.table({"id": list(range(3)), "score": [0.1, 0.2, 0.3]}), root / "no_text.parquet")
    (root / "empty.txt").write_text("\n\n")
    (root / "broken.jsonl").write_text("{not json\n")
    (root / "table.tsv").write_text("text\nx\n")
    return root


def _run(checkpoint, kind, **recipe):
    model = FIXTURE_MODEL_CLASSES[kind].from_pretrained(checkpoint).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = quantize(model, AutoProcessor.from_pretrained(checkpoint), Recipe.parse({**GPTQ, **recipe}),
                      progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    return model, report, changed


@pytest.mark.parametrize("name", ["lines.txt", "texts.jsonl", "texts.json", "texts.csv", "texts.parquet"])
def test_text_only_sources_are_recognised_when_the_recipe_is_parsed(sources, name):
    recipe = Recipe.parse({"method": "gptq", "component": "llm", "calib": str(sources / name)})
    assert recipe.calib.source.text_only and recipe.calib.text_only
    # ... and refused, still before any model exists, for components no image would reach.
    for component in ("all", "vit", "connector", "vit+llm"):
        with pytest.raises(RecipeError, match=r"calib=.*text only.*valid: component=llm"):
            Recipe.parse({"method": "gptq", "component": component, "calib": str(sources / name)})


def test_an_image_text_source_is_recognised_from_its_schema(data_root):
    vqa = data_root / "vqav2_val" / "validation.parquet"
    recipe = Recipe.parse({"method": "gptq", "calib": str(vqa)})
    assert recipe.calib.source.modality == "image+text" and not recipe.calib.text_only


@pytest.mark.parametrize("name,why", [
    ("no_text.parquet", "no text column"),
    ("empty.txt", "empty"),
    ("broken.jsonl", "not JSON"),
    ("table.tsv", "unknown file type"),
])
def test_unusable_sources_fail_at_parse_naming_the_key_and_the_reason(sources, name, why):
    with pytest.raises(RecipeError, match=why) as info:
        Recipe.parse({"method": "rtn", "component": "llm", "calib": str(sources / name)})
    assert "calib=" in str(info.value) and "valid" in str(info.value)


def test_calib_style_values_and_their_constraints(sources):
    with pytest.raises(RecipeError, match="calib_style.*chat, raw, caption"):
        Recipe.parse({"method": "gptq", "calib_style": "poem"})
    with pytest.raises(RecipeError, match="calib_style='raw' is invalid with component vit"):
        Recipe.parse({"method": "gptq", "calib_style": "raw"})
    with pytest.raises(RecipeError, match="calib_style=caption is invalid"):
        Recipe.parse({"method": "gptq", "component": "llm", "calib": str(sources / "lines.txt"), "calib_style": "caption"})
    raw = Recipe.parse({"method": "gptq", "component": "llm", "calib_style": "raw"})
    assert raw.to_model_args()["calib_style"] == "raw" and Recipe.parse(raw.to_model_args()) == raw
    # The default style is not spelled: recipes written before it existed keep their digest.
    assert "calib_style" not in Recipe.parse({"method": "gptq"}).to_model_args()


def test_a_text_file_holds_a_sample_per_line_or_per_paragraph(sources):
    assert read_text_samples(str(sources / "lines.txt")) == SENTENCES
    assert read_text_samples(str(sources / "paragraphs.txt")) == ["first line of one sample", "the second", "the third"]
    recipe = Recipe.parse({"method": "gptq", "component": "llm", "calib": str(sources / "lines.txt")})
    samples = load_samples(recipe.calib.source, 5, seed=1)
    assert [s.image for s in samples] == [None] * 5 and {s.response for s in samples} <= set(SENTENCES)
    assert samples == load_samples(recipe.calib.source, 5, seed=1)


def test_styles_make_the_prompts_they_name(tiny_checkpoints):
    from lmms_quant.fixtures.datasets import calibration_samples

    processor = AutoProcessor.from_pretrained(tiny_checkpoints["llava"])
    samples = [sample_from_text(s["image"], s["text"]) for s in calibration_samples(2, 3)]
    decode = lambda batch: processor.tokenizer.batch_decode(batch.inputs["input_ids"], skip_special_tokens=False)  # noqa: E731
    chat, caption, raw = (make_batch(processor, "llava", samples, style) for style in ("chat", "caption", "raw"))
    assert "pixel_values" in chat.inputs and "pixel_values" in caption.inputs and "pixel_values" not in raw.inputs
    assert all("USER" in t or "user" in t for t in decode(chat))
    assert not any("USER" in t or "user" in t for t in decode(caption) + decode(raw))
    assert raw.entry is None  # LLaVA takes text alone; BLIP-2 text goes to its language model
    text_only = [sample_from_text(None, "a red circle")]
    assert make_batch(AutoProcessor.from_pretrained(tiny_checkpoints["blip2_opt"]), "blip2_causal", text_only).entry == \
        "language_model"


def test_text_only_calibration_quantizes_the_language_model_of_blip2_opt_and_t5(tiny_checkpoints, sources):
    for kind, linears in (("blip2_opt", 12), ("blip2_t5", 36)):
        _, report, changed = _run(tiny_checkpoints[kind], kind, component="llm", calib=str(sources / "lines.txt"))
        assert len(report.tensors) == linears and not report.skipped, kind
        assert {f"{t.name}.weight" for t in report.tensors} == changed
        assert report.calibration["text_only"] and all(t.output_error is not None for t in report.tensors)


def test_raw_and_chat_calibration_of_llava_differ_and_both_quantize_the_llm(tiny_checkpoints):
    chat_model, chat, _ = _run(tiny_checkpoints["llava"], "llava", component="llm")
    raw_model, raw, changed = _run(tiny_checkpoints["llava"], "llava", component="llm", calib_style="raw")
    assert len(raw.tensors) == len(chat.tensors) == 14 and raw.calibration["calib_style"] == "raw"
    assert changed == {f"{t.name}.weight" for t in raw.tensors}
    name = raw.tensors[0].name
    assert not torch.equal(raw_model.get_submodule(name).weight, chat_model.get_submodule(name).weight)
