"""kmm.trace.load on perf.data: the same TraceLog as from `perf script`'s
text of the same recording, lost data, and bad input.

Expected values come from the recordings themselves: the perf script text
that perf 6.1 printed for each perf.data (tests/data/recordings/warm2/
perf.txt.xz, python/kmm/data/sample.perf.txt.xz), what perf said while
reading warm2 ("lost 18 chunks", "Processed 2227381 samples and lost
6.47%", i.e. 2,227,381 - 2,083,209 = 144,172 samples), and the file layout
(tools/perf/util/header.h) read here in Python, independently of the Rust
decoder.
"""

from __future__ import annotations

import gzip
import lzma
import re
import struct
from collections import Counter
from pathlib import Path

import pytest

import kmm
from kmm import cli

ROOT = Path(__file__).parent
DATA = Path(kmm.__file__).parent / "data"
WARM2 = DATA / "warm2"
WARM2_DATA = WARM2 / "perf.data.xz"
WARM2_TEXT = ROOT / "data" / "recordings" / "warm2" / "perf.txt.xz"
SAMPLE_DATA = ROOT / "data" / "traces" / "sample.perf.data.xz"
SAMPLE_TEXT = DATA / "sample.perf.txt.xz"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- the file layout, read independently of the decoder ---------------------


def header(data: bytes) -> dict:
    """struct perf_file_header (little-endian)."""
    magic, size, attr_size, a_off, a_size, d_off, d_size = struct.unpack_from("<8s6Q", data, 0)
    assert magic == b"PERFILE2" and size == 104
    bits = int.from_bytes(data[72:104], "little")
    feats = [b for b in range(256) if bits >> b & 1]
    table = d_off + d_size
    sections = {b: struct.unpack_from("<2Q", data, table + 16 * k) for k, b in enumerate(feats)}
    return {"data": (d_off, d_size), "features": sections, "table": table}


def records(data: bytes):
    """(offset, type, size) of every record of the data section."""
    d_off, d_size = header(data)["data"]
    at = d_off
    while at < d_off + d_size:
        ty, _misc, size = struct.unpack_from("<IHH", data, at)
        yield at, ty, size
        at += size


# --- fixtures -----------------------------------------------------------------


@pytest.fixture(scope="module")
def warm2_bytes() -> bytes:
    return lzma.decompress(WARM2_DATA.read_bytes())


@pytest.fixture(scope="module")
def sample_bytes() -> bytes:
    return lzma.decompress(SAMPLE_DATA.read_bytes())


@pytest.fixture(scope="module")
def warm2() -> kmm.trace.TraceLog:
    return kmm.trace.load(WARM2_DATA)


@pytest.fixture(scope="module")
def warm2_text() -> kmm.trace.TraceLog:
    return kmm.trace.load(WARM2_TEXT)


@pytest.fixture(scope="module")
def sample_pd() -> kmm.trace.TraceLog:
    return kmm.trace.load(SAMPLE_DATA)


@pytest.fixture(scope="module")
def sample_text() -> kmm.trace.TraceLog:
    return kmm.trace.load(SAMPLE_TEXT)


def event_tuple(e) -> tuple:
    return (e.name, e.cpu, e.pid, e.comm, e.timestamp, e.fields)


def event_key(e) -> tuple:
    return (e.name, e.cpu, e.pid, e.comm, e.timestamp, tuple(sorted(e.fields.items())))


# --- the same TraceLog as perf script's text -----------------------------------


def test_warm2_perf_data_is_its_perf_script_text_event_for_event(warm2, warm2_text):
    assert len(warm2) == len(warm2_text) == 2_083_209
    assert warm2.counts() == warm2_text.counts()
    # Every event, every field (call sites named through the bundle's
    # kallsyms.txt.xz, found next to perf.data), compared in Rust ...
    assert warm2.first_difference(warm2_text) is None
    # ... and the comparison itself checked here on a stretch of events in Python.
    for i in list(range(0, 20_000)) + list(range(len(warm2) - 5_000, len(warm2))):
        assert event_tuple(warm2[i]) == event_tuple(warm2_text[i]), i
    assert warm2[0].fields["call_site"] == "sched_setaffinity+0x127"
    assert warm2[1].fields["call_site"] == "getname_flags.part.0+0x24"
    # vmalloc events keep the fields the replay reads, by name.
    i = next(i for i in range(len(warm2)) if warm2[i].name == "vmalloc:alloc_vmap_area")
    assert {"va_start", "size", "align", "failed"} <= set(warm2[i].fields)
    assert warm2[i].fields == warm2_text[i].fields


