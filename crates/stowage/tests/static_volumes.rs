//! Pre-provisioned (static) volumes over the socket: a `static` pool's directories named by a
//! PersistentVolume's handle `static:<pool>/<dir>` and an optional `subPath`, resolved from the
//! pool's fd with no symlink followed, no `..` and no other mount crossed — the seed's own
//! attack (a `symlink-door -> /` inside the volume named as subPath) refused with nothing
//! mounted — and never deleted. Root only (mounts).

#[macro_use]
mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::Code;

fn stage(handle: &str, staging: &Path, sub: Option<&str>) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: handle.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        volume_context: sub
            .map(|s| [("subPath".to_string(), s.to_string())].into())
            .unwrap_or_default(),
        ..Default::default()
    }
}

/// A driver with a `dir` pool (the default) and the static pool `shared` at `shared`.
async fn start(dir: &Path, shared: &Path) -> Harness {
    let cfg = dir.join("stowage.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[pool]]\nname = \"default\"\nkind = \"dir\"\npath = \"{}\"\n[[pool]]\nname = \"shared\"\nkind = \"static\"\npath = \"{}\"\n",
            dir.join("pool").display(),
            shared.display()
        ),
    )
    .unwrap();
    Harness::start(&["--config", cfg.to_str().unwrap()]).await
}

#[tokio::test]
async fn static_volumes_resolve_safely_and_are_never_deleted() {
    let test = "static_volumes_resolve_safely_and_are_never_deleted";
    if !root_or_skip(test) {
        return;
    }
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(shared.join("app1/data")).unwrap();
        std::fs::write(shared.join("app1/data/file"), b"operator's data").unwrap();
        std::os::unix::fs::symlink("/", shared.join("app1/symlink-door")).unwrap();
        std::os::unix::fs::symlink("/etc", shared.join("door")).unwrap();
        std::fs::create_dir(shared.join("mnt")).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let bind = Command::new("mount")
            .args(["--bind"])
            .arg(&elsewhere)
            .arg(shared.join("mnt"))
            .status()
            .unwrap();
        assert!(bind.success());
        struct Unmount(std::path::PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(shared.join("mnt"));
        let h = start(dir.path(), &shared).await;
        let mut n = h.node().await;
        let mut c = h.controller().await;
        let staging = h
            .kubelet()
            .join("plugins/kubernetes.io/csi/stowage.csi.dev/pv1/globalmount");
        std::fs::create_dir_all(&staging).unwrap();
        let target = h
            .kubelet()
            .join("pods/uid-s/volumes/kubernetes.io~csi/pv1/mount");
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let volumes = |c: &mut csi::controller_client::ControllerClient<_>| {
            let mut c = c.clone();
            async move {
                c.list_volumes(csi::ListVolumesRequest::default())
                    .await
                    .unwrap()
                    .into_inner()
                    .entries
                    .len()
            }
        };

        // Refused: the seed's attack, a handle through a symlink, traversal, another mount,
        // a pool that is not static, unknown attributes. Nothing mounted, no record left.
        let refusals: Vec<(&str, Option<&str>, Code)> = vec![
            (
                "static:shared/app1",
                Some("symlink-door"),
                Code::InvalidArgument,
            ),
            (
                "static:shared/app1",
                Some("symlink-door/etc"),
                Code::InvalidArgument,
            ),
            ("static:shared/app1", Some("../door"), Code::InvalidArgument),
            ("static:shared/door", None, Code::InvalidArgument),
            ("static:shared/../shared/app1", None, Code::InvalidArgument),
            ("static:shared//app1", None, Code::InvalidArgument),
            ("static:shared/mnt", None, Code::InvalidArgument),
            ("static:default/app1", None, Code::InvalidArgument),
            ("static:nowhere/app1", None, Code::NotFound),
            ("static:shared/missing", None, Code::NotFound),
        ];
        for (handle, sub, want) in &refusals {
            let got = n.node_stage_volume(stage(handle, &staging, *sub)).await;
            assert_eq!(code(got), *want, "{handle} subPath {sub:?}");
            assert_eq!(mount_count(&staging), 0, "{handle}: nothing mounted");
            assert_eq!(volumes(&mut c).await, 0, "{handle} {sub:?}: no record kept");
        }
        let mut odd = stage("static:shared/app1", &staging, None);
        odd.volume_context.insert("replicas".into(), "3".into());
        assert_eq!(code(n.node_stage_volume(odd).await), Code::InvalidArgument);
        assert_eq!(
            volumes(&mut c).await,
            0,
            "no record kept for a refused stage"
        );

        // The subPath that is a real directory: staged, published, stats, then gone again.
        n.node_stage_volume(stage("static:shared/app1", &staging, Some("data")))
            .await
            .unwrap();
        n.node_stage_volume(stage("static:shared/app1", &staging, Some("data")))
            .await
            .unwrap();
        n.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: "static:shared/app1".into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            readonly: true,
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(
            std::fs::read(target.join("file")).unwrap(),
            b"operator's data"
        );
        assert!(
            std::fs::write(target.join("new"), b"x").is_err(),
            "read-only PV"
        );
        let stats = n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: "static:shared/app1".into(),
                volume_path: target.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!stats.usage.is_empty());
        // The controller never deletes the operator's data.
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: "static:shared/app1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        for _ in 0..2 {
            n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: "static:shared/app1".into(),
                target_path: target.display().to_string(),
            })
            .await
            .unwrap();
            n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: "static:shared/app1".into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
            .unwrap();
        }
        assert_eq!(mount_count(&staging) + mount_count(&target), 0);
        assert_eq!(
            volumes(&mut c).await,
            0,
            "the record went with the last mount"
        );
        assert_eq!(
            std::fs::read(shared.join("app1/data/file")).unwrap(),
            b"operator's data"
        );
        // A static pool makes no volumes.
        let mut req = create_req("in-static", 1 << 20);
        req.parameters.insert("pool".into(), "shared".into());
        assert_eq!(code(c.create_volume(req).await), Code::InvalidArgument);
    })
    .await
}

