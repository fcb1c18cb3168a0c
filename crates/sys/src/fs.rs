//! Unprivileged fd-relative path operations. Nothing here follows a symlink that a volume's
//! contents or a request could have planted, and nothing crosses into another mount unless
//! the function says so.

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rustix::fs::{
    AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags, StatVfsMountFlags, Statx, StatxAttributes,
    StatxFlags, CWD,
};
use rustix::io::Errno;

use crate::{SysError, SysResult};

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

/// openat2 resolution for anything named by a request or found inside a volume.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// How every directory of a walk is opened: readable (for getdents), never through a symlink.
pub(crate) const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Set once openat2 answered ENOSYS (old kernel or a seccomp filter), so later calls go
/// straight to the component walk instead of paying a failing syscall each time.
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

/// A walk keeps at most this many ancestor directories open; older ones are closed and
/// re-opened through `..` (with an identity check) on the way back up, so a deep tree cannot
/// exhaust the fd table. Small under test so that path is exercised.
pub(crate) const MAX_HELD_FDS: usize = if cfg!(test) { 4 } else { 64 };

/// How often a directory that turned out non-empty at rmdir time (something was created in it
/// while we were deleting) is scanned again before giving up with ENOTEMPTY.
const MAX_RESCANS: u32 = 3;

/// Renders an fd for an error message: its number and, when /proc can tell, what it points at.
pub(crate) fn fd_desc(fd: BorrowedFd<'_>) -> String {
    let n = fd.as_raw_fd();
    if n == CWD.as_raw_fd() {
        return "AT_FDCWD".to_owned();
    }
    match rustix::fs::readlinkat(CWD, format!("/proc/self/fd/{n}"), Vec::new()) {
        Ok(target) => format!("fd {n}: {}", target.to_string_lossy()),
        Err(_) => format!("fd {n}"),
    }
}

/// Renders a name or path as a quoted string, lossily for non-UTF-8 bytes.
pub(crate) fn quoted(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// The usual error shape of this module: `op(fd N: /where, "name")`.
/// An empty `name` means the call was on the fd itself (fstat, fsync, …).
pub(crate) fn at_error(
    op: &'static str,
    fd: BorrowedFd<'_>,
    name: &[u8],
    errno: Errno,
) -> SysError {
    if name.is_empty() {
        return SysError::new(op, fd_desc(fd), errno);
    }
    SysError::new(op, format!("{}, {}", fd_desc(fd), quoted(name)), errno)
}

fn require_absolute(op: &'static str, path: &Path) -> SysResult<()> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(SysError::new(
            op,
            format!("{} (not absolute)", quoted(path.as_os_str().as_bytes())),
            Errno::INVAL,
        ))
    }
}

/// Checks that `name` is exactly one path component and turns it into a C string.
pub(crate) fn single_component(
    op: &'static str,
    dir: BorrowedFd<'_>,
    name: &str,
) -> SysResult<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(at_error(op, dir, name.as_bytes(), Errno::INVAL));
    }
    CString::new(name).map_err(|_| at_error(op, dir, name.as_bytes(), Errno::INVAL))
}

/// Opens a trusted absolute directory (from configuration, never from a request) as an
/// `O_DIRECTORY | O_CLOEXEC` fd. Symlinks in this configured path are followed.
pub fn open_trusted_dir(path: &Path) -> SysResult<OwnedFd> {
    require_absolute("open", path)?;
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SysError::new("open", quoted(path.as_os_str().as_bytes()), e))
}

/// Opens the device node (or any file) at a trusted absolute path `O_PATH | O_NOFOLLOW`: a
/// handle to the inode for a bind mount or statx, never opened for I/O (no side effect of
/// opening a device). A symlink as the last component is ELOOP.
pub fn open_path_nofollow(path: &Path) -> SysResult<OwnedFd> {
    require_absolute("open", path)?;
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SysError::new("open", quoted(path.as_os_str().as_bytes()), e))
}

/// Creates the empty regular file `name` in `dir` (`O_CREAT | O_EXCL | O_NOFOLLOW`): the
/// mount point of a bind-mounted device node. An existing entry is EEXIST.
pub fn create_file_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> SysResult<()> {
    let c = single_component("openat", dir, name)?;
    rustix::fs::openat(
        dir,
        c.as_c_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map(drop)
    .map_err(|e| at_error("openat", dir, name.as_bytes(), e))
}

/// Removes the non-directory entry `name` of `dir` (unlinkat without AT_REMOVEDIR; a
/// directory is EISDIR and stays).
pub fn unlink_at(dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
    let c = single_component("unlinkat", dir, name)?;
    rustix::fs::unlinkat(dir, c.as_c_str(), AtFlags::empty())
        .map_err(|e| at_error("unlinkat", dir, name.as_bytes(), e))
}

/// Creates every missing directory of a trusted absolute path (configuration only), mode 0o700.
pub fn create_trusted_dir_all(path: &Path) -> SysResult<()> {
    require_absolute("mkdir", path)?;
    let mut prefix = PathBuf::new();
    for component in path.components() {
        prefix.push(component);
        if matches!(component, Component::RootDir) {
            continue;
        }
        let shown = || quoted(prefix.as_os_str().as_bytes());
        match rustix::fs::mkdirat(CWD, &prefix, Mode::from_raw_mode(0o700)) {
            // The umask may have taken bits away; the configured tree is owner-only by
            // design, so set it exactly.
            Ok(()) => {
                rustix::fs::chmodat(CWD, &prefix, Mode::from_raw_mode(0o700), AtFlags::empty())
                    .map_err(|e| SysError::new("chmod", shown(), e))?
            }
            Err(Errno::EXIST) => {
                let st = rustix::fs::statat(CWD, &prefix, AtFlags::empty())
                    .map_err(|e| SysError::new("stat", shown(), e))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                    return Err(SysError::new("mkdir", shown(), Errno::NOTDIR));
                }
            }
            Err(e) => return Err(SysError::new("mkdir", shown(), e)),
        }
    }
    Ok(())
}

