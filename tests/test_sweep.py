"""kmm sweep (issue 12, part 3): the grid, worker processes, a Dask cluster
on loopback, the CSV/Parquet output, resumption and failure rows.

The replays are of the packaged sample trace (83k events: a fraction of a
second each), so the whole file runs in well under a minute."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import kmm
from kmm import cli, compare
from kmm import sweep as sw

SAMPLE = str(Path(kmm.__file__).parent / "data" / "sample.perf.txt.xz")
FRACTION = "vm.percpu_pagelist_high_fraction=8"


def read_csv(path):
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def key(row):
    return (row["recording"], row["settings"], str(row["seed"]))


def figures_of(row):
    return {k: float(row[k]) for k in compare.FIGURES if row.get(k) not in ("", None)}


# ---- the grid ---------------------------------------------------------------------------------


def test_grid_is_every_combination_and_checks_every_setting_first():
    jobs = sw.grid(["a", "b"], ["", "slub_min_order=1", FRACTION], seeds=2)
    assert len(jobs) == 2 * 3 * 2
    assert len({j.key() for j in jobs}) == 12
    assert jobs[0] == sw.Job("a", "", 0) and jobs[-1] == sw.Job("b", FRACTION, 1)
    with pytest.raises(ValueError, match="vm.no_such_sysctl"):
        sw.grid(["a"], ["", "vm.no_such_sysctl=1"])
    with pytest.raises(ValueError, match="watermark_scale_factor"):
        sw.grid(["a"], ["vm.watermark_scale_factor=0"])  # the kernel's range is 1 .. 3000
    with pytest.raises(ValueError, match="no_such_param"):
        sw.grid(["a"], ["no_such_param=1"])
    with pytest.raises(ValueError, match="seeds"):
        sw.grid(["a"], [""], seeds=0)
    with pytest.raises(ValueError, match="twice"):
        sw.grid(["a"], ["slub_min_order=1", "slub_min_order=1"])


def test_grid_from_toml(tmp_path):
    g = tmp_path / "grid.toml"
    g.write_text('recordings = ["rec1", "/abs/rec2"]\nsettings = ["", "slub_min_order=1"]\nseeds = 3\n')
    recs, sets, seeds = sw.load_grid(g)
    assert recs == [str(tmp_path / "rec1"), "/abs/rec2"] and sets == ["", "slub_min_order=1"] and seeds == 3
    g.write_text('recordings = ["r"]\nsetting = [""]\n')
    with pytest.raises(ValueError, match="unknown key"):
        sw.load_grid(g)
    g.write_text('recordings = "r"\n')
    with pytest.raises(ValueError, match="list of paths"):
        sw.load_grid(g)
    g.write_text("recordings = [\n")
    with pytest.raises(ValueError, match=str(g)):
        sw.load_grid(g)


# ---- runs, output, resumption, failures -------------------------------------------------------


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A 2-settings x 2-seeds sweep of the sample in this process."""
    out = tmp_path_factory.mktemp("sweep") / "out.csv"
    res = sw.sweep([SAMPLE], ["", FRACTION], seeds=2, jobs=1, output=out)
    return out, res


def test_rows_are_written_with_every_column(first):
    out, res = first
    assert res.ran == 4 and res.skipped == 0 and not res.failed
    fields, rows = read_csv(out)
    assert tuple(fields) == sw.COLUMNS
    assert sorted(key(r) for r in rows) == sorted(j.key() for j in sw.grid([SAMPLE], ["", FRACTION], 2))
    for r in rows:
        assert r["status"] == "ok" and r["error"] == ""
        assert int(r["events"]) == len(kmm.trace.load(SAMPLE))
        assert float(r["seconds"]) > 0
        assert set(figures_of(r)) == set(compare.FIGURES)


