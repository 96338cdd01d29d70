//! Blocks (real, writable memory with the buffer protocol) and kmem caches.
//!
//! This file holds the binding's one `unsafe` region: filling a `Py_buffer`
//! with a host pointer into the machine's memory. It is sound because:
//! - the pointer comes from `PhysMem::direct_ptr` for exactly the object's
//!   bytes, and the mapping lives as long as the `Arc<Machine>` the Block holds;
//! - while an export is alive the object is pinned (`pins.rs`: counted per
//!   object, whichever Block exported it), and every free path refuses a
//!   pinned object (BufferError), so the bytes cannot be handed to anyone
//!   else under the memoryview;
//! - a vmalloc Block's pointer is the area's `HostMap` (owned by the area,
//!   which the Block holds by `Arc`), and vfree refuses a pinned area; a
//!   highmem kmap_local Block's is its own one-page `HostMap`, and
//!   kunmap_local through the Block is refused while it is exported;
//! - the pages under a kmap_local or vmap Block are the caller's plain
//!   allocations (an export over pages the allocator frees itself, slab or
//!   vmalloc pages, is refused), pinned while exported (kmap_local) or
//!   mapped (vmap), so `free_pages` refuses them.
//!
//! Every Block knows its machine; a Block passed to another machine's
//! method is refused.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use kmm_core::kmalloc::ZERO_SIZE_PTR;
use kmm_core::pins::PinKind;
use kmm_core::physmem::HostMap;
use kmm_core::slab::KmemCache;
use kmm_core::vm::vmalloc::VmArea;
use kmm_core::trace::{CallSite, EventId};
use kmm_core::{KmmError, Machine, VirtAddr};
use pyo3::exceptions::{PyBufferError, PyIndexError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PySlice};
use pyo3::{ffi, IntoPyObjectExt};

use crate::errors::{warn_alloc, UseAfterFreeError};
use crate::to_py_err;

/// Events whose call site is worth computing from the Python stack.
const SLAB_EVENTS: u64 = 1 << (EventId::Kmalloc as u8)
    | 1 << (EventId::Kfree as u8)
    | 1 << (EventId::KmemCacheAlloc as u8)
    | 1 << (EventId::KmemCacheFree as u8);

fn no_call_site() -> &'static CallSite {
    static CS: OnceLock<CallSite> = OnceLock::new();
    CS.get_or_init(|| Arc::from("python"))
}

/// The Python caller as a `%pS`-like "function+0xline", computed only when a
/// slab tracepoint is on (otherwise a shared placeholder, no allocation).
pub(crate) fn call_site(py: Python<'_>, m: &Machine) -> CallSiteRef {
    if !m.trace.any(SLAB_EVENTS) {
        return CallSiteRef::Static;
    }
    CallSiteRef::Owned(caller(py))
}

/// A call site, borrowed from a static when tracing is off.
pub(crate) enum CallSiteRef {
    Static,
    Owned(CallSite),
}

impl std::ops::Deref for CallSiteRef {
    type Target = CallSite;
    fn deref(&self) -> &CallSite {
        match self {
            CallSiteRef::Static => no_call_site(),
            CallSiteRef::Owned(c) => c,
        }
    }
}

pub(crate) fn caller(py: Python<'_>) -> CallSite {
    let r = (|| -> PyResult<String> {
        let f = py.import("sys")?.getattr("_getframe")?.call1((0,))?;
        let code = f.getattr("f_code")?;
        let name: String = code.getattr("co_qualname").or_else(|_| code.getattr("co_name"))?.extract()?;
        let line: u32 = f.getattr("f_lineno")?.extract()?;
        Ok(format!("{name}+{line:#x}"))
    })();
    Arc::from(r.unwrap_or_else(|_| "python".into()).as_str())
}

/// What a Block is a view of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// kmalloc / cache object (or a large kmalloc).
    Object,
    /// ZERO_SIZE_PTR from kmalloc(0).
    Zero,
    /// An object handed to a ctor: valid for the length of the ctor call.
    Ctor,
    /// One CPU's copy of a per-CPU allocation.
    Percpu,
    /// A vmalloc or vmap area.
    Vmalloc,
    /// A kmap_local_page mapping.
    Kmap,
}

/// A live allocation: real bytes of the simulated machine.
#[pyclass(frozen, name = "Block", module = "kmm._kmm")]
pub struct PyBlock {
    pub(crate) m: Arc<Machine>,
    pub(crate) addr: u64,
    pub(crate) len: usize,
    gen: u16,
    kind: Kind,
    freed: AtomicBool,
    exports: AtomicUsize,
    /// For per-CPU copies: the `__percpu` pointer and its generation; for a
    /// kmap_local Block: the mapped page's pfn and the mapping's generation.
    pcpu: (u64, u64),
    /// For vmalloc/vmap Blocks: the area.
    area: Option<Arc<VmArea>>,
    /// For kmap_local Blocks of highmem pages: the host alias made on export.
    host: OnceLock<HostMap>,
}