/// Resolves `rel` (relative, no `..` needed) beneath `root` with openat2
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, returning an `O_PATH`
/// fd; where openat2 is missing, an `O_PATH | O_NOFOLLOW` walk one component at a time with
/// the same guarantees. A symlink anywhere on the way is ELOOP; an escape is EXDEV.
pub fn resolve_beneath(root: BorrowedFd<'_>, rel: &Path) -> SysResult<OwnedFd> {
    // No O_NOFOLLOW: with O_PATH it would hand back an fd *to* a final symlink instead of
    // refusing it; RESOLVE_NO_SYMLINKS then makes a final symlink ELOOP like any other.
    open_beneath(root, rel, OFlags::PATH | OFlags::CLOEXEC)
}

/// Like [`resolve_beneath`] but opens a directory for reading (`O_RDONLY | O_DIRECTORY`), so it
/// can be used for *at calls that need a real fd (fchmod, ioctl).
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> SysResult<OwnedFd> {
    open_beneath(
        root,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
    )
}

pub(crate) fn open_beneath(root: BorrowedFd<'_>, rel: &Path, oflags: OFlags) -> SysResult<OwnedFd> {
    if OPENAT2_MISSING.load(Ordering::Relaxed) {
        return walk_beneath(root, rel, oflags);
    }
    // An empty path means the root itself, which openat2 spells ".".
    let kernel_rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let mut retries = 0;
    loop {
        match rustix::fs::openat2(root, kernel_rel, oflags, Mode::empty(), BENEATH) {
            Ok(fd) => return Ok(fd),
            // The kernel answers EAGAIN when a rename elsewhere raced the lookup and it cannot
            // prove the result is still beneath the root; trying again is the documented cure.
            Err(Errno::AGAIN) if retries < 8 => retries += 1,
            Err(Errno::NOSYS) => {
                if !OPENAT2_MISSING.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "openat2 is not available (ENOSYS); resolving paths one component at a time"
                    );
                }
                return walk_beneath(root, rel, oflags);
            }
            Err(e) => return Err(at_error("openat2", root, rel.as_os_str().as_bytes(), e)),
        }
    }
}

/// The openat2 fallback: every component is opened `O_PATH | O_NOFOLLOW` from the one before
/// and checked not to be a symlink, so no symlink is ever followed. Stricter than openat2 in
/// one way: any `..` is refused (EXDEV) instead of being resolved.
pub(crate) fn walk_beneath(root: BorrowedFd<'_>, rel: &Path, oflags: OFlags) -> SysResult<OwnedFd> {
    let shown = rel.as_os_str().as_bytes();
    let mut names = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(at_error("resolve_beneath", root, shown, Errno::XDEV));
            }
        }
    }
    let step_flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut current = rustix::fs::openat(root, c".", step_flags, Mode::empty())
        .map_err(|e| at_error("openat", root, b".", e))?;
    let mut is_dir = true;
    for name in names {
        if !is_dir {
            return Err(at_error("resolve_beneath", root, shown, Errno::NOTDIR));
        }
        let next = rustix::fs::openat(&current, name, step_flags, Mode::empty())
            .map_err(|e| at_error("openat", current.as_fd(), name.as_bytes(), e))?;
        let st = stat_fd(next.as_fd()).map_err(|e| at_error("statx", next.as_fd(), b"", e))?;
        match file_type(&st) {
            FileType::Symlink => return Err(at_error("resolve_beneath", root, shown, Errno::LOOP)),
            ty => is_dir = ty == FileType::Directory,
        }
        current = next;
    }
    if oflags.contains(OFlags::PATH) {
        return Ok(current);
    }
    // Anything but O_PATH here is a directory open (open_dir_beneath): re-open the very
    // inode we reached through ".", not its name, so nothing can be swapped in between.
    if !is_dir {
        return Err(at_error("resolve_beneath", root, shown, Errno::NOTDIR));
    }
    rustix::fs::openat(&current, c".", oflags, Mode::empty())
        .map_err(|e| at_error("openat", current.as_fd(), b".", e))
}

/// mkdirat(`dir`, `name`, `mode`) then an fchmod to `mode` through a no-follow open (umask
/// does not apply). `name` is one path component. EEXIST is returned as an error; the caller
/// decides whether an existing directory is fine.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &str, mode: u32) -> SysResult<()> {
    let cname = single_component("mkdirat", dir, name)?;
    // Created owner-only first so we can always open it, then given its real mode: the
    // window never shows looser permissions to group or others than those asked for.
    rustix::fs::mkdirat(dir, &cname, Mode::from_raw_mode(0o700))
        .map_err(|e| at_error("mkdirat", dir, name.as_bytes(), e))?;
    let set_mode = || -> SysResult<()> {
        let fd = rustix::fs::openat(dir, &cname, DIR_FLAGS, Mode::empty())
            .map_err(|e| at_error("openat", dir, name.as_bytes(), e))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode & 0o7777))
            .map_err(|e| at_error("fchmod", fd.as_fd(), b"", e))
    };
    set_mode().inspect_err(|_| {
        // Leave nothing half-made behind, or a retry would meet EEXIST with the wrong mode.
        // Best effort: the error already being returned is the one that matters.
        let _ = rustix::fs::unlinkat(dir, &cname, AtFlags::REMOVEDIR);
    })
}

/// rmdirat of one empty directory entry `name` in `dir` (unlinkat AT_REMOVEDIR).
pub fn rmdir_at(dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
    let cname = single_component("unlinkat", dir, name)?;
    rustix::fs::unlinkat(dir, &cname, AtFlags::REMOVEDIR)
        .map_err(|e| rmdir_error(dir, name.as_bytes(), e))
}

fn rmdir_error(dir: BorrowedFd<'_>, name: &[u8], errno: Errno) -> SysError {
    SysError::new(
        "unlinkat",
        format!("{}, {}, AT_REMOVEDIR", fd_desc(dir), quoted(name)),
        errno,
    )
}

/// How many removed entries between two progress lines of a long removal.
const PROGRESS_EVERY: u64 = 100_000;

