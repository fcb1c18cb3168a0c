//! The `static` kind: pre-provisioned volumes, directories an operator made beneath the
//! pool's path and names in a PersistentVolume's `volumeHandle` (`static:<pool>/<dir>`, with
//! an optional `subPath` volume attribute). The driver never creates, grows, snapshots or
//! deletes them: the data is the operator's.
//!
//! Resolution is the point of this kind (the 2018 subPath fix, done in the driver): the
//! directory and its subPath are opened from the pool's own fd, component by component,
//! with openat2 `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, a symlink anywhere is refused, and
//! the result must be on the pool's own mount (another mount is not crossed); the bind mount
//! is then made from that fd, so nothing can be swapped between the check and the mount.
//!
//! A static volume gets a record (a minted id) at its first NodeStageVolume, named after its
//! handle and subPath, so the node service handles its mounts like any volume's; the record
//! goes when its last mount does. The engine maps the handle to it (see `crate::statics`).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use stowage_core::config::PoolConfig;
use stowage_core::{Error, Result};
use stowage_sys::fs as sysfs;
use stowage_sys::{Errno, Kernel};

use super::{
    sys_error as sys, Condition, Mark, PoolBackend, PoolCapacity, SnapshotBackend, Source,
    StageRequest, VolumeUsage,
};
use crate::store::{SnapshotRecord, VolumeRecord};

/// Prefix of the record names of static volumes.
pub const RECORD_PREFIX: &str = "static/";

/// The record name of the static volume with handle `handle` and `sub_path`.
pub fn record_name(handle: &str, sub_path: Option<&std::path::Path>) -> String {
    format!(
        "{RECORD_PREFIX}{handle}//{}",
        sub_path.map_or(String::new(), |p| p.display().to_string())
    )
}

/// The backend of a `static` pool.
#[derive(Debug)]
pub struct StaticBackend {
    name: String,
    root: OwnedFd,
    /// The mount the pool's path is on; a volume's directory must be on it too.
    root_mount: u64,
    kernel: Arc<dyn Kernel>,
    /// The mark each volume had when it was last resolved: a directory swapped for a symlink
    /// after it was staged must not keep its mount from being recognised and removed.
    marks: std::sync::Mutex<HashMap<String, Mark>>,
}

fn refused(what: &str, why: &str) -> Error {
    Error::InvalidArgument(format!("{what} {why}; refusing it"))
}

