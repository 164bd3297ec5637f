//! The embedded store, for one process: councils in one JSON file replaced atomically (write a
//! temporary file, fsync, rename, fsync the directory), so a crash at any moment leaves either
//! the old or the new set of councils, never a torn one; each deliberation record in its own
//! protobuf file written the same way. A lock file keeps a second process out, so records
//! left live by a crash are known to be interrupted and are marked so at the next start.
//!
//! Every read and write of a file runs on tokio's blocking pool, never on an async worker. Record
//! revisions (for compare-and-set) are kept in memory: the lock makes this process the only
//! writer, so a revision only has to be unique while it runs.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use council_councils::{CouncilSpec, Role, TaskId};
use council_proto::council::store::v1::DeliberationRecord;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::dto::CouncilDto;
use super::{
    Claim, CouncilStore, Created, StoreError, Versioned, claimable, interrupted, is_finished,
};

/// The embedded store: a directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    path: PathBuf,
    records: PathBuf,
    councils: Mutex<BTreeMap<Role, CouncilSpec>>,
    /// Serialises claims and writes of records; holds their revisions.
    revisions: Mutex<Revisions>,
    /// Held open for its advisory lock for the store's lifetime.
    _lock: std::fs::File,
}

/// The revision of every record written by this process; a record on disk it has not written
/// is at revision 1.
#[derive(Debug, Default)]
struct Revisions {
    of: HashMap<String, u64>,
    last: u64,
}

impl Revisions {
    fn current(&self, task_id: &str, exists: bool) -> u64 {
        if exists {
            self.of.get(task_id).copied().unwrap_or(1)
        } else {
            0
        }
    }

    fn bump(&mut self, task_id: &str) -> u64 {
        // Unique for the process's life (never reused after a purge), above 1.
        self.last = self.last.max(1) + 1;
        self.of.insert(task_id.to_owned(), self.last);
        self.last
    }
}

const FILE_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct FileDto {
    version: u32,
    councils: Vec<CouncilDto>,
}

impl FileStore {
    /// Opens (or starts) the store in `dir`, taking its lock, and marks the records a previous
    /// process left live as interrupted. A file that cannot be read is an error, never an
    /// empty store: losing councils silently is what this replaces.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_at(dir, super::now_ms())
    }

    fn open_at(dir: &Path, now_ms: i64) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| unavailable(&lock_path, e))?;
        lock.try_lock().map_err(|e| StoreError::Unavailable {
            store: lock_path.display().to_string(),
            reason: format!(
                "another process holds this store ({e}); a file store serves one process \
                 (use the NATS key-value store for several replicas)"
            ),
        })?;
        let path = dir.join("councils.json");
        let councils = match std::fs::read(&path) {
            Ok(bytes) => parse_file(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(unavailable(&path, e)),
        };
        let records = dir.join("records");
        std::fs::create_dir_all(&records).map_err(|e| unavailable(&records, e))?;
        let inner = Inner {
            dir: dir.to_owned(),
            path,
            records,
            councils: Mutex::new(councils),
            revisions: Mutex::new(Revisions::default()),
            _lock: lock,
        };
        let recovered = inner.recover(now_ms)?;
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "marked deliberations interrupted by the last stop as failed"
            );
        }
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Runs `f` (file I/O) on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Unavailable {
                store: self.inner.dir.display().to_string(),
                reason: format!("its I/O task ended: {e}"),
            })?
    }
}

