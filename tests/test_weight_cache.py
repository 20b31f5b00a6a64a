"""The quantized-weight cache: a hit returns the stored weights and report without quantizing again; a
corrupt or partial entry (a killed writer, a flipped bit, a missing manifest) is detected and rebuilt;
the key changes with the model, the plan, the calibration data and the lmms-quant version."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lmms_quant.quant.recipe import CalibSource
from lmms_quant.weight_cache import (MANIFEST_FILE, WEIGHTS_FILE, WeightCache, cache_key, calibration_fingerprint,
                                     load_into, model_identity)


class TiedModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(10, 4)
        self.fc = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied, as OPT's lm_head


def quantize(model: TiedModel, calls: list) -> tuple[dict, dict]:
    """A stand-in for quantize_model (RTN to a 1/8 grid), counting its calls."""
    calls.append(1)
    with torch.no_grad():
        model.fc.weight.copy_(torch.round(model.fc.weight * 8) / 8)
    return model.state_dict(), {"plan": {"method": "rtn"}, "total": {"bits_per_weight": 4.5}}


@pytest.fixture
def key():
    return cache_key("dir:abc", "0123456789ab", "synthetic")


def test_a_hit_returns_the_stored_weights_without_quantizing_again(tmp_path, key):
    cache, calls = WeightCache(tmp_path), []
    built, hit = cache.get_or_build(key, lambda: quantize(TiedModel(), calls))
    assert (hit, len(calls)) == (False, 1)
    again, hit = cache.get_or_build(key, lambda: quantize(TiedModel(), calls))
    assert (hit, len(calls)) == (True, 1)  # not re-quantized
    assert again.report == {"plan": {"method": "rtn"}, "total": {"bits_per_weight": 4.5}}
    assert set(again.tensors) == set(TiedModel().state_dict())
    for name, tensor in built.tensors.items():
        assert torch.equal(again.tensors[name], tensor)
    # a fresh, unquantized model given the cached tensors equals the quantized one
    fresh = TiedModel()
    load_into(fresh, again.tensors)
    assert torch.equal(fresh.fc.weight, torch.round(TiedModel().fc.weight * 8) / 8)
    assert fresh.head.weight.data_ptr() == fresh.embed.weight.data_ptr()  # still tied


def test_tied_weights_are_stored_once(tmp_path, key):
    entry = WeightCache(tmp_path).store(key, TiedModel().state_dict(), {})
    assert entry.manifest["aliases"] == {"head.weight": "embed.weight"}
    assert torch.equal(entry.tensors["head.weight"], entry.tensors["embed.weight"])


@pytest.mark.parametrize("damage", ["flip a byte of the weights", "truncate the weights", "delete the manifest",
                                    "manifest of another key", "garbage manifest", "delete the report"])
def test_a_damaged_entry_is_detected_and_rebuilt(tmp_path, key, damage, capsys):
    cache, calls = WeightCache(tmp_path), []
    cache.get_or_build(key, lambda: quantize(TiedModel(), calls))
    entry = cache.path(key)
    weights, manifest = entry / WEIGHTS_FILE, entry / MANIFEST_FILE
    if damage == "flip a byte of the weights":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate the weights":
        weights.write_bytes(weights.read_bytes()[:-16])
    elif damage == "delete the manifest":
        manifest.unlink()
    elif damage == "manifest of another key":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "key": "f" * 32}))
    elif damage == "garbage manifest":
        manifest.write_text("{not json")
    else:
        (entry / "report.json").unlink()
    assert cache.problem(key) is not None
    rebuilt, hit = cache.get_or_build(key, lambda: quantize(TiedModel(), calls))
    assert (hit, len(calls)) == (False, 2)
    assert "unusable" in capsys.readouterr().err
    assert cache.problem(key) is None
    assert cache.get_or_build(key, lambda: quantize(TiedModel(), calls))[1] is True


def test_a_writer_killed_mid_entry_leaves_nothing_that_is_read_as_a_hit(tmp_path, key):
    """SIGKILL after the weights and report are written, before the manifest: the entry is rebuilt."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from lmms_quant import weight_cache
        from test_weight_cache import TiedModel
        weight_cache.WeightCache._write_manifest = staticmethod(lambda *a: os.kill(os.getpid(), signal.SIGKILL))
        weight_cache.WeightCache({str(tmp_path)!r}).store({key!r}, TiedModel().state_dict(), {{}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(tmp_path.glob(f".staging-{key}-*/{WEIGHTS_FILE}"))  # it died holding a staged entry
    cache, calls = WeightCache(tmp_path), []
    assert cache.problem(key) == "absent" and cache.load(key) is None
    _, hit = cache.get_or_build(key, lambda: quantize(TiedModel(), calls))
    assert (hit, len(calls)) == (False, 1)
    assert not list(tmp_path.glob(".staging-*"))  # the dead writer's leftovers are cleaned up


def test_concurrent_builders_of_one_key_quantize_once(tmp_path, key):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from lmms_quant.weight_cache import WeightCache
        from test_weight_cache import TiedModel
        def build():
            with open({str(tmp_path / 'builds.log')!r}, 'a') as log:
                log.write('built\\n')
            time.sleep(1.0)
            return TiedModel().state_dict(), {{}}
        entry, hit = WeightCache({str(tmp_path / 'cache')!r}).get_or_build({key!r}, build)
        print(hit)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    hits = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert hits == ["False", "True"]
    assert (tmp_path / "builds.log").read_text() == "built\n"


def test_key_changes_with_model_plan_calibration_and_version():
    base = cache_key("dir:abc", "0123456789ab", "synthetic", version="0.1.0")
    assert base == cache_key("dir:abc", "0123456789ab", "synthetic", version="0.1.0")
    assert base != cache_key("dir:abd", "0123456789ab", "synthetic", version="0.1.0")
    assert base != cache_key("dir:abc", "0123456789ac", "synthetic", version="0.1.0")
    assert base != cache_key("dir:abc", "0123456789ab", "local:0f", version="0.1.0")
    assert base != cache_key("dir:abc", "0123456789ab", "synthetic", version="0.1.1")
    assert base != cache_key("dir:abc", "0123456789ab", "synthetic", version="0.1.0", dtype="float16")


def test_model_identity_follows_the_checkpoint_contents(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    first = model_identity(str(ckpt))
    assert first.startswith("dir:") and model_identity(str(ckpt)) == first
    (ckpt / "model.safetensors").write_bytes(b"\0" * 63 + b"\1")  # same size, other weights
    assert model_identity(str(ckpt)) != first
    assert model_identity("no-such-org/no-such-model") is None  # not identifiable offline: do not cache


def test_calibration_fingerprint_hashes_local_data(tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("a")
    first = calibration_fingerprint(CalibSource.parse(str(data)))
    data.write_text("b")
    assert calibration_fingerprint(CalibSource.parse(str(data))) != first
    assert calibration_fingerprint(CalibSource.parse("synthetic")) == "synthetic"
    assert calibration_fingerprint(CalibSource.parse("hf:org/ds:train")) == "hf:org/ds:train"


def test_load_into_rejects_tensors_the_model_does_not_have(tmp_path, key):
    from lmms_quant.weight_cache import CacheError

    with pytest.raises(CacheError, match="not in the model"):
        load_into(TiedModel(), {"nope.weight": torch.zeros(1)})
    with pytest.raises(CacheError, match="shape"):
        load_into(TiedModel(), {"fc.weight": torch.zeros(2, 2)})


def test_cli_lists_and_verifies_entries(tmp_path, key, capsys):
    from lmms_quant import weight_cache

    cache = WeightCache(tmp_path)
    cache.store(key, TiedModel().state_dict(), {}, identity={"plan": "0123456789ab"})
    assert weight_cache.main(["verify", "--root", str(tmp_path)]) == 0
    assert key in capsys.readouterr().out
    (cache.path(key) / WEIGHTS_FILE).write_bytes(b"broken")
    assert weight_cache.main(["verify", "--root", str(tmp_path)]) == 1
    assert "BAD" in capsys.readouterr().out
    assert weight_cache.main(["clear", "--root", str(tmp_path)]) == 0
    assert cache.keys() == []
