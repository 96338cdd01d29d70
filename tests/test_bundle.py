"""Recording bundles: the /proc readers through Python (kmm._kmm.parse_proc),
kmm._kmm.Bundle, kmm.recording.Recording and kmm.trace.load(DIR), with
every bad-bundle case (missing, malformed, compressed, damaged, mismatched,
no trace, a trace from another machine).

Expected values are read from the real files (python/kmm/data/warm2/, the
Linux 6.18 recording) or computed here from their text, never from the
code under test."""

from __future__ import annotations

import gzip
import lzma
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kmm
from kmm import cli
from kmm._kmm import Bundle, parse_proc
from kmm.recording import PROC_FILES, Recording

WARM2 = Path(kmm.__file__).parent / "data" / "warm2"
PERF_TXT = Path(__file__).parent / "data" / "recordings" / "warm2" / "perf.txt.xz"
LINUX = Path(__file__).parent / "data" / "linux"
SAMPLE_TXT = Path(kmm.__file__).parent / "data" / "sample.perf.txt.xz"
N_HEAD = 20000


def w2(name: str) -> str:
    return (WARM2 / name).read_text()


@pytest.fixture(scope="module")
def perf_lines() -> list[str]:
    with lzma.open(PERF_TXT, "rt") as f:
        return f.readlines()


def make_bundle(d: Path, perf_lines: list[str] | None, n: int = N_HEAD, proc: bool = True, suffix: str = "") -> Path:
    """A bundle dir: the first n lines of warm2's perf script text, and its /proc files."""
    d.mkdir(parents=True, exist_ok=True)
    if perf_lines is not None:
        (d / "perf.txt").write_text("".join(perf_lines[:n]))
    if proc:
        for src in sorted(WARM2.glob("*.txt")):
            data = src.read_bytes()
            if suffix == ".gz":
                data = gzip.compress(data)
            elif suffix == ".xz":
                data = lzma.compress(data)
            (d / (src.name + suffix)).write_bytes(data)
    return d


# ---- the readers, through Python ------------------------------------------------


def test_zoneinfo_real_file():
    zi = parse_proc("zoneinfo", w2("start.zoneinfo.txt"))
    zones = zi["zones"]
    assert [z["name"] for z in zones] == ["DMA", "DMA32", "Normal", "Movable", "Device"]
    assert zones[2]["managed"] == 2064384
    assert zones[2]["spanned"] == 5505024 and zones[2]["start_pfn"] == 1048576
    assert zones[0]["protection"] == [0, 3018, 11082, 11082, 11082]
    assert (zones[0]["min"], zones[0]["low"], zones[0]["high"], zones[0]["promo"]) == (22, 27, 32, 37)
    cpu1 = zones[2]["pagesets"][1]
    assert (cpu1["cpu"], cpu1["count"], cpu1["high"], cpu1["batch"]) == (1, 39678, 43038, 63)
    assert (cpu1["high_min"], cpu1["high_max"], cpu1["vm_stats_threshold"]) == (7672, 129024, 28)
    assert zones[2]["stats"]["numa_hit"] == 40981917
    assert zi["node_stats"]["nr_slab_reclaimable"] == 42211
    assert zones[3]["pagesets"] == [] and zones[3]["start_pfn"] is None and zones[3]["stats"] == {}
    # The other real file (tests/data/linux) reads too.
    assert parse_proc("zoneinfo", (LINUX / "zoneinfo.txt").read_text())["zones"][1]["name"] == "DMA32"


