//! Rolling upgrade with pods running, for each pool kind (`dir`, `image` with an ext4 on a
//! loop device, `btrfs`): volumes are created, staged and published, and a pod's writer
//! keeps a file open in each, writing, fsyncing and reading back without pause. The driver
//! is stopped with SIGTERM (as the DaemonSet's rolling update does) and a new process is
//! started from a copy of the binary at another path on the same state directory and
//! socket; then the same with SIGKILL (an OOM kill). Meanwhile a kubelet-like client keeps
//! asking for stats; afterwards it repeats the kubelet's calls (stage, publish, stats,
//! ListVolumes). Every call succeeds or fails only with UNAVAILABLE while no driver
//! answers; no mount moved (the same mountinfo lines: mount id, device, source, options);
//! the loop devices are the same; the writers saw no error and their data verifies; the
//! teardown then leaves nothing behind. A SIGTERM during a call lets that call finish.
//! Root only (mounts); SKIPPED, saying why, where a kind cannot run.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::Code;

const MIB: i64 = 1 << 20;
/// A writer's record: its number and a byte pattern of it.
const RECORD: usize = 4096;
/// Records cycle through this many slots of the file (1 MiB).
const SLOTS: u64 = 256;

fn record(i: u64) -> Vec<u8> {
    let mut r = vec![(i % 251) as u8; RECORD];
    r[..8].copy_from_slice(&i.to_le_bytes());
    r
}

/// A pod's process: one file held open in a published volume, written record after record
/// (each fsynced and read back through the same descriptor) until stopped. The first error
/// ends it and is kept.
struct Writer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Writer {
    fn start(path: PathBuf) -> Writer {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (st, wr) = (stop.clone(), written.clone());
        let thread = std::thread::spawn(move || {
            let mut back = vec![0u8; RECORD];
            let mut i = 0u64;
            while !st.load(Ordering::Relaxed) {
                let offset = (i % SLOTS) * RECORD as u64;
                let want = record(i);
                file.write_all_at(&want, offset)
                    .and_then(|()| file.sync_data())
                    .and_then(|()| file.read_exact_at(&mut back, offset))
                    .map_err(|e| format!("record {i}: {e}"))?;
                if back != want {
                    return Err(format!("record {i} read back different"));
                }
                i += 1;
                wr.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(i)
        });
        Writer {
            path,
            stop,
            written,
            thread: Some(thread),
        }
    }

    fn count(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until the writer wrote `more` records after now.
    async fn progresses(&self, more: u64, what: &str) {
        let from = self.count();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.count() < from + more {
            assert!(
                !self.thread.as_ref().unwrap().is_finished(),
                "{what}: the writer on {} stopped",
                self.path.display()
            );
            assert!(
                Instant::now() < deadline,
                "{what}: the writer on {} is stuck at record {}",
                self.path.display(),
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops the writer; panics with its error if it had one; checks the file through a new
    /// descriptor holds the last record of every slot.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let n = self
            .thread
            .take()
            .unwrap()
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("the writer on {} failed: {e}", self.path.display()));
        let mut f = std::fs::File::open(&self.path).unwrap();
        let mut got = vec![0u8; RECORD];
        for slot in 0..SLOTS.min(n) {
            // The last record written to this slot.
            let last = (n - 1 - slot) / SLOTS * SLOTS + slot;
            f.seek(SeekFrom::Start(slot * RECORD as u64)).unwrap();
            f.read_exact(&mut got).unwrap();
            assert!(
                got == record(last),
                "{}: slot {slot} does not hold record {last}",
                self.path.display()
            );
        }
        n
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Vol {
    id: String,
    staging: PathBuf,
    target: PathBuf,
}

impl Vol {
    fn stage(&self) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: self.id.clone(),
            staging_target_path: self.staging.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        }
    }

    fn publish(&self) -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: self.id.clone(),
            staging_target_path: self.staging.display().to_string(),
            target_path: self.target.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        }
    }

    fn stats(&self, path: &Path) -> csi::NodeGetVolumeStatsRequest {
        csi::NodeGetVolumeStatsRequest {
            volume_id: self.id.clone(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        }
    }
}

/// The mountinfo lines of the mounts at `paths` (whole lines: mount id, parent, device,
/// root, mount point, options, source), in table order.
fn mount_lines(paths: &[PathBuf]) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    table
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| wanted.iter().any(|w| w == m))
        })
        .map(str::to_owned)
        .collect()
}

/// What the driver is doing while the kubelet asks: running and ready, or being replaced
/// (from the signal until the new process is ready).
const RUNNING: u8 = 0;
const STOPPING: u8 = 1;
const KILLED: u8 = 2;

/// An answer to the kubelet: what the driver was doing when the call started and ended, the
/// code, and the message.
type Answer = (u8, u8, Code, String);

