//! Readiness and broker connectivity, as `/health` reports them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// The process's health, shared (cheap clones) between the process, the sampler and the HTTP handlers.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    process: &'static str,
    messaging_backend: &'static str,
    enabled: Vec<String>,
    disabled: Vec<String>,
    /// How long the broker may be unreachable before `/health` answers 503.
    grace: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    ready: bool,
    detail: Option<String>,
    brokers: Vec<BrokerEntry>,
    dependencies: Vec<DependencyEntry>,
    embedder: Option<EmbedderInfo>,
}

/// Which embedder the handlers use (`EMBEDDING_PROVIDER`) and the model it writes into `embedding_model`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EmbedderInfo {
    pub provider: &'static str,
    pub model: String,
}

/// A dependency the handlers use (embedder, vector store, dead-letter destination), as their calls found it.
struct DependencyEntry {
    name: String,
    failing_since: Option<Instant>,
    error: Option<String>,
}

struct BrokerEntry {
    name: String,
    target: String,
    last_ok: Option<Instant>,
    failing_since: Option<Instant>,
    error: Option<String>,
}

/// `ok`: serving; `starting`: not ready yet; `unavailable`: a broker has been unreachable past the grace period;
/// `degraded`: serving, but a dependency of the handlers (embedder, vector store, dead letters) is failing and work
/// waits on retries; `disabled`: `MESSAGING_BACKEND=disabled`, consuming nothing by design (healthy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    Starting,
    Unavailable,
    Degraded,
    Disabled,
}

impl HealthStatus {
    pub const ALL: [HealthStatus; 5] = [
        Self::Ok,
        Self::Starting,
        Self::Unavailable,
        Self::Degraded,
        Self::Disabled,
    ];

    /// As `/health` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Starting => "starting",
            Self::Unavailable => "unavailable",
            Self::Degraded => "degraded",
            Self::Disabled => "disabled",
        }
    }

    /// 200 for `ok`/`degraded`/`disabled`, 503 otherwise. A degraded process is alive and retrying: restarting it
    /// would not bring its dependency back, so it is not reported as down.
    pub fn http_code(self) -> u16 {
        match self {
            Self::Ok | Self::Degraded | Self::Disabled => 200,
            Self::Starting | Self::Unavailable => 503,
        }
    }
}

/// One broker's connectivity as `/health` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct BrokerState {
    pub name: String,
    /// Where it is (passwords redacted).
    pub target: String,
    pub reachable: bool,
    /// Seconds since the last successful check (`null`: never reached).
    pub last_ok_seconds_ago: Option<f64>,
    /// Seconds it has been failing (`null`: it is not).
    pub unreachable_for_seconds: Option<f64>,
    pub error: Option<String>,
}

/// One handler dependency as `/health` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct DependencyState {
    pub name: String,
    pub ok: bool,
    /// Seconds it has been failing (`null`: it is not).
    pub failing_for_seconds: Option<f64>,
    pub error: Option<String>,
}

impl BrokerEntry {
    fn state(&self, now: Instant) -> BrokerState {
        BrokerState {
            name: self.name.clone(),
            target: self.target.clone(),
            reachable: self.failing_since.is_none(),
            last_ok_seconds_ago: self.last_ok.map(|t| round(now - t)),
            unreachable_for_seconds: self.failing_since.map(|t| round(now - t)),
            error: self.error.clone(),
        }
    }
}

impl DependencyEntry {
    fn state(&self, now: Instant) -> DependencyState {
        DependencyState {
            name: self.name.clone(),
            ok: self.failing_since.is_none(),
            failing_for_seconds: self.failing_since.map(|t| round(now - t)),
            error: self.error.clone(),
        }
    }
}

