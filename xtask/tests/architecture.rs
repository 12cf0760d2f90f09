//! The workspace's shape, checked over its sources: checkpoint names are spelled in one module, no
//! crate has a module cycle, and the inference crates do not depend on training code.
//!
//! These read `crates/*/src` and `xtask/src` as text. Test modules (from a `#[cfg(test)]` line to the
//! end of its file) and integration tests are left out: they spell names on purpose, as the expected
//! values of the formats they check.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Every crate's source folder: `(crate folder name, src/)`.
fn source_dirs() -> Vec<(String, PathBuf)> {
    let root = root();
    let mut dirs = vec![("xtask".to_string(), root.join("xtask/src"))];
    for entry in std::fs::read_dir(root.join("crates")).unwrap() {
        let path = entry.unwrap().path();
        if path.join("src").is_dir() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            dirs.push((name, path.join("src")));
        }
    }
    dirs.sort();
    dirs
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
}

/// The file's lines before its test module.
fn code_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .map(String::from)
        .collect()
}

/// The string literals on a line of code (comments dropped), roughly: the text between quote pairs.
fn literals(line: &str) -> Vec<&str> {
    let code = match line.find("//") {
        // `//` inside a literal (a URL) is rare in these files; cut at the first one outside quotes.
        Some(i) if line[..i].matches('"').count().is_multiple_of(2) => &line[..i],
        _ => line,
    };
    code.split('"').skip(1).step_by(2).collect()
}

/// Fragments of checkpoint tensor names (Hugging Face, GGUF, PEFT) that only `names.rs` may spell.
const NAME_FRAGMENTS: [&str; 20] = [
    "self_attn",
    "mlp.",
    "_proj",
    "model.layers",
    "layernorm",
    "embed_tokens",
    "lm_head",
    "model.norm",
    "token_embd",
    "output_norm",
    "output.weight",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "attn_norm",
    "ffn_",
    "blk.",
    "lora_A",
    "base_model.model",
];

#[test]
fn checkpoint_names_are_spelled_only_in_the_names_module() {
    let names_module = root().join("crates/model/src/names.rs");
    let mut found = Vec::new();
    for (_, dir) in source_dirs() {
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        for file in files.iter().filter(|f| **f != names_module) {
            for (i, line) in code_lines(file).iter().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for lit in literals(line) {
                    if let Some(frag) = NAME_FRAGMENTS.iter().find(|f| lit.contains(**f)) {
                        found.push(format!(
                            "{}:{}: \"{lit}\" spells `{frag}`",
                            file.strip_prefix(root()).unwrap().display(),
                            i + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "checkpoint names belong in crates/model/src/names.rs; found elsewhere:\n{}",
        found.join("\n")
    );
}

/// A file's module path inside its crate (`src/a/b.rs` and `src/a/b/mod.rs` → `[a, b]`).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

fn ident_end(s: &str) -> usize {
    s.find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len())
}

/// Expands a path tail after `crate::` / `super::` (`a::b`, `a::{b, c::d}`, `{a, b}`) into paths.
fn expand(tail: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix;
    let mut i = 0;
    loop {
        let rest = &tail[i..];
        if let Some(inner) = rest.strip_prefix('{') {
            // A group: each member expands from the current path.
            let mut used = 1;
            let mut member = inner;
            loop {
                let trimmed = member.trim_start();
                used += member.len() - trimmed.len();
                if trimmed.starts_with('}') {
                    return i + used + 1;
                }
                let n = expand(trimmed, path.clone(), out);
                used += n;
                member = &trimmed[n..];
                let after = member.trim_start();
                used += member.len() - after.len();
                if let Some(next) = after.strip_prefix(',') {
                    used += 1;
                    member = next;
                } else {
                    return i + used + after.starts_with('}') as usize;
                }
            }
        }
        let end = ident_end(rest);
        if end == 0 {
            out.push(path);
            return i;
        }
        path.push(rest[..end].to_string());
        i += end;
        if tail[i..].starts_with("::") {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

/// The module paths a file refers to through `crate::` and `super::`.
fn references(module: &[String], lines: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in lines {
        let code = line.split("//").next().unwrap_or("");
        for (start, _) in code.match_indices("crate::") {
            let before = code[..start].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            expand(&code[start + 7..], Vec::new(), &mut out);
        }
        for (start, _) in code.match_indices("super::") {
            let before = code[..start].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            // `super` of `a/b.rs` (module [a, b]) is [a]; chains climb further.
            let mut base: Vec<String> = module.to_vec();
            let mut tail = &code[start..];
            while let Some(t) = tail.strip_prefix("super::") {
                base.pop();
                tail = t;
            }
            expand(tail, base, &mut out);
        }
    }
    out
}

/// Cycles among sibling modules: an edge `a → b` where `a` refers into `b` (or anything below it)
/// and neither contains the other. Returns each cycle found, as module paths.
fn module_cycles(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_path(src, f)).collect();
    // scope → sibling → siblings it refers to
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let from = module_path(src, file);
        for to in references(&from, &code_lines(file)) {
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // one contains the other
            }
            let scope = from[..common].to_vec();
            let (a, b) = (from[common].clone(), to[common].clone());
            // Only modules are nodes; an item of the parent (`super::Run`) is not.
            let mut b_path = scope.clone();
            b_path.push(b.clone());
            if !modules.contains(&b_path) {
                continue;
            }
            graphs
                .entry(scope)
                .or_default()
                .entry(a)
                .or_default()
                .insert(b);
        }
    }
    let mut cycles = Vec::new();
    for (scope, graph) in &graphs {
        // Depth-first search for a back edge.
        fn visit(
            node: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
            cycles: &mut Vec<Vec<String>>,
        ) {
            if let Some(i) = stack.iter().position(|n| n == node) {
                cycles.push(stack[i..].to_vec());
                return;
            }
            if done.contains(node) {
                return;
            }
            stack.push(node.to_string());
            for next in graph.get(node).into_iter().flatten() {
                visit(next, graph, stack, done, cycles);
            }
            stack.pop();
            done.insert(node.to_string());
        }
        let mut done = BTreeSet::new();
        let mut found = Vec::new();
        for node in graph.keys() {
            visit(node, graph, &mut Vec::new(), &mut done, &mut found);
        }
        for cycle in found {
            let prefix = if scope.is_empty() {
                String::new()
            } else {
                format!("{}::", scope.join("::"))
            };
            let names: Vec<String> = cycle.iter().map(|m| format!("{prefix}{m}")).collect();
            cycles.push(format!("{} → {}", names.join(" → "), names[0]));
        }
    }
    cycles
}

#[test]
fn no_crate_has_a_module_cycle() {
    let mut all = Vec::new();
    for (name, src) in source_dirs() {
        for cycle in module_cycles(&src) {
            all.push(format!("{name}: {cycle}"));
        }
    }
    assert!(all.is_empty(), "module cycles:\n{}", all.join("\n"));
}

#[test]
fn the_cycle_check_finds_a_planted_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("cmd")).unwrap();
    std::fs::write(src.join("main.rs"), "mod a;\nmod b;\nmod cmd;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::thing;\n").unwrap();
    std::fs::write(src.join("b.rs"), "use crate::{a::other, cmd};\n").unwrap();
    std::fs::write(src.join("cmd/mod.rs"), "pub mod x;\nuse x::f;\n").unwrap();
    std::fs::write(src.join("cmd/x.rs"), "use super::Y;\n").unwrap();
    let cycles = module_cycles(src);
    assert_eq!(cycles, vec!["a → b → a".to_string()], "{cycles:?}");
}

/// The `supportlm-*` crates a manifest's `[dependencies]` names.
fn our_dependencies(manifest: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(manifest).unwrap();
    let mut in_deps = false;
    let mut deps = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]" || line.ends_with(".dependencies]");
            continue;
        }
        if in_deps && line.starts_with("supportlm-") {
            deps.push(line[..ident_end_dash(line)].to_string());
        }
    }
    deps
}

