//! The store for several replicas: two NATS JetStream key-value buckets (file storage), one for
//! councils (JSON, key = role) and one for deliberation records (protobuf, key = hex task id,
//! kept `retention` by the bucket's max age). Every council write is a compare-and-set on the
//! key's revision; each replica keeps the councils in a cache that a watch keeps in sync, so
//! reads cost no round trip and a change made through one replica shows in all.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::StorageType;
use bytes::Bytes;
use council_councils::{CouncilSpec, Role};
use council_proto::council::store::v1::DeliberationRecord;
use prost::Message;
use tokio_stream::StreamExt;

use super::dto::CouncilDto;
use super::{Claim, CouncilStore, Created, StoreError, Versioned, claimable};
use crate::nats::{self, NatsConfig, error_chain};

/// Where the KV store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvConfig {
    pub nats: NatsConfig,
    /// Buckets are `<prefix>_councils` and `<prefix>_records`.
    pub bucket_prefix: String,
    /// Records are dropped this long after their last write.
    pub retention: Duration,
}

/// Cached councils: role -> (revision, spec).
type Cache = BTreeMap<Role, (u64, CouncilSpec)>;

/// The NATS JetStream key-value store.
#[derive(Debug)]
pub struct KvStore {
    client: async_nats::Client,
    councils: kv::Store,
    records: kv::Store,
    name: String,
    cache: Arc<RwLock<Cache>>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for KvStore {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

fn unavailable(store: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        store: store.to_owned(),
        reason: e.to_string(),
    }
}

fn store_name(config: &KvConfig) -> String {
    format!("nats {} bucket {}_*", config.nats.url, config.bucket_prefix)
}

fn record_key(task_id: &str) -> String {
    let mut key = String::with_capacity(1 + 2 * task_id.len());
    key.push('t');
    for b in task_id.bytes() {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

fn checkpoint_key(task_id: &str) -> String {
    // `c` + the record key's hex: never a record key (those start with `t`).
    format!("c{}", &record_key(task_id)[1..])
}

fn decode_council(store: &str, key: &str, value: &[u8]) -> Result<CouncilSpec, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        store: format!("{store} key {key}"),
        reason,
    };
    let dto: CouncilDto = serde_json::from_slice(value).map_err(|e| corrupt(e.to_string()))?;
    dto.into_spec().map_err(corrupt)
}

fn encode_council(spec: &CouncilSpec) -> Bytes {
    // Serialising a plain DTO to a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&CouncilDto::from(spec)).unwrap_or_default())
}

impl KvStore {
    /// Connects, ensures both buckets exist (file storage; existing ones are used as they are
    /// unless they are on memory storage), loads the councils and starts the watch.
    pub async fn open(config: &KvConfig) -> Result<Self, StoreError> {
        let client = nats::connect(&config.nats, "council-store", Duration::from_secs(10))
            .await
            .map_err(|e| unavailable(&store_name(config), e))?;
        Self::open_on(client, config).await
    }

