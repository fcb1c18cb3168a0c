//! btrfs ioctls on directory fds, for the `btrfs` pool: subvolumes (create, destroy by name
//! or by id, id of an fd, children of a subvolume) and quotas (enable, status, qgroup
//! create/remove/limit/assign, the quota tree's counters and relations).
//!
//! A qgroup id is `level << 48 | id` as the kernel has it: a subvolume's level-0 qgroup id
//! is the subvolume id itself; [`qgroup_id`] makes a higher level's.
//!
//! Struct layouts and ioctl numbers are the kernel's uapi (`linux/btrfs.h`,
//! `linux/btrfs_tree.h`); each layout is checked by size at compile time. Items read with
//! BTRFS_IOC_TREE_SEARCH are on-disk items, little-endian.
//!
//! Qgroup counters are read from the quota tree with BTRFS_IOC_TREE_SEARCH rather than from
//! `/sys/fs/btrfs/<fsid>/qgroups/`: one ioctl answers for many qgroups at once (GetCapacity
//! needs all of them), it needs no sysfs in the driver's mount namespace, and there is no
//! path or text to parse. Both show the figures of the last transaction commit.

use std::os::fd::{AsFd, BorrowedFd};

use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode, Setter, Updater};

use crate::fs::fd_desc;
use crate::{SysError, SysResult};

/// The inode number of every subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
pub const SUBVOLUME_ROOT_INO: u64 = 256;
/// The filesystem's top-level subvolume (BTRFS_FS_TREE_OBJECTID).
pub const TOP_LEVEL_SUBVOLUME: u64 = 5;

/// How the filesystem accounts quotas, from the quota tree's status item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// Quotas are off (no quota tree): limits are not enforced.
    Off,
    /// Full qgroups: shared extents are tracked exactly, at a cost on every extent change.
    Qgroups {
        /// The counters need a rescan to be exact (BTRFS_QGROUP_STATUS_FLAG_INCONSISTENT).
        inconsistent: bool,
    },
    /// Simple quotas (Linux 6.7): an extent is charged to the subvolume that wrote it, for
    /// its whole life.
    Simple,
}

/// The id of qgroup `<level>/<id>` (`level << 48 | id`); level 0 is a subvolume's own.
#[must_use]
pub const fn qgroup_id(level: u16, id: u64) -> u64 {
    ((level as u64) << 48) | (id & ((1 << 48) - 1))
}

/// `<level>/<id>` of qgroup id `qgroup`, as `btrfs qgroup show` writes it.
#[must_use]
pub fn qgroup_name(qgroup: u64) -> String {
    format!("{}/{}", qgroup >> 48, qgroup & ((1 << 48) - 1))
}

/// One qgroup: its counters, its referenced-bytes limit and the qgroups it is a member of.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Qgroup {
    /// The qgroup id (`level << 48 | id`; for level 0, the subvolume id).
    pub id: u64,
    /// Bytes referenced by the qgroup (for a higher level: by its members together).
    pub referenced: u64,
    /// Bytes only it references.
    pub exclusive: u64,
    /// Limit on `referenced` (None: no limit).
    pub max_referenced: Option<u64>,
    /// Ids of the qgroups it is a member of.
    pub parents: Vec<u64>,
}

impl Qgroup {
    /// The qgroup's level (0: a subvolume's own).
    #[must_use]
    pub fn level(&self) -> u16 {
        (self.id >> 48) as u16
    }
}

/// Kernel ABI of `linux/btrfs.h` and `linux/btrfs_tree.h`.
mod raw {
    use super::{opcode, Opcode};

    const MAGIC: u8 = 0x94;

    /// `struct btrfs_ioctl_vol_args_v2`. The two unions are flattened: `unused` holds the
    /// (size, qgroup_inherit) pair, `name` also holds a subvolume id (native endian, first 8
    /// bytes) when BTRFS_SUBVOL_SPEC_BY_ID is set.
    #[repr(C)]
    pub(super) struct VolArgsV2 {
        pub(super) fd: i64,
        pub(super) transid: u64,
        pub(super) flags: u64,
        pub(super) unused: [u64; 4],
        pub(super) name: [u8; 4040],
    }

    /// `struct btrfs_ioctl_ino_lookup_args`.
    #[repr(C)]
    pub(super) struct InoLookupArgs {
        pub(super) treeid: u64,
        pub(super) objectid: u64,
        pub(super) name: [u8; 4080],
    }

