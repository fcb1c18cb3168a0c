//! The metadata store: one SQLite file (WAL) holding volumes and publications. It is the truth
//! for what volumes exist; the kernel is the truth for mounts.
//!
//! Every backend action is bracketed by two commits: the record is written in `creating` or
//! `deleting` state first, and finished after, so start-up reconciliation can complete or undo
//! whatever a crash interrupted. Intents are durable before the call that wrote them goes on:
//! commits land in the WAL without their own fsync, and an intent then waits for a group
//! commit ([`crate::durable::GroupSync`]) — one fdatasync of the WAL for every intent written
//! while the previous one ran. Completions and publications ride along with the next flush.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Row};
use stowage_core::ids::{SnapshotId, SnapshotRef, VolumeRef};
use stowage_core::request::ContentSource;
use stowage_core::{Error, Result, VolumeId};

mod snapshot;
pub use snapshot::{NewSnapshot, SnapshotFilter, SnapshotRecord};

use crate::durable::GroupSync;

/// Project ids handed to the kernel are this plus the volume's sequence number, which
/// SQLite's AUTOINCREMENT never reuses, so a project id never names two volumes.
pub const PROJECT_ID_BASE: u64 = 2_000_000_000;

const SCHEMA_VERSION: i64 = 4;

/// The snapshots table, as a fresh store has it and as version 3 added it.
macro_rules! snapshots_table {
    () => {
        "
CREATE TABLE snapshots (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL UNIQUE,
    source_volume TEXT    NOT NULL,
    pool          TEXT    NOT NULL,
    size          INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    block         INTEGER NOT NULL,
    fs_type       TEXT,
    block_size    INTEGER,
    created_at_ns INTEGER NOT NULL
);
CREATE INDEX snapshots_source ON snapshots (source_volume);
"
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE volumes (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL UNIQUE,
    pool          TEXT    NOT NULL,
    capacity      INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('creating', 'ready', 'deleting')),
    block         INTEGER NOT NULL,
    pvc_name      TEXT,
    pvc_namespace TEXT,
    pv_name       TEXT,
    created_at    INTEGER NOT NULL,
    fs_type       TEXT,
    block_size    INTEGER,
    full_alloc    INTEGER NOT NULL DEFAULT 0,
    source        TEXT
);
CREATE TABLE publications (
    path          TEXT    PRIMARY KEY,
    volume_id     TEXT    NOT NULL REFERENCES volumes (id),
    kind          TEXT    NOT NULL CHECK (kind IN ('stage', 'publish')),
    state         TEXT    NOT NULL CHECK (state IN ('mounting', 'mounted', 'unmounting')),
    read_only     INTEGER NOT NULL,
    access_mode   INTEGER NOT NULL,
    flags         TEXT    NOT NULL,
    created_dir   INTEGER NOT NULL,
    staging_path  TEXT
);
CREATE INDEX publications_volume ON publications (volume_id);
",
    snapshots_table!()
);

/// Version 1 to 2: what an `image` volume keeps for its whole life (the filesystem made on
/// it, the block size of its loop device) and whether it is fully allocated. Existing rows
/// (all `dir` volumes) get NULL, NULL, 0.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE volumes ADD COLUMN fs_type TEXT;
ALTER TABLE volumes ADD COLUMN block_size INTEGER;
ALTER TABLE volumes ADD COLUMN full_alloc INTEGER NOT NULL DEFAULT 0;
";

/// Version 2 to 3: snapshots, and where a volume's content came from.
const MIGRATE_2_TO_3: &str = concat!(
    "ALTER TABLE volumes ADD COLUMN source TEXT;\n",
    snapshots_table!()
);

/// Version 3 to 4: no index on the volumes' state. It saved a scan of the table once at
/// start (reconciliation looks for unfinished volumes) and cost a page in the WAL, so a
/// flush, on every intent and every completion: an insert, a state change and a removal
/// each wrote its leaf.
const MIGRATE_3_TO_4: &str = "
DROP INDEX IF EXISTS volumes_state;
";

/// Lifecycle state of a volume or snapshot record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    /// Intent recorded; the backend may or may not have acted.
    Creating,
    /// The backend finished; the volume is usable.
    Ready,
    /// Deletion decided; the backend may or may not have removed it.
    Deleting,
}

