"""TrainState: everything a training run needs to resume exactly, captured without pickle.

``capture`` turns a TrainState into a :class:`Snapshot` (tensor groups for safetensors files, a
JSON document for ``state.json``, the config as YAML); ``restore_state`` puts a verified
checkpoint back into the live objects. Anything with ``state_dict()/load_state_dict()`` plugs in
(the ``Stateful`` protocol of torch.distributed.checkpoint).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import yaml
from torch import nn

from ckptguard.capture.configdrift import normalize_config
from ckptguard.capture.data_identity import dataset_check, saved_identity
from ckptguard.capture.inplace import optimizer_targets
from ckptguard.capture.mismatch import MismatchReport, check_optimizers, compare_model, load_optimizers, mismatch_error
from ckptguard.capture.model_keys import canonical_key, model_state_dict, param_names, unwrap_model
from ckptguard.capture.rng import capture_rng, restore_rng
from ckptguard.capture.sampler import (
    ResumableSampler,
    load_loader_state,
    loader_state,
    track_dataloader,
)
from ckptguard.errors import CorruptCheckpointError, StateMismatchError, UnsupportedStateError
from ckptguard.format.codec import decode, encode, load_into

__all__ = [
    "without_model",
    "CheckpointSource",
    "MismatchReport",
    "Snapshot",
    "Stateful",
    "TrainState",
    "canonical_key",
    "capture",
    "config_to_dict",
    "hash_config",
    "model_state_dict",
    "restore_state",
    "unwrap_model",
]

log = logging.getLogger(__name__)
STATE_FORMAT = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
EXTRA_FILE = "state.safetensors"


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


class TrainState:
    """The objects of a training run that a checkpoint holds.

    >>> state = TrainState(model=model, optimizer=opt, scheduler=sched, scaler=scaler,
    ...                    dataloader=loader, config=cfg, extra={"epoch": 0}, ema=ema)

    ``optimizer`` / ``scheduler`` may be one object or a dict of named ones. Keyword arguments
    beyond the named ones are user objects with ``state_dict()/load_state_dict()``. RNG of
    python, numpy, torch CPU and every CUDA device is always captured.
    """

    def __init__(
        self,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer] | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        dataloader: torch.utils.data.DataLoader[Any] | None = None,
        sampler: ResumableSampler | None = None,
        config: Any = None,
        extra: dict[str, Any] | None = None,
        capture_rng: bool = True,
        **objects: Stateful,
    ) -> None:
        self.model = model
        self.optimizers = _named(optimizer)
        self.schedulers = _named(scheduler)
        self.scaler = scaler
        self.dataloader = dataloader
        self._tracker = track_dataloader(dataloader) if dataloader is not None else None
        if sampler is None and self._tracker is not None:
            sampler = self._tracker.sampler
        self.sampler = sampler
        self.config = config
        self.extra: dict[str, Any] = extra if extra is not None else {}
        self.capture_rng = capture_rng
        for name, obj in objects.items():
            if not isinstance(obj, Stateful):
                raise UnsupportedStateError(
                    f"TrainState({name}=...) must have state_dict() and load_state_dict(); got "
                    f"{type(obj).__name__}. Put plain JSON values into extra={{...}} instead."
                )
        self.objects: dict[str, Stateful] = dict(objects)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.optimizers.get("")

    @property
    def scheduler(self) -> Any:
        return self.schedulers.get("")


def _named(obj: Any) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    return {"": obj}


# ---- config ----------------------------------------------------------------------------------


config_to_dict = normalize_config  # the form a checkpoint stores a config in (one definition)


def hash_config(config_dict: Any) -> str | None:
    if config_dict is None:
        return None
    canon = json.dumps(config_dict, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


# ---- capture ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Snapshot:
    """A captured state: tensor groups (file name -> tensors) plus JSON and config."""

    tensor_files: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    config: Any
    config_yaml: bytes | None
    config_hash: str | None

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for g in self.tensor_files.values() for t in g.values()
        )


def capture(ts: TrainState, step: int) -> Snapshot:
    """Capture ``ts``. Tensors are the live ones (the caller copies them for async saves)."""
    files: dict[str, dict[str, torch.Tensor]] = {MODEL_FILE: {}, OPTIM_FILE: {}, EXTRA_FILE: {}}
    state: dict[str, Any] = {"format_version": STATE_FORMAT, "step": int(step)}
    if ts.model is not None:
        tensors, _, other = model_state_dict(ts.model)
        files[MODEL_FILE] = tensors
        if other:
            state["model_extra"] = encode(other, files[EXTRA_FILE], "model_extra")
    if ts.optimizers:
        state["optimizers"] = {}
        for name, opt in ts.optimizers.items():
            prefix = f"{name}." if name else ""
            state["optimizers"][name] = {
                "class": type(opt).__name__,
                "state_dict": encode(opt.state_dict(), files[OPTIM_FILE], prefix.rstrip("."), f"optimizer {name!r}"),
                "param_names": param_names(ts.model, opt),
            }
    if ts.schedulers:
        state["schedulers"] = {
            name: {
                "class": type(s).__name__,
                "state_dict": encode(s.state_dict(), files[EXTRA_FILE], f"scheduler.{name}", f"scheduler {name!r}".replace(" ''", "")),
            }
            for name, s in ts.schedulers.items()
        }
    if ts.scaler is not None:
        state["scaler"] = encode(ts.scaler.state_dict(), files[EXTRA_FILE], "scaler", "scaler")
    if ts.objects:
        state["objects"] = {
            name: encode(obj.state_dict(), files[EXTRA_FILE], f"objects.{name}", f"TrainState({name}=...)")
            for name, obj in ts.objects.items()
        }
    if ts._tracker is not None:
        assert ts.dataloader is not None
        state["dataloader"] = loader_state(ts._tracker, ts.dataloader.generator)
    elif ts.sampler is not None:
        state["sampler"] = ts.sampler.state_dict()
    state["extra"] = encode(ts.extra, files[EXTRA_FILE], "extra", "extra")
    if ts.capture_rng:
        state["rng"] = capture_rng()
    cfg = config_to_dict(ts.config)
    cfg_yaml = yaml.safe_dump(cfg, sort_keys=True).encode() if cfg is not None else None
    files = {k: v for k, v in files.items() if v or k != EXTRA_FILE}
    data = saved_identity(state.get("sampler") or (state.get("dataloader") or {}).get("sampler"))
    # A change of the data pipeline is a config change (retention's keep_config_changes, diff).
    digest = hash_config(cfg) if data is None else hash_config({"config": cfg, "data": data.key()})
    return Snapshot(files, state, cfg, cfg_yaml, digest)


# ---- restore ---------------------------------------------------------------------------------


def _sched_label(name: str, sched: Any) -> str:
    return f"scheduler {name!r} ({type(sched).__name__})" if name else f"the scheduler ({type(sched).__name__})"


def _check_schedulers(ts: TrainState, state: Mapping[str, Any], report: MismatchReport) -> set[str]:
    """Compare scheduler classes (a StepLR checkpoint cannot drive a SequentialLR); return the
    names of schedulers left as constructed."""
    skip = set()
    saved_all = state.get("schedulers") or {}
    for name, sched in ts.schedulers.items():
        saved = saved_all.get(name) if isinstance(saved_all, Mapping) else None
        label = _sched_label(name, sched)
        if saved is None:
            report.notes.append(f"{label}: not in the checkpoint (left as constructed)")
            skip.add(name)
        elif isinstance(saved, Mapping) and saved.get("class") not in (None, type(sched).__name__):
            report.refused.append(
                f"{label}: the checkpoint holds a {saved.get('class')} state; not loaded (the "
                "schedule starts as constructed, from the restored learning rates)"
            )
            skip.add(name)
        else:
            sd = saved.get("state_dict") if isinstance(saved, Mapping) else None
            then = sd.get("base_lrs") if isinstance(sd, Mapping) else None
            opt = getattr(sched, "optimizer", None)
            now = len(opt.param_groups) if isinstance(opt, torch.optim.Optimizer) else None
            if isinstance(then, list) and now is not None and len(then) != now:
                report.refused.append(
                    f"{label}: the checkpoint's schedule covers {len(then)} param group(s), the "
                    f"optimizer has {now}; not loaded (the schedule starts as constructed)"
                )
                skip.add(name)
    return skip


def _check_objects(ts: TrainState, state: Mapping[str, Any], report: MismatchReport) -> None:
    saved = state.get("objects") or {}
    for name, obj in ts.objects.items():
        if not isinstance(saved, Mapping) or name not in saved:
            report.refused.append(f"TrainState({name}=...) ({type(obj).__name__}): not in the checkpoint (left as is)")


@contextlib.contextmanager
def _user_errors(where: str, what: str, saved: Any) -> Iterator[None]:
    """An exception from a ``load_state_dict`` (the user's code or torch's) is a mismatch between
    today's object and the checkpoint, never damage: raise StateMismatchError, chained."""
    try:
        yield
    except StateMismatchError:
        raise
    except Exception as e:
        key = f" (key {e.args[0]!r})" if isinstance(e, KeyError) and e.args else ""
        keys = f"; the checkpoint holds keys {sorted(map(str, saved))[:12]}" if isinstance(saved, Mapping) else ""
        raise StateMismatchError(
            f"{where}: {what}.load_state_dict raised {type(e).__name__}: {e}{key}{keys}. The "
            "checkpoint is intact (nothing was marked); the object no longer accepts the saved "
            "state: was its code changed since the save? Objects restored before it hold the "
            "checkpoint's values."
        ) from e


