//! Persistent councils: the [`CouncilStore`] trait and its embedded store, a JSON file replaced
//! atomically (write a temporary file, fsync, rename, fsync the directory), so a crash at any
//! moment leaves either the old or the new set of councils, never a torn one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use council_councils::personas::default_council;
use council_councils::spec::{
    AgentSampling, DeliberationConfig, JudgeMode, Quorum, ScoringWeights, Visibility,
};
use council_councils::{AgentId, AgentSpec, CouncilId, CouncilSpec, Role};
use serde::{Deserialize, Serialize};

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a council for role {role} already exists with a different spec")]
    AlreadyExists { role: Role },
    #[error("no council for role {role}")]
    NotFound { role: Role },
    #[error("council store {path}: {reason}")]
    Unavailable { path: PathBuf, reason: String },
    #[error("council store {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Whether `create` made something new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    New,
    /// The same spec was already there.
    Unchanged,
}

/// Where councils live. One council per role.
pub trait CouncilStore: Send + Sync + std::fmt::Debug {
    fn list(&self) -> Result<Vec<CouncilSpec>, StoreError>;
    fn get(&self, role: &Role) -> Result<Option<CouncilSpec>, StoreError>;
    /// Idempotent: the same spec again is `Unchanged`; another spec for the role is `AlreadyExists`.
    fn create(&self, spec: CouncilSpec) -> Result<Created, StoreError>;
    fn delete(&self, role: &Role) -> Result<CouncilSpec, StoreError>;
}

/// Creates the default council of every built-in role that has none; never touches existing ones.
pub fn apply_default_councils(store: &dyn CouncilStore) -> Result<usize, StoreError> {
    let mut created = 0;
    for role in Role::BUILT_IN {
        if store.get(&role)?.is_none() {
            let spec = default_council(&role).map_err(|e| StoreError::Corrupt {
                path: PathBuf::from("<default councils>"),
                reason: e.to_string(),
            })?;
            if store.create(spec)? == Created::New {
                created += 1;
            }
        }
    }
    Ok(created)
}

/// The embedded store: all councils in one JSON file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    councils: Mutex<BTreeMap<Role, CouncilSpec>>,
}

const FILE_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct FileDto {
    version: u32,
    councils: Vec<CouncilDto>,
}

