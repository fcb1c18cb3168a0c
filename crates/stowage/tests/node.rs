//! The Node service over the real socket with real mounts: lifecycle, the spec's error codes,
//! repeated calls, read-only publish, restarts, and the hostile-content cases (the 2018
//! subPath attack, symlinked targets, symlinks to big host files).

mod common;

use std::collections::HashMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::Code;

struct Vol {
    id: String,
    staging: PathBuf,
    target: PathBuf,
}

async fn new_volume(h: &Harness, name: &str) -> Vol {
    let mut c = h.controller().await;
    let v = create_volume(&mut c, name, 64 << 20).await;
    let pod = h
        .kubelet()
        .join("pods")
        .join(format!("uid-{name}"))
        .join("volumes");
    std::fs::create_dir_all(&pod).unwrap();
    let plugin = h
        .kubelet()
        .join("plugins/kubernetes.io/csi/stowage.csi.dev")
        .join(name);
    std::fs::create_dir_all(&plugin).unwrap();
    Vol {
        id: v.volume_id,
        staging: plugin.join("globalmount"),
        target: pod.join("mount"),
    }
}

fn stage_req(v: &Vol, cap: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish_req(
    v: &Vol,
    cap: csi::VolumeCapability,
    readonly: bool,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.display().to_string(),
        target_path: v.target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(v: &Vol) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        target_path: v.target.display().to_string(),
    }
}

fn unstage_req(v: &Vol) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.display().to_string(),
    }
}

fn stats_req(v: &Vol, path: &Path) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest {
        volume_id: v.id.clone(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    }
}

async fn stage_and_publish(n: &mut csi::node_client::NodeClient<Channel>, v: &Vol) {
    n.node_stage_volume(stage_req(v, mount_cap(Mode::SingleNodeWriter)))
        .await
        .unwrap();
    n.node_publish_volume(publish_req(v, mount_cap(Mode::SingleNodeWriter), false))
        .await
        .unwrap();
}

fn usage(r: &csi::NodeGetVolumeStatsResponse, unit: csi::volume_usage::Unit) -> csi::VolumeUsage {
    r.usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .cloned()
        .expect("usage unit")
}

#[tokio::test]
async fn lifecycle_is_idempotent_and_leaves_nothing_behind() {
    if !root_or_skip("lifecycle_is_idempotent_and_leaves_nothing_behind") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "life").await;
        for _ in 0..2 {
            n.node_stage_volume(stage_req(&v, mount_cap(Mode::SingleNodeWriter)))
                .await
                .unwrap();
        }
        assert_eq!(mount_count(&v.staging), 1);
        for _ in 0..2 {
            n.node_publish_volume(publish_req(&v, mount_cap(Mode::SingleNodeWriter), false))
                .await
                .unwrap();
        }
        assert_eq!(
            mount_count(&v.target),
            1,
            "repeated publish stacked a mount"
        );
        let opts = mount_options(&v.target).unwrap();
        assert!(
            opts.contains("nosuid") && opts.contains("nodev") && opts.starts_with("rw"),
            "{opts}"
        );
        std::fs::write(v.target.join("hello"), b"from the pod").unwrap();
        assert_eq!(
            std::fs::read(h.pool_volumes().join(&v.id).join("hello")).unwrap(),
            b"from the pod"
        );

        // The controller sees the publication, and refuses to delete the volume.
        let mut c = h.controller().await;
        let got = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: v.id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            got.status.unwrap().published_node_ids,
            vec!["node-a".to_string()]
        );
        let del = csi::DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: HashMap::new(),
        };
        assert_eq!(
            code(c.delete_volume(del.clone()).await),
            Code::FailedPrecondition
        );
        assert_eq!(
            std::fs::read(v.target.join("hello")).unwrap(),
            b"from the pod"
        );
        // Unstaging under a live publication is refused too.
        assert_eq!(
            code(n.node_unstage_volume(unstage_req(&v)).await),
            Code::FailedPrecondition
        );

        let stats = n
            .node_get_volume_stats(stats_req(&v, &v.target))
            .await
            .unwrap()
            .into_inner();
        let bytes = usage(&stats, csi::volume_usage::Unit::Bytes);
        assert_eq!(bytes.total, 64 << 20);
        assert!(bytes.used > 0 && bytes.used < 1 << 20, "{bytes:?}");
        assert!(!stats.volume_condition.as_ref().unwrap().abnormal);
        let inodes = usage(&stats, csi::volume_usage::Unit::Inodes);
        assert!(inodes.used >= 2, "{inodes:?}");
        n.node_get_volume_stats(stats_req(&v, &v.staging))
            .await
            .unwrap();

        for _ in 0..2 {
            n.node_unpublish_volume(unpublish_req(&v)).await.unwrap();
        }
        assert_eq!(mount_count(&v.target), 0);
        assert!(
            !v.target.exists(),
            "the target directory the driver made was left behind"
        );
        for _ in 0..2 {
            n.node_unstage_volume(unstage_req(&v)).await.unwrap();
        }
        assert_eq!(mount_count(&v.staging), 0);
        assert!(!v.staging.exists());
        // The data stays with the volume until it is deleted.
        assert!(h.pool_volumes().join(&v.id).join("hello").exists());
        c.delete_volume(del).await.unwrap();
        assert!(mounts_under(h.dir.path()).is_empty());
    })
    .await
}

