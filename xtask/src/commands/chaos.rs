//! `cargo xtask chaos-train`: crash tests of everything a run resumes from.
//!
//! On the tiny random model, `supportlm train`, `supportlm eval classify` and `supportlm eval respond`
//! are each run once uninterrupted (the reference) and then again and again under `SIGKILL`, resuming
//! after every kill, until the asked number of kills has landed; the finished outputs must equal the
//! reference byte for byte (timings taken out). Kills come two ways, chosen by a seeded generator:
//! - at a **kill point** (`supportlm_fsio::chaos`): the process kills itself at its `n`-th point, `n`
//!   drawn among the points the reference run passed: between the halves of a write, before a rename,
//!   inside a checkpoint, after a micro-batch, a validation batch or a chunk of results;
//! - at a **random moment**: this process sends `SIGKILL` after a delay drawn over the reference run's
//!   duration, wherever the child is.
//!
//! A run that finishes before its kill is checked against the reference and the next one starts from an
//! empty folder. The report lists where every kill landed and what the resumed run said it removed.
//! Training is also stopped once with Ctrl-C (`SIGINT`): exit status 130, then resumed to the end.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use supportlm_data::fsio::{chaos, sha256_file, sha256_hex};
use supportlm_data::{load_csv, shipped, split, SplitConfig, Task};
use supportlm_model::config::{Architecture, ModelConfig};
use supportlm_model::tiny;

/// `cargo xtask chaos-train` options.
#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Kills that must land in training.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Kills that must land in each evaluation (`eval classify`, `eval respond`).
    #[arg(long, default_value_t = 6)]
    eval_kills: usize,
    /// Seed of the kill moments.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Also kill `cargo xtask pipeline --quick --to t1-baselines` this many times (on the default
    /// model, minutes; off by default): every step finished before a kill must be skipped on resume.
    #[arg(long, default_value_t = 0)]
    pipeline_kills: usize,
    /// Keep the work folder (models, runs, logs) here instead of a temporary one.
    #[arg(long)]
    keep: Option<PathBuf>,
}

