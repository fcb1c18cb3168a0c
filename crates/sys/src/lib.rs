//! The syscall seam of stowage: everything that touches the kernel on behalf of a volume.
//!
//! Two halves:
//! - [`fs`]: unprivileged, fd-relative path operations (openat2 with `RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS`, mkdirat, tree removal that never follows a symlink nor crosses a
//!   mount, usage walks). They work on any directory a test owns, so they are not faked.
//! - [`Kernel`]: the privileged operations (bind mounts from fds, unmount, project-quota
//!   ioctls and quotactl). [`LinuxKernel`] is the real one; [`FakeKernel`] records every call
//!   and can be told to fail, so the logic above it is unit-tested without root.
//!
//! This is the only crate of the workspace allowed `unsafe`; each block says why it is sound.

mod error;
pub mod fake;
pub mod fs;
mod kernel;
mod linux;
pub mod mountinfo;

pub use error::{SysError, SysResult};
pub use fake::{FakeKernel, KernelCall};
pub use kernel::{Kernel, MountAttrs, QuotaSupport, QuotaUsage};
pub use linux::LinuxKernel;
pub use rustix::io::Errno;
