//! The chain follower when things go wrong, on the real local chain: an
//! ExecutionFailure, an execution that reverts (GS013), an RPC for another
//! chain, a Safe that reports another version, a log of an odd shape, and
//! Phala refusing the commit after the execution.
//!
//! A real Safe never emits ExecutionFailure for the bridge's proposals
//! (safeTxGas = 0), and never emits an odd log, so these tests put one of
//! our stand-ins (`contracts/ChainFaults.sol`) at the Safe's or the app's
//! address with `anvil_setCode` for a moment, and put the real code back.

use std::sync::atomic::Ordering;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::sol_types::{SolCall, SolEvent};
use approval_bridge::safe::ISafe;
use approval_bridge::sandbox::chain::ISafeMore;
use approval_bridge::sandbox::{project_artifact, project_root};
use serde_json::{Value, json};
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::TestApp;
use crate::phala_mock::*;
use crate::rpc_proxy::RpcProxy;
use crate::safe_world::{
    SafeWorld, commits, execute, hex40, mine, mount_commit_and_run, proposal_call, proposed,
};

alloy::sol! {
    /// The stand-in that emits a Safe's events (contracts/ChainFaults.sol).
    interface IEventEmitter {
        function executionFailure(bytes32 txHash, uint256 payment) external;
        function bareLog(bytes32 topic0) external;
    }
}

/// Safe 1.4.1 keeps `nonce` in storage slot 5 (after the singleton, modules,
/// owners, owner count and threshold).
const SAFE_NONCE_SLOT: u64 = 5;
/// Dev account that sends the stand-ins' transactions (not an owner, not the
/// executor of the other helpers).
const FAULT_SENDER: usize = 6;

/// The runtime code of `contract` in contracts/ChainFaults.sol: an `eth_call`
/// of its creation code returns it without deploying anything.
async fn runtime_code(world: &SafeWorld, contract: &str) -> Bytes {
    let root = project_root().unwrap();
    let artifact = project_artifact(&root, "ChainFaults", contract).unwrap();
    world
        .chain
        .provider()
        .call(TransactionRequest::default().with_deploy_code(artifact.bytecode))
        .await
        .unwrap()
}

async fn code_at(world: &SafeWorld, address: Address) -> Bytes {
    world.chain.provider().get_code_at(address).await.unwrap()
}

async fn set_code(world: &SafeWorld, address: Address, code: &Bytes) {
    let _: Value = world
        .chain
        .provider()
        .raw_request("anvil_setCode".into(), (address, code))
        .await
        .unwrap();
}

async fn safe_nonce(world: &SafeWorld) -> u64 {
    let nonce = ISafe::new(world.safe, world.chain.provider())
        .nonce()
        .call()
        .await
        .unwrap();
    nonce.try_into().unwrap()
}

/// Sends `data` to `to` from the fault sender; the transaction must succeed.
async fn send(world: &SafeWorld, to: Address, data: Vec<u8>) -> TransactionReceipt {
    let tx = TransactionRequest::default()
        .with_from(world.chain.address(FAULT_SENDER))
        .with_to(to)
        .with_input(data);
    let receipt = world
        .chain
        .provider()
        .send_transaction(tx)
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(receipt.status(), "{receipt:?}");
    receipt
}

/// Runs `data` with the EventEmitter's code at the Safe's address, so its
/// events come from the Safe, then puts the Safe's code back.
async fn emit_as_safe(world: &SafeWorld, data: Vec<u8>) -> TransactionReceipt {
    let safe_code = code_at(world, world.safe).await;
    set_code(
        world,
        world.safe,
        &runtime_code(world, "EventEmitter").await,
    )
    .await;
    let receipt = send(world, world.safe, data).await;
    set_code(world, world.safe, &safe_code).await;
    assert_eq!(code_at(world, world.safe).await, safe_code);
    receipt
}

