//! The tonic services. Each RPC is one line of plumbing: validate into a typed request, run
//! the engine on a blocking thread, log once and count it in the metrics, map the error in
//! the one place it is mapped.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use stowage_core::request::{
    ControllerExpand, CreateSnapshot, CreateVolume, DeleteSnapshot, DeleteVolume, GetCapacity,
    GetSnapshot, GetVolume, ListSnapshots, ListVolumes, ValidateCapabilities,
};
use stowage_core::{Error, Result};
use stowage_csi::v1 as csi;
use stowage_csi::v1::controller_service_capability::rpc::Type as CtrlCap;
use stowage_csi::v1::plugin_capability::service::Type as PluginService;
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::recorder::code_name;

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Identity + Controller.
    Controller,
    /// Identity + Node.
    Node,
    /// All three.
    All,
}

impl Mode {
    /// Whether the Controller service is served.
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    /// Whether the Node service is served.
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// The driver as the gRPC services see it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Driver {
    pub(crate) engine: Arc<Engine>,
    name: Arc<str>,
    mode: Mode,
    in_flight: Arc<AtomicUsize>,
}

/// The two services a mode may leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Controller,
    Node,
}

/// How long a call's work can take, which decides the thread it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cost {
    /// A handful of syscalls and commits that are not flushed to disk.
    Short,
    /// Waits for the disk (fsync) or grows with a volume's contents (tree removal, usage
    /// walks).
    Blocking,
}

/// Counts a call as in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(count))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The gRPC server's routes with every request counted as in flight from the moment the
/// server dispatches it until its response is ready ([`Driver::counting`]). Counted here, not
/// in the handlers, a request that the server accepted before a SIGTERM but whose handler
/// has not started yet (a loaded machine) still holds the drain up.
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    count: Arc<AtomicUsize>,
}

impl<S, R> tower::Service<R> for Counted<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let in_flight = InFlight::enter(&self.count);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            drop(in_flight);
            answer
        })
    }
}

