//! `fulfillment reconcile`: Microsoft's List Subscriptions (§4.3, every page, P28) against
//! our state, reporting drift of five kinds — missing here, unknown to Microsoft, state,
//! plan or quantity mismatch — and purchases stuck in PendingFulfillment longer than
//! `reconcile.stuck_pending_after` (P27: no activation, no revenue).
//!
//! With `--execute` each drifted subscription is healed through the machine, never by
//! writing state:
//!
//! - It is skipped (deferred to the next run) while anything is in flight for it: a
//!   publisher operation the machine is waiting for, effects not yet run, or an operation
//!   Microsoft still lists as outstanding (§4.9).
//! - It is fetched again with GET (§4.4, the source of truth), and what Microsoft says is
//!   fed as an `Observed` event through the worker's one apply path
//!   ([`crate::worker::apply`]) with the version we read: under the row lock, and only if
//!   no other event was applied since our side was read. So a webhook the
//!   worker applies meanwhile always wins; the reconciler tries again next run.
//! - Unknown to Microsoft: only when GET also answers 404 (Microsoft lists cancelled
//!   subscriptions forever, so it never was a purchase of this publisher) is an
//!   `Observed Unsubscribed` fed, which ends the entitlement.
//! - Stuck in PendingFulfillment: when the landing page resolved the purchase and the
//!   policy activates automatically, an `ActivationRequested` is fed (the machine decides
//!   whether to activate again), preceded by an `ActivationFailed` when an activation was
//!   requested long ago and never completed (its effect died); otherwise it is reported for
//!   a person (manual activation, or a customer who never reached the landing page).
//!
//! Every heal appends a `reconcile:drift` row to the subscription's event log naming the
//! drift, the run and Microsoft's request id, next to the machine's own decision.

use std::collections::{HashMap, HashSet};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use fulfillment_state_machine::{
    ActivationMode, ActivationProgress, CommandId, Event, MarketplaceStatus, Outcome, Policy,
    Snapshot, StateName, SubscriptionId, SubscriptionMachine,
};
use serde::Serialize;
use serde_json::json;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::render::{Table, or_dash};
use super::{cli_actor, rfc3339};
use crate::marketplace::{
    CallContext, Error as ApiError, MarketplaceClient, Subscription, TokenProvider,
};
use crate::settings::{ReconcileSettings, Settings};
use crate::store::operator_actions::{self, ActionKind, NewAction};
use crate::store::subscriptions::SubscriptionRecord;
use crate::store::timeline;
use crate::worker::apply::{self, Apply, ApplyOutcome, EffectRecord, EventSource, Expected};
use crate::worker::translate;

