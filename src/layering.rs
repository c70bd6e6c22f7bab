//! The check of the layering rule written in `lib.rs`: it reads every
//! `src/**/*.rs`, collects each file's references to the crate's own items
//! (`use crate::…`, `super::…`, `self::…`, and inline `crate::…` paths,
//! followed through `pub use` re-exports to the file that defines the item),
//! and fails on an import that runs up the layers, on a product file that
//! names the sandbox, and on any circle between files.
//!
//! A module's use of its own descendants is containment, not a dependency:
//! `mod.rs` declares and re-exports its children, and the children may still
//! use what `mod.rs` defines. Unit-test modules (`#[cfg(test)] mod …`) are
//! left out: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use its own layer and the ones
/// below it, never one above. Keep in step with the rule in `lib.rs`.
const LAYERS: &[&[&str]] = &[
    &["clock", "metrics", "domain", "layering"],
    &["config", "telemetry"],
    &["chain", "safe", "phala"],
    &["store"],
    &["views"],
    &["worker"],
    &["notify"],
    &["web"],
    &["startup"],
    &["sandbox", "bench"],
    &["cli"],
];

/// The test double of the outside world, compiled only with the feature.
const SANDBOX: &[&str] = &["sandbox", "bench"];

/// The one product file that may name the sandbox: the binary's command
/// line offers `sandbox` and `bench` when the feature is on.
const SANDBOX_ENTRY: &str = "cli.rs";

type Module = Vec<String>;

/// Every file's module path, keyed by the path relative to `src/`.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let relative = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = relative
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect();
            if matches!(
                module.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                module.pop();
            }
            if path.extension().is_some_and(|ext| ext == "rs") && !relative.ends_with("main") {
                found.insert(module, path.strip_prefix(src).unwrap().to_path_buf());
            }
        }
    }
    found
}

/// The text without comments and without `#[cfg(test)]` modules, in ASCII.
fn code(text: &str) -> String {
    let mut out = String::new();
    let text: String = text
        .chars()
        .map(|c| if c.is_ascii() { c } else { ' ' })
        .collect();
    for line in text.lines() {
        out.push_str(line.split("//").next().unwrap_or(""));
        out.push('\n');
    }
    while let Some(start) = out.find("#[cfg(test)]") {
        let after = start + "#[cfg(test)]".len();
        let mut item = out[after..].trim_start();
        while item.starts_with("#[") {
            item = item[item.find(']').map_or(item.len(), |i| i + 1)..].trim_start();
        }
        let is_mod = ["mod ", "pub mod ", "pub(crate) mod "]
            .iter()
            .any(|m| item.starts_with(m));
        let open = out[after..].find('{').map(|i| after + i);
        let semi = out[after..].find(';').map(|i| after + i);
        let Some(open) = open.filter(|&open| is_mod && semi.is_none_or(|semi| open < semi)) else {
            // An attribute on something else: drop the attribute, keep the item.
            out.replace_range(start..after, "");
            continue;
        };
        let mut depth = 0;
        let mut end = out.len();
        for (i, c) in out[open..].char_indices() {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            if depth == 0 {
                end = open + i + 1;
                break;
            }
        }
        out.replace_range(start..end, "");
    }
    out
}

/// A `use` path or an inline path, expanded over its braces: each entry is
/// the path's segments and the name it is known by (`as`), if it ends in one.
fn expand(text: &str, mut pos: usize, prefix: &[String], out: &mut Vec<(Module, String)>) -> usize {
    let bytes = text.as_bytes();
    let mut path = prefix.to_vec();
    loop {
        while pos < bytes.len() && bytes[pos].is_ascii_whitespace() {
            pos += 1;
        }
        if pos < bytes.len() && bytes[pos] == b'{' {
            pos += 1;
            loop {
                let before = pos;
                pos = expand(text, pos, &path, out).max(before + 1);
                while pos < bytes.len() && (bytes[pos].is_ascii_whitespace() || bytes[pos] == b',')
                {
                    pos += 1;
                }
                if pos >= bytes.len() || bytes[pos] == b'}' {
                    return pos + 1;
                }
            }
        }
        let start = pos;
        while pos < bytes.len()
            && (bytes[pos].is_ascii_alphanumeric() || bytes[pos] == b'_' || bytes[pos] == b'*')
        {
            pos += 1;
        }
        let segment = &text[start..pos];
        if segment != "self" || path.is_empty() {
            path.push(segment.to_owned());
        }
        if text[pos..].starts_with("::") {
            pos += 2;
            continue;
        }
        let mut name = segment.to_owned();
        let rest = text[pos..].trim_start();
        if let Some(alias) = rest.strip_prefix("as ") {
            let alias = alias.trim_start();
            let len = alias
                .find(|c: char| !c.is_alphanumeric() && c != '_')
                .unwrap_or(alias.len());
            name = alias[..len].to_owned();
            pos = text.len() - alias.len() + len;
        }
        if segment == "self" {
            name = path.last().cloned().unwrap_or_default();
        }
        out.push((path, name));
        return pos;
    }
}

