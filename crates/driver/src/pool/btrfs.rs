//! The `btrfs` kind: a subvolume per volume at `<path>/volumes/<id>`, its size a limit (max
//! referenced bytes) on the volume's own level-1 qgroup `1/<subvolume id>`, of which the
//! volume's subvolume and every subvolume nested in it are members, so a write past it, in
//! the volume or in a subvolume a pod made inside it, fails with EDQUOT. Staging binds the
//! subvolume's root directory, as for `dir`; no block volumes.
//!
//! Nested subvolumes join the volume's qgroup by the kernel's auto-inheritance under simple
//! quotas (Linux 6.7: a new subvolume joins the qgroups its parent subvolume's qgroup is a
//! member of) — unless whoever creates it passes an explicit inheritance list, which needs no
//! privilege — and never under full qgroups. So the pool also *sweeps*: at stats, expansion
//! and start-up it walks the nested subvolumes (by id, in the root tree) and assigns every
//! one that is not a member, taking it out of any other qgroup; a volume where the sweep had
//! to do that is reported abnormal. Data written in such a subvolume before the sweep is not
//! stopped (docs/security.md).
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
use stowage_sys::{qgroup_id, qgroup_name, BtrfsQuotaMode, Errno, Kernel, Qgroup};

use super::{
    sys_error as sys, Condition, Mark, PoolBackend, PoolCapacity, StageRequest, VolumeUsage,
};
use crate::store::VolumeRecord;

mod snapshots;

/// How often a deletion enumerates nested subvolumes again when new ones appeared meanwhile.
const DELETE_ROUNDS: usize = 3;

/// The file, in the pool's directory, listing qgroups a deletion still has to remove (one
/// `<level>/<id>` a line): the volume's level-1 qgroup, written before its subvolume is
/// destroyed, and level-0 qgroups whose removal was refused (EBUSY).
const PENDING_FILE: &str = "btrfs-qgroups-pending";

/// The level-1 qgroup holding the limit of the volume whose subvolume is `sid`.
fn group_of(sid: u64) -> u64 {
    qgroup_id(1, sid)
}

