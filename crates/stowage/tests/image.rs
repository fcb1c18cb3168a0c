//! The `image` pool over the real socket on real loop devices: hard sizes for ext4, xfs and
//! btrfs volumes, raw block volumes, online expansion, a reboot-like re-stage, stats, and
//! crashes at each step of stage and expand. Every test detaches its own loop devices on the
//! way out (also when it fails) and checks at its end that none is left on its images.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use stowage_csi::v1 as csi;
use stowage_csi::v1::volume_capability::access_mode::Mode;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;
const ENOSPC: i32 = 28;

/// A driver serving one `image` pool in its own directory; on drop, after the driver's
/// mounts are gone, detaches every loop device still backed by one of the pool's images.
struct ImagePool {
    h: Option<Harness>,
    root: tempfile::TempDir,
}

impl ImagePool {
    async fn start(test: &str) -> Option<ImagePool> {
        if !root_or_skip(test) {
            return None;
        }
        if !Path::new("/dev/loop-control").exists() {
            loud!("SKIPPED (no /dev/loop-control): {test}");
            return None;
        }
        let root = tempfile::Builder::new()
            .prefix("stowage-image-")
            .tempdir()
            .unwrap();
        let config = root.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[[pool]]\nname = \"img\"\nkind = \"image\"\npath = \"{}\"\ndefault_size = \"64Mi\"\n",
                root.path().join("pool").display()
            ),
        )
        .unwrap();
        let h = Harness::start(&["--config", config.to_str().unwrap()]).await;
        Some(ImagePool { h: Some(h), root })
    }

    fn h(&mut self) -> &mut Harness {
        self.h.as_mut().unwrap()
    }

    fn images(&self) -> PathBuf {
        self.root.path().join("pool/images")
    }

    fn image_of(&self, id: &str) -> PathBuf {
        self.images().join(format!("{id}.img"))
    }

    /// Loop devices backed by an image of this pool (`losetup -j`).
    fn loops(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(self.images()).into_iter().flatten() {
            let path = entry.unwrap().path();
            let out = Command::new("losetup")
                .arg("-j")
                .arg(&path)
                .output()
                .unwrap();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                if let Some((dev, _)) = line.split_once(':') {
                    found.push(dev.to_owned());
                }
            }
        }
        found
    }

    /// Bytes the host filesystem has allocated to a volume's image file.
    fn image_allocated(&self, id: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.image_of(id)).unwrap().blocks() * 512
    }
}

impl Drop for ImagePool {
    fn drop(&mut self) {
        // The harness kills the driver and lazily unmounts what is left under its directory;
        // the autoclear devices go with their mounts, the others are detached here.
        drop(self.h.take());
        for dev in self.loops() {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        }
    }
}

fn fs_cap(fs_type: &str) -> csi::VolumeCapability {
    let mut cap = mount_cap(Mode::SingleNodeWriter);
    if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.fs_type = fs_type.to_owned();
    }
    cap
}

struct Vol {
    id: String,
    cap: csi::VolumeCapability,
    staging: PathBuf,
    target: PathBuf,
    bytes: i64,
}

async fn create(p: &mut ImagePool, name: &str, bytes: i64, cap: csi::VolumeCapability) -> Vol {
    let mut c = p.h().controller().await;
    let mut req = create_req(name, bytes);
    req.volume_capabilities = vec![cap.clone()];
    let v = c
        .create_volume(req)
        .await
        .unwrap_or_else(|e| panic!("CreateVolume {name}: {e:?}"))
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        v.volume_context
            .get("capacityEnforcement")
            .map(String::as_str),
        Some("hard")
    );
    let kubelet = p.h().kubelet();
    Vol {
        staging: kubelet.join(format!("staging-{name}")),
        target: kubelet.join(format!("target-{name}")),
        id: v.volume_id,
        cap,
        bytes: v.capacity_bytes,
    }
}

fn stage_req(v: &Vol) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.display().to_string(),
        volume_capability: Some(v.cap.clone()),
        ..Default::default()
    }
}

