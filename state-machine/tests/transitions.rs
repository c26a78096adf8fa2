//! The decision table: `(starting state, event) -> (state, effects, outcome)`, one named
//! row per row of docs/marketplace.md §5.2 / §6.3 and per decision of the machine.

mod support;

use fulfillment_state_machine::*;
use support::*;

use DomainEventKind as K;
use MarketplaceStatus as MS;
use StateName::{PendingFulfillment, Subscribed, Suspended, Unsubscribed};

/// Expected outcome; ignored rows also say why.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    Applied,
    Rejected,
    Duplicate,
    Stale,
    Terminal,
    NoChange,
    NotApplicable,
}

impl Want {
    fn of(outcome: &Outcome) -> Want {
        match outcome {
            Outcome::Applied { .. } => Want::Applied,
            Outcome::Rejected { .. } => Want::Rejected,
            Outcome::Ignored { reason } => match reason {
                IgnoreReason::Duplicate => Want::Duplicate,
                IgnoreReason::Stale => Want::Stale,
                IgnoreReason::Terminal => Want::Terminal,
                IgnoreReason::NoChange => Want::NoChange,
                IgnoreReason::NotApplicable(_) => Want::NotApplicable,
            },
        }
    }
}

struct Case {
    name: &'static str,
    policy: Policy,
    start: Vec<Event>,
    event: Event,
    state: StateName,
    effects: Vec<Effect>,
    outcome: Want,
}

fn case(
    name: &'static str,
    start: Vec<Event>,
    event: Event,
    state: StateName,
    effects: Vec<Effect>,
    outcome: Want,
) -> Case {
    Case {
        name,
        policy: Policy::default(),
        start,
        event,
        state,
        effects,
        outcome,
    }
}

fn with_policy(policy: Policy, case: Case) -> Case {
    Case { policy, ..case }
}

fn manual() -> Policy {
    Policy {
        activation: ActivationMode::Manual,
        ..Policy::default()
    }
}

fn activate() -> Effect {
    Effect::Activate {
        plan_id: Some(plan("gold")),
        quantity: Some(qty(10)),
    }
}

fn ack(n: u128, status: AckStatus, best_effort: bool) -> Effect {
    Effect::AckOperation {
        operation_id: op(n),
        status,
        best_effort,
    }
}

fn confirm(n: u128) -> Effect {
    Effect::ConfirmOperation {
        operation_id: op(n),
    }
}

fn gold(kind: DomainEventKind, state: StateName) -> Effect {
    domain(kind, Some("gold"), Some(10), state, None)
}

fn then(mut start: Vec<Event>, more: Event) -> Vec<Event> {
    start.push(more);
    start
}

/// A CSP purchase (§10.2): `allowedCustomerOperations: ["Read"]`, activated.
fn csp_subscribed() -> Vec<Event> {
    vec![
        Event::PurchaseResolved {
            snapshot: Snapshot {
                allowed_operations: Some(AllowedOperations::new(["Read"])),
                ..snap(MS::PendingFulfillmentStart, "gold", 10)
            },
            resolved_at: t(1),
        },
        confirmed(2),
    ]
}

fn csp_refusal(operation: &str) -> String {
    format!(
        "allowedCustomerOperations is [Read]: Microsoft allows no {operation} of this \
         subscription (a CSP purchase is changed by the CSP)"
    )
}

/// The `Subscribe` webhook of an auto-activated purchase (§5.6), with its snapshot.
fn subscribe_with_snapshot(minute: i64) -> Event {
    Event::Webhook(Webhook {
        subscription: Some(Snapshot {
            term: Some(Term {
                unit: Some("PAY".into()),
                ..Term::default()
            }),
            ..snap(MS::Subscribed, "gold", 10)
        }),
        ..hook(1, WebhookAction::Subscribe, RequestSource::Azure, minute)
    })
}

