//! `fleet.orchestrator.v1.OrchestratorService`: validate, convert, call, convert back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use council_councils::personas::council_of;
use council_councils::{Deliberation, OutcomeStatus, Role};
use council_inference::Backend;
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::orchestrator_service_server::OrchestratorService;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use super::Limits;
use super::convert;
use super::status::{ServiceError, invalid};
use crate::driver;
use crate::store::{CouncilStore, Created};

/// Deliberations served since start, for status and metrics.
#[derive(Debug, Default)]
struct Counters {
    deliberations: AtomicU64,
    total_ms: AtomicU64,
}

/// The service state shared by all handlers.
#[derive(Debug)]
pub struct Orchestrator {
    backend: Arc<dyn Backend>,
    store: Arc<dyn CouncilStore>,
    limits: Limits,
    permits: Arc<Semaphore>,
    started: Instant,
    counters: Counters,
}

fn role(field: &'static str, s: &str) -> Result<Role, ServiceError> {
    s.parse()
        .map_err(|e: council_councils::RoleError| invalid(field, e.to_string()))
}

impl Orchestrator {
    pub fn new(backend: Arc<dyn Backend>, store: Arc<dyn CouncilStore>, limits: Limits) -> Self {
        Self {
            backend,
            store,
            permits: Arc::new(Semaphore::new(limits.max_concurrent)),
            limits,
            started: Instant::now(),
            counters: Counters::default(),
        }
    }

    async fn deliberate_inner(
        &self,
        req: pb::DeliberateRequest,
    ) -> Result<pb::DeliberateResponse, ServiceError> {
        let started = Instant::now();
        let task = convert::task(&req)?;
        let role = role("role", &req.role)?;
        let council = self
            .store
            .get(&role)?
            .ok_or_else(|| ServiceError::UnknownRole(role.to_string()))?;
        let council = convert::council_for(council, &req)?;
        let deadline =
            convert::timeout(&req, self.limits.default_timeout, self.limits.max_timeout)?;
        let _permit =
            self.permits
                .clone()
                .try_acquire_owned()
                .map_err(|_| ServiceError::Overloaded {
                    running: self.limits.max_concurrent,
                    limit: self.limits.max_concurrent,
                })?;
        // The seed comes from the task id: a redelivered task deliberates the same way.
        let seed = council_councils::rng::hash_str(task.id.as_str());
        let config = council.config;
        let deliberation = Deliberation::new(council, task, config, seed);
        let (outcome, timeline) = tokio::time::timeout(
            deadline,
            driver::run_timed(self.backend.as_ref(), deliberation),
        )
        .await
        .map_err(|_| ServiceError::DeadlineExceeded(deadline))??;
        if let OutcomeStatus::Failed { reason } = &outcome.status {
            return Err(ServiceError::DeliberationFailed(reason.clone()));
        }
        let duration_ms = started.elapsed().as_millis() as i64;
        self.counters.deliberations.fetch_add(1, Ordering::Relaxed);
        self.counters
            .total_ms
            .fetch_add(duration_ms as u64, Ordering::Relaxed);
        Ok(pb::DeliberateResponse {
            task_id: req.task_id,
            results: outcome
                .proposals
                .iter()
                .map(|p| convert::result(p, &timeline))
                .collect(),
            winner_id: outcome
                .winner
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            duration_ms,
            metadata: Some(pb::OrchestratorMetadata {
                orchestrator_version: env!("CARGO_PKG_VERSION").to_owned(),
                timestamp_ms: convert::millis(SystemTime::now()),
                execution_id: format!("{}-{seed:016x}", outcome.task),
                tags: Default::default(),
            }),
            summary: Some(convert::summary(&outcome)),
        })
    }

    fn create_inner(
        &self,
        req: pb::CreateCouncilRequest,
    ) -> Result<pb::CreateCouncilResponse, ServiceError> {
        let role = role("role", &req.role)?;
        let size = match req.num_agents {
            0 => 3,
            n if (1..=council_councils::CouncilSpec::MAX_AGENTS as i32).contains(&n) => n as usize,
            n => {
                return Err(invalid(
                    "num_agents",
                    format!(
                        "{n} is outside 1..={}",
                        council_councils::CouncilSpec::MAX_AGENTS
                    ),
                ));
            }
        };
        let mut council = council_of(&role, size).map_err(|e| invalid("role", e.to_string()))?;
        if let Some(cfg) = &req.config {
            if !(0..=council_councils::spec::DeliberationConfig::MAX_ROUNDS as i32)
                .contains(&cfg.deliberation_rounds)
            {
                return Err(invalid(
                    "config.deliberation_rounds",
                    format!("{} is outside 0..=10", cfg.deliberation_rounds),
                ));
            }
            council.config.rounds = cfg.deliberation_rounds as u32;
            if !cfg.model_profile.is_empty() {
                for a in &mut council.agents {
                    a.model_profile = cfg.model_profile.clone();
                }
            }
        }
        let agent_ids = council.agents.iter().map(|a| a.id.to_string()).collect();
        let council_id = council.id.to_string();
        let created = self.store.create(council)?;
        Ok(pb::CreateCouncilResponse {
            council_id,
            agents_created: if created == Created::New {
                size as i32
            } else {
                0
            },
            agent_ids,
        })
    }
}

