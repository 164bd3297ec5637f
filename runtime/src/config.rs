//! The one typed config of `council serve`: a TOML file, environment variables and flags, in
//! rising precedence, merged into a [`RawConfig`] and then validated as a whole into a
//! [`ServeConfig`]. Every error names the field (`section.key`). The effective config can be
//! rendered with secrets redacted for the log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model_source::{DEFAULT_MODEL, ModelArgs};
use crate::service::{Limits, Tls};

/// A config value that is wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

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
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawModel {
    /// A local Hugging Face model directory.
    pub dir: Option<PathBuf>,
    /// A hub model ORG/NAME[@REV] (resolved through the cache).
    pub repo: Option<String>,
    pub cuda: Option<usize>,
    pub max_batch: Option<usize>,
    pub max_seq_len: Option<usize>,
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
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStore {
    /// "file" (embedded, one process) or "nats" (JetStream key-value, several replicas).
    pub kind: Option<String>,
    /// Directory of the embedded file store.
    pub data_dir: Option<PathBuf>,
    pub nats_url: Option<String>,
    /// Key-value buckets are `<prefix>_councils` and `<prefix>_records`.
    pub bucket_prefix: Option<String>,
    pub retention_secs: Option<u64>,
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
            cuda,
            max_batch,
            max_seq_len
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
            max_timeout_secs
        );
        overlay!(
            self.store,
            top.store,
            kind,
            data_dir,
            nats_url,
            bucket_prefix,
            retention_secs
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
            repo.parse::<council_inference::engine::loader::HubModel>()
                .map_err(|e| err("model.repo", e.to_string()))?;
        }
        let max_batch = positive("model.max_batch", m.max_batch.unwrap_or(8))?;
        let max_seq_len = positive("model.max_seq_len", m.max_seq_len.unwrap_or(4096))?;
        let model = ModelArgs {
            model_dir: m.dir,
            model: m.repo.unwrap_or_else(|| DEFAULT_MODEL.to_owned()),
            cuda: m.cuda,
            max_batch,
            max_seq_len,
        };

        let s = self.server;
        let listen = address(
            "server.listen",
            s.listen.as_deref().unwrap_or("127.0.0.1:50051"),
        )?;
        let metrics_listen = match s.metrics_listen.as_deref().unwrap_or("127.0.0.1:9090") {
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

        let st = self.store;
        let retention_secs = st.retention_secs.unwrap_or(7 * 24 * 3600);
        if retention_secs < 60 {
            return Err(err(
                "store.retention_secs",
                format!("{retention_secs} is under 60"),
            ));
        }
        let store = match st.kind.as_deref().unwrap_or("file") {
            "file" => {
                if st.nats_url.is_some() {
                    return Err(err(
                        "store.nats_url",
                        "only used with store.kind = \"nats\"",
                    ));
                }
                StoreChoice::File {
                    data_dir: st.data_dir.unwrap_or_else(|| PathBuf::from("council-data")),
                }
            }
            "nats" => {
                let url = st
                    .nats_url
                    .ok_or_else(|| err("store.nats_url", "required with store.kind = \"nats\""))?;
                if !url.starts_with("nats://") && !url.starts_with("tls://") {
                    return Err(err(
                        "store.nats_url",
                        format!("{url:?} is not a nats:// or tls:// URL"),
                    ));
                }
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
                    url,
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
            },
            store,
            retention: Duration::from_secs(retention_secs),
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
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub reflection: bool,
    pub grace: Duration,
    pub auth_token: Option<String>,
    pub tls: Option<Tls>,
    pub limits: Limits,
    pub store: StoreChoice,
    pub retention: Duration,
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
                "cuda": self.model.cuda,
                "max_batch": self.model.max_batch,
                "max_seq_len": self.model.max_seq_len,
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
            },
            "store": match &self.store {
                StoreChoice::File { data_dir } => serde_json::json!({
                    "kind": "file",
                    "data_dir": data_dir,
                    "retention_secs": self.retention.as_secs(),
                }),
                StoreChoice::Nats(kv) => serde_json::json!({
                    "kind": "nats",
                    "nats_url": redact_url(&kv.url),
                    "bucket_prefix": kv.bucket_prefix,
                    "retention_secs": self.retention.as_secs(),
                }),
            },
        })
    }
}

/// A URL without its user info (it may hold a password or token).
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}<redacted>@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
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
            ("[store]\nretention_secs = 5", "store.retention_secs"),
            ("[store]\nkind = \"s3\"", "store.kind"),
            ("[store]\nkind = \"nats\"", "store.nats_url"),
            (
                "[store]\nkind = \"nats\"\nnats_url = \"http://x\"",
                "store.nats_url",
            ),
            ("[store]\nnats_url = \"nats://x:4222\"", "store.nats_url"),
            (
                "[store]\nkind = \"nats\"\nnats_url = \"nats://x:4222\"\nbucket_prefix = \"a.b\"",
                "store.bucket_prefix",
            ),
            (
                "[store]\nkind = \"nats\"\nnats_url = \"nats://x:4222\"\nretention_secs = 3600",
                "store.retention_secs",
            ),
        ];
        for (text, field) in cases {
            let e = parse(text).expect("parses").validate().expect_err(text);
            assert_eq!(e.field, field, "{text}: {e}");
        }
        let unknown = parse("[server]\nlisten_port = 1").expect_err("unknown key");
        assert!(unknown.reason.contains("listen_port"), "{unknown}");
    }

    #[test]
    fn the_logged_config_hides_the_token() {
        let c = parse("[server]\nauth_token = \"0123456789abcdef-secret\"\n[store]\nkind = \"nats\"\nnats_url = \"nats://user:secret@host:4222\"")
            .expect("parses")
            .validate()
            .expect("valid");
        let shown = c.redacted().to_string();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
