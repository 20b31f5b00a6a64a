"""Image features computed once: per image within a run, and on disk across configurations.

The vision tower and connector turn an image into the embeddings the language model reads in place
of the image tokens. Within a run the same image comes back for every question about it (VQAv2 asks
~5 per image, GQA ~30) and across tasks; across a sweep, every configuration that leaves the vision
tower and connector in floating point computes exactly the same features. So features are looked up
by the image's *content* hash, first in memory (an LRU bounded in bytes), then on disk.

A disk entry is one safetensors file ``<root>/<namespace>/<hh>/<image hash>.safetensors``. The
namespace hashes everything the features depend on besides the image: the bytes of every vision and
connector tensor as they are at evaluation time (so a recipe that touched them can never be served
another's features), the model config, the image processor's config, the attention implementation,
dtype and device, the vision part of the recipe and the lmms-quant and transformers versions.
(`weight_cache.model_identity` would hash the whole checkpoint — 14 GB for LLaVA-7B, each
configuration — of which only the vision weights matter here.)

Entries are immutable and content-addressed: a writer builds the file beside its final name and
renames it into place (`lmms_quant.atomic`), so a reader sees a whole file or none; two processes
writing one key write the same features and the last rename wins, so no lock is needed (unlike
`weight_cache`, where a lock saves a duplicated quantization of minutes). A file that fails to load
is deleted and recomputed. Writes go through one background thread, off the GPU's critical path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from lmms_quant.atomic import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

FORMAT = 1
NAMESPACE_FILE = "namespace.json"


def image_key(image) -> str:
    """A content hash of a PIL image (mode, size and pixels): equal images share features."""
    import xxhash

    digest = xxhash.xxh3_128()
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """xxh3-128 over the names, shapes, dtypes and bytes of ``tensors`` (copied to the CPU one by one)."""
    import xxhash

    digest = xxhash.xxh3_128()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        digest.update(tensor.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def feature_namespace(model, processor, lm_prefixes, recipe_vision: dict) -> dict:
    """Everything besides the image that the features depend on, as a JSON-able dict."""
    import transformers

    import lmms_quant

    vision = {n: t for n, t in model.state_dict().items() if not n.startswith(tuple(lm_prefixes))}
    device = next(model.parameters()).device
    return {
        "format": FORMAT,
        "lmms_quant": lmms_quant.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "model_config": json.loads(model.config.to_json_string(use_diff=False)),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "image_processor": json.loads(processor.image_processor.to_json_string()),
        "vision_weights": tensors_digest(vision),
        "dtype": str(model.dtype),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "recipe_vision": recipe_vision,
    }


class DiskFeatures:
    """Features on disk under one namespace; `get` returns CPU tensors or None."""

    def __init__(self, root, namespace: dict):
        canonical = json.dumps(namespace, sort_keys=True, default=str)
        self.key = hashlib.sha256(canonical.encode()).hexdigest()[:24]
        self.dir = Path(root).expanduser() / self.key
        if not (self.dir / NAMESPACE_FILE).is_file():
            write_json_atomic(self.dir / NAMESPACE_FILE, namespace)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmms-quant-features")
        self._pending: list[Future] = []
        self.hits = self.misses = self.writes = 0

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensor = load_file(str(path))["features"]
        except Exception as err:  # noqa: BLE001 - a damaged entry is recomputed, never served
            log.warning("lmms-quant: feature cache entry %s unreadable (%s); recomputing", path, err)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        cpu = tensor.detach().to("cpu").contiguous()

        def write():
            with atomic_path(self.path(key)) as tmp:
                save_file({"features": cpu}, str(tmp))
            self.writes += 1

        self._pending.append(self._writer.submit(write))

    def flush(self) -> None:
        """Wait for every write; a failed write raises here."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


class FeatureMemory:
    """An LRU of feature tensors (on the model's device), bounded in bytes; thread-safe."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            tensor = self._items.get(key)
            if tensor is not None:
                self._items.move_to_end(key)
            return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            if key in self._items or size > self.max_bytes:
                return
            self._items[key] = tensor
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()


class Pending:
    """A batch's images split into features already known and pixel values still to encode."""

    def __init__(self, keys, known, missing, pixel_values, cached):
        self.keys, self.known, self.missing, self.pixel_values = keys, known, missing, pixel_values
        self.cached = cached


class VisionFeatures:
    """The features of a batch's distinct images, each computed at most once per namespace.

    `lookup` (memory, disk, then the image transform for what is missing) is CPU work and may run in
    a worker thread while the GPU serves the previous batch; `finish` runs the vision tower on the
    missing images only. ``images_encoded`` counts images sent through the vision tower.

    Pixel values come from the image processor alone, once `check_pixels` has found them equal to
    what the full processor call of the stock path gives; otherwise (``full_processor``) from that
    call, text included, which then must stay on the main thread (a tokenizer is not shared safely).
    """

    def __init__(self, parts, processor, processor_inputs, device, memory: FeatureMemory,
                 disk: DiskFeatures | None = None):
        self.parts, self.processor, self.device = parts, processor, torch.device(device)
        self.processor_inputs = processor_inputs  # the wrapper's own processor call (the stock path's)
        self.memory, self.disk = memory, disk
        self.full_processor = True
        self.images_encoded = 0
        self.tower_calls = 0

    def _pixels(self, images: list, prompts: list[str]) -> torch.Tensor:
        if self.full_processor:
            return self.processor_inputs(prompts, [[image] for image in images])["pixel_values"]
        return self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def check_pixels(self, image, prompt: str) -> bool:
        """Use the image processor alone from now on if it gives the stock call's pixel values."""
        stock = self.processor_inputs([prompt], [[image]])["pixel_values"]
        alone = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        self.full_processor = not (alone.shape == stock.shape and torch.equal(alone, stock))
        return not self.full_processor

    def lookup(self, keys: list[str], images: list, prompts: list[str], cached: bool = True) -> Pending:
        """``keys``: the images' content hashes (``cached=False``: any unique names; nothing is cached)."""
        known, missing = {}, []
        for key, image, prompt in zip(keys, images, prompts):
            tensor = self.memory.get(key) if cached else None
            if tensor is None and cached and self.disk is not None:
                tensor = self.disk.get(key)
            if tensor is None:
                missing.append((key, image, prompt))
            else:
                known[key] = tensor
        pixel_values = self._pixels([m[1] for m in missing], [m[2] for m in missing]) if missing else None
        return Pending(keys, known, missing, pixel_values, cached)

    def finish(self, pending: Pending) -> torch.Tensor:
        """(distinct images, tokens, hidden) features in the order of ``pending.keys``."""
        found = {k: t.to(self.device) for k, t in pending.known.items()}
        if pending.missing:
            encoded = self.parts.image_features(pending.pixel_values.to(self.device, self.parts.model.dtype))
            self.images_encoded += len(pending.missing)
            self.tower_calls += 1
            for (key, _, _), tensor in zip(pending.missing, encoded):
                found[key] = tensor.clone()  # its own storage: the LRU counts what it keeps alive
                if self.disk is not None and pending.cached:
                    self.disk.put(key, found[key])
        if pending.cached:
            for key, tensor in found.items():
                self.memory.put(key, tensor)
        return torch.stack([found[k] for k in pending.keys])

    def flush(self) -> None:
        if self.disk is not None:
            self.disk.flush()


__all__ = ["DiskFeatures", "FeatureMemory", "Pending", "VisionFeatures", "feature_namespace", "image_key",
           "tensors_digest"]
