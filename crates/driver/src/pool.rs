//! Pools: where volumes live on this node. A [`Pool`] is one configured backend; the `dir`
//! backend keeps a directory per volume under `<path>/volumes/`, with a project quota where
//! the filesystem enforces one.

use std::collections::HashMap;
use std::fmt::Debug;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stowage_core::config::{PoolConfig, PoolKind};
use stowage_core::{Error, Result, VolumeId};
use stowage_sys::fs::{self as sysfs, FsSpace};
use stowage_sys::{Errno, Kernel, QuotaSupport, SysError};

use crate::store::VolumeRecord;

fn volume_context(pool: &str, quota: &QuotaSupport) -> HashMap<String, String> {
    let mut ctx = HashMap::new();
    ctx.insert("pool".to_owned(), pool.to_owned());
    match quota {
        QuotaSupport::Enforced => {
            ctx.insert("capacityEnforcement".to_owned(), "quota".to_owned());
        }
        QuotaSupport::Unavailable(_) => {
            ctx.insert("capacityEnforcement".to_owned(), "advisory".to_owned());
            // The full reason is in the start-up log; a context value is limited to 128 bytes.
            ctx.insert(
                "capacityNote".to_owned(),
                "sizes are not enforced: project quotas are unavailable on this pool".to_owned(),
            );
        }
    }
    ctx
}

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

/// One pool of this node.
#[derive(Debug)]
pub struct Pool {
    name: String,
    kind: PoolKind,
    path: PathBuf,
    /// `<path>/volumes`, the only directory volume ids are resolved in.
    volumes: OwnedFd,
    fs_type: String,
    quota: QuotaSupport,
    default_size: u64,
    kernel: Arc<dyn Kernel>,
    /// Built once: every volume of the pool carries the same context.
    context: HashMap<String, String>,
}

fn sys(context: impl std::fmt::Display) -> impl FnOnce(SysError) -> Error {
    move |e| match e.errno {
        Errno::NOSPC | Errno::DQUOT => Error::ResourceExhausted(format!("{context}: {e}")),
        _ => Error::internal(context, e),
    }
}

