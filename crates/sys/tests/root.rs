//! LinuxKernel against the real kernel: bind mounts from fds with their attributes, unmount,
//! mount-crossing refusal of the tree walks, and the quota probe. Root only: each test prints
//! `SKIPPED (needs root)` and returns otherwise. Every mount is undone by a guard on drop.

mod common;

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::symlink;
use std::path::Path;

use common::{mount_ext4, mount_tmpfs, mounts_at, path_fd, root_or_skip, MountGuard};
use stowage_sys::fs::{
    file_info, fs_space, fs_type_name, open_trusted_dir, remove_tree_at, resolve_beneath,
    tree_usage,
};
use stowage_sys::{Errno, Kernel, LinuxKernel, MountAttrs, QuotaSupport};

#[test]
fn bind_mount_read_only_with_attrs() {
    if !root_or_skip("bind_mount_read_only_with_attrs") {
        return;
    }
    let src = tempfile::tempdir().expect("tempdir");
    let dst = tempfile::tempdir().expect("tempdir");
    let guard = MountGuard(dst.path().to_path_buf());
    fs::write(src.path().join("hello"), b"hello").expect("write");
    let attrs = MountAttrs {
        read_only: true,
        nosuid: true,
        nodev: true,
        noexec: true,
        noatime: true,
        ..MountAttrs::default()
    };
    let source = path_fd(src.path());
    let target = path_fd(dst.path());
    LinuxKernel
        .bind_mount(source.as_fd(), target.as_fd(), attrs)
        .expect("bind_mount");

    assert_eq!(
        fs::read(dst.path().join("hello")).expect("read through"),
        b"hello"
    );
    let mounts = mounts_at(dst.path());
    let top = mounts.last().expect("mounted");
    for option in ["ro", "nosuid", "nodev", "noexec", "noatime"] {
        assert!(top.has(option), "{option} missing: {top:?}");
    }
    let err = fs::write(dst.path().join("new"), b"x").expect_err("read-only");
    assert_eq!(err.raw_os_error(), Some(Errno::ROFS.raw_os_error()));
    // The source itself stays writable.
    fs::write(src.path().join("new"), b"x").expect("source rw");
    let mounted_root = open_trusted_dir(dst.path()).expect("open");
    assert!(fs_space(mounted_root.as_fd()).expect("space").read_only);
    assert!(file_info(mounted_root.as_fd()).expect("info").mount_root);
    drop(mounted_root);

    LinuxKernel.unmount(dst.path()).expect("unmount");
    assert!(mounts_at(dst.path()).is_empty());
    assert!(!dst.path().join("hello").exists());
    let again = LinuxKernel.unmount(dst.path()).expect_err("not mounted");
    assert_eq!(again.errno, Errno::INVAL);
    drop(guard);
}

#[test]
fn bind_mount_read_write_and_file() {
    if !root_or_skip("bind_mount_read_write_and_file") {
        return;
    }
    let src = tempfile::tempdir().expect("tempdir");
    let dst = tempfile::tempdir().expect("tempdir");
    fs::write(src.path().join("file"), b"content").expect("write");
    fs::write(dst.path().join("file_target"), b"").expect("write");
    let _dir_guard = MountGuard(dst.path().join("dir_target"));
    let _file_guard = MountGuard(dst.path().join("file_target"));
    fs::create_dir(dst.path().join("dir_target")).expect("mkdir");

    let dst_root = open_trusted_dir(dst.path()).expect("open");
    let source = path_fd(src.path());
    let target = resolve_beneath(dst_root.as_fd(), Path::new("dir_target")).expect("resolve");
    LinuxKernel
        .bind_mount(
            source.as_fd(),
            target.as_fd(),
            MountAttrs {
                relatime: true,
                ..MountAttrs::default()
            },
        )
        .expect("bind dir");
    fs::write(dst.path().join("dir_target/written"), b"w").expect("rw through");
    assert_eq!(
        fs::read(src.path().join("written")).expect("visible in source"),
        b"w"
    );
    let top = mounts_at(&dst.path().join("dir_target"))
        .pop()
        .expect("mounted");
    assert!(top.has("rw") && top.has("relatime"), "{top:?}");

    // A single file, as for a block-volume-like file bind.
    let src_file = resolve_beneath(
        open_trusted_dir(src.path()).expect("open").as_fd(),
        Path::new("file"),
    )
    .expect("resolve file");
    let dst_file = resolve_beneath(dst_root.as_fd(), Path::new("file_target")).expect("resolve");
    LinuxKernel
        .bind_mount(
            src_file.as_fd(),
            dst_file.as_fd(),
            MountAttrs {
                read_only: true,
                ..MountAttrs::default()
            },
        )
        .expect("bind file");
    assert_eq!(
        fs::read(dst.path().join("file_target")).expect("read"),
        b"content"
    );

    // UMOUNT_NOFOLLOW: a symlink to the mount point is not the mount point.
    symlink(dst.path().join("dir_target"), dst.path().join("link")).expect("symlink");
    let err = LinuxKernel
        .unmount(&dst.path().join("link"))
        .expect_err("symlink");
    assert_eq!(err.errno, Errno::INVAL, "{err}");

    LinuxKernel
        .unmount(&dst.path().join("file_target"))
        .expect("unmount file");
    LinuxKernel
        .unmount(&dst.path().join("dir_target"))
        .expect("unmount dir");
    assert!(mounts_at(&dst.path().join("dir_target")).is_empty());
}

