//! The crash suite: the driver is aborted at each step of each mutating call (intent recorded,
//! backend acted, mount made, unmount done), restarted, and the call retried. The retry must
//! succeed and the store, the pool and the mount table must agree afterwards: nothing lost,
//! nothing orphaned, nothing mounted twice. The same for the steps of the image kind
//! (attach, format, mount, grow, detach) and of the btrfs kind (subvolume, qgroup, limit),
//! and every crash test ends by checking that nothing leaked (`assert_nothing_leaked`).
//! `every_crash_point_is_listed_and_exercised` holds the list of crash points to the sources
//! and to the tests, and reports how many there are.

#[macro_use]
mod common;

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use stowage_sys::{qgroup_id, Kernel, LinuxKernel};

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
        let kept = listed_ids(&h).await;
        let kept: Vec<&str> = kept.iter().map(String::as_str).collect();
        let pool = h.state_dir().join("pools/default");
        assert_nothing_leaked(&h, &pool, &kept, &[], "the end").await;
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
        let pool = h.state_dir().join("pools/default");
        assert_nothing_leaked(&h, &pool, &[], &[], "the end").await;
    })
    .await
}

fn stage_fs(id: &str, staging: &Path, fs: &str) -> csi::NodeStageVolumeRequest {
    let mut r = stage(id, staging);
    r.volume_capability = Some(fs_cap(fs));
    r
}

fn publish_fs(id: &str, staging: &Path, target: &Path, fs: &str) -> csi::NodePublishVolumeRequest {
    let mut r = publish(id, staging, target);
    r.volume_capability = Some(fs_cap(fs));
    r
}

fn unstage(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.display().to_string(),
    }
}

fn delete_req(id: &str) -> csi::DeleteVolumeRequest {
    csi::DeleteVolumeRequest {
        volume_id: id.to_owned(),
        secrets: HashMap::new(),
    }
}

/// DeleteVolume of `id` aborted at `point`, then retried on the restarted driver: the retry
/// must succeed.
async fn crash_delete_then_retry(h: &mut Harness, id: &str, point: &str) {
    let i = id.to_owned();
    crash_during(h, point, |ch| async move {
        let mut c = csi::controller_client::ControllerClient::new(ch);
        code(c.delete_volume(delete_req(&i)).await)
    })
    .await;
    let mut c = h.controller().await;
    c.delete_volume(delete_req(id))
        .await
        .unwrap_or_else(|e| panic!("{point}: the retried delete: {e:?}"));
}

fn fs_cap(fs: &str) -> csi::VolumeCapability {
    let mut cap = mount_cap(Mode::SingleNodeWriter);
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.fs_type = fs.to_owned();
    }
    cap
}

fn expand_req(id: &str, bytes: i64) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

