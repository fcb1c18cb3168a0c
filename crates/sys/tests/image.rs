//! Image files (fd-relative, never through a symlink, never shrunk) and the device content
//! probe on plain files. Unprivileged.

use std::fs;
use std::os::fd::AsFd;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use stowage_sys::blockfs::probe;
use stowage_sys::fs::open_trusted_dir;
use stowage_sys::image::{
    allocated_bytes, create_image, ensure_image, grow_image, image_size, open_image, remove_image,
    Allocation,
};
use stowage_sys::{DeviceContent, Errno, FsKind};

const MIB: u64 = 1 << 20;

#[test]
fn create_is_sparse_exclusive_and_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    let image = create_image(fd.as_fd(), "a.img", 64 * MIB, Allocation::Sparse).expect("create");
    assert_eq!(image_size(image.as_fd()).expect("size"), 64 * MIB);
    assert!(
        allocated_bytes(image.as_fd()).expect("blocks") < MIB,
        "sparse"
    );
    let meta = fs::metadata(dir.path().join("a.img")).expect("stat");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);

    let err = create_image(fd.as_fd(), "a.img", 64 * MIB, Allocation::Sparse).expect_err("excl");
    assert_eq!(err.errno, Errno::EXIST);
    for bad in ["", ".", "..", "a/b"] {
        let err = create_image(fd.as_fd(), bad, MIB, Allocation::Sparse).expect_err(bad);
        assert_eq!(err.errno, Errno::INVAL, "{bad:?}");
    }
    let err = create_image(fd.as_fd(), "zero.img", 0, Allocation::Sparse).expect_err("0 bytes");
    assert_eq!(err.errno, Errno::INVAL);

    // Idempotent: same size is fine, another size is EEXIST.
    let (_, created) =
        ensure_image(fd.as_fd(), "a.img", 64 * MIB, Allocation::Sparse).expect("again");
    assert!(!created);
    let (_, created) = ensure_image(fd.as_fd(), "b.img", MIB, Allocation::Sparse).expect("new");
    assert!(created);
    let err = ensure_image(fd.as_fd(), "a.img", 32 * MIB, Allocation::Sparse).expect_err("size");
    assert_eq!(err.errno, Errno::EXIST);
    assert!(err.to_string().contains("asked for"), "{err}");
}

#[test]
fn full_allocation_reserves_every_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    let image = create_image(fd.as_fd(), "f.img", 8 * MIB, Allocation::Full).expect("create");
    assert!(allocated_bytes(image.as_fd()).expect("blocks") >= 8 * MIB);
    assert_eq!(
        grow_image(image.as_fd(), 16 * MIB, Allocation::Full).expect("grow"),
        16 * MIB
    );
    assert!(allocated_bytes(image.as_fd()).expect("blocks") >= 16 * MIB);
}

#[test]
fn grow_never_shrinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    let image = create_image(fd.as_fd(), "g.img", 8 * MIB, Allocation::Sparse).expect("create");
    assert_eq!(
        grow_image(image.as_fd(), 16 * MIB, Allocation::Sparse).expect("grow"),
        16 * MIB
    );
    assert_eq!(
        grow_image(image.as_fd(), 16 * MIB, Allocation::Sparse).expect("same"),
        16 * MIB
    );
    assert_eq!(
        grow_image(image.as_fd(), 4 * MIB, Allocation::Sparse).expect("smaller"),
        16 * MIB
    );
    assert_eq!(
        fs::metadata(dir.path().join("g.img")).expect("stat").len(),
        16 * MIB
    );
}

