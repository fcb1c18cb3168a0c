//! Identity and Controller over the real socket of the real binary: success paths, the
//! spec's error codes, repeated calls, restarts and crash recovery.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::symlink;

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::Code;

#[tokio::test]
async fn identity_answers() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut id = h.identity().await;
        let info = id
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, DRIVER);
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
        let caps = id
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        let services: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::plugin_capability::Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        use csi::plugin_capability::service::Type;
        assert!(services.contains(&(Type::ControllerService as i32)));
        assert!(services.contains(&(Type::VolumeAccessibilityConstraints as i32)));
        for _ in 0..2 {
            let p = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
            assert_eq!(p.ready, Some(true));
        }
    })
    .await
}

#[tokio::test]
async fn create_volume_success_idempotency_and_conflicts() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let mut req = create_req("pvc-one", 10 << 20);
        req.parameters
            .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
        req.parameters
            .insert("csi.storage.k8s.io/pvc/namespace".into(), "db".into());
        req.parameters
            .insert("csi.storage.k8s.io/pv/name".into(), "pvc-one".into());
        req.secrets
            .insert("password".into(), "hunter2-very-secret".into());
        let v1 = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert!(v1.capacity_bytes >= 10 << 20);
        assert!(h.pool_volumes().join(&v1.volume_id).is_dir());
        // Quota detection: this kernel has no project quotas, and the volume says so.
        assert_eq!(
            v1.volume_context.get("pool").map(String::as_str),
            Some("default")
        );
        assert_eq!(
            v1.volume_context
                .get("capacityEnforcement")
                .map(String::as_str),
            Some("advisory")
        );
        assert_eq!(v1.accessible_topology.len(), 1);
        assert_eq!(
            v1.accessible_topology[0]
                .segments
                .get("stowage.csi.dev/node")
                .map(String::as_str),
            Some("node-a")
        );

        // Same name, same arguments: the same volume.
        let v2 = c
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(v1, v2);
        // Same name, a capacity the volume does not satisfy: ALREADY_EXISTS.
        let mut bigger = req.clone();
        bigger.capacity_range = Some(csi::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        });
        assert_eq!(code(c.create_volume(bigger).await), Code::AlreadyExists);
        // A 128-byte name works.
        let long = "n".repeat(128);
        c.create_volume(create_req(&long, 1 << 20)).await.unwrap();
        c.create_volume(create_req(&long, 1 << 20)).await.unwrap();

        let log = h.log_text();
        assert!(
            log.contains("ADVISORY"),
            "no advisory warning at start:\n{log}"
        );
        assert!(!log.contains("hunter2"), "a secret reached the log");
    })
    .await
}

