//! The page itself: HTML, its stylesheet and its script, all inline.

use std::fmt::Write as _;
use std::sync::Arc;

use super::{
    Board, POLL_MILLIS, RuleView, ScopeView, Snapshot, escape, fill_bars, sparkline, top_rows,
};
use crate::observe::hitters::Window;

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
header,main,footer{padding:0 24px}
header{background:#1d232b;color:#e8ecf1;padding:12px 24px}
header h1{margin:0;font-size:20px}header a{color:#9cc7ff}
h2{font-size:17px;margin:20px 0 8px}h3{font-size:15px;margin:0 0 6px}
small{color:#6a7480}header small{color:#b8c2cc}
.rules{display:flex;flex-wrap:wrap;gap:12px}
.rule{background:#fff;border:1px solid #d9dee4;border-radius:6px;padding:10px 12px;width:360px}
dl{display:grid;grid-template-columns:auto auto auto;margin:4px 0;gap:0 12px}
dt{color:#6a7480;font-size:12px}dd{margin:0;font-weight:600;font-size:16px;grid-row:2}
.charts{display:grid;grid-template-columns:1fr 1fr;gap:6px;margin:6px 0}
.charts figure{margin:0}.charts figcaption{font-size:11px;color:#6a7480}
.spark{width:100%;height:32px;background:#f0f3f6}
.spark polyline{fill:none;stroke-width:1.2;vector-effect:non-scaling-stroke}
.decided polyline{stroke:#2f6fde}.denied polyline{stroke:#d2452f}
.fill{display:flex;align-items:flex-end;gap:2px;height:32px;background:#f0f3f6;padding:0 2px}
.fill span{flex:1;background:#7a9cc6;min-height:1px}
.hints{margin:6px 0;padding-left:18px;color:#a4480a}
.tops{display:grid;grid-template-columns:1fr 1fr;gap:8px;align-items:start}
table{border-collapse:collapse;width:100%}caption{text-align:left;font-size:12px;color:#6a7480}
td,th{padding:2px 4px;border-bottom:1px solid #eef1f4;text-align:left;overflow-wrap:anywhere}
td.n{text-align:right;white-space:nowrap}.none{color:#9aa3ad}
.ok{color:#1c7c3c}.bad{color:#c0392b}
#reloads table{background:#fff;max-width:1100px}
footer{color:#6a7480;font-size:12px;margin:24px 0}
"#;

const SCRIPT: &str = r#"
(function () {
  const query = location.search;
  function spark(svg, s) {
    const max = Math.max(1, ...s);
    svg.querySelector('polyline').setAttribute('points',
      s.map((v, i) => i + ',' + (20 - v * 19 / max).toFixed(1)).join(' '));
  }
  function rows(tbody, list) {
    tbody.replaceChildren();
    if (!list.length) {
      const td = tbody.insertRow().insertCell();
      td.colSpan = 2; td.className = 'none'; td.textContent = 'none';
      return;
    }
    for (const c of list) {
      const tr = tbody.insertRow();
      tr.insertCell().textContent = c.identity;
      const n = tr.insertCell(); n.className = 'n'; n.textContent = c.count;
      if (c.error) {
        const s = document.createElement('small');
        s.textContent = ' (≥ ' + (c.count - c.error) + ')'; n.append(' ', s);
      }
    }
  }
  function rule(card, r) {
    card.querySelector('.dps').textContent = r.decisions_per_second.toFixed(1);
    card.querySelector('.nps').textContent = r.denials_per_second.toFixed(1);
    card.querySelector('.share').textContent = (100 * r.denied_share).toFixed(1) + '%';
    spark(card.querySelector('.spark.decided'), r.usage.per_second);
    spark(card.querySelector('.spark.denied'), r.usage.denied_per_second);
    const max = Math.max(1, ...r.usage.fill);
    [...card.querySelector('.fill').children].forEach((b, i) => {
      b.style.height = Math.floor(r.usage.fill[i] * 100 / max) + '%';
    });
    const hints = card.querySelector('.hints');
    hints.replaceChildren(...r.hints.map(h => {
      const li = document.createElement('li'); li.textContent = h.message; return li;
    }));
    rows(card.querySelector('.top-decisions'), r.top_decisions);
    rows(card.querySelector('.top-denials'), r.top_denials);
  }
  function reloads(list) {
    const tbody = document.querySelector('#reloads tbody');
    tbody.replaceChildren();
    for (const e of list) {
      const tr = tbody.insertRow();
      for (const v of [e.at, e.accepted ? 'accepted' : 'refused', 'v' + e.version, e.message]) {
        tr.insertCell().textContent = v;
      }
      tr.cells[1].className = e.accepted ? 'ok' : 'bad';
    }
  }
  async function tick() {
    let s;
    try {
      s = await (await fetch('/status.json' + query, {cache: 'no-store'})).json();
    } catch (e) {
      document.getElementById('updated').textContent = 'server unreachable';
      return;
    }
    const cards = new Map([...document.querySelectorAll('article.rule')]
      .map(a => [a.dataset.scope + '\n' + a.dataset.rule, a]));
    let seen = 0;
    for (const scope of s.scopes) for (const r of scope.rules) {
      const card = cards.get(scope.name + '\n' + r.name);
      if (!card) { location.reload(); return; }
      rule(card, r); seen++;
    }
    if (seen !== cards.size) { location.reload(); return; }
    const store = document.getElementById('store');
    store.textContent = s.store.kind + (s.store.available ? ': available' : ': circuit open');
    store.className = s.store.available ? 'ok' : 'bad';
    document.getElementById('config-version').textContent = s.config_version;
    document.getElementById('config-loaded').textContent = s.config_loaded_at;
    reloads(s.reloads);
    document.getElementById('updated').textContent = s.now;
    document.body.dataset.polls = (Number(document.body.dataset.polls) || 0) + 1;
  }
  setInterval(tick, POLL);
  tick();
})();
"#;

/// The whole page for `s`.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let (class, state) = if s.store.available {
        ("ok", "available")
    } else {
        ("bad", "circuit open")
    };
    let windows: Vec<String> = Window::ALL
        .iter()
        .map(|w| {
            let name = w.name();
            if *w == s.window {
                format!("<b>{name}</b>")
            } else {
                format!("<a href=\"?window={name}\">{name}</a>")
            }
        })
        .collect();
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>Tollgate status</title><style>{STYLE}</style></head><body>\
         <header><h1>Tollgate</h1><small>store <b id=\"store\" class=\"{class}\">{}: {state}</b> · \
         config version <b id=\"config-version\">{}</b> loaded <span id=\"config-loaded\">{}</span> · \
         window {} · updated <span id=\"updated\">{}</span> · \
         <a href=\"/metrics\">metrics</a> · <a href=\"/status.json\">status.json</a></small></header><main>",
        escape(&s.store.kind),
        s.config_version,
        escape(&s.config_loaded_at),
        windows.join(" "),
        escape(&s.now),
    );
    for scope in &s.scopes {
        scope_html(&mut out, scope, s.window);
    }
    reloads_html(&mut out, s);
    let _ = write!(
        out,
        "</main><footer>Per replica. Top lists come from space-saving summaries of {} counters per \
         window slot: a count is at most the window's total / {} above the truth, and the figure \
         in brackets is a lower bound. Rates are over the last ten seconds.</footer>\
         <script>const POLL = {POLL_MILLIS};{SCRIPT}</script></body></html>",
        s.counters, s.counters
    );
    out
}

fn scope_html(out: &mut String, scope: &ScopeView, window: Window) {
    let _ = write!(
        out,
        "<section class=\"scope\"><h2>scope <code>{}</code> <small>failure mode {}</small></h2>\
         <div class=\"rules\">",
        escape(&scope.name),
        escape(&scope.failure_mode)
    );
    for rule in &scope.rules {
        rule_html(out, &scope.name, rule, window);
    }
    out.push_str("</div>");
    if let Some(bans) = &scope.bans {
        bans_html(out, bans);
    }
    out.push_str("</section>");
}

/// A scope's penalty box: how many are banned, and the first few.
fn bans_html(out: &mut String, bans: &super::BansView) {
    let _ = write!(
        out,
        "<p class=\"bans\">banned now: <b>{}</b> <small>(read {})</small></p><ul class=\"bans\">",
        bans.total,
        escape(&bans.read_at)
    );
    for b in &bans.first {
        let op = b
            .operation
            .as_deref()
            .map(|o| format!(" <small>{}</small>", escape(o)))
            .unwrap_or_default();
        let _ = write!(
            out,
            "<li><code>{}</code>{op}: {} s left</li>",
            escape(&b.identity),
            b.seconds_left
        );
    }
    out.push_str("</ul>");
}

fn rule_html(out: &mut String, scope: &str, r: &RuleView, window: Window) {
    let hints: String = r
        .hints
        .iter()
        .map(|h| format!("<li>{}</li>", escape(&h.message)))
        .collect();
    let _ = write!(
        out,
        "<article class=\"rule\" data-scope=\"{}\" data-rule=\"{}\">\
         <h3>{} <small>per {} · {} per {}</small></h3>\
         <dl><dt>decisions/s</dt><dd class=\"dps\">{:.1}</dd><dt>denials/s</dt>\
         <dd class=\"nps\">{:.1}</dd><dt>denied ({})</dt><dd class=\"share\">{:.1}%</dd></dl>\
         <div class=\"charts\"><figure>{}<figcaption>decisions/s, last 60 s</figcaption></figure>\
         <figure>{}<figcaption>denials/s, last 60 s</figcaption></figure></div>\
         {}<small>tokens left after each decision ({}), empty → full</small>\
         <ul class=\"hints\">{hints}</ul><div class=\"tops\">\
         <table><caption>top by decisions ({})</caption><tbody class=\"top-decisions\">{}</tbody></table>\
         <table><caption>top by denials ({})</caption><tbody class=\"top-denials\">{}</tbody></table>\
         </div></article>",
        escape(scope),
        escape(&r.name),
        escape(&r.name),
        escape(&r.per),
        r.capacity,
        escape(&r.refill_period),
        r.decisions_per_second,
        r.denials_per_second,
        window.name(),
        100.0 * r.denied_share,
        sparkline("decided", &r.usage.per_second),
        sparkline("denied", &r.usage.denied_per_second),
        fill_bars(&r.usage.fill),
        window.name(),
        window.name(),
        top_rows(&r.top_decisions),
        window.name(),
        top_rows(&r.top_denials),
    );
}

fn reloads_html(out: &mut String, s: &Snapshot) {
    out.push_str(
        "<section id=\"reloads\"><h2>Config reloads</h2><table><thead><tr><th>at</th>\
         <th>result</th><th>version</th><th>message</th></tr></thead><tbody>",
    );
    for e in &s.reloads {
        let (class, result) = if e.accepted {
            ("ok", "accepted")
        } else {
            ("bad", "refused")
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td class=\"{class}\">{result}</td><td>v{}</td><td>{}</td></tr>",
            escape(&e.at),
            e.version,
            escape(&e.message)
        );
    }
    out.push_str("</tbody></table></section>");
}

/// The window a URI asks for with `?window=5m`; `1m` otherwise.
fn window_of(uri: &axum::http::Uri) -> Window {
    uri.query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("window="))
        .and_then(Window::parse)
        .unwrap_or(Window::OneMinute)
}

/// `GET /` and `GET /status.json` over `board`.
pub fn routes(board: Arc<Board>) -> axum::Router {
    use axum::http::Uri;
    use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
    use axum::routing::get;
    let page_board = board.clone();
    axum::Router::new()
        .route(
            "/",
            get(move |uri: Uri| {
                let board = page_board.clone();
                async move {
                    let html = render(&board.snapshot(window_of(&uri)));
                    (
                        [
                            (CONTENT_TYPE, "text/html; charset=utf-8"),
                            (CACHE_CONTROL, "no-store"),
                        ],
                        html,
                    )
                }
            }),
        )
        .route(
            "/status.json",
            get(move |uri: Uri| {
                let board = board.clone();
                async move {
                    let json = serde_json::to_string(&board.snapshot(window_of(&uri)))
                        .unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()));
                    (
                        [
                            (CONTENT_TYPE, "application/json"),
                            (CACHE_CONTROL, "no-store"),
                        ],
                        json,
                    )
                }
            }),
        )
}
