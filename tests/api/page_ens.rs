//! ENS names where the chain has them: an address without a configured
//! name shows its primary ENS name, only when the name's forward record
//! points back at it, still with its short address and copy button; a
//! chain without ENS costs one probe, not a call per page.

use alloy::primitives::Address;
use alloy::providers::Provider;
use serde_json::json;

use approval_bridge::chain::{ChainClient, ENS_REGISTRY, EnsNames};
use approval_bridge::sandbox::{ENS_UNVERIFIED, ENS_VERIFIED, LocalChain, OWNER_NAMES};

use crate::browser::{Browser, queue_api, request_until, start_sandbox};
use crate::rpc_proxy::RpcProxy;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_verified_ens_names_and_not_the_others() {
    let sandbox = start_sandbox().await;
    let base = sandbox.url.to_string();
    let waiting = queue_api(&sandbox, "prod-2").await;
    request_until(&sandbox, &waiting, |r| r["status"] == "awaiting_approval").await;

    // Bob reads the Safe's queue: the Safe-owner, still to sign, by its name.
    let browser = Browser::start("page_ens").await;
    browser.dev_login(&base, "owner-1").await;
    browser.open(&format!("{base}proposals")).await;
    browser
        .wait_for_text("#proposals .to-sign", ENS_VERIFIED, 30)
        .await;
    let treasury = browser
        .js(&format!(
            "const p = Array.from(document.querySelectorAll('#proposals .to-sign .person'))
               .find(p => p.querySelector('.name')?.textContent === '{ENS_VERIFIED}');
             return [p.title, p.querySelector('code.addr')?.textContent ?? null,
                     p.querySelector('button.copy') !== null]"
        ))
        .await;
    let full = sandbox.safe_owner.address.to_checksum(None);
    assert_eq!(treasury[0], json!(full), "{treasury}");
    assert_eq!(
        treasury[1],
        json!(format!("{}…{}", &full[..6], &full[full.len() - 4..]))
    );
    assert_eq!(treasury[2], json!(true), "the copy button is still there");

    // Every lookup the first render started has ended after a few more.
    browser.wait_for_refreshes(3).await;
    browser.open(&format!("{base}proposals")).await;
    let queue = browser
        .wait_for_text("#proposals .to-sign", ENS_VERIFIED, 30)
        .await;
    // The Safe's reverse name points elsewhere: its short address instead.
    let safe = browser.text("#proposals .facts dd:nth-of-type(2)").await;
    let safe_full = sandbox.safe.to_checksum(None);
    assert!(safe.contains(&safe_full[..6]), "{safe}");
    let body = browser.body().await;
    assert!(!body.contains(ENS_UNVERIFIED), "{body}");
    // Bob's configured name wins over his ENS name.
    assert!(queue.contains(OWNER_NAMES[2]), "{queue}");
    assert!(!body.contains("bob.eth"), "{body}");

    browser.finish(sandbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_must_forward_verify_and_a_chain_without_ens_is_probed_once() {
    let chain = LocalChain::start(None).await.expect("local chain starts");
    let proxy = RpcProxy::start(chain.rpc_url(), None).await;
    let client = ChainClient::new(chain.chain_id(), proxy.url.clone());
    let calls = |method: &str| {
        proxy
            .methods
            .lock()
            .unwrap()
            .iter()
            .filter(|m| *m == method)
            .count()
    };

    // No ENS yet: one eth_getCode, whatever is asked and however often.
    let no_ens = EnsNames::default();
    for i in 0..3 {
        assert_eq!(
            no_ens.lookup(&client, chain.address(i)).await.unwrap(),
            None
        );
    }
    for _ in 0..20 {
        assert_eq!(no_ens.name(&client, chain.address(4)), None);
    }
    assert_eq!(calls("eth_getCode"), 1);
    assert_eq!(calls("eth_call"), 0);

    let (alice, bob, carol) = (chain.address(0), chain.address(1), chain.address(2));
    chain
        .install_ens(&[
            (alice, "alice.eth", alice),
            (bob, "bob.eth", carol),
            (carol, "", Address::ZERO),
        ])
        .await
        .unwrap();
    assert!(
        !chain
            .provider()
            .get_code_at(ENS_REGISTRY)
            .await
            .unwrap()
            .is_empty()
    );
    let ens = EnsNames::default();
    assert_eq!(
        ens.lookup(&client, alice).await.unwrap().as_deref(),
        Some("alice.eth")
    );
    // Bob's reverse name is Carol's forward: not his.
    assert_eq!(ens.lookup(&client, bob).await.unwrap(), None);
    assert_eq!(ens.lookup(&client, carol).await.unwrap(), None);
    assert_eq!(ens.lookup(&client, chain.address(3)).await.unwrap(), None);
    // Cached: the page reads it without a call.
    let before = proxy.methods.lock().unwrap().len();
    assert_eq!(ens.name(&client, alice).as_deref(), Some("alice.eth"));
    assert_eq!(ens.name(&client, bob), None);
    assert_eq!(proxy.methods.lock().unwrap().len(), before);
}