impl Driver {
    /// Wraps an engine.
    pub fn new(engine: Arc<Engine>, name: &str, mode: Mode) -> Self {
        Driver {
            engine,
            name: name.into(),
            mode,
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Calls currently running (shutdown waits for them).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Wraps the server's routes so that every request counts in [`Driver::in_flight`].
    pub fn counting<S>(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            count: Arc::clone(&self.in_flight),
        }
    }

    /// UNIMPLEMENTED, with a message, for a service this mode does not serve. Both services
    /// are always registered so that a CO gets this message rather than a bare status.
    pub(crate) fn serves(&self, service: Service) -> Result<(), Status> {
        let (served, flag) = match service {
            Service::Controller => (self.mode.controller(), "controller"),
            Service::Node => (self.mode.node(), "node"),
        };
        if served {
            Ok(())
        } else {
            Err(Error::Unimplemented(format!(
                "the {flag} service is not served by this instance (started with --mode {})",
                match self.mode {
                    Mode::Controller => "controller",
                    Mode::Node => "node",
                    Mode::All => "all",
                }
            ))
            .into())
        }
    }

    /// Runs `f` on a blocking thread once the engine is ready, and logs the call once with
    /// its subject (a volume id or name, never a secret) and outcome.
    pub(crate) async fn call<T, F>(
        &self,
        service: Service,
        cost: Cost,
        rpc: &'static str,
        subject: &str,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        F: FnOnce(&Engine) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let start = Instant::now();
        if let Err(refused) = self.serves(service) {
            crate::recorder::recorder().rpc(rpc, refused.code(), start.elapsed());
            tracing::info!(method = rpc, outcome = code_name(refused.code()));
            return Err(refused);
        }
        let engine = Arc::clone(&self.engine);
        let timed = crate::phases::enabled();
        let (result, stages) = match engine.require_ready() {
            Err(e) => (Err(e), None),
            Ok(()) => match cost {
                // Bounded work (a few syscalls and one SQLite commit): run it on this worker
                // and skip two thread hand-offs, which cost more than the work itself.
                Cost::Short => {
                    if timed {
                        crate::phases::begin(start);
                    }
                    let result = f(&engine);
                    (result, crate::phases::end("rest"))
                }
                // Work that waits for the disk or grows with a volume's contents must not hold
                // an async worker (Probe and every other call would wait behind it): it goes
                // to the blocking pool, so calls on different volumes run in parallel.
                Cost::Blocking => {
                    let run = move || {
                        if timed {
                            crate::phases::begin(start);
                            crate::phases::mark("hand-off");
                        }
                        let result = f(&engine);
                        (result, crate::phases::end("rest"))
                    };
                    match tokio::task::spawn_blocking(run).await {
                        Ok((result, mut stages)) => {
                            if let Some(stages) = stages.as_mut() {
                                stages.push("hand-back", Instant::now());
                            }
                            (result, stages)
                        }
                        Err(e) => (
                            Err(Error::Internal(format!(
                                "{rpc} failed inside the driver: {e}"
                            ))),
                            None,
                        ),
                    }
                }
            },
        };
        if let Some(stages) = stages {
            tracing::debug!(target: "stowage_driver::phases", rpc, stages = %stages.render(), "stages, microseconds");
        }
        // The one line of the call: the volume (or name, or snapshot) as a plain string,
        // never a request's parameters, contexts or secrets (see docs/operations.md, "Logs").
        let elapsed = start.elapsed();
        // Whole microseconds, so the JSON reads 3.332, not 3.3319780000000003.
        let duration_ms = elapsed.as_micros() as f64 / 1e3;
        let code = result.as_ref().err().map_or(tonic::Code::Ok, Error::code);
        crate::recorder::recorder().rpc(rpc, code, elapsed);
        let outcome = code_name(code);
        match &result {
            Ok(_) => tracing::info!(method = rpc, volume = %subject, outcome, duration_ms),
            Err(e) => {
                tracing::warn!(method = rpc, volume = %subject, outcome, duration_ms, error = %e)
            }
        }
        result.map(Response::new).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Driver {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        self.quiet(None, "GetPluginInfo")?;
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: self.name.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        self.quiet(None, "GetPluginCapabilities")?;
        let service = |t: PluginService| csi::PluginCapability {
            r#type: Some(csi::plugin_capability::Type::Service(
                csi::plugin_capability::Service { r#type: t as i32 },
            )),
        };
        let mut capabilities = vec![
            service(PluginService::VolumeAccessibilityConstraints),
            // Volumes grow while in use: image volumes' filesystems are grown mounted.
            csi::PluginCapability {
                r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
                    csi::plugin_capability::VolumeExpansion {
                        r#type: csi::plugin_capability::volume_expansion::Type::Online as i32,
                    },
                )),
            },
        ];
        if self.mode.controller() {
            capabilities.insert(0, service(PluginService::ControllerService));
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let start = Instant::now();
        // The same check as /readyz (health.rs): reconciled, store answering, every pool
        // reachable and writable. A few syscalls per pool, off the async workers.
        let engine = Arc::clone(&self.engine);
        let problems = tokio::task::spawn_blocking(move || crate::health::readiness(&engine))
            .await
            .unwrap_or_else(|e| vec![format!("readiness check failed: {e}")]);
        crate::recorder::recorder().rpc("Probe", tonic::Code::Ok, start.elapsed());
        tracing::debug!(
            method = "Probe",
            outcome = "OK",
            ready = problems.is_empty(),
            problems = %problems.join("; ")
        );
        Ok(Response::new(csi::ProbeResponse {
            ready: Some(problems.is_empty()),
        }))
    }
}

impl Driver {
    /// Counts an identity or capability call, refused with UNIMPLEMENTED when it belongs to
    /// a `service` this mode does not serve, and logs it at debug level: the sidecars poll
    /// these (Probe every few seconds), and at info they would drown the calls that change
    /// something.
    pub(crate) fn quiet(&self, service: Option<Service>, rpc: &'static str) -> Result<(), Status> {
        let start = Instant::now();
        let served = service.map_or(Ok(()), |s| self.serves(s));
        let code = served.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        crate::recorder::recorder().rpc(rpc, code, start.elapsed());
        tracing::debug!(method = rpc, outcome = code_name(code));
        served
    }
}

