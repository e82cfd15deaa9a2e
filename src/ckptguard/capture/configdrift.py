"""Config drift: today's config against the ``config.yaml`` a checkpoint stored, key by key.

>>> config_diff({"model": {"dropout": 0.1}}, {"model": {"dropout": 0.3}, "seed": 1})
[ConfigChange(key='model.dropout', kind='changed', old=0.1, new=0.3),
 ConfigChange(key='seed', kind='added', old=None, new=1)]

Configs are compared in the form a checkpoint stores them (``TrainState(config=...)`` goes
through JSON: dataclasses and ``argparse.Namespace`` become dicts, tuples lists, other objects
their ``str``). Nested dicts are walked key by key and lists index by index (``layers.2.width``).
``doctor`` lists the changes; ``CheckpointManager.restore`` logs each at WARNING.
No torch here: ``ckptguard doctor --config`` and the CLI use it on metadata alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import yaml

from ckptguard.errors import CheckpointError
from ckptguard.format.safejson import yaml_loads

__all__ = ["ConfigChange", "config_diff", "load_config_file", "log_config_drift", "normalize_config"]

log = logging.getLogger(__name__)
_ABSENT = object()


@dataclasses.dataclass(frozen=True)
class ConfigChange:
    """One differing key: ``kind`` is ``added`` (only today), ``removed`` (only saved) or ``changed``."""

    key: str
    kind: str
    old: Any = None
    new: Any = None

    def __str__(self) -> str:
        if self.kind == "added":
            return f"{self.key}: added, now {self.new!r}"
        if self.kind == "removed":
            return f"{self.key}: removed, was {self.old!r}"
        return f"{self.key}: {self.old!r} -> {self.new!r}"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "old": self.old, "new": self.new}


def normalize_config(config: Any) -> Any:
    """The form a checkpoint stores ``config`` in (what ``TrainState(config=...)`` writes)."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    elif hasattr(config, "__dict__") and not isinstance(config, Mapping):
        config = dict(vars(config))  # argparse.Namespace and simple objects
    return json.loads(json.dumps(_json_keys(config), default=str, sort_keys=True))


def _json_key(k: Any) -> str:
    """A mapping key as JSON writes it (``10`` -> ``"10"``, ``True`` -> ``"true"``); other keys
    (tuples, enums) as ``str(k)``."""
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, (bool, int, float)):
        return json.dumps(k)
    return str(k)


def _json_keys(obj: Any) -> Any:
    """``obj`` with every mapping key a string, so that keys of mixed types (``{5: ..., "lr": ...}``,
    a schedule keyed by epoch beside named values) can be sorted."""
    if isinstance(obj, Mapping):
        return {_json_key(k): _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_keys(v) for v in obj]
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return a == b  # 1 and 1.0 are one value
    return type(a) is type(b) and a == b


def _walk(old: Any, new: Any, key: str, out: list[ConfigChange]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{key}.{k}" if key else str(k)
            _walk(old.get(k, _ABSENT), new.get(k, _ABSENT), sub, out)
    elif isinstance(old, list) and isinstance(new, list):
        for i in range(max(len(old), len(new))):
            sub = f"{key}.{i}" if key else str(i)
            _walk(old[i] if i < len(old) else _ABSENT, new[i] if i < len(new) else _ABSENT, sub, out)
    elif old is _ABSENT:
        out.append(ConfigChange(key, "added", None, new))
    elif new is _ABSENT:
        out.append(ConfigChange(key, "removed", old, None))
    elif not _same(old, new):
        out.append(ConfigChange(key or "(whole config)", "changed", old, new))


def config_diff(old: Any, new: Any) -> list[ConfigChange]:
    """Every key whose value differs between ``old`` (saved) and ``new`` (today), sorted by key.

    Both may be dicts, dataclasses, ``argparse.Namespace`` or plain values, nested freely.
    """
    old, new = normalize_config(old), normalize_config(new)
    if old is None and isinstance(new, dict):
        old = {}  # nothing saved: every key of today's is added
    if new is None and isinstance(old, dict):
        new = {}
    out: list[ConfigChange] = []
    _walk(old, new, "", out)
    return out


def load_config_file(path: str) -> Any:
    """A config file a user passes (``--config today.yaml``; JSON is YAML too)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(16 * 1024 * 1024 + 1)
    except FileNotFoundError as e:
        raise CheckpointError(f"--config {path}: the file does not exist.") from e
    except IsADirectoryError as e:
        raise CheckpointError(f"--config {path} is a directory; pass a YAML or JSON file.") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"--config {path}: cannot read it ({type(e).__name__}: {e}).") from e
    if len(text) > 16 * 1024 * 1024:
        raise CheckpointError(f"--config {path} is larger than 16 MiB; that is not a config file.")
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise CheckpointError(f"--config {path} is not valid YAML or JSON: {e}") from e


def _hash(cfg: Any) -> str:
    canon = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def log_config_drift(reader: Any, config: Any) -> list[ConfigChange]:
    """After a restore: log (WARNING) each key of today's ``config`` that differs from the
    checkpoint's ``config.yaml``; return the changes. Nothing when today's config is None or its
    hash equals the recorded one. Never raises: a config that cannot be read is logged."""
    if config is None:
        return []
    where = reader.where
    try:
        today = normalize_config(config)
        if _hash(today) == reader.manifest.get("config_hash"):
            return []
        # the checkpoint's file is untrusted: depth-limited, no aliases (an alias bomb expands when walked)
        saved = yaml_loads(reader.blob("config.yaml")) if reader.has("config.yaml") else None
    except (CheckpointError, yaml.YAMLError, RecursionError, TypeError, ValueError, KeyError) as e:
        log.warning("Could not compare today's config with %s/config.yaml: %s", where, e)
        return []
    changes = config_diff(saved, today)
    if changes:
        log.warning("Config differs from %s in %d key(s) (the checkpoint's config.yaml -> today's):", where, len(changes))
    for c in changes:
        log.warning("  config %s", c)
    return changes
