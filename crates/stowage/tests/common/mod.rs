//! Test harness: starts the real `stowage` binary on a Unix socket in a temporary directory
//! and talks to it with a real gRPC client. Everything a test creates (the process, its
//! mounts, its files) is removed on drop, also when the test fails.

#![allow(dead_code)]

/// Prints to the process's real stderr: libtest captures `eprintln!` of passing tests, and a
/// skip must be seen.
macro_rules! loud {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::transport::Channel;

pub const DRIVER: &str = "stowage.csi.dev";

/// Whether this test can do what needs root (mounts); prints why not when it cannot.
pub fn root_or_skip(test: &str) -> bool {
    if rustix_is_root() {
        true
    } else {
        loud!("SKIPPED (needs root for mounts): {test}");
        false
    }
}

fn rustix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A running driver and the directories it was given.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub endpoint: String,
    pub extra_args: Vec<String>,
    pub log: PathBuf,
    /// What `--kubelet-dir` is given (the harness's kubelet dir unless a test changes it).
    pub kubelet_arg: PathBuf,
    /// Extra environment of the next spawn (e.g. a crash point).
    pub env: Vec<(String, String)>,
    /// The binary the next spawn runs (the one cargo built unless a test replaces it).
    pub bin: PathBuf,
    /// Length of the log when the running process was spawned: what it wrote starts there.
    pub log_start: u64,
}

