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
        if let Some(existing) = self.store.snapshot_by_name(req.name.as_str())? {
            if existing.source_volume != *source_id {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {:?} already exists as {} of volume {}, not of volume {source_id}",
                    req.name.as_str(),
                    existing.id,
                    existing.source_volume
                )));
            }
            match existing.state {
                VolumeState::Ready => return Ok(to_snapshot(&existing)),
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
        let _volume_guard = self.claim(source_id)?;
        let (vol, pool) = self.ready_volume(&req.source)?;
        let snap = match self.store.snapshot_by_name(req.name.as_str())? {
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
                let guard = self.claim_snapshot(id)?;
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
                let guard = self.claim(id)?;
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
