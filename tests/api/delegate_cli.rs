//! `approval-bridge delegate register`: the real binary against the local
//! chain and the fake Safe Transaction Service. An owner signs what the first
//! run prints; the second run registers the proposer key as a delegate, after
//! which a bridge whose proposer is not an owner starts and proposes.

use std::process::{Command, Output};

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use approval_bridge::config::{AllowedSafes, RpcUrls};
use approval_bridge::safe::{delegate_hash, delegate_totp, sign_safe_tx_hash};
use approval_bridge::startup::Application;
use reqwest::Url;
use serde_json::{Value, json};

use crate::helpers::{fresh_database, spawn_app_with, test_settings};
use crate::phala_mock::ONCHAIN_NAME;
use crate::safe_world::{SafeWorld, mount_source_on};

/// Dev account 5 holds no share of the world's Safe (owners are 0, 1 and 2).
const PROPOSER: usize = 5;
const CHAIN: &str = "31337";

fn hex_key(key: B256) -> String {
    format!("0x{}", hex::encode(key))
}

/// The binary with the Safe settings of `world`, and nothing from the
/// developer's environment.
fn bridge(world: &SafeWorld, with_rpc: bool) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_approval-bridge"));
    for (key, _) in std::env::vars() {
        if key.starts_with("APPROVAL_BRIDGE_") || key == "DATABASE_URL" || key == "ETH_RPC_URL" {
            command.env_remove(key);
        }
    }
    command
        .env(
            "APPROVAL_BRIDGE_PROPOSER_KEY",
            hex_key(world.chain.private_key(PROPOSER)),
        )
        .env(
            "APPROVAL_BRIDGE_SAFE_SERVICE_URLS",
            format!("{CHAIN}={}", world.service_url),
        );
    if with_rpc {
        command.env(
            "APPROVAL_BRIDGE_RPC_URLS",
            format!("{CHAIN}={}", world.chain.rpc_url()),
        );
    }
    command.args([
        "delegate",
        "register",
        "--safe",
        &world.safe.to_checksum(None),
        "--chain-id",
        CHAIN,
    ]);
    command
}