def test_a_setting_changes_its_figure_as_the_kernel_computes_it(first):
    """With percpu_pagelist_high_fraction=8, pcp->high_min = high_max =
    zone_highsize: managed / 8 split over the CPUs, at least 4 batches
    (mm/page_alloc.c), so each CPU's pcp->high at the end is that value
    where the replay used the list, or 0 where it never did (pcp->high
    starts at 0 and only moves within [high_min, high_max] once used)."""
    _, res = first
    m = kmm.trace.machine_for(kmm.trace.load(SAMPLE))
    possible = {0}
    for z in m.zones:
        if not z.populated:
            continue
        batch = min(z.managed >> 10, (1 << 20) // 4096) // 4
        batch = max(batch, 1)
        x = batch + batch // 2
        batch = max(1, (1 << (x.bit_length() - 1)) - 1)
        high = max(z.managed // 8 // m.cpus, batch * 4)
        for _cpu in range(m.cpus):
            possible |= {p + high for p in possible}
    got = [r["pcp_high"] for r in res.rows if r["settings"] == FRACTION]
    assert got[0] == got[1] and got[0] in possible and got[0] > 0
    default = [r["pcp_high"] for r in res.rows if r["settings"] == ""]
    assert default[0] not in possible


def test_rows_match_a_run_of_their_own(first):
    """The sweep adds nothing to a run: its row is kmm.compare.run's figures."""
    _, res = first
    r = compare.run(kmm.trace.load(SAMPLE), FRACTION, seed=1)
    row = next(x for x in res.rows if x["settings"] == FRACTION and x["seed"] == 1)
    assert {k: row[k] for k in compare.FIGURES} == r.figures


def test_a_rerun_skips_what_is_done_and_adds_what_is_new(first, tmp_path):
    out0, _ = first
    out = tmp_path / "out.csv"
    out.write_bytes(out0.read_bytes())
    res = sw.sweep([SAMPLE], ["", FRACTION, "slub_min_order=1"], seeds=2, jobs=1, output=out)
    assert (res.skipped, res.ran) == (4, 2)
    _, rows = read_csv(out)
    assert len(rows) == 6 and len({key(r) for r in rows}) == 6
    # The old rows are kept as they were.
    _, old = read_csv(out0)
    assert {key(r): r for r in rows if key(r) in {key(o) for o in old}} == {key(o): o for o in old}
    # Nothing left to do: nothing runs.
    again = sw.sweep([SAMPLE], ["", FRACTION, "slub_min_order=1"], seeds=2, jobs=1, output=out)
    assert (again.skipped, again.ran) == (6, 0)
    assert len(read_csv(out)[1]) == 6


def test_failed_rows_are_retried_on_a_rerun(first, tmp_path):
    out0, _ = first
    out = tmp_path / "out.csv"
    fields, rows = read_csv(out0)
    rows[0]["status"], rows[0]["error"] = "failed", "RuntimeError: killed"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    res = sw.sweep([SAMPLE], ["", FRACTION], seeds=2, jobs=1, output=out)
    assert (res.skipped, res.ran) == (3, 1)
    _, rows = read_csv(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)


def test_a_failed_run_is_a_row_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "f.csv"
    # Within the sysctl's range (0 .. INT_MAX), but more than the machine
    # has: min_free_kbytes_sysctl_handler's machine refuses it at boot.
    bad = "vm.min_free_kbytes=2000000000"
    missing = str(tmp_path / "no-such-recording")
    res = sw.sweep([SAMPLE, missing], ["", bad], jobs=1, output=out)
    by = {(Path(r["recording"]).name, r["settings"]): r for r in res.rows}
    assert by[("sample.perf.txt.xz", "")]["status"] == "ok"
    assert by[("sample.perf.txt.xz", bad)]["status"] == "failed"
    assert "min_free_kbytes" in by[("sample.perf.txt.xz", bad)]["error"]
    for s in ("", bad):
        r = by[("no-such-recording", s)]
        assert r["status"] == "failed" and "No such file" in r["error"]
    _, rows = read_csv(out)
    assert sum(r["status"] == "failed" for r in rows) == 3
    assert all("\n" not in r["error"] for r in rows)
    text = res.summary()
    assert "3 failed run(s)" in text and bad in text


def test_parquet_has_the_csv_rows(first):
    import pyarrow.parquet as pq

    out, res = first
    assert res.parquet == out.with_suffix(".parquet") and res.parquet.exists()
    t = pq.read_table(res.parquet).to_pylist()
    _, rows = read_csv(out)
    assert [key(r) for r in t] == [key(r) for r in rows]
    for p, c in zip(t, rows):
        assert p["status"] == c["status"]
        assert p["pcp_high"] == float(c["pcp_high"]) and p["zone_lock"] == float(c["zone_lock"])


def test_worker_processes_give_the_rows_one_process_gives(first, tmp_path):
    _, res1 = first
    res = sw.sweep([SAMPLE], ["", FRACTION], seeds=2, jobs=2, output=tmp_path / "j2.csv")
    assert res.ran == 4 and not res.failed
    one = {key(r): figures_of(r) for r in res1.rows}
    two = {key(r): figures_of(r) for r in res.rows}
    assert two == one


def test_summary_is_mean_per_settings_with_the_change(first):
    _, res = first
    text = res.summary(figures=("pcp_high",))
    base = sum(r["pcp_high"] for r in res.rows if r["settings"] == "") / 2
    other = sum(r["pcp_high"] for r in res.rows if r["settings"] == FRACTION) / 2
    pct = (other - base) * 100 / base
    line = next(x for x in text.splitlines() if x.startswith("pcp high"))
    assert f"{int(base):,}" in line and f"{int(other):,}" in line and f"{pct:.2f}%" in line
    assert "'(default)' 2/0" in text


def test_plot(first, tmp_path):
    _, res = first
    p = tmp_path / "sweep.png"
    sw.plot(res.rows, p)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- Dask on loopback ------------------------------------------------------------------------


def test_a_local_dask_cluster_gives_the_same_rows(first, tmp_path):
    from distributed import LocalCluster

    _, res1 = first
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as c:
        res = sw.sweep([SAMPLE], ["", FRACTION], seeds=2, cluster=c.scheduler_address, output=tmp_path / "d.csv")
    assert res.ran == 4 and not res.failed
    assert {key(r): figures_of(r) for r in res.rows} == {key(r): figures_of(r) for r in res1.rows}


def test_an_unreachable_cluster_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sw, "CONNECT_TIMEOUT", 2)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConnectionError, match=f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}"):
        sw.sweep([SAMPLE], [""], cluster=f"tcp://127.0.0.1:{port}", output=tmp_path / "c.csv")
    assert not (tmp_path / "c.csv").exists()
    rc = cli.main(["sweep", SAMPLE, "--cluster", f"tcp://127.0.0.1:{port}", "-o", str(tmp_path / "c.csv")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "cannot reach the Dask scheduler" in err
    assert cli.main(["sweep", SAMPLE, "--cluster", "localhost"]) == 2
    assert "tcp://HOST:PORT" in capsys.readouterr().err


# ---- the command line ------------------------------------------------------------------------


def test_cli_sweep_writes_csv_summary_and_plot(tmp_path, capsys):
    out, png = tmp_path / "s.csv", tmp_path / "s.png"
    rc = cli.main(["sweep", SAMPLE, "--set", "", "--set", "slub_min_order=1", "-j", "1", "-o", str(out),
                   "--plot", str(png)])
    o, err = capsys.readouterr()
    assert rc == 0, err
    assert "2 runs (1 recording(s) x 2 settings x 1 seed(s))" in o
    assert "slub_min_order=1" in o and "Slab memory (MiB)" in o
    assert len(read_csv(out)[1]) == 2 and png.exists()
    # Again: both skipped.
    assert cli.main(["sweep", SAMPLE, "--set", "", "--set", "slub_min_order=1", "-j", "1", "-o", str(out)]) == 0
    assert "2 run(s) already in" in capsys.readouterr().out


@pytest.mark.parametrize("args,what", [
    (["--set", "vm.watermark_scale_factor=5000"], "vm.watermark_scale_factor"),
    (["--set", "bogus=1"], "bogus"),
    (["--seeds", "0"], "--seeds"),
    (["-j", "0"], "--jobs"),
])
def test_cli_bad_input_exits_2_before_any_run(tmp_path, capsys, args, what):
    out = tmp_path / "bad.csv"
    try:
        code = cli.main(["sweep", SAMPLE, *args, "-o", str(out)])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and what in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_sweep_grid_file_and_missing_recording(tmp_path, capsys):
    g = tmp_path / "g.toml"
    g.write_text(f'recordings = ["{SAMPLE}"]\nsettings = ["", "{FRACTION}"]\nseeds = 1\n')
    assert cli.main(["sweep", "--grid", str(g), "-j", "1", "-o", str(tmp_path / "g.csv")]) == 0
    assert len(read_csv(tmp_path / "g.csv")[1]) == 2
    capsys.readouterr()
    assert cli.main(["sweep", str(tmp_path / "nope"), "-o", str(tmp_path / "n.csv")]) == 1
    assert "No such file or directory" in capsys.readouterr().err


def test_a_failed_run_makes_the_exit_code_1(tmp_path, capsys):
    rc = cli.main(["sweep", SAMPLE, "--set", "vm.min_free_kbytes=2000000000", "-j", "1", "-o", str(tmp_path / "x.csv")])
    assert rc == 1
    assert "1 failed run(s)" in capsys.readouterr().out


def test_ctrl_c_keeps_the_rows_done(tmp_path):
    """A sweep interrupted half way keeps its finished rows (written as each
    run ends), and a rerun does only the rest."""
    out = tmp_path / "i.csv"
    code = (
        "import sys, kmm.sweep as sw\n"
        "orig = sw.run_job\n"
        "n = [0]\n"
        "def job(j, o):\n"
        "    n[0] += 1\n"
        "    if n[0] == 3: raise KeyboardInterrupt\n"
        "    return orig(j, o)\n"
        "sw.run_job = job\n"
        f"sw.sweep([{SAMPLE!r}], ['', {FRACTION!r}], seeds=2, jobs=1, output={str(out)!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode != 0 and "KeyboardInterrupt" in p.stderr
    assert len(read_csv(out)[1]) == 2
    res = sw.sweep([SAMPLE], ["", FRACTION], seeds=2, jobs=1, output=out)
    assert (res.skipped, res.ran) == (2, 2)