/// The paths a file names, each relative to the module it appears in, and
/// which of them are `pub use` re-exports.
struct Refs {
    paths: Vec<(Module, String)>,
    reexports: Vec<(Module, String)>,
}

fn refs(text: &str, children: &BTreeSet<String>) -> Refs {
    let text = code(text);
    let bytes = text.as_bytes();
    let (mut paths, mut reexports) = (Vec::new(), Vec::new());
    let mut pos = 0;
    while pos < bytes.len() {
        let boundary = pos == 0
            || !(bytes[pos - 1].is_ascii_alphanumeric()
                || bytes[pos - 1] == b'_'
                || bytes[pos - 1] == b':');
        let word_end = text[pos..]
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .map_or(text.len(), |i| pos + i);
        let word = &text[pos..word_end];
        if boundary && word == "use" {
            let before = text[..pos].trim_end();
            let public = before.ends_with("pub") || before.ends_with(')');
            let mut found = Vec::new();
            let end = expand(&text, word_end, &[], &mut found);
            for (path, name) in found {
                let first = path.first().map(String::as_str).unwrap_or("");
                if matches!(first, "crate" | "super" | "self") || children.contains(first) {
                    if public {
                        reexports.push((path.clone(), name.clone()));
                    }
                    paths.push((path, name));
                }
            }
            pos = end.max(word_end);
        } else if boundary
            && matches!(word, "crate" | "super" | "self")
            && text[word_end..].starts_with("::")
        {
            let mut found = Vec::new();
            pos = expand(&text, pos, &[], &mut found).max(word_end);
            paths.extend(found);
        } else {
            pos = word_end.max(pos + 1);
        }
    }
    Refs { paths, reexports }
}

struct Crate {
    files: BTreeMap<Module, PathBuf>,
    refs: BTreeMap<Module, Refs>,
}

impl Crate {
    fn read(src: &Path) -> Crate {
        let files = modules(src);
        let refs = files
            .iter()
            .map(|(module, path)| {
                let children: BTreeSet<String> = files
                    .keys()
                    .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
                    .map(|m| m.last().unwrap().clone())
                    .collect();
                let text = std::fs::read_to_string(src.join(path)).unwrap();
                (module.clone(), refs(&text, &children))
            })
            .collect();
        Crate { files, refs }
    }

    /// The file that defines what `path`, written in `from`, names.
    fn resolve(&self, from: &Module, path: &[String], depth: usize) -> Option<Module> {
        let mut module = from.clone();
        let mut rest = path;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                module.clear();
                rest = &rest[1..];
            }
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    module.pop();
                    rest = &rest[1..];
                }
            }
            Some("self") => rest = &rest[1..],
            _ => {}
        }
        while let Some(segment) = rest.first() {
            let mut child = module.clone();
            child.push(segment.clone());
            if !self.files.contains_key(&child) {
                break;
            }
            module = child;
            rest = &rest[1..];
        }
        // An item re-exported by the module: follow it to where it lives.
        if let (Some(item), true) = (rest.first(), depth < 8) {
            let reexport = self.refs[&module]
                .reexports
                .iter()
                .find(|(_, name)| name == item);
            if let Some((target, _)) = reexport {
                return self.resolve(&module, target, depth + 1);
            }
        }
        Some(module)
    }

    /// Every file's uses of other files, leaving out uses of its descendants.
    fn edges(&self) -> BTreeSet<(Module, Module)> {
        let mut edges = BTreeSet::new();
        for (from, refs) in &self.refs {
            for (path, _) in &refs.paths {
                if let Some(to) = self.resolve(from, path, 0)
                    && !to.starts_with(from)
                {
                    edges.insert((from.clone(), to));
                }
            }
        }
        edges
    }

    fn name(&self, module: &Module) -> String {
        self.files[module].display().to_string()
    }
}

