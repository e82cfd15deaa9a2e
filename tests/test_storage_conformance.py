"""One set of tests every storage backend passes: local disk, ``memory://`` and real S3 (moto).

Each test takes the ``store`` fixture, parametrised over the backends, and checks the semantics
that the writer, the catalog and the manager rely on (see ``ckptguard.storage.base``).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard as cg
from ckptguard.errors import CheckpointNotFoundError, StorageError
from ckptguard.format.manifest import MANIFEST
from ckptguard.run.catalog import find_debris, scan
from ckptguard.storage import Storage, open_storage
from ckptguard.testing import FaultyStorage, SimulatedCrash, count_ops

BACKENDS = ["local", "memory", "s3"]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "local":
        return str(tmp_path / "run")
    if kind == "memory":
        return f"memory://cg-{uuid.uuid4().hex[:10]}/run"
    return str(request.getfixturevalue("s3_url"))


@pytest.fixture
def store(store_url: str) -> Storage:
    s = open_storage(store_url)
    s.makedirs("")
    return s


def put(store: Storage, path: str, *chunks: bytes | memoryview) -> None:
    w = store.create(path)
    for c in chunks:
        w.write(c)
    w.close()


# ---- files --------------------------------------------------------------------------------------


def test_create_write_close_is_durable_and_visible_to_a_new_handle(store: Storage, store_url: str) -> None:
    store.makedirs("d")
    payload = bytes(range(256)) * 41
    put(store, "d/f.bin", payload[:1000], memoryview(payload[1000:]), b"")
    fresh = open_storage(store_url)
    assert fresh.read_bytes("d/f.bin") == payload
    assert fresh.size("d/f.bin") == len(payload)


def test_create_replaces_a_leftover_file(store: Storage) -> None:
    put(store, "f", b"old contents, longer")
    put(store, "f", b"new")
    assert store.read_bytes("f") == b"new"


def test_abort_leaves_nothing(store: Storage) -> None:
    store.makedirs("d")
    w = store.create("d/partial")
    w.write(b"x" * 1000)
    w.abort()
    assert not store.exists("d/partial")
    assert "partial" not in store.listdir("d")


def test_open_read_supports_seek_and_readinto(store: Storage) -> None:
    data = bytes(range(256)) * 64
    put(store, "f", data)
    with store.open_read("f") as fh:
        assert fh.read(10) == data[:10]
        fh.seek(5000)
        buf = bytearray(300)
        n = fh.readinto(buf)
        assert n == 300 and bytes(buf) == data[5000:5300]
        fh.seek(0)
        assert fh.read() == data


def test_open_read_ends_exactly_at_the_end_of_the_file(store: Storage) -> None:
    data = bytes(range(251)) * 5000  # 1.25 MB: more than one 1 MiB read buffer on object stores
    put(store, "f", data)
    with store.open_read("f") as fh:
        fh.seek(len(data) - 7)
        assert fh.read(100) == data[-7:]
        assert fh.read(100) == b""
        assert fh.readinto(bytearray(10)) == 0
        fh.seek(-3, 2)
        assert fh.read() == data[-3:]
        fh.seek(1)
        big = bytearray(len(data))
        n = fh.readinto(big)
        while n < len(data) - 1:
            more = fh.readinto(memoryview(big)[n:])
            assert more, n
            n += more
        assert bytes(big[:n]) == data[1:]
        assert fh.tell() == len(data)


def test_size_and_mtime(store: Storage) -> None:
    put(store, "f", b"12345")
    assert store.size("f") == 5
    m = store.mtime("f")
    assert m is None or m > 0


@pytest.mark.parametrize("op", ["read_bytes", "open_read", "size"])
def test_missing_paths_raise_not_found(store: Storage, op: str) -> None:
    with pytest.raises(CheckpointNotFoundError) as ei:
        fh = getattr(store, op)("nope/missing.bin")
        if hasattr(fh, "read"):
            fh.read()
    assert "missing.bin" in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)


# ---- directories --------------------------------------------------------------------------------


def test_listdir_gives_sorted_names_of_files_and_prefixes(store: Storage) -> None:
    store.makedirs("step-000000002")
    put(store, "step-000000002/a.bin", b"a")
    store.makedirs("step-000000001/sub")
    put(store, "step-000000001/sub/b.bin", b"b")
    put(store, "metrics.csv", b"step\n")
    assert store.listdir("") == ["metrics.csv", "step-000000001", "step-000000002"]
    assert store.listdir("step-000000001") == ["sub"]
    assert store.listdir("step-000000001/sub") == ["b.bin"]
    assert store.listdir("does-not-exist") == []
    assert store.listdir("metrics.csv") == []


def test_exists_and_isdir_on_files_and_prefixes(store: Storage) -> None:
    store.makedirs("step-000000007")
    put(store, "step-000000007/x", b"x")
    assert store.exists("step-000000007") and store.isdir("step-000000007")
    assert store.exists("step-000000007/x") and not store.isdir("step-000000007/x")
    assert not store.exists("step-000000008") and not store.isdir("step-000000008")
    assert not store.exists("step-000000007/y")
    assert store.isdir("")


def test_fresh_writes_and_deletes_are_seen_at_once(store: Storage) -> None:
    """No listing cache may hide a new or deleted object (s3fs keeps a dircache)."""
    store.makedirs("d")
    put(store, "d/one", b"1")
    assert store.listdir("d") == ["one"]
    put(store, "d/two", b"22")
    assert store.listdir("d") == ["one", "two"]
    assert store.size("d/two") == 2
    store.replace_file("d/two", b"333")
    assert store.size("d/two") == 3
    store.remove_file("d/one")
    assert store.listdir("d") == ["two"]
    assert not store.exists("d/one")


def test_remove_file_and_remove_tree_are_idempotent(store: Storage) -> None:
    store.makedirs("t/u")
    put(store, "t/u/f", b"f")
    put(store, "t/g", b"g")
    store.remove_file("t/g")
    store.remove_file("t/g")
    assert not store.exists("t/g")
    store.remove_tree("t")
    store.remove_tree("t")
    store.remove_tree("never-existed")
    assert not store.exists("t") and "t" not in store.listdir("")


# ---- small-file updates -------------------------------------------------------------------------


def test_append_creates_then_extends(store: Storage) -> None:
    store.append("log.csv", b"a,b\n")
    store.append("log.csv", b"1,2\n")
    assert store.read_bytes("log.csv") == b"a,b\n1,2\n"


def test_replace_file_is_whole_and_leaves_no_temp_files(store: Storage) -> None:
    store.replace_file("ckptguard.json", b'{"v": 1}')
    store.replace_file("ckptguard.json", b'{"v": 2, "longer": true}')
    assert store.read_bytes("ckptguard.json") == b'{"v": 2, "longer": true}'
    assert store.listdir("") == ["ckptguard.json"]


# ---- the commit protocol through the manager ----------------------------------------------------


def _state(seed: int) -> tuple[cg.TrainState, torch.nn.Module]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    return cg.TrainState(model=model, optimizer=opt, extra={"seed": seed}), model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_save_restore_verify_cycle(store_url: str) -> None:
    state, model = _state(1)
    with cg.CheckpointManager(store_url, retention=cg.Retention(keep_last=2)) as mgr:
        for step in (1, 2, 3):
            model.weight.data.add_(1.0)
            mgr.save(step, state, metrics={"loss": 1.0 / step}, force=True)
        assert [c.step for c in mgr.checkpoints()] == [2, 3]
        assert all(c.valid for c in mgr.checkpoints())
    report = cg.verify(store_url)
    assert report.ok, report.problems
    state2, model2 = _state(2)
    with cg.CheckpointManager(store_url) as mgr2:
        assert mgr2.restore(state2) == 3
    assert _same(model, model2)


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_failed_save_never_commits_and_restore_returns_previous(store_url: str, fail_at: int) -> None:
    state, model = _state(3)
    with cg.CheckpointManager(store_url) as mgr:
        mgr.save(1, state, force=True)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.weight.data.mul_(3.0)
    faulty = FaultyStorage(open_storage(store_url), fail_at=fail_at, ops={"create"})  # a crash mid-save
    mgr = cg.CheckpointManager(faulty, lock=False)
    with pytest.raises(OSError):
        mgr.save(2, state, force=True)
    mgr.close()
    real = open_storage(store_url)
    assert [c.step for c in scan(real)] == [1]
    state2, model2 = _state(4)
    with cg.CheckpointManager(store_url) as mgr2:
        assert mgr2.restore(state2) == 1
    assert all(torch.equal(model2.state_dict()[k], v) for k, v in saved.items())


def _leave_crash_debris(store: Storage, source: str, step_name: str) -> str:
    """What a process killed mid-save leaves: data files, no manifest (on object stores the
    writer's UNCOMMITTED marker, written first, says so)."""
    debris = step_name if not store.atomic_rename else f".tmp-{step_name}-dead0000"
    store.makedirs(debris)
    if not store.atomic_rename:
        put(store, f"{debris}/UNCOMMITTED", b"save\n")
    for fname in store.listdir(source):
        if fname != MANIFEST:
            put(store, f"{debris}/{fname}", store.read_bytes(f"{source}/{fname}"))
    return debris


def test_crash_debris_is_ignored_then_cleaned_by_the_next_save(store_url: str) -> None:
    state, _ = _state(5)
    with cg.CheckpointManager(store_url) as mgr:
        mgr.save(1, state, force=True)
        mgr.save(2, state, force=True)
    store = open_storage(store_url)
    debris = _leave_crash_debris(store, "step-000000002", "step-000000003")
    assert [c.step for c in scan(store)] == [1, 2]
    assert find_debris(store) == [debris]
    state2, _ = _state(6)
    with cg.CheckpointManager(store_url) as mgr2:
        assert mgr2.restore(state2) == 2
        mgr2.save(3, state2, force=True)
    assert find_debris(store) == []
    assert [c.step for c in scan(store)] == [1, 2, 3]
    assert cg.verify(store_url).ok


# ---- object-store specifics ---------------------------------------------------------------------


def test_s3_large_file_goes_up_in_parts(s3_url: str) -> None:
    from ckptguard.storage import FsspecStorage

    store = FsspecStorage(s3_url, block_size=5 * 2**20)
    data = torch.randint(0, 255, (12 * 2**20,), dtype=torch.uint8).numpy().tobytes()
    put(store, "big.bin", data[: 7 * 2**20], data[7 * 2**20 :])
    etag = str(store.fs.info(store._p("big.bin"))["ETag"]).strip('"')
    assert etag.endswith("-3"), f"expected a 3-part multipart upload, ETag is {etag}"
    assert store.read_bytes("big.bin") == data


def test_s3_storage_options_reach_the_client(s3_url: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}, "skip_instance_cache": True}
    state, _ = _state(7)
    with cg.CheckpointManager(s3_url, storage_options=opts) as mgr:
        mgr.save(5, state, force=True)
    assert [c.step for c in scan(open_storage(s3_url, opts))] == [5]


