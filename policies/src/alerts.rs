//! Which spend alerts are due: the thresholds, in percent of a budget, that a key's spend has
//! reached. Whether one was already delivered is the store's to remember.

use serde::Serialize;

/// The most thresholds one list may name.
pub const MAX_THRESHOLDS: usize = 16;

/// Which budget an alert is about: `monthly_budget` refuses past it, `soft_monthly_budget`
/// only alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetKind {
    Hard,
    Soft,
}

impl BudgetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetKind::Hard => "hard",
            BudgetKind::Soft => "soft",
        }
    }
}

/// The thresholds (percent) that `spend_nano` has reached of `budget_nano`. A budget of zero
/// is reached by any spend at all.
pub fn reached(spend_nano: i64, budget_nano: i64, thresholds: &[u32]) -> Vec<u32> {
    thresholds
        .iter()
        .copied()
        .filter(|&t| match budget_nano {
            b if b <= 0 => spend_nano > 0,
            b => i128::from(spend_nano) * 100 >= i128::from(b) * i128::from(t),
        })
        .collect()
}

/// A list of thresholds is 1 to 16 distinct percentages from 1 to 1000 (past 100: alerts
/// on a soft budget overrun).
pub fn validate(thresholds: &[u32]) -> Result<(), String> {
    if thresholds.is_empty() || thresholds.len() > MAX_THRESHOLDS {
        return Err(format!("must list 1 to {MAX_THRESHOLDS} percentages"));
    }
    if let Some(bad) = thresholds.iter().find(|&&t| !(1..=1000).contains(&t)) {
        return Err(format!("{bad} is not a percentage from 1 to 1000"));
    }
    let mut sorted = thresholds.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != thresholds.len() {
        return Err("lists a percentage twice".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_is_reached_at_its_exact_share_and_not_a_nano_before() {
        let budget = 5_000_000_000; // 5.00
        assert_eq!(reached(3_999_999_999, budget, &[50, 80, 100]), [50]);
        assert_eq!(reached(4_000_000_000, budget, &[50, 80, 100]), [50, 80]);
        assert_eq!(
            reached(5_000_000_000, budget, &[50, 80, 100]),
            [50, 80, 100]
        );
        assert_eq!(reached(0, budget, &[50]), Vec::<u32>::new());
        assert_eq!(reached(i64::MAX, i64::MAX, &[1000]), Vec::<u32>::new());
        assert_eq!(reached(i64::MAX, i64::MAX, &[100]), [100]);
    }

    #[test]
    fn a_zero_budget_is_reached_by_any_spend() {
        assert_eq!(reached(0, 0, &[50, 100]), Vec::<u32>::new());
        assert_eq!(reached(1, 0, &[50, 100]), [50, 100]);
    }

    #[test]
    fn threshold_lists_are_checked() {
        assert!(validate(&[50, 80, 100]).is_ok());
        assert!(validate(&[120]).is_ok());
        assert!(validate(&[]).is_err());
        assert!(validate(&[0]).is_err());
        assert!(validate(&[1001]).is_err());
        assert!(validate(&[80, 80]).is_err());
        assert!(validate(&[1; 17]).is_err());
    }
}
