//! The `image` kind: a sparse image file per volume, `<path>/images/<volume id>.img`, of
//! exactly the volume's size, attached to a loop device at stage. The size is a hard limit on
//! any host filesystem: the volume's own filesystem (ext4, xfs or btrfs, made at the first
//! stage) cannot grow past its device. Raw block volumes publish the loop device itself.
//!
//! Lifetimes of the loop device (see `stowage_sys::loopdev`): a filesystem volume is attached
//! with autoclear, mounted, and the driver's handle dropped, so the mount alone holds the
//! device and unmounting frees it (even after a crash of the driver). A block volume is
//! attached without autoclear (a bind-mounted device node does not hold the device open) and
//! detached explicitly at unstage.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use stowage_core::config::PoolConfig;
use stowage_core::request::Access;
use stowage_core::{Error, Result};
use stowage_sys::fs as sysfs;
use stowage_sys::image::{self as img, Allocation};
use stowage_sys::{
    blockfs, loopdev, DeviceContent, Errno, FsKind, Kernel, LoopDevice, LoopOptions, SysError,
};

use super::{
    sys_error as sys, Condition, Mark, PoolBackend, PoolCapacity, StageRequest, VolumeLayout,
    VolumeUsage,
};
use crate::store::VolumeRecord;

mod snapshots;

/// The filesystem a volume gets when the capability names none.
pub const DEFAULT_FS: FsKind = FsKind::Ext4;

/// The options a volume's filesystem is mounted with. A restore or clone carries its
/// source's filesystem UUID, and xfs refuses to mount a filesystem whose UUID a mounted one
/// already has ("duplicate UUID", EINVAL): a restored volume could not be staged while its
/// source (or another restore of the same snapshot) is, nor the source after it. `nouuid`
/// skips that check; the UUID is not otherwise used by the driver (devices are found by
/// their image file).
fn mount_options(kind: FsKind) -> Vec<String> {
    match kind {
        FsKind::Xfs => vec!["nouuid".to_owned()],
        FsKind::Ext4 | FsKind::Btrfs => Vec::new(),
    }
}

/// The smallest size the kernel resizes a btrfs filesystem to (BTRFS_IOC_RESIZE: EINVAL
/// below it).
const BTRFS_MIN_RESIZE: u64 = 256 << 20;

/// Suffix of image file names.
const SUFFIX: &str = ".img";

/// The backend of an `image` pool.
#[derive(Debug)]
pub struct ImageBackend {
    /// The pool's name, for messages.
    name: String,
    /// `<path>/images`, the only directory images are resolved in.
    images: OwnedFd,
    /// `<path>/snapshots`, where snapshots are kept as image files, never attached.
    snapshots: OwnedFd,
    /// Held around a clone with a staged filesystem frozen (see `snapshots`).
    freezing: std::sync::Mutex<()>,
    images_path: PathBuf,
    /// Above 1.0: sizes may add up to this many times the pool filesystem's size.
    overcommit: Option<f64>,
    kernel: Arc<dyn Kernel>,
}

fn image_name(vol: &VolumeRecord) -> String {
    format!("{}{SUFFIX}", vol.id)
}

fn allocation(vol: &VolumeRecord) -> Allocation {
    if vol.full_allocation {
        Allocation::Full
    } else {
        Allocation::Sparse
    }
}

/// Fsyncs an image after its size changed, so "durable on return" holds for the size.
fn sync_image(fd: &OwnedFd, what: &str) -> Result<()> {
    let dup = fd
        .try_clone()
        .map_err(|e| Error::internal(format!("duplicating the fd of {what}"), e))?;
    File::from(dup)
        .sync_all()
        .map_err(|e| Error::internal(format!("fsync of {what}"), e))
}

impl ImageBackend {
    /// Opens (creating if needed) the pool's image directory and says in the log how its
    /// capacity is accounted.
    pub fn open(cfg: &PoolConfig, kernel: Arc<dyn Kernel>) -> Result<Self> {
        let (images, fs_type) = super::open_pool_dir(cfg, "images")?;
        let (snapshots, _) = super::open_pool_dir(cfg, "snapshots")?;
        let images_path = cfg.path.join("images");
        let overcommit = cfg.overcommit_ratio.filter(|r| *r > 1.0);
        match overcommit {
            None => tracing::info!(
                pool = %cfg.name, path = %cfg.path.display(), fs = %fs_type,
                "image pool: capacity is HARD (a loop device per volume); no overcommit: the unallocated part of every image counts as taken"
            ),
            Some(ratio) => tracing::warn!(
                pool = %cfg.name, path = %cfg.path.display(), fs = %fs_type, overcommit_ratio = ratio,
                "image pool: capacity is HARD per volume, but OVERCOMMITTED: volume sizes may add up to {ratio} times the pool filesystem; a full pool fails writes inside volumes"
            ),
        }
        Ok(ImageBackend {
            name: cfg.name.clone(),
            images,
            snapshots,
            freezing: std::sync::Mutex::new(()),
            images_path,
            overcommit,
            kernel,
        })
    }

