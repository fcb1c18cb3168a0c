//! Snapshots of a `btrfs` pool: a snapshot is a read-only subvolume snapshot of the volume's
//! subvolume at `<path>/snapshots/<snapshot id>`; a restore or clone is a writable snapshot
//! of the snapshot (or of the source volume) at `<path>/volumes/<volume id>`, then limited
//! like any volume. Both are constant time whatever the data size: btrfs shares every extent
//! until one side writes.
//!
//! Subvolumes a consumer nested inside a volume are not part of its snapshots (btrfs stops
//! at subvolume boundaries; they appear as empty directories), so a snapshot never holds
//! more than the volume's own subvolume.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use stowage_core::{Error, Result};
use stowage_sys::fs as sysfs;
use stowage_sys::Errno;

use super::super::{SnapshotBackend, Source};
use super::{group_of, sys, BtrfsBackend};
use crate::store::{SnapshotRecord, VolumeRecord};

impl BtrfsBackend {
    /// Opens the root of snapshot `snap`; NOT_FOUND when it is missing.
    fn open_snapshot(&self, snap: &SnapshotRecord) -> Result<OwnedFd> {
        sysfs::open_dir_beneath(self.snapshots.as_fd(), Path::new(snap.id.as_str())).map_err(|e| {
            if e.errno == Errno::NOENT {
                Error::NotFound(format!(
                    "the subvolume of snapshot {} is missing from pool {:?}",
                    snap.id, self.name
                ))
            } else {
                Error::internal(format!("opening snapshot {}", snap.id), e)
            }
        })
    }

    /// The subvolume root a source reads from.
    fn source_root(&self, source: &Source<'_>) -> Result<OwnedFd> {
        match source {
            Source::Snapshot(snap) => self.open_snapshot(snap),
            Source::Volume { vol, .. } => self.open_volume(&vol.id),
        }
    }
}

impl SnapshotBackend for BtrfsBackend {
    fn snapshot_method(&self) -> String {
        "read-only btrfs subvolume snapshot; restores and clones are writable snapshots \
         (constant time)"
            .to_owned()
    }

    fn snapshot_names(&self) -> Result<Vec<String>> {
        super::super::snapshot_entries(self.snapshots.as_fd(), &self.name, "")
    }

    /// A read-only snapshot of the volume's subvolume, replacing what an earlier attempt
    /// left under the snapshot's id.
    fn create_snapshot(&self, snap: &SnapshotRecord, source: Source<'_>) -> Result<()> {
        self.delete_snapshot(snap)?;
        let root = self.source_root(&source)?;
        self.kernel
            .btrfs_snapshot(self.snapshots.as_fd(), snap.id.as_str(), root.as_fd(), true)
            .map_err(sys(format!(
                "taking snapshot {} in pool {:?}",
                snap.id, self.name
            )))?;
        // Durable already: btrfs makes a snapshot inside a transaction commit, which the
        // ioctl waits for; a second commit here would only add its latency.
        crate::crash::point("btrfs-snapshot-after-create");
        Ok(())
    }
    /// Destroys the snapshot subvolume `snap` and removes its qgroup; absent is fine.
    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        let id = snap.id.as_str();
        let sid = match self.open_snapshot(snap) {
            Ok(root) => Some(
                self.kernel
                    .btrfs_subvolume_id(root.as_fd())
                    .map_err(sys(format!("subvolume id of snapshot {id}")))?,
            ),
            Err(Error::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let Some(sid) = sid else {
            return Ok(());
        };
        if sid == self.pool_subvolume {
            return Err(Error::FailedPrecondition(format!(
                "pool {:?} holds a directory named {id} among its snapshots that is not a btrfs subvolume; it was left in place",
                self.name
            )));
        }
        match self
            .kernel
            .btrfs_destroy_subvolume(self.snapshots.as_fd(), id)
        {
            Ok(()) => {}
            Err(e) if e.errno == Errno::NOENT => {}
            Err(e) => return Err(sys(format!("destroying snapshot {id}"))(e)),
        }
        match self.kernel.btrfs_qgroup_remove(self.snapshots.as_fd(), sid) {
            Ok(()) => {}
            // EBUSY: the cleaner has not dropped the subvolume yet; the kernel removes the
            // qgroup of a fully dropped subvolume itself.
            Err(e) if matches!(e.errno, Errno::NOENT | Errno::BUSY | Errno::INVAL) => {}
            Err(e) => {
                tracing::warn!(pool = %self.name, snapshot = %id, error = %e, "removing the qgroup of a destroyed snapshot failed")
            }
        }
        self.commit()
    }
    /// A writable snapshot of the source at the volume's place, limited to its capacity.
    fn create_from(&self, vol: &VolumeRecord, source: Source<'_>) -> Result<()> {
        let root = self.source_root(&source)?;
        let id = vol.id.as_str();
        self.kernel
            .btrfs_snapshot(self.volumes.as_fd(), id, root.as_fd(), false)
            .map_err(sys(format!(
                "making volume {id} a snapshot of its source in pool {:?}",
                self.name
            )))?;
        crate::crash::point("btrfs-fill-after-snapshot");
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            return Err(Error::Internal(format!(
                "the subvolume of volume {id} vanished right after it was made"
            )));
        };
        // The restored volume's limit sits on its own level-1 qgroup, as for any volume.
        let all = self.qgroups()?;
        self.ensure_group(vol, sid, &all)?;
        self.set_limit(vol, group_of(sid), vol.capacity)?;
        // No commit of its own: the snapshot ioctl committed the subvolume; the qgroup
        // changes ride with the filesystem's next commit, and a power cut before it is healed
        // at start, where every ready volume's qgroup and limit are made again
        // (`ensure_limit`). A second commit would double a restore's time.
        self.map().insert(id.to_owned(), sid);
        Ok(())
    }
}