class CheckpointSource(Protocol):
    """What ``restore_state`` reads from: the verified files of one checkpoint
    (:class:`ckptguard.persist.reader.CheckpointReader` is one)."""

    @property
    def where(self) -> str: ...

    def has(self, fname: str) -> bool: ...

    def json(self, fname: str) -> Any: ...

    def tensor_table(self, fname: str) -> dict[str, dict[str, Any]]: ...

    def tensors(
        self, fname: str, *, targets: Mapping[str, torch.Tensor] | None = None, names: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]: ...


ModelParts = tuple[dict[str, torch.Tensor], dict[str, str], dict[str, dict[str, Any]]]


def restore_state(
    ts: TrainState, reader: CheckpointSource, *, strict: bool = True, per_rank: Mapping[str, Any] | None = None
) -> MismatchReport:
    """Load a verified checkpoint into ``ts``. Raises StateMismatchError when ``strict``.

    Everything that can mismatch is checked before any live object is touched. ``per_rank``:
    entries of ``state.json`` that one rank of a distributed run holds for itself (its RNG and
    data position, from its rank file); each replaces the shared entry, and a key mapped to None
    drops it.
    """
    where = reader.where
    state = _read_state(reader, per_rank)
    extra_tensors = reader.tensors(EXTRA_FILE) if reader.has(EXTRA_FILE) else {}
    report, model_parts = MismatchReport(), None
    if ts.model is not None:
        tensors, actual, _other = model_state_dict(ts.model)
        table = reader.tensor_table(MODEL_FILE)
        report, model_parts = compare_model(table, tensors), (tensors, actual, table)
    check_optimizers(ts.model, ts.optimizers, state, report, where)
    skip_schedulers = _check_schedulers(ts, state, report)
    _check_objects(ts, state, report)
    if strict and not report.clean:
        raise mismatch_error(where, report)
    dataset_check(ts.sampler, state, where, strict=strict)  # a changed dataset: raises when strict (else the sampler warns)

    if ts.model is not None and model_parts is not None:
        _load_model(ts.model, reader, state, model_parts, report, extra_tensors)
    if ts.optimizers and "optimizers" in state:
        targets = optimizer_targets(ts.optimizers) if report.clean else None  # read into existing state
        opt_tensors = reader.tensors(OPTIM_FILE, targets=targets) if reader.has(OPTIM_FILE) else {}
        load_optimizers(ts.model, ts.optimizers, state["optimizers"], opt_tensors, report, where, strict=strict)
    _load_objects(ts, state, extra_tensors, skip_schedulers, where)
    _load_position(ts, state, report, where)
    return report


