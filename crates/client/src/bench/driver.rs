//! The driver benchmark: plan from capabilities, set up, run workers, clean up, report.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::controller_service_capability::rpc::Type as ControllerCap;
use stowage_csi::v1::identity_client::IdentityClient;
use stowage_csi::v1::node_client::NodeClient;
use stowage_csi::v1::node_service_capability::rpc::Type as NodeCap;
use stowage_csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use stowage_csi::v1::{self as csi, controller_service_capability, node_service_capability};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tracing::debug;

use super::cancel::CancelToken;
use super::progress::Progress;
use super::registry::{Context, Created, Registry, Staged};
use super::rss::{read_peak_rss, read_rss};
use super::stats::{rate, write_table, CallSummary, Recorder};
use super::{BenchArgs, Options, Workload};
use crate::args::{kv_map, OutputFormat};
use crate::exit;
use crate::output::{write_json, Fields};
use crate::rpc::{describe_status, outcome_unknown, request, unary};
use crate::secrets::Secrets;
use crate::size::format_size;

/// Attempts per cleanup call; cleanup retries what a busy driver may refuse for a moment.
const CLEANUP_ATTEMPTS: u32 = 5;

/// One kind of benchmark operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    CreateDelete,
    PublishUnpublish,
    Snapshot,
    /// Two Identity Probe calls.
    Probe,
}

/// What the run needs, decided from the workload and the driver's capabilities.
#[derive(Debug)]
struct Plan {
    /// Operation `i` is `kinds[i % kinds.len()]`.
    kinds: Vec<OpKind>,
    /// Volumes to create during setup (0 with `--volume-id` or when none is needed).
    base_volumes: usize,
    /// Whether any operation needs a pre-existing volume.
    needs_base: bool,
    /// NodeStageVolume each base volume (STAGE_UNSTAGE_VOLUME).
    stage: bool,
    /// ControllerPublishVolume each base volume (PUBLISH_UNPUBLISH_VOLUME).
    controller_publish: bool,
    /// Whether the controller can report a volume's context (GET_VOLUME).
    get_volume: bool,
}

impl Plan {
    fn publishes(&self) -> bool {
        self.kinds.contains(&OpKind::PublishUnpublish)
    }

    fn new(
        args: &BenchArgs,
        workers: usize,
        controller: &BTreeSet<i32>,
        node: Option<&BTreeSet<i32>>,
    ) -> Result<Self, String> {
        let has_c = |c: ControllerCap| controller.contains(&(c as i32));
        let can_create = has_c(ControllerCap::CreateDeleteVolume);
        let can_snapshot = has_c(ControllerCap::CreateDeleteSnapshot);
        let have_volume = args.volume_id.is_some() || can_create;
        let no_create =
            "the driver does not advertise the CREATE_DELETE_VOLUME controller capability";
        let kinds = match args.workload {
            Workload::CreateDelete if can_create => vec![OpKind::CreateDelete],
            Workload::CreateDelete => return Err(no_create.into()),
            Workload::PublishUnpublish if node.is_none() => {
                return Err("the driver has no node service".into())
            }
            Workload::PublishUnpublish if have_volume => vec![OpKind::PublishUnpublish],
            Workload::PublishUnpublish => {
                return Err(format!(
                    "{no_create}; pass --volume-id to publish an existing volume"
                ))
            }
            Workload::Snapshot if !can_snapshot => return Err(
                "the driver does not advertise the CREATE_DELETE_SNAPSHOT controller capability"
                    .into(),
            ),
            Workload::Snapshot if have_volume => vec![OpKind::Snapshot],
            Workload::Snapshot => {
                return Err(format!(
                    "{no_create}; pass --volume-id to snapshot an existing volume"
                ))
            }
            Workload::Probe => vec![OpKind::Probe],
            Workload::Mixed => {
                let mut kinds = Vec::new();
                if can_create {
                    kinds.push(OpKind::CreateDelete);
                }
                if node.is_some() && have_volume {
                    kinds.push(OpKind::PublishUnpublish);
                }
                if can_snapshot && have_volume {
                    kinds.push(OpKind::Snapshot);
                }
                if kinds.is_empty() {
                    return Err(format!(
                        "{no_create}, and no --volume-id was given: nothing to run"
                    ));
                }
                kinds
            }
        };
        let publishes = kinds.contains(&OpKind::PublishUnpublish);
        let needs_base = publishes || kinds.contains(&OpKind::Snapshot);
        let base_volumes = if !needs_base || args.volume_id.is_some() {
            0
        } else if publishes {
            // One volume per worker: concurrent publications of one SINGLE_NODE_* volume
            // may legitimately be refused by the driver.
            workers
        } else {
            1
        };
        let has_n = |c: NodeCap| node.is_some_and(|n| n.contains(&(c as i32)));
        Ok(Self {
            stage: publishes && has_n(NodeCap::StageUnstageVolume),
            controller_publish: publishes && has_c(ControllerCap::PublishUnpublishVolume),
            get_volume: has_c(ControllerCap::GetVolume),
            kinds,
            base_volumes,
            needs_base,
        })
    }
}