impl Inner {
    fn locked(&self) -> Result<MutexGuard<'_, BTreeMap<Role, CouncilSpec>>, StoreError> {
        self.councils.lock().map_err(|_| self.poisoned())
    }

    fn records_locked(&self) -> Result<MutexGuard<'_, Revisions>, StoreError> {
        self.revisions.lock().map_err(|_| self.poisoned())
    }

    fn poisoned(&self) -> StoreError {
        StoreError::Unavailable {
            store: self.dir.display().to_string(),
            reason: "a writer panicked while holding the store".into(),
        }
    }

    fn persist(&self, councils: &BTreeMap<Role, CouncilSpec>) -> Result<(), StoreError> {
        let dto = FileDto {
            version: FILE_VERSION,
            councils: councils.values().map(CouncilDto::from).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&dto)
            .map_err(|e| unavailable(&self.path, std::io::Error::other(e)))?;
        write_atomically(&self.path, &bytes)
    }

    /// Mutates the councils: persist first, memory changes only once the change is durable.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<Role, CouncilSpec>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut councils = self.locked()?;
        let mut next = councils.clone();
        let out = f(&mut next)?;
        if next != *councils {
            self.persist(&next)?;
            *councils = next;
        }
        Ok(out)
    }

    fn record_path(&self, task_id: &str) -> Result<PathBuf, StoreError> {
        // Validated task ids are [A-Za-z0-9._:-]{1,128}; the prefix keeps "." and ".." from
        // naming directories.
        let id = TaskId::new(task_id).map_err(|e| StoreError::Corrupt {
            store: self.records.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(self.records.join(format!("t-{}.pb", id.as_str())))
    }

    fn read_record(&self, path: &Path) -> Result<Option<DeliberationRecord>, StoreError> {
        match std::fs::read(path) {
            Ok(bytes) => DeliberationRecord::decode(bytes.as_slice())
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    store: path.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(path, e)),
        }
    }

    fn checkpoint_path(&self, task_id: &str) -> Result<PathBuf, StoreError> {
        let record = self.record_path(task_id)?;
        Ok(record.with_file_name(format!("c-{task_id}.json")))
    }

    fn write_record(&self, record: &DeliberationRecord) -> Result<(), StoreError> {
        let path = self.record_path(&record.task_id)?;
        write_atomically(&path, &record.encode_to_vec())
    }

    fn record_files(&self) -> Result<Vec<PathBuf>, StoreError> {
        let entries =
            std::fs::read_dir(&self.records).map_err(|e| unavailable(&self.records, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| unavailable(&self.records, e))?.path();
            if path.extension().is_some_and(|e| e == "pb") {
                out.push(path);
            }
        }
        Ok(out)
    }

    fn recover(&self, now_ms: i64) -> Result<usize, StoreError> {
        let _guard = self.records_locked()?;
        let mut recovered = 0;
        for path in self.record_files()? {
            if let Some(record) = self.read_record(&path)?
                && !is_finished(&record)
            {
                self.write_record(&interrupted(record, now_ms))?;
                recovered += 1;
            }
        }
        Ok(recovered)
    }

    fn record_at(&self, task_id: &str) -> Result<Option<Versioned>, StoreError> {
        let revisions = self.records_locked()?;
        let record = self.read_record(&self.record_path(task_id)?)?;
        Ok(record.map(|r| {
            let revision = revisions.current(task_id, true);
            (r, revision)
        }))
    }

    fn claim(&self, record: DeliberationRecord, now_ms: i64) -> Result<Claim, StoreError> {
        let mut revisions = self.records_locked()?;
        let path = self.record_path(&record.task_id)?;
        let replaced = self.read_record(&path)?;
        if let Some(existing) = &replaced
            && !claimable(existing, now_ms)
        {
            return Ok(Claim::Existing(Box::new(existing.clone())));
        }
        self.write_record(&record)?;
        Ok(Claim::Claimed {
            replaced: replaced.map(Box::new),
            revision: revisions.bump(&record.task_id),
        })
    }

    fn write_record_at(
        &self,
        record: &DeliberationRecord,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        let mut revisions = self.records_locked()?;
        let exists = self.record_path(&record.task_id)?.exists();
        if revisions.current(&record.task_id, exists) != revision {
            return Ok(None);
        }
        self.write_record(record)?;
        Ok(Some(revisions.bump(&record.task_id)))
    }

    fn purge_records(&self, before_ms: i64) -> Result<usize, StoreError> {
        let mut revisions = self.records_locked()?;
        let mut purged = 0;
        for path in self.record_files()? {
            if let Some(record) = self.read_record(&path)?
                && is_finished(&record)
                && record.updated_at_ms < before_ms
            {
                std::fs::remove_file(&path).map_err(|e| unavailable(&path, e))?;
                let checkpoint = self.checkpoint_path(&record.task_id)?;
                match std::fs::remove_file(&checkpoint) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(unavailable(&checkpoint, e));
                    }
                    _ => {}
                }
                revisions.of.remove(&record.task_id);
                purged += 1;
            }
        }
        Ok(purged)
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new content: temporary file,
/// fsync, rename, fsync the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp).map_err(|e| unavailable(&tmp, e))?;
    file.write_all(bytes).map_err(|e| unavailable(&tmp, e))?;
    file.sync_all().map_err(|e| unavailable(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| unavailable(path, e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| unavailable(dir, e))?;
    }
    Ok(())
}

