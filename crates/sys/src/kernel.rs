//! The privileged half of the seam, as one narrow trait.

use std::fmt::Debug;
use std::os::fd::BorrowedFd;
use std::path::Path;

use crate::SysResult;

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
}