/// Removes `name` in `dir` and everything below it, fd-relative: entries are opened with
/// `O_NOFOLLOW`, symlinks are unlinked (never followed), and a directory that is the root of
/// another mount (or on another device) is not descended into: the removal stops with EBUSY
/// and leaves that mount and its contents intact. An absent `name` is Ok.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
    let top = name.to_owned();
    let cname = single_component("remove_tree_at", dir, name)?;
    let base_at = dir_id(&stat_fd(dir).map_err(|e| at_error("statx", dir, b"", e))?);
    let (top_fd, top_at) = match open_for_removal(dir, base_at, &cname)? {
        Opened::Gone => return Ok(()),
        Opened::NotDir => return unlink_non_dir(dir, &cname),
        Opened::Dir(fd, at) => (fd, at),
    };
    let pending = read_entries(top_fd.as_fd())?;
    let mut walk = Walk::new(
        dir,
        top_fd,
        Frame {
            at: top_at,
            name: cname,
            pending,
            rescans: 0,
        },
    );
    let mut removed: u64 = 0;
    loop {
        if let Some(entry) = walk.cur.pending.pop() {
            remove_entry(&mut walk, entry)?;
            removed += 1;
            if removed.is_multiple_of(PROGRESS_EVERY) {
                tracing::info!(removed, tree = %top, "removing a large tree");
            }
            continue;
        }
        // Everything below the current directory is gone: remove it from its parent.
        match walk.rmdir_cur() {
            Ok(()) => {}
            Err(e) if e.errno == Errno::NOENT => {}
            // Something was created in it meanwhile; go round again, a bounded number of times.
            Err(e)
                if matches!(e.errno, Errno::NOTEMPTY | Errno::EXIST)
                    && walk.cur.rescans < MAX_RESCANS =>
            {
                walk.cur.rescans += 1;
                walk.cur.pending = read_entries(walk.cur_fd.as_fd())?;
                continue;
            }
            Err(e) => return Err(e),
        }
        if !walk.ascend()? {
            return Ok(());
        }
    }
}

/// One entry of the directory being emptied: unlinked if it is not a directory, otherwise
/// opened and pushed onto the walk.
fn remove_entry(walk: &mut Walk<'_>, entry: Entry) -> SysResult<()> {
    let parent = walk.cur_fd.as_fd();
    if !entry.maybe_dir {
        match rustix::fs::unlinkat(parent, &entry.name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => return Ok(()),
            // d_type said otherwise, or it was replaced by a directory since: treat it as one.
            Err(Errno::ISDIR) => {}
            Err(e) => return Err(at_error("unlinkat", parent, entry.name.to_bytes(), e)),
        }
    }
    match open_for_removal(parent, walk.cur.at, &entry.name)? {
        Opened::Gone => Ok(()),
        Opened::NotDir => unlink_non_dir(parent, &entry.name),
        Opened::Dir(fd, at) => {
            let pending = read_entries(fd.as_fd())?;
            walk.descend(
                fd,
                Frame {
                    at,
                    name: entry.name,
                    pending,
                    rescans: 0,
                },
            );
            Ok(())
        }
    }
}

fn unlink_non_dir(dir: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(at_error("unlinkat", dir, name.to_bytes(), e)),
    }
}

enum Opened {
    Gone,
    NotDir,
    Dir(OwnedFd, DirId),
}

/// Opens entry `name` of `parent` as a directory to be emptied, refusing another mount, and
/// makes sure we may list and unlink in it.
fn open_for_removal(parent: BorrowedFd<'_>, parent_at: DirId, name: &CStr) -> SysResult<Opened> {
    let fd = match rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Opened::Gone),
        // A symlink (ELOOP under O_NOFOLLOW) or any other non-directory.
        Err(Errno::NOTDIR | Errno::LOOP) => return Ok(Opened::NotDir),
        Err(Errno::ACCESS) => match grant_owner_access(parent, parent_at, name)? {
            Some(fd) => fd,
            None => return Ok(Opened::Gone),
        },
        Err(e) => return Err(at_error("openat", parent, name.to_bytes(), e)),
    };
    let st = stat_fd(fd.as_fd()).map_err(|e| at_error("statx", fd.as_fd(), b"", e))?;
    if crosses_mount(parent_at, &st) {
        return Err(SysError::new(
            "remove_tree_at",
            format!(
                "{}, {}: root of another mount, not descended into",
                fd_desc(parent),
                quoted(name.to_bytes())
            ),
            Errno::BUSY,
        ));
    }
    if u32::from(st.stx_mode) & 0o700 != 0o700 {
        // A directory we cannot write or search (mode 0o500, 0o000, …) cannot be emptied without
        // CAP_DAC_OVERRIDE. It is about to go, so widening its owner bits costs nothing; if this
        // fails (not ours), the unlinks below report the real error.
        let _ = rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700));
    }
    Ok(Opened::Dir(fd, dir_id(&st)))
}

/// A directory we may not even open for reading (mode 0o000 without CAP_DAC_OVERRIDE): chmod
/// it to 0o700 through an `O_PATH` fd of that very inode, then re-open it. chmod by name could
/// be raced into following a symlink; /proc/self/fd/N cannot.
fn grant_owner_access(
    parent: BorrowedFd<'_>,
    parent_at: DirId,
    name: &CStr,
) -> SysResult<Option<OwnedFd>> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let path_fd = match rustix::fs::openat(parent, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e) => return Err(at_error("openat", parent, name.to_bytes(), e)),
    };
    let st = stat_fd(path_fd.as_fd()).map_err(|e| at_error("statx", path_fd.as_fd(), b"", e))?;
    if crosses_mount(parent_at, &st) {
        // Never touch the mode of another mount's root; the caller's open will refuse it.
        return Err(at_error(
            "remove_tree_at",
            parent,
            name.to_bytes(),
            Errno::BUSY,
        ));
    }
    let proc_path = format!("/proc/self/fd/{}", path_fd.as_raw_fd());
    rustix::fs::chmodat(
        CWD,
        &proc_path,
        Mode::from_raw_mode(0o700),
        AtFlags::empty(),
    )
    .map_err(|e| at_error("chmod", path_fd.as_fd(), b"", e))?;
    rustix::fs::openat(&path_fd, c".", DIR_FLAGS, Mode::empty())
        .map(Some)
        .map_err(|e| at_error("openat", path_fd.as_fd(), b".", e))
}

/// statx of an fd (AT_EMPTY_PATH), including mount-root attribute and mount id.
pub fn file_info(fd: BorrowedFd<'_>) -> SysResult<FileInfo> {
    let st = stat_fd(fd).map_err(|e| at_error("statx", fd, b"", e))?;
    Ok(info_of(&st))
}

