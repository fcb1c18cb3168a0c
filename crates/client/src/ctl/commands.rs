//! The handlers behind each `ctl` subcommand: build the request, call, print.
//!
//! Requests are never logged with `Debug` (prost's derive would print the secrets map);
//! debug logs name the RPC and the object it concerns only.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::identity_client::IdentityClient;
use stowage_csi::v1::node_client::NodeClient;
use stowage_csi::v1::{self as csi, volume_content_source, CapacityRange, Topology};
use tonic::transport::Channel;
use tracing::debug;

use super::{
    CapacityArgs, ControllerCommand, CreateVolumeArgs, CtlArgs, CtlCommand, CtlError,
    IdentityCommand, ListArgs, NodeCommand, SnapshotCommand, VolumeCommand,
};
use crate::args::{kv_map, OutputFormat};
use crate::convert::{self, map_cell, map_json};
use crate::output::{write_json, Fields, Table};
use crate::rpc::{request, unary};
use crate::secrets::Secrets;
use crate::size::format_size;

/// Everything a handler needs: the connection, the deadline, the secrets and where to print.
struct Ctx<'a> {
    channel: Channel,
    timeout: Duration,
    secrets: &'a Secrets,
    format: OutputFormat,
    out: &'a mut (dyn Write + Send),
}

impl Ctx<'_> {
    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    fn secrets(&self) -> HashMap<String, String> {
        self.secrets.to_map()
    }

    /// Prints `json` in JSON mode, otherwise runs `table`.
    fn emit(
        &mut self,
        json: Value,
        table: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<(), CtlError> {
        match self.format {
            OutputFormat::Json => write_json(self.out, &json)?,
            OutputFormat::Table => table(self.out)?,
        }
        Ok(())
    }

    /// For RPCs with an empty response: `{}` in JSON, a confirmation line in tables.
    fn done(&mut self, message: String) -> Result<(), CtlError> {
        self.emit(json!({}), |out| writeln!(out, "{message}"))
    }
}

fn usage(e: String) -> CtlError {
    CtlError::Usage(e)
}

fn capacity_range(required: Option<i64>, limit: Option<i64>) -> Option<CapacityRange> {
    if required.is_none() && limit.is_none() {
        return None;
    }
    Some(CapacityRange {
        required_bytes: required.unwrap_or(0),
        limit_bytes: limit.unwrap_or(0),
    })
}

fn topology(pairs: &[(String, String)]) -> Option<Topology> {
    (!pairs.is_empty()).then(|| Topology {
        segments: kv_map(pairs),
    })
}

/// Catches argument combinations clap cannot express before connecting, so a usage error
/// is reported as such even when the driver is down.
fn validate(command: &CtlCommand) -> Result<(), CtlError> {
    let single = |c: &crate::args::CapabilityArgs| c.capability().map(drop).map_err(usage);
    match command {
        CtlCommand::Controller(ControllerCommand::Publish(a)) => single(&a.capability),
        CtlCommand::Node(NodeCommand::Stage(a)) => single(&a.capability),
        CtlCommand::Node(NodeCommand::Publish(a)) => single(&a.capability),
        CtlCommand::Node(NodeCommand::Expand(a)) => single(&a.capability),
        CtlCommand::Volume(VolumeCommand::Expand(a)) => single(&a.capability),
        _ => Ok(()),
    }
}

pub(super) async fn dispatch(
    args: &CtlArgs,
    secrets: &Secrets,
    out: &mut (dyn Write + Send),
) -> Result<(), CtlError> {
    validate(&args.command)?;
    debug!(endpoint = %args.endpoint, "connecting");
    let channel = match tokio::time::timeout(args.timeout, crate::connect(&args.endpoint)).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => return Err(CtlError::Connect(e)),
        Err(_) => {
            return Err(CtlError::ConnectTimeout(format!(
                "cannot connect to {} within {}",
                args.endpoint,
                crate::size::format_duration(args.timeout)
            )))
        }
    };
    let mut ctx = Ctx {
        channel,
        timeout: args.timeout,
        secrets,
        format: args.output,
        out,
    };
    match &args.command {
        CtlCommand::Identity(cmd) => identity(&mut ctx, cmd).await,
        CtlCommand::Volume(cmd) => volume(&mut ctx, cmd).await,
        CtlCommand::Capacity(a) => capacity(&mut ctx, a).await,
        CtlCommand::Controller(cmd) => controller(&mut ctx, cmd).await,
        CtlCommand::Snapshot(cmd) => snapshot(&mut ctx, cmd).await,
        CtlCommand::Node(cmd) => node(&mut ctx, cmd).await,
    }
}

