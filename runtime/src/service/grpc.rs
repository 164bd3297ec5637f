//! `fleet.orchestrator.v1.OrchestratorService`: validate, convert, call, convert back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use council_councils::personas::council_of;
use council_councils::{AgentId, CouncilSpec, Role, TaskId};
use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::orchestrator_service_server::OrchestratorService;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::orchestrate;
use super::wire::{UpdateStream, grpc_timeout, run_request};
use crate::run::convert;
use crate::run::error::{RunError, invalid};
use crate::run::metrics::{by_role, quantile};
use crate::run::{ResultSink, RunRequest, Runner, Started, role};
use crate::store::{Created, StoreError, effective, now_ms};

/// The service state shared by all handlers.
#[derive(Debug)]
pub struct Orchestrator {
    runner: Arc<Runner>,
    started: Instant,
    results: Option<Arc<dyn ResultSink>>,
}

/// The agent id and role of a Register/UnregisterAgent request, validated.
fn agent_of(agent_id: &str, role_name: &str) -> Result<(AgentId, Role), RunError> {
    let id = AgentId::new(agent_id).map_err(|e| invalid("agent_id", e.to_string()))?;
    Ok((id, role("role", role_name)?))
}

/// Compare-and-set attempts before a concurrent writer wins.
const CAS_ATTEMPTS: usize = 5;

impl Orchestrator {
    pub fn new(runner: Arc<Runner>, results: Option<Arc<dyn ResultSink>>) -> Self {
        Self {
            runner,
            started: Instant::now(),
            results,
        }
    }

    async fn deliberate_inner(
        &self,
        req: RunRequest,
        client_deadline: Option<std::time::Duration>,
    ) -> Result<pb::DeliberateResponse, RunError> {
        match self.runner.start(req, client_deadline, None).await? {
            Started::Done(response) => Ok(*response),
            Started::Running(run) => run.result().await,
        }
    }

    async fn result_inner(
        &self,
        req: pb::GetDeliberationResultRequest,
    ) -> Result<pb::GetDeliberationResultResponse, RunError> {
        let task = TaskId::new(req.task_id).map_err(|e| invalid("task_id", e.to_string()))?;
        let record = self
            .runner
            .store()
            .record(task.as_str())
            .await?
            .ok_or_else(|| {
                RunError::NotFound(format!(
                    "no deliberation of task {task} (never accepted here, or removed after its retention)"
                ))
            })?;
        Ok(convert::record_result(effective(record, now_ms())))
    }

