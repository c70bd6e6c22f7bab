//! Safe multisig primitives and the Safe Transaction Service client
//! (see the reference's safe.md).
//!
//! - [`SafeVersion`] and the pinned `MultiSendCallOnly` addresses: the only
//!   DELEGATECALL target this service ever proposes or accepts.
//! - [`tx`]: the `SafeTx`, its EIP-712 hash, the DstackApp calls and their
//!   batching, and owner signatures.
//! - [`service`]: the Transaction Service behind a small trait, with a reqwest
//!   client.
//! - [`verify`]: what the proposer key may sign, checked on every stored
//!   transaction before it is signed.

mod flow;
pub mod gas;
mod links;
pub mod service;
pub mod tx;
pub mod verify;

use std::fmt;
use std::str::FromStr;

use alloy::primitives::{Address, B256, address, keccak256};
use alloy::sol_types::{SolStruct, eip712_domain};

pub use flow::SafeFlow;
pub use links::{safe_wallet_link, short_chain_name};
pub use service::{
    DelegateRegistration, Delegation, Deletion, Proposal, SafeService, SafeServiceError, ServiceTx,
    TxServiceClient, TxServiceOptions,
};
pub use tx::{
    BuildError, Call, Operation, SafeTx, SignatureError, SignatureKind, build_safe_tx,
    check_operation, encode_multi_send, recover_signer, sign_safe_tx_hash, split_signatures,
};
pub use verify::{AppCall, Unsignable, check_signable};

mod bindings {
    // The generated `getTransactionHash` builder takes every SafeTx field.
    #![allow(clippy::too_many_arguments)]

    use alloy::sol;

    sol! {
        /// The read side of a Safe that this service needs. Every supported
        /// version (1.3.0 to 1.5.0) has these functions with the same selectors.
        #[sol(rpc)]
        interface ISafe {
            function VERSION() external view returns (string memory);
            function nonce() external view returns (uint256);
            function getThreshold() external view returns (uint256);
            function getOwners() external view returns (address[] memory);
            function getTransactionHash(
                address to,
                uint256 value,
                bytes calldata data,
                uint8 operation,
                uint256 safeTxGas,
                uint256 baseGas,
                uint256 gasPrice,
                address gasToken,
                address refundReceiver,
                uint256 _nonce
            ) external view returns (bytes32);
            function execTransaction(
                address to,
                uint256 value,
                bytes calldata data,
                uint8 operation,
                uint256 safeTxGas,
                uint256 baseGas,
                uint256 gasPrice,
                address gasToken,
                address refundReceiver,
                bytes memory signatures
            ) external payable returns (bool success);
        }
    }
}
pub use bindings::ISafe;

/// A Safe contract version this service can hash for and batch with.
///
/// Older Safes (< 1.3.0) use a domain without `chainId` and other field
/// names; no DstackApp owner is expected to run one, so they are refused
/// rather than half supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SafeVersion {
    V1_3_0,
    V1_4_1,
    V1_5_0,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported Safe version `{0}` (supported: 1.3.0, 1.4.1, 1.5.0)")]
pub struct UnsupportedVersion(pub String);

impl FromStr for SafeVersion {
    type Err = UnsupportedVersion;

    /// Parses the string the Safe's `VERSION()` returns. SafeL2 singletons
    /// return the same string as their L1 twins.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "1.3.0" => Ok(SafeVersion::V1_3_0),
            "1.4.1" => Ok(SafeVersion::V1_4_1),
            "1.5.0" => Ok(SafeVersion::V1_5_0),
            other => Err(UnsupportedVersion(other.to_owned())),
        }
    }
}

impl fmt::Display for SafeVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SafeVersion::V1_3_0 => "1.3.0",
            SafeVersion::V1_4_1 => "1.4.1",
            SafeVersion::V1_5_0 => "1.5.0",
        })
    }
}

/// Which copy of a Safe deployment. Only 1.3.0 has two (safe.md §6); later
/// versions exist only at the canonical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Deployment {
    /// CREATE2 from Arachnid's deployer (1.3.0) or the Safe singleton
    /// factory (1.4.1, 1.5.0).
    Canonical,
    /// 1.3.0 redeployed through the Safe singleton factory.
    Eip155,
}

