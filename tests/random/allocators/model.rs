//! The allocator run's shadow model: live ranges, committed pages with their protection and
//! bytes, and (in the ROX mode) the 2 MiB pages of ROX code spaces.
//!
//! The rule is V8's, at the granule of the space: a page lives while live code touches it. A
//! 4 KiB page is committed RW+NX and becomes R+X when code on it is published; a 2 MiB ROX page
//! is mapped R+X once, INT3-filled, when the first allocation touches it, and keeps that one
//! leaf until no live code touches it (then it goes at once: `CodeAllocator::free` leaves the
//! grace period to its caller). Freed bytes on pages that live on are INT3.

use codespace::mmu::HUGE_PAGE_SIZE;
use codespace::AddressRange;

use super::Run;
use crate::common::*;

pub(super) const HUGE: usize = HUGE_PAGE_SIZE;

/// How the model says a 4 KiB page is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prot {
    /// A 4 KiB leaf, RW+NX: committed, nothing published on it yet.
    RwNx,
    /// A 4 KiB leaf, R+X.
    Rx,
    /// Part of a 2 MiB R+X leaf of a ROX space.
    Huge,
}

/// What one committed page holds: its mapping and the bytes known so far (`None`: unknown,
/// never written since commit or left half written by a failed operation).
pub(super) struct ShadowPage {
    pub prot: Prot,
    pub bytes: Vec<Option<u8>>,
}

/// One code space as the model knows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ShadowSpace {
    pub end: usize,
    /// On 2 MiB ROX pages (false once it fell back to 4 KiB pages).
    pub rox: bool,
}

/// The 2 MiB pages `range` touches.
pub(super) fn huge_bases(range: AddressRange) -> impl Iterator<Item = usize> {
    let first = range.start() & !(HUGE - 1);
    (first..range.end()).step_by(HUGE)
}

impl Run<'_> {
    /// Whether `addr` lies in a code space on 2 MiB ROX pages.
    pub(super) fn in_rox_space(&self, addr: usize) -> bool {
        self.spaces
            .range(..=addr)
            .next_back()
            .is_some_and(|(_, s)| s.end > addr && s.rox)
    }

    pub(super) fn add_live(&mut self, range: AddressRange, mi: usize) {
        if let Some((&s, &(e, _))) = self.live.range(..range.end()).next_back() {
            assert!(
                e <= range.start(),
                "{}: {range:?} overlaps [{s:#x}, {e:#x})",
                self.label()
            );
        }
        self.live.insert(range.start(), (range.end(), mi));
        self.touched.extend(range.pages());
        self.allocated[mi] += range.size();
        if self.in_rox_space(range.start()) {
            // A 2 MiB page is mapped whole, R+X and INT3, when first touched.
            for base in huge_bases(range) {
                if self.huge.insert(base) {
                    for page in (base..base + HUGE).step_by(PAGE) {
                        let fresh = ShadowPage {
                            prot: Prot::Huge,
                            bytes: vec![Some(INT3); PAGE],
                        };
                        assert!(self.pages.insert(page, fresh).is_none());
                        self.touched.push(page);
                    }
                }
            }
            return;
        }
        for page in range.pages() {
            self.pages.entry(page).or_insert_with(|| ShadowPage {
                prot: Prot::RwNx,
                bytes: vec![None; PAGE],
            });
        }
    }

    /// The range was published with `bytes` (INT3 after them): every 4 KiB page executable; a
    /// 2 MiB page's leaf does not change.
    pub(super) fn published(&mut self, range: AddressRange, bytes: Option<&[u8]>) {
        for page in range.pages() {
            let shadow = self.pages.get_mut(&page).unwrap();
            if shadow.prot == Prot::RwNx {
                shadow.prot = Prot::Rx;
            }
            let part = range.overlap(&AddressRange::new(page, page + PAGE));
            for addr in part.start()..part.end() {
                shadow.bytes[addr - page] =
                    bytes.map(|b| b.get(addr - range.start()).copied().unwrap_or(INT3));
            }
        }
        self.touched.extend(range.pages());
    }

    pub(super) fn forget_bytes(&mut self, range: AddressRange) {
        for page in range.pages() {
            let shadow = self.pages.get_mut(&page).unwrap();
            let part = range.overlap(&AddressRange::new(page, page + PAGE));
            for addr in part.start()..part.end() {
                shadow.bytes[addr - page] = None;
            }
        }
    }

    /// After a failure that changed protections: take them from the page tables (the audit
    /// checks they are RW+NX or R+X and never both). Pages of 2 MiB leaves never change: the
    /// next check verifies they are still one R+X leaf.
    pub(super) fn resync_protection(&mut self, range: AddressRange) {
        self.manager.audit().unwrap();
        for page in range.pages() {
            let shadow = self.pages.get_mut(&page).unwrap();
            if shadow.prot == Prot::Huge {
                continue;
            }
            let flags = leaf_flags(&self.machine, page);
            assert!(
                flags == R_X || flags == RW_NX,
                "{}: {flags:#x}",
                self.label()
            );
            self.pages.get_mut(&page).unwrap().prot =
                if flags == R_X { Prot::Rx } else { Prot::RwNx };
        }
        self.touched.extend(range.pages());
    }

    /// Whether live code touches `[start, end)`.
    fn in_use(&self, start: usize, end: usize) -> bool {
        self.live
            .range(..end)
            .next_back()
            .is_some_and(|(_, &(e, _))| e > start)
    }

    /// V8's rule: a page dies when no live code touches it (a 2 MiB page in a ROX space);
    /// freed bytes on pages that live on become INT3. Returns how many 2 MiB pages died.
    #[must_use]
    pub(super) fn remove_live(&mut self, range: AddressRange) -> usize {
        let (end, mi) = self.live.remove(&range.start()).expect("live");
        self.touched.extend(range.pages());
        assert_eq!(end, range.end());
        self.allocated[mi] -= range.size();
        let rox = self.in_rox_space(range.start());
        let mut died = 0;
        for page in range.pages() {
            if rox || self.in_use(page, page + PAGE) {
                let shadow = self.pages.get_mut(&page).unwrap();
                let part = range.overlap(&AddressRange::new(page, page + PAGE));
                for addr in part.start()..part.end() {
                    shadow.bytes[addr - page] = Some(INT3);
                }
            } else {
                self.pages.remove(&page);
            }
        }
        if rox {
            for base in huge_bases(range) {
                if !self.in_use(base, base + HUGE) {
                    self.tally.freed_huge += 1;
                    self.drop_huge(base);
                    died += 1;
                }
            }
        }
        died
    }

    /// The 2 MiB page at `base` is gone (decommitted, or its space released).
    pub(super) fn drop_huge(&mut self, base: usize) {
        assert!(self.huge.remove(&base), "{}: {base:#x}", self.label());
        for page in (base..base + HUGE).step_by(PAGE) {
            self.pages.remove(&page);
            self.touched.push(page);
        }
    }
}
