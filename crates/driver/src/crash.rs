//! Crash points for the fault tests: `STOWAGE_TEST_CRASH_AT=<point>` makes the process abort
//! (no unwinding, no cleanup, as a SIGKILL or a power cut would) when it reaches that point.
//! `STOWAGE_TEST_STALL_AT=<point>` instead holds the call there for
//! `STOWAGE_TEST_STALL_MS` (default 2000) milliseconds, so a test can act while a call is in
//! flight (a SIGTERM during it). Unset — always, outside those tests — a point costs one
//! comparison.

use std::sync::OnceLock;
use std::time::Duration;

/// Every crash point of the driver, in the order a volume meets them. The crash suite checks
/// that this list is exactly the `crash::point("…")` calls in the sources and that each one
/// is exercised by a test.
pub const POINTS: &[&str] = &[
    // CreateVolume, DeleteVolume, ControllerExpandVolume (engine.rs), any kind.
    "create-after-intent",
    "create-after-backend",
    "delete-after-intent",
    "delete-after-backend",
    "expand-after-intent",
    "expand-after-backend",
    // Stage and publish, unpublish and unstage (node.rs), any kind.
    "mount-after-intent",
    "mount-after-mount",
    "unmount-after-intent",
    "unmount-after-unmount",
    "node-expand-after-intent",
    "ephemeral-after-create",
    // The image kind: attach, format, mount, expand, detach (pool/image.rs).
    "image-stage-after-attach",
    "stage-after-mkfs",
    "image-stage-after-mount",
    "node-expand-after-device",
    "image-node-expand-after-grow",
    "image-unstage-after-detach",
    // The btrfs kind: subvolume and qgroup steps (pool/btrfs.rs).
    "btrfs-create-after-subvolume",
    "btrfs-create-after-group",
    "btrfs-create-after-limit",
    "btrfs-migrate-after-group",
    "btrfs-expand-after-limit",
    "btrfs-delete-after-unlimit",
    "btrfs-delete-after-destroy",
    "btrfs-delete-after-qgroups",
    // Snapshots and restores (snapshots.rs and each kind's snapshots.rs).
    "snapshot-after-intent",
    "dir-snapshot-after-copy",
    "image-snapshot-frozen",
    "btrfs-snapshot-after-create",
    "snapshot-after-backend",
    "delete-snapshot-after-intent",
    "restore-after-clear",
    "btrfs-fill-after-snapshot",
];

/// What the environment arms: (crash at, stall at, stall for).
struct Armed {
    crash: Option<String>,
    stall: Option<String>,
    stall_for: Duration,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Aborts (or stalls) here if the environment names this point.
pub fn point(name: &'static str) {
    let armed = ARMED.get_or_init(|| Armed {
        crash: std::env::var("STOWAGE_TEST_CRASH_AT").ok(),
        stall: std::env::var("STOWAGE_TEST_STALL_AT").ok(),
        stall_for: Duration::from_millis(
            std::env::var("STOWAGE_TEST_STALL_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2000),
        ),
    });
    if armed.crash.as_deref() == Some(name) {
        tracing::error!(point = name, "STOWAGE_TEST_CRASH_AT: aborting");
        // Straight to stderr (unbuffered), whatever the log format: the tests read this line
        // to know the process died here and not somewhere else.
        eprintln!("STOWAGE_TEST_CRASH_AT: aborting at {name}");
        std::process::abort();
    }
    if armed.stall.as_deref() == Some(name) {
        eprintln!("STOWAGE_TEST_STALL_AT: stalling at {name}");
        std::thread::sleep(armed.stall_for);
        eprintln!("STOWAGE_TEST_STALL_AT: going on from {name}");
    }
}