    /// As [`KvStore::open`], on a connection the process already has.
    pub async fn open_on(
        client: async_nats::Client,
        config: &KvConfig,
    ) -> Result<Self, StoreError> {
        let name = store_name(config);
        let js = async_nats::jetstream::new(client.clone());
        let councils = bucket(
            &js,
            &name,
            kv::Config {
                bucket: format!("{}_councils", config.bucket_prefix),
                description: "council: one council per role".into(),
                history: 5,
                storage: StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let records = bucket(
            &js,
            &name,
            kv::Config {
                bucket: format!("{}_records", config.bucket_prefix),
                description: "council: deliberation records".into(),
                history: 1,
                max_age: config.retention,
                storage: StorageType::File,
                ..Default::default()
            },
        )
        .await?;
        let cache = Arc::new(RwLock::new(Cache::new()));
        let from = load(&councils, &name, &cache).await?;
        let watcher = tokio::spawn(watch(councils.clone(), name.clone(), cache.clone(), from));
        Ok(Self {
            client,
            councils,
            records,
            name,
            cache,
            watcher,
        })
    }

    fn cached(&self) -> Result<std::sync::RwLockReadGuard<'_, Cache>, StoreError> {
        self.cache
            .read()
            .map_err(|_| unavailable(&self.name, "the council cache was poisoned"))
    }

    fn remember(&self, role: Role, revision: u64, spec: Option<CouncilSpec>) {
        if let Ok(mut cache) = self.cache.write() {
            apply(&mut cache, role, revision, spec);
        }
    }

    /// The council of `role` as stored now, with its revision (bypassing the cache).
    async fn current(&self, role: &Role) -> Result<Option<(u64, CouncilSpec)>, StoreError> {
        match self
            .councils
            .entry(role.as_str())
            .await
            .map_err(|e| unavailable(&self.name, e))?
        {
            Some(e) if e.operation == Operation::Put => Ok(Some((
                e.revision,
                decode_council(&self.name, &e.key, &e.value)?,
            ))),
            _ => Ok(None),
        }
    }
}

/// Ensures the stream behind bucket `config.bucket` exists and returns the bucket. The stream
/// is made here by the key-value conventions (`KV_<bucket>` on `$KV.<bucket>.>`, per-subject
/// history, rollups, direct gets) rather than through `create_key_value`, which needs a newer
/// server than the Debian package this project tests against (2.9).
async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    config: kv::Config,
) -> Result<kv::Store, StoreError> {
    use async_nats::jetstream::stream;
    let bucket = config.bucket.clone();
    let wanted = stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(config.description.clone()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: config.history,
        max_age: config.max_age,
        storage: config.storage,
        num_replicas: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        duplicate_window: if config.max_age.is_zero() {
            Duration::from_secs(120)
        } else {
            config.max_age.min(Duration::from_secs(120))
        },
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(wanted)
        .await
        .map_err(|e| unavailable(name, format!("bucket {bucket}: {}", error_chain(&e))))?;
    let info = stream
        .info()
        .await
        .map_err(|e| unavailable(name, error_chain(&e)))?;
    if info.config.storage == StorageType::Memory {
        return Err(unavailable(
            name,
            format!(
                "bucket {bucket} is on memory storage and would lose everything on restart; \
                 recreate it with file storage"
            ),
        ));
    }
    js.get_key_value(&bucket)
        .await
        .map_err(|e| unavailable(name, format!("bucket {bucket}: {}", error_chain(&e))))
}

/// Applies one change to the cache if it is newer than what the cache holds.
fn apply(cache: &mut Cache, role: Role, revision: u64, spec: Option<CouncilSpec>) {
    if cache.get(&role).is_some_and(|(r, _)| *r >= revision) {
        return;
    }
    match spec {
        Some(spec) => {
            cache.insert(role, (revision, spec));
        }
        None => {
            cache.remove(&role);
        }
    }
}

/// Fills the cache with every council; returns the stream revision to watch from.
async fn load(store: &kv::Store, name: &str, cache: &RwLock<Cache>) -> Result<u64, StoreError> {
    let status = store.status().await.map_err(|e| unavailable(name, e))?;
    let last = status.info.state.last_sequence;
    let mut keys = store.keys().await.map_err(|e| unavailable(name, e))?;
    let mut fresh = Cache::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| unavailable(name, e))?;
        let Ok(role) = key.parse::<Role>() else {
            tracing::warn!(%key, "ignoring a key that is not a role in the councils bucket");
            continue;
        };
        if let Some(e) = store.entry(&key).await.map_err(|e| unavailable(name, e))?
            && e.operation == Operation::Put
        {
            fresh.insert(role, (e.revision, decode_council(name, &e.key, &e.value)?));
        }
    }
    let mut cache = cache
        .write()
        .map_err(|_| unavailable(name, "the council cache was poisoned"))?;
    *cache = fresh;
    Ok(last + 1)
}