fn info_of(st: &Statx) -> FileInfo {
    let ty = file_type(st);
    FileInfo {
        id: inode_id(st),
        is_dir: ty == FileType::Directory,
        is_file: ty == FileType::RegularFile,
        is_symlink: ty == FileType::Symlink,
        is_block_device: ty == FileType::BlockDevice,
        mount_root: is_mount_root(st),
        mount_id: mount_id(st),
    }
}

/// statx of the entry `name` (one path component) in `dir`, never following it if it is a
/// symlink: one syscall where resolving and then stating an fd would take three.
pub fn entry_info(dir: BorrowedFd<'_>, name: &str) -> SysResult<FileInfo> {
    let cname = single_component("statx", dir, name)?;
    let st = stat_at(dir, &cname).map_err(|e| at_error("statx", dir, name.as_bytes(), e))?;
    Ok(info_of(&st))
}

/// The names in directory `dir` (not `.` and `..`), as UTF-8 where they are; others are
/// rendered lossily, which is enough to report them.
pub fn entry_names(dir: BorrowedFd<'_>) -> SysResult<Vec<String>> {
    Ok(read_entries(dir)?
        .into_iter()
        .map(|e| String::from_utf8_lossy(e.name.to_bytes()).into_owned())
        .collect())
}

/// fstatvfs of an fd.
pub fn fs_space(fd: BorrowedFd<'_>) -> SysResult<FsSpace> {
    let vfs = rustix::fs::fstatvfs(fd).map_err(|e| at_error("fstatvfs", fd, b"", e))?;
    Ok(FsSpace {
        bytes_total: vfs.f_blocks.saturating_mul(vfs.f_frsize),
        bytes_available: vfs.f_bavail.saturating_mul(vfs.f_frsize),
        inodes_total: vfs.f_files,
        inodes_free: vfs.f_ffree,
        read_only: vfs.f_flag.contains(StatVfsMountFlags::RDONLY),
    })
}

/// Whether this process may create entries in directory `dir` (faccessat `W_OK` with the
/// effective ids, `AT_EACCESS`): EROFS on a read-only mount, EACCES where the mode refuses
/// it. Nothing is created, so a readiness check can ask it as often as it likes.
pub fn check_writable(dir: BorrowedFd<'_>) -> SysResult<()> {
    rustix::fs::accessat(dir, c".", rustix::fs::Access::WRITE_OK, AtFlags::EACCESS)
        .map_err(|e| at_error("faccessat W_OK", dir, b"", e))
}

/// Walks the tree under directory `dir` without following symlinks or crossing mounts and
/// sums allocated bytes and inodes (the directory itself included). A symlink counts as one
/// inode of its own size, never its target's.
pub fn tree_usage(dir: BorrowedFd<'_>) -> SysResult<TreeUsage> {
    match UsageWalk::default().run(dir, None)? {
        WalkStep::Done(usage) => Ok(usage),
        WalkStep::Stopped => unreachable!("a walk without a deadline runs to its end"),
    }
}

/// How far one run of a [`UsageWalk`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkStep {
    /// The walk reached its end: the figure of the whole tree.
    Done(TreeUsage),
    /// The deadline came first: the walk stopped where it was and the next run continues
    /// from there. What it counted so far is not a figure of the tree and is not returned.
    Stopped,
}

/// A [`tree_usage`] walk that can stop at a deadline and continue later, so that measuring
/// a large tree costs a bounded time per call. Between runs it holds no fd: only the names
/// and identities of the directories from the root to where it stopped, with the entries
/// each still has to visit. The next run opens that chain again from the root (no link
/// followed) and checks every directory is still the one it left; if one was moved or
/// replaced meanwhile, the walk starts over. A tree that changes between runs is counted
/// partly before and partly after the change, as it would be by one long walk.
#[derive(Default)]
pub struct UsageWalk {
    usage: TreeUsage,
    /// Only inodes with more than one link can be met twice, so only those are remembered.
    seen_links: HashSet<InodeId>,
    /// From the root to the directory the walk stopped in; empty when not started.
    frames: Vec<Frame>,
    /// Entries examined so far (statx calls), for progress reports.
    entries: u64,
}

impl std::fmt::Debug for UsageWalk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageWalk")
            .field("entries", &self.entries)
            .field("depth", &self.frames.len())
            .finish()
    }
}

impl UsageWalk {
    /// Entries examined so far by the walk in progress (0 when none is).
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Whether a walk is in progress (stopped at a deadline, to be continued).
    pub fn in_progress(&self) -> bool {
        !self.frames.is_empty()
    }

    /// Walks the tree under `dir` (the same directory at every run) until its end or until
    /// `deadline`, whichever comes first; continues a stopped walk. An error abandons the
    /// walk in progress (the next run starts over).
    pub fn run(&mut self, dir: BorrowedFd<'_>, deadline: Option<Instant>) -> SysResult<WalkStep> {
        self.run_until(dir, || deadline.is_some_and(|d| Instant::now() >= d))
    }

    /// [`UsageWalk::run`] with the stop condition asked before each entry.
    pub(crate) fn run_until(
        &mut self,
        dir: BorrowedFd<'_>,
        stop: impl FnMut() -> bool,
    ) -> SysResult<WalkStep> {
        let step = self.run_inner(dir, stop);
        if !matches!(step, Ok(WalkStep::Stopped)) {
            *self = UsageWalk::default();
        }
        step
    }

