//! Group commit: many callers, one flush. A caller that needs its write durable takes a
//! ticket after writing and waits until a flush that started after its write has finished.
//! While one flush is in flight, every caller that arrives queues behind it, and the next
//! flush covers them all, so sixteen concurrent intents cost one or two fsyncs, not sixteen.
//!
//! The flush itself (an fdatasync of SQLite's WAL, an fsync of a pool directory) is given by
//! the owner; this module only decides who runs it and when a caller may return.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use stowage_core::Result;

/// Counts writes and the flushes that made them durable.
#[derive(Debug)]
pub struct GroupSync {
    /// Writes noted so far; a write's ticket is the value after its increment.
    written: AtomicU64,
    /// The highest ticket a finished flush covers. Held for the whole flush, so callers
    /// arriving during one wait here and are then covered by the next.
    flushed: Mutex<u64>,
    /// Flushes run, for tests and the debug log.
    flushes: AtomicU64,
    /// Which log this is in the metrics (`stowage_group_commit_batch_writes{log}`).
    log: &'static str,
}

impl Default for GroupSync {
    /// A pool's group commit (the store names its own with [`GroupSync::for_log`]).
    fn default() -> Self {
        GroupSync::for_log("pool")
    }
}

/// What a caller holds between its write and its wait: the write's position in the order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

impl GroupSync {
    /// A group commit reported as `log` in the metrics.
    pub fn for_log(log: &'static str) -> Self {
        GroupSync {
            written: AtomicU64::new(0),
            flushed: Mutex::new(0),
            flushes: AtomicU64::new(0),
            log,
        }
    }

    /// Notes a write that has reached the file (in the page cache). Call it after the write
    /// returned, while still holding whatever orders the writes (the store's connection).
    pub fn note_write(&self) -> Ticket {
        Ticket(self.written.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Whether any write is noted that no flush covers yet.
    pub fn is_dirty(&self) -> bool {
        self.written.load(Ordering::Acquire) > *self.lock()
    }

    /// Returns once `ticket`'s write is durable: at once if a finished flush already covers
    /// it, otherwise after running `flush` (or waiting for the caller that runs it). `flush`
    /// must make every write noted before it started durable.
    pub fn wait(&self, ticket: Ticket, flush: impl FnOnce() -> Result<()>) -> Result<()> {
        let mut flushed = self.lock();
        if *flushed >= ticket.0 {
            return Ok(());
        }
        // Everything noted up to now is in the file; this flush covers all of it, not only
        // our own write: that is what lets the callers queued behind us return without one.
        let covers = self.written.load(Ordering::Acquire);
        flush()?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        crate::recorder::recorder().batch(self.log, covers.saturating_sub(*flushed));
        *flushed = covers;
        Ok(())
    }

    /// Flushes everything written so far if anything is not yet durable.
    pub fn flush_all(&self, flush: impl FnOnce() -> Result<()>) -> Result<()> {
        let ticket = Ticket(self.written.load(Ordering::Acquire));
        self.wait(ticket, flush)
    }

    /// Number of flushes run so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        // The guarded value is a plain counter; a panic mid-flush leaves it at its old value,
        // which only makes the next caller flush again.
        self.flushed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::time::Duration;
    use stowage_core::Error;

    #[test]
    fn a_covered_write_does_not_flush_again() {
        let sync = GroupSync::default();
        let a = sync.note_write();
        let b = sync.note_write();
        let runs = AtomicUsize::new(0);
        let flush = || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        sync.wait(b, flush).unwrap();
        sync.wait(a, flush).unwrap();
        sync.wait(b, flush).unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(!sync.is_dirty());
        let c = sync.note_write();
        assert!(sync.is_dirty());
        sync.wait(c, flush).unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_flush_covers_nothing() {
        let sync = GroupSync::default();
        let t = sync.note_write();
        let err = sync
            .wait(t, || Err(Error::Internal("disk said no".into())))
            .unwrap_err();
        assert!(err.to_string().contains("disk said no"));
        assert!(sync.is_dirty());
        let runs = AtomicUsize::new(0);
        sync.wait(t, || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// Writers that arrive while a flush is in flight share the next one. The flush here
    /// holds until all 16 writers have noted their writes, so every writer but the ones the
    /// first flush already covered queues behind it: two flushes at most, never sixteen.
    #[test]
    fn concurrent_writers_share_flushes() {
        const WRITERS: u64 = 16;
        let sync = Arc::new(GroupSync::default());
        let threads: Vec<_> = (0..WRITERS)
            .map(|_| {
                let sync = Arc::clone(&sync);
                std::thread::spawn(move || {
                    let ticket = sync.note_write();
                    sync.wait(ticket, || {
                        // Bounded: the other writers need no lock to note their writes.
                        for _ in 0..10_000 {
                            if sync.written.load(Ordering::SeqCst) == WRITERS {
                                break;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Ok(())
                    })
                    .unwrap();
                    // Returned only once a flush covering our write finished.
                    assert!(*sync.lock() >= ticket.0);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let flushes = sync.flushes();
        assert!(
            (1..=2).contains(&flushes),
            "{flushes} flushes for {WRITERS} concurrent writers"
        );
        assert!(!sync.is_dirty());
    }
}
