//! The real [`Kernel`]: rustix where it has a safe wrapper, raw syscalls (each with a
//! `// SAFETY:` line) where it does not.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::Updater;
use rustix::mount::{MoveMountFlags, OpenTreeFlags, UnmountFlags};

use crate::fs::{fd_desc, file_info};
use crate::{
    blockfs, btrfs, loopdev, FsKind, Kernel, LoopDevice, LoopOptions, MountAttrs, QuotaSupport,
    QuotaUsage, SysError, SysResult, ToolError,
};

/// The real Linux implementation of [`Kernel`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxKernel;

/// Kernel ABI structs and constants rustix does not carry, from the uapi headers
/// (linux/mount.h, linux/fs.h, linux/quota.h, linux/dqblk_xfs.h).
mod raw {
    use rustix::ioctl::{opcode, Opcode};

    /// `struct mount_attr`, argument of mount_setattr(2).
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(super) struct MountAttr {
        pub(super) attr_set: u64,
        pub(super) attr_clr: u64,
        pub(super) propagation: u64,
        pub(super) userns_fd: u64,
    }

    /// `struct fsxattr`, argument of FS_IOC_FSGETXATTR / FS_IOC_FSSETXATTR.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct FsXattr {
        pub(super) fsx_xflags: u32,
        pub(super) fsx_extsize: u32,
        pub(super) fsx_nextents: u32,
        pub(super) fsx_projid: u32,
        pub(super) fsx_cowextsize: u32,
        pub(super) fsx_pad: [u8; 8],
    }

    pub(super) const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;
    pub(super) const FS_IOC_FSGETXATTR: Opcode = opcode::read::<FsXattr>(b'X', 31);
    pub(super) const FS_IOC_FSSETXATTR: Opcode = opcode::write::<FsXattr>(b'X', 32);
    /// `FIFREEZE` and `FITHAW` are `_IOWR('X', 119/120, int)`; the kernel ignores the int.
    pub(super) const FIFREEZE: Opcode = opcode::read_write::<std::ffi::c_int>(b'X', 119);
    pub(super) const FITHAW: Opcode = opcode::read_write::<std::ffi::c_int>(b'X', 120);

    /// `struct if_dqblk`, argument of Q_GETQUOTA / Q_SETQUOTA. Space limits are in
    /// QIF_DQBLKSIZE (1 KiB) blocks, current space in bytes.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct IfDqblk {
        pub(super) dqb_bhardlimit: u64,
        pub(super) dqb_bsoftlimit: u64,
        pub(super) dqb_curspace: u64,
        pub(super) dqb_ihardlimit: u64,
        pub(super) dqb_isoftlimit: u64,
        pub(super) dqb_curinodes: u64,
        pub(super) dqb_btime: u64,
        pub(super) dqb_itime: u64,
        pub(super) dqb_valid: u32,
    }

    /// `struct if_dqinfo`, argument of Q_GETINFO.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct IfDqinfo {
        pub(super) dqi_bgrace: u64,
        pub(super) dqi_igrace: u64,
        pub(super) dqi_flags: u32,
        pub(super) dqi_valid: u32,
    }

    /// `struct fs_qfilestatv`, part of [`FsQuotaStatv`].
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct FsQfilestatv {
        pub(super) qfs_ino: u64,
        pub(super) qfs_nblks: u64,
        pub(super) qfs_nextents: u32,
        pub(super) qfs_pad: u32,
    }

    /// `struct fs_quota_statv`, argument of Q_XGETQSTATV (which also works on ext4).
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct FsQuotaStatv {
        pub(super) qs_version: i8,
        pub(super) qs_pad1: u8,
        pub(super) qs_flags: u16,
        pub(super) qs_incoredqs: u32,
        pub(super) qs_uquota: FsQfilestatv,
        pub(super) qs_gquota: FsQfilestatv,
        pub(super) qs_pquota: FsQfilestatv,
        pub(super) qs_btimelimit: i32,
        pub(super) qs_itimelimit: i32,
        pub(super) qs_rtbtimelimit: i32,
        pub(super) qs_bwarnlimit: u16,
        pub(super) qs_iwarnlimit: u16,
        pub(super) qs_rtbwarnlimit: u16,
        pub(super) qs_pad3: u16,
        pub(super) qs_pad4: u32,
        pub(super) qs_pad2: [u64; 7],
    }

    // The layouts must match the kernel's byte for byte (x86_64 and aarch64 alike).
    const _: () = assert!(size_of::<MountAttr>() == 32);
    const _: () = assert!(size_of::<FsXattr>() == 28);
    const _: () = assert!(size_of::<IfDqblk>() == 72);
    const _: () = assert!(size_of::<IfDqinfo>() == 24);
    const _: () = assert!(size_of::<FsQuotaStatv>() == 160);

    pub(super) const Q_GETINFO: u32 = 0x80_0005;
    pub(super) const Q_GETQUOTA: u32 = 0x80_0007;
    pub(super) const Q_SETQUOTA: u32 = 0x80_0008;
    /// XQM_CMD(8).
    pub(super) const Q_XGETQSTATV: u32 = ((b'X' as u32) << 8) + 8;
    pub(super) const PRJQUOTA: u32 = 2;
    pub(super) const QIF_BLIMITS: u32 = 1;
    pub(super) const QIF_DQBLKSIZE: u64 = 1 << 10;
    pub(super) const FS_QSTATV_VERSION1: i8 = 1;
    pub(super) const FS_QUOTA_PDQ_ENFD: u16 = 1 << 5;

    /// QCMD(cmd, type).
    pub(super) const fn qcmd(cmd: u32, quota_type: u32) -> u32 {
        (cmd << 8) | (quota_type & 0xff)
    }
}

