//! Overrides: a base job plus `{"optimizer.lr": 0.1, "batch_size": 64}`
//! gives one trial's job. Paths are the job's TOML keys joined by dots;
//! tables the base leaves out (`[optimizer]`) are created, and a path the
//! job schema lacks is an error that names it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{FieldError, FieldPath, SpecError};
use crate::job::JobSpec;

/// The job `base` describes once every override is set, validated.
/// `origin` names the job in errors (the values come from no file, so
/// errors carry no line).
pub fn with_overrides(
    base: &toml::Table,
    overrides: &BTreeMap<String, Value>,
    origin: &str,
) -> Result<JobSpec, SpecError> {
    apply_overrides(base, overrides).map_err(|e| e.unplaced(origin))
}

/// [`with_overrides`] before the error is placed: a caller that knows
/// where each override was written (a sweep file) places it there.
pub fn apply_overrides(
    base: &toml::Table,
    overrides: &BTreeMap<String, Value>,
) -> Result<JobSpec, FieldError> {
    let mut table = base.clone();
    for (path, value) in overrides {
        set(&mut table, path, value)?;
    }
    JobSpec::from_table(&table).map_err(|e| {
        match overrides.keys().find(|p| blames_override(&e, p)) {
            Some(path) => missing_path(path),
            None => e,
        }
    })
}

/// Whether `error` means that override `path` names no field of the job:
/// deny_unknown_fields rejected (a prefix of) it, or a table was created
/// on the way to it where the job has a plain value.
fn blames_override(error: &FieldError, path: &str) -> bool {
    let path = FieldPath::parse_dotted(path);
    !error.path.0.is_empty()
        && path.starts_with(&error.path)
        && (error.message.starts_with("unknown field")
            || (path != error.path && error.message.starts_with("invalid type: map")))
}

fn missing_path(path: &str) -> FieldError {
    FieldError {
        path: FieldPath::parse_dotted(path),
        message: format!("override path `{path}` does not exist in the job"),
    }
}

/// Sets the dotted `path` in `table`, creating missing tables on the way.
fn set(table: &mut toml::Table, path: &str, value: &Value) -> Result<(), FieldError> {
    let keys = FieldPath::parse_dotted(path);
    let value = toml::Value::try_from(value).map_err(|e| FieldError {
        path: keys.clone(),
        message: format!("override value {value} has no TOML form: {e}"),
    })?;
    let (last, parents) = keys.0.split_last().ok_or_else(|| missing_path(path))?;
    let mut table = table;
    for key in parents {
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| missing_path(path))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::ModelSpec;

    fn base() -> toml::Table {
        r#"
name = "base"
epochs = 1
[dataset]
format = "idx"
classes = 10
train = { images = "i.gz", labels = "l.gz" }
[model]
kind = "cnn"
"#
        .parse()
        .unwrap()
    }

    fn overrides(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn overrides_set_fields_and_create_tables_the_base_omits() {
        let job = with_overrides(
            &base(),
            &overrides(&[
                ("optimizer.lr", Value::from(0.2)),
                ("batch_size", Value::from(128)),
                ("model.channels", serde_json::json!([16, 32])),
            ]),
            "trial 3",
        )
        .unwrap();
        assert_eq!(job.optimizer.lr, 0.2);
        assert_eq!(job.batch_size, 128);
        assert!(matches!(
            job.model,
            ModelSpec::Cnn {
                channels: [16, 32],
                ..
            }
        ));
    }

    #[test]
    fn a_path_outside_the_schema_is_named() {
        for path in ["optimizer.lrr", "nonsense.deep.path", "optimizer.lr.x"] {
            let err = with_overrides(&base(), &overrides(&[(path, Value::from(1))]), "trial 3")
                .unwrap_err()
                .to_string();
            assert_eq!(
                err,
                format!("trial 3: {path}: override path `{path}` does not exist in the job")
            );
        }
    }

    #[test]
    fn overridden_values_are_validated() {
        let err = with_overrides(
            &base(),
            &overrides(&[("optimizer.momentum", Value::from(1.5))]),
            "trial 3",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("trial 3: optimizer.momentum: must lie in [0, 1]"),
            "{err}"
        );
        let err = with_overrides(
            &base(),
            &overrides(&[("batch_size", Value::from(0.5))]),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("t: batch_size: invalid type"), "{err}");
    }
}
