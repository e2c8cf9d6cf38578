//! CSV data preparation (`dataset.csv`) through the worker's reader:
//! fill values and categories come from the training examples only, a
//! poisoned test split moves nothing, and bad cells or columns are errors
//! naming the file, line and column.

use std::path::Path;

use ringleader_spec::job::DatasetSpec;
use ringleader_worker::confine::{PathRoots, RootKind};
use ringleader_worker::train::dataset::{load, normalize, prepare_csv, statistics, Dataset, Files};
use ringleader_worker::train::prepare::FittedColumn;
use serde_json::{json, Value};

/// Data roots over the temp dirs the tests write their files to.
fn temp_roots() -> PathRoots {
    PathRoots::new(RootKind::Data, [std::env::temp_dir()]).unwrap()
}

fn spec(train: &Path, test: Option<&Path>, extra: Value) -> DatasetSpec {
    let mut dataset = json!({"format": "csv", "classes": 2, "train": {"files": [train]}});
    if let Some(test) = test {
        dataset["test"] = json!({"files": [test]});
    }
    dataset
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(dataset).unwrap()
}

/// Loads, fits and encodes, then standardises, as a worker does.
fn prepared(spec: &DatasetSpec) -> Result<Dataset, String> {
    let mut data = load(spec, &temp_roots(), Files::All, Files::All).map_err(|e| e.to_string())?;
    prepare_csv(&mut data).map_err(|e| e.to_string())?;
    let stats = statistics(&spec.normalize, &data.train).unwrap();
    normalize(&spec.normalize, stats.as_ref().map(|(s, _)| s), &mut data).unwrap();
    Ok(data)
}

fn rows(t: &tch::Tensor) -> Vec<Vec<f32>> {
    Vec::<Vec<f32>>::try_from(t).unwrap()
}

const TRAIN: &str = "size,colour,weight,label\n\
                     1,red,10,0\n\
                     3,blue,NA,1\n\
                     ,red,30,0\n\
                     5,green,20,1\n\
                     7,red,n/a,0\n";

#[test]
fn a_poisoned_test_split_moves_neither_fill_values_nor_categories_nor_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.csv");
    std::fs::write(&train, TRAIN).unwrap();
    // Extreme values, a category only here, missing cells.
    let test = dir.path().join("test.csv");
    std::fs::write(
        &test,
        "size,colour,weight,label\n1e30,purple,-1e30,0\nNA,red,NaN,1\n2,,5,0\n",
    )
    .unwrap();
    let csv = json!({"csv": {"missing": "median", "categorical": ["colour"]}});
    let with_test = spec(&train, Some(&test), csv.clone());
    let raw = {
        let mut data = load(&with_test, &temp_roots(), Files::All, Files::All).unwrap();
        prepare_csv(&mut data).unwrap();
        data
    };
    let fit = raw.preparation.csv.as_ref().unwrap();
    let fills: Vec<String> = fit
        .columns
        .iter()
        .map(|c| match c {
            FittedColumn::Numeric { fill, .. } => format!("{fill:?}"),
            FittedColumn::Categorical {
                categories, fill, ..
            } => format!("{categories:?} {fill}"),
        })
        .collect();
    // size: median of 1 3 5 7 (the lower middle); weight: of 10 30 20.
    assert_eq!(
        fills,
        [
            "Some(3.0)",
            "[\"blue\", \"green\", \"red\"] red",
            "Some(20.0)"
        ]
    );
    assert_eq!(
        rows(&raw.test.as_ref().unwrap().features),
        [
            vec![1e30, 0.0, 0.0, 0.0, -1e30], // purple: all zeros
            vec![3.0, 0.0, 0.0, 1.0, 20.0],   // missing: the training fills
            vec![2.0, 0.0, 0.0, 1.0, 5.0],    // missing colour: red
        ]
    );

    let extra = json!({"normalize": {"kind": "standard"}});
    let mut poisoned = with_test.clone();
    poisoned.normalize = serde_json::from_value(extra["normalize"].clone()).unwrap();
    let mut alone = spec(&train, None, csv);
    alone.normalize = poisoned.normalize.clone();
    let (poisoned, alone) = (prepared(&poisoned).unwrap(), prepared(&alone).unwrap());
    assert_eq!(
        serde_json::to_value(&poisoned.preparation).unwrap(),
        serde_json::to_value(&alone.preparation).unwrap(),
        "the test split changes nothing fitted"
    );
    assert_eq!(rows(&poisoned.train.features), rows(&alone.train.features));
    let recorded = serde_json::to_value(&alone.preparation).unwrap();
    assert_eq!(recorded["normalize"]["kind"], "standard");
    assert_eq!(recorded["normalize"]["shift"].as_array().unwrap().len(), 5);
    assert_eq!(recorded["csv"]["columns"][1]["name"], "colour");
}