def test_cli_ls_and_verify_on_an_s3_url(s3_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from ckptguard.cli import main

    state, _ = _state(8)
    with cg.CheckpointManager(s3_url) as mgr:
        mgr.save(4, state, force=True)
    assert main(["ls", s3_url, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in listing["checkpoints"]] == [4]
    assert main(["verify", s3_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["verify", f"{s3_url}/step-000000004", "--json"]) == 0


def _flaky(fn: Callable[..., Any], failures: int, calls: list[int]) -> Callable[..., Any]:
    def wrapped(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionResetError(104, "connection reset by peer (injected)")
        return fn(*a, **kw)

    return wrapped


@pytest.mark.parametrize("kind", ["memory", "s3"])
def test_transient_errors_are_retried(kind: str, request: pytest.FixtureRequest) -> None:
    from ckptguard.storage import FsspecStorage
    from ckptguard.storage.retry import RetryPolicy

    url = request.getfixturevalue("s3_url") if kind == "s3" else f"memory://cg-{uuid.uuid4().hex[:8]}/r"
    store = FsspecStorage(url, retry=RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.01))
    store.makedirs("")
    for method in ("pipe_file", "cat_file", "open"):
        calls: list[int] = []
        original = getattr(store.fs, method)
        setattr(store.fs, method, _flaky(original, 2, calls))
        try:
            put(store, "obj", b"payload")
            store.replace_file("small", b"s")
            assert store.read_bytes("obj") == b"payload"
            with store.open_read("obj") as fh:  # reads through a handle are retried too
                fh.seek(3)
                assert fh.read() == b"load"
        finally:
            setattr(store.fs, method, original)
        assert len(calls) >= 3, method


def test_reads_through_a_handle_are_retried_range_by_range() -> None:
    from ckptguard.storage import FsspecStorage
    from ckptguard.storage.retry import RetryPolicy

    store = FsspecStorage(f"memory://cg-{uuid.uuid4().hex[:8]}/r", retry=RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0))
    store.makedirs("")
    data = bytes(range(256)) * 8192  # 2 MiB: two ranges of the 1 MiB read buffer
    put(store, "obj", data)
    calls: list[int] = []
    original = store.fs.cat_file
    store.fs.cat_file = _flaky(original, 2, calls)  # type: ignore[method-assign]
    try:
        with store.open_read("obj") as fh:
            assert fh.read(10) == data[:10]  # range 1: two resets, then the bytes
            assert len(calls) == 3
            fh.seek(2**20 + 5)
            assert fh.read(7) == data[2**20 + 5 : 2**20 + 12]  # range 2: one request
            assert len(calls) == 4
    finally:
        store.fs.cat_file = original  # type: ignore[method-assign]


def test_permanent_errors_are_not_retried() -> None:
    from ckptguard.storage.retry import RetryPolicy

    calls: list[int] = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        RetryPolicy(attempts=5, base_delay=0.0, max_delay=0.0).call(missing)
    assert calls == [1]
    calls.clear()
    with pytest.raises(ConnectionError):
        RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0).call(_flaky(lambda: None, 10, calls))
    assert len(calls) == 3


def test_retry_policy_validates_and_caps_delays() -> None:
    import random

    from ckptguard.storage.retry import RetryPolicy

    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError, match="max_delay"):
        RetryPolicy(base_delay=2.0, max_delay=1.0)
    p = RetryPolicy(attempts=10, base_delay=0.5, max_delay=4.0)
    rng = random.Random(0)
    delays = [p.delay(k, rng) for k in range(1, 10) for _ in range(50)]
    assert all(0.0 <= d <= 4.0 for d in delays)
    assert max(p.delay(1, rng) for _ in range(200)) <= 0.5


