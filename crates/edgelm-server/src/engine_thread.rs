//! The engine thread: it owns the scheduler (which is not `Sync`) and so all compute. HTTP
//! handlers send it submissions over a channel and hear back, through a oneshot, whether the
//! request was accepted; accepted requests' events go to a per-request channel whose receiver
//! the handler (or its response stream) holds. Dropping that receiver cancels the request.

use crate::metrics::{EngineSnapshot, Metrics};
use edgelm_engine::{Event, Request, Scheduler, SessionError, Sink, SubmitError};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A request on its way to the scheduler.
pub struct Submission {
    pub request: Request,
    pub events: mpsc::UnboundedSender<Event>,
    /// When the HTTP request arrived (time to first token counts from here).
    pub arrived: Instant,
    pub reply: oneshot::Sender<Result<(), SubmitError>>,
}

/// What handlers ask of the engine thread.
pub enum Job {
    /// Boxed: a request is large, and a job waits in the channel by value.
    Generate(Box<Submission>),
    /// Saved or restored between two steps, never during one.
    Session(SessionJob),
}

pub struct SessionJob {
    pub action: SessionAction,
    pub path: PathBuf,
    /// Positions saved, or tokens restored.
    pub reply: oneshot::Sender<Result<usize, SessionError>>,
}

pub enum SessionAction {
    /// The cached prefix of these tokens.
    Save(Vec<u32>),
    /// Into the prefix cache.
    Restore,
}

/// Counts a request as open from acceptance until the scheduler drops its sink (finished,
/// failed or cancelled), whichever way it ends.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<AtomicUsize>) -> OpenGuard {
        open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Forwards a request's events to its HTTP side, timing tokens on the way.
struct EventSink {
    tx: mpsc::UnboundedSender<Event>,
    arrived: Instant,
    first_seen: bool,
    /// Per choice, when its last token was sent.
    last_token: Vec<Option<Instant>>,
    metrics: Arc<Metrics>,
    _open: OpenGuard,
}

impl Sink for EventSink {
    fn send(&mut self, event: Event) -> bool {
        let now = Instant::now();
        // An embedding has no first token: keep it out of the latency histograms.
        if matches!(event, Event::Embedding(_)) {
            self.first_seen = true;
        }
        if let Event::Token { choice, .. } | Event::Done { choice, .. } = event {
            if !self.first_seen {
                self.first_seen = true;
                self.metrics.ttft.observe(now - self.arrived);
            }
            if matches!(event, Event::Token { .. }) {
                if self.last_token.len() <= choice {
                    self.last_token.resize(choice + 1, None);
                }
                if let Some(prev) = self.last_token[choice].replace(now) {
                    self.metrics.itl.observe(now - prev);
                }
            }
        }
        self.tx.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// How many requests may be open at once: `parallel` running and `queue` waiting. The
/// scheduler admits waiting requests only when it steps, so a burst arriving between two
/// steps would otherwise find the queue full before any request got a running place.
pub struct Limits {
    pub parallel: usize,
    pub queue: usize,
}

/// Run the engine until every sender of `rx` is gone and the last request has finished.
pub fn run(mut sched: Scheduler, rx: Receiver<Job>, limits: Limits, metrics: Arc<Metrics>) {
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = limits.parallel.saturating_add(limits.queue);
    let publish = |s: &Scheduler| {
        metrics.publish(EngineSnapshot {
            waiting: s.n_waiting(),
            running: s.n_running(),
            kv: Some(s.kv_stats()),
            counters: s.counters(),
        })
    };
    let accept = |sched: &mut Scheduler, job: Job| {
        let s = match job {
            Job::Generate(s) => *s,
            Job::Session(j) => {
                let result = match j.action {
                    SessionAction::Save(tokens) => sched.save_session(&j.path, &tokens),
                    SessionAction::Restore => sched.load_session(&j.path).map(|t| t.len()),
                };
                let _ = j.reply.send(result);
                return;
            }
        };
        if s.events.is_closed() {
            return; // the client left while the submission was in the channel
        }
        let result = if open.load(Ordering::Relaxed) >= max_open {
            Err(SubmitError::QueueFull(limits.queue))
        } else {
            let sink = EventSink {
                tx: s.events,
                arrived: s.arrived,
                first_seen: false,
                last_token: Vec::new(),
                metrics: metrics.clone(),
                _open: OpenGuard::new(&open),
            };
            sched.submit(s.request, Box::new(sink))
        };
        let _ = s.reply.send(result);
    };
    publish(&sched);
    let mut senders_gone = false;
    loop {
        if sched.is_idle() {
            if senders_gone {
                break;
            }
            // Nothing to compute: sleep until a request comes.
            match rx.recv() {
                Ok(s) => accept(&mut sched, s),
                Err(_) => break,
            }
        }
        // Busy: take whatever arrived since the last step without waiting.
        loop {
            match rx.try_recv() {
                Ok(s) => accept(&mut sched, s),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    senders_gone = true;
                    break;
                }
            }
        }
        match sched.step() {
            Ok(0) if !sched.is_idle() => std::thread::sleep(Duration::from_millis(1)),
            Ok(_) => {}
            // The scheduler already told the requests of the failed batch.
            Err(e) => eprintln!("edgelm: a step of the engine failed: {e}"),
        }
        publish(&sched);
    }
    publish(&sched);
}
