//! The wire contract cannot drift: field numbers and types of the upstream messages are
//! checked against the compiled descriptor.

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};

fn message(name: &str) -> DescriptorProto {
    let set =
        FileDescriptorSet::decode(council_proto::FILE_DESCRIPTOR_SET).expect("descriptor decodes");
    set.file
        .iter()
        .filter(|f| f.package() == "fleet.orchestrator.v1")
        .flat_map(|f| f.message_type.iter())
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("message {name} is missing"))
        .clone()
}

/// `(field, number, type, repeated)`; message-typed fields name their type.
fn check(name: &str, expected: &[(&str, i32, &str, bool)]) {
    let m = message(name);
    for (field, number, ty, repeated) in expected {
        let f = m
            .field
            .iter()
            .find(|f| f.name() == *field)
            .unwrap_or_else(|| panic!("{name}.{field} is missing"));
        assert_eq!(f.number(), *number, "{name}.{field} number");
        let actual = match f.r#type() {
            Type::String => "string".to_owned(),
            Type::Int32 => "int32".to_owned(),
            Type::Int64 => "int64".to_owned(),
            Type::Double => "double".to_owned(),
            Type::Bool => "bool".to_owned(),
            Type::Message | Type::Enum => f
                .type_name()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned(),
            other => format!("{other:?}"),
        };
        assert_eq!(actual, *ty, "{name}.{field} type");
        assert_eq!(
            f.label() == Label::Repeated,
            *repeated,
            "{name}.{field} repeated"
        );
    }
    let known: Vec<&str> = expected.iter().map(|e| e.0).collect();
    for f in &m.field {
        assert!(
            known.contains(&f.name()) || f.number() >= 100,
            "{name}.{} = {} is an addition below 100",
            f.name(),
            f.number()
        );
    }
}

