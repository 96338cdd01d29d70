"""The API as type checkers see it (issue 11, part 7): GFP_*, __GFP_* and
SLAB_* are declared (mypy and IDEs see them, with the kernel's values), the
README's example passes ``mypy --strict``, the module-level functions have
their Machine method's signature, Trace and Proc have reprs, and every
public property has a docstring.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import kmm
import kmm._kmm as core

ROOT = Path(__file__).resolve().parent.parent
PKG = Path(kmm.__file__).resolve().parent


def mypy_strict(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "example.py"
    f.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(f)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def declared(path: Path) -> dict[str, str]:
    """Module-level annotated assignments: name -> source of the annotation."""
    tree = ast.parse(path.read_text())
    return {
        n.target.id: ast.unparse(n.annotation)
        for n in tree.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def test_readme_example_passes_mypy_strict(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    assert "kmm.Machine(" in example and "kmm.__GFP_ZERO" in example
    r = mypy_strict(tmp_path, example)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout


def test_mypy_sees_the_flags_and_catches_typos(tmp_path):
    ok = mypy_strict(
        tmp_path,
        "import kmm\n"
        "a: int = kmm.GFP_KERNEL | kmm.__GFP_ZERO | kmm.gfp.GFP_ATOMIC | kmm.gfp.__GFP_NOWARN\n"
        "b: int = kmm.SLAB_HWCACHE_ALIGN | kmm.SLAB_FAILSLAB\n"
        "blk: kmm.Block = kmm.kmalloc(64, kmm.GFP_KERNEL)\n"
        "kmm.kfree(blk)\n"
        "try:\n"
        "    kmm.alloc_pages(kmm.GFP_ATOMIC, 3)\n"
        "except kmm.OutOfMemoryError:\n"
        "    pass\n"
        "f: kmm.FaultAttr = kmm.default_machine().fault_attr('failslab')\n"
        "f.probability = 10\n",
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The names are real declarations, not Any: a misspelling and a wrong
    # argument type are errors.
    bad = mypy_strict(tmp_path, "import kmm\nx: int = kmm.GFP_KERNELL\nkmm.kmalloc('64')\n")
    assert bad.returncode == 1
    assert 'Module has no attribute "GFP_KERNELL"' in bad.stdout
    assert 'Argument 1 has incompatible type "str"; expected "int"' in bad.stdout


def test_gfp_names_are_declared_with_the_cores_values():
    decl = declared(PKG / "gfp.py")
    names = {n for n, _ in core.GFP_NAMES}
    flags = {n for n, a in decl.items() if a == "Final[int]"}
    assert flags == names
    for n, v in core.GFP_NAMES:
        assert getattr(kmm.gfp, n) == v, n
        assert getattr(kmm, n) == v, n
    assert set(kmm.gfp.__all__[4:]) == names
    # The kernel's own spot checks (include/linux/gfp_types.h, 6.18).
    assert kmm.GFP_KERNEL == 0xCC0 and kmm.GFP_ATOMIC == 0x820 and kmm.__GFP_ZERO == 0x100


def test_slab_flags_are_declared_with_the_cores_values():
    decl = declared(PKG / "__init__.py")
    slab = {n for n, a in decl.items() if n.startswith("SLAB_") and a == "Final[int]"}
    assert slab == {n for n, _ in core.SLAB_FLAGS}
    for n, v in core.SLAB_FLAGS:
        assert getattr(kmm, n) == v, n
        assert n in kmm.__all__


def test_forwarded_functions_are_declared_for_type_checkers():
    src = (PKG / "__init__.py").read_text()
    tree = ast.parse(src)
    forwarded: list[str] = []
    typed: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_FORWARDED" for t in node.targets):
            forwarded = [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            typed = [t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
    assert forwarded and typed == forwarded
    for name in forwarded:
        assert callable(getattr(kmm, name)), name


def test_trace_and_proc_reprs():
    m = kmm.Machine(memory="256M")
    assert repr(m.proc).startswith("<Proc of a x86_64 machine, 256 MiB: buddyinfo()")
    n = len(m.trace.available())
    assert repr(m.trace) == f"<Trace: {n} tracepoints, all off>"
    with m.trace.record("kmem:kmalloc,kmem:kfree"):
        assert repr(m.trace) == f"<Trace: 2 of {n} tracepoints on: kmem:kmalloc, kmem:kfree>"
    assert repr(m.trace) == f"<Trace: {n} tracepoints, all off>"


def test_public_properties_have_docstrings():
    missing = []
    for name, cls in inspect.getmembers(core, inspect.isclass):
        for attr, v in vars(cls).items():
            if attr.startswith("_"):
                continue
            if type(v).__name__ in ("getset_descriptor", "member_descriptor", "property") and not (v.__doc__ or "").strip():
                missing.append(f"_kmm.{name}.{attr}")
    import kmm.recording
    import kmm.snapshots
    import kmm.trace

    for mod in (kmm, kmm.trace, kmm.snapshots, kmm.recording):
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            for attr, v in vars(cls).items():
                if isinstance(v, property) and not attr.startswith("_") and not (v.__doc__ or "").strip():
                    missing.append(f"{mod.__name__}.{name}.{attr}")
    assert missing == []
