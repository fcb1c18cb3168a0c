//! What NodeGetVolumeStats costs on a `dir` volume without project quota: its usage is a walk
//! of its tree, and the kubelet asks for every volume every minute. [`UsageCache`] bounds it:
//!
//! - a figure younger than the pool's `min_age` is answered as it is, without walking;
//! - one call walks for at most the pool's `walk_budget`; a walk that needs more stops there
//!   (keeping where it was, no fd held) and the next call that needs a figure continues it.
//!   Until it ends, calls answer the last complete figure with its age, never the part
//!   counted so far; before any walk of the volume has ended there is no figure at all;
//! - one walk per volume at a time: a call that arrives while another walks the volume
//!   waits for that walk's slice and shares its outcome instead of walking again;
//! - one entry per volume, dropped when the volume is deleted; at most `capacity` entries,
//!   the least recently asked one dropped first.
//!
//! The cost is thus at most one budget of walking per call and per volume, and no walk at
//! all for calls closer together than `min_age`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use stowage_core::VolumeId;
use stowage_sys::fs::{TreeUsage, UsageWalk, WalkStep};
use stowage_sys::SysResult;

/// Entries kept at most (volumes asked about recently), unless told otherwise.
pub const DEFAULT_CAPACITY: usize = 4096;

/// A complete walk's figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figure {
    pub usage: TreeUsage,
    /// When the walk that produced it started: the tree may have changed since then.
    pub started: Instant,
    /// Wall time from that start to its end (several calls' slices for a stopped walk).
    pub took: Duration,
    /// Time spent walking: the slices' durations added up.
    pub walking: Duration,
    /// Calls whose slices made the walk.
    pub slices: u32,
}

/// How a call's answer came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// This call (or the call it shared a walk with) finished a walk.
    Walked,
    /// The figure is younger than the minimum age: nothing was walked.
    Cached,
    /// A walk to refresh it ran out of budget and continues at the next call; `entries`
    /// examined so far.
    Stale { entries: u64 },
}

/// The answer for one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    /// The last complete figure; None when no walk of the volume has ended yet.
    pub figure: Option<Figure>,
    pub freshness: Freshness,
}

impl Measured {
    /// Seconds since the start of the walk that produced the figure.
    pub fn age(&self, now: Instant) -> Option<Duration> {
        self.figure
            .map(|f| now.saturating_duration_since(f.started))
    }
}

/// Counters of the cache's work, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Walks started from the root.
    pub walks_started: AtomicU64,
    /// Walks that reached their end.
    pub walks_done: AtomicU64,
    /// Slices run (a call's share of walking, at most one budget long).
    pub slices: AtomicU64,
    /// Calls answered from the cache without walking.
    pub hits: AtomicU64,
    /// Calls that waited for another call's slice and shared its outcome.
    pub shared: AtomicU64,
}

#[derive(Debug, Default)]
struct Slot {
    /// Bumped at the end of every slice; a caller that saw another value before it waited
    /// for the lock shares the outcome of the slice that ran meanwhile.
    slices: AtomicU64,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    figure: Option<Figure>,
    /// The walk in progress (stopped at a budget), or a fresh one.
    walk: UsageWalk,
    /// When the walk in progress started.
    walk_started: Option<Instant>,
    /// Its slices so far, and their time.
    walk_slices: u32,
    walking: Duration,
    /// The last slice failed: a waiting caller walks itself instead of sharing.
    failed: bool,
}

/// The per-volume usage cache of one `dir` pool.
#[derive(Debug)]
pub struct UsageCache {
    min_age: Duration,
    budget: Duration,
    capacity: usize,
    /// Each entry with the tick of its last use (the least recent goes first).
    slots: Mutex<HashMap<VolumeId, (Arc<Slot>, u64)>>,
    tick: AtomicU64,
    pub counters: Counters,
}

