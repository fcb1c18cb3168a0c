//! The unprivileged fd-relative operations against real directories: no symlink followed, no
//! escape, hostile trees removed without touching anything outside them.

mod common;

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

use rustix::fs::{FallocateFlags, FileType, Mode, OFlags};
use rustix::thread::{capabilities, set_capabilities, CapabilitySet};
use stowage_sys::fs::{
    create_trusted_dir_all, file_info, fs_space, mkdir_at, open_dir_beneath, open_trusted_dir,
    remove_tree_at, resolve_beneath, rmdir_at, sync_dir, tree_usage,
};
use stowage_sys::Errno;

fn tmp() -> (tempfile::TempDir, OwnedFd) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open tempdir");
    (dir, fd)
}

/// Runs `f` on a thread without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH / CAP_FOWNER, so that
/// even as root it meets permissions the way an unprivileged owner does. Credentials are per
/// thread on Linux, so the rest of the test process keeps its capabilities.
fn without_dac_override<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let mut caps = capabilities(None).expect("capget");
        caps.effective -=
            CapabilitySet::DAC_OVERRIDE | CapabilitySet::DAC_READ_SEARCH | CapabilitySet::FOWNER;
        set_capabilities(None, caps).expect("capset");
        f()
    })
    .join()
    .expect("thread")
}

#[test]
fn resolve_beneath_opens_plain_nested_dirs() {
    let (dir, root) = tmp();
    fs::create_dir_all(dir.path().join("volumes/x/data")).expect("mkdir");
    let fd = resolve_beneath(root.as_fd(), Path::new("volumes/x/data")).expect("resolve");
    let info = file_info(fd.as_fd()).expect("info");
    let meta = fs::metadata(dir.path().join("volumes/x/data")).expect("stat");
    assert_eq!((info.id.dev, info.id.ino), (meta.dev(), meta.ino()));
    assert!(info.is_dir && !info.is_symlink && !info.mount_root);
    // `..` that stays beneath the root is fine for openat2.
    resolve_beneath(root.as_fd(), Path::new("volumes/x/../x")).expect("inner ..");
    // The root itself.
    let same = resolve_beneath(root.as_fd(), Path::new("")).expect("empty");
    assert_eq!(
        file_info(same.as_fd()).expect("info").id,
        file_info(root.as_fd()).expect("info").id
    );
}

#[test]
fn resolve_beneath_refuses_every_symlink() {
    let (dir, root) = tmp();
    fs::create_dir_all(dir.path().join("d")).expect("mkdir");
    fs::write(dir.path().join("d/file"), b"x").expect("write");
    symlink("/", dir.path().join("a")).expect("symlink");
    symlink("../..", dir.path().join("d/up")).expect("symlink");
    symlink("file", dir.path().join("d/last")).expect("symlink");
    symlink("d", dir.path().join("inside")).expect("symlink");
    for rel in [
        "a",
        "a/etc",
        "a/etc/passwd",
        "d/up",
        "d/up/etc",
        "d/last",
        "inside/file",
    ] {
        let err = resolve_beneath(root.as_fd(), Path::new(rel)).expect_err(rel);
        assert_eq!(err.errno, Errno::LOOP, "{rel}: {err}");
        let err = open_dir_beneath(root.as_fd(), Path::new(rel)).expect_err(rel);
        assert_eq!(err.errno, Errno::LOOP, "{rel}: {err}");
    }
}

#[test]
fn resolve_beneath_refuses_escapes() {
    let (dir, root) = tmp();
    fs::create_dir_all(dir.path().join("d")).expect("mkdir");
    for rel in ["..", "../x", "d/../../x", "/etc", "/"] {
        let err = resolve_beneath(root.as_fd(), Path::new(rel)).expect_err(rel);
        assert_eq!(err.errno, Errno::XDEV, "{rel}: {err}");
    }
}

#[test]
fn resolve_beneath_refuses_magic_links() {
    let proc_self = open_trusted_dir(Path::new("/proc/self")).expect("open /proc/self");
    let err = resolve_beneath(proc_self.as_fd(), Path::new("fd/0")).expect_err("magic link");
    assert_eq!(err.errno, Errno::LOOP, "{err}");
    let err = resolve_beneath(proc_self.as_fd(), Path::new("root/etc")).expect_err("magic link");
    assert_eq!(err.errno, Errno::LOOP, "{err}");
}

