//! Issue 18, finding 9 (last bullet): an owner whose wallet is a contract
//! signs in. A Safe that owns the app's Safe signs the Sign-In with Ethereum
//! message as Safe{Wallet} does (its owners sign the Safe's `SafeMessage`
//! hash), and the bridge asks that Safe on chain (EIP-1271). A forged
//! contract signature, or a chain that cannot be asked, signs nobody in; an
//! account still signs in with its key.

use alloy::primitives::{U256, eip191_hash_message};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use approval_bridge::config::RpcUrls;
use approval_bridge::safe::Call;
use approval_bridge::sandbox::SafeOwner;
use approval_bridge::sandbox::chain::{ISafeMore, safe_message_signature};
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;

use crate::front::Front;
use crate::page_app::{CHAIN, Page, page_app, page_app_on, refusal, session_cookie};
use crate::rpc_proxy::RpcProxy;
use crate::safe_world::SafeWorld;

/// A 2-of-2 Safe of accounts 7 and 8, with the CompatibilityFallbackHandler,
/// made a fourth owner of the world's Safe (whose threshold stays 2).
async fn add_safe_owner(page: &Page) -> SafeOwner {
    let chain = &page.world.chain;
    let keys = vec![chain.signer(7), chain.signer(8)];
    let address = chain
        .create_safe(&[keys[0].address(), keys[1].address()], 2, 77)
        .await
        .unwrap();
    let add = Call {
        to: page.world.safe,
        value: U256::ZERO,
        data: ISafeMore::addOwnerWithThresholdCall {
            owner: address,
            _threshold: U256::from(2),
        }
        .abi_encode()
        .into(),
    };
    chain
        .exec_calls(
            page.world.safe,
            &[add],
            &[chain.signer(0), chain.signer(1)],
            &chain.signer(3),
        )
        .await
        .unwrap();
    SafeOwner {
        address,
        threshold: 2,
        keys,
    }
}

