//! The one typed config of `council serve`: a TOML file, environment variables and flags, in
//! rising precedence, merged into a [`RawConfig`] and then validated as a whole into a
//! [`ServeConfig`]. Every error names the field (`section.key`). The effective config can be
//! rendered with secrets redacted for the log.
//!
//! Each section (`model.rs`, `server.rs` with `[limits]`, `store.rs` with `[nats]`,
//! `dispatch.rs`; `server.rs` also holds `[councils]`) is declared once: every field is at the same time a `council serve` flag,
//! its `COUNCIL_*` variable (clap), the TOML key (serde) and a line of the layering; each
//! section validates itself, and [`RawConfig::validate`] checks the relations between them.

mod dispatch;
mod model;
mod server;
mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use council_councils::spec::JudgeMode;
use serde::{Deserialize, Serialize};

pub use self::dispatch::RawDispatch;
pub use self::model::RawModel;
pub use self::server::{RawCouncils, RawLimits, RawServer, Server};
pub use self::store::{RawNats, RawStore};
use crate::dispatch::DispatchConfig;
use crate::model_source::ModelArgs;
use crate::nats::NatsConfig;
use crate::run::Limits;

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

/// Declares a config section once: the struct (its fields carry clap's flag and variable and
/// serde's key, and `= default` the value taken when no layer sets one), `overlay`, which
/// takes every field `top` sets, an accessor per defaulted field (the value or the default),
/// and `defaults`, which `council serve --help` appends to each flag's help.
macro_rules! section {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: Option<$inner:ty> $(= $default:expr)?,
            )*
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: Option<$inner>,
            )*
        }

        impl $name {
            /// Values set in `top` win.
            pub fn overlay(&mut self, top: Self) {
                $(
                    if top.$field.is_some() {
                        self.$field = top.$field;
                    }
                )*
            }

            /// Each defaulted field's key and its default, as help shows it.
            pub fn defaults() -> Vec<(&'static str, String)> {
                #[allow(unused_mut)]
                let mut all = Vec::new();
                $($(
                    let value: $inner = $default;
                    all.push((stringify!($field), $crate::config::Shown::shown(&value)));
                )?)*
                all
            }

            $($(
                /// The value set, or the default.
                pub fn $field(&self) -> $inner {
                    match &self.$field {
                        Some(v) => v.clone(),
                        None => $default,
                    }
                }
            )?)*
        }
    };
}
use section;

/// How a default reads in help.
pub trait Shown {
    fn shown(&self) -> String;
}