async fn identity(ctx: &mut Ctx<'_>, cmd: &IdentityCommand) -> Result<(), CtlError> {
    let t = ctx.timeout;
    let mut client = ctx.identity();
    match cmd {
        IdentityCommand::Info => {
            debug!(rpc = "GetPluginInfo", "calling");
            let r = unary(
                t,
                client.get_plugin_info(request(csi::GetPluginInfoRequest {}, t)),
            )
            .await?;
            let j = json!({
                "name": r.name,
                "vendor_version": r.vendor_version,
                "manifest": map_json(&r.manifest),
            });
            ctx.emit(j, |out| {
                Fields::new()
                    .add("NAME", r.name.clone())
                    .add("VENDOR VERSION", r.vendor_version.clone())
                    .add("MANIFEST", map_cell(&r.manifest))
                    .write(out)
            })
        }
        IdentityCommand::Caps => {
            debug!(rpc = "GetPluginCapabilities", "calling");
            let r = unary(
                t,
                client.get_plugin_capabilities(request(csi::GetPluginCapabilitiesRequest {}, t)),
            )
            .await?;
            let names: Vec<String> = r
                .capabilities
                .iter()
                .map(convert::plugin_capability_name)
                .collect();
            capability_list(ctx, names)
        }
        IdentityCommand::Probe => {
            debug!(rpc = "Probe", "calling");
            let r = unary(t, client.probe(request(csi::ProbeRequest {}, t))).await?;
            let ready = match r.ready {
                Some(true) => "true",
                Some(false) => "false",
                // The spec lets a plugin omit `ready`; the CO then assumes it is ready.
                None => "unset (ready)",
            };
            ctx.emit(json!({ "ready": r.ready }), |out| {
                Fields::new().add("READY", ready).write(out)
            })
        }
    }
}

fn capability_list(ctx: &mut Ctx<'_>, names: Vec<String>) -> Result<(), CtlError> {
    ctx.emit(json!({ "capabilities": names }), |out| {
        let mut t = Table::new(["CAPABILITY"]);
        for n in &names {
            t.row([n.clone()]);
        }
        t.write(out)
    })
}

