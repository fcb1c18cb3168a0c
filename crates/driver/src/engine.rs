//! The volume engine: typed requests in, CSI answers out. It owns the store, the pools and the
//! guards; every method is synchronous and runs on a blocking thread, one per call.
//!
//! Each mutating method follows the same shape: claim the volume's guard, record the intent
//! durably, act on the backend (idempotently), record completion.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use stowage_core::ids::{not_found, VolumeRef};
use stowage_core::request::{
    Access, Capability, ContentSource, ControllerExpand, CreateVolume, DeleteVolume, GetCapacity,
    GetVolume, ListVolumes, Segments, ValidateCapabilities, VolumeParams,
};
use stowage_core::{Error, Result, VolumeId};
use stowage_csi::v1 as csi;
use stowage_sys::Kernel;

use crate::guard::{Guard, Guards};
use crate::pool::{Condition, Pool, SIZE_GRANULE};
use crate::store::{NewVolume, Store, VolumeRecord, VolumeState};

/// Who this driver instance is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// CSI node id (the Kubernetes node name).
    pub node_id: String,
    /// The topology key whose value is the node id, e.g. `stowage.csi.dev/node`.
    pub topology_key: String,
}

impl Identity {
    /// This node's topology segment.
    pub fn segments(&self) -> Segments {
        [(self.topology_key.clone(), self.node_id.clone())].into()
    }

    fn topology(&self) -> csi::Topology {
        csi::Topology {
            segments: self.segments().into_iter().collect(),
        }
    }
}

/// Entries per ListVolumes page when the CO names no max_entries.
pub const DEFAULT_PAGE_SIZE: u32 = 1000;

/// ListVolumes pagination tokens: `<seq>.<tag>`, the tag a keyed hash of the sequence
/// number under a key drawn at start (std's randomly keyed SipHash).
#[derive(Debug, Default)]
pub(crate) struct PageTokens {
    key: std::collections::hash_map::RandomState,
}

impl PageTokens {
    /// `listing` keeps the tokens of one listing from opening another's.
    fn tag(&self, listing: u8, seq: i64) -> u64 {
        use std::hash::BuildHasher;
        self.key.hash_one((listing, seq))
    }

    pub(crate) fn issue(&self, listing: u8, seq: i64) -> String {
        format!("{seq}.{:016x}", self.tag(listing, seq))
    }

    fn open(&self, listing: u8, token: &str) -> Option<i64> {
        let (seq, tag) = token.split_once('.')?;
        let seq: i64 = seq.parse().ok()?;
        let tag = u64::from_str_radix(tag, 16).ok()?;
        (seq > 0 && tag == self.tag(listing, seq)).then_some(seq)
    }
}

/// Page tokens of ListVolumes.
const VOLUME_TOKENS: u8 = 0;

/// The engine.
#[derive(Debug)]
pub struct Engine {
    pub(crate) store: Store,
    pub(crate) pools: BTreeMap<String, Arc<Pool>>,
    default_pool: String,
    pub(crate) identity: Identity,
    pub(crate) guards: Guards,
    pub(crate) kernel: Arc<dyn Kernel>,
    pub(crate) tokens: PageTokens,
    /// This node's topology as the wire carries it, built once: every volume in a
    /// ListVolumes page carries a copy, and cloning a map is cheaper than building one.
    topology: csi::Topology,
    ready: AtomicBool,
    /// Advertised by NodeGetInfo when set.
    pub max_volumes_per_node: Option<i64>,
    /// Whether the controller service offers EXPAND_VOLUME (`--controller-expansion`). Off,
    /// Kubernetes' external-resizer only marks the claim for the node step, which the
    /// volume's own node then does whole (see docs/operations.md, "Volume expansion").
    pub controller_expansion: bool,
    /// Directories node requests' paths must lie under (`--kubelet-dir`).
    pub kubelet_dirs: Vec<PathBuf>,
}

impl Engine {
    /// Builds an engine over an open store and opened pools; the first pool is the default.
    pub fn new(
        store: Store,
        pools: Vec<Pool>,
        identity: Identity,
        kernel: Arc<dyn Kernel>,
    ) -> Result<Self> {
        let default_pool = pools
            .first()
            .map(|p| p.name().to_owned())
            .ok_or_else(|| Error::invalid("at least one pool is required"))?;
        let topology = identity.topology();
        Ok(Engine {
            store,
            pools: pools
                .into_iter()
                .map(|p| (p.name().to_owned(), Arc::new(p)))
                .collect(),
            default_pool,
            identity,
            guards: Guards::default(),
            kernel,
            tokens: PageTokens::default(),
            topology,
            ready: AtomicBool::new(false),
            max_volumes_per_node: None,
            controller_expansion: true,
            kubelet_dirs: vec![PathBuf::from("/var/lib/kubelet")],
        })
    }