impl StaticBackend {
    /// Opens the pool's path (it must exist: the operator made it and its directories).
    pub fn open(cfg: &PoolConfig, kernel: Arc<dyn Kernel>) -> Result<Self> {
        let root = sysfs::open_trusted_dir(&cfg.path).map_err(sys(format!(
            "static pool {:?}: opening {}",
            cfg.name,
            cfg.path.display()
        )))?;
        let root_mount = sysfs::file_info(root.as_fd())
            .map_err(sys(format!("static pool {:?}: statx", cfg.name)))?
            .mount_id;
        tracing::info!(
            pool = %cfg.name, path = %cfg.path.display(),
            "static pool: pre-provisioned directories, never created nor deleted; sizes are not enforced"
        );
        Ok(StaticBackend {
            name: cfg.name.clone(),
            root,
            root_mount,
            kernel,
            marks: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The directory a record names, opened beneath the pool's root: no symlink followed,
    /// no `..`, no other mount. INVALID_ARGUMENT naming what is wrong; NOT_FOUND when absent.
    fn resolve(&self, vol: &VolumeRecord) -> Result<OwnedFd> {
        let (handle, sub) = vol
            .name
            .strip_prefix(RECORD_PREFIX)
            .and_then(|rest| rest.split_once("//"))
            .ok_or_else(|| Error::Internal(format!("record {} is no static volume's", vol.id)))?;
        let parsed = match stowage_core::request::StaticHandle::parse(handle) {
            Some(Ok(h)) => h,
            _ => {
                return Err(Error::Internal(format!(
                    "record {}: bad handle {handle:?}",
                    vol.id
                )))
            }
        };
        let mut rel: PathBuf = parsed.dir;
        if !sub.is_empty() {
            rel.push(stowage_core::request::plain_relative_path("subPath", sub)?);
        }
        let what = format!(
            "static volume {handle:?} path {:?}",
            rel.display().to_string()
        );
        let fd = sysfs::open_dir_beneath(self.root.as_fd(), &rel).map_err(|e| match e.errno {
            Errno::LOOP => refused(&what, "is or passes through a symlink"),
            Errno::XDEV => refused(&what, "escapes its pool"),
            Errno::NOTDIR => refused(&what, "is not a directory"),
            Errno::NOENT => Error::NotFound(format!(
                "{what} does not exist in static pool {:?}",
                self.name
            )),
            _ => Error::internal(format!("opening {what}"), e),
        })?;
        let info = sysfs::file_info(fd.as_fd()).map_err(sys(format!("statx of {what}")))?;
        if info.mount_id != self.root_mount {
            return Err(refused(&what, "lies on another mount than its pool"));
        }
        Ok(fd)
    }
}

impl PoolBackend for StaticBackend {
    fn supports_block(&self) -> bool {
        false
    }

    fn supports_fs_type(&self, fs_type: &str) -> bool {
        fs_type.is_empty()
    }

    fn default_fs_type(&self) -> &str {
        ""
    }

    fn context(&self) -> HashMap<String, String> {
        HashMap::from([("capacityEnforcement".to_owned(), "none".to_owned())])
    }

    fn enforces_capacity(&self) -> bool {
        false
    }

    fn provisions(&self) -> bool {
        false
    }

    /// Nothing to give to new volumes.
    fn capacity(&self) -> Result<PoolCapacity> {
        Ok(PoolCapacity {
            total: 0,
            available: 0,
        })
    }

    fn create(&self, vol: &VolumeRecord) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "pool {:?} holds pre-provisioned volumes only; volume {} cannot be made there",
            self.name, vol.id
        )))
    }

    /// The data is the operator's: forgetting the record is all a delete does.
    fn delete(&self, _vol: &VolumeRecord) -> Result<()> {
        Ok(())
    }

    fn expand(&self, vol: &VolumeRecord, _capacity: u64) -> Result<bool> {
        Err(Error::InvalidArgument(format!(
            "static volume {} has no size of stowage's to grow",
            vol.name
        )))
    }

    fn ensure_limit(&self, _vol: &VolumeRecord) -> Result<bool> {
        Ok(false)
    }

    /// The operator's directories are not stowage's to report.
    fn entry_names(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn condition(&self, vol: &VolumeRecord) -> Condition {
        match self.resolve(vol) {
            Ok(_) => Condition {
                abnormal: false,
                message: "pre-provisioned directory; its size is not enforced".to_owned(),
            },
            Err(e) => Condition {
                abnormal: true,
                message: e.to_string(),
            },
        }
    }

    /// The resolved directory's inode; when it cannot be resolved any more (swapped for a
    /// symlink since it was staged), the inode it had then, so its mounts are still known.
    fn mark(&self, vol: &VolumeRecord) -> Result<Mark> {
        let mut marks = self
            .marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self
            .resolve(vol)
            .and_then(|dir| super::directory_mark(dir.as_fd(), &vol.id))
        {
            Ok(mark) => {
                marks.insert(vol.id.as_str().to_owned(), mark);
                Ok(mark)
            }
            Err(e) => marks.get(vol.id.as_str()).copied().ok_or(e),
        }
    }

    /// Binds the resolved directory (an fd from the resolution above) onto the target.
    fn stage(
        &self,
        vol: &VolumeRecord,
        target: BorrowedFd<'_>,
        how: &StageRequest<'_>,
    ) -> Result<()> {
        let dir = self.resolve(vol)?;
        super::bind_directory(&*self.kernel, dir.as_fd(), target, how, &vol.id)
    }

    /// The staging mount is gone: its remembered mark is not needed any more.
    fn unstage(&self, vol: &VolumeRecord) -> Result<()> {
        self.marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(vol.id.as_str());
        Ok(())
    }

    /// The directory's own tree, walked (no symlink followed, no mount crossed); its
    /// filesystem's free space as what is available.
    fn usage(&self, _vol: &VolumeRecord, mounted: BorrowedFd<'_>) -> Result<VolumeUsage> {
        let used = sysfs::tree_usage(mounted).map_err(sys("walking a static volume"))?;
        let space = sysfs::fs_space(mounted).map_err(sys("statvfs of a static volume"))?;
        Ok(VolumeUsage {
            bytes_total: used.bytes.saturating_add(space.bytes_available),
            bytes_used: used.bytes,
            bytes_available: space.bytes_available,
            inodes_total: space.inodes_total,
            inodes_used: used.inodes,
            inodes_available: space.inodes_free,
        })
    }
}

impl SnapshotBackend for StaticBackend {
    fn snapshot_method(&self) -> String {
        "none: static volumes are the operator's, never snapshotted".to_owned()
    }

    fn create_snapshot(&self, _snap: &SnapshotRecord, _source: Source<'_>) -> Result<()> {
        Err(Error::InvalidArgument(format!(
            "pool {:?} holds pre-provisioned volumes, which stowage does not snapshot",
            self.name
        )))
    }

    fn delete_snapshot(&self, _snap: &SnapshotRecord) -> Result<()> {
        Ok(())
    }

    fn create_from(&self, vol: &VolumeRecord, _source: Source<'_>) -> Result<()> {
        self.create(vol)
    }

    fn snapshot_names(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}