def test_first_difference_finds_a_difference(sample_pd, sample_text, tmp_path):
    # The sample has no kallsyms: its call sites differ from the text (see below).
    i, what = sample_pd.first_difference(sample_text)
    assert "call_site" in what
    assert event_tuple(sample_pd[i]) != event_tuple(sample_text[i])
    assert all(event_tuple(sample_pd[j]) == event_tuple(sample_text[j]) for j in range(i))


def test_sample_perf_data_without_kallsyms(sample_pd, sample_text):
    """The sample's perf script text was printed on the recording machine, whose
    /proc/kallsyms did not ship: perf.data alone has raw call-site addresses,
    and perf prints those as 0x<address>. Everything else is compared as is;
    call sites are checked to be the text's names at consistent addresses:
    one address per name+offset, and two sites in one function lie as far
    apart as their offsets say."""
    assert len(sample_pd) == len(sample_text) == 83_084
    by_name: dict[str, int] = {}
    for i in range(len(sample_pd)):
        a, b = sample_pd[i], sample_text[i]
        fa, fb = a.fields, b.fields
        assert (a.name, a.cpu, a.pid, a.comm, a.timestamp) == (b.name, b.cpu, b.pid, b.comm, b.timestamp), i
        if "call_site" in fb:
            raw, named = fa.pop("call_site"), fb.pop("call_site")
            assert re.fullmatch(r"0x[0-9a-f]+", raw), raw
            assert by_name.setdefault(named, int(raw, 16)) == int(raw, 16), (i, named)
        assert fa == fb, i
    addrs = list(by_name.values())
    assert len(set(addrs)) == len(addrs) > 100
    funcs: dict[str, tuple[int, int]] = {}
    for named, addr in by_name.items():
        func, _, off = named.rpartition("+0x")
        if func in funcs:
            a0, o0 = funcs[func]
            assert addr - a0 == int(off, 16) - o0, named
        funcs[func] = (addr, int(off, 16))


def test_timestamps_are_perf_scripts_microseconds(warm2):
    assert warm2[0].timestamp == 1188_191277_000
    ts = [warm2[i].timestamp for i in range(0, len(warm2), 997)]
    assert all(t % 1000 == 0 for t in ts)


def test_kmm_stat_prints_the_same_for_perf_data_and_text(capsys, monkeypatch, warm2, warm2_text):
    code_a, out_a, err_a = run_cli(capsys, "stat", str(WARM2_DATA))
    code_b, out_b, err_b = run_cli(capsys, "stat", str(WARM2_TEXT))
    assert code_a == code_b == 0
    assert out_a == out_b and "SUMMARY (SLAB allocator)" in out_a and "SUMMARY (page allocator)" in out_a
    assert err_a.count("\n") == 1 and "18 chunks (144,172 events)" in err_a and "could not see them" in err_a
    assert err_b == ""
    # The tables, through the same command (the traces loaded once, above).
    loaded = {str(WARM2_DATA): warm2, str(WARM2_TEXT): warm2_text}
    monkeypatch.setattr(kmm.trace, "load", lambda path, **kw: loaded[str(path)])
    for opts in (["--caller", "--alloc", "-l", "30"], ["--page", "--caller", "--alloc", "-s", "hit"]):
        _, out_a, _ = run_cli(capsys, "stat", *opts, str(WARM2_DATA))
        _, out_b, _ = run_cli(capsys, "stat", *opts, str(WARM2_TEXT))
        assert out_a == out_b and "Callsite" in out_a


def test_sample_stat_numbers_as_perf_kmem_printed():
    slab = (ROOT / "data" / "traces" / "sample.perf-kmem-stat-slab.txt").read_text()
    st = kmm.trace.stat(kmm.trace.load(SAMPLE_DATA))
    out = st.format(page=False)
    for line in slab.splitlines():
        if line.startswith(("Total", "Net", "Internal", "Cross")):
            assert line in out


# --- lost data -----------------------------------------------------------------


def test_lost_chunks_and_events(warm2, warm2_bytes, sample_pd):
    assert warm2.lost_chunks == 18  # perf kmem: "lost 18 chunks!"
    assert warm2.lost_events == 144_172  # perf: 2,227,381 samples, 6.47% lost
    assert warm2.lost_samples == 144_172
    # Independently: the PERF_RECORD_LOST (2) records and their counts.
    lost = [struct.unpack_from("<QQ", warm2_bytes, at + 8)[1] for at, ty, _ in records(warm2_bytes) if ty == 2]
    assert (len(lost), sum(lost)) == (18, 144_172)
    assert (sample_pd.lost_chunks, sample_pd.lost_events, sample_pd.truncated_at) == (0, 0, None)


