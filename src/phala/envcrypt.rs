//! Env encryption for a CVM, byte-compatible with Phala's dstack SDK:
//! X25519 with an ephemeral key, the raw shared secret as the AES-256-GCM key
//! (no KDF), and `hex(ephemeral_pub ‖ iv ‖ ciphertext ‖ tag)` without `0x`.

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{AeadCore, Aes256Gcm};
use x25519_dalek::{EphemeralSecret, PublicKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvCryptError {
    #[error("the app's env public key is not 32 bytes of hex")]
    BadPublicKey,
    /// A low-order point (all zeros, say): the shared secret, and so the
    /// AES key, would be all zeros, known to anyone.
    #[error(
        "the app's env public key is a low-order point, which makes a shared secret anyone knows"
    )]
    LowOrderPublicKey,
}

/// Encrypts `env` for the holder of `public_key_hex` (`0x` optional).
pub fn encrypt_env(
    public_key_hex: &str,
    env: &BTreeMap<String, String>,
) -> Result<String, EnvCryptError> {
    let digits = public_key_hex.trim().trim_start_matches("0x");
    let mut recipient = [0u8; 32];
    hex::decode_to_slice(digits, &mut recipient).map_err(|_| EnvCryptError::BadPublicKey)?;

    let ephemeral = EphemeralSecret::random_from_rng(OsRng);
    let ephemeral_public = PublicKey::from(&ephemeral);
    let shared = ephemeral.diffie_hellman(&PublicKey::from(recipient));
    if !shared.was_contributory() {
        return Err(EnvCryptError::LowOrderPublicKey);
    }

    let cipher = Aes256Gcm::new(shared.as_bytes().into());
    let iv = Aes256Gcm::generate_nonce(&mut OsRng);
    let ciphertext = cipher
        .encrypt(&iv, plaintext(env).as_slice())
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");

    let mut out = Vec::with_capacity(32 + 12 + ciphertext.len());
    out.extend_from_slice(ephemeral_public.as_bytes());
    out.extend_from_slice(&iv);
    out.extend_from_slice(&ciphertext);
    Ok(hex::encode(out))
}

/// `{"env":[{"key":K,"value":V},…]}`, compact, as `JSON.stringify` writes it.
fn plaintext(env: &BTreeMap<String, String>) -> Vec<u8> {
    let entries: Vec<serde_json::Value> = env
        .iter()
        .map(|(key, value)| serde_json::json!({"key": key, "value": value}))
        .collect();
    serde_json::to_vec(&serde_json::json!({ "env": entries }))
        .expect("serializing strings cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::Nonce;
    use x25519_dalek::StaticSecret;

    /// What the KMS does with the recipient's secret key.
    fn decrypt(secret: &StaticSecret, encrypted_hex: &str) -> Vec<u8> {
        let bytes = hex::decode(encrypted_hex).unwrap();
        let (ephemeral, rest) = bytes.split_at(32);
        let (iv, ciphertext) = rest.split_at(12);
        let ephemeral: [u8; 32] = ephemeral.try_into().unwrap();
        let shared = secret.diffie_hellman(&PublicKey::from(ephemeral));
        Aes256Gcm::new(shared.as_bytes().into())
            .decrypt(Nonce::from_slice(iv), ciphertext)
            .unwrap()
    }

    #[test]
    fn the_recipient_decrypts_what_we_encrypt() {
        let secret = StaticSecret::random_from_rng(OsRng);
        let public = hex::encode(PublicKey::from(&secret).as_bytes());
        let env = BTreeMap::from([
            ("API_URL".to_owned(), "https://x".to_owned()),
            ("TOKEN".to_owned(), "s3cr\"et".to_owned()),
        ]);

        for key in [public.clone(), format!("0x{public}")] {
            let encrypted = encrypt_env(&key, &env).unwrap();
            assert!(!encrypted.starts_with("0x"));
            assert_eq!(encrypted, encrypted.to_lowercase());
            let plain = decrypt(&secret, &encrypted);
            assert_eq!(
                String::from_utf8(plain).unwrap(),
                r#"{"env":[{"key":"API_URL","value":"https://x"},{"key":"TOKEN","value":"s3cr\"et"}]}"#
            );
        }
    }

    #[test]
    fn each_encryption_uses_a_fresh_ephemeral_key_and_iv() {
        let public = hex::encode(PublicKey::from(&StaticSecret::random_from_rng(OsRng)).as_bytes());
        let env = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        let a = encrypt_env(&public, &env).unwrap();
        let b = encrypt_env(&public, &env).unwrap();
        assert_ne!(a[..88], b[..88]);
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        let env = BTreeMap::from([("TOKEN".to_owned(), "secret".to_owned())]);
        // 0 and 1 are points of small order on Curve25519; so is this one of order 8.
        let order_eight = "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800";
        for key in [
            &"00".repeat(32),
            &format!("01{}", "00".repeat(31)),
            order_eight,
        ] {
            assert_eq!(
                encrypt_env(key, &env),
                Err(EnvCryptError::LowOrderPublicKey),
                "{key}"
            );
        }
    }

    #[test]
    fn a_malformed_public_key_is_refused() {
        assert_eq!(
            encrypt_env("abcd", &BTreeMap::new()),
            Err(EnvCryptError::BadPublicKey)
        );
    }
}