    /// `struct btrfs_ioctl_search_key`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub(super) struct SearchKey {
        pub(super) tree_id: u64,
        pub(super) min_objectid: u64,
        pub(super) max_objectid: u64,
        pub(super) min_offset: u64,
        pub(super) max_offset: u64,
        pub(super) min_transid: u64,
        pub(super) max_transid: u64,
        pub(super) min_type: u32,
        pub(super) max_type: u32,
        pub(super) nr_items: u32,
        pub(super) unused: u32,
        pub(super) unused1: [u64; 4],
    }

    pub(super) const SEARCH_BUF: usize = 4096 - size_of::<SearchKey>();

    /// `struct btrfs_ioctl_search_args`.
    #[repr(C)]
    pub(super) struct SearchArgs {
        pub(super) key: SearchKey,
        pub(super) buf: [u8; SEARCH_BUF],
    }

    /// `struct btrfs_ioctl_search_header`, found unaligned in `SearchArgs::buf`.
    pub(super) const SEARCH_HEADER_LEN: usize = 32;

    /// `struct btrfs_ioctl_quota_ctl_args`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(super) struct QuotaCtlArgs {
        pub(super) cmd: u64,
        pub(super) status: u64,
    }

    /// `struct btrfs_ioctl_qgroup_create_args`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(super) struct QgroupCreateArgs {
        pub(super) create: u64,
        pub(super) qgroupid: u64,
    }

    /// `struct btrfs_ioctl_qgroup_assign_args`.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(super) struct QgroupAssignArgs {
        pub(super) assign: u64,
        pub(super) src: u64,
        pub(super) dst: u64,
    }

    /// `struct btrfs_ioctl_qgroup_limit_args` with its `struct btrfs_qgroup_limit` inline.
    #[repr(C)]
    #[derive(Debug, Default)]
    pub(super) struct QgroupLimitArgs {
        pub(super) qgroupid: u64,
        pub(super) flags: u64,
        pub(super) max_rfer: u64,
        pub(super) max_excl: u64,
        pub(super) rsv_rfer: u64,
        pub(super) rsv_excl: u64,
    }

    const _: () = assert!(size_of::<VolArgsV2>() == 4096);
    const _: () = assert!(size_of::<InoLookupArgs>() == 4096);
    const _: () = assert!(size_of::<SearchKey>() == 104);
    const _: () = assert!(size_of::<SearchArgs>() == 4096);
    const _: () = assert!(size_of::<QuotaCtlArgs>() == 16);
    const _: () = assert!(size_of::<QgroupCreateArgs>() == 16);
    const _: () = assert!(size_of::<QgroupLimitArgs>() == 48);
    const _: () = assert!(size_of::<QgroupAssignArgs>() == 24);

    pub(super) const IOC_TREE_SEARCH: Opcode = opcode::read_write::<SearchArgs>(MAGIC, 17);
    pub(super) const IOC_INO_LOOKUP: Opcode = opcode::read_write::<InoLookupArgs>(MAGIC, 18);
    pub(super) const IOC_SNAP_CREATE_V2: Opcode = opcode::write::<VolArgsV2>(MAGIC, 23);
    pub(super) const IOC_SUBVOL_CREATE_V2: Opcode = opcode::write::<VolArgsV2>(MAGIC, 24);
    pub(super) const IOC_QUOTA_CTL: Opcode = opcode::read_write::<QuotaCtlArgs>(MAGIC, 40);
    pub(super) const IOC_QGROUP_ASSIGN: Opcode = opcode::write::<QgroupAssignArgs>(MAGIC, 41);
    pub(super) const IOC_QGROUP_CREATE: Opcode = opcode::write::<QgroupCreateArgs>(MAGIC, 42);
    // The uapi declares it _IOR although the kernel only reads the argument.
    pub(super) const IOC_QGROUP_LIMIT: Opcode = opcode::read::<QgroupLimitArgs>(MAGIC, 43);
    pub(super) const IOC_SNAP_DESTROY_V2: Opcode = opcode::write::<VolArgsV2>(MAGIC, 63);

    pub(super) const SUBVOL_QGROUP_INHERIT: u64 = 1 << 2;
    pub(super) const SUBVOL_SPEC_BY_ID: u64 = 1 << 4;
    /// BTRFS_SUBVOL_RDONLY: the new snapshot is read-only.
    pub(super) const SUBVOL_RDONLY: u64 = 1 << 1;
    pub(super) const QUOTA_CTL_ENABLE: u64 = 1;
    pub(super) const QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;
    pub(super) const QGROUP_LIMIT_MAX_RFER: u64 = 1;

    pub(super) const ROOT_TREE_OBJECTID: u64 = 1;
    pub(super) const QUOTA_TREE_OBJECTID: u64 = 8;
    pub(super) const ROOT_REF_KEY: u32 = 156;
    pub(super) const QGROUP_STATUS_KEY: u32 = 240;
    pub(super) const QGROUP_INFO_KEY: u32 = 242;
    pub(super) const QGROUP_LIMIT_KEY: u32 = 244;
    pub(super) const QGROUP_RELATION_KEY: u32 = 246;

    pub(super) const QGROUP_STATUS_FLAG_ON: u64 = 1;
    pub(super) const QGROUP_STATUS_FLAG_INCONSISTENT: u64 = 1 << 2;
    pub(super) const QGROUP_STATUS_FLAG_SIMPLE_MODE: u64 = 1 << 3;
}