    fn run_inner(
        &mut self,
        dir: BorrowedFd<'_>,
        mut stop: impl FnMut() -> bool,
    ) -> SysResult<WalkStep> {
        // A readable fd of our own for the root: `dir` may be an O_PATH fd.
        let root_fd = rustix::fs::openat(dir, c".", DIR_FLAGS, Mode::empty())
            .map_err(|e| at_error("openat", dir, b".", e))?;
        let root_st = stat_fd(root_fd.as_fd()).map_err(|e| at_error("statx", dir, b"", e))?;
        let resumed = match std::mem::take(&mut self.frames) {
            frames if frames.is_empty() => None,
            frames => self.reopen(dir, root_fd.as_fd(), &root_st, frames)?,
        };
        let mut walk = match resumed {
            Some(walk) => walk,
            None => {
                *self = UsageWalk::default();
                count(&mut self.usage, &root_st);
                Walk::from_root(dir, root_fd, &root_st)?
            }
        };
        loop {
            if stop() {
                self.frames = walk.into_frames();
                return Ok(WalkStep::Stopped);
            }
            let Some(entry) = walk.cur.pending.pop() else {
                if walk.ascend()? {
                    continue;
                }
                return Ok(WalkStep::Done(self.usage));
            };
            self.entries += 1;
            let parent = walk.cur_fd.as_fd();
            let st = match stat_at(parent, &entry.name) {
                Ok(st) => st,
                // Deleted while we walked: it no longer uses anything.
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(at_error("statx", parent, entry.name.to_bytes(), e)),
            };
            if file_type(&st) != FileType::Directory {
                if st.stx_nlink <= 1 || self.seen_links.insert(inode_id(&st)) {
                    count(&mut self.usage, &st);
                }
                continue;
            }
            if crosses_mount(walk.cur.at, &st) {
                continue;
            }
            // Gone, swapped or a mount since the statx: not the directory we meant to count,
            // and possibly not ours at all.
            let Some((fd, opened)) = walk.open_as_seen(&entry.name, &st, DIR_FLAGS)? else {
                continue;
            };
            count(&mut self.usage, &opened);
            walk.enter(fd, &opened, entry.name)?;
        }
    }

    /// Opens again the chain of directories a stopped walk was in, from the root down, each
    /// by its name in the one before, checking each is the directory the walk left there.
    /// None when one is gone or is not that directory any more: the walk starts over.
    fn reopen<'a>(
        &self,
        base: BorrowedFd<'a>,
        root: BorrowedFd<'_>,
        root_st: &Statx,
        frames: Vec<Frame>,
    ) -> SysResult<Option<Walk<'a>>> {
        let mut frames = frames.into_iter();
        let Some(top) = frames.next() else {
            return Ok(None);
        };
        if top.at != dir_id(root_st) {
            return Ok(None);
        }
        let fd = rustix::fs::openat(root, c".", DIR_FLAGS, Mode::empty())
            .map_err(|e| at_error("openat", root, b".", e))?;
        let mut walk = Walk::new(base, fd, top);
        for frame in frames {
            let parent = walk.cur_fd.as_fd();
            let fd = match rustix::fs::openat(parent, &frame.name, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
                Err(e) => return Err(at_error("openat", parent, frame.name.to_bytes(), e)),
            };
            let st = stat_fd(fd.as_fd()).map_err(|e| at_error("statx", fd.as_fd(), b"", e))?;
            if dir_id(&st) != frame.at {
                return Ok(None);
            }
            walk.descend(fd, frame);
        }
        Ok(Some(walk))
    }
}

/// What [`set_group_tree`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupStats {
    /// The root already had the group and setgid: nothing was walked (what Kubernetes calls
    /// the OnRootMismatch policy).
    pub root_matched: bool,
    /// Directories and files given the group (the root included).
    pub changed: u64,
    /// Symlinks left as they are (never followed, never chowned).
    pub symlinks: u64,
    /// Files with more than one hard link left as they are: one of their names may be
    /// outside the volume.
    pub linked: u64,
    /// FIFOs, sockets and device nodes left as they are (never opened).
    pub specials: u64,
    /// Entries on another mount, not entered.
    pub mounts: u64,
}

/// Gives the tree under directory `dir` the group `gid`, as Kubernetes' fsGroup asks: every
/// directory and regular file gets the group and group read (and write, unless `read_only`)
/// permission, directories also group search and setgid, so what is created later inherits the
/// group. Nothing else is touched:
/// - no symlink is followed or changed; every entry is met by `statx(AT_SYMLINK_NOFOLLOW)`,
///   then opened `O_NOFOLLOW` (`O_PATH` for files, so a FIFO swapped in is never opened) and
///   checked to be the inode the statx saw before anything is changed through that fd;
/// - a regular file with more than one hard link is left alone (a link to a host file on
///   the same filesystem must not change hands);
/// - FIFOs, sockets and device nodes are left alone; another mount is not entered.
///
/// When the root already has the group and setgid, the walk is skipped (`root_matched`).
pub fn set_group_tree(dir: BorrowedFd<'_>, gid: u32, read_only: bool) -> SysResult<GroupStats> {
    let (file_bits, dir_bits) = if read_only {
        (0o040, 0o2050)
    } else {
        (0o060, 0o2070)
    };
    let root_fd = rustix::fs::openat(dir, c".", DIR_FLAGS, Mode::empty())
        .map_err(|e| at_error("openat", dir, b".", e))?;
    let root_st = stat_fd(root_fd.as_fd()).map_err(|e| at_error("statx", dir, b"", e))?;
    let mut stats = GroupStats::default();
    if root_st.stx_gid == gid && u32::from(root_st.stx_mode) & 0o2000 != 0 {
        stats.root_matched = true;
        return Ok(stats);
    }
    let group = |fd: BorrowedFd<'_>, st: &Statx, bits: u32| -> SysResult<()> {
        rustix::fs::chownat(
            fd,
            c"",
            None,
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::EMPTY_PATH,
        )
        .map_err(|e| at_error("fchownat", fd, b"", e))?;
        // The mode is set after the chown (which clears set-id bits); a set-user-id bit is
        // not put back, nor a file's set-group-id (it would now mean our group). Through
        // /proc/self/fd the inode of the fd itself is changed (an O_PATH fd has no fchmod).
        let keep = if bits & 0o2000 != 0 { 0o3777 } else { 0o1777 };
        let mode = (u32::from(st.stx_mode) & keep) | bits;
        let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
        rustix::fs::chmod(proc.as_str(), Mode::from_raw_mode(mode))
            .map_err(|e| at_error("chmod", fd, b"", e))
    };
    group(root_fd.as_fd(), &root_st, dir_bits)?;
    stats.changed += 1;
    let mut walk = Walk::from_root(dir, root_fd, &root_st)?;
    loop {
        let Some(entry) = walk.cur.pending.pop() else {
            if walk.ascend()? {
                continue;
            }
            return Ok(stats);
        };
        let parent = walk.cur_fd.as_fd();
        let st = match stat_at(parent, &entry.name) {
            Ok(st) => st,
            Err(Errno::NOENT) => continue,
            Err(e) => return Err(at_error("statx", parent, entry.name.to_bytes(), e)),
        };
        let kind = file_type(&st);
        match kind {
            FileType::Symlink => {
                stats.symlinks += 1;
                continue;
            }
            FileType::RegularFile if st.stx_nlink > 1 => {
                stats.linked += 1;
                continue;
            }
            FileType::RegularFile | FileType::Directory => {}
            _ => {
                stats.specials += 1;
                continue;
            }
        }
        if crosses_mount(walk.cur.at, &st) {
            stats.mounts += 1;
            continue;
        }
        let flags = if kind == FileType::Directory {
            DIR_FLAGS
        } else {
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC
        };
        // Gone, swapped, another type or linked since the statx: not what was checked,
        // so not touched.
        let Some((fd, opened)) = walk.open_as_seen(&entry.name, &st, flags)? else {
            continue;
        };
        if kind == FileType::RegularFile && opened.stx_nlink > 1 {
            continue;
        }
        if kind == FileType::RegularFile {
            group(fd.as_fd(), &opened, file_bits)?;
            stats.changed += 1;
            continue;
        }
        group(fd.as_fd(), &opened, dir_bits)?;
        stats.changed += 1;
        walk.enter(fd, &opened, entry.name)?;
    }
}

