//! Checks on Phala's answers before the bridge acts on them.
//!
//! - [`check_prepared`]: the 465 of a prepare must name the app, device and
//!   compose hash the bridge resolved itself at intake.
//! - [`EnvKeyVerifier`]: an on-chain KMS app's env encryption key must be
//!   signed by the KMS root key that the chain's DstackKms contract registers
//!   (`kmsInfo().k256Pubkey`), as phala-cloud-api.md §10 describes.

use alloy::primitives::{Address, B256, Signature, keccak256};
use alloy::signers::k256::ecdsa::VerifyingKey;

use super::{EnvKey, EnvKeyIssuer, PreparedReplica};
use crate::chain::Chains;
use crate::config::{KmsContracts, TrustSettings};
use crate::domain::{AppId, Bytes32};

// ---------------------------------------------------------------------------
// The prepare's 465

/// What the bridge resolved before the prepare, from its own reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpectedReplica {
    /// The source CVM's app id.
    pub app_id: Option<AppId>,
    /// The target node's device from `GET /teepods/available`; `None` when
    /// no node was asked for (Phala schedules) or the node listed none.
    pub device_id: Option<Bytes32>,
    /// The compose hash the caller asked for, or the source's own as intake
    /// found it when the caller pinned none.
    pub compose_hash: Option<Bytes32>,
    /// The chain intake resolved from the source CVM.
    pub chain_id: Option<u64>,
}

impl ExpectedReplica {
    /// From the text forms stored on a request; unparsable values count as unknown.
    pub fn from_stored(
        app_id: Option<&str>,
        device_id: Option<&str>,
        compose_hash: Option<&str>,
        chain_id: Option<i64>,
    ) -> ExpectedReplica {
        ExpectedReplica {
            app_id: app_id.and_then(|a| a.parse().ok()),
            device_id: device_id.and_then(|d| d.parse().ok()),
            compose_hash: compose_hash.and_then(|h| h.parse().ok()),
            chain_id: chain_id.and_then(|c| u64::try_from(c).ok()),
        }
    }
}

/// A 465 that disagrees with what the bridge resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareMismatch {
    #[error("Phala's prepare answer names app {got}, but the source's app is {expected}")]
    App { expected: AppId, got: AppId },
    #[error(
        "Phala's prepare answer names app {got}, but the bridge resolved no app id for the source"
    )]
    UnknownApp { got: AppId },
    #[error(
        "Phala's prepare answer names device {}, but the target node's device is {expected}",
        got.map(|d| d.to_string()).unwrap_or_else(|| "none".to_owned())
    )]
    Device {
        expected: Bytes32,
        got: Option<Bytes32>,
    },
    #[error("Phala's prepare answer names compose hash {got}, but {expected} was requested")]
    ComposeHash { expected: Bytes32, got: Bytes32 },
    #[error(
        "Phala's prepare answer names chain {got}, but the source's app is on chain {expected}"
    )]
    Chain { expected: u64, got: u64 },
    #[error(
        "Phala's prepare answer names device {}, which is the device of no node this workspace lists",
        got.map(|d| d.to_string()).unwrap_or_else(|| "none".to_owned())
    )]
    UnlistedDevice { got: Option<Bytes32> },
}

