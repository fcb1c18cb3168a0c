//! The `btrfs` kind: a subvolume per volume at `<path>/volumes/<id>`, its size a limit on
//! the subvolume's level-0 qgroup (max referenced bytes), so a write past it fails with
//! EDQUOT. Staging binds the subvolume's root directory, as for `dir`; no block volumes.
//!
//! Everything goes through btrfs ioctls on directory fds (the `Kernel` trait); the `btrfs`
//! program is never run. Quotas must be on for the filesystem: the pool enables them at open
//! (simple quotas where the kernel has them) unless its configuration says `quotas =
//! "require"`, in which case it refuses to open while they are off.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use stowage_core::config::{PoolConfig, QuotaPolicy};
use stowage_core::{Error, Result, VolumeId};
use stowage_sys::fs as sysfs;
use stowage_sys::{BtrfsQuotaMode, Errno, Kernel, Qgroup};

use super::{
    sys_error as sys, Condition, Mark, PoolBackend, PoolCapacity, Source, StageRequest, VolumeUsage,
};
use crate::store::{SnapshotRecord, VolumeRecord};

mod snapshots;

/// How often a deletion enumerates nested subvolumes again when new ones appeared meanwhile.
const DELETE_ROUNDS: usize = 3;

/// The backend of a `btrfs` pool.
#[derive(Debug)]
pub struct BtrfsBackend {
    /// The pool's name, for messages.
    name: String,
    /// `<path>/volumes`, the only directory volume ids are resolved in.
    volumes: OwnedFd,
    /// `<path>/snapshots`, where snapshots are kept as read-only subvolumes, out of every
    /// consumer's reach (only volume roots are ever bound).
    snapshots: OwnedFd,
    /// Where `volumes` is in this mount namespace, to tell mounts inside a volume.
    volumes_path: PathBuf,
    /// The subvolume `volumes` is in (a volume's subvolume is another one).
    pool_subvolume: u64,
    mode: BtrfsQuotaMode,
    overcommit: bool,
    kernel: Arc<dyn Kernel>,
    /// Volume id → subvolume id of the volumes this pool holds, for GetCapacity.
    subvolumes: Mutex<HashMap<String, u64>>,
}

fn mode_name(mode: BtrfsQuotaMode) -> &'static str {
    match mode {
        BtrfsQuotaMode::Simple => "simple quotas",
        BtrfsQuotaMode::Qgroups { .. } => "qgroups",
        BtrfsQuotaMode::Off => "no quotas",
    }
}

impl BtrfsBackend {
    /// Opens (creating if needed) the pool's volume directory, checks that it is on btrfs,
    /// and makes sure quotas are on as the configuration allows.
    pub fn open(cfg: &PoolConfig, kernel: Arc<dyn Kernel>) -> Result<Self> {
        sysfs::create_trusted_dir_all(&cfg.path).map_err(sys(format!(
            "pool {:?}: creating {}",
            cfg.name,
            cfg.path.display()
        )))?;
        let top = sysfs::open_trusted_dir(&cfg.path).map_err(sys(format!(
            "pool {:?}: opening {}",
            cfg.name,
            cfg.path.display()
        )))?;
        let fs_type = sysfs::fs_type_name(top.as_fd())
            .map_err(sys(format!("pool {:?}: statfs", cfg.name)))?;
        Self::open_on(cfg, kernel, &fs_type)
    }

