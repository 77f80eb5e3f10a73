//! `edgelm serve` end to end on Qwen2.5-Coder 0.5B: the official `openai` Python client against
//! it (tests/serve_openai.py; tool calls and structured output in tests/serve_tools.py), a burst past `--parallel` + `--queue` (every accepted request
//! completes, the rest are refused, memory comes back), then a graceful stop that lets a
//! request in flight finish.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const MODEL: &str = "qwen2.5-coder-0.5b-instruct";
const KEY: &str = "edgelm-test-key";
const CTX: usize = 1024;
const PARALLEL: usize = 4;
const QUEUE: usize = 16;

/// Run a Python check script of tests/ against the server; its report is printed, and a failed
/// check fails the test with the script's errors and the server's log.
fn run_checks(python: &str, server: &Server, script: &str, args: &[&str]) {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {path}: {e}"));
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(
        out.status.success(),
        "{script} failed:\n{report}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
}

/// The server's `--session-dir`, which serve_openai.py also reads to damage a file.
fn session_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("edgelm-serve-sessions-{}", std::process::id()))
}

/// The server under test, and the figures the test reads off it.
struct Server(common::ServeProcess);

impl std::ops::Deref for Server {
    type Target = common::ServeProcess;
    fn deref(&self) -> &common::ServeProcess {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut common::ServeProcess {
        &mut self.0
    }
}

impl Server {
    fn start() -> Server {
        let (ctx, parallel, queue) = (CTX.to_string(), PARALLEL.to_string(), QUEUE.to_string());
        let mut args: Vec<std::ffi::OsString> = [
            "-t",
            "2",
            "--api-key",
            KEY,
            "--ctx",
            &ctx,
            "--parallel",
            &parallel,
            "--queue",
            &queue,
        ]
        .iter()
        .map(Into::into)
        .collect();
        args.extend(["--session-dir".into(), session_dir().into()]);
        let server = Server(common::ServeProcess::start(MODEL, &args));
        let deadline = Instant::now() + Duration::from_secs(60);
        while http(&server.addr, "GET", "/health", None).0 != 200 {
            assert!(Instant::now() < deadline, "/health never answered");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("reading the server's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a VmRSS line")
    }

    fn metric(&self, name: &str) -> f64 {
        metric(&self.addr, name)
    }

    fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.metric("edgelm_sequences_running") != 0.0
            || self.metric("edgelm_requests_waiting") != 0.0
            || self.metric("edgelm_kv_blocks_used") != 0.0
        {
            assert!(Instant::now() < deadline, "the server never went idle");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// `--context-shift`: a completion asking for more tokens than the context holds is served in
/// full (the context shifts), where without it the request is refused with 400.
#[test]
fn context_shift_serves_past_the_context() {
    let server = common::ServeProcess::start(
        MODEL,
        &[
            "-t",
            "2",
            "--ctx",
            "64",
            "--parallel",
            "1",
            "--context-shift",
            "--keep",
            "4",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while http(&server.addr, "GET", "/health", None).0 != 200 {
        assert!(Instant::now() < deadline, "/health never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let body = r#"{"prompt": "Count from one onwards:", "max_tokens": 150, "temperature": 0,
                   "ignore_eos": true}"#;
    let (status, _, answer) = http(&server.addr, "POST", "/v1/completions", Some(body));
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 150, "{answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{answer}");
}

/// Status, head and body of one request on its own connection.
fn http(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connecting to the server");
    send(&mut stream, method, path, body);
    common::read_response(stream)
}

fn send(stream: &mut TcpStream, method: &str, path: &str, body: Option<&str>) {
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).expect("sending a request");
}

fn metric(addr: &str, name: &str) -> f64 {
    let (status, _, body) = http(addr, "GET", "/metrics", None);
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Every accepted request of the burst generates exactly this many tokens.
const BURST_TOKENS: usize = 16;

fn burst_body() -> String {
    format!(
        r#"{{"model": "{MODEL}", "prompt": "The capital of France is", "max_tokens": {BURST_TOKENS},
            "temperature": 0, "ignore_eos": true}}"#
    )
}

#[test]
fn serve_openai_clients_burst_and_shutdown() {
    let python = std::env::var("EDGELM_PYTHON").expect(
        "EDGELM_PYTHON must name a Python with the openai package; scripts/test.sh makes one",
    );
    let server = Server::start();

    let base = format!("http://{}", server.addr);
    let session_dir = session_dir();
    let session_dir = session_dir.to_str().expect("a UTF-8 temporary directory");
    run_checks(
        &python,
        &server,
        "serve_openai.py",
        &[&base, KEY, MODEL, &CTX.to_string(), session_dir],
    );
    // Tool calls and structured output, validated with `jsonschema`.
    run_checks(&python, &server, "serve_tools.py", &[&base, KEY, MODEL]);

    burst(&server);
    graceful_shutdown(server);
}

/// 64 requests at once against 4 places and a queue of 16: 20 are accepted and complete, 44
/// are refused with 429, and resident memory ends where it began.
fn burst(server: &Server) {
    const N: usize = 64;
    let body = burst_body();
    let (status, _, warm) = http(&server.addr, "POST", "/v1/completions", Some(&body));
    assert_eq!(status, 200, "{warm}");
    server.wait_idle();
    let before = server.rss_kib();

    // Connect everyone first, then send together, so the whole burst lands within a step.
    let barrier = Arc::new(Barrier::new(N + 1));
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let mut stream = TcpStream::connect(&server.addr).expect("connecting");
            let (barrier, body) = (barrier.clone(), body.clone());
            std::thread::spawn(move || {
                barrier.wait();
                send(&mut stream, "POST", "/v1/completions", Some(&body));
                common::read_response(stream)
            })
        })
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (addr, done) = (server.addr.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut running, mut waiting) = (0.0f64, 0.0f64);
            while !done.load(Ordering::Relaxed) {
                running = running.max(metric(&addr, "edgelm_sequences_running"));
                waiting = waiting.max(metric(&addr, "edgelm_requests_waiting"));
                std::thread::sleep(Duration::from_millis(20));
            }
            (running, waiting)
        })
    };
    barrier.wait();
    let responses: Vec<(u16, String, String)> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    done.store(true, Ordering::Relaxed);
    let (max_running, max_waiting) = monitor.join().unwrap();

