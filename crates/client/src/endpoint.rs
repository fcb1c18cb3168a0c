//! Connecting to a CSI endpoint.
//!
//! The CSI spec only allows Unix domain sockets (`unix:///path/to/csi.sock`), which gRPC
//! over HTTP/2 does not know about, so the channel is built with a custom connector that
//! opens a `tokio::net::UnixStream`; the URI tonic sees is a placeholder that only ends up
//! in the `:authority` header. `tcp://host:port` and `http://host:port` are accepted as well
//! for drivers reached through a TCP proxy.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Upper bound on establishing the connection; a CSI socket either answers at once or the
/// driver is not running, so waiting longer only delays the error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Authority sent to the driver for Unix sockets. gRPC implementations use `localhost`.
const UDS_PLACEHOLDER_URI: &str = "http://localhost";

/// Where to connect, parsed from an endpoint string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Unix domain socket path.
    Unix(PathBuf),
    /// An `http://host:port` URI (from `tcp://` or `http://`).
    Http(String),
}

/// Failure to connect to an endpoint.
#[derive(Debug)]
pub enum ConnectError {
    /// The endpoint string is not a supported URI.
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint is valid but the connection failed.
    Transport {
        /// The endpoint as given.
        endpoint: String,
        /// The underlying error, with its causes.
        source: tonic::transport::Error,
    },
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidEndpoint { endpoint, reason } => {
                write!(f, "invalid endpoint {endpoint:?}: {reason}")
            }
            Self::Transport { endpoint, source } => {
                // tonic's own Display is just "transport error"; the useful part (e.g.
                // "No such file or directory") is further down the source chain.
                write!(f, "cannot connect to {endpoint}: {}", error_chain(source))
            }
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::InvalidEndpoint { .. } => None,
            Self::Transport { source, .. } => Some(source),
        }
    }
}

impl ConnectError {
    /// True when the endpoint string itself is malformed (a usage error), as opposed to a
    /// driver that cannot be reached.
    pub fn is_invalid_endpoint(&self) -> bool {
        matches!(self, Self::InvalidEndpoint { .. })
    }
}

/// Joins an error and its sources with `: `, skipping repeated messages.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// Parses an endpoint string.
///
/// Accepted forms: `unix:///abs/path`, `unix:/abs/path`, `unix:relative/path`, a bare
/// absolute path, `tcp://host:port` and `http://host:port`.
pub fn parse(endpoint: &str) -> Result<Target, ConnectError> {
    let invalid = |reason: &str| ConnectError::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    if let Some(rest) = endpoint.strip_prefix("unix:") {
        let path = match rest.strip_prefix("//") {
            // unix://host/path is not meaningful: after "//" there must be the absolute path.
            Some(abs) if abs.starts_with('/') => abs,
            Some(_) => return Err(invalid("expected unix:///absolute/path")),
            None => rest,
        };
        if path.is_empty() {
            return Err(invalid("empty socket path"));
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    if endpoint.starts_with('/') {
        return Ok(Target::Unix(PathBuf::from(endpoint)));
    }
    let host_port = endpoint
        .strip_prefix("tcp://")
        .or_else(|| endpoint.strip_prefix("http://"));
    match host_port {
        Some(hp) if !hp.is_empty() => Ok(Target::Http(format!("http://{hp}"))),
        Some(_) => Err(invalid("missing host:port")),
        None if endpoint.starts_with("https://") => Err(invalid(
            "TLS is not supported; CSI endpoints are Unix sockets (unix:///path)",
        )),
        None => Err(invalid(
            "expected unix:///path/to/csi.sock, tcp://host:port or http://host:port",
        )),
    }
}

/// Connects to a CSI endpoint (`unix:///abs/path`, `tcp://host:port`, `http://host:port`).
///
/// The connection is established eagerly so that an unreachable driver is reported here,
/// not at the first RPC.
pub async fn connect(endpoint: &str) -> Result<Channel, ConnectError> {
    let transport = |source| ConnectError::Transport {
        endpoint: endpoint.to_owned(),
        source,
    };
    match parse(endpoint)? {
        Target::Unix(path) => {
            let connector = tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move { UnixStream::connect(path).await.map(TokioIo::new) }
            });
            Endpoint::from_static(UDS_PLACEHOLDER_URI)
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(connector)
                .await
                .map_err(transport)
        }
        Target::Http(uri) => {
            let ep = Endpoint::from_shared(uri).map_err(|e| ConnectError::InvalidEndpoint {
                endpoint: endpoint.to_owned(),
                reason: error_chain(&e),
            })?;
            ep.connect_timeout(CONNECT_TIMEOUT)
                .connect()
                .await
                .map_err(transport)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        let unix = |p: &str| Some(Target::Unix(PathBuf::from(p)));
        assert_eq!(parse("unix:///run/csi.sock").ok(), unix("/run/csi.sock"));
        assert_eq!(parse("unix:/run/csi.sock").ok(), unix("/run/csi.sock"));
        assert_eq!(parse("unix:csi.sock").ok(), unix("csi.sock"));
        assert_eq!(parse("/run/csi.sock").ok(), unix("/run/csi.sock"));
        assert_eq!(
            parse("tcp://127.0.0.1:10000").ok(),
            Some(Target::Http("http://127.0.0.1:10000".into()))
        );
        assert_eq!(
            parse("http://[::1]:10000").ok(),
            Some(Target::Http("http://[::1]:10000".into()))
        );
        for bad in [
            "unix://",
            "unix://host/x",
            "unix:",
            "https://x:1",
            "tcp://",
            "csi.sock",
        ] {
            assert!(
                parse(bad).is_err_and(|e| e.is_invalid_endpoint()),
                "{bad} should be invalid"
            );
        }
    }

    #[tokio::test]
    async fn missing_socket_is_a_transport_error_with_cause() {
        let dir = tempfile::tempdir().unwrap();
        let ep = format!("unix://{}/nope.sock", dir.path().display());
        let e = connect(&ep).await.unwrap_err();
        assert!(!e.is_invalid_endpoint());
        let text = e.to_string();
        assert!(text.contains("No such file"), "{text}");
    }
}
