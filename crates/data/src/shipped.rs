//! The project's own copy of the Bitext data (`data/bitext/`), and the check that it is intact.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::fsio::sha256_file;

/// A file that ships with the project, with its expected sha256.
#[derive(Debug, Clone, Copy)]
pub struct ShippedFile {
    /// The file's path under `data/`.
    pub name: &'static str,
    /// Its expected sha256.
    pub sha256: &'static str,
    /// What it holds, for error messages.
    pub what: &'static str,
}

/// All 26,872 rows; instruction/category/intent exact for every row, response known for 8,352.
pub const ALL_ROWS: ShippedFile = ShippedFile {
    name: "bitext-customer-support-all-rows-partial.csv",
    sha256: "a1f33fdb2705195f26d6c8127c44ebda6d9f1dec6ae946ecad63b92633afaf52",
    what: "all 26,872 rows (responses known for 8,352)",
};

/// The 6,401 rows whose five fields are all known.
pub const COMPLETE_ROWS: ShippedFile = ShippedFile {
    name: "bitext-customer-support.csv",
    sha256: "011d69b92e8bec65c1ca962929f9c292b9773fae5bd0876b728fe74509dd115f",
    what: "6,401 rows with every field known",
};

/// The CDLA-Sharing-1.0 licence the data is distributed under.
pub const LICENSE: ShippedFile = ShippedFile {
    name: "LICENSE.txt",
    sha256: "f6054388eae4947a769ca2020c54e6d394eb01c41d58db55bb6cfd24ce71cdd8",
    what: "the CDLA-Sharing-1.0 licence",
};

/// Every hash-checked shipped file.
pub const FILES: [ShippedFile; 3] = [ALL_ROWS, COMPLETE_ROWS, LICENSE];

/// Where the shipped data lives: `$SUPPORTLM_DATA_DIR` if set, else the first `data/bitext` found
/// walking up from the current folder, else the copy in this source tree.
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SUPPORTLM_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let candidate = dir.join("data").join("bitext");
            if candidate.join(ALL_ROWS.name).exists() {
                return candidate;
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/bitext")
}

/// The default input of every command: the all-rows file.
pub fn default_input() -> PathBuf {
    data_dir().join(ALL_ROWS.name)
}

/// Checks that every shipped file is present and unaltered; names the first one that is not.
pub fn verify(dir: &Path) -> Result<()> {
    for file in FILES {
        verify_file(dir, &file)?;
    }
    Ok(())
}

/// Checks one shipped file.
pub fn verify_file(dir: &Path, file: &ShippedFile) -> Result<()> {
    let path = dir.join(file.name);
    if !path.exists() {
        return Err(DataError::MissingFile {
            path,
            hint: format!(
                "{} ships with the repository: restore it with `git checkout -- data/bitext`",
                file.what
            ),
        });
    }
    let actual = sha256_file(&path).map_err(|e| DataError::io(&path, e))?;
    if actual != file.sha256 {
        return Err(DataError::Altered {
            path,
            expected: file.sha256.to_string(),
            actual,
            hint: "restore it with `git checkout -- data/bitext`".to_string(),
        });
    }
    Ok(())
}

/// If `path` is one of the shipped files, checks its hash; other files are the user's own.
pub fn verify_if_shipped(path: &Path) -> Result<()> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(());
    };
    match FILES.iter().find(|f| f.name == name) {
        Some(file) if path.parent().is_some_and(|p| p.ends_with("data/bitext")) => {
            verify_file(path.parent().unwrap_or(Path::new(".")), file)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_data_is_intact() {
        verify(&data_dir()).unwrap();
    }

    #[test]
    fn missing_and_altered_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = verify(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains(ALL_ROWS.name) && e.contains("file is missing"),
            "{e}"
        );
        for f in FILES {
            std::fs::copy(data_dir().join(f.name), dir.path().join(f.name)).unwrap();
        }
        verify(dir.path()).unwrap();
        std::fs::write(dir.path().join(LICENSE.name), b"changed").unwrap();
        let e = verify(dir.path()).unwrap_err().to_string();
        assert!(e.contains("LICENSE.txt: file was altered"), "{e}");
    }
}
