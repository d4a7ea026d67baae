//! What time is it, and which calendar window is it in? The wall clock, read in one place,
//! and the UTC day and month arithmetic that quotas and billing share.
//!
//! [`Clock`] is what code that decides by time holds: the system clock in production, a
//! clock a test moves by hand otherwise.

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use time::OffsetDateTime;

/// Unix milliseconds now, from the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Unix seconds now, from the system clock.
pub fn now_sec() -> i64 {
    now_ms().div_euclid(1000)
}

/// A clock: the system's, or one a test sets.
#[derive(Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicI64>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `start_ms` until it is [`Clock::set_ms`] (or its clones are).
    pub fn manual(start_ms: i64) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicI64::new(start_ms))),
        }
    }

    /// Moves a manual clock (and every clone of it); a system clock cannot be moved.
    pub fn set_ms(&self, ms: i64) {
        if let Some(manual) = &self.manual {
            manual.store(ms, Ordering::Relaxed);
        }
    }

    pub fn now_ms(&self) -> i64 {
        match &self.manual {
            Some(manual) => manual.load(Ordering::Relaxed),
            None => now_ms(),
        }
    }

    pub fn now_sec(&self) -> i64 {
        self.now_ms().div_euclid(1000)
    }
}

/// The UTC date and time of a unix millisecond.
pub fn utc(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A calendar month in UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Month {
    /// `YYYY-MM`: how quota stores and exports name it.
    pub label: String,
    pub year: i32,
    pub month: u8,
    /// Unix ms of its first instant, and of the next month's.
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Month {
    /// The month that contains the unix millisecond `ms`.
    pub fn of_ms(ms: i64) -> Month {
        let date = utc(ms).date();
        let first = date.replace_day(1).expect("day 1 exists");
        let next = match first.month() {
            time::Month::December => {
                time::Date::from_calendar_date(first.year() + 1, time::Month::January, 1)
            }
            month => time::Date::from_calendar_date(first.year(), month.next(), 1),
        }
        .expect("a first of month");
        let ms_of =
            |d: time::Date| (d.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000) as i64;
        let (year, month) = (first.year(), u8::from(first.month()));
        Month {
            label: format!("{year:04}-{month:02}"),
            year,
            month,
            start_ms: ms_of(first),
            end_ms: ms_of(next),
        }
    }

    /// The month that contains the unix second `sec`.
    pub fn of_sec(sec: i64) -> Month {
        Month::of_ms(sec.saturating_mul(1000))
    }
}

/// `YYYY-MM` of a unix second, and the seconds left in that month (at least 1).
///
/// Every admitted request asks for it: each thread keeps the last month it worked out and
/// hands out that label (shared) while the second falls inside it.
pub fn month_of(sec: i64) -> (Arc<str>, u64) {
    thread_local! {
        /// (first second, first second of the next month, label) of the last month asked for.
        static LAST: RefCell<Option<(i64, i64, Arc<str>)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| {
        let (_, end, label) = match last {
            Some((start, end, _)) if (*start..*end).contains(&sec) => {
                last.as_ref().expect("matched")
            }
            _ => {
                let month = Month::of_sec(sec);
                let start = month.start_ms.div_euclid(1000);
                let end = month.end_ms.div_euclid(1000);
                last.insert((start, end, Arc::from(month.label)))
            }
        };
        (label.clone(), (end - sec).max(1) as u64)
    })
}

/// `YYYY-MM-DD` of a unix millisecond.
pub fn day_label(ms: i64) -> String {
    let d = utc(ms).date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_roll_over_at_utc_midnight_and_at_year_end() {
        // 2026-12-31T23:59:59Z
        let (label, left) = month_of(1_798_761_599);
        assert_eq!((&*label, left), ("2026-12", 1));
        let (label, left) = month_of(1_798_761_600);
        assert_eq!((&*label, left), ("2027-01", 31 * 86_400));
        let m = Month::of_ms(1_798_761_600_000);
        assert_eq!((m.year, m.month, m.start_ms), (2027, 1, 1_798_761_600_000));
        assert_eq!(day_label(1_798_761_599_000), "2026-12-31");
    }

    #[test]
    fn a_manual_clock_moves_with_its_clones() {
        let clock = Clock::manual(5_000);
        let clone = clock.clone();
        clock.set_ms(9_500);
        assert_eq!((clone.now_ms(), clone.now_sec()), (9_500, 9));
    }
}
