//! Typed requests: every CSI request the driver serves is turned into one of these by
//! `TryFrom`, before any I/O. A value of these types has passed every check that needs no
//! state; what needs the store or the kernel (does the volume exist, is the pool there) is
//! checked by the engine.

use std::collections::{BTreeMap, HashMap};

use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;

use crate::ids::{check_csi_string, SnapshotRef, VolumeName, VolumeRef};
use crate::{Error, Result};

/// Parameter naming the pool in a StorageClass.
pub const PARAM_POOL: &str = "pool";
/// Added by the external-provisioner with `--extra-create-metadata`.
pub const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
/// Added by the external-provisioner with `--extra-create-metadata`.
pub const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// Added by the external-provisioner with `--extra-create-metadata`.
pub const PARAM_PV_NAME: &str = "csi.storage.k8s.io/pv/name";
/// StorageClass parameter of `image` pools: `sparse` (the default) or `full` (every byte of
/// the image allocated at creation and expansion).
pub const PARAM_ALLOCATION: &str = "allocation";

/// The CSI limit on a map field.
pub const MAX_MAP_BYTES: usize = 4096;

/// How a volume is accessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A filesystem mounted at the target.
    Mount(MountOptions),
    /// A raw block device at the target.
    Block,
}

/// The `mount` access type's fields.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MountOptions {
    /// Requested filesystem type, empty for "the pool's".
    pub fs_type: String,
    /// Mount flags, from the allow-list.
    pub flags: Vec<MountFlag>,
    /// `volume_mount_group`: the group the volume's files are given at publish (Kubernetes'
    /// fsGroup, handed to the driver through VOLUME_MOUNT_GROUP).
    pub group: Option<u32>,
}

/// Mount flags a CO may ask for. `nosuid` and `nodev` are applied to every publication
/// anyway; flags that would weaken that (`suid`, `dev`, `exec` overriding a class) are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MountFlag {
    ReadOnly,
    ReadWrite,
    NoExec,
    NoSuid,
    NoDev,
    NoAtime,
    NoDirAtime,
    RelAtime,
}

impl MountFlag {
    /// Parses one flag of the allow-list.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "ro" => MountFlag::ReadOnly,
            "rw" => MountFlag::ReadWrite,
            "noexec" => MountFlag::NoExec,
            "nosuid" => MountFlag::NoSuid,
            "nodev" => MountFlag::NoDev,
            "noatime" => MountFlag::NoAtime,
            "nodiratime" => MountFlag::NoDirAtime,
            "relatime" => MountFlag::RelAtime,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "mount flag {other:?} is not allowed; allowed: ro, rw, noexec, nosuid, nodev, noatime, nodiratime, relatime"
                )))
            }
        })
    }

    /// The flag as written in a mount table.
    pub fn as_str(self) -> &'static str {
        match self {
            MountFlag::ReadOnly => "ro",
            MountFlag::ReadWrite => "rw",
            MountFlag::NoExec => "noexec",
            MountFlag::NoSuid => "nosuid",
            MountFlag::NoDev => "nodev",
            MountFlag::NoAtime => "noatime",
            MountFlag::NoDirAtime => "nodiratime",
            MountFlag::RelAtime => "relatime",
        }
    }
}

/// CSI access modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessMode {
    fn from_wire(v: i32) -> Result<Self> {
        Ok(match Mode::try_from(v) {
            Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
            Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
            Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
            Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
            Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
            Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
            Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
            Ok(Mode::Unknown) | Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "volume_capability.access_mode.mode {v} is not a known access mode"
                )))
            }
        })
    }

    /// The wire value.
    pub fn to_wire(self) -> Mode {
        match self {
            AccessMode::SingleNodeWriter => Mode::SingleNodeWriter,
            AccessMode::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
            AccessMode::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
            AccessMode::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
            AccessMode::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
            AccessMode::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
            AccessMode::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
        }
    }

    /// A local volume lives on one node: every MULTI_NODE mode is beyond what it can honour.
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }

    /// Modes that only allow reading.
    pub fn is_read_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    /// Name as the spec spells it.
    pub fn name(self) -> &'static str {
        self.to_wire().as_str_name()
    }
}

/// One volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: AccessMode,
}

impl Capability {
    /// Validates one capability from the wire.
    pub fn from_wire(cap: &csi::VolumeCapability) -> Result<Self> {
        use csi::volume_capability::AccessType;
        let access = match &cap.access_type {
            None => {
                return Err(Error::invalid(
                    "volume_capability.access_type is required (mount or block)",
                ))
            }
            Some(AccessType::Block(_)) => Access::Block,
            Some(AccessType::Mount(m)) => {
                check_csi_string("volume_capability.mount.fs_type", &m.fs_type)?;
                if !m.fs_type.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Err(Error::InvalidArgument(format!(
                        "volume_capability.mount.fs_type {:?} is not a filesystem type name",
                        m.fs_type
                    )));
                }
                let group = match m.volume_mount_group.as_str() {
                    "" => None,
                    g if g.len() <= 10 && g.bytes().all(|b| b.is_ascii_digit()) => {
                        Some(g.parse::<u32>().map_err(|_| {
                            Error::InvalidArgument(format!(
                                "volume_capability.mount.volume_mount_group {g:?} is not a group id (0 to 4294967295)"
                            ))
                        })?)
                    }
                    g => {
                        return Err(Error::InvalidArgument(format!(
                            "volume_capability.mount.volume_mount_group {:?} is not a numeric group id",
                            g.chars().take(40).collect::<String>()
                        )))
                    }
                };
                let mut flags = Vec::with_capacity(m.mount_flags.len());
                for f in &m.mount_flags {
                    // A flag string may carry several comma-separated options.
                    for part in f.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let flag = MountFlag::parse(part)?;
                        if !flags.contains(&flag) {
                            flags.push(flag);
                        }
                    }
                }
                if flags.contains(&MountFlag::ReadOnly) && flags.contains(&MountFlag::ReadWrite) {
                    return Err(Error::invalid("mount flags ask for both ro and rw"));
                }
                flags.sort();
                Access::Mount(MountOptions {
                    fs_type: m.fs_type.clone(),
                    flags,
                    group,
                })
            }
        };
        let mode = match &cap.access_mode {
            None => return Err(Error::invalid("volume_capability.access_mode is required")),
            Some(m) => AccessMode::from_wire(m.mode)?,
        };
        Ok(Capability { access, mode })
    }

    /// Validates a required, non-empty list of capabilities.
    pub fn list_from_wire(caps: &[csi::VolumeCapability]) -> Result<Vec<Self>> {
        if caps.is_empty() {
            return Err(Error::invalid("volume_capabilities is required"));
        }
        caps.iter().map(Capability::from_wire).collect()
    }

    /// Whether this is a block capability.
    pub fn is_block(&self) -> bool {
        matches!(self.access, Access::Block)
    }
}

