//! Progress of a run: driver events become [`RunProgress`] updates with a percentage over the
//! deliberation's phases.

use std::sync::Arc;
use std::time::Instant;

use council_councils::Phase;

use super::Updates;
use super::metrics::Metrics;
use super::request::RunProgress;
use crate::driver::Event;

/// Turns driver events into [`RunProgress`] updates with a progress percentage over the
/// deliberation's phases (propose, then critique and revise per round, then score).
pub(super) struct ProgressTracker {
    steps: u32,
    updates: Option<Updates>,
    metrics: Option<Arc<Metrics>>,
    calls: usize,
    done: usize,
    phase_started: Instant,
}

fn phase_status(phase: Phase) -> &'static str {
    match phase {
        Phase::Propose | Phase::Revise => "generating",
        Phase::Critique => "reviewing",
        Phase::Score => "scoring",
    }
}

impl ProgressTracker {
    pub(super) fn new(steps: u32, updates: Option<Updates>, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            steps,
            updates,
            metrics,
            calls: 0,
            done: 0,
            phase_started: Instant::now(),
        }
    }

    /// Index of a phase among the deliberation's steps.
    fn step(&self, phase: Phase, round: u32) -> u32 {
        match phase {
            Phase::Propose => 0,
            Phase::Critique => 2 * round - 1,
            Phase::Revise => 2 * round,
            Phase::Score => self.steps - 1,
        }
    }

    fn percent(&self, phase: Phase, round: u32) -> i32 {
        let within = if self.calls == 0 {
            0.0
        } else {
            self.done as f64 / self.calls as f64
        };
        let p = 100.0 * (f64::from(self.step(phase, round)) + within) / f64::from(self.steps);
        // 100 belongs to the final update.
        (p.floor() as i32).clamp(0, 99)
    }

    pub(super) fn on(&mut self, event: Event) {
        match &event {
            Event::Checkpoint(_) => return,
            Event::PhaseStarted { .. } => self.phase_started = Instant::now(),
            Event::CallDone { .. } => {
                if let Some(m) = &self.metrics {
                    m.call_done(self.phase_started.elapsed());
                }
            }
        }
        let Some(tx) = &self.updates else { return };
        let update = match event {
            Event::Checkpoint(_) => return,
            Event::PhaseStarted {
                phase,
                round,
                calls,
            } => {
                self.calls = calls;
                self.done = 0;
                RunProgress {
                    status: phase_status(phase),
                    percent: self.percent(phase, round),
                    step: format!("{} round {round}: {calls} calls", phase.as_str()),
                    agent: String::new(),
                }
            }
            Event::CallDone {
                agent,
                phase,
                round,
                ok,
            } => {
                self.done += 1;
                RunProgress {
                    status: phase_status(phase),
                    percent: self.percent(phase, round),
                    step: format!(
                        "{} round {round}: {agent} {} ({}/{})",
                        phase.as_str(),
                        if ok { "answered" } else { "failed" },
                        self.done,
                        self.calls
                    ),
                    agent: agent.to_string(),
                }
            }
        };
        let _ = tx.send(update);
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;

    use super::*;

    #[test]
    fn progress_rises_through_the_phases_and_stops_short_of_100() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut p = ProgressTracker::new(4, Some(tx), None);
        let agent = council_councils::AgentId::new("a").expect("id");
        let mut seen = Vec::new();
        for (phase, round) in [
            (Phase::Propose, 0),
            (Phase::Critique, 1),
            (Phase::Revise, 1),
            (Phase::Score, 1),
        ] {
            p.on(Event::PhaseStarted {
                phase,
                round,
                calls: 2,
            });
            for _ in 0..2 {
                p.on(Event::CallDone {
                    agent: agent.clone(),
                    phase,
                    round,
                    ok: true,
                });
            }
        }
        while let Ok(u) = rx.try_recv() {
            seen.push((u.status, u.percent));
        }
        let percents: Vec<i32> = seen.iter().map(|s| s.1).collect();
        assert_eq!(
            percents,
            vec![0, 12, 25, 25, 37, 50, 50, 62, 75, 75, 87, 99]
        );
        let statuses: Vec<&str> = seen.iter().map(|s| s.0).collect();
        assert_eq!(&statuses[3..6], ["reviewing"; 3]);
        assert_eq!(&statuses[9..], ["scoring"; 3]);
    }
}
