//! A one-line progress bar on stderr, redrawn in place with `\r`; shown only when stderr is
//! a terminal so that logs and pipes never see control characters.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

const WIDTH: usize = 30;
const REDRAW: Duration = Duration::from_millis(200);

/// A running progress line; [`Progress::finish`] erases it.
#[derive(Debug)]
pub(crate) struct Progress {
    task: JoinHandle<()>,
}

/// `[#########---------]  12/20  34.1 ops/s`, after `label` (e.g. `cleanup:`) if not empty.
pub(crate) fn render(label: &str, done: usize, total: usize, elapsed: Duration) -> String {
    let filled = (done.min(total) * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH);
    let bar: String = "#".repeat(filled) + &"-".repeat(WIDTH - filled);
    let rate = super::stats::rate(done, elapsed);
    let sep = if label.is_empty() { "" } else { " " };
    format!("{label}{sep}[{bar}] {done}/{total}  {rate:.1} ops/s")
}

impl Progress {
    /// Starts redrawing `done` out of `total` every 200 ms.
    pub(crate) fn start(done: Arc<AtomicUsize>, total: usize) -> Self {
        Self::start_labeled(String::new(), done, total)
    }

    /// [`start`](Self::start) with a label in front of the bar, for runs with several phases.
    pub(crate) fn start_labeled(label: String, done: Arc<AtomicUsize>, total: usize) -> Self {
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(REDRAW);
            loop {
                tick.tick().await;
                let line = render(
                    &label,
                    done.load(Ordering::Relaxed),
                    total,
                    started.elapsed(),
                );
                let mut err = std::io::stderr().lock();
                // A progress line that fails to draw is not worth failing the bench for.
                let _ = write!(err, "\r{line}");
                let _ = err.flush();
            }
        });
        Self { task }
    }

    /// Stops redrawing and clears the line.
    pub(crate) fn finish(self) {
        self.task.abort();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bar() {
        let line = render("", 10, 20, Duration::from_secs(2));
        assert_eq!(
            line,
            format!("[{}{}] 10/20  5.0 ops/s", "#".repeat(15), "-".repeat(15))
        );
        assert!(render("", 0, 0, Duration::ZERO).starts_with(&format!("[{}]", "#".repeat(WIDTH))));
        assert!(render("cleanup:", 1, 2, Duration::from_secs(1))
            .starts_with(&format!("cleanup: [{}", "#".repeat(WIDTH / 2))));
    }
}
