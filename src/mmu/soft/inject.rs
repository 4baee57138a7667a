//! Failure injection: make the n-th call of one kind of backend operation fail.

/// The kinds of backend calls that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CallKind {
    /// `map_fresh`.
    Map,
    /// `unmap`.
    Unmap,
    /// `protect`.
    Protect,
    /// `poke` (mapping the private alias).
    Poke,
    /// `write` through a page's own mapping.
    Write,
    /// `flush` (the shootdown round).
    Flush,
    /// `sync_cores`.
    Sync,
}

impl CallKind {
    /// Every kind.
    pub const ALL: [CallKind; 7] = [
        CallKind::Map,
        CallKind::Unmap,
        CallKind::Protect,
        CallKind::Poke,
        CallKind::Write,
        CallKind::Flush,
        CallKind::Sync,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Calls counted per kind, and at most one planned run of failures per kind: calls
/// `first..first + count`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Inject {
    calls: [u64; 7],
    fail_at: [Option<(u64, u64)>; 7],
}

impl Inject {
    /// Counts a call of `kind`; whether it is one planned to fail.
    pub fn call(&mut self, kind: CallKind) -> bool {
        let i = kind.index();
        let n = self.calls[i];
        self.calls[i] += 1;
        match self.fail_at[i] {
            Some((first, count)) if n >= first && n - first < count => {
                if n - first + 1 == count {
                    self.fail_at[i] = None;
                }
                true
            }
            _ => false,
        }
    }

    pub fn calls(&self, kind: CallKind) -> u64 {
        self.calls[kind.index()]
    }

    /// The `n`-th call of `kind` from now (0 = the next one) fails.
    pub fn fail_nth(&mut self, kind: CallKind, n: u64) {
        let i = kind.index();
        self.fail_at[i] = Some((self.calls[i] + n, 1));
    }

    /// The next `count` calls of `kind` fail.
    pub fn fail_next(&mut self, kind: CallKind, count: u64) {
        let i = kind.index();
        self.fail_at[i] = (count > 0).then_some((self.calls[i], count));
    }

    pub fn clear(&mut self) {
        self.fail_at = [None; 7];
    }
}
