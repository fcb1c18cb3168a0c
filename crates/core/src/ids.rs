//! Volume identifiers and names. Ids are minted by stowage and have one fixed shape, so an id
//! that could mean a path (`..`, `/x`, a NUL) is never mistaken for one of ours.

use std::fmt;

use crate::{Error, Result};

/// The CSI limit on any string field.
pub const MAX_STRING_BYTES: usize = 128;

const ID_HEX_LEN: usize = 32;

/// Why an id string is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdProblem {
    /// Empty: a required field is missing.
    Missing,
    /// Longer than the CSI string limit or contains a NUL: the request itself is malformed.
    Malformed(String),
    /// A well-formed string that stowage never minted: nothing of ours has it.
    Foreign,
}

/// Checks that `s` is `prefix` followed by 32 lowercase hex digits: the one shape stowage
/// mints, which is a single safe path component.
fn parse_minted(field: &str, prefix: &str, s: &str) -> std::result::Result<(), IdProblem> {
    if s.is_empty() {
        return Err(IdProblem::Missing);
    }
    check_csi_string(field, s).map_err(|e| IdProblem::Malformed(e.to_string()))?;
    let hex = s.strip_prefix(prefix).ok_or(IdProblem::Foreign)?;
    if hex.len() == ID_HEX_LEN && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(IdProblem::Foreign)
    }
}

/// Defines an id type minted by stowage (`$prefix` + 32 hex digits) and the type of a request
/// field carrying one (`$reference`: ours, or a well-formed string naming nothing of ours).
macro_rules! minted_id {
    ($(#[$doc:meta])* $id:ident, $reference:ident, $prefix:literal, $field:literal, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $id(String);

        impl $id {
            /// Mints a fresh random id.
            pub fn generate() -> Self {
                $id(format!("{}{}", $prefix, uuid::Uuid::new_v4().simple()))
            }

            /// Parses an id from a request, telling apart a malformed request from an id
            /// that simply is not ours.
            pub fn parse(s: &str) -> std::result::Result<Self, IdProblem> {
                parse_minted($field, $prefix, s).map(|()| $id(s.to_owned()))
            }

            /// The id as a string; by construction a single safe path component.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The id's string, without a copy.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        #[doc = concat!("A `", $field, "` field as the request carried it: ours, or a string that names no ", $what, ".")]
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $reference {
            /// One of ours (it may since have been deleted).
            Ours($id),
            /// Well-formed but never minted by stowage: nothing of ours has it.
            Foreign(String),
        }

        impl $reference {
            #[doc = concat!("Validates a required `", $field, "` field: missing or malformed is INVALID_ARGUMENT.")]
            pub fn from_request(s: &str) -> Result<Self> {
                Self::from_field($field, s)
            }

            /// Validates a required field named `field` that carries such an id.
            pub fn from_field(field: &str, s: &str) -> Result<Self> {
                match parse_minted(field, $prefix, s) {
                    Ok(()) => Ok($reference::Ours($id(s.to_owned()))),
                    Err(IdProblem::Missing) => {
                        Err(Error::InvalidArgument(format!("{field} is required")))
                    }
                    Err(IdProblem::Malformed(why)) => Err(Error::InvalidArgument(why)),
                    Err(IdProblem::Foreign) => Ok($reference::Foreign(s.to_owned())),
                }
            }

            /// The id if it is ours; otherwise NOT_FOUND naming it.
            pub fn require(&self) -> Result<&$id> {
                match self {
                    $reference::Ours(id) => Ok(id),
                    $reference::Foreign(s) => Err(Error::NotFound(format!(
                        "{} {s:?} does not exist",
                        $what
                    ))),
                }
            }

            /// The string as received, for messages.
            pub fn as_str(&self) -> &str {
                match self {
                    $reference::Ours(id) => id.as_str(),
                    $reference::Foreign(s) => s,
                }
            }
        }
    };
}

minted_id!(
    /// A volume id minted by stowage: `stw-` followed by 32 lowercase hex digits.
    VolumeId,
    VolumeRef,
    "stw-",
    "volume_id",
    "volume"
);

minted_id!(
    /// A snapshot id minted by stowage: `sns-` followed by 32 lowercase hex digits, so it is
    /// never mistaken for a volume id nor for a path.
    SnapshotId,
    SnapshotRef,
    "sns-",
    "snapshot_id",
    "snapshot"
);

/// NOT_FOUND for a volume id.
pub fn not_found(id: &str) -> Error {
    Error::NotFound(format!("volume {id:?} does not exist"))
}

/// NOT_FOUND for a snapshot id.
pub fn snapshot_not_found(id: &str) -> Error {
    Error::NotFound(format!("snapshot {id:?} does not exist"))
}

/// The CO-chosen name of a volume (the idempotency key of CreateVolume).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    /// Validates a name: required, at most 128 bytes, no NUL, no control characters.
    pub fn parse(s: &str) -> Result<Self> {
        if s.is_empty() {
            return Err(Error::invalid("name is required"));
        }
        check_csi_string("name", s)?;
        if s.chars().any(char::is_control) {
            return Err(Error::invalid("name contains a control character"));
        }
        Ok(VolumeName(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks the spec's general limits on a string field: 128 bytes, and no NUL.
pub fn check_csi_string(field: &str, s: &str) -> Result<()> {
    if s.len() > MAX_STRING_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} bytes long; CSI allows at most {MAX_STRING_BYTES}",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{field} contains a NUL byte"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_round_trip_and_are_one_path_component() {
        for _ in 0..100 {
            let id = VolumeId::generate();
            assert_eq!(VolumeId::parse(id.as_str()), Ok(id.clone()));
            assert!(!id.as_str().contains('/'));
            assert!(id.as_str().len() <= MAX_STRING_BYTES);
        }
    }

    #[test]
    fn hostile_ids_are_never_ours() {
        let long = "a".repeat(129);
        let table: &[(&str, &str)] = &[
            ("", "missing"),
            ("..", "foreign"),
            ("../../x", "foreign"),
            ("/abs", "foreign"),
            ("stw-../../../../etc", "foreign"),
            ("stw-0123456789abcdef0123456789abcdeF", "foreign"),
            ("stw-0123456789abcdef0123456789abcde", "foreign"),
            ("stw-0123456789abcdef0123456789abcdef/..", "foreign"),
            ("stw-0123456789abcdef\u{0}123456789abcde", "malformed"),
            (&long, "malformed"),
        ];
        for (input, want) in table {
            let got = match VolumeId::parse(input) {
                Ok(_) => "ours",
                Err(IdProblem::Missing) => "missing",
                Err(IdProblem::Malformed(_)) => "malformed",
                Err(IdProblem::Foreign) => "foreign",
            };
            assert_eq!(got, *want, "input {input:?}");
        }
    }

    #[test]
    fn volume_ref_codes() {
        assert_eq!(
            VolumeRef::from_request("").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let nul = VolumeRef::from_request("a\0b").unwrap_err();
        assert_eq!(nul.code(), tonic::Code::InvalidArgument);
        let foreign = VolumeRef::from_request("../../x").unwrap();
        assert_eq!(foreign.require().unwrap_err().code(), tonic::Code::NotFound);
    }

    #[test]
    fn names_up_to_128_bytes() {
        assert!(VolumeName::parse(&"n".repeat(128)).is_ok());
        assert!(VolumeName::parse(&"n".repeat(129)).is_err());
        assert!(VolumeName::parse("").is_err());
        assert!(VolumeName::parse("pvc-\n").is_err());
        assert!(VolumeName::parse("pvc-ünïcode/../ok").is_ok());
    }
}
