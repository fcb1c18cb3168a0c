//! A recording [`Kernel`] for tests: remembers every call in order and can be told to fail.
//! It keeps just enough state (project ids, limits, a mount table, loop devices) to answer
//! consistently.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustix::fs::{AtFlags, StatxFlags, CWD};
use rustix::io::Errno;

use crate::btrfs::{qgroup_name, Qgroup, QuotaMode, TOP_LEVEL_SUBVOLUME};
use crate::fs::{file_info, InodeId};
use crate::{
    blockfs, FsKind, Kernel, LoopDevice, LoopOptions, MountAttrs, QuotaSupport, QuotaUsage,
    SysError, SysResult, ToolError, ToolFailure,
};

/// One call made to a [`FakeKernel`], with fds turned into the inodes they referred to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelCall {
    QuotaSupport,
    SetProjectId {
        dir: InodeId,
        project: u32,
    },
    ProjectId {
        dir: InodeId,
    },
    SetProjectLimit {
        project: u32,
        bytes: u64,
    },
    ProjectUsage {
        project: u32,
    },
    BindMount {
        source: InodeId,
        target: InodeId,
        attrs: MountAttrs,
    },
    Unmount {
        target: PathBuf,
    },
    AttachLoop {
        image: InodeId,
        options: LoopOptions,
    },
    FindLoop {
        image: InodeId,
    },
    DetachLoop {
        image: InodeId,
    },
    RefreshLoopCapacity {
        number: u32,
    },
    DeviceSize {
        number: u32,
    },
    MountDevice {
        number: u32,
        kind: FsKind,
        options: Vec<String>,
        target: InodeId,
        attrs: MountAttrs,
    },
    MakeFs {
        number: u32,
        kind: FsKind,
    },
    GrowFs {
        number: u32,
        kind: FsKind,
        mount_point: PathBuf,
    },
    BtrfsCreateSubvolume {
        dir: InodeId,
        name: String,
    },
    BtrfsSnapshot {
        dir: InodeId,
        name: String,
        source: InodeId,
        readonly: bool,
    },
    BtrfsDestroySubvolume {
        dir: InodeId,
        name: String,
    },
    BtrfsDestroySubvolumeId {
        subvolume: u64,
    },
    BtrfsSubvolumeId {
        fd: InodeId,
    },
    BtrfsChildSubvolumes {
        parent: u64,
    },
    BtrfsQuotaMode,
    BtrfsEnableQuota {
        simple: bool,
    },
    BtrfsQgroupCreate {
        qgroup: u64,
    },
    BtrfsQgroupRemove {
        qgroup: u64,
    },
    BtrfsQgroupAssign {
        member: u64,
        parent: u64,
        assign: bool,
    },
    BtrfsQgroupLimit {
        qgroup: u64,
        bytes: u64,
    },
    BtrfsQgroups,
    BtrfsCommit,
    /// `fs` is the inode of the fd passed; the fake freezes by its device.
    FreezeFs {
        fs: InodeId,
    },
    ThawFs {
        fs: InodeId,
    },
}

/// The operation names [`FakeKernel::fail_next`] accepts: the [`Kernel`] method names that
/// return a `SysResult`.
/// `make_fs` and `grow_fs` fail with a [`ToolError`] whose failure is
/// `ToolFailure::Spawn(errno)`.
const FAILABLE: [&str; 30] = [
    "set_project_id",
    "project_id",
    "set_project_limit",
    "project_usage",
    "bind_mount",
    "unmount",
    "attach_loop",
    "find_loop",
    "detach_loop",
    "refresh_loop_capacity",
    "device_size",
    "mount_device",
    "make_fs",
    "grow_fs",
    "btrfs_create_subvolume",
    "btrfs_snapshot",
    "btrfs_destroy_subvolume",
    "btrfs_destroy_subvolume_id",
    "btrfs_subvolume_id",
    "btrfs_child_subvolumes",
    "btrfs_quota_mode",
    "btrfs_enable_quota",
    "btrfs_qgroup_create",
    "btrfs_qgroup_remove",
    "btrfs_qgroup_assign",
    "btrfs_qgroup_limit",
    "btrfs_qgroups",
    "btrfs_commit",
    "freeze_fs",
    "thaw_fs",
];

