//! `dataDecoded` of a transaction, as the real service's decoder writes it:
//! `{method, parameters: [{name, type, value}]}`, numbers and booleans as
//! Python prints them (`"0"`, `"True"`), and a MultiSend's packed calls under
//! `valueDecoded`, each decoded in turn. The real decoder knows the Safe's
//! contracts and the ABIs of contracts verified on the chain's explorer; this
//! one knows MultiSend and the DstackApp owner functions, as if the app
//! were verified, and nothing else (`null`).

use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::sol_types::SolCall;
use serde::Serialize;
use serde_json::Value;

alloy::sol! {
    /// The calls this decoder can name.
    interface Decodable {
        function multiSend(bytes transactions);
        function addComposeHash(bytes32 composeHash);
        function removeComposeHash(bytes32 composeHash);
        function addDevice(bytes32 deviceId);
        function removeDevice(bytes32 deviceId);
        function setAllowAnyDevice(bool allowAny);
        function transferOwnership(address newOwner);
        function acceptOwnership();
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct DataDecoded {
    method: &'static str,
    parameters: Vec<Parameter>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct Parameter {
    name: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    value: Value,
    /// A MultiSend's calls; `null` when they do not unpack.
    #[serde(skip_serializing_if = "Option::is_none")]
    value_decoded: Option<Option<Vec<MultiSendCall>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct MultiSendCall {
    operation: u8,
    to: String,
    value: String,
    data: Option<String>,
    data_decoded: Option<DataDecoded>,
}

fn parameter(name: &'static str, kind: &'static str, value: Value) -> Parameter {
    Parameter {
        name,
        kind,
        value,
        value_decoded: None,
    }
}

fn word(value: B256) -> Value {
    Value::String(value.to_string())
}

/// `None` for empty or unknown calldata.
pub(super) fn decode(data: &[u8]) -> Option<DataDecoded> {
    use Decodable::*;
    let selector: [u8; 4] = data.get(..4)?.try_into().ok()?;
    let (method, parameters) = match selector {
        multiSendCall::SELECTOR => {
            let call = multiSendCall::abi_decode(data).ok()?;
            let calls = unpack_multi_send(&call.transactions);
            let mut param = parameter(
                "transactions",
                "bytes",
                Value::String(call.transactions.to_string()),
            );
            param.value_decoded = Some(calls);
            ("multiSend", vec![param])
        }
        addComposeHashCall::SELECTOR => {
            let call = addComposeHashCall::abi_decode(data).ok()?;
            let value = word(call.composeHash);
            (
                "addComposeHash",
                vec![parameter("composeHash", "bytes32", value)],
            )
        }
        removeComposeHashCall::SELECTOR => {
            let call = removeComposeHashCall::abi_decode(data).ok()?;
            let value = word(call.composeHash);
            (
                "removeComposeHash",
                vec![parameter("composeHash", "bytes32", value)],
            )
        }
        addDeviceCall::SELECTOR => {
            let call = addDeviceCall::abi_decode(data).ok()?;
            (
                "addDevice",
                vec![parameter("deviceId", "bytes32", word(call.deviceId))],
            )
        }
        removeDeviceCall::SELECTOR => {
            let call = removeDeviceCall::abi_decode(data).ok()?;
            (
                "removeDevice",
                vec![parameter("deviceId", "bytes32", word(call.deviceId))],
            )
        }
        setAllowAnyDeviceCall::SELECTOR => {
            let call = setAllowAnyDeviceCall::abi_decode(data).ok()?;
            // Python's str(bool).
            let value = if call.allowAny { "True" } else { "False" };
            (
                "setAllowAnyDevice",
                vec![parameter("allowAny", "bool", value.into())],
            )
        }
        transferOwnershipCall::SELECTOR => {
            let call = transferOwnershipCall::abi_decode(data).ok()?;
            let value = call.newOwner.to_checksum(None).into();
            (
                "transferOwnership",
                vec![parameter("newOwner", "address", value)],
            )
        }
        acceptOwnershipCall::SELECTOR => {
            acceptOwnershipCall::abi_decode(data).ok()?;
            ("acceptOwnership", Vec::new())
        }
        _ => return None,
    };
    Some(DataDecoded { method, parameters })
}

/// MultiSend's packed `operation ‖ to ‖ value ‖ length ‖ data` entries.
fn unpack_multi_send(packed: &[u8]) -> Option<Vec<MultiSendCall>> {
    let mut calls = Vec::new();
    let mut rest = packed;
    while !rest.is_empty() {
        let head = rest.get(..85)?;
        let operation = head[0];
        let to = Address::from_slice(&head[1..21]);
        let value = U256::from_be_slice(&head[21..53]);
        let length = usize::try_from(U256::from_be_slice(&head[53..85])).ok()?;
        let data = rest.get(85..85usize.checked_add(length)?)?;
        rest = &rest[85 + length..];
        calls.push(MultiSendCall {
            operation,
            to: to.to_checksum(None),
            value: value.to_string(),
            data: (!data.is_empty()).then(|| Bytes::copy_from_slice(data).to_string()),
            data_decoded: decode(data),
        });
    }
    Some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safe::{Call, Deployment, SafeVersion, build_safe_tx};
    use serde_json::json;

    #[test]
    fn a_batch_decodes_into_its_named_calls() {
        let app = Address::repeat_byte(0xaa);
        let calls = [
            Call::add_device(app, B256::repeat_byte(2)),
            Call::add_compose_hash(app, B256::repeat_byte(1)),
        ];
        let tx = build_safe_tx(&calls, SafeVersion::V1_4_1, Deployment::Canonical, 0).unwrap();
        let decoded = serde_json::to_value(decode(&tx.data).unwrap()).unwrap();
        assert_eq!(decoded["method"], "multiSend");
        let inner = &decoded["parameters"][0]["valueDecoded"];
        assert_eq!(inner.as_array().unwrap().len(), 2);
        assert_eq!(inner[0]["operation"], 0);
        assert_eq!(inner[0]["to"], app.to_checksum(None));
        assert_eq!(inner[0]["value"], "0");
        assert_eq!(
            inner[0]["dataDecoded"],
            json!({"method": "addDevice", "parameters": [
                {"name": "deviceId", "type": "bytes32", "value": B256::repeat_byte(2).to_string()}
            ]})
        );
        assert_eq!(inner[1]["dataDecoded"]["method"], "addComposeHash");
    }

    #[test]
    fn unknown_or_broken_calldata_is_null() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[0xde, 0xad, 0xbe, 0xef, 0]), None);
        let call = Decodable::multiSendCall {
            transactions: Bytes::from_static(&[0, 1, 2]),
        };
        let decoded = serde_json::to_value(decode(&call.abi_encode()).unwrap()).unwrap();
        assert_eq!(decoded["parameters"][0]["valueDecoded"], Value::Null);
        let flag = Decodable::setAllowAnyDeviceCall { allowAny: true };
        let decoded = serde_json::to_value(decode(&flag.abi_encode()).unwrap()).unwrap();
        assert_eq!(decoded["parameters"][0]["value"], "True");
    }
}