/// Checks a 465 against what the bridge resolved itself. Pure.
pub fn check_prepared(
    expected: &ExpectedReplica,
    prepared: &PreparedReplica,
) -> Result<(), PrepareMismatch> {
    match expected.app_id {
        Some(app) if app != prepared.app_id => {
            return Err(PrepareMismatch::App {
                expected: app,
                got: prepared.app_id,
            });
        }
        None => {
            return Err(PrepareMismatch::UnknownApp {
                got: prepared.app_id,
            });
        }
        Some(_) => {}
    }
    if let Some(device) = expected.device_id
        && prepared.device_id != Some(device)
    {
        return Err(PrepareMismatch::Device {
            expected: device,
            got: prepared.device_id,
        });
    }
    if let Some(hash) = expected.compose_hash
        && prepared.compose_hash != hash
    {
        return Err(PrepareMismatch::ComposeHash {
            expected: hash,
            got: prepared.compose_hash,
        });
    }
    // A 465 without a chain leaves intake's; one with another chain is refused.
    if let (Some(expected), Some(got)) = (expected.chain_id, prepared.chain_id)
        && expected != got
    {
        return Err(PrepareMismatch::Chain { expected, got });
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The env encryption key

/// Why an env key was not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvKeyError {
    #[error("Phala sent the env encryption key of app {app} without a signature")]
    Unsigned { app: AppId },
    #[error("the env encryption key of app {app} is not 32 bytes of hex")]
    BadPublicKey { app: AppId },
    #[error("the signature over the env encryption key of app {app} does not verify: {reason}")]
    BadSignature { app: AppId, reason: String },
    #[error(
        "the env encryption key of app {app} is signed by {signer}, not by the KMS root key {root} that DstackKms {kms} registers on chain {chain_id}"
    )]
    WrongSigner {
        app: AppId,
        signer: String,
        root: String,
        kms: Address,
        chain_id: u64,
    },
    #[error(
        "no DstackKms contract is known for chain {0}, so the env encryption key cannot be verified: set APPROVAL_BRIDGE_KMS_CONTRACTS"
    )]
    NoKmsContract(u64),
    #[error(
        "no RPC URL for chain {0}, so the env encryption key cannot be verified: set APPROVAL_BRIDGE_RPC_URLS or ETH_RPC_URL"
    )]
    NoRpc(u64),
    #[error(
        "DstackKms {kms} on chain {chain_id} registers no valid root key (kmsInfo().k256Pubkey)"
    )]
    NoRootKey { kms: Address, chain_id: u64 },
    /// The chain could not be read; this may pass.
    #[error("cannot read kmsInfo() of DstackKms {kms} on chain {chain_id}: {message}")]
    Chain {
        kms: Address,
        chain_id: u64,
        message: String,
    },
}

impl EnvKeyError {
    /// An outage rather than a key that fails verification.
    pub fn is_transient(&self) -> bool {
        matches!(self, EnvKeyError::Chain { .. })
    }
}

/// `keccak256("dstack-env-encrypt-pubkey" ‖ ":" ‖ app_id ‖ public_key)`: what
/// the KMS signs for an app's env key.
pub fn env_key_message_hash(app: &AppId, public_key: &[u8; 32]) -> B256 {
    let mut message = Vec::with_capacity(26 + 20 + 32);
    message.extend_from_slice(b"dstack-env-encrypt-pubkey:");
    message.extend_from_slice(app.0.as_slice());
    message.extend_from_slice(public_key);
    keccak256(message)
}

/// The secp256k1 key that signed `public_key_hex` for `app`. Pure.
pub fn recover_env_key_signer(
    app: &AppId,
    public_key_hex: &str,
    signature_hex: &str,
) -> Result<VerifyingKey, EnvKeyError> {
    let mut public_key = [0u8; 32];
    hex::decode_to_slice(strip_0x(public_key_hex), &mut public_key)
        .map_err(|_| EnvKeyError::BadPublicKey { app: *app })?;
    let bad = |reason: String| EnvKeyError::BadSignature { app: *app, reason };
    let bytes =
        hex::decode(strip_0x(signature_hex)).map_err(|_| bad("the signature is not hex".into()))?;
    if bytes.len() != 65 {
        return Err(bad(format!("it has {} bytes, not 65 (r‖s‖v)", bytes.len())));
    }
    let signature = Signature::from_raw(&bytes).map_err(|err| bad(err.to_string()))?;
    signature
        .recover_from_prehash(&env_key_message_hash(app, &public_key))
        .map_err(|err| bad(err.to_string()))
}

/// The root key as `kmsInfo().k256Pubkey` holds it: SEC1 compressed (33
/// bytes) or uncompressed (65), or the bare 64-byte point.
pub fn parse_root_key(bytes: &[u8]) -> Option<VerifyingKey> {
    if bytes.len() == 64 {
        let mut sec1 = Vec::with_capacity(65);
        sec1.push(0x04);
        sec1.extend_from_slice(bytes);
        return VerifyingKey::from_sec1_bytes(&sec1).ok();
    }
    VerifyingKey::from_sec1_bytes(bytes).ok()
}

/// The compressed SEC1 hex form of a key, as dstack's tools print it.
pub fn compressed_hex(key: &VerifyingKey) -> String {
    format!("0x{}", hex::encode(key.to_encoded_point(true).as_bytes()))
}

fn strip_0x(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix("0x").unwrap_or(s)
}

alloy::sol! {
    /// The part of DstackKms (dstack `kms/auth-eth`) that holds the KMS root keys.
    #[sol(rpc)]
    interface IDstackKms {
        function kmsInfo() external view returns (bytes k256Pubkey, bytes caPubkey, bytes quote, bytes eventlog);
    }
}

