//! The fake Safe Transaction Service against a real local chain: the
//! client's proposals pass, and every documented rule is enforced with the
//! real service's status and message shape.
//!
//! Needs the pinned npm packages (`npm ci`; `scripts/test` runs it).

use alloy::primitives::{Address, B256, Bytes, U256, address};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use approval_bridge::safe::{
    Call, DelegateRegistration, Deployment, Operation, Proposal, SafeService, SafeServiceError,
    SafeTx, SafeVersion, TxServiceClient, TxServiceOptions, build_safe_tx,
};
use approval_bridge::sandbox::LocalChain;
use approval_bridge::sandbox::safe_service::SafeServiceSim;
use reqwest::Url;
use serde_json::{Value, json};

const MULTI_SEND_1_4_1: Address = address!("38869bf66a61cF6bDB996A6aE40D5853Fd43B526");

/// A chain with a 2-of-3 Safe (dev accounts 0-2) that owns a DstackApp, and
/// the fake service reading that chain.
struct World {
    chain: LocalChain,
    safe: Address,
    app: Address,
    base: Url,
    sim: SafeServiceSim,
    client: TxServiceClient,
    http: reqwest::Client,
}

impl World {
    async fn start() -> World {
        let chain = LocalChain::start(None).await.expect("local chain starts");
        let owners = [chain.address(0), chain.address(1), chain.address(2)];
        let safe = chain
            .create_safe(&owners, 2, 7)
            .await
            .expect("Safe created");
        let app = chain
            .deploy_dstack_app(safe, false)
            .await
            .expect("app deployed");
        let (base, sim) = SafeServiceSim::spawn(chain.rpc_url())
            .await
            .expect("fake service starts");
        let mut options = TxServiceOptions::for_chain(chain.chain_id());
        options.base_url = Some(base.clone());
        options.requests_per_second = 1000.0;
        let client = TxServiceClient::new(&options).unwrap();
        World {
            chain,
            safe,
            app,
            base,
            sim,
            client,
            http: reqwest::Client::new(),
        }
    }

    fn batch(&self, nonce: u64) -> SafeTx {
        let calls = [
            Call::add_compose_hash(self.app, B256::repeat_byte(0x11)),
            Call::add_device(self.app, B256::repeat_byte(0x22)),
        ];
        build_safe_tx(&calls, SafeVersion::V1_4_1, Deployment::Canonical, nonce).unwrap()
    }

    fn sign(&self, tx: SafeTx, signer: &PrivateKeySigner) -> Proposal {
        Proposal::sign(
            tx,
            self.safe,
            self.chain.chain_id(),
            SafeVersion::V1_4_1,
            signer,
            None,
        )
        .unwrap()
    }

    fn propose_url(&self, safe: &str) -> Url {
        self.base
            .join(&format!("api/v2/safes/{safe}/multisig-transactions/"))
            .unwrap()
    }

