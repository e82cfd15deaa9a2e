"""Promise 1: stop anywhere, resume, and the final weights are bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
