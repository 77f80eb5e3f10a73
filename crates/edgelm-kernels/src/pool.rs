//! A persistent fork/join pool: `run(n, f)` calls `f(0..n)` across the workers and the caller,
//! returning when all calls are done. Decoding a small model dispatches a few hundred jobs per
//! token, so wake-up latency matters as much as the kernels: idle workers spin on an atomic
//! generation counter for a while (a new job starts within nanoseconds) and only then park on a
//! condvar; the caller spins for the last worker to finish instead of sleeping.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// Spin iterations before an idle worker parks (a few milliseconds: longer than the gap between
/// two jobs of one token, shorter than a user's think time).
const SPIN_BEFORE_PARK: u32 = 1 << 16;
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
    generation: AtomicU64,
    busy_workers: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is only written while all workers are idle (see `run`), and the task it points to
// is `Sync`.
unsafe impl Sync for Shared {}
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
            generation: AtomicU64::new(0),
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
        // SAFETY: no worker is busy (the previous `run` waited for all of them), so nobody reads
        // `job` now. Erasing the task's lifetime is sound because this function waits below until
        // every worker is done with it.
        unsafe {
            *s.job.get() = Some(Job {
                task: std::mem::transmute::<&Task<'_>, *const Task<'static>>(task),
                n_tasks,
            });
        }
        s.next_task.store(0, Ordering::Relaxed);
        s.busy_workers.store(self.workers.len(), Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        drain(task, n_tasks, &s.next_task);
        let mut spins = 0u32;
        while s.busy_workers.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_BEFORE_YIELD {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

fn drain(task: &Task<'_>, n_tasks: usize, next: &AtomicUsize) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n_tasks {
            break;
        }
        task(i);
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            if s.generation.load(Ordering::Acquire) != seen {
                break;
            }
            spins += 1;
            if spins < SPIN_BEFORE_PARK {
                std::hint::spin_loop();
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
            spins = 0;
        }
        seen = s.generation.load(Ordering::Acquire);
        // SAFETY: `run` wrote the job before publishing this generation and keeps it (and the
        // task it points to) alive until `busy_workers` drops to zero.
        if let Some(job) = unsafe { &*s.job.get() } {
            // SAFETY: as above.
            drain(unsafe { &*job.task }, job.n_tasks, &s.next_task);
        }
        s.busy_workers.fetch_sub(1, Ordering::Release);
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