impl PyBlock {
    pub(crate) fn new(m: &Arc<Machine>, addr: u64, len: usize) -> PyBlock {
        if addr == ZERO_SIZE_PTR {
            return PyBlock {
                m: m.clone(),
                addr,
                len: 0,
                gen: 0,
                kind: Kind::Zero,
                freed: AtomicBool::new(false),
                exports: AtomicUsize::new(0),
                pcpu: (0, 0),
                area: None,
                host: OnceLock::new(),
            };
        }
        let gen = m.shadow.get(addr - m.cfg.arch.page_offset()) >> 2;
        PyBlock {
            m: m.clone(),
            addr,
            len,
            gen,
            kind: Kind::Object,
            freed: AtomicBool::new(false),
            exports: AtomicUsize::new(0),
            pcpu: (0, 0),
            area: None,
            host: OnceLock::new(),
        }
    }

    /// A Block over CPU `cpu`'s copy of per-CPU allocation `ptr`.
    pub(crate) fn for_percpu(m: &Arc<Machine>, ptr: u64, cpu: u32) -> PyResult<PyBlock> {
        let (va, size, gen) = m.per_cpu_ptr(ptr, cpu).map_err(to_py_err)?;
        Ok(PyBlock {
            m: m.clone(),
            addr: va.0,
            len: size as usize,
            gen: 0,
            kind: Kind::Percpu,
            freed: AtomicBool::new(false),
            exports: AtomicUsize::new(0),
            pcpu: (ptr, gen),
            area: None,
            host: OnceLock::new(),
        })
    }

    /// A Block for a ctor call (the object is not allocated yet).
    pub(crate) fn for_ctor(m: &Arc<Machine>, addr: u64, len: usize) -> PyBlock {
        PyBlock {
            m: m.clone(),
            addr,
            len,
            gen: 0,
            kind: Kind::Ctor,
            freed: AtomicBool::new(false),
            exports: AtomicUsize::new(0),
            pcpu: (0, 0),
            area: None,
            host: OnceLock::new(),
        }
    }

    /// A Block over a vmalloc or vmap area's usable bytes.
    pub(crate) fn for_area(m: &Arc<Machine>, a: Arc<VmArea>, len: usize) -> PyBlock {
        PyBlock {
            m: m.clone(),
            addr: a.addr,
            len,
            gen: 0,
            kind: Kind::Vmalloc,
            freed: AtomicBool::new(false),
            exports: AtomicUsize::new(0),
            pcpu: (0, 0),
            area: Some(a),
            host: OnceLock::new(),
        }
    }

    /// A Block over a kmap_local mapping of one page (a context manager
    /// that unmaps it on exit).
    pub(crate) fn for_kmap(m: &Arc<Machine>, addr: u64, pfn: u64) -> PyBlock {
        let gen = m.kmap_local_gen(addr).unwrap_or(0);
        PyBlock {
            m: m.clone(),
            addr,
            len: m.page_size as usize,
            gen: 0,
            kind: Kind::Kmap,
            freed: AtomicBool::new(false),
            exports: AtomicUsize::new(0),
            pcpu: (pfn, gen),
            area: None,
            host: OnceLock::new(),
        }
    }