async fn volume(ctx: &mut Ctx<'_>, cmd: &VolumeCommand) -> Result<(), CtlError> {
    let t = ctx.timeout;
    let mut client = ctx.controller();
    match cmd {
        VolumeCommand::Create(a) => create_volume(ctx, a).await,
        VolumeCommand::Delete { volume_id } => {
            debug!(rpc = "DeleteVolume", volume_id = %volume_id, "calling");
            let req = csi::DeleteVolumeRequest {
                volume_id: volume_id.clone(),
                secrets: ctx.secrets(),
            };
            unary(t, client.delete_volume(request(req, t))).await?;
            ctx.done(format!("volume {volume_id:?} deleted"))
        }
        VolumeCommand::List(list) => list_volumes(ctx, list).await,
        VolumeCommand::Get { volume_id } => {
            debug!(rpc = "ControllerGetVolume", volume_id = %volume_id, "calling");
            let req = csi::ControllerGetVolumeRequest {
                volume_id: volume_id.clone(),
            };
            let r = unary(t, client.controller_get_volume(request(req, t))).await?;
            let volume = r.volume.unwrap_or_default();
            let (nodes, condition) = match &r.status {
                Some(s) => (s.published_node_ids.clone(), s.volume_condition.clone()),
                None => (Vec::new(), None),
            };
            let status = r.status.as_ref().map(|_| {
                json!({
                    "published_node_ids": nodes,
                    "volume_condition": convert::condition_json(condition.as_ref()),
                })
            });
            let j = json!({ "volume": convert::volume_json(&volume), "status": status });
            ctx.emit(j, |out| {
                let mut f = volume_fields(&volume);
                f.add("PUBLISHED NODES", convert::list_cell(&nodes))
                    .add("CONDITION", convert::condition_cell(condition.as_ref()));
                f.write(out)
            })
        }
        VolumeCommand::Validate(a) => {
            debug!(rpc = "ValidateVolumeCapabilities", volume_id = %a.volume_id, "calling");
            let req = csi::ValidateVolumeCapabilitiesRequest {
                volume_id: a.volume_id.clone(),
                volume_context: kv_map(&a.context),
                volume_capabilities: a.capability.capabilities(),
                parameters: kv_map(&a.params),
                secrets: ctx.secrets(),
                mutable_parameters: kv_map(&a.mutable_params),
            };
            let r = unary(t, client.validate_volume_capabilities(request(req, t))).await?;
            let confirmed = r.confirmed.as_ref().map(|c| {
                json!({
                    "volume_context": map_json(&c.volume_context),
                    "volume_capabilities": c.volume_capabilities.iter().map(convert::capability_json).collect::<Vec<_>>(),
                    "parameters": map_json(&c.parameters),
                    "mutable_parameters": map_json(&c.mutable_parameters),
                })
            });
            let j = json!({ "confirmed": confirmed, "message": r.message });
            ctx.emit(j, |out| {
                let mut f = Fields::new();
                match &r.confirmed {
                    Some(c) => {
                        f.add("CONFIRMED", "yes");
                        for cap in &c.volume_capabilities {
                            f.add("CAPABILITY", convert::capability_cell(cap));
                        }
                    }
                    None => {
                        f.add("CONFIRMED", "no");
                    }
                }
                if !r.message.is_empty() {
                    f.add("MESSAGE", r.message.clone());
                }
                f.write(out)
            })
        }
        VolumeCommand::Expand(a) => {
            debug!(rpc = "ControllerExpandVolume", volume_id = %a.volume_id, "calling");
            let req = csi::ControllerExpandVolumeRequest {
                volume_id: a.volume_id.clone(),
                capacity_range: capacity_range(Some(a.size), a.limit),
                secrets: ctx.secrets(),
                volume_capability: a.capability.optional_capability().map_err(usage)?,
            };
            let r = unary(t, client.controller_expand_volume(request(req, t))).await?;
            let j = json!({
                "capacity_bytes": r.capacity_bytes,
                "node_expansion_required": r.node_expansion_required,
            });
            ctx.emit(j, |out| {
                Fields::new()
                    .add("CAPACITY", size_with_bytes(r.capacity_bytes))
                    .add(
                        "NODE EXPANSION REQUIRED",
                        r.node_expansion_required.to_string(),
                    )
                    .write(out)
            })
        }
        VolumeCommand::Modify(a) => {
            debug!(rpc = "ControllerModifyVolume", volume_id = %a.volume_id, "calling");
            let req = csi::ControllerModifyVolumeRequest {
                volume_id: a.volume_id.clone(),
                secrets: ctx.secrets(),
                mutable_parameters: kv_map(&a.mutable_params),
            };
            unary(t, client.controller_modify_volume(request(req, t))).await?;
            ctx.done(format!("volume {:?} modified", a.volume_id))
        }
    }
}

fn size_with_bytes(bytes: i64) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        format!("{} ({bytes} bytes)", format_size(bytes))
    }
}

fn volume_fields(v: &csi::Volume) -> Fields {
    let mut f = Fields::new();
    f.add("VOLUME ID", v.volume_id.clone())
        .add("CAPACITY", size_with_bytes(v.capacity_bytes))
        .add("CONTEXT", map_cell(&v.volume_context))
        .add(
            "SOURCE",
            convert::content_source_cell(v.content_source.as_ref()),
        )
        .add("TOPOLOGY", convert::topologies_cell(&v.accessible_topology));
    f
}

