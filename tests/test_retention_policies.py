"""Retention policies and invariants: unit tests, property-based tests, and real manager runs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptguard as cg
import trainlib
from ckptguard.errors import StorageError
from ckptguard.policies.pins import (
    foreign_protection,
    lineage_protection,
    plan_own_lineage,
    run_id_of,
)
from ckptguard.policies.retention import (
    Decision,
    KeepBeforeConfigChange,
    KeepLast,
    KeepPhased,
    budget_overrun,
    plan_retention,
)
from ckptguard.run.catalog import CheckpointInfo
from ckptguard.storage.local import LocalStorage


def info(step: int, *, valid: bool = True, metrics: dict[str, Any] | None = None, config: str | None = "a",
         size: int = 100, run_id: str | None = "r1") -> CheckpointInfo:
    return CheckpointInfo(
        step=step, name=f"step-{step:09d}", path=f"/x/step-{step:09d}", valid=valid,
        metrics=metrics or {}, size_bytes=size, created=None, status="committed" if valid else "invalid",
        problems=() if valid else ("broken",), manifest={"config_hash": config, "run_id": run_id},
    )


def kept(decisions: list[Decision]) -> list[int]:
    return [d.step for d in decisions if d.keep]


# ---- single policies ------------------------------------------------------------------------


def test_keep_last_is_a_ring_buffer_of_valid_checkpoints() -> None:
    ckpts = [info(s) for s in (10, 20, 30, 40)] + [info(50, valid=False)]
    d = plan_retention(ckpts, cg.Retention(keep_last=2))
    assert kept(d) == [30, 40]
    assert {x.step: x.reasons for x in d}[50] == ("not valid: broken",)
    assert "last 2" in {x.step: x.reasons for x in d}[30]


def test_keep_best_names_the_metric_and_value() -> None:
    ckpts = [info(s, metrics={"val_loss": v}) for s, v in ((1, 0.9), (2, 0.41), (3, 0.7), (4, 0.8))]
    d = {x.step: x for x in plan_retention(ckpts, cg.Retention(keep_last=1, keep_best=1, metric="val_loss"))}
    assert [s for s, x in d.items() if x.keep] == [2, 4]
    assert "best val_loss=0.41" in d[2].reasons and d[2].protected
    d = {x.step: x for x in plan_retention(ckpts, cg.Retention(keep_last=1, keep_best=2, metric="val_loss", mode="max"))}
    assert [s for s, x in d.items() if x.keep] == [1, 4]


def test_keep_every() -> None:
    ckpts = [info(s) for s in range(100, 1100, 100)]
    assert kept(plan_retention(ckpts, cg.Retention(keep_last=1, keep_every=500))) == [500, 1000]


def test_phased_dense_head_thin_middle_dense_tail() -> None:
    ckpts = [info(s) for s in range(10, 1010, 10)]  # saves every 10 steps, 1000 total
    keep = KeepPhased(1000).keep(ckpts)
    assert all(s in keep for s in range(10, 201, 10))          # first 20%
    assert all(s in keep for s in range(860, 1001, 10))        # final 15%
    middle = sorted(s for s in keep if 200 < s <= 850)
    assert middle == [210, *range(300, 851, 100)]              # every 10th checkpoint
    assert "phase: first 20%" == keep[10] and "phase: final 15%" == keep[1000]


def test_phased_is_stable_while_deleting() -> None:
    """Applying the policy to what it kept keeps the same set (no thinning of the thinned)."""
    ckpts = [info(s) for s in range(10, 1010, 10)]
    policy = cg.Retention(phased=True, total_steps=1000, phase_head=0.1, phase_tail=0.3, phase_thin=5)
    first = kept(plan_retention(ckpts, policy))
    again = kept(plan_retention([c for c in ckpts if c.step in first], policy))
    assert first == again
    # and incrementally, as a live run applies it after each commit
    alive: list[CheckpointInfo] = []
    for c in ckpts:
        alive.append(c)
        keep = set(kept(plan_retention(alive, policy)))
        alive = [a for a in alive if a.step in keep]
    assert [a.step for a in alive] == first


def test_before_config_change() -> None:
    ckpts = [info(1, config="a"), info(2, config="a"), info(3, config="b"), info(4, config="b"),
             info(5, config=None), info(6, config="c")]
    assert KeepBeforeConfigChange().keep(ckpts) == {2: "before config change", 4: "before config change",
                                                    5: "before config change"}
    d = plan_retention(ckpts, cg.Retention(keep_last=1, keep_config_changes=True))
    assert kept(d) == [2, 4, 5, 6]


def test_byte_budget_deletes_oldest_unprotected_first_and_reports_when_unmeetable() -> None:
    ckpts = [info(s, size=100, metrics={"loss": 1.0 / s if s != 2 else 0.01}) for s in range(1, 7)]
    r = cg.Retention(keep_last=5, metric="loss", max_bytes=300)
    d = plan_retention(ckpts, r, protected={3: "pinned"})
    assert kept(d) == [2, 3, 6]  # best (2), pinned (3), newest (6); 4 and 5 fell to the budget
    assert any("over byte budget" in why for x in d if x.step == 4 for why in x.reasons)
    assert budget_overrun(d, r) == 0
    tight = cg.Retention(keep_last=5, metric="loss", max_bytes=150)
    d = plan_retention(ckpts, tight, protected={3: "pinned"})
    assert kept(d) == [2, 3, 6] and budget_overrun(d, tight) == 150


def test_order_is_by_step_number_not_name_or_time() -> None:
    steps = (999_999_999, 1_000_000_000, 5, 2_000_000_000)
    # names that sort against the steps, creation times that run backwards
    ckpts = [
        dataclasses.replace(info(s), name=f"z{i}", created=dt.datetime.fromtimestamp(1e9 - s / 1e3, dt.timezone.utc))
        for i, s in enumerate(steps)
    ]
    random.Random(0).shuffle(ckpts)
    assert kept(plan_retention(ckpts, cg.Retention(keep_last=2))) == [1_000_000_000, 2_000_000_000]


def test_real_run_prunes_by_step_whatever_the_mtimes(run_dir: Path) -> None:
    trainlib.run_training(run_dir, 10, every_steps=2)
    for i, p in enumerate(sorted(run_dir.glob("step-*"))):
        os.utime(p, (2e9 - i * 1000, 2e9 - i * 1000))  # oldest step looks newest
    s = trainlib.make_setup()
    with cg.CheckpointManager(run_dir, retention=cg.Retention(keep_last=2)) as mgr:
        mgr.restore(s["state"])
        mgr.save(12, s["state"], force=True)
    assert steps_on_disk(run_dir) == [10, 12]


def test_retention_validates_and_round_trips() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        cg.Retention(phased=True)
    with pytest.raises(ValueError, match="head"):
        cg.Retention(phased=True, total_steps=10, phase_head=0.9, phase_tail=0.2)
    with pytest.raises(ValueError, match="max_bytes"):
        cg.Retention(max_bytes=0)
    r = cg.Retention(keep_last=2, keep_best=1, metric="m", phased=True, total_steps=50, keep_config_changes=True, max_bytes=10)
    assert cg.Retention.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_lineage_protection_keeps_each_runs_newest_and_best() -> None:
    a = [info(s, run_id="A", metrics={"loss": s / 100}) for s in (10, 20, 30)]
    b = [info(s, run_id="B", metrics={"loss": 2.0 - s / 100}) for s in (5, 15)]
    prot = lineage_protection(a + b, cg.Retention(metric="loss"))
    assert prot[30] == "newest of run A" and prot[15] == "newest of run B"
    assert prot[10] == "best loss of run A"
    assert 5 not in prot  # B's best is its newest
    assert foreign_protection(a + b, {"B"}) == {s: "another run's history (run A)" for s in (10, 20, 30)}


# ---- properties -----------------------------------------------------------------------------

events = st.lists(
    st.tuples(
        st.integers(1, 3),                                 # step increment
        st.one_of(st.none(), st.floats(0, 10)),            # metric
        st.sampled_from(["a", "b", None]),                 # config hash
        st.booleans(),                                     # valid
        st.integers(1, 1000),                              # size
        st.booleans(),                                     # pinned
    ),
    min_size=1, max_size=40,
)
policies = st.builds(
    cg.Retention,
    keep_last=st.one_of(st.none(), st.integers(1, 4)),
    keep_best=st.integers(0, 2),
    metric=st.just("loss"),
    mode=st.sampled_from(["min", "max"]),
    keep_every=st.one_of(st.none(), st.integers(1, 10)),
    phased=st.booleans(),
    total_steps=st.integers(10, 120),
    keep_config_changes=st.booleans(),
    max_bytes=st.one_of(st.none(), st.integers(1, 5000)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, policies, st.integers(0, 2**32 - 1))
def test_live_run_never_breaks_an_invariant(evs: list[tuple], retention: cg.Retention, seed: int) -> None:
    """Random saves applied one at a time, as the manager does after each commit."""
    rng = random.Random(seed)
    alive: list[CheckpointInfo] = []
    pins: set[int] = set()
    step = 0
    resumed_from = None
    for inc, metric, config, valid, size, pinned in evs:
        step += inc
        c = info(step, valid=valid, config=config, size=size, metrics={} if metric is None else {"loss": metric})
        alive.append(c)
        if pinned:
            pins.add(step)
        if resumed_from is None and valid and rng.random() < 0.2:
            resumed_from = step
        protected = {s: "pinned" for s in pins} | ({resumed_from: "resumed from"} if resumed_from else {})
        shuffled = alive[:]
        rng.shuffle(shuffled)  # order of listing must not matter
        decisions = plan_retention(shuffled, retention, protected=protected)
        assert [d.step for d in decisions] == sorted(d.step for d in decisions)
        keep = {d.step for d in decisions if d.keep}
        valid_now = [a for a in alive if a.valid]
        if valid_now:
            assert valid_now[-1].step in keep, "newest valid deleted"
        best = retention.best(alive)
        if best is not None:
            assert best.step in keep, "best deleted"
        assert {s for s in pins if s in {a.step for a in alive}} <= keep, "pinned deleted"
        if resumed_from is not None:
            assert resumed_from in keep, "resumed-from deleted"
        if retention.max_bytes is not None and budget_overrun(decisions, retention):
            assert all(d.protected for d in decisions if d.keep)
        alive = [a for a in alive if a.step in keep]


@settings(max_examples=100, deadline=None)
@given(events, policies, st.lists(st.sampled_from(["A", "B", None]), min_size=40, max_size=40))
def test_a_manager_never_deletes_another_lineages_checkpoints(evs: list[tuple], retention: cg.Retention, owners: list) -> None:
    ckpts, step = [], 0
    for (inc, metric, config, valid, size, _), owner in zip(evs, owners):
        step += inc
        ckpts.append(info(step, valid=valid, config=config, size=size, run_id=owner,
                          metrics={} if metric is None else {"loss": metric}))
    decisions = plan_own_lineage(ckpts, retention, {"A"}, {})
    assert [d.step for d in decisions] == [c.step for c in ckpts]
    for c, d in zip(ckpts, decisions):
        if run_id_of(c) != "A":
            assert d.keep and d.protected


# ---- a real manager -------------------------------------------------------------------------


def steps_on_disk(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step-*") if (p / "MANIFEST.json").exists())


def test_manager_keeps_resumed_from_and_best_and_pins(run_dir: Path, async_save: bool) -> None:
    r = cg.Retention(keep_last=2, keep_best=1, metric="loss")
    trainlib.run_training(run_dir, 12, stop_at=6, every_steps=2, async_save=async_save, manager_kwargs={"retention": r})
    resumed = steps_on_disk(run_dir)[-1]
    mgr = cg.CheckpointManager(run_dir)
    mgr.pin(steps_on_disk(run_dir)[0], note="keep me")
    first = steps_on_disk(run_dir)[0]
    mgr.close()
    trainlib.run_training(run_dir, 24, every_steps=2, async_save=async_save, manager_kwargs={"retention": r})
    on_disk = steps_on_disk(run_dir)
    assert {first, resumed, 22, 24} <= set(on_disk)
    assert len(on_disk) <= 5  # last 2 + best + resumed-from + pinned
    mgr = cg.CheckpointManager(run_dir, retention=r)
    assert mgr.restore(trainlib.make_setup()["state"]) == 24  # continue the lineage, then plan
    decisions = {d.step: d for d in mgr.plan_retention()}
    assert decisions[first].keep and "pinned: keep me" in decisions[first].reasons
    assert decisions[24].keep and "resumed from" in decisions[24].reasons
    assert any(why.startswith("best loss=") for d in decisions.values() for why in d.reasons)
    assert mgr.unpin(first) and not mgr.unpin(first)
    mgr.close()


class RecordingStorage(LocalStorage):
    """Real local storage that logs renames and can fail the commit of one step."""

    def __init__(self, root: Path, fail_step: int | None = None) -> None:
        super().__init__(root)
        self.fail_step = fail_step
        self.renames: list[tuple[str, str]] = []

    def create(self, path: str):  # type: ignore[no-untyped-def]
        if self.fail_step is not None and path.endswith("MANIFEST.json") and f"step-{self.fail_step:09d}" in path:
            raise StorageError(f"injected failure writing {path}")
        return super().create(path)

    def rename_dir(self, src: str, dst: str) -> None:
        self.renames.append((src, dst))
        super().rename_dir(src, dst)


def test_deletion_happens_only_after_the_new_checkpoint_is_committed(run_dir: Path, async_save: bool) -> None:
    store = RecordingStorage(run_dir)
    trainlib.run_training(store, 6, every_steps=2, async_save=async_save, manager_kwargs={"retention": cg.Retention(keep_last=1)})
    assert steps_on_disk(run_dir) == [6]
    commit = store.renames.index(next(r for r in store.renames if r[1] == "step-000000004"))
    delete = store.renames.index(next(r for r in store.renames if r[0] == "step-000000002"))
    assert commit < delete  # step 2 went to the trash only after step 4 was in place
    failing = RecordingStorage(run_dir, fail_step=8)
    s = trainlib.make_setup()
    mgr = cg.CheckpointManager(failing, retention=cg.Retention(keep_last=1), async_save=async_save)
    mgr.restore(s["state"])
    with pytest.raises(cg.CheckpointError):
        mgr.save(8, s["state"], force=True)
        mgr.wait()
    mgr.close()
    assert steps_on_disk(run_dir) == [6]  # the failed save deleted nothing


def test_fresh_second_run_does_not_delete_the_first_runs_history(run_dir: Path) -> None:
    r = cg.Retention(keep_last=2)
    trainlib.run_training(run_dir, 20, every_steps=5, manager_kwargs={"retention": r})
    first = steps_on_disk(run_dir)
    assert first == [15, 20]
    # a second run that does not resume (a new experiment pointed at the same directory)
    s = trainlib.make_setup(seed=1)
    mgr = cg.CheckpointManager(run_dir, every_steps=1, retention=r)
    for step in range(1, 6):
        mgr.save(step, s["state"], metrics={"loss": 1.0})
    mgr.close()
    assert steps_on_disk(run_dir) == [4, 5, 15, 20]
    ids = {json.loads((run_dir / f"step-{x:09d}" / "MANIFEST.json").read_text())["run_id"] for x in (4, 15)}
    assert len(ids) == 2
    # ... and it cannot overwrite the first run's checkpoint at the same step either
    mgr = cg.CheckpointManager(run_dir, every_steps=1, retention=r)
    with pytest.raises(cg.CheckpointError, match="belongs to another run"):
        mgr.save(15, s["state"], force=True)
    mgr.close()
    assert steps_on_disk(run_dir) == [4, 5, 15, 20]


def test_keep_last_keeps_every_checkpoint_while_fewer_than_n_exist() -> None:
    """Issue 12 item 1: the ring buffer slice started negative, so keep_last=3 kept one."""
    for n in (3, 5):
        policy = KeepLast(n)
        assert policy.keep([info(10), info(20)]) == {10: f"last {n}", 20: f"last {n}"}
        assert kept(plan_retention([info(10), info(20)], cg.Retention(keep_last=n))) == [10, 20]
    assert sorted(KeepLast(3).keep([info(s) for s in (1, 2, 3, 4)])) == [2, 3, 4]
