//! How soon does a replica give freed memory back to the system? mimalloc (the gateway's
//! allocator) by default keeps freed pages for a second and two empty pages per size class
//! per thread for reuse. A burst (a store outage that piles up slow requests and the
//! connections clients open meanwhile) then leaves its high-water mark behind as resident
//! memory: in a soak with two Redis restarts, RSS ended 17% above its steady level with the
//! defaults and 10% with memory returned at once (docs/benchmarks.md, "Soak"). A gateway
//! replica is sized by its steady memory, so it keeps no empty pages and returns freed ones
//! after 100 ms. Not at once: under load a page freed by one request is wanted again
//! milliseconds later, and returning it at once made the kernel fault it back (and, with
//! transparent huge pages, zero 2 MiB) several times a second per thread, 5% of a busy
//! replica's CPU; a tenth of a second keeps those pages while a burst's memory still goes
//! back (docs/benchmarks.md, "Seventh profile").
//!
//! The operator's own `MIMALLOC_PURGE_DELAY` or `MIMALLOC_PAGE_FULL_RETAIN` (mimalloc reads
//! them at start) are left as they are.

use std::ffi::{c_int, c_long};

// Links mimalloc's static library (through the `mimalloc` crate) into every binary that uses
// this module, the tests included; it exports the entry points below.
extern crate mimalloc;

// mimalloc's own C entry points (its Rust bindings do not yet name these two options).
extern "C" {
    fn mi_option_get(option: c_int) -> c_long;
    fn mi_option_set(option: c_int, value: c_long);
}

/// `mi_option_purge_delay` in the bundled mimalloc's `mi_option_t` (milliseconds before a
/// freed page is returned; 1000 by default).
const PURGE_DELAY: c_int = 15;
/// `mi_option_page_full_retain` (empty pages kept per size class; 2 by default).
const PAGE_FULL_RETAIN: c_int = 36;

/// How long the gateway lets a freed page wait for reuse before returning it (milliseconds).
pub const PURGE_DELAY_MS: c_long = 100;

/// Sets mimalloc to return freed pages after `PURGE_DELAY_MS` and keep no empty ones, where
/// the operator has not chosen otherwise. Call first thing in `main`.
pub fn return_freed_memory_promptly() {
    for (option, variable, value) in [
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY", PURGE_DELAY_MS),
        (PAGE_FULL_RETAIN, "MIMALLOC_PAGE_FULL_RETAIN", 0),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: sets one of mimalloc's process-wide options, which it reads atomically.
            unsafe { mi_option_set(option, value) };
        }
    }
}

/// The current value of one of the options above.
fn option(option: c_int) -> c_long {
    // SAFETY: reads one of mimalloc's process-wide options.
    unsafe { mi_option_get(option) }
}

/// What the options are now: (purge delay in ms, empty pages kept per size class).
pub fn settings() -> (c_long, c_long) {
    (option(PURGE_DELAY), option(PAGE_FULL_RETAIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_option_numbers_name_the_bundled_mimallocs_options() {
        // Their defaults say these are the options meant: a mimalloc upgrade that moved them
        // fails here instead of setting something else.
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
            || std::env::var_os("MIMALLOC_PAGE_FULL_RETAIN").is_some()
        {
            return;
        }
        assert_eq!(settings(), (1000, 2), "mimalloc's defaults");
        return_freed_memory_promptly();
        assert_eq!(settings(), (PURGE_DELAY_MS, 0));
    }
}