async fn create_volume(ctx: &mut Ctx<'_>, a: &CreateVolumeArgs) -> Result<(), CtlError> {
    let t = ctx.timeout;
    let source = match (&a.source_snapshot, &a.source_volume) {
        (Some(s), _) => Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: s.clone(),
            },
        )),
        (None, Some(v)) => Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: v.clone(),
            },
        )),
        (None, None) => None,
    };
    let accessibility = topology(&a.topology).map(|t| csi::TopologyRequirement {
        requisite: vec![t.clone()],
        preferred: vec![t],
    });
    let req = csi::CreateVolumeRequest {
        name: a.name.clone(),
        capacity_range: capacity_range(a.size, a.limit),
        volume_capabilities: a.capability.capabilities(),
        parameters: kv_map(&a.params),
        secrets: ctx.secrets(),
        volume_content_source: source.map(|s| csi::VolumeContentSource { r#type: Some(s) }),
        accessibility_requirements: accessibility,
        mutable_parameters: kv_map(&a.mutable_params),
    };
    debug!(rpc = "CreateVolume", name = %a.name, "calling");
    let r = unary(t, ctx.controller().create_volume(request(req, t))).await?;
    let volume = r.volume.unwrap_or_default();
    ctx.emit(json!({ "volume": convert::volume_json(&volume) }), |out| {
        volume_fields(&volume).write(out)
    })
}

/// Follows `next_token` when `--all` is given; a driver that hands back a token it already
/// returned would otherwise make us loop forever.
async fn paged<E, F, Fut>(list: &ListArgs, mut fetch: F) -> Result<(Vec<E>, String), CtlError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<E>, String), tonic::Status>>,
{
    let mut entries = Vec::new();
    let mut token = list.starting_token.clone().unwrap_or_default();
    let mut seen = std::collections::HashSet::new();
    loop {
        let (page, next) = fetch(token).await?;
        entries.extend(page);
        if !list.all || next.is_empty() {
            return Ok((entries, next));
        }
        if !seen.insert(next.clone()) {
            return Err(CtlError::Rpc(tonic::Status::internal(format!(
                "driver returned next_token {next:?} twice; stopping to avoid an endless listing"
            ))));
        }
        token = next;
    }
}

async fn list_volumes(ctx: &mut Ctx<'_>, list: &ListArgs) -> Result<(), CtlError> {
    let t = ctx.timeout;
    let client = ctx.controller();
    let (entries, next) = paged(list, |token| {
        let mut client = client.clone();
        async move {
            debug!(rpc = "ListVolumes", starting_token = %token, "calling");
            let req = csi::ListVolumesRequest {
                max_entries: list.max_entries,
                starting_token: token,
            };
            let r = unary(t, client.list_volumes(request(req, t))).await?;
            Ok((r.entries, r.next_token))
        }
    })
    .await?;
    let j = json!({
        "entries": entries.iter().map(|e| json!({
            "volume": e.volume.as_ref().map(convert::volume_json),
            "status": e.status.as_ref().map(|s| json!({
                "published_node_ids": s.published_node_ids,
                "volume_condition": convert::condition_json(s.volume_condition.as_ref()),
            })),
        })).collect::<Vec<_>>(),
        "next_token": next,
    });
    ctx.emit(j, |out| {
        let mut table = Table::new([
            "VOLUME ID",
            "CAPACITY",
            "SOURCE",
            "TOPOLOGY",
            "PUBLISHED NODES",
            "CONDITION",
        ]);
        for e in &entries {
            let v = e.volume.clone().unwrap_or_default();
            let (nodes, cond) = match &e.status {
                Some(s) => (
                    convert::list_cell(&s.published_node_ids),
                    convert::condition_cell(s.volume_condition.as_ref()),
                ),
                None => ("-".into(), "-".into()),
            };
            table.row([
                v.volume_id.clone(),
                convert::size_cell(v.capacity_bytes),
                convert::content_source_cell(v.content_source.as_ref()),
                convert::topologies_cell(&v.accessible_topology),
                nodes,
                cond,
            ]);
        }
        table.write(out)?;
        if !next.is_empty() {
            writeln!(out, "\nnext token: {next}")?;
        }
        Ok(())
    })
}

async fn capacity(ctx: &mut Ctx<'_>, a: &CapacityArgs) -> Result<(), CtlError> {
    let t = ctx.timeout;
    let req = csi::GetCapacityRequest {
        volume_capabilities: if a.capability.is_given() {
            a.capability.capabilities()
        } else {
            Vec::new()
        },
        parameters: kv_map(&a.params),
        accessible_topology: topology(&a.topology),
    };
    debug!(rpc = "GetCapacity", "calling");
    let r = unary(t, ctx.controller().get_capacity(request(req, t))).await?;
    let j = json!({
        "available_capacity": r.available_capacity,
        "maximum_volume_size": r.maximum_volume_size,
        "minimum_volume_size": r.minimum_volume_size,
    });
    let opt = |v: Option<i64>| v.map(size_with_bytes).unwrap_or_else(|| "-".into());
    ctx.emit(j, |out| {
        Fields::new()
            .add(
                "AVAILABLE",
                format!(
                    "{} ({} bytes)",
                    format_size(r.available_capacity),
                    r.available_capacity
                ),
            )
            .add("MAXIMUM VOLUME SIZE", opt(r.maximum_volume_size))
            .add("MINIMUM VOLUME SIZE", opt(r.minimum_volume_size))
            .write(out)
    })
}