#[tokio::test]
async fn create_volume_error_codes() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let mut cases: Vec<(&str, csi::CreateVolumeRequest, Code)> = Vec::new();
        cases.push((
            "missing name",
            create_req("", 1 << 20),
            Code::InvalidArgument,
        ));
        cases.push((
            "name over 128 bytes",
            create_req(&"n".repeat(129), 1 << 20),
            Code::InvalidArgument,
        ));
        let mut r = create_req("e1", 1 << 20);
        r.volume_capabilities.clear();
        cases.push(("no capabilities", r, Code::InvalidArgument));
        let mut r = create_req("e2", 1 << 20);
        r.volume_capabilities = vec![block_cap()];
        cases.push(("block on a dir pool", r, Code::InvalidArgument));
        let mut r = create_req("e3", 1 << 20);
        r.volume_capabilities = vec![mount_cap(Mode::MultiNodeMultiWriter)];
        cases.push(("multi-node", r, Code::InvalidArgument));
        let mut r = create_req("e4", 1 << 20);
        r.parameters.insert("replicas".into(), "3".into());
        cases.push(("unknown parameter", r, Code::InvalidArgument));
        let mut r = create_req("e5", 1 << 20);
        r.parameters.insert("pool".into(), "nope".into());
        cases.push(("unknown pool", r, Code::InvalidArgument));
        let mut r = create_req("e6", 0);
        r.capacity_range = Some(csi::CapacityRange {
            required_bytes: 2 << 20,
            limit_bytes: 1 << 20,
        });
        cases.push(("limit below required", r, Code::OutOfRange));
        cases.push((
            "larger than the pool",
            create_req("e7", i64::MAX),
            Code::OutOfRange,
        ));
        let mut r = create_req("e8", -5);
        r.capacity_range = Some(csi::CapacityRange {
            required_bytes: -5,
            limit_bytes: 0,
        });
        cases.push(("negative capacity", r, Code::InvalidArgument));
        let mut r = create_req("e9", 1 << 20);
        r.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![csi::Topology {
                segments: [("stowage.csi.dev/node".to_string(), "node-b".to_string())].into(),
            }],
            preferred: vec![],
        });
        cases.push(("requisite topology elsewhere", r, Code::ResourceExhausted));
        let mut r = create_req("e10", 1 << 20);
        r.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: "x".into(),
                },
            )),
        });
        // Snapshots are served now: an id stowage never minted is the spec's "source does
        // not exist".
        cases.push(("content source never minted", r, Code::NotFound));
        let mut r = create_req("e11", 1 << 20);
        r.volume_content_source = Some(csi::VolumeContentSource { r#type: None });
        cases.push(("content source naming nothing", r, Code::InvalidArgument));
        for (what, req, want) in cases {
            let got = c.create_volume(req.clone()).await;
            if let Err(s) = &got {
                if what == "unknown parameter" {
                    assert!(
                        s.message().contains("replicas"),
                        "message does not name the key: {s:?}"
                    );
                }
            }
            assert_eq!(code(got), want, "{what}");
            // Repeated: the same answer.
            assert_eq!(code(c.create_volume(req).await), want, "{what}, repeated");
        }
        // None of the refused requests left anything behind.
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(list.entries.is_empty(), "{list:?}");
        assert_eq!(std::fs::read_dir(h.pool_volumes()).unwrap().count(), 0);

        // Requisite topology naming this node is honoured.
        let mut r = create_req("topo", 1 << 20);
        r.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![
                csi::Topology {
                    segments: [("stowage.csi.dev/node".to_string(), "node-b".to_string())].into(),
                },
                csi::Topology {
                    segments: [("stowage.csi.dev/node".to_string(), "node-a".to_string())].into(),
                },
            ],
            preferred: vec![],
        });
        c.create_volume(r).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn delete_volume_is_idempotent_and_never_touches_paths_from_ids() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "del", 1 << 20).await;
        let del = |id: &str| csi::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            secrets: HashMap::new(),
        };
        c.delete_volume(del(&v.volume_id)).await.unwrap();
        assert!(!h.pool_volumes().join(&v.volume_id).exists());
        c.delete_volume(del(&v.volume_id)).await.unwrap();
        // An unknown but well-formed id, and ids that look like paths: OK, nothing touched.
        let canary = h.dir.path().join("canary");
        std::fs::write(&canary, b"keep").unwrap();
        for id in [
            "stw-00000000000000000000000000000000",
            "../../canary",
            "..",
            "/etc/passwd",
            "fake-vol-id",
        ] {
            assert_eq!(code(c.delete_volume(del(id)).await), Code::Ok, "{id}");
        }
        assert_eq!(std::fs::read(&canary).unwrap(), b"keep");
        assert_eq!(code(c.delete_volume(del("")).await), Code::InvalidArgument);
        assert_eq!(
            code(c.delete_volume(del("a\0b")).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(c.delete_volume(del(&"x".repeat(129))).await),
            Code::InvalidArgument
        );
    })
    .await
}

#[tokio::test]
async fn delete_removes_a_hostile_tree_and_leaves_the_outside_intact() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "hostile", 1 << 20).await;
        let root = h.pool_volumes().join(&v.volume_id);
        let outside = h.dir.path().join("outside.txt");
        std::fs::write(&outside, b"host data").unwrap();
        std::fs::create_dir_all(root.join("a/b/c")).unwrap();
        std::fs::write(root.join("a/b/c/file"), b"x").unwrap();
        symlink("/", root.join("symlink-door")).unwrap();
        symlink(&outside, root.join("a/to-outside")).unwrap();
        symlink("../../../../../../../../etc", root.join("a/b/up")).unwrap();
        std::fs::hard_link(&outside, root.join("a/hardlink")).unwrap_or(());
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        assert!(!root.exists());
        assert_eq!(std::fs::read(&outside).unwrap(), b"host data");
        assert!(std::path::Path::new("/etc/passwd").exists());
    })
    .await
}

