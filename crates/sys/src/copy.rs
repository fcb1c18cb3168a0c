//! Copies for snapshots: one file cloned ([`clone_file`]: a reflink where the filesystem can
//! share extents, otherwise a copy that keeps holes as holes), and a whole directory tree
//! ([`copy_tree`]) copied fd-relative with its metadata, never following a symlink and never
//! entering another mount.
//!
//! Like [`crate::fs`], these are unprivileged operations on fds the caller resolved; copying
//! other users' files, device nodes or `trusted.*` attributes needs the privileges the kernel
//! asks for (the driver runs as root).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, FileType, Gid, Mode, OFlags, SeekFrom, Statx, StatxFlags, StatxTimestamp, Timespec,
    Timestamps, Uid, XattrFlags,
};
use rustix::io::Errno;

use crate::fs::{
    at_error, dir_id, fd_desc, file_type, inode_id, is_mount_root, mount_id, open_beneath, quoted,
    read_entries, reopen_parent, single_component, walk_beneath, DirId, Entry, InodeId, DIR_FLAGS,
    MAX_HELD_FDS,
};
use crate::{SysError, SysResult};

/// How [`clone_file`] made its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// FICLONE: the copy shares the source's extents (constant time, no space used until
    /// either side is written).
    Reflink,
    /// The data extents were copied (copy_file_range, or read/write where that is refused);
    /// holes stayed holes.
    Copy,
}

/// What [`copy_tree`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyStats {
    /// Regular files copied (a hard link to one already copied is counted in `hardlinks`).
    pub files: u64,
    /// Directories created, the top one included.
    pub dirs: u64,
    pub symlinks: u64,
    /// FIFOs, sockets, character and block devices, recreated with mknodat.
    pub specials: u64,
    /// Entries recreated as another link to an inode copied earlier.
    pub hardlinks: u64,
    /// Logical size of the regular files copied (holes included, each inode once).
    pub bytes: u64,
    /// Regular files copied by reflink (a subset of `files`).
    pub reflinked: u64,
    /// Entries not copied because they are on another mount (the root of a bind mount or a
    /// filesystem mounted inside the tree).
    pub skipped_mounts: u64,
    /// Extended attributes not copied: the destination does not support their namespace, or
    /// the kernel refused them (EPERM: `trusted.*` without CAP_SYS_ADMIN, …).
    pub skipped_xattrs: u64,
}

impl CopyStats {
    fn entries(&self) -> u64 {
        self.files + self.dirs + self.symlinks + self.specials + self.hardlinks
    }
}

/// How many entries between two calls of the progress callback of [`copy_tree_with_progress`].
pub const PROGRESS_EVERY: u64 = 1000;

/// Largest piece handed to one copy_file_range call, so an interrupted copy restarts from
/// somewhere near where it stopped.
const RANGE_CHUNK: usize = 64 << 20;

/// Buffer of the read/write fallback.
const RW_BUFFER: usize = 1 << 20;

// --- clone_file ------------------------------------------------------------------------------

fn pair_error(
    op: &'static str,
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    errno: Errno,
) -> SysError {
    SysError::new(op, format!("{} -> {}", fd_desc(src), fd_desc(dst)), errno)
}

/// Retries `f` while it fails with EINTR.
fn no_intr<T>(mut f: impl FnMut() -> Result<T, Errno>) -> Result<T, Errno> {
    loop {
        match f() {
            Err(Errno::INTR) => {}
            other => return other,
        }
    }
}

/// Makes the regular file `dst` (empty, open for writing) a copy of the regular file `src`
/// (open for reading), and says how.
///
/// First FICLONE, which shares the extents (btrfs, xfs with reflink, …); where the
/// filesystems cannot (EOPNOTSUPP, EXDEV, EINVAL, ENOTTY) a sparse-aware copy: the data
/// extents of `src` are found with `lseek(SEEK_DATA / SEEK_HOLE)` and only they are copied,
/// with copy_file_range (or pread/pwrite where that is refused: EXDEV, EOPNOTSUPP, ENOSYS,
/// EINVAL), then `dst` is truncated to the size of `src`, so holes — trailing ones included —
/// stay holes. The file offset of `src` is moved. A source that shrinks meanwhile ends the
/// copy early; one that grows is copied up to the size it had at the start.
///
/// Nothing is synced: see [`clone_file_at`].
pub fn clone_file(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> SysResult<CloneMethod> {
    match no_intr(|| rustix::fs::ioctl_ficlone(dst, src)) {
        Ok(()) => return Ok(CloneMethod::Reflink),
        Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY) => {}
        Err(e) => return Err(pair_error("ioctl FICLONE", src, dst, e)),
    }
    copy_sparse(src, dst)?;
    Ok(CloneMethod::Copy)
}

fn copy_sparse(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> SysResult<()> {
    let st = rustix::fs::statx(
        src,
        c"",
        AtFlags::EMPTY_PATH,
        StatxFlags::SIZE | StatxFlags::TYPE,
    )
    .map_err(|e| at_error("statx", src, b"", e))?;
    if file_type(&st) != FileType::RegularFile {
        return Err(SysError::new(
            "clone_file",
            format!("{}: not a regular file", fd_desc(src)),
            Errno::INVAL,
        ));
    }
    let size = st.stx_size;
    // Whatever dst held would otherwise show through the holes.
    no_intr(|| rustix::fs::ftruncate(dst, 0))
        .map_err(|e| SysError::new("ftruncate", format!("{}, 0", fd_desc(dst)), e))?;
    let mut copier = RangeCopier {
        src,
        dst,
        use_copy_file_range: true,
        buffer: Vec::new(),
    };
    let mut offset = 0;
    while offset < size {
        let data = match rustix::fs::seek(src, SeekFrom::Data(offset)) {
            Ok(data) => data,
            // Nothing but a hole from `offset` to the end.
            Err(Errno::NXIO) => break,
            // No SEEK_DATA here: everything is data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => offset,
            Err(e) => {
                return Err(SysError::new(
                    "lseek",
                    format!("{}, SEEK_DATA {offset}", fd_desc(src)),
                    e,
                ))
            }
        };
        if data >= size {
            break;
        }
        let hole = match rustix::fs::seek(src, SeekFrom::Hole(data)) {
            Ok(hole) => hole.min(size),
            Err(Errno::NXIO | Errno::INVAL | Errno::OPNOTSUPP) => size,
            Err(e) => {
                return Err(SysError::new(
                    "lseek",
                    format!("{}, SEEK_HOLE {data}", fd_desc(src)),
                    e,
                ))
            }
        };
        if !copier.copy(data, hole)? {
            break;
        }
        offset = hole;
    }
    no_intr(|| rustix::fs::ftruncate(dst, size))
        .map_err(|e| SysError::new("ftruncate", format!("{}, {size}", fd_desc(dst)), e))
}

/// Copies byte ranges at the same offset from one file to another.
struct RangeCopier<'a> {
    src: BorrowedFd<'a>,
    dst: BorrowedFd<'a>,
    /// Until copy_file_range is refused once; then read/write for the rest.
    use_copy_file_range: bool,
    buffer: Vec<u8>,
}