def test_replay_warns_once_about_lost_chunks(capsys):
    code, out, err = run_cli(capsys, "replay", str(SAMPLE_DATA), "--memory", "2G")
    assert code == 0 and "Replayed" in out and err == ""
    code, out, err = run_cli(capsys, "proc", "buddyinfo", "--trace", str(SAMPLE_DATA))
    assert code == 0 and out.startswith("Node 0, zone")


# --- kallsyms ------------------------------------------------------------------


def test_kallsyms_beside_the_file_or_given(tmp_path, warm2_bytes, warm2_text):
    alone = tmp_path / "perf.data"
    alone.write_bytes(small_perf_data(warm2_bytes, 2000))
    t = kmm.trace.load(alone)  # no kallsyms beside it: raw addresses
    assert re.fullmatch(r"0x[0-9a-f]+", t[0].fields["call_site"])
    t = kmm.trace.load(alone, kallsyms=WARM2 / "kallsyms.txt.xz")
    # The first records of the file are events of the text (not its first
    # events: the other CPU's records of that time come later in the file).
    last = t[len(t) - 1].timestamp
    text = Counter()
    for i in range(len(warm2_text)):
        e = warm2_text[i]
        if e.timestamp > last:
            break
        text[event_key(e)] += 1
    assert all(text[event_key(t[i])] > 0 for i in range(len(t)))
    assert sum(1 for i in range(len(t)) if "call_site" in t[i].fields) > 500
    assert t[0].fields["call_site"] == "sched_setaffinity+0x127"
    plain = tmp_path / "kallsyms.txt"
    plain.write_bytes(lzma.decompress((WARM2 / "kallsyms.txt.xz").read_bytes()))
    assert kmm.trace.load(alone)[1].fields["call_site"] == "getname_flags.part.0+0x24"
    plain.write_text("ffffffff81000000 T _text\nthis is not kallsyms\n")
    with pytest.raises(kmm.TraceFormatError, match=r"kallsyms.txt: line 2: ") as e:
        kmm.trace.load(alone)
    assert e.value.line == 2


# --- bad input -----------------------------------------------------------------


def small_perf_data(data: bytes, keep: int) -> bytes:
    """A copy of a perf.data holding only its first `keep` records (header,
    attributes and feature sections moved accordingly)."""
    h = header(data)
    d_off, d_size = h["data"]
    ends = [at + size for at, _ty, size in records(data)]
    new_size = ends[keep - 1] - d_off
    shift = d_size - new_size
    out = bytearray(data[: d_off + new_size])
    out[48:56] = struct.pack("<Q", new_size)
    table = data[h["table"]: h["table"] + 16 * len(h["features"])]
    for k in range(len(h["features"])):
        off, size = struct.unpack_from("<2Q", table, 16 * k)
        table = table[: 16 * k] + struct.pack("<2Q", off - shift, size) + table[16 * k + 16:]
    out += table + data[h["table"] + len(table):]
    return bytes(out)


@pytest.fixture(scope="module")
def mini(sample_bytes) -> bytes:
    return small_perf_data(sample_bytes, 3000)


def test_a_shortened_file_is_still_a_perf_data(tmp_path, mini, sample_text):
    p = tmp_path / "mini.data"
    p.write_bytes(mini)
    t = kmm.trace.load(p)
    assert 2500 < len(t) < 3000 and t.truncated_at is None
    assert [event_tuple(t[i])[:5] for i in range(100)] == [event_tuple(sample_text[i])[:5] for i in range(100)]


def test_truncated_inside_the_data_is_an_error_naming_the_byte(tmp_path, mini):
    h = header(mini)
    cut = h["data"][0] + h["data"][1] // 2
    p = tmp_path / "cut.data"
    p.write_bytes(mini[:cut])
    with pytest.raises(kmm.TraceFormatError) as e:
        kmm.trace.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: byte {cut}: truncated") and "event formats" in msg
    assert e.value.offset == cut
    assert "\n" not in msg


def test_truncated_after_the_formats_keeps_every_event(tmp_path, mini):
    h = header(mini)
    off, size = h["features"][1]  # HEADER_TRACING_DATA
    cut = off + size + 10
    assert cut < len(mini)
    p = tmp_path / "cut.data"
    p.write_bytes(mini[:cut])
    whole = tmp_path / "whole.data"
    whole.write_bytes(mini)
    t, w = kmm.trace.load(p), kmm.trace.load(whole)
    assert t.truncated_at == cut
    assert t.first_difference(w) is None


