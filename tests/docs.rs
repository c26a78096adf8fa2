//! The citations of Microsoft facts in the code stay valid: every pitfall (`P11`) and section
//! (`§4.2`) cited in `src/`, `state-machine/` (sources and tests) and `tests/` is defined in
//! `docs/marketplace.md`, by a heading that starts with the id (`### P11 — …`,
//! `### §4.2 …`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const DOC: &str = "docs/marketplace.md";
const SCANNED: [&str; 4] = ["src", "state-machine/src", "state-machine/tests", "tests"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every file under `dir`, recursively, that is UTF-8 text.
fn text_files(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                found.push((path, text));
            }
        }
    }
    found.sort();
    found
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The ids a text cites: `P<1-2 digits>` as a whole word, and `§<n>(.<n>)*`.
///
/// Not citations: ISO 8601 durations (`P1M`, `P18M`, `P1Y` are not whole words; a bare
/// `"P1"` string literal is a duration under test), and sections of other documents
/// (`RFC 9110 §10.2.3`).
fn citations(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut ids = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let before = if i == 0 { None } else { Some(chars[i - 1]) };
        match chars[i] {
            'P' if !before.is_some_and(is_word) => {
                let digits: String = chars[i + 1..]
                    .iter()
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                let after = chars.get(i + 1 + digits.len()).copied();
                let quoted = before == Some('"') && after == Some('"');
                if (1..=2).contains(&digits.len()) && !after.is_some_and(is_word) && !quoted {
                    ids.push(format!("P{digits}"));
                }
            }
            '§' => {
                let mut end = i + 1;
                let mut id = String::from("§");
                loop {
                    let digits: String = chars[end..]
                        .iter()
                        .take_while(|c| c.is_ascii_digit())
                        .collect();
                    if digits.is_empty() {
                        break;
                    }
                    id.push_str(&digits);
                    end += digits.len();
                    if chars.get(end) == Some(&'.')
                        && chars.get(end + 1).is_some_and(char::is_ascii_digit)
                    {
                        id.push('.');
                        end += 1;
                    } else {
                        break;
                    }
                }
                let preceding: String = chars[..i].iter().collect();
                if id.len() > "§".len() && !cites_an_rfc(&preceding) {
                    ids.push(id);
                }
            }
            _ => {}
        }
        i += 1;
    }
    ids
}

/// Whether the text before a `§` ends with `RFC <number>`.
fn cites_an_rfc(preceding: &str) -> bool {
    let trimmed = preceding.trim_end();
    let number = trimmed.trim_end_matches(|c: char| c.is_ascii_digit());
    number.len() < trimmed.len() && number.trim_end().ends_with("RFC")
}

/// The ids `docs/marketplace.md` defines, each with how often.
fn definitions(doc: &str) -> BTreeMap<String, usize> {
    let mut defined = BTreeMap::new();
    for line in doc.lines() {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if !(2..=4).contains(&hashes) {
            continue;
        }
        let Some(rest) = line[hashes..].strip_prefix(' ') else {
            continue;
        };
        let token = rest.split_whitespace().next().unwrap_or_default();
        if let [id] = citations(token).as_slice()
            && id == token
        {
            *defined.entry(id.clone()).or_insert(0) += 1;
        }
    }
    defined
}

/// Sorts `§2` < `§10` and `P2` < `P10`.
fn sort_key(id: &str) -> (bool, Vec<u32>) {
    let numbers = id
        .trim_start_matches(['P', '§'])
        .split('.')
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    (id.starts_with('P'), numbers)
}

#[test]
fn the_citation_scanner_skips_durations_and_other_documents() {
    let text = "P11 and (P3–P5, §15.4). Term P1M, P18M, P1Y, PT10S; \"P1\" is a bad unit. \
                RFC 9110 §10.2.3, RFC 7515 §4.1.11, see §4.2. Also §1–§4; APP1 and P123 no.";
    assert_eq!(
        citations(text),
        ["P11", "P3", "P5", "§15.4", "§4.2", "§1", "§4"]
    );
}

#[test]
fn every_cited_marketplace_fact_is_defined_in_docs_marketplace_md() {
    let root = root();
    let doc = std::fs::read_to_string(root.join(DOC)).expect(DOC);
    let defined = definitions(&doc);

    let duplicates: Vec<_> = defined.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicates.is_empty(),
        "defined twice in {DOC}: {duplicates:?}"
    );

    let mut cited: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for dir in SCANNED {
        for (path, text) in text_files(&root.join(dir)) {
            let shown = path.strip_prefix(&root).unwrap().display().to_string();
            for (number, line) in text.lines().enumerate() {
                for id in citations(line) {
                    cited
                        .entry(id)
                        .or_default()
                        .insert(format!("{shown}:{}", number + 1));
                }
            }
        }
    }
    assert!(cited.len() > 50, "the scan found only {cited:?}");

    let mut missing: Vec<_> = cited
        .iter()
        .filter(|(id, _)| !defined.contains_key(*id))
        .collect();
    missing.sort_by_key(|(id, _)| sort_key(id));
    assert!(
        missing.is_empty(),
        "cited but not defined in {DOC} (add a heading `### <id> …` saying the fact in our \
         words, or fix the citation):\n{}",
        missing
            .iter()
            .map(|(id, at)| format!(
                "  {id}: {}",
                at.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn docs_marketplace_md_defines_every_pitfall_and_numbered_section_once() {
    let doc = std::fs::read_to_string(root().join(DOC)).expect(DOC);
    let defined = definitions(&doc);
    for n in 1..=28 {
        assert!(
            defined.contains_key(&format!("P{n}")),
            "P{n} is not defined"
        );
    }
    for n in 1..=15 {
        assert!(
            defined.contains_key(&format!("§{n}")),
            "§{n} is not defined"
        );
    }
}

#[test]
fn no_source_file_refers_to_the_outside_document() {
    // Spelled in two halves so that rewriting the name across the tree leaves this test alone.
    let outside = concat!("marketplace-api", ".md");
    let root = root();
    let mut mentions = Vec::new();
    for dir in SCANNED {
        for (path, text) in text_files(&root.join(dir)) {
            for (number, line) in text.lines().enumerate() {
                if line.contains(outside) {
                    let shown = path.strip_prefix(&root).unwrap().display();
                    mentions.push(format!("{shown}:{}", number + 1));
                }
            }
        }
    }
    assert!(
        mentions.is_empty(),
        "{outside} is not in the repository; cite {DOC} instead:\n  {}",
        mentions.join("\n  ")
    );
}