#[test]
fn open_refuses_everything_but_a_regular_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    drop(create_image(fd.as_fd(), "real.img", MIB, Allocation::Sparse).expect("create"));
    let image = open_image(fd.as_fd(), "real.img").expect("open");
    assert_eq!(image_size(image.as_fd()).expect("size"), MIB);
    // Opened read-write.
    rustix::io::pwrite(&image, b"x", 0).expect("writable");

    symlink(dir.path().join("real.img"), dir.path().join("link.img")).expect("symlink");
    fs::create_dir(dir.path().join("dir.img")).expect("mkdir");
    rustix::fs::mkfifoat(&fd, "fifo.img", rustix::fs::Mode::from_raw_mode(0o600)).expect("fifo");
    for (name, errno) in [
        ("link.img", Errno::LOOP),
        ("dir.img", Errno::ISDIR),
        ("fifo.img", Errno::NODEV),
        ("absent.img", Errno::NOENT),
    ] {
        let err = open_image(fd.as_fd(), name).expect_err(name);
        assert_eq!(err.errno, errno, "{name}: {err}");
    }
    // ensure_image does not adopt a name taken by something else.
    let err = ensure_image(fd.as_fd(), "link.img", MIB, Allocation::Sparse).expect_err("link");
    assert_eq!(err.errno, Errno::EXIST, "{err}");
    // The symlink's target was not touched by any of this.
    assert_eq!(
        fs::metadata(dir.path().join("real.img"))
            .expect("stat")
            .len(),
        MIB
    );
}

#[test]
fn remove_is_idempotent_and_leaves_directories() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    drop(create_image(fd.as_fd(), "r.img", MIB, Allocation::Sparse).expect("create"));
    let ino = fs::metadata(dir.path().join("r.img")).expect("stat").ino();
    assert!(ino > 0);
    assert!(remove_image(fd.as_fd(), "r.img").expect("remove"));
    assert!(!remove_image(fd.as_fd(), "r.img").expect("absent is fine"));
    fs::create_dir(dir.path().join("d.img")).expect("mkdir");
    let err = remove_image(fd.as_fd(), "d.img").expect_err("directory");
    assert_eq!(err.errno, Errno::ISDIR);
    assert!(dir.path().join("d.img").is_dir());
}

#[test]
fn probe_tells_empty_known_and_unknown_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    let image = create_image(fd.as_fd(), "p.img", 64 * MIB, Allocation::Sparse).expect("create");
    assert_eq!(probe(image.as_fd()).expect("probe"), DeviceContent::Empty);

    // Unknown data at the start, then only at the end (a backup GPT, say).
    rustix::io::pwrite(&image, b"\x01", 4096).expect("write");
    assert_eq!(
        probe(image.as_fd()).expect("probe"),
        DeviceContent::Unrecognized
    );
    rustix::io::pwrite(&image, b"\x00", 4096).expect("write");
    assert_eq!(probe(image.as_fd()).expect("probe"), DeviceContent::Empty);
    rustix::io::pwrite(&image, b"EFI PART", 64 * MIB - 512).expect("write");
    assert_eq!(
        probe(image.as_fd()).expect("probe"),
        DeviceContent::Unrecognized
    );
    rustix::io::pwrite(&image, &[0u8; 8], 64 * MIB - 512).expect("write");

    for (kind, offset, magic) in [
        (FsKind::Ext4, 1080, &b"\x53\xEF"[..]),
        (FsKind::Xfs, 0, &b"XFSB"[..]),
        (FsKind::Btrfs, 65600, &b"_BHRfS_M"[..]),
    ] {
        let image = create_image(fd.as_fd(), &format!("{kind}.img"), MIB, Allocation::Sparse)
            .expect("create");
        rustix::io::pwrite(&image, magic, offset).expect("write");
        assert_eq!(
            probe(image.as_fd()).expect("probe"),
            DeviceContent::Filesystem(kind)
        );
    }
    // Smaller than the probe span, and tiny.
    let tiny = create_image(fd.as_fd(), "tiny.img", 100, Allocation::Sparse).expect("create");
    assert_eq!(probe(tiny.as_fd()).expect("probe"), DeviceContent::Empty);
    // Not a file or block device.
    let err = probe(fd.as_fd()).expect_err("directory");
    assert_eq!(err.errno, Errno::NODEV);
}
