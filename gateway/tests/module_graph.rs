//! No crate of the workspace has modules that import each other, directly or around a loop,
//! and the gateway's import in layers: the request path (`proxy`) and the admin API
//! (`admin`) sit on the shared state (`app`), and only start-up (`server`) sits on them.
//!
//! Read from the source, one module per file: every path (`crate::a::b`, `super::x`, a child
//! module's name, in code and in doc links) that names a module of the crate is an edge from
//! the file's module to the module it resolves to, through `pub use` re-exports to where the
//! item is defined. A module and its own submodules are one unit (a parent declares its
//! children, a child reads its parent's items), so edges between them are left out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Who may import the gateway's modules that assemble everything.
const LAYERS: [(&str, &[&str]); 4] = [
    ("app", &["admin", "proxy", "server"]),
    ("proxy", &["server"]),
    ("admin", &["server"]),
    ("server", &[]),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each module of the crate at `src` (`a::b`; the root is ""), with its source less plain
/// `//` comments (doc comments stay: their links are imports too).
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files
        .into_iter()
        .map(|file| {
            let relative = file.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                parts.clear();
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let code: Vec<&str> = text
                .lines()
                .map(|line| {
                    let trimmed = line.trim_start();
                    if trimmed.starts_with("///") || trimmed.starts_with("//!") {
                        line
                    } else {
                        line.split("//").next().unwrap_or_default()
                    }
                })
                .collect();
            (parts.join("::"), code.join("\n"))
        })
        .collect()
}

/// The `a::b::c` paths in `text`.
fn paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let starts = word(bytes[i]) && (i == 0 || !(word(bytes[i - 1]) || bytes[i - 1] == b':'));
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i;
        loop {
            while j < bytes.len() && word(bytes[j]) {
                j += 1;
            }
            if bytes[j..].starts_with(b"::") && bytes.get(j + 2).is_some_and(|&b| word(b)) {
                j += 2;
            } else {
                break;
            }
        }
        let path = &text[i..j];
        if path.contains("::") {
            out.push(path.to_owned());
        }
        i = j.max(i + 1);
    }
    out
}

fn join(parts: &[&str]) -> String {
    parts.join("::")
}

struct Crate {
    modules: BTreeMap<String, String>,
    /// (module, item) -> the path it re-exports (`pub use x::Item`).
    reexports: HashMap<(String, String), String>,
}

impl Crate {
    fn read(src: &Path) -> Crate {
        let modules = modules(src);
        let mut reexports = HashMap::new();
        for (module, text) in &modules {
            for line in text.lines() {
                let Some(rest) = line.trim().strip_prefix("pub use ") else {
                    continue;
                };
                let rest = rest.trim_end_matches(';');
                let (base, items) = match rest.split_once("::{") {
                    Some((base, items)) => (base, items.trim_end_matches('}')),
                    None => match rest.rsplit_once("::") {
                        Some((base, item)) => (base, item),
                        None => continue,
                    },
                };
                for item in items.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    let item = item.split(" as ").next().unwrap_or(item).trim();
                    reexports.insert((module.clone(), item.to_owned()), format!("{base}::{item}"));
                }
            }
        }
        Crate { modules, reexports }
    }

    /// The module of the crate `path` (written in `module`) names, if any.
    fn resolve(&self, module: &str, path: &str, depth: usize) -> Option<String> {
        let segments: Vec<&str> = path.split("::").collect();
        let mut current: Vec<&str> = if module.is_empty() {
            Vec::new()
        } else {
            module.split("::").collect()
        };
        let mut rest = &segments[..];
        match rest.first() {
            Some(&"crate") => {
                current.clear();
                rest = &rest[1..];
            }
            Some(&"self") => rest = &rest[1..],
            Some(&"super") => {
                while rest.first() == Some(&"super") {
                    current.pop();
                    rest = &rest[1..];
                }
            }
            // A bare path counts only when it starts with a child module.
            Some(first) => {
                let mut child = current.clone();
                child.push(first);
                if !self.modules.contains_key(&join(&child)) {
                    return None;
                }
            }
            None => return None,
        }
        let mut best = self
            .modules
            .contains_key(&join(&current))
            .then(|| join(&current));
        for segment in rest {
            let parent = join(&current);
            current.push(segment);
            if self.modules.contains_key(&join(&current)) {
                best = Some(join(&current));
                continue;
            }
            if best.as_deref() == Some(parent.as_str()) && depth < 8 {
                if let Some(target) = self.reexports.get(&(parent.clone(), (*segment).to_owned())) {
                    if let Some(defined) = self.resolve(&parent, target, depth + 1) {
                        best = Some(defined);
                    }
                }
            }
            break;
        }
        best
    }

    fn graph(&self) -> Graph {
        let mut graph = Graph::new();
        for (module, text) in &self.modules {
            let edges = graph.entry(module.clone()).or_default();
            for path in paths(text) {
                if let Some(target) = self.resolve(module, &path, 0) {
                    if !related(module, &target) {
                        edges.insert(target);
                    }
                }
            }
        }
        graph
    }
}