impl Pool {
    /// Opens (creating if needed) a configured pool and detects its capacity enforcement.
    pub fn open(cfg: &PoolConfig, kernel: Arc<dyn Kernel>) -> Result<Self> {
        let volumes_path = cfg.path.join("volumes");
        sysfs::create_trusted_dir_all(&volumes_path).map_err(sys(format!(
            "pool {:?}: creating {}",
            cfg.name,
            volumes_path.display()
        )))?;
        let volumes = sysfs::open_trusted_dir(&volumes_path).map_err(sys(format!(
            "pool {:?}: opening {}",
            cfg.name,
            volumes_path.display()
        )))?;
        let fs_type = sysfs::fs_type_name(volumes.as_fd())
            .map_err(sys(format!("pool {:?}: statfs", cfg.name)))?;
        let quota = kernel.quota_support(volumes.as_fd());
        match &quota {
            QuotaSupport::Enforced => tracing::info!(
                pool = %cfg.name, path = %cfg.path.display(), fs = %fs_type,
                "pool capacity is enforced with project quotas"
            ),
            QuotaSupport::Unavailable(why) => tracing::warn!(
                pool = %cfg.name, path = %cfg.path.display(), fs = %fs_type,
                "pool capacity is ADVISORY: project quotas unavailable ({why}); volumes can grow past their size"
            ),
        }
        let context = volume_context(&cfg.name, &quota);
        Ok(Pool {
            context,
            name: cfg.name.clone(),
            kind: cfg.kind,
            path: cfg.path.clone(),
            volumes,
            fs_type,
            quota,
            default_size: cfg.default_size_bytes()?,
            kernel,
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

    /// Backend kind.
    pub fn kind(&self) -> PoolKind {
        self.kind
    }

    /// Size for requests that name none.
    pub fn default_size(&self) -> u64 {
        self.default_size
    }

    /// Whether volumes of this pool are hard-limited.
    pub fn quota(&self) -> &QuotaSupport {
        &self.quota
    }

    /// Raw block volumes need a block device; a directory pool has none.
    pub fn supports_block(&self) -> bool {
        false
    }

    /// A directory volume has the pool's filesystem: an empty fs_type or that one.
    pub fn supports_fs_type(&self, fs_type: &str) -> bool {
        fs_type.is_empty() || fs_type == self.fs_type
    }

    /// The filesystem type of the pool.
    pub fn fs_type(&self) -> &str {
        &self.fs_type
    }

    /// What CreateVolume puts into `volume_context`: the pool and how capacity is enforced.
    pub fn volume_context(&self) -> &HashMap<String, String> {
        &self.context
    }

    /// Space of the pool's filesystem.
    pub fn space(&self) -> Result<FsSpace> {
        sysfs::fs_space(self.volumes.as_fd()).map_err(sys(format!("pool {:?}: statvfs", self.name)))
    }

    /// Creates the volume's directory and its quota. Idempotent: an existing directory is
    /// reused (a retried or reconciled create continues where it stopped).
    pub fn create(&self, vol: &VolumeRecord) -> Result<()> {
        let id = vol.id.as_str();
        match sysfs::mkdir_at(self.volumes.as_fd(), id, 0o777) {
            Ok(()) => {}
            Err(e) if e.errno == Errno::EXIST => {}
            Err(e) => return Err(sys(format!("creating volume {id} in pool {:?}", self.name))(e)),
        }
        let dir = sysfs::open_dir_beneath(self.volumes.as_fd(), Path::new(id)).map_err(sys(
            format!("opening volume {id} (it must be a directory, not a link)"),
        ))?;
        if self.quota == QuotaSupport::Enforced {
            let project = vol.project_id();
            self.kernel
                .set_project_id(dir.as_fd(), project)
                .map_err(sys(format!("setting project {project} on volume {id}")))?;
            self.kernel
                .set_project_limit(self.volumes.as_fd(), project, vol.capacity)
                .map_err(sys(format!("limiting project {project} of volume {id}")))?;
        }
        sysfs::sync_dir(self.volumes.as_fd())
            .map_err(sys(format!("syncing pool {:?}", self.name)))?;
        Ok(())
    }

    /// Where quotas are enforced, makes sure a volume carries its project id and limit: a
    /// volume created while the pool was advisory has neither. Returns whether it had to set
    /// them (files written before keep project 0 and are not charged; the caller says so).
    pub fn ensure_quota(&self, vol: &VolumeRecord) -> Result<bool> {
        if self.quota != QuotaSupport::Enforced {
            return Ok(false);
        }
        let id = vol.id.as_str();
        let dir = self.open_volume(&vol.id)?;
        let project = vol.project_id();
        let current = self
            .kernel
            .project_id(dir.as_fd())
            .map_err(sys(format!("reading the project of volume {id}")))?;
        if current == project {
            return Ok(false);
        }
        self.kernel
            .set_project_id(dir.as_fd(), project)
            .map_err(sys(format!("setting project {project} on volume {id}")))?;
        self.kernel
            .set_project_limit(self.volumes.as_fd(), project, vol.capacity)
            .map_err(sys(format!("limiting project {project} of volume {id}")))?;
        Ok(true)
    }

    /// Removes the volume's tree fd-relative, never following a link nor entering another
    /// mount, then lifts its quota. Absent is not an error.
    pub fn delete(&self, vol: &VolumeRecord) -> Result<()> {
        let id = vol.id.as_str();
        // The kernel is the truth for mounts: a bind mount of this volume (or of a path in
        // it) anywhere on the node means a consumer still uses it, whatever the store says.
        match sysfs::entry_info(self.volumes.as_fd(), id) {
            Ok(info) => {
                let mounts = stowage_sys::mountinfo::mounts_of(info.id.dev, id)
                    .map_err(|e| Error::internal("reading the mount table", e))?;
                if !mounts.is_empty() {
                    let at: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is still mounted at {}; it was left in place",
                        at.join(", ")
                    )));
                }
            }
            Err(e) if e.errno == Errno::NOENT => {}
            Err(e) => return Err(Error::internal(format!("statx of volume {id}"), e)),
        }
        sysfs::remove_tree_at(self.volumes.as_fd(), id).map_err(|e| {
            if e.errno == Errno::BUSY {
                Error::FailedPrecondition(format!(
                    "volume {id} contains a mount point ({e}); it was left in place"
                ))
            } else {
                Error::internal(format!("removing volume {id}"), e)
            }
        })?;
        if self.quota == QuotaSupport::Enforced {
            let project = vol.project_id();
            self.kernel
                .set_project_limit(self.volumes.as_fd(), project, 0)
                .map_err(sys(format!("lifting quota of project {project}")))?;
        }
        sysfs::sync_dir(self.volumes.as_fd())
            .map_err(sys(format!("syncing pool {:?}", self.name)))?;
        Ok(())
    }

