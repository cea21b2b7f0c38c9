//! Access tokens: short-lived HS256 JWTs with a `kid` header so signing keys can rotate.

use std::collections::HashMap;

use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::AuthError;
use crate::config::AuthSettings;
use crate::modules::users::Role;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: Uuid,
    pub role: Role,
    /// This token's id, denied on logout.
    pub jti: Uuid,
    /// The refresh-token family (session) this token belongs to.
    pub sid: Uuid,
    pub iat: i64,
    pub exp: i64,
}

pub struct TokenKeys {
    active_kid: String,
    signing: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    validation: Validation,
    access_ttl_secs: i64,
}

impl TokenKeys {
    pub fn new(settings: &AuthSettings) -> Result<Self, AuthError> {
        let secret = settings
            .keys
            .get(&settings.active_kid)
            .ok_or(AuthError::Config("auth.active_kid names no key"))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            active_kid: settings.active_kid.clone(),
            signing: EncodingKey::from_secret(secret.as_bytes()),
            verifying: settings
                .keys
                .iter()
                .map(|(kid, secret)| (kid.clone(), DecodingKey::from_secret(secret.as_bytes())))
                .collect(),
            validation,
            access_ttl_secs: i64::try_from(settings.access_ttl_secs)
                .map_err(|_| AuthError::Config("auth.access_ttl_secs is too large"))?,
        })
    }

    pub fn access_ttl_secs(&self) -> i64 {
        self.access_ttl_secs
    }

    /// Signs a new access token for `user_id` in session `sid`.
    pub fn issue(&self, user_id: Uuid, role: Role, sid: Uuid) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp();
        let claims = AccessClaims {
            sub: user_id,
            role,
            jti: Uuid::new_v4(),
            sid,
            iat: now,
            exp: now + self.access_ttl_secs,
        };
        self.sign(&claims)
    }

    pub fn sign(&self, claims: &AccessClaims) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.active_kid.clone());
        encode(&header, claims, &self.signing).map_err(|e| AuthError::Token(e.to_string()))
    }

    /// Checks signature, algorithm, key id and expiry. Says nothing about revocation.
    pub fn verify(&self, token: &str) -> Result<AccessClaims, AuthError> {
        let header = decode_header(token).map_err(|_| AuthError::InvalidToken)?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.verifying.get(kid))
            .ok_or(AuthError::InvalidToken)?;
        decode::<AccessClaims>(token, key, &self.validation)
            .map(|data| data.claims)
            .map_err(|_| AuthError::InvalidToken)
    }
}
