"""kmm.trace: loading perf script / trace_pipe text and `perf kmem stat`.

Expected numbers come from what perf 6.1 printed for the sample recording
(tests/data/traces/*.txt) or from counting the trace text here, independently
of the Rust parser.
"""

from __future__ import annotations

import gzip
import lzma
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kmm
from kmm import cli
from conftest import DATA, SAMPLE_TRACE, sample_trace_lines

TRACES = DATA / "traces"
SLAB_TXT = (TRACES / "sample.perf-kmem-stat-slab.txt").read_text()
PAGE_TXT = (TRACES / "sample.perf-kmem-stat-page.txt").read_text()


@pytest.fixture(scope="module")
def sample() -> kmm.trace.TraceLog:
    return kmm.trace.load(SAMPLE_TRACE)


@pytest.fixture(scope="module")
def sample_text() -> str:
    return "".join(sample_trace_lines())


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- perf's numbers --------------------------------------------------------


def test_kmm_stat_prints_perfs_summaries_exactly(capsys):
    code, out, err = run_cli(capsys, "stat", str(SAMPLE_TRACE))
    assert code == 0, err
    assert out == SLAB_TXT + PAGE_TXT
    assert run_cli(capsys, "stat", "--slab", str(SAMPLE_TRACE))[1] == SLAB_TXT
    assert run_cli(capsys, "stat", "--page", str(SAMPLE_TRACE))[1] == PAGE_TXT


def test_python_m_kmm_stat_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "kmm", "stat", "--slab", str(SAMPLE_TRACE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == SLAB_TXT


def test_stat_numbers_match_an_independent_count(sample, sample_text):
    # Count the text directly: perf 6.1 reads kmalloc/kmem_cache_alloc for
    # allocations, and only mm_page_alloc / mm_page_free for pages.
    req = alloc = nallocs = 0
    orders: Counter[tuple[int, int]] = Counter()
    page_allocs = page_frees = 0
    for line in sample_text.splitlines():
        name = line.split(": ", 2)[1].strip() if ": " in line else ""
        f = dict(kv.split("=", 1) for kv in line.split(": ", 2)[-1].split() if "=" in kv)
        if name in ("kmem:kmalloc", "kmem:kmem_cache_alloc"):
            req += int(f["bytes_req"])
            alloc += int(f["bytes_alloc"])
            nallocs += 1
        elif name == "kmem:mm_page_alloc":
            page_allocs += 1
            orders[int(f["order"]), int(f["migratetype"])] += 1
        elif name == "kmem:mm_page_free":
            page_frees += 1
    s = kmm.trace.stat(sample)
    assert (s.slab.total_requested, s.slab.total_allocated, s.slab.nr_allocs) == (req, alloc, nallocs)
    assert s.slab.wasted == alloc - req
    assert (s.page.nr_page_allocs, s.page.nr_page_frees) == (page_allocs, page_frees)
    assert {(o, m): n for o, row in enumerate(s.page.order_stats) for m, n in enumerate(row) if n} == dict(orders)
    # And the figures perf printed.
    assert "Total bytes freed:     %d\n" % s.slab.total_freed in SLAB_TXT
    assert s.page.nr_page_nomatch == 146 and s.page.nr_alloc_freed == 6734


def test_sample_events_are_kept_and_counted(sample, sample_text):
    assert len(sample) == 83_084 == sum(1 for line in sample_text.splitlines() if line.strip())
    counts = dict(sample.counts())
    assert counts["kmem:kmem_cache_alloc"] == sample_text.count(" kmem:kmem_cache_alloc: ")
    assert counts["vmalloc:alloc_vmap_area"] == 15
    assert sample.unknown == 0 and sample.skipped == 0
    assert sample.check() == [] and kmm.trace.stat(sample)._raw.check() == []
    e = sample[0]
    assert (e.name, e.cpu, e.comm, e.pid, e.timestamp) == ("kmem:kmalloc", 0, "perf", 5217, 329_328_933_000)
    assert e.fields == {
        "call_site": "sched_setaffinity+0x10c",
        "ptr": 0xFFFF88810442CB20,
        "bytes_req": 32,
        "bytes_alloc": 32,
        "gfp_flags": kmm.GFP_KERNEL,
        "node": -1,
        "accounted": False,
    }
    assert e["bytes_alloc"] == 32
    assert sample[-1].name == "kmem:kfree"
    assert sample[-2].name == sample[len(sample) - 2].name
    assert sum(1 for _ in sample) == len(sample)
    with pytest.raises(IndexError):
        sample[len(sample)]


def test_caller_and_alloc_tables_have_perfs_layout(capsys):
    code, out, _ = run_cli(capsys, "stat", "--slab", "--caller", "--alloc", "-s", "hit", "-l", "3", str(SAMPLE_TRACE))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "-" * 105
    assert lines[1] == " Callsite                           | Total_alloc/Per | Total_req/Per   | Hit      | Ping-pong | Frag"
    # The most frequent call site in the trace text heads the table sorted by hit.
    sites = Counter(line.split("call_site=")[1].split()[0] for line in sample_trace_lines()
                    if " kmem:kmalloc: " in line or " kmem:kmem_cache_alloc: " in line)
    (top, hits), = sites.most_common(1)
    sym, off = top.rsplit("+0x", 1)
    assert lines[3].startswith(f" {sym}+{off:<{33 - len(sym)}} |")
    assert f"| {hits:>8} |" in lines[3]
    assert lines[6].startswith(" ...")
    assert out.endswith(SLAB_TXT)
    code, out, _ = run_cli(capsys, "stat", "--page", "--caller", "-s", "order,migtype", str(SAMPLE_TRACE))
    assert code == 0 and "# GFP flags" in out and " Total alloc (KB) | Hits      | Order | Mig.type |" in out


def test_bad_sort_key_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["stat", "--slab", "-s", "order", str(SAMPLE_TRACE)])
    assert e.value.code == 2
    assert "unknown slab --sort key: 'order'" in capsys.readouterr().err


