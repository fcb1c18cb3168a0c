//! `stowage bench soak`: many clients run mixed volume operations on a small set of shared
//! names for a while, every answer is checked against what the CSI spec allows for that call
//! in that state, and at the end the driver's volumes, snapshots and mounts must be exactly
//! what the calls that succeeded left; meanwhile the driver's RSS, open fds and the loop
//! devices attached are sampled, and must not grow.
//!
//! Names: per pool, `--names` volumes (`soak-<run>-<pool>-v<k>`), as many restored volumes
//! (`…-r<k>`, always created from a snapshot) and snapshots (`…-s<k>`). Each client picks an
//! operation and a name at random. A client holds the name's lock in its model during the
//! call, so the state the answer is judged against is known; the driver still sees the
//! same names from many clients (one after the other, and both halves of a "twin" call —
//! the same request sent twice at once on two connections, as a CO that lost track would),
//! and calls on related names at once (a snapshot of a volume being deleted or expanded, a
//! restore from a snapshot being deleted).
//!
//! The allowed answers (besides ABORTED, always allowed — the spec's "operation pending" —
//! and retried with a back-off until the call has a definite outcome):
//!
//! | call | state in the model | allowed |
//! |---|---|---|
//! | CreateVolume | absent | OK, RESOURCE_EXHAUSTED |
//! | CreateVolume | exists | OK |
//! | CreateVolume from snapshot | absent | OK, NOT_FOUND (snapshot gone), RESOURCE_EXHAUSTED |
//! | CreateVolume from snapshot | exists | OK (same snapshot), ALREADY_EXISTS (another) |
//! | DeleteVolume | absent | OK |
//! | DeleteVolume | exists | OK, FAILED_PRECONDITION (staged, published or being snapshotted) |
//! | ControllerExpandVolume | absent | NOT_FOUND |
//! | ControllerExpandVolume | exists | OK, RESOURCE_EXHAUSTED, OUT_OF_RANGE |
//! | NodeExpandVolume | staged | OK |
//! | NodeStageVolume | absent | NOT_FOUND |
//! | NodeStageVolume | exists | OK |
//! | NodeUnstageVolume | absent | OK, NOT_FOUND |
//! | NodeUnstageVolume | published | FAILED_PRECONDITION |
//! | NodeUnstageVolume | exists, not published | OK |
//! | NodePublishVolume | absent | NOT_FOUND |
//! | NodePublishVolume | exists, not staged | FAILED_PRECONDITION |
//! | NodePublishVolume | staged | OK |
//! | NodeUnpublishVolume | absent | OK, NOT_FOUND |
//! | NodeUnpublishVolume | exists | OK |
//! | NodeGetVolumeStats | staged | OK |
//! | NodeGetVolumeStats | absent or not staged | NOT_FOUND |
//! | CreateSnapshot | absent | OK, NOT_FOUND (source gone), RESOURCE_EXHAUSTED |
//! | CreateSnapshot | exists | OK (same source), ALREADY_EXISTS (another source) |
//! | DeleteSnapshot | absent | OK |
//! | DeleteSnapshot | exists | OK, FAILED_PRECONDITION (in use) |
//!
//! A write goes through the published path: a file of the client's is written, synced and
//! read back.
//!
//! The run stops at `--duration` or after `--ops` operations, whichever comes first; then
//! the end state is checked (ListVolumes and ListSnapshots equal the model's sets; the
//! mounts under `--target-dir` are the model's staging and publish paths), everything is
//! undone, and the samples are checked: open fds and loop devices back to where they were
//! before the run (within `--fd-slack`), RSS no more than `--rss-slack` above its level
//! after the warm-up (the first fifth of the run). The driver must be this run's alone:
//! every volume and snapshot it lists is compared with the model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::node_client::NodeClient;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_csi::v1::{self as csi};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::driver::mount_capability;
use super::rss::read_rss;
use crate::args::{parse_kv, OutputFormat};
use crate::exit;
use crate::output::write_json;
use crate::rpc::{request, unary};
use crate::size::{parse_duration, parse_size_i64};

/// Arguments of `stowage bench soak`.
#[derive(Debug, Clone, Args)]
#[command(after_help = exit::HELP)]
pub struct SoakArgs {
    /// CSI endpoint [default: `stowage bench --endpoint`].
    #[arg(long)]
    pub endpoint: Option<String>,

    /// A pool to run on, as NAME=SIZE (the size of its volumes, e.g. img=64Mi); repeatable.
    /// Volumes are created with the parameter pool=NAME.
    #[arg(long = "pool", required = true, value_parser = parse_kv, value_name = "NAME=SIZE")]
    pub pools: Vec<(String, String)>,

    /// A pool whose volumes are never expanded (e.g. an `image` pool of ext4 volumes where
    /// the driver lacks CAP_SYS_RESOURCE, which growing a mounted ext4 needs); repeatable.
    #[arg(long = "no-expand", value_name = "NAME")]
    pub no_expand: Vec<String>,

    /// Clients running operations at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub clients: u64,

    /// Volume names per pool (and as many restored volumes and snapshots): fewer names, more
    /// contention.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub names: u64,

    /// Stop after this long (e.g. 90s, 20m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Stop after this many operations (whichever comes first).
    #[arg(long, default_value_t = u64::MAX)]
    pub ops: u64,