/// Our subscription ids read per query while looking for those Microsoft did not list.
const OUR_PAGE: i64 = 5000;

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// Heal the drift through the machine; without it, only report.
    #[arg(long)]
    pub execute: bool,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The ids Microsoft listed, in listing order, as 16-byte integers (a `Uuid` is its
/// big-endian `u128`, so both sort alike).
#[derive(Debug, Default)]
struct ListedIds {
    in_order: Vec<u128>,
}

impl ListedIds {
    /// Appends a listed id; returns its listing position.
    fn push(&mut self, id: Uuid) -> usize {
        self.in_order.push(id.as_u128());
        self.in_order.len() - 1
    }

    /// The distinct ids, sorted for lookups, and the listing positions that repeat an id
    /// listed earlier. Sorting a permutation costs 4 more bytes per id for a moment.
    fn finish(self) -> (SortedIds, HashSet<usize>) {
        let ids = self.in_order;
        let mut repeats = HashSet::new();
        if ids.windows(2).any(|pair| pair[0] >= pair[1]) {
            let mut order: Vec<u32> = (0..ids.len() as u32).collect();
            order.sort_unstable_by_key(|&i| (ids[i as usize], i));
            for pair in order.windows(2) {
                if ids[pair[0] as usize] == ids[pair[1] as usize] {
                    repeats.insert(pair[1] as usize);
                }
            }
        }
        let mut ids = ids;
        ids.sort_unstable();
        ids.dedup();
        ids.shrink_to_fit();
        (SortedIds(ids), repeats)
    }
}

/// Distinct ids, sorted.
#[derive(Debug)]
struct SortedIds(Vec<u128>);

impl SortedIds {
    fn contains(&self, id: Uuid) -> bool {
        self.0.binary_search(&id.as_u128()).is_ok()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A kind of drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// Microsoft lists it; we have never seen it (a lost webhook, a purchase whose customer
    /// never reached the landing page, P12).
    MissingHere,
    /// We have it (not Unsubscribed); Microsoft does not list it.
    UnknownToMicrosoft,
    StateMismatch,
    PlanMismatch,
    QuantityMismatch,
    /// PendingFulfillment for longer than `stuck_pending_after` (P27).
    StuckPending,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingHere => "missing here",
            Self::UnknownToMicrosoft => "unknown to Microsoft",
            Self::StateMismatch => "state mismatch",
            Self::PlanMismatch => "plan mismatch",
            Self::QuantityMismatch => "quantity mismatch",
            Self::StuckPending => "stuck in PendingFulfillment",
        }
    }
}

/// One side's view of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Side {
    pub state: Option<String>,
    pub plan_id: Option<String>,
    pub quantity: Option<i64>,
}

/// What `--execute` did about one drifted subscription.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Heal {
    /// Not asked to (no `--execute`).
    NotAttempted,
    /// Events were fed through the machine; their event-log ids and decisions.
    Healed {
        events: Vec<String>,
    },
    /// In flight or changed meanwhile; the next run looks again.
    Deferred {
        reason: String,
    },
    /// Nothing the reconciler may do; a person decides.
    NeedsOperator {
        reason: String,
    },
    Failed {
        error: String,
    },
}

/// What feeding one event during a heal came to.
enum Fed {
    /// Another event was applied since the run looked: nothing was fed.
    Changed,
    /// The event was fed before (same inbox key).
    Duplicate,
    /// The machine decided this.
    Decided(Outcome),
}

fn deferred() -> Heal {
    Heal::Deferred {
        reason: "another event was applied meanwhile".into(),
    }
}

/// One drifted subscription.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub subscription_id: Uuid,
    pub kinds: Vec<DriftKind>,
    pub ours: Option<Side>,
    pub microsoft: Option<Side>,
    /// How long it has been pending, for `stuck_pending`.
    pub pending_for_secs: Option<i64>,
    pub heal: Heal,
}

/// One reconciliation run.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileReport {
    pub run_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    pub executed: bool,
    /// Subscriptions Microsoft listed, and the pages' request ids.
    pub listed_by_microsoft: usize,
    pub list_request_ids: Vec<String>,
    pub known_here: usize,
    pub drifts: Vec<Drift>,
}

impl ReconcileReport {
    /// Drift found (without `--execute`) or left (with it).
    pub fn has_drift(&self) -> bool {
        self.drifts
            .iter()
            .any(|d| !matches!(d.heal, Heal::Healed { .. }))
    }
}

/// What the reconciler needs.
#[derive(Debug, Clone)]
pub struct Reconciler {
    pub pool: PgPool,
    pub client: MarketplaceClient,
    pub policy: Policy,
    pub stuck_pending_after: Duration,
    /// Who, for the journal (`cli:…` or `worker:reconcile`).
    pub actor: String,
}

