//! Loop devices, filesystems on them and their growth, against the real kernel. Root only:
//! each test prints `SKIPPED (needs root)` and returns otherwise; a missing mkfs tool or a
//! kernel without the filesystem is a loud SKIPPED for that filesystem. Every test ends by
//! asserting that no loop device is left attached to its images, and guards detach and
//! unmount on the way out even when an assertion fails.

#[macro_use]
mod common;

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{path_fd, root_or_skip, MountGuard};
use stowage_sys::fs::{fs_space, open_trusted_dir};
use stowage_sys::image::{create_image, grow_image, image_size, open_image, Allocation};
use stowage_sys::loopdev::{devices_backed_by, status};
use stowage_sys::{
    blockfs, DeviceContent, Errno, FsKind, Kernel, LinuxKernel, LoopDevice, LoopOptions,
    MountAttrs, ToolFailure,
};

const MIB: u64 = 1 << 20;

/// A sparse image in a private temporary directory. On drop it detaches whatever loop
/// device is still attached to it (declare mount guards after it, so they unmount first).
struct TestImage {
    image: OwnedFd,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestImage {
    fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir_fd = open_trusted_dir(dir.path()).expect("open dir");
        let image = create_image(dir_fd.as_fd(), "vol.img", size, Allocation::Sparse)
            .expect("create image");
        Self {
            image,
            path: dir.path().join("vol.img"),
            _dir: dir,
        }
    }

    /// Asserts that no loop device is attached to this image any more.
    fn assert_detached(&self) {
        // A detach the kernel does at the last close may lag the close by a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = devices_backed_by(self.image.as_fd()).expect("scan loop devices");
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "loop devices left attached to {}: {left:?}",
                self.path.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        if let Err(e) = LinuxKernel.detach_loop(self.image.as_fd()) {
            loud!("cleanup: detach of {}: {e}", self.path.display());
        }
    }
}

fn options(autoclear: bool) -> LoopOptions {
    LoopOptions {
        autoclear,
        ..LoopOptions::default()
    }
}

