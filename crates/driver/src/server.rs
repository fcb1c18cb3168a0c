//! Start-up and the Unix-socket server: open the store and the pools, bind the socket, answer
//! Probe with ready=false until reconciliation finishes, and drain on SIGTERM/SIGINT.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stowage_core::config::Config;
use stowage_core::{Error, Result};
use stowage_csi::v1::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use stowage_sys::{Kernel, LinuxKernel};
use tokio::net::UnixListener;

use crate::authority::AuthorityFix;

use crate::engine::{Engine, Identity};
use crate::pool::Pool;
use crate::service::{Driver, Mode};
use crate::store::Store;

/// How often the pools' background upkeep runs ([`crate::pool::PoolBackend::tidy`]).
const TIDY_INTERVAL: Duration = Duration::from_secs(5);
/// How long shutdown waits for calls in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How long nothing must be in flight before a draining server exits (see [`serve`]).
const DRAIN_LINGER: Duration = Duration::from_millis(50);

/// Everything `stowage serve` is told.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `unix:///abs/path` (or a bare absolute path).
    pub endpoint: String,
    pub node_id: String,
    pub driver_name: String,
    pub state_dir: PathBuf,
    /// Parsed configuration; `None` means the embedded default.
    pub config: Option<Config>,
    pub mode: Mode,
    /// Directories node requests' paths must lie under.
    pub kubelet_dirs: Vec<PathBuf>,
    /// Whether ControllerExpandVolume is offered (see [`Engine::controller_expansion`]).
    pub controller_expansion: bool,
    /// Period of [`Engine::watch_volumes`]; zero: never in the background.
    pub watch_interval: Duration,
    /// Group that may connect to the socket (mode 0660); None: root alone (0600).
    pub socket_group: Option<u32>,
    /// Where `/metrics` is served (`--metrics-address`); None: nowhere.
    pub metrics_address: Option<String>,
    /// Where `/healthz` and `/readyz` are served (`--health-address`); None: nowhere.
    pub health_address: Option<String>,
}

/// The socket path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "endpoint {endpoint:?} must be unix:///absolute/path"
        )));
    }
    Ok(path.to_owned())
}

/// Opens the state directory, the store and the pools into an engine (not yet reconciled).
pub fn build_engine(opts: &ServeOptions, kernel: Arc<dyn Kernel>) -> Result<Engine> {
    std::fs::create_dir_all(&opts.state_dir).map_err(|e| {
        Error::internal(
            format!("creating state dir {}", opts.state_dir.display()),
            e,
        )
    })?;
    let config = opts
        .config
        .clone()
        .unwrap_or_else(|| Config::embedded_default(&opts.state_dir));
    config.check()?;
    let store = Store::open(&opts.state_dir.join("stowage.db"))?;
    let pools = config
        .pools
        .iter()
        .map(|p| Pool::open(p, Arc::clone(&kernel)))
        .collect::<Result<Vec<_>>>()?;
    let identity = Identity {
        node_id: opts.node_id.clone(),
        topology_key: format!("{}/node", opts.driver_name),
    };
    let mut engine = Engine::new(store, pools, identity, kernel)?;
    engine.max_volumes_per_node = config.max_volumes_per_node;
    engine.kubelet_dirs = opts.kubelet_dirs.clone();
    engine.controller_expansion = opts.controller_expansion;
    Ok(engine)
}

