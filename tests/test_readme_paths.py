"""Every import path the documentation shows works, so docs and code cannot drift apart.

The README's Python code (fenced ``python`` blocks and inline code spans such as
``python -c "from ckptguard.policies.schedule import *"``) names modules and objects three ways:
``from ckptguard.x import a, b``, dotted paths ``ckptguard.x.y.name``, and ``cg.Name`` after
``import ckptguard as cg``. Each one must import. The top level itself is pinned: what DESIGN.md
names plus what a README user needs, and nothing else.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md"]

# Dotted names in the README that are not Python: file names and MLflow tags.
NOT_PYTHON = {"ckptguard.json", "ckptguard.ckpt", "ckptguard.run_uri", "ckptguard.latest_step", "ckptguard.latest_uri"}
NOT_PYTHON_PREFIXES = ("ckptguard.ckpt.",)

TOP_LEVEL = {
    # DESIGN.md
    "TrainState", "ResumableSampler", "CheckpointManager", "Retention", "verify", "CheckpointError",
    # the README's code
    "LossGuard", "LockPolicy", "Tiers",
    # errors the README says save/restore/close raise
    "AsyncSaveError", "CheckpointNotFoundError", "CorruptCheckpointError", "NoValidCheckpointError",
    "DiskFullError", "StoragePermissionError", "StorageError", "FormatVersionError", "RunLockedError",
    "RunLockLostError", "StateMismatchError", "UnsupportedStateError", "UnsafeCheckpointError",
    "StorageUnavailableError", "CommitUnknownError", "DatasetChangedError",
    "__version__",
}  # fmt: skip

# Names that left the top level, and where they live now.
MOVED = {
    "CheckpointInfo": "ckptguard.run.catalog",
    "KeepBeforeConfigChange": "ckptguard.policies.retention",
    "KeepBest": "ckptguard.policies.retention",
    "KeepEvery": "ckptguard.policies.retention",
    "KeepLast": "ckptguard.policies.retention",
    "KeepPhased": "ckptguard.policies.retention",
    "Stateful": "ckptguard.capture.state",
    "VerifyReport": "ckptguard.verification.verify",
    "InvalidStepError": "ckptguard.errors",
    "TrainingDivergedError": "ckptguard.errors",
}


def code_of(doc: Path) -> str:
    """The Python a document shows: its fenced ``python`` blocks and its inline code spans."""
    text = doc.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`]+)`", prose)  # a span may wrap onto the next line
    return "\n".join(blocks + spans)


def from_imports(code: str) -> list[tuple[str, list[str]]]:
    """``from ckptguard.x import a, b`` -> ("ckptguard.x", ["a", "b"]); ``*`` kept as is."""
    found = []
    for module, names in re.findall(r"from\s+(ckptguard(?:\.\w+)*)\s+import\s+([\w*, ]+)", code):
        found.append((module, [n.strip() for n in names.split(",") if n.strip()]))
    return found


def dotted_paths(code: str) -> set[str]:
    paths = set(re.findall(r"(?<![\w./-])(?:import\s+)?(ckptguard(?:\.\w+)+)", code))
    return {p for p in paths if p not in NOT_PYTHON and not p.startswith(NOT_PYTHON_PREFIXES)}


def resolve(dotted: str) -> Any:
    """Import the longest module prefix of ``dotted``, then look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if e.name is None or not ".".join(parts[:cut]).startswith(e.name):
                raise  # the module exists but imports something missing
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


ALL_CODE = "\n".join(code_of(d) for d in DOCS)


def test_the_docs_show_import_paths_at_all() -> None:
    assert len(from_imports(ALL_CODE)) >= 3 and len(dotted_paths(ALL_CODE)) >= 5
    assert ("ckptguard.policies.schedule", ["*"]) in from_imports(ALL_CODE)


@pytest.mark.parametrize(("module", "names"), from_imports(ALL_CODE), ids=lambda v: str(v))
def test_every_from_import_in_the_docs_works(module: str, names: list[str]) -> None:
    if module == "ckptguard.integrations.mlflow":
        pytest.importorskip("mlflow")
    mod: ModuleType = importlib.import_module(module)
    for name in names:
        if name == "*":
            assert all(hasattr(mod, n) for n in getattr(mod, "__all__", [])), module
        else:
            assert hasattr(mod, name), f"README: 'from {module} import {name}' fails"


@pytest.mark.parametrize("dotted", sorted(dotted_paths(ALL_CODE)))
def test_every_dotted_path_in_the_docs_resolves(dotted: str) -> None:
    if dotted.startswith("ckptguard.integrations.mlflow"):
        pytest.importorskip("mlflow")
    assert resolve(dotted) is not None


def test_every_cg_name_in_the_docs_is_at_the_top_level() -> None:
    import ckptguard as cg

    used = set(re.findall(r"\bcg\.([A-Za-z_]\w*)", ALL_CODE))
    assert {"TrainState", "CheckpointManager", "LossGuard"} <= used
    assert used <= set(cg.__all__), sorted(used - set(cg.__all__))


def test_the_top_level_is_what_design_and_the_readme_need() -> None:
    import ckptguard as cg

    assert set(cg.__all__) == TOP_LEVEL
    for name, home in MOVED.items():
        assert not hasattr(cg, name), f"{name} is back at the top level"
        assert hasattr(importlib.import_module(home), name), f"{name} is not in {home}"


def test_subpackages_say_what_they_hold_and_import_no_torch() -> None:
    """Each subpackage's docstring lists its public entry points; importing one pulls no torch."""
    packages = sorted(p.parent.name for p in (ROOT / "src" / "ckptguard").glob("*/__init__.py"))
    code = (
        "import importlib, sys\n"
        f"for name in {packages!r}:\n"
        "    mod = importlib.import_module('ckptguard.' + name)\n"
        "    assert (mod.__doc__ or '').strip(), name\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ckptguard'))\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def _entry_points() -> list[tuple[str, str]]:
    """(module, name) for every ``- ``module`` (...): ``Name``, ...`` bullet of a subpackage docstring."""
    found = []
    for init in sorted((ROOT / "src" / "ckptguard").glob("*/__init__.py")):
        doc = re.match(r'"""(.*?)"""', init.read_text(), flags=re.S)
        bullets = re.findall(r"^- ``(\w+)`` \(.*?\): (.*?)(?=^- |^$|\Z)", doc.group(1) if doc else "", flags=re.S | re.M)
        for module, names in bullets:
            found += [(f"ckptguard.{init.parent.name}.{module}", n) for n in re.findall(r"``(\w+)``", names)]
    return found


def test_subpackage_docstrings_list_entry_points_that_exist() -> None:
    entries = _entry_points()
    assert len({m.split(".")[1] for m, _ in entries}) >= 10, entries
    if "mlflow" not in sys.modules and importlib.util.find_spec("mlflow") is None:
        entries = [e for e in entries if not e[0].endswith(".mlflow")]
    missing = [f"{m}.{n}" for m, n in entries if not hasattr(importlib.import_module(m), n)]
    assert not missing, missing
