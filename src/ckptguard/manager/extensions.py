"""What a run's own code adds to a save: manifest field providers and post-commit hooks.

>>> mgr.add_manifest_fields(lambda step, state: {"data_position": {"epoch": state.extra["epoch"]}})
>>> mgr.add_post_commit_hook(lambda manifest: log.info("committed %s", manifest["name"]))

A provider runs in the training thread when the state is captured (rank 0 in a distributed
run); :func:`provided_fields` checks what it returns before anything is written, so a provider
can never commit a checkpoint that cannot be restored. Hooks run after the commit (see
ckptguard.manager.saving, stage "after commit"); their failures are
:class:`~ckptguard.errors.PostCommitError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ckptguard.errors import CheckpointError, ManifestFieldError
from ckptguard.format import safejson

if TYPE_CHECKING:  # the CLI reads MANIFEST_KEYS without importing torch
    from ckptguard.capture.state import TrainState

__all__ = [
    "MANIFEST_KEYS", "PROVIDER_SLOTS", "ManifestFieldProvider", "PostCommitHook", "callable_name", "custom_fields",
    "provided_fields",
]

ManifestFieldProvider = Callable[[int, "TrainState"], Mapping[str, Any]]
PostCommitHook = Callable[[dict[str, Any]], None]

MANIFEST_KEYS = frozenset({
    "format", "format_version", "step", "name", "created", "created_unix", "save_seconds", "checksum", "files",
    "manifest_xxh3_128",  # the writer's (ckptguard.persist.writer, ckptguard.format.manifest)
    "reason", "metrics", "config_hash", "environment", "probe", "verification", "extra", "resumed_from", "run_id",
    "save_interval", "distributed", "blocked_seconds", "waited_seconds",  # this pipeline's
})
"""Every top-level key the manifest itself uses. A field provider may not return one (but see
:data:`PROVIDER_SLOTS`): replacing ``step`` or ``files`` would commit a checkpoint that can never be
restored, replacing ``metrics`` or ``reason`` would mislead retention and ``ckptguard ls``."""

PROVIDER_SLOTS = frozenset({"probe"})
"""Built-in keys a provider fills in: ``probe`` (None unless the probe verifier's provider, see
ckptguard.verification.behaviour, records the probe output; a JSON object)."""


def callable_name(fn: object) -> str:
    """How an error names a provider or hook: its ``__qualname__`` (``train.notify``, ``Verifier.after_commit``)."""
    name = getattr(fn, "__qualname__", None)  # a function or a bound method
    return str(name) if name else f"{type(fn).__qualname__} object"  # a callable object (functools.partial too)


def provided_fields(provider: ManifestFieldProvider, step: int, state: TrainState) -> dict[str, Any]:
    """``provider(step, state)``, checked: a mapping of new top-level keys (or :data:`PROVIDER_SLOTS`)
    to JSON values. Raises :class:`ManifestFieldError` (naming the provider, the step and the
    key) otherwise, and when the provider raises; a CheckpointError it raises goes through as is."""
    who = f"The manifest field provider {callable_name(provider)} (registered with add_manifest_fields)"
    nothing = f"step {step} was not saved (nothing was written; the checkpoints already committed are intact)"
    try:
        out = provider(step, state)
    except CheckpointError:
        raise
    except Exception as e:
        raise ManifestFieldError(f"{who} raised {type(e).__name__}: {e} at step {step}; {nothing}. Fix the provider and save again.") from e
    if not isinstance(out, Mapping):
        raise ManifestFieldError(f"{who} returned {type(out).__name__}, not a dict of manifest fields, at step {step}; {nothing}.")
    for key, value in out.items():
        if not isinstance(key, str):
            raise ManifestFieldError(f"{who} returned the key {key!r}: manifest keys are strings; {nothing}.")
        if key in MANIFEST_KEYS and key not in PROVIDER_SLOTS:
            raise ManifestFieldError(
                f"{who} returned the key {key!r}, which the manifest itself uses (built-in keys: "
                f"{', '.join(sorted(MANIFEST_KEYS - PROVIDER_SLOTS))}); {nothing}. Return it under a name of your own, "
                f"e.g. {'my_' + key!r}."
            )
        if key in PROVIDER_SLOTS and value is not None and not isinstance(value, dict):
            raise ManifestFieldError(f"{who} returned {key!r}: {type(value).__name__}; {key!r} must be a JSON object (dict) or None; {nothing}.")
        try:
            raw = json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ManifestFieldError(
                f"{who} returned a value for {key!r} that is not JSON ({e}) at step {step}; {nothing}. Return plain "
                "dicts, lists, strings, numbers, booleans and None (e.g. float(x), x.tolist(), str(path))."
            ) from e
        if safejson.json_depth(raw.encode()) > safejson.MAX_DEPTH - 2:  # the manifest nests it 1 level deep
            raise ManifestFieldError(f"{who} returned a value for {key!r} nested deeper than {safejson.MAX_DEPTH - 2} levels, "
                                     f"which no reader accepts; {nothing}.")
    return dict(out)


def custom_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a run's own code put into ``manifest``: every key that is not built in (from
    field providers), and the entries of ``extra`` as ``extra.KEY``."""
    out = {k: v for k, v in manifest.items() if k not in MANIFEST_KEYS}
    extra = manifest.get("extra")
    if isinstance(extra, Mapping):
        out.update({f"extra.{k}": v for k, v in extra.items()})
    return out
