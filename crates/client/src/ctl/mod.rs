//! `stowage ctl`: one subcommand per RPC of the CSI Identity, Controller and Node services.
//!
//! ```text
//! stowage ctl identity info|caps|probe
//! stowage ctl volume create NAME [--size 1Gi] [--param k=v]... [--fs ext4 | --block]
//!                                [--access-mode MODE]... [--mount-flag F]... [--topology k=v]...
//!                                [--source-snapshot ID | --source-volume ID]
//! stowage ctl volume delete|get ID
//! stowage ctl volume list [--max N] [--starting-token T] [--all]
//! stowage ctl volume validate ID [capability flags] [--context k=v] [--param k=v]
//! stowage ctl volume expand ID --size 2Gi
//! stowage ctl volume modify ID --mutable-param k=v...
//! stowage ctl capacity [--param k=v] [--topology k=v] [capability flags]
//! stowage ctl controller caps | publish VOLUME NODE | unpublish VOLUME [NODE]
//! stowage ctl snapshot create NAME --source VOLUME | delete ID | list | get ID
//! stowage ctl node info|caps
//! stowage ctl node stage VOLUME STAGING_PATH | unstage VOLUME STAGING_PATH
//! stowage ctl node publish VOLUME TARGET [--staging PATH] [--readonly] | unpublish VOLUME TARGET
//! stowage ctl node stats VOLUME PATH | expand VOLUME PATH [--size S]
//! ```
//!
//! Results go to stdout as aligned tables, or as one JSON document with `--output json`.
//! Failures go to stderr as `error: NOT_FOUND: volume "x" does not exist` and set the exit
//! code described in [`crate::exit`] (10 + gRPC code for a failed RPC).
//!
//! All output goes through a `&mut dyn Write` ([`execute`]) so that tests can capture it.

mod commands;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::args::parse_kv;
pub use crate::args::{AccessModeArg, CapabilityArgs, OutputFormat};
use crate::endpoint::ConnectError;
use crate::exit;
use crate::secrets::{self, Secrets};
use crate::size::{parse_duration, parse_size_i64};

/// Default endpoint of the stowage driver; overridden by `--endpoint` or `CSI_ENDPOINT`.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/stowage/csi.sock";

/// Call any CSI RPC of a driver (Identity, Controller and Node services).
#[derive(Debug, Clone, Args)]
#[command(after_help = exit::HELP)]
pub struct CtlArgs {
    /// CSI endpoint: unix:///path/to/csi.sock, tcp://host:port or http://host:port.
    #[arg(long, env = "CSI_ENDPOINT", default_value = DEFAULT_ENDPOINT, global = true)]
    pub endpoint: String,

    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,

    /// Deadline for connecting and for each RPC, e.g. 30s, 500ms, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration, global = true)]
    pub timeout: Duration,

    /// File with secrets sent in the request's secrets map: key=value lines or a JSON
    /// object. Without it, CSI_SECRETS (k=v,k=v) is used. Secrets are never printed.
    #[arg(long, value_name = "FILE", global = true)]
    pub secrets_file: Option<PathBuf>,

    /// The RPC to call.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Service groups of `stowage ctl`.
#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Identity service: GetPluginInfo, GetPluginCapabilities, Probe.
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Volumes: CreateVolume, DeleteVolume, ListVolumes, ControllerGetVolume,
    /// ValidateVolumeCapabilities, ControllerExpandVolume, ControllerModifyVolume.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// GetCapacity: available capacity of the driver's storage.
    Capacity(CapacityArgs),
    /// Controller service: ControllerGetCapabilities, ControllerPublishVolume,
    /// ControllerUnpublishVolume.
    #[command(subcommand)]
    Controller(ControllerCommand),
    /// Snapshots: CreateSnapshot, DeleteSnapshot, ListSnapshots, GetSnapshot.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Node service: NodeGetInfo, NodeGetCapabilities, NodeStageVolume, NodeUnstageVolume,
    /// NodePublishVolume, NodeUnpublishVolume, NodeGetVolumeStats, NodeExpandVolume.
    #[command(subcommand)]
    Node(NodeCommand),
}

