//! Issue 18, finding 6: the proposer key signs only what the bridge planned.
//! A stored proposal is posted again from its row, so a row written into the
//! database, or changed there and hashed again to look consistent, must
//! never reach the Safe Transaction Service: the bridge decodes it, finds it
//! is not its planned calls, fails it with the reason, and posts nothing.

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::Provider;
use approval_bridge::safe::{Call, Deployment, Operation, SafeTx, SafeVersion, encode_multi_send};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::TestApp;
use crate::safe_doubles::{OnPropose, one_planned_request};
use crate::safe_world::SafeWorld;

const CODE: &str = "PROPOSAL-UNVERIFIED";

fn attacker() -> Address {
    Address::repeat_byte(0xee)
}

/// `transferOwnership(attacker)` on `app`: a DstackApp given away.
fn give_away(app: Address) -> Call {
    let mut data = vec![0xf2, 0xfd, 0xe3, 0x8b];
    data.extend_from_slice(&[0u8; 12]);
    data.extend_from_slice(attacker().as_slice());
    Call {
        to: app,
        value: U256::ZERO,
        data: data.into(),
    }
}

fn multi_send_call_only() -> Address {
    SafeVersion::V1_4_1
        .multi_send_call_only(Deployment::Canonical)
        .unwrap()
}

fn batch(calls: &[Call], nonce: u64) -> SafeTx {
    SafeTx::new(
        multi_send_call_only(),
        U256::ZERO,
        encode_multi_send(calls),
        Operation::DelegateCall,
        nonce,
    )
}

fn hash_of(world: &SafeWorld, tx: &SafeTx) -> B256 {
    tx.hash(world.safe, 31337, SafeVersion::V1_4_1)
}

/// Writes `tx` into the database as an unsent proposal of the world's Safe,
/// its fields hashing to its safeTxHash, with `calls` as its planned calls.
async fn insert_forged(app: &TestApp, world: &SafeWorld, tx: &SafeTx, device: B256) -> Uuid {
    let id = Uuid::now_v7();
    let head = world.chain.provider().get_block_number().await.unwrap() as i64;
    sqlx::query(
        "INSERT INTO proposals (id, chain_id, safe, safe_version, nonce, safe_tx_hash, to_address, value,
            data, operation, status, proposer, next_attempt_at, created_at, updated_at, opened_at,
            proposed_block)
         VALUES ($1, 31337, $2, '1.4.1', $3, $4, $5, $6, $7, $8, 'proposed', $9,
            '2000-01-01T00:00:00Z', now(), now(), now(), $10)",
    )
    .bind(id)
    .bind(format!("{:#x}", world.safe))
    .bind(tx.nonce as i64)
    .bind(hash_of(world, tx).to_string())
    .bind(format!("{:#x}", tx.to))
    .bind(tx.value.to_string())
    .bind(tx.data.to_string())
    .bind(u8::from(tx.operation) as i16)
    .bind(format!("{:#x}", world.chain.address(0)))
    .bind(head)
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO proposal_calls (proposal_id, position, app_id, kind, value)
         VALUES ($1, 0, $2, 'device', $3)",
    )
    .bind(id)
    .bind(format!("{:#x}", world.app))
    .bind(device.to_string())
    .execute(&app.db)
    .await
    .unwrap();
    id
}