fn node_expand_req(id: &str, path: &Path, bytes: i64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.to_owned(),
        volume_path: path.display().to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

/// Total bytes of the filesystem mounted at `path`.
fn fs_total(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    st.f_blocks * st.f_frsize
}

const MIB: i64 = 1 << 20;

/// An image volume through its whole life with a crash at each step: created (intent,
/// image), staged (intent, loop device attached, xfs made, mounted, recorded), unstaged
/// (intent, unmounted) between the stage crashes, published, grown on the node (device,
/// filesystem), unstaged (detached) and deleted; then a raw block volume, whose device is
/// detached by the unstage, with a crash before and after the detach. Each retried call
/// succeeds and leaves one device and one mount while staged, none after.
#[tokio::test(flavor = "multi_thread")]
async fn image_attach_format_mount_grow_detach_survive_a_crash_at_every_step() {
    let test = "image_attach_format_mount_grow_detach_survive_a_crash_at_every_step";
    let Some(mut p) = KindPool::start(Kind::Image, test, &[]).await else {
        return;
    };
    // xfs: it grows online without CAP_SYS_RESOURCE, which ext4 needs.
    if !have_mkfs("xfs", test) {
        return;
    }
    bounded(async {
        // Two volumes, each created with a crash at one step; each is deleted with a crash
        // at one step at the end.
        let mut ids = Vec::new();
        for point in ["create-after-intent", "create-after-backend"] {
            let mut req = create_req(&format!("img-{point}"), 300 * MIB);
            req.volume_capabilities = vec![fs_cap("xfs")];
            let r = req.clone();
            crash_during(p.hm(), point, |ch| async move {
                let mut c = csi::controller_client::ControllerClient::new(ch);
                code(c.create_volume(r).await)
            })
            .await;
            let mut c = p.h().controller().await;
            let v = c
                .create_volume(req)
                .await
                .unwrap_or_else(|e| panic!("{point}: the retried create: {e:?}"))
                .into_inner()
                .volume
                .unwrap();
            assert_eq!(v.capacity_bytes, 300 * MIB, "{point}");
            ids.push(v.volume_id);
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(pool_entries_of(&p), sorted, "one image per volume");
        let id = ids[0].clone();
        let kubelet = p.h().kubelet();
        let target = kubelet.join("target-img");
        let image = p.volumes_dir().join(format!("{id}.img"));

        // Stage. The first volume's device is blank at its first crash (after attaching:
        // nothing formatted yet), the second's at its crash after mkfs, which leaves a
        // filesystem the retry must not make again.
        let stagings = [kubelet.join("staging-img-0"), kubelet.join("staging-img-1")];
        for (v, point) in [
            (0, "image-stage-after-attach"),
            (1, "stage-after-mkfs"),
            (0, "mount-after-intent"),
            (0, "image-stage-after-mount"),
            (0, "mount-after-mount"),
        ] {
            let (id, staging) = (&ids[v], &stagings[v]);
            let (i, s) = (id.clone(), staging.clone());
            crash_during(p.hm(), point, |ch| async move {
                let mut n = csi::node_client::NodeClient::new(ch);
                code(n.node_stage_volume(stage_fs(&i, &s, "xfs")).await)
            })
            .await;
            let mut n = p.h().node().await;
            n.node_stage_volume(stage_fs(id, staging, "xfs"))
                .await
                .unwrap_or_else(|e| panic!("{point}: the retried stage: {e:?}"));
            assert_eq!(loops_under(&p.pool).len(), 1, "{point}: one device");
            assert_eq!(mount_count(staging), 1, "{point}: one mount");
            std::fs::write(staging.join(format!("after-{point}")), point).unwrap();
            // Unstaged again (a crash before the unmount, or between the unmount and the
            // release of the device), so the next point starts from an unstaged volume.
            let unpoint = if point.starts_with("image") {
                "unmount-after-unmount"
            } else {
                "unmount-after-intent"
            };
            let (i, s) = (id.clone(), staging.clone());
            crash_during(p.hm(), unpoint, |ch| async move {
                let mut n = csi::node_client::NodeClient::new(ch);
                code(n.node_unstage_volume(unstage(&i, &s)).await)
            })
            .await;
            let mut n = p.h().node().await;
            n.node_unstage_volume(unstage(id, staging))
                .await
                .unwrap_or_else(|e| panic!("{point}/{unpoint}: the retried unstage: {e:?}"));
            assert_eq!(mount_count(staging), 0, "{point}/{unpoint}: still mounted");
            assert_eq!(
                loops_under(&p.pool),
                Vec::new(),
                "{point}/{unpoint}: a device left"
            );
        }
        // Formatted once: every file written between the crashes is there.
        let mut n = p.h().node().await;
        n.node_stage_volume(stage_fs(&ids[1], &stagings[1], "xfs"))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(stagings[1].join("after-stage-after-mkfs")).unwrap(),
            "stage-after-mkfs",
            "the filesystem was made again after stage-after-mkfs"
        );
        n.node_unstage_volume(unstage(&ids[1], &stagings[1]))
            .await
            .unwrap();
        let staging = stagings[0].clone();
        n.node_stage_volume(stage_fs(&id, &staging, "xfs"))
            .await
            .unwrap();
        n.node_publish_volume(publish_fs(&id, &staging, &target, "xfs"))
            .await
            .unwrap();
        for point in [
            "image-stage-after-attach",
            "mount-after-intent",
            "image-stage-after-mount",
            "mount-after-mount",
        ] {
            assert_eq!(
                std::fs::read_to_string(target.join(format!("after-{point}"))).unwrap(),
                point,
                "the filesystem was made again after {point}"
            );
        }

        // Grown on the node: a crash after the device follows the image, and one after the
        // filesystem grew; the retries converge on the size.
        let mut size = 300 * MIB;
        for point in ["node-expand-after-device", "image-node-expand-after-grow"] {
            size += 32 * MIB;
            let before = fs_total(&target);
            let mut c = p.h().controller().await;
            c.controller_expand_volume(expand_req(&id, size))
                .await
                .unwrap();
            let (i, t) = (id.clone(), target.clone());
            crash_during(p.hm(), point, |ch| async move {
                let mut n = csi::node_client::NodeClient::new(ch);
                code(n.node_expand_volume(node_expand_req(&i, &t, size)).await)
            })
            .await;
            let mut n = p.h().node().await;
            let r = n
                .node_expand_volume(node_expand_req(&id, &target, size))
                .await
                .unwrap_or_else(|e| panic!("{point}: the retried expansion: {e:?}"))
                .into_inner();
            assert_eq!(r.capacity_bytes, size, "{point}");
            assert_eq!(std::fs::metadata(&image).unwrap().len(), size as u64);
            assert!(
                fs_total(&target) > before,
                "{point}: the filesystem did not grow"
            );
            assert_eq!(loops_under(&p.pool).len(), 1, "{point}: one device");
        }

        // Torn down with a crash after the unstage's detach (autoclear freed the device at
        // the unmount already), and deleted with a crash at each step.
        let mut n = p.h().node().await;
        n.node_unpublish_volume(unpublish(&id, &target))
            .await
            .unwrap();
        let (i, s) = (id.clone(), staging.clone());
        crash_during(p.hm(), "image-unstage-after-detach", |ch| async move {
            let mut n = csi::node_client::NodeClient::new(ch);
            code(n.node_unstage_volume(unstage(&i, &s)).await)
        })
        .await;
        let mut n = p.h().node().await;
        n.node_unstage_volume(unstage(&id, &staging)).await.unwrap();
        assert_eq!(loops_under(&p.pool), Vec::new(), "a device left");
        for (id, point) in ids
            .iter()
            .zip(["delete-after-intent", "delete-after-backend"])
        {
            crash_delete_then_retry(p.hm(), id, point).await;
            assert!(
                !p.volumes_dir().join(format!("{id}.img")).exists(),
                "{point}: the image is left"
            );
        }

        // A raw block volume: attached without autoclear, detached by the unstage.
        let mut req = create_req("img-raw", 8 * MIB);
        req.volume_capabilities = vec![block_cap()];
        let mut c = p.h().controller().await;
        let raw = c
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let raw_staging = kubelet.join("staging-raw");
        let block_stage = |id: &str| {
            let mut r = stage(id, &raw_staging);
            r.volume_capability = Some(block_cap());
            r
        };
        for point in ["unmount-after-unmount", "image-unstage-after-detach"] {
            let mut n = p.h().node().await;
            n.node_stage_volume(block_stage(&raw)).await.unwrap();
            assert_eq!(loops_under(&p.pool).len(), 1, "{point}: attached");
            let (i, s) = (raw.clone(), raw_staging.clone());
            crash_during(p.hm(), point, |ch| async move {
                let mut n = csi::node_client::NodeClient::new(ch);
                code(n.node_unstage_volume(unstage(&i, &s)).await)
            })
            .await;
            let mut n = p.h().node().await;
            n.node_unstage_volume(unstage(&raw, &raw_staging))
                .await
                .unwrap_or_else(|e| panic!("{point}: the retried unstage: {e:?}"));
            assert_eq!(loops_under(&p.pool), Vec::new(), "{point}: a device left");
        }
        let mut c = p.h().controller().await;
        c.delete_volume(delete_req(&raw)).await.unwrap();
        assert_nothing_leaked(p.h(), &p.pool, &[], &[], "the end").await;
    })
    .await
}

fn pool_entries_of(p: &KindPool) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(p.volumes_dir())
        .unwrap()
        .map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix(".img").map(str::to_owned).unwrap_or(n)
        })
        .collect();
    names.sort();
    names
}

