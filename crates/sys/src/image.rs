//! Image files of the `image` pool: one sparse regular file per volume, always reached
//! fd-relative from the pool's image directory, never through a symlink.
//!
//! These are unprivileged file operations (like [`crate::fs`]), so they are not part of the
//! [`crate::Kernel`] seam: tests run them on any directory they own.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FallocateFlags, FileType, Mode, OFlags, StatxFlags};
use rustix::io::Errno;

use crate::fs::fd_desc;
use crate::{SysError, SysResult};

/// How the blocks of an image are reserved on the backing filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Allocation {
    /// A sparse file: blocks are allocated as the volume writes them (thin provisioning).
    #[default]
    Sparse,
    /// Every byte is allocated up front (fallocate), so a full backing filesystem cannot make
    /// a volume's write fail later.
    Full,
}

/// Mode of a new image: owner only, the driver is the only one that opens it.
const IMAGE_MODE: u32 = 0o600;

fn name_error(op: &'static str, dir: BorrowedFd<'_>, name: &str, errno: Errno) -> SysError {
    SysError::new(op, format!("{}, {name:?}", fd_desc(dir)), errno)
}

/// Checks that `name` is one plain path component.
fn check_name(op: &'static str, dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(name_error(op, dir, name, Errno::INVAL));
    }
    Ok(())
}

/// Size in bytes and type of an open file.
fn size_and_type(fd: BorrowedFd<'_>) -> SysResult<(u64, FileType)> {
    let st = rustix::fs::statx(
        fd,
        c"",
        AtFlags::EMPTY_PATH,
        StatxFlags::SIZE | StatxFlags::TYPE,
    )
    .map_err(|e| SysError::new("statx", fd_desc(fd), e))?;
    Ok((st.stx_size, FileType::from_raw_mode(u32::from(st.stx_mode))))
}

/// The size of the image open at `fd`, in bytes.
pub fn image_size(fd: BorrowedFd<'_>) -> SysResult<u64> {
    Ok(size_and_type(fd)?.0)
}

/// Creates the image `name` in `dir` of exactly `size` bytes (`O_CREAT | O_EXCL | O_NOFOLLOW`,
/// mode 0600) and returns it open read-write. An existing entry of that name is EEXIST. If
/// sizing or allocating fails, the new file is removed again, so a retry starts clean.
pub fn create_image(
    dir: BorrowedFd<'_>,
    name: &str,
    size: u64,
    allocation: Allocation,
) -> SysResult<OwnedFd> {
    check_name("openat", dir, name)?;
    if size == 0 {
        return Err(name_error("create_image", dir, name, Errno::INVAL));
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(IMAGE_MODE),
    )
    .map_err(|e| name_error("openat", dir, name, e))?;
    let sized = (|| {
        // The umask may have taken bits away; 0600 is exact anyway, but say so explicitly.
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(IMAGE_MODE))
            .map_err(|e| SysError::new("fchmod", fd_desc(fd.as_fd()), e))?;
        rustix::fs::ftruncate(&fd, size).map_err(|e| {
            SysError::new("ftruncate", format!("{}, {size}", fd_desc(fd.as_fd())), e)
        })?;
        if allocation == Allocation::Full {
            allocate(fd.as_fd(), 0, size)?;
        }
        Ok(())
    })();
    if let Err(e) = sized {
        // Best effort: the error being returned is the one that matters.
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
        return Err(e);
    }
    Ok(fd)
}

/// Idempotent [`create_image`]: an existing regular file `name` of exactly `size` bytes is
/// opened and returned (with `false`: not created now). An existing entry of another size or
/// type is EEXIST, so a request replayed with different parameters is told apart.
pub fn ensure_image(
    dir: BorrowedFd<'_>,
    name: &str,
    size: u64,
    allocation: Allocation,
) -> SysResult<(OwnedFd, bool)> {
    match create_image(dir, name, size, allocation) {
        Ok(fd) => Ok((fd, true)),
        Err(e) if e.errno == Errno::EXIST => {
            let fd = open_image(dir, name).map_err(|open| match open.errno {
                // A symlink, directory, device, …: the name is taken by something else.
                Errno::LOOP | Errno::ISDIR | Errno::NODEV => {
                    name_error("ensure_image", dir, name, Errno::EXIST)
                }
                _ => open,
            })?;
            let have = image_size(fd.as_fd())?;
            if have != size {
                return Err(SysError::new(
                    "ensure_image",
                    format!(
                        "{}, {name:?}: exists with {have} bytes, asked for {size}",
                        fd_desc(dir)
                    ),
                    Errno::EXIST,
                ));
            }
            if allocation == Allocation::Full {
                // Allocating what is already allocated is a no-op; a crash between creation
                // and allocation is repaired here.
                allocate(fd.as_fd(), 0, size)?;
            }
            Ok((fd, false))
        }
        Err(e) => Err(e),
    }
}

