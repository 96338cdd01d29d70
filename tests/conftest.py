"""Shared fixtures: real data from a Linux 6.18 machine and fresh machines."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

import kmm

DATA = Path(__file__).parent / "data"
LINUX = DATA / "linux"
SAMPLE_TRACE = Path(kmm.__file__).parent / "data" / "sample.perf.txt.xz"


def real(name: str) -> str:
    """A file captured from the real Linux 6.18 machine (tests/data/linux)."""
    return (LINUX / name).read_text()


def sample_trace_lines():
    with lzma.open(SAMPLE_TRACE, "rt") as f:
        yield from f


@pytest.fixture
def m() -> kmm.Machine:
    """A fresh default machine (x86_64, 1 GiB, 2 CPUs)."""
    return kmm.Machine()


@pytest.fixture
def small() -> kmm.Machine:
    """A small x86_64 machine (64 MiB: DMA and DMA32 only)."""
    return kmm.Machine(memory="64M")


def buddyinfo(m: kmm.Machine) -> list[list[int]]:
    """Free blocks per zone and order, after draining the per-CPU page lists
    (as /proc/buddyinfo would read once drain_all_pages() ran)."""
    m.drain_all_pages()
    return [z.nr_free for z in m.zones]


def free_pages(m: kmm.Machine) -> int:
    """Every free page: in the buddy allocator or on a per-CPU list."""
    return m.nr_free_pages() + m.nr_pcp_pages()


def assert_healthy(m: kmm.Machine) -> None:
    errs = m.check()
    assert errs == [], errs


def vm_state(m: kmm.Machine) -> dict:
    """Everything a refused call must leave as it was, for the virtual-memory
    tests (per-CPU page lists drained first, as /proc/buddyinfo reads after
    drain_all_pages)."""
    m.drain_all_pages()
    return {
        "buddyinfo": m.proc.buddyinfo(),
        "slabinfo": m.proc.slabinfo(),
        "vmallocinfo": m.proc.vmallocinfo(),
        "vmalloc_nr_pages": m.vmalloc_nr_pages(),
        "vmap_lazy_nr": m.vmap_lazy_nr,
        "nr_free_pages": m.nr_free_pages(),
        "PageTables": m.proc.meminfo_dict()["PageTables"],
        "pkmap": m.pkmap_stats(),
        "kmap_local_depths": [m.kmap_local_depth(c) for c in range(m.cpus)],
        "preempt_count": m.preempt_count(),
    }
