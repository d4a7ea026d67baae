//! JWT verification: HS256 from a shared secret, RS256/ES256 from configured public keys,
//! and whatever an identity provider's JWKS endpoint publishes (`jwks`), with exp, nbf, iss
//! and aud checked. The claims name the caller's tenant, tier and, for the
//! admin API, role.

use super::jwks::Jwks;
use super::verifying_key::VerifyingKey;
use crate::config::JwtConfig;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::sync::Arc;

pub struct JwtVerifier {
    keys: Vec<VerifyingKey>,
    /// The provider's published keys, when `jwks_url` is configured.
    pub jwks: Option<Arc<Jwks>>,
    tenant_claim: String,
    tier_claim: String,
    role_claim: String,
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub subject: String,
    pub tenant: Option<String>,
    pub tier: Option<String>,
    pub role: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("no configured key verifies {0} tokens")]
    NoKeyForAlgorithm(String),
    #[error("no key has the id '{0}'")]
    UnknownKid(String),
    #[error("{0}")]
    Rejected(jsonwebtoken::errors::Error),
    #[error("the token has no 'sub' claim")]
    NoSubject,
    #[error("claim '{0}' must be a string")]
    ClaimNotString(String),
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> Result<Self, jsonwebtoken::errors::Error> {
        let validation = |alg: Algorithm| {
            let mut v = Validation::new(alg);
            v.leeway = config.leeway_secs;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            match &config.issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            match &config.audience {
                Some(aud) => v.set_audience(&[aud]),
                // A gateway that names no audience accepts tokens for any.
                None => v.validate_aud = false,
            }
            v
        };
        let jwks = config
            .jwks
            .clone()
            .map(|j| Arc::new(Jwks::new(j, validation(Algorithm::RS256))));
        let mut keys = Vec::new();
        if let Some(secret) = &config.hs256_secret {
            keys.push(VerifyingKey {
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: validation(Algorithm::HS256),
            });
        }
        for pk in &config.public_keys {
            let key = match pk.algorithm {
                Algorithm::ES256 => DecodingKey::from_ec_pem(pk.pem.as_bytes())?,
                _ => DecodingKey::from_rsa_pem(pk.pem.as_bytes())?,
            };
            keys.push(VerifyingKey {
                kid: pk.kid.clone(),
                key,
                validation: validation(pk.algorithm),
            });
        }
        Ok(JwtVerifier {
            keys,
            jwks,
            tenant_claim: config.tenant_claim.clone(),
            tier_claim: config.tier_claim.clone(),
            role_claim: config.role_claim.clone(),
        })
    }

    /// Verifies a token; one that names a key id no key has makes the JWKS be fetched again
    /// (rate-bounded, see `jwks`) and is verified once more, so rotated keys work at once.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, JwtError> {
        match (self.verify_with_keys_in_hand(token), &self.jwks) {
            (Err(JwtError::UnknownKid(_)), Some(jwks)) if jwks.refresh_for_unknown_kid().await => {
                self.verify_with_keys_in_hand(token)
            }
            (result, _) => result,
        }
    }

    pub fn verify_with_keys_in_hand(&self, token: &str) -> Result<VerifiedToken, JwtError> {
        let header = decode_header(token).map_err(JwtError::Rejected)?;
        let published = self.jwks.as_ref().map(|j| j.keys());
        let candidates = self
            .keys
            .iter()
            .chain(published.iter().flat_map(|keys| keys.iter()))
            .filter(|k| {
                k.validation.algorithms.contains(&header.alg)
                    && (header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
            });
        let mut last_error = None;
        let mut tried = false;
        for candidate in candidates {
            tried = true;
            match decode::<Map<String, Value>>(token, &candidate.key, &candidate.validation) {
                Ok(data) => return self.read_claims(data.claims),
                Err(e) => last_error = Some(e),
            }
        }
        Err(match (last_error, header.kid) {
            (Some(e), _) => JwtError::Rejected(e),
            (None, Some(kid)) if !tried && self.jwks.is_some() => JwtError::UnknownKid(kid),
            (None, _) => JwtError::NoKeyForAlgorithm(format!("{:?}", header.alg)),
        })
    }

    fn read_claims(&self, claims: Map<String, Value>) -> Result<VerifiedToken, JwtError> {
        let string_claim = |name: &str| match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(JwtError::ClaimNotString(name.to_owned())),
        };
        Ok(VerifiedToken {
            subject: string_claim("sub")?.ok_or(JwtError::NoSubject)?,
            tenant: string_claim(&self.tenant_claim)?,
            tier: string_claim(&self.tier_claim)?,
            role: string_claim(&self.role_claim)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "a-test-secret-that-is-long-enough-for-hs256";

    fn config() -> JwtConfig {
        JwtConfig {
            issuer: Some("https://issuer.example".into()),
            audience: Some("sluice".into()),
            hs256_secret: Some(SECRET.into()),
            public_keys: Vec::new(),
            tenant_claim: "tenant".into(),
            tier_claim: "tier".into(),
            role_claim: "role".into(),
            leeway_secs: 0,
            jwks: None,
        }
    }

    fn now() -> i64 {
        jsonwebtoken::get_current_timestamp() as i64
    }

    fn token(claims: Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn good_claims() -> Value {
        json!({"sub": "u1", "tenant": "acme", "tier": "pro", "iss": "https://issuer.example",
               "aud": "sluice", "exp": now() + 60})
    }

    #[test]
    fn a_good_token_names_tenant_and_tier() {
        let v = JwtVerifier::new(&config()).unwrap();
        let t = v
            .verify_with_keys_in_hand(&token(good_claims(), SECRET))
            .unwrap();
        assert_eq!(t.subject, "u1");
        assert_eq!(t.tenant.as_deref(), Some("acme"));
        assert_eq!(t.tier.as_deref(), Some("pro"));
        assert_eq!(t.role, None);
    }

    #[test]
    fn bad_signature_expiry_issuer_audience_and_nbf_are_refused() {
        let v = JwtVerifier::new(&config()).unwrap();
        assert!(v
            .verify_with_keys_in_hand(&token(good_claims(), "another-secret-another-secret-xx"))
            .is_err());
        let mut c = good_claims();
        c["exp"] = json!(now() - 10);
        assert!(v.verify_with_keys_in_hand(&token(c, SECRET)).is_err());
        let mut c = good_claims();
        c["iss"] = json!("https://evil.example");
        assert!(v.verify_with_keys_in_hand(&token(c, SECRET)).is_err());
        let mut c = good_claims();
        c["aud"] = json!("someone-else");
        assert!(v.verify_with_keys_in_hand(&token(c, SECRET)).is_err());
        let mut c = good_claims();
        c["nbf"] = json!(now() + 3600);
        assert!(v.verify_with_keys_in_hand(&token(c, SECRET)).is_err());
        let mut c = good_claims();
        c.as_object_mut().unwrap().remove("exp");
        assert!(v.verify_with_keys_in_hand(&token(c, SECRET)).is_err());
    }

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn rs256_and_es256_tokens_verify_against_their_public_keys() {
        use crate::config::PublicKeyConfig;
        let mut cfg = config();
        cfg.hs256_secret = None;
        cfg.public_keys = vec![
            PublicKeyConfig {
                algorithm: Algorithm::RS256,
                pem: fixture("rsa-public.pem"),
                kid: Some("rsa-1".into()),
            },
            PublicKeyConfig {
                algorithm: Algorithm::ES256,
                pem: fixture("ec-public.pem"),
                kid: None,
            },
        ];
        let v = JwtVerifier::new(&cfg).unwrap();
        let rsa = EncodingKey::from_rsa_pem(fixture("rsa-private.pem").as_bytes()).unwrap();
        let ec = EncodingKey::from_ec_pem(fixture("ec-private.pem").as_bytes()).unwrap();

        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        let token = encode(&header, &good_claims(), &rsa).unwrap();
        assert_eq!(v.verify_with_keys_in_hand(&token).unwrap().subject, "u1");

        let token = encode(&Header::new(Algorithm::ES256), &good_claims(), &ec).unwrap();
        assert_eq!(
            v.verify_with_keys_in_hand(&token)
                .unwrap()
                .tenant
                .as_deref(),
            Some("acme")
        );

        // An HS256 token is refused when no shared secret is configured, even if it is
        // "signed" with the public key's text (the classic algorithm-confusion attack).
        let forged = token_with_secret_bytes(fixture("rsa-public.pem").as_bytes());
        assert!(v.verify_with_keys_in_hand(&forged).is_err());

        // A token for another kid is not tried against this key.
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-2".into());
        let token = encode(&header, &good_claims(), &rsa).unwrap();
        assert!(v.verify_with_keys_in_hand(&token).is_err());
    }

    fn token_with_secret_bytes(secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &good_claims(),
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }
}