    /// Opens the volume's image; NOT_FOUND when it is missing.
    fn open_image(&self, vol: &VolumeRecord) -> Result<OwnedFd> {
        img::open_image(self.images.as_fd(), &image_name(vol)).map_err(|e| {
            if e.errno == Errno::NOENT {
                Error::NotFound(format!(
                    "the image of volume {} is missing from pool {:?}",
                    vol.id, self.name
                ))
            } else {
                Error::internal(format!("opening the image of volume {}", vol.id), e)
            }
        })
    }

    /// The loop device the volume's image is attached to, if any.
    fn attached(&self, vol: &VolumeRecord, image: BorrowedFd<'_>) -> Result<Option<LoopDevice>> {
        self.kernel.find_loop(image).map_err(|e| {
            Error::internal(
                format!("looking for the loop device of volume {}", vol.id),
                e,
            )
        })
    }

    /// Attaches the image (or finds it attached) with the volume's recorded block size;
    /// `autoclear` for filesystem volumes. The device follows the image's current size.
    fn attach(&self, vol: &VolumeRecord, image: BorrowedFd<'_>) -> Result<LoopDevice> {
        let options = LoopOptions {
            read_only: false,
            autoclear: !vol.block,
            direct_io: true,
            block_size: vol
                .block_size
                .unwrap_or_else(|| loopdev::suggested_block_size(image)),
        };
        let dev = self.kernel.attach_loop(image, options).map_err(|e| {
            Error::internal(format!("attaching volume {} to a loop device", vol.id), e)
        })?;
        if let Some(errno) = dev.direct_io_refused {
            tracing::debug!(volume = %vol.id, device = %dev.path.display(), %errno, "direct I/O refused by the pool's filesystem; the loop device uses the page cache");
        }
        if !dev.newly_attached {
            // Attached before an expansion of the image: make it see the new size.
            self.kernel.refresh_loop_capacity(&dev).map_err(|e| {
                Error::internal(format!("refreshing the size of {}", dev.path.display()), e)
            })?;
        }
        Ok(dev)
    }

    /// The filesystem a filesystem volume has (recorded) or gets.
    fn fs_kind(&self, vol: &VolumeRecord, requested: &str) -> Result<FsKind> {
        let name = match (vol.fs_type.as_deref(), requested) {
            (Some(have), "") => have,
            (Some(have), want) if have != want => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} carries a {have} filesystem; the capability asks for {want}",
                    vol.id
                )))
            }
            (_, "") => DEFAULT_FS.name(),
            (_, want) => want,
        };
        FsKind::from_name(name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "filesystem {name:?} is not one pool {:?} makes (ext4, xfs, btrfs)",
                self.name
            ))
        })
    }

    /// Space of the pool's filesystem, and the images' sizes and their unallocated parts.
    fn accounting(&self) -> Result<(sysfs::FsSpace, u64, u64)> {
        let space = sysfs::fs_space(self.images.as_fd())
            .map_err(sys(format!("pool {:?}: statvfs", self.name)))?;
        let (mut sizes, mut unallocated) = (0u64, 0u64);
        for name in sysfs::entry_names(self.images.as_fd())
            .map_err(sys(format!("listing pool {:?}", self.name)))?
        {
            if !name.ends_with(SUFFIX) {
                continue;
            }
            let fd = match img::open_image(self.images.as_fd(), &name) {
                Ok(fd) => fd,
                // Deleted meanwhile, or not a regular file: not a volume's image.
                Err(_) => continue,
            };
            let size = img::image_size(fd.as_fd()).map_err(sys("statx of an image"))?;
            let allocated = img::allocated_bytes(fd.as_fd()).map_err(sys("statx of an image"))?;
            sizes = sizes.saturating_add(size);
            unallocated = unallocated.saturating_add(size.saturating_sub(allocated));
        }
        Ok((space, sizes, unallocated))
    }

    fn tool_error(what: String) -> impl FnOnce(stowage_sys::ToolError) -> Error {
        move |e| Error::Internal(format!("{what}: {e}"))
    }

    /// The device node of an attached device, opened `O_PATH` (the source of a block
    /// publication, and its identity).
    fn device_node(&self, dev: &LoopDevice) -> Result<OwnedFd> {
        sysfs::open_path_nofollow(&dev.path)
            .map_err(|e| Error::internal(format!("opening {}", dev.path.display()), e))
    }
}

impl PoolBackend for ImageBackend {
    fn supports_block(&self) -> bool {
        true
    }

    fn supports_fs_type(&self, fs_type: &str) -> bool {
        fs_type.is_empty() || FsKind::from_name(fs_type).is_some()
    }

