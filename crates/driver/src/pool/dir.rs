//! The `dir` kind: a directory per volume under `<path>/volumes/`, with a project quota
//! where the pool's filesystem enforces one (advisory sizes otherwise). Staging binds the
//! volume directory; there are no block volumes.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use stowage_core::config::PoolConfig;
use stowage_core::{Error, Result, VolumeId};
use stowage_sys::fs as sysfs;
use stowage_sys::{Errno, Kernel, QuotaSupport};

use super::{
    sys_error as sys, Condition, Mark, PoolBackend, PoolCapacity, StageRequest, VolumeStats,
    VolumeUsage,
};
use crate::durable::GroupSync;
use crate::store::VolumeRecord;

mod snapshots;
pub mod usage;

use usage::{Freshness, Measured, UsageCache};

/// The backend of a `dir` pool.
#[derive(Debug)]
pub struct DirBackend {
    /// The pool's name, for messages.
    name: String,
    /// `<path>/volumes`, the only directory volume ids are resolved in.
    volumes: OwnedFd,
    /// `<path>/snapshots`, where snapshots are kept as copies of volume trees, out of every
    /// consumer's reach (only volume directories are ever bound).
    snapshots: OwnedFd,
    fs_type: String,
    quota: QuotaSupport,
    kernel: Arc<dyn Kernel>,
    /// The condition message of a healthy volume, built once: ListVolumes asks for
    /// thousands.
    healthy: String,
    /// Group commit of `volumes`: concurrent creates and deletes share one directory fsync.
    synced: GroupSync,
    /// Usage figures of advisory volumes (a walk each), for NodeGetVolumeStats.
    usage: UsageCache,
}

impl DirBackend {
    /// Opens (creating if needed) the pool's volume directory and detects whether its
    /// filesystem enforces project quotas.
    pub fn open(cfg: &PoolConfig, kernel: Arc<dyn Kernel>) -> Result<Self> {
        let stats = cfg.stats.clone().unwrap_or_default();
        let usage = UsageCache::new(
            stats.min_age()?,
            stats.walk_budget()?,
            usage::DEFAULT_CAPACITY,
        );
        let (volumes, fs_type) = super::open_pool_dir(cfg, "volumes")?;
        let (snapshots, _) = super::open_pool_dir(cfg, "snapshots")?;
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
        let healthy = match &quota {
            QuotaSupport::Enforced => "capacity enforced by project quota".to_owned(),
            QuotaSupport::Unavailable(_) => format!(
                "capacity is advisory: project quotas are unavailable on pool {:?} (the driver's start-up log says why)",
                cfg.name
            ),
        };
        Ok(DirBackend {
            name: cfg.name.clone(),
            volumes,
            snapshots,
            fs_type,
            quota,
            kernel,
            healthy,
            synced: GroupSync::default(),
            usage,
        })
    }

    /// Makes the entries added or removed in the volume directory so far durable: one fsync
    /// for every caller that changed it while the previous fsync ran.
    fn sync_volumes(&self) -> Result<()> {
        let ticket = self.synced.note_write();
        self.synced.wait(ticket, || {
            sysfs::sync_dir(self.volumes.as_fd())
                .map_err(sys(format!("syncing pool {:?}", self.name)))
        })
    }

    /// The usage cache of the pool's advisory volumes (its counters, for tests and
    /// benchmarks).
    pub fn usage_cache(&self) -> &UsageCache {
        &self.usage
    }

