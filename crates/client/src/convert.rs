//! CSI messages rendered as JSON values and as short strings for table cells.
//!
//! prost types have no serde support, so the JSON shape is written out here; it follows
//! the proto field names so scripts can rely on the spec for their meaning. Enum values are
//! the proto names (`SINGLE_NODE_WRITER`), maps are objects with sorted keys.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};
use stowage_csi::v1::{
    controller_service_capability, node_service_capability, plugin_capability, volume_capability,
    volume_content_source, volume_usage, ControllerServiceCapability, NodeServiceCapability,
    PluginCapability, Snapshot, Topology, Volume, VolumeCapability, VolumeCondition,
    VolumeContentSource, VolumeUsage,
};

use crate::size::format_size;

/// A map as a JSON object with sorted keys.
pub(crate) fn map_json(map: &HashMap<String, String>) -> Value {
    let sorted: BTreeMap<&String, &String> = map.iter().collect();
    json!(sorted)
}

/// `a=1,b=2` with sorted keys, or `-` when empty, for table cells.
pub(crate) fn map_cell(map: &HashMap<String, String>) -> String {
    if map.is_empty() {
        return "-".into();
    }
    let sorted: BTreeMap<&String, &String> = map.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn list_cell(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

pub(crate) fn size_cell(bytes: i64) -> String {
    if bytes == 0 {
        // 0 means "unknown" in most CSI size fields.
        "-".into()
    } else {
        format_size(bytes)
    }
}

pub(crate) fn topology_json(t: &Topology) -> Value {
    map_json(&t.segments)
}

pub(crate) fn topologies_cell(ts: &[Topology]) -> String {
    if ts.is_empty() {
        return "-".into();
    }
    ts.iter()
        .map(|t| map_cell(&t.segments))
        .collect::<Vec<_>>()
        .join(" | ")
}

pub(crate) fn content_source_json(source: Option<&VolumeContentSource>) -> Value {
    match source.and_then(|s| s.r#type.as_ref()) {
        Some(volume_content_source::Type::Snapshot(s)) => json!({"snapshot_id": s.snapshot_id}),
        Some(volume_content_source::Type::Volume(v)) => json!({"volume_id": v.volume_id}),
        None => Value::Null,
    }
}

pub(crate) fn content_source_cell(source: Option<&VolumeContentSource>) -> String {
    match source.and_then(|s| s.r#type.as_ref()) {
        Some(volume_content_source::Type::Snapshot(s)) => format!("snapshot {}", s.snapshot_id),
        Some(volume_content_source::Type::Volume(v)) => format!("volume {}", v.volume_id),
        None => "-".into(),
    }
}

pub(crate) fn volume_json(v: &Volume) -> Value {
    json!({
        "volume_id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "volume_context": map_json(&v.volume_context),
        "content_source": content_source_json(v.content_source.as_ref()),
        "accessible_topology": v.accessible_topology.iter().map(topology_json).collect::<Vec<_>>(),
    })
}

pub(crate) fn condition_json(c: Option<&VolumeCondition>) -> Value {
    match c {
        Some(c) => json!({"abnormal": c.abnormal, "message": c.message}),
        None => Value::Null,
    }
}

pub(crate) fn condition_cell(c: Option<&VolumeCondition>) -> String {
    match c {
        Some(c) if c.abnormal => format!("abnormal: {}", c.message),
        Some(c) if !c.message.is_empty() => format!("ok: {}", c.message),
        Some(_) => "ok".into(),
        None => "-".into(),
    }
}

pub(crate) fn access_mode_name(mode: i32) -> String {
    volume_capability::access_mode::Mode::try_from(mode)
        .map(|m| m.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("UNKNOWN({mode})"))
}

pub(crate) fn capability_json(c: &VolumeCapability) -> Value {
    let mode = c
        .access_mode
        .map(|m| Value::String(access_mode_name(m.mode)))
        .unwrap_or(Value::Null);
    match &c.access_type {
        Some(volume_capability::AccessType::Block(_)) => {
            json!({"access_mode": mode, "access_type": "block"})
        }
        Some(volume_capability::AccessType::Mount(m)) => json!({
            "access_mode": mode,
            "access_type": "mount",
            "fs_type": m.fs_type,
            "mount_flags": m.mount_flags,
            "volume_mount_group": m.volume_mount_group,
        }),
        None => json!({"access_mode": mode, "access_type": Value::Null}),
    }
}

pub(crate) fn capability_cell(c: &VolumeCapability) -> String {
    let mode = c
        .access_mode
        .map(|m| access_mode_name(m.mode))
        .unwrap_or_else(|| "-".into());
    match &c.access_type {
        Some(volume_capability::AccessType::Block(_)) => format!("block {mode}"),
        Some(volume_capability::AccessType::Mount(m)) => {
            let mut s = format!("mount {mode}");
            if !m.fs_type.is_empty() {
                s.push_str(&format!(" fs={}", m.fs_type));
            }
            if !m.mount_flags.is_empty() {
                s.push_str(&format!(" flags={}", m.mount_flags.join(",")));
            }
            if !m.volume_mount_group.is_empty() {
                s.push_str(&format!(" group={}", m.volume_mount_group));
            }
            s
        }
        None => mode,
    }
}

/// A `google.protobuf.Timestamp` as RFC 3339 UTC (`2024-05-01T12:00:00.5Z`).
pub(crate) fn timestamp_string(ts: &prost_types::Timestamp) -> String {
    let days = ts.seconds.div_euclid(86_400);
    let secs_of_day = ts.seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60,
    );
    let mut s = format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}");
    if ts.nanos > 0 {
        let frac = format!("{:09}", ts.nanos);
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day); Howard Hinnant's
/// `civil_from_days`, which avoids pulling in a date crate for one conversion.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub(crate) fn snapshot_json(s: &Snapshot) -> Value {
    json!({
        "snapshot_id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "creation_time": s.creation_time.as_ref().map(timestamp_string),
        "ready_to_use": s.ready_to_use,
        "group_snapshot_id": s.group_snapshot_id,
    })
}