#[test]
fn remove_tree_at_stops_at_a_bind_mount() {
    if !root_or_skip("remove_tree_at_stops_at_a_bind_mount") {
        return;
    }
    let base = tempfile::tempdir().expect("tempdir");
    let src = tempfile::tempdir().expect("tempdir");
    let mount_point = base.path().join("tree/a/m");
    fs::create_dir_all(&mount_point).expect("mkdir");
    let _guard = MountGuard(mount_point.clone());
    fs::write(base.path().join("tree/a/f"), b"f").expect("write");
    fs::write(src.path().join("keep"), vec![3u8; 1 << 20]).expect("write");

    let source = path_fd(src.path());
    let target = path_fd(&mount_point);
    LinuxKernel
        .bind_mount(source.as_fd(), target.as_fd(), MountAttrs::default())
        .expect("bind");
    drop(target);

    // The same filesystem, so only the mount id and mount-root attribute tell it apart.
    let tree = open_trusted_dir(&base.path().join("tree")).expect("open");
    let usage = tree_usage(tree.as_fd()).expect("usage");
    assert!(
        usage.bytes < 1 << 20,
        "counted the mount's content: {usage:?}"
    );

    let base_fd = open_trusted_dir(base.path()).expect("open");
    let err = remove_tree_at(base_fd.as_fd(), "tree").expect_err("must refuse");
    assert_eq!(err.errno, Errno::BUSY, "{err}");
    assert_eq!(
        fs::read(src.path().join("keep"))
            .expect("source intact")
            .len(),
        1 << 20
    );
    assert!(mount_point.join("keep").exists(), "mount still in place");
    assert!(!mounts_at(&mount_point).is_empty());
}

#[test]
fn remove_tree_at_stops_at_another_filesystem() {
    if !root_or_skip("remove_tree_at_stops_at_another_filesystem") {
        return;
    }
    let base = tempfile::tempdir().expect("tempdir");
    let mount_point = base.path().join("tree/tmp");
    fs::create_dir_all(&mount_point).expect("mkdir");
    let _guard = mount_tmpfs(&mount_point);
    fs::write(mount_point.join("keep"), b"keep").expect("write");
    // A device node and a directory nobody may enter, beside it.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        base.path().join("tree/null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 3),
    )
    .expect("mknod");

    let base_fd = open_trusted_dir(base.path()).expect("open");
    let err = remove_tree_at(base_fd.as_fd(), "tree").expect_err("must refuse");
    assert_eq!(err.errno, Errno::BUSY, "{err}");
    assert_eq!(fs::read(mount_point.join("keep")).expect("intact"), b"keep");

    // The mount point itself as the name to remove.
    let tree_fd = open_trusted_dir(&base.path().join("tree")).expect("open");
    let err = remove_tree_at(tree_fd.as_fd(), "tmp").expect_err("must refuse");
    assert_eq!(err.errno, Errno::BUSY);
    assert!(mount_point.join("keep").exists());
}

