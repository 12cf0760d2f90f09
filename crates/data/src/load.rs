//! Loading a Bitext CSV into typed [`Record`]s.
//!
//! Both shipped files have the columns `flags,instruction,category,intent,response`. In the partial file an
//! empty `flags` or `response` cell means *unknown* (the original has none empty), so those fields are
//! `Option`s. Rows are numbered from 1 for the first row after the header, as a spreadsheet user counts them.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use crate::clean::{clean_message, clean_response};
use crate::error::{DataError, Result};
use crate::fsio::sha256_hex;
use crate::labels::{Category, Intent};

/// The columns every Bitext CSV must have.
pub const REQUIRED_COLUMNS: [&str; 5] = ["flags", "instruction", "category", "intent", "response"];

/// One customer message with its labels and (when known) the reference response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// 0-based index of the row in its source file (stable across runs; used as the item id).
    pub id: usize,
    /// Bitext's language-variation flags, `None` when unknown.
    pub flags: Option<String>,
    /// The customer message, cleaned (trimmed, whitespace collapsed).
    pub instruction: String,
    /// The category (Task 1).
    pub category: Category,
    /// The intent (Task 1's harder variant).
    pub intent: Intent,
    /// The reference response, cleaned; `None` when unknown.
    pub response: Option<String>,
}

/// A loaded file: where it came from, its hash, and its rows.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file read.
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: String,
    /// Its rows, in file order.
    pub records: Vec<Record>,
}

/// Reads, validates and cleans a Bitext CSV.
pub fn load_csv(path: &Path) -> Result<Dataset> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::MissingFile {
            path: path.to_path_buf(),
            hint: "check the path, or omit --input to use the shipped data".into(),
        },
        _ => DataError::io(path, e),
    })?;
    parse_csv(path, &bytes)
}

/// Validates and parses CSV bytes; `path` only names the source in errors.
pub fn parse_csv(path: &Path, bytes: &[u8]) -> Result<Dataset> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let header = header_fields(bytes);
    if let Err(e) = std::str::from_utf8(bytes) {
        let offset = e.valid_up_to();
        let (row, field) = locate(bytes, offset);
        let column = header
            .get(field)
            .cloned()
            .unwrap_or_else(|| format!("#{}", field + 1));
        return Err(DataError::InvalidUtf8 {
            path: path.to_path_buf(),
            row,
            column,
            offset,
        });
    }
    check_header(path, &header)?;

    let csv_error = |e: PolarsError| DataError::Csv {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let df = CsvReadOptions::default()
        .with_has_header(true)
        .with_infer_schema_length(Some(0)) // every column as a string: no guessing
        .with_n_threads(Some(1))
        .into_reader_with_file_handle(Cursor::new(bytes))
        .finish()
        .map_err(csv_error)?;
    let column = |name: &str| -> Result<Vec<Option<String>>> {
        let col = df.column(name).map_err(csv_error)?;
        let strings = col.str().map_err(csv_error)?;
        Ok((0..strings.len())
            .map(|i| strings.get(i))
            .map(|v| v.map(str::to_string).filter(|s| !s.trim().is_empty()))
            .collect())
    };
    let flags = column("flags")?;
    let instructions = column("instruction")?;
    let categories = column("category")?;
    let intents = column("intent")?;
    let responses = column("response")?;

    let mut records = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let row = i + 1;
        let instruction = instructions[i]
            .as_deref()
            .map(clean_message)
            .ok_or_else(|| DataError::BlankInstruction {
                path: path.to_path_buf(),
                row,
            })?;
        let category: Category = parse_label(path, row, "category", categories[i].as_deref())?;
        let intent: Intent = parse_label(path, row, "intent", intents[i].as_deref())?;
        if intent.category() != category {
            return Err(DataError::IntentCategoryMismatch {
                path: path.to_path_buf(),
                row,
                intent: intent.to_string(),
                category: category.to_string(),
                expected: intent.category().to_string(),
            });
        }
        records.push(Record {
            id: i,
            flags: flags[i].as_deref().map(|f| f.trim().to_string()),
            instruction,
            category,
            intent,
            response: responses[i].as_deref().map(clean_response),
        });
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        sha256: sha256_hex(bytes),
        records,
    })
}

fn parse_label<L: std::str::FromStr<Err = String>>(
    path: &Path,
    row: usize,
    column: &str,
    value: Option<&str>,
) -> Result<L> {
    let value = value.unwrap_or("").trim();
    value
        .parse::<L>()
        .map_err(|allowed| DataError::UnknownLabel {
            path: path.to_path_buf(),
            row,
            column: column.to_string(),
            value: value.to_string(),
            allowed,
        })
}

fn check_header(path: &Path, header: &[String]) -> Result<()> {
    for (i, name) in header.iter().enumerate() {
        if header[..i].contains(name) {
            return Err(DataError::DuplicateHeader {
                path: path.to_path_buf(),
                column: name.clone(),
            });
        }
    }
    for required in REQUIRED_COLUMNS {
        if !header.iter().any(|h| h == required) {
            return Err(DataError::MissingColumn {
                path: path.to_path_buf(),
                column: required.to_string(),
                found: header.join(","),
            });
        }
    }
    Ok(())
}

