"""What every lmms-quant model wrapper shares: arguments, loading, the quantization seam, batching.

A wrapper is an lmms-eval chat model (``is_simple = False``). Its life:

1. ``__init__``: the wrapper's own keys are parsed here; every other ``model_args`` key goes to
   ``QuantPlan.from_kwargs`` *before* anything is loaded, so a misspelt key fails in a second, naming
   the key. Then processor and model load through ``from_pretrained`` (hub id or local dir).
2. The first request: lmms-eval has filled ``self.task_dict`` and the requests carry their task
   objects, so we know which datasets are being scored. Only now does ``quantize_model`` run (a
   calibration set may not be one of them); its report is written beside lmms-eval's results.
3. Requests are grouped by generation settings (lmms-eval's ``Collator``) and served in batches that
   may mix tasks and splits; each request's doc is looked up on its own.

Subclasses name a transformers class and implement one batch (``generate_batch``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from loguru import logger as eval_logger
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from lmms_eval.utils import Collator, sanitize_model_name, simple_parse_args_string
from tqdm import tqdm
from transformers import AutoProcessor, GenerationConfig

import lmms_quant
from lmms_quant.atomic import write_json_atomic

DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Keys every wrapper accepts. batch_size / max_batch_size / device also arrive from lmms-eval's own
# --batch_size / --max_batch_size / --device; lmms_quant_version is folded in by `lmms-quant eval`
# so that lmms-eval's response cache never mixes results of two lmms-quant versions.
BASE_WRAPPER_KEYS = (
    "pretrained", "dtype", "device", "device_map", "trust_remote_code",
    "batch_size", "max_batch_size", "report_dir", "weight_cache", "lmms_quant_version",
)

# Used when a task sets neither max_new_tokens nor max_length (transformers' own default,
# max_length=20, counts the prompt and would leave LLaVA's 576 image tokens no room).
DEFAULT_MAX_NEW_TOKENS = 128

# Sampling knobs: meaningless (and warned about by transformers) under greedy/beam decoding.
SAMPLING_ONLY_KEYS = ("temperature", "top_p", "top_k", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")


def _none(value):
    # lmms-eval's arg parser turns `x=None` into the string "None".
    return None if value is None or (isinstance(value, str) and value.strip() in ("", "None", "none")) else value


def _unquote(value: str) -> str:
    # lmms-eval keeps the quotes of `x="a,b"`.
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def parse_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{key}: got {value!r}; valid: true or false")


def parse_batch_size(value) -> int:
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size: got {value!r}; valid: a positive integer (automatic sizing is not supported)")
    return int(text)


def parse_dtype(value):
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.strip() in DTYPES:
        return DTYPES[value.strip()]
    raise ValueError(f"dtype: got {value!r}; valid: {sorted(DTYPES)}")


def parse_device(value) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(value))
    except RuntimeError as err:
        raise ValueError(f"device: got {value!r}; valid: a torch device such as 'cpu', 'cuda', 'cuda:1'") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: got {value!r}, but CUDA is not available here; valid: 'cpu'")
    return device


def parse_device_map(value):
    value = _none(value)
    if isinstance(value, str):
        value = _unquote(value.strip())
        if value.startswith("{"):
            try:
                return json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"device_map: got {value!r}; valid: 'auto', 'balanced', 'sequential', "
                                 f"a device, or a JSON object of module name -> device") from err
    return value


@dataclass(frozen=True)
class WrapperArgs:
    """The wrapper's own (non-quantization) arguments, validated."""

    pretrained: str
    dtype: Any  # torch.dtype or "auto"
    device: torch.device
    device_map: Any
    trust_remote_code: bool
    batch_size: int
    report_dir: str | None
    weight_cache: str | None  # a WeightCache root: reuse quantized weights across tasks/runs