/// A kubelet's view while the driver is replaced: stats of every published volume, asked
/// over and over on a fresh connection each time. Every answer is recorded with the phase.
struct Kubelet {
    stop: Arc<AtomicBool>,
    phase: Arc<std::sync::atomic::AtomicU8>,
    answers: Arc<Mutex<Vec<Answer>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Kubelet {
    fn start(endpoint: String, asks: Vec<csi::NodeGetVolumeStatsRequest>) -> Kubelet {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(std::sync::atomic::AtomicU8::new(RUNNING));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let (st, ph, an) = (stop.clone(), phase.clone(), answers.clone());
        let task = tokio::spawn(async move {
            let h = Probe { endpoint };
            while !st.load(Ordering::Relaxed) {
                for ask in &asks {
                    let began = ph.load(Ordering::SeqCst);
                    let (code, message) = match h.channel().await {
                        // Nobody accepts on the socket (gone, or not bound yet): what a gRPC
                        // client reports as UNAVAILABLE.
                        Err(why) => (Code::Unavailable, why),
                        Ok(ch) => {
                            let mut n = csi::node_client::NodeClient::new(ch);
                            match tokio::time::timeout(
                                Duration::from_secs(10),
                                n.node_get_volume_stats(ask.clone()),
                            )
                            .await
                            {
                                Err(_) => (Code::DeadlineExceeded, "no answer in 10 s".into()),
                                Ok(Ok(r)) => {
                                    let c = r.into_inner().volume_condition.unwrap_or_default();
                                    if c.abnormal {
                                        (Code::Internal, format!("abnormal: {}", c.message))
                                    } else {
                                        (Code::Ok, String::new())
                                    }
                                }
                                Ok(Err(s)) => (s.code(), format!("{s:?}")),
                            }
                        }
                    };
                    let ended = ph.load(Ordering::SeqCst);
                    an.lock().unwrap().push((began, ended, code, message));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Kubelet {
            stop,
            phase,
            answers,
            task: Some(task),
        }
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    fn oks(&self) -> usize {
        self.answers
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.2 == Code::Ok)
            .count()
    }

    async fn asked_ok_again(&self, what: &str) {
        let from = self.oks();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.oks() < from + 3 {
            assert!(
                Instant::now() < deadline,
                "{what}: the kubelet's stats calls do not succeed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops asking. Every call made entirely while a driver was running and ready was
    /// answered OK. A call that overlapped a replacement was answered OK, or UNAVAILABLE
    /// (nobody accepting on the socket), or failed at the transport, unanswered:
    /// - during a SIGTERM, a connection the draining server closed before it read the
    ///   request (a reset when the request's bytes were still unread, a GOAWAY NO_ERROR
    ///   for a stream past the last one it took): never processed, because the drain waits
    ///   for every request the server dispatched (`sigterm_lets_a_call_in_flight_finish`
    ///   holds it to that);
    /// - after a SIGKILL, also a connection the dead process dropped.
    ///
    /// tonic reports those with a code of its own choosing (INTERNAL, UNKNOWN, CANCELLED)
    /// and the transport error as the source; gRPC's own clients, the kubelet's among them,
    /// report them as UNAVAILABLE and retry. (An earlier version allowed only the GOAWAY
    /// during a SIGTERM; on a loaded machine a connection still in its handshake when the
    /// drain began is reset instead, 1 run in 5 under three CPU hogs, whatever the driver
    /// does: the kernel resets a socket closed with unread bytes.) Returns how many calls
    /// were answered OK, refused (UNAVAILABLE), and cut (transport).
    async fn finish(mut self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.take().unwrap().await.unwrap();
        let answers = self.answers.lock().unwrap();
        let cut = |a: &Answer| {
            a.3.contains("source: Some(tonic::transport::Error(Transport")
        };
        let bad: Vec<&Answer> = answers
            .iter()
            .filter(|a| {
                let retryable = matches!(a.2, Code::Ok | Code::Unavailable);
                match (a.0, a.1) {
                    (RUNNING, RUNNING) => a.2 != Code::Ok,
                    _ => !(retryable || cut(a)),
                }
            })
            .collect();
        assert!(
            bad.is_empty(),
            "answers that are not OK while running, or not retryable while replaced: {bad:#?}"
        );
        let ok = answers.iter().filter(|a| a.2 == Code::Ok).count();
        let refused = answers.iter().filter(|a| a.2 == Code::Unavailable).count();
        (ok, refused, answers.iter().filter(|a| cut(a)).count())
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A connection maker for the kubelet task (which cannot borrow the harness).
struct Probe {
    endpoint: String,
}

impl Probe {
    async fn channel(&self) -> Result<tonic::transport::Channel, String> {
        connect_unix(self.endpoint.trim_start_matches("unix://")).await
    }
}

/// The kubelet's calls after a restart, with the same arguments as before: all succeed, and
/// the volumes are listed as published here.
async fn kubelet_repeats(h: &Harness, vols: &[Vol], what: &str) {
    let mut n = h.node().await;
    for v in vols {
        n.node_stage_volume(v.stage())
            .await
            .unwrap_or_else(|e| panic!("{what}: NodeStageVolume again: {e:?}"));
        n.node_publish_volume(v.publish())
            .await
            .unwrap_or_else(|e| panic!("{what}: NodePublishVolume again: {e:?}"));
        for path in [&v.target, &v.staging] {
            let s = n
                .node_get_volume_stats(v.stats(path))
                .await
                .unwrap_or_else(|e| panic!("{what}: NodeGetVolumeStats: {e:?}"))
                .into_inner();
            let c = s.volume_condition.unwrap_or_default();
            assert!(!c.abnormal, "{what}: {}: {}", path.display(), c.message);
            assert!(!s.usage.is_empty(), "{what}: no usage");
        }
    }
    let listed = h
        .controller()
        .await
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{what}: ListVolumes: {e:?}"))
        .into_inner();
    for v in vols {
        let e = listed
            .entries
            .iter()
            .find(|e| e.volume.as_ref().unwrap().volume_id == v.id)
            .unwrap_or_else(|| panic!("{what}: {} not listed", v.id));
        assert_eq!(
            e.status.as_ref().unwrap().published_node_ids,
            vec!["node-a".to_owned()],
            "{what}: {} not listed as published here",
            v.id
        );
    }
}

/// A copy of the driver's binary at another path: the "new version" a rolling update runs.
fn replaced_binary(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let to = dir.join("stowage-next");
    std::fs::copy(env!("CARGO_BIN_EXE_stowage"), &to).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
    to
}

async fn upgrade_with_pods_running(kind: Kind, test: &str) {
    let Some(mut p) = KindPool::start(kind, test, &[]).await else {
        return;
    };
    bounded(async {
        let mut vols = Vec::new();
        for i in 0..2 {
            let mut c = p.h().controller().await;
            let v = create_volume(&mut c, &format!("pod-{i}"), 64 * MIB).await;
            let base = p.h().kubelet().join(format!("pods/pod-{i}"));
            std::fs::create_dir_all(&base).unwrap();
            let v = Vol {
                id: v.volume_id,
                staging: base.join("staging"),
                target: base.join("mount"),
            };
            let mut n = p.h().node().await;
            n.node_stage_volume(v.stage()).await.unwrap();
            n.node_publish_volume(v.publish()).await.unwrap();
            vols.push(v);
        }
        let paths: Vec<PathBuf> = vols
            .iter()
            .flat_map(|v| [v.staging.clone(), v.target.clone()])
            .collect();
        let writers: Vec<Writer> = vols
            .iter()
            .map(|v| Writer::start(v.target.join("data")))
            .collect();
        for w in &writers {
            w.progresses(20, "before the upgrade").await;
        }
        let mounts = mount_lines(&paths);
        assert_eq!(mounts.len(), 4, "{mounts:#?}");
        let loops = loops_under(&p.pool);
        assert_eq!(
            loops.len(),
            if kind == Kind::Image { 2 } else { 0 },
            "{loops:?}"
        );
        let asks = vols.iter().map(|v| v.stats(&v.target)).collect();
        let kubelet = Kubelet::start(p.h().endpoint.clone(), asks);
        kubelet.asked_ok_again("before the upgrade").await;

        // The rolling update: SIGTERM, and the new binary on the same state and socket.
        let bin_dir = tempfile::tempdir().unwrap();
        let next = replaced_binary(bin_dir.path());
        let original = p.h().bin.clone();
        let for_sigterm = Instant::now();
        kubelet.set_phase(STOPPING);
        let status = p.hm().stop();
        let stopped_in = for_sigterm.elapsed();
        assert!(status.success(), "the driver's exit on SIGTERM: {status}");
        assert_eq!(
            mount_lines(&paths),
            mounts,
            "the stopped driver moved mounts"
        );
        for w in &writers {
            w.progresses(10, "with no driver running").await;
        }
        p.hm().bin = next;
        let started = Instant::now();
        p.hm().spawn().await;
        let ready_in = started.elapsed();
        kubelet.set_phase(RUNNING);
        kubelet.asked_ok_again("after the upgrade").await;
        kubelet_repeats(p.h(), &vols, "after SIGTERM and the new binary").await;
        assert_eq!(mount_lines(&paths), mounts, "a mount moved in the upgrade");
        assert_eq!(loops_under(&p.pool), loops, "the loop devices changed");
        for w in &writers {
            w.progresses(20, "after the upgrade").await;
        }

        // An OOM kill instead, and back to the first binary.
        kubelet.set_phase(KILLED);
        p.hm().crash();
        assert_eq!(mount_lines(&paths), mounts, "the killed driver moved mounts");
        for w in &writers {
            w.progresses(10, "with the driver killed").await;
        }
        p.hm().bin = original;
        let started = Instant::now();
        p.hm().spawn().await;
        let ready_after_kill = started.elapsed();
        kubelet.set_phase(RUNNING);
        kubelet.asked_ok_again("after the kill").await;
        kubelet_repeats(p.h(), &vols, "after SIGKILL and a restart").await;
        assert_eq!(mount_lines(&paths), mounts, "a mount moved after the kill");
        assert_eq!(loops_under(&p.pool), loops, "the loop devices changed");
        for w in &writers {
            w.progresses(20, "after the kill").await;
        }

        let (ok, refused, cut) = kubelet.finish().await;
        let records: Vec<u64> = writers.into_iter().map(Writer::finish).collect();
        loud!(
            "{test}: SIGTERM to exit {} ms; new binary start to ready {} ms; after SIGKILL start to ready {} ms; kubelet stats calls: {ok} OK, {refused} UNAVAILABLE (no driver on the socket), {cut} cut by the exiting driver; records written and verified per pod: {records:?}",
            stopped_in.as_millis(),
            ready_in.as_millis(),
            ready_after_kill.as_millis()
        );

        let mut n = p.h().node().await;
        let mut c = p.h().controller().await;
        for v in &vols {
            n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: v.id.clone(),
                target_path: v.target.display().to_string(),
            })
            .await
            .unwrap();
            n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: v.id.clone(),
                staging_target_path: v.staging.display().to_string(),
            })
            .await
            .unwrap();
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap();
        }
        assert_nothing_leaked(p.h(), &p.pool, &[], &[], test).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_with_pods_running_on_dir_volumes() {
    upgrade_with_pods_running(Kind::Dir, "upgrade_with_pods_running_on_dir_volumes").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_with_pods_running_on_image_volumes() {
    upgrade_with_pods_running(Kind::Image, "upgrade_with_pods_running_on_image_volumes").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_with_pods_running_on_btrfs_volumes() {
    upgrade_with_pods_running(Kind::Btrfs, "upgrade_with_pods_running_on_btrfs_volumes").await;
}

/// SIGTERM while a CreateVolume is in flight (held at its first step): the call completes
/// with OK, new connections are refused meanwhile, the process exits cleanly, and the next
/// process has the volume.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_call_in_flight_finish() {
    bounded(async {
        let mut h = Harness::start(&[]).await;
        h.stop();
        h.env = vec![
            (
                "STOWAGE_TEST_STALL_AT".to_owned(),
                "create-after-intent".to_owned(),
            ),
            ("STOWAGE_TEST_STALL_MS".to_owned(), "1500".to_owned()),
        ];
        h.spawn().await;
        let ch = h.channel().await;
        let call = tokio::spawn(async move {
            let mut c = csi::controller_client::ControllerClient::new(ch);
            c.create_volume(create_req("in-flight", MIB)).await
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !h
            .log_since_spawn()
            .contains("STOWAGE_TEST_STALL_AT: stalling at create-after-intent")
        {
            assert!(Instant::now() < deadline, "the call never reached its stall");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pid = h.child.as_ref().unwrap().id();
        let sent = Instant::now();
        assert!(std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .unwrap()
            .success());
        // Draining: the socket is gone at once, so a new caller is told to come back.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match h.try_channel().await {
                Err(_) => break,
                Ok(_) => {
                    assert!(
                        Instant::now() < deadline,
                        "the draining driver still accepts connections"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        let created = call
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("the call in flight at SIGTERM failed: {e:?}"))
            .into_inner()
            .volume
            .unwrap();
        let status = h.wait_exit();
        let drained_in = sent.elapsed();
        assert!(status.success(), "exit after the drain: {status}");
        let log = h.log_since_spawn();
        assert!(
            log.contains("SIGTERM: draining") && log.contains("stopped"),
            "{log}"
        );
        assert!(
            drained_in >= Duration::from_millis(1000),
            "exited before the call was done ({drained_in:?})"
        );
        h.env.clear();
        h.spawn().await;
        let mut c = h.controller().await;
        let again = create_volume(&mut c, "in-flight", MIB).await;
        assert_eq!(again.volume_id, created.volume_id);
        assert!(h.pool_volumes().join(&created.volume_id).is_dir());
        loud!(
            "sigterm_lets_a_call_in_flight_finish: SIGTERM to exit with a 1.5 s call in flight: {} ms",
            drained_in.as_millis()
        );
        let pool = h.state_dir().join("pools/default");
        let id = created.volume_id.clone();
        assert_nothing_leaked(&h, &pool, &[&id], &[], "the end").await;
    })
    .await
}
