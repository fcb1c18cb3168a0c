//! Everything the bench has created on the driver and not yet removed, so that cleanup can
//! undo it after a normal end, a failure or an interruption.
//!
//! Entries are added *before* the creating call is issued and removed only after the
//! undoing call succeeded. A create whose outcome is unknown (timeout, connection lost)
//! therefore stays registered by name; cleanup repeats the create, which the spec makes
//! idempotent per name, to learn the ID and then deletes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// A volume or snapshot the bench asked for, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Created {
    /// The create was issued; the ID is not known (yet).
    Pending,
    /// The driver returned this ID.
    Id(String),
}

/// A staged volume: everything needed to repeat or undo NodeStageVolume.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Staged {
    pub(crate) volume_id: String,
    pub(crate) staging_path: String,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    /// Volume name -> state.
    pub(crate) volumes: BTreeMap<String, Created>,
    /// Snapshot name -> (source volume ID, state).
    pub(crate) snapshots: BTreeMap<String, (String, Created)>,
    /// (volume ID, target path) of NodePublishVolume calls not yet undone.
    pub(crate) published: BTreeSet<(String, String)>,
    pub(crate) staged: BTreeSet<Staged>,
    /// (volume ID, node ID) of ControllerPublishVolume calls not yet undone.
    pub(crate) controller_published: BTreeSet<(String, String)>,
    /// Directories the bench created, in creation order.
    pub(crate) dirs: Vec<PathBuf>,
}

/// Thread-safe registry shared by all workers.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    state: Mutex<State>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock cannot have left the maps in a
        // half-updated state (each update is a single insert/remove), so keep using them:
        // cleanup matters more than the panic.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn volume_pending(&self, name: &str) {
        self.lock()
            .volumes
            .insert(name.to_owned(), Created::Pending);
    }

    pub(crate) fn volume_created(&self, name: &str, id: &str) {
        self.lock()
            .volumes
            .insert(name.to_owned(), Created::Id(id.to_owned()));
    }

    /// The volume is gone (deleted) or was definitely never created.
    pub(crate) fn volume_gone(&self, name: &str) {
        self.lock().volumes.remove(name);
    }

    pub(crate) fn snapshot_pending(&self, name: &str, source: &str) {
        self.lock()
            .snapshots
            .insert(name.to_owned(), (source.to_owned(), Created::Pending));
    }

    pub(crate) fn snapshot_created(&self, name: &str, source: &str, id: &str) {
        self.lock().snapshots.insert(
            name.to_owned(),
            (source.to_owned(), Created::Id(id.to_owned())),
        );
    }

    pub(crate) fn snapshot_gone(&self, name: &str) {
        self.lock().snapshots.remove(name);
    }

    pub(crate) fn published(&self, volume_id: &str, target: &str) {
        self.lock()
            .published
            .insert((volume_id.to_owned(), target.to_owned()));
    }

    pub(crate) fn unpublished(&self, volume_id: &str, target: &str) {
        self.lock()
            .published
            .remove(&(volume_id.to_owned(), target.to_owned()));
    }

    pub(crate) fn staged(&self, staged: Staged) {
        self.lock().staged.insert(staged);
    }

    pub(crate) fn unstaged(&self, staged: &Staged) {
        self.lock().staged.remove(staged);
    }

    pub(crate) fn controller_published(&self, volume_id: &str, node_id: &str) {
        self.lock()
            .controller_published
            .insert((volume_id.to_owned(), node_id.to_owned()));
    }

    pub(crate) fn controller_unpublished(&self, volume_id: &str, node_id: &str) {
        self.lock()
            .controller_published
            .remove(&(volume_id.to_owned(), node_id.to_owned()));
    }

    pub(crate) fn dir_created(&self, dir: PathBuf) {
        self.lock().dirs.push(dir);
    }

    pub(crate) fn dir_removed(&self, dir: &PathBuf) {
        self.lock().dirs.retain(|d| d != dir);
    }

    /// A copy of the current state, for cleanup to iterate without holding the lock
    /// across RPCs.
    pub(crate) fn snapshot(&self) -> State {
        let s = self.lock();
        State {
            volumes: s.volumes.clone(),
            snapshots: s.snapshots.clone(),
            published: s.published.clone(),
            staged: s.staged.clone(),
            controller_published: s.controller_published.clone(),
            dirs: s.dirs.clone(),
        }
    }

    /// Human-readable list of what is still registered (nothing once cleanup succeeded).
    pub(crate) fn leftovers(&self) -> Vec<String> {
        let s = self.lock();
        let mut out = Vec::new();
        for (volume, target) in &s.published {
            out.push(format!("publication of volume {volume} at {target}"));
        }
        for st in &s.staged {
            out.push(format!(
                "staging of volume {} at {}",
                st.volume_id, st.staging_path
            ));
        }
        for (volume, node) in &s.controller_published {
            out.push(format!(
                "controller publication of volume {volume} on node {node}"
            ));
        }
        for (name, (_, created)) in &s.snapshots {
            out.push(match created {
                Created::Id(id) => format!("snapshot {id} (name {name})"),
                Created::Pending => format!("snapshot named {name} (ID unknown)"),
            });
        }
        for (name, created) in &s.volumes {
            out.push(match created {
                Created::Id(id) => format!("volume {id} (name {name})"),
                Created::Pending => format!("volume named {name} (ID unknown)"),
            });
        }
        for d in &s.dirs {
            out.push(format!("directory {}", d.display()));
        }
        out
    }
}

/// Volume context and publish context carried from setup to the operations.
pub(crate) type Context = HashMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_and_forgets() {
        let r = Registry::default();
        r.volume_pending("a");
        r.volume_created("a", "id-a");
        r.volume_pending("b");
        r.published("id-a", "/t/pub-0");
        assert_eq!(r.leftovers().len(), 3);
        r.unpublished("id-a", "/t/pub-0");
        r.volume_gone("a");
        r.volume_gone("b");
        assert!(r.leftovers().is_empty());
    }
}
