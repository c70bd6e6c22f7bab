//! The local chain world: real Safe 1.4.1 contracts at their canonical
//! addresses on anvil, the DstackApp stand-ins and Multicall3.
//!
//! Needs the pinned npm packages (`npm ci`; `scripts/test` runs it).

use std::time::Instant;

use alloy::primitives::{Address, B256, U256, b256};
use alloy::providers::Provider;
use alloy::sol_types::{SolCall, SolEvent};
use approval_bridge::safe::{Call, ISafe, Operation, encode_multi_send};
use approval_bridge::sandbox::LocalChain;
use approval_bridge::sandbox::chain::{
    IDstackApp, IMultiSend, IMulticall3, MULTICALL3, SAFE_SINGLETON_FACTORY, v1_4_1,
};

const COMPOSE_HASH: B256 =
    b256!("1111111111111111111111111111111111111111111111111111111111111111");
const DEVICE_ID: B256 = b256!("2222222222222222222222222222222222222222222222222222222222222222");

async fn start_chain() -> LocalChain {
    let started = Instant::now();
    let chain = LocalChain::start(None).await.expect("local chain starts");
    eprintln!("local chain ready in {:?}", started.elapsed());
    chain
}

/// A 2-of-3 Safe over dev accounts 0, 1 and 2.
async fn two_of_three_safe(chain: &LocalChain) -> Address {
    let owners = [chain.address(0), chain.address(1), chain.address(2)];
    chain
        .create_safe(&owners, 2, 42)
        .await
        .expect("Safe created")
}

#[tokio::test]
async fn safe_contracts_are_at_their_canonical_addresses() {
    let chain = start_chain().await;
    let provider = chain.provider();
    assert_eq!(provider.get_chain_id().await.unwrap(), chain.chain_id());
    for address in [
        v1_4_1::SAFE_L2,
        v1_4_1::SAFE,
        v1_4_1::SAFE_PROXY_FACTORY,
        v1_4_1::MULTI_SEND,
        v1_4_1::MULTI_SEND_CALL_ONLY,
        v1_4_1::COMPATIBILITY_FALLBACK_HANDLER,
        SAFE_SINGLETON_FACTORY,
        MULTICALL3,
    ] {
        let code = provider.get_code_at(address).await.unwrap();
        assert!(!code.is_empty(), "no code at {address}");
    }
    for address in [v1_4_1::SAFE_L2, v1_4_1::SAFE] {
        let version = ISafe::new(address, provider)
            .VERSION()
            .call()
            .await
            .unwrap();
        assert_eq!(version, "1.4.1");
    }
}

#[tokio::test]
async fn two_of_three_safe_reports_its_owners_threshold_nonce_and_version() {
    let chain = start_chain().await;
    let safe_address = two_of_three_safe(&chain).await;
    let safe = ISafe::new(safe_address, chain.provider());

    let owners = safe.getOwners().call().await.unwrap();
    let mut expected = vec![chain.address(0), chain.address(1), chain.address(2)];
    let mut sorted = owners.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected);
    assert_eq!(safe.getThreshold().call().await.unwrap(), U256::from(2));
    assert_eq!(safe.nonce().call().await.unwrap(), U256::ZERO);
    assert_eq!(safe.VERSION().call().await.unwrap(), "1.4.1");
}

#[tokio::test]
async fn safe_owned_one_step_app_takes_a_multisend_batch_from_two_of_three_owners() {
    let chain = start_chain().await;
    let safe_address = two_of_three_safe(&chain).await;
    let app_address = chain
        .deploy_dstack_app(chain.address(0), false)
        .await
        .unwrap();
    let app = IDstackApp::new(app_address, chain.provider());

    // One-step ownership: there is no pendingOwner(), so the call reverts
    // with empty data; this revert is how the service recognises the model.
    let err = app
        .pendingOwner()
        .call()
        .await
        .expect_err("pendingOwner() reverts");
    assert!(
        err.as_revert_data().is_some_and(|data| data.is_empty()),
        "{err}"
    );
    chain
        .transfer_app_to_safe(
            app_address,
            &chain.signer(0),
            safe_address,
            &[],
            &chain.signer(3),
        )
        .await
        .unwrap();
    assert_eq!(app.owner().call().await.unwrap(), safe_address);

    // The former owner is now an outsider.
    let err = app
        .addDevice(DEVICE_ID)
        .from(chain.address(0))
        .send()
        .await
        .expect_err("a direct addDevice from the old owner reverts");
    let decoded = err
        .as_decoded_error::<IDstackApp::OwnableUnauthorizedAccount>()
        .expect("reverts with OwnableUnauthorizedAccount");
    assert_eq!(decoded.account, chain.address(0));

    // Two owners sign one batch; a non-owner pays for its execution.
    let calls = [
        Call::add_device(app_address, DEVICE_ID),
        Call::add_compose_hash(app_address, COMPOSE_HASH),
    ];
    // Packed per safe.md §5: each call is op(1) ‖ to(20) ‖ value(32) ‖ len(32) ‖ data(36).
    let multi_send = encode_multi_send(&calls);
    let packed = IMultiSend::multiSendCall::abi_decode(&multi_send)
        .unwrap()
        .transactions;
    assert_eq!(packed.len(), 2 * (1 + 20 + 32 + 32 + 36));
    assert_eq!(packed[0], 0, "inner calls are plain CALLs");
    assert_eq!(&packed[1..21], app_address.as_slice());
    let batch = chain.next_safe_tx(safe_address, &calls).await.unwrap();
    assert_eq!(batch.to, v1_4_1::MULTI_SEND_CALL_ONLY);
    assert_eq!(batch.operation, Operation::DelegateCall);
    assert_eq!(batch.data, multi_send);
    let receipt = chain
        .exec_safe_tx(
            safe_address,
            &batch,
            &[chain.signer(1), chain.signer(0)],
            &chain.signer(3),
        )
        .await
        .unwrap();
    assert_eq!(receipt.from, chain.address(3));

    assert!(app.allowedDeviceIds(DEVICE_ID).call().await.unwrap());
    assert!(app.allowedComposeHashes(COMPOSE_HASH).call().await.unwrap());
    let app_logs: Vec<_> = receipt
        .logs()
        .iter()
        .filter(|log| log.address() == app_address)
        .collect();
    assert_eq!(app_logs.len(), 2);
    let device = app_logs[0].log_decode::<IDstackApp::DeviceAdded>().unwrap();
    assert_eq!(device.inner.data.deviceId, DEVICE_ID);
    let compose = app_logs[1]
        .log_decode::<IDstackApp::ComposeHashAdded>()
        .unwrap();
    assert_eq!(compose.inner.data.composeHash, COMPOSE_HASH);
    assert_eq!(
        app_logs[1].topic0(),
        Some(&IDstackApp::ComposeHashAdded::SIGNATURE_HASH)
    );

    let safe = ISafe::new(safe_address, chain.provider());
    assert_eq!(safe.nonce().call().await.unwrap(), U256::from(1));
}

