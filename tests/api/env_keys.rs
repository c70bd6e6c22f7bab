//! Env overrides are encrypted only for a key the app's KMS signed: the
//! signature over the key must recover the root key that the chain's
//! DstackKms registers. Otherwise intake refuses and stores nothing.

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use approval_bridge::config::{KmsContracts, RpcUrls};
use approval_bridge::sandbox::LocalChain;
use approval_bridge::sandbox::phala_sim::{PhalaSim, PhalaWorld, kms_root_key, standard};
use serde_json::{Value, json};

use crate::helpers::{TestApp, error_of, spawn_app, spawn_app_with};
use crate::kms_mock::{BASE, MockKms, mount_env_key_answer};
use crate::phala_mock::*;

fn order() -> Value {
    json!({"source": ONCHAIN_NAME, "env": {"DB_URL": "postgres://db"}})
}

async fn nothing_stored(app: &TestApp) {
    assert_eq!(app.request_count().await, 0);
    assert!(
        app.phala_requests("POST", &api(&format!("/cvms/{ONCHAIN_VM}/replicas")))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_key_signed_by_the_registered_kms_root_is_used() {
    let kms = MockKms::start(None).await;
    let app = spawn_app_with(kms.configure()).await;
    mount_onchain_source(&app.phala, &["DB_URL"]).await;
    kms.mount_env_key(&app.phala, &kms.signer).await;
    let ids = app.queue(&order()).await;
    assert_eq!(ids.len(), 1);
    // The bridge read the root key from the DstackKms on Base.
    let calls = kms.rpc.received_requests().await.unwrap();
    assert!(
        calls
            .iter()
            .any(|c| String::from_utf8_lossy(&c.body).contains("eth_call")),
        "kmsInfo() was read"
    );
}

#[tokio::test]
async fn a_key_signed_by_another_key_is_refused_and_nothing_is_stored() {
    let kms = MockKms::start(None).await;
    let app = spawn_app_with(kms.configure()).await;
    mount_onchain_source(&app.phala, &["DB_URL"]).await;
    let impostor = PrivateKeySigner::random();
    kms.mount_env_key(&app.phala, &impostor).await;
    let (code, message) = error_of(app.post_replicas(&order()).await, 422).await;
    assert_eq!(code, "env_key_unverified");
    assert!(message.contains("not by the KMS root key"), "{message}");
    assert!(message.contains("nothing was stored"), "{message}");
    nothing_stored(&app).await;
}

#[tokio::test]
async fn a_registered_root_that_is_not_a_key_refuses_every_env() {
    let kms = MockKms::start(Some(vec![0x05; 33])).await;
    let app = spawn_app_with(kms.configure()).await;
    mount_onchain_source(&app.phala, &["DB_URL"]).await;
    kms.mount_env_key(&app.phala, &kms.signer).await;
    let (code, message) = error_of(app.post_replicas(&order()).await, 422).await;
    assert_eq!(code, "env_key_unverified");
    assert!(message.contains("registers no valid root key"), "{message}");
    nothing_stored(&app).await;
}

#[tokio::test]
async fn unsigned_or_malformed_signatures_are_refused() {
    let kms = MockKms::start(None).await;
    let public = kms.env_public_hex();
    let cases = [
        (json!({"public_key": public}), "without a signature"),
        (
            json!({"public_key": public, "signature": ""}),
            "without a signature",
        ),
        (json!({"public_key": public, "signature": "0x00"}), "not 65"),
        (
            json!({"public_key": public, "signature": "nothex"}),
            "not hex",
        ),
        (
            json!({"public_key": "abcd", "signature": "00".repeat(65)}),
            "not 32 bytes",
        ),
    ];
    for (answer, mentions) in cases {
        let app = spawn_app_with(kms.configure()).await;
        mount_onchain_source(&app.phala, &["DB_URL"]).await;
        mount_env_key_answer(&app.phala, answer.clone()).await;
        let (code, message) = error_of(app.post_replicas(&order()).await, 422).await;
        assert_eq!(code, "env_key_unverified", "{answer}");
        assert!(message.contains(mentions), "{answer}: {message}");
        nothing_stored(&app).await;
    }
}

#[tokio::test]
async fn without_an_rpc_or_a_kms_contract_for_the_chain_the_key_is_refused() {
    let kms = MockKms::start(None).await;
    let app = spawn_app().await;
    mount_onchain_source(&app.phala, &["DB_URL"]).await;
    kms.mount_env_key(&app.phala, &kms.signer).await;
    let (code, message) = error_of(app.post_replicas(&order()).await, 422).await;
    assert_eq!(code, "env_key_unverified");
    assert!(message.contains("APPROVAL_BRIDGE_RPC_URLS"), "{message}");
    nothing_stored(&app).await;

    // A chain with an RPC but no DstackKms known.
    let app = spawn_app_with(|s| {
        s.safe.rpc_urls = RpcUrls(vec![(7, "http://127.0.0.1:9".parse().unwrap())])
    })
    .await;
    let mut cvm = onchain_cvm_on(&app_id(), 7, ONCHAIN_VM, ONCHAIN_NAME);
    cvm["compose_file"] = json!({"allowed_envs": ["DB_URL"]});
    wiremock::Mock::given(wiremock::matchers::path(api(&format!(
        "/cvms/{ONCHAIN_NAME}"
    ))))
    .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(cvm))
    .mount(&app.phala)
    .await;
    kms.mount_env_key(&app.phala, &kms.signer).await;
    let (code, message) = error_of(app.post_replicas(&order()).await, 422).await;
    assert_eq!(code, "env_key_unverified");
    assert!(
        message.contains("APPROVAL_BRIDGE_KMS_CONTRACTS"),
        "{message}"
    );
    nothing_stored(&app).await;
}

#[tokio::test]
async fn an_rpc_outage_is_a_503_that_names_no_url_key() {
    let kms = MockKms::start(None).await;
    let rpc = "http://127.0.0.1:9/v2/rpc-key-never-shown-4242";
    let app =
        spawn_app_with(move |s| s.safe.rpc_urls = RpcUrls(vec![(BASE, rpc.parse().unwrap())]))
            .await;
    mount_onchain_source(&app.phala, &["DB_URL"]).await;
    kms.mount_env_key(&app.phala, &kms.signer).await;
    let response = app.post_replicas(&order()).await;
    assert_eq!(response.status(), 503);
    let body = response.text().await.unwrap();
    assert!(body.contains("chain_unavailable"), "{body}");
    assert!(!body.contains("rpc-key-never-shown"), "{body}");
    nothing_stored(&app).await;
}

#[tokio::test]
async fn the_operator_may_allow_unverified_keys() {
    let app = spawn_app_with(|s| s.trust.allow_unverified_env_keys = true).await;
    mount_onchain_source(&app.phala, &["DB_URL"]).await;
    let kms = MockKms::start(None).await;
    mount_env_key_answer(&app.phala, json!({"public_key": kms.env_public_hex()})).await;
    assert_eq!(app.queue(&order()).await.len(), 1);
}

/// The sandbox's world: the Phala simulator signs env keys with the root key
/// of the DstackKms stand-in on the local chain, as the real KMS does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulators_kms_signs_as_the_real_one() {
    let chain = LocalChain::start(None).await.expect("anvil (run npm ci)");
    let owner = chain.address(4);
    let web = chain.deploy_dstack_app(owner, false).await.unwrap();
    let api_app = chain.deploy_dstack_app(owner, true).await.unwrap();
    let genuine = chain
        .deploy_dstack_kms(owner, &kms_root_key())
        .await
        .unwrap();
    let other_root = crate::kms_mock::compressed(&PrivateKeySigner::random());
    let rotated = chain.deploy_dstack_kms(owner, &other_root).await.unwrap();
    let mut world = PhalaWorld::standard(chain.chain_id(), web, api_app);
    world.kms_contract = genuine;
    let (phala_url, sim) = PhalaSim::spawn(world, chain.rpc_url()).await.unwrap();

    let bridge = |kms: Address| {
        let (url, key, rpc) = (phala_url.clone(), sim.api_key().to_owned(), chain.rpc_url());
        spawn_app_with(move |s| {
            s.phala.phala_api_url = url;
            s.phala.phala_api_key = key.into();
            s.safe.rpc_urls = RpcUrls(vec![(31337, rpc)]);
            s.trust.kms_contracts = KmsContracts(vec![(31337, kms)]);
        })
    };
    let order = json!({"source": standard::WEB, "node": "prod-2", "env": {"API_URL": "https://x"}});

    let app = bridge(genuine).await;
    let id = app.queue(&order).await.remove(0);
    app.drain().await;
    // The simulator decrypted the env at the prepare, or it would have refused it.
    let request = app.get_replica(&id).await;
    let prepared = request["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["from"] == "preparing" && e["to"] == "awaiting_proposal");
    assert!(prepared, "{request}");
    assert_eq!(request["env_names"], json!(["API_URL"]));

    let app = bridge(rotated).await;
    let (code, message) = error_of(app.post_replicas(&order).await, 422).await;
    assert_eq!(code, "env_key_unverified");
    assert!(message.contains(&rotated.to_string()), "{message}");
    assert_eq!(app.request_count().await, 0);
}
