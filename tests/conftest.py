"""Test setup shared by the unit tests of the layer library.

Makes the checkout importable without installation and offers a one-thread fixture and the toy
router of tests/toy_router.py, registered for one test only.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a shared 2-core machine, torch's intra-op threads only add contention
    (a float64 gradcheck ran 5x slower with 2 threads under load).  Opt-in per test module via
    `pytestmark = pytest.mark.usefixtures("one_thread")`; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy_router():
    """Import tests/toy_router.py (which registers it), and unregister it afterwards so the
    other tests see the built-in routers only (the registry is global to the process)."""
    import importlib

    from moe_fairseq.moe.routers import ROUTERS

    module = importlib.import_module("toy_router")
    yield module.RoundRobinRouter
    ROUTERS.pop("toy_round_robin", None)
    sys.modules.pop("toy_router", None)
