//! Prometheus metrics (`--metrics-address`).
//!
//! [`registry`] is what a scrape encodes: the counters and histograms of
//! [`crate::recorder`], which calls update as they happen, plus figures read at scrape time from the
//!   store, the pools and `/proc/self` (volumes and snapshots per pool, pool space, loop
//!   devices, pending intents, process resources), so nothing has to be kept in step.
//!
//! Cardinality is bounded by construction: `method` is one of the fixed RPC names, `code` one
//! of the 17 gRPC codes, `pool` one of the configured pools; no volume, snapshot or request
//! field is ever a label value.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use stowage_core::config::PoolKind;

use crate::engine::Engine;
use crate::recorder::recorder;

/// `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A registry of every family, the scrape-time ones read from `engine`.
pub fn registry(engine: Arc<Engine>) -> Registry {
    let r = recorder();
    let mut registry = Registry::default();
    registry.register(
        "stowage_rpc_requests",
        "CSI calls answered, by method and gRPC code",
        r.rpc_requests.clone(),
    );
    registry.register(
        "stowage_rpc_duration_seconds",
        "Time from a CSI call's arrival to its answer, by method",
        r.rpc_duration.clone(),
    );
    registry.register(
        "stowage_group_commit_batch_writes",
        "Writes one group-commit flush made durable, by log (store: the metadata WAL; pool: a dir pool's directory fsync)",
        r.batches.clone(),
    );
    registry.register(
        "stowage_reconcile_duration_seconds",
        "How long start-up reconciliation took (0 until it ends)",
        r.reconcile_duration.clone(),
    );
    registry.register(
        "stowage_reconcile_state",
        "Start-up reconciliation: 1 for the state it is in (running, done, failed)",
        r.reconcile_state.clone(),
    );
    registry.register_collector(Box::new(EngineCollector { engine }));
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// The Prometheus text exposition of `registry`.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a label this module
    // built, and the scrape then gets what was written before it.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    out
}

fn kind_name(kind: PoolKind) -> &'static str {
    kind.as_str()
}

/// One gauge family of `(pool, kind)` series.
fn pool_gauges(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(&str, &'static str, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (pool, kind, value) in series {
        let labels = [("pool", *pool), ("kind", *kind)];
        ConstGauge::new(*value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Figures read from the engine at each scrape.
#[derive(Debug)]
struct EngineCollector {
    engine: Arc<Engine>,
}

impl Collector for EngineCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let engine = &self.engine;
        let pools: Vec<(&str, &'static str)> = engine
            .pools
            .values()
            .map(|p| (p.name(), kind_name(p.kind())))
            .collect();
        match engine.store.counts() {
            Ok(counts) => {
                let per_pool = |m: &std::collections::HashMap<String, u64>| {
                    pools
                        .iter()
                        .map(|(pool, kind)| {
                            (*pool, *kind, m.get(*pool).copied().unwrap_or(0) as i64)
                        })
                        .collect::<Vec<_>>()
                };
                pool_gauges(
                    &mut encoder,
                    "stowage_volumes",
                    "Volume records, by pool and kind (every state).",
                    &per_pool(&counts.volumes),
                )?;
                pool_gauges(
                    &mut encoder,
                    "stowage_snapshots",
                    "Snapshot records, by pool and kind (every state).",
                    &per_pool(&counts.snapshots),
                )?;
                let mut family = encoder.encode_descriptor(
                    "stowage_intents_pending",
                    "Records whose operation was started and not yet completed (creating, deleting, mounting, unmounting), by what they record.",
                    None,
                    MetricType::Gauge,
                )?;
                for (what, n) in [
                    ("volume", counts.pending_volumes),
                    ("snapshot", counts.pending_snapshots),
                    ("publication", counts.pending_publications),
                ] {
                    ConstGauge::new(n as i64).encode(family.encode_family(&[("record", what)])?)?;
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: reading the store's counts"),
        }
        let mut capacity = Vec::new();
        let mut free = Vec::new();
        let mut loops = Vec::new();
        for pool in engine.pools.values() {
            let kind = kind_name(pool.kind());
            match pool.space() {
                Ok(space) => {
                    capacity.push((pool.name(), kind, space.bytes_total as i64));
                    free.push((pool.name(), kind, space.bytes_available as i64));
                }
                Err(e) => {
                    tracing::debug!(pool = %pool.name(), error = %e, "metrics: pool space")
                }
            }
            if pool.kind() == PoolKind::Image {
                let images = pool.path().join("images");
                loops.push((pool.name(), kind, loop_devices_backed_under(&images) as i64));
            }
        }
        pool_gauges(
            &mut encoder,
            "stowage_pool_capacity_bytes",
            "Size of the filesystem holding the pool.",
            &capacity,
        )?;
        pool_gauges(
            &mut encoder,
            "stowage_pool_free_bytes",
            "Bytes free for unprivileged writers on the filesystem holding the pool.",
            &free,
        )?;
        pool_gauges(
            &mut encoder,
            "stowage_pool_loop_devices",
            "Loop devices attached to an image of the pool (image pools only).",
            &loops,
        )?;
        let ready = i64::from(engine.is_ready());
        let family = encoder.encode_descriptor(
            "stowage_ready",
            "1 once start-up reconciliation is done.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(ready).encode(family)?;
        Ok(())
    }
}

/// Loop devices whose backing file lies in directory `dir` (`/sys/block/loop*/loop/backing_file`).
fn loop_devices_backed_under(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return 0;
    };
    let prefix = format!("{}/", dir.display());
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .filter(|backing| backing.starts_with(&prefix))
        .count()
}

/// The `process_*` families every Prometheus client exports, read from `/proc/self`.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let Some(p) = stowage_sys::proc::process_stats() else {
            return Ok(());
        };
        let family = encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(p.cpu_seconds).encode(family)?;
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size.",
                count(p.resident_bytes),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size.",
                count(p.virtual_bytes),
            ),
            (
                "process_open_fds",
                "Open file descriptors.",
                count(p.open_fds),
            ),
            ("process_threads", "OS threads.", count(p.threads)),
        ]
        .into_iter()
        .chain(p.max_fds.map(|max| {
            (
                "process_max_fds",
                "Limit on open file descriptors.",
                count(max),
            )
        }));
        for (name, help, value) in gauges {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(family)?;
        }
        let family = encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(p.start_time_seconds).encode(family)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn recorded_calls_are_encoded_with_their_labels() {
        let r = recorder();
        r.rpc(
            "TestMethodA",
            tonic::Code::NotFound,
            Duration::from_millis(3),
        );
        r.batch("store", 5);
        let mut registry = Registry::default();
        registry.register("stowage_rpc_requests", "h", r.rpc_requests.clone());
        registry.register("stowage_rpc_duration_seconds", "h", r.rpc_duration.clone());
        registry.register("stowage_group_commit_batch_writes", "h", r.batches.clone());
        registry.register_collector(Box::new(ProcessCollector));
        let text = encode(&registry);
        assert!(
            text.contains("stowage_rpc_requests_total{method=\"TestMethodA\",code=\"NotFound\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "stowage_rpc_duration_seconds_bucket{le=\"0.005\",method=\"TestMethodA\"} 1"
            ) || text.contains(
                "stowage_rpc_duration_seconds_bucket{method=\"TestMethodA\",le=\"0.005\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE stowage_group_commit_batch_writes histogram"),
            "{text}"
        );
        if stowage_sys::proc::available() {
            assert!(text.contains("process_resident_memory_bytes "), "{text}");
            assert!(text.contains("process_cpu_seconds_total "), "{text}");
        }
    }
}