    /// Directory for staging and target paths, under the driver's kubelet directory.
    #[arg(long, value_name = "DIR")]
    pub target_dir: PathBuf,

    /// PID of the driver: its RSS and open fds are sampled.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Count only the loop devices whose backing file lies under this directory (the pools'),
    /// so that another user of loop devices on the machine does not count [default: all].
    #[arg(long, value_name = "DIR")]
    pub loops_under: Option<PathBuf>,

    /// Time between samples.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub sample_every: Duration,

    /// Open fds of the driver after cleanup may exceed those before the run by this many.
    #[arg(long, default_value_t = 8)]
    pub fd_slack: u64,

    /// RSS at the end may exceed the RSS after the warm-up by this much.
    #[arg(long, default_value = "64Mi", value_parser = parse_size_i64)]
    pub rss_slack: i64,

    /// Deadline of each RPC.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Output format of the report.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// What the model believes of a volume name.
#[derive(Debug, Clone, Default)]
struct Vol {
    /// Some: it exists, with this id.
    id: Option<String>,
    capacity: i64,
    staged: bool,
    published: bool,
    /// A restored volume: the id of the snapshot it was made from.
    source: Option<String>,
}

impl Vol {
    /// The volume's id, or, for a name the model believes absent, an id of the driver's shape
    /// that it never minted (the call must then answer as for an unknown volume).
    fn id_or_unknown(&self, rng: &mut Rng) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("stw-{:032x}", rng.next()))
    }
}

/// What the model believes of a snapshot name.
#[derive(Debug, Clone, Default)]
struct Snap {
    id: Option<String>,
    source_volume: String,
}

struct Pool {
    name: String,
    size: i64,
    expand: bool,
    vols: Vec<String>,
    restores: Vec<String>,
    snaps: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Delete,
    Stage,
    Unstage,
    Publish,
    Unpublish,
    Write,
    Expand,
    Stats,
    Snapshot,
    DeleteSnapshot,
    Restore,
}

/// Relative frequency of each operation.
const MIX: [(Op, u32); 12] = [
    (Op::Create, 4),
    (Op::Delete, 2),
    (Op::Stage, 4),
    (Op::Unstage, 2),
    (Op::Publish, 4),
    (Op::Unpublish, 2),
    (Op::Write, 4),
    (Op::Expand, 1),
    (Op::Stats, 1),
    (Op::Snapshot, 2),
    (Op::DeleteSnapshot, 1),
    (Op::Restore, 2),
];

/// A small xorshift generator: the soak needs cheap, not cryptographic, choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct Shared {
    channels: Vec<Channel>,
    timeout: Duration,
    target_dir: PathBuf,
    pools: Vec<Pool>,
    vols: HashMap<String, Mutex<Vol>>,
    snaps: HashMap<String, Mutex<Snap>>,
    /// (call, code) → count.
    codes: StdMutex<BTreeMap<(String, String), u64>>,
    /// Answers the table does not allow, described.
    violations: StdMutex<Vec<String>>,
    issued: AtomicU64,
    done: AtomicU64,
    stop: AtomicBool,
}

fn code_name(c: Code) -> String {
    format!("{c:?}")
}

impl Shared {
    fn controller(&self, c: usize) -> ControllerClient<Channel> {
        ControllerClient::new(self.channels[c % self.channels.len()].clone())
    }
    fn node(&self, c: usize) -> NodeClient<Channel> {
        NodeClient::new(self.channels[c % self.channels.len()].clone())
    }

    fn staging(&self, vol: &str) -> PathBuf {
        self.target_dir.join(vol).join("staging")
    }
    fn target(&self, vol: &str) -> PathBuf {
        self.target_dir.join(vol).join("pub")
    }

    /// Counts an answer and records it as a violation unless `allowed` has its code.
    fn judge<T>(&self, call: &str, state: &str, r: &Result<T, Status>, allowed: &[Code]) {
        let code = match r {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        *self
            .codes
            .lock()
            .unwrap()
            .entry((call.to_owned(), code_name(code)))
            .or_default() += 1;
        if code != Code::Aborted && !allowed.contains(&code) {
            let msg = r
                .as_ref()
                .err()
                .map(|s| s.message().to_owned())
                .unwrap_or_default();
            self.violations.lock().unwrap().push(format!(
                "{call} ({state}): {code:?} not in {allowed:?}: {msg}"
            ));
        }
    }
}

/// Calls `f` until its answer is not ABORTED (at most 50 times, backing off), judging every
/// answer; the last answer is returned.
async fn settle<T, F, Fut>(
    s: &Shared,
    call: &str,
    state: &str,
    allowed: &[Code],
    mut f: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut wait = Duration::from_millis(10);
    let mut tries = 0;
    loop {
        let r = f().await;
        s.judge(call, state, &r, allowed);
        tries += 1;
        match &r {
            Err(e) if e.code() == Code::Aborted && tries < 50 => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            }
            _ => return r,
        }
    }
}

/// The same call twice at once (a "twin"), or once; both answers judged. Returns whether
/// one succeeded, and its value.
async fn maybe_twin<T, F, Fut>(
    s: &Shared,
    twin: bool,
    call: &str,
    state: &str,
    allowed: &[Code],
    f: F,
) -> Option<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    if twin {
        let (a, b) = tokio::join!(
            settle(s, call, state, allowed, || f(0)),
            settle(s, call, state, allowed, || f(1))
        );
        a.ok().or(b.ok())
    } else {
        settle(s, call, state, allowed, || f(0)).await.ok()
    }
}

