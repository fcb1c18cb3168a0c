//! `stowage bench`: load-test any CSI driver; `stowage bench scale`: how a driver behaves
//! as its number of volumes grows; `stowage bench floor`: the same kinds of operations as
//! raw syscalls, for comparison.
//!
//! ```text
//! stowage bench [--endpoint unix:///…]
//!               [--workload create-delete|publish-unpublish|snapshot|mixed|probe]
//!               [--count N] [--concurrency N] [--connections N] [--size 1Mi] [--param k=v]...
//!               [--pid DRIVER_PID] [--target-dir DIR] [--volume-id ID] [--output table|json]
//! stowage bench scale [--endpoint unix:///…] --steps N[,N…] [--probe-count 500] [--page-size 0]
//!               [--concurrency 16] [--size 1Mi] [--param k=v]... [--pid DRIVER_PID]
//!               [--output table|json] [--keep]
//! stowage bench floor [--count N] [--dir DIR] [--output table|json]
//! stowage bench soak --pool NAME=SIZE... --target-dir DIR [--clients 8] [--names 3]
//!               [--duration 60s] [--ops N] [--pid DRIVER_PID] [--sample-every 5s]
//!               [--fd-slack 8] [--rss-slack 64Mi] [--output table|json]
//! ```
//!
//! `soak` is described in its module.
//!
//! `scale` is described in its module; the rest of this text is about the plain bench.
//!
//! `--concurrency` workers pull operation numbers from a shared counter until `--count`
//! operations were issued; worker `w` uses connection `w % --connections`. Each worker keeps
//! its own latency samples, merged at the end, so recording costs no locking. Reported per
//! call type: p50/p90/p99/max latency (nearest rank) and calls per second of wall-clock run
//! time; with `--pid`, the driver's RSS before, after the run, and after cleanup.
//!
//! Workloads (an "operation" is the unit counted by `--count`):
//!
//! * `create-delete`: CreateVolume + DeleteVolume of a unique name (`bench-<random>-<i>`).
//! * `publish-unpublish`: setup creates the volumes to publish (or uses `--volume-id`),
//!   ControllerPublishVolume if the driver has PUBLISH_UNPUBLISH_VOLUME, and NodeStageVolume
//!   at `<target-dir>/staging` if it has STAGE_UNSTAGE_VOLUME; each operation is
//!   NodePublishVolume at `<target-dir>/pub-<i>` + NodeUnpublishVolume. Without
//!   `--volume-id`, one volume is created per worker (staged at `staging-<w>` when there
//!   are several), because the spec lets a driver refuse a second concurrent publication of
//!   a SINGLE_NODE_WRITER volume with FAILED_PRECONDITION.
//! * `snapshot`: CreateSnapshot + DeleteSnapshot on one source volume.
//! * `mixed`: operation `i` rotates through the workloads above that the driver supports.
//! * `probe`: two Identity `Probe` calls, the cheapest RPC a driver answers. One operation
//!   is two round trips, like a create-delete or publish-unpublish pair, so the rate of
//!   this workload at the same `--concurrency` is the transport floor those pairs are
//!   judged against: what gRPC over the socket and this client allow, with no work in the
//!   driver. Needs no setup and creates nothing.
//!
//! A driver may accept staging and target paths only under its kubelet directory (stowage
//! does). When it refuses the path the bench sent — at NodeStageVolume during setup or at
//! the first NodePublishVolume — the run stops and the error says to pass `--target-dir`
//! under that directory.
//!
//! Cleanup always runs, also after a failure or SIGINT/SIGTERM: no new operations are
//! started, in-flight ones finish, then everything in the registry is undone in reverse
//! order (unpublish, unstage, controller-unpublish, delete snapshots, delete volumes, remove
//! directories). A create whose outcome is unknown (its call timed out) stays registered by
//! name; cleanup repeats it, which the spec makes idempotent per name, to learn the ID and
//! delete it.

