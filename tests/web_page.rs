//! The built-in chat page (`GET /` of `edgelm serve`) in a real browser: tests/web/chat_page.mjs
//! drives Debian's Chromium through playwright-core against a live server on SmolLM2-135M that
//! requires an API key. The page must ask for the key, stream answers, show tokens/s, stop an
//! answer mid-way, keep conversations across reloads and render markdown safely. Screenshots land
//! in target/web-artifacts/.
//!
//! Needs Node.js ≥ 20, `npm ci --prefix tests/web` and /usr/bin/chromium (`apt-get install
//! chromium`); scripts/test.sh sets these up. Missing ones fail the test, never skip it.

mod common;

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MODEL: &str = "smollm2-135m-instruct";
const KEY: &str = "edgelm-web-test-key";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The whole browser script; it has its own, shorter, per-step timeouts.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(360);

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web")
}

/// Node, playwright-core as pinned in tests/web/package.json, and Chromium, or a panic that
/// says what to install.
fn check_prerequisites() {
    let setup = "scripts/test.sh installs what is missing";
    let node = Command::new("node").arg("--version").output();
    let version = match node {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        _ => panic!(
            "`node` is not installed or does not run: install Node.js 20 or newer \
             (Debian: apt-get install nodejs npm)"
        ),
    };
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "node {version} is too old for playwright-core: install Node.js 20 or newer"
    );

    let read_json = |p: &Path| -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
    };
    let manifest = read_json(&web_dir().join("package.json")).expect("tests/web/package.json");
    let pinned = manifest["dependencies"]["playwright-core"]
        .as_str()
        .expect("playwright-core pinned in tests/web/package.json");
    let installed = read_json(&web_dir().join("node_modules/playwright-core/package.json"));
    let installed = installed.as_ref().and_then(|v| v["version"].as_str());
    assert!(
        installed == Some(pinned),
        "playwright-core {pinned} is not installed in tests/web/node_modules (found {installed:?}): \
         run `npm ci --prefix tests/web` ({setup})"
    );

    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Chromium (`apt-get install -y --no-install-recommends \
         chromium`; {setup})"
    );
}

/// Status, lower-cased head and body of a GET without credentials.
fn get(addr: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).expect("connecting to the server");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("sending a request");
    common::read_response(stream)
}

/// Runs `cmd` to the end or `timeout`, returning success and its stdout + stderr.
fn run_with_timeout(mut cmd: Command, timeout: Duration) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting node");
    let output = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|pipe| {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut out = output.lock().unwrap();
                out.push_str(&line);
                out.push('\n');
            }
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for node") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in readers {
        let _ = r.join();
    }
    let mut out = output.lock().unwrap().clone();
    if status.is_none() {
        out.push_str(&format!(
            "(killed: the script ran longer than {} s)\n",
            timeout.as_secs()
        ));
    }
    (status.is_some_and(|s| s.success()), out)
}

#[test]
fn chat_page_in_a_real_browser() {
    check_prerequisites();
    let server =
        common::ServeProcess::start(MODEL, &["-t", "2", "--ctx", "1024", "--api-key", KEY]);

    // The page itself needs no key; the API it calls does.
    let (status, head, body) = get(&server.addr, "/");
    assert_eq!(status, 200, "GET / without a key:\n{head}");
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(body.starts_with("<!doctype html>"), "GET / is not the page");
    assert_eq!(
        get(&server.addr, "/v1/models").0,
        401,
        "/v1/models without a key"
    );

    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("web-artifacts");
    let mut node = Command::new("node");
    node.arg(web_dir().join("chat_page.mjs"))
        .args([&format!("http://{}", server.addr), KEY])
        .env("EDGELM_WEB_ARTIFACTS", &artifacts)
        .current_dir(web_dir());
    let started = Instant::now();
    let (ok, output) = run_with_timeout(node, SCRIPT_TIMEOUT);
    println!("{output}");
    assert!(
        ok,
        "the browser test failed (tests/web/chat_page.mjs):\n{output}\nserver log:\n{}",
        server.log()
    );
    println!(
        "browser test: {:.1} s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        artifacts.display()
    );
}
