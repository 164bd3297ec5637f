//! `[server]` (the gRPC port, its metrics port, TLS, auth, the drain), `[limits]` (what the
//! run core accepts) and `[councils]` (how the councils it runs judge).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, address, err, positive, read, token,
};
use crate::judge::Judge;
use crate::run::Limits;
use crate::service::Tls;

super::section! {
    /// `[server]`: each field is a flag, its `COUNCIL_*` variable and its TOML key.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields, default)]
    pub struct RawServer {
        /// [server.listen] gRPC address; port 0 picks one, printed.
        #[arg(long, env = "COUNCIL_LISTEN", value_name = "IP:PORT")]
        pub listen: Option<String> = DEFAULT_LISTEN.to_owned(),
        /// [server.metrics_listen] Prometheus /metrics address, or "off".
        #[arg(long, env = "COUNCIL_METRICS_LISTEN", value_name = "IP:PORT|off")]
        pub metrics_listen: Option<String> = DEFAULT_METRICS_LISTEN.to_owned(),
        /// [server.reflection] Serve gRPC reflection.
        #[arg(long, env = "COUNCIL_REFLECTION", value_name = "BOOL")]
        pub reflection: Option<bool> = true,
        /// [server.grace_secs] How long running deliberations may finish after SIGTERM.
        #[arg(long, env = "COUNCIL_GRACE_SECS")]
        pub grace_secs: Option<u64> = 30,
        /// [server.auth_token] Require `authorization: Bearer <token>` (prefer the file form).
        #[arg(long, env = "COUNCIL_AUTH_TOKEN", hide_env_values = true)]
        pub auth_token: Option<String>,
        /// [server.auth_token_file] Read the bearer token from this file.
        #[arg(long, env = "COUNCIL_AUTH_TOKEN_FILE", value_name = "FILE")]
        pub auth_token_file: Option<PathBuf>,
        /// [server.tls_cert] PEM certificate chain of the gRPC port (TLS with tls_key).
        #[arg(long, env = "COUNCIL_TLS_CERT", value_name = "FILE")]
        pub tls_cert: Option<PathBuf>,
        /// [server.tls_key] PEM private key of the gRPC port.
        #[arg(long, env = "COUNCIL_TLS_KEY", value_name = "FILE")]
        pub tls_key: Option<PathBuf>,
        /// [server.tls_client_ca] PEM CA that client certificates must chain to (mTLS).
        #[arg(long, env = "COUNCIL_TLS_CLIENT_CA", value_name = "FILE")]
        pub tls_client_ca: Option<PathBuf>,
    }
}

/// `[server]`, checked.
#[derive(Debug)]
pub struct Server {
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub reflection: bool,
    pub grace: Duration,
    pub auth_token: Option<String>,
    pub tls: Option<Tls>,
}

impl RawServer {
    /// The addresses (distinct), the grace period (at most an hour), one form of the token,
    /// TLS files that read, mTLS only over TLS.
    pub fn validate(self) -> Result<Server, ConfigError> {
        let s = self;
        let listen = address("server.listen", &s.listen())?;
        let metrics_listen = match s.metrics_listen().as_str() {
            "off" => None,
            a => Some(address("server.metrics_listen", a)?),
        };
        if metrics_listen.is_some_and(|m| m == listen && m.port() != 0) {
            return Err(err(
                "server.metrics_listen",
                "must differ from server.listen",
            ));
        }
        let grace_secs = s.grace_secs();
        let reflection = s.reflection();
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

        Ok(Server {
            listen,
            metrics_listen,
            reflection,
            grace: Duration::from_secs(grace_secs),
            auth_token,
            tls,
        })
    }
}

super::section! {
    /// `[limits]`: each field is a flag, its `COUNCIL_*` variable and its TOML key.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields, default)]
    pub struct RawLimits {
        /// [limits.max_concurrent] Deliberations at once; more get RESOURCE_EXHAUSTED.
        #[arg(long, env = "COUNCIL_MAX_CONCURRENT")]
        pub max_concurrent: Option<usize> = 16,
        /// [limits.default_timeout_secs] Deadline when a request sets none.
        #[arg(long, env = "COUNCIL_DEFAULT_TIMEOUT_SECS")]
        pub default_timeout_secs: Option<u64> = 600,
        /// [limits.max_timeout_secs] Longest deadline a request may ask for.
        #[arg(long, env = "COUNCIL_MAX_TIMEOUT_SECS")]
        pub max_timeout_secs: Option<u64> = 3600,
        /// [limits.heartbeat_secs] How often a running deliberation refreshes its record.
        #[arg(long, env = "COUNCIL_HEARTBEAT_SECS")]
        pub heartbeat_secs: Option<u64> = 10,
    }
}

impl RawLimits {
    /// Sizes at least 1, the default deadline within the longest, a heartbeat of 1..=300 s.
    pub fn validate(self) -> Result<Limits, ConfigError> {
        let l = self;
        let max_concurrent = positive("limits.max_concurrent", l.max_concurrent())?;
        let default_timeout = positive("limits.default_timeout_secs", l.default_timeout_secs())?;
        let max_timeout = positive("limits.max_timeout_secs", l.max_timeout_secs())?;
        if default_timeout > max_timeout {
            return Err(err(
                "limits.default_timeout_secs",
                format!("{default_timeout} exceeds limits.max_timeout_secs ({max_timeout})"),
            ));
        }

        let heartbeat_secs = l.heartbeat_secs();
        if !(1..=300).contains(&heartbeat_secs) {
            return Err(err(
                "limits.heartbeat_secs",
                format!("{heartbeat_secs} is outside 1..=300"),
            ));
        }

        Ok(Limits {
            max_concurrent,
            default_timeout: Duration::from_secs(default_timeout),
            max_timeout: Duration::from_secs(max_timeout),
            heartbeat: Duration::from_secs(heartbeat_secs),
        })
    }
}

super::section! {
    /// `[councils]`: each field is a flag, its `COUNCIL_*` variable and its TOML key.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields, default)]
    pub struct RawCouncils {
        /// [councils.judge] How judges give verdicts in every deliberation: logprob (scores and
        /// rankings read off log-probabilities; text on a backend that cannot score choices) or
        /// text (written and parsed).
        #[arg(long, env = "COUNCIL_JUDGE", value_enum)]
        pub judge: Option<Judge> = Judge::Logprob,
    }
}

impl RawCouncils {
    /// Nothing to relate: every value of `judge` is valid.
    pub fn validate(self) -> Judge {
        self.judge()
    }
}