fn unavailable(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Unavailable {
        store: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn parse_file(path: &Path, bytes: &[u8]) -> Result<BTreeMap<Role, CouncilSpec>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        store: path.display().to_string(),
        reason,
    };
    let dto: FileDto = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if dto.version != FILE_VERSION {
        return Err(corrupt(format!(
            "version {} (this build reads {FILE_VERSION})",
            dto.version
        )));
    }
    let mut out = BTreeMap::new();
    for council in dto.councils {
        let spec = council.into_spec().map_err(corrupt)?;
        out.insert(spec.role.clone(), spec);
    }
    Ok(out)
}

#[tonic::async_trait]
impl CouncilStore for FileStore {
    async fn list(&self) -> Result<Vec<CouncilSpec>, StoreError> {
        Ok(self.inner.locked()?.values().cloned().collect())
    }

    async fn get(&self, role: &Role) -> Result<Option<CouncilSpec>, StoreError> {
        Ok(self.inner.locked()?.get(role).cloned())
    }

    async fn create(&self, spec: CouncilSpec) -> Result<Created, StoreError> {
        self.blocking(move |s| {
            s.change(|councils| match councils.get(&spec.role) {
                Some(existing) if *existing == spec => Ok(Created::Unchanged),
                Some(_) => Err(StoreError::AlreadyExists { role: spec.role }),
                None => {
                    councils.insert(spec.role.clone(), spec);
                    Ok(Created::New)
                }
            })
        })
        .await
    }

    async fn delete(&self, role: &Role) -> Result<CouncilSpec, StoreError> {
        let role = role.clone();
        self.blocking(move |s| {
            s.change(|councils| {
                councils
                    .remove(&role)
                    .ok_or_else(|| StoreError::NotFound { role: role.clone() })
            })
        })
        .await
    }

    async fn replace(&self, expected: &CouncilSpec, new: CouncilSpec) -> Result<(), StoreError> {
        let expected = expected.clone();
        self.blocking(move |s| {
            s.change(|councils| match councils.get(&new.role) {
                None => Err(StoreError::NotFound { role: new.role }),
                Some(current) if *current != expected => {
                    Err(StoreError::Conflict { role: new.role })
                }
                Some(_) => {
                    councils.insert(new.role.clone(), new);
                    Ok(())
                }
            })
        })
        .await
    }

    async fn record_at(&self, task_id: &str) -> Result<Option<Versioned>, StoreError> {
        let task_id = task_id.to_owned();
        self.blocking(move |s| s.record_at(&task_id)).await
    }

    async fn claim(&self, record: DeliberationRecord, now_ms: i64) -> Result<Claim, StoreError> {
        self.blocking(move |s| s.claim(record, now_ms)).await
    }

    async fn write_record_at(
        &self,
        record: DeliberationRecord,
        revision: u64,
    ) -> Result<Option<u64>, StoreError> {
        self.blocking(move |s| s.write_record_at(&record, revision))
            .await
    }

    async fn write_checkpoint(&self, task_id: &str, checkpoint: Vec<u8>) -> Result<(), StoreError> {
        let task_id = task_id.to_owned();
        self.blocking(move |s| write_atomically(&s.checkpoint_path(&task_id)?, &checkpoint))
            .await
    }

