//! An in-memory CSI driver (Identity + Controller + Node) served on a Unix socket in a
//! temporary directory. It follows the spec closely enough to catch client mistakes:
//! idempotent creates by name, NOT_FOUND for unknown volumes, FAILED_PRECONDITION when
//! deleting a volume that is still published or publishing a SINGLE_NODE_WRITER volume at a
//! second target, and required staging when STAGE_UNSTAGE_VOLUME is advertised.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use stowage_csi::v1::controller_server::{Controller, ControllerServer};
use stowage_csi::v1::controller_service_capability::rpc::Type as CCap;
use stowage_csi::v1::identity_server::{Identity, IdentityServer};
use stowage_csi::v1::node_server::{Node, NodeServer};
use stowage_csi::v1::node_service_capability::rpc::Type as NCap;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_csi::v1::*;
use tokio::net::UnixListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

/// Knobs for a test's fake driver.
#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// Advertise STAGE_UNSTAGE_VOLUME and require staging before publish.
    pub stage: bool,
    /// Advertise PUBLISH_UNPUBLISH_VOLUME.
    pub controller_publish: bool,
    /// Sleep before answering CreateVolume / NodePublishVolume.
    pub op_delay: Duration,
    /// The first CreateVolume of a name stores the volume, then sleeps this long before
    /// answering (a create that happens but whose response is late).
    pub slow_first_create: Option<Duration>,
    /// ListVolumes never returns more than this many volumes in total, across all pages
    /// (a driver whose pagination loses entries).
    pub list_cap: Option<usize>,
    /// Accept staging and target paths only beneath this directory, as a driver with a
    /// kubelet-directory allow-list does (INVALID_ARGUMENT otherwise).
    pub allowed_dir: Option<PathBuf>,
}

/// Observable state of the fake.
#[derive(Debug, Default)]
pub struct State {
    pub volumes: BTreeMap<String, Volume>,
    pub names: BTreeMap<String, String>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub snapshot_names: BTreeMap<String, String>,
    pub staged: BTreeSet<(String, String)>,
    /// (volume ID, target path, access mode)
    pub published: BTreeSet<(String, String, i32)>,
    pub controller_published: BTreeSet<(String, String)>,
    pub last_secrets: HashMap<String, String>,
    pub create_volume_calls: usize,
    pub node_publish_calls: usize,
}

impl State {
    /// Nothing created is left.
    pub fn is_clean(&self) -> bool {
        self.volumes.is_empty()
            && self.snapshots.is_empty()
            && self.staged.is_empty()
            && self.published.is_empty()
            && self.controller_published.is_empty()
    }
}

#[derive(Clone)]
struct Fake {
    state: Arc<Mutex<State>>,
    behavior: Behavior,
}

impl Fake {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// INVALID_ARGUMENT for a path outside [`Behavior::allowed_dir`], worded the way
    /// stowage words it.
    fn check_path(&self, field: &str, path: &str) -> Result<(), Status> {
        match &self.behavior.allowed_dir {
            Some(dir) if !Path::new(path).starts_with(dir) || Path::new(path) == dir => {
                Err(Status::invalid_argument(format!(
                    "{field} {path:?} is outside the kubelet directories this driver serves ({})",
                    dir.display()
                )))
            }
            _ => Ok(()),
        }
    }

    fn record_secrets(&self, secrets: &HashMap<String, String>) {
        if !secrets.is_empty() {
            self.lock().last_secrets = secrets.clone();
        }
    }
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("volume {id:?} does not exist"))
}

/// A running fake driver; dropping it stops the server and removes the socket directory.
pub struct FakeServer {
    pub endpoint: String,
    pub state: Arc<Mutex<State>>,
    _shutdown: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl FakeServer {
    pub async fn start(behavior: Behavior) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let fake = Fake {
            state: state.clone(),
            behavior,
        };
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(IdentityServer::new(fake.clone()))
                .add_service(ControllerServer::new(fake.clone()))
                .add_service(NodeServer::new(fake))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = rx.await;
                }),
        );
        Self {
            endpoint: format!("unix://{}", path.display()),
            state,
            _shutdown: tx,
            _dir: dir,
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Seeds a volume directly.
    pub fn add_volume(&self, id: &str, bytes: i64) {
        let mut s = self.state();
        s.volumes.insert(
            id.to_owned(),
            Volume {
                volume_id: id.to_owned(),
                capacity_bytes: bytes,
                ..Default::default()
            },
        );
    }
}