    /// [`BtrfsBackend::open`] once the filesystem type of the pool's path is known.
    pub(crate) fn open_on(
        cfg: &PoolConfig,
        kernel: Arc<dyn Kernel>,
        fs_type: &str,
    ) -> Result<Self> {
        if fs_type != "btrfs" {
            return Err(Error::FailedPrecondition(format!(
                "pool {:?} is of kind btrfs but its path {} is on {fs_type}, not btrfs",
                cfg.name,
                cfg.path.display()
            )));
        }
        let (volumes, _) = super::open_pool_dir(cfg, "volumes")?;
        let (snapshots, _) = super::open_pool_dir(cfg, "snapshots")?;
        let volumes_path = cfg.path.join("volumes");
        // Symlinks in the configured path were followed: compare mounts with the real one.
        let volumes_path = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&volumes)
        ))
        .unwrap_or(volumes_path);
        let policy = cfg.quotas.unwrap_or_default();
        let mode = Self::quotas_on(&cfg.name, volumes.as_fd(), &*kernel, policy)?;
        let overcommit = cfg.overcommit.unwrap_or(false);
        let pool_subvolume = kernel
            .btrfs_subvolume_id(volumes.as_fd())
            .map_err(sys(format!(
                "pool {:?}: subvolume id of its path",
                cfg.name
            )))?;
        let pool = BtrfsBackend {
            pool_subvolume,
            name: cfg.name.clone(),
            volumes,
            snapshots,
            volumes_path,
            mode,
            overcommit,
            kernel,
            subvolumes: Mutex::new(HashMap::new()),
        };
        pool.load_subvolumes()?;
        tracing::info!(
            pool = %cfg.name, path = %cfg.path.display(), quotas = mode_name(mode), overcommit,
            "pool capacity is enforced: each volume is a btrfs subvolume whose qgroup limits \
             its referenced bytes (writes past it fail with EDQUOT)"
        );
        Ok(pool)
    }

    /// Turns quotas on where allowed (simple quotas first, full qgroups on a kernel without
    /// them); the mode in force.
    fn quotas_on(
        pool: &str,
        fs: BorrowedFd<'_>,
        kernel: &dyn Kernel,
        policy: QuotaPolicy,
    ) -> Result<BtrfsQuotaMode> {
        let mode = kernel.btrfs_quota_mode(fs).map_err(sys(format!(
            "pool {pool:?}: reading the btrfs quota status"
        )))?;
        let mode = match (mode, policy) {
            (BtrfsQuotaMode::Off, QuotaPolicy::Require) => {
                return Err(Error::FailedPrecondition(format!(
                    "pool {pool:?}: quotas are off on its btrfs filesystem and the pool is \
                     configured with quotas = \"require\": enable them (simple quotas: `btrfs \
                     quota enable --simple <mount point>`) or set quotas = \"enable\""
                )))
            }
            (BtrfsQuotaMode::Off, QuotaPolicy::Enable) => {
                if let Err(e) = kernel.btrfs_enable_quota(fs, true) {
                    // Kernels before 6.7 do not know simple quotas.
                    tracing::warn!(pool, error = %e, "btrfs simple quotas could not be enabled; enabling full qgroups");
                    kernel
                        .btrfs_enable_quota(fs, false)
                        .map_err(sys(format!("pool {pool:?}: enabling btrfs quotas")))?;
                }
                kernel.btrfs_quota_mode(fs).map_err(sys(format!(
                    "pool {pool:?}: reading the btrfs quota status"
                )))?
            }
            (on, _) => on,
        };
        match mode {
            BtrfsQuotaMode::Off => Err(Error::Internal(format!(
                "pool {pool:?}: btrfs quotas are still off after enabling them"
            ))),
            BtrfsQuotaMode::Qgroups { inconsistent: true } => {
                tracing::warn!(
                    pool,
                    "btrfs qgroup counters are marked inconsistent: usage figures may be off until a rescan (`btrfs quota rescan`)"
                );
                Ok(mode)
            }
            _ => Ok(mode),
        }
    }

    /// Learns the subvolume ids of the volumes present.
    fn load_subvolumes(&self) -> Result<()> {
        let mut map = HashMap::new();
        for name in self.entry_names()? {
            let Ok(id) = VolumeId::parse(&name) else {
                continue;
            };
            if let Ok(Some(sid)) = self.subvolume_of(&id) {
                map.insert(name, sid);
            }
        }
        *self.map() = map;
        Ok(())
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.subvolumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the volume's subvolume root; NOT_FOUND when missing.
    fn open_volume(&self, id: &VolumeId) -> Result<OwnedFd> {
        super::open_volume_dir(self.volumes.as_fd(), &self.name, id)
    }

    /// The subvolume id of volume `id`; None when absent. FAILED_PRECONDITION when the entry
    /// is something else than a subvolume root.
    fn subvolume_of(&self, id: &VolumeId) -> Result<Option<u64>> {
        let dir = match self.open_volume(id) {
            Ok(dir) => dir,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let sid = self
            .kernel
            .btrfs_subvolume_id(dir.as_fd())
            .map_err(sys(format!("subvolume id of volume {id}")))?;
        if sid == self.pool_subvolume {
            // A plain directory in the pool's own subvolume.
            return Err(Error::FailedPrecondition(format!(
                "pool {:?} holds a directory named {id} that is not a btrfs subvolume; it was left in place",
                self.name
            )));
        }
        Ok(Some(sid))
    }

    fn qgroup(&self, sid: u64) -> Result<Option<Qgroup>> {
        let all = self
            .kernel
            .btrfs_qgroups(self.volumes.as_fd())
            .map_err(sys(format!("pool {:?}: reading btrfs qgroups", self.name)))?;
        Ok(all.into_iter().find(|q| q.subvolume == sid))
    }

    /// Sets the limit of qgroup 0/`sid`, creating the qgroup if it is missing.
    fn set_limit(&self, vol: &VolumeRecord, sid: u64, bytes: u64) -> Result<()> {
        let fs = self.volumes.as_fd();
        let context = || {
            format!(
                "limiting qgroup 0/{sid} of volume {} to {bytes} bytes",
                vol.id
            )
        };
        match self.kernel.btrfs_qgroup_limit(fs, sid, bytes) {
            Err(e) if e.errno == Errno::NOENT => {
                match self.kernel.btrfs_qgroup_create(fs, sid) {
                    Ok(()) => {}
                    Err(e) if e.errno == Errno::EXIST => {}
                    Err(e) => return Err(sys(context())(e)),
                }
                self.kernel
                    .btrfs_qgroup_limit(fs, sid, bytes)
                    .map_err(sys(context()))
            }
            other => other.map_err(sys(context())),
        }
    }

    fn commit(&self) -> Result<()> {
        self.kernel
            .btrfs_commit(self.volumes.as_fd())
            .map_err(sys(format!(
                "pool {:?}: committing the filesystem",
                self.name
            )))
    }

    /// FAILED_PRECONDITION, naming it, when a mount point lies inside the volume: destroying
    /// the subvolume would detach it.
    fn refuse_mounts_inside(&self, id: &VolumeId) -> Result<()> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::Internal(format!("reading the mount table: {e}")))?;
        let dir = self.volumes_path.join(id.as_str());
        let inside: Vec<String> = stowage_sys::mountinfo::parse(&text)
            .filter(|m| m.mount_point.starts_with(&dir))
            .map(|m| m.mount_point.display().to_string())
            .collect();
        if inside.is_empty() {
            Ok(())
        } else {
            Err(Error::FailedPrecondition(format!(
                "volume {id} contains a mount point ({}); it was left in place",
                inside.join(", ")
            )))
        }
    }

    /// Every subvolume below `sid` (nested ones a consumer made), outermost first.
    fn descendants(&self, sid: u64) -> Result<Vec<u64>> {
        let fs = self.volumes.as_fd();
        let mut found = Vec::new();
        let mut next = vec![sid];
        while let Some(parent) = next.pop() {
            let children = self
                .kernel
                .btrfs_child_subvolumes(fs, parent)
                .map_err(sys(format!("listing subvolumes inside subvolume {parent}")))?;
            for child in children {
                if !found.contains(&child) {
                    found.push(child);
                    next.push(child);
                }
            }
        }
        Ok(found)
    }

    /// Destroys the volume's subvolume and every subvolume nested in it, innermost first.
    /// Returns the ids destroyed (their qgroups are to be removed).
    fn destroy(&self, vol: &VolumeRecord, sid: u64) -> Result<Vec<u64>> {
        let fs = self.volumes.as_fd();
        let id = vol.id.as_str();
        let mut destroyed = Vec::new();
        for _ in 0..DELETE_ROUNDS {
            let nested = self.descendants(sid)?;
            let mut retry = false;
            for child in nested.iter().rev() {
                match self.kernel.btrfs_destroy_subvolume_id(fs, *child) {
                    Ok(()) => destroyed.push(*child),
                    Err(e) if e.errno == Errno::NOENT => {}
                    Err(e) if e.errno == Errno::NOTEMPTY => retry = true,
                    Err(e) => {
                        return Err(sys(format!(
                            "destroying subvolume {child} nested in volume {id}"
                        ))(e))
                    }
                }
            }
            if retry {
                continue;
            }
            match self.kernel.btrfs_destroy_subvolume(fs, id) {
                Ok(()) => {
                    destroyed.push(sid);
                    return Ok(destroyed);
                }
                Err(e) if e.errno == Errno::NOENT => return Ok(destroyed),
                // A subvolume was made inside meanwhile: enumerate again.
                Err(e) if e.errno == Errno::NOTEMPTY => {}
                Err(e) if e.errno == Errno::BUSY || e.errno == Errno::PERM => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} cannot be destroyed now ({e}); it was left in place"
                    )))
                }
                Err(e) => return Err(sys(format!("destroying volume {id}"))(e)),
            }
        }
        Err(Error::FailedPrecondition(format!(
            "volume {id}: subvolumes keep appearing inside it while it is deleted; it was left in place"
        )))
    }
}

