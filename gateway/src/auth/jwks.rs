//! Keys from an identity provider's JWKS endpoint (`jwks_url` in `[auth.jwt]` or
//! `[auth.admin_jwt]`): fetched at start, again every `jwks_refresh_secs`, and when a token
//! names a key id the set lacks, at most once per `jwks_min_refresh_secs` however many such
//! tokens arrive. A provider's key rotation needs no restart, and made-up key ids cannot make
//! the gateway hammer the provider.

use super::verifying_key::VerifyingKey;
use crate::config::JwksConfig;
use crate::outbound::Outbound;
use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A key set larger than this is not a key set.
const MAX_BODY_BYTES: usize = 1 << 20;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Jwks {
    config: JwksConfig,
    http: Outbound,
    /// Issuer, audience and leeway, which every key's validation starts from.
    base: Validation,
    keys: ArcSwap<Vec<VerifyingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot fetch {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} answered more than {MAX_BODY_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url} did not answer a JWK set: {reason}")]
    NotAKeySet { url: String, reason: String },
}

impl Jwks {
    pub fn new(config: JwksConfig, base: Validation) -> Jwks {
        let http = Outbound::default();
        Jwks {
            config,
            http,
            base,
            keys: ArcSwap::from_pointee(Vec::new()),
            last_fetch: tokio::sync::Mutex::new(None),
        }
    }

    pub(super) fn keys(&self) -> Arc<Vec<VerifyingKey>> {
        self.keys.load_full()
    }

    /// Fetches the set and puts its usable keys in force; on an error the keys in hand stay.
    pub async fn fetch(&self) -> Result<usize, JwksError> {
        let mut last = self.last_fetch.lock().await;
        self.fetch_locked(&mut last).await
    }

    async fn fetch_locked(&self, last: &mut Option<Instant>) -> Result<usize, JwksError> {
        *last = Some(Instant::now());
        let url = &self.config.url;
        let http = |reason| JwksError::Http {
            url: url.clone(),
            reason,
        };
        let answer = self
            .http
            .call(
                "GET",
                url,
                &[("accept", "application/json")],
                None,
                FETCH_TIMEOUT,
            )
            .await
            .map_err(http)?;
        if !answer.is_success() {
            return Err(JwksError::Status {
                url: url.clone(),
                status: answer.status,
            });
        }
        if answer.body.len() > MAX_BODY_BYTES {
            return Err(JwksError::TooLarge { url: url.clone() });
        }
        let keys = parse(&answer.body, &self.base).map_err(|reason| JwksError::NotAKeySet {
            url: url.clone(),
            reason,
        })?;
        let count = keys.len();
        self.keys.store(Arc::new(keys));
        tracing::info!(url = %url, keys = count, "JWKS fetched");
        Ok(count)
    }

    /// A token named a key id that no key has: fetch the set again, unless it was fetched
    /// within `min_refresh`. Whether the set may have changed since the call began (another
    /// caller's fetch counts), so the token is worth verifying again.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        let asked = Instant::now();
        let mut last = self.last_fetch.lock().await;
        if let Some(at) = *last {
            if at >= asked {
                return true;
            }
            if at.elapsed() < self.config.min_refresh {
                return false;
            }
        }
        match self.fetch_locked(&mut last).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS refresh failed; the keys in hand stay");
                false
            }
        }
    }

    /// Refreshes the set every `refresh`, for as long as the gateway runs.
    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.config.refresh).await;
            if let Err(e) = self.fetch().await {
                tracing::warn!(error = %e, "JWKS refresh failed; the keys in hand stay");
            }
        }
    }
}

/// The signing keys of a JWK set. Keys for encryption, symmetric keys (a secret fetched from
/// a URL would let whoever answers it mint tokens) and kinds this gateway cannot verify are
/// left out, each without failing the rest.
fn parse(body: &[u8], base: &Validation) -> Result<Vec<VerifyingKey>, String> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut keys = Vec::new();
    for value in set.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let algorithms = algorithms(&jwk);
        if algorithms.is_empty() {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let mut validation = base.clone();
        validation.algorithms = algorithms;
        keys.push(VerifyingKey {
            kid: jwk.common.key_id.clone(),
            key,
            validation,
        });
    }
    Ok(keys)
}

/// What a key may verify: its `alg` when it names one, else every signature algorithm of
/// its kind and curve. Symmetric keys: none.
fn algorithms(jwk: &Jwk) -> Vec<Algorithm> {
    use Algorithm::*;
    let of_kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => vec![EdDSA],
        _ => vec![],
    };
    match jwk.common.key_algorithm {
        Some(named) => of_kind
            .into_iter()
            .filter(|a| format!("{a:?}") == named.to_string())
            .collect(),
        None => of_kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Validation {
        Validation::new(Algorithm::RS256)
    }

    #[test]
    fn only_signing_keys_this_gateway_can_verify_are_kept() {
        // A real RSA modulus is not needed to parse: from_jwk only decodes the components.
        let rsa = json!({"kty": "RSA", "kid": "r1", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"});
        let ec_p521 = json!({"kty": "EC", "kid": "e9", "crv": "P-521", "x": "AA", "y": "AA"});
        let enc = json!({"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"});
        let secret = json!({"kty": "oct", "kid": "s1", "k": "c2VjcmV0"});
        let junk = json!({"kty": "XYZ"});
        let body = json!({"keys": [rsa, ec_p521, enc, secret, junk]}).to_string();
        let keys = parse(body.as_bytes(), &base()).unwrap();
        let kids: Vec<_> = keys.iter().map(|k| k.kid.as_deref()).collect();
        assert_eq!(kids, [Some("r1")]);
        assert!(keys[0].validation.algorithms.contains(&Algorithm::PS256));
        assert!(!keys[0].validation.algorithms.contains(&Algorithm::HS256));
    }

    #[test]
    fn a_named_alg_narrows_what_the_key_verifies() {
        let jwk: Jwk =
            serde_json::from_value(json!({"kty": "RSA", "alg": "RS384", "n": "AQAB", "e": "AQAB"}))
                .unwrap();
        assert_eq!(algorithms(&jwk), [Algorithm::RS384]);
        let mismatched: Jwk =
            serde_json::from_value(json!({"kty": "RSA", "alg": "ES256", "n": "AQAB", "e": "AQAB"}))
                .unwrap();
        assert!(algorithms(&mismatched).is_empty());
    }

    #[test]
    fn what_is_not_a_key_set_is_an_error() {
        assert!(parse(b"[]", &base()).is_err());
        assert!(parse(b"not json", &base()).is_err());
        assert!(parse(br#"{"keys": []}"#, &base()).unwrap().is_empty());
    }
}
