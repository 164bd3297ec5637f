//! `council serve` as a process: councils created through the API survive a SIGKILL.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use council_proto::fleet::orchestrator::v1 as pb;
use council_proto::fleet::orchestrator::v1::orchestrator_service_client::OrchestratorServiceClient;

struct Served {
    child: Child,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(model: &str, data: &str) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_council"))
        .args([
            "serve",
            "--model-dir",
            model,
            "--data-dir",
            data,
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("council serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reads the address line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Served { child, addr }
}

async fn client(addr: &str) -> OrchestratorServiceClient<tonic::transport::Channel> {
    OrchestratorServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connects")
}

async fn roles(addr: &str) -> Vec<String> {
    let listed = client(addr)
        .await
        .list_councils(pb::ListCouncilsRequest {
            role_filter: String::new(),
            include_agents: false,
        })
        .await
        .expect("list")
        .into_inner();
    listed.councils.into_iter().map(|c| c.role).collect()
}

#[tokio::test]
async fn councils_survive_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let model = dir.path().join("model");
    let data = dir.path().join("data");
    let (model, data) = (
        model.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
    );
    let made = Command::new(env!("CARGO_BIN_EXE_council"))
        .args(["dev", "tiny-model", model])
        .output()
        .expect("runs");
    assert!(made.status.success());

    let first = serve(model, data);
    assert_eq!(
        roles(&first.addr).await,
        vec!["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA"]
    );
    let created = client(&first.addr)
        .await
        .create_council(pb::CreateCouncilRequest {
            role: "SECURITY".into(),
            num_agents: 2,
            config: None,
        })
        .await
        .expect("create")
        .into_inner();
    assert_eq!(created.agents_created, 2);
    client(&first.addr)
        .await
        .delete_council(pb::DeleteCouncilRequest {
            role: "DATA".into(),
        })
        .await
        .expect("delete");
    drop(first); // SIGKILL: no shutdown path runs.

    let second = serve(model, data);
    // The API-created council is there; the deleted default is restored only as a default.
    assert_eq!(
        roles(&second.addr).await,
        vec!["DEV", "QA", "ARCHITECT", "DEVOPS", "DATA", "SECURITY"]
    );
}
