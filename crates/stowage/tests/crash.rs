//! The crash suite: the driver is aborted at each step of each mutating call (intent recorded,
//! backend acted, mount made, unmount done), restarted, and the call retried. The retry must
//! succeed and the store, the pool and the mount table must agree afterwards: nothing lost,
//! nothing orphaned, nothing mounted twice.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;

async fn listed_ids(h: &Harness) -> Vec<String> {
    let mut c = h.controller().await;
    let mut ids: Vec<String> = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    ids.sort();
    ids
}

fn pool_dirs(h: &Harness) -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(h.pool_volumes())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    dirs
}

#[tokio::test(flavor = "multi_thread")]
async fn create_and_delete_survive_a_crash_at_every_step() {
    bounded(async {
        let mut h = Harness::start(&[]).await;
        for point in ["create-after-intent", "create-after-backend"] {
            let name = format!("vol-{point}");
            let n = name.clone();
            crash_during(&mut h, point, |ch| async move {
                let mut c = csi::controller_client::ControllerClient::new(ch);
                code(c.create_volume(create_req(&n, 1 << 20)).await)
            })
            .await;
            // The retried call continues where it left off: one volume, with its directory.
            let mut c = h.controller().await;
            let v = create_volume(&mut c, &name, 1 << 20).await;
            assert!(listed_ids(&h).await.contains(&v.volume_id), "{point}");
            assert_eq!(
                listed_ids(&h).await,
                pool_dirs(&h),
                "{point}: store and pool disagree"
            );
        }
        for point in ["delete-after-intent", "delete-after-backend"] {
            let mut c = h.controller().await;
            let v = create_volume(&mut c, &format!("doomed-{point}"), 1 << 20).await;
            std::fs::write(h.pool_volumes().join(&v.volume_id).join("f"), b"x").unwrap();
            let id = v.volume_id.clone();
            crash_during(&mut h, point, |ch| async move {
                let mut c = csi::controller_client::ControllerClient::new(ch);
                code(
                    c.delete_volume(csi::DeleteVolumeRequest {
                        volume_id: id,
                        secrets: HashMap::new(),
                    })
                    .await,
                )
            })
            .await;
            // Reconciliation finished the delete; the retry is a no-op.
            assert!(!h.pool_volumes().join(&v.volume_id).exists(), "{point}");
            let mut c = h.controller().await;
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap();
            assert!(!listed_ids(&h).await.contains(&v.volume_id), "{point}");
            assert_eq!(
                listed_ids(&h).await,
                pool_dirs(&h),
                "{point}: store and pool disagree"
            );
        }
    })
    .await
}

fn stage(id: &str, staging: &Path) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

fn publish(id: &str, staging: &Path, target: &Path) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    }
}

fn unpublish(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: id.to_owned(),
        target_path: target.display().to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_and_unpublish_survive_a_crash_at_every_step() {
    if !root_or_skip("publish_and_unpublish_survive_a_crash_at_every_step") {
        return;
    }
    bounded(async {
        let mut h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "crashy", 1 << 20).await;
        let staging = h.kubelet().join("staging");
        let pods = h.kubelet().join("pods/p1");
        std::fs::create_dir_all(&pods).unwrap();
        let target = pods.join("mount");
        let mut n = h.node().await;
        n.node_stage_volume(stage(&v.volume_id, &staging))
            .await
            .unwrap();

        for point in ["mount-after-intent", "mount-after-mount"] {
            let (id, s, t) = (v.volume_id.clone(), staging.clone(), target.clone());
            crash_during(&mut h, point, |ch| async move {
                let mut n = csi::node_client::NodeClient::new(ch);
                code(n.node_publish_volume(publish(&id, &s, &t)).await)
            })
            .await;
            let mut n = h.node().await;
            n.node_publish_volume(publish(&v.volume_id, &staging, &target))
                .await
                .unwrap();
            assert_eq!(
                mount_count(&target),
                1,
                "{point}: not exactly one mount after the retry"
            );
            std::fs::write(target.join("probe"), point).unwrap();

            for unpoint in ["unmount-after-intent", "unmount-after-unmount"] {
                let (id, t) = (v.volume_id.clone(), target.clone());
                crash_during(&mut h, unpoint, |ch| async move {
                    let mut n = csi::node_client::NodeClient::new(ch);
                    code(n.node_unpublish_volume(unpublish(&id, &t)).await)
                })
                .await;
                let mut n = h.node().await;
                n.node_unpublish_volume(unpublish(&v.volume_id, &target))
                    .await
                    .unwrap();
                assert_eq!(mount_count(&target), 0, "{point}/{unpoint}: still mounted");
                assert!(
                    !target.exists(),
                    "{point}/{unpoint}: the target directory was left behind"
                );
                // Publish again for the next unmount point.
                n.node_publish_volume(publish(&v.volume_id, &staging, &target))
                    .await
                    .unwrap();
                assert_eq!(mount_count(&target), 1);
            }
            let mut n = h.node().await;
            n.node_unpublish_volume(unpublish(&v.volume_id, &target))
                .await
                .unwrap();
        }
        // The data written through every publication is in the volume.
        let dir = h.pool_volumes().join(&v.volume_id);
        assert_eq!(
            std::fs::read(dir.join("probe")).unwrap(),
            b"mount-after-mount"
        );
        let mut n = h.node().await;
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
        assert!(mounts_under(h.dir.path()).is_empty());
        let mut c = h.controller().await;
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    })
    .await
}