mod cancel;
mod driver;
mod floor;
mod progress;
mod registry;
mod rss;
mod scale;
mod soak;
mod stats;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

pub use cancel::CancelToken;
pub use soak::SoakArgs;

use crate::args::{parse_kv, AccessModeArg, OutputFormat};
use crate::exit;
use crate::secrets::{self, Secrets};
use crate::size::{parse_duration, parse_size_i64};

/// Drive CSI operations against a driver and report latency, throughput and memory.
#[derive(Debug, Clone, Args)]
#[command(after_help = exit::HELP)]
pub struct BenchArgs {
    /// `scale`: measure a driver as its volume count grows; `floor`: measure raw syscalls
    /// instead of a driver.
    #[command(subcommand)]
    pub command: Option<BenchCommand>,

    /// CSI endpoint: unix:///path/to/csi.sock, tcp://host:port or http://host:port.
    #[arg(long, env = "CSI_ENDPOINT", default_value = crate::ctl::DEFAULT_ENDPOINT)]
    pub endpoint: String,

    /// What each operation does.
    #[arg(long, value_enum, default_value_t = Workload::CreateDelete)]
    pub workload: Workload,

    /// Number of operations to run.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,

    /// Operations in flight at once (worker tasks).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub concurrency: u64,

    /// gRPC connections to spread the workers over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub connections: u64,

    /// Size of each created volume (bytes, Ki/Mi/Gi/Ti or K/M/G/T).
    #[arg(long, default_value = "1Mi", value_parser = parse_size_i64, value_name = "SIZE")]
    pub size: i64,

    /// CreateVolume parameter; repeatable. Nothing driver-specific is sent otherwise.
    #[arg(long = "param", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub params: Vec<(String, String)>,

    /// CreateSnapshot parameter; repeatable.
    #[arg(long = "snapshot-param", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub snapshot_params: Vec<(String, String)>,

    /// Access mode of the volume capability used for create and publish.
    #[arg(long = "access-mode", value_enum, default_value_t = AccessModeArg::SingleNodeWriter,
          value_name = "MODE")]
    pub access_mode: AccessModeArg,

    /// Filesystem type of the mount capability (empty = driver default).
    #[arg(long = "fs", value_name = "FSTYPE")]
    pub fs_type: Option<String>,

    /// Use this existing volume for publish-unpublish/snapshot instead of creating one; it
    /// is never deleted.
    #[arg(long, value_name = "ID")]
    pub volume_id: Option<String>,

    /// Directory for staging and target paths; must be visible to the driver at the same
    /// path, and under its kubelet directory if it has one (stowage's --kubelet-dir)
    /// [default: a new directory under the system temp dir].
    #[arg(long, value_name = "DIR")]
    pub target_dir: Option<PathBuf>,

    /// PID of the driver, to report its RSS (VmRSS) before and after.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Deadline of each RPC, e.g. 60s, 500ms.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// File with secrets (key=value lines or a JSON object); else CSI_SECRETS (k=v,k=v).
    #[arg(long, value_name = "FILE")]
    pub secrets_file: Option<PathBuf>,

    /// Output format of the report.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Subcommands of `stowage bench`.
#[derive(Debug, Clone, Subcommand)]
pub enum BenchCommand {
    /// mkdir+rmdir and bind mount+umount in a loop with raw syscalls: the machine's floor
    /// for what a driver's stage/publish path costs. Bind mounts need root (skipped
    /// otherwise).
    Floor(FloorArgs),
    /// Grow the driver's volume count step by step (`--steps`) and, at each size, measure
    /// sequential CreateVolume latency and the time to list all volumes, plus the driver's
    /// RSS. Everything created is deleted at the end (unless --keep), also after Ctrl-C.
    Scale(ScaleArgs),
    /// Many clients running mixed create / stage / publish / write / snapshot / restore /
    /// expand / unpublish / delete on shared names of the given pools for a while: every
    /// answer checked against the spec, the end state against what succeeded, the driver's
    /// RSS, open fds and loop devices sampled (see `bench::soak`).
    Soak(SoakArgs),
}

