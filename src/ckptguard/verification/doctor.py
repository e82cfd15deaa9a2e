"""``doctor``: what will go wrong when today's code resumes from a checkpoint, found before it does.

>>> report = doctor("runs/exp1/step-000040000", build_current("train.py:make_state"))
>>> report.ok            # False when any finding is an error
>>> for f in report.findings: print(f.severity, f.code, f.message)

Each check is a pure function returning findings (severity ``info`` / ``warning`` / ``error``):
storage integrity, key/shape/dtype differences, behaviour drift on the probe batch ("loads
cleanly, runs differently"), optimizer state missing for trainable parameters (and state for
parameters no longer trained), optimizer and scheduler hyper-parameters the restore would
silently override (with the LR at the saved step under both), missing RNG state, the dataset the
data position counts over (recorded vs today's: length, content fingerprint or version), environment
drift (git commit and changed files, library versions, format version), and config drift (today's
config against the checkpoint's ``config.yaml``, key by key). Nothing is modified: the
current objects are only read; the checkpoint's weights go into a CPU copy of the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ckptguard.capture.configdrift import config_diff
from ckptguard.capture.data_identity import dataset_change, saved_identity
from ckptguard.capture.environment import collect_environment, git_output
from ckptguard.capture.mismatch import compare_model, optimizer_plan, optimizer_structure
from ckptguard.capture.model_keys import param_names
from ckptguard.capture.state import (
    EXTRA_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    TrainState,
    model_state_dict,
)
from ckptguard.errors import CheckpointError, CheckpointNotFoundError
from ckptguard.format.codec import ShapeOnly, decode
from ckptguard.format.manifest import FORMAT_VERSION, MANIFEST
from ckptguard.format.safejson import yaml_loads
from ckptguard.persist.reader import CheckpointReader, verify_files
from ckptguard.run.catalog import read_manifest, read_status
from ckptguard.storage.base import join
from ckptguard.verification.hparams import lr_at_step, optimizer_hparam_diffs, scheduler_diffs
from ckptguard.verification.probe import compare_probe, load_probe, run_probe, summarize
from ckptguard.verification.verify import resolve_target

__all__ = ["DoctorReport", "Finding", "build_current", "doctor", "load_factory"]

SEVERITIES = ("info", "warning", "error")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing the doctor noticed. ``code`` is stable (``keys.missing``, ``behaviour.drift``...)."""

    severity: str
    code: str
    message: str
    details: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_json(self) -> dict[str, Any]:
        return {"severity": self.severity, "code": self.code, "message": self.message, "details": list(self.details)}


@dataclasses.dataclass(frozen=True)
class DoctorReport:
    checkpoint: str
    step: int
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def to_json(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "step": self.step, "ok": self.ok,
                "findings": [f.to_json() for f in self.findings]}


# ---- the current code's objects ------------------------------------------------------------------