    /// kunmap_local through this Block (refused while exported).
    pub(crate) fn kunmap(&self) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        if self.kind != Kind::Kmap {
            return Err(PyTypeError::new_err("only a kmap_local_page Block is unmapped with kunmap_local"));
        }
        if self.freed.load(Relaxed) {
            return Err(to_py_err(KmmError::Bug(format!(
                "WARNING: kunmap_local({:#x}): this mapping was already unmapped",
                self.addr
            ))));
        }
        if self.exports.load(Relaxed) > 0 {
            return Err(PyBufferError::new_err(format!(
                "cannot kunmap_local {:#x}: a buffer export (memoryview) of it is alive",
                self.addr
            )));
        }
        self.m.kunmap_local(VirtAddr(self.addr)).map_err(to_py_err)?;
        self.freed.store(true, Relaxed);
        Ok(())
    }

    /// This Block, if it belongs to `m` (a Block of another machine names
    /// memory of that machine: freeing it here would free whatever lies
    /// at the same address in this one).
    pub(crate) fn owned_by(&self, m: &Arc<Machine>) -> PyResult<&Self> {
        if Arc::ptr_eq(&self.m, m) {
            Ok(self)
        } else {
            Err(PyValueError::new_err(format!("Block {:#x} belongs to another Machine", self.addr)))
        }
    }

    /// Is this a Block over a slab object or large kmalloc (or kmalloc(0))?
    pub(crate) fn is_kmalloc(&self) -> bool {
        matches!(self.kind, Kind::Object | Kind::Zero)
    }

    /// End of the ctor call: the Block stops being usable.
    pub(crate) fn expire(&self) {
        self.freed.store(true, Relaxed);
    }

    fn phys(&self) -> u64 {
        self.addr - self.m.cfg.arch.page_offset()
    }

    /// Is the memory still this Block's allocation?
    pub(crate) fn alive(&self) -> bool {
        if self.freed.load(Relaxed) {
            return false;
        }
        match self.kind {
            Kind::Zero | Kind::Ctor => true,
            Kind::Kmap => self.m.kmap_local_live(self.addr, self.pcpu.1),
            Kind::Vmalloc => self.area.as_ref().is_some_and(|a| !a.freed.load(Relaxed)),
            Kind::Object => self.m.shadow.is_live_gen(self.phys(), self.gen),
            Kind::Percpu => self.m.percpu_live(self.pcpu.0, self.pcpu.1),
        }
    }

    pub(crate) fn check_alive(&self) -> PyResult<()> {
        if self.alive() {
            Ok(())
        } else {
            Err(UseAfterFreeError::new_err(format!(
                "BUG: KASAN: use-after-free on Block {:#x} ({} bytes): its memory was freed",
                self.addr, self.len
            )))
        }
    }

    /// With `kasan=on`: KASAN's check of an access of `n` bytes at offset
    /// `off` from the Block (which may lie outside it), made before
    /// anything else; `index`: from indexing or slicing (the report is then
    /// also an IndexError). On a Block whose memory was freed, the report
    /// is a use after free.
    pub(crate) fn kasan_guard(&self, off: i64, n: usize, write: bool, index: bool) -> PyResult<()> {
        if !self.m.kasan_on() || n == 0 {
            return Ok(());
        }
        let va = self.addr.wrapping_add_signed(off);
        self.m.kasan_check(va, n as u64, write).map_err(|e| crate::errors::kasan_block_err(e, !self.alive(), index))
    }

    /// The access indexing or slicing asks for, before Python clamps a
    /// slice to the Block: (offset, length). None when it is no plain
    /// access (a step, or bounds beyond 64 bits): `range` decides.
    fn raw_access(&self, idx: &Bound<'_, PyAny>) -> PyResult<Option<(i64, usize)>> {
        let len = self.len as i64;
        if let Ok(s) = idx.cast::<PySlice>() {
            let step = s.getattr("step")?;
            if !step.is_none() && step.extract::<i64>().ok() != Some(1) {
                return Ok(None);
            }
            let bound = |v: Bound<'_, PyAny>, dflt: i64| -> Option<i64> {
                if v.is_none() {
                    return Some(dflt);
                }
                let x: i64 = v.extract().ok()?;
                Some(if x < 0 { x.saturating_add(len).max(0) } else { x })
            };
            let (Some(a), Some(b)) = (bound(s.getattr("start")?, 0), bound(s.getattr("stop")?, len)) else {
                return Ok(None);
            };
            return Ok(Some((a, b.saturating_sub(a).max(0) as usize)));
        }
        match idx.extract::<i64>() {
            Ok(i) => Ok(Some((if i < 0 { i.saturating_add(len) } else { i }, 1))),
            Err(_) => Ok(None),
        }
    }

    /// `kasan_guard` for an index or a slice.
    fn kasan_guard_index(&self, idx: &Bound<'_, PyAny>, write: bool) -> PyResult<()> {
        if self.m.kasan_on() {
            if let Some((off, n)) = self.raw_access(idx)? {
                self.kasan_guard(off, n, write, true)?;
            }
        }
        Ok(())
    }

    /// Free through this Block (kfree or kmem_cache_free).
    pub(crate) fn free_with(&self, f: impl FnOnce(u64) -> kmm_core::Result<()>) -> PyResult<()> {
        if self.kind == Kind::Ctor {
            return Err(crate::errors::InvalidFreeError::new_err(
                "a ctor's Block is not an allocation: it cannot be freed",
            ));
        }
        if self.kind == Kind::Percpu {
            return Err(crate::errors::InvalidFreeError::new_err(
                "a per-CPU copy is freed with free_percpu(ptr), not kfree",
            ));
        }
        if self.kind == Kind::Kmap {
            return Err(crate::errors::InvalidFreeError::new_err(
                "a kmap_local mapping is undone with kunmap_local, not freed",
            ));
        }
        if self.kind == Kind::Zero {
            self.freed.store(true, Relaxed);
            return f(self.addr).map_err(to_py_err);
        }
        if !self.alive() && self.kind == Kind::Vmalloc {
            return Err(crate::errors::DoubleFreeError::new_err(format!(
                "double free or corruption: WARNING at mm/vmalloc.c vfree: Trying to vfree() nonexistent vm area ({:#x}): \
                 this Block's area was freed already",
                self.addr
            )));
        }
        if !self.alive() {
            // Free memory: a double free. Reallocated memory: the stale
            // handle is a use after free (the new owner is left alone).
            if !self.m.shadow.is_live(self.phys()) {
                if self.m.kasan_on() && self.kind == Kind::Object {
                    // KASAN reports the double free (the free is refused:
                    // the object is not live, so nothing can be freed).
                    f(self.addr).map_err(to_py_err)?;
                }
                return Err(crate::errors::DoubleFreeError::new_err(format!(
                    "double free or corruption: Block {:#x} was already freed",
                    self.addr
                )));
            }
            return Err(UseAfterFreeError::new_err(format!(
                "BUG: KASAN: use-after-free: Block {:#x} was freed and its memory belongs to another allocation now",
                self.addr
            )));
        }
        if self.exports.load(Relaxed) > 0 {
            return Err(PyBufferError::new_err(format!(
                "cannot free Block {:#x}: {} buffer export(s) (memoryview) still alive",
                self.addr,
                self.exports.load(Relaxed)
            )));
        }
        f(self.addr).map_err(to_py_err)?;
        self.freed.store(true, Relaxed);
        Ok(())
    }

    fn range(&self, idx: &Bound<'_, PyAny>) -> PyResult<(usize, usize, bool)> {
        if let Ok(s) = idx.cast::<PySlice>() {
            let i = s.indices(self.len as isize)?;
            if i.step != 1 {
                return Err(PyValueError::new_err("Block slices must have step 1"));
            }
            let (a, b) = (i.start as usize, (i.start + i.slicelength as isize) as usize);
            return Ok((a, b.max(a), true));
        }
        // An int too large for isize is out of range too (bytearray's
        // IndexError), not a bare OverflowError.
        let mut i: isize = match idx.extract() {
            Ok(i) => i,
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(idx.py()) => {
                return Err(PyIndexError::new_err("Block index out of range"))
            }
            Err(e) => return Err(e),
        };
        if i < 0 {
            i += self.len as isize;
        }
        if i < 0 || i as usize >= self.len {
            return Err(PyIndexError::new_err("Block index out of range"));
        }
        Ok((i as usize, i as usize + 1, false))
    }
}

