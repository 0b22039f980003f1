"""Fixtures shared by the end-to-end tests."""

from pathlib import Path

import pytest

from selfdistill.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama-style model folder (hidden 64, 2 layers), built once per test module."""
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0, hidden_size=64, num_layers=2,
                            num_heads=2)
