//! The crate's audited memory-level `unsafe` code: giving freed heap back to the system,
//! and [`LockedBytes`], the page-backed buffer that long-lived secrets live in.
//!
//! **Idle trim.** glibc keeps what a thread freed in that thread's arena and returns pages
//! only from the top of a heap, so after a burst of connections the server stays resident
//! at the burst's high-water mark (measured: 2.4× the starting RSS after 1,000 connections
//! disconnected, though the heap in use was back to its starting size). `malloc_trim(0)`
//! gives every free page of every arena back. The [`crate::Supervisor`] calls
//! [`release_free_memory`] a moment after its last connection closed, when
//! [`crate::Config::release_memory_when_idle`] is set (`credproxy serve` and `exec` set
//! it; a host program embedding the library decides for its own process).
//!
//! **Locked pages.** Secrets that stay in memory for a long time (the memory backend's
//! tokens and keys, every [`crate::secret::Secret`], the served-token buffers that the file
//! store's read cache and replies share) live in their own anonymous mapping, marked
//! `MADV_DONTDUMP` (left out of any core file, whatever the core limit) and, within a
//! budget of half of `RLIMIT_MEMLOCK`, `mlock`ed (never written to swap). The bytes are
//! zeroed before the pages are unlocked and unmapped. What cannot be had is given up with
//! one warning per kind for the life of the process: past the budget, or when `mlock`
//! fails, the pages are not locked; when `madvise` fails, they may be dumped; when `mmap`
//! fails, the bytes go on the ordinary heap (still zeroed on drop).
//!
//! Every `unsafe` block of the crate's memory handling is in this file, each with its
//! `SAFETY` comment; `tests/unsafe_code.rs` pins them.

use std::ffi::c_void;
use std::fmt;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use zeroize::Zeroize;

/// Asks the C allocator to return its free pages to the system. True when glibc
/// released something; always false off glibc (other allocators return memory
/// themselves or have no such call).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointer and has no precondition on its caller; glibc
    // serializes it with every other allocator call of the process.
    unsafe { nix::libc::malloc_trim(0) == 1 }
}

/// Asks the C allocator to return its free pages to the system: nothing to do here.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// Locked bytes allowed when `RLIMIT_MEMLOCK` is unlimited (or cannot be read as a number).
const LOCK_BUDGET_UNLIMITED: usize = 64 << 20;

/// Bytes of secrets currently `mlock`ed by [`LockedBytes`] (whole pages).
static LOCKED: AtomicUsize = AtomicUsize::new(0);

/// What this process may lock: half of the soft `RLIMIT_MEMLOCK`, so that the host
/// program (or the Rust runtime) keeps the other half. Read once.
fn lock_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
        match getrlimit(Resource::RLIMIT_MEMLOCK) {
            Ok((soft, _)) if soft == RLIM_INFINITY => LOCK_BUDGET_UNLIMITED,
            Ok((soft, _)) => usize::try_from(soft / 2).unwrap_or(LOCK_BUDGET_UNLIMITED),
            Err(_) => 0,
        }
    })
}

/// Logs `message` as a warning the first time `flag` is raised, never again.
fn warn_once(flag: &AtomicBool, message: &str, error: Option<nix::Error>) {
    if !flag.swap(true, Ordering::Relaxed) {
        match error {
            Some(e) => tracing::warn!(error = %e, "{message}"),
            None => tracing::warn!("{message}"),
        }
    }
}

static WARNED_BUDGET: AtomicBool = AtomicBool::new(false);
static WARNED_MLOCK: AtomicBool = AtomicBool::new(false);
#[cfg(any(target_os = "linux", target_os = "android"))]
static WARNED_MADVISE: AtomicBool = AtomicBool::new(false);
static WARNED_MMAP: AtomicBool = AtomicBool::new(false);

/// A fixed-size byte buffer for secrets, on pages of its own that are excluded from core
/// dumps and locked against swap where the limit allows (see the [module doc](self)).
/// Zeroed on drop. `Debug` shows the length only.
pub struct LockedBytes {
    storage: Storage,
    /// Bytes in use, from the start of the storage.
    len: usize,
}

enum Storage {
    /// Nothing (length 0): no mapping needed.
    Empty,
    /// An anonymous private mapping of `map_len` bytes (whole pages), owned by this value.
    Mapped {
        ptr: NonNull<c_void>,
        map_len: usize,
        locked: bool,
    },
    /// `mmap` failed: the ordinary heap.
    Heap(Box<[u8]>),
}

// SAFETY: the mapping is owned by exactly one LockedBytes and only reached through it;
// &LockedBytes hands out shared slices, &mut LockedBytes the only mutable one, exactly as
// for a Box<[u8]>, which is Send and Sync.
#[allow(unsafe_code)]
unsafe impl Send for LockedBytes {}
// SAFETY: as above: no interior mutability, so shared references only ever read.
#[allow(unsafe_code)]
unsafe impl Sync for LockedBytes {}

impl LockedBytes {
    /// `len` zero bytes on locked, undumpable pages (or the fallbacks of the module doc).
    pub fn zeroed(len: usize) -> LockedBytes {
        let storage = match NonZeroUsize::new(len) {
            None => Storage::Empty,
            Some(nonzero) => map(nonzero),
        };
        LockedBytes { storage, len }
    }