/// A volume prepared by setup for publish and snapshot operations.
#[derive(Debug, Clone, Default)]
struct Base {
    volume_id: String,
    volume_context: Context,
    publish_context: Context,
    staging_path: String,
}

/// Stops a publish-unpublish run whose very first publications are refused for their
/// path: every later operation would fail the same way, and the user needs to hear why.
#[derive(Default)]
struct PathGate {
    /// Some NodePublishVolume succeeded: the path is fine, later errors are just errors.
    accepted: std::sync::atomic::AtomicBool,
    /// The refusal that stopped the run.
    refused: OnceLock<Status>,
}

impl PathGate {
    fn is_closed(&self) -> bool {
        self.refused.get().is_some()
    }
}

/// State shared by setup, workers and cleanup (also of `bench scale`).
pub(super) struct Env {
    pub(super) channels: Vec<Channel>,
    pub(super) timeout: Duration,
    pub(super) secrets: Secrets,
    pub(super) params: HashMap<String, String>,
    pub(super) snapshot_params: HashMap<String, String>,
    pub(super) capability: csi::VolumeCapability,
    pub(super) size: i64,
    /// `bench-<random>-`: makes names unique per run and easy to find if anything leaks.
    pub(super) prefix: String,
    pub(super) target_dir: PathBuf,
    pub(super) registry: Registry,
}

impl Env {
    fn channel(&self, worker: usize) -> Channel {
        self.channels[worker % self.channels.len()].clone()
    }

    pub(super) fn controller(&self, worker: usize) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel(worker))
    }

    fn node(&self, worker: usize) -> NodeClient<Channel> {
        NodeClient::new(self.channel(worker))
    }

    fn identity(&self, worker: usize) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel(worker))
    }

    /// Whether `status` is the driver refusing the staging or target path the bench chose
    /// (all of them lie under `target_dir`): INVALID_ARGUMENT, NOT_FOUND or
    /// FAILED_PRECONDITION with a message that names the path or speaks of the kubelet
    /// directory or of a path outside what is allowed.
    fn refuses_path(&self, status: &Status) -> bool {
        if !matches!(
            status.code(),
            Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition
        ) {
            return false;
        }
        let message = status.message().to_lowercase();
        let names_dir = self
            .target_dir
            .to_str()
            .is_some_and(|d| message.contains(&d.to_lowercase()));
        names_dir
            || ["kubelet", "outside", "not allowed"]
                .iter()
                .any(|word| message.contains(word))
    }

    /// The error for a refused path: what the driver said and what to do about it.
    fn path_refusal(&self, call: &str, status: &Status) -> String {
        format!(
            "{call}: {}. The driver refused a path under {}; a driver that serves only its \
             kubelet directory (stowage: --kubelet-dir) accepts staging and target paths only \
             beneath it: pass --target-dir with a directory under the driver's kubelet \
             directory (e.g. <kubelet-dir>/bench).",
            self.describe(status),
            self.target_dir.display()
        )
    }

    pub(super) fn describe(&self, status: &Status) -> String {
        describe_status(status, &self.secrets)
    }

    fn create_volume_request(&self, name: &str) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: self.size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![self.capability.clone()],
            parameters: self.params.clone(),
            secrets: self.secrets.to_map(),
            ..Default::default()
        }
    }

    fn create_snapshot_request(&self, name: &str, source: &str) -> csi::CreateSnapshotRequest {
        csi::CreateSnapshotRequest {
            source_volume_id: source.to_owned(),
            name: name.to_owned(),
            secrets: self.secrets.to_map(),
            parameters: self.snapshot_params.clone(),
        }
    }

    /// CreateVolume, keeping the registry right whatever the outcome.
    pub(super) async fn create_volume(
        &self,
        worker: usize,
        name: &str,
    ) -> Result<csi::Volume, Status> {
        let t = self.timeout;
        self.registry.volume_pending(name);
        debug!(rpc = "CreateVolume", name, "calling");
        let result = unary(
            t,
            self.controller(worker)
                .create_volume(request(self.create_volume_request(name), t)),
        )
        .await;
        match result {
            Ok(r) => match r.volume {
                Some(v) if !v.volume_id.is_empty() => {
                    self.registry.volume_created(name, &v.volume_id);
                    Ok(v)
                }
                // Stays pending: cleanup will ask again by name.
                _ => Err(Status::internal("CreateVolume returned no volume ID")),
            },
            Err(s) => {
                if !outcome_unknown(&s) {
                    self.registry.volume_gone(name);
                }
                Err(s)
            }
        }
    }

    pub(super) async fn delete_volume(
        &self,
        worker: usize,
        name: &str,
        id: &str,
    ) -> Result<(), Status> {
        let t = self.timeout;
        debug!(rpc = "DeleteVolume", volume_id = id, "calling");
        let req = csi::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            secrets: self.secrets.to_map(),
        };
        unary(t, self.controller(worker).delete_volume(request(req, t))).await?;
        self.registry.volume_gone(name);
        Ok(())
    }

    async fn create_snapshot(
        &self,
        worker: usize,
        name: &str,
        source: &str,
    ) -> Result<String, Status> {
        let t = self.timeout;
        self.registry.snapshot_pending(name, source);
        debug!(
            rpc = "CreateSnapshot",
            name,
            source_volume_id = source,
            "calling"
        );
        let req = self.create_snapshot_request(name, source);
        match unary(t, self.controller(worker).create_snapshot(request(req, t))).await {
            Ok(r) => match r.snapshot {
                Some(s) if !s.snapshot_id.is_empty() => {
                    self.registry.snapshot_created(name, source, &s.snapshot_id);
                    Ok(s.snapshot_id)
                }
                _ => Err(Status::internal("CreateSnapshot returned no snapshot ID")),
            },
            Err(s) => {
                if !outcome_unknown(&s) {
                    self.registry.snapshot_gone(name);
                }
                Err(s)
            }
        }
    }

    async fn delete_snapshot(&self, worker: usize, name: &str, id: &str) -> Result<(), Status> {
        let t = self.timeout;
        debug!(rpc = "DeleteSnapshot", snapshot_id = id, "calling");
        let req = csi::DeleteSnapshotRequest {
            snapshot_id: id.to_owned(),
            secrets: self.secrets.to_map(),
        };
        unary(t, self.controller(worker).delete_snapshot(request(req, t))).await?;
        self.registry.snapshot_gone(name);
        Ok(())
    }

    async fn node_publish(&self, worker: usize, base: &Base, target: &str) -> Result<(), Status> {
        let t = self.timeout;
        self.registry.published(&base.volume_id, target);
        debug!(rpc = "NodePublishVolume", volume_id = %base.volume_id, target, "calling");
        let req = csi::NodePublishVolumeRequest {
            volume_id: base.volume_id.clone(),
            publish_context: base.publish_context.clone(),
            staging_target_path: base.staging_path.clone(),
            target_path: target.to_owned(),
            volume_capability: Some(self.capability.clone()),
            readonly: false,
            secrets: self.secrets.to_map(),
            volume_context: base.volume_context.clone(),
        };
        let result = unary(t, self.node(worker).node_publish_volume(request(req, t))).await;
        if let Err(s) = &result {
            if !outcome_unknown(s) {
                self.registry.unpublished(&base.volume_id, target);
            }
        }
        result.map(drop)
    }

    async fn node_unpublish(
        &self,
        worker: usize,
        volume_id: &str,
        target: &str,
    ) -> Result<(), Status> {
        let t = self.timeout;
        debug!(rpc = "NodeUnpublishVolume", volume_id, target, "calling");
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            target_path: target.to_owned(),
        };
        unary(t, self.node(worker).node_unpublish_volume(request(req, t))).await?;
        self.registry.unpublished(volume_id, target);
        Ok(())
    }
}

