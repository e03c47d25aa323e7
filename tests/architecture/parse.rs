//! The parser: files → module tree → the facts the checks read.
//!
//! Every file is placed in the module tree by following `mod` items from
//! `lib.rs` (`tollgate::…`) and `main.rs` (`bin::…`). Then every `use` leaf
//! and every path of two or more segments is resolved to an absolute path,
//! through `crate::`, `super::`, `self::`, the module's own items, imports
//! and glob imports; anything else is an outside crate. Macro bodies, which
//! syn leaves as tokens, are scanned for `a::b` paths and floats.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::visit::{self, Visit};

/// What the checks read, gathered from every file in one pass.
#[derive(Default)]
pub(crate) struct Tree {
    pub(crate) files: Vec<FileInfo>,
    pub(crate) refs: Vec<Ref>,
    pub(crate) floats: Vec<Fact>,
    pub(crate) awaits: Vec<Await>,
    pub(crate) fns: Vec<FnLen>,
    /// (module, method) for every method of every trait.
    pub(crate) trait_methods: Vec<(String, String)>,
    /// (module, name) for every async fn.
    pub(crate) async_fns: Vec<(String, String)>,
}

pub(crate) struct FileInfo {
    pub(crate) path: String,
    pub(crate) module: String,
}

/// A path named by a file, resolved to where it points.
#[derive(Debug)]
pub(crate) struct Ref {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) module: String,
    pub(crate) path: String,
}

pub(crate) struct Fact {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) module: String,
    pub(crate) what: String,
}

pub(crate) struct Await {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) module: String,
    /// The awaited method's name, or None when it is not a method call.
    pub(crate) what: Option<String>,
}

pub(crate) struct FnLen {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) name: String,
    pub(crate) lines: usize,
}

/// What a name means inside one module.
#[derive(Default)]
struct Scope {
    /// Items and modules declared here, by name, as absolute paths.
    declared: HashMap<String, String>,
    /// `use` bindings: name → the path as written (resolved on demand).
    imports: HashMap<String, Vec<String>>,
    /// Glob imports, as written.
    globs: Vec<Vec<String>>,
}

impl Tree {
    /// Parses `files` (paths relative to `src/`, with their text): follows
    /// `mod` items from `lib.rs` and `main.rs`, then reads every module.
    pub(crate) fn parse(files: &BTreeMap<String, String>) -> Result<Tree, String> {
        let mut parsed = Vec::new();
        let mut queue = vec![
            ("lib.rs".to_string(), "tollgate".to_string()),
            ("main.rs".to_string(), "bin".to_string()),
        ];
        let mut seen = BTreeSet::new();
        while let Some((path, module)) = queue.pop() {
            let Some(text) = files.get(&path) else {
                return Err(format!("{module} is declared but src/{path} is missing"));
            };
            seen.insert(path.clone());
            let ast = syn::parse_file(text).map_err(|e| format!("src/{path}: {e}"))?;
            for (name, test_only) in out_of_line_mods(&ast) {
                let child = child_file(&path, &name, files)
                    .ok_or_else(|| format!("src/{path}: no file for `mod {name};`"))?;
                if !test_only {
                    queue.push((child, format!("{module}::{name}")));
                } else {
                    seen.insert(child);
                }
            }
            parsed.push((path, module, ast));
        }
        let orphans: Vec<&String> = files.keys().filter(|p| !seen.contains(*p)).collect();
        if !orphans.is_empty() {
            return Err(format!(
                "not in the module tree, so no rule reaches them: {orphans:?}"
            ));
        }
        let mut scopes = HashMap::new();
        for (_, module, ast) in &parsed {
            collect_scopes(module, &ast.items, &mut scopes);
        }
        let mut tree = Tree::default();
        for (path, module, ast) in &parsed {
            tree.files.push(FileInfo {
                path: path.clone(),
                module: module.clone(),
            });
            let mut collector = Collector {
                scopes: &scopes,
                file: path,
                module: module.clone(),
                tree: &mut tree,
            };
            collector.visit_file(ast);
        }
        Ok(tree)
    }
}

