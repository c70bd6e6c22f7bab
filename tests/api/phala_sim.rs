//! The Phala Cloud simulator driven by the bridge's own client against a
//! local chain: resolution, the 465 prepare, token supersede and expiry, and
//! commits that only pass once the DstackApp allows the replica.
//!
//! Needs the pinned npm packages (`npm ci`; `scripts/test` runs it).

use std::collections::BTreeMap;

use alloy::primitives::{Address, B256, Signature};
use alloy::rpc::types::TransactionReceipt;
use approval_bridge::clock::Clock;
use approval_bridge::config::PhalaSettings;
use approval_bridge::domain::{AppId, Bytes32};
use approval_bridge::phala::{
    PhalaClient, PhalaError, PrepareOutcome, PreparedReplica, ReplicaSpec, ResolveError,
};
use approval_bridge::safe::Call;
use approval_bridge::sandbox::LocalChain;
use approval_bridge::sandbox::chain::IDstackApp;
use approval_bridge::sandbox::phala_sim::{
    ALREADY_REGISTERED, PhalaSim, PhalaWorld, SimCvm, TokenState, standard,
};
use reqwest::{StatusCode, Url};
use secrecy::SecretString;
use serde_json::{Value, json};

/// A chain with two DstackApps owned by dev account 0 and the standard
/// world on top; a manual clock, so tokens and boots move only when told.
struct Fixture {
    chain: LocalChain,
    sim: PhalaSim,
    base: Url,
    client: PhalaClient,
    clock: Clock,
    web_app: Address,
    api_app: Address,
    http: reqwest::Client,
}

impl Fixture {
    async fn start() -> Fixture {
        let chain = LocalChain::start(None).await.expect("local chain starts");
        let owner = chain.address(0);
        let web_app = chain.deploy_dstack_app(owner, false).await.unwrap();
        let api_app = chain.deploy_dstack_app(owner, true).await.unwrap();
        let world = PhalaWorld::standard(chain.chain_id(), web_app, api_app);
        Fixture::with_world(chain, world, web_app, api_app).await
    }

    async fn with_world(
        chain: LocalChain,
        mut world: PhalaWorld,
        web_app: Address,
        api_app: Address,
    ) -> Fixture {
        let clock = Clock::manual(chrono::Utc::now());
        world.clock = clock.clone();
        let (base, sim) = PhalaSim::spawn(world, chain.rpc_url())
            .await
            .expect("simulator starts");
        let client = client(&base, sim.api_key());
        Fixture {
            chain,
            sim,
            base,
            client,
            clock,
            web_app,
            api_app,
            http: reqwest::Client::new(),
        }
    }

    fn cvm(&self, name: &str) -> &SimCvm {
        self.sim.world().cvm(name).expect("a CVM of the world")
    }

    fn uuid(&self, name: &str) -> String {
        self.cvm(name).vm_uuid.to_string()
    }

    fn device(&self, node: &str) -> B256 {
        self.sim.world().node(node).expect("a node").device_id
    }

    async fn prepare(&self, name: &str, node_id: Option<u32>) -> PreparedReplica {
        let spec = ReplicaSpec {
            node_id,
            ..ReplicaSpec::default()
        };
        match self.client.prepare_replica(&self.uuid(name), &spec).await {
            Ok(PrepareOutcome::Prepared(prepared)) => prepared,
            other => panic!("expected a 465, got {other:?}"),
        }
    }

    async fn commit(
        &self,
        name: &str,
        prepared: &PreparedReplica,
        tx: &str,
    ) -> Result<approval_bridge::phala::ReplicaVm, PhalaError> {
        self.client
            .commit_replica(
                &self.uuid(name),
                &prepared.commit_token,
                &prepared.compose_hash,
                tx,
            )
            .await
    }

    /// `addComposeHash` from the owner, dev account 0.
    async fn add_compose_hash(&self, app: Address, hash: B256) -> TransactionReceipt {
        IDstackApp::new(app, self.chain.provider())
            .addComposeHash(hash)
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap()
    }

    async fn add_device(&self, app: Address, device: B256) -> TransactionReceipt {
        IDstackApp::new(app, self.chain.provider())
            .addDevice(device)
            .send()
            .await
            .unwrap()
            .get_receipt()
            .await
            .unwrap()
    }

    async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.header("X-API-Key", key);
        }
        request
    }
}