#[pymethods]
impl PyBlock {
    /// The simulated kernel virtual address.
    #[getter]
    fn addr(&self) -> u64 {
        self.addr
    }
    /// False once the memory was freed.
    #[getter]
    fn alive_(&self) -> bool {
        self.alive()
    }
    fn __len__(&self) -> PyResult<usize> {
        self.check_alive()?;
        Ok(self.len)
    }
    fn __int__(&self) -> u64 {
        self.addr
    }
    fn __index__(&self) -> u64 {
        self.addr
    }
    fn __bytes__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        self.kasan_guard(0, self.len, false, false)?;
        self.check_alive()?;
        crate::machine::read_bytes(py, &self.m, self.addr, self.len)
    }
    fn __getitem__<'py>(&self, py: Python<'py>, idx: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        self.kasan_guard_index(idx, false)?;
        self.check_alive()?;
        let (a, b, slice) = self.range(idx)?;
        if slice {
            return Ok(crate::machine::read_bytes(py, &self.m, self.addr + a as u64, b - a)?.into_any());
        }
        let v = self.m.read(VirtAddr(self.addr + a as u64), 1).map_err(to_py_err)?;
        v[0].into_bound_py_any(py)
    }
    fn __setitem__(&self, idx: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.kasan_guard_index(idx, true)?;
        self.check_alive()?;
        let (a, b, slice) = self.range(idx)?;
        if slice {
            let data: Vec<u8> = if let Ok(bytes) = value.cast::<PyBytes>() {
                bytes.as_bytes().to_vec()
            } else {
                value.extract::<Vec<u8>>().map_err(|_| PyTypeError::new_err("a bytes-like value is required"))?
            };
            if data.len() != b - a {
                return Err(PyValueError::new_err(format!(
                    "Block slice assignment cannot change the size ({} bytes into {})",
                    data.len(),
                    b - a
                )));
            }
            self.m.write(VirtAddr(self.addr + a as u64), &data).map_err(to_py_err)
        } else {
            // As bytearray: a byte value outside 0..=255 is a ValueError that says so.
            let v: u8 = match value.extract::<i64>() {
                Ok(v) => u8::try_from(v).map_err(|_| PyValueError::new_err(format!("byte must be in range(0, 256), not {v}")))?,
                Err(e) if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(value.py()) => {
                    return Err(PyValueError::new_err("byte must be in range(0, 256)"))
                }
                Err(e) => return Err(e),
            };
            self.m.write(VirtAddr(self.addr + a as u64), &[v]).map_err(to_py_err)
        }
    }
    /// Read `n` bytes at `offset` (bounds-checked).
    #[pyo3(signature = (offset=0, n=None))]
    fn read<'py>(&self, py: Python<'py>, offset: i128, n: Option<i128>) -> PyResult<Bound<'py, PyBytes>> {
        let offset = crate::args::usize_arg(offset, "Block.read", "offset")?;
        let n = n.map(|n| crate::args::usize_arg(n, "Block.read", "n")).transpose()?;
        let n = n.unwrap_or(self.len.saturating_sub(offset));
        self.kasan_guard(offset.min(i64::MAX as usize) as i64, n, false, true)?;
        self.check_alive()?;
        if offset.checked_add(n).is_none_or(|e| e > self.len) {
            return Err(PyIndexError::new_err("read beyond the Block"));
        }
        crate::machine::read_bytes(py, &self.m, self.addr + offset as u64, n)
    }
    /// Write bytes at `offset` (bounds-checked).
    #[pyo3(signature = (data, offset=0))]
    fn write(&self, data: &[u8], offset: i128) -> PyResult<()> {
        let offset = crate::args::usize_arg(offset, "Block.write", "offset")?;
        self.kasan_guard(offset.min(i64::MAX as usize) as i64, data.len(), true, true)?;
        self.check_alive()?;
        if offset.checked_add(data.len()).is_none_or(|e| e > self.len) {
            return Err(PyIndexError::new_err("write beyond the Block"));
        }
        self.m.write(VirtAddr(self.addr + offset as u64), data).map_err(to_py_err)
    }
    fn __repr__(&self) -> String {
        format!(
            "<Block addr={:#x} len={}{}>",
            self.addr,
            self.len,
            if self.alive() { "" } else { " freed" }
        )
    }

    /// A kmap_local_page Block is a context manager: the mapping is undone
    /// (kunmap_local) when the block exits.
    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        if slf.get().kind != Kind::Kmap {
            return Err(PyTypeError::new_err("only a kmap_local_page Block is a context manager"));
        }
        Ok(slf)
    }
    fn __exit__(&self, _a: Py<PyAny>, _b: Py<PyAny>, _c: Py<PyAny>) -> PyResult<bool> {
        self.kunmap()?;
        Ok(false)
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("View is null"));
        }
        let b = slf.get();
        // KASAN checks the exported range as one access.
        b.kasan_guard(0, b.len, flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE, false)?;
        b.check_alive()?;
        if b.kind == Kind::Ctor {
            return Err(PyBufferError::new_err("a ctor's Block cannot be exported (it is valid only during the ctor call)"));
        }
        // Pages the allocator frees by itself (slab, vmalloc, page-table
        // pages) cannot be exported through a mapping of them.
        let not_plain = |pfn: u64| {
            PyBufferError::new_err(format!(
                "cannot export {:#x}: pfn {pfn:#x} under it is not a plain page allocation (a slab, vmalloc, \
                 page-table or free page may be freed under the buffer); read and write through the Block",
                b.addr
            ))
        };
        if b.kind == Kind::Kmap && b.m.plain_alloc_head(b.pcpu.0).is_none() {
            return Err(not_plain(b.pcpu.0));
        }
        if let (Kind::Vmalloc, Some(a)) = (b.kind, b.area.as_ref()) {
            if a.flags & kmm_core::vm::vmalloc::VM_MAP != 0 {
                if let Some(p) = a.pages.iter().find(|p| b.m.plain_alloc_head(p.0).is_none()) {
                    return Err(not_plain(p.0));
                }
            }
        }
        // A vmalloc area is pinned per export, checked under the area lock
        // (a concurrent vfree either sees the pin or wins and this fails).
        if let (Kind::Vmalloc, Some(a)) = (b.kind, b.area.as_ref()) {
            b.m.pin_area(a).map_err(|_| UseAfterFreeError::new_err(format!(
                "BUG: KASAN: use-after-free on Block {:#x}: its vmalloc area was freed",
                b.addr
            )))?;
        }
        if b.kind == Kind::Kmap {
            if !b.m.kmap_local_pin(b.addr, b.pcpu.1, 1) {
                return Err(UseAfterFreeError::new_err(format!("the kmap_local mapping at {:#x} was undone", b.addr)));
            }
            b.m.pin_pages([b.pcpu.0], PinKind::Export);
        }
        let unpin = || {
            if let (Kind::Vmalloc, Some(a)) = (b.kind, b.area.as_ref()) {
                b.m.unpin_area(a);
            }
            if b.kind == Kind::Kmap {
                b.m.kmap_local_pin(b.addr, b.pcpu.1, -1);
                b.m.unpin_pages([b.pcpu.0], PinKind::Export);
            }
        };
        static EMPTY: [u8; 1] = [0];
        let ptr = if b.len == 0 {
            EMPTY.as_ptr() as *mut u8
        } else {
            match b.kind {
                Kind::Vmalloc => {
                    let a = b.area.as_ref().expect("a vmalloc Block has its area");
                    match a.host(&b.m) {
                        Ok(h) => h.ptr().as_ptr(),
                        Err(e) => {
                            unpin();
                            return Err(to_py_err(e));
                        }
                    }
                }
                Kind::Kmap if b.m.virt_to_phys(VirtAddr(b.addr)).is_err() => {
                    // A highmem page in a fixmap slot: alias its frame in the host.
                    if b.host.get().is_none() {
                        match b.m.phys.map_pages(&[b.pcpu.0 << b.m.page_shift], b.m.page_size) {
                            Ok(h) => {
                                let _ = b.host.set(h);
                            }
                            Err(e) => {
                                unpin();
                                return Err(to_py_err(e));
                            }
                        }
                    }
                    b.host.get().expect("set above").ptr().as_ptr()
                }
                _ => {
                    let host = b
                        .m
                        .virt_to_phys(VirtAddr(b.addr))
                        .ok()
                        .and_then(|p| b.m.phys.direct_ptr(p.0, b.len));
                    match host {
                        Some(h) => h.as_ptr(),
                        None => {
                            unpin();
                            return Err(PyBufferError::new_err("the Block has no host mapping"));
                        }
                    }
                }
            }
        };
        let len = b.len as isize;
        let readonly = if b.len == 0 { 1 } else { 0 };
        if readonly == 1 && flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            unpin();
            return Err(PyBufferError::new_err("an empty Block is not writable"));
        }
        if b.exports.fetch_add(1, Relaxed) == 0 {
            match b.kind {
                Kind::Object => b.m.pin_object(b.phys()),
                Kind::Percpu => b.m.percpu_pin(b.pcpu.0, true),
                _ => {}
            }
        }
        static FORMAT: &[u8; 2] = b"B\0";
        // SAFETY: `view` is non-null (checked) and points to a Py_buffer the
        // caller owns; `ptr` covers exactly the Block's bytes inside the live
        // mapping (see the module header for why they stay valid), or a
        // static byte for an empty Block; `obj` takes a new reference to the
        // Block, which keeps the Machine (and its mapping) alive.
        unsafe {
            (*view).obj = slf.into_any().into_ptr();
            (*view).buf = ptr as *mut c_void;
            (*view).len = len;
            (*view).readonly = readonly;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                FORMAT.as_ptr() as *mut std::ffi::c_char
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND { &mut (*view).len } else { std::ptr::null_mut() };
            (*view).strides =
                if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES { &mut (*view).itemsize } else { std::ptr::null_mut() };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        if let (Kind::Vmalloc, Some(a)) = (self.kind, self.area.as_ref()) {
            self.m.unpin_area(a); // one pin per export
        }
        if self.kind == Kind::Kmap {
            self.m.kmap_local_pin(self.addr, self.pcpu.1, -1);
            self.m.unpin_pages([self.pcpu.0], PinKind::Export);
        }
        if self.exports.fetch_sub(1, Relaxed) == 1 {
            match self.kind {
                Kind::Object => self.m.unpin_object(self.phys()),
                Kind::Percpu => self.m.percpu_pin(self.pcpu.0, false),
                _ => {}
            }
        }
    }
}