def _import_module(name: str) -> Any:
    """Import ``name`` as ``python -c`` would: the current directory first on the path (the
    ``ckptguard`` console script does not put it there); the path is restored afterwards."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def load_factory(spec: str) -> Callable[[], Any]:
    """``module:factory`` or ``path/to/file.py:factory`` -> the factory callable."""
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr:
        raise CheckpointError(f"--model {spec!r}: expected 'module:factory' or 'path/file.py:factory'.")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise CheckpointNotFoundError(f"--model {spec!r}: {path} does not exist.")
            folder = str(path.resolve().parent)
            if folder not in sys.path:  # its sibling modules import as under 'python file.py'
                sys.path.insert(0, folder)
            unique = f"_ckptguard_factory_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(unique, path)
            assert loader is not None and loader.loader is not None
            module = importlib.util.module_from_spec(loader)
            sys.modules[unique] = module
            loader.loader.exec_module(module)
        else:
            module = _import_module(mod_name)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"--model {spec!r}: cannot import {mod_name!r} ({type(e).__name__}: {e}). "
                              f"Looked in the current directory ({os.getcwd()}) and on sys.path; pass a file "
                              "(path/to/train.py:factory) or set PYTHONPATH to the module's folder.") from e
    factory: object = getattr(module, attr, None)
    if not callable(factory):
        raise CheckpointError(f"--model {spec!r}: {mod_name} has no callable {attr!r}.")
    return factory


def build_current(spec_or_factory: str | Callable[[], Any]) -> TrainState:
    """Call the factory; a bare ``nn.Module`` becomes ``TrainState(model=...)``."""
    factory = load_factory(spec_or_factory) if isinstance(spec_or_factory, str) else spec_or_factory
    try:
        obj = factory()
    except Exception as e:
        raise CheckpointError(f"The model factory {getattr(factory, '__name__', factory)!r} raised {type(e).__name__}: {e}") from e
    if isinstance(obj, TrainState):
        return obj
    if isinstance(obj, nn.Module):
        return TrainState(model=obj)
    raise CheckpointError(f"The factory returned {type(obj).__name__}; it must return an nn.Module or a ckptguard.TrainState.")


# ---- checks --------------------------------------------------------------------------------------


def check_integrity(storage: Any, name: str, manifest: Mapping[str, Any]) -> list[Finding]:
    out = [Finding("error", "storage.corrupt", f"{fname}: {problem}") for fname, problem in verify_files(storage, name, manifest)]
    status = read_status(storage, name) or {}
    if status.get("status") in ("failed", "corrupt"):
        out.append(Finding("error", f"status.{status['status']}", f"marked {status['status']} after the save: {status.get('detail', '')}"))
    return out


def check_keys(manifest: Mapping[str, Any], model: nn.Module) -> list[Finding]:
    table = manifest["files"].get(MODEL_FILE, {}).get("tensors", {})
    tensors, _, _ = model_state_dict(model)
    rep = compare_model(table, tensors)
    out = []
    renamed = dict(rep.renames)
    if rep.unexpected:
        out.append(Finding("error", "keys.unexpected", f"{len(rep.unexpected)} tensor(s) in the checkpoint have no place in the model",
                           tuple(f"{k}{'  (likely renamed to ' + repr(renamed[k]) + ')' if k in renamed else ''}" for k in rep.unexpected)))
    if rep.missing:
        out.append(Finding("error", "keys.missing", f"{len(rep.missing)} model tensor(s) are not in the checkpoint", tuple(rep.missing)))
    if rep.renames:
        out.append(Finding("error", "keys.renamed", "likely renames (same shape, similar name): load with a key map",
                           tuple(f"{a} -> {b}" for a, b in rep.renames)))
    if rep.reshaped:
        out.append(Finding("error", "keys.reshaped", f"{len(rep.reshaped)} tensor(s) changed shape",
                           tuple(f"{k}: checkpoint {tuple(a)}, model {tuple(b)}" for k, a, b in rep.reshaped)))
    if rep.retyped:
        out.append(Finding("warning", "keys.dtype", f"{len(rep.retyped)} tensor(s) changed dtype",
                           tuple(f"{k}: checkpoint {a}, model {b}" for k, a, b in rep.retyped)))
    return out


def check_behaviour(storage: Any, reader: CheckpointReader, manifest: Mapping[str, Any], model: nn.Module) -> list[Finding]:
    from ckptguard.verification.behaviour import cpu_template, load_into

    recorded = manifest.get("probe")
    if not recorded:
        return [Finding("info", "behaviour.unchecked", "no probe output recorded (pass probe= to CheckpointManager): behaviour drift cannot be checked")]
    try:
        inputs = load_probe(storage, recorded.get("file_xxh3_128"))
        if inputs is None:
            return [Finding("warning", "behaviour.unchecked", f"{storage.describe('probe.safetensors')} is missing: behaviour drift cannot be checked")]
        template = cpu_template(model)
        load_into(template, reader)
        got = summarize(run_probe(template, inputs), device="cpu")
    except CheckpointError as e:
        return [Finding("warning", "behaviour.unchecked", f"probe not run: {e}")]
    except Exception as e:  # noqa: BLE001 - the current code may not even run on the saved weights
        return [Finding("error", "behaviour.drift", f"the current code fails on the probe with the checkpoint's weights: {type(e).__name__}: {e}")]
    ok, why = compare_probe(recorded, got)
    if ok:
        return []
    return [Finding("error", "behaviour.drift",
                    "loads cleanly, runs differently: with the checkpoint's weights the current code gives another output on the probe batch",
                    (why, f"recorded hash {recorded.get('hash')}, now {got['hash']}"))]


def _saved_entries(objs: Mapping[str, Any], saved: Mapping[str, Any], kind: str, consequence: str,
                   out: list[Finding]) -> Iterator[tuple[str, Any, Mapping[str, Any]]]:
    """(label, current object, saved entry) per named object; a finding for each one not saved."""
    for name, obj in objs.items():
        label = f"{kind} {name!r}" if name else kind
        entry = saved.get(name)
        if not isinstance(entry, Mapping):
            out.append(Finding("warning", f"{kind}.absent", f"{label} has no state in the checkpoint: {consequence}"))
            continue
        yield label, obj, entry


def check_optimizer_state(ts: TrainState, state: Mapping[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    for label, opt, entry in _saved_entries(ts.optimizers, state.get("optimizers") or {}, "optimizer", "it restarts cold", out):
        plan = optimizer_plan(ts.model, opt, entry, optimizer_structure(entry), label)
        if plan.new:
            out.append(Finding("error", "optimizer.cold_params",
                               f"{label}: {len(plan.new)} trainable parameter(s) have no saved state (newly unfrozen?): "
                               "strict restore fails; restore(strict=False) starts them cold while the rest is warm", tuple(plan.new)))
        if plan.unstepped:
            out.append(Finding("warning", "optimizer.cold_params",
                               f"{label}: {len(plan.unstepped)} trainable parameter(s) had no optimizer state at the save (frozen then?): "
                               "their Adam moments start at zero", tuple(plan.unstepped)))
        if plan.dropped:
            out.append(Finding("warning", "optimizer.orphan_state",
                               f"{label}: saved state for {len(plan.dropped)} parameter(s) the optimizer no longer trains is dropped", tuple(plan.dropped)))
        frozen = _frozen_with_state(ts, opt, plan)
        if frozen:
            out.append(Finding("warning", "optimizer.frozen_with_state",
                               f"{label}: {len(frozen)} parameter(s) with saved state are frozen now (requires_grad=False)", tuple(frozen)))
        cls = entry.get("class")
        if cls and cls != type(opt).__name__:
            out.append(Finding("error", "optimizer.class", f"{label}: checkpoint holds {cls} state, the current code uses {type(opt).__name__}"))
        sd = entry.get("state_dict")
        groups = decode(sd.get("param_groups", []) if isinstance(sd, Mapping) else [], ShapeOnly(), f"{label} param_groups")
        diffs = optimizer_hparam_diffs({"param_groups": groups}, opt, plan.groups)
        if diffs:
            out.append(Finding("warning", "optimizer.hparams",
                               f"{label}: hyper-parameters differ; restoring silently replaces the current values with the checkpoint's",
                               tuple(f"group {g} {k}: checkpoint {a}, current code {b}" for g, k, a, b in diffs)))
    return out


def _frozen_with_state(ts: TrainState, opt: Any, plan: Any) -> list[str]:
    names = param_names(ts.model, opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    return [names[i] or f"param {i}" for i in plan.mapping if not params[i].requires_grad]


def check_schedulers(ts: TrainState, state: Mapping[str, Any], extra: Mapping[str, Any]) -> list[Finding]:
    saved = state.get("schedulers") or {}
    out: list[Finding] = []
    for label, sched, entry in _saved_entries(ts.schedulers, saved, "scheduler", "it restarts from step 0", out):
        if entry.get("class") != type(sched).__name__:
            out.append(Finding("warning", "scheduler.class", f"{label}: checkpoint has {entry.get('class')}, the current code {type(sched).__name__}"))
        sd = decode(entry.get("state_dict"), extra, f"{label} state")
        if not isinstance(sd, Mapping):
            continue
        diffs = scheduler_diffs(sd, sched)
        lrs = lr_at_step(sd, sched)
        details = [f"{k}: checkpoint {a}, current code {b}" for k, a, b in diffs]
        lr_differs = lrs is not None and any(abs(a - b) > 1e-12 * max(abs(a), abs(b), 1e-30) for a, b in zip(*lrs))
        if lrs is not None and (lr_differs or diffs):
            ratio = [f"x{b / a:.3g}" for a, b in zip(*lrs) if a]
            details.append(f"LR at the saved step {sd.get('last_epoch')}: checkpoint {_fmt_lrs(lrs[0])}, current code {_fmt_lrs(lrs[1])}"
                           + (f" ({', '.join(ratio)})" if lr_differs and ratio else ""))
        if diffs or lr_differs:
            out.append(Finding("warning", "scheduler.changed",
                               f"{label}: the schedule in the current code differs; restoring silently keeps the checkpoint's schedule",
                               tuple(details)))
    extra_saved = set(saved) - set(ts.schedulers)
    if extra_saved and ts.model is not None:  # without today's objects (no --model) nothing is compared
        names = ", ".join("the scheduler (scheduler=)" if n == "" else repr(n) for n in sorted(extra_saved))
        out.append(Finding("info", "scheduler.unused", f"scheduler state in the checkpoint that the current code does not restore: {names}"))
    return out


def _fmt_lrs(lrs: Any) -> str:
    return "[" + ", ".join(f"{x:.6g}" for x in lrs) + "]"


def check_rng(ts: TrainState, state: Mapping[str, Any]) -> list[Finding]:
    if "rng" in state:
        return []
    return [Finding("warning", "rng.missing", "no RNG state in the checkpoint: dropout and shuffling will not continue as they would have; the resume is not bit-exact")]


def check_data(ts: TrainState, state: Mapping[str, Any]) -> list[Finding]:
    """The dataset the saved data position counts over, against today's (a factory returning a
    TrainState with ``dataloader=`` or ``sampler=``); without today's, what was recorded."""
    loader = state.get("dataloader")
    saved_state = loader.get("sampler") if isinstance(loader, Mapping) else state.get("sampler")
    if not isinstance(saved_state, Mapping):
        return []
    try:
        saved = saved_identity(saved_state)
    except ValueError as e:
        return [Finding("warning", "data.unreadable", f"the recorded dataset identity cannot be read: {e}")]
    pos = f"epoch {saved_state.get('epoch')}, sample {saved_state.get('start')}"
    if saved is None:
        return [Finding("info", "data.unrecorded", f"the data position ({pos}) was saved without a dataset identity "
                        f"(an older ckptguard): only the length ({saved_state.get('dataset_len')}) is compared on resume")]
    if ts.sampler is None:
        return [Finding("info", "data.recorded", f"the data position ({pos}) counts over {saved.dataset or 'a dataset'}: "
                        f"{saved.describe()}; a factory returning TrainState(dataloader=...) compares it with today's dataset")]
    now = ts.sampler.identity()
    change = dataset_change(saved, now)
    if change is None:
        return []
    return [Finding("error", "data.changed",
                    f"the dataset changed since the save ({change}): the saved position ({pos}) counts over the old "
                    "data; restore(strict=True) raises DatasetChangedError, restore(strict=False) resumes at the same "
                    "position in the new order (samples of this epoch may repeat or be skipped)",
                    (f"saved: {saved.describe()}", f"today: {now.describe()}"))]