/// Ignores `errno` (an outcome that means the work is already done).
fn ok_if(r: stowage_sys::SysResult<()>, errnos: &[Errno]) -> stowage_sys::SysResult<()> {
    match r {
        Err(e) if errnos.contains(&e.errno) => Ok(()),
        other => other,
    }
}

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
    /// Volume id → what a sweep found outside the volume's qgroup (nested subvolumes it had
    /// to assign), for the volume's condition; kept until the volume is deleted or the
    /// driver restarts.
    escapes: Mutex<HashMap<String, String>>,
    /// `<path>/` + [`PENDING_FILE`]; the mutex serialises its read-modify-write.
    pending: Mutex<PathBuf>,
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
            escapes: Mutex::new(HashMap::new()),
            pending: Mutex::new(cfg.path.join(PENDING_FILE)),
        };
        pool.load_subvolumes()?;
        pool.remove_pending_qgroups(true);
        tracing::info!(
            pool = %cfg.name, path = %cfg.path.display(), quotas = mode_name(mode), overcommit,
            "pool capacity is enforced: each volume is a btrfs subvolume whose qgroup limits \
             its referenced bytes, nested subvolumes included (writes past it fail with EDQUOT)"
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

    /// Every qgroup of the filesystem, with its parents.
    fn qgroups(&self) -> Result<Vec<Qgroup>> {
        self.kernel
            .btrfs_qgroups(self.volumes.as_fd())
            .map_err(sys(format!("pool {:?}: reading btrfs qgroups", self.name)))
    }

    /// The limit in force for the volume whose subvolume is `sid`: its level-1 qgroup's, or,
    /// laid out by an older version, its level-0 qgroup's.
    fn limit_in_force(all: &[Qgroup], sid: u64) -> Option<u64> {
        let of = |id: u64| {
            all.iter()
                .find(|q| q.id == id)
                .and_then(|q| q.max_referenced)
        };
        of(group_of(sid)).or_else(|| of(sid))
    }

    /// Sets the limit of qgroup `qgroup` (`u64::MAX`: none), creating it if missing.
    fn set_limit(&self, vol: &VolumeRecord, qgroup: u64, bytes: u64) -> Result<()> {
        let fs = self.volumes.as_fd();
        let context = || {
            format!(
                "limiting qgroup {} of volume {} to {bytes} bytes",
                qgroup_name(qgroup),
                vol.id
            )
        };
        match self.kernel.btrfs_qgroup_limit(fs, qgroup, bytes) {
            Err(e) if e.errno == Errno::NOENT => {
                ok_if(self.kernel.btrfs_qgroup_create(fs, qgroup), &[Errno::EXIST])
                    .map_err(sys(context()))?;
                self.kernel
                    .btrfs_qgroup_limit(fs, qgroup, bytes)
                    .map_err(sys(context()))
            }
            other => other.map_err(sys(context())),
        }
    }

    /// Makes sure the volume's level-1 qgroup exists and its subvolume's level-0 qgroup is a
    /// member; `all` is what [`Self::qgroups`] read. Whether it changed anything.
    fn ensure_group(&self, vol: &VolumeRecord, sid: u64, all: &[Qgroup]) -> Result<bool> {
        let fs = self.volumes.as_fd();
        let group = group_of(sid);
        let context = |what: &str| format!("{what} (volume {})", vol.id);
        let mut changed = false;
        if !all.iter().any(|q| q.id == group) {
            ok_if(self.kernel.btrfs_qgroup_create(fs, group), &[Errno::EXIST]).map_err(sys(
                context(&format!("creating qgroup {}", qgroup_name(group))),
            ))?;
            changed = true;
        }
        let own = all.iter().find(|q| q.id == sid);
        if own.is_none() {
            ok_if(self.kernel.btrfs_qgroup_create(fs, sid), &[Errno::EXIST])
                .map_err(sys(context(&format!("creating qgroup 0/{sid}"))))?;
        }
        if !own.is_some_and(|q| q.parents.contains(&group)) {
            ok_if(
                self.kernel.btrfs_qgroup_assign(fs, sid, group, true),
                &[Errno::EXIST],
            )
            .map_err(sys(context(&format!(
                "making qgroup 0/{sid} a member of {}",
                qgroup_name(group)
            ))))?;
            changed = true;
        }
        Ok(changed)
    }

    /// Makes every subvolume nested in the volume a member of the volume's level-1 qgroup
    /// (which must exist) and of no other qgroup; commits when it changed anything. Returns
    /// the nested subvolumes it had to change, and notes them for the volume's condition.
    fn sweep(&self, vol: &VolumeRecord, sid: u64) -> Result<Vec<u64>> {
        let nested = self.descendants(sid)?;
        if nested.is_empty() {
            return Ok(Vec::new());
        }
        let fs = self.volumes.as_fd();
        let group = group_of(sid);
        let all = self.qgroups()?;
        let mut outsiders = Vec::new();
        for sub in nested {
            let q = all.iter().find(|q| q.id == sub);
            if q.is_none() {
                // Quotas enabled after the subvolume was made: the kernel made no qgroup.
                ok_if(
                    self.kernel.btrfs_qgroup_create(fs, sub),
                    &[Errno::EXIST, Errno::NOENT],
                )
                .map_err(sys(format!("creating qgroup 0/{sub} in volume {}", vol.id)))?;
            }
            let parents = q.map(|q| q.parents.clone()).unwrap_or_default();
            let mut outside = false;
            if !parents.contains(&group) {
                // ENOENT: the subvolume went away meanwhile.
                ok_if(
                    self.kernel.btrfs_qgroup_assign(fs, sub, group, true),
                    &[Errno::EXIST, Errno::NOENT],
                )
                .map_err(sys(format!(
                    "making qgroup 0/{sub}, nested in volume {}, a member of {}",
                    vol.id,
                    qgroup_name(group)
                )))?;
                outside = true;
            }
            for other in parents.into_iter().filter(|p| *p != group) {
                ok_if(
                    self.kernel.btrfs_qgroup_assign(fs, sub, other, false),
                    &[Errno::NOENT],
                )
                .map_err(sys(format!(
                    "taking qgroup 0/{sub}, nested in volume {}, out of {}",
                    vol.id,
                    qgroup_name(other)
                )))?;
                outside = true;
            }
            if outside {
                outsiders.push(sub);
            }
        }
        if !outsiders.is_empty() {
            self.commit()?;
            let list = outsiders
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let message = format!(
                "nested subvolume(s) {list} were found outside the volume's qgroup {} ({}) and \
                 put into it; what was written in them before that was not held to the \
                 volume's size",
                qgroup_name(group),
                mode_name(self.mode)
            );
            tracing::warn!(pool = %self.name, volume = %vol.id, subvolumes = %list, "{message}");
            self.escapes().insert(vol.id.as_str().to_owned(), message);
        }
        Ok(outsiders)
    }

    /// [`Self::sweep`] where a failure is logged, not returned (stats and expansion go on).
    fn sweep_or_warn(&self, vol: &VolumeRecord, sid: u64) {
        if let Err(e) = self.sweep(vol, sid) {
            tracing::warn!(pool = %self.name, volume = %vol.id, error = %e, "could not check the subvolumes nested in the volume");
        }
    }

    fn escapes(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.escapes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the pending list (absent: empty).
    fn read_pending(path: &std::path::Path) -> Vec<u64> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let (level, id) = line.trim().split_once('/')?;
                Some(qgroup_id(level.parse().ok()?, id.parse().ok()?))
            })
            .collect()
    }

    /// Replaces the pending list (removes the file when empty); made durable by the next
    /// commit of the filesystem, which the callers do.
    fn write_pending(&self, path: &std::path::Path, ids: &[u64]) -> Result<()> {
        let context = |e: std::io::Error| {
            Error::Internal(format!(
                "pool {:?}: writing {}: {e}",
                self.name,
                path.display()
            ))
        };
        if ids.is_empty() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(context(e)),
                _ => Ok(()),
            };
        }
        let text: String = ids.iter().map(|id| qgroup_name(*id) + "\n").collect();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).map_err(context)?;
        std::fs::rename(&tmp, path).map_err(context)
    }

    /// Adds qgroups to the pending list.
    fn add_pending(&self, ids: &[u64]) -> Result<()> {
        let path = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all = Self::read_pending(&path);
        let before = all.len();
        for id in ids {
            if !all.contains(id) {
                all.push(*id);
            }
        }
        if all.len() == before {
            return Ok(());
        }
        self.write_pending(&path, &all)
    }

    /// Removes the qgroups of the pending list that can go now — a level-1 qgroup of a volume
    /// that no longer exists (its members taken out first; only with `level_1`, as a
    /// deletion in progress lists its volume's before destroying it), a level-0 qgroup that
    /// counts nothing (a live subvolume always references its root) — and drops them, and
    /// those already gone, from the list; commits when the list changed. Logs what fails;
    /// never fails.
    fn remove_pending_qgroups(&self, level_1: bool) {
        let path = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = Self::read_pending(&path);
        if pending.is_empty() || (!level_1 && pending.iter().all(|id| id >> 48 != 0)) {
            return;
        }
        let all = match self.qgroups() {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(pool = %self.name, error = %e, "could not remove the qgroups of deleted volumes");
                return;
            }
        };
        let live: Vec<u64> = self.map().values().copied().collect();
        let fs = self.volumes.as_fd();
        let mut keep = Vec::new();
        for &id in &pending {
            if !level_1 && id >> 48 != 0 {
                keep.push(id);
                continue;
            }
            let Some(q) = all.iter().find(|q| q.id == id) else {
                continue;
            };
            if q.level() == 0 && q.referenced != 0 {
                keep.push(id);
                continue;
            }
            if q.level() > 0 && live.contains(&(id & ((1 << 48) - 1))) {
                // The deletion failed and the volume lives on with its qgroup.
                continue;
            }
            for member in all.iter().filter(|m| m.parents.contains(&id)) {
                let _ = self.kernel.btrfs_qgroup_assign(fs, member.id, id, false);
            }
            match ok_if(self.kernel.btrfs_qgroup_remove(fs, id), &[Errno::NOENT]) {
                Ok(()) => {
                    tracing::info!(pool = %self.name, qgroup = %qgroup_name(id), "removed the qgroup of a deleted volume");
                }
                Err(e) => {
                    tracing::warn!(pool = %self.name, qgroup = %qgroup_name(id), error = %e, "could not remove the qgroup of a deleted volume; trying again later");
                    keep.push(id);
                }
            }
        }
        if keep == pending {
            return;
        }
        if let Err(e) = self
            .write_pending(&path, &keep)
            .and_then(|()| self.commit())
        {
            tracing::warn!(pool = %self.name, error = %e, "could not update the list of qgroups to remove");
        }
    }

    /// Puts the volume in the layout of this module: its level-1 qgroup exists, its
    /// subvolume is a member, the limit is on the level-1 qgroup (moved from the level-0 one
    /// where an older version put it, or the volume's size if there was none) and not on the
    /// level-0 one. Each step is idempotent. Returns (whether it changed anything, whether
    /// there was no limit at all). Does not commit.
    fn ensure_layout(&self, vol: &VolumeRecord, sid: u64, all: &[Qgroup]) -> Result<(bool, bool)> {
        let group = group_of(sid);
        let group_limit = all
            .iter()
            .find(|q| q.id == group)
            .and_then(|q| q.max_referenced);
        let own_limit = all
            .iter()
            .find(|q| q.id == sid)
            .and_then(|q| q.max_referenced);
        let mut changed = self.ensure_group(vol, sid, all)?;
        crate::crash::point("btrfs-migrate-after-group");
        if group_limit.is_none() {
            let limit = own_limit.unwrap_or(vol.capacity);
            self.set_limit(vol, group, limit)?;
            if own_limit.is_some() {
                tracing::info!(pool = %self.name, volume = %vol.id, limit, "volume's limit moved to its own level-1 qgroup {}, which holds nested subvolumes too", qgroup_name(group));
            }
            changed = true;
        }
        changed |= self.clear_own_limit(vol, sid, all)?;
        Ok((changed, group_limit.is_none() && own_limit.is_none()))
    }

    /// Removes a limit left on the volume's level-0 qgroup by an older version (the level-1
    /// qgroup's is the one in force). Whether there was one.
    fn clear_own_limit(&self, vol: &VolumeRecord, sid: u64, all: &[Qgroup]) -> Result<bool> {
        if !all
            .iter()
            .any(|q| q.id == sid && q.max_referenced.is_some())
        {
            return Ok(false);
        }
        self.set_limit(vol, sid, u64::MAX)?;
        Ok(true)
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
        let text = stowage_sys::mountinfo::read()
            .map_err(|e| Error::internal("reading the mount table", e))?;
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
            let all = self.qgroups()?;
            for sid in ours {
                // The level-1 qgroup, or the level-0 one of a volume not yet migrated.
                let q = [group_of(sid), sid].iter().find_map(|id| {
                    all.iter()
                        .find(|q| q.id == *id && q.max_referenced.is_some())
                });
                if let Some(q) = q {
                    let limit = q.max_referenced.unwrap_or_default();
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
        let all = self.qgroups()?;
        self.ensure_group(vol, sid, &all)?;
        crate::crash::point("btrfs-create-after-group");
        self.set_limit(vol, group_of(sid), vol.capacity)?;
        crate::crash::point("btrfs-create-after-limit");
        self.commit()?;
        self.map().insert(id.to_owned(), sid);
        Ok(())
    }

    /// Destroys the subvolume and the ones nested in it (found by id in the root tree, so
    /// no path inside the volume is followed), then removes their qgroups and the volume's
    /// level-1 qgroup. A mount of the volume anywhere, or a mount point inside it, is
    /// FAILED_PRECONDITION naming it.
    ///
    /// The limit is lifted first: destroying a subvolume reserves metadata in the qgroups of
    /// the subvolume holding it, which a full volume refuses (EDQUOT). It is put back if the
    /// destruction fails. The level-1 qgroup is on the pending list from before the
    /// destruction until it is removed, so a crash in between does not leave it behind.
    fn delete(&self, vol: &VolumeRecord) -> Result<()> {
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            self.map().remove(vol.id.as_str());
            self.escapes().remove(vol.id.as_str());
            self.remove_pending_qgroups(true);
            return Ok(());
        };
        super::refuse_if_mounted(None, &vol.id)?;
        self.refuse_mounts_inside(&vol.id)?;
        let fs = self.volumes.as_fd();
        let group = group_of(sid);
        let all = self.qgroups()?;
        let limit = Self::limit_in_force(&all, sid).unwrap_or(vol.capacity);
        self.add_pending(&[group])?;
        for q in [group, sid] {
            if all.iter().any(|g| g.id == q && g.max_referenced.is_some()) {
                self.kernel
                    .btrfs_qgroup_limit(fs, q, u64::MAX)
                    .map_err(sys(format!(
                        "lifting the limit of qgroup {} to delete volume {}",
                        qgroup_name(q),
                        vol.id
                    )))?;
            }
        }
        self.commit()?;
        crate::crash::point("btrfs-delete-after-unlimit");
        let destroyed = match self.destroy(vol, sid) {
            Ok(destroyed) => destroyed,
            Err(e) => {
                // The volume stays: so does its limit.
                let restored = self
                    .qgroups()
                    .and_then(|all| self.ensure_group(vol, sid, &all))
                    .and_then(|_| self.set_limit(vol, group, limit))
                    .and_then(|()| self.commit());
                if let Err(again) = restored {
                    tracing::error!(pool = %self.name, volume = %vol.id, error = %again, "the volume could not be deleted and its limit could not be put back; a restart puts it back");
                }
                return Err(e);
            }
        };
        crate::crash::point("btrfs-delete-after-destroy");
        let mut busy = Vec::new();
        for sub in destroyed {
            if let Err(e) = ok_if(
                self.kernel.btrfs_qgroup_assign(fs, sub, group, false),
                &[Errno::NOENT],
            ) {
                tracing::warn!(pool = %self.name, volume = %vol.id, error = %e, "taking a destroyed subvolume's qgroup out of the volume's failed");
            }
            match self.kernel.btrfs_qgroup_remove(fs, sub) {
                Ok(()) => {}
                Err(e) if e.errno == Errno::NOENT => {}
                // The cleaner has not dropped the subvolume yet; the kernel removes the
                // qgroup of a fully dropped subvolume itself (Linux 6.8 and later); on older
                // ones the background round ([`PoolBackend::tidy`]) removes it from the
                // pending list once it counts nothing.
                Err(e) if e.errno == Errno::BUSY => busy.push(sub),
                Err(e) => {
                    tracing::warn!(pool = %self.name, volume = %vol.id, error = %e, "removing the qgroup of a destroyed subvolume failed")
                }
            }
        }
        if !busy.is_empty() {
            if let Err(e) = self.add_pending(&busy) {
                tracing::warn!(pool = %self.name, volume = %vol.id, error = %e, "could not note qgroups to remove later");
            }
        }
        self.map().remove(vol.id.as_str());
        self.escapes().remove(vol.id.as_str());
        // The level-1 qgroup, now without members, and what earlier deletions left.
        self.remove_pending_qgroups(true);
        crate::crash::point("btrfs-delete-after-qgroups");
        self.commit()?;
        Ok(())
    }

    /// Raises the limit of the volume's level-1 qgroup (never lowers the one in force); a
    /// bind mount sees it at once, so no node step is needed. Sweeps nested subvolumes into
    /// the qgroup first.
    fn expand(&self, vol: &VolumeRecord, capacity: u64) -> Result<bool> {
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            return Err(Error::NotFound(format!(
                "the subvolume of volume {} is missing from pool {:?}",
                vol.id, self.name
            )));
        };
        let all = self.qgroups()?;
        let current = Self::limit_in_force(&all, sid);
        let (changed, _) = self.ensure_layout(vol, sid, &all)?;
        self.sweep_or_warn(vol, sid);
        // `>=`: a retry after a crash between the recorded capacity and this call (the
        // record then equals `capacity`) still raises the limit in force.
        if capacity >= vol.capacity && current.is_none_or(|limit| capacity > limit) {
            self.set_limit(vol, group_of(sid), capacity)?;
            crate::crash::point("btrfs-expand-after-limit");
            self.clear_own_limit(vol, sid, &all)?;
            self.commit()?;
        } else if changed {
            self.commit()?;
        }
        Ok(false)
    }

    /// At start: puts the volume in the layout above — a volume made by an older version has
    /// its limit on its level-0 qgroup: that limit moves to a new level-1 qgroup, of which
    /// its subvolume becomes a member (what it holds is charged there at once) — sets the
    /// limit of a volume that has none (quotas were off, or were disabled and enabled again,
    /// which drops every qgroup; then `true`), and sweeps nested subvolumes in. Each step
    /// is idempotent, so an interrupted run finishes on the next start.
    fn ensure_limit(&self, vol: &VolumeRecord) -> Result<bool> {
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            return Err(Error::NotFound(format!(
                "the subvolume of volume {} is missing from pool {:?}",
                vol.id, self.name
            )));
        };
        self.map().insert(vol.id.as_str().to_owned(), sid);
        let all = self.qgroups()?;
        let (changed, had_none) = self.ensure_layout(vol, sid, &all)?;
        if changed {
            self.commit()?;
        }
        self.sweep(vol, sid)?;
        Ok(had_none)
    }

    fn entry_names(&self) -> Result<Vec<String>> {
        sysfs::entry_names(self.volumes.as_fd())
            .map_err(sys(format!("listing pool {:?}", self.name)))
    }

    /// A subvolume a pod nested outside the volume's qgroup (an explicit inheritance list;
    /// any, under full qgroups) is unlimited until a sweep puts it back: the watch bounds
    /// that window by time, between the kubelet's stats calls.
    fn watches(&self) -> bool {
        true
    }

    /// Removes the level-0 qgroups of destroyed subvolumes that the pending list holds once
    /// the kernel's cleaner has dropped them (they count nothing then): a kernel before 6.8
    /// never removes them itself, and a deletion cannot wait for the cleaner. Level-1
    /// entries are left to the deletion that wrote them (and to the start).
    fn tidy(&self) {
        self.remove_pending_qgroups(false);
    }

    fn watch(&self, vol: &VolumeRecord) -> Result<()> {
        match self.subvolume_of(&vol.id)? {
            Some(sid) => self.sweep(vol, sid).map(drop),
            None => Ok(()),
        }
    }

    fn condition(&self, vol: &VolumeRecord) -> Condition {
        match self.subvolume_of(&vol.id) {
            Ok(Some(sid)) => match self.escapes().get(vol.id.as_str()) {
                Some(found) => Condition {
                    abnormal: true,
                    message: found.clone(),
                },
                None => Condition {
                    abnormal: false,
                    message: format!(
                        "capacity enforced by the limit of btrfs qgroup {}, nested subvolumes \
                         included ({})",
                        qgroup_name(group_of(sid)),
                        mode_name(self.mode)
                    ),
                },
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

    /// Referenced bytes of the volume's level-1 qgroup (nested subvolumes included) against
    /// its limit, as of the last transaction commit, after a sweep of nested subvolumes.
    /// Inodes as statvfs gives them: btrfs allocates inodes dynamically and reports 0 total
    /// and 0 free, which is passed on as it is.
    fn usage(&self, vol: &VolumeRecord, _mounted: BorrowedFd<'_>) -> Result<VolumeUsage> {
        let Some(sid) = self.subvolume_of(&vol.id)? else {
            return Err(Error::NotFound(format!(
                "the subvolume of volume {} is missing from pool {:?}",
                vol.id, self.name
            )));
        };
        self.sweep_or_warn(vol, sid);
        let all = self.qgroups()?;
        let q = [group_of(sid), sid]
            .iter()
            .find_map(|id| all.iter().find(|q| q.id == *id))
            .cloned()
            .unwrap_or_default();
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
            stats: None,
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
        assert!(err.to_string().contains("limiting qgroup 1/"), "{err}");
        let sid = kernel.subvolumes()[0];
        let group = group_of(sid);
        assert_eq!(kernel.qgroup(group).unwrap().max_referenced, None);
        // The retry reuses the subvolume and sets the limit, then commits.
        kernel.clear();
        pool.create(&vol).unwrap();
        let calls = kernel.calls();
        assert!(matches!(
            &calls[0],
            KernelCall::BtrfsCreateSubvolume { name, .. } if name == vol.id.as_str()
        ));
        assert!(calls.contains(&KernelCall::BtrfsQgroupLimit {
            qgroup: group,
            bytes: 8 << 20
        }));
        assert_eq!(calls.last(), Some(&KernelCall::BtrfsCommit));
        assert_eq!(kernel.subvolumes(), vec![sid]);
        // The limit is on the volume's level-1 qgroup, its subvolume a member; none on 0/sid.
        assert_eq!(kernel.qgroup(group).unwrap().max_referenced, Some(8 << 20));
        assert_eq!(kernel.qgroup(sid).unwrap().parents, vec![group]);
        assert_eq!(kernel.qgroup(sid).unwrap().max_referenced, None);
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
        pool.create(&other).unwrap();
        let other_sid = pool.subvolume_of(&other.id).unwrap().unwrap();
        assert_eq!(
            kernel.qgroup(group_of(other_sid)).unwrap().max_referenced,
            Some(1 << 20)
        );
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
        // Made under simple quotas, the nested subvolumes joined the volume's qgroup.
        assert_eq!(kernel.qgroup(b_id).unwrap().parents, vec![group_of(sid)]);
        assert!(pool.sweep(&vol, sid).unwrap().is_empty());
        assert!(!pool.condition(&vol).abnormal);
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
                KernelCall::BtrfsQgroupRemove { qgroup: b_id },
                KernelCall::BtrfsQgroupRemove { qgroup: a_id },
                KernelCall::BtrfsQgroupRemove { qgroup: sid },
                KernelCall::BtrfsQgroupRemove {
                    qgroup: group_of(sid)
                },
            ]
        );
        // The limit was lifted before the first destruction (a full volume refuses it).
        let calls = kernel.calls();
        let lifted = calls.iter().position(|c| {
            *c == KernelCall::BtrfsQgroupLimit {
                qgroup: group_of(sid),
                bytes: u64::MAX,
            }
        });
        let first_destroy = calls
            .iter()
            .position(|c| matches!(c, KernelCall::BtrfsDestroySubvolumeId { .. }));
        assert!(lifted.unwrap() < first_destroy.unwrap(), "{calls:?}");
        assert!(kernel.subvolumes().is_empty());
        assert!(kernel
            .qgroup_ids()
            .iter()
            .all(|q| ![sid, a_id, b_id, group_of(sid)].contains(q)));
        assert!(!dir.path().join("pool").join(PENDING_FILE).exists());
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
        // The volume stays, and so does its limit.
        let sid = pool.subvolume_of(&vol.id).unwrap().unwrap();
        assert_eq!(
            kernel.qgroup(group_of(sid)).unwrap().max_referenced,
            Some(1 << 20)
        );
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
        assert_eq!(
            kernel.qgroup(group_of(sid)).unwrap().max_referenced,
            Some(16 << 20)
        );
        // Again (the record not yet updated): nothing changes.
        kernel.clear();
        assert!(!pool.expand(&vol, 16 << 20).unwrap());
        assert!(!pool.expand(&vol, 8 << 20).unwrap());
        assert!(!pool.expand(&vol, 2 << 20).unwrap());
        assert!(!kernel
            .calls()
            .iter()
            .any(|c| matches!(c, KernelCall::BtrfsQgroupLimit { .. })));
        assert_eq!(
            kernel.qgroup(group_of(sid)).unwrap().max_referenced,
            Some(16 << 20)
        );
        // Retried after the engine recorded the new capacity (a crash in between): the
        // record equals the request, and the limit in force is still raised.
        let recorded = VolumeRecord {
            capacity: 24 << 20,
            ..vol.clone()
        };
        assert!(!pool.expand(&recorded, 24 << 20).unwrap());
        assert_eq!(
            kernel.qgroup(group_of(sid)).unwrap().max_referenced,
            Some(24 << 20)
        );
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
        kernel.set_qgroup_referenced(group_of(sid), 16 << 20);
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
        kernel.set_qgroup_referenced(group_of(sid), 3 << 20);
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

    /// The id of a subvolume made as `name` in the volume's root directory.
    fn nest(kernel: &FakeKernel, pool: &BtrfsBackend, vol: &VolumeRecord, name: &str) -> u64 {
        let root = pool.open_volume(&vol.id).unwrap();
        kernel.btrfs_create_subvolume(root.as_fd(), name).unwrap();
        *kernel.subvolumes().last().unwrap()
    }

    #[test]
    fn the_sweep_puts_nested_subvolumes_that_escaped_into_the_volume_qgroup() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 8 << 20);
        pool.create(&vol).unwrap();
        let sid = kernel.subvolumes()[0];
        let group = group_of(sid);
        // Auto-inherited (simple quotas): nothing to do, nothing reported.
        let inherited = nest(&kernel, &pool, &vol, "inherited");
        // Made with an explicit, empty inheritance list (no privilege needed): outside.
        let escaped = nest(&kernel, &pool, &vol, "escaped");
        kernel.set_qgroup_parents(escaped, vec![]);
        // Made inheriting another volume's qgroup: charged to that one, outside this one.
        let other = record(2, 8 << 20);
        pool.create(&other).unwrap();
        let other_group = group_of(pool.subvolume_of(&other.id).unwrap().unwrap());
        let foreign = nest(&kernel, &pool, &vol, "foreign");
        kernel.set_qgroup_parents(foreign, vec![other_group]);
        assert!(!pool.condition(&vol).abnormal);

        // Stats sweep: both are members of the volume's qgroup only, committed, and the
        // volume says what happened.
        kernel.clear();
        let fd = pool.open_volume(&vol.id).unwrap();
        pool.usage(&vol, fd.as_fd()).unwrap();
        for sub in [inherited, escaped, foreign] {
            assert_eq!(kernel.qgroup(sub).unwrap().parents, vec![group], "{sub}");
        }
        let calls = kernel.calls();
        assert!(calls.contains(&KernelCall::BtrfsQgroupAssign {
            member: foreign,
            parent: other_group,
            assign: false
        }));
        assert!(!calls.contains(&KernelCall::BtrfsQgroupAssign {
            member: inherited,
            parent: group,
            assign: true
        }));
        assert!(calls.contains(&KernelCall::BtrfsCommit));
        let c = pool.condition(&vol);
        assert!(c.abnormal);
        assert!(
            c.message.contains(&format!("{escaped}, {foreign}"))
                && c.message.contains(&qgroup_name(group)),
            "{}",
            c.message
        );
        assert!(!pool.condition(&other).abnormal);
        // Nothing left to do: no change, no commit.
        kernel.clear();
        assert!(pool.sweep(&vol, sid).unwrap().is_empty());
        assert!(!kernel.calls().contains(&KernelCall::BtrfsCommit));
        // A sweep that cannot read the tree does not fail the stats.
        kernel.fail_next("btrfs_child_subvolumes", Errno::IO, 1);
        pool.usage(&vol, fd.as_fd()).unwrap();
        // Deleting the volume forgets what was found.
        pool.delete(&vol).unwrap();
        assert!(!pool.escapes().contains_key(vol.id.as_str()));
    }

    #[test]
    fn under_full_qgroups_nested_subvolumes_join_at_stats_expansion_and_start() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_btrfs_quota_mode(BtrfsQuotaMode::Qgroups {
            inconsistent: false,
        });
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 8 << 20);
        pool.create(&vol).unwrap();
        let sid = kernel.subvolumes()[0];
        let group = group_of(sid);
        // No auto-inheritance in this mode.
        let a = nest(&kernel, &pool, &vol, "a");
        assert!(kernel.qgroup(a).unwrap().parents.is_empty());
        assert!(!pool.expand(&vol, 16 << 20).unwrap());
        assert_eq!(kernel.qgroup(a).unwrap().parents, vec![group]);
        assert_eq!(kernel.qgroup(group).unwrap().max_referenced, Some(16 << 20));
        assert!(pool.condition(&vol).abnormal);
        // Nested in a nested one, seen by a fresh instance's start-up pass.
        let root = pool.open_volume(&vol.id).unwrap();
        let a_dir = sysfs::open_dir_beneath(root.as_fd(), Path::new("a")).unwrap();
        kernel.btrfs_create_subvolume(a_dir.as_fd(), "b").unwrap();
        let b = *kernel.subvolumes().last().unwrap();
        let k: Arc<dyn Kernel> = Arc::clone(&kernel) as Arc<dyn Kernel>;
        let again = BtrfsBackend::open_on(&config(dir.path(), None, None), k, "btrfs").unwrap();
        assert!(!again.condition(&vol).abnormal);
        assert!(!again.ensure_limit(&vol).unwrap());
        assert_eq!(kernel.qgroup(b).unwrap().parents, vec![group]);
        assert!(again.condition(&vol).abnormal);
    }

    #[test]
    fn start_up_moves_an_old_volume_limit_to_its_level_1_qgroup_once() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        // As an older version made it: the limit on 0/sid, no level-1 qgroup. Its limit was
        // raised by an expansion whose record update was lost: the qgroup's limit wins.
        let vol = record(1, 4 << 20);
        kernel
            .btrfs_create_subvolume(pool.volumes.as_fd(), vol.id.as_str())
            .unwrap();
        let sid = kernel.subvolumes()[0];
        kernel
            .btrfs_qgroup_limit(pool.volumes.as_fd(), sid, 6 << 20)
            .unwrap();
        let nested = nest(&kernel, &pool, &vol, "nested");
        kernel.set_qgroup_referenced(sid, 1 << 20);
        // Stats before the migration read the old qgroup.
        let fd = pool.open_volume(&vol.id).unwrap();
        kernel.fail_next("btrfs_child_subvolumes", Errno::IO, 1);
        let u = pool.usage(&vol, fd.as_fd()).unwrap();
        assert_eq!((u.bytes_total, u.bytes_used), (6 << 20, 1 << 20));

        // Interrupted (the assignment fails): an error, and the next start finishes.
        kernel.fail_next("btrfs_qgroup_assign", Errno::IO, 1);
        assert!(pool.ensure_limit(&vol).is_err());
        // Not a volume that had no limit: no warning that data went uncharged.
        assert!(!pool.ensure_limit(&vol).unwrap());
        let group = group_of(sid);
        assert_eq!(kernel.qgroup(group).unwrap().max_referenced, Some(6 << 20));
        assert_eq!(kernel.qgroup(sid).unwrap().max_referenced, None);
        assert_eq!(kernel.qgroup(sid).unwrap().parents, vec![group]);
        assert_eq!(kernel.qgroup(nested).unwrap().parents, vec![group]);
        // Idempotent: nothing changes the second time.
        kernel.clear();
        assert!(!pool.ensure_limit(&vol).unwrap());
        assert!(!kernel.calls().iter().any(|c| matches!(
            c,
            KernelCall::BtrfsQgroupLimit { .. }
                | KernelCall::BtrfsQgroupCreate { .. }
                | KernelCall::BtrfsQgroupAssign { .. }
                | KernelCall::BtrfsCommit
        )));
        // A volume with no limit at all (quotas were re-enabled): limited now, and said so.
        let bare = record(2, 2 << 20);
        kernel
            .btrfs_create_subvolume(pool.volumes.as_fd(), bare.id.as_str())
            .unwrap();
        assert!(pool.ensure_limit(&bare).unwrap());
        let bare_sid = pool.subvolume_of(&bare.id).unwrap().unwrap();
        assert_eq!(
            kernel.qgroup(group_of(bare_sid)).unwrap().max_referenced,
            Some(2 << 20)
        );
        // An expansion of a volume not migrated yet moves its limit too (kept, when the
        // request does not raise it).
        let old = record(3, 4 << 20);
        kernel
            .btrfs_create_subvolume(pool.volumes.as_fd(), old.id.as_str())
            .unwrap();
        let old_sid = pool.subvolume_of(&old.id).unwrap().unwrap();
        kernel
            .btrfs_qgroup_limit(pool.volumes.as_fd(), old_sid, 4 << 20)
            .unwrap();
        assert!(!pool.expand(&old, 4 << 20).unwrap());
        assert_eq!(
            kernel.qgroup(group_of(old_sid)).unwrap().max_referenced,
            Some(4 << 20)
        );
        assert_eq!(kernel.qgroup(old_sid).unwrap().max_referenced, None);
        assert!(!pool.expand(&old, 8 << 20).unwrap());
        assert_eq!(
            kernel.qgroup(group_of(old_sid)).unwrap().max_referenced,
            Some(8 << 20)
        );
    }

    #[test]
    fn qgroups_a_crashed_or_busy_deletion_left_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 4 << 20);
        pool.create(&vol).unwrap();
        let sid = kernel.subvolumes()[0];
        let nested = nest(&kernel, &pool, &vol, "nested");
        let kept = record(2, 4 << 20);
        pool.create(&kept).unwrap();
        let kept_sid = pool.subvolume_of(&kept.id).unwrap().unwrap();
        // A deletion that stopped right after destroying (a crash): the subvolumes are
        // gone, their qgroups and the level-1 qgroup with its members are not. The pending
        // list also names a level-0 qgroup still counting data (not yet dropped), and the
        // qgroup of a live volume (a deletion that failed) — neither may go.
        pool.add_pending(&[group_of(sid), 999, group_of(kept_sid)])
            .unwrap();
        kernel.set_qgroup_referenced(999, 4096);
        kernel
            .btrfs_destroy_subvolume_id(pool.volumes.as_fd(), nested)
            .unwrap();
        kernel
            .btrfs_destroy_subvolume(pool.volumes.as_fd(), vol.id.as_str())
            .unwrap();
        assert!(kernel.qgroup(group_of(sid)).is_some());

        let k: Arc<dyn Kernel> = Arc::clone(&kernel) as Arc<dyn Kernel>;
        let again = BtrfsBackend::open_on(&config(dir.path(), None, None), k, "btrfs").unwrap();
        assert!(kernel.qgroup(group_of(sid)).is_none());
        assert!(kernel.qgroup(999).is_some());
        assert!(kernel.qgroup(group_of(kept_sid)).is_some());
        let pending = dir.path().join("pool").join(PENDING_FILE);
        assert_eq!(std::fs::read_to_string(&pending).unwrap(), "0/999\n");
        // Once it counts nothing, it goes too, and the list with it.
        kernel.set_qgroup_referenced(999, 0);
        again.delete(&vol).unwrap();
        assert!(kernel.qgroup(999).is_none());
        assert!(!pending.exists());
        assert_eq!(
            kernel.qgroup(kept_sid).unwrap().parents,
            vec![group_of(kept_sid)]
        );
    }

    /// Linux before 6.8 (Debian 12's 6.1): a destroyed subvolume's level-0 qgroup is EBUSY
    /// at deletion (it still references its tree until the cleaner drops it) and the kernel
    /// never removes it afterwards. The background round does, once it counts nothing,
    /// with no other deletion nor a restart; it leaves a level-1 entry alone (a deletion
    /// in progress lists its volume's qgroup before destroying the subvolume).
    #[test]
    fn the_background_round_removes_qgroups_the_cleaner_freed_after_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        kernel.set_btrfs_quota_mode(BtrfsQuotaMode::Qgroups {
            inconsistent: false,
        });
        let pool = pool_with(&kernel, dir.path());
        let vol = record(1, 4 << 20);
        pool.create(&vol).unwrap();
        let sid = kernel.subvolumes()[0];
        let nested = nest(&kernel, &pool, &vol, "nested");
        // Made now: the fake, unlike btrfs, reuses the ids of destroyed subvolumes.
        let other = record(2, 4 << 20);
        pool.create(&other).unwrap();
        let other_sid = pool.subvolume_of(&other.id).unwrap().unwrap();
        // Not yet dropped when the deletion destroys them: they still reference bytes.
        kernel.set_qgroup_referenced(sid, 16 << 10);
        kernel.set_qgroup_referenced(nested, 16 << 10);
        pool.delete(&vol).unwrap();
        assert_eq!(kernel.subvolumes(), vec![other_sid]);
        assert!(kernel.qgroup(group_of(sid)).is_none());
        let pending = dir.path().join("pool").join(PENDING_FILE);
        let listed = std::fs::read_to_string(&pending).unwrap();
        assert_eq!(listed, format!("0/{nested}\n0/{sid}\n"));
        // Still counting: the round keeps them, and touches nothing.
        kernel.clear();
        pool.tidy();
        assert!(kernel.qgroup(sid).is_some() && kernel.qgroup(nested).is_some());
        assert!(!kernel.calls().iter().any(|c| matches!(
            c,
            KernelCall::BtrfsQgroupRemove { .. } | KernelCall::BtrfsCommit
        )));
        assert_eq!(std::fs::read_to_string(&pending).unwrap(), listed);
        // A deletion in progress elsewhere listed its level-1 qgroup: not the round's.
        pool.add_pending(&[group_of(other_sid)]).unwrap();
        // The cleaner dropped the subvolumes: the next round removes their qgroups.
        kernel.set_qgroup_referenced(sid, 0);
        kernel.set_qgroup_referenced(nested, 0);
        kernel.clear();
        pool.tidy();
        assert!(kernel.qgroup(sid).is_none() && kernel.qgroup(nested).is_none());
        assert!(kernel.calls().contains(&KernelCall::BtrfsCommit));
        assert_eq!(
            std::fs::read_to_string(&pending).unwrap(),
            format!("{}\n", qgroup_name(group_of(other_sid)))
        );
        assert!(kernel.qgroup(group_of(other_sid)).is_some());
        // Nothing left for it: a round costs no kernel call.
        std::fs::remove_file(&pending).unwrap();
        kernel.clear();
        pool.tidy();
        assert!(kernel.calls().is_empty(), "{:?}", kernel.calls());
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