/// The `execTransaction` call data of a request's proposal, signed by owners
/// 0 and 2 over the safeTxHash the bridge stored.
async fn exec_transaction_data(world: &SafeWorld, app: &TestApp, id: &str) -> Vec<u8> {
    let (call, hash) = proposal_call(app, id).await;
    let hash: B256 = hash.parse().unwrap();
    let mut owners = [world.chain.signer(0), world.chain.signer(2)];
    owners.sort_by_key(|signer| signer.address());
    let mut signatures = Vec::new();
    for owner in &owners {
        signatures
            .extend_from_slice(&approval_bridge::safe::sign_safe_tx_hash(owner, hash).unwrap());
    }
    ISafe::execTransactionCall {
        to: call.to,
        value: call.value,
        data: call.data,
        operation: call.operation as u8,
        safeTxGas: U256::ZERO,
        baseGas: U256::ZERO,
        gasPrice: U256::ZERO,
        gasToken: Address::ZERO,
        refundReceiver: Address::ZERO,
        signatures: signatures.into(),
    }
    .abi_encode()
}

async fn proposal_row(app: &TestApp, safe_tx_hash: &str) -> (String, Option<String>, Option<i64>) {
    sqlx::query_as(
        "SELECT status, last_error_code, execution_block FROM proposals WHERE safe_tx_hash = $1",
    )
    .bind(safe_tx_hash)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

/// What a proposal registers, as `(kind, value)` in a stable order.
async fn registrations_of(app: &TestApp, safe_tx_hash: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT c.kind, c.value FROM proposal_calls c JOIN proposals p ON p.id = c.proposal_id
         WHERE p.safe_tx_hash = $1 ORDER BY c.kind, c.value",
    )
    .bind(safe_tx_hash)
    .fetch_all(&app.db)
    .await
    .unwrap()
}

fn last_error(request: &Value) -> (String, String) {
    let error = &request["last_error"];
    (
        error["code"].as_str().unwrap_or_default().to_owned(),
        error["message"].as_str().unwrap_or_default().to_owned(),
    )
}

