//! An on-chain KMS for wiremock tests: a key that signs env keys as dstack's
//! KMS does, Phala's `GET /kms/base/pubkey/{app}` answering with a signed
//! key, and a JSON-RPC endpoint for Base whose DstackKms registers a root key.

use alloy::primitives::{Address, Bytes};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolValue;
use approval_bridge::config::{KmsContracts, RpcUrls, Settings};
use approval_bridge::domain::AppId;
use approval_bridge::phala::verify::env_key_message_hash;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};
use x25519_dalek::{PublicKey, StaticSecret};

use super::phala_mock::{api, app_id};

/// Base, whose DstackKms address the bridge knows without configuration.
pub const BASE: u64 = 8453;

pub struct MockKms {
    /// The KMS root key: it signs env keys.
    pub signer: PrivateKeySigner,
    /// The X25519 secret whose public key Phala hands out for the app.
    pub env_secret: StaticSecret,
    /// JSON-RPC for Base.
    pub rpc: MockServer,
}

impl MockKms {
    /// A KMS whose DstackKms on Base registers `registered_root` (the
    /// signer's own key unless a test says otherwise).
    pub async fn start(registered_root: Option<Vec<u8>>) -> MockKms {
        let signer = PrivateKeySigner::random();
        let root = registered_root.unwrap_or_else(|| compressed(&signer));
        let kms = KmsContracts::default().get(BASE).expect("Base is built in");
        let rpc = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(move |request: &wiremock::Request| {
                let call: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                ResponseTemplate::new(200).set_body_json(answer(&call, kms, &root))
            })
            .mount(&rpc)
            .await;
        MockKms {
            signer,
            env_secret: StaticSecret::random_from_rng(rand::rngs::OsRng),
            rpc,
        }
    }

    /// The app's env public key, bare hex.
    pub fn env_public_hex(&self) -> String {
        hex::encode(PublicKey::from(&self.env_secret).as_bytes())
    }

    /// `GET /kms/base/pubkey/{app}` answering with the env key, signed by `signer`.
    pub async fn mount_env_key(&self, phala: &MockServer, signer: &PrivateKeySigner) {
        self.mount_env_key_for(phala, &app_id(), signer).await;
    }

    /// The same for the app `app` (40 hex digits).
    pub async fn mount_env_key_for(
        &self,
        phala: &MockServer,
        app: &str,
        signer: &PrivateKeySigner,
    ) {
        let parsed: AppId = app.parse().unwrap();
        let public = PublicKey::from(&self.env_secret);
        let hash = env_key_message_hash(&parsed, public.as_bytes());
        let mut rsv = signer.sign_hash_sync(&hash).unwrap().as_bytes();
        rsv[64] -= 27; // dstack's KMS writes v as 0 or 1
        Mock::given(method("GET"))
            .and(path(api(&format!("/kms/base/pubkey/{app}"))))
            .respond_with(ResponseTemplate::new(200).set_body_json(
                json!({"public_key": self.env_public_hex(), "signature": hex::encode(rsv)}),
            ))
            .mount(phala)
            .await;
    }

    /// Points the bridge's RPC for Base at this mock.
    pub fn configure(&self) -> impl FnOnce(&mut Settings) + use<> {
        let url = self.rpc.uri().parse().unwrap();
        move |s| s.safe.rpc_urls = RpcUrls(vec![(BASE, url)])
    }
}

/// `GET /kms/base/pubkey/{app}` answering `body` as it is.
pub async fn mount_env_key_answer(phala: &MockServer, body: Value) {
    Mock::given(method("GET"))
        .and(path(api(&format!("/kms/base/pubkey/{}", app_id()))))
        .respond_with(ResponseTemplate::new(200).set_body_json(body))
        .mount(phala)
        .await;
}

pub fn compressed(signer: &PrivateKeySigner) -> Vec<u8> {
    signer
        .credential()
        .verifying_key()
        .to_encoded_point(true)
        .as_bytes()
        .to_vec()
}

/// One JSON-RPC answer: `eth_chainId`, and `kmsInfo()` at the KMS address.
fn answer(call: &Value, kms: Address, root: &[u8]) -> Value {
    let id = call["id"].clone();
    let result = match call["method"].as_str() {
        Some("eth_chainId") => json!(format!("0x{BASE:x}")),
        Some("eth_call") => {
            let to: Option<Address> = call["params"][0]["to"]
                .as_str()
                .and_then(|t| t.parse().ok());
            if to == Some(kms) {
                let info = (
                    Bytes::from(root.to_vec()),
                    Bytes::new(),
                    Bytes::new(),
                    Bytes::new(),
                );
                json!(format!("0x{}", hex::encode(info.abi_encode_params())))
            } else {
                json!("0x")
            }
        }
        _ => {
            return json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32601, "message": "method not found"}});
        }
    };
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}
