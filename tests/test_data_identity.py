"""Data identity in the data position (issue 18): a dataset changed between save and resume is caught.

The runs here are real: a DataLoader with two workers, a ResumableSampler that shuffles, random
augmentation in ``__getitem__`` (numpy, python ``random`` and torch draws), saves through a
CheckpointManager, and a second process-like session that resumes over a dataset that grew by one
sample, was reordered, holds other samples at the same length, or is unchanged.

``tests/fixtures/pre-identity-run`` was written by the ckptguard of the commit before this
feature (``git archive`` of it on PYTHONPATH) with::

    torch.manual_seed(0)
    ds = TensorDataset(torch.arange(40.0).reshape(20, 2))
    loader = DataLoader(ds, batch_size=4, sampler=cg.ResumableSampler(ds, shuffle=True, seed=0))
    state = cg.TrainState(model=torch.nn.Linear(2, 1), dataloader=loader)
    it = iter(loader)
    for _ in range(3):
        next(it)
    with cg.CheckpointManager(out, lock=False) as mgr:
        mgr.save(3, state, force=True)
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ckptguard as cg
from ckptguard.capture.data_identity import DatasetChangedError, fingerprint, identify, sample_indices
from ckptguard.verification.doctor import doctor

SRC = Path(__file__).resolve().parent.parent / "src"
FIXTURE = Path(__file__).parent / "fixtures" / "pre-identity-run"
N, TOTAL, STOP = 48, 10, 3  # 6 batches of 8 per epoch: the stop is mid-epoch (sample 24)
Data = tuple[torch.Tensor, torch.Tensor]


class Points(Dataset[Data]):
    """Samples with the augmentation users write: numpy, python ``random`` and torch draws."""

    def __init__(self, data: Data) -> None:
        self.x, self.y = data

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Data:
        x = self.x[i]
        x = torch.roll(x, int(np.random.randint(0, x.numel()))) * (1.0 + 0.1 * random.random())
        return x + 0.05 * torch.randn(x.shape), self.y[i]


def base_data(n: int = N, seed: int = 123) -> Data:
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return x, (x.sum(1) > 0).long()


def grown() -> Data:
    x, y = base_data(N + 1)  # the same 48 samples and one more
    return x, y


def shuffled() -> Data:
    x, y = base_data()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(7))
    return x[perm], y[perm]


def replaced() -> Data:
    return base_data(seed=999)


def setup(data: Data, *, version: str | None = None, workers: int = 2) -> dict[str, Any]:
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds = Points(data)
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0, dataset_version=version)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers)
    state = cg.TrainState(model=model, optimizer=opt, dataloader=loader, config={"lr": 1e-2})
    return {"model": model, "opt": opt, "loader": loader, "state": state, "sampler": sampler}


def train(
    run: Path, data: Data, total: int = TOTAL, *, stop_at: int | None = None, strict: bool = True,
    version: str | None = None, retention: cg.Retention | None = None, workers: int = 2,
) -> dict[str, Any]:
    """Train (resuming from ``run``) to ``total`` or ``stop_at``; the setup, the restored step
    and the restore report come back."""
    s = setup(data, version=version, workers=workers)
    kw: dict[str, Any] = {"retention": retention} if retention is not None else {}
    with cg.CheckpointManager(run, every_steps=4, **kw) as mgr:
        s["restored"] = step = mgr.restore(s["state"], strict=strict) or 0
        s["report"] = mgr.last_restore_report
        s["position"] = (s["sampler"].epoch, s["sampler"].position)
        while step < total and step != stop_at:
            for xb, yb in s["loader"]:
                loss = nn.functional.cross_entropy(s["model"](xb), yb)
                s["opt"].zero_grad(set_to_none=True)
                loss.backward()
                s["opt"].step()
                step += 1
                mgr.save(step, s["state"], metrics={"loss": float(loss.detach())})
                if step in (total, stop_at):
                    break
        mgr.save(step, s["state"], force=True)
    s["weights"] = {k: v.detach().clone() for k, v in s["model"].state_dict().items()}
    return s


def ckpt_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("ckptguard") and r.levelno >= logging.WARNING]


def assert_nothing_marked(run: Path) -> None:
    assert not list(run.rglob("STATUS.json"))
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert all(c.valid and c.status not in ("corrupt", "failed") for c in mgr.checkpoints())


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run stopped mid-epoch at step 3 over the base dataset (kept pristine: copy it)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    train(run, base_data(), stop_at=STOP)
    return run


@pytest.fixture
def run(saved_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved_run, tmp_path / "run")
    return tmp_path / "run"


# ---- resume over a changed dataset ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "change"),
    [(grown, "(48 -> 49 samples)"), (shuffled, "(other content)"), (replaced, "(other content)")],
    ids=["grown-by-one", "reordered", "replaced-same-length"],
)
def test_strict_restore_over_a_changed_dataset_raises_and_marks_nothing(run: Path, make: Any, change: str) -> None:
    fresh = {k: v.clone() for k, v in setup(make(), workers=0)["model"].state_dict().items()}
    with pytest.raises(DatasetChangedError) as e:
        train(run, make())
    msg = str(e.value)
    assert isinstance(e.value, cg.StateMismatchError)
    assert msg.split(": ")[0].endswith("step-000000003"), msg
    assert "TrainState(dataloader=...), over Points" in msg and change in msg
    assert "saved over 48 samples, content fingerprint xxh3:" in msg
    assert "epoch 0, sample 24" in msg and "strict=False" in msg and "dataset_version" in msg
    if make is grown:
        assert "today 49 samples, content fingerprint xxh3:" in msg
    else:
        assert "today 48 samples, content fingerprint xxh3:" in msg and e.value.saved.fingerprint != e.value.now.fingerprint
    assert e.value.saved.length == N
    assert_nothing_marked(run)
    # nothing was loaded into the live objects: a restore that raises leaves them as constructed
    s = setup(make(), workers=0)
    with cg.CheckpointManager(run) as mgr, pytest.raises(DatasetChangedError):
        mgr.restore(s["state"])
    assert all(torch.equal(fresh[k], v) for k, v in s["model"].state_dict().items())
    assert (s["sampler"].epoch, s["sampler"].position) == (0, 0)


def test_non_strict_resume_over_a_grown_dataset_warns_and_goes_on(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        s = train(run, grown(), strict=False)
    assert s["restored"] == STOP  # the newest checkpoint: no fallback
    assert s["position"] == (0, 24)  # the saved epoch and position, in the new dataset's order
    [msg] = [m for m in ckpt_warnings(caplog) if "dataset" in m]
    assert msg.startswith("Sampler: the dataset changed since the save (48 -> 49 samples): saved over 48 samples, "
                          "content fingerprint xxh3:")
    assert "resuming at epoch 0, position 24 of the new dataset's order" in msg
    assert_nothing_marked(run)
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.latest() is not None and mgr.latest().step == TOTAL  # type: ignore[union-attr]


def test_unchanged_dataset_resumes_bit_identical_without_a_warning(
    run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = train(tmp_path / "ref", base_data())["weights"]
    with caplog.at_level(logging.WARNING):
        s = train(run, base_data())
    assert s["restored"] == STOP and s["position"] == (0, 24)
    assert ckpt_warnings(caplog) == []
    assert s["report"].notes == []
    assert reference.keys() == s["weights"].keys() and all(torch.equal(reference[k], s["weights"][k]) for k in reference)


def test_dataset_version_bumped_is_caught_and_unchanged_skips_the_content(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    train(run, base_data(), stop_at=STOP, version="v1", workers=0)
    with pytest.raises(DatasetChangedError, match=r"dataset_version 'v1' -> 'v2'") as e:
        train(run, base_data(), version="v2", workers=0)
    assert "saved over 48 samples, dataset_version 'v1'; today 48 samples, dataset_version 'v2'" in str(e.value)
    assert_nothing_marked(run)
    # the same version declared: the content is the user's word (another content is not looked at)
    with caplog.at_level(logging.WARNING):
        s = train(run, replaced(), version="v1", workers=0)
    assert s["restored"] == STOP and ckpt_warnings(caplog) == []


class CountingReads(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.reads += 1
        return i


def test_a_declared_version_never_reads_items() -> None:
    ds = CountingReads(1000)
    state = cg.ResumableSampler(ds, dataset_version="2026-05").state_dict()
    assert ds.reads == 0 and state["dataset"]["version"] == "2026-05" and state["dataset"]["fingerprint"] is None
    ds.dataset_version = 7  # type: ignore[attr-defined]
    assert cg.ResumableSampler(ds).identity().version == "7" and ds.reads == 0
    with pytest.raises(TypeError, match="dataset_version must be a str or an int"):
        cg.ResumableSampler(ds, dataset_version=1.5)  # type: ignore[arg-type]


def test_sampler_only_state_names_the_sampler(tmp_path: Path) -> None:
    def state(data: Data) -> cg.TrainState:
        return cg.TrainState(model=nn.Linear(8, 2), sampler=cg.ResumableSampler(Points(data), seed=0))

    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, state(base_data()), force=True)
    with cg.CheckpointManager(tmp_path / "run") as mgr, pytest.raises(DatasetChangedError, match=r"\(TrainState\(sampler=\.\.\.\), over Points\)"):
        mgr.restore(state(shuffled()))


# ---- retention, doctor, old checkpoints -----------------------------------------------------------


@pytest.mark.parametrize("changed", [True, False], ids=["data-changed", "control-unchanged"])
def test_keep_config_changes_keeps_the_checkpoint_before_a_data_change(tmp_path: Path, changed: bool) -> None:
    run, keep = tmp_path / "run", cg.Retention(keep_last=1, keep_config_changes=True)
    train(run, base_data(), 12, retention=keep, workers=0)  # checkpoints 4, 8, 12 over the base data
    later = grown() if changed else base_data()
    train(run, later, 20, strict=False, retention=keep, workers=0)  # 16, 20 over the new data
    train(run, later, 28, retention=keep, workers=0)  # resumes from 20: 24, 28
    with cg.CheckpointManager(run, lock=False) as mgr:
        kept = {c.step: c for c in mgr.checkpoints()}
    assert 28 in kept and 4 not in kept and 8 not in kept
    assert (12 in kept) is changed
    if changed:
        assert kept[12].manifest["config_hash"] != kept[28].manifest["config_hash"]  # type: ignore[index]


def test_doctor_reports_the_changed_dataset_and_what_was_recorded(saved_run: Path) -> None:
    report = doctor(saved_run, setup(grown(), workers=0)["state"])
    [f] = [f for f in report.findings if f.code.startswith("data.")]
    assert (f.severity, f.code) == ("error", "data.changed") and not report.ok
    assert f.message.startswith("the dataset changed since the save (48 -> 49 samples): the saved position (epoch 0, sample 24)")
    assert f.details[0].startswith("saved: 48 samples, content fingerprint xxh3:")
    assert f.details[1].startswith("today: 49 samples, content fingerprint xxh3:")
    [f] = [f for f in doctor(saved_run, None).findings if f.code.startswith("data.")]
    assert (f.severity, f.code) == ("info", "data.recorded")
    assert "counts over Points: 48 samples, content fingerprint xxh3:" in f.message
    same = doctor(saved_run, setup(base_data(), workers=0)["state"])
    assert not [f for f in same.findings if f.code.startswith("data.")]


def test_doctor_cli_with_a_factory_of_today(saved_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.cli import main

    factory = tmp_path / "today.py"
    factory.write_text("from test_data_identity import grown, setup\n\ndef make():\n    return setup(grown(), workers=0)['state']\n")
    capsys.readouterr()
    code = main(["doctor", str(saved_run), "--model", f"{factory}:make", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["exit_code"] == 1
    [f] = [f for f in out["findings"] if f["code"] == "data.changed"]
    assert f["severity"] == "error" and f["details"][1].startswith("today: 49 samples, content fingerprint xxh3:")


def fixture_state(n: int) -> tuple[cg.TrainState, cg.ResumableSampler]:
    ds = TensorDataset(torch.arange(2.0 * n).reshape(n, 2))
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0)
    return cg.TrainState(model=nn.Linear(2, 1), dataloader=DataLoader(ds, batch_size=4, sampler=sampler)), sampler


@pytest.mark.parametrize("n", [20, 21], ids=["same-length", "grown"])
def test_an_old_checkpoint_without_identity_restores_with_no_check(tmp_path: Path, n: int, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    state, sampler = fixture_state(n)
    with caplog.at_level(logging.WARNING), cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(state) == 3
    assert (sampler.epoch, sampler.position) == (0, 12)
    expected = [] if n == 20 else ["Sampler: the dataset had 20 samples when saved and has 21 now; the resumed epoch order differs from the original run."]
    assert ckpt_warnings(caplog) == expected
    [f] = [f for f in doctor(run, state).findings if f.code.startswith("data.")]
    assert f.code == "data.unrecorded" and "only the length (20) is compared" in f.message


# ---- the fingerprint ------------------------------------------------------------------------------


def test_fingerprinting_leaves_every_global_generator_where_it_was() -> None:
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    ident = identify(Points(base_data()), N)
    assert ident.fingerprint is not None and ident.fingerprint == identify(Points(base_data()), N).fingerprint
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])


class Raises(Dataset[int]):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        raise OSError("the bucket is gone")


class OwnGenerator(Dataset[Any]):
    def __init__(self) -> None:
        self.g = np.random.default_rng()

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> Any:
        return self.g.random(3)


@pytest.mark.parametrize(
    ("ds", "note"),
    [
        (Raises(), "reading items failed (OSError: the bucket is gone)"),
        (OwnGenerator(), "items differ between two reads"),
        ([object(), object()], "the items hold nothing ckptguard can hash"),
    ],
    ids=["getitem-raises", "own-generator", "opaque-items"],
)
def test_exotic_datasets_give_no_fingerprint_and_never_break_a_save(tmp_path: Path, ds: Any, note: str) -> None:
    sampler = cg.ResumableSampler(ds, seed=0)
    assert sampler.identity().fingerprint is None and sampler.identity().note.startswith(note)
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.save(1, cg.TrainState(sampler=sampler), force=True)
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(cg.TrainState(sampler=cg.ResumableSampler(ds, seed=0))) == 1


def test_exotic_items_hash_by_content() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Rec:
        a: Any
        b: Any

    items = [torch.ones(3, dtype=torch.bfloat16), np.array(["a", None], dtype=object), Rec(1, {"k": b"x"}), 2.5 + 1j,
             torch.zeros(0, 4), np.float32(1.5), memoryview(b"mem"), [[[[[[[[[[1]]]]]]]]]]]
    one = fingerprint(items, len(items))[0]
    assert one is not None and one == fingerprint(list(items), len(items))[0]
    items[2] = Rec(1, {"k": b"y"})
    assert fingerprint(items, len(items))[0] != one


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(-1e6, 1e6), st.text(max_size=12), st.binary(max_size=12),
)
tensors = st.builds(
    lambda vals, dtype: torch.tensor(vals, dtype=torch.float32).to(dtype),
    st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=8),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bfloat16, torch.float16]),
)
arrays = st.builds(lambda vals: np.array(vals, dtype=np.int32), st.lists(st.integers(-1000, 1000), min_size=1, max_size=8))
items = st.recursive(
    st.one_of(scalars, tensors, arrays),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6,
)
datasets = st.lists(items, max_size=40)

CHILD = """
import pickle, sys, json
from ckptguard.capture.data_identity import fingerprint
data = pickle.load(open(sys.argv[1], "rb"))
print(json.dumps([fingerprint(d, len(d))[0] for d in data]))
"""


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(datasets, min_size=6, max_size=6))
def test_fingerprint_is_the_same_in_another_process(data: list[list[Any]]) -> None:
    here = [fingerprint(d, len(d))[0] for d in data]
    assert all(h is not None for h, d in zip(here, data, strict=True) if d)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.pkl")
        with open(path, "wb") as fh:
            pickle.dump(data, fh)
        env = dict(os.environ, PYTHONPATH=str(SRC), PYTHONHASHSEED=str(random.randrange(1, 2**31)))
        out = subprocess.run([sys.executable, "-c", CHILD, path], env=env, capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout) == here


def mutate(item: Any) -> Any:
    """Another item of the same kind, differing in content."""
    if isinstance(item, torch.Tensor):
        out = item.clone()
        out.view(-1)[0] += 1 if item.dtype.is_floating_point else 7
        return out if not torch.equal(out, item) else torch.cat([item, item[:1]])
    if isinstance(item, np.ndarray):
        return item + 1
    if isinstance(item, bool) or item is None:
        return 1 if item is None else not item
    if isinstance(item, (int, float)):
        return item + 1 if abs(item) < 1e9 else 0
    if isinstance(item, (str, bytes)):
        return item + ("x" if isinstance(item, str) else b"x")
    if isinstance(item, dict):
        return {**item, "\x00new": 1}
    return [*item, None] if isinstance(item, list) else (*item, None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(items, min_size=1, max_size=40), st.data())
def test_fingerprint_changes_when_a_sampled_item_changes(data: list[Any], draw: st.DataObject) -> None:
    """Every item when the dataset has 16 or fewer; the sampled indices of a larger one."""
    before = fingerprint(data, len(data))[0]
    i = draw.draw(st.sampled_from(sample_indices(len(data))))
    changed = [*data[:i], mutate(data[i]), *data[i + 1:]]
    assert before is not None and fingerprint(changed, len(changed))[0] != before
    assert sample_indices(len(data)) == sample_indices(len(data)) and (len(data) > 16 or sample_indices(len(data)) == list(range(len(data))))
