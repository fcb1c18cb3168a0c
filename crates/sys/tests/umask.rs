//! mkdir_at must give exactly the mode asked for whatever the umask. The umask is process-wide,
//! so this runs as its own test binary, where changing it cannot disturb other tests.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;

use rustix::fs::Mode;
use stowage_sys::fs::{mkdir_at, open_trusted_dir};

#[test]
fn mkdir_at_mode_ignores_umask() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fd = open_trusted_dir(dir.path()).expect("open");
    let old = rustix::process::umask(Mode::from_raw_mode(0o077));
    let made =
        mkdir_at(fd.as_fd(), "wide", 0o777).and_then(|()| mkdir_at(fd.as_fd(), "group", 0o2770));
    rustix::process::umask(old);
    made.expect("mkdir_at");
    for (name, want) in [("wide", 0o777), ("group", 0o2770)] {
        let mode = std::fs::metadata(dir.path().join(name))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, want, "{name}");
    }
}