impl PoolBackend for BtrfsBackend {
    /// A subvolume is a directory tree; there is no block device.
    fn supports_block(&self) -> bool {
        false
    }

    fn supports_fs_type(&self, fs_type: &str) -> bool {
        fs_type.is_empty() || fs_type == "btrfs"
    }

    fn default_fs_type(&self) -> &str {
        "btrfs"
    }

    fn context(&self) -> HashMap<String, String> {
        HashMap::from([("capacityEnforcement".to_owned(), "hard".to_owned())])
    }

    fn enforces_capacity(&self) -> bool {
        true
    }

    /// Free space as statfs reports it for btrfs (free room in data block groups plus the
    /// unallocated space usable for data), minus what volumes were promised and have not used
    /// yet (their limit minus their referenced bytes), unless the pool overcommits.
    fn capacity(&self) -> Result<PoolCapacity> {
        let space = sysfs::fs_space(self.volumes.as_fd())
            .map_err(sys(format!("pool {:?}: statvfs", self.name)))?;
        if self.overcommit {
            return Ok(PoolCapacity {
                total: space.bytes_total,
                available: space.bytes_available,
            });
        }
        let ours: Vec<u64> = self.map().values().copied().collect();
        let mut promised: u64 = 0;
        if !ours.is_empty() {
            let all = self
                .kernel
                .btrfs_qgroups(self.volumes.as_fd())
                .map_err(sys(format!("pool {:?}: reading btrfs qgroups", self.name)))?;
            for q in all.iter().filter(|q| ours.contains(&q.subvolume)) {
                if let Some(limit) = q.max_referenced {
                    promised = promised.saturating_add(limit.saturating_sub(q.referenced));
                }
            }
        }
        Ok(PoolCapacity {
            total: space.bytes_total,
            available: space.bytes_available.saturating_sub(promised),
        })
    }