#[test]
fn missing_and_bad_cells_name_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.csv");
    std::fs::write(&train, TRAIN).unwrap();
    let path = train.display().to_string();
    for (extra, expected) in [
        (
            json!({"csv": {"categorical": [1]}}),
            format!("{path}:3:3: expected a number in column 3 (feature), found a missing value"),
        ),
        (
            json!({"csv": {"categorical": ["shade"], "missing": "mean"}}),
            format!("dataset.csv.categorical: no column \"shade\" in {path} (4 columns)"),
        ),
        (
            json!({"csv": {"categorical": [-1], "missing": "mean"}}),
            format!("dataset.csv.categorical: column -1 of {path} is the label column"),
        ),
    ] {
        let error = prepared(&spec(&train, None, extra.clone())).unwrap_err();
        assert!(
            error.contains(&expected),
            "{extra}: {error}\nexpected {expected}"
        );
    }

    // A categorical cell left empty, a numeric column all missing.
    let gaps = dir.path().join("gaps.csv");
    std::fs::write(&gaps, "a,colour,label\nNA,red,0\nnull,,1\n").unwrap();
    let gaps_path = gaps.display().to_string();
    for (extra, expected) in [
        (
            json!({"csv": {"categorical": ["colour"]}}),
            format!(
                "{gaps_path}:2:1: expected a number in column 1 (feature), found a missing value"
            ),
        ),
        (
            json!({"csv": {"categorical": ["colour"], "missing": "constant", "fill_value": 0}}),
            String::new(),
        ),
        (
            json!({"csv": {"categorical": ["colour"], "missing": "mean"}}),
            "dataset.csv.missing: column 1 has no value in the 2 training examples".into(),
        ),
    ] {
        match prepared(&spec(&gaps, None, extra.clone())) {
            Ok(data) if expected.is_empty() => {
                assert_eq!(rows(&data.train.features), [[0.0, 1.0], [0.0, 1.0]]);
            }
            Ok(_) => panic!("{extra}: loaded"),
            Err(error) => assert!(error.contains(&expected), "{extra}: {error}"),
        }
    }
    // Without a csv table, missing cells are errors all the same.
    let plain = dir.path().join("plain.csv");
    std::fs::write(&plain, "a,b,label\n1,2,0\n3,NaN,1\n").unwrap();
    let error = prepared(&spec(&plain, None, json!({}))).unwrap_err();
    assert!(
        error.ends_with(":3:2: expected a number in column 2 (feature), found a missing value (see dataset.csv.missing)"),
        "{error}"
    );
    let no_category = dir.path().join("empty-category.csv");
    std::fs::write(&no_category, "1,,0\n").unwrap();
    let error = prepared(&spec(
        &no_category,
        None,
        json!({"csv": {"categorical": [1]}}),
    ))
    .unwrap_err();
    assert!(
        error.ends_with(":1:2: expected a category in column 2 (categorical), found an empty cell"),
        "{error}"
    );
}