fn qgroups(fs: &Path) -> Vec<stowage_sys::Qgroup> {
    let fd = stowage_sys::fs::open_trusted_dir(fs).unwrap();
    LinuxKernel.btrfs_qgroups(fd.as_fd()).unwrap()
}

fn subvolume_id(path: &Path) -> u64 {
    let fd = stowage_sys::fs::open_trusted_dir(path).unwrap();
    LinuxKernel.btrfs_subvolume_id(fd.as_fd()).unwrap()
}

/// The limit on the volume's level-1 qgroup (checking its subvolume is a member), and the
/// subvolume's id.
fn limit_of(p: &KindPool, id: &str) -> (Option<u64>, u64) {
    let sid = subvolume_id(&p.volumes_dir().join(id));
    let all = qgroups(&p.pool);
    let group = all
        .iter()
        .find(|q| q.id == qgroup_id(1, sid))
        .unwrap_or_else(|| panic!("no level-1 qgroup for volume {id}: {all:?}"));
    assert!(
        all.iter()
            .any(|q| q.id == sid && q.parents == vec![qgroup_id(1, sid)]),
        "the subvolume of {id} is not in its level-1 qgroup: {all:?}"
    );
    (group.max_referenced, sid)
}

/// A btrfs volume through its life with a crash at each step: created (intent, subvolume,
/// level-1 qgroup, limit, recorded), grown (intent, limit raised, recorded), the start-up
/// check of its layout interrupted, and deleted (intent, limit lifted, subvolumes
/// destroyed, qgroups removed, row removed). Each retry succeeds with the volume limited as
/// asked; at the end no subvolume, level-1 qgroup, mount or row is left.
#[tokio::test(flavor = "multi_thread")]
async fn btrfs_subvolume_and_qgroup_steps_survive_a_crash_at_every_step() {
    let test = "btrfs_subvolume_and_qgroup_steps_survive_a_crash_at_every_step";
    let Some(mut p) = KindPool::start(Kind::Btrfs, test, &["--watch-interval", "0"]).await else {
        return;
    };
    bounded(async {
        let creates = [
            "create-after-intent",
            "btrfs-create-after-subvolume",
            "btrfs-create-after-group",
            "btrfs-create-after-limit",
            "create-after-backend",
        ];
        let mut ids = Vec::new();
        for point in creates {
            let name = format!("b-{point}");
            let n = name.clone();
            crash_during(p.hm(), point, |ch| async move {
                let mut c = csi::controller_client::ControllerClient::new(ch);
                code(c.create_volume(create_req(&n, 4 * MIB)).await)
            })
            .await;
            let mut c = p.h().controller().await;
            let v = create_volume(&mut c, &name, 4 * MIB).await;
            assert_eq!(
                limit_of(&p, &v.volume_id).0,
                Some(4 << 20),
                "{point}: the limit"
            );
            ids.push(v.volume_id);
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(pool_entries_of(&p), sorted, "one subvolume per volume");

        // Grown while published (a bind mount sees the new limit at once).
        let grown = ids[0].clone();
        let kubelet = p.h().kubelet();
        let (staging, target) = (kubelet.join("staging-b"), kubelet.join("target-b"));
        let mut n = p.h().node().await;
        n.node_stage_volume(stage(&grown, &staging)).await.unwrap();
        n.node_publish_volume(publish(&grown, &staging, &target))
            .await
            .unwrap();
        let mut size = 4 * MIB;
        for point in [
            "expand-after-intent",
            "btrfs-expand-after-limit",
            "expand-after-backend",
        ] {
            size += 4 * MIB;
            let g = grown.clone();
            crash_during(p.hm(), point, |ch| async move {
                let mut c = csi::controller_client::ControllerClient::new(ch);
                code(c.controller_expand_volume(expand_req(&g, size)).await)
            })
            .await;
            let mut c = p.h().controller().await;
            let r = c
                .controller_expand_volume(expand_req(&grown, size))
                .await
                .unwrap_or_else(|e| panic!("{point}: the retried expansion: {e:?}"))
                .into_inner();
            assert_eq!(r.capacity_bytes, size, "{point}");
            assert_eq!(
                limit_of(&p, &grown).0,
                Some(size as u64),
                "{point}: the limit"
            );
        }
        // The start-up check of every volume's layout, interrupted: the next start finishes.
        crash_at_start(p.hm(), "btrfs-migrate-after-group").await;
        for id in &ids {
            let want = if *id == grown { size } else { 4 * MIB };
            assert_eq!(
                limit_of(&p, id).0,
                Some(want as u64),
                "after the start-up crash"
            );
        }
        assert_eq!(mount_count(&target), 1, "the publication survived");
        let mut n = p.h().node().await;
        n.node_unpublish_volume(unpublish(&grown, &target))
            .await
            .unwrap();
        n.node_unstage_volume(unstage(&grown, &staging))
            .await
            .unwrap();

        let deletes = [
            "delete-after-intent",
            "btrfs-delete-after-unlimit",
            "btrfs-delete-after-destroy",
            "btrfs-delete-after-qgroups",
            "delete-after-backend",
        ];
        for (id, point) in ids.iter().zip(deletes) {
            let (_, sid) = limit_of(&p, id);
            crash_delete_then_retry(p.hm(), id, point).await;
            assert!(!p.volumes_dir().join(id).exists(), "{point}");
            // Once more: what a delete left of the qgroups goes at the next one.
            let mut c = p.h().controller().await;
            c.delete_volume(delete_req(id)).await.unwrap();
            assert!(
                qgroups(&p.pool).iter().all(|q| q.id != qgroup_id(1, sid)),
                "{point}: the level-1 qgroup is left: {:?}",
                qgroups(&p.pool)
            );
        }
        assert_nothing_leaked(p.h(), &p.pool, &[], &[], "the end").await;
    })
    .await
}

/// The list of crash points (`stowage_driver::crash::POINTS`) is exactly the
/// `crash::point("…")` calls in the driver's sources, and every point is named in a test
/// file that crashes the driver (where `await_crash` checks the driver died at that very
/// point). Prints how many points are exercised.
#[test]
fn every_crash_point_is_listed_and_exercised() {
    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    let listed: BTreeSet<&str> = stowage_driver::crash::POINTS.iter().copied().collect();
    assert_eq!(
        listed.len(),
        stowage_driver::crash::POINTS.len(),
        "a point is listed twice"
    );
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = Vec::new();
    rust_files(&manifest.join("../driver/src"), &mut sources);
    let call = concat!("crash::", "point(\"");
    let mut in_sources = BTreeSet::new();
    for file in &sources {
        let text = std::fs::read_to_string(file).unwrap();
        for (at, _) in text.match_indices(call) {
            let rest = &text[at + call.len()..];
            let name = &rest[..rest.find('"').unwrap()];
            // A call, not prose about calls (`crash::point("…")` in a comment).
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                in_sources.insert(name.to_owned());
            }
        }
    }
    let listed_owned: BTreeSet<String> = listed.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        in_sources, listed_owned,
        "crash::POINTS and the crash points in the driver's sources differ"
    );

    let mut tests = Vec::new();
    rust_files(&manifest.join("tests"), &mut tests);
    let crashing: Vec<String> = tests
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .filter(|t| {
            t.contains("await_crash") || t.contains("crash_during") || t.contains("crash_at")
        })
        .collect();
    let unexercised: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|p| !crashing.iter().any(|t| t.contains(&format!("\"{p}\""))))
        .collect();
    assert!(
        unexercised.is_empty(),
        "crash points no test crashes the driver at: {unexercised:?}"
    );
    loud!(
        "crash points exercised: {} (of {} in the driver)",
        listed.len() - unexercised.len(),
        in_sources.len()
    );
    // What the crash tests run before this one in this target dir saw happen.
    if let Ok(seen) = std::fs::read_to_string(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("crash-points-exercised"),
    ) {
        let seen: BTreeSet<&str> = seen.lines().collect();
        loud!(
            "crash points seen aborting the driver in this target dir so far: {} of {}",
            seen.len(),
            listed.len()
        );
    }
}