impl RangeCopier<'_> {
    /// Copies `[start, end)`; false when the source ended before `end` (it shrank).
    fn copy(&mut self, start: u64, end: u64) -> SysResult<bool> {
        let mut pos = start;
        while pos < end {
            let want = usize::try_from(end - pos).map_or(RANGE_CHUNK, |n| n.min(RANGE_CHUNK));
            let copied = if self.use_copy_file_range {
                let (mut off_in, mut off_out) = (pos, pos);
                match rustix::fs::copy_file_range(
                    self.src,
                    Some(&mut off_in),
                    self.dst,
                    Some(&mut off_out),
                    want,
                ) {
                    Ok(n) => n,
                    Err(Errno::INTR) => continue,
                    Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => {
                        self.use_copy_file_range = false;
                        continue;
                    }
                    Err(e) => {
                        return Err(SysError::new(
                            "copy_file_range",
                            format!(
                                "{} -> {}, offset {pos}, len {want}",
                                fd_desc(self.src),
                                fd_desc(self.dst)
                            ),
                            e,
                        ))
                    }
                }
            } else {
                self.read_write(pos, want)?
            };
            if copied == 0 {
                return Ok(false);
            }
            pos += copied as u64;
        }
        Ok(true)
    }

    /// One pread of at most `want` bytes at `pos`, written in full at the same offset.
    fn read_write(&mut self, pos: u64, want: usize) -> SysResult<usize> {
        if self.buffer.is_empty() {
            self.buffer = vec![0; RW_BUFFER];
        }
        let want = want.min(self.buffer.len());
        let read = no_intr(|| rustix::io::pread(self.src, &mut self.buffer[..want], pos))
            .map_err(|e| SysError::new("pread", format!("{}, {pos}", fd_desc(self.src)), e))?;
        let mut written = 0;
        while written < read {
            let at = pos + written as u64;
            let n = no_intr(|| rustix::io::pwrite(self.dst, &self.buffer[written..read], at))
                .map_err(|e| SysError::new("pwrite", format!("{}, {at}", fd_desc(self.dst)), e))?;
            if n == 0 {
                return Err(SysError::new(
                    "pwrite",
                    format!("{}, {at}: wrote nothing", fd_desc(self.dst)),
                    Errno::IO,
                ));
            }
            written += n;
        }
        Ok(read)
    }
}

/// Opens the regular file `name` of `dir` for reading without following a symlink and
/// without opening anything else: the entry is opened `O_PATH | O_NOFOLLOW`, checked to be a
/// regular file (the inode `expect` when given), then re-opened through that very fd. A FIFO
/// or device planted under the name is ENODEV (never opened, so nothing blocks); a symlink
/// ELOOP; a directory EISDIR; another inode than `expect` ESTALE. The source's atime is left
/// alone where we may (O_NOATIME).
fn open_source_file(
    dir: BorrowedFd<'_>,
    name: &CStr,
    expect: Option<InodeId>,
) -> SysResult<OwnedFd> {
    let path = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| at_error("openat", dir, name.to_bytes(), e))?;
    let st = stat_self(path.as_fd()).map_err(|e| at_error("statx", path.as_fd(), b"", e))?;
    let refuse = match file_type(&st) {
        FileType::RegularFile if expect.is_none_or(|id| id == inode_id(&st)) => None,
        FileType::RegularFile => Some(Errno::STALE),
        FileType::Symlink => Some(Errno::LOOP),
        FileType::Directory => Some(Errno::ISDIR),
        _ => Some(Errno::NODEV),
    };
    if let Some(errno) = refuse {
        return Err(at_error("open_source_file", dir, name.to_bytes(), errno));
    }
    // /proc/self/fd/N is a magic link to the inode just checked: no name is looked up again.
    let proc_path = format!("/proc/self/fd/{}", path.as_raw_fd());
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY;
    match rustix::fs::open(&proc_path, flags | OFlags::NOATIME, Mode::empty()) {
        // O_NOATIME is for the owner or CAP_FOWNER only.
        Err(Errno::PERM) => rustix::fs::open(&proc_path, flags, Mode::empty()),
        other => other,
    }
    .map_err(|e| at_error("reopen", dir, name.to_bytes(), e))
}

/// Creates `dst_name` in `dst_dir` (`O_CREAT | O_EXCL | O_NOFOLLOW`, permission bits `mode`,
/// umask not applied) as a [`clone_file`] of the regular file `src_name` of `src_dir`
/// (opened `O_NOFOLLOW`; a symlink is ELOOP, a FIFO or device ENODEV and is never opened),
/// then fsyncs it. An existing `dst_name` is EEXIST. On failure the new file is removed
/// again, so a retry starts clean. Names are single path components.
///
/// For the `image` pool: freeze the filesystem inside the image around this call (see
/// [`crate::Frozen`]) so the clone is consistent.
pub fn clone_file_at(
    src_dir: BorrowedFd<'_>,
    src_name: &str,
    dst_dir: BorrowedFd<'_>,
    dst_name: &str,
    mode: u32,
) -> SysResult<CloneMethod> {
    let src_c = single_component("openat", src_dir, src_name)?;
    let dst_c = single_component("openat", dst_dir, dst_name)?;
    let src = open_source_file(src_dir, &src_c, None)?;
    let dst = rustix::fs::openat(
        dst_dir,
        &dst_c,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| at_error("openat", dst_dir, dst_name.as_bytes(), e))?;
    let cloned = (|| {
        let method = clone_file(src.as_fd(), dst.as_fd())?;
        rustix::fs::fchmod(&dst, Mode::from_raw_mode(mode & 0o7777))
            .map_err(|e| at_error("fchmod", dst.as_fd(), b"", e))?;
        rustix::fs::fsync(&dst).map_err(|e| at_error("fsync", dst.as_fd(), b"", e))?;
        Ok(method)
    })();
    if cloned.is_err() {
        // Best effort: the error being returned is the one that matters.
        let _ = rustix::fs::unlinkat(dst_dir, &dst_c, AtFlags::empty());
    }
    cloned
}

// --- copy_tree -------------------------------------------------------------------------------

/// Everything [`copy_tree`] needs from a statx.
const COPY_STATX: StatxFlags = StatxFlags::BASIC_STATS.union(StatxFlags::MNT_ID);

fn stat_self(fd: BorrowedFd<'_>) -> Result<Statx, Errno> {
    rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, COPY_STATX)
}

/// statx of the entry itself: no symlink followed, no automount triggered.
fn stat_entry(dir: BorrowedFd<'_>, name: &CStr) -> Result<Statx, Errno> {
    rustix::fs::statx(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT,
        COPY_STATX,
    )
}

/// Owner, mode and times of a source inode: what is applied to its copy.
#[derive(Debug, Clone, Copy)]
struct Meta {
    uid: u32,
    gid: u32,
    /// Permission bits, setuid/setgid/sticky included.
    perm: u32,
    atime: StatxTimestamp,
    mtime: StatxTimestamp,
}

impl Meta {
    fn of(st: &Statx) -> Self {
        Self {
            uid: st.stx_uid,
            gid: st.stx_gid,
            perm: u32::from(st.stx_mode) & 0o7777,
            atime: st.stx_atime,
            mtime: st.stx_mtime,
        }
    }

    fn owner(&self) -> (Option<Uid>, Option<Gid>) {
        (Some(Uid::from_raw(self.uid)), Some(Gid::from_raw(self.gid)))
    }

    fn times(&self) -> Timestamps {
        let spec = |t: StatxTimestamp| Timespec {
            tv_sec: t.tv_sec,
            tv_nsec: t.tv_nsec.into(),
        };
        Timestamps {
            last_access: spec(self.atime),
            last_modification: spec(self.mtime),
        }
    }
}

/// Where the tree being copied lives: entries elsewhere are on another mount.
#[derive(Debug, Clone, Copy)]
struct RootMount {
    dev: u64,
    /// 0 when statx could not tell (kernel before 5.8).
    mount_id: u64,
}

impl RootMount {
    /// Whether `st` belongs to another mount than the tree's: the root of a mount (bind mounts
    /// of the same filesystem included), or another mount id. Where the kernel gives no mount
    /// id, another device is taken as another mount — which also refuses a btrfs nested
    /// subvolume (its own st_dev); with mount ids, that is copied like any directory.
    fn excludes(&self, st: &Statx) -> bool {
        if is_mount_root(st) {
            return true;
        }
        let id = mount_id(st);
        if self.mount_id != 0 && id != 0 {
            id != self.mount_id
        } else {
            inode_id(st).dev != self.dev
        }
    }
}