impl Reconciler {
    /// One run: list Microsoft's subscriptions page by page, compare each page with our
    /// rows for its ids, then walk our ids for those Microsoft did not list; heal when
    /// `execute`. Memory holds one page, the ids Microsoft listed and the drift, never every
    /// subscription.
    ///
    /// The listed ids are kept as a plain vector of 16-byte integers, sorted once the
    /// listing is done: 16 bytes per subscription (15 MiB at a million), where a hash set
    /// took more than twice that and twice again while it grew (59 MiB peak at a million).
    /// It is not bounded independently of N: that would take merging Microsoft's listing
    /// with our id-ordered keyset pages, and Microsoft documents no order for List
    /// Subscriptions (pages even shift under concurrent purchases), so the merge could
    /// report a listed subscription as unknown. The exact set it is.
    pub async fn run(&self, execute: bool) -> anyhow::Result<ReconcileReport> {
        let run_id = Uuid::now_v7();
        let started_at = OffsetDateTime::now_utc();
        let ctx = CallContext::new(run_id);
        let now = OffsetDateTime::now_utc();
        let mut found = Vec::new();
        let mut listed = ListedIds::default();
        // The listing position of each drift noted while listing, in `found`'s order.
        let mut noted_at = Vec::new();
        let mut list_request_ids = Vec::new();
        let mut pages = self.client.subscription_pages(ctx);
        while let Some(page) = pages
            .next()
            .await
            .context("cannot list Microsoft's subscriptions")?
        {
            list_request_ids.push(page.meta.request_id.to_string());
            let ids: Vec<Uuid> = page.value.subscriptions.iter().map(|s| s.id).collect();
            let mut ours: HashMap<Uuid, SubscriptionRecord> =
                crate::store::subscriptions::find_many(&self.pool, &ids)
                    .await
                    .context("cannot read our subscriptions")?
                    .into_iter()
                    .map(|r| (r.id, r))
                    .collect();
            for theirs in page.value.subscriptions {
                let position = listed.push(theirs.id);
                let record = ours.remove(&theirs.id);
                let before = found.len();
                self.note_drift(&mut found, record, Some(theirs), now);
                if found.len() > before {
                    noted_at.push(position);
                }
            }
        }
        // Listed twice (pages shifting under a concurrent purchase): the first listing
        // counts, what a later one noted is dropped.
        let (listed, repeats) = listed.finish();
        if !repeats.is_empty() {
            let mut positions = noted_at.iter();
            found.retain(|_| positions.next().is_none_or(|p| !repeats.contains(p)));
        }
        drop(noted_at);
        // Ours that Microsoft did not list.
        let mut known_here = 0;
        let mut after = None;
        loop {
            let ids = crate::store::subscriptions::ids_after(&self.pool, after, OUR_PAGE)
                .await
                .context("cannot read our subscriptions")?;
            known_here += ids.len();
            after = ids.last().copied();
            let unlisted: Vec<Uuid> = ids.into_iter().filter(|id| !listed.contains(*id)).collect();
            if !unlisted.is_empty() {
                for record in crate::store::subscriptions::find_many(&self.pool, &unlisted)
                    .await
                    .context("cannot read our subscriptions")?
                {
                    self.note_drift(&mut found, Some(record), None, now);
                }
            }
            if after.is_none() {
                break;
            }
        }
        found.sort_by_key(|(drift, _)| drift.subscription_id);
        let mut drifts = Vec::with_capacity(found.len());
        for (mut drift, record) in found {
            if execute {
                drift.heal = match self.heal(&ctx, run_id, &drift, record.as_ref()).await {
                    Ok(heal) => heal,
                    Err(error) => Heal::Failed {
                        error: format!("{error:#}"),
                    },
                };
            }
            drifts.push(drift);
        }
        let listed_by_microsoft = listed.len();
        let report = ReconcileReport {
            run_id,
            started_at,
            executed: execute,
            listed_by_microsoft,
            list_request_ids,
            known_here,
            drifts,
        };
        self.journal(&report).await;
        Ok(report)
    }