fn event_messages(request: &Value) -> Vec<String> {
    request["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_failure_fails_the_proposal_and_proposes_the_registrations_again() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1, 2]).await;
    let (_, first_hash) = proposal_call(&app, &ids[0]).await;

    // What a Safe does when the inner call fails with safeTxGas > 0: it emits
    // ExecutionFailure for the hash and the nonce is used.
    let receipt = emit_as_safe(
        &world,
        IEventEmitter::executionFailureCall {
            txHash: first_hash.parse().unwrap(),
            payment: U256::ZERO,
        }
        .abi_encode(),
    )
    .await;
    assert_eq!(receipt.logs().len(), 1);
    let _: Value = world
        .chain
        .provider()
        .raw_request(
            "anvil_setStorageAt".into(),
            (
                world.safe,
                U256::from(SAFE_NONCE_SLOT),
                B256::from(U256::from(1)),
            ),
        )
        .await
        .unwrap();
    assert_eq!(safe_nonce(&world).await, 1);

    // Seen, not yet confirmed: the proposal stays.
    app.drain_all(5).await;
    assert_eq!(proposal_row(&app, &first_hash).await.0, "proposed");
    assert_eq!(app.status_of(&ids[0]).await, "awaiting_approval");

    // Confirmed: the proposal failed and its requests wait for a new one.
    mine(&world, 3).await;
    app.worker.watch_once().await.unwrap();
    let (status, code, _) = proposal_row(&app, &first_hash).await;
    assert_eq!(status, "failed");
    assert_eq!(code.as_deref(), Some("SAFE-EXECUTION-FAILED"));
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "awaiting_proposal", "{request}");
        assert_eq!(last_error(&request).0, "SAFE-EXECUTION-FAILED");
    }

    // A fresh proposal at the next nonce, for the same registrations: the
    // compose hash and both devices.
    assert_eq!(registrations_of(&app, &first_hash).await.len(), 3);
    app.drain_all(10).await;
    let mut fresh = Vec::new();
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "awaiting_approval", "{request}");
        let proposal = &request["proposal"];
        assert_ne!(proposal["safe_tx_hash"], first_hash.as_str());
        assert_eq!(proposal["nonce"], 1);
        assert_eq!(proposal["status"], "proposed");
        let hash = proposal["safe_tx_hash"].as_str().unwrap().to_owned();
        assert_eq!(
            registrations_of(&app, &hash).await,
            registrations_of(&app, &first_hash).await
        );
        fresh.push(hash);
        let statuses: Vec<&str> = request["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["to"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses[3..],
            [
                "awaiting_approval",
                "awaiting_proposal",
                "awaiting_approval"
            ]
        );
        assert!(
            event_messages(&request)
                .iter()
                .any(|m| m.contains("ExecutionFailure") && m.contains("nonce is used")),
            "{request}"
        );
    }
    assert_eq!(fresh[0], fresh[1], "one fresh proposal for both");
    assert_eq!(world.service.proposal_posts(fresh[0].parse().unwrap()), 1);
    assert!(commits(&app).await.is_empty(), "nothing is committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_that_reverts_with_gs013_keeps_the_request_waiting_until_it_executes() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (call, hash) = proposal_call(&app, &ids[0]).await;

    // The app refuses writes for a while: the batch's inner calls revert.
    let app_code = code_at(&world, world.app).await;
    set_code(
        &world,
        world.app,
        &runtime_code(&world, "DstackAppRefusingWrites").await,
    )
    .await;
    let data = exec_transaction_data(&world, &app, &ids[0]).await;
    let exec = TransactionRequest::default()
        .with_from(world.chain.address(3))
        .with_to(world.safe)
        .with_input(data);
    let revert = world
        .chain
        .provider()
        .call(exec.clone())
        .await
        .expect_err("execTransaction reverts");
    let reason = revert
        .as_error_resp()
        .and_then(|e| e.as_revert_data())
        .map(|data| approval_bridge::chain::decode_revert(&data));
    assert_eq!(reason.as_deref(), Some("GS013"), "{revert}");
    // Someone sends it anyway (with a gas limit, so it is mined): it reverts.
    let receipt = world
        .chain
        .provider()
        .send_transaction(exec.with_gas_limit(2_000_000))
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(!receipt.status());
    assert!(receipt.logs().is_empty());
    assert_eq!(safe_nonce(&world).await, 0, "the nonce is not used");

    mine(&world, 3).await;
    app.drain_all(10).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["proposal"]["safe_tx_hash"], hash.as_str());
    assert_eq!(
        proposal_row(&app, &hash).await,
        ("proposed".into(), None, None)
    );
    assert!(commits(&app).await.is_empty());

    // Writable again: the same proposal executes and is committed once.
    set_code(&world, world.app, &app_code).await;
    let execution = execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "done", "{request}");
    assert_eq!(request["proposal"]["status"], "executed");
    let sent = commits(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["transaction_hash"], execution.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_that_answers_for_another_chain_is_not_believed() {
    let world = SafeWorld::start().await;
    let RpcProxy {
        url: rpc,
        wrong_chain,
        outage,
        ..
    } = RpcProxy::start(world.chain.rpc_url(), None).await;
    let app = world.spawn_bridge_with_rpc(rpc).await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (call, hash) = proposal_call(&app, &ids[0]).await;

    // The provider goes down and comes back answering for Base (8453): the
    // chain id is read again after a failure, as after any new connection.
    outage.store(true, Ordering::SeqCst);
    wrong_chain.store(8453, Ordering::SeqCst);
    mine(&world, 1).await;
    app.worker.watch_once().await.unwrap();
    outage.store(false, Ordering::SeqCst);
    app.drain_all(5).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "awaiting_approval");
    let (code, message) = last_error(&request);
    assert_eq!(code, "CHAIN-FOLLOWER", "{request}");
    assert!(
        message.contains("chain 31337") && message.contains("answers for chain 8453"),
        "{message}"
    );

    // The owners execute on the real chain; the bridge must not believe an
    // RPC of the wrong chain, even though its logs show the execution.
    execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(last_error(&request).0, "CHAIN-FOLLOWER");
    assert_eq!(
        proposal_row(&app, &hash).await,
        ("proposed".into(), None, None)
    );
    assert!(commits(&app).await.is_empty());

    // The RPC is right again: the execution is found and committed once.
    wrong_chain.store(0, Ordering::SeqCst);
    app.drain_all(10).await;
    assert_eq!(app.status_of(&ids[0]).await, "done");
    assert_eq!(commits(&app).await.len(), 1);
}