#[tokio::test]
async fn validate_list_get_and_capacity() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let mut ids = Vec::new();
        for i in 0..5 {
            let v = create_volume(&mut c, &format!("v{i}"), 1 << 20).await;
            ids.push(v);
        }
        // ValidateVolumeCapabilities.
        let vreq =
            |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.to_owned(),
                volume_capabilities: caps,
                ..Default::default()
            };
        let ok = c
            .validate_volume_capabilities(vreq(
                &ids[0].volume_id,
                vec![mount_cap(Mode::SingleNodeWriter)],
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(ok.confirmed.is_some(), "{ok:?}");
        let mut with_ctx = vreq(
            &ids[0].volume_id,
            vec![mount_cap(Mode::SingleNodeMultiWriter)],
        );
        with_ctx.volume_context = ids[0].volume_context.clone();
        assert!(c
            .validate_volume_capabilities(with_ctx)
            .await
            .unwrap()
            .into_inner()
            .confirmed
            .is_some());
        let mut wrong_ctx = vreq(&ids[0].volume_id, vec![mount_cap(Mode::SingleNodeWriter)]);
        wrong_ctx
            .volume_context
            .insert("pool".into(), "other".into());
        let r = c
            .validate_volume_capabilities(wrong_ctx)
            .await
            .unwrap()
            .into_inner();
        assert!(r.confirmed.is_none() && !r.message.is_empty());
        let r = c
            .validate_volume_capabilities(vreq(&ids[0].volume_id, vec![block_cap()]))
            .await
            .unwrap()
            .into_inner();
        assert!(r.confirmed.is_none() && !r.message.is_empty());
        let r = c
            .validate_volume_capabilities(vreq(
                &ids[0].volume_id,
                vec![mount_cap(Mode::MultiNodeReaderOnly)],
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(r.confirmed.is_none());
        assert_eq!(
            code(
                c.validate_volume_capabilities(vreq(
                    "stw-00000000000000000000000000000000",
                    vec![mount_cap(Mode::SingleNodeWriter)]
                ))
                .await
            ),
            Code::NotFound
        );
        assert_eq!(
            code(
                c.validate_volume_capabilities(vreq(
                    "../x",
                    vec![mount_cap(Mode::SingleNodeWriter)]
                ))
                .await
            ),
            Code::NotFound
        );
        assert_eq!(
            code(
                c.validate_volume_capabilities(vreq("", vec![mount_cap(Mode::SingleNodeWriter)]))
                    .await
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                c.validate_volume_capabilities(vreq(&ids[0].volume_id, vec![]))
                    .await
            ),
            Code::InvalidArgument
        );

        // ListVolumes with pagination.
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(page.entries.len() <= 2);
            for e in &page.entries {
                let st = e.status.as_ref().unwrap();
                assert!(st.published_node_ids.is_empty());
                let cond = st.volume_condition.as_ref().unwrap();
                assert!(!cond.abnormal, "{cond:?}");
                assert!(cond.message.contains("advisory"), "{cond:?}");
                seen.push(e.volume.as_ref().unwrap().volume_id.clone());
            }
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        let mut want: Vec<String> = ids.iter().map(|v| v.volume_id.clone()).collect();
        want.sort();
        seen.sort();
        assert_eq!(seen, want);
        assert_eq!(
            code(
                c.list_volumes(csi::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: "bogus".into()
                })
                .await
            ),
            Code::Aborted
        );
        assert_eq!(
            code(
                c.list_volumes(csi::ListVolumesRequest {
                    max_entries: 0,
                    starting_token: "999999".into()
                })
                .await
            ),
            Code::Aborted
        );
        assert_eq!(
            code(
                c.list_volumes(csi::ListVolumesRequest {
                    max_entries: -1,
                    starting_token: String::new()
                })
                .await
            ),
            Code::InvalidArgument
        );

        // A volume whose directory vanished is reported abnormal.
        std::fs::remove_dir(h.pool_volumes().join(&ids[4].volume_id)).unwrap();
        let got = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: ids[4].volume_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let cond = got.status.unwrap().volume_condition.unwrap();
        assert!(
            cond.abnormal && cond.message.contains("missing"),
            "{cond:?}"
        );
        let got = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: ids[0].volume_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.volume.unwrap().volume_id, ids[0].volume_id);
        assert_eq!(
            code(
                c.controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: "stw-00000000000000000000000000000000".into()
                })
                .await
            ),
            Code::NotFound
        );
        assert_eq!(
            code(
                c.controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: String::new()
                })
                .await
            ),
            Code::InvalidArgument
        );

        // GetCapacity: real free space; zero where this node cannot serve.
        let cap = c
            .get_capacity(csi::GetCapacityRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(cap.available_capacity > 0);
        let elsewhere = csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: [("stowage.csi.dev/node".to_string(), "node-b".to_string())].into(),
            }),
            ..Default::default()
        };
        assert_eq!(
            c.get_capacity(elsewhere)
                .await
                .unwrap()
                .into_inner()
                .available_capacity,
            0
        );
        let here = csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: [("stowage.csi.dev/node".to_string(), "node-a".to_string())].into(),
            }),
            parameters: [("pool".to_string(), "default".to_string())].into(),
            volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        };
        assert!(
            c.get_capacity(here)
                .await
                .unwrap()
                .into_inner()
                .available_capacity
                > 0
        );
        let block = csi::GetCapacityRequest {
            volume_capabilities: vec![block_cap()],
            ..Default::default()
        };
        assert_eq!(
            c.get_capacity(block)
                .await
                .unwrap()
                .into_inner()
                .available_capacity,
            0
        );
        let bad = csi::GetCapacityRequest {
            parameters: [("speed".to_string(), "fast".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(code(c.get_capacity(bad).await), Code::InvalidArgument);

        // Capabilities, and what is not offered.
        let caps = c
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        use csi::controller_service_capability::rpc::Type;
        let got: Vec<i32> = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        for want in [
            Type::CreateDeleteVolume,
            Type::ListVolumes,
            Type::ListVolumesPublishedNodes,
            Type::GetCapacity,
            Type::GetVolume,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::GetSnapshot,
            Type::CloneVolume,
        ] {
            assert!(got.contains(&(want as i32)), "{want:?} missing");
        }
        assert_eq!(
            code(
                c.controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
                    .await
            ),
            Code::Unimplemented
        );
        // Served: a request without a name is INVALID_ARGUMENT.
        assert_eq!(
            code(
                c.create_snapshot(csi::CreateSnapshotRequest::default())
                    .await
            ),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                c.controller_expand_volume(csi::ControllerExpandVolumeRequest::default())
                    .await
            ),
            Code::InvalidArgument
        );
    })
    .await
}

