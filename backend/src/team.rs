//! How does each of a forward pass's many small parallel operations reach every core
//! without waking a sleeping thread? A team: the calling thread and helper threads that
//! stay awake between operations.
//!
//! A decode step is some 240 parallel operations (matrix products, attention) of tens of
//! microseconds each, with serial work between them (norms, rotations, cache writes).
//! Through rayon, the pool's other worker fell asleep in that serial work and each
//! operation woke it again (a futex wake and the scheduler's latency), so two threads
//! decoded 1.5× as fast as one (docs/benchmarks.md). A team's helpers spin on the next job
//! for [`SPIN`] before they park, the calling thread works on the job's tasks too, and a
//! hand-over is a few atomic operations.
//!
//! One job runs at a time. A caller that finds the team busy (a second model on another
//! thread, or a task that itself asks for parallel work) runs its tasks through rayon
//! instead. Tasks are claimed one at a time, so a thread that finishes early takes the
//! next; the caller takes them from the front and the helpers from the back, so that each
//! thread works through neighbouring memory (with the tasks dealt out in turn, a lone
//! sequence decoded 9% slower). Which thread runs a task never changes what it computes.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

/// How long a helper waits for the next job, spinning, before it parks. Longer than the
/// serial work between a step's operations and than the gap between steps, so that a
/// decoding engine never parks; short enough that an idle one stops using a core at once.
const SPIN: Duration = Duration::from_millis(2);

/// Runs `f(task)` for every task in `0..tasks`, on the calling thread and the team's
/// helpers, and returns when all have run. A task that panics makes this panic, after the
/// others have finished.
pub fn for_each(tasks: usize, f: impl Fn(usize) + Sync) {
    let team = team();
    if tasks <= 1 || team.helpers == 0 {
        (0..tasks).for_each(f);
        return;
    }
    let running = if tasks > MAX_TASKS {
        None
    } else {
        match team.submit.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    };
    match running {
        Some(_running) => team.run(tasks, &f),
        None => {
            use rayon::prelude::*;
            (0..tasks).into_par_iter().for_each(&f);
        }
    }
}

/// The most tasks a job can have (the claim counters' width); more run through rayon.
const MAX_TASKS: usize = 0xffff;

/// How many threads a job's tasks run on: the caller and the helpers.
pub fn threads() -> usize {
    team().helpers + 1
}

struct Team {
    /// Held by the caller whose job is running.
    submit: Mutex<()>,
    /// The current job's epoch (high 32 bits), one past its last unclaimed task (16 bits)
    /// and its first unclaimed task (low 16 bits). Every claim writes it; it has its cache
    /// line to itself.
    state: Line<AtomicU64>,
    /// The current job: its trampoline and closure. A helper trusts what
    /// it read here only once it has claimed a task in the epoch it read them in: they are
    /// rewritten only after every task of that epoch has finished.
    call: AtomicUsize,
    data: AtomicPtr<()>,
    /// Tasks of the current job that have not finished.
    pending: Line<AtomicUsize>,
    panicked: AtomicBool,
    /// Helpers parked, and what wakes them.
    parked: Mutex<usize>,
    wake: Condvar,
    helpers: usize,
}

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        // As many threads as rayon's global pool, the calling thread among them.
        let helpers = rayon::current_num_threads().saturating_sub(1);
        let team: &'static Team = Box::leak(Box::new(Team {
            submit: Mutex::new(()),
            state: Line(AtomicU64::new(0)),
            call: AtomicUsize::new(0),
            data: AtomicPtr::new(std::ptr::null_mut()),
            pending: Line(AtomicUsize::new(0)),
            panicked: AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
            helpers,
        }));
        for i in 0..helpers {
            std::thread::Builder::new()
                .name(format!("sluice-team-{i}"))
                .spawn(move || team.help())
                .expect("spawning a team helper thread");
        }
        team
    })
}

/// Calls the closure at `data`, an `F`, with `task`.
///
/// # Safety
/// `data` points to a live `F`.
unsafe fn trampoline<F: Fn(usize) + Sync>(data: *const (), task: usize) {
    // SAFETY: the caller's promise.
    let f = unsafe { &*data.cast::<F>() };
    f(task)
}

type Call = unsafe fn(*const (), usize);

