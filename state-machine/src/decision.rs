//! The result of handling one event: where the machine went, why, and the effects the
//! worker must persist and execute. Outcomes are enums, not booleans (style principle 15).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::details::StateName;
use crate::effect::Effect;

/// What one `handle` call decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// State before the event.
    pub from: StateName,
    /// State after the event.
    pub to: StateName,
    /// Applied, rejected or ignored, and why.
    pub outcome: Outcome,
    /// Work for the worker, in order. Always empty when the outcome is `Ignored`.
    pub effects: Vec<Effect>,
}

impl Decision {
    /// An ignored event: nothing changes, nothing to do.
    pub(crate) fn ignored(state: StateName, reason: IgnoreReason) -> Self {
        Decision {
            from: state,
            to: state,
            outcome: Outcome::Ignored { reason },
            effects: Vec::new(),
        }
    }
}

/// How the event was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The event changed our view or produced work.
    Applied {
        /// Human-readable explanation for the event log.
        reason: String,
    },
    /// The event asked for something we refuse (policy, state, or Microsoft refused it).
    /// May carry effects, e.g. an `AckOperation` with `Failure`.
    Rejected {
        /// Why.
        reason: String,
    },
    /// The event changes nothing; no effects.
    Ignored {
        /// Why.
        reason: IgnoreReason,
    },
}

impl Outcome {
    /// The fieldless kind, for tables and labels.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Applied { .. } => OutcomeKind::Applied,
            Outcome::Rejected { .. } => OutcomeKind::Rejected,
            Outcome::Ignored { .. } => OutcomeKind::Ignored,
        }
    }

    /// Whether the event was ignored.
    pub fn is_ignored(&self) -> bool {
        matches!(self, Outcome::Ignored { .. })
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Applied { reason } => write!(f, "applied: {reason}"),
            Outcome::Rejected { reason } => write!(f, "rejected: {reason}"),
            Outcome::Ignored { reason } => write!(f, "ignored: {reason}"),
        }
    }
}

/// The kind of an [`Outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutcomeKind {
    /// [`Outcome::Applied`].
    Applied,
    /// [`Outcome::Rejected`].
    Rejected,
    /// [`Outcome::Ignored`].
    Ignored,
}

/// Why an event was ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IgnoreReason {
    /// Same idempotency key seen before (P9).
    Duplicate,
    /// Older than what the state already reflects (P10).
    Stale,
    /// The subscription is Unsubscribed; nothing resurrects it (P10).
    Terminal,
    /// The event does not apply in this state.
    NotApplicable(String),
    /// The event describes what we already know.
    NoChange,
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IgnoreReason::Duplicate => f.write_str("duplicate event"),
            IgnoreReason::Stale => f.write_str("stale event"),
            IgnoreReason::Terminal => f.write_str("subscription is unsubscribed (terminal)"),
            IgnoreReason::NotApplicable(why) => write!(f, "not applicable: {why}"),
            IgnoreReason::NoChange => f.write_str("no change"),
        }
    }
}