fn ioctl_error(fd: BorrowedFd<'_>, what: String, errno: Errno) -> SysError {
    SysError::new("ioctl", format!("{}, {what}", fd_desc(fd)), errno)
}

/// The `vol_args_v2` of a subvolume named `name` (one path component).
fn vol_args_named(name: &str) -> SysResult<raw::VolArgsV2> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() > 255
        || bytes.contains(&0)
        || bytes.contains(&b'/')
        || name == "."
        || name == ".."
    {
        return Err(SysError::new(
            "btrfs",
            format!("{name:?}: not a single path component"),
            Errno::INVAL,
        ));
    }
    let mut args = raw::VolArgsV2 {
        fd: 0,
        transid: 0,
        flags: 0,
        unused: [0; 4],
        name: [0; 4040],
    };
    args.name[..bytes.len()].copy_from_slice(bytes);
    Ok(args)
}

/// Creates subvolume `name` in directory `dir` (BTRFS_IOC_SUBVOL_CREATE_V2, no qgroup
/// inheritance). EEXIST when the name is taken.
pub fn create_subvolume(dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
    let args = vol_args_named(name)?;
    // SAFETY: BTRFS_IOC_SUBVOL_CREATE_V2 is _IOW(0x94, 24, struct btrfs_ioctl_vol_args_v2): the
    // kernel reads exactly one VolArgsV2 (4096 bytes, layout checked above), which Setter
    // holds; the qgroup_inherit pointer in `unused` is null, so nothing else is read.
    let setter = unsafe { Setter::<{ raw::IOC_SUBVOL_CREATE_V2 }, _>::new(args) };
    // SAFETY: the opcode and argument type agree (see above); `dir` is open for the call.
    unsafe { rustix::ioctl::ioctl(dir, setter) }
        .map_err(|e| ioctl_error(dir, format!("BTRFS_IOC_SUBVOL_CREATE_V2 {name:?}"), e))
}