/// The capacity range of a request, after the spec's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapacityRange {
    /// At least this many bytes (0: no minimum).
    pub required: u64,
    /// At most this many bytes (None: no maximum).
    pub limit: Option<u64>,
}

impl CapacityRange {
    /// Validates a wire capacity range. Negative numbers are INVALID_ARGUMENT; a limit below
    /// the required size can never be satisfied: OUT_OF_RANGE.
    pub fn from_wire(r: Option<&csi::CapacityRange>) -> Result<Self> {
        let Some(r) = r else {
            return Ok(Self::default());
        };
        if r.required_bytes < 0 || r.limit_bytes < 0 {
            return Err(Error::InvalidArgument(format!(
                "capacity_range must not be negative (required_bytes {}, limit_bytes {})",
                r.required_bytes, r.limit_bytes
            )));
        }
        let required = r.required_bytes as u64;
        let limit = (r.limit_bytes > 0).then_some(r.limit_bytes as u64);
        if let Some(limit) = limit {
            if limit < required {
                return Err(Error::OutOfRange(format!(
                    "capacity_range.limit_bytes {limit} is below required_bytes {required}"
                )));
            }
        }
        Ok(CapacityRange { required, limit })
    }

    /// Whether a volume of `bytes` satisfies this range.
    pub fn admits(&self, bytes: u64) -> bool {
        bytes >= self.required && self.limit.is_none_or(|l| bytes <= l)
    }

    /// Picks the size to provision: the required size (or `default` when none is given and
    /// the limit allows it) rounded up to `granule`, but never past the limit.
    pub fn choose(&self, default: u64, granule: u64) -> u64 {
        let want = if self.required > 0 {
            self.required
        } else {
            self.limit.map_or(default, |l| default.min(l))
        };
        let rounded = want.div_ceil(granule).saturating_mul(granule);
        match self.limit {
            Some(l) if rounded > l => want,
            _ => rounded,
        }
    }
}

/// One topology segment set.
pub type Segments = BTreeMap<String, String>;

fn segments_from_wire(field: &str, t: &csi::Topology) -> Result<Segments> {
    check_map(field, &t.segments)?;
    Ok(t.segments
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect())
}

/// Accessibility requirements of a CreateVolume.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopologyRequirement {
    pub requisite: Vec<Segments>,
    pub preferred: Vec<Segments>,
}

impl TopologyRequirement {
    fn from_wire(t: &csi::TopologyRequirement) -> Result<Self> {
        Ok(TopologyRequirement {
            requisite: t
                .requisite
                .iter()
                .map(|s| segments_from_wire("accessibility_requirements.requisite", s))
                .collect::<Result<_>>()?,
            preferred: t
                .preferred
                .iter()
                .map(|s| segments_from_wire("accessibility_requirements.preferred", s))
                .collect::<Result<_>>()?,
        })
    }

    /// Whether a volume accessible from exactly `ours` satisfies the requirement: with a
    /// requisite list, `ours` must be in it; preferred entries only rank, they never exclude.
    pub fn admits(&self, ours: &Segments) -> bool {
        self.requisite.is_empty() || self.requisite.iter().any(|s| s == ours)
    }
}

/// StorageClass parameters of CreateVolume (and GetCapacity).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeParams {
    /// The pool, if named.
    pub pool: Option<String>,
    pub pvc_name: Option<String>,
    pub pvc_namespace: Option<String>,
    pub pv_name: Option<String>,
    /// `allocation = "full"`: allocate the whole volume up front (image pools).
    pub full_allocation: bool,
}

impl VolumeParams {
    /// Validates a parameters map: known keys only, each named when refused.
    pub fn from_wire(params: &HashMap<String, String>) -> Result<Self> {
        check_map("parameters", params)?;
        let mut out = VolumeParams::default();
        let mut keys: Vec<&String> = params.keys().collect();
        keys.sort();
        for key in keys {
            let value = &params[key];
            match key.as_str() {
                PARAM_POOL => {
                    crate::config::check_pool_name(value)?;
                    out.pool = Some(value.clone());
                }
                PARAM_PVC_NAME => out.pvc_name = Some(value.clone()),
                PARAM_PVC_NAMESPACE => out.pvc_namespace = Some(value.clone()),
                PARAM_PV_NAME => out.pv_name = Some(value.clone()),
                PARAM_ALLOCATION => {
                    out.full_allocation = match value.as_str() {
                        "sparse" => false,
                        "full" => true,
                        other => {
                            return Err(Error::InvalidArgument(format!(
                                "parameter {PARAM_ALLOCATION:?} is {other:?}; accepted: \"sparse\", \"full\""
                            )))
                        }
                    }
                }
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "parameter {other:?} is not known; accepted: {PARAM_POOL}, {PARAM_ALLOCATION}, {PARAM_PVC_NAME}, {PARAM_PVC_NAMESPACE}, {PARAM_PV_NAME}"
                    )))
                }
            }
        }
        Ok(out)
    }
}

fn check_map(field: &str, map: &HashMap<String, String>) -> Result<()> {
    let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_MAP_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{field} holds {bytes} bytes; CSI allows at most {MAX_MAP_BYTES}"
        )));
    }
    for (k, v) in map {
        check_csi_string(&format!("{field} key"), k)?;
        check_csi_string(&format!("{field}[{k:?}]"), v)?;
    }
    Ok(())
}

/// A validated CreateVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolume {
    pub name: VolumeName,
    pub capacity: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub params: VolumeParams,
    pub topology: Option<TopologyRequirement>,
    /// What the new volume is filled from (None: it starts empty).
    pub source: Option<ContentSource>,
}

/// Where a new volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentSource {
    /// A snapshot (restore).
    Snapshot(SnapshotRef),
    /// Another volume (clone).
    Volume(VolumeRef),
}

impl ContentSource {
    /// Validates `volume_content_source`: a message naming no source, or an empty or
    /// malformed id, is INVALID_ARGUMENT; an id stowage never minted stays `Foreign`, which
    /// the engine answers NOT_FOUND ("source does not exist").
    pub fn from_wire(source: &csi::VolumeContentSource) -> Result<Self> {
        use csi::volume_content_source::Type;
        match &source.r#type {
            Some(Type::Snapshot(s)) => Ok(ContentSource::Snapshot(SnapshotRef::from_field(
                "volume_content_source.snapshot.snapshot_id",
                &s.snapshot_id,
            )?)),
            Some(Type::Volume(v)) => Ok(ContentSource::Volume(VolumeRef::from_field(
                "volume_content_source.volume.volume_id",
                &v.volume_id,
            )?)),
            None => Err(Error::invalid(
                "volume_content_source names neither a snapshot nor a volume",
            )),
        }
    }

    /// The source as it appears on the wire, for a volume created from it.
    pub fn to_wire(&self) -> csi::VolumeContentSource {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let r#type = match self {
            ContentSource::Snapshot(s) => Type::Snapshot(SnapshotSource {
                snapshot_id: s.as_str().to_owned(),
            }),
            ContentSource::Volume(v) => Type::Volume(VolumeSource {
                volume_id: v.as_str().to_owned(),
            }),
        };
        csi::VolumeContentSource {
            r#type: Some(r#type),
        }
    }
}

