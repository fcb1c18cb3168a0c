//! The real [`Kernel`]: rustix where it has a safe wrapper, raw syscalls (each with a
//! `// SAFETY:` line) where it does not.

use crate::Kernel;

/// The real Linux implementation of [`Kernel`].
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxKernel;