async fn controller(ctx: &mut Ctx<'_>, cmd: &ControllerCommand) -> Result<(), CtlError> {
    let t = ctx.timeout;
    let mut client = ctx.controller();
    match cmd {
        ControllerCommand::Caps => {
            debug!(rpc = "ControllerGetCapabilities", "calling");
            let r = unary(
                t,
                client.controller_get_capabilities(request(
                    csi::ControllerGetCapabilitiesRequest {},
                    t,
                )),
            )
            .await?;
            let names = r
                .capabilities
                .iter()
                .map(convert::controller_capability_name)
                .collect();
            capability_list(ctx, names)
        }
        ControllerCommand::Publish(a) => {
            debug!(rpc = "ControllerPublishVolume", volume_id = %a.volume_id, node_id = %a.node_id, "calling");
            let req = csi::ControllerPublishVolumeRequest {
                volume_id: a.volume_id.clone(),
                node_id: a.node_id.clone(),
                volume_capability: Some(a.capability.capability().map_err(usage)?),
                readonly: a.readonly,
                secrets: ctx.secrets(),
                volume_context: kv_map(&a.context),
            };
            let r = unary(t, client.controller_publish_volume(request(req, t))).await?;
            ctx.emit(
                json!({ "publish_context": map_json(&r.publish_context) }),
                |out| {
                    Fields::new()
                        .add("PUBLISH CONTEXT", map_cell(&r.publish_context))
                        .write(out)
                },
            )
        }
        ControllerCommand::Unpublish { volume_id, node_id } => {
            debug!(rpc = "ControllerUnpublishVolume", volume_id = %volume_id, "calling");
            let req = csi::ControllerUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                node_id: node_id.clone().unwrap_or_default(),
                secrets: ctx.secrets(),
            };
            unary(t, client.controller_unpublish_volume(request(req, t))).await?;
            let from = match node_id {
                Some(n) => format!("node {n:?}"),
                None => "all nodes".to_owned(),
            };
            ctx.done(format!("volume {volume_id:?} unpublished from {from}"))
        }
    }
}

fn snapshot_fields(s: &csi::Snapshot) -> Fields {
    let mut f = Fields::new();
    f.add("SNAPSHOT ID", s.snapshot_id.clone())
        .add("SOURCE VOLUME", s.source_volume_id.clone())
        .add("SIZE", size_with_bytes(s.size_bytes))
        .add(
            "CREATED",
            s.creation_time
                .as_ref()
                .map(convert::timestamp_string)
                .unwrap_or_else(|| "-".into()),
        )
        .add("READY", s.ready_to_use.to_string());
    if !s.group_snapshot_id.is_empty() {
        f.add("GROUP SNAPSHOT", s.group_snapshot_id.clone());
    }
    f
}

