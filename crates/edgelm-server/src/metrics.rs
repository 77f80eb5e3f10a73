//! `/metrics` in Prometheus' text format. HTTP counts are kept here by the middleware; latency
//! histograms are observed by the engine thread's sinks; engine figures (queue, running,
//! tokens, KV blocks) come from the snapshot the engine thread publishes after every step.

use edgelm_engine::Counters;
use edgelm_models::KvStats;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A fixed-bucket histogram updated without locks.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one for observations above every bound.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.partition_point(|&b| b < s);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut total = 0;
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {total}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
                }
            }
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

/// What the engine thread last published.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineSnapshot {
    pub waiting: usize,
    pub running: usize,
    pub kv: Option<KvStats>,
    pub counters: Counters,
}

pub struct Metrics {
    /// Responses by (endpoint, status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub engine: Mutex<EngineSnapshot>,
}

const TTFT_BOUNDS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const ITL_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            ttft: Histogram::new(TTFT_BOUNDS),
            itl: Histogram::new(ITL_BOUNDS),
            engine: Mutex::new(EngineSnapshot::default()),
        }
    }
}

impl Metrics {
    /// Count a response. `endpoint` is one of the served paths or "other", so label values
    /// stay few whatever clients send.
    pub fn count(&self, endpoint: &'static str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((endpoint, status)).or_insert(0) += 1;
    }

    pub fn publish(&self, snap: EngineSnapshot) {
        *self.engine.lock().unwrap_or_else(|p| p.into_inner()) = snap;
    }

    pub fn snapshot(&self) -> EngineSnapshot {
        *self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        out.push_str(
            "# HELP edgelm_requests_total HTTP responses by endpoint and status code.\n\
             # TYPE edgelm_requests_total counter\n",
        );
        for ((endpoint, status), n) in requests {
            let _ = writeln!(
                out,
                "edgelm_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let e = self.snapshot();
        let mut metric = |name: &str, ty: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {ty}\n{name} {value}"
            );
        };
        let c = e.counters;
        metric(
            "edgelm_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests (reused ones included).",
            c.prompt_tokens,
        );
        metric(
            "edgelm_reused_tokens_total",
            "counter",
            "Prompt tokens whose keys and values came from the prefix cache.",
            c.reused_tokens,
        );
        metric(
            "edgelm_generated_tokens_total",
            "counter",
            "Tokens generated.",
            c.generated_tokens,
        );
        metric(
            "edgelm_steps_total",
            "counter",
            "Forward passes (batches) run.",
            c.steps,
        );
        metric(
            "edgelm_requests_waiting",
            "gauge",
            "Requests queued for a place.",
            e.waiting as u64,
        );
        metric(
            "edgelm_sequences_running",
            "gauge",
            "Sequences running (each choice of a request counts one).",
            e.running as u64,
        );
        let kv = e.kv.unwrap_or(KvStats {
            block_len: 0,
            blocks: 0,
            used: 0,
            cached: 0,
            capacity: 0,
            sequences: 0,
        });
        metric(
            "edgelm_kv_blocks_total",
            "gauge",
            "KV cache blocks in the pool.",
            kv.blocks as u64,
        );
        metric(
            "edgelm_kv_blocks_used",
            "gauge",
            "KV cache blocks held by running sequences.",
            kv.used as u64,
        );
        metric(
            "edgelm_kv_blocks_free",
            "gauge",
            "KV cache blocks no sequence holds (cached ones included: they are reused on demand).",
            kv.blocks.saturating_sub(kv.used) as u64,
        );
        metric(
            "edgelm_kv_blocks_cached",
            "gauge",
            "Free KV cache blocks kept for the prefix cache.",
            kv.cached as u64,
        );
        metric(
            "edgelm_kv_block_positions",
            "gauge",
            "Token positions per KV cache block.",
            kv.block_len as u64,
        );
        self.ttft.render(
            &mut out,
            "edgelm_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        self.itl.render(
            &mut out,
            "edgelm_inter_token_latency_seconds",
            "Between consecutive tokens of one choice.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(100));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 5.65\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
    }

    #[test]
    fn render_lists_every_family() {
        let m = Metrics::default();
        m.count("/v1/completions", 200);
        m.count("/v1/completions", 429);
        m.count("/v1/completions", 200);
        let text = m.render();
        assert!(
            text.contains("edgelm_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 2\n")
        );
        for name in [
            "edgelm_prompt_tokens_total",
            "edgelm_generated_tokens_total",
            "edgelm_reused_tokens_total",
            "edgelm_requests_waiting",
            "edgelm_sequences_running",
            "edgelm_kv_blocks_used",
            "edgelm_kv_blocks_free",
            "edgelm_time_to_first_token_seconds_bucket",
            "edgelm_inter_token_latency_seconds_count",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