/// Binds the socket: a stale socket file from an earlier run is replaced, anything else at
/// that path is refused. The socket is made 0600 (its owner, root, alone), or 0660 with group
/// `group` when one is configured (`--socket-group`, for sidecars that do not run as root).
fn bind(path: &Path, group: Option<u32>) -> Result<UnixListener> {
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            // Made owner/group-only, so the socket is never reachable by others, not even in
            // the instant between bind and chmod.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(parent)
                .map_err(|e| Error::internal(format!("creating {}", parent.display()), e))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(|e| {
                    Error::internal(format!("removing stale socket {}", path.display()), e)
                })?;
            } else {
                return Err(Error::FailedPrecondition(format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::internal(format!("checking {}", path.display()), e)),
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::internal(format!("binding {}", path.display()), e))?;
    // The directory keeps others out until the mode is set (see above).
    let mode = match group {
        None => 0o600,
        Some(gid) => {
            std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| {
                Error::internal(format!("chown {} to group {gid}", path.display()), e)
            })?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::internal(format!("chmod {}", path.display()), e))?;
    Ok(listener)
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight calls finish and
/// removes the socket.
pub async fn serve(opts: ServeOptions, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let path = socket_path(&opts.endpoint)?;
    let engine = Arc::new(build_engine(&opts, Arc::new(LinuxKernel))?);
    // Before the socket: a taken port is an error at start, with no socket left behind.
    let http = serve_http_endpoints(&opts, &engine).await?;
    let listener = bind(&path, opts.socket_group)?;
    tracing::info!(
        endpoint = %opts.endpoint, node = %opts.node_id, driver = %opts.driver_name,
        mode = ?opts.mode, version = env!("CARGO_PKG_VERSION"), "serving CSI"
    );

    // Reconcile in the background: Probe answers ready=false until it is done. If it fails
    // (the store is unreadable), the driver says why and stops, so its supervisor restarts it
    // instead of a driver that is never ready and never says why.
    let reconciling = Arc::clone(&engine);
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<Error>();
    crate::recorder::recorder().reconcile("running", None);
    tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        hold_reconciliation_for_tests();
        let outcome = reconciling.reconcile();
        let took = started.elapsed();
        match outcome {
            Ok(()) => {
                crate::recorder::recorder().reconcile("done", Some(took));
                tracing::info!(
                    duration_ms = took.as_micros() as f64 / 1e3,
                    "reconciled; ready"
                )
            }
            Err(e) => {
                crate::recorder::recorder().reconcile("failed", Some(took));
                tracing::error!(error = %e, "start-up reconciliation failed; stopping");
                let _ = failed_tx.send(e);
            }
        }
    });
    // The background watch of volumes whose kind asks for one (btrfs: nested subvolumes put
    // back under their volume's qgroup), once reconciled; stopped when serving ends.
    let watch = (!opts.watch_interval.is_zero()).then(|| {
        every(
            &engine,
            opts.watch_interval,
            "the background volume watch",
            |engine| {
                engine.watch_volumes();
            },
        )
    });
    // The pools' own upkeep (btrfs: qgroups of destroyed subvolumes the kernel left), always
    // on, whatever --watch-interval says; stopped when serving ends.
    let tidy = every(
        &engine,
        TIDY_INTERVAL,
        "the pools' background upkeep",
        Engine::tidy_pools,
    );
    let mut reconcile_failed: Option<Error> = None;
    let shutdown = async {
        tokio::pin!(shutdown);
        tokio::select! {
            () = &mut shutdown => {}
            failed = failed_rx => match failed {
                Ok(e) => reconcile_failed = Some(e),
                // Reconciliation succeeded (the sender is gone): wait for the real signal.
                Err(_) => shutdown.await,
            },
        }
    };

    let driver = Driver::new(Arc::clone(&engine), &opts.driver_name, opts.mode);
    let (stop_accepting, stopped) = tokio::sync::watch::channel(false);
    // Connections are accepted here, not inside the server, so that a drain closes the
    // listening socket at once: a client connecting during the drain is refused by the kernel
    // (nothing sent, plainly retryable) instead of waiting in the listen backlog until the
    // process exits and resets it. Every connection goes through the :authority adapter, so
    // clients that send the socket path (raw or percent-encoded) as :authority are served
    // too (authority.rs).
    let (accepted, incoming) = tokio::sync::mpsc::channel(16);
    let mut stop = stopped.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                conn = listener.accept() => {
                    let conn = conn.map(|(stream, _)| AuthorityFix::new(stream));
                    if accepted.send(conn).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let incoming = tokio_stream::wrappers::ReceiverStream::new(incoming);
    let counting = driver.clone();
    let server = tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(move |routes| {
            counting.counting(routes)
        }))
        .add_service(IdentityServer::new(driver.clone()))
        .add_service(ControllerServer::new(driver.clone()))
        .add_service(NodeServer::new(driver.clone()))
        .serve_with_incoming_shutdown(incoming, async move {
            let mut stopped = stopped;
            let _ = stopped.changed().await;
        });
    tokio::pin!(server);
    let served = tokio::select! {
        served = &mut server => served,
        () = shutdown => {
            // Stop accepting, then wait for the calls in flight; idle connections that a CO
            // keeps open do not hold the exit up.
            let _ = stop_accepting.send(true);
            let _ = std::fs::remove_file(&path);
            let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
            // A call counts as done when its handler returns, a moment before tonic has
            // encoded and written its answer: exit only once nothing has been in flight for
            // DRAIN_LINGER, so the last answers reach their clients.
            let mut idle_since: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    served = &mut server => break served,
                    () = tokio::time::sleep(Duration::from_millis(10)) => {
                        let now = tokio::time::Instant::now();
                        if driver.in_flight() > 0 {
                            idle_since = None;
                        } else if now.duration_since(*idle_since.get_or_insert(now)) >= DRAIN_LINGER {
                            break Ok(());
                        }
                        if tokio::time::Instant::now() >= deadline {
                            tracing::warn!(in_flight = driver.in_flight(), "calls still running after the drain limit; exiting anyway");
                            break Ok(());
                        }
                    }
                }
            }
        }
    };
    let _ = std::fs::remove_file(&path);
    if let Some(watch) = watch {
        watch.abort();
    }
    tidy.abort();
    for task in http {
        task.abort();
    }
    served.map_err(|e| Error::internal("gRPC server", e))?;
    if let Some(e) = reconcile_failed {
        return Err(e);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Binds `--health-address` and `--metrics-address` (one listener when both name the same
/// address) and serves them in the background; the tasks are aborted when serving ends.
async fn serve_http_endpoints(
    opts: &ServeOptions,
    engine: &Arc<Engine>,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let norm = |a: &Option<String>| a.as_deref().map(crate::health::listen_address);
    let (health, metrics) = (norm(&opts.health_address), norm(&opts.metrics_address));
    let registry = metrics
        .as_ref()
        .map(|_| Arc::new(crate::metrics::registry(Arc::clone(engine))));
    let mut listeners = Vec::new();
    if let Some(address) = &health {
        let shared = metrics.as_ref() == Some(address);
        listeners.push((address.clone(), true, shared));
    }
    if let Some(address) = &metrics {
        if health.as_ref() != Some(address) {
            listeners.push((address.clone(), false, true));
        }
    }
    let mut tasks = Vec::new();
    for (address, health, with_metrics) in listeners {
        let what = match (health, with_metrics) {
            (true, true) => "health and metrics",
            (true, false) => "health",
            _ => "metrics",
        };
        let listener = crate::health::bind(&address, what).await?;
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or(address);
        let paths = match (health, with_metrics) {
            (true, true) => "/healthz /readyz /metrics",
            (true, false) => "/healthz /readyz",
            _ => "/metrics",
        };
        tracing::info!(address = %local, paths, "serving {what} over HTTP");
        let endpoints = crate::health::Endpoints {
            engine: Arc::clone(engine),
            health,
            metrics: registry.clone().filter(|_| with_metrics),
        };
        tasks.push(tokio::spawn(crate::health::serve_http(listener, endpoints)));
    }
    Ok(tasks)
}

/// For the readiness tests: `STOWAGE_TEST_HOLD_RECONCILE=<file>` holds start-up
/// reconciliation while that file exists (60 s at most), so a test can see the driver
/// before it is ready. Unset (always, outside those tests), it costs one lookup at start.
fn hold_reconciliation_for_tests() {
    let Some(file) = std::env::var_os("STOWAGE_TEST_HOLD_RECONCILE") else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while Path::new(&file).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `work` on a blocking thread every `period` once the engine is ready, until the
/// returned task is aborted; a round that panics is logged as `what` failing.
fn every(
    engine: &Arc<Engine>,
    period: Duration,
    what: &'static str,
    work: fn(&Engine),
) -> tokio::task::JoinHandle<()> {
    let engine = Arc::clone(engine);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !engine.is_ready() {
                continue;
            }
            let engine = Arc::clone(&engine);
            if let Err(e) = tokio::task::spawn_blocking(move || work(&engine)).await {
                tracing::warn!(error = %e, "{what} failed");
            }
        }
    })
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; stop the driver with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}
