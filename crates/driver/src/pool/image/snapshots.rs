//! Snapshots of an `image` pool: a snapshot is a clone of the volume's image file at
//! `<path>/snapshots/<snapshot id>.img` — a reflink (FICLONE, constant time, no space until
//! either side is written) where the pool's filesystem can (xfs with reflink, btrfs), a
//! sparse-aware copy elsewhere. A restore or clone is the same clone the other way, grown to
//! the new volume's capacity.
//!
//! While the volume is staged on this node with a filesystem, that filesystem is frozen
//! (FIFREEZE) around the clone so the snapshot is consistent; it is thawed on every way out
//! (the guard thaws on drop), and a crash while frozen is healed at start, where every staged
//! image volume is thawed. A staged block volume is cloned as it is (crash-consistent): its
//! filesystem, if any, belongs to the consumer.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Instant;

use stowage_core::{Error, Result};
use stowage_sys::copy::{clone_file_at, CloneMethod};
use stowage_sys::image as img;
use stowage_sys::{fs as sysfs, Frozen};

use super::super::{SnapshotBackend, Source};
use super::{allocation, image_name, sync_image, sys, ImageBackend, SUFFIX};
use crate::store::{SnapshotRecord, VolumeRecord};

fn snapshot_name(snap: &SnapshotRecord) -> String {
    format!("{}{SUFFIX}", snap.id)
}

/// Image files are the driver's own: only root reads them.
const IMAGE_MODE: u32 = 0o600;

impl ImageBackend {
    /// Clones `src_name` of `src_dir` to `dst_name` of `dst_dir`, with the filesystem at
    /// `freeze` (a staged volume's mount) frozen around it.
    fn clone_image(
        &self,
        (src_dir, src_name): (BorrowedFd<'_>, &str),
        (dst_dir, dst_name): (BorrowedFd<'_>, &str),
        freeze: Option<BorrowedFd<'_>>,
        what: &str,
    ) -> Result<CloneMethod> {
        // One freeze at a time: two snapshots of one staged volume must not freeze it twice
        // (EBUSY) nor thaw it under each other.
        let _one = freeze.map(|_| {
            self.freezing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        });
        let started = Instant::now();
        let frozen = freeze
            .map(|fs| Frozen::new(&*self.kernel, fs))
            .transpose()
            .map_err(|e| Error::internal(format!("freezing the staged filesystem of {what}"), e))?;
        crate::crash::point("image-snapshot-frozen");
        let method = clone_file_at(src_dir, src_name, dst_dir, dst_name, IMAGE_MODE)
            .map_err(sys(format!("cloning the image of {what}")));
        if let Some(frozen) = frozen {
            frozen.thaw().map_err(|e| {
                Error::internal(format!("thawing the staged filesystem of {what}"), e)
            })?;
        }
        let method = method?;
        tracing::info!(
            pool = %self.name, what, method = ?method, frozen = freeze.is_some(),
            micros = started.elapsed().as_micros() as u64, "image cloned"
        );
        Ok(method)
    }

    /// At start, for a volume staged here with a filesystem: a crash between freeze and thaw
    /// left it frozen, and every write of its consumer blocked; thaw it.
    pub(super) fn thaw_if_frozen(&self, vol: &VolumeRecord, staged: BorrowedFd<'_>) -> Result<()> {
        if self
            .kernel
            .thaw_fs(staged)
            .map_err(|e| Error::internal(format!("thawing volume {}", vol.id), e))?
        {
            tracing::warn!(volume = %vol.id, "volume's filesystem was left frozen by an interrupted snapshot; thawed");
        }
        Ok(())
    }
}

fn describe(source: &Source<'_>) -> String {
    match source {
        Source::Snapshot(s) => format!("snapshot {}", s.id),
        Source::Volume { vol, .. } => format!("volume {}", vol.id),
    }
}

impl SnapshotBackend for ImageBackend {
    fn snapshot_method(&self) -> String {
        "clone of the image file: a reflink where the pool's filesystem can (xfs with reflink, \
         btrfs; constant time), a sparse copy elsewhere; a staged filesystem is frozen around it"
            .to_owned()
    }

    fn snapshot_names(&self) -> Result<Vec<String>> {
        super::super::snapshot_entries(self.snapshots.as_fd(), &self.name, SUFFIX)
    }

    fn create_snapshot(&self, snap: &SnapshotRecord, source: Source<'_>) -> Result<()> {
        let Source::Volume { vol, staged } = source else {
            return Err(Error::Internal(
                "a snapshot is taken of a volume, not of another snapshot".to_owned(),
            ));
        };
        self.delete_snapshot(snap)?;
        // The image must exist: NOT_FOUND otherwise, before anything is frozen.
        drop(self.open_image(vol)?);
        self.clone_image(
            (self.images.as_fd(), &image_name(vol)),
            (self.snapshots.as_fd(), &snapshot_name(snap)),
            staged,
            &format!("volume {} into snapshot {}", vol.id, snap.id),
        )?;
        sysfs::sync_dir(self.snapshots.as_fd()).map_err(sys(format!(
            "syncing the snapshots of pool {:?}",
            self.name
        )))
    }
    /// Removes the snapshot's image; absent is fine.
    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        img::remove_image(self.snapshots.as_fd(), &snapshot_name(snap)).map_err(|e| {
            Error::internal(format!("removing the image of snapshot {}", snap.id), e)
        })?;
        sysfs::sync_dir(self.snapshots.as_fd()).map_err(sys(format!(
            "syncing the snapshots of pool {:?}",
            self.name
        )))
    }
    /// The source's image cloned to the volume's, then grown to its capacity (the filesystem
    /// inside follows at its first stage).
    fn create_from(&self, vol: &VolumeRecord, source: Source<'_>) -> Result<()> {
        let what = format!("volume {} from {}", vol.id, describe(&source));
        match source {
            Source::Snapshot(snap) => self.clone_image(
                (self.snapshots.as_fd(), &snapshot_name(snap)),
                (self.images.as_fd(), &image_name(vol)),
                None,
                &what,
            )?,
            Source::Volume { vol: from, staged } => self.clone_image(
                (self.images.as_fd(), &image_name(from)),
                (self.images.as_fd(), &image_name(vol)),
                staged,
                &what,
            )?,
        };
        let image = self.open_image(vol)?;
        img::grow_image(image.as_fd(), vol.capacity, allocation(vol))
            .map_err(sys(format!("growing the image of volume {}", vol.id)))?;
        sync_image(&image, &image_name(vol))?;
        sysfs::sync_dir(self.images.as_fd()).map_err(sys(format!("syncing pool {:?}", self.name)))
    }
}