/// Runs off the runtime: the fake service answers on this test's runtime.
async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Exit code 1, nothing on stdout, one line on stderr; returns that line.
fn one_line_error(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert_eq!(text(&output.stdout), "");
    let stderr = text(&output.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    stderr.trim_end().to_owned()
}

fn assert_no_key(world: &SafeWorld, output: &Output) {
    let key = hex::encode(world.chain.private_key(PROPOSER));
    for stream in [&output.stdout, &output.stderr] {
        assert!(!text(stream).contains(&key), "the proposer key was echoed");
    }
}

/// The first run: the typed data on stdout, the digest on stderr.
async fn print_message(world: &SafeWorld) -> (Value, B256) {
    let output = run(bridge(world, true)).await;
    assert!(output.status.success(), "{output:?}");
    assert_no_key(world, &output);
    let typed_data: Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    let stderr = text(&output.stderr);
    let digest = stderr
        .lines()
        .find_map(|line| line.strip_prefix("digest: "))
        .unwrap_or_else(|| panic!("no digest in {stderr:?}"))
        .parse()
        .unwrap();
    (typed_data, digest)
}

async fn register_with(world: &SafeWorld, signature: &str, with_rpc: bool) -> Output {
    let mut command = bridge(world, with_rpc);
    command.args(["--signature", signature]);
    let output = run(command).await;
    assert_no_key(world, &output);
    output
}

fn signature_of(owner: &PrivateKeySigner, digest: B256) -> String {
    format!(
        "0x{}",
        hex::encode(sign_safe_tx_hash(owner, digest).unwrap())
    )
}

/// `GET /api/v2/delegates/?delegate=…` on the fake service.
async fn delegates_of(service: &Url, delegate: Address) -> Vec<Value> {
    let url = format!(
        "{service}api/v2/delegates/?delegate={}",
        delegate.to_checksum(None)
    );
    let body: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    body["results"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_signature_it_prints_the_typed_data_for_the_proposer_and_this_hour() {
    let world = SafeWorld::start().await;
    let before = delegate_totp(now());
    let (typed_data, digest) = print_message(&world).await;
    let after = delegate_totp(now());

    let proposer = world.chain.address(PROPOSER);
    assert_eq!(typed_data["primaryType"], "Delegate");
    assert_eq!(
        typed_data["domain"],
        json!({"name": "Safe Transaction Service", "version": "1.0", "chainId": 31337})
    );
    assert_eq!(
        typed_data["types"]["Delegate"],
        json!([
            {"name": "delegateAddress", "type": "address"},
            {"name": "totp", "type": "uint256"},
        ])
    );
    assert_eq!(
        typed_data["types"]["EIP712Domain"],
        json!([
            {"name": "name", "type": "string"},
            {"name": "version", "type": "string"},
            {"name": "chainId", "type": "uint256"},
        ])
    );
    assert_eq!(
        typed_data["message"]["delegateAddress"],
        proposer.to_checksum(None)
    );
    let totp = typed_data["message"]["totp"].as_u64().unwrap();
    assert!(
        (before..=after).contains(&totp),
        "{totp} not in {before}..={after}"
    );
    assert_eq!(digest, delegate_hash(proposer, totp, Some(31337)));
    // Printing registers nothing.
    assert!(delegates_of(&world.service_url, proposer).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owners_signature_registers_the_proposer_as_its_delegate_for_the_safe() {
    let world = SafeWorld::start().await;
    let (_, digest) = print_message(&world).await;
    let owner = world.chain.signer(1);

    let output = register_with(&world, &signature_of(&owner, digest), true).await;
    assert!(output.status.success(), "{output:?}");
    let stdout = text(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    let proposer = world.chain.address(PROPOSER).to_checksum(None);
    assert!(stdout.contains(&proposer), "{stdout}");
    assert!(
        stdout.contains(&owner.address().to_checksum(None)),
        "{stdout}"
    );

    let listed = delegates_of(&world.service_url, world.chain.address(PROPOSER)).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["delegate"], proposer);
    assert_eq!(listed[0]["delegator"], owner.address().to_checksum(None));
    assert_eq!(listed[0]["safe"], world.safe.to_checksum(None));
    assert_eq!(listed[0]["label"], "approval-bridge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_owners_signature_is_refused_and_registers_nothing() {
    let world = SafeWorld::start().await;
    let (_, digest) = print_message(&world).await;
    let stranger = world.chain.signer(6);
    let signature = signature_of(&stranger, digest);

    // With an RPC the bridge reads the owners itself and sends nothing.
    let line = one_line_error(&register_with(&world, &signature, true).await);
    assert!(
        line.starts_with("approval-bridge: the signature is not by an owner of Safe"),
        "{line}"
    );
    assert!(
        line.contains(&stranger.address().to_checksum(None)),
        "{line}"
    );

    // Without one the service refuses, and its answer is shown.
    let line = one_line_error(&register_with(&world, &signature, false).await);
    assert!(
        line.starts_with(
            "approval-bridge: the Safe Transaction Service refused the registration: "
        ),
        "{line}"
    );
    assert!(line.contains("not an owner"), "{line}");

    assert!(
        delegates_of(&world.service_url, world.chain.address(PROPOSER))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_signature_or_a_missing_key_is_one_clear_line() {
    let world = SafeWorld::start().await;
    let mut bad_v = [0x11u8; 65];
    bad_v[64] = 5;
    for (signature, says) in [
        ("0x1234", "a signature is 65 bytes"),
        ("not-a-signature", "it is not hex"),
        (&format!("0x{}", hex::encode(bad_v)), "v=5"),
    ] {
        let line = one_line_error(&register_with(&world, signature, true).await);
        assert!(
            line.starts_with("approval-bridge: invalid --signature: "),
            "{line}"
        );
        assert!(line.contains(says), "{line}");
    }

    let mut command = bridge(&world, true);
    command.env_remove("APPROVAL_BRIDGE_PROPOSER_KEY");
    let line = one_line_error(&run(command).await);
    assert!(
        line.contains("missing setting APPROVAL_BRIDGE_PROPOSER_KEY"),
        "{line}"
    );
    assert!(
        delegates_of(&world.service_url, world.chain.address(PROPOSER))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_whose_proposer_is_not_an_owner_starts_only_once_registered() {
    let world = SafeWorld::start().await;
    let rpc = world.chain.rpc_url();
    let service = world.service_url.clone();
    let safe = world.safe;
    let key = hex_key(world.chain.private_key(PROPOSER));
    let configure = move |s: &mut approval_bridge::config::Settings| {
        s.safe.rpc_urls = RpcUrls(vec![(31337, rpc.clone())]);
        s.safe.safe_service_urls = RpcUrls(vec![(31337, service.clone())]);
        s.safe.safes = AllowedSafes(vec![(31337, safe)]);
        s.safe.proposer_key = Some(key.clone().into());
    };

    let mut settings = test_settings(&fresh_database().await, "http://127.0.0.1:9/api/v1");
    configure(&mut settings);
    let err = Application::build(settings)
        .await
        .err()
        .expect("a proposer that is neither owner nor delegate stops start-up");
    let message = format!("{err:#}");
    assert!(message.contains("delegate register"), "{message}");

    let (_, digest) = print_message(&world).await;
    let output = register_with(&world, &signature_of(&world.chain.signer(2), digest), true).await;
    assert!(output.status.success(), "{output:?}");

    // It starts now, and its signed proposals are accepted as a delegate's.
    let app = spawn_app_with(configure).await;
    mount_source_on(&app, world.app, false).await;
    let id = app
        .queue(&json!({"source": ONCHAIN_NAME, "node": 1}))
        .await
        .remove(0);
    app.drain_all(10).await;
    let request = app.get_replica(&id).await;
    assert_eq!(request["status"], "awaiting_approval", "{request}");
    let safe_tx_hash: B256 = request["proposal"]["safe_tx_hash"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(world.service.stored_transactions(), 1);
    // A delegate's signature proves the sender; it is no owner's confirmation.
    assert!(world.service.confirmations(safe_tx_hash).is_empty());
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