#[test]
fn open_dir_beneath_gives_a_readable_directory() {
    let (dir, root) = tmp();
    fs::create_dir_all(dir.path().join("v")).expect("mkdir");
    fs::write(dir.path().join("v/f"), b"x").expect("write");
    let v = open_dir_beneath(root.as_fd(), Path::new("v")).expect("open");
    let names: Vec<String> = rustix::fs::Dir::read_from(&v)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"f".to_owned()), "{names:?}");
    rustix::fs::fchmod(&v, Mode::from_raw_mode(0o750)).expect("fchmod");
    let err = open_dir_beneath(root.as_fd(), Path::new("v/f")).expect_err("file");
    assert_eq!(err.errno, Errno::NOTDIR);
}

#[test]
fn trusted_dirs() {
    let (dir, _root) = tmp();
    let deep = dir.path().join("a/b/c");
    create_trusted_dir_all(&deep).expect("create");
    create_trusted_dir_all(&deep).expect("again");
    for p in ["a", "a/b", "a/b/c"] {
        let mode = fs::metadata(dir.path().join(p))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700, "{p}");
    }
    open_trusted_dir(&deep).expect("open");
    fs::write(dir.path().join("file"), b"x").expect("write");
    let err = create_trusted_dir_all(&dir.path().join("file/x")).expect_err("file in the way");
    assert_eq!(err.errno, Errno::NOTDIR);
    let err = open_trusted_dir(&dir.path().join("file")).expect_err("not a dir");
    assert_eq!(err.errno, Errno::NOTDIR);
    assert_eq!(
        open_trusted_dir(Path::new("relative"))
            .expect_err("rel")
            .errno,
        Errno::INVAL
    );
    assert_eq!(
        create_trusted_dir_all(Path::new("rel/x"))
            .expect_err("rel")
            .errno,
        Errno::INVAL
    );
}

#[test]
fn mkdir_and_rmdir_at() {
    let (dir, root) = tmp();
    mkdir_at(root.as_fd(), "v", 0o2751).expect("mkdir");
    let mode = fs::metadata(dir.path().join("v"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o2751);
    assert_eq!(
        mkdir_at(root.as_fd(), "v", 0o755)
            .expect_err("exists")
            .errno,
        Errno::EXIST
    );
    fs::write(dir.path().join("v/f"), b"x").expect("write");
    assert_eq!(
        rmdir_at(root.as_fd(), "v").expect_err("not empty").errno,
        Errno::NOTEMPTY
    );
    fs::remove_file(dir.path().join("v/f")).expect("rm");
    rmdir_at(root.as_fd(), "v").expect("rmdir");
    assert!(!dir.path().join("v").exists());
    assert_eq!(
        rmdir_at(root.as_fd(), "v").expect_err("gone").errno,
        Errno::NOENT
    );
    // A symlink named like the directory is not followed by rmdir.
    symlink(dir.path(), dir.path().join("l")).expect("symlink");
    assert_eq!(
        rmdir_at(root.as_fd(), "l").expect_err("symlink").errno,
        Errno::NOTDIR
    );
}

/// Builds the hostile tree of the test plan under `base/tree`, with things outside it that
/// must survive: `base/outside/precious` and `base/outside/dir/keep`.
fn build_hostile_tree(base: &Path) {
    let tree = base.join("tree");
    let outside = base.join("outside");
    fs::create_dir_all(outside.join("dir")).expect("mkdir outside");
    fs::write(outside.join("precious"), b"precious").expect("write");
    fs::write(outside.join("dir/keep"), b"keep").expect("write");
    fs::create_dir_all(tree.join("a/b/c")).expect("mkdir tree");
    fs::write(tree.join("top"), b"top").expect("write");
    fs::write(tree.join("a/b/c/deep"), vec![7u8; 10_000]).expect("write");
    symlink("/", tree.join("to_root")).expect("symlink");
    symlink(outside.join("precious"), tree.join("a/to_precious")).expect("symlink");
    symlink("../../outside/dir", tree.join("a/to_outside_dir")).expect("symlink");
    symlink("/nonexistent", tree.join("dangling")).expect("symlink");
    fs::hard_link(outside.join("precious"), tree.join("a/b/hard_precious")).expect("link");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        tree.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    drop(UnixListener::bind(tree.join("a/sock")).expect("socket"));
    // Directories we may neither list nor write, with something inside.
    fs::create_dir(tree.join("locked")).expect("mkdir");
    fs::write(tree.join("locked/inside"), b"x").expect("write");
    fs::create_dir(tree.join("locked/sub")).expect("mkdir");
    fs::set_permissions(tree.join("locked/sub"), fs::Permissions::from_mode(0o000)).expect("chmod");
    fs::set_permissions(tree.join("locked"), fs::Permissions::from_mode(0o000)).expect("chmod");
    fs::create_dir(tree.join("readonly")).expect("mkdir");
    fs::write(tree.join("readonly/f"), b"x").expect("write");
    fs::set_permissions(tree.join("readonly"), fs::Permissions::from_mode(0o500)).expect("chmod");
}

fn assert_outside_intact(base: &Path) {
    assert!(!base.join("tree").exists(), "tree still there");
    assert_eq!(
        fs::read(base.join("outside/precious")).expect("precious"),
        b"precious"
    );
    assert_eq!(
        fs::metadata(base.join("outside/precious"))
            .expect("stat")
            .nlink(),
        1
    );
    assert_eq!(
        fs::read(base.join("outside/dir/keep")).expect("keep"),
        b"keep"
    );
    assert!(Path::new("/etc").is_dir() && Path::new("/tmp").is_dir());
}

#[test]
fn remove_tree_at_removes_a_hostile_tree_and_nothing_else() {
    let (dir, base) = tmp();
    build_hostile_tree(dir.path());
    remove_tree_at(base.as_fd(), "tree").expect("remove");
    assert_outside_intact(dir.path());
}

#[test]
fn remove_tree_at_handles_locked_dirs_without_dac_override() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base_path = dir.path().to_path_buf();
    without_dac_override(move || {
        build_hostile_tree(&base_path);
        // Proves the capabilities are really gone on this thread.
        let denied = fs::read_dir(base_path.join("tree/locked")).expect_err("000 dir listed");
        assert_eq!(denied.raw_os_error(), Some(Errno::ACCESS.raw_os_error()));
        let base = open_trusted_dir(&base_path).expect("open");
        remove_tree_at(base.as_fd(), "tree").expect("remove");
    });
    assert_outside_intact(dir.path());
}

