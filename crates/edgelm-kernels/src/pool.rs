//! A persistent fork/join pool: `run(n, f)` calls `f(0..n)` across the workers and the caller,
//! returning when all calls are done. Decoding a small model dispatches a few hundred jobs per
//! token, so wake-up latency matters as much as the kernels: idle workers spin on an atomic
//! generation counter for a while (a new job starts within nanoseconds), then yield their time
//! slice, then park on a condvar; the caller spins for the last task to finish.
//!
//! The caller never waits for a worker that has not joined the job: it takes tasks itself, and
//! once every task is done it closes the job, so a worker the OS has not scheduled (more threads
//! than free cores: another process, or a server's own threads) costs nothing. A job waits only
//! for workers that are inside it.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// How long an idle worker spins (a new job starts within nanoseconds) before it yields its
/// time slice to whatever else wants the core: longer than the gap between two jobs of one
/// token.
const SPIN: Duration = Duration::from_micros(50);
/// How long an idle worker keeps yielding before it parks (longer than the gap between two
/// tokens, shorter than a user's think time).
const YIELD: Duration = Duration::from_millis(3);
/// Spin iterations of the waiting caller before it starts yielding its time slice.
const SPIN_BEFORE_YIELD: u32 = 1 << 12;

struct Job {
    /// Lifetime erased: `run` does not return until every worker has finished with it.
    task: *const Task<'static>,
    n_tasks: usize,
}

struct Shared {
    /// Written only by `run` while no worker is busy; read by workers after they observe the
    /// new generation (release/acquire on `generation` orders the two).
    job: UnsafeCell<Option<Job>>,
    next_task: AtomicUsize,
    done_tasks: AtomicUsize,
    generation: AtomicU64,
    /// Whether workers may still join the current job (false once all its tasks are done).
    open: AtomicBool,
    /// Workers inside the current job.
    busy_workers: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written while all workers are idle (see `run`), and the task it points to
// is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as for `Sync`; every other field is itself `Send`.
unsafe impl Send for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serializes callers from different threads: one job at a time owns the workers.
    dispatch: Mutex<()>,
}

impl ThreadPool {
    /// A pool running work on `n_threads` threads in all (the caller counts as one).
    pub fn new(n_threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            next_task: AtomicUsize::new(0),
            done_tasks: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            open: AtomicBool::new(false),
            busy_workers: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = (1..n_threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("edgelm-worker-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawning a worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            dispatch: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Call `task(i)` for every `i` in `0..n_tasks`, spread over the pool; blocks until all ran.
    pub fn run(&self, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 {
            (0..n_tasks).for_each(task);
            return;
        }
        let _one_job = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: no worker is inside a job (the previous `run` closed its job and waited for
        // the workers in it; a late one sees it closed and never reads `job`), so nobody reads
        // `job` now. Erasing the task's lifetime is sound because this function waits below until
        // every worker is done with it.
        unsafe {
            *s.job.get() = Some(Job {
                task: std::mem::transmute::<&Task<'_>, *const Task<'static>>(task),
                n_tasks,
            });
        }
        s.next_task.store(0, Ordering::Relaxed);
        s.done_tasks.store(0, Ordering::Relaxed);
        s.open.store(true, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        drain(task, n_tasks, s);
        // Tasks other workers took; their outputs are visible once counted (release/acquire).
        wait_until(|| s.done_tasks.load(Ordering::Acquire) == n_tasks);
        // Close the job, then wait only for the workers that joined it (Dekker-style with the
        // worker's `busy_workers` increment and `open` check, both SeqCst).
        s.open.store(false, Ordering::SeqCst);
        wait_until(|| s.busy_workers.load(Ordering::SeqCst) == 0);
    }
}

/// Spin, then yield the time slice, until `done`.
fn wait_until(done: impl Fn() -> bool) {
    let mut spins = 0u32;
    while !done() {
        spins += 1;
        if spins < SPIN_BEFORE_YIELD {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

fn drain(task: &Task<'_>, n_tasks: usize, s: &Shared) {
    loop {
        let i = s.next_task.fetch_add(1, Ordering::Relaxed);
        if i >= n_tasks {
            break;
        }
        task(i);
        s.done_tasks.fetch_add(1, Ordering::Release);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        let mut idle = Duration::ZERO;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            if s.generation.load(Ordering::Acquire) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            // The clock is read once per 64 spins: a job still starts within nanoseconds.
            if spins.is_multiple_of(64) {
                idle = idle_since.elapsed();
            }
            if idle < SPIN {
                std::hint::spin_loop();
                continue;
            }
            if idle < YIELD {
                std::thread::yield_now();
                continue;
            }
            let mut guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            // Checked after announcing ourselves as a sleeper, so `run` either sees the sleeper
            // and notifies, or we see its new generation here.
            while s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst)
            {
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            break;
        }
        if s.shutdown.load(Ordering::Acquire) {
            return;
        }
        let generation = s.generation.load(Ordering::Acquire);
        if generation == seen {
            continue;
        }
        seen = generation;
        s.busy_workers.fetch_add(1, Ordering::SeqCst);
        // Joined only if the job is still this one and open; otherwise `run` may already be
        // writing the next job and `job` must not be read.
        if s.open.load(Ordering::SeqCst) && s.generation.load(Ordering::SeqCst) == seen {
            // SAFETY: `run` wrote the job before publishing this generation, and keeps it (and
            // the task it points to) alive until the workers inside the job have left.
            if let Some(job) = unsafe { &*s.job.get() } {
                // SAFETY: as above.
                drain(unsafe { &*job.task }, job.n_tasks, s);
            }
        }
        s.busy_workers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        let pool = ThreadPool::new(3);
        for n in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn many_jobs_in_a_row() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for _ in 0..20_000 {
            pool.run(4, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 20_000 * 6);
    }

    /// More threads than cores, beside a thread that keeps a core busy: every task still runs
    /// exactly once, job after job.
    #[test]
    fn oversubscribed_pool_runs_every_task_once() {
        let stop = Arc::new(AtomicBool::new(false));
        let hog = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let pool = ThreadPool::new(16);
        for n in [2, 5, 64] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
        stop.store(true, Ordering::Relaxed);
        hog.join().unwrap();
    }

    #[test]
    fn parked_workers_wake_for_new_jobs() {
        let pool = ThreadPool::new(2);
        let total = AtomicUsize::new(0);
        for _ in 0..3 {
            // Long enough for the worker to exhaust its spin budget and park.
            std::thread::sleep(std::time::Duration::from_millis(60));
            pool.run(64, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 3 * 64);
    }
}
