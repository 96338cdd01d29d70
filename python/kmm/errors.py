"""kmm's exception tree. Every error kmm raises derives from :class:`KmmError`.

Messages quote the kernel's wording where it has one ("page allocation
failure: order:10, mode:0xcc0(GFP_KERNEL)", "double free or corruption").
A call that raises has changed nothing: the machine's accounting is exactly
what it was before the call.
"""

from __future__ import annotations

__all__ = [
    "KmmError",
    "OutOfMemoryError",
    "InvalidFreeError",
    "DoubleFreeError",
    "UseAfterFreeError",
    "SleepInAtomicError",
    "BadGfpError",
    "PageFaultError",
    "MemoryCorruptionError",
    "KasanError",
    "KasanUseAfterFreeError",
    "KasanDoubleFreeError",
    "KasanInvalidFreeError",
    "KasanIndexError",
    "TraceFormatError",
]


class KmmError(Exception):
    """Base class of every kmm error."""

    code = "kmm"


class OutOfMemoryError(KmmError, MemoryError):
    """An allocation could not be satisfied (the kernel's ``warn_alloc`` text)."""

    code = "out_of_memory"


class InvalidFreeError(KmmError, ValueError):
    """Freeing something that is not the start of a live allocation, or with the wrong order/cache."""

    code = "invalid_free"


class DoubleFreeError(KmmError, ValueError):
    """Freeing memory that is already free ("double free or corruption")."""

    code = "double_free"


class UseAfterFreeError(KmmError):
    """Using a Block after its memory was freed."""

    code = "use_after_free"


class SleepInAtomicError(KmmError):
    """A call that may sleep made in atomic context ("BUG: sleeping function called from invalid context")."""

    code = "sleep_in_atomic"


class BadGfpError(KmmError, ValueError):
    """An invalid gfp mask: an impossible zone combination or an unknown flag name."""

    code = "bad_gfp"


class PageFaultError(KmmError):
    """An access to an address that has no mapping ("BUG: unable to handle page fault")."""

    code = "page_fault"


class MemoryCorruptionError(KmmError):
    """Redzone, poison or freelist corruption detected."""

    code = "memory_corruption"


class KasanError(MemoryCorruptionError):
    """A KASAN report (``kasan=on``): an access to poisoned memory, refused.

    ``str(e)`` is the kernel's report ("BUG: KASAN: slab-out-of-bounds in
    CALLER", "Write of size 1 at addr ... by task ...", the object and its
    cache, where the address lies, the allocation and free stacks, the
    shadow around it); nothing was read, written or freed.
    """

    code = "kasan"

    @property
    def bug_type(self) -> str:
        """The report's bug type ("slab-out-of-bounds", "slab-use-after-free", ...)."""
        for line in str(self).splitlines():
            if line.startswith("BUG: KASAN: "):
                return line[len("BUG: KASAN: ") :].split(" in ", 1)[0]
        return ""


class KasanUseAfterFreeError(KasanError, UseAfterFreeError):
    """A KASAN report of an access to freed memory (a freed object or page,
    or a Block whose memory was freed)."""


class KasanDoubleFreeError(KasanError, DoubleFreeError):
    """KASAN's "double-free" report: the object was already freed."""


class KasanInvalidFreeError(KasanError, InvalidFreeError):
    """KASAN's "invalid-free" report: the pointer is not an object's start."""


class KasanIndexError(KasanError, IndexError):
    """A KASAN report from Block indexing or slicing outside the Block."""


class TraceFormatError(KmmError, ValueError):
    """A trace file kmm cannot read: ``line`` is the 1-based number of a
    malformed text line (0 if none), ``offset`` the byte offset in a
    perf.data where reading failed (None if none)."""

    code = "trace_format"
    line: int = 0
    offset: int | None = None