macro_rules! shown_by_display {
    ($($t:ty),*) => {$(
        impl Shown for $t {
            fn shown(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
shown_by_display!(String, bool, u64, usize, i64);

impl Shown for PathBuf {
    fn shown(&self) -> String {
        self.display().to_string()
    }
}

impl Shown for crate::judge::Judge {
    fn shown(&self) -> String {
        clap::ValueEnum::to_possible_value(self)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

/// Appends its default to the help of a flag whose help names a defaulted `[section.key]`
/// (`council serve --help`): the default is declared once, beside the field.
pub fn with_default(arg: clap::Arg) -> clap::Arg {
    let Some(help) = arg.get_help().map(ToString::to_string) else {
        return arg;
    };
    let Some(key) = help
        .strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .map(|(k, _)| k.to_owned())
    else {
        return arg;
    };
    match RawConfig::defaults().into_iter().find(|(k, _)| *k == key) {
        Some((_, default)) => arg.help(format!("{help} (default {default})")),
        None => arg,
    }
}

/// Every setting, each optional: one layer (file, or environment and flags). As clap `Args`
/// it is the flags of `council serve`; as serde it is the TOML file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    #[command(flatten)]
    pub model: RawModel,
    #[command(flatten)]
    pub server: RawServer,
    #[command(flatten)]
    pub limits: RawLimits,
    #[command(flatten)]
    pub councils: RawCouncils,
    #[command(flatten)]
    pub store: RawStore,
    #[command(flatten)]
    pub nats: RawNats,
    #[command(flatten)]
    pub dispatch: RawDispatch,
}

impl RawConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| err("--config", format!("{}: {e}", path.display())))
    }

    /// Every defaulted key (`section.key`) and its default.
    pub fn defaults() -> Vec<(String, String)> {
        let sections = [
            ("model", RawModel::defaults()),
            ("server", RawServer::defaults()),
            ("limits", RawLimits::defaults()),
            ("councils", RawCouncils::defaults()),
            ("store", RawStore::defaults()),
            ("nats", RawNats::defaults()),
            ("dispatch", RawDispatch::defaults()),
        ];
        sections
            .into_iter()
            .flat_map(|(section, fields)| {
                fields
                    .into_iter()
                    .map(move |(field, value)| (format!("{section}.{field}"), value))
            })
            .collect()
    }

    /// Values set in `top` win.
    pub fn overlay(mut self, top: RawConfig) -> Self {
        self.model.overlay(top.model);
        self.server.overlay(top.server);
        self.limits.overlay(top.limits);
        self.councils.overlay(top.councils);
        self.store.overlay(top.store);
        self.nats.overlay(top.nats);
        self.dispatch.overlay(top.dispatch);
        self
    }

    /// Second stage: checks every section, then the relations between them.
    pub fn validate(self) -> Result<ServeConfig, ConfigError> {
        let model = self.model.validate()?;
        let server = self.server.validate()?;
        let limits = self.limits.validate()?;
        let judge = self.councils.validate();
        let dispatch = dispatch::dispatch(self.dispatch, limits.max_concurrent)?;
        let (store, retention, nats) = store::store_and_nats(
            self.store,
            self.nats,
            dispatch.as_ref(),
            limits.max_timeout.as_secs(),
        )?;
        Ok(ServeConfig {
            model,
            server,
            limits,
            judge: judge.into(),
            store,
            retention,
            nats,
            dispatch,
        })
    }
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
    pub server: Server,
    pub limits: Limits,
    /// `councils.judge`: how the judges of every deliberation give verdicts.
    pub judge: JudgeMode,
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
                "listen": self.server.listen.to_string(),
                "metrics_listen": self.server.metrics_listen.map_or("off".to_owned(), |a| a.to_string()),
                "reflection": self.server.reflection,
                "grace_secs": self.server.grace.as_secs(),
                "auth_token": self.server.auth_token.as_ref().map(|_| "<redacted>"),
                "tls": self.server.tls.as_ref().map(|t| if t.client_ca.is_some() { "mtls" } else { "tls" }),
            },
            "limits": {
                "max_concurrent": self.limits.max_concurrent,
                "default_timeout_secs": self.limits.default_timeout.as_secs(),
                "max_timeout_secs": self.limits.max_timeout.as_secs(),
                "heartbeat_secs": self.limits.heartbeat.as_secs(),
            },
            "councils": {
                "judge": match self.judge {
                    JudgeMode::Text => "text",
                    JudgeMode::LogProb => "logprob",
                },
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
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(c.limits, Limits::default());
        assert!(c.server.reflection && c.server.auth_token.is_none() && c.server.tls.is_none());

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
            c.server.listen.to_string(),
            "0.0.0.0:7000",
            "the file's value stays"
        );
        assert_eq!(c.limits.max_concurrent, 9, "flags win over the file");
        assert!(!c.server.reflection);
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

    /// Each flag sets the TOML key its help names, and only that one: flag, variable and key
    /// come from one field.
    #[test]
    fn every_flag_sets_the_key_it_names() {
        use clap::{Args, FromArgMatches};
        let command = RawConfig::augment_args(clap::Command::new("serve"));
        let mut seen = 0;
        for arg in command.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let key = help
                .strip_prefix('[')
                .and_then(|h| h.split_once(']'))
                .map(|(k, _)| k.to_owned())
                .unwrap_or_else(|| panic!("--{long}: its help names no [section.key]"));
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("COUNCIL_")),
                "--{long} reads no COUNCIL_* variable"
            );
            // A bool flag takes "true", a choice its first value, anything else a number.
            let possible = arg.get_possible_values();
            let value = if possible.iter().any(|v| v.get_name() == "true") {
                "true".to_owned()
            } else {
                possible
                    .first()
                    .map_or_else(|| "1".to_owned(), |v| v.get_name().to_owned())
            };
            let value = value.as_str();
            let matches = command
                .clone()
                .try_get_matches_from(["serve", &format!("--{long}"), value])
                .unwrap_or_else(|e| panic!("--{long} {value}: {e}"));
            let raw = RawConfig::from_arg_matches(&matches).expect("parses");
            let json = serde_json::to_value(&raw).expect("serializes");
            let set: Vec<String> = json
                .as_object()
                .into_iter()
                .flatten()
                .flat_map(|(section, fields)| {
                    fields
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(_, v)| !v.is_null())
                        .map(move |(k, _)| format!("{section}.{k}"))
                })
                .collect();
            assert_eq!(
                set,
                vec![key.clone()],
                "--{long} sets {set:?}, its help says {key}"
            );
            seen += 1;
        }
        assert!(seen >= 40, "only {seen} flags");
    }

    /// A default is declared once: help shows it, and a config that sets every key to the
    /// default its help shows is the config that sets nothing.
    #[test]
    fn each_default_is_declared_once_and_shown_in_help() {
        use clap::Args;
        let defaults = RawConfig::defaults();
        assert!(defaults.len() >= 25, "{defaults:?}");
        let command = RawConfig::augment_args(clap::Command::new("serve")).mut_args(with_default);
        let mut shown = 0;
        for arg in command.get_arguments() {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            if let Some((key, value)) = defaults
                .iter()
                .find(|(k, _)| help.starts_with(&format!("[{k}]")))
            {
                assert!(
                    help.ends_with(&format!("(default {value})")),
                    "{key}: {help}"
                );
                shown += 1;
            }
        }
        assert_eq!(shown, defaults.len(), "every defaulted key has a flag");
        let base = "[nats]\nurl = \"nats://x:4222\"\n[dispatch]\nenabled = true\n";
        let mut explicit = String::new();
        let mut section = "";
        let mut lines: Vec<(String, String)> = defaults.clone();
        lines.sort();
        for (key, value) in &lines {
            let (s, k) = key.split_once('.').expect("section.key");
            if s == "dispatch" && k == "enabled" {
                continue;
            }
            if s != section {
                explicit.push_str(&format!("[{s}]\n"));
                section = s;
            }
            let literal = if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
                value.clone()
            } else {
                format!("{value:?}")
            };
            explicit.push_str(&format!("{k} = {literal}\n"));
        }
        let merged = |text: &str| {
            let nats_and_dispatch = parse(base).expect("parses");
            nats_and_dispatch
                .overlay(parse(text).unwrap_or_else(|e| panic!("{text}: {e}")))
                .validate()
                .unwrap_or_else(|e| panic!("{text}: {e}"))
                .redacted()
        };
        assert_eq!(merged(&explicit), merged(""), "{explicit}");
    }

    #[test]
    fn the_judge_is_logprob_unless_a_layer_says_text() {
        let c = RawConfig::default().validate().expect("defaults");
        assert_eq!(c.judge, JudgeMode::LogProb);
        assert_eq!(c.redacted()["councils"]["judge"], "logprob");
        let file = parse("[councils]\njudge = \"text\"").expect("parses");
        assert_eq!(
            file.clone().validate().expect("valid").judge,
            JudgeMode::Text
        );
        let flags = RawConfig {
            councils: RawCouncils {
                judge: Some(crate::judge::Judge::Logprob),
            },
            ..Default::default()
        };
        let c = file.overlay(flags).validate().expect("valid");
        assert_eq!(c.judge, JudgeMode::LogProb, "flags win over the file");
        let bad = parse("[councils]\njudge = \"vibes\"").expect_err("unknown judge");
        assert!(
            bad.reason.contains("vibes") && bad.reason.contains("logprob"),
            "{bad}"
        );
        let unknown = parse("[councils]\nrounds = 2").expect_err("unknown key");
        assert!(unknown.reason.contains("rounds"), "{unknown}");
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