# --- files: compression, malformed and truncated input ---------------------


def test_plain_gz_and_xz_give_the_same_result(tmp_path, sample_text):
    head = "".join(sample_text.splitlines(keepends=True)[:5000])
    plain = tmp_path / "t.txt"
    plain.write_text(head)
    gz = tmp_path / "t.txt.gz"
    gz.write_bytes(gzip.compress(head.encode()))
    xz = tmp_path / "t.xz"
    xz.write_bytes(lzma.compress(head.encode()))
    outs = [kmm.trace.stat(kmm.trace.load(p)).format(caller=True, alloc=True) for p in (plain, gz, xz)]
    assert outs[0] == outs[1] == outs[2]
    assert len(kmm.trace.load(gz)) == 5000


def test_garbage_line_is_an_error_naming_the_line(tmp_path, sample_text, capsys):
    lines = sample_text.splitlines(keepends=True)[:300]
    lines.insert(122, "this is not a trace line\n")  # becomes line 123
    p = tmp_path / "bad.txt"
    p.write_text("".join(lines))
    with pytest.raises(kmm.TraceFormatError) as e:
        kmm.trace.load(p)
    assert e.value.line == 123
    assert str(e.value).startswith(f"{p}: line 123: ")
    assert isinstance(e.value, ValueError)
    code, out, err = run_cli(capsys, "stat", str(p))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "line 123" in err


def test_bad_field_value_names_the_line(tmp_path, sample_text):
    lines = sample_text.splitlines(keepends=True)[:10]
    lines[4] = lines[4].replace("bytes_req=", "bytes_req=x")
    p = tmp_path / "bad.txt"
    p.write_text("".join(lines))
    with pytest.raises(kmm.TraceFormatError, match=r"line 5: kmem:kmem_cache_alloc: bad bytes_req 'x184'"):
        kmm.trace.load(p)


def test_truncated_file_names_the_last_line(tmp_path, sample_text):
    lines = sample_text.splitlines(keepends=True)[:1001]
    cut = "".join(lines[:1000]) + lines[1000][: lines[1000].index("bytes_alloc=") + 13]
    p = tmp_path / "cut.txt"
    p.write_text(cut)
    with pytest.raises(kmm.TraceFormatError) as e:
        kmm.trace.load(p)
    assert e.value.line == 1001 and "truncated" in str(e.value)
    # A cut compressed file.
    xz = tmp_path / "cut.xz"
    xz.write_bytes(lzma.compress("".join(lines).encode())[:-200])
    with pytest.raises(kmm.TraceFormatError, match="damaged or truncated"):
        kmm.trace.load(xz)


def test_lenient_mode_skips_and_counts(tmp_path, sample_text, capsys):
    good = sample_text.splitlines(keepends=True)[:2000]
    bad = list(good)
    for at in (10, 500, 1500):
        bad.insert(at, "garbage garbage\n")
    p = tmp_path / "bad.txt"
    p.write_text("".join(bad))
    t = kmm.trace.load(p, lenient=True)
    assert t.skipped == 3 and len(t) == 2000
    assert [n for n, _ in t.skipped_examples] == [11, 501, 1501]  # list indices after each insert, 1-based
    q = tmp_path / "good.txt"
    q.write_text("".join(good))
    assert kmm.trace.stat(t).format() == kmm.trace.stat(kmm.trace.load(q)).format()
    code, out, err = run_cli(capsys, "stat", "--lenient", str(p))
    assert code == 0 and "skipped 3 malformed line(s) (first: line 11" in err