/// `--controller-expansion false`: ControllerGetCapabilities leaves EXPAND_VOLUME out, the RPC
/// is UNIMPLEMENTED, and the node service still offers its own EXPAND_VOLUME (the step that
/// then does the whole resize on the volume's node).
#[tokio::test]
async fn controller_expansion_can_be_left_to_the_node() {
    bounded(async {
        let controller_rpcs = |caps: csi::ControllerGetCapabilitiesResponse| -> Vec<i32> {
            caps.capabilities
                .iter()
                .filter_map(|c| match &c.r#type {
                    Some(csi::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
                    _ => None,
                })
                .collect()
        };
        use csi::controller_service_capability::rpc::Type;
        let expand = Type::ExpandVolume as i32;
        let on = Harness::start(&[]).await;
        let caps = on
            .controller()
            .await
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(controller_rpcs(caps).contains(&expand));

        let off = Harness::start(&["--controller-expansion", "false"]).await;
        let mut c = off.controller().await;
        let caps = c
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        let got = controller_rpcs(caps);
        assert!(!got.contains(&expand), "EXPAND_VOLUME still offered: {got:?}");
        assert!(got.contains(&(Type::CreateDeleteVolume as i32)));
        let id = create_volume(&mut c, "grown-on-node", 1 << 20).await.volume_id;
        let req = csi::ControllerExpandVolumeRequest {
            volume_id: id,
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        assert_eq!(code(c.controller_expand_volume(req).await), Code::Unimplemented);
        let node_caps = off
            .node()
            .await
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        use csi::node_service_capability::rpc::Type as NodeType;
        assert!(node_caps.capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(csi::node_service_capability::Type::Rpc(r)) if r.r#type == NodeType::ExpandVolume as i32
        )));
    })
    .await
}