/// Puts the stand-in proxy whose VERSION() says 1.3.0 at the Safe's address;
/// returns the Safe's own code.
async fn report_another_version(world: &SafeWorld) -> Bytes {
    let safe_code = code_at(world, world.safe).await;
    set_code(
        world,
        world.safe,
        &runtime_code(world, "SafeProxyWithOtherVersion").await,
    )
    .await;
    let safe = ISafe::new(world.safe, world.chain.provider());
    assert_eq!(safe.VERSION().call().await.unwrap(), "1.3.0");
    assert_eq!(safe_nonce(world).await, 0, "the Safe still works");
    safe_code
}

fn assert_version_changed(request: &Value) {
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    let (code, message) = last_error(request);
    assert_eq!(code, "SAFE-VERSION-CHANGED", "{request}");
    assert!(
        message.contains("`1.3.0`") && message.contains("`1.4.1`"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_that_reports_another_version_is_not_committed_on() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (call, hash) = proposal_call(&app, &ids[0]).await;
    let safe_code = report_another_version(&world).await;
    // Code changes land in a block; the follower reads the chain again at a new one.
    mine(&world, 1).await;

    app.drain_all(5).await;
    assert_version_changed(&app.get_replica(&ids[0]).await);

    // Executed through the changed Safe and confirmed: still no commit. The
    // follower sees the execution before it is confirmed, as in the happy
    // path; the next test looks only once it is.
    let execution = execute(&world, call).await;
    app.drain_all(5).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_version_changed(&app.get_replica(&ids[0]).await);
    assert_eq!(proposal_row(&app, &hash).await.0, "proposed");
    assert!(commits(&app).await.is_empty());

    // The Safe reports 1.4.1 again: the execution it saw counts.
    set_code(&world, world.safe, &safe_code).await;
    mine(&world, 1).await;
    app.drain_all(10).await;
    assert_eq!(app.status_of(&ids[0]).await, "done");
    let sent = commits(&app).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["transaction_hash"], execution.as_str());
}

/// The same when the follower first looks after the execution is already
/// confirmed (a poll interval longer than the confirmations take). Fails
/// today: the app's registration logs in the scanned range make
/// `release_allowed_meanwhile` (src/worker/watch.rs) move the requests on
/// after `decide` held them back for the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_that_reports_another_version_is_not_committed_on_when_first_seen_confirmed() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (call, hash) = proposal_call(&app, &ids[0]).await;
    report_another_version(&world).await;

    execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    assert_version_changed(&app.get_replica(&ids[0]).await);
    assert_eq!(proposal_row(&app, &hash).await.0, "proposed");
    assert!(commits(&app).await.is_empty());
}

/// Emits an ExecutionSuccess from the Safe with no txHash topic and no data.
async fn emit_execution_without_tx_hash(world: &SafeWorld) {
    let receipt = emit_as_safe(
        world,
        IEventEmitter::bareLogCall {
            topic0: ISafeMore::ExecutionSuccess::SIGNATURE_HASH,
        }
        .abi_encode(),
    )
    .await;
    let log = &receipt.logs()[0];
    assert_eq!(log.address(), world.safe);
    assert_eq!(log.topics().len(), 1);
    assert!(log.data().data.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execution_log_without_a_tx_hash_is_reported_and_never_committed() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1, 2]).await;
    emit_execution_without_tx_hash(&world).await;
    mine(&world, 3).await;

    app.drain_all(10).await;
    for id in &ids {
        let request = app.get_replica(id).await;
        assert_eq!(request["status"], "awaiting_approval", "{request}");
        let (code, message) = last_error(&request);
        assert_eq!(code, "CHAIN-FOLLOWER", "{request}");
        assert!(
            message.contains("neither a txHash topic nor data"),
            "{message}"
        );
    }
    assert!(commits(&app).await.is_empty());
}

/// The odd log is behind the follower once it has reported it: a later
/// execution of the proposal is committed. Fails today: `record_executions`
/// (src/worker/watch.rs) bails before the cursor moves, so every pass scans
/// the same range again and stops at the same log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_follower_gets_past_an_execution_log_without_a_tx_hash() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (call, _) = proposal_call(&app, &ids[0]).await;
    emit_execution_without_tx_hash(&world).await;
    app.drain_all(5).await;
    assert_eq!(
        last_error(&app.get_replica(&ids[0]).await).0,
        "CHAIN-FOLLOWER"
    );

    execute(&world, call).await;
    mine(&world, 3).await;
    app.drain_all(10).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "done", "{request}");
    assert_eq!(commits(&app).await.len(), 1);
}

