//! The walk over the merged configuration tree: a [`Reader`] per table takes keys with their defaults
//! and limits, records every problem with its key and the file it came from, and reports the keys
//! nobody read as unknown.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use config::{Value, ValueKind};

/// A table being read: tracks which keys were used and records problems.
pub(super) struct Reader<'a> {
    path: String,
    pub(super) table: config::Map<String, Value>,
    used: BTreeSet<String>,
    pub(super) problems: &'a mut Vec<String>,
    default_origin: &'a str,
}

pub(super) fn origin_of(v: &Value, default_origin: &str) -> String {
    match v.origin() {
        // The config crate names a file relative to the working directory: under systemd or dpkg that
        // is /, and "etc/offload-agent/conf.d/x.toml" would send an operator looking in the wrong place.
        Some(o) if o.ends_with(".toml") && std::path::Path::new(o).is_relative() => {
            match std::env::current_dir() {
                Ok(cwd) => cwd.join(o).display().to_string(),
                Err(_) => o.to_string(),
            }
        }
        Some(o) => o.to_string(),
        None => format!("the environment or {default_origin}"),
    }
}

impl<'a> Reader<'a> {
    pub(super) fn new(
        path: &str,
        table: config::Map<String, Value>,
        problems: &'a mut Vec<String>,
        default_origin: &'a str,
    ) -> Self {
        Reader {
            path: path.to_string(),
            table,
            used: BTreeSet::new(),
            problems,
            default_origin,
        }
    }

