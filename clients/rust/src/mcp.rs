//! MCP-aware extraction: what counts as one request on an MCP endpoint is the
//! JSON-RPC call, not the HTTP request. This module reads a JSON-RPC body
//! into the calls to charge, and renders the JSON-RPC error of a denial. It
//! does no I/O; the layer reads the body and asks Tollgate.
//!
//! - A call's operation is its method; `tools/call:<tool name>`,
//!   `prompts/get:<prompt name>` and `resources/read:<uri>` name what they
//!   touch (an absent name gives `tools/call:`, which `tools/call:*` globs
//!   still match).
//! - `notifications/*` and responses (no `method`, a `result` or `error`) are
//!   never charged. Any other method is, with or without an `id`, so a
//!   caller cannot skip the limit by leaving the `id` out.
//! - A body that is JSON but not JSON-RPC is charged once, as a plain HTTP
//!   request: the MCP server will refuse it, but it still cost a request.
//! - A body that could be read in more than one way is refused, not guessed
//!   at: anything but one JSON text in UTF-8 without a byte order mark, a
//!   duplicate key in any object, a lone surrogate escape, a number out of
//!   range, nesting past 127 levels, or a key that is a JSON-RPC key
//!   (`jsonrpc`, `id`, `method`, `params`, `result`, `error`), or `name` or
//!   `uri` in `params`, in another case. A lenient server could run calls
//!   that a strict reading would not charge.
//! - A batch (a JSON array) is charged all or nothing, as one atomic
//!   `ShouldAllowBatch`: when any call is denied the whole body is refused,
//!   and no call takes a token.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

mod strict;

use crate::headers::ceil_secs;

/// The JSON-RPC error code of a rate-limited call unless configured
/// otherwise ([`crate::layer::McpLayer::error_code`]): 429, the HTTP status
/// it mirrors. MCP's 2026-07-28 revision reserves -32020..-32099 for codes
/// the spec defines, and asks that other codes be allocated outside
/// JSON-RPC's reserved -32768..-32000; 429 is outside both, so it is valid
/// under every revision. `docs/mcp.md` gives the choice.
pub const RATE_LIMITED_CODE: i64 = 429;

/// The code MCP's open proposal SEP-3304 would give rate limiting. It is
/// inside the spec's reserved range: send it only once the spec defines it,
/// or to clients that expect it.
pub const PROPOSED_RATE_LIMITED_CODE: i64 = -32023;

/// The code earlier versions of this crate sent, for clients written
/// against it. It sits in the range MCP now reserves.
pub const LEGACY_RATE_LIMITED_CODE: i64 = -32029;

/// The JSON-RPC code of a body refused as unreadable.
pub const PARSE_ERROR_CODE: i64 = -32700;

/// The media type of a JSON-RPC denial.
pub const JSON: &str = "application/json";

/// What a POST body on an MCP endpoint asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// One JSON-RPC message, or a batch (a JSON array) of them.
    JsonRpc {
        /// The messages to charge, in body order.
        calls: Vec<Call>,
        /// True when the body was an array: a denial is then an array too.
        batch: bool,
    },
    /// JSON but not JSON-RPC: charged once as a plain request.
    Other,
    /// Could be read in more than one way: refused with a JSON-RPC parse
    /// error (HTTP 400), and nothing is charged or forwarded. The reason.
    Refused(String),
}

/// One charged JSON-RPC message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Call {
    /// Its `id`, echoed in the error of a denial; `None` if it had none.
    pub(crate) id: Option<Value>,
    /// What it does, such as `tools/call:search`. `None` when the message
    /// has no usable method (not a JSON-RPC request), so the layer's own
    /// operation applies.
    pub(crate) operation: Option<String>,
}

/// Reads a body. A body that could be read in more than one way is
/// [`Body::Refused`] (see [`strict`]); JSON that is not JSON-RPC is
/// [`Body::Other`].
pub(crate) fn parse(bytes: &[u8]) -> Body {
    let value = match strict::read(bytes) {
        Ok(value) => value,
        Err(reason) => return Body::Refused(reason),
    };
    let checked = |message: &Map<String, Value>| strict::check_message(message);
    match value {
        Value::Object(message) => match checked(&message) {
            Ok(()) => Body::JsonRpc {
                calls: charged(&message).into_iter().collect(),
                batch: false,
            },
            Err(reason) => Body::Refused(reason),
        },
        // JSON-RPC says an empty batch is an invalid request; charging it
        // once keeps it from being a free way to reach the server.
        Value::Array(messages) if !messages.is_empty() => {
            let mut calls = Vec::new();
            for m in &messages {
                match m {
                    Value::Object(message) => {
                        if let Err(reason) = checked(message) {
                            return Body::Refused(reason);
                        }
                        calls.extend(charged(message));
                    }
                    _ => calls.push(Call {
                        id: None,
                        operation: None,
                    }),
                }
            }
            Body::JsonRpc { calls, batch: true }
        }
        _ => Body::Other,
    }
}

