//! `stowage bench floor`: runs the syscall loops and leaves no mount and no directory.

/// Prints to the process's real stderr: libtest captures `eprintln!` of passing tests, and a
/// skip must be seen.
macro_rules! loud {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
use stowage_client::bench::{execute, Options};

use crate::{bounded, parse_bench, LIMIT};

#[tokio::test]
async fn floor_runs_and_leaves_no_mounts() {
    if !rustix::process::geteuid().is_root() {
        loud!("SKIPPED (needs root): floor_runs_and_leaves_no_mounts (bind mount loop)");
        return;
    }
    bounded(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let parent = dir.path().to_str().unwrap().to_owned();
        let args = parse_bench(&["floor", "--count", "20", "--dir", &parent, "-o", "json"]);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = execute(args, Options::default(), &mut out, &mut err).await;
        let out = String::from_utf8(out).unwrap();
        let err = String::from_utf8(err).unwrap();
        assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        let calls = j["calls"].as_array().unwrap();
        for name in ["mkdir", "rmdir", "mount --bind", "umount"] {
            let c = calls
                .iter()
                .find(|c| c["call"] == name)
                .unwrap_or_else(|| panic!("no {name} in {j:#}"));
            assert_eq!(c["ok"], 20, "{name}");
        }
        // mkdir+rmdir, the same with its four flushes, bind mount+umount.
        let loops = j["loops"].as_array().unwrap();
        assert_eq!(loops.len(), 3, "{j:#}");
        let durable = loops
            .iter()
            .find(|l| l["loop"] == "durable mkdir+rmdir (4 fsyncs)")
            .unwrap_or_else(|| panic!("no durable loop in {j:#}"));
        assert_eq!(durable["operations"], 20);
        assert!(j["skipped"].as_array().unwrap().is_empty());

        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mountinfo.contains(&parent),
            "mount left under {parent}:\n{mountinfo}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    })
    .await;
}

#[tokio::test]
async fn floor_table_output() {
    bounded(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let args = parse_bench(&[
            "floor",
            "--count",
            "5",
            "--dir",
            dir.path().to_str().unwrap(),
        ]);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let code = execute(args, Options::default(), &mut out, &mut err).await;
        let out = String::from_utf8(out).unwrap();
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&err));
        assert!(out.contains("MKDIR+RMDIR"), "{out}");
        assert!(out.contains("CALL"), "{out}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    })
    .await;
}

#[tokio::test]
async fn floor_in_missing_dir_fails_cleanly() {
    bounded(LIMIT, async {
        let args = parse_bench(&[
            "floor",
            "--count",
            "5",
            "--dir",
            "/nonexistent/stowage-floor",
        ]);
        let mut err = Vec::new();
        let code = execute(args, Options::default(), &mut Vec::new(), &mut err).await;
        assert_eq!(code, 1);
        assert!(String::from_utf8_lossy(&err).contains("cannot create"));
    })
    .await;
}