#[test]
fn upstream_field_numbers_and_types_are_kept() {
    check(
        "DeliberateRequest",
        &[
            ("task_id", 1, "string", false),
            ("task_description", 2, "string", false),
            ("role", 3, "string", false),
            ("constraints", 4, "TaskConstraints", false),
            ("rounds", 5, "int32", false),
            ("num_agents", 6, "int32", false),
        ],
    );
    check(
        "DeliberateResponse",
        &[
            ("task_id", 1, "string", false),
            ("results", 2, "DeliberationResult", true),
            ("winner_id", 3, "string", false),
            ("duration_ms", 4, "int64", false),
            ("metadata", 5, "OrchestratorMetadata", false),
        ],
    );
    check(
        "TaskConstraints",
        &[
            ("rubric", 1, "string", false),
            ("requirements", 2, "string", true),
            ("metadata", 3, "MetadataEntry", true),
            ("max_iterations", 4, "int32", false),
            ("timeout_seconds", 5, "int32", false),
        ],
    );
    check(
        "DeliberationResult",
        &[
            ("proposal", 1, "Proposal", false),
            ("checks", 2, "CheckSuite", false),
            ("score", 3, "double", false),
            ("rank", 4, "int32", false),
        ],
    );
    check(
        "Proposal",
        &[
            ("author_id", 1, "string", false),
            ("author_role", 2, "string", false),
            ("content", 3, "string", false),
            ("created_at_ms", 4, "int64", false),
            ("revisions", 5, "string", true),
        ],
    );
    check(
        "CheckSuite",
        &[
            ("policy", 1, "PolicyResult", false),
            ("lint", 2, "LintResult", false),
            ("dryrun", 3, "DryRunResult", false),
            ("additional_checks", 4, "CheckResult", true),
            ("all_passed", 5, "bool", false),
        ],
    );
    check(
        "PolicyResult",
        &[
            ("passed", 1, "bool", false),
            ("violations", 2, "string", true),
            ("message", 3, "string", false),
        ],
    );
    check(
        "LintResult",
        &[
            ("passed", 1, "bool", false),
            ("error_count", 2, "int32", false),
            ("warning_count", 3, "int32", false),
            ("errors", 4, "string", true),
        ],
    );
    check(
        "DryRunResult",
        &[
            ("passed", 1, "bool", false),
            ("output", 2, "string", false),
            ("exit_code", 3, "int32", false),
            ("message", 4, "string", false),
        ],
    );
    check(
        "CheckResult",
        &[
            ("check_type", 1, "string", false),
            ("passed", 2, "bool", false),
            ("score", 3, "double", false),
            ("message", 4, "string", false),
            ("details", 5, "DetailsEntry", true),
        ],
    );
    check(
        "OrchestratorMetadata",
        &[
            ("orchestrator_version", 1, "string", false),
            ("timestamp_ms", 2, "int64", false),
            ("execution_id", 3, "string", false),
            ("tags", 4, "TagsEntry", true),
        ],
    );
    check(
        "GetDeliberationResultRequest",
        &[("task_id", 1, "string", false)],
    );
    check(
        "GetDeliberationResultResponse",
        &[
            ("task_id", 1, "string", false),
            ("status", 2, "DeliberationStatus", false),
            ("results", 3, "DeliberationResult", true),
            ("winner_id", 4, "string", false),
            ("duration_ms", 5, "int64", false),
            ("error_message", 6, "string", false),
            ("metadata", 7, "OrchestratorMetadata", false),
        ],
    );
    check(
        "DeliberationUpdate",
        &[
            ("status", 1, "string", false),
            ("progress_percent", 2, "int32", false),
            ("current_step", 3, "string", false),
            ("current_agent", 4, "string", false),
            ("partial_result", 5, "DeliberationResult", false),
        ],
    );
    check(
        "CreateCouncilRequest",
        &[
            ("role", 1, "string", false),
            ("num_agents", 2, "int32", false),
            ("config", 3, "CouncilConfig", false),
        ],
    );
    check(
        "CouncilConfig",
        &[
            ("deliberation_rounds", 1, "int32", false),
            ("enable_peer_review", 2, "bool", false),
            ("model_profile", 3, "string", false),
            ("custom_params", 4, "CustomParamsEntry", true),
            ("agent_type", 5, "string", false),
        ],
    );
    check(
        "CreateCouncilResponse",
        &[
            ("council_id", 1, "string", false),
            ("agents_created", 2, "int32", false),
            ("agent_ids", 3, "string", true),
        ],
    );
    check(
        "ListCouncilsRequest",
        &[
            ("role_filter", 1, "string", false),
            ("include_agents", 2, "bool", false),
        ],
    );
    check(
        "ListCouncilsResponse",
        &[("councils", 1, "CouncilInfo", true)],
    );
    check(
        "CouncilInfo",
        &[
            ("council_id", 1, "string", false),
            ("role", 2, "string", false),
            ("num_agents", 3, "int32", false),
            ("agents", 4, "AgentInfo", true),
            ("status", 5, "string", false),
            ("model", 6, "string", false),
        ],
    );
    check(
        "AgentInfo",
        &[
            ("agent_id", 1, "string", false),
            ("role", 2, "string", false),
            ("status", 3, "string", false),
            ("capabilities", 4, "AgentCapabilities", false),
        ],
    );
    check(
        "AgentCapabilities",
        &[
            ("supported_tasks", 1, "string", true),
            ("model_profile", 2, "string", false),
            ("max_concurrent_tasks", 3, "int32", false),
            ("languages", 4, "string", true),
        ],
    );
    check("DeleteCouncilRequest", &[("role", 1, "string", false)]);
    check(
        "DeleteCouncilResponse",
        &[
            ("success", 1, "bool", false),
            ("message", 2, "string", false),
            ("agents_removed", 3, "int32", false),
        ],
    );
    check(
        "RegisterAgentRequest",
        &[
            ("agent_id", 1, "string", false),
            ("role", 2, "string", false),
            ("capabilities", 3, "AgentCapabilities", false),
            ("endpoint", 4, "string", false),
            ("metadata", 5, "MetadataEntry", true),
        ],
    );
    check(
        "RegisterAgentResponse",
        &[
            ("success", 1, "bool", false),
            ("message", 2, "string", false),
            ("council_id", 3, "string", false),
        ],
    );
    check(
        "UnregisterAgentRequest",
        &[
            ("agent_id", 1, "string", false),
            ("role", 2, "string", false),
        ],
    );
    check(
        "UnregisterAgentResponse",
        &[
            ("success", 1, "bool", false),
            ("message", 2, "string", false),
        ],
    );
    check("GetStatusRequest", &[("include_stats", 1, "bool", false)]);
    check(
        "GetStatusResponse",
        &[
            ("status", 1, "string", false),
            ("uptime_seconds", 2, "int64", false),
            ("stats", 3, "OrchestratorStats", false),
        ],
    );
    check(
        "OrchestratorStats",
        &[
            ("total_deliberations", 1, "int64", false),
            ("total_orchestrations", 2, "int64", false),
            ("avg_deliberation_time_ms", 3, "double", false),
            ("active_councils", 4, "int64", false),
            ("role_counts", 5, "RoleCountsEntry", true),
        ],
    );
    check(
        "GetMetricsRequest",
        &[
            ("metric_type", 1, "string", false),
            ("time_range_ms", 2, "int64", false),
        ],
    );
    check(
        "GetMetricsResponse",
        &[
            ("performance", 1, "PerformanceMetrics", false),
            ("agents", 2, "AgentMetrics", false),
            ("councils", 3, "CouncilMetrics", false),
        ],
    );
    check(
        "PerformanceMetrics",
        &[
            ("avg_deliberation_ms", 1, "double", false),
            ("avg_orchestration_ms", 2, "double", false),
            ("p50_latency_ms", 3, "double", false),
            ("p95_latency_ms", 4, "double", false),
            ("p99_latency_ms", 5, "double", false),
        ],
    );
    check(
        "AgentMetrics",
        &[
            ("total_agents", 1, "int64", false),
            ("active_agents", 2, "int64", false),
            ("agents_per_role", 3, "AgentsPerRoleEntry", true),
            ("avg_agent_response_time_ms", 4, "double", false),
        ],
    );
    check(
        "CouncilMetrics",
        &[
            ("total_councils", 1, "int64", false),
            ("active_councils", 2, "int64", false),
            ("health_per_council", 3, "HealthPerCouncilEntry", true),
        ],
    );
    check(
        "CouncilHealth",
        &[
            ("status", 1, "string", false),
            ("available_agents", 2, "int32", false),
            ("busy_agents", 3, "int32", false),
            ("success_rate", 4, "double", false),
        ],
    );
}

