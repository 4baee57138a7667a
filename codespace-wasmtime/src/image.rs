//! The `.cwasm` container the host tool writes and the kernel checks before wasmtime sees it.
//!
//! wasmtime's `Module::deserialize_raw` validates lightly, so a 48-byte header guards the
//! precompiled module: magic, format version, the settings [`fingerprint`](crate::settings::fingerprint)
//! it was compiled with, the payload's length and FNV-1a checksum, and a checksum of the header
//! itself. All integers little-endian.

use crate::settings::{fnv1a, FNV_BASIS};

/// The first 8 bytes of every container.
pub const MAGIC: [u8; 8] = *b"CSWASM\0\x01";
/// The container format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Header size in bytes; the payload (wasmtime's ELF image) follows.
pub const HEADER_LEN: usize = 48;

/// Why a container was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageError {
    /// Shorter than its header, or than the payload length the header gives.
    Truncated,
    /// Not a codespace `.cwasm` container.
    BadMagic,
    /// A container format this crate does not read.
    UnsupportedVersion(u32),
    /// The header's own checksum does not match (a corrupt header).
    HeaderChecksum,
    /// Compiled with other settings (target, ISA flags, tunables or wasmtime version).
    SettingsMismatch {
        /// This build's fingerprint.
        expected: u64,
        /// The container's.
        found: u64,
    },
    /// Bytes after the payload.
    TrailingBytes,
    /// The payload's checksum does not match (a corrupt module).
    PayloadChecksum,
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Wraps `payload` (what `Engine::precompile_module` produced) compiled with settings
/// `fingerprint` in a container.
#[must_use]
pub fn header(payload: &[u8], fingerprint: u64) -> [u8; HEADER_LEN] {
    seal(&MAGIC, payload, fingerprint)
}

/// The header of a container with magic `magic` (the same layout serves other payloads, such as
/// the spec-suite bundle of [`crate::spec::bundle`]).
#[must_use]
pub fn seal(magic: &[u8; 8], payload: &[u8], fingerprint: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(magic);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&fingerprint.to_le_bytes());
    h[24..32].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    h[32..40].copy_from_slice(&fnv1a(FNV_BASIS, payload).to_le_bytes());
    let sum = fnv1a(FNV_BASIS, &h[..40]);
    h[40..48].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Checks a container against this build's settings and returns its payload.
///
/// # Errors
/// Any [`ImageError`]; the checks run in the order the variants are listed.
pub fn payload(bytes: &[u8], fingerprint: u64) -> Result<&[u8], ImageError> {
    open(&MAGIC, bytes, fingerprint)
}

/// Checks a container with magic `magic` (see [`seal`]) and returns its payload.
///
/// # Errors
/// As [`payload`].
pub fn open<'a>(
    magic: &[u8; 8],
    bytes: &'a [u8],
    fingerprint: u64,
) -> Result<&'a [u8], ImageError> {
    if bytes.len() < HEADER_LEN {
        return Err(ImageError::Truncated);
    }
    if bytes[..8] != *magic {
        return Err(ImageError::BadMagic);
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(ImageError::UnsupportedVersion(version));
    }
    if fnv1a(FNV_BASIS, &bytes[..40]) != u64_at(bytes, 40) {
        return Err(ImageError::HeaderChecksum);
    }
    let found = u64_at(bytes, 16);
    if found != fingerprint {
        return Err(ImageError::SettingsMismatch {
            expected: fingerprint,
            found,
        });
    }
    let len = usize::try_from(u64_at(bytes, 24)).map_err(|_| ImageError::Truncated)?;
    let rest = &bytes[HEADER_LEN..];
    if rest.len() < len {
        return Err(ImageError::Truncated);
    }
    if rest.len() > len {
        return Err(ImageError::TrailingBytes);
    }
    if fnv1a(FNV_BASIS, rest) != u64_at(bytes, 32) {
        return Err(ImageError::PayloadChecksum);
    }
    Ok(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    fn container(payload: &[u8], fp: u64) -> Vec<u8> {
        let mut v = header(payload, fp).to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn round_trip_and_every_refusal() {
        let body: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let c = container(&body, 42);
        assert_eq!(payload(&c, 42), Ok(&body[..]));
        assert_eq!(payload(&c[..47], 42), Err(ImageError::Truncated));
        assert_eq!(payload(&c[..c.len() - 1], 42), Err(ImageError::Truncated));
        assert_eq!(
            payload(&c, 43),
            Err(ImageError::SettingsMismatch {
                expected: 43,
                found: 42
            })
        );
        let mut t = c.clone();
        t.push(0);
        assert_eq!(payload(&t, 42), Err(ImageError::TrailingBytes));
        for at in [HEADER_LEN, HEADER_LEN + 500, c.len() - 1] {
            let mut bad = c.clone();
            bad[at] ^= 0x10;
            assert_eq!(
                payload(&bad, 42),
                Err(ImageError::PayloadChecksum),
                "byte {at}"
            );
        }
        let mut bad = c.clone();
        bad[0] ^= 1;
        assert_eq!(payload(&bad, 42), Err(ImageError::BadMagic));
        let mut bad = c.clone();
        bad[8] = 2;
        assert_eq!(payload(&bad, 42), Err(ImageError::UnsupportedVersion(2)));
        let mut bad = c.clone();
        bad[25] ^= 1;
        assert_eq!(payload(&bad, 42), Err(ImageError::HeaderChecksum));
    }
}
