//! Parsing and printing of byte sizes and durations given on the command line.
//!
//! Sizes follow the Kubernetes quantity suffixes people already type into PVCs: binary
//! `Ki Mi Gi Ti Pi Ei` (powers of 1024) and decimal `K/k M G T P E` (powers of 1000), an
//! optional trailing `B` (`1GiB`, `1GB`, `512B`), and decimal fractions as long as the result
//! is a whole number of bytes (`1.5Gi`). Results are capped at `i64::MAX` because CSI carries
//! sizes as `int64`. A lower-case `m` is rejected: in Kubernetes it means "milli".

use std::fmt;
use std::time::Duration;

/// Why a size or duration could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn err(msg: impl Into<String>) -> ParseError {
    ParseError(msg.into())
}

/// Parses a byte size such as `1073741824`, `1Gi`, `1.5Gi`, `10G`, `512B` into bytes.
pub fn parse_size(input: &str) -> Result<u64, ParseError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty size"));
    }
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(num_end);
    let unit = unit.trim_start();
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        "Pi" | "PiB" => 1 << 50,
        "Ei" | "EiB" => 1 << 60,
        "K" | "k" | "KB" | "kB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "P" | "PB" => 1_000_000_000_000_000,
        "E" | "EB" => 1_000_000_000_000_000_000,
        _ => {
            return Err(err(format!(
                "invalid size {input:?}: unknown unit {unit:?} (use bytes or Ki, Mi, Gi, Ti, Pi, Ei, K, M, G, T, P, E)"
            )))
        }
    };
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(err(format!("invalid size {input:?}: no number")));
    }
    if frac_part.contains('.') {
        return Err(err(format!("invalid size {input:?}: more than one '.'")));
    }
    let too_large = || {
        err(format!(
            "invalid size {input:?}: larger than {} bytes",
            i64::MAX
        ))
    };
    let int_value: u64 = if int_part.is_empty() {
        0
    } else {
        int_part.parse().map_err(|_| too_large())?
    };
    let mut bytes = int_value.checked_mul(multiplier).ok_or_else(too_large)?;
    if !frac_part.is_empty() {
        // Exact integer arithmetic: frac * multiplier / 10^digits must divide evenly, so
        // "1.5Gi" is accepted and "1.5" (half a byte) is not, without float rounding.
        let digits = u32::try_from(frac_part.len()).map_err(|_| too_large())?;
        let denominator = 10u128.checked_pow(digits).ok_or_else(too_large)?;
        let frac: u128 = frac_part.parse().map_err(|_| too_large())?;
        let scaled = frac * u128::from(multiplier);
        if !scaled.is_multiple_of(denominator) {
            return Err(err(format!(
                "invalid size {input:?}: not a whole number of bytes"
            )));
        }
        let extra = u64::try_from(scaled / denominator).map_err(|_| too_large())?;
        bytes = bytes.checked_add(extra).ok_or_else(too_large)?;
    }
    if bytes > i64::MAX as u64 {
        return Err(too_large());
    }
    Ok(bytes)
}

/// [`parse_size`] returning `i64`, the type CSI uses on the wire; usable as a clap
/// `value_parser`.
pub fn parse_size_i64(input: &str) -> Result<i64, ParseError> {
    // parse_size already rejects anything above i64::MAX.
    parse_size(input).and_then(|b| i64::try_from(b).map_err(|_| err("size too large")))
}

/// Formats bytes for people: `512 B`, `1 KiB`, `1.5 GiB`. Exact values get no decimals so
/// that a round `1Gi` reads back as `1 GiB`.
pub fn format_size(bytes: i64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 0 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    let mut divisor: u64 = 1;
    let b = bytes as u64;
    while unit + 1 < UNITS.len() && b >= divisor * 1024 {
        divisor *= 1024;
        unit += 1;
    }
    if b.is_multiple_of(divisor) {
        format!("{} {}", b / divisor, UNITS[unit])
    } else {
        // Precision loss only affects the printed decimals.
        format!("{:.1} {}", b as f64 / divisor as f64, UNITS[unit])
    }
}

/// Parses a duration: `30s`, `500ms`, `2m`, `1h`, `250us`, or a plain number of seconds.
pub fn parse_duration(input: &str) -> Result<Duration, ParseError> {
    let s = input.trim();
    let num_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(num_end);
    if number.is_empty() {
        return Err(err(format!("invalid duration {input:?}: no number")));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| err(format!("invalid duration {input:?}")))?;
    let seconds = match unit.trim_start() {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(err(format!(
                "invalid duration {input:?}: unknown unit {other:?} (use us, ms, s, m, h)"
            )))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| err(format!("invalid duration {input:?}")))
}

/// Formats a latency compactly for tables: `850µs`, `12.3ms`, `1.20s`.
pub fn format_duration(d: Duration) -> String {
    let micros = d.as_secs_f64() * 1e6;
    if micros < 1000.0 {
        format!("{micros:.0}µs")
    } else if micros < 1e6 {
        format!("{:.1}ms", micros / 1e3)
    } else {
        format!("{:.2}s", micros / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_table() {
        let ok: &[(&str, u64)] = &[
            ("0", 0),
            ("1", 1),
            ("1073741824", 1 << 30),
            ("512B", 512),
            ("1Ki", 1024),
            ("1KiB", 1024),
            ("1Mi", 1 << 20),
            ("1Gi", 1 << 30),
            ("10Gi", 10 << 30),
            ("1Ti", 1 << 40),
            ("1Pi", 1 << 50),
            ("1Ei", 1 << 60),
            ("1K", 1_000),
            ("1k", 1_000),
            ("1M", 1_000_000),
            ("1G", 1_000_000_000),
            ("1GB", 1_000_000_000),
            ("1T", 1_000_000_000_000),
            ("1.5Gi", 1_610_612_736),
            ("0.5Ki", 512),
            (".5Ki", 512),
            ("2.25K", 2_250),
            (" 1 Gi ", 1 << 30),
            ("7Ei", 7 << 60),
            ("9223372036854775807", i64::MAX as u64),
        ];
        for (input, want) in ok {
            assert_eq!(parse_size(input), Ok(*want), "input {input:?}");
        }
        let bad = [
            "",
            "Gi",
            "-1",
            "1.5",
            "1.2.3Gi",
            "1Xi",
            "1m",
            "1gi",
            "1 Gi B",
            "8Ei",
            "9223372036854775808",
            "99999999999999999999999",
            "1e9",
            "0.0000001Ki",
        ];
        for input in bad {
            assert!(parse_size(input).is_err(), "input {input:?} should fail");
        }
    }

    #[test]
    fn size_errors_name_the_problem() {
        let e = parse_size("3Zi").unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
        let e = parse_size("1.5").unwrap_err().to_string();
        assert!(e.contains("whole number"), "{e}");
    }

    #[test]
    fn size_formatting() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1024), "1 KiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1_610_612_736), "1.5 GiB");
        assert_eq!(format_size(1_000_000_000), "953.7 MiB");
        assert_eq!(format_size(-5), "-5 B");
        // Round trip for exact values.
        for s in ["1 KiB", "3 MiB", "10 GiB", "2 TiB"] {
            let b = parse_size(&s.replace(' ', "")).map(|b| b as i64);
            assert_eq!(b.map(format_size).as_deref(), Ok(s));
        }
    }

    #[test]
    fn duration_table() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn duration_formatting() {
        assert_eq!(format_duration(Duration::from_micros(850)), "850µs");
        assert_eq!(format_duration(Duration::from_micros(12_345)), "12.3ms");
        assert_eq!(format_duration(Duration::from_millis(1200)), "1.20s");
    }
}
