//! `stowage bench floor`: the cost of the syscalls underneath a driver's stage/publish path,
//! measured in-process, so a driver's latency can be read against what the kernel alone
//! needs: a `mkdir`+`rmdir` loop, the same made durable the way a driver that records its
//! intents must (four flushes per pair), and (as root) a bind `mount`+`umount` loop.
//!
//! Everything happens in a fresh `stowage-floor-<random>` directory. A guard unmounts
//! (`MNT_DETACH`, which cannot fail on a busy mount) and removes it on every exit path,
//! including errors and panics.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::fs::Mode;
use rustix::mount::{mount_bind, unmount, UnmountFlags};
use serde::Serialize;

use super::stats::{rate, write_table, CallSummary, Recorder};
use super::FloorArgs;
use crate::args::OutputFormat;
use crate::exit;
use crate::output::{write_json, Fields};

/// Owns the working directory; `Drop` undoes whatever is still in place.
struct Workdir {
    root: PathBuf,
    /// A bind mount currently in place.
    mounted: Option<PathBuf>,
    /// Directories created inside `root`, removed in reverse order on drop.
    dirs: Vec<PathBuf>,
}

impl Workdir {
    fn create(parent: &Path) -> Result<Self, String> {
        let root = parent.join(format!("stowage-floor-{}", super::random_tag()));
        std::fs::create_dir(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        Ok(Self {
            root,
            mounted: None,
            dirs: Vec::new(),
        })
    }

    fn subdir(&mut self, name: &str) -> Result<PathBuf, String> {
        let dir = self.root.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        self.dirs.push(dir.clone());
        Ok(dir)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if let Some(target) = self.mounted.take() {
            // Detach: the mount disappears from the namespace even if something holds it.
            let _ = unmount(&target, UnmountFlags::DETACH);
        }
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        // remove_dir, never remove_dir_all: if a mount were somehow still there, a
        // recursive delete would reach into the mounted tree.
        let _ = std::fs::remove_dir(&self.root);
    }
}

#[derive(Debug, Serialize)]
struct LoopReport {
    #[serde(rename = "loop")]
    name: &'static str,
    operations: usize,
    elapsed_seconds: f64,
    ops_per_second: f64,
}

#[derive(Debug, Serialize)]
struct FloorReport {
    count: usize,
    dir: String,
    loops: Vec<LoopReport>,
    calls: Vec<CallSummary>,
    skipped: Vec<String>,
}

struct Measured {
    loops: Vec<LoopReport>,
    calls: Vec<CallSummary>,
    skipped: Vec<String>,
    dir: PathBuf,
}

fn timed<T>(
    rec: &mut Recorder,
    call: &'static str,
    f: impl FnOnce() -> rustix::io::Result<T>,
    what: &dyn Fn() -> String,
) -> Result<T, String> {
    let start = Instant::now();
    let result = f();
    let elapsed = start.elapsed();
    match result {
        Ok(v) => {
            rec.ok(call, elapsed);
            Ok(v)
        }
        Err(e) => Err(format!("{}: {e}", what())),
    }
}

/// The durable floor of a create+delete pair: four flushes, as the driver makes them.
fn durable_loop(work: &mut Workdir, count: usize) -> Result<LoopReport, String> {
    use std::os::unix::fs::FileExt;
    let journal_path = work.root.join("journal");
    let journal = std::fs::File::create(&journal_path)
        .map_err(|e| format!("cannot create {}: {e}", journal_path.display()))?;
    // Removed with the work directory's other files by the guard below.
    let _journal = RemoveOnDrop(journal_path.clone());
    let dir = std::fs::File::open(&work.root)
        .map_err(|e| format!("cannot open {}: {e}", work.root.display()))?;
    let record = [0x5au8; 4096];
    let io = |what: &str, r: std::io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    let started = Instant::now();
    for i in 0..count {
        let entry = work.root.join(format!("v-{i}"));
        io("intent write", journal.write_all_at(&record, 0))?;
        io("fdatasync", journal.sync_data())?;
        io("mkdir", std::fs::create_dir(&entry))?;
        work.dirs.push(entry.clone());
        io("fsync of the directory", dir.sync_all())?;
        io("intent write", journal.write_all_at(&record, 4096))?;
        io("fdatasync", journal.sync_data())?;
        io("rmdir", std::fs::remove_dir(&entry))?;
        work.dirs.pop();
        io("fsync of the directory", dir.sync_all())?;
    }
    let elapsed = started.elapsed();
    Ok(LoopReport {
        name: "durable mkdir+rmdir (4 fsyncs)",
        operations: count,
        elapsed_seconds: elapsed.as_secs_f64(),
        ops_per_second: rate(count, elapsed),
    })
}

/// Removes a file when dropped (the floor's scratch journal).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn measure(parent: &Path, count: usize, root: bool) -> Result<Measured, String> {
    let mut work = Workdir::create(parent)?;
    let mut loops = Vec::new();
    let mut skipped = Vec::new();
    let mut rec = Recorder::default();

