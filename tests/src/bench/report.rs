//! The report: one entry per measurement, printed as a table and written as JSON.
use std::path::Path;

use serde_json::{Value, json};

pub struct Measurement {
    pub section: &'static str,
    pub name: String,
    pub unit: String,
    /// `None`: not measured (not applicable, or the measurement failed; see `note`).
    pub value: Option<f64>,
    /// Baseline name -> value, in the order given.
    pub baselines: Vec<(String, f64)>,
    /// `value / baseline` for the baseline the goal is about.
    pub ratio: Option<f64>,
    /// The goal as text, empty when the row has none.
    pub goal: String,
    /// `None` when the row has no goal (or was not measured).
    pub pass: Option<bool>,
    /// How the figure was obtained, and what was checked.
    pub note: String,
}

impl Measurement {
    pub fn new(section: &'static str, name: impl Into<String>, unit: &str, value: f64) -> Self {
        Self {
            section,
            name: name.into(),
            unit: unit.to_string(),
            value: value.is_finite().then_some(value),
            baselines: vec![],
            ratio: None,
            goal: String::new(),
            pass: None,
            note: String::new(),
        }
    }

    pub fn not_measured(section: &'static str, name: impl Into<String>, unit: &str) -> Self {
        Self::new(section, name, unit, f64::NAN)
    }

    pub fn baseline(mut self, name: impl Into<String>, value: f64) -> Self {
        if value.is_finite() {
            self.baselines.push((name.into(), value));
        }
        self
    }

    pub fn baseline_value(&self, name: &str) -> Option<f64> {
        self.baselines
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// Sets `ratio` to value / the named baseline.
    pub fn ratio_to(mut self, baseline: &str) -> Self {
        self.ratio = match (self.value, self.baseline_value(baseline)) {
            (Some(v), Some(b)) if b > 0.0 => Some(v / b),
            _ => None,
        };
        self
    }

    /// A goal and whether it is met; `pass` is left `None` when there is no value.
    pub fn goal(mut self, goal: impl Into<String>, pass: impl FnOnce(&Self) -> bool) -> Self {
        self.goal = goal.into();
        self.pass = self.value.is_some().then(|| pass(&self));
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        let note = note.into();
        if !self.note.is_empty() && !note.is_empty() {
            self.note.push_str("; ");
        }
        self.note.push_str(&note);
        self
    }

    pub fn to_json(&self) -> Value {
        let baselines: serde_json::Map<String, Value> = self
            .baselines
            .iter()
            .map(|(k, v)| (k.clone(), json!(round(*v))))
            .collect();
        json!({
            "name": self.name,
            "section": self.section,
            "unit": self.unit,
            "value": self.value.map(round),
            "baselines": baselines,
            "ratio": self.ratio.map(|r| (r * 1000.0).round() / 1000.0),
            "goal": self.goal,
            "pass": self.pass,
            "note": self.note,
        })
    }
}

fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        (v * 10.0).round() / 10.0
    } else {
        (v * 1000.0).round() / 1000.0
    }
}

/// A number for the table: three significant digits or so.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[derive(Default)]
pub struct Report {
    pub measurements: Vec<Measurement>,
    /// Free-form facts about the run (machine, program sizes, settings).
    pub info: serde_json::Map<String, Value>,
}

impl Report {
    pub fn push(&mut self, m: Measurement) {
        println!("{}", row(&m));
        self.measurements.push(m);
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "| {:<46} | {:>9} | {:<6} | {:<58} | {:>7} | {:<30} | {:<4} |\n",
            "measurement", "value", "unit", "baselines", "ratio", "goal", "pass"
        ));
        out.push_str(&format!(
            "|{}|{}|{}|{}|{}|{}|{}|\n",
            "-".repeat(48),
            "-".repeat(11),
            "-".repeat(8),
            "-".repeat(60),
            "-".repeat(9),
            "-".repeat(32),
            "-".repeat(6)
        ));
        for m in &self.measurements {
            out.push_str(&row(m));
            out.push('\n');
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let value = json!({
            "info": self.info,
            "measurements": self.measurements.iter().map(Measurement::to_json).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")?;
        Ok(())
    }
}

fn row(m: &Measurement) -> String {
    let baselines = m
        .baselines
        .iter()
        .map(|(k, v)| format!("{k} {}", fmt_num(*v)))
        .collect::<Vec<_>>()
        .join(", ");
    let pass = match m.pass {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    };
    format!(
        "| {:<46} | {:>9} | {:<6} | {:<58} | {:>7} | {:<30} | {:<4} |",
        m.name,
        m.value.map(fmt_num).unwrap_or_else(|| "n/a".into()),
        m.unit,
        baselines,
        m.ratio
            .map(|r| format!("{r:.2}x"))
            .unwrap_or_else(|| "-".into()),
        m.goal,
        pass
    )
}
