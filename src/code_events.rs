//! Code events: tell profilers and debuggers where generated code lives.
//!
//! A [`CodeEventListener`] hears about code when it is published and when it is freed (V8's
//! `LogCode` / code-event logger). [`PerfMapListener`] writes Linux perf's JIT map format
//! (`/tmp/perf-<pid>.map`): one line `<start hex> <size hex> <name>` per published object, which
//! lets `perf report` symbolize samples in generated code.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::code_object::{CodeKind, CodeObject, DebugName};
use crate::range::AddressRange;

/// One piece of code that was published or freed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CodeEvent<'a> {
    /// Printable name (the code's name, else e.g. `func[3]`).
    pub name: DebugName<'a>,
    /// What the code is.
    pub kind: CodeKind,
    /// Where its instructions are.
    pub range: AddressRange,
}

impl<'a> CodeEvent<'a> {
    /// The event describing `code`.
    #[must_use]
    pub fn new(code: &'a CodeObject) -> Self {
        CodeEvent {
            name: code.debug_name(),
            kind: code.kind(),
            range: code.instructions(),
        }
    }
}

impl<'a> From<&'a CodeObject> for CodeEvent<'a> {
    fn from(code: &'a CodeObject) -> Self {
        CodeEvent::new(code)
    }
}

/// Receives code events. Called from the thread that publishes or frees the code, never from
/// interrupt context; implementations must not call back into the code manager.
pub trait CodeEventListener: Send + Sync {
    /// `event`'s code became executable.
    fn code_published(&self, event: &CodeEvent<'_>);
    /// `event`'s code was freed; its addresses may be reused.
    fn code_freed(&self, event: &CodeEvent<'_>);
}

/// Writes perf map lines (`<start hex> <size hex> <name>\n`, hex without `0x`, e.g.
/// `ffffc00000001000 40 func[3]`) for published code into a [`fmt::Write`].
///
/// Freed code writes nothing (the format has no removal; perf takes the latest mapping of an
/// address). Line breaks in names are written as spaces so each object stays one line. Write
/// errors are counted ([`write_errors`](Self::write_errors)), not reported: listeners cannot
/// fail.
pub struct PerfMapListener<W> {
    out: spin::Mutex<W>,
    write_errors: AtomicU64,
}

impl<W: fmt::Debug> fmt::Debug for PerfMapListener<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerfMapListener")
            .field("out", &*self.out.lock())
            .field("write_errors", &self.write_errors())
            .finish()
    }
}

impl<W: Default> Default for PerfMapListener<W> {
    fn default() -> Self {
        Self::new(W::default())
    }
}

/// Forwards to `W`, writing `\n` and `\r` as spaces.
struct OneLine<'a, W>(&'a mut W);

impl<W: fmt::Write> fmt::Write for OneLine<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(['\n', '\r']) {
            self.0.write_str(&rest[..i])?;
            self.0.write_char(' ')?;
            rest = &rest[i + 1..];
        }
        self.0.write_str(rest)
    }
}

impl<W> PerfMapListener<W> {
    /// A listener writing into `out`.
    #[must_use]
    pub const fn new(out: W) -> Self {
        PerfMapListener {
            out: spin::Mutex::new(out),
            write_errors: AtomicU64::new(0),
        }
    }

    /// Runs `f` on the writer (e.g. to read or flush what was written), under the listener's
    /// lock.
    pub fn with_writer<R>(&self, f: impl FnOnce(&mut W) -> R) -> R {
        f(&mut self.out.lock())
    }

    /// Takes what was written so far, leaving a fresh default writer.
    #[must_use]
    pub fn take(&self) -> W
    where
        W: Default,
    {
        core::mem::take(&mut *self.out.lock())
    }

    /// The writer.
    #[must_use]
    pub fn into_inner(self) -> W {
        self.out.into_inner()
    }

    /// Lines that failed to write.
    #[must_use]
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }
}

impl<W: fmt::Write> PerfMapListener<W> {
    fn write_line(out: &mut W, event: &CodeEvent<'_>) -> fmt::Result {
        write!(out, "{:x} {:x} ", event.range.start(), event.range.size())?;
        fmt::Write::write_fmt(&mut OneLine(out), format_args!("{}", event.name))?;
        out.write_char('\n')
    }
}