    /// Compares one subscription and keeps it, with our record for the heal, when it drifted.
    fn note_drift(
        &self,
        found: &mut Vec<(Drift, Option<SubscriptionRecord>)>,
        ours: Option<SubscriptionRecord>,
        theirs: Option<Subscription>,
        now: OffsetDateTime,
    ) {
        let (kinds, pending_for) = compare(
            ours.as_ref(),
            theirs.as_ref(),
            now,
            self.stuck_pending_after,
        );
        let Some(subscription_id) = ours
            .as_ref()
            .map(|r| r.id)
            .or(theirs.as_ref().map(|s| s.id))
        else {
            return;
        };
        if kinds.is_empty() {
            return;
        }
        let drift = Drift {
            subscription_id,
            kinds,
            ours: ours.as_ref().map(our_side),
            microsoft: theirs.as_ref().map(their_side),
            pending_for_secs: pending_for.map(|d| d.whole_seconds()),
            heal: Heal::NotAttempted,
        };
        found.push((drift, ours));
    }

    async fn journal(&self, report: &ReconcileReport) {
        let healed = report
            .drifts
            .iter()
            .filter(|d| matches!(d.heal, Heal::Healed { .. }))
            .count();
        let action = NewAction {
            action: ActionKind::Reconcile,
            performed_by: self.actor.clone(),
            performed_at: report.started_at,
            subscription_id: None,
            dead_letter_id: None,
            queue: None,
            reason: Some(format!(
                "{} drifted, {healed} healed{}",
                report.drifts.len(),
                if report.executed {
                    ""
                } else {
                    " (report only)"
                }
            )),
            details: serde_json::to_value(report).unwrap_or_default(),
        };
        if let Err(error) = operator_actions::record_all(&self.pool, &[action]).await {
            tracing::warn!(%error, "cannot journal the reconciliation run");
        }
    }