/// Identity service RPCs.
#[derive(Debug, Clone, Subcommand)]
pub enum IdentityCommand {
    /// GetPluginInfo: driver name, version and manifest.
    Info,
    /// GetPluginCapabilities.
    Caps,
    /// Probe: whether the driver is ready.
    Probe,
}

/// Volume RPCs of the Controller service.
#[derive(Debug, Clone, Subcommand)]
pub enum VolumeCommand {
    /// CreateVolume.
    Create(CreateVolumeArgs),
    /// DeleteVolume (succeeds if the volume does not exist, as the spec requires).
    Delete {
        /// Volume ID.
        volume_id: String,
    },
    /// ListVolumes.
    List(ListArgs),
    /// ControllerGetVolume.
    Get {
        /// Volume ID.
        volume_id: String,
    },
    /// ValidateVolumeCapabilities. Succeeds whether or not the capabilities are
    /// confirmed; check CONFIRMED (or .confirmed in JSON, null when not confirmed).
    Validate(ValidateArgs),
    /// ControllerExpandVolume.
    Expand(ControllerExpandArgs),
    /// ControllerModifyVolume.
    Modify(ModifyArgs),
}

/// Arguments of `volume create`.
#[derive(Debug, Clone, Args)]
pub struct CreateVolumeArgs {
    /// Volume name; the idempotency key of CreateVolume.
    pub name: String,

    /// Required capacity: bytes, or with Ki/Mi/Gi/Ti (binary) or K/M/G/T (decimal).
    #[arg(long, value_parser = parse_size_i64, value_name = "SIZE")]
    pub size: Option<i64>,

    /// Capacity limit (same units as --size).
    #[arg(long, value_parser = parse_size_i64, value_name = "SIZE")]
    pub limit: Option<i64>,

    /// Driver-specific parameter (StorageClass parameter); repeatable.
    #[arg(long = "param", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub params: Vec<(String, String)>,

    /// Mutable parameter (VolumeAttributesClass); repeatable.
    #[arg(long = "mutable-param", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub mutable_params: Vec<(String, String)>,

    /// Volume capability.
    #[command(flatten)]
    pub capability: CapabilityArgs,

    /// Topology segment the volume must be accessible from; repeat to add segments to
    /// the same topology (sent as both requisite and preferred).
    #[arg(long = "topology", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub topology: Vec<(String, String)>,

    /// Create the volume from this snapshot.
    #[arg(long, value_name = "SNAPSHOT_ID", conflicts_with = "source_volume")]
    pub source_snapshot: Option<String>,

    /// Clone this volume.
    #[arg(long, value_name = "VOLUME_ID")]
    pub source_volume: Option<String>,
}

/// Paging flags of the list commands.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Maximum entries per response (page size with --all); 0 = driver decides.
    #[arg(long = "max", default_value_t = 0, value_name = "N",
          value_parser = clap::value_parser!(i32).range(0..))]
    pub max_entries: i32,

    /// Continue from a previous response's next token.
    #[arg(long, value_name = "TOKEN")]
    pub starting_token: Option<String>,

    /// Follow next tokens until the whole list has been read.
    #[arg(long)]
    pub all: bool,
}

/// Arguments of `volume validate`.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// Volume ID.
    pub volume_id: String,
    /// Capabilities to validate.
    #[command(flatten)]
    pub capability: CapabilityArgs,
    /// Volume context as returned by CreateVolume; repeatable.
    #[arg(long = "context", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub context: Vec<(String, String)>,
    /// Parameters the volume was created with; repeatable.
    #[arg(long = "param", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub params: Vec<(String, String)>,
    /// Mutable parameters; repeatable.
    #[arg(long = "mutable-param", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub mutable_params: Vec<(String, String)>,
}

/// Arguments of `volume expand`.
#[derive(Debug, Clone, Args)]
pub struct ControllerExpandArgs {
    /// Volume ID.
    pub volume_id: String,
    /// New required capacity.
    #[arg(long, value_parser = parse_size_i64, value_name = "SIZE")]
    pub size: i64,
    /// Capacity limit.
    #[arg(long, value_parser = parse_size_i64, value_name = "SIZE")]
    pub limit: Option<i64>,
    /// Volume capability (sent only when a capability flag is given).
    #[command(flatten)]
    pub capability: CapabilityArgs,
}