    /// Whether start-up reconciliation has finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// UNAVAILABLE until reconciliation is done.
    pub fn require_ready(&self) -> Result<()> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(Error::Unavailable(
                "stowage is still reconciling its state after start; retry shortly".into(),
            ))
        }
    }

    /// The node's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Finishes or undoes what a crash interrupted, then marks the engine ready: volumes left
    /// `creating` are created (the backend step is idempotent), volumes left `deleting` are
    /// removed, publications are checked against the kernel. Directories in a pool that no
    /// record names are reported, never deleted.
    pub fn reconcile(&self) -> Result<()> {
        let unfinished = self.store.unfinished_volumes()?;
        if !unfinished.is_empty() {
            tracing::info!(
                count = unfinished.len(),
                "reconciling volumes interrupted by a restart"
            );
        }
        for vol in unfinished {
            let Some(pool) = self.pools.get(&vol.pool) else {
                tracing::warn!(volume = %vol.id, pool = %vol.pool, "volume's pool is not configured; left as is");
                continue;
            };
            let outcome = match vol.state {
                // A static volume's record, interrupted before it was ready: forgotten (the
                // next NodeStageVolume makes it again; the directory is the operator's).
                VolumeState::Creating if !pool.backend().provisions() => {
                    self.store.remove_volume(&vol.id)
                }
                // Filled from a source: a half copy cannot be told from a whole one, so the
                // volume is removed; the CO's retried CreateVolume fills it anew.
                VolumeState::Creating if vol.source.is_some() => pool
                    .backend()
                    .delete(&vol)
                    .and_then(|()| self.store.remove_volume(&vol.id)),
                VolumeState::Creating => pool
                    .backend()
                    .create(&vol)
                    .and_then(|()| self.store.set_volume_state(&vol.id, VolumeState::Ready)),
                VolumeState::Deleting => pool
                    .backend()
                    .delete(&vol)
                    .and_then(|()| self.store.remove_volume(&vol.id)),
                VolumeState::Ready => Ok(()),
            };
            match outcome {
                Ok(()) => tracing::info!(volume = %vol.id, state = ?vol.state, "reconciled"),
                Err(e) => {
                    tracing::warn!(volume = %vol.id, state = ?vol.state, error = %e, "could not reconcile; a retried call will try again")
                }
            }
        }
        self.reconcile_snapshots()?;
        self.reconcile_publications()?;
        self.recover_staged_volumes()?;
        self.reconcile_ephemeral()?;
        self.enforce_quotas_on_old_volumes()?;
        self.report_orphans()?;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// A pool whose quotas were switched on after some of its volumes were created: give those
    /// volumes their project and limit now, and say that what they already hold is not charged.
    fn enforce_quotas_on_old_volumes(&self) -> Result<()> {
        if !self.pools.values().any(|p| p.backend().enforces_capacity()) {
            return Ok(());
        }
        let mut from = 0;
        loop {
            let page = self.store.list_ready(from, Some(DEFAULT_PAGE_SIZE))?;
            let Some(last) = page.last().map(|(v, _)| v.seq) else {
                break;
            };
            for (vol, _) in &page {
                let Some(pool) = self.pools.get(&vol.pool) else {
                    continue;
                };
                match pool.backend().ensure_limit(vol) {
                    Ok(false) => {}
                    Ok(true) => tracing::warn!(
                        volume = %vol.id, pool = %vol.pool,
                        "volume predates project quotas on its pool: limit set now; files written before are not charged to it"
                    ),
                    Err(e) => {
                        tracing::warn!(volume = %vol.id, error = %e, "could not put the volume under its quota")
                    }
                }
            }
            from = last + 1;
        }
        Ok(())
    }

    /// Logs every directory in a pool that no volume record names: data stowage does not know
    /// about (a restored or replaced database, a copy by hand). It is never deleted.
    fn report_orphans(&self) -> Result<()> {
        let known: std::collections::HashSet<String> =
            self.store.volume_ids()?.into_iter().collect();
        for pool in self.pools.values() {
            let orphans: Vec<String> = pool
                .backend()
                .entry_names()?
                .into_iter()
                .filter(|name| !known.contains(name))
                .collect();
            if !orphans.is_empty() {
                tracing::warn!(
                    pool = %pool.name(), count = orphans.len(), first = %orphans[0],
                    "pool holds directories no volume record names; they are left untouched"
                );
            }
            let snapshots: std::collections::HashSet<String> =
                self.store.snapshot_ids(pool.name())?.into_iter().collect();
            let orphans: Vec<String> = pool
                .backend()
                .snapshot_names()?
                .into_iter()
                .filter(|name| !snapshots.contains(name))
                .collect();
            if !orphans.is_empty() {
                tracing::warn!(
                    pool = %pool.name(), count = orphans.len(), first = %orphans[0],
                    "pool holds snapshots no snapshot record names; they are left untouched"
                );
            }
        }
        Ok(())
    }

    fn pool(&self, name: Option<&str>) -> Result<&Arc<Pool>> {
        let name = name.unwrap_or(&self.default_pool);
        self.pools.get(name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "pool {name:?} is not configured on node {:?}; pools here: {}",
                self.identity.node_id,
                self.pools.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// Why `pool` cannot serve `cap`, if it cannot.
    fn unsupported(pool: &Pool, cap: &Capability) -> Option<String> {
        if cap.mode.is_multi_node() {
            return Some(format!(
                "access mode {} needs a volume reachable from several nodes; stowage volumes are local to one node",
                cap.mode.name()
            ));
        }
        match &cap.access {
            Access::Block if !pool.backend().supports_block() => Some(format!(
                "pool {:?} (kind {}) cannot serve block volumes",
                pool.name(),
                pool.kind().as_str()
            )),
            Access::Mount(m) if !pool.backend().supports_fs_type(&m.fs_type) => Some(format!(
                "pool {:?} serves filesystem {:?}, not {:?}",
                pool.name(),
                pool.backend().default_fs_type(),
                m.fs_type
            )),
            _ => None,
        }
    }

    fn check_capabilities(pool: &Pool, caps: &[Capability]) -> Result<bool> {
        for cap in caps {
            if let Some(why) = Self::unsupported(pool, cap) {
                return Err(Error::InvalidArgument(why));
            }
        }
        let block = caps.iter().any(Capability::is_block);
        if block && caps.iter().any(|c| !c.is_block()) {
            return Err(Error::invalid(
                "volume_capabilities mix block and mount access; a volume is one or the other",
            ));
        }
        Ok(block)
    }

    fn to_volume(&self, vol: &VolumeRecord, pool: &Pool) -> csi::Volume {
        csi::Volume {
            capacity_bytes: vol.capacity as i64,
            volume_id: vol.id.as_str().to_owned(),
            volume_context: pool.volume_context().clone(),
            content_source: vol.source.as_ref().map(ContentSource::to_wire),
            accessible_topology: vec![self.topology.clone()],
        }
    }

    fn incompatibility(
        req: &CreateVolume,
        pool: &Pool,
        block: bool,
        vol: &VolumeRecord,
    ) -> Option<String> {
        if vol.pool != pool.name() {
            return Some(format!(
                "it is in pool {:?}, not {:?}",
                vol.pool,
                pool.name()
            ));
        }
        if !req.capacity.admits(vol.capacity) {
            return Some(format!(
                "its capacity {} is outside the requested range (required {}, limit {})",
                vol.capacity,
                req.capacity.required,
                req.capacity
                    .limit
                    .map_or("none".to_owned(), |l| l.to_string())
            ));
        }
        if vol.block != block {
            return Some(format!(
                "it is a {} volume",
                if vol.block { "block" } else { "filesystem" }
            ));
        }
        if vol.source != req.source {
            return Some(match &vol.source {
                Some(s) => format!("it was made from {}", crate::store::source_to_text(s)),
                None => "it was made empty, not from a source".to_owned(),
            });
        }
        None
    }

    /// CreateVolume. With a content source, the volume is filled from it (see
    /// [`crate::snapshots`]): the source's pool is the default, and its size the least.
    pub fn create_volume(&self, req: CreateVolume) -> Result<csi::Volume> {
        let _guard = self
            .guards
            .claim(format!("volume name {:?}", req.name.as_str()))?;
        let existing = self.store.volume_by_name(req.name.as_str())?;
        crate::phases::mark("lookup");
        // A source that is gone matters only to a volume still to be filled: a retried call
        // for a volume made from it before it was deleted still answers OK.
        let source = req.source.as_ref().map(|s| self.resolve_source(s));
        let source_pool = match &source {
            Some(Ok(s)) => Some(s.pool().to_owned()),
            _ => existing
                .as_ref()
                .filter(|e| e.source == req.source)
                .map(|e| e.pool.clone()),
        };
        let pool_name = req.params.pool.as_deref().or(source_pool.as_deref());
        let pool = Arc::clone(self.pool(pool_name)?);
        if !pool.backend().provisions() {
            return Err(Error::InvalidArgument(format!(
                "pool {:?} holds pre-provisioned (static) volumes only; name another pool",
                pool.name()
            )));
        }
        let block = Self::check_capabilities(&pool, &req.capabilities)?;
        if let Some(topology) = &req.topology {
            if !topology.admits(&self.identity.segments()) {
                return Err(Error::ResourceExhausted(format!(
                    "the requisite topology does not include this node ({}={}); this driver instance provisions only on its own node",
                    self.identity.topology_key, self.identity.node_id
                )));
            }
        }

        let vol = match existing {
            Some(existing) => {
                if let Some(why) = Self::incompatibility(&req, &pool, block, &existing) {
                    return Err(Error::AlreadyExists(format!(
                        "volume {:?} already exists as {} but is incompatible: {why}",
                        req.name.as_str(),
                        existing.id
                    )));
                }
                match existing.state {
                    VolumeState::Ready => return Ok(self.to_volume(&existing, &pool)),
                    VolumeState::Creating => existing,
                    VolumeState::Deleting => {
                        return Err(Error::Aborted(format!(
                            "volume {:?} ({}) is being deleted; retry after the deletion completes",
                            req.name.as_str(),
                            existing.id
                        )))
                    }
                }
            }
            None => {
                let source = source
                    .as_ref()
                    .map(|s| s.as_ref().map_err(Error::clone))
                    .transpose()?;
                let mut size = req.capacity.choose(
                    source.as_ref().map_or(pool.default_size(), |s| s.size()),
                    SIZE_GRANULE,
                );
                // A filesystem with a minimum size (xfs, btrfs on an image pool): a smaller
                // request is rounded up to it when its limit allows, refused otherwise.
                let minimum = req
                    .capabilities
                    .iter()
                    .filter_map(|c| match &c.access {
                        Access::Mount(m) => Some(pool.backend().min_volume_size(&m.fs_type)),
                        Access::Block => None,
                    })
                    .max()
                    .unwrap_or(0);
                if size < minimum {
                    if req.capacity.limit.is_some_and(|l| l < minimum) {
                        return Err(Error::OutOfRange(format!(
                            "the requested filesystem needs at least {minimum} bytes; the limit is {}",
                            req.capacity.limit.unwrap_or(0)
                        )));
                    }
                    size = minimum;
                }
                if let Some(source) = &source {
                    size = Self::check_source(&req, &pool, block, source, size)?;
                }
                pool.check_fits(size)?;
                let id = VolumeId::generate();
                let (fs_type, block_size) = source.as_ref().map_or((None, None), |s| s.layout());
                crate::phases::mark("checks");
                self.store.insert_volume(&NewVolume {
                    id: &id,
                    name: req.name.as_str(),
                    pool: pool.name(),
                    capacity: size,
                    block,
                    pvc_name: req.params.pvc_name.as_deref(),
                    pvc_namespace: req.params.pvc_namespace.as_deref(),
                    pv_name: req.params.pv_name.as_deref(),
                    full_allocation: req.params.full_allocation,
                    source: req.source.as_ref(),
                    fs_type,
                    block_size,
                })?
            }
        };
        crate::crash::point("create-after-intent");
        match source.transpose()? {
            None => {
                pool.backend().create(&vol)?;
                crate::crash::point("create-after-backend");
                self.store.set_volume_state(&vol.id, VolumeState::Ready)?;
                crate::phases::mark("ready-write");
            }
            Some(source) => {
                self.fill_from(&vol, &pool, &source)?;
                crate::crash::point("create-after-backend");
                self.store.set_volume_ready_durably(&vol.id)?;
            }
        }
        Ok(self.to_volume(&vol, &pool))
    }

    /// One round of the background watch: [`crate::pool::PoolBackend::watch`] for every ready
    /// volume of the pools that watch, skipping a volume another call holds (the next round
    /// gets it). Failures are logged. Returns how many volumes were checked.
    pub fn watch_volumes(&self) -> usize {
        if !self.pools.values().any(|p| p.backend().watches()) {
            return 0;
        }
        let mut checked = 0;
        let mut from = 0;
        loop {
            let page = match self.store.list_ready(from, Some(DEFAULT_PAGE_SIZE)) {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "the background volume watch cannot list volumes");
                    return checked;
                }
            };
            let Some(last) = page.last().map(|(v, _)| v.seq) else {
                return checked;
            };
            for (vol, _) in &page {
                let Some(pool) = self.pools.get(&vol.pool).filter(|p| p.backend().watches()) else {
                    continue;
                };
                let Ok(_guard) = self.guards.claim_shared(format!("volume {}", vol.id)) else {
                    continue;
                };
                if let Err(e) = pool.backend().watch(vol) {
                    tracing::warn!(volume = %vol.id, pool = %vol.pool, error = %e, "background check of the volume failed");
                }
                checked += 1;
            }
            from = last + 1;
        }
    }

    /// One round of the pools' background upkeep ([`crate::pool::PoolBackend::tidy`]).
    pub fn tidy_pools(&self) {
        for pool in self.pools.values() {
            pool.backend().tidy();
        }
    }

    /// Claims the guard of a volume id.
    pub(crate) fn claim(&self, id: &VolumeId) -> Result<Guard> {
        self.guards.claim(format!("volume {id}"))
    }

    /// DeleteVolume. Unknown ids are OK (the spec's idempotency); a volume with a publication
    /// is FAILED_PRECONDITION and keeps its data.
    pub fn delete_volume(&self, req: DeleteVolume) -> Result<()> {
        let VolumeRef::Ours(id) = req.volume else {
            return Ok(());
        };
        let _guard = self.claim(&id)?;
        let Some(vol) = self.store.volume_by_id(&id)? else {
            return Ok(());
        };
        let publications = self.store.publications_of(&id)?;
        crate::phases::mark("lookup");
        if !publications.is_empty() {
            let paths: Vec<&str> = publications.iter().map(|p| p.path.as_str()).collect();
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still staged or published on node {:?} at {}; unpublish and unstage it first",
                self.identity.node_id,
                paths.join(", ")
            )));
        }
        let pool = self.pools.get(&vol.pool).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "volume {id} lives in pool {:?}, which is not configured on this node",
                vol.pool
            ))
        })?;
        if vol.state != VolumeState::Deleting {
            self.store.set_volume_state(&id, VolumeState::Deleting)?;
        }
        crate::crash::point("delete-after-intent");
        pool.backend().delete(&vol)?;
        crate::crash::point("delete-after-backend");
        self.store.remove_volume(&id)?;
        crate::phases::mark("remove-write");
        Ok(())
    }

    /// ControllerExpandVolume: records the new capacity durably (the intent), then grows the
    /// volume's storage. Never shrinks: a capacity at or below the recorded one answers the
    /// recorded one (and finishes a growth a crash interrupted).
    pub fn controller_expand(
        &self,
        req: ControllerExpand,
    ) -> Result<csi::ControllerExpandVolumeResponse> {
        let id = req.volume.require()?.clone();
        let _guard = self.claim(&id)?;
        let (vol, pool) = self.ready_volume(&req.volume)?;
        if let Some(cap) = &req.capability {
            if let Some(why) = Self::unsupported(&pool, cap) {
                return Err(Error::InvalidArgument(why));
            }
            if cap.is_block() != vol.block {
                return Err(Error::InvalidArgument(format!(
                    "volume {id} is a {} volume",
                    if vol.block { "block" } else { "filesystem" }
                )));
            }
        }
        let want = req.capacity.choose(vol.capacity, SIZE_GRANULE);
        // Never shrinks: a lowered request is answered with the size the volume has.
        let target = want.max(vol.capacity);
        if target > vol.capacity {
            pool.check_fits(target)?;
            self.store.set_volume_capacity(&id, target)?;
        }
        crate::crash::point("expand-after-intent");
        let node_expansion_required = pool.backend().expand(&vol, target)?;
        crate::crash::point("expand-after-backend");
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(target).unwrap_or(i64::MAX),
            node_expansion_required,
        })
    }

    /// A ready volume by id, or NOT_FOUND.
    pub(crate) fn ready_volume(&self, volume: &VolumeRef) -> Result<(VolumeRecord, Arc<Pool>)> {
        let id = volume.require()?;
        let vol = self
            .store
            .volume_by_id(id)?
            .filter(|v| v.state == VolumeState::Ready)
            .ok_or_else(|| not_found(id.as_str()))?;
        let pool = self.pools.get(&vol.pool).cloned().ok_or_else(|| {
            Error::NotFound(format!(
                "volume {id} lives in pool {:?}, which is not configured on this node",
                vol.pool
            ))
        })?;
        Ok((vol, pool))
    }

    /// ValidateVolumeCapabilities: confirmed only when the volume supports every capability
    /// and the given context and parameters are the volume's.
    pub fn validate_capabilities(
        &self,
        req: ValidateCapabilities,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        let (vol, pool) = self.ready_volume(&req.volume)?;
        let refuse = |message: String| csi::ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        for cap in &req.capabilities {
            if let Some(why) = Self::unsupported(&pool, cap) {
                return Ok(refuse(why));
            }
            if cap.is_block() != vol.block {
                return Ok(refuse(format!(
                    "volume {} is a {} volume",
                    vol.id,
                    if vol.block { "block" } else { "filesystem" }
                )));
            }
        }
        let context = pool.volume_context();
        if !req.volume_context.is_empty() && &req.volume_context != context {
            return Ok(refuse(format!(
                "volume_context does not match the one volume {} was created with",
                vol.id
            )));
        }
        if !req.parameters.is_empty() {
            match VolumeParams::from_wire(&req.parameters) {
                Err(e) => return Ok(refuse(e.to_string())),
                Ok(p) if p.pool.as_deref().unwrap_or(&self.default_pool) != vol.pool => {
                    return Ok(refuse(format!(
                        "volume {} is in pool {:?}",
                        vol.id, vol.pool
                    )))
                }
                Ok(_) => {}
            }
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.capabilities.iter().map(capability_to_wire).collect(),
                parameters: req.parameters,
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    fn status(
        &self,
        vol: &VolumeRecord,
        pool: Option<&Pool>,
        published: bool,
    ) -> csi::list_volumes_response::VolumeStatus {
        let condition = match pool {
            Some(pool) => pool.backend().condition(vol),
            None => Condition {
                abnormal: true,
                message: format!("pool {:?} is not configured on this node", vol.pool),
            },
        };
        csi::list_volumes_response::VolumeStatus {
            published_node_ids: if published {
                vec![self.identity.node_id.clone()]
            } else {
                vec![]
            },
            volume_condition: Some(csi::VolumeCondition {
                abnormal: condition.abnormal,
                message: condition.message,
            }),
        }
    }

    /// ListVolumes. A token names the sequence number to continue from (stable when volumes
    /// are deleted between pages) and carries a tag keyed with this process's secret, so a
    /// token this driver did not hand out — or handed out before a restart — is ABORTED.
    /// Where a listing continues: 0 without a token, ABORTED for a token this instance did
    /// not issue for this listing.
    pub(crate) fn open_token(&self, listing: u8, token: Option<&str>) -> Result<i64> {
        match token {
            None => Ok(0),
            Some(token) => self.tokens.open(listing, token).ok_or_else(|| {
                Error::Aborted(format!(
                    "starting_token {token:?} was not issued by this driver instance for this listing; restart the listing without a token"
                ))
            }),
        }
    }

    pub fn list_volumes(&self, req: ListVolumes) -> Result<csi::ListVolumesResponse> {
        let from = self.open_token(VOLUME_TOKENS, req.page.starting_token.as_deref())?;
        // Without max_entries the CO sets no limit, but one response holding every volume
        // could pass the 4 MiB a gRPC client accepts by default: pages stay bounded and
        // next_token says there is more.
        let page = req.page.max_entries.unwrap_or(DEFAULT_PAGE_SIZE);
        let mut rows = self.store.list_ready(from, Some(page.saturating_add(1)))?;
        let next_token = match page {
            n if rows.len() > n as usize => rows
                .pop()
                .map(|(v, _)| self.tokens.issue(VOLUME_TOKENS, v.seq))
                .unwrap_or_default(),
            _ => String::new(),
        };
        // Each entry takes the id's string from its record instead of a copy: at thousands of
        // entries per page, every allocation per entry shows.
        let entries = rows
            .into_iter()
            .map(|(vol, published)| {
                let pool = self.pools.get(&vol.pool);
                let status = self.status(&vol, pool.map(|p| &**p), published);
                let content_source = vol.source.as_ref().map(ContentSource::to_wire);
                csi::list_volumes_response::Entry {
                    volume: Some(csi::Volume {
                        capacity_bytes: vol.capacity as i64,
                        volume_id: vol.id.into_string(),
                        volume_context: pool
                            .map(|p| p.volume_context().clone())
                            .unwrap_or_default(),
                        content_source: pool.and(content_source),
                        accessible_topology: vec![self.topology.clone()],
                    }),
                    status: Some(status),
                }
            })
            .collect();
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    /// ControllerGetVolume.
    pub fn get_volume(&self, req: GetVolume) -> Result<csi::ControllerGetVolumeResponse> {
        let (vol, pool) = self.ready_volume(&req.volume)?;
        let published = !self.store.publications_of(&vol.id)?.is_empty();
        let s = self.status(&vol, Some(&pool), published);
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(self.to_volume(&vol, &pool)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: s.published_node_ids,
                volume_condition: s.volume_condition,
            }),
        })
    }

    /// GetCapacity: the real free space of the pool's filesystem; 0 for a topology, pool or
    /// capability this node cannot serve (another node may).
    pub fn get_capacity(&self, req: GetCapacity) -> Result<csi::GetCapacityResponse> {
        let zero = csi::GetCapacityResponse::default();
        if let Some(t) = &req.topology {
            if *t != self.identity.segments() {
                return Ok(zero);
            }
        }
        let name = req.params.pool.as_deref().unwrap_or(&self.default_pool);
        let Some(pool) = self.pools.get(name) else {
            return Ok(zero);
        };
        if req
            .capabilities
            .iter()
            .any(|c| Self::unsupported(pool, c).is_some())
        {
            return Ok(zero);
        }
        let space = pool.backend().capacity()?;
        let available = i64::try_from(space.available).unwrap_or(i64::MAX);
        Ok(csi::GetCapacityResponse {
            available_capacity: available,
            maximum_volume_size: Some(available),
            minimum_volume_size: None,
        })
    }
}

