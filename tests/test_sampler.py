from __future__ import annotations

import hashlib
import pickle
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, get_worker_info

import ckptguard as cg
from ckptguard.capture.sampler import SampleIndex, key_dataset
from conftest import FULL


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
    from ckptguard.capture.sampler import loader_state

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


# ---- randomness inside DataLoader workers (per-sample seeding) --------------------------------


class Draws(Dataset):
    """Each sample is what python, numpy and torch draw inside ``__getitem__``."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        assert type(i) is int  # the user's code gets a plain int
        return torch.tensor([i, random.getrandbits(30), int(np.random.randint(1 << 30)), int(torch.randint(1 << 30, ()))])


def reference_draws(i: int, base: int, epoch: int, position: int) -> list[int]:
    """The documented meaning, written again: seed all three from blake2b(base, epoch, position)."""
    raw = b"".join(v.to_bytes(16, "little", signed=True) for v in (base, epoch, position))
    key = hashlib.blake2b(raw, digest_size=16, person=b"ckptguard-smpl").digest()
    py = random.Random(int.from_bytes(key, "little"))
    npy = np.random.RandomState(np.frombuffer(key, dtype="<u4"))
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
    return [i, py.getrandbits(30), int(npy.randint(1 << 30)), int(torch.randint(1 << 30, (), generator=g))]


def _epochs(workers: int, persistent: bool, epochs: int = 2) -> tuple[list[list[int]], list[int]]:
    torch.manual_seed(5)
    sampler = cg.ResumableSampler(24, seed=1)
    loader = DataLoader(Draws(), batch_size=5, sampler=sampler, num_workers=workers, persistent_workers=persistent)
    cg.TrainState(dataloader=loader)
    rows = [r for _ in range(epochs) for b in loader for r in b.tolist()]
    torch.manual_seed(5)  # the base seeds the loader drew: one per iterator
    bases = [int(torch.empty((), dtype=torch.int64).random_().item()) for _ in range(epochs)]
    return rows, bases


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers,persistent", [(1, False), (2, False), (3, True)])
def test_worker_draws_are_keyed_by_base_seed_epoch_and_position(workers: int, persistent: bool) -> None:
    rows, bases = _epochs(workers, persistent)
    order = [i for e in range(2) for i in cg.ResumableSampler(24, seed=1).order(e)]
    want = [
        reference_draws(i, bases[0 if persistent else p // 24], p // 24, p % 24)
        for p, i in enumerate(order)
    ]
    assert rows == want


def test_single_process_loader_draws_from_the_global_generators_unchanged() -> None:
    """With 0 workers nothing is re-seeded: samples use the main process's generators (which
    every checkpoint captures), exactly as without ckptguard."""
    random.seed(1)
    np.random.seed(1)
    rows, _ = _epochs(0, False, epochs=1)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(5)
    torch.empty((), dtype=torch.int64).random_()  # the iterator's base seed draw
    want = [
        [i, random.getrandbits(30), int(np.random.randint(1 << 30)), int(torch.randint(1 << 30, ()))]
        for i in cg.ResumableSampler(24, seed=1).order(0)
    ]
    assert rows == want


class BatchedDraws(Draws):
    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        assert all(type(i) is int for i in indices)
        return [self[i] for i in indices]


def test_dataset_with_getitems_is_seeded_once_per_batch() -> None:
    torch.manual_seed(9)
    loader = DataLoader(BatchedDraws(), batch_size=4, sampler=cg.ResumableSampler(24, seed=2), num_workers=2)
    cg.TrainState(dataloader=loader)
    batches = [b.tolist() for b in loader]
    torch.manual_seed(9)
    base = int(torch.empty((), dtype=torch.int64).random_().item())
    order = cg.ResumableSampler(24, seed=2).order(0)
    for b, first in zip(batches, range(0, 24, 4)):
        ref = reference_draws(order[first], base, 0, first)
        assert b[0] == ref  # the first sample draws first from the batch's streams
        assert [r[0] for r in b] == order[first : first + 4]
    assert len({tuple(b[1][1:]) for b in batches}) == len(batches)  # later samples continue the stream


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_subset_of_random_split_is_keyed_too() -> None:
    """torch's Subset has __getitems__: a random_split dataset resumes exactly (per batch)."""
    sub = Subset(Draws(), list(range(0, 24, 2)))
    torch.manual_seed(3)
    loader = DataLoader(sub, batch_size=3, sampler=cg.ResumableSampler(sub, seed=0), num_workers=2)
    cg.TrainState(dataloader=loader)
    two = [b.tolist() for b in loader]
    torch.manual_seed(3)
    loader = DataLoader(sub, batch_size=3, sampler=cg.ResumableSampler(sub, seed=0), num_workers=3)
    cg.TrainState(dataloader=loader)
    assert [b.tolist() for b in loader] == two


def test_sample_index_is_an_int_that_pickles_with_its_key() -> None:
    s = SampleIndex(7, 3, 41)
    assert s == 7 and s + 1 == 8 and [0] * 9 and list(range(10))[s] == 7 and str(s) == "7"
    back = pickle.loads(pickle.dumps(s))
    assert (int(back), back.epoch, back.position, type(back)) == (7, 3, 41, SampleIndex)
    sampler = cg.ResumableSampler(4, shuffle=False)
    assert [type(i) for i in sampler] == [int] * 4  # untracked: plain ints