fn unimplemented<T>(driver: &Driver, rpc: &'static str) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let refused = match driver.serves(Service::Controller) {
        Err(refused) => refused,
        Ok(()) => Error::Unimplemented(format!(
            "{rpc} is not offered by stowage (see ControllerGetCapabilities)"
        ))
        .into(),
    };
    crate::recorder::recorder().rpc(rpc, refused.code(), start.elapsed());
    tracing::info!(method = rpc, outcome = code_name(refused.code()));
    Err(refused)
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Driver {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        let subject = req.name.clone();
        self.call(
            Service::Controller,
            Cost::Blocking,
            "CreateVolume",
            &subject,
            move |e| {
                let volume = e.create_volume(CreateVolume::try_from(&req)?)?;
                Ok(csi::CreateVolumeResponse {
                    volume: Some(volume),
                })
            },
        )
        .await
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Controller,
            Cost::Blocking,
            "DeleteVolume",
            &subject,
            move |e| {
                e.delete_volume(DeleteVolume::try_from(&req)?)?;
                Ok(csi::DeleteVolumeResponse {})
            },
        )
        .await
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        unimplemented(self, "ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        unimplemented(self, "ControllerUnpublishVolume")
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Controller,
            Cost::Short,
            "ValidateVolumeCapabilities",
            &subject,
            move |e| e.validate_capabilities(ValidateCapabilities::try_from(&req)?),
        )
        .await
    }

    async fn list_volumes(
        &self,
        req: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = req.into_inner();
        self.call(
            Service::Controller,
            Cost::Short,
            "ListVolumes",
            "",
            move |e| e.list_volumes(ListVolumes::try_from(&req)?),
        )
        .await
    }

    async fn get_capacity(
        &self,
        req: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = req.into_inner();
        self.call(
            Service::Controller,
            Cost::Short,
            "GetCapacity",
            "",
            move |e| e.get_capacity(GetCapacity::try_from(&req)?),
        )
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        self.quiet(Some(Service::Controller), "ControllerGetCapabilities")?;
        let capabilities = [
            CtrlCap::CreateDeleteVolume,
            CtrlCap::ListVolumes,
            CtrlCap::ListVolumesPublishedNodes,
            CtrlCap::GetCapacity,
            CtrlCap::GetVolume,
            CtrlCap::VolumeCondition,
            CtrlCap::SingleNodeMultiWriter,
            CtrlCap::ExpandVolume,
            CtrlCap::CreateDeleteSnapshot,
            CtrlCap::ListSnapshots,
            CtrlCap::GetSnapshot,
            CtrlCap::CloneVolume,
        ]
        .into_iter()
        .filter(|c| *c != CtrlCap::ExpandVolume || self.engine.controller_expansion)
        .map(|t| csi::ControllerServiceCapability {
            r#type: Some(csi::controller_service_capability::Type::Rpc(
                csi::controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        let subject = req.name.clone();
        self.call(
            Service::Controller,
            Cost::Blocking,
            "CreateSnapshot",
            &subject,
            move |e| {
                let snapshot = e.create_snapshot(CreateSnapshot::try_from(&req)?)?;
                Ok(csi::CreateSnapshotResponse {
                    snapshot: Some(snapshot),
                })
            },
        )
        .await
    }

    async fn delete_snapshot(
        &self,
        req: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = req.into_inner();
        let subject = req.snapshot_id.clone();
        self.call(
            Service::Controller,
            Cost::Blocking,
            "DeleteSnapshot",
            &subject,
            move |e| {
                e.delete_snapshot(DeleteSnapshot::try_from(&req)?)?;
                Ok(csi::DeleteSnapshotResponse {})
            },
        )
        .await
    }

    async fn list_snapshots(
        &self,
        req: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = req.into_inner();
        self.call(
            Service::Controller,
            Cost::Short,
            "ListSnapshots",
            "",
            move |e| e.list_snapshots(ListSnapshots::try_from(&req)?),
        )
        .await
    }

    async fn get_snapshot(
        &self,
        req: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let req = req.into_inner();
        let subject = req.snapshot_id.clone();
        self.call(
            Service::Controller,
            Cost::Short,
            "GetSnapshot",
            &subject,
            move |e| e.get_snapshot(GetSnapshot::try_from(&req)?),
        )
        .await
    }

    async fn controller_expand_volume(
        &self,
        req: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        if !self.engine.controller_expansion {
            return unimplemented(self, "ControllerExpandVolume");
        }
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Controller,
            Cost::Blocking,
            "ControllerExpandVolume",
            &subject,
            move |e| e.controller_expand(ControllerExpand::try_from(&req)?),
        )
        .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Controller,
            Cost::Short,
            "ControllerGetVolume",
            &subject,
            move |e| e.get_volume(GetVolume::try_from(&req)?),
        )
        .await
    }

    async fn controller_modify_volume(
        &self,
        _req: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        unimplemented(self, "ControllerModifyVolume")
    }
}