    /// Applies `change` to the council of `role` by compare-and-set, retrying on conflicts.
    async fn change_council<T>(
        &self,
        role: &Role,
        change: impl Fn(&CouncilSpec) -> Result<(CouncilSpec, T), RunError>,
    ) -> Result<(CouncilSpec, T), RunError> {
        let store = self.runner.store();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = store.get(role).await?.ok_or_else(|| {
                RunError::NotFound(format!(
                    "no council for role {role}; create it with CreateCouncil first"
                ))
            })?;
            let (next, out) = change(&current)?;
            if next == current {
                return Ok((next, out));
            }
            match store.replace(&current, next.clone()).await {
                Ok(()) => return Ok((next, out)),
                Err(StoreError::Conflict { .. }) if attempt < CAS_ATTEMPTS => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn register_inner(
        &self,
        req: pb::RegisterAgentRequest,
    ) -> Result<pb::RegisterAgentResponse, RunError> {
        let (id, role) = agent_of(&req.agent_id, &req.role)?;
        if !req.endpoint.is_empty() {
            return Err(invalid(
                "endpoint",
                "agents run on this service's inference backend; external agent endpoints are \
                 not supported (leave it empty)",
            ));
        }
        let persona = req.metadata.get("persona").cloned();
        if persona
            .as_ref()
            .is_some_and(|p| p.trim().is_empty() || p.len() > 2000)
        {
            return Err(invalid(
                "metadata.persona",
                "must be 1..=2000 bytes of text",
            ));
        }
        let temperature = match req.metadata.get("temperature") {
            None => None,
            Some(t) => Some(
                t.parse::<f32>()
                    .ok()
                    .filter(|t| t.is_finite() && *t >= 0.0)
                    .ok_or_else(|| {
                        invalid("metadata.temperature", format!("{t:?} is not a number ≥ 0"))
                    })?,
            ),
        };
        let profile = req
            .capabilities
            .as_ref()
            .map(|c| c.model_profile.clone())
            .filter(|p| !p.is_empty());
        let (council, registered) = self
            .change_council(&role, |current| {
                // A new member takes the next persona and temperature of the role's defaults.
                let template = council_of(&role, current.agents.len() + 1)
                    .map_err(|e| invalid("role", e.to_string()))?;
                let Some(mut agent) = template.agents.last().cloned() else {
                    return Err(invalid("role", "no template agent"));
                };
                agent.id = id.clone();
                agent.sampling.seed = council_councils::rng::hash_str(id.as_str());
                if let Some(p) = &persona {
                    agent.persona = p.clone();
                }
                if let Some(t) = temperature {
                    agent.sampling.temperature = t;
                }
                if let Some(p) = &profile {
                    agent.model_profile = p.clone();
                }
                if let Some(existing) = current.agents.iter().find(|a| a.id == id) {
                    // Same registration again: nothing changes. Different: refuse.
                    let same = persona.as_ref().is_none_or(|p| *p == existing.persona)
                        && temperature.is_none_or(|t| t == existing.sampling.temperature)
                        && profile
                            .as_ref()
                            .is_none_or(|p| *p == existing.model_profile);
                    return if same {
                        Ok((current.clone(), false))
                    } else {
                        Err(RunError::AlreadyExists(format!(
                            "agent {id} is already registered in council {} with other settings",
                            current.id
                        )))
                    };
                }
                let mut agents = current.agents.clone();
                agents.push(agent);
                let next = CouncilSpec::new(
                    current.id.clone(),
                    current.role.clone(),
                    agents,
                    current.config,
                )
                .map_err(|e| invalid("agent_id", e.to_string()))?;
                Ok((next, true))
            })
            .await?;
        Ok(pb::RegisterAgentResponse {
            success: true,
            message: if registered {
                format!("registered agent {id} in council {}", council.id)
            } else {
                format!(
                    "agent {id} was already registered in council {}",
                    council.id
                )
            },
            council_id: council.id.to_string(),
        })
    }

    async fn unregister_inner(
        &self,
        req: pb::UnregisterAgentRequest,
    ) -> Result<pb::UnregisterAgentResponse, RunError> {
        let (id, role) = agent_of(&req.agent_id, &req.role)?;
        let (council, ()) = self
            .change_council(&role, |current| {
                if !current.agents.iter().any(|a| a.id == id) {
                    return Err(RunError::NotFound(format!(
                        "no agent {id} in the council of role {role}"
                    )));
                }
                if current.agents.len() == 1 {
                    return Err(RunError::FailedPrecondition(format!(
                        "agent {id} is the last member of council {}; delete the council instead",
                        current.id
                    )));
                }
                let agents = current
                    .agents
                    .iter()
                    .filter(|a| a.id != id)
                    .cloned()
                    .collect();
                let next = CouncilSpec::new(
                    current.id.clone(),
                    current.role.clone(),
                    agents,
                    current.config,
                )
                .map_err(|e| invalid("agent_id", e.to_string()))?;
                Ok((next, ()))
            })
            .await?;
        Ok(pb::UnregisterAgentResponse {
            success: true,
            message: format!("unregistered agent {id} from council {}", council.id),
        })
    }

    async fn status_inner(&self, include_stats: bool) -> Result<pb::GetStatusResponse, RunError> {
        let councils = self.runner.store().list().await?;
        let status = if self.runner.is_draining() {
            "DRAINING".to_owned()
        } else {
            match self.runner.backend().health().problem() {
                None => "SERVING".to_owned(),
                Some(reason) => format!("NOT_SERVING: {reason}"),
            }
        };
        let stats = include_stats.then(|| {
            // Since start, not only the window kept for percentiles.
            let (finished, avg_ms) = self.runner.metrics().totals();
            let (orchestrations, _) = self.runner.metrics().orchestrations();
            pb::OrchestratorStats {
                total_deliberations: finished as i64,
                total_orchestrations: orchestrations as i64,
                avg_deliberation_time_ms: avg_ms,
                active_councils: councils.len() as i64,
                // Deliberations per role since start, as upstream counts them.
                role_counts: self
                    .runner
                    .metrics()
                    .per_role()
                    .into_iter()
                    .map(|(role, n)| (role, n as i64))
                    .collect(),
            }
        });
        Ok(pb::GetStatusResponse {
            status,
            uptime_seconds: self.started.elapsed().as_secs() as i64,
            stats,
        })
    }

    async fn metrics_inner(
        &self,
        req: pb::GetMetricsRequest,
    ) -> Result<pb::GetMetricsResponse, RunError> {
        let kind = req.metric_type.to_ascii_lowercase();
        let want = |k: &str| kind.is_empty() || kind == "all" || kind == k;
        if !["", "all", "performance", "agents", "councils"].contains(&kind.as_str()) {
            return Err(invalid(
                "metric_type",
                format!(
                    "{:?}: use performance, agents, councils, all or empty",
                    req.metric_type
                ),
            ));
        }
        let since = match req.time_range_ms {
            r if r < 0 => return Err(invalid("time_range_ms", format!("{r} is negative"))),
            0 => i64::MIN,
            r => now_ms().saturating_sub(r),
        };
        let finished = self.runner.metrics().recent(since);
        let councils = self.runner.store().list().await?;
        let busy = self.runner.busy_by_role();
        let performance = want("performance").then(|| {
            let mut completed: Vec<f64> = finished
                .iter()
                .filter(|f| f.ending == crate::run::metrics::Ending::Completed)
                .map(|f| f.duration_ms)
                .collect();
            let avg = mean(&completed);
            pb::PerformanceMetrics {
                avg_deliberation_ms: avg,
                // Since start (the window of recent runs holds deliberations only).
                avg_orchestration_ms: self.runner.metrics().orchestrations().1,
                p50_latency_ms: quantile(&mut completed, 0.50),
                p95_latency_ms: quantile(&mut completed, 0.95),
                p99_latency_ms: quantile(&mut completed, 0.99),
            }
        });
        let busy_agents = |c: &CouncilSpec| {
            busy.get(c.role.as_str())
                .copied()
                .unwrap_or(0)
                .min(c.agents.len() as u64)
        };
        let agents = want("agents").then(|| {
            let mut per_role: HashMap<String, i64> = HashMap::new();
            for c in &councils {
                *per_role.entry(c.role.to_string()).or_default() += c.agents.len() as i64;
            }
            pb::AgentMetrics {
                total_agents: councils.iter().map(|c| c.agents.len() as i64).sum(),
                active_agents: councils.iter().map(|c| busy_agents(c) as i64).sum(),
                agents_per_role: per_role,
                avg_agent_response_time_ms: self.runner.metrics().mean_call_ms(),
            }
        });
        let council_metrics = want("councils").then(|| {
            let outcomes = by_role(&finished);
            pb::CouncilMetrics {
                total_councils: councils.len() as i64,
                active_councils: councils.iter().filter(|c| busy_agents(c) > 0).count() as i64,
                health_per_council: councils
                    .iter()
                    .map(|c| {
                        let (n, ok) = outcomes.get(c.role.as_str()).copied().unwrap_or((0, 0));
                        let busy = busy_agents(c);
                        let success_rate = if n == 0 { 0.0 } else { ok as f64 / n as f64 };
                        let status = if n >= 3 && success_rate < 0.5 {
                            "degraded"
                        } else if busy > 0 {
                            "busy"
                        } else {
                            "ready"
                        };
                        (
                            c.id.to_string(),
                            pb::CouncilHealth {
                                status: status.into(),
                                available_agents: (c.agents.len() as u64 - busy) as i32,
                                busy_agents: busy as i32,
                                success_rate,
                            },
                        )
                    })
                    .collect(),
            }
        });
        Ok(pb::GetMetricsResponse {
            performance,
            agents,
            councils: council_metrics,
        })
    }

    async fn create_inner(
        &self,
        req: pb::CreateCouncilRequest,
    ) -> Result<pb::CreateCouncilResponse, RunError> {
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
            // 0 (unset) keeps the default of one review round.
            if cfg.deliberation_rounds > 0 {
                council.config.rounds = cfg.deliberation_rounds as u32;
            }
            if !cfg.model_profile.is_empty() {
                for a in &mut council.agents {
                    a.model_profile = cfg.model_profile.clone();
                }
            }
        }
        let agent_ids = council.agents.iter().map(|a| a.id.to_string()).collect();
        let council_id = council.id.to_string();
        let created = self.runner.store().create(council).await?;
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

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

#[tonic::async_trait]
impl OrchestratorService for Orchestrator {
    async fn deliberate(
        &self,
        request: Request<pb::DeliberateRequest>,
    ) -> Result<Response<pb::DeliberateResponse>, Status> {
        let deadline = grpc_timeout(request.metadata());
        Ok(Response::new(
            self.deliberate_inner(run_request(request.get_ref())?, deadline)
                .await?,
        ))
    }

    type StreamDeliberationStream = UpdateStream;

    async fn stream_deliberation(
        &self,
        request: Request<pb::DeliberateRequest>,
    ) -> Result<Response<Self::StreamDeliberationStream>, Status> {
        let deadline = grpc_timeout(request.metadata());
        let req = run_request(request.get_ref())?;
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Response::new(
            match self.runner.start(req, deadline, Some(tx)).await? {
                Started::Done(response) => UpdateStream::Done(response),
                Started::Running(run) => UpdateStream::Running { progress: rx, run },
            },
        ))
    }

    async fn get_deliberation_result(
        &self,
        request: Request<pb::GetDeliberationResultRequest>,
    ) -> Result<Response<pb::GetDeliberationResultResponse>, Status> {
        Ok(Response::new(
            self.result_inner(request.into_inner()).await?,
        ))
    }

    async fn create_council(
        &self,
        request: Request<pb::CreateCouncilRequest>,
    ) -> Result<Response<pb::CreateCouncilResponse>, Status> {
        Ok(Response::new(
            self.create_inner(request.into_inner()).await?,
        ))
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
        let model = self.runner.backend().model_info().name.clone();
        let busy = self.runner.busy_by_role();
        let councils = self
            .runner
            .store()
            .list()
            .await
            .map_err(RunError::from)?
            .iter()
            .filter(|c| filter.as_ref().is_none_or(|r| *r == c.role))
            .map(|c| {
                let busy = busy.get(c.role.as_str()).copied().unwrap_or(0) > 0;
                convert::council_info(c, req.include_agents, &model, busy)
            })
            .collect();
        Ok(Response::new(pb::ListCouncilsResponse { councils }))
    }

    async fn delete_council(
        &self,
        request: Request<pb::DeleteCouncilRequest>,
    ) -> Result<Response<pb::DeleteCouncilResponse>, Status> {
        let role = role("role", &request.into_inner().role)?;
        let removed = self
            .runner
            .store()
            .delete(&role)
            .await
            .map_err(RunError::from)?;
        Ok(Response::new(pb::DeleteCouncilResponse {
            success: true,
            message: format!("deleted council {} of role {role}", removed.id),
            agents_removed: removed.agents.len() as i32,
        }))
    }

    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        Ok(Response::new(
            self.register_inner(request.into_inner()).await?,
        ))
    }

    async fn unregister_agent(
        &self,
        request: Request<pb::UnregisterAgentRequest>,
    ) -> Result<Response<pb::UnregisterAgentResponse>, Status> {
        Ok(Response::new(
            self.unregister_inner(request.into_inner()).await?,
        ))
    }

    async fn get_status(
        &self,
        request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        Ok(Response::new(
            self.status_inner(request.into_inner().include_stats)
                .await?,
        ))
    }

    async fn get_metrics(
        &self,
        request: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        Ok(Response::new(
            self.metrics_inner(request.into_inner()).await?,
        ))
    }

    async fn orchestrate(
        &self,
        request: Request<pb::OrchestrateRequest>,
    ) -> Result<Response<pb::OrchestrateResponse>, Status> {
        let deadline = grpc_timeout(request.metadata());
        let req = request.into_inner();
        let started = Instant::now();
        let (deliberation, k) = orchestrate::deliberation_request(&req)?;
        let deliberation = run_request(&deliberation)?;
        let response = self
            .deliberate_inner(deliberation.clone(), deadline)
            .await?;
        Ok(Response::new(
            orchestrate::choose(&self.runner, &deliberation.task, response, k, started).await?,
        ))
    }

    /// Upstream's contract: accepted and answered at once with the deliberation's id (the
    /// task id, made when empty); the council runs in the background, its record serves
    /// `GetDeliberationResult`, and with dispatch on its terminal event goes to JetStream as a
    /// dispatched task's does.
    async fn deliberate_for_backlog_review(
        &self,
        request: Request<pb::DeliberateRequest>,
    ) -> Result<Response<pb::DeliberateResponse>, Status> {
        // The id (made when empty) is in the request: the background task publishes under it.
        let req = run_request(request.get_ref())?;
        match self.runner.start(req.clone(), None, None).await? {
            // Completed before: its result is the answer.
            Started::Done(response) => Ok(Response::new(*response)),
            Started::Running(run) => {
                let answer = pb::DeliberateResponse {
                    task_id: req.task_id().to_owned(),
                    metadata: Some(pb::OrchestratorMetadata {
                        orchestrator_version: env!("CARGO_PKG_VERSION").to_owned(),
                        timestamp_ms: now_ms(),
                        execution_id: String::new(),
                        tags: HashMap::from([
                            ("deliberation_id".to_owned(), req.task_id().to_owned()),
                            ("status".to_owned(), "IN_PROGRESS".to_owned()),
                        ]),
                    }),
                    ..Default::default()
                };
                let results = self.results.clone();
                tokio::spawn(async move {
                    // Holding the handle keeps the run alive after this call returned.
                    let result = run.result().await;
                    if let Some(sink) = results {
                        sink.publish_result(&req, &result).await;
                    }
                });
                Ok(Response::new(answer))
            }
        }
    }

    async fn process_planning_event(
        &self,
        _request: Request<pb::PlanningEventRequest>,
    ) -> Result<Response<pb::PlanningEventResponse>, Status> {
        Err(Status::unimplemented(
            "ProcessPlanningEvent needs upstream's planning service, which council does not \
             integrate: planning events go to the planning service",
        ))
    }

    async fn derive_subtasks(
        &self,
        _request: Request<pb::DeriveSubtasksRequest>,
    ) -> Result<Response<pb::DeriveSubtasksResponse>, Status> {
        Err(Status::unimplemented(
            "DeriveSubtasks needs upstream's planning service (cases, plans and their task \
             graph), which council does not integrate",
        ))
    }

    async fn get_task_context(
        &self,
        _request: Request<pb::GetTaskContextRequest>,
    ) -> Result<Response<pb::GetTaskContextResponse>, Status> {
        Err(Status::unimplemented(
            "GetTaskContext needs upstream's context service, which council does not \
             integrate: ask the context service",
        ))
    }
}