def split_model_args(kwargs: dict, wrapper_keys: Sequence[str]) -> tuple[dict, dict]:
    """(wrapper keys, the rest); the rest is the quantization plan's to validate."""
    own = {k: v for k, v in kwargs.items() if k in wrapper_keys}
    rest = {k: v for k, v in kwargs.items() if k not in wrapper_keys}
    return own, rest


def parse_wrapper_args(own: dict) -> WrapperArgs:
    pretrained = _none(own.get("pretrained"))
    if pretrained is None:
        raise ValueError("pretrained: missing; valid: a Hugging Face hub id or a local checkpoint directory")
    version = _none(own.get("lmms_quant_version"))
    if version is not None and str(version) != lmms_quant.__version__:
        raise ValueError(f"lmms_quant_version: got {version!r}; valid: {lmms_quant.__version__!r} "
                         f"(the installed lmms-quant; results of another version must not be mixed)")
    report_dir = _none(own.get("report_dir"))
    weight_cache = _none(own.get("weight_cache"))
    return WrapperArgs(
        pretrained=_unquote(str(pretrained)),
        dtype=parse_dtype(own.get("dtype", "auto")),
        device=parse_device(_none(own.get("device"))),
        device_map=parse_device_map(own.get("device_map")),
        trust_remote_code=parse_bool("trust_remote_code", own.get("trust_remote_code", False)),
        batch_size=parse_batch_size(own.get("batch_size", 1)),
        report_dir=None if report_dir is None else _unquote(str(report_dir)),
        weight_cache=None if weight_cache is None else _unquote(str(weight_cache)),
    )