    /// The figures of a volume from its bytes and inodes used.
    fn figures(
        &self,
        vol: &VolumeRecord,
        dir: BorrowedFd<'_>,
        bytes_used: u64,
        inodes_used: u64,
        inodes_limit: u64,
    ) -> Result<VolumeUsage> {
        let space = sysfs::fs_space(dir).map_err(sys("statvfs of volume"))?;
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

    /// Usage from the project quota's counters.
    fn quota_usage(&self, vol: &VolumeRecord, dir: BorrowedFd<'_>) -> Result<VolumeUsage> {
        let q = self
            .kernel
            .project_usage(self.volumes.as_fd(), vol.project_id())
            .map_err(sys(format!("quota usage of volume {}", vol.id)))?;
        self.figures(vol, dir, q.bytes_used, q.inodes_used, q.inodes_limit)
    }

    /// Whether volumes of this pool are hard-limited.
    pub fn quota(&self) -> &QuotaSupport {
        &self.quota
    }

    /// Opens the volume's root directory (no link followed); NOT_FOUND when it is missing.
    pub fn open_volume(&self, id: &VolumeId) -> Result<OwnedFd> {
        super::open_volume_dir(self.volumes.as_fd(), &self.name, id)
    }

    /// Sets the volume directory's project (with inheritance) and the project's limit.
    fn put_under_quota(&self, dir: BorrowedFd<'_>, vol: &VolumeRecord) -> Result<()> {
        let (id, project) = (vol.id.as_str(), vol.project_id());
        self.kernel
            .set_project_id(dir, project)
            .map_err(sys(format!("setting project {project} on volume {id}")))?;
        self.set_limit(vol, vol.capacity)
    }

    fn set_limit(&self, vol: &VolumeRecord, bytes: u64) -> Result<()> {
        let project = vol.project_id();
        self.kernel
            .set_project_limit(self.volumes.as_fd(), project, bytes)
            .map_err(sys(format!(
                "limiting project {project} of volume {}",
                vol.id
            )))
    }
}

impl PoolBackend for DirBackend {
    /// Raw block volumes need a block device; a directory pool has none.
    fn supports_block(&self) -> bool {
        false
    }

    /// A directory volume has the pool's filesystem: an empty fs_type or that one.
    fn supports_fs_type(&self, fs_type: &str) -> bool {
        fs_type.is_empty() || fs_type == self.fs_type
    }

    fn default_fs_type(&self) -> &str {
        &self.fs_type
    }

    fn context(&self) -> HashMap<String, String> {
        let mut ctx = HashMap::new();
        match &self.quota {
            QuotaSupport::Enforced => {
                ctx.insert("capacityEnforcement".to_owned(), "hard".to_owned());
            }
            QuotaSupport::Unavailable(_) => {
                ctx.insert("capacityEnforcement".to_owned(), "advisory".to_owned());
                // The full reason is in the start-up log; a context value is limited to 128 bytes.
                ctx.insert(
                    "capacityNote".to_owned(),
                    "sizes are not enforced: project quotas are unavailable on this pool"
                        .to_owned(),
                );
            }
        }
        ctx
    }

    fn enforces_capacity(&self) -> bool {
        self.quota == QuotaSupport::Enforced
    }

    /// The pool's filesystem as statvfs sees it: volumes share it, so each may use it all.
    fn capacity(&self) -> Result<PoolCapacity> {
        let space = sysfs::fs_space(self.volumes.as_fd())
            .map_err(sys(format!("pool {:?}: statvfs", self.name)))?;
        Ok(PoolCapacity {
            total: space.bytes_total,
            available: space.bytes_available,
        })
    }

    /// Creates the volume's directory and its quota. An existing directory is reused.
    fn create(&self, vol: &VolumeRecord) -> Result<()> {
        let id = vol.id.as_str();
        match sysfs::mkdir_at(self.volumes.as_fd(), id, 0o777) {
            Ok(()) => {}
            Err(e) if e.errno == Errno::EXIST => {}
            Err(e) => return Err(sys(format!("creating volume {id} in pool {:?}", self.name))(e)),
        }
        crate::phases::mark("mkdir");
        let dir = sysfs::open_dir_beneath(self.volumes.as_fd(), Path::new(id)).map_err(sys(
            format!("opening volume {id} (it must be a directory, not a link)"),
        ))?;
        if self.quota == QuotaSupport::Enforced {
            self.put_under_quota(dir.as_fd(), vol)?;
        }
        crate::phases::mark("open+quota");
        self.sync_volumes()?;
        crate::phases::mark("dir-fsync");
        Ok(())
    }