/// Retries calls a busy or restarting driver may refuse for a moment (ABORTED means another
/// operation on the same volume is still pending, e.g. a create that timed out on our side).
pub(super) async fn retry<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(s)
                if attempt < CLEANUP_ATTEMPTS
                    && matches!(
                        s.code(),
                        Code::Aborted
                            | Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::ResourceExhausted
                    ) =>
            {
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Driver name and version for the report.
#[derive(Debug, Default, Serialize)]
pub(super) struct DriverInfo {
    pub(super) name: String,
    pub(super) vendor_version: String,
}

#[derive(Debug, Default, Serialize)]
struct RssReport {
    pid: u32,
    before_bytes: Option<u64>,
    after_run_bytes: Option<u64>,
    after_cleanup_bytes: Option<u64>,
    /// VmHWM: the driver's peak over its whole life, not just this run.
    peak_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct CleanupReport {
    complete: bool,
    leftovers: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    workload: &'static str,
    endpoint: String,
    driver: DriverInfo,
    requested: usize,
    completed: usize,
    failed: usize,
    interrupted: bool,
    concurrency: usize,
    connections: usize,
    elapsed_seconds: f64,
    ops_per_second: f64,
    calls: Vec<CallSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    setup_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    driver_rss: Option<RssReport>,
    cleanup: CleanupReport,
}

/// Why setup stopped.
enum SetupError {
    Cancelled,
    Rpc(&'static str, Status),
    Local(String),
}

pub(super) fn rss_sample(pid: Option<u32>, err: &mut dyn Write) -> Option<u64> {
    let pid = pid?;
    match read_rss(pid) {
        Ok(v) => Some(v),
        Err(e) => {
            let _ = writeln!(err, "warning: cannot read RSS of pid {pid}: {e}");
            None
        }
    }
}

pub(super) fn capability_set<I: IntoIterator<Item = Option<i32>>>(types: I) -> BTreeSet<i32> {
    types.into_iter().flatten().collect()
}

/// The mount capability every workload uses: the access mode asked for and the filesystem
/// type, if any (empty lets the driver choose).
pub(super) fn mount_capability(mode: i32, fs_type: Option<&str>) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.unwrap_or_default().to_owned(),
            ..Default::default()
        })),
    }
}

