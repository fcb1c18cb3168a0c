//! Where a call's time goes, for the debug log: the engine, the store and the pools mark
//! the end of each stage of a call (`mark("intent-flush")`), and the service logs the time
//! between marks once the call is done. Off (one thread-local check per mark) unless the
//! debug level is enabled for this module.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::time::Instant;

thread_local! {
    static MARKS: RefCell<Option<Marks>> = const { RefCell::new(None) };
}

/// The stages of one call so far, on the thread that runs it.
#[derive(Debug)]
pub struct Marks {
    last: Instant,
    stages: Vec<(&'static str, u32)>,
}

impl Marks {
    /// The stages as `name=µs` pairs, in order; a stage marked twice appears twice.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, micros) in &self.stages {
            let _ = write!(
                out,
                "{}{name}={micros}",
                if out.is_empty() { "" } else { " " }
            );
        }
        out
    }

    /// Ends the stage `name` at `at` (after the thread that began the call let go of it).
    pub fn push(&mut self, name: &'static str, at: Instant) {
        let micros = at.saturating_duration_since(self.last).as_micros();
        self.stages
            .push((name, u32::try_from(micros).unwrap_or(u32::MAX)));
        self.last = at;
    }
}

/// Whether calls are timed stage by stage (the debug level is on for this module).
pub fn enabled() -> bool {
    tracing::enabled!(tracing::Level::DEBUG)
}

/// Starts timing the call run on this thread; the first stage runs from `start`.
pub fn begin(start: Instant) {
    MARKS.with(|m| {
        *m.borrow_mut() = Some(Marks {
            last: start,
            stages: Vec::with_capacity(12),
        })
    });
}

/// Ends the stage `name` now (nothing when this thread is not timing a call).
pub fn mark(name: &'static str) {
    MARKS.with(|m| {
        if let Some(marks) = m.borrow_mut().as_mut() {
            marks.push(name, Instant::now());
        }
    });
}

/// Stops timing on this thread; the time since the last mark is the stage `name`.
pub fn end(name: &'static str) -> Option<Marks> {
    MARKS.with(|m| {
        let mut marks = m.borrow_mut().take()?;
        marks.push(name, Instant::now());
        Some(marks)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_timed_in_order_only_while_begun() {
        mark("ignored");
        assert!(end("nothing").is_none());
        begin(Instant::now());
        mark("a");
        mark("b");
        let text = end("c").unwrap().render();
        let names: Vec<&str> = text
            .split(' ')
            .map(|s| s.split('=').next().unwrap())
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}