fn publish_req(v: &Vol) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.display().to_string(),
        target_path: v.target.display().to_string(),
        volume_capability: Some(v.cap.clone()),
        ..Default::default()
    }
}

async fn stage(n: &mut csi::node_client::NodeClient<Channel>, v: &Vol) {
    n.node_stage_volume(stage_req(v))
        .await
        .unwrap_or_else(|e| panic!("NodeStageVolume: {e:?}"));
}

async fn publish(n: &mut csi::node_client::NodeClient<Channel>, v: &Vol) {
    n.node_publish_volume(publish_req(v))
        .await
        .unwrap_or_else(|e| panic!("NodePublishVolume: {e:?}"));
}

async fn teardown(p: &mut ImagePool, v: &Vol) {
    let mut n = p.h().node().await;
    n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: v.id.clone(),
        target_path: v.target.display().to_string(),
    })
    .await
    .unwrap();
    assert!(!v.target.exists(), "the target the driver made is removed");
    n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: v.id.clone(),
        staging_target_path: v.staging.display().to_string(),
    })
    .await
    .unwrap();
    let mut c = p.h().controller().await;
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.id.clone(),
        secrets: HashMap::new(),
    })
    .await
    .unwrap();
    assert!(!p.image_of(&v.id).exists(), "the image is removed");
}

/// Writes 1 MiB chunks into `path` until the filesystem refuses; returns how much it took.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(ENOSPC), "{e}");
                return written;
            }
        }
        if let Err(e) = f.sync_data() {
            assert_eq!(e.raw_os_error(), Some(ENOSPC), "{e}");
            return written;
        }
    }
}

fn bytes_usage(r: &csi::NodeGetVolumeStatsResponse) -> csi::VolumeUsage {
    r.usage
        .iter()
        .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
        .cloned()
        .unwrap()
}

