//! Property tests of everything that turns request strings into values: arbitrary input never
//! panics, every refusal carries a code the spec names (never UNKNOWN or INTERNAL), and
//! whatever is accepted as an id or a path cannot name anything outside its place.
//!
//! Bounded for CI: proptest's default of 256 cases per property (`PROPTEST_CASES` to change).

use std::collections::HashMap;
use std::path::Component;

use proptest::prelude::*;
use stowage_core::ids::{SnapshotId, SnapshotRef, VolumeRef};
use stowage_core::request::{
    CreateSnapshot, CreateVolume, ExistingPath, HostPath, ListSnapshots, MountFlag, NodePublish,
    NodeStage,
};
use stowage_core::{Error, VolumeId};
use stowage_csi::v1 as csi;
use tonic::Code;

/// Strings that probe the edges: traversal pieces, separators, NUL, control and non-ASCII
/// characters, the id prefixes, and plain noise, up to past the 128-byte limit.
fn hostile() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("..".to_owned()),
        Just("/".to_owned()),
        Just(".".to_owned()),
        Just("\0".to_owned()),
        Just("stw-".to_owned()),
        Just("sns-".to_owned()),
        Just("%2e%2e%2f".to_owned()),
        Just("\\".to_owned()),
        "[0-9a-f]{1,32}",
        "[a-zA-Z0-9._-]{0,12}",
        "\\PC{0,4}",
        "[\\x01-\\x1f\\x7f]{1,2}",
    ];
    prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
}

fn allowed(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::NotFound | Code::OutOfRange | Code::AlreadyExists
    )
}

fn check_refusal(e: &Error) -> Result<(), TestCaseError> {
    prop_assert!(allowed(e.code()), "refused with {:?}: {e}", e.code());
    prop_assert!(!e.to_string().is_empty());
    Ok(())
}

fn single_safe_component(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.contains('\0') && s != "." && s != ".."
}

fn mount_cap(fs_type: String, flags: Vec<String>) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type,
                mount_flags: flags,
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