impl Harness {
    /// Starts a driver with its defaults plus a temporary state dir, socket and kubelet dir.
    pub async fn start(extra: &[&str]) -> Harness {
        let dir = tempfile::Builder::new()
            .prefix("stowage-it-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("kubelet")).unwrap();
        let endpoint = format!("unix://{}", dir.path().join("csi.sock").display());
        let mut h = Harness {
            log: dir.path().join("driver.log"),
            kubelet_arg: dir.path().join("kubelet"),
            env: Vec::new(),
            bin: PathBuf::from(env!("CARGO_BIN_EXE_stowage")),
            log_start: 0,
            dir,
            child: None,
            endpoint,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        };
        h.spawn().await;
        h
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn kubelet(&self) -> PathBuf {
        self.dir.path().join("kubelet")
    }

    pub fn pool_volumes(&self) -> PathBuf {
        self.state_dir().join("pools/default/volumes")
    }

    /// Starts (or restarts) the process and waits until Probe says ready.
    pub async fn spawn(&mut self) {
        self.spawn_process();
        self.wait_ready().await;
    }

    /// Starts the process without waiting for anything.
    pub fn spawn_process(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--endpoint")
            .arg(&self.endpoint)
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--node-id")
            .arg("node-a")
            .arg("--kubelet-dir")
            .arg(&self.kubelet_arg)
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn stowage");
        self.child = Some(child);
    }

    /// Waits (bounded) until Probe says ready; panics if the process exits first.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + scaled_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "driver exited early with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(ch) = self.try_channel().await {
                let probe = csi::identity_client::IdentityClient::new(ch)
                    .probe(csi::ProbeRequest {})
                    .await;
                if let Ok(r) = probe {
                    if r.into_inner().ready == Some(true) {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "driver not ready in {} s; log:\n{}",
                scaled_secs(30).as_secs(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A connection to the socket, or why there is none (no socket, nobody accepting).
    pub async fn try_channel(&self) -> Result<Channel, String> {
        let path = self.endpoint.trim_start_matches("unix://");
        if !Path::new(path).exists() {
            return Err("no socket yet".into());
        }
        connect_unix(path).await
    }

    pub async fn channel(&self) -> Channel {
        self.try_channel().await.expect("connect")
    }

    pub async fn identity(&self) -> csi::identity_client::IdentityClient<Channel> {
        csi::identity_client::IdentityClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> csi::controller_client::ControllerClient<Channel> {
        csi::controller_client::ControllerClient::new(self.channel().await)
    }

    pub async fn node(&self) -> csi::node_client::NodeClient<Channel> {
        csi::node_client::NodeClient::new(self.channel().await)
    }

    /// SIGTERM, then wait for exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + scaled_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "driver did not stop on SIGTERM within {} s",
                    scaled_secs(20).as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) for the process to exit by itself (after a signal sent elsewhere).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + scaled_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the driver did not exit within 40 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (bounded) for the process to die by itself, as at a crash point; returns whether
    /// it was killed by a signal (abort), not a normal exit. When a crash point is armed
    /// ([`CRASH_ENV`]), also checks that the process died AT that point (its own last words
    /// in the log), not somewhere else, and records the point as exercised.
    pub fn await_crash(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + scaled_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                if let Some((_, point)) = self.env.iter().find(|(k, _)| k == CRASH_ENV) {
                    let said = self.log_since_spawn();
                    assert!(
                        said.contains(&format!("STOWAGE_TEST_CRASH_AT: aborting at {point}\n")),
                        "the driver died ({status}) but not at crash point {point}; its log:\n{said}"
                    );
                    assert_eq!(
                        status.signal(),
                        Some(6),
                        "the driver did not abort (SIGABRT) at {point}: {status}"
                    );
                    note_exercised(point);
                }
                return status.signal().is_some();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the driver did not reach its crash point within {} s",
                    scaled_secs(20).as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL: a crash.
    pub fn crash(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the running (or last) process wrote to the log.
    pub fn log_since_spawn(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let start = (self.log_start as usize).min(text.len());
        String::from_utf8_lossy(&text[start..]).into_owned()
    }
}

/// A gRPC connection to the Unix socket at `path`, or why there is none.
pub async fn connect_unix(path: &str) -> Result<Channel, String> {
    let path = path.to_owned();
    tonic::transport::Endpoint::try_from("http://[::1]:50051")
        .map_err(|e| e.to_string())?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|e| e.to_string())
}

/// Whether `mkfs.<fs>` is installed; says SKIPPED for `test` when it is not.
pub fn have_mkfs(fs: &str, test: &str) -> bool {
    let tool = format!("mkfs.{fs}");
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(&tool).exists())
    });
    if !found {
        loud!("SKIPPED (no {tool}): {test}");
    }
    found
}

/// Mount points under `dir`, deepest first, from this process's mount table.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Options of the top mount at exactly `path` (per-mount options field).
pub fn mount_options(path: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    table
        .lines()
        .rfind(|l| l.split(' ').nth(4).map(unescape_mount_path).as_deref() == Some(path))
        .and_then(|l| l.split(' ').nth(5).map(str::to_owned))
}

pub fn mount_count(path: &Path) -> usize {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    table
        .lines()
        .filter(|l| l.split(' ').nth(4).map(unescape_mount_path).as_deref() == Some(path))
        .count()
}

fn unescape_mount_path(s: &str) -> PathBuf {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for m in mounts_under(self.dir.path()) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        if std::thread::panicking() {
            eprintln!("driver log:\n{}", self.log_text());
        }
    }
}

pub fn mount_cap(mode: Mode) -> csi::VolumeCapability {
    mount_cap_flags(mode, &[])
}

pub fn mount_cap_flags(mode: Mode, flags: &[&str]) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: String::new(),
                mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn create_req(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        parameters: HashMap::new(),
        secrets: HashMap::new(),
        ..Default::default()
    }
}

/// Creates a mount volume of `bytes` named `name` and returns it; panics on failure.
pub async fn create_volume(
    c: &mut csi::controller_client::ControllerClient<Channel>,
    name: &str,
    bytes: i64,
) -> csi::Volume {
    c.create_volume(create_req(name, bytes))
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name:?}: {e:?}"))
        .into_inner()
        .volume
        .expect("CreateVolume returned no volume")
}

/// The gRPC code of a call's result.
pub fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => {
            assert!(!s.message().is_empty(), "an error without a message: {s:?}");
            s.code()
        }
    }
}

