//! The real service's validation of proposals and delegate registrations
//! (safe.md §2.2, §3.1), as pure functions of the request and the chain's facts.

use alloy::primitives::{Address, B256, Bytes};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::chain::{Executions, SafeFacts};
use super::fields::{FieldErrors, Fields};
use crate::safe::tx::SignatureKind;
use crate::safe::{
    Operation, SafeTx, SafeVersion, delegate_hash, delegate_totp, recover_signer, split_signatures,
};

/// A proposal whose fields are well-formed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ParsedProposal {
    pub(super) tx: SafeTx,
    pub(super) contract_transaction_hash: B256,
    pub(super) sender: Address,
    pub(super) signature: Option<Bytes>,
    pub(super) origin: Option<String>,
}

/// Step 1 of the real validation: the fields on their own.
pub(super) fn parse_proposal(body: &Map<String, Value>) -> Result<ParsedProposal, FieldErrors> {
    let mut f = Fields::new(body);
    let to = f.address("to", true);
    let value = f.integer("value");
    let data = f.hex("data", false);
    let operation = match f.present("operation", true) {
        None => None,
        Some(v) => match v.as_u64().map(|n| u8::try_from(n).unwrap_or(u8::MAX)) {
            Some(n) => match Operation::try_from(n) {
                Ok(op) => Some(op),
                Err(_) => {
                    f.fail("operation", format!("\"{v}\" is not a valid choice."));
                    None
                }
            },
            None => {
                f.fail("operation", format!("\"{v}\" is not a valid choice."));
                None
            }
        },
    };
    let safe_tx_gas = f.integer("safeTxGas");
    let base_gas = f.integer("baseGas");
    let gas_price = f.integer("gasPrice");
    let gas_token = f.address("gasToken", false);
    let refund_receiver = f.address("refundReceiver", false);
    let nonce = f.integer("nonce").and_then(|n| {
        let fits = u64::try_from(n).ok();
        if fits.is_none() {
            f.fail("nonce", "A valid integer is required.");
        }
        fits
    });
    let contract_transaction_hash = f.hash32("contractTransactionHash");
    let sender = f.address("sender", true);
    if sender == Some(Address::ZERO) {
        // This fake's wording.
        f.fail("sender", "0x0 address is not allowed");
    }
    let signature = f.hex("signature", false).filter(|s| !s.is_empty());
    if let Some(sig) = &signature
        && sig.len() < 65
    {
        // This fake's wording.
        f.fail("signature", "Signature must be at least 65 bytes");
    }
    let origin = f.text("origin", 200, false);

    f.finish(|| ParsedProposal {
        tx: SafeTx {
            to: to.expect("checked"),
            value: value.expect("checked"),
            data: data.unwrap_or_default(),
            operation: operation.expect("checked"),
            safe_tx_gas: safe_tx_gas.expect("checked"),
            base_gas: base_gas.expect("checked"),
            gas_price: gas_price.expect("checked"),
            gas_token: gas_token.unwrap_or(Address::ZERO),
            refund_receiver: refund_receiver.unwrap_or(Address::ZERO),
            nonce: nonce.expect("checked"),
        },
        contract_transaction_hash: contract_transaction_hash.expect("checked"),
        sender: sender.expect("checked"),
        signature,
        origin,
    })
}

/// A proposal that passed every rule.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Accepted {
    /// The owner behind the proposal: `sender`, or the delegator of a delegate.
    pub(super) proposer: Address,
    pub(super) proposed_by_delegate: Option<Address>,
    /// Owner signatures; a delegate's signature is proof of sender, not a confirmation.
    pub(super) confirmations: Vec<(Address, Bytes, SignatureKind)>,
    pub(super) trusted: bool,
}