/// The `mod name;` items of a file, with whether each is `#[cfg(test)]`.
fn out_of_line_mods(ast: &syn::File) -> Vec<(String, bool)> {
    ast.items
        .iter()
        .filter_map(|item| match item {
            syn::Item::Mod(m) if m.content.is_none() => {
                Some((m.ident.to_string(), is_test(&m.attrs)))
            }
            _ => None,
        })
        .collect()
}

/// The file that `mod name;` in `parent` loads: `dir/name.rs` or
/// `dir/name/mod.rs`, where `dir` is the parent's own directory for
/// `lib.rs`, `main.rs` and `mod.rs`, and `parent_stem/` otherwise.
fn child_file(parent: &str, name: &str, files: &BTreeMap<String, String>) -> Option<String> {
    let (dir, file) = parent.rsplit_once('/').unwrap_or(("", parent));
    let stem = file.trim_end_matches(".rs");
    let base = match (dir, stem) {
        (_, "mod") | ("", "lib" | "main") => dir.to_string(),
        ("", _) => stem.to_string(),
        _ => format!("{dir}/{stem}"),
    };
    let join = |p: String| {
        if base.is_empty() {
            p
        } else {
            format!("{base}/{p}")
        }
    };
    [join(format!("{name}.rs")), join(format!("{name}/mod.rs"))]
        .into_iter()
        .find(|p| files.contains_key(p))
}

/// Whether the attributes mark test-only code: `#[cfg(test)]`, `#[test]`,
/// `#[tokio::test]`. Unit tests may wire real parts together, so the rules
/// are about the code that ships.
fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let path = a.path();
        if path.is_ident("cfg") {
            return matches!(&a.meta, syn::Meta::List(l) if l.tokens.to_string() == "test");
        }
        path.segments.last().is_some_and(|s| s.ident == "test")
    })
}

fn collect_scopes(module: &str, items: &[syn::Item], scopes: &mut HashMap<String, Scope>) {
    let mut scope = Scope::default();
    for item in items {
        collect_item(module, item, &mut scope, scopes);
    }
    scopes.insert(module.to_string(), scope);
}

fn collect_item(
    module: &str,
    item: &syn::Item,
    scope: &mut Scope,
    scopes: &mut HashMap<String, Scope>,
) {
    use syn::Item;
    let name = match item {
        Item::Mod(m) => {
            if let Some((_, items)) = &m.content {
                collect_scopes(&format!("{module}::{}", m.ident), items, scopes);
            }
            Some(&m.ident)
        }
        Item::Use(u) => {
            let mut leaves = Vec::new();
            use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
            for leaf in leaves {
                match leaf.binding {
                    Some(b) if b != "_" => {
                        scope.imports.insert(b, leaf.path);
                    }
                    Some(_) => {}
                    None => scope.globs.push(leaf.path),
                }
            }
            None
        }
        // `use` inside a function body binds for that block only; taking it
        // as the module's is close enough for naming rooms and crates.
        Item::Fn(f) => {
            for stmt in &f.block.stmts {
                if let syn::Stmt::Item(inner) = stmt {
                    collect_item(module, inner, scope, scopes);
                }
            }
            Some(&f.sig.ident)
        }
        Item::Impl(i) => {
            for inner in &i.items {
                if let syn::ImplItem::Fn(f) = inner {
                    for stmt in &f.block.stmts {
                        if let syn::Stmt::Item(item) = stmt {
                            collect_item(module, item, scope, scopes);
                        }
                    }
                }
            }
            None
        }
        Item::Struct(s) => Some(&s.ident),
        Item::Enum(e) => Some(&e.ident),
        Item::Trait(t) => Some(&t.ident),
        Item::Type(t) => Some(&t.ident),
        Item::Const(c) => Some(&c.ident),
        Item::Static(s) => Some(&s.ident),
        Item::Union(u) => Some(&u.ident),
        Item::Macro(m) => m.ident.as_ref(),
        _ => None,
    };
    if let Some(name) = name {
        scope
            .declared
            .insert(name.to_string(), format!("{module}::{name}"));
    }
}

