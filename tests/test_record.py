"""``kmm record``: end to end with a fake perf (a script that runs the
workload and writes the repo's sample perf.data) and a fake /proc made of
warm2's real files; and each refusal as one clear line with a non-zero
exit (no perf, perf_event_paranoid, tracefs, an existing directory)."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kmm
from kmm import cli
from kmm import record as rec_mod
from kmm._kmm import parse_proc
from kmm.recording import PROC_FILES

WARM2 = Path(kmm.__file__).parent / "data" / "warm2"
SAMPLE_DATA = Path(__file__).parent / "data" / "traces" / "sample.perf.data.xz"
SAMPLE_TXT = Path(kmm.__file__).parent / "data" / "sample.perf.txt.xz"
PREFIXES = ("pgalloc", "pgfree", "nr_free", "nr_slab", "compact", "thp_")

FAKE_PERF = """#!{python}
# A stand-in for perf record: logs its arguments, runs the workload after
# "--", then writes the repo's sample perf.data to the -o path.
import json, lzma, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_PERF_LOG"], "w") as f:
    json.dump(args, f)
if os.environ.get("FAKE_PERF_FAIL"):
    sys.stderr.write("event syntax error: 'vmalloc:*'\\n                     \\\\___ unknown tracepoint\\n\\n"
                     "Error:\\tFile /sys/kernel/tracing/events/vmalloc not found.\\n"
                     "Run 'perf list' for a list of valid events\\n")
    sys.exit(129)
rc = subprocess.call(args[args.index("--") + 1:])
with lzma.open({data!r}) as s, open(args[args.index("-o") + 1], "wb") as d:
    d.write(s.read())
