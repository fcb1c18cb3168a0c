//! Per-volume operation guards: a second call on a volume (or on a volume name) while one is
//! in flight gets ABORTED, as the spec allows, instead of racing the first. Calls that only
//! read a volume (snapshots and clones of it) may share it with each other, never with a call
//! that changes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use stowage_core::{Error, Result};

/// How a key is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    Exclusive,
    /// By this many readers.
    Shared(usize),
}

type Busy = Arc<Mutex<HashMap<String, Hold>>>;

/// The keys with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct Guards {
    busy: Busy,
}

/// Held while an operation runs; releases its key on drop, also on panic or early return.
#[derive(Debug)]
pub struct Guard {
    busy: Busy,
    key: String,
}

fn lock(busy: &Busy) -> MutexGuard<'_, HashMap<String, Hold>> {
    // Every update is one map operation: a poisoned lock still holds consistent data.
    busy.lock().unwrap_or_else(|p| p.into_inner())
}

fn aborted(key: &str) -> Error {
    Error::Aborted(format!(
        "an operation on {key} is already in progress; retry when it completes"
    ))
}

impl Guards {
    /// Claims `key` alone, or answers ABORTED when another operation holds it.
    pub fn claim(&self, key: String) -> Result<Guard> {
        let mut busy = lock(&self.busy);
        if busy.contains_key(&key) {
            return Err(aborted(&key));
        }
        busy.insert(key.clone(), Hold::Exclusive);
        Ok(Guard {
            busy: Arc::clone(&self.busy),
            key,
        })
    }

    /// Claims `key` for reading: shared with other readers, ABORTED while an operation holds
    /// it alone.
    pub fn claim_shared(&self, key: String) -> Result<Guard> {
        let mut busy = lock(&self.busy);
        let hold = match busy.get(&key) {
            None => Hold::Shared(1),
            Some(Hold::Shared(n)) => Hold::Shared(n + 1),
            Some(Hold::Exclusive) => return Err(aborted(&key)),
        };
        busy.insert(key.clone(), hold);
        Ok(Guard {
            busy: Arc::clone(&self.busy),
            key,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut busy = lock(&self.busy);
        match busy.get(&self.key).copied() {
            Some(Hold::Shared(n)) if n > 1 => {
                busy.insert(self.key.clone(), Hold::Shared(n - 1));
            }
            _ => {
                busy.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_aborted_until_the_first_is_dropped() {
        let g = Guards::default();
        let first = g.claim("volume a".into()).unwrap();
        assert_eq!(
            g.claim("volume a".into()).unwrap_err().code(),
            tonic::Code::Aborted
        );
        let _other = g.claim("volume b".into()).unwrap();
        drop(first);
        assert!(g.claim("volume a".into()).is_ok());
    }

    #[test]
    fn readers_share_and_exclude_writers() {
        let g = Guards::default();
        let r1 = g.claim_shared("volume a".into()).unwrap();
        let r2 = g.claim_shared("volume a".into()).unwrap();
        assert_eq!(
            g.claim("volume a".into()).unwrap_err().code(),
            tonic::Code::Aborted
        );
        drop(r1);
        assert!(g.claim("volume a".into()).is_err(), "one reader left");
        drop(r2);
        let w = g.claim("volume a".into()).unwrap();
        assert_eq!(
            g.claim_shared("volume a".into()).unwrap_err().code(),
            tonic::Code::Aborted
        );
        drop(w);
        assert!(g.claim_shared("volume a".into()).is_ok());
    }
}