    async fn heal(
        &self,
        ctx: &CallContext,
        run_id: Uuid,
        drift: &Drift,
        ours: Option<&SubscriptionRecord>,
    ) -> anyhow::Result<Heal> {
        let id = drift.subscription_id;
        let machine = ours
            .and_then(|r| serde_json::from_value::<SubscriptionMachine>(r.machine.clone()).ok());
        if let Some(op) = machine.as_ref().and_then(|m| m.pending_operation()) {
            return Ok(Heal::Deferred {
                reason: format!("publisher command {} is in flight", op.command_id),
            });
        }
        let (pending_effects, _) = timeline::outbox_counts(&self.pool, id).await?;
        if pending_effects > 0 {
            return Ok(Heal::Deferred {
                reason: format!("{pending_effects} effect(s) not yet run"),
            });
        }
        let operations = self.client.list_operations(ctx, id).await?;
        if let Some(op) = operations
            .value
            .iter()
            .find(|op| op.status.as_ref().is_none_or(|s| !s.is_terminal()))
        {
            return Ok(Heal::Deferred {
                reason: format!(
                    "operation {} ({}) is still in progress at Microsoft",
                    op.id,
                    op.action.as_ref().map_or("?", |a| a.as_str())
                ),
            });
        }
        let mut expected = match ours {
            Some(record) => Expected::Version(record.version),
            None => Expected::Absent,
        };
        let now = OffsetDateTime::now_utc();
        let kinds: Vec<&str> = drift.kinds.iter().map(|k| k.as_str()).collect();
        let (snapshot, request_id) = match self.client.get_subscription(ctx, id).await {
            Ok(found) => (
                translate::snapshot(&found.value),
                Some(found.meta.request_id.to_string()),
            ),
            Err(error @ ApiError::NotFound { .. })
                if drift.kinds.contains(&DriftKind::UnknownToMicrosoft) =>
            {
                let ended = Snapshot::with_status(MarketplaceStatus::Unsubscribed);
                (ended, error.request_id().map(|r| r.to_string()))
            }
            Err(error) => return Err(error.into()),
        };
        let mut events = Vec::new();
        let source = EventSource {
            message_id: Some(format!("reconcile:{run_id}")),
            correlation_id: Some(run_id.to_string()),
            request_id: request_id.clone(),
            ..EventSource::default()
        };
        let observable = drift.kinds.iter().any(|k| {
            matches!(
                k,
                DriftKind::MissingHere
                    | DriftKind::UnknownToMicrosoft
                    | DriftKind::StateMismatch
                    | DriftKind::PlanMismatch
                    | DriftKind::QuantityMismatch
            )
        });
        if observable {
            let event = Event::Observed {
                snapshot: snapshot.clone(),
                observed_at: now,
            };
            match self
                .feed_if_unchanged(id, &mut expected, &event, &source, now, &mut events)
                .await?
            {
                Fed::Changed => return Ok(deferred()),
                Fed::Decided(outcome) if outcome.is_ignored() => {
                    return Ok(Heal::NeedsOperator {
                        reason: format!("the machine ignored Microsoft's view: {outcome}"),
                    });
                }
                Fed::Decided(_) | Fed::Duplicate => {}
            }
        }
        let still_pending = snapshot.status.state() == Some(StateName::PendingFulfillment);
        if drift.kinds.contains(&DriftKind::StuckPending) && still_pending {
            let resolved = timeline::was_resolved(&self.pool, id).await?;
            if self.policy.activation != ActivationMode::Automatic || !resolved {
                let reason = if resolved {
                    "activation is manual: activate with `fulfillment subscription activate`"
                } else {
                    "the customer has not reached the landing page yet"
                };
                self.record(id, run_id, &kinds, &request_id, reason).await;
                if events.is_empty() {
                    return Ok(Heal::NeedsOperator {
                        reason: reason.into(),
                    });
                }
                return Ok(Heal::Healed { events });
            }
            // Requested long ago and still pending at Microsoft: the Activate effect died
            // or was lost. Say so to the machine first, so it may ask again.
            if matches!(
                machine.as_ref().map(SubscriptionMachine::activation),
                Some(ActivationProgress::Requested)
            ) {
                let event = Event::ActivationFailed {
                    reason: format!(
                        "still pending at Microsoft {} after the purchase (reconcile run {run_id})",
                        human_age(drift.pending_for_secs.unwrap_or_default())
                    ),
                    failed_at: now,
                };
                let fed = self
                    .feed_if_unchanged(id, &mut expected, &event, &source, now, &mut events)
                    .await?;
                if matches!(fed, Fed::Changed) {
                    return Ok(deferred());
                }
            }
            let event = Event::ActivationRequested {
                command_id: CommandId::from(Uuid::new_v4()),
            };
            match self
                .feed_if_unchanged(id, &mut expected, &event, &source, now, &mut events)
                .await?
            {
                Fed::Changed => return Ok(deferred()),
                Fed::Decided(outcome) if outcome.is_ignored() => {
                    self.record(id, run_id, &kinds, &request_id, "activation not retried")
                        .await;
                    return Ok(Heal::NeedsOperator {
                        reason: outcome.to_string(),
                    });
                }
                Fed::Decided(_) | Fed::Duplicate => {}
            }
        }
        self.record(id, run_id, &kinds, &request_id, "fed through the machine")
            .await;
        if events.is_empty() {
            return Ok(Heal::Healed {
                events: vec!["already in agreement when fetched again".into()],
            });
        }
        Ok(Heal::Healed { events })
    }

