"""A vLLM engine's LoRA adapter: one PEFT folder and one `LoRARequest` per weight version.

The engine starts from an adapter folder (a fresh run's initial adapter, or a checkpoint).
Each sync writes the received adapter tensors as a new PEFT folder (adapter_config.json
copied from the first) under a private temporary directory, and the next requests use a
new `LoRARequest` id for it; the replaced version is dropped from vLLM and from disk.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from selfdistill.models import lora
from selfdistill.rollout import vllm_internals as vi


class AdapterVersions:
    def __init__(self, llm, folder: str):
        self.llm = llm
        self.settings_text = (Path(folder) / lora.ADAPTER_CONFIG).read_text()
        self.scratch = Path(tempfile.mkdtemp(prefix="selfdistill-adapter-"))
        atexit.register(self.close)
        self.adapter_id = 1
        self.request = vi.lora_request(str(folder), self.adapter_id)

    def load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Make the received adapter the one every later request uses; return the tensor names received."""
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in named_tensors}
        folder = self.scratch / f"v{self.adapter_id + 1}"
        folder.mkdir()
        save_file(tensors, str(folder / lora.ADAPTER_WEIGHTS))
        (folder / lora.ADAPTER_CONFIG).write_text(self.settings_text)
        old_id, old_folder = self.adapter_id, Path(self.request.lora_path)
        self.adapter_id += 1
        self.request = vi.lora_request(str(folder), self.adapter_id)
        vi.remove_lora(self.llm, old_id)
        if old_folder.parent == self.scratch:
            shutil.rmtree(old_folder, ignore_errors=True)
        return set(tensors)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
