//! CSI secrets given to `ctl` and `bench`, kept out of every output.
//!
//! Sources, in order of precedence (the first present wins, they are not merged so that
//! it is always clear which secrets were sent):
//!
//! 1. `--secrets-file FILE`: either a JSON object of string values, or lines of
//!    `key=value` (blank lines and lines starting with `#` are ignored; the key is trimmed,
//!    the value is taken verbatim after the first `=`).
//! 2. The environment variable `CSI_SECRETS`: `key=value,key=value` (values cannot contain
//!    commas; use a file for those).
//!
//! The CSI spec requires the CO to treat secrets as sensitive ("not logged, etc."), so
//! [`Secrets`] prints as a count of entries, parse errors quote line numbers but never
//! line contents, and [`Secrets::redact`] scrubs values out of messages that come back from
//! a driver, in case the driver echoes them in an error.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

/// Environment variable holding `key=value,key=value` secrets.
pub const ENV_VAR: &str = "CSI_SECRETS";

/// Values shorter than this are not scrubbed by [`Secrets::redact`]: replacing every `a`
/// or `1` in a message would make it unreadable while protecting nothing meaningful.
const MIN_REDACT_LEN: usize = 4;

/// A secrets map that never shows its values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(HashMap<String, String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets(<{} redacted>)", self.0.len())
    }
}

/// Why secrets could not be loaded. Never contains secret material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretsError(String);

impl fmt::Display for SecretsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SecretsError {}

impl Secrets {
    /// No secrets.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no secrets.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The map to put into a request's `secrets` field.
    pub fn to_map(&self) -> HashMap<String, String> {
        self.0.clone()
    }

    /// Loads secrets from `file` if given, else from the value of `CSI_SECRETS` if given.
    pub fn load(file: Option<&Path>, env_value: Option<&str>) -> Result<Self, SecretsError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                SecretsError(format!("cannot read secrets file {}: {e}", path.display()))
            })?;
            return Self::parse_file(&text)
                .map_err(|e| SecretsError(format!("secrets file {}: {e}", path.display())));
        }
        match env_value {
            Some(v) => Self::parse_env(v).map_err(|e| SecretsError(format!("{ENV_VAR}: {e}"))),
            None => Ok(Self::empty()),
        }
    }

    /// Parses the contents of a secrets file (JSON object or `key=value` lines).
    pub fn parse_file(text: &str) -> Result<Self, SecretsError> {
        if text.trim_start().starts_with('{') {
            return Self::parse_json(text);
        }
        let mut map = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(SecretsError(format!(
                    "line {}: expected key=value",
                    index + 1
                )));
            };
            insert(&mut map, key.trim(), value, &format!("line {}", index + 1))?;
        }
        Ok(Self(map))
    }

    fn parse_json(text: &str) -> Result<Self, SecretsError> {
        // serde_json's error text can quote the offending input; report only its position.
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            SecretsError(format!(
                "invalid JSON at line {} column {}",
                e.line(),
                e.column()
            ))
        })?;
        let serde_json::Value::Object(object) = value else {
            return Err(SecretsError("expected a JSON object".into()));
        };
        let mut map = HashMap::new();
        for (key, value) in object {
            let serde_json::Value::String(value) = value else {
                return Err(SecretsError(format!(
                    "value of key {key:?} must be a string"
                )));
            };
            insert(&mut map, &key, &value, &format!("key {key:?}"))?;
        }
        Ok(Self(map))
    }

    /// Parses `key=value,key=value` as found in `CSI_SECRETS`.
    pub fn parse_env(value: &str) -> Result<Self, SecretsError> {
        let mut map = HashMap::new();
        for (index, item) in value.split(',').enumerate() {
            if item.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = item.split_once('=') else {
                return Err(SecretsError(format!(
                    "entry {}: expected key=value",
                    index + 1
                )));
            };
            insert(&mut map, key.trim(), value, &format!("entry {}", index + 1))?;
        }
        Ok(Self(map))
    }

    /// Replaces every occurrence of a secret value (of at least 4 characters) in `message`
    /// with `<redacted>`. Longest values first, so a value containing another is scrubbed
    /// whole.
    pub fn redact(&self, message: &str) -> String {
        let mut values: Vec<&str> = self
            .0
            .values()
            .map(String::as_str)
            .filter(|v| v.chars().count() >= MIN_REDACT_LEN)
            .collect();
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        let mut out = message.to_owned();
        for v in values {
            if out.contains(v) {
                out = out.replace(v, "<redacted>");
            }
        }
        out
    }
}

fn insert(
    map: &mut HashMap<String, String>,
    key: &str,
    value: &str,
    location: &str,
) -> Result<(), SecretsError> {
    // The spec restricts keys to alphanumerics, '-', '_' and '.'; checking here catches a
    // malformed file early instead of getting an INVALID_ARGUMENT from the driver.
    if key.is_empty() {
        return Err(SecretsError(format!("{location}: empty key")));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(SecretsError(format!(
            "{location}: key may only contain letters, digits, '-', '_' and '.'"
        )));
    }
    if map.insert(key.to_owned(), value.to_owned()).is_some() {
        return Err(SecretsError(format!("{location}: duplicate key {key:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_json_and_env() {
        let s = Secrets::parse_file("# comment\nuser=bob\n\npass=a=b c \r\n").unwrap();
        assert_eq!(s.0.get("user").map(String::as_str), Some("bob"));
        assert_eq!(s.0.get("pass").map(String::as_str), Some("a=b c "));
        let s = Secrets::parse_file("  {\"user\": \"bob\", \"pass\": \"x\"}").unwrap();
        assert_eq!(s.len(), 2);
        let s = Secrets::parse_env("a=1,b=2,").unwrap();
        assert_eq!(s.0.get("b").map(String::as_str), Some("2"));
    }

    #[test]
    fn errors_never_quote_values() {
        let e = Secrets::parse_file("user=bob\nhunter2secret\n").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Secrets::parse_file("{\"a\": \"hunter2secret\", }").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Secrets::parse_file("{\"a\": 5}").unwrap_err();
        assert!(e.to_string().contains("must be a string"), "{e}");
        let e = Secrets::parse_env("a=1,hunter2secret").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn debug_hides_values_and_redact_scrubs() {
        let s = Secrets::parse_env("password=hunter2secret,pin=12").unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert_eq!(dbg, "Secrets(<2 redacted>)");
        assert_eq!(
            s.redact("bad password hunter2secret for 12"),
            "bad password <redacted> for 12"
        );
    }

    #[test]
    fn file_wins_over_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "k=from-file\n").unwrap();
        let s = Secrets::load(Some(&file), Some("k=from-env")).unwrap();
        assert_eq!(s.0.get("k").map(String::as_str), Some("from-file"));
        let s = Secrets::load(None, Some("k=from-env")).unwrap();
        assert_eq!(s.0.get("k").map(String::as_str), Some("from-env"));
        assert!(Secrets::load(None, None).unwrap().is_empty());
    }
}