/// A `struct kmem_cache`.
#[pyclass(frozen, name = "KmemCache", module = "kmm._kmm")]
pub struct PyKmemCache {
    pub(crate) m: Arc<Machine>,
    pub(crate) c: Arc<KmemCache>,
    /// The name asked for when this handle came from a merge.
    alias: Option<String>,
    ctor: Option<Py<PyAny>>,
    /// This handle was destroyed (an alias handle's cache lives on).
    gone: AtomicBool,
}

impl PyKmemCache {
    pub(crate) fn new(m: &Arc<Machine>, c: Arc<KmemCache>, alias: Option<String>, ctor: Option<Py<PyAny>>) -> Self {
        PyKmemCache { m: m.clone(), c, alias, ctor, gone: AtomicBool::new(false) }
    }

    /// Refuse a call through a handle already given to kmem_cache_destroy.
    fn live(&self, what: &str) -> PyResult<()> {
        if self.gone.load(Relaxed) {
            let name = self.alias.as_deref().unwrap_or(&self.c.name);
            return Err(to_py_err(KmmError::UseAfterFree(format!("{what}: cache {name} was destroyed"))));
        }
        Ok(())
    }

    pub(crate) fn alloc_block(&self, py: Python<'_>, gfp: u32) -> PyResult<PyBlock> {
        self.live("kmem_cache_alloc")?;
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let cs = call_site(py, &self.m);
        match self.m.kmem_cache_alloc(&self.c, gfp, &cs) {
            Ok(a) => Ok(PyBlock::new(&self.m, a.0, self.object_size() as usize)),
            Err(e) => {
                warn_alloc(py, &e);
                Err(to_py_err(e))
            }
        }
    }

