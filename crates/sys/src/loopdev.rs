//! Loop devices through the kernel's own interface (`/dev/loop-control`, the `LOOP_*`
//! ioctls), no `losetup`.
//!
//! # Lifetime of a device, and who must hold what
//!
//! A device configured with [`LoopOptions::autoclear`] is detached by the kernel at the *last
//! close* of the block device — any last close, not only after a mount: if every fd is closed
//! before anything mounted it, it is gone at once. A mount holds the device open for as long
//! as it exists. So for a filesystem volume the driver must:
//! 1. attach (keeping the returned [`LoopDevice`], whose `fd` holds the device),
//! 2. mount it ([`crate::Kernel::mount_device`]),
//! 3. drop the `LoopDevice` (closing `fd`).
//!
//! From then on the mount alone keeps the device; unmounting the last mount of it frees it,
//! even when the driver crashed in between and never calls detach. A crash between 1 and 2
//! frees it as well. Nothing leaks.
//!
//! A raw block volume is published by bind-mounting the *device node*, which does not open
//! the device: with autoclear it would vanish as soon as the driver closed its fd, and a
//! driver restart could never hold one for it. Block volumes are therefore attached without
//! autoclear and detached explicitly ([`crate::Kernel::detach_loop`]) at unstage.
//! [`crate::Kernel::attach_loop`] aligns the autoclear flag of an already attached device
//! with the one asked for (LOOP_SET_STATUS64), so re-staging either kind converges.
//!
//! Devices are opened read-only for every ioctl except LOOP_CONFIGURE: since Linux 6.8 a
//! kernel may refuse to mount a block device that someone holds open for writing, and a
//! read-only opener is never in the way of mkfs or a mount.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, StatxFlags, CWD};
use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode};

use crate::fs::{fd_desc, InodeId};
use crate::{SysError, SysResult};

/// How [`crate::Kernel::attach_loop`] configures a new device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopOptions {
    /// LO_FLAGS_READ_ONLY: writes to the device fail with EPERM/EROFS.
    pub read_only: bool,
    /// LO_FLAGS_AUTOCLEAR: the kernel detaches the device at its last close (see the module
    /// documentation: right for filesystem volumes, wrong for raw block volumes).
    pub autoclear: bool,
    /// LO_FLAGS_DIRECT_IO: bypass the page cache of the backing file (no double caching). If
    /// the backing filesystem refuses it, the device is configured without it and
    /// [`LoopDevice::direct_io_refused`] says why.
    pub direct_io: bool,
    /// Logical block size of the device: 512 or 4096, or 0 for the kernel's choice. It must
    /// stay the same for an image's whole life (a filesystem made on 512-byte sectors may not
    /// mount on a 4096 one, e.g. xfs): the pool should persist it. See
    /// [`suggested_block_size`].
    pub block_size: u32,
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            autoclear: true,
            direct_io: true,
            block_size: 0,
        }
    }
}

/// An attached loop device, open read-only. Dropping it closes `fd` (see the module
/// documentation for what that does with autoclear).
#[derive(Debug)]
pub struct LoopDevice {
    /// N of `/dev/loopN`.
    pub number: u32,
    /// `/dev/loopN`, checked to be the block device `dev`.
    pub path: PathBuf,
    /// Its device number.
    pub dev: u64,
    /// The device, open `O_RDONLY | O_CLOEXEC`. (The [`crate::FakeKernel`] puts a duplicate
    /// of the image fd here instead.)
    pub fd: OwnedFd,
    /// The backing file (image) it reads and writes.
    pub backing: InodeId,
    pub read_only: bool,
    pub autoclear: bool,
    /// Whether direct I/O is on, as the kernel reports it after configuration.
    pub direct_io: bool,
    /// Direct I/O was asked for and LOOP_CONFIGURE refused it with this errno; the device was
    /// configured without it.
    pub direct_io_refused: Option<Errno>,
    /// Attached by this call (false: an existing attachment of the image was found).
    pub newly_attached: bool,
}

/// What LOOP_GET_STATUS64 says of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopStatus {
    pub number: u32,
    pub backing: InodeId,
    pub offset: u64,
    pub size_limit: u64,
    pub read_only: bool,
    pub autoclear: bool,
    pub direct_io: bool,
    /// `lo_file_name`: what the attacher wrote there (diagnostics only; never trusted).
    pub file_name: String,
}

