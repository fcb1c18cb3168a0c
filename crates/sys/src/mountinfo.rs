//! Reading this process's mount table (`/proc/self/mountinfo`): only to answer "is this
//! directory mounted anywhere?", which a bind mount elsewhere makes true and no fd can tell.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::{Errno, SysError, SysResult};

/// The mount table as last read, and the open file it was read from.
struct Cached {
    file: File,
    text: String,
}

static TABLE: Mutex<Option<Cached>> = Mutex::new(None);

fn read_error(e: std::io::Error) -> SysError {
    SysError::new(
        "read",
        "\"/proc/self/mountinfo\"",
        Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)),
    )
}

/// Whether the kernel reports a change of this namespace's mount table since the last poll
/// of `file` (or since it was opened): proc's mount files raise POLLPRI and POLLERR once per
/// change (every mount, unmount or propagated mount), then not again until the next one.
fn changed(file: &File) -> SysResult<bool> {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLPRI,
        revents: 0,
    };
    // SAFETY: one valid pollfd for an fd we own, no wait.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n < 0 {
        return Err(SysError::new(
            "poll",
            "\"/proc/self/mountinfo\"",
            Errno::from_raw_os_error(
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO),
            ),
        ));
    }
    Ok(pfd.revents & (libc::POLLPRI | libc::POLLERR) != 0)
}

/// Runs `f` on the text of this process's mount table as it is now. The text is kept and
/// read again only when the kernel says the table changed since: generating it costs the
/// kernel 5-10 µs per mount (150-200 µs here for two dozen mounts), and a DeleteVolume asks
/// for it every time. The change is polled before the text is read, so a mount made while
/// it is read is reported by the next poll and read then.
pub fn with_table<T>(f: impl FnOnce(&str) -> T) -> SysResult<T> {
    let mut table = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    let current = match table.as_ref() {
        Some(cached) => !changed(&cached.file)?,
        None => false,
    };
    if !current {
        let mut file = match table.take() {
            Some(cached) => cached.file,
            None => File::open("/proc/self/mountinfo").map_err(read_error)?,
        };
        // Lossily: a mount path elsewhere that is not UTF-8 must not fail the whole read
        // (stowage compares only its own ASCII names against the table).
        let mut bytes = Vec::with_capacity(64 * 1024);
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.read_to_end(&mut bytes))
            .map_err(read_error)?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        *table = Some(Cached { file, text });
    }
    let cached = table.as_ref().expect("the table was just read");
    Ok(f(&cached.text))
}

/// One line of mountinfo, the fields stowage needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device of the filesystem (makedev of the `major:minor` field).
    pub dev: u64,
    /// The directory of that filesystem the mount shows (bind mounts show a subdirectory).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
}

/// Mount points of this process's namespace whose root, on device `dev`, is the directory
/// named `component` or lies inside it (a bind mount of a volume or of a subPath in it).
/// `component` is one path component, e.g. a volume id.
pub fn mounts_of(dev: u64, component: &str) -> SysResult<Vec<PathBuf>> {
    let text = read()?;
    Ok(parse(&text)
        .filter(|m| m.dev == dev && m.root.iter().any(|c| c == component))
        .map(|m| m.mount_point)
        .collect())
}

/// Mount points in this process's namespace whose mount source is `source` (e.g.
/// `/dev/loop3`). A caller that recognises mounts by the `st_dev` of their root stats one of
/// them: ext4 and xfs show the block device's own number, btrfs an anonymous device of its
/// subvolume that neither the device nor mountinfo's `major:minor` field tells.
pub fn mount_points_from(source: &str) -> SysResult<Vec<PathBuf>> {
    let text = read()?;
    Ok(sources(&text)
        .filter(|(_, s)| *s == Path::new(source))
        .map(|(mount_point, _)| mount_point)
        .collect())
}

/// This process's mount table as text (see [`with_table`]: read again only when it changed,
/// non-UTF-8 bytes replaced).
pub fn read() -> SysResult<String> {
    with_table(str::to_owned)
}

