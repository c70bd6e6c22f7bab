//! The Safe transaction: fields, EIP-712 hash (safe.md §4), the DstackApp
//! calls and their MultiSendCallOnly batching (§5), and owner signatures.

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{Eip712Domain, SolCall, SolStruct, eip712_domain};
use serde::{Deserialize, Serialize};

use super::{Deployment, SafeVersion};

pub(super) mod abi {
    alloy::sol! {
        struct SafeTx {
            address to;
            uint256 value;
            bytes data;
            uint8 operation;
            uint256 safeTxGas;
            uint256 baseGas;
            uint256 gasPrice;
            address gasToken;
            address refundReceiver;
            uint256 nonce;
        }

        function addComposeHash(bytes32 composeHash);
        function addDevice(bytes32 deviceId);
        function multiSend(bytes transactions);
    }
}

/// How the Safe calls `to`. CREATE (2) exists in the contracts but the
/// Transaction Service refuses it, so it is not representable here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Operation {
    Call = 0,
    DelegateCall = 1,
}

impl From<Operation> for u8 {
    fn from(op: Operation) -> u8 {
        op as u8
    }
}

impl TryFrom<u8> for Operation {
    type Error = String;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        match value {
            0 => Ok(Operation::Call),
            1 => Ok(Operation::DelegateCall),
            other => Err(format!(
                "operation {other} is not 0 (CALL) or 1 (DELEGATECALL)"
            )),
        }
    }
}

/// The ten fields a Safe hashes and executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafeTx {
    pub to: Address,
    pub value: U256,
    pub data: Bytes,
    pub operation: Operation,
    pub safe_tx_gas: U256,
    pub base_gas: U256,
    pub gas_price: U256,
    pub gas_token: Address,
    pub refund_receiver: Address,
    pub nonce: u64,
}

impl SafeTx {
    /// A transaction with the usual gas settings: everything 0, no refund.
    ///
    /// `safeTxGas = 0` with `gasPrice = 0` makes a failing inner call revert
    /// the whole `execTransaction`: the nonce stays unused and the same
    /// proposal can be executed again (safe.md §7). Keep it that way.
    pub fn new(to: Address, value: U256, data: Bytes, operation: Operation, nonce: u64) -> Self {
        SafeTx {
            to,
            value,
            data,
            operation,
            safe_tx_gas: U256::ZERO,
            base_gas: U256::ZERO,
            gas_price: U256::ZERO,
            gas_token: Address::ZERO,
            refund_receiver: Address::ZERO,
            nonce,
        }
    }

    /// The EIP-712 domain of a Safe: `{chainId, verifyingContract}` for
    /// every supported version (all are >= 1.3.0), with the proxy address.
    pub fn domain(safe: Address, chain_id: u64, _version: SafeVersion) -> Eip712Domain {
        eip712_domain! {
            chain_id: chain_id,
            verifying_contract: safe,
        }
    }

    /// The `safeTxHash` owners sign: equal to the Safe's own
    /// `getTransactionHash(...)` for this nonce.
    pub fn hash(&self, safe: Address, chain_id: u64, version: SafeVersion) -> B256 {
        let typed = abi::SafeTx {
            to: self.to,
            value: self.value,
            data: self.data.clone(),
            operation: self.operation.into(),
            safeTxGas: self.safe_tx_gas,
            baseGas: self.base_gas,
            gasPrice: self.gas_price,
            gasToken: self.gas_token,
            refundReceiver: self.refund_receiver,
            nonce: U256::from(self.nonce),
        };
        typed.eip712_signing_hash(&Self::domain(safe, chain_id, version))
    }
}

/// One call the Safe makes: to a DstackApp, in practice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub to: Address,
    pub value: U256,
    pub data: Bytes,
}

impl Call {
    /// `addComposeHash(bytes32)` (`0xdfc77223`) on `app`.
    pub fn add_compose_hash(app: Address, compose_hash: B256) -> Call {
        let data = abi::addComposeHashCall {
            composeHash: compose_hash,
        }
        .abi_encode();
        Call {
            to: app,
            value: U256::ZERO,
            data: data.into(),
        }
    }