    fn default_fs_type(&self) -> &str {
        DEFAULT_FS.name()
    }

    fn context(&self) -> HashMap<String, String> {
        [("capacityEnforcement".to_owned(), "hard".to_owned())].into()
    }

    fn enforces_capacity(&self) -> bool {
        true
    }

    /// Without overcommit: the pool filesystem's free space minus what existing sparse
    /// images may still claim. With a ratio: that many times the filesystem's size minus the
    /// sizes of all images.
    fn capacity(&self) -> Result<PoolCapacity> {
        let (space, sizes, unallocated) = self.accounting()?;
        Ok(match self.overcommit {
            None => PoolCapacity {
                total: space.bytes_total,
                available: space.bytes_available.saturating_sub(unallocated),
            },
            Some(ratio) => {
                let total = (space.bytes_total as f64 * ratio) as u64;
                PoolCapacity {
                    total,
                    available: total.saturating_sub(sizes),
                }
            }
        })
    }

    /// The host filesystem's size (times the overcommit ratio): one statvfs, no scan of the
    /// images.
    fn max_volume_size(&self) -> Result<u64> {
        let space = sysfs::fs_space(self.images.as_fd())
            .map_err(sys(format!("pool {:?}: statvfs", self.name)))?;
        Ok(match self.overcommit {
            None => space.bytes_total,
            Some(ratio) => (space.bytes_total as f64 * ratio) as u64,
        })
    }

    fn min_volume_size(&self, fs_type: &str) -> u64 {
        FsKind::from_name(if fs_type.is_empty() {
            DEFAULT_FS.name()
        } else {
            fs_type
        })
        .map_or(0, FsKind::min_size)
    }

    /// Creates the image of exactly the volume's size (allocated with `allocation=full`).
    /// A new image that the pool cannot guarantee (no overcommit) is RESOURCE_EXHAUSTED.
    fn create(&self, vol: &VolumeRecord) -> Result<()> {
        let name = image_name(vol);
        let exists = match sysfs::entry_info(self.images.as_fd(), &name) {
            Ok(_) => true,
            Err(e) if e.errno == Errno::NOENT => false,
            Err(e) => return Err(Error::internal(format!("statx of image {name}"), e)),
        };
        if !exists && self.overcommit.is_none() && !vol.full_allocation {
            let space = self.capacity()?;
            if vol.capacity > space.available {
                return Err(Error::ResourceExhausted(format!(
                    "pool {:?} can guarantee {} more bytes, not {}",
                    self.name, space.available, vol.capacity
                )));
            }
        }
        let (fd, _) = img::ensure_image(self.images.as_fd(), &name, vol.capacity, allocation(vol))
            .map_err(|e| match e.errno {
                Errno::EXIST => Error::Internal(format!(
                    "pool {:?}: {name} exists but is not the image of this volume: {e}",
                    self.name
                )),
                _ => sys(format!("creating the image of volume {}", vol.id))(e),
            })?;
        sync_image(&fd, &name)?;
        sysfs::sync_dir(self.images.as_fd()).map_err(sys(format!("syncing pool {:?}", self.name)))
    }