    /// Feeds `event` through the machine unless the subscription changed since `expected`
    /// (checked under the row lock, so it never overtakes the worker); notes the decision in
    /// `events` and moves `expected` past it for the next event of the same run.
    async fn feed_if_unchanged(
        &self,
        id: Uuid,
        expected: &mut Expected,
        event: &Event,
        source: &EventSource,
        now: OffsetDateTime,
        events: &mut Vec<String>,
    ) -> anyhow::Result<Fed> {
        let command =
            Apply::new(SubscriptionId::from(id), event, source, now).if_unchanged(*expected);
        let fed = match apply::apply(&self.pool, &self.policy, &command).await? {
            ApplyOutcome::Changed { .. } => return Ok(Fed::Changed),
            ApplyOutcome::Duplicate => Fed::Duplicate,
            ApplyOutcome::Decided(applied) => {
                events.push(format!(
                    "{} {}: {}",
                    applied.event_id,
                    event.kind(),
                    applied.decision.outcome
                ));
                Fed::Decided(applied.decision.outcome)
            }
        };
        *expected = match current_version(&self.pool, id).await? {
            Some(version) => Expected::Version(version),
            None => Expected::Absent,
        };
        Ok(fed)
    }

    /// Appends a `reconcile:drift` row to the subscription's event log.
    async fn record(
        &self,
        id: Uuid,
        run_id: Uuid,
        kinds: &[&str],
        request_id: &Option<String>,
        what: &str,
    ) {
        let record = EffectRecord {
            event_kind: "reconcile:drift".into(),
            event_key: format!("reconcile:{run_id}:{id}"),
            details: json!({ "run_id": run_id, "drift": kinds, "by": self.actor }),
            reason: format!(
                "reconcile run {run_id} by {}: {}; {what}",
                self.actor,
                kinds.join(", ")
            ),
            correlation_id: Some(run_id.to_string()),
            request_id: request_id.clone(),
        };
        if let Err(error) = apply::record(&self.pool, id, &record, OffsetDateTime::now_utc()).await
        {
            tracing::warn!(%error, subscription_id = %id, "cannot record the drift in the event log");
        }
    }
}

async fn current_version(pool: &PgPool, id: Uuid) -> anyhow::Result<Option<i64>> {
    Ok(crate::store::subscriptions::find(pool, id)
        .await?
        .map(|r| r.version))
}

fn our_side(record: &SubscriptionRecord) -> Side {
    Side {
        state: Some(record.state.clone()),
        plan_id: record.plan_id.clone(),
        quantity: record.quantity.map(i64::from),
    }
}

fn their_side(subscription: &Subscription) -> Side {
    Side {
        state: their_state(subscription).map(|s| s.as_str().to_string()),
        plan_id: subscription.plan_id.clone(),
        quantity: subscription.quantity.map(i64::from),
    }
}

fn their_state(subscription: &Subscription) -> Option<StateName> {
    subscription
        .status
        .as_ref()
        .and_then(|s| MarketplaceStatus::parse(s.as_str()).state())
}

/// The drift between our record and Microsoft's, and how long it has been pending.
pub fn compare(
    ours: Option<&SubscriptionRecord>,
    theirs: Option<&Subscription>,
    now: OffsetDateTime,
    stuck_after: Duration,
) -> (Vec<DriftKind>, Option<time::Duration>) {
    let mut kinds = Vec::new();
    let their_state = theirs.and_then(their_state);
    let our_state = ours.and_then(SubscriptionRecord::state_name);
    match (ours, theirs) {
        (None, None) => return (kinds, None),
        // A purchase still pending at Microsoft that we have not seen yet, younger than
        // `stuck_after`, is a customer on the way to the landing page: not drift.
        (None, Some(subscription))
            if their_state == Some(StateName::PendingFulfillment)
                && subscription
                    .created
                    .is_some_and(|created| now - created < stuck_after) =>
        {
            return (kinds, None);
        }
        (None, Some(_)) => kinds.push(DriftKind::MissingHere),
        (Some(_), None) => {
            if our_state != Some(StateName::Unsubscribed) {
                kinds.push(DriftKind::UnknownToMicrosoft);
            }
        }
        (Some(record), Some(subscription)) => {
            if their_state.is_some() && our_state != their_state {
                kinds.push(DriftKind::StateMismatch);
            }
            let both_ended = our_state == Some(StateName::Unsubscribed)
                && their_state == Some(StateName::Unsubscribed);
            if !both_ended {
                let plan = |p: Option<&str>| {
                    p.map(str::trim)
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                };
                if plan(record.plan_id.as_deref()) != plan(subscription.plan_id.as_deref())
                    && subscription.plan_id.is_some()
                {
                    kinds.push(DriftKind::PlanMismatch);
                }
                if record.quantity.map(i64::from) != subscription.quantity.map(i64::from) {
                    kinds.push(DriftKind::QuantityMismatch);
                }
            }
        }
    }
    // Pending on both sides (or pending at Microsoft and unknown here) for too long.
    let pending_here = ours.is_none() || our_state == Some(StateName::PendingFulfillment);
    let pending_there = theirs.is_none() || their_state == Some(StateName::PendingFulfillment);
    let mut pending_for = None;
    if pending_here && pending_there {
        let since = theirs
            .and_then(|s| s.created)
            .or(ours.map(|r| r.created_at));
        if let Some(since) = since {
            let age = now - since;
            if age >= stuck_after {
                kinds.push(DriftKind::StuckPending);
                pending_for = Some(age);
            }
        }
    }
    (kinds, pending_for)
}