impl VolumeState {
    fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Ready => "ready",
            VolumeState::Deleting => "deleting",
        }
    }

    fn parse(s: &str) -> rusqlite::Result<Self> {
        match s {
            "creating" => Ok(VolumeState::Creating),
            "ready" => Ok(VolumeState::Ready),
            "deleting" => Ok(VolumeState::Deleting),
            other => Err(rusqlite::Error::InvalidColumnType(
                0,
                format!("volume state {other:?}"),
                rusqlite::types::Type::Text,
            )),
        }
    }
}

/// A volume as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub seq: i64,
    pub id: VolumeId,
    pub name: String,
    pub pool: String,
    pub capacity: u64,
    pub state: VolumeState,
    pub block: bool,
    pub pvc_name: Option<String>,
    pub pvc_namespace: Option<String>,
    pub pv_name: Option<String>,
    pub created_at: i64,
    /// The filesystem made on the volume's device (image pools), once decided at the first
    /// stage; None before that and for other kinds.
    pub fs_type: Option<String>,
    /// The logical block size of the volume's loop device (image pools), fixed at the first
    /// stage: a filesystem made on one block size may not mount on another.
    pub block_size: Option<u32>,
    /// Every byte of the volume is allocated on the pool's filesystem (`allocation=full`).
    pub full_allocation: bool,
    /// What the volume was filled from at creation (None: it started empty).
    pub source: Option<ContentSource>,
}

impl VolumeRecord {
    /// The project id charged for this volume's files.
    pub fn project_id(&self) -> u32 {
        u32::try_from(PROJECT_ID_BASE + self.seq as u64).unwrap_or(u32::MAX)
    }
}

/// What CreateVolume asks the store to record.
#[derive(Debug, Clone)]
pub struct NewVolume<'a> {
    pub id: &'a VolumeId,
    pub name: &'a str,
    pub pool: &'a str,
    pub capacity: u64,
    pub block: bool,
    pub pvc_name: Option<&'a str>,
    pub pvc_namespace: Option<&'a str>,
    pub pv_name: Option<&'a str>,
    pub full_allocation: bool,
    /// What it is filled from; a volume made from a snapshot or a clone.
    pub source: Option<&'a ContentSource>,
    /// The layout it inherits from its source (an image volume's filesystem and block size).
    pub fs_type: Option<&'a str>,
    pub block_size: Option<u32>,
}

/// Kind of a node publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationKind {
    Stage,
    Publish,
}

impl PublicationKind {
    fn as_str(self) -> &'static str {
        match self {
            PublicationKind::Stage => "stage",
            PublicationKind::Publish => "publish",
        }
    }
    fn parse(s: &str) -> rusqlite::Result<Self> {
        match s {
            "stage" => Ok(PublicationKind::Stage),
            "publish" => Ok(PublicationKind::Publish),
            other => Err(rusqlite::Error::InvalidColumnType(
                0,
                format!("publication kind {other:?}"),
                rusqlite::types::Type::Text,
            )),
        }
    }
}

/// State of a publication record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationState {
    Mounting,
    Mounted,
    Unmounting,
}

impl PublicationState {
    fn as_str(self) -> &'static str {
        match self {
            PublicationState::Mounting => "mounting",
            PublicationState::Mounted => "mounted",
            PublicationState::Unmounting => "unmounting",
        }
    }
    fn parse(s: &str) -> rusqlite::Result<Self> {
        match s {
            "mounting" => Ok(PublicationState::Mounting),
            "mounted" => Ok(PublicationState::Mounted),
            "unmounting" => Ok(PublicationState::Unmounting),
            other => Err(rusqlite::Error::InvalidColumnType(
                0,
                format!("publication state {other:?}"),
                rusqlite::types::Type::Text,
            )),
        }
    }
}

/// A staging or publish mount made by this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub path: String,
    pub volume_id: VolumeId,
    pub kind: PublicationKind,
    pub state: PublicationState,
    pub read_only: bool,
    pub access_mode: i32,
    /// Mount flags, comma-separated, sorted.
    pub flags: String,
    /// Whether the driver created the directory at `path` (and so removes it on unpublish).
    pub created_dir: bool,
    /// For publish: the staging path it was published from.
    pub staging_path: Option<String>,
}

/// What [`Store::counts`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Volume records per pool, every state.
    pub volumes: HashMap<String, u64>,
    /// Snapshot records per pool, every state.
    pub snapshots: HashMap<String, u64>,
    /// Volumes `creating` or `deleting`.
    pub pending_volumes: u64,
    /// Snapshots `creating` or `deleting`.
    pub pending_snapshots: u64,
    /// Publications `mounting` or `unmounting`.
    pub pending_publications: u64,
}

