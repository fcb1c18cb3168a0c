//! Pools: where volumes live on this node.
//!
//! A [`Pool`] is one configured pool: what every kind shares (name, path, kind, default size,
//! the volume context it advertises) and a [`PoolBackend`], the one place where a kind's own
//! storage is handled. The engine and the node service talk to the backend through that
//! trait and never ask which kind it is; [`Pool::open`] is the only place a kind is chosen.
//!
//! Kinds: [`dir`] (a directory per volume, project quotas where the filesystem enforces
//! them), [`image`] (a sparse image file per volume on a loop device: hard sizes, raw
//! block volumes) and [`btrfs`] (a subvolume per volume with a qgroup limit).

pub mod btrfs;
pub mod dir;
pub mod image;
pub mod static_dirs;

use std::collections::HashMap;
use std::fmt::{Debug, Display};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stowage_core::config::{PoolConfig, PoolKind};
use stowage_core::request::Access;
use stowage_core::{Error, Result};
use stowage_sys::fs::{self as sysfs, InodeId};
use stowage_sys::{Errno, Kernel, MountAttrs, SysError};

use crate::store::{SnapshotRecord, VolumeRecord};

/// Granule volume sizes are rounded up to.
pub const SIZE_GRANULE: u64 = 1 << 20;

/// The health of a volume's backing storage, as CSI's VolumeCondition reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

/// Bytes and inodes of one volume as its capacity enforcement sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VolumeUsage {
    pub bytes_total: u64,
    pub bytes_used: u64,
    pub bytes_available: u64,
    pub inodes_total: u64,
    pub inodes_used: u64,
    pub inodes_available: u64,
}

/// NodeGetVolumeStats' figures for a volume and what to say about how current they are.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeStats {
    /// None when nothing is known yet (a first measurement still in progress).
    pub usage: Option<VolumeUsage>,
    /// Appended to the volume condition's message: the age of a figure that was not
    /// measured by this call, and why.
    pub note: Option<String>,
}

/// What a pool can still give to volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCapacity {
    /// The most one volume could ever get: a larger request is OUT_OF_RANGE.
    pub total: u64,
    /// What GetCapacity reports: space a new volume can count on now.
    pub available: u64,
}

/// How the node service recognises a mount of a volume: the root of its staging mount, and
/// of every publication bound from that, has this identity. A mount at a path is "ours"
/// exactly when its root matches; that decides idempotency, conflicts and what an unmount
/// may remove.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The root is this very inode: a volume directory bound as it is, or a device node
    /// bound onto a file.
    Inode(InodeId),
    /// The root is on this device: a filesystem the backend mounted from the volume's own
    /// block device, where nothing else lives.
    FilesystemOn { dev: u64 },
}

impl Mark {
    /// Whether a mount whose root is `root` is a mount of the volume.
    pub fn matches(&self, root: InodeId) -> bool {
        match *self {
            Mark::Inode(id) => id == root,
            Mark::FilesystemOn { dev } => root.dev == dev,
        }
    }
}

/// What NodeStageVolume asks of the backend.
#[derive(Debug, Clone, Copy)]
pub struct StageRequest<'a> {
    /// Block or filesystem access; for a filesystem its type (empty: the pool's default) and
    /// the mount flags the CO asked for.
    pub access: &'a Access,
    /// Attributes the staging mount gets; the node service chooses them (`nosuid,nodev`).
    pub attrs: MountAttrs,
    /// The staging path as the CO gave it (absolute, just resolved without a symlink), for
    /// the tools that take a mount point (growing a filesystem).
    pub mount_point: &'a Path,
}

/// What a volume keeps for its whole life once its first stage decided it, recorded in the
/// store before the device is configured or formatted with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLayout {
    /// The filesystem made on the volume (None: a block volume, or a kind without one).
    pub fs_type: Option<String>,
    /// The logical block size of the volume's device.
    pub block_size: Option<u32>,
}

