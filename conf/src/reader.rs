//! A small reader over one TOML table that records every error and every
//! key it consumed, and keeps going after a bad value.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use toml::{Table, Value};

use crate::schema::SCHEMA;
use crate::ConfigError;

/// A value was present but bad; the error has already been recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Invalid;

/// `Ok(None)`: the key is absent. `Ok(Some(v))`: present and valid.
/// `Err(Invalid)`: present and bad (already reported).
pub(crate) type Field<T> = Result<Option<T>, Invalid>;

/// The errors found so far, plus which keys came from the environment so
/// that their errors name the variable rather than a file path.
#[derive(Debug, Default)]
pub(crate) struct Errs {
    pub(crate) list: Vec<ConfigError>,
    /// `relay.user-quota` → `TURNPIKE_RELAY_USER_QUOTA`.
    env_origin: HashMap<String, String>,
}

impl Errs {
    /// Records an error at a dotted path (`relay.listen[1]`). If the key was
    /// set by an environment variable, the path becomes `env VAR[1]`.
    pub(crate) fn push(&mut self, path: &str, message: impl Into<String>) {
        let path = self.name(path);
        self.push_raw(path, message);
    }

    /// How to name a dotted path in a message: `env VAR[1]` if the key was
    /// set by an environment variable, else the path itself.
    pub(crate) fn name(&self, path: &str) -> String {
        let (key, rest) = path.split_at(path.find('[').unwrap_or(path.len()));
        match self.env_origin.get(key) {
            Some(var) => format!("env {var}{rest}"),
            None => path.to_string(),
        }
    }

    /// Records an error at exactly this path.
    pub(crate) fn push_raw(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Notes that `path` now holds the value of environment variable `var`.
    pub(crate) fn set_env_origin(&mut self, path: String, var: String) {
        self.env_origin.insert(path, var);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// "a string", "an integer", … for "expected X, got Y" messages.
pub(crate) fn describe(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// Reads the keys of one table (`section` is `""` for the top level).
pub(crate) struct Reader<'t, 'e> {
    /// The dotted path of the table: a section (`relay.tls`) or an item of
    /// an array of tables (`control.apps[1]`).
    section: Cow<'static, str>,
    /// Whether the keys read must be in [`SCHEMA`]: true for sections,
    /// false for items of an array of tables, whose keys the schema
    /// describes through the array key's [`crate::ValueKind`].
    in_schema: bool,
    table: &'t Table,
    used: BTreeSet<&'static str>,
    errs: &'e mut Errs,
}

impl<'t, 'e> Reader<'t, 'e> {
    /// A reader for a section (or the top level, `""`).
    pub(crate) fn new(section: &'static str, table: &'t Table, errs: &'e mut Errs) -> Self {
        Reader {
            section: Cow::Borrowed(section),
            in_schema: true,
            table,
            used: BTreeSet::new(),
            errs,
        }
    }

    /// A reader for one table inside an array (`path` like
    /// `control.apps[1]`); its keys are not schema keys.
    pub(crate) fn item(path: String, table: &'t Table, errs: &'e mut Errs) -> Self {
        Reader {
            section: Cow::Owned(path),
            in_schema: false,
            table,
            used: BTreeSet::new(),
            errs,
        }
    }

    /// The dotted path of `key` in this table.
    pub(crate) fn path(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.section)
        }
    }

    /// Records an error at `key` (or at `key[i]`: pass the suffix in `key`).
    pub(crate) fn error(&mut self, key: &str, message: impl Into<String>) {
        let path = self.path(key);
        self.errs.push(&path, message);
    }

    /// How to name `key` (or `key[i]`) of this table in a message about
    /// another key: its dotted path, or `env VAR[i]` if it came from the
    /// environment.
    pub(crate) fn name(&self, key: &str) -> String {
        self.errs.name(&self.path(key))
    }

    /// The errors, for reading a nested table with its own [`Reader`].
    pub(crate) fn errs(&mut self) -> &mut Errs {
        self.errs
    }

    fn take(&mut self, key: &'static str) -> Option<&'t Value> {
        debug_assert!(
            !self.in_schema
                || self.section.is_empty()
                || SCHEMA.iter().any(|k| {
                    (k.section == self.section && k.name == key) || k.section == self.path(key)
                }),
            "{}.{key} is read but missing from schema::SCHEMA",
            self.section
        );
        self.used.insert(key);
        self.table.get(key)
    }

    /// A sub-table (a section). Absent sections read as `Ok(None)`.
    pub(crate) fn table(&mut self, key: &'static str) -> Field<&'t Table> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Table(t)) => Ok(Some(t)),
            Some(v) => {
                self.error(key, format!("expected a table, got {}", describe(v)));
                Err(Invalid)
            }
        }
    }

    /// A string, parsed by `parse`; `what` describes the expected form for
    /// the wrong-type message ("expected {what}, got an integer").
    pub(crate) fn parse<T>(
        &mut self,
        key: &'static str,
        what: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Field<T> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => match parse(s) {
                Ok(v) => Ok(Some(v)),
                Err(message) => {
                    self.error(key, message);
                    Err(Invalid)
                }
            },
            Some(v) => {
                self.error(key, format!("expected {what}, got {}", describe(v)));
                Err(Invalid)
            }
        }
    }

