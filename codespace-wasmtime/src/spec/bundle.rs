//! The spec bundle: every file of a suite, its precompiled modules and its steps, in one
//! checksummed container (the `.cwasm` header layout of [`crate::image`] with its own magic),
//! handed to a kernel as one Multiboot module.
//!
//! Payload, all integers little-endian: `u32` file count, then per file its name, `u32` module
//! count, each module as length-prefixed bytes (a `.cwasm` container), `u32` step count and the
//! steps. Strings and byte strings are a `u32` length and the bytes.

use alloc::string::String;
use alloc::vec::Vec;

use super::{Action, File, Kind, Outcome, Rule, Step, Value};
use crate::image::{self, ImageError};

/// The first 8 bytes of a bundle.
pub const MAGIC: [u8; 8] = *b"CSSPEC\0\x01";

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BundleError {
    /// The container (magic, checksums, settings fingerprint, length).
    Container(ImageError),
    /// The payload ends inside a record, or a tag is unknown: at this payload offset.
    Malformed(usize),
}

/// A decoded bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle<'a> {
    /// The host reference's summary line (what the host tool printed).
    pub host_summary: String,
    /// The files, in the order the host ran them.
    pub files: Vec<File<'a>>,
}

/// Seals `bundle` compiled with settings `fingerprint`.
#[must_use]
pub fn encode(bundle: &Bundle<'_>, fingerprint: u64) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.str(&bundle.host_summary);
    w.u32(bundle.files.len() as u32);
    for file in &bundle.files {
        w.str(&file.name);
        w.u32(file.modules.len() as u32);
        for m in &file.modules {
            w.bytes(m);
        }
        w.u32(file.steps.len() as u32);
        for step in &file.steps {
            w.step(step);
        }
    }
    let mut out = image::seal(&MAGIC, &w.0, fingerprint).to_vec();
    out.extend_from_slice(&w.0);
    out
}