/// What a snapshot is taken of, or a new volume filled from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A snapshot of the pool (a restore).
    Snapshot(&'a SnapshotRecord),
    /// A volume of the pool (a clone, or the volume a snapshot is taken of), with the root of
    /// its staging mount on this node when it is staged here (checked to be the volume's own
    /// mount): a kind that copies the device under a mounted filesystem freezes it around
    /// the copy.
    Volume {
        vol: &'a VolumeRecord,
        staged: Option<BorrowedFd<'a>>,
    },
}

/// One pool kind. Every method is called with the volume's guard held (or at start, before
/// the driver is ready), so two calls never act on one volume at once; a pool serves many
/// volumes concurrently. Errors are `stowage_core::Error`s whose variant is what the caller
/// may do: RESOURCE_EXHAUSTED when the pool's filesystem or quota is full, NOT_FOUND when a
/// volume's backing storage is gone, FAILED_PRECONDITION when it is in use, INTERNAL with
/// the failing call and its arguments otherwise.
///
/// Paths of the pool are reached fd-relative from a directory the backend opened at start;
/// a volume id is one safe path component by construction.
/// Snapshots and clones of one pool kind (controller side), kept apart from the rest of the
/// seam so each kind's snapshot code lives in its own file; called with the guards of the
/// snapshot and the source held.
pub trait SnapshotBackend {
    /// How this pool takes a snapshot and fills a volume from one, in a few words, for the
    /// start-up log ("read-only subvolume snapshot", "reflink of the image file", …).
    fn snapshot_method(&self) -> String;

