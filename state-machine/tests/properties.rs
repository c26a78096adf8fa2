//! Property tests over random event sequences drawn from a small id/plan/time space, so
//! duplicates, staleness and conflicting operations happen often.

mod support;

use fulfillment_state_machine::*;
use proptest::prelude::*;
use support::*;

fn status() -> impl Strategy<Value = MarketplaceStatus> {
    prop_oneof![
        Just(MarketplaceStatus::NotStarted),
        Just(MarketplaceStatus::PendingFulfillmentStart),
        Just(MarketplaceStatus::Subscribed),
        Just(MarketplaceStatus::Suspended),
        Just(MarketplaceStatus::Unsubscribed),
        Just(MarketplaceStatus::Unknown("Paused".into())),
    ]
}

fn plan_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("gold"), Just("platinum"), Just("silver")]
}

fn seats() -> impl Strategy<Value = u32> {
    prop_oneof![Just(1u32), Just(5), Just(10)]
}

fn snapshot() -> impl Strategy<Value = Snapshot> {
    (status(), plan_name(), seats()).prop_map(|(s, p, q)| snap(s, p, q))
}

fn action() -> impl Strategy<Value = WebhookAction> {
    prop_oneof![
        Just(WebhookAction::Subscribe),
        Just(WebhookAction::ChangePlan),
        Just(WebhookAction::ChangeQuantity),
        Just(WebhookAction::Renew),
        Just(WebhookAction::Suspend),
        Just(WebhookAction::Reinstate),
        Just(WebhookAction::Unsubscribe),
        Just(WebhookAction::Unknown("Transfer".into())),
    ]
}

fn source() -> impl Strategy<Value = RequestSource> {
    prop_oneof![
        Just(RequestSource::Azure),
        Just(RequestSource::Partner),
        Just(RequestSource::Unknown(String::new())),
    ]
}

fn webhook() -> impl Strategy<Value = Event> {
    (
        0u128..4,
        action(),
        source(),
        proptest::option::of(0i64..6),
        proptest::option::of(plan_name()),
        proptest::option::of(seats()),
        proptest::option::of(snapshot()),
    )
        .prop_map(|(n, action, source, minute, p, q, subscription)| {
            Event::Webhook(Webhook {
                operation_id: op(n),
                action,
                source,
                timestamp: minute.map(t),
                plan_id: p.map(plan),
                quantity: q.map(qty),
                subscription,
            })
        })
}

fn command_body() -> impl Strategy<Value = Command> {
    prop_oneof![
        plan_name().prop_map(|p| Command::ChangePlan { plan_id: plan(p) }),
        seats().prop_map(|q| Command::ChangeQuantity { quantity: qty(q) }),
        Just(Command::Cancel),
    ]
}

fn operation_status() -> impl Strategy<Value = OperationStatus> {
    prop_oneof![
        Just(OperationStatus::Succeeded),
        Just(OperationStatus::Failed),
        Just(OperationStatus::Conflict),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => webhook(),
        1 => (snapshot(), 0i64..6).prop_map(|(snapshot, m)| Event::PurchaseResolved {
            snapshot,
            resolved_at: t(m),
        }),
        1 => (0u128..3).prop_map(|n| Event::ActivationRequested { command_id: cmd(n) }),
        1 => (0i64..6).prop_map(confirmed),
        1 => (0i64..6).prop_map(|m| Event::ActivationFailed {
            reason: "boom".into(),
            failed_at: t(m),
        }),
        2 => (0u128..3, command_body()).prop_map(|(n, c)| command(n, c)),
        2 => (0u128..3, 0u128..4).prop_map(|(n, o)| accepted(n, o)),
        1 => (0u128..3).prop_map(|n| Event::PublisherOperationRefused {
            command_id: cmd(n),
            reason: "400".into(),
        }),
        2 => (0u128..4, operation_status()).prop_map(|(o, s)| result(o, s)),
        2 => (snapshot(), 0i64..6).prop_map(|(snapshot, m)| Event::Observed {
            snapshot,
            observed_at: t(m),
        }),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::default()),
        Just(Policy {
            activation: ActivationMode::Manual,
            ..Policy::default()
        }),
        Just(Policy {
            plan_moves: PlanMoves::Allowed(vec![PlanMove {
                from: plan("gold"),
                to: plan("platinum"),
            }]),
            seats: SeatLimits {
                min: Some(5),
                max: Some(9),
            },
            activation: ActivationMode::Automatic,
            ..Policy::default()
        }),
    ]
}