/// The Safe-owner's contract signature of `message`.
fn signed_by(owner: &SafeOwner, message: &str) -> Vec<u8> {
    owner
        .sign_hash(CHAIN, eip191_hash_message(message))
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_that_owns_the_safe_signs_in_with_a_contract_signature_and_reads() {
    let page = page_app(false).await;
    let owner = add_safe_owner(&page).await;
    let subject = owner.address.to_checksum(None);

    let message = page.message_of(owner.address).await;
    let signature = signed_by(&owner, &message);
    assert!(signature.len() > 65, "two owners' signatures");
    let answer = page.send_signature(&message, &signature).await;
    assert_eq!(answer.status(), 200);
    let cookie = session_cookie(&answer);
    let json: Value = answer.json().await.unwrap();
    assert_eq!(json["subject"], subject.as_str());
    assert_eq!(json["role"], "viewer", "an owner of the Safe reads");

    // Signed in as itself on the signers' view, and, an owner, it may not queue.
    let proposals = page.get_page("/proposals", &cookie).await;
    assert_eq!(proposals.status(), 200);
    let html = proposals.text().await.unwrap();
    assert!(html.contains(&subject), "{html}");
    assert_eq!(page.get_page("/replicas/new", &cookie).await.status(), 403);

    // The message is used up.
    let text = refusal(page.send_signature(&message, &signature).await, 401).await;
    assert!(text.contains("nonce"), "{text}");
    assert_eq!(page.sessions().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_contract_signatures_create_no_session_and_keys_still_sign_in() {
    let page = page_app(false).await;
    let owner = add_safe_owner(&page).await;
    let message = page.message_of(owner.address).await;
    let hash = eip191_hash_message(&message);
    let other_message = page.message_of(owner.address).await;
    let strangers = [PrivateKeySigner::random(), PrivateKeySigner::random()];
    let forged: Vec<(&str, Vec<u8>)> = vec![
        (
            "one owner of a 2-of-2 Safe",
            safe_message_signature(owner.address, CHAIN, hash, &owner.keys[..1])
                .unwrap()
                .to_vec(),
        ),
        (
            "keys that own nothing",
            safe_message_signature(owner.address, CHAIN, hash, &strangers)
                .unwrap()
                .to_vec(),
        ),
        (
            "the Safe's signature of another message",
            signed_by(&owner, &other_message),
        ),
        (
            "the Safe's owners signing for another chain",
            safe_message_signature(owner.address, 1, hash, &owner.keys)
                .unwrap()
                .to_vec(),
        ),
        (
            "an owner's own key, as if it were the Safe's",
            alloy::signers::SignerSync::sign_message_sync(&owner.keys[0], message.as_bytes())
                .unwrap()
                .as_bytes()
                .to_vec(),
        ),
        ("junk", vec![0xab; 200]),
    ];
    for (what, signature) in &forged {
        let answer = page.send_signature(&message, signature).await;
        assert_eq!(answer.status(), 401, "{what}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{what}: {body}");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(
            text.contains("does not verify") && text.contains("EIP-1271"),
            "{what}: {text}"
        );
    }
    assert_eq!(page.sessions().await, 0, "no forgery signs in");

    // The refusals used nothing up: the Safe's own signature of the same
    // message signs in.
    let answer = page
        .send_signature(&message, &signed_by(&owner, &message))
        .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(page.sessions().await, 1);

    // An owner with a key, and the operator, still sign in with it.
    let eoa = page.world.chain.signer(2);
    let answer = page.sign_in(&page.message(&eoa).await, &eoa).await;
    assert_eq!(answer.status(), 200);
    let json: Value = answer.json().await.unwrap();
    assert_eq!(json["role"], "viewer");
    let answer = page
        .sign_in(&page.message(&page.operator).await, &page.operator)
        .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(page.sessions().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_signature_the_chain_cannot_check_is_retry_later_not_a_yes() {
    let world = SafeWorld::start().await;
    let proxy = RpcProxy::start(world.chain.rpc_url(), None).await;
    let rpc = proxy.url.clone();
    let page = page_app_on(world, false, move |s, _| {
        s.safe.rpc_urls = RpcUrls(vec![(CHAIN, rpc)]);
    })
    .await;
    let owner = add_safe_owner(&page).await;
    let message = page.message_of(owner.address).await;
    let signature = signed_by(&owner, &message);

    proxy.outage.store(true, Ordering::SeqCst);
    let answer = page.send_signature(&message, &signature).await;
    assert_eq!(answer.status(), 503);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["code"], "signature_unverifiable", "{body}");
    let text = body["error"]["message"].as_str().unwrap();
    assert!(
        text.contains(&owner.address.to_checksum(None)) && text.contains("retry later"),
        "{text}"
    );
    assert_eq!(page.sessions().await, 0);
    assert!(
        proxy
            .methods
            .lock()
            .unwrap()
            .iter()
            .any(|m| m == "eth_call"),
        "the Safe was asked"
    );

    // The chain is back: the same message and signature sign in.
    proxy.outage.store(false, Ordering::SeqCst);
    let answer = page.send_signature(&message, &signature).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(page.sessions().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandboxs_safe_owner_signs_in_and_sees_the_proposal_it_may_sign() {
    let front = Front::start(false).await;
    let safe_owner = front.sandbox.safe_owner.address.to_checksum(None);
    let id = front
        .queue(json!({"source": "web-prod", "node": "prod-2"}))
        .await;
    let waiting = front.wait_for(&id, "awaiting_approval").await;
    let proposal_id = waiting["proposal"]["id"].as_str().unwrap();
    let hash = waiting["proposal"]["safe_tx_hash"].as_str().unwrap();

    // The world names it, with how it signs in and why it has no Confirm.
    let world = front.get_json("/sandbox/world").await;
    let described = &world["safe"]["safe_owner"];
    assert_eq!(described["address"], safe_owner.as_str(), "{world}");
    assert_eq!(described["dev_login"], "safe-owner", "{world}");
    assert_eq!(described["threshold"], 2, "{world}");
    let sandbox_page = front.get("/sandbox").await.text().await.unwrap();
    assert!(sandbox_page.contains(&safe_owner), "{sandbox_page}");
    assert!(
        sandbox_page.contains(r#"value="safe-owner""#)
            && sandbox_page.contains("no Confirm button"),
        "{sandbox_page}"
    );

    // The dev login: a real Sign-In with Ethereum round trip at the bridge,
    // signed by the Safe's owners and checked by the Safe.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = http
        .post(front.url("/sandbox/dev-login"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body("account=safe-owner")
        .send()
        .await
        .unwrap();
    let status = login.status();
    let headers = login.headers().clone();
    assert_eq!(status, 303, "{}", login.text().await.unwrap());
    assert_eq!(headers[LOCATION], "/replicas");
    let cookie = headers[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();

    // The signers' view, signed in as the Safe-owner: the proposal, with
    // the Safe-owner among the owners still to sign.
    let page = http
        .get(front.url("/proposals"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains(hash), "{html}");
    assert!(html.contains(&safe_owner), "{html}");
    let view = front
        .get_json(&format!("/api/v1/proposals/{proposal_id}"))
        .await;
    assert!(
        view["owners_to_sign"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == safe_owner.as_str()),
        "{view}"
    );
}