    let mut accepted = 0;
    let mut refused = 0;
    for (status, head, body) in &responses {
        let v: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
        match status {
            200 => {
                accepted += 1;
                assert_eq!(v["choices"][0]["finish_reason"], "length", "{body}");
                assert_eq!(v["usage"]["completion_tokens"], BURST_TOKENS, "{body}");
            }
            429 => {
                refused += 1;
                assert!(head.contains("\r\nretry-after: 1"), "{head}");
                assert_eq!(v["error"]["code"], "queue_full", "{body}");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(
        (accepted, refused),
        (PARALLEL + QUEUE, N - PARALLEL - QUEUE),
        "accepted / refused; server log:\n{}",
        server.log()
    );
    assert_eq!(max_running, PARALLEL as f64, "most sequences seen running");
    assert_eq!(max_waiting, QUEUE as f64, "most requests seen waiting");

    server.wait_idle();
    let after = server.rss_kib();
    let growth = after as f64 / before as f64 - 1.0;
    println!("burst: {accepted} accepted, {refused} refused; VmRSS {before} → {after} KiB");
    assert!(
        growth.abs() <= 0.10,
        "resident memory moved by {:.1}% over the burst ({before} → {after} KiB)",
        growth * 100.0
    );
}

/// SIGTERM lets an accepted request finish, then the server exits cleanly.
fn graceful_shutdown(mut server: Server) {
    let addr = server.addr.clone();
    let body = burst_body();
    let in_flight = std::thread::spawn(move || http(&addr, "POST", "/v1/completions", Some(&body)));
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.metric("edgelm_sequences_running") == 0.0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .expect("running kill");
    assert!(killed.success());
    let (status, _, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], BURST_TOKENS, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = server.child.try_wait().expect("waiting for the server") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit {exit:?}; log:\n{}", server.log());
    // The log is read by another thread; give it the last lines.
    std::thread::sleep(Duration::from_millis(100));
    assert!(server.log().contains("edgelm: stopped"), "{}", server.log());
}
