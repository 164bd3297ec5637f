//! The one NATS connection of a process: where the server is and how to authenticate (creds
//! file, nkey seed, user and password, or token; TLS with a private CA or client certificates).
//! Secrets are read at start-up and never shown: `Debug` and the logged config redact them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A secret string: `Debug` prints `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Self(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// How the connection authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NatsAuth {
    #[default]
    None,
    /// A `.creds` file (user JWT and nkey seed), read at connect time.
    CredsFile(PathBuf),
    /// An nkey seed (`SU…`).
    Nkey(Secret),
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
}

impl NatsAuth {
    /// What the log may say about it.
    pub fn kind(&self) -> &'static str {
        match self {
            NatsAuth::None => "none",
            NatsAuth::CredsFile(_) => "creds_file",
            NatsAuth::Nkey(_) => "nkey",
            NatsAuth::UserPassword { .. } => "user_password",
            NatsAuth::Token(_) => "token",
        }
    }
}

/// TLS towards the server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NatsTls {
    /// Require TLS even when the URL says `nats://`.
    pub required: bool,
    /// PEM CA the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key (mutual TLS).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Where NATS is and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// `nats://host:port` or `tls://host:port` (no user info: use the auth settings).
    pub url: String,
    pub auth: NatsAuth,
    pub tls: NatsTls,
}

impl NatsConfig {
    /// A plain connection to `url` (tests, local runs).
    pub fn plain(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            auth: NatsAuth::None,
            tls: NatsTls::default(),
        }
    }
}

/// Why no connection came up.
#[derive(Debug, thiserror::Error)]
#[error("nats {url}: {reason}")]
pub struct ConnectError {
    pub url: String,
    pub reason: String,
}

/// Connects as `name` and waits (up to `within`) until the connection is up. The client
/// reconnects by itself forever afterwards; callers watch `connection_state` for readiness.
pub async fn connect(
    config: &NatsConfig,
    name: &str,
    within: Duration,
) -> Result<async_nats::Client, ConnectError> {
    let fail = |reason: String| ConnectError {
        url: config.url.clone(),
        reason,
    };
    crate::install_crypto_provider();
    // The last thing that went wrong, for the error when the connection never comes up (an
    // authorization violation says more than a timeout).
    let last_error = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let seen = last_error.clone();
    let mut options = async_nats::ConnectOptions::new()
        .event_callback(move |event| {
            let seen = seen.clone();
            async move {
                // async-nats logs every event itself; keep the errors for the start-up message.
                if matches!(
                    event,
                    async_nats::Event::ServerError(_) | async_nats::Event::ClientError(_)
                ) && let Ok(mut last) = seen.lock()
                {
                    *last = Some(event.to_string());
                }
            }
        })
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .retry_on_initial_connect()
        .max_reconnects(None);
    options = match &config.auth {
        NatsAuth::None => options,
        NatsAuth::CredsFile(path) => options
            .credentials_file(path)
            .await
            .map_err(|e| fail(format!("creds file {}: {e}", path.display())))?,
        NatsAuth::Nkey(seed) => options.nkey(seed.expose().to_owned()),
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.expose().to_owned())
        }
        NatsAuth::Token(token) => options.token(token.expose().to_owned()),
    };
    if config.tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls.client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let client = options
        .connect(&config.url)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let connected = async {
        while client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(within, connected).await.is_err() {
        let last = last_error.lock().ok().and_then(|l| l.clone());
        return Err(fail(match last {
            Some(e) => format!("could not connect within {within:?}: {e}"),
            None => format!("could not connect within {within:?}"),
        }));
    }
    Ok(client)
}

/// Whether `client` is connected now (for readiness), the reason when not.
pub fn health(client: &async_nats::Client) -> Result<(), String> {
    match client.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        state => Err(format!("nats connection is {state:?}")),
    }
}

/// An error and all its sources, for logs and for matching on what the server said.
pub use council_inference::error::error_chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let c = NatsConfig {
            url: "nats://h:4222".into(),
            auth: NatsAuth::UserPassword {
                user: "u".into(),
                password: Secret::new("hunter2-password".into()),
            },
            tls: NatsTls::default(),
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert_eq!(c.auth.kind(), "user_password");
        let nkey = format!("{:?}", NatsAuth::Nkey(Secret::new("SUAXYZ".into())));
        assert!(!nkey.contains("SUAXYZ"), "{nkey}");
    }
}