/// Arguments of `volume modify`.
#[derive(Debug, Clone, Args)]
pub struct ModifyArgs {
    /// Volume ID.
    pub volume_id: String,
    /// Mutable parameter to set; repeatable, at least one.
    #[arg(long = "mutable-param", value_parser = parse_kv, value_name = "KEY=VALUE",
          required = true)]
    pub mutable_params: Vec<(String, String)>,
}

/// Arguments of `capacity`.
#[derive(Debug, Clone, Args)]
pub struct CapacityArgs {
    /// Parameter, as for CreateVolume; repeatable.
    #[arg(long = "param", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub params: Vec<(String, String)>,
    /// Topology segment; repeatable.
    #[arg(long = "topology", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub topology: Vec<(String, String)>,
    /// Capabilities (sent only when a capability flag is given).
    #[command(flatten)]
    pub capability: CapabilityArgs,
}

/// Controller service RPCs that are not about one volume's lifecycle.
#[derive(Debug, Clone, Subcommand)]
pub enum ControllerCommand {
    /// ControllerGetCapabilities.
    Caps,
    /// ControllerPublishVolume: make a volume available on a node.
    Publish(ControllerPublishArgs),
    /// ControllerUnpublishVolume.
    Unpublish {
        /// Volume ID.
        volume_id: String,
        /// Node ID (empty = all nodes).
        node_id: Option<String>,
    },
}

/// Arguments of `controller publish`.
#[derive(Debug, Clone, Args)]
pub struct ControllerPublishArgs {
    /// Volume ID.
    pub volume_id: String,
    /// Node ID as returned by NodeGetInfo.
    pub node_id: String,
    /// Publish read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Volume capability.
    #[command(flatten)]
    pub capability: CapabilityArgs,
    /// Volume context as returned by CreateVolume; repeatable.
    #[arg(long = "context", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub context: Vec<(String, String)>,
}

/// Snapshot RPCs.
#[derive(Debug, Clone, Subcommand)]
pub enum SnapshotCommand {
    /// CreateSnapshot.
    Create {
        /// Snapshot name; the idempotency key of CreateSnapshot.
        name: String,
        /// Volume to snapshot.
        #[arg(long, value_name = "VOLUME_ID")]
        source: String,
        /// Driver-specific parameter (VolumeSnapshotClass parameter); repeatable.
        #[arg(long = "param", value_parser = parse_kv, value_name = "KEY=VALUE")]
        params: Vec<(String, String)>,
    },
    /// DeleteSnapshot.
    Delete {
        /// Snapshot ID.
        snapshot_id: String,
    },
    /// ListSnapshots.
    List {
        /// Paging.
        #[command(flatten)]
        list: ListArgs,
        /// Only snapshots of this volume.
        #[arg(long, value_name = "VOLUME_ID")]
        source_volume: Option<String>,
        /// Only this snapshot.
        #[arg(long, value_name = "SNAPSHOT_ID")]
        snapshot_id: Option<String>,
    },
    /// GetSnapshot.
    Get {
        /// Snapshot ID.
        snapshot_id: String,
    },
}

/// Node service RPCs.
#[derive(Debug, Clone, Subcommand)]
pub enum NodeCommand {
    /// NodeGetInfo.
    Info,
    /// NodeGetCapabilities.
    Caps,
    /// NodeStageVolume.
    Stage(NodeStageArgs),
    /// NodeUnstageVolume.
    Unstage {
        /// Volume ID.
        volume_id: String,
        /// Path the volume was staged at.
        staging_path: String,
    },
    /// NodePublishVolume.
    Publish(NodePublishArgs),
    /// NodeUnpublishVolume.
    Unpublish {
        /// Volume ID.
        volume_id: String,
        /// Path the volume was published at.
        target_path: String,
    },
    /// NodeGetVolumeStats.
    Stats {
        /// Volume ID.
        volume_id: String,
        /// Path the volume is published at.
        volume_path: String,
        /// Staging path, if the volume is staged.
        #[arg(long = "staging", value_name = "PATH")]
        staging_path: Option<String>,
    },
    /// NodeExpandVolume.
    Expand(NodeExpandArgs),
}