/// A deterministic generator for kill moments (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `1..=n`.
    fn one_to(&mut self, n: u64) -> u64 {
        1 + self.next() % n.max(1)
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A result's fingerprint: (file, sha256) pairs.
type Fingerprint = Vec<(String, String)>;

/// One workload: a command line that resumes in its output folder, and how to fingerprint its result.
struct Workload {
    name: &'static str,
    args: Vec<String>,
    out: PathBuf,
    fingerprint: fn(&Path) -> anyhow::Result<Fingerprint>,
}

/// How a run ended.
enum Ending {
    Finished,
    Killed { landed: String },
}

/// Where one kill landed and what the resumed run said about it.
struct KillRecord {
    workload: &'static str,
    how: String,
    landed: String,
    removed_on_resume: Vec<String>,
}

struct Harness {
    bin: PathBuf,
    logs: PathBuf,
    runs: usize,
}

impl Harness {
    /// Runs `w` once; `kill_at` makes it kill itself at that point, `kill_after` kills it after that
    /// delay. Returns how it ended and its trace (the points it passed).
    fn run(
        &mut self,
        w: &Workload,
        kill_at: Option<u64>,
        kill_after: Option<Duration>,
    ) -> anyhow::Result<(Ending, Vec<String>, String)> {
        self.runs += 1;
        let trace = self.logs.join(format!("{}-{:03}.trace", w.name, self.runs));
        let log = self.logs.join(format!("{}-{:03}.log", w.name, self.runs));
        let mut cmd = Command::new(&self.bin);
        cmd.args(&w.args)
            .env(chaos::TRACE_ENV, &trace)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        if let Some(n) = kill_at {
            cmd.env(chaos::KILL_AT_ENV, n.to_string());
        }
        let mut child = crate::utils::die_with_parent(&mut cmd)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if kill_after.is_some_and(|d| started.elapsed() >= d) {
                child.kill()?; // SIGKILL
                break child.wait()?;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let points: Vec<String> = std::fs::read_to_string(&trace)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_once(' ').map_or(l, |(_, name)| name).to_string())
            .collect();
        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
        if status.success() {
            return Ok((Ending::Finished, points, stderr));
        }
        use std::os::unix::process::ExitStatusExt;
        if status.signal() == Some(9) {
            let landed = match (kill_at, points.last()) {
                (Some(_), Some(p)) => format!("at `{p}`"),
                (None, Some(p)) => format!("after `{p}`"),
                (_, None) => "before the first point (loading)".into(),
            };
            return Ok((Ending::Killed { landed }, points, stderr));
        }
        bail!(
            "{} failed ({status}); its log {}:\n{stderr}",
            w.name,
            log.display()
        )
    }

    /// The reference run of `w`: its fingerprint, number of points and duration.
    fn reference(&mut self, w: &Workload) -> anyhow::Result<(Fingerprint, u64, Duration)> {
        remove_dir(&w.out)?;
        let started = Instant::now();
        let (ending, points, _) = self.run(w, None, None)?;
        ensure!(
            matches!(ending, Ending::Finished),
            "the reference run did not finish"
        );
        let fp = (w.fingerprint)(&w.out)?;
        let elapsed = started.elapsed();
        remove_dir(&w.out)?;
        Ok((fp, points.len() as u64, elapsed))
    }

    /// Kills `w` until `kills` kills landed, resuming after each; every finished run must equal the
    /// reference.
    fn torture(
        &mut self,
        w: &Workload,
        kills: usize,
        rng: &mut Rng,
        records: &mut Vec<KillRecord>,
    ) -> anyhow::Result<usize> {
        let (reference, points, duration) = self.reference(w)?;
        println!(
            "{}: reference run {:.1}s, {points} kill points; {} files fingerprinted",
            w.name,
            duration.as_secs_f64(),
            reference.len()
        );
        let mut landed = 0;
        let mut finished = 0;
        let mut attempts = 0;
        while landed < kills {
            attempts += 1;
            ensure!(attempts < kills * 20, "{}: kills keep missing", w.name);
            // A resumed run passes fewer points than a fresh one: draw from the first half then.
            let span = if w.out.exists() {
                points.div_ceil(2)
            } else {
                points
            };
            let (how, kill_at, kill_after) = if rng.unit() < 0.5 {
                let n = rng.one_to(span);
                (format!("point {n}/{points}"), Some(n), None)
            } else {
                let d = duration.mul_f64(rng.unit() * span as f64 / points as f64);
                (
                    format!("after {:.0} ms", d.as_secs_f64() * 1e3),
                    None,
                    Some(d),
                )
            };
            let (ending, _, stderr) = self.run(w, kill_at, kill_after)?;
            if let Some(last) = records.last_mut().filter(|r| r.workload == w.name) {
                if last.removed_on_resume.is_empty() {
                    last.removed_on_resume = named_leftovers(&stderr);
                }
            }
            match ending {
                Ending::Killed { landed: at } => {
                    landed += 1;
                    println!("  kill {landed:>2}: {how:<16} landed {at}");
                    records.push(KillRecord {
                        workload: w.name,
                        how,
                        landed: at,
                        removed_on_resume: Vec::new(),
                    });
                }
                Ending::Finished => {
                    finished += 1;
                    compare(w, &reference)?;
                    remove_dir(&w.out)?;
                }
            }
        }
        // The last kill's run resumed to the end.
        let (ending, _, stderr) = self.run(w, None, None)?;
        ensure!(
            matches!(ending, Ending::Finished),
            "the final resume did not finish"
        );
        if let Some(last) = records.last_mut().filter(|r| r.workload == w.name) {
            last.removed_on_resume = named_leftovers(&stderr);
        }
        compare(w, &reference)?;
        finished += 1;
        println!(
            "{}: {landed} kills, {finished} finished runs, every one equal to the reference",
            w.name
        );
        remove_dir(&w.out)?;
        Ok(finished)
    }
}

/// What a resumed run's log says it removed or dropped.
fn named_leftovers(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains("interrupted run left"))
        .map(|l| {
            let field = |key: &str| {
                l.split(&format!(" {key}="))
                    .nth(1)
                    .and_then(|v| v.split_whitespace().next())
            };
            let file = field("path")
                .and_then(|p| Path::new(p).file_name())
                .map_or_else(
                    || l.trim().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
            match field("line") {
                Some(line) => format!("cut line {line} of {file}"),
                None => file,
            }
        })
        .collect()
}

fn remove_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(e).context(format!("removing {}", dir.display())))
        }
        _ => Ok(()),
    }
}

fn compare(w: &Workload, reference: &[(String, String)]) -> anyhow::Result<()> {
    let got = (w.fingerprint)(&w.out)?;
    for ((name, want), (_, have)) in reference.iter().zip(&got) {
        ensure!(
            want == have,
            "{}: {name} differs from the uninterrupted run's",
            w.name
        );
    }
    ensure!(got.len() == reference.len(), "{}: other files", w.name);
    Ok(())
}

fn file_hashes(dir: &Path, files: &[&str]) -> anyhow::Result<Fingerprint> {
    files
        .iter()
        .map(|f| {
            let p = dir.join(f);
            Ok((
                f.to_string(),
                sha256_file(&p).with_context(|| p.display().to_string())?,
            ))
        })
        .collect()
}