fn cap() -> csi::VolumeCapability {
    mount_capability(Mode::SingleNodeWriter as i32, None)
}

async fn one_op(s: &Shared, client: usize, rng: &mut Rng) {
    let total: u32 = MIX.iter().map(|(_, w)| w).sum();
    let mut pick = (rng.next() % u64::from(total)) as u32;
    let op = MIX
        .iter()
        .find(|(_, w)| {
            if pick < *w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .map(|(op, _)| *op)
        .unwrap_or(Op::Create);
    let pool = &s.pools[rng.below(s.pools.len())];
    let twin = rng.below(4) == 0;
    let t = s.timeout;
    // Restored volumes take every volume operation but Create (they are made by Restore).
    let any_vol = |rng: &mut Rng| {
        if rng.below(3) == 0 {
            pool.restores[rng.below(pool.restores.len())].clone()
        } else {
            pool.vols[rng.below(pool.vols.len())].clone()
        }
    };
    match op {
        Op::Create => {
            let name = pool.vols[rng.below(pool.vols.len())].clone();
            let mut v = s.vols[&name].lock().await;
            let (state, allowed): (&str, &[Code]) = if v.id.is_some() {
                ("exists", &[Code::Ok])
            } else {
                ("absent", &[Code::Ok, Code::ResourceExhausted])
            };
            let req = csi::CreateVolumeRequest {
                name: name.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: pool.size,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap()],
                parameters: [("pool".to_owned(), pool.name.clone())].into(),
                ..Default::default()
            };
            let got =
                maybe_twin(s, twin, "CreateVolume", state, allowed, |i| {
                    let req = req.clone();
                    async move {
                        unary(t, s.controller(client + i).create_volume(request(req, t))).await
                    }
                })
                .await;
            if let Some(vol) = got.and_then(|r| r.volume) {
                check_same_id(s, "CreateVolume", &name, &v.id, &vol.volume_id);
                if v.id.is_none() {
                    v.capacity = vol.capacity_bytes;
                }
                v.id = Some(vol.volume_id);
            }
        }
        Op::Restore => {
            let name = pool.restores[rng.below(pool.restores.len())].clone();
            let snap_name = pool.snaps[rng.below(pool.snaps.len())].clone();
            let snap_id = s.snaps[&snap_name].lock().await.id.clone();
            let Some(snap_id) = snap_id else { return };
            let mut v = s.vols[&name].lock().await;
            let (state, allowed): (&str, &[Code]) = match &v.source {
                Some(src) if v.id.is_some() && *src == snap_id => {
                    ("exists, same snapshot", &[Code::Ok])
                }
                _ if v.id.is_some() => ("exists, another snapshot", &[Code::AlreadyExists]),
                _ => (
                    "absent",
                    &[Code::Ok, Code::NotFound, Code::ResourceExhausted],
                ),
            };
            let req = csi::CreateVolumeRequest {
                name: name.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: pool.size,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap()],
                parameters: [("pool".to_owned(), pool.name.clone())].into(),
                volume_content_source: Some(csi::VolumeContentSource {
                    r#type: Some(csi::volume_content_source::Type::Snapshot(
                        csi::volume_content_source::SnapshotSource {
                            snapshot_id: snap_id.clone(),
                        },
                    )),
                }),
                ..Default::default()
            };
            let got =
                maybe_twin(s, twin, "CreateVolume(snapshot)", state, allowed, |i| {
                    let req = req.clone();
                    async move {
                        unary(t, s.controller(client + i).create_volume(request(req, t))).await
                    }
                })
                .await;
            if let Some(vol) = got.and_then(|r| r.volume) {
                check_same_id(s, "CreateVolume(snapshot)", &name, &v.id, &vol.volume_id);
                if v.id.is_none() {
                    v.capacity = vol.capacity_bytes;
                    v.source = Some(snap_id);
                }
                v.id = Some(vol.volume_id);
            }
        }
        Op::Delete => {
            let name = any_vol(rng);
            let mut v = s.vols[&name].lock().await;
            let Some(id) = v.id.clone() else {
                let id = format!("stw-{:032x}", rng.next());
                // A volume that does not exist: deleting it is OK.
                settle(s, "DeleteVolume", "absent", &[Code::Ok], || {
                    let id = id.clone();
                    async move {
                        unary(
                            t,
                            s.controller(client).delete_volume(request(
                                csi::DeleteVolumeRequest {
                                    volume_id: id,
                                    ..Default::default()
                                },
                                t,
                            )),
                        )
                        .await
                    }
                })
                .await
                .ok();
                return;
            };
            let (state, allowed): (&str, &[Code]) = if v.staged || v.published {
                ("in use", &[Code::FailedPrecondition])
            } else {
                ("exists", &[Code::Ok, Code::FailedPrecondition])
            };
            let got = maybe_twin(s, twin, "DeleteVolume", state, allowed, |i| {
                let id = id.clone();
                async move {
                    unary(
                        t,
                        s.controller(client + i).delete_volume(request(
                            csi::DeleteVolumeRequest {
                                volume_id: id,
                                ..Default::default()
                            },
                            t,
                        )),
                    )
                    .await
                }
            })
            .await;
            if got.is_some() {
                *v = Vol::default();
            }
        }
        Op::Stage => {
            let name = any_vol(rng);
            let mut v = s.vols[&name].lock().await;
            let id = v.id_or_unknown(rng);
            let (state, allowed): (&str, &[Code]) = if v.id.is_some() {
                ("exists", &[Code::Ok])
            } else {
                ("absent", &[Code::NotFound])
            };
            let staging = s.staging(&name).display().to_string();
            let got = maybe_twin(s, twin, "NodeStageVolume", state, allowed, |i| {
                let req = csi::NodeStageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: staging.clone(),
                    volume_capability: Some(cap()),
                    ..Default::default()
                };
                async move { unary(t, s.node(client + i).node_stage_volume(request(req, t))).await }
            })
            .await;
            if got.is_some() && v.id.is_some() {
                v.staged = true;
            }
        }
        Op::Unstage => {
            let name = any_vol(rng);
            let mut v = s.vols[&name].lock().await;
            let id = v.id_or_unknown(rng);
            let (state, allowed): (&str, &[Code]) = match (&v.id, v.published) {
                (None, _) => ("absent", &[Code::Ok, Code::NotFound]),
                (Some(_), true) => ("published", &[Code::FailedPrecondition]),
                (Some(_), false) => ("exists", &[Code::Ok]),
            };
            let staging = s.staging(&name).display().to_string();
            let got =
                maybe_twin(s, twin, "NodeUnstageVolume", state, allowed, |i| {
                    let req = csi::NodeUnstageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging.clone(),
                    };
                    async move {
                        unary(t, s.node(client + i).node_unstage_volume(request(req, t))).await
                    }
                })
                .await;
            if got.is_some() {
                v.staged = false;
            }
        }
        Op::Publish => {
            let name = any_vol(rng);
            let mut v = s.vols[&name].lock().await;
            let id = v.id_or_unknown(rng);
            let (state, allowed): (&str, &[Code]) = match (&v.id, v.staged) {
                (None, _) => ("absent", &[Code::NotFound]),
                (Some(_), false) => ("not staged", &[Code::FailedPrecondition]),
                (Some(_), true) => ("staged", &[Code::Ok]),
            };
            let staging = s.staging(&name).display().to_string();
            let target = s.target(&name).display().to_string();
            let got =
                maybe_twin(s, twin, "NodePublishVolume", state, allowed, |i| {
                    let req = csi::NodePublishVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging.clone(),
                        target_path: target.clone(),
                        volume_capability: Some(cap()),
                        ..Default::default()
                    };
                    async move {
                        unary(t, s.node(client + i).node_publish_volume(request(req, t))).await
                    }
                })
                .await;
            if got.is_some() && v.id.is_some() {
                v.published = true;
            }
        }
        Op::Unpublish => {
            let name = any_vol(rng);
            let mut v = s.vols[&name].lock().await;
            let id = v.id_or_unknown(rng);
            let (state, allowed): (&str, &[Code]) = if v.id.is_some() {
                ("exists", &[Code::Ok])
            } else {
                ("absent", &[Code::Ok, Code::NotFound])
            };
            let target = s.target(&name).display().to_string();
            let got =
                maybe_twin(s, twin, "NodeUnpublishVolume", state, allowed, |i| {
                    let req = csi::NodeUnpublishVolumeRequest {
                        volume_id: id.clone(),
                        target_path: target.clone(),
                    };
                    async move {
                        unary(t, s.node(client + i).node_unpublish_volume(request(req, t))).await
                    }
                })
                .await;
            if got.is_some() {
                v.published = false;
            }
        }
        Op::Write => {
            let name = any_vol(rng);
            let v = s.vols[&name].lock().await;
            if !v.published {
                return;
            }
            let file = s.target(&name).join(format!("client-{client}"));
            let data: Vec<u8> = (0..64 * 1024)
                .map(|i| (i as u64 ^ rng.next()) as u8)
                .collect();
            let r = write_read_back(&file, &data);
            let code = if r.is_ok() { Code::Ok } else { Code::Internal };
            *s.codes
                .lock()
                .unwrap()
                .entry(("write".to_owned(), code_name(code)))
                .or_default() += 1;
            if let Err(e) = r {
                s.violations
                    .lock()
                    .unwrap()
                    .push(format!("write to {}: {e}", file.display()));
            }
        }
        Op::Expand => {
            if !pool.expand {
                return;
            }
            let name = any_vol(rng);
            let mut v = s.vols[&name].lock().await;
            let id = v.id_or_unknown(rng);
            // At most four times the pool's size, in steps of a quarter of it.
            let want = (v.capacity + pool.size / 4).min(pool.size * 4);
            let (state, allowed): (&str, &[Code]) = if v.id.is_some() {
                (
                    "exists",
                    &[Code::Ok, Code::ResourceExhausted, Code::OutOfRange],
                )
            } else {
                ("absent", &[Code::NotFound])
            };
            let req = csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: want.max(pool.size),
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap()),
                ..Default::default()
            };
            let got = settle(s, "ControllerExpandVolume", state, allowed, || {
                let req = req.clone();
                async move {
                    unary(
                        t,
                        s.controller(client)
                            .controller_expand_volume(request(req, t)),
                    )
                    .await
                }
            })
            .await;
            let Ok(resp) = got else { return };
            if v.id.is_none() {
                return;
            }
            v.capacity = resp.capacity_bytes.max(v.capacity);
            if resp.node_expansion_required && v.staged {
                let req = csi::NodeExpandVolumeRequest {
                    volume_id: id,
                    volume_path: s.staging(&name).display().to_string(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: resp.capacity_bytes,
                        limit_bytes: 0,
                    }),
                    staging_target_path: s.staging(&name).display().to_string(),
                    volume_capability: Some(cap()),
                    ..Default::default()
                };
                settle(s, "NodeExpandVolume", "staged", &[Code::Ok], || {
                    let req = req.clone();
                    async move { unary(t, s.node(client).node_expand_volume(request(req, t))).await }
                })
                .await
                .ok();
            }
        }
        Op::Stats => {
            let name = any_vol(rng);
            let v = s.vols[&name].lock().await;
            let id = v.id_or_unknown(rng);
            let (state, allowed): (&str, &[Code]) = if v.id.is_some() && v.staged {
                ("staged", &[Code::Ok])
            } else {
                ("not staged", &[Code::NotFound])
            };
            let req = csi::NodeGetVolumeStatsRequest {
                volume_id: id,
                volume_path: s.staging(&name).display().to_string(),
                staging_target_path: String::new(),
            };
            settle(s, "NodeGetVolumeStats", state, allowed, || {
                let req = req.clone();
                async move { unary(t, s.node(client).node_get_volume_stats(request(req, t))).await }
            })
            .await
            .ok();
        }
        Op::Snapshot => {
            let name = pool.snaps[rng.below(pool.snaps.len())].clone();
            let source_name = any_vol(rng);
            let source = s.vols[&source_name].lock().await.id.clone();
            let Some(source) = source else { return };
            let mut sn = s.snaps[&name].lock().await;
            let (state, allowed): (&str, &[Code]) = match &sn.id {
                Some(_) if sn.source_volume == source => ("exists, same source", &[Code::Ok]),
                Some(_) => ("exists, another source", &[Code::AlreadyExists]),
                None => (
                    "absent",
                    &[Code::Ok, Code::NotFound, Code::ResourceExhausted],
                ),
            };
            let got =
                maybe_twin(s, twin, "CreateSnapshot", state, allowed, |i| {
                    let req = csi::CreateSnapshotRequest {
                        source_volume_id: source.clone(),
                        name: name.clone(),
                        ..Default::default()
                    };
                    async move {
                        unary(t, s.controller(client + i).create_snapshot(request(req, t))).await
                    }
                })
                .await;
            if let Some(snap) = got.and_then(|r| r.snapshot) {
                check_same_id(s, "CreateSnapshot", &name, &sn.id, &snap.snapshot_id);
                if sn.id.is_none() {
                    sn.source_volume = source;
                }
                sn.id = Some(snap.snapshot_id);
            }
        }
        Op::DeleteSnapshot => {
            let name = pool.snaps[rng.below(pool.snaps.len())].clone();
            let mut sn = s.snaps[&name].lock().await;
            let Some(id) = sn.id.clone() else { return };
            let got = maybe_twin(
                s,
                twin,
                "DeleteSnapshot",
                "exists",
                &[Code::Ok, Code::FailedPrecondition],
                |i| {
                    let req = csi::DeleteSnapshotRequest {
                        snapshot_id: id.clone(),
                        ..Default::default()
                    };
                    async move {
                        unary(t, s.controller(client + i).delete_snapshot(request(req, t))).await
                    }
                },
            )
            .await;
            if got.is_some() {
                *sn = Snap::default();
            }
        }
    }
}

