//! Lifecycle notices: domain events announced ahead of a date the ISV must act by, which
//! Microsoft itself never sends (AWS sends "agreement ending" notices; none of the
//! Microsoft anchors has them):
//!
//! | notice                                   | owed while          | due                        |
//! |------------------------------------------|---------------------|----------------------------|
//! | `subscription.term_ending`               | Subscribed, `autoRenew` false | N days before `term.endDate`, for each N (default 30 and 7) |
//! | `subscription.grace_ending`              | Suspended           | day 23 of the 30-day grace |
//! | `subscription.activation_window_closing` | PendingFulfillment  | day 25 of the 30 days to activate |
//! | `subscription.data_retention_ends`       | Unsubscribed        | 7 days after the Unsubscribe |
//!
//! [`plan`] says which notices a subscription is owed now, as data: `(state, since,
//! details, now, policy) -> [Notice]`; [`changes`] compares that with the schedule already
//! stored. The worker writes the result in the transaction of the decision that changed the
//! state or the term, and emits each notice once when it is due. A key names each notice
//! with what it is about (the term's end date, the moment the state began), so a changed
//! term or state gives other keys: the stored notice is cancelled and the new one
//! scheduled (moved), and a notice already sent is never sent again.

use std::time::Duration as StdDuration;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::details::{Details, StateName};
use crate::effect::{DomainEvent, DomainEventKind, Effect};

/// The days of a grace or window, as Microsoft counts them (§5.2, §4.2).
const SUSPENSION_GRACE_DAYS: i64 = 30;
/// The grace notice: day 23 of 30 (a week left).
const GRACE_NOTICE_DAY: i64 = 23;
/// Microsoft cancels a purchase not activated within 30 days.
const ACTIVATION_WINDOW_DAYS: i64 = 30;
/// The activation notice: day 25 of 30.
const ACTIVATION_NOTICE_DAY: i64 = 25;
/// After an Unsubscribe the customer's data is kept this long (the ISV's P25 rule).
const DATA_RETENTION_DAYS: i64 = 7;

/// The ISV's notice settings (`worker.term_ending_notice_days`, `worker.notice_day_ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoticePolicy {
    /// Days before `term.endDate` a term without `autoRenew` is announced, once each.
    pub term_ending_days: Vec<u32>,
    /// The length of one day. One real day, except in tests and the demo, which compress
    /// the calendar like the simulator's `--day-ms`: a date `d` days ahead is then reached
    /// after `d` such days.
    pub day: StdDuration,
}

impl Default for NoticePolicy {
    fn default() -> Self {
        Self {
            term_ending_days: vec![30, 7],
            day: StdDuration::from_secs(24 * 3600),
        }
    }
}

impl NoticePolicy {
    fn days(&self, days: i64) -> Duration {
        Duration::try_from(self.day)
            .unwrap_or(Duration::DAY)
            .saturating_mul(i32::try_from(days).unwrap_or(i32::MAX))
    }

    /// When the compressed calendar reaches `date` (identity with real days).
    fn reaches(&self, now: OffsetDateTime, date: OffsetDateTime) -> OffsetDateTime {
        let ratio = self.day.as_secs_f64() / Duration::DAY.as_seconds_f64();
        if (ratio - 1.0).abs() < f64::EPSILON {
            return date;
        }
        now + (date - now) * ratio
    }
}

/// The kinds of notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// A term that does not renew ends soon.
    TermEnding,
    /// The suspension grace ends soon.
    GraceEnding,
    /// The activation window closes soon.
    ActivationWindowClosing,
    /// The data retention after the Unsubscribe ends.
    DataRetentionEnds,
}

impl NoticeKind {
    /// Every kind.
    pub const ALL: [NoticeKind; 4] = [
        NoticeKind::TermEnding,
        NoticeKind::GraceEnding,
        NoticeKind::ActivationWindowClosing,
        NoticeKind::DataRetentionEnds,
    ];

    /// The stable snake_case name (the store's `kind` column).
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::TermEnding => "term_ending",
            NoticeKind::GraceEnding => "grace_ending",
            NoticeKind::ActivationWindowClosing => "activation_window_closing",
            NoticeKind::DataRetentionEnds => "data_retention_ends",
        }
    }

    /// The kind of the name; `None` for a name this version does not know.
    pub fn parse(raw: &str) -> Option<NoticeKind> {
        NoticeKind::ALL.into_iter().find(|k| k.as_str() == raw)
    }

    /// The domain event announcing it.
    pub fn event_kind(self) -> DomainEventKind {
        match self {
            NoticeKind::TermEnding => DomainEventKind::TermEnding,
            NoticeKind::GraceEnding => DomainEventKind::GraceEnding,
            NoticeKind::ActivationWindowClosing => DomainEventKind::ActivationWindowClosing,
            NoticeKind::DataRetentionEnds => DomainEventKind::DataRetentionEnds,
        }
    }
}