/// uapi structs and ioctl numbers (linux/loop.h, linux/fs.h). The LOOP_* numbers are plain
/// 0x4Cxx values, not `_IOC`-encoded.
mod raw {
    use rustix::ioctl::{opcode, Opcode};

    pub(super) const LO_NAME_SIZE: usize = 64;

    /// `struct loop_info64`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub(super) struct LoopInfo64 {
        pub(super) lo_device: u64,
        pub(super) lo_inode: u64,
        pub(super) lo_rdevice: u64,
        pub(super) lo_offset: u64,
        pub(super) lo_sizelimit: u64,
        pub(super) lo_number: u32,
        pub(super) lo_encrypt_type: u32,
        pub(super) lo_encrypt_key_size: u32,
        pub(super) lo_flags: u32,
        pub(super) lo_file_name: [u8; LO_NAME_SIZE],
        pub(super) lo_crypt_name: [u8; LO_NAME_SIZE],
        pub(super) lo_encrypt_key: [u8; 32],
        pub(super) lo_init: [u64; 2],
    }

    impl LoopInfo64 {
        pub(super) const ZERO: Self = Self {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
    }

    /// `struct loop_config`, argument of LOOP_CONFIGURE (Linux 5.8).
    #[repr(C)]
    #[derive(Debug, Clone, Copy)]
    pub(super) struct LoopConfig {
        pub(super) fd: u32,
        pub(super) block_size: u32,
        pub(super) info: LoopInfo64,
        pub(super) reserved: [u64; 8],
    }

    const _: () = assert!(size_of::<LoopInfo64>() == 232);
    const _: () = assert!(size_of::<LoopConfig>() == 304);

    pub(super) const LOOP_CLR_FD: Opcode = 0x4C01;
    pub(super) const LOOP_SET_STATUS64: Opcode = 0x4C04;
    pub(super) const LOOP_GET_STATUS64: Opcode = 0x4C05;
    pub(super) const LOOP_SET_CAPACITY: Opcode = 0x4C07;
    pub(super) const LOOP_CONFIGURE: Opcode = 0x4C0A;
    pub(super) const LOOP_CTL_GET_FREE: Opcode = 0x4C82;
    /// `_IOR(0x12, 114, size_t)`.
    pub(super) const BLKGETSIZE64: Opcode = opcode::read::<u64>(0x12, 114);

    pub(super) const LO_FLAGS_READ_ONLY: u32 = 1;
    pub(super) const LO_FLAGS_AUTOCLEAR: u32 = 4;
    pub(super) const LO_FLAGS_DIRECT_IO: u32 = 16;

    /// Major number of loop block devices.
    pub(super) const LOOP_MAJOR: u32 = 7;
}

/// An ioctl without argument whose result is its non-negative return value
/// (LOOP_CTL_GET_FREE answers the number of a free device).
struct ReturnsInt<const OPCODE: Opcode>;

// SAFETY: the ioctl takes no argument (a null pointer is passed and never dereferenced), the
// kernel writes nothing to user memory, and the output is the return value itself.
unsafe impl<const OPCODE: Opcode> Ioctl for ReturnsInt<OPCODE> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        OPCODE
    }

    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::null_mut()
    }

    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// How often LOOP_CTL_GET_FREE is asked again when another process took the free device
/// between our asking and our LOOP_CONFIGURE (EBUSY).
const MAX_CONFIGURE_RACES: u32 = 16;

fn ioctl_error(op_name: &str, fd: BorrowedFd<'_>, extra: &str, errno: Errno) -> SysError {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(", {extra}")
    };
    SysError::new("ioctl", format!("{}, {op_name}{extra}", fd_desc(fd)), errno)
}

fn no_arg<const OPCODE: Opcode>(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: the caller's opcode takes no argument; rustix passes a null pointer.
    let ctl = unsafe { rustix::ioctl::NoArg::<OPCODE>::new() };
    // SAFETY: opcode and (absent) argument agree; `fd` is open for the call.
    unsafe { rustix::ioctl::ioctl(fd, ctl) }
}