/// A [`Kernel`] that performs nothing privileged.
///
/// - Every call is recorded (also those made to fail) and listed by [`FakeKernel::calls`].
/// - [`FakeKernel::fail_next`] makes the next N calls of one method fail with an errno.
/// - Project ids are kept per inode, limits and usage per project, so reads answer what was
///   written (unknown ones read as 0, like the kernel's default project and empty quota).
/// - `bind_mount` mounts nothing; it adds (target inode, source inode, attrs) to a table.
///   `unmount(path)` finds the entry by the inode `path` names now (statx, no follow) —
///   since nothing was really mounted, that is still the target directory's own inode — and
///   removes the most recent one; none is EINVAL, like the kernel's "not a mount point".
/// - Loop devices are a table (number, image inode, size, options); numbers are the lowest
///   free. A [`LoopDevice`] it hands out holds a duplicate of the *image* fd, so
///   [`blockfs::probe`] on it reads the image; `make_fs` writes the filesystem's magic
///   number there, so a later probe recognises it. `mount_device` adds to the same mount
///   table as `bind_mount` (source: the image inode), and `detach_loop` of an image with
///   such a mount is EBUSY, like a device held by a mount. The device size is the image's
///   size at attach or at the last `refresh_loop_capacity`.
/// - btrfs subvolumes are plain directories made with mkdirat, known by inode, with ids
///   from 256 up; a subvolume's parent is the subvolume whose root directory it was made in
///   (top level, 5, otherwise). With quotas on, a new subvolume gets its qgroup, as the
///   kernel does; under simple quotas that qgroup is made a member of the qgroups its parent
///   subvolume's qgroup is a member of (the kernel's auto-inheritance, Linux 6.7 and later;
///   full qgroups do not do it). A destroyed subvolume keeps its qgroup until removed.
///   Removing the qgroup of a live subvolume, or one with members, is EBUSY, as on Linux 6.8
///   and later; so is removing a level-0 qgroup that still references bytes (a destroyed
///   subvolume the kernel's cleaner has not dropped yet: [`FakeKernel::set_qgroup_referenced`]
///   to 0 plays the drop), as on every kernel with the fix that forbids deleting a live
///   subvolume's qgroup (stable 5.4 and later, 6.1 included). Counters are what the test sets ([`FakeKernel::set_qgroup_referenced`]); a
///   higher level's are not summed. The quota mode starts `Off`.
/// - Freezing marks the filesystem (the device of the fd's inode) frozen; nothing blocks.
///   Freezing a frozen one is EBUSY and thawing one not frozen answers `false`, as the
///   kernel does.
#[derive(Debug, Default)]
pub struct FakeKernel {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<KernelCall>,
    /// None means the default, Unavailable("fake").
    quota_support: Option<QuotaSupport>,
    failures: HashMap<&'static str, (Errno, usize)>,
    project_ids: HashMap<InodeId, u32>,
    limits: HashMap<u32, u64>,
    usage: HashMap<u32, QuotaUsage>,
    /// (target, source, attrs), oldest first.
    mounts: Vec<(InodeId, InodeId, MountAttrs)>,
    loops: Vec<FakeLoop>,
    refuse_direct_io: bool,
    subvolumes: Vec<FakeSubvolume>,
    /// None means Off.
    btrfs_quota: Option<QuotaMode>,
    qgroups: Vec<Qgroup>,
    /// Devices of the frozen filesystems.
    frozen: Vec<u64>,
}

/// One fake btrfs subvolume: a directory `name` in `dir`.
#[derive(Debug)]
struct FakeSubvolume {
    id: u64,
    root: InodeId,
    parent: u64,
    dir: OwnedFd,
    name: String,
}

/// One attached fake loop device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeLoop {
    pub number: u32,
    pub image: InodeId,
    /// What [`Kernel::device_size`] answers.
    pub size: u64,
    pub options: LoopOptions,
}

impl State {
    /// Consumes one pending failure of `op`, if any.
    fn take_failure(&mut self, op: &'static str) -> SysResult<()> {
        let Some((errno, left)) = self.failures.get_mut(op) else {
            return Ok(());
        };
        let errno = *errno;
        *left -= 1;
        if *left == 0 {
            self.failures.remove(op);
        }
        Err(SysError::new(
            op,
            "injected by FakeKernel::fail_next",
            errno,
        ))
    }
}