/// One notice a subscription is owed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// What it announces.
    pub kind: NoticeKind,
    /// Unique per subscription: the kind and what it is about (e.g.
    /// `term_ending:30d:2027-01-05`). A notice is sent at most once per key.
    pub key: String,
    /// When to emit it (at once when already past).
    #[serde(with = "time::serde::rfc3339")]
    pub due: OffsetDateTime,
    /// The sentence the domain event carries as its `reason`.
    pub reason: String,
}

impl Notice {
    /// The effect that announces it, with the subscription as it is when it is emitted.
    pub fn effect(&self, state: StateName, details: &Details) -> Effect {
        Effect::PublishDomainEvent(DomainEvent {
            kind: self.kind.event_kind(),
            plan_id: details.plan_id.clone(),
            quantity: details.quantity,
            state,
            reason: Some(self.reason.clone()),
        })
    }
}

/// The notices a subscription in `state` since `since` is owed at `now`. Nothing for a
/// purchase we have not seen (no plan); notices whose date has passed are left out, and of
/// the term-ending notices already due only the nearest to the end is kept (a term found
/// with 5 days left gets one notice, not both the 30- and the 7-day one).
pub fn plan(
    state: StateName,
    since: OffsetDateTime,
    details: &Details,
    now: OffsetDateTime,
    policy: &NoticePolicy,
) -> Vec<Notice> {
    if !details.is_known() {
        return Vec::new();
    }
    let window = |kind: NoticeKind, notice_day: i64, last_day: i64, what: &str| {
        let due = since + policy.days(notice_day);
        let ends = since + policy.days(last_day);
        (ends > now).then(|| Notice {
            kind,
            key: format!(
                "{}:{}",
                kind.as_str(),
                since.unix_timestamp_nanos() / 1_000_000
            ),
            due,
            reason: format!("{} days left: {what}", last_day - notice_day),
        })
    };
    match state {
        StateName::PendingFulfillment => window(
            NoticeKind::ActivationWindowClosing,
            ACTIVATION_NOTICE_DAY,
            ACTIVATION_WINDOW_DAYS,
            "Microsoft cancels a purchase not activated within 30 days; activate it",
        )
        .into_iter()
        .collect(),
        StateName::Suspended => window(
            NoticeKind::GraceEnding,
            GRACE_NOTICE_DAY,
            SUSPENSION_GRACE_DAYS,
            "the 30-day suspension grace ends, then Microsoft unsubscribes it unless the \
             payment is fixed",
        )
        .into_iter()
        .collect(),
        StateName::Unsubscribed => {
            let due = since + policy.days(DATA_RETENTION_DAYS);
            vec![Notice {
                kind: NoticeKind::DataRetentionEnds,
                key: format!(
                    "{}:{}",
                    NoticeKind::DataRetentionEnds.as_str(),
                    since.unix_timestamp_nanos() / 1_000_000
                ),
                due,
                reason: format!(
                    "the retention of the customer's data ends ({DATA_RETENTION_DAYS} days after \
                     the Unsubscribe)"
                ),
            }]
        }
        StateName::Subscribed => term_ending(details, now, policy),
    }
}

fn term_ending(details: &Details, now: OffsetDateTime, policy: &NoticePolicy) -> Vec<Notice> {
    let Some(term) = details.term.as_ref() else {
        return Vec::new();
    };
    let (Some(false), Some(end)) = (term.auto_renew, term.end) else {
        return Vec::new();
    };
    let ends = policy.reaches(now, end);
    if ends <= now {
        return Vec::new();
    }
    let mut days: Vec<u32> = policy.term_ending_days.clone();
    days.sort_unstable();
    days.dedup();
    // Of the notices already due, only the one nearest the end.
    let nearest_due = days
        .iter()
        .copied()
        .find(|n| ends - policy.days(i64::from(*n)) <= now);
    days.into_iter()
        .filter(|n| ends - policy.days(i64::from(*n)) > now || Some(*n) == nearest_due)
        .map(|n| Notice {
            kind: NoticeKind::TermEnding,
            key: format!("{}:{n}d:{}", NoticeKind::TermEnding.as_str(), end.date()),
            due: ends - policy.days(i64::from(n)),
            reason: format!(
                "the term ends on {} and does not renew (autoRenew is off): {n} days' notice",
                end.date()
            ),
        })
        .collect()
}