/// Checks and reads a bundle; the modules borrow from `bytes`.
///
/// # Errors
/// [`BundleError`].
pub fn decode(bytes: &[u8], fingerprint: u64) -> Result<Bundle<'_>, BundleError> {
    let payload = image::open(&MAGIC, bytes, fingerprint).map_err(BundleError::Container)?;
    let mut r = Reader {
        bytes: payload,
        at: 0,
    };
    let host_summary = r.str()?;
    let n = r.u32()?;
    let mut files = Vec::new();
    for _ in 0..n {
        let name = r.str()?;
        let mut modules = Vec::new();
        for _ in 0..r.u32()? {
            modules.push(r.bytes()?);
        }
        let mut steps = Vec::new();
        for _ in 0..r.u32()? {
            steps.push(r.step()?);
        }
        files.push(File {
            name,
            modules,
            steps,
        });
    }
    if r.at != payload.len() {
        return Err(BundleError::Malformed(r.at));
    }
    Ok(Bundle {
        host_summary,
        files,
    })
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn opt_str(&mut self, s: Option<&String>) {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
        }
    }
    fn value(&mut self, v: Value) {
        match v {
            Value::I32(x) | Value::F32(x) => {
                self.u8(if matches!(v, Value::I32(_)) { 0 } else { 2 });
                self.u32(x);
            }
            Value::I64(x) | Value::F64(x) => {
                self.u8(if matches!(v, Value::I64(_)) { 1 } else { 3 });
                self.u64(x);
            }
            Value::V128(x) => {
                self.u8(4);
                self.0.extend_from_slice(&x.to_le_bytes());
            }
            Value::FuncRef(non_null) => {
                self.u8(5);
                self.u8(u8::from(non_null));
            }
            Value::ExternRef(non_null) => {
                self.u8(6);
                self.u8(u8::from(non_null));
            }
        }
    }
    fn values(&mut self, vs: &[Value]) {
        self.u32(vs.len() as u32);
        for &v in vs {
            self.value(v);
        }
    }
    fn step(&mut self, step: &Step) {
        self.u32(step.line);
        self.u8(step.kind as u8);
        match &step.action {
            Action::Instantiate { module, id } => {
                self.u8(0);
                self.u32(*module);
                self.opt_str(id.as_ref());
            }
            Action::Register { name, id } => {
                self.u8(1);
                self.str(name);
                self.opt_str(id.as_ref());
            }
            Action::Invoke { id, func, args } => {
                self.u8(2);
                self.opt_str(id.as_ref());
                self.str(func);
                self.values(args);
            }
            Action::Get { id, global } => {
                self.u8(3);
                self.opt_str(id.as_ref());
                self.str(global);
            }
            Action::Skip(reason) => {
                self.u8(4);
                self.str(reason);
            }
        }
        match &step.host {
            Outcome::Values(vs) => {
                self.u8(0);
                self.values(vs);
            }
            Outcome::Trap(code) => {
                self.u8(1);
                self.str(code);
            }
            Outcome::Unlinkable => self.u8(2),
            Outcome::Failed(why) => {
                self.u8(3);
                self.str(why);
            }
            Outcome::Skipped => self.u8(4),
        }
        self.u32(step.rules.len() as u32);
        for rule in &step.rules {
            match *rule {
                Rule::Exact => self.u8(0),
                Rule::CanonicalNan => self.u8(1),
                Rule::ArithmeticNan => self.u8(2),
                Rule::LanesF32(l) => {
                    self.u8(3);
                    self.0.extend_from_slice(&l);
                }
                Rule::LanesF64(l) => {
                    self.u8(4);
                    self.0.extend_from_slice(&l);
                }
            }
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BundleError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(BundleError::Malformed(self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], BundleError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, BundleError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, BundleError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, BundleError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self) -> Result<&'a [u8], BundleError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Result<String, BundleError> {
        let at = self.at;
        let b = self.bytes()?;
        core::str::from_utf8(b)
            .map(String::from)
            .map_err(|_| BundleError::Malformed(at))
    }
    fn opt_str(&mut self) -> Result<Option<String>, BundleError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str()?)),
            _ => Err(self.bad()),
        }
    }
    fn bad(&self) -> BundleError {
        BundleError::Malformed(self.at.saturating_sub(1))
    }
    fn value(&mut self) -> Result<Value, BundleError> {
        Ok(match self.u8()? {
            0 => Value::I32(self.u32()?),
            1 => Value::I64(self.u64()?),
            2 => Value::F32(self.u32()?),
            3 => Value::F64(self.u64()?),
            4 => Value::V128(u128::from_le_bytes(self.array()?)),
            5 => Value::FuncRef(self.u8()? != 0),
            6 => Value::ExternRef(self.u8()? != 0),
            _ => return Err(self.bad()),
        })
    }
    fn values(&mut self) -> Result<Vec<Value>, BundleError> {
        let n = self.u32()?;
        let mut vs = Vec::new();
        for _ in 0..n {
            vs.push(self.value()?);
        }
        Ok(vs)
    }
    fn step(&mut self) -> Result<Step, BundleError> {
        let line = self.u32()?;
        let kind = *Kind::ALL
            .get(usize::from(self.u8()?))
            .ok_or_else(|| self.bad())?;
        let action = match self.u8()? {
            0 => Action::Instantiate {
                module: self.u32()?,
                id: self.opt_str()?,
            },
            1 => Action::Register {
                name: self.str()?,
                id: self.opt_str()?,
            },
            2 => Action::Invoke {
                id: self.opt_str()?,
                func: self.str()?,
                args: self.values()?,
            },
            3 => Action::Get {
                id: self.opt_str()?,
                global: self.str()?,
            },
            4 => Action::Skip(self.str()?),
            _ => return Err(self.bad()),
        };
        let host = match self.u8()? {
            0 => Outcome::Values(self.values()?),
            1 => Outcome::Trap(self.str()?),
            2 => Outcome::Unlinkable,
            3 => Outcome::Failed(self.str()?),
            4 => Outcome::Skipped,
            _ => return Err(self.bad()),
        };
        let mut rules = Vec::new();
        for _ in 0..self.u32()? {
            rules.push(match self.u8()? {
                0 => Rule::Exact,
                1 => Rule::CanonicalNan,
                2 => Rule::ArithmeticNan,
                3 => Rule::LanesF32(self.array()?),
                4 => Rule::LanesF64(self.array()?),
                _ => return Err(self.bad()),
            });
        }
        Ok(Step {
            line,
            kind,
            action,
            host,
            rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    fn sample() -> Bundle<'static> {
        let steps = vec![
            Step {
                line: 3,
                kind: Kind::Module,
                action: Action::Instantiate {
                    module: 0,
                    id: Some("$m".to_string()),
                },
                host: Outcome::Values(vec![]),
                rules: vec![],
            },
            Step {
                line: 9,
                kind: Kind::AssertReturn,
                action: Action::Invoke {
                    id: None,
                    func: "f".to_string(),
                    args: vec![Value::I32(1), Value::F64(2), Value::V128(3)],
                },
                host: Outcome::Values(vec![Value::F32(0x7fc0_0000), Value::V128(7)]),
                rules: vec![Rule::CanonicalNan, Rule::LanesF32([0, 1, 2, 0])],
            },
            Step {
                line: 10,
                kind: Kind::AssertTrap,
                action: Action::Get {
                    id: None,
                    global: "g".to_string(),
                },
                host: Outcome::Trap("MemoryOutOfBounds".to_string()),
                rules: vec![],
            },
            Step {
                line: 11,
                kind: Kind::Other,
                action: Action::Skip("threads".to_string()),
                host: Outcome::Skipped,
                rules: vec![],
            },
        ];
        Bundle {
            host_summary: "host: ok".to_string(),
            files: vec![File {
                name: "a.wast".to_string(),
                modules: vec![b"module bytes"],
                steps,
            }],
        }
    }

    #[test]
    fn round_trip_and_refusals() {
        let files = sample();
        let b = encode(&files, 5);
        assert_eq!(decode(&b, 5), Ok(files));
        assert!(matches!(
            decode(&b, 6),
            Err(BundleError::Container(ImageError::SettingsMismatch { .. }))
        ));
        let mut bad = b.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(
            decode(&bad, 5),
            Err(BundleError::Container(ImageError::PayloadChecksum))
        );
        // A payload cut short but resealed (a writer bug, not corruption): a typed error.
        let payload = &b[image::HEADER_LEN..b.len() - 3];
        let mut short = image::seal(&MAGIC, payload, 5).to_vec();
        short.extend_from_slice(payload);
        assert!(matches!(decode(&short, 5), Err(BundleError::Malformed(_))));
        // A `.cwasm` is not a bundle.
        let mut cwasm = image::header(b"x", 5).to_vec();
        cwasm.push(b'x');
        assert_eq!(
            decode(&cwasm, 5),
            Err(BundleError::Container(ImageError::BadMagic))
        );
    }

    #[test]
    fn nan_rules() {
        use super::super::value_matches as m;
        assert!(m(
            Rule::CanonicalNan,
            Value::F32(0),
            Value::F32(0xffc0_0000)
        ));
        assert!(!m(
            Rule::CanonicalNan,
            Value::F32(0),
            Value::F32(0x7fc0_0001)
        ));
        assert!(m(
            Rule::ArithmeticNan,
            Value::F32(0),
            Value::F32(0x7fc0_0001)
        ));
        assert!(!m(
            Rule::ArithmeticNan,
            Value::F32(0),
            Value::F32(0x7f80_0001)
        ));
        assert!(m(
            Rule::CanonicalNan,
            Value::F64(0),
            Value::F64(0x7ff8 << 48)
        ));
        assert!(!m(
            Rule::CanonicalNan,
            Value::F64(0),
            Value::F32(0x7fc0_0000)
        ));
        assert!(!m(Rule::Exact, Value::I32(1), Value::I32(2)));
        let lanes = Rule::LanesF32([0, 1, 0, 0]);
        let host = 5u128 | (0x7fc0_0000u128 << 32);
        assert!(m(
            lanes,
            Value::V128(host),
            Value::V128(5 | (0xffc0_0000u128 << 32))
        ));
        assert!(!m(
            lanes,
            Value::V128(host),
            Value::V128(6 | (0x7fc0_0000u128 << 32))
        ));
    }
}
