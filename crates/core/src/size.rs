//! Human sizes (`1Gi`, `500M`, `4096`) for configuration files.

use crate::{Error, Result};

/// Parses a byte count with an optional binary (Ki, Mi, Gi, Ti) or decimal (K, M, G, T) suffix.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| Error::invalid(format!("size {s:?} does not start with a number")))?;
    let mult: u64 = match suffix {
        "" => 1,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => {
            return Err(Error::invalid(format!(
                "size {s:?} has an unknown unit {other:?}"
            )))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::invalid(format!("size {s:?} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1Ki").unwrap(), 1024);
        assert_eq!(parse_size("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_size("2M").unwrap(), 2_000_000);
        assert!(parse_size("1Xi").is_err());
        assert!(parse_size("Gi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }
}
