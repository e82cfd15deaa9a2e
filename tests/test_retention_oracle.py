"""Retention against a reference: each policy's meaning written again from the README and the
docstrings (a few obvious lines, no code shared with ckptguard.policies.retention), compared with

- the pure planner (``plan_retention``, ``plan_own_lineage``, ``prune``'s lineage view) over many
  generated sets of checkpoints, and
- the real CheckpointManager on real (tiny) state on disk, over generated histories of saves (with
  metrics, some missing, NaN or infinite), config changes, pins and unpins, restores of an older
  step and reopenings of the run by a new manager; the kept set (and, with ``full_last``, the set
  of slimmed checkpoints) is compared after EVERY save, and at the end ``ckptguard prune`` must
  agree with the manager.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptguard as cg
from ckptguard.cli import main
from ckptguard.policies.pins import lineage_protection, plan_own_lineage
from ckptguard.policies.retention import Decision, plan_retention
from ckptguard.run.catalog import CheckpointInfo
from conftest import FULL

# ---- the reference ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ck:
    """What the reference knows of one checkpoint."""

    step: int
    valid: bool = True
    metric: Any = None  # the value of the metric "val" saved with it (absent: None)
    cfg: str | None = "a"
    size: int = 100
    run: str | None = "r1"
    every: int | None = None  # the every_steps its manifest recorded (saves by step count only)
    train: int = 0  # bytes of its training-only state (optimizer.safetensors; 0: has none)
    slimmed: bool = False  # slimmed before (then train is 0)


@dataclasses.dataclass(frozen=True)
class Pol:
    keep_last: int | None = None
    keep_best: int = 0
    metric: bool = False  # metric="val" set
    mode: str = "min"
    keep_every: int | None = None
    phased: bool = False
    total_steps: int = 100
    head: str = "0.2"  # decimal text: "first 20%" means step <= 0.2 x total, exactly
    tail: str = "0.15"
    thin: int = 10
    config_changes: bool = False
    max_bytes: int | None = None
    full_last: int | None = None

    def retention(self) -> cg.Retention:
        return cg.Retention(
            keep_last=self.keep_last, keep_best=self.keep_best, metric="val" if self.metric else None,
            mode=self.mode, keep_every=self.keep_every, phased=self.phased,
            total_steps=self.total_steps if self.phased else None, phase_head=float(self.head),
            phase_tail=float(self.tail), phase_thin=self.thin, keep_config_changes=self.config_changes,
            max_bytes=self.max_bytes, full_last=self.full_last,
        )


def score(c: Ck) -> float | None:
    """A metric counts when it is a finite number (missing, NaN, inf, text and bools do not)."""
    v = c.metric
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def ranked(cks: list[Ck], mode: str) -> list[int]:
    """Valid checkpoints with a score, best first; on a tie the newer one first."""
    scored = [c for c in cks if c.valid and score(c) is not None]
    sign = 1 if mode == "min" else -1
    return [c.step for c in sorted(scored, key=lambda c: (sign * score(c), -c.step))]  # type: ignore[operator]


def phased(valid: list[Ck], p: Pol) -> set[int]:
    """Every one in the first head and the final tail fraction of total_steps; in the middle the
    first of each bucket of thin x interval steps (interval: the every_steps the newest valid
    checkpoint recorded; without one the smallest gap between two consecutive valid
    checkpoints, 1 when there is none)."""
    steps = [c.step for c in valid]
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    interval = (valid[-1].every if valid else None) or (min(gaps) if gaps else 1)
    head_end = Fraction(p.head) * p.total_steps
    tail_start = (1 - Fraction(p.tail)) * p.total_steps
    out, buckets = set(), set()
    for s in steps:
        if s <= head_end or s > tail_start:
            out.add(s)
        elif (b := math.floor((s - head_end) / (p.thin * interval))) not in buckets:
            buckets.add(b)
            out.add(s)
    return out


def reference(cks: list[Ck], p: Pol, protected: set[int]) -> tuple[set[int], set[int]]:
    """(kept steps, protected steps): see :func:`reference_slim`."""
    kept, hard, _ = reference_slim(cks, p, protected)
    return kept, hard


def slim_steps(cks: list[Ck], kept: set[int], n: int, protected: set[int]) -> set[int]:
    """full_last=n: of the kept valid ones, those slimmed before stay slim; the others with
    training state are slim unless among the newest n kept valid ones not slimmed before or
    protected by the caller (resumed from, just saved, pinned)."""
    valid = [c for c in cks if c.step in kept and c.valid]
    newest = {c.step for c in [c for c in valid if not c.slimmed][-n:]}
    return {c.step for c in valid if c.slimmed or (c.train and c.step not in newest and c.step not in protected)}


def reference_slim(cks: list[Ck], p: Pol, protected: set[int]) -> tuple[set[int], set[int], set[int]]:
    """(kept steps, protected steps, slim steps) by the README: a checkpoint survives if a
    policy keeps it or an invariant protects it (newest valid, best, the caller's); full_last
    decides which kept ones are slim; then the byte budget (counting one to be slimmed without
    its training state) deletes the oldest ones only a policy keeps until the kept ones fit."""
    cks = sorted(cks, key=lambda c: c.step)
    valid = [c for c in cks if c.valid]
    keep: set[int] = set()
    if p.keep_last is None and not p.phased:
        keep |= {c.step for c in cks}  # no limit set: keep everything
    if p.keep_last:
        keep |= {c.step for c in valid[-p.keep_last:]}
    if p.keep_best and p.metric:
        keep |= set(ranked(cks, p.mode)[: p.keep_best])
    if p.keep_every:
        keep |= {c.step for c in valid if c.step % p.keep_every == 0}
    if p.phased:
        keep |= phased(valid, p)
    if p.config_changes:
        keep |= {a.step for a, b in zip(valid, valid[1:]) if a.cfg != b.cfg}
    hard = {c.step for c in cks if c.step in protected}
    if valid:
        hard.add(valid[-1].step)
    if p.metric and ranked(cks, p.mode):
        hard.add(ranked(cks, p.mode)[0])
    kept = keep | hard
    slim = slim_steps(cks, kept, p.full_last, protected) if p.full_last else set()
    if p.max_bytes is not None:
        size = {c.step: c.size - (c.train if c.step in slim else 0) for c in cks}
        total = sum(size[s] for s in kept)
        for c in cks:
            if total <= p.max_bytes:
                break
            if c.step in kept and c.step not in hard:
                kept.discard(c.step)
                slim.discard(c.step)
                total -= size[c.step]
    return kept, hard, slim


# ---- strategies ------------------------------------------------------------------------------

METRICS = [None, 0.5, 1.0, 1.0, 2.0, 3.25, float("nan"), float("inf"), -float("inf")]
FRACTIONS = ["0", "0.1", "0.15", "0.2", "0.25", "0.3", "0.33", "0.5"]


@st.composite
def policies(draw: st.DrawFn, *, max_steps: int, size: int) -> Pol:
    head, tail = draw(st.sampled_from(FRACTIONS)), draw(st.sampled_from(FRACTIONS))
    keep_best = draw(st.integers(0, 3))
    return Pol(
        keep_last=draw(st.none() | st.integers(1, 5)),
        keep_best=keep_best,
        metric=bool(keep_best) or draw(st.booleans()),
        mode=draw(st.sampled_from(["min", "max"])),
        keep_every=draw(st.none() | st.integers(1, max(2, max_steps // 4))),
        phased=draw(st.booleans()),
        total_steps=draw(st.integers(1, max_steps)),
        head=head,
        tail=tail if Fraction(head) + Fraction(tail) <= 1 else "0",
        thin=draw(st.integers(1, 6)),
        config_changes=draw(st.booleans()),
        max_bytes=draw(st.none() | st.integers(1, 8 * size)),
        full_last=draw(st.none() | st.integers(1, 4)),
    )


def to_info(c: Ck) -> CheckpointInfo:
    metrics = {} if c.metric is None else {"val": c.metric}
    files = {"model.safetensors": {"kind": "tensors", "size": c.size - c.train}}
    if c.train:
        files["optimizer.safetensors"] = {"kind": "tensors", "size": c.train}
    manifest = {"config_hash": c.cfg, "run_id": c.run, "save_interval": {"every_steps": c.every, "every_seconds": None}, "files": files}
    if c.slimmed:
        manifest["slimmed"] = {"dropped": ["optimizer.safetensors"], "at": 0.0, "bytes_freed": 1}
    return CheckpointInfo(
        step=c.step, name=f"step-{c.step:09d}", path=f"/r/step-{c.step:09d}", valid=c.valid, metrics=metrics,
        size_bytes=c.size, created=None, status="committed" if c.valid else "invalid",
        problems=() if c.valid else ("checksum mismatch",), manifest=manifest,
    )


@st.composite
def checkpoint_sets(draw: st.DrawFn) -> list[Ck]:
    steps = sorted(draw(st.sets(st.integers(0, 200), max_size=24)))
    out = []
    for s in steps:
        size, slimmed = draw(st.integers(0, 200)), draw(st.sampled_from([False, False, False, True]))
        train = 0 if slimmed or not size else draw(st.sampled_from([0, size // 3, size // 2 + 1, size]))
        out.append(Ck(
            s, valid=draw(st.sampled_from([True] * 6 + [False])), metric=draw(st.sampled_from(METRICS + ["nan", True])),
            cfg=draw(st.sampled_from(["a", "b", None])), size=size,
            run=draw(st.sampled_from(["r1", "r1", "r1", "r2", None])), every=draw(st.sampled_from([None, None, 3, 10])),
            train=train, slimmed=slimmed,
        ))
    return out


def slim_of(decisions: list[Decision], cks: list[Ck]) -> set[int]:
    """The slim steps of a plan, after checking each slim Decision's other fields."""
    by_step = {c.step: c for c in cks}
    for d in decisions:
        c = by_step[d.step]
        assert d.slimmed == (d.slim and c.slimmed), d
        assert d.slim_bytes == (c.train if d.slim else 0), d
        assert not d.slim or d.keep, d
    return {d.step for d in decisions if d.slim}


def kept_and_protected(decisions: list[Decision]) -> tuple[set[int], set[int]]:
    return {d.step for d in decisions if d.keep}, {d.step for d in decisions if d.keep and d.protected}


PURE = settings(max_examples=3000 if FULL else 200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- the pure planner ------------------------------------------------------------------------


@PURE
@given(checkpoint_sets(), policies(max_steps=220, size=200), st.sets(st.integers(0, 210), max_size=4))
def test_plan_retention_matches_the_reference(cks: list[Ck], p: Pol, protected: set[int]) -> None:
    decisions = plan_retention([to_info(c) for c in cks], p.retention(), protected={s: "pinned" for s in protected})
    assert [d.step for d in decisions] == [c.step for c in cks]  # one decision each, by step
    kept, hard, slim = reference_slim(cks, p, protected)
    assert kept_and_protected(decisions) == (kept, hard)
    assert slim_of(decisions, cks) == slim


@PURE
@given(checkpoint_sets(), policies(max_steps=220, size=200), st.sampled_from([{"r1"}, {"r1", None}, {"r2"}]))
def test_a_managers_plan_prunes_only_its_own_lineage(cks: list[Ck], p: Pol, own: set[str | None]) -> None:
    decisions = plan_own_lineage([to_info(c) for c in cks], p.retention(), own, {})
    mine = [c for c in cks if c.run in own]
    kept, hard, slim = reference_slim(mine, p, set())
    foreign = {c.step for c in cks if c.run not in own}
    assert kept_and_protected(decisions) == (kept | foreign, hard | foreign)
    assert {d.step for d in decisions if d.slim} == slim  # another lineage's checkpoints are never slimmed


@PURE
@given(checkpoint_sets(), policies(max_steps=220, size=200))
def test_prunes_view_keeps_every_lineages_newest_and_best(cks: list[Ck], p: Pol) -> None:
    infos = [to_info(c) for c in cks]
    decisions = plan_retention(infos, p.retention(), protected=lineage_protection(infos, p.retention()))
    lineages = {c.run for c in cks}
    protected: set[int] = set()
    if len(lineages) > 1:
        for run in lineages:
            group = [c for c in cks if c.run == run]
            valid = [c.step for c in group if c.valid]
            protected |= set(valid[-1:]) | (set(ranked(group, p.mode)[:1]) if p.metric else set())
    kept, hard, slim = reference_slim(cks, p, protected)
    assert kept_and_protected(decisions) == (kept, hard)
    assert slim_of(decisions, cks) == slim


def test_reference_examples_pin_the_meaning() -> None:
    """The reference itself on hand-checked cases (so that it cannot be wrong the same way)."""
    five = [Ck(s) for s in (10, 20, 30, 40, 50)]
    assert reference(five[:2], Pol(keep_last=3), set())[0] == {10, 20}  # issue 12 item 1
    assert reference(five, Pol(keep_last=3), set())[0] == {30, 40, 50}
    scored = [Ck(1, metric=0.3), Ck(2, metric=float("nan")), Ck(3, metric=0.3), Ck(4, metric=0.9)]
    assert reference(scored, Pol(keep_last=1, keep_best=1, metric=True), set()) == ({3, 4}, {3, 4})
    assert reference(scored, Pol(keep_last=1, metric=True, mode="max"), set()) == ({4}, {4})
    middle = [Ck(s) for s in range(10, 101, 10)]
    assert reference(middle, Pol(phased=True, total_steps=100, head="0.2", tail="0.1", thin=3), set())[0] == \
        {10, 20, 30, 50, 80, 100}  # buckets of 30 from step 20: 30 | 50 | 80; 90 is not "> 90"
    extra = [Ck(s, every=10) for s in sorted([*range(10, 1001, 10), 101])]  # one preemption save at 101
    alive: list[Ck] = []
    for c in extra:  # as a live run applies it after each save
        alive.append(c)
        kept = reference(alive, Pol(phased=True, total_steps=1000), set())[0]
        alive = [a for a in alive if a.step in kept]
    assert [a.step for a in alive if 200 < a.step <= 850] == [210, 300, 400, 500, 600, 700, 800]
    sized = [Ck(s, size=10) for s in range(1, 6)]
    assert reference(sized, Pol(max_bytes=30), {1}) == ({1, 4, 5}, {1, 5})
    assert reference(sized, Pol(max_bytes=29), {1}) == ({1, 5}, {1, 5})
    fat = [Ck(s, size=10, train=6) for s in range(1, 7)]  # full_last: the newest 2 keep their training state
    assert reference_slim(fat, Pol(full_last=2), set()) == (set(range(1, 7)), {6}, {1, 2, 3, 4})
    assert reference_slim(fat, Pol(full_last=2), {2})[2] == {1, 3, 4}  # pinned / resumed from: never slimmed
    was = [Ck(1, size=4, slimmed=True), Ck(2, size=10, train=6), Ck(3, size=4, slimmed=True), Ck(4, size=10, train=6)]
    assert reference_slim(was, Pol(full_last=2), set())[2] == {1, 3}  # slimmed stays slimmed; 2 and 4 are the newest full
    assert reference_slim(fat, Pol(full_last=1, max_bytes=30), set()) == ({1, 2, 3, 4, 5, 6}, {6}, {1, 2, 3, 4, 5})
    assert reference_slim(fat, Pol(full_last=1, max_bytes=29), set()) == ({2, 3, 4, 5, 6}, {6}, {2, 3, 4, 5})


# ---- the real manager over generated histories -------------------------------------------------

SAVE = st.tuples(st.just("save"), st.integers(1, 3), st.sampled_from(METRICS), st.sampled_from(["a", "b"]))
OPS = st.lists(
    st.one_of(SAVE, SAVE, SAVE, SAVE,
              st.tuples(st.just("pin"), st.integers(0, 99)), st.tuples(st.just("unpin"), st.integers(0, 99)),
              st.tuples(st.just("restore"), st.integers(0, 99)),
              st.tuples(st.just("reopen"), st.none() | st.integers(0, 99))),
    min_size=1, max_size=18,
)
CKPT_SIZE = 21_000  # about one tiny checkpoint (state.json holds the RNG states)


def on_disk(run: Path) -> set[int]:
    return {int(p.name[5:]) for p in run.glob("step-*") if (p / "MANIFEST.json").exists()}


def slimmed_on_disk(run: Path) -> set[int]:
    return {int(p.name[5:]) for p in run.glob("step-*") if "slimmed" in json.loads((p / "MANIFEST.json").read_text())}


def train_size(run: Path, step: int) -> int:
    """The bytes of its training-only state (what slimming drops), measured on disk."""
    return (run / f"step-{step:09d}" / "optimizer.safetensors").stat().st_size


def stored_size(run: Path, step: int) -> int:
    """The bytes of a checkpoint's files (what the budget counts), measured on disk."""
    d = run / f"step-{step:09d}"
    return sum(f.stat().st_size for f in d.iterdir() if f.name not in ("MANIFEST.json", "PINNED", "STATUS.json"))


class Run:
    """The user's side: a tiny model, a config that changes, a manager that is reopened."""

    def __init__(self, run: Path, retention: cg.Retention, async_save: bool) -> None:
        self.run, self.retention, self.async_save = run, retention, async_save
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 2)
        self.opt = torch.optim.Adam(model.parameters(), lr=0.1)
        self.state = cg.TrainState(model=model, optimizer=self.opt, config={"v": "a"})
        self.mgr = self.open()

    def open(self) -> cg.CheckpointManager:
        return cg.CheckpointManager(self.run, retention=self.retention, async_save=self.async_save)

    def save(self, step: int, metric: Any, cfg: str) -> None:
        with torch.no_grad():
            self.state.model.weight.add_(1.0)  # type: ignore[union-attr]
        for param in self.state.model.parameters():  # type: ignore[union-attr]
            param.grad = torch.ones_like(param)
        self.opt.step()  # Adam's moments: the training-only state full_last slims away
        self.state.config = {"v": cfg}
        assert self.mgr.save(step, self.state, metrics={} if metric is None else {"val": metric}, force=True)
        self.mgr.wait()


@settings(max_examples=60 if FULL else 8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(p=policies(max_steps=40, size=CKPT_SIZE), ops=OPS, use_async=st.booleans())
def test_real_manager_keeps_what_the_reference_keeps_after_every_save(
    p: Pol, ops: list[tuple[Any, ...]], use_async: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        user = Run(run_dir, p.retention(), use_async)
        assert user.mgr.restore(user.state) is None
        existing: dict[int, Ck] = {}
        pins: set[int] = set()
        pos, resumed, last_saved = 0, None, None
        # prune reads resumed_from from the run record's last session that saved (written at each
        # save, and at close() by a session that saved)
        session_saved, saved_resumed = False, None
        # After a restore of an older step, the first commit marks the checkpoints that were newer
        # than it 'superseded' (a re-save of one of those steps replaces it, mark included): a
        # plain restore() skips them and takes the newest checkpoint of the live branch.
        # restore(step=N) of a superseded N and a commit after it take N back onto the live branch.
        abandoned: set[int] = set()
        superseded: set[int] = set()
        revived: set[int] = set()
        try:
            for op in ops:
                steps = sorted(existing)
                if op[0] == "save":
                    _, gap, metric, cfg = op
                    pos += gap
                    user.save(pos, metric, cfg)
                    superseded = (superseded | abandoned) - {pos} - revived
                    abandoned, revived = set(), set()
                    pins.discard(pos)  # a re-save (after restoring an older step) replaces the checkpoint, pin included
                    existing[pos] = Ck(pos, metric=metric, cfg=cfg, size=stored_size(run_dir, pos), train=train_size(run_dir, pos))
                    last_saved, session_saved, saved_resumed = pos, True, resumed
                    protected = pins | {last_saved} | ({resumed} if resumed is not None else set())
                    kept, _, slim = reference_slim(list(existing.values()), p, protected)
                    assert on_disk(run_dir) == kept, (op, sorted(existing))
                    assert slimmed_on_disk(run_dir) == slim, (op, sorted(existing))
                    existing = {s: c for s, c in existing.items() if s in kept}
                    for s in slim - {s for s, c in existing.items() if c.slimmed}:  # what slimming left of them
                        existing[s] = dataclasses.replace(existing[s], size=stored_size(run_dir, s), train=0, slimmed=True)
                        assert existing[s].size == stored_size(run_dir, s)
                    pins &= kept
                    superseded &= kept
                elif op[0] in ("pin", "unpin") and steps:
                    step = steps[op[1] % len(steps)]
                    if op[0] == "pin":
                        user.mgr.pin(step, note="keep")
                        pins.add(step)
                    else:
                        assert user.mgr.unpin(step) == (step in pins)
                        pins.discard(step)
                elif op[0] == "restore" and steps:
                    step = steps[op[1] % len(steps)]
                    assert user.mgr.restore(user.state, step=step) == step
                    pos = resumed = last_saved = step
                    saved_resumed = step if session_saved else saved_resumed
                    abandoned, revived = {s for s in steps if s > step}, {step} & superseded
                elif op[0] == "reopen":
                    user.mgr.close()
                    user.mgr = user.open()
                    if not steps:
                        assert user.mgr.restore(user.state) is None
                        continue
                    # a plain restore() skips what a rollback abandoned and what was slimmed
                    live = [s for s in steps if s not in superseded and not existing[s].slimmed]
                    if op[1] is None and not live:  # only an abandoned branch or slimmed ones left: never None
                        with pytest.raises(cg.CheckpointError, match="superseded|slimmed"):
                            user.mgr.restore(user.state)
                        continue
                    want = live[-1] if op[1] is None else steps[op[1] % len(steps)]
                    got = user.mgr.restore(user.state) if op[1] is None else user.mgr.restore(user.state, step=want)
                    assert got == want, (sorted(superseded), steps)
                    pos = resumed = last_saved = got
                    abandoned, revived = {s for s in steps if s > got}, {got} & superseded
                    session_saved = False
                assert on_disk(run_dir) == set(existing)  # nothing but a save deletes
            # what the manager would decide now (pins and restores since its last save count)
            protected = pins | {s for s in (resumed, last_saved) if s is not None}
            decisions = user.mgr.plan_retention()
            manager_plan = {d.step for d in decisions if d.keep}
            kept, _, slim = reference_slim(list(existing.values()), p, protected)
            assert manager_plan == kept
            assert slim_of(decisions, list(existing.values())) == slim
        finally:
            user.mgr.close()
        check_prune_agrees(run_dir, p, existing, pins, saved_resumed, capsys)
        if existing and last_saved == max(existing) and saved_resumed == resumed:
            assert on_disk(run_dir) == manager_plan  # prune decided as the manager would


def check_prune_agrees(
    run_dir: Path, p: Pol, existing: dict[int, Ck], pins: set[int], resumed: int | None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ckptguard prune`` (the run's recorded policy) keeps what the reference says, with the
    protections it can know: pins and the last session's resumed-from step (not the manager's
    transient "just saved", which differs only after a restore of an older step left newer
    checkpoints behind); then one prune converges."""
    capsys.readouterr()
    if not existing and not run_dir.exists():  # no write happened: a manager creates nothing
        assert main(["prune", str(run_dir), "--dry-run", "--json"]) == 2
        assert "does not exist" in capsys.readouterr().err
        return
    assert main(["prune", str(run_dir), "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    if not existing:  # no save happened
        assert out["policy_source"] == "no recorded policy" and out["decisions"] == []
        return
    assert out["policy_source"] == "recorded policy"
    kept = {d["step"] for d in out["decisions"] if d["keep"]}
    want, _, slim = reference_slim(list(existing.values()), p, pins | ({resumed} if resumed is not None else set()))
    assert kept == want
    assert {d["step"] for d in out["decisions"] if d["slim"]} == slim
    assert main(["prune", str(run_dir), "--json"]) == 0
    capsys.readouterr()
    assert on_disk(run_dir) == kept
    assert slimmed_on_disk(run_dir) == slim
    assert main(["prune", str(run_dir), "--dry-run", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)["decisions"]
    assert all(d["keep"] and d["slimmed"] == d["slim"] for d in again)  # converged
    assert {d["step"] for d in again if d["slim"]} == slim


# ---- the README, literally ---------------------------------------------------------------------


def test_readme_retention_example_keeps_the_last_three_and_the_best(tmp_path: Path) -> None:
    """README: ``Retention(keep_last=3, keep_best=1, metric="val_loss")`` in its loop shape, with a
    save every 2 steps; the first loop logs only ``loss`` (as the README's), the second also
    ``val_loss``, best at step 6."""
    import trainlib

    val = {2: 0.9, 4: 0.8, 6: 0.1, 8: 0.7, 10: 0.6, 12: 0.5, 14: 0.5, 16: 0.4, 18: 0.3, 20: 0.35}
    for with_val in (False, True):
        run = tmp_path / f"run-{with_val}"
        s = trainlib.make_setup()
        state, loader = s["state"], s["loader"]
        mgr = cg.CheckpointManager(run, every_steps=2, async_save=True,
                                   retention=cg.Retention(keep_last=3, keep_best=1, metric="val_loss"))
        step = mgr.restore(state) or 0
        seen = []
        with mgr.preemption_guard():
            while step < 20:
                for x, y in loader:
                    loss = trainlib.train_step(s, x, y)
                    step += 1
                    metrics = {"loss": loss, **({"val_loss": val[step]} if with_val and step in val else {})}
                    mgr.save(step, state, metrics=metrics)
                    if step % 2 == 0:
                        mgr.wait()
                        seen.append(sorted(on_disk(run)))
                    if step >= 20:
                        break
        mgr.close()
        saves = list(range(2, 21, 2))
        want = []
        for i in range(len(saves)):
            keep = set(saves[max(0, i - 2) : i + 1])  # the newest three (all while fewer exist)
            if with_val:
                keep.add(min(saves[: i + 1], key=lambda s: (val[s], -s)))  # the best so far
            want.append(sorted(keep))
        assert seen == want
        assert seen[:3] == [[2], [2, 4], [2, 4, 6]]  # a ring buffer of 3 fills up first (issue 12.1)
        assert seen[-1] == ([6, 16, 18, 20] if with_val else [16, 18, 20])


def test_one_extra_save_does_not_stop_the_phased_thinning(tmp_path: Path) -> None:
    """A real run saving every 10 steps (phased over 200 steps, thin=5) with one forced save at
    step 21 in the dense head: the middle is still thinned to every 5th save; before the fix the
    smallest gap (1) made every middle save its own bucket."""
    state = cg.TrainState(model=torch.nn.Linear(2, 2))
    policy = cg.Retention(phased=True, total_steps=200, phase_head=0.2, phase_tail=0.15, phase_thin=5)
    with cg.CheckpointManager(tmp_path / "run", every_steps=10, retention=policy) as mgr:
        for step in range(1, 201):
            mgr.save(step, state, force=step == 21)
    kept = sorted(on_disk(tmp_path / "run"))
    assert kept == [10, 20, 21, 30, 40, 50, 90, 140, 180, 190, 200]  # middle: buckets of 50 from step 40
