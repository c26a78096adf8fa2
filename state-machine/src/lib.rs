//! The pure subscription lifecycle of a Microsoft commercial marketplace SaaS offer:
//! `(machine, event, now, policy) -> Decision { state, outcome, effects }`.
//!
//! Layout:
//! - [`ids`]: parsed value types (`SubscriptionId`, `PlanId`, `Quantity`, …).
//! - [`details`]: what we know (`Details`), what Microsoft says (`Snapshot`), `StateName`.
//! - [`event`]: inputs (`Event`, `Webhook`, `Command`, `EventKind`).
//! - [`effect`]: outputs (`Effect`, `DomainEvent`).
//! - [`policy`]: the ISV's rules for changes and activation.
//! - [`decision`]: the result of one `handle` call.
//! - [`machine`]: the statig machine and the `SubscriptionMachine` wrapper.
//! - `seen`: the ring of handled event keys (P9), as fingerprints.
//! - [`notice`]: which lifecycle notices a subscription is owed, and when.
//! - [`diagram`]: Mermaid/DOT diagrams derived by driving the machine.
//!
//! No IO, no clock, no randomness: the worker passes `now` in and executes the effects.

pub mod decision;
pub mod details;
pub mod diagram;
pub mod effect;
pub mod event;
pub mod ids;
pub mod machine;
pub mod notice;
pub mod policy;
mod seen;

pub use decision::{Decision, IgnoreReason, Outcome, OutcomeKind};
pub use details::{
    AllowedOperations, Details, MarketplaceStatus, Party, Snapshot, StateName, Term, TermLength,
    UnknownStateName,
};
pub use diagram::{Transition, render_dot, render_mermaid, transitions};
pub use effect::{AckStatus, DomainEvent, DomainEventKind, Effect};
pub use event::{
    Command, Event, EventKind, OperationStatus, RequestSource, Webhook, WebhookAction,
};
pub use ids::{
    CommandId, InvalidId, OfferId, OperationId, PlanId, Quantity, SubscriptionId, TenantId,
};
pub use machine::{
    ActivationProgress, PendingOperation, SubscriptionMachine, UNCONFIRMED_TTL, Unconfirmed,
    UnconfirmedChange,
};
pub use notice::{Notice, NoticeChanges, NoticeKind, NoticePolicy};
pub use policy::{ActivationMode, PlanMove, PlanMoves, Policy, SeatLimits, Verdict};
pub use seen::SEEN_KEYS_CAPACITY;