async fn snapshot(ctx: &mut Ctx<'_>, cmd: &SnapshotCommand) -> Result<(), CtlError> {
    let t = ctx.timeout;
    let mut client = ctx.controller();
    match cmd {
        SnapshotCommand::Create {
            name,
            source,
            params,
        } => {
            debug!(rpc = "CreateSnapshot", name = %name, source_volume_id = %source, "calling");
            let req = csi::CreateSnapshotRequest {
                source_volume_id: source.clone(),
                name: name.clone(),
                secrets: ctx.secrets(),
                parameters: kv_map(params),
            };
            let r = unary(t, client.create_snapshot(request(req, t))).await?;
            let s = r.snapshot.unwrap_or_default();
            ctx.emit(json!({ "snapshot": convert::snapshot_json(&s) }), |out| {
                snapshot_fields(&s).write(out)
            })
        }
        SnapshotCommand::Delete { snapshot_id } => {
            debug!(rpc = "DeleteSnapshot", snapshot_id = %snapshot_id, "calling");
            let req = csi::DeleteSnapshotRequest {
                snapshot_id: snapshot_id.clone(),
                secrets: ctx.secrets(),
            };
            unary(t, client.delete_snapshot(request(req, t))).await?;
            ctx.done(format!("snapshot {snapshot_id:?} deleted"))
        }
        SnapshotCommand::Get { snapshot_id } => {
            debug!(rpc = "GetSnapshot", snapshot_id = %snapshot_id, "calling");
            let req = csi::GetSnapshotRequest {
                snapshot_id: snapshot_id.clone(),
                secrets: ctx.secrets(),
            };
            let r = unary(t, client.get_snapshot(request(req, t))).await?;
            let s = r.snapshot.unwrap_or_default();
            ctx.emit(json!({ "snapshot": convert::snapshot_json(&s) }), |out| {
                snapshot_fields(&s).write(out)
            })
        }
        SnapshotCommand::List {
            list,
            source_volume,
            snapshot_id,
        } => {
            let secrets = ctx.secrets();
            let (entries, next) = paged(list, |token| {
                let mut client = client.clone();
                let req = csi::ListSnapshotsRequest {
                    max_entries: list.max_entries,
                    starting_token: token,
                    source_volume_id: source_volume.clone().unwrap_or_default(),
                    snapshot_id: snapshot_id.clone().unwrap_or_default(),
                    secrets: secrets.clone(),
                };
                async move {
                    debug!(rpc = "ListSnapshots", starting_token = %req.starting_token, "calling");
                    let r = unary(t, client.list_snapshots(request(req, t))).await?;
                    Ok((r.entries, r.next_token))
                }
            })
            .await?;
            let snaps: Vec<csi::Snapshot> =
                entries.into_iter().filter_map(|e| e.snapshot).collect();
            let j = json!({
                "entries": snaps.iter().map(|s| json!({"snapshot": convert::snapshot_json(s)})).collect::<Vec<_>>(),
                "next_token": next,
            });
            ctx.emit(j, |out| {
                let mut table =
                    Table::new(["SNAPSHOT ID", "SOURCE VOLUME", "SIZE", "READY", "CREATED"]);
                for s in &snaps {
                    table.row([
                        s.snapshot_id.clone(),
                        s.source_volume_id.clone(),
                        convert::size_cell(s.size_bytes),
                        s.ready_to_use.to_string(),
                        s.creation_time
                            .as_ref()
                            .map(convert::timestamp_string)
                            .unwrap_or_else(|| "-".into()),
                    ]);
                }
                table.write(out)?;
                if !next.is_empty() {
                    writeln!(out, "\nnext token: {next}")?;
                }
                Ok(())
            })
        }
    }
}

