"""The image-feature cache: content keys, a namespace that changes with the vision weights only, whole
files under concurrent writers, and damaged entries recomputed rather than served."""

import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import lmms_quant
from lmms_quant.model_wrappers.vision_cache import (DiskFeatures, FeatureMemory, feature_namespace, image_key,
                                                    tensors_digest)

TINY_LLAVA = Path(lmms_quant.__file__).resolve().parent / "assets" / "tiny_llava"


def test_equal_images_share_a_key_and_any_pixel_or_mode_change_gives_another():
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    assert image_key(image) == image_key(image.copy())
    changed = image.copy()
    changed.putpixel((3, 3), (10, 20, 31))
    assert image_key(changed) != image_key(image)
    assert image_key(image.convert("RGBA")) != image_key(image)
    assert image_key(Image.new("RGB", (4, 16), (10, 20, 30))) != image_key(image)


def test_the_namespace_follows_the_vision_weights_not_the_language_model():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(TINY_LLAVA)
    processor = AutoProcessor.from_pretrained(TINY_LLAVA)
    lm_prefixes = ("model.language_model.", "lm_head.")
    fp = {"vit_bits": 16, "connector_bits": 16}
    before = feature_namespace(model, processor, lm_prefixes, fp)
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight.mul_(0.5)  # what an LLM-only recipe changes
    assert feature_namespace(model, processor, lm_prefixes, fp) == before
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.weight[0, 0] += 1e-3  # any change to what features depend on
    assert feature_namespace(model, processor, lm_prefixes, fp)["vision_weights"] != before["vision_weights"]
    assert tensors_digest({"w": torch.ones(2, dtype=torch.bfloat16)}) != tensors_digest({"w": torch.ones(2)})


def test_features_round_trip_and_a_damaged_entry_is_recomputed_not_served(tmp_path):
    store = DiskFeatures(tmp_path, {"model": "m"})
    features = torch.randn(3, 5)
    assert store.get("ab" * 16) is None
    store.put("ab" * 16, features)
    store.flush()
    assert torch.equal(store.get("ab" * 16), features)
    store.path("ab" * 16).write_bytes(b"\x00 truncated")
    assert store.get("ab" * 16) is None and not store.path("ab" * 16).exists()
    assert DiskFeatures(tmp_path, {"model": "other"}).dir != store.dir


def test_concurrent_writers_of_the_same_keys_leave_only_whole_entries(tmp_path):
    keys = [f"{i:02x}" * 16 for i in range(40)]
    values = {k: torch.full((16, 64), float(i)) for i, k in enumerate(keys)}
    writers = [DiskFeatures(tmp_path, {"model": "m"}) for _ in range(3)]  # as three processes of one sweep would
    seen_partial = []

    def write(store):
        for key in keys:
            store.put(key, values[key])
        store.flush()

    def read():
        reader = DiskFeatures(tmp_path, {"model": "m"})
        for _ in range(3):
            for key in keys:
                got = reader.get(key)
                if got is not None and not torch.equal(got, values[key]):
                    seen_partial.append(key)

    threads = [threading.Thread(target=write, args=(w,)) for w in writers] + [threading.Thread(target=read)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not seen_partial
    final = DiskFeatures(tmp_path, {"model": "m"})
    assert all(torch.equal(final.get(k), values[k]) for k in keys)
    assert not [p for p in final.dir.rglob("*") if p.name.startswith(".")]  # no temporary file left behind


def test_the_memory_cache_is_bounded_in_bytes_and_drops_the_least_recent():
    memory = FeatureMemory(max_bytes=3 * 4 * 10)  # three tensors of ten float32
    for name in "abc":
        memory.put(name, torch.zeros(10))
    assert memory.get("a") is not None  # a is now the most recent
    memory.put("d", torch.zeros(10))
    assert memory.get("b") is None and all(memory.get(k) is not None for k in "acd")
    memory.put("huge", torch.zeros(1000))
    assert memory.get("huge") is None


def test_a_cache_root_that_cannot_be_written_fails_loudly(tmp_path):
    root = tmp_path / "a-file"
    root.write_text("not a directory")
    with pytest.raises(OSError):
        DiskFeatures(root, {"model": "m"})


def test_graph_buckets_are_the_next_power_of_two_and_cpu_batches_run_eagerly():
    from lmms_quant.model_wrappers.graphed import GraphedBatches, bucket

    assert [bucket(n) for n in (1, 2, 3, 5, 8, 13, 64, 65)] == [1, 2, 4, 8, 8, 16, 64, 128]
    calls = []
    encode = GraphedBatches(lambda x: calls.append(x.shape[0]) or x * 2, "cpu")
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(encode(x), x * 2) and calls == [3]  # no padding off CUDA
    assert encode.stats == {"captures": 0, "replays": 0, "eager_calls": 1, "error": None}


def test_preparing_threads_come_from_the_environment_and_a_bad_value_names_the_key(monkeypatch):
    from lmms_quant.model_wrappers.prepare import THREADS_ENV, preparing_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert 1 <= preparing_threads() <= 3
    monkeypatch.setenv(THREADS_ENV, "5")
    assert preparing_threads() == 5
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(ValueError, match=f"{THREADS_ENV}.*zero.*positive int"):
        preparing_threads()
