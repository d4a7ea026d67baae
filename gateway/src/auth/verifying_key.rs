//! One key a token may be verified with: configured (`jwt`) or published (`jwks`), with the
//! algorithms, issuer, audience and leeway it is checked against.

use jsonwebtoken::{DecodingKey, Validation};

pub(super) struct VerifyingKey {
    /// The `kid` a token names to pick this key; `None` matches any.
    pub(super) kid: Option<String>,
    pub(super) key: DecodingKey,
    pub(super) validation: Validation,
}
