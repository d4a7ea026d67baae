//! The gateway's modules import each other without circles (as do every other crate's), and
//! in layers: the request path
//! (`proxy`) and the admin API (`admin`) sit on the shared state (`app`), and only start-up
//! (`server`) sits on them. A new `crate::` path that closes a circle, or that reaches up a
//! layer, fails here with the path it took.
//!
//! Read from the source: every `crate::NAME` outside comments counts as an edge from the
//! top-level module of the file it is in to the top-level module `NAME`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Who may import the modules that assemble everything.
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

/// `crate::NAME` paths in `source`, comments left out.
fn crate_paths(source: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let before = rest[..at].chars().last();
            rest = &rest[at + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `sluice_crate::`
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

fn graph_of(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_string_lossy().trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let edges = graph.entry(module.clone()).or_default();
        for target in crate_paths(&std::fs::read_to_string(&file).unwrap()) {
            if target != module {
                edges.insert(target);
            }
        }
    }
    graph
}

/// A circle in the graph, as the path that closes it, if there is one.
fn find_circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut circle = path[at..].to_vec();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn layer_breaches(graph: &Graph) -> Vec<String> {
    let mut breaches = Vec::new();
    for (module, importers) in LAYERS {
        for (from, edges) in graph {
            if edges.contains(module) && !importers.contains(&from.as_str()) {
                breaches.push(format!("{from} imports {module}"));
            }
        }
    }
    breaches
}

#[test]
fn gateway_modules_import_each_other_without_circles_and_in_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph_of(&src);
    assert!(graph.len() > 10, "the source was read: {graph:?}");
    if let Some(circle) = find_circle(&graph) {
        panic!(
            "the gateway's modules import in a circle: {}",
            circle.join(" -> ")
        );
    }
    let breaches = layer_breaches(&graph);
    assert!(
        breaches.is_empty(),
        "imports that reach up a layer: {breaches:?}"
    );
}

#[test]
fn no_crate_of_the_workspace_imports_in_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["backend", "policies", "telemetry", "loadtest"] {
        let graph = graph_of(&root.join(krate).join("src"));
        if let Some(circle) = find_circle(&graph) {
            panic!(
                "{krate}'s modules import in a circle: {}",
                circle.join(" -> ")
            );
        }
    }
}

#[test]
fn the_check_sees_a_circle_and_a_breach() {
    let graph: Graph = [
        ("admission", vec!["store", "app"]),
        ("store", vec!["keys"]),
        ("app", vec!["admission"]),
        ("keys", vec![]),
    ]
    .into_iter()
    .map(|(m, e)| (m.to_owned(), e.into_iter().map(str::to_owned).collect()))
    .collect();
    let circle = find_circle(&graph).expect("admission -> app -> admission");
    assert_eq!(circle.first(), circle.last());
    assert!(circle.contains(&"app".to_owned()), "{circle:?}");
    assert_eq!(layer_breaches(&graph), ["admission imports app"]);
    assert_eq!(
        crate_paths("use crate::a::B; // crate::commented\nlet x = crate::b(sluice_crate::c);"),
        ["a", "b"].map(str::to_owned).into_iter().collect()
    );
}