    /// POSTs a raw body; returns the status and the body text.
    async fn post(&self, url: Url, body: &str) -> (u16, String) {
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn post_proposal(&self, body: &Value) -> (u16, String) {
        let url = self.propose_url(&self.safe.to_checksum(None));
        self.post(url, &body.to_string()).await
    }

    /// Executes `tx` on chain, signed by owners 0 and 1.
    async fn execute(&self, tx: &SafeTx) -> B256 {
        let signers = [self.chain.signer(0), self.chain.signer(1)];
        let receipt = self
            .chain
            .exec_safe_tx(self.safe, tx, &signers, &self.chain.signer(3))
            .await
            .expect("Safe tx executes");
        receipt.transaction_hash
    }
}

fn non_field_error(body: &str) -> String {
    let json: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    json["nonFieldErrors"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no nonFieldErrors: {body}"))
        .to_owned()
}

#[tokio::test]
async fn an_owner_proposal_is_accepted_with_an_empty_201_and_visible() {
    let w = World::start().await;
    let tx = w.batch(0);

    // Our EIP-712 hash equals the one the real Safe computes.
    let on_chain = w.chain.safe_tx_hash(w.safe, &tx).await.unwrap();
    let proposal = w.sign(tx, &w.chain.signer(0));
    assert_eq!(proposal.safe_tx_hash, on_chain);

    let (status, body) = w.post_proposal(&proposal.body()).await;
    assert_eq!((status, body.as_str()), (201, ""));

    let service: &dyn SafeService = &w.client;
    let seen = service
        .get_transaction(proposal.safe_tx_hash)
        .await
        .unwrap()
        .expect("the proposal is stored");
    assert_eq!(seen.nonce, 0);
    assert_eq!(seen.confirmations, vec![w.chain.address(0)]);
    assert_eq!(seen.confirmations_required, Some(2));
    assert!(seen.trusted && !seen.is_executed);
    assert_eq!(seen.transaction_hash, None);
    assert_eq!(service.list_pending(w.safe, 0).await.unwrap(), Some(0));
    assert_eq!(
        service.get_transaction(B256::repeat_byte(9)).await.unwrap(),
        None
    );

    // The raw v2 shape: nonce as a string, the proposer, the target.
    let raw: Value = w
        .http
        .get(
            w.base
                .join(&format!(
                    "api/v2/multisig-transactions/{}/",
                    proposal.safe_tx_hash
                ))
                .unwrap(),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw["nonce"], "0");
    assert_eq!(raw["safe"], w.safe.to_checksum(None));
    assert_eq!(raw["proposer"], w.chain.address(0).to_checksum(None));
    assert_eq!(raw["to"], "0x9641d764fc13c8B624c04430C7356C1C7C8102e2");
    assert_eq!(raw["operation"], 1);
}

#[tokio::test]
async fn a_repeated_post_is_idempotent_and_adds_only_new_confirmations() {
    let w = World::start().await;
    let first = w.sign(w.batch(0), &w.chain.signer(0));
    w.client.propose(w.safe, &first).await.unwrap();
    w.client.propose(w.safe, &first).await.unwrap();
    assert_eq!(w.sim.proposal_posts(first.safe_tx_hash), 2);
    assert_eq!(w.sim.stored_transactions(), 1);
    assert_eq!(w.sim.confirmations(first.safe_tx_hash).len(), 1);

    // The second owner proposing the same tx confirms it.
    let second = w.sign(w.batch(0), &w.chain.signer(1));
    assert_eq!(second.safe_tx_hash, first.safe_tx_hash);
    w.client.propose(w.safe, &second).await.unwrap();
    assert_eq!(w.sim.stored_transactions(), 1);
    let seen = w
        .client
        .get_transaction(first.safe_tx_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.confirmation_count(), 2);
}

#[tokio::test]
async fn every_rule_is_enforced_with_the_reference_shape() {
    let w = World::start().await;
    let owner = w.chain.signer(0);
    let good = w.sign(w.batch(0), &owner);

    // A lower-case Safe in the path.
    let lower = w.safe.to_string().to_lowercase();
    let (status, body) = w
        .post(w.propose_url(&lower), &good.body().to_string())
        .await;
    assert_eq!(status, 422);
    let json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json,
        json!({"code": 1, "message": "Checksum address validation failed", "arguments": [lower]})
    );

    // A lower-case address in the body.
    let mut body = good.body();
    let to = good.tx.to.to_string().to_lowercase();
    body["to"] = json!(to);
    let (status, text) = w.post_proposal(&body).await;
    assert_eq!(status, 422);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"to": [format!("Address {to} is not checksumed")]})
    );

    // Garbled and empty bodies.
    let (status, text) = w
        .post(w.propose_url(&w.safe.to_checksum(None)), "{nope")
        .await;
    assert_eq!(status, 400, "{text}");
    let (status, text) = w.post(w.propose_url(&w.safe.to_checksum(None)), "").await;
    assert_eq!(status, 422);
    assert!(text.contains("This field is required."));

    // A hash for another chain.
    let mut wrong = good.clone();
    wrong.safe_tx_hash = good.tx.hash(w.safe, 1, SafeVersion::V1_4_1);
    let (status, text) = w.post_proposal(&wrong.body()).await;
    assert_eq!(status, 422);
    assert_eq!(
        non_field_error(&text),
        format!(
            "Contract-transaction-hash={} does not match provided contract-tx-hash={}",
            good.safe_tx_hash, wrong.safe_tx_hash
        )
    );

    // DELEGATECALL to MultiSend (not MultiSendCallOnly).
    let mut tx = w.batch(0);
    tx.to = MULTI_SEND_1_4_1;
    let (status, text) = w.post_proposal(&w.sign(tx, &owner).body()).await;
    assert_eq!(status, 422);
    assert_eq!(
        non_field_error(&text),
        "Operation DELEGATE_CALL is not allowed"
    );

    // A sender who is neither owner nor delegate.
    let stranger = PrivateKeySigner::random();
    let (status, text) = w.post_proposal(&w.sign(w.batch(0), &stranger).body()).await;
    assert_eq!(status, 422);
    assert!(
        non_field_error(&text).starts_with(&format!(
            "Sender={} is not an owner or delegate. Current owners=[",
            stranger.address().to_checksum(None)
        )),
        "{text}"
    );

    // An owner as sender with another owner's signature.
    let mut mismatched = w.sign(w.batch(0), &w.chain.signer(1));
    mismatched.sender = owner.address();
    let (status, text) = w.post_proposal(&mismatched.body()).await;
    assert_eq!(status, 422);
    assert!(non_field_error(&text).starts_with("Signature does not match sender="));

    // None of the rejections stored anything, though each POST that named
    // the hash was counted (the bad path, other hashes and bad bodies did not).
    assert_eq!(w.sim.stored_transactions(), 0);
    assert_eq!(w.sim.proposal_posts(good.safe_tx_hash), 3);

    // A nonce the Safe has used: execute nonce 0, then propose at 0 again.
    let executed_in = w.execute(&good.tx).await;
    let (status, text) = w.post_proposal(&good.body()).await;
    assert_eq!(status, 422);
    assert_eq!(
        non_field_error(&text),
        format!(
            "Tx with safe-tx-hash={} was already executed in tx-hash={executed_in}",
            good.safe_tx_hash
        )
    );
    let other = SafeTx::new(
        w.app,
        U256::ZERO,
        Call::add_device(w.app, B256::repeat_byte(0x33)).data,
        Operation::Call,
        0,
    );
    let (status, text) = w.post_proposal(&w.sign(other, &owner).body()).await;
    assert_eq!(status, 422);
    assert_eq!(
        non_field_error(&text),
        format!(
            "Tx with nonce=0 for safe={} already executed in tx-hash={executed_in}",
            w.safe.to_checksum(None)
        )
    );

    // The client keeps the body verbatim and calls it permanent.
    let err = w.client.propose(w.safe, &good).await.unwrap_err();
    assert!(!err.is_transient());
    match err {
        SafeServiceError::Rejected { body } => assert!(body.contains("already executed")),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn execution_shows_in_reads_and_pending_moves_on() {
    let w = World::start().await;
    let proposal = w.sign(w.batch(0), &w.chain.signer(0));
    w.client.propose(w.safe, &proposal).await.unwrap();
    let next = w.sign(w.batch(1), &w.chain.signer(0));
    w.client.propose(w.safe, &next).await.unwrap();
    assert_eq!(w.client.list_pending(w.safe, 0).await.unwrap(), Some(1));

    let executed_in = w.execute(&proposal.tx).await;
    let seen = w
        .client
        .get_transaction(proposal.safe_tx_hash)
        .await
        .unwrap()
        .unwrap();
    assert!(seen.is_executed);
    assert_eq!(seen.is_successful, Some(true));
    assert_eq!(seen.transaction_hash, Some(executed_in));
    // Only nonce 1 is still pending.
    assert_eq!(w.client.list_pending(w.safe, 0).await.unwrap(), Some(1));
    assert_eq!(w.client.list_pending(w.safe, 2).await.unwrap(), None);
}

#[tokio::test]
async fn delegates_and_confirmations_follow_the_owner_rules() {
    let w = World::start().await;
    let owner = w.chain.signer(2);
    let delegate = w.chain.signer(5);
    let now = chrono::Utc::now().timestamp() as u64;

    // A registration signed by someone else is refused with 400.
    let mut forged =
        DelegateRegistration::sign(&delegate, delegate.address(), None, "bridge", 31337, now)
            .unwrap();
    forged.delegator = owner.address();
    match w.client.register_delegate(&forged).await {
        Err(SafeServiceError::Rejected { body }) => assert!(body.contains("nonFieldErrors")),
        other => panic!("expected a rejection, got {other:?}"),
    }
    // Before registration the delegate cannot propose.
    let early = w.sign(w.batch(0), &delegate);
    assert!(matches!(
        w.client.propose(w.safe, &early).await,
        Err(SafeServiceError::Rejected { .. })
    ));

    let registration = DelegateRegistration::sign(
        &owner,
        delegate.address(),
        None,
        "bridge",
        w.chain.chain_id(),
        now,
    )
    .unwrap();
    w.client.register_delegate(&registration).await.unwrap();
    let listed: Value = w
        .http
        .get(
            w.base
                .join(&format!(
                    "api/v2/delegates/?delegator={}",
                    owner.address().to_checksum(None)
                ))
                .unwrap(),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["count"], 1);
    assert_eq!(
        listed["results"][0]["delegate"],
        delegate.address().to_checksum(None)
    );

    // The delegate's proposal is stored for its delegator, unconfirmed.
    let proposal = w.sign(w.batch(0), &delegate);
    w.client.propose(w.safe, &proposal).await.unwrap();
    let seen = w
        .client
        .get_transaction(proposal.safe_tx_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.confirmation_count(), 0);
    assert!(seen.trusted);

    // Owners confirm through the v1 endpoint; a stranger cannot.
    let confirm_url = w
        .base
        .join(&format!(
            "api/v1/multisig-transactions/{}/confirmations/",
            proposal.safe_tx_hash
        ))
        .unwrap();
    let signature = |signer: &PrivateKeySigner| {
        let sig = approval_bridge::safe::sign_safe_tx_hash(signer, proposal.safe_tx_hash).unwrap();
        json!({ "signature": Bytes::copy_from_slice(&sig).to_string() }).to_string()
    };
    let (status, _) = w.post(confirm_url.clone(), &signature(&owner)).await;
    assert_eq!(status, 201);
    let (status, text) = w
        .post(confirm_url.clone(), &signature(&PrivateKeySigner::random()))
        .await;
    // The real view validates in the `signature` field, so the error is that field's.
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert!(
        body["signature"][0]
            .as_str()
            .is_some_and(|m| m.contains("is not an owner")),
        "{text}"
    );
    assert_eq!(
        w.sim.confirmations(proposal.safe_tx_hash),
        vec![owner.address()]
    );
}

impl World {
    /// GETs `path` (from the service root) without following redirects.
    async fn get(&self, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let response = client
            .get(self.base.join(path).unwrap())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, headers, response.text().await.unwrap())
    }

    async fn get_json(&self, path: &str) -> Value {
        let (status, _, body) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

#[tokio::test]
async fn the_v1_reads_serve_transactions_lists_safe_info_and_about_with_every_field() {
    use approval_bridge::sandbox::chain::v1_4_1;
    let w = World::start().await;
    let safe = w.safe.to_checksum(None);
    let first = w.sign(w.batch(0), &w.chain.signer(0));
    w.client.propose(w.safe, &first).await.unwrap();
    let second = w.sign(w.batch(1), &w.chain.signer(1));
    w.client.propose(w.safe, &second).await.unwrap();
    let executed_in = w.execute(&first.tx).await;

    // What `cast safe` asks for: the newest pending proposal, v1 numbers.
    let pending = w
        .get_json(&format!(
            "api/v1/safes/{safe}/multisig-transactions/?executed=false&ordering=-nonce&limit=1"
        ))
        .await;
    assert_eq!(pending["count"], 1);
    assert_eq!(pending["countUniqueNonce"], 2);
    assert_eq!(pending["results"][0]["nonce"], 1);
    assert_eq!(pending["results"][0]["safeTxGas"], 0);
    assert_eq!(pending["results"][0]["isExecuted"], false);

    // The executed one, by hash, in both versions.
    let hash = first.safe_tx_hash;
    let v1 = w
        .get_json(&format!("api/v1/multisig-transactions/{hash}/"))
        .await;
    let v2 = w
        .get_json(&format!("api/v2/multisig-transactions/{hash}/"))
        .await;
    assert_eq!(
        (v1["nonce"].clone(), v2["nonce"].clone()),
        (json!(0), json!("0"))
    );
    assert_eq!(v1["baseGas"], 0);
    assert_eq!(v2["baseGas"], "0");
    let receipt = w
        .chain
        .provider()
        .get_transaction_receipt(executed_in)
        .await
        .unwrap()
        .unwrap();
    for tx in [&v1, &v2] {
        assert_eq!(tx["isExecuted"], true);
        assert_eq!(tx["transactionHash"], executed_in.to_string());
        assert_eq!(tx["blockNumber"], receipt.block_number.unwrap());
        assert_eq!(tx["executor"], w.chain.address(3).to_checksum(None));
        assert_eq!(tx["gasUsed"], receipt.gas_used);
        assert_eq!(tx["ethGasPrice"], receipt.effective_gas_price.to_string());
        assert!(tx["maxFeePerGas"].is_string() && tx["maxPriorityFeePerGas"].is_string());
        assert_eq!(tx["payment"], "0");
        assert!(tx["executionDate"].as_str().unwrap().ends_with('Z'));
        // Both owners' signatures, as executed (sorted by owner).
        assert_eq!(tx["signatures"].as_str().unwrap().len(), 2 + 4 * 65);
        assert_eq!(tx["origin"], "{}");
        // The batch, decoded: MultiSendCallOnly is trusted for DELEGATECALL.
        assert_eq!(tx["dataDecoded"]["method"], "multiSend");
        let calls = tx["dataDecoded"]["parameters"][0]["valueDecoded"]
            .as_array()
            .unwrap();
        let methods: Vec<&Value> = calls.iter().map(|c| &c["dataDecoded"]["method"]).collect();
        assert_eq!(methods, [&json!("addComposeHash"), &json!("addDevice")]);
    }

    // A list pages with DRF's limit/offset links.
    let page = w
        .get_json(&format!(
            "api/v2/safes/{safe}/multisig-transactions/?limit=1"
        ))
        .await;
    assert_eq!(page["count"], 2);
    assert_eq!(page["results"][0]["nonce"], "1", "newest first");
    let next = page["next"].as_str().unwrap();
    assert!(next.ends_with("limit=1&offset=1"), "{next}");
    let rest: Value = w.http.get(next).send().await.unwrap().json().await.unwrap();
    assert_eq!(rest["results"][0]["nonce"], "0");
    assert!(rest["previous"].is_string() && rest["next"].is_null());

    // The Safe, live from the chain; a non-Safe is a bare 404.
    let info = w.get_json(&format!("api/v1/safes/{safe}/")).await;
    assert_eq!(info["address"], safe);
    assert_eq!(info["nonce"], "1");
    assert_eq!(info["threshold"], 2);
    assert_eq!(info["version"], "1.4.1");
    assert_eq!(info["masterCopy"], v1_4_1::SAFE_L2.to_checksum(None));
    assert_eq!(
        info["fallbackHandler"],
        v1_4_1::COMPATIBILITY_FALLBACK_HANDLER.to_checksum(None)
    );
    assert_eq!(info["guard"], Address::ZERO.to_checksum(None));
    assert_eq!(info["moduleGuard"], Address::ZERO.to_checksum(None));
    assert_eq!(info["modules"], json!([]));
    let owners: Vec<String> = (0..3)
        .map(|i| w.chain.address(i).to_checksum(None))
        .collect();
    assert_eq!(info["owners"], json!(owners));
    let (status, _, body) = w
        .get(&format!("api/v1/safes/{}/", w.app.to_checksum(None)))
        .await;
    assert_eq!((status, body.as_str()), (404, ""));
    let (status, _, body) = w
        .get(&format!("api/v1/safes/{}/", safe.to_lowercase()))
        .await;
    assert_eq!(status, 422);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["code"], 1);

    // `about`, and Django's APPEND_SLASH redirect that api-kit relies on.
    let about = w.get_json("api/v1/about/").await;
    assert_eq!(about["name"], "Safe Transaction Service");
    assert!(about["settings"]["ETHEREUM_NODE_URL"].is_string());
    let (status, headers, _) = w.get("api/v1/about?x=1").await;
    assert_eq!(status, 301);
    assert_eq!(headers["location"], "/api/v1/about/?x=1");

    // The confirmations of the pending proposal.
    let confirmations = w
        .get_json(&format!(
            "api/v1/multisig-transactions/{}/confirmations/",
            second.safe_tx_hash
        ))
        .await;
    assert_eq!(confirmations["count"], 1);
    assert_eq!(
        confirmations["results"][0]["owner"],
        w.chain.address(1).to_checksum(None)
    );
    assert_eq!(confirmations["results"][0]["signatureType"], "EOA");
}