async fn proposal_row(app: &TestApp, id: Uuid) -> (String, Option<String>, Option<String>) {
    sqlx::query_as(
        "SELECT status, last_error_code, last_error_message FROM proposals WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_proposal_rows_are_refused_and_nothing_is_posted() {
    let world = SafeWorld::start().await;
    let app = world.spawn_bridge().await;
    let device = B256::repeat_byte(7);
    let register = Call::add_device(world.app, device);
    let forged = [
        // A DELEGATECALL to the attacker's contract runs it with the Safe's storage.
        (
            SafeTx::new(
                attacker(),
                U256::ZERO,
                encode_multi_send(std::slice::from_ref(&register)),
                Operation::DelegateCall,
                0,
            ),
            "DELEGATECALLs",
        ),
        // The app given away, hidden in a batch through the real MultiSendCallOnly,
        // in a row that serves no request.
        (
            batch(&[register.clone(), give_away(world.app)], 1),
            "not the app of any of the proposal's requests",
        ),
        // Ether out of the Safe.
        (
            SafeTx::new(
                attacker(),
                U256::from(10u64.pow(18)),
                Bytes::new(),
                Operation::Call,
                2,
            ),
            "wei",
        ),
    ];
    let mut ids = Vec::new();
    for (tx, _) in &forged {
        ids.push(insert_forged(&app, &world, tx, device).await);
    }

    app.drain().await;

    assert_eq!(world.service.proposal_posts_total(), 0, "nothing posted");
    assert_eq!(world.service.stored_transactions(), 0);
    for (id, (_, reason)) in ids.into_iter().zip(&forged) {
        let (status, code, message) = proposal_row(&app, id).await;
        assert_eq!(status, "failed");
        assert_eq!(code.as_deref(), Some(CODE));
        let message = message.unwrap_or_default();
        assert!(
            message.contains("refused to sign") && message.contains(reason),
            "{message} should say why ({reason})"
        );
    }
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("approval_bridge_proposals_refused_total")),
        "{metrics}"
    );
}

/// A planned request whose proposal is stored but not posted yet (the
/// service was down), then its row changed by `tamper` and hashed again:
/// nothing is posted, and the proposal and its request fail with the reason.
async fn tampered_proposal_is_refused(
    tamper: impl FnOnce(&SafeWorld, Vec<Call>, u64) -> SafeTx,
    reason: &str,
) {
    let world = SafeWorld::start().await;
    let (app, id) = one_planned_request(&world, OnPropose::UnavailableOnce).await;
    let (proposal, nonce): (Uuid, i64) = sqlx::query_as("SELECT id, nonce FROM proposals")
        .fetch_one(&app.db)
        .await
        .unwrap();
    let stored: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT app_id, kind, value FROM proposal_calls WHERE proposal_id = $1 ORDER BY position",
    )
    .bind(proposal)
    .fetch_all(&app.db)
    .await
    .unwrap();
    let planned: Vec<Call> = stored
        .iter()
        .map(|(app, kind, value)| {
            let (app, value) = (app.parse().unwrap(), value.parse().unwrap());
            match kind.as_str() {
                "device" => Call::add_device(app, value),
                _ => Call::add_compose_hash(app, value),
            }
        })
        .collect();
    assert!(!planned.is_empty());
    let forged = tamper(&world, planned, nonce as u64);
    let forged_hash = hash_of(&world, &forged);
    sqlx::query(
        "UPDATE proposals SET to_address = $2, data = $3, operation = $4, safe_tx_hash = $5 WHERE id = $1",
    )
    .bind(proposal)
    .bind(format!("{:#x}", forged.to))
    .bind(forged.data.to_string())
    .bind(u8::from(forged.operation) as i16)
    .bind(forged_hash.to_string())
    .execute(&app.db)
    .await
    .unwrap();

    // The planner posts stored proposals again after a failure.
    app.clock.advance(chrono::Duration::seconds(11));
    app.drain().await;

    assert_eq!(world.service.proposal_posts(forged_hash), 0);
    assert_eq!(world.service.proposal_posts_total(), 0, "nothing posted");
    let (status, code, message) = proposal_row(&app, proposal).await;
    assert_eq!(status, "failed");
    assert_eq!(code.as_deref(), Some(CODE));
    let message = message.unwrap_or_default();
    assert!(message.contains(reason), "{message} should say {reason}");
    let request: Value = app.get_replica(&id).await;
    assert_eq!(request["status"], "failed", "{request}");
    assert_eq!(request["last_error"]["code"], CODE, "{request}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_proposal_changed_to_give_the_app_away_is_refused() {
    tampered_proposal_is_refused(
        |world, mut planned, nonce| {
            planned.push(give_away(world.app));
            batch(&planned, nonce)
        },
        "not addComposeHash(bytes32) or addDevice(bytes32)",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_proposal_changed_to_register_another_device_is_refused() {
    tampered_proposal_is_refused(
        |world, mut planned, nonce| {
            // The same shape: only the device differs.
            planned[0] = Call::add_device(world.app, B256::repeat_byte(0x5a));
            batch(&planned, nonce)
        },
        "is not among the proposal's calls",
    )
    .await;
}
