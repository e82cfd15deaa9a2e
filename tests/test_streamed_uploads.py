"""Object-store uploads streamed from memory (no local spool): a failure in the store is retried
by writing again, an error of the writing code is raised as it is, and nothing half-written ever
appears. Real S3-protocol server on 127.0.0.1, the fault proxy in front of it."""

from __future__ import annotations

import os

import pytest

import ckptguard as cg
from ckptguard.persist.parallel_io import write_file
from ckptguard.storage import FsspecStorage
from ckptguard.storage.retry import RetryPolicy
from fault_proxy import Fault, FaultProxy

BIG = os.urandom(12 * 2**20)  # two parts of 5 MiB and a last one: a multipart upload


def _store(url: str, endpoint: str) -> FsspecStorage:
    """The client's own retries off (s3fs and botocore): every retry is ckptguard's."""
    options = {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True,
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    return FsspecStorage(url, options,
                         retry=RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05), block_size=5 * 2**20)


def test_a_streamed_upload_writes_the_bytes_and_a_cut_part_is_retried_by_writing_again(s3_url: str, s3_endpoint: str) -> None:
    calls = []

    def body(w: cg.storage.Writer) -> str:
        calls.append(1)
        for i in range(0, len(BIG), 2**20):
            w.write(memoryview(BIG)[i : i + 2**20])
        return "done"

    cut = Fault("reset_before", "PUT", "big.bin", skip=1, times=12)  # from the 2nd part on, past the client's own retries
    with FaultProxy(s3_endpoint, [cut]) as proxy:
        store = _store(s3_url, proxy.url)
        assert write_file(store, "big.bin", body) == "done"
    assert cut.hits == 12 and len(calls) >= 2  # a cut attempt was discarded and written again
    assert _store(s3_url, s3_endpoint).read_bytes("big.bin") == BIG


def test_an_error_of_the_writing_code_is_raised_as_it_is_and_leaves_nothing(s3_url: str, s3_endpoint: str) -> None:
    store = _store(s3_url, s3_endpoint)

    def body(w: cg.storage.Writer) -> None:
        w.write(BIG[: 6 * 2**20])  # one part already uploaded
        raise cg.UnsupportedStateError("this tensor cannot be stored")

    with pytest.raises(cg.UnsupportedStateError, match="cannot be stored"):
        write_file(store, "half.bin", body)
    assert not store.exists("half.bin")


def test_a_store_that_keeps_failing_is_a_storage_error_and_leaves_nothing(s3_url: str, s3_endpoint: str) -> None:
    with FaultProxy(s3_endpoint, [Fault("reset_before", "PUT", "never.bin", times=100)]) as proxy:
        store = _store(s3_url, proxy.url)
        with pytest.raises(cg.StorageUnavailableError, match="never.bin"):
            write_file(store, "never.bin", lambda w: w.write(BIG))
    assert not _store(s3_url, s3_endpoint).exists("never.bin")