/// A successful create of a name the model has must answer the same id.
fn check_same_id(s: &Shared, call: &str, name: &str, known: &Option<String>, got: &str) {
    if let Some(known) = known {
        if known != got {
            s.violations.lock().unwrap().push(format!(
                "{call} {name}: answered id {got}, but it was created as {known}"
            ));
        }
    }
}

fn write_read_back(file: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Read;
    {
        let mut f = std::fs::File::create(file)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    let mut back = Vec::with_capacity(data.len());
    std::fs::File::open(file)?.read_to_end(&mut back)?;
    if back != data {
        return Err(std::io::Error::other(
            "read back differs from what was written",
        ));
    }
    Ok(())
}

/// One sample of the driver's resources.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    at_s: f64,
    ops: u64,
    rss_bytes: Option<u64>,
    fds: Option<u64>,
    loops: u64,
}

fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// Loop devices attached (with a backing file), only those backed by a file under `under`
/// when given.
fn loops_attached(under: Option<&Path>) -> u64 {
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
                .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
                .filter(|backing| {
                    under.is_none_or(|u| Path::new(backing.trim_end()).starts_with(u))
                })
                .count() as u64
        })
        .unwrap_or(0)
}

fn sample(pid: Option<u32>, loops_under: Option<&Path>, start: Instant, ops: u64) -> Sample {
    Sample {
        at_s: start.elapsed().as_secs_f64(),
        ops,
        rss_bytes: pid.and_then(|p| read_rss(p).ok()),
        fds: pid.and_then(fd_count),
        loops: loops_attached(loops_under),
    }
}

