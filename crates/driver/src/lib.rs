//! The stowage CSI driver: the metadata store, the pools, the volume engine that ties them
//! together, and the tonic services served on a Unix socket.
//!
//! A call flows one way: gRPC request → typed request (`stowage_core::request`, no I/O) →
//! per-volume guard → [`engine::Engine`] (store + pool + kernel) → one error mapping.

pub mod authority;
pub mod crash;
pub mod durable;
pub mod engine;
pub mod ephemeral;
pub mod guard;
pub mod health;
pub mod metrics;
pub mod node;
pub mod phases;
pub mod pool;
pub mod recorder;
pub mod server;
pub mod service;
pub mod snapshots;
pub mod statics;
pub mod store;

pub use server::{serve, termination, ServeOptions};
pub use service::Mode;