/// A module and its own submodules (or the crate root and anything) are one unit.
fn related(a: &str, b: &str) -> bool {
    a.is_empty()
        || b.is_empty()
        || a == b
        || a.starts_with(&format!("{b}::"))
        || b.starts_with(&format!("{a}::"))
}

/// The groups of modules that import each other around a loop (strongly connected, more than
/// one module), each sorted.
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    // Two modules are in one loop when each reaches the other.
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(node) = todo.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|n| (n, reach(n))).collect();
    let mut groups: Vec<Vec<String>> = Vec::new();
    for node in graph.keys() {
        if groups.iter().any(|g| g.contains(node)) || !reaches[node].contains(node) {
            continue;
        }
        let group: Vec<String> = graph
            .keys()
            .filter(|other| reaches[node].contains(*other) && reaches[*other].contains(node))
            .cloned()
            .collect();
        groups.push(group);
    }
    groups
}

/// The gateway's top-level module of each module, and the edges between those.
fn top_level(graph: &Graph) -> Graph {
    let top = |m: &str| m.split("::").next().unwrap_or_default().to_owned();
    let mut out = Graph::new();
    for (from, edges) in graph {
        for to in edges {
            if top(from) != top(to) {
                out.entry(top(from)).or_default().insert(top(to));
            }
        }
    }
    out
}

fn layer_breaches(top: &Graph) -> Vec<String> {
    let mut breaches = Vec::new();
    for (module, importers) in LAYERS {
        for (from, edges) in top {
            if edges.contains(module) && !importers.contains(&from.as_str()) {
                breaches.push(format!("{from} imports {module}"));
            }
        }
    }
    breaches
}

fn crate_graph(name: &str) -> Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Crate::read(&root.join(name).join("src")).graph()
}

#[test]
fn no_crate_of_the_workspace_has_modules_importing_each_other() {
    for krate in ["gateway", "backend", "policies", "telemetry", "loadtest"] {
        let graph = crate_graph(krate);
        assert!(!graph.is_empty(), "{krate}'s source was read");
        let found = circles(&graph);
        assert!(
            found.is_empty(),
            "{krate}'s modules import each other around a loop: {found:?}"
        );
    }
}

#[test]
fn gateway_modules_import_in_layers() {
    let top = top_level(&crate_graph("gateway"));
    assert!(top.len() > 10, "the gateway's source was read: {top:?}");
    let breaches = layer_breaches(&top);
    assert!(
        breaches.is_empty(),
        "imports that reach up a layer: {breaches:?}"
    );
}

#[test]
fn the_check_sees_a_loop_a_re_export_and_a_breach() {
    let dir = tempfile::tempdir().unwrap();
    let write = |path: &str, text: &str| {
        let file = dir.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    };
    write("lib.rs", "mod app; mod admission; mod store;");
    // The loop goes through a re-export and a doc link; parent and child are one unit.
    write(
        "admission/mod.rs",
        "mod held;\npub use held::Held;\nuse crate::store::Store;",
    );
    write(
        "admission/held.rs",
        "use super::Thing;\n/// See [`crate::app::Gateway`].\npub struct Held;",
    );
    write(
        "store.rs",
        "pub struct Store; // crate::app::Gateway in a comment is no import",
    );
    write("app.rs", "use crate::admission::Held;");
    let graph = Crate::read(dir.path()).graph();
    assert_eq!(graph["app"], BTreeSet::from(["admission::held".to_owned()]));
    assert!(graph["admission::held"].contains("app"));
    assert!(
        graph["store"].is_empty(),
        "comments are not imports: {graph:?}"
    );
    assert_eq!(
        circles(&graph),
        [vec!["admission::held".to_owned(), "app".to_owned()]]
    );
    assert_eq!(
        layer_breaches(&top_level(&graph)),
        ["admission imports app"]
    );
}