/// Creates subvolume `name` in directory `dir` with an explicit qgroup inheritance list
/// (BTRFS_IOC_SUBVOL_CREATE_V2 with BTRFS_SUBVOL_QGROUP_INHERIT): the new subvolume's qgroup
/// joins exactly `qgroups` (higher-level qgroup ids; empty: none at all, which also turns off
/// the kernel's own inheritance under simple quotas). No privilege is needed — any process
/// that may create a subvolume may do this. The driver never does; tests use it to act as a
/// hostile pod.
pub fn create_subvolume_inheriting(
    dir: BorrowedFd<'_>,
    name: &str,
    qgroups: &[u64],
) -> SysResult<()> {
    // struct btrfs_qgroup_inherit: flags, num_qgroups, num_ref_copies, num_excl_copies,
    // struct btrfs_qgroup_limit (5 u64), then num_qgroups u64 ids.
    const HEADER: usize = 9;
    if qgroups.len() > 256 {
        return Err(SysError::new(
            "btrfs",
            "too many qgroups to inherit",
            Errno::INVAL,
        ));
    }
    let mut inherit = vec![0u64; HEADER + qgroups.len()];
    inherit[1] = qgroups.len() as u64;
    inherit[HEADER..].copy_from_slice(qgroups);
    let mut args = vol_args_named(name)?;
    args.flags = raw::SUBVOL_QGROUP_INHERIT;
    args.unused[0] = (inherit.len() * 8) as u64;
    args.unused[1] = inherit.as_ptr() as u64;
    // SAFETY: BTRFS_IOC_SUBVOL_CREATE_V2 is _IOW(0x94, 24, struct btrfs_ioctl_vol_args_v2): the
    // kernel reads one VolArgsV2, which Setter holds, and, BTRFS_SUBVOL_QGROUP_INHERIT being
    // set, `size` bytes at the qgroup_inherit pointer: `inherit`, exactly that long, alive
    // and unmoved until the call returns.
    let setter = unsafe { Setter::<{ raw::IOC_SUBVOL_CREATE_V2 }, _>::new(args) };
    // SAFETY: the opcode and argument type agree (see above); `dir` is open for the call.
    let r = unsafe { rustix::ioctl::ioctl(dir, setter) }.map_err(|e| {
        ioctl_error(
            dir,
            format!("BTRFS_IOC_SUBVOL_CREATE_V2 {name:?} inheriting {qgroups:?}"),
            e,
        )
    });
    drop(inherit);
    r
}

/// Makes `name` in directory `dir` a snapshot of the subvolume open at `source`
/// (BTRFS_IOC_SNAP_CREATE_V2), read-only when `readonly` (BTRFS_SUBVOL_RDONLY). EEXIST when
/// the name is taken. Subvolumes nested in the source are not part of it (btrfs snapshots
/// stop at subvolume boundaries: they appear as empty directories).
pub fn create_snapshot(
    dir: BorrowedFd<'_>,
    name: &str,
    source: BorrowedFd<'_>,
    readonly: bool,
) -> SysResult<()> {
    let mut args = vol_args_named(name)?;
    args.fd = i64::from(std::os::fd::AsRawFd::as_raw_fd(&source));
    if readonly {
        args.flags |= raw::SUBVOL_RDONLY;
    }
    // SAFETY: BTRFS_IOC_SNAP_CREATE_V2 is _IOW(0x94, 23, struct btrfs_ioctl_vol_args_v2): the
    // kernel reads one VolArgsV2, which Setter holds; `fd` names `source`, open for the call,
    // and the qgroup_inherit pointer is null.
    let setter = unsafe { Setter::<{ raw::IOC_SNAP_CREATE_V2 }, _>::new(args) };
    // SAFETY: the opcode and argument type agree (see above); `dir` is open for the call.
    unsafe { rustix::ioctl::ioctl(dir, setter) }
        .map_err(|e| ioctl_error(dir, format!("BTRFS_IOC_SNAP_CREATE_V2 {name:?}"), e))
}

/// Destroys subvolume `name` in directory `dir` (BTRFS_IOC_SNAP_DESTROY_V2). ENOTEMPTY when it
/// holds other subvolumes, EINVAL when `name` is not a subvolume, ENOENT when absent.
pub fn destroy_subvolume(dir: BorrowedFd<'_>, name: &str) -> SysResult<()> {
    let args = vol_args_named(name)?;
    // SAFETY: BTRFS_IOC_SNAP_DESTROY_V2 is _IOW(0x94, 63, struct btrfs_ioctl_vol_args_v2): the
    // kernel reads one VolArgsV2, which Setter holds.
    let setter = unsafe { Setter::<{ raw::IOC_SNAP_DESTROY_V2 }, _>::new(args) };
    // SAFETY: the opcode and argument type agree (see above); `dir` is open for the call.
    unsafe { rustix::ioctl::ioctl(dir, setter) }
        .map_err(|e| ioctl_error(dir, format!("BTRFS_IOC_SNAP_DESTROY_V2 {name:?}"), e))
}