impl Deployment {
    /// The copy the Safe SDK picks on a chain: it takes the first one
    /// safe-deployments lists, which is eip155 on Base, Base Sepolia and
    /// Sepolia. Both copies are trusted by the Transaction Service, so this
    /// only matters for matching what Safe{Wallet} would build.
    pub fn preferred_for_chain(chain_id: u64) -> Deployment {
        match chain_id {
            8453 | 84532 | 11155111 => Deployment::Eip155,
            _ => Deployment::Canonical,
        }
    }
}

const MULTI_SEND_CALL_ONLY_1_3_0: Address = address!("40A2aCCbd92BCA938b02010E17A5b8929b49130D");
const MULTI_SEND_CALL_ONLY_1_3_0_EIP155: Address =
    address!("A1dabEF33b3B82c7814B6D82A79e50F4AC44102B");
const MULTI_SEND_CALL_ONLY_1_4_1: Address = address!("9641d764fc13c8B624c04430C7356C1C7C8102e2");
const MULTI_SEND_CALL_ONLY_1_5_0: Address = address!("A83c336B20401Af773B6219BA5027174338D1836");

impl SafeVersion {
    /// The pinned `MultiSendCallOnly` of this version in one deployment
    /// flavour; `None` when the version has no such copy.
    pub fn multi_send_call_only(self, deployment: Deployment) -> Option<Address> {
        match (self, deployment) {
            (SafeVersion::V1_3_0, Deployment::Canonical) => Some(MULTI_SEND_CALL_ONLY_1_3_0),
            (SafeVersion::V1_3_0, Deployment::Eip155) => Some(MULTI_SEND_CALL_ONLY_1_3_0_EIP155),
            (SafeVersion::V1_4_1, Deployment::Canonical) => Some(MULTI_SEND_CALL_ONLY_1_4_1),
            (SafeVersion::V1_5_0, Deployment::Canonical) => Some(MULTI_SEND_CALL_ONLY_1_5_0),
            (SafeVersion::V1_4_1 | SafeVersion::V1_5_0, Deployment::Eip155) => None,
        }
    }

    /// Every pinned `MultiSendCallOnly` of this version.
    pub fn multi_send_call_only_addresses(self) -> &'static [Address] {
        match self {
            SafeVersion::V1_3_0 => &[
                MULTI_SEND_CALL_ONLY_1_3_0,
                MULTI_SEND_CALL_ONLY_1_3_0_EIP155,
            ],
            SafeVersion::V1_4_1 => &[MULTI_SEND_CALL_ONLY_1_4_1],
            SafeVersion::V1_5_0 => &[MULTI_SEND_CALL_ONLY_1_5_0],
        }
    }

    /// Whether a Safe of this version may DELEGATECALL `target`.
    ///
    /// A DELEGATECALL runs foreign code with the Safe's storage and can
    /// rewrite its owners, so the answer is yes only for this version's
    /// pinned `MultiSendCallOnly`, which cannot itself delegatecall. Not
    /// `MultiSend`, not another version's copy.
    pub fn allows_delegatecall_to(self, target: Address) -> bool {
        self.multi_send_call_only_addresses().contains(&target)
    }
}

/// Whether a Safe of `version` may DELEGATECALL `target`; see
/// [`SafeVersion::allows_delegatecall_to`].
pub fn is_allowed_delegatecall_target(version: SafeVersion, target: Address) -> bool {
    version.allows_delegatecall_to(target)
}

// The typed data the Transaction Service checks when an owner registers a
// delegate (safe.md §3.1).
mod delegate_types {
    alloy::sol! {
        struct Delegate {
            address delegateAddress;
            uint256 totp;
        }
    }
}

/// The Transaction Service's delegate "time-based one-time password": the
/// number of whole hours since the Unix epoch. The service accepts the
/// current and the previous hour.
pub fn delegate_totp(unix_seconds: u64) -> u64 {
    unix_seconds / 3600
}