fn layer(module: &Module) -> Option<usize> {
    let top = module.first()?;
    LAYERS
        .iter()
        .position(|layer| layer.contains(&top.as_str()))
}

fn in_sandbox(module: &Module) -> bool {
    module
        .first()
        .is_some_and(|top| SANDBOX.contains(&top.as_str()))
}

/// A path of edges from `from` to `to`, if there is one.
fn route(edges: &BTreeSet<(Module, Module)>, from: &Module, to: &Module) -> Option<Vec<Module>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![vec![from.clone()]];
    while let Some(trail) = stack.pop() {
        let last = trail.last().unwrap();
        if last == to {
            return Some(trail);
        }
        if !seen.insert(last.clone()) {
            continue;
        }
        for (_, next) in edges
            .range((last.clone(), Module::new())..)
            .take_while(|(a, _)| a == last)
        {
            let mut longer = trail.clone();
            longer.push(next.clone());
            stack.push(longer);
        }
    }
    None
}

fn problems(krate: &Crate) -> Vec<String> {
    let edges = krate.edges();
    let mut problems = Vec::new();
    for module in krate.files.keys() {
        if !module.is_empty() && layer(module).is_none() {
            problems.push(format!(
                "{}: module in no layer (add it to LAYERS)",
                krate.name(module)
            ));
        }
    }
    let mut circles = BTreeSet::new();
    for (from, to) in &edges {
        let arrow = format!("{} → {}", krate.name(from), krate.name(to));
        if let (Some(a), Some(b)) = (layer(from), layer(to))
            && a < b
        {
            problems.push(format!("{arrow}: runs up the layers"));
        }
        if in_sandbox(to) && !in_sandbox(from) && krate.files[from] != Path::new(SANDBOX_ENTRY) {
            problems.push(format!("{arrow}: the product depends on the sandbox"));
        }
        if let Some(trail) = route(&edges, to, from) {
            let members: BTreeSet<Module> = trail.iter().cloned().collect();
            // Circles inside the sandbox or the bench are theirs to keep.
            let inside = |top: &str| members.iter().all(|m| m.first().is_some_and(|t| t == top));
            let sandboxed = SANDBOX.iter().any(|top| inside(top));
            if !sandboxed && circles.insert(members) {
                let names: Vec<String> = std::iter::once(from)
                    .chain(&trail)
                    .map(|m| krate.name(m))
                    .collect();
                problems.push(format!("circle: {}", names.join(" → ")));
            }
        }
    }
    problems
}

#[test]
fn imports_follow_the_layers_and_form_no_circle() {
    let krate = Crate::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        krate.files.len() > 100,
        "read only {} files",
        krate.files.len()
    );
    assert!(
        krate.edges().len() > 100,
        "found only {} imports",
        krate.edges().len()
    );
    let problems = problems(&krate);
    assert!(
        problems.is_empty(),
        "the layering rule of lib.rs is broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_check_sees_a_use_through_braces_aliases_and_reexports() {
    let mut found = Vec::new();
    expand("crate::a::{b::{self, C as D}, e}", 0, &[], &mut found);
    let paths: Vec<(String, String)> = found.into_iter().map(|(p, n)| (p.join("::"), n)).collect();
    assert_eq!(
        paths,
        [
            ("crate::a::b".to_owned(), "b".to_owned()),
            ("crate::a::b::C".to_owned(), "D".to_owned()),
            ("crate::a::e".to_owned(), "e".to_owned()),
        ]
    );
    let text = "pub use inner::Thing;\n// use crate::ignored;\nfn f() { super::x(); }\n#[cfg(test)]\nmod tests { use crate::hidden; }\n";
    let refs = refs(text, &BTreeSet::from(["inner".to_owned()]));
    let paths: Vec<String> = refs.paths.iter().map(|(p, _)| p.join("::")).collect();
    assert_eq!(paths, ["inner::Thing", "super::x"]);
    assert_eq!(refs.reexports.len(), 1);
}