pub(crate) fn plugin_capability_name(c: &PluginCapability) -> String {
    match &c.r#type {
        Some(plugin_capability::Type::Service(s)) => {
            plugin_capability::service::Type::try_from(s.r#type)
                .map(|t| t.as_str_name().to_owned())
                .unwrap_or_else(|_| format!("UNKNOWN({})", s.r#type))
        }
        Some(plugin_capability::Type::VolumeExpansion(v)) => {
            let kind = plugin_capability::volume_expansion::Type::try_from(v.r#type)
                .map(|t| t.as_str_name().to_owned())
                .unwrap_or_else(|_| format!("UNKNOWN({})", v.r#type));
            format!("VOLUME_EXPANSION_{kind}")
        }
        None => "UNKNOWN".into(),
    }
}

pub(crate) fn controller_capability_name(c: &ControllerServiceCapability) -> String {
    match &c.r#type {
        Some(controller_service_capability::Type::Rpc(r)) => {
            controller_service_capability::rpc::Type::try_from(r.r#type)
                .map(|t| t.as_str_name().to_owned())
                .unwrap_or_else(|_| format!("UNKNOWN({})", r.r#type))
        }
        None => "UNKNOWN".into(),
    }
}

pub(crate) fn node_capability_name(c: &NodeServiceCapability) -> String {
    match &c.r#type {
        Some(node_service_capability::Type::Rpc(r)) => {
            node_service_capability::rpc::Type::try_from(r.r#type)
                .map(|t| t.as_str_name().to_owned())
                .unwrap_or_else(|_| format!("UNKNOWN({})", r.r#type))
        }
        None => "UNKNOWN".into(),
    }
}

pub(crate) fn usage_unit_name(u: &VolumeUsage) -> String {
    volume_usage::Unit::try_from(u.unit)
        .map(|t| t.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("UNKNOWN({})", u.unit))
}

pub(crate) fn usage_json(u: &VolumeUsage) -> Value {
    json!({
        "unit": usage_unit_name(u),
        "available": u.available,
        "total": u.total,
        "used": u.used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(timestamp_string(&ts(0, 0)), "1970-01-01T00:00:00Z");
        assert_eq!(
            timestamp_string(&ts(1_714_564_800, 500_000_000)),
            "2024-05-01T12:00:00.5Z"
        );
        assert_eq!(
            timestamp_string(&ts(951_782_400, 0)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(timestamp_string(&ts(-1, 0)), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn maps_are_sorted() {
        let m: HashMap<String, String> = [("b", "2"), ("a", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(map_cell(&m), "a=1,b=2");
        assert_eq!(map_json(&m).to_string(), r#"{"a":"1","b":"2"}"#);
        assert_eq!(map_cell(&HashMap::new()), "-");
    }
}