/// What every workload asks first: the plugin's name and version, and its controller
/// capabilities (empty for a node-only plugin, which answers UNIMPLEMENTED). The error names
/// the call that failed.
pub(super) async fn plugin_profile(
    channel: &Channel,
    t: Duration,
) -> Result<(csi::GetPluginInfoResponse, BTreeSet<i32>), (&'static str, Status)> {
    let info = unary(
        t,
        IdentityClient::new(channel.clone())
            .get_plugin_info(request(csi::GetPluginInfoRequest {}, t)),
    )
    .await
    .map_err(|s| ("GetPluginInfo", s))?;
    let caps = match unary(
        t,
        ControllerClient::new(channel.clone())
            .controller_get_capabilities(request(csi::ControllerGetCapabilitiesRequest {}, t)),
    )
    .await
    {
        Ok(r) => capability_set(r.capabilities.iter().map(|c| {
            c.r#type
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })),
        Err(s) if s.code() == Code::Unimplemented => BTreeSet::new(),
        Err(s) => return Err(("ControllerGetCapabilities", s)),
    };
    Ok((info, caps))
}

pub(super) async fn run(
    args: &BenchArgs,
    secrets: Secrets,
    options: &Options,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> u8 {
    let count = usize::try_from(args.count).unwrap_or(usize::MAX);
    let workers = usize::try_from(args.concurrency)
        .unwrap_or(usize::MAX)
        .min(count);
    let t = args.timeout;

    // Connect: each connection is its own HTTP/2 connection to the driver.
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        match crate::connect(&args.endpoint).await {
            Ok(c) => channels.push(c),
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                return if e.is_invalid_endpoint() {
                    exit::USAGE
                } else {
                    exit::CONNECT
                };
            }
        }
    }
    let Some(first) = channels.first().cloned() else {
        let _ = writeln!(err, "error: no connections");
        return exit::USAGE;
    };

    // Ask the driver what it is and what it can do, and plan the run from that.
    let fail = |err: &mut (dyn Write + Send), call: &str, s: &Status| {
        let _ = writeln!(err, "error: {call}: {}", describe_status(s, &secrets));
        exit::from_grpc(s.code())
    };
    let (info, controller_caps) = match plugin_profile(&first, t).await {
        Ok(profile) => profile,
        Err((call, s)) => return fail(err, call, &s),
    };
    let node_caps = if matches!(args.workload, Workload::PublishUnpublish | Workload::Mixed) {
        match unary(
            t,
            NodeClient::new(first.clone())
                .node_get_capabilities(request(csi::NodeGetCapabilitiesRequest {}, t)),
        )
        .await
        {
            Ok(r) => Some(capability_set(r.capabilities.iter().map(|c| {
                c.r#type
                    .map(|node_service_capability::Type::Rpc(r)| r.r#type)
            }))),
            Err(s) if s.code() == Code::Unimplemented => None,
            Err(s) => return fail(err, "NodeGetCapabilities", &s),
        }
    } else {
        None
    };
    let plan = match Plan::new(args, workers, &controller_caps, node_caps.as_ref()) {
        Ok(p) => p,
        Err(msg) => {
            let _ = writeln!(
                err,
                "error: cannot run workload {}: {msg}",
                args.workload.name()
            );
            return exit::LOCAL_ERROR;
        }
    };
    if plan.publishes()
        && args.volume_id.is_some()
        && workers > 1
        && args.access_mode.single_publication()
    {
        let _ = writeln!(
            err,
            "warning: {workers} workers publish the single volume {:?} with a single-node \
             access mode; the driver may refuse concurrent publications (FAILED_PRECONDITION). \
             Use --access-mode single-node-multi-writer or a multi-node mode, or --concurrency 1.",
            args.volume_id.as_deref().unwrap_or_default()
        );
    }

    let tag = super::random_tag();
    let env = Arc::new(Env {
        channels,
        timeout: t,
        secrets: secrets.clone(),
        params: kv_map(&args.params),
        snapshot_params: kv_map(&args.snapshot_params),
        capability: mount_capability(args.access_mode.mode() as i32, args.fs_type.as_deref()),
        size: args.size,
        prefix: format!("bench-{tag}-"),
        target_dir: args
            .target_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("stowage-bench-{tag}"))),
        registry: Registry::default(),
    });
    let cancel = &options.cancel;

    // Set up, run, and always clean up, whatever happened before.
    let rss_before = rss_sample(args.pid, err);
    let mut setup_error = None;
    let mut recorder = Recorder::default();
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(PathGate::default());
    let mut elapsed = Duration::ZERO;
    match setup(&env, &plan, args, cancel).await {
        Ok(bases) => {
            let started = Instant::now();
            let progress = options
                .progress
                .then(|| Progress::start(done.clone(), count));
            recorder = run_workers(
                &env,
                Arc::new(bases),
                &plan.kinds,
                count,
                workers,
                cancel,
                &gate,
                &done,
                &failed,
            )
            .await;
            elapsed = started.elapsed();
            if let Some(p) = progress {
                p.finish();
            }
            if let Some(s) = gate.refused.get() {
                let msg = env.path_refusal("NodePublishVolume", s);
                let _ = writeln!(err, "error: {msg}");
                setup_error = Some((msg, exit::from_grpc(s.code())));
            }
        }
        Err(SetupError::Cancelled) => {}
        Err(SetupError::Local(msg)) => {
            let _ = writeln!(err, "error: setup: {msg}");
            setup_error = Some((msg, exit::LOCAL_ERROR));
        }
        Err(SetupError::Rpc(call, s)) => {
            let msg = if call == "NodeStageVolume" && env.refuses_path(&s) {
                env.path_refusal(call, &s)
            } else {
                format!("{call}: {}", env.describe(&s))
            };
            let _ = writeln!(err, "error: setup: {msg}");
            setup_error = Some((msg, exit::from_grpc(s.code())));
        }
    }
    let rss_after_run = rss_sample(args.pid, err);

    let leftovers = cleanup(&env, err).await;
    let rss_after_cleanup = rss_sample(args.pid, err);
    if !leftovers.is_empty() {
        let _ = writeln!(err, "error: cleanup incomplete; left behind:");
        for l in &leftovers {
            let _ = writeln!(err, "  {l}");
        }
    }

    // Report.
    let completed = done.load(Ordering::SeqCst);
    let failed = failed.load(Ordering::SeqCst);
    let interrupted = cancel.is_cancelled() && completed < count;
    let report = Report {
        workload: args.workload.name(),
        endpoint: args.endpoint.clone(),
        driver: DriverInfo {
            name: info.name,
            vendor_version: info.vendor_version,
        },
        requested: count,
        completed,
        failed,
        interrupted,
        concurrency: workers,
        connections: env.channels.len(),
        elapsed_seconds: (elapsed.as_secs_f64() * 1e6).round() / 1e6,
        ops_per_second: rate(completed, elapsed),
        calls: recorder.summarize(elapsed),
        setup_error: setup_error.as_ref().map(|(m, _)| m.clone()),
        driver_rss: args.pid.map(|pid| RssReport {
            pid,
            before_bytes: rss_before,
            after_run_bytes: rss_after_run,
            after_cleanup_bytes: rss_after_cleanup,
            peak_bytes: read_peak_rss(pid).ok(),
        }),
        cleanup: CleanupReport {
            complete: leftovers.is_empty(),
            leftovers,
        },
    };
    if let Err(e) = write_report(out, args.output, &report) {
        let _ = writeln!(err, "error: cannot write report: {e}");
        return exit::LOCAL_ERROR;
    }
    if interrupted {
        let _ = writeln!(
            err,
            "interrupted after {completed} of {count} operations; cleanup {}",
            if report.cleanup.complete {
                "complete"
            } else {
                "INCOMPLETE"
            }
        );
    }

    if !report.cleanup.complete {
        exit::BENCH_CLEANUP_INCOMPLETE
    } else if let Some((_, code)) = setup_error {
        code
    } else if interrupted {
        exit::INTERRUPTED
    } else if failed > 0 {
        exit::BENCH_OPS_FAILED
    } else {
        exit::SUCCESS
    }
}