impl TryFrom<&csi::CreateVolumeRequest> for CreateVolume {
    type Error = Error;

    fn try_from(req: &csi::CreateVolumeRequest) -> Result<Self> {
        let name = VolumeName::parse(&req.name)?;
        let capabilities = Capability::list_from_wire(&req.volume_capabilities)?;
        let capacity = CapacityRange::from_wire(req.capacity_range.as_ref())?;
        let params = VolumeParams::from_wire(&req.parameters)?;
        if !req.mutable_parameters.is_empty() {
            return Err(Error::invalid(
                "mutable_parameters are not supported (no MODIFY_VOLUME capability)",
            ));
        }
        let source = req
            .volume_content_source
            .as_ref()
            .map(ContentSource::from_wire)
            .transpose()?;
        let topology = req
            .accessibility_requirements
            .as_ref()
            .map(TopologyRequirement::from_wire)
            .transpose()?;
        Ok(CreateVolume {
            name,
            capacity,
            capabilities,
            params,
            topology,
            source,
        })
    }
}

/// Prefix of the parameters the external-snapshotter adds with `--extra-create-metadata`
/// (the VolumeSnapshot's name and namespace, the VolumeSnapshotContent's name).
pub const PARAM_SNAPSHOT_METADATA_PREFIX: &str = "csi.storage.k8s.io/volumesnapshot";

/// A validated CreateSnapshot. Stowage takes no snapshot parameters of its own: any key but
/// the snapshotter's metadata is INVALID_ARGUMENT, since silently ignoring one (a retention
/// policy, say) would promise what it does not do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSnapshot {
    pub source: VolumeRef,
    pub name: VolumeName,
}

impl TryFrom<&csi::CreateSnapshotRequest> for CreateSnapshot {
    type Error = Error;
    fn try_from(req: &csi::CreateSnapshotRequest) -> Result<Self> {
        let name = VolumeName::parse(&req.name)?;
        let source = VolumeRef::from_field("source_volume_id", &req.source_volume_id)?;
        check_map("parameters", &req.parameters)?;
        if let Some(key) = req
            .parameters
            .keys()
            .filter(|k| !k.starts_with(PARAM_SNAPSHOT_METADATA_PREFIX))
            .min()
        {
            return Err(Error::InvalidArgument(format!(
                "snapshot parameter {key:?} is not supported (stowage takes no snapshot parameters)"
            )));
        }
        Ok(CreateSnapshot { source, name })
    }
}

/// A validated DeleteSnapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteSnapshot {
    pub snapshot: SnapshotRef,
}

impl TryFrom<&csi::DeleteSnapshotRequest> for DeleteSnapshot {
    type Error = Error;
    fn try_from(req: &csi::DeleteSnapshotRequest) -> Result<Self> {
        Ok(DeleteSnapshot {
            snapshot: SnapshotRef::from_request(&req.snapshot_id)?,
        })
    }
}

/// A validated GetSnapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetSnapshot {
    pub snapshot: SnapshotRef,
}

impl TryFrom<&csi::GetSnapshotRequest> for GetSnapshot {
    type Error = Error;
    fn try_from(req: &csi::GetSnapshotRequest) -> Result<Self> {
        Ok(GetSnapshot {
            snapshot: SnapshotRef::from_request(&req.snapshot_id)?,
        })
    }
}

/// A validated ListSnapshots. The filters are optional; a filter naming something stowage
/// never minted matches nothing (an empty list, as the spec's filters imply), and is not
/// an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListSnapshots {
    pub page: Page,
    pub snapshot: Option<SnapshotRef>,
    pub source: Option<VolumeRef>,
}

impl TryFrom<&csi::ListSnapshotsRequest> for ListSnapshots {
    type Error = Error;
    fn try_from(req: &csi::ListSnapshotsRequest) -> Result<Self> {
        let page = Page::from_wire(req.max_entries, &req.starting_token)?;
        let snapshot = (!req.snapshot_id.is_empty())
            .then(|| SnapshotRef::from_request(&req.snapshot_id))
            .transpose()?;
        let source = (!req.source_volume_id.is_empty())
            .then(|| VolumeRef::from_field("source_volume_id", &req.source_volume_id))
            .transpose()?;
        Ok(ListSnapshots {
            page,
            snapshot,
            source,
        })
    }
}

/// A page of a listing: `max_entries` and `starting_token`, as ListVolumes and ListSnapshots
/// both carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// At most this many entries (None: all).
    pub max_entries: Option<u32>,
    /// Where to continue.
    pub starting_token: Option<String>,
}

impl Page {
    fn from_wire(max_entries: i32, starting_token: &str) -> Result<Self> {
        if max_entries < 0 {
            return Err(Error::InvalidArgument(format!(
                "max_entries must not be negative, got {max_entries}"
            )));
        }
        check_csi_string("starting_token", starting_token)?;
        Ok(Page {
            max_entries: (max_entries > 0).then_some(max_entries as u32),
            starting_token: (!starting_token.is_empty()).then(|| starting_token.to_owned()),
        })
    }
}

/// A validated DeleteVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteVolume {
    pub volume: VolumeRef,
}

impl TryFrom<&csi::DeleteVolumeRequest> for DeleteVolume {
    type Error = Error;
    fn try_from(req: &csi::DeleteVolumeRequest) -> Result<Self> {
        Ok(DeleteVolume {
            volume: VolumeRef::from_request(&req.volume_id)?,
        })
    }
}

/// A validated ValidateVolumeCapabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidateCapabilities {
    pub volume: VolumeRef,
    pub capabilities: Vec<Capability>,
    pub volume_context: HashMap<String, String>,
    pub parameters: HashMap<String, String>,
}

impl TryFrom<&csi::ValidateVolumeCapabilitiesRequest> for ValidateCapabilities {
    type Error = Error;
    fn try_from(req: &csi::ValidateVolumeCapabilitiesRequest) -> Result<Self> {
        let volume = VolumeRef::from_request(&req.volume_id)?;
        let capabilities = Capability::list_from_wire(&req.volume_capabilities)?;
        check_map("volume_context", &req.volume_context)?;
        check_map("parameters", &req.parameters)?;
        Ok(ValidateCapabilities {
            volume,
            capabilities,
            volume_context: req.volume_context.clone(),
            parameters: req.parameters.clone(),
        })
    }
}