fn count(usage: &mut TreeUsage, st: &Statx) {
    usage.bytes = usage
        .bytes
        .saturating_add(st.stx_blocks.saturating_mul(512));
    usage.inodes = usage.inodes.saturating_add(1);
}

/// fchmod of an fd (a real fd, not O_PATH) to the permission bits of `mode`.
pub fn set_mode(fd: BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777))
        .map_err(|e| at_error("fchmod", fd, b"", e))
}

/// fsync of a directory fd (makes a just-created or removed entry durable).
pub fn sync_dir(dir: BorrowedFd<'_>) -> SysResult<()> {
    match rustix::fs::fsync(dir) {
        Ok(()) => Ok(()),
        // An O_PATH fd cannot be fsynced; re-open the same directory for reading and retry.
        Err(Errno::BADF) => {
            let fd = rustix::fs::openat(dir, c".", DIR_FLAGS, Mode::empty())
                .map_err(|e| at_error("openat", dir, b".", e))?;
            rustix::fs::fsync(&fd).map_err(|e| at_error("fsync", dir, b"", e))
        }
        Err(e) => Err(at_error("fsync", dir, b"", e)),
    }
}

/// The name of the filesystem type holding `fd` (from fstatfs's magic number): `ext4`, `xfs`,
/// `btrfs`, `tmpfs`, …, or `unknown-0x…` for one this table does not name.
pub fn fs_type_name(fd: BorrowedFd<'_>) -> SysResult<String> {
    let st = rustix::fs::fstatfs(fd).map_err(|e| at_error("fstatfs", fd, b"", e))?;
    // f_type is a signed or unsigned word depending on the architecture.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u64;
    Ok(match magic {
        // EXT4_SUPER_MAGIC, shared by ext2 and ext3.
        0xEF53 => "ext4".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        0x9123_683E => "btrfs".to_owned(),
        0x0102_1994 => "tmpfs".to_owned(),
        0x794C_7630 => "overlay".to_owned(),
        0x2FC1_2FC1 => "zfs".to_owned(),
        0xF2F5_2010 => "f2fs".to_owned(),
        other => format!("unknown-{other:#x}"),
    })
}

// --- statx helpers -------------------------------------------------------------------------

const STATX_MASK: StatxFlags = StatxFlags::TYPE
    .union(StatxFlags::MODE)
    .union(StatxFlags::NLINK)
    .union(StatxFlags::INO)
    .union(StatxFlags::BLOCKS)
    .union(StatxFlags::GID)
    .union(StatxFlags::MNT_ID);

pub(crate) fn stat_fd(fd: BorrowedFd<'_>) -> Result<Statx, Errno> {
    rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, STATX_MASK)
}

/// statx of `name` in `dir`, the entry itself: no symlink followed, no automount triggered.
fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Statx, Errno> {
    rustix::fs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
        STATX_MASK,
    )
}

pub(crate) fn file_type(st: &Statx) -> FileType {
    FileType::from_raw_mode(u32::from(st.stx_mode))
}

pub(crate) fn inode_id(st: &Statx) -> InodeId {
    InodeId {
        dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
    }
}

pub(crate) fn is_mount_root(st: &Statx) -> bool {
    st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
        && st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
}

pub(crate) fn mount_id(st: &Statx) -> u64 {
    if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) {
        st.stx_mnt_id
    } else {
        0
    }
}

// --- the walk shared by remove_tree_at and tree_usage --------------------------------------

/// Where a directory of the walk lives: which inode, on which mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirId {
    id: InodeId,
    mount_id: u64,
}

pub(crate) fn dir_id(st: &Statx) -> DirId {
    DirId {
        id: inode_id(st),
        mount_id: mount_id(st),
    }
}

/// Whether `st`, met inside directory `parent`, belongs to another mount. Three signals, any
/// of which is enough: the mount-root attribute, another device, another mount id (a bind
/// mount of the same filesystem keeps the device).
fn crosses_mount(parent: DirId, st: &Statx) -> bool {
    let child = mount_id(st);
    is_mount_root(st)
        || inode_id(st).dev != parent.id.dev
        || (child != 0 && parent.mount_id != 0 && child != parent.mount_id)
}

pub(crate) struct Entry {
    pub(crate) name: CString,
    /// d_type said directory, or did not say.
    pub(crate) maybe_dir: bool,
}

pub(crate) fn read_entries(fd: BorrowedFd<'_>) -> SysResult<Vec<Entry>> {
    let mut dir = Dir::read_from(fd).map_err(|e| at_error("opendir", fd, b"", e))?;
    let mut entries = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry.map_err(|e| at_error("getdents", fd, b"", e))?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        entries.push(Entry {
            name: name.to_owned(),
            maybe_dir: matches!(entry.file_type(), FileType::Directory | FileType::Unknown),
        });
    }
    Ok(entries)
}

/// One directory on the walk. Its entries are read up front, so nothing depends on the
/// directory offset while entries are being deleted.
struct Frame {
    at: DirId,
    /// Its name in the parent directory.
    name: CString,
    pending: Vec<Entry>,
    rescans: u32,
}