/// Verifies env keys against the KMS root key on chain.
#[derive(Debug, Clone)]
pub struct EnvKeyVerifier {
    chains: Chains,
    kms_contracts: KmsContracts,
    allow_unverified: bool,
}

impl EnvKeyVerifier {
    pub fn new(chains: Chains, trust: &TrustSettings) -> Self {
        EnvKeyVerifier {
            chains,
            kms_contracts: trust.kms_contracts.clone(),
            allow_unverified: trust.allow_unverified_env_keys,
        }
    }

    /// `Ok` when the key may be used: a Cloud-KMS key (Phala runs that KMS),
    /// an on-chain KMS key signed by the root key its DstackKms registers, or
    /// any key when the operator allows unverified keys (logged).
    pub async fn check(&self, key: &EnvKey) -> Result<(), EnvKeyError> {
        match self.verify(key).await {
            Err(err) if self.allow_unverified && !err.is_transient() => {
                tracing::warn!(error = %err, "using an unverified env encryption key (APPROVAL_BRIDGE_ALLOW_UNVERIFIED_ENV_KEYS)");
                Ok(())
            }
            outcome => outcome,
        }
    }

    async fn verify(&self, key: &EnvKey) -> Result<(), EnvKeyError> {
        let EnvKeyIssuer::Onchain {
            chain_id,
            app_id,
            signature,
        } = &key.issuer
        else {
            return Ok(());
        };
        let (chain_id, app) = (*chain_id, *app_id);
        let signature = signature
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or(EnvKeyError::Unsigned { app })?;
        let signer = recover_env_key_signer(&app, &key.public_key, signature)?;
        let kms = self
            .kms_contracts
            .get(chain_id)
            .ok_or(EnvKeyError::NoKmsContract(chain_id))?;
        let chain = self
            .chains
            .get(chain_id)
            .ok_or(EnvKeyError::NoRpc(chain_id))?;
        let info = IDstackKms::new(kms, chain.provider())
            .kmsInfo()
            .call()
            .await
            .map_err(|err| EnvKeyError::Chain {
                kms,
                chain_id,
                message: err.to_string(),
            })?;
        let root =
            parse_root_key(&info.k256Pubkey).ok_or(EnvKeyError::NoRootKey { kms, chain_id })?;
        if signer != root {
            return Err(EnvKeyError::WrongSigner {
                app,
                signer: compressed_hex(&signer),
                root: compressed_hex(&root),
                kms,
                chain_id,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;
    use secrecy::SecretString;

    use super::*;
    use crate::phala::OnchainStatus;

    fn b32(byte: u8) -> Bytes32 {
        Bytes32(B256::repeat_byte(byte))
    }

    fn app(byte: u8) -> AppId {
        AppId(Address::repeat_byte(byte))
    }

    fn prepared(app_id: AppId, device: Option<Bytes32>, hash: Bytes32) -> PreparedReplica {
        PreparedReplica {
            compose_hash: hash,
            app_id,
            device_id: device,
            commit_token: SecretString::from("t".to_owned()),
            onchain: OnchainStatus::default(),
            chain_id: Some(8453),
        }
    }

    #[test]
    fn a_465_that_names_what_intake_resolved_passes() {
        let expected = ExpectedReplica {
            app_id: Some(app(1)),
            device_id: Some(b32(2)),
            compose_hash: Some(b32(3)),
            chain_id: Some(8453),
        };
        assert_eq!(
            check_prepared(&expected, &prepared(app(1), Some(b32(2)), b32(3))),
            Ok(())
        );
        // Without a node or a requested hash, only the app is compared.
        let loose = ExpectedReplica {
            app_id: Some(app(1)),
            ..ExpectedReplica::default()
        };
        assert_eq!(
            check_prepared(&loose, &prepared(app(1), Some(b32(9)), b32(9))),
            Ok(())
        );
    }

    #[test]
    fn each_disagreement_of_a_465_is_named() {
        let expected = ExpectedReplica {
            app_id: Some(app(1)),
            device_id: Some(b32(2)),
            compose_hash: Some(b32(3)),
            chain_id: Some(8453),
        };
        let cases = [
            (
                prepared(app(7), Some(b32(2)), b32(3)),
                PrepareMismatch::App {
                    expected: app(1),
                    got: app(7),
                },
            ),
            (
                prepared(app(1), Some(b32(8)), b32(3)),
                PrepareMismatch::Device {
                    expected: b32(2),
                    got: Some(b32(8)),
                },
            ),
            (
                prepared(app(1), None, b32(3)),
                PrepareMismatch::Device {
                    expected: b32(2),
                    got: None,
                },
            ),
            (
                prepared(app(1), Some(b32(2)), b32(9)),
                PrepareMismatch::ComposeHash {
                    expected: b32(3),
                    got: b32(9),
                },
            ),
            (
                PreparedReplica {
                    chain_id: Some(1),
                    ..prepared(app(1), Some(b32(2)), b32(3))
                },
                PrepareMismatch::Chain {
                    expected: 8453,
                    got: 1,
                },
            ),
        ];
        for (answer, mismatch) in cases {
            assert_eq!(check_prepared(&expected, &answer), Err(mismatch));
        }
        let no_app = ExpectedReplica::default();
        assert_eq!(
            check_prepared(&no_app, &prepared(app(1), None, b32(3))),
            Err(PrepareMismatch::UnknownApp { got: app(1) })
        );
        let message = PrepareMismatch::Device {
            expected: b32(2),
            got: None,
        }
        .to_string();
        assert!(message.contains("device none"), "{message}");
    }

    #[test]
    fn stored_text_forms_parse_into_expectations() {
        let expected = ExpectedReplica::from_stored(
            Some(&format!("0x{}", "01".repeat(20))),
            Some(&"02".repeat(32)),
            None,
            None,
        );
        assert_eq!(expected.app_id, Some(app(1)));
        assert_eq!(expected.device_id, Some(b32(2)));
        assert_eq!(expected.compose_hash, None);
    }

    /// The dstack SDK's own test vector for the legacy scheme (app id 0x00…00).
    #[test]
    fn the_dstack_sdk_test_vector_recovers_its_key() {
        let signer = recover_env_key_signer(
            &AppId(Address::ZERO),
            "e33a1832c6562067ff8f844a61e51ad051f1180b66ec2551fb0251735f3ee90a",
            "8542c49081fbf4e03f62034f13fbf70630bdf256a53032e38465a27c36fd6bed7a5e7111652004aef37f7fd92fbfc1285212c4ae6a6154203a48f5e16cad2cef00",
        )
        .unwrap();
        assert_eq!(
            compressed_hex(&signer),
            "0x0217610d74cbd39b6143842c6d8bc310d79da1d82cc9d17f8876376221eda0c38f"
        );
    }

    #[test]
    fn a_signature_for_another_app_or_key_recovers_another_signer() {
        let kms = PrivateKeySigner::random();
        let public = "11".repeat(32);
        let hash = env_key_message_hash(&app(1), &[0x11; 32]);
        let mut rsv = kms.sign_hash_sync(&hash).unwrap().as_bytes();
        rsv[64] -= 27; // dstack sends v as 0/1
        let signature = hex::encode(rsv);
        let root = *kms.credential().verifying_key();
        assert_eq!(
            recover_env_key_signer(&app(1), &public, &signature).unwrap(),
            root
        );
        assert_ne!(
            recover_env_key_signer(&app(2), &public, &signature).unwrap(),
            root
        );
        assert_ne!(
            recover_env_key_signer(&app(1), &"12".repeat(32), &signature).unwrap(),
            root
        );
        for bad in ["00", "zz", &"00".repeat(65)] {
            assert!(matches!(
                recover_env_key_signer(&app(1), &public, bad),
                Err(EnvKeyError::BadSignature { .. })
            ));
        }
        assert!(matches!(
            recover_env_key_signer(&app(1), "abcd", &signature),
            Err(EnvKeyError::BadPublicKey { .. })
        ));
    }

    #[test]
    fn root_keys_parse_compressed_uncompressed_and_bare() {
        let key = *PrivateKeySigner::random().credential().verifying_key();
        let compressed = key.to_encoded_point(true);
        let uncompressed = key.to_encoded_point(false);
        assert_eq!(parse_root_key(compressed.as_bytes()), Some(key));
        assert_eq!(parse_root_key(uncompressed.as_bytes()), Some(key));
        assert_eq!(parse_root_key(&uncompressed.as_bytes()[1..]), Some(key));
        assert_eq!(parse_root_key(&[]), None);
        assert_eq!(parse_root_key(&[5; 33]), None);
    }
}