def test_buddyinfo_and_pagetypeinfo_real_files():
    b = parse_proc("buddyinfo", w2("start.buddyinfo.txt"))
    want = [[int(x) for x in line.split()[4:]] for line in w2("start.buddyinfo.txt").splitlines()]
    assert [z["nr_free"] for z in b] == want
    assert [z["zone"] for z in b] == ["DMA", "DMA32", "Normal"]
    p = parse_proc("pagetypeinfo", w2("start.pagetypeinfo.txt"))
    assert (p["pageblock_order"], p["pages_per_block"]) == (9, 512)
    assert p["block_types"] == ["Unmovable", "Movable", "Reclaimable", "HighAtomic", "Isolate"]
    assert p["blocks"][2] == {"node": 0, "zone": "Normal", "counts": [59, 3887, 86, 0, 0]}
    normal = [f for f in p["free"] if f["zone"] == "Normal"]
    assert [f["migratetype"] for f in normal] == p["block_types"]
    # buddyinfo = sum over migratetypes (read at the same moment, they agree here).
    assert [sum(col) for col in zip(*(f["nr_free"] for f in normal))] == want[2]
    assert len(parse_proc("pagetypeinfo", (LINUX / "pagetypeinfo.txt").read_text())["free"]) == 15


def test_slabinfo_meminfo_vmstat_real_files():
    text = w2("start.slabinfo.txt")
    rows = parse_proc("slabinfo", text)
    assert len(rows) == len(text.splitlines()) - 2
    line = next(ln for ln in text.splitlines() if ln.startswith("kmalloc-128 "))
    f = line.split()
    r = next(r for r in rows if r["name"] == "kmalloc-128")
    assert (r["active_objs"], r["num_objs"], r["objsize"], r["objperslab"], r["pagesperslab"]) == tuple(
        int(x) for x in f[1:6]
    )
    assert (r["active_slabs"], r["num_slabs"]) == (int(f[13]), int(f[14]))
    mi = parse_proc("meminfo", w2("start.meminfo.txt"))
    assert mi["MemTotal"] == 24683784 and mi["HugePages_Total"] == 0 and mi["DirectMap1G"] == 25165824
    assert len(mi) == len(w2("start.meminfo.txt").splitlines())
    vm = parse_proc("vmstat", w2("end.vmstat.txt"))
    assert vm == {k: int(v) for k, v in (ln.split() for ln in w2("end.vmstat.txt").splitlines())}


def test_samples_real_file():
    text = w2("samples.txt")
    heads = [ln for ln in text.splitlines() if ln.startswith("@ ")]
    s = parse_proc("samples", text)
    assert len(s) == len(heads) == 108
    assert s[0]["ts_ns"] == 1188079149000
    assert [x["ts_ns"] for x in s] == [round(float(h[2:]) * 1e9) for h in heads]
    assert s[0]["buddyinfo"][2]["nr_free"][0] == 28413
    assert s[0]["vmstat"]["pgalloc_normal"] == 42983556
    prefixes = ("pgalloc", "pgfree", "nr_free", "nr_slab", "compact", "thp_")
    assert all(k.startswith(prefixes) for x in s for k in x["vmstat"])
    assert all(x["pagetypeinfo"]["pageblock_order"] == 9 for x in s)


def test_kmm_renderers_read_back():
    """procfs-2 from Python: a kmm machine's /proc text parses to its own values."""
    m = kmm.Machine(memory="2G", cpus=3)
    pages = [m.alloc_pages(kmm.GFP_KERNEL, o) for o in (0, 3, 5, 9)]
    blocks = [m.kmalloc(200, kmm.GFP_KERNEL) for _ in range(50)]
    zi = parse_proc("zoneinfo", m.proc.zoneinfo())
    assert len(zi["zones"]) == len(m.zones)
    for z, mz in zip(zi["zones"], m.zones):
        assert z["name"] == mz.name
        assert (z["spanned"], z["present"], z["managed"]) == (mz.spanned, mz.present, mz.managed)
        assert (z["free"], z["min"], z["low"], z["high"], z["promo"]) == (mz.free_pages, mz.min, mz.low, mz.high, mz.promo)
        assert z["protection"] == list(mz.lowmem_reserve)
        if mz.populated:
            assert z["start_pfn"] == mz.start_pfn
            assert [p["cpu"] for p in z["pagesets"]] == [0, 1, 2]
            assert z["stats"]["nr_free_pages"] == mz.free_pages
    b = parse_proc("buddyinfo", m.proc.buddyinfo())
    assert [z["nr_free"] for z in b] == [list(z.nr_free) for z in m.zones if z.populated]
    assert parse_proc("meminfo", m.proc.meminfo()) == m.proc.meminfo_dict()
    assert parse_proc("vmstat", m.proc.vmstat()) == m.proc.vmstat_dict()
    rows = {r["name"]: r for r in parse_proc("slabinfo", m.proc.slabinfo())}
    c = m.kmem_cache("kmalloc-256")
    assert rows["kmalloc-256"]["objperslab"] == c.objs_per_slab
    assert rows["kmalloc-256"]["active_objs"] >= 50
    for blk in blocks:
        m.kfree(blk)
    for p, o in zip(pages, (0, 3, 5, 9)):
        m.free_pages(p, o)