/// The structs that may be handed to [`quotactl_fd`], each tied to the commands that read or
/// write exactly that struct, so the pairing of command and buffer is checked by type.
trait QuotactlArg {}
impl QuotactlArg for raw::IfDqblk {}
impl QuotactlArg for raw::IfDqinfo {}
impl QuotactlArg for raw::FsQuotaStatv {}

/// quotactl_fd(2) (Linux 5.14): `cmd` for project `id` on the filesystem holding `fd`.
///
/// # Safety
/// `cmd` must be one whose argument is a `T` (Q_GETINFO: IfDqinfo; Q_GETQUOTA, Q_SETQUOTA:
/// IfDqblk; Q_XGETQSTATV: FsQuotaStatv), or the kernel reads or writes past `arg`.
unsafe fn quotactl_fd<T: QuotactlArg>(
    fd: RawFd,
    cmd: u32,
    id: u32,
    arg: &mut T,
) -> Result<(), Errno> {
    // SAFETY: the syscall takes (unsigned int fd, unsigned int cmd, qid_t id, void *addr);
    // `arg` is a live, exclusively borrowed T for the whole call, and the caller guarantees
    // `cmd` accesses no more than one T there. A bad `fd` is an EBADF, not UB.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_quotactl_fd,
            libc::c_long::from(fd),
            libc::c_long::from(cmd),
            libc::c_long::from(id),
            std::ptr::from_mut(arg).cast::<libc::c_void>(),
        )
    };
    if ret == -1 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn last_errno() -> Errno {
    Errno::from_raw_os_error(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// mount_setattr(2) (Linux 5.12) on the mount `tree` itself (AT_EMPTY_PATH, not recursive).
fn mount_setattr(tree: BorrowedFd<'_>, attr: &raw::MountAttr) -> Result<(), Errno> {
    // SAFETY: the syscall takes (int dfd, const char *path, unsigned int flags,
    // struct mount_attr *uattr, size_t usize). `c""` is a valid NUL-terminated string for the
    // whole call, `attr` is a live MountAttr of exactly `usize` bytes that the kernel only
    // reads, and `tree` stays open while the call runs (borrowed).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::c_long::from(tree.as_raw_fd()),
            c"".as_ptr(),
            libc::c_long::from(libc::AT_EMPTY_PATH),
            std::ptr::from_ref(attr),
            size_of::<raw::MountAttr>(),
        )
    };
    if ret == -1 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// The set/clear masks for mount_setattr. The atime mode is one value inside the
/// MOUNT_ATTR__ATIME field, so choosing one means clearing the whole field; noatime wins over
/// relatime when both are asked for. nodiratime is a separate bit.
fn attr_masks(attrs: MountAttrs) -> raw::MountAttr {
    let (set, clr) = attrs.flags();
    raw::MountAttr {
        attr_set: u64::from(set.bits()),
        attr_clr: u64::from(clr.bits()),
        ..raw::MountAttr::default()
    }
}

/// ioctls need a real open file, not an O_PATH fd: re-open the same inode if needed.
pub(crate) fn ioctl_fd(fd: BorrowedFd<'_>) -> SysResult<Option<OwnedFd>> {
    let flags = rustix::fs::fcntl_getfl(fd).map_err(|e| SysError::new("fcntl", fd_desc(fd), e))?;
    if !flags.contains(OFlags::PATH) {
        return Ok(None);
    }
    let info = file_info(fd)?;
    let reopened = if info.is_dir {
        // Through "." of the fd itself: no name is looked up again.
        rustix::fs::openat(
            fd,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    } else {
        // /proc/self/fd/N is a magic link to this very inode.
        rustix::fs::open(
            format!("/proc/self/fd/{}", fd.as_raw_fd()),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        )
    };
    reopened
        .map(Some)
        .map_err(|e| SysError::new("reopen", fd_desc(fd), e))
}

fn get_fsxattr(fd: BorrowedFd<'_>) -> SysResult<raw::FsXattr> {
    // SAFETY: FS_IOC_FSGETXATTR is _IOR('X', 31, struct fsxattr): the kernel writes exactly one
    // fsxattr, which is what Getter allocates for it.
    let getter =
        unsafe { rustix::ioctl::Getter::<{ raw::FS_IOC_FSGETXATTR }, raw::FsXattr>::new() };
    // SAFETY: the opcode and argument type agree (see above) and `fd` is open for the call.
    unsafe { rustix::ioctl::ioctl(fd, getter) }
        .map_err(|e| SysError::new("ioctl", format!("{}, FS_IOC_FSGETXATTR", fd_desc(fd)), e))
}

fn set_fsxattr(fd: BorrowedFd<'_>, attr: raw::FsXattr) -> SysResult<()> {
    // SAFETY: FS_IOC_FSSETXATTR is _IOW('X', 32, struct fsxattr): the kernel reads exactly one
    // fsxattr, which Setter holds.
    let setter =
        unsafe { rustix::ioctl::Setter::<{ raw::FS_IOC_FSSETXATTR }, raw::FsXattr>::new(attr) };
    // SAFETY: the opcode and argument type agree (see above) and `fd` is open for the call.
    unsafe { rustix::ioctl::ioctl(fd, setter) }
        .map_err(|e| SysError::new("ioctl", format!("{}, FS_IOC_FSSETXATTR", fd_desc(fd)), e))
}

/// Says why Q_GETINFO for project quotas failed, in words an operator can act on.
fn explain_quota_errno(errno: Errno) -> String {
    match errno {
        Errno::NOSYS if quotactl_fd_exists() => "this filesystem has no quota support at all \
             (ENOSYS): use ext4 or xfs with project quotas enabled"
            .to_owned(),
        Errno::NOSYS => {
            "the kernel lacks quotactl_fd (ENOSYS): Linux 5.14 or newer is needed".to_owned()
        }
        Errno::SRCH => "project quotas are not enabled on this filesystem (ESRCH): mount it with \
             prjquota (ext4, formatted with -O quota,project) or pquota (xfs); the kernel also \
             needs CONFIG_QFMT_V2 (ext4) or CONFIG_XFS_QUOTA (xfs)"
            .to_owned(),
        Errno::INVAL => "this filesystem does not support project quotas (EINVAL)".to_owned(),
        Errno::NOTSUP => {
            "this filesystem does not support quota operations (EOPNOTSUPP)".to_owned()
        }
        Errno::NOENT => "the filesystem has no project quota information (ENOENT)".to_owned(),
        Errno::PERM | Errno::ACCESS => {
            format!("not allowed to query quotas ({errno}): needs CAP_SYS_ADMIN or a seccomp profile allowing quotactl_fd")
        }
        other => format!("quotactl_fd(Q_GETINFO, PRJQUOTA) failed: {other}"),
    }
}

/// Tells "the syscall is missing" from "this filesystem has no quota ops", which both answer
/// ENOSYS: with fd -1 an existing quotactl_fd says EBADF.
fn quotactl_fd_exists() -> bool {
    let mut info = raw::IfDqinfo::default();
    // SAFETY: Q_GETINFO's argument is an if_dqinfo, which `info` is.
    let probe = unsafe { quotactl_fd(-1, raw::qcmd(raw::Q_GETINFO, raw::PRJQUOTA), 0, &mut info) };
    probe != Err(Errno::NOSYS)
}

impl Kernel for LinuxKernel {
    fn quota_support(&self, fs: BorrowedFd<'_>) -> QuotaSupport {
        let fd = fs.as_raw_fd();
        let mut info = raw::IfDqinfo::default();
        // Q_GETINFO answers ESRCH unless project quota accounting is on.
        // SAFETY: Q_GETINFO's argument is an if_dqinfo, which `info` is.
        let getinfo =
            unsafe { quotactl_fd(fd, raw::qcmd(raw::Q_GETINFO, raw::PRJQUOTA), 0, &mut info) };
        if let Err(e) = getinfo {
            return QuotaSupport::Unavailable(explain_quota_errno(e));
        }
        // Accounting alone does not stop a writer: ask whether limits are enforced too.
        let mut state = raw::FsQuotaStatv {
            qs_version: raw::FS_QSTATV_VERSION1,
            ..raw::FsQuotaStatv::default()
        };
        // SAFETY: Q_XGETQSTATV's argument is an fs_quota_statv, which `state` is.
        let statv = unsafe {
            quotactl_fd(
                fd,
                raw::qcmd(raw::Q_XGETQSTATV, raw::PRJQUOTA),
                0,
                &mut state,
            )
        };
        match statv {
            Ok(()) if state.qs_flags & raw::FS_QUOTA_PDQ_ENFD != 0 => QuotaSupport::Enforced,
            Ok(()) => QuotaSupport::Unavailable(
                "project quotas are accounted but not enforced on this filesystem: mount it \
                 with prjquota (ext4) or pquota (xfs), not pqnoenforce"
                    .to_owned(),
            ),
            Err(e) => QuotaSupport::Unavailable(format!(
                "could not read the quota state (quotactl_fd Q_XGETQSTATV): {e}"
            )),
        }
    }

    fn set_project_id(&self, dir: BorrowedFd<'_>, project: u32) -> SysResult<()> {
        let reopened = ioctl_fd(dir)?;
        let fd = reopened.as_ref().map_or(dir, |fd| fd.as_fd());
        let mut attr = get_fsxattr(fd)?;
        let mut wanted = attr;
        wanted.fsx_projid = project;
        // Inheritance only means something on a directory; xfs refuses it on other files.
        if file_info(fd)?.is_dir {
            wanted.fsx_xflags |= raw::FS_XFLAG_PROJINHERIT;
        }
        if (wanted.fsx_projid, wanted.fsx_xflags) == (attr.fsx_projid, attr.fsx_xflags) {
            // Already so: no write, which keeps this idempotent even on a read-only mount.
            return Ok(());
        }
        attr.fsx_projid = wanted.fsx_projid;
        attr.fsx_xflags = wanted.fsx_xflags;
        set_fsxattr(fd, attr).map_err(|e| SysError {
            args: format!("{}, project {project}", e.args),
            ..e
        })
    }

    fn project_id(&self, dir: BorrowedFd<'_>) -> SysResult<u32> {
        let reopened = ioctl_fd(dir)?;
        let fd = reopened.as_ref().map_or(dir, |fd| fd.as_fd());
        Ok(get_fsxattr(fd)?.fsx_projid)
    }

    fn set_project_limit(&self, fs: BorrowedFd<'_>, project: u32, bytes: u64) -> SysResult<()> {
        // Limits travel in 1 KiB quota blocks; round up so the limit is never below the ask.
        let blocks = bytes.div_ceil(raw::QIF_DQBLKSIZE);
        let mut quota = raw::IfDqblk {
            dqb_bhardlimit: blocks,
            // QIF_BLIMITS sets the soft limit too: none.
            dqb_bsoftlimit: 0,
            dqb_valid: raw::QIF_BLIMITS,
            ..raw::IfDqblk::default()
        };
        // SAFETY: Q_SETQUOTA's argument is an if_dqblk, which `quota` is.
        let ret = unsafe {
            quotactl_fd(
                fs.as_raw_fd(),
                raw::qcmd(raw::Q_SETQUOTA, raw::PRJQUOTA),
                project,
                &mut quota,
            )
        };
        ret.map_err(|e| {
            SysError::new(
                "quotactl_fd",
                format!(
                    "{}, Q_SETQUOTA, PRJQUOTA, project {project}, hard limit {blocks} KiB",
                    fd_desc(fs)
                ),
                e,
            )
        })
    }

    fn project_usage(&self, fs: BorrowedFd<'_>, project: u32) -> SysResult<QuotaUsage> {
        let mut quota = raw::IfDqblk::default();
        // SAFETY: Q_GETQUOTA's argument is an if_dqblk, which `quota` is.
        let ret = unsafe {
            quotactl_fd(
                fs.as_raw_fd(),
                raw::qcmd(raw::Q_GETQUOTA, raw::PRJQUOTA),
                project,
                &mut quota,
            )
        };
        match ret {
            Ok(()) => {}
            // xfs keeps no record of a project with nothing charged and no limit, and says
            // ENOENT for it (seen on Linux 6.1 by scripts/vm-test); ext4 answers zeros. Both
            // mean the same: nothing used, no limit.
            Err(Errno::NOENT) => return Ok(QuotaUsage::default()),
            Err(e) => {
                return Err(SysError::new(
                    "quotactl_fd",
                    format!("{}, Q_GETQUOTA, PRJQUOTA, project {project}", fd_desc(fs)),
                    e,
                ))
            }
        }
        Ok(QuotaUsage {
            bytes_used: quota.dqb_curspace,
            bytes_limit: quota.dqb_bhardlimit.saturating_mul(raw::QIF_DQBLKSIZE),
            inodes_used: quota.dqb_curinodes,
            inodes_limit: quota.dqb_ihardlimit,
        })
    }

    fn bind_mount(
        &self,
        source: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attrs: MountAttrs,
    ) -> SysResult<()> {
        // A detached copy of the source mount (not its submounts: a bind, not an rbind). If
        // anything below fails, dropping `tree` dissolves it again: nothing is left mounted.
        let tree = rustix::mount::open_tree(
            source,
            c"",
            OpenTreeFlags::OPEN_TREE_CLONE
                | OpenTreeFlags::OPEN_TREE_CLOEXEC
                | OpenTreeFlags::AT_EMPTY_PATH,
        )
        .map_err(|e| {
            SysError::new(
                "open_tree",
                format!("{}, OPEN_TREE_CLONE", fd_desc(source)),
                e,
            )
        })?;
        // Applied while the copy is still invisible, so it never appears writable even briefly.
        let masks = attr_masks(attrs);
        if masks.attr_set != 0 || masks.attr_clr != 0 {
            mount_setattr(tree.as_fd(), &masks).map_err(|e| {
                SysError::new(
                    "mount_setattr",
                    format!(
                        "{}, set {:#x}, clear {:#x}",
                        fd_desc(tree.as_fd()),
                        masks.attr_set,
                        masks.attr_clr
                    ),
                    e,
                )
            })?;
        }
        rustix::mount::move_mount(
            &tree,
            c"",
            target,
            c"",
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
        )
        .map_err(|e| {
            SysError::new(
                "move_mount",
                format!("{} -> {}", fd_desc(source), fd_desc(target)),
                e,
            )
        })
    }

    /// EBUSY is tried again for up to 100 ms before it is returned: a process another thread
    /// of ours just forked (mkfs, resize2fs) holds a copy of every fd of this process until it
    /// execs, those on this mount included, and for that instant the mount is busy. A mount
    /// that is really in use stays EBUSY.
    fn unmount(&self, target: &Path) -> SysResult<()> {
        let mut tries = 0;
        loop {
            match rustix::mount::unmount(target, UnmountFlags::NOFOLLOW) {
                Err(Errno::BUSY) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => {
                    return other.map_err(|e| {
                        SysError::new(
                            "umount2",
                            format!("{:?}, UMOUNT_NOFOLLOW", target.display().to_string()),
                            e,
                        )
                    })
                }
            }
        }
    }

    fn attach_loop(&self, image: BorrowedFd<'_>, options: LoopOptions) -> SysResult<LoopDevice> {
        loopdev::attach(image, options)
    }

    fn find_loop(&self, image: BorrowedFd<'_>) -> SysResult<Option<LoopDevice>> {
        loopdev::find(image)
    }

    fn detach_loop(&self, image: BorrowedFd<'_>) -> SysResult<()> {
        loopdev::detach(image)
    }

    fn refresh_loop_capacity(&self, device: &LoopDevice) -> SysResult<u64> {
        loopdev::set_capacity(device)
    }

    fn device_size(&self, device: &LoopDevice) -> SysResult<u64> {
        loopdev::block_device_size(device.fd.as_fd())
    }

    fn mount_device(
        &self,
        device: &LoopDevice,
        kind: FsKind,
        options: &[String],
        target: BorrowedFd<'_>,
        attrs: MountAttrs,
    ) -> SysResult<()> {
        blockfs::mount_device(device, kind, options, target, attrs)
    }

    fn make_fs(&self, device: &LoopDevice, kind: FsKind) -> Result<(), ToolError> {
        blockfs::make_fs(device, kind)
    }

    fn grow_fs(
        &self,
        device: &LoopDevice,
        kind: FsKind,
        mount_point: &Path,
    ) -> Result<(), ToolError> {
        blockfs::grow_fs(device, kind, mount_point)
    }

    fn btrfs_create_subvolume(&self, dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
        with_ioctl_fd(dir, |fd| btrfs::create_subvolume(fd, name))
    }

    fn btrfs_snapshot(
        &self,
        dir: BorrowedFd<'_>,
        name: &str,
        source: BorrowedFd<'_>,
        readonly: bool,
    ) -> SysResult<()> {
        with_ioctl_fd(source, |source| {
            with_ioctl_fd(dir, |fd| btrfs::create_snapshot(fd, name, source, readonly))
        })
    }

    fn btrfs_destroy_subvolume(&self, dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
        with_ioctl_fd(dir, |fd| btrfs::destroy_subvolume(fd, name))
    }

    fn btrfs_destroy_subvolume_id(&self, fs: BorrowedFd<'_>, subvolume: u64) -> SysResult<()> {
        with_ioctl_fd(fs, |fd| btrfs::destroy_subvolume_id(fd, subvolume))
    }

    fn btrfs_subvolume_id(&self, fd: BorrowedFd<'_>) -> SysResult<u64> {
        with_ioctl_fd(fd, btrfs::subvolume_id)
    }

    fn btrfs_child_subvolumes(&self, fs: BorrowedFd<'_>, parent: u64) -> SysResult<Vec<u64>> {
        with_ioctl_fd(fs, |fd| btrfs::child_subvolumes(fd, parent))
    }

    fn btrfs_quota_mode(&self, fs: BorrowedFd<'_>) -> SysResult<btrfs::QuotaMode> {
        with_ioctl_fd(fs, btrfs::quota_mode)
    }

    fn btrfs_enable_quota(&self, fs: BorrowedFd<'_>, simple: bool) -> SysResult<()> {
        with_ioctl_fd(fs, |fd| btrfs::enable_quota(fd, simple))
    }

    fn btrfs_qgroup_create(&self, fs: BorrowedFd<'_>, qgroup: u64) -> SysResult<()> {
        with_ioctl_fd(fs, |fd| btrfs::qgroup_create(fd, qgroup, true))
    }

    fn btrfs_qgroup_remove(&self, fs: BorrowedFd<'_>, qgroup: u64) -> SysResult<()> {
        with_ioctl_fd(fs, |fd| btrfs::qgroup_create(fd, qgroup, false))
    }

    fn btrfs_qgroup_assign(
        &self,
        fs: BorrowedFd<'_>,
        member: u64,
        parent: u64,
        assign: bool,
    ) -> SysResult<()> {
        with_ioctl_fd(fs, |fd| btrfs::qgroup_assign(fd, member, parent, assign))
    }

    fn btrfs_qgroup_limit(&self, fs: BorrowedFd<'_>, qgroup: u64, bytes: u64) -> SysResult<()> {
        with_ioctl_fd(fs, |fd| btrfs::qgroup_limit(fd, qgroup, bytes))
    }

    fn btrfs_qgroups(&self, fs: BorrowedFd<'_>) -> SysResult<Vec<btrfs::Qgroup>> {
        with_ioctl_fd(fs, btrfs::qgroups)
    }

    fn btrfs_commit(&self, fs: BorrowedFd<'_>) -> SysResult<()> {
        btrfs::commit(fs)
    }

    fn freeze_fs(&self, fs: BorrowedFd<'_>) -> SysResult<()> {
        with_ioctl_fd(fs, |fd| {
            let mut unused: std::ffi::c_int = 0;
            // SAFETY: FIFREEZE is _IOWR('X', 119, int); the Updater points at a live c_int for
            // the duration of the call (the kernel does not even read it).
            let freeze = unsafe { Updater::<{ raw::FIFREEZE }, _>::new(&mut unused) };
            // SAFETY: the opcode and argument type agree (see above); `fd` is open for the call.
            unsafe { rustix::ioctl::ioctl(fd, freeze) }
                .map_err(|e| SysError::new("ioctl", format!("{}, FIFREEZE", fd_desc(fd)), e))
        })
    }

    fn thaw_fs(&self, fs: BorrowedFd<'_>) -> SysResult<bool> {
        with_ioctl_fd(fs, |fd| {
            let mut unused: std::ffi::c_int = 0;
            // SAFETY: FITHAW is _IOWR('X', 120, int); as for FIFREEZE.
            let thaw = unsafe { Updater::<{ raw::FITHAW }, _>::new(&mut unused) };
            // SAFETY: the opcode and argument type agree (see above); `fd` is open for the call.
            match unsafe { rustix::ioctl::ioctl(fd, thaw) } {
                Ok(()) => Ok(true),
                // thaw_super's answer for a filesystem that is not frozen.
                Err(Errno::INVAL) => Ok(false),
                Err(e) => Err(SysError::new(
                    "ioctl",
                    format!("{}, FITHAW", fd_desc(fd)),
                    e,
                )),
            }
        })
    }
}

/// Runs `f` on `fd`, or on a re-opened real fd of the same inode when `fd` is O_PATH (which
/// ioctls refuse).
fn with_ioctl_fd<T>(
    fd: BorrowedFd<'_>,
    f: impl FnOnce(BorrowedFd<'_>) -> SysResult<T>,
) -> SysResult<T> {
    let reopened = ioctl_fd(fd)?;
    f(reopened.as_ref().map_or(fd, |o| o.as_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atime_modes_clear_the_whole_field() {
        let none = attr_masks(MountAttrs::default());
        assert_eq!((none.attr_set, none.attr_clr), (0, 0));
        let ro = attr_masks(MountAttrs {
            read_only: true,
            nosuid: true,
            nodev: true,
            ..MountAttrs::default()
        });
        assert_eq!(ro.attr_set, 0x1 | 0x2 | 0x4);
        assert_eq!(ro.attr_clr, 0);
        let relatime = attr_masks(MountAttrs {
            relatime: true,
            ..MountAttrs::default()
        });
        assert_eq!((relatime.attr_set, relatime.attr_clr), (0, 0x70));
        let both = attr_masks(MountAttrs {
            noatime: true,
            relatime: true,
            nodiratime: true,
            ..MountAttrs::default()
        });
        assert_eq!((both.attr_set, both.attr_clr), (0x10 | 0x80, 0x70));
    }

    #[test]
    fn quota_commands_match_the_uapi_values() {
        assert_eq!(raw::qcmd(raw::Q_GETINFO, raw::PRJQUOTA), 0x8000_0502);
        assert_eq!(raw::qcmd(raw::Q_SETQUOTA, raw::PRJQUOTA), 0x8000_0802);
        assert_eq!(raw::qcmd(raw::Q_XGETQSTATV, raw::PRJQUOTA), 0x0058_0802);
        assert_eq!(raw::FS_IOC_FSGETXATTR, 0x801c_581f);
        assert_eq!(raw::FS_IOC_FSSETXATTR, 0x401c_5820);
        assert_eq!(raw::FIFREEZE, 0xc004_5877);
        assert_eq!(raw::FITHAW, 0xc004_5878);
    }

    #[test]
    fn quotactl_fd_is_present_on_this_kernel() {
        assert!(quotactl_fd_exists());
    }
}
