//! When may a held simulated stream go on? Stream gates: a test hook that holds a simulated
//! stream still until a test lets it go.
//!
//! A gateway test needs to prove that the gateway forwards each token as it is produced
//! instead of buffering the response, and it must prove it without timing assertions. So:
//! a streamed request whose `user` field is `sim-gate:NAME` emits its role chunk and its
//! first content token, then waits until `POST /sim/gates/NAME/open` is called; only then
//! does the rest follow. A client that has received the first token while the gate is still
//! shut has proved the path does not buffer.
//!
//! `POST /sim/gates/NAME/open` answers `{"released":N}`, N being the number of streams that
//! were waiting on that gate at that moment. A gate opened while nobody waits does not stay
//! open: a stream that reaches the gate later waits for the next opening. A stream never
//! waits longer than [`GATE_TIMEOUT`], so a forgotten gate cannot hang a test run forever;
//! a stream whose client has gone away stops waiting at once, and a shutdown opens every
//! gate.
//!
//! This module must never hold its lock across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// The `user` prefix that puts a streamed request behind a gate.
pub const GATE_USER_PREFIX: &str = "sim-gate:";

/// The longest a stream waits at a gate before carrying on by itself.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(60);

/// The gate named by a request's `user` field, if it names one.
pub fn gate_name(user: Option<&str>) -> Option<&str> {
    user?
        .strip_prefix(GATE_USER_PREFIX)
        .filter(|name| !name.is_empty())
}

#[derive(Debug, Default)]
pub struct Gates {
    waiting: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
}

/// How a wait at a gate ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateOutcome {
    Opened,
    TimedOut,
}

impl Gates {
    /// Joins the queue at gate `name`. Call it before the client can see the first token,
    /// so that a client reacting to that token always finds this stream waiting.
    pub fn join(self: &Arc<Self>, name: &str) -> GateTicket {
        let (sender, receiver) = oneshot::channel();
        self.lock().entry(name.to_owned()).or_default().push(sender);
        GateTicket {
            gates: Arc::clone(self),
            name: name.to_owned(),
            receiver,
        }
    }

    /// Releases every stream waiting at `name` and says how many there were.
    pub fn open(&self, name: &str) -> usize {
        let senders = self.lock().remove(name).unwrap_or_default();
        // A sender whose stream already left (timed out, client gone) fails to send and is
        // not counted: it was not waiting.
        senders
            .into_iter()
            .map(|sender| sender.send(()))
            .filter(Result::is_ok)
            .count()
    }

    /// Releases every waiting stream at every gate: at shutdown, so held streams finish
    /// and the process exits without waiting out [`GATE_TIMEOUT`].
    pub fn open_all(&self) -> usize {
        let waiting = std::mem::take(&mut *self.lock());
        waiting
            .into_values()
            .flatten()
            .map(|sender| sender.send(()))
            .filter(Result::is_ok)
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<()>>>> {
        // The map stays consistent even if a holder panicked: every update is one call.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A stream's place at a gate. Dropping it (stream finished, client gone) leaves the queue.
#[derive(Debug)]
pub struct GateTicket {
    gates: Arc<Gates>,
    name: String,
    receiver: oneshot::Receiver<()>,
}

impl GateTicket {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn wait(mut self, timeout: Duration) -> GateOutcome {
        match tokio::time::timeout(timeout, &mut self.receiver).await {
            Ok(Ok(())) => GateOutcome::Opened,
            // The sender cannot be dropped unopened while this ticket is queued; treat it
            // as the timeout it would otherwise become.
            Ok(Err(_)) | Err(_) => GateOutcome::TimedOut,
        }
    }
}

impl Drop for GateTicket {
    fn drop(&mut self) {
        // Closing first marks this ticket's sender as abandoned, so the sweep below removes
        // it and `open` would not count it.
        self.receiver.close();
        let mut waiting = self.gates.lock();
        if let Some(senders) = waiting.get_mut(&self.name) {
            senders.retain(|sender| !sender.is_closed());
            if senders.is_empty() {
                waiting.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sim_gate_users_name_a_gate() {
        assert_eq!(gate_name(Some("sim-gate:x")), Some("x"));
        assert_eq!(gate_name(Some("sim-gate:")), None);
        assert_eq!(gate_name(Some("alice")), None);
        assert_eq!(gate_name(None), None);
    }

    #[tokio::test]
    async fn opening_releases_the_waiting_streams_and_counts_them() {
        let gates = Arc::new(Gates::default());
        let first = gates.join("x");
        let second = gates.join("x");
        let other = gates.join("y");
        let waits = tokio::spawn(async move {
            (
                first.wait(GATE_TIMEOUT).await,
                second.wait(GATE_TIMEOUT).await,
            )
        });
        assert_eq!(gates.open("x"), 2);
        assert_eq!(
            waits.await.unwrap(),
            (GateOutcome::Opened, GateOutcome::Opened)
        );
        drop(other);
        assert!(gates.lock().is_empty(), "a dropped ticket leaves its queue");
        let held = gates.join("z");
        assert_eq!(gates.open_all(), 1);
        assert_eq!(held.wait(GATE_TIMEOUT).await, GateOutcome::Opened);
    }

    #[tokio::test]
    async fn an_opening_with_nobody_waiting_does_not_stay_open() {
        let gates = Arc::new(Gates::default());
        assert_eq!(gates.open("x"), 0);
        let ticket = gates.join("x");
        assert_eq!(
            ticket.wait(Duration::from_millis(1)).await,
            GateOutcome::TimedOut
        );
        assert_eq!(gates.open("x"), 0, "a stream that gave up is not counted");
    }
}
