//! Crash points for the fault tests: `STOWAGE_TEST_CRASH_AT=<point>` makes the process abort
//! (no unwinding, no cleanup, as a SIGKILL or a power cut would) when it reaches that point.
//! Unset — always, outside those tests — a point costs one comparison.

use std::sync::OnceLock;

static CRASH_AT: OnceLock<Option<String>> = OnceLock::new();

/// Aborts here if the environment names this point.
pub fn point(name: &'static str) {
    let armed = CRASH_AT.get_or_init(|| std::env::var("STOWAGE_TEST_CRASH_AT").ok());
    if armed.as_deref() == Some(name) {
        tracing::error!(point = name, "STOWAGE_TEST_CRASH_AT: aborting");
        std::process::abort();
    }
}