fn get_status_raw(fd: BorrowedFd<'_>) -> Result<raw::LoopInfo64, Errno> {
    // SAFETY: LOOP_GET_STATUS64 writes exactly one struct loop_info64, which Getter holds.
    let getter =
        unsafe { rustix::ioctl::Getter::<{ raw::LOOP_GET_STATUS64 }, raw::LoopInfo64>::new() };
    // SAFETY: opcode and argument type agree (above); `fd` is open for the call.
    unsafe { rustix::ioctl::ioctl(fd, getter) }
}

/// The dev_t encoding the kernel uses in `lo_device` (`huge_encode_dev`).
fn kernel_dev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (u64::from(major), u64::from(minor));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn status_of(info: &raw::LoopInfo64) -> LoopStatus {
    let name_len = info
        .lo_file_name
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(raw::LO_NAME_SIZE);
    LoopStatus {
        number: info.lo_number,
        backing: InodeId {
            dev: info.lo_device,
            ino: info.lo_inode,
        },
        offset: info.lo_offset,
        size_limit: info.lo_sizelimit,
        read_only: info.lo_flags & raw::LO_FLAGS_READ_ONLY != 0,
        autoclear: info.lo_flags & raw::LO_FLAGS_AUTOCLEAR != 0,
        direct_io: info.lo_flags & raw::LO_FLAGS_DIRECT_IO != 0,
        file_name: String::from_utf8_lossy(&info.lo_file_name[..name_len]).into_owned(),
    }
}

/// LOOP_GET_STATUS64 of the loop device open at `fd`. ENXIO: nothing is attached.
/// `backing.dev` is in the kernel's `huge_encode_dev` form, as [`backing_id`] returns it.
pub fn status(fd: BorrowedFd<'_>) -> SysResult<LoopStatus> {
    get_status_raw(fd)
        .map(|info| status_of(&info))
        .map_err(|e| ioctl_error("LOOP_GET_STATUS64", fd, "", e))
}