    // Unique names per iteration, like the unique target paths of publish calls.
    let started = Instant::now();
    for i in 0..count {
        let dir = work.root.join(format!("d-{i}"));
        timed(
            &mut rec,
            "mkdir",
            || rustix::fs::mkdir(&dir, Mode::from(0o750)),
            &|| format!("mkdir {}", dir.display()),
        )?;
        work.dirs.push(dir.clone());
        timed(&mut rec, "rmdir", || rustix::fs::rmdir(&dir), &|| {
            format!("rmdir {}", dir.display())
        })?;
        work.dirs.pop();
    }
    let elapsed = started.elapsed();
    loops.push(LoopReport {
        name: "mkdir+rmdir",
        operations: count,
        elapsed_seconds: elapsed.as_secs_f64(),
        ops_per_second: rate(count, elapsed),
    });

    // What a durable create+delete needs at the least in stowage's design, with no driver
    // around it: the create intent (a 4 KiB write + fdatasync, as a WAL commit), mkdir and an
    // fsync of the directory, the delete intent, rmdir and another directory fsync.
    loops.push(durable_loop(&mut work, count)?);

    if root {
        let source = work.subdir("source")?;
        let target = work.subdir("target")?;
        let started = Instant::now();
        for _ in 0..count {
            timed(
                &mut rec,
                "mount --bind",
                || mount_bind(&source, &target),
                &|| format!("bind mount {} on {}", source.display(), target.display()),
            )?;
            work.mounted = Some(target.clone());
            timed(
                &mut rec,
                "umount",
                || unmount(&target, UnmountFlags::empty()),
                &|| format!("umount {}", target.display()),
            )?;
            work.mounted = None;
        }
        let elapsed = started.elapsed();
        loops.push(LoopReport {
            name: "mount --bind+umount",
            operations: count,
            elapsed_seconds: elapsed.as_secs_f64(),
            ops_per_second: rate(count, elapsed),
        });
    } else {
        skipped.push("mount --bind+umount: needs root".to_owned());
    }

    // Calls per second are relative to the loop each call belongs to, which ran for
    // that loop's elapsed time; summarize each loop's calls against its own duration.
    let mut calls = Vec::new();
    for summary in rec.summarize(Duration::from_secs(1)) {
        let loop_secs = loops
            .iter()
            .find(|l| match summary.call.as_str() {
                "mkdir" | "rmdir" => l.name == "mkdir+rmdir",
                _ => l.name == "mount --bind+umount",
            })
            .map(|l| l.elapsed_seconds)
            .unwrap_or(0.0);
        let mut s = summary;
        s.per_second = if loop_secs > 0.0 {
            (s.ok as f64 / loop_secs * 10.0).round() / 10.0
        } else {
            0.0
        };
        calls.push(s);
    }
    let dir = work.root.clone();
    drop(work);
    Ok(Measured {
        loops,
        calls,
        skipped,
        dir,
    })
}

pub(super) async fn run(
    args: &FloorArgs,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> u8 {
    let count = usize::try_from(args.count).unwrap_or(usize::MAX);
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let root = rustix::process::geteuid().is_root();
    // Blocking syscalls in a loop: keep them off the async worker threads.
    let measured = tokio::task::spawn_blocking(move || measure(&parent, count, root)).await;
    let m = match measured {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            let _ = writeln!(err, "error: {e}");
            return exit::LOCAL_ERROR;
        }
        Err(e) => {
            let _ = writeln!(err, "error: floor measurement failed: {e}");
            return exit::LOCAL_ERROR;
        }
    };
    for s in &m.skipped {
        let _ = writeln!(err, "warning: skipped {s}");
    }
    let report = FloorReport {
        count,
        dir: m.dir.display().to_string(),
        loops: m.loops,
        calls: m.calls,
        skipped: m.skipped,
    };
    let written = match args.output {
        OutputFormat::Json => serde_json::to_value(&report)
            .map_err(std::io::Error::other)
            .and_then(|v| write_json(out, &v)),
        OutputFormat::Table => write_floor_table(out, &report),
    };
    match written {
        Ok(()) => exit::SUCCESS,
        Err(e) => {
            let _ = writeln!(err, "error: cannot write report: {e}");
            exit::LOCAL_ERROR
        }
    }
}

fn write_floor_table(out: &mut dyn Write, r: &FloorReport) -> std::io::Result<()> {
    let mut f = Fields::new();
    for l in &r.loops {
        f.add(
            &l.name.to_uppercase(),
            format!(
                "{} ops in {:.3}s: {:.1} ops/s",
                l.operations, l.elapsed_seconds, l.ops_per_second
            ),
        );
    }
    for s in &r.skipped {
        f.add("SKIPPED", s.clone());
    }
    f.write(out)?;
    writeln!(out)?;
    write_table(out, &r.calls)
}
