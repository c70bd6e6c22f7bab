//! What the proposer key may sign.
//!
//! A proposal is stored before it is posted, and posted again from its row
//! after a crash or a failure. The row's hash proves only that its fields
//! agree with each other, so before the key signs a stored transaction it is
//! decoded here and checked against the calls the bridge planned for it:
//!
//! - a CALL, value 0, to an app of the proposal's requests; or a
//!   DELEGATECALL, value 0, to the chain's pinned MultiSendCallOnly, whose
//!   packed calls are each such a CALL;
//! - every call `addComposeHash(bytes32)` or `addDevice(bytes32)`, the only
//!   functions the bridge proposes;
//! - exactly the planned calls, once each, in their order; and the gas and
//!   refund fields zero, as [`SafeTx::new`] makes them.
//!
//! Anything else is refused with the reason: the bridge never signs it.

use std::collections::BTreeSet;
use std::fmt;

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::sol_types::SolCall;

use super::tx::{Call, Operation, SafeTx, abi, build_safe_tx, encode_multi_send};
use super::{Deployment, SafeVersion};

/// One registration on a DstackApp, as the Safe calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AppCall {
    AddComposeHash { app: Address, compose_hash: B256 },
    AddDevice { app: Address, device_id: B256 },
}

impl AppCall {
    pub fn app(&self) -> Address {
        match self {
            AppCall::AddComposeHash { app, .. } | AppCall::AddDevice { app, .. } => *app,
        }
    }

    /// The call as the planner builds it.
    pub fn call(&self) -> Call {
        match *self {
            AppCall::AddComposeHash { app, compose_hash } => {
                Call::add_compose_hash(app, compose_hash)
            }
            AppCall::AddDevice { app, device_id } => Call::add_device(app, device_id),
        }
    }
}

impl fmt::Display for AppCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppCall::AddComposeHash { app, compose_hash } => {
                write!(f, "addComposeHash({compose_hash}) on {app}")
            }
            AppCall::AddDevice { app, device_id } => write!(f, "addDevice({device_id}) on {app}"),
        }
    }
}

/// Why a stored transaction is not signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsignable {
    #[error(
        "it sets safeTxGas, baseGas, gasPrice, gasToken or refundReceiver, which the bridge leaves at zero"
    )]
    GasFields,
    #[error("it sends {0} wei from the Safe; the bridge's transactions send none")]
    Value(U256),
    #[error(
        "it DELEGATECALLs {target}, which is not the chain's MultiSendCallOnly for Safe {version}"
    )]
    DelegateCallTarget {
        target: Address,
        version: SafeVersion,
    },
    #[error("its MultiSendCallOnly data does not decode: {0}")]
    Malformed(String),
    #[error("its call {index} has operation {operation}; the bridge batches only CALLs")]
    InnerOperation { index: usize, operation: u8 },
    #[error("its call {index} sends {value} wei to {to}; the bridge's calls send none")]
    CallValue {
        index: usize,
        to: Address,
        value: U256,
    },
    #[error(
        "its call {index} goes to {to}, which is not the app of any of the proposal's requests"
    )]
    UnknownApp { index: usize, to: Address },
    #[error(
        "its call {index} to {to} is selector {selector}, not addComposeHash(bytes32) or addDevice(bytes32)"
    )]
    UnknownSelector {
        index: usize,
        to: Address,
        selector: String,
    },
    #[error("its call {index}, {call}, is not among the proposal's calls")]
    ExtraCall { index: usize, call: AppCall },
    #[error("it lacks the proposal's call {call}")]
    MissingCall { call: AppCall },
    #[error("it makes the proposal's calls, but not once each in the proposal's order")]
    Arrangement,
    #[error("it is not the transaction the bridge builds for the proposal's calls")]
    NotAsBuilt,
}