def check_environment(manifest: Mapping[str, Any], now: Mapping[str, Any], cwd: str | None = None) -> list[Finding]:
    then = manifest.get("environment") or {}
    out = []
    g_then, g_now = then.get("git") or {}, now.get("git") or {}
    if g_then.get("commit") and g_now.get("commit") and g_then["commit"] != g_now["commit"]:
        changed = git_output(["diff", "--name-only", g_then["commit"]], cwd or os.getcwd())  # vs the work tree
        files = tuple((changed or "").split()) or ("(the saved commit is not in this repository)",)
        out.append(Finding("info", "env.git", f"code changed since the save: commit {g_then['commit'][:12]} -> {g_now['commit'][:12]}", files[:50]))
    if g_then.get("dirty") and g_then != g_now:
        out.append(Finding("info", "env.git_dirty", "the checkpoint was written from uncommitted changes", tuple(g_then.get("changed_files") or ())))
    for key, sev in (("torch", "warning"), ("python", "info"), ("numpy", "info"), ("ckptguard", "info")):
        if then.get(key) and now.get(key) and then[key] != now[key]:
            out.append(Finding(sev, f"env.{key}", f"{key} {then[key]} at the save, {now[key]} now"))
    version = manifest.get("format_version")
    if isinstance(version, int) and version != FORMAT_VERSION:
        out.append(Finding("info", "env.format", f"checkpoint format version {version}, this ckptguard writes {FORMAT_VERSION}"))
    return out