/// Phala's commit answers `status` with `code` once, then succeeds.
async fn mount_commit_refused_once(app: &TestApp, status: u16, code: &str) {
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/commit-replica"))))
        .respond_with(ResponseTemplate::new(status).set_body_json(phala_error(
            code,
            "refused by the test",
            true,
        )))
        .up_to_n_times(1)
        .mount(&app.phala)
        .await;
    mount_commit_and_run(app).await;
}

/// Executes a request's proposal and confirms it.
async fn execute_and_confirm(world: &SafeWorld, app: &TestApp, id: &str) -> String {
    let (call, _) = proposal_call(app, id).await;
    let execution = execute(world, call).await;
    app.drain_all(5).await;
    mine(world, 3).await;
    execution
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_phala_cannot_verify_after_execution_is_retried_with_already_registered() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_refused_once(&app, 467, "ERR-01-007").await;
    let ids = proposed(&world, &app, &[1]).await;
    let execution = execute_and_confirm(&world, &app, &ids[0]).await;

    app.drain_all(10).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "done", "{request}");
    let statuses: Vec<&str> = request["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[4..], ["committing", "provisioning", "done"]);
    let sent = commits(&app).await;
    assert_eq!(
        sent,
        [
            json!({"token": "token-1", "compose_hash": compose_hash(), "transaction_hash": execution}),
            json!({"token": "token-1", "compose_hash": compose_hash(), "transaction_hash": "already-registered"}),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_refused_after_execution_is_prepared_again_and_committed_with_the_new_one() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_refused_once(&app, 466, "ERR-01-006").await;
    let ids = proposed(&world, &app, &[1]).await;
    // Any later prepare gets a new token, and Phala sees everything allowed.
    Mock::given(method("POST"))
        .and(path(api(&format!("/cvms/{ONCHAIN_VM}/replicas"))))
        .and(header("X-Prepare-Only", "true"))
        .respond_with(ResponseTemplate::new(465).set_body_json(prepared_body_for(
            &hex40(world.app),
            31337,
            "token-fresh",
            1,
            true,
            true,
            true,
        )))
        .with_priority(1)
        .mount(&app.phala)
        .await;
    let execution = execute_and_confirm(&world, &app, &ids[0]).await;

    app.drain_all(10).await;
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "done", "{request}");
    let statuses: Vec<&str> = request["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["to"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses[4..],
        [
            "committing",
            "preparing",
            // The fresh prepare's "allowed" is checked on chain first.
            "awaiting_proposal",
            "committing",
            "provisioning",
            "done"
        ]
    );
    let prepares = app
        .phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
        .await;
    assert_eq!(prepares.len(), 2);
    let sent: Vec<(Value, Value)> = commits(&app)
        .await
        .into_iter()
        .map(|c| (c["token"].clone(), c["transaction_hash"].clone()))
        .collect();
    assert_eq!(
        sent,
        [
            (json!("token-1"), json!(execution)),
            (json!("token-fresh"), json!("already-registered")),
        ]
    );
}

/// A Safe that reports another version holds its proposals' commits back,
/// not their expiry: with a new block at every pass (a live chain), the
/// overdue proposal still ends on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_that_reports_another_version_still_lets_its_proposals_expire() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_commit_and_run(&app).await;
    let ids = proposed(&world, &app, &[1]).await;
    let (_, hash) = proposal_call(&app, &ids[0]).await;
    report_another_version(&world).await;
    mine(&world, 1).await;
    app.drain_all(5).await;
    assert_version_changed(&app.get_replica(&ids[0]).await);

    app.clock
        .advance(chrono::Duration::days(7) + chrono::Duration::seconds(1));
    mine(&world, 1).await;
    app.worker.watch_once().await.unwrap();
    let request = app.get_replica(&ids[0]).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(last_error(&request).0, "PROPOSAL-EXPIRED", "{request}");
    assert_eq!(proposal_row(&app, &hash).await.0, "failed");
    assert!(commits(&app).await.is_empty());
}