class OpensInWorker(Dataset):
    """The HDF5 pattern: worker_init_fn opens a handle on get_worker_info().dataset."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i, self.handle, int(isinstance(self, OpensInWorker))])


class OpenHandle:
    def __call__(self, worker_id: int) -> None:
        info = get_worker_info()
        assert info is not None and type(info.dataset).__name__ == "OpensInWorker"
        info.dataset.handle = 100 + worker_id


def test_user_worker_init_fn_runs_after_keying_and_sees_its_dataset() -> None:
    ds = OpensInWorker()
    loader = DataLoader(ds, batch_size=2, sampler=cg.ResumableSampler(ds, shuffle=False), num_workers=2, worker_init_fn=OpenHandle())
    cg.TrainState(dataloader=loader)
    rows = [r for b in loader for r in b.tolist()]
    assert rows == [[0, 100, 1], [1, 100, 1], [2, 101, 1], [3, 101, 1], [4, 100, 1], [5, 100, 1]]
    assert isinstance(loader.worker_init_fn, OpenHandle)  # the loader shows the user's own
    assert not hasattr(ds, "handle")  # the main process's dataset is untouched


def test_a_list_dataset_cannot_be_keyed_and_still_loads() -> None:
    data = [torch.tensor([float(i)]) for i in range(6)]
    assert key_dataset(data, 0) is False
    assert type(data) is list
    loader = DataLoader(data, batch_size=2, sampler=cg.ResumableSampler(6, shuffle=False), num_workers=2)
    cg.TrainState(dataloader=loader)
    assert [b.flatten().tolist() for b in loader] == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]


def test_restore_into_a_loader_whose_persistent_workers_are_running(tmp_path) -> None:
    """An in-process restore (an auto-restart loop, an eval script) must not keep the old
    persistent workers: they were seeded for another iterator. The rest of the epoch after the
    restore equals the rest of the epoch after the save."""
    torch.manual_seed(4)
    loader = DataLoader(Draws(), batch_size=4, sampler=cg.ResumableSampler(24, seed=3), num_workers=2, persistent_workers=True)
    state = cg.TrainState(dataloader=loader)
    with cg.CheckpointManager(tmp_path / "r") as mgr:
        it = iter(loader)
        next(it), next(it)
        mgr.save(2, state, force=True)
        after_save = [b.tolist() for b in it]
        second_epoch = [b.tolist() for b in loader]
        assert mgr.restore(state) == 2
        assert [b.tolist() for b in loader] == after_save
        assert [b.tolist() for b in loader] == second_epoch


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        {"sampler": {"epoch": 0, "start": 1}, "num_workers": "two"},
        {"sampler": {"epoch": "x", "start": 1}},
        {"sampler": {"epoch": 0, "start": 1}, "persistent_workers": "yes"},
        {"sampler": {"epoch": 0, "start": 1}, "pre_iter_rng": "!!not base64!!"},
        {"sampler": {"epoch": 0, "start": 1}, "pre_iter_rng": "AAAA"},
        {"num_workers": 2},
    ],
    ids=["list", "workers-text", "epoch-text", "persistent-text", "rng-not-base64", "rng-short", "no-sampler"],
)
def test_malformed_loader_state_is_a_corrupt_checkpoint_naming_the_file(bad: object) -> None:
    from ckptguard.capture.sampler import load_loader_state

    loader = DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=2, sampler=cg.ResumableSampler(8, seed=0))
    state = cg.TrainState(dataloader=loader)
    assert state._tracker is not None
    with pytest.raises(cg.CorruptCheckpointError, match=r"^runs/a/step-1/state.json: the DataLoader position is malformed \(") as e:
        load_loader_state(state._tracker, loader, bad, "runs/a/step-1/state.json")  # type: ignore[arg-type]
    assert "restore falls back to an older one" in str(e.value)
    assert (loader.sampler.epoch, loader.sampler.position) == (0, 0)  # nothing was half-loaded


def test_the_chained_worker_init_fn_pickles_with_the_users_own() -> None:
    from ckptguard.capture.sampler import KeyedWorkerInit

    back = pickle.loads(pickle.dumps(KeyedWorkerInit(OpenHandle())))
    assert isinstance(back, KeyedWorkerInit) and isinstance(back.user_fn, OpenHandle)
    assert pickle.loads(pickle.dumps(KeyedWorkerInit(None))).user_fn is None


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="spawned workers import torch: CKPTGUARD_TEST_FULL=1")
def test_keyed_workers_under_the_spawn_start_method() -> None:
    """The chained worker_init_fn and SampleIndex cross a pickle boundary (spawn, forkserver)."""
    torch.manual_seed(6)
    sampler = cg.ResumableSampler(24, seed=1)
    loader = DataLoader(Draws(), batch_size=6, sampler=sampler, num_workers=1, multiprocessing_context="spawn")
    cg.TrainState(dataloader=loader)
    rows = [r for b in loader for r in b.tolist()]
    torch.manual_seed(6)
    base = int(torch.empty((), dtype=torch.int64).random_().item())
    order = cg.ResumableSampler(24, seed=1).order(0)
    assert rows == [reference_draws(i, base, 0, p) for p, i in enumerate(order)]