/// Whether this process may exceed resource limits (capability 24), which ext4 asks of an
/// online resize.
fn has_cap_sys_resource() -> bool {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn loop_exists(number: u32) -> bool {
    Path::new(&format!("/sys/block/loop{number}/loop")).exists()
}

#[test]
fn attach_finds_the_same_device_and_detaches() {
    let name = "attach_finds_the_same_device_and_detaches";
    if !root_or_skip(name) {
        return;
    }
    let img = TestImage::new(64 * MIB);
    let first = LinuxKernel
        .attach_loop(img.image.as_fd(), options(false))
        .expect("attach");
    assert!(first.newly_attached);
    assert_eq!(
        LinuxKernel.device_size(&first).expect("size"),
        64 * MIB,
        "device of exactly the image's size"
    );
    assert!(first.path.starts_with("/dev"), "{first:?}");
    let st = status(first.fd.as_fd()).expect("LOOP_GET_STATUS64");
    assert_eq!(st.backing, first.backing);
    assert!(!st.autoclear && !st.read_only);
    assert_eq!(st.direct_io, first.direct_io, "flag read back");
    assert!(st.file_name.ends_with("vol.img"), "{st:?}");
    loud!(
        "{name}: /dev/loop{} direct_io={} (refused: {:?})",
        first.number,
        st.direct_io,
        first.direct_io_refused
    );

    let again = LinuxKernel
        .attach_loop(img.image.as_fd(), options(false))
        .expect("attach again");
    assert_eq!(again.number, first.number, "never attached twice");
    assert!(!again.newly_attached);
    // Through another open of the same file, as after a driver restart.
    let reopened = open_image(
        open_trusted_dir(img.path.parent().expect("dir"))
            .expect("open")
            .as_fd(),
        "vol.img",
    )
    .expect("open image");
    let found = LinuxKernel
        .find_loop(reopened.as_fd())
        .expect("find")
        .expect("attached");
    assert_eq!(found.number, first.number);
    assert_eq!(
        devices_backed_by(img.image.as_fd()).expect("scan"),
        [first.number]
    );

    // Our own handles hold the device open: detach is refused, not forced...
    let err = LinuxKernel
        .detach_loop(img.image.as_fd())
        .expect_err("still open");
    assert_eq!(err.errno, Errno::BUSY, "{err}");
    assert!(err.to_string().contains("still open elsewhere"), "{err}");
    // ...but left marked autoclear: the last close detaches it.
    let number = first.number;
    drop((first, again, found));
    img.assert_detached();
    assert!(
        !loop_exists(number)
            || devices_backed_by(img.image.as_fd())
                .expect("scan")
                .is_empty()
    );
    // Nothing attached: detach is a no-op success, find answers None.
    LinuxKernel
        .detach_loop(img.image.as_fd())
        .expect("idempotent");
    assert!(LinuxKernel
        .find_loop(img.image.as_fd())
        .expect("find")
        .is_none());

    // Without autoclear the device outlives its handle until detached.
    let kept = LinuxKernel
        .attach_loop(img.image.as_fd(), options(false))
        .expect("attach");
    drop(kept);
    assert!(LinuxKernel
        .find_loop(img.image.as_fd())
        .expect("find")
        .is_some());
    LinuxKernel.detach_loop(img.image.as_fd()).expect("detach");
    assert!(LinuxKernel
        .find_loop(img.image.as_fd())
        .expect("find")
        .is_none());
    img.assert_detached();
}

#[test]
fn autoclear_device_lives_as_long_as_a_holder() {
    let name = "autoclear_device_lives_as_long_as_a_holder";
    if !root_or_skip(name) {
        return;
    }
    let img = TestImage::new(64 * MIB);
    // No mount, handle closed: gone at once (any last close detaches, not only after a mount).
    let device = LinuxKernel
        .attach_loop(img.image.as_fd(), options(true))
        .expect("attach");
    assert!(status(device.fd.as_fd()).expect("status").autoclear);
    drop(device);
    img.assert_detached();

    // Mounted, handle closed: the mount holds it; unmounting frees it.
    let device = LinuxKernel
        .attach_loop(img.image.as_fd(), options(true))
        .expect("attach");
    if !make_fs_or_skip(&device, FsKind::Ext4, name) {
        return;
    }
    let mnt = tempfile::tempdir().expect("tempdir");
    let guard = MountGuard(mnt.path().to_path_buf());
    LinuxKernel
        .mount_device(
            &device,
            FsKind::Ext4,
            &[],
            path_fd(mnt.path()).as_fd(),
            MountAttrs::default(),
        )
        .expect("mount");
    let number = device.number;
    drop(device);
    let found = LinuxKernel
        .find_loop(img.image.as_fd())
        .expect("find")
        .expect("held by the mount");
    assert_eq!(found.number, number);
    drop(found);
    // A detach while mounted is refused and the device stays.
    let err = LinuxKernel
        .detach_loop(img.image.as_fd())
        .expect_err("mounted");
    assert_eq!(err.errno, Errno::BUSY);
    assert!(fs::write(mnt.path().join("still-there"), b"x").is_ok());

    // A re-attach (a re-stage) finds it and can turn autoclear off, for a block volume.
    let block = LinuxKernel
        .attach_loop(img.image.as_fd(), options(false))
        .expect("re-attach");
    assert_eq!(block.number, number);
    assert!(!block.autoclear);
    let back = LinuxKernel
        .attach_loop(img.image.as_fd(), options(true))
        .expect("re-attach");
    assert!(back.autoclear);
    drop((block, back));

    LinuxKernel.unmount(mnt.path()).expect("unmount");
    drop(guard);
    img.assert_detached();
}

/// Makes `kind` on `device`, or prints SKIPPED and returns false when its mkfs is missing.
fn make_fs_or_skip(device: &LoopDevice, kind: FsKind, test: &str) -> bool {
    match LinuxKernel.make_fs(device, kind) {
        Ok(()) => true,
        Err(e) if matches!(e.failure, ToolFailure::Missing { .. }) => {
            loud!("SKIPPED (needs {}: {e}): {test}", kind.package());
            false
        }
        Err(e) => panic!("mkfs {kind}: {e}"),
    }
}

/// The whole life of a filesystem volume on `kind`: attach, probe, mkfs, probe, mount from
/// an fd, fill to ENOSPC with the image staying at its size, grow while mounted, unmount,
/// detach.
fn filesystem_life(kind: FsKind) {
    let name = format!("filesystem_life_{kind}");
    if !root_or_skip(&name) {
        return;
    }
    if !fs::read_to_string("/proc/filesystems")
        .expect("read /proc/filesystems")
        .lines()
        .any(|l| l.split_whitespace().last() == Some(kind.name()))
    {
        loud!("SKIPPED (kernel without {kind}): {name}");
        return;
    }
    let size = kind.min_size().max(64 * MIB).next_multiple_of(64 * MIB);
    let img = TestImage::new(size);
    let started = Instant::now();
    let device = LinuxKernel
        .attach_loop(img.image.as_fd(), options(true))
        .expect("attach");
    assert_eq!(
        blockfs::probe(device.fd.as_fd()).expect("probe"),
        DeviceContent::Empty
    );
    let mkfs_started = Instant::now();
    if !make_fs_or_skip(&device, kind, &name) {
        return;
    }
    let mkfs_took = mkfs_started.elapsed();
    assert_eq!(
        blockfs::probe(device.fd.as_fd()).expect("probe"),
        DeviceContent::Filesystem(kind)
    );
    // The image file shows the same as the device.
    assert_eq!(
        blockfs::probe(img.image.as_fd()).expect("probe image"),
        DeviceContent::Filesystem(kind)
    );

    let mnt = tempfile::tempdir().expect("tempdir");
    let guard = MountGuard(mnt.path().to_path_buf());
    let attrs = MountAttrs {
        nosuid: true,
        nodev: true,
        noatime: true,
        ..MountAttrs::default()
    };
    LinuxKernel
        .mount_device(&device, kind, &[], path_fd(mnt.path()).as_fd(), attrs)
        .expect("mount");
    let top = common::mounts_at(mnt.path()).pop().expect("mounted");
    assert_eq!(top.fs_type, kind.name());
    for option in ["rw", "nosuid", "nodev", "noatime"] {
        assert!(top.has(option), "{option} missing: {top:?}");
    }
    drop(device);
    LinuxKernel.unmount(mnt.path()).expect("unmount");
    img.assert_detached();
    let cycle_took = started.elapsed();
    loud!(
        "{name}: attach+mkfs+mount+umount+detach of {} MiB took {:?} (mkfs {:?})",
        size / MIB,
        cycle_took,
        mkfs_took
    );

    // Again, now to fill and grow it.
    let device = LinuxKernel
        .attach_loop(img.image.as_fd(), options(true))
        .expect("re-attach");
    LinuxKernel
        .mount_device(&device, kind, &[], path_fd(mnt.path()).as_fd(), attrs)
        .expect("mount again");
    let root = open_trusted_dir(mnt.path()).expect("open mount");
    let before = fs_space(root.as_fd()).expect("statvfs");
    assert!(before.bytes_total <= size, "{before:?}");

    // Writing more than the image holds ends in ENOSPC; the image does not grow.
    let chunk = vec![0x5au8; MIB as usize];
    let mut file = fs::File::create(mnt.path().join("fill")).expect("create");
    let mut written = 0u64;
    let outcome = loop {
        use std::io::Write as _;
        match file.write_all(&chunk).and_then(|()| file.sync_data()) {
            Ok(()) => written += MIB,
            Err(e) => break e,
        }
        assert!(written <= size + 16 * MIB, "wrote past the image size");
    };
    assert_eq!(
        outcome.raw_os_error(),
        Some(Errno::NOSPC.raw_os_error()),
        "{outcome}"
    );
    drop(file);
    assert_eq!(image_size(img.image.as_fd()).expect("size"), size);
    fs::remove_file(mnt.path().join("fill")).expect("rm");

    // Grow the image while mounted, tell the device, grow the filesystem.
    let grown = size * 2;
    assert_eq!(
        grow_image(img.image.as_fd(), grown, Allocation::Sparse).expect("grow"),
        grown
    );
    assert_eq!(
        LinuxKernel.device_size(&device).expect("size"),
        size,
        "not yet"
    );
    assert_eq!(
        LinuxKernel
            .refresh_loop_capacity(&device)
            .expect("capacity"),
        grown
    );
    assert_eq!(LinuxKernel.device_size(&device).expect("size"), grown);
    if kind == FsKind::Ext4 && !has_cap_sys_resource() {
        // ext4 refuses online resizing (EXT4_IOC_RESIZE_FS) without CAP_SYS_RESOURCE.
        let err = LinuxKernel
            .grow_fs(&device, kind, mnt.path())
            .expect_err("EPERM without CAP_SYS_RESOURCE");
        assert_eq!(err.failure, ToolFailure::Exited(1), "{err}");
        loud!("{name}: {}", err.to_string().replace('\n', " "));
        loud!("SKIPPED (online ext4 growth needs CAP_SYS_RESOURCE): {name}");
        drop((root, device));
        LinuxKernel.unmount(mnt.path()).expect("unmount");
        drop(guard);
        img.assert_detached();
        return;
    }
    LinuxKernel
        .grow_fs(&device, kind, mnt.path())
        .unwrap_or_else(|e| panic!("grow {kind}: {e}"));
    let after = fs_space(root.as_fd()).expect("statvfs");
    assert!(
        after.bytes_total > before.bytes_total + size / 2,
        "{before:?} -> {after:?}"
    );
    // Growing to the size it has is a no-op success.
    LinuxKernel
        .grow_fs(&device, kind, mnt.path())
        .unwrap_or_else(|e| panic!("grow {kind} again: {e}"));
    loud!(
        "{name}: {} MiB -> {} MiB total after growing the image to {} MiB",
        before.bytes_total / MIB,
        after.bytes_total / MIB,
        grown / MIB
    );

    drop((root, device));
    LinuxKernel.unmount(mnt.path()).expect("unmount");
    drop(guard);
    img.assert_detached();
}

#[test]
fn filesystem_life_ext4() {
    filesystem_life(FsKind::Ext4);
}

#[test]
fn filesystem_life_xfs() {
    filesystem_life(FsKind::Xfs);
}

#[test]
fn filesystem_life_btrfs() {
    filesystem_life(FsKind::Btrfs);
}

#[test]
fn read_only_mount_and_mount_errors() {
    let name = "read_only_mount_and_mount_errors";
    if !root_or_skip(name) {
        return;
    }
    let img = TestImage::new(64 * MIB);
    let device = LinuxKernel
        .attach_loop(img.image.as_fd(), options(true))
        .expect("attach");
    let mnt = tempfile::tempdir().expect("tempdir");
    let guard = MountGuard(mnt.path().to_path_buf());
    // Nothing on it yet: the kernel's message comes with the error.
    let err = LinuxKernel
        .mount_device(
            &device,
            FsKind::Ext4,
            &[],
            path_fd(mnt.path()).as_fd(),
            MountAttrs::default(),
        )
        .expect_err("no filesystem");
    loud!("{name}: mounting an empty device: {err}");
    assert!(err.to_string().contains("/dev/loop"), "{err}");
    if !make_fs_or_skip(&device, FsKind::Ext4, name) {
        return;
    }
    let err = LinuxKernel
        .mount_device(
            &device,
            FsKind::Ext4,
            &["no_such_option".to_owned()],
            path_fd(mnt.path()).as_fd(),
            MountAttrs::default(),
        )
        .expect_err("unknown option");
    assert!(err.to_string().contains("no_such_option"), "{err}");
    LinuxKernel
        .mount_device(
            &device,
            FsKind::Ext4,
            &["errors=remount-ro".to_owned()],
            path_fd(mnt.path()).as_fd(),
            MountAttrs {
                read_only: true,
                ..MountAttrs::default()
            },
        )
        .expect("mount ro");
    let err = fs::write(mnt.path().join("x"), b"x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(Errno::ROFS.raw_os_error()));
    let top = common::mounts_at(mnt.path()).pop().expect("mounted");
    assert!(top.has("ro"), "{top:?}");
    drop(device);
    LinuxKernel.unmount(mnt.path()).expect("unmount");
    drop(guard);
    img.assert_detached();
}

#[test]
fn read_only_and_block_size_options() {
    let name = "read_only_and_block_size_options";
    if !root_or_skip(name) {
        return;
    }
    let img = TestImage::new(16 * MIB);
    let device = LinuxKernel
        .attach_loop(
            img.image.as_fd(),
            LoopOptions {
                read_only: true,
                autoclear: true,
                direct_io: false,
                block_size: 4096,
            },
        )
        .expect("attach");
    let st = status(device.fd.as_fd()).expect("status");
    assert!(st.read_only && !st.direct_io, "{st:?}");
    let block = fs::read_to_string(format!(
        "/sys/block/loop{}/queue/logical_block_size",
        device.number
    ))
    .expect("sysfs");
    assert_eq!(block.trim(), "4096");
    assert_eq!(
        stowage_sys::loopdev::suggested_block_size(img.image.as_fd()) % 512,
        0
    );
    // Writing through a read-only device fails (at open or at write, depending on the kernel).
    let err = fs::OpenOptions::new()
        .write(true)
        .open(&device.path)
        .and_then(|mut f| {
            use std::io::Write as _;
            f.write_all(&[1u8; 4096]).and_then(|()| f.sync_all())
        })
        .expect_err("read-only device");
    loud!("{name}: writing to the read-only device: {err}");
    assert!(
        [Errno::ROFS, Errno::PERM, Errno::ACCESS]
            .iter()
            .any(|e| err.raw_os_error() == Some(e.raw_os_error())),
        "{err}"
    );
    assert_eq!(
        blockfs::probe(img.image.as_fd()).expect("probe"),
        DeviceContent::Empty,
        "nothing reached the image"
    );
    drop(device);
    img.assert_detached();
}

#[test]
fn direct_io_on_tmpfs_is_reported_as_read_back() {
    let name = "direct_io_on_tmpfs_is_reported_as_read_back";
    if !root_or_skip(name) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _tmpfs = common::mount_tmpfs(dir.path());
    let dir_fd = open_trusted_dir(dir.path()).expect("open");
    let image = create_image(dir_fd.as_fd(), "t.img", 2 * MIB, Allocation::Sparse).expect("create");
    let device = LinuxKernel
        .attach_loop(image.as_fd(), options(true))
        .expect("attach");
    let st = status(device.fd.as_fd()).expect("status");
    loud!(
        "{name}: direct_io={} refused={:?}",
        st.direct_io,
        device.direct_io_refused
    );
    assert_eq!(st.direct_io, device.direct_io);
    if device.direct_io_refused.is_some() {
        assert!(!device.direct_io);
    }
    drop(device);
    let left = devices_backed_by(image.as_fd()).expect("scan");
    if !left.is_empty() {
        LinuxKernel.detach_loop(image.as_fd()).expect("detach");
    }
    assert!(devices_backed_by(image.as_fd()).expect("scan").is_empty());
}

#[test]
fn parallel_attaches_get_distinct_devices() {
    let name = "parallel_attaches_get_distinct_devices";
    if !root_or_skip(name) {
        return;
    }
    let images: Vec<TestImage> = (0..4).map(|_| TestImage::new(8 * MIB)).collect();
    let devices: Vec<LoopDevice> = std::thread::scope(|scope| {
        let handles: Vec<_> = images
            .iter()
            .map(|img| {
                scope.spawn(|| {
                    LinuxKernel
                        .attach_loop(img.image.as_fd(), options(true))
                        .expect("attach")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let mut numbers: Vec<u32> = devices.iter().map(|d| d.number).collect();
    numbers.sort_unstable();
    numbers.dedup();
    assert_eq!(numbers.len(), 4, "{numbers:?}");
    for (img, device) in images.iter().zip(&devices) {
        assert_eq!(
            devices_backed_by(img.image.as_fd()).expect("scan"),
            [device.number]
        );
    }
    drop(devices);
    for img in &images {
        img.assert_detached();
    }
}
