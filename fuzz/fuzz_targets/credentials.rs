//! Credentials: any Authorization header value is a bearer token or none, and any token is
//! verified or refused, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sluice_gateway::auth::{bearer, JwtVerifier};
use sluice_gateway::config::JwtConfig;
use std::sync::LazyLock;

static VERIFIER: LazyLock<JwtVerifier> = LazyLock::new(|| {
    JwtVerifier::new(&JwtConfig {
        issuer: Some("https://issuer.example".into()),
        audience: Some("sluice".into()),
        hs256_secret: Some("a-fuzzing-secret-that-is-long-enough-for-hs256".into()),
        public_keys: Vec::new(),
        tenant_claim: "tenant".into(),
        tier_claim: "tier".into(),
        role_claim: "role".into(),
        leeway_secs: 0,
        jwks: None,
    })
    .expect("verifier")
});

fuzz_target!(|header: &[u8]| {
    if let Some(token) = bearer(Some(header)) {
        let _ = VERIFIER.verify_with_keys_in_hand(token);
        let _ = sluice_gateway::keys::KeyHash::of_secret(token);
    }
    if let Ok(text) = std::str::from_utf8(header) {
        let _ = VERIFIER.verify_with_keys_in_hand(text);
    }
});