/// Arguments of `node stage`.
#[derive(Debug, Clone, Args)]
pub struct NodeStageArgs {
    /// Volume ID.
    pub volume_id: String,
    /// Directory to stage at (must exist).
    pub staging_path: String,
    /// Volume capability.
    #[command(flatten)]
    pub capability: CapabilityArgs,
    /// Publish context from ControllerPublishVolume; repeatable.
    #[arg(long = "publish-context", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub publish_context: Vec<(String, String)>,
    /// Volume context from CreateVolume; repeatable.
    #[arg(long = "context", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub context: Vec<(String, String)>,
}

/// Arguments of `node publish`.
#[derive(Debug, Clone, Args)]
pub struct NodePublishArgs {
    /// Volume ID.
    pub volume_id: String,
    /// Path to publish at (the driver creates it; its parent must exist).
    pub target_path: String,
    /// Staging path, required when the driver has STAGE_UNSTAGE_VOLUME.
    #[arg(long = "staging", value_name = "PATH")]
    pub staging_path: Option<String>,
    /// Publish read-only.
    #[arg(long)]
    pub readonly: bool,
    /// Volume capability.
    #[command(flatten)]
    pub capability: CapabilityArgs,
    /// Publish context from ControllerPublishVolume; repeatable.
    #[arg(long = "publish-context", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub publish_context: Vec<(String, String)>,
    /// Volume context from CreateVolume; repeatable.
    #[arg(long = "context", value_parser = parse_kv, value_name = "KEY=VALUE")]
    pub context: Vec<(String, String)>,
}

/// Arguments of `node expand`.
#[derive(Debug, Clone, Args)]
pub struct NodeExpandArgs {
    /// Volume ID.
    pub volume_id: String,
    /// Path the volume is published at.
    pub volume_path: String,
    /// New required capacity.
    #[arg(long, value_parser = parse_size_i64, value_name = "SIZE")]
    pub size: Option<i64>,
    /// Capacity limit.
    #[arg(long, value_parser = parse_size_i64, value_name = "SIZE")]
    pub limit: Option<i64>,
    /// Staging path, if the volume is staged.
    #[arg(long = "staging", value_name = "PATH")]
    pub staging_path: Option<String>,
    /// Volume capability (sent only when a capability flag is given).
    #[command(flatten)]
    pub capability: CapabilityArgs,
}

/// Why a `ctl` command failed; each variant has its exit code.
#[derive(Debug)]
pub(crate) enum CtlError {
    /// Invalid combination of arguments.
    Usage(String),
    /// Local failure (secrets file, writing output).
    Local(String),
    /// The endpoint could not be reached or is malformed.
    Connect(ConnectError),
    /// Connecting took longer than `--timeout`.
    ConnectTimeout(String),
    /// The driver returned an error.
    Rpc(tonic::Status),
}

impl From<std::io::Error> for CtlError {
    fn from(e: std::io::Error) -> Self {
        Self::Local(format!("cannot write output: {e}"))
    }
}

impl From<tonic::Status> for CtlError {
    fn from(s: tonic::Status) -> Self {
        Self::Rpc(s)
    }
}

impl CtlError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => exit::USAGE,
            Self::Local(_) => exit::LOCAL_ERROR,
            Self::Connect(e) if e.is_invalid_endpoint() => exit::USAGE,
            Self::Connect(_) | Self::ConnectTimeout(_) => exit::CONNECT,
            Self::Rpc(status) => exit::from_grpc(status.code()),
        }
    }

    fn message(&self, secrets: &Secrets) -> String {
        match self {
            Self::Usage(m) | Self::Local(m) | Self::ConnectTimeout(m) => m.clone(),
            Self::Connect(e) => e.to_string(),
            Self::Rpc(status) => crate::rpc::describe_status(status, secrets),
        }
    }
}