impl FileStore {
    /// Opens (or starts) the store in `dir`. A file that cannot be read is an error, never an
    /// empty store: losing councils silently is what this replaces.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(dir, e))?;
        let path = dir.join("councils.json");
        let councils = match std::fs::read(&path) {
            Ok(bytes) => parse_file(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(unavailable(&path, e)),
        };
        Ok(Self {
            path,
            councils: Mutex::new(councils),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn locked(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<Role, CouncilSpec>>, StoreError> {
        self.councils.lock().map_err(|_| StoreError::Unavailable {
            path: self.path.clone(),
            reason: "a writer panicked while holding the store".into(),
        })
    }

    fn persist(&self, councils: &BTreeMap<Role, CouncilSpec>) -> Result<(), StoreError> {
        use std::io::Write;
        let dto = FileDto {
            version: FILE_VERSION,
            councils: councils.values().map(CouncilDto::from).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&dto)
            .map_err(|e| unavailable(&self.path, std::io::Error::other(e)))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(|e| unavailable(&tmp, e))?;
        file.write_all(&bytes).map_err(|e| unavailable(&tmp, e))?;
        file.sync_all().map_err(|e| unavailable(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| unavailable(&self.path, e))?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| unavailable(dir, e))?;
        }
        Ok(())
    }
}

fn unavailable(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Unavailable {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn parse_file(path: &Path, bytes: &[u8]) -> Result<BTreeMap<Role, CouncilSpec>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
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

impl CouncilStore for FileStore {
    fn list(&self) -> Result<Vec<CouncilSpec>, StoreError> {
        Ok(self.locked()?.values().cloned().collect())
    }

    fn get(&self, role: &Role) -> Result<Option<CouncilSpec>, StoreError> {
        Ok(self.locked()?.get(role).cloned())
    }

    fn create(&self, spec: CouncilSpec) -> Result<Created, StoreError> {
        let mut councils = self.locked()?;
        match councils.get(&spec.role) {
            Some(existing) if *existing == spec => return Ok(Created::Unchanged),
            Some(_) => return Err(StoreError::AlreadyExists { role: spec.role }),
            None => {}
        }
        let mut next = councils.clone();
        next.insert(spec.role.clone(), spec);
        // Persist first: memory changes only once the change is durable.
        self.persist(&next)?;
        *councils = next;
        Ok(Created::New)
    }

    fn delete(&self, role: &Role) -> Result<CouncilSpec, StoreError> {
        let mut councils = self.locked()?;
        let mut next = councils.clone();
        let removed = next
            .remove(role)
            .ok_or_else(|| StoreError::NotFound { role: role.clone() })?;
        self.persist(&next)?;
        *councils = next;
        Ok(removed)
    }
}

/// Persisted form of a council (domain types carry no serialisation format).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CouncilDto {
    id: String,
    role: String,
    agents: Vec<AgentDto>,
    config: ConfigDto,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AgentDto {
    id: String,
    role: String,
    persona: String,
    temperature: f32,
    top_p: f32,
    seed: u64,
    model_profile: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConfigDto {
    rounds: u32,
    /// "all", "ring" or "sparse:N".
    visibility: String,
    weights: [f64; 4],
    /// "text" or "logprob".
    judge: String,
    early_stop: bool,
    token_budget: Option<u64>,
    max_tokens_per_call: u32,
    /// "majority" or "at_least:N".
    quorum: String,
}

impl From<&CouncilSpec> for CouncilDto {
    fn from(s: &CouncilSpec) -> Self {
        let c = &s.config;
        let w = c.weights;
        Self {
            id: s.id.to_string(),
            role: s.role.to_string(),
            agents: s
                .agents
                .iter()
                .map(|a| AgentDto {
                    id: a.id.to_string(),
                    role: a.role.to_string(),
                    persona: a.persona.clone(),
                    temperature: a.sampling.temperature,
                    top_p: a.sampling.top_p,
                    seed: a.sampling.seed,
                    model_profile: a.model_profile.clone(),
                })
                .collect(),
            config: ConfigDto {
                rounds: c.rounds,
                visibility: match c.visibility {
                    Visibility::All => "all".into(),
                    Visibility::Ring => "ring".into(),
                    Visibility::Sparse { peers } => format!("sparse:{peers}"),
                },
                weights: [w.peer_ranking, w.rubric, w.majority, w.checks],
                judge: match c.judge {
                    JudgeMode::Text => "text".into(),
                    JudgeMode::LogProb => "logprob".into(),
                },
                early_stop: c.early_stop,
                token_budget: c.token_budget,
                max_tokens_per_call: c.max_tokens_per_call,
                quorum: match c.quorum {
                    Quorum::Majority => "majority".into(),
                    Quorum::AtLeast(n) => format!("at_least:{n}"),
                },
            },
        }
    }
}

impl CouncilDto {
    fn into_spec(self) -> Result<CouncilSpec, String> {
        let c = &self.config;
        let visibility = match c.visibility.as_str() {
            "all" => Visibility::All,
            "ring" => Visibility::Ring,
            other => match other.strip_prefix("sparse:").and_then(|n| n.parse().ok()) {
                Some(peers) => Visibility::Sparse { peers },
                None => return Err(format!("visibility {other:?}")),
            },
        };
        let judge = match c.judge.as_str() {
            "text" => JudgeMode::Text,
            "logprob" => JudgeMode::LogProb,
            other => return Err(format!("judge {other:?}")),
        };
        let quorum = match c.quorum.as_str() {
            "majority" => Quorum::Majority,
            other => match other.strip_prefix("at_least:").and_then(|n| n.parse().ok()) {
                Some(n) => Quorum::AtLeast(n),
                None => return Err(format!("quorum {other:?}")),
            },
        };
        let [peer_ranking, rubric, majority, checks] = c.weights;
        let config = DeliberationConfig {
            rounds: c.rounds,
            visibility,
            weights: ScoringWeights {
                peer_ranking,
                rubric,
                majority,
                checks,
            },
            judge,
            early_stop: c.early_stop,
            token_budget: c.token_budget,
            max_tokens_per_call: c.max_tokens_per_call,
            quorum,
        };
        let agents = self
            .agents
            .into_iter()
            .map(|a| {
                Ok(AgentSpec {
                    id: AgentId::new(a.id).map_err(|e| e.to_string())?,
                    role: a
                        .role
                        .parse()
                        .map_err(|e: council_councils::RoleError| e.to_string())?,
                    persona: a.persona,
                    sampling: AgentSampling {
                        temperature: a.temperature,
                        top_p: a.top_p,
                        seed: a.seed,
                    },
                    model_profile: a.model_profile,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let role: Role = self
            .role
            .parse()
            .map_err(|e: council_councils::RoleError| e.to_string())?;
        CouncilSpec::new(
            CouncilId::new(self.id).map_err(|e| e.to_string())?,
            role,
            agents,
            config,
        )
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn councils_survive_reopening_and_creation_is_idempotent() {
        let dir = tempfile::tempdir().expect("dir");
        let store = FileStore::open(dir.path()).expect("opens");
        assert_eq!(apply_default_councils(&store).expect("defaults"), 5);
        assert_eq!(
            apply_default_councils(&store).expect("again"),
            0,
            "defaults are applied once"
        );
        let custom = council_councils::personas::council_of(&"SECURITY".parse().expect("role"), 2)
            .expect("spec");
        assert_eq!(store.create(custom.clone()).expect("create"), Created::New);
        assert_eq!(
            store.create(custom.clone()).expect("same again"),
            Created::Unchanged
        );
        let mut different = custom.clone();
        different.config.rounds = 3;
        assert!(matches!(
            store.create(different),
            Err(StoreError::AlreadyExists { .. })
        ));
        store.delete(&Role::Data).expect("delete");
        assert!(matches!(
            store.delete(&Role::Data),
            Err(StoreError::NotFound { .. })
        ));
        drop(store);

        let reopened = FileStore::open(dir.path()).expect("reopens");
        let roles: Vec<String> = reopened
            .list()
            .expect("list")
            .iter()
            .map(|c| c.role.to_string())
            .collect();
        assert_eq!(roles, vec!["DEV", "QA", "ARCHITECT", "DEVOPS", "SECURITY"]);
        assert_eq!(reopened.get(&custom.role).expect("get"), Some(custom));
        // Defaults never clobber: DATA was deleted on purpose and comes back only as the default.
        assert_eq!(apply_default_councils(&reopened).expect("defaults"), 1);
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

    #[test]
    fn a_leftover_temporary_file_does_not_matter() {
        let dir = tempfile::tempdir().expect("dir");
        let store = FileStore::open(dir.path()).expect("opens");
        apply_default_councils(&store).expect("defaults");
        // A crash between writing the temporary file and renaming it.
        std::fs::write(dir.path().join("councils.json.tmp"), b"half a fi").expect("write");
        let reopened = FileStore::open(dir.path()).expect("reopens");
        assert_eq!(reopened.list().expect("list").len(), 5);
    }
}