/// A validated ListVolumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListVolumes {
    pub page: Page,
}

impl TryFrom<&csi::ListVolumesRequest> for ListVolumes {
    type Error = Error;
    fn try_from(req: &csi::ListVolumesRequest) -> Result<Self> {
        Ok(ListVolumes {
            page: Page::from_wire(req.max_entries, &req.starting_token)?,
        })
    }
}

/// A validated GetCapacity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetCapacity {
    pub capabilities: Vec<Capability>,
    pub params: VolumeParams,
    pub topology: Option<Segments>,
}

impl TryFrom<&csi::GetCapacityRequest> for GetCapacity {
    type Error = Error;
    fn try_from(req: &csi::GetCapacityRequest) -> Result<Self> {
        Ok(GetCapacity {
            capabilities: req
                .volume_capabilities
                .iter()
                .map(Capability::from_wire)
                .collect::<Result<_>>()?,
            params: VolumeParams::from_wire(&req.parameters)?,
            topology: req
                .accessible_topology
                .as_ref()
                .map(|t| segments_from_wire("accessible_topology", t))
                .transpose()?,
        })
    }
}

/// A validated ControllerGetVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetVolume {
    pub volume: VolumeRef,
}

impl TryFrom<&csi::ControllerGetVolumeRequest> for GetVolume {
    type Error = Error;
    fn try_from(req: &csi::ControllerGetVolumeRequest) -> Result<Self> {
        Ok(GetVolume {
            volume: VolumeRef::from_request(&req.volume_id)?,
        })
    }
}

/// A validated ControllerExpandVolume. The spec makes `capacity_range` required; a request
/// that names no size at all is INVALID_ARGUMENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerExpand {
    pub volume: VolumeRef,
    pub capacity: CapacityRange,
    /// The capability the volume is used with, when the CO says (block or mount).
    pub capability: Option<Capability>,
}

impl TryFrom<&csi::ControllerExpandVolumeRequest> for ControllerExpand {
    type Error = Error;
    fn try_from(req: &csi::ControllerExpandVolumeRequest) -> Result<Self> {
        let volume = VolumeRef::from_request(&req.volume_id)?;
        let capacity = expansion_range(req.capacity_range.as_ref())?;
        let capability = req
            .volume_capability
            .as_ref()
            .map(|c| capability_required(Some(c)))
            .transpose()?;
        Ok(ControllerExpand {
            volume,
            capacity,
            capability,
        })
    }
}

/// A validated NodeExpandVolume. `volume_path` is where the volume is published or staged;
/// whether the volume is there is the node engine's question (NOT_FOUND if not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeExpand {
    pub volume: VolumeRef,
    /// Where the volume should be: a path that cannot be one of stowage's is NOT_FOUND for
    /// the engine, as for NodeGetVolumeStats.
    pub path: ExistingPath,
    pub staging: Option<HostPath>,
    /// The size the CO asks for; None: grow to whatever the controller step gave the volume.
    pub capacity: Option<CapacityRange>,
    pub capability: Option<Capability>,
}

impl TryFrom<&csi::NodeExpandVolumeRequest> for NodeExpand {
    type Error = Error;
    fn try_from(req: &csi::NodeExpandVolumeRequest) -> Result<Self> {
        let volume = VolumeRef::from_request(&req.volume_id)?;
        let path = ExistingPath::parse("volume_path", &req.volume_path)?;
        let staging = (!req.staging_target_path.is_empty())
            .then(|| HostPath::parse("staging_target_path", &req.staging_target_path))
            .transpose()?;
        let capacity = req
            .capacity_range
            .as_ref()
            .map(|r| expansion_range(Some(r)))
            .transpose()?;
        let capability = req
            .volume_capability
            .as_ref()
            .map(|c| capability_required(Some(c)))
            .transpose()?;
        Ok(NodeExpand {
            volume,
            path,
            staging,
            capacity,
            capability,
        })
    }
}

/// The capacity range of an expansion: present and naming a size.
fn expansion_range(r: Option<&csi::CapacityRange>) -> Result<CapacityRange> {
    let Some(wire) = r else {
        return Err(Error::invalid(
            "capacity_range is required to expand a volume",
        ));
    };
    let range = CapacityRange::from_wire(Some(wire))?;
    if range.required == 0 && range.limit.is_none() {
        return Err(Error::invalid(
            "capacity_range names no size: set required_bytes or limit_bytes",
        ));
    }
    Ok(range)
}

/// The longest host path accepted in a node request.
pub const MAX_PATH_BYTES: usize = 4096;

/// What makes a path field malformed whatever it is used for: empty, longer than
/// [`MAX_PATH_BYTES`], or containing a NUL.
fn check_path_string(field: &str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    if s.len() > MAX_PATH_BYTES || s.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{field} is longer than {MAX_PATH_BYTES} bytes or contains a NUL"
        )));
    }
    Ok(())
}

/// A path from a request that names where a volume already is (NodeUnstageVolume,
/// NodeUnpublishVolume, NodeGetVolumeStats), as opposed to where it is to be mounted.
///
/// Only a malformed string (empty, too long, with a NUL) is INVALID_ARGUMENT. Any other
/// string is a question the driver can answer: stowage stages and publishes only at clean
/// absolute paths, so a relative path, or one with `.` or `..`, is simply a place where the
/// volume is not — NOT_FOUND for NodeGetVolumeStats, OK for the unstage and unpublish calls,
/// as the spec's error tables and idempotency rules say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExistingPath {
    /// A clean absolute path; the engine looks it up.
    Host(HostPath),
    /// A well-formed string that cannot be a staging or target path of stowage's.
    Nowhere {
        /// The path as given.
        path: String,
        /// Why it cannot be one (the path rule it breaks).
        why: String,
    },
}

impl ExistingPath {
    /// Validates `field` of a request.
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        check_path_string(field, s)?;
        Ok(match HostPath::parse(field, s) {
            Ok(p) => ExistingPath::Host(p),
            Err(e) => ExistingPath::Nowhere {
                path: s.to_owned(),
                why: e.to_string(),
            },
        })
    }

    /// The path as given (normalised when it is a clean absolute path).
    pub fn as_str(&self) -> &str {
        match self {
            ExistingPath::Host(p) => p.as_str(),
            ExistingPath::Nowhere { path, .. } => path,
        }
    }
}

/// An absolute host path from a node request: absolute, normalised (no `.`, `..` or empty
/// components), no NUL. Whether it lies under an allowed kubelet directory, and whether any
/// component is a symlink, is checked by the node engine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPath(std::path::PathBuf);

