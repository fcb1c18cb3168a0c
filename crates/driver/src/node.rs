//! The Node service: stage, publish, unpublish, unstage and stats.
//!
//! Every path from a request is resolved fd by fd beneath an allowed kubelet directory with
//! openat2 (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`); a symlink anywhere on the way refuses
//! the call. Mounts are made from those fds (open_tree + move_mount), never from a path
//! string resolved again. The kernel is the truth for what is mounted: a mount is "ours" when
//! the mount root at the path matches the volume's [`Mark`] (for a `dir` pool: the volume's
//! own directory, same device and inode). What is mounted at stage is the pool backend's
//! business ([`crate::pool::PoolBackend::stage`]); paths, records and publish binds are
//! handled here, once for every kind.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use stowage_core::ids::{not_found, VolumeRef};
use stowage_core::request::{
    Access, AccessMode, Capability, ExistingPath, HostPath, MountFlag, NodeExpand, NodePublish,
    NodeStage, NodeStats, NodeUnpublish, NodeUnstage,
};
use stowage_core::{Error, Result};
use stowage_csi::v1 as csi;
use stowage_csi::v1::node_service_capability::rpc::Type as NodeCap;
use stowage_sys::fs::{self as sysfs, InodeId};
use stowage_sys::{Errno, MountAttrs, SysError};
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::pool::{Mark, Pool, StageRequest, SIZE_GRANULE};
use crate::service::{Cost, Driver, Service};
use crate::statics::HandleAt;
use crate::store::{Publication, PublicationKind, PublicationState, VolumeRecord};

/// How many stacked mounts of ours unpublish removes from one path before giving up.
const MAX_STACKED_MOUNTS: usize = 8;

/// The mark of a volume none of whose storage is attached: it matches no mount.
const UNMOUNTED: Mark = Mark::Inode(InodeId {
    dev: u64::MAX,
    ino: u64::MAX,
});

/// What a publication's mount point is: a directory, or for a raw block volume's
/// publication the regular file its device node is bound onto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Dir,
    File,
}

impl Entry {
    fn of(vol: &VolumeRecord, kind: PublicationKind) -> Self {
        if vol.block && kind == PublicationKind::Publish {
            Entry::File
        } else {
            Entry::Dir
        }
    }
}

/// A request path opened as far as its parent directory.
struct Located {
    /// The path as given (normalised), for records and messages.
    path: HostPath,
    /// The parent directory, resolved without following symlinks.
    parent: OwnedFd,
    /// The last component.
    name: String,
}

/// What is at a located path.
enum Leaf {
    Missing,
    /// A directory or file that is not a mount root.
    Plain {
        fd: OwnedFd,
        is_dir: bool,
    },
    /// The root of a mount; `id` is the inode at its root.
    MountRoot {
        fd: OwnedFd,
        id: InodeId,
    },
}

fn path_error(field: &str, path: &HostPath, e: SysError) -> Error {
    match e.errno {
        Errno::LOOP => Error::InvalidArgument(format!(
            "{field} {:?} is or passes through a symlink; refusing it",
            path.as_str()
        )),
        Errno::XDEV => Error::InvalidArgument(format!(
            "{field} {:?} escapes its kubelet directory",
            path.as_str()
        )),
        Errno::NOENT => Error::NotFound(format!(
            "the parent directory of {field} {:?} does not exist",
            path.as_str()
        )),
        Errno::NOTDIR => Error::InvalidArgument(format!(
            "a parent of {field} {:?} is not a directory",
            path.as_str()
        )),
        _ => Error::internal(format!("resolving {field} {:?}", path.as_str()), e),
    }
}

