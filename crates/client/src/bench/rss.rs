//! The resident set size of another process, from `/proc/PID/status`.

/// Resident set size (`VmRSS`) of `pid` in bytes.
pub(crate) fn read_rss(pid: u32) -> std::io::Result<u64> {
    read_status_field(pid, "VmRSS:")
}

/// Peak resident set size (`VmHWM`) of `pid` in bytes, over the process's whole life.
pub(crate) fn read_peak_rss(pid: u32) -> std::io::Result<u64> {
    read_status_field(pid, "VmHWM:")
}

fn read_status_field(pid: u32, field: &str) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_kb_field(&status, field).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no {field} line in /proc/{pid}/status"),
        )
    })
}

/// Finds `field   1234 kB` and returns bytes.
fn parse_kb_field(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let mut parts = line[field.len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => value.checked_mul(1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status() {
        let status = "Name:\tx\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\n";
        assert_eq!(parse_kb_field(status, "VmRSS:"), Some(1024 * 1024));
        assert_eq!(parse_kb_field(status, "VmHWM:"), Some(2048 * 1024));
        assert_eq!(parse_kb_field(status, "VmSwap:"), None);
    }

    #[test]
    fn reads_own_rss() {
        let rss = read_rss(std::process::id()).unwrap();
        assert!(rss > 0);
        assert!(read_peak_rss(std::process::id()).unwrap() >= rss);
    }
}