#[tokio::test]
async fn parallel_creates_on_different_volumes_all_succeed() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut tasks = Vec::new();
        for i in 0..16 {
            let mut c = h.controller().await;
            tasks.push(tokio::spawn(async move {
                c.create_volume(create_req(&format!("par-{i}"), 1 << 20))
                    .await
                    .map(|r| r.into_inner())
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let mut c = h.controller().await;
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.entries.len(), 16);
    })
    .await
}

#[tokio::test]
async fn state_survives_a_restart_and_sigterm_exits_cleanly() {
    bounded(async {
        let mut h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "kept", 1 << 20).await;
        std::fs::write(
            h.pool_volumes().join(&v.volume_id).join("data"),
            b"precious",
        )
        .unwrap();
        let status = h.stop();
        assert!(status.success(), "exit status {status}");
        assert!(
            !std::path::Path::new(h.endpoint.trim_start_matches("unix://")).exists(),
            "socket left behind"
        );
        h.spawn().await;
        let mut c = h.controller().await;
        let again = create_volume(&mut c, "kept", 1 << 20).await;
        assert_eq!(again.volume_id, v.volume_id);
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.entries.len(), 1);
        assert_eq!(
            std::fs::read(h.pool_volumes().join(&v.volume_id).join("data")).unwrap(),
            b"precious"
        );
    })
    .await
}

#[tokio::test]
async fn reconciliation_finishes_interrupted_creates_and_deletes() {
    bounded(async {
        let mut h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let doomed = create_volume(&mut c, "doomed", 1 << 20).await;
        std::fs::write(h.pool_volumes().join(&doomed.volume_id).join("f"), b"x").unwrap();
        h.crash();
        // Leave the store as a crash would: one create recorded but not acted on, one delete
        // decided but not carried out.
        let half_created = stowage_core::VolumeId::generate();
        {
            let store =
                stowage_driver::store::Store::open(&h.state_dir().join("stowage.db")).unwrap();
            store
                .insert_volume(&stowage_driver::store::NewVolume {
                    id: &half_created,
                    name: "interrupted",
                    pool: "default",
                    capacity: 1 << 20,
                    block: false,
                    pvc_name: None,
                    pvc_namespace: None,
                    pv_name: None,
                    full_allocation: false,
                    source: None,
                    fs_type: None,
                    block_size: None,
                })
                .unwrap();
            let doomed_id = stowage_core::VolumeId::parse(&doomed.volume_id).unwrap();
            store
                .set_volume_state(&doomed_id, stowage_driver::store::VolumeState::Deleting)
                .unwrap();
        }
        h.spawn().await;
        assert!(
            h.pool_volumes().join(half_created.as_str()).is_dir(),
            "interrupted create not finished"
        );
        assert!(
            !h.pool_volumes().join(&doomed.volume_id).exists(),
            "interrupted delete not finished"
        );
        let mut c = h.controller().await;
        // The retried call continues where it left off: the same volume.
        let v = create_volume(&mut c, "interrupted", 1 << 20).await;
        assert_eq!(v.volume_id, half_created.as_str());
        let list = c
            .list_volumes(csi::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.entries.len(), 1);
    })
    .await
}