def _format_arg(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _cli_args(argv: Sequence[str]) -> argparse.Namespace:
    # allow_abbrev=False: with it, lmms-eval's `--model x` would be read as a prefix of --model_args.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--output_path", default=None)
    parser.add_argument("--model_args", default=None)
    return parser.parse_known_args(list(argv))[0]


def cli_output_path(argv: Sequence[str] | None = None) -> str | None:
    """The running lmms-eval command's --output_path, if any (None under the Python API)."""
    return _cli_args(sys.argv[1:] if argv is None else argv).output_path


def model_name_sanitized(pretrained: str, argv: Sequence[str] | None = None) -> str:
    """The results sub-directory name, computed as lmms-eval computes it.

    lmms-eval derives it from the raw --model_args string (first of peft=, delta=, pretrained=, ...
    found as a substring), then keeps the last two path parts; read that string when it is on the
    command line so the report lands next to results.json, else fall back to ``pretrained``.
    """
    from lmms_eval.loggers.evaluation_tracker import GeneralConfigTracker

    raw = _cli_args(sys.argv[1:] if argv is None else argv).model_args
    name = GeneralConfigTracker._get_model_name(raw) if raw else ""
    return sanitize_model_name(name or pretrained)


def tasks_of_requests(requests) -> dict[str, Any]:
    """Task name -> lmms-eval task object, found through the bound methods each request carries.

    lmms-eval gives the model only ``task_dict[task] = task.dataset``; the task object itself (with
    its dataset_path / dataset_name) is reachable as ``__self__`` of the doc_to_messages /
    doc_to_visual callables in the request arguments.
    """
    tasks = {}
    for request in requests:
        for arg in request.args:
            task = getattr(arg, "__self__", None)
            config = getattr(task, "config", None)
            if callable(arg) and config is not None and hasattr(config, "dataset_path"):
                tasks[request.args[-2]] = task
                break
    return tasks


def _data_files(config, split: str) -> list[str]:
    files = (getattr(config, "dataset_kwargs", None) or {}).get("data_files")
    if isinstance(files, dict):
        files = files.get(split)
    if files is None:
        return []
    return [str(files)] if isinstance(files, (str, Path)) else [str(f) for f in files]


def evaluated_datasets(requests, task_dict: dict) -> list[tuple[str, str | None, str]]:
    """(dataset_path, dataset_name, split) of every task lmms-eval is scoring, as the engine wants them.

    The split is the one the requests ask for (the task's eval split). A task that reads local files
    through a packaged builder (``dataset_path: parquet`` + ``dataset_kwargs.data_files``) is listed
    twice: once as configured, once per data file of that split in place of the path. A task that is in
    ``task_dict`` but has no request here (another request type) has no reachable dataset path: it is
    logged and left out.
    """
    tasks = tasks_of_requests(requests)
    splits: dict[str, set] = {}
    for request in requests:
        task_name, split = request.args[-2], request.args[-1]
        splits.setdefault(task_name, set()).add(split)
    found = []
    for task_name, task in tasks.items():
        for split in sorted(splits.get(task_name, ())):
            found.append((str(task.config.dataset_path), task.config.dataset_name, split))
            # A packaged builder ("parquet", "json", ...) is no identity; its data files are.
            for path in _data_files(task.config, split):
                found.append((path, task.config.dataset_name, split))
    unreachable = sorted(set(task_dict) - set(tasks))
    if unreachable:
        eval_logger.warning(f"lmms-quant: no dataset path reachable for tasks {unreachable}; a calibration "
                            f"set equal to their data would not be detected")
    return sorted(set(found), key=str)


@dataclass
class ChatRequest:
    """One chat generate_until request, with its doc looked up: ``(ctx, doc_to_messages, gen_kwargs, doc_id, task, split)``."""

    ctx: str
    gen_kwargs: dict
    doc_id: int
    task: str
    split: str
    doc: dict
    messages: ChatMessages

    @property
    def images(self) -> list:
        images, videos, audios = self.messages.extract_media()
        if videos or audios:
            raise NotImplementedError(f"{self.task}/{self.split} doc {self.doc_id}: video and audio inputs are not supported")
        return images

    @property
    def text(self) -> str:
        """The text of the (last) user turn, i.e. the task's prompt for this doc."""
        user_turns = [m for m in self.messages.messages if m.role == "user"]
        if not user_turns:
            raise ValueError(f"{self.task}/{self.split} doc {self.doc_id}: the chat messages have no user turn")
        return "".join(c.text for c in user_turns[-1].content if c.type == "text")

    @property
    def where(self) -> str:
        return f"{self.task}/{self.split} doc {self.doc_id}"


def hf_generate_kwargs(gen_kwargs: dict, pad_token_id: int | None) -> tuple[dict, list[str]]:
    """lmms-eval gen_kwargs -> (kwargs for transformers' generate, the `until` stop strings).

    `until` is lmms-eval's (always present) and truncates decoded text; keys transformers'
    GenerationConfig does not know are dropped with a warning. Decoding is greedy unless the task asks
    for sampling (do_sample, or a temperature > 0 as lmms-eval's own wrappers read it).
    """
    kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
    until = kwargs.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif not (isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until)):
        raise ValueError(f"until: got {until!r}; valid: a string or a list of strings")
    known = GenerationConfig().to_dict()
    unknown = sorted(k for k in kwargs if k not in known)
    if unknown:
        eval_logger.warning(f"lmms-quant: ignoring generation settings transformers does not know: {unknown}")
        for key in unknown:
            kwargs.pop(key)
    temperature = kwargs.get("temperature", 0)
    do_sample = parse_bool("do_sample", kwargs["do_sample"]) if "do_sample" in kwargs else float(temperature) > 0
    kwargs["do_sample"] = do_sample
    if not do_sample:
        for key in SAMPLING_ONLY_KEYS:
            kwargs.pop(key, None)
    if "max_new_tokens" not in kwargs and "max_length" not in kwargs:
        kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    if pad_token_id is not None:
        kwargs.setdefault("pad_token_id", pad_token_id)
    return kwargs, [s for s in until if s]