    pub(super) fn key(&self, k: &str) -> String {
        if k.is_empty() {
            self.path.clone()
        } else if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{}", self.path, k)
        }
    }

    pub(super) fn take(&mut self, k: &str) -> Option<Value> {
        self.used.insert(k.to_string());
        match self.table.get(k) {
            Some(v) if matches!(v.kind, ValueKind::Nil) => None,
            Some(v) => Some(v.clone()),
            None => None,
        }
    }

    pub(super) fn problem(&mut self, k: &str, v: Option<&Value>, msg: impl fmt::Display) {
        let origin = match v {
            Some(v) => origin_of(v, self.default_origin),
            None => self.default_origin.to_string(),
        };
        let key = self.key(k);
        self.problems.push(format!("{key} (in {origin}): {msg}"));
    }

    pub(super) fn opt_string(&mut self, k: &str) -> Option<String> {
        let v = self.take(k)?;
        match &v.kind {
            ValueKind::String(s) => Some(s.clone()),
            _ => {
                self.problem(k, Some(&v), "expected a string");
                None
            }
        }
    }

    pub(super) fn string(&mut self, k: &str, default: &str) -> String {
        self.opt_string(k).unwrap_or_else(|| default.to_string())
    }

    /// A path: a string, `default` when absent.
    pub(super) fn path(&mut self, k: &str, default: &std::path::Path) -> std::path::PathBuf {
        self.opt_string(k)
            .map_or_else(|| default.to_path_buf(), std::path::PathBuf::from)
    }

    pub(super) fn required_string(&mut self, k: &str, what: &str) -> String {
        match self.opt_string(k) {
            Some(s) if !s.is_empty() => s,
            Some(_) => {
                self.invalid(k, format!("must not be empty ({what})"));
                String::new()
            }
            None => {
                if !self.table.contains_key(k) {
                    let key = self.key(k);
                    let origin = self.default_origin.to_string();
                    self.problems
                        .push(format!("{key} (in {origin}): missing; required ({what})"));
                }
                String::new()
            }
        }
    }

    pub(super) fn boolean(&mut self, k: &str, default: bool) -> bool {
        let Some(v) = self.take(k) else {
            return default;
        };
        match v.clone().into_bool() {
            Ok(b) => b,
            Err(_) => {
                self.problem(k, Some(&v), "expected true or false");
                default
            }
        }
    }

    pub(super) fn uint(&mut self, k: &str, default: u64, min: u64, max: u64) -> u64 {
        let Some(v) = self.take(k) else {
            return default;
        };
        match v.clone().into_int() {
            Ok(n) if n >= min as i64 && n <= max as i64 => n as u64,
            Ok(n) => {
                self.problem(
                    k,
                    Some(&v),
                    format!("{n} is out of range (allowed {min} to {max})"),
                );
                default
            }
            Err(_) => {
                self.problem(k, Some(&v), "expected a whole number");
                default
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        k: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(v) = self.take(k) else {
            return default;
        };
        let text = match &v.kind {
            ValueKind::String(s) => s.clone(),
            _ => {
                self.problem(
                    k,
                    Some(&v),
                    "expected a duration string such as \"30s\" or \"5m\"",
                );
                return default;
            }
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d >= min && d <= max => d,
            Ok(_) => {
                self.problem(
                    k,
                    Some(&v),
                    format!(
                        "\"{text}\" is out of range (allowed {} to {})",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Err(e) => {
                self.problem(
                    k,
                    Some(&v),
                    format!(
                        "\"{text}\" is not a duration ({e}); write e.g. \"30s\", \"5m\", \"1h\""
                    ),
                );
                default
            }
        }
    }

    pub(super) fn float(&mut self, k: &str, min: f64, max: f64) -> Option<f64> {
        let v = self.take(k)?;
        match v.clone().into_float() {
            Ok(n) if n >= min && n <= max => Some(n),
            Ok(n) => {
                self.problem(
                    k,
                    Some(&v),
                    format!("{n} is out of range (allowed {min} to {max})"),
                );
                None
            }
            Err(_) => {
                self.problem(k, Some(&v), "expected a number");
                None
            }
        }
    }

    pub(super) fn string_list(&mut self, k: &str) -> Vec<String> {
        let Some(v) = self.take(k) else {
            return Vec::new();
        };
        let items = match v.clone().into_array() {
            Ok(items) => items,
            Err(_) => {
                self.problem(
                    k,
                    Some(&v),
                    "expected a list of strings, e.g. [\"--in\", \"{input}\"]",
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match &item.kind {
                ValueKind::String(s) => out.push(s.clone()),
                _ => {
                    self.problem(k, Some(&v), "every element must be a string");
                    return Vec::new();
                }
            }
        }
        out
    }

    pub(super) fn int_list(&mut self, k: &str, min: i64, max: i64) -> Vec<i64> {
        let Some(v) = self.take(k) else {
            return Vec::new();
        };
        let Ok(items) = v.clone().into_array() else {
            self.problem(k, Some(&v), "expected a list of whole numbers, e.g. [2, 3]");
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item.into_int() {
                Ok(n) if (min..=max).contains(&n) => out.push(n),
                _ => {
                    self.problem(
                        k,
                        Some(&v),
                        format!("every element must be a whole number from {min} to {max}"),
                    );
                    return Vec::new();
                }
            }
        }
        out
    }

    pub(super) fn table(&mut self, k: &str) -> config::Map<String, Value> {
        let Some(v) = self.take(k) else {
            return config::Map::new();
        };
        match v.kind {
            ValueKind::Table(t) => t,
            _ => {
                self.invalid(k, "expected a table");
                config::Map::new()
            }
        }
    }

    /// Report keys present in the table that nothing read.
    pub(super) fn finish(self) {
        for (k, v) in &self.table {
            if !self.used.contains(k) {
                let key = self.key(k);
                let origin = origin_of(v, self.default_origin);
                self.problems.push(format!(
                    "{key} (in {origin}): unknown key; see config/agent.toml for the keys that exist"
                ));
            }
        }
    }
}

impl Reader<'_> {
    /// The file (or layers) values without an origin of their own are reported against.
    pub(super) fn default_origin(&self) -> &str {
        self.default_origin
    }

    /// Report a problem with the value of `k` as this table holds it.
    pub(super) fn invalid(&mut self, k: &str, msg: impl fmt::Display) {
        let v = self.table.get(k).cloned();
        self.problem(k, v.as_ref(), msg);
    }

    /// `k` as a sub-table read by `read` (which need not finish it).
    pub(super) fn section<T>(&mut self, k: &str, read: impl FnOnce(&mut Reader<'_>) -> T) -> T {
        let table = self.table(k);
        let path = self.key(k);
        let mut sub = Reader::new(&path, table, self.problems, self.default_origin);
        let value = read(&mut sub);
        sub.finish();
        value
    }
}