    async fn read_checkpoint(&self, task_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let task_id = task_id.to_owned();
        self.blocking(move |s| {
            let path = s.checkpoint_path(&task_id)?;
            match std::fs::read(&path) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(unavailable(&path, e)),
            }
        })
        .await
    }

    async fn purge_records(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.blocking(move |s| s.purge_records(before_ms)).await
    }

    fn health(&self) -> Result<(), String> {
        // A local directory the process holds locked: reachable for as long as it runs;
        // write failures surface per call.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use council_proto::fleet::orchestrator::v1::DeliberationStatus;

    use super::super::{STALE_AFTER_MS, apply_default_councils, effective};
    use super::*;

    #[tokio::test]
    async fn councils_survive_reopening_and_creation_is_idempotent() {
        let dir = tempfile::tempdir().expect("dir");
        let store = FileStore::open(dir.path()).expect("opens");
        assert_eq!(apply_default_councils(&store).await.expect("defaults"), 5);
        assert_eq!(
            apply_default_councils(&store).await.expect("again"),
            0,
            "defaults are applied once"
        );
        let custom = council_councils::personas::council_of(&"SECURITY".parse().expect("role"), 2)
            .expect("spec");
        assert_eq!(
            store.create(custom.clone()).await.expect("create"),
            Created::New
        );
        assert_eq!(
            store.create(custom.clone()).await.expect("same again"),
            Created::Unchanged
        );
        let mut different = custom.clone();
        different.config.rounds = 3;
        assert!(matches!(
            store.create(different.clone()).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        // Compare-and-set: replacing from a stale view loses.
        store
            .replace(&custom, different.clone())
            .await
            .expect("cas");
        assert!(matches!(
            store.replace(&custom, custom.clone()).await,
            Err(StoreError::Conflict { .. })
        ));
        store.delete(&Role::Data).await.expect("delete");
        assert!(matches!(
            store.delete(&Role::Data).await,
            Err(StoreError::NotFound { .. })
        ));
        drop(store);

        let reopened = FileStore::open(dir.path()).expect("reopens");
        let roles: Vec<String> = reopened
            .list()
            .await
            .expect("list")
            .iter()
            .map(|c| c.role.to_string())
            .collect();
        assert_eq!(roles, vec!["DEV", "QA", "ARCHITECT", "DEVOPS", "SECURITY"]);
        assert_eq!(
            reopened.get(&custom.role).await.expect("get"),
            Some(different)
        );
        // Defaults never clobber: DATA was deleted on purpose and comes back only as the default.
        assert_eq!(
            apply_default_councils(&reopened).await.expect("defaults"),
            1
        );
    }

    #[test]
    fn a_second_process_cannot_open_the_same_store() {
        let dir = tempfile::tempdir().expect("dir");
        let _first = FileStore::open(dir.path()).expect("opens");
        let err = FileStore::open(dir.path()).expect_err("locked");
        assert!(
            matches!(&err, StoreError::Unavailable { reason, .. } if reason.contains("another process")),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("councils.json"), b"{ torn").expect("write");
        assert!(matches!(
            FileStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
        std::fs::write(
            dir.path().join("councils.json"),
            br#"{"version": 99, "councils": []}"#,
        )
        .expect("write");
        assert!(matches!(
            FileStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn a_leftover_temporary_file_does_not_matter() {
        let dir = tempfile::tempdir().expect("dir");
        let store = FileStore::open(dir.path()).expect("opens");
        apply_default_councils(&store).await.expect("defaults");
        drop(store);
        // A crash between writing the temporary file and renaming it.
        std::fs::write(dir.path().join("councils.json.tmp"), b"half a fi").expect("write");
        std::fs::write(dir.path().join("records/t-x.pb.tmp"), b"half").expect("write");
        let reopened = FileStore::open(dir.path()).expect("reopens");
        assert_eq!(reopened.list().await.expect("list").len(), 5);
        assert_eq!(reopened.record("x").await.expect("read"), None);
    }

    fn record(task: &str, status: DeliberationStatus, at: i64) -> DeliberationRecord {
        DeliberationRecord {
            task_id: task.into(),
            role: "DEV".into(),
            status: status as i32,
            created_at_ms: at,
            updated_at_ms: at,
            deadline_at_ms: at + 1_000,
            instance_id: "test".into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn records_are_claimed_once_and_survive_a_restart_as_interrupted() {
        let dir = tempfile::tempdir().expect("dir");
        let store = FileStore::open(dir.path()).expect("opens");
        let live = record("task:1", DeliberationStatus::InProgress, 10);
        let Claim::Claimed {
            replaced: None,
            revision,
        } = store.claim(live.clone(), 10).await.expect("claim")
        else {
            panic!("a new task is claimed")
        };
        // Writes are compare-and-set on the revision.
        let next = store
            .write_record_at(live.clone(), revision)
            .await
            .expect("write")
            .expect("the owner writes");
        assert_eq!(
            store
                .write_record_at(live.clone(), revision)
                .await
                .expect("write"),
            None,
            "a stale revision loses"
        );
        assert_eq!(
            store.write_record_at(live.clone(), 0).await.expect("write"),
            None,
            "revision 0 only creates"
        );
        assert_eq!(
            store.record_at("task:1").await.expect("read"),
            Some((live.clone(), next))
        );
        // A second claim while it runs gets the running record, and writes nothing.
        let again = record("task:1", DeliberationStatus::Pending, 20);
        assert_eq!(
            store.claim(again, 20).await.expect("claim"),
            Claim::Existing(Box::new(live.clone()))
        );
        let mut done = record("done", DeliberationStatus::Completed, 10);
        done.response = Some(Default::default());
        assert!(matches!(
            store.claim(done.clone(), 10).await.expect("claim"),
            Claim::Claimed { replaced: None, .. }
        ));
        let failed = record("failed", DeliberationStatus::Failed, 10);
        store.claim(failed.clone(), 10).await.expect("claim");
        // A failed task may run again.
        let retry = record("failed", DeliberationStatus::InProgress, 30);
        assert!(
            matches!(
                store.claim(retry.clone(), 30).await.expect("claim"),
                Claim::Claimed { replaced: Some(r), .. } if *r == failed
            ),
            "the failed record it replaced comes back"
        );
        assert_eq!(store.record("failed").await.expect("read"), Some(retry));
        drop(store);

        // The process died: its live records come back failed (retryable), the rest intact.
        let reopened = FileStore::open_at(dir.path(), 99).expect("reopens");
        let interrupted = reopened
            .record("task:1")
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(interrupted.status, DeliberationStatus::Failed as i32);
        assert!(interrupted.retryable && interrupted.error_message.contains("interrupted"));
        assert_eq!(interrupted.updated_at_ms, 99);
        assert_eq!(reopened.record("done").await.expect("read"), Some(done));
        // Retention removes finished records older than the cut, nothing else.
        // A record this process has not written is at revision 1.
        assert_eq!(
            reopened
                .record_at("done")
                .await
                .expect("read")
                .map(|(_, r)| r),
            Some(1)
        );
        reopened
            .write_record_at(record("live", DeliberationStatus::InProgress, 5), 0)
            .await
            .expect("write")
            .expect("created");
        assert_eq!(reopened.purge_records(50).await.expect("purge"), 1);
        assert!(reopened.record("done").await.expect("read").is_none());
        assert!(reopened.record("live").await.expect("read").is_some());
        assert!(reopened.record("task:1").await.expect("read").is_some());
        assert_eq!(reopened.purge_records(100).await.expect("purge"), 2);
        assert!(matches!(
            reopened.record("../x").await,
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn checkpoints_live_beside_records_and_go_with_them() {
        let dir = tempfile::tempdir().expect("dir");
        let store = FileStore::open(dir.path()).expect("opens");
        assert_eq!(store.read_checkpoint("ck").await.expect("read"), None);
        store
            .write_checkpoint("ck", b"{\"steps\":[]}".to_vec())
            .await
            .expect("write");
        store
            .write_record_at(record("ck", DeliberationStatus::Failed, 5), 0)
            .await
            .expect("write")
            .expect("created");
        // The record file holds no checkpoint: a heartbeat rewrites only the record.
        let bytes = std::fs::read(dir.path().join("records/t-ck.pb")).expect("record file");
        assert!(
            DeliberationRecord::decode(bytes.as_slice())
                .expect("decodes")
                .checkpoint
                .is_empty()
        );
        assert_eq!(
            store.read_checkpoint("ck").await.expect("read").as_deref(),
            Some(&b"{\"steps\":[]}"[..])
        );
        assert!(matches!(
            store.write_checkpoint("../x", Vec::new()).await,
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(store.purge_records(10).await.expect("purge"), 1);
        assert_eq!(store.read_checkpoint("ck").await.expect("read"), None);
    }

    #[test]
    fn a_live_record_long_past_its_deadline_reads_as_interrupted() {
        let live = record("t", DeliberationStatus::InProgress, 0);
        assert_eq!(effective(live.clone(), 1_000), live);
        let stale = effective(live, 1_001 + STALE_AFTER_MS);
        assert_eq!(stale.status, DeliberationStatus::Failed as i32);
        assert!(stale.retryable);
        assert!(super::super::claimable(&stale, 0));
    }
}
