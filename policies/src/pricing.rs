//! What a request costs: prices per million tokens for each model and tier, flat or graduated
//! over the billing period, and the exact cost of a request's usage under them.
//!
//! Costs are exact decimals and are never rounded here. Rounding (to cents, or to whatever an
//! invoice shows) is the caller's job, done once where an amount is shown or settled, so that
//! summing many small costs never accumulates rounding error. Nothing here may use floating
//! point.
//!
//! # Why a cost can neither overflow nor be rounded
//!
//! `rust_decimal` keeps a 96-bit integer mantissa (28 to 29 significant digits) and
//! at most 28 decimal places. A cost is computed as an integer number of price units in a
//! `u128` and turned into a [`Decimal`] once. Construction guarantees that every price of a
//! model, written to the number of decimal places `d` of its most precise price, is an
//! integer of at most [`MAX_PRICE_DIGITS`] (nine) digits, and that `d` is at most
//! [`MAX_PRICE_DECIMALS`]. So for any `u64` token counts:
//!
//! * one kind of token costs at most (2^64 - 1) * (10^9 - 1) < 1.85e28 units;
//! * input, output and cached together cost less than 5.6e28 units, under 2^96 (7.9e28), which fits the
//!   mantissa (and `u128` intermediates, good to 3.4e38, cannot overflow on the way);
//! * the cost is those units at `d + 6` decimal places (prices are per 10^6 tokens), at most 28.
//!
//! Nine digits at a common number of places still allows, for example, "600" next to
//! "0.01875" (60000000 and 1875 at five places), or "90000" next to "2.8125" in a currency
//! with large amounts.

use crate::money::Money;
use crate::tiers::{Tier, TierError, Tiers};
use rust_decimal::Decimal;
use serde::de::{self, IntoDeserializer};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;
use std::fmt;

/// The model or tier name of a price entry that applies to any model or tier.
pub const ANY: &str = "*";

/// Prices are per million tokens: a cost has six more decimal places than its prices.
const PER_MILLION_DECIMALS: u32 = 6;

/// The most digits a price may have, written to as many decimal places as the most precise
/// price of its model. See the module documentation for why nine keeps every cost exact.
pub const MAX_PRICE_DIGITS: u32 = 9;

/// The most decimal places a price may have, so that a cost's (six more) stay within the 28
/// a `Decimal` can hold.
pub const MAX_PRICE_DECIMALS: u32 = Decimal::MAX_SCALE - PER_MILLION_DECIMALS;

const MAX_PRICE_UNITS: u128 = 10u128.pow(MAX_PRICE_DIGITS) - 1;

/// What is wrong with a price schedule, a model's price, or the price book. Bands are
/// numbered from 1, as an operator counts them in the policy file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PricingError {
    #[error("a price schedule needs at least one band")]
    NoBands,
    #[error("band {band}: up_to must be greater than 0")]
    ZeroUpTo { band: usize },
    #[error("band {band}: up_to {up_to} must be greater than {previous}, where band {} ends; bands must be in increasing order of up_to", band - 1)]
    NotIncreasing {
        band: usize,
        up_to: u64,
        previous: u64,
    },
    #[error("band {band} of {bands} has no up_to; only the last band may be open-ended")]
    OpenBandNotLast { band: usize, bands: usize },
    #[error("the last band (band {band}) ends at up_to {up_to}; leave up_to out of the last band so that tokens past {up_to} have a price")]
    LastBandBounded { band: usize, up_to: u64 },
    #[error("band {band}: per_million {per_million} has {decimals} decimal places; at most {MAX_PRICE_DECIMALS} are supported")]
    TooManyDecimals {
        band: usize,
        per_million: Money,
        decimals: u32,
    },
    #[error("band {band}: per_million {per_million} has more than {MAX_PRICE_DIGITS} digits when written to {decimals} decimal places, as the most precise band is; costs could then no longer be kept exact")]
    TooManyDigits {
        band: usize,
        per_million: Money,
        decimals: u32,
    },
    #[error("{kind} band {band}: per_million {per_million} has more than {MAX_PRICE_DIGITS} digits when written to {decimals} decimal places, as the model's most precise price is; costs could then no longer be kept exact")]
    ModelTooManyDigits {
        kind: &'static str,
        band: usize,
        per_million: Money,
        decimals: u32,
    },
    #[error("currency '{0}' must be a three-letter ISO 4217 code such as USD")]
    BadCurrency(String),
    #[error("price for model '{model}', tier '{tier}': {reason}")]
    InEntry {
        model: String,
        tier: String,
        reason: Box<PricingError>,
    },
    #[error("a price's {0} must be a name or \"*\", not empty")]
    EmptyName(&'static str),
    #[error("two prices for model '{model}' and tier '{tier}'")]
    Duplicate { model: String, tier: String },
    #[error("price for model '{model}': {reason}")]
    UnknownTier { model: String, reason: TierError },
    #[error("price for model '{model}', tier '{tier}' is in {currency}, but it applies to tier '{applies_to}', which is billed in {tier_currency}")]
    CurrencyMismatch {
        model: String,
        tier: String,
        currency: String,
        applies_to: String,
        tier_currency: String,
    },
}