/// Mount points under `dir`, from this process's mount table.
fn mounts_under(dir: &Path) -> BTreeSet<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

#[derive(Debug, Serialize)]
struct Report {
    duration_s: f64,
    ops: u64,
    ops_per_s: f64,
    clients: u64,
    pools: Vec<String>,
    codes: BTreeMap<String, BTreeMap<String, u64>>,
    samples: Vec<Sample>,
    violations: Vec<String>,
    end_state: Vec<String>,
    leaks: Vec<String>,
    cleanup: Vec<String>,
    passed: bool,
}

async fn list_volume_ids(s: &Shared) -> Result<BTreeSet<String>, Status> {
    let mut ids = BTreeSet::new();
    let mut token = String::new();
    loop {
        let r = unary(
            s.timeout,
            s.controller(0).list_volumes(request(
                csi::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: token.clone(),
                },
                s.timeout,
            )),
        )
        .await?;
        ids.extend(
            r.entries
                .into_iter()
                .filter_map(|e| e.volume.map(|v| v.volume_id)),
        );
        if r.next_token.is_empty() {
            return Ok(ids);
        }
        token = r.next_token;
    }
}

async fn list_snapshot_ids(s: &Shared) -> Result<BTreeSet<String>, Status> {
    let mut ids = BTreeSet::new();
    let mut token = String::new();
    loop {
        let r = unary(
            s.timeout,
            s.controller(0).list_snapshots(request(
                csi::ListSnapshotsRequest {
                    starting_token: token.clone(),
                    ..Default::default()
                },
                s.timeout,
            )),
        )
        .await?;
        ids.extend(
            r.entries
                .into_iter()
                .filter_map(|e| e.snapshot.map(|v| v.snapshot_id)),
        );
        if r.next_token.is_empty() {
            return Ok(ids);
        }
        token = r.next_token;
    }
}

