//! I/O vectors and aligned buffers (POSIX `struct iovec`, `readv(2)`; the
//! alignment rules of `open(2)` `O_DIRECT`).
//!
//! [`IoVecs`] is the buffer list carried by an asynchronous request: an
//! owned `Vec<u8>`, `iovec`s that point into guest RAM and keep its mapping
//! alive ([`IoVecs::from_guest`]: the one place where pointers into guest
//! memory are made, so that devices need no `unsafe`), or raw `iovec`s
//! whose memory the caller promises stays valid until the request
//! completes ([`IoVecs::from_raw`]). The helper
//! functions gather/scatter between `IoSlice`s and flat buffers, which the
//! alignment (read-modify-write) and bounce-buffer paths use. [`AlignedBuf`]
//! is a zeroed heap buffer with a chosen alignment, as `O_DIRECT` requires.
//! [`IoVecs::carve`] splits a request's buffers into disjoint parts that
//! travel as separate requests (a format driver mapping one guest request
//! to several host extents) and keep the whole alive until the last part
//! is dropped.

use std::alloc::{self, Layout};
use std::any::Any;
use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// What keeps the memory of [`IoVecs::from_guest`] segments mapped: the
/// guest memory they point into.
pub type Owner = Arc<dyn Any + Send + Sync>;

/// The buffers of one request.
///
/// Kept small (the `iovec`s, one [`Keep`], the appended parts): a request
/// is moved by value several times on its way through the block layer,
/// and a value this size is copied inline rather than through `memcpy`.
pub struct IoVecs {
    iov: Vec<libc::iovec>,
    /// What keeps the memory of `iov` alive (only held, never read but
    /// by `into_vec` and `append`'s comparison).
    keep: Keep,
    /// Buffers joined by [`IoVecs::append`] whose memory the segments point
    /// into, kept alive (only held, never read).
    #[allow(dead_code)]
    parts: Vec<IoVecs>,
}

/// The memory an [`IoVecs`] points into, when it owns or holds it: at
/// most one of these per constructor.
#[allow(dead_code)]
enum Keep {
    /// Raw segments ([`IoVecs::from_raw`]) or none.
    Nothing,
    /// An owned buffer ([`IoVecs::from_vec`]).
    Owned(Vec<u8>),
    /// An owned aligned buffer, O_DIRECT-ready ([`IoVecs::from_aligned`];
    /// boxed, to keep the enum small: such buffers are large anyway).
    Aligned(Box<AlignedBuf>),
    /// For a part made by [`IoVecs::carve`]: the whole, kept alive.
    Whole(Arc<IoVecs>),
    /// The mapping the segments point into ([`IoVecs::from_guest`]).
    Guest(Owner),
}

// SAFETY: an `IoVecs` either owns its memory (`Keep::Owned`, `Keep::Aligned`, `parts`),
// points into guest RAM whose mapping it keeps alive (`Keep::Guest`, a
// `GuestMemoryMmap`, itself `Send + Sync`), was built with `from_raw`, whose
// contract makes the caller guarantee that the memory stays valid and is not
// accessed by anybody else until the request completes, or is a carved part
// of such an `IoVecs`, which it keeps alive (`Keep::Whole`) and whose bytes it
// shares with no other part; none of that memory is tied to a thread, so
// moving it to another thread is sound.
unsafe impl Send for IoVecs {}
// SAFETY: through `&IoVecs` memory can only be read (`slices`, `as_raw`,
// `len`); writing needs `&mut`. The one shared `IoVecs` is the whole behind
// carved parts, which is reachable only through the opaque [`Carved`] and
// the parts' private `Keep::Whole`, and is never read while parts exist.
unsafe impl Sync for IoVecs {}

/// The whole of a carved [`IoVecs`], waiting for its parts to be dropped.
pub struct Carved(Arc<IoVecs>);

impl Carved {
    /// The buffers back, once no part is left (`Err(self)` otherwise).
    pub fn into_inner(self) -> Result<IoVecs, Carved> {
        Arc::try_unwrap(self.0).map_err(Carved)
    }
}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IoVecs({} segments, {} bytes)",
            self.iov.len(),
            self.len()
        )
    }
}