/// The EIP-712 digest an owner signs to register `delegate`.
///
/// Domain `{name: "Safe Transaction Service", version: "1.0", chainId}`;
/// `chain_id: None` gives the legacy domain without `chainId`, which the
/// service also accepts (the fake service checks both).
pub fn delegate_hash(delegate: Address, totp: u64, chain_id: Option<u64>) -> B256 {
    let message = delegate_types::Delegate {
        delegateAddress: delegate,
        totp: alloy::primitives::U256::from(totp),
    };
    let domain = match chain_id {
        Some(chain_id) => eip712_domain! {
            name: "Safe Transaction Service",
            version: "1.0",
            chain_id: chain_id,
        },
        None => eip712_domain! {
            name: "Safe Transaction Service",
            version: "1.0",
        },
    };
    message.eip712_signing_hash(&domain)
}

// The typed data the Transaction Service checks when a proposer deletes an
// unexecuted proposal (safe.md §2.3).
mod delete_types {
    alloy::sol! {
        struct DeleteRequest {
            bytes32 safeTxHash;
            uint256 totp;
        }
    }
}

/// The EIP-712 digest the proposer (or the delegate that proposed) signs to
/// delete the unexecuted proposal `safe_tx_hash` of `safe`: `DeleteRequest`
/// under the domain `{name: "Safe Transaction Service", version: "1.0",
/// chainId, verifyingContract: safe}`, with the hourly `totp` of
/// [`delegate_totp`].
pub fn delete_request_hash(safe_tx_hash: B256, totp: u64, chain_id: u64, safe: Address) -> B256 {
    let message = delete_types::DeleteRequest {
        safeTxHash: safe_tx_hash,
        totp: alloy::primitives::U256::from(totp),
    };
    let domain = eip712_domain! {
        name: "Safe Transaction Service",
        version: "1.0",
        chain_id: chain_id,
        verifying_contract: safe,
    };
    message.eip712_signing_hash(&domain)
}