#[tokio::test]
async fn modes_serve_only_their_services() {
    bounded(async {
        let h = Harness::start(&["--mode", "controller"]).await;
        let mut n = h.node().await;
        assert_eq!(code(n.node_get_info(csi::NodeGetInfoRequest {}).await), Code::Unimplemented);
        h.controller().await.list_volumes(csi::ListVolumesRequest::default()).await.unwrap();
        drop(h);
        let h = Harness::start(&["--mode", "node"]).await;
        let mut c = h.controller().await;
        assert_eq!(code(c.list_volumes(csi::ListVolumesRequest::default()).await), Code::Unimplemented);
        let info = h.node().await.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.node_id, "node-a");
        let caps = h.identity().await.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
        use csi::plugin_capability::service::Type;
        assert!(!caps.capabilities.iter().any(|c| matches!(&c.r#type, Some(csi::plugin_capability::Type::Service(s)) if s.r#type == Type::ControllerService as i32)));
    })
    .await
}

#[tokio::test]
async fn pagination_survives_deletes_and_creates_between_pages() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(
                create_volume(&mut c, &format!("page-{i}"), 1 << 20)
                    .await
                    .volume_id,
            );
        }
        let first = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.entries.len(), 2);
        assert!(!first.next_token.is_empty());
        // The last volume of the first page goes away, a new one arrives.
        let last = first.entries[1].volume.as_ref().unwrap().volume_id.clone();
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: last.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        let added = create_volume(&mut c, "page-new", 1 << 20).await.volume_id;
        let mut seen: Vec<String> = first
            .entries
            .iter()
            .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
            .collect();
        let mut token = first.next_token;
        while !token.is_empty() {
            let page = c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            seen.extend(
                page.entries
                    .iter()
                    .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
            );
            token = page.next_token;
        }
        for id in ids.iter().filter(|id| **id != last) {
            assert!(seen.contains(id), "{id} missing from the listing");
        }
        assert!(seen.contains(&added));
        // The token handed out before a restart is not honoured after it.
        let before = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 1,
                starting_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .next_token;
        let mut h = h;
        assert!(h.stop().success());
        h.spawn().await;
        let mut c = h.controller().await;
        assert_eq!(
            code(
                c.list_volumes(csi::ListVolumesRequest {
                    max_entries: 1,
                    starting_token: before
                })
                .await
            ),
            Code::Aborted
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_mid_workload_leaves_store_and_disk_consistent() {
    bounded(async {
        let mut h = Harness::start(&[]).await;
        // Keep some volumes, then crash the driver while a concurrent create/delete load runs.
        let mut c = h.controller().await;
        for i in 0..10 {
            create_volume(&mut c, &format!("keep-{i}"), 1 << 20).await;
        }
        let mut load = std::process::Command::new(env!("CARGO_BIN_EXE_stowage"))
            .args([
                "bench",
                "--endpoint",
                &h.endpoint,
                "--workload",
                "create-delete",
            ])
            .args([
                "--count",
                "100000",
                "--concurrency",
                "16",
                "--timeout",
                "5s",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Crash only once the load is really running.
        let deadline = std::time::Instant::now() + scaled_secs(30);
        while h
            .log_text()
            .matches("method=\"CreateVolume\" volume=bench-")
            .count()
            < 200
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the load never started"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        h.crash();
        let _ = load.kill();
        let _ = load.wait();
        h.spawn().await;

        // Every listed volume has its directory, and every directory is a listed volume:
        // nothing half-created survived reconciliation, nothing was orphaned.
        let mut c = h.controller().await;
        let mut listed = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .list_volumes(csi::ListVolumesRequest {
                    max_entries: 500,
                    starting_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            listed.extend(
                page.entries
                    .into_iter()
                    .map(|e| e.volume.unwrap().volume_id),
            );
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        let mut dirs: Vec<String> = std::fs::read_dir(h.pool_volumes())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        listed.sort();
        dirs.sort();
        assert_eq!(listed, dirs, "store and pool disagree after a crash");
        assert!(listed.len() >= 10);
        assert!(
            !h.log_text().contains("no volume record names"),
            "orphans after a crash"
        );
        // The kept volumes are all still there and idempotent.
        for i in 0..10 {
            create_volume(&mut c, &format!("keep-{i}"), 1 << 20).await;
        }
    })
    .await
}
