//! Names and printing: `DebugName`, `Display` and `Debug` of a code object.

use super::*;

/// Printable name of a piece of code (V8's `DebugName`): its own name, else `func[<index>]` for
/// a function (`func[?]` without an index), `jump-table` or `wrapper`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct DebugName<'a> {
    kind: CodeKind,
    index: Option<u32>,
    name: Option<&'a str>,
}

impl<'a> DebugName<'a> {
    /// The debug name of code of `kind` with `index` and `name` (an empty name counts as none).
    #[must_use]
    pub const fn new(kind: CodeKind, index: Option<u32>, name: Option<&'a str>) -> Self {
        let name = match name {
            Some(n) if n.is_empty() => None,
            n => n,
        };
        DebugName { kind, index, name }
    }

    /// The code's own name, if it has one.
    #[must_use]
    pub const fn name(&self) -> Option<&'a str> {
        self.name
    }
}

impl fmt::Display for DebugName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name, self.kind, self.index) {
            (Some(name), _, _) => f.write_str(name),
            (None, CodeKind::Function, Some(index)) => write!(f, "func[{index}]"),
            (None, CodeKind::Function, None) => f.write_str("func[?]"),
            (None, kind, _) => f.write_str(kind.as_str()),
        }
    }
}

/// `name kind [start, end) size`; the alternate form (`{:#}`) adds one line per non-empty
/// metadata section.
impl fmt::Display for CodeObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.instructions;
        write!(
            f,
            "{} {} [{:#x}, {:#x}) {}",
            self.debug_name(),
            self.kind,
            r.start(),
            r.end(),
            r.size()
        )?;
        if !f.alternate() {
            return Ok(());
        }
        if self.protected_count > 0 {
            f.write_str("\n  protected instructions:")?;
            for o in self.protected_instructions() {
                write!(f, " {o:#x}")?;
            }
        }
        if self.relocation_count > 0 {
            f.write_str("\n  relocations:")?;
            for r in self.relocations() {
                match r.kind {
                    RelocKind::CallSlot { slot } => write!(f, " {:#x} call-slot {slot};", r.offset),
                    RelocKind::InternalReference { target_offset } => {
                        write!(f, " {:#x} internal {target_offset:#x};", r.offset)
                    }
                }?;
            }
        }
        if self.source_position_count > 0 {
            f.write_str("\n  source positions:")?;
            for (pc, src) in self.source_positions() {
                write!(f, " {pc:#x}={src}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CodeObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeObject")
            .field("kind", &self.kind)
            .field("index", &self.index)
            .field("name", &self.name())
            .field("instructions", &self.instructions)
            .field("ref_count", &self.ref_count())
            .field("dying", &self.is_dying())
            .field("protected", &self.protected_count)
            .field("relocations", &self.relocation_count)
            .field("source_positions", &self.source_position_count)
            .finish()
    }
}