/// One directory of the copy: its source and the copy being filled.
struct Frame {
    src_at: DirId,
    dst_at: DirId,
    /// Of the source directory, applied to the copy once its contents are complete.
    meta: Meta,
    pending: Vec<Entry>,
    /// Its name in the parent (unused for the top).
    name: CString,
}

/// The walk of [`copy_tree`]: an explicit stack (a hostile tree can be deep) holding a
/// bounded number of fd pairs; closed ancestors are re-opened through `..` with an identity
/// check on the way back up, as in [`crate::fs`].
struct CopyWalk {
    cur_src: OwnedFd,
    cur_dst: OwnedFd,
    cur: Frame,
    ancestors: Vec<(Option<(OwnedFd, OwnedFd)>, Frame)>,
}

impl CopyWalk {
    fn descend(&mut self, src: OwnedFd, dst: OwnedFd, frame: Frame) {
        let parent_src = std::mem::replace(&mut self.cur_src, src);
        let parent_dst = std::mem::replace(&mut self.cur_dst, dst);
        let parent = std::mem::replace(&mut self.cur, frame);
        self.ancestors
            .push((Some((parent_src, parent_dst)), parent));
        if let Some(i) = self.ancestors.len().checked_sub(MAX_HELD_FDS + 1) {
            self.ancestors[i].0 = None;
        }
    }

    /// The names from the top to the current directory, for error messages.
    fn path(&self) -> PathBuf {
        let mut path = PathBuf::new();
        for (_, frame) in self.ancestors.iter().skip(1) {
            path.push(std::ffi::OsStr::from_bytes(frame.name.to_bytes()));
        }
        if !self.ancestors.is_empty() {
            path.push(std::ffi::OsStr::from_bytes(self.cur.name.to_bytes()));
        }
        path
    }
}

/// State shared by the whole copy.
struct Copier<'p> {
    root: RootMount,
    /// The top of the copy, for linking to an earlier copy of a hard-linked inode.
    dst_top: OwnedFd,
    /// Its identity: met inside the source (the copy made inside its own source), it is
    /// skipped rather than copied into itself.
    dst_top_id: InodeId,
    /// Inodes with more than one link, copied once: where (relative to the top of the copy).
    links: HashMap<InodeId, PathBuf>,
    stats: CopyStats,
    progress: &'p mut dyn FnMut(&CopyStats),
}

/// Copies the tree under directory `src` to a new directory `name` in `dst_parent` and says
/// what it copied; [`copy_tree_with_progress`] without progress reports.
pub fn copy_tree(
    src: BorrowedFd<'_>,
    dst_parent: BorrowedFd<'_>,
    name: &str,
) -> SysResult<CopyStats> {
    copy_tree_with_progress(src, dst_parent, name, &mut |_| {})
}

/// Copies the tree under directory `src` (any fd of it, `O_PATH` too) to a new directory
/// `name` (one path component; EEXIST when taken) in `dst_parent`, fd-relative throughout,
/// and calls `progress` every [`PROGRESS_EVERY`] entries.
///
/// - Nothing is followed: every entry is met by `statx(AT_SYMLINK_NOFOLLOW)` and opened
///   `O_NOFOLLOW` (directories `O_DIRECTORY`; regular files `O_PATH` first, checked, then
///   re-opened through that fd). Symlinks are recreated with the same target text, which is
///   never looked at.
/// - Regular files: [`clone_file`] each (reflink where the filesystem allows, holes kept).
/// - FIFOs, sockets and device nodes are recreated with mknodat, never opened.
/// - Hard links within the tree are kept: later links to an inode are linkat to its first
///   copy.
/// - Owner (fchownat with `AT_SYMLINK_NOFOLLOW`, symlinks included), then extended
///   attributes, then the mode (setuid, setgid, sticky: after the chown, which clears them),
///   then atime and mtime to the nanosecond. A directory gets its own once everything in it
///   is written, so its times and a restrictive mode do not get in the way. Extended
///   attributes of symlinks and special files go through `l*xattr` on
///   `/proc/self/fd/<dir>/<name>` (the directory by fd, the entry not followed). An attribute
///   the destination refuses (EOPNOTSUPP for its namespace, EPERM) is skipped and counted.
/// - Another mount is never entered: an entry that is the root of a mount, or on another
///   mount (by statx mount id; by st_dev where the kernel has no mount id), is skipped and
///   counted, not copied — a bind mount a pod made inside its volume stays out of the
///   snapshot. A btrfs nested subvolume has its own st_dev but the same mount: it is copied
///   as a plain directory (where mount ids are missing it is skipped as another mount).
/// - The copy is never copied into itself when `dst_parent` lies inside `src`.
/// - Deep trees: the walk is iterative and holds a bounded number of fds.
/// - At the end the destination filesystem is synced (syncfs of the new directory).
///
/// Entries that vanish while the copy runs are left out. An error stops the copy and names
/// the path inside the tree and the call that failed; the half-made copy is left for the
/// caller to remove ([`crate::fs::remove_tree_at`]).
pub fn copy_tree_with_progress(
    src: BorrowedFd<'_>,
    dst_parent: BorrowedFd<'_>,
    name: &str,
    progress: &mut dyn FnMut(&CopyStats),
) -> SysResult<CopyStats> {
    let cname = single_component("copy_tree", dst_parent, name)?;
    // The source is opened before the destination is made, so a bad source leaves nothing.
    let src_root = rustix::fs::openat(src, c".", DIR_FLAGS, Mode::empty())
        .map_err(|e| at_error("openat", src, b".", e))?;
    rustix::fs::mkdirat(dst_parent, &cname, Mode::from_raw_mode(0o700))
        .map_err(|e| at_error("mkdirat", dst_parent, name.as_bytes(), e))?;
    let dst_root = rustix::fs::openat(dst_parent, &cname, DIR_FLAGS, Mode::empty())
        .map_err(|e| at_error("openat", dst_parent, name.as_bytes(), e))?;
    copy_tree_to(src_root, dst_root, cname, progress)
}

/// Copies the contents of directory `src` into the existing, empty directory `dst` (ENOTEMPTY
/// otherwise), as [`copy_tree_with_progress`] does into a new one; `dst` itself gets the
/// source root's owner, mode, xattrs and times at the end. For a destination made beforehand
/// with properties its copy must inherit (a project quota with inheritance, so every copied
/// file is charged to it).
pub fn copy_tree_into(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    progress: &mut dyn FnMut(&CopyStats),
) -> SysResult<CopyStats> {
    let src_root = rustix::fs::openat(src, c".", DIR_FLAGS, Mode::empty())
        .map_err(|e| at_error("openat", src, b".", e))?;
    let dst_root = rustix::fs::openat(dst, c".", DIR_FLAGS, Mode::empty())
        .map_err(|e| at_error("openat", dst, b".", e))?;
    if !read_entries(dst_root.as_fd())?.is_empty() {
        return Err(at_error("copy_tree_into", dst, b"", Errno::NOTEMPTY));
    }
    copy_tree_to(src_root, dst_root, c".".to_owned(), progress)
}