/// Python's rendering of a list of addresses, as the real messages show it.
pub(super) fn py_list(addresses: impl IntoIterator<Item = Address>) -> String {
    let items: Vec<String> = addresses
        .into_iter()
        .map(|a| format!("'{}'", a.to_checksum(None)))
        .collect();
    format!("[{}]", items.join(", "))
}

/// Steps 2-6 of the real validation, in its order.
///
/// `delegates` holds (delegate, delegator) pairs already limited to this
/// Safe (or any Safe), unexpired, with a delegator among the current owners.
pub(super) fn validate_proposal(
    p: &ParsedProposal,
    safe: Address,
    facts: &SafeFacts,
    delegates: &[(Address, Address)],
    executions: &Executions,
) -> Result<Accepted, String> {
    // The fake cannot hash for a version it does not know. This fake's wording.
    let version: SafeVersion = facts
        .version
        .parse()
        .map_err(|err: crate::safe::UnsupportedVersion| err.to_string())?;

    if p.tx.operation == Operation::DelegateCall && !version.allows_delegatecall_to(p.tx.to) {
        return Err("Operation DELEGATE_CALL is not allowed".to_owned());
    }

    let computed = p.tx.hash(safe, facts.chain_id, version);
    if computed != p.contract_transaction_hash {
        return Err(format!(
            "Contract-transaction-hash={computed} does not match provided contract-tx-hash={}",
            p.contract_transaction_hash
        ));
    }

    if let Some(tx_hash) = executions.by_hash.get(&computed).map(|e| e.tx_hash) {
        return Err(format!(
            "Tx with safe-tx-hash={computed} was already executed in tx-hash={tx_hash}"
        ));
    }
    if p.tx.nonce < facts.nonce {
        // Without a SafeL2 event the executing transaction is unknown here.
        let tx_hash = executions
            .by_nonce
            .get(&p.tx.nonce)
            .map(ToString::to_string)
            .unwrap_or_else(|| "unknown".to_owned());
        return Err(format!(
            "Tx with nonce={} for safe={} already executed in tx-hash={tx_hash}",
            p.tx.nonce,
            safe.to_checksum(None)
        ));
    }

    let delegator_of = |address: Address| {
        delegates
            .iter()
            .find(|(delegate, _)| *delegate == address)
            .map(|(_, delegator)| *delegator)
    };
    let is_owner = |address: Address| facts.owners.contains(&address);
    let not_allowed = |who: &str, address: Address| {
        format!(
            "{who}={} is not an owner or delegate. Current owners={}. Delegates={}",
            address.to_checksum(None),
            py_list(facts.owners.iter().copied()),
            py_list(delegates.iter().map(|(d, _)| *d)),
        )
    };
    if !is_owner(p.sender) && delegator_of(p.sender).is_none() {
        return Err(not_allowed("Sender", p.sender));
    }

    let mut confirmations = Vec::new();
    let mut signers = Vec::new();
    if let Some(blob) = &p.signature {
        let parts = split_signatures(blob).map_err(|err| err.to_string())?;
        for part in parts {
            let (signer, kind) = recover_signer(computed, part).map_err(|err| {
                // This fake's wording.
                format!(
                    "Signature={} is not valid: {err}",
                    Bytes::copy_from_slice(part)
                )
            })?;
            if signers.contains(&signer) {
                return Err(format!(
                    "Signature for owner={} is duplicated",
                    signer.to_checksum(None)
                ));
            }
            if is_owner(signer) {
                confirmations.push((signer, Bytes::copy_from_slice(part), kind));
            } else if delegator_of(signer).is_none() {
                return Err(not_allowed("Signer", signer));
            }
            signers.push(signer);
        }
        let by_delegate = signers.iter().any(|s| !is_owner(*s));
        if by_delegate && signers.len() > 1 {
            return Err("Just one signature is expected if using delegates".to_owned());
        }
        if !signers.contains(&p.sender) {
            return Err(format!(
                "Signature does not match sender={}. Calculated owners={}",
                p.sender.to_checksum(None),
                py_list(signers.iter().copied())
            ));
        }
    }

    let (proposer, proposed_by_delegate) = if is_owner(p.sender) {
        (p.sender, None)
    } else {
        (
            delegator_of(p.sender).expect("checked above"),
            Some(p.sender),
        )
    };
    Ok(Accepted {
        proposer,
        proposed_by_delegate,
        confirmations,
        trusted: !signers.is_empty(),
    })
}

