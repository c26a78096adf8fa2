//! The shell around the state machine: turns queue messages into machine events, applies
//! them through the store's one transaction, and runs the effects the machine decided.

pub mod translate;