#[tokio::test]
async fn two_step_app_belongs_to_the_safe_once_the_safe_accepts() {
    let chain = start_chain().await;
    let safe_address = two_of_three_safe(&chain).await;
    let app_address = chain
        .deploy_dstack_app(chain.address(0), true)
        .await
        .unwrap();
    let app = IDstackApp::new(app_address, chain.provider());
    assert_eq!(app.pendingOwner().call().await.unwrap(), Address::ZERO);

    // transferOwnership alone only stages the Safe.
    chain
        .transfer_ownership(app_address, &chain.signer(0), safe_address)
        .await
        .unwrap();
    assert_eq!(app.owner().call().await.unwrap(), chain.address(0));
    assert_eq!(app.pendingOwner().call().await.unwrap(), safe_address);

    chain
        .transfer_app_to_safe(
            app_address,
            &chain.signer(0),
            safe_address,
            &[chain.signer(0), chain.signer(2)],
            &chain.signer(3),
        )
        .await
        .unwrap();
    assert_eq!(app.owner().call().await.unwrap(), safe_address);
    assert_eq!(app.pendingOwner().call().await.unwrap(), Address::ZERO);
}

#[tokio::test]
async fn multicall3_returns_several_views_in_one_call() {
    let chain = start_chain().await;
    let owner = chain.address(0);
    let app_address = chain.deploy_dstack_app(owner, false).await.unwrap();
    let app = IDstackApp::new(app_address, chain.provider());
    app.addComposeHash(COMPOSE_HASH)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();

    let view = |call_data: Vec<u8>, allow_failure: bool| IMulticall3::Call3 {
        target: app_address,
        allowFailure: allow_failure,
        callData: call_data.into(),
    };
    let calls = vec![
        view(IDstackApp::ownerCall {}.abi_encode(), false),
        view(IDstackApp::allowAnyDeviceCall {}.abi_encode(), false),
        view(
            IDstackApp::allowedComposeHashesCall {
                composeHash: COMPOSE_HASH,
            }
            .abi_encode(),
            false,
        ),
        view(
            IDstackApp::allowedDeviceIdsCall {
                deviceId: DEVICE_ID,
            }
            .abi_encode(),
            false,
        ),
        // Reverts on a one-step app; allowed to fail, so the batch still answers.
        view(IDstackApp::pendingOwnerCall {}.abi_encode(), true),
    ];
    let results = IMulticall3::new(MULTICALL3, chain.provider())
        .aggregate3(calls)
        .call()
        .await
        .unwrap();

    assert_eq!(results.len(), 5);
    assert!(results[..4].iter().all(|result| result.success));
    let returned = |i: usize| &results[i].returnData;
    assert_eq!(
        IDstackApp::ownerCall::abi_decode_returns(returned(0)).unwrap(),
        owner
    );
    assert!(!IDstackApp::allowAnyDeviceCall::abi_decode_returns(returned(1)).unwrap());
    assert!(IDstackApp::allowedComposeHashesCall::abi_decode_returns(returned(2)).unwrap());
    assert!(!IDstackApp::allowedDeviceIdsCall::abi_decode_returns(returned(3)).unwrap());
    assert!(!results[4].success);
}

#[tokio::test]
async fn interval_mining_still_confirms_safe_transactions() {
    let chain = LocalChain::start(Some(1))
        .await
        .expect("local chain starts");
    let safe_address = two_of_three_safe(&chain).await;
    let app_address = chain.deploy_dstack_app(safe_address, false).await.unwrap();
    let add = Call::add_compose_hash(app_address, COMPOSE_HASH);
    chain
        .exec_calls(
            safe_address,
            &[add],
            &[chain.signer(2), chain.signer(1)],
            &chain.signer(4),
        )
        .await
        .unwrap();
    let app = IDstackApp::new(app_address, chain.provider());
    assert!(app.allowedComposeHashes(COMPOSE_HASH).call().await.unwrap());
}