    /// The filesystem's size: one statvfs, no qgroup read.
    fn max_volume_size(&self) -> Result<u64> {
        sysfs::fs_space(self.volumes.as_fd())
            .map(|s| s.bytes_total)
            .map_err(sys(format!("pool {:?}: statvfs", self.name)))
    }

    /// Creates the volume's subvolume (an existing one is reused), then limits its qgroup.
    fn create(&self, vol: &VolumeRecord) -> Result<()> {
        let id = vol.id.as_str();
        match self.kernel.btrfs_create_subvolume(self.volumes.as_fd(), id) {
            Ok(()) => {}
            Err(e) if e.errno == Errno::EXIST => {}
            Err(e) => {
                return Err(sys(format!(
                    "creating the subvolume of volume {id} in pool {:?}",
                    self.name
                ))(e))
            }
        }
        crate::crash::point("btrfs-create-after-subvolume");
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            return Err(Error::Internal(format!(
                "the subvolume of volume {id} vanished right after it was created"
            )));
        };
        let dir = self.open_volume(&vol.id)?;
        // Pods of any uid write into it, as into a dir volume.
        sysfs::set_mode(dir.as_fd(), 0o777).map_err(sys(format!("opening up volume {id}")))?;
        self.set_limit(vol, sid, vol.capacity)?;
        self.commit()?;
        self.map().insert(id.to_owned(), sid);
        Ok(())
    }

    /// Destroys the subvolume and the ones nested in it (found by id in the root tree, so
    /// no path inside the volume is followed), then removes their qgroups. A mount of the
    /// volume anywhere, or a mount point inside it, is FAILED_PRECONDITION naming it.
    fn delete(&self, vol: &VolumeRecord) -> Result<()> {
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            self.map().remove(vol.id.as_str());
            return Ok(());
        };
        super::refuse_if_mounted(None, &vol.id)?;
        self.refuse_mounts_inside(&vol.id)?;
        let destroyed = self.destroy(vol, sid)?;
        crate::crash::point("btrfs-delete-after-destroy");
        let fs = self.volumes.as_fd();
        for sub in destroyed {
            match self.kernel.btrfs_qgroup_remove(fs, sub) {
                // EBUSY: the cleaner has not dropped the subvolume yet; the kernel removes
                // the qgroup of a fully dropped subvolume itself.
                Ok(()) => {}
                Err(e) if matches!(e.errno, Errno::NOENT | Errno::BUSY) => {}
                Err(e) => {
                    tracing::warn!(pool = %self.name, volume = %vol.id, error = %e, "removing the qgroup of a destroyed subvolume failed")
                }
            }
        }
        self.commit()?;
        self.map().remove(vol.id.as_str());
        Ok(())
    }

    /// Raises the qgroup limit (never lowers the one in force); a bind mount sees it at
    /// once, so no node step is needed.
    fn expand(&self, vol: &VolumeRecord, capacity: u64) -> Result<bool> {
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            return Err(Error::NotFound(format!(
                "the subvolume of volume {} is missing from pool {:?}",
                vol.id, self.name
            )));
        };
        let current = self.qgroup(sid)?.and_then(|q| q.max_referenced);
        if capacity > vol.capacity && current.is_none_or(|limit| capacity > limit) {
            self.set_limit(vol, sid, capacity)?;
            self.commit()?;
        }
        Ok(false)
    }

    /// Sets the limit of a volume whose qgroup has none (quotas were off, or were disabled
    /// and enabled again, which drops every qgroup).
    fn ensure_limit(&self, vol: &VolumeRecord) -> Result<bool> {
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            return Err(Error::NotFound(format!(
                "the subvolume of volume {} is missing from pool {:?}",
                vol.id, self.name
            )));
        };
        self.map().insert(vol.id.as_str().to_owned(), sid);
        if self
            .qgroup(sid)?
            .is_some_and(|q| q.max_referenced.is_some())
        {
            return Ok(false);
        }
        self.set_limit(vol, sid, vol.capacity)?;
        self.commit()?;
        Ok(true)
    }

    fn entry_names(&self) -> Result<Vec<String>> {
        sysfs::entry_names(self.volumes.as_fd())
            .map_err(sys(format!("listing pool {:?}", self.name)))
    }

    fn snapshot_method(&self) -> String {
        "read-only btrfs subvolume snapshot; restores and clones are writable snapshots \
         (constant time)"
            .to_owned()
    }

    fn create_snapshot(&self, snap: &SnapshotRecord, source: Source<'_>) -> Result<()> {
        self.take_snapshot(snap, source)
    }

    fn delete_snapshot(&self, snap: &SnapshotRecord) -> Result<()> {
        self.remove_snapshot(snap)
    }

    fn create_from(&self, vol: &VolumeRecord, source: Source<'_>) -> Result<()> {
        self.fill(vol, source)
    }

    fn snapshot_names(&self) -> Result<Vec<String>> {
        sysfs::entry_names(self.snapshots.as_fd()).map_err(sys(format!(
            "listing the snapshots of pool {:?}",
            self.name
        )))
    }

    fn condition(&self, vol: &VolumeRecord) -> Condition {
        match self.subvolume_of(&vol.id) {
            Ok(Some(_)) => Condition {
                abnormal: false,
                message: format!(
                    "capacity enforced by a btrfs qgroup limit ({})",
                    mode_name(self.mode)
                ),
            },
            Ok(None) => Condition {
                abnormal: true,
                message: format!(
                    "the volume's subvolume is missing from pool {:?}",
                    self.name
                ),
            },
            Err(e) => Condition {
                abnormal: true,
                message: format!("the volume's subvolume cannot be used: {e}"),
            },
        }
    }

    /// The subvolume root's own inode (its device is the subvolume's).
    fn mark(&self, vol: &VolumeRecord) -> Result<Mark> {
        let dir = self.open_volume(&vol.id)?;
        super::directory_mark(dir.as_fd(), &vol.id)
    }

    /// Binds the subvolume root (opened from the pool's fd) onto the staging directory.
    fn stage(
        &self,
        vol: &VolumeRecord,
        target: BorrowedFd<'_>,
        how: &StageRequest<'_>,
    ) -> Result<()> {
        let dir = self.open_volume(&vol.id)?;
        super::bind_directory(&*self.kernel, dir.as_fd(), target, how, &vol.id)
    }

    /// Referenced bytes of the volume's qgroup against its limit, as of the last transaction
    /// commit. Inodes as statvfs gives them: btrfs allocates inodes dynamically and reports
    /// 0 total and 0 free, which is passed on as it is.
    fn usage(&self, vol: &VolumeRecord, _mounted: BorrowedFd<'_>) -> Result<VolumeUsage> {
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            return Err(Error::NotFound(format!(
                "the subvolume of volume {} is missing from pool {:?}",
                vol.id, self.name
            )));
        };
        let q = self.qgroup(sid)?.unwrap_or_default();
        let space = sysfs::fs_space(self.volumes.as_fd()).map_err(sys("statvfs of pool"))?;
        let bytes_total = q.max_referenced.unwrap_or(vol.capacity);
        let bytes_used = q.referenced;
        Ok(VolumeUsage {
            bytes_total,
            bytes_used,
            bytes_available: bytes_total
                .saturating_sub(bytes_used)
                .min(space.bytes_available),
            inodes_total: space.inodes_total,
            inodes_used: space.inodes_total.saturating_sub(space.inodes_free),
            inodes_available: space.inodes_free,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::VolumeState;
    use std::path::Path;
    use stowage_core::config::PoolKind;
    use stowage_core::request::Access;
    use stowage_sys::{FakeKernel, KernelCall, MountAttrs};

    fn config(dir: &Path, quotas: Option<QuotaPolicy>, overcommit: Option<bool>) -> PoolConfig {
        PoolConfig {
            name: "sub".into(),
            kind: PoolKind::Btrfs,
            path: dir.join("pool"),
            default_size: None,
            quotas,
            overcommit,
            overcommit_ratio: None,
        }
    }

    fn pool_with(kernel: &Arc<FakeKernel>, dir: &Path) -> BtrfsBackend {
        let k: Arc<dyn Kernel> = Arc::clone(kernel) as Arc<dyn Kernel>;
        BtrfsBackend::open_on(&config(dir, None, None), k, "btrfs").unwrap()
    }

    fn record(seq: i64, capacity: u64) -> VolumeRecord {
        VolumeRecord {
            seq,
            id: VolumeId::generate(),
            name: format!("v{seq}"),
            pool: "sub".into(),
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

    #[test]
    fn opening_enables_simple_quotas_unless_they_are_required() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let calls = kernel.calls();
        assert_eq!(
            &calls[..3],
            &[
                KernelCall::BtrfsQuotaMode,
                KernelCall::BtrfsEnableQuota { simple: true },
                KernelCall::BtrfsQuotaMode
            ]
        );
        assert_eq!(pool.mode, BtrfsQuotaMode::Simple);
        assert_eq!(pool.context()["capacityEnforcement"], "hard");
        assert!(pool.enforces_capacity() && !pool.supports_block());
        assert!(pool.supports_fs_type("") && pool.supports_fs_type("btrfs"));
        assert!(!pool.supports_fs_type("ext4"));

        // Simple quotas refused (an older kernel): full qgroups.
        let kernel = Arc::new(FakeKernel::new());
        kernel.fail_next("btrfs_enable_quota", Errno::INVAL, 1);
        let pool = pool_with(&kernel, dir.path());
        assert!(kernel
            .calls()
            .contains(&KernelCall::BtrfsEnableQuota { simple: false }));
        assert!(matches!(pool.mode, BtrfsQuotaMode::Qgroups { .. }));

        // Required but off: refused, saying what to do; nothing enabled.
        let kernel = Arc::new(FakeKernel::new());
        let k: Arc<dyn Kernel> = Arc::clone(&kernel) as Arc<dyn Kernel>;
        let cfg = config(dir.path(), Some(QuotaPolicy::Require), None);
        let err = BtrfsBackend::open_on(&cfg, k, "btrfs").unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("quotas are off"), "{err}");
        assert!(!kernel
            .calls()
            .iter()
            .any(|c| matches!(c, KernelCall::BtrfsEnableQuota { .. })));
        // Required and on (full qgroups, chosen by the operator): used as they are.
        kernel.set_btrfs_quota_mode(BtrfsQuotaMode::Qgroups {
            inconsistent: false,
        });
        let k: Arc<dyn Kernel> = Arc::clone(&kernel) as Arc<dyn Kernel>;
        BtrfsBackend::open_on(&cfg, k, "btrfs").unwrap();
    }

    #[test]
    fn a_path_not_on_btrfs_is_refused_naming_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let kernel: Arc<dyn Kernel> = Arc::new(FakeKernel::new());
        let err = BtrfsBackend::open_on(&config(dir.path(), None, None), kernel.clone(), "ext4")
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err.to_string().contains("is on ext4, not btrfs"), "{err}");
        // Through the real statfs: the temporary directory's own filesystem is named.
        let real =
            sysfs::fs_type_name(sysfs::open_trusted_dir(dir.path()).unwrap().as_fd()).unwrap();
        if real != "btrfs" {
            let err = BtrfsBackend::open(&config(dir.path(), None, None), kernel).unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("is on {real}, not btrfs")),
                "{err}"
            );
        }
    }

    #[test]
    fn create_makes_a_subvolume_and_limits_it_and_a_retry_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 8 << 20);
        kernel.fail_next("btrfs_qgroup_limit", Errno::IO, 1);
        let err = pool.create(&vol).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(err.to_string().contains("limiting qgroup"), "{err}");
        let sid = kernel.subvolumes()[0];
        assert_eq!(kernel.qgroup(sid).unwrap().max_referenced, None);
        // The retry reuses the subvolume and sets the limit, then commits.
        kernel.clear();
        pool.create(&vol).unwrap();
        let calls = kernel.calls();
        assert!(matches!(
            &calls[0],
            KernelCall::BtrfsCreateSubvolume { name, .. } if name == vol.id.as_str()
        ));
        assert!(calls.contains(&KernelCall::BtrfsQgroupLimit {
            subvolume: sid,
            bytes: 8 << 20
        }));
        assert_eq!(calls.last(), Some(&KernelCall::BtrfsCommit));
        assert_eq!(kernel.subvolumes(), vec![sid]);
        assert_eq!(kernel.qgroup(sid).unwrap().max_referenced, Some(8 << 20));
        assert!(!pool.ensure_limit(&vol).unwrap());
        let mode =
            std::fs::metadata(dir.path().join("pool/volumes").join(vol.id.as_str())).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o777
        );
        assert!(!pool.condition(&vol).abnormal);

        // A qgroup that went missing (quotas off and on again) is made and limited.
        let other = record(2, 1 << 20);
        kernel.fail_next("btrfs_qgroup_limit", Errno::NOENT, 1);
        kernel.fail_next("btrfs_qgroup_create", Errno::EXIST, 1);
        pool.create(&other).unwrap();
        // A full filesystem is RESOURCE_EXHAUSTED.
        kernel.fail_next("btrfs_create_subvolume", Errno::NOSPC, 1);
        assert_eq!(
            pool.create(&record(3, 1 << 20)).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        // A plain directory in its place is refused, not adopted.
        let squatter = record(4, 1 << 20);
        std::fs::create_dir(dir.path().join("pool/volumes").join(squatter.id.as_str())).unwrap();
        let err = pool.create(&squatter).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(pool.condition(&squatter).abnormal);
    }

    #[test]
    fn delete_destroys_nested_subvolumes_innermost_first_and_their_qgroups() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 8 << 20);
        pool.create(&vol).unwrap();
        let sid = kernel.subvolumes()[0];
        let root = pool.open_volume(&vol.id).unwrap();
        kernel.btrfs_create_subvolume(root.as_fd(), "a").unwrap();
        let a = sysfs::open_dir_beneath(root.as_fd(), Path::new("a")).unwrap();
        kernel.btrfs_create_subvolume(a.as_fd(), "b").unwrap();
        drop((root, a));
        let ids = kernel.subvolumes();
        let (a_id, b_id) = (ids[1], ids[2]);
        kernel.clear();
        pool.delete(&vol).unwrap();
        let destroys: Vec<KernelCall> = kernel
            .calls()
            .into_iter()
            .filter(|c| {
                matches!(
                    c,
                    KernelCall::BtrfsDestroySubvolume { .. }
                        | KernelCall::BtrfsDestroySubvolumeId { .. }
                        | KernelCall::BtrfsQgroupRemove { .. }
                )
            })
            .collect();
        let root_id = sysfs::file_info(pool.volumes.as_fd()).unwrap().id;
        assert_eq!(
            destroys,
            vec![
                KernelCall::BtrfsDestroySubvolumeId { subvolume: b_id },
                KernelCall::BtrfsDestroySubvolumeId { subvolume: a_id },
                KernelCall::BtrfsDestroySubvolume {
                    dir: root_id,
                    name: vol.id.as_str().to_owned()
                },
                KernelCall::BtrfsQgroupRemove { subvolume: b_id },
                KernelCall::BtrfsQgroupRemove { subvolume: a_id },
                KernelCall::BtrfsQgroupRemove { subvolume: sid },
            ]
        );
        assert!(kernel.subvolumes().is_empty());
        assert!(kernel.qgroup(sid).is_none());
        // Absent is OK, and touches nothing.
        kernel.clear();
        pool.delete(&vol).unwrap();
        assert!(!kernel
            .calls()
            .iter()
            .any(|c| matches!(c, KernelCall::BtrfsDestroySubvolume { .. })));
        assert!(pool.condition(&vol).abnormal);
    }

    #[test]
    fn a_busy_qgroup_does_not_fail_deletion_and_other_errors_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 1 << 20);
        pool.create(&vol).unwrap();
        kernel.fail_next("btrfs_qgroup_remove", Errno::BUSY, 1);
        pool.delete(&vol).unwrap();
        let vol = record(2, 1 << 20);
        pool.create(&vol).unwrap();
        kernel.fail_next("btrfs_destroy_subvolume", Errno::IO, 1);
        let err = pool.delete(&vol).unwrap_err();
        assert!(err.to_string().contains("destroying volume"), "{err}");
        kernel.fail_next("btrfs_destroy_subvolume", Errno::BUSY, 1);
        assert_eq!(
            pool.delete(&vol).unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        // New nested subvolumes every round: given up, saying why.
        kernel.fail_next("btrfs_destroy_subvolume", Errno::NOTEMPTY, DELETE_ROUNDS);
        let err = pool.delete(&vol).unwrap_err();
        assert!(err.to_string().contains("keep appearing"), "{err}");
        pool.delete(&vol).unwrap();
    }

    #[test]
    fn expand_raises_the_limit_never_lowers_it_and_needs_no_node_step() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 4 << 20);
        pool.create(&vol).unwrap();
        let sid = kernel.subvolumes()[0];
        assert!(!pool.expand(&vol, 16 << 20).unwrap());
        assert_eq!(kernel.qgroup(sid).unwrap().max_referenced, Some(16 << 20));
        // Again (the record not yet updated): nothing changes.
        kernel.clear();
        assert!(!pool.expand(&vol, 16 << 20).unwrap());
        assert!(!pool.expand(&vol, 8 << 20).unwrap());
        assert!(!pool.expand(&vol, 2 << 20).unwrap());
        assert!(!kernel
            .calls()
            .iter()
            .any(|c| matches!(c, KernelCall::BtrfsQgroupLimit { .. })));
        assert_eq!(kernel.qgroup(sid).unwrap().max_referenced, Some(16 << 20));
        pool.delete(&vol).unwrap();
        assert!(matches!(
            pool.expand(&vol, 32 << 20),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn capacity_subtracts_the_unused_part_of_each_limit_unless_overcommitted() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let free = pool.capacity().unwrap().available;
        let vol = record(1, 64 << 20);
        pool.create(&vol).unwrap();
        let sid = kernel.subvolumes()[0];
        kernel.set_qgroup_referenced(sid, 16 << 20);
        let cap = pool.capacity().unwrap();
        // The fake writes nothing, so the filesystem's free space is (about) unchanged.
        let expected = free.saturating_sub(48 << 20);
        assert!(
            cap.available.abs_diff(expected) < 4 << 20,
            "{cap:?} vs {expected}"
        );

        let k: Arc<dyn Kernel> = Arc::clone(&kernel) as Arc<dyn Kernel>;
        let over =
            BtrfsBackend::open_on(&config(dir.path(), None, Some(true)), k, "btrfs").unwrap();
        // Volumes present at open are known to the new instance too.
        assert_eq!(over.map().get(vol.id.as_str()), Some(&sid));
        assert!(over.capacity().unwrap().available >= cap.available);
    }

    #[test]
    fn usage_is_the_qgroup_against_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 8 << 20);
        pool.create(&vol).unwrap();
        let sid = kernel.subvolumes()[0];
        kernel.set_qgroup_referenced(sid, 3 << 20);
        let fd = pool.open_volume(&vol.id).unwrap();
        let u = pool.usage(&vol, fd.as_fd()).unwrap();
        assert_eq!((u.bytes_total, u.bytes_used), (8 << 20, 3 << 20));
        assert!(u.bytes_available <= 5 << 20);
        pool.delete(&vol).unwrap();
        assert!(matches!(
            pool.usage(&vol, fd.as_fd()),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn stage_binds_the_subvolume_root_that_the_mark_names() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 1 << 20);
        pool.create(&vol).unwrap();
        let root = pool.open_volume(&vol.id).unwrap();
        let source = sysfs::file_info(root.as_fd()).unwrap().id;
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
    }
}