#[tokio::test]
async fn node_error_codes() {
    if !root_or_skip("node_error_codes") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "errs").await;
        let cap = || mount_cap(Mode::SingleNodeWriter);

        // Stage.
        let mut r = stage_req(&v, cap());
        r.volume_id.clear();
        assert_eq!(code(n.node_stage_volume(r).await), Code::InvalidArgument);
        let mut r = stage_req(&v, cap());
        r.staging_target_path.clear();
        assert_eq!(code(n.node_stage_volume(r).await), Code::InvalidArgument);
        let mut r = stage_req(&v, cap());
        r.volume_capability = None;
        assert_eq!(code(n.node_stage_volume(r).await), Code::InvalidArgument);
        let mut r = stage_req(&v, cap());
        r.volume_id = "stw-00000000000000000000000000000000".into();
        assert_eq!(code(n.node_stage_volume(r).await), Code::NotFound);
        let mut r = stage_req(&v, block_cap());
        r.staging_target_path = v.staging.display().to_string();
        assert_eq!(code(n.node_stage_volume(r).await), Code::InvalidArgument);
        let mut r = stage_req(&v, cap());
        r.staging_target_path = h.dir.path().join("elsewhere").display().to_string();
        assert_eq!(
            code(n.node_stage_volume(r).await),
            Code::InvalidArgument,
            "outside the kubelet dir"
        );
        let mut r = stage_req(&v, cap());
        r.staging_target_path = format!("{}/../../escape", v.staging.display());
        assert_eq!(
            code(n.node_stage_volume(r).await),
            Code::InvalidArgument,
            ".."
        );
        let mut r = stage_req(&v, cap());
        r.staging_target_path = "relative/path".into();
        assert_eq!(code(n.node_stage_volume(r).await), Code::InvalidArgument);

        // Publish before stage.
        assert_eq!(
            code(n.node_publish_volume(publish_req(&v, cap(), false)).await),
            Code::FailedPrecondition
        );
        n.node_stage_volume(stage_req(&v, cap())).await.unwrap();
        // Staged again with another capability: ALREADY_EXISTS.
        assert_eq!(
            code(
                n.node_stage_volume(stage_req(
                    &v,
                    mount_cap_flags(Mode::SingleNodeWriter, &["noexec"])
                ))
                .await
            ),
            Code::AlreadyExists
        );
        let mut r = publish_req(&v, cap(), false);
        r.target_path.clear();
        assert_eq!(code(n.node_publish_volume(r).await), Code::InvalidArgument);
        let mut r = publish_req(&v, cap(), false);
        r.volume_capability = None;
        assert_eq!(code(n.node_publish_volume(r).await), Code::InvalidArgument);
        let mut r = publish_req(&v, cap(), false);
        r.volume_id = "stw-00000000000000000000000000000000".into();
        assert_eq!(code(n.node_publish_volume(r).await), Code::NotFound);
        let r = publish_req(
            &v,
            mount_cap_flags(Mode::SingleNodeWriter, &["suid"]),
            false,
        );
        assert_eq!(
            code(n.node_publish_volume(r).await),
            Code::InvalidArgument,
            "flag off the allow-list"
        );
        let r = publish_req(&v, mount_cap(Mode::MultiNodeMultiWriter), false);
        assert_eq!(code(n.node_publish_volume(r).await), Code::InvalidArgument);

        n.node_publish_volume(publish_req(&v, cap(), false))
            .await
            .unwrap();
        // Same target, different arguments.
        assert_eq!(
            code(n.node_publish_volume(publish_req(&v, cap(), true)).await),
            Code::AlreadyExists
        );
        assert_eq!(mount_count(&v.target), 1);

        // SINGLE_NODE_SINGLE_WRITER at a second target.
        let w = new_volume(&h, "ssw").await;
        let ssw = || mount_cap(Mode::SingleNodeSingleWriter);
        n.node_stage_volume(stage_req(&w, ssw())).await.unwrap();
        n.node_publish_volume(publish_req(&w, ssw(), false))
            .await
            .unwrap();
        let mut second = publish_req(&w, ssw(), false);
        let second_target = w.target.parent().unwrap().join("second");
        second.target_path = second_target.display().to_string();
        assert_eq!(
            code(n.node_publish_volume(second).await),
            Code::FailedPrecondition
        );
        assert!(!second_target.exists());
        // SINGLE_NODE_MULTI_WRITER may be published twice.
        let m = new_volume(&h, "snmw").await;
        let snmw = || mount_cap(Mode::SingleNodeMultiWriter);
        n.node_stage_volume(stage_req(&m, snmw())).await.unwrap();
        n.node_publish_volume(publish_req(&m, snmw(), false))
            .await
            .unwrap();
        let mut again = publish_req(&m, snmw(), false);
        again.target_path = m
            .target
            .parent()
            .unwrap()
            .join("second")
            .display()
            .to_string();
        n.node_publish_volume(again.clone()).await.unwrap();
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: m.id.clone(),
            target_path: again.target_path.clone(),
        })
        .await
        .unwrap();

        // Unpublish / unstage of what is not there: OK. Missing fields: INVALID_ARGUMENT.
        let nowhere = csi::NodeUnpublishVolumeRequest {
            volume_id: v.id.clone(),
            target_path: h.kubelet().join("pods/none/mount").display().to_string(),
        };
        assert_eq!(code(n.node_unpublish_volume(nowhere).await), Code::Ok);
        let mut r = unpublish_req(&v);
        r.target_path.clear();
        assert_eq!(
            code(n.node_unpublish_volume(r).await),
            Code::InvalidArgument
        );
        let mut r = unpublish_req(&v);
        r.volume_id.clear();
        assert_eq!(
            code(n.node_unpublish_volume(r).await),
            Code::InvalidArgument
        );
        let mut r = unpublish_req(&v);
        r.volume_id = "stw-00000000000000000000000000000000".into();
        assert_eq!(code(n.node_unpublish_volume(r).await), Code::NotFound);
        let mut r = unstage_req(&v);
        r.staging_target_path = h.kubelet().join("plugins/none").display().to_string();
        assert_eq!(code(n.node_unstage_volume(r).await), Code::Ok);

        // Stats.
        assert_eq!(
            code(
                n.node_get_volume_stats(stats_req(&v, &h.kubelet().join("pods")))
                    .await
            ),
            Code::NotFound
        );
        let mut r = stats_req(&v, &v.target);
        r.volume_id = "stw-00000000000000000000000000000000".into();
        assert_eq!(code(n.node_get_volume_stats(r).await), Code::NotFound);
        // An unknown volume is NOT_FOUND even with a placeholder path, and so is a known
        // volume at a path that is not absolute (the paths_where_the_volume_is_not test has
        // the whole table).
        let mut r = stats_req(&v, &v.target);
        r.volume_id = "some-volume-id".into();
        r.volume_path = "some/path".into();
        assert_eq!(code(n.node_get_volume_stats(r).await), Code::NotFound);
        let mut r = stats_req(&v, &v.target);
        r.volume_path = "some/path".into();
        assert_eq!(code(n.node_get_volume_stats(r).await), Code::NotFound);
        let mut r = stats_req(&v, &v.target);
        r.volume_path.clear();
        assert_eq!(
            code(n.node_get_volume_stats(r).await),
            Code::InvalidArgument
        );
        assert_eq!(
            code(
                n.node_expand_volume(csi::NodeExpandVolumeRequest::default())
                    .await
            ),
            Code::InvalidArgument
        );

        // Mounts made here are exactly the expected ones: nothing else got mounted.
        let mut expected = vec![
            v.staging.clone(),
            v.target.clone(),
            w.staging.clone(),
            w.target.clone(),
            m.staging.clone(),
            m.target.clone(),
        ];
        expected.sort();
        let mut got = mounts_under(h.dir.path());
        got.sort();
        assert_eq!(got, expected);
    })
    .await
}

