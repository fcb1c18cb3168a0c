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
