//! On-chain identifiers as Phala and the DstackApp contract use them.

use std::fmt;
use std::str::FromStr;

use alloy::primitives::{Address, B256};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(String);

/// A compose hash or device id: the bytes32 argument of `addComposeHash` / `addDevice`.
///
/// Phala sends these as bare hex; users often add `0x`. Both parse; the
/// canonical text form is `0x` plus 64 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bytes32(pub B256);

impl Bytes32 {
    /// Bare lowercase hex, the form Phala Cloud uses in its bodies.
    pub fn bare_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for Bytes32 {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = strip_0x(s.trim());
        if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidId(format!(
                "`{}` is not 32 bytes of hex (64 hex digits, `0x` optional)",
                shorten(s)
            )));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).expect("checked hex digits");
        Ok(Bytes32(B256::from(bytes)))
    }
}

impl fmt::Display for Bytes32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

/// A Phala app id: the address of the app's DstackApp contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppId(pub Address);

impl FromStr for AppId {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let digits = strip_0x(s.strip_prefix("app_").unwrap_or(s));
        if digits.len() != 40 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InvalidId(format!(
                "`{}` is not an app id (a 20-byte address in hex)",
                shorten(s)
            )));
        }
        let mut bytes = [0u8; 20];
        hex::decode_to_slice(digits, &mut bytes).expect("checked hex digits");
        Ok(AppId(Address::from(bytes)))
    }
}

impl fmt::Display for AppId {
    /// Lowercase `0x` form; checksums are for display to people, not for storage.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{}", hex::encode(self.0))
    }
}

fn strip_0x(s: &str) -> &str {
    s.strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s)
}

/// Echo at most a short prefix of bad input back in an error message.
fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes32_accepts_bare_and_prefixed_hex() {
        let bare = "AB".repeat(32);
        let a: Bytes32 = bare.parse().unwrap();
        let b: Bytes32 = format!("0x{bare}").parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), format!("0x{}", "ab".repeat(32)));
        assert_eq!(a.bare_hex(), "ab".repeat(32));
    }

    #[test]
    fn bytes32_rejects_wrong_length_and_non_hex() {
        assert!("0x1234".parse::<Bytes32>().is_err());
        assert!("zz".repeat(32).parse::<Bytes32>().is_err());
        assert!("ab".repeat(33).parse::<Bytes32>().is_err());
    }

    #[test]
    fn app_id_accepts_phala_forms() {
        let hex40 = "1f".repeat(20);
        let plain: AppId = hex40.parse().unwrap();
        assert_eq!(format!("0x{hex40}").parse::<AppId>().unwrap(), plain);
        assert_eq!(format!("app_{hex40}").parse::<AppId>().unwrap(), plain);
        assert_eq!(plain.to_string(), format!("0x{hex40}"));
        assert!("0x1234".parse::<AppId>().is_err());
    }
}