/// Where a volume is not staged or published, whatever the path looks like: NodeGetVolumeStats
/// answers NOT_FOUND, NodeUnpublishVolume and NodeUnstageVolume answer OK and touch nothing.
/// Only a malformed path (empty, NUL, too long) is INVALID_ARGUMENT.
#[tokio::test]
async fn paths_where_the_volume_is_not() {
    if !root_or_skip("paths_where_the_volume_is_not") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "here").await;
        let w = new_volume(&h, "there").await;
        stage_and_publish(&mut n, &v).await;
        stage_and_publish(&mut n, &w).await;
        let outside = h.dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let plain = h.kubelet().join("pods/plain-dir");
        std::fs::create_dir_all(&plain).unwrap();
        let too_long = format!("/{}", "a".repeat(5000));
        let show = |p: &Path| p.display().to_string();

        let nowhere: Vec<(&str, String)> = vec![
            ("relative", "some/path".into()),
            (
                "relative to the kubelet dir",
                "pods/uid-here/volumes/mount".into(),
            ),
            ("dot-dot", format!("{}/../mount", show(&v.target))),
            (
                "dot",
                format!("{}/./mount", show(v.target.parent().unwrap())),
            ),
            ("root", "/".into()),
            ("outside the kubelet dir", show(&outside)),
            (
                "outside, does not exist",
                show(&outside.join("none/at/all")),
            ),
            ("missing parent", show(&h.kubelet().join("pods/none/mount"))),
            (
                "missing leaf",
                show(&h.kubelet().join("pods/plain-dir/mount")),
            ),
            ("a plain directory", show(&plain)),
            ("the kubelet dir", show(&h.kubelet())),
            ("another volume's target", show(&w.target)),
            ("another volume's staging path", show(&w.staging)),
            ("below the target", show(&v.target.join("sub"))),
        ];
        let malformed: Vec<(&str, String)> = vec![
            ("empty", String::new()),
            ("NUL", format!("{}\0x", show(&v.target))),
            ("too long", too_long),
        ];
        for (what, path) in &nowhere {
            let mut r = stats_req(&v, &v.target);
            r.volume_path = path.clone();
            assert_eq!(
                code(n.node_get_volume_stats(r).await),
                Code::NotFound,
                "stats at {what}"
            );
            let mut r = unpublish_req(&v);
            r.target_path = path.clone();
            assert_eq!(
                code(n.node_unpublish_volume(r).await),
                Code::Ok,
                "unpublish at {what}"
            );
            let mut r = unstage_req(&v);
            r.staging_target_path = path.clone();
            assert_eq!(
                code(n.node_unstage_volume(r).await),
                Code::Ok,
                "unstage at {what}"
            );
        }
        for (what, path) in &malformed {
            let mut r = stats_req(&v, &v.target);
            r.volume_path = path.clone();
            assert_eq!(
                code(n.node_get_volume_stats(r).await),
                Code::InvalidArgument,
                "stats at {what}"
            );
            let mut r = unpublish_req(&v);
            r.target_path = path.clone();
            assert_eq!(
                code(n.node_unpublish_volume(r).await),
                Code::InvalidArgument,
                "unpublish at {what}"
            );
            let mut r = unstage_req(&v);
            r.staging_target_path = path.clone();
            assert_eq!(
                code(n.node_unstage_volume(r).await),
                Code::InvalidArgument,
                "unstage at {what}"
            );
        }
        // The optional staging_target_path of NodeGetVolumeStats is a hint: any well-formed
        // value is accepted, a malformed one is not.
        let mut r = stats_req(&v, &v.target);
        r.staging_target_path = "some/staging/path".into();
        assert_eq!(code(n.node_get_volume_stats(r).await), Code::Ok);
        let mut r = stats_req(&v, &v.target);
        r.staging_target_path = "a\0b".into();
        assert_eq!(
            code(n.node_get_volume_stats(r).await),
            Code::InvalidArgument
        );
        // An unknown volume is NOT_FOUND before any path question.
        for (what, path) in nowhere.iter().take(1).chain(&nowhere[5..6]) {
            let mut r = stats_req(&v, &v.target);
            r.volume_id = "stw-00000000000000000000000000000000".into();
            r.volume_path = path.clone();
            assert_eq!(
                code(n.node_get_volume_stats(r).await),
                Code::NotFound,
                "unknown volume, stats at {what}"
            );
            let r = csi::NodeUnpublishVolumeRequest {
                volume_id: "stw-00000000000000000000000000000000".into(),
                target_path: path.clone(),
            };
            assert_eq!(
                code(n.node_unpublish_volume(r).await),
                Code::NotFound,
                "unknown volume, unpublish at {what}"
            );
        }

        // Where the volume is, stats answer; none of the calls above unmounted or removed
        // anything.
        for p in [&v.target, &v.staging] {
            n.node_get_volume_stats(stats_req(&v, p)).await.unwrap();
        }
        let mut expected = vec![
            v.staging.clone(),
            v.target.clone(),
            w.staging.clone(),
            w.target.clone(),
        ];
        expected.sort();
        let mut got = mounts_under(h.dir.path());
        got.sort();
        assert_eq!(got, expected);
        assert!(plain.is_dir() && outside.is_dir());
    })
    .await
}

