//! Readiness, and the HTTP listener of `--health-address` (`/healthz`, `/readyz`) and
//! `--metrics-address` (`/metrics`).
//!
//! Ready means: the metadata store answers, start-up reconciliation is done, and every pool's
//! directory is reachable and writable (for a static pool, reachable: its directories are the
//! operator's). The check creates nothing: it opens the directory the pool keeps its volumes
//! in, fstatvfs's it (a read-only mount fails) and asks faccessat `W_OK` with the effective
//! ids, a few syscalls per pool, cheap enough for a kubelet probe every few seconds. CSI
//! Probe answers the same check (`ready=false` exactly when `/readyz` is 503).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use stowage_core::config::PoolKind;
use stowage_core::{Error, Result};
use stowage_sys::fs as sysfs;
use tokio::net::TcpListener;

use crate::engine::Engine;
use crate::pool::Pool;

/// Why a pool cannot take new volumes now, if it cannot.
fn pool_problem(pool: &Pool) -> Option<String> {
    let fd = match pool.open_data_dir() {
        Ok(fd) => fd,
        Err(e) => return Some(format!("pool {:?} is not reachable: {e}", pool.name())),
    };
    let fd = std::os::fd::AsFd::as_fd(&fd);
    if pool.kind() == PoolKind::Static {
        return None;
    }
    match sysfs::fs_space(fd) {
        Err(e) => return Some(format!("pool {:?}: {e}", pool.name())),
        Ok(space) if space.read_only => {
            return Some(format!(
                "pool {:?} is on a read-only mount ({})",
                pool.name(),
                pool.data_dir().display()
            ))
        }
        Ok(_) => {}
    }
    sysfs::check_writable(fd)
        .err()
        .map(|e| format!("pool {:?} is not writable: {e}", pool.name()))
}

/// What keeps the driver from being ready; empty when it is.
pub fn readiness(engine: &Engine) -> Vec<String> {
    let mut problems = Vec::new();
    if !engine.is_ready() {
        problems.push("start-up reconciliation is not done".to_owned());
    }
    if let Err(e) = engine.store.ping() {
        problems.push(format!("the metadata store does not answer: {e}"));
    }
    problems.extend(engine.pools.values().filter_map(|p| pool_problem(p)));
    problems
}

/// The address a `--health-address` / `--metrics-address` value names: a bare port
/// (`9808`) or an address without a host (`:9808`) is the loopback interface; anything else
/// is bound as given (`0.0.0.0:9808`, `[::]:9808`, `localhost:9808`).
pub fn listen_address(value: &str) -> String {
    let value = value.trim();
    if let Some(port) = value.strip_prefix(':') {
        format!("127.0.0.1:{port}")
    } else if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        format!("127.0.0.1:{value}")
    } else {
        value.to_owned()
    }
}

/// Binds `value` (see [`listen_address`]).
pub async fn bind(value: &str, what: &str) -> Result<TcpListener> {
    let address = listen_address(value);
    TcpListener::bind(&address).await.map_err(|e| {
        Error::InvalidArgument(format!(
            "cannot listen on {address} ({what} address {value:?}): {e}"
        ))
    })
}

/// What one listener answers.
#[derive(Clone)]
pub struct Endpoints {
    pub engine: Arc<Engine>,
    /// `/healthz` and `/readyz`.
    pub health: bool,
    /// `/metrics`, encoding this registry.
    pub metrics: Option<Arc<Registry>>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("health", &self.health)
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Endpoints {
    async fn answer(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        }
        match req.uri().path() {
            "/healthz" if self.health => text(StatusCode::OK, "ok\n".into()),
            "/readyz" if self.health => {
                let engine = Arc::clone(&self.engine);
                // A few syscalls per pool, but a hung filesystem must not hold a worker.
                match tokio::task::spawn_blocking(move || readiness(&engine)).await {
                    Ok(problems) if problems.is_empty() => text(StatusCode::OK, "ready\n".into()),
                    Ok(problems) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{}\n", problems.join("\n")),
                    ),
                    Err(e) => text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("readiness check failed: {e}\n"),
                    ),
                }
            }
            "/metrics" if self.metrics.is_some() => {
                let registry = Arc::clone(self.metrics.as_ref().expect("checked"));
                match tokio::task::spawn_blocking(move || crate::metrics::encode(&registry)).await {
                    Ok(body) => {
                        let mut r = text(StatusCode::OK, body);
                        r.headers_mut().insert(
                            hyper::header::CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                        );
                        r
                    }
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding metrics failed: {e}\n"),
                    ),
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

/// Serves `endpoints` on `listener` until the task is aborted. Each connection is HTTP/1.1;
/// a client that sends no request head within 10 s is dropped.
pub async fn serve_http(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let (stream, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "health/metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, std::convert::Infallible>(endpoints.answer(req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "health/metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_host_are_loopback() {
        assert_eq!(listen_address("9808"), "127.0.0.1:9808");
        assert_eq!(listen_address(":9808"), "127.0.0.1:9808");
        assert_eq!(listen_address("0.0.0.0:9808"), "0.0.0.0:9808");
        assert_eq!(listen_address("[::]:9808"), "[::]:9808");
        assert_eq!(listen_address("localhost:1"), "localhost:1");
    }
}
