//! The progress line of long runs, on standard error: a bar when the total is known, a counter otherwise. Drawn
//! only on a terminal and never under `--json`; redrawn at most every 100 ms.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WIDTH: u64 = 30;
const EVERY: Duration = Duration::from_millis(100);

pub struct Progress {
    label: &'static str,
    total: Option<u64>,
    enabled: bool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    done: u64,
    drawn: Option<Instant>,
}

impl Progress {
    /// `label` names what is counted (`"replayed"`); `json`: the run prints JSON, so nothing is drawn.
    pub fn new(label: &'static str, total: Option<u64>, json: bool) -> Self {
        Self {
            label,
            total,
            enabled: !json && std::io::stderr().is_terminal(),
            state: Mutex::new(State::default()),
        }
    }

    /// `done` items so far.
    pub fn set(&self, done: u64) {
        if !self.enabled {
            return;
        }
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.done = done;
        if state.drawn.is_none_or(|at| at.elapsed() >= EVERY) {
            state.drawn = Some(Instant::now());
            eprint!("\r{}", self.line(done));
            let _ = std::io::stderr().flush();
        }
    }

    /// Draws the final count and ends the line (if anything was drawn).
    pub fn finish(&self) {
        let Ok(state) = self.state.lock() else {
            return;
        };
        if self.enabled && state.drawn.is_some() {
            eprintln!("\r{}", self.line(state.done));
        }
    }

    fn line(&self, done: u64) -> String {
        match self.total {
            Some(total) if total > 0 => {
                let filled = done.min(total) * WIDTH / total;
                format!(
                    "[{}{}] {:>3}% {done}/{total} {}",
                    "#".repeat(filled as usize),
                    "-".repeat((WIDTH - filled) as usize),
                    done.min(total) * 100 / total,
                    self.label
                )
            }
            _ => format!("{done} {}", self.label),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_when_the_total_is_known_a_count_otherwise() {
        let bar = Progress::new("replayed", Some(200), true);
        assert_eq!(
            bar.line(50),
            "[#######-----------------------]  25% 50/200 replayed"
        );
        assert_eq!(
            bar.line(400),
            format!("[{}] 100% 400/200 replayed", "#".repeat(30))
        );
        assert_eq!(Progress::new("exported", None, true).line(7), "7 exported");
        assert_eq!(
            Progress::new("exported", Some(0), true).line(0),
            "0 exported"
        );
    }
}