/// Upstream's orchestration, planning and context messages, field by field.
#[test]
fn upstream_orchestration_planning_and_context_messages_are_kept() {
    check(
        "OrchestrateRequest",
        &[
            ("task_id", 1, "string", false),
            ("task_description", 2, "string", false),
            ("role", 3, "string", false),
            ("constraints", 4, "TaskConstraints", false),
            ("options", 5, "OrchestratorOptions", false),
            ("case_id", 6, "string", false),
            ("story_id", 7, "string", false),
            ("plan_id", 8, "string", false),
            ("context_options", 9, "ContextOptions", false),
        ],
    );
    check(
        "OrchestrateResponse",
        &[
            ("winner", 1, "DeliberationResult", false),
            ("candidates", 2, "DeliberationResult", true),
            ("execution_id", 3, "string", false),
            ("duration_ms", 4, "int64", false),
            ("metadata", 5, "OrchestratorMetadata", false),
        ],
    );
    check(
        "OrchestratorOptions",
        &[
            ("enable_peer_review", 1, "bool", false),
            ("deliberation_rounds", 2, "int32", false),
            ("enable_architect_selection", 3, "bool", false),
            ("custom_params", 4, "CustomParamsEntry", true),
        ],
    );
    check(
        "ContextOptions",
        &[
            ("include_timeline", 1, "bool", false),
            ("include_decisions", 2, "bool", false),
            ("include_summaries", 3, "bool", false),
            ("max_events", 4, "int32", false),
            ("scopes", 5, "string", true),
        ],
    );
    check(
        "PlanningEventRequest",
        &[
            ("event_type", 1, "string", false),
            ("case_id", 2, "string", false),
            ("plan_id", 3, "string", false),
            ("from_state", 4, "string", false),
            ("to_state", 5, "string", false),
            ("timestamp_ms", 6, "int64", false),
            ("metadata", 7, "MetadataEntry", true),
        ],
    );
    check(
        "PlanningEventResponse",
        &[
            ("processed", 1, "bool", false),
            ("message", 2, "string", false),
            ("derived_task_ids", 3, "string", true),
        ],
    );
    check(
        "DeriveSubtasksRequest",
        &[
            ("case_id", 1, "string", false),
            ("plan_id", 2, "string", false),
            ("roles", 3, "string", true),
            ("strategy", 4, "DerivationStrategy", false),
        ],
    );
    check(
        "DeriveSubtasksResponse",
        &[
            ("tasks", 1, "AtomicTask", true),
            ("derivation_id", 2, "string", false),
            ("total_tasks", 3, "int32", false),
        ],
    );
    check(
        "DerivationStrategy",
        &[
            ("parallel_execution", 1, "bool", false),
            ("dependency_order", 2, "string", true),
            ("max_tasks_per_role", 3, "int32", false),
            ("auto_publish_to_nats", 4, "bool", false),
        ],
    );
    check(
        "AtomicTask",
        &[
            ("task_id", 1, "string", false),
            ("role", 2, "string", false),
            ("description", 3, "string", false),
            ("dependencies", 4, "string", true),
            ("constraints", 5, "TaskConstraints", false),
            ("case_id", 6, "string", false),
            ("plan_id", 7, "string", false),
            ("priority", 8, "int32", false),
        ],
    );
    check(
        "GetTaskContextRequest",
        &[
            ("task_id", 1, "string", false),
            ("case_id", 2, "string", false),
            ("story_id", 3, "string", false),
            ("role", 4, "string", false),
            ("phase", 5, "string", false),
            ("options", 6, "ContextOptions", false),
        ],
    );
    check(
        "GetTaskContextResponse",
        &[
            ("context_text", 1, "string", false),
            ("blocks", 2, "ContextBlocks", false),
            ("token_count", 3, "int32", false),
            ("version_hash", 4, "string", false),
        ],
    );
    check(
        "ContextBlocks",
        &[
            ("system", 1, "string", false),
            ("context", 2, "string", false),
            ("tools", 3, "string", false),
            ("history", 4, "string", false),
        ],
    );
}