/// Compares the driver's volumes, snapshots and mounts with the model.
async fn check_end_state(s: &Shared) -> Vec<String> {
    let mut problems = Vec::new();
    let mut want_vols = BTreeSet::new();
    let mut want_mounts = BTreeSet::new();
    for (name, v) in &s.vols {
        let v = v.lock().await;
        if let Some(id) = &v.id {
            want_vols.insert(id.clone());
        }
        if v.staged {
            want_mounts.insert(s.staging(name));
        }
        if v.published {
            want_mounts.insert(s.target(name));
        }
    }
    let mut want_snaps = BTreeSet::new();
    for sn in s.snaps.values() {
        if let Some(id) = &sn.lock().await.id {
            want_snaps.insert(id.clone());
        }
    }
    match list_volume_ids(s).await {
        Ok(got) if got == want_vols => {}
        Ok(got) => problems.push(format!(
            "ListVolumes: driver has {} volumes, the model {}; only the driver: {:?}; only the model: {:?}",
            got.len(),
            want_vols.len(),
            got.difference(&want_vols).collect::<Vec<_>>(),
            want_vols.difference(&got).collect::<Vec<_>>()
        )),
        Err(e) => problems.push(format!("ListVolumes failed: {e}")),
    }
    match list_snapshot_ids(s).await {
        Ok(got) if got == want_snaps => {}
        Ok(got) => problems.push(format!(
            "ListSnapshots: only the driver: {:?}; only the model: {:?}",
            got.difference(&want_snaps).collect::<Vec<_>>(),
            want_snaps.difference(&got).collect::<Vec<_>>()
        )),
        Err(e) => problems.push(format!("ListSnapshots failed: {e}")),
    }
    let got = mounts_under(&s.target_dir);
    if got != want_mounts {
        problems.push(format!(
            "mounts: only in the mount table: {:?}; only in the model: {:?}",
            got.difference(&want_mounts).collect::<Vec<_>>(),
            want_mounts.difference(&got).collect::<Vec<_>>()
        ));
    }
    problems
}

/// Undoes everything the model says exists; returns what could not be undone.
async fn cleanup(s: &Shared) -> Vec<String> {
    let t = s.timeout;
    let mut left = Vec::new();
    async fn again<T, F, Fut>(mut f: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut last = None;
        for _ in 0..20 {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if matches!(e.code(), Code::Aborted | Code::FailedPrecondition) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Status::unknown("no attempt")))
    }
    for (name, v) in &s.vols {
        let mut v = v.lock().await;
        let Some(id) = v.id.clone() else { continue };
        if v.published {
            let req = csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: s.target(name).display().to_string(),
            };
            if let Err(e) = again(|| {
                let req = req.clone();
                async move { unary(t, s.node(0).node_unpublish_volume(request(req, t))).await }
            })
            .await
            {
                left.push(format!("unpublish {name}: {e}"));
            }
            v.published = false;
        }
        if v.staged {
            let req = csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: s.staging(name).display().to_string(),
            };
            if let Err(e) = again(|| {
                let req = req.clone();
                async move { unary(t, s.node(0).node_unstage_volume(request(req, t))).await }
            })
            .await
            {
                left.push(format!("unstage {name}: {e}"));
            }
            v.staged = false;
        }
    }
    for (name, sn) in &s.snaps {
        let mut sn = sn.lock().await;
        let Some(id) = sn.id.clone() else { continue };
        let req = csi::DeleteSnapshotRequest {
            snapshot_id: id,
            ..Default::default()
        };
        match again(|| {
            let req = req.clone();
            async move { unary(t, s.controller(0).delete_snapshot(request(req, t))).await }
        })
        .await
        {
            Ok(_) => *sn = Snap::default(),
            Err(e) => left.push(format!("delete snapshot {name}: {e}")),
        }
    }
    for (name, v) in &s.vols {
        let mut v = v.lock().await;
        let Some(id) = v.id.clone() else { continue };
        let req = csi::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        };
        match again(|| {
            let req = req.clone();
            async move { unary(t, s.controller(0).delete_volume(request(req, t))).await }
        })
        .await
        {
            Ok(_) => *v = Vol::default(),
            Err(e) => left.push(format!("delete volume {name}: {e}")),
        }
    }
    left
}