#[tokio::test]
async fn read_only_publish_refuses_writes() {
    if !root_or_skip("read_only_publish_refuses_writes") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut n = h.node().await;
        for (name, mode, readonly) in [
            ("ro-flag", Mode::SingleNodeWriter, true),
            ("ro-mode", Mode::SingleNodeReaderOnly, false),
        ] {
            let v = new_volume(&h, name).await;
            n.node_stage_volume(stage_req(&v, mount_cap(mode)))
                .await
                .unwrap();
            n.node_publish_volume(publish_req(&v, mount_cap(mode), readonly))
                .await
                .unwrap();
            let opts = mount_options(&v.target).unwrap();
            assert!(opts.split(',').any(|o| o == "ro"), "{name}: {opts}");
            let err = std::fs::write(v.target.join("x"), b"no").unwrap_err();
            assert_eq!(
                err.raw_os_error(),
                Some(30),
                "{name}: expected EROFS, got {err}"
            );
            // The staging mount stays writable for the driver.
            std::fs::write(v.staging.join("ok"), b"yes").unwrap();
            let stats = n
                .node_get_volume_stats(stats_req(&v, &v.target))
                .await
                .unwrap()
                .into_inner();
            assert!(
                !stats.volume_condition.unwrap().abnormal,
                "{name}: read-only by request is not abnormal"
            );
        }
        // ro in the capability's mount flags, and noexec.
        let v = new_volume(&h, "ro-flags").await;
        let cap = mount_cap_flags(Mode::SingleNodeWriter, &["ro", "noexec"]);
        n.node_stage_volume(stage_req(&v, cap.clone()))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&v, cap, false))
            .await
            .unwrap();
        let opts = mount_options(&v.target).unwrap();
        assert!(
            opts.split(',').any(|o| o == "ro") && opts.contains("noexec"),
            "{opts}"
        );
    })
    .await
}

