//! The official clients against the simulators: the Phala CLI (`phala`) and
//! SDK (`@phala/cloud`) against the Phala Cloud simulator, and Safe's
//! `@safe-global/api-kit` against the Safe Transaction Service simulator,
//! each at the version pinned in `package.json`. Node runs them from
//! `node_modules` (scripts/test runs `npm ci` and puts node on `PATH`); the
//! scripts in `tests/clients/` drive the SDKs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use alloy::primitives::{Address, B256};
use approval_bridge::safe::{Call, Operation, SafeTx};
use approval_bridge::sandbox::LocalChain;
use approval_bridge::sandbox::chain::IDstackApp;
use approval_bridge::sandbox::phala_sim::{PhalaSim, PhalaWorld, SimCvm, standard};
use approval_bridge::sandbox::project_root;
use approval_bridge::sandbox::safe_service::SafeServiceSim;
use reqwest::Url;
use serde_json::{Value, json};

fn root() -> PathBuf {
    project_root().expect("run from the checkout")
}

/// Runs `node <script> <args>` from the project root.
fn node(script: &str, args: &[&str]) -> Output {
    Command::new("node")
        .current_dir(root())
        .arg(script)
        .args(args)
        .output()
        .expect("node runs (scripts/test installs the pinned npm packages)")
}

/// A private directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("ab-clients-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A plan file for a client script.
fn write_plan(dir: &Path, name: &str, plan: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, plan.to_string()).unwrap();
    path.display().to_string()
}

/// The Phala world on a fresh chain: the standard CVMs, both DstackApps
/// owned by dev account 0 (so the test registers directly).
struct PhalaFixture {
    chain: LocalChain,
    sim: PhalaSim,
    base: Url,
    web_app: Address,
    api_app: Address,
    home: TempDir,
}

impl PhalaFixture {
    async fn start() -> PhalaFixture {
        let chain = LocalChain::start(None).await.expect("local chain starts");
        let owner = chain.address(0);
        let web_app = chain.deploy_dstack_app(owner, false).await.unwrap();
        let api_app = chain.deploy_dstack_app(owner, true).await.unwrap();
        let world = PhalaWorld::standard(chain.chain_id(), web_app, api_app);
        let (base, sim) = PhalaSim::spawn(world, chain.rpc_url()).await.unwrap();
        PhalaFixture {
            chain,
            sim,
            base,
            web_app,
            api_app,
            home: TempDir::new(),
        }
    }

    fn cvm(&self, name: &str) -> &SimCvm {
        self.sim.world().cvm(name).expect("a CVM of the world")
    }

    fn node_id(&self, name: &str) -> u32 {
        self.sim.world().node(name).expect("a node").id
    }

    /// `phala <args>` with the simulator as its API, a private HOME (no
    /// profile, no update check) and `--json` output.
    fn phala(&self, args: &[&str]) -> (Output, Value) {
        let output = Command::new(root().join("node_modules/.bin/phala"))
            .current_dir(self.home.path())
            .env("HOME", self.home.path())
            .env("PHALA_CLOUD_API_PREFIX", self.base.as_str())
            .env("PHALA_CLOUD_API_KEY", self.sim.api_key())
            .env("PHALA_DISABLE_UPDATE_CHECK", "1")
            .env("NO_COLOR", "1")
            .env_remove("PRIVATE_KEY")
            .env_remove("ETH_RPC_URL")
            .args(args)
            .arg("--json")
            .output()
            .expect("the pinned phala CLI runs (npm ci)");
        let json = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        (output, json)
    }

    async fn allow(&self, app: Address, compose_hash: B256, device: B256) {
        let contract = IDstackApp::new(app, self.chain.provider());
        let pending = contract.addComposeHash(compose_hash).send().await.unwrap();
        pending.get_receipt().await.unwrap();
        let pending = contract.addDevice(device).send().await.unwrap();
        pending.get_receipt().await.unwrap();
    }
}

