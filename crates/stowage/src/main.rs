//! `stowage`: the CSI driver (`serve`), an operator's CSI client (`ctl`) and a benchmark
//! (`bench`), in one binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use stowage_core::config::Config;
use stowage_driver::{Mode, ServeOptions};

/// A CSI driver that turns a node's disks into capacity-enforced persistent volumes.
#[derive(Debug, Parser)]
#[command(name = "stowage", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the CSI Identity, Controller and Node services on a Unix socket.
    Serve(ServeArgs),
    /// Call any CSI driver's RPCs from the command line.
    Ctl(stowage_client::ctl::CtlArgs),
    /// Measure a CSI driver (or the machine's syscall floor).
    Bench(stowage_client::bench::BenchArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Controller,
    Node,
    All,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// CSI endpoint (unix:///absolute/path).
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/stowage/csi.sock"
    )]
    endpoint: String,
    /// This node's id (the Kubernetes node name); defaults to the host name.
    #[arg(long, env = "STOWAGE_NODE_ID")]
    node_id: Option<String>,
    /// The driver's name, as a StorageClass's provisioner names it.
    #[arg(long, env = "STOWAGE_DRIVER_NAME", default_value = "stowage.csi.dev")]
    driver_name: String,
    /// Where the metadata database (and the embedded default pool) live.
    #[arg(long, env = "STOWAGE_STATE_DIR", default_value = "/var/lib/stowage")]
    state_dir: PathBuf,
    /// TOML file declaring the pools; without it, one `dir` pool `default` under the state dir.
    #[arg(long, env = "STOWAGE_CONFIG")]
    config: Option<PathBuf>,
    /// Which CSI services to serve.
    #[arg(long, env = "STOWAGE_MODE", value_enum, default_value = "all")]
    mode: ModeArg,
    /// Directory that staging and target paths must lie under (repeatable).
    #[arg(
        long = "kubelet-dir",
        env = "STOWAGE_KUBELET_DIR",
        value_delimiter = ',',
        default_value = "/var/lib/kubelet"
    )]
    kubelet_dirs: Vec<PathBuf>,
    /// Offer ControllerExpandVolume. Turn it off where each node runs its own controller
    /// service (distributed provisioning): the external-resizer then leaves the whole resize
    /// to NodeExpandVolume on the volume's node, instead of calling a controller that may
    /// sit on another node and answer NOT_FOUND.
    #[arg(
        long,
        env = "STOWAGE_CONTROLLER_EXPANSION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    controller_expansion: bool,
    /// Seconds between two checks of every volume that a pool kind watches in the
    /// background (btrfs: subvolumes a pod nested outside its volume's qgroup are put back
    /// under it); 0 turns the checks off (they still run at NodeGetVolumeStats and expansion).
    #[arg(
        long,
        env = "STOWAGE_WATCH_INTERVAL",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    watch_interval: u64,
    /// Numeric group allowed to connect to the socket (mode 0660 with that group); without
    /// it the socket is 0600, root's alone, which is what the official sidecars (run as root)
    /// need.
    #[arg(long, env = "STOWAGE_SOCKET_GROUP", value_name = "GID")]
    socket_group: Option<u32>,
    /// Log format: `text` for people, `json` (one object per line) for log collectors.
    #[arg(long, env = "STOWAGE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Least severe level logged. RUST_LOG, when set, is combined with it: its per-target
    /// directives (`stowage_driver::phases=debug`) refine it, a bare level in it replaces it.
    #[arg(long, env = "STOWAGE_LOG_LEVEL", value_enum, default_value = "info")]
    log_level: LogLevel,
    /// Serve Prometheus metrics at GET /metrics on this address (`PORT` or `:PORT`: on
    /// loopback; `0.0.0.0:PORT` on every interface). Off unless given.
    #[arg(long, env = "STOWAGE_METRICS_ADDRESS", value_name = "ADDR")]
    metrics_address: Option<String>,
    /// Serve /healthz (alive) and /readyz (ready: reconciled, store answering, every pool
    /// reachable and writable) on this address (as --metrics-address; the same address
    /// serves both). Off unless given.
    #[arg(long, env = "STOWAGE_HEALTH_ADDRESS", value_name = "ADDR")]
    health_address: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// The filter of `--log-level` combined with RUST_LOG (see `ServeArgs::log_level`): a bare
/// level in RUST_LOG replaces the flag's, every other directive is added to it.
fn log_filter(level: LogLevel, rust_log: Option<&str>) -> String {
    let mut base = level.as_str().to_owned();
    let mut rest = Vec::new();
    for directive in rust_log.unwrap_or("").split(',').map(str::trim) {
        if directive.is_empty() {
            continue;
        }
        if directive
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_ok()
        {
            base = directive.to_owned();
        } else {
            rest.push(directive);
        }
    }
    std::iter::once(base.as_str())
        .chain(rest)
        .collect::<Vec<_>>()
        .join(",")
}

fn init_logging(format: LogFormat, level: LogLevel) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let directives = log_filter(level, rust_log.as_deref());
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("warning: RUST_LOG={rust_log:?} is not understood ({e}); using --log-level");
        tracing_subscriber::EnvFilter::new(level.as_str())
    });
    // Colour codes only where a person reads a terminal, never in files or log collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

async fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.log_format, args.log_level);
    let config = match &args.config {
        None => None,
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))
            .and_then(|text| {
                Config::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
            }) {
            Ok(cfg) => Some(cfg),
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::from(2);
            }
        },
    };
    let opts = ServeOptions {
        endpoint: args.endpoint,
        node_id: args.node_id.unwrap_or_else(host_name),
        driver_name: args.driver_name,
        state_dir: args.state_dir,
        config,
        mode: match args.mode {
            ModeArg::Controller => Mode::Controller,
            ModeArg::Node => Mode::Node,
            ModeArg::All => Mode::All,
        },
        kubelet_dirs: args.kubelet_dirs,
        controller_expansion: args.controller_expansion,
        watch_interval: std::time::Duration::from_secs(args.watch_interval),
        socket_group: args.socket_group,
        metrics_address: args.metrics_address,
        health_address: args.health_address,
    };
    match stowage_driver::serve(opts, stowage_driver::termination()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = ?e.code(), "{e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Ctl(args) => stowage_client::ctl::run(args).await,
            Command::Bench(args) => stowage_client::bench::run(args).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_refines_or_replaces_the_level() {
        assert_eq!(log_filter(LogLevel::Info, None), "info");
        assert_eq!(log_filter(LogLevel::Warn, Some("")), "warn");
        assert_eq!(log_filter(LogLevel::Info, Some("debug")), "debug");
        assert_eq!(
            log_filter(LogLevel::Info, Some("stowage_driver::phases=debug")),
            "info,stowage_driver::phases=debug"
        );
        assert_eq!(
            log_filter(LogLevel::Error, Some("warn, hyper=off")),
            "warn,hyper=off"
        );
    }
}
