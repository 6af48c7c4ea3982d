//! `TURNPIKE_*` environment overrides, applied to the parsed TOML table
//! before it is read, so they go through exactly the same checks as the
//! file.

use toml::{Table, Value};

use crate::reader::Errs;
use crate::schema::{ValueKind, ENV_CONFIG_PATH, ENV_PREFIX, SCHEMA};

/// Writes every override into `table` (creating sections, and nested
/// tables such as `[relay.tls]`, as needed) and
/// records errors for unknown `TURNPIKE_*` names and values that cannot
/// even be turned into the right TOML type. Variables without the prefix
/// are ignored. If the same variable appears twice, the last one wins.
pub(crate) fn apply(table: &mut Table, env: &[(String, String)], errs: &mut Errs) {
    for (name, value) in env {
        if !name.starts_with(ENV_PREFIX) || name == ENV_CONFIG_PATH {
            continue;
        }
        let Some(key) = SCHEMA.iter().find(|k| k.env_var() == *name) else {
            errs.push_raw(format!("env {name}"), "unknown environment variable");
            continue;
        };
        let value = match key.kind {
            ValueKind::String | ValueKind::Duration => Value::String(value.clone()),
            ValueKind::Integer => match value.trim().parse::<i64>() {
                Ok(n) => Value::Integer(n),
                Err(_) => {
                    errs.push_raw(
                        format!("env {name}"),
                        format!("expected an integer, got {value:?}"),
                    );
                    continue;
                }
            },
            // NamedSecrets items stay strings: the reader takes an item
            // written as "NAME:SECRET" just like one in a file.
            ValueKind::List | ValueKind::StringOrList | ValueKind::NamedSecrets => Value::Array(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(|item| Value::String(item.to_string()))
                    .collect(),
            ),
        };
        // A section that is not a table is reported when it is read; the
        // override has nowhere to go.
        if let Some(section) = section_mut(table, key.section) {
            section.insert(key.name.to_string(), value);
            errs.set_env_origin(key.path(), name.clone());
        }
    }
}

/// The table at a dotted section path (`relay.tls`), created (with its
/// parents) if absent; `None` if something on the way is not a table.
fn section_mut<'t>(table: &'t mut Table, section: &str) -> Option<&'t mut Table> {
    let mut table = table;
    for part in section.split('.') {
        match table
            .entry(part)
            .or_insert_with(|| Value::Table(Table::new()))
        {
            Value::Table(t) => table = t,
            _ => return None,
        }
    }
    Some(table)
}