    /// Removes the volume's tree fd-relative, never following a link nor entering another
    /// mount, then lifts its quota.
    fn delete(&self, vol: &VolumeRecord) -> Result<()> {
        let id = vol.id.as_str();
        // The kernel is the truth for mounts: a bind mount of this volume (or of a path in
        // it) anywhere on the node means a consumer still uses it, whatever the store says.
        match sysfs::entry_info(self.volumes.as_fd(), id) {
            Ok(info) => super::refuse_if_mounted(Some(info.id.dev), &vol.id)?,
            Err(e) if e.errno == Errno::NOENT => {}
            Err(e) => return Err(Error::internal(format!("statx of volume {id}"), e)),
        }
        crate::phases::mark("mount-check");
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
        self.usage.forget(&vol.id);
        crate::phases::mark("rmtree+quota");
        self.sync_volumes()?;
        crate::phases::mark("dir-fsync");
        Ok(())
    }

    /// Raises the project limit where quotas are enforced; an advisory size needs no step.
    /// A bind mount shows the new limit at once, so no node step is ever needed.
    fn expand(&self, vol: &VolumeRecord, capacity: u64) -> Result<bool> {
        let _present = self.open_volume(&vol.id)?;
        match &self.quota {
            // Setting the limit again is idempotent: a retry after a crash between the
            // recorded capacity and this call (the record then equals `capacity`) converges.
            QuotaSupport::Enforced if capacity >= vol.capacity => self.set_limit(vol, capacity)?,
            QuotaSupport::Enforced => {}
            QuotaSupport::Unavailable(_) => tracing::info!(
                volume = %vol.id, capacity,
                "dir volume expanded; its size is advisory (no project quotas on this pool)"
            ),
        }
        Ok(false)
    }

    /// Where quotas are enforced, makes sure the volume carries its project id and limit: a
    /// volume created while the pool was advisory has neither (files written before keep
    /// project 0 and are not charged).
    fn ensure_limit(&self, vol: &VolumeRecord) -> Result<bool> {
        if self.quota != QuotaSupport::Enforced {
            return Ok(false);
        }
        let dir = self.open_volume(&vol.id)?;
        let project = vol.project_id();
        let current = self
            .kernel
            .project_id(dir.as_fd())
            .map_err(sys(format!("reading the project of volume {}", vol.id)))?;
        if current == project {
            return Ok(false);
        }
        self.put_under_quota(dir.as_fd(), vol)?;
        Ok(true)
    }

    /// Names in the pool's volume directory.
    fn entry_names(&self) -> Result<Vec<String>> {
        sysfs::entry_names(self.volumes.as_fd())
            .map_err(sys(format!("listing pool {:?}", self.name)))
    }

