//! The signers' view of a proposal (`GET /api/v1/proposals`, `…/{id}` and
//! the replica's `proposal`), driven through the sandbox's public HTTP
//! interface: owners confirm at the sandbox's Safe Transaction Service, as
//! in Safe{Wallet}, and execute on anvil.

use alloy::primitives::Address;
use serde_json::{Value, json};

use crate::front::Front;
use crate::helpers::{API_TOKEN, error_of, spawn_app};

fn owner(front: &Front, i: usize) -> String {
    front.sandbox.owners[i].to_checksum(None)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_who_confirmed_and_owners_still_to_sign_stay_current_through_execution() {
    let front = Front::start(false).await;
    let id = front
        .queue(json!({"source": "web-prod", "node": "prod-2", "note": "launch"}))
        .await;
    let waiting = front.wait_for(&id, "awaiting_approval").await;
    let proposal_id = waiting["proposal"]["id"].as_str().unwrap().to_owned();
    let hash = waiting["proposal"]["safe_tx_hash"]
        .as_str()
        .unwrap()
        .to_owned();

    // The open proposals list it, with the request it serves and who queued it.
    let open = front.get_json("/api/v1/proposals").await;
    let listed = open["proposals"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{open}");
    let view = &listed[0];
    assert_eq!(view["safe_tx_hash"], hash.as_str());
    assert_eq!(view["safe"], front.sandbox.safe.to_checksum(None));
    assert_eq!(view["threshold"], 2);
    assert_eq!(view["confirmations"], 0);
    // Accounts 0..2, then the Safe that is an owner too.
    let owners: Vec<String> = (0..4).map(|i| owner(&front, i)).collect();
    assert_eq!(
        owners[3],
        front.sandbox.safe_owner.address.to_checksum(None)
    );
    assert_eq!(strings(&view["owners"]), owners);
    assert_eq!(strings(&view["owners_to_sign"]), owners);
    assert_eq!(view["requests"][0]["id"], id.as_str());
    assert_eq!(view["requests"][0]["created_by"], waiting["created_by"]);

    // The call in human terms: the node and its region, the app and its CVMs,
    // the request it unblocks.
    let call = &view["calls"][0];
    assert_eq!(call["function"], "addDevice", "{call}");
    assert_eq!(call["node"]["name"], "prod-2", "{call}");
    assert_eq!(call["node"]["region"], "sandbox-1", "{call}");
    assert_eq!(call["app_name"], "web-prod", "{call}");
    assert!(
        call["app_cvms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "web-prod"),
        "{call}"
    );
    assert_eq!(call["unblocks"][0]["id"], id.as_str(), "{call}");
    let description = call["description"].as_str().unwrap();
    assert!(
        description.starts_with("Allow node prod-2 (region sandbox-1) to run app web-prod"),
        "{description}"
    );

    // One owner confirms in the Transaction Service: the bridge shows who,
    // and who is still to sign, within seconds.
    front.control(&hash, "sign", json!({"owner": 0})).await;
    let one = front
        .proposal_until(&proposal_id, "the first confirmation", |p| {
            p["confirmations"] == 1
        })
        .await;
    assert_eq!(strings(&one["confirmed_by"]), vec![owner(&front, 0)]);
    assert_eq!(
        strings(&one["owners_to_sign"]),
        vec![owner(&front, 1), owner(&front, 2), owner(&front, 3)]
    );
    assert_eq!(one["signatures_needed"], 1);
    assert!(
        one["summary"]
            .as_str()
            .unwrap()
            .starts_with("1 of 2 confirmations; waiting for one of"),
        "{one}"
    );

    // The second owner confirms and the Safe executes at once, before the
    // bridge reads again: the final tally still shows both.
    front.control(&hash, "sign", json!({"owner": 1})).await;
    front.control(&hash, "execute", json!({})).await;
    let done = front.wait_for(&id, "done").await;
    let executed = front
        .proposal_until(&proposal_id, "the final tally", |p| p["confirmations"] == 2)
        .await;
    assert_eq!(executed["status"], "executed");
    assert_eq!(
        strings(&executed["confirmed_by"]),
        vec![owner(&front, 0), owner(&front, 1)]
    );
    assert!(strings(&executed["owners_to_sign"]).is_empty());
    assert!(executed["execution_tx_hash"].is_string(), "{executed}");
    let replica = front.get_json(&format!("/api/v1/replicas/{id}")).await;
    assert_eq!(replica["proposal"]["confirmations"], 2, "{done}");
    assert_eq!(
        replica["proposal"]["execution_tx_hash"],
        executed["execution_tx_hash"]
    );

    // No longer open; still listed under its status, and by its hash.
    let open = front.get_json("/api/v1/proposals").await;
    assert!(open["proposals"].as_array().unwrap().is_empty(), "{open}");
    let executed_list = front.get_json("/api/v1/proposals?status=executed").await;
    assert_eq!(executed_list["proposals"][0]["id"], proposal_id.as_str());
    let by_hash = front.get_json(&format!("/api/v1/proposals/{hash}")).await;
    assert_eq!(by_hash["id"], proposal_id.as_str());
    let _: Address = by_hash["safe"].as_str().unwrap().parse().unwrap();
}

#[tokio::test]
async fn proposal_endpoints_refuse_bad_input_and_unknown_ids_with_json_errors() {
    let app = spawn_app().await;
    let cases = [
        ("/api/v1/proposals?status=pending", 400, "invalid_status"),
        ("/api/v1/proposals?limit=0", 400, "invalid_limit"),
        ("/api/v1/proposals?colour=red", 400, "invalid_query"),
        ("/api/v1/proposals/not-an-id", 400, "invalid_id"),
        (
            "/api/v1/proposals/00000000-0000-0000-0000-000000000000",
            404,
            "not_found",
        ),
    ];
    for (path, status, code) in cases {
        let response = app
            .http
            .get(format!("{}{path}", app.address))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        let (got, _) = error_of(response, status).await;
        assert_eq!(got, code, "{path}");
    }
    let open: Value = app
        .http
        .get(format!("{}/api/v1/proposals", app.address))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(open, json!({"proposals": []}));
    let unauthenticated = app
        .http
        .get(format!("{}/api/v1/proposals", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
}
