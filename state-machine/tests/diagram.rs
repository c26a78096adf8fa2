//! The diagram is derived from the machine; these tests pin its shape, not its text.

use fulfillment_state_machine::*;

#[test]
fn mermaid_names_every_state_and_the_entry() {
    let mermaid = render_mermaid(&transitions());
    assert!(mermaid.starts_with("stateDiagram-v2\n"), "{mermaid}");
    assert!(mermaid.contains("[*] --> PendingFulfillment"), "{mermaid}");
    assert!(mermaid.contains("Unsubscribed --> [*]"), "{mermaid}");
    for state in StateName::ALL {
        assert!(
            mermaid.contains(state.as_str()),
            "{state} missing:\n{mermaid}"
        );
    }
}

#[test]
fn every_live_state_has_an_exit_and_unsubscribed_has_none() {
    let edges = transitions();
    for state in StateName::ALL {
        let outgoing = edges
            .iter()
            .filter(|e| e.from == state && e.to != state)
            .count();
        if state == StateName::Unsubscribed {
            // Only self-loops: the ended subscription's details still follow Microsoft.
            assert_eq!(outgoing, 0, "terminal state has exits: {edges:?}");
        } else {
            assert!(outgoing > 0, "{state} has no outgoing edge");
        }
    }
}

#[test]
fn key_lifecycle_edges_are_present() {
    let edges = transitions();
    let has = |from, event, to| edges.contains(&Transition { from, event, to });
    use EventKind as E;
    use StateName::*;
    assert!(has(PendingFulfillment, E::ActivationConfirmed, Subscribed));
    assert!(has(PendingFulfillment, E::WebhookSubscribe, Subscribed));
    assert!(has(PendingFulfillment, E::WebhookUnsubscribe, Unsubscribed));
    assert!(has(Subscribed, E::WebhookSuspend, Suspended));
    assert!(has(Suspended, E::WebhookReinstate, Subscribed));
    assert!(has(Suspended, E::WebhookUnsubscribe, Unsubscribed));
    assert!(has(Subscribed, E::OperationResult, Unsubscribed));
    assert!(!has(Suspended, E::WebhookRenew, Suspended));
}

#[test]
fn output_is_deterministic_and_labels_are_merged() {
    let edges = transitions();
    assert_eq!(render_mermaid(&edges), render_mermaid(&transitions()));
    assert_eq!(render_dot(&edges), render_dot(&transitions()));
    let mermaid = render_mermaid(&edges);
    let arrows = mermaid
        .lines()
        .filter(|l| l.contains(" --> ") && !l.contains("[*]"))
        .count();
    let mut pairs: Vec<_> = edges.iter().map(|e| (e.from, e.to)).collect();
    pairs.sort_unstable();
    pairs.dedup();
    assert_eq!(arrows, pairs.len(), "one arrow per (from, to):\n{mermaid}");
    let dot = render_dot(&edges);
    assert!(dot.starts_with("digraph subscription {"), "{dot}");
    assert!(dot.trim_end().ends_with('}'));
}
