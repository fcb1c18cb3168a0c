//! The privileged half of the seam, as one narrow trait.

use std::fmt::Debug;
use std::os::fd::BorrowedFd;
use std::path::Path;

use crate::btrfs::{Qgroup, QuotaMode};
use crate::{FsKind, LoopDevice, LoopOptions, SysResult, ToolError};
use rustix::mount::MountAttrFlags;

/// Whether a filesystem enforces project quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaSupport {
    /// Project quotas are on: limits set with [`Kernel::set_project_limit`] are enforced.
    Enforced,
    /// They are not; the string says why (kernel built without it, not mounted `prjquota`, …).
    Unavailable(String),
}

/// Usage charged to one project, as the quota subsystem counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaUsage {
    /// Bytes in use.
    pub bytes_used: u64,
    /// Hard byte limit (0: none).
    pub bytes_limit: u64,
    /// Inodes in use.
    pub inodes_used: u64,
    /// Hard inode limit (0: none).
    pub inodes_limit: u64,
}

/// Per-mount attributes applied to a bind mount before it becomes visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MountAttrs {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
    pub nodiratime: bool,
    pub relatime: bool,
}

impl MountAttrs {
    /// The MOUNT_ATTR_* flags to set and to clear for these attributes (mount_setattr takes
    /// both; fsmount takes the set). The atime mode is one value inside the MOUNT_ATTR__ATIME
    /// field, so choosing one means clearing the whole field; noatime wins over relatime when
    /// both are asked for (MOUNT_ATTR_RELATIME is 0: clearing the field selects it).
    /// nodiratime is a separate bit.
    pub fn flags(self) -> (MountAttrFlags, MountAttrFlags) {
        let mut set = MountAttrFlags::empty();
        let mut clr = MountAttrFlags::empty();
        for (wanted, flag) in [
            (self.read_only, MountAttrFlags::MOUNT_ATTR_RDONLY),
            (self.nosuid, MountAttrFlags::MOUNT_ATTR_NOSUID),
            (self.nodev, MountAttrFlags::MOUNT_ATTR_NODEV),
            (self.noexec, MountAttrFlags::MOUNT_ATTR_NOEXEC),
            (self.nodiratime, MountAttrFlags::MOUNT_ATTR_NODIRATIME),
        ] {
            if wanted {
                set |= flag;
            }
        }
        if self.noatime {
            set |= MountAttrFlags::MOUNT_ATTR_NOATIME;
            clr |= MountAttrFlags::MOUNT_ATTR__ATIME;
        } else if self.relatime {
            set |= MountAttrFlags::MOUNT_ATTR_RELATIME;
            clr |= MountAttrFlags::MOUNT_ATTR__ATIME;
        }
        (set, clr)
    }
}

