"""pytest set-up for ``pytest bench/``: collect ``bench_*.py`` files and a ``device`` fixture (the markers
are registered in pyproject.toml).

``bench_*.py`` is not in pytest's default ``python_files``; the hook below collects them without touching the
project's pytest configuration. Functions inside are ordinary ``test_*`` functions using the ``benchmark``
fixture of pytest-benchmark.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collect_file(file_path, parent):
    # a file named on the command line is already collected by pytest's python plugin
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


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
