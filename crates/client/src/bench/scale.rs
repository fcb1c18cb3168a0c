//! `stowage bench scale`: how a driver behaves as its number of volumes grows.
//!
//! For each `--steps` value N, in increasing order:
//!
//! 1. *Populate*: `--concurrency` workers create volumes named `bench-scale-<run-id>-<i>`
//!    until this run holds N of them. A create that still fails after the retries cleanup
//!    also uses (ABORTED, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED) ends the run:
//!    the driver cannot reach the step's size, so no later step can be measured either.
//! 2. *Probe*: `--probe-count` sequential CreateVolume calls of fresh names
//!    (`bench-scale-<run-id>-probe-<k>`), each followed by its DeleteVolume so that the
//!    population stays at N. Creates per second count only the time spent in CreateVolume;
//!    DeleteVolume is summarized separately. Failed probes are reported, not retried.
//! 3. *List*: ListVolumes with `max_entries = --page-size`, following `next_token` until it
//!    is empty, timed as a whole, [`LIST_RUNS`] times; the median and minimum are reported.
//!    Entries may include volumes that are not ours, so a pagination must see at least N;
//!    fewer means the driver's pagination lost volumes, which counts as a failed operation.
//!    Skipped, with a warning, when the driver lacks the LIST_VOLUMES capability.
//! 4. The driver's RSS (VmRSS of `--pid`).
//!
//! As in the plain bench, every volume is registered before its CreateVolume is sent, so
//! after the last step, a failure or SIGINT/SIGTERM everything the run created is deleted,
//! by `--concurrency` workers; `--keep` skips that and leaves the volumes on the driver.
//! A step interrupted half-way is not reported: its figures would be partial.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use stowage_csi::v1 as csi;
use stowage_csi::v1::controller_client::ControllerClient;
use stowage_csi::v1::controller_service_capability::rpc::Type as ControllerCap;
use tonic::transport::Channel;

use super::cancel::CancelToken;
use super::driver::{
    cleanup_volume, mount_capability, plugin_profile, retry, rss_sample, DriverInfo, Env,
};
use super::progress::Progress;
use super::registry::{Created, Registry};
use super::rss::read_peak_rss;
use super::stats::{percentile, rate, CallSummary, Recorder};
use super::{Options, ScaleArgs};
use crate::args::{kv_map, OutputFormat};
use crate::exit;
use crate::output::{write_json, Fields, Table};
use crate::rpc::{describe_status, request, unary};
use crate::secrets::Secrets;
use crate::size::{format_duration, format_size};

/// Full paginations per step; their median and minimum are reported.
pub(super) const LIST_RUNS: usize = 5;
/// Consecutive empty pages that carry a `next_token` after which a pagination is abandoned:
/// a driver answering "nothing yet, but more" forever would otherwise never end the step.
const MAX_EMPTY_PAGES: usize = 100;
/// Cleanup failures printed one by one; the rest are only counted.
const SHOWN_FAILURES: usize = 10;
/// Leftovers listed in the table and on stderr (JSON lists all of them).
const SHOWN_LEFTOVERS: usize = 20;

/// A failure that ends the run, with its exit code.
type Failure = (String, u8);

/// What populating one step did.
struct Populated {
    created: usize,
    elapsed: Duration,
    recorder: Recorder,
    failure: Option<Failure>,
}