/// The wall-clock fields, which differ between any two runs.
const TIMINGS: [&str; 6] = [
    "seconds",
    "items_per_s",
    "items_timed",
    "tokens_per_s",
    "peak_rss",
    "latency_ms",
];

fn strip(v: &mut serde_json::Value, drop: &[&str]) {
    match v {
        serde_json::Value::Object(m) => {
            m.retain(|k, _| !drop.contains(&k.as_str()));
            m.values_mut().for_each(|x| strip(x, drop));
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| strip(x, drop)),
        _ => {}
    }
}

/// A JSON file's hash with the named fields removed, at any depth.
fn json_hash_without(path: &Path, drop: &[&str]) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut v: serde_json::Value = serde_json::from_str(&text)?;
    strip(&mut v, drop);
    Ok(sha256_hex(v.to_string().as_bytes()))
}

/// A JSON-lines file's hash with the named fields removed from every line.
fn jsonl_hash_without(path: &Path, drop: &[&str]) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = String::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line)?;
        strip(&mut v, drop);
        out += &v.to_string();
        out.push('\n');
    }
    Ok(sha256_hex(out.as_bytes()))
}

fn train_fingerprint(out: &Path) -> anyhow::Result<Fingerprint> {
    let mut fp = file_hashes(
        out,
        &[
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
            "best-adapter/adapter_model.safetensors",
            "checkpoint-000006/optimizer.safetensors",
            "checkpoint-000006/adapter/adapter_model.safetensors",
            "checkpoint-000006/trainer_state.json",
        ],
    )?;
    // metrics.jsonl without the timings: every step, loss, learning rate and gradient norm.
    let lines: Vec<String> = std::fs::read_to_string(out.join("metrics.jsonl"))?
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(format!(
                "{} {} {} {} {}",
                v["step"], v["train_loss"], v["val_loss"], v["lr"], v["grad_norm"]
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    fp.push((
        "metrics.jsonl losses".into(),
        sha256_hex(lines.join("\n").as_bytes()),
    ));
    // initial_val_loss is only known to the invocation that evaluated step 0.
    let mut drop = TIMINGS.to_vec();
    drop.push("initial_val_loss");
    fp.push((
        "outcome.json (timings removed)".into(),
        json_hash_without(&out.join("outcome.json"), &drop)?,
    ));
    Ok(fp)
}

fn classify_fingerprint(out: &Path) -> anyhow::Result<Fingerprint> {
    let mut fp = file_hashes(out, &["classification_report.csv", "confusion.csv"])?;
    fp.push((
        "predictions.jsonl (timings removed)".into(),
        jsonl_hash_without(&out.join("predictions.jsonl"), &TIMINGS)?,
    ));
    fp.push((
        "metrics.json (timings removed)".into(),
        json_hash_without(&out.join("metrics.json"), &TIMINGS)?,
    ));
    Ok(fp)
}

fn respond_fingerprint(out: &Path) -> anyhow::Result<Fingerprint> {
    let mut fp = Vec::new();
    for f in ["predictions.jsonl", "judge.jsonl"] {
        fp.push((
            format!("{f} (timings removed)"),
            jsonl_hash_without(&out.join(f), &TIMINGS)?,
        ));
    }
    fp.push((
        "metrics.json (timings removed)".into(),
        json_hash_without(&out.join("metrics.json"), &TIMINGS)?,
    ));
    Ok(fp)
}

/// Ctrl-C during training: exit status 130 after a checkpoint, and `--resume` finishes the run equal to
/// the reference.
fn interrupt_once(h: &mut Harness, w: &Workload) -> anyhow::Result<()> {
    let (reference, _, _) = h.reference(w)?;
    let log = h.logs.join("train-sigint.log");
    let mut child = Command::new(&h.bin)
        .args(&w.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let metrics = w.out.join("metrics.jsonl");
    let started = Instant::now();
    // Once the first optimizer step is logged, send SIGINT (what Ctrl-C sends).
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2 {
        ensure!(
            child.try_wait()?.is_none(),
            "training ended before it could be interrupted"
        );
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "training never logged a step"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    ensure!(sent.success(), "kill -INT failed");
    let status = child.wait()?;
    let stderr = std::fs::read_to_string(&log)?;
    ensure!(
        status.code() == Some(130),
        "Ctrl-C in train exited with {status}, not 130:\n{stderr}"
    );
    ensure!(
        stderr.contains("--resume"),
        "the message does not say how to continue:\n{stderr}"
    );
    let (ending, _, _) = h.run(w, None, None)?;
    ensure!(
        matches!(ending, Ending::Finished),
        "the resumed run did not finish"
    );
    compare(w, &reference)?;
    println!("train: Ctrl-C → exit status 130, checkpoint, --resume → equal to the reference");
    remove_dir(&w.out)?;
    Ok(())
}

/// The step records under a pipeline run (`steps/<step>.json`): name → contents.
fn step_records(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("steps")) {
        for e in entries {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let name = p
                    .file_stem()
                    .map_or(String::new(), |s| s.to_string_lossy().into_owned());
                out.push((name, std::fs::read_to_string(&p)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Processes (other than this one) whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            out.push(format!("{pid}: {cmdline}"));
        }
    }
    out
}

/// The step a pipeline log was in last (`[step] …` lines).
fn last_step(log: &str) -> String {
    log.lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .map(|(s, _)| s.to_string())
        })
        .unwrap_or_else(|| "build".into())
}

/// Kills the quick pipeline (through t1-baselines) `kills` times at seeded moments and resumes it: the
/// steps recorded as finished before a kill must be skipped with their records untouched, no step
/// process may outlive the killed pipeline, and the last resume must finish.
fn pipeline_chaos(
    root: &Path,
    kills: usize,
    rng: &mut Rng,
    records: &mut Vec<KillRecord>,
) -> anyhow::Result<()> {
    let name = "chaos-pipeline";
    let dir = root.join("runs").join(name);
    remove_dir(&dir)?;
    let xtask = std::env::current_exe()?;
    let args = [
        "pipeline",
        "--quick",
        "--name",
        name,
        "--to",
        "t1-baselines",
    ];
    let started = Instant::now();
    for attempt in 0..=kills {
        let before = step_records(&dir)?;
        let log = root.join("runs").join(format!("{name}.{attempt}.log"));
        let mut child = crate::utils::die_with_parent(&mut Command::new(&xtask))
            .args(args)
            .current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        // Kills spread over the first minutes (the quick steps up to t1-baselines take a few).
        let delay = (attempt < kills).then(|| Duration::from_secs_f64(2.0 + 100.0 * rng.unit()));
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break Some(s);
            }
            if delay.is_some_and(|d| t.elapsed() >= d) {
                child.kill()?;
                child.wait()?;
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = std::fs::read_to_string(&log)?;
        if let Some(s) = status.filter(|s| !s.success()) {
            bail!(
                "pipeline failed ({s}); its log {}:\n{stderr}",
                log.display()
            );
        }
        // Setup checks the model files on every run by design; every other finished step is skipped.
        for (step, record) in before.iter().filter(|(s, _)| s != "setup") {
            ensure!(
                stderr.contains(&format!(
                    "[{step}] done before with the same inputs: skipped"
                )),
                "pipeline: step {step} had finished before the kill but was not skipped (log {})",
                log.display()
            );
            let now = std::fs::read_to_string(dir.join("steps").join(format!("{step}.json")))?;
            ensure!(
                &now == record,
                "pipeline: the record of finished step {step} changed"
            );
        }
        let kept = stderr.matches("finished before: kept").count();
        match status {
            None => {
                std::thread::sleep(Duration::from_millis(200));
                let orphans = processes_mentioning(&dir.display().to_string());
                ensure!(
                    orphans.is_empty(),
                    "pipeline: step processes outlived the killed pipeline: {orphans:?}"
                );
                let running = last_step(&stderr);
                let secs = delay.map_or(0.0, |d| d.as_secs_f64());
                println!(
                    "  pipeline kill {}: after {secs:.0} s, during step {running}; this run had skipped {} finished steps and kept {kept} finished evaluations",
                    attempt + 1,
                    before.len()
                );
                records.push(KillRecord {
                    workload: "pipeline",
                    how: format!("after {secs:.0} s"),
                    landed: format!("during step `{running}`"),
                    removed_on_resume: Vec::new(),
                });
            }
            Some(_) => {
                if attempt < kills {
                    // Finished before the kill: start over so the next kills land in work again.
                    println!(
                        "  pipeline finished before kill {}: starting over",
                        attempt + 1
                    );
                    remove_dir(&dir)?;
                } else {
                    println!(
                        "pipeline: {kills} kills, the last resume finished ({} finished steps skipped, {kept} evaluations kept); {:.0} s in all",
                        before.len(),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
    Ok(())
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let root = crate::utils::workspace_root();
    let bin = crate::utils::build_cli(&root)?;
    let temp = tempfile::tempdir()?;
    let work = args
        .keep
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&work)?;
    let logs = work.join("logs");
    remove_dir(&logs)?;
    std::fs::create_dir_all(&logs)?;

    let model = work.join("tiny-model");
    // The tiny model with a context long enough for the judge's prompts (its tokens are bytes).
    let config = ModelConfig {
        max_position_embeddings: 8192,
        ..tiny::config(Architecture::Llama)
    };
    tiny::write_hf_dir(&model, &config, 7, 1)?;
    let dataset = load_csv(&shipped::default_input())?;
    let split_dir = |task: Task| -> anyhow::Result<PathBuf> {
        let dir = work.join(format!("split-{task}"));
        split::split(
            &dataset,
            &SplitConfig {
                task,
                seed: 42,
                ..Default::default()
            },
        )?
        .write(&dir, &dataset)?;
        Ok(dir)
    };
    let (cat_split, resp_split) = (split_dir(Task::Category)?, split_dir(Task::Response)?);
    let s = |p: &Path| p.display().to_string();
    let train = Workload {
        name: "train",
        args: [
            "train",
            "--model",
            &s(&model),
            "--data",
            &s(&cat_split),
            "--out",
            &s(&work.join("train")),
            "--resume",
        ]
        .iter()
        .map(|x| x.to_string())
        .chain(
            [
                "seed=3",
                "max_steps=6",
                "batch_size=4",
                "grad_accum=2",
                "train_examples=48",
                "val_examples=12",
                "eval_every=2",
                "save_every=2",
                "keep_checkpoints=2",
                "lr=2e-3",
                "max_len=1024",
            ]
            .iter()
            .flat_map(|kv| ["--set".to_string(), kv.to_string()]),
        )
        .collect(),
        out: work.join("train"),
        fingerprint: train_fingerprint,
    };
    let mut h = Harness { bin, logs, runs: 0 };
    let mut rng = Rng(args.seed);
    let mut records = Vec::new();
    let started = Instant::now();
    interrupt_once(&mut h, &train)?;
    h.torture(&train, args.kills, &mut rng, &mut records)?;

    // The adapter the evaluations use: the reference training's.
    let (ending, _, _) = h.run(&train, None, None)?;
    ensure!(
        matches!(ending, Ending::Finished),
        "training the evaluated adapter failed"
    );
    let adapter = work.join("adapter");
    remove_dir(&adapter)?;
    std::fs::rename(train.out.join("adapter"), &adapter)?;
    // Both evaluations: the trained adapter on the tiny model, resumable in their --out folder.
    let eval = |name: &'static str, command: &str, data: &Path, own: &[&str], fingerprint| {
        let out = work.join(name);
        let mut args: Vec<String> = [
            "eval",
            command,
            "--method",
            "sft",
            "--adapter",
            &s(&adapter),
            "--model",
            &s(&model),
            "--data",
            &s(data),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        args.extend(own.iter().map(|x| x.to_string()));
        args.extend([
            "--bootstrap".to_string(),
            "50".into(),
            "--out".into(),
            s(&out),
        ]);
        Workload {
            name,
            args,
            out,
            fingerprint,
        }
    };
    let classify = eval(
        "eval-classify",
        "classify",
        &cat_split,
        &["--limit", "160"],
        classify_fingerprint,
    );
    h.torture(&classify, args.eval_kills, &mut rng, &mut records)?;
    let judge = s(&model);
    let respond = eval(
        "eval-respond",
        "respond",
        &resp_split,
        &[
            "--limit",
            "64",
            "--max-new-tokens",
            "6",
            "--embedder",
            "none",
            "--judge",
            &judge,
            "--judge-items",
            "10",
        ],
        respond_fingerprint,
    );
    h.torture(&respond, args.eval_kills, &mut rng, &mut records)?;

    if args.pipeline_kills > 0 {
        pipeline_chaos(&root, args.pipeline_kills, &mut rng, &mut records)?;
    }

    println!("\nwhere each kill landed (seed {}):", args.seed);
    println!("| # | run | kill | landed | the resumed run named and removed |");
    println!("|---|---|---|---|---|");
    for (i, r) in records.iter().enumerate() {
        println!(
            "| {} | {} | {} | {} | {} |",
            i + 1,
            r.workload,
            r.how,
            r.landed,
            if r.removed_on_resume.is_empty() {
                "-".to_string()
            } else {
                r.removed_on_resume.join(", ")
            }
        );
    }
    println!(
        "chaos-train passed: {} kills in {:.0}s, {} runs; every resumed run equal to its uninterrupted reference",
        records.len(),
        started.elapsed().as_secs_f64(),
        h.runs
    );
    Ok(())
}