#[tokio::test]
async fn restart_keeps_published_volumes_untouched() {
    if !root_or_skip("restart_keeps_published_volumes_untouched") {
        return;
    }
    bounded(async {
        let mut h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "restart").await;
        stage_and_publish(&mut n, &v).await;
        std::fs::write(v.target.join("db"), b"rows").unwrap();
        assert!(h.stop().success());
        // The pod's view is untouched while the driver is down.
        assert_eq!(std::fs::read(v.target.join("db")).unwrap(), b"rows");
        std::fs::write(v.target.join("db2"), b"more").unwrap();
        h.spawn().await;
        let mut n = h.node().await;
        n.node_stage_volume(stage_req(&v, mount_cap(Mode::SingleNodeWriter)))
            .await
            .unwrap();
        n.node_publish_volume(publish_req(&v, mount_cap(Mode::SingleNodeWriter), false))
            .await
            .unwrap();
        assert_eq!(
            mount_count(&v.target),
            1,
            "a repeated publish after restart stacked a mount"
        );
        assert_eq!(mount_count(&v.staging), 1);
        n.node_unpublish_volume(unpublish_req(&v)).await.unwrap();
        n.node_unstage_volume(unstage_req(&v)).await.unwrap();
        assert!(mounts_under(h.dir.path()).is_empty());
        assert_eq!(
            std::fs::read(h.pool_volumes().join(&v.id).join("db2")).unwrap(),
            b"more"
        );

        // After a crash, and mounts gone (as after a reboot), stale records are cleaned: the
        // volume can be deleted without an unpublish.
        let w = new_volume(&h, "reboot").await;
        let mut n = h.node().await;
        stage_and_publish(&mut n, &w).await;
        h.crash();
        for m in mounts_under(h.dir.path()) {
            assert!(std::process::Command::new("umount")
                .arg(&m)
                .status()
                .unwrap()
                .success());
        }
        h.spawn().await;
        let mut c = h.controller().await;
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: w.id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        assert!(
            !w.target.exists(),
            "the driver-made target directory survived reconciliation"
        );
    })
    .await
}

#[tokio::test]
async fn symlinked_paths_are_refused_and_nothing_is_mounted() {
    if !root_or_skip("symlinked_paths_are_refused_and_nothing_is_mounted") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "links").await;
        let victim = h.dir.path().join("victim");
        std::fs::create_dir_all(&victim).unwrap();

        // A staging path that is a symlink.
        symlink(&victim, &v.staging).unwrap();
        assert_eq!(
            code(
                n.node_stage_volume(stage_req(&v, mount_cap(Mode::SingleNodeWriter)))
                    .await
            ),
            Code::InvalidArgument
        );
        std::fs::remove_file(&v.staging).unwrap();
        n.node_stage_volume(stage_req(&v, mount_cap(Mode::SingleNodeWriter)))
            .await
            .unwrap();

        // A pre-created symlink at target_path.
        symlink(&victim, &v.target).unwrap();
        assert_eq!(
            code(
                n.node_publish_volume(publish_req(&v, mount_cap(Mode::SingleNodeWriter), false))
                    .await
            ),
            Code::InvalidArgument
        );
        // A target whose parent passes through a symlink.
        let linked_parent = h.kubelet().join("pods/linked");
        symlink(&victim, &linked_parent).unwrap();
        let mut r = publish_req(&v, mount_cap(Mode::SingleNodeWriter), false);
        r.target_path = linked_parent.join("mount").display().to_string();
        assert_eq!(code(n.node_publish_volume(r).await), Code::InvalidArgument);
        // Unpublish through a symlink never unmounts what it points at. Nothing was
        // published there (the publish was refused), so the spec's answer is OK.
        assert_eq!(
            code(n.node_unpublish_volume(unpublish_req(&v)).await),
            Code::Ok
        );
        let mut r = unpublish_req(&v);
        r.target_path = linked_parent.join("mount").display().to_string();
        assert_eq!(code(n.node_unpublish_volume(r).await), Code::Ok);
        // Unstage through a symlinked parent does not reach the real staging mount either.
        let mut r = unstage_req(&v);
        r.staging_target_path = linked_parent.join("globalmount").display().to_string();
        assert_eq!(code(n.node_unstage_volume(r).await), Code::Ok);
        assert!(v.target.is_symlink(), "the symlink was left as it was");

        assert_eq!(mounts_under(h.dir.path()), vec![v.staging.clone()]);
        assert_eq!(
            std::fs::read_dir(&victim).unwrap().count(),
            0,
            "something reached the symlink's target"
        );
    })
    .await
}

