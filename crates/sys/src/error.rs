//! A syscall error that carries the operation and its arguments, so a log line says what
//! failed where (`openat2(<fd 5: /srv/pool>, "volumes/x"): ELOOP`).

use rustix::io::Errno;

/// Result of a syscall wrapper.
pub type SysResult<T> = Result<T, SysError>;

/// A failed syscall with its arguments.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{op}({args}): {errno}")]
pub struct SysError {
    /// The syscall or operation, e.g. `openat2`.
    pub op: &'static str,
    /// Its arguments, rendered for humans.
    pub args: String,
    /// What the kernel answered.
    pub errno: Errno,
}

impl SysError {
    /// Builds an error for `op` with rendered `args`.
    pub fn new(op: &'static str, args: impl Into<String>, errno: Errno) -> Self {
        Self {
            op,
            args: args.into(),
            errno,
        }
    }
}

/// A helper program (mkfs, a grow tool) that could not do its job.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{program} {}: {failure}{}", args.join(" "), stderr_suffix(stderr))]
pub struct ToolError {
    /// The program as run, e.g. `mkfs.ext4`.
    pub program: &'static str,
    /// Its arguments.
    pub args: Vec<String>,
    /// What went wrong.
    pub failure: ToolFailure,
    /// The end of what it wrote to stderr (trimmed; empty if nothing).
    pub stderr: String,
}

/// Why a [`ToolError`] happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolFailure {
    /// Not found in PATH: the named distribution package provides it.
    #[error("not installed (install the {package} package)")]
    Missing { package: &'static str },
    /// It could not be started for another reason.
    #[error("could not be started: {0}")]
    Spawn(Errno),
    /// It ran and exited with this non-zero status.
    #[error("exited with status {0}")]
    Exited(i32),
    /// It was killed by this signal (not by us).
    #[error("killed by signal {0}")]
    Signaled(i32),
    /// It ran longer than this many milliseconds and was killed.
    #[error("did not finish within {0} ms and was killed")]
    TimedOut(u64),
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}