/// One band of a graduated schedule: the price of tokens counted in the billing period up
/// to (not including) the cumulative count `up_to`, from where the band before it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    /// Where the band ends; `None` for the last band, which is open-ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to: Option<u64>,
    pub per_million: Money,
}

/// The price of one kind of token: one band for a flat price, several for a graduated one.
///
/// In configuration, a flat price is written as an amount (`"0.50"`) and a graduated one as
/// a list of bands (`[{ up_to = 10000000, per_million = "1.50" }, { per_million = "1.20" }]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceSchedule {
    /// Strictly increasing in `up_to`; exactly the last band is open-ended.
    bands: Vec<Band>,
    /// The most decimal places of any band's price.
    decimals: u32,
}

impl PriceSchedule {
    /// One price for every token. Refused only for a price too precise to keep costs exact
    /// (see the module documentation).
    pub fn flat(per_million: Money) -> Result<Self, PricingError> {
        Self::graduated(vec![Band {
            up_to: None,
            per_million,
        }])
    }

    pub fn graduated(bands: Vec<Band>) -> Result<Self, PricingError> {
        if bands.is_empty() {
            return Err(PricingError::NoBands);
        }
        let count = bands.len();
        let mut previous = 0;
        let mut decimals = 0;
        for (i, band) in bands.iter().enumerate() {
            let number = i + 1;
            match band.up_to {
                None if number < count => {
                    return Err(PricingError::OpenBandNotLast {
                        band: number,
                        bands: count,
                    })
                }
                None => {}
                Some(0) => return Err(PricingError::ZeroUpTo { band: number }),
                Some(up_to) if up_to <= previous => {
                    return Err(PricingError::NotIncreasing {
                        band: number,
                        up_to,
                        previous,
                    })
                }
                Some(up_to) if number == count => {
                    return Err(PricingError::LastBandBounded {
                        band: number,
                        up_to,
                    })
                }
                Some(up_to) => previous = up_to,
            }
            let places = band.per_million.amount().scale();
            if places > MAX_PRICE_DECIMALS {
                return Err(PricingError::TooManyDecimals {
                    band: number,
                    per_million: band.per_million,
                    decimals: places,
                });
            }
            decimals = decimals.max(places);
        }
        let schedule = PriceSchedule { bands, decimals };
        schedule
            .check_digits(decimals)
            .map_err(|(band, per_million)| PricingError::TooManyDigits {
                band,
                per_million,
                decimals,
            })?;
        Ok(schedule)
    }

    pub fn bands(&self) -> &[Band] {
        &self.bands
    }

    /// The cost of `tokens` more tokens when `before` tokens were already counted in the
    /// period: each token is priced by the band its position in the period falls in.
    ///
    /// Exact and never rounded; `before + tokens` may exceed `u64::MAX`.
    pub fn cost(&self, before: u64, tokens: u64) -> Decimal {
        units_to_decimal(self.units(before, tokens, self.decimals), self.decimals)
    }

    /// The cost in units of 10^-(`decimals` + 6). `decimals` must be one `check_digits`
    /// accepted, which bounds the sum (see the module documentation).
    fn units(&self, before: u64, tokens: u64, decimals: u32) -> u128 {
        let start = u128::from(before);
        let end = start + u128::from(tokens);
        let mut band_start = 0u128;
        let mut units = 0u128;
        for band in &self.bands {
            let band_end = band.up_to.map_or(u128::MAX, u128::from);
            let in_band = end.min(band_end).saturating_sub(start.max(band_start));
            if in_band > 0 {
                units += in_band * price_units(band.per_million, decimals);
            }
            if band_end >= end {
                break;
            }
            band_start = band_end;
        }
        units
    }

    /// Whether every band's price, written to `decimals` places, has at most nine digits;
    /// if not, the first band (numbered from 1) and price that does not.
    fn check_digits(&self, decimals: u32) -> Result<(), (usize, Money)> {
        for (i, band) in self.bands.iter().enumerate() {
            let amount = band.per_million.amount();
            let fits = decimals
                .checked_sub(amount.scale())
                .and_then(|shift| 10u128.checked_pow(shift))
                .and_then(|factor| factor.checked_mul(amount.mantissa().unsigned_abs()))
                .is_some_and(|units| units <= MAX_PRICE_UNITS);
            if !fits {
                return Err((i + 1, band.per_million));
            }
        }
        Ok(())
    }
}

