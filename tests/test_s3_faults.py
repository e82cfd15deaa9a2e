"""Network faults between the S3 client and the loopback S3 server (moto) stay in the hierarchy.

A :class:`~fault_proxy.FaultProxy` sits between s3fs and moto and resets connections, cuts
responses mid-transfer, delays them, or refuses connections for a while. Transient faults are
retried and saves and restores come out bit-exact; a persistent outage raises a
``StorageUnavailableError`` (a ``CheckpointError``) naming the URL and the next step, and a
user loop that catches ``CheckpointError`` keeps training and saves again once the store is back;
a manifest upload whose outcome is unknown is settled by reading it back, and ``save()`` agrees
with what is really committed; a network error is never taken as evidence of corruption.

The client's own retry layers (botocore, s3fs) are set to one try so that the library's
``RetryPolicy`` is the layer under test (aiohttp still re-sends a request once when a reused
connection turns out reset, so a persistent fault strikes each attempt about twice).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import ckptguard as cg
from ckptguard.errors import (
    AsyncSaveError,
    CheckpointError,
    CommitUnknownError,
    StorageError,
    StorageUnavailableError,
)
from ckptguard.run.catalog import find_debris, scan
from ckptguard.storage import FsspecStorage, open_storage
from ckptguard.storage.retry import RetryPolicy
from conftest import FULL
from fault_proxy import Fault, FaultProxy
from trainlib import make_setup, run_training, same_weights, train_step

ATTEMPTS = 4


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    with FaultProxy(s3_endpoint, max_seconds=240) as p:
        yield p


def via(proxy: FaultProxy, url: str, attempts: int = ATTEMPTS) -> FsspecStorage:
    """The run at ``url`` reached through the proxy, retried by the library alone."""
    store = FsspecStorage(
        url,
        {"client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": {"retries": {"total_max_attempts": 1}}},
        retry=RetryPolicy(attempts=attempts, base_delay=0.05, max_delay=0.2),
    )
    store.fs.retries = 1  # s3fs's own retry loop: one try
    return store


def _reference(steps: int) -> dict[str, torch.Tensor]:
    return run_training(f"memory://ref-{uuid.uuid4().hex[:10]}/run", steps)


def _restore(store: Any) -> tuple[int | None, dict[str, torch.Tensor]]:
    s = make_setup()
    with cg.CheckpointManager(store, lock=False) as mgr:
        step = mgr.restore(s["state"])
    return step, {k: v.detach().clone() for k, v in s["model"].state_dict().items()}


def _steps(url: str) -> list[int]:
    return [c.step for c in scan(open_storage(url))]


# ---- transient faults: retried, bit-exact ---------------------------------------------------

TRANSIENT = {
    "reset_before": [Fault("reset_before", "PUT", "model.safetensors", skip=1), Fault("reset_before", "GET", "model.safetensors")],
    "reset_after": [Fault("reset_after", "PUT", "model.safetensors", skip=1), Fault("reset_after", "GET", "model.safetensors")],
    "truncate": [
        Fault("truncate", "GET", "model.safetensors", times=2, after_bytes=700),
        Fault("truncate", "GET", "/MANIFEST.json", times=1, after_bytes=100),
        Fault("truncate", "GET", "list-type=2", skip=3, times=1, after_bytes=50),  # a listing
    ],
    "delay": [Fault("delay", "PUT", "MANIFEST.json", seconds=0.5), Fault("delay", "GET", "model.safetensors", seconds=0.5)],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TRANSIENT) if FULL else ["reset_after", "truncate"])
def test_transient_faults_are_retried_and_resume_is_bit_exact(s3_url: str, proxy: FaultProxy, kind: str) -> None:
    faults = TRANSIENT[kind]
    proxy.add(*faults)
    run_training(via(proxy, s3_url), 12, stop_at=7)  # saves at 5 and 7 through the faults
    assert _steps(s3_url) == [5, 7]
    step, weights = _restore(via(proxy, s3_url))
    assert step == 7
    assert same_weights(weights, _reference(7))
    assert [f.hits for f in faults] == [f.times for f in faults]  # every fault really struck
    assert cg.verify(s3_url).ok
    assert find_debris(open_storage(s3_url)) == []


def test_a_short_outage_is_ridden_out_by_the_retries(s3_url: str, proxy: FaultProxy) -> None:
    run_training(via(proxy, s3_url), 5)
    proxy.down(0.5)  # connections refused for half a second; 30 tries outlast it
    step, weights = _restore(via(proxy, s3_url, attempts=30))
    assert step == 5
    assert same_weights(weights, _reference(5))


def test_ranged_reads_refetch_a_cut_range_and_never_take_it_for_the_end(s3_url: str, proxy: FaultProxy) -> None:
    store = via(proxy, s3_url)
    store.makedirs("")
    payload = bytes(range(256)) * 9000  # 2.3 MB: several ranges of the 1 MiB read buffer
    store.replace_file("blob", payload)
    proxy.add(Fault("truncate", "GET", "/blob", skip=1, times=2, after_bytes=5000))
    with store.open_read("blob") as fh:
        head = fh.read(10)
        fh.seek(2_000_000)
        tail = fh.read()
        fh.seek(10)
        view = bytearray(1_500_000)
        assert fh.readinto(view) == len(view)
    assert head == payload[:10]
    assert tail == payload[2_000_000:]
    assert bytes(view) == payload[10:1_500_010]
    assert proxy.faults[0].hits == 2
    assert [p for m, p in proxy.actions("truncate")] == ["/" + s3_url[5:] + "/blob"] * 2


# ---- persistent outage: a clear CheckpointError, training goes on -----------------------------


def _user_loop(store: FsspecStorage, hook: Callable[[int, str], None], *, async_save: bool, total: int = 20) -> tuple[list[CheckpointError], dict[str, torch.Tensor]]:
    """A user's loop: save every 5 steps, wait for the save before an evaluation at step 12, and
    keep training when a save fails (the README's advice). ``hook(step, "before"|"after")``
    runs around each save call (the test's hand on the network)."""
    s = make_setup()
    mgr = cg.CheckpointManager(store, every_steps=5, async_save=async_save)
    failures: list[CheckpointError] = []
    step = 0
    while step < total:
        for xb, yb in s["loader"]:
            loss = train_step(s, xb, yb)
            step += 1
            s["state"].extra["seen"] += len(xb)
            hook(step, "before")
            try:
                mgr.save(step, s["state"], metrics={"loss": loss})
                hook(step, "after")
                if step == 12:
                    mgr.wait()
            except CheckpointError as e:
                failures.append(e)
            if step >= total:
                break
        s["state"].extra["epoch"] += 1
    mgr.close()
    return failures, {k: v.detach().clone() for k, v in s["model"].state_dict().items()}


def test_persistent_outage_raises_a_storage_error_and_training_continues(s3_url: str, proxy: FaultProxy) -> None:
    def hook(step: int, when: str) -> None:
        if (step, when) == (8, "before"):
            proxy.down(3600)  # the endpoint goes away for good...
        if (step, when) == (13, "before"):
            proxy.up()  # ...until an operator brings it back

    failures, weights = _user_loop(via(proxy, s3_url, attempts=3), hook, async_save=False)
    assert len(failures) == 1
    err = failures[0]
    assert isinstance(err, StorageUnavailableError) and isinstance(err, StorageError)
    assert err.attempts == 3
    assert err.url.startswith(s3_url + "/step-000000010")
    assert s3_url in str(err) and "after 3 attempts" in str(err)
    assert "nothing saved is damaged" in str(err) and "try again" in str(err)
    assert type(err.__cause__).__name__ == "EndpointConnectionError"  # chained, not swallowed
    assert proxy.actions("down") == []  # refused at connect: no request got through
    assert _steps(s3_url) == [5, 15, 20]  # 10 failed; the saves after the outage succeed
    assert same_weights(weights, _reference(20))
    step, restored = _restore(s3_url)
    assert step == 20 and same_weights(restored, weights)
    assert find_debris(open_storage(s3_url)) == []


def test_persistent_outage_in_an_async_save_surfaces_as_a_checkpoint_error(s3_url: str, proxy: FaultProxy) -> None:
    def hook(step: int, when: str) -> None:
        if (step, when) == (10, "before"):  # hold the upload in flight...
            proxy.add(Fault("delay", "PUT", "step-000000010/model.safetensors", seconds=5))
        if (step, when) == (10, "after"):  # ...and take the endpoint away under it
            proxy.down(3600)
        if (step, when) == (13, "before"):
            proxy.up()

    failures, weights = _user_loop(via(proxy, s3_url, attempts=3), hook, async_save=True)
    assert len(failures) == 1
    err = failures[0]
    assert isinstance(err, AsyncSaveError)
    assert "A background save to " + s3_url in str(err)
    assert isinstance(err.__cause__, StorageUnavailableError)
    assert err.__cause__.attempts == 3
    assert _steps(s3_url) == [5, 15, 20]
    assert same_weights(weights, _reference(20))
    assert same_weights(_restore(s3_url)[1], weights)


def test_restore_during_an_outage_raises_and_marks_nothing(s3_url: str, proxy: FaultProxy) -> None:
    run_training(s3_url, 10)
    before = [(c.step, c.status) for c in scan(open_storage(s3_url))]
    proxy.down(3600)
    s = make_setup()
    with pytest.raises(StorageUnavailableError, match="after 2 attempts") as info:
        cg.CheckpointManager(via(proxy, s3_url, attempts=2), lock=False).restore(s["state"])
    assert info.value.url.startswith(s3_url)
    assert [(c.step, c.status) for c in scan(open_storage(s3_url))] == before == [(5, "unverified"), (10, "unverified")]
    assert not open_storage(s3_url).exists("step-000000010/STATUS.json")  # a network error is no evidence


def test_a_tensor_read_cut_every_time_raises_and_marks_nothing(s3_url: str, proxy: FaultProxy) -> None:
    """A network that cuts every transfer of the newest tensor file is no evidence against it:
    restore raises StorageUnavailableError, no STATUS.json is written, and the same checkpoint
    restores bit-exact once the network is back."""
    run_training(s3_url, 10)
    cut = Fault("truncate", "GET", "step-000000010/model.safetensors", times=99, after_bytes=500)
    proxy.add(cut)
    s = make_setup()
    with pytest.raises(StorageUnavailableError, match="reading .*step-000000010/model.safetensors after 2 attempts"):
        cg.CheckpointManager(via(proxy, s3_url, attempts=2), lock=False).restore(s["state"])
    assert cut.hits == cut.seen >= 2
    assert not open_storage(s3_url).exists("step-000000010/STATUS.json")
    assert all(c.valid for c in scan(open_storage(s3_url)))
    proxy.clear()
    step, weights = _restore(via(proxy, s3_url))
    assert step == 10 and same_weights(weights, _reference(10))


def test_a_manifest_that_cannot_be_fetched_is_not_skipped_for_an_older_one(s3_url: str, proxy: FaultProxy) -> None:
    """Restoring step 5 because step 10's manifest GET was reset would silently lose work."""
    run_training(s3_url, 10)
    proxy.add(Fault("reset_before", "GET", "step-000000010/MANIFEST.json", times=99))
    s = make_setup()
    with pytest.raises(StorageUnavailableError, match="reading .*step-000000010/MANIFEST.json after 2 attempts"):
        cg.CheckpointManager(via(proxy, s3_url, attempts=2), lock=False).restore(s["state"])
    assert not open_storage(s3_url).exists("step-000000010/STATUS.json")
    proxy.clear()
    assert _restore(via(proxy, s3_url))[0] == 10


def test_a_size_check_that_never_answers_raises_and_marks_nothing(s3_url: str, proxy: FaultProxy) -> None:
    """Listing sizes a checkpoint's files (HEAD); a network error there is not a missing file."""
    run_training(s3_url, 10)
    proxy.add(Fault("reset_before", "HEAD", "step-000000010/model.safetensors", times=99))
    s = make_setup()
    with pytest.raises(StorageUnavailableError, match="reading the size of .*step-000000010/model.safetensors"):
        cg.CheckpointManager(via(proxy, s3_url, attempts=2), lock=False).restore(s["state"])
    assert not open_storage(s3_url).exists("step-000000010/STATUS.json")
    assert all(c.valid for c in scan(open_storage(s3_url)))


# ---- the manifest upload's unknown outcome is settled ---------------------------------------

MANIFEST_CASES = {
    # name: (faults, what save() does, committed afterwards)
    "landed, answer lost": ([Fault("reset_after", "PUT", "step-000000010/MANIFEST.json", times=99)], None, True),
    "never landed": ([Fault("reset_before", "PUT", "step-000000010/MANIFEST.json", times=99)], StorageUnavailableError, False),
    "landed, unreadable, removed": (
        [Fault("reset_after", "PUT", "step-000000010/MANIFEST.json", times=99),
         Fault("reset_before", "GET", "step-000000010/MANIFEST.json", times=99)],
        StorageUnavailableError, False,
    ),
    "landed, unreadable, not removable": (
        [Fault("reset_after", "PUT", "step-000000010/MANIFEST.json", times=99),
         Fault("reset_before", "GET", "step-000000010/MANIFEST.json", times=99),
         Fault("reset_before", "DELETE", "step-000000010/MANIFEST.json", times=99)],
        CommitUnknownError, True,
    ),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_cut_manifest_upload_resolves_to_the_truth(s3_url: str, proxy: FaultProxy, case: str, caplog: pytest.LogCaptureFixture) -> None:
    faults, raised, committed = MANIFEST_CASES[case]
    store = via(proxy, s3_url, attempts=2)
    s = make_setup()
    it = iter(s["loader"])
    with cg.CheckpointManager(store) as mgr:
        train_step(s, *next(it))
        mgr.save(5, s["state"], force=True)
        train_step(s, *next(it))
        w10 = {k: v.detach().clone() for k, v in s["model"].state_dict().items()}
        proxy.add(*faults)
        with caplog.at_level(logging.WARNING, logger="ckptguard.persist.writer"):
            if raised is None:
                assert mgr.save(10, s["state"], force=True) is True
                assert mgr.last_saved_step == 10
            else:
                with pytest.raises(raised) as info:
                    mgr.save(10, s["state"], force=True)
                assert mgr.last_saved_step == 5
        proxy.clear()
    assert all(f.hits >= 2 and f.hits == f.seen for f in faults)  # every attempt was struck
    assert _steps(s3_url) == ([5, 10] if committed else [5])
    if raised is None:
        assert "arrived whole: the checkpoint is committed" in caplog.text
    elif raised is CommitUnknownError:
        msg = str(info.value)
        assert "committed, and whole, exactly if that manifest exists" in msg and "ckptguard ls" in msg
        assert s3_url + "/step-000000010/MANIFEST.json" in msg
        assert isinstance(info.value, StorageUnavailableError)
    else:
        assert info.value.url == s3_url + "/step-000000010/MANIFEST.json"
        assert "uploading" in str(info.value)
    if committed:
        step, weights = _restore(s3_url)
        assert step == 10 and same_weights(weights, w10)  # committed means whole
        assert cg.verify(s3_url).ok
    else:  # the data without its manifest: debris the next save removes
        assert find_debris(open_storage(s3_url)) == ["step-000000010"]


def test_a_failed_manifest_upload_is_cleaned_by_the_next_save(s3_url: str, proxy: FaultProxy) -> None:
    store = via(proxy, s3_url, attempts=2)
    s = make_setup()
    with cg.CheckpointManager(store) as mgr:
        proxy.add(Fault("reset_before", "PUT", "step-000000003/MANIFEST.json", times=99))
        with pytest.raises(StorageUnavailableError):
            mgr.save(3, s["state"], force=True)
        proxy.clear()
        assert find_debris(open_storage(s3_url)) == ["step-000000003"]  # data, no manifest
        mgr.save(4, s["state"], force=True)
    assert find_debris(open_storage(s3_url)) == []
    assert _steps(s3_url) == [4]


# ---- every client error maps into the hierarchy ---------------------------------------------


def _client_errors() -> list[tuple[BaseException, type[CheckpointError]]]:
    import aiohttp
    import botocore.exceptions as bx

    from ckptguard.errors import CheckpointNotFoundError, StoragePermissionError

    return [
        (aiohttp.ClientPayloadError("Response payload is not completed"), StorageUnavailableError),
        (aiohttp.ServerDisconnectedError(), StorageUnavailableError),
        (bx.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), StorageUnavailableError),
        (bx.ConnectionClosedError(endpoint_url="http://127.0.0.1:9"), StorageUnavailableError),
        (bx.ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), StorageUnavailableError),
        (ConnectionResetError(104, "Connection reset by peer"), StorageUnavailableError),
        (TimeoutError("timed out"), StorageUnavailableError),
        (OSError(5, "Internal error"), StorageUnavailableError),
        (FileNotFoundError("no such key"), CheckpointNotFoundError),
        (PermissionError(13, "Access Denied"), StoragePermissionError),
        (bx.NoCredentialsError(), StorageError),
        (bx.ParamValidationError(report="bad bucket name"), StorageError),
        (ValueError("odd"), StorageError),
    ]


def test_every_client_error_leaves_as_a_checkpoint_error_with_its_cause(s3_url: str) -> None:
    """Through the real storage call path: each error raised by the fsspec call itself."""
    store = FsspecStorage(s3_url, retry=RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0))
    for exc, expected in _client_errors():
        calls: list[int] = []

        def failing(*a: Any, exc: BaseException = exc, calls: list[int] = calls, **kw: Any) -> bytes:
            calls.append(1)
            raise exc

        store.fs.cat_file = failing  # type: ignore[method-assign]
        try:
            with pytest.raises(CheckpointError) as info:
                store.read_bytes("x/MANIFEST.json")
        finally:
            del store.fs.cat_file  # the client instance is shared (fsspec's cache)
        got = info.value
        assert type(got) is expected, (exc, type(got))
        assert got.__cause__ is exc
        assert s3_url + "/x/MANIFEST.json" in str(got)
        assert len(calls) == (2 if expected is StorageUnavailableError else 1), exc  # transient retried


def test_a_retry_leaves_the_users_random_stream_alone() -> None:
    """Jitter comes from the library's own generator: retries during training must not change
    what ``random.random()`` returns next (exact resume would break after any network hiccup)."""
    import random

    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(104, "reset (injected)")
        return "ok"

    random.seed(7)
    expected = [random.random() for _ in range(3)]
    random.seed(7)
    assert RetryPolicy(attempts=3, base_delay=0.001, max_delay=0.001).call(flaky) == "ok"
    assert len(calls) == 3
    assert [random.random() for _ in range(3)] == expected


def test_the_proxy_stops_by_itself_after_its_request_budget(s3_url: str, s3_endpoint: str) -> None:
    with FaultProxy(s3_endpoint, max_requests=5, max_seconds=60) as small:
        store = via(small, s3_url, attempts=1)
        store.replace_file("a", b"1")
        with pytest.raises(StorageUnavailableError):
            for _ in range(10):
                assert store.read_bytes("a") == b"1"
        actions = [a for _, _, a in small.log]
        assert actions[:5] == ["pass"] * 5
        assert set(actions[5:]) <= {"refused"}  # then nothing gets through
