//! Project quotas on a real kernel: on an ext4 and an xfs filesystem built on a loop-mounted
//! image file with project quotas on, a write past a volume's size must fail with EDQUOT.
//! Where the kernel or the tools cannot provide project quotas, the test says exactly why it
//! skipped; the quota logic itself is covered through the syscall seam in stowage-driver.

#[macro_use]
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use stowage_csi::v1 as csi;

/// A filesystem on a loop-mounted image, unmounted (and the loop device freed) on drop.
struct LoopFs {
    mountpoint: PathBuf,
    mounted: bool,
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mountpoint).status();
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn make_fs(dir: &Path, fs: &str) -> Result<LoopFs, String> {
    let image = dir.join(format!("{fs}.img"));
    let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
    f.set_len(512 << 20).map_err(|e| e.to_string())?;
    drop(f);
    match fs {
        "ext4" => run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "quota,project"])
            .arg(&image))?,
        "xfs" => run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&image))?,
        _ => unreachable!(),
    }
    let mountpoint = dir.join(format!("{fs}-mnt"));
    std::fs::create_dir_all(&mountpoint).map_err(|e| e.to_string())?;
    let mut lfs = LoopFs {
        mountpoint,
        mounted: false,
    };
    run(Command::new("mount")
        .args(["-o", "loop,prjquota"])
        .arg(&image)
        .arg(&lfs.mountpoint))?;
    lfs.mounted = true;
    Ok(lfs)
}

async fn quota_enforced_on(fs: &str) {
    let test = format!("quota_enforced_on_{fs}");
    if !root_or_skip(&test) {
        return;
    }
    let tool = if fs == "ext4" {
        "mkfs.ext4"
    } else {
        "mkfs.xfs"
    };
    if Command::new(tool).arg("-V").output().is_err() {
        loud!("SKIPPED ({tool} is not installed; .ci/run installs it): {test}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lfs = match make_fs(dir.path(), fs) {
        Ok(l) => l,
        Err(why) => {
            loud!("SKIPPED (this kernel cannot mount {fs} with project quotas: {why}): {test}");
            return;
        }
    };
    let cfg = dir.path().join("stowage.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[pool]]\nname = \"q\"\nkind = \"dir\"\npath = \"{}\"\n",
            lfs.mountpoint.join("pool").display()
        ),
    )
    .unwrap();
    let h = Harness::start(&["--config", cfg.to_str().unwrap()]).await;
    let mut c = h.controller().await;
    let v = create_volume(&mut c, "capped", 4 << 20).await;
    if v.volume_context
        .get("capacityEnforcement")
        .map(String::as_str)
        != Some("quota")
    {
        eprintln!(
            "SKIPPED (project quotas not enforced on {fs} here: {}): {test}",
            v.volume_context
                .get("capacityNote")
                .cloned()
                .unwrap_or_default()
        );
        return;
    }
    let path = lfs
        .mountpoint
        .join("pool/volumes")
        .join(&v.volume_id)
        .join("fill");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xabu8; 1 << 20];
    let mut err = None;
    for _ in 0..8 {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("writing 8 MiB into a 4 MiB volume succeeded");
    assert_eq!(err.raw_os_error(), Some(122), "expected EDQUOT, got {err}");
    drop(f);
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id,
        secrets: Default::default(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn quota_enforced_on_ext4() {
    bounded(quota_enforced_on("ext4")).await
}

#[tokio::test]
async fn quota_enforced_on_xfs() {
    bounded(quota_enforced_on("xfs")).await
}