/// Checks that `tx` makes exactly `planned`, in order, as the bridge builds
/// it for a Safe of `version` on `chain_id`, and calls only `apps`.
pub fn check_signable(
    tx: &SafeTx,
    chain_id: u64,
    version: SafeVersion,
    planned: &[AppCall],
    apps: &BTreeSet<Address>,
) -> Result<(), Unsignable> {
    if !tx.safe_tx_gas.is_zero()
        || !tx.base_gas.is_zero()
        || !tx.gas_price.is_zero()
        || tx.gas_token != Address::ZERO
        || tx.refund_receiver != Address::ZERO
    {
        return Err(Unsignable::GasFields);
    }
    if !tx.value.is_zero() {
        return Err(Unsignable::Value(tx.value));
    }
    let deployment = Deployment::preferred_for_chain(chain_id);
    let raw = match tx.operation {
        Operation::Call => vec![Call {
            to: tx.to,
            value: tx.value,
            data: tx.data.clone(),
        }],
        Operation::DelegateCall => {
            if version.multi_send_call_only(deployment) != Some(tx.to) {
                return Err(Unsignable::DelegateCallTarget {
                    target: tx.to,
                    version,
                });
            }
            unpack_multi_send(&tx.data)?
        }
    };
    let mut decoded = Vec::with_capacity(raw.len());
    for (index, call) in raw.iter().enumerate() {
        if !call.value.is_zero() {
            return Err(Unsignable::CallValue {
                index,
                to: call.to,
                value: call.value,
            });
        }
        if !apps.contains(&call.to) {
            return Err(Unsignable::UnknownApp { index, to: call.to });
        }
        decoded.push(app_call(index, call)?);
    }
    if let Some((index, call)) = decoded
        .iter()
        .enumerate()
        .find(|(_, c)| !planned.contains(c))
    {
        return Err(Unsignable::ExtraCall { index, call: *call });
    }
    if let Some(call) = planned.iter().find(|c| !decoded.contains(c)) {
        return Err(Unsignable::MissingCall { call: *call });
    }
    if decoded != planned {
        return Err(Unsignable::Arrangement);
    }
    let calls: Vec<Call> = planned.iter().map(AppCall::call).collect();
    match build_safe_tx(&calls, version, deployment, tx.nonce) {
        Ok(built) if built == *tx => Ok(()),
        _ => Err(Unsignable::NotAsBuilt),
    }
}

/// `addComposeHash(bytes32)` or `addDevice(bytes32)`, exactly 36 bytes.
fn app_call(index: usize, call: &Call) -> Result<AppCall, Unsignable> {
    let unknown = || Unsignable::UnknownSelector {
        index,
        to: call.to,
        selector: Bytes::copy_from_slice(&call.data[..call.data.len().min(4)]).to_string(),
    };
    let selector: [u8; 4] = call
        .data
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(unknown)?;
    let argument = || -> Result<B256, Unsignable> {
        match call.data.len() {
            36 => Ok(B256::from_slice(&call.data[4..])),
            n => Err(Unsignable::Malformed(format!(
                "call {index} is {n} bytes, not a selector and one bytes32"
            ))),
        }
    };
    match selector {
        abi::addComposeHashCall::SELECTOR => Ok(AppCall::AddComposeHash {
            app: call.to,
            compose_hash: argument()?,
        }),
        abi::addDeviceCall::SELECTOR => Ok(AppCall::AddDevice {
            app: call.to,
            device_id: argument()?,
        }),
        _ => Err(unknown()),
    }
}

