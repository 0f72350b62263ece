import os

import pytest

os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")

from tests.harness import WorkerPool  # noqa: E402


@pytest.fixture(scope="session")
def pool():
    p = WorkerPool(max_live=int(os.environ.get("TOPOCOMM_TEST_WORLDS", "6")))
    yield p
    p.close()