async fn stats(p: &mut ImagePool, v: &Vol, path: &Path) -> csi::NodeGetVolumeStatsResponse {
    p.h()
        .node()
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.id.clone(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn hard_limit_for(fs: &str, bytes: i64) {
    let test = format!("image_{fs}_volume_is_hard_limited");
    if !have_mkfs(fs, &test) {
        return;
    }
    let Some(mut p) = ImagePool::start(&test).await else {
        return;
    };
    let v = create(&mut p, fs, bytes, fs_cap(fs)).await;
    assert!(v.bytes >= bytes);
    assert_eq!(
        std::fs::metadata(p.image_of(&v.id)).unwrap().len(),
        v.bytes as u64
    );
    let mut n = p.h().node().await;
    stage(&mut n, &v).await;
    // Idempotent.
    stage(&mut n, &v).await;
    publish(&mut n, &v).await;
    let written = fill(&v.target.join("big"));
    assert!(
        written > 0 && written <= v.bytes as u64,
        "{fs}: wrote {written} of {}",
        v.bytes
    );
    // What the volume took from the host is its image file's allocation, never more than
    // its size (plus the host's own extent blocks). Measured on the file, not as the host
    // filesystem's free space, which the other tests of this binary change concurrently.
    let allocated = p.image_allocated(&v.id);
    assert!(
        allocated <= v.bytes as u64 + (1 << 20),
        "{fs}: the host filesystem gave {allocated} bytes to a {}-byte volume",
        v.bytes
    );
    let st = stats(&mut p, &v, &v.target).await;
    let b = bytes_usage(&st);
    assert!(b.total > 0 && b.total <= v.bytes, "{fs}: {b:?}");
    assert!(b.used > 0, "{fs}: {b:?}");
    assert!(!st.volume_condition.unwrap().abnormal);
    // Asking for another filesystem than the one made is refused, never a reformat.
    let other = if fs == "ext4" { "xfs" } else { "ext4" };
    let mut wrong = stage_req(&v);
    wrong.staging_target_path = p.h().kubelet().join("other").display().to_string();
    wrong.volume_capability = Some(fs_cap(other));
    let err = n.node_stage_volume(wrong).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(fs) && err.message().contains(other),
        "{err:?}"
    );
    teardown(&mut p, &v).await;
    assert_eq!(p.loops(), Vec::<String>::new(), "loop devices left");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_ext4_volume_is_hard_limited() {
    bounded(hard_limit_for("ext4", 32 * MIB)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn image_xfs_volume_is_hard_limited() {
    // Asked for less than xfs's minimum: rounded up to it.
    bounded(hard_limit_for("xfs", 16 * MIB)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn image_btrfs_volume_is_hard_limited() {
    bounded(hard_limit_for("btrfs", 128 * MIB)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn image_block_volume_takes_writes_up_to_its_size() {
    bounded(async {
        let test = "image_block_volume_takes_writes_up_to_its_size";
        let Some(mut p) = ImagePool::start(test).await else {
            return;
        };
        let v = create(&mut p, "raw", 8 * MIB, block_cap()).await;
        let mut n = p.h().node().await;
        stage(&mut n, &v).await;
        stage(&mut n, &v).await;
        assert_eq!(p.loops().len(), 1, "attached once");
        publish(&mut n, &v).await;
        publish(&mut n, &v).await;
        let meta = std::fs::metadata(&v.target).unwrap();
        assert!(meta.file_type().is_block_device(), "{meta:?}");
        let opts = mount_options(&v.target).unwrap();
        assert!(!opts.split(',').any(|o| o == "nodev"), "{opts}");
        assert!(opts.split(',').any(|o| o == "nosuid"), "{opts}");
        {
            let mut dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&v.target)
                .unwrap();
            assert_eq!(dev.seek(SeekFrom::End(0)).unwrap(), v.bytes as u64);
            dev.seek(SeekFrom::Start(v.bytes as u64 - 4096)).unwrap();
            dev.write_all(&[7u8; 4096]).unwrap();
            dev.sync_all().unwrap();
            let err = dev.write(&[7u8; 4096]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(ENOSPC), "{err}");
            dev.seek(SeekFrom::Start(v.bytes as u64 - 4096)).unwrap();
            let mut back = [0u8; 4096];
            dev.read_exact(&mut back).unwrap();
            assert_eq!(back, [7u8; 4096]);
        }
        let st = stats(&mut p, &v, &v.target).await;
        assert_eq!(bytes_usage(&st).total, v.bytes);
        let st = stats(&mut p, &v, &v.staging).await;
        assert_eq!(bytes_usage(&st).total, v.bytes);
        // Expansion of a block volume: the device follows, no filesystem step.
        let mut c = p.h().controller().await;
        let r = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 16 * MIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.node_expansion_required);
        let r = n
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: v.id.clone(),
                volume_path: v.target.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, 16 * MIB);
        let mut dev = std::fs::File::open(&v.target).unwrap();
        assert_eq!(dev.seek(SeekFrom::End(0)).unwrap(), 16 << 20);
        drop(dev);
        teardown(&mut p, &v).await;
        assert_eq!(p.loops(), Vec::<String>::new(), "loop devices left");
    })
    .await;
}

async fn expand_online(fs: &str, from: i64, to: i64) {
    let test = format!("image_{fs}_grows_online");
    if !have_mkfs(fs, &test) {
        return;
    }
    let Some(mut p) = ImagePool::start(&test).await else {
        return;
    };
    let v = create(&mut p, fs, from, fs_cap(fs)).await;
    let mut n = p.h().node().await;
    stage(&mut n, &v).await;
    publish(&mut n, &v).await;
    std::fs::write(v.target.join("before"), b"kept").unwrap();
    let before = bytes_usage(&stats(&mut p, &v, &v.target).await).total;
    let mut c = p.h().controller().await;
    let expand = csi::ControllerExpandVolumeRequest {
        volume_id: v.id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: to,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let r = c
        .controller_expand_volume(expand.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.capacity_bytes, r.node_expansion_required), (to, true));
    // Repeated, and lowered: success with the size it has.
    let r = c
        .controller_expand_volume(expand.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, to);
    let mut lower = expand.clone();
    lower.capacity_range = Some(csi::CapacityRange {
        required_bytes: from,
        limit_bytes: 0,
    });
    assert_eq!(
        c.controller_expand_volume(lower)
            .await
            .unwrap()
            .into_inner()
            .capacity_bytes,
        to
    );
    assert_eq!(
        std::fs::metadata(p.image_of(&v.id)).unwrap().len(),
        to as u64
    );
    let node_req = csi::NodeExpandVolumeRequest {
        volume_id: v.id.clone(),
        volume_path: v.target.display().to_string(),
        staging_target_path: v.staging.display().to_string(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: to,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    match n.node_expand_volume(node_req.clone()).await {
        Ok(r) => assert_eq!(r.into_inner().capacity_bytes, to),
        Err(e) if fs == "ext4" && e.message().contains("Permission denied to resize") => {
            loud!("SKIPPED (ext4 grows online only with CAP_SYS_RESOURCE, which this sandbox lacks): {test}");
            teardown(&mut p, &v).await;
            return;
        }
        Err(e) => panic!("NodeExpandVolume: {e:?}"),
    }
    // Idempotent.
    n.node_expand_volume(node_req.clone()).await.unwrap();
    let after = bytes_usage(&stats(&mut p, &v, &v.target).await).total;
    assert!(after > before, "{fs}: {before} -> {after}");
    assert_eq!(std::fs::read(v.target.join("before")).unwrap(), b"kept");
    // Not where the volume is: NOT_FOUND.
    let mut elsewhere = node_req.clone();
    elsewhere.volume_path = p.h().kubelet().join("nowhere").display().to_string();
    assert_eq!(
        code(n.node_expand_volume(elsewhere).await),
        tonic::Code::NotFound
    );
    let mut unknown = node_req.clone();
    unknown.volume_id = "0000000000000000000000000000000a".into();
    assert_eq!(
        code(n.node_expand_volume(unknown).await),
        tonic::Code::NotFound
    );
    teardown(&mut p, &v).await;
    assert_eq!(p.loops(), Vec::<String>::new(), "loop devices left");
}

#[tokio::test(flavor = "multi_thread")]
async fn image_xfs_grows_online() {
    bounded(expand_online("xfs", 300 * MIB, 400 * MIB)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn image_btrfs_grows_online() {
    // The kernel resizes btrfs only to 256 MiB or more.
    bounded(expand_online("btrfs", 256 * MIB, 320 * MIB)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn image_ext4_grows_online() {
    bounded(expand_online("ext4", 32 * MIB, 48 * MIB)).await;
}

/// After a reboot the images are there and no loop device is: a repeated stage re-attaches
/// and remounts, with the data.
#[tokio::test(flavor = "multi_thread")]
async fn image_restage_after_a_reboot_like_detach() {
    bounded(async {
        let test = "image_restage_after_a_reboot_like_detach";
        let Some(mut p) = ImagePool::start(test).await else {
            return;
        };
        let v = create(&mut p, "reboot", 32 * MIB, fs_cap("")).await;
        let mut n = p.h().node().await;
        stage(&mut n, &v).await;
        publish(&mut n, &v).await;
        std::fs::write(v.target.join("data"), b"survives").unwrap();
        p.h().crash();
        // What a reboot leaves: no mounts (so no autoclear device), the records, the image.
        for m in mounts_under(p.h().kubelet().as_path()) {
            assert!(Command::new("umount").arg(&m).status().unwrap().success());
        }
        assert_eq!(
            p.loops(),
            Vec::<String>::new(),
            "autoclear freed the device"
        );
        p.h().spawn().await;
        let mut n = p.h().node().await;
        stage(&mut n, &v).await;
        publish(&mut n, &v).await;
        assert_eq!(std::fs::read(v.target.join("data")).unwrap(), b"survives");
        assert_eq!(p.loops().len(), 1);
        teardown(&mut p, &v).await;
        assert_eq!(p.loops(), Vec::<String>::new(), "loop devices left");
    })
    .await;
}

/// Stats: the volume's own filesystem; abnormal when its image is gone.
#[tokio::test(flavor = "multi_thread")]
async fn image_stats_and_missing_image() {
    bounded(async {
        let test = "image_stats_and_missing_image";
        let Some(mut p) = ImagePool::start(test).await else {
            return;
        };
        let v = create(&mut p, "stats", 32 * MIB, fs_cap("ext4")).await;
        let mut n = p.h().node().await;
        stage(&mut n, &v).await;
        let st = stats(&mut p, &v, &v.staging).await;
        let b = bytes_usage(&st);
        assert!(b.total > 16 * MIB && b.total <= 32 * MIB, "{b:?}");
        let inodes = st
            .usage
            .iter()
            .find(|u| u.unit == csi::volume_usage::Unit::Inodes as i32)
            .unwrap();
        assert!(inodes.total > 0 && inodes.used > 0, "{inodes:?}");
        // The image removed under the driver (the device keeps its inode): abnormal.
        let aside = p.root.path().join("aside.img");
        std::fs::rename(p.image_of(&v.id), &aside).unwrap();
        let st = stats(&mut p, &v, &v.staging).await;
        assert!(st.volume_condition.unwrap().abnormal);
        std::fs::rename(&aside, p.image_of(&v.id)).unwrap();
        let st = stats(&mut p, &v, &v.staging).await;
        assert!(!st.volume_condition.unwrap().abnormal);
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.id.clone(),
            staging_target_path: v.staging.display().to_string(),
        })
        .await
        .unwrap();
        assert_eq!(p.loops(), Vec::<String>::new(), "loop devices left");
    })
    .await;
}

/// Restarts the driver armed to abort at `point`, runs the call, restarts it clean.
async fn crash_at(p: &mut ImagePool, point: &str, call: impl std::future::Future<Output = ()>) {
    let h = p.h();
    h.stop();
    h.env = vec![(CRASH_ENV.to_owned(), point.to_owned())];
    h.spawn().await;
    call.await;
    assert!(h.await_crash(), "the driver did not abort at {point}");
    h.env.clear();
    h.spawn().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn image_stage_and_expand_survive_a_crash_at_every_step() {
    bounded(async {
        let test = "image_stage_and_expand_survive_a_crash_at_every_step";
        let Some(mut p) = ImagePool::start(test).await else {
            return;
        };
        let v = create(&mut p, "crashy", 300 * MIB, fs_cap("xfs")).await;
        for point in ["stage-after-mkfs", "mount-after-mount"] {
            let ch = p.h().channel().await;
            let req = stage_req(&v);
            crash_at(&mut p, point, async move {
                let mut n = csi::node_client::NodeClient::new(ch);
                assert_ne!(code(n.node_stage_volume(req).await), tonic::Code::Ok);
            })
            .await;
            let mut n = p.h().node().await;
            stage(&mut n, &v).await;
            assert_eq!(p.loops().len(), 1, "{point}: one device");
            assert_eq!(mount_count(&v.staging), 1, "{point}: one mount");
            n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: v.id.clone(),
                staging_target_path: v.staging.display().to_string(),
            })
            .await
            .unwrap();
            assert_eq!(p.loops(), Vec::<String>::new(), "{point}: devices left");
        }
        let mut n = p.h().node().await;
        stage(&mut n, &v).await;
        publish(&mut n, &v).await;
        let mut size = 300 * MIB;
        let mut last_total = bytes_usage(&stats(&mut p, &v, &v.target).await).total;
        for point in [
            "expand-after-intent",
            "expand-after-backend",
            "node-expand-after-device",
        ] {
            size += 32 * MIB;
            let ch = p.h().channel().await;
            let (id, target) = (v.id.clone(), v.target.clone());
            let range = Some(csi::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            });
            let node_req = csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: range,
                ..Default::default()
            };
            let ctrl_req = csi::ControllerExpandVolumeRequest {
                volume_id: id,
                capacity_range: range,
                ..Default::default()
            };
            let nr = node_req.clone();
            let cr = ctrl_req.clone();
            let node_step = point.starts_with("node");
            crash_at(&mut p, point, async move {
                if node_step {
                    let mut c = csi::controller_client::ControllerClient::new(ch.clone());
                    c.controller_expand_volume(cr).await.unwrap();
                    let mut n = csi::node_client::NodeClient::new(ch);
                    assert_ne!(code(n.node_expand_volume(nr).await), tonic::Code::Ok);
                } else {
                    let mut c = csi::controller_client::ControllerClient::new(ch);
                    assert_ne!(code(c.controller_expand_volume(cr).await), tonic::Code::Ok);
                }
            })
            .await;
            // The restart kept the mounts (a crash is not a reboot); the retries converge.
            let mut c = p.h().controller().await;
            let r = c
                .controller_expand_volume(ctrl_req)
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.capacity_bytes, size, "{point}");
            let mut n = p.h().node().await;
            let r = n.node_expand_volume(node_req).await.unwrap().into_inner();
            assert_eq!(r.capacity_bytes, size, "{point}");
            assert_eq!(
                std::fs::metadata(p.image_of(&v.id)).unwrap().len(),
                size as u64
            );
            let total = bytes_usage(&stats(&mut p, &v, &v.target).await).total;
            assert!(total > last_total, "{point}: {last_total} -> {total}");
            last_total = total;
            assert_eq!(p.loops().len(), 1, "{point}: one device");
        }
        teardown(&mut p, &v).await;
        assert_eq!(p.loops(), Vec::<String>::new(), "loop devices left");
        let pool = p.root.path().join("pool");
        assert_nothing_leaked(p.h(), &pool, &[], &[], "the end").await;
    })
    .await;
}

/// The store and the pool agree: the volumes listed are the images present, each listed
/// with its image's size.
async fn store_and_pool_agree(p: &mut ImagePool, when: &str) {
    let mut c = p.h().controller().await;
    let mut listed: Vec<(String, u64)> = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| {
            let v = e.volume.unwrap();
            (v.volume_id, v.capacity_bytes as u64)
        })
        .collect();
    listed.sort();
    let mut images: Vec<(String, u64)> = std::fs::read_dir(p.images())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let id = name.strip_suffix(".img").unwrap_or(&name).to_owned();
            (id, e.metadata().unwrap().len())
        })
        .collect();
    images.sort();
    assert_eq!(listed, images, "{when}: store and pool disagree");
}

/// The crash points the test above leaves out: the stage intent (recorded, nothing on disk
/// yet), the node expansion's intent (capacity recorded, image not grown: NodeExpandVolume
/// without the controller step, as in the per-node deployment), and both steps of staging a
/// raw block volume (whose device is not freed by autoclear). A clean restart keeps a staged
/// and published block volume attached.
#[tokio::test(flavor = "multi_thread")]
async fn image_stage_intent_node_expand_intent_and_block_stage_survive_a_crash() {
    bounded(async {
        let test = "image_stage_intent_node_expand_intent_and_block_stage_survive_a_crash";
        let Some(mut p) = ImagePool::start(test).await else {
            return;
        };
        // xfs: it grows online without CAP_SYS_RESOURCE, which ext4 needs.
        if !have_mkfs("xfs", test) {
            return;
        }
        let v = create(&mut p, "intent", 300 * MIB, fs_cap("xfs")).await;
        let ch = p.h().channel().await;
        let req = stage_req(&v);
        crash_at(&mut p, "mount-after-intent", async move {
            let mut n = csi::node_client::NodeClient::new(ch);
            assert_ne!(code(n.node_stage_volume(req).await), tonic::Code::Ok);
        })
        .await;
        assert_eq!(
            p.loops(),
            Vec::<String>::new(),
            "attached before the intent"
        );
        let mut n = p.h().node().await;
        stage(&mut n, &v).await;
        assert_eq!(p.loops().len(), 1, "one device");
        assert_eq!(mount_count(&v.staging), 1, "one mount");
        publish(&mut n, &v).await;
        let before = bytes_usage(&stats(&mut p, &v, &v.target).await).total;

        let size = 332 * MIB;
        let node_req = csi::NodeExpandVolumeRequest {
            volume_id: v.id.clone(),
            volume_path: v.target.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        let ch = p.h().channel().await;
        let nr = node_req.clone();
        crash_at(&mut p, "node-expand-after-intent", async move {
            let mut n = csi::node_client::NodeClient::new(ch);
            assert_ne!(code(n.node_expand_volume(nr).await), tonic::Code::Ok);
        })
        .await;
        assert_eq!(
            std::fs::metadata(p.image_of(&v.id)).unwrap().len(),
            300 * MIB as u64,
            "the image grew before the crash point"
        );
        let mut n = p.h().node().await;
        let r = n.node_expand_volume(node_req).await.unwrap().into_inner();
        assert_eq!(r.capacity_bytes, size);
        assert_eq!(
            std::fs::metadata(p.image_of(&v.id)).unwrap().len(),
            size as u64
        );
        // The controller step, arriving late, agrees.
        let mut c = p.h().controller().await;
        let r = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: size,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.capacity_bytes, size);
        let after = bytes_usage(&stats(&mut p, &v, &v.target).await).total;
        assert!(
            after > before,
            "the filesystem did not grow: {before} -> {after}"
        );
        assert_eq!(p.loops().len(), 1, "one device");
        store_and_pool_agree(&mut p, "after the node expansion").await;
        teardown(&mut p, &v).await;
        assert_eq!(p.loops(), Vec::<String>::new(), "devices left");

        let b = create(&mut p, "rawcrash", 8 * MIB, block_cap()).await;
        for point in ["mount-after-intent", "mount-after-mount"] {
            let ch = p.h().channel().await;
            let req = stage_req(&b);
            crash_at(&mut p, point, async move {
                let mut n = csi::node_client::NodeClient::new(ch);
                assert_ne!(code(n.node_stage_volume(req).await), tonic::Code::Ok);
            })
            .await;
            let mut n = p.h().node().await;
            stage(&mut n, &b).await;
            assert_eq!(p.loops().len(), 1, "{point}: one device");
            n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: b.id.clone(),
                staging_target_path: b.staging.display().to_string(),
            })
            .await
            .unwrap();
            assert_eq!(p.loops(), Vec::<String>::new(), "{point}: devices left");
            store_and_pool_agree(&mut p, point).await;
        }
        let mut n = p.h().node().await;
        stage(&mut n, &b).await;
        publish(&mut n, &b).await;
        p.h().stop();
        p.h().spawn().await;
        assert_eq!(
            p.loops().len(),
            1,
            "a restart detached a staged and published block volume"
        );
        let mut n = p.h().node().await;
        stage(&mut n, &b).await;
        assert_eq!(p.loops().len(), 1, "attached twice");
        teardown(&mut p, &b).await;
        assert_eq!(p.loops(), Vec::<String>::new(), "devices left");
        let pool = p.root.path().join("pool");
        assert_nothing_leaked(p.h(), &pool, &[], &[], "the end").await;
    })
    .await;
}

/// A `dir` volume grows in the controller step alone.
#[tokio::test(flavor = "multi_thread")]
async fn dir_expansion_needs_no_node_step() {
    bounded(async {
        let h = Harness::start(&[]).await;
        let mut c = h.controller().await;
        let v = create_volume(&mut c, "grow", MIB).await;
        let r = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 2 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (r.capacity_bytes, r.node_expansion_required),
            (2 * MIB, false)
        );
        let unknown = csi::ControllerExpandVolumeRequest {
            volume_id: "0000000000000000000000000000000a".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        assert_eq!(
            code(c.controller_expand_volume(unknown).await),
            tonic::Code::NotFound
        );
        // Block volumes stay refused by dir pools.
        let mut req = create_req("blk", MIB);
        req.volume_capabilities = vec![block_cap()];
        assert_eq!(
            code(c.create_volume(req).await),
            tonic::Code::InvalidArgument
        );
    })
    .await;
}
