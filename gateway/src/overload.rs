//! How much work may this replica take on at once? Marks on requests in flight and on
//! request-body bytes held in memory; past either, a request is shed at once with 503 and
//! `Retry-After` instead of queueing work (or memory) that the replica cannot carry.
//!
//! Both are counted with guards that live in the request's context, so a request that ends
//! any way at all (refused, answered, client gone, panicked) gives its share back.

use crate::error::ApiError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What `Retry-After` a shed request is told: load passes quickly, and a client that waits
/// longer than it must is capacity lost.
pub const SHED_RETRY_AFTER_SECS: u64 = 1;

/// The marks (`[server]` `max_in_flight`, `max_body_bytes_in_flight`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    pub max_in_flight: usize,
    pub max_body_bytes_in_flight: usize,
}

/// This replica's work in flight.
#[derive(Debug)]
pub struct Overload {
    marks: Marks,
    in_flight: Arc<AtomicUsize>,
    body_bytes: Arc<AtomicUsize>,
}

/// One request's place in flight; given back on drop.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The body bytes one request holds in memory; given back on drop.
#[derive(Debug)]
pub struct BodyBytes {
    held: usize,
    total: Arc<AtomicUsize>,
}

impl Drop for BodyBytes {
    fn drop(&mut self) {
        self.total.fetch_sub(self.held, Ordering::Relaxed);
    }
}

impl Overload {
    pub fn new(marks: Marks) -> Overload {
        Overload {
            marks,
            in_flight: Arc::default(),
            body_bytes: Arc::default(),
        }
    }

    /// A place for one more request, or the 503 that sheds it.
    pub fn enter(&self) -> Result<InFlight, ApiError> {
        let before = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let place = InFlight(self.in_flight.clone());
        if before >= self.marks.max_in_flight {
            crate::metrics::get().record_shed("in_flight");
            return Err(shed(format!(
                "This gateway replica is at its limit of {} requests in flight; retry shortly.",
                self.marks.max_in_flight
            )));
        }
        Ok(place)
    }

    /// An empty share of the body-bytes budget, grown with [`Overload::grow`].
    pub fn body_bytes(&self) -> BodyBytes {
        BodyBytes {
            held: 0,
            total: self.body_bytes.clone(),
        }
    }

    /// Counts `more` bytes of a body being read against the replica's budget, or sheds the
    /// request (what it held so far is given back when its share drops).
    pub fn grow(&self, share: &mut BodyBytes, more: usize) -> Result<(), ApiError> {
        let before = self.body_bytes.fetch_add(more, Ordering::Relaxed);
        share.held += more;
        if before + more > self.marks.max_body_bytes_in_flight {
            crate::metrics::get().record_shed("body_bytes");
            return Err(shed(format!(
                "This gateway replica holds its limit of {} bytes of request bodies; retry shortly.",
                self.marks.max_body_bytes_in_flight
            )));
        }
        Ok(())
    }

    /// Requests in flight and body bytes held now.
    pub fn load(&self) -> (usize, usize) {
        (
            self.in_flight.load(Ordering::Relaxed),
            self.body_bytes.load(Ordering::Relaxed),
        )
    }
}

fn shed(message: String) -> ApiError {
    ApiError::unavailable(message)
        .with_code("overloaded")
        .with_retry_after(SHED_RETRY_AFTER_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overload(max_in_flight: usize, max_body_bytes_in_flight: usize) -> Overload {
        Overload::new(Marks {
            max_in_flight,
            max_body_bytes_in_flight,
        })
    }

    #[test]
    fn past_the_in_flight_mark_requests_are_shed_until_one_ends() {
        let o = overload(2, 100);
        let a = o.enter().unwrap();
        let _b = o.enter().unwrap();
        let shed = o.enter().unwrap_err();
        assert_eq!((shed.status, shed.code), (503, Some("overloaded")));
        assert_eq!(o.load().0, 2, "a shed request holds no place");
        drop(a);
        assert!(o.enter().is_ok());
    }

    #[test]
    fn body_bytes_are_counted_across_requests_and_given_back_on_drop() {
        let o = overload(10, 100);
        let mut first = o.body_bytes();
        o.grow(&mut first, 60).unwrap();
        let mut second = o.body_bytes();
        o.grow(&mut second, 30).unwrap();
        assert!(o.grow(&mut second, 20).is_err());
        drop(second);
        assert_eq!(o.load().1, 60);
        drop(first);
        assert_eq!(o.load().1, 0);
    }
}
