//! The documentation, checked against the repository: the README stays a
//! short front door whose two commands name files that exist, every page
//! under `docs/` is one click from the README and listed in `docs/README.md`,
//! and every relative link (and image) resolves, anchors included.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The README's hard limit; the aim is about 250 lines.
const README_MAX_LINES: usize = 300;

/// The two commands the README gives a newcomer, and the files they name.
const COMMANDS: [(&str, &str); 2] = [
    (
        "cargo run --release -- serve --config deploy/tollgate.example.yaml",
        "deploy/tollgate.example.yaml",
    ),
    ("bash scripts/test.sh", "scripts/test.sh"),
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.md` file directly under `docs/`, sorted.
fn docs_pages() -> Vec<PathBuf> {
    let dir = root().join("docs");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    pages
}

/// The Markdown files whose links are checked: the README, ARCHITECTURE.md
/// when present, every page under `docs/`, and each client's README.
fn checked_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let architecture = root().join("ARCHITECTURE.md");
    if architecture.is_file() {
        files.push(architecture);
    }
    files.extend(docs_pages());
    let clients = root().join("clients");
    let mut readmes: Vec<PathBuf> = std::fs::read_dir(&clients)
        .unwrap_or_else(|e| panic!("{}: {e}", clients.display()))
        .map(|e| e.expect("dir entry").path().join("README.md"))
        .filter(|p| p.is_file())
        .collect();
    readmes.sort();
    files.extend(readmes);
    files
}

/// The lines of `text` that are prose: fenced code blocks are left out.
fn prose_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fence: Option<(char, usize)> = None;
    text.lines().enumerate().filter_map(move |(i, line)| {
        let trimmed = line.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        match (fence, marker) {
            (None, Some(c)) if run >= 3 => {
                fence = Some((c, run));
                None
            }
            (Some((c, n)), Some(m)) if m == c && run >= n && trimmed[run..].trim().is_empty() => {
                fence = None;
                None
            }
            (Some(_), _) => None,
            (None, _) => Some((i + 1, line)),
        }
    })
}

/// `line` with its inline code spans removed, so that a path written as
/// code (`` `[x](y)` ``) is not taken for a link.
fn without_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|c| *c == '`').count();
        let after = &rest[start + ticks..];
        let closing = "`".repeat(ticks);
        match after.find(&closing) {
            Some(end) => rest = &after[end + ticks..],
            None => {
                out.push_str(&rest[start..]);
                return out;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Every link destination in `text` with its line: inline links and images
/// (`[text](dest)`, `![alt](dest)`) and reference definitions
/// (`[label]: dest`). Code blocks and code spans are skipped.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in prose_lines(text) {
        let line = without_code_spans(line);
        let trimmed = line.trim_start();
        if let Some(def) = trimmed.strip_prefix('[').and_then(|r| {
            let close = r.find(']')?;
            r[close + 1..].strip_prefix(':').map(str::trim)
        }) {
            if let Some(dest) = def.split_whitespace().next() {
                found.push((n, dest.trim_matches(['<', '>']).to_owned()));
            }
            continue;
        }
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let dest = match after.strip_prefix('<') {
                Some(angled) => angled.split('>').next().unwrap_or_default(),
                None => {
                    let mut depth = 0usize;
                    let end = after
                        .char_indices()
                        .find(|&(_, c)| match c {
                            '(' => {
                                depth += 1;
                                false
                            }
                            ')' if depth == 0 => true,
                            ')' => {
                                depth -= 1;
                                false
                            }
                            c => c.is_whitespace(),
                        })
                        .map_or(after.len(), |(i, _)| i);
                    &after[..end]
                }
            };
            found.push((n, dest.to_owned()));
            rest = after;
        }
    }
    found
}

/// GitHub's anchor for a heading: lowercase; letters, digits, `-` and `_`
/// kept; spaces become `-`; everything else dropped. Inline Markdown is
/// read as its text first (a link as its label, code without backticks).
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // A link in a heading reads as its label.
    while let Some(open) = rest.find('[') {
        let Some((label, after)) = rest[open + 1..].split_once("](") else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(label);
        rest = after.split_once(')').map_or("", |(_, r)| r);
    }
    text.push_str(rest);
    text.chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// Every anchor a Markdown file offers: its headings' slugs (a repeated
/// slug gets `-1`, `-2`, … as on GitHub) and explicit `id=`/`name=` anchors.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        for attr in ["id=\"", "name=\""] {
            for part in line.split(attr).skip(1) {
                if let Some(id) = part.split('"').next() {
                    out.insert(id.to_owned());
                }
            }
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(line[hashes..].trim().trim_end_matches('#').trim());
        let count = seen.entry(base.clone()).or_insert(0);
        out.insert(if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    out
}

