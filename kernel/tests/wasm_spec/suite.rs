//! The scheduler of the spec run: each file's whole state is one job in a shared queue; a CPU
//! takes the oldest job, runs a batch of its commands and hands it back, so stores move between
//! CPUs between commands and finished files drop while the other CPUs keep running theirs.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use codespace_kernel::cpu::percpu::{current_cpu, MAX_CPUS};
use codespace_kernel::smp;
use codespace_kernel::wasm::Runtime;
use codespace_wasmtime::spec::run::FileRun;
use codespace_wasmtime::spec::{self, Action, File, Outcome};
use codespace_wasmtime::wasmtime::Module;

use super::load_all;

/// Commands a CPU runs of a file before handing the file back to the queue.
const BATCH: usize = 24;

/// One file's results.
#[derive(Default, Clone)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub by_kind: [usize; 8],
    /// `line: why` of the first failures.
    pub failures: Vec<String>,
    /// `line kind: reason` of every skip.
    pub skips: Vec<String>,
    /// The CPUs that ran its commands (bit per CPU): the store they all used was made on the
    /// first, its modules loaded there.
    pub cpus: u64,
}

/// A file in progress: everything its commands made, moved between CPUs as a whole.
struct Job {
    file: usize,
    /// The CPU that ran its last batch.
    last_cpu: usize,
    next: usize,
    modules: Vec<Module>,
    run: FileRun,
    tally: Tally,
}

/// The shared state of one run.
pub struct Suite<'b> {
    rt: &'b Runtime,
    files: &'b [File<'b>],
    queue: spin::Mutex<VecDeque<Job>>,
    /// File indices, most commands first: the long files start early, so the run does not end
    /// with one CPU working through a long file while the others wait.
    order: Vec<usize>,
    next_file: AtomicUsize,
    in_flight: AtomicUsize,
    pub results: spin::Mutex<Vec<Option<Tally>>>,
    pub commands: [AtomicUsize; MAX_CPUS],
    pub traps: [AtomicUsize; MAX_CPUS],
}

impl<'b> Suite<'b> {
    /// A run of `files` on `rt`, the files with the most commands first (the long files start
    /// early, so the run does not end with one CPU working through a long file while the others
    /// wait).
    pub fn new(rt: &'b Runtime, files: &'b [File<'b>]) -> Self {
        let mut order: Vec<usize> = (0..files.len()).collect();
        order.sort_by_key(|&i| core::cmp::Reverse(files[i].steps.len()));
        Suite {
            rt,
            files,
            queue: spin::Mutex::new(VecDeque::new()),
            order,
            next_file: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            results: spin::Mutex::new((0..files.len()).map(|_| None).collect()),
            commands: [const { AtomicUsize::new(0) }; MAX_CPUS],
            traps: [const { AtomicUsize::new(0) }; MAX_CPUS],
        }
    }

    /// Starts the next file on this CPU: loads its modules, makes its store.
    fn start(&self) -> Option<Job> {
        let file = *self
            .order
            .get(self.next_file.fetch_add(1, Ordering::SeqCst))?;
        let f = &self.files[file];
        let mut tally = Tally::default();
        let loaded = load_all(self.rt, f).and_then(|modules| {
            FileRun::new(&self.rt.engine)
                .map(|run| (modules, run))
                .map_err(|e| alloc::format!("store: {e:?}"))
        });
        match loaded {
            Ok((modules, run)) => Some(Job {
                file,
                last_cpu: current_cpu(),
                next: 0,
                modules,
                run,
                tally,
            }),
            Err(why) => {
                tally.failed = f.steps.len().max(1);
                tally.failures.push(why);
                self.results.lock()[file] = Some(tally);
                // Another file instead, so this CPU keeps working.
                self.start()
            }
        }
    }

    /// Runs up to [`BATCH`] commands of `job` on this CPU.
    fn batch(&self, job: &mut Job) {
        let steps = &self.files[job.file].steps;
        let cpu = current_cpu();
        job.tally.cpus |= 1 << cpu;
        job.last_cpu = cpu;
        for step in steps.iter().skip(job.next).take(BATCH) {
            let t = &mut job.tally;
            t.by_kind[step.kind as usize] += 1;
            if let Action::Skip(why) = &step.action {
                t.skipped += 1;
                t.skips
                    .push(alloc::format!("{} {}: {why}", step.line, step.kind.name()));
                continue;
            }
            let got = job.run.step(&step.action, &job.modules);
            self.commands[cpu].fetch_add(1, Ordering::Relaxed);
            if matches!(got, Outcome::Trap(_)) {
                self.traps[cpu].fetch_add(1, Ordering::Relaxed);
            }
            match spec::check(step, &got) {
                Ok(()) => t.passed += 1,
                Err(why) => {
                    t.failed += 1;
                    if t.failures.len() < 8 {
                        t.failures.push(alloc::format!(
                            "{} {}: {why}",
                            step.line,
                            step.kind.name()
                        ));
                    }
                }
            }
        }
        job.next = (job.next + BATCH).min(steps.len());
    }

    /// One CPU's share, with interrupts on: the boot CPU runs tests with them off, and while it
    /// waits here for the last files other CPUs' TLB shootdowns (publishing code, releasing
    /// linear memories) wait for its acknowledgement.
    pub fn work(&self) {
        let enabled = x86_64::instructions::interrupts::are_enabled();
        x86_64::instructions::interrupts::enable();
        self.work_loop();
        if !enabled {
            x86_64::instructions::interrupts::disable();
        }
    }

    /// The next job for this CPU: the oldest job another CPU ran last (so stores move between
    /// CPUs), else a new file while fewer than two per CPU are open, else this CPU's own job.
    /// `None` when nothing is left for now.
    fn next_job(&self, cpu: usize) -> Option<Job> {
        {
            let mut queue = self.queue.lock();
            if let Some(i) = queue.iter().position(|j| j.last_cpu != cpu) {
                return queue.remove(i);
            }
        }
        if self.in_flight.fetch_add(1, Ordering::SeqCst) < 2 * smp::online_cpus() {
            if let Some(job) = self.start() {
                return Some(job);
            }
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.queue.lock().pop_front()
    }

    /// Runs batches of jobs until every file is done.
    fn work_loop(&self) {
        let cpu = current_cpu();
        loop {
            let Some(mut job) = self.next_job(cpu) else {
                let started_all = self.next_file.load(Ordering::SeqCst) >= self.files.len();
                if started_all && self.in_flight.load(Ordering::SeqCst) == 0 {
                    return;
                }
                core::hint::spin_loop();
                continue;
            };
            self.batch(&mut job);
            if job.next < self.files[job.file].steps.len() {
                self.queue.lock().push_back(job);
            } else {
                let Job { file, tally, .. } = job;
                // The store and the modules drop here, on this CPU, while others run theirs.
                self.results.lock()[file] = Some(tally);
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}
