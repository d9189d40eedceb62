import os

import pytest
import torch


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, which tags the grouped tests
def pytest_collection_modifyitems(config, items):
    _check_xdist_groups(config, items)
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


_UNGROUPED = pytest.StashKey[str]()


def _check_xdist_groups(config, items):
    """Under ``--dist loadgroup``, pytest-xdist sends a group's tests to one worker by appending
    ``@<group>`` to their ids. Where that tag does not take (a pytest too new for the installed
    xdist), the group's tests would be spread over the workers silently: they fail instead."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist workers only
        return
    for item in items:
        if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
            item.stash[_UNGROUPED] = (
                f"--dist loadgroup did not keep this test's xdist_group on one worker: pytest "
                f"{pytest.__version__} and this pytest-xdist do not work together (see the pytest "
                "pin in pyproject.toml)"
            )


def pytest_runtest_setup(item):
    if _UNGROUPED in item.stash:
        pytest.fail(item.stash[_UNGROUPED], pytrace=False)
