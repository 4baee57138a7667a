//! Code handles: a typestate from writable to published.
//!
//! [`WritableCode`] owns a staging buffer the caller fills through `&mut [u8]`; publishing copies
//! it into the committed pages (directly, by flipping, or through an alias, as the manager's
//! [`ProtectionMode`](super::ProtectionMode) says) and makes them R+X. [`PublishedCode`] has no
//! way to write: changing published code does not compile.

use alloc::vec::Vec;

use crate::AddressRange;

/// Freshly allocated code, not yet executable. Dropping it without `free`/`discard` leaks its
/// range until the allocator is dropped.
#[derive(Debug)]
#[must_use = "allocated code stays reserved until published or discarded"]
pub struct WritableCode {
    pub(crate) range: AddressRange,
    pub(crate) owner: u64,
    pub(crate) bytes: Vec<u8>,
    /// Whole pages of its own whose 8-byte slots may be patched once published (jump tables).
    pub(crate) patchable: bool,
    /// Whether a publish attempt (that failed and handed it back) may have written its bytes
    /// into memory: then discarding it fills the range with INT3 again.
    pub(crate) written: bool,
}

impl WritableCode {
    /// The code's final address range (size rounded up to the code alignment).
    #[must_use]
    pub fn range(&self) -> AddressRange {
        self.range
    }

    /// The address the first byte will have once published.
    #[must_use]
    pub fn start(&self) -> usize {
        self.range.start()
    }

    /// The bytes to publish (as long as the size asked for; the rest of the range is INT3).
    #[must_use]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    /// The bytes written so far.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }
}

/// Published, executable code: R+X pages; there is no way to write through this handle.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "published code stays allocated until freed"]
pub struct PublishedCode {
    pub(crate) range: AddressRange,
    pub(crate) owner: u64,
    pub(crate) len: usize,
    pub(crate) patchable: bool,
}

impl PublishedCode {
    /// The code's address range (size rounded up to the code alignment).
    #[must_use]
    pub fn range(&self) -> AddressRange {
        self.range
    }

    /// Address of the first instruction.
    #[must_use]
    pub fn start(&self) -> usize {
        self.range.start()
    }

    /// Bytes of code written (before INT3 padding).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no byte was written.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether its slots may be patched ([`CodeAllocator::patch`](super::CodeAllocator::patch)):
    /// jump tables allocated with [`allocate_table`](super::CodeAllocator::allocate_table).
    #[must_use]
    pub fn is_patchable(&self) -> bool {
        self.patchable
    }
}