fn write_report(out: &mut dyn Write, format: OutputFormat, r: &Report) -> std::io::Result<()> {
    if format == OutputFormat::Json {
        let value = serde_json::to_value(r).map_err(std::io::Error::other)?;
        return write_json(out, &value);
    }
    let mut f = Fields::new();
    f.add("WORKLOAD", r.workload)
        .add(
            "DRIVER",
            format!(
                "{} {} at {}",
                r.driver.name, r.driver.vendor_version, r.endpoint
            ),
        )
        .add(
            "OPERATIONS",
            format!(
                "{} completed ({} failed) of {} in {:.3}s: {:.1} ops/s",
                r.completed, r.failed, r.requested, r.elapsed_seconds, r.ops_per_second
            ),
        )
        .add(
            "CONCURRENCY",
            format!(
                "{} workers over {} connection(s)",
                r.concurrency, r.connections
            ),
        );
    if r.interrupted {
        f.add("INTERRUPTED", "yes");
    }
    if let Some(e) = &r.setup_error {
        f.add("SETUP ERROR", e.clone());
    }
    f.write(out)?;
    if !r.calls.is_empty() {
        writeln!(out)?;
        write_table(out, &r.calls)?;
        for c in &r.calls {
            if let Some(e) = &c.first_error {
                writeln!(out, "first {} error: {e}", c.call)?;
            }
        }
    }
    writeln!(out)?;
    let mut f = Fields::new();
    if let Some(rss) = &r.driver_rss {
        let show = |v: Option<u64>| {
            v.map(|b| format_size(i64::try_from(b).unwrap_or(i64::MAX)))
                .unwrap_or_else(|| "?".into())
        };
        let delta = match (rss.before_bytes, rss.after_cleanup_bytes) {
            (Some(b), Some(a)) => {
                let d = i64::try_from(a).unwrap_or(i64::MAX) - i64::try_from(b).unwrap_or(i64::MAX);
                let sign = if d < 0 { "-" } else { "+" };
                format!(" ({sign}{})", format_size(d.abs()))
            }
            _ => String::new(),
        };
        f.add(
            "DRIVER RSS",
            format!(
                "pid {}: before {}, after run {}, after cleanup {}{delta}; peak (VmHWM) {}",
                rss.pid,
                show(rss.before_bytes),
                show(rss.after_run_bytes),
                show(rss.after_cleanup_bytes),
                show(rss.peak_bytes)
            ),
        );
    }
    f.add(
        "CLEANUP",
        if r.cleanup.complete {
            "complete".to_owned()
        } else {
            format!("INCOMPLETE: {}", r.cleanup.leftovers.join("; "))
        },
    );
    f.write(out)
}

