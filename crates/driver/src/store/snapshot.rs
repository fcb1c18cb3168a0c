//! Snapshot records. A snapshot is bracketed like a volume: recorded `creating` (durably)
//! before the backend copies anything, `ready` (durably, so a power cut never takes back a
//! snapshot the CO was told of) after, and `deleting` before its storage is removed.
//! Reconciliation undoes a `creating` snapshot and finishes a `deleting` one.

use rusqlite::{params, OptionalExtension, Row};
use stowage_core::ids::SnapshotId;
use stowage_core::{Result, VolumeId};

use super::{db_err, Store, VolumeState};

/// A snapshot as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub seq: i64,
    pub id: SnapshotId,
    pub name: String,
    /// The volume it was taken of (which may since have been deleted).
    pub source_volume: VolumeId,
    pub pool: String,
    /// The source volume's capacity when it was taken: the least a volume restored from it
    /// can have.
    pub size: u64,
    pub state: VolumeState,
    /// The source was a raw block volume.
    pub block: bool,
    /// The layout the source had (an image volume's filesystem and block size), which a
    /// volume restored from it inherits.
    pub fs_type: Option<String>,
    pub block_size: Option<u32>,
    /// When it was taken, nanoseconds since the Unix epoch.
    pub created_at_ns: i64,
}

/// What CreateSnapshot asks the store to record.
#[derive(Debug, Clone)]
pub struct NewSnapshot<'a> {
    pub id: &'a SnapshotId,
    pub name: &'a str,
    pub source_volume: &'a VolumeId,
    pub pool: &'a str,
    pub size: u64,
    pub block: bool,
    pub fs_type: Option<&'a str>,
    pub block_size: Option<u32>,
}

const SNAPSHOT_COLUMNS: &str =
    "seq, id, name, source_volume, pool, size, state, block, fs_type, block_size, created_at_ns";

fn bad_column(at: usize, what: String) -> rusqlite::Error {
    rusqlite::Error::InvalidColumnType(at, what, rusqlite::types::Type::Text)
}

fn snapshot_from_row(row: &Row<'_>) -> rusqlite::Result<SnapshotRecord> {
    let id: String = row.get(1)?;
    let id = SnapshotId::parse(&id).map_err(|_| bad_column(1, format!("snapshot id {id:?}")))?;
    let source: String = row.get(3)?;
    let source_volume =
        VolumeId::parse(&source).map_err(|_| bad_column(3, format!("volume id {source:?}")))?;
    Ok(SnapshotRecord {
        seq: row.get(0)?,
        id,
        name: row.get(2)?,
        source_volume,
        pool: row.get(4)?,
        size: row.get::<_, i64>(5)? as u64,
        state: VolumeState::parse(row.get_ref(6)?.as_str()?)?,
        block: row.get(7)?,
        fs_type: row.get(8)?,
        block_size: row.get(9)?,
        created_at_ns: row.get(10)?,
    })
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Which ready snapshots a listing wants.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotFilter<'a> {
    pub id: Option<&'a SnapshotId>,
    pub source_volume: Option<&'a VolumeId>,
}

impl Store {
    /// Records a new snapshot in `creating` state; durable when this returns.
    pub fn insert_snapshot(&self, s: &NewSnapshot<'_>) -> Result<SnapshotRecord> {
        self.commit_durably(|conn| {
            conn.prepare_cached(&format!(
                "INSERT INTO snapshots (id, name, source_volume, pool, size, state, block, fs_type, block_size, created_at_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'creating', ?6, ?7, ?8, ?9) RETURNING {SNAPSHOT_COLUMNS}"
            ))
            .and_then(|mut st| {
                st.query_row(
                    params![
                        s.id.as_str(),
                        s.name,
                        s.source_volume.as_str(),
                        s.pool,
                        s.size as i64,
                        s.block,
                        s.fs_type,
                        s.block_size,
                        now_ns()
                    ],
                    snapshot_from_row,
                )
            })
        })
    }