fn flags_string(flags: &[MountFlag]) -> String {
    flags
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn attrs_for(cap: &Capability, read_only: bool) -> MountAttrs {
    let mut attrs = MountAttrs {
        read_only,
        nosuid: true,
        nodev: true,
        ..Default::default()
    };
    if let Access::Mount(m) = &cap.access {
        for f in &m.flags {
            match f {
                MountFlag::ReadOnly => attrs.read_only = true,
                MountFlag::NoExec => attrs.noexec = true,
                MountFlag::NoAtime => attrs.noatime = true,
                MountFlag::NoDirAtime => attrs.nodiratime = true,
                MountFlag::RelAtime => attrs.relatime = true,
                MountFlag::ReadWrite | MountFlag::NoSuid | MountFlag::NoDev => {}
            }
        }
    }
    attrs
}

impl Engine {
    /// Finds the kubelet directory `path` lies under and opens its parent without following
    /// symlinks.
    fn locate(&self, field: &str, path: &HostPath) -> Result<Located> {
        let (root, rel) = self
            .kubelet_dirs
            .iter()
            .find_map(|dir| {
                path.as_path()
                    .strip_prefix(dir)
                    .ok()
                    .filter(|rel| rel.components().next().is_some())
                    .map(|rel| (dir, rel.to_owned()))
            })
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{field} {:?} is outside the kubelet directories this driver serves ({})",
                    path.as_str(),
                    self.kubelet_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let name = rel
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("{field} {:?} has no last component", path.as_str()))
            })?
            .to_owned();
        let root_fd = sysfs::open_trusted_dir(root).map_err(|e| {
            Error::internal(format!("opening kubelet directory {}", root.display()), e)
        })?;
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let parent = if parent_rel.as_os_str().is_empty() {
            root_fd
        } else {
            sysfs::resolve_beneath(root_fd.as_fd(), parent_rel)
                .map_err(|e| path_error(field, path, e))?
        };
        Ok(Located {
            path: path.clone(),
            parent,
            name,
        })
    }

    fn leaf(&self, field: &str, at: &Located) -> Result<Leaf> {
        match sysfs::resolve_beneath(at.parent.as_fd(), Path::new(&at.name)) {
            Ok(fd) => {
                let info = sysfs::file_info(fd.as_fd())
                    .map_err(|e| Error::internal(format!("statx of {field}"), e))?;
                if info.mount_root {
                    Ok(Leaf::MountRoot { fd, id: info.id })
                } else {
                    Ok(Leaf::Plain {
                        fd,
                        is_dir: info.is_dir,
                    })
                }
            }
            Err(e) if e.errno == Errno::NOENT => Ok(Leaf::Missing),
            Err(e) => Err(path_error(field, &at.path, e)),
        }
    }

    fn check_node_capability(pool: &Pool, vol: &VolumeRecord, cap: &Capability) -> Result<()> {
        if cap.mode.is_multi_node() {
            return Err(Error::InvalidArgument(format!(
                "access mode {} is not supported: stowage volumes are local to one node",
                cap.mode.name()
            )));
        }
        if cap.is_block() != vol.block {
            return Err(Error::InvalidArgument(format!(
                "volume {} is a {} volume; the capability asks for {}",
                vol.id,
                if vol.block { "block" } else { "filesystem" },
                if cap.is_block() {
                    "block"
                } else {
                    "a filesystem"
                }
            )));
        }
        if let Access::Mount(m) = &cap.access {
            if !pool.backend().supports_fs_type(&m.fs_type) {
                return Err(Error::InvalidArgument(format!(
                    "volume {} has filesystem {:?}, not {:?}",
                    vol.id,
                    pool.backend().default_fs_type(),
                    m.fs_type
                )));
            }
        }
        Ok(())
    }

    /// Runs `mount` onto the located path unless a mount of the volume (`volume`) is already
    /// there, and records it: the intent (`mounting`, and whether the driver makes the
    /// directory) before anything changes on disk, `mounted` after. Anything at the path that
    /// is not a plain directory or our own mount is refused.
    #[allow(clippy::too_many_arguments)]
    fn mount_recorded(
        &self,
        field: &str,
        at: &Located,
        entry: Entry,
        volume: Mark,
        mut record: Publication,
        mount: impl FnOnce(BorrowedFd<'_>) -> Result<()>,
    ) -> Result<()> {
        let target = match self.leaf(field, at)? {
            Leaf::MountRoot { id, .. } if volume.matches(id) => None,
            Leaf::MountRoot { .. } => {
                return Err(Error::AlreadyExists(format!(
                    "{field} {:?} is already a mount point of something else",
                    at.path.as_str()
                )))
            }
            Leaf::Plain { fd, is_dir } if is_dir == (entry == Entry::Dir) => {
                record.state = PublicationState::Mounting;
                self.store.put_publication(&record)?;
                Some(fd)
            }
            Leaf::Plain { .. } => {
                return Err(Error::InvalidArgument(format!(
                    "{field} {:?} exists and is not a {}",
                    at.path.as_str(),
                    if entry == Entry::Dir {
                        "directory"
                    } else {
                        "regular file (a block volume is published onto a file)"
                    }
                )))
            }
            Leaf::Missing => {
                record.created_dir = true;
                record.state = PublicationState::Mounting;
                self.store.put_publication(&record)?;
                crate::crash::point("mount-after-intent");
                let made = match entry {
                    Entry::Dir => sysfs::mkdir_at(at.parent.as_fd(), &at.name, 0o750),
                    Entry::File => sysfs::create_file_at(at.parent.as_fd(), &at.name, 0o640),
                };
                match made {
                    Ok(()) => {}
                    Err(e) if e.errno == Errno::EXIST => {}
                    Err(e) => return Err(Error::internal(format!("creating {field}"), e)),
                }
                match self.leaf(field, at)? {
                    Leaf::Plain { fd, is_dir } if is_dir == (entry == Entry::Dir) => Some(fd),
                    _ => {
                        return Err(Error::Internal(format!(
                            "{field} {:?} changed while it was being created",
                            at.path.as_str()
                        )))
                    }
                }
            }
        };
        if let Some(target) = target {
            mount(target.as_fd()).map_err(|e| match e {
                Error::Internal(m) => {
                    Error::Internal(format!("mounting at {field} {:?}: {m}", at.path.as_str()))
                }
                other => other,
            })?;
            crate::crash::point("mount-after-mount");
        }
        record.state = PublicationState::Mounted;
        self.store.put_publication(&record)
    }

    /// Removes our mounts at the located path (stacked ones too), runs `release` (what the
    /// backend holds besides a staging mount), then removes the directory if we made it. A
    /// mount of anything else is left alone.
    #[allow(clippy::too_many_arguments)]
    fn unmount_recorded(
        &self,
        field: &str,
        at: &Located,
        entry: Entry,
        volume: Option<Mark>,
        record: Option<&Publication>,
        release: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if let Some(r) = record {
            let mut r = r.clone();
            r.state = PublicationState::Unmounting;
            self.store.put_publication(&r)?;
        }
        crate::crash::point("unmount-after-intent");
        // Each round unmounts one of our mounts; the loop ends when none is left on top.
        let mut cleared = false;
        for _ in 0..MAX_STACKED_MOUNTS {
            let leaf = match self.leaf(field, at) {
                Ok(leaf) => leaf,
                // Without a record the call only makes sure no mount of ours is left at the
                // path. A leaf that cannot be resolved safely (a symlink) is not a mount
                // point of ours: stowage never mounts there, and nothing is followed.
                Err(Error::InvalidArgument(_)) if record.is_none() => {
                    cleared = true;
                    break;
                }
                Err(e) => return Err(e),
            };
            match leaf {
                Leaf::MountRoot { fd, id } if volume.is_some_and(|m| m.matches(id)) => {
                    // The fd pins the mount (an unmount would be EBUSY while it is open):
                    // close it, then unmount by the path just checked, never following a
                    // final symlink. Only root on the host can change the path in between.
                    drop(fd);
                    match self.kernel.unmount(at.path.as_path()) {
                        Ok(()) => {}
                        Err(e) if e.errno == Errno::INVAL => {
                            cleared = true;
                            break;
                        }
                        Err(e) => {
                            return Err(Error::internal(
                                format!("unmounting {field} {:?}", at.path.as_str()),
                                e,
                            ))
                        }
                    }
                }
                Leaf::MountRoot { .. } => {
                    if record.is_some() {
                        return Err(Error::FailedPrecondition(format!(
                            "{field} {:?} has a mount that is not this volume's on top; not touching it",
                            at.path.as_str()
                        )));
                    }
                    cleared = true;
                    break;
                }
                Leaf::Plain { .. } | Leaf::Missing => {
                    cleared = true;
                    break;
                }
            }
        }
        if !cleared {
            return Err(Error::Internal(format!(
                "{field} {:?} still has more than {MAX_STACKED_MOUNTS} mounts of the volume",
                at.path.as_str()
            )));
        }
        crate::crash::point("unmount-after-unmount");
        release()?;
        if record.is_some_and(|r| r.created_dir) {
            let removed = match entry {
                Entry::Dir => sysfs::rmdir_at(at.parent.as_fd(), &at.name),
                Entry::File => sysfs::unlink_at(at.parent.as_fd(), &at.name),
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.errno == Errno::NOENT => {}
                Err(e) => {
                    tracing::warn!(path = %at.path.as_str(), error = %e, "left the directory in place")
                }
            }
        }
        if let Some(r) = record {
            self.store.remove_publication(&r.path)?;
        }
        Ok(())
    }

    /// NodeStageVolume: the pool's backend mounts the volume at the staging path (a `dir`
    /// pool binds the volume's directory).
    pub fn node_stage(&self, req: NodeStage) -> Result<()> {
        let (mut vol, pool) = self.ready_volume(&req.volume)?;
        let _guard = self.claim(&vol.id)?;
        Self::check_node_capability(&pool, &vol, &req.capability)?;
        let at = self.locate("staging_target_path", &req.staging)?;
        let flags = match &req.capability.access {
            Access::Mount(m) => flags_string(&m.flags),
            Access::Block => String::new(),
        };
        let existing = self.store.publication_at(req.staging.as_str())?;
        if let Some(p) = &existing {
            if p.volume_id != vol.id || p.kind != PublicationKind::Stage {
                return Err(Error::AlreadyExists(format!(
                    "staging_target_path {:?} is already used by volume {}",
                    req.staging.as_str(),
                    p.volume_id
                )));
            }
            if p.access_mode != req.capability.mode.to_wire() as i32 || p.flags != flags {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already staged at {:?} with a different capability",
                    vol.id,
                    req.staging.as_str()
                )));
            }
        }
        // What the volume keeps for its life (its filesystem, its device's block size) is
        // recorded before the device is configured or formatted with it.
        if let Some(layout) = pool.backend().prepare_stage(&vol, &req.capability.access)? {
            self.store
                .set_volume_layout(&vol.id, layout.fs_type.as_deref(), layout.block_size)?;
            vol.fs_type = layout.fs_type;
            vol.block_size = layout.block_size;
        }
        // A device-backed volume not attached yet has nothing mounted anywhere.
        let mark = self.mark_of(&vol)?.unwrap_or(UNMOUNTED);
        let record = Publication {
            path: req.staging.as_str().to_owned(),
            volume_id: vol.id.clone(),
            kind: PublicationKind::Stage,
            state: PublicationState::Mounting,
            read_only: false,
            access_mode: req.capability.mode.to_wire() as i32,
            flags,
            created_dir: existing.as_ref().is_some_and(|p| p.created_dir),
            staging_path: None,
        };
        let how = StageRequest {
            access: &req.capability.access,
            attrs: MountAttrs {
                nosuid: true,
                nodev: true,
                ..Default::default()
            },
            mount_point: req.staging.as_path(),
        };
        self.mount_recorded(
            "staging_target_path",
            &at,
            Entry::Dir,
            mark,
            record,
            |target| pool.backend().stage(&vol, target, &how),
        )
    }

    /// NodeUnstageVolume: unmount the staging path. Not staged there is OK.
    pub fn node_unstage(&self, req: NodeUnstage) -> Result<()> {
        let vol = self.known_volume(&req.volume)?;
        let id = &vol.id;
        let _guard = self.claim(id)?;
        let record = self
            .recorded_at(&req.staging)?
            .filter(|p| p.volume_id == *id && p.kind == PublicationKind::Stage);
        let publications = self.store.publications_of(id)?;
        let users: Vec<&str> = publications
            .iter()
            .filter(|p| p.staging_path.as_deref() == Some(req.staging.as_str()))
            .map(|p| p.path.as_str())
            .collect();
        if !users.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {id} is still published from {:?} at {}; unpublish it first",
                req.staging.as_str(),
                users.join(", ")
            )));
        }
        let Some(at) =
            self.locate_for_removal("staging_target_path", &req.staging, record.as_ref())?
        else {
            return Ok(());
        };
        let mark = self.mark_of(&vol)?;
        self.unmount_recorded(
            "staging_target_path",
            &at,
            Entry::Dir,
            mark,
            record.as_ref(),
            || self.release_staging(&vol),
        )
    }

    /// NodePublishVolume: bind the staged volume at the target path.
    pub fn node_publish(&self, req: NodePublish) -> Result<()> {
        let (vol, pool) = self.ready_volume(&req.volume)?;
        let _guard = self.claim(&vol.id)?;
        Self::check_node_capability(&pool, &vol, &req.capability)?;
        let read_only = req.readonly
            || req.capability.mode.is_read_only()
            || matches!(&req.capability.access, Access::Mount(m) if m.flags.contains(&MountFlag::ReadOnly));
        let flags = match &req.capability.access {
            Access::Mount(m) => flags_string(&m.flags),
            Access::Block => String::new(),
        };
        let staging = self.locate("staging_target_path", &req.staging)?;
        let target = self.locate("target_path", &req.target)?;
        let staged = self
            .store
            .publication_at(req.staging.as_str())?
            .filter(|p| {
                p.volume_id == vol.id
                    && p.kind == PublicationKind::Stage
                    && p.state == PublicationState::Mounted
            });
        if staged.is_none() {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is not staged at {:?}; call NodeStageVolume first",
                vol.id,
                req.staging.as_str()
            )));
        }
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "the device of volume {} is not attached; stage the volume again",
                vol.id
            ))
        };
        let mark = match pool.backend().mark(&vol) {
            Err(Error::NotFound(_)) if vol.block => return Err(not_staged()),
            other => other?,
        };
        let staged = match self.leaf("staging_target_path", &staging)? {
            Leaf::MountRoot { fd, id } if mark.matches(id) => fd,
            // A block volume's staging holds no mount: the attached device is the stage.
            Leaf::Plain { fd, is_dir: true } if vol.block => fd,
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "the staging mount of volume {} at {:?} is missing; stage the volume again",
                    vol.id,
                    req.staging.as_str()
                )))
            }
        };
        let mode = req.capability.mode.to_wire() as i32;
        let existing = self.store.publication_at(req.target.as_str())?;
        if let Some(p) = &existing {
            if p.volume_id != vol.id || p.kind != PublicationKind::Publish {
                return Err(Error::AlreadyExists(format!(
                    "target_path {:?} is already used by volume {}",
                    req.target.as_str(),
                    p.volume_id
                )));
            }
            if p.read_only != read_only
                || p.access_mode != mode
                || p.flags != flags
                || p.staging_path.as_deref() != Some(req.staging.as_str())
            {
                return Err(Error::AlreadyExists(format!(
                    "volume {} is already published at {:?} with different arguments",
                    vol.id,
                    req.target.as_str()
                )));
            }
        } else {
            let single_writer = |m: i32| m == AccessMode::SingleNodeSingleWriter.to_wire() as i32;
            let others: Vec<Publication> = self
                .store
                .publications_of(&vol.id)?
                .into_iter()
                .filter(|p| p.kind == PublicationKind::Publish && p.path != req.target.as_str())
                .collect();
            if let Some(other) = others
                .iter()
                .find(|p| single_writer(mode) || single_writer(p.access_mode))
            {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is SINGLE_NODE_SINGLE_WRITER and already published at {:?}",
                    vol.id, other.path
                )));
            }
        }
        let record = Publication {
            path: req.target.as_str().to_owned(),
            volume_id: vol.id.clone(),
            kind: PublicationKind::Publish,
            state: PublicationState::Mounting,
            read_only,
            access_mode: mode,
            flags,
            created_dir: existing.as_ref().is_some_and(|p| p.created_dir),
            staging_path: Some(req.staging.as_str().to_owned()),
        };
        if let Access::Mount(m) = &req.capability.access {
            if let Some(gid) = m.group {
                // fsGroup: the volume's own directories and files get the group, from the
                // staging mount's root, fd-relative (see set_group_tree for what is left
                // alone); skipped once the root carries it.
                let stats = sysfs::set_group_tree(staged.as_fd(), gid, read_only).map_err(|e| {
                    Error::internal(format!("giving volume {} the group {gid}", vol.id), e)
                })?;
                if !stats.root_matched {
                    tracing::info!(
                        volume = %vol.id, gid, changed = stats.changed, symlinks = stats.symlinks,
                        linked = stats.linked, specials = stats.specials, mounts = stats.mounts,
                        "volume_mount_group applied"
                    );
                }
            }
        }
        let source = pool.backend().publish_source(&vol, staged)?;
        let mut attrs = attrs_for(&req.capability, read_only);
        // The pod must be able to open the device node: no nodev on that one bind.
        attrs.nodev = !vol.block;
        let entry = Entry::of(&vol, PublicationKind::Publish);
        self.mount_recorded("target_path", &target, entry, mark, record, |target| {
            self.kernel
                .bind_mount(source.as_fd(), target, attrs)
                .map_err(|e| Error::internal("bind mount", e))
        })
    }

    /// NodeUnpublishVolume: unmount the target and remove the directory if we made it. Not
    /// published there is OK.
    pub fn node_unpublish(&self, req: NodeUnpublish) -> Result<()> {
        let vol = self.known_volume(&req.volume)?;
        let id = &vol.id;
        let _guard = self.claim(id)?;
        let record = self
            .recorded_at(&req.target)?
            .filter(|p| p.volume_id == *id && p.kind == PublicationKind::Publish);
        let Some(at) = self.locate_for_removal("target_path", &req.target, record.as_ref())? else {
            return Ok(());
        };
        let mark = self.mark_of(&vol)?;
        let entry = Entry::of(&vol, PublicationKind::Publish);
        self.unmount_recorded("target_path", &at, entry, mark, record.as_ref(), || Ok(()))
    }

    /// The publication recorded at a path, if any. Records are only ever made at clean
    /// absolute paths, so any other path has none.
    fn recorded_at(&self, path: &ExistingPath) -> Result<Option<Publication>> {
        match path {
            ExistingPath::Host(p) => self.store.publication_at(p.as_str()),
            ExistingPath::Nowhere { .. } => Ok(None),
        }
    }

    /// Locates a path to unmount; `None` says there is nothing to do there.
    ///
    /// When its parent directory is gone nothing can be mounted there, so the record (if any)
    /// is dropped. Without a record, a path stowage could never have mounted at (not a clean
    /// absolute path, outside the kubelet directories, through a symlink) holds nothing of
    /// this volume: the spec's answer for "not staged/published there" is OK. With a record,
    /// a path that cannot be checked stays an error and the record stays, so that
    /// DeleteVolume keeps refusing a volume that may still be mounted.
    fn locate_for_removal(
        &self,
        field: &str,
        path: &ExistingPath,
        record: Option<&Publication>,
    ) -> Result<Option<Located>> {
        let ExistingPath::Host(path) = path else {
            return Ok(None);
        };
        match self.locate(field, path) {
            Ok(at) => Ok(Some(at)),
            Err(Error::NotFound(_)) => {
                if let Some(r) = record {
                    self.store.remove_publication(&r.path)?;
                }
                Ok(None)
            }
            Err(Error::InvalidArgument(_)) if record.is_none() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A volume id the store knows (in any state), or NOT_FOUND.
    fn known_volume(&self, volume: &VolumeRef) -> Result<VolumeRecord> {
        let id = volume.require()?;
        self.store
            .volume_by_id(id)?
            .ok_or_else(|| not_found(id.as_str()))
    }

    /// How a recorded volume's mounts are recognised, or None when its pool or its backing
    /// storage is gone (nothing of it can be mounted then).
    fn mark_of(&self, vol: &VolumeRecord) -> Result<Option<Mark>> {
        let Some(pool) = self.pools.get(&vol.pool) else {
            return Ok(None);
        };
        match pool.backend().mark(vol) {
            Ok(mark) => Ok(Some(mark)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The root of the filesystem mount a stage publication `p` of `vol` made, when it is
    /// still there and still the volume's (its root matches the mark); None otherwise, and
    /// for publish records (the stage is the one mount of the filesystem that counts).
    pub(crate) fn checked_stage_root(
        &self,
        vol: &VolumeRecord,
        p: &Publication,
    ) -> Result<Option<OwnedFd>> {
        if p.kind != PublicationKind::Stage || p.state != PublicationState::Mounted {
            return Ok(None);
        }
        let Some(mark) = self.mark_of(vol)? else {
            return Ok(None);
        };
        let Ok(path) = HostPath::parse("staging_target_path", &p.path) else {
            return Ok(None);
        };
        let at = match self.locate("staging_target_path", &path) {
            Ok(at) => at,
            Err(Error::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        match self.leaf("staging_target_path", &at)? {
            Leaf::MountRoot { fd, id } if mark.matches(id) => Ok(Some(fd)),
            _ => Ok(None),
        }
    }

    /// After a staging path of the volume was cleared: what its backend still holds for it
    /// is released. Nothing to do when its pool is gone.
    fn release_staging(&self, vol: &VolumeRecord) -> Result<()> {
        match self.pools.get(&vol.pool) {
            Some(pool) => pool.backend().unstage(vol),
            None => Ok(()),
        }
    }

    /// NodeGetVolumeStats: usage as the volume's capacity enforcement sees it, and its
    /// condition.
    pub fn node_stats(&self, req: NodeStats) -> Result<csi::NodeGetVolumeStatsResponse> {
        let (vol, pool) = self.ready_volume(&req.volume)?;
        // A path where this volume is not staged or published is NOT_FOUND (the spec's "volume
        // does not exist at the specified path"), whatever its shape: relative, outside the
        // kubelet directories, or a directory that does not exist.
        let path = match req.path {
            ExistingPath::Host(path) => path,
            ExistingPath::Nowhere { path, why } => {
                return Err(Error::NotFound(format!(
                    "volume {} is not staged or published at volume_path {path:?}: {why}",
                    vol.id
                )))
            }
        };
        let record = self
            .store
            .publication_at(path.as_str())?
            .filter(|p| p.volume_id == vol.id)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "volume_path {:?} is not a staging or publish path of volume {}",
                    path.as_str(),
                    vol.id
                ))
            })?;
        // A stage or publish that failed half way (or is being undone) did not make the
        // volume available at the path, whatever it left there.
        if record.state != PublicationState::Mounted {
            return Err(Error::NotFound(format!(
                "volume {} is not staged or published at volume_path {:?}: its {} there has not finished",
                vol.id,
                path.as_str(),
                match record.kind {
                    PublicationKind::Stage => "NodeStageVolume",
                    PublicationKind::Publish => "NodePublishVolume",
                }
            )));
        }
        let abnormal = |message: String| csi::NodeGetVolumeStatsResponse {
            usage: vec![],
            volume_condition: Some(csi::VolumeCondition {
                abnormal: true,
                message,
            }),
        };
        let mark = match pool.backend().mark(&vol) {
            Ok(m) => m,
            Err(Error::NotFound(m)) => return Ok(abnormal(m)),
            Err(e) => return Err(e),
        };
        let at = self.locate("volume_path", &path)?;
        let mounted = match self.leaf("volume_path", &at)? {
            Leaf::MountRoot { fd, id } if mark.matches(id) => fd,
            // A staged block volume: its device is attached (the mark says so), nothing is
            // mounted at the staging path.
            Leaf::Plain { fd, is_dir: true }
                if vol.block && record.kind == PublicationKind::Stage =>
            {
                fd
            }
            _ => {
                return Ok(abnormal(format!(
                    "the volume is not mounted at {:?} any more",
                    path.as_str()
                )))
            }
        };
        let read_only = if vol.block {
            false
        } else {
            match sysfs::fs_space(mounted.as_fd()) {
                Ok(space) => space.read_only,
                Err(e) if e.errno == Errno::IO => {
                    return Ok(abnormal(format!("the volume's filesystem fails: {e}")))
                }
                Err(e) => return Err(Error::internal("statvfs of volume_path", e)),
            }
        };
        let stats = match pool.backend().stats(&vol, mounted.as_fd()) {
            Ok(stats) => stats,
            Err(Error::Internal(m)) | Err(Error::NotFound(m)) => return Ok(abnormal(m)),
            Err(e) => return Err(e),
        };
        let mut condition = if read_only && !record.read_only {
            csi::VolumeCondition {
                abnormal: true,
                message: "the volume's filesystem is read-only".to_owned(),
            }
        } else {
            let c = pool.backend().condition(&vol);
            csi::VolumeCondition {
                abnormal: c.abnormal,
                message: c.message,
            }
        };
        // How current the figures are (an earlier walk's, and how old) is not a fault of
        // the volume: the spec's `abnormal` is about the volume being usable, so a stale
        // figure only adds to the message.
        if let Some(note) = stats.note {
            condition.message = format!("{}; {note}", condition.message);
        }
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        // No figure yet (a first walk still in progress): no usage rather than a partial one.
        let usage = stats.usage.map_or_else(Vec::new, |usage| {
            vec![
                csi::VolumeUsage {
                    available: n(usage.bytes_available),
                    total: n(usage.bytes_total),
                    used: n(usage.bytes_used),
                    unit: csi::volume_usage::Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: n(usage.inodes_available),
                    total: n(usage.inodes_total),
                    used: n(usage.inodes_used),
                    unit: csi::volume_usage::Unit::Inodes as i32,
                },
            ]
        });
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    /// NodeExpandVolume: the volume must be staged or published at `volume_path` (NOT_FOUND
    /// otherwise). A capacity above the recorded one is recorded first (the controller step
    /// may not have reached this node) and the storage grown; then the backend makes the
    /// device and the mounted filesystem follow. Idempotent.
    pub fn node_expand(&self, req: NodeExpand) -> Result<csi::NodeExpandVolumeResponse> {
        let (mut vol, pool) = self.ready_volume(&req.volume)?;
        let _guard = self.claim(&vol.id)?;
        if let Some(cap) = &req.capability {
            Self::check_node_capability(&pool, &vol, cap)?;
        }
        let not_there = |why: String| {
            Error::NotFound(format!(
                "volume {} is not staged or published at volume_path {:?}: {why}",
                vol.id,
                req.path.as_str()
            ))
        };
        let path = match &req.path {
            ExistingPath::Host(path) => path.clone(),
            ExistingPath::Nowhere { why, .. } => return Err(not_there(why.clone())),
        };
        let record = self
            .store
            .publication_at(path.as_str())?
            .filter(|p| p.volume_id == vol.id && p.state == PublicationState::Mounted)
            .ok_or_else(|| not_there("no staging or publication of it is recorded there".into()))?;
        let mark = match pool.backend().mark(&vol) {
            Ok(mark) => mark,
            Err(Error::NotFound(m)) => return Err(not_there(m)),
            Err(e) => return Err(e),
        };
        let at = self.locate("volume_path", &path)?;
        match self.leaf("volume_path", &at)? {
            Leaf::MountRoot { id, .. } if mark.matches(id) => {}
            Leaf::Plain { is_dir: true, .. }
                if vol.block && record.kind == PublicationKind::Stage => {}
            _ => return Err(not_there("its mount is not there".into())),
        }
        let want = req
            .capacity
            .as_ref()
            .map_or(vol.capacity, |r| r.choose(vol.capacity, SIZE_GRANULE));
        if want > vol.capacity {
            pool.check_fits(want)?;
            self.store.set_volume_capacity(&vol.id, want)?;
            crate::crash::point("node-expand-after-intent");
            pool.backend().expand(&vol, want)?;
            vol.capacity = want;
        }
        let size = pool.backend().node_expand(&vol, path.as_path())?;
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        })
    }

    /// At start: the kernel is the truth. A record whose mount is gone (reboot, or a crash
    /// before the mount) is dropped, with the directory we made; a record left `mounting`
    /// whose mount exists is finished; one left `unmounting` is finished.
    pub(crate) fn reconcile_publications(&self) -> Result<()> {
        let records = self.store.all_publications()?;
        // Publish records first: unstaging must not run under a live publication.
        let (publish, stage): (Vec<_>, Vec<_>) = records
            .into_iter()
            .partition(|p| p.kind == PublicationKind::Publish);
        for record in publish.into_iter().chain(stage) {
            let field = match record.kind {
                PublicationKind::Stage => "staging_target_path",
                PublicationKind::Publish => "target_path",
            };
            let outcome = (|| -> Result<&'static str> {
                let path = HostPath::parse(field, &record.path)?;
                let at = self.locate(field, &path)?;
                let vol = self.store.volume_by_id(&record.volume_id)?;
                let mark = match &vol {
                    Some(vol) => self.mark_of(vol)?,
                    None => None,
                };
                let mounted = match self.leaf(field, &at)? {
                    Leaf::MountRoot { id, .. } => mark.is_some_and(|m| m.matches(id)),
                    // A staged block volume holds no mount: its attached device (the mark
                    // exists only while it is) is the stage, and a publication may use it.
                    Leaf::Plain { is_dir: true, .. } => {
                        record.kind == PublicationKind::Stage
                            && vol.as_ref().is_some_and(|v| v.block)
                            && mark.is_some()
                    }
                    _ => false,
                };
                match (record.state, mounted) {
                    (PublicationState::Mounted, true) => Ok("kept"),
                    (PublicationState::Mounting, true) => {
                        let mut r = record.clone();
                        r.state = PublicationState::Mounted;
                        self.store.put_publication(&r)?;
                        Ok("finished mounting")
                    }
                    (PublicationState::Unmounting, _) | (_, false) => {
                        let release = || match (&vol, record.kind) {
                            (Some(vol), PublicationKind::Stage) => self.release_staging(vol),
                            _ => Ok(()),
                        };
                        let entry = match &vol {
                            Some(vol) => Entry::of(vol, record.kind),
                            None => Entry::Dir,
                        };
                        self.unmount_recorded(field, &at, entry, mark, Some(&record), release)?;
                        Ok("cleaned")
                    }
                }
            })();
            match outcome {
                Ok("kept") => {}
                Ok(what) => {
                    tracing::info!(path = %record.path, volume = %record.volume_id, what, "reconciled publication")
                }
                // Keep what cannot be checked (a changed --kubelet-dir, an unreadable path):
                // dropping it would lift DeleteVolume's in-use protection of a live mount.
                Err(e) => tracing::warn!(
                    path = %record.path, volume = %record.volume_id, error = %e,
                    "publication could not be checked against the kernel; its record is kept"
                ),
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Driver {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Node,
            Cost::Short,
            "NodeStageVolume",
            &subject,
            move |e| {
                let mut req = req;
                let static_id = e.static_volume_for_stage(&req.volume_id, &req.volume_context)?;
                if let Some(id) = &static_id {
                    req.volume_id = id.to_string();
                }
                let staged = NodeStage::try_from(&req).and_then(|r| e.node_stage(r));
                if let (Err(_), Some(id)) = (&staged, &static_id) {
                    // A refused static path keeps no record behind.
                    e.forget_failed_static_stage(id)?;
                }
                staged?;
                Ok(csi::NodeStageVolumeResponse {})
            },
        )
        .await
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Node,
            Cost::Short,
            "NodeUnstageVolume",
            &subject,
            move |e| {
                let mut req = req;
                match e.static_handle_at(
                    &req.volume_id,
                    "staging_target_path",
                    &req.staging_target_path,
                )? {
                    HandleAt::NotStatic => e.node_unstage(NodeUnstage::try_from(&req)?)?,
                    HandleAt::Nothing => {}
                    HandleAt::Volume(id) => {
                        req.volume_id = id.to_string();
                        e.node_unstage(NodeUnstage::try_from(&req)?)?;
                        e.forget_static_if_unused(&id)?;
                    }
                }
                Ok(csi::NodeUnstageVolumeResponse {})
            },
        )
        .await
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Node,
            Cost::Short,
            "NodePublishVolume",
            &subject,
            move |e| {
                if stowage_core::request::is_ephemeral(&req) {
                    e.ephemeral_publish(stowage_core::request::EphemeralPublish::try_from(&req)?)?;
                } else if crate::statics::is_static(&req.volume_id) {
                    let id = e.static_volume_at(
                        &req.volume_id,
                        "staging_target_path",
                        &req.staging_target_path,
                    )?;
                    let mut req = req;
                    if let Some(id) = id {
                        req.volume_id = id.to_string();
                    }
                    e.node_publish(NodePublish::try_from(&req)?)?;
                } else {
                    e.node_publish(NodePublish::try_from(&req)?)?;
                }
                Ok(csi::NodePublishVolumeResponse {})
            },
        )
        .await
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Node,
            Cost::Short,
            "NodeUnpublishVolume",
            &subject,
            move |e| {
                // The kubelet names an ephemeral volume by its own handle.
                match e.ephemeral_volume(&req.volume_id)? {
                    Some(vol) => e.ephemeral_unpublish(
                        &vol,
                        ExistingPath::parse("target_path", &req.target_path)?,
                    )?,
                    // A retry after the ephemeral volume was already removed: done.
                    None if e.ephemeral_gone(&req.volume_id, &req.target_path)? => {}
                    None => {
                        match e.static_handle_at(&req.volume_id, "target_path", &req.target_path)? {
                            HandleAt::NotStatic => {
                                e.node_unpublish(NodeUnpublish::try_from(&req)?)?
                            }
                            HandleAt::Nothing => {}
                            HandleAt::Volume(id) => {
                                let mut req = req;
                                req.volume_id = id.to_string();
                                e.node_unpublish(NodeUnpublish::try_from(&req)?)?;
                            }
                        }
                    }
                }
                Ok(csi::NodeUnpublishVolumeResponse {})
            },
        )
        .await
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Node,
            Cost::Blocking,
            "NodeGetVolumeStats",
            &subject,
            move |e| {
                let mut req = req;
                if let Some(vol) = e.ephemeral_volume(&req.volume_id)? {
                    req.volume_id = vol.id.to_string();
                } else if let Some(id) =
                    e.static_volume_at(&req.volume_id, "volume_path", &req.volume_path)?
                {
                    req.volume_id = id.to_string();
                }
                e.node_stats(NodeStats::try_from(&req)?)
            },
        )
        .await
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let subject = req.volume_id.clone();
        self.call(
            Service::Node,
            Cost::Blocking,
            "NodeExpandVolume",
            &subject,
            move |e| e.node_expand(NodeExpand::try_from(&req)?),
        )
        .await
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        self.quiet(Some(Service::Node), "NodeGetCapabilities")?;
        let capabilities = [
            NodeCap::StageUnstageVolume,
            NodeCap::GetVolumeStats,
            NodeCap::VolumeCondition,
            NodeCap::SingleNodeMultiWriter,
            NodeCap::ExpandVolume,
            NodeCap::VolumeMountGroup,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(
                csi::node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        self.quiet(Some(Service::Node), "NodeGetInfo")?;
        let engine: &Arc<Engine> = &self.engine;
        let identity = engine.identity();
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: identity.node_id.clone(),
            max_volumes_per_node: engine.max_volumes_per_node.unwrap_or(0),
            accessible_topology: Some(csi::Topology {
                segments: identity.segments().into_iter().collect(),
            }),
        }))
    }
}
