//! Bearer-token auth for the JSON API. Tokens come from configuration and are
//! kept only as SHA-256 digests, compared in constant time.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::NamedSecrets;
use crate::domain::Actor;
use crate::web::AppState;
use crate::web::error::ApiError;

#[derive(Clone, Debug, Default)]
pub struct ApiTokens {
    digests: Vec<(String, [u8; 32])>,
}

impl ApiTokens {
    pub fn new(tokens: &NamedSecrets) -> Self {
        ApiTokens {
            digests: tokens
                .0
                .iter()
                .map(|(name, token)| {
                    (
                        name.clone(),
                        Sha256::digest(token.expose_secret().as_bytes()).into(),
                    )
                })
                .collect(),
        }
    }

    /// The token's name, checking every token so timing reveals nothing.
    pub fn verify(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (name, expected) in &self.digests {
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// An authenticated API caller.
pub struct ApiCaller(pub Actor);

impl FromRequestParts<AppState> for ApiCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("missing `Authorization: Bearer <token>` header")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        let name = state
            .api_tokens
            .verify(token)
            .ok_or_else(|| ApiError::unauthorized("unknown API token"))?;
        Ok(ApiCaller(Actor::ApiClient(name.to_owned())))
    }
}