#[tonic::async_trait]
impl OrchestratorService for Orchestrator {
    async fn deliberate(
        &self,
        request: Request<pb::DeliberateRequest>,
    ) -> Result<Response<pb::DeliberateResponse>, Status> {
        Ok(Response::new(
            self.deliberate_inner(request.into_inner()).await?,
        ))
    }

    type StreamDeliberationStream = tonic::codegen::BoxStream<pb::DeliberationUpdate>;

    async fn stream_deliberation(
        &self,
        _request: Request<pb::DeliberateRequest>,
    ) -> Result<Response<Self::StreamDeliberationStream>, Status> {
        Err(ServiceError::NotImplemented("StreamDeliberation").into())
    }

    async fn get_deliberation_result(
        &self,
        _request: Request<pb::GetDeliberationResultRequest>,
    ) -> Result<Response<pb::GetDeliberationResultResponse>, Status> {
        Err(ServiceError::NotImplemented("GetDeliberationResult").into())
    }

    async fn create_council(
        &self,
        request: Request<pb::CreateCouncilRequest>,
    ) -> Result<Response<pb::CreateCouncilResponse>, Status> {
        Ok(Response::new(self.create_inner(request.into_inner())?))
    }

    async fn list_councils(
        &self,
        request: Request<pb::ListCouncilsRequest>,
    ) -> Result<Response<pb::ListCouncilsResponse>, Status> {
        let req = request.into_inner();
        let filter = if req.role_filter.is_empty() {
            None
        } else {
            Some(role("role_filter", &req.role_filter)?)
        };
        let model = self.backend.model_info().name.clone();
        let councils = self
            .store
            .list()
            .map_err(ServiceError::from)?
            .iter()
            .filter(|c| filter.as_ref().is_none_or(|r| *r == c.role))
            .map(|c| convert::council_info(c, req.include_agents, &model))
            .collect();
        Ok(Response::new(pb::ListCouncilsResponse { councils }))
    }

    async fn delete_council(
        &self,
        request: Request<pb::DeleteCouncilRequest>,
    ) -> Result<Response<pb::DeleteCouncilResponse>, Status> {
        let role = role("role", &request.into_inner().role)?;
        let removed = self.store.delete(&role).map_err(ServiceError::from)?;
        Ok(Response::new(pb::DeleteCouncilResponse {
            success: true,
            message: format!("deleted council {} of role {role}", removed.id),
            agents_removed: removed.agents.len() as i32,
        }))
    }

    async fn register_agent(
        &self,
        _request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        Err(ServiceError::NotImplemented("RegisterAgent").into())
    }

    async fn unregister_agent(
        &self,
        _request: Request<pb::UnregisterAgentRequest>,
    ) -> Result<Response<pb::UnregisterAgentResponse>, Status> {
        Err(ServiceError::NotImplemented("UnregisterAgent").into())
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let councils = self.store.list().map_err(ServiceError::from)?;
        let status = match self.backend.health() {
            council_inference::Health::Ready => "SERVING".to_owned(),
            council_inference::Health::Unavailable { reason } => format!("NOT_SERVING: {reason}"),
        };
        let stats = request.into_inner().include_stats.then(|| {
            let n = self.counters.deliberations.load(Ordering::Relaxed);
            let total = self.counters.total_ms.load(Ordering::Relaxed);
            pb::OrchestratorStats {
                total_deliberations: n as i64,
                total_orchestrations: n as i64,
                avg_deliberation_time_ms: if n == 0 { 0.0 } else { total as f64 / n as f64 },
                active_councils: councils.len() as i64,
                role_counts: councils
                    .iter()
                    .map(|c| (c.role.to_string(), c.agents.len() as i64))
                    .collect(),
            }
        });
        Ok(Response::new(pb::GetStatusResponse {
            status,
            uptime_seconds: self.started.elapsed().as_secs() as i64,
            stats,
        }))
    }

    async fn get_metrics(
        &self,
        _request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        Err(ServiceError::NotImplemented("GetMetrics").into())
    }
}
