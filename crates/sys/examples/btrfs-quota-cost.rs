//! Measures what quota accounting costs the `btrfs` pool, for docs/benchmarks.md: on a fresh
//! loop-mounted btrfs per mode (simple quotas, full qgroups, quotas off), the time of the
//! pool's create (subvolume + qgroup limit + commit) and delete (destroy + qgroup removal +
//! commit), and the time to delete a snapshot that shares most of its extents with its source
//! until the cleaner has dropped it (`btrfs subvolume sync`, this tool's only use of the
//! program, as no request path waits for the cleaner).
//!
//! Root only, in a private mount namespace:
//! `unshare -m --propagation private cargo run -p stowage-sys --example btrfs-quota-cost [N]`

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use stowage_sys::btrfs;
use stowage_sys::fs::open_trusted_dir;

struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

fn per_op(total: Duration, n: u32) -> String {
    format!("{:.2} ms", total.as_secs_f64() * 1000.0 / f64::from(n))
}

fn measure(dir: &Path, mode: &str, n: u32) {
    let image = dir.join(format!("{mode}.img"));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(2 << 30))
        .expect("image");
    run(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&image));
    let mnt = dir.join(mode);
    std::fs::create_dir(&mnt).expect("mkdir");
    run(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mnt));
    let _guard = Mounted(mnt.clone());
    let top = open_trusted_dir(&mnt).expect("open");
    let fs = top.as_fd();
    match mode {
        "simple" => btrfs::enable_quota(fs, true).expect("enable simple quotas"),
        "qgroups" => btrfs::enable_quota(fs, false).expect("enable qgroups"),
        _ => {}
    }
    let quotas = mode != "off";

    // create + limit + commit, then destroy + qgroup removal + commit, as the pool does.
    let (mut create, mut delete) = (Duration::ZERO, Duration::ZERO);
    for i in 0..n {
        let name = format!("v{i}");
        let t = Instant::now();
        btrfs::create_subvolume(fs, &name).expect("create");
        let vol = open_trusted_dir(&mnt.join(&name)).expect("open vol");
        let id = btrfs::subvolume_id(vol.as_fd()).expect("id");
        if quotas {
            btrfs::qgroup_limit(fs, id, 1 << 30).expect("limit");
        }
        btrfs::commit(fs).expect("commit");
        create += t.elapsed();
        std::fs::write(mnt.join(&name).join("f"), vec![1u8; 64 << 10]).expect("write");
        drop(vol);
        let t = Instant::now();
        btrfs::destroy_subvolume(fs, &name).expect("destroy");
        if quotas {
            let _ = btrfs::qgroup_create(fs, id, false);
        }
        btrfs::commit(fs).expect("commit");
        delete += t.elapsed();
    }

    // A snapshot sharing almost everything with its source, then changed in 10 % of its
    // files: the time from its destruction until the cleaner has dropped it.
    btrfs::create_subvolume(fs, "data").expect("data");
    for i in 0..4000 {
        std::fs::write(
            mnt.join(format!("data/f{i}")),
            vec![(i % 251) as u8; 16 << 10],
        )
        .expect("write");
    }
    btrfs::commit(fs).expect("commit");
    let data = open_trusted_dir(&mnt.join("data")).expect("open data");
    btrfs::create_snapshot(fs, "snap", data.as_fd(), false).expect("snapshot");
    for i in (0..4000).step_by(10) {
        std::fs::write(mnt.join(format!("snap/f{i}")), vec![7u8; 16 << 10]).expect("rewrite");
    }
    btrfs::commit(fs).expect("commit");
    let t = Instant::now();
    btrfs::destroy_subvolume(fs, "snap").expect("destroy snapshot");
    // The cleaner runs after a commit; commit every 10 ms (instead of the 30 s default
    // interval) so the time measured is the cleaner's work, not its wait.
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = btrfs::commit(fs);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        run(Command::new("btrfs").args(["subvolume", "sync"]).arg(&mnt));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let snap = t.elapsed();
    let state = btrfs::quota_mode(fs).expect("mode");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "| {mode} | {} | {} | {:.0} ms | {state:?} |",
        per_op(create, n),
        per_op(delete, n),
        snap.as_secs_f64() * 1000.0
    );
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("tempdir");
    println!("| quotas | create+limit+commit | destroy+remove qgroup+commit | snapshot delete until dropped | mode after |");
    println!("|---|---|---|---|---|");
    for mode in ["simple", "qgroups", "off"] {
        measure(dir.path(), mode, n);
    }
}