/// The call to charge for one message, or `None` for a notification or a
/// response.
fn charged(message: &Map<String, Value>) -> Option<Call> {
    let id = message.get("id").cloned();
    match message.get("method") {
        Some(Value::String(method)) if method.starts_with("notifications/") => None,
        Some(Value::String(method)) => Some(Call {
            id,
            operation: Some(operation(method, message.get("params"))),
        }),
        Some(_) => Some(Call {
            id,
            operation: None,
        }),
        None if message.contains_key("result") || message.contains_key("error") => None,
        None => Some(Call {
            id,
            operation: None,
        }),
    }
}

/// The cost of each operation the calls charge: one per call, under its
/// operation, or under `plain` (the layer's own operation) for a call with
/// none.
pub(crate) fn charges(calls: &[Call], plain: &str) -> BTreeMap<String, u32> {
    let mut costs: BTreeMap<String, u32> = BTreeMap::new();
    for call in calls {
        let operation = call.operation.as_deref().unwrap_or(plain);
        let cost = costs.entry(operation.to_owned()).or_insert(0);
        *cost = cost.saturating_add(1);
    }
    costs
}

/// Whether a request path (as sent, percent-encoded) is the MCP endpoint.
/// Both are compared decoded, cleaned (repeated slashes collapsed, `.` and
/// `..` resolved, a trailing slash dropped) and in ASCII lower case: servers
/// and routers that normalise paths would hand `/mcp/`, `//mcp` or `/MCP`
/// to the MCP handler, so those are charged per call too.
pub(crate) fn path_matches(endpoint: &str, path: &str) -> bool {
    normalize_path(endpoint) == normalize_path(path)
}

fn normalize_path(path: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/")).to_ascii_lowercase()
}

/// The operation of a call: the method, and for the three methods that name
/// a tool, prompt or resource, that name after a colon.
pub fn operation(method: &str, params: Option<&Value>) -> String {
    let field = match method {
        "tools/call" | "prompts/get" => "name",
        "resources/read" => "uri",
        _ => return method.to_owned(),
    };
    let name = params
        .and_then(|p| p.get(field))
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{method}:{name}")
}

/// The body of a 400 for a refused body: a JSON-RPC parse error, with the
/// reason in `data`.
pub(crate) fn parse_error(reason: &str) -> Vec<u8> {
    json!({
        "jsonrpc": "2.0",
        "id": Value::Null,
        "error": { "code": PARSE_ERROR_CODE, "message": "Parse error", "data": { "reason": reason } },
    })
    .to_string()
    .into_bytes()
}