def test_parse_proc_errors_name_the_line():
    text = w2("start.zoneinfo.txt").replace("        managed  3840", "        managed  3840x", 1)
    lineno = w2("start.zoneinfo.txt").splitlines().index("        managed  3840") + 1
    with pytest.raises(kmm.TraceFormatError, match=rf"^zoneinfo: line {lineno}: '3840x' is not a number") as e:
        parse_proc("zoneinfo", text)
    assert e.value.line == lineno
    with pytest.raises(kmm.TraceFormatError, match="line 1: expected 'slabinfo - version: 2.1'"):
        parse_proc("slabinfo", w2("start.meminfo.txt"))
    with pytest.raises(ValueError, match="unknown /proc file kind 'cpuinfo'"):
        parse_proc("cpuinfo", "")


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from([*PROC_FILES, "samples"]), text=st.text(max_size=300))
def test_parse_proc_never_crashes(kind, text):
    try:
        parse_proc(kind, text)
    except kmm.TraceFormatError as e:
        assert e.line >= 1


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.sampled_from(w2("start.zoneinfo.txt").splitlines() + w2("samples.txt").splitlines()[:40]), max_size=40))
def test_real_lines_in_any_order_never_crash(lines):
    text = "\n".join(lines)
    for kind in ("zoneinfo", "samples", "pagetypeinfo", "buddyinfo"):
        try:
            parse_proc(kind, text)
        except kmm.TraceFormatError:
            pass
    Bundle([("start.zoneinfo.txt", text), ("samples.txt", text), ("end.buddyinfo.txt", text)])


# ---- Recording and load(DIR) -----------------------------------------------------


def test_load_full_warm2_bundle(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "warm2", perf_lines, n=len(perf_lines))
    shutil.copy(WARM2 / "kallsyms.txt.xz", d)
    rec = kmm.trace.load(d)
    assert isinstance(rec, Recording) and isinstance(rec, kmm.trace.Recording)
    assert rec.warnings == ()
    assert len(rec) == len(perf_lines) == len(rec.trace)
    assert rec.path == d and rec.kallsyms == d / "kallsyms.txt.xz"
    assert set(rec.files) == {"perf.txt", "kallsyms.txt", "samples.txt"} | {
        f"{w}.{n}.txt" for w in ("start", "end") for n in PROC_FILES
    }
    assert rec.start["zoneinfo"]["zones"][2]["managed"] == 2064384
    assert rec.end["meminfo"]["MemTotal"] == 24683784
    assert len(rec.samples) == 108
    # kmm.trace.stat accepts the recording and sees its trace.
    assert kmm.trace.stat(rec).slab == kmm.trace.stat(rec.trace).slab