/// Opens the existing image `name` in `dir` read-write (`O_RDWR | O_NOFOLLOW | O_CLOEXEC`).
///
/// The entry is first opened `O_PATH` and checked to be a regular file, then re-opened through
/// that very fd, so a device node, FIFO or directory planted under the name is never opened
/// for I/O (no side effect of opening it, no blocking): those are EISDIR (directory) or
/// ENODEV (anything else); a symlink is ELOOP; absent is ENOENT.
pub fn open_image(dir: BorrowedFd<'_>, name: &str) -> SysResult<OwnedFd> {
    check_name("openat", dir, name)?;
    let path = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| name_error("openat", dir, name, e))?;
    match size_and_type(path.as_fd())?.1 {
        FileType::RegularFile => {}
        FileType::Symlink => return Err(name_error("open_image", dir, name, Errno::LOOP)),
        FileType::Directory => return Err(name_error("open_image", dir, name, Errno::ISDIR)),
        _ => return Err(name_error("open_image", dir, name, Errno::NODEV)),
    }
    // /proc/self/fd/N is a magic link to the inode just checked: no name is looked up again.
    rustix::fs::open(
        format!("/proc/self/fd/{}", path.as_raw_fd()),
        OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| name_error("reopen", dir, name, e))
}

/// Grows the image open at `fd` to `size` bytes; never shrinks it. Returns the size it has
/// afterwards, which is larger than `size` when the image already was (growing is
/// idempotent: asking again for the same or a smaller size changes nothing). With
/// [`Allocation::Full`] the new range is allocated too.
pub fn grow_image(fd: BorrowedFd<'_>, size: u64, allocation: Allocation) -> SysResult<u64> {
    let (have, ty) = size_and_type(fd)?;
    if ty != FileType::RegularFile {
        return Err(SysError::new("grow_image", fd_desc(fd), Errno::NODEV));
    }
    if have >= size {
        return Ok(have);
    }
    if allocation == Allocation::Full {
        // Allocate first: if the backing filesystem is full, the size stays as it was.
        allocate(fd, have, size - have)?;
    }
    rustix::fs::ftruncate(fd, size)
        .map_err(|e| SysError::new("ftruncate", format!("{}, {size}", fd_desc(fd)), e))?;
    Ok(size)
}

/// Allocates `len` bytes from `offset` (fallocate mode 0: the size grows if the range ends
/// past it). ENOSPC when the backing filesystem has not that much free.
pub fn allocate(fd: BorrowedFd<'_>, offset: u64, len: u64) -> SysResult<()> {
    rustix::fs::fallocate(fd, FallocateFlags::empty(), offset, len).map_err(|e| {
        SysError::new(
            "fallocate",
            format!("{}, offset {offset}, len {len}", fd_desc(fd)),
            e,
        )
    })
}

/// Bytes the image open at `fd` occupies on the backing filesystem (st_blocks * 512).
pub fn allocated_bytes(fd: BorrowedFd<'_>) -> SysResult<u64> {
    let st = rustix::fs::statx(fd, c"", AtFlags::EMPTY_PATH, StatxFlags::BLOCKS)
        .map_err(|e| SysError::new("statx", fd_desc(fd), e))?;
    Ok(st.stx_blocks.saturating_mul(512))
}

/// Removes the image `name` from `dir` (unlinkat). Absent is not an error: returns whether
/// something was removed. A directory of that name is EISDIR and left alone.
///
/// A loop device still attached to the image keeps the inode alive; detach it first.
pub fn remove_image(dir: BorrowedFd<'_>, name: &str) -> SysResult<bool> {
    check_name("unlinkat", dir, name)?;
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => Ok(true),
        Err(Errno::NOENT) => Ok(false),
        Err(e) => Err(name_error("unlinkat", dir, name, e)),
    }
}