/// The body of a 429 for these calls: one JSON-RPC error object, or an
/// array of them (one per charged message) for a batch. `data` carries the
/// wait: `retryAfterSeconds` (rounded up, as `Retry-After`) and
/// `retryAfterMs`, or neither when no retry can pass; and the rules that
/// denied.
pub(crate) fn denial(
    code: i64,
    calls: &[Call],
    batch: bool,
    retry_after: Option<Duration>,
    violated: &[&str],
    reason: &str,
) -> Vec<u8> {
    let mut data = json!({ "violatedPolicies": violated });
    if let Some(r) = retry_after {
        data["retryAfterSeconds"] = ceil_secs(r).into();
        data["retryAfterMs"] = u64::try_from(r.as_millis()).unwrap_or(u64::MAX).into();
    } else if !reason.is_empty() {
        data["reason"] = reason.into();
    }
    let message = if batch {
        "Rate limit exceeded: the batch was refused whole"
    } else {
        "Rate limit exceeded"
    };
    let error = |id: Option<&Value>| {
        json!({
            "jsonrpc": "2.0",
            "id": id.cloned().unwrap_or(Value::Null),
            "error": { "code": code, "message": message, "data": data },
        })
    };
    let body = if batch {
        Value::Array(calls.iter().map(|c| error(c.id.as_ref())).collect())
    } else {
        error(calls.first().and_then(|c| c.id.as_ref()))
    };
    body.to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: i64, operation: &str) -> Call {
        Call {
            id: Some(json!(id)),
            operation: Some(operation.to_owned()),
        }
    }

    #[test]
    fn operations_name_the_tool_prompt_or_resource() {
        let p = json!({"name": "search", "uri": "file:///a"});
        assert_eq!(operation("tools/call", Some(&p)), "tools/call:search");
        assert_eq!(operation("prompts/get", Some(&p)), "prompts/get:search");
        assert_eq!(
            operation("resources/read", Some(&p)),
            "resources/read:file:///a"
        );
        assert_eq!(operation("tools/list", Some(&p)), "tools/list");
        assert_eq!(operation("tools/call", None), "tools/call:");
    }

    #[test]
    fn a_single_call_is_charged_with_its_id() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"search"}}"#;
        assert_eq!(
            parse(body),
            Body::JsonRpc {
                calls: vec![call(7, "tools/call:search")],
                batch: false
            }
        );
    }

    #[test]
    fn notifications_and_responses_are_free_but_id_less_calls_are_not() {
        let body = br#"[
            {"jsonrpc":"2.0","method":"notifications/initialized"},
            {"jsonrpc":"2.0","id":1,"result":{}},
            {"jsonrpc":"2.0","id":2,"error":{"code":1,"message":"x"}},
            {"jsonrpc":"2.0","id":"a","method":"ping"},
            {"jsonrpc":"2.0","method":"tools/call","params":{"name":"fetch"}},
            42
        ]"#;
        let Body::JsonRpc { calls, batch } = parse(body) else {
            panic!("not JSON-RPC")
        };
        assert!(batch);
        assert_eq!(
            calls,
            [
                Call {
                    id: Some(json!("a")),
                    operation: Some("ping".into())
                },
                Call {
                    id: None,
                    operation: Some("tools/call:fetch".into())
                },
                Call {
                    id: None,
                    operation: None
                },
            ]
        );
        let notification = br#"{"jsonrpc":"2.0","method":"notifications/cancelled"}"#;
        assert_eq!(
            parse(notification),
            Body::JsonRpc {
                calls: vec![],
                batch: false
            }
        );
    }

    #[test]
    fn json_that_is_not_json_rpc_is_charged_as_a_plain_request() {
        assert!(matches!(parse(b"not json"), Body::Refused(_)));
        assert_eq!(parse(b"[]"), Body::Other);
        assert_eq!(parse(b"\"a string\""), Body::Other);
    }

    #[test]
    fn a_denial_is_a_json_rpc_error_with_the_wait_in_data() {
        let body = denial(
            RATE_LIMITED_CODE,
            &[call(7, "tools/call:search")],
            false,
            Some(Duration::from_millis(2_100)),
            &["per-user"],
            "",
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["code"], RATE_LIMITED_CODE);
        assert_eq!(v["error"]["data"]["retryAfterSeconds"], 3);
        assert_eq!(v["error"]["data"]["retryAfterMs"], 2100);
        assert_eq!(v["error"]["data"]["violatedPolicies"], json!(["per-user"]));
    }

    #[test]
    fn a_batch_denial_answers_every_charged_call() {
        let calls = [
            call(1, "tools/call:a"),
            Call {
                id: None,
                operation: None,
            },
        ];
        let body = denial(
            PROPOSED_RATE_LIMITED_CODE,
            &calls,
            true,
            None,
            &["per-user"],
            "cost 9 is over capacity 3",
        );
        let v: Value = serde_json::from_slice(&body).unwrap();
        let errors = v.as_array().unwrap();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0]["id"], 1);
        assert_eq!(errors[0]["error"]["code"], -32023);
        assert_eq!(errors[1]["id"], Value::Null);
        assert_eq!(
            errors[1]["error"]["data"]["reason"],
            "cost 9 is over capacity 3"
        );
        assert!(
            errors[1]["error"]["data"]
                .get("retryAfterSeconds")
                .is_none()
        );
    }

    /// The shared vectors' file, which the Go client checks too.
    fn vectors() -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../mcp/vectors.json");
        let text = std::fs::read_to_string(path).expect("clients/mcp/vectors.json");
        serde_json::from_str(&text).expect("vectors.json is JSON")
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn bodies_are_charged_or_refused_as_the_shared_vectors_say() {
        let file = vectors();
        let bodies = file["bodies"].as_array().expect("bodies");
        assert!(!bodies.is_empty());
        let mut wrong = Vec::new();
        for v in bodies {
            let name = v["name"].as_str().expect("name");
            let body = match (v["body"].as_str(), v["body_hex"].as_str()) {
                (Some(s), None) => s.as_bytes().to_vec(),
                (None, Some(h)) => unhex(h),
                _ => panic!("{name}: give body or body_hex"),
            };
            let want: BTreeMap<String, u32> = v["charges"]
                .as_array()
                .expect("charges")
                .iter()
                .map(|c| {
                    let op = c[0].as_str().expect("operation").to_owned();
                    let cost = u32::try_from(c[1].as_u64().expect("cost")).expect("cost");
                    (op, cost)
                })
                .collect();
            let refused = v["refused"].as_bool().expect("refused");
            let got = match parse(&body) {
                Body::Refused(_) if refused => continue,
                Body::Refused(reason) => {
                    wrong.push(format!("{name}: refused ({reason}); want {want:?}"));
                    continue;
                }
                Body::Other => BTreeMap::from([("POST /mcp".to_owned(), 1)]),
                Body::JsonRpc { calls, .. } => charges(&calls, "POST /mcp"),
            };
            if refused {
                wrong.push(format!("{name}: charged {got:?}; want refused"));
            } else if got != want {
                wrong.push(format!("{name}: charged {got:?}; want {want:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn paths_are_read_as_mcp_as_the_shared_vectors_say() {
        let file = vectors();
        let mut wrong = Vec::new();
        for v in file["paths"].as_array().expect("paths") {
            let endpoint = v["endpoint"].as_str().expect("endpoint");
            let path = v["path"].as_str().expect("path");
            let want = v["mcp"].as_bool().expect("mcp");
            if path_matches(endpoint, path) != want {
                wrong.push(format!("path_matches({endpoint:?}, {path:?}) != {want}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }
}