    fn snapshot_where(&self, clause: &str, value: &str) -> Result<Option<SnapshotRecord>> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE {clause} = ?1"
        ))
        .and_then(|mut st| st.query_row([value], snapshot_from_row).optional())
        .map_err(db_err)
    }

    /// The snapshot with this CO name, in any state.
    pub fn snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        self.snapshot_where("name", name)
    }

    /// The snapshot with this id, in any state.
    pub fn snapshot_by_id(&self, id: &SnapshotId) -> Result<Option<SnapshotRecord>> {
        self.snapshot_where("id", id.as_str())
    }

    /// Moves a snapshot to `state`, durably: a `ready` snapshot is one the CO may restore
    /// from, and a `deleting` one is an intent.
    pub fn set_snapshot_state(&self, id: &SnapshotId, state: VolumeState) -> Result<()> {
        self.commit_durably(|conn| {
            conn.prepare_cached("UPDATE snapshots SET state = ?2 WHERE id = ?1")
                .and_then(|mut st| st.execute(params![id.as_str(), state.as_str()]))
        })?;
        Ok(())
    }

    /// Forgets a snapshot after its storage is gone (not fsync'd on its own: the durable
    /// `deleting` or `creating` record before it is finished by reconciliation).
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.relaxed(|conn| {
            conn.prepare_cached("DELETE FROM snapshots WHERE id = ?1")
                .and_then(|mut st| st.execute([id.as_str()]))
        })?;
        Ok(())
    }

    /// Snapshots not in `ready` state (for reconciliation).
    pub fn unfinished_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE state != 'ready' ORDER BY seq"
            ))
            .map_err(db_err)?;
        let rows = st.query_map([], snapshot_from_row).map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Ready snapshots with `seq >= from` matching `filter`, in seq order, at most `limit`
    /// (None: all).
    pub fn list_snapshots(
        &self,
        from: i64,
        limit: Option<u32>,
        filter: SnapshotFilter<'_>,
    ) -> Result<Vec<SnapshotRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {SNAPSHOT_COLUMNS} FROM snapshots
                 WHERE seq >= ?1 AND state = 'ready'
                   AND (?3 IS NULL OR id = ?3) AND (?4 IS NULL OR source_volume = ?4)
                 ORDER BY seq LIMIT ?2"
            ))
            .map_err(db_err)?;
        let rows = st
            .query_map(
                params![
                    from,
                    limit.map_or(-1, i64::from),
                    filter.id.map(SnapshotId::as_str),
                    filter.source_volume.map(VolumeId::as_str)
                ],
                snapshot_from_row,
            )
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Ids of every snapshot record of `pool`, in any state.
    pub fn snapshot_ids(&self, pool: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT id FROM snapshots WHERE pool = ?1")
            .map_err(db_err)?;
        let rows = st.query_map([pool], |r| r.get(0)).map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new<'a>(id: &'a SnapshotId, name: &'a str, source: &'a VolumeId) -> NewSnapshot<'a> {
        NewSnapshot {
            id,
            name,
            source_volume: source,
            pool: "default",
            size: 8 << 20,
            block: false,
            fs_type: Some("ext4"),
            block_size: Some(4096),
        }
    }

    #[test]
    fn snapshot_lifecycle_and_listing() {
        let store = Store::open_in_memory().unwrap();
        let (a, b) = (VolumeId::generate(), VolumeId::generate());
        let mut ids = Vec::new();
        for (i, source) in [&a, &a, &b].into_iter().enumerate() {
            let id = SnapshotId::generate();
            let rec = store
                .insert_snapshot(&new(&id, &format!("s{i}"), source))
                .unwrap();
            assert_eq!(rec.state, VolumeState::Creating);
            assert!(rec.created_at_ns > 0);
            assert_eq!(rec.fs_type.as_deref(), Some("ext4"));
            ids.push(id);
        }
        let all = |f| store.list_snapshots(0, None, f).unwrap().len();
        assert_eq!(
            all(SnapshotFilter::default()),
            0,
            "creating is never listed"
        );
        assert_eq!(store.unfinished_snapshots().unwrap().len(), 3);
        for id in &ids {
            store.set_snapshot_state(id, VolumeState::Ready).unwrap();
        }
        assert_eq!(all(SnapshotFilter::default()), 3);
        let of_a = SnapshotFilter {
            source_volume: Some(&a),
            ..Default::default()
        };
        assert_eq!(all(of_a), 2);
        let one = SnapshotFilter {
            id: Some(&ids[2]),
            source_volume: Some(&a),
        };
        assert_eq!(all(one), 0, "both filters apply");
        let page = store
            .list_snapshots(0, Some(2), SnapshotFilter::default())
            .unwrap();
        assert_eq!(page.len(), 2);
        let rest = store
            .list_snapshots(page[1].seq + 1, None, SnapshotFilter::default())
            .unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(store.snapshot_by_name("s1").unwrap().unwrap().id, ids[1]);
        store.remove_snapshot(&ids[1]).unwrap();
        assert!(store.snapshot_by_id(&ids[1]).unwrap().is_none());
        assert_eq!(store.snapshot_ids("default").unwrap().len(), 2);
        assert!(store
            .insert_snapshot(&new(&SnapshotId::generate(), "s0", &b))
            .is_err());
    }

    #[test]
    fn ready_and_deleting_are_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.db")).unwrap();
        let base = store.flushes();
        let (id, vol) = (SnapshotId::generate(), VolumeId::generate());
        store.insert_snapshot(&new(&id, "s", &vol)).unwrap();
        store.set_snapshot_state(&id, VolumeState::Ready).unwrap();
        store
            .set_snapshot_state(&id, VolumeState::Deleting)
            .unwrap();
        assert_eq!(store.flushes(), base + 3);
    }
}