impl HostPath {
    /// Validates `field` of a request.
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        use std::path::{Component, Path};
        check_path_string(field, s)?;
        let path = Path::new(s);
        if !path.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "{field} {s:?} must be absolute"
            )));
        }
        // Path::components folds "a//b" and a trailing "/", and drops inner "."; rejecting
        // any "." or ".." in the raw string keeps the path exactly what it appears to be.
        if s.split('/').any(|c| c == "." || c == "..") {
            return Err(Error::InvalidArgument(format!(
                "{field} {s:?} must not contain '.' or '..' components"
            )));
        }
        let normal: std::path::PathBuf = path.components().collect();
        if normal
            .components()
            .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
        {
            return Err(Error::InvalidArgument(format!(
                "{field} {s:?} is not a plain absolute path"
            )));
        }
        if normal.parent().is_none() {
            return Err(Error::InvalidArgument(format!("{field} must not be '/'")));
        }
        Ok(HostPath(normal))
    }

    /// The path.
    pub fn as_path(&self) -> &std::path::Path {
        &self.0
    }

    /// The path as a string (for records and messages).
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

fn capability_required(cap: Option<&csi::VolumeCapability>) -> Result<Capability> {
    match cap {
        None => Err(Error::invalid("volume_capability is required")),
        Some(c) => Capability::from_wire(c),
    }
}

/// A validated NodeStageVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStage {
    pub volume: VolumeRef,
    pub staging: HostPath,
    pub capability: Capability,
}

impl TryFrom<&csi::NodeStageVolumeRequest> for NodeStage {
    type Error = Error;
    fn try_from(req: &csi::NodeStageVolumeRequest) -> Result<Self> {
        let volume = VolumeRef::from_request(&req.volume_id)?;
        let staging = HostPath::parse("staging_target_path", &req.staging_target_path)?;
        let capability = capability_required(req.volume_capability.as_ref())?;
        check_map("publish_context", &req.publish_context)?;
        check_map("volume_context", &req.volume_context)?;
        Ok(NodeStage {
            volume,
            staging,
            capability,
        })
    }
}

/// A validated NodeUnstageVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUnstage {
    pub volume: VolumeRef,
    pub staging: ExistingPath,
}

impl TryFrom<&csi::NodeUnstageVolumeRequest> for NodeUnstage {
    type Error = Error;
    fn try_from(req: &csi::NodeUnstageVolumeRequest) -> Result<Self> {
        Ok(NodeUnstage {
            volume: VolumeRef::from_request(&req.volume_id)?,
            staging: ExistingPath::parse("staging_target_path", &req.staging_target_path)?,
        })
    }
}

/// A validated NodePublishVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePublish {
    pub volume: VolumeRef,
    pub staging: HostPath,
    pub target: HostPath,
    pub capability: Capability,
    pub readonly: bool,
}

impl TryFrom<&csi::NodePublishVolumeRequest> for NodePublish {
    type Error = Error;
    fn try_from(req: &csi::NodePublishVolumeRequest) -> Result<Self> {
        let volume = VolumeRef::from_request(&req.volume_id)?;
        // STAGE_UNSTAGE_VOLUME is advertised, so the staging path is required.
        let staging = HostPath::parse("staging_target_path", &req.staging_target_path)?;
        let target = HostPath::parse("target_path", &req.target_path)?;
        if target == staging {
            return Err(Error::invalid(
                "target_path must differ from staging_target_path",
            ));
        }
        let capability = capability_required(req.volume_capability.as_ref())?;
        check_map("publish_context", &req.publish_context)?;
        check_map("volume_context", &req.volume_context)?;
        Ok(NodePublish {
            volume,
            staging,
            target,
            capability,
            readonly: req.readonly,
        })
    }
}

/// Volume attribute the kubelet sets on a CSI ephemeral inline volume's NodePublishVolume.
pub const ATTR_EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
/// Prefix of the volume attributes the kubelet adds itself (pod name, namespace, …).
const ATTR_KUBELET_PREFIX: &str = "csi.storage.k8s.io/";
/// Name prefix of the volumes made for ephemeral inline volumes: `ephemeral/<kubelet's
/// volume handle>`, so the handle finds its volume again after a restart.
pub const EPHEMERAL_NAME_PREFIX: &str = "ephemeral/";

/// Whether a NodePublishVolume is for a CSI ephemeral inline volume.
pub fn is_ephemeral(req: &csi::NodePublishVolumeRequest) -> bool {
    req.volume_context.get(ATTR_EPHEMERAL).map(String::as_str) == Some("true")
}

/// The name of the volume made for the ephemeral volume with the kubelet's handle `handle`.
pub fn ephemeral_name(handle: &str) -> Result<VolumeName> {
    if handle.is_empty() {
        return Err(Error::invalid("volume_id is required"));
    }
    check_csi_string("volume_id", handle)?;
    VolumeName::parse(&format!("{EPHEMERAL_NAME_PREFIX}{handle}")).map_err(|e| {
        Error::InvalidArgument(format!(
            "volume_id {handle:?} cannot name an ephemeral volume: {e}"
        ))
    })
}

/// A validated NodePublishVolume of a CSI ephemeral inline volume: the volume is made on the
/// spot, from the pod's volume attributes `pool` and `size` (known keys only, besides the
/// kubelet's own `csi.storage.k8s.io/…`), and is a filesystem volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralPublish {
    /// The kubelet's handle (its `volume_id`).
    pub handle: String,
    pub name: VolumeName,
    pub target: HostPath,
    pub capability: Capability,
    pub readonly: bool,
    pub params: VolumeParams,
    /// Bytes asked for (None: the pool's default size).
    pub size: Option<u64>,
}

impl TryFrom<&csi::NodePublishVolumeRequest> for EphemeralPublish {
    type Error = Error;
    fn try_from(req: &csi::NodePublishVolumeRequest) -> Result<Self> {
        let name = ephemeral_name(&req.volume_id)?;
        let target = HostPath::parse("target_path", &req.target_path)?;
        let capability = capability_required(req.volume_capability.as_ref())?;
        if capability.is_block() {
            return Err(Error::invalid(
                "an ephemeral inline volume is a filesystem volume; block access is not supported",
            ));
        }
        check_map("volume_context", &req.volume_context)?;
        let mut params = HashMap::new();
        let mut size = None;
        for (k, v) in &req.volume_context {
            match k.as_str() {
                PARAM_POOL => {
                    params.insert(k.clone(), v.clone());
                }
                "size" => size = Some(crate::size::parse_size(v)?),
                k if k.starts_with(ATTR_KUBELET_PREFIX) => {}
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "volume attribute {other:?} is not supported for ephemeral volumes (known: pool, size)"
                    )))
                }
            }
        }
        Ok(EphemeralPublish {
            handle: req.volume_id.clone(),
            name,
            target,
            capability,
            readonly: req.readonly,
            params: VolumeParams::from_wire(&params)?,
            size,
        })
    }
}