/// A price in units of 10^-`decimals`, for a `decimals` that `check_digits` accepted, so it
/// is an exact integer below 10^9.
fn price_units(price: Money, decimals: u32) -> u128 {
    let amount = price.amount();
    amount.mantissa().unsigned_abs() * 10u128.pow(decimals - amount.scale())
}

fn units_to_decimal(units: u128, decimals: u32) -> Decimal {
    i128::try_from(units)
        .ok()
        .and_then(|units| {
            Decimal::try_from_i128_with_scale(units, decimals + PER_MILLION_DECIMALS).ok()
        })
        .expect("validated prices keep every cost within Decimal; see the module documentation")
        .normalize()
}

impl Serialize for PriceSchedule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.bands.as_slice() {
            [Band {
                up_to: None,
                per_million,
            }] => per_million.serialize(serializer),
            bands => bands.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for PriceSchedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScheduleVisitor;

        impl ScheduleVisitor {
            fn flat<'de, E: de::Error>(
                amount: impl IntoDeserializer<'de, E>,
            ) -> Result<PriceSchedule, E> {
                // Money's own parsing, so amounts are read (and refused) as everywhere else.
                let per_million = Money::deserialize(amount.into_deserializer())?;
                PriceSchedule::flat(per_million).map_err(E::custom)
            }
        }

        impl<'de> de::Visitor<'de> for ScheduleVisitor {
            type Value = PriceSchedule;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a price per million tokens (\"0.50\") or a list of bands \
                     ([{ up_to = 10000000, per_million = \"1.50\" }, { per_million = \"1.20\" }])",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PriceSchedule, E> {
                Self::flat(v)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PriceSchedule, E> {
                Self::flat(v)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PriceSchedule, E> {
                Self::flat(v)
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<PriceSchedule, E> {
                Self::flat(v)
            }

            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<PriceSchedule, A::Error> {
                let mut bands = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(band) = seq.next_element::<Band>()? {
                    bands.push(band);
                }
                PriceSchedule::graduated(bands).map_err(de::Error::custom)
            }
        }

        deserializer.deserialize_any(ScheduleVisitor)
    }
}

/// Tokens of each kind, as a request's usage or as what a key has used so far in a period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TokenCounts {
    /// Prompt tokens that were not served from the backend's prompt cache.
    pub input: u64,
    pub output: u64,
    /// Prompt tokens served from the backend's prompt cache.
    pub cached: u64,
}

impl TokenCounts {
    /// Both counts added together, kind by kind, saturating at `u64::MAX`.
    pub fn saturating_add(&self, other: &TokenCounts) -> TokenCounts {
        // Destructured so that a new kind of token does not compile until it is added here.
        let TokenCounts {
            input,
            output,
            cached,
        } = *other;
        TokenCounts {
            input: self.input.saturating_add(input),
            output: self.output.saturating_add(output),
            cached: self.cached.saturating_add(cached),
        }
    }
}

/// What a model costs: a currency and a schedule for each kind of token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    currency: String,
    input: PriceSchedule,
    output: PriceSchedule,
    cached: PriceSchedule,
    /// The most decimal places of any price of the three schedules.
    decimals: u32,
}

impl ModelPrice {
    /// `cached` defaults to the input schedule. Refused for a currency that is not an ISO
    /// 4217 code, or prices whose digits together are too many to keep costs exact (see the
    /// module documentation).
    pub fn new(
        currency: impl Into<String>,
        input: PriceSchedule,
        output: PriceSchedule,
        cached: Option<PriceSchedule>,
    ) -> Result<Self, PricingError> {
        let currency = currency.into();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(PricingError::BadCurrency(currency));
        }
        let cached = cached.unwrap_or_else(|| input.clone());
        let decimals = input.decimals.max(output.decimals).max(cached.decimals);
        for (kind, schedule) in [("input", &input), ("output", &output), ("cached", &cached)] {
            schedule
                .check_digits(decimals)
                .map_err(|(band, per_million)| PricingError::ModelTooManyDigits {
                    kind,
                    band,
                    per_million,
                    decimals,
                })?;
        }
        Ok(ModelPrice {
            currency,
            input,
            output,
            cached,
            decimals,
        })
    }

    /// ISO 4217 code of the currency every cost of this model is in.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    pub fn input(&self) -> &PriceSchedule {
        &self.input
    }

    pub fn output(&self) -> &PriceSchedule {
        &self.output
    }

    pub fn cached(&self) -> &PriceSchedule {
        &self.cached
    }

    /// The cost of `usage` given what was already counted this period (`before`), each kind
    /// of token priced from its own position in its own schedule. Exact and never rounded.
    pub fn cost(&self, before: &TokenCounts, usage: &TokenCounts) -> Decimal {
        // Destructured so that a new kind of token does not compile until it is priced here.
        let TokenCounts {
            input,
            output,
            cached,
        } = *usage;
        let TokenCounts {
            input: input_before,
            output: output_before,
            cached: cached_before,
        } = *before;
        let d = self.decimals;
        let units = self.input.units(input_before, input, d)
            + self.output.units(output_before, output, d)
            + self.cached.units(cached_before, cached, d);
        units_to_decimal(units, d)
    }
}