/// A typed capability back on the wire.
pub fn capability_to_wire(cap: &Capability) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
    csi::VolumeCapability {
        access_type: Some(match &cap.access {
            Access::Block => AccessType::Block(BlockVolume {}),
            Access::Mount(m) => AccessType::Mount(MountVolume {
                fs_type: m.fs_type.clone(),
                mount_flags: m.flags.iter().map(|f| f.as_str().to_owned()).collect(),
                volume_mount_group: String::new(),
            }),
        }),
        access_mode: Some(AccessMode {
            mode: cap.mode.to_wire() as i32,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::path::Path;
    use stowage_core::config::{PoolConfig, PoolKind};
    use stowage_core::request::NodeStage;
    use stowage_sys::{FakeKernel, KernelCall, MountAttrs, QuotaSupport};

    fn engine(dir: &Path, kernel: Arc<FakeKernel>) -> Engine {
        let cfg = PoolConfig {
            name: "default".into(),
            kind: PoolKind::Dir,
            path: dir.join("pool"),
            default_size: None,
            overcommit_ratio: None,
            quotas: None,
            overcommit: None,
            stats: None,
        };
        let pool = Pool::open(&cfg, kernel.clone()).unwrap();
        let identity = Identity {
            node_id: "n1".into(),
            topology_key: "stowage.csi.dev/node".into(),
        };
        let mut e = Engine::new(
            Store::open_in_memory().unwrap(),
            vec![pool],
            identity,
            kernel,
        )
        .unwrap();
        e.kubelet_dirs = vec![dir.join("kubelet")];
        std::fs::create_dir_all(dir.join("kubelet")).unwrap();
        e.reconcile().unwrap();
        e
    }

    fn create(name: &str) -> CreateVolume {
        let req = csi::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![capability_to_wire(&Capability {
                access: Access::Mount(Default::default()),
                mode: stowage_core::request::AccessMode::SingleNodeWriter,
            })],
            ..Default::default()
        };
        CreateVolume::try_from(&req).unwrap()
    }

    #[test]
    fn a_call_on_a_busy_volume_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path(), Arc::new(FakeKernel::new()));
        let _in_flight = e.guards.claim("volume name \"busy\"".into()).unwrap();
        assert_eq!(
            e.create_volume(create("busy")).unwrap_err().code(),
            tonic::Code::Aborted
        );
        let v = e.create_volume(create("free")).unwrap();
        let id = VolumeId::parse(&v.volume_id).unwrap();
        let _held = e.claim(&id).unwrap();
        let del = DeleteVolume {
            volume: VolumeRef::Ours(id.clone()),
        };
        assert_eq!(
            e.delete_volume(del).unwrap_err().code(),
            tonic::Code::Aborted
        );
    }

    proptest::proptest! {
        /// No string but one this instance issued for this listing opens a page.
        #[test]
        fn arbitrary_tokens_open_nothing(token in "\\PC{0,40}", seq in 1i64..i64::MAX) {
            let t = PageTokens::default();
            let issued = t.issue(VOLUME_TOKENS, seq);
            proptest::prop_assert_eq!(t.open(VOLUME_TOKENS, &issued), Some(seq));
            if token != issued {
                proptest::prop_assert_eq!(t.open(VOLUME_TOKENS, &token), None);
            }
            proptest::prop_assert_eq!(t.open(crate::snapshots::SNAPSHOT_TOKENS, &issued), None);
        }
    }

    #[test]
    fn page_tokens_are_only_ours() {
        let t = PageTokens::default();
        let token = t.issue(VOLUME_TOKENS, 42);
        assert_eq!(t.open(VOLUME_TOKENS, &token), Some(42));
        assert_eq!(
            t.open(crate::snapshots::SNAPSHOT_TOKENS, &token),
            None,
            "a ListVolumes token does not page ListSnapshots"
        );
        for bad in [
            "42",
            "",
            "42.",
            ".0",
            "abc.def",
            "-1.0",
            "43.0000000000000000",
        ] {
            assert_eq!(t.open(VOLUME_TOKENS, bad), None, "{bad}");
        }
        let forged = format!("43.{}", token.split_once('.').unwrap().1);
        assert_eq!(t.open(VOLUME_TOKENS, &forged), None);
        assert_eq!(
            PageTokens::default().open(VOLUME_TOKENS, &token),
            None,
            "a token from another instance"
        );
    }

    #[test]
    fn volumes_from_an_advisory_past_get_their_quota_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let e = engine(dir.path(), kernel.clone());
        let v = e.create_volume(create("old")).unwrap();
        drop(e);
        // The same pool, now with quotas on, over the same store.
        kernel.set_quota_support(QuotaSupport::Enforced);
        let cfg = PoolConfig {
            name: "default".into(),
            kind: PoolKind::Dir,
            path: dir.path().join("pool"),
            default_size: None,
            overcommit_ratio: None,
            quotas: None,
            overcommit: None,
            stats: None,
        };
        let pool = Pool::open(&cfg, kernel.clone()).unwrap();
        let identity = Identity {
            node_id: "n1".into(),
            topology_key: "k".into(),
        };
        let store = Store::open_in_memory().unwrap();
        let id = VolumeId::parse(&v.volume_id).unwrap();
        let rec = store
            .insert_volume(&crate::store::NewVolume {
                id: &id,
                name: "old",
                pool: "default",
                capacity: v.capacity_bytes as u64,
                block: false,
                pvc_name: None,
                pvc_namespace: None,
                pv_name: None,
                full_allocation: false,
                source: None,
                fs_type: None,
                block_size: None,
            })
            .unwrap();
        store.set_volume_state(&id, VolumeState::Ready).unwrap();
        let e = Engine::new(store, vec![pool], identity, kernel.clone()).unwrap();
        kernel.clear();
        e.reconcile().unwrap();
        assert_eq!(
            kernel.limit(rec.project_id()),
            Some(v.capacity_bytes as u64)
        );
        // Once set, a restart changes nothing.
        kernel.clear();
        e.reconcile().unwrap();
        assert!(
            !kernel
                .calls()
                .iter()
                .any(|c| matches!(c, KernelCall::SetProjectLimit { .. })),
            "{:?}",
            kernel.calls()
        );
    }

    #[test]
    fn not_ready_until_reconciled() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let cfg = PoolConfig {
            name: "default".into(),
            kind: PoolKind::Dir,
            path: dir.path().join("p"),
            default_size: None,
            overcommit_ratio: None,
            quotas: None,
            overcommit: None,
            stats: None,
        };
        let pool = Pool::open(&cfg, kernel.clone()).unwrap();
        let identity = Identity {
            node_id: "n1".into(),
            topology_key: "k".into(),
        };
        let e = Engine::new(
            Store::open_in_memory().unwrap(),
            vec![pool],
            identity,
            kernel,
        )
        .unwrap();
        assert_eq!(
            e.require_ready().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        e.reconcile().unwrap();
        assert!(e.is_ready());
    }

    #[test]
    fn stage_binds_the_volume_directory_nosuid_nodev_through_the_seam() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_quota_support(QuotaSupport::Unavailable("fake".into()));
        let e = engine(dir.path(), kernel.clone());
        let v = e.create_volume(create("staged")).unwrap();
        kernel.clear();
        let staging = dir.path().join("kubelet/staging");
        let req = csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(capability_to_wire(&Capability {
                access: Access::Mount(Default::default()),
                mode: stowage_core::request::AccessMode::SingleNodeWriter,
            })),
            ..Default::default()
        };
        e.node_stage(NodeStage::try_from(&req).unwrap()).unwrap();
        let id = VolumeId::parse(&v.volume_id).unwrap();
        let volume_dir = dir.path().join("pool/volumes").join(id.as_str());
        let source = stowage_sys::fs::file_info(
            stowage_sys::fs::open_trusted_dir(&volume_dir)
                .unwrap()
                .as_fd(),
        )
        .unwrap()
        .id;
        let target = stowage_sys::fs::file_info(
            stowage_sys::fs::open_trusted_dir(&staging).unwrap().as_fd(),
        )
        .unwrap()
        .id;
        assert_eq!(
            kernel.calls(),
            vec![KernelCall::BindMount {
                source,
                target,
                attrs: MountAttrs {
                    nosuid: true,
                    nodev: true,
                    ..Default::default()
                }
            }]
        );
        // The store records the publication, so the controller refuses deletion.
        let del = DeleteVolume {
            volume: VolumeRef::Ours(id),
        };
        assert_eq!(
            e.delete_volume(del).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        // A failing mount is reported with its arguments, never as UNKNOWN.
        kernel.fail_next("bind_mount", stowage_sys::Errno::PERM, 1);
        let other = dir.path().join("kubelet/other");
        let mut req2 = req.clone();
        req2.staging_target_path = other.display().to_string();
        let err = e
            .node_stage(NodeStage::try_from(&req2).unwrap())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        // The failed stage made the directory and left its record unfinished: the volume is
        // not staged there, and NodeGetVolumeStats says so instead of reporting on it.
        let stats = csi::NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: other.display().to_string(),
            staging_target_path: String::new(),
        };
        let err = e
            .node_stats(stowage_core::request::NodeStats::try_from(&stats).unwrap())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
        assert!(err.to_string().contains("has not finished"), "{err}");
    }
}
