//! CSI v1.12.0 wire types (`csi.v1`) and their tonic client and server stubs, generated at
//! build time from `proto/csi.proto`. This crate holds generated code only.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Package `csi.v1`.
pub mod v1 {
    tonic::include_proto!("csi.v1");
}