/// A delegate registration whose fields are well-formed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ParsedDelegate {
    pub(super) safe: Option<Address>,
    pub(super) delegate: Address,
    pub(super) delegator: Address,
    pub(super) label: String,
    pub(super) signature: Bytes,
    pub(super) expiry: Option<DateTime<Utc>>,
}

pub(super) fn parse_delegate(body: &Map<String, Value>) -> Result<ParsedDelegate, FieldErrors> {
    let mut f = Fields::new(body);
    let safe = f.address("safe", false);
    let delegate = f.address("delegate", true);
    let delegator = f.address("delegator", true);
    let label = f.text("label", 50, true);
    let signature = f.hex("signature", true);
    let expiry = match f.present("expiryDate", false) {
        None => None,
        Some(v) => match v.as_str().map(DateTime::parse_from_rfc3339) {
            Some(Ok(date)) => Some(date.with_timezone(&Utc)),
            _ => {
                f.fail(
                    "expiryDate",
                    "Datetime has wrong format. Use one of these formats instead: \
                     YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z].",
                );
                None
            }
        },
    };
    f.finish(|| ParsedDelegate {
        safe,
        delegate: delegate.expect("checked"),
        delegator: delegator.expect("checked"),
        label: label.expect("checked"),
        signature: signature.expect("checked"),
        expiry,
    })
}