/// The walk of [`copy_tree_with_progress`] and [`copy_tree_into`], from the opened roots;
/// `name` is the destination's name, for messages.
fn copy_tree_to(
    src_root: OwnedFd,
    dst_root: OwnedFd,
    cname: CString,
    progress: &mut dyn FnMut(&CopyStats),
) -> SysResult<CopyStats> {
    let src_st =
        stat_self(src_root.as_fd()).map_err(|e| at_error("statx", src_root.as_fd(), b"", e))?;
    let dst_st =
        stat_self(dst_root.as_fd()).map_err(|e| at_error("statx", dst_root.as_fd(), b"", e))?;
    let dst_top = rustix::io::fcntl_dupfd_cloexec(&dst_root, 0)
        .map_err(|e| at_error("fcntl F_DUPFD_CLOEXEC", dst_root.as_fd(), b"", e))?;
    let pending = read_entries(src_root.as_fd())?;
    let mut copier = Copier {
        root: RootMount {
            dev: inode_id(&src_st).dev,
            mount_id: mount_id(&src_st),
        },
        dst_top,
        dst_top_id: inode_id(&dst_st),
        links: HashMap::new(),
        stats: CopyStats {
            dirs: 1,
            ..CopyStats::default()
        },
        progress,
    };
    let mut walk = CopyWalk {
        cur_src: src_root,
        cur_dst: dst_root,
        cur: Frame {
            src_at: dir_id(&src_st),
            dst_at: dir_id(&dst_st),
            meta: Meta::of(&src_st),
            pending,
            name: cname,
        },
        ancestors: Vec::new(),
    };
    loop {
        if let Some(entry) = walk.cur.pending.pop() {
            let before = copier.stats.entries();
            copier.copy_entry(&mut walk, &entry.name).map_err(|e| {
                in_tree(
                    e,
                    walk.path()
                        .join(std::ffi::OsStr::from_bytes(entry.name.to_bytes())),
                )
            })?;
            let after = copier.stats.entries();
            if after / PROGRESS_EVERY != before / PROGRESS_EVERY {
                (copier.progress)(&copier.stats);
            }
            continue;
        }
        // Everything in the current directory is copied: give the copy its own metadata,
        // after making sure its parent can be reached again (a mode without search
        // permission would stop the `..` lookup for an unprivileged caller).
        let path = walk.path();
        let Some((fds, frame)) = walk.ancestors.pop() else {
            let top = walk.cur_dst.as_fd();
            copier
                .finish_dir(walk.cur_src.as_fd(), top, &walk.cur.meta)
                .map_err(|e| in_tree(e, path))?;
            rustix::fs::syncfs(top).map_err(|e| at_error("syncfs", top, b"", e))?;
            return Ok(copier.stats);
        };
        let (parent_src, parent_dst) = match fds {
            Some(fds) => fds,
            None => (
                reopen_parent(walk.cur_src.as_fd(), frame.src_at)
                    .map_err(|e| in_tree(e, path.clone()))?,
                reopen_parent(walk.cur_dst.as_fd(), frame.dst_at)
                    .map_err(|e| in_tree(e, path.clone()))?,
            ),
        };
        let child_src = std::mem::replace(&mut walk.cur_src, parent_src);
        let child_dst = std::mem::replace(&mut walk.cur_dst, parent_dst);
        let child = std::mem::replace(&mut walk.cur, frame);
        copier
            .finish_dir(child_src.as_fd(), child_dst.as_fd(), &child.meta)
            .map_err(|e| in_tree(e, path))?;
    }
}

/// Puts the path inside the tree in front of an error's arguments.
fn in_tree(e: SysError, path: PathBuf) -> SysError {
    let shown = if path.as_os_str().is_empty() {
        "the top".to_owned()
    } else {
        quoted(path.as_os_str().as_bytes())
    };
    SysError::new(e.op, format!("copying {shown}: {}", e.args), e.errno)
}

impl Copier<'_> {
    /// Copies entry `name` of the current source directory into the current copy.
    fn copy_entry(&mut self, walk: &mut CopyWalk, name: &CStr) -> SysResult<()> {
        let src = walk.cur_src.as_fd();
        let dst = walk.cur_dst.as_fd();
        let st = match stat_entry(src, name) {
            Ok(st) => st,
            // Deleted while we walked.
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(at_error("statx", src, name.to_bytes(), e)),
        };
        if self.root.excludes(&st) {
            self.stats.skipped_mounts += 1;
            return Ok(());
        }
        let id = inode_id(&st);
        let ty = file_type(&st);
        if ty != FileType::Directory && st.stx_nlink > 1 {
            if let Some(first) = self.links.get(&id) {
                self.link_to(first, dst, name)?;
                self.stats.hardlinks += 1;
                return Ok(());
            }
        }
        let meta = Meta::of(&st);
        match ty {
            FileType::Directory => {
                if id == self.dst_top_id {
                    // The copy itself, made inside its source.
                    return Ok(());
                }
                return self.enter_dir(walk, name, &st);
            }
            FileType::RegularFile => {
                let from = match open_source_file(src, name, Some(id)) {
                    Ok(fd) => fd,
                    Err(e) if e.errno == Errno::NOENT => return Ok(()),
                    Err(e) => return Err(e),
                };
                let to = rustix::fs::openat(
                    dst,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| at_error("openat", dst, name.to_bytes(), e))?;
                if clone_file(from.as_fd(), to.as_fd())? == CloneMethod::Reflink {
                    self.stats.reflinked += 1;
                }
                self.stats.files += 1;
                self.stats.bytes += st.stx_size;
                self.finish_fd(from.as_fd(), to.as_fd(), &meta)?;
            }
            FileType::Symlink => {
                let target = match rustix::fs::readlinkat(src, name, Vec::new()) {
                    Ok(target) => target,
                    Err(Errno::NOENT) => return Ok(()),
                    Err(e) => return Err(at_error("readlinkat", src, name.to_bytes(), e)),
                };
                rustix::fs::symlinkat(&target, dst, name)
                    .map_err(|e| at_error("symlinkat", dst, name.to_bytes(), e))?;
                self.stats.symlinks += 1;
                self.finish_entry(src, dst, name, &meta, false)?;
            }
            FileType::Fifo
            | FileType::Socket
            | FileType::CharacterDevice
            | FileType::BlockDevice => {
                let dev = rustix::fs::makedev(st.stx_rdev_major, st.stx_rdev_minor);
                rustix::fs::mknodat(dst, name, ty, Mode::from_raw_mode(0o600), dev)
                    .map_err(|e| at_error("mknodat", dst, name.to_bytes(), e))?;
                self.stats.specials += 1;
                self.finish_entry(src, dst, name, &meta, true)?;
            }
            FileType::Unknown => {
                return Err(at_error("copy_tree", src, name.to_bytes(), Errno::INVAL));
            }
        }
        if st.stx_nlink > 1 {
            let mut at = walk.path();
            at.push(std::ffi::OsStr::from_bytes(name.to_bytes()));
            self.links.insert(id, at);
        }
        Ok(())
    }

    /// Opens the source directory `name`, creates its copy, and makes it the current one.
    fn enter_dir(&mut self, walk: &mut CopyWalk, name: &CStr, st: &Statx) -> SysResult<()> {
        let src = walk.cur_src.as_fd();
        let dst = walk.cur_dst.as_fd();
        let from = match rustix::fs::openat(src, name, DIR_FLAGS, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(()),
            Err(e) => return Err(at_error("openat", src, name.to_bytes(), e)),
        };
        let opened =
            stat_self(from.as_fd()).map_err(|e| at_error("statx", from.as_fd(), b"", e))?;
        if inode_id(&opened) != inode_id(st) {
            // Replaced between statx and open: not the directory we decided to copy.
            return Err(at_error("openat", src, name.to_bytes(), Errno::STALE));
        }
        if self.root.excludes(&opened) {
            // A mount appeared there meanwhile.
            self.stats.skipped_mounts += 1;
            return Ok(());
        }
        rustix::fs::mkdirat(dst, name, Mode::from_raw_mode(0o700))
            .map_err(|e| at_error("mkdirat", dst, name.to_bytes(), e))?;
        let to = rustix::fs::openat(dst, name, DIR_FLAGS, Mode::empty())
            .map_err(|e| at_error("openat", dst, name.to_bytes(), e))?;
        let to_st = stat_self(to.as_fd()).map_err(|e| at_error("statx", to.as_fd(), b"", e))?;
        let pending = read_entries(from.as_fd())?;
        self.stats.dirs += 1;
        walk.descend(
            from,
            to,
            Frame {
                src_at: dir_id(&opened),
                dst_at: dir_id(&to_st),
                meta: Meta::of(&opened),
                pending,
                name: name.to_owned(),
            },
        );
        Ok(())
    }

    /// Links `name` in `dst` to the copy at `first` (relative to the top of the copy).
    fn link_to(&self, first: &Path, dst: BorrowedFd<'_>, name: &CStr) -> SysResult<()> {
        let (parent, first_name) = match (first.parent(), first.file_name()) {
            (Some(parent), Some(file)) => (parent, file),
            _ => return Err(at_error("linkat", dst, name.to_bytes(), Errno::INVAL)),
        };
        let parent_fd = if parent.as_os_str().is_empty() {
            None
        } else {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            // Very deep: too long for one path; one component at a time then.
            Some(match open_beneath(self.dst_top.as_fd(), parent, flags) {
                Err(e) if e.errno == Errno::NAMETOOLONG => {
                    walk_beneath(self.dst_top.as_fd(), parent, flags)
                }
                other => other,
            }?)
        };
        let from = parent_fd
            .as_ref()
            .map_or(self.dst_top.as_fd(), |fd| fd.as_fd());
        rustix::fs::linkat(from, first_name, dst, name, AtFlags::empty()).map_err(|e| {
            SysError::new(
                "linkat",
                format!(
                    "{}, {} -> {}, {}",
                    fd_desc(from),
                    quoted(first_name.as_bytes()),
                    fd_desc(dst),
                    quoted(name.to_bytes())
                ),
                e,
            )
        })
    }

    /// Owner, extended attributes, mode, times of a copy open at `to` (a regular file or a
    /// directory), from the source open at `from`.
    fn finish_fd(
        &mut self,
        from: BorrowedFd<'_>,
        to: BorrowedFd<'_>,
        meta: &Meta,
    ) -> SysResult<()> {
        let (uid, gid) = meta.owner();
        rustix::fs::fchown(to, uid, gid).map_err(|e| at_error("fchown", to, b"", e))?;
        copy_xattrs(XattrAt::Fd(from), XattrAt::Fd(to), &mut self.stats)?;
        rustix::fs::fchmod(to, Mode::from_raw_mode(meta.perm))
            .map_err(|e| at_error("fchmod", to, b"", e))?;
        rustix::fs::futimens(to, &meta.times()).map_err(|e| at_error("futimens", to, b"", e))
    }

    fn finish_dir(
        &mut self,
        from: BorrowedFd<'_>,
        to: BorrowedFd<'_>,
        meta: &Meta,
    ) -> SysResult<()> {
        self.finish_fd(from, to, meta)
    }

    /// Owner, extended attributes, mode (unless a symlink), times of the entry `name` of
    /// `dst`, a symlink or special file that is never opened, from entry `name` of `src`.
    fn finish_entry(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        name: &CStr,
        meta: &Meta,
        set_mode: bool,
    ) -> SysResult<()> {
        let (uid, gid) = meta.owner();
        rustix::fs::chownat(dst, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| at_error("fchownat", dst, name.to_bytes(), e))?;
        let from = proc_entry(src, name);
        let to = proc_entry(dst, name);
        copy_xattrs(XattrAt::Path(&from), XattrAt::Path(&to), &mut self.stats)?;
        if set_mode {
            // Not a symlink (we just made it with mknodat), so nothing is followed.
            rustix::fs::chmodat(dst, name, Mode::from_raw_mode(meta.perm), AtFlags::empty())
                .map_err(|e| at_error("fchmodat", dst, name.to_bytes(), e))?;
        }
        rustix::fs::utimensat(dst, name, &meta.times(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| at_error("utimensat", dst, name.to_bytes(), e))
    }
}