/// The `/health` body.
#[derive(Clone, Debug, Serialize)]
pub struct HealthReport {
    pub status: HealthStatus,
    pub process: &'static str,
    pub messaging_backend: &'static str,
    pub ready: bool,
    pub handlers: Handlers,
    pub brokers: Vec<BrokerState>,
    pub dependencies: Vec<DependencyState>,
    pub embedder: Option<EmbedderInfo>,
    /// Why the process is not ready, or what it is doing instead of consuming.
    pub detail: Option<String>,
    pub version: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Handlers {
    pub enabled: Vec<String>,
    pub disabled: Vec<String>,
}

impl Health {
    pub fn new(
        process: &'static str,
        messaging_backend: &'static str,
        enabled: Vec<String>,
        disabled: Vec<String>,
        grace: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                process,
                messaging_backend,
                enabled,
                disabled,
                grace,
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written (plain field stores).
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the embedder the process's handlers use.
    pub fn set_embedder(&self, provider: &'static str, model: &str) {
        self.state().embedder = Some(EmbedderInfo {
            provider,
            model: model.to_owned(),
        });
    }

    /// The process has opened what it needs and is consuming (or, disabled, is idling as asked).
    pub fn set_ready(&self, detail: Option<String>) {
        {
            let mut state = self.state();
            state.ready = true;
            state.detail = detail;
        }
        self.export_status();
    }

    /// Sets `aura360_health_status{status}`: 1 for what `/health` says now, 0 for every other status, so an alert
    /// on `status="unavailable"` has a series (at 0) from the start. Called at start, on readiness, after every
    /// broker sample (the grace period turns `ok` into `unavailable` with time) and when a dependency changes.
    pub fn export_status(&self) {
        let current = self.report().status;
        for status in HealthStatus::ALL {
            metrics::gauge!("aura360_health_status", "status" => status.as_str())
                .set(if status == current { 1.0 } else { 0.0 });
        }
    }

    /// A broker the process depends on; its connectivity is unknown (not reachable) until the first report.
    pub fn watch_broker(&self, name: &str, target: &str) {
        let mut state = self.state();
        if !state.brokers.iter().any(|b| b.name == name) {
            state.brokers.push(BrokerEntry {
                name: name.to_owned(),
                target: target.to_owned(),
                last_ok: None,
                failing_since: Some(Instant::now()),
                error: Some("not checked yet".into()),
            });
        }
    }

    /// The outcome of one connectivity check of broker `name`.
    pub fn broker_checked(&self, name: &str, result: Result<(), String>) {
        let mut state = self.state();
        let Some(entry) = state.brokers.iter_mut().find(|b| b.name == name) else {
            return;
        };
        let now = Instant::now();
        match result {
            Ok(()) => {
                if entry.failing_since.is_some() && entry.last_ok.is_some() {
                    tracing::info!(broker = %entry.name, target = %entry.target, "broker reachable again");
                }
                entry.last_ok = Some(now);
                entry.failing_since = None;
                entry.error = None;
            }
            Err(error) => {
                if entry.failing_since.is_none() {
                    tracing::warn!(broker = %entry.name, target = %entry.target, %error, "broker unreachable");
                    entry.failing_since = Some(now);
                }
                entry.error = Some(error);
            }
        }
    }

    /// The outcome of one call to a handler dependency: `Err` marks it failing (the process turns `degraded`),
    /// `Ok` clears it.
    pub fn dependency_checked(&self, name: &str, result: Result<(), String>) {
        let mut state = self.state();
        let index = match state.dependencies.iter().position(|d| d.name == name) {
            Some(index) => index,
            None if result.is_ok() => return,
            None => {
                state.dependencies.push(DependencyEntry {
                    name: name.to_owned(),
                    failing_since: None,
                    error: None,
                });
                state.dependencies.len() - 1
            }
        };
        let entry = &mut state.dependencies[index];
        // Every store write and embedding reports here: touch the gauge (a label allocation) only on a change.
        let up = |name: &str, value: f64| {
            metrics::gauge!("aura360_dependency_up", "dependency" => name.to_owned()).set(value)
        };
        let mut changed = false;
        match result {
            Ok(()) => {
                if entry.failing_since.take().is_some() {
                    tracing::info!(dependency = %entry.name, "dependency recovered");
                    up(&entry.name, 1.0);
                    changed = true;
                }
                entry.error = None;
            }
            Err(error) => {
                if entry.failing_since.is_none() {
                    tracing::warn!(dependency = %entry.name, %error, "dependency failing; work waits on retries");
                    entry.failing_since = Some(Instant::now());
                    up(&entry.name, 0.0);
                    changed = true;
                }
                entry.error = Some(error);
            }
        }
        drop(state);
        if changed {
            self.export_status();
        }
    }

    pub fn report(&self) -> HealthReport {
        let state = self.state();
        let now = Instant::now();
        let disabled = self.inner.messaging_backend == "disabled";
        let brokers: Vec<BrokerState> = state.brokers.iter().map(|b| b.state(now)).collect();
        // A broker never reached keeps the process "starting"; one lost for longer than the grace makes it
        // "unavailable" (a blip shorter than that does not flip a load balancer).
        let never_reached = state.brokers.iter().any(|b| b.last_ok.is_none());
        let lost = state.brokers.iter().any(|b| {
            b.last_ok.is_some() && b.failing_since.is_some_and(|t| now - t > self.inner.grace)
        });
        let dependencies: Vec<DependencyState> =
            state.dependencies.iter().map(|d| d.state(now)).collect();
        let status = if disabled && state.ready {
            HealthStatus::Disabled
        } else if !state.ready || never_reached {
            HealthStatus::Starting
        } else if lost {
            HealthStatus::Unavailable
        } else if dependencies.iter().any(|d| !d.ok) {
            HealthStatus::Degraded
        } else {
            HealthStatus::Ok
        };
        HealthReport {
            status,
            process: self.inner.process,
            messaging_backend: self.inner.messaging_backend,
            ready: state.ready,
            handlers: Handlers {
                enabled: self.inner.enabled.clone(),
                disabled: self.inner.disabled.clone(),
            },
            brokers,
            dependencies,
            embedder: state.embedder.clone(),
            detail: state.detail.clone(),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

fn round(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(backend: &'static str, grace: Duration) -> Health {
        Health::new(
            "test",
            backend,
            vec!["mood_created".into()],
            vec!["ingest_vectors".into()],
            grace,
        )
    }

    #[test]
    fn starting_until_ready_and_the_broker_answered() {
        let health = health("kafka", Duration::from_secs(30));
        health.watch_broker("kafka", "127.0.0.1:9092");
        assert_eq!(health.report().status, HealthStatus::Starting);
        health.set_ready(None);
        assert_eq!(health.report().status, HealthStatus::Starting);
        health.broker_checked("kafka", Ok(()));
        let report = health.report();
        assert_eq!(report.status, HealthStatus::Ok);
        assert_eq!(report.status.http_code(), 200);
        assert!(report.brokers[0].reachable);
        assert_eq!(report.handlers.disabled, ["ingest_vectors"]);
    }

    #[test]
    fn unavailable_only_after_the_grace_period() {
        let health = health("celery", Duration::from_millis(50));
        health.watch_broker("redis", "redis://127.0.0.1:6379/0");
        health.set_ready(None);
        health.broker_checked("redis", Ok(()));
        health.broker_checked("redis", Err("connection refused".into()));
        let report = health.report();
        assert_eq!(report.status, HealthStatus::Ok, "a blip is not an outage");
        assert!(!report.brokers[0].reachable);
        std::thread::sleep(Duration::from_millis(80));
        let report = health.report();
        assert_eq!(report.status, HealthStatus::Unavailable);
        assert_eq!(report.status.http_code(), 503);
        assert_eq!(
            report.brokers[0].error.as_deref(),
            Some("connection refused")
        );
        health.broker_checked("redis", Ok(()));
        assert_eq!(health.report().status, HealthStatus::Ok);
    }

    #[test]
    fn a_failing_dependency_degrades_until_it_recovers() {
        let health = health("kafka", Duration::from_secs(30));
        health.set_ready(None);
        health.dependency_checked("embedder", Ok(()));
        assert_eq!(health.report().status, HealthStatus::Ok);
        assert!(
            health.report().dependencies.is_empty(),
            "never failed: not listed"
        );
        health.dependency_checked("embedder", Err("503 Service Unavailable".into()));
        let report = health.report();
        assert_eq!(report.status, HealthStatus::Degraded);
        assert_eq!(report.status.http_code(), 200);
        assert_eq!(report.dependencies[0].name, "embedder");
        assert!(!report.dependencies[0].ok);
        health.dependency_checked("embedder", Ok(()));
        let report = health.report();
        assert_eq!(report.status, HealthStatus::Ok);
        assert!(report.dependencies[0].ok);
    }

    #[test]
    fn disabled_is_healthy_once_idling() {
        let health = health("disabled", Duration::from_secs(1));
        assert_eq!(health.report().status, HealthStatus::Starting);
        health.set_ready(Some("consuming nothing".into()));
        assert_eq!(health.report().status, HealthStatus::Disabled);
        assert_eq!(health.report().status.http_code(), 200);
    }
}