/// One leaf of a `use` tree: the full path as written, and the name it
/// binds (None for a glob).
struct UseLeaf {
    path: Vec<String>,
    binding: Option<String>,
    span: Span,
}

/// Flattens a `use` tree, nested groups, renames, `self` and globs included.
fn use_leaves(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<UseLeaf>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_leaves(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let (path, binding) = if n.ident == "self" {
                (prefix.clone(), prefix.last().cloned())
            } else {
                let mut path = prefix.clone();
                path.push(n.ident.to_string());
                (path, Some(n.ident.to_string()))
            };
            out.push(UseLeaf {
                path,
                binding,
                span: n.ident.span(),
            });
        }
        syn::UseTree::Rename(r) => {
            let mut path = prefix.clone();
            if r.ident != "self" {
                path.push(r.ident.to_string());
            }
            out.push(UseLeaf {
                path,
                binding: Some(r.rename.to_string()),
                span: r.ident.span(),
            });
        }
        syn::UseTree::Glob(g) => out.push(UseLeaf {
            path: prefix.clone(),
            binding: None,
            span: g.star_token.span,
        }),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_leaves(t, prefix, out);
            }
        }
    }
}

const PRIMITIVES: &[&str] = &[
    "bool", "char", "str", "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64",
    "u128", "usize", "f32", "f64",
];

/// Resolves a path as written in `module` to an absolute path (`tollgate::…`,
/// `bin::…`, or an outside crate's), or None for what names no module or
/// crate we can place: `Self`, generics, the prelude, primitives, locals.
fn resolve(
    scopes: &HashMap<String, Scope>,
    module: &str,
    path: &[String],
    depth: u8,
) -> Option<String> {
    let (first, rest) = path.split_first()?;
    match first.as_str() {
        "crate" => {
            let root = module.split("::").next().unwrap_or(module);
            return Some(join(root.to_string(), rest));
        }
        "self" => return Some(join(module.to_string(), rest)),
        "super" => {
            let mut base = module.rsplit_once("::").map_or(module, |(p, _)| p);
            let mut rest = rest;
            while rest.first().is_some_and(|s| s == "super") {
                base = base.rsplit_once("::").map_or(base, |(p, _)| p);
                rest = &rest[1..];
            }
            return Some(join(base.to_string(), rest));
        }
        "Self" => return None,
        _ if first.starts_with('$') => return None,
        _ => {}
    }
    if let Some(base) = lookup(scopes, module, first, depth) {
        return Some(join(base, rest));
    }
    let outside = first.starts_with(|c: char| c.is_ascii_lowercase())
        && !PRIMITIVES.contains(&first.as_str());
    // A path of one segment that is not bound here is a local, a generic or
    // the prelude; only `a::b` can be an outside crate.
    (outside && !rest.is_empty()).then(|| join(first.clone(), rest))
}

/// `base::rest[0]::rest[1]…`
fn join(base: String, rest: &[String]) -> String {
    std::iter::once(base)
        .chain(rest.iter().cloned())
        .collect::<Vec<_>>()
        .join("::")
}

/// What `name` means in `module`: declared there, imported there, or
/// brought in by one of its glob imports.
fn lookup(scopes: &HashMap<String, Scope>, module: &str, name: &str, depth: u8) -> Option<String> {
    if depth > 8 {
        return None;
    }
    let scope = scopes.get(module)?;
    if let Some(path) = scope.declared.get(name) {
        return Some(path.clone());
    }
    if let Some(written) = scope.imports.get(name) {
        let first = written[0].as_str();
        if matches!(first, "crate" | "self" | "super") {
            return resolve(scopes, module, written, depth + 1);
        }
        // `use tonic as t;` and `use redis::{self, Cmd}`: the first segment
        // is a declared module or a crate, never this binding.
        if first == name || written.len() == 1 {
            let base = scope.declared.get(first).cloned();
            return Some(join(
                base.unwrap_or_else(|| first.to_string()),
                &written[1..],
            ));
        }
        return resolve(scopes, module, written, depth + 1);
    }
    for glob in &scope.globs {
        let Some(source) = resolve(scopes, module, glob, depth + 1) else {
            continue;
        };
        if source != module
            && scopes.contains_key(&source)
            && let Some(found) = lookup(scopes, &source, name, depth + 1)
        {
            return Some(found);
        }
    }
    None
}