/// An explicit stack instead of recursion (a hostile tree can be deep), holding a bounded
/// number of directory fds.
struct Walk<'a> {
    /// The directory holding the walk's top (for remove_tree_at, where the top is unlinked).
    base: BorrowedFd<'a>,
    cur_fd: OwnedFd,
    cur: Frame,
    /// Ancestors of `cur`, innermost last; the fd is None once closed to bound the fd count.
    ancestors: Vec<(Option<OwnedFd>, Frame)>,
}

impl<'a> Walk<'a> {
    fn new(base: BorrowedFd<'a>, fd: OwnedFd, top: Frame) -> Self {
        Self {
            base,
            cur_fd: fd,
            cur: top,
            ancestors: Vec::new(),
        }
    }

    /// A walk from the root directory `fd` (stat `st`) whose entries are read now.
    fn from_root(base: BorrowedFd<'a>, fd: OwnedFd, st: &Statx) -> SysResult<Self> {
        let pending = read_entries(fd.as_fd())?;
        Ok(Self::new(
            base,
            fd,
            Frame {
                at: dir_id(st),
                name: c".".to_owned(),
                pending,
                rescans: 0,
            },
        ))
    }

    /// Opens entry `name` of the current directory with `flags` (which never follow a
    /// symlink) and checks it is what `st`, its statx, saw: the same inode and type, on the
    /// current directory's mount. None when it is gone, became a symlink or another type, or
    /// lies on another mount since: the caller skips it.
    fn open_as_seen(
        &self,
        name: &CStr,
        st: &Statx,
        flags: OFlags,
    ) -> SysResult<Option<(OwnedFd, Statx)>> {
        let parent = self.cur_fd.as_fd();
        let fd = match rustix::fs::openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => return Ok(None),
            Err(e) => return Err(at_error("openat", parent, name.to_bytes(), e)),
        };
        let opened = stat_fd(fd.as_fd()).map_err(|e| at_error("statx", fd.as_fd(), b"", e))?;
        if inode_id(&opened) != inode_id(st)
            || file_type(&opened) != file_type(st)
            || crosses_mount(self.cur.at, &opened)
        {
            return Ok(None);
        }
        Ok(Some((fd, opened)))
    }

    /// Descends into the directory `fd` (stat `st`, named `name` in the current one), its
    /// entries read now.
    fn enter(&mut self, fd: OwnedFd, st: &Statx, name: CString) -> SysResult<()> {
        let pending = read_entries(fd.as_fd())?;
        self.descend(
            fd,
            Frame {
                at: dir_id(st),
                name,
                pending,
                rescans: 0,
            },
        );
        Ok(())
    }

    fn descend(&mut self, fd: OwnedFd, frame: Frame) {
        let parent_fd = std::mem::replace(&mut self.cur_fd, fd);
        let parent = std::mem::replace(&mut self.cur, frame);
        self.ancestors.push((Some(parent_fd), parent));
        if let Some(i) = self.ancestors.len().checked_sub(MAX_HELD_FDS + 1) {
            self.ancestors[i].0 = None;
        }
    }

    /// The frames from the top to `cur`, their fds closed: what a stopped walk keeps.
    fn into_frames(self) -> Vec<Frame> {
        let mut frames: Vec<Frame> = self.ancestors.into_iter().map(|(_, f)| f).collect();
        frames.push(self.cur);
        frames
    }

    /// Makes the parent of `cur` current again; false when `cur` is the top.
    fn ascend(&mut self) -> SysResult<bool> {
        let Some((fd, frame)) = self.ancestors.pop() else {
            return Ok(false);
        };
        self.cur_fd = match fd {
            Some(fd) => fd,
            None => reopen_parent(self.cur_fd.as_fd(), frame.at)?,
        };
        self.cur = frame;
        Ok(true)
    }

    /// rmdir of `cur` in its parent. The parent fd is made available first: once `cur` is
    /// removed, `..` can no longer be looked up from it.
    fn rmdir_cur(&mut self) -> SysResult<()> {
        let parent = match self.ancestors.last_mut() {
            None => self.base,
            Some((slot, frame)) => match slot {
                Some(fd) => OwnedFd::as_fd(fd),
                None => {
                    let fd = reopen_parent(self.cur_fd.as_fd(), frame.at)?;
                    OwnedFd::as_fd(slot.insert(fd))
                }
            },
        };
        rustix::fs::unlinkat(parent, &self.cur.name, AtFlags::REMOVEDIR)
            .map_err(|e| rmdir_error(parent, self.cur.name.to_bytes(), e))
    }
}