/// One `[[prices]]` entry: the price of a model (or any model, "*") for a tier (or any
/// tier, "*").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PriceEntryConfig", into = "PriceEntryConfig")]
pub struct PriceEntry {
    pub model: String,
    pub tier: String,
    pub price: ModelPrice,
}

/// A price entry as the policy file writes it, flat.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntryConfig {
    model: String,
    tier: String,
    currency: String,
    input: PriceSchedule,
    output: PriceSchedule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cached: Option<PriceSchedule>,
}

impl TryFrom<PriceEntryConfig> for PriceEntry {
    type Error = PricingError;

    fn try_from(config: PriceEntryConfig) -> Result<Self, Self::Error> {
        let PriceEntryConfig {
            model,
            tier,
            currency,
            input,
            output,
            cached,
        } = config;
        match ModelPrice::new(currency, input, output, cached) {
            Ok(price) => Ok(PriceEntry { model, tier, price }),
            Err(reason) => Err(PricingError::InEntry {
                model,
                tier,
                reason: Box::new(reason),
            }),
        }
    }
}

impl From<PriceEntry> for PriceEntryConfig {
    fn from(entry: PriceEntry) -> Self {
        let PriceEntry { model, tier, price } = entry;
        PriceEntryConfig {
            model,
            tier,
            currency: price.currency,
            input: price.input,
            output: price.output,
            cached: Some(price.cached),
        }
    }
}

/// Every price in force, looked up by model and tier.
///
/// Deserializes from the list of `[[prices]]` entries, with the same checks as [`PriceBook::new`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<PriceEntry>", into = "Vec<PriceEntry>")]
pub struct PriceBook {
    entries: Vec<PriceEntry>,
    /// model -> tier -> index in `entries`, so a lookup borrows and allocates nothing.
    index: HashMap<String, HashMap<String, usize>>,
}

impl PriceBook {
    /// Refuses an empty model or tier name, and two entries for the same (model, tier).
    pub fn new(entries: Vec<PriceEntry>) -> Result<Self, PricingError> {
        let mut index: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            if entry.model.is_empty() {
                return Err(PricingError::EmptyName("model"));
            }
            if entry.tier.is_empty() {
                return Err(PricingError::EmptyName("tier"));
            }
            let tiers = index.entry(entry.model.clone()).or_default();
            if tiers.insert(entry.tier.clone(), i).is_some() {
                return Err(PricingError::Duplicate {
                    model: entry.model.clone(),
                    tier: entry.tier.clone(),
                });
            }
        }
        Ok(PriceBook { entries, index })
    }

    /// A book with no prices: every lookup finds none.
    pub fn empty() -> Self {
        PriceBook::default()
    }

    pub fn entries(&self) -> &[PriceEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The most specific price: exact model and exact tier, then exact model and any tier,
    /// then any model and exact tier, then any model and any tier.
    pub fn lookup(&self, model: &str, tier: &str) -> Option<&ModelPrice> {
        let for_model = |model: &str| {
            let tiers = self.index.get(model)?;
            tiers.get(tier).or_else(|| tiers.get(ANY))
        };
        let &i = for_model(model).or_else(|| for_model(ANY))?;
        Some(&self.entries[i].price)
    }

    /// Every entry must name a tier that exists, and be in the currency of every tier it
    /// applies to: its own, or for a "*" entry, every tier without an entry of its own for
    /// the same model (which shadows it there).
    pub fn validate(&self, tiers: &Tiers) -> Result<(), PricingError> {
        for entry in &self.entries {
            let check = |tier: &Tier| {
                if entry.price.currency == tier.currency {
                    return Ok(());
                }
                Err(PricingError::CurrencyMismatch {
                    model: entry.model.clone(),
                    tier: entry.tier.clone(),
                    currency: entry.price.currency.clone(),
                    applies_to: tier.name.clone(),
                    tier_currency: tier.currency.clone(),
                })
            };
            if entry.tier == ANY {
                let own_tiers = &self.index[&entry.model];
                for tier in tiers.iter() {
                    if !own_tiers.contains_key(&tier.name) {
                        check(tier)?;
                    }
                }
            } else {
                let tier = tiers
                    .get(&entry.tier)
                    .map_err(|reason| PricingError::UnknownTier {
                        model: entry.model.clone(),
                        reason,
                    })?;
                check(tier)?;
            }
        }
        Ok(())
    }
}