/// A link destination that leaves the repository (a URL or an e-mail).
fn is_external(dest: &str) -> bool {
    dest.contains("://") || dest.starts_with("mailto:") || dest.starts_with("//")
}

/// What is wrong with the relative link `dest` written in `file`, if
/// anything: a missing file, or an anchor no heading of the target has.
fn broken(file: &Path, dest: &str) -> Option<String> {
    let (path, anchor) = match dest.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (dest, None),
    };
    let path = path
        .split('?')
        .next()
        .unwrap_or_default()
        .replace("%20", " ");
    let target = if path.is_empty() {
        file.to_path_buf()
    } else {
        file.parent().expect("a file has a folder").join(path)
    };
    if !target.exists() {
        return Some("no such file".to_owned());
    }
    let anchor = anchor.filter(|a| !a.is_empty())?;
    if target.extension().is_none_or(|e| e != "md") {
        return Some(format!("#{anchor} points into a file that is not Markdown"));
    }
    let offered = anchors(&read(&target));
    (!offered.contains(anchor)).then(|| format!("no heading has the anchor #{anchor}"))
}

/// The files that `file` links to, canonicalized.
fn link_targets(file: &Path) -> BTreeSet<PathBuf> {
    links(&read(file))
        .into_iter()
        .filter(|(_, dest)| !is_external(dest))
        .filter_map(|(_, dest)| {
            let path = dest.split('#').next().unwrap_or_default().to_owned();
            (!path.is_empty()).then(|| file.parent().expect("a folder").join(path))
        })
        .filter_map(|p| p.canonicalize().ok())
        .collect()
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for file in checked_files() {
        for (line, dest) in links(&read(&file)) {
            if is_external(&dest) {
                continue;
            }
            checked += 1;
            if let Some(why) = broken(&file, &dest) {
                problems.push(format!("{}:{line}: ({dest}): {why}", relative(&file)));
            }
        }
    }
    assert!(
        checked > 0,
        "no relative links found: is the link reader broken?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_readme_stays_a_short_front_door() {
    let lines = read(&root().join("README.md")).lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; the most is {README_MAX_LINES}: move reference to docs/"
    );
}

#[test]
fn the_readmes_two_commands_are_there_and_name_files_that_exist() {
    let readme = read(&root().join("README.md"));
    let mut problems = Vec::new();
    for (command, file) in COMMANDS {
        if !readme.lines().any(|l| l.trim() == command) {
            problems.push(format!(
                "README.md does not give `{command}` on a line of its own"
            ));
        }
        if !root().join(file).is_file() {
            problems.push(format!("`{command}` names {file}, which does not exist"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_docs_page_is_listed_in_the_index_and_one_click_from_the_readme() {
    let index = root().join("docs").join("README.md");
    let from_index = link_targets(&index);
    let from_readme = link_targets(&root().join("README.md"));
    let mut problems = Vec::new();
    for page in docs_pages() {
        if page == index {
            continue;
        }
        let canonical = page.canonicalize().expect("a page that exists");
        if !from_index.contains(&canonical) {
            problems.push(format!("docs/README.md does not link {}", relative(&page)));
        }
        if !from_readme.contains(&canonical) {
            problems.push(format!("README.md does not link {}", relative(&page)));
        }
    }
    if !from_readme.contains(&index.canonicalize().expect("docs/README.md")) {
        problems.push("README.md does not link docs/README.md".to_owned());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn heading_anchors_follow_githubs_rules() {
    assert_eq!(
        slug("Bucket math and retry-after"),
        "bucket-math-and-retry-after"
    );
    assert_eq!(slug("`tollgate.v1.Admin`"), "tollgatev1admin");
    assert_eq!(
        slug("1. An LLM gateway: charge the real token count"),
        "1-an-llm-gateway-charge-the-real-token-count"
    );
    assert_eq!(
        slug("Failure modes, and what Envoy does"),
        "failure-modes-and-what-envoy-does"
    );
    assert_eq!(slug("See [the page](x.md) now"), "see-the-page-now");
    assert_eq!(slug("snake_case Names"), "snake_case-names");
    let repeated = anchors("# Tests\n\n```\n# not a heading\n```\n## Tests\n");
    assert_eq!(
        repeated.into_iter().collect::<Vec<_>>(),
        ["tests", "tests-1"]
    );
}

#[test]
fn links_are_read_outside_code_only() {
    let text = "See [a](a.md#x) and ![b](img/b.png \"title\").\n\
                `[not](a link)` and [c](<with space.md>)\n\
                ```\n[code](block.md)\n```\n\
                [ref]: ref.md\n\
                [fn(x)](f(x).md) [web](https://example.com)";
    let found: Vec<String> = links(text).into_iter().map(|(_, d)| d).collect();
    assert_eq!(
        found,
        [
            "a.md#x",
            "img/b.png",
            "with space.md",
            "ref.md",
            "f(x).md",
            "https://example.com"
        ]
    );
}