    pub(crate) fn free_obj(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        self.live("kmem_cache_free")?;
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let cs = call_site(py, &self.m);
        if let Ok(b) = obj.cast::<PyBlock>() {
            let b = b.get().owned_by(&self.m)?;
            return b.free_with(|a| self.m.kmem_cache_free(&self.c, VirtAddr(a), &cs));
        }
        let a: u64 = obj.extract().map_err(|_| PyTypeError::new_err("expected a Block or an address"))?;
        self.m.kmem_cache_free(&self.c, VirtAddr(a), &cs).map_err(to_py_err)
    }
}

/// Addresses from a Python sequence, array('Q'), numpy array or list of
/// Blocks (of machine `m`).
pub(crate) fn addresses(m: &Arc<Machine>, objs: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    if let Ok(buf) = pyo3::buffer::PyBuffer::<u64>::get(objs) {
        return buf.to_vec(objs.py());
    }
    let mut v = Vec::new();
    for o in objs.try_iter()? {
        let o = o?;
        if let Ok(b) = o.cast::<PyBlock>() {
            v.push(b.get().owned_by(m)?.addr);
        } else {
            v.push(crate::args::nat(&o, "kmem_cache_free_bulk", "address")?);
        }
    }
    Ok(v)
}

/// The bulk calls' result: `array('Q', bytes)`, one constructor call on the
/// cached type with the addresses' native bytes. This runs with the GIL held
/// between two detached halves of a bulk call, so it is kept short (issue 13:
/// looking up `array.array` and calling `frombytes` each time was ~0.4 us,
/// which two threads then queued for on the GIL).
pub(crate) fn to_array<'py>(py: Python<'py>, v: &[u64]) -> PyResult<Bound<'py, PyAny>> {
    static ARRAY: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    let ty = ARRAY.get_or_try_init(py, || py.import("array")?.getattr("array").map(Bound::unbind))?;
    let bytes = PyBytes::new_with(py, std::mem::size_of_val(v), |b| {
        for (d, x) in b.chunks_exact_mut(8).zip(v) {
            d.copy_from_slice(&x.to_ne_bytes());
        }
        Ok(())
    })?;
    ty.bind(py).call1(("Q", bytes))
}

