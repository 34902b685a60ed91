//! How the CLI prints: tables for people, JSON for scripts.

use serde::Serialize;
use serde_json::Value;

/// How results are printed.
#[derive(Clone, Copy)]
pub enum Output {
    /// Human tables.
    Table,
    /// JSON, for scripts.
    Json,
}

/// Pretty-printed JSON.
pub fn print_json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Columns padded to their widest cell.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// A JSON value as a table cell: `-` for null, strings without quotes.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// An optional field as a table cell.
pub fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

/// A record: JSON, or one `key value` line per field.
pub fn show_record(output: Output, record: &impl Serialize) {
    match output {
        Output::Json => print_json(record),
        Output::Table => {
            if let Ok(Value::Object(fields)) = serde_json::to_value(record) {
                for (key, value) in fields {
                    println!("{key:<10} {}", text(&value));
                }
            }
        }
    }
}
