//! The README's state diagram is the one the machine derives, and the diagram command works.
//! Run with `BLESS=1` to rewrite the README block after changing the machine.

use std::path::PathBuf;
use std::process::Command;

use marketplace_fulfillment::cli::{DiagramFormat, render_diagram};

const START: &str = "<!-- state-diagram:start -->";
const END: &str = "<!-- state-diagram:end -->";

fn readme_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("README.md")
}

#[test]
fn readme_holds_the_diagram_derived_from_the_machine() {
    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let start = readme.find(START).expect("README has the start marker") + START.len();
    let end = readme.find(END).expect("README has the end marker");
    let expected = format!(
        "\n```mermaid\n{}```\n",
        render_diagram(DiagramFormat::Mermaid)
    );
    if readme[start..end] != expected && std::env::var_os("BLESS").is_some() {
        let updated = format!("{}{}{}", &readme[..start], expected, &readme[end..]);
        std::fs::write(readme_path(), updated).unwrap();
        return;
    }
    assert_eq!(
        readme[start..end],
        expected,
        "the README's state diagram is stale: rerun this test with BLESS=1"
    );
}

#[test]
fn the_diagram_command_prints_all_four_states() {
    let run = |format: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_fulfillment"))
            .args(["state-machine", "--format", format])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let mermaid = run("mermaid");
    assert_eq!(mermaid, render_diagram(DiagramFormat::Mermaid));
    assert!(mermaid.starts_with("stateDiagram-v2"), "{mermaid}");
    let dot = run("dot");
    assert!(dot.starts_with("digraph"), "{dot}");
    for state in [
        "PendingFulfillment",
        "Subscribed",
        "Suspended",
        "Unsubscribed",
    ] {
        assert!(mermaid.contains(state), "{state} missing from {mermaid}");
        assert!(dot.contains(state), "{state} missing from {dot}");
    }
}

#[test]
fn an_unknown_diagram_format_is_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_fulfillment"))
        .args(["state-machine", "--format", "svg"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("mermaid"));
}
