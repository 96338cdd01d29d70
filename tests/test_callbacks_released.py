"""Python callbacks the core keeps (trace callbacks, slab constructors) are
released, even when the core lets go of them on a thread without the GIL.

kmm's extension is built without PyO3's reference pool (issue 13; see
rust/kmm-py/src/gil.rs): a reference dropped without the GIL is queued by
kmm and released at the next point that adds or removes a callback
(`Machine(...)`, `kmem_cache_create`, `trace.attach`, `TraceHandle.detach`).
Without that queue such a reference would leak (or abort the interpreter);
these tests watch the callbacks through weak references.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref

import kmm


class Callback:
    """A callable that weak references can watch (a bound list method cannot be)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args) -> None:
        self.calls += 1


def settle(m: kmm.Machine) -> None:
    """A release point with nothing else attached afterwards."""
    m.trace.attach("kmem:kmalloc", Callback()).detach()
    gc.collect()


def test_a_detached_trace_callback_is_released():
    m = kmm.Machine(memory="64M", cpus=1)
    cb = Callback()
    ref = weakref.ref(cb)
    h = m.trace.attach("kmem:kmalloc", cb)
    m.kfree(m.kmalloc(64))  # this thread now caches the sink list holding cb
    assert cb.calls == 1
    del cb
    h.detach()
    # The thread's cached sink list is replaced on its next event; the old
    # list (and cb) is dropped then, and released at the next release point.
    other = Callback()
    with m.trace.attach("kmem:kmalloc", other):
        m.kfree(m.kmalloc(64))
    settle(m)
    assert other.calls == 1
    assert ref() is None


def test_a_callback_dropped_by_a_thread_exit_is_released():
    # A thread caches the sink list holding cb; cb is detached while the
    # thread lives, so the thread's exit destructor, which runs without the
    # GIL (after Python deleted the thread state), drops the last reference.
    m = kmm.Machine(memory="64M", cpus=2)
    cb = Callback()
    ref = weakref.ref(cb)
    h = m.trace.attach("kmem:kmalloc", cb)
    emitted, detached = threading.Event(), threading.Event()

    def work() -> None:
        with m.on_cpu(1):
            for _ in range(10):
                m.kfree(m.kmalloc(32))
        emitted.set()
        detached.wait()

    t = threading.Thread(target=work)
    t.start()
    emitted.wait()
    assert cb.calls == 10
    del cb
    h.detach()
    gc.collect()
    assert ref() is not None  # the thread's cached list still holds it
    detached.set()
    t.join()
    settle(m)
    assert ref() is None


def test_callbacks_held_by_threads_at_interpreter_exit_do_not_crash():
    # Thread-exit destructors of the main thread run during or after
    # finalization, and a finished thread's after its thread state is gone:
    # the references they drop are left alone, never released without the
    # GIL.
    code = """
import threading, kmm
m = kmm.Machine(memory="64M", cpus=2)
h = m.trace.attach("kmem:kmalloc", lambda e: None)
m.kfree(m.kmalloc(64))
gate = threading.Event()
def work():
    with m.on_cpu(1):
        m.kfree(m.kmalloc(64))
    gate.wait()
t = threading.Thread(target=work)
t.start()
h.detach()
m.trace.attach("kmem:kfree", lambda e: None)
gate.set()
t.join()
print("ok")
"""
    for _ in range(5):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "ok\n"


def test_a_callback_dropped_inside_a_bulk_call_is_released():
    # A bulk call runs without the GIL; another thread detaches the callback
    # while bulk calls keep emitting, so the last reference to the sink list
    # can go in the detached call.
    m = kmm.Machine(memory="256M", cpus=2)
    c = m.kmem_cache_create("released_bulk", 64)
    refs = []
    stop = threading.Event()

    def bulk() -> None:
        with m.on_cpu(1):
            while not stop.is_set():
                c.free_bulk(c.alloc_bulk(kmm.GFP_KERNEL, 256))

    t = threading.Thread(target=bulk)
    t.start()
    try:
        for _ in range(50):
            cb = Callback()
            refs.append(weakref.ref(cb))
            h = m.trace.attach("kmem:mm_page_alloc", cb)
            c.free_bulk(c.alloc_bulk(kmm.GFP_KERNEL, 256))
            h.detach()
            del cb
    finally:
        stop.set()
        t.join()
    m.kfree(m.kmalloc(64))
    settle(m)
    assert c.objects_in_use() == 0
    assert all(r() is None for r in refs)