def check_config(reader: CheckpointReader, today: Any, source: str) -> list[Finding]:
    """Today's config against the checkpoint's ``config.yaml``, key by key."""
    if today is None:
        return [Finding("info", "config.unchecked", "no current config given (--config today.yaml, or a factory "
                        "returning TrainState(config=...)): config drift not checked")]
    if not reader.has("config.yaml"):
        return [Finding("info", "config.unrecorded", "the checkpoint stored no config.yaml: today's config cannot be compared")]
    try:
        saved = yaml_loads(reader.blob("config.yaml"))  # depth-limited, no aliases: the file is untrusted
    except (CheckpointError, ValueError) as e:
        return [Finding("warning", "config.unreadable", f"config.yaml cannot be read: {e}")]
    changes = config_diff(saved, today)
    if not changes:
        return []
    return [Finding("warning", "config.changed",
                    f"{len(changes)} config key(s) differ between the checkpoint's config.yaml and {source} "
                    "(the config is not restored: the optimizer's and scheduler's values come from the "
                    "checkpoint, anything your code builds from the config uses today's values)",
                    tuple(str(c) for c in changes))]


# ---- the whole examination -----------------------------------------------------------------------


def doctor(
    ckpt: str | os.PathLike[str],
    current: TrainState | nn.Module | None,
    *,
    cwd: str | None = None,
    storage_options: dict[str, Any] | None = None,
    environment: Mapping[str, Any] | None = None,
    config: Any = None,
    config_source: str = "today's config",
) -> DoctorReport:
    """Examine ``ckpt`` (a checkpoint, or a run: its newest) against the current objects.

    ``config``: today's config (default: the TrainState's ``config``), compared key by key.
    """
    storage, names = resolve_target(ckpt, storage_options)
    if not names:
        raise CheckpointNotFoundError(f"No checkpoint in {storage.describe('')}.")
    committed = [n for n in sorted(names) if storage.exists(join(n, MANIFEST))] or sorted(names)
    name = committed[-1]
    manifest = read_manifest(storage, name)
    ts = current if isinstance(current, TrainState) else TrainState(model=current) if current is not None else TrainState()
    findings = check_integrity(storage, name, manifest)
    broken = {f.message.split(":")[0] for f in findings if f.code == "storage.corrupt"}
    reader = CheckpointReader(storage, name, manifest)
    state: Mapping[str, Any] = {}
    if "state.json" not in broken:
        state = reader.json("state.json")
    info = manifest.get("distributed")
    sharded = not reader.has(MODEL_FILE) and isinstance(info, dict) and info.get("mode") == "dcp"
    if sharded:
        findings.append(Finding(
            "warning", "sharded.unchecked",
            "a sharded (FSDP2/DCP) checkpoint: model keys and shapes, the probe and the optimizer state are not "
            "checked by doctor yet; export the weights ('ckptguard export CKPT -o model.safetensors') and load "
            "them into your model (load_state_dict reports missing and unexpected keys)",
        ))
    elif ts.model is not None:
        key_findings = check_keys(manifest, ts.model)
        findings += key_findings
        if MODEL_FILE in broken:
            findings.append(Finding("info", "behaviour.unchecked", "model.safetensors is corrupt: probe not run"))
        elif any(f.severity == "error" for f in key_findings):
            findings.append(Finding("info", "behaviour.unchecked", "keys or shapes differ: fix them (or map the renames) first, then the probe output is compared"))
        else:
            findings += check_behaviour(storage, reader, manifest, ts.model)
    if state:
        if OPTIM_FILE not in broken and not sharded:
            findings += check_optimizer_state(ts, state)
        extra = reader.tensors(EXTRA_FILE) if reader.has(EXTRA_FILE) and EXTRA_FILE not in broken else {}
        findings += check_schedulers(ts, state, extra)
        findings += check_rng(ts, state)
        findings += check_data(ts, state)
    if config is None and ts.config is not None:
        config, config_source = ts.config, "the factory's TrainState(config=...)"
    if "config.yaml" not in broken:
        findings += check_config(reader, config, config_source)
    findings += check_environment(manifest, environment if environment is not None else collect_environment(cwd), cwd)
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    findings.sort(key=lambda f: order[f.severity])
    return DoctorReport(storage.describe(name), int(manifest["step"]), tuple(findings))