    /// `addDevice(bytes32)` (`0x2a819728`) on `app`.
    pub fn add_device(app: Address, device_id: B256) -> Call {
        let data = abi::addDeviceCall {
            deviceId: device_id,
        }
        .abi_encode();
        Call {
            to: app,
            value: U256::ZERO,
            data: data.into(),
        }
    }
}

/// `multiSend(bytes)` calldata packing `calls` for MultiSendCallOnly: per call
/// `uint8 operation(0) ‖ address ‖ uint256 value ‖ uint256 length ‖ data`,
/// without padding. Every inner call is a CALL: MultiSendCallOnly reverts on
/// anything else.
pub fn encode_multi_send(calls: &[Call]) -> Bytes {
    let mut packed = Vec::with_capacity(calls.iter().map(|c| 85 + c.data.len()).sum());
    for call in calls {
        packed.push(Operation::Call as u8);
        packed.extend_from_slice(call.to.as_slice());
        packed.extend_from_slice(&call.value.to_be_bytes::<32>());
        packed.extend_from_slice(&U256::from(call.data.len()).to_be_bytes::<32>());
        packed.extend_from_slice(&call.data);
    }
    abi::multiSendCall {
        transactions: packed.into(),
    }
    .abi_encode()
    .into()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("a Safe transaction needs at least one call")]
    NoCalls,
    #[error("Safe {version} has no {deployment:?} MultiSendCallOnly deployment")]
    NoMultiSend {
        version: SafeVersion,
        deployment: Deployment,
    },
    #[error(
        "DELEGATECALL to {target} is not allowed for Safe {version}: only its pinned MultiSendCallOnly"
    )]
    DelegateCallNotAllowed {
        target: Address,
        version: SafeVersion,
    },
}

/// The Safe transaction that makes `calls`: one call goes out as a plain
/// CALL to its target; several are batched in a DELEGATECALL to the
/// version's pinned MultiSendCallOnly, so each inner call comes from the Safe
/// itself (a CALL to MultiSendCallOnly would make it the caller and fail the
/// DstackApp's owner check).
pub fn build_safe_tx(
    calls: &[Call],
    version: SafeVersion,
    deployment: Deployment,
    nonce: u64,
) -> Result<SafeTx, BuildError> {
    match calls {
        [] => Err(BuildError::NoCalls),
        [one] => Ok(SafeTx::new(
            one.to,
            one.value,
            one.data.clone(),
            Operation::Call,
            nonce,
        )),
        many => {
            let multi_send =
                version
                    .multi_send_call_only(deployment)
                    .ok_or(BuildError::NoMultiSend {
                        version,
                        deployment,
                    })?;
            let tx = SafeTx::new(
                multi_send,
                U256::ZERO,
                encode_multi_send(many),
                Operation::DelegateCall,
                nonce,
            );
            check_operation(&tx, version)?;
            Ok(tx)
        }
    }
}