fn create_dir(env: &Env, dir: &Path) -> Result<(), SetupError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| SetupError::Local(format!("cannot create {}: {e}", dir.display())))?;
    env.registry.dir_created(dir.to_path_buf());
    Ok(())
}

fn path_string(p: &Path) -> Result<String, SetupError> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| SetupError::Local(format!("path {} is not UTF-8", p.display())))
}

/// Creates (or adopts) the base volumes, publishes them to this node and stages them.
async fn setup(
    env: &Env,
    plan: &Plan,
    args: &BenchArgs,
    cancel: &CancelToken,
) -> Result<Vec<Base>, SetupError> {
    let t = env.timeout;
    if !plan.needs_base {
        return Ok(Vec::new());
    }
    let mut bases = Vec::new();
    if let Some(id) = &args.volume_id {
        let mut base = Base {
            volume_id: id.clone(),
            ..Default::default()
        };
        if plan.get_volume {
            // The volume context belongs in stage/publish requests; fetch it if we can.
            let req = csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            };
            let r = unary(t, env.controller(0).controller_get_volume(request(req, t)))
                .await
                .map_err(|s| SetupError::Rpc("ControllerGetVolume", s))?;
            base.volume_context = r.volume.map(|v| v.volume_context).unwrap_or_default();
        }
        bases.push(base);
    }
    for w in 0..plan.base_volumes {
        if cancel.is_cancelled() {
            return Err(SetupError::Cancelled);
        }
        let name = format!("{}base-{w}", env.prefix);
        let v = env
            .create_volume(w, &name)
            .await
            .map_err(|s| SetupError::Rpc("CreateVolume", s))?;
        bases.push(Base {
            volume_id: v.volume_id,
            volume_context: v.volume_context,
            ..Default::default()
        });
    }
    if !plan.publishes() {
        return Ok(bases);
    }
    create_dir(env, &env.target_dir)?;

    if plan.controller_publish {
        let info = unary(
            t,
            env.node(0)
                .node_get_info(request(csi::NodeGetInfoRequest {}, t)),
        )
        .await
        .map_err(|s| SetupError::Rpc("NodeGetInfo", s))?;
        for base in &mut bases {
            if cancel.is_cancelled() {
                return Err(SetupError::Cancelled);
            }
            env.registry
                .controller_published(&base.volume_id, &info.node_id);
            let req = csi::ControllerPublishVolumeRequest {
                volume_id: base.volume_id.clone(),
                node_id: info.node_id.clone(),
                volume_capability: Some(env.capability.clone()),
                readonly: false,
                secrets: env.secrets.to_map(),
                volume_context: base.volume_context.clone(),
            };
            match unary(
                t,
                env.controller(0).controller_publish_volume(request(req, t)),
            )
            .await
            {
                Ok(r) => base.publish_context = r.publish_context,
                Err(s) => {
                    if !outcome_unknown(&s) {
                        env.registry
                            .controller_unpublished(&base.volume_id, &info.node_id);
                    }
                    return Err(SetupError::Rpc("ControllerPublishVolume", s));
                }
            }
        }
    }

    if plan.stage {
        let single = bases.len() == 1;
        for (w, base) in bases.iter_mut().enumerate() {
            if cancel.is_cancelled() {
                return Err(SetupError::Cancelled);
            }
            let dir = if single {
                env.target_dir.join("staging")
            } else {
                env.target_dir.join(format!("staging-{w}"))
            };
            // The CO creates the staging directory; the driver only mounts on it.
            create_dir(env, &dir)?;
            let staged = Staged {
                volume_id: base.volume_id.clone(),
                staging_path: path_string(&dir)?,
            };
            env.registry.staged(staged.clone());
            debug!(rpc = "NodeStageVolume", volume_id = %base.volume_id, "calling");
            let req = csi::NodeStageVolumeRequest {
                volume_id: base.volume_id.clone(),
                publish_context: base.publish_context.clone(),
                staging_target_path: staged.staging_path.clone(),
                volume_capability: Some(env.capability.clone()),
                secrets: env.secrets.to_map(),
                volume_context: base.volume_context.clone(),
            };
            if let Err(s) = unary(t, env.node(w).node_stage_volume(request(req, t))).await {
                if !outcome_unknown(&s) {
                    env.registry.unstaged(&staged);
                }
                return Err(SetupError::Rpc("NodeStageVolume", s));
            }
            base.staging_path = staged.staging_path;
        }
    }
    Ok(bases)
}