async fn node(ctx: &mut Ctx<'_>, cmd: &NodeCommand) -> Result<(), CtlError> {
    let t = ctx.timeout;
    let mut client = ctx.node();
    match cmd {
        NodeCommand::Info => {
            debug!(rpc = "NodeGetInfo", "calling");
            let r = unary(
                t,
                client.node_get_info(request(csi::NodeGetInfoRequest {}, t)),
            )
            .await?;
            let j = json!({
                "node_id": r.node_id,
                "max_volumes_per_node": r.max_volumes_per_node,
                "accessible_topology": r.accessible_topology.as_ref().map(convert::topology_json),
            });
            ctx.emit(j, |out| {
                let max = if r.max_volumes_per_node == 0 {
                    "unlimited".to_owned()
                } else {
                    r.max_volumes_per_node.to_string()
                };
                Fields::new()
                    .add("NODE ID", r.node_id.clone())
                    .add("MAX VOLUMES", max)
                    .add(
                        "TOPOLOGY",
                        r.accessible_topology
                            .as_ref()
                            .map(|t| map_cell(&t.segments))
                            .unwrap_or_else(|| "-".into()),
                    )
                    .write(out)
            })
        }
        NodeCommand::Caps => {
            debug!(rpc = "NodeGetCapabilities", "calling");
            let r = unary(
                t,
                client.node_get_capabilities(request(csi::NodeGetCapabilitiesRequest {}, t)),
            )
            .await?;
            let names = r
                .capabilities
                .iter()
                .map(convert::node_capability_name)
                .collect();
            capability_list(ctx, names)
        }
        NodeCommand::Stage(a) => {
            debug!(rpc = "NodeStageVolume", volume_id = %a.volume_id, staging_path = %a.staging_path, "calling");
            let req = csi::NodeStageVolumeRequest {
                volume_id: a.volume_id.clone(),
                publish_context: kv_map(&a.publish_context),
                staging_target_path: a.staging_path.clone(),
                volume_capability: Some(a.capability.capability().map_err(usage)?),
                secrets: ctx.secrets(),
                volume_context: kv_map(&a.context),
            };
            unary(t, client.node_stage_volume(request(req, t))).await?;
            ctx.done(format!(
                "volume {:?} staged at {}",
                a.volume_id, a.staging_path
            ))
        }
        NodeCommand::Unstage {
            volume_id,
            staging_path,
        } => {
            debug!(rpc = "NodeUnstageVolume", volume_id = %volume_id, "calling");
            let req = csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.clone(),
                staging_target_path: staging_path.clone(),
            };
            unary(t, client.node_unstage_volume(request(req, t))).await?;
            ctx.done(format!("volume {volume_id:?} unstaged from {staging_path}"))
        }
        NodeCommand::Publish(a) => {
            debug!(rpc = "NodePublishVolume", volume_id = %a.volume_id, target_path = %a.target_path, "calling");
            let req = csi::NodePublishVolumeRequest {
                volume_id: a.volume_id.clone(),
                publish_context: kv_map(&a.publish_context),
                staging_target_path: a.staging_path.clone().unwrap_or_default(),
                target_path: a.target_path.clone(),
                volume_capability: Some(a.capability.capability().map_err(usage)?),
                readonly: a.readonly,
                secrets: ctx.secrets(),
                volume_context: kv_map(&a.context),
            };
            unary(t, client.node_publish_volume(request(req, t))).await?;
            ctx.done(format!(
                "volume {:?} published at {}",
                a.volume_id, a.target_path
            ))
        }
        NodeCommand::Unpublish {
            volume_id,
            target_path,
        } => {
            debug!(rpc = "NodeUnpublishVolume", volume_id = %volume_id, "calling");
            let req = csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.clone(),
                target_path: target_path.clone(),
            };
            unary(t, client.node_unpublish_volume(request(req, t))).await?;
            ctx.done(format!(
                "volume {volume_id:?} unpublished from {target_path}"
            ))
        }
        NodeCommand::Stats {
            volume_id,
            volume_path,
            staging_path,
        } => {
            debug!(rpc = "NodeGetVolumeStats", volume_id = %volume_id, "calling");
            let req = csi::NodeGetVolumeStatsRequest {
                volume_id: volume_id.clone(),
                volume_path: volume_path.clone(),
                staging_target_path: staging_path.clone().unwrap_or_default(),
            };
            let r = unary(t, client.node_get_volume_stats(request(req, t))).await?;
            let j = json!({
                "usage": r.usage.iter().map(convert::usage_json).collect::<Vec<_>>(),
                "volume_condition": convert::condition_json(r.volume_condition.as_ref()),
            });
            ctx.emit(j, |out| {
                let mut table = Table::new(["UNIT", "TOTAL", "USED", "AVAILABLE"]);
                for u in &r.usage {
                    let unit = convert::usage_unit_name(u);
                    let cell = |v: i64| {
                        if unit == "BYTES" {
                            format_size(v)
                        } else {
                            v.to_string()
                        }
                    };
                    table.row([unit.clone(), cell(u.total), cell(u.used), cell(u.available)]);
                }
                table.write(out)?;
                if r.volume_condition.is_some() {
                    writeln!(
                        out,
                        "\ncondition: {}",
                        convert::condition_cell(r.volume_condition.as_ref())
                    )?;
                }
                Ok(())
            })
        }
        NodeCommand::Expand(a) => {
            debug!(rpc = "NodeExpandVolume", volume_id = %a.volume_id, "calling");
            let req = csi::NodeExpandVolumeRequest {
                volume_id: a.volume_id.clone(),
                volume_path: a.volume_path.clone(),
                capacity_range: capacity_range(a.size, a.limit),
                staging_target_path: a.staging_path.clone().unwrap_or_default(),
                volume_capability: a.capability.optional_capability().map_err(usage)?,
                secrets: ctx.secrets(),
            };
            let r = unary(t, client.node_expand_volume(request(req, t))).await?;
            ctx.emit(json!({ "capacity_bytes": r.capacity_bytes }), |out| {
                Fields::new()
                    .add("CAPACITY", size_with_bytes(r.capacity_bytes))
                    .write(out)
            })
        }
    }
}
