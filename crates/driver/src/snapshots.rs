//! Snapshots and volumes filled from a source: CreateSnapshot, DeleteSnapshot, ListSnapshots,
//! GetSnapshot, and the part of CreateVolume that restores a snapshot or clones a volume.
//!
//! A snapshot lives in the pool of its volume and is taken by that pool's backend (a
//! subvolume snapshot, a reflink or copy of an image file, a copy of a directory tree). It is
//! recorded `creating` durably before the backend acts and `ready` durably after, so a crash
//! never leaves a half snapshot reported ready: reconciliation removes what a `creating`
//! snapshot left. A volume made from a source is bracketed the same way.

use std::os::fd::{AsFd, OwnedFd};

use stowage_core::ids::{snapshot_not_found, SnapshotId, SnapshotRef, VolumeRef};
use stowage_core::request::{
    ContentSource, CreateSnapshot, CreateVolume, DeleteSnapshot, GetSnapshot, ListSnapshots,
};
use stowage_core::{Error, Result};
use stowage_csi::v1 as csi;

use crate::engine::{Engine, DEFAULT_PAGE_SIZE};
use crate::guard::Guard;
use crate::pool::{Pool, Source};
use crate::store::{NewSnapshot, SnapshotFilter, SnapshotRecord, VolumeRecord, VolumeState};

/// Page tokens of ListSnapshots are keyed apart from those of ListVolumes.
pub(crate) const SNAPSHOT_TOKENS: u8 = 1;

/// A source resolved against the store, with its guard held for the whole call so it is
/// neither deleted nor changed while it is read.
pub(crate) struct Resolved {
    record: SourceRecord,
    _guard: Guard,
}

enum SourceRecord {
    Snapshot(SnapshotRecord),
    Volume(VolumeRecord),
}

impl Resolved {
    pub(crate) fn pool(&self) -> &str {
        match &self.record {
            SourceRecord::Snapshot(s) => &s.pool,
            SourceRecord::Volume(v) => &v.pool,
        }
    }

    /// The least capacity a volume filled from it can have.
    pub(crate) fn size(&self) -> u64 {
        match &self.record {
            SourceRecord::Snapshot(s) => s.size,
            SourceRecord::Volume(v) => v.capacity,
        }
    }

    pub(crate) fn block(&self) -> bool {
        match &self.record {
            SourceRecord::Snapshot(s) => s.block,
            SourceRecord::Volume(v) => v.block,
        }
    }

    /// The filesystem and block size a volume filled from it inherits.
    pub(crate) fn layout(&self) -> (Option<&str>, Option<u32>) {
        match &self.record {
            SourceRecord::Snapshot(s) => (s.fs_type.as_deref(), s.block_size),
            SourceRecord::Volume(v) => (v.fs_type.as_deref(), v.block_size),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match &self.record {
            SourceRecord::Snapshot(s) => format!("snapshot {}", s.id),
            SourceRecord::Volume(v) => format!("volume {}", v.id),
        }
    }
}

fn timestamp(ns: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ns.div_euclid(1_000_000_000),
        nanos: ns.rem_euclid(1_000_000_000) as i32,
    }
}

fn to_snapshot(s: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: i64::try_from(s.size).unwrap_or(i64::MAX),
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume.to_string(),
        creation_time: Some(timestamp(s.created_at_ns)),
        ready_to_use: s.state == VolumeState::Ready,
        group_snapshot_id: String::new(),
    }
}

impl Engine {
    fn claim_snapshot(&self, id: &SnapshotId) -> Result<Guard> {
        self.guards.claim(format!("snapshot {id}"))
    }