/// What to do to the stored schedule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoticeChanges {
    /// Pending notices no longer owed (their state or term changed): cancel them.
    pub cancel: Vec<String>,
    /// Owed notices not pending yet: schedule them (the store never re-sends a key it has
    /// sent).
    pub schedule: Vec<Notice>,
}

impl NoticeChanges {
    /// Nothing to change.
    pub fn is_empty(&self) -> bool {
        self.cancel.is_empty() && self.schedule.is_empty()
    }
}

/// The changes that turn the `pending` keys into the `owed` notices.
pub fn changes(pending: &[String], owed: &[Notice]) -> NoticeChanges {
    NoticeChanges {
        cancel: pending
            .iter()
            .filter(|key| !owed.iter().any(|n| &n.key == *key))
            .cloned()
            .collect(),
        schedule: owed
            .iter()
            .filter(|n| !pending.contains(&n.key))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::details::Term;
    use crate::ids::PlanId;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-06 12:00 UTC);

    fn known(term: Option<Term>) -> Details {
        Details {
            plan_id: Some(PlanId::parse("gold").unwrap()),
            term,
            ..Details::default()
        }
    }

    fn term(auto_renew: Option<bool>, end: OffsetDateTime) -> Option<Term> {
        Some(Term {
            unit: Some("P1Y".into()),
            end: Some(end),
            auto_renew,
            ..Term::default()
        })
    }

    /// A notice as the table states it: kind, due time, key.
    type Row = (NoticeKind, OffsetDateTime, String);

    fn summary(notices: &[Notice]) -> Vec<Row> {
        notices
            .iter()
            .map(|n| (n.kind, n.due, n.key.clone()))
            .collect()
    }

    #[test]
    fn each_state_is_owed_its_notice_on_its_day() {
        let since = datetime!(2026-12-01 00:00 UTC);
        let since_ms = since.unix_timestamp() * 1000;
        let end = datetime!(2027-03-01 00:00 UTC);
        let policy = NoticePolicy::default();
        // (state, details, expected notices)
        let table: Vec<(StateName, Details, Vec<Row>)> = vec![
            (
                StateName::PendingFulfillment,
                known(None),
                vec![(
                    NoticeKind::ActivationWindowClosing,
                    datetime!(2026-12-26 00:00 UTC),
                    format!("activation_window_closing:{since_ms}"),
                )],
            ),
            (
                StateName::Suspended,
                known(term(Some(false), end)),
                vec![(
                    NoticeKind::GraceEnding,
                    datetime!(2026-12-24 00:00 UTC),
                    format!("grace_ending:{since_ms}"),
                )],
            ),
            (
                StateName::Unsubscribed,
                known(None),
                vec![(
                    NoticeKind::DataRetentionEnds,
                    datetime!(2026-12-08 00:00 UTC),
                    format!("data_retention_ends:{since_ms}"),
                )],
            ),
            (
                StateName::Subscribed,
                known(term(Some(false), end)),
                vec![
                    (
                        NoticeKind::TermEnding,
                        datetime!(2027-02-22 00:00 UTC),
                        "term_ending:7d:2027-03-01".into(),
                    ),
                    (
                        NoticeKind::TermEnding,
                        datetime!(2027-01-30 00:00 UTC),
                        "term_ending:30d:2027-03-01".into(),
                    ),
                ],
            ),
            // A term that renews, or whose renewal we do not know, ends in nothing.
            (StateName::Subscribed, known(term(Some(true), end)), vec![]),
            (StateName::Subscribed, known(term(None, end)), vec![]),
            (StateName::Subscribed, known(None), vec![]),
            // A purchase we have not seen is owed nothing.
            (StateName::PendingFulfillment, Details::default(), vec![]),
        ];
        for (state, details, expected) in table {
            assert_eq!(
                summary(&plan(state, since, &details, NOW, &policy)),
                expected,
                "{state} {details:?}"
            );
        }
    }

    #[test]
    fn passed_dates_are_left_out_and_only_the_nearest_due_term_notice_is_kept() {
        let policy = NoticePolicy::default();
        let days = |n: i64| NOW + Duration::days(n);
        // (days to the term's end, the notices' days kept)
        for (left, kept) in [
            (40, vec![7, 30]),
            (30, vec![7, 30]),
            (20, vec![7, 30]),
            (7, vec![7]),
            (5, vec![7]),
            (0, vec![]),
            (-3, vec![]),
        ] {
            let details = known(term(Some(false), days(left)));
            let mut got: Vec<u32> = plan(StateName::Subscribed, NOW, &details, NOW, &policy)
                .iter()
                .map(|n| {
                    n.key
                        .split(':')
                        .nth(1)
                        .unwrap()
                        .trim_end_matches('d')
                        .parse()
                        .unwrap()
                })
                .collect();
            got.sort_unstable();
            assert_eq!(got, kept, "{left} days left");
        }
        // A grace found over (the worker was down for a month) is owed nothing; the
        // retention notice is owed however late.
        let long_ago = NOW - Duration::days(31);
        assert!(plan(StateName::Suspended, long_ago, &known(None), NOW, &policy).is_empty());
        assert!(
            plan(
                StateName::PendingFulfillment,
                long_ago,
                &known(None),
                NOW,
                &policy
            )
            .is_empty()
        );
        assert_eq!(
            plan(
                StateName::Unsubscribed,
                long_ago,
                &known(None),
                NOW,
                &policy
            )
            .len(),
            1
        );
        // Day 24 of the grace: the notice is due at once.
        let notice = &plan(
            StateName::Suspended,
            NOW - Duration::days(24),
            &known(None),
            NOW,
            &policy,
        )[0];
        assert!(notice.due <= NOW);
    }

    #[test]
    fn a_compressed_day_scales_offsets_and_the_distance_to_calendar_dates() {
        let policy = NoticePolicy {
            term_ending_days: vec![7],
            day: StdDuration::from_millis(100),
        };
        let pending = plan(
            StateName::PendingFulfillment,
            NOW,
            &known(None),
            NOW,
            &policy,
        );
        assert_eq!(pending[0].due, NOW + Duration::milliseconds(2500));
        // The term ends 30 calendar days ahead: 3 s on this clock; 7 days' notice is 0.7 s
        // before that.
        let details = known(term(Some(false), NOW + Duration::days(30)));
        let ending = plan(StateName::Subscribed, NOW, &details, NOW, &policy);
        assert_eq!(ending.len(), 1);
        assert_eq!(ending[0].due, NOW + Duration::milliseconds(2300));
        assert_eq!(
            ending[0].key,
            format!("term_ending:7d:{}", (NOW + Duration::days(30)).date())
        );
    }

    #[test]
    fn a_changed_term_or_state_cancels_the_pending_notice_and_schedules_the_new_one() {
        let policy = NoticePolicy::default();
        let end = NOW + Duration::days(60);
        let before = plan(
            StateName::Subscribed,
            NOW,
            &known(term(Some(false), end)),
            NOW,
            &policy,
        );
        let pending: Vec<String> = before.iter().map(|n| n.key.clone()).collect();
        // Nothing changed: nothing to do.
        assert!(changes(&pending, &before).is_empty());
        // The term moved (a renewal with new dates): both notices move.
        let moved = plan(
            StateName::Subscribed,
            NOW,
            &known(term(Some(false), end + Duration::days(365))),
            NOW,
            &policy,
        );
        let diff = changes(&pending, &moved);
        assert_eq!(diff.cancel, pending);
        assert_eq!(diff.schedule, moved);
        // autoRenew turned on: cancelled, nothing new.
        let renews = plan(
            StateName::Subscribed,
            NOW,
            &known(term(Some(true), end)),
            NOW,
            &policy,
        );
        let diff = changes(&pending, &renews);
        assert_eq!((diff.cancel.len(), diff.schedule.len()), (2, 0));
        // Suspended: the term notices go, the grace notice comes.
        let suspended = plan(
            StateName::Suspended,
            NOW,
            &known(term(Some(false), end)),
            NOW,
            &policy,
        );
        let diff = changes(&pending, &suspended);
        assert_eq!(diff.cancel, pending);
        assert_eq!(diff.schedule[0].kind, NoticeKind::GraceEnding);
    }

    #[test]
    fn kinds_round_trip_and_name_their_routing_keys() {
        for kind in NoticeKind::ALL {
            assert_eq!(NoticeKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                kind.event_kind().routing_key(),
                format!("subscription.{}", kind.as_str())
            );
        }
        assert_eq!(NoticeKind::parse("renewed"), None);
    }
}