impl UsageCache {
    pub fn new(min_age: Duration, budget: Duration, capacity: usize) -> Self {
        UsageCache {
            min_age,
            budget,
            capacity: capacity.max(1),
            slots: Mutex::default(),
            tick: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    pub fn min_age(&self) -> Duration {
        self.min_age
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        lock(&self.slots).len()
    }

    /// Whether no volume has an entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops what is known of a volume (it was deleted). A walk of it running now finishes
    /// into an entry nobody can find any more.
    pub fn forget(&self, id: &VolumeId) {
        lock(&self.slots).remove(id);
    }

    fn slot(&self, id: &VolumeId) -> Arc<Slot> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut slots = lock(&self.slots);
        if let Some((slot, used)) = slots.get_mut(id) {
            *used = tick;
            return Arc::clone(slot);
        }
        if slots.len() >= self.capacity {
            if let Some(oldest) = slots
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            {
                slots.remove(&oldest);
            }
        }
        let slot = Arc::new(Slot::default());
        slots.insert(id.clone(), (Arc::clone(&slot), tick));
        slot
    }

    /// The usage of volume `id`: cached when young enough, otherwise `walk` continues the
    /// volume's walk until the deadline it is given (one budget from now). `walk` is called
    /// with the volume's entry locked, so never twice at once for one volume.
    pub fn measure(
        &self,
        id: &VolumeId,
        walk: impl FnOnce(&mut UsageWalk, Instant) -> SysResult<WalkStep>,
    ) -> SysResult<Measured> {
        let slot = self.slot(id);
        let seen = slot.slices.load(Ordering::Acquire);
        let mut state = lock(&slot.state);
        let now = Instant::now();
        if let Some(f) = state.figure {
            if now.saturating_duration_since(f.started) < self.min_age {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Measured {
                    figure: Some(f),
                    freshness: Freshness::Cached,
                });
            }
        }
        if slot.slices.load(Ordering::Acquire) != seen && !state.failed {
            // Another call walked while this one waited: its outcome is this call's too.
            self.counters.shared.fetch_add(1, Ordering::Relaxed);
            return Ok(state.outcome());
        }
        let started = *state.walk_started.get_or_insert_with(|| {
            self.counters.walks_started.fetch_add(1, Ordering::Relaxed);
            now
        });
        self.counters.slices.fetch_add(1, Ordering::Relaxed);
        let step = walk(&mut state.walk, now + self.budget);
        state.walk_slices += 1;
        state.walking += now.elapsed();
        slot.slices.fetch_add(1, Ordering::Release);
        state.failed = step.is_err();
        match step {
            Ok(WalkStep::Done(usage)) => {
                self.counters.walks_done.fetch_add(1, Ordering::Relaxed);
                state.walk_started = None;
                state.figure = Some(Figure {
                    usage,
                    started,
                    took: started.elapsed(),
                    walking: std::mem::take(&mut state.walking),
                    slices: std::mem::take(&mut state.walk_slices),
                });
                Ok(Measured {
                    figure: state.figure,
                    freshness: Freshness::Walked,
                })
            }
            Ok(WalkStep::Stopped) => Ok(state.outcome()),
            Err(e) => {
                // The walk was abandoned (UsageWalk starts over after an error).
                state.walk_started = None;
                state.walk_slices = 0;
                state.walking = Duration::ZERO;
                Err(e)
            }
        }
    }
}

impl SlotState {
    /// What the last slice leaves a caller with.
    fn outcome(&self) -> Measured {
        if self.walk_started.is_some() {
            Measured {
                figure: self.figure,
                freshness: Freshness::Stale {
                    entries: self.walk.entries(),
                },
            }
        } else {
            Measured {
                figure: self.figure,
                freshness: Freshness::Walked,
            }
        }
    }
}

