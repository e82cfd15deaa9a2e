from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ckptguard as cg


def test_order_is_seeded_and_changes_per_epoch() -> None:
    a, b = cg.ResumableSampler(50, seed=3), cg.ResumableSampler(50, seed=3)
    e0 = list(a)
    assert e0 == list(b)
    assert sorted(e0) == list(range(50))
    e1 = list(a)
    assert a.epoch == 2 and e1 != e0 and sorted(e1) == list(range(50))


def test_unshuffled_is_in_order() -> None:
    assert list(cg.ResumableSampler(7, shuffle=False)) == list(range(7))


def test_mid_epoch_resume_continues_without_replay() -> None:
    s = cg.ResumableSampler(40, seed=1)
    it = iter(s)
    seen = [next(it) for _ in range(13)]
    state = s.state_dict()
    assert state["epoch"] == 0 and state["start"] == 13
    t = cg.ResumableSampler(40, seed=1)
    t.load_state_dict(state)
    rest = list(t)
    assert seen + rest == cg.ResumableSampler(40, seed=1).order(0)
    assert t.epoch == 1


def test_state_after_full_epoch_points_to_next_epoch() -> None:
    s = cg.ResumableSampler(10, seed=0)
    list(s)
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["start"] == 0


def test_set_epoch_keeps_a_resumed_position_for_the_same_epoch() -> None:
    s = cg.ResumableSampler(20, seed=0)
    s.load_state_dict({"epoch": 2, "start": 5})
    s.set_epoch(2)
    assert len(list(s)) == 15
    s.set_epoch(7)
    assert s.epoch == 7 and len(list(s)) == 20


@pytest.mark.parametrize("n,replicas", [(10, 2), (11, 3), (5, 4)])
def test_replicas_partition_the_data(n: int, replicas: int) -> None:
    parts = [cg.ResumableSampler(n, seed=4, num_replicas=replicas, rank=r).order(0) for r in range(replicas)]
    assert len({len(p) for p in parts}) == 1
    assert set().union(*map(set, parts)) == set(range(n))


def test_resharding_keeps_the_global_position() -> None:
    s = cg.ResumableSampler(100, num_replicas=2, rank=0)
    s.load_state_dict({"epoch": 0, "start": 10, "num_replicas": 2, "global_consumed": 20})
    one = cg.ResumableSampler(100, num_replicas=1, rank=0)
    one.load_state_dict(s.state_dict())
    assert one.epoch == 0 and one.position == 20


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        cg.ResumableSampler(10, num_replicas=2, rank=2)


def test_dataloader_without_resumable_sampler_is_refused() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(4, 1)), batch_size=2, shuffle=True)
    with pytest.raises(cg.UnsupportedStateError, match="ResumableSampler"):
        cg.TrainState(dataloader=loader)


def test_tracked_loader_reports_consumed_not_prefetched() -> None:
    ds = TensorDataset(torch.arange(64.0))
    loader = DataLoader(ds, batch_size=4, sampler=cg.ResumableSampler(ds, seed=0), num_workers=2)
    state = cg.TrainState(dataloader=loader)
    it = iter(loader)
    for _ in range(3):
        next(it)
    from ckptguard.sampler import loader_state

    assert state._tracker is not None
    pos = loader_state(state._tracker, None)["sampler"]
    assert (pos["epoch"], pos["start"]) == (0, 12)
    assert loader.sampler.position > 12  # the workers prefetched ahead
    del it


def test_iterator_creation_after_mid_epoch_restore_leaves_global_rng_alone(tmp_path) -> None:
    ds = TensorDataset(torch.arange(32.0))

    def make() -> tuple[DataLoader, cg.TrainState]:
        loader = DataLoader(ds, batch_size=4, sampler=cg.ResumableSampler(ds, seed=0))
        return loader, cg.TrainState(dataloader=loader)

    torch.manual_seed(0)
    loader, state = make()
    it = iter(loader)
    next(it), next(it)
    with cg.CheckpointManager(tmp_path / "r") as mgr:
        mgr.save(2, state, force=True)
        expected_next_draw = torch.rand(1)
    loader2, state2 = make()
    with cg.CheckpointManager(tmp_path / "r") as mgr:
        assert mgr.restore(state2) == 2
    batches = list(loader2)  # creating the iterator must not consume the global RNG
    assert torch.equal(torch.rand(1), expected_next_draw)
    assert len(batches) == 6
