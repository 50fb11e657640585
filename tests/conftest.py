import os

# Before anything imports huggingface_hub: a hub name must fail fast, never stall on retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny models: on a shared 2-core CPU one thread is several times faster than two."""
    from blip3o_mini.training.understanding import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def encoder():
    """The toy CLIP encoder at random weights (seed 0), one per test module."""
    import torch

    from blip3o_mini.vision import ClipConfig, ClipEncoder

    torch.manual_seed(0)
    return ClipEncoder(ClipConfig())