/// Destroys the subvolume with id `subvolume`, wherever it is on the filesystem holding `fs`
/// (BTRFS_IOC_SNAP_DESTROY_V2 with BTRFS_SUBVOL_SPEC_BY_ID). ENOENT when absent.
pub fn destroy_subvolume_id(fs: BorrowedFd<'_>, subvolume: u64) -> SysResult<()> {
    let mut args = raw::VolArgsV2 {
        fd: 0,
        transid: 0,
        flags: raw::SUBVOL_SPEC_BY_ID,
        unused: [0; 4],
        name: [0; 4040],
    };
    args.name[..8].copy_from_slice(&subvolume.to_ne_bytes());
    // SAFETY: as in destroy_subvolume; the id sits in the union's first 8 bytes.
    let setter = unsafe { Setter::<{ raw::IOC_SNAP_DESTROY_V2 }, _>::new(args) };
    // SAFETY: the opcode and argument type agree (see above); `fs` is open for the call.
    unsafe { rustix::ioctl::ioctl(fs, setter) }.map_err(|e| {
        ioctl_error(
            fs,
            format!("BTRFS_IOC_SNAP_DESTROY_V2 subvolume id {subvolume}"),
            e,
        )
    })
}

/// The id of the subvolume holding `fd` (BTRFS_IOC_INO_LOOKUP of the subvolume root; no
/// privilege needed for that query).
pub fn subvolume_id(fd: BorrowedFd<'_>) -> SysResult<u64> {
    let mut args = raw::InoLookupArgs {
        treeid: 0,
        objectid: SUBVOLUME_ROOT_INO,
        name: [0; 4080],
    };
    // SAFETY: BTRFS_IOC_INO_LOOKUP is _IOWR(0x94, 18, struct btrfs_ioctl_ino_lookup_args): the
    // kernel reads and writes one InoLookupArgs, which `args` is, borrowed for the call.
    let updater = unsafe { Updater::<{ raw::IOC_INO_LOOKUP }, _>::new(&mut args) };
    // SAFETY: the opcode and argument type agree (see above); `fd` is open for the call.
    unsafe { rustix::ioctl::ioctl(fd, updater) }
        .map_err(|e| ioctl_error(fd, "BTRFS_IOC_INO_LOOKUP".to_owned(), e))?;
    Ok(args.treeid)
}

/// One item found by [`tree_search`].
struct Item {
    objectid: u64,
    kind: u32,
    offset: u64,
    data: Vec<u8>,
}

