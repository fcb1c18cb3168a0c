//! The process-wide counters and histograms that calls update as they happen: RPCs by method
//! and code, their latency, group-commit batch sizes, start-up reconciliation. Global, so the
//! places that count (`Driver::call`, `GroupSync`, start-up) need no handle threaded through
//! them, and cheap: an atomic add per call. [`crate::metrics`] encodes them with the figures
//! it reads at scrape time. This module depends on nothing of the driver, so the lowest
//! layers (the group commit) can count without an import cycle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds of the RPC latency buckets, in seconds: from a Probe's fraction of a
/// millisecond to a minute-long copy of a large volume.
const RPC_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Upper bounds of the group-commit batch buckets (writes one flush made durable).
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Labels of `stowage_rpc_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

/// Labels of `stowage_rpc_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct MethodLabels {
    method: &'static str,
}

/// Labels of `stowage_group_commit_batch_writes`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct LogLabels {
    log: &'static str,
}

/// Labels of `stowage_reconcile_state`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct StateLabels {
    state: &'static str,
}

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS)
}

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH_BUCKETS)
}

/// The process-wide counters and histograms.
#[derive(Debug)]
pub struct Recorder {
    pub(crate) rpc_requests: Family<RpcLabels, Counter>,
    pub(crate) rpc_duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    pub(crate) batches: Family<LogLabels, Histogram, fn() -> Histogram>,
    pub(crate) reconcile_duration: Gauge<f64, AtomicU64>,
    pub(crate) reconcile_state: Family<StateLabels, Gauge>,
    /// Nanoseconds the reconciliation took, for the log and the health endpoint.
    pub(crate) reconciled_in: AtomicU64,
}

/// The reconciliation states `stowage_reconcile_state` has a series for.
const RECONCILE_STATES: [&str; 3] = ["running", "done", "failed"];

/// The one recorder of this process.
pub fn recorder() -> &'static Recorder {
    static RECORDER: OnceLock<Recorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let r = Recorder {
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(rpc_histogram),
            batches: Family::new_with_constructor(batch_histogram),
            reconcile_duration: Gauge::default(),
            reconcile_state: Family::default(),
            reconciled_in: AtomicU64::new(0),
        };
        for state in RECONCILE_STATES {
            drop(r.reconcile_state.get_or_create(&StateLabels { state }));
        }
        r
    })
}

impl Recorder {
    /// Counts one finished RPC (every one: served, refused, unimplemented, polled).
    pub fn rpc(&self, method: &'static str, code: tonic::Code, elapsed: Duration) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Notes one group-commit flush of `log` that made `writes` writes durable.
    pub fn batch(&self, log: &'static str, writes: u64) {
        self.batches
            .get_or_create(&LogLabels { log })
            .observe(writes as f64);
    }

    /// Notes where start-up reconciliation is: "running", "done" or "failed", and, once it
    /// ended, how long it took.
    pub fn reconcile(&self, state: &'static str, took: Option<Duration>) {
        for s in RECONCILE_STATES {
            self.reconcile_state
                .get_or_create(&StateLabels { state: s })
                .set(i64::from(s == state));
        }
        if let Some(took) = took {
            self.reconcile_duration.set(took.as_secs_f64());
            self.reconciled_in
                .store(took.as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

/// The gRPC name of a code as gRPC's own tooling prints it (and as the per-call log line's
/// `outcome` has always read): `OK`, `NotFound`, `InvalidArgument`, …
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_grpc_name() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::NotFound), "NotFound");
        assert_eq!(code_name(tonic::Code::Cancelled), "Canceled");
    }
}
