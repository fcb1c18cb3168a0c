//! Filesystems on block devices: what a device holds (read from the superblock magic
//! ourselves), making and growing one (the one place stowage spawns programs), and mounting
//! one onto an fd with the new mount API.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{AtFlags, FileType, StatxFlags};
use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MoveMountFlags};

use crate::fs::fd_desc;
use crate::loopdev::{block_device_size, LoopDevice};
use crate::{MountAttrs, SysError, SysResult, ToolError, ToolFailure};

/// A filesystem stowage can make, recognise, mount and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsKind {
    /// The ext2/3/4 family (one superblock magic); made and mounted as ext4.
    Ext4,
    Xfs,
    Btrfs,
}

impl FsKind {
    /// Every kind, for tests and listings.
    pub const ALL: [FsKind; 3] = [FsKind::Ext4, FsKind::Xfs, FsKind::Btrfs];

    /// The kernel's filesystem type name (fsopen), also the CSI `fs_type`.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
        }
    }

    /// Parses a CSI `fs_type`; None for one stowage does not handle.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The distribution package (Debian and Fedora alike) that ships its tools.
    pub fn package(self) -> &'static str {
        match self {
            FsKind::Ext4 => "e2fsprogs",
            FsKind::Xfs => "xfsprogs",
            FsKind::Btrfs => "btrfs-progs",
        }
    }

    /// The smallest device its current mkfs accepts: xfsprogs refuses filesystems below
    /// 300 MiB (since 5.19), btrfs-progs (6.2) devices below 109 MiB with default profiles.
    pub fn min_size(self) -> u64 {
        match self {
            FsKind::Ext4 => 1 << 20,
            FsKind::Xfs => 300 << 20,
            FsKind::Btrfs => 109 << 20,
        }
    }

    /// The mkfs program and its arguments before the device.
    fn mkfs(self) -> (&'static str, &'static [&'static str]) {
        match self {
            // nodiscard: discarding a fresh sparse image only punches holes into holes, and
            // takes long on a big one. lazy_itable_init: the kernel zeroes inode tables in
            // the background after mount instead of mkfs writing them all now.
            FsKind::Ext4 => (
                "mkfs.ext4",
                &["-q", "-F", "-E", "nodiscard,lazy_itable_init=1"],
            ),
            // -K: no discard, as above.
            FsKind::Xfs => ("mkfs.xfs", &["-q", "-f", "-K"]),
            FsKind::Btrfs => ("mkfs.btrfs", &["-q", "-f", "-K"]),
        }
    }
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a device holds, as far as its first and last blocks tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceContent {
    /// Only zeros where any known filesystem or partition table keeps its signature: safe to
    /// format.
    Empty,
    /// A filesystem stowage knows.
    Filesystem(FsKind),
    /// Non-zero data that is none of [`FsKind`]: something else (another filesystem, a
    /// partition table, encrypted data). It must never be formatted.
    Unrecognized,
}

/// How much of the start (and end) of a device is read: every signature of interest lies
/// within (btrfs at 64 KiB, ZFS labels in the first and last 512 KiB, GPT backup at the end).
const PROBE_SPAN: u64 = 512 << 10;

/// Reads `buf.len()` bytes at `offset`, or fewer only at the end of the file.
fn read_at(fd: BorrowedFd<'_>, mut offset: u64, mut buf: &mut [u8]) -> SysResult<()> {
    while !buf.is_empty() {
        match rustix::io::pread(fd, &mut *buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => {
                return Err(SysError::new(
                    "pread",
                    format!("{}, offset {offset}", fd_desc(fd)),
                    e,
                ))
            }
        }
    }
    Ok(())
}

/// The size of a block device or regular file open at `fd`.
fn content_size(fd: BorrowedFd<'_>) -> SysResult<u64> {
    let st = rustix::fs::statx(
        fd,
        c"",
        AtFlags::EMPTY_PATH,
        StatxFlags::TYPE | StatxFlags::SIZE,
    )
    .map_err(|e| SysError::new("statx", fd_desc(fd), e))?;
    match FileType::from_raw_mode(u32::from(st.stx_mode)) {
        FileType::BlockDevice => block_device_size(fd),
        FileType::RegularFile => Ok(st.stx_size),
        _ => Err(SysError::new(
            "probe",
            format!("{} (not a block device or file)", fd_desc(fd)),
            Errno::NODEV,
        )),
    }
}

/// Says what the device (or image file) open at `fd` holds, from the superblock magic
/// numbers: ext2/3/4 0xEF53 (little-endian) at byte 1080, xfs `XFSB` at 0, btrfs `_BHRfS_M`
/// at 65600. Reads at most 1 MiB. Unprivileged given the fd, so not part of the seam.
pub fn probe(fd: BorrowedFd<'_>) -> SysResult<DeviceContent> {
    let size = content_size(fd)?;
    let head_len = size.min(PROBE_SPAN);
    let mut head = vec![0u8; usize::try_from(head_len).unwrap_or(0)];
    read_at(fd, 0, &mut head)?;
    if let Some(kind) = magic(&head) {
        return Ok(DeviceContent::Filesystem(kind));
    }
    if head.iter().any(|b| *b != 0) {
        return Ok(DeviceContent::Unrecognized);
    }
    if size > head_len {
        let tail_start = size - PROBE_SPAN.min(size - head_len);
        let mut tail = vec![0u8; usize::try_from(size - tail_start).unwrap_or(0)];
        read_at(fd, tail_start, &mut tail)?;
        if tail.iter().any(|b| *b != 0) {
            return Ok(DeviceContent::Unrecognized);
        }
    }
    Ok(DeviceContent::Empty)
}

/// Byte offsets and values of the signatures [`probe`] recognises.
const EXT_MAGIC: (usize, &[u8]) = (1024 + 56, &[0x53, 0xEF]);
const XFS_MAGIC: (usize, &[u8]) = (0, b"XFSB");
const BTRFS_MAGIC: (usize, &[u8]) = (65536 + 64, b"_BHRfS_M");

fn magic(head: &[u8]) -> Option<FsKind> {
    let at =
        |(offset, bytes): (usize, &[u8])| head.get(offset..offset + bytes.len()) == Some(bytes);
    if at(XFS_MAGIC) {
        Some(FsKind::Xfs)
    } else if at(BTRFS_MAGIC) {
        Some(FsKind::Btrfs)
    } else if at(EXT_MAGIC) {
        Some(FsKind::Ext4)
    } else {
        None
    }
}

/// Writes the signature of `kind` into `head` (the fake's mkfs; tests).
pub(crate) fn write_magic(fd: BorrowedFd<'_>, kind: FsKind) -> SysResult<()> {
    let (offset, bytes) = match kind {
        FsKind::Ext4 => EXT_MAGIC,
        FsKind::Xfs => XFS_MAGIC,
        FsKind::Btrfs => BTRFS_MAGIC,
    };
    rustix::io::pwrite(fd, bytes, offset as u64)
        .map(drop)
        .map_err(|e| SysError::new("pwrite", fd_desc(fd), e))
}

/// The PATH tools are looked up in; the rest of the environment is cleared.
const TOOL_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long mkfs or a grow tool may run before it is killed.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// How much of a tool's stderr is kept for the error (its end, where the reason is).
const STDERR_KEEP: usize = 4096;

/// Runs `program args…` with a cleared environment (PATH only), stdin and stdout on
/// /dev/null and stderr captured, killing it after `timeout`.
pub fn run_tool(
    program: &'static str,
    package: &'static str,
    args: &[String],
    timeout: Duration,
) -> Result<(), ToolError> {
    let fail = |failure, stderr: String| ToolError {
        program,
        args: args.to_vec(),
        failure,
        stderr,
    };
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", TOOL_PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            let failure = if e.kind() == std::io::ErrorKind::NotFound {
                ToolFailure::Missing { package }
            } else {
                ToolFailure::Spawn(Errno::from_io_error(&e).unwrap_or(Errno::IO))
            };
            fail(failure, String::new())
        })?;
    // Read stderr on a thread: a tool that writes more than a pipe holds would otherwise
    // block forever while we wait for it.
    let mut pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(pipe) = pipe.as_mut() {
            let _ = pipe.read_to_end(&mut text);
        }
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                // Our own child, by its pid; reaped right after.
                let _ = child.kill();
                let _ = child.wait();
                // The reader ends once the pipe closes; not joined, in case a grandchild
                // still holds it open.
                return Err(fail(
                    ToolFailure::TimedOut(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)),
                    String::new(),
                ));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let errno = Errno::from_io_error(&e).unwrap_or(Errno::IO);
                return Err(fail(ToolFailure::Spawn(errno), String::new()));
            }
        }
    };
    let text = reader.join().unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let text = text.trim();
    let mut cut = text.len().saturating_sub(STDERR_KEEP);
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    let stderr = text[cut..].to_owned();
    if status.success() {
        if !stderr.is_empty() {
            tracing::debug!(program, %stderr, "tool succeeded with messages");
        }
        return Ok(());
    }
    use std::os::unix::process::ExitStatusExt as _;
    let failure = match (status.code(), status.signal()) {
        (Some(code), _) => ToolFailure::Exited(code),
        (None, Some(signal)) => ToolFailure::Signaled(signal),
        (None, None) => ToolFailure::Exited(-1),
    };
    Err(fail(failure, stderr))
}