#[pymethods]
impl PyKmemCache {
    /// The cache's name (for a merged cache, the existing cache's name, as in the kernel).
    #[getter]
    fn name(&self) -> String {
        self.c.name.clone()
    }
    /// The name this handle was created with, when it was merged into another cache.
    #[getter]
    fn alias(&self) -> Option<String> {
        self.alias.clone()
    }
    /// `object_size` (raised by merged requests, as `__kmem_cache_alias` does).
    #[getter]
    fn object_size(&self) -> u32 {
        self.c.object_size()
    }
    /// `slab_size`: the slot stride.
    #[getter]
    fn size(&self) -> u32 {
        self.c.geo.size
    }
    /// The object alignment (/sys/kernel/slab/<cache>/align).
    #[getter]
    fn align(&self) -> u32 {
        self.c.geo.align
    }
    /// Objects in one slab (objs_per_slab).
    #[getter]
    fn objs_per_slab(&self) -> u32 {
        self.c.geo.objects
    }
    /// The page order of a slab (/sys/kernel/slab/<cache>/order).
    #[getter]
    fn order(&self) -> u32 {
        self.c.geo.order
    }
    /// The cache's SLAB_* flags, slub_debug= ones included.
    #[getter]
    fn flags(&self) -> u32 {
        self.c.flags
    }
    /// Empty slabs kept on the node partial list (min_partial).
    #[getter]
    fn min_partial(&self) -> u64 {
        self.c.min_partial()
    }
    /// Free objects kept on per-CPU partial slabs at most (cpu_partial).
    #[getter]
    fn cpu_partial(&self) -> u32 {
        self.c.cpu_partial().0
    }
    /// The free pointer's offset inside the slot.
    #[getter]
    fn offset(&self) -> u32 {
        self.c.geo.offset
    }
    /// Usable bytes per object (`slab_ksize`).
    #[getter]
    fn ksize(&self) -> u32 {
        self.c.ksize()
    }
    /// The constructor the cache was created with, or None.
    #[getter]
    fn ctor(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.ctor.as_ref().map(|c| c.clone_ref(py))
    }
    /// Destroyed?
    #[getter]
    fn destroyed(&self) -> bool {
        self.gone.load(Relaxed) || self.c.dead.load(Relaxed)
    }
    /// `kmem_cache_alloc(cache, gfp)`: one object as a Block.
    #[pyo3(signature = (gfp=crate::args::Int(kmm_core::gfp::GFP_KERNEL as i128)))]
    fn alloc(&self, py: Python<'_>, gfp: crate::args::Int) -> PyResult<PyBlock> {
        let gfp = crate::args::u32_arg(gfp, "KmemCache.alloc", "gfp")?;
        self.alloc_block(py, gfp)
    }
    /// `kmem_cache_free(cache, obj)`: a Block or an address.
    fn free(&self, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        self.free_obj(py, obj)
    }
    /// `kmem_cache_alloc_bulk`: `n` objects (all or none) as an array('Q') of
    /// addresses. Releases the GIL.
    fn alloc_bulk<'py>(&self, py: Python<'py>, gfp: crate::args::Int, n: crate::args::Int) -> PyResult<Bound<'py, PyAny>> {
        self.live("kmem_cache_alloc_bulk")?;
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let gfp = crate::args::u32_arg(gfp, "KmemCache.alloc_bulk", "gfp")?;
        let n = crate::args::usize_arg(n, "KmemCache.alloc_bulk", "n")?;
        let (m, c) = (&self.m, &self.c); // borrowed: no shared refcount traffic
        let r = crate::gil::detach(py, move || {
            let mut v = Vec::new(); // sized by the core, which refuses absurd counts
            m.kmem_cache_alloc_bulk(c, gfp, n, &mut v).map(|_| v)
        });
        match r {
            Ok(v) => to_array(py, &v),
            Err(e) => {
                warn_alloc(py, &e);
                Err(to_py_err(e))
            }
        }
    }
    /// `kmem_cache_free_bulk`: addresses (array('Q'), numpy uint64, or a
    /// sequence of ints/Blocks). All are checked first; on error none is freed.
    /// Releases the GIL.
    fn free_bulk(&self, py: Python<'_>, objs: &Bound<'_, PyAny>) -> PyResult<()> {
        self.live("kmem_cache_free_bulk")?;
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let v = addresses(&self.m, objs)?;
        let (m, c) = (&self.m, &self.c); // borrowed: no shared refcount traffic
        crate::gil::detach(py, move || m.kmem_cache_free_bulk(c, &v)).map_err(to_py_err)
    }
    /// `kmem_cache_shrink`: give empty slabs back; returns pages freed.
    fn shrink(&self, py: Python<'_>) -> PyResult<u64> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        let (m, c) = (&self.m, &self.c); // borrowed: no shared refcount traffic
        crate::gil::detach(py, move || m.kmem_cache_shrink(c)).map_err(to_py_err)
    }
    /// `kmem_cache_destroy`. Refused (KmmError) while objects are allocated;
    /// the cache then stays usable.
    fn destroy(&self) -> PyResult<()> {
        let _d = self.m.trace.defer(); // Python trace callbacks run once the call is done
        self.live("kmem_cache_destroy")?;
        self.m.kmem_cache_destroy_alias(&self.c, self.alias.as_deref()).map_err(to_py_err)?;
        self.gone.store(true, Relaxed);
        Ok(())
    }
    /// Slabs by state, in the seed book's words: full, partial, empty
    /// (plus SLUB's own view: cpu, cpu_partial, node_partial).
    fn slabs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (cpu, cpu_partial, node_partial, _untracked) = self.c.slab_states();
        let (full, partial, empty) = self.c.seed_lists(&self.m);
        let d = PyDict::new(py);
        d.set_item("full", full)?;
        d.set_item("partial", partial)?;
        d.set_item("empty", empty)?;
        d.set_item("cpu", cpu)?;
        d.set_item("cpu_partial", cpu_partial)?;
        d.set_item("node_partial", node_partial)?;
        Ok(d)
    }
    /// Objects allocated and not freed.
    fn objects_in_use(&self) -> u64 {
        self.c.objects_in_use(&self.m)
    }
    /// SLUB statistics (CONFIG_SLUB_STATS names), summed over CPUs.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.c.stats();
        let d = PyDict::new(py);
        for (k, v) in [
            ("alloc_fastpath", s.alloc_fastpath),
            ("alloc_slowpath", s.alloc_slowpath),
            ("free_fastpath", s.free_fastpath),
            ("free_slowpath", s.free_slowpath),
            ("alloc_refill", s.alloc_refill),
            ("alloc_from_partial", s.alloc_from_partial),
            ("cpu_partial_alloc", s.cpu_partial_alloc),
            ("cpu_partial_free", s.cpu_partial_free),
            ("cpu_partial_node", s.cpu_partial_node),
            ("cpu_partial_drain", s.cpu_partial_drain),
            ("alloc_slab", s.alloc_slab),
            ("free_slab", s.free_slab),
            ("free_frozen", s.free_frozen),
            ("free_remote", s.free_remote),
            ("deactivate_full", s.deactivate_full),
            ("deactivate_empty", s.deactivate_empty),
            ("order_fallback", s.order_fallback),
        ] {
            d.set_item(k, v)?;
        }
        Ok(d)
    }
    /// Times each CPU's slab lock was found held (0 when threads keep to their CPUs).
    fn cpu_contention(&self) -> Vec<u64> {
        self.c.cpu_contention()
    }
    fn __repr__(&self) -> String {
        format!(
            "<KmemCache {} object_size={} size={} align={} objs_per_slab={} order={}>",
            self.c.name, self.c.geo.object_size, self.c.geo.size, self.c.geo.align, self.c.geo.objects, self.c.geo.order
        )
    }
}

/// Map a core error from an allocation, logging it like warn_alloc.
pub(crate) fn alloc_err(py: Python<'_>, e: KmmError) -> PyErr {
    warn_alloc(py, &e);
    to_py_err(e)
}
