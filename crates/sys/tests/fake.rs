//! FakeKernel: records every call with the inodes behind the fds, fails as told, and answers
//! reads consistently with earlier writes.

mod common;

use std::os::fd::AsFd;
use std::sync::Arc;

use stowage_sys::fs::{file_info, open_trusted_dir};
use stowage_sys::{
    Errno, FakeKernel, Frozen, Kernel, KernelCall, MountAttrs, QuotaSupport, QuotaUsage,
};

#[test]
fn fake_is_a_shareable_kernel() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<FakeKernel>();
    let kernel: Arc<dyn Kernel> = Arc::new(FakeKernel::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    assert_eq!(
        kernel.quota_support(fd.as_fd()),
        QuotaSupport::Unavailable("fake".to_owned())
    );
}

#[test]
fn records_calls_with_inodes() {
    let kernel = FakeKernel::new();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("src")).expect("mkdir");
    std::fs::create_dir(dir.path().join("dst")).expect("mkdir");
    let root = open_trusted_dir(dir.path()).expect("open");
    let src = common::path_fd(&dir.path().join("src"));
    let dst = common::path_fd(&dir.path().join("dst"));
    let src_id = file_info(src.as_fd()).expect("info").id;
    let dst_id = file_info(dst.as_fd()).expect("info").id;
    let attrs = MountAttrs {
        read_only: true,
        nosuid: true,
        ..MountAttrs::default()
    };

    kernel.set_quota_support(QuotaSupport::Enforced);
    assert_eq!(kernel.quota_support(root.as_fd()), QuotaSupport::Enforced);
    kernel.set_project_id(src.as_fd(), 7).expect("set id");
    assert_eq!(kernel.project_id(src.as_fd()).expect("id"), 7);
    assert_eq!(kernel.project_id(dst.as_fd()).expect("id"), 0);
    kernel
        .set_project_limit(root.as_fd(), 7, 1 << 20)
        .expect("limit");
    kernel
        .bind_mount(src.as_fd(), dst.as_fd(), attrs)
        .expect("mount");
    assert_eq!(kernel.mounted(), vec![(dst_id, src_id, attrs)]);
    kernel.unmount(&dir.path().join("dst")).expect("unmount");
    assert!(kernel.mounted().is_empty());

    assert_eq!(
        kernel.calls(),
        vec![
            KernelCall::QuotaSupport,
            KernelCall::SetProjectId {
                dir: src_id,
                project: 7
            },
            KernelCall::ProjectId { dir: src_id },
            KernelCall::ProjectId { dir: dst_id },
            KernelCall::SetProjectLimit {
                project: 7,
                bytes: 1 << 20
            },
            KernelCall::BindMount {
                source: src_id,
                target: dst_id,
                attrs
            },
            KernelCall::Unmount {
                target: dir.path().join("dst")
            },
        ]
    );
    kernel.clear();
    assert!(kernel.calls().is_empty());
    // State survives clear().
    assert_eq!(kernel.project_id(src.as_fd()).expect("id"), 7);
    assert_eq!(kernel.limit(7), Some(1 << 20));
}

#[test]
fn usage_reflects_limits() {
    let kernel = FakeKernel::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = open_trusted_dir(dir.path()).expect("open");
    assert_eq!(
        kernel.project_usage(fs.as_fd(), 3).expect("usage"),
        QuotaUsage::default()
    );
    kernel.set_usage(
        3,
        QuotaUsage {
            bytes_used: 4096,
            inodes_used: 2,
            ..QuotaUsage::default()
        },
    );
    kernel
        .set_project_limit(fs.as_fd(), 3, 10_000)
        .expect("limit");
    let usage = kernel.project_usage(fs.as_fd(), 3).expect("usage");
    assert_eq!(
        usage,
        QuotaUsage {
            bytes_used: 4096,
            bytes_limit: 10_000,
            inodes_used: 2,
            inodes_limit: 0,
        }
    );
    kernel
        .set_project_limit(fs.as_fd(), 3, 0)
        .expect("remove limit");
    assert_eq!(
        kernel
            .project_usage(fs.as_fd(), 3)
            .expect("usage")
            .bytes_limit,
        0
    );
}

