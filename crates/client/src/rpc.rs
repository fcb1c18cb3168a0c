//! Helpers shared by `ctl` and `bench` for issuing one unary RPC with a deadline.

use std::future::Future;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::secrets::Secrets;
use crate::size::format_duration;

/// Wraps `message` in a request that carries `timeout` as its gRPC deadline, so a driver
/// that honours `grpc-timeout` can stop working on a call nobody waits for anymore.
///
/// The deadline sent is slightly later than the one [`unary`] enforces locally: otherwise
/// the two race, and some servers (tonic among them) report their expiry as CANCELLED,
/// which would make the exit code depend on which timer fired first.
pub(crate) fn request<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    let margin = (timeout / 10).max(Duration::from_millis(100));
    request.set_timeout(timeout.saturating_add(margin));
    request
}

/// Awaits an RPC for at most `timeout`. The client enforces the deadline itself because a
/// driver is free to ignore `grpc-timeout`; expiry becomes `DEADLINE_EXCEEDED` so it maps
/// to the same exit code as a server-side deadline.
pub(crate) async fn unary<T, F>(timeout: Duration, call: F) -> Result<T, Status>
where
    F: Future<Output = Result<Response<T>, Status>>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no response within {}",
            format_duration(timeout)
        ))),
    }
}

/// `NOT_FOUND: volume "x" does not exist`, with any secret values scrubbed from the
/// driver's message.
pub(crate) fn describe_status(status: &Status, secrets: &Secrets) -> String {
    let name = crate::exit::code_name(status.code());
    let message = secrets.redact(status.message());
    if message.is_empty() {
        name.to_owned()
    } else {
        format!("{name}: {message}")
    }
}

/// True when a failed call may nevertheless have taken effect on the driver (the request
/// might have been processed before the error was produced), so the caller must assume
/// the worst and clean up by name.
pub(crate) fn outcome_unknown(status: &Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unavailable
            | Code::Unknown
            | Code::Internal
    )
}