fn assert_ran(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phala_cli_prepares_commits_and_replicates_directly_against_the_simulator() {
    let f = PhalaFixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    let env_file = f.home.path().join("replica.env");
    std::fs::write(
        &env_file,
        "# the replica's settings\nAPI_URL=https://api.example/v1?a=b\n\nLOG_LEVEL = debug\n",
    )
    .unwrap();
    let env_file = env_file.display().to_string();
    let expected_env = std::collections::BTreeMap::from([
        (
            "API_URL".to_owned(),
            "https://api.example/v1?a=b".to_owned(),
        ),
        ("LOG_LEVEL".to_owned(), "debug".to_owned()),
    ]);

    // 1. Prepare-only, naming the node by name and encrypting an env file
    //    for the app's on-chain KMS key.
    let uuid = web.vm_uuid.to_string();
    let (output, prepared) = f.phala(&[
        "cvms",
        "replicate",
        &uuid,
        "--node-id",
        "prod-2",
        "--prepare-only",
        "-e",
        &env_file,
    ]);
    assert_ran(&output, "cvms replicate --prepare-only");
    assert_eq!(prepared["prepare_only"], true, "{prepared}");
    let token = prepared["commitToken"].as_str().expect("a commit token");
    assert_eq!(
        prepared["composeHash"],
        hex::encode(web.compose_hash()),
        "{prepared}"
    );
    let device = f.sim.world().node("prod-2").unwrap().device_id;
    assert_eq!(prepared["deviceId"], hex::encode(device));
    assert_eq!(prepared["appId"], hex::encode(f.web_app));
    assert_eq!(prepared["onchainStatus"]["is_allowed"], false);
    assert!(f.sim.replicas(&uuid).is_empty());

    // 2. The owners register, then the CLI commits with the token.
    f.allow(f.web_app, web.compose_hash(), device).await;
    let hash = format!("0x{}", hex::encode(web.compose_hash()));
    let (output, committed) = f.phala(&[
        "cvms",
        "replicate",
        &uuid,
        "--commit",
        "--token",
        token,
        "--compose-hash",
        &hash,
    ]);
    assert_ran(&output, "cvms replicate --commit");
    let replicas = f.sim.replicas(&uuid);
    assert_eq!(replicas.len(), 1, "{committed}");
    assert_eq!(committed["vm_uuid"], replicas[0].vm_uuid.to_string());
    assert_eq!(replicas[0].node_id, f.node_id("prod-2"));
    assert_eq!(replicas[0].env.as_ref(), Some(&expected_env));

    // 3. A Cloud-KMS source: replicated at once, env encrypted for the key
    //    in its CVM info.
    let docs = f.cvm(standard::DOCS).vm_uuid.to_string();
    let (output, direct) = f.phala(&[
        "cvms",
        "replicate",
        standard::DOCS,
        "--node-id",
        &f.node_id("prod-3").to_string(),
        "-e",
        &env_file,
    ]);
    assert_ran(&output, "cvms replicate (Cloud KMS)");
    let replicas = f.sim.replicas(&docs);
    assert_eq!(replicas.len(), 1, "{direct}");
    assert_eq!(direct["vm_uuid"], replicas[0].vm_uuid.to_string());
    assert_eq!(replicas[0].node_id, f.node_id("prod-3"));
    assert_eq!(replicas[0].env.as_ref(), Some(&expected_env));
    assert!(f.sim.tokens(&docs).is_empty());

    // Every call the CLI made succeeded or was the expected 465.
    let statuses: Vec<(String, String, u16)> = f
        .sim
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect();
    assert!(
        statuses.iter().all(|(_, _, s)| *s < 400 || *s == 465),
        "{statuses:?}"
    );
    assert!(
        statuses.iter().any(|(m, p, _)| m == "GET"
            && p.ends_with(&format!("/kms/base/pubkey/{}", hex::encode(f.web_app)))),
        "the on-chain env key came from the KMS: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phala_simulator_answer_parses_with_the_sdks_schemas() {
    let f = PhalaFixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    let http = reqwest::Client::new();
    let key = f.sim.api_key().to_owned();

    // A prepare (465) and a commit, so that the lists hold a starting replica.
    let node_id = f.node_id("prod-2");
    let answer = http
        .post(format!("{}/cvms/{}/replicas", f.base, web.vm_uuid))
        .header("X-API-Key", &key)
        .header("X-Prepare-Only", "true")
        .json(&json!({"node_id": node_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 465);
    let envelope: Value = answer.json().await.unwrap();
    let details = envelope["detail"]["details"].as_array().unwrap();
    let field = |name: &str| {
        details
            .iter()
            .find(|d| d["field"] == name)
            .map(|d| d["value"].clone())
            .unwrap()
    };
    let device = f.sim.world().node("prod-2").unwrap().device_id;
    f.allow(f.web_app, web.compose_hash(), device).await;
    let commit = http
        .post(format!("{}/cvms/{}/commit-replica", f.base, web.vm_uuid))
        .json(&json!({"token": field("commit_token"), "compose_hash": field("compose_hash"), "transaction_hash": "already-registered"}))
        .send()
        .await
        .unwrap();
    assert_eq!(commit.status(), 200);
    let replica: Value = commit.json().await.unwrap();
    let replica_uuid = replica["vm_uuid"].as_str().unwrap().to_owned();

    let mut cvm_ids: Vec<String> = f
        .sim
        .world()
        .cvms
        .iter()
        .map(|c| c.vm_uuid.to_string())
        .collect();
    cvm_ids.push(replica_uuid.clone());
    let dir = TempDir::new();
    let plan = json!({
        "base_url": f.base,
        "api_key": key,
        "cvm_ids": &cvm_ids,
        "app_ids": [hex::encode(f.web_app), hex::encode(f.api_app)],
        "onchain_app_ids": [hex::encode(f.web_app), format!("0x{}", hex::encode(f.api_app))],
        "kms_type": "base",
        "cloud_source": f.cvm(standard::DOCS).vm_uuid.to_string(),
        "cloud_node_id": f.node_id("prod-3"),
        "values": [
            {"schema": "VMSchema", "label": "commit-replica answer", "value": replica},
            {"schema": "ApiErrorSchema", "label": "465 envelope", "value": envelope},
            {"schema": "KmsInfoSchema", "label": "465 kms_info", "value": field("kms_info")},
        ],
    });
    let output = node(
        "tests/clients/phala_sdk.mjs",
        &[&write_plan(dir.path(), "plan.json", &plan)],
    );
    let lines: Vec<Value> = text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let failed: Vec<&Value> = lines.iter().filter(|l| l["ok"] != true).collect();
    assert!(
        output.status.success() && failed.is_empty(),
        "schema failures: {failed:#?}\nstderr: {}",
        text(&output.stderr)
    );
    // Every CVM and both apps in both versions, nodes, 2 keys, status batch,
    // replicate and its CVM info, and the 3 given values.
    assert_eq!(
        lines.len(),
        2 * (cvm_ids.len() + 2) + 1 + 2 + 1 + 2 + 3,
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["check"] == format!("getCvmInfo 2026-01-21 {replica_uuid}"))
    );
}

/// A 2-of-3 Safe on anvil, a DstackApp it owns, and the Safe service simulator.
struct SafeFixture {
    chain: LocalChain,
    safe: Address,
    app: Address,
    service_url: Url,
    _service: SafeServiceSim,
}

impl SafeFixture {
    async fn start() -> SafeFixture {
        let chain = LocalChain::start(None).await.expect("local chain starts");
        let owners = [chain.address(0), chain.address(1), chain.address(2)];
        let safe = chain.create_safe(&owners, 2, 21).await.unwrap();
        let app = chain.deploy_dstack_app(safe, false).await.unwrap();
        let (service_url, service) = SafeServiceSim::spawn(chain.rpc_url()).await.unwrap();
        SafeFixture {
            chain,
            safe,
            app,
            service_url,
            _service: service,
        }
    }

    fn api_kit(&self, phase: &str, plan: &Value) -> Value {
        let dir = TempDir::new();
        let output = node(
            "tests/clients/safe_api_kit.mjs",
            &[phase, &write_plan(dir.path(), "plan.json", plan)],
        );
        assert_ran(&output, &format!("api-kit {phase}"));
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

fn ok<'a>(result: &'a Value, what: &str) -> &'a Value {
    assert_eq!(result["ok"], true, "{what}: {result}");
    &result["value"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safe_api_kit_proposes_gets_confirms_and_lists_against_the_service_simulator() {
    let f = SafeFixture::start().await;
    let device = B256::repeat_byte(0x42);
    let call = Call::add_device(f.app, device);
    let keys: Vec<String> = (0..2)
        .map(|i| format!("0x{}", hex::encode(f.chain.private_key(i))))
        .collect();
    let mut plan = json!({
        "chain_id": f.chain.chain_id(),
        "tx_service_url": format!("{}api", f.service_url),
        "safe": f.safe.to_checksum(None),
        "safe_version": "1.4.1",
        "owner_keys": keys,
        "to": f.app.to_checksum(None),
        "data": call.data.to_string(),
    });

    let proposed = f.api_kit("propose", &plan);
    let about = ok(&proposed["about"], "getServiceInfo");
    assert_eq!(about["name"], "Safe Transaction Service");
    let info = ok(&proposed["safe_info"], "getSafeInfo");
    assert_eq!(info["address"], f.safe.to_checksum(None));
    assert_eq!(info["nonce"], "0");
    assert_eq!(info["threshold"], 2);
    assert_eq!(info["version"], "1.4.1");
    assert_eq!(info["owners"].as_array().unwrap().len(), 3);
    assert!(
        info["singleton"].is_string(),
        "api-kit maps masterCopy: {info}"
    );
    assert_eq!(ok(&proposed["next_nonce"], "getNextNonce"), "0");
    ok(&proposed["propose"], "proposeTransaction");
    let hash: B256 = proposed["safe_tx_hash"].as_str().unwrap().parse().unwrap();
    let tx = SafeTx::new(
        f.app,
        Default::default(),
        call.data.clone(),
        Operation::Call,
        0,
    );
    assert_eq!(hash, f.chain.safe_tx_hash(f.safe, &tx).await.unwrap());
    let first = ok(&proposed["after_propose"], "getTransaction");
    assert_eq!(first["confirmations"].as_array().unwrap().len(), 1);
    ok(&proposed["confirm"], "confirmTransaction");

    let stored = ok(&proposed["transaction"], "getTransaction");
    for field in [
        "safe",
        "to",
        "value",
        "data",
        "operation",
        "gasToken",
        "safeTxGas",
        "baseGas",
        "gasPrice",
        "refundReceiver",
        "nonce",
        "executionDate",
        "submissionDate",
        "modified",
        "blockNumber",
        "transactionHash",
        "safeTxHash",
        "proposer",
        "proposedByDelegate",
        "executor",
        "isExecuted",
        "isSuccessful",
        "ethGasPrice",
        "maxFeePerGas",
        "maxPriorityFeePerGas",
        "gasUsed",
        "fee",
        "payment",
        "origin",
        "dataDecoded",
        "confirmationsRequired",
        "confirmations",
        "trusted",
        "signatures",
    ] {
        assert!(stored.get(field).is_some(), "no {field} in {stored}");
    }
    assert_eq!(stored["safeTxHash"], hash.to_string());
    assert_eq!(stored["nonce"], "0");
    assert_eq!(stored["isExecuted"], false);
    assert_eq!(stored["signatures"], Value::Null);
    assert_eq!(stored["origin"], "approval-bridge conformance test");
    assert_eq!(stored["dataDecoded"]["method"], "addDevice");
    assert_eq!(
        stored["dataDecoded"]["parameters"][0]["value"],
        device.to_string()
    );
    assert_eq!(stored["confirmationsRequired"], 2);
    let confirmations = ok(&proposed["confirmations"], "getTransactionConfirmations");
    assert_eq!(confirmations["count"], 2);
    let pending = ok(&proposed["pending"], "getPendingTransactions");
    assert_eq!(pending["count"], 1);
    assert_eq!(pending["results"][0]["safeTxHash"], hash.to_string());
    assert_eq!(
        pending["results"][0]["confirmations"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Executed on chain with the two owners' signatures; api-kit reads it back.
    let signers = [f.chain.signer(0), f.chain.signer(1)];
    let receipt = f
        .chain
        .exec_safe_tx(f.safe, &tx, &signers, &f.chain.signer(5))
        .await
        .unwrap();
    plan["safe_tx_hash"] = hash.to_string().into();
    let executed = f.api_kit("executed", &plan);
    let done = ok(&executed["transaction"], "getTransaction");
    assert_eq!(done["isExecuted"], true);
    assert_eq!(done["isSuccessful"], true);
    assert_eq!(
        done["transactionHash"],
        receipt.transaction_hash.to_string()
    );
    assert_eq!(done["blockNumber"], receipt.block_number.unwrap());
    assert_eq!(done["executor"], f.chain.address(5).to_checksum(None));
    assert_eq!(done["gasUsed"], receipt.gas_used);
    assert_eq!(
        done["fee"],
        (u128::from(receipt.gas_used) * receipt.effective_gas_price).to_string()
    );
    assert_eq!(done["payment"], "0");
    assert!(done["executionDate"].is_string());
    assert_eq!(
        done["signatures"].as_str().unwrap().len(),
        2 + 2 * 65 * 2,
        "{done}"
    );
    assert_eq!(
        ok(&executed["pending"], "getPendingTransactions")["count"],
        0
    );
    let history = ok(&executed["history"], "getMultisigTransactions");
    assert_eq!(history["count"], 1);
    assert_eq!(history["results"][0]["safeTxHash"], hash.to_string());
    assert_eq!(ok(&executed["safe_info"], "getSafeInfo")["nonce"], "1");
}
