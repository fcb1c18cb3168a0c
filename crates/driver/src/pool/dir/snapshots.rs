//! Snapshots of a `dir` pool: a snapshot is a copy of the volume's tree at
//! `<path>/snapshots/<snapshot id>`, made fd-relative by `stowage_sys::copy` (nothing
//! followed, symlinks kept as symlinks, special files recreated and never opened, hard
//! links, owners, modes, times, xattrs and holes kept, per-file reflinks where the
//! filesystem can). A restore or clone copies the other way into the new volume's directory,
//! which is made (and put under its quota) first, so every copied file is charged to it.
//!
//! The copy reads a live tree: files a consumer writes while it runs may be copied half
//! written. There is no filesystem of the volume's own to freeze; applications that need a
//! consistent snapshot quiesce themselves first (what Kubernetes' snapshot hooks are for).

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::time::Instant;

use stowage_core::{Error, Result};
use stowage_sys::copy::{copy_tree_into, copy_tree_with_progress, CopyStats};
use stowage_sys::{fs as sysfs, Errno};

use super::super::{SnapshotBackend, Source};
use super::{sys, DirBackend, PoolBackend};
use crate::store::{SnapshotRecord, VolumeRecord};

/// Logs the progress of a long copy.
fn progress(what: &str) -> impl FnMut(&CopyStats) + '_ {
    move |s: &CopyStats| {
        tracing::info!(
            what,
            files = s.files,
            dirs = s.dirs,
            bytes = s.bytes,
            "copying a volume tree"
        )
    }
}

fn done(what: &str, stats: &CopyStats, started: Instant) {
    tracing::info!(
        what,
        files = stats.files,
        dirs = stats.dirs,
        symlinks = stats.symlinks,
        specials = stats.specials,
        hardlinks = stats.hardlinks,
        bytes = stats.bytes,
        reflinked = stats.reflinked,
        skipped_mounts = stats.skipped_mounts,
        skipped_xattrs = stats.skipped_xattrs,
        micros = started.elapsed().as_micros() as u64,
        "volume tree copied"
    );
    if stats.skipped_mounts > 0 {
        tracing::warn!(
            what,
            skipped = stats.skipped_mounts,
            "mounts inside the tree were not copied"
        );
    }
}

fn remove_error(what: String) -> impl FnOnce(stowage_sys::SysError) -> Error {
    move |e| {
        if e.errno == Errno::BUSY {
            Error::FailedPrecondition(format!(
                "{what} contains a mount point ({e}); it was left in place"
            ))
        } else {
            Error::internal(format!("removing {what}"), e)
        }
    }
}

impl DirBackend {
    fn open_snapshot(&self, snap: &SnapshotRecord) -> Result<std::os::fd::OwnedFd> {
        sysfs::open_dir_beneath(self.snapshots.as_fd(), Path::new(snap.id.as_str())).map_err(|e| {
            if e.errno == Errno::NOENT {
                Error::NotFound(format!(
                    "the copy of snapshot {} is missing from pool {:?}",
                    snap.id, self.name
                ))
            } else {
                Error::internal(format!("opening snapshot {}", snap.id), e)
            }
        })
    }

    fn sync_snapshots(&self) -> Result<()> {
        sysfs::sync_dir(self.snapshots.as_fd()).map_err(sys(format!(
            "syncing the snapshots of pool {:?}",
            self.name
        )))
    }
}

fn copy_into(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, what: &str) -> Result<CopyStats> {
    copy_tree_into(src, dst, &mut progress(what)).map_err(sys(format!("copying {what}")))
}

impl SnapshotBackend for DirBackend {
    fn snapshot_method(&self) -> String {
        "copy of the volume's tree, fd-relative, symlinks kept as symlinks, per-file reflinks \
         where the filesystem allows (time grows with the data)"
            .to_owned()
    }

    fn snapshot_names(&self) -> Result<Vec<String>> {
        super::super::snapshot_entries(self.snapshots.as_fd(), &self.name, "")
    }

    /// Copies the volume's tree into the snapshot area, replacing what an earlier attempt
    /// left.
    fn create_snapshot(&self, snap: &SnapshotRecord, source: Source<'_>) -> Result<()> {
        let Source::Volume { vol, .. } = source else {
            return Err(Error::Internal(
                "a snapshot is taken of a volume, not of another snapshot".to_owned(),
            ));
        };
        self.delete_snapshot(snap)?;
        let dir = self.open_volume(&vol.id)?;
        let what = format!("volume {} into snapshot {}", vol.id, snap.id);
        let started = Instant::now();
        let stats = match copy_tree_with_progress(
            dir.as_fd(),
            self.snapshots.as_fd(),
            snap.id.as_str(),
            &mut progress(&what),
        ) {
            Ok(stats) => stats,
            Err(e) => {
                // A pod changing its tree under the copy can make it fail; what was copied so
                // far must not stay in the snapshot area, unlisted and uncharged, until a
                // retry under the same name or the next start (the record stays `creating`,
                // so a retry reuses the id).
                if let Err(undo) = self.delete_snapshot(snap) {
                    tracing::warn!(snapshot = %snap.id, error = %undo, "could not remove a failed snapshot copy");
                }
                return Err(sys(format!("copying {what}"))(e));
            }
        };
        crate::crash::point("dir-snapshot-after-copy");
        done(&what, &stats, started);
        self.sync_snapshots()
    }
    /// Removes a snapshot's tree (never following a link nor entering a mount); absent is
    /// fine.
    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        sysfs::remove_tree_at(self.snapshots.as_fd(), snap.id.as_str())
            .map_err(remove_error(format!("snapshot {}", snap.id)))?;
        self.sync_snapshots()
    }
    /// Makes the volume's directory (with its quota), then copies the source's tree into it.
    fn create_from(&self, vol: &VolumeRecord, source: Source<'_>) -> Result<()> {
        let (src, what) = match source {
            Source::Snapshot(snap) => (
                self.open_snapshot(snap)?,
                format!("snapshot {} into volume {}", snap.id, vol.id),
            ),
            Source::Volume { vol: from, .. } => (
                self.open_volume(&from.id)?,
                format!("volume {} into volume {}", from.id, vol.id),
            ),
        };
        self.create(vol)?;
        let dst = self.open_volume(&vol.id)?;
        let started = Instant::now();
        let stats = copy_into(src.as_fd(), dst.as_fd(), &what)?;
        done(&what, &stats, started);
        self.sync_volumes()
    }
}