/// The identity of the image open at `image` in the form LOOP_GET_STATUS64 reports the
/// backing file (`lo_device`, `lo_inode`). Also checks that it is a regular file.
pub fn backing_id(image: BorrowedFd<'_>) -> SysResult<InodeId> {
    let st = rustix::fs::statx(
        image,
        c"",
        AtFlags::EMPTY_PATH,
        StatxFlags::TYPE | StatxFlags::INO,
    )
    .map_err(|e| SysError::new("statx", fd_desc(image), e))?;
    if FileType::from_raw_mode(u32::from(st.stx_mode)) != FileType::RegularFile {
        return Err(SysError::new(
            "loop backing file",
            format!("{} (not a regular file)", fd_desc(image)),
            Errno::INVAL,
        ));
    }
    Ok(InodeId {
        dev: kernel_dev(st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
    })
}

/// Size of the block device open at `fd` (BLKGETSIZE64), in bytes.
pub fn block_device_size(fd: BorrowedFd<'_>) -> SysResult<u64> {
    // SAFETY: BLKGETSIZE64 is _IOR(0x12, 114, size_t): the kernel writes one u64.
    let getter = unsafe { rustix::ioctl::Getter::<{ raw::BLKGETSIZE64 }, u64>::new() };
    // SAFETY: opcode and argument type agree (above); `fd` is open for the call.
    unsafe { rustix::ioctl::ioctl(fd, getter) }.map_err(|e| ioctl_error("BLKGETSIZE64", fd, "", e))
}

/// The block size to configure for an image on the filesystem holding `image`: 512 when
/// that filesystem does direct I/O at 512-byte alignment (or does not say), 4096 otherwise
/// (STATX_DIOALIGN, Linux 6.1).
pub fn suggested_block_size(image: BorrowedFd<'_>) -> u32 {
    match rustix::fs::statx(image, c"", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
        Ok(st) if st.stx_dio_offset_align > 512 => 4096,
        _ => 512,
    }
}

/// Reads a `major:minor` sysfs `dev` file.
fn sysfs_dev(path: &str) -> SysResult<u64> {
    let text = fs::read_to_string(path).map_err(|e| {
        SysError::new(
            "read",
            format!("{path:?}"),
            Errno::from_io_error(&e).unwrap_or(Errno::IO),
        )
    })?;
    let parsed = text.trim().split_once(':').and_then(|(major, minor)| {
        Some(rustix::fs::makedev(
            major.parse().ok()?,
            minor.parse().ok()?,
        ))
    });
    parsed.ok_or_else(|| {
        SysError::new(
            "parse",
            format!("{path:?}: {:?}", text.trim()),
            Errno::INVAL,
        )
    })
}

/// Opens the device node `path` that must be the device `dev` of `file_type`, creating it
/// (mode 0600) when /dev lacks it, as it does in some containers.
fn open_node(path: &Path, file_type: FileType, dev: u64, flags: OFlags) -> SysResult<OwnedFd> {
    let shown = || format!("{:?}", path.display().to_string());
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY;
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => {
            match rustix::fs::mknodat(CWD, path, file_type, Mode::from_raw_mode(0o600), dev) {
                Ok(()) => {
                    tracing::info!(node = %path.display(), "created missing device node");
                }
                Err(Errno::EXIST) => {}
                Err(e) => return Err(SysError::new("mknod", shown(), e)),
            }
            rustix::fs::open(path, flags, Mode::empty())
                .map_err(|e| SysError::new("open", shown(), e))?
        }
        Err(e) => return Err(SysError::new("open", shown(), e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| SysError::new("fstat", shown(), e))?;
    if FileType::from_raw_mode(st.st_mode) != file_type || st.st_rdev != dev {
        return Err(SysError::new(
            "open",
            format!(
                "{} (not the device {}:{})",
                shown(),
                rustix::fs::major(dev),
                rustix::fs::minor(dev)
            ),
            Errno::NODEV,
        ));
    }
    Ok(fd)
}

fn loop_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

/// Opens `/dev/loopN`, checked against the device number sysfs gives for it.
fn open_loop(number: u32, flags: OFlags) -> SysResult<(OwnedFd, u64)> {
    let dev = sysfs_dev(&format!("/sys/block/loop{number}/dev"))?;
    if rustix::fs::major(dev) != raw::LOOP_MAJOR {
        return Err(SysError::new(
            "open",
            format!("loop{number}: major {} is not 7", rustix::fs::major(dev)),
            Errno::NODEV,
        ));
    }
    Ok((
        open_node(&loop_path(number), FileType::BlockDevice, dev, flags)?,
        dev,
    ))
}

/// Numbers of the loop devices that have something attached (their sysfs `loop/` directory
/// exists only then).
fn bound_loop_numbers() -> SysResult<Vec<u32>> {
    let entries = fs::read_dir("/sys/block").map_err(|e| {
        SysError::new(
            "readdir",
            "\"/sys/block\"",
            Errno::from_io_error(&e).unwrap_or(Errno::IO),
        )
    })?;
    let mut numbers: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let number = name.to_str()?.strip_prefix("loop")?.parse().ok()?;
            entry.path().join("loop").exists().then_some(number)
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// The devices whose backing file is `backing`, each open read-only with its status.
/// Devices that vanish or change while being looked at are skipped.
fn devices_backed_by_id(backing: InodeId) -> SysResult<Vec<(u32, u64, OwnedFd, LoopStatus)>> {
    let mut found = Vec::new();
    for number in bound_loop_numbers()? {
        let (fd, dev) = match open_loop(number, OFlags::RDONLY) {
            Ok(opened) => opened,
            // Removed (LOOP_CTL_REMOVE) since the directory listing.
            Err(e) if matches!(e.errno, Errno::NOENT | Errno::NXIO | Errno::NODEV) => continue,
            Err(e) => return Err(e),
        };
        match get_status_raw(fd.as_fd()) {
            Ok(info) if info.lo_device == backing.dev && info.lo_inode == backing.ino => {
                found.push((number, dev, fd, status_of(&info)));
            }
            Ok(_) | Err(Errno::NXIO) => {}
            Err(e) => return Err(ioctl_error("LOOP_GET_STATUS64", fd.as_fd(), "", e)),
        }
    }
    Ok(found)
}

/// Numbers of every loop device attached to the image open at `image` (normally zero or one).
/// Compared by the backing device and inode the kernel reports, never by a path.
pub fn devices_backed_by(image: BorrowedFd<'_>) -> SysResult<Vec<u32>> {
    let backing = backing_id(image)?;
    Ok(devices_backed_by_id(backing)?
        .into_iter()
        .map(|(number, ..)| number)
        .collect())
}

fn handle(number: u32, dev: u64, fd: OwnedFd, st: &LoopStatus, newly_attached: bool) -> LoopDevice {
    LoopDevice {
        number,
        path: loop_path(number),
        dev,
        fd,
        backing: st.backing,
        read_only: st.read_only,
        autoclear: st.autoclear,
        direct_io: st.direct_io,
        direct_io_refused: None,
        newly_attached,
    }
}

/// See [`crate::Kernel::find_loop`].
pub(crate) fn find(image: BorrowedFd<'_>) -> SysResult<Option<LoopDevice>> {
    let backing = backing_id(image)?;
    Ok(devices_backed_by_id(backing)?
        .into_iter()
        .next()
        .map(|(number, dev, fd, st)| handle(number, dev, fd, &st, false)))
}

/// Holds an exclusive flock on the image while it is being attached, so two processes
/// attaching the same image cannot both find it unattached and configure two devices.
struct ImageLock<'a>(BorrowedFd<'a>);

impl<'a> ImageLock<'a> {
    fn take(image: BorrowedFd<'a>) -> SysResult<Self> {
        // Bounded: attaching takes milliseconds; a holder for seconds is stuck.
        for _ in 0..500 {
            match rustix::fs::flock(image, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Self(image)),
                Err(Errno::WOULDBLOCK) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(SysError::new("flock", fd_desc(image), e)),
            }
        }
        Err(SysError::new(
            "flock",
            format!("{} (held by another attach for 5 s)", fd_desc(image)),
            Errno::WOULDBLOCK,
        ))
    }
}

impl Drop for ImageLock<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.0, FlockOperation::Unlock);
    }
}