/// Prefix of the volume handle of a pre-provisioned (static) volume: `static:<pool>/<dir>`,
/// a directory beneath the path of a `static` pool.
pub const STATIC_PREFIX: &str = "static:";
/// Volume attribute of a static volume: a directory beneath the handle's, bound instead.
pub const ATTR_SUB_PATH: &str = "subPath";

/// A relative path of plain components (no `.`, `..`, empty component, NUL or leading `/`),
/// at most 4096 bytes: what a static volume's handle and its `subPath` may name. Resolving it
/// beneath its root without following a symlink is the node's job.
pub fn plain_relative_path(field: &str, s: &str) -> Result<std::path::PathBuf> {
    let bad = |why: &str| Error::InvalidArgument(format!("{field} {s:?} {why}"));
    if s.is_empty() {
        return Err(bad("is empty"));
    }
    if s.len() > 4096 || s.contains('\0') {
        return Err(bad("is longer than 4096 bytes or contains a NUL"));
    }
    if s.starts_with('/') {
        return Err(bad("must be relative"));
    }
    if s.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(bad(
            "may hold only plain components (no '.', '..' or empty ones)",
        ));
    }
    Ok(std::path::PathBuf::from(s))
}

/// The handle of a static volume, parsed: which pool, which directory beneath it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticHandle {
    pub pool: String,
    pub dir: std::path::PathBuf,
}

impl StaticHandle {
    /// Parses `static:<pool>/<dir>`; None when `s` is no static handle at all.
    pub fn parse(s: &str) -> Option<Result<Self>> {
        let rest = s.strip_prefix(STATIC_PREFIX)?;
        Some((|| {
            check_csi_string("volume_id", s)?;
            let (pool, dir) = rest.split_once('/').ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "volume_id {s:?}: a static volume handle is static:<pool>/<directory>"
                ))
            })?;
            crate::config::check_pool_name(pool)
                .map_err(|e| Error::InvalidArgument(format!("volume_id {s:?}: {e}")))?;
            Ok(StaticHandle {
                pool: pool.to_owned(),
                dir: plain_relative_path("volume_id directory", dir)?,
            })
        })())
    }
}

/// The `subPath` volume attribute of a static volume (None: the handle's directory itself).
/// Other attributes than `subPath` and the kubelet's own are refused.
pub fn static_sub_path(context: &HashMap<String, String>) -> Result<Option<std::path::PathBuf>> {
    check_map("volume_context", context)?;
    let mut sub = None;
    for (k, v) in context {
        match k.as_str() {
            ATTR_SUB_PATH => sub = Some(plain_relative_path("subPath", v)?),
            k if k.starts_with(ATTR_KUBELET_PREFIX) => {}
            other => {
                return Err(Error::InvalidArgument(format!(
                "volume attribute {other:?} is not supported for static volumes (known: subPath)"
            )))
            }
        }
    }
    Ok(sub)
}

/// A validated NodeUnpublishVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUnpublish {
    pub volume: VolumeRef,
    pub target: ExistingPath,
}

impl TryFrom<&csi::NodeUnpublishVolumeRequest> for NodeUnpublish {
    type Error = Error;
    fn try_from(req: &csi::NodeUnpublishVolumeRequest) -> Result<Self> {
        Ok(NodeUnpublish {
            volume: VolumeRef::from_request(&req.volume_id)?,
            target: ExistingPath::parse("target_path", &req.target_path)?,
        })
    }
}

/// A validated NodeGetVolumeStats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStats {
    pub volume: VolumeRef,
    /// Where the CO says the volume is staged or published; the engine answers NOT_FOUND
    /// when it is not there, whatever the path looks like.
    pub path: ExistingPath,
}

