//! stowage's vocabulary, with no I/O: identifiers, typed and validated CSI requests, the pool
//! configuration, and the one error type with its one mapping onto gRPC status codes.
//!
//! Everything a request carries is checked here, before any disk or mount is touched:
//! ```
//! use stowage_core::VolumeId;
//! assert!(VolumeId::parse("../../etc").is_err());
//! let id = VolumeId::generate();
//! assert_eq!(VolumeId::parse(id.as_str()).unwrap(), id);
//! ```

pub mod config;
mod error;
pub mod ids;
pub mod request;
pub mod size;

pub use error::{Error, Result};
pub use ids::{VolumeId, VolumeName};