/// `/proc/self/fd/<dir>/<name>`: the directory reached through its fd, `name` one component.
fn proc_entry(dir: BorrowedFd<'_>, name: &CStr) -> CString {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    // Neither part holds a NUL: `name` came from a CStr.
    CString::new(path).unwrap_or_default()
}

// --- extended attributes ---------------------------------------------------------------------

/// Where extended attributes are read or written.
#[derive(Debug, Clone, Copy)]
enum XattrAt<'a> {
    /// A real fd: the `f*xattr` calls.
    Fd(BorrowedFd<'a>),
    /// A `/proc/self/fd/<dir>/<name>` path for the `l*xattr` calls, which do not follow the
    /// last component (a symlink, or a special file that must not be opened).
    Path(&'a CStr),
}

impl XattrAt<'_> {
    fn desc(self) -> String {
        match self {
            XattrAt::Fd(fd) => fd_desc(fd),
            XattrAt::Path(path) => quoted(path.to_bytes()),
        }
    }

    /// The names, NUL-separated.
    fn list(self) -> Result<Vec<u8>, Errno> {
        loop {
            let size = no_intr(|| match self {
                XattrAt::Fd(fd) => rustix::fs::flistxattr_query(fd),
                XattrAt::Path(path) => rustix::fs::llistxattr_query(path),
            })?;
            let mut buf = vec![0u8; size];
            match no_intr(|| match self {
                XattrAt::Fd(fd) => rustix::fs::flistxattr(fd, &mut buf[..]),
                XattrAt::Path(path) => rustix::fs::llistxattr(path, &mut buf[..]),
            }) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                // Grew between the two calls.
                Err(Errno::RANGE) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn get(self, name: &CStr) -> Result<Vec<u8>, Errno> {
        loop {
            let size = no_intr(|| match self {
                XattrAt::Fd(fd) => rustix::fs::fgetxattr_query(fd, name),
                XattrAt::Path(path) => rustix::fs::lgetxattr_query(path, name),
            })?;
            let mut buf = vec![0u8; size];
            match no_intr(|| match self {
                XattrAt::Fd(fd) => rustix::fs::fgetxattr(fd, name, &mut buf[..]),
                XattrAt::Path(path) => rustix::fs::lgetxattr(path, name, &mut buf[..]),
            }) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Errno::RANGE) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn set(self, name: &CStr, value: &[u8]) -> Result<(), Errno> {
        no_intr(|| match self {
            XattrAt::Fd(fd) => rustix::fs::fsetxattr(fd, name, value, XattrFlags::empty()),
            XattrAt::Path(path) => rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()),
        })
    }
}

/// Copies every extended attribute of `from` to `to`. One the destination refuses
/// (EOPNOTSUPP for its namespace, EPERM) is counted in `skipped_xattrs`; a source without
/// extended attributes support has none to copy.
fn copy_xattrs(from: XattrAt<'_>, to: XattrAt<'_>, stats: &mut CopyStats) -> SysResult<()> {
    let names = match from.list() {
        Ok(names) => names,
        Err(Errno::OPNOTSUPP) => return Ok(()),
        Err(e) => return Err(SysError::new("listxattr", from.desc(), e)),
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = CString::new(name) else {
            continue;
        };
        let value = match from.get(&name) {
            Ok(value) => value,
            // Removed since the listing.
            Err(Errno::NODATA) => continue,
            Err(e) => {
                return Err(SysError::new(
                    "getxattr",
                    format!("{}, {}", from.desc(), quoted(name.to_bytes())),
                    e,
                ))
            }
        };
        match to.set(&name, &value) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP | Errno::PERM) => stats.skipped_xattrs += 1,
            Err(e) => {
                return Err(SysError::new(
                    "setxattr",
                    format!("{}, {}", to.desc(), quoted(name.to_bytes())),
                    e,
                ))
            }
        }
    }
    Ok(())
}

// The integration tests' helpers (root detection, scratch filesystems, mount guards).
#[cfg(test)]
#[macro_use]
#[path = "../tests/common/mod.rs"]
mod test_common;

#[cfg(test)]
mod tests {
    use super::test_common::{mount_btrfs, mount_ext4, mount_xfs, root_or_skip, MountGuard};
    use super::*;
    use crate::fs::{open_trusted_dir, remove_tree_at};
    use crate::{Frozen, Kernel, LinuxKernel};
    use std::io::{Read, Write};
    use std::os::unix::fs::{
        chown, lchown, symlink, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
    };
    use std::time::Duration;

    const GIB: u64 = 1 << 30;