impl TryFrom<&csi::NodeGetVolumeStatsRequest> for NodeStats {
    type Error = Error;
    fn try_from(req: &csi::NodeGetVolumeStatsRequest) -> Result<Self> {
        let volume = VolumeRef::from_request(&req.volume_id)?;
        let path = ExistingPath::parse("volume_path", &req.volume_path)?;
        // Optional and only a hint: stowage knows from its records where a volume is staged.
        // Like volume_path, it is refused only when malformed.
        if !req.staging_target_path.is_empty() {
            ExistingPath::parse("staging_target_path", &req.staging_target_path)?;
        }
        Ok(NodeStats { volume, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode as WireMode, AccessType, BlockVolume, MountVolume};

    fn mount_cap(mode: Mode, flags: &[&str]) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                volume_mount_group: String::new(),
            })),
            access_mode: Some(WireMode { mode: mode as i32 }),
        }
    }

    fn create(name: &str) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter, &[])],
            ..Default::default()
        }
    }

    fn code_of<T: std::fmt::Debug>(r: Result<T>) -> tonic::Code {
        r.map(|_| tonic::Code::Ok).unwrap_or_else(|e| e.code())
    }

    #[test]
    fn expand_validation_table() {
        use tonic::Code::*;
        let id = "stw-0123456789abcdef0123456789abcdef";
        let range = |required: i64, limit: i64| {
            Some(csi::CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            })
        };
        let controller = |volume_id: &str, capacity_range| csi::ControllerExpandVolumeRequest {
            volume_id: volume_id.into(),
            capacity_range,
            ..Default::default()
        };
        let cases = [
            ("plain", controller(id, range(1 << 30, 0)), Ok),
            ("limit only", controller(id, range(0, 1 << 30)), Ok),
            ("no id", controller("", range(1 << 30, 0)), InvalidArgument),
            ("no range", controller(id, None), InvalidArgument),
            ("empty range", controller(id, range(0, 0)), InvalidArgument),
            ("negative", controller(id, range(-1, 0)), InvalidArgument),
            (
                "limit below required",
                controller(id, range(2 << 30, 1 << 30)),
                OutOfRange,
            ),
        ];
        for (what, req, want) in cases {
            assert_eq!(code_of(ControllerExpand::try_from(&req)), want, "{what}");
        }
        let node = |volume_path: &str, capacity_range| csi::NodeExpandVolumeRequest {
            volume_id: id.into(),
            volume_path: volume_path.into(),
            capacity_range,
            ..Default::default()
        };
        let cases = [
            (
                "plain",
                node("/var/lib/kubelet/pods/x", range(1 << 30, 0)),
                Ok,
            ),
            ("no range", node("/var/lib/kubelet/pods/x", None), Ok),
            ("no path", node("", None), InvalidArgument),
            ("nul in path", node("/a\0b", None), InvalidArgument),
            (
                "empty range",
                node("/var/lib/kubelet/pods/x", range(0, 0)),
                InvalidArgument,
            ),
        ];
        for (what, req, want) in cases {
            assert_eq!(code_of(NodeExpand::try_from(&req)), want, "{what}");
        }
    }

    #[test]
    fn create_volume_validation_table() {
        use tonic::Code::*;
        let mut cases: Vec<(&str, csi::CreateVolumeRequest, tonic::Code)> = Vec::new();
        cases.push(("plain", create("pvc-1"), Ok));
        cases.push(("no name", create(""), InvalidArgument));
        cases.push(("long name", create(&"x".repeat(129)), InvalidArgument));
        let mut r = create("a");
        r.volume_capabilities.clear();
        cases.push(("no caps", r, InvalidArgument));
        let mut r = create("a");
        r.volume_capabilities[0].access_type = None;
        cases.push(("no access type", r, InvalidArgument));
        let mut r = create("a");
        r.volume_capabilities[0].access_mode = None;
        cases.push(("no access mode", r, InvalidArgument));
        let mut r = create("a");
        r.volume_capabilities[0].access_mode = Some(WireMode { mode: 0 });
        cases.push(("unknown mode", r, InvalidArgument));
        let mut r = create("a");
        r.volume_capabilities[0].access_mode = Some(WireMode { mode: 99 });
        cases.push(("mode out of enum", r, InvalidArgument));
        let mut r = create("a");
        r.volume_capabilities = vec![mount_cap(Mode::SingleNodeWriter, &["exec"])];
        cases.push(("flag not allowed", r, InvalidArgument));
        let mut r = create("a");
        r.volume_capabilities = vec![mount_cap(Mode::SingleNodeWriter, &["ro,noatime"])];
        cases.push(("flags comma separated", r, Ok));
        let mut r = create("a");
        r.volume_capabilities[0].access_type = Some(AccessType::Block(BlockVolume {}));
        cases.push(("block parses (pool decides)", r, Ok));
        let mut r = create("a");
        r.capacity_range = Some(csi::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        });
        cases.push(("negative", r, InvalidArgument));
        let mut r = create("a");
        r.capacity_range = Some(csi::CapacityRange {
            required_bytes: 10,
            limit_bytes: 5,
        });
        cases.push(("limit below required", r, OutOfRange));
        let mut r = create("a");
        r.parameters.insert("pool".into(), "fast".into());
        r.parameters.insert(PARAM_PVC_NAME.into(), "data".into());
        cases.push(("known params", r, Ok));
        let mut r = create("a");
        r.parameters.insert(PARAM_ALLOCATION.into(), "full".into());
        cases.push(("full allocation", r, Ok));
        let mut r = create("a");
        r.parameters.insert(PARAM_ALLOCATION.into(), "thick".into());
        cases.push(("unknown allocation", r, InvalidArgument));
        let mut r = create("a");
        r.parameters.insert("replicas".into(), "3".into());
        cases.push(("unknown param", r, InvalidArgument));
        let mut r = create("a");
        r.parameters.insert("pool".into(), "../etc".into());
        cases.push(("bad pool name", r, InvalidArgument));
        let mut r = create("a");
        r.mutable_parameters.insert("iops".into(), "1".into());
        cases.push(("mutable params", r, InvalidArgument));
        let mut r = create("a");
        r.volume_content_source = Some(csi::VolumeContentSource::default());
        cases.push(("content source naming nothing", r, InvalidArgument));
        let mut r = create("a");
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: String::new(),
                },
            )),
        });
        cases.push(("empty snapshot id", r, InvalidArgument));
        for (what, req, want) in cases {
            assert_eq!(code_of(CreateVolume::try_from(&req)), want, "{what}");
        }
    }

    #[test]
    fn unknown_param_is_named() {
        let mut r = create("a");
        r.parameters.insert("replicas".into(), "3".into());
        let err = CreateVolume::try_from(&r).unwrap_err();
        assert!(err.to_string().contains("replicas"), "{err}");
    }

    #[test]
    fn capacity_choice() {
        let gi = 1u64 << 30;
        let r = CapacityRange::default();
        assert_eq!(r.choose(gi, 4096), gi);
        let r = CapacityRange {
            required: 1000,
            limit: None,
        };
        assert_eq!(r.choose(gi, 4096), 4096);
        let r = CapacityRange {
            required: 1000,
            limit: Some(2000),
        };
        assert_eq!(r.choose(gi, 4096), 1000);
        let r = CapacityRange {
            required: 0,
            limit: Some(1 << 20),
        };
        assert_eq!(r.choose(gi, 4096), 1 << 20);
        assert!(r.admits(1 << 20));
        assert!(!r.admits((1 << 20) + 1));
    }

    #[test]
    fn list_volumes_validation() {
        let bad = csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        };
        assert_eq!(
            code_of(ListVolumes::try_from(&bad)),
            tonic::Code::InvalidArgument
        );
        let ok = csi::ListVolumesRequest {
            max_entries: 5,
            starting_token: "7".into(),
        };
        let l = ListVolumes::try_from(&ok).unwrap();
        assert_eq!(l.page.max_entries, Some(5));
        assert_eq!(l.page.starting_token.as_deref(), Some("7"));
    }

    #[test]
    fn host_paths() {
        for ok in ["/var/lib/kubelet/pods/x/mount", "/a//b/", "/a/b.c/..d"] {
            assert!(HostPath::parse("p", ok).is_ok(), "{ok}");
        }
        for bad in ["", "rel/x", "/a/../b", "/a/./b", "/a/..", "/", "/a\0b"] {
            assert_eq!(
                HostPath::parse("p", bad).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        assert_eq!(HostPath::parse("p", "/a//b/").unwrap().as_str(), "/a/b");
    }

    /// Paths naming where a volume already is: malformed strings are INVALID_ARGUMENT, every
    /// other string is either a clean absolute path to look up or a place nothing of ours can
    /// be — in NodeGetVolumeStats, NodeUnpublishVolume and NodeUnstageVolume alike.
    #[test]
    fn existing_paths_table() {
        enum Want {
            Malformed,
            Host(&'static str),
            Nowhere,
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        let longest = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        let cases: Vec<(&str, Want)> = vec![
            ("", Want::Malformed),
            ("/a\0b", Want::Malformed),
            ("\0", Want::Malformed),
            (&long, Want::Malformed),
            (&longest, Want::Host("")),
            (
                "/var/lib/kubelet/pods/x/mount",
                Want::Host("/var/lib/kubelet/pods/x/mount"),
            ),
            ("/a//b/", Want::Host("/a/b")),
            (
                "/outside/any/kubelet/dir",
                Want::Host("/outside/any/kubelet/dir"),
            ),
            ("some/path", Want::Nowhere),
            ("relative", Want::Nowhere),
            ("./a", Want::Nowhere),
            ("/a/../b", Want::Nowhere),
            ("/a/./b", Want::Nowhere),
            ("/", Want::Nowhere),
            (" ", Want::Nowhere),
        ];
        for (input, want) in &cases {
            let stats = NodeStats::try_from(&csi::NodeGetVolumeStatsRequest {
                volume_id: "stw-00000000000000000000000000000001".into(),
                volume_path: (*input).to_owned(),
                staging_target_path: String::new(),
            })
            .map(|r| r.path);
            let unpublish = NodeUnpublish::try_from(&csi::NodeUnpublishVolumeRequest {
                volume_id: "stw-00000000000000000000000000000001".into(),
                target_path: (*input).to_owned(),
            })
            .map(|r| r.target);
            let unstage = NodeUnstage::try_from(&csi::NodeUnstageVolumeRequest {
                volume_id: "stw-00000000000000000000000000000001".into(),
                staging_target_path: (*input).to_owned(),
            })
            .map(|r| r.staging);
            for (rpc, got) in [
                ("NodeGetVolumeStats", stats),
                ("NodeUnpublishVolume", unpublish),
                ("NodeUnstageVolume", unstage),
            ] {
                let shown = &input[..input.len().min(40)];
                match (want, got) {
                    (Want::Malformed, Err(e)) => {
                        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{rpc} {shown:?}")
                    }
                    (Want::Host(""), Ok(ExistingPath::Host(_))) => {}
                    (Want::Host(p), Ok(ExistingPath::Host(h))) => {
                        assert_eq!(h.as_str(), *p, "{rpc} {shown:?}")
                    }
                    (Want::Nowhere, Ok(ExistingPath::Nowhere { path, why })) => {
                        assert_eq!(path, *input, "{rpc}");
                        assert!(!why.is_empty(), "{rpc} {shown:?}");
                    }
                    (_, got) => panic!("{rpc} {shown:?}: unexpected {got:?}"),
                }
            }
        }
        // The optional staging_target_path of NodeGetVolumeStats is refused only when
        // malformed too.
        let with_staging = |staging: &str| {
            NodeStats::try_from(&csi::NodeGetVolumeStatsRequest {
                volume_id: "stw-00000000000000000000000000000001".into(),
                volume_path: "/k/pods/x/mount".into(),
                staging_target_path: staging.into(),
            })
        };
        assert!(with_staging("").is_ok());
        assert!(with_staging("some/staging").is_ok());
        assert_eq!(code_of(with_staging("/a\0b")), tonic::Code::InvalidArgument);
        // A missing volume id is still INVALID_ARGUMENT, before any path question.
        let no_id = csi::NodeGetVolumeStatsRequest {
            volume_id: String::new(),
            volume_path: "some/path".into(),
            staging_target_path: String::new(),
        };
        assert_eq!(
            code_of(NodeStats::try_from(&no_id)),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn topology_requisite_must_name_us() {
        let ours: Segments = [("k".to_string(), "n1".to_string())].into();
        let other: Segments = [("k".to_string(), "n2".to_string())].into();
        let t = TopologyRequirement {
            requisite: vec![other.clone()],
            preferred: vec![],
        };
        assert!(!t.admits(&ours));
        let t = TopologyRequirement {
            requisite: vec![other.clone(), ours.clone()],
            preferred: vec![],
        };
        assert!(t.admits(&ours));
        let t = TopologyRequirement {
            requisite: vec![],
            preferred: vec![other],
        };
        assert!(t.admits(&ours));
    }

    #[test]
    fn content_sources_are_checked_and_foreign_ids_stay_not_found() {
        use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
        let snap = |id: &str| csi::VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource {
                snapshot_id: id.into(),
            })),
        };
        let ours = crate::ids::SnapshotId::generate();
        let got = ContentSource::from_wire(&snap(ours.as_str())).unwrap();
        assert_eq!(
            got,
            ContentSource::Snapshot(SnapshotRef::Ours(ours.clone()))
        );
        assert_eq!(got.to_wire(), snap(ours.as_str()));
        // A traversal string or a volume id is not a snapshot of ours: NOT_FOUND later.
        for foreign in ["../../etc", crate::ids::VolumeId::generate().as_str()] {
            match ContentSource::from_wire(&snap(foreign)).unwrap() {
                ContentSource::Snapshot(r) => {
                    assert_eq!(r.require().unwrap_err().code(), tonic::Code::NotFound)
                }
                other => panic!("{other:?}"),
            }
        }
        let nul = ContentSource::from_wire(&snap("sns-\0")).unwrap_err();
        assert_eq!(nul.code(), tonic::Code::InvalidArgument);
        let vol = csi::VolumeContentSource {
            r#type: Some(Type::Volume(VolumeSource {
                volume_id: String::new(),
            })),
        };
        let err = ContentSource::from_wire(&vol).unwrap_err();
        assert!(
            err.to_string()
                .contains("volume_content_source.volume.volume_id"),
            "{err}"
        );
    }

    #[test]
    fn snapshot_requests() {
        let ok = csi::CreateSnapshotRequest {
            source_volume_id: crate::ids::VolumeId::generate().to_string(),
            name: "snap".into(),
            ..Default::default()
        };
        assert!(CreateSnapshot::try_from(&ok).is_ok());
        let mut meta = ok.clone();
        meta.parameters
            .insert("csi.storage.k8s.io/volumesnapshot/name".into(), "s".into());
        assert!(
            CreateSnapshot::try_from(&meta).is_ok(),
            "snapshotter metadata"
        );
        let mut unknown = ok.clone();
        unknown.parameters.insert("retention".into(), "7d".into());
        let err = CreateSnapshot::try_from(&unknown).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("retention"), "{err}");
        let mut no_name = ok.clone();
        no_name.name.clear();
        assert_eq!(
            CreateSnapshot::try_from(&no_name).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let mut no_source = ok;
        no_source.source_volume_id.clear();
        let err = CreateSnapshot::try_from(&no_source).unwrap_err();
        assert!(err.to_string().contains("source_volume_id"), "{err}");
        for bad in ["", "a\0"] {
            let req = csi::DeleteSnapshotRequest {
                snapshot_id: bad.into(),
                ..Default::default()
            };
            assert_eq!(
                DeleteSnapshot::try_from(&req).unwrap_err().code(),
                tonic::Code::InvalidArgument,
                "{bad:?}"
            );
        }
        let list = csi::ListSnapshotsRequest {
            max_entries: -1,
            ..Default::default()
        };
        assert!(ListSnapshots::try_from(&list).is_err());
        let list = csi::ListSnapshotsRequest {
            snapshot_id: "../x".into(),
            ..Default::default()
        };
        let l = ListSnapshots::try_from(&list).unwrap();
        assert_eq!(l.snapshot, Some(SnapshotRef::Foreign("../x".into())));
    }
}
