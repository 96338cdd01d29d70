"""`kmm demo` walks the whole chapter on every architecture (exit code 0,
and the machine's invariants hold at the end)."""

from __future__ import annotations

import pytest

from kmm import cli


@pytest.mark.parametrize("arch", ["x86_64", "i386", "i386-pae"])
def test_demo_runs_on_every_arch(arch, capsys):
    assert cli.main(["demo", "--arch", arch, "--memory", "2G"]) == 0
    out = capsys.readouterr().out
    assert "invariant check: ok" in out
    assert "/proc/vmallocinfo:" in out
    if arch == "x86_64":  # CONFIG_VMAP_STACK: the stack is a vmalloc area, as in the real file
        assert "kernel_clone+0x94/0x3e0 pages=4 vmalloc N0=4" in out
    # The vmalloc'ed bytes read back through the page's own mapping.
    assert "b'vmaddr'" in out


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["proc", "nosuchfile"])
    assert e.value.code == 2


def test_model_error_exits_1(capsys):
    assert cli.main(["demo", "--arch", "i386", "--page-size", "16384"]) == 1
    assert "not supported on i386" in capsys.readouterr().err