/// The SQLite-backed store. One connection behind a mutex: SQLite serialises writers anyway,
/// and every statement here touches a handful of rows by index.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    /// The WAL file, flushed by group commits; `None` for an in-memory store.
    wal: Option<File>,
    group: GroupSync,
}

fn db_err(e: rusqlite::Error) -> Error {
    Error::internal("metadata store", e)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn volume_from_row(row: &Row<'_>) -> rusqlite::Result<VolumeRecord> {
    // Positions follow VOLUME_COLUMNS: looking columns up by name costs a string compare per
    // column per row, which shows in a ListVolumes of many thousand volumes.
    let id: String = row.get(1)?;
    let id = VolumeId::parse(&id).map_err(|_| {
        rusqlite::Error::InvalidColumnType(
            1,
            format!("volume id {id:?}"),
            rusqlite::types::Type::Text,
        )
    })?;
    Ok(VolumeRecord {
        seq: row.get(0)?,
        id,
        name: row.get(2)?,
        pool: row.get(3)?,
        capacity: row.get::<_, i64>(4)? as u64,
        state: VolumeState::parse(row.get_ref(5)?.as_str()?)?,
        block: row.get(6)?,
        pvc_name: row.get(7)?,
        pvc_namespace: row.get(8)?,
        pv_name: row.get(9)?,
        created_at: row.get(10)?,
        fs_type: row.get(11)?,
        block_size: row.get(12)?,
        full_allocation: row.get(13)?,
        source: row
            .get_ref(14)?
            .as_str_or_null()?
            .map(parse_source)
            .transpose()?,
    })
}

/// How a content source is recorded: `snapshot:<id>` or `volume:<id>`.
pub(crate) fn source_to_text(source: &ContentSource) -> String {
    match source {
        ContentSource::Snapshot(s) => format!("snapshot:{}", s.as_str()),
        ContentSource::Volume(v) => format!("volume:{}", v.as_str()),
    }
}

fn parse_source(text: &str) -> rusqlite::Result<ContentSource> {
    let bad = || {
        rusqlite::Error::InvalidColumnType(
            14,
            format!("content source {text:?}"),
            rusqlite::types::Type::Text,
        )
    };
    match text.split_once(':') {
        Some(("snapshot", id)) => SnapshotId::parse(id)
            .map(|id| ContentSource::Snapshot(SnapshotRef::Ours(id)))
            .map_err(|_| bad()),
        Some(("volume", id)) => VolumeId::parse(id)
            .map(|id| ContentSource::Volume(VolumeRef::Ours(id)))
            .map_err(|_| bad()),
        _ => Err(bad()),
    }
}

fn publication_from_row(row: &Row<'_>) -> rusqlite::Result<Publication> {
    let id: String = row.get("volume_id")?;
    let volume_id = VolumeId::parse(&id).map_err(|_| {
        rusqlite::Error::InvalidColumnType(
            0,
            format!("volume id {id:?}"),
            rusqlite::types::Type::Text,
        )
    })?;
    Ok(Publication {
        path: row.get("path")?,
        volume_id,
        kind: PublicationKind::parse(&row.get::<_, String>("kind")?)?,
        state: PublicationState::parse(&row.get::<_, String>("state")?)?,
        read_only: row.get("read_only")?,
        access_mode: row.get("access_mode")?,
        flags: row.get("flags")?,
        created_dir: row.get("created_dir")?,
        staging_path: row.get("staging_path")?,
    })
}

const VOLUME_COLUMNS: &str = "seq, id, name, pool, capacity, state, block, pvc_name, pvc_namespace, pv_name, created_at, fs_type, block_size, full_alloc, source";
const PUBLICATION_COLUMNS: &str =
    "path, volume_id, kind, state, read_only, access_mode, flags, created_dir, staging_path";

impl Store {
    /// Opens (creating if needed) the database at `path`: WAL journal, commits written to
    /// the WAL and flushed by group commit (see [`Store::commit_durably`]), and the schema at
    /// its current version.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)
            .map_err(|e| Error::internal(format!("opening {}", path.display()), e))?;
        let conn = Self::init(conn)?;
        // SQLite keeps the WAL file (same inode) while a connection is open; a checkpoint
        // rewinds it, it is never replaced. fdatasync through our own descriptor flushes what
        // SQLite wrote through its own.
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        let wal = File::open(&wal_path).map_err(|e| {
            Error::internal(
                format!(
                    "opening the write-ahead log {}",
                    Path::new(&wal_path).display()
                ),
                e,
            )
        })?;
        // The WAL may have just been created: make its directory entry durable once.
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::internal("syncing the state directory", e))?;
        let store = Store {
            conn: Mutex::new(conn),
            wal: Some(wal),
            group: GroupSync::for_log("store"),
        };
        // Whatever a previous run left unflushed, and the schema, are durable from here on.
        store.group.note_write();
        store.flush()?;
        Ok(store)
    }

    /// An in-memory store, for unit tests.
    pub fn open_in_memory() -> Result<Self> {
        Ok(Store {
            conn: Mutex::new(Self::init(Connection::open_in_memory().map_err(db_err)?)?),
            wal: None,
            group: GroupSync::for_log("store"),
        })
    }

    fn init(conn: Connection) -> Result<Connection> {
        // This process is the store's only user: holding its lock for the connection's life
        // spares the two to six fcntl locks every transaction otherwise takes, and set before
        // the WAL is first touched, SQLite keeps the WAL index in the heap instead of a
        // shared-memory file. A second driver started on the same state directory gets
        // SQLITE_BUSY instead of writing beside the first.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        // NORMAL: a commit is written to the WAL (atomic, survives a crash of the process)
        // but not fsync'd; intents are made durable by group commit instead.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(db_err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(db_err)?;
        if version > SCHEMA_VERSION {
            return Err(Error::Internal(format!(
                "metadata store has schema version {version}; this stowage knows {SCHEMA_VERSION}: refusing to touch it"
            )));
        }
        if version == 0 {
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))
            .map_err(db_err)?;
            return Ok(conn);
        }
        // Each step in its own transaction: a crash between two leaves a store at a version
        // this code migrates on from.
        for (from, step) in [
            (1, MIGRATE_1_TO_2),
            (2, MIGRATE_2_TO_3),
            (3, MIGRATE_3_TO_4),
        ] {
            if version <= from {
                conn.execute_batch(&format!(
                    "BEGIN; {step} PRAGMA user_version = {}; COMMIT;",
                    from + 1
                ))
                .map_err(db_err)?;
                tracing::info!(
                    "metadata store migrated from schema version {from} to {}",
                    from + 1
                );
            }
        }
        Ok(conn)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (statements are
        // atomic), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with commits that are atomic and survive a crash of the process (the WAL is in
    /// the page cache) but are not fsync'd; the next group commit makes them durable too,
    /// since the WAL is written in order. Used only where losing the write to a power cut is
    /// harmless because start-up reconciliation re-derives it: the completion of an intent
    /// whose durable record already exists, and publications (mounts do not survive a power
    /// cut either).
    fn relaxed<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn();
        let out = f(&conn).map_err(db_err)?;
        self.group.note_write();
        Ok(out)
    }

    /// Runs `f` (one autocommitted statement) and returns once its commit is durable. The
    /// fdatasync is shared: every intent committed while another caller's flush was running
    /// is covered by the next single flush.
    fn commit_durably<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let (out, ticket) = {
            let conn = self.conn();
            let out = f(&conn).map_err(db_err)?;
            // Noted under the connection lock, so tickets follow the order of the WAL.
            (out, self.group.note_write())
        };
        crate::phases::mark("intent-write");
        self.group.wait(ticket, || self.sync_wal())?;
        crate::phases::mark("intent-flush");
        Ok(out)
    }

    /// Makes every commit so far durable (on shutdown, and after open).
    pub fn flush(&self) -> Result<()> {
        self.group.flush_all(|| self.sync_wal())
    }

    /// Group commits run so far.
    pub fn flushes(&self) -> u64 {
        self.group.flushes()
    }

    fn sync_wal(&self) -> Result<()> {
        match &self.wal {
            Some(wal) => wal
                .sync_data()
                .map_err(|e| Error::internal("flushing the metadata store's write-ahead log", e)),
            None => Ok(()),
        }
    }

    /// Records a new volume in `creating` state; durable when this returns.
    pub fn insert_volume(&self, v: &NewVolume<'_>) -> Result<VolumeRecord> {
        self.commit_durably(|conn| {
        conn.prepare_cached(&format!(
            "INSERT INTO volumes (id, name, pool, capacity, state, block, pvc_name, pvc_namespace, pv_name, created_at, full_alloc, source, fs_type, block_size)
             VALUES (?1, ?2, ?3, ?4, 'creating', ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) RETURNING {VOLUME_COLUMNS}"
        ))
        .and_then(|mut st| {
            st.query_row(
                params![
                    v.id.as_str(),
                    v.name,
                    v.pool,
                    v.capacity as i64,
                    v.block,
                    v.pvc_name,
                    v.pvc_namespace,
                    v.pv_name,
                    now(),
                    v.full_allocation,
                    v.source.map(source_to_text),
                    v.fs_type,
                    v.block_size
                ],
                volume_from_row,
            )
        })
        })
    }

    /// The volume with this CO name, in any state.
    pub fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE name = ?1"
        ))
        .and_then(|mut st| st.query_row([name], volume_from_row).optional())
        .map_err(db_err)
    }

    /// The volume with this id, in any state.
    pub fn volume_by_id(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {VOLUME_COLUMNS} FROM volumes WHERE id = ?1"
        ))
        .and_then(|mut st| st.query_row([id.as_str()], volume_from_row).optional())
        .map_err(db_err)
    }

    /// Moves a volume to `state`. Intents (`creating`, `deleting`) are durable when this
    /// returns; `ready` completes an intent that reconciliation would finish anyway, so it is
    /// not fsync'd on its own.
    pub fn set_volume_state(&self, id: &VolumeId, state: VolumeState) -> Result<()> {
        let update = |conn: &Connection| {
            conn.prepare_cached("UPDATE volumes SET state = ?2 WHERE id = ?1")
                .and_then(|mut st| st.execute(params![id.as_str(), state.as_str()]))
        };
        match state {
            VolumeState::Ready => self.relaxed(update)?,
            VolumeState::Creating | VolumeState::Deleting => self.commit_durably(update)?,
        };
        Ok(())
    }

    /// Marks a volume `ready` durably: for a volume filled from a source, whose interrupted
    /// creation reconciliation undoes (it cannot tell a half copy from a whole one), the
    /// CO must never be told of a volume a power cut could then take back.
    pub fn set_volume_ready_durably(&self, id: &VolumeId) -> Result<()> {
        self.commit_durably(|conn| {
            conn.prepare_cached("UPDATE volumes SET state = 'ready' WHERE id = ?1")
                .and_then(|mut st| st.execute([id.as_str()]))
        })?;
        Ok(())
    }

    /// Records a new capacity of a volume before its storage is grown (the intent of an
    /// expansion): durable when this returns, so a crash between here and the growth is
    /// finished by a retried expansion, which grows to the recorded size.
    pub fn set_volume_capacity(&self, id: &VolumeId, capacity: u64) -> Result<()> {
        self.commit_durably(|conn| {
            conn.prepare_cached("UPDATE volumes SET capacity = ?2 WHERE id = ?1")
                .and_then(|mut st| st.execute(params![id.as_str(), capacity as i64]))
        })?;
        Ok(())
    }

    /// Records the filesystem type and device block size a volume keeps for its life, before
    /// the device is configured or formatted with them (durable when this returns).
    pub fn set_volume_layout(
        &self,
        id: &VolumeId,
        fs_type: Option<&str>,
        block_size: Option<u32>,
    ) -> Result<()> {
        self.commit_durably(|conn| {
            conn.prepare_cached("UPDATE volumes SET fs_type = ?2, block_size = ?3 WHERE id = ?1")
                .and_then(|mut st| st.execute(params![id.as_str(), fs_type, block_size]))
        })?;
        Ok(())
    }

    /// Forgets a volume after its backend artifacts are gone. The `deleting` record it
    /// replaces is durable, and reconciliation finishes a delete, so this is not fsync'd on
    /// its own.
    pub fn remove_volume(&self, id: &VolumeId) -> Result<()> {
        self.relaxed(|conn| {
            conn.prepare_cached("DELETE FROM volumes WHERE id = ?1")
                .and_then(|mut st| st.execute([id.as_str()]))
        })?;
        Ok(())
    }

    /// Volumes not in `ready` state (for reconciliation).
    pub fn unfinished_volumes(&self) -> Result<Vec<VolumeRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE state != 'ready' ORDER BY seq"
            ))
            .map_err(db_err)?;
        let rows = st.query_map([], volume_from_row).map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Ready volumes with `seq >= from`, in seq order, at most `limit` (None: all); each with
    /// whether it has a publication on this node. For listings of many thousand volumes, the
    /// records carry only what a listing or a condition check reads: no CO name (`name` is
    /// empty), no PVC/PV names (`None`), no creation time (0). Each column read costs a few
    /// hundred instructions per row, and a string one an allocation.
    pub fn list_ready(&self, from: i64, limit: Option<u32>) -> Result<Vec<(VolumeRecord, bool)>> {
        let conn = self.conn();
        // The node's publications are few (what its pods mount); one read of their volume
        // ids replaces a lookup in their index for every row listed.
        let published: std::collections::HashSet<String> = conn
            .prepare_cached("SELECT DISTINCT volume_id FROM publications")
            .and_then(|mut st| {
                st.query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(db_err)?;
        let mut st = conn
            .prepare_cached(
                "SELECT seq, id, pool, capacity, block, fs_type, block_size, full_alloc, source
                 FROM volumes WHERE seq >= ?1 AND state = 'ready' ORDER BY seq LIMIT ?2",
            )
            .map_err(db_err)?;
        let limit = limit.map_or(-1, i64::from);
        let rows = st
            .query_map(params![from, limit], |row| {
                let id = row.get_ref(1)?.as_str()?;
                let is_published = !published.is_empty() && published.contains(id);
                let id = VolumeId::parse(id).map_err(|_| {
                    rusqlite::Error::InvalidColumnType(
                        1,
                        format!("volume id {id:?}"),
                        rusqlite::types::Type::Text,
                    )
                })?;
                let record = VolumeRecord {
                    seq: row.get(0)?,
                    id,
                    name: String::new(),
                    pool: row.get(2)?,
                    capacity: row.get::<_, i64>(3)? as u64,
                    state: VolumeState::Ready,
                    block: row.get(4)?,
                    pvc_name: None,
                    pvc_namespace: None,
                    pv_name: None,
                    created_at: 0,
                    fs_type: row.get(5)?,
                    block_size: row.get(6)?,
                    full_allocation: row.get(7)?,
                    source: row
                        .get_ref(8)?
                        .as_str_or_null()?
                        .map(parse_source)
                        .transpose()?,
                };
                Ok((record, is_published))
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Volumes whose CO name starts with `prefix`, in any state.
    pub fn volumes_named_like(&self, prefix: &str) -> Result<Vec<VolumeRecord>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {VOLUME_COLUMNS} FROM volumes WHERE substr(name, 1, length(?1)) = ?1 ORDER BY seq"
            ))
            .map_err(db_err)?;
        let rows = st.query_map([prefix], volume_from_row).map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Records per pool and records whose operation is not complete, for the metrics scrape:
    /// a few aggregate queries over small tables (and the partial `state != 'ready'` index).
    pub fn counts(&self) -> Result<StoreCounts> {
        let conn = self.conn();
        let per_pool = |sql: &str| -> Result<HashMap<String, u64>> {
            let mut st = conn.prepare_cached(sql).map_err(db_err)?;
            let rows = st
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db_err)
        };
        let count = |sql: &str| -> Result<u64> {
            conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
                .map_err(db_err)
        };
        Ok(StoreCounts {
            volumes: per_pool("SELECT pool, COUNT(*) FROM volumes GROUP BY pool")?,
            snapshots: per_pool("SELECT pool, COUNT(*) FROM snapshots GROUP BY pool")?,
            pending_volumes: count("SELECT COUNT(*) FROM volumes WHERE state != 'ready'")?,
            pending_snapshots: count("SELECT COUNT(*) FROM snapshots WHERE state != 'ready'")?,
            pending_publications: count(
                "SELECT COUNT(*) FROM publications WHERE state != 'mounted'",
            )?,
        })
    }

    /// Whether the database answers a query (the readiness check's "store open").
    pub fn ping(&self) -> Result<()> {
        self.conn()
            .query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map(|_| ())
            .map_err(db_err)
    }

    /// Ids of every volume record, in any state.
    pub fn volume_ids(&self) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT id FROM volumes")
            .map_err(db_err)?;
        let rows = st.query_map([], |r| r.get(0)).map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Publications of one volume.
    pub fn publications_of(&self, id: &VolumeId) -> Result<Vec<Publication>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {PUBLICATION_COLUMNS} FROM publications WHERE volume_id = ?1 ORDER BY path"
            ))
            .map_err(db_err)?;
        let rows = st
            .query_map([id.as_str()], publication_from_row)
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// Every publication (for reconciliation).
    pub fn all_publications(&self) -> Result<Vec<Publication>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT {PUBLICATION_COLUMNS} FROM publications ORDER BY path"
            ))
            .map_err(db_err)?;
        let rows = st.query_map([], publication_from_row).map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)
    }

    /// The publication at `path`, if any.
    pub fn publication_at(&self, path: &str) -> Result<Option<Publication>> {
        let conn = self.conn();
        conn.prepare_cached(&format!(
            "SELECT {PUBLICATION_COLUMNS} FROM publications WHERE path = ?1"
        ))
        .and_then(|mut st| st.query_row([path], publication_from_row).optional())
        .map_err(db_err)
    }

    /// Records (or replaces) a publication (crash-safe, not fsync'd: see [`Store::relaxed`]).
    pub fn put_publication(&self, p: &Publication) -> Result<()> {
        self.relaxed(|conn| {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO publications
             (path, volume_id, kind, state, read_only, access_mode, flags, created_dir, staging_path)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .and_then(|mut st| {
            st.execute(params![
                p.path,
                p.volume_id.as_str(),
                p.kind.as_str(),
                p.state.as_str(),
                p.read_only,
                p.access_mode,
                p.flags,
                p.created_dir,
                p.staging_path
            ])
        })
        })?;
        Ok(())
    }

    /// Forgets the publication at `path` (crash-safe, not fsync'd: see [`Store::relaxed`]).
    pub fn remove_publication(&self, path: &str) -> Result<()> {
        self.relaxed(|conn| {
            conn.prepare_cached("DELETE FROM publications WHERE path = ?1")
                .and_then(|mut st| st.execute([path]))
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new<'a>(id: &'a VolumeId, name: &'a str) -> NewVolume<'a> {
        NewVolume {
            id,
            name,
            pool: "default",
            capacity: 1 << 20,
            block: false,
            pvc_name: Some("data"),
            pvc_namespace: None,
            pv_name: None,
            full_allocation: false,
            source: None,
            fs_type: None,
            block_size: None,
        }
    }

    #[test]
    fn a_version_1_store_is_migrated_and_keeps_its_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            let v1 = SCHEMA[..SCHEMA.find("CREATE TABLE snapshots").unwrap()].replace(
                ",\n    fs_type       TEXT,\n    block_size    INTEGER,\n    full_alloc    INTEGER NOT NULL DEFAULT 0,\n    source        TEXT",
                "",
            );
            assert!(!v1.contains("full_alloc"), "the v1 schema is rebuilt");
            conn.execute_batch(&format!("{v1} PRAGMA user_version = 1;"))
                .unwrap();
            conn.execute(
                "INSERT INTO volumes (id, name, pool, capacity, state, block, created_at)
                 VALUES (?1, 'old', 'default', 1048576, 'ready', 0, 0)",
                [VolumeId::generate().as_str()],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let old = store.volume_by_name("old").unwrap().unwrap();
        assert_eq!(
            (old.fs_type, old.block_size, old.full_allocation),
            (None, None, false)
        );
        store
            .set_volume_layout(&old.id, Some("xfs"), Some(4096))
            .unwrap();
        store.set_volume_capacity(&old.id, 2 << 20).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let old = store.volume_by_name("old").unwrap().unwrap();
        assert_eq!(old.fs_type.as_deref(), Some("xfs"));
        assert_eq!(old.block_size, Some(4096));
        assert_eq!(old.capacity, 2 << 20);
    }

    #[test]
    fn a_version_3_store_loses_the_state_index_and_keeps_its_unfinished_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let id = VolumeId::generate();
        {
            let conn = Connection::open(&path).unwrap();
            let v3 = SCHEMA.replace(
                "CREATE TABLE publications",
                "CREATE INDEX volumes_state ON volumes (state) WHERE state != 'ready';\nCREATE TABLE publications",
            );
            conn.execute_batch(&format!("{v3} PRAGMA user_version = 3;"))
                .unwrap();
            conn.execute(
                "INSERT INTO volumes (id, name, pool, capacity, state, block, created_at)
                 VALUES (?1, 'half', 'default', 1048576, 'creating', 0, 0)",
                [id.as_str()],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let index: Option<String> = store
            .conn()
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND name = 'volumes_state'",
                [],
                |r| r.get(0),
            )
            .optional()
            .unwrap();
        assert_eq!(index, None);
        let version: i64 = store
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let unfinished = store.unfinished_volumes().unwrap();
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].id, id);
        drop(store);
        // A store at the current version opens again unchanged.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.unfinished_volumes().unwrap().len(), 1);
    }

    /// The store holds its lock for its life: a second opener waits, then gives up, instead
    /// of writing beside it.
    #[test]
    fn a_second_opener_is_refused_while_the_store_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = Store::open(&path).unwrap();
        store
            .insert_volume(&new(&VolumeId::generate(), "a"))
            .unwrap();
        let other = Connection::open(&path).unwrap();
        other
            .busy_timeout(std::time::Duration::from_millis(50))
            .unwrap();
        assert!(other
            .query_row("SELECT count(*) FROM volumes", [], |r| r.get::<_, i64>(0))
            .is_err());
        drop(other);
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(store.volume_by_name("a").unwrap().is_some());
    }

    #[test]
    fn volume_lifecycle() {
        let store = Store::open_in_memory().unwrap();
        let id = VolumeId::generate();
        let rec = store.insert_volume(&new(&id, "a")).unwrap();
        assert_eq!(rec.state, VolumeState::Creating);
        assert_eq!(rec.pvc_name.as_deref(), Some("data"));
        assert_eq!(store.unfinished_volumes().unwrap().len(), 1);
        store.set_volume_state(&id, VolumeState::Ready).unwrap();
        assert!(store.unfinished_volumes().unwrap().is_empty());
        assert_eq!(store.volume_by_name("a").unwrap().unwrap().id, id);
        assert_eq!(store.list_ready(0, None).unwrap().len(), 1);
        store.remove_volume(&id).unwrap();
        assert!(store.volume_by_id(&id).unwrap().is_none());
        // Sequence numbers (and so project ids) are never reused.
        let id2 = VolumeId::generate();
        let rec2 = store.insert_volume(&new(&id2, "a")).unwrap();
        assert!(rec2.seq > rec.seq);
    }

    #[test]
    fn positional_reads_match_the_column_list() {
        assert_eq!(VOLUME_COLUMNS.split(',').count(), 15);
        let names: Vec<&str> = VOLUME_COLUMNS.split(',').map(str::trim).collect();
        assert_eq!(names[..2], ["seq", "id"]);
        assert_eq!(names[5], "state");
        assert_eq!(names[10], "created_at");
    }

    #[test]
    fn duplicate_names_are_refused_by_the_schema() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_volume(&new(&VolumeId::generate(), "a"))
            .unwrap();
        assert!(store
            .insert_volume(&new(&VolumeId::generate(), "a"))
            .is_err());
    }

    #[test]
    fn pagination_and_published_flag() {
        let store = Store::open_in_memory().unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let id = VolumeId::generate();
            store.insert_volume(&new(&id, &format!("v{i}"))).unwrap();
            store.set_volume_state(&id, VolumeState::Ready).unwrap();
            ids.push(id);
        }
        store
            .put_publication(&Publication {
                path: "/t".into(),
                volume_id: ids[1].clone(),
                kind: PublicationKind::Publish,
                state: PublicationState::Mounted,
                read_only: false,
                access_mode: 1,
                flags: String::new(),
                created_dir: true,
                staging_path: None,
            })
            .unwrap();
        let page = store.list_ready(0, Some(2)).unwrap();
        assert_eq!(page.len(), 2);
        assert!(!page[0].1);
        assert!(page[1].1);
        let rest = store.list_ready(page[1].0.seq + 1, None).unwrap();
        assert_eq!(rest.len(), 3);
        assert_eq!(store.publications_of(&ids[1]).unwrap().len(), 1);
        store.remove_publication("/t").unwrap();
        assert!(store.publication_at("/t").unwrap().is_none());
    }

    /// Intents wait for a flush of the WAL; completions and publications do not, they are
    /// made durable by the next intent's flush.
    #[test]
    fn intents_are_flushed_and_completions_ride_along() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.db")).unwrap();
        let base = store.flushes();
        let id = VolumeId::generate();
        store.insert_volume(&new(&id, "a")).unwrap();
        assert_eq!(store.flushes(), base + 1, "creating intent flushed");
        store.set_volume_state(&id, VolumeState::Ready).unwrap();
        store
            .put_publication(&Publication {
                path: "/t".into(),
                volume_id: id.clone(),
                kind: PublicationKind::Stage,
                state: PublicationState::Mounted,
                read_only: false,
                access_mode: 1,
                flags: String::new(),
                created_dir: false,
                staging_path: None,
            })
            .unwrap();
        store.remove_publication("/t").unwrap();
        assert_eq!(
            store.flushes(),
            base + 1,
            "completions are not flushed alone"
        );
        store.set_volume_state(&id, VolumeState::Deleting).unwrap();
        assert_eq!(store.flushes(), base + 2, "deleting intent flushed");
        store.remove_volume(&id).unwrap();
        store.flush().unwrap();
        assert_eq!(
            store.flushes(),
            base + 3,
            "an explicit flush covers the removal"
        );
        store.flush().unwrap();
        assert_eq!(store.flushes(), base + 3, "nothing left to flush");
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let id = VolumeId::generate();
        {
            let store = Store::open(&path).unwrap();
            store.insert_volume(&new(&id, "kept")).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.volume_by_name("kept").unwrap().unwrap().id, id);
    }
}