/// The cache's locks guard plain data that a panicking walk cannot leave half-updated in a
/// harmful way (the walk is replaced whole), so a poisoned lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn usage(n: u64) -> TreeUsage {
        TreeUsage {
            bytes: n * 4096,
            inodes: n,
        }
    }

    fn count(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn a_young_figure_is_answered_without_walking_and_an_old_one_is_walked_again() {
        let cache = UsageCache::new(Duration::from_millis(200), Duration::from_secs(2), 16);
        let id = VolumeId::generate();
        let walks = AtomicU64::new(0);
        let walk = |_: &mut UsageWalk, _| {
            let n = walks.fetch_add(1, Ordering::Relaxed) + 1;
            Ok(WalkStep::Done(usage(n)))
        };
        let first = cache.measure(&id, walk).unwrap();
        assert_eq!(first.freshness, Freshness::Walked);
        assert_eq!(first.figure.unwrap().usage, usage(1));
        for _ in 0..5 {
            let again = cache.measure(&id, walk).unwrap();
            assert_eq!(again.freshness, Freshness::Cached);
            assert_eq!(again.figure, first.figure);
        }
        assert_eq!(count(&walks), 1);
        assert_eq!(count(&cache.counters.hits), 5);
        std::thread::sleep(Duration::from_millis(250));
        let later = cache.measure(&id, walk).unwrap();
        assert_eq!(later.freshness, Freshness::Walked);
        assert_eq!(later.figure.unwrap().usage, usage(2));
        assert_eq!(count(&walks), 2);
    }

    #[test]
    fn a_walk_cut_by_the_budget_never_answers_its_partial_figure() {
        let cache = UsageCache::new(Duration::ZERO, Duration::from_millis(10), 16);
        let id = VolumeId::generate();
        // The first walk ends: a figure.
        let done = cache
            .measure(&id, |_, _| Ok(WalkStep::Done(usage(7))))
            .unwrap();
        let first = done.figure.unwrap();
        // The next ones run out of budget: the old figure, said to be stale, with its age.
        let mut deadline_seen = None;
        let stale = cache
            .measure(&id, |_, deadline| {
                deadline_seen = Some(deadline);
                Ok(WalkStep::Stopped)
            })
            .unwrap();
        assert!(
            matches!(stale.freshness, Freshness::Stale { .. }),
            "{stale:?}"
        );
        assert_eq!(stale.figure, Some(first));
        let d = deadline_seen
            .unwrap()
            .saturating_duration_since(Instant::now());
        assert!(
            d <= Duration::from_millis(10),
            "deadline {d:?} beyond the budget"
        );
        std::thread::sleep(Duration::from_millis(5));
        let again = cache.measure(&id, |_, _| Ok(WalkStep::Stopped)).unwrap();
        assert_eq!(again.figure, Some(first));
        assert!(again.age(Instant::now()).unwrap() >= Duration::from_millis(5));
        // The walk continues (one started, not three) and its end replaces the figure.
        let end = cache
            .measure(&id, |_, _| Ok(WalkStep::Done(usage(9))))
            .unwrap();
        assert_eq!(end.freshness, Freshness::Walked);
        assert_eq!(end.figure.unwrap().usage, usage(9));
        assert!(end.figure.unwrap().started < Instant::now() - Duration::from_millis(5));
        assert_eq!(count(&cache.counters.walks_started), 2);
        assert_eq!(count(&cache.counters.slices), 4);

        // A volume whose first walk is cut has no figure at all.
        let other = VolumeId::generate();
        let none = cache.measure(&other, |_, _| Ok(WalkStep::Stopped)).unwrap();
        assert_eq!(none.figure, None);
        assert!(matches!(none.freshness, Freshness::Stale { .. }));
        // A failed slice is an error, and the next call starts a new walk.
        let err = cache.measure(&other, |_, _| {
            Err(stowage_sys::SysError::new(
                "statx",
                "x".to_owned(),
                stowage_sys::Errno::IO,
            ))
        });
        assert!(err.is_err());
        cache
            .measure(&other, |_, _| Ok(WalkStep::Done(usage(1))))
            .unwrap();
        assert_eq!(count(&cache.counters.walks_started), 4);
    }

    #[test]
    fn concurrent_callers_share_one_walk() {
        let cache = UsageCache::new(Duration::ZERO, Duration::from_secs(2), 16);
        let id = VolumeId::generate();
        let walks = AtomicU64::new(0);
        let callers = 8;
        let start = Barrier::new(callers);
        let answers: Vec<Measured> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..callers)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        cache
                            .measure(&id, |_, _| {
                                walks.fetch_add(1, Ordering::Relaxed);
                                // Long enough for every other caller to queue behind it.
                                std::thread::sleep(Duration::from_millis(500));
                                Ok(WalkStep::Done(usage(3)))
                            })
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(count(&walks), 1, "callers walked on their own");
        assert_eq!(count(&cache.counters.shared), callers as u64 - 1);
        for a in answers {
            assert_eq!(a.figure.unwrap().usage, usage(3));
        }
    }

    #[test]
    fn forgetting_drops_the_entry_and_the_size_is_bounded() {
        let cache = UsageCache::new(Duration::from_secs(60), Duration::from_secs(2), 3);
        let ids: Vec<VolumeId> = (0..5).map(|_| VolumeId::generate()).collect();
        for id in &ids[..3] {
            cache
                .measure(id, |_, _| Ok(WalkStep::Done(usage(1))))
                .unwrap();
        }
        assert_eq!(cache.len(), 3);
        cache.forget(&ids[1]);
        assert_eq!(cache.len(), 2);
        // Forgotten: the next call walks again.
        let again = cache
            .measure(&ids[1], |_, _| Ok(WalkStep::Done(usage(2))))
            .unwrap();
        assert_eq!(again.freshness, Freshness::Walked);
        // ids[0] is the least recently used: the fourth volume pushes it out.
        cache
            .measure(&ids[3], |_, _| Ok(WalkStep::Done(usage(1))))
            .unwrap();
        assert_eq!(cache.len(), 3);
        let cached = cache
            .measure(&ids[2], |_, _| Ok(WalkStep::Done(usage(5))))
            .unwrap();
        assert_eq!(cached.freshness, Freshness::Cached);
        let pushed_out = cache
            .measure(&ids[0], |_, _| Ok(WalkStep::Done(usage(4))))
            .unwrap();
        assert_eq!(pushed_out.freshness, Freshness::Walked);
        assert_eq!(cache.len(), 3);
    }
}
