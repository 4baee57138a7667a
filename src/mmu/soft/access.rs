//! Accesses by simulated CPUs: what a CPU would read, write or execute given its TLB.
//!
//! A CPU holding stale translations of a page uses the newest one (the model is pessimistic:
//! hardware may), else the page tables. An access through a stale translation to a frame that
//! went back to the allocator is a [`Violation`](super::Violation); executing a frame whose code
//! changed since the CPU last serialized returns the bytes it still sees.

use super::machine::canonical;
use super::tlb::{Cached, Violation, ViolationKind};
use super::{Machine, SoftMmu};
use crate::PAGE_SIZE;

/// Why a simulated access faulted, as a #PF would say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No translation (not present, or not canonical).
    NotPresent {
        /// The faulting address.
        addr: usize,
    },
    /// A translation exists but does not allow the access.
    Protection {
        /// The faulting address.
        addr: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    Execute,
}

impl Machine {
    /// The translation `cpu` uses for the page of `va`.
    fn translation(&self, cpu: usize, va: u64) -> Option<Cached> {
        let page = va & !(PAGE_SIZE as u64 - 1);
        self.tlbs.stale_for(cpu, page).or_else(|| {
            let m = self.mem.translate(page)?;
            Some(Cached {
                frame: m.frame,
                size: PAGE_SIZE as u64,
                writable: m.writable,
                executable: m.executable,
            })
        })
    }

    /// Resolves one access that stays within a page: (frame index, offset).
    fn access(&mut self, cpu: usize, va: usize, access: Access) -> Result<(usize, usize), Fault> {
        if !canonical(va as u64) {
            return Err(Fault::NotPresent { addr: va });
        }
        let t = self
            .translation(cpu, va as u64)
            .ok_or(Fault::NotPresent { addr: va })?;
        let allowed = match access {
            Access::Read => true,
            Access::Write => t.writable,
            Access::Execute => t.executable,
        };
        if !allowed {
            return Err(Fault::Protection { addr: va });
        }
        let index = self
            .mem
            .frame_index(t.frame)
            .ok_or(Fault::NotPresent { addr: va })?;
        if !self.mem.is_allocated(index) {
            self.violations.push(Violation {
                op: "simulated access",
                kind: ViolationKind::AccessToFreedFrame,
                page: va & !(PAGE_SIZE - 1),
                frame: t.frame,
                cpu: Some(cpu),
            });
        }
        Ok((index, va % PAGE_SIZE))
    }

    fn copy_out(
        &mut self,
        cpu: usize,
        va: usize,
        buf: &mut [u8],
        access: Access,
    ) -> Result<(), Fault> {
        let mut done = 0;
        while done < buf.len() {
            let at = va.checked_add(done).ok_or(Fault::NotPresent { addr: va })?;
            let (index, offset) = self.access(cpu, at, access)?;
            let n = (PAGE_SIZE - offset).min(buf.len() - done);
            let frame = super::machine::Memory::phys(index);
            let view = match access {
                Access::Execute => self
                    .tlbs
                    .cpus
                    .get(cpu)
                    .and_then(|c| c.code_view.get(&frame)),
                _ => None,
            };
            let src = view.map(|b| &**b).or_else(|| self.mem.frame_bytes(index));
            match src {
                Some(bytes) => buf[done..done + n].copy_from_slice(&bytes[offset..offset + n]),
                None => buf[done..done + n].fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

impl SoftMmu {
    /// What CPU `cpu` reads at `va`.
    ///
    /// # Errors
    /// The fault the access would raise.
    pub fn read_as(&self, cpu: usize, va: usize, buf: &mut [u8]) -> Result<(), Fault> {
        self.machine.lock().copy_out(cpu, va, buf, Access::Read)
    }

    /// The instruction bytes CPU `cpu` fetches at `va`.
    ///
    /// # Errors
    /// The fault the fetch would raise.
    pub fn exec_as(&self, cpu: usize, va: usize, buf: &mut [u8]) -> Result<(), Fault> {
        self.machine.lock().copy_out(cpu, va, buf, Access::Execute)
    }

    /// CPU `cpu` writes `data` at `va` (through whatever translation it holds).
    ///
    /// # Errors
    /// The fault the write would raise; bytes before the faulting page were written.
    pub fn write_as(&self, cpu: usize, va: usize, data: &[u8]) -> Result<(), Fault> {
        let mut m = self.machine.lock();
        let mut done = 0;
        while done < data.len() {
            let at = va.checked_add(done).ok_or(Fault::NotPresent { addr: va })?;
            let (index, offset) = m.access(cpu, at, Access::Write)?;
            let n = (PAGE_SIZE - offset).min(data.len() - done);
            m.mem.frame_bytes_mut(index)[offset..offset + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }
}