#[test]
fn remove_tree_at_of_absent_file_and_symlink_names() {
    let (dir, _rdonly) = tmp();
    // Through an O_PATH fd, as the driver holds them.
    let base = common::path_fd(dir.path());
    remove_tree_at(base.as_fd(), "absent").expect("absent is fine");
    fs::write(dir.path().join("file"), b"x").expect("write");
    remove_tree_at(base.as_fd(), "file").expect("file");
    assert!(!dir.path().join("file").exists());
    // A symlink to a directory outside: the link goes, the directory stays.
    let outside = tempfile::tempdir().expect("tempdir");
    fs::write(outside.path().join("keep"), b"keep").expect("write");
    symlink(outside.path(), dir.path().join("link")).expect("symlink");
    remove_tree_at(base.as_fd(), "link").expect("link");
    assert!(fs::symlink_metadata(dir.path().join("link")).is_err());
    assert_eq!(
        fs::read(outside.path().join("keep")).expect("keep"),
        b"keep"
    );
    // Wide directories go in one call too.
    fs::create_dir(dir.path().join("wide")).expect("mkdir");
    for i in 0..500 {
        fs::write(dir.path().join(format!("wide/{i}")), b"").expect("write");
    }
    remove_tree_at(base.as_fd(), "wide").expect("wide");
    assert!(!dir.path().join("wide").exists());
}

#[test]
fn remove_tree_at_deeper_than_the_fd_window() {
    let (dir, base) = tmp();
    let mut path = dir.path().join("deep");
    for i in 0..150 {
        path.push(format!("{i}"));
    }
    fs::create_dir_all(&path).expect("mkdir");
    fs::write(path.join("leaf"), b"leaf").expect("write");
    let deep = open_dir_beneath(base.as_fd(), Path::new("deep")).expect("open");
    assert_eq!(tree_usage(deep.as_fd()).expect("usage").inodes, 152);
    remove_tree_at(base.as_fd(), "deep").expect("remove");
    assert!(!dir.path().join("deep").exists());
}

fn blocks(path: &Path) -> u64 {
    fs::symlink_metadata(path).expect("lstat").blocks() * 512
}

