"""Promise 1: stop anywhere, resume, and the final weights are bit-identical."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import trainlib
from conftest import FULL
from trainlib import run_training, same_weights

TOTAL = 30  # 96 samples / batch 8 = 12 batches per epoch -> 2.5 epochs


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return run_training(tmp_path_factory.mktemp("ref") / "run", TOTAL)


@pytest.mark.parametrize(
    "stop_at",
    [1, 7, 12, 15, 23],
    ids=["first-step", "mid-epoch", "epoch-boundary", "right-after-save", "mid-epoch-2"],
)
def test_resume_is_bit_identical(run_dir: Path, reference: dict[str, torch.Tensor], stop_at: int, async_save: bool) -> None:
    run_training(run_dir, TOTAL, stop_at=stop_at, async_save=async_save)
    resumed = run_training(run_dir, TOTAL, async_save=async_save)
    assert same_weights(reference, resumed)


def test_resume_twice_in_a_row(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    run_training(run_dir, TOTAL, stop_at=5)
    run_training(run_dir, TOTAL, stop_at=18)
    assert same_weights(reference, run_training(run_dir, TOTAL))


@pytest.mark.parametrize("stop_at", [7, 12])
def test_resume_with_two_workers(run_dir: Path, reference: dict[str, torch.Tensor], stop_at: int) -> None:
    """Prefetching workers run ahead of the loop; the position saved is what the loop consumed."""
    kw = {"workers": 2}
    run_training(run_dir, TOTAL, stop_at=stop_at, setup_kwargs=kw)
    assert same_weights(reference, run_training(run_dir, TOTAL, setup_kwargs=kw))


def test_resume_with_sampler_only(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    """TrainState(sampler=...) without the DataLoader: the iterator's seed draw is undone."""
    kw = {"pass_sampler_only": True}
    run_training(run_dir, TOTAL, stop_at=9, setup_kwargs=kw)
    assert same_weights(reference, run_training(run_dir, TOTAL, setup_kwargs=kw))


def test_interrupted_run_differs_without_rng_restore(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    """Control: the test above can fail. Dropping RNG capture breaks bit-exactness."""
    import trainlib

    original = trainlib.make_setup

    def no_rng(**kw: object) -> dict[str, object]:
        s = original(**kw)  # type: ignore[arg-type]
        s["state"].capture_rng = False
        return s

    trainlib.make_setup = no_rng  # type: ignore[assignment]
    try:
        run_training(run_dir, TOTAL, stop_at=7)
        resumed = run_training(run_dir, TOTAL)
    finally:
        trainlib.make_setup = original
    assert not same_weights(reference, resumed)


# ---- randomness inside DataLoader workers (issue 12 item 3) ----------------------------------

AUG = {"workers": 2, "augment": True}  # numpy crop offset, python random scale, torch noise


@pytest.fixture(scope="module")
def aug_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return run_training(tmp_path_factory.mktemp("aug") / "run", TOTAL, setup_kwargs=AUG)


# The epoch boundary with augmenting workers runs by default in the persistent-workers test below.
@pytest.mark.parametrize(
    "stop_at",
    [7, *(pytest.param(k, marks=pytest.mark.skipif(not FULL, reason="CKPTGUARD_TEST_FULL=1")) for k in (12, 19))],
    ids=["mid-epoch", "epoch-boundary", "mid-epoch-2"],
)
def test_resume_with_random_augmentation_in_two_workers(run_dir: Path, aug_reference: dict[str, torch.Tensor], stop_at: int) -> None:
    run_training(run_dir, TOTAL, stop_at=stop_at, setup_kwargs=AUG)
    assert same_weights(aug_reference, run_training(run_dir, TOTAL, setup_kwargs=AUG))


SHORT = 16  # past the first epoch boundary (12 batches), to keep the extra runs cheap


@pytest.mark.parametrize(
    "stop_at",
    [12, pytest.param(7, marks=pytest.mark.skipif(not FULL, reason="CKPTGUARD_TEST_FULL=1"))],
    ids=["epoch-boundary", "mid-epoch"],
)
def test_resume_with_persistent_workers_and_a_user_worker_init_fn(run_dir: Path, tmp_path: Path, stop_at: int) -> None:
    """persistent_workers keep one base seed for the run, also across an epoch boundary, where
    torch resets the iterator without drawing a seed; the FAQ's worker_init_fn is chained."""
    kw = dict(AUG, persistent_workers=True, worker_init_fn=trainlib.seed_numpy_per_worker)
    reference = run_training(tmp_path / "ref", SHORT, setup_kwargs=kw)
    run_training(run_dir, SHORT, stop_at=stop_at, setup_kwargs=kw)
    assert same_weights(reference, run_training(run_dir, SHORT, setup_kwargs=kw))


def test_control_without_per_sample_seeding_resume_differs(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control: the tests above can fail. Without the workers' re-seeding (the fork start method
    carries the patch into the workers) a mid-epoch resume changes every later augmentation."""
    import ckptguard.capture.sampler

    monkeypatch.setattr(ckptguard.capture.sampler, "seed_sample", lambda *a: None)
    reference = run_training(tmp_path / "ref", 10, setup_kwargs=AUG)
    run_training(run_dir, 10, stop_at=7, setup_kwargs=AUG)
    assert not same_weights(reference, run_training(run_dir, 10, setup_kwargs=AUG))


def test_resume_with_another_worker_count_warns(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_training(run_dir, TOTAL, stop_at=7, setup_kwargs=AUG)
    with caplog.at_level(logging.WARNING, logger="ckptguard.capture.sampler"):
        run_training(run_dir, 8, setup_kwargs={"workers": 0, "augment": True})
    [msg] = [r.getMessage() for r in caplog.records if r.name == "ckptguard.capture.sampler"]
    assert msg == (
        "DataLoader: the checkpoint was saved with num_workers=2, persistent_workers=False and the "
        "loader now has num_workers=0, persistent_workers=False; the resumed run is not bit-exact "
        "(randomness in workers is reproduced only with the same settings)."
    )


def test_resume_with_another_number_of_workers_is_exact_and_quiet(
    run_dir: Path, aug_reference: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    """Samples are re-seeded by position, not by worker: 2 workers, then 1 (and 3), is bit-exact."""
    run_training(run_dir, TOTAL, stop_at=7, setup_kwargs=AUG)
    run_training(run_dir, TOTAL, stop_at=17, setup_kwargs=dict(AUG, workers=1))
    with caplog.at_level(logging.WARNING, logger="ckptguard.capture.sampler"):
        resumed = run_training(run_dir, TOTAL, setup_kwargs=dict(AUG, workers=3))
    assert [r.getMessage() for r in caplog.records if r.name == "ckptguard.capture.sampler"] == []
    assert same_weights(aug_reference, resumed)


def test_resume_with_another_batch_size_warns(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_training(run_dir, TOTAL, stop_at=7)
    with caplog.at_level(logging.WARNING, logger="ckptguard.capture.sampler"):
        run_training(run_dir, 8, setup_kwargs={"batch_size": 4})
    [msg] = [r.getMessage() for r in caplog.records if r.name == "ckptguard.capture.sampler"]
    assert msg.startswith("DataLoader: the checkpoint was saved with batch_size=8 and the loader now has batch_size=4")
