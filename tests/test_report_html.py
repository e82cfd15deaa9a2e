"""``ckptguard report RUN -o report.html`` on a real run, rendered in headless Chromium.

The run: session 1 is SIGKILLed at step 13, session 2 is preempted (a real SIGTERM) at step 22,
session 3 trips the LossGuard on a NaN loss at step 34, rolls back to 30 and finishes at 40 with a
changed config (and a non-persistent buffer that makes checkpoint 40 fail its probe verification);
then a checkpoint's bytes are damaged and ``ckptguard verify`` finds it. The
report is rendered by Chromium (``--dump-dom``, ``--screenshot``): the page shows every session with
how it ended and the checkpoint marks, and the chart area has drawn pixels. Chromium is
``/usr/bin/chromium``: missing, the rendering tests fail when ``CI`` is set and skip otherwise.

``CKPTGUARD_REPORT_PNG=/tmp/report.png`` keeps a copy of the screenshot to look at.

Run as a script, this file is the training child: ``python test_report_html.py RUN MODE``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_cli_endings import run_cli

CHROMIUM = "/usr/bin/chromium"
TOTAL = 40


def child(run: str, mode: str) -> None:
    """One session of the training run (``mode``: kill, preempt, nan)."""
    import torch

    import ckptguard as cg
    from trainlib import make_setup, train_step

    s = make_setup()
    state = s["state"]
    if mode == "nan":
        state.config = {"lr": 5e-3, "hidden": 32}  # a config change the report shows
        # rot the probe verification catches: state that is not saved (a non-persistent buffer)
        # changes what the model computes, so the checkpoint loaded back runs differently
        s["model"].register_buffer("out_scale", torch.ones(1), persistent=False)
        s["model"].register_forward_hook(lambda mod, _inp, out: out * mod.out_scale)
    retention = cg.Retention(keep_last=6, keep_best=1, metric="loss", mode="min")
    g = torch.Generator().manual_seed(7)
    mgr = cg.CheckpointManager(run, every_steps=5, retention=retention, probe=torch.randn(4, 8, generator=g))
    guard = cg.LossGuard(mgr, window=8)
    step = mgr.restore(state) or 0
    with mgr.preemption_guard():
        while step < TOTAL:
            for xb, yb in s["loader"]:
                loss = train_step(s, xb, yb)
                step += 1
                if mode == "kill" and step == 13:
                    os.kill(os.getpid(), signal.SIGKILL)
                if mode == "nan" and step == 34 and not guard.trips:
                    loss = float("nan")
                if guard.check(step, loss):
                    step = guard.rollback(state)
                    break
                if mode == "preempt" and step == 22:
                    os.kill(os.getpid(), signal.SIGTERM)  # the guard saves at this save() and exits
                if mode == "nan" and step == TOTAL:
                    s["model"].out_scale.fill_(1.5)  # checkpoint 40 fails its verification
                mgr.save(step, state, metrics={"loss": loss, "lr": s["opt"].param_groups[0]["lr"]})
                if step >= TOTAL:
                    break
    mgr.save(step, state, force=True)
    mgr.close()


def hang_child(run: str) -> None:
    """A session that hangs after step 7 (committed: 5): the watchdog ends it."""
    import time

    import ckptguard as cg
    from trainlib import make_setup, train_step

    s = make_setup()
    mgr = cg.CheckpointManager(run, every_steps=5)
    step = mgr.restore(s["state"]) or 0
    with mgr.watchdog(1.5):
        for xb, yb in s["loader"]:
            step += 1
            mgr.save(step, s["state"], metrics={"loss": train_step(s, xb, yb)})
            if step == 7:
                time.sleep(60)  # a stuck collective, a deadlocked data loader


def _session(run: Path, mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, __file__, str(run), mode], env=env, timeout=300).returncode


def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; CI must install Debian's chromium to render the report")
    pytest.skip(f"{CHROMIUM} is not installed")


def render(html: Path, tmp: Path, *, screenshot: Path | None = None) -> str:
    """The DOM Chromium builds from ``html`` (and a screenshot), offline."""
    args = [chromium_or_skip(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp / 'chromium-profile'}"]
    args += [f"--screenshot={screenshot}", "--window-size=1400,3000"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*args, html.as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit PNG, with zlib alone."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, kind = 8, b"", 0, 0, 0
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            width, height, depth, kind = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big"), body[8], body[9]
            assert depth == 8 and body[12] == 0, "8-bit, not interlaced"
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    bpp = {2: 3, 6: 4}[kind]
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b, c = prev[x], prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def coloured(rows: list[bytes], bpp: int, box: tuple[int, int, int, int]) -> int:
    """Pixels in ``box`` (x0, y0, x1, y1) that are clearly coloured (not white, grey or black)."""
    x0, y0, x1, y1 = box
    n = 0
    for row in rows[y0:y1]:
        for x in range(x0, x1):
            r, g, b = row[x * bpp], row[x * bpp + 1], row[x * bpp + 2]
            n += max(r, g, b) - min(r, g, b) > 60
    return n


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ckptguard.cli import main

    run = tmp_path_factory.mktemp("report") / "run"
    assert _session(run, "kill") == -signal.SIGKILL
    assert _session(run, "preempt") != 0  # the preemption guard exits after its save
    assert _session(run, "nan") == 0
    victim = run / "step-000000035" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["verify", str(run)]) == 1  # the user's check finds and marks the damage
    return run


def test_report_of_a_real_run_rendered_in_chromium(real_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.cli import main

    out = tmp_path / "report.html"
    capsys.readouterr()
    assert main(["report", str(real_run), "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["outcome"] for s in summary["sessions"]] == ["killed", "preempted", "clean"]
    killed, preempted, finished = summary["sessions"]
    assert (killed["lost_min"], killed["lost_max"]) == (0, 4)  # killed at 13 after committing 10; saves every 5
    assert preempted["lost_steps"] == 0
    assert finished["rollbacks"] == 1 and finished["lost_steps"] == 4  # NaN at 34, rolled back to 30
    assert summary["marks"] == {
        "kept": [], "best": [30], "verified": [15, 20, 22, 25], "failed": [40], "corrupt": [35], "pruned": [5, 10],
        "slimmed": [],
    }
    text = out.read_text()
    assert "<script" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text and "<link" not in text  # self-contained: nothing to fetch

    dom = render(out, tmp_path)
    table = dom[dom.index('class="sessions"'):]
    cells = re.findall(r'<span class="badge"[^>]*>([^<]+)</span>', table[:table.index("</table>")])
    assert cells == ["killed", "preempted", "clean", "NaN rollback"]
    assert "rolled back to step 30, 4 steps trained again" in dom
    assert "0–4" in dom or "0&ndash;4" in dom
    categories = re.findall(r'class="mark mark-(\w+)"', dom)
    assert {"kept", "best", "corrupt", "pruned", "failed"} <= set(categories), categories
    # the config change of session 3, between its first checkpoint and the last one before it
    assert re.search(r"<td>22 \S+ 25</td><td>config</td><td>lr</td><td>0\.01</td><td>0\.005</td>", dom), dom[-4000:]
    # doctor on the newest checkpoint (40): it failed its verification
    assert "(step 40): 1 error(s)" in dom and "status.failed" in dom
    assert "marked corrupt" in dom and "step-000000035" in dom  # the damage verify found, in the table

    shot = tmp_path / "report.png"
    render(out, tmp_path, screenshot=shot)
    if os.environ.get("CKPTGUARD_REPORT_PNG"):
        shutil.copy(shot, os.environ["CKPTGUARD_REPORT_PNG"])
    width, height, rows = png_pixels(shot)
    assert (width, height) == (1400, 3000)
    bpp = len(rows[0]) // width
    assert coloured(rows, bpp, (0, 0, width, height)) > 5000  # not blank
    # the first chart (the loss curve with its marks) lies in the top third of the page
    assert coloured(rows, bpp, (150, 250, 1250, 700)) > 800


def test_report_from_s3(s3_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.cli import main
    from trainlib import run_training

    run_training(s3_url, 12, every_steps=5, async_save=True)
    out = tmp_path / "s3.html"
    assert main(["report", s3_url, "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoints"] == 2 and [s["outcome"] for s in summary["sessions"]] == ["clean"]
    text = out.read_text()
    assert s3_url in text and 'class="mark mark-best"' in text
    assert "seconds training was blocked (async saves)" in text and "<title>blocked seconds</title>" in text


def test_a_hang_and_a_slimmed_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.format.manifest import encode_manifest

    run = tmp_path / "run"
    assert _session(run, "hang") == 75  # the watchdog's exit code
    manifest = json.loads((run / "step-000000005" / "MANIFEST.json").read_text())
    manifest["slimmed"] = {"dropped": ["optimizer.safetensors"]}  # what slimming leaves in a manifest
    (run / "step-000000005" / "MANIFEST.json").write_bytes(encode_manifest(manifest))
    out = tmp_path / "r.html"
    code, stdout, _ = run_cli(capsys, "report", run, "-o", out, "--json", "--no-doctor")
    assert code == 0
    (hung,) = json.loads(stdout)["sessions"]
    assert hung["outcome"] == "hang" and hung["lost_steps"] == 2  # hung after step 7, committed 5
    dom = render(out, tmp_path)
    assert 'data-slimmed="1"' in dom and "slimmed (1)" in dom and "+ slimmed" in dom
    assert re.search(r'class="badge"[^>]*>hang<', dom) and "hung after step 7" in dom


def test_a_long_curve_is_thinned_keeping_its_spikes() -> None:
    from ckptguard.report.htmlreport import MAX_POINTS, thin

    pts = [(float(i), 1.0) for i in range(100_000)]
    pts[54_321] = (54_321.0, 50.0)  # one spike
    out = thin(pts)
    assert len(out) <= MAX_POINTS + 2 and (54_321.0, 50.0) in out
    assert [p[0] for p in out] == sorted(p[0] for p in out)


HOSTILE = "<script>alert(1)</script>"


def _hostile_run(run: Path) -> None:
    import torch
    from torch import nn

    import ckptguard as cg

    m = nn.Linear(3, 2)
    with cg.CheckpointManager(run) as mgr:
        for s in (5, 10):
            mgr.save(s, cg.TrainState(model=m, config={HOSTILE: 1}), metrics={HOSTILE: 1.0 / s, "loss": 0.5}, force=True)
    with torch.no_grad():
        m.weight.add_(1)


def test_hostile_names_are_text_not_markup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.cli import main

    run = tmp_path / "run"
    _hostile_run(run)
    out = tmp_path / "r.html"
    assert main(["report", str(run), "-o", str(out), "--no-doctor"]) == 0
    text = out.read_text()
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    dom = render(out, tmp_path)
    assert "<script" not in dom.lower() and "&lt;script&gt;alert(1)" in dom  # shown as text in the page


@pytest.mark.parametrize("damage", ["run_record", "sessions", "history", "metrics", "manifest"])
def test_malformed_run_files_are_shown_not_fatal(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.cli import main

    run = tmp_path / "run"
    _hostile_run(run)
    if damage == "run_record":
        (run / "ckptguard.json").write_text("{not json")
    elif damage == "sessions":
        (run / "ckptguard.json").write_text(json.dumps({"sessions": [
            {"start": "yesterday"}, 7, {"start": 1e300, "last_seen": -5, "resumed_from": "x", "hang": 5, "saves": None},
        ]}))
    elif damage == "history":
        (run / "history.jsonl").write_bytes(b"\x00garbage\n{]\n")
    elif damage == "metrics":
        (run / "metrics.csv").write_text('"' + "x" * 200_000 + "\n1,2\n")
    else:
        (run / "step-000000005" / "MANIFEST.json").write_text('{"step": "five"')
    out = tmp_path / "r.html"
    capsys.readouterr()
    assert main(["report", str(run), "-o", str(out), "--json"]) == 0
    problems = json.loads(capsys.readouterr().out)["problems"]
    expected = {"run_record": "ckptguard.json", "sessions": "session #1 is malformed", "history": "history.jsonl",
                "metrics": "metrics.csv", "manifest": "step-000000005"}[damage]
    assert any(expected in p for p in problems), problems
    assert "Problems reading the run" in out.read_text() and expected in out.read_text()


def test_report_of_a_sharded_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "fixtures" / "fsdp-legacy-run", run)  # FSDP2/DCP, written by an older version
    out = tmp_path / "r.html"
    code, stdout, _ = run_cli(capsys, "report", run, "-o", out, "--json")
    assert code == 0 and json.loads(stdout)["checkpoints"] == 1
    text = out.read_text()
    assert "(step 2)" in text and "sharded.unchecked" in text  # the doctor's finding for the newest


def test_report_endings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    def ending(*argv: Any) -> tuple[int, str]:
        code, out, err = run_cli(capsys, *argv)
        return code, f"{out} {err}"

    code, msg = ending("report", tmp_path / "nope", "-o", tmp_path / "r.html")
    assert code == 2 and "does not exist" in msg
    run = tmp_path / "run"
    _hostile_run(run)
    code, msg = ending("report", run / "step-000000005", "-o", tmp_path / "r.html")
    assert code == 2 and "is a checkpoint directory; 'report' works on a whole run" in msg
    code, msg = ending("report", run, "-o", tmp_path)
    assert code == 2 and "is a directory" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    code, msg = ending("report", empty, "-o", tmp_path / "e.html")
    assert code == 0 and "0 checkpoint(s)" in msg and (tmp_path / "e.html").exists()
    code, msg = ending("report", run, "-o", tmp_path / "r.html", "--model", "no_such_module:f")
    assert code == 2 and "no_such_module" in msg


if __name__ == "__main__":
    if sys.argv[2] == "hang":
        hang_child(sys.argv[1])
    else:
        child(sys.argv[1], sys.argv[2])
