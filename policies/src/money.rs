//! Money as an exact decimal. Amounts are read from strings ("12.50") or whole numbers, never
//! from floating-point literals, so what an operator writes is exactly what is enforced.

use rust_decimal::Decimal;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A non-negative amount in a tier's currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Money(Decimal);

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);

    pub fn new(amount: Decimal) -> Result<Self, MoneyError> {
        if amount.is_sign_negative() && !amount.is_zero() {
            return Err(MoneyError::Negative(amount.to_string()));
        }
        Ok(Money(amount.normalize()))
    }

    pub fn amount(&self) -> Decimal {
        self.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error("amount {0} is negative")]
    Negative(String),
    #[error("'{0}' is not a decimal amount")]
    NotDecimal(String),
    #[error("give amounts as a string such as \"12.50\" or a whole number, not a float ({0}), so they stay exact")]
    Float(String),
}

impl FromStr for Money {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let amount =
            Decimal::from_str_exact(s.trim()).map_err(|_| MoneyError::NotDecimal(s.to_owned()))?;
        Money::new(amount)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Money {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// Documented as what it is on the wire: a decimal string, never a JSON number.
impl utoipa::PartialSchema for Money {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some(r"^[0-9]+(\.[0-9]+)?$"))
            .description(Some(
                "An exact non-negative decimal amount, as a string (\"12.5\"); requests may \
                 also give a whole number.",
            ))
            .examples(["12.5"])
            .into()
    }
}

impl utoipa::ToSchema for Money {}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MoneyVisitor;

        impl de::Visitor<'_> for MoneyVisitor {
            type Value = Money;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a decimal amount as a string (\"12.50\") or a whole number")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Money, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Money, E> {
                Money::new(Decimal::from(v)).map_err(E::custom)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Money, E> {
                Money::new(Decimal::from(v)).map_err(E::custom)
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Money, E> {
                Err(E::custom(MoneyError::Float(v.to_string())))
            }
        }

        deserializer.deserialize_any(MoneyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_strings_and_whole_numbers() {
        let m: Money = serde_json::from_str("\"0.10\"").unwrap();
        assert_eq!(m.to_string(), "0.1");
        let m: Money = serde_json::from_str("25").unwrap();
        assert_eq!(m.amount(), Decimal::from(25));
    }

    #[test]
    fn refuses_floats_and_negatives() {
        let err = serde_json::from_str::<Money>("0.1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a float"), "{err}");
        let err = serde_json::from_str::<Money>("\"-1\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("negative"), "{err}");
        assert!(serde_json::from_str::<Money>("\"ten\"").is_err());
    }

    #[test]
    fn round_trips_as_a_string() {
        let m: Money = "1234.5678".parse().unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"1234.5678\"");
    }
}