#[tokio::test]
async fn the_seed_attack_never_exposes_the_host() {
    if !root_or_skip("the_seed_attack_never_exposes_the_host") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "seed").await;
        stage_and_publish(&mut n, &v).await;
        // The pod plants a door to the host root and a door to a big host file.
        symlink("/", v.target.join("symlink-door")).unwrap();
        let big = h.dir.path().join("big-host-file");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(256 << 20).unwrap();
        use std::io::Write;
        (&f).write_all(&vec![1u8; 4 << 20]).unwrap();
        f.sync_all().unwrap();
        for i in 0..50 {
            symlink(&big, v.target.join(format!("link-{i}"))).unwrap();
        }
        std::fs::create_dir(v.target.join("sub")).unwrap();
        symlink("../../../../../../../../..", v.target.join("sub/up")).unwrap();
        std::fs::write(v.target.join("sub/real"), vec![7u8; 2 << 20]).unwrap();

        // Every Node call, repeated.
        for _ in 0..2 {
            n.node_stage_volume(stage_req(&v, mount_cap(Mode::SingleNodeWriter)))
                .await
                .unwrap();
            n.node_publish_volume(publish_req(&v, mount_cap(Mode::SingleNodeWriter), false))
                .await
                .unwrap();
            let stats = n
                .node_get_volume_stats(stats_req(&v, &v.target))
                .await
                .unwrap()
                .into_inner();
            let bytes = usage(&stats, csi::volume_usage::Unit::Bytes);
            assert!(
                bytes.used >= 2 << 20,
                "the real file was not counted: {bytes:?}"
            );
            assert!(
                bytes.used < 3 << 20,
                "symlinked host files were counted: {bytes:?}"
            );
            n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap();
        }
        // Only the volume is mounted, and only where asked.
        let mut got = mounts_under(h.dir.path());
        got.sort();
        let mut want = vec![v.staging.clone(), v.target.clone()];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(
            mounts_under(Path::new("/"))
                .iter()
                .filter(|m| m.starts_with(h.dir.path()))
                .count(),
            2
        );
        n.node_unpublish_volume(unpublish_req(&v)).await.unwrap();
        n.node_unstage_volume(unstage_req(&v)).await.unwrap();
        let mut c = h.controller().await;
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
        assert_eq!(
            std::fs::metadata(&big).unwrap().len(),
            256 << 20,
            "the host file was touched"
        );
        assert!(Path::new("/etc/passwd").exists());
        assert!(mounts_under(h.dir.path()).is_empty());
    })
    .await
}

#[tokio::test]
async fn stats_report_abnormal_conditions() {
    if !root_or_skip("stats_report_abnormal_conditions") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "cond").await;
        stage_and_publish(&mut n, &v).await;
        // The mount vanishes behind the driver's back.
        assert!(std::process::Command::new("umount")
            .arg(&v.target)
            .status()
            .unwrap()
            .success());
        let stats = n
            .node_get_volume_stats(stats_req(&v, &v.target))
            .await
            .unwrap()
            .into_inner();
        let cond = stats.volume_condition.unwrap();
        assert!(
            cond.abnormal && cond.message.contains("not mounted"),
            "{cond:?}"
        );
        // The backing directory vanishes.
        assert!(std::process::Command::new("umount")
            .arg(&v.staging)
            .status()
            .unwrap()
            .success());
        std::fs::remove_dir(h.pool_volumes().join(&v.id)).unwrap();
        let stats = n
            .node_get_volume_stats(stats_req(&v, &v.staging))
            .await
            .unwrap()
            .into_inner();
        let cond = stats.volume_condition.unwrap();
        assert!(
            cond.abnormal && cond.message.contains("missing"),
            "{cond:?}"
        );
    })
    .await
}

#[tokio::test]
async fn node_info_and_capabilities() {
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("stowage.toml");
        let pool = dir.path().join("pool-fast");
        std::fs::write(&cfg, format!("max_volumes_per_node = 7\n[[pool]]\nname = \"fast\"\nkind = \"dir\"\npath = \"{}\"\n", pool.display())).unwrap();
        let h = Harness::start(&["--config", cfg.to_str().unwrap()]).await;
        let mut n = h.node().await;
        let info = n.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.node_id, "node-a");
        assert_eq!(info.max_volumes_per_node, 7);
        assert_eq!(
            info.accessible_topology.unwrap().segments,
            [("stowage.csi.dev/node".to_string(), "node-a".to_string())].into_iter().collect::<HashMap<_, _>>()
        );
        let caps = n.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
        use csi::node_service_capability::rpc::Type;
        let mut got: Vec<i32> = caps.capabilities.iter().filter_map(|c| match &c.r#type {
            Some(csi::node_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        }).collect();
        got.sort();
        let mut want = vec![Type::StageUnstageVolume as i32, Type::GetVolumeStats as i32, Type::VolumeCondition as i32, Type::SingleNodeMultiWriter as i32, Type::ExpandVolume as i32, Type::VolumeMountGroup as i32];
        want.sort();
        assert_eq!(got, want);
        // The configured pool is the default pool.
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "in-fast", 1 << 20).await;
        assert_eq!(v.volume_context.get("pool").map(String::as_str), Some("fast"));
        assert!(pool.join("volumes").join(&v.volume_id).is_dir());
    })
    .await
}

#[tokio::test]
async fn delete_refuses_a_volume_mounted_anywhere() {
    if !root_or_skip("delete_refuses_a_volume_mounted_anywhere") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "bound", 1 << 20).await;
        let dir = h.pool_volumes().join(&v.volume_id);
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/data"), b"in use").unwrap();
        // A mount the driver never recorded: a bind of a path inside the volume.
        let elsewhere = h.dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let bind = |args: &[&std::ffi::OsStr]| {
            assert!(std::process::Command::new("mount")
                .args(args)
                .status()
                .unwrap()
                .success())
        };
        bind(&[
            "--bind".as_ref(),
            dir.join("sub").as_os_str(),
            elsewhere.as_os_str(),
        ]);
        let del = csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: HashMap::new(),
        };
        let err = c.delete_volume(del.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("elsewhere"), "{err:?}");
        assert_eq!(std::fs::read(elsewhere.join("data")).unwrap(), b"in use");
        assert!(std::process::Command::new("umount")
            .arg(&elsewhere)
            .status()
            .unwrap()
            .success());
        c.delete_volume(del).await.unwrap();
        assert!(!dir.exists());
    })
    .await
}

