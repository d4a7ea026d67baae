//! Which usage does a billing query read, and in what order? Graduated prices depend on
//! what each key used earlier in the month, so a query reads from the start of its first
//! month, in time order, a page at a time.
//!
//! Without a ledger that is the store's events. With the PostgreSQL ledger it is its
//! rollups wherever a whole UTC day is wanted (one row per key, model and day instead of
//! one per request) and raw events only for the parts of days at either end of the range,
//! or for every day asked when the query wants events. Priced in that order, the sums are
//! the same as the events' own (graduated costs telescope), and an export of a month reads
//! a few thousand rows, not millions.

use crate::clock::{day_label, Month};
use crate::ledger::{EventAfter, Ledger, LedgerError, Rollup, RollupCursor};
use crate::store::{EventCursor, Store, StoreError, USAGE_PAGE};
use crate::usage::UsageEvent;
use std::collections::VecDeque;
use std::sync::Arc;

const DAY_MS: i64 = 86_400_000;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
}

/// A usage event, or a day of a rollup.
#[derive(Debug, Clone)]
pub enum Item {
    Event(UsageEvent),
    Day {
        /// The first millisecond of the rollup's day.
        start_ms: i64,
        rollup: Rollup,
    },
}

/// A stretch of time read from one place.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Events { from_ms: i64, to_ms: i64 },
    Days { from_ms: i64, to_ms: i64 },
}

enum Cursor {
    Start,
    Store(EventCursor),
    Ledger(EventAfter),
    Days(RollupCursor),
}

/// The usage a query needs, a page at a time.
pub struct Pages {
    store: Arc<dyn Store>,
    ledger: Option<Arc<Ledger>>,
    segments: VecDeque<Segment>,
    cursor: Cursor,
}

impl Pages {
    /// What a query of `[from_ms, to_ms)` reads: `events` when it wants every event (an
    /// event export), else day rollups where the ledger has them.
    pub fn new(
        store: Arc<dyn Store>,
        ledger: Option<Arc<Ledger>>,
        from_ms: i64,
        to_ms: i64,
        events: bool,
    ) -> Pages {
        let segments = plan(ledger.is_some(), from_ms, to_ms, events);
        Pages {
            store,
            ledger,
            segments: segments.into(),
            cursor: Cursor::Start,
        }
    }

    /// The next page, or `None` after the last.
    pub async fn next(&mut self) -> Result<Option<Vec<Item>>, ReadError> {
        let Some(segment) = self.segments.front().cloned() else {
            return Ok(None);
        };
        let cursor = std::mem::replace(&mut self.cursor, Cursor::Start);
        let (items, next) = match (&self.ledger, segment) {
            (None, Segment::Events { from_ms, to_ms }) => {
                let after = match cursor {
                    Cursor::Store(c) => Some(c),
                    _ => None,
                };
                let (events, next) = self
                    .store
                    .usage_events_page(from_ms, to_ms, after, USAGE_PAGE)
                    .await?;
                (
                    events.into_iter().map(Item::Event).collect(),
                    next.map(Cursor::Store),
                )
            }
            (Some(ledger), Segment::Events { from_ms, to_ms }) => {
                let after = match cursor {
                    Cursor::Ledger(c) => Some(c),
                    _ => None,
                };
                let (events, next) = ledger
                    .events_page(from_ms, to_ms, after, USAGE_PAGE)
                    .await?;
                (
                    events.into_iter().map(Item::Event).collect(),
                    next.map(Cursor::Ledger),
                )
            }
            (Some(ledger), Segment::Days { from_ms, to_ms }) => {
                let after = match cursor {
                    Cursor::Days(c) => Some(c),
                    _ => None,
                };
                let (rollups, next) = ledger
                    .rollups_page(&day_label(from_ms), &day_label(to_ms), after, USAGE_PAGE)
                    .await?;
                let items = rollups
                    .into_iter()
                    .map(|rollup| Item::Day {
                        start_ms: super::parse_time("day", &rollup.day).unwrap_or(from_ms),
                        rollup,
                    })
                    .collect();
                (items, next.map(Cursor::Days))
            }
            (None, Segment::Days { .. }) => unreachable!("days are planned only with a ledger"),
        };
        match next {
            Some(next) => self.cursor = next,
            None => {
                self.segments.pop_front();
            }
        }
        Ok(Some(items))
    }
}

fn floor_day(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

fn ceil_day(ms: i64) -> i64 {
    floor_day(ms + DAY_MS - 1)
}

/// The stretches a query of `[from_ms, to_ms)` reads, in time order, from the start of
/// `from_ms`'s month.
fn plan(ledger: bool, from_ms: i64, to_ms: i64, events: bool) -> Vec<Segment> {
    let month_start = Month::of_ms(from_ms).start_ms;
    if !ledger {
        return vec![Segment::Events {
            from_ms: month_start,
            to_ms,
        }];
    }
    let first_day = floor_day(from_ms);
    let (whole_from, whole_to) = (ceil_day(from_ms), floor_day(to_ms));
    let mut plan = vec![Segment::Days {
        from_ms: month_start,
        to_ms: first_day,
    }];
    if events || whole_from >= whole_to {
        plan.push(Segment::Events {
            from_ms: first_day,
            to_ms,
        });
    } else {
        plan.extend([
            Segment::Events {
                from_ms: first_day,
                to_ms: whole_from,
            },
            Segment::Days {
                from_ms: whole_from,
                to_ms: whole_to,
            },
            Segment::Events {
                from_ms: whole_to,
                to_ms,
            },
        ]);
    }
    plan.retain(|s| match *s {
        Segment::Events { from_ms, to_ms } | Segment::Days { from_ms, to_ms } => from_ms < to_ms,
    });
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        super::super::parse_time("t", s).unwrap()
    }

    #[test]
    fn whole_days_come_from_rollups_and_partial_days_from_events() {
        let (from, to) = (at("2026-11-03T06:00:00Z"), at("2026-11-07T12:00:00Z"));
        assert_eq!(
            plan(true, from, to, false),
            [
                Segment::Days {
                    from_ms: at("2026-11-01"),
                    to_ms: at("2026-11-03")
                },
                Segment::Events {
                    from_ms: at("2026-11-03"),
                    to_ms: at("2026-11-04")
                },
                Segment::Days {
                    from_ms: at("2026-11-04"),
                    to_ms: at("2026-11-07")
                },
                Segment::Events {
                    from_ms: at("2026-11-07"),
                    to_ms: to
                },
            ]
        );
        // A month to the day: its rollups and nothing else.
        assert_eq!(
            plan(true, at("2026-11-01"), at("2026-12-01"), false),
            [Segment::Days {
                from_ms: at("2026-11-01"),
                to_ms: at("2026-12-01")
            }]
        );
        // Events wanted: the days before are priced from rollups, the range from events.
        assert_eq!(
            plan(true, from, to, true),
            [
                Segment::Days {
                    from_ms: at("2026-11-01"),
                    to_ms: at("2026-11-03")
                },
                Segment::Events {
                    from_ms: at("2026-11-03"),
                    to_ms: to
                },
            ]
        );
        // Without a ledger: the store's events from the month's start.
        assert_eq!(
            plan(false, from, to, false),
            [Segment::Events {
                from_ms: at("2026-11-01"),
                to_ms: to
            }]
        );
    }
}
