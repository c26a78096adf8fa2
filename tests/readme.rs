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

/// Issue #15's "one test world": the test set-up code (`scripts/setup-lines.sh`) stays at
/// most half of the 2,675 lines it was when the issue was filed, and the README's figure is
/// the script's (`BLESS=1` rewrites it).
#[test]
fn the_test_setup_code_stays_within_half_and_the_readme_says_how_much() {
    const WHEN_FILED: usize = 2675;
    const LEAD: &str = "counts the set-up code left in `tests/`";
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("bash")
        .arg(root.join("scripts/setup-lines.sh"))
        .output()
        .expect("bash runs scripts/setup-lines.sh");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let total: usize = stdout
        .lines()
        .find_map(|line| line.trim().strip_suffix("  total"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no total in {stdout}"));
    assert!(
        total <= WHEN_FILED / 2,
        "test set-up code grew to {total} lines, over half of {WHEN_FILED}:\n{stdout}"
    );
    // The figure is the text between the last ": " after LEAD and " lines, against 2,675".
    let readme = std::fs::read_to_string(readme_path()).unwrap();
    let against = format!(" lines, against {}", thousands(WHEN_FILED));
    let lead = readme
        .find(LEAD)
        .expect("README names scripts/setup-lines.sh's figure")
        + LEAD.len();
    let end = lead
        + readme[lead..]
            .find(&against)
            .expect("README gives the figure against the one when #15 was filed");
    let start = lead
        + readme[lead..end]
            .rfind(": ")
            .expect("the figure follows a colon")
        + 2;
    let written = thousands(total);
    if readme[start..end] != written && std::env::var_os("BLESS").is_some() {
        let updated = format!("{}{}{}", &readme[..start], written, &readme[end..]);
        std::fs::write(readme_path(), updated).unwrap();
        return;
    }
    assert_eq!(
        readme[start..end],
        written,
        "the README's set-up figure is stale: rerun this test with BLESS=1"
    );
}

/// `n` as the README writes it: 1,331.
fn thousands(n: usize) -> String {
    if n >= 1000 {
        format!("{},{:03}", n / 1000, n % 1000)
    } else {
        n.to_string()
    }
}