impl TryFrom<Vec<PriceEntry>> for PriceBook {
    type Error = PricingError;

    fn try_from(entries: Vec<PriceEntry>) -> Result<Self, Self::Error> {
        PriceBook::new(entries)
    }
}

impl From<PriceBook> for Vec<PriceEntry> {
    fn from(book: PriceBook) -> Self {
        book.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use proptest::prelude::*;

    fn money(s: &str) -> Money {
        s.parse().unwrap()
    }

    fn dec(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn flat(s: &str) -> PriceSchedule {
        PriceSchedule::flat(money(s)).unwrap()
    }

    fn band(up_to: Option<u64>, per_million: &str) -> Band {
        Band {
            up_to,
            per_million: money(per_million),
        }
    }

    /// The output schedule of the documented example: 1.50 up to 10M tokens, 1.20 after.
    fn example_output() -> PriceSchedule {
        PriceSchedule::graduated(vec![band(Some(10_000_000), "1.50"), band(None, "1.20")]).unwrap()
    }

    fn example_price() -> ModelPrice {
        ModelPrice::new("USD", flat("0.50"), example_output(), Some(flat("0.25"))).unwrap()
    }

    fn entry(model: &str, tier: &str, currency: &str, input: &str) -> PriceEntry {
        PriceEntry {
            model: model.to_owned(),
            tier: tier.to_owned(),
            price: ModelPrice::new(currency, flat(input), flat("1"), None).unwrap(),
        }
    }

    fn tiers_usd_and_eur() -> Tiers {
        let tier = |name: &str, currency: &str| Tier {
            name: name.to_owned(),
            currency: currency.to_owned(),
            limits: Limits::default(),
            on_store_unavailable: Default::default(),
            request_caps: Default::default(),
            models: Default::default(),
            model_limits: Default::default(),
        };
        Tiers::new([tier("free", "USD"), tier("eu", "EUR")]).unwrap()
    }

    #[test]
    fn flat_cost_is_tokens_times_price_per_million() {
        let schedule = flat("0.50");
        assert_eq!(schedule.cost(0, 3_000_000), dec("1.5"));
        assert_eq!(schedule.cost(0, 1), dec("0.0000005"));
        assert_eq!(schedule.cost(123_456_789, 0), Decimal::ZERO);
    }

    #[test]
    fn twelve_million_output_tokens_cost_ten_at_the_first_band_and_two_at_the_second() {
        // 10 x 1.50 + 2 x 1.20
        assert_eq!(example_output().cost(0, 12_000_000), dec("17.40"));
        assert_eq!(example_output().cost(0, 10_000_000), dec("15"));
    }

    #[test]
    fn a_request_straddling_a_band_boundary_pays_each_band_for_its_share() {
        let output = example_output();
        // 1M tokens at 1.50, then 1M at 1.20.
        assert_eq!(output.cost(9_000_000, 2_000_000), dec("2.70"));
        assert_eq!(output.cost(9_999_999, 2), dec("0.0000027"));
        // Entirely past the boundary: all at 1.20.
        assert_eq!(output.cost(11_000_000, 1_000_000), dec("1.20"));
    }

    #[test]
    fn a_free_first_band_then_two_priced_bands() {
        let schedule = PriceSchedule::graduated(vec![
            band(Some(1_000), "0"),
            band(Some(1_001_000), "2"),
            band(None, "1"),
        ])
        .unwrap();
        // 500 free, 1M at 2, then 999,500 at 1.
        assert_eq!(schedule.cost(500, 2_000_000), dec("2.9995"));
    }

    #[test]
    fn model_cost_prices_each_kind_from_its_own_position_in_the_period() {
        let before = TokenCounts {
            input: 0,
            output: 9_500_000,
            cached: 0,
        };
        let usage = TokenCounts {
            input: 1_000_000,
            output: 1_000_000,
            cached: 2_000_000,
        };
        // 0.50 + (0.5 x 1.50 + 0.5 x 1.20) + 2 x 0.25
        assert_eq!(example_price().cost(&before, &usage), dec("2.35"));
    }

    #[test]
    fn cached_tokens_default_to_the_input_price() {
        let price = ModelPrice::new("USD", flat("0.50"), flat("2"), None).unwrap();
        assert_eq!(price.cached(), price.input());
        let usage = TokenCounts {
            cached: 2_000_000,
            ..TokenCounts::default()
        };
        assert_eq!(price.cost(&TokenCounts::default(), &usage), dec("1"));
    }

    #[test]
    fn the_largest_prices_and_token_counts_are_priced_exactly() {
        let max = flat("999999999");
        let price = ModelPrice::new("USD", max.clone(), max.clone(), Some(max)).unwrap();
        let all = TokenCounts {
            input: u64::MAX,
            output: u64::MAX,
            cached: u64::MAX,
        };
        // 3 x (2^64 - 1) x 999,999,999 / 10^6, all 29 digits of it.
        assert_eq!(
            price.cost(&all, &all),
            dec("55340232165788422623871.345155")
        );

        let precise = ModelPrice::new("USD", flat("999.999999"), flat("0.000001"), None).unwrap();
        let input = TokenCounts {
            input: u64::MAX,
            ..TokenCounts::default()
        };
        assert_eq!(
            precise.cost(&TokenCounts::default(), &input),
            dec("18446744055262807.541290448385")
        );
    }

    #[test]
    fn prices_too_precise_to_keep_costs_exact_are_refused() {
        let err =
            ModelPrice::new("USD", flat("999.999999"), flat("1"), Some(flat("1000"))).unwrap_err();
        assert_eq!(
            err,
            PricingError::ModelTooManyDigits {
                kind: "cached",
                band: 1,
                per_million: money("1000"),
                decimals: 6
            }
        );
        assert_eq!(
            err.to_string(),
            "cached band 1: per_million 1000 has more than 9 digits when written to 6 decimal \
             places, as the model's most precise price is; costs could then no longer be kept exact"
        );

        let err = PriceSchedule::graduated(vec![band(Some(10), "1000"), band(None, "0.000001")])
            .unwrap_err();
        assert_eq!(
            err,
            PricingError::TooManyDigits {
                band: 1,
                per_million: money("1000"),
                decimals: 6
            }
        );

        let err = PriceSchedule::flat(money("0.00000000000000000000001")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "band 1: per_million 0.00000000000000000000001 has 23 decimal places; at most 22 are supported"
        );
        assert!(PriceSchedule::flat(money("1234567890")).is_err());
    }

    #[test]
    fn bands_out_of_order_are_refused_naming_the_band() {
        let err = PriceSchedule::graduated(vec![
            band(Some(20), "1"),
            band(Some(10), "1"),
            band(None, "1"),
        ])
        .unwrap_err();
        assert_eq!(
            err,
            PricingError::NotIncreasing {
                band: 2,
                up_to: 10,
                previous: 20
            }
        );
        assert_eq!(
            err.to_string(),
            "band 2: up_to 10 must be greater than 20, where band 1 ends; bands must be in \
             increasing order of up_to"
        );
        let equal = vec![band(Some(10), "1"), band(Some(10), "1"), band(None, "1")];
        assert!(matches!(
            PriceSchedule::graduated(equal),
            Err(PricingError::NotIncreasing { band: 2, .. })
        ));
        let zero = vec![band(Some(0), "1"), band(None, "1")];
        assert_eq!(
            PriceSchedule::graduated(zero),
            Err(PricingError::ZeroUpTo { band: 1 })
        );
    }

    #[test]
    fn a_schedule_must_end_with_exactly_one_open_band() {
        let bounded = vec![band(Some(10), "1"), band(Some(20), "1")];
        let err = PriceSchedule::graduated(bounded).unwrap_err();
        assert_eq!(err, PricingError::LastBandBounded { band: 2, up_to: 20 });
        assert_eq!(
            err.to_string(),
            "the last band (band 2) ends at up_to 20; leave up_to out of the last band so that \
             tokens past 20 have a price"
        );

        let two_open = vec![band(None, "1"), band(None, "2")];
        let err = PriceSchedule::graduated(two_open).unwrap_err();
        assert_eq!(err, PricingError::OpenBandNotLast { band: 1, bands: 2 });
        assert_eq!(
            err.to_string(),
            "band 1 of 2 has no up_to; only the last band may be open-ended"
        );

        assert_eq!(
            PriceSchedule::graduated(Vec::new()),
            Err(PricingError::NoBands)
        );
    }

    #[test]
    fn a_currency_must_be_an_iso_4217_code() {
        let err = ModelPrice::new("usd", flat("1"), flat("1"), None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "currency 'usd' must be a three-letter ISO 4217 code such as USD"
        );
        assert!(ModelPrice::new("EURO", flat("1"), flat("1"), None).is_err());
    }

    #[test]
    fn lookup_prefers_exact_model_then_exact_tier_then_wildcards() {
        let book = PriceBook::new(vec![
            entry("*", "*", "USD", "1"),
            entry("*", "pro", "USD", "2"),
            entry("m", "*", "USD", "3"),
            entry("m", "pro", "USD", "4"),
        ])
        .unwrap();
        let per_million = |model: &str, tier: &str| {
            book.lookup(model, tier)
                .map(|price| price.input().cost(0, 1_000_000))
        };
        assert_eq!(per_million("m", "pro"), Some(dec("4")));
        assert_eq!(per_million("m", "free"), Some(dec("3")));
        assert_eq!(per_million("other", "pro"), Some(dec("2")));
        assert_eq!(per_million("other", "free"), Some(dec("1")));

        let only_m = PriceBook::new(vec![entry("m", "*", "USD", "3")]).unwrap();
        assert!(only_m.lookup("m", "free").is_some());
        assert!(only_m.lookup("other", "free").is_none());
        assert!(PriceBook::empty().lookup("m", "free").is_none());
    }

    #[test]
    fn two_prices_for_the_same_model_and_tier_are_refused() {
        let err = PriceBook::new(vec![
            entry("m", "*", "USD", "1"),
            entry("m", "pro", "USD", "1"),
            entry("m", "*", "USD", "2"),
        ])
        .unwrap_err();
        assert_eq!(err.to_string(), "two prices for model 'm' and tier '*'");
        let err = PriceBook::new(vec![entry("", "*", "USD", "1")]).unwrap_err();
        assert_eq!(err, PricingError::EmptyName("model"));
    }

    #[test]
    fn a_price_in_another_currency_than_its_tier_is_refused() {
        let book = PriceBook::new(vec![entry("m", "eu", "USD", "1")]).unwrap();
        let err = book.validate(&tiers_usd_and_eur()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "price for model 'm', tier 'eu' is in USD, but it applies to tier 'eu', which is \
             billed in EUR"
        );
    }

    #[test]
    fn a_wildcard_tier_price_must_match_every_tier_it_is_not_shadowed_in() {
        let tiers = tiers_usd_and_eur();
        let usd_everywhere = PriceBook::new(vec![entry("*", "*", "USD", "1")]).unwrap();
        assert_eq!(
            usd_everywhere.validate(&tiers),
            Err(PricingError::CurrencyMismatch {
                model: "*".to_owned(),
                tier: "*".to_owned(),
                currency: "USD".to_owned(),
                applies_to: "eu".to_owned(),
                tier_currency: "EUR".to_owned(),
            })
        );
        let shadowed = PriceBook::new(vec![
            entry("*", "*", "USD", "1"),
            entry("*", "eu", "EUR", "1"),
            entry("m", "*", "USD", "1"),
            entry("m", "eu", "EUR", "1"),
        ])
        .unwrap();
        assert_eq!(shadowed.validate(&tiers), Ok(()));
        assert_eq!(usd_everywhere.validate(&Tiers::builtin()), Ok(()));
    }

    #[test]
    fn a_price_for_an_unknown_tier_is_refused() {
        let book = PriceBook::new(vec![entry("m", "gold", "USD", "1")]).unwrap();
        let err = book.validate(&tiers_usd_and_eur()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "price for model 'm': unknown tier 'gold'; known tiers: eu, free"
        );
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Policy {
        prices: PriceBook,
    }

    const EXAMPLE: &str = r#"
        [[prices]]
        model = "sluice-sim"     # a model id, or "*" for any model
        tier = "*"               # a tier name, or "*" for any tier
        currency = "USD"
        input = "0.50"
        output = [ { up_to = 10000000, per_million = "1.50" }, { per_million = "1.20" } ]
        cached = "0.25"

        [[prices]]
        model = "*"
        tier = "*"
        currency = "USD"
        input = 1
        output = "2"
    "#;

    #[test]
    fn the_documented_toml_example_parses() {
        let policy: Policy = toml::from_str(EXAMPLE).unwrap();
        let sim = policy.prices.lookup("sluice-sim", "pro").unwrap();
        assert_eq!(sim, &example_price());
        assert_eq!(sim.currency(), "USD");
        assert_eq!(sim.output().cost(0, 12_000_000), dec("17.40"));

        let other = policy.prices.lookup("other", "free").unwrap();
        assert_eq!(other.cached(), &flat("1"));
        assert_eq!(policy.prices.validate(&Tiers::builtin()), Ok(()));
    }

    #[test]
    fn the_price_book_round_trips_through_toml() {
        let policy: Policy = toml::from_str(EXAMPLE).unwrap();
        let written = toml::to_string(&policy).unwrap();
        assert_eq!(toml::from_str::<Policy>(&written).unwrap(), policy);
    }

    fn toml_error(edit: (&str, &str)) -> String {
        let text = EXAMPLE.replacen(edit.0, edit.1, 1);
        assert_ne!(text, EXAMPLE, "{edit:?} changed nothing");
        toml::from_str::<Policy>(&text).unwrap_err().to_string()
    }

    #[test]
    fn mistakes_in_the_toml_are_refused_saying_what_is_wrong() {
        let err = toml_error(("input = \"0.50\"", "input = 0.50"));
        assert!(err.contains("not a float"), "{err}");
        let err = toml_error(("cached = \"0.25\"", "discount = \"0.25\""));
        assert!(err.contains("unknown field `discount`"), "{err}");
        let err = toml_error(("up_to = 10000000, ", ""));
        assert!(
            err.contains("band 1 of 2 has no up_to; only the last band may be open-ended"),
            "{err}"
        );
        let err = toml_error((
            "{ per_million = \"1.20\" }",
            "{ up_to = 5, per_million = \"1.20\" }",
        ));
        assert!(
            err.contains("band 2: up_to 5 must be greater than 10000000"),
            "{err}"
        );
        let err = toml_error(("per_million = \"1.50\"", "per_millon = \"1.50\""));
        assert!(err.contains("per_millon"), "{err}");
        let err = toml_error(("currency = \"USD\"", "currency = \"usd\""));
        assert!(
            err.contains("price for model 'sluice-sim', tier '*': currency 'usd' must be"),
            "{err}"
        );
        let err = toml_error(("model = \"*\"", "model = \"sluice-sim\""));
        assert!(
            err.contains("two prices for model 'sluice-sim' and tier '*'"),
            "{err}"
        );
        let err = toml_error(("output = \"2\"", "output = true"));
        assert!(err.contains("a list of bands"), "{err}");
    }

    /// A valid schedule: 1 to 4 bands of random widths, each price at most nine digits at
    /// `decimals` places (some shorter once normalized), so any mix of them is accepted.
    fn schedule_at(decimals: u32) -> impl Strategy<Value = PriceSchedule> {
        let widths_and_units = (1u64..1_000_000_000_000, 0..=MAX_PRICE_UNITS);
        prop::collection::vec(widths_and_units, 1..5).prop_map(move |bands| {
            let last = bands.len() - 1;
            let mut up_to = 0u64;
            let bands = bands
                .into_iter()
                .enumerate()
                .map(|(i, (width, units))| {
                    up_to += width;
                    let amount = Decimal::from_i128_with_scale(units as i128, decimals);
                    Band {
                        up_to: (i < last).then_some(up_to),
                        per_million: Money::new(amount).unwrap(),
                    }
                })
                .collect();
            PriceSchedule::graduated(bands).unwrap()
        })
    }

    fn schedule() -> impl Strategy<Value = PriceSchedule> {
        (0..=MAX_PRICE_DECIMALS).prop_flat_map(schedule_at)
    }

    fn model_price() -> impl Strategy<Value = ModelPrice> {
        (0..=MAX_PRICE_DECIMALS)
            .prop_flat_map(|d| (schedule_at(d), schedule_at(d), schedule_at(d)))
            .prop_map(|(input, output, cached)| {
                ModelPrice::new("USD", input, output, Some(cached)).unwrap()
            })
    }

    /// Token counts near the bands, and anywhere up to a third of u64 so sums of three fit.
    fn tokens() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..5_000_000_000_000, 0..=u64::MAX / 3]
    }

    fn counts() -> impl Strategy<Value = TokenCounts> {
        (tokens(), tokens(), tokens()).prop_map(|(input, output, cached)| TokenCounts {
            input,
            output,
            cached,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn cost_never_falls_as_tokens_grow(
            schedule in schedule(), before in tokens(), a in tokens(), more in tokens()
        ) {
            prop_assert!(schedule.cost(before, a) <= schedule.cost(before, a + more));
        }

        #[test]
        fn graduated_costs_telescope_exactly(
            schedule in schedule(), before in tokens(), a in tokens(), b in tokens()
        ) {
            prop_assert_eq!(
                schedule.cost(before, a) + schedule.cost(before + a, b),
                schedule.cost(before, a + b)
            );
        }

        #[test]
        fn a_flat_price_does_not_depend_on_tokens_already_counted(
            decimals in 0..=MAX_PRICE_DECIMALS,
            units in 0..=MAX_PRICE_UNITS,
            x in tokens(),
            y in tokens(),
            a in any::<u64>(),
        ) {
            let amount = Decimal::from_i128_with_scale(units as i128, decimals);
            let schedule = PriceSchedule::flat(Money::new(amount).unwrap()).unwrap();
            let exact = Decimal::from_i128_with_scale(
                i128::from(a) * units as i128,
                decimals + PER_MILLION_DECIMALS,
            );
            prop_assert_eq!(schedule.cost(x, a), exact);
            prop_assert_eq!(schedule.cost(y, a), exact);
        }

        #[test]
        fn a_model_cost_is_the_sum_of_its_kinds_and_telescopes(
            price in model_price(), before in counts(), a in counts(), b in counts()
        ) {
            let kinds = price.input().cost(before.input, a.input)
                + price.output().cost(before.output, a.output)
                + price.cached().cost(before.cached, a.cached);
            prop_assert_eq!(price.cost(&before, &a), kinds);
            prop_assert_eq!(
                price.cost(&before, &a) + price.cost(&before.saturating_add(&a), &b),
                price.cost(&before, &a.saturating_add(&b))
            );
        }
    }
}
