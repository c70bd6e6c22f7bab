//! The Safe flow when things go wrong, on the real local chain with the fake
//! Transaction Service: apps the bridge cannot propose for, a simulation that
//! reverts, nonces taken by other proposals, a proposal stored but not
//! posted, a rejection by the service, the batch window, and the start-up
//! check of the proposer and the Safes.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use alloy::dyn_abi::DynSolValue;
use alloy::primitives::{Address, B256, Bytes, U256, address};
use alloy::sol_types::SolCall;
use approval_bridge::chain::IDstackApp;
use approval_bridge::config::{AllowedSafes, Settings};
use approval_bridge::safe::service::BoxFuture;
use approval_bridge::safe::{
    Call, DelegateRegistration, Delegation, Deletion, ISafe, Operation, Proposal, SafeService,
    SafeServiceError, SafeTx, SafeVersion, ServiceTx, TxServiceClient, TxServiceOptions,
};
use approval_bridge::sandbox::chain::{ISafeMore, MULTICALL3};
use approval_bridge::startup::Application;
use serde_json::{Value, json};

use crate::helpers::{TestApp, fresh_database, spawn_app_with, test_settings};
use crate::phala_mock::*;
use crate::safe_world::{SafeWorld, b256, mount_source_on, post_foreign_proposal};

const CHAIN: u64 = 31337;
/// The head of a Safe's owner list, the `prevOwner` of its first owner.
const SENTINEL_OWNERS: Address = address!("0000000000000000000000000000000000000001");
/// What `contracts/FrozenDstackApp.sol` reverts with.
const FROZEN: &str = "FrozenDstackApp: the allowlist is frozen";

/// The private key of dev account `index`, as the proposer setting takes it.
fn key_of(world: &SafeWorld, index: usize) -> String {
    format!("0x{}", hex::encode(world.chain.private_key(index)))
}

/// The bridge settings of `SafeWorld::spawn_bridge`, then `adjust`.
fn bridge_settings(
    world: &SafeWorld,
    adjust: impl FnOnce(&mut Settings),
) -> impl FnOnce(&mut Settings) {
    let configure = world.configure(world.chain.rpc_url());
    move |s| {
        configure(s);
        adjust(s);
    }
}

fn proposer_key(key: &str) -> impl FnOnce(&mut Settings) {
    let key = key.to_owned();
    move |s| s.safe.proposer_key = Some(key.into())
}

/// A client of the fake service, as the bridge makes one.
fn service_client(world: &SafeWorld) -> TxServiceClient {
    let mut options = TxServiceOptions::for_chain(CHAIN);
    options.base_url = Some(world.service_url.clone());
    options.requests_per_second = 1000.0;
    TxServiceClient::new(&options).unwrap()
}

async fn queue_node(app: &TestApp, node: u32) -> String {
    app.queue(&json!({"source": ONCHAIN_NAME, "node": node}))
        .await
        .remove(0)
}