/// How many times slower than a real machine this one runs: `STOWAGE_TEST_TIME_SCALE`, a
/// whole number (default 1), which scales the tests' time bounds. scripts/vm-test sets it,
/// whose guest runs under software emulation (TCG), many times slower than the host.
pub fn time_scale() -> u32 {
    std::env::var("STOWAGE_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// `secs` seconds on a real machine, scaled by [`time_scale`].
pub fn scaled_secs(secs: u64) -> Duration {
    Duration::from_secs(secs * u64::from(time_scale()))
}

/// Bounds a test body in time.
pub async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    let bound = scaled_secs(120);
    tokio::time::timeout(bound, f)
        .await
        .unwrap_or_else(|_| panic!("test took over {} s", bound.as_secs()));
}

/// A btrfs on a loop-mounted image; unmounted on drop (mount's autoclear frees the loop).
pub struct BtrfsFs {
    _dir: tempfile::TempDir,
    pub mnt: PathBuf,
}

impl Drop for BtrfsFs {
    fn drop(&mut self) {
        for m in mounts_under(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

/// A fresh 512 MiB btrfs loop-mounted in a temporary directory, or why it cannot be made
/// here (the caller prints it as a SKIPPED line).
pub fn btrfs_fs() -> Result<BtrfsFs, String> {
    if Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .is_err()
    {
        return Err("mkfs.btrfs is not installed: btrfs-progs; .ci/run installs it".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control".into());
    }
    let dir = tempfile::Builder::new()
        .prefix("stowage-btrfs-")
        .tempdir()
        .unwrap();
    let image = dir.path().join("btrfs.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(512 << 20))
        .unwrap();
    let mkfs = Command::new("mkfs.btrfs")
        .args(["-q", "-f"])
        .arg(&image)
        .output()
        .unwrap();
    if !mkfs.status.success() {
        return Err(format!("mkfs.btrfs failed: {mkfs:?}"));
    }
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let fs = BtrfsFs { _dir: dir, mnt };
    let out = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&fs.mnt)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "this kernel cannot loop-mount btrfs: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(fs)
}

/// The variable that arms a crash point of the driver (see crates/driver/src/crash.rs).
pub const CRASH_ENV: &str = "STOWAGE_TEST_CRASH_AT";

/// Restarts the driver armed to abort at `point`, runs `call`, checks that it did abort, and
/// restarts it unarmed.
pub async fn crash_during<F, Fut>(h: &mut Harness, point: &str, call: F)
where
    F: FnOnce(tonic::transport::Channel) -> Fut,
    Fut: std::future::Future<Output = tonic::Code>,
{
    h.stop();
    h.env = vec![(CRASH_ENV.to_owned(), point.to_owned())];
    h.spawn().await;
    let got = call(h.channel().await).await;
    assert_ne!(
        got,
        tonic::Code::Ok,
        "the call at crash point {point} answered OK"
    );
    assert!(h.await_crash(), "the driver did not abort at {point}");
    h.env.clear();
    h.spawn().await;
}

/// Restarts the driver armed to abort at `point`, which its start-up reaches (reconciliation
/// of the volumes there are), checks that it aborted there before it was ready, and starts
/// it unarmed.
pub async fn crash_at_start(h: &mut Harness, point: &str) {
    h.stop();
    h.env = vec![(CRASH_ENV.to_owned(), point.to_owned())];
    h.spawn_process();
    assert!(h.await_crash(), "the driver did not abort at {point}");
    h.env.clear();
    h.spawn().await;
}

/// Appends `point` to `target/crash-points-exercised` (one line per crash a test caused and
/// saw happen at its point), for the report of the crash suite.
fn note_exercised(point: &str) {
    use std::io::Write as _;
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("crash-points-exercised");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{point}");
    }
}

/// A thread exchanging `a` and `b` (renameat2 RENAME_EXCHANGE) in a tight loop until
/// stopped; stopped and joined on drop.
pub struct Swapper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    swaps: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Swapper {
    pub fn start(pairs: Vec<(PathBuf, PathBuf)>) -> Swapper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swaps = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (st, sw) = (stop.clone(), swaps.clone());
        let thread = std::thread::spawn(move || {
            for (a, b) in pairs.iter().cycle() {
                if st.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                if rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    a,
                    rustix::fs::CWD,
                    b,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .is_ok()
                {
                    sw.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    // Gone (deleted): keep trying until stopped, cheaply.
                    std::thread::yield_now();
                }
            }
        });
        let s = Swapper {
            stop,
            swaps,
            thread: Some(thread),
        };
        // The race is on before the call starts.
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.swaps.load(std::sync::atomic::Ordering::Relaxed) < 100 {
            assert!(
                Instant::now() < deadline,
                "the swapping thread never swapped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        s
    }

    /// Stops the thread; returns how many exchanges it made.
    pub fn stop(mut self) -> u64 {
        self.halt();
        self.swaps.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Loop devices whose backing file lies under `dir` (from sysfs: `/dev/loopN` and the file).
pub fn loops_under(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = PathBuf::from(
            backing
                .trim_end_matches('\n')
                .trim_end_matches(" (deleted)"),
        );
        if backing.starts_with(dir) {
            found.push((format!("/dev/{name}"), backing));
        }
    }
    found.sort();
    found
}

/// The entries of a pool's directory (`volumes`, `images`, `snapshots`), an image's `.img`
/// suffix taken off, sorted; a missing directory is empty.
fn pool_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".img").map(str::to_owned).unwrap_or(name)
        })
        .collect();
    names.sort();
    names
}

/// The end of every crash test: nothing leaked. The driver's store lists exactly `volumes`
/// and `snapshots`, none of them published anywhere; the pool at `pool` (its root: the
/// directory of `volumes`/`images` and `snapshots`) holds exactly those volumes and
/// snapshots (no image file, no directory, no subvolume without its row; on a btrfs pool, no
/// subvolume anywhere in the test's filesystem but those); no loop device is backed by a
/// file under the pool or the harness's directory; nothing is mounted under either.
pub async fn assert_nothing_leaked(
    h: &Harness,
    pool: &Path,
    volumes: &[&str],
    snapshots: &[&str],
    when: &str,
) {
    let sorted = |ids: &[&str]| {
        let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    let (volumes, snapshots) = (sorted(volumes), sorted(snapshots));
    let listed = h
        .controller()
        .await
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{when}: ListVolumes: {e:?}"))
        .into_inner();
    assert!(
        listed.next_token.is_empty(),
        "{when}: more volumes than one page"
    );
    let mut ids = Vec::new();
    for e in listed.entries {
        let v = e.volume.unwrap();
        if let Some(status) = e.status {
            assert!(
                status.published_node_ids.is_empty(),
                "{when}: volume {} is still recorded as published on {:?}",
                v.volume_id,
                status.published_node_ids
            );
        }
        ids.push(v.volume_id);
    }
    ids.sort();
    assert_eq!(ids, volumes, "{when}: the store's volumes");
    let listed = h
        .controller()
        .await
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{when}: ListSnapshots: {e:?}"))
        .into_inner();
    let mut snaps: Vec<String> = listed
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect();
    snaps.sort();
    assert_eq!(snaps, snapshots, "{when}: the store's snapshots");

    let data = if pool.join("images").exists() {
        pool.join("images")
    } else {
        pool.join("volumes")
    };
    assert_eq!(
        pool_entries(&data),
        volumes,
        "{when}: the pool's volumes ({})",
        data.display()
    );
    assert_eq!(
        pool_entries(&pool.join("snapshots")),
        snapshots,
        "{when}: the pool's snapshots"
    );
    if is_btrfs(pool) {
        let out = Command::new("btrfs")
            .args(["subvolume", "list"])
            .arg(pool)
            .output()
            .expect("btrfs subvolume list");
        assert!(
            out.status.success(),
            "{when}: btrfs subvolume list: {out:?}"
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "ID 256 gen 9 top level 5 path pool/volumes/<id>"
            let path = Path::new(line.rsplit_once(" path ").map_or(line, |(_, p)| p));
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let parent = path.parent().and_then(Path::file_name);
            let known = match parent.and_then(|p| p.to_str()) {
                Some("volumes") => volumes.contains(&name),
                Some("snapshots") => snapshots.contains(&name),
                _ => false,
            };
            assert!(known, "{when}: a subvolume without a row: {line}");
        }
    }
    for root in [pool, h.dir.path()] {
        assert_eq!(
            loops_under(root),
            Vec::new(),
            "{when}: loop devices backed by files under {}",
            root.display()
        );
        assert_eq!(
            mounts_under(root),
            Vec::<PathBuf>::new(),
            "{when}: mounts under {}",
            root.display()
        );
    }
}

/// Whether `path` is on a btrfs (statfs magic).
pub fn is_btrfs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == 0x9123_683e)
}

/// The pool kinds a test can run its driver with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    /// The harness's default `dir` pool.
    Dir,
    /// An `image` pool in a temporary directory (volumes on loop devices).
    Image,
    /// A `btrfs` pool on a loop-mounted btrfs of its own.
    Btrfs,
}