def test_unknown_events_and_trace_pipe_lines():
    text = (
        "# tracer: nop\n"
        "#\n"
        "            bash-1234    [001] d..1.   100.000001: kmalloc: call_site=f+0x1/0x20 ptr=0xffff888000001000 "
        "bytes_req=10 bytes_alloc=16 gfp_flags=GFP_KERNEL node=-1 accounted=false\n"
        "            bash-1234    [001] .....   100.000002: sched_switch: prev_comm=bash prev_pid=1234\n"
        "            bash-1234    [000] .....   100.000003: kfree: call_site=g+0x2/0x30 ptr=0xffff888000001000\n"
    )
    t = kmm.trace.parse(text)
    assert len(t) == 3 and t.unknown == 1
    assert [e.name for e in t] == ["kmem:kmalloc", "sched_switch", "kmem:kfree"]
    assert t[1].fields == {"prev_comm": "bash", "prev_pid": 1234}
    s = kmm.trace.stat(t)
    assert (s.slab.total_requested, s.slab.total_allocated, s.slab.total_freed) == (10, 16, 16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.text(alphabet=" []:=.-0123456789abcxkmem_lo\n\t#()", max_size=400))
def test_garbage_never_crashes(data):
    for lenient in (False, True):
        try:
            t = kmm.trace.parse(data, lenient=lenient)
        except kmm.TraceFormatError as e:
            assert not lenient and e.line >= 1
        else:
            assert t.check() == []
            kmm.trace.stat(t).format(caller=True, alloc=True)
            for ev in t:
                ev.fields


# --- round trip: a kmm machine's own recording -----------------------------


def test_round_trip_record_to_perf_script_to_stat():
    m = kmm.Machine(memory="256M")
    cache = m.kmem_cache_create("rt_obj", 200)
    with m.trace.record("kmem:*") as rec:
        blocks, objs, pages = [], [], []
        for i in range(300):
            with m.on_cpu(i % 2):
                blocks.append(m.kmalloc(8 + 37 * i % 3000, kmm.GFP_KERNEL))
                objs.append(cache.alloc(kmm.GFP_KERNEL))
                pages.append(m.alloc_pages(kmm.GFP_KERNEL if i % 3 else kmm.GFP_HIGHUSER_MOVABLE, i % 4))
        for i, b in enumerate(blocks[::2]):
            with m.on_cpu(i % 2):  # some frees on the other CPU: ping-pong
                m.kfree(b)
        for o in objs[:100]:
            cache.free(o)
        for i, p in enumerate(pages[:150]):
            m.free_pages(p, i % 4)
    events = rec.events
    t = kmm.trace.parse(rec.to_perf_script(comm="rt", pid=7))
    assert len(t) == len(events)
    assert [e.name for e in t] == [e.name for e in events]
    s = kmm.trace.stat(t)
    # Independent count over the recorded events.
    allocs = [e for e in events if e.name in ("kmem:kmalloc", "kmem:kmem_cache_alloc")]
    assert s.slab.nr_allocs == len(allocs)
    assert s.slab.total_requested == sum(e["bytes_req"] for e in allocs)
    assert s.slab.total_allocated == sum(e["bytes_alloc"] for e in allocs)
    live: dict[int, int] = {}
    freed = 0
    for e in events:
        if e.name in ("kmem:kmalloc", "kmem:kmem_cache_alloc"):
            live[e["ptr"]] = e["bytes_alloc"]
        elif e.name in ("kmem:kfree", "kmem:kmem_cache_free") and e["ptr"] in live:
            freed += live[e["ptr"]]
    assert s.slab.total_freed == freed
    page_allocs = [e for e in events if e.name == "kmem:mm_page_alloc"]
    page_frees = [e for e in events if e.name == "kmem:mm_page_free"]
    assert s.page.nr_page_allocs == len(page_allocs)
    assert s.page.nr_page_frees == len(page_frees)
    assert s.page.total_page_alloc_bytes == sum(4096 << e["order"] for e in page_allocs)
    want = Counter((e["order"], e["migratetype"]) for e in page_allocs)
    got = {(o, mt): n for o, row in enumerate(s.page.order_stats) for mt, n in enumerate(row) if n}
    assert got == dict(want)
    # Every field survives the text round trip.
    for a, b in zip(events, t):
        assert a.cpu == b.cpu
        fa, fb = a.fields, b.fields
        assert {k: fb[k] for k in fa} == fa


def test_kmm_trace_module_and_machine_trace_coexist():
    m = kmm.Machine(memory="64M")
    assert isinstance(m.trace, kmm.Trace)
    assert kmm.trace.load is not None and kmm.Trace is not kmm.trace
    with m.trace.record("kmem:mm_page_alloc") as rec:
        m.free_pages(m.alloc_pages(kmm.GFP_KERNEL, 0))
    assert len(kmm.trace.parse(rec.to_perf_script())) == 1


def test_progress_bar_on_stderr_when_asked(tmp_path, sample_text, capsys):
    p = tmp_path / "t.txt"
    p.write_text(sample_text)
    kmm.trace.load(p, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rkmm: reading t.txt [") and err.endswith("100% 83,084 events\n")
    kmm.trace.load(p)  # not a terminal: no bar by default
    assert capsys.readouterr().err == ""