#[test]
fn tree_usage_does_not_follow_symlinks() {
    let (dir, _base) = tmp();
    let big = dir.path().join("big");
    let file = fs::File::create(&big).expect("create");
    rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, 50 << 20).expect("fallocate");
    assert!(blocks(&big) >= 50 << 20);
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).expect("mkdir");
    symlink(&big, tree.join("to_big")).expect("symlink");
    symlink(dir.path(), tree.join("to_parent")).expect("symlink");
    let fd = open_trusted_dir(&tree).expect("open");
    let usage = tree_usage(fd.as_fd()).expect("usage");
    assert_eq!(usage.inodes, 3);
    assert_eq!(
        usage.bytes,
        blocks(&tree) + blocks(&tree.join("to_big")) + blocks(&tree.join("to_parent"))
    );
    assert!(usage.bytes < 1 << 20, "{usage:?}");
}

#[test]
fn tree_usage_counts_hard_links_once() {
    let (dir, _base) = tmp();
    let tree = dir.path().join("tree");
    fs::create_dir_all(tree.join("sub")).expect("mkdir");
    fs::write(tree.join("data"), vec![1u8; 256 << 10]).expect("write");
    fs::hard_link(tree.join("data"), tree.join("sub/link1")).expect("link");
    fs::hard_link(tree.join("data"), tree.join("link2")).expect("link");
    fs::write(tree.join("sub/small"), b"small").expect("write");
    // Through an O_PATH fd, as the driver holds them.
    let fd = common::path_fd(&tree);
    let usage = tree_usage(fd.as_fd()).expect("usage");
    let expected = blocks(&tree)
        + blocks(&tree.join("sub"))
        + blocks(&tree.join("data"))
        + blocks(&tree.join("sub/small"));
    assert_eq!(usage.bytes, expected);
    assert_eq!(usage.inodes, 4);
}

#[test]
fn file_info_space_and_sync() {
    let (dir, base) = tmp();
    symlink("/", dir.path().join("l")).expect("symlink");
    fs::write(dir.path().join("f"), b"x").expect("write");
    let link = rustix::fs::openat(
        &base,
        "l",
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open symlink");
    assert!(file_info(link.as_fd()).expect("info").is_symlink);
    let f = resolve_beneath(base.as_fd(), Path::new("f")).expect("file");
    let info = file_info(f.as_fd()).expect("info");
    assert!(info.is_file && !info.is_dir && !info.is_block_device);
    let root = open_trusted_dir(Path::new("/")).expect("open /");
    let root_info = file_info(root.as_fd()).expect("info");
    assert!(root_info.mount_root && root_info.is_dir && root_info.mount_id != 0);
    assert!(!file_info(base.as_fd()).expect("info").mount_root);

    let space = fs_space(base.as_fd()).expect("space");
    assert!(space.bytes_total > 0 && space.bytes_available <= space.bytes_total);
    assert!(space.inodes_total == 0 || space.inodes_free <= space.inodes_total);
    assert!(!space.read_only);
    let path_only = common::path_fd(dir.path());
    assert_eq!(
        fs_space(path_only.as_fd())
            .expect("space via O_PATH")
            .bytes_total,
        space.bytes_total
    );

    sync_dir(base.as_fd()).expect("sync");
    sync_dir(path_only.as_fd()).expect("sync via O_PATH");
}

#[test]
fn entry_info_never_follows_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::os::unix::fs::symlink("/", dir.path().join("door")).unwrap();
    let fd = stowage_sys::fs::open_trusted_dir(dir.path()).unwrap();
    let d = stowage_sys::fs::entry_info(fd.as_fd(), "d").unwrap();
    assert!(d.is_dir && !d.is_symlink);
    let door = stowage_sys::fs::entry_info(fd.as_fd(), "door").unwrap();
    assert!(door.is_symlink && !door.is_dir);
    assert!(stowage_sys::fs::entry_info(fd.as_fd(), "../x").is_err());
    assert_eq!(
        stowage_sys::fs::entry_info(fd.as_fd(), "absent")
            .unwrap_err()
            .errno,
        stowage_sys::Errno::NOENT
    );
}