/// See [`crate::Kernel::make_fs`].
pub(crate) fn make_fs(device: &LoopDevice, kind: FsKind) -> Result<(), ToolError> {
    let (program, options) = kind.mkfs();
    let mut args: Vec<String> = options.iter().map(|s| (*s).to_owned()).collect();
    args.push(device.path.display().to_string());
    run_tool(program, kind.package(), &args, TOOL_TIMEOUT)
}

/// See [`crate::Kernel::grow_fs`].
pub(crate) fn grow_fs(
    device: &LoopDevice,
    kind: FsKind,
    mount_point: &std::path::Path,
) -> Result<(), ToolError> {
    let mount_point = mount_point.display().to_string();
    let (program, args) = match kind {
        // Online resize of a mounted ext4 goes through the device.
        FsKind::Ext4 => ("resize2fs", vec![device.path.display().to_string()]),
        FsKind::Xfs => ("xfs_growfs", vec!["-d".to_owned(), mount_point]),
        FsKind::Btrfs => (
            "btrfs",
            vec![
                "filesystem".to_owned(),
                "resize".to_owned(),
                "max".to_owned(),
                mount_point,
            ],
        ),
    };
    run_tool(program, kind.package(), &args, TOOL_TIMEOUT)
}

/// The messages the kernel left in a filesystem context (`e …`, `w …`, `i …` lines).
fn context_messages(fs_fd: BorrowedFd<'_>) -> String {
    let mut messages = Vec::new();
    let mut buf = [0u8; 1024];
    // Each read returns one message; ENODATA when none is left. Bounded anyway.
    for _ in 0..16 {
        match rustix::io::read(fs_fd, &mut buf) {
            Ok(n) if n > 0 => messages.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => break,
        }
    }
    messages.join("; ")
}

