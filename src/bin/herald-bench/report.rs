//! Results: an ordered list of named values printed as a table for people or as one JSON object
//! for scripts, plus the progress line on stderr while a run goes on.

use std::io::Write;

use serde_json::{Map, Value, json};

use crate::hist::Histogram;

/// The results of one run, in the order they are printed.
#[derive(Debug, Default)]
pub struct Report {
    fields: Vec<(String, Value)>,
    notes: Vec<String>,
}

impl Report {
    /// An empty report for `mode`.
    pub fn new(mode: &str) -> Self {
        let mut report = Self::default();
        report.set("mode", mode);
        report
    }

    /// Sets (or appends) the field `key`.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        let value = value.into();
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((key.to_string(), value)),
        }
    }

    /// Sets `key` to `value` rounded to `digits` decimals (finite values only; else null).
    pub fn set_f(&mut self, key: &str, value: f64, digits: i32) {
        let scale = 10f64.powi(digits);
        let value = if !value.is_finite() {
            Value::Null
        } else if digits <= 0 {
            json!(value.round() as i64)
        } else {
            json!((value * scale).round() / scale)
        };
        self.set(key, value);
    }

    /// Adds a human-readable note (also in the JSON, under `notes`).
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Adds `latency_ms` with count, mean, p50, p90, p99, p999 and max in milliseconds.
    pub fn latency(&mut self, key: &str, hist: &Histogram) {
        let ms = |ns: u64| (ns as f64 / 1e6 * 1000.0).round() / 1000.0;
        self.set(
            key,
            json!({
                "count": hist.count(),
                "mean": ms(hist.mean() as u64),
                "p50": ms(hist.quantile(0.50)),
                "p90": ms(hist.quantile(0.90)),
                "p99": ms(hist.quantile(0.99)),
                "p999": ms(hist.quantile(0.999)),
                "max": ms(hist.max()),
            }),
        );
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (key, value) in &self.fields {
            map.insert(key.clone(), value.clone());
        }
        map.insert("notes".into(), json!(self.notes));
        Value::Object(map)
    }

    /// Prints the report to stdout, as JSON (one line) or as a table.
    pub fn print(&self, as_json: bool) {
        let mut out = std::io::stdout().lock();
        if as_json {
            let _ = writeln!(out, "{}", self.to_json());
            return;
        }
        let width = self.fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in &self.fields {
            let shown = match value {
                Value::String(s) => s.clone(),
                Value::Object(map) => map
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join("  "),
                other => other.to_string(),
            };
            let _ = writeln!(out, "{key:<width$}  {shown}");
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
    }
}

/// Rewrites the progress line on stderr (no newline) unless `quiet`.
pub fn progress(quiet: bool, line: &str) {
    if !quiet {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{line}");
        let _ = err.flush();
    }
}

/// Ends the progress line unless `quiet`.
pub fn progress_done(quiet: bool) {
    if !quiet {
        eprintln!();
    }
}

/// `n` with a k/M suffix, for the progress line.
pub fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}