    /// The pool a record names, or FAILED_PRECONDITION when it is not configured here.
    fn pool_of(&self, what: &str, pool: &str) -> Result<std::sync::Arc<Pool>> {
        self.pools.get(pool).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "{what} lives in pool {pool:?}, which is not configured on this node"
            ))
        })
    }

    /// The root of the volume's staging mount on this node, when it is staged here with a
    /// filesystem: what a backend freezes around a copy of the volume's device.
    fn staged_root(&self, vol: &VolumeRecord) -> Result<Option<OwnedFd>> {
        if vol.block {
            return Ok(None);
        }
        for p in self.store.publications_of(&vol.id)? {
            if let Some(fd) = self.checked_stage_root(vol, &p)? {
                return Ok(Some(fd));
            }
        }
        Ok(None)
    }

    /// CreateSnapshot: idempotent by name; the same name on another source volume is
    /// ALREADY_EXISTS.
    pub fn create_snapshot(&self, req: CreateSnapshot) -> Result<csi::Snapshot> {
        let _name_guard = self
            .guards
            .claim(format!("snapshot name {:?}", req.name.as_str()))?;
        let source_id = req.source.require()?;
        // The name guard is held from here on: the record read now is the one to use.
        let existing = self.store.snapshot_by_name(req.name.as_str())?;
        if let Some(existing) = &existing {
            if existing.source_volume != *source_id {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists as {} of volume {}, not of volume {source_id}",
                    req.name.as_str(),
                    existing.id,
                    existing.source_volume
                )));
            }
            match existing.state {
                VolumeState::Ready => return Ok(to_snapshot(existing)),
                VolumeState::Deleting => {
                    return Err(Error::Aborted(format!(
                        "snapshot {:?} ({}) is being deleted; retry after the deletion completes",
                        req.name.as_str(),
                        existing.id
                    )))
                }
                VolumeState::Creating => {}
            }
        }
        // Shared: several snapshots (and clones) of one volume may be taken at once; a call
        // that changes the volume waits its turn (ABORTED, retried by the CO).
        let _volume_guard = self.guards.claim_shared(format!("volume {source_id}"))?;
        let (vol, pool) = self.ready_volume(&req.source)?;
        let snap = match existing {
            Some(existing) => existing,
            None => self.store.insert_snapshot(&NewSnapshot {
                id: &SnapshotId::generate(),
                name: req.name.as_str(),
                source_volume: &vol.id,
                pool: pool.name(),
                size: vol.capacity,
                block: vol.block,
                fs_type: vol.fs_type.as_deref(),
                block_size: vol.block_size,
            })?,
        };
        let _snapshot_guard = self.claim_snapshot(&snap.id)?;
        crate::crash::point("snapshot-after-intent");
        let staged = self.staged_root(&vol)?;
        let source = Source::Volume {
            vol: &vol,
            staged: staged.as_ref().map(|fd| fd.as_fd()),
        };
        tracing::info!(snapshot = %snap.id, volume = %vol.id, pool = %pool.name(), staged = staged.is_some(), "taking snapshot");
        pool.backend().create_snapshot(&snap, source)?;
        crate::crash::point("snapshot-after-backend");
        self.store
            .set_snapshot_state(&snap.id, VolumeState::Ready)?;
        Ok(to_snapshot(&SnapshotRecord {
            state: VolumeState::Ready,
            ..snap
        }))
    }

    /// DeleteSnapshot: unknown ids are OK. A snapshot is independent of the volumes made
    /// from it, so nothing else blocks its deletion.
    pub fn delete_snapshot(&self, req: DeleteSnapshot) -> Result<()> {
        let SnapshotRef::Ours(id) = req.snapshot else {
            return Ok(());
        };
        let _guard = self.claim_snapshot(&id)?;
        let Some(snap) = self.store.snapshot_by_id(&id)? else {
            return Ok(());
        };
        let pool = self.pool_of(&format!("snapshot {id}"), &snap.pool)?;
        if snap.state != VolumeState::Deleting {
            self.store.set_snapshot_state(&id, VolumeState::Deleting)?;
        }
        crate::crash::point("delete-snapshot-after-intent");
        pool.backend().delete_snapshot(&snap)?;
        self.store.remove_snapshot(&id)
    }

    /// GetSnapshot: a ready snapshot, or NOT_FOUND (one being cut is reported not ready).
    pub fn get_snapshot(&self, req: GetSnapshot) -> Result<csi::GetSnapshotResponse> {
        let id = req.snapshot.require()?;
        let snap = self
            .store
            .snapshot_by_id(id)?
            .filter(|s| s.state != VolumeState::Deleting)
            .ok_or_else(|| snapshot_not_found(id.as_str()))?;
        Ok(csi::GetSnapshotResponse {
            snapshot: Some(to_snapshot(&snap)),
        })
    }

    /// ListSnapshots: ready snapshots in creation order, filtered by id and source volume;
    /// a filter naming nothing of ours lists nothing.
    pub fn list_snapshots(&self, req: ListSnapshots) -> Result<csi::ListSnapshotsResponse> {
        let foreign_filter = matches!(req.snapshot, Some(SnapshotRef::Foreign(_)))
            || matches!(req.source, Some(VolumeRef::Foreign(_)));
        let from = self.open_token(SNAPSHOT_TOKENS, req.page.starting_token.as_deref())?;
        if foreign_filter {
            return Ok(csi::ListSnapshotsResponse::default());
        }
        let filter = SnapshotFilter {
            id: match &req.snapshot {
                Some(SnapshotRef::Ours(id)) => Some(id),
                _ => None,
            },
            source_volume: match &req.source {
                Some(VolumeRef::Ours(id)) => Some(id),
                _ => None,
            },
        };
        let page = req.page.max_entries.unwrap_or(DEFAULT_PAGE_SIZE);
        let mut rows = self
            .store
            .list_snapshots(from, Some(page.saturating_add(1)), filter)?;
        let next_token = if rows.len() > page as usize {
            rows.pop()
                .map(|s| self.tokens.issue(SNAPSHOT_TOKENS, s.seq))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(csi::ListSnapshotsResponse {
            entries: rows
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(to_snapshot(s)),
                })
                .collect(),
            next_token,
        })
    }

    /// Looks up the source of a CreateVolume and claims it: NOT_FOUND when it does not exist
    /// (or is not ready).
    pub(crate) fn resolve_source(&self, source: &ContentSource) -> Result<Resolved> {
        match source {
            ContentSource::Snapshot(r) => {
                let id = r.require()?;
                // Shared: many volumes may be restored from one snapshot at once; only its
                // deletion waits.
                let guard = self.guards.claim_shared(format!("snapshot {id}"))?;
                let snap = self
                    .store
                    .snapshot_by_id(id)?
                    .filter(|s| s.state == VolumeState::Ready)
                    .ok_or_else(|| snapshot_not_found(id.as_str()))?;
                Ok(Resolved {
                    record: SourceRecord::Snapshot(snap),
                    _guard: guard,
                })
            }
            ContentSource::Volume(r) => {
                let id = r.require()?;
                let guard = self.guards.claim_shared(format!("volume {id}"))?;
                let (vol, _) = self.ready_volume(r)?;
                Ok(Resolved {
                    record: SourceRecord::Volume(vol),
                    _guard: guard,
                })
            }
        }
    }

    /// Checks a CreateVolume against its resolved source: same pool, same access type, a
    /// filesystem the source's data can be read with, a size the data fits in. Returns the
    /// size of the new volume.
    pub(crate) fn check_source(
        req: &CreateVolume,
        pool: &Pool,
        block: bool,
        source: &Resolved,
        size: u64,
    ) -> Result<u64> {
        if source.pool() != pool.name() {
            return Err(Error::InvalidArgument(format!(
                "{} is in pool {:?}; a volume made from it must be in the same pool, not {:?}",
                source.describe(),
                source.pool(),
                pool.name()
            )));
        }
        if source.block() != block {
            return Err(Error::InvalidArgument(format!(
                "{} holds a {} volume; the request asks for a {} volume",
                source.describe(),
                if source.block() {
                    "block"
                } else {
                    "filesystem"
                },
                if block { "block" } else { "filesystem" }
            )));
        }
        if let (Some(fs), _) = source.layout() {
            for cap in &req.capabilities {
                if let stowage_core::request::Access::Mount(m) = &cap.access {
                    if !m.fs_type.is_empty() && m.fs_type != fs {
                        return Err(Error::InvalidArgument(format!(
                            "{} holds a {fs} filesystem; the request asks for {}",
                            source.describe(),
                            m.fs_type
                        )));
                    }
                }
            }
        }
        let least = source.size();
        if size >= least {
            return Ok(size);
        }
        match req.capacity.limit {
            Some(limit) if limit < least => Err(Error::OutOfRange(format!(
                "{} holds {least} bytes; the requested limit of {limit} bytes is smaller",
                source.describe()
            ))),
            _ => Ok(least),
        }
    }

    /// Fills a volume recorded `creating` from its source. What an earlier attempt left is
    /// removed first: a half copy is never taken for a whole one.
    pub(crate) fn fill_from(
        &self,
        vol: &VolumeRecord,
        pool: &Pool,
        source: &Resolved,
    ) -> Result<()> {
        pool.backend().delete(vol)?;
        crate::crash::point("restore-after-clear");
        let staged;
        let source = match &source.record {
            SourceRecord::Snapshot(s) => Source::Snapshot(s),
            SourceRecord::Volume(v) => {
                staged = self.staged_root(v)?;
                Source::Volume {
                    vol: v,
                    staged: staged.as_ref().map(|fd| fd.as_fd()),
                }
            }
        };
        tracing::info!(volume = %vol.id, pool = %pool.name(), source = ?vol.source, "filling volume from its source");
        pool.backend().create_from(vol, source)
    }

    /// At start, after the publications were checked: every volume still staged here is
    /// handed to its backend to heal what a crash could have left on it (a filesystem left
    /// frozen by an interrupted snapshot). Failures are logged; they do not stop the start.
    pub(crate) fn recover_staged_volumes(&self) -> Result<()> {
        for p in self.store.all_publications()? {
            let Some(vol) = self.store.volume_by_id(&p.volume_id)? else {
                continue;
            };
            let Some(pool) = self.pools.get(&vol.pool) else {
                continue;
            };
            let outcome = self
                .checked_stage_root(&vol, &p)
                .and_then(|root| match root {
                    Some(root) => pool.backend().recover_staged(&vol, root.as_fd()),
                    None => Ok(()),
                });
            if let Err(e) = outcome {
                tracing::warn!(volume = %vol.id, path = %p.path, error = %e, "could not check a staged volume at start");
            }
        }
        Ok(())
    }

    /// At start: snapshots a crash left `creating` are removed (never reported ready half
    /// made), `deleting` ones finished.
    pub(crate) fn reconcile_snapshots(&self) -> Result<()> {
        for snap in self.store.unfinished_snapshots()? {
            let Some(pool) = self.pools.get(&snap.pool) else {
                tracing::warn!(snapshot = %snap.id, pool = %snap.pool, "snapshot's pool is not configured; left as is");
                continue;
            };
            match pool
                .backend()
                .delete_snapshot(&snap)
                .and_then(|()| self.store.remove_snapshot(&snap.id))
            {
                Ok(()) => {
                    tracing::info!(snapshot = %snap.id, state = ?snap.state, "reconciled: interrupted snapshot removed")
                }
                Err(e) => {
                    tracing::warn!(snapshot = %snap.id, error = %e, "could not reconcile snapshot; a retried call will try again")
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use stowage_core::config::{PoolConfig, PoolKind};
    use stowage_core::request::{ContentSource, CreateVolume};
    use stowage_sys::FakeKernel;

    use super::*;
    use crate::engine::Identity;
    use crate::pool::Pool;
    use crate::store::Store;

    /// A `dir` pool on a temporary directory: its copies are real, its kernel fake.
    fn engine(dir: &std::path::Path) -> Engine {
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
        let kernel = Arc::new(FakeKernel::new());
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
        e.reconcile().unwrap();
        e
    }

    fn mount_cap() -> stowage_core::request::Capability {
        stowage_core::request::Capability {
            access: stowage_core::request::Access::Mount(Default::default()),
            mode: stowage_core::request::AccessMode::SingleNodeWriter,
        }
    }

    fn create(e: &Engine, name: &str, source: Option<ContentSource>) -> Result<csi::Volume> {
        let mut req = csi::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![crate::engine::capability_to_wire(&mount_cap())],
            ..Default::default()
        };
        req.volume_content_source = source.map(|s| s.to_wire());
        e.create_volume(CreateVolume::try_from(&req)?)
    }

    fn snapshot(e: &Engine, name: &str, volume: &str) -> Result<csi::Snapshot> {
        e.create_snapshot(CreateSnapshot::try_from(&csi::CreateSnapshotRequest {
            source_volume_id: volume.into(),
            name: name.into(),
            ..Default::default()
        })?)
    }

    fn snap_ref(id: &str) -> ContentSource {
        ContentSource::Snapshot(SnapshotRef::from_request(id).unwrap())
    }

    #[test]
    fn snapshot_restore_and_independence() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let vol = create(&e, "v", None).unwrap();
        let root = dir.path().join("pool/volumes").join(&vol.volume_id);
        std::fs::write(root.join("data"), b"first").unwrap();
        let s = snapshot(&e, "s", &vol.volume_id).unwrap();
        assert!(s.ready_to_use);
        assert_eq!(s.source_volume_id, vol.volume_id);
        assert_eq!(s.size_bytes, vol.capacity_bytes);
        assert_eq!(snapshot(&e, "s", &vol.volume_id).unwrap(), s, "idempotent");
        std::fs::write(root.join("data"), b"second").unwrap();

        let restored = create(&e, "r", Some(snap_ref(&s.snapshot_id))).unwrap();
        assert_eq!(
            restored.capacity_bytes, s.size_bytes,
            "the snapshot's size by default"
        );
        assert_eq!(
            restored.content_source,
            Some(snap_ref(&s.snapshot_id).to_wire())
        );
        let restored_root = dir.path().join("pool/volumes").join(&restored.volume_id);
        assert_eq!(std::fs::read(restored_root.join("data")).unwrap(), b"first");
        // Idempotent, and another source under the same name is ALREADY_EXISTS.
        assert_eq!(
            create(&e, "r", Some(snap_ref(&s.snapshot_id))).unwrap(),
            restored
        );
        assert_eq!(
            create(&e, "r", None).unwrap_err().code(),
            tonic::Code::AlreadyExists
        );

        let clone = create(
            &e,
            "c",
            Some(ContentSource::Volume(
                VolumeRef::from_request(&vol.volume_id).unwrap(),
            )),
        )
        .unwrap();
        let clone_root = dir.path().join("pool/volumes").join(&clone.volume_id);
        assert_eq!(std::fs::read(clone_root.join("data")).unwrap(), b"second");

        // The snapshot outlives its volume.
        e.delete_volume(stowage_core::request::DeleteVolume {
            volume: VolumeRef::from_request(&vol.volume_id).unwrap(),
        })
        .unwrap();
        let again = create(&e, "r2", Some(snap_ref(&s.snapshot_id))).unwrap();
        let again_root = dir.path().join("pool/volumes").join(&again.volume_id);
        assert_eq!(std::fs::read(again_root.join("data")).unwrap(), b"first");

        let del = || DeleteSnapshot {
            snapshot: SnapshotRef::from_request(&s.snapshot_id).unwrap(),
        };
        e.delete_snapshot(del()).unwrap();
        e.delete_snapshot(del()).unwrap();
        assert!(!dir
            .path()
            .join("pool/snapshots")
            .join(&s.snapshot_id)
            .exists());
        assert_eq!(
            create(&e, "r3", Some(snap_ref(&s.snapshot_id)))
                .unwrap_err()
                .code(),
            tonic::Code::NotFound
        );
    }

    #[test]
    fn sizes_sources_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let a = create(&e, "a", None).unwrap();
        let b = create(&e, "b", None).unwrap();
        let s = snapshot(&e, "s", &a.volume_id).unwrap();
        assert_eq!(
            snapshot(&e, "s", &b.volume_id).unwrap_err().code(),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            snapshot(&e, "x", "stw-00000000000000000000000000000000")
                .unwrap_err()
                .code(),
            tonic::Code::NotFound
        );
        let missing = format!("sns-{}", "0".repeat(32));
        for id in [missing.as_str(), "../../etc"] {
            assert_eq!(
                create(&e, "m", Some(snap_ref(id))).unwrap_err().code(),
                tonic::Code::NotFound,
                "{id}"
            );
        }
        // A limit below the snapshot's size cannot hold its data.
        let mut req = csi::CreateVolumeRequest {
            name: "small".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 0,
                limit_bytes: s.size_bytes - (1 << 20),
            }),
            volume_content_source: Some(snap_ref(&s.snapshot_id).to_wire()),
            ..Default::default()
        };
        req.volume_capabilities = vec![crate::engine::capability_to_wire(&mount_cap())];
        let err = e
            .create_volume(CreateVolume::try_from(&req).unwrap())
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
        // Listing: filters and pages.
        snapshot(&e, "s2", &b.volume_id).unwrap();
        let list = |snapshot: Option<&str>, source: Option<&str>, max: i32, token: &str| {
            e.list_snapshots(
                ListSnapshots::try_from(&csi::ListSnapshotsRequest {
                    max_entries: max,
                    starting_token: token.into(),
                    source_volume_id: source.unwrap_or_default().into(),
                    snapshot_id: snapshot.unwrap_or_default().into(),
                    ..Default::default()
                })
                .unwrap(),
            )
        };
        assert_eq!(list(None, None, 0, "").unwrap().entries.len(), 2);
        assert_eq!(
            list(None, Some(&a.volume_id), 0, "").unwrap().entries.len(),
            1
        );
        assert_eq!(
            list(Some(&s.snapshot_id), None, 0, "")
                .unwrap()
                .entries
                .len(),
            1
        );
        assert_eq!(list(Some("../x"), None, 0, "").unwrap().entries.len(), 0);
        let first = list(None, None, 1, "").unwrap();
        assert_eq!(first.entries.len(), 1);
        let rest = list(None, None, 1, &first.next_token).unwrap();
        assert_eq!(rest.entries.len(), 1);
        assert!(rest.next_token.is_empty());
        assert_eq!(
            list(None, None, 0, "1.0").unwrap_err().code(),
            tonic::Code::Aborted
        );
    }

    #[test]
    fn an_interrupted_snapshot_is_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path());
        let vol = create(&e, "v", None).unwrap();
        let id = SnapshotId::generate();
        e.store
            .insert_snapshot(&NewSnapshot {
                id: &id,
                name: "half",
                source_volume: &stowage_core::VolumeId::parse(&vol.volume_id).unwrap(),
                pool: "default",
                size: 1 << 20,
                block: false,
                fs_type: None,
                block_size: None,
            })
            .unwrap();
        let half = dir.path().join("pool/snapshots").join(id.as_str());
        std::fs::create_dir_all(half.join("partial")).unwrap();
        e.reconcile().unwrap();
        assert!(!half.exists(), "the half copy is removed");
        assert!(e.store.snapshot_by_id(&id).unwrap().is_none());
        let got = e.get_snapshot(GetSnapshot {
            snapshot: SnapshotRef::Ours(id),
        });
        assert_eq!(got.unwrap_err().code(), tonic::Code::NotFound);
    }
}
