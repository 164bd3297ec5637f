//! The engine thread: it alone touches the model and the KV cache. Each turn it takes what was
//! submitted, drops what was cancelled, scores ([`super::scoring`]), plans a forward
//! ([`super::scheduler`]) and runs it ([`super::step`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use super::Counters;
use super::cache::KvPool;
use super::model::QwenModel;
use super::queue::{Command, ScoreJob};
use super::scheduler::{Limits, Scheduler};
use super::tokenizer::ChatTokenizer;

/// The engine thread's state.
#[derive(Debug)]
pub(super) struct Worker {
    pub(super) model: QwenModel,
    pub(super) tokenizer: Arc<ChatTokenizer>,
    rx: mpsc::Receiver<Command>,
    pub(super) counters: Arc<Counters>,
    /// Scoring requests, served ahead of generation admissions.
    pub(super) scoring: VecDeque<ScoreJob>,
    pub(super) sched: Scheduler,
}

impl Worker {
    pub fn new(
        model: QwenModel,
        pool: KvPool,
        tokenizer: Arc<ChatTokenizer>,
        rx: mpsc::Receiver<Command>,
        counters: Arc<Counters>,
        limits: Limits,
    ) -> Self {
        Self {
            model,
            tokenizer,
            rx,
            sched: Scheduler::new(pool, limits, counters.clone()),
            counters,
            scoring: VecDeque::new(),
        }
    }

    pub fn run(mut self) {
        let _span = tracing::info_span!("engine").entered();
        loop {
            if self.sched.is_idle() && self.scoring.is_empty() {
                match self.rx.blocking_recv() {
                    Some(command) => self.take(command),
                    None => break,
                }
            }
            while let Ok(command) = self.rx.try_recv() {
                self.take(command);
            }
            self.sched.drop_cancelled();
            let scoring_waits = self.score_next();
            let plan = self.sched.schedule(!scoring_waits);
            if !plan.is_empty() {
                self.step(&plan);
            }
            self.publish();
        }
        tracing::info!("engine stopped: every handle is gone");
    }

    fn take(&mut self, command: Command) {
        match command {
            Command::Generate(job) => self.sched.submit(job),
            Command::Score(job) => self.scoring.push_back(job),
        }
    }

    /// Copies what the scheduler knows into the counters the handles read.
    fn publish(&self) {
        let c = &self.counters;
        c.running
            .store(self.sched.running.len() as u64, Ordering::Relaxed);
        let stats = self.sched.pool.prefix_stats();
        c.prefix_hits.store(stats.hits, Ordering::Relaxed);
        c.prefix_lookups.store(stats.lookups, Ordering::Relaxed);
        c.prefix_evictions.store(stats.evictions, Ordering::Relaxed);
    }
}