#[test]
fn fails_as_told_then_recovers() {
    let kernel = FakeKernel::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = open_trusted_dir(dir.path()).expect("open");
    kernel.fail_next("set_project_limit", Errno::DQUOT, 2);
    kernel.fail_next("project_usage", Errno::IO, 1);
    for _ in 0..2 {
        let err = kernel
            .set_project_limit(fs.as_fd(), 1, 100)
            .expect_err("injected");
        assert_eq!(err.errno, Errno::DQUOT);
        assert_eq!(err.op, "set_project_limit");
    }
    assert_eq!(kernel.limit(1), None, "a failed call changes nothing");
    kernel
        .set_project_limit(fs.as_fd(), 1, 100)
        .expect("third succeeds");
    assert_eq!(
        kernel.project_usage(fs.as_fd(), 1).expect_err("io").errno,
        Errno::IO
    );
    kernel.project_usage(fs.as_fd(), 1).expect("recovered");
    // Failed calls are recorded too.
    assert_eq!(kernel.calls().len(), 5);

    kernel.fail_next("bind_mount", Errno::PERM, 1);
    let err = kernel
        .bind_mount(fs.as_fd(), fs.as_fd(), MountAttrs::default())
        .expect_err("perm");
    assert_eq!(err.errno, Errno::PERM);
    assert!(kernel.mounted().is_empty());

    kernel.fail_next("unmount", Errno::BUSY, 3);
    kernel.fail_next("unmount", Errno::BUSY, 0);
    assert_eq!(
        kernel.unmount(dir.path()).expect_err("not mounted").errno,
        Errno::INVAL
    );
}

#[test]
fn unmount_by_path() {
    let kernel = FakeKernel::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a");
    std::fs::create_dir(&a).expect("mkdir");
    let fd = common::path_fd(&a);
    kernel
        .bind_mount(fd.as_fd(), fd.as_fd(), MountAttrs::default())
        .expect("1");
    kernel
        .bind_mount(
            fd.as_fd(),
            fd.as_fd(),
            MountAttrs {
                noexec: true,
                ..MountAttrs::default()
            },
        )
        .expect("2");
    kernel.unmount(&a).expect("top");
    assert_eq!(kernel.mounted().len(), 1);
    assert!(
        !kernel.mounted()[0].2.noexec,
        "the most recent mount goes first"
    );
    kernel.unmount(&a).expect("second");
    assert_eq!(
        kernel.unmount(&a).expect_err("none left").errno,
        Errno::INVAL
    );
    assert_eq!(
        kernel
            .unmount(&dir.path().join("missing"))
            .expect_err("missing")
            .errno,
        Errno::NOENT
    );
}

#[test]
#[should_panic(expected = "unknown op")]
fn fail_next_rejects_unknown_ops() {
    FakeKernel::new().fail_next("set_projet_limit", Errno::IO, 1);
}