impl IoVecs {
    /// No buffers (flush, discard, write-zeroes).
    pub fn empty() -> Self {
        IoVecs {
            iov: Vec::new(),
            keep: Keep::Nothing,
            parts: Vec::new(),
        }
    }
    /// One owned buffer; get it back with [`IoVecs::into_vec`].
    pub fn from_vec(mut buf: Vec<u8>) -> Self {
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        IoVecs {
            iov,
            keep: Keep::Owned(buf),
            parts: Vec::new(),
        }
    }
    /// One owned aligned buffer (its memory moves with it: the heap
    /// allocation does not).
    pub fn from_aligned(mut buf: AlignedBuf) -> Self {
        let iov = vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        IoVecs {
            iov,
            keep: Keep::Aligned(Box::new(buf)),
            parts: Vec::new(),
        }
    }
    /// Raw segments, typically guest memory.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads and writes of `len` bytes
    /// until the request carrying these vectors has completed (its completion
    /// callback ran), and nothing else may access that memory meanwhile.
    pub unsafe fn from_raw(segs: &[(*mut u8, usize)]) -> Self {
        IoVecs {
            iov: segs
                .iter()
                .map(|&(p, l)| libc::iovec {
                    iov_base: p.cast(),
                    iov_len: l,
                })
                .collect(),
            keep: Keep::Nothing,
            parts: Vec::new(),
        }
    }
    /// Segments of guest RAM, `(guest address, length)`, each inside one
    /// mapped region of `mem` (`None` if one is not: outside RAM, or
    /// straddling two regions). The vectors keep `mem` alive until they are
    /// dropped, so the pointers stay valid for as long as the request
    /// carrying them exists, wherever it travels. Empty segments are left
    /// out.
    ///
    /// The bitmap type is `()`: writes through these pointers bypass
    /// `vm-memory`'s dirty tracking, so memory that tracks dirty pages must
    /// not be handed out this way.
    pub fn from_guest(
        mem: &Arc<GuestMemoryMmap<()>>,
        segs: &[(GuestAddress, usize)],
    ) -> Option<Self> {
        let mut iov = Vec::with_capacity(segs.len());
        for &(addr, len) in segs {
            if len == 0 {
                continue;
            }
            // Bounds-checked: the whole range lies in one region's mapping,
            // which `mem` (held below) keeps mapped.
            let slice = mem.get_slice(addr, len).ok()?;
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len,
            });
        }
        let owner: Owner = mem.clone();
        Some(IoVecs {
            iov,
            keep: Keep::Guest(owner),
            parts: Vec::new(),
        })
    }
    /// Makes room for `segments` more segments (before [`IoVecs::append`]).
    pub fn reserve(&mut self, segments: usize) {
        self.iov.reserve(segments);
    }
    /// Appends the segments of `other` after this one's, keeping `other`'s
    /// memory alive as long as this lives (a block-layer request made of
    /// several guest requests). Guest segments of the same memory cost
    /// nothing more than their `iovec`s.
    pub fn append(&mut self, mut other: IoVecs) {
        self.iov.append(&mut other.iov);
        let plain = |v: &IoVecs| matches!(v.keep, Keep::Guest(_)) && v.parts.is_empty();
        let same_owner = match (&self.keep, &other.keep) {
            (Keep::Guest(a), Keep::Guest(b)) => std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)),
            _ => false,
        };
        if !(same_owner && plain(&other)) {
            // Moving `other` does not move the heap memory or the mapping
            // its segments point into.
            self.parts.push(other);
        }
    }
    /// Split into parts covering the byte ranges `(start, len)`, which must
    /// be in increasing order, disjoint and inside the buffers (`None`
    /// otherwise). Each part points into this memory and keeps it alive;
    /// once every part is dropped, [`Carved::into_inner`] gives the
    /// buffers back.
    pub fn carve(self, ranges: &[(usize, usize)]) -> Option<(Carved, Vec<IoVecs>)> {
        let total = self.len();
        let mut end = 0;
        for &(a, l) in ranges {
            if a < end || a.checked_add(l)? > total {
                return None;
            }
            end = a + l;
        }
        let whole = Arc::new(self);
        let parts = ranges
            .iter()
            .map(|&(a, l)| {
                let mut iov = Vec::new();
                let mut pos = 0usize;
                for v in &whole.iov {
                    let (s, e) = (pos.max(a), (pos + v.iov_len).min(a + l));
                    if s < e {
                        iov.push(libc::iovec {
                            // Pointer arithmetic only (wrapping_add is
                            // safe); `s - pos` is inside this segment.
                            iov_base: v.iov_base.cast::<u8>().wrapping_add(s - pos).cast(),
                            iov_len: e - s,
                        });
                    }
                    pos += v.iov_len;
                }
                IoVecs {
                    iov,
                    keep: Keep::Whole(whole.clone()),
                    parts: Vec::new(),
                }
            })
            .collect();
        Some((Carved(whole), parts))
    }
    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iter().map(|v| v.iov_len).sum()
    }
    /// True if there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The owned buffer back, if built with [`IoVecs::from_vec`] (only that
    /// buffer: not what [`IoVecs::append`] added).
    pub fn into_vec(self) -> Option<Vec<u8>> {
        match self.keep {
            Keep::Owned(v) => Some(v),
            _ => None,
        }
    }
    /// The raw `iovec` array (for `preadv`/io_uring).
    pub fn as_raw(&self) -> &[libc::iovec] {
        &self.iov
    }
    /// Borrow as mutable slices.
    pub fn slices_mut(&mut self) -> Vec<IoSliceMut<'_>> {
        self.iov
            .iter()
            .filter(|v| v.iov_len > 0)
            .map(|v| {
                // SAFETY: each iovec points either into `Keep::Owned`,
                // `Keep::Aligned` or `self.parts` (alive and exclusively
                // borrowed through `&mut self`), into memory the `from_raw`
                // caller guaranteed valid and unshared, into this part's own
                // bytes of a carved whole (kept alive by `Keep::Whole`,
                // disjoint from every other part), or into guest RAM whose
                // mapping `Keep::Guest` keeps alive, bounds-checked by
                // `from_guest`. Guest RAM is the one memory others may touch
                // meanwhile: the guest's vCPUs can write the buffer of a
                // request in flight, as a real device's DMA can race the
                // CPU. That is the compromise of every VMM that does I/O
                // straight from guest memory: the bytes may be torn, but the
                // memory is valid for the whole borrow.
                IoSliceMut::new(unsafe {
                    std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len)
                })
            })
            .collect()
    }
    /// Borrow as shared slices.
    pub fn slices(&self) -> Vec<IoSlice<'_>> {
        self.iov
            .iter()
            .filter(|v| v.iov_len > 0)
            .map(|v| {
                // SAFETY: as in `slices_mut`; shared access only.
                IoSlice::new(unsafe {
                    std::slice::from_raw_parts(v.iov_base.cast::<u8>().cast_const(), v.iov_len)
                })
            })
            .collect()
    }
}

