//! The syscall seam of stowage: everything that touches the kernel on behalf of a volume.
//!
//! Two halves:
//! - [`fs`]: unprivileged, fd-relative path operations (openat2 with `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS`, mkdirat, tree removal that never follows a symlink nor crosses a
//!   mount, usage walks). They work on any directory a test owns, so they are not faked.
//! - [`Kernel`]: the privileged operations (bind mounts from fds, unmount, project-quota
//!   ioctls and quotactl; for the `image` pool: loop devices, mkfs and grow tools, mounting
//!   a filesystem from a device). [`LinuxKernel`] is the real one; [`FakeKernel`] records every call
//!   and can be told to fail, so the logic above it is unit-tested without root.
//!
//! Beside them, [`image`] (image files, fd-relative), [`copy`] (file clones and tree copies
//! for snapshots) and [`blockfs::probe`] (what a device holds) are unprivileged given their
//! fds, and not faked either.
//!
//! This is the only crate of the workspace allowed `unsafe`; each block says why it is sound.

pub mod blockfs;
pub mod btrfs;
pub mod copy;
mod error;
pub mod fake;
pub mod fs;
pub mod image;
mod kernel;
mod linux;
pub mod loopdev;
pub mod mountinfo;
pub mod proc;

pub use blockfs::{DeviceContent, FsKind};
pub use btrfs::{qgroup_id, qgroup_name, Qgroup, QuotaMode as BtrfsQuotaMode};
pub use copy::{CloneMethod, CopyStats};
pub use error::{SysError, SysResult, ToolError, ToolFailure};
pub use fake::{FakeKernel, FakeLoop, KernelCall};
pub use kernel::{Frozen, Kernel, MountAttrs, QuotaSupport, QuotaUsage};
pub use linux::LinuxKernel;
pub use loopdev::{LoopDevice, LoopOptions};
pub use rustix::io::Errno;