/// A value on cache lines of its own (two: adjacent lines are fetched in pairs), so that
/// threads writing it do not also evict what sits beside it.
#[repr(align(128))]
struct Line<T>(T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// Which end of a job's tasks a thread claims from.
#[derive(Clone, Copy)]
enum End {
    Front,
    Back,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Team {
    fn run<F: Fn(usize) + Sync>(&self, tasks: usize, f: &F) {
        let call: Call = trampoline::<F>;
        self.call.store(call as usize, Ordering::Relaxed);
        self.data.store(
            std::ptr::from_ref(f).cast::<()>().cast_mut(),
            Ordering::Relaxed,
        );
        self.pending.store(tasks, Ordering::Relaxed);
        let epoch = ((self.state.load(Ordering::Relaxed) >> 32) + 1) & 0xffff_ffff;
        // Publishes the job: a helper that sees this epoch sees the stores above.
        self.state
            .store(epoch << 32 | (tasks as u64) << 16, Ordering::Release);
        if *lock(&self.parked) > 0 {
            self.wake.notify_all();
        }
        self.work(epoch, End::Front, call, std::ptr::from_ref(f).cast());
        // The closure lives on this frame: no helper may still be running it on return.
        let mut spins = 0u32;
        while self.pending.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) {
                // A helper preempted in the middle of a task: let it have the core.
                std::thread::yield_now();
            }
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a parallel task panicked (its message is above)");
        }
    }

    /// Claims and runs tasks of the job of `epoch`, from `end`, until none is left.
    fn work(&self, epoch: u64, end: End, call: Call, data: *const ()) {
        while let Some(task) = self.claim(epoch, end) {
            // SAFETY: a claimed task keeps its job pending, so its caller waits in `run`
            // and the closure at `data` is alive.
            if catch_unwind(AssertUnwindSafe(|| unsafe { call(data, task) })).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }

    /// The next task from `end` of the job of `epoch`, if that job is still the current
    /// one and has one left.
    fn claim(&self, epoch: u64, end: End) -> Option<usize> {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            let (front, back) = (state & 0xffff, (state >> 16) & 0xffff);
            if state >> 32 != epoch || front >= back {
                return None;
            }
            let (task, next) = match end {
                End::Front => (front, state + 1),
                End::Back => (back - 1, state - (1 << 16)),
            };
            match self
                .state
                .compare_exchange_weak(state, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(task as usize),
                Err(now) => state = now,
            }
        }
    }

    /// A helper's life: wait for a job, work on it, again.
    fn help(&self) {
        let mut seen = self.state.load(Ordering::Acquire) >> 32;
        loop {
            seen = self.next_epoch(seen);
            let call = self.call.load(Ordering::Relaxed);
            let data = self.data.load(Ordering::Relaxed);
            if call == 0 {
                continue;
            }
            // SAFETY: `call` was stored from a `Call`; it is used only if a claim in
            // `seen` succeeds, which proves it is that job's.
            let call = unsafe { std::mem::transmute::<usize, Call>(call) };
            self.work(seen, End::Back, call, data);
        }
    }

    /// Waits for a job newer than `seen`: spinning for [`SPIN`], then parked.
    fn next_epoch(&self, seen: u64) -> u64 {
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = self.state.load(Ordering::Acquire) >> 32;
            if epoch != seen {
                return epoch;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && started.elapsed() > SPIN {
                break;
            }
        }
        let mut parked = lock(&self.parked);
        loop {
            // Checked under the lock that `run` takes after publishing: no wake-up is lost.
            let epoch = self.state.load(Ordering::Acquire) >> 32;
            if epoch != seen {
                return epoch;
            }
            *parked += 1;
            parked = self
                .wake
                .wait(parked)
                .unwrap_or_else(PoisonError::into_inner);
            *parked -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once_across_many_jobs() {
        for tasks in [0, 1, 2, 3, 17, 1000] {
            for _ in 0..50 {
                let runs: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
                for_each(tasks, |t| {
                    runs[t].fetch_add(1, Ordering::Relaxed);
                });
                assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn a_job_past_the_counters_width_runs_every_task() {
        let tasks = MAX_TASKS + 3;
        let sum = AtomicU64::new(0);
        for_each(tasks, |t| _ = sum.fetch_add(t as u64, Ordering::Relaxed));
        let n = tasks as u64;
        assert_eq!(sum.into_inner(), n * (n - 1) / 2);
    }

    #[test]
    fn callers_on_several_threads_each_get_all_their_tasks_run() {
        std::thread::scope(|s| {
            for caller in 0..4u64 {
                s.spawn(move || {
                    for round in 0..200u64 {
                        let sum = AtomicU64::new(0);
                        for_each(64, |t| {
                            sum.fetch_add(t as u64 * (caller + round), Ordering::Relaxed);
                        });
                        assert_eq!(sum.into_inner(), 2016 * (caller + round));
                    }
                });
            }
        });
    }

    #[test]
    fn a_nested_job_runs_and_a_parked_team_wakes() {
        let total = AtomicU64::new(0);
        for_each(4, |_| {
            for_each(8, |t| _ = total.fetch_add(t as u64, Ordering::Relaxed))
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 28);
        // Long enough for the helpers to park; the next job must still complete.
        std::thread::sleep(SPIN * 3);
        let count = AtomicU64::new(0);
        for_each(32, |_| _ = count.fetch_add(1, Ordering::Relaxed));
        assert_eq!(count.load(Ordering::Relaxed), 32);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_and_the_team_still_works() {
        let caught = catch_unwind(|| {
            for_each(16, |t| assert_ne!(t, 7, "task seven fails"));
        });
        assert!(caught.is_err());
        let count = AtomicU64::new(0);
        for_each(16, |_| _ = count.fetch_add(1, Ordering::Relaxed));
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }
}