fn le64(data: &[u8], at: usize) -> u64 {
    data.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn ne32(data: &[u8], at: usize) -> u32 {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

fn ne64(data: &[u8], at: usize) -> u64 {
    data.get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

/// Every item of tree `tree` with a key between (objectid, kind, offset) `min` and `max`,
/// compared as whole keys (BTRFS_IOC_TREE_SEARCH, in batches; needs CAP_SYS_ADMIN).
fn tree_search(
    fs: BorrowedFd<'_>,
    tree: u64,
    min: (u64, u32, u64),
    max: (u64, u32, u64),
) -> SysResult<Vec<Item>> {
    let mut items = Vec::new();
    let mut next = min;
    loop {
        let mut args = raw::SearchArgs {
            key: raw::SearchKey {
                tree_id: tree,
                min_objectid: next.0,
                max_objectid: max.0,
                min_type: next.1,
                max_type: max.1,
                min_offset: next.2,
                max_offset: max.2,
                min_transid: 0,
                max_transid: u64::MAX,
                nr_items: u32::MAX,
                ..raw::SearchKey::default()
            },
            buf: [0; raw::SEARCH_BUF],
        };
        // SAFETY: BTRFS_IOC_TREE_SEARCH is _IOWR(0x94, 17, struct btrfs_ioctl_search_args): the
        // kernel reads the key and writes at most SEARCH_BUF bytes of items into `buf`, all
        // inside `args`, which is borrowed for the call.
        let updater = unsafe { Updater::<{ raw::IOC_TREE_SEARCH }, _>::new(&mut args) };
        // SAFETY: the opcode and argument type agree (see above); `fs` is open for the call.
        unsafe { rustix::ioctl::ioctl(fs, updater) }
            .map_err(|e| ioctl_error(fs, format!("BTRFS_IOC_TREE_SEARCH tree {tree}"), e))?;
        let found = args.key.nr_items;
        if found == 0 {
            return Ok(items);
        }
        let mut at = 0;
        let mut last = next;
        for _ in 0..found {
            let header = &args.buf[at..at + raw::SEARCH_HEADER_LEN];
            let objectid = ne64(header, 8);
            let offset = ne64(header, 16);
            let kind = ne32(header, 24);
            let len = ne32(header, 28) as usize;
            at += raw::SEARCH_HEADER_LEN;
            let data = args.buf.get(at..at + len).unwrap_or_default().to_vec();
            at += len;
            items.push(Item {
                objectid,
                kind,
                offset,
                data,
            });
            last = (objectid, kind, offset);
        }
        // Continue just after the last key returned.
        next = match last {
            (o, k, off) if off < u64::MAX => (o, k, off + 1),
            (o, k, _) if k < u32::MAX => (o, k + 1, 0),
            (o, _, _) if o < u64::MAX => (o + 1, 0, 0),
            _ => return Ok(items),
        };
        if next > max {
            return Ok(items);
        }
    }
}

/// Ids of the subvolumes directly inside subvolume `parent` (its ROOT_REF items).
pub fn child_subvolumes(fs: BorrowedFd<'_>, parent: u64) -> SysResult<Vec<u64>> {
    let items = tree_search(
        fs,
        raw::ROOT_TREE_OBJECTID,
        (parent, raw::ROOT_REF_KEY, 0),
        (parent, raw::ROOT_REF_KEY, u64::MAX),
    )?;
    Ok(items
        .into_iter()
        .filter(|i| i.objectid == parent && i.kind == raw::ROOT_REF_KEY)
        .map(|i| i.offset)
        .collect())
}

/// Items of the quota tree (status, info and limit items under objectid 0, relation items
/// under the qgroup ids); none (not an error) when quotas are off.
fn quota_items(fs: BorrowedFd<'_>) -> SysResult<Vec<Item>> {
    match tree_search(
        fs,
        raw::QUOTA_TREE_OBJECTID,
        (0, raw::QGROUP_STATUS_KEY, 0),
        (u64::MAX, raw::QGROUP_RELATION_KEY, u64::MAX),
    ) {
        // No quota tree: quotas were never enabled, or were disabled.
        Err(e) if e.errno == Errno::NOENT => Ok(Vec::new()),
        other => other,
    }
}

/// How quotas are accounted on the filesystem holding `fs`.
pub fn quota_mode(fs: BorrowedFd<'_>) -> SysResult<QuotaMode> {
    let items = quota_items(fs)?;
    let Some(status) = items
        .iter()
        .find(|i| i.kind == raw::QGROUP_STATUS_KEY && i.objectid == 0)
    else {
        return Ok(QuotaMode::Off);
    };
    // btrfs_qgroup_status_item: version, generation, flags, rescan (, enable_gen).
    let flags = le64(&status.data, 16);
    Ok(if flags & raw::QGROUP_STATUS_FLAG_ON == 0 {
        QuotaMode::Off
    } else if flags & raw::QGROUP_STATUS_FLAG_SIMPLE_MODE != 0 {
        QuotaMode::Simple
    } else {
        QuotaMode::Qgroups {
            inconsistent: flags & raw::QGROUP_STATUS_FLAG_INCONSISTENT != 0,
        }
    })
}

/// Every qgroup of the filesystem holding `fs` (its info and limit items, and the qgroups it
/// is a member of), by qgroup id. Empty when quotas are off.
pub fn qgroups(fs: BorrowedFd<'_>) -> SysResult<Vec<Qgroup>> {
    let mut out: Vec<Qgroup> = Vec::new();
    let mut relations = Vec::new();
    for item in quota_items(fs)? {
        if item.kind == raw::QGROUP_RELATION_KEY {
            // Stored both ways; the member's id is the lower one (a lower level).
            if item.objectid < item.offset {
                relations.push((item.objectid, item.offset));
            }
            continue;
        }
        if item.objectid != 0
            || (item.kind != raw::QGROUP_INFO_KEY && item.kind != raw::QGROUP_LIMIT_KEY)
        {
            continue;
        }
        let entry = match out.iter_mut().position(|q| q.id == item.offset) {
            Some(i) => &mut out[i],
            None => {
                out.push(Qgroup {
                    id: item.offset,
                    ..Qgroup::default()
                });
                out.last_mut().expect("just pushed")
            }
        };
        match item.kind {
            // btrfs_qgroup_info_item: generation, rfer, rfer_cmpr, excl, excl_cmpr.
            raw::QGROUP_INFO_KEY => {
                entry.referenced = le64(&item.data, 8);
                entry.exclusive = le64(&item.data, 24);
            }
            // btrfs_qgroup_limit_item: flags, max_rfer, max_excl, rsv_rfer, rsv_excl.
            _ => {
                let flags = le64(&item.data, 0);
                entry.max_referenced =
                    (flags & raw::QGROUP_LIMIT_MAX_RFER != 0).then(|| le64(&item.data, 8));
            }
        }
    }
    for (member, parent) in relations {
        if let Some(q) = out.iter_mut().find(|q| q.id == member) {
            q.parents.push(parent);
        }
    }
    Ok(out)
}

/// Turns quotas on for the filesystem holding `fs` (BTRFS_IOC_QUOTA_CTL): simple quotas when
/// `simple`, full qgroups otherwise. Quotas already on, in either mode, are left as they are.
pub fn enable_quota(fs: BorrowedFd<'_>, simple: bool) -> SysResult<()> {
    let cmd = if simple {
        raw::QUOTA_CTL_ENABLE_SIMPLE_QUOTA
    } else {
        raw::QUOTA_CTL_ENABLE
    };
    let mut args = raw::QuotaCtlArgs { cmd, status: 0 };
    // SAFETY: BTRFS_IOC_QUOTA_CTL is _IOWR(0x94, 40, struct btrfs_ioctl_quota_ctl_args): one
    // QuotaCtlArgs, which `args` is, borrowed for the call.
    let updater = unsafe { Updater::<{ raw::IOC_QUOTA_CTL }, _>::new(&mut args) };
    // SAFETY: the opcode and argument type agree (see above); `fs` is open for the call.
    unsafe { rustix::ioctl::ioctl(fs, updater) }.map_err(|e| {
        let what = if simple {
            "BTRFS_IOC_QUOTA_CTL ENABLE_SIMPLE_QUOTA"
        } else {
            "BTRFS_IOC_QUOTA_CTL ENABLE"
        };
        ioctl_error(fs, what.to_owned(), e)
    })
}

/// Creates (`create`) or removes qgroup `qgroup` (an id of [`qgroup_id`]; a subvolume id is
/// its level-0 qgroup) (BTRFS_IOC_QGROUP_CREATE). Removal is EBUSY while the qgroup has
/// members, or (level 0) while it references bytes (its subvolume, even destroyed, is not
/// yet dropped by the cleaner) and, on Linux 6.8 and later, while its subvolume exists.
pub fn qgroup_create(fs: BorrowedFd<'_>, qgroup: u64, create: bool) -> SysResult<()> {
    let args = raw::QgroupCreateArgs {
        create: u64::from(create),
        qgroupid: qgroup,
    };
    // SAFETY: BTRFS_IOC_QGROUP_CREATE is _IOW(0x94, 42, struct btrfs_ioctl_qgroup_create_args):
    // the kernel reads one QgroupCreateArgs, which Setter holds.
    let setter = unsafe { Setter::<{ raw::IOC_QGROUP_CREATE }, _>::new(args) };
    // SAFETY: the opcode and argument type agree (see above); `fs` is open for the call.
    unsafe { rustix::ioctl::ioctl(fs, setter) }.map_err(|e| {
        let op = if create { "create" } else { "remove" };
        ioctl_error(
            fs,
            format!(
                "BTRFS_IOC_QGROUP_CREATE ({op}) qgroup {}",
                qgroup_name(qgroup)
            ),
            e,
        )
    })
}

/// Makes qgroup `member` a member of qgroup `parent` (`assign`), or no longer one
/// (BTRFS_IOC_QGROUP_ASSIGN). The parent's counters take (or give back) the member's at once
/// when the member's data is all exclusive; otherwise the kernel marks the counters
/// inconsistent until a rescan. EEXIST when already a member, ENOENT when either qgroup is
/// missing (or, unassigning, when it was not a member).
pub fn qgroup_assign(fs: BorrowedFd<'_>, member: u64, parent: u64, assign: bool) -> SysResult<()> {
    let args = raw::QgroupAssignArgs {
        assign: u64::from(assign),
        src: member,
        dst: parent,
    };
    // SAFETY: BTRFS_IOC_QGROUP_ASSIGN is _IOW(0x94, 41, struct btrfs_ioctl_qgroup_assign_args):
    // the kernel reads one QgroupAssignArgs (24 bytes, layout checked above), which Setter
    // holds.
    let setter = unsafe { Setter::<{ raw::IOC_QGROUP_ASSIGN }, _>::new(args) };
    // SAFETY: the opcode and argument type agree (see above); `fs` is open for the call.
    unsafe { rustix::ioctl::ioctl(fs, setter) }.map_err(|e| {
        let op = if assign { "assign" } else { "remove" };
        ioctl_error(
            fs,
            format!(
                "BTRFS_IOC_QGROUP_ASSIGN ({op}) {} in {}",
                qgroup_name(member),
                qgroup_name(parent)
            ),
            e,
        )
    })
}

/// Sets the referenced-bytes limit of qgroup `qgroup` (BTRFS_IOC_QGROUP_LIMIT, max_rfer); other
/// limits of the qgroup are left as they are. `u64::MAX` removes the limit (the kernel's
/// CLEAR_VALUE).
pub fn qgroup_limit(fs: BorrowedFd<'_>, qgroup: u64, max_referenced: u64) -> SysResult<()> {
    let mut args = raw::QgroupLimitArgs {
        qgroupid: qgroup,
        flags: raw::QGROUP_LIMIT_MAX_RFER,
        max_rfer: max_referenced,
        ..raw::QgroupLimitArgs::default()
    };
    // SAFETY: BTRFS_IOC_QGROUP_LIMIT is declared _IOR(0x94, 43, struct
    // btrfs_ioctl_qgroup_limit_args) and the kernel copies one QgroupLimitArgs *from* user
    // memory; Updater passes a pointer to `args`, a live QgroupLimitArgs borrowed for the call,
    // which the kernel may read (and, by the declared direction, write) in full.
    let updater = unsafe { Updater::<{ raw::IOC_QGROUP_LIMIT }, _>::new(&mut args) };
    // SAFETY: the opcode and argument type agree (see above); `fs` is open for the call.
    unsafe { rustix::ioctl::ioctl(fs, updater) }.map_err(|e| {
        ioctl_error(
            fs,
            format!(
                "BTRFS_IOC_QGROUP_LIMIT qgroup {} max_rfer {max_referenced}",
                qgroup_name(qgroup)
            ),
            e,
        )
    })
}

/// Commits the filesystem holding `fs` (syncfs), which makes subvolume and qgroup changes
/// durable.
pub fn commit(fs: BorrowedFd<'_>) -> SysResult<()> {
    rustix::fs::syncfs(fs.as_fd()).map_err(|e| SysError::new("syncfs", fd_desc(fs), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_the_uapi_values() {
        // _IOW/_IOWR(0x94, nr, 4096-byte struct) and friends, as the C headers compute them.
        assert_eq!(raw::IOC_SUBVOL_CREATE_V2 as u64, 0x5000_9418);
        assert_eq!(raw::IOC_SNAP_CREATE_V2 as u64, 0x5000_9417);
        assert_eq!(raw::IOC_SNAP_DESTROY_V2 as u64, 0x5000_943f);
        assert_eq!(raw::IOC_TREE_SEARCH as u64, 0xd000_9411);
        assert_eq!(raw::IOC_INO_LOOKUP as u64, 0xd000_9412);
        assert_eq!(raw::IOC_QUOTA_CTL as u64, 0xc010_9428);
        assert_eq!(raw::IOC_QGROUP_CREATE as u64, 0x4010_942a);
        assert_eq!(raw::IOC_QGROUP_ASSIGN as u64, 0x4018_9429);
        assert_eq!(raw::IOC_QGROUP_LIMIT as u64, 0x8030_942b);
    }

    #[test]
    fn qgroup_ids_carry_the_level_in_the_top_16_bits() {
        assert_eq!(qgroup_id(0, 257), 257);
        assert_eq!(qgroup_id(1, 257), (1 << 48) | 257);
        assert_eq!(qgroup_name(qgroup_id(1, 257)), "1/257");
        assert_eq!(qgroup_name(5), "0/5");
        let q = Qgroup {
            id: qgroup_id(1, 9),
            ..Qgroup::default()
        };
        assert_eq!(q.level(), 1);
    }

    #[test]
    fn names_must_be_one_component() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert_eq!(
                vol_args_named(bad).err().map(|e| e.errno),
                Some(Errno::INVAL)
            );
        }
        let args = vol_args_named("stw-1").unwrap();
        assert_eq!(&args.name[..6], b"stw-1\0");
    }
}