fn client(base: &Url, api_key: &str) -> PhalaClient {
    PhalaClient::new(&PhalaSettings {
        phala_api_url: base.clone(),
        phala_api_key: SecretString::from(api_key.to_owned()),
        phala_api_version: "2026-01-21".into(),
        phala_timeout_secs: 10,
        lookup_cache_secs: 0,
    })
    .unwrap()
}

fn code(err: &PhalaError) -> (Option<u16>, Option<&str>) {
    (err.status(), err.code())
}

fn bytes32(b: B256) -> Bytes32 {
    Bytes32(b)
}

#[tokio::test]
async fn cvms_resolve_by_uuid_app_id_instance_and_name() {
    let f = Fixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    let simple = web.vm_uuid.simple().to_string();

    for id in [
        simple.clone(),
        web.vm_uuid.to_string(),
        standard::WEB.to_owned(),
    ] {
        let cvm = f.client.get_cvm(&id).await.unwrap();
        assert_eq!(
            cvm.vm_uuid.as_deref(),
            Some(web.vm_uuid.to_string().as_str())
        );
        assert_eq!(cvm.name.as_deref(), Some(standard::WEB));
        assert_eq!(cvm.status.as_deref(), Some("running"));
    }
    let raw: Value = f
        .raw(
            reqwest::Method::GET,
            &format!("/cvms/{simple}"),
            Some(f.sim.api_key()),
        )
        .await
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let instance = raw["instance_id"].as_str().unwrap();
    let by_instance = f.client.get_cvm(instance).await.unwrap();
    assert_eq!(by_instance.name.as_deref(), Some(standard::WEB));

    let source = f
        .client
        .resolve_source(&hex::encode(f.web_app), None)
        .await
        .unwrap();
    assert_eq!(source.vm_uuid, web.vm_uuid.to_string());
    let cvm = &source.cvm;
    assert!(cvm.is_onchain_kms());
    assert_eq!(cvm.kms_type.as_deref(), Some("base"));
    assert_eq!(cvm.chain_id(), Some(31337));
    assert_eq!(source.app_id(), Some(AppId(f.web_app)));
    let kms_info = cvm.kms_info.as_ref().unwrap();
    assert_eq!(
        kms_info
            .dstack_app_address
            .as_deref()
            .unwrap()
            .parse::<Address>()
            .unwrap(),
        f.web_app
    );
    assert_eq!(
        cvm.compose_hash.as_deref(),
        Some(hex::encode(web.compose_hash()).as_str())
    );
    assert_eq!(
        cvm.allowed_envs(),
        Some(vec!["API_URL".to_owned(), "LOG_LEVEL".to_owned()])
    );

    let docs = f.client.resolve_source(standard::DOCS, None).await.unwrap();
    assert!(!docs.cvm.is_onchain_kms());
    assert_eq!(docs.cvm.kms_type.as_deref(), Some("phala"));
    assert_eq!(docs.cvm.cloud_env_pubkey().map(str::len), Some(64));

    let err = f.client.get_cvm("no-such-cvm").await.unwrap_err();
    assert_eq!(code(&err), (Some(404), Some("ERR-03-001")));
    assert!(matches!(
        f.client.resolve_source("no-such-cvm", None).await,
        Err(ResolveError::UnknownSource(_))
    ));
}

#[tokio::test]
async fn an_app_with_two_live_compose_hashes_is_ambiguous_by_app_id() {
    let f = Fixture::start().await;
    let app = hex::encode(f.api_app);
    let err = f.client.get_cvm(&format!("app_{app}")).await.unwrap_err();
    assert_eq!(err.code(), Some("ERR-03-010"));

    let instances = f.client.app_cvms(&app).await.unwrap();
    let mut names: Vec<_> = instances.iter().filter_map(|c| c.name.clone()).collect();
    names.sort();
    assert_eq!(names, [standard::API_CANARY, standard::API]);
    assert_ne!(instances[0].compose_hash, instances[1].compose_hash);

    let canary = f.cvm(standard::API_CANARY).clone();
    let picked = f
        .client
        .resolve_source(&app, Some(&bytes32(canary.compose_hash())))
        .await
        .unwrap();
    assert_eq!(picked.vm_uuid, canary.vm_uuid.to_string());
    assert!(matches!(
        f.client.resolve_source(&app, None).await,
        Err(ResolveError::AmbiguousSource(_))
    ));

    // compose_hash in the replicas body picks the configuration; an unknown one is refused.
    let spec = ReplicaSpec {
        compose_hash: Some(bytes32(canary.compose_hash())),
        ..ReplicaSpec::default()
    };
    match f
        .client
        .prepare_replica(&f.uuid(standard::API), &spec)
        .await
        .unwrap()
    {
        PrepareOutcome::Prepared(p) => assert_eq!(p.compose_hash, bytes32(canary.compose_hash())),
        other => panic!("{other:?}"),
    }
    let spec = ReplicaSpec {
        compose_hash: Some(bytes32(B256::repeat_byte(0x42))),
        ..ReplicaSpec::default()
    };
    let err = f
        .client
        .prepare_replica(&f.uuid(standard::API), &spec)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (Some(400), Some("ERR-02-008")));
}