/// Total length of slices.
pub fn total_len(iov: &[IoSlice<'_>]) -> usize {
    iov.iter().map(|s| s.len()).sum()
}

/// Total length of mutable slices.
pub fn total_len_mut(iov: &[IoSliceMut<'_>]) -> usize {
    iov.iter().map(|s| s.len()).sum()
}

/// Copy all of `iov` into `dst` (which must be at least as long).
pub fn gather(iov: &[IoSlice<'_>], dst: &mut [u8]) {
    let mut pos = 0;
    for s in iov {
        let n = s.len().min(dst.len() - pos);
        dst[pos..pos + n].copy_from_slice(&s[..n]);
        pos += n;
    }
}

/// Copy `src` into `iov`, in order, until either runs out.
pub fn scatter(src: &[u8], iov: &mut [IoSliceMut<'_>]) {
    let mut pos = 0;
    for s in iov.iter_mut() {
        if pos >= src.len() {
            break;
        }
        let n = s.len().min(src.len() - pos);
        s[..n].copy_from_slice(&src[pos..pos + n]);
        pos += n;
    }
}

/// Fill `iov` with zeroes.
pub fn zero_fill(iov: &mut [IoSliceMut<'_>]) {
    for s in iov.iter_mut() {
        s.fill(0);
    }
}

/// True if every byte in `iov` is zero.
pub fn is_zero(iov: &[IoSlice<'_>]) -> bool {
    iov.iter().all(|s| is_zero_buf(s))
}

/// True if every byte in `buf` is zero.
pub fn is_zero_buf(buf: &[u8]) -> bool {
    let (pre, mid, post) = {
        // SAFETY: reinterpreting bytes as u64 is valid for any bit pattern;
        // align_to returns correctly aligned middle part.
        unsafe { buf.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// A zeroed heap buffer aligned to `align` bytes (a power of two).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf uniquely owns its allocation, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned allocation.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocate `len` zeroed bytes aligned to `align`.
    pub fn new(len: usize, align: usize) -> Self {
        let align = align.max(1).next_power_of_two();
        let layout = Layout::from_size_align(len.max(1), align).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len, layout }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of at least len bytes, initialised
        // (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_scatter_roundtrip() {
        let a = [1u8, 2, 3];
        let b = [4u8, 5];
        let mut flat = [0u8; 5];
        gather(&[IoSlice::new(&a), IoSlice::new(&b)], &mut flat);
        assert_eq!(flat, [1, 2, 3, 4, 5]);
        let mut x = [0u8; 2];
        let mut y = [0u8; 3];
        scatter(
            &flat,
            &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
        );
        assert_eq!((x, y), ([1, 2], [3, 4, 5]));
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(8192, 4096);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(is_zero_buf(&b));
        assert_eq!(b.len(), 8192);
    }

    #[test]
    fn carve_parts_write_into_the_whole() {
        let v = IoVecs::from_vec(vec![0u8; 10]);
        assert!(IoVecs::from_vec(vec![0u8; 4])
            .carve(&[(2, 2), (1, 1)])
            .is_none());
        assert!(IoVecs::from_vec(vec![0u8; 4]).carve(&[(2, 3)]).is_none());
        let (whole, mut parts) = v.carve(&[(1, 3), (6, 4)]).unwrap();
        for (i, p) in parts.iter_mut().enumerate() {
            for mut s in p.slices_mut() {
                s.fill(i as u8 + 1);
            }
        }
        assert_eq!(parts[1].len(), 4);
        drop(parts);
        let v = whole.into_inner().ok().unwrap();
        assert_eq!(v.into_vec().unwrap(), [0, 1, 1, 1, 0, 0, 2, 2, 2, 2]);
    }

    #[test]
    fn from_guest_keeps_the_mapping_and_refuses_what_is_not_one_mapping() {
        use vm_memory::Bytes;
        // Two regions with a hole: [0, 64K) and [128K, 192K).
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), 0x1_0000),
                (GuestAddress(0x2_0000), 0x1_0000),
            ])
            .unwrap(),
        );
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x100)).unwrap();
        let g = |a: u64, l: usize| (GuestAddress(a), l);
        assert!(
            IoVecs::from_guest(&mem, &[g(0xfff0, 0x20)]).is_none(),
            "into the hole"
        );
        assert!(
            IoVecs::from_guest(&mem, &[g(0x3_0000, 1)]).is_none(),
            "past RAM"
        );
        assert!(
            IoVecs::from_guest(&mem, &[g(u64::MAX, 2)]).is_none(),
            "wraps"
        );
        let mut v = IoVecs::from_guest(&mem, &[g(0x100, 2), g(0x1234, 0), g(0x2_0000, 3)]).unwrap();
        assert_eq!(v.as_raw().len(), 2, "empty segments are left out");
        let w = IoVecs::from_guest(&mem, &[g(0x102, 2)]).unwrap();
        v.append(w);
        assert!(v.parts.is_empty(), "same memory: only the iovecs move");
        v.append(IoVecs::from_vec(vec![9]));
        assert_eq!(v.parts.len(), 1);
        // The device lets go of guest memory; the request still holds it.
        let weak = Arc::downgrade(&mem);
        drop(mem);
        assert!(weak.upgrade().is_some());
        let mut flat = [0u8; 8];
        gather(&v.slices(), &mut flat);
        assert_eq!(flat, [1, 2, 0, 0, 0, 3, 4, 9]);
        for mut s in v.slices_mut() {
            s.fill(7);
        }
        drop(v);
        assert!(weak.upgrade().is_none(), "dropped with the last request");
    }

    #[test]
    fn iovecs_owned_roundtrip() {
        let mut v = IoVecs::from_vec(vec![7u8; 10]);
        assert_eq!(v.len(), 10);
        for s in v.slices_mut() {
            assert_eq!(s.len(), 10);
        }
        assert_eq!(v.into_vec().unwrap(), vec![7u8; 10]);
        assert!(!is_zero_buf(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
        assert!(is_zero_buf(&[0u8; 33]));
    }
}