impl<W: fmt::Write + Send> CodeEventListener for PerfMapListener<W> {
    fn code_published(&self, event: &CodeEvent<'_>) {
        if Self::write_line(&mut self.out.lock(), event).is_err() {
            self.write_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn code_freed(&self, _event: &CodeEvent<'_>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::code_object::CodeDesc;
    use std::string::String;
    use std::sync::Mutex;
    use std::vec::Vec;

    fn object(kind: CodeKind, start: usize, size: usize, index: Option<u32>) -> CodeObject {
        CodeObject::new(&CodeDesc {
            index,
            ..CodeDesc::new(kind, AddressRange::from_start_size(start, size).unwrap())
        })
        .unwrap()
    }

    #[test]
    fn perf_map_lines_exact() {
        let perf = PerfMapListener::new(String::new());
        let f = object(CodeKind::Function, 0xffff_c000_0000_1000, 0x40, Some(3));
        let jt = object(CodeKind::JumpTable, 0xffff_c000_0000_0000, 0x800, None);
        let named = CodeObject::new(&CodeDesc {
            name: Some("js-to-wasm"),
            ..CodeDesc::new(CodeKind::Wrapper, AddressRange::new(0x2000, 0x2013))
        })
        .unwrap();
        for c in [&f, &jt, &named] {
            perf.code_published(&CodeEvent::new(c));
        }
        perf.code_freed(&CodeEvent::new(&f));
        assert_eq!(
            perf.take(),
            "ffffc00000001000 40 func[3]\n\
             ffffc00000000000 800 jump-table\n\
             2000 13 js-to-wasm\n"
        );
        assert_eq!(
            perf.with_writer(|w| w.len()),
            0,
            "take leaves an empty writer"
        );
        perf.code_published(&CodeEvent::from(&object(CodeKind::Wrapper, 0x10, 1, None)));
        assert_eq!(perf.write_errors(), 0);
        assert_eq!(perf.into_inner(), "10 1 wrapper\n");
    }

    #[test]
    fn names_stay_on_one_line() {
        let perf = PerfMapListener::<String>::default();
        let c = CodeObject::new(&CodeDesc {
            name: Some("a\nb\r\nc"),
            ..CodeDesc::new(CodeKind::Function, AddressRange::new(0x100, 0x110))
        })
        .unwrap();
        perf.code_published(&CodeEvent::new(&c));
        assert_eq!(perf.take(), "100 10 a b  c\n");
    }

    /// A writer that fails every write.
    #[derive(Default)]
    struct Full;

    impl fmt::Write for Full {
        fn write_str(&mut self, _: &str) -> fmt::Result {
            Err(fmt::Error)
        }
    }

    #[test]
    fn write_errors_are_counted() {
        let perf = PerfMapListener::new(Full);
        let c = object(CodeKind::Function, 0x1000, 0x10, Some(0));
        perf.code_published(&CodeEvent::new(&c));
        perf.code_published(&CodeEvent::new(&c));
        assert_eq!(perf.write_errors(), 2);
    }

    /// Records both kinds of events, as a debugger would.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(bool, String, CodeKind, AddressRange)>>);

    impl CodeEventListener for Recorder {
        fn code_published(&self, e: &CodeEvent<'_>) {
            let name = std::format!("{}", e.name);
            self.0.lock().unwrap().push((true, name, e.kind, e.range));
        }
        fn code_freed(&self, e: &CodeEvent<'_>) {
            let name = std::format!("{}", e.name);
            self.0.lock().unwrap().push((false, name, e.kind, e.range));
        }
    }

    #[test]
    fn events_carry_name_kind_and_range_through_dyn_listener() {
        let rec = Recorder::default();
        let listeners: [&dyn CodeEventListener; 2] = [&rec, &PerfMapListener::new(String::new())];
        let c = object(CodeKind::Function, 0x1000, 0x20, Some(5));
        for l in listeners {
            l.code_published(&CodeEvent::new(&c));
            l.code_freed(&CodeEvent::new(&c));
        }
        let range = AddressRange::new(0x1000, 0x1020);
        assert_eq!(
            *rec.0.lock().unwrap(),
            [
                (true, String::from("func[5]"), CodeKind::Function, range),
                (false, String::from("func[5]"), CodeKind::Function, range),
            ]
        );
    }
}