/// Everything stowage asks of the kernel that needs privilege.
///
/// Every method is idempotent where the kernel allows it; fds passed in are borrowed and
/// never closed.
pub trait Kernel: Send + Sync + Debug + 'static {
    /// Probes whether the filesystem holding `fs` enforces project quotas.
    fn quota_support(&self, fs: BorrowedFd<'_>) -> QuotaSupport;

    /// Sets the project id of directory `dir` and its inherit flag (FS_IOC_FSSETXATTR), so
    /// everything created below it is charged to `project`.
    fn set_project_id(&self, dir: BorrowedFd<'_>, project: u32) -> SysResult<()>;

    /// Reads the project id of `dir` (FS_IOC_FSGETXATTR).
    fn project_id(&self, dir: BorrowedFd<'_>) -> SysResult<u32>;

    /// Sets the hard block limit of `project` on the filesystem holding `fs`
    /// (quotactl_fd Q_SETQUOTA, PRJQUOTA). `bytes == 0` removes the limit.
    fn set_project_limit(&self, fs: BorrowedFd<'_>, project: u32, bytes: u64) -> SysResult<()>;

    /// Reads usage and limits of `project` on the filesystem holding `fs` (Q_GETQUOTA).
    fn project_usage(&self, fs: BorrowedFd<'_>, project: u32) -> SysResult<QuotaUsage>;

    /// Bind-mounts the directory (or file) `source` onto `target`, both already resolved fds:
    /// open_tree(OPEN_TREE_CLONE) of `source`, mount_setattr of `attrs` on the detached
    /// copy, then move_mount onto `target`. No path string is re-resolved.
    fn bind_mount(
        &self,
        source: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attrs: MountAttrs,
    ) -> SysResult<()>;

    /// Unmounts the mount whose root is `target` (absolute path, already checked to contain no
    /// symlink), with UMOUNT_NOFOLLOW. EINVAL (not a mount point) and ENOENT are errors for the
    /// caller to judge.
    fn unmount(&self, target: &Path) -> SysResult<()>;

    /// Attaches the image open at `image` (a regular file, open read-write) to a loop device
    /// and returns it open read-only — or, when the image is attached already, that device
    /// (`newly_attached == false`): an image is never attached twice. Compared by the backing
    /// device and inode the kernel reports (LOOP_GET_STATUS64), never by path. An existing
    /// device gets the autoclear flag of `options`; its other flags stay as they are (read
    /// them in the returned handle).
    ///
    /// A new device: LOOP_CTL_GET_FREE, then LOOP_CONFIGURE with `options` (EBUSY from a
    /// race with another attacher: ask again, bounded). Direct I/O refused by the backing
    /// filesystem (EINVAL): configured without it, noted in `direct_io_refused`.
    ///
    /// How long the device lives (autoclear, who must hold the fd): see [`crate::loopdev`].
    fn attach_loop(&self, image: BorrowedFd<'_>, options: LoopOptions) -> SysResult<LoopDevice>;

    /// The loop device the image open at `image` is attached to, if any. Absent is `None`,
    /// not an error.
    fn find_loop(&self, image: BorrowedFd<'_>) -> SysResult<Option<LoopDevice>>;

    /// Detaches every loop device attached to the image open at `image` (LOOP_CLR_FD).
    /// Nothing attached is Ok. A device still open elsewhere (mounted, or held by a process;
    /// including a [`LoopDevice`] of this process not dropped yet) is EBUSY "still open
    /// elsewhere": it is not forced, but it is left marked autoclear, so the kernel detaches
    /// it at its last close.
    fn detach_loop(&self, image: BorrowedFd<'_>) -> SysResult<()>;

    /// Makes the device follow its image's current size after the image grew
    /// (LOOP_SET_CAPACITY); returns the device's new size in bytes.
    fn refresh_loop_capacity(&self, device: &LoopDevice) -> SysResult<u64>;

    /// The size of the device in bytes (BLKGETSIZE64).
    fn device_size(&self, device: &LoopDevice) -> SysResult<u64>;

    /// Mounts the filesystem `kind` on `device` onto `target` (an already resolved directory
    /// fd): fsopen, fsconfig `source=/dev/loopN` and `options` (each `key` or `key=value`,
    /// filesystem parameters such as `discard` or `prjquota`; per-mount flags belong in
    /// `attrs`), fsmount with `attrs`, move_mount onto `target`. `attrs.read_only` also makes
    /// the superblock read-only. No path but the device's is resolved; undo with
    /// [`Kernel::unmount`].
    fn mount_device(
        &self,
        device: &LoopDevice,
        kind: FsKind,
        options: &[String],
        target: BorrowedFd<'_>,
        attrs: MountAttrs,
    ) -> SysResult<()>;

    /// Makes a filesystem `kind` on `device` (mkfs.ext4 / mkfs.xfs / mkfs.btrfs, forced, no
    /// discard). It overwrites whatever is there: check with [`crate::blockfs::probe`] first
    /// that the device is [`crate::DeviceContent::Empty`].
    fn make_fs(&self, device: &LoopDevice, kind: FsKind) -> Result<(), ToolError>;

    /// Grows the mounted filesystem `kind` on `device` to the device's size (after
    /// [`Kernel::refresh_loop_capacity`]): resize2fs on the device, xfs_growfs -d or
    /// `btrfs filesystem resize max` on `mount_point` (absolute, checked to contain no
    /// symlink). Growing to the size it has already is a no-op success. ext4 grows online only
    /// with CAP_SYS_RESOURCE (the kernel answers EPERM without it, which resize2fs reports as
    /// "Permission denied to resize filesystem").
    fn grow_fs(
        &self,
        device: &LoopDevice,
        kind: FsKind,
        mount_point: &Path,
    ) -> Result<(), ToolError>;

    // ---- btrfs (the `btrfs` pool); see [`crate::btrfs`] for the ioctls

    /// Creates subvolume `name` (one component) in directory `dir`. EEXIST when taken.
    fn btrfs_create_subvolume(&self, dir: BorrowedFd<'_>, name: &str) -> SysResult<()>;

    /// Makes `name` (one component) in directory `dir` a snapshot of the subvolume whose root
    /// is open at `source`, read-only when `readonly`. EEXIST when taken. Nested subvolumes
    /// of the source are not in it.
    fn btrfs_snapshot(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        source: BorrowedFd<'_>,
        readonly: bool,
    ) -> SysResult<()>;

    /// Destroys the subvolume `name` in `dir`: ENOENT when absent, EINVAL when not a
    /// subvolume, ENOTEMPTY while it holds other subvolumes.
    fn btrfs_destroy_subvolume(&self, dir: BorrowedFd<'_>, name: &str) -> SysResult<()>;

    /// Destroys the subvolume with id `subvolume` on the filesystem holding `fs`, wherever
    /// it is. ENOENT when absent, ENOTEMPTY while it holds other subvolumes.
    fn btrfs_destroy_subvolume_id(&self, fs: BorrowedFd<'_>, subvolume: u64) -> SysResult<()>;

    /// The id of the subvolume holding `fd`.
    fn btrfs_subvolume_id(&self, fd: BorrowedFd<'_>) -> SysResult<u64>;

    /// Ids of the subvolumes directly inside subvolume `parent`.
    fn btrfs_child_subvolumes(&self, fs: BorrowedFd<'_>, parent: u64) -> SysResult<Vec<u64>>;

    /// How quotas are accounted on the filesystem holding `fs` (off, qgroups, simple).
    fn btrfs_quota_mode(&self, fs: BorrowedFd<'_>) -> SysResult<QuotaMode>;

    /// Turns quotas on (simple quotas when `simple`); quotas already on stay as they are.
    fn btrfs_enable_quota(&self, fs: BorrowedFd<'_>, simple: bool) -> SysResult<()>;

    /// Creates qgroup `qgroup` (a subvolume id is its level-0 qgroup; higher levels are
    /// [`crate::btrfs::qgroup_id`]). EEXIST when it exists.
    fn btrfs_qgroup_create(&self, fs: BorrowedFd<'_>, qgroup: u64) -> SysResult<()>;

    /// Removes qgroup `qgroup`: ENOENT when absent, EBUSY while it has members, or (level 0)
    /// while the kernel still counts something in it (a subvolume not yet cleaned up).
    fn btrfs_qgroup_remove(&self, fs: BorrowedFd<'_>, qgroup: u64) -> SysResult<()>;

    /// Makes qgroup `member` a member of qgroup `parent` (`assign`) or no longer one. EEXIST
    /// when already a member; ENOENT when a qgroup is missing, or not a member on removal.
    fn btrfs_qgroup_assign(
        &self,
        fs: BorrowedFd<'_>,
        member: u64,
        parent: u64,
        assign: bool,
    ) -> SysResult<()>;

    /// Sets the referenced-bytes limit of qgroup `qgroup` (ENOENT when absent); `u64::MAX`
    /// removes the limit.
    fn btrfs_qgroup_limit(&self, fs: BorrowedFd<'_>, qgroup: u64, bytes: u64) -> SysResult<()>;

    /// Every qgroup, of every level, with its counters, limit and parents, as of the last
    /// commit (relations: as of now).
    fn btrfs_qgroups(&self, fs: BorrowedFd<'_>) -> SysResult<Vec<Qgroup>>;

    /// Commits the filesystem holding `fs` (syncfs): subvolume and qgroup changes durable.
    fn btrfs_commit(&self, fs: BorrowedFd<'_>) -> SysResult<()>;

    // ---- freezing (a consistent image-pool snapshot)

    /// Freezes the mounted filesystem holding `fs` (any file or directory of it; FIFREEZE):
    /// dirty data is written out and every further write to it blocks until
    /// [`Kernel::thaw_fs`]. Already frozen is EBUSY; a filesystem that cannot be frozen is
    /// EOPNOTSUPP. Prefer [`Frozen`], which thaws even when the caller returns early.
    fn freeze_fs(&self, fs: BorrowedFd<'_>) -> SysResult<()>;

    /// Thaws the filesystem holding `fs` (FITHAW). Returns whether it was frozen: a
    /// filesystem that was not (the kernel's EINVAL) is `Ok(false)`, so reconciliation after
    /// a crash can thaw blindly.
    fn thaw_fs(&self, fs: BorrowedFd<'_>) -> SysResult<bool>;
}

/// A filesystem frozen with [`Kernel::freeze_fs`] for as long as the guard lives.
///
/// [`Frozen::thaw`] is the normal end and reports a failure to thaw; dropping the guard
/// without it (an early return, a panic) thaws too, ignoring any error, since nothing could
/// be done about it there.
#[derive(Debug)]
#[must_use = "the filesystem is thawed as soon as the guard is dropped"]
pub struct Frozen<'a> {
    kernel: &'a dyn Kernel,
    fs: BorrowedFd<'a>,
    armed: bool,
}

impl<'a> Frozen<'a> {
    /// Freezes the filesystem holding `fs`; it stays frozen until the guard is thawed or
    /// dropped.
    pub fn new(kernel: &'a dyn Kernel, fs: BorrowedFd<'a>) -> SysResult<Self> {
        kernel.freeze_fs(fs)?;
        Ok(Self {
            kernel,
            fs,
            armed: true,
        })
    }

    /// Thaws the filesystem now. An error leaves it in whatever state the kernel left it
    /// (the drop does not try again).
    pub fn thaw(mut self) -> SysResult<()> {
        self.armed = false;
        self.kernel.thaw_fs(self.fs).map(drop)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if self.armed {
            // No logging in this crate and nowhere to report to: thaw_fs is idempotent, so
            // a later reconciliation can thaw again.
            let _ = self.kernel.thaw_fs(self.fs);
        }
    }
}