def test_recording_views_are_read_only(tmp_path, perf_lines):
    rec = kmm.trace.load(make_bundle(tmp_path / "b", perf_lines))
    assert isinstance(rec.start, MappingProxyType)
    with pytest.raises(TypeError):
        rec.start["zoneinfo"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        rec.start["zoneinfo"]["zones"][0]["managed"] = 1  # type: ignore[index]
    with pytest.raises((TypeError, AttributeError)):
        rec.samples[0]["buddyinfo"].append(1)  # type: ignore[attr-defined]
    # The bundle's getters hand out fresh plain data each time.
    b = rec.bundle.start
    b["zoneinfo"] = None
    assert rec.bundle.start["zoneinfo"] is not None


def test_recording_behaves_as_its_trace(tmp_path, perf_lines):
    rec = kmm.trace.load(make_bundle(tmp_path / "b", perf_lines))
    assert len(rec) == N_HEAD
    first = perf_lines[0].split()
    assert rec[0].name == first[4].rstrip(":") and rec[0].pid == int(first[1])
    assert rec.counts() == rec.trace.counts() and rec.lost_events == 0
    assert sum(1 for _ in rec) == N_HEAD
    r1 = kmm.trace.replay(rec, kmm.Machine(memory="8G"))
    r2 = kmm.trace.replay(rec.trace, kmm.Machine(memory="8G"))
    assert (r1.events, r1.replayed, r1.zone_mismatches) == (r2.events, r2.replayed, r2.zone_mismatches)
    assert r1.events == N_HEAD
    with pytest.raises(TypeError, match="expected a TraceLog"):
        kmm.trace.stat(rec.bundle)  # type: ignore[arg-type]
    assert "20,000 events" in repr(rec) and "108 samples" in repr(rec)


def test_only_a_trace(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines, proc=False)
    rec = kmm.trace.load(d)
    assert rec.warnings == ()
    assert dict(rec.files) == {"perf.txt": d / "perf.txt"}
    assert rec.kallsyms is None and rec.samples == ()
    assert dict(rec.start) == {n: None for n in PROC_FILES} == dict(rec.end)


@pytest.mark.parametrize("suffix", [".gz", ".xz"])
def test_compressed_files_read_as_plain(tmp_path, perf_lines, suffix):
    plain = kmm.trace.load(make_bundle(tmp_path / "plain", perf_lines))
    d = make_bundle(tmp_path / "z", perf_lines, suffix=suffix)
    comp = d / ("perf.txt" + suffix)
    comp.write_bytes((gzip.compress if suffix == ".gz" else lzma.compress)((d / "perf.txt").read_bytes()))
    (d / "perf.txt").unlink()
    rec = kmm.trace.load(d)
    assert rec.warnings == ()
    assert rec.files["start.zoneinfo.txt"].name == "start.zoneinfo.txt" + suffix
    assert rec.files["perf.txt"] == comp
    assert rec.start == plain.start and rec.end == plain.end and rec.samples == plain.samples
    assert len(rec) == len(plain)


def test_plain_and_compressed_copies(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines)
    (d / "start.vmstat.txt.gz").write_bytes(gzip.compress(b"garbage"))
    rec = kmm.trace.load(d)
    assert rec.warnings == ("start.vmstat.txt.gz: start.vmstat.txt is read instead; ignored",)
    assert rec.start["vmstat"]["nr_free_pages"] == 1929017


def test_missing_files_are_none(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines)
    for name in ("end.zoneinfo.txt", "start.slabinfo.txt", "samples.txt"):
        (d / name).unlink()
    rec = kmm.trace.load(d)
    assert rec.warnings == ()
    assert rec.end["zoneinfo"] is None and rec.start["slabinfo"] is None and rec.samples == ()
    assert rec.end["slabinfo"] is not None and rec.start["zoneinfo"] is not None


def test_malformed_file_is_a_warning_naming_the_line(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines)
    text = (d / "start.zoneinfo.txt").read_text()
    lines = text.splitlines(keepends=True)
    i = lines.index("        protection: (0, 3018, 11082, 11082, 11082)\n")
    lines[i] = "        protection: (0, 3018, 11082\n"
    (d / "start.zoneinfo.txt").write_text("".join(lines))
    rec = kmm.trace.load(d)
    assert rec.warnings == (
        f"start.zoneinfo.txt: line {i + 1}: expected 'protection: (n, n, ...)', found '(0, 3018, 11082'; "
        "ignored: the replay starts without it",
    )
    assert rec.start["zoneinfo"] is None
    assert rec.start["buddyinfo"] is not None and rec.end["zoneinfo"] is not None


def test_damaged_and_binary_files(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines)
    (d / "start.slabinfo.txt").unlink()
    (d / "start.slabinfo.txt.xz").write_bytes(lzma.compress(w2("start.slabinfo.txt").encode())[:300])
    (d / "end.meminfo.txt").write_bytes(bytes(range(256)) * 4)
    s = (d / "samples.txt").read_text()
    # A recording cut short inside sample 51's buddyinfo ("Node 0, zone   Nor").
    at51 = [i for i in range(len(s)) if s.startswith("@ ", i)][50]
    cut = s.index("Node 0, zone   Normal", at51) + len("Node 0, zone   Nor")
    (d / "samples.txt").write_text(s[:cut])
    rec = kmm.trace.load(d)
    w = {x.split(":")[0]: x for x in rec.warnings}
    assert w["start.slabinfo.txt.xz"].startswith("start.slabinfo.txt.xz: cannot be read (")
    assert w["start.slabinfo.txt.xz"].endswith("); ignored")
    assert w["end.meminfo.txt"].startswith("end.meminfo.txt: line 1: ")
    assert w["end.meminfo.txt"].endswith("ignored: the end state is not compared with it")
    kept = 50
    line = s[:cut].count("\n") + 1
    assert w["samples.txt"] == (
        f"samples.txt: line {line}: zone Nor has no free-block counts; the {kept} samples before it are kept, the rest ignored"
    )
    assert len(rec.warnings) == 3
    assert len(rec.samples) == kept
    assert rec.start["slabinfo"] is None and rec.end["meminfo"] is None


def test_mismatched_machine(tmp_path, perf_lines):
    """end.* files from another machine (a kmm 4G machine's renderers)."""
    d = make_bundle(tmp_path / "b", perf_lines)
    m = kmm.Machine(memory="4G")
    for name in ("zoneinfo", "buddyinfo", "meminfo"):
        (d / f"end.{name}.txt").write_text(getattr(m.proc, name)())
    rec = kmm.trace.load(d)
    w = "\n".join(rec.warnings)
    z = {z.name: z for z in m.zones}
    # warm2's DMA32: spanned 1044480, present 782336, managed 772848 (start.zoneinfo.txt).
    assert (
        f"start.zoneinfo.txt and end.zoneinfo.txt: zone DMA32 differs (present 782336 / {z['DMA32'].present}, "
        f"managed 772848 / {z['DMA32'].managed}): not from the same machine" in w
    )
    assert f"zone Normal differs (spanned 5505024 / {z['Normal'].spanned}, " in w
    assert f"start.meminfo.txt has MemTotal 24683784 kB, end.meminfo.txt {m.proc.meminfo_dict()['MemTotal']} kB" in w
    free32 = sum(n << o for o, n in enumerate(z["DMA32"].nr_free))
    assert f"end.buddyinfo.txt and end.pagetypeinfo.txt disagree (zone DMA32: {free32} free pages in buddyinfo, " in w
    assert all(x.split(":")[0].startswith(("start.", "end.")) for x in rec.warnings)


def test_samples_out_of_time_order(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines)
    s = (d / "samples.txt").read_text().replace("@ 1188.302723", "@ 1188.000001", 1)
    (d / "samples.txt").write_text(s)
    rec = kmm.trace.load(d)
    assert rec.warnings == (
        "samples.txt: sample 3 (@ 1188.000001) is earlier than the one before it (@ 1188.191175): "
        "the samples are not in time order",
    )


def test_dir_without_a_trace(tmp_path):
    d = make_bundle(tmp_path / "notrace", None)
    with pytest.raises(FileNotFoundError) as e:
        kmm.trace.load(d)
    assert e.value.filename == str(d)
    msg = str(e.value)
    for name in ("perf.data", "perf.data.xz", "perf.data.gz", "perf.txt", "perf.txt.xz", "perf.txt.gz"):
        assert name in msg
    r = subprocess.run([sys.executable, "-m", "kmm", "stat", str(d)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"kmm: error: {d}: not a recording bundle: no trace in this directory")
    assert len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr


def test_trace_from_another_machine(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines, n=1000)
    # Two real page events moved to a CPU and a pfn the bundle's machine lacks.
    page = [ln for ln in perf_lines[:5000] if "kmem:mm_page_alloc:" in ln][:2]
    moved = [page[0].replace("[000]", "[005]").replace("[001]", "[005]"),
             re.sub(r"pfn=0x[0-9a-f]+", "pfn=0x7000000", page[1])]
    with open(d / "perf.txt", "a") as f:
        f.writelines(moved)
    rec = kmm.trace.load(d)
    w = rec.warnings
    assert len(w) == 2
    assert w[0].startswith("start.zoneinfo.txt: 1 page event(s) of the trace have pfns outside every zone "
                           "(first: event 1001, pfn 0x7000000;")
    assert "the trace is from another machine" in w[0]
    assert w[1].startswith("start.zoneinfo.txt: the trace has events on CPU(s) 5 that its pagesets do not list (CPUs 0, 1)")


def test_trace_of_another_recording(tmp_path):
    """The packaged sample trace (another recording, another boot) in warm2's bundle."""
    d = make_bundle(tmp_path / "b", None)
    shutil.copy(SAMPLE_TXT, d / "perf.txt.xz")
    with lzma.open(SAMPLE_TXT, "rt") as f:
        t0 = float(f.readline().split()[3].rstrip(":"))
    assert t0 < 1188  # independent of the code: the sample was recorded before warm2's clock range
    rec = kmm.trace.load(d)
    assert len(rec.warnings) == 1
    assert rec.warnings[0].startswith("samples.txt: the samples cover 1188.079149-1200.979358 s, the trace 329.328933-")
    assert rec.warnings[0].endswith("they were not taken during this trace (another recording, or perf record without -k CLOCK_MONOTONIC)")


def test_bad_perf_data_falls_back_to_text(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines)
    (d / "perf.data").write_bytes(b"not a perf.data file\n" * 10)
    rec = kmm.trace.load(d)
    assert len(rec) == N_HEAD
    assert len(rec.warnings) == 1
    assert rec.warnings[0].startswith("perf.data: ") and rec.warnings[0].endswith("perf.txt is read instead")
    (d / "perf.txt").unlink()
    with pytest.raises(ValueError, match="perf.data"):
        kmm.trace.load(d)


def test_lenient_reaches_the_bundle_trace(tmp_path, perf_lines):
    d = make_bundle(tmp_path / "b", perf_lines, n=100)
    with open(d / "perf.txt", "a") as f:
        f.write("this is not an event\n")
    with pytest.raises(kmm.TraceFormatError, match="perf.txt: line 101"):
        kmm.trace.load(d)
    rec = kmm.trace.load(d, lenient=True)
    assert (len(rec), rec.skipped) == (100, 1)


def test_cli_stat_of_a_bundle_is_stat_of_its_trace(tmp_path, perf_lines, capsys):
    d = make_bundle(tmp_path / "b", perf_lines)
    assert cli.main(["stat", str(d)]) == 0
    of_dir = capsys.readouterr().out
    assert cli.main(["stat", str(d / "perf.txt")]) == 0
    assert of_dir == capsys.readouterr().out
    assert "Total bytes requested" in of_dir


def test_bundle_class_from_texts():
    files = [(p.name, p.read_text()) for p in sorted(WARM2.glob("*.txt"))]
    b = Bundle(files)
    assert b.warnings == [] and b.nr_samples == 108
    assert b.start["zoneinfo"]["zones"][0]["protection"] == [0, 3018, 11082, 11082, 11082]
    assert b.end["slabinfo"][2]["name"] == "bio-312"
    assert repr(b) == "<Bundle: start 6/6 files, end 6/6, 108 samples, 0 warnings>"
    b2 = Bundle([("start.zoneinfo.txt", "nonsense"), ("notes.md", "hello")])
    assert b2.warnings == [
        "start.zoneinfo.txt: line 1: expected 'Node N, zone NAME' first, found 'nonsense'; ignored: the replay starts without it",
        "notes.md: not a /proc file of a recording bundle; ignored",
    ]