    /// Abnormal when the volume's directory is gone or is not a directory.
    fn condition(&self, vol: &VolumeRecord) -> Condition {
        match sysfs::entry_info(self.volumes.as_fd(), vol.id.as_str()) {
            Ok(info) if info.is_dir => Condition {
                abnormal: false,
                message: self.healthy.clone(),
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

    /// The volume directory's own inode: staging binds it as it is.
    fn mark(&self, vol: &VolumeRecord) -> Result<Mark> {
        let dir = self.open_volume(&vol.id)?;
        super::directory_mark(dir.as_fd(), &vol.id)
    }

    /// Binds the volume directory (opened from the pool's fd) onto the staging directory.
    fn stage(
        &self,
        vol: &VolumeRecord,
        target: BorrowedFd<'_>,
        how: &StageRequest<'_>,
    ) -> Result<()> {
        let dir = self.open_volume(&vol.id)?;
        super::bind_directory(&*self.kernel, dir.as_fd(), target, how, &vol.id)
    }

    /// The quota's counters where quotas are enforced, otherwise a whole walk of the volume's
    /// directory (no links followed, no mounts crossed) against its recorded size, measured
    /// now. Measured from the pool's own fd of the directory, not through `mounted`.
    /// NodeGetVolumeStats asks [`PoolBackend::stats`], which bounds the walk.
    fn usage(&self, vol: &VolumeRecord, _mounted: BorrowedFd<'_>) -> Result<VolumeUsage> {
        let dir = self.open_volume(&vol.id)?;
        match self.quota {
            QuotaSupport::Enforced => self.quota_usage(vol, dir.as_fd()),
            QuotaSupport::Unavailable(_) => {
                let t = sysfs::tree_usage(dir.as_fd())
                    .map_err(sys(format!("measuring volume {}", vol.id)))?;
                self.figures(vol, dir.as_fd(), t.bytes, t.inodes, 0)
            }
        }
    }

    /// Where quotas are enforced, their counters (cheap, always current). Otherwise the
    /// volume's walk through the pool's usage cache: a figure younger than the pool's
    /// `min_age` as it is, else at most `walk_budget` of walking; a walk that needs more
    /// continues at the next call, which answers the last complete figure meanwhile, with
    /// its age in the note (the volume itself is not abnormal for that).
    fn stats(&self, vol: &VolumeRecord, _mounted: BorrowedFd<'_>) -> Result<VolumeStats> {
        let dir = self.open_volume(&vol.id)?;
        if self.quota == QuotaSupport::Enforced {
            return Ok(VolumeStats {
                usage: Some(self.quota_usage(vol, dir.as_fd())?),
                note: None,
            });
        }
        let measured = self
            .usage
            .measure(&vol.id, |walk, deadline| {
                walk.run(dir.as_fd(), Some(deadline))
            })
            .map_err(sys(format!("measuring volume {}", vol.id)))?;
        let note = self.note(vol, &measured);
        let usage = match measured.figure {
            Some(f) => Some(self.figures(vol, dir.as_fd(), f.usage.bytes, f.usage.inodes, 0)?),
            None => None,
        };
        Ok(VolumeStats {
            usage,
            note: Some(note),
        })
    }
}

impl DirBackend {
    /// What the condition says of a walked figure: its age and, when it is stale, why.
    fn note(&self, vol: &VolumeRecord, m: &Measured) -> String {
        let secs = |d: std::time::Duration| format!("{:.1} s", d.as_secs_f64());
        let budget = secs(self.usage.budget());
        let age = m.age(std::time::Instant::now()).unwrap_or_default();
        match (m.freshness, m.figure) {
            (Freshness::Walked, Some(f)) => {
                if f.slices > 1 {
                    tracing::info!(
                        volume = %vol.id, inodes = f.usage.inodes, calls = f.slices,
                        walking_s = f.walking.as_secs_f64(), took_s = f.took.as_secs_f64(),
                        "usage walk finished over several calls"
                    );
                }
                format!(
                    "usage walked just now ({} inodes, {} of walking over {} call(s))",
                    f.usage.inodes,
                    secs(f.walking),
                    f.slices
                )
            }
            (Freshness::Cached, Some(_)) => format!(
                "usage as of {} ago (reused for {})",
                secs(age),
                secs(self.usage.min_age())
            ),
            (Freshness::Stale { entries }, Some(_)) => {
                tracing::debug!(volume = %vol.id, entries, age_s = age.as_secs_f64(), "usage walk stopped at its budget");
                format!(
                    "usage as of {} ago, stale: the walk refreshing it stopped at its {budget} budget after {entries} entries and continues at the next call",
                    secs(age)
                )
            }
            (_, None) => format!(
                "usage not known yet: the first walk of the volume stopped at its {budget} budget after {} entries and continues at the next call",
                match m.freshness {
                    Freshness::Stale { entries } => entries,
                    _ => 0,
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use crate::store::VolumeState;
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use stowage_core::config::PoolKind;
    use stowage_core::request::Access;
    use stowage_core::VolumeId;
    use stowage_sys::{FakeKernel, KernelCall, MountAttrs, QuotaUsage};

    fn config(dir: &Path) -> PoolConfig {
        PoolConfig {
            name: "fast".into(),
            kind: PoolKind::Dir,
            path: dir.join("pool"),
            default_size: None,
            overcommit_ratio: None,
            quotas: None,
            overcommit: None,
            stats: None,
        }
    }

    fn pool_with(kernel: Arc<FakeKernel>, dir: &Path) -> DirBackend {
        DirBackend::open(&config(dir), kernel).unwrap()
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
            fs_type: None,
            block_size: None,
            full_allocation: false,
            source: None,
        }
    }

    fn inode(pool: &DirBackend, id: &VolumeId) -> sysfs::InodeId {
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
        assert_eq!(pool.context()["capacityEnforcement"], "hard");
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
        let u = pool.usage(&vol, fd.as_fd()).unwrap();
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
        let ctx = pool.context();
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
        let u = pool.usage(&vol, fd.as_fd()).unwrap();
        assert!(u.bytes_used >= 64 << 10 && u.inodes_used >= 2, "{u:?}");
        pool.delete(&vol).unwrap();
        pool.delete(&vol).unwrap();
    }

    fn advisory(dir: &Path, min_age: Duration, budget: Duration) -> DirBackend {
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_quota_support(QuotaSupport::Unavailable("no CONFIG_QFMT_V2".into()));
        let mut pool = pool_with(kernel, dir);
        pool.usage = UsageCache::new(min_age, budget, 16);
        pool
    }

    fn walks(pool: &DirBackend) -> (u64, u64) {
        let c = &pool.usage_cache().counters;
        (
            c.walks_started.load(Ordering::Relaxed),
            c.hits.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn advisory_stats_reuse_a_young_figure_and_walk_again_after_the_min_age() {
        let dir = tempfile::tempdir().unwrap();
        let pool = advisory(
            dir.path(),
            Duration::from_millis(400),
            Duration::from_secs(5),
        );
        let vol = record(9, 1 << 30);
        pool.create(&vol).unwrap();
        let root = dir.path().join("pool/volumes").join(vol.id.as_str());
        std::fs::write(root.join("a"), vec![1u8; 64 << 10]).unwrap();
        let fd = pool.open_volume(&vol.id).unwrap();

        let first = pool.stats(&vol, fd.as_fd()).unwrap();
        let used = first.usage.unwrap().bytes_used;
        assert!(used >= 64 << 10, "{first:?}");
        assert!(first.note.unwrap().contains("walked just now"));
        assert_eq!(walks(&pool), (1, 0));

        // Within the minimum age: the same figure, no walk, its age said.
        std::fs::write(root.join("b"), vec![1u8; 1 << 20]).unwrap();
        let cached = pool.stats(&vol, fd.as_fd()).unwrap();
        // The walked figures are the cached ones; what statvfs says (free space and inodes of
        // the pool's filesystem) is read at every call.
        let (c, f) = (cached.usage.unwrap(), first.usage.unwrap());
        assert_eq!((c.bytes_used, c.inodes_used), (f.bytes_used, f.inodes_used));
        assert!(cached.note.unwrap().contains("usage as of"));
        assert_eq!(walks(&pool), (1, 1));

        // After it: walked again, the new file counted.
        std::thread::sleep(Duration::from_millis(450));
        let later = pool.stats(&vol, fd.as_fd()).unwrap();
        assert!(
            later.usage.unwrap().bytes_used >= used + (1 << 20),
            "{later:?}"
        );
        assert_eq!(walks(&pool), (2, 1));

        // Deleting the volume drops its entry.
        assert_eq!(pool.usage_cache().len(), 1);
        pool.delete(&vol).unwrap();
        assert_eq!(pool.usage_cache().len(), 0);
    }

    #[test]
    fn advisory_stats_never_answer_a_walk_cut_by_its_budget() {
        let dir = tempfile::tempdir().unwrap();
        // No budget at all: every walk stops at once, nothing of it is ever answered.
        let pool = advisory(dir.path(), Duration::ZERO, Duration::ZERO);
        let vol = record(10, 1 << 30);
        pool.create(&vol).unwrap();
        let root = dir.path().join("pool/volumes").join(vol.id.as_str());
        for i in 0..50 {
            std::fs::write(root.join(format!("f{i}")), b"x").unwrap();
        }
        let fd = pool.open_volume(&vol.id).unwrap();
        for _ in 0..3 {
            let s = pool.stats(&vol, fd.as_fd()).unwrap();
            assert_eq!(s.usage, None, "{s:?}");
            assert!(s.note.unwrap().contains("not known yet"));
        }
        let c = &pool.usage_cache().counters;
        // One walk, continued by each call, never finished.
        assert_eq!(c.walks_started.load(Ordering::Relaxed), 1);
        assert_eq!(c.slices.load(Ordering::Relaxed), 3);
        assert_eq!(c.walks_done.load(Ordering::Relaxed), 0);
        // The whole measurement (usage) still walks it all.
        assert!(pool.usage(&vol, fd.as_fd()).unwrap().inodes_used >= 51);
        pool.delete(&vol).unwrap();
    }

    #[test]
    fn enforced_stats_read_the_quota_and_never_walk() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_quota_support(QuotaSupport::Enforced);
        let pool = pool_with(Arc::clone(&kernel), dir.path());
        let vol = record(11, 5 << 20);
        pool.create(&vol).unwrap();
        kernel.set_usage(
            vol.project_id(),
            QuotaUsage {
                bytes_used: 1 << 20,
                bytes_limit: 5 << 20,
                inodes_used: 3,
                inodes_limit: 0,
            },
        );
        let fd = pool.open_volume(&vol.id).unwrap();
        let s = pool.stats(&vol, fd.as_fd()).unwrap();
        assert_eq!(s.usage.unwrap().bytes_used, 1 << 20);
        assert_eq!(s.note, None);
        assert_eq!(
            pool.usage_cache().counters.slices.load(Ordering::Relaxed),
            0
        );
        pool.delete(&vol).unwrap();
    }

    #[test]
    fn the_pool_context_names_the_pool_and_how_capacity_is_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_quota_support(QuotaSupport::Enforced);
        let pool = Pool::open(&config(dir.path()), kernel).unwrap();
        assert_eq!(pool.kind(), PoolKind::Dir);
        let ctx = pool.volume_context();
        assert_eq!(ctx.len(), 2, "{ctx:?}");
        assert_eq!(ctx["pool"], "fast");
        assert_eq!(ctx["capacityEnforcement"], "hard");
        let b = pool.backend();
        assert!(b.enforces_capacity() && !b.supports_block());
        assert!(b.supports_fs_type("") && b.supports_fs_type(b.default_fs_type()));
        assert!(!b.supports_fs_type("no-such-fs"));
    }

    #[test]
    fn expand_raises_an_enforced_limit_and_never_needs_a_node_step() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_quota_support(QuotaSupport::Enforced);
        let pool = pool_with(Arc::clone(&kernel), dir.path());
        let vol = record(4, 1 << 20);
        let project = vol.project_id();
        pool.create(&vol).unwrap();
        kernel.clear();

        assert!(!pool.expand(&vol, 3 << 20).unwrap());
        assert_eq!(
            kernel.calls(),
            vec![KernelCall::SetProjectLimit {
                project,
                bytes: 3 << 20
            }]
        );
        assert_eq!(kernel.limit(project), Some(3 << 20));
        // Smaller than the recorded capacity: never shrinks, nothing to do.
        kernel.clear();
        assert!(!pool.expand(&vol, 1 << 19).unwrap());
        assert!(kernel.calls().is_empty(), "{:?}", kernel.calls());
        // A failing limit is reported with what it tried.
        kernel.fail_next("set_project_limit", Errno::DQUOT, 1);
        let err = pool.expand(&vol, 4 << 20).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.to_string().contains("limiting project"), "{err}");

        pool.delete(&vol).unwrap();
        assert!(matches!(
            pool.expand(&vol, 8 << 20),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn expand_of_an_advisory_volume_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(Arc::clone(&kernel), dir.path());
        let vol = record(5, 1 << 20);
        pool.create(&vol).unwrap();
        kernel.clear();
        assert!(!pool.expand(&vol, 2 << 20).unwrap());
        assert!(kernel.calls().is_empty(), "{:?}", kernel.calls());
    }

    #[test]
    fn ensure_limit_sets_a_missing_project_once() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let advisory = pool_with(Arc::clone(&kernel), dir.path());
        let vol = record(6, 2 << 20);
        advisory.create(&vol).unwrap();
        assert!(!advisory.ensure_limit(&vol).unwrap());
        drop(advisory);

        kernel.set_quota_support(QuotaSupport::Enforced);
        let pool = pool_with(Arc::clone(&kernel), dir.path());
        kernel.clear();
        assert!(pool.ensure_limit(&vol).unwrap());
        let project = vol.project_id();
        let dir_id = inode(&pool, &vol.id);
        assert_eq!(
            kernel.calls(),
            vec![
                KernelCall::ProjectId { dir: dir_id },
                KernelCall::SetProjectId {
                    dir: dir_id,
                    project
                },
                KernelCall::SetProjectLimit {
                    project,
                    bytes: 2 << 20
                },
            ]
        );
        assert!(!pool.ensure_limit(&vol).unwrap());
        let gone = record(7, 1 << 20);
        assert!(matches!(pool.ensure_limit(&gone), Err(Error::NotFound(_))));
    }

    #[test]
    fn stage_binds_the_volume_directory_that_the_mark_names() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(Arc::clone(&kernel), dir.path());
        let vol = record(8, 1 << 20);
        pool.create(&vol).unwrap();
        let source = inode(&pool, &vol.id);
        assert_eq!(pool.mark(&vol).unwrap(), Mark::Inode(source));

        let staging = dir.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let target = sysfs::open_trusted_dir(&staging).unwrap();
        let attrs = MountAttrs {
            nosuid: true,
            nodev: true,
            ..Default::default()
        };
        let how = StageRequest {
            access: &Access::Mount(Default::default()),
            attrs,
            mount_point: &staging,
        };
        kernel.clear();
        pool.stage(&vol, target.as_fd(), &how).unwrap();
        let target_id = sysfs::file_info(target.as_fd()).unwrap().id;
        assert_eq!(
            kernel.calls(),
            vec![KernelCall::BindMount {
                source,
                target: target_id,
                attrs
            }]
        );
        pool.unstage(&vol).unwrap();
        // What publish binds from is the staging mount itself.
        let staged = sysfs::open_trusted_dir(&staging).unwrap();
        let from = pool.publish_source(&vol, staged).unwrap();
        assert_eq!(sysfs::file_info(from.as_fd()).unwrap().id, target_id);

        kernel.fail_next("bind_mount", Errno::PERM, 1);
        assert_eq!(
            pool.stage(&vol, target.as_fd(), &how).unwrap_err().code(),
            tonic::Code::Internal
        );
        pool.delete(&vol).unwrap();
        assert!(matches!(pool.mark(&vol), Err(Error::NotFound(_))));
        assert!(matches!(
            pool.stage(&vol, target.as_fd(), &how),
            Err(Error::NotFound(_))
        ));
    }
}
