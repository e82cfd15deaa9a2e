from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from s3_fixture import s3_endpoint, s3_url  # noqa: E402,F401 - fixtures: moto S3 on 127.0.0.1

FULL = os.environ.get("CKPTGUARD_TEST_FULL") == "1"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_save(request: pytest.FixtureRequest) -> bool:
    """Every save test runs with synchronous and asynchronous saves."""
    return bool(request.param)