    /// Removes the image; refused while a loop device is attached to it (staged).
    fn delete(&self, vol: &VolumeRecord) -> Result<()> {
        let image = match self.open_image(vol) {
            Ok(fd) => fd,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some(dev) = self.attached(vol, image.as_fd())? {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is attached to {} (still staged on this node); it was left in place",
                vol.id,
                dev.path.display()
            )));
        }
        drop(image);
        img::remove_image(self.images.as_fd(), &image_name(vol))
            .map_err(|e| Error::internal(format!("removing the image of volume {}", vol.id), e))?;
        sysfs::sync_dir(self.images.as_fd()).map_err(sys(format!("syncing pool {:?}", self.name)))
    }

    /// Grows the image (never shrinks it); the device and filesystem follow in the node step.
    fn expand(&self, vol: &VolumeRecord, capacity: u64) -> Result<bool> {
        let image = self.open_image(vol)?;
        let before = img::image_size(image.as_fd()).map_err(sys("statx of an image"))?;
        let after = img::grow_image(image.as_fd(), capacity, allocation(vol))
            .map_err(sys(format!("growing the image of volume {}", vol.id)))?;
        if after != before {
            sync_image(&image, &image_name(vol))?;
        }
        Ok(true)
    }

    fn ensure_limit(&self, _vol: &VolumeRecord) -> Result<bool> {
        Ok(false)
    }

    fn recover_staged(&self, vol: &VolumeRecord, staged: BorrowedFd<'_>) -> Result<()> {
        self.thaw_if_frozen(vol, staged)
    }

    /// Volume ids of the images in the pool (and other names as they are).
    fn entry_names(&self) -> Result<Vec<String>> {
        Ok(sysfs::entry_names(self.images.as_fd())
            .map_err(sys(format!("listing pool {:?}", self.name)))?
            .into_iter()
            .map(|n| n.strip_suffix(SUFFIX).map(str::to_owned).unwrap_or(n))
            .collect())
    }

    /// Abnormal when the image is missing, not a regular file, or smaller than the volume.
    fn condition(&self, vol: &VolumeRecord) -> Condition {
        let abnormal = |message: String| Condition {
            abnormal: true,
            message,
        };
        let image = match self.open_image(vol) {
            Ok(fd) => fd,
            Err(Error::NotFound(m)) => return abnormal(m),
            Err(e) => return abnormal(format!("the volume's image cannot be opened: {e}")),
        };
        match img::image_size(image.as_fd()) {
            Ok(size) if size < vol.capacity => Condition {
                abnormal: false,
                message: format!(
                    "capacity enforced by its image file ({size} bytes; growing to {} is pending)",
                    vol.capacity
                ),
            },
            Ok(size) => Condition {
                abnormal: false,
                message: format!("capacity enforced by its image file ({size} bytes)"),
            },
            Err(e) => abnormal(format!("the volume's image cannot be checked: {e}")),
        }
    }

    /// Filesystem volumes: any mount of the filesystem on the volume's loop device. Block
    /// volumes: the device node itself. NOT_FOUND while not attached.
    fn mark(&self, vol: &VolumeRecord) -> Result<Mark> {
        let image = self.open_image(vol)?;
        let dev = self.attached(vol, image.as_fd())?.ok_or_else(|| {
            Error::NotFound(format!(
                "volume {} is not attached to a loop device on this node",
                vol.id
            ))
        })?;
        if vol.block {
            let node = self.device_node(&dev)?;
            let info = sysfs::file_info(node.as_fd())
                .map_err(|e| Error::internal(format!("statx of {}", dev.path.display()), e))?;
            return Ok(Mark::Inode(info.id));
        }
        // ext4 and xfs show the device's own number as st_dev; btrfs an anonymous one of its
        // subvolume, read from a mount of it found in the mount table by its source.
        let source = dev.path.to_string_lossy().into_owned();
        let mounts = stowage_sys::mountinfo::mount_points_from(&source)
            .map_err(|e| Error::internal("reading the mount table", e))?;
        let shown = mounts
            .iter()
            .find_map(|m| std::fs::symlink_metadata(m).ok().map(|md| md.dev()));
        Ok(Mark::FilesystemOn {
            dev: shown.unwrap_or(dev.dev),
        })
    }

    /// Decides, before the first stage, the filesystem and the loop block size the volume
    /// keeps (so the caller can record them before the device is formatted).
    fn prepare_stage(&self, vol: &VolumeRecord, access: &Access) -> Result<Option<VolumeLayout>> {
        let image = self.open_image(vol)?;
        let block_size = match vol.block_size {
            Some(b) => b,
            None => loopdev::suggested_block_size(image.as_fd()),
        };
        let fs_type = match access {
            Access::Block => None,
            Access::Mount(m) => {
                let kind = self.fs_kind(vol, &m.fs_type)?;
                let size = img::image_size(image.as_fd()).map_err(sys("statx of an image"))?;
                if size < kind.min_size() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {} has {size} bytes; {kind} needs at least {} (create it with fsType {kind} so its size is rounded up)",
                        vol.id,
                        kind.min_size()
                    )));
                }
                Some(kind.name().to_owned())
            }
        };
        let layout = VolumeLayout {
            fs_type,
            block_size: Some(block_size),
        };
        if layout.fs_type == vol.fs_type && layout.block_size == vol.block_size {
            Ok(None)
        } else {
            Ok(Some(layout))
        }
    }

    /// Attaches the image (or finds it attached), makes the filesystem when the device is
    /// blank, and mounts it onto `target`. A block volume is only attached.
    fn stage(
        &self,
        vol: &VolumeRecord,
        target: BorrowedFd<'_>,
        how: &StageRequest<'_>,
    ) -> Result<()> {
        let image = self.open_image(vol)?;
        // An expansion whose controller step did not reach this node's file.
        img::grow_image(image.as_fd(), vol.capacity, allocation(vol))
            .map_err(sys(format!("growing the image of volume {}", vol.id)))?;
        let requested = match how.access {
            Access::Block => {
                let dev = self.attach(vol, image.as_fd())?;
                tracing::debug!(volume = %vol.id, device = %dev.path.display(), "block volume attached");
                return Ok(());
            }
            Access::Mount(m) => m.fs_type.as_str(),
        };
        let kind = self.fs_kind(vol, requested)?;
        let dev = self.attach(vol, image.as_fd())?;
        crate::crash::point("image-stage-after-attach");
        match blockfs::probe(dev.fd.as_fd())
            .map_err(|e| Error::internal(format!("probing {}", dev.path.display()), e))?
        {
            DeviceContent::Empty => {
                self.kernel.make_fs(&dev, kind).map_err(Self::tool_error(format!(
                    "making {kind} on {} for volume {}",
                    dev.path.display(),
                    vol.id
                )))?;
                crate::crash::point("stage-after-mkfs");
            }
            DeviceContent::Filesystem(found) if found == kind => {}
            DeviceContent::Filesystem(found) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} carries a {found} filesystem; the capability asks for {kind}; it is never reformatted",
                    vol.id
                )))
            }
            DeviceContent::Unrecognized => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} holds data that is not a filesystem stowage knows; it is never formatted",
                    vol.id
                )))
            }
        }
        self.kernel
            .mount_device(&dev, kind, &mount_options(kind), target, how.attrs)
            .map_err(|e| {
                Error::internal(
                    format!(
                        "mounting {kind} from {} for volume {}",
                        dev.path.display(),
                        vol.id
                    ),
                    e,
                )
            })?;
        crate::crash::point("image-stage-after-mount");
        // A volume filled from a smaller source carries the source's filesystem: it grows
        // to the device here, so the consumer sees the size it asked for (a no-op once done).
        let resizable = kind != FsKind::Btrfs
            || self
                .kernel
                .device_size(&dev)
                .is_ok_and(|size| size >= BTRFS_MIN_RESIZE);
        if vol.source.is_some() && resizable {
            if let Err(e) = self.kernel.grow_fs(&dev, kind, how.mount_point) {
                // A stage that fails leaves nothing mounted, as a failed attach or mount does:
                // the staging path must not look staged to NodeGetVolumeStats or a publish,
                // and the retried call starts again from the attach.
                if let Err(u) = self.kernel.unmount(how.mount_point) {
                    tracing::warn!(volume = %vol.id, error = %u, "could not undo the staging mount after a failed grow; the retried stage finds it");
                }
                return Err(Self::tool_error(format!(
                    "growing the restored {kind} of volume {} to its device {}",
                    vol.id,
                    dev.path.display()
                ))(e));
            }
        }
        // The mount holds the device from here on; closing our handle lets autoclear free it
        // at the last unmount.
        drop(dev);
        Ok(())
    }

    /// Detaches the loop device. A block volume's device still open elsewhere is reported;
    /// a filesystem volume's is left to autoclear.
    fn unstage(&self, vol: &VolumeRecord) -> Result<()> {
        let image = match self.open_image(vol) {
            Ok(fd) => fd,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        match self.kernel.detach_loop(image.as_fd()) {
            Ok(()) => {
                crate::crash::point("image-unstage-after-detach");
                Ok(())
            }
            Err(SysError {
                errno: Errno::BUSY, ..
            }) if !vol.block => {
                tracing::info!(volume = %vol.id, "loop device still in use; autoclear frees it at its last close");
                Ok(())
            }
            Err(e) if e.errno == Errno::BUSY => Err(Error::FailedPrecondition(format!(
                "the loop device of volume {} is still open elsewhere ({e}); it was not forced",
                vol.id
            ))),
            Err(e) => Err(Error::internal(format!("detaching volume {}", vol.id), e)),
        }
    }

    /// The staging mount for a filesystem; the device node for a block volume.
    fn publish_source(&self, vol: &VolumeRecord, staged: OwnedFd) -> Result<OwnedFd> {
        if !vol.block {
            return Ok(staged);
        }
        let image = self.open_image(vol)?;
        let dev = self.attached(vol, image.as_fd())?.ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {} is not attached; stage it again", vol.id))
        })?;
        self.device_node(&dev)
    }

    /// statvfs of the volume's own filesystem; the device size of a block volume.
    fn usage(&self, vol: &VolumeRecord, mounted: BorrowedFd<'_>) -> Result<VolumeUsage> {
        if vol.block {
            let image = self.open_image(vol)?;
            let dev = self
                .attached(vol, image.as_fd())?
                .ok_or_else(|| Error::NotFound(format!("volume {} is not attached", vol.id)))?;
            let size = self
                .kernel
                .device_size(&dev)
                .map_err(|e| Error::internal(format!("size of {}", dev.path.display()), e))?;
            return Ok(VolumeUsage {
                bytes_total: size,
                ..Default::default()
            });
        }
        let space = sysfs::fs_space(mounted).map_err(sys("statvfs of the volume"))?;
        Ok(VolumeUsage {
            bytes_total: space.bytes_total,
            bytes_used: space.bytes_total.saturating_sub(space.bytes_available),
            bytes_available: space.bytes_available,
            inodes_total: space.inodes_total,
            inodes_used: space.inodes_total.saturating_sub(space.inodes_free),
            inodes_available: space.inodes_free,
        })
    }

    /// Grows the image to the recorded capacity (when the controller step could not), makes
    /// the device follow, and grows the mounted filesystem (at `mount_point`).
    fn node_expand(&self, vol: &VolumeRecord, mount_point: &Path) -> Result<u64> {
        let image = self.open_image(vol)?;
        let size = img::grow_image(image.as_fd(), vol.capacity, allocation(vol))
            .map_err(sys(format!("growing the image of volume {}", vol.id)))?;
        let Some(dev) = self.attached(vol, image.as_fd())? else {
            return Err(Error::NotFound(format!(
                "volume {} is not attached on this node (not staged)",
                vol.id
            )));
        };
        let device_size = self.kernel.refresh_loop_capacity(&dev).map_err(|e| {
            Error::internal(format!("refreshing the size of {}", dev.path.display()), e)
        })?;
        crate::crash::point("node-expand-after-device");
        if !vol.block {
            let kind = match vol.fs_type.as_deref().and_then(FsKind::from_name) {
                Some(kind) => kind,
                None => match blockfs::probe(dev.fd.as_fd()) {
                    Ok(DeviceContent::Filesystem(kind)) => kind,
                    _ => {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {} has no filesystem stowage knows to grow",
                            vol.id
                        )))
                    }
                },
            };
            if kind == FsKind::Btrfs && device_size < BTRFS_MIN_RESIZE {
                return Err(Error::OutOfRange(format!(
                    "volume {}: the kernel resizes btrfs only to {BTRFS_MIN_RESIZE} bytes or more, not {device_size}",
                    vol.id
                )));
            }
            self.kernel
                .grow_fs(&dev, kind, mount_point)
                .map_err(Self::tool_error(format!(
                    "growing {kind} of volume {} on {}",
                    vol.id,
                    dev.path.display()
                )))?;
            crate::crash::point("image-node-expand-after-grow");
        }
        let _ = size;
        Ok(device_size)
    }
}