/// The header's field names (quotes removed, trimmed), read without assuming valid UTF-8.
fn header_fields(bytes: &[u8]) -> Vec<String> {
    let mut fields = vec![Vec::new()];
    let mut in_quotes = false;
    for &b in bytes {
        match b {
            b'"' => in_quotes = !in_quotes,
            b',' if !in_quotes => fields.push(Vec::new()),
            b'\n' if !in_quotes => break,
            _ => fields.last_mut().expect("never empty").push(b),
        }
    }
    fields
        .into_iter()
        .map(|f| String::from_utf8_lossy(&f).trim().to_string())
        .collect()
}

/// The (row, field index) that byte `offset` falls in; row 0 is the header, row 1 the first data row.
fn locate(bytes: &[u8], offset: usize) -> (usize, usize) {
    let (mut row, mut field, mut in_quotes) = (0, 0, false);
    for &b in &bytes[..offset.min(bytes.len())] {
        match b {
            b'"' => in_quotes = !in_quotes,
            b',' if !in_quotes => field += 1,
            b'\n' if !in_quotes => {
                row += 1;
                field = 0;
            }
            _ => {}
        }
    }
    (row, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "flags,instruction,category,intent,response\n";

    fn parse(text: &[u8]) -> Result<Dataset> {
        parse_csv(Path::new("test.csv"), text)
    }

    fn err(text: &[u8]) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_rows_and_keeps_unknown_cells_unknown() {
        let csv = format!(
            "{HEADER}B,\"cancel  order {{{{Order Number}}}}\",ORDER,cancel_order,\"Sure,  I can help.\"\n,where is my invoice,INVOICE,check_invoice,\n"
        );
        let ds = parse(csv.as_bytes()).unwrap();
        assert_eq!(ds.records.len(), 2);
        let r = &ds.records[0];
        assert_eq!(r.instruction, "cancel order {{Order Number}}");
        assert_eq!(r.flags.as_deref(), Some("B"));
        assert_eq!(r.response.as_deref(), Some("Sure, I can help."));
        assert_eq!(
            (r.category, r.intent),
            (Category::Order, Intent::CancelOrder)
        );
        let r = &ds.records[1];
        assert_eq!((r.flags.as_ref(), r.response.as_ref()), (None, None));
        assert_eq!(r.id, 1);
    }

    #[test]
    fn empty_file_is_named() {
        assert!(err(b"").contains("test.csv: file is empty"));
        assert!(err(b" \n").contains("file is empty"));
    }

    #[test]
    fn missing_column_is_named() {
        let e = err(b"flags,instruction,category,response\nB,hi,ORDER,ok\n");
        assert!(e.contains("missing column `intent`"), "{e}");
    }

    #[test]
    fn duplicated_header_is_named() {
        let e = err(
            b"flags,instruction,category,intent,response,intent\nB,hi,ORDER,cancel_order,ok,x\n",
        );
        assert!(e.contains("header names column `intent` twice"), "{e}");
    }

    #[test]
    fn blank_instruction_names_row_and_column() {
        let csv = format!("{HEADER}B,ok,ORDER,cancel_order,r\nB,   ,ORDER,cancel_order,r\n");
        let e = err(csv.as_bytes());
        assert!(
            e.contains("row 2, column `instruction`: blank instruction"),
            "{e}"
        );
    }

    #[test]
    fn unknown_category_and_intent_are_named() {
        let csv = format!("{HEADER}B,hi,SHOPPING,cancel_order,r\n");
        let e = err(csv.as_bytes());
        assert!(
            e.contains("row 1, column `category`: unknown category `SHOPPING`"),
            "{e}"
        );
        let csv = format!("{HEADER}B,hi,ORDER,cancel_order,r\nB,hi,ORDER,teleport,r\n");
        let e = err(csv.as_bytes());
        assert!(
            e.contains("row 2, column `intent`: unknown intent `teleport`"),
            "{e}"
        );
    }

    #[test]
    fn intent_in_the_wrong_category_is_an_error() {
        let csv = format!("{HEADER}B,hi,REFUND,cancel_order,r\n");
        let e = err(csv.as_bytes());
        assert!(
            e.contains("intent `cancel_order` belongs to category `ORDER`"),
            "{e}"
        );
    }

    #[test]
    fn invalid_utf8_names_row_and_column() {
        let mut csv = format!("{HEADER}B,hi,ORDER,cancel_order,r\nB,\"bad, ").into_bytes();
        csv.extend_from_slice(&[0xff, 0xfe]);
        csv.extend_from_slice(b"\",ORDER,cancel_order,r\n");
        let e = err(&csv);
        assert!(
            e.contains("row 2, column `instruction`: invalid UTF-8"),
            "{e}"
        );
    }

    #[test]
    fn malformed_csv_is_an_error_not_a_panic() {
        let csv = format!("{HEADER}B,hi,ORDER,cancel_order,r,extra,fields\n");
        assert!(parse(csv.as_bytes()).is_err());
    }

    #[test]
    fn missing_file_is_named() {
        let e = load_csv(Path::new("/no/such/file.csv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/file.csv: file is missing"), "{e}");
    }
}