/// Sets or clears LO_FLAGS_AUTOCLEAR of an attached device (the only flag, with PARTSCAN,
/// that LOOP_SET_STATUS64 may change).
fn set_autoclear(fd: BorrowedFd<'_>, autoclear: bool) -> SysResult<()> {
    let mut info = get_status_raw(fd).map_err(|e| ioctl_error("LOOP_GET_STATUS64", fd, "", e))?;
    if autoclear {
        info.lo_flags |= raw::LO_FLAGS_AUTOCLEAR;
    } else {
        info.lo_flags &= !raw::LO_FLAGS_AUTOCLEAR;
    }
    // SAFETY: LOOP_SET_STATUS64 reads exactly one struct loop_info64, which Setter holds.
    let setter =
        unsafe { rustix::ioctl::Setter::<{ raw::LOOP_SET_STATUS64 }, raw::LoopInfo64>::new(info) };
    // SAFETY: opcode and argument type agree (above); `fd` is open for the call.
    unsafe { rustix::ioctl::ioctl(fd, setter) }.map_err(|e| {
        ioctl_error(
            "LOOP_SET_STATUS64",
            fd,
            &format!("autoclear {autoclear}"),
            e,
        )
    })
}

/// The last 63 bytes of the image's path, for `lo_file_name` (the volume id is at the end).
fn file_name_field(image: BorrowedFd<'_>) -> [u8; raw::LO_NAME_SIZE] {
    let mut field = [0u8; raw::LO_NAME_SIZE];
    let path = rustix::fs::readlinkat(
        CWD,
        format!("/proc/self/fd/{}", image.as_raw_fd()),
        Vec::new(),
    )
    .map(|p| p.into_bytes())
    .unwrap_or_default();
    let tail = &path[path.len().saturating_sub(raw::LO_NAME_SIZE - 1)..];
    field[..tail.len()].copy_from_slice(tail);
    field
}