#[test]
fn quota_support_is_unavailable_on_tmpfs_and_root_fs() {
    if !root_or_skip("quota_support_is_unavailable_on_tmpfs_and_root_fs") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let _guard = mount_tmpfs(dir.path());
    let tmpfs = path_fd(dir.path());
    assert_eq!(fs_type_name(tmpfs.as_fd()).expect("fs type"), "tmpfs");
    match LinuxKernel.quota_support(tmpfs.as_fd()) {
        QuotaSupport::Unavailable(why) => assert!(why.contains("ENOSYS"), "{why}"),
        QuotaSupport::Enforced => panic!("tmpfs without quota options cannot enforce"),
    }
    let err = LinuxKernel
        .set_project_limit(tmpfs.as_fd(), 42, 1 << 20)
        .expect_err("no quota");
    assert!(err.to_string().contains("Q_SETQUOTA"), "{err}");

    // Whatever the root filesystem is, this kernel (no QFMT_V2, no XFS_QUOTA) cannot enforce.
    let root = open_trusted_dir(Path::new("/")).expect("open /");
    let support = LinuxKernel.quota_support(root.as_fd());
    eprintln!("quota_support(/) = {support:?}");
    assert!(matches!(support, QuotaSupport::Unavailable(_)));
}

#[test]
fn ext4_without_project_quota() {
    if !root_or_skip("ext4_without_project_quota") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((mnt, _guard)) = mount_ext4(dir.path(), "ext4_without_project_quota") else {
        return;
    };
    fs::create_dir(mnt.join("vol")).expect("mkdir");
    let fs_fd = path_fd(&mnt);
    assert_eq!(fs_type_name(fs_fd.as_fd()).expect("fs type"), "ext4");
    match LinuxKernel.quota_support(fs_fd.as_fd()) {
        QuotaSupport::Unavailable(why) => assert!(why.contains("ESRCH"), "{why}"),
        QuotaSupport::Enforced => panic!("ext4 without prjquota cannot enforce"),
    }
    let err = LinuxKernel
        .project_usage(fs_fd.as_fd(), 42)
        .expect_err("no quota");
    eprintln!("project_usage on plain ext4: {err}");
    LinuxKernel
        .set_project_limit(fs_fd.as_fd(), 42, 1 << 20)
        .expect_err("no quota");

    // The fsxattr ioctls work on ext4 even without the project feature: the id reads 0, and
    // only the default project can be set. Through an O_PATH fd, as the driver holds them.
    let vol = path_fd(&mnt.join("vol"));
    assert_eq!(LinuxKernel.project_id(vol.as_fd()).expect("project_id"), 0);
    let err = LinuxKernel
        .set_project_id(vol.as_fd(), 42)
        .expect_err("no project feature");
    assert_eq!(err.errno, Errno::NOTSUP, "{err}");
    assert_eq!(LinuxKernel.project_id(vol.as_fd()).expect("project_id"), 0);
}

