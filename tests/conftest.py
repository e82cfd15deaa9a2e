from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from s3_fixture import s3_endpoint, s3_url  # noqa: F401 - fixtures: moto S3 on 127.0.0.1

FULL = os.environ.get("CKPTGUARD_TEST_FULL") == "1"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_save(request: pytest.FixtureRequest) -> bool:
    """Every save test runs with synchronous and asynchronous saves."""
    return bool(request.param)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make ``@pytest.mark.xdist_group`` work under pytest 9 (``--dist loadgroup``).

    pytest-xdist 3.8 tags grouped tests by assigning ``item._nodeid``, which pytest 9 no longer
    reads (the node id lives in ``item._id``), so groups were silently ignored and grouped tests
    ran on both workers at once. Tag them here the way pytest 9 reads it; a no-op elsewhere.
    """
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9: xdist tags the ids itself
        return
    for item in items:
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        )
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")