/// Refuses a DELEGATECALL to anything but the version's pinned
/// MultiSendCallOnly. Run it on every transaction before signing it.
pub fn check_operation(tx: &SafeTx, version: SafeVersion) -> Result<(), BuildError> {
    match tx.operation {
        Operation::Call => Ok(()),
        Operation::DelegateCall if version.allows_delegatecall_to(tx.to) => Ok(()),
        Operation::DelegateCall => Err(BuildError::DelegateCallNotAllowed {
            target: tx.to,
            version,
        }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("a signature is 65 bytes (r ‖ s ‖ v), got {0}")]
    Length(usize),
    #[error("signature type v={0} is not an owner's ECDSA signature (27/28 or eth_sign 31/32)")]
    UnsupportedType(u8),
    #[error("signature does not recover: {0}")]
    Invalid(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

/// How a 65-byte Safe signature was made, read from its `v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureKind {
    /// v 27/28: ECDSA over the hash itself (EIP-712 `signTypedData` or a raw hash signature).
    Ecdsa,
    /// v 31/32: ECDSA over the EIP-191 message of the hash, then v += 4.
    EthSign,
}

/// Signs `safe_tx_hash` with a local key: 65 bytes `r ‖ s ‖ v`, v = 27/28.
pub fn sign_safe_tx_hash(
    signer: &PrivateKeySigner,
    safe_tx_hash: B256,
) -> Result<[u8; 65], SignatureError> {
    let signature = signer
        .sign_hash_sync(&safe_tx_hash)
        .map_err(|err| SignatureError::Signing(err.to_string()))?;
    Ok(signature.as_bytes())
}

/// The address that made `signature` over `hash`, and how.
///
/// Contract (v=0), approved-hash (v=1) and passkey (v=2) signatures carry an
/// owner address instead of proof; they need the chain to check and are
/// refused here.
pub fn recover_signer(
    hash: B256,
    signature: &[u8],
) -> Result<(Address, SignatureKind), SignatureError> {
    let raw: &[u8; 65] = signature
        .try_into()
        .map_err(|_| SignatureError::Length(signature.len()))?;
    let v = raw[64];
    let (kind, parity) = match v {
        27 | 28 => (SignatureKind::Ecdsa, v == 28),
        31 | 32 => (SignatureKind::EthSign, v == 32),
        other => return Err(SignatureError::UnsupportedType(other)),
    };
    let parsed = alloy::primitives::Signature::from_bytes_and_parity(&raw[..64], parity);
    let recovered = match kind {
        SignatureKind::Ecdsa => parsed.recover_address_from_prehash(&hash),
        SignatureKind::EthSign => parsed.recover_address_from_msg(hash.as_slice()),
    };
    recovered
        .map(|address| (address, kind))
        .map_err(|err| SignatureError::Invalid(err.to_string()))
}

/// Splits a concatenated signatures blob into its 65-byte static parts.
/// EOA signatures have no dynamic part, so a blob of only those is exactly
/// `n * 65` bytes.
pub fn split_signatures(blob: &[u8]) -> Result<Vec<&[u8]>, SignatureError> {
    if blob.is_empty() || !blob.len().is_multiple_of(65) {
        return Err(SignatureError::Length(blob.len()));
    }
    Ok(blob.chunks_exact(65).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe::type_hash;
    use alloy::primitives::{address, b256, bytes, keccak256};
    use alloy::sol_types::SolValue;

    const SAFE: Address = address!("1f9090aaE28b8a3dCeaDf281B0F12828e676c326");
    const APP: Address = address!("5FbDB2315678afecb367f032d93F642f64180aa3");

    /// safe.md §4 written out by hand, independent of the `sol!` types.
    fn hand_hash(tx: &SafeTx, safe: Address, chain_id: u64) -> B256 {
        let domain_separator = keccak256(
            (
                type_hash("EIP712Domain(uint256 chainId,address verifyingContract)"),
                U256::from(chain_id),
                safe,
            )
                .abi_encode(),
        );
        let struct_hash = keccak256(
            (
                type_hash(
                    "SafeTx(address to,uint256 value,bytes data,uint8 operation,uint256 safeTxGas,\
                     uint256 baseGas,uint256 gasPrice,address gasToken,address refundReceiver,\
                     uint256 nonce)",
                ),
                tx.to,
                tx.value,
                keccak256(&tx.data),
                U256::from(tx.operation as u8),
                tx.safe_tx_gas,
                tx.base_gas,
                tx.gas_price,
                tx.gas_token,
                tx.refund_receiver,
                U256::from(tx.nonce),
            )
                .abi_encode(),
        );
        let mut preimage = vec![0x19, 0x01];
        preimage.extend_from_slice(domain_separator.as_slice());
        preimage.extend_from_slice(struct_hash.as_slice());
        keccak256(preimage)
    }

    fn two_calls() -> Vec<Call> {
        vec![
            Call::add_compose_hash(APP, B256::repeat_byte(0xaa)),
            Call::add_device(APP, B256::repeat_byte(0xbb)),
        ]
    }

    #[test]
    fn typehashes_match_the_reference() {
        assert_eq!(
            type_hash(
                "SafeTx(address to,uint256 value,bytes data,uint8 operation,uint256 safeTxGas,\
                 uint256 baseGas,uint256 gasPrice,address gasToken,address refundReceiver,\
                 uint256 nonce)"
            ),
            b256!("bb8310d486368db6bd6f849402fdd73ad53d316b5a4b2644ad6efe0f941286d8")
        );
        assert_eq!(
            type_hash("EIP712Domain(uint256 chainId,address verifyingContract)"),
            b256!("47e79534a245952e8b16893a336b85a3d9ea9fa8c573f3d803afb92a79469218")
        );
    }

    #[test]
    fn safe_tx_hash_equals_the_hand_built_formula() {
        let single = build_safe_tx(
            &two_calls()[..1],
            SafeVersion::V1_4_1,
            Deployment::Canonical,
            7,
        )
        .unwrap();
        let batch =
            build_safe_tx(&two_calls(), SafeVersion::V1_4_1, Deployment::Canonical, 0).unwrap();
        let mut odd = SafeTx::new(APP, U256::from(5), Bytes::new(), Operation::Call, 3);
        odd.safe_tx_gas = U256::from(200_000);
        odd.gas_token = address!("00000000000000000000000000000000000000ee");
        for tx in [single, batch, odd] {
            for chain_id in [1, 31337, 8453] {
                assert_eq!(
                    tx.hash(SAFE, chain_id, SafeVersion::V1_4_1),
                    hand_hash(&tx, SAFE, chain_id)
                );
            }
        }
    }

    #[test]
    fn safe_tx_hash_matches_a_known_vector() {
        // An empty transaction (the shape of a Safe{Wallet} rejection) on
        // chain 1, computed with the formula of safe.md §4 by a separate
        // keccak implementation (js-sha3); it pins the encoding against
        // accidental change. The anvil tests compare with a real Safe.
        let tx = SafeTx::new(SAFE, U256::ZERO, Bytes::new(), Operation::Call, 0);
        let expected = b256!("fe911709d1abc06155fe14fb6cb5dc5dc0966fb9384cfc86d9580a9496ad8caf");
        assert_eq!(tx.hash(SAFE, 1, SafeVersion::V1_3_0), expected);
        assert_eq!(hand_hash(&tx, SAFE, 1), expected);
    }

    #[test]
    fn call_encodings_use_the_documented_selectors() {
        let hash = B256::repeat_byte(0x11);
        let compose = Call::add_compose_hash(APP, hash);
        assert_eq!(&compose.data[..4], &[0xdf, 0xc7, 0x72, 0x23]);
        assert_eq!(&compose.data[4..], hash.as_slice());
        let device = Call::add_device(APP, hash);
        assert_eq!(&device.data[..4], &[0x2a, 0x81, 0x97, 0x28]);
        assert_eq!(device.data.len(), 36);
        assert_eq!(compose.to, APP);
        assert_eq!(compose.value, U256::ZERO);
    }

    #[test]
    fn multi_send_packs_calls_without_padding() {
        let calls = two_calls();
        let encoded = encode_multi_send(&calls);
        assert_eq!(&encoded[..4], &[0x8d, 0x80, 0xff, 0x0a]);
        let inner = abi::multiSendCall::abi_decode(&encoded)
            .unwrap()
            .transactions;
        // Two calls with 36-byte calldata pack to 242 bytes (safe.md §5).
        assert_eq!(inner.len(), 242);
        let first = &inner[..121];
        assert_eq!(first[0], 0);
        assert_eq!(&first[1..21], APP.as_slice());
        assert_eq!(U256::from_be_slice(&first[21..53]), U256::ZERO);
        assert_eq!(U256::from_be_slice(&first[53..85]), U256::from(36));
        assert_eq!(&first[85..], &calls[0].data[..]);
        assert_eq!(&inner[121 + 85..], &calls[1].data[..]);
    }

    #[test]
    fn one_call_is_a_direct_call_and_several_delegatecall_the_pinned_multisend() {
        let calls = two_calls();
        let single =
            build_safe_tx(&calls[..1], SafeVersion::V1_4_1, Deployment::Canonical, 4).unwrap();
        assert_eq!(single.operation, Operation::Call);
        assert_eq!(single.to, APP);
        assert_eq!(single.data, calls[0].data);
        assert_eq!(single.nonce, 4);

        for (version, deployment) in [
            (SafeVersion::V1_3_0, Deployment::Canonical),
            (SafeVersion::V1_3_0, Deployment::Eip155),
            (SafeVersion::V1_4_1, Deployment::Canonical),
            (SafeVersion::V1_5_0, Deployment::Canonical),
        ] {
            let batch = build_safe_tx(&calls, version, deployment, 9).unwrap();
            assert_eq!(batch.operation, Operation::DelegateCall);
            assert_eq!(batch.to, version.multi_send_call_only(deployment).unwrap());
            assert_eq!(batch.value, U256::ZERO);
            assert_eq!(batch.data, encode_multi_send(&calls));
            assert_eq!(check_operation(&batch, version), Ok(()));
        }
        assert_eq!(
            build_safe_tx(&[], SafeVersion::V1_4_1, Deployment::Canonical, 0),
            Err(BuildError::NoCalls)
        );
        assert!(matches!(
            build_safe_tx(&calls, SafeVersion::V1_5_0, Deployment::Eip155, 0),
            Err(BuildError::NoMultiSend { .. })
        ));
    }

    #[test]
    fn delegatecall_elsewhere_is_refused() {
        let mut tx = SafeTx::new(APP, U256::ZERO, bytes!("00"), Operation::DelegateCall, 0);
        assert!(matches!(
            check_operation(&tx, SafeVersion::V1_4_1),
            Err(BuildError::DelegateCallNotAllowed { .. })
        ));
        tx.operation = Operation::Call;
        assert_eq!(check_operation(&tx, SafeVersion::V1_4_1), Ok(()));
    }

    #[test]
    fn signatures_round_trip_in_both_encodings() {
        let signer = PrivateKeySigner::random();
        let hash = B256::repeat_byte(0x42);

        let sig = sign_safe_tx_hash(&signer, hash).unwrap();
        assert!(sig[64] == 27 || sig[64] == 28);
        assert_eq!(
            recover_signer(hash, &sig).unwrap(),
            (signer.address(), SignatureKind::Ecdsa)
        );

        // eth_sign form: EIP-191 message of the hash, v + 4.
        let mut eth_sign = signer
            .sign_message_sync(hash.as_slice())
            .unwrap()
            .as_bytes();
        eth_sign[64] += 4;
        assert_eq!(
            recover_signer(hash, &eth_sign).unwrap(),
            (signer.address(), SignatureKind::EthSign)
        );

        // The same bytes over another hash recover someone else.
        let (other, _) = recover_signer(B256::repeat_byte(0x43), &sig).unwrap();
        assert_ne!(other, signer.address());
    }

    #[test]
    fn non_ecdsa_and_malformed_signatures_are_refused() {
        let hash = B256::repeat_byte(1);
        let mut sig = sign_safe_tx_hash(&PrivateKeySigner::random(), hash).unwrap();
        for v in [0u8, 1, 2, 29, 35] {
            sig[64] = v;
            assert_eq!(
                recover_signer(hash, &sig),
                Err(SignatureError::UnsupportedType(v))
            );
        }
        assert_eq!(
            recover_signer(hash, &sig[..64]),
            Err(SignatureError::Length(64))
        );
        assert_eq!(split_signatures(&[0u8; 130]).unwrap().len(), 2);
        assert!(split_signatures(&[0u8; 66]).is_err());
        assert!(split_signatures(&[]).is_err());
    }

    #[test]
    fn operation_serializes_as_a_number() {
        assert_eq!(
            serde_json::to_string(&Operation::DelegateCall).unwrap(),
            "1"
        );
        assert_eq!(
            serde_json::from_str::<Operation>("0").unwrap(),
            Operation::Call
        );
        assert!(serde_json::from_str::<Operation>("2").is_err());
    }
}
