//! Helpers shared by the integration tests: root detection, mount guards, mountinfo lookup.
//! Each test binary uses a different subset, hence the dead-code allowance.
#![allow(dead_code)]

/// Prints to the process's real stderr: libtest captures `eprintln!` of passing tests, and a
/// skip must be seen.
macro_rules! loud {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::{Mode, OFlags};
use rustix::mount::UnmountFlags;

/// True when running as root. Otherwise prints the SKIPPED line the test plan asks for.
pub fn root_or_skip(test: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        true
    } else {
        loud!("SKIPPED (needs root): {test}");
        false
    }
}

/// An `O_PATH` fd of a directory, the kind of fd the driver passes around.
pub fn path_fd(path: &Path) -> OwnedFd {
    rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open O_PATH {}: {e}", path.display()))
}

/// Lazily unmounts `path` (every mount stacked there) when dropped, so a test that panics
/// halfway leaves nothing mounted. Declare it after the tempdirs it points into, so it drops
/// first.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        // EINVAL once nothing is left mounted there: that ends the loop.
        for _ in 0..8 {
            if rustix::mount::unmount(&self.0, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
                .is_err()
            {
                break;
            }
        }
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct MountLine {
    pub mount_id: u64,
    pub mount_point: String,
    /// Per-mount options (ro/rw, nosuid, nodev, noexec, atime).
    pub options: Vec<String>,
    pub fs_type: String,
}

impl MountLine {
    pub fn has(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }
}

/// The mounts at `path`, bottom first (the last one is the visible one).
pub fn mounts_at(path: &Path) -> Vec<MountLine> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let wanted = path.to_str().expect("utf-8 path");
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let point = fields.get(4)?.replace("\\040", " ");
            (point == wanted).then(|| MountLine {
                mount_id: fields[0].parse().unwrap_or(0),
                mount_point: point,
                options: fields
                    .get(5)
                    .map_or(Vec::new(), |o| o.split(',').map(str::to_owned).collect()),
                fs_type: right.split(' ').next().unwrap_or("").to_owned(),
            })
        })
        .collect()
}

/// Mounts a small tmpfs at `path`; the guard unmounts it.
pub fn mount_tmpfs(path: &Path) -> MountGuard {
    let guard = MountGuard(path.to_path_buf());
    rustix::mount::mount(
        "stowage-test",
        path,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"size=4m,mode=0755",
    )
    .expect("mount tmpfs");
    guard
}

/// A freshly made ext4 filesystem in an image file, loop-mounted at `dir/mnt`. None (after
/// printing why) when mkfs.ext4 or mount -o loop is not usable here.
pub fn mount_ext4(dir: &Path, test: &str) -> Option<(PathBuf, MountGuard)> {
    mount_fresh(dir, test, "ext4", &["-q", "-F"], 16 << 20)
}

/// A freshly made btrfs in a 256 MiB image file, loop-mounted at `dir/mnt`. None (after
/// printing why) when mkfs.btrfs or mount -o loop is not usable here.
pub fn mount_btrfs(dir: &Path, test: &str) -> Option<(PathBuf, MountGuard)> {
    mount_fresh(dir, test, "btrfs", &["-q", "-f"], 256 << 20)
}

/// A freshly made xfs with reflink in a 320 MiB image file (xfs's minimum is 300 MiB),
/// loop-mounted at `dir/mnt`. None (after printing why) when mkfs.xfs or mount -o loop is not
/// usable here.
pub fn mount_xfs(dir: &Path, test: &str) -> Option<(PathBuf, MountGuard)> {
    mount_fresh(
        dir,
        test,
        "xfs",
        &["-q", "-f", "-m", "reflink=1"],
        320 << 20,
    )
}

/// `mkfs.<fs> <mkfs_args>` on a `size`-byte image file in `dir`, loop-mounted at `dir/mnt`
/// (unmounted when the guard drops).
pub fn mount_fresh(
    dir: &Path,
    test: &str,
    fs: &str,
    mkfs_args: &[&str],
    size: u64,
) -> Option<(PathBuf, MountGuard)> {
    let image = dir.join(format!("{fs}.img"));
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir mnt");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(size))
        .expect("image file");
    let mkfs = Command::new(format!("mkfs.{fs}"))
        .args(mkfs_args)
        .arg(&image)
        .output();
    if !matches!(&mkfs, Ok(o) if o.status.success()) {
        loud!("SKIPPED (needs mkfs.{fs}): {test}");
        return None;
    }
    let guard = MountGuard(mnt.clone());
    let mount = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mnt)
        .status();
    if !matches!(mount, Ok(s) if s.success()) {
        loud!("SKIPPED (needs mount -o loop and {fs} in the kernel): {test}");
        return None;
    }
    Some((mnt, guard))
}
