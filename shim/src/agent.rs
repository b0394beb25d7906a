//! Calls to the guest agent: their deadlines, and what a failed call's error says about
//! the connection.
use std::time::Duration;

/// A ttrpc context with a deadline (0: none).
pub fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(timeout.as_nanos() as i64)
}

/// Whether an agent call failed because its connection broke (LocalClosed: it had already
/// broken when the call was made).
pub fn broke(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::Socket(_) | ttrpc::Error::LocalClosed)
}

/// Whether an agent call failed because its deadline passed (ttrpc reports that only in
/// its message).
pub fn is_timeout(e: &ttrpc::Error) -> bool {
    matches!(e, ttrpc::Error::Others(m) if m.starts_with("Receive packet timeout"))
}