    /// Names in the pool's volume directory (for finding directories no record names).
    pub fn entry_names(&self) -> Result<Vec<String>> {
        sysfs::entry_names(self.volumes.as_fd())
            .map_err(sys(format!("listing pool {:?}", self.name)))
    }

    /// Opens the volume's root directory (no link followed).
    pub fn open_volume(&self, id: &VolumeId) -> Result<OwnedFd> {
        sysfs::open_dir_beneath(self.volumes.as_fd(), Path::new(id.as_str())).map_err(|e| {
            if e.errno == Errno::NOENT {
                Error::NotFound(format!(
                    "the directory of volume {id} is missing from pool {:?}",
                    self.name
                ))
            } else {
                Error::internal(format!("opening volume {id}"), e)
            }
        })
    }

    /// The condition of a volume: abnormal when its directory is gone or is not a directory.
    pub fn condition(&self, vol: &VolumeRecord) -> Condition {
        let enforcement = match &self.quota {
            QuotaSupport::Enforced => "capacity enforced by project quota".to_owned(),
            QuotaSupport::Unavailable(_) => format!(
                "capacity is advisory: project quotas are unavailable on pool {:?} (the driver's start-up log says why)",
                self.name
            ),
        };
        match sysfs::entry_info(self.volumes.as_fd(), vol.id.as_str()) {
            Ok(info) if info.is_dir => Condition {
                abnormal: false,
                message: enforcement,
            },
            Ok(_) => Condition {
                abnormal: true,
                message: "the volume's backing path is not a directory (a symlink or file took its place)".to_owned(),
            },
            Err(e) if e.errno == Errno::NOENT => Condition {
                abnormal: true,
                message: format!(
                    "the volume's backing directory is missing from pool {:?}",
                    self.name
                ),
            },
            Err(e) => Condition {
                abnormal: true,
                message: format!("the volume's backing directory cannot be checked: {e}"),
            },
        }
    }

