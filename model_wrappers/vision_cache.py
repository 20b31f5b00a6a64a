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

from .graphed import GraphedBatches

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
        self._counting = threading.Lock()  # get() runs in the preparing threads too
        self.hits = self.misses = self.writes = 0

    def _count(self, name: str) -> None:
        with self._counting:
            setattr(self, name, getattr(self, name) + 1)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            self._count("misses")
            return None
        try:
            tensor = load_file(str(path))["features"]
        except Exception as err:  # noqa: BLE001 - a damaged entry is recomputed, never served
            log.warning("lmms-quant: feature cache entry %s unreadable (%s); recomputing", path, err)
            path.unlink(missing_ok=True)
            self._count("misses")
            return None
        self._count("hits")
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        cpu = tensor.detach().to("cpu").contiguous()

        def write():
            with atomic_path(self.path(key)) as tmp:
                save_file({"features": cpu}, str(tmp))
            self._count("writes")

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


class VisionFeatures:
    """The features of a batch's distinct images, each computed at most once per namespace.

    `ready` is the CPU work for one image ahead of its batch (any thread): its features from disk, or
    its pixel values. `features` (main thread) takes memory hits, what `ready` found, and runs the
    vision tower once for the rest. ``images_encoded`` counts images sent through the tower.

    Pixel values come from the image processor alone once `check_pixels` has found them equal to what
    the stock path's full processor call gives; otherwise (``full_processor``) from that call, text
    included, which then stays on the main thread (a tokenizer is not shared safely between threads).
    """

    def __init__(self, parts, processor, processor_inputs, device, memory: FeatureMemory,
                 disk: DiskFeatures | None = None):
        self.parts, self.processor, self.device = parts, processor, torch.device(device)
        # On CUDA each batch of pixels is one graph replay (`graphed`): its outputs are cloned below.
        self.encode = GraphedBatches(parts.image_features, self.device)
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

    def ready(self, key: str, image) -> tuple[str, torch.Tensor] | None:
        """("features", CPU tensor from disk) or ("pixels", (1, C, H, W)); None when memory has it (or when
        pixels need the full processor call, which stays on the main thread)."""
        if self.memory.get(key) is not None:
            return None
        if self.disk is not None:
            tensor = self.disk.get(key)
            if tensor is not None:
                return "features", tensor
        return None if self.full_processor else ("pixels", self._pixels([image], [""]))

    def features(self, keys: list[str], images: list, prompts: list[str], ready: dict | None = None,
                 cached: bool = True) -> torch.Tensor:
        """(distinct images, tokens, hidden) in the order of ``keys`` (content hashes; with ``cached=False``
        any unique names: nothing is looked up or kept)."""
        ready = ready or {}
        found, todo = {}, []
        for key, image, prompt in zip(keys, images, prompts):
            tensor = self.memory.get(key) if cached else None
            kind, value = ready.get(key) or (None, None)
            if tensor is None and kind == "features":
                tensor = value.to(self.device)
            if tensor is None and kind is None and cached and self.disk is not None:
                on_disk = self.disk.get(key)
                tensor = None if on_disk is None else on_disk.to(self.device)
            if tensor is None:
                todo.append((key, image, prompt, value if kind == "pixels" else None))
            else:
                found[key] = tensor
        if todo:
            fresh = [t for t in todo if t[3] is None]
            computed = iter(self._pixels([t[1] for t in fresh], [t[2] for t in fresh]).split(1) if fresh else ())
            pixels = torch.cat([t[3] if t[3] is not None else next(computed) for t in todo])
            encoded = self.encode(pixels.to(self.device, self.parts.model.dtype))
            self.images_encoded += len(todo)
            self.tower_calls += 1
            for (key, _, _, _), tensor in zip(todo, encoded):
                found[key] = tensor.clone()  # its own storage: the LRU counts what it keeps alive
                if self.disk is not None and cached:
                    self.disk.put(key, found[key])
        if cached:
            for key, tensor in found.items():
                self.memory.put(key, tensor)
        return torch.stack([found[k] for k in keys])

    def flush(self) -> None:
        if self.disk is not None:
            self.disk.flush()


__all__ = ["DiskFeatures", "FeatureMemory", "VisionFeatures", "feature_namespace", "image_key",
           "tensors_digest"]