def test_a_slab_constructor_is_released_with_its_machine():
    # A destroyed cache stays known to its machine (for its slabs' owner
    # lookups), so its constructor lives as long as the machine does. Here
    # the machine's last reference goes in another thread.
    seen = []

    class Ctor:
        def __call__(self, block) -> None:
            seen.append(block.addr)

    ctor = Ctor()
    ref = weakref.ref(ctor)
    box = [kmm.Machine(memory="64M", cpus=2)]
    c = box[0].kmem_cache_create("released_ctor", 96, ctor=ctor)
    c.free(c.alloc())
    assert len(seen) == c.objs_per_slab  # once per object of the new slab
    c.destroy()
    del ctor, c

    def drop_it() -> None:
        box.pop()
        gc.collect()

    t = threading.Thread(target=drop_it)
    t.start()
    t.join()
    kmm.Machine(memory="16M", cpus=1)  # a release point
    assert ref() is None


def test_a_callback_released_into_code_that_calls_kmm_does_not_deadlock():
    # Releasing a callback can run its __del__, which may attach or detach
    # callbacks itself: kmm drops sink lists outside its registry lock and
    # outside allocator locks. (This deadlocked on the registry lock.) In a
    # subprocess, so that a regression fails by timeout instead of hanging.
    code = """
import gc, threading, kmm
m = kmm.Machine(memory="64M", cpus=2)

class CB:
    def __init__(self, n):
        self.n = n
    def __call__(self, e):
        pass
    def __del__(self):
        h = m.trace.attach("kmem:kfree", CB(self.n + 1) if self.n < 3 else (lambda e: None))
        m.kfree(m.kmalloc(8))
        h.detach()

for i in range(5):
    h = m.trace.attach("kmem:kmalloc", CB(0))
    ev = threading.Event()
    def work():
        m.kfree(m.kmalloc(32))
        ev.wait()
    t = threading.Thread(target=work)
    t.start()
    m.kfree(m.kmalloc(64))
    h.detach()
    del h
    ev.set()
    t.join()
    m.kfree(m.kmalloc(16))
    gc.collect()
m.check()
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ok\n"


def test_daemon_threads_in_kmm_callbacks_at_interpreter_exit_do_not_abort():
    # CPython ends a daemon thread that wants the GIL after finalization has
    # begun with pthread_exit; inside a Python callback that kmm called (a
    # trace callback, a ctor) that aborted the process ("FATAL: exception
    # not rethrown", 12 runs in 20). kmm's atexit handler now stops calling
    # Python callbacks and waits for the running ones. Ten runs: before the
    # fix, all ten passing had odds of about 1 in 10,000.
    code = """
import threading, time, kmm
m = kmm.Machine(memory="64M", cpus=2)
m.trace.attach("kmem:kfree", lambda e: None)
c = m.kmem_cache_create("t_exit_ctor", 512, ctor=lambda b: None)
def callbacks():
    with m.on_cpu(1):
        while True:
            m.kfree(m.kmalloc(64))
def ctors():
    with m.on_cpu(0):
        while True:
            c.free_bulk(c.alloc_bulk(kmm.GFP_KERNEL, 64))
            c.shrink()
threading.Thread(target=callbacks, daemon=True).start()
threading.Thread(target=ctors, daemon=True).start()
time.sleep(0.05)
print("ok")
"""
    for _ in range(10):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout == "ok\n"
