//! Command-line pieces shared by `ctl` and `bench`: `k=v` pairs, access modes, output
//! format, and the flags that describe a `VolumeCapability`.

use std::collections::HashMap;

use clap::{Args, ValueEnum};
use stowage_csi::v1::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use stowage_csi::v1::VolumeCapability;

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Aligned, human-readable tables.
    #[default]
    Table,
    /// One JSON document on stdout.
    Json,
}

/// Parses `key=value` (the value may contain `=`; the key may not be empty).
pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        Some(_) => Err(format!("expected key=value, got {s:?} (empty key)")),
        None => Err(format!("expected key=value, got {s:?}")),
    }
}

/// Collects `k=v` pairs into a map; later duplicates win, as with repeated flags elsewhere.
pub(crate) fn kv_map(pairs: &[(String, String)]) -> HashMap<String, String> {
    pairs.iter().cloned().collect()
}

/// CSI access modes, spelled as flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessModeArg {
    /// SINGLE_NODE_WRITER
    SingleNodeWriter,
    /// SINGLE_NODE_READER_ONLY
    SingleNodeReaderOnly,
    /// MULTI_NODE_READER_ONLY
    MultiNodeReaderOnly,
    /// MULTI_NODE_SINGLE_WRITER
    MultiNodeSingleWriter,
    /// MULTI_NODE_MULTI_WRITER
    MultiNodeMultiWriter,
    /// SINGLE_NODE_SINGLE_WRITER
    SingleNodeSingleWriter,
    /// SINGLE_NODE_MULTI_WRITER
    SingleNodeMultiWriter,
}

impl AccessModeArg {
    /// The wire enum.
    pub fn mode(self) -> Mode {
        match self {
            Self::SingleNodeWriter => Mode::SingleNodeWriter,
            Self::SingleNodeReaderOnly => Mode::SingleNodeReaderOnly,
            Self::MultiNodeReaderOnly => Mode::MultiNodeReaderOnly,
            Self::MultiNodeSingleWriter => Mode::MultiNodeSingleWriter,
            Self::MultiNodeMultiWriter => Mode::MultiNodeMultiWriter,
            Self::SingleNodeSingleWriter => Mode::SingleNodeSingleWriter,
            Self::SingleNodeMultiWriter => Mode::SingleNodeMultiWriter,
        }
    }

    /// Whether only one publication per node is allowed at a time (spec: a second
    /// NodePublishVolume with another target path fails with FAILED_PRECONDITION).
    pub fn single_publication(self) -> bool {
        matches!(
            self,
            Self::SingleNodeWriter | Self::SingleNodeReaderOnly | Self::SingleNodeSingleWriter
        )
    }
}

/// Flags describing a volume capability (access type and access mode).
#[derive(Debug, Clone, Default, Args)]
pub struct CapabilityArgs {
    /// Filesystem type for a mount volume (empty = driver default).
    #[arg(long = "fs", value_name = "FSTYPE", conflicts_with = "block")]
    pub fs_type: Option<String>,

    /// Raw block volume instead of a mounted filesystem.
    #[arg(long)]
    pub block: bool,

    /// Access mode; repeat to send several capabilities where the RPC takes a list
    /// [default: single-node-writer].
    #[arg(long = "access-mode", value_enum, value_name = "MODE")]
    pub access_modes: Vec<AccessModeArg>,

    /// Mount flag for a mount volume; repeatable.
    #[arg(long = "mount-flag", value_name = "FLAG", conflicts_with = "block")]
    pub mount_flags: Vec<String>,

    /// Volume mount group (fsGroup) for a mount volume.
    #[arg(long = "mount-group", value_name = "GROUP", conflicts_with = "block")]
    pub mount_group: Option<String>,
}

impl CapabilityArgs {
    /// Whether any capability flag was given; optional capability fields are only sent
    /// when the user asked for one.
    pub fn is_given(&self) -> bool {
        self.fs_type.is_some()
            || self.block
            || !self.access_modes.is_empty()
            || !self.mount_flags.is_empty()
            || self.mount_group.is_some()
    }

    fn access_type(&self) -> AccessType {
        if self.block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: self.fs_type.clone().unwrap_or_default(),
                mount_flags: self.mount_flags.clone(),
                volume_mount_group: self.mount_group.clone().unwrap_or_default(),
            })
        }
    }

    /// One capability per `--access-mode` (at least one, defaulting to SINGLE_NODE_WRITER),
    /// for RPCs that take a list.
    pub fn capabilities(&self) -> Vec<VolumeCapability> {
        let modes = if self.access_modes.is_empty() {
            vec![AccessModeArg::SingleNodeWriter]
        } else {
            self.access_modes.clone()
        };
        modes
            .into_iter()
            .map(|m| VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: m.mode() as i32,
                }),
                access_type: Some(self.access_type()),
            })
            .collect()
    }

    /// The single capability for RPCs that take exactly one.
    pub fn capability(&self) -> Result<VolumeCapability, String> {
        if self.access_modes.len() > 1 {
            return Err(
                "this call takes a single volume capability: give --access-mode at most once"
                    .into(),
            );
        }
        // capabilities() always yields at least one element.
        self.capabilities()
            .into_iter()
            .next()
            .ok_or_else(|| "no volume capability".to_owned())
    }

    /// The single capability, or `None` when no capability flag was given.
    pub fn optional_capability(&self) -> Result<Option<VolumeCapability>, String> {
        if self.is_given() {
            self.capability().map(Some)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_parsing() {
        assert_eq!(parse_kv("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_kv("a="), Ok(("a".into(), String::new())));
        assert!(parse_kv("=b").is_err());
        assert!(parse_kv("ab").is_err());
    }

    #[test]
    fn default_capability_is_mount_single_node_writer() {
        let cap = CapabilityArgs::default().capability().unwrap();
        assert_eq!(
            cap.access_mode.map(|m| m.mode),
            Some(Mode::SingleNodeWriter as i32)
        );
        assert_eq!(
            cap.access_type,
            Some(AccessType::Mount(MountVolume::default()))
        );
        assert_eq!(CapabilityArgs::default().optional_capability(), Ok(None));
    }

    #[test]
    fn several_modes_give_several_capabilities() {
        let args = CapabilityArgs {
            block: true,
            access_modes: vec![
                AccessModeArg::SingleNodeWriter,
                AccessModeArg::MultiNodeReaderOnly,
            ],
            ..Default::default()
        };
        assert_eq!(args.capabilities().len(), 2);
        assert!(args.capability().is_err());
    }
}
