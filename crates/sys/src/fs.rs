//! Unprivileged fd-relative path operations. Nothing here follows a symlink that a volume's
//! contents or a request could have planted, and nothing crosses into another mount unless
//! the function says so.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use crate::SysResult;

/// Identity of an inode: device and inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InodeId {
    pub dev: u64,
    pub ino: u64,
}

/// What `statx` says of an fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    pub id: InodeId,
    pub is_dir: bool,
    pub is_file: bool,
    pub is_symlink: bool,
    pub is_block_device: bool,
    /// STATX_ATTR_MOUNT_ROOT: the fd is the root of a mount.
    pub mount_root: bool,
    /// The mount id (STATX_MNT_ID).
    pub mount_id: u64,
}

/// Space and inodes of the filesystem holding an fd (fstatvfs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsSpace {
    pub bytes_total: u64,
    /// Free for unprivileged users (f_bavail * f_frsize).
    pub bytes_available: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub read_only: bool,
}

/// Bytes and inodes found by walking a tree without following symlinks or crossing mounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeUsage {
    /// Allocated bytes (st_blocks * 512) of every inode, counted once per hard-link group.
    pub bytes: u64,
    pub inodes: u64,
}

/// Opens a trusted absolute directory (from configuration, never from a request) as an
/// `O_DIRECTORY | O_CLOEXEC` fd. Symlinks in this configured path are followed.
pub fn open_trusted_dir(path: &Path) -> SysResult<OwnedFd> {
    todo!()
}

/// Creates every missing directory of a trusted absolute path (configuration only), mode 0o700.
pub fn create_trusted_dir_all(path: &Path) -> SysResult<()> {
    todo!()
}

/// Resolves `rel` (relative, no `..` needed) beneath `root` with openat2
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, returning an `O_PATH`
/// fd; where openat2 is missing, an `O_PATH | O_NOFOLLOW` walk one component at a time with
/// the same guarantees. A symlink anywhere on the way is ELOOP; an escape is EXDEV.
pub fn resolve_beneath(root: BorrowedFd<'_>, rel: &Path) -> SysResult<OwnedFd> {
    todo!()
}

/// Like [`resolve_beneath`] but opens a directory for reading (`O_RDONLY | O_DIRECTORY`), so it
/// can be used for *at calls that need a real fd (fchmod, ioctl).
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> SysResult<OwnedFd> {
    todo!()
}

/// mkdirat(`dir`, `name`, `mode`) then an fchmod to `mode` through a no-follow open (umask
/// does not apply). `name` is one path component. EEXIST is returned as an error; the caller
/// decides whether an existing directory is fine.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> SysResult<()> {
    todo!()
}

/// rmdirat of one empty directory entry `name` in `dir` (unlinkat AT_REMOVEDIR).
pub fn rmdir_at(dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
    todo!()
}

/// Removes `name` in `dir` and everything below it, fd-relative: entries are opened with
/// `O_NOFOLLOW`, symlinks are unlinked (never followed), and a directory that is the root of
/// another mount (or on another device) is not descended into: the removal stops with EBUSY
/// and leaves that mount and its contents intact. An absent `name` is Ok.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
    todo!()
}

/// statx of an fd (AT_EMPTY_PATH), including mount-root attribute and mount id.
pub fn file_info(fd: BorrowedFd<'_>) -> SysResult<FileInfo> {
    todo!()
}

/// fstatvfs of an fd.
pub fn fs_space(fd: BorrowedFd<'_>) -> SysResult<FsSpace> {
    todo!()
}

/// Walks the tree under directory `dir` without following symlinks or crossing mounts and
/// sums allocated bytes and inodes (the directory itself included). A symlink counts as one
/// inode of its own size, never its target's.
pub fn tree_usage(dir: BorrowedFd<'_>) -> SysResult<TreeUsage> {
    todo!()
}

/// fsync of a directory fd (makes a just-created or removed entry durable).
pub fn sync_dir(dir: BorrowedFd<'_>) -> SysResult<()> {
    todo!()
}
