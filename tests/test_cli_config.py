"""Config drift, key by key: ``config_diff`` against a patch oracle, ``restore`` logging each change.

Oracle: applying the reported changes to the saved config (a tiny reference ``apply`` that sets,
adds and deletes at dotted paths, sharing no code with the library) must give today's config, and
every reported key must really differ. Together: nothing missed, nothing invented.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ckptguard as cg
from ckptguard.capture.configdrift import ConfigChange, config_diff

leaves = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-2, 2, allow_nan=False), st.text("xyz", max_size=3))
keys = st.text("abcd", min_size=1, max_size=2)
configs = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)), max_leaves=12)
top = st.dictionaries(keys, configs, max_size=4)


def _get(obj: Any, parts: list[str]) -> Any:
    for p in parts:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    return obj


def apply(saved: Any, changes: list[ConfigChange]) -> Any:
    """The reference: set changed and added keys, delete removed ones (list tails from the end)."""
    out = copy.deepcopy(saved)
    removed = [c for c in changes if c.kind == "removed"]
    for c in sorted(removed, key=lambda c: [int(p) if p.isdigit() else 0 for p in c.key.split(".")], reverse=True):
        *parent, last = c.key.split(".")
        container = _get(out, parent)
        del container[int(last) if isinstance(container, list) else last]
    for c in changes:
        if c.kind == "removed":
            continue
        if c.key == "(whole config)":
            return c.new
        *parent, last = c.key.split(".")
        container = _get(out, parent)
        if isinstance(container, list):
            if int(last) == len(container):
                container.append(c.new)
            else:
                container[int(last)] = c.new
        else:
            container[last] = c.new
    return out


@settings(max_examples=300, deadline=None)
@given(top, top)
def test_changes_turn_the_saved_config_into_todays(saved: dict[str, Any], today: dict[str, Any]) -> None:
    changes = config_diff(saved, today)
    assert apply(saved, changes) == today
    assert len({c.key for c in changes}) == len(changes)
    for c in changes:
        assert c.kind in ("added", "removed", "changed")
        if c.kind == "changed":
            assert type(c.old) is not type(c.new) or c.old != c.new


@given(top)
def test_a_config_equals_itself(cfg: dict[str, Any]) -> None:
    assert config_diff(cfg, copy.deepcopy(cfg)) == []


@dataclasses.dataclass
class Model:
    dropout: float = 0.1
    widths: tuple[int, ...] = (8, 4)


@dataclasses.dataclass
class Config:
    lr: float = 1e-3
    model: Model = dataclasses.field(default_factory=Model)


def test_the_meaning_on_named_examples() -> None:
    old = Config()
    new = Config(model=Model(dropout=0.3, widths=(8, 4, 2)))
    assert [str(c) for c in config_diff(old, new)] == ["model.dropout: 0.1 -> 0.3", "model.widths.2: added, now 2"]
    ns_old, ns_new = argparse.Namespace(lr=0.1, seed=1), argparse.Namespace(lr=0.1, epochs=3)
    assert [(c.key, c.kind) for c in config_diff(ns_old, ns_new)] == [("epochs", "added"), ("seed", "removed")]
    assert config_diff({"lr": 1}, {"lr": 1.0}) == []  # one value
    assert config_diff({"flag": True}, {"flag": 1}) == [ConfigChange("flag", "changed", True, 1)]
    assert config_diff(None, {"a": 1}) == [ConfigChange("a", "added", None, 1)]
    assert config_diff({"a": {"b": 1}}, {"a": [1]}) == [ConfigChange("a", "changed", {"b": 1}, [1])]


def _save(run: Path, config: Any) -> None:
    with cg.CheckpointManager(run) as mgr:
        mgr.save(10, cg.TrainState(model=nn.Linear(2, 2), config=config), force=True)


def test_restore_logs_each_changed_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _save(run, Config())
    today = Config(lr=3e-4, model=Model(dropout=0.3))
    with caplog.at_level(logging.WARNING, logger="ckptguard"), cg.CheckpointManager(run) as mgr:
        assert mgr.restore(cg.TrainState(model=nn.Linear(2, 2), config=today)) == 10
    lines = [r.getMessage() for r in caplog.records if r.name == "ckptguard.capture.configdrift" and r.levelno == logging.WARNING]
    assert lines[0].startswith(f"Config differs from {run / 'step-000000010'} in 2 key(s)")
    assert lines[1:] == ["  config lr: 0.001 -> 0.0003", "  config model.dropout: 0.1 -> 0.3"]


def test_restore_is_quiet_when_the_config_is_the_same_or_absent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _save(run, Config())
    for config in (Config(), None):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="ckptguard"), cg.CheckpointManager(run) as mgr:
            assert mgr.restore(cg.TrainState(model=nn.Linear(2, 2), config=config)) == 10
        assert not [r for r in caplog.records if r.name == "ckptguard.capture.configdrift"]


def test_restore_without_a_saved_config_logs_every_key_as_added(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _save(run, None)
    with caplog.at_level(logging.WARNING, logger="ckptguard"), cg.CheckpointManager(run) as mgr:
        with torch.no_grad():
            assert mgr.restore(cg.TrainState(model=nn.Linear(2, 2), config={"seed": 3})) == 10
    lines = [r.getMessage() for r in caplog.records if r.name == "ckptguard.capture.configdrift"]
    assert lines[-1] == "  config seed: added, now 3"


def test_restore_with_a_hostile_config_yaml_neither_expands_nor_fails(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An alias bomb (or deep nesting) in a consistent checkpoint's config.yaml: restore says it
    could not compare the configs and restores; nothing is expanded."""
    from test_crash_hostile import reseal

    run = tmp_path / "run"
    _save(run, Config())
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{k}: &{k} [{', '.join(['*' + p] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi")
    )  # 9**9 leaves once walked
    reseal(run / "step-000000010", "config.yaml", bomb.encode())
    with caplog.at_level(logging.WARNING, logger="ckptguard"), cg.CheckpointManager(run) as mgr:
        assert mgr.restore(cg.TrainState(model=nn.Linear(2, 2), config=Config(lr=3e-4))) == 10
    said = [r.getMessage() for r in caplog.records if r.name == "ckptguard.capture.configdrift"]
    assert len(said) == 1 and said[0].startswith(f"Could not compare today's config with {run / 'step-000000010'}/config.yaml")
    assert "aliases are not accepted" in said[0]
