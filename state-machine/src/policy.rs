//! The ISV's business rules for customer- and publisher-initiated changes, as data plus
//! pure decision functions. The machine asks the policy; the policy never sees state.
//!
//! ChangePlan/ChangeQuantity must be answered within 10 s or they are auto-accepted (P7),
//! so these functions are cheap and never do IO.

use serde::{Deserialize, Serialize};

use crate::ids::{PlanId, Quantity};
use crate::notice::NoticePolicy;

/// Everything the machine needs to decide on changes and activation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Which plan moves are allowed.
    #[serde(default)]
    pub plan_moves: PlanMoves,
    /// Seat limits for per-seat plans.
    #[serde(default)]
    pub seats: SeatLimits,
    /// Whether a resolved purchase is activated without operator action.
    #[serde(default)]
    pub activation: ActivationMode,
    /// When lifecycle notices are due; set from the `[worker]` settings, not `[policy]`.
    #[serde(skip)]
    pub notices: NoticePolicy,
}

/// Allowed plan moves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanMoves {
    /// Any plan to any plan.
    #[default]
    AllowAll,
    /// Only the listed moves.
    Allowed(Vec<PlanMove>),
}

/// One allowed move between two plans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanMove {
    /// Current plan.
    pub from: PlanId,
    /// Target plan.
    pub to: PlanId,
}

/// Inclusive seat bounds; `None` means unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeatLimits {
    /// Fewest seats allowed.
    #[serde(default)]
    pub min: Option<u32>,
    /// Most seats allowed.
    #[serde(default)]
    pub max: Option<u32>,
}

/// How activation is triggered after the landing page resolved the purchase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivationMode {
    /// Activate as soon as the purchase is resolved.
    #[default]
    Automatic,
    /// Wait for an `ActivationRequested` from the ISV/operator (e.g. after provisioning).
    Manual,
}

/// The answer of a policy check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The change is allowed.
    Accept,
    /// The change is refused, with a reason the customer/ISV can read.
    Reject {
        /// Why.
        reason: String,
    },
}

impl Verdict {
    fn reject(reason: String) -> Self {
        Verdict::Reject { reason }
    }
}

impl Policy {
    /// May the subscription move from `from` to `to`? Staying on the same plan is always
    /// allowed: it is the "revert" event that follows a rejection (P8). With an explicit
    /// list and an unknown current plan (minimal payloads, §6.2), the move is allowed only
    /// if some rule leads to `to`.
    pub fn decide_plan_change(&self, from: Option<&PlanId>, to: &PlanId) -> Verdict {
        if from == Some(to) {
            return Verdict::Accept;
        }
        let PlanMoves::Allowed(moves) = &self.plan_moves else {
            return Verdict::Accept;
        };
        let allowed = moves
            .iter()
            .any(|m| &m.to == to && from.is_none_or(|from| &m.from == from));
        if allowed {
            Verdict::Accept
        } else {
            match from {
                Some(from) => Verdict::reject(format!("plan move {from} -> {to} is not allowed")),
                None => Verdict::reject(format!("no allowed plan move leads to {to}")),
            }
        }
    }

    /// May the seat count become `to`? Only the bounds matter; the current value is
    /// taken so that future rules (e.g. "no decrease mid-term") have it.
    pub fn decide_quantity_change(&self, _from: Option<Quantity>, to: Quantity) -> Verdict {
        let seats = to.get();
        if let Some(min) = self.seats.min
            && seats < min
        {
            return Verdict::reject(format!("{seats} seats is below the minimum of {min}"));
        }
        if let Some(max) = self.seats.max
            && seats > max
        {
            return Verdict::reject(format!("{seats} seats is above the maximum of {max}"));
        }
        Verdict::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(s: &str) -> PlanId {
        PlanId::parse(s).unwrap()
    }

    fn seats(n: u32) -> Quantity {
        Quantity::new(n).unwrap()
    }

    fn upgrades_only() -> Policy {
        Policy {
            plan_moves: PlanMoves::Allowed(vec![
                PlanMove {
                    from: plan("silver"),
                    to: plan("gold"),
                },
                PlanMove {
                    from: plan("gold"),
                    to: plan("platinum"),
                },
            ]),
            ..Policy::default()
        }
    }

    #[test]
    fn default_policy_allows_everything_and_activates_automatically() {
        let policy = Policy::default();
        assert_eq!(policy.activation, ActivationMode::Automatic);
        assert_eq!(
            policy.decide_plan_change(Some(&plan("gold")), &plan("silver")),
            Verdict::Accept
        );
        assert_eq!(
            policy.decide_quantity_change(None, seats(10_000)),
            Verdict::Accept
        );
    }

    #[test]
    fn listed_moves_are_accepted_and_others_rejected() {
        let policy = upgrades_only();
        assert_eq!(
            policy.decide_plan_change(Some(&plan("silver")), &plan("gold")),
            Verdict::Accept
        );
        let Verdict::Reject { reason } =
            policy.decide_plan_change(Some(&plan("gold")), &plan("silver"))
        else {
            panic!("downgrade must be rejected");
        };
        assert!(reason.contains("gold -> silver"), "{reason}");
        assert!(matches!(
            policy.decide_plan_change(Some(&plan("silver")), &plan("platinum")),
            Verdict::Reject { .. }
        ));
    }

    #[test]
    fn staying_on_the_same_plan_is_always_accepted() {
        assert_eq!(
            upgrades_only().decide_plan_change(Some(&plan("gold")), &plan("gold")),
            Verdict::Accept
        );
    }

    #[test]
    fn unknown_current_plan_needs_a_move_to_the_target() {
        let policy = upgrades_only();
        assert_eq!(
            policy.decide_plan_change(None, &plan("gold")),
            Verdict::Accept
        );
        assert!(matches!(
            policy.decide_plan_change(None, &plan("silver")),
            Verdict::Reject { .. }
        ));
    }

    #[test]
    fn seat_limits_are_inclusive() {
        let policy = Policy {
            seats: SeatLimits {
                min: Some(5),
                max: Some(50),
            },
            ..Policy::default()
        };
        assert_eq!(
            policy.decide_quantity_change(None, seats(5)),
            Verdict::Accept
        );
        assert_eq!(
            policy.decide_quantity_change(None, seats(50)),
            Verdict::Accept
        );
        assert!(matches!(
            policy.decide_quantity_change(Some(seats(5)), seats(4)),
            Verdict::Reject { reason } if reason.contains("minimum of 5")
        ));
        assert!(matches!(
            policy.decide_quantity_change(Some(seats(5)), seats(51)),
            Verdict::Reject { reason } if reason.contains("maximum of 50")
        ));
    }

    #[test]
    fn policy_round_trips_through_json_with_defaults() {
        let policy: Policy = serde_json::from_str("{}").unwrap();
        assert_eq!(policy, Policy::default());
        let strict = upgrades_only();
        let json = serde_json::to_string(&strict).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), strict);
    }
}