/// Creates `needed` more volumes with up to `workers` tasks; names take their numbers from
/// `next_index`, which runs across steps so that a name is never reused.
async fn populate(
    env: &Arc<Env>,
    needed: usize,
    workers: usize,
    next_index: &Arc<AtomicUsize>,
    cancel: &CancelToken,
    progress: Option<String>,
) -> Populated {
    let claimed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let progress = progress.map(|label| Progress::start_labeled(label, done.clone(), needed));
    let mut handles = Vec::new();
    for w in 0..workers.min(needed) {
        let env = env.clone();
        let (claimed, done, stop) = (claimed.clone(), done.clone(), stop.clone());
        let (next_index, cancel) = (next_index.clone(), cancel.clone());
        handles.push(tokio::spawn(async move {
            let mut rec = Recorder::default();
            let mut failure = None;
            // As in the plain bench, cancellation is checked between calls only.
            while !cancel.is_cancelled() && !stop.load(Ordering::SeqCst) {
                if claimed.fetch_add(1, Ordering::SeqCst) >= needed {
                    break;
                }
                let i = next_index.fetch_add(1, Ordering::SeqCst);
                let name = format!("{}{i}", env.prefix);
                let start = Instant::now();
                match retry(|| env.create_volume(w, &name)).await {
                    Ok(_) => {
                        rec.ok("CreateVolume", start.elapsed());
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(s) => {
                        let message = env.describe(&s);
                        rec.error("CreateVolume", message.clone());
                        stop.store(true, Ordering::SeqCst);
                        failure = Some((
                            format!("CreateVolume {name}: {message}"),
                            exit::from_grpc(s.code()),
                        ));
                        break;
                    }
                }
            }
            (rec, failure)
        }));
    }
    let mut recorder = Recorder::default();
    let mut failure = None;
    for h in handles {
        match h.await {
            Ok((rec, f)) => {
                recorder.merge(rec);
                failure = failure.or(f);
            }
            // What the worker created is registered and gets cleaned up.
            Err(e) => {
                let message = format!("worker task failed: {e}");
                recorder.error("worker", message.clone());
                failure = failure.or(Some((message, exit::LOCAL_ERROR)));
            }
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    Populated {
        created: done.load(Ordering::SeqCst),
        elapsed: started.elapsed(),
        recorder,
        failure,
    }
}

/// Sequential CreateVolume+DeleteVolume pairs and the time spent in each call type.
#[derive(Default)]
struct Probed {
    create: Recorder,
    delete: Recorder,
    create_time: Duration,
    delete_time: Duration,
    failed: usize,
}

/// Runs `count` probes, numbering names from `next_probe`; `None` when cancelled.
async fn probe(
    env: &Env,
    count: usize,
    next_probe: &mut usize,
    cancel: &CancelToken,
    progress: Option<String>,
) -> Option<Probed> {
    let done = Arc::new(AtomicUsize::new(0));
    let progress = progress.map(|label| Progress::start_labeled(label, done.clone(), count));
    let mut p = Probed::default();
    let mut cancelled = false;
    for _ in 0..count {
        if cancel.is_cancelled() {
            cancelled = true;
            break;
        }
        let name = format!("{}probe-{next_probe}", env.prefix);
        *next_probe += 1;
        let start = Instant::now();
        let created = env.create_volume(0, &name).await;
        let took = start.elapsed();
        // Failed creates took time too: they count against the rate.
        p.create_time += took;
        match created {
            Ok(v) => {
                p.create.ok("CreateVolume", took);
                let start = Instant::now();
                let deleted = env.delete_volume(0, &name, &v.volume_id).await;
                let took = start.elapsed();
                p.delete_time += took;
                match deleted {
                    Ok(()) => p.delete.ok("DeleteVolume", took),
                    // Still registered: cleanup deletes it.
                    Err(s) => {
                        p.delete.error("DeleteVolume", env.describe(&s));
                        p.failed += 1;
                    }
                }
            }
            Err(s) => {
                p.create.error("CreateVolume", env.describe(&s));
                p.failed += 1;
            }
        }
        done.fetch_add(1, Ordering::SeqCst);
    }
    if let Some(progress) = progress {
        progress.finish();
    }
    (!cancelled).then_some(p)
}

/// One full pagination of ListVolumes.
#[derive(Debug, Clone, Copy)]
struct ListRun {
    elapsed: Duration,
    entries: usize,
    pages: usize,
    /// Entries of the largest page, to check `max_entries` was honoured.
    largest_page: usize,
}

/// Lists all volumes, `page_size` entries per page (0: the driver decides); `Ok(None)` when
/// cancelled between pages.
async fn list_all(
    env: &Env,
    client: &mut ControllerClient<Channel>,
    page_size: i32,
    cancel: &CancelToken,
) -> Result<Option<ListRun>, String> {
    let t = env.timeout;
    let mut token = String::new();
    let (mut entries, mut pages, mut largest_page, mut empty_pages) = (0, 0, 0, 0);
    let started = Instant::now();
    loop {
        let req = csi::ListVolumesRequest {
            max_entries: page_size,
            starting_token: token.clone(),
        };
        let r = unary(t, client.list_volumes(request(req, t)))
            .await
            .map_err(|s| format!("ListVolumes (page {}): {}", pages + 1, env.describe(&s)))?;
        pages += 1;
        entries += r.entries.len();
        largest_page = largest_page.max(r.entries.len());
        if r.next_token.is_empty() {
            break;
        }
        if r.next_token == token {
            return Err(format!(
                "ListVolumes (page {pages}): the driver returned the starting_token {token:?} \
                 as next_token; pagination would never end"
            ));
        }
        if r.entries.is_empty() {
            empty_pages += 1;
            if empty_pages >= MAX_EMPTY_PAGES {
                return Err(format!(
                    "ListVolumes: {MAX_EMPTY_PAGES} empty pages in a row with a next_token; \
                     giving up after {pages} pages"
                ));
            }
        } else {
            empty_pages = 0;
        }
        if cancel.is_cancelled() {
            return Ok(None);
        }
        token = r.next_token;
    }
    Ok(Some(ListRun {
        elapsed: started.elapsed(),
        entries,
        pages,
        largest_page,
    }))
}

/// Deletes every registered volume with up to `workers` tasks; returns how many registry
/// entries it removed and what is left. Runs regardless of cancellation: that is its
/// purpose.
async fn delete_all(
    env: &Arc<Env>,
    workers: usize,
    progress: bool,
    err: &mut (dyn Write + Send),
) -> (usize, Vec<String>) {
    let volumes: Arc<Vec<(String, Created)>> =
        Arc::new(env.registry.snapshot().volumes.into_iter().collect());
    let total = volumes.len();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let progress = (progress && total > 0)
        .then(|| Progress::start_labeled("cleanup:".into(), done.clone(), total));
    let mut handles = Vec::new();
    for w in 0..workers.min(total) {
        let (env, volumes) = (env.clone(), volumes.clone());
        let (next, done) = (next.clone(), done.clone());
        handles.push(tokio::spawn(async move {
            let (mut failed, mut shown) = (0, Vec::new());
            while let Some((name, created)) = volumes.get(next.fetch_add(1, Ordering::SeqCst)) {
                if let Err(message) = cleanup_volume(&env, w, name, created).await {
                    failed += 1;
                    if shown.len() < SHOWN_FAILURES {
                        shown.push(message);
                    }
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            (failed, shown)
        }));
    }
    let (mut failed, mut shown) = (0, Vec::new());
    for h in handles {
        match h.await {
            Ok((n, messages)) => {
                failed += n;
                shown.extend(messages);
            }
            // What the worker had not deleted yet stays registered and is reported.
            Err(e) => {
                failed += 1;
                shown.push(format!("worker task failed: {e}"));
            }
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    for message in shown.iter().take(SHOWN_FAILURES) {
        let _ = writeln!(err, "cleanup: {message}");
    }
    if failed > SHOWN_FAILURES {
        let _ = writeln!(
            err,
            "cleanup: … and {} more failures",
            failed - SHOWN_FAILURES
        );
    }
    let left = env.registry.snapshot().volumes.len();
    (total.saturating_sub(left), env.registry.leftovers())
}

/// Seconds rounded to microseconds, as the other reports do.
fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e6
}

/// The summary of the only call type in `rec`, if any call was made.
fn only_summary(rec: &Recorder, elapsed: Duration) -> Option<CallSummary> {
    rec.summarize(elapsed).into_iter().next()
}

#[derive(Debug, Serialize)]
struct ListReport {
    median_seconds: f64,
    min_seconds: f64,
    /// Fewest entries any pagination saw: at least `volumes` unless entries were lost.
    entries: usize,
    /// Most pages any pagination took.
    pages: usize,
    run_seconds: Vec<f64>,
    #[serde(skip)]
    median: Duration,
    #[serde(skip)]
    min: Duration,
}

#[derive(Debug, Serialize)]
struct StepReport {
    /// Volumes of this run on the driver during the measurements.
    volumes: usize,
    /// Volumes created to reach `volumes` and how long that took with `concurrency` workers.
    populated: usize,
    populate_seconds: f64,
    /// CreateVolume calls of the population (latencies include retries of transient errors).
    populate: Option<CallSummary>,
    /// Probe CreateVolume calls per second of time spent in CreateVolume.
    creates_per_second: Option<f64>,
    /// Probe CreateVolume calls; `per_second` is over the time spent in them.
    create: Option<CallSummary>,
    /// Probe DeleteVolume calls; `per_second` is over the time spent in them.
    delete: Option<CallSummary>,
    /// `null` when the driver lacks LIST_VOLUMES or listing failed.
    list: Option<ListReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    list_error: Option<String>,
    /// VmRSS of `--pid` after the step.
    rss_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct RssReport {
    pid: u32,
    before_bytes: Option<u64>,
    after_cleanup_bytes: Option<u64>,
    /// VmHWM: the driver's peak over its whole life, not just this run.
    peak_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
struct CleanupReport {
    /// `--keep`: nothing was deleted.
    kept: bool,
    /// Everything the run created is gone (false when kept).
    complete: bool,
    /// Registered volumes deleted (or found never to have been created).
    deleted: usize,
    /// Volumes of this run still on the driver (or possibly on it).
    remaining: usize,
    /// What cleanup failed to delete (empty when kept).
    leftovers: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    workload: &'static str,
    endpoint: String,
    driver: DriverInfo,
    run_id: String,
    name_prefix: String,
    steps_requested: Vec<usize>,
    probe_count: usize,
    page_size: i32,
    concurrency: usize,
    list_runs: usize,
    list_supported: bool,
    /// Volumes of this run created by the population phases.
    volumes_created: usize,
    interrupted: bool,
    /// Probes that failed, paginations that failed or lost entries.
    failed_operations: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    steps: Vec<StepReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    driver_rss: Option<RssReport>,
    cleanup: CleanupReport,
}

pub(super) async fn run(
    args: &ScaleArgs,
    endpoint: &str,
    secrets: Secrets,
    options: &Options,
    out: &mut (dyn Write + Send),
    err: &mut (dyn Write + Send),
) -> u8 {
    let mut steps: Vec<usize> = args
        .steps
        .iter()
        .map(|&n| usize::try_from(n).unwrap_or(usize::MAX))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    let workers = usize::try_from(args.concurrency).unwrap_or(usize::MAX);
    let probe_count = usize::try_from(args.probe_count).unwrap_or(usize::MAX);
    let t = args.timeout;
    let cancel = &options.cancel;

    let channel = match crate::connect(endpoint).await {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return if e.is_invalid_endpoint() {
                exit::USAGE
            } else {
                exit::CONNECT
            };
        }
    };
    let fail = |err: &mut (dyn Write + Send), call: &str, s: &tonic::Status| {
        let _ = writeln!(err, "error: {call}: {}", describe_status(s, &secrets));
        exit::from_grpc(s.code())
    };
    let (info, caps) = match plugin_profile(&channel, t).await {
        Ok(profile) => profile,
        Err((call, s)) => return fail(err, call, &s),
    };
    if !caps.contains(&(ControllerCap::CreateDeleteVolume as i32)) {
        let _ = writeln!(
            err,
            "error: cannot run bench scale: the driver does not advertise the \
             CREATE_DELETE_VOLUME controller capability"
        );
        return exit::LOCAL_ERROR;
    }
    let list_supported = caps.contains(&(ControllerCap::ListVolumes as i32));
    if !list_supported {
        let _ = writeln!(
            err,
            "warning: the driver does not advertise LIST_VOLUMES; skipping the ListVolumes \
             measurement"
        );
    }

    let tag = super::random_tag();
    let env = Arc::new(Env {
        channels: vec![channel.clone()],
        timeout: t,
        secrets: secrets.clone(),
        params: kv_map(&args.params),
        snapshot_params: Default::default(),
        capability: mount_capability(args.access_mode.mode() as i32, args.fs_type.as_deref()),
        size: args.size,
        prefix: format!("bench-scale-{tag}-"),
        // Scale creates no directories.
        target_dir: Default::default(),
        registry: Registry::default(),
    });
    // A whole page of a large driver easily exceeds tonic's default 4 MiB message limit.
    let mut lister = ControllerClient::new(channel).max_decoding_message_size(usize::MAX);

    let rss_before = rss_sample(args.pid, err);
    let next_index = Arc::new(AtomicUsize::new(0));
    let mut next_probe = 0;
    let mut population = 0;
    let mut failed_operations = 0;
    let mut failure: Option<Failure> = None;
    let mut rows = Vec::new();
    let label = |phase: &str, n: usize| options.progress.then(|| format!("{phase} {n}:"));
    for &n in &steps {
        if cancel.is_cancelled() {
            break;
        }
        // 1. Populate.
        let p = populate(
            &env,
            n - population,
            workers,
            &next_index,
            cancel,
            label("populate", n),
        )
        .await;
        population += p.created;
        if let Some((message, code)) = p.failure {
            let _ = writeln!(err, "error: populating {n} volumes: {message}");
            failure = Some((format!("populating {n} volumes: {message}"), code));
            break;
        }
        if cancel.is_cancelled() {
            break;
        }
        // 2. Probe CreateVolume at this size.
        let Some(probed) = probe(
            &env,
            probe_count,
            &mut next_probe,
            cancel,
            label("probe", n),
        )
        .await
        else {
            break;
        };
        failed_operations += probed.failed;
        // 3. List everything, several times.
        let mut list = None;
        let mut list_error = None;
        if list_supported {
            let mut runs = Vec::new();
            while runs.len() < LIST_RUNS && !cancel.is_cancelled() {
                match list_all(&env, &mut lister, args.page_size, cancel).await {
                    Ok(Some(r)) => runs.push(r),
                    Ok(None) => break,
                    Err(message) => {
                        let _ = writeln!(err, "error: at {n} volumes: {message}");
                        list_error = Some(message);
                        failed_operations += 1;
                        break;
                    }
                }
            }
            if cancel.is_cancelled() {
                break;
            }
            if !runs.is_empty() {
                list = Some(list_report(&runs));
            }
            if let Some(l) = &list {
                if l.entries < n {
                    let _ = writeln!(
                        err,
                        "error: at {n} volumes, a full ListVolumes pagination saw only {} \
                         entries: the driver's pagination lost volumes",
                        l.entries
                    );
                    failed_operations += 1;
                }
            }
            let largest = runs.iter().map(|r| r.largest_page).max().unwrap_or(0);
            let limit = usize::try_from(args.page_size).unwrap_or(0);
            if limit > 0 && largest > limit {
                let _ = writeln!(
                    err,
                    "warning: at {n} volumes, ListVolumes returned a page of {largest} entries \
                     with max_entries {limit} (the spec forbids more)"
                );
            }
        }
        // 4. Driver memory.
        let rss = rss_sample(args.pid, err);

        let create = only_summary(&probed.create, probed.create_time);
        let row = StepReport {
            volumes: n,
            populated: p.created,
            populate_seconds: secs(p.elapsed),
            populate: only_summary(&p.recorder, p.elapsed),
            creates_per_second: create.as_ref().map(|c| rate(c.ok, probed.create_time)),
            create,
            delete: only_summary(&probed.delete, probed.delete_time),
            list,
            list_error,
            rss_bytes: rss,
        };
        if options.progress {
            let _ = writeln!(err, "{}", step_line(&row));
        }
        rows.push(row);
    }
    let interrupted = cancel.is_cancelled() && failure.is_none() && rows.len() < steps.len();

    // Clean up (unless told to keep), whatever happened before.
    let registered = env.registry.snapshot().volumes.len();
    let cleanup = if args.keep {
        CleanupReport {
            kept: true,
            complete: false,
            deleted: 0,
            remaining: registered,
            leftovers: Vec::new(),
        }
    } else {
        let (deleted, leftovers) = delete_all(&env, workers, options.progress, err).await;
        if !leftovers.is_empty() {
            let _ = writeln!(err, "error: cleanup incomplete; left behind:");
            for l in leftovers.iter().take(SHOWN_LEFTOVERS) {
                let _ = writeln!(err, "  {l}");
            }
            if leftovers.len() > SHOWN_LEFTOVERS {
                let _ = writeln!(err, "  … and {} more", leftovers.len() - SHOWN_LEFTOVERS);
            }
        }
        CleanupReport {
            kept: false,
            complete: leftovers.is_empty(),
            deleted,
            remaining: leftovers.len(),
            leftovers,
        }
    };
    let rss_after_cleanup = rss_sample(args.pid, err);

    let report = Report {
        workload: "scale",
        endpoint: endpoint.to_owned(),
        driver: DriverInfo {
            name: info.name,
            vendor_version: info.vendor_version,
        },
        run_id: tag,
        name_prefix: env.prefix.clone(),
        steps_requested: steps.clone(),
        probe_count,
        page_size: args.page_size,
        concurrency: workers,
        list_runs: LIST_RUNS,
        list_supported,
        volumes_created: population,
        interrupted,
        failed_operations,
        error: failure.as_ref().map(|(m, _)| m.clone()),
        steps: rows,
        driver_rss: args.pid.map(|pid| RssReport {
            pid,
            before_bytes: rss_before,
            after_cleanup_bytes: rss_after_cleanup,
            peak_bytes: read_peak_rss(pid).ok(),
        }),
        cleanup,
    };
    if let Err(e) = write_report(out, args.output, &report) {
        let _ = writeln!(err, "error: cannot write report: {e}");
        return exit::LOCAL_ERROR;
    }
    if interrupted {
        let _ = writeln!(
            err,
            "interrupted after {} of {} steps; cleanup {}",
            report.steps.len(),
            steps.len(),
            cleanup_word(&report.cleanup)
        );
    }
    if args.keep && report.cleanup.remaining > 0 {
        let _ = writeln!(
            err,
            "kept {} volumes named {}*",
            report.cleanup.remaining, report.name_prefix
        );
    }

    if !report.cleanup.kept && !report.cleanup.complete {
        exit::BENCH_CLEANUP_INCOMPLETE
    } else if let Some((_, code)) = failure {
        code
    } else if interrupted {
        exit::INTERRUPTED
    } else if failed_operations > 0 {
        exit::BENCH_OPS_FAILED
    } else {
        exit::SUCCESS
    }
}

fn list_report(runs: &[ListRun]) -> ListReport {
    let mut times: Vec<Duration> = runs.iter().map(|r| r.elapsed).collect();
    times.sort_unstable();
    // Nearest rank: the middle one of an odd count.
    let median = percentile(&times, 50.0);
    let min = times.first().copied().unwrap_or_default();
    ListReport {
        median_seconds: secs(median),
        min_seconds: secs(min),
        entries: runs.iter().map(|r| r.entries).min().unwrap_or(0),
        pages: runs.iter().map(|r| r.pages).max().unwrap_or(0),
        run_seconds: runs.iter().map(|r| secs(r.elapsed)).collect(),
        median,
        min,
    }
}

fn cleanup_word(c: &CleanupReport) -> &'static str {
    if c.kept {
        "skipped (--keep)"
    } else if c.complete {
        "complete"
    } else {
        "INCOMPLETE"
    }
}

/// A latency in milliseconds (as in [`CallSummary`]) back as a duration for display.
fn from_ms(ms: f64) -> Duration {
    Duration::from_secs_f64(ms.max(0.0) / 1e3)
}

fn show_rss(v: Option<u64>) -> String {
    v.map(|b| format_size(i64::try_from(b).unwrap_or(i64::MAX)))
        .unwrap_or_else(|| "-".into())
}

/// The main table's cells of one step.
fn row_cells(r: &StepReport) -> [String; 9] {
    let dash = || "-".to_owned();
    let create_latency = |pick: fn(&CallSummary) -> f64| {
        r.create
            .as_ref()
            .filter(|c| c.ok > 0)
            .map_or_else(dash, |c| format_duration(from_ms(pick(c))))
    };
    let (median, min, entries, pages) = match (&r.list, &r.list_error) {
        (Some(l), _) => (
            format_duration(l.median),
            format_duration(l.min),
            l.entries.to_string(),
            l.pages.to_string(),
        ),
        (None, Some(_)) => ("failed".into(), "failed".into(), dash(), dash()),
        (None, None) => (dash(), dash(), dash(), dash()),
    };
    [
        r.volumes.to_string(),
        r.creates_per_second
            .map_or_else(dash, |c| format!("{c:.1}")),
        create_latency(|c| c.p50_ms),
        create_latency(|c| c.p99_ms),
        median,
        min,
        entries,
        pages,
        show_rss(r.rss_bytes),
    ]
}

/// One line per finished step on an interactive stderr, so long runs show results early.
fn step_line(r: &StepReport) -> String {
    let c = row_cells(r);
    format!(
        "{} volumes: {} creates/s (p50 {}, p99 {}); list all {} (min {}), {} entries in {} \
         pages; RSS {}",
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
    )
}

fn write_report(out: &mut dyn Write, format: OutputFormat, r: &Report) -> std::io::Result<()> {
    if format == OutputFormat::Json {
        let value = serde_json::to_value(r).map_err(std::io::Error::other)?;
        return write_json(out, &value);
    }
    let steps: Vec<String> = r.steps_requested.iter().map(usize::to_string).collect();
    let mut f = Fields::new();
    f.add("WORKLOAD", r.workload)
        .add(
            "DRIVER",
            format!(
                "{} {} at {}",
                r.driver.name, r.driver.vendor_version, r.endpoint
            ),
        )
        .add(
            "RUN",
            format!(
                "volumes {}*; steps {} ({} measured); {} workers",
                r.name_prefix,
                steps.join(","),
                r.steps.len(),
                r.concurrency
            ),
        )
        .add(
            "PROBE",
            format!(
                "{} sequential CreateVolume+DeleteVolume per step",
                r.probe_count
            ),
        )
        .add(
            "LIST",
            if r.list_supported {
                let size = if r.page_size == 0 {
                    "no max_entries (driver decides)".to_owned()
                } else {
                    format!("max_entries {}", r.page_size)
                };
                format!("{} full paginations per step, {size}", r.list_runs)
            } else {
                "skipped: the driver lacks LIST_VOLUMES".to_owned()
            },
        );
    if r.interrupted {
        f.add("INTERRUPTED", "yes");
    }
    if let Some(e) = &r.error {
        f.add("ERROR", e.clone());
    }
    f.write(out)?;

    if !r.steps.is_empty() {
        writeln!(out)?;
        let mut table = Table::new([
            "VOLUMES",
            "CREATE/S",
            "CREATE P50",
            "P99",
            "LIST ALL (median)",
            "LIST ALL (min)",
            "ENTRIES",
            "PAGES",
            "RSS",
        ]);
        for s in &r.steps {
            table.row(row_cells(s));
        }
        table.write(out)?;

        writeln!(out)?;
        let mut calls = Table::new([
            "VOLUMES", "CALL", "OK", "ERRORS", "P50", "P90", "P99", "MAX", "CALLS/S",
        ]);
        let mut errors = Vec::new();
        for s in &r.steps {
            let phases = [
                ("CreateVolume (populate)", &s.populate),
                ("CreateVolume (probe)", &s.create),
                ("DeleteVolume (probe)", &s.delete),
            ];
            for (name, summary) in phases {
                let Some(c) = summary else { continue };
                let lat = |ms: f64| {
                    if c.ok == 0 {
                        "-".to_owned()
                    } else {
                        format_duration(from_ms(ms))
                    }
                };
                calls.row([
                    s.volumes.to_string(),
                    name.to_owned(),
                    c.ok.to_string(),
                    c.errors.to_string(),
                    lat(c.p50_ms),
                    lat(c.p90_ms),
                    lat(c.p99_ms),
                    lat(c.max_ms),
                    format!("{:.1}", c.per_second),
                ]);
                if let Some(e) = &c.first_error {
                    errors.push(format!("first {name} error at {} volumes: {e}", s.volumes));
                }
            }
            if let Some(e) = &s.list_error {
                errors.push(format!("ListVolumes error at {} volumes: {e}", s.volumes));
            }
        }
        calls.write(out)?;
        for e in errors {
            writeln!(out, "{e}")?;
        }
    }

    writeln!(out)?;
    let mut f = Fields::new();
    if let Some(rss) = &r.driver_rss {
        f.add(
            "DRIVER RSS",
            format!(
                "pid {}: before {}, after cleanup {}; peak (VmHWM) {}",
                rss.pid,
                show_rss(rss.before_bytes),
                show_rss(rss.after_cleanup_bytes),
                show_rss(rss.peak_bytes)
            ),
        );
    }
    let c = &r.cleanup;
    f.add(
        "CLEANUP",
        if c.kept {
            format!(
                "skipped (--keep): {} volumes left on the driver",
                c.remaining
            )
        } else if c.complete {
            format!("complete ({} volumes deleted)", c.deleted)
        } else {
            let mut shown: Vec<&str> = c
                .leftovers
                .iter()
                .take(SHOWN_LEFTOVERS)
                .map(String::as_str)
                .collect();
            let more = c.leftovers.len().saturating_sub(SHOWN_LEFTOVERS);
            let tail = format!("… and {more} more");
            if more > 0 {
                shown.push(&tail);
            }
            format!("INCOMPLETE: {}", shown.join("; "))
        },
    );
    f.write(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ms: u64, entries: usize, pages: usize) -> ListRun {
        ListRun {
            elapsed: Duration::from_millis(ms),
            entries,
            pages,
            largest_page: entries,
        }
    }

    #[test]
    fn list_report_takes_median_min_and_conservative_counts() {
        let runs = [
            run(50, 10, 2),
            run(10, 10, 2),
            run(30, 9, 3),
            run(20, 10, 2),
            run(40, 10, 2),
        ];
        let l = list_report(&runs);
        assert_eq!(l.median, Duration::from_millis(30));
        assert_eq!(l.min, Duration::from_millis(10));
        assert_eq!((l.median_seconds, l.min_seconds), (0.03, 0.01));
        // The fewest entries and the most pages any run saw.
        assert_eq!((l.entries, l.pages), (9, 3));
        assert_eq!(l.run_seconds.len(), 5);
    }

    #[test]
    fn row_without_probe_or_list_shows_dashes() {
        let r = StepReport {
            volumes: 7,
            populated: 7,
            populate_seconds: 0.1,
            populate: None,
            creates_per_second: None,
            create: None,
            delete: None,
            list: None,
            list_error: None,
            rss_bytes: None,
        };
        let cells = row_cells(&r);
        assert_eq!(cells[0], "7");
        assert!(cells[1..].iter().all(|c| c == "-"), "{cells:?}");
    }
}