#[tokio::test]
async fn prepare_answers_465_with_the_registrations_and_a_token() {
    let f = Fixture::start().await;
    let web = f.cvm(standard::WEB).clone();

    let prepared = f.prepare(standard::WEB, Some(2)).await;
    assert_eq!(prepared.compose_hash, bytes32(web.compose_hash()));
    assert_eq!(prepared.app_id, AppId(f.web_app));
    assert_eq!(prepared.device_id, Some(bytes32(f.device("prod-2"))));
    assert_eq!(prepared.chain_id, Some(31337));
    assert!(!prepared.onchain.compose_hash_allowed);
    assert!(!prepared.onchain.device_id_allowed);
    assert!(!prepared.onchain.is_allowed);

    // The wire form: the envelope nested under `detail`, bare hex, both URLs.
    let response = f
        .raw(
            reqwest::Method::POST,
            &format!("/cvms/{}/replicas", web.vm_uuid),
            Some(f.sim.api_key()),
        )
        .await
        .header("X-Prepare-Only", "true")
        .json(&json!({"node_id": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 465);
    let body: Value = response.json().await.unwrap();
    let detail = &body["detail"];
    assert_eq!(detail["error_code"], "ERR-01-005");
    let field = |name: &str| {
        detail["details"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["field"] == name)
            .map(|d| d["value"].clone())
            .unwrap_or_else(|| panic!("no {name} in {body}"))
    };
    assert_eq!(field("app_id"), hex::encode(f.web_app));
    assert_eq!(field("compose_hash"), hex::encode(web.compose_hash()));
    assert_eq!(field("device_id"), hex::encode(f.device("prod-1")));
    assert_eq!(field("kms_info")["chain_id"], 31337);
    let token = field("commit_token").as_str().unwrap().to_owned();
    assert!(field("commit_url").as_str().unwrap().contains(&token));
    let api_commit_url = field("api_commit_url").as_str().unwrap().to_owned();
    assert!(api_commit_url.starts_with(f.base.as_str()));
    assert!(api_commit_url.ends_with(&format!("commit-replica?token={token}")));
    assert_eq!(
        field("onchain_status"),
        json!({"compose_hash_allowed": false, "device_id_allowed": false, "is_allowed": false})
    );

    // The contract's answer is read live.
    f.add_compose_hash(f.web_app, web.compose_hash()).await;
    f.add_device(f.web_app, f.device("prod-1")).await;
    let again = f.prepare(standard::WEB, None).await;
    assert_eq!(again.device_id, Some(bytes32(f.device("prod-1"))));
    assert!(again.onchain.is_allowed);

    assert_eq!(f.sim.prepare_calls(&web.vm_uuid.to_string()), 3);
    let states: Vec<_> = f
        .sim
        .tokens(&web.vm_uuid.to_string())
        .iter()
        .map(|t| t.state)
        .collect();
    assert_eq!(
        states,
        [
            TokenState::Superseded,
            TokenState::Superseded,
            TokenState::Live
        ]
    );
}

#[tokio::test]
async fn a_newer_prepare_supersedes_the_older_token() {
    let f = Fixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    f.add_compose_hash(f.web_app, web.compose_hash()).await;
    f.add_device(f.web_app, f.device("prod-2")).await;

    let older = f.prepare(standard::WEB, Some(2)).await;
    let newer = f.prepare(standard::WEB, Some(2)).await;
    let err = f
        .commit(standard::WEB, &older, ALREADY_REGISTERED)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (Some(466), Some("ERR-01-006")));
    let vm = f
        .commit(standard::WEB, &newer, ALREADY_REGISTERED)
        .await
        .unwrap();
    assert!(vm.vm_uuid.is_some());
    assert_eq!(f.sim.commit_calls(&web.vm_uuid.to_string()), 2);
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let f = Fixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    f.add_compose_hash(f.web_app, web.compose_hash()).await;
    f.add_device(f.web_app, f.device("prod-1")).await;

    let prepared = f.prepare(standard::WEB, Some(1)).await;
    f.clock
        .advance(chrono::Duration::days(14) + chrono::Duration::seconds(1));
    let err = f
        .commit(standard::WEB, &prepared, ALREADY_REGISTERED)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (Some(466), Some("ERR-01-006")));

    // A fresh token lives 14 days from its own prepare.
    let fresh = f.prepare(standard::WEB, Some(1)).await;
    f.clock.advance(chrono::Duration::days(13));
    f.commit(standard::WEB, &fresh, ALREADY_REGISTERED)
        .await
        .unwrap();
}