/// fsGroup done safely: the group reaches directories and single-link files only; symlinks,
/// hard-linked files (a host file's other name), FIFOs and mounts are left alone; a second
/// run with the root already matching walks nothing.
#[test]
fn set_group_tree_touches_only_what_is_the_volumes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED (needs root to chown): set_group_tree_touches_only_what_is_the_volumes");
        return;
    }
    let host = tempfile::tempdir().unwrap();
    let outside = host.path().join("host-file");
    std::fs::write(&outside, b"host").unwrap();
    let vol = host.path().join("vol");
    std::fs::create_dir_all(vol.join("a/b")).unwrap();
    std::fs::write(vol.join("a/b/f"), b"x").unwrap();
    std::fs::set_permissions(vol.join("a/b/f"), std::fs::Permissions::from_mode(0o4700)).unwrap();
    std::os::unix::fs::symlink(&outside, vol.join("a/link")).unwrap();
    std::fs::hard_link(&outside, vol.join("a/hard")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        vol.join("fifo").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let before = std::fs::metadata(&outside).unwrap();
    let root = stowage_sys::fs::open_trusted_dir(&vol).unwrap();
    let stats = stowage_sys::fs::set_group_tree(root.as_fd(), 4242, false).unwrap();
    assert_eq!(
        (
            stats.changed,
            stats.symlinks,
            stats.linked,
            stats.specials,
            stats.root_matched
        ),
        (4, 1, 1, 1, false),
        "{stats:?}"
    );
    for p in ["", "a", "a/b"] {
        let m = std::fs::metadata(vol.join(p)).unwrap();
        assert_eq!(m.gid(), 4242, "{p}");
        assert_eq!(m.mode() & 0o2070, 0o2070, "{p}: {:o}", m.mode());
    }
    let f = std::fs::metadata(vol.join("a/b/f")).unwrap();
    assert_eq!(f.gid(), 4242);
    assert_eq!(
        f.mode() & 0o7777,
        0o0760,
        "set-user-id is not put back: {:o}",
        f.mode()
    );
    let after = std::fs::metadata(&outside).unwrap();
    assert_eq!(
        (after.gid(), after.mode()),
        (before.gid(), before.mode()),
        "the host file"
    );
    assert_eq!(
        std::fs::symlink_metadata(vol.join("a/link")).unwrap().gid(),
        0
    );
    assert_ne!(
        std::fs::symlink_metadata(vol.join("fifo")).unwrap().gid(),
        4242
    );
    // The root matches now: nothing is walked, even a new file keeps its group.
    std::fs::write(vol.join("new"), b"n").unwrap();
    rustix::fs::chown(
        vol.join("new").as_path(),
        None,
        Some(rustix::fs::Gid::from_raw(7)),
    )
    .unwrap();
    let again = stowage_sys::fs::set_group_tree(root.as_fd(), 4242, false).unwrap();
    assert!(again.root_matched);
    assert_eq!(std::fs::metadata(vol.join("new")).unwrap().gid(), 7);
}

/// A pod swapping a directory of its volume for a symlink to a host directory while the
/// fsGroup walk runs: the host directory's files never change group.
#[test]
fn set_group_tree_under_a_swap_race_never_reaches_the_host() {
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED (needs root to chown): set_group_tree_under_a_swap_race_never_reaches_the_host");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("host");
    fs::create_dir(&host).unwrap();
    for i in 0..20 {
        fs::write(host.join(format!("h{i}")), b"host").unwrap();
    }
    let vol = tmp.path().join("vol");
    fs::create_dir_all(vol.join("d")).unwrap();
    for i in 0..200 {
        fs::write(vol.join(format!("d/f{i}")), b"x").unwrap();
    }
    symlink(&host, vol.join("l")).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let (a, b) = (vol.join("d"), vol.join("l"));
    let swapper = std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            let _ = rustix::fs::renameat_with(
                rustix::fs::CWD,
                &a,
                rustix::fs::CWD,
                &b,
                rustix::fs::RenameFlags::EXCHANGE,
            );
        }
    });
    let root = stowage_sys::fs::open_trusted_dir(&vol).unwrap();
    for round in 0..50u32 {
        // A new group each round, so the root never matches and the walk runs.
        let _ = stowage_sys::fs::set_group_tree(root.as_fd(), 5000 + round, false);
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    for e in fs::read_dir(&host).unwrap() {
        let m = e.unwrap().metadata().unwrap();
        assert_eq!(m.gid(), 0, "a host file changed group");
    }
    assert_eq!(fs::metadata(&host).unwrap().gid(), 0);
}