/// Arguments of `stowage bench scale`.
#[derive(Debug, Clone, Args)]
#[command(after_help = exit::HELP)]
pub struct ScaleArgs {
    /// CSI endpoint: unix:///path/to/csi.sock, tcp://host:port or http://host:port
    /// [default: `stowage bench --endpoint`, i.e. $CSI_ENDPOINT or
    /// unix:///run/stowage/csi.sock].
    #[arg(long)]
    pub endpoint: Option<String>,

    /// Volume counts to measure at, comma-separated (e.g. 1000,10000,100000); run in
    /// increasing order. Each step creates volumes until this run holds that many.
    #[arg(long, required = true, value_delimiter = ',', value_name = "N,N,…",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub steps: Vec<u64>,

    /// Sequential CreateVolume+DeleteVolume pairs per step for the create latency (0 skips
    /// the probe).
    #[arg(long, default_value_t = 500)]
    pub probe_count: u64,

    /// ListVolumes max_entries per page (0 = no limit, the driver decides).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..))]
    pub page_size: i32,

    /// CreateVolume calls in flight while populating (and DeleteVolume during cleanup).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub concurrency: u64,

    /// Size of each created volume (bytes, Ki/Mi/Gi/Ti or K/M/G/T).
    #[arg(long, default_value = "1Mi", value_parser = parse_size_i64, value_name = "SIZE")]
    pub size: i64,

    /// CreateVolume parameter; repeatable. Nothing driver-specific is sent otherwise.
    #[arg(long = "param", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub params: Vec<(String, String)>,

    /// Access mode of the volume capability sent with CreateVolume.
    #[arg(long = "access-mode", value_enum, default_value_t = AccessModeArg::SingleNodeWriter,
          value_name = "MODE")]
    pub access_mode: AccessModeArg,

    /// Filesystem type of the mount capability (empty = driver default).
    #[arg(long = "fs", value_name = "FSTYPE")]
    pub fs_type: Option<String>,

    /// PID of the driver, to report its RSS (VmRSS) after each step.
    #[arg(long)]
    pub pid: Option<u32>,

    /// Leave the created volumes on the driver instead of deleting them at the end (also
    /// when interrupted); their names start with the run's `bench-scale-<run-id>-`.
    #[arg(long)]
    pub keep: bool,

    /// Deadline of each RPC (each ListVolumes page), e.g. 60s, 500ms.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// File with secrets (key=value lines or a JSON object); else CSI_SECRETS (k=v,k=v).
    #[arg(long, value_name = "FILE")]
    pub secrets_file: Option<PathBuf>,

    /// Output format of the report.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Arguments of `stowage bench floor`.
#[derive(Debug, Clone, Args)]
#[command(after_help = exit::HELP)]
pub struct FloorArgs {
    /// Iterations of each loop.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,

    /// Parent of the temporary directory to work in [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Output format of the report.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// What one benchmark operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// CreateVolume + DeleteVolume.
    CreateDelete,
    /// NodePublishVolume + NodeUnpublishVolume of a pre-created (and staged) volume.
    PublishUnpublish,
    /// CreateSnapshot + DeleteSnapshot of one source volume.
    Snapshot,
    /// A rotation of the above.
    Mixed,
    /// Two Identity Probe calls: the gRPC transport floor for the pairs above.
    Probe,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::CreateDelete => "create-delete",
            Self::PublishUnpublish => "publish-unpublish",
            Self::Snapshot => "snapshot",
            Self::Mixed => "mixed",
            Self::Probe => "probe",
        }
    }
}

/// How [`execute`] interacts with its environment; [`run`] fills this from the process.
#[derive(Clone, Default)]
pub struct Options {
    /// Value of `CSI_SECRETS`.
    pub env_secrets: Option<String>,
    /// Cancelled by SIGINT/SIGTERM in [`run`]; tests cancel it directly.
    pub cancel: CancelToken,
    /// Draw a progress bar on the process's stderr.
    pub progress: bool,
}