    /// Takes snapshot `snap` (recorded `creating`) of the volume `source` names into the
    /// pool's snapshot storage, where no consumer can reach it, independent of the volume
    /// from then on. Whatever an earlier attempt left under the snapshot's id is replaced.
    /// Durable on return (the caller then records it `ready`).
    fn create_snapshot(&self, snap: &SnapshotRecord, source: Source<'_>) -> Result<()>;

    /// Removes a snapshot's storage. Absent is not an error. Durable on return.
    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()>;

    /// Fills volume `vol` (recorded `creating`, with a capacity at least the source's) from
    /// `source` and puts it under its limit, as [`PoolBackend::create`] does for an empty
    /// one. Whatever an earlier attempt left of `vol` was removed by the caller (with
    /// [`PoolBackend::delete`]). Durable on return.
    fn create_from(&self, vol: &VolumeRecord, source: Source<'_>) -> Result<()>;

    /// Names of the entries in the pool's snapshot storage, for the report of data no
    /// snapshot record names.
    fn snapshot_names(&self) -> Result<Vec<String>>;
}

pub trait PoolBackend: SnapshotBackend + Send + Sync + Debug {
    // ---- what the pool offers

    /// Whether it can serve raw block volumes.
    fn supports_block(&self) -> bool;

    /// Whether a filesystem volume can have `fs_type` (the empty string: the default).
    fn supports_fs_type(&self, fs_type: &str) -> bool;

    /// The filesystem type a filesystem volume gets when the request names none.
    fn default_fs_type(&self) -> &str;

    /// Entries the backend adds to every volume's `volume_context` (the pool adds `pool`).
    /// The same for every volume of the pool, fixed when it is opened; each value at most
    /// 128 bytes.
    fn context(&self) -> HashMap<String, String>;

    /// Whether volume sizes are hard limits (false: advisory, the volume can grow past
    /// its size).
    fn enforces_capacity(&self) -> bool;

    /// Whether CreateVolume may make volumes here (false: pre-provisioned volumes only).
    fn provisions(&self) -> bool {
        true
    }

    /// The smallest volume a filesystem of type `fs_type` (empty: the default) can be made
    /// on; CreateVolume rounds a smaller request up to it (within the request's limit).
    /// 0 (the default) for a kind that makes no filesystem.
    fn min_volume_size(&self, _fs_type: &str) -> u64 {
        0
    }

    /// Space for volumes, now. A kind that reserves space lazily (a sparse image) counts what
    /// existing volumes may still claim as taken.
    fn capacity(&self) -> Result<PoolCapacity>;

    /// The most one volume could ever get (the `total` of [`PoolBackend::capacity`]), without
    /// the per-volume accounting `available` may need: CreateVolume and expansion ask it on
    /// every call. The default asks `capacity`, for kinds where that is one statvfs.
    fn max_volume_size(&self) -> Result<u64> {
        self.capacity().map(|c| c.total)
    }

    // ---- volumes (controller side)

    /// Makes the volume's backing storage with its recorded capacity and puts it under its
    /// limit. Idempotent: what exists already is reused, so a retried or reconciled create
    /// continues where an interrupted one stopped. Durable on return (the caller then
    /// records the volume `ready`).
    fn create(&self, vol: &VolumeRecord) -> Result<()>;

    /// Removes the volume's backing storage and lifts its limit. Absent is not an error: a
    /// retried delete succeeds. A volume the kernel still has mounted (or that holds a
    /// mount, or an attached device) is refused with FAILED_PRECONDITION and left as it
    /// is. Never follows a link out of the pool nor enters another mount. Durable on return.
    fn delete(&self, vol: &VolumeRecord) -> Result<()>;

    /// Grows the volume's storage and limit to `capacity` bytes (never shrinks: a capacity
    /// smaller than the storage has changes nothing). Idempotent: the caller records the new
    /// capacity first, so a retry after a crash calls this with `vol.capacity == capacity`
    /// and must still finish the growth. Returns whether a node step is needed
    /// before the consumer sees the new size (a filesystem to grow on an attached device);
    /// NOT_FOUND when the backing storage is gone.
    fn expand(&self, vol: &VolumeRecord, capacity: u64) -> Result<bool>;

    /// At start, for a `ready` volume: makes sure its limit is in force (the dir kind: a
    /// volume created while the pool's quotas were off has none). Returns whether it had to
    /// set it now; the caller then warns that what the volume held before is not charged.
    /// Cheap and `Ok(false)` for a kind whose limits cannot go missing.
    fn ensure_limit(&self, vol: &VolumeRecord) -> Result<bool>;

    /// Names of the entries in the pool's volume storage, for the report of data no volume
    /// record names. The name of a volume's entry is its id.
    fn entry_names(&self) -> Result<Vec<String>>;

    /// Whether the kind wants [`PoolBackend::watch`] called for each of its volumes now and
    /// then (`--watch-interval`). False (the default): nothing to watch.
    fn watches(&self) -> bool {
        false
    }

    /// The background check of one ready volume (see [`PoolBackend::watches`]): puts right
    /// what a consumer can do behind the driver's back and the kind can undo. Called with
    /// the volume's guard held shared.
    fn watch(&self, _vol: &VolumeRecord) -> Result<()> {
        Ok(())
    }

    /// The background upkeep of the pool itself, every few seconds whatever
    /// `--watch-interval` says: finishes what a call had to leave for later (btrfs: the
    /// qgroups of destroyed subvolumes that the kernel refused to remove until its cleaner
    /// dropped them). Cheap when there is nothing to do; never fails (logs).
    fn tidy(&self) {}

    /// The condition of the volume's backing storage; never fails (a check that cannot be
    /// made is itself abnormal, saying why).
    fn condition(&self, vol: &VolumeRecord) -> Condition;

    // ---- volumes (node side)

    /// How mounts of this volume are recognised (see [`Mark`]). NOT_FOUND, with a message
    /// naming what is missing, when the backing storage is gone: nothing of it can be
    /// mounted then. A kind whose mark depends on an attached device answers NOT_FOUND
    /// while it is not attached (nothing of it is mounted either).
    fn mark(&self, vol: &VolumeRecord) -> Result<Mark>;

    /// Before NodeStageVolume mounts anything: what the volume will keep for its life (its
    /// filesystem type, its device's block size) when that is not recorded yet or differs
    /// from the record; the node service records it durably, then calls [`PoolBackend::stage`]
    /// with the updated record. FAILED_PRECONDITION when `access` asks for another
    /// filesystem than the recorded one or the volume is too small for it. `Ok(None)` (the
    /// default): nothing to record.
    fn prepare_stage(&self, _vol: &VolumeRecord, _access: &Access) -> Result<Option<VolumeLayout>> {
        Ok(None)
    }

    /// Mounts the volume onto `target`, an fd the node service resolved (the staging
    /// directory, already checked to be a plain directory that is no mount of anything),
    /// with `how.attrs`, so that the root of the new mount matches [`PoolBackend::mark`].
    /// The dir kind binds the volume directory; a device-backed kind attaches its device
    /// (or finds it attached), makes the filesystem if the device is blank, and mounts it.
    /// Called only when the target does not hold the volume's mount yet; must tolerate a
    /// half-done earlier attempt (an attached device, a made filesystem). Errors leave
    /// nothing mounted at `target`.
    fn stage(
        &self,
        vol: &VolumeRecord,
        target: BorrowedFd<'_>,
        how: &StageRequest<'_>,
    ) -> Result<()>;

    /// After the node service removed every mount of the volume at a staging path: releases
    /// what [`PoolBackend::stage`] held besides the mount (a device-backed kind detaches its
    /// device once no mount of the volume is left). Idempotent; nothing held is not an error.
    /// The default is for kinds whose stage is a bind mount alone, which holds nothing else.
    fn unstage(&self, _vol: &VolumeRecord) -> Result<()> {
        Ok(())
    }

    /// What NodePublishVolume binds at a target, given the volume's staging mount as the
    /// node service resolved and checked it (its root matches the mark): that mount itself
    /// for a filesystem volume; the volume's device node (opened `O_PATH`) for a block
    /// volume, once a kind serves those. The bind's root must match the mark. The default
    /// is for kinds that serve only filesystem volumes: the staging mount itself.
    fn publish_source(&self, _vol: &VolumeRecord, staged: OwnedFd) -> Result<OwnedFd> {
        Ok(staged)
    }

    /// NodeExpandVolume, with the volume's recorded capacity already raised by the caller
    /// (and [`PoolBackend::expand`] done): makes what the consumer sees follow — the device's
    /// size and the filesystem mounted at `mount_point` (absolute, a checked mount of the
    /// volume; for a block volume the device alone). Also grows the storage itself when the
    /// controller step did not run on this node. Idempotent. Returns the size the consumer
    /// now sees. The default (a kind whose limit takes effect at once): the recorded capacity.
    fn node_expand(&self, vol: &VolumeRecord, _mount_point: &Path) -> Result<u64> {
        Ok(vol.capacity)
    }

    /// At start, for a volume whose staging mount is still in place (`staged`, its checked
    /// root): heals what a crash of the driver could have left on it. The image kind thaws a
    /// filesystem an interrupted snapshot left frozen. The default: nothing to heal.
    fn recover_staged(&self, _vol: &VolumeRecord, _staged: BorrowedFd<'_>) -> Result<()> {
        Ok(())
    }

    /// NodeGetVolumeStats figures: bytes against the volume's capacity and inodes, as its
    /// limit counts them. `mounted` is the root of a mount of the volume (the path the CO
    /// asked about), for kinds that can only measure through a mounted filesystem.
    fn usage(&self, vol: &VolumeRecord, mounted: BorrowedFd<'_>) -> Result<VolumeUsage>;

    /// What NodeGetVolumeStats answers: [`PoolBackend::usage`] measured now by default; a
    /// kind whose measurement is expensive may answer an earlier figure, saying how old.
    fn stats(&self, vol: &VolumeRecord, mounted: BorrowedFd<'_>) -> Result<VolumeStats> {
        Ok(VolumeStats {
            usage: Some(self.usage(vol, mounted)?),
            note: None,
        })
    }
}

/// One pool of this node.
#[derive(Debug)]
pub struct Pool {
    name: String,
    kind: PoolKind,
    path: PathBuf,
    default_size: u64,
    /// Built once: every volume of the pool carries the same context.
    context: HashMap<String, String>,
    backend: Box<dyn PoolBackend>,
}

impl Pool {
    /// Opens (creating if needed) a configured pool with the backend of its kind.
    pub fn open(cfg: &PoolConfig, kernel: Arc<dyn Kernel>) -> Result<Self> {
        let backend: Box<dyn PoolBackend> = match cfg.kind {
            PoolKind::Dir => Box::new(dir::DirBackend::open(cfg, kernel)?),
            PoolKind::Image => Box::new(image::ImageBackend::open(cfg, kernel)?),
            PoolKind::Btrfs => Box::new(btrfs::BtrfsBackend::open(cfg, kernel)?),
            PoolKind::Static => Box::new(static_dirs::StaticBackend::open(cfg, kernel)?),
        };
        Self::with_backend(cfg, backend)
    }

    /// A pool over a backend already opened for `cfg`.
    pub fn with_backend(cfg: &PoolConfig, backend: Box<dyn PoolBackend>) -> Result<Self> {
        let mut context = backend.context();
        context.insert("pool".to_owned(), cfg.name.clone());
        tracing::info!(pool = %cfg.name, snapshots = %backend.snapshot_method(), "how the pool takes snapshots");
        Ok(Pool {
            name: cfg.name.clone(),
            kind: cfg.kind,
            path: cfg.path.clone(),
            default_size: cfg.default_size_bytes()?,
            context,
            backend,
        })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its configured host path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory the pool's backend keeps its volumes in: what the readiness check and
    /// the space figures look at.
    pub fn data_dir(&self) -> PathBuf {
        match self.kind {
            PoolKind::Dir | PoolKind::Btrfs => self.path.join("volumes"),
            PoolKind::Image => self.path.join("images"),
            PoolKind::Static => self.path.clone(),
        }
    }

    /// [`Pool::data_dir`], opened.
    pub fn open_data_dir(&self) -> stowage_sys::SysResult<OwnedFd> {
        sysfs::open_trusted_dir(&self.data_dir())
    }

    /// Space of the filesystem holding [`Pool::data_dir`].
    pub fn space(&self) -> std::result::Result<stowage_sys::fs::FsSpace, String> {
        let fd = self.open_data_dir().map_err(|e| e.to_string())?;
        sysfs::fs_space(fd.as_fd()).map_err(|e| e.to_string())
    }

    /// Backend kind, for messages; behaviour goes through [`Pool::backend`].
    pub fn kind(&self) -> PoolKind {
        self.kind
    }

    /// Size for requests that name none.
    pub fn default_size(&self) -> u64 {
        self.default_size
    }

    /// What CreateVolume puts into `volume_context`: the pool and what its kind adds (how
    /// capacity is enforced).
    pub fn volume_context(&self) -> &HashMap<String, String> {
        &self.context
    }

    /// What differs per kind.
    pub fn backend(&self) -> &dyn PoolBackend {
        &*self.backend
    }

    /// OUT_OF_RANGE when a volume of `bytes` could never fit in this pool.
    pub fn check_fits(&self, bytes: u64) -> Result<()> {
        let total = self.backend.max_volume_size()?;
        if bytes > total {
            return Err(Error::OutOfRange(format!(
                "{bytes} bytes requested, but pool {:?} has {total} bytes in all",
                self.name
            )));
        }
        Ok(())
    }
}

/// Maps a failed syscall of a backend: a full filesystem or quota is RESOURCE_EXHAUSTED,
/// anything else INTERNAL with `context` and the call.
pub(crate) fn sys_error(context: impl Display) -> impl FnOnce(SysError) -> Error {
    move |e| match e.errno {
        Errno::NOSPC | Errno::DQUOT => Error::ResourceExhausted(format!("{context}: {e}")),
        _ => Error::internal(context, e),
    }
}

/// Opens the root directory of volume `id` in `volumes` (no link followed); NOT_FOUND when
/// it is missing. For the kinds whose volume is a directory (`dir`, `btrfs`).
/// Creates (if needed) and opens `<pool path>/<sub>`, the directory a kind keeps its
/// volumes in, and names the filesystem holding it.
pub(crate) fn open_pool_dir(cfg: &PoolConfig, sub: &str) -> Result<(OwnedFd, String)> {
    let path = cfg.path.join(sub);
    sysfs::create_trusted_dir_all(&path).map_err(sys_error(format!(
        "pool {:?}: creating {}",
        cfg.name,
        path.display()
    )))?;
    let dir = sysfs::open_trusted_dir(&path).map_err(sys_error(format!(
        "pool {:?}: opening {}",
        cfg.name,
        path.display()
    )))?;
    let fs_type = sysfs::fs_type_name(dir.as_fd())
        .map_err(sys_error(format!("pool {:?}: statfs", cfg.name)))?;
    Ok((dir, fs_type))
}

/// Names in a pool's snapshot directory with `suffix` taken off (the snapshot ids, and
/// whatever else is there as it is), for the report of entries no record names.
pub(crate) fn snapshot_entries(
    dir: BorrowedFd<'_>,
    pool: &str,
    suffix: &str,
) -> Result<Vec<String>> {
    Ok(sysfs::entry_names(dir)
        .map_err(sys_error(format!("listing the snapshots of pool {pool:?}")))?
        .into_iter()
        .map(|n| {
            n.strip_suffix(suffix)
                .filter(|_| !suffix.is_empty())
                .map(str::to_owned)
                .unwrap_or(n)
        })
        .collect())
}

pub(crate) fn open_volume_dir(
    volumes: BorrowedFd<'_>,
    pool: &str,
    id: &stowage_core::VolumeId,
) -> Result<OwnedFd> {
    stowage_sys::fs::open_dir_beneath(volumes, Path::new(id.as_str())).map_err(|e| {
        if e.errno == Errno::NOENT {
            Error::NotFound(format!(
                "the directory of volume {id} is missing from pool {pool:?}"
            ))
        } else {
            Error::internal(format!("opening volume {id}"), e)
        }
    })
}

/// The mark of a volume staged by binding its root directory: that inode.
pub(crate) fn directory_mark(dir: BorrowedFd<'_>, id: &stowage_core::VolumeId) -> Result<Mark> {
    let info = stowage_sys::fs::file_info(dir)
        .map_err(|e| Error::internal(format!("statx of volume {id}"), e))?;
    Ok(Mark::Inode(info.id))
}

/// Staging of a directory volume: binds its root directory (an fd the backend opened) onto
/// the staging directory with the attributes the node service chose.
pub(crate) fn bind_directory(
    kernel: &dyn Kernel,
    dir: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    how: &StageRequest<'_>,
    id: &stowage_core::VolumeId,
) -> Result<()> {
    kernel
        .bind_mount(dir, target, how.attrs)
        .map_err(|e| Error::internal(format!("binding volume {id}"), e))
}

/// FAILED_PRECONDITION, naming where, when the kernel has the directory of volume `id` (or
/// a path inside it) mounted anywhere in this mount namespace: a bind mount elsewhere means a
/// consumer still uses it, whatever the store says. `dev`: the filesystem's device as the
/// mount table shows it, when the kind knows it (None: any device; volume ids are unique).
pub(crate) fn refuse_if_mounted(dev: Option<u64>, id: &stowage_core::VolumeId) -> Result<()> {
    let at: Vec<String> = stowage_sys::mountinfo::with_table(|text| {
        // A volume id is letters, digits and dashes, which the table never escapes: a mount
        // of the volume or of a path in it has the id in its root field, so a table without
        // the id anywhere has no such mount and needs no parsing (most deletes).
        if !text.contains(id.as_str()) {
            return Vec::new();
        }
        stowage_sys::mountinfo::parse(text)
            .filter(|m| dev.is_none_or(|d| d == m.dev) && m.root.iter().any(|c| c == id.as_str()))
            .map(|m| m.mount_point.display().to_string())
            .collect()
    })
    .map_err(|e| Error::internal("reading the mount table", e))?;
    if at.is_empty() {
        Ok(())
    } else {
        Err(Error::FailedPrecondition(format!(
            "volume {id} is still mounted at {}; it was left in place",
            at.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_match_their_own_roots_only() {
        let a = InodeId { dev: 7, ino: 2 };
        let b = InodeId { dev: 7, ino: 3 };
        let c = InodeId { dev: 8, ino: 2 };
        assert!(Mark::Inode(a).matches(a));
        assert!(!Mark::Inode(a).matches(b));
        assert!(!Mark::Inode(a).matches(c));
        let fs = Mark::FilesystemOn { dev: 7 };
        assert!(fs.matches(a) && fs.matches(b));
        assert!(!fs.matches(c));
    }
}