/// A pod swapping its directory for a symlink to `/` (renameat2 RENAME_EXCHANGE in a tight
/// loop) while the kubelet stages the subPath again and again: every stage either binds the
/// real directory or is refused; the host's root is never what got mounted.
#[tokio::test(flavor = "multi_thread")]
async fn a_subpath_swapped_for_a_symlink_never_mounts_the_host() {
    let test = "a_subpath_swapped_for_a_symlink_never_mounts_the_host";
    if !root_or_skip(test) {
        return;
    }
    bounded(async {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(shared.join("app/data")).unwrap();
        std::fs::write(shared.join("app/data/marker"), b"ours").unwrap();
        std::os::unix::fs::symlink("/", shared.join("app/door")).unwrap();
        let h = start(dir.path(), &shared).await;
        let mut n = h.node().await;
        let staging = h
            .kubelet()
            .join("plugins/kubernetes.io/csi/stowage.csi.dev/race/globalmount");
        std::fs::create_dir_all(&staging).unwrap();
        let swapper = Swapper::start(vec![(shared.join("app/data"), shared.join("app/door"))]);
        let (mut mounted, mut refused) = (0, 0);
        for _ in 0..200 {
            match n
                .node_stage_volume(stage("static:shared/app", &staging, Some("data")))
                .await
            {
                Ok(_) => {
                    mounted += 1;
                    assert!(
                        staging.join("marker").exists() && !staging.join("etc").exists(),
                        "the staged mount is not the volume's own directory"
                    );
                    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                        volume_id: "static:shared/app".into(),
                        staging_target_path: staging.display().to_string(),
                    })
                    .await
                    .unwrap();
                }
                Err(s) => {
                    assert!(
                        matches!(s.code(), Code::InvalidArgument | Code::NotFound),
                        "{s:?}"
                    );
                    refused += 1;
                }
            }
            assert_eq!(mount_count(&staging), 0);
        }
        let swaps = swapper.stop();
        assert!(swaps > 0);
        assert_eq!(mounted + refused, 200);
        println!(
            "subPath race: {mounted} staged (the real directory), {refused} refused, {swaps} swaps"
        );
    })
    .await
}
