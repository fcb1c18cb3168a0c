//! CSI client tools that work against any CSI driver, embedded by the `stowage` binary as
//! two subcommands:
//!
//! * [`ctl`] — `stowage ctl`: one subcommand per RPC of the CSI Identity, Controller and
//!   Node services, with aligned tables for people and `--output json` for scripts.
//! * [`bench`](mod@bench) — `stowage bench`: drives CSI operations concurrently against a driver and
//!   reports latency percentiles, throughput and the driver's memory use; `stowage bench
//!   floor` measures the same kinds of operations as raw syscalls, the machine's floor.
//!
//! Both talk to the driver through [`connect`], which understands the `unix://` endpoints
//! the CSI spec mandates as well as `tcp://` / `http://` for drivers behind a TCP proxy.
//!
//! Exit codes are shared by both subcommands and documented in [`exit`].
//!
//! Secrets (`--secrets-file`, `CSI_SECRETS`) are held in [`secrets::Secrets`], whose
//! `Debug` and `Display` never reveal values; requests that carry secrets are never logged
//! with `Debug` because prost's generated `Debug` would print the secrets map.

pub mod bench;
pub mod ctl;
pub mod endpoint;
pub mod exit;
pub mod secrets;
pub mod size;

mod args;
mod convert;
mod output;
mod rpc;

pub use endpoint::{connect, ConnectError};
