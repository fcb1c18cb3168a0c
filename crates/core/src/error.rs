//! The single error type of stowage and its single mapping onto gRPC status codes.
//!
//! Every layer returns [`Error`]; only `From<Error> for tonic::Status` decides what the client
//! sees, so no failure can reach a CO as `UNKNOWN`.

/// Result with stowage's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, classified by what the caller can do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A required field is missing or a field has a value this driver does not accept.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named volume, path or publication does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A volume of that name exists with incompatible arguments, or a target is already used
    /// differently.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows the call (volume in use, wrong access mode…).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The requested capacity range cannot be served.
    #[error("{0}")]
    OutOfRange(String),
    /// The request cannot be served in the requested topology, or a pool is out of space.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another operation on the same volume is in flight, or a pagination token is stale.
    #[error("{0}")]
    Aborted(String),
    /// The RPC is not served in this mode or by this driver.
    #[error("{0}")]
    Unimplemented(String),
    /// The driver is not ready yet (start-up reconciliation still running) or is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// The driver or the kernel failed; the message names the operation and its arguments.
    #[error("{0}")]
    Internal(String),
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }

    /// Shorthand for [`Error::Internal`] with context.
    pub fn internal(context: impl std::fmt::Display, cause: impl std::fmt::Display) -> Self {
        Error::Internal(format!("{context}: {cause}"))
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::OutOfRange(_) => tonic::Code::OutOfRange,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::Aborted(_) => tonic::Code::Aborted,
            Error::Unimplemented(_) => tonic::Code::Unimplemented,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        // The spec requires `details` to be empty: code and message only.
        tonic::Status::new(err.code(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_own_code_and_keeps_the_message() {
        let table = [
            (Error::invalid("a"), tonic::Code::InvalidArgument),
            (Error::NotFound("b".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("c".into()), tonic::Code::AlreadyExists),
            (
                Error::FailedPrecondition("d".into()),
                tonic::Code::FailedPrecondition,
            ),
            (Error::OutOfRange("e".into()), tonic::Code::OutOfRange),
            (
                Error::ResourceExhausted("f".into()),
                tonic::Code::ResourceExhausted,
            ),
            (Error::Aborted("g".into()), tonic::Code::Aborted),
            (Error::Unimplemented("h".into()), tonic::Code::Unimplemented),
            (Error::Unavailable("i".into()), tonic::Code::Unavailable),
            (Error::internal("j", "k"), tonic::Code::Internal),
        ];
        for (err, code) in table {
            let msg = err.to_string();
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), msg);
            assert!(status.details().is_empty());
            assert_ne!(status.code(), tonic::Code::Unknown);
        }
    }
}
