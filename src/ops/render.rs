//! Human output: tables wrapped to the terminal (comfy-table) and timestamps.
//!
//! A table fits the terminal's width when stdout is one (read by `console`), or `COLUMNS`
//! when set; piped output is not wrapped, so `grep` sees whole lines. Columns of ids (every
//! line a UUID) are never broken. No colour, ever: comfy-table without its `tty` feature
//! cannot style.

use comfy_table::{Cell, ColumnConstraint, ContentArrangement, presets};
use time::OffsetDateTime;
use time::macros::format_description;

/// A table with a header row; cells longer than a column's limit are cut with `…`.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<String>,
    limits: Vec<usize>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns named `headers`; `limits` caps their widths (0: no cap).
    pub fn new(headers: &[&str], limits: &[usize]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            limits: (0..headers.len())
                .map(|i| limits.get(i).copied().unwrap_or(0))
                .collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table wrapped to the output's width ([`output_width`]).
    pub fn render(&self) -> String {
        self.render_width(output_width())
    }

    /// The table wrapped to `width` columns (`None`: not wrapped).
    pub fn render_width(&self, width: Option<u16>) -> String {
        let cut = |i: usize, cell: &str| -> String {
            match self.limits.get(i) {
                Some(&limit) if limit > 0 => cell
                    .lines()
                    .map(|line| shorten(line, limit))
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => cell.to_string(),
            }
        };
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| row.iter().enumerate().map(|(i, c)| cut(i, c)).collect())
            .collect();
        let mut table = comfy_table::Table::new();
        table.load_style(presets::NOTHING);
        table.set_header(self.headers.iter().map(Cell::new));
        for row in &rows {
            table.add_row(row.iter().map(Cell::new));
        }
        if let Some(width) = width {
            table
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_width(width);
        }
        // Ids stay whole: a wrapped UUID cannot be pasted back.
        for (i, column) in table.column_iter_mut().enumerate() {
            let lines: Vec<&str> = rows
                .iter()
                .filter_map(|row| row.get(i))
                .flat_map(|cell| cell.lines())
                .collect();
            if !lines.is_empty() && lines.iter().all(|l| uuid::Uuid::parse_str(l).is_ok()) {
                column.set_constraint(ColumnConstraint::ContentWidth);
            }
        }
        let mut out: String = table
            .lines()
            .map(|line| {
                // NOTHING keeps one space of padding on each side.
                let line = line.strip_prefix(' ').unwrap_or(&line).trim_end();
                format!("{line}\n")
            })
            .collect();
        if out.is_empty() {
            out.push('\n');
        }
        out
    }
}

/// The width to wrap to: the terminal's when stdout is one, else `COLUMNS` when set.
pub fn output_width() -> Option<u16> {
    let term = console::Term::stdout();
    if let Some((_rows, columns)) = term.size_checked() {
        return Some(columns);
    }
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<u16>().ok())
        .filter(|c| *c >= 20)
}

/// `42s`, `5m`, `3h`, `2d`: how long ago or how long for (negative counts as 0).
pub fn age(duration: time::Duration) -> String {
    match duration.whole_seconds().max(0) {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `text` cut to at most `max` characters, ending with `…` when cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// `2026-03-01 12:00:05` (UTC).
pub fn when(at: OffsetDateTime) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_default()
}

/// `12:00:05.123` (UTC), for timelines within a day.
pub fn clock(at: OffsetDateTime) -> String {
    let format = format_description!("[hour]:[minute]:[second].[subsecond digits:3]");
    at.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_default()
}

/// `-` for nothing.
pub fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_and_long_cells_cut() {
        let mut table = Table::new(&["id", "reason"], &[0, 8]);
        table.row(vec!["a".into(), "short".into()]);
        table.row(vec!["bbbb".into(), "a very long reason".into()]);
        let text = table.render_width(None);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "id    reason");
        assert_eq!(lines[1], "a     short");
        assert_eq!(lines[2], "bbbb  a very …");
    }

    #[test]
    fn a_wide_table_fits_eighty_columns_and_keeps_its_ids_whole() {
        let id = uuid::Uuid::now_v7().to_string();
        let mut table = Table::new(&["SUBSCRIPTION", "PLAN", "STATE", "REASON"], &[]);
        for _ in 0..3 {
            table.row(vec![
                id.clone(),
                "contoso-analytics-silver-annual".into(),
                "PendingFulfillment".into(),
                "Microsoft answered 503 three times in a row; the next attempt is due in 5 minutes"
                    .into(),
            ]);
        }
        let wide = table.render_width(None);
        assert!(wide.lines().any(|l| l.chars().count() > 120), "{wide}");
        let narrow = table.render_width(Some(80));
        for line in narrow.lines() {
            assert!(
                line.chars().count() <= 80,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        assert!(
            narrow.lines().filter(|l| l.contains(&id)).count() == 3,
            "{narrow}"
        );
        assert!(narrow.contains("answered 503"), "{narrow}");
    }

    #[test]
    fn ages_read_in_the_largest_unit() {
        assert_eq!(age(time::Duration::seconds(42)), "42s");
        assert_eq!(age(time::Duration::seconds(-3)), "0s");
        assert_eq!(age(time::Duration::minutes(90)), "1h");
        assert_eq!(age(time::Duration::days(3)), "3d");
    }
}