#[test]
fn the_service_has_every_upstream_rpc() {
    let set =
        FileDescriptorSet::decode(council_proto::FILE_DESCRIPTOR_SET).expect("descriptor decodes");
    let service = set
        .file
        .iter()
        .flat_map(|f| f.service.iter())
        .find(|s| s.name() == "OrchestratorService")
        .expect("service");
    let mut rpcs: Vec<(&str, &str, &str, bool)> = service
        .method
        .iter()
        .map(|m| {
            (
                m.name(),
                m.input_type().rsplit('.').next().unwrap_or_default(),
                m.output_type().rsplit('.').next().unwrap_or_default(),
                m.server_streaming(),
            )
        })
        .collect();
    rpcs.sort();
    let mut expected = vec![
        (
            "Deliberate",
            "DeliberateRequest",
            "DeliberateResponse",
            false,
        ),
        (
            "StreamDeliberation",
            "DeliberateRequest",
            "DeliberationUpdate",
            true,
        ),
        (
            "GetDeliberationResult",
            "GetDeliberationResultRequest",
            "GetDeliberationResultResponse",
            false,
        ),
        (
            "DeliberateForBacklogReview",
            "DeliberateRequest",
            "DeliberateResponse",
            false,
        ),
        (
            "ProcessPlanningEvent",
            "PlanningEventRequest",
            "PlanningEventResponse",
            false,
        ),
    ];
    for name in [
        "CreateCouncil",
        "ListCouncils",
        "DeleteCouncil",
        "RegisterAgent",
        "UnregisterAgent",
        "GetStatus",
        "GetMetrics",
        "Orchestrate",
        "DeriveSubtasks",
        "GetTaskContext",
    ] {
        expected.push((name, "", "", false));
    }
    let mut expected: Vec<(String, String, String, bool)> = expected
        .into_iter()
        .map(|(n, i, o, s)| {
            let i = if i.is_empty() {
                format!("{n}Request")
            } else {
                i.to_owned()
            };
            let o = if o.is_empty() {
                format!("{n}Response")
            } else {
                o.to_owned()
            };
            (n.to_owned(), i, o, s)
        })
        .collect();
    expected.sort();
    let rpcs: Vec<(String, String, String, bool)> = rpcs
        .into_iter()
        .map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d))
        .collect();
    assert_eq!(rpcs, expected);
    let status = set
        .file
        .iter()
        .flat_map(|f| f.enum_type.iter())
        .find(|e| e.name() == "DeliberationStatus")
        .expect("enum");
    let values: Vec<(&str, i32)> = status
        .value
        .iter()
        .map(|v| (v.name(), v.number()))
        .collect();
    assert_eq!(
        values,
        vec![
            ("DELIBERATION_STATUS_UNKNOWN", 0),
            ("DELIBERATION_STATUS_PENDING", 1),
            ("DELIBERATION_STATUS_IN_PROGRESS", 2),
            ("DELIBERATION_STATUS_COMPLETED", 3),
            ("DELIBERATION_STATUS_FAILED", 4),
            ("DELIBERATION_STATUS_TIMEOUT", 5),
        ]
    );
}