/// Keeps the cache in sync with the bucket; reloads and resumes after any interruption.
async fn watch(store: kv::Store, name: String, cache: Arc<RwLock<Cache>>, mut from: u64) {
    // Retries back off to 10 s (and log once per streak) while NATS stays away.
    let mut failures = 0u32;
    loop {
        match store.watch_all_from_revision(from).await {
            Ok(mut changes) => {
                failures = 0;
                while let Some(change) = changes.next().await {
                    let Ok(entry) = change else { break };
                    from = entry.revision + 1;
                    let Ok(role) = entry.key.parse::<Role>() else {
                        continue;
                    };
                    let spec = match entry.operation {
                        Operation::Put => match decode_council(&name, &entry.key, &entry.value) {
                            Ok(spec) => Some(spec),
                            Err(e) => {
                                tracing::error!(error = %e, "unreadable council in the bucket");
                                continue;
                            }
                        },
                        Operation::Delete | Operation::Purge => None,
                    };
                    if let Ok(mut cache) = cache.write() {
                        apply(&mut cache, role, entry.revision, spec);
                    }
                }
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(error = %e, "council watch failed; retrying");
                }
                failures += 1;
            }
        }
        let backoff = Duration::from_millis(500)
            .saturating_mul(1u32 << failures.min(5))
            .min(Duration::from_secs(10));
        tokio::time::sleep(backoff).await;
        // Whatever was missed while the watch was down comes back with a full reload.
        match load(&store, &name, &cache).await {
            Ok(next) => from = next,
            Err(e) => {
                if failures <= 1 {
                    tracing::warn!(error = %e, "council reload failed; retrying");
                }
                failures += 1;
            }
        }
    }
}

#[tonic::async_trait]
impl CouncilStore for KvStore {
    async fn list(&self) -> Result<Vec<CouncilSpec>, StoreError> {
        self.health().map_err(|e| unavailable(&self.name, e))?;
        Ok(self.cached()?.values().map(|(_, s)| s.clone()).collect())
    }

    async fn get(&self, role: &Role) -> Result<Option<CouncilSpec>, StoreError> {
        self.health().map_err(|e| unavailable(&self.name, e))?;
        Ok(self.cached()?.get(role).map(|(_, s)| s.clone()))
    }

    async fn create(&self, spec: CouncilSpec) -> Result<Created, StoreError> {
        match self
            .councils
            .create(spec.role.as_str(), encode_council(&spec))
            .await
        {
            Ok(revision) => {
                self.remember(spec.role.clone(), revision, Some(spec));
                Ok(Created::New)
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                match self.current(&spec.role).await? {
                    Some((revision, existing)) => {
                        let same = existing == spec;
                        self.remember(spec.role.clone(), revision, Some(existing));
                        if same {
                            Ok(Created::Unchanged)
                        } else {
                            Err(StoreError::AlreadyExists { role: spec.role })
                        }
                    }
                    // Deleted between the two calls: a concurrent writer won.
                    None => Err(StoreError::Conflict { role: spec.role }),
                }
            }
            Err(e) => Err(unavailable(&self.name, e)),
        }
    }

    async fn delete(&self, role: &Role) -> Result<CouncilSpec, StoreError> {
        let (revision, existing) = self
            .current(role)
            .await?
            .ok_or_else(|| StoreError::NotFound { role: role.clone() })?;
        self.councils
            .delete_expect_revision(role.as_str(), Some(revision))
            .await
            .map_err(|e| {
                if error_chain(&e).contains("wrong last sequence") {
                    StoreError::Conflict { role: role.clone() }
                } else {
                    unavailable(&self.name, e)
                }
            })?;
        if let Ok(mut cache) = self.cache.write() {
            cache.remove(role);
        }
        Ok(existing)
    }