// Hand-written so that `{:?}` never shows the value of CSI_SECRETS.
impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field(
                "env_secrets",
                &self.env_secrets.as_ref().map(|_| "<redacted>"),
            )
            .field("cancel", &self.cancel)
            .field("progress", &self.progress)
            .finish()
    }
}

/// Runs `stowage bench` (or `bench scale` / `bench floor`) with the process's stdout and
/// stderr, a progress bar when stderr is a terminal, and SIGINT/SIGTERM wired to a graceful
/// stop with cleanup. See [`crate::exit`] for the exit codes.
pub async fn run(args: BenchArgs) -> ExitCode {
    let options = Options {
        env_secrets: std::env::var(secrets::ENV_VAR).ok(),
        cancel: CancelToken::new(),
        progress: std::io::stderr().is_terminal(),
    };
    // Handlers are installed before the first operation, so an early Ctrl-C cannot kill
    // the process with volumes half-created.
    let watcher = match install_signal_handlers() {
        Ok(signals) => Some(tokio::spawn(watch_signals(signals, options.cancel.clone()))),
        Err(e) => {
            eprintln!("warning: cannot handle signals ({e}); an interrupt will skip cleanup");
            None
        }
    };
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let code = execute(args, options, &mut stdout, &mut stderr).await;
    if let Some(w) = watcher {
        w.abort();
    }
    ExitCode::from(code)
}

type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

fn install_signal_handlers() -> std::io::Result<Signals> {
    use tokio::signal::unix::{signal, SignalKind};
    Ok((
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    ))
}

/// First SIGINT/SIGTERM cancels; later ones only remind the user that cleanup is running,
/// because exiting then would leave volumes behind (SIGKILL remains for the impatient).
async fn watch_signals((mut int, mut term): Signals, cancel: CancelToken) {
    let mut first = true;
    loop {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        if first {
            eprintln!(
                "\ninterrupted: starting no new operations; waiting for in-flight calls, then cleaning up"
            );
            cancel.cancel();
            first = false;
        } else {
            eprintln!("cleanup in progress, please wait (SIGKILL would leave resources behind)");
        }
    }
}

/// Runs the bench writing the report to `out` and diagnostics to `err`; returns the exit
/// code (see [`crate::exit`]).
pub async fn execute(
    args: BenchArgs,
    options: Options,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> u8 {
    let scale_args = match &args.command {
        Some(BenchCommand::Floor(floor_args)) => return floor::run(floor_args, out, err).await,
        Some(BenchCommand::Scale(scale_args)) => Some(scale_args),
        Some(BenchCommand::Soak(soak_args)) => {
            let endpoint = soak_args.endpoint.as_deref().unwrap_or(&args.endpoint);
            return soak::run(soak_args, endpoint, &options.cancel, out, err).await;
        }
        None => None,
    };
    let secrets_file = match scale_args {
        Some(a) => a.secrets_file.as_deref(),
        None => args.secrets_file.as_deref(),
    };
    let secrets = match Secrets::load(secrets_file, options.env_secrets.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return exit::LOCAL_ERROR;
        }
    };
    if let Some(scale_args) = scale_args {
        // `stowage bench --endpoint X scale …` works too.
        let endpoint = scale_args.endpoint.as_deref().unwrap_or(&args.endpoint);
        return scale::run(scale_args, endpoint, secrets, &options, out, err).await;
    }
    driver::run(&args, secrets, &options, out, err).await
}

/// A short random tag for names, from the std hasher's per-process random keys (no `rand`
/// dependency needed for 32 bits of uniqueness).
pub(crate) fn random_tag() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(now);
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_debug_hides_env_secrets() {
        let o = Options {
            env_secrets: Some("password=hunter2secret".into()),
            ..Default::default()
        };
        let text = format!("{o:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn random_tags_are_hex_and_differ() {
        let (a, b) = (random_tag(), random_tag());
        assert_eq!(a.len(), 8);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