fn cases() -> Vec<Case> {
    use Want::*;
    let pending_lock = format!(
        "operation pending for command {} (Microsoft locks the subscription until it ends)",
        cmd(1)
    );
    vec![
        // ── §5.2 Purchase / landing page ────────────────────────────────────────
        case(
            "resolve pending purchase under automatic policy publishes Purchased and activates",
            vec![],
            resolved(MS::PendingFulfillmentStart, 1),
            PendingFulfillment,
            vec![gold(K::Purchased, PendingFulfillment), activate()],
            Applied,
        ),
        case(
            "resolve NotStarted purchase is treated as pending",
            vec![],
            resolved(MS::NotStarted, 1),
            PendingFulfillment,
            vec![gold(K::Purchased, PendingFulfillment), activate()],
            Applied,
        ),
        with_policy(
            manual(),
            case(
                "resolve under manual policy waits for ActivationRequested",
                vec![],
                resolved(MS::PendingFulfillmentStart, 1),
                PendingFulfillment,
                vec![gold(K::Purchased, PendingFulfillment)],
                Applied,
            ),
        ),
        with_policy(
            manual(),
            case(
                "manual ActivationRequested emits Activate",
                pending_resolved(),
                Event::ActivationRequested { command_id: cmd(9) },
                PendingFulfillment,
                vec![activate()],
                Applied,
            ),
        ),
        case(
            "ActivationRequested after automatic activation is not applicable",
            pending_resolved(),
            Event::ActivationRequested { command_id: cmd(9) },
            PendingFulfillment,
            vec![],
            NotApplicable,
        ),
        case(
            "ActivationRequested before the purchase is resolved is not applicable",
            vec![],
            Event::ActivationRequested { command_id: cmd(9) },
            PendingFulfillment,
            vec![],
            NotApplicable,
        ),
        case(
            "P5 landing page revisit does not re-activate",
            pending_resolved(),
            resolved(MS::PendingFulfillmentStart, 5),
            PendingFulfillment,
            vec![],
            NoChange,
        ),
        case(
            "P5 resolve of an auto-activated subscription goes Subscribed without Activate",
            vec![],
            resolved(MS::Subscribed, 1),
            Subscribed,
            vec![
                gold(K::Purchased, Subscribed),
                gold(K::Activated, Subscribed),
            ],
            Applied,
        ),
        case(
            "P5 Manage account resolve of a Subscribed subscription changes nothing",
            subscribed(),
            resolved(MS::Subscribed, 5),
            Subscribed,
            vec![],
            NoChange,
        ),
        case(
            "resolve of a suspended subscription goes Suspended",
            vec![],
            resolved(MS::Suspended, 1),
            Suspended,
            vec![
                gold(K::Purchased, Suspended),
                gold(K::Activated, Suspended),
                gold(K::Suspended, Suspended),
            ],
            Applied,
        ),
        case(
            "resolve of a cancelled purchase goes Unsubscribed",
            vec![],
            resolved(MS::Unsubscribed, 1),
            Unsubscribed,
            vec![gold(K::Unsubscribed, Unsubscribed)],
            Applied,
        ),
        // ── §5.2 Activate ────────────────────────────────────────────────────────
        case(
            "ActivationConfirmed moves pending to Subscribed",
            pending_resolved(),
            confirmed(2),
            Subscribed,
            vec![gold(K::Activated, Subscribed)],
            Applied,
        ),
        case(
            "ActivationFailed stays pending and tells the ISV",
            pending_resolved(),
            Event::ActivationFailed {
                reason: "400 bad plan".into(),
                failed_at: t(2),
            },
            PendingFulfillment,
            vec![domain(
                K::ActivationFailed,
                Some("gold"),
                Some(10),
                PendingFulfillment,
                Some("400 bad plan"),
            )],
            Applied,
        ),
        case(
            "Observed Subscribed while pending converges to Subscribed",
            pending_resolved(),
            observed(MS::Subscribed, "gold", 10, 3),
            Subscribed,
            vec![gold(K::Activated, Subscribed)],
            Applied,
        ),
        case(
            "Observed pending with identical details is no change",
            pending_resolved(),
            observed(MS::PendingFulfillmentStart, "gold", 10, 3),
            PendingFulfillment,
            vec![],
            NoChange,
        ),
        case(
            "Observed straggler pending purchase (P27) publishes Purchased without activating",
            vec![],
            observed(MS::PendingFulfillmentStart, "gold", 10, 3),
            PendingFulfillment,
            vec![gold(K::Purchased, PendingFulfillment)],
            Applied,
        ),
        // ── §5.2 Auto-activation / never configured ─────────────────────────────
        case(
            "webhook Subscribe (auto-activation) moves pending to Subscribed and fetches",
            vec![],
            azure(1, WebhookAction::Subscribe, 1),
            Subscribed,
            vec![
                Effect::FetchSubscription,
                domain(K::Activated, None, None, Subscribed, None),
            ],
            Applied,
        ),
        case(
            "webhook Subscribe of a purchase never seen records it Subscribed from its snapshot",
            vec![],
            subscribe_with_snapshot(1),
            Subscribed,
            vec![Effect::FetchSubscription, gold(K::Activated, Subscribed)],
            Applied,
        ),
        case(
            "a landing-page visit after the Subscribe webhook activates nothing again",
            vec![subscribe_with_snapshot(1)],
            resolved(MS::Subscribed, 5),
            Subscribed,
            vec![],
            NoChange,
        ),
        case(
            "the Subscribe webhook after a landing-page visit that saw Subscribed is no change",
            vec![resolved(MS::Subscribed, 1)],
            subscribe_with_snapshot(2),
            Subscribed,
            vec![],
            NoChange,
        ),
        case(
            "a PAY term never stops activation (§15.3)",
            vec![],
            Event::PurchaseResolved {
                snapshot: Snapshot {
                    term: Some(Term {
                        unit: Some("PAY".into()),
                        ..Term::default()
                    }),
                    ..snap(MS::PendingFulfillmentStart, "gold", 10)
                },
                resolved_at: t(1),
            },
            PendingFulfillment,
            vec![gold(K::Purchased, PendingFulfillment), activate()],
            Applied,
        ),
        case(
            "a status in other letter case is read like the documented one",
            vec![],
            Event::PurchaseResolved {
                snapshot: snap(MS::parse(" subscribed"), "gold", 10),
                resolved_at: t(1),
            },
            Subscribed,
            vec![
                gold(K::Purchased, Subscribed),
                gold(K::Activated, Subscribed),
            ],
            Applied,
        ),
        case(
            "P12 Unsubscribe for a subscription we never saw records a tombstone",
            vec![],
            azure(1, WebhookAction::Unsubscribe, 1),
            Unsubscribed,
            vec![domain(K::Unsubscribed, None, None, Unsubscribed, None)],
            Applied,
        ),
        with_policy(
            manual(),
            case(
                "customer cancels while pending, before any activation, goes Unsubscribed",
                pending_resolved(),
                azure(1, WebhookAction::Unsubscribe, 2),
                Unsubscribed,
                vec![gold(K::Unsubscribed, Unsubscribed)],
                Applied,
            ),
        ),
        case(
            "§15.4 Unsubscribe while our activation is pending is activation failed at Microsoft",
            pending_resolved(),
            azure(1, WebhookAction::Unsubscribe, 2),
            Unsubscribed,
            vec![
                domain(
                    K::ActivationFailed,
                    Some("gold"),
                    Some(10),
                    Unsubscribed,
                    Some(
                        "activation failed at Microsoft: Unsubscribe while our activation \
                         was pending",
                    ),
                ),
                gold(K::Unsubscribed, Unsubscribed),
            ],
            Applied,
        ),
        case(
            "Unsubscribe after our activation already failed announces no second failure",
            then(
                vec![resolved(MS::PendingFulfillmentStart, 1)],
                Event::ActivationFailed {
                    reason: "Microsoft reports the subscription Unsubscribed".into(),
                    failed_at: t(2),
                },
            ),
            azure(2, WebhookAction::Unsubscribe, 3),
            Unsubscribed,
            vec![gold(K::Unsubscribed, Unsubscribed)],
            Applied,
        ),
        case(
            "customer ChangePlan while pending implies activation and is ACKed",
            pending_resolved(),
            change_plan(1, RequestSource::Azure, "platinum", 2),
            Subscribed,
            vec![
                domain(K::Activated, Some("gold"), Some(10), Subscribed, None),
                ack(1, AckStatus::Success, false),
                domain(K::PlanChanged, Some("platinum"), Some(10), Subscribed, None),
            ],
            Applied,
        ),
        case(
            "customer ChangeQuantity while pending implies activation and is ACKed",
            pending_resolved(),
            change_quantity(1, RequestSource::Azure, 12, 2),
            Subscribed,
            vec![
                domain(K::Activated, Some("gold"), Some(10), Subscribed, None),
                ack(1, AckStatus::Success, false),
                domain(K::QuantityChanged, Some("gold"), Some(12), Subscribed, None),
            ],
            Applied,
        ),
        case(
            "publisher command while pending is rejected without calling Microsoft",
            pending_resolved(),
            command(1, Command::Cancel),
            PendingFulfillment,
            vec![domain(
                K::ChangeRejected,
                Some("gold"),
                Some(10),
                PendingFulfillment,
                Some("only a Subscribed subscription can be changed"),
            )],
            Rejected,
        ),
        // ── §5.2/§6.3 Azure ChangePlan / ChangeQuantity ────────────────────────
        case(
            "Azure ChangePlan accepted by policy is ACKed and applied",
            subscribed(),
            change_plan(7, RequestSource::Azure, "platinum", 5),
            Subscribed,
            vec![
                ack(7, AckStatus::Success, false),
                domain(K::PlanChanged, Some("platinum"), Some(10), Subscribed, None),
            ],
            Applied,
        ),
        case(
            "P8 Azure ChangePlan back to the current plan is an accepted revert",
            subscribed(),
            change_plan(7, RequestSource::Azure, "gold", 5),
            Subscribed,
            vec![ack(7, AckStatus::Success, false)],
            Applied,
        ),
        with_policy(
            Policy {
                plan_moves: PlanMoves::Allowed(vec![PlanMove {
                    from: plan("gold"),
                    to: plan("platinum"),
                }]),
                ..Policy::default()
            },
            case(
                "Azure ChangePlan refused by policy is ACKed Failure",
                subscribed(),
                change_plan(7, RequestSource::Azure, "silver", 5),
                Subscribed,
                vec![
                    ack(7, AckStatus::Failure, false),
                    domain(
                        K::ChangeRejected,
                        Some("gold"),
                        Some(10),
                        Subscribed,
                        Some("plan move gold -> silver is not allowed"),
                    ),
                ],
                Rejected,
            ),
        ),
        case(
            "minimal ChangePlan without a target fetches the subscription and does not ACK",
            subscribed(),
            azure(7, WebhookAction::ChangePlan, 5),
            Subscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        case(
            "Azure ChangeQuantity within limits is ACKed and applied",
            subscribed(),
            change_quantity(7, RequestSource::Azure, 20, 5),
            Subscribed,
            vec![
                ack(7, AckStatus::Success, false),
                domain(K::QuantityChanged, Some("gold"), Some(20), Subscribed, None),
            ],
            Applied,
        ),
        case(
            "P8 Azure ChangeQuantity to the current seats is an accepted revert",
            subscribed(),
            change_quantity(7, RequestSource::Azure, 10, 5),
            Subscribed,
            vec![ack(7, AckStatus::Success, false)],
            Applied,
        ),
        with_policy(
            Policy {
                seats: SeatLimits {
                    min: Some(5),
                    max: None,
                },
                ..Policy::default()
            },
            case(
                "Azure ChangeQuantity below the seat minimum is ACKed Failure",
                subscribed(),
                change_quantity(7, RequestSource::Azure, 3, 5),
                Subscribed,
                vec![
                    ack(7, AckStatus::Failure, false),
                    domain(
                        K::ChangeRejected,
                        Some("gold"),
                        Some(10),
                        Subscribed,
                        Some("3 seats is below the minimum of 5"),
                    ),
                ],
                Rejected,
            ),
        ),
        with_policy(
            Policy {
                seats: SeatLimits {
                    min: None,
                    max: Some(50),
                },
                ..Policy::default()
            },
            case(
                "Azure ChangeQuantity above the seat maximum is ACKed Failure",
                subscribed(),
                change_quantity(7, RequestSource::Azure, 51, 5),
                Subscribed,
                vec![
                    ack(7, AckStatus::Failure, false),
                    domain(
                        K::ChangeRejected,
                        Some("gold"),
                        Some(10),
                        Subscribed,
                        Some("51 seats is above the maximum of 50"),
                    ),
                ],
                Rejected,
            ),
        ),
        // ── §5.2/§6.3 Partner-initiated (our PATCH) ────────────────────────────
        case(
            "P18 Partner ChangePlan for our pending operation is applied without ACK",
            subscribed_changing_plan(),
            change_plan(50, RequestSource::Partner, "platinum", 5),
            Subscribed,
            vec![domain(
                K::PlanChanged,
                Some("platinum"),
                Some(10),
                Subscribed,
                None,
            )],
            Applied,
        ),
        case(
            "P18 Partner ChangeQuantity is applied without ACK",
            subscribed(),
            change_quantity(51, RequestSource::Partner, 12, 5),
            Subscribed,
            vec![domain(
                K::QuantityChanged,
                Some("gold"),
                Some(12),
                Subscribed,
                None,
            )],
            Applied,
        ),
        case(
            "operation success after the Partner webhook applied it announces nothing twice",
            then(
                subscribed_changing_plan(),
                change_plan(50, RequestSource::Partner, "platinum", 5),
            ),
            result(50, OperationStatus::Succeeded),
            Subscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        // ── §5.2 Renew / Suspend / Unsubscribe ─────────────────────────────────
        case(
            "Renew keeps Subscribed, fetches and announces",
            subscribed(),
            azure(8, WebhookAction::Renew, 5),
            Subscribed,
            vec![Effect::FetchSubscription, gold(K::Renewed, Subscribed)],
            Applied,
        ),
        case(
            "Suspend moves Subscribed to Suspended",
            subscribed(),
            azure(8, WebhookAction::Suspend, 5),
            Suspended,
            vec![Effect::FetchSubscription, gold(K::Suspended, Suspended)],
            Applied,
        ),
        case(
            "customer cancel moves Subscribed to Unsubscribed",
            subscribed(),
            azure(8, WebhookAction::Unsubscribe, 5),
            Unsubscribed,
            vec![
                Effect::FetchSubscription,
                gold(K::Unsubscribed, Unsubscribed),
            ],
            Applied,
        ),
        case(
            "Subscribe while Subscribed is no change (P9 legacy Subscribe at renewal)",
            subscribed(),
            azure(8, WebhookAction::Subscribe, 5),
            Subscribed,
            vec![],
            NoChange,
        ),
        case(
            "Reinstate while Subscribed (it overtook its Suspend) is ACKed best-effort and confirmed",
            subscribed(),
            azure(8, WebhookAction::Reinstate, 5),
            Subscribed,
            vec![ack(8, AckStatus::Success, true)],
            Applied,
        ),
        case(
            "P9 unknown action is recorded but not applicable",
            subscribed(),
            azure(8, WebhookAction::parse("Transfer"), 5),
            Subscribed,
            vec![],
            NotApplicable,
        ),
        case(
            "Suspend while pending implies the activation our check had not seen yet",
            pending_resolved(),
            azure(8, WebhookAction::Suspend, 5),
            Suspended,
            vec![
                Effect::FetchSubscription,
                gold(K::Activated, Subscribed),
                gold(K::Suspended, Suspended),
            ],
            Applied,
        ),
        case(
            "Reinstate while pending implies the activation and is ACKed best-effort",
            pending_resolved(),
            azure(8, WebhookAction::Reinstate, 5),
            Subscribed,
            vec![
                ack(8, AckStatus::Success, true),
                gold(K::Activated, Subscribed),
            ],
            Applied,
        ),
        case(
            "P9 unknown action while pending is not applicable",
            pending_resolved(),
            azure(8, WebhookAction::parse("Transfer"), 5),
            PendingFulfillment,
            vec![],
            NotApplicable,
        ),
        // ── Publisher commands ─────────────────────────────────────────────────
        case(
            "publisher ChangePlan requests a plan change",
            subscribed(),
            command(
                1,
                Command::ChangePlan {
                    plan_id: plan("platinum"),
                },
            ),
            Subscribed,
            vec![Effect::RequestPlanChange {
                command_id: cmd(1),
                plan_id: plan("platinum"),
            }],
            Applied,
        ),
        case(
            "P11 publisher ChangePlan while an operation is pending is rejected",
            subscribed_changing_plan(),
            command(
                2,
                Command::ChangePlan {
                    plan_id: plan("silver"),
                },
            ),
            Subscribed,
            vec![domain(
                K::ChangeRejected,
                Some("gold"),
                Some(10),
                Subscribed,
                Some(&pending_lock),
            )],
            Rejected,
        ),
        case(
            "P11 publisher Cancel while an operation is pending is rejected",
            subscribed_changing_plan(),
            command(2, Command::Cancel),
            Subscribed,
            vec![domain(
                K::ChangeRejected,
                Some("gold"),
                Some(10),
                Subscribed,
                Some(&pending_lock),
            )],
            Rejected,
        ),
        case(
            "publisher ChangePlan to the current plan is rejected",
            subscribed(),
            command(
                1,
                Command::ChangePlan {
                    plan_id: plan("gold"),
                },
            ),
            Subscribed,
            vec![domain(
                K::ChangeRejected,
                Some("gold"),
                Some(10),
                Subscribed,
                Some("already on plan gold"),
            )],
            Rejected,
        ),
        case(
            "publisher ChangePlan of a CSP purchase (Read only) is refused here, not sent",
            csp_subscribed(),
            command(
                1,
                Command::ChangePlan {
                    plan_id: plan("platinum"),
                },
            ),
            Subscribed,
            vec![domain(
                K::ChangeRejected,
                Some("gold"),
                Some(10),
                Subscribed,
                Some(&csp_refusal("Update")),
            )],
            Rejected,
        ),
        case(
            "publisher ChangeQuantity of a CSP purchase is refused here",
            csp_subscribed(),
            command(1, Command::ChangeQuantity { quantity: qty(15) }),
            Subscribed,
            vec![domain(
                K::ChangeRejected,
                Some("gold"),
                Some(10),
                Subscribed,
                Some(&csp_refusal("Update")),
            )],
            Rejected,
        ),
        case(
            "publisher Cancel of a CSP purchase is refused here",
            csp_subscribed(),
            command(1, Command::Cancel),
            Subscribed,
            vec![domain(
                K::ChangeRejected,
                Some("gold"),
                Some(10),
                Subscribed,
                Some(&csp_refusal("Delete")),
            )],
            Rejected,
        ),
        case(
            "Microsoft's Retry-After of the 202 goes with the poll (§15.1)",
            then(
                subscribed(),
                command(
                    1,
                    Command::ChangePlan {
                        plan_id: plan("platinum"),
                    },
                ),
            ),
            Event::PublisherOperationAccepted {
                command_id: cmd(1),
                operation_id: op(50),
                location: "https://main.prod.marketplaceapi.azure.com/api/saas/subscriptions/s/operations/50".into(),
                retry_after_ms: Some(10_000),
            },
            Subscribed,
            vec![Effect::PollOperation {
                command_id: cmd(1),
                operation_id: op(50),
                location: "https://main.prod.marketplaceapi.azure.com/api/saas/subscriptions/s/operations/50".into(),
                retry_after_ms: Some(10_000),
            }],
            Applied,
        ),
        case(
            "publisher ChangeQuantity requests a quantity change",
            subscribed(),
            command(1, Command::ChangeQuantity { quantity: qty(15) }),
            Subscribed,
            vec![Effect::RequestQuantityChange {
                command_id: cmd(1),
                quantity: qty(15),
            }],
            Applied,
        ),
        case(
            "publisher Cancel requests a cancellation",
            subscribed(),
            command(1, Command::Cancel),
            Subscribed,
            vec![Effect::RequestCancel { command_id: cmd(1) }],
            Applied,
        ),
        case(
            "Microsoft 202 for our command starts polling",
            then(
                subscribed(),
                command(
                    1,
                    Command::ChangePlan {
                        plan_id: plan("platinum"),
                    },
                ),
            ),
            accepted(1, 50),
            Subscribed,
            vec![Effect::PollOperation {
                command_id: cmd(1),
                operation_id: op(50),
                location: "https://example.test/operations/50".into(),
                retry_after_ms: Some(10_000),
            }],
            Applied,
        ),
        case(
            "§15.2 lost 202, GET shows the target: the plan change succeeded, applied once",
            then(
                subscribed(),
                command(
                    1,
                    Command::ChangePlan {
                        plan_id: plan("platinum"),
                    },
                ),
            ),
            Event::PublisherOperationConcluded {
                command_id: cmd(1),
                status: OperationStatus::Succeeded,
                reason: "GET shows plan platinum".into(),
            },
            Subscribed,
            vec![
                domain(K::PlanChanged, Some("platinum"), Some(10), Subscribed, None),
                Effect::FetchSubscription,
            ],
            Applied,
        ),
        case(
            "§15.2 lost 202 of our DELETE, GET shows Unsubscribed: the cancellation succeeded",
            then(subscribed(), command(1, Command::Cancel)),
            Event::PublisherOperationConcluded {
                command_id: cmd(1),
                status: OperationStatus::Succeeded,
                reason: "GET shows Unsubscribed".into(),
            },
            Unsubscribed,
            vec![gold(K::Unsubscribed, Unsubscribed)],
            Applied,
        ),
        case(
            "§15.2 a concluded command that is not the pending one is not applicable",
            then(subscribed(), command(1, Command::Cancel)),
            Event::PublisherOperationConcluded {
                command_id: cmd(2),
                status: OperationStatus::Succeeded,
                reason: "GET shows Unsubscribed".into(),
            },
            Subscribed,
            vec![],
            NotApplicable,
        ),
        case(
            "Microsoft 4xx for our command clears it and tells the ISV",
            then(
                subscribed(),
                command(
                    1,
                    Command::ChangePlan {
                        plan_id: plan("platinum"),
                    },
                ),
            ),
            Event::PublisherOperationRefused {
                command_id: cmd(1),
                reason: "400 locked".into(),
            },
            Subscribed,
            vec![domain(
                K::PublisherOperationFailed,
                Some("gold"),
                Some(10),
                Subscribed,
                Some("400 locked"),
            )],
            Rejected,
        ),
        case(
            "§5.2/§7.2 publisher PATCH succeeds: plan applied, then confirmed with GET",
            subscribed_changing_plan(),
            result(50, OperationStatus::Succeeded),
            Subscribed,
            vec![
                domain(K::PlanChanged, Some("platinum"), Some(10), Subscribed, None),
                Effect::FetchSubscription,
            ],
            Applied,
        ),
        case(
            "§5.2 publisher DELETE succeeds: Unsubscribed",
            subscribed_cancelling(),
            result(60, OperationStatus::Succeeded),
            Unsubscribed,
            vec![gold(K::Unsubscribed, Unsubscribed)],
            Applied,
        ),
        case(
            "publisher operation Failed clears the pending operation",
            subscribed_changing_plan(),
            result(50, OperationStatus::Failed),
            Subscribed,
            vec![domain(
                K::PublisherOperationFailed,
                Some("gold"),
                Some(10),
                Subscribed,
                Some(&format!("operation {} ended Failed", op(50))),
            )],
            Rejected,
        ),
        case(
            "publisher operation Conflict clears the pending operation",
            subscribed_changing_plan(),
            result(50, OperationStatus::Conflict),
            Subscribed,
            vec![domain(
                K::PublisherOperationFailed,
                Some("gold"),
                Some(10),
                Subscribed,
                Some(&format!("operation {} ended Conflict", op(50))),
            )],
            Rejected,
        ),
        case(
            "P13 the result of a customer change we ACKed is confirmed with GET",
            then(
                subscribed(),
                change_plan(7, RequestSource::Azure, "platinum", 5),
            ),
            result(7, OperationStatus::Succeeded),
            Subscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        case(
            "P13 the success of a seat change we accepted says its outcome: no GET (§4.10)",
            then(
                subscribed(),
                change_quantity(7, RequestSource::Azure, 12, 5),
            ),
            result(7, OperationStatus::Succeeded),
            Subscribed,
            vec![],
            Applied,
        ),
        case(
            "P13 a failed seat change we accepted is confirmed with GET (acc#348)",
            then(
                subscribed(),
                change_quantity(7, RequestSource::Azure, 12, 5),
            ),
            result(7, OperationStatus::Failed),
            Subscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        case(
            "P13 a seat change's success after the seats moved again is confirmed with GET",
            then(
                then(
                    subscribed(),
                    change_quantity(7, RequestSource::Azure, 12, 5),
                ),
                change_quantity(8, RequestSource::Azure, 15, 6),
            ),
            result(7, OperationStatus::Succeeded),
            Subscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        with_policy(
            Policy {
                seats: SeatLimits {
                    min: None,
                    max: Some(50),
                },
                ..Policy::default()
            },
            case(
                "P13 a seat change we refused that Microsoft says Succeeded is confirmed with GET (acc#348)",
                then(
                    subscribed(),
                    change_quantity(7, RequestSource::Azure, 500, 5),
                ),
                result(7, OperationStatus::Succeeded),
                Subscribed,
                vec![Effect::FetchSubscription],
                Applied,
            ),
        ),
        case(
            "P13 a failed customer change we ACKed is confirmed with GET (acc#348)",
            then(
                subscribed(),
                change_plan(7, RequestSource::Azure, "platinum", 5),
            ),
            result(7, OperationStatus::Failed),
            Subscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        case(
            "P13 the result of a reinstatement we ACKed is confirmed with GET",
            then(suspended(), azure(9, WebhookAction::Reinstate, 5)),
            result(9, OperationStatus::Succeeded),
            Subscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        case(
            "result for an operation we are not waiting for is not applicable",
            subscribed(),
            result(99, OperationStatus::Succeeded),
            Subscribed,
            vec![],
            NotApplicable,
        ),
        // ── Reconciliation ─────────────────────────────────────────────────────
        case(
            "Observed plan change converges and announces it",
            subscribed(),
            observed(MS::Subscribed, "platinum", 10, 5),
            Subscribed,
            vec![domain(
                K::PlanChanged,
                Some("platinum"),
                Some(10),
                Subscribed,
                None,
            )],
            Applied,
        ),
        case(
            "Observed identical subscription is no change",
            subscribed(),
            observed(MS::Subscribed, "gold", 10, 5),
            Subscribed,
            vec![],
            NoChange,
        ),
        case(
            "Observed Suspended converges to Suspended",
            subscribed(),
            observed(MS::Suspended, "gold", 10, 5),
            Suspended,
            vec![gold(K::Suspended, Suspended)],
            Applied,
        ),
        case(
            "Observed old plan while our applied change is pending does not undo it",
            then(
                subscribed_changing_plan(),
                change_plan(50, RequestSource::Partner, "platinum", 5),
            ),
            observed(MS::Subscribed, "gold", 10, 6),
            Subscribed,
            vec![],
            NoChange,
        ),
        // ── §5.2/§6.3 Suspended ────────────────────────────────────────────────
        case(
            "Reinstate moves Suspended to Subscribed with a best-effort ACK",
            suspended(),
            azure(9, WebhookAction::Reinstate, 5),
            Subscribed,
            vec![
                ack(9, AckStatus::Success, true),
                gold(K::Reinstated, Subscribed),
            ],
            Applied,
        ),
        case(
            "Suspend while Suspended is no change",
            suspended(),
            azure(9, WebhookAction::Suspend, 5),
            Suspended,
            vec![],
            NoChange,
        ),
        case(
            "30-day grace over: Unsubscribe moves Suspended to Unsubscribed",
            suspended(),
            azure(9, WebhookAction::Unsubscribe, 5),
            Unsubscribed,
            vec![
                Effect::FetchSubscription,
                gold(K::Unsubscribed, Unsubscribed),
            ],
            Applied,
        ),
        case(
            "ChangePlan while Suspended is not applicable",
            suspended(),
            change_plan(9, RequestSource::Azure, "platinum", 5),
            Suspended,
            vec![],
            NotApplicable,
        ),
        case(
            "Renew while Suspended is not applicable",
            suspended(),
            azure(9, WebhookAction::Renew, 5),
            Suspended,
            vec![],
            NotApplicable,
        ),
        case(
            "publisher ChangeQuantity while Suspended is rejected",
            suspended(),
            command(1, Command::ChangeQuantity { quantity: qty(15) }),
            Suspended,
            vec![domain(
                K::ChangeRejected,
                Some("gold"),
                Some(10),
                Suspended,
                Some("only a Subscribed subscription can be changed"),
            )],
            Rejected,
        ),
        case(
            "publisher Cancel while Suspended is allowed",
            suspended(),
            command(1, Command::Cancel),
            Suspended,
            vec![Effect::RequestCancel { command_id: cmd(1) }],
            Applied,
        ),
        case(
            "Observed Subscribed while Suspended converges to Subscribed",
            suspended(),
            observed(MS::Subscribed, "gold", 10, 5),
            Subscribed,
            vec![gold(K::Reinstated, Subscribed)],
            Applied,
        ),
        // ── Ordering, duplicates, terminal ─────────────────────────────────────
        case(
            "P10 a plan change older than the newest applied seat change is stale",
            then(
                subscribed(),
                change_quantity(8, RequestSource::Azure, 12, 10),
            ),
            change_plan(7, RequestSource::Azure, "platinum", 5),
            Subscribed,
            vec![],
            Stale,
        ),
        case(
            "P10 a seat change older than an applied Renew is still decided and ACKed (else Microsoft auto-accepts it without us)",
            then(subscribed(), azure(8, WebhookAction::Renew, 10)),
            change_quantity(7, RequestSource::Azure, 12, 5),
            Subscribed,
            vec![
                ack(7, AckStatus::Success, false),
                domain(K::QuantityChanged, Some("gold"), Some(12), Subscribed, None),
            ],
            Applied,
        ),
        case(
            "P10 a Renew older than the newest applied Renew is stale",
            then(subscribed(), azure(8, WebhookAction::Renew, 10)),
            azure(7, WebhookAction::Renew, 5),
            Subscribed,
            vec![],
            Stale,
        ),
        case(
            "P10 observation older than the newest applied observation is stale",
            then(subscribed(), observed(MS::Subscribed, "platinum", 10, 10)),
            observed(MS::Subscribed, "silver", 10, 5),
            Subscribed,
            vec![],
            Stale,
        ),
        case(
            "P10 an old Unsubscribe is never stale",
            then(subscribed(), azure(8, WebhookAction::Renew, 10)),
            azure(7, WebhookAction::Unsubscribe, 5),
            Unsubscribed,
            vec![
                Effect::FetchSubscription,
                gold(K::Unsubscribed, Unsubscribed),
            ],
            Applied,
        ),
        case(
            "P9 the same webhook twice is a duplicate",
            then(
                subscribed(),
                change_plan(7, RequestSource::Azure, "platinum", 5),
            ),
            change_plan(7, RequestSource::Azure, "platinum", 5),
            Subscribed,
            vec![],
            Duplicate,
        ),
        case(
            "P9 the same publisher command twice is a duplicate",
            then(subscribed(), command(1, Command::Cancel)),
            command(1, Command::Cancel),
            Subscribed,
            vec![],
            Duplicate,
        ),
        case(
            "P10 Reinstate after Unsubscribed is terminal",
            unsubscribed(),
            azure(9, WebhookAction::Reinstate, 9),
            Unsubscribed,
            vec![],
            Terminal,
        ),
        case(
            "P10 Observed Subscribed after Unsubscribed does not resurrect",
            unsubscribed(),
            observed(MS::Subscribed, "gold", 10, 9),
            Unsubscribed,
            vec![],
            Terminal,
        ),
        case(
            "P10 a GET of the ended subscription converges its seats, no transition",
            unsubscribed(),
            observed(MS::Unsubscribed, "gold", 7, 9),
            Unsubscribed,
            vec![],
            Applied,
        ),
        case(
            "P10 a GET of the ended subscription that shows nothing new is no change",
            unsubscribed(),
            observed(MS::Unsubscribed, "gold", 10, 9),
            Unsubscribed,
            vec![],
            NoChange,
        ),
        case(
            "P10 ChangeQuantity after Unsubscribe: no ACK, its operation followed to the end",
            unsubscribed(),
            change_quantity(9, RequestSource::Azure, 7, 2),
            Unsubscribed,
            vec![confirm(9)],
            Applied,
        ),
        case(
            "P10 ChangePlan after Unsubscribe: no ACK, its operation followed to the end",
            unsubscribed(),
            change_plan(9, RequestSource::Azure, "platinum", 2),
            Unsubscribed,
            vec![confirm(9)],
            Applied,
        ),
        case(
            "P10 Renew after Unsubscribe reads the final term",
            unsubscribed(),
            azure(9, WebhookAction::Renew, 9),
            Unsubscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        case(
            "P10 an operation ending after Unsubscribe brings a GET of the final details",
            unsubscribed(),
            result(9, OperationStatus::Succeeded),
            Unsubscribed,
            vec![Effect::FetchSubscription],
            Applied,
        ),
        case(
            "P10 Suspend after Unsubscribed is terminal",
            unsubscribed(),
            azure(9, WebhookAction::Suspend, 9),
            Unsubscribed,
            vec![],
            Terminal,
        ),
        case(
            "P10 publisher command after Unsubscribed is terminal",
            unsubscribed(),
            command(5, Command::Cancel),
            Unsubscribed,
            vec![],
            Terminal,
        ),
    ]
}

#[test]
fn decision_table() {
    let mut failures = Vec::new();
    let cases = cases();
    for case in &cases {
        let mut machine = machine_after(&case.start, &case.policy);
        let before_state = machine.state();
        let before_details = machine.details().clone();
        let decision = machine.handle(&case.event, t(100), &case.policy);
        let mut problems = Vec::new();
        if machine.state() != case.state || decision.to != case.state {
            problems.push(format!(
                "state: expected {}, got {} (decision.to {})",
                case.state,
                machine.state(),
                decision.to
            ));
        }
        if decision.from != before_state {
            problems.push(format!("decision.from {} != {before_state}", decision.from));
        }
        if decision.effects != case.effects {
            problems.push(format!(
                "effects:\n      expected {:?}\n      got      {:?}",
                case.effects, decision.effects
            ));
        }
        if Want::of(&decision.outcome) != case.outcome {
            problems.push(format!(
                "outcome: expected {:?}, got {:?}",
                case.outcome, decision.outcome
            ));
        }
        if decision.outcome.is_ignored() && machine.details() != &before_details {
            problems.push("ignored event changed details".to_owned());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "row {:?}:\n    {}",
                case.name,
                problems.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn row_names_are_unique() {
    let mut names: Vec<_> = cases().iter().map(|c| c.name).collect();
    let total = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), total);
}

#[test]
fn partner_webhook_keeps_the_pending_operation_until_its_result() {
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed_changing_plan(), &policy);
    machine.handle(
        &change_plan(50, RequestSource::Partner, "platinum", 5),
        t(10),
        &policy,
    );
    let pending = machine.pending_operation().expect("still pending");
    assert!(pending.applied);
    assert_eq!(pending.operation_id, Some(op(50)));
    machine.handle(&result(50, OperationStatus::Succeeded), t(11), &policy);
    assert!(machine.pending_operation().is_none());
    assert_eq!(machine.details().plan_id, Some(plan("platinum")));
}

#[test]
fn activation_progress_follows_the_lifecycle() {
    let policy = manual();
    let mut machine = machine_after(&pending_resolved(), &policy);
    assert_eq!(machine.activation(), ActivationProgress::NotRequested);
    machine.handle(
        &Event::ActivationFailed {
            reason: "boom".into(),
            failed_at: t(2),
        },
        t(2),
        &policy,
    );
    assert_eq!(
        machine.activation(),
        ActivationProgress::Failed {
            reason: "boom".into()
        }
    );
    let retry = machine.handle(
        &Event::ActivationRequested { command_id: cmd(3) },
        t(3),
        &policy,
    );
    assert_eq!(retry.effects, vec![activate()]);
    assert_eq!(machine.activation(), ActivationProgress::Requested);
    machine.handle(&confirmed(4), t(4), &policy);
    assert_eq!(machine.activation(), ActivationProgress::Confirmed);
    assert_eq!(machine.subscription_id(), sub());
}

#[test]
fn renew_takes_the_term_from_the_webhook_snapshot() {
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed(), &policy);
    let term = Term {
        unit: Some("P1M".into()),
        charge_duration: None,
        start: Some(t(60)),
        end: Some(t(90)),
        auto_renew: Some(true),
    };
    let renew = Event::Webhook(Webhook {
        subscription: Some(Snapshot {
            term: Some(term.clone()),
            ..snap(MS::Subscribed, "gold", 10)
        }),
        ..hook(8, WebhookAction::Renew, RequestSource::Azure, 5)
    });
    machine.handle(&renew, t(5), &policy);
    assert_eq!(machine.details().term, Some(term));
}

/// Feeds `events` in order and returns each decision's outcome.
fn outcomes(start: Vec<Event>, events: &[Event]) -> (SubscriptionMachine, Vec<Want>) {
    let policy = Policy::default();
    let mut machine = machine_after(&start, &policy);
    let wants = events
        .iter()
        .map(|event| Want::of(&machine.handle(event, t(20), &policy).outcome))
        .collect();
    (machine, wants)
}

#[test]
fn p10_a_suspend_overtaken_by_its_reinstate_is_stale() {
    // Microsoft suspended (minute 9) and reinstated (minute 10); the Reinstate arrives
    // first, while we are still Subscribed: it is answered (Microsoft holds it open until
    // then), and the late Suspend is now stale.
    let (machine, wants) = outcomes(
        subscribed(),
        &[
            azure(9, WebhookAction::Reinstate, 10),
            azure(8, WebhookAction::Suspend, 9),
        ],
    );
    assert_eq!(wants, vec![Want::Applied, Want::Stale]);
    assert_eq!(machine.state(), Subscribed);
}

#[test]
fn p13_a_lagging_get_does_not_suspend_us_after_a_reinstate_that_overtook_its_suspend() {
    // Found by the duplicate-and-reorder system test: the Reinstate came first and was
    // ignored, the Suspend was stale, a GET made while Microsoft still held the Reinstate
    // open said Suspended, and nothing ever answered the Reinstate or looked again.
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed(), &policy);
    machine.handle(&azure(9, WebhookAction::Reinstate, 10), t(10), &policy);
    machine.handle(&azure(8, WebhookAction::Suspend, 9), t(10), &policy);
    let decision = machine.handle(&observed(MS::Suspended, "gold", 10, 11), t(11), &policy);
    assert_eq!(Want::of(&decision.outcome), Want::NoChange, "{decision:?}");
    assert_eq!(machine.state(), Subscribed);
}

#[test]
fn p10_a_reinstate_overtaken_by_a_newer_suspend_is_stale() {
    // Suspend (3), Reinstate (8), Suspend again (10); the second Suspend arrives before the
    // Reinstate: no change while Suspended, and the Reinstate behind it is stale.
    let (machine, wants) = outcomes(
        suspended(),
        &[
            azure(10, WebhookAction::Suspend, 10),
            azure(9, WebhookAction::Reinstate, 8),
        ],
    );
    assert_eq!(wants, vec![Want::NoChange, Want::Stale]);
    assert_eq!(machine.state(), Suspended);
}

#[test]
fn a_no_change_observation_also_makes_older_observations_stale() {
    let (machine, wants) = outcomes(
        subscribed(),
        &[
            observed(MS::Subscribed, "gold", 10, 10),
            observed(MS::Suspended, "gold", 10, 9),
        ],
    );
    assert_eq!(wants, vec![Want::NoChange, Want::Stale]);
    assert_eq!(machine.state(), Subscribed);
}

/// A snapshot of a plan without seats (a flat plan: Microsoft reports no quantity).
fn flat(plan_id: &str, minute: i64) -> Event {
    Event::Observed {
        snapshot: Snapshot {
            plan_id: Some(plan(plan_id)),
            quantity: None,
            ..Snapshot::with_status(MS::Subscribed)
        },
        observed_at: t(minute),
    }
}

#[test]
fn a_customer_move_to_a_flat_plan_drops_the_seats_once_microsoft_confirms_it() {
    // Subscribed on per-seat gold with 10 seats; the customer moves to flat platinum. The
    // ACK (which also confirms the operation's end) is not followed by a GET: before the
    // operation is final a GET may still show gold/10 (P13).
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed(), &policy);
    let decision = machine.handle(
        &change_plan(7, RequestSource::Azure, "platinum", 5),
        t(5),
        &policy,
    );
    assert_eq!(decision.effects[..1], [ack(7, AckStatus::Success, false)]);
    assert!(!decision.effects.contains(&Effect::FetchSubscription));
    // Microsoft reports the operation final: now the GET is safe.
    let decision = machine.handle(&result(7, OperationStatus::Succeeded), t(6), &policy);
    assert_eq!(decision.effects, vec![Effect::FetchSubscription]);
    let decision = machine.handle(&flat("platinum", 7), t(7), &policy);
    assert_eq!(Want::of(&decision.outcome), Want::Applied);
    assert_eq!(machine.details().plan_id, Some(plan("platinum")));
    assert_eq!(
        machine.details().quantity,
        None,
        "the old seat count is gone"
    );
    assert!(
        decision.effects.contains(&domain(
            K::QuantityChanged,
            Some("platinum"),
            None,
            Subscribed,
            None
        )),
        "{decision:?}"
    );
}

#[test]
fn a_publisher_move_to_a_flat_plan_drops_the_seats_after_the_operation_succeeds() {
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed_changing_plan(), &policy);
    let decision = machine.handle(&result(50, OperationStatus::Succeeded), t(6), &policy);
    assert!(decision.effects.contains(&Effect::FetchSubscription));
    machine.handle(&flat("platinum", 7), t(7), &policy);
    assert_eq!(machine.details().plan_id, Some(plan("platinum")));
    assert_eq!(machine.details().quantity, None);
}

#[test]
fn p13_a_lagging_get_does_not_undo_an_acknowledged_seat_change_until_microsoft_confirms_it() {
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed(), &policy);
    machine.handle(
        &change_quantity(7, RequestSource::Azure, 12, 5),
        t(5),
        &policy,
    );
    assert_eq!(machine.unconfirmed().len(), 1);
    // A GET made before Microsoft applied the change (an older fetch, another worker's
    // check of a new subscription) still shows 10 seats.
    let decision = machine.handle(&observed(MS::Subscribed, "gold", 10, 6), t(6), &policy);
    assert_eq!(Want::of(&decision.outcome), Want::NoChange, "{decision:?}");
    assert_eq!(machine.details().quantity, Some(qty(12)));
    // Microsoft reports the operation final: no GET follows (the success says the 12 seats
    // itself), and the entry stays, marked, because a GET made before the end can still be
    // applied after it (one already in flight: chaos met it, a seat change undone).
    let decision = machine.handle(&result(7, OperationStatus::Succeeded), t(7), &policy);
    assert_eq!(decision.effects, vec![]);
    assert!(
        machine.unconfirmed()[0].succeeded,
        "{:?}",
        machine.unconfirmed()
    );
    let decision = machine.handle(&observed(MS::Subscribed, "gold", 10, 8), t(8), &policy);
    assert_eq!(Want::of(&decision.outcome), Want::NoChange, "{decision:?}");
    assert_eq!(machine.details().quantity, Some(qty(12)));
    // A GET that shows the change ends the entry; GETs are believed again.
    machine.handle(&observed(MS::Subscribed, "gold", 12, 9), t(9), &policy);
    assert!(machine.unconfirmed().is_empty());
    machine.handle(&observed(MS::Subscribed, "gold", 11, 10), t(10), &policy);
    assert_eq!(machine.details().quantity, Some(qty(11)));
}

#[test]
fn p13_a_succeeded_seat_change_is_superseded_by_the_next_one_not_kept_forever() {
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed(), &policy);
    for (n, seats) in [(7, 12), (8, 14), (9, 16)] {
        machine.handle(
            &change_quantity(n, RequestSource::Azure, seats, n as i64),
            t(n as i64),
            &policy,
        );
        let decision = machine.handle(&result(n, OperationStatus::Succeeded), t(n as i64), &policy);
        assert_eq!(decision.effects, vec![], "{decision:?}");
    }
    assert_eq!(
        machine.unconfirmed().len(),
        1,
        "{:?}",
        machine.unconfirmed()
    );
    assert_eq!(machine.details().quantity, Some(qty(16)));
}

#[test]
fn p13_when_the_acknowledged_change_failed_at_microsoft_its_get_wins() {
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed(), &policy);
    machine.handle(
        &change_quantity(7, RequestSource::Azure, 12, 5),
        t(5),
        &policy,
    );
    machine.handle(&result(7, OperationStatus::Failed), t(6), &policy);
    let decision = machine.handle(&observed(MS::Subscribed, "gold", 10, 7), t(7), &policy);
    assert_eq!(Want::of(&decision.outcome), Want::Applied);
    assert_eq!(machine.details().quantity, Some(qty(10)));
}

#[test]
fn p13_a_lagging_get_does_not_suspend_a_subscription_we_reinstated() {
    let policy = Policy::default();
    let mut machine = machine_after(&suspended(), &policy);
    machine.handle(&azure(9, WebhookAction::Reinstate, 5), t(5), &policy);
    assert_eq!(machine.state(), Subscribed);
    // The Suspend's own GET, made before our ACK reached Microsoft.
    let decision = machine.handle(&observed(MS::Suspended, "gold", 10, 6), t(6), &policy);
    assert_eq!(Want::of(&decision.outcome), Want::NoChange, "{decision:?}");
    assert_eq!(machine.state(), Subscribed);
    // A later Suspend webhook still suspends, and its GET is believed.
    machine.handle(&azure(10, WebhookAction::Suspend, 8), t(8), &policy);
    assert_eq!(machine.state(), Suspended);
    machine.handle(&observed(MS::Suspended, "gold", 10, 9), t(9), &policy);
    assert_eq!(machine.state(), Suspended);
}

#[test]
fn p13_an_unconfirmed_change_is_forgotten_after_its_time_to_live() {
    let policy = Policy::default();
    let mut machine = machine_after(&subscribed(), &policy);
    machine.handle(
        &change_quantity(7, RequestSource::Azure, 12, 5),
        t(5),
        &policy,
    );
    let late = 5 + UNCONFIRMED_TTL.whole_minutes() + 1;
    machine.handle(
        &observed(MS::Subscribed, "gold", 10, late),
        t(late),
        &policy,
    );
    assert_eq!(machine.details().quantity, Some(qty(10)));
    assert!(machine.unconfirmed().is_empty());
}
