"""Test-suite set-up shared by every test file.

- Offline Hugging Face: without these a hub lookup retries for ~46 s before failing.
- Triton's interpreter must be switched on *before* triton is imported; on a machine without CUDA the kernel
  tests run interpreted on CPU tensors (small shapes only: it is 40-3000x slower than torch).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer and three tiny domains on disk (per test module): ``(root, {name: file})``."""
    from .tiny import domain_texts, make_tokenizer, write_domains

    root = tmp_path_factory.mktemp("assets")
    texts = [t for docs in domain_texts().values() for t in docs]
    make_tokenizer(root / "tok", texts)
    return root, write_domains(root / "data")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