def truncate_at(text: str, stops: Sequence[str]) -> str:
    """Cut at the earliest stop string (lmms-eval's `until`), then strip surrounding whitespace."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut].strip()


def count_generated(ids: torch.Tensor, eos_token_ids: set[int]) -> int:
    """Generated tokens up to and including the first EOS (the rest of a finished row is padding)."""
    for i, token in enumerate(ids.tolist()):
        if token in eos_token_ids:
            return i + 1
    return len(ids)


# ---------------------------------------------------------------------- the quantization seam


def quantize_for_requests(model, processor, plan, requests, task_dict: dict, *, pretrained: str, device=None,
                          weight_cache: str | None = None, report_path: Path | None = None) -> dict:
    """Quantize ``model`` in place for the requests about to be served; returns the report (a dict).

    The one seam every wrapper goes through (``QuantVLM.ensure_quantized``, and ``quant`` for
    lmms-eval's own model classes), called once before the first request, when lmms-eval's
    ``task_dict`` and the requests tell which datasets are scored. The report is written to
    ``report_path`` (None: kept in memory only, with a warning).
    """
    from lmms_quant.quant.calibration import check_not_evaluated

    datasets = evaluated_datasets(requests, task_dict)
    # Before any cache lookup: a cache hit must not let a leaking calibration source through.
    check_not_evaluated(plan.calib, datasets)
    eval_logger.info(f"lmms-quant: quantizing {pretrained} ({plan.digest()}); evaluated datasets {datasets}")
    if weight_cache:
        report = _quantize_through_cache(model, processor, plan, datasets, pretrained, device, weight_cache)
    else:
        report = _quantize(model, processor, plan, datasets, device).to_dict()
    if report_path is None:
        eval_logger.warning("lmms-quant: no --output_path and no report_dir: the quantization report is not written")
    else:
        write_json_atomic(report_path, report)
        eval_logger.info(f"lmms-quant: quantization report written to {report_path}")
    return report


def _quantize(model, processor, plan, datasets, device):
    from lmms_quant.quant import quantize_model

    return quantize_model(model, processor, plan, device=device, evaluated_datasets=datasets)


def _quantize_through_cache(model, processor, plan, datasets, pretrained, device, weight_cache) -> dict:
    """Quantized weights from the weight cache, or quantize and store them there.

    The entry holds every parameter of each block that had a tensor quantized (AWQ also rescales
    the norms and biases that feed it, always inside the same block) and of each quantized
    non-block module, so loading it onto the FP checkpoint reproduces the quantized model exactly.
    """
    from lmms_quant import weight_cache as wc

    identity = wc.model_identity(pretrained)
    if identity is None:
        eval_logger.warning(f"lmms-quant: cannot identify {pretrained} offline; weight cache not used")
        return _quantize(model, processor, plan, datasets, device).to_dict()
    described = {"pretrained": pretrained, "model": identity, "plan": plan.as_model_args(),
                 "calibration": wc.calibration_fingerprint(plan.calib), "dtype": str(model.dtype)}
    key = wc.cache_key(identity, plan.digest(), described["calibration"], dtype=described["dtype"])

    def build():
        report = _quantize(model, processor, plan, datasets, device)
        prefixes = tuple(sorted({f"{t.stack}.{t.block}." if t.block is not None and t.stack else f"{t.name}."
                                 for t in report.tensors}))
        tensors = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()
                   if name.startswith(prefixes)}
        return tensors, report.to_dict()

    entry, hit = wc.WeightCache(weight_cache).get_or_build(key, build, identity=described)
    if hit:
        wc.load_into(model, entry.tensors)
    eval_logger.info(f"lmms-quant: weight cache {'hit' if hit else 'miss'} ({key})")
    return {**entry.report, "weight_cache": {"key": key, "hit": hit}}


class QuantVLM(lmms):
    """Base lmms-eval chat model for lmms-quant's wrappers; see the module docstring.

    Subclasses set ``model_class`` (a transformers class with ``from_pretrained``), ``model_keys``
    (their own extra model_args, validated by ``parse_model_keys`` into ``self.options``) and
    implement ``generate_batch``.
    """

    is_simple = False
    model_class: type | None = None
    model_keys: tuple[str, ...] = ()

    @classmethod
    def wrapper_keys(cls) -> tuple[str, ...]:
        return BASE_WRAPPER_KEYS + tuple(cls.model_keys)

    # ------------------------------------------------------------------ arguments and the plan

    @classmethod
    def parse_model_keys(cls, own: dict) -> dict:
        """Validate the subclass' own ``model_keys`` values; the result is ``self.options``."""
        return {}

    @classmethod
    def validate_model_args(cls, kwargs: dict):
        """(WrapperArgs, options, QuantPlan) for parsed model_args, or a ValueError naming the bad key."""
        own, rest = split_model_args(kwargs, cls.wrapper_keys())
        args = parse_wrapper_args(own)
        options = cls.parse_model_keys(own)
        from lmms_quant.quant import QuantPlan

        plan = QuantPlan.from_kwargs(rest, other_valid_keys=cls.wrapper_keys())
        return args, options, plan

    @classmethod
    def canonical_model_args(cls, model_args: str) -> str:
        """Validate a --model_args string and spell out the resolved plan and the lmms-quant version.

        lmms-eval knows a configuration only by this string (response cache, results files), so the
        plan's defaults must be written out. ``pretrained`` stays first: lmms-eval names the results
        directory after it.
        """
        kwargs = simple_parse_args_string(model_args or "")
        if "batch_size" in kwargs:
            raise ValueError(f"batch_size: got {kwargs['batch_size']!r} inside --model_args; valid: pass it as "
                             f"lmms-eval's --batch_size (lmms-eval always passes its own)")
        _, _, plan = cls.validate_model_args(kwargs)
        own, _ = split_model_args(kwargs, cls.wrapper_keys())
        own["lmms_quant_version"] = lmms_quant.__version__
        ordered = {"pretrained": own.pop("pretrained"), **own, **plan.as_model_args()}
        canonical = ",".join(f"{k}={_format_arg(v)}" for k, v in ordered.items())
        reparsed = simple_parse_args_string(canonical)
        if list(reparsed) != list(ordered):
            raise ValueError(f"model_args: cannot spell {ordered!r} as one lmms-eval model_args string "
                             f"(a value holds a comma or '='); got keys {list(reparsed)}")
        return canonical

    # ------------------------------------------------------------------ construction

    def __init__(self, **model_args) -> None:
        super().__init__()
        # Fails on a misspelt or invalid key before anything is loaded.
        self.args, self.options, self.plan = self.validate_model_args(model_args)
        self.batch_size = self.args.batch_size
        self.processor, self.model = self.load(self.args)
        self._device = self.model.device if self.args.device_map is not None else self.args.device
        self.quant_report = None
        self._quantization_pending = not self.plan.is_noop

    def load(self, args: WrapperArgs):
        """(processor, model) through from_pretrained; weights from safetensors, remote code only if asked."""
        processor = AutoProcessor.from_pretrained(args.pretrained, trust_remote_code=args.trust_remote_code)
        model = self.model_class.from_pretrained(
            args.pretrained, dtype=args.dtype, device_map=args.device_map, trust_remote_code=args.trust_remote_code
        )
        if args.device_map is None:
            model.to(args.device)
        return processor, model.eval()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ------------------------------------------------------------------ the quantization seam

    def report_path(self) -> Path | None:
        """<output_path>/<model_name_sanitized>/quant_report_<plan digest>.json, beside lmms-eval's results.

        output_path is the ``report_dir`` model arg, else the running lmms-eval command's --output_path;
        None when neither exists (Python API without report_dir): the report then stays in memory.
        """
        root = self.args.report_dir or cli_output_path()
        if root is None:
            return None
        name = model_name_sanitized(self.args.pretrained)
        return Path(root) / name / f"quant_report_{self.plan.digest()}.json"

    def ensure_quantized(self, requests) -> None:
        """Quantize once, before the first request is served, knowing which datasets are scored."""
        if not self._quantization_pending:
            return
        self.quant_report = quantize_for_requests(
            self.model, self.processor, self.plan, requests, self.task_dict, pretrained=self.args.pretrained,
            device=self.device, weight_cache=self.args.weight_cache, report_path=self.report_path())
        self._quantization_pending = False

    # ------------------------------------------------------------------ requests

    def chat_request(self, args: tuple) -> ChatRequest:
        """A chat generate_until request with its doc (from task_dict) and messages built."""
        ctx, doc_to_messages, gen_kwargs, doc_id, task, split = args
        doc = self.task_dict[task][split][doc_id]
        return ChatRequest(ctx=ctx, gen_kwargs=gen_kwargs, doc_id=doc_id, task=task, split=split, doc=doc,
                           messages=ChatMessages(messages=doc_to_messages(doc)))

    def run_batched(self, requests, serve: Callable[[list[tuple]], list], group_fn: Callable[[tuple], Any],
                    sort_fn: Callable[[tuple], Any] = lambda args: -len(args[0]), desc: str = "lmms-quant") -> list:
        """Serve requests in batches of ``self.batch_size`` that share ``group_fn(args)``; results in request order.

        A batch may mix tasks and splits. ``serve(list of args) -> list of results`` handles one batch.
        """
        collator = Collator([r.args for r in requests], sort_fn, group_fn=group_fn, grouping=True)
        results = []
        with tqdm(total=math.ceil(len(requests) / self.batch_size), disable=self.rank != 0, desc=desc) as bar:
            for batch in collator.get_batched(n=self.batch_size):
                batch = list(batch)
                out = serve(batch)
                if len(out) != len(batch):
                    raise RuntimeError(f"{type(self).__name__}: {len(out)} results for a batch of {len(batch)}")
                results.extend(out)
                bar.update(1)
        return collator.get_original(results)

    def generate_until(self, requests) -> list[GenerationResult]:
        self.ensure_quantized(requests)
        return self.run_batched(requests, self._serve_generation, group_fn=lambda args: args[2], desc="Model Responding")

    def _serve_generation(self, batch: list[tuple]) -> list[GenerationResult]:
        chat = [self.chat_request(args) for args in batch]
        gen_kwargs, stops = hf_generate_kwargs(chat[0].gen_kwargs, self.tokenizer.pad_token_id)
        try:
            texts, input_counts, output_counts = self.generate_batch(chat, gen_kwargs)
        except Exception as err:
            # Never an empty string counted as an answer: a broken (quantized) model must stop the run.
            where = ", ".join(r.where for r in chat)
            raise RuntimeError(f"{type(self).__name__}: generation failed for {where}: {err}") from err
        return [GenerationResult(text=truncate_at(t, stops), token_counts=TokenCounts(input_tokens=i, output_tokens=o))
                for t, i, o in zip(texts, input_counts, output_counts)]

    def generate_batch(self, requests: list[ChatRequest], gen_kwargs: dict) -> tuple[list[str], list[int], list[int]]:
        """Generate for one batch: (decoded new text per request, prompt tokens, generated tokens)."""
        raise NotImplementedError

    def decode_new_tokens(self, inputs, output_ids: torch.Tensor, encoder_decoder: bool):
        """Decode only what was generated: the prompt is not part of the answer."""
        if encoder_decoder:
            new = output_ids[:, 1:]  # drop the decoder start token
        else:
            new = output_ids[:, inputs["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        input_counts = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
        output_counts = [count_generated(row, eos_ids) for row in new]
        return texts, input_counts, output_counts

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{type(self).__name__} serves generate_until tasks only; loglikelihood "
                                  f"(multiple-choice) tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{type(self).__name__} serves single-turn generate_until tasks only; "
                                  f"multi-round generation is not supported")