/// Runs `stowage ctl` with the process's stdout and stderr and the `CSI_SECRETS`
/// environment variable. See [`crate::exit`] for the exit codes.
pub async fn run(args: CtlArgs) -> ExitCode {
    let env_secrets = std::env::var(secrets::ENV_VAR).ok();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let code = execute(args, env_secrets.as_deref(), &mut stdout, &mut stderr).await;
    ExitCode::from(code)
}

/// Runs `stowage ctl` writing results to `out` and errors to `err`; returns the exit code
/// (see [`crate::exit`]). `env_secrets` is the value of `CSI_SECRETS`, passed in rather
/// than read here so callers and tests control it.
pub async fn execute(
    args: CtlArgs,
    env_secrets: Option<&str>,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> u8 {
    let secrets = match Secrets::load(args.secrets_file.as_deref(), env_secrets) {
        Ok(s) => s,
        Err(e) => {
            // Nothing useful can be done if stderr itself is gone.
            let _ = writeln!(err, "error: {e}");
            return exit::LOCAL_ERROR;
        }
    };
    match commands::dispatch(&args, &secrets, out).await {
        Ok(()) => match out.flush() {
            Ok(()) => exit::SUCCESS,
            Err(e) => {
                let _ = writeln!(err, "error: cannot write output: {e}");
                exit::LOCAL_ERROR
            }
        },
        Err(e) => {
            let _ = out.flush();
            let _ = writeln!(err, "error: {}", e.message(&secrets));
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// Mirrors how the `stowage` binary embeds the subcommands.
    #[derive(Debug, Parser)]
    enum Cli {
        Ctl(CtlArgs),
        Bench(crate::bench::BenchArgs),
    }

    #[test]
    fn clap_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_documents_exit_codes() {
        let mut cmd = Cli::command();
        for sub in ["ctl", "bench"] {
            let help = cmd
                .find_subcommand_mut(sub)
                .map(|c| c.render_long_help().to_string())
                .unwrap_or_default();
            assert!(
                help.contains("10+N"),
                "{sub} help lacks exit codes:\n{help}"
            );
        }
    }

    #[test]
    fn parses_volume_create() {
        let cli = Cli::try_parse_from([
            "stowage",
            "ctl",
            "--endpoint",
            "unix:///x.sock",
            "volume",
            "create",
            "v1",
            "--size",
            "1Gi",
            "--param",
            "a=b",
            "--fs",
            "ext4",
            "--access-mode",
            "single-node-multi-writer",
            "--mount-flag",
            "noatime",
            "--topology",
            "zone=z1",
            "--source-snapshot",
            "s1",
            "-o",
            "json",
        ])
        .unwrap();
        let Cli::Ctl(args) = cli else {
            panic!("not ctl")
        };
        assert_eq!(args.output, OutputFormat::Json);
        let CtlCommand::Volume(VolumeCommand::Create(c)) = args.command else {
            panic!("not volume create")
        };
        assert_eq!(c.size, Some(1 << 30));
        assert_eq!(c.params, vec![("a".to_owned(), "b".to_owned())]);
        assert_eq!(
            c.capability.access_modes,
            vec![AccessModeArg::SingleNodeMultiWriter]
        );
    }

    #[test]
    fn rejects_bad_values_at_parse_time() {
        for argv in [
            &["stowage", "ctl", "volume", "create", "v", "--size", "1Xi"][..],
            &[
                "stowage", "ctl", "volume", "create", "v", "--param", "novalue",
            ],
            &[
                "stowage", "ctl", "volume", "create", "v", "--block", "--fs", "ext4",
            ],
            &[
                "stowage",
                "ctl",
                "volume",
                "create",
                "v",
                "--source-snapshot",
                "a",
                "--source-volume",
                "b",
            ],
            &["stowage", "ctl", "volume", "list", "--max", "-1"],
            &["stowage", "bench", "--count", "0"],
            &["stowage", "bench", "--workload", "nope"],
        ] {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?} should fail");
        }
    }
}