def _read_state(reader: CheckpointSource, per_rank: Mapping[str, Any] | None) -> dict[str, Any]:
    """``state.json``, with this rank's own entries in place of the shared ones."""
    state = reader.json("state.json")
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{reader.where}/state.json must hold an object.", path=reader.where)
    for key, value in (per_rank or {}).items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    return state


def _load_model(
    model: nn.Module, reader: CheckpointSource, state: Mapping[str, Any], parts: ModelParts,
    report: MismatchReport, extra_tensors: Mapping[str, torch.Tensor],
) -> None:
    """Read the model's tensors in place; what could not be read in place goes through
    ``load_state_dict`` (with the non-tensor entries)."""
    where = reader.where
    tensors, actual, table = parts
    bad = {k for k, *_ in report.reshaped}
    names = [k for k in table if k in tensors and k not in bad]
    loaded = reader.tensors(MODEL_FILE, targets=tensors, names=names)
    leftovers = {actual[k]: t for k, t in loaded.items() if t.data_ptr() != tensors[k].data_ptr()}
    if "model_extra" in state:
        for k, v in decode(state["model_extra"], extra_tensors, f"{where} model_extra").items():
            if k in actual:
                leftovers[actual[k]] = v
    if leftovers:
        with torch.no_grad(), _user_errors(where, "the model", leftovers):
            unwrap_model(model).load_state_dict(leftovers, strict=False)
    # A checkpoint holds no gradients: the restored model has none, as in a fresh process.
    # (An in-process restore, e.g. a LossGuard rollback, would otherwise add the abandoned
    # batches' gradients to the next accumulation.)
    for p in unwrap_model(model).parameters():
        p.grad = None