#[allow(clippy::too_many_arguments)]
async fn run_workers(
    env: &Arc<Env>,
    bases: Arc<Vec<Base>>,
    kinds: &[OpKind],
    count: usize,
    workers: usize,
    cancel: &CancelToken,
    gate: &Arc<PathGate>,
    done: &Arc<AtomicUsize>,
    failed: &Arc<AtomicUsize>,
) -> Recorder {
    let next = Arc::new(AtomicUsize::new(0));
    let kinds: Arc<[OpKind]> = kinds.into();
    let mut handles = Vec::with_capacity(workers);
    for w in 0..workers {
        let env = env.clone();
        let bases = bases.clone();
        let kinds = kinds.clone();
        let cancel = cancel.clone();
        let gate = gate.clone();
        let next = next.clone();
        let done = done.clone();
        let failed = failed.clone();
        handles.push(tokio::spawn(async move {
            let mut rec = Recorder::default();
            // Cancellation is checked between operations only: an operation that started
            // is finished (its second half undoes the first), which is cleanup anyway.
            while !cancel.is_cancelled() && !gate.is_closed() {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= count {
                    break;
                }
                let ok = match kinds[i % kinds.len()] {
                    OpKind::CreateDelete => op_create_delete(&env, w, i, &mut rec).await,
                    OpKind::PublishUnpublish => {
                        let base = &bases[w % bases.len()];
                        op_publish_unpublish(&env, base, &gate, w, i, &mut rec).await
                    }
                    OpKind::Snapshot => {
                        op_snapshot(&env, &bases[w % bases.len()], w, i, &mut rec).await
                    }
                    OpKind::Probe => op_probe(&env, w, &mut rec).await,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            rec
        }));
    }
    let mut merged = Recorder::default();
    for h in handles {
        match h.await {
            Ok(rec) => merged.merge(rec),
            // A panicked worker loses its samples; what it created is still registered
            // and gets cleaned up.
            Err(e) => merged.error("worker", format!("worker task failed: {e}")),
        }
    }
    merged
}

async fn op_create_delete(env: &Env, w: usize, i: usize, rec: &mut Recorder) -> bool {
    let name = format!("{}{i}", env.prefix);
    let start = Instant::now();
    let volume = match env.create_volume(w, &name).await {
        Ok(v) => {
            rec.ok("CreateVolume", start.elapsed());
            v
        }
        Err(s) => {
            rec.error("CreateVolume", env.describe(&s));
            return false;
        }
    };
    let start = Instant::now();
    match env.delete_volume(w, &name, &volume.volume_id).await {
        Ok(()) => {
            rec.ok("DeleteVolume", start.elapsed());
            true
        }
        Err(s) => {
            rec.error("DeleteVolume", env.describe(&s));
            false
        }
    }
}

async fn op_publish_unpublish(
    env: &Env,
    base: &Base,
    gate: &PathGate,
    w: usize,
    i: usize,
    rec: &mut Recorder,
) -> bool {
    let target_path = env.target_dir.join(format!("pub-{i}"));
    let Some(target) = target_path.to_str() else {
        rec.error("NodePublishVolume", "target path is not UTF-8".into());
        return false;
    };
    let start = Instant::now();
    if let Err(s) = env.node_publish(w, base, target).await {
        rec.error("NodePublishVolume", env.describe(&s));
        if !gate.accepted.load(Ordering::SeqCst) && env.refuses_path(&s) {
            let _ = gate.refused.set(s);
        }
        return false;
    }
    rec.ok("NodePublishVolume", start.elapsed());
    gate.accepted.store(true, Ordering::SeqCst);
    let start = Instant::now();
    match env.node_unpublish(w, &base.volume_id, target).await {
        Ok(()) => {
            rec.ok("NodeUnpublishVolume", start.elapsed());
            true
        }
        Err(s) => {
            rec.error("NodeUnpublishVolume", env.describe(&s));
            false
        }
    }
}

/// Two Probe calls, each recorded on its own; a probe that answers `ready: false` still
/// made its round trip, which is what this workload measures.
async fn op_probe(env: &Env, w: usize, rec: &mut Recorder) -> bool {
    let t = env.timeout;
    for _ in 0..2 {
        let start = Instant::now();
        match unary(t, env.identity(w).probe(request(csi::ProbeRequest {}, t))).await {
            Ok(_) => rec.ok("Probe", start.elapsed()),
            Err(s) => {
                rec.error("Probe", env.describe(&s));
                return false;
            }
        }
    }
    true
}

async fn op_snapshot(env: &Env, base: &Base, w: usize, i: usize, rec: &mut Recorder) -> bool {
    let name = format!("{}snap-{i}", env.prefix);
    let start = Instant::now();
    let id = match env.create_snapshot(w, &name, &base.volume_id).await {
        Ok(id) => {
            rec.ok("CreateSnapshot", start.elapsed());
            id
        }
        Err(s) => {
            rec.error("CreateSnapshot", env.describe(&s));
            return false;
        }
    };
    let start = Instant::now();
    match env.delete_snapshot(w, &name, &id).await {
        Ok(()) => {
            rec.ok("DeleteSnapshot", start.elapsed());
            true
        }
        Err(s) => {
            rec.error("DeleteSnapshot", env.describe(&s));
            false
        }
    }
}

/// Undoes everything in the registry, in reverse dependency order; returns what is left.
/// Runs regardless of cancellation: that is its purpose.
async fn cleanup(env: &Env, err: &mut (dyn Write + Send)) -> Vec<String> {
    let t = env.timeout;
    let state = env.registry.snapshot();
    let mut warn = |what: String, s: &Status| {
        let _ = writeln!(err, "cleanup: {what}: {}", env.describe(s));
    };
    // NOT_FOUND from unpublish/unstage means the volume itself is gone: nothing to undo.
    let gone = |r: &Result<(), Status>| matches!(r, Err(s) if s.code() == Code::NotFound);

    for (volume_id, target) in &state.published {
        let r = retry(|| env.node_unpublish(0, volume_id, target)).await;
        if gone(&r) {
            env.registry.unpublished(volume_id, target);
        } else if let Err(s) = r {
            warn(format!("NodeUnpublishVolume {volume_id} {target}"), &s);
        }
    }
    for st in &state.staged {
        let r = retry(|| {
            let mut node = env.node(0);
            let req = csi::NodeUnstageVolumeRequest {
                volume_id: st.volume_id.clone(),
                staging_target_path: st.staging_path.clone(),
            };
            async move {
                unary(t, node.node_unstage_volume(request(req, t)))
                    .await
                    .map(drop)
            }
        })
        .await;
        match r {
            Ok(()) => env.registry.unstaged(st),
            Err(s) if s.code() == Code::NotFound => env.registry.unstaged(st),
            Err(s) => warn(format!("NodeUnstageVolume {}", st.volume_id), &s),
        }
    }
    for (volume_id, node_id) in &state.controller_published {
        let r = retry(|| {
            let mut c = env.controller(0);
            let req = csi::ControllerUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                node_id: node_id.clone(),
                secrets: env.secrets.to_map(),
            };
            async move {
                unary(t, c.controller_unpublish_volume(request(req, t)))
                    .await
                    .map(drop)
            }
        })
        .await;
        match r {
            Ok(()) => env.registry.controller_unpublished(volume_id, node_id),
            Err(s) if s.code() == Code::NotFound => {
                env.registry.controller_unpublished(volume_id, node_id)
            }
            Err(s) => warn(format!("ControllerUnpublishVolume {volume_id}"), &s),
        }
    }
    for (name, (source, created)) in &state.snapshots {
        let id = match created {
            Created::Id(id) => id.clone(),
            // Repeating CreateSnapshot with the same name returns the existing snapshot (or
            // creates one, which is then deleted right away).
            Created::Pending => match retry(|| env.create_snapshot(0, name, source)).await {
                Ok(id) => id,
                Err(s) if !outcome_unknown(&s) => {
                    // Definitely not created: create_snapshot already forgot it.
                    debug!(name = %name, "pending snapshot was never created");
                    continue;
                }
                Err(s) => {
                    warn(format!("CreateSnapshot (to find snapshot {name})"), &s);
                    continue;
                }
            },
        };
        if let Err(s) = retry(|| env.delete_snapshot(0, name, &id)).await {
            warn(format!("DeleteSnapshot {id}"), &s);
        }
    }
    for (name, created) in &state.volumes {
        if let Err(message) = cleanup_volume(env, 0, name, created).await {
            let _ = writeln!(err, "cleanup: {message}");
        }
    }
    remove_dirs(env, &state.dirs, err);
    env.registry.leftovers()
}

/// Deletes one registered volume, first repeating its create by name when the ID is
/// unknown. `Ok` also when the volume turns out never to have been created; `Err` carries
/// `CALL ID: STATUS` for the user.
pub(super) async fn cleanup_volume(
    env: &Env,
    worker: usize,
    name: &str,
    created: &Created,
) -> Result<(), String> {
    let id = match created {
        Created::Id(id) => id.clone(),
        Created::Pending => match retry(|| env.create_volume(worker, name)).await {
            Ok(v) => v.volume_id,
            Err(s) if !outcome_unknown(&s) => {
                debug!(name = %name, "pending volume was never created");
                return Ok(());
            }
            Err(s) => {
                return Err(format!(
                    "CreateVolume (to find volume {name}): {}",
                    env.describe(&s)
                ))
            }
        },
    };
    retry(|| env.delete_volume(worker, name, &id))
        .await
        .map_err(|s| format!("DeleteVolume {id}: {}", env.describe(&s)))
}

/// Removes directories the bench created, plus `pub-*` targets a driver failed to remove
/// on unpublish (the spec says it must). Only `remove_dir` is used: it refuses non-empty
/// directories and mount points, so nothing a driver still has mounted can be deleted.
fn remove_dirs(env: &Env, created: &[PathBuf], err: &mut dyn Write) {
    if let Ok(entries) = std::fs::read_dir(&env.target_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let ours = name
                .to_str()
                .and_then(|n| n.strip_prefix("pub-"))
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
            if ours {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
    for dir in created.iter().rev() {
        match std::fs::remove_dir(dir) {
            Ok(()) => env.registry.dir_removed(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => env.registry.dir_removed(dir),
            Err(e) => {
                let _ = writeln!(err, "cleanup: cannot remove {}: {e}", dir.display());
            }
        }
    }
}
