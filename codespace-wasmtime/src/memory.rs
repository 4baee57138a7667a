//! The memory side of the hooks: wasmtime's `PROT_*` flags and ranges checked and turned into
//! [`Platform`](crate::Platform) calls.

use crate::{platform, Access, MemoryError};

/// wasmtime's `WASMTIME_PROT_READ`.
pub const PROT_READ: u32 = 1 << 0;
/// wasmtime's `WASMTIME_PROT_WRITE`.
pub const PROT_WRITE: u32 = 1 << 1;
/// wasmtime's `WASMTIME_PROT_EXEC`.
pub const PROT_EXEC: u32 = 1 << 2;

/// The access `prot` asks for; any executable request, or an unknown bit, is refused.
pub fn access(prot: u32) -> Result<Access, MemoryError> {
    if prot & PROT_EXEC != 0 || prot & !(PROT_READ | PROT_WRITE) != 0 {
        return Err(MemoryError::ExecutableRefused);
    }
    Ok(if prot & PROT_WRITE != 0 {
        Access::ReadWrite
    } else if prot & PROT_READ != 0 {
        Access::Read
    } else {
        Access::None
    })
}

/// Checks that `[start, start + len)` is a non-empty, page-aligned, non-wrapping range.
pub fn check_range(start: usize, len: usize) -> Result<(), MemoryError> {
    let page = platform().page_size();
    if len == 0 || !start.is_multiple_of(page) || !len.is_multiple_of(page) {
        return Err(MemoryError::Misaligned);
    }
    start.checked_add(len).ok_or(MemoryError::Misaligned)?;
    Ok(())
}

/// Turns a result into a C-ABI status: 0 or the error's code.
pub fn status(result: Result<(), MemoryError>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => e.code(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_is_refused_in_every_combination() {
        for prot in 0..8u32 {
            let got = access(prot);
            if prot & PROT_EXEC != 0 {
                assert_eq!(got, Err(MemoryError::ExecutableRefused), "prot {prot:#b}");
            } else {
                assert!(got.is_ok(), "prot {prot:#b}");
            }
        }
        assert_eq!(access(1 << 3), Err(MemoryError::ExecutableRefused));
        assert_eq!(access(PROT_READ | PROT_WRITE), Ok(Access::ReadWrite));
        assert_eq!(access(PROT_READ), Ok(Access::Read));
        assert_eq!(access(0), Ok(Access::None));
    }
}