/// Asserts the request failed with `code`; returns its message and suggestion.
async fn failure_of(app: &TestApp, id: &str, code: &str) -> (String, String) {
    let request = app.get_replica(id).await;
    assert_eq!(request["status"], "failed", "{request}");
    let error = &request["last_error"];
    assert_eq!(error["code"], code, "{request}");
    (
        error["message"].as_str().unwrap_or_default().to_owned(),
        error["suggestion"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn proposal_rows(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM proposals")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

/// The proposal shown with a request: its safeTxHash and nonce.
async fn proposal_of(app: &TestApp, id: &str) -> (B256, u64) {
    let request = app.get_replica(id).await;
    let proposal = &request["proposal"];
    let hash = proposal["safe_tx_hash"]
        .as_str()
        .unwrap_or_else(|| panic!("no proposal: {request}"))
        .parse()
        .unwrap();
    (hash, proposal["nonce"].as_u64().unwrap())
}

/// The stored transaction of a proposal, as the owners would execute it.
async fn stored_tx(app: &TestApp, hash: B256) -> SafeTx {
    let (to, value, data, operation, nonce): (String, String, String, i16, i64) = sqlx::query_as(
        "SELECT to_address, value, data, operation, nonce FROM proposals WHERE safe_tx_hash = $1",
    )
    .bind(hash.to_string())
    .fetch_one(&app.db)
    .await
    .unwrap();
    SafeTx::new(
        to.parse().unwrap(),
        value.parse().unwrap(),
        data.parse::<Bytes>().unwrap(),
        Operation::try_from(operation as u8).unwrap(),
        nonce as u64,
    )
}

/// A fresh bridge on `world` whose source runs on `dstack_app`; one request
/// to node 1, worked until nothing moves.
async fn one_request_on(world: &SafeWorld, dstack_app: Address) -> (TestApp, String) {
    let app = world.spawn_bridge().await;
    mount_source_on(&app, dstack_app, false).await;
    let id = queue_node(&app, 1).await;
    app.drain_all(10).await;
    (app, id)
}

/// A two-step DstackApp owned by account 4.
async fn two_step_app(world: &SafeWorld) -> Address {
    world
        .chain
        .deploy_dstack_app(world.chain.address(4), true)
        .await
        .unwrap()
}

/// Owners 1 and 2 sign `tx`, account 3 executes it.
async fn owners_execute(world: &SafeWorld, tx: &SafeTx) {
    world
        .chain
        .exec_safe_tx(
            world.safe,
            tx,
            &[world.chain.signer(1), world.chain.signer(2)],
            &world.chain.signer(3),
        )
        .await
        .unwrap();
}

/// Asserts that nothing reached the Transaction Service and nothing was stored.
async fn assert_nothing_proposed(world: &SafeWorld, app: &TestApp) {
    assert_eq!(proposal_rows(app).await, 0);
    assert_eq!(world.service.proposal_posts_total(), 0);
}

// ---------------------------------------------------------------------------
// Owners the bridge cannot propose for

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_owned_by_an_account_fails_with_owner_is_eoa_and_points_to_the_phala_cli() {
    let world = SafeWorld::start().await;
    let owner = world.chain.address(4);
    let dstack_app = world.chain.deploy_dstack_app(owner, false).await.unwrap();

    let (app, id) = one_request_on(&world, dstack_app).await;

    let (message, suggestion) = failure_of(&app, &id, "OWNER-IS-EOA").await;
    assert!(
        message.contains(&dstack_app.to_checksum(None))
            && message.contains(&owner.to_checksum(None)),
        "{message}"
    );
    assert!(message.contains("not a Safe"), "{message}");
    assert!(
        suggestion.contains("Phala CLI") && suggestion.contains("phala cvms replicate"),
        "{suggestion}"
    );
    assert_nothing_proposed(&world, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_owned_by_a_contract_that_is_not_a_safe_fails_with_owner_not_safe() {
    let world = SafeWorld::start().await;
    // Another DstackApp, and Multicall3: contracts without a Safe's VERSION().
    let owning_app = world
        .chain
        .deploy_dstack_app(world.chain.address(4), false)
        .await
        .unwrap();
    for owner in [owning_app, MULTICALL3] {
        let dstack_app = world.chain.deploy_dstack_app(owner, false).await.unwrap();

        let (app, id) = one_request_on(&world, dstack_app).await;

        let (message, suggestion) = failure_of(&app, &id, "OWNER-NOT-SAFE").await;
        assert!(
            message.contains(&format!("the contract {}", owner.to_checksum(None))),
            "{message}"
        );
        assert!(message.contains("not a Safe"), "{message}");
        assert!(
            suggestion.contains("Transfer the app's ownership to a Safe"),
            "{suggestion}"
        );
        assert_nothing_proposed(&world, &app).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_only_staged_as_pending_owner_fails_with_ownership_pending() {
    let world = SafeWorld::start().await;
    let dstack_app = two_step_app(&world).await;
    // Staged, not accepted: owner() is still account 4.
    world
        .chain
        .transfer_ownership(dstack_app, &world.chain.signer(4), world.safe)
        .await
        .unwrap();

    let (app, id) = one_request_on(&world, dstack_app).await;

    let (message, suggestion) = failure_of(&app, &id, "OWNERSHIP-PENDING").await;
    let safe = world.safe.to_checksum(None);
    assert!(
        message.contains(&format!("{safe} is staged as the pendingOwner")),
        "{message}"
    );
    assert!(
        suggestion.contains(&format!("The Safe {safe} must call acceptOwnership()")),
        "{suggestion}"
    );
    assert_nothing_proposed(&world, &app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_step_app_whose_safe_accepted_ownership_is_proposed() {
    let world = SafeWorld::start().await;
    let dstack_app = two_step_app(&world).await;
    // transferOwnership, then acceptOwnership() as Safe transaction nonce 0.
    world
        .chain
        .transfer_app_to_safe(
            dstack_app,
            &world.chain.signer(4),
            world.safe,
            &[world.chain.signer(0), world.chain.signer(1)],
            &world.chain.signer(3),
        )
        .await
        .unwrap();

    let (app, id) = one_request_on(&world, dstack_app).await;

    assert_eq!(app.status_of(&id).await, "awaiting_approval");
    let (hash, nonce) = proposal_of(&app, &id).await;
    assert_eq!(nonce, 1);
    assert_eq!(world.service.proposal_posts(hash), 1);

    // What was proposed is executable by the owners and registers the replica.
    let tx = stored_tx(&app, hash).await;
    owners_execute(&world, &tx).await;
    assert!(
        world
            .allowed(
                dstack_app,
                Some(b256(&compose_hash())),
                Some(b256(&device_id(1)))
            )
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_owned_by_a_safe_outside_the_allowed_list_fails_with_safe_not_allowed() {
    let world = SafeWorld::start().await;
    let owners = [
        world.chain.address(0),
        world.chain.address(1),
        world.chain.address(2),
    ];
    let other_safe = world.chain.create_safe(&owners, 2, 2).await.unwrap();
    let dstack_app = world
        .chain
        .deploy_dstack_app(other_safe, false)
        .await
        .unwrap();

    let (app, id) = one_request_on(&world, dstack_app).await;

    let (message, suggestion) = failure_of(&app, &id, "SAFE-NOT-ALLOWED").await;
    assert!(
        message.contains(&format!("owned by Safe {}", other_safe.to_checksum(None))),
        "{message}"
    );
    assert!(suggestion.contains("APPROVAL_BRIDGE_SAFES"), "{suggestion}");
    assert_nothing_proposed(&world, &app).await;
}

// ---------------------------------------------------------------------------
// Simulation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverting_simulation_proposes_nothing_and_fails_the_requests_with_the_reason() {
    let world = SafeWorld::start().await;
    let frozen = world
        .chain
        .deploy_contract(
            "FrozenDstackApp",
            "FrozenDstackApp",
            &[DynSolValue::Address(world.safe)],
        )
        .await
        .unwrap();
    let app = world.spawn_bridge().await;
    mount_source_on(&app, frozen, false).await;
    let ids = [queue_node(&app, 1).await, queue_node(&app, 2).await];

    app.drain_all(10).await;

    for id in &ids {
        let (message, suggestion) = failure_of(&app, id, "SIMULATION-REVERTED").await;
        assert!(message.contains(FROZEN), "{message}");
        assert!(
            message.contains(&format!(
                "when Safe {} calls it",
                world.safe.to_checksum(None)
            )),
            "{message}"
        );
        assert!(
            suggestion.starts_with("Nothing was proposed"),
            "{suggestion}"
        );
        assert_eq!(app.get_replica(id).await["proposal"], Value::Null);
    }
    assert_nothing_proposed(&world, &app).await;
}

// ---------------------------------------------------------------------------
// Nonces

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_proposal_pending_in_the_service_pushes_the_bridge_to_the_next_nonce() {
    let world = SafeWorld::start().await;
    // An owner queued something harmless (a call of a view) at nonce 0.
    let harmless = SafeTx::new(
        world.app,
        U256::ZERO,
        IDstackApp::ownerCall {}.abi_encode().into(),
        Operation::Call,
        0,
    );
    post_foreign_proposal(&world, &harmless).await;
    let client = service_client(&world);
    assert_eq!(client.list_pending(world.safe, 0).await.unwrap(), Some(0));

    let app = world.spawn_bridge().await;
    mount_source_on(&app, world.app, false).await;
    let id = queue_node(&app, 1).await;
    app.drain_all(10).await;

    assert_eq!(app.status_of(&id).await, "awaiting_approval");
    let (hash, nonce) = proposal_of(&app, &id).await;
    assert_eq!(
        nonce, 1,
        "the on-chain nonce is 0, but 0 is taken in the service"
    );
    assert_ne!(hash, harmless.hash(world.safe, CHAIN, SafeVersion::V1_4_1));
    assert_eq!(world.service.proposal_posts(hash), 1);
    assert_eq!(client.list_pending(world.safe, 0).await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_batch_behind_our_open_proposal_takes_the_next_nonce() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_source_on(&app, world.app, false).await;
    let first = queue_node(&app, 1).await;
    app.drain_all(10).await;
    let (first_hash, first_nonce) = proposal_of(&app, &first).await;
    assert_eq!(first_nonce, 0);

    // Queued after the first was proposed, for another node's device.
    let second = queue_node(&app, 2).await;
    app.drain_all(10).await;

    assert_eq!(app.status_of(&second).await, "awaiting_approval");
    let (second_hash, second_nonce) = proposal_of(&app, &second).await;
    assert_ne!(second_hash, first_hash);
    assert_eq!(second_nonce, 1);
    assert_eq!(world.service.proposal_posts(second_hash), 1);
    // The compose hash is in the open proposal already: only the device is new.
    let calls: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.kind, c.value FROM proposal_calls c JOIN proposals p ON p.id = c.proposal_id
         WHERE p.safe_tx_hash = $1 ORDER BY c.position",
    )
    .bind(second_hash.to_string())
    .fetch_all(&app.db)
    .await
    .unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0, "device");
    assert!(calls[0].1.ends_with(&device_id(2)), "{calls:?}");
    assert_eq!(proposal_of(&app, &first).await, (first_hash, 0));
}

// ---------------------------------------------------------------------------
// A proposal stored, then not posted

/// The Transaction Service, except that the first proposal fails as if the
/// service were down. Records every proposal the bridge tried to post.
struct FirstProposeUnavailable {
    inner: TxServiceClient,
    tried: Mutex<Vec<(B256, u64)>>,
}

impl FirstProposeUnavailable {
    fn new(world: &SafeWorld) -> Arc<Self> {
        Arc::new(FirstProposeUnavailable {
            inner: service_client(world),
            tried: Mutex::new(Vec::new()),
        })
    }

    fn tried(&self) -> Vec<(B256, u64)> {
        self.tried.lock().unwrap().clone()
    }
}

impl SafeService for FirstProposeUnavailable {
    fn propose<'a>(
        &'a self,
        safe: Address,
        proposal: &'a Proposal,
    ) -> BoxFuture<'a, Result<(), SafeServiceError>> {
        let first = {
            let mut tried = self.tried.lock().unwrap();
            tried.push((proposal.safe_tx_hash, proposal.tx.nonce));
            tried.len() == 1
        };
        if first {
            return Box::pin(async {
                Err(SafeServiceError::Unavailable {
                    status: 503,
                    body: r#"{"exception":"Problem connecting to Ethereum network"}"#.into(),
                })
            });
        }
        SafeService::propose(&self.inner, safe, proposal)
    }

    fn get_transaction(
        &self,
        safe_tx_hash: B256,
    ) -> BoxFuture<'_, Result<Option<ServiceTx>, SafeServiceError>> {
        SafeService::get_transaction(&self.inner, safe_tx_hash)
    }

    fn list_pending(
        &self,
        safe: Address,
        nonce_gte: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, SafeServiceError>> {
        SafeService::list_pending(&self.inner, safe, nonce_gte)
    }

    fn list_transactions(
        &self,
        safe: Address,
        nonces: std::ops::RangeInclusive<u64>,
    ) -> BoxFuture<'_, Result<Vec<ServiceTx>, SafeServiceError>> {
        SafeService::list_transactions(&self.inner, safe, nonces)
    }

    fn register_delegate<'a>(
        &'a self,
        registration: &'a DelegateRegistration,
    ) -> BoxFuture<'a, Result<(), SafeServiceError>> {
        SafeService::register_delegate(&self.inner, registration)
    }

    fn delegates(
        &self,
        delegate: Address,
    ) -> BoxFuture<'_, Result<Vec<Delegation>, SafeServiceError>> {
        SafeService::delegates(&self.inner, delegate)
    }

    fn delete_transaction<'a>(
        &'a self,
        deletion: &'a Deletion,
    ) -> BoxFuture<'a, Result<bool, SafeServiceError>> {
        SafeService::delete_transaction(&self.inner, deletion)
    }
}

/// A bridge whose first proposal fails to post, after one pass over a
/// request for node 1: the proposal is stored and not submitted.
async fn stored_not_posted(world: &SafeWorld) -> (TestApp, Arc<FirstProposeUnavailable>, String) {
    let app = world.spawn_bridge().await;
    let double = FirstProposeUnavailable::new(world);
    app.worker
        .safe_flow()
        .unwrap()
        .set_service(CHAIN, double.clone());
    mount_source_on(&app, world.app, false).await;
    let id = queue_node(&app, 1).await;
    app.drain().await;

    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_proposal", "{request}");
    assert_eq!(request["proposal"]["submitted"], false, "{request}");
    let (hash, _) = proposal_of(&app, &id).await;
    let submitted: Vec<Option<chrono::DateTime<chrono::Utc>>> =
        sqlx::query_scalar("SELECT submitted_at FROM proposals")
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(submitted, vec![None]);
    assert_eq!(double.tried(), vec![(hash, 0)]);
    assert_eq!(world.service.proposal_posts(hash), 0);
    (app, double, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_that_failed_to_post_is_posted_again_with_the_same_hash_and_nonce() {
    let world = SafeWorld::start().await;
    let (app, double, id) = stored_not_posted(&world).await;
    let (hash, nonce) = proposal_of(&app, &id).await;

    // Not before the retry is due.
    app.drain().await;
    assert_eq!(double.tried().len(), 1);
    app.clock.advance(chrono::Duration::seconds(11));
    app.drain().await;

    assert_eq!(double.tried(), vec![(hash, nonce), (hash, nonce)]);
    assert_eq!(world.service.proposal_posts(hash), 1);
    assert_eq!(world.service.stored_transactions(), 1);
    assert_eq!(proposal_rows(&app).await, 1);
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    assert_eq!(request["proposal"]["submitted"], true);
    assert_eq!(proposal_of(&app, &id).await, (hash, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_batch_while_our_first_is_not_posted_yet_still_takes_the_next_nonce() {
    let world = SafeWorld::start().await;
    let (app, double, first) = stored_not_posted(&world).await;
    let (first_hash, _) = proposal_of(&app, &first).await;

    // The service knows no proposal yet; our stored one holds nonce 0.
    let second = queue_node(&app, 2).await;
    app.drain().await;

    assert_eq!(app.status_of(&second).await, "awaiting_approval");
    let (second_hash, second_nonce) = proposal_of(&app, &second).await;
    assert_eq!(second_nonce, 1);
    assert_eq!(world.service.proposal_posts(second_hash), 1);

    // The first goes out later, still at nonce 0.
    app.clock.advance(chrono::Duration::seconds(11));
    app.drain().await;
    assert_eq!(app.status_of(&first).await, "awaiting_approval");
    assert_eq!(proposal_of(&app, &first).await, (first_hash, 0));
    assert_eq!(
        double.tried(),
        vec![(first_hash, 0), (second_hash, 1), (first_hash, 0)]
    );
    assert_eq!(proposal_rows(&app).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_reposts_the_stored_proposal_and_never_takes_a_new_nonce() {
    let world = SafeWorld::start().await;
    let (before, _, id) = stored_not_posted(&world).await;
    let (hash, nonce) = proposal_of(&before, &id).await;

    // Another process on the same database, with the real service client;
    // the first one stays idle (it runs no workers).
    let after = world
        .spawn_bridge_on(&before.database_url, &before.phala)
        .await;
    after.clock.advance(chrono::Duration::seconds(11));
    after.drain().await;

    assert_eq!(world.service.proposal_posts(hash), 1);
    assert_eq!(world.service.stored_transactions(), 1);
    assert_eq!(proposal_rows(&after).await, 1);
    assert_eq!(after.status_of(&id).await, "awaiting_approval");
    assert_eq!(proposal_of(&after, &id).await, (hash, nonce));
    assert_eq!(nonce, 0);
}

// ---------------------------------------------------------------------------
// Rejection by the service

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_by_the_service_fails_the_requests_with_its_body_verbatim() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    mount_source_on(&app, world.app, false).await;

    // After the bridge started, the owners replace its proposer (account 0)
    // with account 5: the service then refuses the proposer as sender.
    let owners = ISafe::new(world.safe, world.chain.provider())
        .getOwners()
        .call()
        .await
        .unwrap();
    let proposer = world.chain.address(0);
    let at = owners.iter().position(|o| *o == proposer).unwrap();
    let swap = Call {
        to: world.safe,
        value: U256::ZERO,
        data: ISafeMore::swapOwnerCall {
            prevOwner: if at == 0 {
                SENTINEL_OWNERS
            } else {
                owners[at - 1]
            },
            oldOwner: proposer,
            newOwner: world.chain.address(5),
        }
        .abi_encode()
        .into(),
    };
    let tx = world.chain.next_safe_tx(world.safe, &[swap]).await.unwrap();
    owners_execute(&world, &tx).await;

    let ids = [queue_node(&app, 1).await, queue_node(&app, 2).await];
    app.drain_all(10).await;

    let (hash, nonce) = proposal_of(&app, &ids[0]).await;
    assert_eq!(nonce, 1);
    assert_eq!(world.service.proposal_posts(hash), 1);
    assert_eq!(world.service.stored_transactions(), 0);
    let mut messages = Vec::new();
    for id in &ids {
        let (message, _) = failure_of(&app, id, "SAFE-REJECTED").await;
        let request = app.get_replica(id).await;
        assert_eq!(request["proposal"]["status"], "failed", "{request}");
        assert_eq!(proposal_of(&app, id).await, (hash, nonce));
        messages.push(message);
    }
    let status: String = sqlx::query_scalar("SELECT status FROM proposals WHERE safe_tx_hash = $1")
        .bind(hash.to_string())
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(status, "failed");

    // The message is the service's body, byte for byte: the same proposal
    // posted again gets exactly that answer.
    let proposal = Proposal::sign(
        stored_tx(&app, hash).await,
        world.safe,
        CHAIN,
        SafeVersion::V1_4_1,
        &world.chain.signer(0),
        None,
    )
    .unwrap();
    let url = world
        .service_url
        .join(&format!(
            "api/v2/safes/{}/multisig-transactions/",
            world.safe.to_checksum(None)
        ))
        .unwrap();
    let response = reqwest::Client::new()
        .post(url)
        .json(&proposal.body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body = response.text().await.unwrap();
    assert_eq!(messages, vec![body.clone(), body.clone()]);
    assert!(
        body.starts_with(&format!(
            r#"{{"nonFieldErrors":["Sender={} is not an owner or delegate."#,
            proposer.to_checksum(None)
        )),
        "{body}"
    );
}

// ---------------------------------------------------------------------------
// Batch window

async fn still_waiting(world: &SafeWorld, app: &TestApp, ids: &[&str]) {
    for id in ids {
        assert_eq!(app.status_of(id).await, "awaiting_proposal");
    }
    assert_nothing_proposed(world, app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_within_the_batch_window_share_one_proposal_once_it_closes() {
    let world = SafeWorld::start().await;
    let app = spawn_app_with(bridge_settings(&world, |s| {
        s.safe.batch_window_secs = 60;
    }))
    .await;
    mount_source_on(&app, world.app, false).await;

    // t: the first request is prepared.
    let first = queue_node(&app, 1).await;
    app.drain().await;
    still_waiting(&world, &app, &[&first]).await;

    // t+10s: the second.
    app.clock.advance(chrono::Duration::seconds(10));
    let second = queue_node(&app, 2).await;
    app.drain().await;
    still_waiting(&world, &app, &[&first, &second]).await;

    // t+59s: the window is still open.
    app.clock.advance(chrono::Duration::seconds(49));
    app.drain().await;
    still_waiting(&world, &app, &[&first, &second]).await;

    // t+61s: closed; both go out in one Safe transaction.
    app.clock.advance(chrono::Duration::seconds(2));
    app.drain().await;
    for id in [&first, &second] {
        assert_eq!(app.status_of(id).await, "awaiting_approval");
    }
    let (hash, nonce) = proposal_of(&app, &first).await;
    assert_eq!(proposal_of(&app, &second).await, (hash, nonce));
    assert_eq!(nonce, 0);
    assert_eq!(proposal_rows(&app).await, 1);
    assert_eq!(world.service.proposal_posts_total(), 1);
}

// ---------------------------------------------------------------------------
// Start-up check

/// Builds the application for `world` after `adjust`; returns the error.
async fn start_up_error(world: &SafeWorld, adjust: impl FnOnce(&mut Settings)) -> String {
    let mut settings = test_settings(&fresh_database().await, "http://127.0.0.1:9/api/v1");
    bridge_settings(world, adjust)(&mut settings);
    match Application::build(settings).await {
        Ok(_) => panic!("start-up should have failed"),
        Err(err) => format!("{err:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_a_proposer_that_is_neither_owner_nor_delegate() {
    let world = SafeWorld::start().await;
    let stranger = key_of(&world, 6);

    let message = start_up_error(&world, proposer_key(&stranger)).await;

    let safe = world.safe.to_checksum(None);
    assert!(
        message.contains(&format!(
            "the proposer {} is neither an owner of Safe {safe} on chain {CHAIN} nor a delegate",
            world.chain.address(6).to_checksum(None)
        )),
        "{message}"
    );
    assert!(
        message.contains(&format!("approval-bridge delegate register --safe {safe}")),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_a_malformed_proposer_key_without_echoing_it() {
    let world = SafeWorld::start().await;
    for key in [
        format!("0x{}zz", "5eed".repeat(15)),
        "5eed5eed".to_owned(),
        format!("0x{}", "5eed".repeat(17)),
    ] {
        let message = start_up_error(&world, proposer_key(&key)).await;
        assert!(
            message.contains("the proposer key is not a 32-byte hex secp256k1 private key"),
            "{message}"
        );
        assert!(!message.contains("5eed"), "the key leaked: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_a_configured_safe_that_is_not_a_safe() {
    let world = SafeWorld::start().await;
    let account = world.chain.address(7);
    for (not_a_safe, why) in [
        (world.app, "is not a Safe: it has no VERSION()"),
        (account, "is not a contract"),
    ] {
        let message = start_up_error(&world, |s| {
            s.safe.safes = AllowedSafes(vec![(CHAIN, not_a_safe)]);
        })
        .await;
        assert!(
            message.contains(&format!(
                "APPROVAL_BRIDGE_SAFES: {} on chain {CHAIN} {why}",
                not_a_safe.to_checksum(None)
            )),
            "{message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegate_registered_by_an_owner_starts_and_proposes() {
    let world = SafeWorld::start().await;
    let delegate = world.chain.address(6);
    let unix_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let registration = DelegateRegistration::sign(
        &world.chain.signer(0),
        delegate,
        Some(world.safe),
        "approval-bridge",
        CHAIN,
        unix_now,
    )
    .unwrap();
    service_client(&world)
        .register_delegate(&registration)
        .await
        .unwrap();

    let app = spawn_app_with(bridge_settings(&world, proposer_key(&key_of(&world, 6)))).await;
    mount_source_on(&app, world.app, false).await;
    let id = queue_node(&app, 1).await;
    app.drain_all(10).await;

    assert_eq!(app.status_of(&id).await, "awaiting_approval");
    let (hash, _) = proposal_of(&app, &id).await;
    assert_eq!(world.service.proposal_posts(hash), 1);
    assert_eq!(world.service.stored_transactions(), 1);
    // A delegate's signature proves the sender; it is no owner's confirmation.
    assert_eq!(world.service.confirmations(hash), Vec::<Address>::new());
    let proposer: String = sqlx::query_scalar("SELECT proposer FROM proposals")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(proposer.parse::<Address>().unwrap(), delegate);
}