#[tokio::test]
async fn commit_waits_for_the_app_to_allow_hash_and_device_then_boots_the_replica() {
    let f = Fixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    let source = web.vm_uuid.to_string();
    let slots_before = f.sim.free_slots(2).unwrap();

    let prepared = f.prepare(standard::WEB, Some(2)).await;
    let err = f
        .commit(standard::WEB, &prepared, ALREADY_REGISTERED)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (Some(465), Some("ERR-01-005")));

    // The hash alone is not enough: the new node's device is not allowed.
    let hash_tx = f.add_compose_hash(f.web_app, web.compose_hash()).await;
    let err = f
        .commit(standard::WEB, &prepared, ALREADY_REGISTERED)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (Some(465), Some("ERR-01-005")));
    assert!(err.to_string().contains("addDevice"), "{err}");
    assert!(f.sim.replicas(&source).is_empty());

    f.add_device(f.web_app, f.device("prod-2")).await;
    let vm = f
        .commit(
            standard::WEB,
            &prepared,
            &hash_tx.transaction_hash.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(vm.status.as_deref(), Some("starting"));
    assert_eq!(vm.app_id.as_deref(), Some(hex::encode(f.web_app).as_str()));
    let replica = vm.vm_uuid.clone().unwrap();
    assert_ne!(replica, source);

    let cvm = f.client.get_cvm(&replica).await.unwrap();
    assert_eq!(cvm.status.as_deref(), Some("starting"));
    assert_eq!(
        cvm.compose_hash.as_deref(),
        Some(hex::encode(web.compose_hash()).as_str())
    );
    let batch: Value = f
        .raw(
            reqwest::Method::POST,
            "/status/batch",
            Some(f.sim.api_key()),
        )
        .await
        .json(&json!({"vm_uuids": [replica]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(batch[&replica]["in_progress"], true);

    f.clock.advance(chrono::Duration::seconds(3));
    let cvm = f.client.get_cvm(&replica).await.unwrap();
    assert_eq!(cvm.status.as_deref(), Some("running"));

    // One-time: the spent token is refused, and no second replica appears.
    let err = f
        .commit(standard::WEB, &prepared, ALREADY_REGISTERED)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (Some(466), Some("ERR-01-006")));
    let replicas = f.sim.replicas(&source);
    assert_eq!(replicas.len(), 1);
    assert_eq!(replicas[0].node_id, 2);
    assert_eq!(f.sim.free_slots(2), Some(slots_before - 1));
    assert_eq!(f.sim.commit_calls(&source), 4);
    let token = &f.sim.tokens(&source)[0];
    assert_eq!(token.state, TokenState::Spent);
    assert_eq!(f.sim.token_commit_calls(&token.token), 4);

    // A replica shares the app id, so the app id now names several CVMs.
    let err = f
        .client
        .get_cvm(&format!("app_{}", hex::encode(f.web_app)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("ERR-03-010"));
}

#[tokio::test]
async fn a_transaction_that_did_not_change_the_app_is_467_and_one_that_left_the_hash_out_is_468() {
    let f = Fixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    let prepared = f.prepare(standard::WEB, Some(1)).await;

    // The device transaction touched the app, but the hash is still not allowed.
    let device_tx = f.add_device(f.web_app, f.device("prod-1")).await;
    let err = f
        .commit(
            standard::WEB,
            &prepared,
            &device_tx.transaction_hash.to_string(),
        )
        .await
        .unwrap_err();
    assert_eq!(code(&err), (Some(468), Some("ERR-01-008")));

    let hash_tx = f.add_compose_hash(f.web_app, web.compose_hash()).await;
    let other_app_tx = f.add_compose_hash(f.api_app, web.compose_hash()).await;
    for tx in [
        other_app_tx.transaction_hash.to_string(),
        format!("0x{}", "ab".repeat(32)),
        "not-a-hash".to_owned(),
    ] {
        let err = f.commit(standard::WEB, &prepared, &tx).await.unwrap_err();
        assert_eq!(code(&err), (Some(467), Some("ERR-01-007")), "{tx}");
    }
    // A refused commit leaves the token usable.
    f.commit(
        standard::WEB,
        &prepared,
        &hash_tx.transaction_hash.to_string(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_safe_execution_that_registers_both_verifies() {
    let chain = LocalChain::start(None).await.expect("local chain starts");
    let owners = [chain.address(0), chain.address(1), chain.address(2)];
    let safe = chain.create_safe(&owners, 2, 11).await.unwrap();
    let app = chain.deploy_dstack_app(safe, false).await.unwrap();
    let world = PhalaWorld::new(chain.chain_id()).with_cvm(SimCvm::onchain("vault", app, 1));
    let f = Fixture::with_world(chain, world, app, Address::ZERO).await;

    let prepared = f.prepare("vault", Some(3)).await;
    let calls = [
        Call::add_device(app, prepared.device_id.unwrap().0),
        Call::add_compose_hash(app, prepared.compose_hash.0),
    ];
    let receipt = f
        .chain
        .exec_calls(
            safe,
            &calls,
            &[f.chain.signer(0), f.chain.signer(1)],
            &f.chain.signer(5),
        )
        .await
        .unwrap();
    let vm = f
        .commit("vault", &prepared, &receipt.transaction_hash.to_string())
        .await
        .unwrap();
    assert!(vm.vm_uuid.is_some());
}

#[tokio::test]
async fn a_cloud_kms_source_is_replicated_at_once() {
    let f = Fixture::start().await;
    let docs = f.uuid(standard::DOCS);
    let spec = ReplicaSpec {
        node_id: Some(3),
        ..ReplicaSpec::default()
    };
    match f.client.prepare_replica(&docs, &spec).await.unwrap() {
        PrepareOutcome::Created(vm) => {
            assert_eq!(vm.status.as_deref(), Some("starting"));
            assert!(vm.vm_uuid.is_some());
        }
        other => panic!("expected a created replica, got {other:?}"),
    }
    assert!(f.sim.tokens(&docs).is_empty());
    assert_eq!(f.sim.replicas(&docs)[0].node_id, 3);
}

#[tokio::test]
async fn env_is_encrypted_for_the_kms_key_and_reaches_the_replica() {
    let f = Fixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    let source = f.client.resolve_source(standard::WEB, None).await.unwrap();
    let env = BTreeMap::from([("API_URL".to_owned(), "http://127.0.0.1:9".to_owned())]);
    let key = f.client.env_key_for(&source, &env).await.unwrap();
    let encrypted = approval_bridge::phala::encrypt_env(&key.public_key, &env).unwrap();

    let spec = ReplicaSpec {
        node_id: Some(1),
        encrypted_env: Some(encrypted),
        ..ReplicaSpec::default()
    };
    let PrepareOutcome::Prepared(prepared) = f
        .client
        .prepare_replica(&source.vm_uuid, &spec)
        .await
        .unwrap()
    else {
        panic!("expected a 465");
    };
    f.add_compose_hash(f.web_app, web.compose_hash()).await;
    f.add_device(f.web_app, f.device("prod-1")).await;
    f.commit(standard::WEB, &prepared, ALREADY_REGISTERED)
        .await
        .unwrap();
    assert_eq!(f.sim.replicas(&source.vm_uuid)[0].env.as_ref(), Some(&env));

    // Garbage is refused, and the public key is signed by the simulator's KMS.
    let spec = ReplicaSpec {
        encrypted_env: Some("00".repeat(80)),
        ..ReplicaSpec::default()
    };
    let err = f
        .client
        .prepare_replica(&source.vm_uuid, &spec)
        .await
        .unwrap_err();
    assert_eq!(code(&err), (Some(400), Some("ERR-02-008")));
    let answer: Value = f
        .raw(
            reqwest::Method::GET,
            &format!("/kms/base/pubkey/{}", hex::encode(f.web_app)),
            Some(f.sim.api_key()),
        )
        .await
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let public_key = hex::decode(answer["public_key"].as_str().unwrap()).unwrap();
    let signature =
        Signature::from_raw(&hex::decode(answer["signature"].as_str().unwrap()).unwrap()).unwrap();
    let mut message = b"dstack-env-encrypt-pubkey:".to_vec();
    message.extend_from_slice(f.web_app.as_slice());
    message.extend_from_slice(&public_key);
    let signer = signature
        .recover_address_from_prehash(&alloy::primitives::keccak256(&message))
        .unwrap();
    assert_eq!(signer, f.sim.kms_signer_address());
}

#[tokio::test]
async fn full_nodes_unknown_nodes_and_malformed_bodies_get_phalas_errors() {
    let f = Fixture::start().await;
    let web = f.uuid(standard::WEB);
    for (node, expected) in [
        (4, (Some(400), Some("ERR-02-005"))),
        (99, (Some(400), Some("ERR-01-001"))),
    ] {
        let spec = ReplicaSpec {
            node_id: Some(node),
            ..ReplicaSpec::default()
        };
        let err = f.client.prepare_replica(&web, &spec).await.unwrap_err();
        assert_eq!(code(&err), expected, "node {node}");
    }

    let response = f
        .raw(
            reqwest::Method::POST,
            &format!("/cvms/{web}/replicas"),
            Some(f.sim.api_key()),
        )
        .await
        .json(&json!({"node_id": "prod-2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"][0]["loc"], json!(["body", "node_id"]));
    assert_eq!(body["detail"][0]["type"], "int_parsing");

    let response = f
        .raw(
            reqwest::Method::POST,
            "/cvms/no-such-cvm/replicas",
            Some(f.sim.api_key()),
        )
        .await
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["detail"]["error_code"], "ERR-03-001");

    let response = f
        .raw(reqwest::Method::GET, "/no/such/path", Some(f.sim.api_key()))
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"detail": "Not Found"})
    );
}

#[tokio::test]
async fn a_missing_or_wrong_api_key_is_401_but_commit_needs_only_the_token() {
    let f = Fixture::start().await;
    let web = f.uuid(standard::WEB);
    for key in [None, Some("phak_wrong")] {
        let response = f
            .raw(reqwest::Method::GET, &format!("/cvms/{web}"), key)
            .await
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["detail"]["error_code"], "ERR-05-003", "{body}");
        assert!(body["detail"]["message"].is_string());
    }
    let wrong = client(&f.base, "phak_wrong");
    let err = wrong.available_nodes().await.unwrap_err();
    assert_eq!(err.status(), Some(401));
    assert!(matches!(
        wrong.prepare_replica(&web, &ReplicaSpec::default()).await,
        Err(PhalaError::Api(_))
    ));
    assert_eq!(f.sim.prepare_calls(&web), 0);

    // commit-replica is token-based: no key, a token in the query.
    let response = f
        .raw(
            reqwest::Method::POST,
            &format!("/cvms/{web}/commit-replica?token=not-a-token"),
            None,
        )
        .await
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 466);

    let recorded = f.sim.requests();
    assert_eq!(recorded[0].api_key_valid, None);
    assert_eq!(recorded[0].status, 401);
    assert_eq!(recorded[1].api_key_valid, Some(false));
    assert!(recorded.iter().all(|r| !r.body.contains("phak_")));
    let nodes = f.client.available_nodes().await.unwrap();
    assert_eq!(nodes.nodes.len(), 4);
    assert_eq!(
        f.sim.requests().last().unwrap().phala_version.as_deref(),
        Some("2026-01-21")
    );
}

#[tokio::test]
async fn an_apps_cvm_list_shows_each_committed_replica_with_its_node_hash_and_status() {
    // What a client reconciles a lost commit or create answer with: the app's
    // CVMs, the replica among them as soon as it exists.
    let f = Fixture::start().await;
    let web = f.cvm(standard::WEB).clone();
    let before = app_cvms(&f, "2026-01-21").await;
    assert_eq!(before.len(), 1);
    assert_eq!(before[0]["vm_uuid"], web.vm_uuid.to_string());
    assert_eq!(before[0]["progress"], Value::Null);

    let prepared = f.prepare(standard::WEB, Some(3)).await;
    f.add_compose_hash(f.web_app, web.compose_hash()).await;
    f.add_device(f.web_app, f.device("prod-3")).await;
    let vm = f
        .commit(standard::WEB, &prepared, ALREADY_REGISTERED)
        .await
        .unwrap();
    let replica = vm.vm_uuid.unwrap();

    let after = app_cvms(&f, "2026-01-21").await;
    assert_eq!(after.len(), 2);
    let entry = after
        .iter()
        .find(|c| c["vm_uuid"] == replica.as_str())
        .unwrap_or_else(|| panic!("the replica is listed: {after:?}"));
    assert_eq!(entry["node_info"]["id"], 3);
    assert_eq!(entry["node_info"]["name"], "prod-3");
    assert_eq!(entry["compose_hash"], hex::encode(web.compose_hash()));
    assert_eq!(entry["app_id"], hex::encode(f.web_app));
    assert_eq!(entry["status"], "starting");
    assert_eq!(entry["progress"]["target"], "running");
    assert!(entry["progress"]["started_at"].is_string());
    assert_eq!(entry["workspace"]["object_type"], "workspace");
    assert!(
        entry.get("compose_file").is_none(),
        "the list has no manifest"
    );

    // The bridge's own client reads the list; the replica boots.
    f.clock.advance(chrono::Duration::seconds(3));
    let cvms = f.client.app_cvms(&hex::encode(f.web_app)).await.unwrap();
    let booted = cvms
        .iter()
        .find(|c| c.vm_uuid.as_deref() == Some(replica.as_str()))
        .unwrap();
    assert_eq!(booted.status.as_deref(), Some("running"));
    let after = app_cvms(&f, "2026-01-21").await;
    assert_eq!(after[1]["progress"], Value::Null);

    // The 2025-10-28 list has its own shape: the VM under `hosted`.
    let old = app_cvms(&f, "2025-10-28").await;
    assert_eq!(old[1]["hosted"]["id"], replica.as_str());
    assert_eq!(old[1]["node"]["id"], 3);
    assert_eq!(old[1]["in_progress"], false);
}

/// `GET /apps/{web app}/cvms` in the given API version.
async fn app_cvms(f: &Fixture, version: &str) -> Vec<Value> {
    let response = f
        .raw(
            reqwest::Method::GET,
            &format!("/apps/{}/cvms", hex::encode(f.web_app)),
            Some(f.sim.api_key()),
        )
        .await
        .header("X-Phala-Version", version)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn the_workspace_list_is_paginated_and_the_client_reads_every_page() {
    let f = Fixture::start().await;
    let everything = f.client.list_cvms().await.unwrap();
    assert!(everything.len() >= 3, "{}", everything.len());
    let mut paged = Vec::new();
    for page in 1..=everything.len().div_ceil(2) {
        let answer: Value = f
            .raw(
                reqwest::Method::GET,
                &format!("/cvms/paginated?page={page}&page_size=2"),
                Some(f.sim.api_key()),
            )
            .await
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["pages"], everything.len().div_ceil(2));
        assert_eq!(answer["total"], everything.len());
        paged.extend(
            answer["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["vm_uuid"].as_str().unwrap().to_owned()),
        );
    }
    let all: Vec<String> = everything
        .iter()
        .map(|c| c.vm_uuid.clone().unwrap())
        .collect();
    assert_eq!(paged, all);

    // A workspace of more than one page: the client reads them all.
    let phala = wiremock::MockServer::start().await;
    for page in 1..=3u32 {
        let items: Vec<Value> = (0..if page < 3 { 100 } else { 7 })
            .map(|n| json!({"name": format!("cvm-{page}-{n}"), "vm_uuid": format!("{page:04}{n:028}")}))
            .collect();
        wiremock::Mock::given(wiremock::matchers::method("GET"))
            .and(wiremock::matchers::path("/api/v1/cvms/paginated"))
            .and(wiremock::matchers::query_param("page", page.to_string()))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(
                json!({"items": items, "total": 207, "page": page, "page_size": 100, "pages": 3}),
            ))
            .expect(1)
            .mount(&phala)
            .await;
    }
    let base: Url = format!("{}/api/v1", phala.uri()).parse().unwrap();
    let listed = client(&base, "key").list_cvms().await.unwrap();
    assert_eq!(listed.len(), 207);
    assert_eq!(listed[206].name.as_deref(), Some("cvm-3-6"));
}