#[tokio::test]
async fn unverifiable_publications_keep_protecting_the_volume() {
    if !root_or_skip("unverifiable_publications_keep_protecting_the_volume") {
        return;
    }
    bounded(async {
        let mut h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "moved").await;
        stage_and_publish(&mut n, &v).await;
        assert!(h.stop().success());
        // Restarted with another kubelet directory: the old publications cannot be checked.
        let other = h.dir.path().join("kubelet2");
        std::fs::create_dir_all(&other).unwrap();
        h.kubelet_arg = other;
        // An unknown directory in the pool is reported, not touched.
        std::fs::create_dir(h.pool_volumes().join("restored-by-hand")).unwrap();
        h.spawn().await;
        let log = h.log_text();
        assert!(log.contains("its record is kept"), "{log}");
        assert!(log.contains("no volume record names"), "{log}");
        assert!(h.pool_volumes().join("restored-by-hand").is_dir());
        let mut c = h.controller().await;
        let del = csi::DeleteVolumeRequest {
            volume_id: v.id.clone(),
            secrets: HashMap::new(),
        };
        assert_eq!(code(c.delete_volume(del).await), Code::FailedPrecondition);
        assert!(v.target.join(".").exists());
    })
    .await
}

#[tokio::test]
async fn directories_the_co_made_are_used_and_left_to_it() {
    if !root_or_skip("directories_the_co_made_are_used_and_left_to_it") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "co-dirs").await;
        // The CO made both directories itself (as csi-sanity's defaults do).
        std::fs::create_dir_all(&v.staging).unwrap();
        std::fs::create_dir_all(&v.target).unwrap();
        stage_and_publish(&mut n, &v).await;
        assert_eq!(mount_count(&v.target), 1);
        n.node_unpublish_volume(unpublish_req(&v)).await.unwrap();
        n.node_unstage_volume(unstage_req(&v)).await.unwrap();
        assert!(mounts_under(h.dir.path()).is_empty());
        assert!(
            v.target.is_dir() && v.staging.is_dir(),
            "the driver removed directories it did not make"
        );
        // A target the driver makes, it removes.
        std::fs::remove_dir(&v.target).unwrap();
        stage_and_publish(&mut n, &v).await;
        n.node_unpublish_volume(unpublish_req(&v)).await.unwrap();
        assert!(!v.target.exists());
    })
    .await
}

/// VOLUME_MOUNT_GROUP: a publish with `volume_mount_group` gives the volume's own files the
/// group (fsGroup done by the driver), leaves a symlink to a host file and the file itself
/// alone, and refuses a group that is not a number.
#[tokio::test]
async fn volume_mount_group_reaches_the_volume_and_nothing_else() {
    use std::os::unix::fs::MetadataExt;
    if !root_or_skip("volume_mount_group_reaches_the_volume_and_nothing_else") {
        return;
    }
    bounded(async {
        let h = Harness::start(&[]).await;
        let v = new_volume(&h, "grouped").await;
        let root = h.pool_volumes().join(&v.id);
        std::fs::create_dir(root.join("data")).unwrap();
        std::fs::write(root.join("data/file"), b"x").unwrap();
        let host = h.dir.path().join("host-file");
        std::fs::write(&host, b"host").unwrap();
        std::os::unix::fs::symlink(&host, root.join("data/to-host")).unwrap();
        let host_before = std::fs::metadata(&host).unwrap();
        let mut n = h.node().await;
        let cap = |group: &str| {
            let mut c = mount_cap(Mode::SingleNodeWriter);
            if let Some(csi::volume_capability::AccessType::Mount(m)) = c.access_type.as_mut() {
                m.volume_mount_group = group.into();
            }
            c
        };
        n.node_stage_volume(stage_req(&v, cap(""))).await.unwrap();
        for bad in ["staff", "-1", "4294967296", "12 3"] {
            let got = n
                .node_publish_volume(publish_req(&v, cap(bad), false))
                .await;
            assert_eq!(code(got), Code::InvalidArgument, "{bad:?}");
        }
        n.node_publish_volume(publish_req(&v, cap("4242"), false))
            .await
            .unwrap();
        for p in ["", "data", "data/file"] {
            let m = std::fs::metadata(v.target.join(p)).unwrap();
            assert_eq!(m.gid(), 4242, "{p}");
        }
        assert_eq!(std::fs::metadata(v.target).unwrap().mode() & 0o2070, 0o2070);
        let host_after = std::fs::metadata(&host).unwrap();
        assert_eq!(
            (host_after.gid(), host_after.mode()),
            (host_before.gid(), host_before.mode())
        );
        assert_ne!(
            std::fs::symlink_metadata(root.join("data/to-host"))
                .unwrap()
                .gid(),
            4242
        );
    })
    .await
}