sys.stderr.write("[ perf record: Captured and wrote 0.5 MB perf.data ]\\n")
sys.exit(rc)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake /proc (warm2's start files, kallsyms, perf_event_paranoid), tracefs and perf."""
    proc = tmp_path / "proc"
    (proc / "sys" / "kernel").mkdir(parents=True)
    for n in PROC_FILES:
        shutil.copy(WARM2 / f"start.{n}.txt", proc / n)
    with lzma.open(WARM2 / "kallsyms.txt.xz", "rt") as f:
        (proc / "kallsyms").write_text("".join(f.readline() for _ in range(2000)))
    (proc / "sys" / "kernel" / "perf_event_paranoid").write_text("2\n")
    tfs = tmp_path / "tracing"
    for s in ("kmem", "percpu", "vmalloc"):
        (tfs / "events" / s).mkdir(parents=True)
    perf = tmp_path / "bin" / "perf"
    perf.parent.mkdir()
    perf.write_text(FAKE_PERF.format(python=sys.executable, data=str(SAMPLE_DATA)))
    perf.chmod(0o755)
    log = tmp_path / "perf-args.json"
    for k, v in (("KMM_PROC_ROOT", proc), ("KMM_PERF", perf), ("KMM_TRACEFS", tfs), ("FAKE_PERF_LOG", log)):
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(rec_mod, "privileged", lambda: True)
    return {"proc": proc, "tracefs": tfs, "perf": perf, "log": log, "tmp": tmp_path}


def run(argv, capsys):
    rc = cli.main(["record", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_record_end_to_end(fake, capsys):
    out = fake["tmp"] / "bundle"
    rc, err = run(["-o", str(out), "--interval", "0.05", "--", "sleep", "0.3"], capsys)
    assert rc == 0, err
    assert f"kmm: wrote {out}: perf.data (" in err
    names = {p.name for p in out.iterdir()}
    assert names == {"perf.data", "samples.txt", "kallsyms.txt"} | {f"{w}.{n}.txt" for w in ("start", "end") for n in PROC_FILES}
    # perf ran as DESIGN.md §9 says, with the workload after "--".
    args = json.loads(fake["log"].read_text())
    assert args == ["record", "-k", "CLOCK_MONOTONIC", "-e", "kmem:*,percpu:*,vmalloc:*", "-a",
                    "-o", str(out / "perf.data"), "--", "sleep", "0.3"]  # fmt: skip
    with lzma.open(SAMPLE_DATA) as f:
        assert (out / "perf.data").read_bytes() == f.read()
    for n in PROC_FILES:
        assert (out / f"start.{n}.txt").read_bytes() == (fake["proc"] / n).read_bytes()
        assert (out / f"end.{n}.txt").read_bytes() == (fake["proc"] / n).read_bytes()
    assert (out / "kallsyms.txt").read_bytes() == (fake["proc"] / "kallsyms").read_bytes()
    # samples.txt: "@ <monotonic>", buddyinfo, pagetypeinfo, the selected vmstat lines.
    samples = parse_proc("samples", (out / "samples.txt").read_text())
    assert len(samples) >= 2  # one at the start, one after perf ended, ~6 between
    ts = [s["ts_ns"] for s in samples]
    assert ts == sorted(ts) and ts[-1] - ts[0] >= 300_000_000
    vm = {ln.split()[0]: int(ln.split()[1]) for ln in (fake["proc"] / "vmstat").read_text().splitlines()}
    want_vm = {k: v for k, v in vm.items() if k.startswith(PREFIXES)}
    assert "pgfree" in want_vm and "nr_free_pages" in want_vm and "compact_stall" in want_vm
    buddy = parse_proc("buddyinfo", (fake["proc"] / "buddyinfo").read_text())
    for s in samples:
        assert s["vmstat"] == want_vm
        assert s["buddyinfo"] == buddy
        assert s["pagetypeinfo"]["pageblock_order"] == 9
    # The bundle loads. Until kmm decodes perf.data, perf script's text of
    # the same perf.data stands beside it (DESIGN.md §9 allows both).
    shutil.copy(SAMPLE_TXT, out / "perf.txt.xz")
    rec = kmm.trace.load(out)
    assert len(rec) == 83084
    assert rec.bundle.warnings == []
    assert rec.bundle.start["zoneinfo"] == parse_proc("zoneinfo", (fake["proc"] / "zoneinfo").read_text())
    assert rec.start["zoneinfo"]["zones"][2]["managed"] == 2064384
    assert len(rec.samples) == len(samples)
    assert rec.kallsyms == out / "kallsyms.txt"
    for w in rec.warnings:  # at most: perf.data not decodable yet; the host's clock is not the trace's
        assert w.startswith(("perf.data: ", "samples.txt: the samples cover ")), w


def test_record_runs_from_the_command_line(fake):
    # A separate process (no monkeypatching): paranoid -1 lets it run as any user.
    (fake["proc"] / "sys/kernel/perf_event_paranoid").write_text("-1\n")
    out = fake["tmp"] / "b"
    r = subprocess.run([sys.executable, "-m", "kmm", "record", "-o", str(out), "--duration", "0.2"],
                       capture_output=True, text=True, env=dict(os.environ))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert json.loads(fake["log"].read_text())[-3:] == ["--", "sleep", "0.2"]
    assert (out / "perf.data").stat().st_size > 0


def test_missing_perf(fake, capsys, monkeypatch):
    out = fake["tmp"] / "b"
    monkeypatch.setenv("KMM_PERF", str(fake["tmp"] / "nope"))
    rc, err = run(["-o", str(out)], capsys)
    assert rc == 1
    assert err == (
        f"kmm: error: perf not found (KMM_PERF={fake['tmp'] / 'nope'} is not an executable): install it "
        "(Debian/Ubuntu: linux-perf or linux-tools-$(uname -r); Fedora: perf), or set KMM_PERF to its path\n"
    )
    assert not out.exists()
    monkeypatch.delenv("KMM_PERF")
    monkeypatch.setenv("PATH", str(fake["tmp"] / "empty"))
    rc, err = run(["-o", str(out)], capsys)
    assert rc == 1 and err.startswith("kmm: error: perf not found: install it (Debian/Ubuntu: linux-perf")
    assert len(err.splitlines()) == 1


def test_perf_event_paranoid(fake, capsys, monkeypatch):
    monkeypatch.setattr(rec_mod, "privileged", lambda: False)
    out = fake["tmp"] / "b"
    rc, err = run(["-o", str(out), "--duration", "0.1"], capsys)
    assert rc == 1
    assert err == (
        "kmm: error: kernel.perf_event_paranoid is 2: recording kernel tracepoints system-wide needs root "
        "(sudo kmm record ...), CAP_PERFMON, or `sudo sysctl kernel.perf_event_paranoid=-1`\n"
    )
    assert not out.exists()
    # 0 still forbids raw tracepoint samples (perf_allow_tracepoint: paranoid > -1).
    (fake["proc"] / "sys/kernel/perf_event_paranoid").write_text("0\n")
    rc, err = run(["-o", str(out), "--duration", "0.1"], capsys)
    assert rc == 1 and "perf_event_paranoid is 0" in err
    (fake["proc"] / "sys/kernel/perf_event_paranoid").write_text("-1\n")
    rc, err = run(["-o", str(out), "--duration", "0.1"], capsys)
    assert rc == 0, err
    assert (out / "perf.data").stat().st_size > 0


def test_existing_directory(fake, capsys):
    out = fake["tmp"] / "b"
    out.mkdir()
    (out / "notes").write_text("keep me")
    rc, err = run(["-o", str(out)], capsys)
    assert rc == 1 and err == f"kmm: error: {out} is not empty: choose another -o DIR or remove it\n"
    assert [p.name for p in out.iterdir()] == ["notes"]
    rc, err = run(["-o", str(out / "notes")], capsys)
    assert rc == 1 and err == f"kmm: error: {out / 'notes'} exists and is not a directory: choose another -o DIR or remove it\n"
    empty = fake["tmp"] / "empty"
    empty.mkdir()
    rc, err = run(["-o", str(empty), "--duration", "0.1"], capsys)
    assert rc == 0, err


def test_tracefs(fake, capsys, monkeypatch):
    out = fake["tmp"] / "b"
    unmounted = fake["tmp"] / "unmounted"
    unmounted.mkdir()
    monkeypatch.setenv("KMM_TRACEFS", str(unmounted))
    # Unprivileged (paranoid -1): perf cannot mount tracefs itself.
    monkeypatch.setattr(rec_mod, "privileged", lambda: False)
    (fake["proc"] / "sys/kernel/perf_event_paranoid").write_text("-1\n")
    rc, err = run(["-o", str(out)], capsys)
    assert rc == 1
    assert err == (
        f"kmm: error: tracefs is not mounted at {unmounted}: `sudo mount -t tracefs nodev /sys/kernel/tracing`, "
        "or run as root\n"
    )
    # Root: perf mounts it (tools/lib/api/fs/tracing_path.c); all three systems are asked for.
    monkeypatch.setattr(rec_mod, "privileged", lambda: True)
    rc, err = run(["-o", str(out), "--duration", "0.1"], capsys)
    assert rc == 0, err
    assert json.loads(fake["log"].read_text())[4] == "kmem:*,percpu:*,vmalloc:*"
    # A kernel without vmalloc tracepoints: recorded without them, said once.
    shutil.rmtree(fake["tracefs"] / "events" / "vmalloc")
    monkeypatch.setenv("KMM_TRACEFS", str(fake["tracefs"]))
    out2 = fake["tmp"] / "b2"
    rc, err = run(["-o", str(out2), "--duration", "0.1"], capsys)
    assert rc == 0, err
    assert f"kmm: warning: this kernel has no vmalloc:* tracepoints ({fake['tracefs'] / 'events' / 'vmalloc'})" in err
    assert json.loads(fake["log"].read_text())[4] == "kmem:*,percpu:*"
    shutil.rmtree(fake["tracefs"] / "events" / "kmem")
    rc, err = run(["-o", str(fake["tmp"] / "b3")], capsys)
    assert rc == 1 and "events/kmem not found: this kernel has no kmem tracepoints" in err


def test_perf_failure_is_one_line(fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_PERF_FAIL", "1")
    out = fake["tmp"] / "b"
    rc, err = run(["-o", str(out), "--duration", "0.1"], capsys)
    assert rc == 1
    last = err.splitlines()[-1]
    assert last == (
        "kmm: error: perf record failed (exit status 129): event syntax error: 'vmalloc:*'; "
        f"{out} has no perf.data"
    )
    assert "event syntax error: 'vmalloc:*'" in err  # perf's own words were relayed


def test_unreadable_files_are_left_out(fake, capsys):
    (fake["proc"] / "pagetypeinfo").unlink()
    (fake["proc"] / "kallsyms").write_text("0000000000000000 T _stext\n0000000000000000 T start_kernel\n")
    out = fake["tmp"] / "b"
    rc, err = run(["-o", str(out), "--duration", "0.1"], capsys)
    assert rc == 0, err
    assert f"kmm: warning: cannot read {fake['proc'] / 'pagetypeinfo'} (No such file or directory): the bundle has no start.pagetypeinfo.txt" in err
    assert "samples.txt has no pagetypeinfo" in err
    assert "kmm: warning: kallsyms addresses read as zero (kernel.kptr_restrict, or not root)" in err
    assert not (out / "start.pagetypeinfo.txt").exists() and not (out / "end.pagetypeinfo.txt").exists()
    samples = parse_proc("samples", (out / "samples.txt").read_text())
    assert samples and all(s["pagetypeinfo"] is None and len(s["buddyinfo"]) == 3 for s in samples)
    shutil.copy(SAMPLE_TXT, out / "perf.txt.xz")
    rec = kmm.trace.load(out)
    assert rec.start["pagetypeinfo"] is None and rec.start["zoneinfo"] is not None
    assert rec.bundle.warnings == []


def test_not_linux_proc(fake, capsys, monkeypatch):
    empty = fake["tmp"] / "noproc"
    empty.mkdir()
    monkeypatch.setenv("KMM_PROC_ROOT", str(empty))
    rc, err = run(["-o", str(fake["tmp"] / "b")], capsys)
    assert rc == 1 and err == f"kmm: error: {empty}/buddyinfo not found: kmm record needs Linux's /proc\n"


def test_bad_durations(fake, capsys):
    # Usage errors: one line from the argument parser, exit 2, nothing recorded.
    for opt, val in (("--duration", "0"), ("--interval", "-1"), ("--duration", "nan")):
        with pytest.raises(SystemExit) as e:
            run(["-o", str(fake["tmp"] / "b"), opt, val], capsys)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err == (f"kmm record: error: argument {opt}: must be a positive number of seconds, "
                       f"not {val!r} (see kmm record --help)\n")
        assert not (fake["tmp"] / "b").exists()


def test_perf_error_picks_perf_reason():
    # perf 6.1's words when perf_event_paranoid forbids the recording.
    lines = ["Error:", "Access to performance monitoring and observability operations is limited.",
             "Consider adjusting /proc/sys/kernel/perf_event_paranoid setting to open"]  # fmt: skip
    assert rec_mod._perf_error(lines) == "Access to performance monitoring and observability operations is limited."
    assert rec_mod._perf_error(["  something went wrong  ", ""]) == "something went wrong"
    assert rec_mod._perf_error([]) == ""
