//! Turning revert data into words a person can act on.

use alloy::primitives::Address;
use alloy::sol_types::{Revert, SolError};

alloy::sol! {
    error OwnableUnauthorizedAccount(address account);
    error OwnableInvalidOwner(address owner);
    error NotOwner(address caller);
}

/// Decodes the standard `Error(string)`, the DstackApp's owner errors and
/// Safe `GSxxx` codes; anything else is shown as hex.
pub fn decode_revert(data: &[u8]) -> String {
    if let Ok(revert) = Revert::abi_decode(data) {
        return revert.reason;
    }
    if let Ok(err) = OwnableUnauthorizedAccount::abi_decode(data) {
        return format!(
            "OwnableUnauthorizedAccount({}): the caller is not the app's owner",
            checksum(err.account)
        );
    }
    if let Ok(err) = OwnableInvalidOwner::abi_decode(data) {
        return format!("OwnableInvalidOwner({})", checksum(err.owner));
    }
    if let Ok(err) = NotOwner::abi_decode(data) {
        return format!(
            "NotOwner({}): the caller is not the app's owner",
            checksum(err.caller)
        );
    }
    if data.is_empty() {
        "reverted without a reason".to_owned()
    } else {
        format!("reverted with data 0x{}", hex::encode(data))
    }
}

fn checksum(address: Address) -> String {
    address.to_checksum(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_reverts_are_named() {
        let owner = Address::repeat_byte(0x11);
        let data = OwnableUnauthorizedAccount { account: owner }.abi_encode();
        assert!(decode_revert(&data).starts_with("OwnableUnauthorizedAccount(0x1111"));
        let data = Revert::from("GS013").abi_encode();
        assert_eq!(decode_revert(&data), "GS013");
        assert_eq!(decode_revert(&[]), "reverted without a reason");
        assert_eq!(decode_revert(&[0xde, 0xad]), "reverted with data 0xdead");
    }
}
