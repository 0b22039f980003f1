"""Fixtures shared by the end-to-end tests."""

from pathlib import Path

import pytest

from selfdistill.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama-style model folder (hidden 64, 2 layers), built once per test module."""
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0, hidden_size=64, num_layers=2,
                            num_heads=2)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster on loopback shared by a module's in-process runs (each run still starts and
    stops its own actors); saves a cluster start and shutdown per run."""
    from selfdistill.launch.cluster import ray_cluster

    with ray_cluster(None, 8) as ray:
        yield ray