# ---- ckptguard.testing.FaultyStorage over every backend ----------------------------------------


def test_faulty_storage_counts_methods_and_paths_and_fails_the_kth(store: Storage) -> None:
    store.makedirs(".trash-a")
    store.makedirs("other")
    put(store, ".trash-a/f", b"f")
    put(store, ".trash-a/kept", b"k")
    put(store, "other/g", b"g")
    fs = FaultyStorage(store, fail_at=1, ops={"remove_tree"}, path=".trash-*")
    fs.remove_file(".trash-a/f")  # not a remove_tree: not counted
    fs.remove_tree("other")  # not on a matching path: not counted
    assert fs.count == 0 and not store.exists("other")
    with pytest.raises(StorageError, match="injected fault #1") as ei:
        fs.remove_tree(".trash-a")
    assert isinstance(ei.value, OSError)
    assert fs.failed is not None and (fs.failed.op, fs.failed.call, fs.failed.path) == ("delete", "remove_tree", ".trash-a")
    assert store.listdir(".trash-a") == ["kept"]  # the failed operation did nothing


def test_faulty_storage_counts_reads_only_when_asked(store: Storage) -> None:
    put(store, "f", b"payload")
    assert count_ops(FaultyStorage(store), lambda: store.read_bytes("f")) == 0
    fs = FaultyStorage(store, fail_at=2, ops={"read"})
    assert fs.read_bytes("f") == b"payload"
    with pytest.raises(StorageError):
        fs.open_read("f")
    assert [e.call for e in fs.log] == ["read_bytes", "open_read"]


def test_faulty_storage_crash_is_a_base_exception_and_the_process_stays_dead(store: Storage) -> None:
    fs = FaultyStorage(store, fail_at=2, ops={"create"}, crash=True, plain_writers=True)
    w = fs.create("first")
    assert not hasattr(w, "pwritev")  # plain writers: every byte goes through a counted write()
    with pytest.raises(SimulatedCrash):
        fs.create("second")
    assert not issubclass(SimulatedCrash, Exception)
    for change in (lambda: w.write(b"x"), lambda: w.close(), lambda: fs.makedirs("d"), lambda: fs.replace_file("r", b"r")):
        with pytest.raises(SimulatedCrash, match="after the crash"):
            change()
    w.abort()  # a dead process cleans nothing up: no error, nothing done
    assert fs.listdir("") == store.listdir("") and not store.exists("r")  # reads still work
    fs.arm(None)  # a new process
    put(fs, "second", b"2")
    assert store.read_bytes("second") == b"2"