    /// Usage of a volume as its enforcement sees it: the quota's counters where quotas are
    /// enforced, otherwise a walk of its tree (no links followed, no mounts crossed) against
    /// its recorded size.
    pub fn usage(&self, vol: &VolumeRecord, dir: &OwnedFd) -> Result<VolumeUsage> {
        let space = sysfs::fs_space(dir.as_fd()).map_err(sys("statvfs of volume"))?;
        let (bytes_used, inodes_used, inodes_limit) = match self.quota {
            QuotaSupport::Enforced => {
                let q = self
                    .kernel
                    .project_usage(self.volumes.as_fd(), vol.project_id())
                    .map_err(sys(format!("quota usage of volume {}", vol.id)))?;
                (q.bytes_used, q.inodes_used, q.inodes_limit)
            }
            QuotaSupport::Unavailable(_) => {
                let t = sysfs::tree_usage(dir.as_fd())
                    .map_err(sys(format!("measuring volume {}", vol.id)))?;
                (t.bytes, t.inodes, 0)
            }
        };
        let bytes_total = vol.capacity;
        // The volume can never hold more than its filesystem has free.
        let bytes_available = bytes_total
            .saturating_sub(bytes_used)
            .min(space.bytes_available);
        let (inodes_total, inodes_available) = if inodes_limit > 0 {
            (inodes_limit, inodes_limit.saturating_sub(inodes_used))
        } else {
            (inodes_used + space.inodes_free, space.inodes_free)
        };
        Ok(VolumeUsage {
            bytes_total,
            bytes_used,
            bytes_available,
            inodes_total,
            inodes_used,
            inodes_available,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::VolumeState;
    use stowage_sys::{FakeKernel, KernelCall, QuotaUsage};

    fn pool_with(kernel: Arc<FakeKernel>, dir: &Path) -> Pool {
        let cfg = PoolConfig {
            name: "fast".into(),
            kind: PoolKind::Dir,
            path: dir.join("pool"),
            default_size: None,
        };
        Pool::open(&cfg, kernel).unwrap()
    }

    fn record(seq: i64, capacity: u64) -> VolumeRecord {
        VolumeRecord {
            seq,
            id: VolumeId::generate(),
            name: format!("v{seq}"),
            pool: "fast".into(),
            capacity,
            state: VolumeState::Creating,
            block: false,
            pvc_name: None,
            pvc_namespace: None,
            pv_name: None,
            created_at: 0,
        }
    }

    fn inode(pool: &Pool, id: &VolumeId) -> sysfs::InodeId {
        sysfs::file_info(pool.open_volume(id).unwrap().as_fd())
            .unwrap()
            .id
    }

    #[test]
    fn enforced_pool_sets_project_then_limit_and_lifts_it_on_delete() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_quota_support(QuotaSupport::Enforced);
        let pool = pool_with(Arc::clone(&kernel), dir.path());
        assert_eq!(pool.volume_context()["capacityEnforcement"], "quota");
        kernel.clear();

        let vol = record(7, 5 << 20);
        let project = vol.project_id();
        assert_eq!(project as u64, crate::store::PROJECT_ID_BASE + 7);
        pool.create(&vol).unwrap();
        let dir_id = inode(&pool, &vol.id);
        assert_eq!(
            kernel.calls(),
            vec![
                KernelCall::SetProjectId {
                    dir: dir_id,
                    project
                },
                KernelCall::SetProjectLimit {
                    project,
                    bytes: 5 << 20
                },
            ]
        );
        assert_eq!(kernel.limit(project), Some(5 << 20));

        // Usage comes from the quota, not from a walk.
        let usage = QuotaUsage {
            bytes_used: 3 << 20,
            bytes_limit: 5 << 20,
            inodes_used: 9,
            inodes_limit: 0,
        };
        kernel.set_usage(project, usage);
        let fd = pool.open_volume(&vol.id).unwrap();
        let u = pool.usage(&vol, &fd).unwrap();
        assert_eq!(
            (u.bytes_total, u.bytes_used, u.inodes_used),
            (5 << 20, 3 << 20, 9)
        );
        assert!(u.bytes_available <= 2 << 20);

        kernel.clear();
        pool.delete(&vol).unwrap();
        assert_eq!(
            kernel.calls(),
            vec![KernelCall::SetProjectLimit { project, bytes: 0 }]
        );
        assert!(matches!(pool.open_volume(&vol.id), Err(Error::NotFound(_))));
    }

    #[test]
    fn a_failed_quota_step_is_reported_and_a_retry_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_quota_support(QuotaSupport::Enforced);
        let pool = pool_with(Arc::clone(&kernel), dir.path());
        let vol = record(1, 1 << 20);

        kernel.fail_next("set_project_limit", Errno::IO, 1);
        let err = pool.create(&vol).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(err.to_string().contains("limiting project"), "{err}");
        // The retry reuses the directory and completes both steps.
        kernel.clear();
        pool.create(&vol).unwrap();
        let project = vol.project_id();
        assert_eq!(kernel.calls().len(), 2);
        assert_eq!(kernel.limit(project), Some(1 << 20));

        kernel.fail_next("set_project_id", Errno::NOSPC, 1);
        let other = record(2, 1 << 20);
        assert_eq!(
            pool.create(&other).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        kernel.fail_next("set_project_limit", Errno::DQUOT, 1);
        assert_eq!(
            pool.delete(&vol).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[test]
    fn advisory_pool_makes_no_quota_calls_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_quota_support(QuotaSupport::Unavailable("no CONFIG_QFMT_V2".into()));
        let pool = pool_with(Arc::clone(&kernel), dir.path());
        kernel.clear();
        let vol = record(3, 1 << 20);
        pool.create(&vol).unwrap();
        pool.create(&vol).unwrap();
        assert!(kernel.calls().is_empty(), "{:?}", kernel.calls());
        let ctx = pool.volume_context();
        assert_eq!(ctx["capacityEnforcement"], "advisory");
        assert!(ctx["capacityNote"].contains("not enforced"));
        let cond = pool.condition(&vol);
        assert!(
            !cond.abnormal && cond.message.contains("advisory"),
            "{cond:?}"
        );
        // Usage walks the tree.
        let fd = pool.open_volume(&vol.id).unwrap();
        std::fs::write(
            dir.path()
                .join("pool/volumes")
                .join(vol.id.as_str())
                .join("f"),
            vec![1u8; 64 << 10],
        )
        .unwrap();
        let u = pool.usage(&vol, &fd).unwrap();
        assert!(u.bytes_used >= 64 << 10 && u.inodes_used >= 2, "{u:?}");
        pool.delete(&vol).unwrap();
        pool.delete(&vol).unwrap();
    }
}