fn configure(
    dev: BorrowedFd<'_>,
    image: BorrowedFd<'_>,
    opts: LoopOptions,
    direct_io: bool,
) -> Result<(), Errno> {
    let mut flags = 0;
    if opts.read_only {
        flags |= raw::LO_FLAGS_READ_ONLY;
    }
    if opts.autoclear {
        flags |= raw::LO_FLAGS_AUTOCLEAR;
    }
    if direct_io {
        flags |= raw::LO_FLAGS_DIRECT_IO;
    }
    let fd = u32::try_from(image.as_raw_fd()).map_err(|_| Errno::BADF)?;
    let config = raw::LoopConfig {
        fd,
        block_size: opts.block_size,
        info: raw::LoopInfo64 {
            lo_flags: flags,
            lo_file_name: file_name_field(image),
            ..raw::LoopInfo64::ZERO
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads exactly one struct loop_config, which Setter holds; the fd
    // inside it is `image`, open for the whole call.
    let setter =
        unsafe { rustix::ioctl::Setter::<{ raw::LOOP_CONFIGURE }, raw::LoopConfig>::new(config) };
    // SAFETY: opcode and argument type agree (above); `dev` is open for the call.
    unsafe { rustix::ioctl::ioctl(dev, setter) }
}

fn describe(opts: LoopOptions, direct_io: bool) -> String {
    format!(
        "read_only {}, autoclear {}, direct_io {direct_io}, block_size {}",
        opts.read_only, opts.autoclear, opts.block_size
    )
}

/// See [`crate::Kernel::attach_loop`].
pub(crate) fn attach(image: BorrowedFd<'_>, opts: LoopOptions) -> SysResult<LoopDevice> {
    let backing = backing_id(image)?;
    let _lock = ImageLock::take(image)?;
    if let Some((number, dev, fd, st)) = devices_backed_by_id(backing)?.into_iter().next() {
        if st.autoclear != opts.autoclear {
            set_autoclear(fd.as_fd(), opts.autoclear)?;
        }
        let st = status(fd.as_fd())?;
        return Ok(handle(number, dev, fd, &st, false));
    }
    let control_dev = sysfs_dev("/sys/class/misc/loop-control/dev")?;
    let control = open_node(
        Path::new("/dev/loop-control"),
        FileType::CharacterDevice,
        control_dev,
        OFlags::RDWR,
    )?;
    let mut last_busy = None;
    for _ in 0..MAX_CONFIGURE_RACES {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and answers with its return value.
        let free = unsafe {
            rustix::ioctl::ioctl(control.as_fd(), ReturnsInt::<{ raw::LOOP_CTL_GET_FREE }>)
        }
        .map_err(|e| ioctl_error("LOOP_CTL_GET_FREE", control.as_fd(), "", e))?;
        let number = u32::try_from(free).map_err(|_| {
            ioctl_error(
                "LOOP_CTL_GET_FREE",
                control.as_fd(),
                "negative answer",
                Errno::IO,
            )
        })?;
        // Read-write: configured through a read-only open, the device would be read-only.
        let (rw, dev) = match open_loop(number, OFlags::RDWR) {
            Ok(opened) => opened,
            // Removed again by someone else before we opened it.
            Err(e) if matches!(e.errno, Errno::NOENT | Errno::NXIO) => {
                last_busy = Some(e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut direct_io = opts.direct_io;
        let mut refused = None;
        let mut result = configure(rw.as_fd(), image, opts, direct_io);
        if direct_io && result == Err(Errno::INVAL) {
            // The backing filesystem cannot do direct I/O (or not at this block size).
            refused = Some(Errno::INVAL);
            direct_io = false;
            result = configure(rw.as_fd(), image, opts, direct_io);
        }
        match result {
            Ok(()) => {}
            Err(Errno::BUSY) => {
                // Another process configured this device between GET_FREE and us.
                last_busy = Some(ioctl_error(
                    "LOOP_CONFIGURE",
                    rw.as_fd(),
                    &describe(opts, direct_io),
                    Errno::BUSY,
                ));
                continue;
            }
            Err(e) => {
                return Err(ioctl_error(
                    "LOOP_CONFIGURE",
                    rw.as_fd(),
                    &format!("{}, {}", fd_desc(image), describe(opts, direct_io)),
                    e,
                ))
            }
        }
        // Open the read-only handle before closing the read-write one: with autoclear, the
        // last close would detach the device again.
        let (ro, _) = open_loop(number, OFlags::RDONLY)?;
        drop(rw);
        let st = status(ro.as_fd())?;
        if st.backing != backing {
            // Only possible if it was detached and reused in between, which autoclear without
            // a holder does: report it rather than hand out someone else's device.
            return Err(SysError::new(
                "attach_loop",
                format!("loop{number} changed backing file right after LOOP_CONFIGURE"),
                Errno::AGAIN,
            ));
        }
        let mut device = handle(number, dev, ro, &st, true);
        device.direct_io_refused = refused;
        if device.direct_io != direct_io {
            tracing::info!(
                device = %device.path.display(),
                asked = direct_io,
                got = device.direct_io,
                "the kernel adjusted direct I/O of the loop device"
            );
        }
        return Ok(device);
    }
    Err(last_busy
        .unwrap_or_else(|| SysError::new("attach_loop", "no free loop device", Errno::BUSY)))
}

/// See [`crate::Kernel::refresh_loop_capacity`].
pub(crate) fn set_capacity(device: &LoopDevice) -> SysResult<u64> {
    no_arg::<{ raw::LOOP_SET_CAPACITY }>(device.fd.as_fd())
        .map_err(|e| ioctl_error("LOOP_SET_CAPACITY", device.fd.as_fd(), "", e))?;
    block_device_size(device.fd.as_fd())
}

/// How long [`detach`] waits for the kernel to finish a detach that it does at last close.
const DETACH_SETTLE: Duration = Duration::from_millis(500);

/// See [`crate::Kernel::detach_loop`].
pub(crate) fn detach(image: BorrowedFd<'_>) -> SysResult<()> {
    let backing = backing_id(image)?;
    for (number, _, fd, _) in devices_backed_by_id(backing)? {
        match no_arg::<{ raw::LOOP_CLR_FD }>(fd.as_fd()) {
            // ENXIO: detached meanwhile.
            Ok(()) | Err(Errno::NXIO) => {}
            Err(Errno::BUSY) => {
                return Err(ioctl_error(
                    "LOOP_CLR_FD",
                    fd.as_fd(),
                    "still open elsewhere",
                    Errno::BUSY,
                ))
            }
            Err(e) => return Err(ioctl_error("LOOP_CLR_FD", fd.as_fd(), "", e)),
        }
        // Current kernels never answer EBUSY: LOOP_CLR_FD marks the device autoclear and the
        // kernel detaches it at the last close, which may be ours (now) or another opener's
        // (a mount, a process): find out which.
        drop(fd);
        let deadline = std::time::Instant::now() + DETACH_SETTLE;
        loop {
            let still = match open_loop(number, OFlags::RDONLY) {
                Ok((fd, _)) => match get_status_raw(fd.as_fd()) {
                    Ok(info) => info.lo_device == backing.dev && info.lo_inode == backing.ino,
                    Err(_) => false,
                },
                Err(_) => false,
            };
            if !still {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(SysError::new(
                    "detach_loop",
                    format!(
                        "/dev/loop{number}: still open elsewhere (a mount or a process); \
                         the kernel detaches it at its last close"
                    ),
                    Errno::BUSY,
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi_values() {
        assert_eq!(raw::BLKGETSIZE64, 0x8008_1272);
        assert_eq!(raw::LOOP_CONFIGURE, 19466);
        assert_eq!(raw::LOOP_CTL_GET_FREE, 19586);
    }

    /// The branch for containers whose /dev lacks the node, on a scratch directory instead of
    /// /dev: the node is made, opened and checked; a node of another device is refused.
    #[test]
    fn open_node_creates_a_missing_node_and_checks_it() {
        if !rustix::process::geteuid().is_root() {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (needs root): open_node_creates_a_missing_node_and_checks_it"
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("stowage-node-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let dev = sysfs_dev("/sys/block/loop0/dev").expect("loop0");
        let node = dir.join("loop0");
        let fd = open_node(&node, FileType::BlockDevice, dev, OFlags::RDONLY).expect("open");
        assert_eq!(rustix::fs::fstat(&fd).expect("fstat").st_rdev, dev);
        assert!(node.exists(), "created");
        // Present now: opened as is.
        drop(open_node(&node, FileType::BlockDevice, dev, OFlags::RDONLY).expect("reopen"));
        // A node that is not the device asked for.
        let other = rustix::fs::makedev(raw::LOOP_MAJOR, rustix::fs::minor(dev) + 1);
        let err = open_node(&node, FileType::BlockDevice, other, OFlags::RDONLY)
            .expect_err("wrong device");
        assert_eq!(err.errno, Errno::NODEV, "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn kernel_dev_encoding() {
        assert_eq!(kernel_dev(8, 1), 0x801);
        assert_eq!(kernel_dev(259, 0x12345), 0x1231_0345);
    }
}