#[tonic::async_trait]
impl Identity for Fake {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: "fake.csi.stowage.test".into(),
            vendor_version: "0.0.1".into(),
            manifest: [("commit".to_owned(), "abc".to_owned())].into(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                PluginCapability {
                    r#type: Some(Type::Service(Service {
                        r#type: service::Type::ControllerService as i32,
                    })),
                },
                PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Online as i32,
                    })),
                },
            ],
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl Controller for Fake {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        self.record_secrets(&r.secrets);
        if r.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities are required"));
        }
        if r.parameters.contains_key("fail") {
            // A careless driver echoing the secrets: the client must scrub them.
            let values: Vec<&String> = r.secrets.values().collect();
            return Err(Status::invalid_argument(format!(
                "cannot authenticate with {values:?}"
            )));
        }
        if !self.behavior.op_delay.is_zero() {
            tokio::time::sleep(self.behavior.op_delay).await;
        }
        let (volume, first) = {
            let mut s = self.lock();
            s.create_volume_calls += 1;
            if let Some(id) = s.names.get(&r.name).cloned() {
                (s.volumes[&id].clone(), false)
            } else {
                let id = format!("vol-{}", r.name);
                let v = Volume {
                    capacity_bytes: r
                        .capacity_range
                        .map(|c| c.required_bytes)
                        .unwrap_or(1 << 30),
                    volume_id: id.clone(),
                    volume_context: [("fake".to_owned(), "yes".to_owned())].into(),
                    content_source: r.volume_content_source.clone(),
                    accessible_topology: r
                        .accessibility_requirements
                        .map(|a| a.requisite)
                        .unwrap_or_default(),
                };
                s.names.insert(r.name.clone(), id.clone());
                s.volumes.insert(id, v.clone());
                (v, true)
            }
        };
        if first {
            if let Some(d) = self.behavior.slow_first_create {
                tokio::time::sleep(d).await;
            }
        }
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        self.record_secrets(&r.secrets);
        let mut s = self.lock();
        let in_use = s.published.iter().any(|p| p.0 == r.volume_id)
            || s.staged.iter().any(|p| p.0 == r.volume_id)
            || s.controller_published.iter().any(|p| p.0 == r.volume_id);
        if in_use {
            return Err(Status::failed_precondition(format!(
                "volume {:?} is still in use",
                r.volume_id
            )));
        }
        if s.volumes.remove(&r.volume_id).is_some() {
            s.names.retain(|_, id| *id != r.volume_id);
        }
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        self.record_secrets(&r.secrets);
        let mut s = self.lock();
        if !s.volumes.contains_key(&r.volume_id) {
            return Err(not_found(&r.volume_id));
        }
        if r.node_id.is_empty() || r.volume_capability.is_none() {
            return Err(Status::invalid_argument(
                "node_id and volume_capability are required",
            ));
        }
        s.controller_published.insert((r.volume_id, r.node_id));
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context: [("device".to_owned(), "/dev/fake0".to_owned())].into(),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let mut s = self.lock();
        s.controller_published
            .retain(|(v, n)| !(*v == r.volume_id && (r.node_id.is_empty() || *n == r.node_id)));
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        if !self.lock().volumes.contains_key(&r.volume_id) {
            return Err(not_found(&r.volume_id));
        }
        let block = r
            .volume_capabilities
            .iter()
            .any(|c| matches!(c.access_type, Some(volume_capability::AccessType::Block(_))));
        if block {
            return Ok(Response::new(ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: "block volumes are not supported".into(),
            }));
        }
        Ok(Response::new(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: r.volume_context,
                volume_capabilities: r.volume_capabilities,
                parameters: r.parameters,
                mutable_parameters: r.mutable_parameters,
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let s = self.lock();
        let start: usize = if r.starting_token.is_empty() {
            0
        } else {
            r.starting_token
                .parse()
                .map_err(|_| Status::aborted("invalid starting_token"))?
        };
        let cap = self.behavior.list_cap.unwrap_or(usize::MAX);
        let all: Vec<&Volume> = s.volumes.values().take(cap).collect();
        let max = if r.max_entries > 0 {
            r.max_entries as usize
        } else {
            usize::MAX
        };
        let page: Vec<_> = all.iter().skip(start).take(max).collect();
        let end = start + page.len();
        Ok(Response::new(ListVolumesResponse {
            entries: page
                .into_iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some((*v).clone()),
                    status: Some(list_volumes_response::VolumeStatus {
                        published_node_ids: s
                            .controller_published
                            .iter()
                            .filter(|p| p.0 == v.volume_id)
                            .map(|p| p.1.clone())
                            .collect(),
                        volume_condition: None,
                    }),
                })
                .collect(),
            next_token: if end < all.len() {
                end.to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn get_capacity(
        &self,
        _: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Ok(Response::new(GetCapacityResponse {
            available_capacity: 10 << 30,
            maximum_volume_size: Some(1 << 40),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let mut caps = vec![
            CCap::CreateDeleteVolume,
            CCap::ListVolumes,
            CCap::GetCapacity,
            CCap::CreateDeleteSnapshot,
            CCap::ListSnapshots,
            CCap::ExpandVolume,
            CCap::GetVolume,
            CCap::GetSnapshot,
            CCap::ModifyVolume,
        ];
        if self.behavior.controller_publish {
            caps.push(CCap::PublishUnpublishVolume);
        }
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|c| ControllerServiceCapability {
                    r#type: Some(controller_service_capability::Type::Rpc(
                        controller_service_capability::Rpc { r#type: c as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.record_secrets(&r.secrets);
        let mut s = self.lock();
        if !s.volumes.contains_key(&r.source_volume_id) {
            return Err(not_found(&r.source_volume_id));
        }
        if let Some(id) = s.snapshot_names.get(&r.name).cloned() {
            return Ok(Response::new(CreateSnapshotResponse {
                snapshot: Some(s.snapshots[&id].clone()),
            }));
        }
        let id = format!("snap-{}", r.name);
        let snap = Snapshot {
            size_bytes: s.volumes[&r.source_volume_id].capacity_bytes,
            snapshot_id: id.clone(),
            source_volume_id: r.source_volume_id,
            creation_time: Some(prost_types::Timestamp {
                seconds: 1_714_564_800,
                nanos: 0,
            }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        };
        s.snapshot_names.insert(r.name, id.clone());
        s.snapshots.insert(id, snap.clone());
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snap),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mut s = self.lock();
        s.snapshots.remove(&r.snapshot_id);
        s.snapshot_names.retain(|_, id| *id != r.snapshot_id);
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let s = self.lock();
        let entries = s
            .snapshots
            .values()
            .filter(|x| r.source_volume_id.is_empty() || x.source_volume_id == r.source_volume_id)
            .filter(|x| r.snapshot_id.is_empty() || x.snapshot_id == r.snapshot_id)
            .map(|x| list_snapshots_response::Entry {
                snapshot: Some(x.clone()),
            })
            .collect();
        Ok(Response::new(ListSnapshotsResponse {
            entries,
            next_token: String::new(),
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let r = request.into_inner();
        match self.lock().snapshots.get(&r.snapshot_id) {
            Some(x) => Ok(Response::new(GetSnapshotResponse {
                snapshot: Some(x.clone()),
            })),
            None => Err(Status::not_found(format!(
                "snapshot {:?} does not exist",
                r.snapshot_id
            ))),
        }
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let mut s = self.lock();
        let v = s
            .volumes
            .get_mut(&r.volume_id)
            .ok_or_else(|| not_found(&r.volume_id))?;
        v.capacity_bytes = r.capacity_range.map(|c| c.required_bytes).unwrap_or(0);
        Ok(Response::new(ControllerExpandVolumeResponse {
            capacity_bytes: v.capacity_bytes,
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let r = request.into_inner();
        let s = self.lock();
        let v = s
            .volumes
            .get(&r.volume_id)
            .ok_or_else(|| not_found(&r.volume_id))?;
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(v.clone()),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: s
                    .controller_published
                    .iter()
                    .filter(|p| p.0 == r.volume_id)
                    .map(|p| p.1.clone())
                    .collect(),
                volume_condition: Some(VolumeCondition {
                    abnormal: false,
                    message: "healthy".into(),
                }),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        let r = request.into_inner();
        self.record_secrets(&r.secrets);
        let mut s = self.lock();
        let v = s
            .volumes
            .get_mut(&r.volume_id)
            .ok_or_else(|| not_found(&r.volume_id))?;
        v.volume_context.extend(r.mutable_parameters);
        Ok(Response::new(ControllerModifyVolumeResponse {}))
    }
}

#[tonic::async_trait]
impl Node for Fake {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        self.record_secrets(&r.secrets);
        self.check_path("staging_target_path", &r.staging_target_path)?;
        let mut s = self.lock();
        if !s.volumes.contains_key(&r.volume_id) {
            return Err(not_found(&r.volume_id));
        }
        if r.staging_target_path.is_empty() || r.volume_capability.is_none() {
            return Err(Status::invalid_argument(
                "staging path and capability required",
            ));
        }
        s.staged.insert((r.volume_id, r.staging_target_path));
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let mut s = self.lock();
        if s.published.iter().any(|p| p.0 == r.volume_id) {
            return Err(Status::failed_precondition("volume still published"));
        }
        s.staged.remove(&(r.volume_id, r.staging_target_path));
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        self.record_secrets(&r.secrets);
        self.lock().node_publish_calls += 1;
        self.check_path("target_path", &r.target_path)?;
        if !self.behavior.op_delay.is_zero() {
            tokio::time::sleep(self.behavior.op_delay).await;
        }
        let mut s = self.lock();
        if !s.volumes.contains_key(&r.volume_id) {
            return Err(not_found(&r.volume_id));
        }
        if self.behavior.stage
            && !s
                .staged
                .contains(&(r.volume_id.clone(), r.staging_target_path.clone()))
        {
            return Err(Status::failed_precondition("volume is not staged"));
        }
        let mode = r
            .volume_capability
            .and_then(|c| c.access_mode)
            .map(|m| m.mode)
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let single = mode == Mode::SingleNodeWriter as i32;
        if single
            && s.published
                .iter()
                .any(|p| p.0 == r.volume_id && p.1 != r.target_path)
        {
            return Err(Status::failed_precondition(
                "SINGLE_NODE_WRITER volume already published at another target",
            ));
        }
        s.published.insert((r.volume_id, r.target_path, mode));
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let mut s = self.lock();
        s.published
            .retain(|p| !(p.0 == r.volume_id && p.1 == r.target_path));
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let s = self.lock();
        let v = s
            .volumes
            .get(&r.volume_id)
            .ok_or_else(|| not_found(&r.volume_id))?;
        Ok(Response::new(NodeGetVolumeStatsResponse {
            usage: vec![
                VolumeUsage {
                    available: v.capacity_bytes / 2,
                    total: v.capacity_bytes,
                    used: v.capacity_bytes / 2,
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    available: 900,
                    total: 1000,
                    used: 100,
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ],
            volume_condition: None,
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let s = self.lock();
        let v = s
            .volumes
            .get(&r.volume_id)
            .ok_or_else(|| not_found(&r.volume_id))?;
        Ok(Response::new(NodeExpandVolumeResponse {
            capacity_bytes: v.capacity_bytes,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let mut caps = vec![NCap::GetVolumeStats, NCap::ExpandVolume];
        if self.behavior.stage {
            caps.push(NCap::StageUnstageVolume);
        }
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: caps
                .into_iter()
                .map(|c| NodeServiceCapability {
                    r#type: Some(node_service_capability::Type::Rpc(
                        node_service_capability::Rpc { r#type: c as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: "fake-node".into(),
            max_volumes_per_node: 8,
            accessible_topology: Some(Topology {
                segments: [("zone".to_owned(), "z1".to_owned())].into(),
            }),
        }))
    }
}
