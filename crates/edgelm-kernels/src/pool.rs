//! A persistent fork/join pool: `run(n, f)` calls `f(0..n)` across the workers and the caller,
//! returning when all calls are done. Workers park on a condvar between jobs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Job {
    /// Lifetime erased: `run` does not return until every worker has finished with it.
    task: *const Task<'static>,
    n_tasks: usize,
    next: Arc<AtomicUsize>,
}

// SAFETY: the pointee is `Sync` and outlives the job (see `run`).
unsafe impl Send for Job {}

struct State {
    job: Option<Job>,
    generation: u64,
    busy_workers: usize,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ThreadPool {
    /// A pool running work on `n_threads` threads in all (the caller counts as one).
    pub fn new(n_threads: usize) -> ThreadPool {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                job: None,
                generation: 0,
                busy_workers: 0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
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
        ThreadPool { shared, workers }
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
        let next = Arc::new(AtomicUsize::new(0));
        {
            let mut st = lock(&self.shared.state);
            // SAFETY: erasing the lifetime is sound because this function waits below until
            // `busy_workers` is zero and the job is cleared, so no worker holds the pointer after
            // `task` goes out of scope.
            let task: *const Task<'static> = unsafe { std::mem::transmute(task) };
            st.job = Some(Job {
                task,
                n_tasks,
                next: next.clone(),
            });
            st.generation += 1;
            st.busy_workers = self.workers.len();
        }
        self.shared.wake.notify_all();
        drain(task, n_tasks, &next);
        let mut st = lock(&self.shared.state);
        while st.busy_workers > 0 {
            st = self.shared.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.job = None;
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

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        let (task, n_tasks, next) = {
            let mut st = lock(&shared.state);
            while st.generation == seen && !st.shutdown {
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            match &st.job {
                Some(job) => (job.task, job.n_tasks, job.next.clone()),
                None => continue,
            }
        };
        // SAFETY: `run` keeps the task alive until this worker decrements `busy_workers`.
        drain(unsafe { &*task }, n_tasks, &next);
        let mut st = lock(&shared.state);
        st.busy_workers -= 1;
        if st.busy_workers == 0 {
            shared.done.notify_all();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        lock(&self.shared.state).shutdown = true;
        self.shared.wake.notify_all();
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
        for _ in 0..2000 {
            pool.run(4, &|i| {
                total.fetch_add(i, Ordering::Relaxed);
            });
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 6);
    }
}