/// The delegator must have signed `Delegate{delegate, totp}` for this hour or
/// the previous one, with or without `chainId` in the domain.
pub(super) fn check_delegate_signature(
    d: &ParsedDelegate,
    chain_id: u64,
    unix_now: u64,
) -> Result<(), String> {
    let totp = delegate_totp(unix_now);
    let matches = [totp, totp.saturating_sub(1)].iter().any(|&totp| {
        [Some(chain_id), None].iter().any(|&chain| {
            let digest = delegate_hash(d.delegate, totp, chain);
            recover_signer(digest, &d.signature).is_ok_and(|(signer, _)| signer == d.delegator)
        })
    });
    if matches {
        Ok(())
    } else {
        // This fake's wording.
        Err("Signature does not match provided delegator".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::super::chain::Execution;
    use super::super::fields::{UNPROCESSABLE, checksummed_address, json_object, path_address};
    use super::*;
    use crate::safe::tx::sign_safe_tx_hash;
    use crate::safe::{Call, Deployment, build_safe_tx};
    use alloy::primitives::{address, b256};
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;
    use axum::http::StatusCode;
    use serde_json::json;

    const SAFE: Address = address!("1f9090aaE28b8a3dCeaDf281B0F12828e676c326");
    const APP: Address = address!("5FbDB2315678afecb367f032d93F642f64180aa3");
    const CHAIN: u64 = 31337;

    struct World {
        owners: Vec<PrivateKeySigner>,
        facts: SafeFacts,
    }

    fn world() -> World {
        let owners: Vec<PrivateKeySigner> = (0..3).map(|_| PrivateKeySigner::random()).collect();
        let facts = SafeFacts {
            chain_id: CHAIN,
            version: "1.4.1".into(),
            owners: owners.iter().map(|o| o.address()).collect(),
            threshold: 2,
            nonce: 5,
        };
        World { owners, facts }
    }

    fn batch(nonce: u64) -> SafeTx {
        let calls = [
            Call::add_compose_hash(APP, B256::repeat_byte(1)),
            Call::add_device(APP, B256::repeat_byte(2)),
        ];
        build_safe_tx(&calls, SafeVersion::V1_4_1, Deployment::Canonical, nonce).unwrap()
    }

    fn signed(tx: SafeTx, by: &[&PrivateKeySigner], sender: Address) -> ParsedProposal {
        let hash = tx.hash(SAFE, CHAIN, SafeVersion::V1_4_1);
        let mut blob = Vec::new();
        for signer in by {
            blob.extend_from_slice(&sign_safe_tx_hash(signer, hash).unwrap());
        }
        ParsedProposal {
            tx,
            contract_transaction_hash: hash,
            sender,
            signature: (!blob.is_empty()).then(|| blob.into()),
            origin: None,
        }
    }

    fn check(
        w: &World,
        p: &ParsedProposal,
        delegates: &[(Address, Address)],
    ) -> Result<Accepted, String> {
        validate_proposal(p, SAFE, &w.facts, delegates, &Executions::default())
    }

    #[test]
    fn addresses_must_be_checksummed() {
        let good = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
        assert_eq!(checksummed_address(good), Ok(APP));
        let lower = good.to_lowercase();
        assert_eq!(
            checksummed_address(&lower),
            Err(format!("Address {lower} is not checksumed"))
        );
        assert_eq!(
            checksummed_address("0x12"),
            Err("Address 0x12 is not valid".into())
        );
        let path = path_address(&lower).unwrap_err();
        assert_eq!(path.status, UNPROCESSABLE);
        assert_eq!(path.body["message"], "Checksum address validation failed");
        assert_eq!(path.body["arguments"][0], lower.as_str());
    }

    #[test]
    fn bodies_parse_like_drf() {
        assert_eq!(json_object(b"", UNPROCESSABLE).unwrap(), Map::new());
        let garbled = json_object(b"{not json", UNPROCESSABLE).unwrap_err();
        assert_eq!(garbled.status, StatusCode::BAD_REQUEST);
        assert!(
            garbled.body["detail"]
                .as_str()
                .unwrap()
                .starts_with("JSON parse error")
        );
        let list = json_object(b"[1]", UNPROCESSABLE).unwrap_err();
        assert_eq!(list.status, UNPROCESSABLE);
        assert_eq!(
            list.body["nonFieldErrors"][0],
            "Invalid data. Expected a dictionary, but got list."
        );
        let missing = parse_proposal(&Map::new()).unwrap_err();
        for field in [
            "to",
            "value",
            "operation",
            "nonce",
            "contractTransactionHash",
            "sender",
        ] {
            assert_eq!(missing[field], vec!["This field is required."], "{field}");
        }
        assert!(!missing.contains_key("data") && !missing.contains_key("signature"));
    }

    #[test]
    fn proposal_fields_are_checked_together() {
        let w = world();
        let p = signed(batch(5), &[&w.owners[0]], w.owners[0].address());
        let mut body = crate::safe::Proposal {
            tx: p.tx.clone(),
            safe_tx_hash: p.contract_transaction_hash,
            sender: p.sender,
            signature: p.signature.clone().unwrap(),
            origin: Some("o".into()),
        }
        .body();
        let round_trip = parse_proposal(body.as_object().unwrap()).unwrap();
        assert_eq!(round_trip.tx, p.tx);
        assert_eq!(round_trip.origin.as_deref(), Some("o"));

        // Numbers are accepted as JSON numbers too.
        body["nonce"] = json!(5);
        assert_eq!(
            parse_proposal(body.as_object().unwrap()).unwrap().tx.nonce,
            5
        );

        body["to"] = json!(p.tx.to.to_string().to_lowercase());
        body["operation"] = json!(2);
        body["value"] = json!("-1");
        body["sender"] = json!(Address::ZERO.to_checksum(None));
        let errors = parse_proposal(body.as_object().unwrap()).unwrap_err();
        assert!(errors["to"][0].ends_with("is not checksumed"));
        assert_eq!(errors["operation"], vec!["\"2\" is not a valid choice."]);
        assert_eq!(
            errors["value"],
            vec!["Ensure this value is greater than or equal to 0."]
        );
        assert!(errors.contains_key("sender"));
    }

    #[test]
    fn an_owner_signed_proposal_is_accepted_with_its_confirmation() {
        let w = world();
        let owner = &w.owners[1];
        let accepted = check(&w, &signed(batch(5), &[owner], owner.address()), &[]).unwrap();
        assert_eq!(accepted.proposer, owner.address());
        assert_eq!(accepted.proposed_by_delegate, None);
        assert_eq!(accepted.confirmations.len(), 1);
        assert!(accepted.trusted);

        // Unsigned: accepted but untrusted, with no confirmation.
        let unsigned = check(&w, &signed(batch(6), &[], owner.address()), &[]).unwrap();
        assert!(!unsigned.trusted && unsigned.confirmations.is_empty());
    }

    #[test]
    fn delegatecall_only_to_the_versions_multisend_call_only() {
        let w = world();
        let owner = &w.owners[0];
        let mut tx = batch(5);
        tx.to = address!("38869bf66a61cF6bDB996A6aE40D5853Fd43B526"); // MultiSend 1.4.1
        let err = check(&w, &signed(tx, &[owner], owner.address()), &[]).unwrap_err();
        assert_eq!(err, "Operation DELEGATE_CALL is not allowed");

        let mut old = w.facts.clone();
        old.version = "1.2.0".into();
        let p = signed(batch(5), &[owner], owner.address());
        let err = validate_proposal(&p, SAFE, &old, &[], &Executions::default()).unwrap_err();
        assert!(err.contains("1.2.0"), "{err}");
    }

    #[test]
    fn the_hash_is_recomputed_for_the_chain() {
        let w = world();
        let owner = &w.owners[0];
        let mut p = signed(batch(5), &[owner], owner.address());
        p.contract_transaction_hash = batch(5).hash(SAFE, 1, SafeVersion::V1_4_1);
        let err = check(&w, &p, &[]).unwrap_err();
        assert!(err.starts_with("Contract-transaction-hash=0x"), "{err}");
        assert!(err.contains("does not match provided contract-tx-hash="));
    }

    #[test]
    fn a_used_nonce_is_rejected() {
        let w = world();
        let owner = &w.owners[0];
        let p = signed(batch(4), &[owner], owner.address());
        let err = check(&w, &p, &[]).unwrap_err();
        assert_eq!(
            err,
            format!(
                "Tx with nonce=4 for safe={} already executed in tx-hash=unknown",
                SAFE.to_checksum(None)
            )
        );
        let executed_in = b256!("00000000000000000000000000000000000000000000000000000000000000aa");
        let mut executions = Executions::default();
        executions.by_nonce.insert(4, executed_in);
        let err = validate_proposal(&p, SAFE, &w.facts, &[], &executions).unwrap_err();
        assert!(err.ends_with(&format!("tx-hash={executed_in}")));

        let current = signed(batch(5), &[owner], owner.address());
        executions.by_hash.insert(
            current.contract_transaction_hash,
            Execution {
                tx_hash: executed_in,
                success: true,
                block_number: 9,
                payment: Default::default(),
                signatures: None,
            },
        );
        let err = validate_proposal(&current, SAFE, &w.facts, &[], &executions).unwrap_err();
        assert!(err.starts_with("Tx with safe-tx-hash="), "{err}");
    }

    #[test]
    fn sender_must_be_an_owner_or_delegate_and_sign() {
        let w = world();
        let stranger = PrivateKeySigner::random();
        let p = signed(batch(5), &[&stranger], stranger.address());
        let err = check(&w, &p, &[]).unwrap_err();
        assert!(
            err.starts_with(&format!(
                "Sender={} is not an owner or delegate. Current owners=['",
                stranger.address().to_checksum(None)
            )),
            "{err}"
        );
        assert!(err.ends_with("Delegates=[]"));

        // Owner 0 sends, owner 1 signed.
        let p = signed(batch(5), &[&w.owners[1]], w.owners[0].address());
        let err = check(&w, &p, &[]).unwrap_err();
        assert!(err.starts_with("Signature does not match sender="), "{err}");

        // A stranger's extra signature.
        let p = signed(batch(5), &[&w.owners[0], &stranger], w.owners[0].address());
        assert!(check(&w, &p, &[]).unwrap_err().starts_with("Signer="));

        // The same owner twice.
        let p = signed(
            batch(5),
            &[&w.owners[0], &w.owners[0]],
            w.owners[0].address(),
        );
        assert!(check(&w, &p, &[]).unwrap_err().contains("duplicated"));

        // Two owners: both confirm.
        let p = signed(
            batch(5),
            &[&w.owners[0], &w.owners[2]],
            w.owners[2].address(),
        );
        assert_eq!(check(&w, &p, &[]).unwrap().confirmations.len(), 2);
    }

    #[test]
    fn a_delegate_proposes_for_its_delegator_without_confirming() {
        let w = world();
        let delegate = PrivateKeySigner::random();
        let delegates = [(delegate.address(), w.owners[2].address())];
        let p = signed(batch(5), &[&delegate], delegate.address());
        let accepted = check(&w, &p, &delegates).unwrap();
        assert_eq!(accepted.proposer, w.owners[2].address());
        assert_eq!(accepted.proposed_by_delegate, Some(delegate.address()));
        assert!(accepted.confirmations.is_empty());
        assert!(accepted.trusted);

        let p = signed(batch(5), &[&delegate, &w.owners[0]], delegate.address());
        assert_eq!(
            check(&w, &p, &delegates).unwrap_err(),
            "Just one signature is expected if using delegates"
        );
    }

    #[test]
    fn eth_sign_signatures_are_understood() {
        let w = world();
        let owner = &w.owners[0];
        let mut p = signed(batch(5), &[], owner.address());
        let mut sig = owner
            .sign_message_sync(p.contract_transaction_hash.as_slice())
            .unwrap()
            .as_bytes();
        sig[64] += 4;
        p.signature = Some(Bytes::copy_from_slice(&sig));
        let accepted = check(&w, &p, &[]).unwrap();
        assert_eq!(accepted.confirmations[0].2, SignatureKind::EthSign);
    }

    #[test]
    fn delegate_registrations_need_the_delegators_signature_for_this_hour() {
        let owner = PrivateKeySigner::random();
        let delegate = PrivateKeySigner::random().address();
        let now = 1_700_000_000;
        let registration =
            crate::safe::DelegateRegistration::sign(&owner, delegate, None, "bridge", CHAIN, now)
                .unwrap();
        let body = registration.body();
        let parsed = parse_delegate(body.as_object().unwrap()).unwrap();
        assert_eq!(parsed.delegator, owner.address());
        assert_eq!(check_delegate_signature(&parsed, CHAIN, now), Ok(()));
        // The previous hour is still accepted, two hours later is not.
        assert_eq!(check_delegate_signature(&parsed, CHAIN, now + 3600), Ok(()));
        assert!(check_delegate_signature(&parsed, CHAIN, now + 7200).is_err());
        assert!(check_delegate_signature(&parsed, 1, now).is_err());

        let mut long = body.clone();
        long["label"] = json!("x".repeat(51));
        long["delegate"] = json!(delegate.to_string().to_lowercase());
        let errors = parse_delegate(long.as_object().unwrap()).unwrap_err();
        assert_eq!(
            errors["label"],
            vec!["Ensure this field has no more than 50 characters."]
        );
        assert!(errors["delegate"][0].ends_with("is not checksumed"));
    }
}