/// The packed calls of `multiSend(bytes)` calldata: per call
/// `uint8 operation ‖ address ‖ uint256 value ‖ uint256 length ‖ data`.
/// Only the encoding [`encode_multi_send`] writes is accepted.
fn unpack_multi_send(data: &[u8]) -> Result<Vec<Call>, Unsignable> {
    let malformed = |why: &str| Unsignable::Malformed(why.to_owned());
    if data.get(..4) != Some(abi::multiSendCall::SELECTOR.as_slice()) {
        return Err(malformed("it is not multiSend(bytes)"));
    }
    let packed = abi::multiSendCall::abi_decode(data)
        .map_err(|_| malformed("its multiSend(bytes) argument is not ABI-encoded bytes"))?
        .transactions;
    let mut calls = Vec::new();
    let mut rest = &packed[..];
    while !rest.is_empty() {
        let index = calls.len();
        let head = rest
            .get(..85)
            .ok_or_else(|| malformed("a packed call is cut short"))?;
        if head[0] != Operation::Call as u8 {
            return Err(Unsignable::InnerOperation {
                index,
                operation: head[0],
            });
        }
        let length = usize::try_from(U256::from_be_slice(&head[53..85]))
            .map_err(|_| malformed("a packed call's length is out of range"))?;
        let end = 85usize
            .checked_add(length)
            .filter(|end| *end <= rest.len())
            .ok_or_else(|| malformed("a packed call's data is cut short"))?;
        calls.push(Call {
            to: Address::from_slice(&head[1..21]),
            value: U256::from_be_slice(&head[21..53]),
            data: Bytes::copy_from_slice(&rest[85..end]),
        });
        rest = &rest[end..];
    }
    if calls.is_empty() {
        return Err(malformed("it batches no call"));
    }
    if encode_multi_send(&calls)[..] != *data {
        return Err(malformed("it is not encoded as the bridge encodes a batch"));
    }
    Ok(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::address;

    const APP: Address = address!("5FbDB2315678afecb367f032d93F642f64180aa3");
    const OTHER_APP: Address = address!("e7f1725E7734CE288F8367e1Bb143E90bb3F0512");
    const EVIL: Address = address!("00000000000000000000000000000000000000ee");
    const CHAIN: u64 = 31337;
    const V: SafeVersion = SafeVersion::V1_4_1;

    fn device(app: Address, byte: u8) -> AppCall {
        AppCall::AddDevice {
            app,
            device_id: B256::repeat_byte(byte),
        }
    }

    fn compose(app: Address, byte: u8) -> AppCall {
        AppCall::AddComposeHash {
            app,
            compose_hash: B256::repeat_byte(byte),
        }
    }

    fn apps() -> BTreeSet<Address> {
        BTreeSet::from([APP, OTHER_APP])
    }

    /// What the planner builds for `calls`.
    fn built(calls: &[AppCall]) -> SafeTx {
        let calls: Vec<Call> = calls.iter().map(AppCall::call).collect();
        build_safe_tx(&calls, V, Deployment::Canonical, 3).unwrap()
    }

    fn batch_of(calls: &[Call]) -> SafeTx {
        SafeTx::new(
            V.multi_send_call_only(Deployment::Canonical).unwrap(),
            U256::ZERO,
            encode_multi_send(calls),
            Operation::DelegateCall,
            3,
        )
    }

    fn check(tx: &SafeTx, planned: &[AppCall]) -> Result<(), Unsignable> {
        check_signable(tx, CHAIN, V, planned, &apps())
    }

    #[test]
    fn what_the_planner_builds_is_signable() {
        for planned in [
            vec![device(APP, 1)],
            vec![compose(APP, 2)],
            vec![device(APP, 1), device(OTHER_APP, 3), compose(APP, 2)],
        ] {
            assert_eq!(check(&built(&planned), &planned), Ok(()), "{planned:?}");
        }
        // 1.3.0 on Base batches through the eip155 copy.
        let planned = [device(APP, 1), compose(APP, 2)];
        let calls: Vec<Call> = planned.iter().map(AppCall::call).collect();
        let base = build_safe_tx(&calls, SafeVersion::V1_3_0, Deployment::Eip155, 0).unwrap();
        assert_eq!(
            check_signable(&base, 8453, SafeVersion::V1_3_0, &planned, &apps()),
            Ok(())
        );
        // The other 1.3.0 copy is a MultiSendCallOnly too, but not the one the bridge uses there.
        assert!(matches!(
            check_signable(&base, 1, SafeVersion::V1_3_0, &planned, &apps()),
            Err(Unsignable::DelegateCallTarget { .. })
        ));
    }

    #[test]
    fn a_delegatecall_to_another_address_is_refused() {
        let planned = [device(APP, 1), compose(APP, 2)];
        let mut tx = built(&planned);
        for target in [
            EVIL,
            APP,
            // MultiSend (not CallOnly) 1.4.1: it could delegatecall further.
            address!("38869bf66a61cF6bDB996A6aE40D5853Fd43B526"),
        ] {
            tx.to = target;
            assert_eq!(
                check(&tx, &planned),
                Err(Unsignable::DelegateCallTarget { target, version: V })
            );
        }
        // A single call made as a DELEGATECALL of the app itself.
        let mut single = built(&planned[..1]);
        single.operation = Operation::DelegateCall;
        assert!(matches!(
            check(&single, &planned[..1]),
            Err(Unsignable::DelegateCallTarget { target: APP, .. })
        ));
    }

    #[test]
    fn a_non_zero_value_is_refused_outside_and_inside_a_batch() {
        let planned = [device(APP, 1)];
        let mut tx = built(&planned);
        tx.value = U256::from(1);
        assert_eq!(check(&tx, &planned), Err(Unsignable::Value(U256::from(1))));

        let planned = [device(APP, 1), compose(APP, 2)];
        let mut calls: Vec<Call> = planned.iter().map(AppCall::call).collect();
        calls[1].value = U256::from(5);
        assert_eq!(
            check(&batch_of(&calls), &planned),
            Err(Unsignable::CallValue {
                index: 1,
                to: APP,
                value: U256::from(5)
            })
        );
    }

    #[test]
    fn an_unknown_selector_is_refused() {
        // transferOwnership(address) on the app: it would give the app away.
        let mut data = vec![0xf2, 0xfd, 0xe3, 0x8b];
        data.extend_from_slice(&[0u8; 12]);
        data.extend_from_slice(EVIL.as_slice());
        let give_away = Call {
            to: APP,
            value: U256::ZERO,
            data: data.into(),
        };
        let planned = [device(APP, 1)];
        let single = SafeTx::new(APP, U256::ZERO, give_away.data.clone(), Operation::Call, 3);
        assert_eq!(
            check(&single, &planned),
            Err(Unsignable::UnknownSelector {
                index: 0,
                to: APP,
                selector: "0xf2fde38b".into()
            })
        );
        let batch = batch_of(&[planned[0].call(), give_away]);
        assert!(matches!(
            check(&batch, &planned),
            Err(Unsignable::UnknownSelector { index: 1, .. })
        ));
        // An allowed selector with trailing bytes is not the bridge's call either.
        let mut long = planned[0].call();
        long.data = [long.data.to_vec(), vec![0]].concat().into();
        let tx = SafeTx::new(APP, U256::ZERO, long.data, Operation::Call, 3);
        assert!(matches!(
            check(&tx, &planned),
            Err(Unsignable::Malformed(_))
        ));
        // No selector at all: a plain transfer of nothing.
        let empty = SafeTx::new(APP, U256::ZERO, Bytes::new(), Operation::Call, 3);
        assert!(matches!(
            check(&empty, &planned),
            Err(Unsignable::UnknownSelector { .. })
        ));
    }

    #[test]
    fn a_call_to_a_contract_that_is_no_app_of_the_proposal_is_refused() {
        let planned = [device(APP, 1)];
        let tx = built(&[device(EVIL, 1)]);
        assert_eq!(
            check(&tx, &planned),
            Err(Unsignable::UnknownApp { index: 0, to: EVIL })
        );
    }

    #[test]
    fn an_extra_call_is_refused() {
        let planned = [device(APP, 1), compose(APP, 2)];
        let tx = built(&[device(APP, 1), device(APP, 9), compose(APP, 2)]);
        assert_eq!(
            check(&tx, &planned),
            Err(Unsignable::ExtraCall {
                index: 1,
                call: device(APP, 9)
            })
        );
        // The same call twice.
        let twice = batch_of(&[planned[0].call(), planned[0].call(), planned[1].call()]);
        assert_eq!(check(&twice, &planned), Err(Unsignable::Arrangement));
    }

    #[test]
    fn a_missing_call_is_refused() {
        let planned = [device(APP, 1), compose(APP, 2)];
        let tx = built(&planned[..1]);
        assert_eq!(
            check(&tx, &planned),
            Err(Unsignable::MissingCall {
                call: compose(APP, 2)
            })
        );
        // Nothing planned: nothing to sign.
        assert!(check(&tx, &[]).is_err());
    }

    #[test]
    fn the_planned_calls_in_another_order_or_shape_are_refused() {
        let planned = [device(APP, 1), compose(APP, 2)];
        let swapped = built(&[compose(APP, 2), device(APP, 1)]);
        assert_eq!(check(&swapped, &planned), Err(Unsignable::Arrangement));
        // One call, batched: the bridge makes a direct CALL of it.
        let batched_one = batch_of(&[planned[0].call()]);
        assert_eq!(
            check(&batched_one, &planned[..1]),
            Err(Unsignable::NotAsBuilt)
        );
    }

    #[test]
    fn gas_and_refund_fields_must_stay_zero() {
        let planned = [device(APP, 1)];
        let base = built(&planned);
        let changes: [fn(&mut SafeTx); 5] = [
            |tx| tx.safe_tx_gas = U256::from(1),
            |tx| tx.base_gas = U256::from(1),
            |tx| tx.gas_price = U256::from(1),
            |tx| tx.gas_token = EVIL,
            |tx| tx.refund_receiver = EVIL,
        ];
        for change in changes {
            let mut tx = base.clone();
            change(&mut tx);
            assert_eq!(check(&tx, &planned), Err(Unsignable::GasFields));
        }
    }

    #[test]
    fn a_batch_that_does_not_decode_or_delegatecalls_inside_is_refused() {
        let planned = [device(APP, 1), compose(APP, 2)];
        let good = built(&planned);
        let mut inner = good.clone();
        // The first packed call's operation byte, after the selector, offset and length words.
        let mut data = inner.data.to_vec();
        data[4 + 64] = 1;
        inner.data = data.into();
        assert_eq!(
            check(&inner, &planned),
            Err(Unsignable::InnerOperation {
                index: 0,
                operation: 1
            })
        );
        let mut cut = good.clone();
        cut.data = good.data[..good.data.len() - 40].to_vec().into();
        assert!(matches!(
            check(&cut, &planned),
            Err(Unsignable::Malformed(_))
        ));
        let mut other = good.clone();
        other.data = Bytes::from(vec![0xde, 0xad, 0xbe, 0xef]);
        assert!(matches!(
            check(&other, &planned),
            Err(Unsignable::Malformed(_))
        ));
    }
}