/// CSI ephemeral inline volumes: NodePublishVolume with `csi.storage.k8s.io/ephemeral` makes
/// a volume of the attributes' size, NodeUnpublishVolume of the kubelet's handle removes it;
/// a crash between the create and the publish leaks nothing after the restart.
#[tokio::test]
async fn ephemeral_inline_volumes_live_and_die_with_their_publication() {
    if !root_or_skip("ephemeral_inline_volumes_live_and_die_with_their_publication") {
        return;
    }
    bounded(async {
        let mut h = Harness::start(&[]).await;
        let handle = format!("csi-{}", "ab".repeat(32));
        let target = h
            .kubelet()
            .join("pods/uid-eph/volumes/kubernetes.io~csi/scratch/mount");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let req = |ctx: &[(&str, &str)]| csi::NodePublishVolumeRequest {
            volume_id: handle.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            volume_context: ctx
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let ctx = [
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", "scratch-pod"),
            ("size", "8Mi"),
        ];
        let mut n = h.node().await;
        let mut bad = ctx.to_vec();
        bad.push(("replicas", "3"));
        assert_eq!(
            code(n.node_publish_volume(req(&bad)).await),
            Code::InvalidArgument
        );
        n.node_publish_volume(req(&ctx)).await.unwrap();
        n.node_publish_volume(req(&ctx)).await.unwrap();
        assert!(mount_count(&target) >= 1, "the target is a mount");
        std::fs::write(target.join("scratch"), b"tmp").unwrap();
        let entries = listed(&h).await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].volume.as_ref().unwrap().capacity_bytes, 8 << 20);
        let stats = n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: handle.clone(),
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!stats.usage.is_empty());
        let unpublish = csi::NodeUnpublishVolumeRequest {
            volume_id: handle.clone(),
            target_path: target.display().to_string(),
        };
        n.node_unpublish_volume(unpublish.clone()).await.unwrap();
        n.node_unpublish_volume(unpublish).await.unwrap();
        assert_eq!(mount_count(&target), 0);
        assert!(
            listed(&h).await.is_empty(),
            "the volume went with its publication"
        );
        assert_eq!(std::fs::read_dir(h.pool_volumes()).unwrap().count(), 0);

        // A crash right after the create: the restart removes the unpublished volume.
        h.stop();
        h.env = vec![(
            "STOWAGE_TEST_CRASH_AT".to_owned(),
            "ephemeral-after-create".to_owned(),
        )];
        h.spawn().await;
        let mut n = h.node().await;
        assert_ne!(code(n.node_publish_volume(req(&ctx)).await), Code::Ok);
        assert!(h.await_crash());
        h.env.clear();
        h.spawn().await;
        assert!(listed(&h).await.is_empty(), "nothing leaked by the crash");
        assert_eq!(std::fs::read_dir(h.pool_volumes()).unwrap().count(), 0);
        // The kubelet's retry then works from scratch.
        let mut n = h.node().await;
        n.node_publish_volume(req(&ctx)).await.unwrap();
        n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: handle.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
        assert!(listed(&h).await.is_empty());
        let pool = h.state_dir().join("pools/default");
        assert_nothing_leaked(&h, &pool, &[], &[], "the end").await;
    })
    .await
}

async fn listed(h: &Harness) -> Vec<csi::list_volumes_response::Entry> {
    h.controller()
        .await
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
}

#[tokio::test]
async fn stats_of_an_advisory_volume_reuse_a_figure_younger_than_the_pools_min_age() {
    if !root_or_skip("stats_of_an_advisory_volume_reuse_a_figure_younger_than_the_pools_min_age") {
        return;
    }
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("stowage.toml");
        let pool = dir.path().join("pool-walked");
        std::fs::write(
            &cfg,
            format!(
                "[[pool]]\nname = \"walked\"\nkind = \"dir\"\npath = \"{}\"\n[pool.stats]\nmin_age = \"1m\"\nwalk_budget = \"1s\"\n",
                pool.display()
            ),
        )
        .unwrap();
        let h = Harness::start(&["--config", cfg.to_str().unwrap()]).await;
        let mut n = h.node().await;
        let v = new_volume(&h, "walked").await;
        stage_and_publish(&mut n, &v).await;
        // This kernel may enforce project quotas on the pool's filesystem: then nothing is
        // walked and there is nothing to cache.
        let first = n
            .node_get_volume_stats(stats_req(&v, &v.target))
            .await
            .unwrap()
            .into_inner();
        let cond = first.volume_condition.clone().unwrap();
        if !cond.message.contains("advisory") {
            println!("SKIPPED (the pool's filesystem enforces project quotas: no walk): stats_of_an_advisory_volume_reuse_a_figure_younger_than_the_pools_min_age");
            return;
        }
        assert!(!cond.abnormal && cond.message.contains("walked just now"), "{cond:?}");
        let used = usage(&first, csi::volume_usage::Unit::Bytes).used;
        std::fs::write(v.target.join("big"), vec![7u8; 1 << 20]).unwrap();
        for path in [&v.target, &v.staging] {
            let again = n
                .node_get_volume_stats(stats_req(&v, path))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(usage(&again, csi::volume_usage::Unit::Bytes).used, used);
            let cond = again.volume_condition.unwrap();
            assert!(
                !cond.abnormal && cond.message.contains("usage as of") && cond.message.contains("reused for 60.0 s"),
                "{cond:?}"
            );
        }
        n.node_unpublish_volume(unpublish_req(&v)).await.unwrap();
        n.node_unstage_volume(unstage_req(&v)).await.unwrap();
    })
    .await
}
