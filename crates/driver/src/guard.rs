//! Per-volume operation guards: a second call on a volume (or on a volume name) while one is
//! in flight gets ABORTED, as the spec allows, instead of racing the first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use stowage_core::{Error, Result};

/// The set of keys with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct Guards {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; releases its key on drop, also on panic or early return.
#[derive(Debug)]
pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Guards {
    /// Claims `key`, or answers ABORTED when another operation holds it.
    pub fn claim(&self, key: String) -> Result<Guard> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(key.clone()) {
            return Err(Error::Aborted(format!(
                "an operation on {key} is already in progress; retry when it completes"
            )));
        }
        Ok(Guard {
            busy: Arc::clone(&self.busy),
            key,
        })
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
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
}