def test_truncated_inside_the_formats_or_header(tmp_path, mini):
    off, size = header(mini)["features"][1]
    for cut, what in ((off + size // 2, "tracing data"), (60, "header"), (3, "empty")):
        p = tmp_path / f"cut{cut}.data"
        p.write_bytes(mini[:cut])
        with pytest.raises(kmm.TraceFormatError) as e:
            kmm.trace.load(p)
        assert str(e.value).startswith(f"{p}: "), str(e.value)
        assert "\n" not in str(e.value)
    (tmp_path / "h.data").write_bytes(mini[:60])
    with pytest.raises(kmm.TraceFormatError, match=r"byte 60: .*header"):
        kmm.trace.load(tmp_path / "h.data")


def test_corrupt_record_names_its_offset_and_lenient_keeps_what_came_before(tmp_path, mini):
    recs = list(records(mini))
    at = recs[1500][0]
    bad = bytearray(mini)
    bad[at + 6: at + 8] = b"\x00\x00"  # a record of size 0
    p = tmp_path / "bad.data"
    p.write_bytes(bytes(bad))
    with pytest.raises(kmm.TraceFormatError, match=rf"byte {at}: a record header says its size is 0"):
        kmm.trace.load(p)
    t = kmm.trace.load(p, lenient=True)
    assert t.truncated_at == at and t.skipped == 1 and t.skipped_examples[0][0] == at
    samples_before = sum(1 for _, ty, _ in recs[:1500] if ty == 9)
    assert len(t) == samples_before


def test_undecodable_sample_names_its_offset(tmp_path, mini):
    at, _, size = next(r for r in list(records(mini))[2000:] if r[1] == 9)
    bad = bytearray(mini)
    # The sample's raw size (after id, ip, pid/tid, time, cpu, period) claims more than the record holds.
    struct.pack_into("<I", bad, at + 8 + 48, 60000)
    p = tmp_path / "bad.data"
    p.write_bytes(bytes(bad))
    with pytest.raises(kmm.TraceFormatError) as e:
        kmm.trace.load(p)
    assert e.value.offset == at
    good = kmm.trace.load(tmp_path / "bad.data", lenient=True)
    assert good.skipped == 1


def test_no_kmem_tracepoints_says_what_it_has_and_what_works(tmp_path, mini):
    h = header(mini)
    off, size = h["features"][12]  # HEADER_EVENT_DESC: the event names
    desc = mini[off: off + size]
    for sys_name in (b"kmem:", b"percpu:", b"vmalloc:"):
        desc = desc.replace(sys_name, b"x" * (len(sys_name) - 1) + b":")
    p = tmp_path / "cycles.data"
    p.write_bytes(mini[:off] + desc + mini[off + size:])
    with pytest.raises(kmm.TraceFormatError) as e:
        kmm.trace.load(p)
    msg = str(e.value)
    assert "no kmem, percpu or vmalloc tracepoints" in msg and "xxxx:kmalloc" in msg
    assert "perf record -k CLOCK_MONOTONIC -e 'kmem:*,percpu:*,vmalloc:*' -a" in msg


@pytest.mark.parametrize(
    "content, looks_like",
    [
        (b"", "empty"),
        (b"\x7fELF\x02\x01\x01\x00" + bytes(100), "ELF"),
        (b"\x89PNG\r\n\x1a\n" + bytes(100), "PNG"),
        (b'{"traceEvents": [{"ph": "X"}]}', "JSON"),
        (bytes(range(256)) * 8, "binary data"),
    ],
)
def test_files_that_are_no_trace_get_one_line(tmp_path, capsys, content, looks_like):
    p = tmp_path / "f.bin"
    p.write_bytes(content)
    with pytest.raises(kmm.TraceFormatError) as e:
        kmm.trace.load(p)
    assert looks_like in str(e.value) and "perf.data" in str(e.value)
    code, out, err = run_cli(capsys, "stat", str(p))
    assert code == 1 and out == "" and err.count("\n") == 1 and looks_like in err


def test_damaged_compressed_perf_data(tmp_path, mini):
    xz = tmp_path / "cut.data.xz"
    xz.write_bytes(lzma.compress(mini)[:-300])
    gz = tmp_path / "cut.data.gz"
    gz.write_bytes(gzip.compress(mini)[:-300])
    for p in (xz, gz):
        with pytest.raises(kmm.TraceFormatError, match="damaged or truncated"):
            kmm.trace.load(p)
    ok = tmp_path / "ok.data.gz"
    ok.write_bytes(gzip.compress(mini))
    plain = tmp_path / "ok.data"
    plain.write_bytes(mini)
    assert kmm.trace.load(ok).first_difference(kmm.trace.load(plain)) is None