impl ImageBackend {
    /// Where the images live, for messages and tests.
    pub fn images_path(&self) -> &Path {
        &self.images_path
    }
}

/// The decisions of stage and expand that real devices make hard to reach, on a
/// [`stowage_sys::FakeKernel`]: the images are real sparse files in a temporary directory,
/// the devices and mounts a table (a fake device reads and writes its image).
#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;
    use crate::store::VolumeState;
    use stowage_core::config::PoolKind;
    use stowage_core::request::{ContentSource, MountOptions};
    use stowage_core::VolumeId;
    use stowage_sys::{FakeKernel, KernelCall, MountAttrs};

    const MIB: u64 = 1 << 20;

    fn backend(kernel: &Arc<FakeKernel>, dir: &Path) -> ImageBackend {
        let cfg = PoolConfig {
            name: "img".into(),
            kind: PoolKind::Image,
            path: dir.join("pool"),
            default_size: None,
            overcommit_ratio: None,
            quotas: None,
            overcommit: None,
            stats: None,
        };
        ImageBackend::open(&cfg, Arc::clone(kernel) as Arc<dyn Kernel>).unwrap()
    }

    fn record(capacity: u64) -> VolumeRecord {
        VolumeRecord {
            seq: 1,
            id: VolumeId::generate(),
            name: "v1".into(),
            pool: "img".into(),
            capacity,
            state: VolumeState::Ready,
            block: false,
            pvc_name: None,
            pvc_namespace: None,
            pv_name: None,
            created_at: 0,
            fs_type: None,
            block_size: None,
            full_allocation: false,
            source: None,
        }
    }

    fn mount(fs_type: &str) -> Access {
        Access::Mount(MountOptions {
            fs_type: fs_type.into(),
            flags: Vec::new(),
            group: None,
        })
    }

    /// Stages `vol` with `access` onto a fresh directory under `dir`.
    fn stage(pool: &ImageBackend, vol: &VolumeRecord, access: &Access, dir: &Path) -> Result<()> {
        let target = dir.join(format!("staging-{}", uuid_like()));
        std::fs::create_dir(&target).unwrap();
        let fd = sysfs::open_trusted_dir(&target).unwrap();
        let how = StageRequest {
            access,
            attrs: MountAttrs::default(),
            mount_point: &target,
        };
        pool.stage(vol, fd.as_fd(), &how)
    }

    /// A name no other staging directory of the test has.
    fn uuid_like() -> String {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        N.fetch_add(1, Ordering::Relaxed).to_string()
    }

    /// Writes `bytes` at `offset` of the volume's image, as a previous user of the device
    /// would have.
    fn scribble(pool: &ImageBackend, vol: &VolumeRecord, offset: u64, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(pool.images_path().join(image_name(vol)))
            .unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
    }

    fn image_len(pool: &ImageBackend, vol: &VolumeRecord) -> u64 {
        std::fs::metadata(pool.images_path().join(image_name(vol)))
            .unwrap()
            .len()
    }

    fn made_fs(kernel: &FakeKernel) -> usize {
        kernel
            .calls()
            .iter()
            .filter(|c| matches!(c, KernelCall::MakeFs { .. }))
            .count()
    }

    fn failed_precondition(r: Result<()>) -> String {
        match r {
            Err(Error::FailedPrecondition(m)) => m,
            other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
        }
    }

    #[test]
    fn a_device_holding_unknown_data_is_never_formatted() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = backend(&kernel, dir.path());
        // Not a superblock stowage knows: near the start, and (separately) only at the end.
        for offset in [4096, 16 * MIB - 512] {
            let vol = record(16 * MIB);
            pool.create(&vol).unwrap();
            scribble(&pool, &vol, offset, b"someone's data");
            kernel.clear();
            let m = failed_precondition(stage(&pool, &vol, &mount("ext4"), dir.path()));
            assert!(m.contains("never formatted"), "{m}");
            assert_eq!(made_fs(&kernel), 0, "formatted at offset {offset}");
            assert!(kernel.mounted().is_empty());
        }
    }

    #[test]
    fn a_filesystem_other_than_the_requested_one_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = backend(&kernel, dir.path());

        // Found on the device (nothing recorded: a volume staged by an older driver).
        let vol = record(16 * MIB);
        pool.create(&vol).unwrap();
        scribble(&pool, &vol, 0, b"XFSB");
        kernel.clear();
        let m = failed_precondition(stage(&pool, &vol, &mount("ext4"), dir.path()));
        assert!(m.contains("xfs") && m.contains("ext4"), "{m}");
        assert_eq!(made_fs(&kernel), 0);
        assert!(kernel.mounted().is_empty());

        // Recorded at the first stage: refused before any device is touched.
        let staged = VolumeRecord {
            id: VolumeId::generate(),
            fs_type: Some("xfs".into()),
            ..record(16 * MIB)
        };
        pool.create(&staged).unwrap();
        kernel.clear();
        let m = failed_precondition(stage(&pool, &staged, &mount("ext4"), dir.path()));
        assert!(m.contains("xfs") && m.contains("ext4"), "{m}");
        assert!(kernel
            .calls()
            .iter()
            .all(|c| !matches!(c, KernelCall::AttachLoop { .. } | KernelCall::MakeFs { .. })));
        // Any other filesystem is named as well.
        let m = failed_precondition(stage(&pool, &staged, &mount("btrfs"), dir.path()));
        assert!(m.contains("xfs") && m.contains("btrfs"), "{m}");
    }

    #[test]
    fn restage_after_a_reboot_reattaches_and_keeps_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = backend(&kernel, dir.path());
        let mut vol = record(16 * MIB);
        pool.create(&vol).unwrap();
        if let Some(layout) = pool.prepare_stage(&vol, &mount("")).unwrap() {
            vol.fs_type = layout.fs_type;
            vol.block_size = layout.block_size;
        }
        assert_eq!(vol.fs_type.as_deref(), Some("ext4"));
        stage(&pool, &vol, &mount(""), dir.path()).unwrap();
        assert_eq!(made_fs(&kernel), 1);
        let first = kernel.loops();
        assert_eq!(first.len(), 1);
        assert!(first[0].options.autoclear && first[0].options.direct_io);

        // The reboot: the same images, no loop device, no mount.
        let rebooted = Arc::new(FakeKernel::new());
        let pool = backend(&rebooted, dir.path());
        assert!(matches!(pool.mark(&vol), Err(Error::NotFound(_))));
        stage(&pool, &vol, &mount("ext4"), dir.path()).unwrap();
        let calls = rebooted.calls();
        assert!(calls
            .iter()
            .any(|c| matches!(c, KernelCall::AttachLoop { options, .. } if options.block_size == vol.block_size.unwrap())));
        assert_eq!(made_fs(&rebooted), 0, "formatted again after the reboot");
        assert!(calls.iter().any(|c| matches!(
            c,
            KernelCall::MountDevice {
                kind: FsKind::Ext4,
                ..
            }
        )));
        assert_eq!(rebooted.loops().len(), 1);
        assert_eq!(rebooted.mounted().len(), 1);
        assert!(matches!(pool.mark(&vol), Ok(Mark::FilesystemOn { .. })));
    }

    #[test]
    fn xfs_is_mounted_without_its_uuid_check() {
        // A restore or clone carries its source's UUID: xfs would refuse to mount it next to
        // the source.
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = backend(&kernel, dir.path());
        let vol = record(512 * MIB);
        pool.create(&vol).unwrap();
        stage(&pool, &vol, &mount("xfs"), dir.path()).unwrap();
        assert!(kernel.calls().iter().any(|c| matches!(
            c,
            KernelCall::MountDevice { kind: FsKind::Xfs, options, .. } if options == &["nouuid".to_owned()]
        )));
    }

    #[test]
    fn an_attach_or_mount_failure_leaves_nothing_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = backend(&kernel, dir.path());
        let vol = record(16 * MIB);
        pool.create(&vol).unwrap();

        kernel.fail_next("attach_loop", Errno::NOSPC, 1);
        match stage(&pool, &vol, &mount("ext4"), dir.path()) {
            Err(Error::Internal(m)) => assert!(m.contains("attaching"), "{m}"),
            other => panic!("expected INTERNAL, got {other:?}"),
        }
        assert!(kernel.loops().is_empty());
        assert!(kernel.mounted().is_empty());
        assert_eq!(made_fs(&kernel), 0);

        kernel.fail_next("mount_device", Errno::IO, 1);
        assert!(matches!(
            stage(&pool, &vol, &mount("ext4"), dir.path()),
            Err(Error::Internal(_))
        ));
        assert!(kernel.mounted().is_empty());
        // The retry finds the filesystem the failed call made and only mounts it.
        stage(&pool, &vol, &mount("ext4"), dir.path()).unwrap();
        assert_eq!(made_fs(&kernel), 1);
        assert_eq!(kernel.loops().len(), 1, "attached twice");
        assert_eq!(kernel.mounted().len(), 1);
    }

    #[test]
    fn a_failed_grow_of_a_restored_filesystem_leaves_nothing_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = backend(&kernel, dir.path());
        let mut vol = record(16 * MIB);
        vol.source = Some(ContentSource::Volume(
            stowage_core::ids::VolumeRef::from_request("stw-source").unwrap(),
        ));
        pool.create(&vol).unwrap();

        kernel.fail_next("grow_fs", Errno::IO, 1);
        match stage(&pool, &vol, &mount("ext4"), dir.path()) {
            Err(Error::Internal(m)) => assert!(m.contains("growing the restored"), "{m}"),
            other => panic!("expected INTERNAL, got {other:?}"),
        }
        assert!(kernel.mounted().is_empty(), "the failed stage left a mount");
        stage(&pool, &vol, &mount("ext4"), dir.path()).unwrap();
        assert_eq!(kernel.mounted().len(), 1);
        assert_eq!(made_fs(&kernel), 1, "the retry formatted again");
    }

    #[test]
    fn expand_never_shrinks_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = backend(&kernel, dir.path());
        let mut vol = record(32 * MIB);
        vol.fs_type = Some("ext4".into());
        pool.create(&vol).unwrap();
        stage(&pool, &vol, &mount("ext4"), dir.path()).unwrap();
        let number = kernel.loops()[0].number;

        for (asked, size) in [(48, 48), (48, 48), (40, 48), (16, 48), (64, 64)] {
            pool.expand(&vol, asked * MIB).unwrap();
            assert_eq!(
                image_len(&pool, &vol),
                size * MIB,
                "after asking {asked} MiB"
            );
        }
        // The node step follows the image, whatever the record says, and repeats cleanly.
        for recorded in [64, 64, 32] {
            vol.capacity = recorded * MIB;
            kernel.clear();
            let got = pool.node_expand(&vol, dir.path()).unwrap();
            assert_eq!(got, 64 * MIB, "record {recorded} MiB");
            assert_eq!(image_len(&pool, &vol), 64 * MIB);
            assert_eq!(kernel.loops()[0].size, 64 * MIB);
            assert!(kernel.calls().contains(&KernelCall::GrowFs {
                number,
                kind: FsKind::Ext4,
                mount_point: dir.path().to_path_buf(),
            }));
        }
        // A record above the image (controller step lost) grows it in the node step.
        vol.capacity = 80 * MIB;
        assert_eq!(pool.node_expand(&vol, dir.path()).unwrap(), 80 * MIB);
        assert_eq!(image_len(&pool, &vol), 80 * MIB);
    }

    #[test]
    fn a_block_volume_is_attached_without_autoclear_and_detached_at_unstage() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = Arc::new(FakeKernel::new());
        let pool = backend(&kernel, dir.path());
        let vol = VolumeRecord {
            block: true,
            ..record(8 * MIB)
        };
        pool.create(&vol).unwrap();
        stage(&pool, &vol, &Access::Block, dir.path()).unwrap();
        stage(&pool, &vol, &Access::Block, dir.path()).unwrap();
        let loops = kernel.loops();
        assert_eq!(loops.len(), 1, "attached twice");
        assert!(!loops[0].options.autoclear);
        assert!(kernel.mounted().is_empty());
        assert_eq!(made_fs(&kernel), 0);
        pool.unstage(&vol).unwrap();
        assert!(kernel.loops().is_empty());
        pool.unstage(&vol).unwrap();
    }
}