/// A driver serving one pool of a kind. On drop: the driver is killed and its mounts
/// removed, then the loop devices still backed by the pool's images are detached, then the
/// btrfs (if any) is unmounted — also when the test fails.
pub struct KindPool {
    pub h: Option<Harness>,
    pub kind: Kind,
    /// The pool's root (holding `volumes` or `images`, and `snapshots`).
    pub pool: PathBuf,
    _btrfs: Option<BtrfsFs>,
    _root: Option<tempfile::TempDir>,
    _cfg: Option<tempfile::TempDir>,
}

impl KindPool {
    /// Starts a driver (with `extra` arguments) on a pool of `kind`, or prints why this test
    /// cannot run here (SKIPPED) and returns None.
    pub async fn start(kind: Kind, test: &str, extra: &[&str]) -> Option<KindPool> {
        if !root_or_skip(test) {
            return None;
        }
        if kind != Kind::Dir && !Path::new("/dev/loop-control").exists() {
            loud!("SKIPPED (no /dev/loop-control): {test}");
            return None;
        }
        let (btrfs, root, pool, config) = match kind {
            Kind::Dir => {
                let h = Harness::start(extra).await;
                let pool = h.state_dir().join("pools/default");
                return Some(KindPool {
                    h: Some(h),
                    kind,
                    pool,
                    _btrfs: None,
                    _root: None,
                    _cfg: None,
                });
            }
            Kind::Image => {
                let root = tempfile::Builder::new()
                    .prefix("stowage-kind-image-")
                    .tempdir()
                    .unwrap();
                let pool = root.path().join("pool");
                let config = format!(
                    "[[pool]]\nname = \"img\"\nkind = \"image\"\npath = \"{}\"\ndefault_size = \"64Mi\"\n",
                    pool.display()
                );
                (None, Some(root), pool, config)
            }
            Kind::Btrfs => {
                let fs = match btrfs_fs() {
                    Ok(fs) => fs,
                    Err(why) => {
                        loud!("SKIPPED ({why}): {test}");
                        return None;
                    }
                };
                let pool = fs.mnt.join("pool");
                let config = format!(
                    "[[pool]]\nname = \"sub\"\nkind = \"btrfs\"\npath = \"{}\"\n",
                    pool.display()
                );
                (Some(fs), None, pool, config)
            }
        };
        let cfg_dir = tempfile::Builder::new()
            .prefix("stowage-kind-cfg-")
            .tempdir()
            .unwrap();
        let cfg = cfg_dir.path().join("stowage.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut args = vec!["--config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        let h = Harness::start(&args).await;
        Some(KindPool {
            h: Some(h),
            kind,
            pool,
            _btrfs: btrfs,
            _root: root,
            _cfg: Some(cfg_dir),
        })
    }

    pub fn h(&self) -> &Harness {
        self.h.as_ref().unwrap()
    }

    pub fn hm(&mut self) -> &mut Harness {
        self.h.as_mut().unwrap()
    }

    /// Where the pool keeps its volumes (`images` for the image kind).
    pub fn volumes_dir(&self) -> PathBuf {
        self.pool.join(if self.kind == Kind::Image {
            "images"
        } else {
            "volumes"
        })
    }
}

impl Drop for KindPool {
    fn drop(&mut self) {
        drop(self.h.take());
        for (dev, _) in loops_under(&self.pool) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}