#[test]
fn fake_loop_devices_follow_the_image_pool_flow() {
    use stowage_sys::blockfs::probe;
    use stowage_sys::image::{create_image, grow_image, Allocation};
    use stowage_sys::{DeviceContent, FsKind, LoopOptions, ToolFailure};

    let kernel = FakeKernel::new();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("mnt")).expect("mkdir");
    let root = open_trusted_dir(dir.path()).expect("open");
    let image = create_image(root.as_fd(), "v.img", 1 << 20, Allocation::Sparse).expect("image");
    let other = create_image(root.as_fd(), "w.img", 1 << 20, Allocation::Sparse).expect("image");
    let image_id = file_info(image.as_fd()).expect("info").id;
    let target = common::path_fd(&dir.path().join("mnt"));
    let target_id = file_info(target.as_fd()).expect("info").id;

    assert!(kernel.find_loop(image.as_fd()).expect("find").is_none());
    let options = LoopOptions::default();
    let device = kernel.attach_loop(image.as_fd(), options).expect("attach");
    assert!(device.newly_attached && device.direct_io);
    assert_eq!(device.path.to_str(), Some("/dev/loop0"));
    let again = kernel.attach_loop(image.as_fd(), options).expect("again");
    assert_eq!((again.number, again.newly_attached), (0, false));
    kernel.refuse_direct_io(true);
    let second = kernel.attach_loop(other.as_fd(), options).expect("other");
    assert_eq!(second.number, 1);
    assert!(!second.direct_io);
    assert_eq!(second.direct_io_refused, Some(Errno::INVAL));

    // The handle reads the image: mkfs leaves a magic that probe recognises.
    assert_eq!(
        probe(device.fd.as_fd()).expect("probe"),
        DeviceContent::Empty
    );
    kernel.make_fs(&device, FsKind::Xfs).expect("mkfs");
    assert_eq!(
        probe(device.fd.as_fd()).expect("probe"),
        DeviceContent::Filesystem(FsKind::Xfs)
    );
    kernel.fail_next("make_fs", Errno::IO, 1);
    let err = kernel.make_fs(&device, FsKind::Xfs).expect_err("injected");
    assert_eq!(err.failure, ToolFailure::Spawn(Errno::IO));

    let attrs = MountAttrs {
        nosuid: true,
        ..MountAttrs::default()
    };
    let options_list = vec!["discard".to_owned()];
    kernel
        .mount_device(&device, FsKind::Xfs, &options_list, target.as_fd(), attrs)
        .expect("mount");
    assert_eq!(kernel.mounted(), [(target_id, image_id, attrs)]);
    // Mounted: detach is refused, as the kernel keeps a mounted device.
    let err = kernel.detach_loop(image.as_fd()).expect_err("mounted");
    assert_eq!(err.errno, Errno::BUSY);

    // Growth: the device follows the image only after the capacity refresh.
    grow_image(image.as_fd(), 2 << 20, Allocation::Sparse).expect("grow");
    assert_eq!(kernel.device_size(&device).expect("size"), 1 << 20);
    assert_eq!(
        kernel.refresh_loop_capacity(&device).expect("refresh"),
        2 << 20
    );
    assert_eq!(kernel.device_size(&device).expect("size"), 2 << 20);
    kernel
        .grow_fs(&device, FsKind::Xfs, &dir.path().join("mnt"))
        .expect("grow fs");

    kernel.unmount(&dir.path().join("mnt")).expect("unmount");
    kernel.detach_loop(image.as_fd()).expect("detach");
    kernel.detach_loop(image.as_fd()).expect("absent is fine");
    assert_eq!(kernel.loops().len(), 1, "only the other image is left");
    assert!(kernel.find_loop(image.as_fd()).expect("find").is_none());

    let calls = kernel.calls();
    assert!(calls.contains(&KernelCall::MountDevice {
        number: 0,
        kind: FsKind::Xfs,
        options: options_list,
        target: target_id,
        attrs,
    }));
    assert!(calls.contains(&KernelCall::RefreshLoopCapacity { number: 0 }));
    assert!(calls.contains(&KernelCall::GrowFs {
        number: 0,
        kind: FsKind::Xfs,
        mount_point: dir.path().join("mnt"),
    }));
    assert_eq!(
        calls
            .iter()
            .filter(|c| matches!(c, KernelCall::DetachLoop { image } if *image == image_id))
            .count(),
        3
    );
}

#[test]
fn freeze_and_thaw_track_the_frozen_state() {
    let kernel = FakeKernel::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    let id = file_info(fd.as_fd()).expect("info").id;
    assert!(
        !kernel.thaw_fs(fd.as_fd()).expect("thaw unfrozen"),
        "was not frozen"
    );
    kernel.freeze_fs(fd.as_fd()).expect("freeze");
    assert!(kernel.is_frozen(fd.as_fd()).expect("frozen?"));
    assert_eq!(
        kernel.freeze_fs(fd.as_fd()).expect_err("twice").errno,
        Errno::BUSY
    );
    assert!(kernel.thaw_fs(fd.as_fd()).expect("thaw"), "was frozen");
    assert!(!kernel.is_frozen(fd.as_fd()).expect("frozen?"));
    assert_eq!(
        kernel.calls(),
        vec![
            KernelCall::ThawFs { fs: id },
            KernelCall::FreezeFs { fs: id },
            KernelCall::FreezeFs { fs: id },
            KernelCall::ThawFs { fs: id },
        ]
    );

    // The guard thaws on drop and on thaw(); a failed freeze leaves nothing to thaw.
    {
        let _frozen = Frozen::new(&kernel, fd.as_fd()).expect("freeze");
        assert!(kernel.is_frozen(fd.as_fd()).expect("frozen?"));
    }
    assert!(!kernel.is_frozen(fd.as_fd()).expect("frozen?"));
    let frozen = Frozen::new(&kernel, fd.as_fd()).expect("freeze");
    frozen.thaw().expect("thaw");
    assert!(!kernel.is_frozen(fd.as_fd()).expect("frozen?"));
    kernel.fail_next("freeze_fs", Errno::OPNOTSUPP, 1);
    kernel.clear();
    let err = Frozen::new(&kernel, fd.as_fd()).expect_err("injected");
    assert_eq!(err.errno, Errno::OPNOTSUPP);
    assert_eq!(kernel.calls(), vec![KernelCall::FreezeFs { fs: id }]);
}