pub(super) async fn run(
    args: &SoakArgs,
    endpoint: &str,
    cancel: &super::CancelToken,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> u8 {
    let mut channels = Vec::new();
    for _ in 0..2 {
        match crate::endpoint::connect(endpoint).await {
            Ok(c) => channels.push(c),
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                return exit::CONNECT;
            }
        }
    }
    let tag = super::random_tag();
    let mut pools = Vec::new();
    let mut vols = HashMap::new();
    let mut snaps = HashMap::new();
    for (name, size) in &args.pools {
        let size = match parse_size_i64(size) {
            Ok(s) => s,
            Err(e) => {
                let _ = writeln!(err, "error: --pool {name}={size}: {e}");
                return exit::USAGE;
            }
        };
        let names = |kind: &str| -> Vec<String> {
            (0..args.names)
                .map(|k| format!("soak-{tag}-{name}-{kind}{k}"))
                .collect()
        };
        let p = Pool {
            name: name.clone(),
            size,
            expand: !args.no_expand.contains(name),
            vols: names("v"),
            restores: names("r"),
            snaps: names("s"),
        };
        for v in p.vols.iter().chain(&p.restores) {
            vols.insert(v.clone(), Mutex::new(Vol::default()));
            if let Err(e) = std::fs::create_dir_all(args.target_dir.join(v).join("staging")) {
                let _ = writeln!(err, "error: creating the staging directory of {v}: {e}");
                return exit::LOCAL_ERROR;
            }
        }
        for sn in &p.snaps {
            snaps.insert(sn.clone(), Mutex::new(Snap::default()));
        }
        pools.push(p);
    }
    let shared = Arc::new(Shared {
        channels,
        timeout: args.timeout,
        target_dir: args.target_dir.clone(),
        pools,
        vols,
        snaps,
        codes: StdMutex::default(),
        violations: StdMutex::default(),
        issued: AtomicU64::new(0),
        done: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let start = Instant::now();
    let under = args.loops_under.clone();
    let before = sample(args.pid, under.as_deref(), start, 0);
    let samples = Arc::new(StdMutex::new(vec![before.clone()]));
    let sampler = {
        let (samples, shared, pid, every, under) = (
            Arc::clone(&samples),
            Arc::clone(&shared),
            args.pid,
            args.sample_every,
            under.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                let s = sample(
                    pid,
                    under.as_deref(),
                    start,
                    shared.done.load(Ordering::Relaxed),
                );
                samples.lock().unwrap().push(s);
            }
        })
    };
    let mut workers = Vec::new();
    for client in 0..args.clients as usize {
        let (shared, cancel) = (Arc::clone(&shared), cancel.clone());
        let (ops, duration) = (args.ops, args.duration);
        let seed = u64::from_str_radix(&tag, 16).unwrap_or(7) ^ ((client as u64 + 1) << 32);
        workers.push(tokio::spawn(async move {
            let mut rng = Rng::new(seed);
            loop {
                if cancel.is_cancelled()
                    || start.elapsed() >= duration
                    || shared.issued.fetch_add(1, Ordering::Relaxed) >= ops
                {
                    return;
                }
                one_op(&shared, client, &mut rng).await;
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in workers {
        if let Err(e) = w.await {
            shared
                .violations
                .lock()
                .unwrap()
                .push(format!("a client panicked: {e}"));
        }
    }
    let elapsed = start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    sampler.abort();
    let ops = shared.done.load(Ordering::Relaxed);
    let end_run = sample(args.pid, under.as_deref(), start, ops);
    let end_state = check_end_state(&shared).await;
    let left = cleanup(&shared).await;
    // Let the driver close what the last calls used before the final count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = sample(args.pid, under.as_deref(), start, ops);
    let mut samples = std::mem::take(&mut *samples.lock().unwrap());
    samples.push(end_run);
    samples.push(after.clone());

    let mut leaks = Vec::new();
    if let (Some(b), Some(a)) = (before.fds, after.fds) {
        if a > b + args.fd_slack {
            leaks.push(format!(
                "open fds: {b} before the run, {a} after cleanup (slack {})",
                args.fd_slack
            ));
        }
    }
    if after.loops != before.loops {
        leaks.push(format!(
            "loop devices attached: {} before the run, {} after cleanup",
            before.loops, after.loops
        ));
    }
    // RSS after the warm-up (the first fifth of the run) against the end of the run.
    let warm_at = elapsed.as_secs_f64() / 5.0;
    let warm = samples
        .iter()
        .find(|s| s.at_s >= warm_at)
        .and_then(|s| s.rss_bytes);
    if let (Some(w), Some(a)) = (warm, after.rss_bytes) {
        if a > w + args.rss_slack as u64 {
            leaks.push(format!(
                "RSS: {} MiB after the warm-up, {} MiB at the end (slack {} MiB)",
                w >> 20,
                a >> 20,
                args.rss_slack >> 20
            ));
        }
    }
    let mut codes: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for ((call, code), n) in shared.codes.lock().unwrap().iter() {
        codes
            .entry(call.clone())
            .or_default()
            .insert(code.clone(), *n);
    }
    let violations = std::mem::take(&mut *shared.violations.lock().unwrap());
    let passed =
        violations.is_empty() && end_state.is_empty() && leaks.is_empty() && left.is_empty();
    let report = Report {
        duration_s: elapsed.as_secs_f64(),
        ops,
        ops_per_s: ops as f64 / elapsed.as_secs_f64().max(1e-9),
        clients: args.clients,
        pools: args.pools.iter().map(|(n, _)| n.clone()).collect(),
        codes,
        samples,
        violations,
        end_state,
        leaks,
        cleanup: left,
        passed,
    };
    let written = match args.output {
        OutputFormat::Json => serde_json::to_value(&report)
            .map_err(std::io::Error::other)
            .and_then(|v| write_json(out, &v)),
        OutputFormat::Table => write_report(out, &report),
    };
    if let Err(e) = written {
        let _ = writeln!(err, "error: writing the report: {e}");
        return exit::LOCAL_ERROR;
    }
    if !report.cleanup.is_empty() {
        exit::BENCH_CLEANUP_INCOMPLETE
    } else if cancel.is_cancelled() {
        exit::INTERRUPTED
    } else if !report.passed {
        exit::BENCH_OPS_FAILED
    } else {
        exit::SUCCESS
    }
}

fn write_report(out: &mut dyn Write, r: &Report) -> std::io::Result<()> {
    writeln!(
        out,
        "SOAK {} clients, pools {}: {} operations in {:.1} s ({:.1} ops/s)",
        r.clients,
        r.pools.join(","),
        r.ops,
        r.duration_s,
        r.ops_per_s
    )?;
    writeln!(
        out,
        "\nSAMPLES\n{:>8} {:>8} {:>10} {:>6} {:>6}",
        "t (s)", "ops", "RSS (MiB)", "fds", "loops"
    )?;
    let mib = |b: Option<u64>| b.map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0));
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    let n = r.samples.len();
    for (i, s) in r.samples.iter().enumerate() {
        let label = if i + 2 == n {
            " (end of run)"
        } else if i + 1 == n {
            " (after cleanup)"
        } else if i == 0 {
            " (before)"
        } else {
            ""
        };
        writeln!(
            out,
            "{:>8.1} {:>8} {:>10} {:>6} {:>6}{label}",
            s.at_s,
            s.ops,
            mib(s.rss_bytes),
            opt(s.fds),
            s.loops
        )?;
    }
    writeln!(out, "\nANSWERS")?;
    for (call, codes) in &r.codes {
        let list: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        writeln!(out, "{call:<24} {}", list.join(", "))?;
    }
    for (title, lines) in [
        ("ANSWERS THE SPEC DOES NOT ALLOW", &r.violations),
        ("END STATE DIFFERS FROM THE MODEL", &r.end_state),
        ("GROWTH", &r.leaks),
        ("CLEANUP INCOMPLETE", &r.cleanup),
    ] {
        if !lines.is_empty() {
            writeln!(out, "\n{title} ({})", lines.len())?;
            for l in lines.iter().take(50) {
                writeln!(out, "  {l}")?;
            }
        }
    }
    writeln!(
        out,
        "\nsoak: {}",
        if r.passed { "PASSED" } else { "FAILED" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_draws_every_operation() {
        let mut rng = Rng::new(42);
        let total: u32 = MIX.iter().map(|(_, w)| w).sum();
        let mut seen = BTreeSet::new();
        for _ in 0..10_000 {
            let mut pick = (rng.next() % u64::from(total)) as u32;
            for (i, (_, w)) in MIX.iter().enumerate() {
                if pick < *w {
                    seen.insert(i);
                    break;
                }
                pick -= w;
            }
        }
        assert_eq!(seen.len(), MIX.len());
    }

    #[test]
    fn judging_counts_answers_and_flags_what_the_table_refuses() {
        let s = Shared {
            channels: Vec::new(),
            timeout: Duration::from_secs(1),
            target_dir: PathBuf::from("/nowhere"),
            pools: Vec::new(),
            vols: HashMap::new(),
            snaps: HashMap::new(),
            codes: StdMutex::default(),
            violations: StdMutex::default(),
            issued: AtomicU64::new(0),
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        };
        s.judge::<()>("DeleteVolume", "exists", &Ok(()), &[Code::Ok]);
        s.judge::<()>(
            "DeleteVolume",
            "exists",
            &Err(Status::aborted("busy")),
            &[Code::Ok],
        );
        s.judge::<()>(
            "DeleteVolume",
            "exists",
            &Err(Status::internal("boom")),
            &[Code::Ok],
        );
        let codes = s.codes.lock().unwrap();
        assert_eq!(codes[&("DeleteVolume".to_owned(), "Ok".to_owned())], 1);
        assert_eq!(codes[&("DeleteVolume".to_owned(), "Aborted".to_owned())], 1);
        let v = s.violations.lock().unwrap();
        assert_eq!(v.len(), 1);
        assert!(v[0].contains("Internal") && v[0].contains("boom"), "{v:?}");
    }
}