impl FakeKernel {
    /// Registers a new (empty) subvolume `name` in `dir`, with its qgroup when quotas are on.
    fn make_subvolume(
        mut state: MutexGuard<'_, State>,
        dir: BorrowedFd<'_>,
        name: &str,
    ) -> SysResult<()> {
        let dir_id = inode_of(dir)?;
        crate::fs::mkdir_at(dir, name, 0o755)?;
        let root = crate::fs::entry_info(dir, name)?.id;
        let id = state
            .subvolumes
            .iter()
            .map(|s| s.id + 1)
            .max()
            .unwrap_or(256);
        let parent = state
            .subvolumes
            .iter()
            .find(|s| s.root == dir_id)
            .map_or(TOP_LEVEL_SUBVOLUME, |s| s.id);
        let dir = rustix::io::fcntl_dupfd_cloexec(dir, 0)
            .map_err(|e| SysError::new("fcntl", "F_DUPFD_CLOEXEC (fake subvolume)", e))?;
        state.subvolumes.push(FakeSubvolume {
            id,
            root,
            parent,
            dir,
            name: name.to_owned(),
        });
        if state.btrfs_quota.is_some_and(|m| m != QuotaMode::Off)
            && state.qgroups.iter().all(|q| q.id != id)
        {
            let parents = if state.btrfs_quota == Some(QuotaMode::Simple) {
                state
                    .qgroups
                    .iter()
                    .find(|q| q.id == parent)
                    .map(|q| q.parents.clone())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            state.qgroups.push(Qgroup {
                id,
                parents,
                ..Qgroup::default()
            });
        }
        Ok(())
    }

    /// A fake with no calls, no failures, and quota support Unavailable("fake").
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves consistent data behind (every
        // update is a single step), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<KernelCall> {
        self.state().calls.clone()
    }

    /// Forgets the recorded calls (not the state: ids, limits, mounts, failures stay).
    pub fn clear(&self) {
        self.state().calls.clear();
    }

    /// What [`Kernel::quota_support`] answers from now on.
    pub fn set_quota_support(&self, support: QuotaSupport) {
        self.state().quota_support = Some(support);
    }

    /// Makes the next `times` calls of `op` (a [`Kernel`] method name, e.g.
    /// `"set_project_limit"`) fail with `errno`, replacing any failure pending for `op`.
    /// `times == 0` cancels it.
    ///
    /// # Panics
    /// If `op` is not a method that returns a `SysResult`: a typo would otherwise make a test
    /// silently check nothing.
    pub fn fail_next(&self, op: &'static str, errno: Errno, times: usize) {
        assert!(
            FAILABLE.contains(&op),
            "FakeKernel::fail_next: unknown op {op:?}, expected one of {FAILABLE:?}"
        );
        let mut state = self.state();
        if times == 0 {
            state.failures.remove(op);
        } else {
            state.failures.insert(op, (errno, times));
        }
    }

    /// Sets the usage [`Kernel::project_usage`] reports for `project`. Its `bytes_limit` is
    /// replaced by the limit set with [`Kernel::set_project_limit`], if one was.
    pub fn set_usage(&self, project: u32, usage: QuotaUsage) {
        self.state().usage.insert(project, usage);
    }

    /// The hard limit last set for `project` (None if never set; 0 means removed).
    pub fn limit(&self, project: u32) -> Option<u64> {
        self.state().limits.get(&project).copied()
    }

    /// The fake mount table: (target, source, attrs), oldest first.
    pub fn mounted(&self) -> Vec<(InodeId, InodeId, MountAttrs)> {
        self.state().mounts.clone()
    }

    /// The attached fake loop devices, by number.
    pub fn loops(&self) -> Vec<FakeLoop> {
        self.state().loops.clone()
    }

    /// From now on, new attachments asking for direct I/O get it refused (EINVAL) and are
    /// made without, as on a backing filesystem that cannot do it.
    pub fn refuse_direct_io(&self, refuse: bool) {
        self.state().refuse_direct_io = refuse;
    }

    /// What [`Kernel::btrfs_quota_mode`] answers from now on (a test of a filesystem where
    /// quotas were enabled by someone else).
    pub fn set_btrfs_quota_mode(&self, mode: QuotaMode) {
        self.state().btrfs_quota = Some(mode);
    }

    /// Sets the referenced bytes of qgroup `qgroup` (created if missing).
    pub fn set_qgroup_referenced(&self, qgroup: u64, bytes: u64) {
        let mut state = self.state();
        match state.qgroups.iter_mut().find(|q| q.id == qgroup) {
            Some(q) => q.referenced = bytes,
            None => state.qgroups.push(Qgroup {
                id: qgroup,
                referenced: bytes,
                ..Qgroup::default()
            }),
        }
    }

    /// Makes `parents` the qgroups `qgroup` is a member of, as a subvolume created with an
    /// explicit qgroup inheritance list would have (no check that they exist).
    pub fn set_qgroup_parents(&self, qgroup: u64, parents: Vec<u64>) {
        if let Some(q) = self.state().qgroups.iter_mut().find(|q| q.id == qgroup) {
            q.parents = parents;
        }
    }

    /// Qgroup `qgroup` (a subvolume id for its level-0 one), if it exists.
    pub fn qgroup(&self, qgroup: u64) -> Option<Qgroup> {
        self.state()
            .qgroups
            .iter()
            .find(|q| q.id == qgroup)
            .cloned()
    }

    /// Ids of every qgroup, of every level.
    pub fn qgroup_ids(&self) -> Vec<u64> {
        self.state().qgroups.iter().map(|q| q.id).collect()
    }

    /// Ids of the live fake subvolumes.
    pub fn subvolumes(&self) -> Vec<u64> {
        self.state().subvolumes.iter().map(|s| s.id).collect()
    }

    /// Whether the filesystem holding `fd` is frozen (by [`Kernel::freeze_fs`]).
    pub fn is_frozen(&self, fd: BorrowedFd<'_>) -> SysResult<bool> {
        let dev = inode_of(fd)?.dev;
        Ok(self.state().frozen.contains(&dev))
    }

    /// Records `call`, then applies any failure injected for `op`.
    fn enter(&self, call: KernelCall, op: &'static str) -> SysResult<MutexGuard<'_, State>> {
        let mut state = self.state();
        state.calls.push(call);
        state.take_failure(op)?;
        Ok(state)
    }
}

fn inode_of(fd: BorrowedFd<'_>) -> SysResult<InodeId> {
    Ok(file_info(fd)?.id)
}

/// A handle on the fake device `entry`: a duplicate of `image`.
fn fake_handle(image: BorrowedFd<'_>, entry: &FakeLoop, new: bool) -> SysResult<LoopDevice> {
    let fd = rustix::io::fcntl_dupfd_cloexec(image, 0)
        .map_err(|e| SysError::new("fcntl", "F_DUPFD_CLOEXEC (fake loop device)", e))?;
    Ok(LoopDevice {
        number: entry.number,
        path: PathBuf::from(format!("/dev/loop{}", entry.number)),
        dev: rustix::fs::makedev(7, entry.number),
        fd,
        backing: entry.image,
        read_only: entry.options.read_only,
        autoclear: entry.options.autoclear,
        direct_io: entry.options.direct_io,
        direct_io_refused: None,
        newly_attached: new,
    })
}

fn tool_error(e: SysError) -> ToolError {
    ToolError {
        program: "fake",
        args: Vec::new(),
        failure: ToolFailure::Spawn(e.errno),
        stderr: e.args,
    }
}

fn image_size(fd: BorrowedFd<'_>) -> SysResult<u64> {
    crate::image::image_size(fd)
}

impl Kernel for FakeKernel {
    fn quota_support(&self, _fs: BorrowedFd<'_>) -> QuotaSupport {
        let mut state = self.state();
        state.calls.push(KernelCall::QuotaSupport);
        state
            .quota_support
            .clone()
            .unwrap_or_else(|| QuotaSupport::Unavailable("fake".to_owned()))
    }

    fn set_project_id(&self, dir: BorrowedFd<'_>, project: u32) -> SysResult<()> {
        let dir = inode_of(dir)?;
        let mut state = self.enter(KernelCall::SetProjectId { dir, project }, "set_project_id")?;
        state.project_ids.insert(dir, project);
        Ok(())
    }

    fn project_id(&self, dir: BorrowedFd<'_>) -> SysResult<u32> {
        let dir = inode_of(dir)?;
        let state = self.enter(KernelCall::ProjectId { dir }, "project_id")?;
        Ok(state.project_ids.get(&dir).copied().unwrap_or(0))
    }

    fn set_project_limit(&self, _fs: BorrowedFd<'_>, project: u32, bytes: u64) -> SysResult<()> {
        let mut state = self.enter(
            KernelCall::SetProjectLimit { project, bytes },
            "set_project_limit",
        )?;
        state.limits.insert(project, bytes);
        Ok(())
    }

    fn project_usage(&self, _fs: BorrowedFd<'_>, project: u32) -> SysResult<QuotaUsage> {
        let state = self.enter(KernelCall::ProjectUsage { project }, "project_usage")?;
        let mut usage = state.usage.get(&project).copied().unwrap_or_default();
        if let Some(limit) = state.limits.get(&project) {
            usage.bytes_limit = *limit;
        }
        Ok(usage)
    }

    fn bind_mount(
        &self,
        source: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attrs: MountAttrs,
    ) -> SysResult<()> {
        let source = inode_of(source)?;
        let target = inode_of(target)?;
        let mut state = self.enter(
            KernelCall::BindMount {
                source,
                target,
                attrs,
            },
            "bind_mount",
        )?;
        state.mounts.push((target, source, attrs));
        Ok(())
    }

    fn unmount(&self, target: &Path) -> SysResult<()> {
        let mut state = self.enter(
            KernelCall::Unmount {
                target: target.to_path_buf(),
            },
            "unmount",
        )?;
        let shown = || format!("{:?}", target.display().to_string());
        let st = rustix::fs::statx(CWD, target, AtFlags::SYMLINK_NOFOLLOW, StatxFlags::INO)
            .map_err(|e| SysError::new("unmount", shown(), e))?;
        let id = InodeId {
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
        };
        match state.mounts.iter().rposition(|(t, _, _)| *t == id) {
            Some(i) => {
                state.mounts.remove(i);
                Ok(())
            }
            None => Err(SysError::new("unmount", shown(), Errno::INVAL)),
        }
    }

    fn attach_loop(&self, image: BorrowedFd<'_>, options: LoopOptions) -> SysResult<LoopDevice> {
        let id = inode_of(image)?;
        let size = image_size(image)?;
        let mut state = self.enter(KernelCall::AttachLoop { image: id, options }, "attach_loop")?;
        if let Some(entry) = state.loops.iter_mut().find(|l| l.image == id) {
            entry.options.autoclear = options.autoclear;
            let entry = *entry;
            return fake_handle(image, &entry, false);
        }
        let number = (0..)
            .find(|n| state.loops.iter().all(|l| l.number != *n))
            .unwrap_or(0);
        let mut entry = FakeLoop {
            number,
            image: id,
            size,
            options,
        };
        let refused = options.direct_io && state.refuse_direct_io;
        if refused {
            entry.options.direct_io = false;
        }
        state.loops.push(entry);
        let mut device = fake_handle(image, &entry, true)?;
        device.direct_io_refused = refused.then_some(Errno::INVAL);
        Ok(device)
    }

    fn find_loop(&self, image: BorrowedFd<'_>) -> SysResult<Option<LoopDevice>> {
        let id = inode_of(image)?;
        let state = self.enter(KernelCall::FindLoop { image: id }, "find_loop")?;
        match state.loops.iter().find(|l| l.image == id) {
            Some(entry) => fake_handle(image, entry, false).map(Some),
            None => Ok(None),
        }
    }

    fn detach_loop(&self, image: BorrowedFd<'_>) -> SysResult<()> {
        let id = inode_of(image)?;
        let mut state = self.enter(KernelCall::DetachLoop { image: id }, "detach_loop")?;
        if state.mounts.iter().any(|(_, source, _)| *source == id) {
            return Err(SysError::new(
                "detach_loop",
                "fake loop device: still open elsewhere (mounted)",
                Errno::BUSY,
            ));
        }
        state.loops.retain(|l| l.image != id);
        Ok(())
    }

    fn refresh_loop_capacity(&self, device: &LoopDevice) -> SysResult<u64> {
        let size = image_size(device.fd.as_fd())?;
        let number = device.number;
        let mut state = self.enter(
            KernelCall::RefreshLoopCapacity { number },
            "refresh_loop_capacity",
        )?;
        let entry = state
            .loops
            .iter_mut()
            .find(|l| l.number == number)
            .ok_or_else(|| {
                SysError::new("ioctl", "fake loop device, LOOP_SET_CAPACITY", Errno::NXIO)
            })?;
        entry.size = size;
        Ok(size)
    }

    fn device_size(&self, device: &LoopDevice) -> SysResult<u64> {
        let number = device.number;
        let state = self.enter(KernelCall::DeviceSize { number }, "device_size")?;
        state
            .loops
            .iter()
            .find(|l| l.number == number)
            .map(|l| l.size)
            .ok_or_else(|| SysError::new("ioctl", "fake loop device, BLKGETSIZE64", Errno::NXIO))
    }

    fn mount_device(
        &self,
        device: &LoopDevice,
        kind: FsKind,
        options: &[String],
        target: BorrowedFd<'_>,
        attrs: MountAttrs,
    ) -> SysResult<()> {
        let target = inode_of(target)?;
        let mut state = self.enter(
            KernelCall::MountDevice {
                number: device.number,
                kind,
                options: options.to_vec(),
                target,
                attrs,
            },
            "mount_device",
        )?;
        state.mounts.push((target, device.backing, attrs));
        Ok(())
    }

    fn make_fs(&self, device: &LoopDevice, kind: FsKind) -> Result<(), ToolError> {
        let call = KernelCall::MakeFs {
            number: device.number,
            kind,
        };
        drop(self.enter(call, "make_fs").map_err(tool_error)?);
        blockfs::write_magic(device.fd.as_fd(), kind).map_err(tool_error)
    }

    fn grow_fs(
        &self,
        device: &LoopDevice,
        kind: FsKind,
        mount_point: &Path,
    ) -> Result<(), ToolError> {
        let call = KernelCall::GrowFs {
            number: device.number,
            kind,
            mount_point: mount_point.to_path_buf(),
        };
        drop(self.enter(call, "grow_fs").map_err(tool_error)?);
        Ok(())
    }

    fn btrfs_create_subvolume(&self, dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
        let call = KernelCall::BtrfsCreateSubvolume {
            dir: inode_of(dir)?,
            name: name.to_owned(),
        };
        let state = self.enter(call, "btrfs_create_subvolume")?;
        Self::make_subvolume(state, dir, name)
    }

    /// A snapshot is made as an empty subvolume: the fake keeps the bookkeeping (ids,
    /// qgroups, parents), not the contents, which the root tests check on real btrfs.
    fn btrfs_snapshot(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        source: BorrowedFd<'_>,
        readonly: bool,
    ) -> SysResult<()> {
        let call = KernelCall::BtrfsSnapshot {
            dir: inode_of(dir)?,
            name: name.to_owned(),
            source: inode_of(source)?,
            readonly,
        };
        let state = self.enter(call, "btrfs_snapshot")?;
        Self::make_subvolume(state, dir, name)
    }

    fn btrfs_destroy_subvolume(&self, dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
        let dir_id = inode_of(dir)?;
        let call = KernelCall::BtrfsDestroySubvolume {
            dir: dir_id,
            name: name.to_owned(),
        };
        let mut state = self.enter(call, "btrfs_destroy_subvolume")?;
        let root = crate::fs::entry_info(dir, name)?.id;
        let Some(i) = state.subvolumes.iter().position(|s| s.root == root) else {
            return Err(SysError::new(
                "fake btrfs",
                format!("{name:?}: not a subvolume"),
                Errno::INVAL,
            ));
        };
        destroy_fake_subvolume(&mut state, i)
    }

    fn btrfs_destroy_subvolume_id(&self, _fs: BorrowedFd<'_>, subvolume: u64) -> SysResult<()> {
        let call = KernelCall::BtrfsDestroySubvolumeId { subvolume };
        let mut state = self.enter(call, "btrfs_destroy_subvolume_id")?;
        let Some(i) = state.subvolumes.iter().position(|s| s.id == subvolume) else {
            return Err(SysError::new(
                "fake btrfs",
                format!("subvolume {subvolume}"),
                Errno::NOENT,
            ));
        };
        destroy_fake_subvolume(&mut state, i)
    }

    fn btrfs_subvolume_id(&self, fd: BorrowedFd<'_>) -> SysResult<u64> {
        let id = inode_of(fd)?;
        let state = self.enter(
            KernelCall::BtrfsSubvolumeId { fd: id },
            "btrfs_subvolume_id",
        )?;
        Ok(state
            .subvolumes
            .iter()
            .find(|s| s.root == id)
            .map_or(TOP_LEVEL_SUBVOLUME, |s| s.id))
    }

    fn btrfs_child_subvolumes(&self, _fs: BorrowedFd<'_>, parent: u64) -> SysResult<Vec<u64>> {
        let call = KernelCall::BtrfsChildSubvolumes { parent };
        let state = self.enter(call, "btrfs_child_subvolumes")?;
        Ok(state
            .subvolumes
            .iter()
            .filter(|s| s.parent == parent)
            .map(|s| s.id)
            .collect())
    }

    fn btrfs_quota_mode(&self, _fs: BorrowedFd<'_>) -> SysResult<QuotaMode> {
        let state = self.enter(KernelCall::BtrfsQuotaMode, "btrfs_quota_mode")?;
        Ok(state.btrfs_quota.unwrap_or(QuotaMode::Off))
    }

    fn btrfs_enable_quota(&self, _fs: BorrowedFd<'_>, simple: bool) -> SysResult<()> {
        let call = KernelCall::BtrfsEnableQuota { simple };
        let mut state = self.enter(call, "btrfs_enable_quota")?;
        if state.btrfs_quota.is_none_or(|m| m == QuotaMode::Off) {
            state.btrfs_quota = Some(if simple {
                QuotaMode::Simple
            } else {
                QuotaMode::Qgroups {
                    inconsistent: false,
                }
            });
            let ids: Vec<u64> = state.subvolumes.iter().map(|s| s.id).collect();
            for id in ids {
                if state.qgroups.iter().all(|q| q.id != id) {
                    state.qgroups.push(Qgroup {
                        id,
                        ..Qgroup::default()
                    });
                }
            }
        }
        Ok(())
    }

    fn btrfs_qgroup_create(&self, _fs: BorrowedFd<'_>, qgroup: u64) -> SysResult<()> {
        let call = KernelCall::BtrfsQgroupCreate { qgroup };
        let mut state = self.enter(call, "btrfs_qgroup_create")?;
        if state.btrfs_quota.is_none_or(|m| m == QuotaMode::Off) {
            return Err(SysError::new(
                "fake btrfs",
                "quotas are off",
                Errno::NOTCONN,
            ));
        }
        if state.qgroups.iter().any(|q| q.id == qgroup) {
            return Err(SysError::new(
                "fake btrfs",
                format!("qgroup {}", qgroup_name(qgroup)),
                Errno::EXIST,
            ));
        }
        state.qgroups.push(Qgroup {
            id: qgroup,
            ..Qgroup::default()
        });
        Ok(())
    }

    fn btrfs_qgroup_remove(&self, _fs: BorrowedFd<'_>, qgroup: u64) -> SysResult<()> {
        let call = KernelCall::BtrfsQgroupRemove { qgroup };
        let mut state = self.enter(call, "btrfs_qgroup_remove")?;
        if state.subvolumes.iter().any(|s| s.id == qgroup) {
            return Err(SysError::new(
                "fake btrfs",
                format!("qgroup {}: subvolume exists", qgroup_name(qgroup)),
                Errno::BUSY,
            ));
        }
        if qgroup >> 48 == 0
            && state
                .qgroups
                .iter()
                .any(|q| q.id == qgroup && q.referenced != 0)
        {
            return Err(SysError::new(
                "fake btrfs",
                format!("qgroup {}: still references bytes", qgroup_name(qgroup)),
                Errno::BUSY,
            ));
        }
        if state.qgroups.iter().any(|q| q.parents.contains(&qgroup)) {
            return Err(SysError::new(
                "fake btrfs",
                format!("qgroup {}: has members", qgroup_name(qgroup)),
                Errno::BUSY,
            ));
        }
        let before = state.qgroups.len();
        state.qgroups.retain(|q| q.id != qgroup);
        if state.qgroups.len() == before {
            return Err(SysError::new(
                "fake btrfs",
                format!("qgroup {}", qgroup_name(qgroup)),
                Errno::NOENT,
            ));
        }
        Ok(())
    }

    fn btrfs_qgroup_assign(
        &self,
        _fs: BorrowedFd<'_>,
        member: u64,
        parent: u64,
        assign: bool,
    ) -> SysResult<()> {
        let call = KernelCall::BtrfsQgroupAssign {
            member,
            parent,
            assign,
        };
        let mut state = self.enter(call, "btrfs_qgroup_assign")?;
        let what = format!("{} in {}", qgroup_name(member), qgroup_name(parent));
        if !state.qgroups.iter().any(|q| q.id == parent) {
            return Err(SysError::new("fake btrfs", what, Errno::NOENT));
        }
        let Some(q) = state.qgroups.iter_mut().find(|q| q.id == member) else {
            return Err(SysError::new("fake btrfs", what, Errno::NOENT));
        };
        let at = q.parents.iter().position(|p| *p == parent);
        match (assign, at) {
            (true, Some(_)) => Err(SysError::new("fake btrfs", what, Errno::EXIST)),
            (true, None) => {
                q.parents.push(parent);
                Ok(())
            }
            (false, Some(i)) => {
                q.parents.remove(i);
                Ok(())
            }
            (false, None) => Err(SysError::new("fake btrfs", what, Errno::NOENT)),
        }
    }

    fn btrfs_qgroup_limit(&self, _fs: BorrowedFd<'_>, qgroup: u64, bytes: u64) -> SysResult<()> {
        let call = KernelCall::BtrfsQgroupLimit { qgroup, bytes };
        let mut state = self.enter(call, "btrfs_qgroup_limit")?;
        match state.qgroups.iter_mut().find(|q| q.id == qgroup) {
            Some(q) => {
                q.max_referenced = (bytes != u64::MAX).then_some(bytes);
                Ok(())
            }
            None => Err(SysError::new(
                "fake btrfs",
                format!("qgroup {}", qgroup_name(qgroup)),
                Errno::NOENT,
            )),
        }
    }

    fn btrfs_qgroups(&self, _fs: BorrowedFd<'_>) -> SysResult<Vec<Qgroup>> {
        let state = self.enter(KernelCall::BtrfsQgroups, "btrfs_qgroups")?;
        Ok(state.qgroups.clone())
    }

    fn btrfs_commit(&self, _fs: BorrowedFd<'_>) -> SysResult<()> {
        drop(self.enter(KernelCall::BtrfsCommit, "btrfs_commit")?);
        Ok(())
    }

    fn freeze_fs(&self, fs: BorrowedFd<'_>) -> SysResult<()> {
        let id = inode_of(fs)?;
        let mut state = self.enter(KernelCall::FreezeFs { fs: id }, "freeze_fs")?;
        if state.frozen.contains(&id.dev) {
            return Err(SysError::new("fake freeze", "already frozen", Errno::BUSY));
        }
        state.frozen.push(id.dev);
        Ok(())
    }

    fn thaw_fs(&self, fs: BorrowedFd<'_>) -> SysResult<bool> {
        let id = inode_of(fs)?;
        let mut state = self.enter(KernelCall::ThawFs { fs: id }, "thaw_fs")?;
        let before = state.frozen.len();
        state.frozen.retain(|&dev| dev != id.dev);
        Ok(state.frozen.len() != before)
    }
}

/// Destroys fake subvolume `i`: ENOTEMPTY while another one lives inside it.
fn destroy_fake_subvolume(state: &mut State, i: usize) -> SysResult<()> {
    let id = state.subvolumes[i].id;
    if state.subvolumes.iter().any(|s| s.parent == id) {
        return Err(SysError::new(
            "fake btrfs",
            format!("subvolume {id} holds other subvolumes"),
            Errno::NOTEMPTY,
        ));
    }
    let sub = state.subvolumes.remove(i);
    crate::fs::remove_tree_at(sub.dir.as_fd(), &sub.name)
}