proptest! {
    #[test]
    fn ids_parse_only_their_own_shape(s in hostile()) {
        if let Ok(id) = VolumeId::parse(&s) {
            prop_assert!(single_safe_component(id.as_str()));
            prop_assert!(id.as_str().starts_with("stw-") && id.as_str().len() == 36);
        }
        if let Ok(id) = SnapshotId::parse(&s) {
            prop_assert!(single_safe_component(id.as_str()));
            prop_assert!(id.as_str().starts_with("sns-") && id.as_str().len() == 36);
        }
        prop_assert!(VolumeId::parse(&s).is_err() || SnapshotId::parse(&s).is_err());
        match VolumeRef::from_request(&s) {
            Ok(VolumeRef::Ours(id)) => prop_assert_eq!(id.as_str(), s.as_str()),
            Ok(VolumeRef::Foreign(f)) => {
                check_refusal(&VolumeRef::Foreign(f).require().unwrap_err())?
            }
            Err(e) => check_refusal(&e)?,
        }
        match SnapshotRef::from_request(&s) {
            Ok(r) => { let _ = r.require(); }
            Err(e) => check_refusal(&e)?,
        }
    }

    #[test]
    fn host_paths_are_absolute_and_never_climb(s in hostile()) {
        let s = format!("/{s}");
        match HostPath::parse("target_path", &s) {
            Ok(p) => {
                prop_assert!(p.as_path().is_absolute());
                prop_assert!(p.as_path().components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
                prop_assert!(!p.as_str().contains('\0'));
            }
            Err(e) => check_refusal(&e)?,
        }
        match ExistingPath::parse("volume_path", &s) {
            Ok(ExistingPath::Host(p)) => prop_assert!(p.as_path().components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))),
            Ok(ExistingPath::Nowhere { .. }) => {}
            Err(e) => check_refusal(&e)?,
        }
    }

    #[test]
    fn relative_or_raw_paths_never_panic(s in hostile()) {
        if let Err(e) = HostPath::parse("staging_target_path", &s) { check_refusal(&e)?; }
        if let Err(e) = ExistingPath::parse("volume_path", &s) { check_refusal(&e)?; }
    }

    #[test]
    fn mount_flags_are_the_allow_list_or_refused(s in hostile()) {
        match MountFlag::parse(&s) {
            Ok(f) => prop_assert_eq!(f.as_str(), s.as_str()),
            Err(e) => check_refusal(&e)?,
        }
    }

    #[test]
    fn create_volume_never_panics(
        name in hostile(),
        params in prop::collection::hash_map(hostile(), hostile(), 0..4),
        fs_type in hostile(),
        flags in prop::collection::vec(hostile(), 0..3),
        required in any::<i64>(),
        limit in any::<i64>(),
        source in hostile(),
    ) {
        let req = csi::CreateVolumeRequest {
            name,
            capacity_range: Some(csi::CapacityRange { required_bytes: required, limit_bytes: limit }),
            volume_capabilities: vec![mount_cap(fs_type, flags)],
            parameters: params,
            volume_content_source: Some(csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Snapshot(
                    csi::volume_content_source::SnapshotSource { snapshot_id: source },
                )),
            }),
            ..Default::default()
        };
        match CreateVolume::try_from(&req) {
            Ok(v) => {
                if let Some(pool) = &v.params.pool {
                    prop_assert!(single_safe_component(pool));
                }
                prop_assert!(v.capacity.limit.is_none_or(|l| l >= v.capacity.required));
            }
            Err(e) => check_refusal(&e)?,
        }
    }

    #[test]
    fn snapshot_requests_never_panic(
        name in hostile(),
        source in hostile(),
        params in prop::collection::hash_map(hostile(), hostile(), 0..3),
        max in any::<i32>(),
        token in hostile(),
        filter in hostile(),
    ) {
        let create = csi::CreateSnapshotRequest {
            source_volume_id: source.clone(),
            name,
            parameters: params,
            ..Default::default()
        };
        if let Err(e) = CreateSnapshot::try_from(&create) { check_refusal(&e)?; }
        let list = csi::ListSnapshotsRequest {
            max_entries: max,
            starting_token: token,
            source_volume_id: source,
            snapshot_id: filter,
            ..Default::default()
        };
        if let Err(e) = ListSnapshots::try_from(&list) { check_refusal(&e)?; }
    }

    #[test]
    fn node_requests_never_panic(
        id in hostile(),
        staging in hostile(),
        target in hostile(),
        context in prop::collection::hash_map(hostile(), hostile(), 0..3),
        flags in prop::collection::vec(hostile(), 0..3),
    ) {
        let stage = csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(mount_cap(String::new(), flags.clone())),
            volume_context: context.clone(),
            ..Default::default()
        };
        if let Err(e) = NodeStage::try_from(&stage) { check_refusal(&e)?; }
        let publish = csi::NodePublishVolumeRequest {
            volume_id: id,
            staging_target_path: staging,
            target_path: target,
            volume_capability: Some(mount_cap(String::new(), flags)),
            volume_context: context,
            ..Default::default()
        };
        if let Err(e) = NodePublish::try_from(&publish) { check_refusal(&e)?; }
    }
}

#[test]
fn oversized_maps_are_refused_not_truncated() {
    let big: HashMap<String, String> = (0..200)
        .map(|i| (format!("k{i}"), "v".repeat(100)))
        .collect();
    let req = csi::CreateVolumeRequest {
        name: "a".into(),
        volume_capabilities: vec![mount_cap(String::new(), vec![])],
        parameters: big,
        ..Default::default()
    };
    assert_eq!(
        CreateVolume::try_from(&req).unwrap_err().code(),
        Code::InvalidArgument
    );
}