#[test]
fn btrfs_subvolumes_and_quotas() {
    use stowage_sys::BtrfsQuotaMode;
    let test = "btrfs_subvolumes_and_quotas";
    if !root_or_skip(test) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((mnt, _guard)) = common::mount_btrfs(dir.path(), test) else {
        return;
    };
    let k = LinuxKernel;
    let top = open_trusted_dir(&mnt).expect("open mnt");
    let top = top.as_fd();
    assert_eq!(k.btrfs_quota_mode(top).expect("mode"), BtrfsQuotaMode::Off);
    assert!(k.btrfs_qgroups(top).expect("qgroups").is_empty());
    k.btrfs_enable_quota(top, true)
        .expect("enable simple quotas");
    assert_eq!(
        k.btrfs_quota_mode(top).expect("mode"),
        BtrfsQuotaMode::Simple
    );
    // Enabling again is a no-op.
    k.btrfs_enable_quota(top, false).expect("enable again");
    assert_eq!(
        k.btrfs_quota_mode(top).expect("mode"),
        BtrfsQuotaMode::Simple
    );

    k.btrfs_create_subvolume(top, "vol").expect("create");
    let err = k.btrfs_create_subvolume(top, "vol").expect_err("twice");
    assert_eq!(err.errno, Errno::EXIST, "{err}");
    let vol = stowage_sys::fs::open_dir_beneath(top, Path::new("vol")).expect("open vol");
    let info = file_info(vol.as_fd()).expect("statx");
    assert_eq!(info.id.ino, stowage_sys::btrfs::SUBVOLUME_ROOT_INO);
    let id = k.btrfs_subvolume_id(vol.as_fd()).expect("subvolume id");
    assert!(id >= 256, "{id}");
    assert_eq!(k.btrfs_subvolume_id(top).expect("top id"), 5);
    k.btrfs_qgroup_limit(top, id, 4 << 20).expect("limit");
    let q = k.btrfs_qgroups(top).expect("qgroups");
    let mine = q.iter().find(|q| q.id == id).expect("qgroup of vol");
    assert_eq!(mine.max_referenced, Some(4 << 20));

    // EDQUOT past the limit.
    let mut f = fs::File::create(mnt.join("vol/fill")).expect("create file");
    let chunk = vec![7u8; 1 << 20];
    let mut failed = None;
    for _ in 0..8 {
        use std::io::Write;
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("8 MiB fit into a 4 MiB qgroup");
    assert_eq!(e.raw_os_error(), Some(libc_edquot()), "{e}");
    drop(f);
    k.btrfs_commit(top).expect("commit");
    let q = k.btrfs_qgroups(top).expect("qgroups");
    let mine = q.iter().find(|q| q.id == id).expect("qgroup");
    assert!(
        mine.referenced >= 2 << 20 && mine.referenced <= 4 << 20,
        "{mine:?}"
    );

    fs::remove_file(mnt.join("vol/fill")).expect("rm fill");
    k.btrfs_commit(top).expect("commit");

    // Nested subvolumes: found by id, destroyed innermost first.
    k.btrfs_create_subvolume(vol.as_fd(), "inner")
        .expect("nested");
    fs::create_dir(mnt.join("vol/d")).expect("mkdir");
    let d = stowage_sys::fs::open_dir_beneath(top, Path::new("vol/d")).expect("open d");
    k.btrfs_create_subvolume(d.as_fd(), "deeper")
        .expect("nested in a dir");
    let children = k.btrfs_child_subvolumes(top, id).expect("children");
    assert_eq!(children.len(), 2, "{children:?}");
    let err = k
        .btrfs_destroy_subvolume(top, "vol")
        .expect_err("not empty");
    assert_eq!(err.errno, Errno::NOTEMPTY, "{err}");
    for child in children {
        k.btrfs_destroy_subvolume_id(top, child)
            .expect("destroy child");
    }
    drop((vol, d));
    k.btrfs_destroy_subvolume(top, "vol").expect("destroy");
    let err = k.btrfs_destroy_subvolume(top, "vol").expect_err("gone");
    assert_eq!(err.errno, Errno::NOENT, "{err}");
    k.btrfs_commit(top).expect("commit");
    match k.btrfs_qgroup_remove(top, id) {
        Ok(()) => {}
        Err(e) => eprintln!("qgroup remove right after destroy: {e}"),
    }
    let err = k
        .btrfs_destroy_subvolume_id(top, id)
        .expect_err("gone by id");
    assert_eq!(err.errno, Errno::NOENT, "{err}");
}

/// A level-1 qgroup holding a subvolume and the subvolumes made inside it: its limit holds
/// writes in a nested subvolume (EDQUOT); under simple quotas a nested subvolume joins it by
/// itself, under full qgroups it does not; removal needs it empty and unassigning works.
#[test]
fn btrfs_level_1_qgroups_and_nested_subvolumes() {
    let test = "btrfs_level_1_qgroups_and_nested_subvolumes";
    if !root_or_skip(test) {
        return;
    }
    for simple in [true, false] {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((mnt, _guard)) = common::mount_btrfs(dir.path(), test) else {
            return;
        };
        let k = LinuxKernel;
        let top = open_trusted_dir(&mnt).expect("open mnt");
        let top = top.as_fd();
        k.btrfs_enable_quota(top, simple).expect("enable quotas");
        k.btrfs_create_subvolume(top, "vol").expect("create");
        let vol = stowage_sys::fs::open_dir_beneath(top, Path::new("vol")).expect("open vol");
        let id = k.btrfs_subvolume_id(vol.as_fd()).expect("subvolume id");
        let group = stowage_sys::qgroup_id(1, id);
        k.btrfs_qgroup_create(top, group).expect("create 1/id");
        assert_eq!(
            k.btrfs_qgroup_create(top, group).expect_err("twice").errno,
            Errno::EXIST
        );
        k.btrfs_qgroup_assign(top, id, group, true).expect("assign");
        assert_eq!(
            k.btrfs_qgroup_assign(top, id, group, true)
                .expect_err("twice")
                .errno,
            Errno::EXIST
        );
        k.btrfs_qgroup_limit(top, group, 4 << 20).expect("limit");
        k.btrfs_create_subvolume(vol.as_fd(), "nested")
            .expect("nested");
        let nested_dir =
            stowage_sys::fs::open_dir_beneath(top, Path::new("vol/nested")).expect("open");
        let nested = k.btrfs_subvolume_id(nested_dir.as_fd()).expect("id");
        let q = k.btrfs_qgroups(top).expect("qgroups");
        let parents = |q: &[stowage_sys::Qgroup], id: u64| {
            q.iter()
                .find(|q| q.id == id)
                .expect("qgroup")
                .parents
                .clone()
        };
        assert_eq!(parents(&q, id), vec![group]);
        let g = q.iter().find(|q| q.id == group).expect("1/id listed");
        assert_eq!((g.level(), g.max_referenced), (1, Some(4 << 20)));
        // An explicit, empty inheritance list, which needs no privilege: outside, in both
        // modes.
        stowage_sys::btrfs::create_subvolume_inheriting(vol.as_fd(), "outside", &[])
            .expect("create with an empty inheritance list");
        let outside_dir =
            stowage_sys::fs::open_dir_beneath(top, Path::new("vol/outside")).expect("open");
        let outside = k.btrfs_subvolume_id(outside_dir.as_fd()).expect("id");
        assert!(parents(&q_after(&k, top), outside).is_empty());
        if simple {
            assert_eq!(parents(&q, nested), vec![group], "simple quotas inherit");
        } else {
            assert!(
                parents(&q, nested).is_empty(),
                "full qgroups do not inherit"
            );
            k.btrfs_qgroup_assign(top, nested, group, true)
                .expect("assign nested");
        }

        // EDQUOT writing into the nested subvolume, the level-1 qgroup at most at its limit.
        let mut f = fs::File::create(mnt.join("vol/nested/fill")).expect("create file");
        let chunk = vec![7u8; 1 << 20];
        let mut failed = None;
        for _ in 0..8 {
            use std::io::Write;
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("8 MiB fit into a 4 MiB level-1 qgroup");
        assert_eq!(e.raw_os_error(), Some(libc_edquot()), "{e}");
        drop(f);
        k.btrfs_commit(top).expect("commit");
        let q = k.btrfs_qgroups(top).expect("qgroups");
        let g = q.iter().find(|q| q.id == group).expect("1/id");
        assert!(g.referenced >= 2 << 20 && g.referenced <= 4 << 20, "{g:?}");

        // Not removable while it has members; u64::MAX lifts the limit; unassigned, it goes.
        assert_eq!(
            k.btrfs_qgroup_remove(top, group)
                .expect_err("members")
                .errno,
            Errno::BUSY
        );
        k.btrfs_qgroup_limit(top, group, u64::MAX).expect("unlimit");
        k.btrfs_destroy_subvolume_id(top, outside)
            .expect("destroy outside");
        for member in [nested, id] {
            k.btrfs_qgroup_assign(top, member, group, false)
                .expect("unassign");
        }
        assert_eq!(
            k.btrfs_qgroup_assign(top, id, group, false)
                .expect_err("not a member")
                .errno,
            Errno::NOENT
        );
        let q = k.btrfs_qgroups(top).expect("qgroups");
        assert_eq!(
            q.iter().find(|q| q.id == group).unwrap().max_referenced,
            None
        );
        k.btrfs_qgroup_remove(top, group).expect("remove 1/id");
        assert!(k
            .btrfs_qgroups(top)
            .expect("qgroups")
            .iter()
            .all(|q| q.id != group));
    }
}

fn q_after(k: &LinuxKernel, top: std::os::fd::BorrowedFd<'_>) -> Vec<stowage_sys::Qgroup> {
    k.btrfs_qgroups(top).expect("qgroups")
}

fn libc_edquot() -> i32 {
    122
}

/// The mount table kept between reads is read again as soon as a mount or an unmount
/// happens: a delete must never miss a bind mount made a moment before.
#[test]
fn the_kept_mount_table_follows_every_mount_and_unmount() {
    if !root_or_skip("the_kept_mount_table_follows_every_mount_and_unmount") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("stw-kept-table-check");
    fs::create_dir(&target).unwrap();
    let wanted = target.to_str().unwrap().to_owned();
    let has = || stowage_sys::mountinfo::with_table(|t| t.contains(&wanted)).unwrap();
    assert!(!has());
    assert!(!has(), "unchanged: the kept text");
    for _ in 0..3 {
        let guard = mount_tmpfs(&target);
        assert!(has(), "a mount is seen at once");
        assert!(has());
        drop(guard);
        assert!(!has(), "an unmount is seen at once");
    }
}
