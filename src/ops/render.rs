//! Human output: aligned text tables (no dependency: the columns are few) and timestamps.

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

    pub fn render(&self) -> String {
        let cut = |i: usize, cell: &str| -> String {
            let cell = cell.replace('\n', " ");
            match self.limits.get(i) {
                Some(&limit) if limit > 0 => shorten(&cell, limit),
                _ => cell,
            }
        };
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| row.iter().enumerate().map(|(i, c)| cut(i, c)).collect())
            .collect();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let line = |cells: &[String]| -> String {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let last = i + 1 == cells.len();
                out.push_str(cell);
                if !last {
                    let pad =
                        widths.get(i).copied().unwrap_or(0) - cell.chars().count().min(widths[i]);
                    out.push_str(&" ".repeat(pad + 2));
                }
            }
            out.trim_end().to_string()
        };
        let mut out = line(&self.headers);
        out.push('\n');
        for row in &rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
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
        let text = table.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "id    reason");
        assert_eq!(lines[1], "a     short");
        assert_eq!(lines[2], "bbbb  a very …");
    }
}