fn config() -> ProptestConfig {
    ProptestConfig {
        // `scripts/fuzz.sh` raises this through PROPTEST_CASES.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn unsubscribed_is_forever_and_ignored_events_change_nothing(
        policy in policy(),
        events in proptest::collection::vec(event(), 0..40),
    ) {
        let mut machine = SubscriptionMachine::new(sub());
        let mut was_unsubscribed = false;
        for (i, event) in events.iter().enumerate() {
            let before_state = machine.state();
            let before_details = machine.details().clone();
            let before_pending = machine.pending_operation().cloned();
            let decision = machine.handle(event, t(10 + i as i64), &policy);
            prop_assert_eq!(decision.from, before_state);
            prop_assert_eq!(decision.to, machine.state());
            if was_unsubscribed {
                // Terminal: the state never moves, nothing is acknowledged or announced;
                // only reads that bring the ended subscription's final details.
                prop_assert_eq!(machine.state(), StateName::Unsubscribed);
                prop_assert_eq!(machine.pending_operation().cloned(), before_pending.clone());
                prop_assert!(
                    decision.effects.iter().all(Effect::is_read),
                    "{:?}",
                    decision
                );
            }
            if decision.outcome.is_ignored() {
                prop_assert!(decision.effects.is_empty(), "{:?}", decision);
                prop_assert_eq!(machine.state(), before_state);
                prop_assert_eq!(machine.details(), &before_details);
                prop_assert_eq!(machine.pending_operation().cloned(), before_pending);
            }
            was_unsubscribed = machine.state() == StateName::Unsubscribed;
        }
    }

    #[test]
    fn the_same_event_twice_in_a_row_is_a_no_op_the_second_time(
        policy in policy(),
        events in proptest::collection::vec(event(), 1..30),
    ) {
        let mut machine = SubscriptionMachine::new(sub());
        for event in &events {
            machine.handle(event, t(50), &policy);
            let once = machine.clone();
            let again = machine.handle(event, t(51), &policy);
            prop_assert!(again.outcome.is_ignored(), "second {:?} gave {:?}", event, again);
            prop_assert!(again.effects.is_empty());
            prop_assert_eq!(&machine, &once);
        }
    }

    #[test]
    fn json_round_trips_anywhere_give_the_same_decisions(
        policy in policy(),
        steps in proptest::collection::vec((event(), any::<bool>()), 0..30),
    ) {
        let mut plain = SubscriptionMachine::new(sub());
        let mut stored = SubscriptionMachine::new(sub());
        for (i, (event, round_trip)) in steps.iter().enumerate() {
            if *round_trip {
                let json = serde_json::to_value(&stored).unwrap();
                let restored: SubscriptionMachine = serde_json::from_value(json).unwrap();
                // Restoring emits nothing and loses nothing.
                prop_assert_eq!(&restored, &stored);
                stored = restored;
            }
            let now = t(10 + i as i64);
            let expected = plain.handle(event, now, &policy);
            let actual = stored.handle(event, now, &policy);
            prop_assert_eq!(actual, expected);
        }
        prop_assert_eq!(&stored, &plain);
    }

    #[test]
    fn events_and_decisions_round_trip_through_json(
        event in event(),
    ) {
        let json = serde_json::to_string(&event).unwrap();
        prop_assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event.clone());
        let mut machine = SubscriptionMachine::new(sub());
        let decision = machine.handle(&event, t(0), &Policy::default());
        let json = serde_json::to_string(&decision).unwrap();
        prop_assert_eq!(serde_json::from_str::<Decision>(&json).unwrap(), decision);
    }
}