    async fn replace(&self, expected: &CouncilSpec, new: CouncilSpec) -> Result<(), StoreError> {
        let (revision, current) =
            self.current(&new.role)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    role: new.role.clone(),
                })?;
        if current != *expected {
            self.remember(new.role.clone(), revision, Some(current));
            return Err(StoreError::Conflict { role: new.role });
        }
        match self
            .councils
            .update(new.role.as_str(), encode_council(&new), revision)
            .await
        {
            Ok(next) => {
                self.remember(new.role.clone(), next, Some(new));
                Ok(())
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                Err(StoreError::Conflict { role: new.role })
            }
            Err(e) => Err(unavailable(&self.name, e)),
        }
    }

    async fn record_at(&self, task_id: &str) -> Result<Option<Versioned>, StoreError> {
        let entry = self
            .records
            .entry(record_key(task_id))
            .await
            .map_err(|e| unavailable(&self.name, e))?;
        match entry {
            Some(e) if e.operation == Operation::Put => DeliberationRecord::decode(e.value)
                .map(|r| Some((r, e.revision)))
                .map_err(|err| StoreError::Corrupt {
                    store: format!("{} record {task_id}", self.name),
                    reason: err.to_string(),
                }),
            // Deleted or purged: no record.
            _ => Ok(None),
        }
    }

    async fn claim(&self, record: DeliberationRecord, now_ms: i64) -> Result<Claim, StoreError> {
        let key = record_key(&record.task_id);
        let value = Bytes::from(record.encode_to_vec());
        for _ in 0..5 {
            let entry = self
                .records
                .entry(&key)
                .await
                .map_err(|e| unavailable(&self.name, e))?;
            let written = match entry {
                Some(e) if e.operation == Operation::Put => {
                    let existing = DeliberationRecord::decode(e.value.clone()).map_err(|err| {
                        StoreError::Corrupt {
                            store: format!("{} record {}", self.name, record.task_id),
                            reason: err.to_string(),
                        }
                    })?;
                    if !claimable(&existing, now_ms) {
                        return Ok(Claim::Existing(Box::new(existing)));
                    }
                    self.records
                        .update(&key, value.clone(), e.revision)
                        .await
                        .map(|revision| (Some(Box::new(existing)), revision))
                        .map_err(|err| {
                            (
                                err.kind() == UpdateErrorKind::WrongLastRevision,
                                err.to_string(),
                            )
                        })
                }
                _ => self
                    .records
                    .create(&key, value.clone())
                    .await
                    .map(|revision| (None, revision))
                    .map_err(|err| {
                        (
                            err.kind() == CreateErrorKind::AlreadyExists,
                            err.to_string(),
                        )
                    }),
            };
            match written {
                Ok((replaced, revision)) => return Ok(Claim::Claimed { replaced, revision }),
                // Another replica claimed it first: look again.
                Err((true, _)) => continue,
                Err((false, reason)) => return Err(unavailable(&self.name, reason)),
            }
        }
        Err(unavailable(
            &self.name,
            format!("record of task {} keeps changing", record.task_id),
        ))
    }

    async fn write_record_at(
        &self,
        record: DeliberationRecord,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let key = record_key(&record.task_id);
        let value = Bytes::from(record.encode_to_vec());
        if revision == 0 {
            return match self.records.create(&key, value).await {
                Ok(revision) => Ok(Some(revision)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(unavailable(&self.name, e)),
            };
        }
        match self.records.update(&key, value, revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(unavailable(&self.name, e)),
        }
    }

    async fn write_checkpoint(&self, task_id: &str, checkpoint: Vec<u8>) -> Result<(), StoreError> {
        self.records
            .put(checkpoint_key(task_id), Bytes::from(checkpoint))
            .await
            .map(|_| ())
            .map_err(|e| unavailable(&self.name, e))
    }

    async fn read_checkpoint(&self, task_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.records
            .get(checkpoint_key(task_id))
            .await
            .map(|v| v.map(|b| b.to_vec()))
            .map_err(|e| unavailable(&self.name, e))
    }

    async fn purge_records(&self, _before_ms: i64) -> Result<usize, StoreError> {
        // The records bucket's max age removes old records on the server.
        Ok(0)
    }

    fn health(&self) -> Result<(), String> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(format!("{}: connection {state:?}", self.name)),
        }
    }
}