/// Walks one file, recording every fact the checks read.
struct Collector<'a> {
    scopes: &'a HashMap<String, Scope>,
    file: &'a str,
    module: String,
    tree: &'a mut Tree,
}

impl Collector<'_> {
    fn record(&mut self, segments: &[String], span: Span) {
        if let Some(path) = resolve(self.scopes, &self.module, segments, 0) {
            self.push_ref(path, span);
        }
    }

    fn push_ref(&mut self, path: String, span: Span) {
        self.tree.refs.push(Ref {
            file: self.file.to_string(),
            line: span.start().line,
            module: self.module.clone(),
            path,
        });
    }

    fn float(&mut self, span: Span, what: String) {
        self.tree.floats.push(Fact {
            file: self.file.to_string(),
            line: span.start().line,
            module: self.module.clone(),
            what,
        });
    }

    fn function(&mut self, sig: &syn::Signature, block: &syn::Block) {
        let start = sig.fn_token.span.start().line;
        let end = block.brace_token.span.close().end().line;
        self.tree.fns.push(FnLen {
            file: self.file.to_string(),
            line: start,
            name: sig.ident.to_string(),
            lines: end + 1 - start,
        });
        if sig.asyncness.is_some() {
            self.tree
                .async_fns
                .push((self.module.clone(), sig.ident.to_string()));
        }
    }

    /// The paths (`a::b::c`), idents and literals inside a macro's tokens,
    /// which syn leaves unparsed.
    fn scan_tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            match &tokens[i] {
                TokenTree::Group(g) => self.scan_tokens(g.stream()),
                TokenTree::Ident(id) => {
                    self.float_ident(id);
                    let after_dot_or_dollar = i > 0
                        && matches!(&tokens[i - 1], TokenTree::Punct(p) if p.as_char() == '.' || p.as_char() == '$');
                    let mut segments = vec![id.to_string()];
                    let mut j = i + 1;
                    while let (
                        Some(TokenTree::Punct(a)),
                        Some(TokenTree::Punct(b)),
                        Some(TokenTree::Ident(next)),
                    ) = (tokens.get(j), tokens.get(j + 1), tokens.get(j + 2))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        self.float_ident(next);
                        segments.push(next.to_string());
                        j += 3;
                    }
                    if segments.len() > 1 && !after_dot_or_dollar {
                        self.record(&segments, id.span());
                    }
                    i = j;
                    continue;
                }
                TokenTree::Literal(lit) => {
                    if let syn::Lit::Float(_) = syn::Lit::new(lit.clone()) {
                        self.float(lit.span(), format!("literal {lit}"));
                    }
                }
                TokenTree::Punct(_) => {}
            }
            i += 1;
        }
    }

    /// A path that may have a qualified self type. `<[u8; 4]>::try_from`
    /// names a method of the type, not a crate: after `<T>::` nothing is
    /// resolved. `<T as a::Trait>::f` resolves `a::Trait::f`.
    fn qualified(&mut self, qself: Option<&syn::QSelf>, path: &syn::Path) {
        match qself {
            Some(q) if q.position == 0 => {
                self.visit_type(&q.ty);
                for segment in &path.segments {
                    self.visit_path_segment(segment);
                }
            }
            Some(q) => {
                self.visit_type(&q.ty);
                self.visit_path(path);
            }
            None => self.visit_path(path),
        }
    }

    fn float_ident(&mut self, id: &proc_macro2::Ident) {
        let s = id.to_string();
        if s == "f32" || s == "f64" || s.ends_with("_f32") || s.ends_with("_f64") {
            self.float(id.span(), format!("`{s}`"));
        }
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_test(&m.attrs) {
            return;
        }
        if let Some((_, items)) = &m.content {
            let inner = format!("{}::{}", self.module, m.ident);
            let outer = std::mem::replace(&mut self.module, inner);
            for item in items {
                self.visit_item(item);
            }
            self.module = outer;
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if is_test(&f.attrs) {
            return;
        }
        self.function(&f.sig, &f.block);
        visit::visit_item_fn(self, f);
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if is_test(&f.attrs) {
            return;
        }
        self.function(&f.sig, &f.block);
        visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.function(&f.sig, block);
        }
        visit::visit_trait_item_fn(self, f);
    }

    fn visit_item_trait(&mut self, t: &'ast syn::ItemTrait) {
        if is_test(&t.attrs) {
            return;
        }
        for item in &t.items {
            if let syn::TraitItem::Fn(f) = item {
                self.tree
                    .trait_methods
                    .push((self.module.clone(), f.sig.ident.to_string()));
            }
        }
        visit::visit_item_trait(self, t);
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if is_test(&i.attrs) {
            return;
        }
        visit::visit_item_impl(self, i);
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if is_test(&u.attrs) {
            return;
        }
        let mut leaves = Vec::new();
        use_leaves(&u.tree, &mut Vec::new(), &mut leaves);
        for leaf in leaves {
            // `use ::x::…` and a one-segment `use x;` name the crate `x`.
            let crate_name = u.leading_colon.is_some()
                || leaf.path.len() == 1
                    && !matches!(leaf.path[0].as_str(), "crate" | "self" | "super");
            let path = if crate_name {
                Some(leaf.path.join("::"))
            } else {
                resolve(self.scopes, &self.module, &leaf.path, 0)
            };
            if let Some(path) = path {
                self.push_ref(path, leaf.span);
            }
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        let span = p.segments[0].ident.span();
        if p.leading_colon.is_some() {
            // `::redis::Client` is always the crate, whatever is in scope.
            self.push_ref(segments.join("::"), span);
        } else if segments.len() > 1 {
            self.record(&segments, span);
        }
        visit::visit_path(self, p);
    }

    fn visit_expr_path(&mut self, e: &'ast syn::ExprPath) {
        for attr in &e.attrs {
            self.visit_attribute(attr);
        }
        self.qualified(e.qself.as_ref(), &e.path);
    }

    fn visit_type_path(&mut self, t: &'ast syn::TypePath) {
        self.qualified(t.qself.as_ref(), &t.path);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        visit::visit_macro(self, m);
        self.scan_tokens(m.tokens.clone());
    }

    fn visit_expr_await(&mut self, e: &'ast syn::ExprAwait) {
        self.tree.awaits.push(Await {
            file: self.file.to_string(),
            line: e.await_token.span.start().line,
            module: self.module.clone(),
            what: awaited_method(&e.base),
        });
        visit::visit_expr_await(self, e);
    }

    fn visit_lit_float(&mut self, l: &'ast syn::LitFloat) {
        self.float(l.span(), format!("literal {l}"));
    }

    fn visit_ident(&mut self, id: &'ast proc_macro2::Ident) {
        self.float_ident(id);
    }
}

/// The method or function an `.await` waits on, by name, through
/// parentheses and `Box::pin(…)`; None when it is not a call.
fn awaited_method(expr: &syn::Expr) -> Option<String> {
    match expr {
        syn::Expr::Paren(p) => awaited_method(&p.expr),
        syn::Expr::Group(g) => awaited_method(&g.expr),
        syn::Expr::MethodCall(m) => Some(m.method.to_string()),
        syn::Expr::Call(c) => {
            let syn::Expr::Path(p) = &*c.func else {
                return None;
            };
            let name = p.path.segments.last()?.ident.to_string();
            if name == "pin" && c.args.len() == 1 {
                awaited_method(&c.args[0])
            } else {
                Some(name)
            }
        }
        _ => None,
    }
}