fn ident_end_dash(s: &str) -> usize {
    s.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(s.len())
}

#[test]
fn inference_crates_do_not_depend_on_training_code() {
    let root = root();
    let model = our_dependencies(&root.join("crates/model/Cargo.toml"));
    assert!(
        !model.iter().any(|d| d == "supportlm-train"),
        "supportlm-model depends on {model:?}"
    );
    let quant = our_dependencies(&root.join("crates/quant/Cargo.toml"));
    assert!(
        quant.iter().all(|d| d == "supportlm-fsio"),
        "supportlm-quant depends on {quant:?}: it may use only fsio"
    );
    let quant_manifest = std::fs::read_to_string(root.join("crates/quant/Cargo.toml")).unwrap();
    assert!(
        !quant_manifest.contains("burn"),
        "supportlm-quant holds no framework tensors"
    );
    // The leaves: data and metrics know nothing of models, and nothing of ours but fsio.
    for leaf in ["data", "metrics", "plots", "fsio"] {
        let deps = our_dependencies(&root.join(format!("crates/{leaf}/Cargo.toml")));
        assert!(
            deps.iter().all(|d| d == "supportlm-fsio"),
            "supportlm-{leaf} depends on {deps:?}"
        );
    }
}

/// `(package, version) → features` of one `cargo tree` over the workspace.
fn feature_sets(args: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "--offline", "--locked", "--prefix", "none"])
        .args(["--format", "{p} [{f}]"])
        .args(args)
        .current_dir(root())
        .output()
        .expect("running cargo tree");
    assert!(
        out.status.success(),
        "cargo tree {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((package, features)) = line.split_once(" [") else {
            continue;
        };
        // `name vX.Y.Z (path)` → `name vX.Y.Z`
        let id: String = package.split(' ').take(2).collect::<Vec<_>>().join(" ");
        // A package printed before is marked `(*)` after its features.
        let features = features.trim_end_matches(" (*)").trim_end_matches(']');
        sets.entry(id).or_default().insert(features.to_string());
    }
    sets
}

#[test]
fn the_binaries_and_the_tests_build_dependencies_with_the_same_features() {
    // Else `cargo xtask …`, `cargo build -p supportlm` and `cargo test --workspace` each compile their
    // own copy of burn, polars and tokenizers (supportlm-workspace-hack unifies them).
    let workspace = feature_sets(&["--workspace", "-e", "normal,build,dev"]);
    let mut differing = Vec::new();
    for package in ["supportlm", "xtask"] {
        for (id, features) in feature_sets(&["-p", package, "-e", "normal,build"]) {
            if let Some(all) = workspace.get(&id).filter(|all| **all != features) {
                differing.push(format!("{package}: {id} {features:?}, workspace {all:?}"));
            }
        }
    }
    assert!(
        differing.is_empty(),
        "add these features to crates/workspace-hack/Cargo.toml:\n{}",
        differing.join("\n")
    );
}