    /// A locked copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> LockedBytes {
        let mut out = LockedBytes::zeroed(bytes.len());
        out.as_mut_slice().copy_from_slice(bytes);
        out
    }

    /// The bytes. Callers must not log them.
    #[allow(unsafe_code)]
    pub fn as_slice(&self) -> &[u8] {
        match &self.storage {
            Storage::Empty => &[],
            // SAFETY: ptr is a live mapping of map_len >= len readable bytes that this
            // value owns until drop; the returned borrow cannot outlive &self.
            Storage::Mapped { ptr, .. } => unsafe {
                std::slice::from_raw_parts(ptr.as_ptr().cast::<u8>(), self.len)
            },
            Storage::Heap(bytes) => bytes,
        }
    }

    /// The bytes, writable (to fill the buffer in place).
    #[allow(unsafe_code)]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Empty => &mut [],
            // SAFETY: as in as_slice, and the mapping is writable (PROT_WRITE); &mut self
            // makes this the only reference to it.
            Storage::Mapped { ptr, .. } => unsafe {
                std::slice::from_raw_parts_mut(ptr.as_ptr().cast::<u8>(), self.len)
            },
            Storage::Heap(bytes) => bytes,
        }
    }

    /// The number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the bytes are on pages locked against swap (tests and diagnostics).
    pub fn is_locked(&self) -> bool {
        matches!(self.storage, Storage::Mapped { locked: true, .. })
    }
}

/// Maps whole pages for `len` bytes, marks them undumpable and locks them if the budget
/// allows; the heap when there is no mapping to be had.
#[allow(unsafe_code)]
fn map(len: NonZeroUsize) -> Storage {
    use nix::sys::mman::{mlock, mmap_anonymous, MapFlags, ProtFlags};
    let page = page_size();
    let Some(map_len) = len
        .get()
        .checked_next_multiple_of(page)
        .and_then(NonZeroUsize::new)
    else {
        return Storage::Heap(vec![0; len.get()].into_boxed_slice());
    };
    // SAFETY: an anonymous private mapping at an address the kernel chooses replaces
    // nothing of ours; the result is owned by the Storage built below and unmapped once.
    let mapped = unsafe {
        mmap_anonymous(
            None,
            map_len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE,
        )
    };
    let ptr = match mapped {
        Ok(ptr) => ptr,
        Err(e) => {
            warn_once(
                &WARNED_MMAP,
                "cannot map pages for secrets; keeping them on the heap, where a core \
                 dump or swap may hold them",
                Some(e),
            );
            return Storage::Heap(vec![0; len.get()].into_boxed_slice());
        }
    };
    let map_len = map_len.get();
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::sys::mman::{madvise, MmapAdvise};
        // SAFETY: ptr..ptr+map_len is the mapping just made; advice changes no contents.
        if let Err(e) = unsafe { madvise(ptr, map_len, MmapAdvise::MADV_DONTDUMP) } {
            warn_once(
                &WARNED_MADVISE,
                "cannot exclude secret pages from core dumps (MADV_DONTDUMP)",
                Some(e),
            );
        }
    }
    let locked = if LOCKED.fetch_add(map_len, Ordering::Relaxed) + map_len > lock_budget() {
        LOCKED.fetch_sub(map_len, Ordering::Relaxed);
        warn_once(
            &WARNED_BUDGET,
            "RLIMIT_MEMLOCK is too small to lock every secret against swap; the rest stay \
             unlocked (still excluded from core dumps)",
            None,
        );
        false
    } else {
        // SAFETY: ptr..ptr+map_len is the mapping just made; locking changes no contents.
        match unsafe { mlock(ptr, map_len) } {
            Ok(()) => true,
            Err(e) => {
                LOCKED.fetch_sub(map_len, Ordering::Relaxed);
                warn_once(
                    &WARNED_MLOCK,
                    "cannot lock secret pages against swap (mlock); they stay unlocked",
                    Some(e),
                );
                false
            }
        }
    };
    Storage::Mapped {
        ptr,
        map_len,
        locked,
    }
}

/// The system's page size (4096 when it cannot be read).
fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        use nix::unistd::{sysconf, SysconfVar};
        match sysconf(SysconfVar::PAGE_SIZE) {
            Ok(Some(size)) if size > 0 => usize::try_from(size).unwrap_or(4096),
            _ => 4096,
        }
    })
}

impl Drop for LockedBytes {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        self.as_mut_slice().zeroize();
        if let Storage::Mapped {
            ptr,
            map_len,
            locked,
        } = self.storage
        {
            if locked {
                // SAFETY: the range was locked by map() and is still mapped.
                let _ = unsafe { nix::sys::mman::munlock(ptr, map_len) };
                LOCKED.fetch_sub(map_len, Ordering::Relaxed);
            }
            // SAFETY: the mapping was made by map() for this value alone, and no borrow of
            // it can outlive &mut self; it is unmapped exactly once, here.
            let _ = unsafe { nix::sys::mman::munmap(ptr, map_len) };
        }
    }
}

impl Clone for LockedBytes {
    fn clone(&self) -> Self {
        LockedBytes::from_slice(self.as_slice())
    }
}

impl fmt::Debug for LockedBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LockedBytes({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_copies_and_reports_length_only() {
        let b = LockedBytes::from_slice(b"canary-locked");
        assert_eq!(b.as_slice(), b"canary-locked");
        assert_eq!(b.len(), 13);
        assert_eq!(format!("{b:?}"), "LockedBytes(13 bytes)");
        let c = b.clone();
        drop(b);
        assert_eq!(c.as_slice(), b"canary-locked");
        assert!(LockedBytes::zeroed(0).is_empty());
        let big = LockedBytes::zeroed(3 * page_size() + 1);
        assert!(big.as_slice().iter().all(|&x| x == 0));
    }
}
