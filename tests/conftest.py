import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores are shared by two test workers: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(int(os.environ.get("INSTSEG_TEST_THREADS", "1")))
    yield
