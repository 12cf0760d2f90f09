//! `cargo xtask loadtest`: bounded load against `supportlm serve` on 127.0.0.1 (started here, on a free
//! port, and stopped with SIGTERM at the end). Prints requests/s, latency percentiles, errors by status,
//! for streamed chat the time to the first token and tokens/s per stream, and the server's peak RSS.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// `cargo xtask loadtest` options.
#[derive(clap::Args)]
pub struct LoadtestArgs {
    /// Requests in all.
    #[arg(long, default_value_t = 500)]
    requests: usize,
    /// Requests in flight at once (several values: one run each, e.g. `--concurrency 1,4,16`).
    #[arg(long, value_delimiter = ',', default_value = "16")]
    concurrency: Vec<usize>,
    /// `classify` (POST /api/classify) or `chat` (streamed POST /v1/chat/completions).
    #[arg(long, default_value = "classify")]
    endpoint: String,
    /// The base model (default: the default model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// How the server holds the base's linear weights (`none`, `int8`, `nf4`).
    #[arg(long, default_value = "none")]
    base_quant: String,
    /// Adapters to attach (`NAME=DIR`); the first is used by the requests.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    adapters: Vec<String>,
    /// New tokens per chat request.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
}

/// One request's outcome.
struct Outcome {
    status: u16,
    seconds: f64,
    first_token: Option<f64>,
    tokens: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((p * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Messages the requests cycle through (real test-split messages).
fn messages() -> anyhow::Result<Vec<String>> {
    let dataset = supportlm_data::load_csv(&supportlm_data::shipped::default_input())?;
    Ok(dataset
        .records
        .iter()
        .step_by(97)
        .take(64)
        .map(|r| r.instruction.clone())
        .collect())
}

fn one_request(
    agent: &ureq::Agent,
    base: &str,
    endpoint: &str,
    model: &str,
    adapter: Option<&str>,
    message: &str,
    max_tokens: usize,
) -> Outcome {
    let started = Instant::now();
    let (url, body) = if endpoint == "chat" {
        (
            format!("{base}/v1/chat/completions"),
            json!({"model": adapter.unwrap_or(model), "messages": [{"role": "user", "content": message}],
                   "max_tokens": max_tokens, "stream": true}),
        )
    } else {
        let mut b = json!({"message": message});
        if let Some(a) = adapter {
            b["adapter"] = json!(a);
        }
        (format!("{base}/api/classify"), b)
    };
    let response = agent
        .post(&url)
        .header("Content-Type", "application/json")
        .send(body.to_string());
    let Ok(response) = response else {
        return Outcome {
            status: 0,
            seconds: started.elapsed().as_secs_f64(),
            first_token: None,
            tokens: 0,
        };
    };
    let status = response.status().as_u16();
    let mut first_token = None;
    let mut tokens = 0;
    if endpoint == "chat" && status == 200 {
        use std::io::BufRead;
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        for line in reader.lines().map_while(Result::ok) {
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                break;
            }
            let chunk: Value = serde_json::from_str(data).unwrap_or_default();
            if chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                tokens += 1;
                first_token.get_or_insert(started.elapsed().as_secs_f64());
            }
        }
    } else {
        let _ = response.into_body().read_to_string();
    }
    Outcome {
        status,
        seconds: started.elapsed().as_secs_f64(),
        first_token,
        tokens,
    }
}

pub fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    if !["classify", "chat"].contains(&args.endpoint.as_str()) {
        bail!("--endpoint must be classify or chat");
    }
    let mut extra: Vec<String> = vec!["--base-quant".into(), args.base_quant.clone()];
    if let Some(m) = &args.model {
        extra.extend(["--model".to_string(), m.display().to_string()]);
    }
    for a in &args.adapters {
        extra.extend(["--adapter".to_string(), a.clone()]);
    }
    let (mut server, port) = crate::utils::start_serve(&extra)?;
    let base = format!("http://127.0.0.1:{port}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into();
    let health: Value = agent
        .get(&format!("{base}/api/health"))
        .call()?
        .into_body()
        .read_json()?;
    let model = health["model"].as_str().unwrap_or_default().to_string();
    let adapter = args
        .adapters
        .first()
        .and_then(|a| a.split_once('='))
        .map(|(n, _)| n.to_string());
    let messages = messages().context("reading the messages")?;
    println!(
        "loadtest: {} × {} on {model} ({} base){}, server on 127.0.0.1:{port}",
        args.requests,
        args.endpoint,
        health["base_quant"].as_str().unwrap_or("?"),
        adapter
            .as_ref()
            .map_or(String::new(), |a| format!(" with adapter {a}"))
    );
    println!("| concurrency | requests/s | p50 s | p95 s | p99 s | errors by status | time to first token p50 s | tokens/s per stream |");
    println!("|---|---|---|---|---|---|---|---|");
    for &c in &args.concurrency {
        let next = Mutex::new(0usize);
        let outcomes = Mutex::new(Vec::with_capacity(args.requests));
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..c.max(1) {
                scope.spawn(|| loop {
                    let i = {
                        let mut n = next.lock().unwrap_or_else(|e| e.into_inner());
                        if *n >= args.requests {
                            break;
                        }
                        *n += 1;
                        *n - 1
                    };
                    let o = one_request(
                        &agent,
                        &base,
                        &args.endpoint,
                        &model,
                        adapter.as_deref(),
                        &messages[i % messages.len()],
                        args.max_tokens,
                    );
                    outcomes.lock().unwrap_or_else(|e| e.into_inner()).push(o);
                });
            }
        });
        let wall = started.elapsed().as_secs_f64();
        let outcomes = outcomes.into_inner().unwrap_or_default();
        let mut lat: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.status == 200)
            .map(|o| o.seconds)
            .collect();
        lat.sort_by(f64::total_cmp);
        let mut errors = std::collections::BTreeMap::new();
        for o in outcomes.iter().filter(|o| o.status != 200) {
            *errors.entry(o.status).or_insert(0) += 1;
        }
        let mut ttft: Vec<f64> = outcomes.iter().filter_map(|o| o.first_token).collect();
        ttft.sort_by(f64::total_cmp);
        let per_stream: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.tokens > 1)
            .filter_map(|o| {
                let t0 = o.first_token?;
                Some((o.tokens - 1) as f64 / (o.seconds - t0).max(1e-9))
            })
            .collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "| {c} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
            lat.len() as f64 / wall,
            percentile(&lat, 0.5),
            percentile(&lat, 0.95),
            percentile(&lat, 0.99),
            if errors.is_empty() {
                "none".to_string()
            } else {
                format!("{errors:?}")
            },
            if ttft.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", percentile(&ttft, 0.5))
            },
            if per_stream.is_empty() {
                "-".into()
            } else {
                format!("{:.1}", mean(&per_stream))
            },
        );
    }
    let rss = peak_rss_mb(server.id());
    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let status = server.wait()?;
    println!(
        "server peak RSS {} MB; it exited with {status} after SIGTERM",
        rss.map_or("?".into(), |r| format!("{r:.0}"))
    );
    Ok(())
}