def _load_objects(
    ts: TrainState, state: Mapping[str, Any], extra_tensors: Mapping[str, torch.Tensor], skip_schedulers: set[str], where: str
) -> None:
    """Schedulers, the scaler, the user's own objects and ``extra``."""
    for name, sched in ts.schedulers.items():
        saved = (state.get("schedulers") or {}).get(name)
        if saved is None or name in skip_schedulers:
            continue
        sd = decode(saved["state_dict"], extra_tensors, f"{where} scheduler")
        with _user_errors(where, _sched_label(name, sched), sd):
            sched.load_state_dict(sd)
    if ts.scaler is not None and state.get("scaler"):
        sd = decode(state["scaler"], extra_tensors, f"{where} scaler")
        with _user_errors(where, f"the scaler ({type(ts.scaler).__name__})", sd):
            ts.scaler.load_state_dict(sd)
    for name, obj in ts.objects.items():
        saved = (state.get("objects") or {}).get(name)
        if saved is None:
            continue
        sd = decode(saved, extra_tensors, f"{where} {name}")
        with _user_errors(where, f"TrainState({name}=...) ({type(obj).__name__})", sd):
            obj.load_state_dict(sd)
    saved_extra = decode(state.get("extra", {}), extra_tensors, f"{where} extra")
    if isinstance(saved_extra, dict):
        load_into(ts.extra, saved_extra)  # the user's nested objects and tensors stay theirs


def _load_position(ts: TrainState, state: Mapping[str, Any], report: MismatchReport, where: str) -> None:
    """The data position (DataLoader or sampler) and the RNG, in the order exact resume needs."""
    mid_epoch = False
    if ts._tracker is not None and ts.dataloader is not None and "dataloader" in state:
        load_loader_state(ts._tracker, ts.dataloader, state["dataloader"], f"{where}/state.json")
    elif ts.sampler is not None:
        saved = state.get("sampler") or (state.get("dataloader") or {}).get("sampler")
        if saved is not None:
            ts.sampler.load_state_dict(saved)
            mid_epoch = ts.sampler.position > 0
    if ts.capture_rng:
        if "rng" in state:
            restore_rng(state["rng"], f"{where}/state.json")
        else:
            report.notes.append("no RNG state in the checkpoint: resume is not bit-exact")
            log.warning("%s holds no RNG state; the resumed run will not be bit-exact.", where)
    if mid_epoch and ts.sampler is not None:
        ts.sampler.expect_resume_iterator(torch.get_rng_state())


def without_model(state: TrainState) -> TrainState:
    """The TrainState minus model and optimizers (those go through DCP)."""
    ts = copy.copy(state)
    ts.model = None
    ts.optimizers = {}
    return ts