/// See [`crate::Kernel::mount_device`].
pub(crate) fn mount_device(
    device: &LoopDevice,
    kind: FsKind,
    options: &[String],
    target: BorrowedFd<'_>,
    attrs: MountAttrs,
) -> SysResult<()> {
    let source = device.path.display().to_string();
    let fs_fd = rustix::mount::fsopen(kind.name(), FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| SysError::new("fsopen", kind.name(), e))?;
    let config_error = |what: String, e: Errno| {
        let messages = context_messages(fs_fd.as_fd());
        let messages = if messages.is_empty() {
            String::new()
        } else {
            format!(" [{messages}]")
        };
        SysError::new("fsconfig", format!("{kind}, {what}{messages}"), e)
    };
    rustix::mount::fsconfig_set_string(fs_fd.as_fd(), "source", &source)
        .map_err(|e| config_error(format!("source={source}"), e))?;
    if attrs.read_only {
        // The superblock too, not only the mount: nothing (journal replay aside) is written.
        rustix::mount::fsconfig_set_flag(fs_fd.as_fd(), "ro")
            .map_err(|e| config_error("ro".to_owned(), e))?;
    }
    for option in options {
        let set = match option.split_once('=') {
            Some((key, value)) => rustix::mount::fsconfig_set_string(fs_fd.as_fd(), key, value),
            None => rustix::mount::fsconfig_set_flag(fs_fd.as_fd(), option.as_str()),
        };
        set.map_err(|e| config_error(option.clone(), e))?;
    }
    rustix::mount::fsconfig_create(fs_fd.as_fd())
        .map_err(|e| config_error(format!("create from {source}"), e))?;
    let attr_flags = attrs.flags().0;
    // Detached until moved: dropping `mnt` on an error below unmounts it again.
    let mnt = rustix::mount::fsmount(fs_fd.as_fd(), FsMountFlags::FSMOUNT_CLOEXEC, attr_flags)
        .map_err(|e| {
            SysError::new(
                "fsmount",
                format!("{kind} from {source}, attrs {:#x}", attr_flags.bits()),
                e,
            )
        })?;
    rustix::mount::move_mount(
        mnt.as_fd(),
        c"",
        target,
        c"",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
    .map_err(|e| {
        SysError::new(
            "move_mount",
            format!("{kind} from {source} -> {}", fd_desc(target)),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_offsets() {
        let mut head = vec![0u8; 70_000];
        assert_eq!(magic(&head), None);
        head[1080] = 0x53;
        head[1081] = 0xEF;
        assert_eq!(magic(&head), Some(FsKind::Ext4));
        head[65600..65608].copy_from_slice(b"_BHRfS_M");
        assert_eq!(magic(&head), Some(FsKind::Btrfs));
        head[..4].copy_from_slice(b"XFSB");
        assert_eq!(magic(&head), Some(FsKind::Xfs));
        assert_eq!(magic(&head[..100]), Some(FsKind::Xfs));
        assert_eq!(magic(&[0u8; 10]), None);
    }

    #[test]
    fn names_round_trip() {
        for kind in FsKind::ALL {
            assert_eq!(FsKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(FsKind::from_name("ext3"), None);
    }

    #[test]
    fn tool_missing_names_the_package() {
        let err = run_tool(
            "stowage-no-such-tool",
            "some-package",
            &[],
            Duration::from_secs(5),
        )
        .expect_err("missing");
        assert_eq!(
            err.failure,
            ToolFailure::Missing {
                package: "some-package"
            }
        );
        assert!(err.to_string().contains("some-package"), "{err}");
    }

    #[test]
    fn tool_status_stderr_environment_and_timeout() {
        let sh = |script: &str, timeout| {
            run_tool(
                "sh",
                "dash",
                &["-c".to_owned(), script.to_owned()],
                Duration::from_millis(timeout),
            )
        };
        sh("exit 0", 10_000).expect("success");
        let err = sh("echo bad thing >&2; exit 3", 10_000).expect_err("exit 3");
        assert_eq!(err.failure, ToolFailure::Exited(3));
        assert_eq!(err.stderr, "bad thing");
        // Only PATH (and LC_ALL) reach the tool.
        let err = sh("env >&2; exit 1", 10_000).expect_err("exit 1");
        let mut vars: Vec<&str> = err
            .stderr
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
            .collect();
        vars.sort_unstable();
        assert_eq!(vars, ["LC_ALL", "PATH"], "{}", err.stderr);
        // stdin is /dev/null: `read` meets end of file at once instead of waiting.
        let err = sh("read x; exit 4", 10_000).expect_err("exit 4");
        assert_eq!(err.failure, ToolFailure::Exited(4));
        let err = sh("exec sleep 30", 200).expect_err("timeout");
        assert_eq!(err.failure, ToolFailure::TimedOut(200));
    }
}