    fn tmp() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = open_trusted_dir(dir.path()).expect("open tempdir");
        (dir, fd)
    }

    /// A `size`-byte sparse file with `data` written at each offset.
    fn sparse_file(path: &Path, size: u64, data: &[(u64, &[u8])]) {
        let file = std::fs::File::create(path).expect("create");
        file.set_len(size).expect("set_len");
        for (offset, bytes) in data {
            std::os::unix::fs::FileExt::write_all_at(&file, bytes, *offset).expect("write");
        }
        file.sync_all().expect("fsync");
    }

    /// Byte-for-byte comparison, holes read as zeros.
    fn assert_same_content(a: &Path, b: &Path) {
        let (mut fa, mut fb) = (
            std::fs::File::open(a).expect("open a"),
            std::fs::File::open(b).expect("open b"),
        );
        assert_eq!(
            fa.metadata().expect("stat").len(),
            fb.metadata().expect("stat").len(),
            "sizes of {} and {}",
            a.display(),
            b.display()
        );
        let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
        let mut offset = 0u64;
        loop {
            let n = fa.read(&mut ba).expect("read a");
            fb.read_exact(&mut bb[..n]).expect("read b");
            assert!(ba[..n] == bb[..n], "contents differ near offset {offset}");
            if n == 0 {
                return;
            }
            offset += n as u64;
        }
    }

    fn blocks(path: &Path) -> u64 {
        std::fs::symlink_metadata(path).expect("stat").blocks()
    }

    /// A 1 GiB file with two small data regions, cloned into `dir`; returns the method.
    fn clone_sparse_gib(dir: &Path) -> CloneMethod {
        let a = vec![0xa5u8; 64 << 10];
        let b = b"the end of a sparse file".to_vec();
        sparse_file(
            &dir.join("src"),
            GIB,
            &[(40_960, &a), (GIB / 2 + 12_345, &b)],
        );
        let fd = open_trusted_dir(dir).expect("open");
        let method =
            clone_file_at(fd.as_fd(), "src", fd.as_fd(), "dst", 0o640).expect("clone_file_at");
        assert_same_content(&dir.join("src"), &dir.join("dst"));
        let meta = std::fs::metadata(dir.join("dst")).expect("stat");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        // Two small regions: a few hundred KiB at most, nowhere near the 1 GiB size.
        assert!(
            blocks(&dir.join("dst")) * 512 < 2 << 20,
            "holes filled: {} blocks ({method:?})",
            blocks(&dir.join("dst"))
        );
        method
    }

    #[test]
    fn clone_file_keeps_holes_here() {
        // Whatever the temp directory's filesystem is: a reflink or a sparse copy.
        let (dir, _fd) = tmp();
        clone_sparse_gib(dir.path());
    }

    #[test]
    fn sparse_copy_without_reflink_keeps_holes() {
        // The fallback itself, whatever the filesystem could do: a file with a leading hole,
        // data, and a trailing hole.
        let (dir, fd) = tmp();
        let data = vec![7u8; 300_000];
        sparse_file(&dir.path().join("src"), 64 << 20, &[(1 << 20, &data)]);
        let src = open_source_file(fd.as_fd(), c"src", None).expect("open");
        let dst = std::fs::File::create(dir.path().join("dst")).expect("create");
        copy_sparse(src.as_fd(), dst.as_fd()).expect("copy_sparse");
        assert_same_content(&dir.path().join("src"), &dir.path().join("dst"));
        assert!(blocks(&dir.path().join("dst")) * 512 < 1 << 20);
        // The read/write path too.
        let dst2 = std::fs::File::create(dir.path().join("dst2")).expect("create");
        let mut copier = RangeCopier {
            src: src.as_fd(),
            dst: dst2.as_fd(),
            use_copy_file_range: false,
            buffer: Vec::new(),
        };
        assert!(copier.copy(1 << 20, (1 << 20) + 300_000).expect("copy"));
        dst2.set_len(64 << 20).expect("set_len");
        assert_same_content(&dir.path().join("src"), &dir.path().join("dst2"));
    }

    #[test]
    fn clone_file_at_opens_only_regular_files() {
        let (dir, fd) = tmp();
        std::fs::write(dir.path().join("file"), b"x").expect("write");
        symlink("file", dir.path().join("link")).expect("symlink");
        rustix::fs::mknodat(
            fd.as_fd(),
            "fifo",
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        std::fs::create_dir(dir.path().join("dir")).expect("mkdir");
        for (name, errno) in [
            ("link", Errno::LOOP),
            ("fifo", Errno::NODEV),
            ("dir", Errno::ISDIR),
            ("missing", Errno::NOENT),
        ] {
            let err = clone_file_at(fd.as_fd(), name, fd.as_fd(), "out", 0o600).expect_err(name);
            assert_eq!(err.errno, errno, "{name}: {err}");
            assert!(
                !dir.path().join("out").exists(),
                "{name}: left a file behind"
            );
        }
        let err = clone_file_at(fd.as_fd(), "file", fd.as_fd(), "dir", 0o600).expect_err("taken");
        assert_eq!(err.errno, Errno::EXIST);
        assert_eq!(
            clone_file_at(fd.as_fd(), "file", fd.as_fd(), "../x", 0o600)
                .expect_err("two components")
                .errno,
            Errno::INVAL
        );
    }

    #[test]
    fn copy_tree_refuses_an_existing_name() {
        let (dir, fd) = tmp();
        std::fs::create_dir(dir.path().join("src")).expect("mkdir");
        std::fs::create_dir(dir.path().join("taken")).expect("mkdir");
        let src = open_trusted_dir(&dir.path().join("src")).expect("open");
        let err = copy_tree(src.as_fd(), fd.as_fd(), "taken").expect_err("exists");
        assert_eq!(err.errno, Errno::EXIST);
        assert_eq!(
            copy_tree(src.as_fd(), fd.as_fd(), "a/b")
                .expect_err("path")
                .errno,
            Errno::INVAL
        );
    }

    #[test]
    fn copy_tree_into_its_own_source_skips_itself() {
        let (dir, fd) = tmp();
        std::fs::write(dir.path().join("f"), b"data").expect("write");
        let stats = copy_tree(fd.as_fd(), fd.as_fd(), "copy").expect("copy");
        assert_eq!((stats.files, stats.dirs), (1, 1), "{stats:?}");
        assert_eq!(
            std::fs::read(dir.path().join("copy/f")).expect("read"),
            b"data"
        );
        assert!(!dir.path().join("copy/copy").exists());
    }

    /// Makes a chain of `depth` directories `d` under `top` (fd-relative: the path is longer
    /// than PATH_MAX) and calls `leaf` with the deepest.
    fn deep_chain(top: BorrowedFd<'_>, depth: usize, leaf: impl FnOnce(BorrowedFd<'_>)) {
        let mut cur = rustix::fs::openat(top, c".", DIR_FLAGS, Mode::empty()).expect("open");
        for _ in 0..depth {
            rustix::fs::mkdirat(&cur, c"d", Mode::from_raw_mode(0o755)).expect("mkdir");
            cur = rustix::fs::openat(&cur, c"d", DIR_FLAGS, Mode::empty()).expect("open");
        }
        leaf(cur.as_fd());
    }

    #[test]
    fn copy_tree_survives_a_deep_chain() {
        const DEPTH: usize = 5000;
        let (dir, fd) = tmp();
        mkdir_in(fd.as_fd(), "src");
        let src = open_trusted_dir(&dir.path().join("src")).expect("open");
        deep_chain(src.as_fd(), DEPTH, |leaf| {
            let f = rustix::fs::openat(
                leaf,
                c"leaf",
                OFlags::WRONLY | OFlags::CREATE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
            )
            .expect("create leaf");
            rustix::io::write(&f, b"bottom").expect("write");
            // A hard link from the bottom to the top: its first copy is far away.
            rustix::fs::linkat(leaf, c"leaf", src.as_fd(), c"top-link", AtFlags::empty())
                .expect("link");
        });
        let mut reports = 0;
        let stats = copy_tree_with_progress(src.as_fd(), fd.as_fd(), "copy", &mut |_| reports += 1)
            .expect("copy_tree");
        assert_eq!(stats.dirs, DEPTH as u64 + 1, "{stats:?}");
        assert_eq!((stats.files, stats.hardlinks), (1, 1), "{stats:?}");
        assert_eq!(reports, (DEPTH as u64 + 3) / PROGRESS_EVERY);
        // Walk down the copy.
        let mut cur = open_trusted_dir(&dir.path().join("copy")).expect("open copy");
        for _ in 0..DEPTH {
            cur = rustix::fs::openat(&cur, c"d", DIR_FLAGS, Mode::empty()).expect("descend");
        }
        let leaf = rustix::fs::statx(&cur, c"leaf", AtFlags::empty(), StatxFlags::BASIC_STATS)
            .expect("leaf");
        assert_eq!((leaf.stx_size, leaf.stx_nlink), (6, 2));
        let top = std::fs::metadata(dir.path().join("copy/top-link")).expect("top link");
        assert_eq!(top.ino(), leaf.stx_ino);
        remove_tree_at(fd.as_fd(), "copy").expect("remove copy");
        remove_tree_at(fd.as_fd(), "src").expect("remove src");
    }

    fn mkdir_in(dir: BorrowedFd<'_>, name: &str) {
        rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755)).expect("mkdir");
    }

    fn set_times(path: &Path, sec: i64, nsec: i64) {
        let t = Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        };
        rustix::fs::utimensat(
            CWD_FD,
            path,
            &Timestamps {
                last_access: t,
                last_modification: t,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .expect("utimensat");
    }

    const CWD_FD: BorrowedFd<'static> = rustix::fs::CWD;

    fn mtime_ns(path: &Path) -> (i64, i64) {
        let m = std::fs::symlink_metadata(path).expect("stat");
        (m.mtime(), m.mtime_nsec())
    }

    #[test]
    fn copy_tree_is_faithful() {
        if !root_or_skip("copy_tree_is_faithful") {
            return;
        }
        let work = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let bound = tempfile::tempdir().expect("tempdir");
        let s = work.path().join("src");
        std::fs::create_dir_all(s.join("a/b/c")).expect("mkdir");
        std::fs::write(s.join("a/b/c/deep.txt"), b"deep").expect("write");
        sparse_file(
            &s.join("sparse"),
            64 << 20,
            &[(0, b"head"), (32 << 20, b"middle")],
        );
        symlink("/etc/passwd", s.join("passwd")).expect("symlink");
        symlink("no/such/target", s.join("dangling")).expect("symlink");
        std::fs::write(outside.path().join("secret"), b"s").expect("write");
        symlink(outside.path(), s.join("out")).expect("symlink");
        std::fs::write(s.join("h1"), b"linked").expect("write");
        std::fs::hard_link(s.join("h1"), s.join("a/h2")).expect("link");
        let src_fd = open_trusted_dir(&s).expect("open src");
        rustix::fs::mknodat(
            &src_fd,
            "fifo",
            FileType::Fifo,
            Mode::from_raw_mode(0o640),
            0,
        )
        .expect("mkfifo");
        rustix::fs::mknodat(
            &src_fd,
            "null",
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .expect("mknod");
        let _socket = std::os::unix::net::UnixListener::bind(s.join("sock")).expect("socket");
        std::fs::create_dir(s.join("sgid")).expect("mkdir");
        std::fs::write(s.join("suid"), b"#!/bin/true\n").expect("write");
        for name in ["sgid", "suid", "fifo", "a", "h1"] {
            chown(s.join(name), Some(1234), Some(5678)).expect("chown");
        }
        lchown(s.join("passwd"), Some(1234), Some(5678)).expect("lchown");
        std::fs::set_permissions(s.join("sgid"), std::fs::Permissions::from_mode(0o2775))
            .expect("chmod");
        std::fs::set_permissions(s.join("suid"), std::fs::Permissions::from_mode(0o4755))
            .expect("chmod");
        std::fs::set_permissions(s.join("a/b"), std::fs::Permissions::from_mode(0o1750))
            .expect("chmod");
        // mknodat's mode met the umask.
        for (name, mode) in [("null", 0o666), ("fifo", 0o640)] {
            std::fs::set_permissions(s.join(name), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
        }
        for (path, value) in [
            (s.join("h1"), &b"on a file"[..]),
            (s.join("a"), b"on a dir"),
        ] {
            rustix::fs::setxattr(&path, "user.stowage", value, XattrFlags::empty())
                .expect("setxattr");
        }
        std::fs::create_dir(s.join("mnt")).expect("mkdir");
        std::fs::write(bound.path().join("bound-file"), b"b").expect("write");
        let guard = MountGuard(s.join("mnt"));
        rustix::mount::mount_bind(bound.path(), s.join("mnt")).expect("bind mount");
        // Times last, after everything written into the directories.
        set_times(&s.join("a/b/c/deep.txt"), 1_000_000_000, 123_456_789);
        set_times(&s.join("sparse"), 1_500_000_000, 1);
        set_times(&s.join("passwd"), 1_200_000_000, 999_999_999);
        set_times(&s.join("a/b"), 1_300_000_000, 42);
        set_times(&s.join("a"), 1_310_000_000, 43);
        set_times(&s, 1_320_000_000, 44);
        let passwd_before = (
            std::fs::read("/etc/passwd").expect("read"),
            mtime_ns(Path::new("/etc/passwd")),
        );
        let outside_before = std::fs::read_dir(outside.path()).expect("ls").count();

        let dst_parent = open_trusted_dir(work.path()).expect("open");
        let stats = copy_tree(src_fd.as_fd(), dst_parent.as_fd(), "copy").expect("copy_tree");
        let c = work.path().join("copy");

        assert_eq!(
            stats,
            CopyStats {
                files: 4,
                dirs: 5,
                symlinks: 3,
                specials: 3,
                hardlinks: 1,
                bytes: 4 + (64 << 20) + 6 + 12,
                reflinked: stats.reflinked,
                skipped_mounts: 1,
                skipped_xattrs: 0,
            }
        );
        // The bind mount: neither it nor its contents.
        assert!(!c.join("mnt").exists());
        assert_eq!(std::fs::read_dir(bound.path()).expect("ls").count(), 1);
        drop(guard);
        // Files, holes.
        assert_eq!(
            std::fs::read(c.join("a/b/c/deep.txt")).expect("read"),
            b"deep"
        );
        assert_same_content(&s.join("sparse"), &c.join("sparse"));
        assert!(blocks(&c.join("sparse")) * 512 < 1 << 20, "holes filled");
        // Symlinks: same text, targets untouched and not followed.
        for (name, target) in [
            ("passwd", Path::new("/etc/passwd")),
            ("dangling", Path::new("no/such/target")),
            ("out", outside.path()),
        ] {
            let meta = std::fs::symlink_metadata(c.join(name)).expect(name);
            assert!(meta.file_type().is_symlink(), "{name}");
            assert_eq!(std::fs::read_link(c.join(name)).expect(name), target);
        }
        assert_eq!(
            passwd_before,
            (
                std::fs::read("/etc/passwd").expect("read"),
                mtime_ns(Path::new("/etc/passwd"))
            )
        );
        assert_eq!(
            std::fs::read_dir(outside.path()).expect("ls").count(),
            outside_before
        );
        let copied: Vec<String> = std::fs::read_dir(&c)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!copied.iter().any(|n| n == "secret" || n == "bound-file"));
        // Hard links.
        let (h1, h2) = (
            std::fs::metadata(c.join("h1")).expect("h1"),
            std::fs::metadata(c.join("a/h2")).expect("h2"),
        );
        assert_eq!((h1.ino(), h1.nlink()), (h2.ino(), 2));
        // Special files.
        let types = |name: &str| std::fs::symlink_metadata(c.join(name)).expect(name);
        assert!(types("fifo").file_type().is_fifo());
        assert!(types("sock").file_type().is_socket());
        assert!(types("null").file_type().is_char_device());
        assert_eq!(types("null").rdev(), rustix::fs::makedev(1, 3));
        // Owners and modes.
        for name in ["sgid", "suid", "fifo", "a", "h1", "passwd"] {
            let meta = types(name);
            assert_eq!((meta.uid(), meta.gid()), (1234, 5678), "{name}");
        }
        for (name, mode) in [
            ("sgid", 0o2775),
            ("suid", 0o4755),
            ("a/b", 0o1750),
            ("fifo", 0o640),
            ("null", 0o666),
        ] {
            assert_eq!(types(name).mode() & 0o7777, mode, "{name}");
        }
        assert_eq!(
            types("").mode() & 0o7777,
            std::fs::metadata(&s).expect("src").mode() & 0o7777
        );
        // Extended attributes.
        for (name, value) in [("h1", &b"on a file"[..]), ("a", b"on a dir")] {
            let mut buf = [0u8; 64];
            let n =
                rustix::fs::getxattr(c.join(name), "user.stowage", &mut buf[..]).expect("getxattr");
            assert_eq!(&buf[..n], value, "{name}");
        }
        // Times, directories' included (set after their contents were written).
        for name in ["a/b/c/deep.txt", "sparse", "passwd", "a/b", "a", ""] {
            assert_eq!(mtime_ns(&c.join(name)), mtime_ns(&s.join(name)), "{name:?}");
        }
        assert_eq!(mtime_ns(&c.join("a/b")), (1_300_000_000, 42));
        remove_tree_at(dst_parent.as_fd(), "copy").expect("remove");
    }

    #[test]
    fn clone_file_reflinks_on_btrfs_and_xfs() {
        if !root_or_skip("clone_file_reflinks_on_btrfs_and_xfs") {
            return;
        }
        type Mounter = fn(&Path, &str) -> Option<(PathBuf, MountGuard)>;
        for (fs, mount) in [("btrfs", mount_btrfs as Mounter), ("xfs", mount_xfs)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let test = format!("clone_file_reflinks_on_btrfs_and_xfs ({fs})");
            let Some((mnt, _guard)) = mount(dir.path(), &test) else {
                continue;
            };
            std::fs::create_dir(mnt.join("files")).expect("mkdir");
            let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
            sparse_file(&mnt.join("files/src"), 16 << 20, &[(4 << 20, &data)]);
            let fd = open_trusted_dir(&mnt.join("files")).expect("open");
            let method = clone_file_at(fd.as_fd(), "src", fd.as_fd(), "dst", 0o600).expect(fs);
            assert_eq!(method, CloneMethod::Reflink, "{fs}");
            assert_same_content(&mnt.join("files/src"), &mnt.join("files/dst"));
            // A tree copy reflinks file by file.
            let top = open_trusted_dir(&mnt).expect("open");
            let stats = copy_tree(fd.as_fd(), top.as_fd(), "copy").expect("copy_tree");
            assert_eq!((stats.files, stats.reflinked), (2, 2), "{fs}: {stats:?}");
            assert_same_content(&mnt.join("files/src"), &mnt.join("copy/dst"));
            drop((fd, top));
        }
    }

    #[test]
    fn copy_tree_copies_a_nested_btrfs_subvolume_as_a_directory() {
        if !root_or_skip("copy_tree_copies_a_nested_btrfs_subvolume_as_a_directory") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let test = "copy_tree_copies_a_nested_btrfs_subvolume_as_a_directory";
        let Some((mnt, _guard)) = mount_btrfs(dir.path(), test) else {
            return;
        };
        std::fs::create_dir(mnt.join("vol")).expect("mkdir");
        let vol = open_trusted_dir(&mnt.join("vol")).expect("open");
        crate::btrfs::create_subvolume(vol.as_fd(), "nested").expect("subvolume");
        std::fs::write(mnt.join("vol/nested/inside"), b"in a subvolume").expect("write");
        let top = open_trusted_dir(&mnt).expect("open");
        let stats = copy_tree(vol.as_fd(), top.as_fd(), "copy").expect("copy_tree");
        assert_eq!(stats.skipped_mounts, 0, "{stats:?}");
        assert_eq!(
            std::fs::read(mnt.join("copy/nested/inside")).expect("read"),
            b"in a subvolume"
        );
        drop((vol, top));
    }

    #[test]
    fn clone_file_copies_on_ext4_keeping_holes() {
        if !root_or_skip("clone_file_copies_on_ext4_keeping_holes") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((mnt, _guard)) = mount_ext4(dir.path(), "clone_file_copies_on_ext4_keeping_holes")
        else {
            return;
        };
        assert_eq!(clone_sparse_gib(&mnt), CloneMethod::Copy);
    }

    #[test]
    fn copy_tree_error_names_the_path_and_the_call() {
        if !root_or_skip("copy_tree_error_names_the_path_and_the_call") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let test = "copy_tree_error_names_the_path_and_the_call";
        let Some((mnt, _guard)) = mount_ext4(dir.path(), test) else {
            return;
        };
        // 24 MiB of data does not fit the 16 MiB scratch filesystem.
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("a/b")).expect("mkdir");
        std::fs::write(src.path().join("a/b/big"), vec![1u8; 24 << 20]).expect("write");
        let src_fd = open_trusted_dir(src.path()).expect("open");
        let dst = open_trusted_dir(&mnt).expect("open");
        let err = copy_tree(src_fd.as_fd(), dst.as_fd(), "copy").expect_err("ENOSPC");
        assert_eq!(err.errno, Errno::NOSPC, "{err}");
        let text = err.to_string();
        assert!(text.contains("copying \"a/b/big\""), "{text}");
        assert!(["copy_file_range", "pwrite"].contains(&err.op), "{text}");
        // The caller removes the half copy.
        remove_tree_at(dst.as_fd(), "copy").expect("remove");
        drop(dst);
    }

    #[test]
    fn freeze_blocks_writes_until_thawed() {
        if !root_or_skip("freeze_blocks_writes_until_thawed") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((mnt, _guard)) = mount_ext4(dir.path(), "freeze_blocks_writes_until_thawed")
        else {
            return;
        };
        let fs = open_trusted_dir(&mnt).expect("open");
        let kernel = LinuxKernel;
        assert!(
            !kernel.thaw_fs(fs.as_fd()).expect("thaw unfrozen"),
            "not frozen"
        );
        let mut file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(mnt.join("written"))
            .expect("create");
        let frozen = Frozen::new(&kernel, fs.as_fd()).expect("freeze");
        assert_eq!(
            kernel.freeze_fs(fs.as_fd()).expect_err("twice").errno,
            Errno::BUSY
        );
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = std::thread::spawn(move || {
            let result = file
                .write_all(b"after the freeze")
                .and_then(|()| file.sync_all());
            let _ = done_tx.send(result.map_err(|e| e.to_string()));
        });
        assert!(
            matches!(
                done_rx.recv_timeout(Duration::from_millis(200)),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            ),
            "a write went through a frozen filesystem"
        );
        frozen.thaw().expect("thaw");
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the write did not finish after the thaw")
            .expect("write");
        writer.join().expect("writer");
        assert_eq!(
            std::fs::read(mnt.join("written")).expect("read"),
            b"after the freeze"
        );
        assert!(
            !kernel.thaw_fs(fs.as_fd()).expect("thaw again"),
            "not frozen"
        );

        // Dropped without thaw(): thawed all the same.
        drop(Frozen::new(&kernel, fs.as_fd()).expect("freeze"));
        assert!(
            !kernel.thaw_fs(fs.as_fd()).expect("thaw"),
            "the guard thawed"
        );
        std::fs::write(mnt.join("again"), b"x").expect("write after the guard");
    }
}