// ---- the command line and the worker's timer -----------------------------------------

/// Builds a reconciler from the settings (its own pool and Marketplace client).
pub async fn reconciler(settings: &Settings, actor: String) -> anyhow::Result<Reconciler> {
    let pool = crate::store::connect(&settings.database).await?;
    let tokens =
        TokenProvider::for_settings(settings).context("cannot set up the Entra token provider")?;
    let client = MarketplaceClient::new(&settings.marketplace, tokens)
        .context("cannot build the Marketplace client")?;
    Ok(Reconciler {
        pool,
        client,
        policy: settings.policy.clone(),
        stuck_pending_after: settings.reconcile.stuck_pending_after,
        actor,
    })
}

pub async fn run(settings: &Settings, args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    let reconciler = reconciler(settings, cli_actor()).await?;
    let report = reconciler.run(args.execute).await;
    reconciler.pool.close().await;
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(if report.has_drift() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs a reconciliation every `settings.interval` until `shutdown` (the worker's timer).
pub async fn run_periodically(
    reconciler: Reconciler,
    settings: ReconcileSettings,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(interval) = settings.interval else {
        return;
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        match reconciler.run(settings.execute).await {
            Ok(report) => {
                let healed = report
                    .drifts
                    .iter()
                    .filter(|d| matches!(d.heal, Heal::Healed { .. }))
                    .count();
                if report.drifts.is_empty() {
                    tracing::info!(run_id = %report.run_id, listed = report.listed_by_microsoft, "reconciled: no drift");
                } else {
                    tracing::warn!(
                        run_id = %report.run_id,
                        drifted = report.drifts.len(),
                        healed,
                        "reconciled: drift found"
                    );
                }
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "reconciliation failed; next run at the next interval")
            }
        }
    }
}

pub fn render(report: &ReconcileReport) -> String {
    let mut out = format!(
        "Reconciliation {} at {}: Microsoft lists {}, we know {} ({} page(s): x-ms-requestid {})\n",
        report.run_id,
        rfc3339(report.started_at),
        report.listed_by_microsoft,
        report.known_here,
        report.list_request_ids.len(),
        report.list_request_ids.join(", ")
    );
    if report.drifts.is_empty() {
        out.push_str("no drift\n");
        return out;
    }
    let side = |s: &Option<Side>| match s {
        None => "-".to_string(),
        Some(s) => format!(
            "{} {} {}",
            or_dash(s.state.clone()),
            or_dash(s.plan_id.clone()),
            s.quantity.map_or(String::new(), |q| format!("×{q}"))
        )
        .trim_end()
        .to_string(),
    };
    let mut table = Table::new(
        &["SUBSCRIPTION", "DRIFT", "HERE", "MICROSOFT", "RESULT"],
        &[36, 60, 40, 40, 90],
    );
    for d in &report.drifts {
        let mut kinds: Vec<String> = d.kinds.iter().map(|k| k.as_str().to_string()).collect();
        if let Some(secs) = d.pending_for_secs
            && let Some(k) = kinds.iter_mut().find(|k| k.starts_with("stuck"))
        {
            *k = format!("{k} for {}", human_age(secs));
        }
        let result = match &d.heal {
            Heal::NotAttempted => "reported (add --execute to heal)".to_string(),
            Heal::Healed { events } => format!("healed: {}", events.join("; ")),
            Heal::Deferred { reason } => format!("deferred: {reason}"),
            Heal::NeedsOperator { reason } => format!("needs an operator: {reason}"),
            Heal::Failed { error } => format!("failed: {error}"),
        };
        table.row(vec![
            d.subscription_id.to_string(),
            kinds.join(", "),
            side(&d.ours),
            side(&d.microsoft),
            result,
        ]);
    }
    out.push_str(&table.render());
    let left = report
        .drifts
        .iter()
        .filter(|d| !matches!(d.heal, Heal::Healed { .. }))
        .count();
    out.push_str(&format!(
        "{} drifted subscription(s); {}\n",
        report.drifts.len(),
        if report.executed {
            format!("{} healed, {left} left", report.drifts.len() - left)
        } else {
            "nothing changed (add --execute to heal through the machine)".to_string()
        }
    ));
    out
}

fn human_age(secs: i64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn listed_ids_are_found_and_a_repeated_listing_is_named() {
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        let mut listed = ListedIds::default();
        for id in [ids[3], ids[0], ids[3], ids[1], ids[0]] {
            listed.push(id);
        }
        let (sorted, repeats) = listed.finish();
        assert_eq!(sorted.len(), 3);
        assert!(sorted.contains(ids[0]) && sorted.contains(ids[1]) && sorted.contains(ids[3]));
        assert!(!sorted.contains(ids[2]) && !sorted.contains(ids[4]));
        // The first listing of each id counts; positions 2 and 4 repeat 0 and 1.
        assert_eq!(repeats, HashSet::from([2, 4]));

        let mut in_order = ListedIds::default();
        let mut ascending = ids.clone();
        ascending.sort();
        for id in &ascending {
            in_order.push(*id);
        }
        let (sorted, repeats) = in_order.finish();
        assert_eq!(sorted.len(), 5);
        assert!(repeats.is_empty());
        assert!(ascending.iter().all(|id| sorted.contains(*id)));
    }

    fn pending_at_microsoft(created: &str) -> Subscription {
        serde_json::from_value(serde_json::json!({
            "id": Uuid::nil(),
            "name": "a purchase",
            "offerId": "contoso-analytics",
            "planId": "silver",
            "saasSubscriptionStatus": "PendingFulfillmentStart",
            "created": created,
        }))
        .expect("a subscription")
    }

    #[test]
    fn a_purchase_seconds_old_is_neither_missing_nor_stuck() {
        let now = datetime!(2026-12-06 08:00:05 UTC);
        let day = Duration::from_secs(86_400);
        let fresh = pending_at_microsoft("2026-12-06T08:00:00Z");
        assert_eq!(compare(None, Some(&fresh), now, day), (vec![], None));
        // Older than the setting: missing here, and stuck.
        let old = pending_at_microsoft("2026-12-04T08:00:00Z");
        let (kinds, pending_for) = compare(None, Some(&old), now, day);
        assert_eq!(kinds, [DriftKind::MissingHere, DriftKind::StuckPending]);
        assert!(pending_for.is_some());
        // With no purchase time we cannot tell: reported.
        let unknown_age = pending_at_microsoft("0001-01-01T00:00:00");
        assert_eq!(
            compare(None, Some(&unknown_age), now, day).0,
            [DriftKind::MissingHere]
        );
    }
}
