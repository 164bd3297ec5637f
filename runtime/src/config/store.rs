//! `[store]` (where councils and deliberation records live) and `[nats]` (the one NATS
//! connection of the store and of dispatch).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, StoreChoice, err, read};
use crate::dispatch::DispatchConfig;
use crate::nats::{NatsAuth, NatsConfig, NatsTls, Secret};

super::section! {
    /// `[store]`: each field is a flag, its `COUNCIL_*` variable and its TOML key.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields, default)]
    pub struct RawStore {
        /// [store.kind] "file" (embedded, one process) or "nats" (JetStream KV, replicas).
        #[arg(long = "store", id = "store", env = "COUNCIL_STORE", value_name = "file|nats")]
        pub kind: Option<String> = "file".to_owned(),
        /// [store.data_dir] Directory of the file store.
        #[arg(long, env = "COUNCIL_DATA_DIR", value_name = "DIR")]
        pub data_dir: Option<PathBuf> = PathBuf::from("council-data"),
        /// [store.bucket_prefix] Prefix of the key-value buckets.
        #[arg(long, env = "COUNCIL_BUCKET_PREFIX")]
        pub bucket_prefix: Option<String> = "council".to_owned(),
        /// [store.retention_secs] How long finished deliberation records are kept, in seconds.
        #[arg(long, env = "COUNCIL_RETENTION_SECS")]
        pub retention_secs: Option<u64> = 7 * 24 * 3600,
    }
}

super::section! {
    /// `[nats]`: each field is a flag, its `COUNCIL_*` variable and its TOML key.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
    #[serde(deny_unknown_fields, default)]
    pub struct RawNats {
        /// [nats.url] NATS server for the KV store and dispatch (nats://host:port or tls://…).
        #[arg(long = "nats-url", id = "nats_url", env = "COUNCIL_NATS_URL", value_name = "URL")]
        pub url: Option<String>,
        /// [nats.creds_file] NATS credentials file (user JWT and nkey seed).
        #[arg(
            long = "nats-creds-file",
            id = "nats_creds_file",
            env = "COUNCIL_NATS_CREDS_FILE",
            value_name = "FILE"
        )]
        pub creds_file: Option<PathBuf>,
        /// [nats.nkey_seed_file] File holding a NATS user nkey seed.
        #[arg(
            long = "nats-nkey-seed-file",
            id = "nats_nkey_seed_file",
            env = "COUNCIL_NATS_NKEY_SEED_FILE",
            value_name = "FILE"
        )]
        pub nkey_seed_file: Option<PathBuf>,
        /// [nats.user] NATS user (with a password).
        #[arg(
            long = "nats-user",
            id = "nats_user",
            value_name = "NATS_USER",
            env = "COUNCIL_NATS_USER"
        )]
        pub user: Option<String>,
        /// [nats.password] NATS password (prefer the file form).
        #[arg(
            long = "nats-password",
            id = "nats_password",
            value_name = "NATS_PASSWORD",
            env = "COUNCIL_NATS_PASSWORD",
            hide_env_values = true
        )]
        pub password: Option<String>,
        /// [nats.password_file] Read the NATS password from this file.
        #[arg(
            long = "nats-password-file",
            id = "nats_password_file",
            env = "COUNCIL_NATS_PASSWORD_FILE",
            value_name = "FILE"
        )]
        pub password_file: Option<PathBuf>,
        /// [nats.token_file] Read a NATS auth token from this file.
        #[arg(
            long = "nats-token-file",
            id = "nats_token_file",
            env = "COUNCIL_NATS_TOKEN_FILE",
            value_name = "FILE"
        )]
        pub token_file: Option<PathBuf>,
        /// [nats.tls_required] Require TLS towards NATS (a tls:// URL requires it anyway).
        #[arg(
            long = "nats-tls-required",
            id = "nats_tls_required",
            env = "COUNCIL_NATS_TLS_REQUIRED",
            value_name = "BOOL"
        )]
        pub tls_required: Option<bool> = false,
        /// [nats.tls_ca] PEM CA for the NATS server's certificate.
        #[arg(
            long = "nats-tls-ca",
            id = "nats_tls_ca",
            env = "COUNCIL_NATS_TLS_CA",
            value_name = "FILE"
        )]
        pub tls_ca: Option<PathBuf>,
        /// [nats.tls_cert] PEM client certificate for NATS (with nats.tls_key).
        #[arg(
            long = "nats-tls-cert",
            id = "nats_tls_cert",
            env = "COUNCIL_NATS_TLS_CERT",
            value_name = "FILE"
        )]
        pub tls_cert: Option<PathBuf>,
        /// [nats.tls_key] PEM client key for NATS.
        #[arg(
            long = "nats-tls-key",
            id = "nats_tls_key",
            env = "COUNCIL_NATS_TLS_KEY",
            value_name = "FILE"
        )]
        pub tls_key: Option<PathBuf>,
    }
}

/// The store, its retention and the NATS connection (when the store or dispatch needs one),
/// checked against the longest deadline (`max_timeout_secs`).
pub fn store_and_nats(
    st: RawStore,
    raw_nats: RawNats,
    dispatch: Option<&DispatchConfig>,
    max_timeout: u64,
) -> Result<(StoreChoice, Duration, Option<NatsConfig>), ConfigError> {
    let retention_secs = st.retention_secs();
    if retention_secs < 60 {
        return Err(err(
            "store.retention_secs",
            format!("{retention_secs} is under 60"),
        ));
    }
    let kind = st.kind();
    let kind = kind.as_str();
    let nats = if kind == "nats" || dispatch.is_some() {
        Some(nats(raw_nats)?)
    } else {
        if raw_nats != RawNats::default() {
            return Err(err(
                "nats.url",
                "NATS settings are only used with store.kind = \"nats\" or dispatch.enabled = true",
            ));
        }
        None
    };
    let store = match kind {
        "file" => StoreChoice::File {
            data_dir: st.data_dir(),
        },
        "nats" => {
            let prefix = st.bucket_prefix();
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
    Ok((store, Duration::from_secs(retention_secs), nats))
}

/// The NATS connection settings: a URL and at most one way to authenticate.
fn nats(n: RawNats) -> Result<NatsConfig, ConfigError> {
    let tls_required = n.tls_required();
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
            required: tls_required || url.starts_with("tls://"),
            ca: n.tls_ca,
            client,
        },
        url,
        auth,
    })
}
