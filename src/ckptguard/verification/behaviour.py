"""Behavioural verification after each commit: Save -> load on CPU -> forward -> hash -> match?

``CheckpointManager(probe=batch)`` attaches a :class:`Verifier`. At save time (training thread,
before an async save returns) it runs the live model on the frozen probe and records the output's
hash and statistics in the manifest (``"probe"``), with the relative change against the previous
save (``"drift"``). After the commit it loads the checkpoint back *from storage*, through the
verified reader, into a CPU copy of the model, runs the probe again and compares:

* match    -> ``STATUS.json`` says ``verified``;
* mismatch -> ``failed``: an error is logged, ``on_verification_failure(info)`` is called and
  ``restore`` never uses the checkpoint.

Verification runs on the thread that commits (the background writer for async saves).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from ckptguard.capture.state import MODEL_FILE, TrainState, model_state_dict, unwrap_model
from ckptguard.errors import CorruptCheckpointError, UnsupportedStateError
from ckptguard.persist.reader import CheckpointReader
from ckptguard.run.catalog import mark_status
from ckptguard.storage.base import Storage
from ckptguard.verification.probe import (
    PROBE_FILE,
    ProbeInputs,
    compare_probe,
    flat_output,
    freeze_probe,
    relative_change,
    run_probe,
    summarize,
)

__all__ = ["Extensible", "VerificationResult", "Verifier", "attach_verifier", "cpu_template"]

log = logging.getLogger(__name__)
FailureCallback = Callable[[dict[str, Any]], None]


class Extensible(Protocol):
    """What verification needs of a checkpoint manager: its storage and the public extension
    points of a save (``CheckpointManager`` is one)."""

    @property
    def storage(self) -> Storage: ...

    def add_manifest_fields(self, provider: Callable[[int, TrainState], Mapping[str, Any]]) -> None: ...

    def add_post_commit_hook(self, hook: Callable[[dict[str, Any]], None]) -> None: ...


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    """The outcome of verifying one committed checkpoint."""

    step: int
    status: str  # verified | failed | corrupt | skipped
    detail: str
    drift: float | None = None


def cpu_template(model: nn.Module) -> nn.Module:
    """A CPU deep copy of the unwrapped model whose parameters are uninitialised placeholders.

    Parameters are always overwritten from the checkpoint, so they are not copied (no GPU memory
    spike, no copy of the weights); buffers are copied (non-persistent ones are not saved).
    """
    inner = unwrap_model(model)
    memo: dict[int, Any] = {}
    for p in inner.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
    for b in inner.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    twin = copy.deepcopy(inner, memo)
    return twin.to("cpu")


def load_into(template: nn.Module, reader: Any) -> None:
    """Load a checkpoint's model tensors (verified read) into ``template`` in place.

    Only keys present in both with the same shape are loaded (the doctor loads what fits).
    """
    tensors, actual, _ = model_state_dict(template)
    table = reader.tensor_table(MODEL_FILE)
    names = [k for k, e in table.items() if k in tensors and tuple(e["shape"]) == tuple(tensors[k].shape)]
    loaded = reader.tensors(MODEL_FILE, targets=tensors, names=names)
    leftovers = {actual[k]: t for k, t in loaded.items() if t.data_ptr() != tensors[k].data_ptr()}
    if leftovers:
        with torch.no_grad():
            template.load_state_dict(leftovers, strict=False)


class Verifier:
    """Records probe outputs at save time and checks committed checkpoints against them."""

    def __init__(
        self,
        mgr: Extensible,
        probe: Any,
        *,
        drift_epsilon: float | None = None,
        on_failure: FailureCallback | None = None,
    ) -> None:
        if drift_epsilon is not None and not (drift_epsilon >= 0 and math.isfinite(drift_epsilon)):
            raise ValueError(f"drift_epsilon must be a finite number >= 0, got {drift_epsilon!r}")
        self.mgr = mgr
        self.storage = mgr.storage
        self._probe = probe
        self.drift_epsilon = drift_epsilon
        self.on_failure = on_failure
        self.inputs: ProbeInputs | None = None
        self.probe_digest: str | None = None
        self._template: nn.Module | None = None
        self._prev: tuple[int, torch.Tensor] | None = None
        self.results: list[VerificationResult] = []

    # ---- save time (training thread) ------------------------------------------------------------

    def manifest_fields(self, step: int, state: TrainState) -> Mapping[str, Any]:
        if state.model is None:
            return {}
        froze_now = False
        if self.inputs is None:
            froze_now = not self.storage.exists(PROBE_FILE)
            self.inputs, self.probe_digest = freeze_probe(self.storage, self._probe)
        if self._template is None:
            try:
                self._template = cpu_template(state.model)
            except Exception as e:  # noqa: BLE001 - a model that cannot be copied is only not verified
                log.warning("Cannot make a CPU copy of the model for verification (%s); probe hashes are recorded but not checked.", e)
                self._template = None
        device = str(next(iter(unwrap_model(state.model).parameters()), torch.empty(0)).device)
        try:
            outs = run_probe(state.model, self.inputs)
        except Exception as e:
            if self._prev is None:  # first use: a probe that does not fit the model is bad input
                if froze_now:  # do not keep a batch that never worked
                    self.storage.remove_file(PROBE_FILE)
                    self.inputs = None
                raise UnsupportedStateError(
                    f"The probe batch in {self.storage.describe(PROBE_FILE)} does not run through the "
                    f"model ({type(e).__name__}: {e}). Pass a probe= the model's forward accepts "
                    "(or delete that file if an old run froze a batch that no longer fits)."
                ) from e
            log.error("Probe forward failed at step %d (%s); this checkpoint is saved unverified.", step, e)
            return {}
        record = summarize(outs, device=device)
        record["file"] = PROBE_FILE
        record["file_xxh3_128"] = self.probe_digest
        flat = flat_output(outs)
        if self._prev is not None:
            prev_step, prev = self._prev
            change = relative_change(flat, prev)
            exceeded = self.drift_epsilon is not None and change > self.drift_epsilon
            record["drift"] = {"from_step": prev_step, "rel_change": change if math.isfinite(change) else None,
                               "epsilon": self.drift_epsilon, "exceeded": exceeded}
            if exceeded:
                log.warning(
                    "Probe output drifted by %.4g (relative L2) between step %d and step %d, above "
                    "drift_epsilon=%g: check for a loss spike, a changed data pipeline or a bug.",
                    change, prev_step, step, self.drift_epsilon,
                )
        self._prev = (step, flat)
        return {"probe": record}

    # ---- after commit (committing thread) -------------------------------------------------------

    def after_commit(self, manifest: dict[str, Any]) -> None:
        try:
            result = self.verify(manifest)
        except Exception as e:
            log.exception("Verification of step %s crashed", manifest.get("step"))
            result = VerificationResult(int(manifest["step"]), "skipped", f"verifier crashed: {e}")
        self.results.append(result)
        if result.status in ("failed", "corrupt"):
            info = {"step": result.step, "status": result.status, "detail": result.detail,
                    "path": self.storage.describe(manifest["name"])}
            log.error(
                "Checkpoint %s FAILED verification: %s. It will not be used as a recovery point; "
                "the previous verified checkpoint stays the restore target.", info["path"], result.detail,
            )
            if self.on_failure is not None:
                try:
                    self.on_failure(info)
                except Exception:
                    log.exception("on_verification_failure callback raised")

    def verify(self, manifest: dict[str, Any]) -> VerificationResult:
        step, name = int(manifest["step"]), str(manifest["name"])
        recorded = manifest.get("probe")
        drift = ((recorded or {}).get("drift") or {}).get("rel_change")
        if not recorded or self._template is None or self.inputs is None:
            return VerificationResult(step, "skipped", "no probe output recorded or no model copy", drift)
        reader = CheckpointReader(self.storage, name, manifest)
        try:
            load_into(self._template, reader)
        except CorruptCheckpointError as e:
            mark_status(self.storage, name, "corrupt", str(e))
            return VerificationResult(step, "corrupt", str(e), drift)
        got = summarize(run_probe(self._template, self.inputs, isolate_rng=False), device="cpu")
        ok, why = compare_probe(recorded, got)
        status = "verified" if ok else "failed"
        detail = f"probe {why}" if ok else (
            f"loaded back from storage, the model gives a different output on the probe: {why}"
        )
        mark_status(self.storage, name, status, detail)
        return VerificationResult(step, status, detail, drift)


def attach_verifier(
    mgr: Extensible,
    probe: Any,
    *,
    drift_epsilon: float | None = None,
    on_failure: FailureCallback | None = None,
) -> Verifier:
    """Create a Verifier for ``mgr`` and register its manifest provider and post-commit hook."""
    v = Verifier(mgr, probe, drift_epsilon=drift_epsilon, on_failure=on_failure)
    mgr.add_manifest_fields(v.manifest_fields)
    mgr.add_post_commit_hook(v.after_commit)
    return v

