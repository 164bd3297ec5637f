//! What the service measures: Prometheus metrics (served on their own HTTP port) and a window
//! of recent deliberations for `GetMetrics` percentiles and per-council success rates.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use council_inference::BackendLoad;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How a deliberation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ending {
    Completed,
    Failed,
    Timeout,
    Cancelled,
}

impl Ending {
    pub fn as_str(self) -> &'static str {
        match self {
            Ending::Completed => "completed",
            Ending::Failed => "failed",
            Ending::Timeout => "timeout",
            Ending::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    reason: String,
}

/// One finished deliberation, kept for a while for `GetMetrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub at_ms: i64,
    pub duration_ms: f64,
    pub role: String,
    pub ending: Ending,
}

/// Finished deliberations kept for percentiles.
const WINDOW: usize = 4096;

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    deliberations: Family<OutcomeLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    dispatch: Family<OutcomeLabels, Counter>,
    duration: Histogram,
    tokens: Family<KindLabels, Counter>,
    in_flight: Gauge,
    engine_waiting: Gauge,
    engine_running: Gauge,
    engine_batch: Gauge<f64, AtomicU64>,
    engine_prefix_hit_rate: Gauge<f64, AtomicU64>,
    recent: Mutex<VecDeque<Finished>>,
    /// (calls, summed microseconds) of backend calls as the driver saw them.
    calls: Mutex<(u64, u64)>,
    /// Since start: (finished, completed, summed milliseconds of the completed ones).
    totals: Mutex<(u64, u64, f64)>,
    /// Since start: finished deliberations per role.
    per_role: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Since start: (orchestrations, summed milliseconds).
    orchestrations: Mutex<(u64, f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("council");
        let deliberations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "deliberations",
            "Deliberations finished, by outcome",
            deliberations.clone(),
        );
        let rejected = Family::<RejectLabels, Counter>::default();
        registry.register(
            "deliberations_rejected",
            "Deliberation requests refused before running, by reason",
            rejected.clone(),
        );
        let dispatch = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "dispatch_messages",
            "JetStream task deliveries handled, by outcome (completed, duplicate, retried, dead_lettered, handed_over)",
            dispatch.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register(
            "deliberation_duration_seconds",
            "Wall time of finished deliberations",
            duration.clone(),
        );
        let tokens = Family::<KindLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens spent by deliberations (prompt, completion)",
            tokens.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "deliberations_in_flight",
            "Deliberations running now",
            in_flight.clone(),
        );
        let engine_waiting = Gauge::default();
        registry.register(
            "backend_queue_depth",
            "Backend requests accepted and waiting for a place in the batch",
            engine_waiting.clone(),
        );
        let engine_running = Gauge::default();
        registry.register(
            "backend_running",
            "Backend requests in the batch now",
            engine_running.clone(),
        );
        let engine_batch = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "backend_mean_batch_size",
            "Mean sequences per forward pass since start",
            engine_batch.clone(),
        );
        let engine_prefix_hit_rate = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "backend_prefix_cache_hit_rate",
            "Prefix-cache hits per lookup since start (-1 when the backend has no prefix cache)",
            engine_prefix_hit_rate.clone(),
        );
        Self {
            registry,
            deliberations,
            rejected,
            dispatch,
            duration,
            tokens,
            in_flight,
            engine_waiting,
            engine_running,
            engine_batch,
            engine_prefix_hit_rate,
            recent: Mutex::new(VecDeque::new()),
            calls: Mutex::new((0, 0)),
            totals: Mutex::new((0, 0, 0.0)),
            per_role: Mutex::new(std::collections::BTreeMap::new()),
            orchestrations: Mutex::new((0, 0.0)),
        }
    }

    pub fn started(&self) {
        self.in_flight.inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&RejectLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A task delivery from JetStream was handled this way.
    pub fn dispatched(&self, outcome: &str) {
        self.dispatch
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A deliberation that was started ended.
    pub fn finished(&self, f: Finished, prompt_tokens: u64, completion_tokens: u64) {
        self.in_flight.dec();
        self.deliberations
            .get_or_create(&OutcomeLabels {
                outcome: f.ending.as_str().to_owned(),
            })
            .inc();
        self.duration.observe(f.duration_ms / 1000.0);
        for (kind, n) in [("prompt", prompt_tokens), ("completion", completion_tokens)] {
            self.tokens
                .get_or_create(&KindLabels { kind: kind.into() })
                .inc_by(n);
        }
        if let Ok(mut per_role) = self.per_role.lock() {
            *per_role.entry(f.role.clone()).or_default() += 1;
        }
        if let Ok(mut t) = self.totals.lock() {
            t.0 += 1;
            if f.ending == Ending::Completed {
                t.1 += 1;
                t.2 += f.duration_ms;
            }
        }
        if let Ok(mut recent) = self.recent.lock() {
            if recent.len() == WINDOW {
                recent.pop_front();
            }
            recent.push_back(f);
        }
    }

    /// One backend call came back after `latency` (from its phase's submission).
    pub fn call_done(&self, latency: std::time::Duration) {
        if let Ok(mut c) = self.calls.lock() {
            c.0 += 1;
            c.1 += latency.as_micros() as u64;
        }
    }

    /// Mean backend call latency since start, in milliseconds (0 before any call).
    pub fn mean_call_ms(&self) -> f64 {
        self.calls.lock().map_or(0.0, |c| {
            if c.0 == 0 {
                0.0
            } else {
                c.1 as f64 / c.0 as f64 / 1000.0
            }
        })
    }

    /// Since start: deliberations finished, and the mean time of the completed ones (ms).
    pub fn totals(&self) -> (u64, f64) {
        self.totals.lock().map_or((0, 0.0), |t| {
            (t.0, if t.1 == 0 { 0.0 } else { t.2 / t.1 as f64 })
        })
    }

    /// One `Orchestrate` answered (deliberation and architect together).
    pub fn orchestrated(&self, took: std::time::Duration) {
        if let Ok(mut o) = self.orchestrations.lock() {
            o.0 += 1;
            o.1 += took.as_secs_f64() * 1000.0;
        }
    }

    /// (orchestrations, mean milliseconds) since start.
    pub fn orchestrations(&self) -> (u64, f64) {
        self.orchestrations.lock().map_or((0, 0.0), |o| {
            (o.0, if o.0 == 0 { 0.0 } else { o.1 / o.0 as f64 })
        })
    }

    /// Finished deliberations per role since start.
    pub fn per_role(&self) -> std::collections::BTreeMap<String, u64> {
        self.per_role.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// Finished deliberations since `since_ms` (all kept ones for `i64::MIN`), oldest first.
    pub fn recent(&self, since_ms: i64) -> Vec<Finished> {
        self.recent
            .lock()
            .map(|r| r.iter().filter(|f| f.at_ms >= since_ms).cloned().collect())
            .unwrap_or_default()
    }

    /// The Prometheus text exposition, with backend gauges read now.
    pub fn encode(&self, load: &BackendLoad) -> String {
        self.engine_waiting.set(load.waiting as i64);
        self.engine_running.set(load.running as i64);
        self.engine_batch.set(if load.steps == 0 {
            0.0
        } else {
            load.batched_sequences as f64 / load.steps as f64
        });
        self.engine_prefix_hit_rate.set(match load.prefix_cache {
            Some((_, 0)) => 0.0,
            Some((hits, lookups)) => hits as f64 / lookups as f64,
            None => -1.0,
        });
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The `q`-quantile (0..=1) of `values` by nearest rank; 0 for none.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (q * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

/// Per role: (finished, completed).
pub fn by_role(finished: &[Finished]) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::<String, (u64, u64)>::new();
    for f in finished {
        let e = out.entry(f.role.clone()).or_default();
        e.0 += 1;
        if f.ending == Ending::Completed {
            e.1 += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(quantile(&mut [7.0], 0.5), 7.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn exposition_counts_outcomes_tokens_and_backend_load() {
        let m = Metrics::new();
        m.started();
        m.started();
        m.finished(
            Finished {
                at_ms: 5,
                duration_ms: 1500.0,
                role: "DEV".into(),
                ending: Ending::Completed,
            },
            100,
            20,
        );
        m.rejected("overloaded");
        let text = m.encode(&BackendLoad {
            waiting: 3,
            running: 2,
            steps: 4,
            batched_sequences: 10,
            ..Default::default()
        });
        for line in [
            "council_deliberations_total{outcome=\"completed\"} 1",
            "council_deliberations_rejected_total{reason=\"overloaded\"} 1",
            "council_tokens_total{kind=\"prompt\"} 100",
            "council_tokens_total{kind=\"completion\"} 20",
            "council_deliberations_in_flight 1",
            "council_backend_queue_depth 3",
            "council_backend_running 2",
            "council_backend_mean_batch_size 2.5",
            "council_backend_prefix_cache_hit_rate -1.0",
            "council_deliberation_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(m.recent(6), vec![]);
        assert_eq!(m.totals(), (1, 1500.0));
        assert_eq!(by_role(&m.recent(0)).get("DEV"), Some(&(1, 1)));
    }
}