/// Re-opens the parent of `child` through `..` and checks it is the directory we left there:
/// if the child was moved meanwhile, `..` is somewhere else and the walk must stop.
pub(crate) fn reopen_parent(child: BorrowedFd<'_>, expected: DirId) -> SysResult<OwnedFd> {
    let fd = rustix::fs::openat(child, c"..", DIR_FLAGS, Mode::empty())
        .map_err(|e| at_error("openat", child, b"..", e))?;
    let st = stat_fd(fd.as_fd()).map_err(|e| at_error("statx", fd.as_fd(), b"", e))?;
    if dir_id(&st) != expected {
        return Err(SysError::new(
            "openat",
            format!(
                "{}, \"..\": directory moved during the walk",
                fd_desc(child)
            ),
            Errno::STALE,
        ));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    fn tmp() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = open_trusted_dir(dir.path()).expect("open tempdir");
        (dir, fd)
    }

    fn walk_flags() -> OFlags {
        OFlags::PATH | OFlags::CLOEXEC
    }

    #[test]
    fn walk_fallback_resolves_plain_nested_dirs() {
        let (dir, fd) = tmp();
        std::fs::create_dir_all(dir.path().join("a/b/c")).expect("mkdir");
        let got = walk_beneath(fd.as_fd(), Path::new("a/b/c"), walk_flags()).expect("walk");
        let want = std::fs::metadata(dir.path().join("a/b/c")).expect("stat");
        let info = file_info(got.as_fd()).expect("file_info");
        assert_eq!(info.id.ino, want.ino());
        assert!(info.is_dir);
        let opened = walk_beneath(
            fd.as_fd(),
            Path::new("./a/b"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .expect("walk rdonly");
        assert!(file_info(opened.as_fd()).expect("info").is_dir);
        let root = walk_beneath(fd.as_fd(), Path::new(""), walk_flags()).expect("empty path");
        assert_eq!(
            file_info(root.as_fd()).expect("info").id,
            file_info(fd.as_fd()).expect("info").id
        );
    }

    #[test]
    fn walk_fallback_refuses_symlinks_and_escapes() {
        let (dir, fd) = tmp();
        std::fs::create_dir_all(dir.path().join("d")).expect("mkdir");
        std::fs::write(dir.path().join("d/f"), b"x").expect("write");
        symlink("/", dir.path().join("root")).expect("symlink");
        symlink("../..", dir.path().join("d/up")).expect("symlink");
        symlink("f", dir.path().join("d/last")).expect("symlink");
        for (rel, errno) in [
            ("root/etc", Errno::LOOP),
            ("d/up/x", Errno::LOOP),
            ("d/last", Errno::LOOP),
            ("d/../d", Errno::XDEV),
            ("../x", Errno::XDEV),
            ("/etc", Errno::XDEV),
            ("d/f/x", Errno::NOTDIR),
        ] {
            let err = walk_beneath(fd.as_fd(), Path::new(rel), walk_flags()).expect_err(rel);
            assert_eq!(err.errno, errno, "{rel}: {err}");
        }
        let err = walk_beneath(
            fd.as_fd(),
            Path::new("d/f"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .expect_err("file as dir");
        assert_eq!(err.errno, Errno::NOTDIR);
    }

    #[test]
    fn deep_tree_reopens_released_ancestors() {
        // Deeper than MAX_HELD_FDS (4 under test), so ancestors are closed and re-opened.
        let (dir, fd) = tmp();
        let mut path = dir.path().join("deep");
        for i in 0..20 {
            path.push(format!("level{i}"));
        }
        std::fs::create_dir_all(&path).expect("mkdir");
        std::fs::write(path.join("leaf"), vec![1u8; 8192]).expect("write");
        let deep = open_dir_beneath(fd.as_fd(), Path::new("deep")).expect("open");
        let usage = tree_usage(deep.as_fd()).expect("usage");
        assert_eq!(usage.inodes, 22);
        remove_tree_at(fd.as_fd(), "deep").expect("remove");
        assert!(!dir.path().join("deep").exists());
    }

    /// A tree deeper than MAX_HELD_FDS with files at every level and a hard link.
    fn usage_tree(root: &Path) {
        let mut path = root.to_path_buf();
        for i in 0..8 {
            path.push(format!("d{i}"));
            std::fs::create_dir(&path).expect("mkdir");
            for j in 0..5 {
                std::fs::write(path.join(format!("f{j}")), vec![1u8; 4096 * (j + 1)])
                    .expect("write");
            }
        }
        std::fs::hard_link(path.join("f0"), root.join("d0/link")).expect("link");
    }

    #[test]
    fn a_walk_stopped_any_number_of_times_finds_what_one_walk_finds() {
        let (dir, fd) = tmp();
        usage_tree(dir.path());
        let whole = tree_usage(fd.as_fd()).expect("usage");
        assert_eq!(whole.inodes, 1 + 8 * 6);
        for every in [1u64, 2, 3, 7, 30] {
            let mut walk = UsageWalk::default();
            let mut runs = 0;
            let got = loop {
                runs += 1;
                // `every` entries per run, then stop.
                let mut done = 0;
                let step = walk
                    .run_until(fd.as_fd(), || {
                        done += 1;
                        done > every
                    })
                    .expect("run");
                match step {
                    WalkStep::Done(u) => break u,
                    WalkStep::Stopped => assert!(walk.in_progress()),
                }
                assert!(runs < 1000, "no progress with a stop every {every} entries");
            };
            assert_eq!(got, whole, "stopping every {every} entries");
            assert!(runs > 1, "never stopped at {every}");
            assert!(!walk.in_progress() && walk.entries() == 0);
        }
    }

    #[test]
    fn a_stopped_walk_whose_directory_was_replaced_starts_over() {
        let (dir, fd) = tmp();
        usage_tree(dir.path());
        let mut walk = UsageWalk::default();
        // Stop deep inside the chain, then replace a directory of the chain.
        let mut n = 0;
        let step = walk
            .run_until(fd.as_fd(), || {
                n += 1;
                n > 20
            })
            .expect("run");
        assert_eq!(step, WalkStep::Stopped);
        assert!(walk.frames.len() > 2, "{walk:?}");
        std::fs::rename(dir.path().join("d0/d1"), dir.path().join("moved")).expect("rename");
        std::fs::create_dir(dir.path().join("d0/d1")).expect("mkdir");
        let step = walk.run(fd.as_fd(), None).expect("run");
        // Started over: the whole tree as it is now, counted once.
        assert_eq!(step, WalkStep::Done(tree_usage(fd.as_fd()).expect("usage")));
        // A deadline already past stops at once, with nothing reported.
        let mut walk = UsageWalk::default();
        let past = Some(Instant::now());
        assert_eq!(walk.run(fd.as_fd(), past).expect("run"), WalkStep::Stopped);
        assert_eq!(walk.run(fd.as_fd(), past).expect("run"), WalkStep::Stopped);
        assert_eq!(walk.entries(), 0);
    }

    #[test]
    fn single_component_names_only() {
        let (_dir, fd) = tmp();
        for bad in ["", ".", "..", "a/b", "/a", "a\0b"] {
            let err = mkdir_at(fd.as_fd(), bad, 0o755).expect_err(bad);
            assert_eq!(err.errno, Errno::INVAL, "{bad:?}");
            assert_eq!(
                remove_tree_at(fd.as_fd(), bad).expect_err(bad).errno,
                Errno::INVAL
            );
        }
    }

    #[test]
    fn error_names_the_fd_and_path() {
        let (dir, fd) = tmp();
        let err = resolve_beneath(fd.as_fd(), Path::new("missing/x")).expect_err("missing");
        let text = err.to_string();
        assert!(text.starts_with("openat2(fd "), "{text}");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert!(text.contains("\"missing/x\""), "{text}");
    }

    #[test]
    fn mkdir_masks_mode_to_permission_bits() {
        // File-type bits above 0o7777 are dropped, not an error.
        let (dir, fd) = tmp();
        mkdir_at(fd.as_fd(), "m", 0o170_755).expect("mkdir");
        let mode = std::fs::metadata(dir.path().join("m"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }
}