/// `(mount point, mount source)` of each line: the source is the second field after the
/// ` - ` separator (the optional fields before it vary in number).
fn sources(text: &str) -> impl Iterator<Item = (PathBuf, PathBuf)> + '_ {
    text.lines().filter_map(|line| {
        let (head, tail) = line.split_once(" - ")?;
        let mount_point = unescape(head.split(' ').nth(4)?);
        let source = unescape(tail.split(' ').nth(1)?);
        Some((mount_point, source))
    })
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &str) -> impl Iterator<Item = MountEntry> + '_ {
    text.lines().filter_map(|line| {
        let mut fields = line.split(' ');
        let _id = fields.next()?;
        let _parent = fields.next()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let dev = rustix::fs::makedev(major.parse().ok()?, minor.parse().ok()?);
        let root = unescape(fields.next()?);
        let mount_point = unescape(fields.next()?);
        Some(MountEntry {
            dev,
            root,
            mount_point,
        })
    })
}

/// Undoes mountinfo's octal escapes (`\\040` for a space, …).
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_follow_the_separator() {
        let text = "36 35 0:52 / /mnt/b rw,relatime shared:1 master:2 - btrfs /dev/loop3 rw\n\
                    37 35 7:4 / /mnt/x rw - xfs /dev/loop4 rw\n";
        let got: Vec<(PathBuf, PathBuf)> = sources(text).collect();
        assert_eq!(
            got,
            vec![
                (PathBuf::from("/mnt/b"), PathBuf::from("/dev/loop3")),
                (PathBuf::from("/mnt/x"), PathBuf::from("/dev/loop4")),
            ]
        );
    }

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 254:0 /srv/pool/volumes/stw-aa /var/lib/kubelet/pods/x/volumes/mount rw,nosuid,nodev - ext4 /dev/vda rw
41 22 254:0 /srv/pool/volumes/stw-aa/sub /var/lib/kubelet/pods/y/with\\040space rw - ext4 /dev/vda rw
42 22 0:51 /stw-aa /elsewhere rw - tmpfs tmpfs rw
garbage line
";

    #[test]
    fn finds_bind_mounts_of_a_volume_and_of_paths_inside_it() {
        let dev = rustix::fs::makedev(254, 0);
        let found: Vec<PathBuf> = parse(SAMPLE)
            .filter(|m| m.dev == dev && m.root.iter().any(|c| c == "stw-aa"))
            .map(|m| m.mount_point)
            .collect();
        assert_eq!(
            found,
            vec![
                PathBuf::from("/var/lib/kubelet/pods/x/volumes/mount"),
                PathBuf::from("/var/lib/kubelet/pods/y/with space"),
            ]
        );
        assert_eq!(parse(SAMPLE).count(), 4);
    }

    #[test]
    fn a_component_must_match_whole() {
        let dev = rustix::fs::makedev(254, 0);
        assert!(!parse(SAMPLE).any(|m| m.dev == dev && m.root.iter().any(|c| c == "stw-a")));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;
        use std::os::unix::ffi::OsStrExt;

        /// What the kernel writes for a path (`seq_path` with `" \t\n\\"` escaped octal;
        /// every other byte as it is).
        fn escape(path: &str) -> String {
            let mut out = String::new();
            for c in path.chars() {
                if matches!(c, ' ' | '\t' | '\n' | '\\') {
                    out.push_str(&format!("\\{:03o}", c as u32));
                } else {
                    out.push(c);
                }
            }
            out
        }

        fn path_text() -> impl Strategy<Value = String> {
            "(/[^\u{0}/]{0,8}){1,5}"
        }

        proptest! {
            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
                for m in parse(&text) {
                    let _ = (m.dev, m.root, m.mount_point);
                }
                let _ = sources(&text).count();
            }

            #[test]
            fn escaped_paths_round_trip(
                root in path_text(),
                mount_point in path_text(),
                major in 0u32..4096,
                minor in 0u32..1_000_000,
                optional in prop::collection::vec("[a-z]{1,8}:[0-9]{1,4}", 0..3),
            ) {
                let line = format!(
                    "36 35 {major}:{minor} {} {} rw,relatime {} - ext4 /dev/x rw\n",
                    escape(&root),
                    escape(&mount_point),
                    optional.join(" ")
                );
                let got: Vec<MountEntry> = parse(&line).collect();
                prop_assert_eq!(got.len(), 1);
                prop_assert_eq!(got[0].root.as_os_str().as_bytes(), root.as_bytes());
                prop_assert_eq!(got[0].mount_point.as_os_str().as_bytes(), mount_point.as_bytes());
                prop_assert_eq!(got[0].dev, rustix::fs::makedev(major, minor));
                let src: Vec<(PathBuf, PathBuf)> = sources(&line).collect();
                prop_assert_eq!(src[0].0.as_os_str().as_bytes(), mount_point.as_bytes());
            }
        }
    }
}
