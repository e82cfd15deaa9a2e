"""Save timing: every_steps / every_seconds / every="auto" (Young/Daly) and its record."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import ckptguard as cg
import trainlib
from ckptguard.policies.schedule import (
    SaveSchedule,
    observed_mtbf,
    wasted_fraction,
    young_daly_interval,
)


def test_young_daly_matches_the_perf_notes() -> None:
    assert young_daly_interval(4.2, 3 * 3600) == pytest.approx(301.2, abs=0.1)
    assert young_daly_interval(0.15, 3 * 3600) == pytest.approx(56.9, abs=0.1)
    assert wasted_fraction(301.2, 4.2, 3 * 3600) == pytest.approx(0.0279, abs=5e-4)
    assert wasted_fraction(56.9, 0.15, 3 * 3600) == pytest.approx(0.0053, abs=5e-4)
    with pytest.raises(ValueError):
        young_daly_interval(1.0, 0)


@pytest.mark.parametrize("cost,mtbf", [(0.1, 600.0), (4.2, 10800.0), (30.0, 86400.0)])
def test_young_daly_minimizes_the_waste(cost: float, mtbf: float) -> None:
    t = young_daly_interval(cost, mtbf)
    for factor in (0.5, 0.8, 1.25, 2.0):
        assert wasted_fraction(t, cost, mtbf) < wasted_fraction(t * factor, cost, mtbf)


def test_observed_mtbf_counts_unclean_sessions() -> None:
    sessions = [
        {"start": 0, "last_seen": 3600, "clean": False},
        {"start": 4000, "last_seen": 7600, "clean": False},
        {"start": 8000, "last_seen": 9800, "clean": True},
    ]
    assert observed_mtbf(sessions) == pytest.approx((3600 + 3600 + 1800) / 2)
    assert observed_mtbf(sessions[2:]) is None
    assert observed_mtbf([{"start": "x"}]) is None


def test_schedule_steps_seconds_auto() -> None:
    s = SaveSchedule(every_steps=10, last_save_time=0.0)
    assert s.due(10, now=0.0) and not s.due(11, now=1e9)
    s = SaveSchedule(every_seconds=5.0, last_save_time=0.0)
    assert not s.due(1, now=4.9) and s.due(1, now=5.0)
    s = SaveSchedule(auto=True, mtbf_seconds=3 * 3600, last_save_time=0.0)
    assert s.due(1, now=0.0)  # first save measures the cost
    s.saved(now=0.0, cost=4.2)
    assert s.auto_seconds == pytest.approx(301.2, abs=0.1)
    assert not s.due(2, now=300.0) and s.due(3, now=302.0)
    d = s.describe()
    assert d["mode"] == "auto" and d["mtbf_source"] == "given" and d["save_cost_seconds"] == 4.2
    assert SaveSchedule(auto=True).mtbf_source == "default"
    with pytest.raises(ValueError):
        SaveSchedule(mtbf_seconds=-1)


def test_manager_auto_interval_is_measured_logged_and_recorded(run_dir: Path, async_save: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="ckptguard.policies.schedule")
    trainlib.run_training(run_dir, 12, every_steps=10**6, async_save=async_save,
                          manager_kwargs={"every": "auto", "mtbf_seconds": 7200.0})
    first = json.loads((run_dir / "step-000000001" / "MANIFEST.json").read_text())
    assert first["save_interval"]["mode"] == "auto"
    record = json.loads((run_dir / "ckptguard.json").read_text())["save_interval"]
    cost = record["save_cost_seconds"]
    assert cost > 0 and record["mtbf_source"] == "given"
    assert record["auto_seconds"] == pytest.approx(math.sqrt(2 * cost * 7200.0), rel=1e-3)
    assert any("every='auto'" in r.getMessage() for r in caplog.records)
    # a tiny save cost against a 2 h MTBF: seconds between saves, so not every step saves
    assert len(list(run_dir.glob("step-*"))) < 12


def test_auto_uses_the_observed_mtbf_from_the_run_history(run_dir: Path) -> None:
    trainlib.run_training(run_dir, 4, every_steps=2)
    rec = json.loads((run_dir / "ckptguard.json").read_text())
    # two interrupted sessions of an hour each, as a crashing run would leave behind
    rec["sessions"] = [{"id": f"s{i}", "start": 0.0, "last_seen": 3600.0, "clean": False} for i in range(2)]
    (run_dir / "ckptguard.json").write_text(json.dumps(rec))
    mgr = cg.CheckpointManager(run_dir, every="auto")
    assert mgr.schedule.mtbf_source == "observed" and mgr.schedule.mtbf_seconds == pytest.approx(3600.0)
    assert mgr.schedule.save_cost is None  # the first run did not use auto: nothing to prime
    mgr.close()
    with pytest.raises(ValueError, match="auto"):
        cg.CheckpointManager(run_dir, every="often")