    /// An integer in `min..=max`.
    pub(crate) fn integer<T>(&mut self, key: &'static str, min: T, max: T) -> Field<T>
    where
        T: Copy + Into<i64> + TryFrom<i64>,
    {
        let n = match self.take(key) {
            None => return Ok(None),
            Some(Value::Integer(n)) => *n,
            Some(v) => {
                self.error(key, format!("expected an integer, got {}", describe(v)));
                return Err(Invalid);
            }
        };
        let message = if n < min.into() {
            format!("must be at least {}, got {n}", min.into())
        } else if n > max.into() {
            format!("must be at most {}, got {n}", max.into())
        } else if let Ok(v) = T::try_from(n) {
            return Ok(Some(v));
        } else {
            format!("out of range, got {n}")
        };
        self.error(key, message);
        Err(Invalid)
    }

    /// A duration written like "30s", "10m", "1h", in `min..=max`.
    pub(crate) fn duration(
        &mut self,
        key: &'static str,
        min: Duration,
        max: Duration,
    ) -> Field<Duration> {
        self.parse(key, r#"a duration like "30s""#, |s| {
            let d = humantime::parse_duration(s).map_err(|e| {
                format!(r#"expected a duration like "30s", "10m" or "1h", got {s:?} ({e})"#)
            })?;
            let show = |d: Duration| humantime::format_duration(d).to_string();
            if d < min {
                Err(format!("must be at least {}, got {s:?}", show(min)))
            } else if d > max {
                Err(format!("must be at most {}, got {s:?}", show(max)))
            } else {
                Ok(d)
            }
        })
    }

    /// An array of strings, each parsed by `parse`. Every bad element is
    /// reported at `key[i]`; the whole field is `Invalid` if any was bad.
    pub(crate) fn list<T>(
        &mut self,
        key: &'static str,
        mut parse: impl FnMut(&str) -> Result<T, String>,
    ) -> Field<Vec<T>> {
        let items = match self.take(key) {
            None => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(v) => {
                self.error(
                    key,
                    format!("expected an array of strings, got {}", describe(v)),
                );
                return Err(Invalid);
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut bad = false;
        for (i, item) in items.iter().enumerate() {
            let parsed = match item {
                Value::String(s) => parse(s),
                v => Err(format!("expected a string, got {}", describe(v))),
            };
            match parsed {
                Ok(v) => out.push(v),
                Err(message) => {
                    bad = true;
                    self.error(&format!("{key}[{i}]"), message);
                }
            }
        }
        if bad {
            Err(Invalid)
        } else {
            Ok(Some(out))
        }
    }

    /// An array whose items may be of any type: `item` reads each one,
    /// given the errors, the item's dotted path (`control.apps[1]`) and the
    /// value, and records its own errors. `what` describes the expected
    /// form for the wrong-type message. The whole field is `Invalid` if any
    /// item was.
    pub(crate) fn array<T>(
        &mut self,
        key: &'static str,
        what: &str,
        mut item: impl FnMut(&mut Errs, &str, &'t Value) -> Result<T, Invalid>,
    ) -> Field<Vec<T>> {
        let items = match self.take(key) {
            None => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(v) => {
                self.error(key, format!("expected {what}, got {}", describe(v)));
                return Err(Invalid);
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut bad = false;
        for (i, value) in items.iter().enumerate() {
            let path = self.path(&format!("{key}[{i}]"));
            match item(self.errs, &path, value) {
                Ok(v) => out.push(v),
                Err(Invalid) => bad = true,
            }
        }
        if bad {
            Err(Invalid)
        } else {
            Ok(Some(out))
        }
    }

    /// One string or an array of strings, each parsed by `parse`: a list of
    /// one, or of any length. `what` describes the expected form for the
    /// wrong-type message. Bad elements are reported at `key` (a string) or
    /// `key[i]` (an array); the whole field is `Invalid` if any was bad.
    pub(crate) fn string_or_list<T>(
        &mut self,
        key: &'static str,
        what: &str,
        mut parse: impl FnMut(&str) -> Result<T, String>,
    ) -> Field<Vec<T>> {
        match self.table.get(key) {
            Some(Value::String(_)) => self.parse(key, what, parse).map(|v| v.map(|v| vec![v])),
            Some(Value::Array(_)) => self.list(key, &mut parse),
            None => {
                self.take(key);
                Ok(None)
            }
            Some(v) => {
                self.take(key);
                self.error(
                    key,
                    format!("expected {what} or an array of them, got {}", describe(v)),
                );
                Err(Invalid)
            }
        }
    }

    /// Turns an absent key into a "required" error.
    pub(crate) fn required<T>(
        &mut self,
        key: &str,
        field: Field<T>,
        message: &str,
    ) -> Result<T, Invalid> {
        match field {
            Ok(Some(v)) => Ok(v),
            Ok(None) => {
                self.error(key, message);
                Err(Invalid)
            }
            Err(Invalid) => Err(Invalid),
        }
    }

    /// Reports every key of the table that was never read as unknown.
    pub(crate) fn finish(&mut self) {
        let unknown: Vec<String> = self
            .table
            .keys()
            .filter(|k| !self.used.contains(k.as_str()))
            .map(|k| self.path(k))
            .collect();
        for path in unknown {
            self.errs.push(&path, "unknown key");
        }
    }
}