/// keccak256 of a Solidity type string: the typehash of an EIP-712 struct.
/// Used by tests to check the `sol!` types against the reference's constants.
pub fn type_hash(type_string: &str) -> B256 {
    keccak256(type_string.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{U256, b256};
    use alloy::sol_types::SolValue;

    #[test]
    fn version_parses_supported_strings_only() {
        assert_eq!("1.3.0".parse::<SafeVersion>(), Ok(SafeVersion::V1_3_0));
        assert_eq!("1.4.1".parse::<SafeVersion>(), Ok(SafeVersion::V1_4_1));
        assert_eq!(" 1.5.0 ".parse::<SafeVersion>(), Ok(SafeVersion::V1_5_0));
        for bad in ["1.2.0", "1.4.0", "1.1.1", "", "v1.4.1"] {
            let err = bad.parse::<SafeVersion>().unwrap_err();
            assert!(err.to_string().contains(&format!("`{bad}`")), "{err}");
        }
        assert_eq!(SafeVersion::V1_4_1.to_string(), "1.4.1");
    }

    #[test]
    fn multi_send_call_only_addresses_match_the_reference() {
        use Deployment::*;
        let v130 = SafeVersion::V1_3_0;
        assert_eq!(
            v130.multi_send_call_only(Canonical)
                .unwrap()
                .to_checksum(None),
            "0x40A2aCCbd92BCA938b02010E17A5b8929b49130D"
        );
        assert_eq!(
            v130.multi_send_call_only(Eip155).unwrap().to_checksum(None),
            "0xA1dabEF33b3B82c7814B6D82A79e50F4AC44102B"
        );
        assert_eq!(
            SafeVersion::V1_4_1
                .multi_send_call_only(Canonical)
                .unwrap()
                .to_checksum(None),
            "0x9641d764fc13c8B624c04430C7356C1C7C8102e2"
        );
        assert_eq!(
            SafeVersion::V1_5_0
                .multi_send_call_only(Canonical)
                .unwrap()
                .to_checksum(None),
            "0xA83c336B20401Af773B6219BA5027174338D1836"
        );
        assert_eq!(SafeVersion::V1_4_1.multi_send_call_only(Eip155), None);
        assert_eq!(Deployment::preferred_for_chain(1), Canonical);
        assert_eq!(Deployment::preferred_for_chain(8453), Eip155);
    }

    #[test]
    fn only_the_versions_own_multi_send_call_only_may_be_delegatecalled() {
        let multi_send_1_4_1 = address!("38869bf66a61cF6bDB996A6aE40D5853Fd43B526");
        let v141 = SafeVersion::V1_4_1;
        assert!(is_allowed_delegatecall_target(
            v141,
            address!("9641d764fc13c8B624c04430C7356C1C7C8102e2")
        ));
        assert!(!is_allowed_delegatecall_target(v141, multi_send_1_4_1));
        assert!(!is_allowed_delegatecall_target(v141, Address::ZERO));
        // Another version's copy is refused: the pin is per version.
        assert!(!is_allowed_delegatecall_target(
            v141,
            address!("40A2aCCbd92BCA938b02010E17A5b8929b49130D")
        ));
        // Both 1.3.0 copies are trusted by the hosted service.
        for a in SafeVersion::V1_3_0.multi_send_call_only_addresses() {
            assert!(is_allowed_delegatecall_target(SafeVersion::V1_3_0, *a));
        }
    }

    #[test]
    fn delegate_typehashes_match_the_reference() {
        assert_eq!(
            type_hash("Delegate(address delegateAddress,uint256 totp)"),
            b256!("6c9e874b4b1b1537b11ab113648a187cf141593fa647a5a8ffa9abff4429cfba")
        );
        assert_eq!(
            type_hash("EIP712Domain(string name,string version,uint256 chainId)"),
            b256!("c2f8787176b8ac6bf7215b4adcc1e069bf4ab82d9ab1df05a57a91d425935b6e")
        );
        let message = delegate_types::Delegate {
            delegateAddress: Address::ZERO,
            totp: U256::ZERO,
        };
        assert_eq!(
            message.eip712_type_hash(),
            type_hash("Delegate(address delegateAddress,uint256 totp)")
        );
    }

    #[test]
    fn delete_request_hash_follows_the_reference() {
        assert_eq!(
            type_hash("DeleteRequest(bytes32 safeTxHash,uint256 totp)"),
            b256!("ea0e2920ae94ffdb9d98b7bbb85bc34fe4df5ccca3a98a2e3bfec8b64919fc08")
        );
        let safe = address!("1f9090aaE28b8a3dCeaDf281B0F12828e676c326");
        let hash = b256!("1111111111111111111111111111111111111111111111111111111111111111");
        let (totp, chain_id) = (472_222u64, 8453u64);
        let domain_separator = keccak256(
            (
                type_hash(
                    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)",
                ),
                keccak256("Safe Transaction Service"),
                keccak256("1.0"),
                U256::from(chain_id),
                safe,
            )
                .abi_encode(),
        );
        let struct_hash = keccak256(
            (
                type_hash("DeleteRequest(bytes32 safeTxHash,uint256 totp)"),
                hash,
                U256::from(totp),
            )
                .abi_encode(),
        );
        let mut preimage = vec![0x19, 0x01];
        preimage.extend_from_slice(domain_separator.as_slice());
        preimage.extend_from_slice(struct_hash.as_slice());
        assert_eq!(
            delete_request_hash(hash, totp, chain_id, safe),
            keccak256(&preimage)
        );
    }

    #[test]
    fn delegate_hash_follows_the_eip712_formula() {
        let delegate = address!("1111111111111111111111111111111111111111");
        let totp = delegate_totp(1_700_000_000);
        assert_eq!(totp, 472_222);
        let chain_id = 11155111u64;

        let domain_separator = keccak256(
            (
                type_hash("EIP712Domain(string name,string version,uint256 chainId)"),
                keccak256("Safe Transaction Service"),
                keccak256("1.0"),
                U256::from(chain_id),
            )
                .abi_encode(),
        );
        let struct_hash = keccak256(
            (
                type_hash("Delegate(address delegateAddress,uint256 totp)"),
                delegate,
                U256::from(totp),
            )
                .abi_encode(),
        );
        let mut preimage = vec![0x19, 0x01];
        preimage.extend_from_slice(domain_separator.as_slice());
        preimage.extend_from_slice(struct_hash.as_slice());
        assert_eq!(
            delegate_hash(delegate, totp, Some(chain_id)),
            keccak256(&preimage)
        );
        assert_ne!(
            delegate_hash(delegate, totp, Some(chain_id)),
            delegate_hash(delegate, totp, None)
        );
    }
}
